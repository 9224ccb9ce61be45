//! Transactions: decoded messages → whole committed transactions, in commit order.
//!
//! Invariants:
//! - a [`Transaction`] is emitted only when its commit arrives (Commit,
//!   Stream Commit or Commit Prepared), with the positions of that commit;
//! - an aborted streamed transaction, or an aborted subtransaction inside it,
//!   leaves no change behind; a prepared transaction that is rolled back emits
//!   nothing;
//! - changes keep the order the server sent them in.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::decode::{
    decode_row, Field, OldKind, PgOutputMessage, Relation, RelationCache, ResolveError, Row, Xid,
};
use crate::lsn::Lsn;

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// Why the stream could not be assembled into transactions.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A change could not be resolved against the relation cache.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Messages arrived out of the protocol's order.
    #[error("the replication stream is out of order: {0}")]
    OutOfOrder(String),
}

#[derive(Debug)]
struct Building {
    xid: Xid,
    origin: Option<String>,
    /// Changes with the (sub)transaction id that made them (streaming only).
    changes: Vec<(Xid, Change)>,
    messages: Vec<LogicalMessage>,
}

impl Building {
    fn new(xid: Xid) -> Self {
        Building {
            xid,
            origin: None,
            changes: Vec::new(),
            messages: Vec::new(),
        }
    }

    fn finish(self, commit_lsn: Lsn, end_lsn: Lsn, commit_time: i64) -> Transaction {
        Transaction {
            xid: self.xid,
            commit_lsn,
            end_lsn,
            commit_time,
            origin: self.origin,
            changes: self.changes.into_iter().map(|(_, c)| c).collect(),
            messages: self.messages,
        }
    }
}

/// Turns the message stream into committed transactions.
#[derive(Debug, Default)]
pub struct Assembler {
    cache: RelationCache,
    /// The open regular (or prepared) transaction.
    current: Option<Building>,
    /// Streamed transactions not yet committed, by top-level xid.
    streams: HashMap<Xid, Building>,
    /// The top-level xid of the open stream block.
    open_stream: Option<Xid>,
    /// Prepared transactions waiting for Commit/Rollback Prepared, by GID.
    prepared: HashMap<String, Building>,
}

impl Assembler {
    /// An assembler with an empty relation cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The relation cache, as announced so far.
    pub fn relations(&self) -> &RelationCache {
        &self.cache
    }

    /// True when no transaction is partly received (so every commit the
    /// server has sent has been emitted).
    pub fn is_idle(&self) -> bool {
        self.current.is_none() && self.open_stream.is_none()
    }

