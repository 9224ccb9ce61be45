//! Columns follow the table: for a `[[node]]` without an `include` list,
//! the properties are the columns the table has now. The mapper already
//! maps each change by the columns its relation has; this watches those
//! relations for what the rest of the graph needs when they change:
//!
//! - a column gone (dropped, or renamed away) takes its property off every
//!   node of the label, in steps between the stream's batches;
//! - a column added, renamed or given another type brings every row's
//!   value: the table is copied again by the online [backfill](super::backfill);
//! - a table nothing changes after its DDL is caught in the catalog, read
//!   every few seconds with the WAL position after it; that change is
//!   followed once the stream has taken every transaction committed before
//!   that position;
//! - the columns of each table and what the mapping makes of them (its
//!   [shape](super::remap)) are recorded in Neo4j,
//!   `(:WalgraphTable {slot, table, columns, shape})`, written once the work
//!   is done, so a change of columns or of the mapping made while walgraph
//!   was stopped, or one whose work a crash cut short, is found again at the
//!   next start (the shapes now against the records) and followed the same
//!   way.
//!
//! Invariants: a property is removed only once every change taken before
//! the new relation is committed (the removal runs when all the stream has
//! taken is in Neo4j), and later changes no longer carry it; a change the
//! stream sends again after a restart with the old columns is seen as a
//! change of columns too, and followed the same way, so the graph ends
//! with the columns the table ends with.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use super::preflight::Prepared;
use super::remap::{self, Shape, Step};
use super::RunError;
use crate::batch::Statement;
use crate::decode::{Column, Relation};
use crate::mapping::Mapping;
use crate::sink::snapshot_state::{forget_table_statement, read_tables, table_statement};
use crate::sink::Sink;
use crate::source::catalog::PgClient;

/// Graph items changed per step of removal or deletion.
pub(super) const REMOVE_STEP: usize = 10_000;

/// Work the graph owes for a change of columns or of the mapping.
#[derive(Debug, Clone)]
pub(super) struct Followup {
    /// What changed, for the log.
    pub what: String,
    /// Removals and deletions, each done in steps, in order.
    pub steps: VecDeque<Step>,
    /// Tables to copy again, after the steps.
    pub recopy: Vec<String>,
    /// The records to write once done.
    pub records: Vec<Statement>,
    /// The records wait for every table being copied, not only those of
    /// `recopy` (the work of a mapping change).
    pub after_all: bool,
}

/// The columns (`name:type`) of each followed table as last seen, and the
/// shape of every mapped table.
pub(super) struct ColumnWatch {
    mapping: Arc<Mapping>,
    /// The publication streamed (which generated columns the stream carries).
    publication: String,
    slot: String,
    known: HashMap<String, Vec<String>>,
    shapes: BTreeMap<String, Shape>,
    /// The last relation seen per table OID, to skip unchanged ones cheaply.
    seen: HashMap<u32, Arc<Relation>>,
    /// Columns the catalog shows that the stream has not (a table nothing
    /// changes since its DDL), with the WAL position read after them: they
    /// are followed once the stream has taken everything before it.
    pending: Option<(HashMap<String, Vec<String>>, crate::lsn::Lsn)>,
}

fn describe(columns: &[Column]) -> Vec<String> {
    columns
        .iter()
        .map(|c| format!("{}:{}", c.name, c.type_oid))
        .collect()
}

/// A table's columns as the catalog has them, in the form `describe` gives.
fn catalog_columns(info: &crate::source::catalog::TableInfo) -> Vec<String> {
    info.columns
        .iter()
        .zip(&info.types)
        .map(|(c, t)| format!("{c}:{t}"))
        .collect()
}

fn columns_of(described: &[String]) -> Vec<Column> {
    described
        .iter()
        .map(|d| {
            let (name, oid) = d.rsplit_once(':').unwrap_or((d.as_str(), "0"));
            Column {
                name: name.to_string(),
                type_oid: oid.parse().unwrap_or(0),
                is_key: false,
            }
        })
        .collect()
}

