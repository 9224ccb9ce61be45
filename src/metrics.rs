//! What the pipeline reports while it runs: counters, positions, the slot
//! and latency histograms, encoded by `prometheus-client` in the
//! OpenMetrics text format. The stages write here; [`crate::http`] only
//! serves it.
//!
//! Invariant: every counter only grows; positions are stored as they are
//! confirmed, never ahead of what Neo4j committed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::lsn::Lsn;

/// What the running pipeline reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Replication is streaming.
    pub ready: AtomicBool,
    /// Row changes committed to Neo4j.
    pub changes: AtomicU64,
    /// Source transactions committed to Neo4j.
    pub transactions: AtomicU64,
    /// Neo4j transactions (batches) committed.
    pub batches: AtomicU64,
    /// Batch attempts that failed transiently and were retried.
    pub retries: AtomicU64,
    /// The position confirmed to Postgres.
    pub flushed_lsn: AtomicU64,
    /// The server's WAL end, as last heard.
    pub server_wal_lsn: AtomicU64,
    /// Time from the Postgres commit to the Neo4j commit, per change.
    pub latency: Mutex<Latency>,
    /// That time in its three stages, per change: commit to its batch being
    /// due (`batch.max_delay` or full), due to the writer taking it (busy
    /// with the batch before), taken to committed in Neo4j.
    pub stages: Mutex<[Latency; 3]>,
    /// When the batch being written first failed (Unix milliseconds), 0
    /// while writes go through.
    pub batch_failing_since_ms: AtomicU64,
    /// The batch being written has failed for longer than
    /// `neo4j.stuck_after`.
    pub batch_stuck: AtomicBool,
    /// Changes the batch filling now may take (`batch.max_changes`, more
    /// while walgraph is behind).
    pub batch_limit: AtomicU64,
    /// Rows copied by the online backfill of tables added to the mapping.
    pub backfill_rows: AtomicU64,
    /// Tables the online backfill has still to copy.
    pub backfill_tables_left: AtomicU64,
    /// Streamed transactions that rolled back (received in part, discarded).
    pub streamed_rollbacks: AtomicU64,
    /// Changes recorded as dead letters (`neo4j.on_error = "skip"`).
    pub dead_letters: AtomicU64,
    /// Commit time (protocol microseconds) of the last transaction
    /// committed to Neo4j, 0 before the first.
    pub last_commit_time: AtomicU64,
    /// Heartbeats that made the trip to the graph.
    pub heartbeats: AtomicU64,
    /// The last heartbeat's trip from the Postgres commit to the Neo4j
    /// commit, in microseconds (0 before the first).
    pub heartbeat_trip_us: AtomicU64,
    /// The slot as last read from `pg_replication_slots`.
    pub slot: Mutex<Option<SlotSample>>,
    /// The histograms and per-table counters.
    pub histograms: Histograms,
}

/// The slot as `run` last read it (every 10 s).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotSample {
    /// A walsender streams from it.
    pub active: bool,
    /// Bytes of WAL it makes the server keep (`restart_lsn` to now).
    pub retained_wal_bytes: u64,
    /// `wal_status`: `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// `safe_wal_size` in bytes, when `max_slot_wal_keep_size` is set.
    pub safe_wal_size: Option<i64>,
}

/// Labels of the per-table change counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TableOp {
    /// The schema-qualified table.
    pub table: String,
    /// `insert`, `update`, `delete` or `truncate`.
    pub op: String,
}

/// Labels of the `wal_status` gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct WalStatus {
    status: String,
}

/// The distributions, as Prometheus histograms (aggregatable, `rate()`-able).
#[derive(Debug)]
pub struct Histograms {
    /// Postgres commit to Neo4j commit, per change, in seconds.
    pub commit_to_graph: Histogram,
    /// How long writing one batch to Neo4j took (the successful attempt), in seconds.
    pub batch_write: Histogram,
    /// Row changes per batch.
    pub batch_changes: Histogram,
    /// Changes committed to Neo4j by table and operation.
    pub changes_by_table: Family<TableOp, Counter>,
}

impl Default for Histograms {
    fn default() -> Self {
        let seconds = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0, 300.0,
        ];
        Histograms {
            commit_to_graph: Histogram::new(seconds),
            batch_write: Histogram::new(seconds),
            batch_changes: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            changes_by_table: Family::default(),
        }
    }
}

/// A histogram of commit-to-graph latency: buckets 5 % wide from 100 µs to
/// 10 minutes, so a quantile read from it is at most 5 % above the truth.
#[derive(Debug, Clone)]
pub struct Latency {
    counts: Vec<u64>,
    total: u64,
    sum_micros: u128,
    max_micros: u64,
}

