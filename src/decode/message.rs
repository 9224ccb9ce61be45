//! The `pgoutput` wire messages, protocol versions 1 to 4.
//!
//! Layouts follow <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.
//! Every read is bounds-checked: arbitrary bytes give a [`DecodeError`],
//! never a panic.
//!
//! Longer than most files because it is one thing: the message enum and the
//! one parser of every message kind, read side by side with the protocol page.

use bytes::Bytes;

use crate::lsn::Lsn;

/// Microseconds since 2000-01-01 00:00:00 UTC, the Postgres epoch.
pub type PgTimestamp = i64;

/// A transaction id as Postgres sends it.
pub type Xid = u32;

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field it announces.
    #[error(
        "pgoutput message `{tag}` is truncated: needed {needed} more bytes at offset {offset}"
    )]
    Truncated {
        /// The message tag, as a character.
        tag: char,
        /// Where the read started.
        offset: usize,
        /// How many bytes were missing.
        needed: usize,
    },
    /// The message tag is not one pgoutput sends.
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
    /// The message is empty.
    #[error("empty pgoutput message")]
    Empty,
    /// A field holds a value the protocol does not allow.
    #[error("pgoutput message `{tag}` is malformed: {what}")]
    Malformed {
        /// The message tag, as a character.
        tag: char,
        /// What is wrong.
        what: String,
    },
    /// Bytes were left over after the last field.
    #[error("pgoutput message `{tag}` has {extra} unexpected trailing bytes")]
    Trailing {
        /// The message tag, as a character.
        tag: char,
        /// How many bytes were left.
        extra: usize,
    },
}

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// SQL NULL.
    Null,
    /// A TOASTed value that the change did not touch: *unchanged*, not null.
    UnchangedToast,
    /// The value in its text output form.
    Text(Bytes),
    /// The value in its binary send form (only with the `binary` option).
    Binary(Bytes),
}

/// A column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Whether the column is part of the replica identity key.
    pub is_key: bool,
    /// The column name.
    pub name: String,
    /// The type's OID.
    pub type_oid: u32,
    /// The type modifier (`atttypmod`).
    pub type_modifier: i32,
}

/// A Relation message: the shape of a table, sent before its first change
/// and again after DDL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationBody {
    /// The table's OID.
    pub oid: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// The columns, in order.
    pub columns: Vec<RelationColumn>,
}

/// How an Update or Delete identifies the old row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// Only the replica identity key columns (`K`).
    Key,
    /// The whole old row (`O`, with `REPLICA IDENTITY FULL`).
    Tuple,
}

/// A decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// Start of a transaction.
    Begin {
        /// LSN of the commit record.
        final_lsn: Lsn,
        /// Commit time.
        commit_time: PgTimestamp,
        /// Transaction id.
        xid: Xid,
    },
    /// End of a transaction.
    Commit {
        /// Flags (unused, zero).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// LSN just past the commit record.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: PgTimestamp,
    },
    /// The origin of a replicated transaction.
    Origin {
        /// Commit LSN on the origin server.
        lsn: Lsn,
        /// Origin name.
        name: String,
    },
    /// The shape of a table.
    Relation {
        /// Set inside a streamed transaction.
        xid: Option<Xid>,
        /// The relation.
        body: RelationBody,
    },
    /// A data type's name (sent for non-builtin types such as enums).
    Type {
        /// Set inside a streamed transaction.
        xid: Option<Xid>,
        /// The type's OID.
        oid: u32,
        /// Schema name.
        namespace: String,
        /// Type name.
        name: String,
    },
    /// A new row.
    Insert {
        /// Set inside a streamed transaction.
        xid: Option<Xid>,
        /// The table's OID.
        relation: u32,
        /// The new row.
        new: Vec<TupleValue>,
    },
    /// A changed row.
    Update {
        /// Set inside a streamed transaction.
        xid: Option<Xid>,
        /// The table's OID.
        relation: u32,
        /// The old key or old row, when the server sends it.
        old: Option<(OldKind, Vec<TupleValue>)>,
        /// The new row.
        new: Vec<TupleValue>,
    },
    /// A removed row.
    Delete {
        /// Set inside a streamed transaction.
        xid: Option<Xid>,
        /// The table's OID.
        relation: u32,
        /// The old key or old row.
        old: (OldKind, Vec<TupleValue>),
    },
    /// `TRUNCATE` of one or more tables.
    Truncate {
        /// Set inside a streamed transaction.
        xid: Option<Xid>,
        /// `CASCADE` was given.
        cascade: bool,
        /// `RESTART IDENTITY` was given.
        restart_identity: bool,
        /// The tables' OIDs.
        relations: Vec<u32>,
    },
    /// A `pg_logical_emit_message` message.
    Message {
        /// Set inside a streamed transaction.
        xid: Option<Xid>,
        /// Part of a transaction (else emitted immediately).
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// The prefix given by the emitter.
        prefix: String,
        /// The content.
        content: Bytes,
    },
    /// A block of an in-progress transaction begins (v2+).
    StreamStart {
        /// Transaction id.
        xid: Xid,
        /// First block of this transaction.
        first_segment: bool,
    },
    /// A block of an in-progress transaction ends (v2+).
    StreamStop,
    /// A streamed transaction committed (v2+).
    StreamCommit {
        /// Transaction id.
        xid: Xid,
        /// Flags (unused, zero).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// LSN just past the commit record.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: PgTimestamp,
    },
    /// A streamed (sub)transaction aborted (v2+).
    StreamAbort {
        /// Top-level transaction id.
        xid: Xid,
        /// The aborted subtransaction (equal to `xid` for the whole transaction).
        subxid: Xid,
        /// Abort LSN and time (v4 with parallel streaming).
        abort: Option<(Lsn, PgTimestamp)>,
    },
    /// A two-phase transaction begins (v3+).
    BeginPrepare {
        /// LSN of the prepare record.
        prepare_lsn: Lsn,
        /// LSN just past the prepare record.
        end_lsn: Lsn,
        /// Prepare time.
        prepare_time: PgTimestamp,
        /// Transaction id.
        xid: Xid,
        /// Global transaction identifier.
        gid: String,
    },
    /// A two-phase transaction was prepared (v3+).
    Prepare(PrepareBody),
    /// A prepared transaction committed (v3+).
    CommitPrepared {
        /// Flags (unused, zero).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// LSN just past the commit record.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: PgTimestamp,
        /// Transaction id.
        xid: Xid,
        /// Global transaction identifier.
        gid: String,
    },
    /// A prepared transaction rolled back (v3+).
    RollbackPrepared {
        /// Flags (unused, zero).
        flags: u8,
        /// LSN just past the prepare record.
        prepare_end_lsn: Lsn,
        /// LSN just past the rollback record.
        rollback_end_lsn: Lsn,
        /// Prepare time.
        prepare_time: PgTimestamp,
        /// Rollback time.
        rollback_time: PgTimestamp,
        /// Transaction id.
        xid: Xid,
        /// Global transaction identifier.
        gid: String,
    },
    /// A streamed transaction was prepared (v3+).
    StreamPrepare(PrepareBody),
}

