//! Batch: graph operations of consecutive transactions → a few `UNWIND` statements.
//!
//! Invariants:
//! - applying a batch's statements in order gives the same graph as applying
//!   its operations one by one;
//! - operations on the same node or edge are coalesced to the final state;
//! - within a *segment*, statements run in a fixed order — node upserts,
//!   row-owned relationships, edge deletes, edge merges, node deletes — which
//!   is only equivalent to the original order when no operation touches a
//!   node deleted earlier in the segment; such an operation, and every
//!   TRUNCATE, starts a new segment.
//! - a batch never ends inside a transaction: its end LSN is the end LSN of
//!   the last transaction it holds.

use neo4rs::BoltList;

use crate::lsn::{Checkpoint, Lsn, Partial};
use crate::mapping::map::GraphOp;
use crate::mapping::Mapping;
use plan::Segment;

pub mod cypher;
mod plan;
pub mod render;
pub mod size;

pub use render::{describe, render_plan};

/// Commit times (microseconds since 2000-01-01 UTC) by commit LSN, of the
/// transactions a batch holds: the `validFrom` of the versions they make.
pub type CommitTimes = std::collections::HashMap<Lsn, i64>;

/// Something recorded instead of applied (`neo4j.on_error =
/// "dead_letter"`): a change Neo4j rejected for good, or an operation from
/// a message or an outbox row that walgraph refused. Written as a
/// `WalgraphDeadLetter` node in the same transaction as its batch.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The source table (or where the operation came from).
    pub table: String,
    /// The row's key values.
    pub key: String,
    /// The commit LSN of the change.
    pub lsn: Option<Lsn>,
    /// What walgraph tried (the operation, as text).
    pub operation: String,
    /// Why it failed.
    pub error: String,
}

/// One Cypher statement and its rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// Cypher text (`UNWIND $rows AS row …`).
    pub cypher: String,
    /// The `$rows` parameter.
    pub rows: BoltList,
}

/// A batch ready for the sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The operations, one group per statement (kept to find the one a
    /// permanent error comes from).
    pub plan: Vec<Vec<GraphOp>>,
    /// Statements, to run in order in one Neo4j transaction.
    pub statements: Vec<Statement>,
    /// Statements run after `statements` in the same transaction, not
    /// part of the plan (an online backfill's progress record).
    pub after: Vec<Statement>,
    /// End LSN of the last whole transaction in the batch (or before it):
    /// the new checkpoint, and what may be confirmed to Postgres.
    pub end_lsn: Lsn,
    /// When the batch ends inside a transaction too large for one batch:
    /// that transaction and how many of its changes are applied with it.
    pub partial: Option<Partial>,
    /// Row changes the batch holds.
    pub changes: usize,
    /// Transactions the batch holds.
    pub transactions: usize,
    /// Commit time (microseconds since 2000-01-01 UTC) and change count of
    /// each transaction the batch completes, for latency metrics.
    pub commits: Vec<(i64, u64)>,
    /// Row changes by table and operation, for the metrics.
    pub by_table: Vec<(std::sync::Arc<str>, &'static str, u64)>,
    /// Commit times of the transactions it holds (for versions).
    pub times: CommitTimes,
    /// Operations refused before the sink, recorded with the batch.
    pub dead: Vec<DeadLetter>,
    /// When it became ready for the writer (its `batch.max_delay` passed,
    /// or it filled up), and the protocol clock then, for the latency's
    /// stages; `None` for batches the stream does not make.
    pub ready: Option<(std::time::Instant, i64)>,
}

impl Batch {
    /// The checkpoint this batch writes.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            lsn: self.end_lsn,
            partial: self.partial,
        }
    }
}

