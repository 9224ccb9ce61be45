//! `walgraph bench`: measures walgraph against the limits of the machine it
//! runs on, in one run, on the same WAL.
//!
//! It creates its own schema (`walgraph_bench`), publication and one
//! replication slot per measurement *before* writing the workload, so every
//! measurement decodes the same WAL. Then:
//! - `pg_recvlogical` drains its slot to `/dev/null` (the decode-path limit);
//! - `walgraph run --null-sink` drains its slot (decode, map, batch, no Neo4j);
//! - `walgraph run` drains into Neo4j, once per swept `batch.max_changes`
//!   (batches of that fixed size), and once at the default `[batch]`
//!   settings (batches that grow while walgraph is behind);
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

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::config::Config;
use crate::pipeline::compile_mapping;
use crate::sink::Sink;
use crate::source::catalog::PgClient;
use crate::source::ConnInfo;

mod child;
mod phases;
mod report;
mod workload;

#[cfg(test)]
use child::metric;
use report::ratios;
pub use report::{render, Machine, Measurement, Report, Workload};

const SCHEMA: &str = "walgraph_bench";
const PUBLICATION: &str = "walgraph_bench";
const SLOT_PREFIX: &str = "walgraph_bench_";
const LABEL_PREFIX: &str = "WgBench";
/// How a measurement at the default `[batch]` settings says so.
const DEFAULTS: &str = "defaults";

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
    /// Also measure the online backfill: a table of this many rows added to
    /// the mapping is copied by `run` while the steady workload streams
    /// (its rows/s, and the stream's latency meanwhile).
    #[arg(long)]
    pub backfill: Option<u64>,
    /// Also measure `snapshot` of a table of this many rows against the
    /// same rows written straight to Neo4j as pre-built batches.
    #[arg(long)]
    pub snapshot: Option<u64>,
    /// Rows per chunk of the `--snapshot` measurement (as `snapshot
    /// --chunk-rows`).
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_chunk_rows: usize,
    /// Also measure logical messages as graph writes: this many
    /// `pg_logical_emit_message` calls (one merge_node each, in transactions
    /// of `--changes-per-txn`), drained with the null sink and into Neo4j.
    #[arg(long)]
    pub messages: Option<u64>,
    /// Skip measurements, comma-separated: recvlogical, null, drain,
    /// per-change, prebuilt, steady.
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
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
    /// Mapping sections beyond the bench's own (TOML).
    extra_mapping: String,
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
    if std::env::var_os("WALGRAPH_BENCH_CHILD_LOG").is_some() {
        // Diagnosis: the children's logs stay.
        eprintln!("bench: the logs of walgraph run are in {}", b.dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&b.dir);
    }
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
            let name: String = row.try_get(0)?;
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
            // Relationships first, then nodes, in slices: a group node with
            // a hundred thousand relationships in one transaction would
            // exhaust Neo4j's heap.
            for q in [
                format!("MATCH (:`{label}`)-[r]-() WITH DISTINCT r LIMIT 20000 DELETE r RETURN count(*) AS n"),
                format!("MATCH (n:`{label}`) WITH n LIMIT 20000 DETACH DELETE n RETURN count(*) AS n"),
            ] {
                loop {
                    let mut r = g.execute(neo4rs::query(&q)).await?;
                    let n: i64 = match r.next().await? {
                        Some(row) => row.get("n").unwrap_or(0),
                        None => 0,
                    };
                    if n == 0 {
                        break;
                    }
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
            neo4rs::query(
                "MATCH (c) WHERE (c:WalgraphCheckpoint OR c:WalgraphSnapshot OR c:WalgraphTable) \
                 AND c.slot STARTS WITH $p DETACH DELETE c",
            )
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
            extra_mapping: String::new(),
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
        Ok(row.try_get::<_, String>(0)?.parse()?)
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
        slots.push("drain_defaults".into());
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
            m.settings = DEFAULTS.into();
            m.wal_mib_per_sec = Some(wal_mib / m.seconds);
            report.measurements.push(m);
        }
        if !skipped(opts, "drain") {
            for &n in &drains {
                eprintln!("bench: walgraph into Neo4j, max_changes {n}");
                let mut cfg = self.phase_config(
                    &format!("drain_{n}"),
                    &format!("D{n}"),
                    n,
                    Duration::from_millis(100),
                )?;
                // A measurement of one batch size: the batches keep it.
                cfg.cfg.batch.max_changes_behind = Some(n);
                self.ensure_constraints(&cfg).await?;
                let mut m = self.drain_child(&cfg, false, total, None).await?;
                m.name = "walgraph end to end".into();
                m.settings = format!("max_changes {n}");
                m.wal_mib_per_sec = Some(wal_mib / m.seconds);
                report.measurements.push(m);
            }
            let d = crate::config::BatchConfig::default();
            eprintln!(
                "bench: walgraph into Neo4j, the default batch settings (max_changes {}, up to {} behind)",
                d.max_changes,
                d.ceiling()
            );
            let mut cfg =
                self.phase_config("drain_defaults", "DDef", d.max_changes, d.max_delay)?;
            cfg.cfg.batch = d.clone();
            self.ensure_constraints(&cfg).await?;
            let mut m = self.drain_child(&cfg, false, total, None).await?;
            m.name = "walgraph end to end".into();
            m.settings = format!(
                "{DEFAULTS}: max_changes {}, up to {} behind",
                d.max_changes,
                d.ceiling()
            );
            m.wal_mib_per_sec = Some(wal_mib / m.seconds);
            report.measurements.push(m);
        }
        if !skipped(opts, "per-change") {
            eprintln!(
                "bench: one Neo4j transaction per change, {} s",
                opts.per_change_secs
            );
            let mut cfg = self.phase_config("naive", "Naive", 1, Duration::ZERO)?;
            cfg.cfg.batch.max_changes_behind = Some(1);
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
        if let Some(n) = opts.messages.filter(|n| *n > 0) {
            for m in self.messages(n).await? {
                report.measurements.push(m);
            }
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
        if let Some(rows) = opts.backfill {
            let rate = opts.steady_rate.unwrap_or(1000).max(1);
            eprintln!("bench: online backfill of {rows} rows beside {rate} changes/s");
            let m = self.backfill(rows, rate, mix).await?;
            report.measurements.push(m);
        }
        if let Some(rows) = opts.snapshot {
            eprintln!("bench: snapshot of {rows} rows, and the same rows as pre-built batches");
            let ms = self.snapshot(rows).await?;
            report.measurements.extend(ms);
        }
        if let Some(rows) = opts.big_txn {
            eprintln!("bench: one transaction of {rows} rows");
            let m = self.big_txn(rows).await?;
            report.measurements.push(m);
        }
        report.ratios = ratios(&report.measurements);
        Ok(report)
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
            .try_get(0)?;
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
}

/// The config file a child `walgraph run` reads (connections come from the
/// environment).
fn child_toml(cfg: &Config, tag: &str, addr: &str, extra_mapping: &str) -> String {
    format!(
        "[postgres]\nslot = \"{}\"\npublication = \"{}\"\n[batch]\nmax_changes = {}\nmax_changes_behind = {}\ncommit_target = \"{}\"\nmax_delay = \"{}\"\n[http]\nlisten = \"{addr}\"\n{}\n{extra_mapping}",
        cfg.postgres.slot,
        cfg.postgres.publication,
        cfg.batch.max_changes,
        cfg.batch.ceiling(),
        humantime::format_duration(cfg.batch.commit_target),
        humantime::format_duration(cfg.batch.max_delay),
        mapping_toml(tag)
    )
}

/// `walgraph bench`: measures, prints the report, and writes it as JSON
/// when asked.
pub async fn command(cfg: &Config, opts: &BenchOptions) -> anyhow::Result<()> {
    let report = bench(cfg, opts).await?;
    print!("{}", render(&report));
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .map_err(|e| anyhow::anyhow!("cannot write the report to {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_and_metrics_parse() {
        assert_eq!(parse_mix("70:20:10").unwrap(), [70, 20, 10]);
        assert!(parse_mix("0:50:50").is_err());
        assert!(parse_mix("a:b").is_err());
        let text = "# TYPE x gauge\nwalgraph_ready 1\nwalgraph_commit_to_graph_since_start_seconds{quantile=\"0.99\"} 0.25\n";
        assert_eq!(metric(text, "walgraph_ready"), Some(1.0));
        assert_eq!(
            metric(
                text,
                "walgraph_commit_to_graph_since_start_seconds{quantile=\"0.99\"}"
            ),
            Some(0.25)
        );
        assert_eq!(metric(text, "nope"), None);
    }
}