/// The fields shared by Prepare and Stream Prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareBody {
    /// Flags (unused, zero).
    pub flags: u8,
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// LSN just past the prepare record.
    pub end_lsn: Lsn,
    /// Prepare time.
    pub prepare_time: PgTimestamp,
    /// Transaction id.
    pub xid: Xid,
    /// Global transaction identifier.
    pub gid: String,
}

/// Decodes messages, tracking whether a streamed block is open (inside one,
/// data messages carry the transaction id first).
#[derive(Debug, Default, Clone)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    /// A decoder outside any streamed block.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one message (the payload of an XLogData frame).
    pub fn decode(&mut self, data: &Bytes) -> Result<PgOutputMessage, DecodeError> {
        let msg = decode_message(data, self.in_stream)?;
        match msg {
            PgOutputMessage::StreamStart { .. } => self.in_stream = true,
            PgOutputMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }
}

/// Decodes one message; `in_stream` says whether a Stream Start is open.
pub fn decode_message(data: &Bytes, in_stream: bool) -> Result<PgOutputMessage, DecodeError> {
    let tag = *data.first().ok_or(DecodeError::Empty)?;
    let mut r = Reader {
        data,
        pos: 1,
        tag: tag as char,
    };
    let streamed_xid = |r: &mut Reader<'_>| -> Result<Option<Xid>, DecodeError> {
        if in_stream {
            Ok(Some(r.u32()?))
        } else {
            Ok(None)
        }
    };
    let msg = match tag {
        b'B' => PgOutputMessage::Begin {
            final_lsn: r.lsn()?,
            commit_time: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => PgOutputMessage::Commit {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.i64()?,
        },
        b'O' => PgOutputMessage::Origin {
            lsn: r.lsn()?,
            name: r.cstr()?,
        },
        b'R' => {
            let xid = streamed_xid(&mut r)?;
            let oid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let n = usize::try_from(n)
                .map_err(|_| r.malformed(format!("negative column count {n}")))?;
            let mut columns = Vec::with_capacity(n.min(r.remaining()));
            for _ in 0..n {
                columns.push(RelationColumn {
                    is_key: r.u8()? & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            PgOutputMessage::Relation {
                xid,
                body: RelationBody {
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                },
            }
        }
        b'Y' => PgOutputMessage::Type {
            xid: streamed_xid(&mut r)?,
            oid: r.u32()?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        },
        b'I' => {
            let xid = streamed_xid(&mut r)?;
            let relation = r.u32()?;
            r.expect_byte(b'N')?;
            PgOutputMessage::Insert {
                xid,
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let xid = streamed_xid(&mut r)?;
            let relation = r.u32()?;
            let mut old = None;
            let mut marker = r.u8()?;
            if marker == b'K' || marker == b'O' {
                let kind = if marker == b'K' {
                    OldKind::Key
                } else {
                    OldKind::Tuple
                };
                old = Some((kind, r.tuple()?));
                marker = r.u8()?;
            }
            if marker != b'N' {
                return Err(r.malformed(format!(
                    "expected `N` before the new tuple, found {marker:#04x}"
                )));
            }
            PgOutputMessage::Update {
                xid,
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let xid = streamed_xid(&mut r)?;
            let relation = r.u32()?;
            let kind = match r.u8()? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Tuple,
                other => {
                    return Err(r.malformed(format!("expected `K` or `O`, found {other:#04x}")))
                }
            };
            PgOutputMessage::Delete {
                xid,
                relation,
                old: (kind, r.tuple()?),
            }
        }
        b'T' => {
            let xid = streamed_xid(&mut r)?;
            let n = r.i32()?;
            let n = usize::try_from(n)
                .map_err(|_| r.malformed(format!("negative relation count {n}")))?;
            let options = r.u8()?;
            let mut relations = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            PgOutputMessage::Truncate {
                xid,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relations,
            }
        }
        b'M' => {
            let xid = streamed_xid(&mut r)?;
            let transactional = r.u8()? & 1 == 1;
            let lsn = r.lsn()?;
            let prefix = r.cstr()?;
            let len = r.i32()?;
            let len = usize::try_from(len)
                .map_err(|_| r.malformed(format!("negative content length {len}")))?;
            PgOutputMessage::Message {
                xid,
                transactional,
                lsn,
                prefix,
                content: r.bytes(len)?,
            }
        }
        b'S' => PgOutputMessage::StreamStart {
            xid: r.u32()?,
            first_segment: r.u8()? == 1,
        },
        b'E' => PgOutputMessage::StreamStop,
        b'c' => PgOutputMessage::StreamCommit {
            xid: r.u32()?,
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.i64()?,
        },
        b'A' => {
            let xid = r.u32()?;
            let subxid = r.u32()?;
            // The abort LSN and time follow only with `streaming = parallel` (v4).
            let abort = if r.remaining() > 0 {
                Some((r.lsn()?, r.i64()?))
            } else {
                None
            };
            PgOutputMessage::StreamAbort { xid, subxid, abort }
        }
        b'b' => PgOutputMessage::BeginPrepare {
            prepare_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            prepare_time: r.i64()?,
            xid: r.u32()?,
            gid: r.cstr()?,
        },
        b'P' => PgOutputMessage::Prepare(r.prepare_body()?),
        b'K' => PgOutputMessage::CommitPrepared {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.i64()?,
            xid: r.u32()?,
            gid: r.cstr()?,
        },
        b'r' => PgOutputMessage::RollbackPrepared {
            flags: r.u8()?,
            prepare_end_lsn: r.lsn()?,
            rollback_end_lsn: r.lsn()?,
            prepare_time: r.i64()?,
            rollback_time: r.i64()?,
            xid: r.u32()?,
            gid: r.cstr()?,
        },
        b'p' => PgOutputMessage::StreamPrepare(r.prepare_body()?),
        other => return Err(DecodeError::UnknownTag(other)),
    };
    if r.remaining() != 0 {
        return Err(DecodeError::Trailing {
            tag: r.tag,
            extra: r.remaining(),
        });
    }
    Ok(msg)
}

/// A bounds-checked cursor over one message.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    tag: char,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn malformed(&self, what: String) -> DecodeError {
        DecodeError::Malformed {
            tag: self.tag,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                tag: self.tag,
                offset: self.pos,
                needed: n - self.remaining(),
            });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn::new(u64::from_be_bytes(self.array()?)))
    }

    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n)?;
        Ok(self.data.slice(start..start + n))
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated {
                tag: self.tag,
                offset: self.pos,
                needed: 1,
            })?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| self.malformed("a name is not valid UTF-8".into()))?
            .to_string();
        self.pos += end + 1;
        Ok(s)
    }

    fn expect_byte(&mut self, want: u8) -> Result<(), DecodeError> {
        let got = self.u8()?;
        if got != want {
            return Err(self.malformed(format!("expected `{}`, found {got:#04x}", want as char)));
        }
        Ok(())
    }

    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.i16()?;
        let n =
            usize::try_from(n).map_err(|_| self.malformed(format!("negative column count {n}")))?;
        let mut out = Vec::with_capacity(n.min(self.remaining()));
        for _ in 0..n {
            let v = match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32()?;
                    let len = usize::try_from(len)
                        .map_err(|_| self.malformed(format!("negative value length {len}")))?;
                    let bytes = self.bytes(len)?;
                    if kind == b't' {
                        TupleValue::Text(bytes)
                    } else {
                        TupleValue::Binary(bytes)
                    }
                }
                other => {
                    return Err(self.malformed(format!("unknown tuple column kind {other:#04x}")))
                }
            };
            out.push(v);
        }
        Ok(out)
    }

    fn prepare_body(&mut self) -> Result<PrepareBody, DecodeError> {
        Ok(PrepareBody {
            flags: self.u8()?,
            prepare_lsn: self.lsn()?,
            end_lsn: self.lsn()?,
            prepare_time: self.i64()?,
            xid: self.u32()?,
            gid: self.cstr()?,
        })
    }
}
