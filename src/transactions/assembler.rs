//! The assembler: decoded messages → committed transactions, handed over
//! in parts, with streamed (protocol 2+) and prepared transactions held
//! until they commit.
//!
//! Invariants: see [the module](super) — parts are emitted only at commit,
//! in the order the server sent the changes; aborted streams and rolled-back
//! prepared transactions leave nothing; a stream's schema reaches the shared
//! relation cache only when it commits.
//!
//! Longer than most files because it is one state machine: every message
//! kind moves the same few states (open transaction, open stream, waiting
//! prepared transactions, replay), and splitting it would scatter them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::spill::{SpillReader, StreamBuffer};
use super::{
    AssembleError, Change, LogicalMessage, Op, StreamRollback, Transaction, TxnHeader, TxnPart,
};
use crate::config::SpillSettings;
use crate::decode::{
    decode_message, decode_row, Decoder, OldKind, PgOutputMessage, Relation, RelationCache, Row,
    Xid,
};
use crate::lsn::Lsn;

/// Where the parts of a transaction go while it is decoded.
trait Parts {
    fn change(&mut self, c: Change) -> Result<(), AssembleError>;
    fn message(&mut self, m: LogicalMessage) -> Result<(), AssembleError>;
    fn origin(&mut self, name: String);
}

impl Parts for Building {
    fn change(&mut self, c: Change) -> Result<(), AssembleError> {
        self.parts.push(TxnPart::Change(c));
        Ok(())
    }

    fn message(&mut self, m: LogicalMessage) -> Result<(), AssembleError> {
        self.parts.push(TxnPart::Message(m));
        Ok(())
    }

    fn origin(&mut self, name: String) {
        self.origin = Some(name);
    }
}

/// Queues the parts one message produces.
struct Collect<'q>(&'q mut VecDeque<TxnPart>);

impl Parts for Collect<'_> {
    fn change(&mut self, c: Change) -> Result<(), AssembleError> {
        self.0.push_back(TxnPart::Change(c));
        Ok(())
    }

    fn message(&mut self, m: LogicalMessage) -> Result<(), AssembleError> {
        self.0.push_back(TxnPart::Message(m));
        Ok(())
    }

    fn origin(&mut self, _name: String) {}
}

#[derive(Debug)]
struct Building {
    xid: Xid,
    origin: Option<String>,
    /// Changes and messages, in the order the server sent them.
    parts: Vec<TxnPart>,
}

impl Building {
    fn new(xid: Xid) -> Self {
        Building {
            xid,
            origin: None,
            parts: Vec::new(),
        }
    }

    /// Queues the transaction in parts.
    fn emit(self, commit_lsn: Lsn, end_lsn: Lsn, commit_time: i64, out: &mut VecDeque<TxnPart>) {
        let header = TxnHeader {
            xid: self.xid,
            commit_lsn,
            end_lsn,
            commit_time,
            origin: self.origin,
        };
        out.push_back(TxnPart::Begin(header.clone()));
        out.extend(self.parts);
        out.push_back(TxnPart::Commit(header));
    }
}

/// A committed streamed transaction being read back, message by message.
#[derive(Debug)]
struct Replay {
    reader: SpillReader,
    /// The relation cache as the transaction sees it (its own DDL included).
    local: RelationCache,
    aborted: HashSet<Xid>,
    /// Relation and Type messages for the shared cache once the end is reached.
    shared_updates: Vec<PgOutputMessage>,
    header: TxnHeader,
}

impl Replay {
    /// Decodes the next kept message into `target`; false at the end.
    fn step(&mut self, target: &mut dyn Parts) -> Result<bool, AssembleError> {
        loop {
            let Some(raw) = self.reader.next()? else {
                return Ok(false);
            };
            let msg = decode_message(&raw, true)?;
            if streamed_xid(&msg).is_some_and(|x| self.aborted.contains(&x)) {
                continue;
            }
            if matches!(
                msg,
                PgOutputMessage::Relation { .. } | PgOutputMessage::Type { .. }
            ) {
                self.shared_updates.push(msg.clone());
            }
            apply_data(&mut self.local, Some(target), msg)?;
            return Ok(true);
        }
    }
}