/// Runs `step` over the whole graph, a step at a time (before anything
/// streams).
async fn run_step(sink: &Sink, step: &Step) -> Result<u64, RunError> {
    let what = step.describe();
    let mut total = 0;
    loop {
        let n = sink.count_step(&what, &step.cypher(), REMOVE_STEP).await?;
        total += n;
        if n < REMOVE_STEP as u64 {
            return Ok(total);
        }
        tracing::info!(done = total, "{what}");
    }
}

impl ColumnWatch {
    /// The watch, and what the graph owes for the difference between the
    /// records and the tables and mapping now (changes made while walgraph
    /// was stopped, or cut short). A label renamed is relabelled here,
    /// before anything streams; tables without a record are recorded as
    /// they are now.
    pub(super) async fn start(
        p: &Prepared,
        pg: &PgClient,
        sink: &Sink,
        slot: &str,
    ) -> Result<(ColumnWatch, Vec<Followup>), RunError> {
        let tables = p.mapping.table_names();
        let catalog = pg.catalog(&tables, &p.publication).await?;
        let recorded = read_tables(sink, slot).await.map_err(|e| {
            RunError::NotReady(format!("cannot read the followed tables from Neo4j: {e}"))
        })?;
        let mut watch = ColumnWatch {
            mapping: Arc::clone(&p.mapping),
            publication: p.publication.clone(),
            slot: slot.to_string(),
            known: HashMap::new(),
            shapes: BTreeMap::new(),
            seen: HashMap::new(),
            pending: None,
        };
        let mut columns = HashMap::new();
        for table in tables {
            let (Some(info), Some(target)) = (catalog.get(&table), p.mapping.tables.get(&table))
            else {
                continue;
            };
            let now = catalog_columns(info);
            watch
                .shapes
                .insert(table.clone(), Shape::of(target, &columns_of(&now)));
            if target.node.as_ref().is_some_and(|n| n.follow.is_some()) {
                watch.known.insert(table.clone(), now.clone());
            }
            columns.insert(table, now);
        }
        // Records without a shape (written before walgraph kept one) are
        // what the mapping now makes of the columns they name.
        let old: BTreeMap<String, Shape> = recorded
            .into_iter()
            .filter_map(|(table, r)| {
                let shape = match &r.shape {
                    Some(text) => Shape::from_json(text)?,
                    None => Shape::of(p.mapping.tables.get(&table)?, &columns_of(&r.columns)),
                };
                Some((table, shape))
            })
            .collect();
        let plan = remap::plan(&old, &watch.shapes);
        let mut records: Vec<Statement> = plan
            .record
            .iter()
            .filter_map(|t| Some(watch.record(t, columns.get(t)?)))
            .collect();
        records.extend(plan.forget.iter().map(|t| forget_table_statement(slot, t)));
        if plan.is_work_free() {
            for r in &records {
                sink.run_statement(r).await?;
            }
            return Ok((watch, Vec::new()));
        }
        let what = format!(
            "the mapping or the columns of {} changed since walgraph last ran",
            plan.record
                .iter()
                .chain(&plan.forget)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        tracing::info!(
            steps = ?plan.relabel.iter().chain(&plan.steps).map(Step::describe).collect::<Vec<_>>(),
            recopy = ?plan.recopy,
            "{what}; the graph follows"
        );
        for step in &plan.relabel {
            let n = run_step(sink, step).await?;
            tracing::info!(nodes = n, "{} done", step.describe());
        }
        let owed = Followup {
            what,
            steps: plan.steps.into(),
            recopy: plan.recopy,
            records,
            after_all: true,
        };
        Ok((watch, vec![owed]))
    }

    /// The record of `table` with `columns`, as it is now.
    fn record(&self, table: &str, columns: &[String]) -> Statement {
        let shape = self
            .shapes
            .get(table)
            .map(Shape::to_json)
            .unwrap_or_default();
        table_statement(&self.slot, table, columns, &shape)
    }

    /// What the graph owes for `table`'s columns changing to `new`: the
    /// difference of its shape, with every other table as it is.
    fn followup(&mut self, table: &str, new: &[String]) -> Option<Followup> {
        let target = self.mapping.tables.get(table)?;
        target.node.as_ref()?.follow.as_ref()?;
        let shape = Shape::of(target, &columns_of(new));
        let mut after = self.shapes.clone();
        after.insert(table.to_string(), shape);
        let plan = remap::plan(&self.shapes, &after);
        self.shapes = after;
        Some(Followup {
            what: format!("the columns of {table} changed"),
            steps: plan.relabel.into_iter().chain(plan.steps).collect(),
            recopy: plan.recopy,
            records: vec![self.record(table, new)],
            after_all: false,
        })
    }

    /// Reads the followed tables' columns from the catalog, then the WAL
    /// position: a DDL the catalog shows committed before it. Columns that
    /// differ from the last seen are kept until [`ColumnWatch::catalog_due`].
    pub(super) async fn poll_catalog(&mut self, pg: &PgClient) -> Result<(), RunError> {
        let tables: Vec<String> = self.known.keys().cloned().collect();
        if tables.is_empty() {
            return Ok(());
        }
        let catalog = pg.catalog(&tables, &self.publication).await?;
        let row = pg
            .client()
            .query_one(
                &format!("SELECT ({})::text", crate::source::standby::WAL_POSITION),
                &[],
            )
            .await
            .map_err(|e| RunError::NotReady(format!("cannot read the WAL position: {e}")))?;
        let at: crate::lsn::Lsn = row
            .try_get::<_, String>(0)
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(crate::lsn::Lsn::ZERO);
        let mut views = HashMap::new();
        for (table, info) in &catalog {
            let now = catalog_columns(info);
            if self.known.get(table).is_some_and(|k| *k != now) {
                views.insert(table.clone(), now);
            }
        }
        if !views.is_empty() && self.pending.is_none() {
            self.pending = Some((views, at));
        }
        Ok(())
    }

    /// What the graph owes for columns the catalog showed, once the stream
    /// has taken every transaction that committed before they were read
    /// (`taken` is how far that is): a change still on its way with the old
    /// columns can then no longer arrive after the work.
    pub(super) fn catalog_due(&mut self, taken: crate::lsn::Lsn) -> Vec<Followup> {
        let due = self.pending.as_ref().is_some_and(|(_, at)| taken >= *at);
        if !due {
            return Vec::new();
        }
        let Some((views, _)) = self.pending.take() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut tables: Vec<_> = views.into_iter().collect();
        tables.sort();
        for (table, now) in tables {
            let Some(known) = self.known.get(&table) else {
                continue;
            };
            if *known == now {
                continue;
            }
            if let Some(f) = self.followup(&table, &now) {
                tracing::info!(%table, columns = ?now, "the table's columns changed (catalog); the graph follows");
                out.push(f);
            }
            self.known.insert(table, now);
        }
        out
    }

    /// Looks at the relation of a change taken from the stream: when a
    /// followed table's columns differ from the last seen, what the graph
    /// owes for it.
    pub(super) fn observe(&mut self, rel: &Arc<Relation>) -> Option<Followup> {
        if self.seen.get(&rel.oid).is_some_and(|r| Arc::ptr_eq(r, rel)) {
            return None;
        }
        self.seen.insert(rel.oid, Arc::clone(rel));
        let table = self.mapping.oids.get(&rel.oid)?.clone();
        let known = self.known.get(&table)?;
        let now = describe(&rel.columns);
        if *known == now {
            return None;
        }
        let f = self.followup(&table, &now);
        tracing::info!(%table, columns = ?now, "the table's columns changed; the graph follows");
        self.known.insert(table, now);
        f
    }
}
