//! Online backfill: the rows of tables that joined the mapping after the
//! snapshot are copied into the graph while `run` streams, with no separate
//! `snapshot` and nothing stopped.
//!
//! Invariants:
//! - a chunk is read, like a snapshot chunk, under a snapshot exported by a
//!   temporary slot, so it holds exactly the transactions that committed
//!   before that slot's consistent point `C`, and everything it writes is
//!   stamped `_lsn = C`;
//! - the stream loop reads a chunk only when everything it has taken from
//!   the stream is committed in Neo4j (no batch in flight, the batcher
//!   empty, no transaction taken in part), and takes nothing while it reads:
//!   every change already in the graph committed before `C` and the chunk
//!   is newer than all of them; every change taken later is written after
//!   the chunk, and the `_lsn` guard skips those the chunk already holds
//!   (commit below `C`) while applying the others — the order a snapshot
//!   and the stream behind it have;
//! - the chunk's progress (table, last key, rows) is written in the same
//!   Neo4j transaction as its rows, in the snapshot's record
//!   `(:WalgraphSnapshot {slot})`, and the checkpoint it writes is the one
//!   already stored: after a crash the copy resumes after the last chunk
//!   Neo4j committed, and the stream from its checkpoint, which is again a
//!   snapshot with the stream behind it.
//!
//! A table is backfilled when the snapshot of the slot is complete and the
//! table is not among the tables it copied; a table taken out of the
//! mapping leaves that list, so adding it back copies it again.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use neo4rs::{BoltList, BoltType};

use super::copy::{begin_exported_snapshot, describe_table, read_chunk, table_order, Table};
use super::preflight::Prepared;
use super::RunError;
use crate::batch::{cypher, Batch, Batcher, Statement};
use crate::lsn::{Checkpoint, Lsn};
use crate::mapping::map::Mapper;
use crate::metrics::Metrics;
use crate::sink::snapshot_state::{progress_query, read_state, SnapshotState};
use crate::source::catalog::PgClient;

/// The tables left to copy and where the copy stands.
pub(super) struct Backfill {
    reader: Option<PgClient>,
    /// The publication streamed (which generated columns to copy).
    publication: String,
    info: crate::source::ConnInfo,
    slot: String,
    temp_slot: String,
    /// Tables to copy, in order; the first is described in `current`.
    tables: VecDeque<String>,
    current: Option<Table>,
    state: SnapshotState,
    /// Statements to write with the last chunk of a table (the columns
    /// it is now followed with).
    on_done: std::collections::HashMap<String, Vec<Statement>>,
    /// Statements to write with the chunk that leaves no table to copy
    /// (the records of a mapping change).
    after_all: Vec<Statement>,
    chunk_rows: usize,
    mapper: Mapper,
    metrics: Arc<Metrics>,
}

/// Why a backfill step failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot copy {table} into the graph while streaming: {message}")]
pub struct BackfillError {
    /// The table.
    pub table: String,
    /// What went wrong.
    pub message: String,
    /// Retrying later may succeed (a connection broke).
    pub transient: bool,
}

impl BackfillError {
    fn new(table: &str, e: &anyhow::Error) -> Self {
        BackfillError {
            table: table.to_string(),
            message: crate::error_sentence(e),
            transient: is_transient(e),
        }
    }
}

/// Whether an error from reading Postgres may go away on retry: a broken
/// connection, or a SQLSTATE that says so.
fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if let Some(pg) = c.downcast_ref::<tokio_postgres::Error>() {
            return match pg.as_db_error() {
                Some(d) => crate::source::sqlstate_is_transient(d.code().code()),
                None => true,
            };
        }
        if let Some(s) = c.downcast_ref::<crate::source::SourceError>() {
            return s.is_transient();
        }
        c.downcast_ref::<crate::source::catalog::CatalogError>()
            .is_some_and(|c| c.is_transient())
    })
}