/// The (sub)transaction id a message inside a stream block carries.
fn streamed_xid(msg: &PgOutputMessage) -> Option<Xid> {
    match msg {
        PgOutputMessage::Relation { xid, .. }
        | PgOutputMessage::Type { xid, .. }
        | PgOutputMessage::Insert { xid, .. }
        | PgOutputMessage::Update { xid, .. }
        | PgOutputMessage::Delete { xid, .. }
        | PgOutputMessage::Truncate { xid, .. }
        | PgOutputMessage::Message { xid, .. } => *xid,
        _ => None,
    }
}

/// Turns the message stream into committed transactions, handed over in
/// parts: [`Assembler::push`] one message, then take parts with
/// [`Assembler::next_part`] until it returns `None` before pushing the next.
/// A streamed transaction is read back from its spill file one message per
/// part taken, so the caller decides how much of it is in memory.
#[derive(Debug, Default)]
pub struct Assembler {
    decoder: Decoder,
    cache: RelationCache,
    spill: SpillSettings,
    /// The open regular (or prepared) transaction.
    current: Option<Building>,
    /// Streamed transactions not yet committed, by top-level xid.
    streams: HashMap<Xid, StreamBuffer>,
    /// The top-level xid of the open stream block.
    open_stream: Option<Xid>,
    /// Prepared transactions waiting for Commit/Rollback Prepared, by GID.
    prepared: HashMap<String, Building>,
    /// Parts ready to be taken.
    ready: VecDeque<TxnPart>,
    /// A committed streamed transaction being read back.
    replay: Option<Replay>,
    /// User types announced by Type messages that the relation cache does
    /// not know yet (see [`Assembler::take_new_types`]).
    new_types: Vec<u32>,
    /// Streamed transactions that rolled back, not yet taken (see
    /// [`Assembler::take_rollbacks`]).
    rollbacks: Vec<StreamRollback>,
    /// Non-transactional logical messages with their LSNs, not yet taken
    /// (see [`Assembler::take_loose_messages`]).
    loose: Vec<(Lsn, LogicalMessage)>,
}

impl Assembler {
    /// An assembler with an empty relation cache and default spill settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// An assembler that spills streamed transactions as `spill` says.
    pub fn with_spill(spill: SpillSettings) -> Self {
        Assembler {
            spill,
            ..Self::default()
        }
    }

