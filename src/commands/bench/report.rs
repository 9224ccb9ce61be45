//! What the bench measured: the report, as JSON for scripts and a table
//! for people.
//!
//! Invariant: every figure shown is one that was measured in this run.

use serde::Serialize;

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
    /// Its p99.9, milliseconds.
    pub latency_p999_ms: Option<f64>,
    /// Where that time went, per stage (ready, wait, write): p50, p95,
    /// p99, p99.9, max in milliseconds.
    pub stages_ms: Vec<(String, [f64; 5])>,
    /// Neo4j's garbage collections during the measurement.
    pub neo4j_gc: Option<Gc>,
}

/// Neo4j's garbage collections over a measurement, from its JVM's
/// management beans.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Gc {
    /// Collections.
    pub collections: u64,
    /// Milliseconds spent collecting.
    pub total_ms: f64,
    /// The collector names and their milliseconds.
    pub by_collector: Vec<(String, u64, f64)>,
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

pub(super) fn ratios(ms: &[Measurement]) -> Vec<(String, f64)> {
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
    let at_defaults = ms
        .iter()
        .filter(|m| m.name == "walgraph end to end" && m.settings.starts_with(super::DEFAULTS))
        .map(|m| m.changes_per_sec)
        .fold(f64::NAN, f64::max);
    add(
        "end to end at the defaults / pre-built batches",
        at_defaults / rate("pre-built batches to Neo4j"),
    );
    add(
        "snapshot / its rows as pre-built batches",
        rate("snapshot") / rate("snapshot rows as pre-built batches"),
    );
    add(
        "messages end to end / row changes end to end (best)",
        rate("messages end to end") / e2e,
    );
    add(
        "messages, null sink / row changes, null sink",
        rate("messages, null sink") / rate("walgraph, null sink"),
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
    let breakdown: Vec<&Measurement> = r
        .measurements
        .iter()
        .filter(|m| !m.stages_ms.is_empty() || m.neo4j_gc.is_some())
        .collect();
    if !breakdown.is_empty() {
        out.push_str(
            "\nwhere the commit-to-graph time goes, ms p50/p95/p99/p99.9/max (per change):\n",
        );
        for m in breakdown {
            out.push_str(&format!(
                "  {} ({}): total p99.9 {}\n",
                m.name,
                m.settings,
                m.latency_p999_ms.map_or("-".into(), |v| format!("{v:.0}"))
            ));
            for (stage, q) in &m.stages_ms {
                out.push_str(&format!(
                    "    {stage:<6} {:.1}/{:.1}/{:.1}/{:.1}/{:.1}\n",
                    q[0], q[1], q[2], q[3], q[4]
                ));
            }
            if let Some(gc) = &m.neo4j_gc {
                let names: Vec<String> = gc
                    .by_collector
                    .iter()
                    .map(|(n, c, ms)| format!("{n} {c} × {ms:.0} ms"))
                    .collect();
                out.push_str(&format!(
                    "    Neo4j GC: {} collections, {:.0} ms ({})\n",
                    gc.collections,
                    gc.total_ms,
                    names.join(", ")
                ));
            }
        }
    }
    if !r.ratios.is_empty() {
        out.push('\n');
        for (what, v) in &r.ratios {
            out.push_str(&format!("{what}: {v:.2}x\n"));
        }
    }
    out
}
