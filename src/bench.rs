//! `walgraph bench`: measures walgraph against the limits of the machine it
//! runs on, in one run, on the same WAL.
//!
//! It creates its own schema (`walgraph_bench`), publication and one
//! replication slot per measurement *before* writing the workload, so every
//! measurement decodes the same WAL. Then:
//! - `pg_recvlogical` drains its slot to `/dev/null` (the decode-path limit);
//! - `walgraph run --null-sink` drains its slot (decode, map, batch, no Neo4j);
//! - `walgraph run` drains into Neo4j, once per swept `batch.max_changes`;
//! - `walgraph run` with `max_changes = 1` (one Neo4j transaction per change,
//!   what naive sync services do) runs for a fixed time;
//! - the same batches, built in advance, are written straight to Neo4j one
//!   after another (the sink-path limit);
//! - a steady workload at a fixed rate measures commit-to-graph latency, once
//!   per swept `batch.max_delay`;
//! - optionally, one huge transaction measures peak memory.
//!
//! walgraph runs as a child process so its CPU time and peak RSS are its own.
//! Everything the bench created is removed at the end.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::batch::{Batch, Batcher};
use crate::catalog::PgClient;
use crate::config::Config;
use crate::map::Mapper;
use crate::pipeline::compile_mapping;
use crate::sink::Sink;
use crate::source::{ConnInfo, ReplicationEvent, ReplicationStream, StartOptions};
use crate::transactions::{Assembler, TxnPart};

const SCHEMA: &str = "walgraph_bench";
const PUBLICATION: &str = "walgraph_bench";
const SLOT_PREFIX: &str = "walgraph_bench_";
const LABEL_PREFIX: &str = "WgBench";

/// What to measure, and on what workload.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Row changes in the drain workload.
    #[arg(long, default_value_t = 100_000)]
    pub changes: u64,
    /// Row changes per Postgres transaction.
    #[arg(long, default_value_t = 100)]
    pub changes_per_txn: u64,
    /// Bytes of text payload per row (row width).
    #[arg(long, default_value_t = 100)]
    pub width: usize,
    /// Percentages of inserts, updates and deletes, like `70:20:10`.
    #[arg(long, default_value = "70:20:10")]
    pub mix: String,
    /// Share of rows (0..1) with a foreign key to a group: each becomes a
    /// relationship.
    #[arg(long, default_value_t = 0.5)]
    pub rel_density: f64,
    /// Number of group rows (relationship targets).
    #[arg(long, default_value_t = 1000)]
    pub groups: u64,
    /// `batch.max_changes` values to drain with, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "500,1000,2000,5000,10000"
    )]
    pub batch_sizes: Vec<usize>,
    /// `batch.max_delay` values to run the steady workload with.
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration, default_value = "10ms,50ms,100ms,250ms")]
    pub delays: Vec<Duration>,
    /// Seconds of each steady-rate run.
    #[arg(long, default_value_t = 20)]
    pub steady_secs: u64,
    /// Changes per second of the steady runs (default: half the best
    /// end-to-end drain rate).
    #[arg(long)]
    pub steady_rate: Option<u64>,
    /// Seconds to run the one-transaction-per-change baseline.
    #[arg(long, default_value_t = 15)]
    pub per_change_secs: u64,
    /// Also load one transaction of this many inserted rows and measure
    /// walgraph's peak memory through it.
    #[arg(long)]
    pub big_txn: Option<u64>,
    /// Skip measurements, comma-separated: recvlogical, null, drain,
    /// per-change, prebuilt, steady.
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One measurement.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Measurement {
    /// What was measured.
    pub name: String,
    /// Settings that differ between measurements.
    pub settings: String,
    /// Row changes processed.
    pub changes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Row changes per second.
    pub changes_per_sec: f64,
    /// MiB of WAL per second (drains only).
    pub wal_mib_per_sec: Option<f64>,
    /// CPU seconds of the measured process per million changes.
    pub cpu_sec_per_million: Option<f64>,
    /// Peak resident memory of the measured process, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Commit-to-graph latency quantiles in milliseconds: p50, p95, p99, max.
    pub latency_ms: Option<[f64; 4]>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// The drain workload.
    pub workload: Workload,
    /// Every measurement, in order.
    pub measurements: Vec<Measurement>,
    /// The ratios the targets are stated in.
    pub ratios: Vec<(String, f64)>,
}

/// What the bench ran on.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// `SELECT version()`.
    pub postgres: String,
    /// Neo4j's version.
    pub neo4j: String,
    /// walgraph's version.
    pub walgraph: String,
}

/// The drain workload as written.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Workload {
    /// Row changes.
    pub changes: u64,
    /// Inserts, updates, deletes.
    pub inserts: u64,
    /// Updates.
    pub updates: u64,
    /// Deletes.
    pub deletes: u64,
    /// Transactions.
    pub transactions: u64,
    /// Bytes of payload per row.
    pub width: usize,
    /// Share of rows with a relationship.
    pub rel_density: f64,
    /// Bytes of WAL the workload wrote.
    pub wal_bytes: u64,
}