    /// User types announced since the last call that the relation cache
    /// cannot read yet: the caller asks the catalog what they are (a domain
    /// is read as its base type) and hands the answer to
    /// [`Assembler::add_base_types`] before pushing the next message, which
    /// is the Relation that uses them.
    pub fn take_new_types(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.new_types)
    }

    /// Non-transactional logical messages (`pg_logical_emit_message(false,
    /// …)`) since the last call, with their LSNs: they belong to no
    /// transaction, so they are not among any transaction's parts.
    pub fn take_loose_messages(&mut self) -> Vec<(Lsn, LogicalMessage)> {
        std::mem::take(&mut self.loose)
    }

    /// Streamed transactions that rolled back since the last call.
    pub fn take_rollbacks(&mut self) -> Vec<StreamRollback> {
        std::mem::take(&mut self.rollbacks)
    }

    /// Remembers what user types are read as (see [`Assembler::take_new_types`]).
    pub fn add_base_types(&mut self, bases: &HashMap<u32, u32>) {
        self.cache.add_base_types(bases);
        if let Some(r) = self.replay.as_mut() {
            r.local.add_base_types(bases);
        }
    }

    /// The relation cache, as announced so far.
    pub fn relations(&self) -> &RelationCache {
        &self.cache
    }

    /// True when no transaction is partly received or waiting to be taken,
    /// so every commit the server has sent has been handed over and
    /// confirming the server's WAL end loses nothing.
    pub fn is_idle(&self) -> bool {
        self.current.is_none()
            && self.open_stream.is_none()
            && self.streams.is_empty()
            && self.prepared.is_empty()
            && !self.has_parts()
    }

    /// True while parts wait to be taken with [`Assembler::next_part`].
    pub fn has_parts(&self) -> bool {
        !self.ready.is_empty() || self.replay.is_some()
    }

    /// Feeds the payload of one XLogData frame and returns the transaction
    /// it commits, if any, whole in memory (for tests and tools; `run` and
    /// `peek` take parts).
    pub fn push_raw(&mut self, data: &Bytes) -> Result<Option<Transaction>, AssembleError> {
        self.push(data)?;
        let mut out: Option<Transaction> = None;
        while let Some(part) = self.next_part()? {
            match part {
                TxnPart::Begin(h) => {
                    out = Some(Transaction {
                        xid: h.xid,
                        commit_lsn: h.commit_lsn,
                        end_lsn: h.end_lsn,
                        commit_time: h.commit_time,
                        origin: h.origin,
                        changes: Vec::new(),
                        messages: Vec::new(),
                    })
                }
                TxnPart::Change(c) => {
                    if let Some(t) = out.as_mut() {
                        t.changes.push(c);
                    }
                }
                TxnPart::Message(m) => {
                    if let Some(t) = out.as_mut() {
                        t.messages.push(m);
                    }
                }
                TxnPart::Commit(_) => {}
            }
        }
        Ok(out)
    }

    /// Feeds the payload of one XLogData frame. Parts of a transaction it
    /// commits are then taken with [`Assembler::next_part`]; pushing again
    /// before they are all taken is refused.
    pub fn push(&mut self, data: &Bytes) -> Result<(), AssembleError> {
        if self.has_parts() {
            return Err(AssembleError::PushedBeforeTaken);
        }
        let msg = self.decoder.decode(data)?;
        if let PgOutputMessage::Type { oid, .. } = &msg {
            if !self.cache.knows_type(*oid) && !self.new_types.contains(oid) {
                self.new_types.push(*oid);
            }
        }
        if let Some(top) = self.open_stream {
            if streamed_xid(&msg).is_some() {
                let buf = self
                    .streams
                    .get_mut(&top)
                    .ok_or_else(|| out_of_order("a streamed change for an unknown transaction"))?;
                // A copy: a slice would keep the whole network read buffer
                // it came from alive, and the memory limit would not hold.
                return buf.push(Bytes::copy_from_slice(data), &self.spill);
            }
        }
        self.push_message(msg)
    }

    /// The next part of a committed transaction: `Begin`, its changes and
    /// messages in order, `Commit`; `None` when nothing is waiting. A
    /// streamed transaction is decoded here, one kept message at a time.
    pub fn next_part(&mut self) -> Result<Option<TxnPart>, AssembleError> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Ok(Some(p));
            }
            let Some(r) = self.replay.as_mut() else {
                return Ok(None);
            };
            if !r.step(&mut Collect(&mut self.ready))? {
                if let Some(r) = self.replay.take() {
                    self.finish_replay(r, true)?;
                }
            }
        }
    }

    /// Feeds one decoded message (outside stream blocks).
    fn push_message(&mut self, msg: PgOutputMessage) -> Result<(), AssembleError> {
        match msg {
            PgOutputMessage::Begin { xid, .. } | PgOutputMessage::BeginPrepare { xid, .. } => {
                if self.current.is_some() {
                    return Err(out_of_order("Begin while another transaction is open"));
                }
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
                b.emit(commit_lsn, end_lsn, commit_time, &mut self.ready);
            }
            PgOutputMessage::StreamStart { xid, .. } => {
                if self.open_stream.is_some() {
                    return Err(out_of_order("Stream Start inside an open stream block"));
                }
                self.streams
                    .entry(xid)
                    .or_insert_with(|| StreamBuffer::new(xid));
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
                let header = TxnHeader {
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                    origin: None,
                };
                self.ready.push_back(TxnPart::Begin(header.clone()));
                match self.start_replay(xid, header.clone())? {
                    Some(r) => self.replay = Some(r),
                    None => self.ready.push_back(TxnPart::Commit(header)),
                }
            }
            PgOutputMessage::StreamAbort { xid, subxid, abort } => {
                if xid == subxid {
                    if let Some(b) = self.streams.remove(&xid) {
                        self.rollbacks.push(StreamRollback {
                            xid,
                            abort,
                            messages: b.received.0,
                            bytes: b.received.1,
                        });
                    }
                } else if let Some(b) = self.streams.get_mut(&xid) {
                    b.aborted.insert(subxid);
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
                let mut b = Building::new(p.xid);
                let header = TxnHeader {
                    xid: p.xid,
                    commit_lsn: p.prepare_lsn,
                    end_lsn: p.end_lsn,
                    commit_time: p.prepare_time,
                    origin: None,
                };
                if let Some(mut r) = self.start_replay(p.xid, header)? {
                    while r.step(&mut b)? {}
                    self.finish_replay(r, false)?;
                }
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
                b.emit(commit_lsn, end_lsn, commit_time, &mut self.ready);
            }
            PgOutputMessage::RollbackPrepared { gid, .. } => {
                self.prepared.remove(&gid);
            }
            PgOutputMessage::Message {
                transactional: false,
                lsn,
                prefix,
                content,
                ..
            } => self.loose.push((
                lsn,
                LogicalMessage {
                    prefix,
                    content: String::from_utf8_lossy(&content).into_owned(),
                },
            )),
            other => apply_data(
                &mut self.cache,
                self.current.as_mut().map(|b| b as &mut dyn Parts),
                other,
            )?,
        }
        Ok(())
    }

    /// Starts reading a streamed transaction's kept messages back, with a
    /// relation cache of its own; `None` when nothing was kept for it.
    fn start_replay(
        &mut self,
        xid: Xid,
        header: TxnHeader,
    ) -> Result<Option<Replay>, AssembleError> {
        let Some(mut buf) = self.streams.remove(&xid) else {
            return Ok(None);
        };
        let aborted = std::mem::take(&mut buf.aborted);
        Ok(Some(Replay {
            reader: buf.into_reader()?,
            local: self.cache.clone(),
            aborted,
            shared_updates: Vec::new(),
            header,
        }))
    }

    /// The end of a replay: the transaction committed (or was prepared), so
    /// its Relation messages now update the shared cache too, and a
    /// committed one's `Commit` part is queued.
    fn finish_replay(&mut self, r: Replay, committed: bool) -> Result<(), AssembleError> {
        let Replay {
            shared_updates,
            header,
            ..
        } = r;
        for m in shared_updates {
            apply_data(&mut self.cache, None, m)?;
        }
        if committed {
            self.ready.push_back(TxnPart::Commit(header));
        }
        Ok(())
    }
}

