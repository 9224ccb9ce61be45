//! Reconcile: compares the rows of the mapped node tables with their nodes in
//! the graph, and optionally repairs the graph from Postgres.
//!
//! Invariants:
//! - Postgres is read in primary-key order, in chunks, inside one
//!   repeatable-read transaction (one consistent view for the whole pass);
//!   the graph is looked up by the chunk's keys, so the two databases'
//!   different orderings never matter;
//! - a row is *missing* when its node is absent, *changed* when a mapped
//!   property or its foreign-key relationship differs (properties only the
//!   graph has are not compared); a node is *extra* when its row is gone
//!   (placeholder nodes, which carry only a key and no `_lsn`, are not);
//! - a repair writes what the mapping makes of the row, stamped with the
//!   consistent point of the exported snapshot the rows are read under
//!   (no transaction below it is missing from them), so the `_lsn` guard lets any
//!   later streamed change win over it.

use std::sync::Arc;

use anyhow::Context;
use neo4rs::query;
use serde::Serialize;

use crate::batch::Batcher;
use crate::commands::progress::Progress;
use crate::config::Config;
use crate::lsn::Lsn;
use crate::mapping::map::Mapper;
use crate::mapping::{Mapping, RelKind, RelTarget};
use crate::pipeline;
use crate::pipeline::copy::{begin_exported_snapshot, describe_table, read_chunk, Table};
use crate::sink::Sink;
use crate::source::catalog::PgClient;
use crate::source::sql::quote_qualified;
use edges::reconcile_edges;
use nodes::reconcile_nodes;

mod edges;
mod graph;
mod nodes;
mod pager;

/// How to reconcile.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// Only this table (schema-qualified).
    pub table: Option<String>,
    /// Fix the graph.
    pub repair: bool,
    /// Rows per chunk.
    pub chunk_rows: usize,
    /// Draw a progress bar (on a terminal); otherwise progress goes to the log.
    pub progress_bar: bool,
}

/// What one table (node table, or a join table's relationship type) looked
/// like.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableReport {
    /// The table.
    pub table: String,
    /// `node` (a node table: its nodes and foreign-key relationships) or
    /// `relationship` (a join table: its edges).
    pub kind: String,
    /// Its label, or its relationship type.
    pub label: String,
    /// Rows read from Postgres.
    pub rows: u64,
    /// Nodes of the label (placeholders included), or relationships of the
    /// type, read from the graph.
    pub in_graph: u64,
    /// Rows without a node or edge (up to 20 keys shown).
    pub missing: Vec<String>,
    /// How many rows lack a node or edge.
    pub missing_count: u64,
    /// Nodes or edges whose row is gone.
    pub extra: Vec<String>,
    /// How many.
    pub extra_count: u64,
    /// Rows whose node or edge differs.
    pub changed: Vec<String>,
    /// How many.
    pub changed_count: u64,
    /// Whether the differences were repaired.
    pub repaired: bool,
}

impl TableReport {
    /// An empty report for `t`, of `kind` (`node` or `relationship`).
    fn new(t: &Table, kind: &str, label: &str) -> Self {
        TableReport {
            table: t.name.clone(),
            kind: kind.into(),
            label: label.to_string(),
            ..TableReport::default()
        }
    }

    /// Any difference.
    pub fn differs(&self) -> bool {
        self.missing_count + self.extra_count + self.changed_count > 0
    }
}

const SHOWN: usize = 20;

fn note(list: &mut Vec<String>, count: &mut u64, key: String) {
    *count += 1;
    if list.len() < SHOWN {
        list.push(key);
    }
}

/// What every table's pass shares.
struct Ctx<'a> {
    sink: &'a Sink,
    c: &'a tokio_postgres::Client,
    mapping: &'a Mapping,
    mapper: &'a Mapper,
    /// The consistent point of the snapshot the rows are read under;
    /// repairs carry it as `_lsn`.
    stamp: Lsn,
    opts: &'a ReconcileOptions,
}

impl Ctx<'_> {
    /// The next chunk of `t`'s rows after `after` (which it moves on),
    /// counted in the report and the progress.
    async fn next_chunk(
        &self,
        t: &Table,
        after: &mut Option<Vec<String>>,
        report: &mut TableReport,
        progress: &mut Progress,
    ) -> anyhow::Result<Vec<(crate::transactions::Change, Vec<String>)>> {
        let rows = read_chunk(self.c, t, after.as_deref(), self.opts.chunk_rows).await?;
        report.rows += rows.len() as u64;
        progress.add(rows.len() as u64, &t.name, 0);
        if let Some(last) = rows.last() {
            *after = Some(last.1.clone());
        }
        Ok(rows)
    }

    /// Writes the repairs collected so far (with `--repair`).
    async fn flush(&self, repairs: &mut Batcher) -> anyhow::Result<()> {
        if self.opts.repair && repairs.changes() > 0 {
            self.sink
                .apply_with(&repairs.take(self.mapping), query("RETURN 1"))
                .await?;
        }
        Ok(())
    }
}