fn skipped(opts: &BenchOptions, what: &str) -> bool {
    opts.skip.iter().any(|s| s == what)
}

fn mapping_toml(tag: &str) -> String {
    format!(
        r#"
[[node]]
table = "{SCHEMA}.groups"
label = "{LABEL_PREFIX}{tag}Group"

[[node]]
table = "{SCHEMA}.items"
label = "{LABEL_PREFIX}{tag}Item"

[[relationship]]
table = "{SCHEMA}.items"
type = "{LABEL_PREFIX}{tag}_IN_GROUP"
from = {{ label = "{LABEL_PREFIX}{tag}Item", columns = ["id"] }}
to = {{ label = "{LABEL_PREFIX}{tag}Group", columns = ["grp"] }}
"#
    )
}

/// One measurement's configuration and the tag in its labels.
struct Phase {
    cfg: Config,
    tag: String,
}

/// The bench's connections and scratch directory.
struct Bench {
    cfg: Config,
    pg: PgClient,
    dir: PathBuf,
    opts: BenchOptions,
}

/// Runs the bench and prints its report.
pub async fn bench(cfg: &Config, opts: &BenchOptions) -> anyhow::Result<Report> {
    let mix = parse_mix(&opts.mix)?;
    if opts.changes_per_txn == 0 || opts.changes == 0 {
        bail!("--changes and --changes-per-txn must be at least 1");
    }
    if !(0.0..=1.0).contains(&opts.rel_density) {
        bail!("--rel-density must be between 0 and 1");
    }
    if opts.batch_sizes.is_empty() || opts.batch_sizes.contains(&0) {
        bail!("--batch-sizes needs at least one size, each at least 1");
    }
    let info = ConnInfo::parse(cfg.postgres.url.as_deref().unwrap_or(""))?;
    let pg = PgClient::connect(&info).await?;
    pg.check_wal_level().await?;
    let dir = std::env::temp_dir().join(format!("walgraph-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let b = Bench {
        cfg: cfg.clone(),
        pg,
        dir,
        opts: opts.clone(),
    };
    b.clean().await?;
    let result = b.measure(mix).await;
    let cleaned = b.clean().await;
    let _ = std::fs::remove_dir_all(&b.dir);
    let report = result?;
    cleaned?;
    Ok(report)
}

fn parse_mix(s: &str) -> anyhow::Result<[u64; 3]> {
    let parts: Vec<u64> = s
        .split(':')
        .map(|p| p.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow!("--mix must be three whole numbers like 70:20:10, not {s:?}"))?;
    match parts.as_slice() {
        [i, u, d] if i + u + d > 0 && *i > 0 => Ok([*i, *u, *d]),
        _ => bail!("--mix must be three numbers like 70:20:10 with some inserts, not {s:?}"),
    }
}

impl Bench {
    fn client(&self) -> &tokio_postgres::Client {
        self.pg.client()
    }

    /// Removes everything a bench (this one or an interrupted one) created.
    async fn clean(&self) -> anyhow::Result<()> {
        let c = self.client();
        let slots = c
            .query(
                "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE $1",
                &[&format!("{SLOT_PREFIX}%")],
            )
            .await?;
        for row in slots {
            let name: String = row.get(0);
            c.execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await
                .with_context(|| format!("cannot drop the bench slot {name}"))?;
        }
        c.batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {PUBLICATION}; DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;"
        ))
        .await?;
        let sink = Sink::connect(&self.cfg.neo4j, "walgraph_bench").await?;
        let g = sink.graph();
        let mut rows = g
            .execute(neo4rs::query(
                "CALL db.labels() YIELD label WHERE label STARTS WITH $p RETURN collect(label) AS l",
            ).param("p", LABEL_PREFIX))
            .await?;
        let labels: Vec<String> = match rows.next().await? {
            Some(r) => r.get("l").unwrap_or_default(),
            None => Vec::new(),
        };
        for label in labels {
            loop {
                let mut r = g
                    .execute(neo4rs::query(&format!(
                        "MATCH (n:`{label}`) WITH n LIMIT 20000 DETACH DELETE n RETURN count(*) AS n"
                    )))
                    .await?;
                let n: i64 = match r.next().await? {
                    Some(row) => row.get("n").unwrap_or(0),
                    None => 0,
                };
                if n == 0 {
                    break;
                }
            }
        }
        let mut rows = g
            .execute(neo4rs::query(
                "SHOW CONSTRAINTS YIELD name WHERE name STARTS WITH $p RETURN collect(name) AS c",
            ).param("p", format!("walgraph_{LABEL_PREFIX}")))
            .await?;
        let constraints: Vec<String> = match rows.next().await? {
            Some(r) => r.get("c").unwrap_or_default(),
            None => Vec::new(),
        };
        for name in constraints {
            g.run(neo4rs::query(&format!(
                "DROP CONSTRAINT `{name}` IF EXISTS"
            )))
            .await?;
        }
        g.run(
            neo4rs::query("MATCH (c:WalgraphCheckpoint) WHERE c.slot STARTS WITH $p DELETE c")
                .param("p", SLOT_PREFIX),
        )
        .await?;
        Ok(())
    }

    /// A config for one measurement: its slot, mapping tag and batch settings.
    fn phase_config(
        &self,
        slot: &str,
        tag: &str,
        max_changes: usize,
        max_delay: Duration,
    ) -> anyhow::Result<Phase> {
        let mapping = Config::parse(&mapping_toml(tag)).map_err(|e| anyhow!(e))?;
        let mut cfg = self.cfg.clone();
        cfg.postgres.slot = format!("{SLOT_PREFIX}{slot}");
        cfg.postgres.publication = PUBLICATION.into();
        cfg.nodes = mapping.nodes;
        cfg.relationships = mapping.relationships;
        cfg.batch.max_changes = max_changes;
        cfg.batch.max_delay = max_delay;
        Ok(Phase {
            cfg,
            tag: tag.into(),
        })
    }

    async fn create_slot(&self, slot: &str) -> anyhow::Result<()> {
        self.client()
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&format!("{SLOT_PREFIX}{slot}")],
            )
            .await
            .with_context(|| format!("cannot create the bench slot {slot}"))?;
        Ok(())
    }

    async fn ensure_constraints(&self, phase: &Phase) -> anyhow::Result<()> {
        let cfg = &phase.cfg;
        let mapping = compile_mapping(&self.pg, cfg).await?;
        let sink = Sink::connect(&cfg.neo4j, &cfg.postgres.slot).await?;
        sink.ensure_schema(&mapping).await?;
        Ok(())
    }

    async fn wal_lsn(&self) -> anyhow::Result<crate::lsn::Lsn> {
        let row = self
            .client()
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await?;
        Ok(row.get::<_, String>(0).parse()?)
    }

    async fn measure(&self, mix: [u64; 3]) -> anyhow::Result<Report> {
        let opts = &self.opts;
        let mut report = Report {
            machine: self.machine().await?,
            ..Report::default()
        };
        self.client()
            .batch_execute(&format!(
                "CREATE SCHEMA {SCHEMA};
                 CREATE TABLE {SCHEMA}.groups (id bigint PRIMARY KEY, name text NOT NULL);
                 CREATE TABLE {SCHEMA}.items (id bigint PRIMARY KEY, grp bigint REFERENCES {SCHEMA}.groups (id),
                                              val bigint NOT NULL, payload text NOT NULL);
                 INSERT INTO {SCHEMA}.groups SELECT g, 'group ' || g FROM generate_series(1, {}) g;
                 CREATE PUBLICATION {PUBLICATION} FOR TABLE {SCHEMA}.groups, {SCHEMA}.items;",
                opts.groups.max(1)
            ))
            .await?;

        // Slots first, so every measurement reads the same WAL.
        let mut drains: Vec<usize> = opts.batch_sizes.clone();
        drains.sort_unstable();
        drains.dedup();
        let mut slots: Vec<String> =
            vec!["recv".into(), "null".into(), "pre".into(), "naive".into()];
        slots.extend(drains.iter().map(|n| format!("drain_{n}")));
        for s in &slots {
            self.create_slot(s).await?;
        }
        let before = self.wal_lsn().await?;
        eprintln!(
            "bench: writing {} changes in transactions of {}",
            opts.changes, opts.changes_per_txn
        );
        let workload = self.write_workload(opts.changes, mix, None).await?;
        let target = self.wal_lsn().await?;
        report.workload = Workload {
            wal_bytes: target.bytes_since(before),
            width: opts.width,
            rel_density: opts.rel_density,
            ..workload
        };
        let total = report.workload.changes;
        let wal_mib = report.workload.wal_bytes as f64 / (1024.0 * 1024.0);

        if !skipped(opts, "recvlogical") {
            eprintln!("bench: pg_recvlogical");
            let m = self.recvlogical(target, total, wal_mib).await?;
            report.measurements.push(m);
        }
        if !skipped(opts, "null") {
            eprintln!("bench: walgraph with the null sink");
            let cfg = self.phase_config("null", "Null", 5000, Duration::from_millis(100))?;
            let mut m = self.drain_child(&cfg, true, total, None).await?;
            m.name = "walgraph, null sink".into();
            m.settings = "max_changes 5000".into();
            m.wal_mib_per_sec = Some(wal_mib / m.seconds);
            report.measurements.push(m);
        }
        if !skipped(opts, "drain") {
            for &n in &drains {
                eprintln!("bench: walgraph into Neo4j, max_changes {n}");
                let cfg = self.phase_config(
                    &format!("drain_{n}"),
                    &format!("D{n}"),
                    n,
                    Duration::from_millis(100),
                )?;
                self.ensure_constraints(&cfg).await?;
                let mut m = self.drain_child(&cfg, false, total, None).await?;
                m.name = "walgraph end to end".into();
                m.settings = format!("max_changes {n}");
                m.wal_mib_per_sec = Some(wal_mib / m.seconds);
                report.measurements.push(m);
            }
        }
        if !skipped(opts, "per-change") {
            eprintln!(
                "bench: one Neo4j transaction per change, {} s",
                opts.per_change_secs
            );
            let cfg = self.phase_config("naive", "Naive", 1, Duration::ZERO)?;
            self.ensure_constraints(&cfg).await?;
            let mut m = self
                .drain_child(
                    &cfg,
                    false,
                    total,
                    Some(Duration::from_secs(opts.per_change_secs)),
                )
                .await?;
            m.name = "one transaction per change".into();
            m.settings = "max_changes 1".into();
            report.measurements.push(m);
        }
        if !skipped(opts, "prebuilt") {
            eprintln!("bench: pre-built batches straight to Neo4j");
            let size = std::env::var("WALGRAPH_BENCH_PREBUILT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(5000);
            let cfg = self.phase_config("pre", "Pre", size, Duration::from_millis(100))?;
            self.ensure_constraints(&cfg).await?;
            let m = self.prebuilt(&cfg, total).await?;
            report.measurements.push(m);
        }
        if !skipped(opts, "steady") && !opts.delays.is_empty() {
            let best = report
                .measurements
                .iter()
                .filter(|m| m.name == "walgraph end to end")
                .map(|m| m.changes_per_sec)
                .fold(0.0, f64::max);
            let rate = match opts.steady_rate {
                Some(r) => r,
                None if best > 0.0 => (best / 2.0) as u64,
                None => 5_000,
            }
            .max(1);
            for (i, &delay) in opts.delays.iter().enumerate() {
                eprintln!(
                    "bench: steady {rate} changes/s for {} s, max_delay {delay:?}",
                    opts.steady_secs
                );
                let m = self.steady(i, rate, delay, mix).await?;
                report.measurements.push(m);
            }
        }
        if let Some(rows) = opts.big_txn {
            eprintln!("bench: one transaction of {rows} rows");
            let m = self.big_txn(rows).await?;
            report.measurements.push(m);
        }
        report.ratios = ratios(&report.measurements);
        Ok(report)
    }

    /// Writes `changes` row changes in transactions of `changes_per_txn`,
    /// paced to `rate` changes per second when given. Returns what it wrote.
    async fn write_workload(
        &self,
        changes: u64,
        mix: [u64; 3],
        pace: Option<u64>,
    ) -> anyhow::Result<Workload> {
        let opts = &self.opts;
        let c = self.client();
        let row = c
            .query_one(
                &format!("SELECT coalesce(max(id), 0) FROM {SCHEMA}.items"),
                &[],
            )
            .await?;
        let mut next_id: i64 = row.get::<_, i64>(0) + 1;
        let rows = c
            .query(&format!("SELECT id FROM {SCHEMA}.items"), &[])
            .await?;
        let mut live: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let mut rng = fastrand::Rng::with_seed(42 + next_id as u64);
        let mut w = Workload::default();
        let per_txn = opts.changes_per_txn;
        let groups = opts.groups.max(1) as i64;
        let density = (opts.rel_density * 1000.0).round() as i64;
        let payload = "x".repeat(opts.width);
        let started = Instant::now();
        let mut done = 0u64;
        let sum: u64 = mix.iter().sum();
        let mut txn_no = 0u64;
        while done < changes {
            let n = per_txn.min(changes - done);
            let mut ins = 0u64;
            let mut upd: Vec<i64> = Vec::new();
            let mut del: Vec<i64> = Vec::new();
            let mut picked: HashSet<i64> = HashSet::new();
            for _ in 0..n {
                let r = rng.u64(0..sum);
                let kind = if r < mix[0] {
                    0
                } else if r < mix[0] + mix[1] {
                    1
                } else {
                    2
                };
                if kind == 0 || live.len() <= picked.len() + 1 {
                    ins += 1;
                    continue;
                }
                // A row not yet touched in this transaction.
                let mut id;
                loop {
                    let i = rng.usize(0..live.len());
                    id = live[i];
                    if !picked.contains(&id) {
                        break;
                    }
                }
                picked.insert(id);
                if kind == 1 {
                    upd.push(id);
                } else {
                    del.push(id);
                }
            }
            let first = next_id;
            next_id += ins as i64;
            let grp = |id: &str| {
                format!("CASE WHEN ({id} * 7919) % 1000 < {density} THEN 1 + ({id} + {txn_no}) % {groups} END")
            };
            let mut sql = String::from("BEGIN;");
            if ins > 0 {
                sql.push_str(&format!(
                    "INSERT INTO {SCHEMA}.items SELECT g, {}, g, '{payload}' FROM generate_series({first}::bigint, {}) g;",
                    grp("g"),
                    next_id - 1
                ));
                live.extend(first..next_id);
            }
            if !upd.is_empty() {
                sql.push_str(&format!(
                    "UPDATE {SCHEMA}.items SET val = val + 1, grp = {} WHERE id = ANY('{{{}}}'::bigint[]);",
                    grp("id"),
                    join(&upd)
                ));
            }
            if !del.is_empty() {
                sql.push_str(&format!(
                    "DELETE FROM {SCHEMA}.items WHERE id = ANY('{{{}}}'::bigint[]);",
                    join(&del)
                ));
                let gone: HashSet<i64> = del.iter().copied().collect();
                live.retain(|id| !gone.contains(id));
            }
            sql.push_str("COMMIT;");
            c.batch_execute(&sql).await?;
            w.inserts += ins;
            w.updates += upd.len() as u64;
            w.deletes += del.len() as u64;
            w.transactions += 1;
            done += n;
            txn_no += 1;
            if let Some(rate) = pace {
                let due = started + Duration::from_secs_f64(done as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
        }
        w.changes = w.inserts + w.updates + w.deletes;
        Ok(w)
    }

    async fn machine(&self) -> anyhow::Result<Machine> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let postgres: String = self
            .client()
            .query_one("SELECT version()", &[])
            .await?
            .get(0);
        let sink = Sink::connect(&self.cfg.neo4j, "walgraph_bench").await?;
        let mut rows = sink
            .graph()
            .execute(neo4rs::query(
                "CALL dbms.components() YIELD name, versions, edition RETURN name + ' ' + versions[0] + ' ' + edition AS v",
            ))
            .await?;
        let neo4j = match rows.next().await? {
            Some(r) => r.get::<String>("v").unwrap_or_default(),
            None => String::new(),
        };
        Ok(Machine {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: (mem_kib / (1024.0 * 1024.0) * 10.0).round() / 10.0,
            postgres,
            neo4j,
            walgraph: env!("CARGO_PKG_VERSION").into(),
        })
    }

    /// `pg_recvlogical` from its slot to /dev/null, until `target`.
    async fn recvlogical(
        &self,
        target: crate::lsn::Lsn,
        total: u64,
        wal_mib: f64,
    ) -> anyhow::Result<Measurement> {
        let bin = find_pg_binary("pg_recvlogical")?;
        // The protocol options walgraph negotiates, so both read the same output.
        let version: i32 = self
            .client()
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await?
            .get(0);
        let proto = match version {
            v if v >= 160_000 => 4,
            v if v >= 150_000 => 3,
            v if v >= 140_000 => 2,
            _ => 1,
        };
        let mut protocol = vec![format!("proto_version={proto}")];
        if proto >= 2 && self.cfg.postgres.streaming {
            protocol.push("streaming=on".into());
        }
        let url = self.cfg.postgres.url.clone().unwrap_or_default();
        let started = Instant::now();
        let mut child = tokio::process::Command::new(&bin)
            .args([
                "--dbname",
                &url,
                "--slot",
                &format!("{SLOT_PREFIX}recv"),
                "--start",
                "--no-loop",
                "--endpos",
                &target.to_string(),
                "--file",
                "/dev/null",
                "--option",
                &format!("publication_names={PUBLICATION}"),
            ])
            .args(protocol.iter().flat_map(|o| ["--option", o.as_str()]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id().unwrap_or(0);
        let mut peak = 0.0f64;
        let mut cpu = 0.0f64;
        let status = loop {
            if let Some((c, r)) = proc_stats(pid) {
                cpu = cpu.max(c);
                peak = peak.max(r);
            }
            tokio::select! {
                s = child.wait() => break s?,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if started.elapsed() > Duration::from_secs(1800) {
                bail!("pg_recvlogical did not reach {target} in 30 minutes");
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err).await;
            }
            bail!("pg_recvlogical failed: {}", err.trim());
        }
        Ok(Measurement {
            name: "pg_recvlogical to /dev/null".into(),
            settings: protocol.join(", "),
            changes: total,
            seconds,
            changes_per_sec: total as f64 / seconds,
            wal_mib_per_sec: Some(wal_mib / seconds),
            cpu_sec_per_million: (cpu > 0.0).then(|| cpu / (total as f64 / 1e6)),
            peak_rss_mib: (peak > 0.0).then_some(peak),
            latency_ms: None,
        })
    }

    /// Runs `walgraph run` as a child with `cfg` until it has applied
    /// `total` changes (or for `limit`), sampling its CPU time and memory.
    async fn drain_child(
        &self,
        phase: &Phase,
        null_sink: bool,
        total: u64,
        limit: Option<Duration>,
    ) -> anyhow::Result<Measurement> {
        let (mut child, addr, log) = self.spawn_run(phase, null_sink).await?;
        let pid = child.id().unwrap_or(0);
        // The clock starts when replication does.
        wait_ready(&mut child, &addr, &log).await?;
        let started = Instant::now();
        let mut cpu_at_start = proc_stats(pid).map_or(0.0, |s| s.0);
        if cpu_at_start.is_nan() {
            cpu_at_start = 0.0;
        }
        let mut peak = 0.0f64;
        let mut cpu = 0.0f64;
        let mut applied;
        loop {
            if let Some((c, r)) = proc_stats(pid) {
                cpu = c;
                peak = peak.max(r);
            }
            let m = scrape(&addr).await.unwrap_or_default();
            applied = metric(&m, "walgraph_changes_applied_total").unwrap_or(0.0) as u64;
            if applied >= total || limit.is_some_and(|l| started.elapsed() >= l) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("walgraph run stopped ({status}): {}", tail(&log));
            }
            if started.elapsed() > Duration::from_secs(3600) {
                bail!("walgraph did not catch up within an hour: {applied} of {total} changes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        stop_child(&mut child).await;
        Ok(Measurement {
            changes: applied,
            seconds,
            changes_per_sec: applied as f64 / seconds,
            cpu_sec_per_million: Some((cpu - cpu_at_start) / (applied.max(1) as f64 / 1e6)),
            peak_rss_mib: Some(peak),
            ..Measurement::default()
        })
    }

    async fn spawn_run(
        &self,
        phase: &Phase,
        null_sink: bool,
    ) -> anyhow::Result<(tokio::process::Child, String, PathBuf)> {
        let cfg = &phase.cfg;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let path = self.dir.join(format!("{}.toml", cfg.postgres.slot));
        let log = self.dir.join(format!("{}.log", cfg.postgres.slot));
        std::fs::write(&path, child_toml(cfg, &phase.tag, &addr))?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("--config").arg(&path).arg("run");
        if null_sink {
            cmd.arg("--null-sink");
        }
        if let Some(url) = &cfg.postgres.url {
            cmd.env("WALGRAPH_PG_URL", url);
        }
        cmd.env("WALGRAPH_NEO4J_URI", &cfg.neo4j.uri)
            .env("WALGRAPH_NEO4J_USER", &cfg.neo4j.user);
        if let Some(p) = &cfg.neo4j.password {
            cmd.env("WALGRAPH_NEO4J_PASSWORD", p.expose());
        }
        let child = cmd
            .env("WALGRAPH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start walgraph run")?;
        Ok((child, addr, log))
    }

    /// Reads the slot into batches, then times writing them to Neo4j one
    /// after another.
    async fn prebuilt(&self, phase: &Phase, total: u64) -> anyhow::Result<Measurement> {
        let cfg = &phase.cfg;
        let mapping = std::sync::Arc::new(compile_mapping(&self.pg, cfg).await?);
        let info = ConnInfo::parse(cfg.postgres.url.as_deref().unwrap_or(""))?;
        let mut stream = ReplicationStream::connect(&info).await?;
        let proto_version = stream
            .negotiate_proto_version(cfg.postgres.proto_version)
            .await?;
        stream
            .start(&StartOptions {
                slot: cfg.postgres.slot.clone(),
                publications: vec![PUBLICATION.into()],
                start: crate::lsn::Lsn::ZERO,
                proto_version,
                messages: false,
                streaming: cfg.postgres.streaming,
                two_phase: false,
            })
            .await?;
        let mapper = Mapper::new(std::sync::Arc::clone(&mapping));
        let mut assembler = Assembler::with_spill(cfg.postgres.spill());
        let mut batcher = Batcher::new();
        let mut batches: Vec<Batch> = Vec::new();
        let mut seen = 0u64;
        let mut current = (crate::lsn::Lsn::ZERO, crate::lsn::Lsn::ZERO, 0u64);
        while seen < total {
            let ReplicationEvent::XLogData { data, .. } = stream.next_event().await? else {
                continue;
            };
            assembler.push(&data)?;
            while let Some(part) = assembler.next_part()? {
                match part {
                    TxnPart::Begin(h) => current = (h.commit_lsn, h.end_lsn, 0),
                    TxnPart::Change(c) => {
                        let mut ops = Vec::new();
                        mapper.map_change(&c, current.0, &mut ops)?;
                        current.2 += 1;
                        batcher.push_partial(ops, current.1, current.2);
                        seen += 1;
                    }
                    TxnPart::Commit(h) => batcher.end_transaction(h.end_lsn),
                    TxnPart::Message(_) => {}
                }
                if batcher.changes() >= cfg.batch.max_changes {
                    batches.push(batcher.take(&mapping));
                }
            }
        }
        if !batcher.is_empty() {
            batches.push(batcher.take(&mapping));
        }
        drop(stream);
        let sink = Sink::connect(&cfg.neo4j, &cfg.postgres.slot).await?;
        let started = Instant::now();
        for b in &batches {
            sink.apply(b, &[]).await?;
        }
        let seconds = started.elapsed().as_secs_f64();
        Ok(Measurement {
            name: "pre-built batches to Neo4j".into(),
            settings: format!(
                "{} batches, {:.1} statements each",
                batches.len(),
                batches.iter().map(|b| b.statements.len()).sum::<usize>() as f64
                    / batches.len().max(1) as f64
            ),
            changes: total,
            seconds,
            changes_per_sec: total as f64 / seconds,
            ..Measurement::default()
        })
    }

    /// A paced workload while walgraph runs; latency from its metrics.
    async fn steady(
        &self,
        i: usize,
        rate: u64,
        delay: Duration,
        mix: [u64; 3],
    ) -> anyhow::Result<Measurement> {
        let slot = format!("steady_{i}");
        self.create_slot(&slot).await?;
        let phase = self.phase_config(
            &slot,
            &format!("S{i}"),
            crate::config::BatchConfig::default().max_changes,
            delay,
        )?;
        self.ensure_constraints(&phase).await?;
        let (mut child, addr, log) = self.spawn_run(&phase, false).await?;
        let pid = child.id().unwrap_or(0);
        wait_ready(&mut child, &addr, &log).await?;
        let cpu0 = proc_stats(pid).map_or(0.0, |s| s.0);
        let changes = rate * self.opts.steady_secs;
        let started = Instant::now();
        let w = self.write_workload(changes, mix, Some(rate)).await?;
        let written_in = started.elapsed().as_secs_f64();
        let mut peak = 0.0f64;
        let mut cpu = 0.0;
        let m = loop {
            if let Some((c, r)) = proc_stats(pid) {
                cpu = c;
                peak = peak.max(r);
            }
            let m = scrape(&addr).await.unwrap_or_default();
            if metric(&m, "walgraph_changes_applied_total").unwrap_or(0.0) as u64 >= w.changes {
                break m;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("walgraph run stopped ({status}): {}", tail(&log));
            }
            if started.elapsed() > Duration::from_secs(self.opts.steady_secs * 10 + 60) {
                bail!("walgraph fell behind the steady workload and did not catch up");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        stop_child(&mut child).await;
        let q = |q: &str| {
            metric(
                &m,
                &format!("walgraph_commit_to_graph_seconds{{quantile=\"{q}\"}}"),
            )
            .unwrap_or(f64::NAN)
                * 1000.0
        };
        Ok(Measurement {
            name: "steady rate, commit to graph".into(),
            settings: format!("{rate}/s, max_delay {}", humantime::format_duration(delay)),
            changes: w.changes,
            seconds: written_in,
            changes_per_sec: w.changes as f64 / written_in,
            wal_mib_per_sec: None,
            cpu_sec_per_million: Some((cpu - cpu0) / (w.changes.max(1) as f64 / 1e6)),
            peak_rss_mib: Some(peak),
            latency_ms: Some([q("0.5"), q("0.95"), q("0.99"), q("1")]),
        })
    }

    /// One transaction of `rows` inserts, then walgraph through it.
    async fn big_txn(&self, rows: u64) -> anyhow::Result<Measurement> {
        self.create_slot("big").await?;
        let phase = self.phase_config(
            "big",
            "Big",
            crate::config::BatchConfig::default().max_changes,
            Duration::from_millis(100),
        )?;
        self.ensure_constraints(&phase).await?;
        let row = self
            .client()
            .query_one(
                &format!("SELECT coalesce(max(id), 0) FROM {SCHEMA}.items"),
                &[],
            )
            .await?;
        let first: i64 = row.get::<_, i64>(0) + 1;
        let payload = "x".repeat(self.opts.width);
        self.client()
            .batch_execute(&format!(
                "INSERT INTO {SCHEMA}.items SELECT g, NULL, g, '{payload}' FROM generate_series({first}::bigint, {}) g",
                first + rows as i64 - 1
            ))
            .await?;
        let mut m = self.drain_child(&phase, false, rows, None).await?;
        m.name = "one huge transaction".into();
        m.settings = format!("{rows} rows, max_changes {}", phase.cfg.batch.max_changes);
        Ok(m)
    }
}

fn join(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

/// The config file a child `walgraph run` reads (connections come from the
/// environment).
fn child_toml(cfg: &Config, tag: &str, addr: &str) -> String {
    format!(
        "[postgres]\nslot = \"{}\"\npublication = \"{}\"\n[batch]\nmax_changes = {}\nmax_delay = \"{}\"\n[http]\nlisten = \"{addr}\"\n{}",
        cfg.postgres.slot,
        cfg.postgres.publication,
        cfg.batch.max_changes,
        humantime::format_duration(cfg.batch.max_delay),
        mapping_toml(tag)
    )
}

async fn wait_ready(
    child: &mut tokio::process::Child,
    addr: &str,
    log: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Some(m) = scrape(addr).await {
            if metric(&m, "walgraph_ready") == Some(1.0) {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("walgraph run stopped ({status}): {}", tail(log));
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("walgraph run was not streaming after 60 s: {}", tail(log));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().rev().take(3).collect::<Vec<_>>().join(" / ")
}

/// CPU seconds (user + system) and peak RSS in MiB of a live process.
fn proc_stats(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state(0) … utime(11) stime(12), in USER_HZ (100/s).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(((utime + stime) / 100.0, hwm_kib / 1024.0))
}

/// GET /metrics from a child.
async fn scrape(addr: &str) -> Option<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn find_pg_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut found: Vec<PathBuf> = dirs
            .filter_map(Result::ok)
            .map(|d| d.path().join("bin").join(name))
            .filter(|p| p.exists())
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Ok(p);
        }
    }
    let in_path = std::process::Command::new(name).arg("--version").output();
    if in_path.is_ok() {
        return Ok(PathBuf::from(name));
    }
    bail!("{name} was not found (install the PostgreSQL client programs, or skip it with --skip recvlogical)")
}

fn ratios(ms: &[Measurement]) -> Vec<(String, f64)> {
    let rate = |name: &str| {
        ms.iter()
            .filter(|m| m.name == name)
            .map(|m| m.changes_per_sec)
            .fold(f64::NAN, f64::max)
    };
    let e2e = rate("walgraph end to end");
    let mut out = Vec::new();
    let mut add = |what: &str, v: f64| {
        if v.is_finite() {
            out.push((what.to_string(), (v * 100.0).round() / 100.0));
        }
    };
    add(
        "null sink / pg_recvlogical",
        rate("walgraph, null sink") / rate("pg_recvlogical to /dev/null"),
    );
    add(
        "end to end (best) / one transaction per change",
        e2e / rate("one transaction per change"),
    );
    add(
        "end to end (best) / pre-built batches",
        e2e / rate("pre-built batches to Neo4j"),
    );
    out
}

/// The report as a table for people.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let m = &r.machine;
    out.push_str(&format!(
        "machine: {} ({} CPUs, {} GiB); {}; {}; walgraph {}\n",
        m.cpu, m.cpus, m.memory_gib, m.postgres, m.neo4j, m.walgraph
    ));
    let w = &r.workload;
    out.push_str(&format!(
        "workload: {} changes ({} inserts, {} updates, {} deletes) in {} transactions, {} B payload, {:.0}% with a relationship, {:.1} MiB of WAL\n\n",
        w.changes, w.inserts, w.updates, w.deletes, w.transactions, w.width, w.rel_density * 100.0,
        w.wal_bytes as f64 / 1048576.0
    ));
    out.push_str(&format!(
        "{:<30} {:<26} {:>9} {:>8} {:>11} {:>8} {:>9} {:>8} {:>29}\n",
        "measurement",
        "settings",
        "changes",
        "seconds",
        "changes/s",
        "WAL MiB/s",
        "CPU s/M",
        "RSS MiB",
        "latency ms p50/p95/p99/max"
    ));
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    for x in &r.measurements {
        out.push_str(&format!(
            "{:<30} {:<26} {:>9} {:>8.2} {:>11.0} {:>9} {:>9} {:>8} {:>29}\n",
            x.name,
            x.settings,
            x.changes,
            x.seconds,
            x.changes_per_sec,
            opt(x.wal_mib_per_sec, 1),
            opt(x.cpu_sec_per_million, 1),
            opt(x.peak_rss_mib, 0),
            x.latency_ms.map_or("-".to_string(), |l| format!(
                "{:.0}/{:.0}/{:.0}/{:.0}",
                l[0], l[1], l[2], l[3]
            )),
        ));
    }
    if !r.ratios.is_empty() {
        out.push('\n');
        for (what, v) in &r.ratios {
            out.push_str(&format!("{what}: {v:.2}x\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_and_metrics_parse() {
        assert_eq!(parse_mix("70:20:10").unwrap(), [70, 20, 10]);
        assert!(parse_mix("0:50:50").is_err());
        assert!(parse_mix("a:b").is_err());
        let text = "# TYPE x gauge\nwalgraph_ready 1\nwalgraph_commit_to_graph_seconds{quantile=\"0.99\"} 0.25\n";
        assert_eq!(metric(text, "walgraph_ready"), Some(1.0));
        assert_eq!(
            metric(text, "walgraph_commit_to_graph_seconds{quantile=\"0.99\"}"),
            Some(0.25)
        );
        assert_eq!(metric(text, "nope"), None);
    }
}