const LATENCY_FIRST_MICROS: f64 = 100.0;
const LATENCY_RATIO: f64 = 1.05;
const LATENCY_BUCKETS: usize = 322;

impl Default for Latency {
    fn default() -> Self {
        Latency {
            counts: vec![0; LATENCY_BUCKETS],
            total: 0,
            sum_micros: 0,
            max_micros: 0,
        }
    }
}

/// The quantiles the summaries give ("1" is the maximum).
pub const QUANTILES: [&str; 5] = ["0.5", "0.95", "0.99", "0.999", "1"];

impl Latency {
    /// The quantile `q` given as text, "1" being the maximum, in seconds.
    pub fn at(&self, q: &str) -> f64 {
        if q == "1" {
            self.max()
        } else {
            self.quantile(q.parse().unwrap_or(0.5))
        }
    }

    fn bucket(micros: u64) -> usize {
        if (micros as f64) <= LATENCY_FIRST_MICROS {
            return 0;
        }
        let i = ((micros as f64) / LATENCY_FIRST_MICROS).ln() / LATENCY_RATIO.ln();
        (i.ceil() as usize).min(LATENCY_BUCKETS - 1)
    }

    fn upper_micros(bucket: usize) -> f64 {
        LATENCY_FIRST_MICROS * LATENCY_RATIO.powi(i32::try_from(bucket).unwrap_or(i32::MAX))
    }

    /// Records `weight` changes that took `micros`.
    pub fn record(&mut self, micros: u64, weight: u64) {
        if weight == 0 {
            return;
        }
        self.counts[Self::bucket(micros)] += weight;
        self.total += weight;
        self.sum_micros += u128::from(micros) * u128::from(weight);
        self.max_micros = self.max_micros.max(micros);
    }

    /// Changes recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile (0..=1) in seconds: the upper bound of its bucket,
    /// never more than the maximum seen.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let want = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::upper_micros(i).min(self.max_micros as f64) / 1e6;
            }
        }
        self.max_micros as f64 / 1e6
    }

    /// What was recorded after `earlier` (an older copy of this one): the
    /// latencies of a window. Its maximum is the upper bound of its highest
    /// bucket.
    pub fn since(&self, earlier: &Latency) -> Latency {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .zip(earlier.counts.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let top = counts.iter().rposition(|c| *c > 0);
        Latency {
            total: counts.iter().sum(),
            sum_micros: self.sum_micros.saturating_sub(earlier.sum_micros),
            max_micros: top.map_or(0, |i| (Self::upper_micros(i) as u64).min(self.max_micros)),
            counts,
        }
    }

    /// The largest latency recorded, in seconds.
    pub fn max(&self) -> f64 {
        self.max_micros as f64 / 1e6
    }

    /// The sum of all latencies, in seconds.
    pub fn sum(&self) -> f64 {
        self.sum_micros as f64 / 1e6
    }
}