/// Compares (and with `repair`, fixes) every mapped node table and join
/// table.
pub async fn reconcile(cfg: &Config, opts: &ReconcileOptions) -> anyhow::Result<Vec<TableReport>> {
    let prepared = pipeline::prepare_beside_run(cfg).await?;
    let sink = prepared.sink.as_ref().context("no Neo4j connection")?;
    let mapping = Arc::clone(&prepared.mapping);
    let mut tables: Vec<String> = mapping
        .tables
        .iter()
        .filter(|(_, t)| t.node.is_some() || t.rels.iter().any(is_edge_rel))
        .map(|(n, _)| n.clone())
        .collect();
    tables.sort();
    if let Some(only) = &opts.table {
        if !tables.contains(only) {
            anyhow::bail!(
                "{only} is not a mapped table; the mapped tables are {}",
                tables.join(", ")
            );
        }
        tables.retain(|t| t == only);
    }
    let pg = PgClient::connect(&prepared.info).await?;
    let c = pg.client();
    // The rows and the stamp come from one exported snapshot: the stamp is
    // the snapshot's consistent point, so every transaction below it is in
    // the rows and none above. (pg_current_wal_lsn() before the read could
    // pass a commit already streamed to the graph but not yet visible —
    // one waiting on a synchronous standby — and the repair would write the
    // older row with a newer stamp.)
    let temp_slot = format!(
        "walgraph_reconcile_{}_{}",
        std::process::id(),
        fastrand::u32(..)
    );
    let stamp: Lsn = begin_exported_snapshot(&prepared.info, c, &temp_slot).await?;
    let catalog = pg.catalog(&tables, &prepared.publication).await?;
    let mapper = Mapper::new(Arc::clone(&mapping));
    let cx = Ctx {
        sink,
        c,
        mapping: &mapping,
        mapper: &mapper,
        stamp,
        opts,
    };
    let mut described = Vec::new();
    let mut total = 0u64;
    for name in &tables {
        let (pk, leave_out) = catalog
            .get(name)
            .map(|t| (t.primary_key.clone(), t.generated.clone()))
            .unwrap_or_default();
        let t = describe_table(c, name, &pk, &leave_out).await?;
        let count: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM {}", quote_qualified(name)),
                &[],
            )
            .await?
            .try_get(0)?;
        let passes = mapping.tables[name].node.iter().count()
            + mapping.tables[name]
                .rels
                .iter()
                .filter(|r| is_edge_rel(r))
                .count();
        total += u64::try_from(count).unwrap_or(0) * passes as u64;
        described.push(t);
    }
    let mut progress = Progress::new("reconcile", total, 0, opts.progress_bar);
    let mut reports = Vec::new();
    for t in &described {
        progress.table(&t.name);
        let target = &mapping.tables[&t.name];
        if let Some(node) = &target.node {
            reports.push(reconcile_nodes(&cx, t, node, &mut progress).await?);
        }
        for rel in target.rels.iter().filter(|r| is_edge_rel(r)) {
            reports.push(reconcile_edges(&cx, t, rel, &mut progress).await?);
        }
    }
    progress.finish();
    let _ = c.batch_execute("COMMIT").await;
    // A repair of every table read them past the slot's confirmed position:
    // a graph that was behind it (restored, wiped) is not any more.
    if let (true, None, Some(at)) = (opts.repair, &opts.table, prepared.confirmed_flush) {
        sink.advance_checkpoint_to(at).await?;
    }
    Ok(reports)
}

fn is_edge_rel(r: &RelTarget) -> bool {
    matches!(r.kind, RelKind::Edge { .. })
}

/// The reports as text for people.
pub fn render(reports: &[TableReport]) -> String {
    let mut out = String::new();
    for r in reports {
        out.push_str(&format!(
            "{} → {}: {} rows, {} in the graph; {} missing, {} extra, {} changed{}\n",
            r.table,
            if r.kind == "node" {
                format!(":{}", r.label)
            } else {
                format!("[:{}]", r.label)
            },
            r.rows,
            r.in_graph,
            r.missing_count,
            r.extra_count,
            r.changed_count,
            if r.repaired { " — repaired" } else { "" }
        ));
        for (what, keys, n) in [
            ("missing", &r.missing, r.missing_count),
            ("extra", &r.extra, r.extra_count),
            ("changed", &r.changed, r.changed_count),
        ] {
            if !keys.is_empty() {
                let more = if n as usize > keys.len() {
                    format!(" and {} more", n as usize - keys.len())
                } else {
                    String::new()
                };
                out.push_str(&format!("  {what}: ({}){more}\n", keys.join("), (")));
            }
        }
    }
    out
}

/// `walgraph reconcile`: prints the reports (text or JSON); fails when
/// something differs and `--repair` was not given.
pub async fn command(cfg: &Config, opts: &ReconcileOptions, json: bool) -> anyhow::Result<()> {
    let reports = reconcile(cfg, opts).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", render(&reports));
    }
    let differ = reports.iter().filter(|r| r.differs()).count();
    if differ > 0 && !opts.repair {
        anyhow::bail!(
            "{differ} table(s) differ from Postgres; run `walgraph reconcile --repair` to fix the graph"
        );
    }
    Ok(())
}