/// Accumulates transactions' operations until the batch is full or due.
#[derive(Debug, Default)]
pub struct Batcher {
    segments: Vec<Segment>,
    end_lsn: Lsn,
    partial: Option<Partial>,
    changes: usize,
    transactions: usize,
    commits: Vec<(i64, u64)>,
    /// Changes by (table OID, operation), with the table's name.
    by_table: std::collections::HashMap<(u32, crate::transactions::Op), (std::sync::Arc<str>, u64)>,
    /// Labels whose versions are kept: their nodes never coalesce across
    /// transactions (each transaction's state is a version).
    history: std::sync::Arc<std::collections::HashSet<std::sync::Arc<str>>>,
    times: CommitTimes,
    /// The commit time of the transaction being taken, until it ends.
    open_time: Option<(Lsn, i64)>,
    dead: Vec<DeadLetter>,
}

impl Batcher {
    /// An empty batcher.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batcher whose batches report at least `lsn`, the end LSN
    /// the checkpoint already holds: the batches of a transaction resumed in
    /// part after a restart then carry it, and their checkpoint moves on.
    pub fn starting_at(lsn: Lsn) -> Self {
        Batcher {
            end_lsn: lsn,
            ..Self::default()
        }
    }

    /// Keeps the nodes of `mapping`'s history labels apart per
    /// transaction (see [`Batcher::history`]).
    pub fn with_history(mut self, mapping: &Mapping) -> Self {
        self.history = std::sync::Arc::new(
            mapping
                .history_keys()
                .into_iter()
                .map(|(label, _)| label)
                .collect(),
        );
        self
    }

    /// Notes the commit time of the transaction committed at `commit_lsn`
    /// (the `validFrom` of the versions it makes), when there are history
    /// labels; it is kept for the rest of a transaction a batch ends inside.
    pub fn note_commit_time(&mut self, commit_lsn: Lsn, commit_time: i64) {
        if !self.history.is_empty() {
            self.times.insert(commit_lsn, commit_time);
            self.open_time = Some((commit_lsn, commit_time));
        }
    }

    /// The time the versions stamped `lsn` start at, where no transaction
    /// gives one (a snapshot chunk: when its snapshot was taken).
    pub fn note_time(&mut self, lsn: Lsn, time: i64) {
        self.times.insert(lsn, time);
    }

    /// Records something refused instead of applied, with this batch.
    pub fn dead_letter(&mut self, d: DeadLetter) {
        self.dead.push(d);
    }

    /// While nothing waits: the stream is known to hold nothing for the
    /// graph up to `lsn` (the idle advance), so the next batch reports at
    /// least it.
    pub fn advance_to(&mut self, lsn: Lsn) {
        debug_assert!(self.is_empty(), "only an idle batcher advances");
        self.end_lsn = self.end_lsn.max(lsn);
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.transactions == 0 && self.partial.is_none() && self.dead.is_empty()
    }

    /// Row changes waiting.
    pub fn changes(&self) -> usize {
        self.changes
    }

    /// Adds one whole transaction: the operations of each of its changes.
    pub fn push_transaction(&mut self, changes: Vec<Vec<GraphOp>>, end_lsn: Lsn) {
        debug_assert!(
            end_lsn >= self.end_lsn,
            "transactions arrive in commit order"
        );
        self.push_changes(changes);
        self.end_transaction(end_lsn);
    }

    /// Adds the operations of one change of the transaction ending at
    /// `end_lsn`, its `applied`-th (counting from 1, so that many are then
    /// waiting or applied): a transaction
    /// too large for one batch arrives this way, and a batch taken before
    /// [`Batcher::end_transaction`] applies it in part.
    pub fn push_partial(&mut self, change: Vec<GraphOp>, end_lsn: Lsn, applied: u64) {
        debug_assert!(
            end_lsn > self.end_lsn,
            "a partial transaction comes after the last whole one"
        );
        self.push_change(change);
        self.partial = Some(Partial {
            end_lsn,
            changes: applied,
        });
    }

    /// As [`Batcher::push_partial`], for one message or outbox row: its
    /// operations are an application's list, applied in order, so each is
    /// placed as if it were a change of its own (a new segment wherever the
    /// fixed statement order would reorder it), and they count as one.
    pub fn push_partial_each(&mut self, ops: Vec<GraphOp>, end_lsn: Lsn, applied: u64) {
        debug_assert!(
            end_lsn > self.end_lsn,
            "a partial transaction comes after the last whole one"
        );
        self.changes += 1;
        for op in ops {
            self.place(vec![op]);
        }
        self.partial = Some(Partial {
            end_lsn,
            changes: applied,
        });
    }