impl Metrics {
    /// Records how long the transactions of a committed batch took from
    /// their Postgres commit (protocol time, with their change counts) to now.
    pub fn record_commits(&self, commits: &[(i64, u64)]) {
        let now = crate::lsn::pg_now();
        if let Ok(mut l) = self.latency.lock() {
            for &(t, n) in commits {
                l.record(u64::try_from(now - t).unwrap_or(0), n);
            }
        }
        for &(t, n) in commits {
            let secs = (now - t).max(0) as f64 / 1e6;
            // Per change (a million-row transaction costs milliseconds).
            for _ in 0..n {
                self.histograms.commit_to_graph.observe(secs);
            }
            self.last_commit_time
                .fetch_max(u64::try_from(t).unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// Records where a committed batch's time went, per change of each of
    /// its transactions (`commits`): from its Postgres commit to the batch
    /// being ready (`ready`: when, and the protocol clock then), waiting for
    /// the writer (until `taken`), and the write with its retries (until now).
    pub fn record_stages(
        &self,
        commits: &[(i64, u64)],
        ready: Option<(std::time::Instant, i64)>,
        taken: std::time::Instant,
    ) {
        let Some((ready_at, ready_pg)) = ready else {
            return;
        };
        let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let wait = micros(taken.saturating_duration_since(ready_at));
        let write = micros(taken.elapsed());
        if let Ok(mut st) = self.stages.lock() {
            for &(t, n) in commits {
                st[0].record(u64::try_from(ready_pg - t).unwrap_or(0), n);
                st[1].record(wait, n);
                st[2].record(write, n);
            }
        }
    }

    /// Records a committed batch: its size, how long the write took, and
    /// its changes by table and operation.
    pub fn record_batch(
        &self,
        changes: usize,
        took: std::time::Duration,
        by_table: &[(std::sync::Arc<str>, &'static str, u64)],
    ) {
        self.histograms.batch_changes.observe(changes as f64);
        self.histograms.batch_write.observe(took.as_secs_f64());
        for (table, op, n) in by_table {
            self.histograms
                .changes_by_table
                .get_or_create(&TableOp {
                    table: table.to_string(),
                    op: (*op).to_string(),
                })
                .inc_by(*n);
        }
    }

    /// Records a heartbeat's trip (protocol microseconds).
    pub fn record_heartbeat(&self, trip_us: i64) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        self.heartbeat_trip_us
            .store(u64::try_from(trip_us).unwrap_or(0), Ordering::Relaxed);
    }

    /// Seconds the graph is behind: when the confirmed position is within a
    /// page of the server's WAL end, the last heartbeat's trip (0 without
    /// heartbeats); else the age of the last commit applied; `None` before
    /// the first.
    pub fn lag_seconds(&self) -> Option<f64> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let lag = Lsn::new(get(&self.server_wal_lsn)).bytes_since(Lsn::new(get(&self.flushed_lsn)));
        if lag <= 8192 && get(&self.flushed_lsn) > 0 {
            return Some(get(&self.heartbeat_trip_us) as f64 / 1e6);
        }
        let t = get(&self.last_commit_time);
        (t > 0).then(|| (crate::lsn::pg_now() - i64::try_from(t).unwrap_or(0)).max(0) as f64 / 1e6)
    }

    /// How long the batch being written has been failing, if it is.
    pub fn batch_failing_for(&self) -> Option<std::time::Duration> {
        let since = self.batch_failing_since_ms.load(Ordering::Relaxed);
        (since != 0).then(|| std::time::Duration::from_millis(unix_ms().saturating_sub(since)))
    }

    /// A copy of the commit-to-graph latencies recorded so far.
    pub fn latency_now(&self) -> Latency {
        self.latency.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// What the status page shows, as JSON: counters, positions, lag, the
    /// slot, the latency of `window` (recorded since an earlier copy) and
    /// the backfill.
    pub fn status_json(&self, window: &Latency) -> serde_json::Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let flushed = Lsn::new(get(&self.flushed_lsn));
        let server = Lsn::new(get(&self.server_wal_lsn));
        let slot = self.slot.lock().ok().and_then(|s| s.clone());
        let ms = |secs: f64| (secs * 1e6).round() / 1e3;
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "now_ms": unix_ms(),
            "ready": self.ready.load(Ordering::Relaxed),
            "batch_stuck": self.batch_stuck.load(Ordering::Relaxed),
            "batch_failing_seconds": self.batch_failing_for().map_or(0.0, |d| d.as_secs_f64()),
            "changes_applied": get(&self.changes),
            "transactions_applied": get(&self.transactions),
            "batches_committed": get(&self.batches),
            "batch_retries": get(&self.retries),
            "dead_letters": get(&self.dead_letters),
            "flushed_lsn": flushed.to_string(),
            "server_wal_lsn": server.to_string(),
            "lag_bytes": server.bytes_since(flushed),
            "lag_seconds": self.lag_seconds(),
            "heartbeats": get(&self.heartbeats),
            "heartbeat_trip_ms": ms(get(&self.heartbeat_trip_us) as f64 / 1e6),
            "latency_ms": {
                "changes": window.count(),
                "p50": ms(window.quantile(0.5)),
                "p99": ms(window.quantile(0.99)),
                "max": ms(window.max()),
            },
            "slot": slot.map(|s| serde_json::json!({
                "active": s.active,
                "retained_wal_bytes": s.retained_wal_bytes,
                "wal_status": s.wal_status,
                "safe_wal_size": s.safe_wal_size,
            })),
            "backfill": {
                "rows": get(&self.backfill_rows),
                "tables_left": get(&self.backfill_tables_left),
            },
        })
    }

    /// Whether `/ready` may answer 200: replication streams and no batch is stuck.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.batch_stuck.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let flushed = get(&self.flushed_lsn);
        let server = get(&self.server_wal_lsn);
        let lag = Lsn::new(server).bytes_since(Lsn::new(flushed));
        let mut r = Registry::with_prefix("walgraph");
        r.register(
            "build",
            "walgraph's version.",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let gauge = |r: &mut Registry, name: &str, help: &str, v: i64| {
            r.register(name, help, ConstGauge::new(v));
        };
        let fgauge = |r: &mut Registry, name: &str, help: &str, v: f64| {
            r.register(name, help, ConstGauge::new(v));
        };
        let counter = |r: &mut Registry, name: &str, help: &str, v: u64| {
            r.register(name, help, ConstCounter::new(v));
        };
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        gauge(
            &mut r,
            "ready",
            "1 while replication is streaming.",
            i64::from(self.ready.load(Ordering::Relaxed)),
        );
        counter(
            &mut r,
            "changes_applied",
            "Row changes committed to Neo4j.",
            get(&self.changes),
        );
        counter(
            &mut r,
            "transactions_applied",
            "Source transactions committed to Neo4j.",
            get(&self.transactions),
        );
        counter(
            &mut r,
            "batches_committed",
            "Neo4j transactions committed.",
            get(&self.batches),
        );
        counter(
            &mut r,
            "batch_retries",
            "Batch writes retried after a transient failure.",
            get(&self.retries),
        );
        counter(
            &mut r,
            "dead_letters",
            "Changes Neo4j rejected for good and recorded as dead letters.",
            get(&self.dead_letters),
        );
        counter(
            &mut r,
            "streamed_rollbacks",
            "Streamed transactions that rolled back after part of them had arrived.",
            get(&self.streamed_rollbacks),
        );
        gauge(
            &mut r,
            "flushed_lsn",
            "WAL position confirmed to Postgres.",
            i(flushed),
        );
        gauge(
            &mut r,
            "server_wal_lsn",
            "The server's WAL end, as last heard.",
            i(server),
        );
        gauge(
            &mut r,
            "lag_bytes",
            "Bytes of WAL between the server's end and the confirmed position.",
            i(lag),
        );
        fgauge(&mut r, "lag_seconds", "Seconds the graph is behind the database: 0 when caught up, else the age of the last commit applied (NaN before the first).", self.lag_seconds().unwrap_or(f64::NAN));
        counter(
            &mut r,
            "heartbeats",
            "Heartbeats (logical messages walgraph emits when nothing streams) that reached the graph.",
            get(&self.heartbeats),
        );
        fgauge(
            &mut r,
            "heartbeat_trip_seconds",
            "The last heartbeat's time from its Postgres commit to the Neo4j commit.",
            get(&self.heartbeat_trip_us) as f64 / 1e6,
        );
        counter(
            &mut r,
            "backfill_rows",
            "Rows of tables added to the mapping copied while streaming.",
            get(&self.backfill_rows),
        );
        gauge(
            &mut r,
            "backfill_tables_left",
            "Tables added to the mapping not yet copied.",
            i(get(&self.backfill_tables_left)),
        );
        gauge(
            &mut r,
            "batch_limit",
            "Changes the batch filling now may take: batch.max_changes, up to batch.max_changes_behind while walgraph is behind.",
            i(get(&self.batch_limit)),
        );
        gauge(
            &mut r,
            "batch_stuck",
            "1 while the batch being written has failed for longer than neo4j.stuck_after.",
            i64::from(self.batch_stuck.load(Ordering::Relaxed)),
        );
        fgauge(
            &mut r,
            "batch_failing_seconds",
            "How long the batch being written has been failing; 0 while writes go through.",
            self.batch_failing_for().map_or(0.0, |d| d.as_secs_f64()),
        );
        if let Some(slot) = self.slot.lock().ok().and_then(|s| s.clone()) {
            gauge(
                &mut r,
                "slot_active",
                "1 while a walsender streams from the slot.",
                i64::from(slot.active),
            );
            gauge(
                &mut r,
                "slot_retained_wal_bytes",
                "Bytes of WAL the slot makes the server keep.",
                i(slot.retained_wal_bytes),
            );
            if let Some(v) = slot.safe_wal_size {
                gauge(&mut r, "slot_safe_wal_size_bytes", "Bytes of WAL that may still be written before the slot is in danger of being lost (max_slot_wal_keep_size).", v);
            }
            let status: Family<WalStatus, prometheus_client::metrics::gauge::Gauge> =
                Family::default();
            for s in ["reserved", "extended", "unreserved", "lost"] {
                status
                    .get_or_create(&WalStatus {
                        status: s.to_string(),
                    })
                    .set(i64::from(slot.wal_status.as_deref() == Some(s)));
            }
            r.register(
                "slot_wal_status",
                "1 for the slot's wal_status (reserved, extended, unreserved, lost).",
                status,
            );
        }
        let h = &self.histograms;
        r.register(
            "commit_to_graph_seconds",
            "Time from the Postgres commit to the Neo4j commit, per change.",
            h.commit_to_graph.clone(),
        );
        r.register(
            "batch_write_seconds",
            "Time to write one batch to Neo4j (the attempt that committed).",
            h.batch_write.clone(),
        );
        r.register(
            "batch_changes",
            "Row changes per batch committed.",
            h.batch_changes.clone(),
        );
        r.register(
            "table_changes_applied",
            "Row changes committed to Neo4j, by table and operation.",
            h.changes_by_table.clone(),
        );
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &r);
        // The fine-grained quantiles since start, which `walgraph status`
        // and `walgraph bench` read (each bench phase is its own process).
        let latency = self.latency.lock().map(|l| l.clone()).unwrap_or_default();
        out.push_str(
            "# HELP walgraph_commit_to_graph_since_start_seconds Commit-to-graph latency quantiles since start (5 % buckets), for walgraph status and bench; alert on the histogram.\n\
             # TYPE walgraph_commit_to_graph_since_start_seconds summary\n",
        );
        for q in QUANTILES {
            out.push_str(&format!(
                "walgraph_commit_to_graph_since_start_seconds{{quantile=\"{q}\"}} {}\n",
                latency.at(q)
            ));
        }
        out.push_str(&format!(
            "walgraph_commit_to_graph_since_start_seconds_sum {}\nwalgraph_commit_to_graph_since_start_seconds_count {}\n",
            latency.sum(),
            latency.count()
        ));
        let stages = self.stages.lock().map(|s| s.clone()).unwrap_or_default();
        out.push_str(
            "# HELP walgraph_stage_since_start_seconds Where commit-to-graph time goes, per change, since start: ready (Postgres commit to the batch ready), wait (for the Neo4j writer), write (the Neo4j transaction, retries included).\n\
             # TYPE walgraph_stage_since_start_seconds summary\n",
        );
        for (name, l) in ["ready", "wait", "write"].iter().zip(&stages) {
            for q in QUANTILES {
                out.push_str(&format!(
                    "walgraph_stage_since_start_seconds{{stage=\"{name}\",quantile=\"{q}\"}} {}\n",
                    l.at(q)
                ));
            }
            out.push_str(&format!(
                "walgraph_stage_since_start_seconds_sum{{stage=\"{name}\"}} {}\nwalgraph_stage_since_start_seconds_count{{stage=\"{name}\"}} {}\n",
                l.sum(),
                l.count()
            ));
        }
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

/// Now, in milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_are_within_five_percent_above() {
        let mut l = Latency::default();
        for ms in 1..=1000u64 {
            l.record(ms * 1000, 1);
        }
        l.record(5_000_000, 10);
        let p50 = l.quantile(0.5);
        assert!((0.495..=0.5 * 1.05 + 1e-9).contains(&p50), "{p50}");
        let p99 = l.quantile(0.99);
        assert!((0.999..=1.0 * 1.05).contains(&p99), "{p99}");
        assert_eq!(l.max(), 5.0);
        assert_eq!(l.quantile(1.0), 5.0);
        assert_eq!(l.count(), 1010);
        assert!(Latency::default().quantile(0.99) == 0.0);
    }
}

