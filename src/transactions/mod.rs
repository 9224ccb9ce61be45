//! Transactions: decoded messages → whole committed transactions, in commit order.
//!
//! Invariants:
//! - a [`Transaction`] is emitted only when its commit arrives (Commit,
//!   Stream Commit or Commit Prepared), with the positions of that commit;
//! - an aborted streamed transaction, or an aborted subtransaction inside it,
//!   leaves no change behind; a prepared transaction that is rolled back emits
//!   nothing;
//! - changes keep the order the server sent them in;
//! - a streamed transaction (protocol 2+) is kept as its raw messages, in
//!   memory up to a threshold and in a spill file beyond it, and decoded only
//!   when it commits; its Relation messages (which may describe uncommitted
//!   DDL) reach the shared relation cache only if it commits, as pgoutput
//!   expects (it does not resend a schema a committed stream carried).

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::decode::{DecodeError, Field, Relation, ResolveError, Row, Xid};
use crate::lsn::Lsn;

mod assembler;
mod spill;

pub use assembler::Assembler;

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
    /// All rows of the table removed.
    Truncate,
}

impl Op {
    /// The operation in lower case, as in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// One row change of a transaction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// The table, as described by its latest Relation message.
    #[serde(serialize_with = "relation_name")]
    pub relation: Arc<Relation>,
    /// What happened.
    pub op: Op,
    /// The new row (insert, update).
    pub new: Option<Row>,
    /// The old row or old key (update when the key changed or with
    /// `REPLICA IDENTITY FULL`; delete). With a key only, non-key columns are null.
    pub old: Option<Row>,
    /// Whether `old` holds the whole old row or only its key.
    pub old_is_full_row: bool,
}

fn relation_name<S: serde::Serializer>(rel: &Arc<Relation>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&rel.qualified_name())
}

impl Change {
    /// The value of a column in the new row, or else the old one.
    pub fn field(&self, index: usize) -> Option<&Field> {
        self.new
            .as_ref()
            .or(self.old.as_ref())
            .and_then(|r| r.get(index))
    }
}

/// A committed transaction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transaction {
    /// Transaction id.
    pub xid: Xid,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: the position to confirm once applied.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    /// Origin name, for a transaction replicated from elsewhere.
    pub origin: Option<String>,
    /// Row changes in order.
    pub changes: Vec<Change>,
    /// Transactional logical messages (`pg_logical_emit_message`), in order.
    pub messages: Vec<LogicalMessage>,
}

/// A message emitted with `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogicalMessage {
    /// The emitter's prefix.
    pub prefix: String,
    /// The content, lossily as UTF-8.
    pub content: String,
}

/// A committed transaction's identity and positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TxnHeader {
    /// Transaction id.
    pub xid: Xid,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    /// Origin name, for a transaction replicated from elsewhere.
    pub origin: Option<String>,
}

/// A committed transaction, piece by piece: `Begin`, its changes and
/// messages in order, `Commit`. A streamed transaction is handed over this
/// way straight from its spill file, so no more than one change of it is in
/// memory at a time.
#[derive(Debug, Clone, PartialEq)]
pub enum TxnPart {
    /// The transaction starts.
    Begin(TxnHeader),
    /// One row change.
    Change(Change),
    /// A transactional logical message.
    Message(LogicalMessage),
    /// The transaction ends.
    Commit(TxnHeader),
}

/// A streamed transaction that rolled back: what walgraph had received of
/// it, all discarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRollback {
    /// Top-level transaction id.
    pub xid: Xid,
    /// LSN and time of the abort, which the server sends with `streaming
    /// 'parallel'` (protocol 4, PostgreSQL 16+); `None` before.
    pub abort: Option<(Lsn, i64)>,
    /// Messages received (changes, relations, subtransaction aborts).
    pub messages: u64,
    /// Bytes received.
    pub bytes: u64,
}

/// How many parts a loop takes before it looks at its connection again, so
/// a huge transaction read back from its spill file does not starve the
/// status updates.
pub const PARTS_PER_TURN: usize = 1024;

/// Why the stream could not be assembled into transactions.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A message could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A change could not be resolved against the relation cache.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The caller broke the assembler's contract: it pushed a message
    /// before taking every part of the previous transaction. A bug in
    /// walgraph, not in the stream.
    #[error("walgraph pushed a message before taking the previous transaction (a bug; please report it)")]
    PushedBeforeTaken,
    /// Messages arrived out of the protocol's order.
    #[error("the replication stream is out of order: {0}")]
    OutOfOrder(String),
    /// The spill file of a streamed transaction failed.
    #[error("cannot spill a streamed transaction into {path}: {source}; check postgres.spill_dir and free disk space")]
    Spill {
        /// The spill directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests;
