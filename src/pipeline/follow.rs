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
//! - the columns each table is followed with are recorded in Neo4j,
//!   `(:WalgraphTable {slot, table, columns})`, written once the work is done,
//!   so a change made while walgraph was stopped, or one whose work a crash
//!   cut short, is found again at the next start (the catalog against the
//!   record).
//!
//! Invariants: a property is removed only once every change taken before
//! the new relation is committed (the removal runs when all the stream has
//! taken is in Neo4j), and later changes no longer carry it; a change the
//! stream sends again after a restart with the old columns is seen as a
//! change of columns too, and followed the same way, so the graph ends
//! with the columns the table ends with.

use std::collections::HashMap;
use std::sync::Arc;

use super::preflight::Prepared;
use super::RunError;
use crate::batch::Statement;
use crate::decode::{Column, Relation};
use crate::mapping::{Mapping, NodeTarget};
use crate::sink::snapshot_state::{read_tables, table_statement};
use crate::sink::Sink;
use crate::source::catalog::PgClient;

/// Nodes changed per removal step.
pub(super) const REMOVE_STEP: usize = 10_000;

/// Work the graph owes a table whose columns changed.
#[derive(Debug, Clone)]
pub(super) struct Followup {
    /// The table.
    pub table: String,
    /// Its label.
    pub label: Arc<str>,
    /// Properties to take off every node of the label.
    pub remove: Vec<Arc<str>>,
    /// Every row must be copied again.
    pub recopy: bool,
    /// The record to write once done.
    pub record: Statement,
}

/// The columns (`name:type`) of each followed table as last seen.
pub(super) struct ColumnWatch {
    mapping: Arc<Mapping>,
    slot: String,
    known: HashMap<String, Vec<String>>,
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

/// What moving `node` from columns `old` to `new` owes the graph.
fn diff(node: &NodeTarget, old: &[String], new: &[String]) -> (Vec<Arc<str>>, bool) {
    let (old_cols, new_cols) = (columns_of(old), columns_of(new));
    let before = node.props_for(&old_cols);
    let after = node.props_for(&new_cols);
    let remove: Vec<Arc<str>> = before
        .iter()
        .filter(|p| !after.iter().any(|q| q.property == p.property))
        .map(|p| Arc::clone(&p.property))
        .collect();
    let type_of =
        |cols: &[Column], name: &str| cols.iter().find(|c| c.name == name).map(|c| c.type_oid);
    let recopy = after
        .iter()
        .any(|p| match before.iter().find(|q| q.property == p.property) {
            None => true,
            Some(q) => {
                q.column != p.column
                    || type_of(&old_cols, &q.column) != type_of(&new_cols, &p.column)
            }
        });
    (remove, recopy)
}

impl ColumnWatch {
    /// The watch, and what the graph owes for changes the catalog shows
    /// against the record (made while walgraph was stopped, or cut short).
    /// Tables without a record are recorded as they are now.
    pub(super) async fn start(
        p: &Prepared,
        pg: &PgClient,
        sink: &Sink,
        slot: &str,
    ) -> Result<(ColumnWatch, Vec<Followup>), RunError> {
        let followed: Vec<String> = p
            .mapping
            .tables
            .iter()
            .filter(|(_, t)| t.node.as_ref().is_some_and(|n| n.follow.is_some()))
            .map(|(name, _)| name.clone())
            .collect();
        let catalog = pg.catalog(&followed).await?;
        let recorded = read_tables(sink, slot).await.map_err(|e| {
            RunError::NotReady(format!("cannot read the followed columns from Neo4j: {e}"))
        })?;
        let mut watch = ColumnWatch {
            mapping: Arc::clone(&p.mapping),
            slot: slot.to_string(),
            known: HashMap::new(),
            seen: HashMap::new(),
            pending: None,
        };
        let mut owed = Vec::new();
        let mut names = followed;
        names.sort();
        for table in names {
            let Some(info) = catalog.get(&table) else {
                continue;
            };
            let now = catalog_columns(info);
            match recorded.get(&table) {
                None => {
                    sink.run_statement(&table_statement(slot, &table, &now))
                        .await?
                }
                Some(was) if *was != now => {
                    if let Some(f) = watch.followup(&table, was, &now) {
                        tracing::info!(%table, "its columns changed while walgraph was stopped");
                        owed.push(f);
                    }
                }
                Some(_) => {}
            }
            watch.known.insert(table, now);
        }
        Ok((watch, owed))
    }

    fn followup(&self, table: &str, old: &[String], new: &[String]) -> Option<Followup> {
        let node = self.mapping.tables.get(table)?.node.as_ref()?;
        node.follow.as_ref()?;
        let (remove, recopy) = diff(node, old, new);
        Some(Followup {
            table: table.to_string(),
            label: Arc::clone(&node.label),
            remove,
            recopy,
            record: table_statement(&self.slot, table, new),
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
        let catalog = pg.catalog(&tables).await?;
        let row = pg
            .client()
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
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
            if let Some(f) = self.followup(&table, known, &now) {
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
        let f = self.followup(&table, known, &now);
        tracing::info!(%table, columns = ?now, "the table's columns changed; the graph follows");
        self.known.insert(table, now);
        f
    }
}