#[cfg(test)]
mod render_tests {
    use super::*;

    #[test]
    fn the_metrics_are_openmetrics_with_histograms_and_labels() {
        let m = Metrics::default();
        m.changes.store(3, Ordering::Relaxed);
        m.record_commits(&[(crate::lsn::pg_now() - 20_000, 3)]);
        m.record_batch(
            3,
            std::time::Duration::from_millis(7),
            &[(std::sync::Arc::from("public.users"), "insert", 3)],
        );
        *m.slot.lock().unwrap() = Some(SlotSample {
            active: true,
            retained_wal_bytes: 4096,
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
        });
        let text = m.render();
        for line in [
            "# TYPE walgraph_changes_applied counter",
            "walgraph_changes_applied_total 3",
            "# TYPE walgraph_commit_to_graph_seconds histogram",
            "walgraph_commit_to_graph_seconds_bucket{le=\"0.025\"} 3",
            "walgraph_commit_to_graph_seconds_count 3",
            "walgraph_batch_write_seconds_count 1",
            "walgraph_batch_changes_bucket{le=\"4.0\"} 1",
            "walgraph_table_changes_applied_total{table=\"public.users\",op=\"insert\"} 3",
            "walgraph_slot_wal_status{status=\"reserved\"} 1",
            "walgraph_slot_wal_status{status=\"lost\"} 0",
            "walgraph_slot_retained_wal_bytes 4096",
            "walgraph_build_info{version=\"",
            "walgraph_commit_to_graph_since_start_seconds_count 3",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