    /// Feeds one message; returns a transaction when one commits.
    pub fn push(&mut self, msg: PgOutputMessage) -> Result<Option<Transaction>, AssembleError> {
        match msg {
            PgOutputMessage::Begin { xid, .. } => {
                self.expect_no_open("Begin")?;
                self.current = Some(Building::new(xid));
            }
            PgOutputMessage::BeginPrepare { xid, .. } => {
                self.expect_no_open("Begin Prepare")?;
                self.current = Some(Building::new(xid));
            }
            PgOutputMessage::Commit {
                commit_lsn,
                end_lsn,
                commit_time,
                ..
            } => {
                let b = self
                    .current
                    .take()
                    .ok_or_else(|| out_of_order("Commit without Begin"))?;
                return Ok(Some(b.finish(commit_lsn, end_lsn, commit_time)));
            }
            PgOutputMessage::Origin { name, .. } => {
                if let Some(b) = self.building_mut(None) {
                    b.origin = Some(name);
                }
            }
            PgOutputMessage::Relation { body, .. } => {
                self.cache.update(&body);
            }
            PgOutputMessage::Type {
                oid,
                namespace,
                name,
                ..
            } => self.cache.update_type(oid, &namespace, &name),
            PgOutputMessage::Insert { xid, relation, new } => {
                let rel = Arc::clone(self.cache.get(relation)?);
                let new = decode_row(&rel, &new)?;
                self.add(xid, change(rel, Op::Insert, Some(new), None, false))?;
            }
            PgOutputMessage::Update {
                xid,
                relation,
                old,
                new,
            } => {
                let rel = Arc::clone(self.cache.get(relation)?);
                let new = decode_row(&rel, &new)?;
                let (old, full) = match old {
                    Some((kind, t)) => (Some(decode_row(&rel, &t)?), kind == OldKind::Tuple),
                    None => (None, false),
                };
                self.add(xid, change(rel, Op::Update, Some(new), old, full))?;
            }
            PgOutputMessage::Delete { xid, relation, old } => {
                let rel = Arc::clone(self.cache.get(relation)?);
                let (kind, t) = old;
                let old = decode_row(&rel, &t)?;
                self.add(
                    xid,
                    change(rel, Op::Delete, None, Some(old), kind == OldKind::Tuple),
                )?;
            }
            PgOutputMessage::Truncate { xid, relations, .. } => {
                for oid in relations {
                    let rel = Arc::clone(self.cache.get(oid)?);
                    self.add(xid, change(rel, Op::Truncate, None, None, false))?;
                }
            }
            PgOutputMessage::Message {
                xid,
                transactional,
                prefix,
                content,
                ..
            } => {
                let m = LogicalMessage {
                    prefix,
                    content: String::from_utf8_lossy(&content).into_owned(),
                };
                if transactional {
                    let b = self.building_mut(xid).ok_or_else(|| {
                        out_of_order("transactional Message outside a transaction")
                    })?;
                    b.messages.push(m);
                } else {
                    tracing::debug!(prefix = %m.prefix, "non-transactional logical message");
                }
            }
            PgOutputMessage::StreamStart { xid, first_segment } => {
                if self.open_stream.is_some() {
                    return Err(out_of_order("Stream Start inside an open stream block"));
                }
                if first_segment || !self.streams.contains_key(&xid) {
                    self.streams
                        .entry(xid)
                        .or_insert_with(|| Building::new(xid));
                }
                self.open_stream = Some(xid);
            }
            PgOutputMessage::StreamStop => {
                self.open_stream
                    .take()
                    .ok_or_else(|| out_of_order("Stream Stop without Stream Start"))?;
            }
            PgOutputMessage::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time,
                ..
            } => {
                let b = self
                    .streams
                    .remove(&xid)
                    .unwrap_or_else(|| Building::new(xid));
                return Ok(Some(b.finish(commit_lsn, end_lsn, commit_time)));
            }
            PgOutputMessage::StreamAbort { xid, subxid, .. } => {
                if xid == subxid {
                    self.streams.remove(&xid);
                } else if let Some(b) = self.streams.get_mut(&xid) {
                    b.changes.retain(|(x, _)| *x != subxid);
                }
            }
            PgOutputMessage::Prepare(p) => {
                let b = self
                    .current
                    .take()
                    .ok_or_else(|| out_of_order("Prepare without Begin Prepare"))?;
                self.prepared.insert(p.gid, b);
            }
            PgOutputMessage::StreamPrepare(p) => {
                let b = self
                    .streams
                    .remove(&p.xid)
                    .unwrap_or_else(|| Building::new(p.xid));
                self.prepared.insert(p.gid, b);
            }
            PgOutputMessage::CommitPrepared {
                commit_lsn,
                end_lsn,
                commit_time,
                xid,
                gid,
                ..
            } => {
                let b = self.prepared.remove(&gid).ok_or_else(|| {
                    out_of_order(&format!(
                        "Commit Prepared for transaction {gid} (xid {xid}) whose Prepare was never received"
                    ))
                })?;
                return Ok(Some(b.finish(commit_lsn, end_lsn, commit_time)));
            }
            PgOutputMessage::RollbackPrepared { gid, .. } => {
                self.prepared.remove(&gid);
            }
        }
        Ok(None)
    }

    fn expect_no_open(&self, what: &str) -> Result<(), AssembleError> {
        if self.current.is_some() {
            return Err(out_of_order(&format!(
                "{what} while another transaction is open"
            )));
        }
        Ok(())
    }

    /// The transaction a change belongs to: the open stream block's when
    /// the change carries an xid, else the regular open one.
    fn building_mut(&mut self, xid: Option<Xid>) -> Option<&mut Building> {
        match (xid, self.open_stream) {
            (Some(_), Some(top)) => self.streams.get_mut(&top),
            _ => self.current.as_mut(),
        }
    }

    fn add(&mut self, xid: Option<Xid>, c: Change) -> Result<(), AssembleError> {
        let b = self
            .building_mut(xid)
            .ok_or_else(|| out_of_order("a row change outside a transaction"))?;
        let sub = xid.unwrap_or(b.xid);
        b.changes.push((sub, c));
        Ok(())
    }
}

fn change(
    relation: Arc<Relation>,
    op: Op,
    new: Option<Row>,
    old: Option<Row>,
    full: bool,
) -> Change {
    Change {
        relation,
        op,
        new,
        old,
        old_is_full_row: full,
    }
}

fn out_of_order(what: &str) -> AssembleError {
    AssembleError::OutOfOrder(what.to_string())
}