impl Backfill {
    /// The backfill `run` owes: the mapped tables the completed snapshot of
    /// the slot did not copy (tables it copied that are no longer mapped are
    /// forgotten first). `None` without a sink. Without any snapshot record
    /// nothing is owed, but a table can still be copied again later
    /// ([`Backfill::recopy`]).
    pub(super) async fn start(
        p: &Prepared,
        slot: &str,
        chunk_rows: usize,
        metrics: &Arc<Metrics>,
    ) -> Result<Option<Backfill>, RunError> {
        let Some(sink) = &p.sink else {
            return Ok(None);
        };
        let order = table_order(&p.mapping);
        let read = read_state(sink, slot).await.map_err(|e| {
            RunError::NotReady(format!("cannot read the snapshot state from Neo4j: {e}"))
        })?;
        let (mut state, todo) = match read {
            Some(mut state) if state.done => {
                let before = state.tables_done.len();
                state.tables_done.retain(|t| order.contains(t));
                if state.tables_done.len() != before {
                    tracing::info!("tables taken out of the mapping are forgotten by the snapshot record; adding one back copies it again");
                    sink.apply_with(
                        &Batcher::new().take(&p.mapping),
                        progress_query(slot, &state, Lsn::ZERO),
                    )
                    .await?;
                }
                let todo: Vec<String> = order
                    .iter()
                    .filter(|t| !state.tables_done.contains(t))
                    .cloned()
                    .collect();
                (state, todo)
            }
            // No snapshot taken: nothing is owed; should a table need
            // copying again, the record made then says every other mapped
            // table is as `run` found it.
            _ => (
                SnapshotState {
                    done: true,
                    tables_done: order.clone(),
                    ..SnapshotState::default()
                },
                Vec::new(),
            ),
        };
        if state.table.as_ref().is_some_and(|t| !todo.contains(t)) {
            state.table = None;
            state.last_key = None;
        }
        metrics
            .backfill_tables_left
            .store(todo.len() as u64, Ordering::Relaxed);
        if !todo.is_empty() {
            tracing::info!(tables = ?todo, "copying tables added to the mapping while streaming");
        }
        Ok(Some(Backfill {
            reader: None,
            info: p.info.clone(),
            publication: p.publication.clone(),
            slot: slot.to_string(),
            temp_slot: format!(
                "walgraph_backfill_{}_{}",
                std::process::id(),
                fastrand::u32(..)
            ),
            tables: todo.into(),
            current: None,
            state,
            on_done: std::collections::HashMap::new(),
            after_all: Vec::new(),
            chunk_rows: chunk_rows.max(1),
            mapper: Mapper::new(Arc::clone(&p.mapping)),
            metrics: Arc::clone(metrics),
        }))
    }

    /// Every table is copied.
    pub(super) fn is_done(&self) -> bool {
        self.tables.is_empty()
    }

    /// Copies `tables` again from their first keys, in order, after any
    /// table already waiting (one under way starts over), and writes
    /// `records` with the last chunk of the last of them — or, with
    /// `after_all`, with the chunk that leaves no table to copy.
    pub(super) fn recopy(&mut self, tables: &[String], records: Vec<Statement>, after_all: bool) {
        for table in tables {
            self.state.tables_done.retain(|t| t != table);
            if self.tables.front().is_some_and(|t| t == table) && self.current.is_some() {
                // Under way: start it over, from the table as it is now.
                self.current = None;
                self.state.table = None;
                self.state.last_key = None;
            } else {
                if self.tables.front().is_some_and(|t| t == table) {
                    self.state.table = None;
                    self.state.last_key = None;
                }
                self.tables.retain(|t| t != table);
                self.tables.push_back(table.clone());
            }
            tracing::info!(%table, "copying the table again while streaming");
        }
        match tables.last() {
            Some(last) if !after_all => self
                .on_done
                .entry(last.clone())
                .or_default()
                .extend(records),
            _ => self.after_all.extend(records),
        }
        self.metrics
            .backfill_tables_left
            .store(self.tables.len() as u64, Ordering::Relaxed);
    }

