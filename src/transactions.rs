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

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use serde::Serialize;

use crate::decode::{
    decode_message, decode_row, DecodeError, Decoder, Field, OldKind, PgOutputMessage, Relation,
    RelationCache, ResolveError, Row, Xid,
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

/// How many parts a loop takes before it looks at its connection again, so
/// a huge transaction read back from its spill file does not starve the
/// status updates.
pub const PARTS_PER_TURN: usize = 1024;

/// Where the parts of a transaction go while it is decoded.
trait Parts {
    fn change(&mut self, c: Change) -> Result<(), AssembleError>;
    fn message(&mut self, m: LogicalMessage) -> Result<(), AssembleError>;
    fn origin(&mut self, name: String);
}

impl Parts for Building {
    fn change(&mut self, c: Change) -> Result<(), AssembleError> {
        self.changes.push(c);
        Ok(())
    }

    fn message(&mut self, m: LogicalMessage) -> Result<(), AssembleError> {
        self.messages.push(m);
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

/// Why the stream could not be assembled into transactions.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A message could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A change could not be resolved against the relation cache.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Whoever took the transaction's parts failed.
    #[error("{0}")]
    Consumer(String),
    /// Messages arrived out of the protocol's order.
    #[error("the replication stream is out of order: {0}")]
    OutOfOrder(String),
    /// The spill file of a streamed transaction failed.
    #[error("cannot spill a streamed transaction to {path}: {source}; check stream.spill_dir and free disk space")]
    Spill {
        /// The spill file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Building {
    xid: Xid,
    origin: Option<String>,
    changes: Vec<Change>,
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
        out.extend(self.changes.into_iter().map(TxnPart::Change));
        out.extend(self.messages.into_iter().map(TxnPart::Message));
        out.push_back(TxnPart::Commit(header));
    }
}

/// Where streamed transactions wait for their commit.
#[derive(Debug, Clone)]
pub struct SpillSettings {
    /// Bytes of raw messages one streamed transaction keeps in memory before
    /// the rest goes to a file.
    pub memory_limit: usize,
    /// The directory for spill files.
    pub dir: PathBuf,
}

impl Default for SpillSettings {
    fn default() -> Self {
        SpillSettings {
            memory_limit: 64 << 20,
            dir: std::env::temp_dir(),
        }
    }
}

/// The raw messages of one in-progress streamed transaction.
#[derive(Debug)]
struct StreamBuffer {
    xid: Xid,
    memory: Vec<Bytes>,
    memory_bytes: usize,
    spill: Option<(PathBuf, BufWriter<std::fs::File>)>,
    /// Subtransactions that aborted; their messages are skipped at replay.
    aborted: HashSet<Xid>,
}

impl StreamBuffer {
    fn new(xid: Xid) -> Self {
        StreamBuffer {
            xid,
            memory: Vec::new(),
            memory_bytes: 0,
            spill: None,
            aborted: HashSet::new(),
        }
    }

    fn push(&mut self, msg: Bytes, settings: &SpillSettings) -> Result<(), AssembleError> {
        if self.spill.is_none() && self.memory_bytes + msg.len() > settings.memory_limit {
            let path = settings.dir.join(format!(
                "walgraph-stream-{}-{}-{}.spill",
                std::process::id(),
                self.xid,
                fastrand::u32(..)
            ));
            let spill_err = |source| AssembleError::Spill {
                path: path.clone(),
                source,
            };
            let file = std::fs::OpenOptions::new()
                .create_new(true)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(spill_err)?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            for m in self.memory.drain(..) {
                write_record(&mut w, &m).map_err(spill_err)?;
            }
            self.memory_bytes = 0;
            tracing::debug!(xid = self.xid, path = %path.display(), "streamed transaction spilled to disk");
            self.spill = Some((path, w));
        }
        match &mut self.spill {
            Some((path, w)) => write_record(w, &msg).map_err(|source| AssembleError::Spill {
                path: path.clone(),
                source,
            }),
            None => {
                self.memory_bytes += msg.len();
                self.memory.push(msg);
                Ok(())
            }
        }
    }

    /// Its kept messages, in order, for reading back once.
    fn into_reader(mut self) -> Result<SpillReader, AssembleError> {
        if let Some((path, w)) = self.spill.take() {
            use std::io::Seek;
            let spill_err = |source| AssembleError::Spill {
                path: path.clone(),
                source,
            };
            let mut file = match w.into_inner() {
                Ok(f) => f,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(spill_err(e.into_error()));
                }
            };
            if let Err(e) = file.seek(std::io::SeekFrom::Start(0)) {
                let _ = std::fs::remove_file(&path);
                return Err(spill_err(e));
            }
            return Ok(SpillReader::File {
                path,
                reader: BufReader::with_capacity(1 << 20, file),
            });
        }
        Ok(SpillReader::Memory(
            std::mem::take(&mut self.memory).into_iter(),
        ))
    }
}

/// Reads a streamed transaction's messages back; removes its spill file
/// when dropped.
#[derive(Debug)]
enum SpillReader {
    Memory(std::vec::IntoIter<Bytes>),
    File {
        path: PathBuf,
        reader: BufReader<std::fs::File>,
    },
}

impl SpillReader {
    fn next(&mut self) -> Result<Option<Bytes>, AssembleError> {
        match self {
            SpillReader::Memory(it) => Ok(it.next()),
            SpillReader::File { path, reader } => {
                read_record(reader).map_err(|source| AssembleError::Spill {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
}

impl Drop for SpillReader {
    fn drop(&mut self) {
        if let SpillReader::File { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
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

impl Drop for StreamBuffer {
    fn drop(&mut self) {
        if let Some((path, _)) = self.spill.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn write_record(w: &mut impl Write, m: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(m.len()).map_err(|_| std::io::Error::other("message over 4 GiB"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(m)
}

fn read_record(r: &mut impl Read) -> std::io::Result<Option<Bytes>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut buf)?;
    Ok(Some(Bytes::from(buf)))
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
            return Err(out_of_order(
                "a message was pushed before the previous transaction was taken",
            ));
        }
        let msg = self.decoder.decode(data)?;
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
            PgOutputMessage::StreamAbort { xid, subxid, .. } => {
                if xid == subxid {
                    self.streams.remove(&xid);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::encode::encode_message;
    use crate::decode::message::{PrepareBody, RelationBody, RelationColumn, TupleValue};
    use crate::decode::Value;

    fn relation(xid: Option<Xid>) -> PgOutputMessage {
        PgOutputMessage::Relation {
            xid,
            body: RelationBody {
                oid: 7,
                namespace: "s".into(),
                name: "t".into(),
                replica_identity: b'd',
                columns: vec![RelationColumn {
                    is_key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                }],
            },
        }
    }

    fn insert(xid: Option<Xid>, id: i64) -> PgOutputMessage {
        PgOutputMessage::Insert {
            xid,
            relation: 7,
            new: vec![TupleValue::Text(Bytes::from(id.to_string()))],
        }
    }

    /// A streamed transaction: two blocks, a subtransaction that aborts, then commit.
    fn streamed(a: &mut Assembler) -> Option<Transaction> {
        let mut out = None;
        let mut feed = |m: PgOutputMessage, in_stream: bool| {
            if let Some(t) = a.push_raw(&encode_message(&m, in_stream)).unwrap() {
                out = Some(t);
            }
        };
        feed(
            PgOutputMessage::StreamStart {
                xid: 10,
                first_segment: true,
            },
            false,
        );
        feed(relation(Some(10)), true);
        feed(insert(Some(10), 1), true);
        feed(insert(Some(11), 2), true);
        feed(PgOutputMessage::StreamStop, false);
        feed(
            PgOutputMessage::StreamStart {
                xid: 10,
                first_segment: false,
            },
            false,
        );
        feed(insert(Some(10), 3), true);
        feed(PgOutputMessage::StreamStop, false);
        feed(
            PgOutputMessage::StreamAbort {
                xid: 10,
                subxid: 11,
                abort: None,
            },
            false,
        );
        feed(
            PgOutputMessage::StreamCommit {
                xid: 10,
                flags: 0,
                commit_lsn: Lsn::new(100),
                end_lsn: Lsn::new(120),
                commit_time: 0,
            },
            false,
        );
        out
    }

    fn ids(t: &Transaction) -> Vec<Field> {
        t.changes
            .iter()
            .map(|c| c.new.as_ref().unwrap()[0].clone())
            .collect()
    }

    #[test]
    fn streamed_transactions_assemble_in_memory_and_through_a_spill_file() {
        let dir = std::env::temp_dir().join(format!("walgraph-unit-spill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for memory_limit in [usize::MAX, 0] {
            let mut a = Assembler::with_spill(SpillSettings {
                memory_limit,
                dir: dir.clone(),
            });
            let t = streamed(&mut a).expect("a committed transaction");
            assert_eq!(
                ids(&t),
                vec![Field::Value(Value::Int(1)), Field::Value(Value::Int(3))],
                "memory_limit {memory_limit}"
            );
            assert_eq!(t.end_lsn, Lsn::new(120));
            assert!(a.is_idle());
            // The committed stream's Relation message now serves later transactions.
            assert!(a.relations().get(7).is_ok());
        }
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "spill files are removed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_aborted_stream_leaves_nothing_and_its_schema_is_forgotten() {
        let mut a = Assembler::new();
        for (m, s) in [
            (
                PgOutputMessage::StreamStart {
                    xid: 5,
                    first_segment: true,
                },
                false,
            ),
            (relation(Some(5)), true),
            (insert(Some(5), 1), true),
            (PgOutputMessage::StreamStop, false),
            (
                PgOutputMessage::StreamAbort {
                    xid: 5,
                    subxid: 5,
                    abort: None,
                },
                false,
            ),
        ] {
            assert!(a.push_raw(&encode_message(&m, s)).unwrap().is_none());
        }
        assert!(a.is_idle());
        assert!(a.relations().get(7).is_err());
    }

    fn feed(a: &mut Assembler, msgs: Vec<PgOutputMessage>) -> Vec<Transaction> {
        msgs.into_iter()
            .filter_map(|m| a.push_raw(&encode_message(&m, false)).unwrap())
            .collect()
    }

    fn prepared(gid: &str, xid: u32, id: i64) -> Vec<PgOutputMessage> {
        let body = PrepareBody {
            flags: 0,
            prepare_lsn: Lsn::new(10),
            end_lsn: Lsn::new(20),
            prepare_time: 0,
            xid,
            gid: gid.into(),
        };
        vec![
            PgOutputMessage::BeginPrepare {
                prepare_lsn: Lsn::new(10),
                end_lsn: Lsn::new(20),
                prepare_time: 0,
                xid,
                gid: gid.into(),
            },
            relation(None),
            insert(None, id),
            PgOutputMessage::Prepare(body),
        ]
    }

    #[test]
    fn a_prepared_transaction_waits_for_its_commit_and_a_rolled_back_one_vanishes() {
        let mut a = Assembler::new();
        assert!(
            feed(&mut a, prepared("g1", 7, 1)).is_empty(),
            "nothing before COMMIT PREPARED"
        );
        assert!(feed(&mut a, prepared("g2", 8, 2)).is_empty());
        assert!(!a.is_idle(), "a prepared transaction is pending");
        let done = feed(
            &mut a,
            vec![
                PgOutputMessage::RollbackPrepared {
                    flags: 0,
                    prepare_end_lsn: Lsn::new(20),
                    rollback_end_lsn: Lsn::new(40),
                    prepare_time: 0,
                    rollback_time: 0,
                    xid: 8,
                    gid: "g2".into(),
                },
                PgOutputMessage::CommitPrepared {
                    flags: 0,
                    commit_lsn: Lsn::new(50),
                    end_lsn: Lsn::new(60),
                    commit_time: 0,
                    xid: 7,
                    gid: "g1".into(),
                },
            ],
        );
        assert_eq!(done.len(), 1);
        assert_eq!(
            (done[0].xid, done[0].end_lsn, done[0].changes.len()),
            (7, Lsn::new(60), 1)
        );
        assert!(a.is_idle());
        let err = a
            .push_raw(&encode_message(
                &PgOutputMessage::CommitPrepared {
                    flags: 0,
                    commit_lsn: Lsn::new(70),
                    end_lsn: Lsn::new(80),
                    commit_time: 0,
                    xid: 9,
                    gid: "unknown".into(),
                },
                false,
            ))
            .unwrap_err();
        assert!(
            err.to_string().contains("whose Prepare was never received"),
            "{err}"
        );
    }
}