/// Applies a data message (Relation, Type, Origin, Insert, Update, Delete,
/// Truncate, Message) to a relation cache and the transaction being built.
fn apply_data(
    cache: &mut RelationCache,
    mut target: Option<&mut dyn Parts>,
    msg: PgOutputMessage,
) -> Result<(), AssembleError> {
    let mut add = |c: Change| -> Result<(), AssembleError> {
        let b = target
            .as_deref_mut()
            .ok_or_else(|| out_of_order("a row change outside a transaction"))?;
        b.change(c)
    };
    match msg {
        PgOutputMessage::Relation { body, .. } => {
            cache.update(&body);
        }
        PgOutputMessage::Type {
            oid,
            namespace,
            name,
            ..
        } => cache.update_type(oid, &namespace, &name),
        PgOutputMessage::Insert { relation, new, .. } => {
            let rel = Arc::clone(cache.get(relation)?);
            let new = decode_row(&rel, &new)?;
            add(change(rel, Op::Insert, Some(new), None, false))?;
        }
        PgOutputMessage::Update {
            relation, old, new, ..
        } => {
            let rel = Arc::clone(cache.get(relation)?);
            let new = decode_row(&rel, &new)?;
            let (old, full) = match old {
                Some((kind, t)) => (Some(decode_row(&rel, &t)?), kind == OldKind::Tuple),
                None => (None, false),
            };
            add(change(rel, Op::Update, Some(new), old, full))?;
        }
        PgOutputMessage::Delete { relation, old, .. } => {
            let rel = Arc::clone(cache.get(relation)?);
            let (kind, t) = old;
            let old = decode_row(&rel, &t)?;
            add(change(
                rel,
                Op::Delete,
                None,
                Some(old),
                kind == OldKind::Tuple,
            ))?;
        }
        PgOutputMessage::Truncate { relations, .. } => {
            for oid in relations {
                let rel = Arc::clone(cache.get(oid)?);
                add(change(rel, Op::Truncate, None, None, false))?;
            }
        }
        PgOutputMessage::Origin { name, .. } => {
            if let Some(b) = target {
                b.origin(name);
            }
        }
        PgOutputMessage::Message {
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
                let b = target
                    .ok_or_else(|| out_of_order("transactional Message outside a transaction"))?;
                b.message(m)?;
            } else {
                tracing::debug!(prefix = %m.prefix, "non-transactional logical message");
            }
        }
        other => return Err(out_of_order(&format!("unexpected message {other:?}"))),
    }
    Ok(())
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