    /// Reads the next chunk and makes the batch that writes it with its
    /// progress, keeping `stored` as the checkpoint. Call only when all the
    /// stream has taken is committed in Neo4j (see the module's invariants).
    pub(super) async fn next_batch(
        &mut self,
        mapping: &crate::mapping::Mapping,
        stored: Checkpoint,
    ) -> Result<Batch, RunError> {
        let Some(name) = self.tables.front().cloned() else {
            return Err(RunError::NotReady("no table is left to backfill".into()));
        };
        if self.reader.is_none() {
            self.reader = Some(PgClient::connect(&self.info).await?);
        }
        let Some(reader) = self.reader.as_ref() else {
            return Err(RunError::NotReady("no connection to copy with".into()));
        };
        let c = reader.client();
        if self.current.is_none() {
            let catalog = reader
                .catalog(std::slice::from_ref(&name), &self.publication)
                .await?;
            let (pk, leave_out) = catalog
                .get(&name)
                .map(|t| (t.primary_key.clone(), t.generated.clone()))
                .unwrap_or_default();
            let t = describe_table(c, &name, &pk, &leave_out)
                .await
                .map_err(|e| BackfillError::new(&name, &e))?;
            self.current = Some(t);
        }
        let Some(t) = self.current.as_ref() else {
            return Err(RunError::NotReady("no table is being copied".into()));
        };
        let after = match &self.state.table {
            Some(n) if *n == name => self.state.last_key.clone(),
            _ => None,
        };
        // Versions of history labels start when the chunk's snapshot was
        // taken: before any transaction the stream applies after it.
        let taken_at = crate::lsn::pg_now();
        let consistent = begin_exported_snapshot(&self.info, c, &self.temp_slot)
            .await
            .map_err(|e| BackfillError::new(&name, &e))?;
        let rows = read_chunk(c, t, after.as_deref(), self.chunk_rows).await;
        let _ = c.batch_execute("COMMIT").await;
        let rows = rows.map_err(|e| BackfillError::new(&name, &e))?;
        let n = rows.len();
        let last = rows.last().map(|r| r.1.clone());
        let mut batcher = Batcher::starting_at(stored.lsn);
        batcher.note_time(consistent, taken_at);
        for (change, _) in rows {
            let mut ops = Vec::new();
            self.mapper.map_change(&change, consistent, &mut ops)?;
            batcher.push_transaction(vec![ops], stored.lsn);
        }
        let mut batch = batcher.take(mapping);
        // The checkpoint stays what it is; these are no stream changes.
        batch.end_lsn = stored.lsn;
        batch.partial = stored.partial;
        batch.changes = 0;
        batch.transactions = 0;
        self.state.rows += n as u64;
        if n < self.chunk_rows {
            self.state.tables_done.push(name.clone());
            self.state.table = None;
            self.state.last_key = None;
            self.tables.pop_front();
            self.current = None;
            if let Some(records) = self.on_done.remove(&name) {
                batch.after.extend(records);
            }
            if self.tables.is_empty() {
                batch.after.append(&mut self.after_all);
            }
            self.metrics
                .backfill_tables_left
                .store(self.tables.len() as u64, Ordering::Relaxed);
            tracing::info!(table = %name, rows_total = self.state.rows, "table copied while streaming");
        } else {
            self.state.table = Some(name.clone());
            self.state.last_key = last;
        }
        self.metrics
            .backfill_rows
            .fetch_add(n as u64, Ordering::Relaxed);
        tracing::debug!(table = %name, rows = n, consistent_lsn = %consistent, "backfill chunk read");
        batch
            .after
            .push(progress_statement(&self.slot, &self.state, consistent));
        Ok(batch)
    }
}

/// The snapshot record's update as a statement of a batch.
fn progress_statement(slot: &str, state: &SnapshotState, lsn: Lsn) -> Statement {
    let text = |s: &str| BoltType::String(s.into());
    let list = |v: &[String]| {
        BoltType::List(BoltList::from(
            v.iter().map(|s| text(s)).collect::<Vec<_>>(),
        ))
    };
    let opt = |v: Option<BoltType>| v.unwrap_or(BoltType::Null(neo4rs::BoltNull));
    let row = cypher::row(vec![
        ("slot", text(slot)),
        (
            "done",
            BoltType::Boolean(neo4rs::BoltBoolean::new(state.done)),
        ),
        ("tables_done", list(&state.tables_done)),
        ("table", opt(state.table.as_deref().map(text))),
        ("last_key", opt(state.last_key.as_deref().map(list))),
        (
            "rows",
            BoltType::Integer(neo4rs::BoltInteger::new(
                i64::try_from(state.rows).unwrap_or(i64::MAX),
            )),
        ),
        ("lsn_text", text(&lsn.to_string())),
    ]);
    Statement {
        cypher: "UNWIND $rows AS row MERGE (s:WalgraphSnapshot {slot: row.slot}) \
                 SET s.done = row.done, s.tables_done = row.tables_done, s.table = row.table, \
                 s.last_key = row.last_key, s.rows = row.rows, s.lsn_text = row.lsn_text, \
                 s.updated_at = datetime()"
            .into(),
        rows: BoltList::from(vec![row]),
    }
}
