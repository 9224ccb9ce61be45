//! The inverse of the decoder: [`PgOutputMessage`] → bytes, as the server
//! would send them. Used by round-trip property tests, the fuzz corpus and
//! the decode benchmark; walgraph itself never encodes pgoutput.
//!
//! Invariant: `decode(encode(m)) == m` for every message (the property tests).

use bytes::{BufMut, Bytes, BytesMut};

use super::message::{OldKind, PgOutputMessage, PrepareBody, TupleValue};

/// Encodes a message. `in_stream` adds the transaction id to data messages,
/// as inside a Stream Start/Stop block.
pub fn encode_message(msg: &PgOutputMessage, in_stream: bool) -> Bytes {
    let mut b = BytesMut::new();
    let xid = |b: &mut BytesMut, xid: Option<u32>| {
        if in_stream {
            b.put_u32(xid.unwrap_or(0));
        }
    };
    match msg {
        PgOutputMessage::Begin {
            final_lsn,
            commit_time,
            xid: x,
        } => {
            b.put_u8(b'B');
            b.put_u64(final_lsn.raw());
            b.put_i64(*commit_time);
            b.put_u32(*x);
        }
        PgOutputMessage::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            b.put_u8(b'C');
            b.put_u8(*flags);
            b.put_u64(commit_lsn.raw());
            b.put_u64(end_lsn.raw());
            b.put_i64(*commit_time);
        }
        PgOutputMessage::Origin { lsn, name } => {
            b.put_u8(b'O');
            b.put_u64(lsn.raw());
            cstr(&mut b, name);
        }
        PgOutputMessage::Relation { xid: x, body } => {
            b.put_u8(b'R');
            xid(&mut b, *x);
            b.put_u32(body.oid);
            cstr(&mut b, &body.namespace);
            cstr(&mut b, &body.name);
            b.put_u8(body.replica_identity);
            b.put_i16(i16::try_from(body.columns.len()).unwrap_or(i16::MAX));
            for c in &body.columns {
                b.put_u8(u8::from(c.is_key));
                cstr(&mut b, &c.name);
                b.put_u32(c.type_oid);
                b.put_i32(c.type_modifier);
            }
        }
        PgOutputMessage::Type {
            xid: x,
            oid,
            namespace,
            name,
        } => {
            b.put_u8(b'Y');
            xid(&mut b, *x);
            b.put_u32(*oid);
            cstr(&mut b, namespace);
            cstr(&mut b, name);
        }
        PgOutputMessage::Insert {
            xid: x,
            relation,
            new,
        } => {
            b.put_u8(b'I');
            xid(&mut b, *x);
            b.put_u32(*relation);
            b.put_u8(b'N');
            tuple(&mut b, new);
        }
        PgOutputMessage::Update {
            xid: x,
            relation,
            old,
            new,
        } => {
            b.put_u8(b'U');
            xid(&mut b, *x);
            b.put_u32(*relation);
            if let Some((kind, t)) = old {
                b.put_u8(if *kind == OldKind::Key { b'K' } else { b'O' });
                tuple(&mut b, t);
            }
            b.put_u8(b'N');
            tuple(&mut b, new);
        }
        PgOutputMessage::Delete {
            xid: x,
            relation,
            old: (kind, t),
        } => {
            b.put_u8(b'D');
            xid(&mut b, *x);
            b.put_u32(*relation);
            b.put_u8(if *kind == OldKind::Key { b'K' } else { b'O' });
            tuple(&mut b, t);
        }
        PgOutputMessage::Truncate {
            xid: x,
            cascade,
            restart_identity,
            relations,
        } => {
            b.put_u8(b'T');
            xid(&mut b, *x);
            b.put_i32(i32::try_from(relations.len()).unwrap_or(i32::MAX));
            b.put_u8(u8::from(*cascade) | (u8::from(*restart_identity) << 1));
            for r in relations {
                b.put_u32(*r);
            }
        }
        PgOutputMessage::Message {
            xid: x,
            transactional,
            lsn,
            prefix,
            content,
        } => {
            b.put_u8(b'M');
            xid(&mut b, *x);
            b.put_u8(u8::from(*transactional));
            b.put_u64(lsn.raw());
            cstr(&mut b, prefix);
            b.put_i32(i32::try_from(content.len()).unwrap_or(i32::MAX));
            b.put_slice(content);
        }
        PgOutputMessage::StreamStart {
            xid: x,
            first_segment,
        } => {
            b.put_u8(b'S');
            b.put_u32(*x);
            b.put_u8(u8::from(*first_segment));
        }
        PgOutputMessage::StreamStop => b.put_u8(b'E'),
        PgOutputMessage::StreamCommit {
            xid: x,
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            b.put_u8(b'c');
            b.put_u32(*x);
            b.put_u8(*flags);
            b.put_u64(commit_lsn.raw());
            b.put_u64(end_lsn.raw());
            b.put_i64(*commit_time);
        }
        PgOutputMessage::StreamAbort {
            xid: x,
            subxid,
            abort,
        } => {
            b.put_u8(b'A');
            b.put_u32(*x);
            b.put_u32(*subxid);
            if let Some((lsn, t)) = abort {
                b.put_u64(lsn.raw());
                b.put_i64(*t);
            }
        }
        PgOutputMessage::BeginPrepare {
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid: x,
            gid,
        } => {
            b.put_u8(b'b');
            b.put_u64(prepare_lsn.raw());
            b.put_u64(end_lsn.raw());
            b.put_i64(*prepare_time);
            b.put_u32(*x);
            cstr(&mut b, gid);
        }
        PgOutputMessage::Prepare(p) => prepare(&mut b, b'P', p),
        PgOutputMessage::StreamPrepare(p) => prepare(&mut b, b'p', p),
        PgOutputMessage::CommitPrepared {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
            xid: x,
            gid,
        } => {
            b.put_u8(b'K');
            b.put_u8(*flags);
            b.put_u64(commit_lsn.raw());
            b.put_u64(end_lsn.raw());
            b.put_i64(*commit_time);
            b.put_u32(*x);
            cstr(&mut b, gid);
        }
        PgOutputMessage::RollbackPrepared {
            flags,
            prepare_end_lsn,
            rollback_end_lsn,
            prepare_time,
            rollback_time,
            xid: x,
            gid,
        } => {
            b.put_u8(b'r');
            b.put_u8(*flags);
            b.put_u64(prepare_end_lsn.raw());
            b.put_u64(rollback_end_lsn.raw());
            b.put_i64(*prepare_time);
            b.put_i64(*rollback_time);
            b.put_u32(*x);
            cstr(&mut b, gid);
        }
    }
    b.freeze()
}

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn tuple(b: &mut BytesMut, t: &[TupleValue]) {
    b.put_i16(i16::try_from(t.len()).unwrap_or(i16::MAX));
    for v in t {
        match v {
            TupleValue::Null => b.put_u8(b'n'),
            TupleValue::UnchangedToast => b.put_u8(b'u'),
            TupleValue::Text(s) | TupleValue::Binary(s) => {
                b.put_u8(if matches!(v, TupleValue::Text(_)) {
                    b't'
                } else {
                    b'b'
                });
                b.put_i32(i32::try_from(s.len()).unwrap_or(i32::MAX));
                b.put_slice(s);
            }
        }
    }
}

fn prepare(b: &mut BytesMut, tag: u8, p: &PrepareBody) {
    b.put_u8(tag);
    b.put_u8(p.flags);
    b.put_u64(p.prepare_lsn.raw());
    b.put_u64(p.end_lsn.raw());
    b.put_i64(p.prepare_time);
    b.put_u32(p.xid);
    cstr(b, &p.gid);
}
