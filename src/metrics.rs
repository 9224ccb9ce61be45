//! What the pipeline reports while it runs: counters, positions and the
//! commit-to-graph latency, in the Prometheus text format. The stages write
//! here; [`crate::http`] only serves it.
//!
//! Invariant: every counter only grows; positions are stored as they are
//! confirmed, never ahead of what Neo4j committed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

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
    /// When the batch being written first failed (Unix milliseconds), 0
    /// while writes go through.
    pub batch_failing_since_ms: AtomicU64,
    /// The batch being written has failed for longer than
    /// `neo4j.stuck_after`.
    pub batch_stuck: AtomicBool,
    /// Rows copied by the online backfill of tables added to the mapping.
    pub backfill_rows: AtomicU64,
    /// Tables the online backfill has still to copy.
    pub backfill_tables_left: AtomicU64,
    /// Streamed transactions that rolled back (received in part, discarded).
    pub streamed_rollbacks: AtomicU64,
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

impl Latency {
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
    }

    /// How long the batch being written has been failing, if it is.
    pub fn batch_failing_for(&self) -> Option<std::time::Duration> {
        let since = self.batch_failing_since_ms.load(Ordering::Relaxed);
        (since != 0).then(|| std::time::Duration::from_millis(unix_ms().saturating_sub(since)))
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
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        };
        metric(
            "walgraph_ready",
            "gauge",
            "1 while replication is streaming.",
            u64::from(self.ready.load(Ordering::Relaxed)),
        );
        metric(
            "walgraph_changes_applied_total",
            "counter",
            "Row changes committed to Neo4j.",
            get(&self.changes),
        );
        metric(
            "walgraph_transactions_applied_total",
            "counter",
            "Source transactions committed to Neo4j.",
            get(&self.transactions),
        );
        metric(
            "walgraph_batches_committed_total",
            "counter",
            "Neo4j transactions committed.",
            get(&self.batches),
        );
        metric(
            "walgraph_batch_retries_total",
            "counter",
            "Batch writes retried after a transient failure.",
            get(&self.retries),
        );
        metric(
            "walgraph_flushed_lsn",
            "gauge",
            "WAL position confirmed to Postgres.",
            flushed,
        );
        metric(
            "walgraph_server_wal_lsn",
            "gauge",
            "The server's WAL end, as last heard.",
            server,
        );
        metric(
            "walgraph_lag_bytes",
            "gauge",
            "Bytes of WAL between the server's end and the confirmed position.",
            lag,
        );
        metric(
            "walgraph_backfill_rows_total",
            "counter",
            "Rows of tables added to the mapping copied while streaming.",
            get(&self.backfill_rows),
        );
        metric(
            "walgraph_backfill_tables_left",
            "gauge",
            "Tables added to the mapping not yet copied.",
            get(&self.backfill_tables_left),
        );
        metric(
            "walgraph_streamed_rollbacks_total",
            "counter",
            "Streamed transactions that rolled back after part of them had arrived.",
            get(&self.streamed_rollbacks),
        );
        metric(
            "walgraph_batch_stuck",
            "gauge",
            "1 while the batch being written has failed for longer than neo4j.stuck_after.",
            u64::from(self.batch_stuck.load(Ordering::Relaxed)),
        );
        out.push_str(&format!(
            "# HELP walgraph_batch_failing_seconds How long the batch being written has been failing; 0 while writes go through.\n\
             # TYPE walgraph_batch_failing_seconds gauge\nwalgraph_batch_failing_seconds {}\n",
            self.batch_failing_for().map_or(0.0, |d| d.as_secs_f64())
        ));
        let latency = self.latency.lock().map(|l| l.clone()).unwrap_or_default();
        out.push_str(
            "# HELP walgraph_commit_to_graph_seconds Time from the Postgres commit to the Neo4j commit, per change, since start.\n\
             # TYPE walgraph_commit_to_graph_seconds summary\n",
        );
        for q in ["0.5", "0.95", "0.99", "1"] {
            let v = if q == "1" {
                latency.max()
            } else {
                latency.quantile(q.parse().unwrap_or(0.5))
            };
            out.push_str(&format!(
                "walgraph_commit_to_graph_seconds{{quantile=\"{q}\"}} {v}\n"
            ));
        }
        out.push_str(&format!(
            "walgraph_commit_to_graph_seconds_sum {}\nwalgraph_commit_to_graph_seconds_count {}\n",
            latency.sum(),
            latency.count()
        ));
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