    /// The transaction ending at `end_lsn` is complete.
    pub fn end_transaction(&mut self, end_lsn: Lsn) {
        self.end_lsn = self.end_lsn.max(end_lsn);
        self.partial = None;
        self.transactions += 1;
        self.open_time = None;
    }

    /// Counts one change of table `oid` (named by `name()`, asked only
    /// the first time) for the metrics.
    pub fn note_change(
        &mut self,
        oid: u32,
        op: crate::transactions::Op,
        name: impl FnOnce() -> String,
    ) {
        self.by_table
            .entry((oid, op))
            .or_insert_with(|| (std::sync::Arc::from(name()), 0))
            .1 += 1;
    }

    /// Notes the commit time and change count of the transaction just
    /// completed (for latency metrics).
    pub fn record_commit(&mut self, commit_time: i64, changes: u64) {
        self.commits.push((commit_time, changes));
    }

    /// The checkpoint a batch taken now would write.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            lsn: self.end_lsn,
            partial: self.partial,
        }
    }

    fn push_changes(&mut self, changes: Vec<Vec<GraphOp>>) {
        for group in changes {
            self.push_change(group);
        }
    }

    fn push_change(&mut self, group: Vec<GraphOp>) {
        self.changes += 1;
        self.place(group);
    }

    /// Places one change's operations into the segments.
    fn place(&mut self, group: Vec<GraphOp>) {
        {
            // The operations of one change stay in one segment: split across
            // two, the first would see a node already coalesced to the
            // change's final version and its LSN.
            let new_segment = match self.segments.last() {
                None => true,
                Some(s) => {
                    s.truncate.is_some() || group.iter().any(|op| s.conflicts(op, &self.history))
                }
            };
            if new_segment {
                self.segments.push(Segment::default());
            }
            for op in group {
                let is_truncate = matches!(
                    op,
                    GraphOp::TruncateLabel { .. } | GraphOp::TruncateType { .. }
                );
                if is_truncate && !self.segments.last().is_none_or(Segment::is_empty) {
                    self.segments.push(Segment::default());
                }
                if let Some(s) = self.segments.last_mut() {
                    s.add(op);
                }
                if is_truncate {
                    // Nothing may be reordered across a truncate.
                    self.segments.push(Segment::default());
                }
            }
        }
    }

    /// Takes the waiting operations as groups, one per statement, in the
    /// order they must run (what [`Batcher::take`] renders as Cypher).
    fn take_plan(&mut self) -> Vec<Vec<GraphOp>> {
        let mut plan = Vec::new();
        for s in std::mem::take(&mut self.segments) {
            if !s.is_empty() {
                s.plan(&mut plan);
            }
        }
        plan
    }

    /// Takes the waiting operations as a batch of statements.
    pub fn take(&mut self, mapping: &Mapping) -> Batch {
        let plan = self.take_plan();
        let times = std::mem::take(&mut self.times);
        if let Some((lsn, t)) = self.open_time {
            // The rest of the transaction comes in the next batch.
            self.times.insert(lsn, t);
        }
        let statements = render::render_plan_at(&plan, mapping, &times);
        let batch = Batch {
            plan,
            statements,
            after: Vec::new(),
            end_lsn: self.end_lsn,
            partial: self.partial.take(),
            changes: self.changes,
            transactions: self.transactions,
            commits: std::mem::take(&mut self.commits),
            by_table: std::mem::take(&mut self.by_table)
                .into_iter()
                .map(|((_, op), (name, n))| (name, op.as_str(), n))
                .collect(),
            times,
            dead: std::mem::take(&mut self.dead),
            ready: None,
        };
        self.changes = 0;
        self.transactions = 0;
        batch
    }
}

#[cfg(test)]
mod tests;
