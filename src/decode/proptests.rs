//! Property tests: every message round-trips through encode and decode, and
//! no byte string makes the decoder panic.

use bytes::Bytes;
use proptest::prelude::*;

use super::encode::encode_message;
use super::message::*;
use crate::lsn::Lsn;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_ éß]{0,12}"
}

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn::new)
}

fn tuple() -> impl Strategy<Value = Vec<TupleValue>> {
    prop::collection::vec(
        prop_oneof![
            Just(TupleValue::Null),
            Just(TupleValue::UnchangedToast),
            prop::collection::vec(any::<u8>(), 0..16)
                .prop_map(|v| TupleValue::Text(Bytes::from(v))),
            prop::collection::vec(any::<u8>(), 0..16)
                .prop_map(|v| TupleValue::Binary(Bytes::from(v))),
        ],
        0..6,
    )
}

fn old_kind() -> impl Strategy<Value = OldKind> {
    prop_oneof![Just(OldKind::Key), Just(OldKind::Tuple)]
}

fn prepare_body() -> impl Strategy<Value = PrepareBody> {
    (
        any::<u8>(),
        lsn(),
        lsn(),
        any::<i64>(),
        any::<u32>(),
        name(),
    )
        .prop_map(
            |(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| PrepareBody {
                flags,
                prepare_lsn,
                end_lsn,
                prepare_time,
                xid,
                gid,
            },
        )
}

/// Any message; `in_stream` decides whether data messages carry an xid.
fn message(in_stream: bool) -> impl Strategy<Value = PgOutputMessage> {
    let sx = move |x: u32| if in_stream { Some(x) } else { None };
    let column = (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(is_key, name, type_oid, type_modifier)| RelationColumn {
            is_key,
            name,
            type_oid,
            type_modifier,
        },
    );
    prop_oneof![
        (lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            PgOutputMessage::Begin {
                final_lsn,
                commit_time,
                xid,
            }
        }),
        (any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time)| {
                PgOutputMessage::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                }
            }
        ),
        (lsn(), name()).prop_map(|(lsn, name)| PgOutputMessage::Origin { lsn, name }),
        (
            any::<u32>(),
            any::<u32>(),
            name(),
            name(),
            any::<u8>(),
            prop::collection::vec(column, 0..5)
        )
            .prop_map(
                move |(x, oid, namespace, name, replica_identity, columns)| {
                    PgOutputMessage::Relation {
                        xid: sx(x),
                        body: RelationBody {
                            oid,
                            namespace,
                            name,
                            replica_identity,
                            columns,
                        },
                    }
                }
            ),
        (any::<u32>(), any::<u32>(), name(), name()).prop_map(move |(x, oid, namespace, name)| {
            PgOutputMessage::Type {
                xid: sx(x),
                oid,
                namespace,
                name,
            }
        }),
        (any::<u32>(), any::<u32>(), tuple()).prop_map(move |(x, relation, new)| {
            PgOutputMessage::Insert {
                xid: sx(x),
                relation,
                new,
            }
        }),
        (
            any::<u32>(),
            any::<u32>(),
            prop::option::of((old_kind(), tuple())),
            tuple()
        )
            .prop_map(move |(x, relation, old, new)| PgOutputMessage::Update {
                xid: sx(x),
                relation,
                old,
                new
            }),
        (any::<u32>(), any::<u32>(), old_kind(), tuple()).prop_map(move |(x, relation, k, t)| {
            PgOutputMessage::Delete {
                xid: sx(x),
                relation,
                old: (k, t),
            }
        }),
        (
            any::<u32>(),
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(any::<u32>(), 0..5)
        )
            .prop_map(move |(x, cascade, restart_identity, relations)| {
                PgOutputMessage::Truncate {
                    xid: sx(x),
                    cascade,
                    restart_identity,
                    relations,
                }
            }),
        (
            any::<u32>(),
            any::<bool>(),
            lsn(),
            name(),
            prop::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(move |(x, transactional, lsn, prefix, content)| {
                PgOutputMessage::Message {
                    xid: sx(x),
                    transactional,
                    lsn,
                    prefix,
                    content: Bytes::from(content),
                }
            }),
        (any::<u32>(), any::<bool>())
            .prop_map(|(xid, first_segment)| PgOutputMessage::StreamStart { xid, first_segment }),
        Just(PgOutputMessage::StreamStop),
        (any::<u32>(), any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
            |(xid, flags, commit_lsn, end_lsn, commit_time)| {
                PgOutputMessage::StreamCommit {
                    xid,
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                }
            }
        ),
        (
            any::<u32>(),
            any::<u32>(),
            prop::option::of((lsn(), any::<i64>()))
        )
            .prop_map(|(xid, subxid, abort)| PgOutputMessage::StreamAbort {
                xid,
                subxid,
                abort
            }),
        (lsn(), lsn(), any::<i64>(), any::<u32>(), name()).prop_map(
            |(prepare_lsn, end_lsn, prepare_time, xid, gid)| {
                PgOutputMessage::BeginPrepare {
                    prepare_lsn,
                    end_lsn,
                    prepare_time,
                    xid,
                    gid,
                }
            }
        ),
        prepare_body().prop_map(PgOutputMessage::Prepare),
        prepare_body().prop_map(PgOutputMessage::StreamPrepare),
        (
            any::<u8>(),
            lsn(),
            lsn(),
            any::<i64>(),
            any::<u32>(),
            name()
        )
            .prop_map(|(flags, commit_lsn, end_lsn, commit_time, xid, gid)| {
                PgOutputMessage::CommitPrepared {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                    xid,
                    gid,
                }
            }),
        (
            any::<u8>(),
            lsn(),
            lsn(),
            any::<i64>(),
            any::<i64>(),
            any::<u32>(),
            name()
        )
            .prop_map(
                |(
                    flags,
                    prepare_end_lsn,
                    rollback_end_lsn,
                    prepare_time,
                    rollback_time,
                    xid,
                    gid,
                )| {
                    PgOutputMessage::RollbackPrepared {
                        flags,
                        prepare_end_lsn,
                        rollback_end_lsn,
                        prepare_time,
                        rollback_time,
                        xid,
                        gid,
                    }
                }
            ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_message_round_trips(msg in any::<bool>().prop_flat_map(message)) {
        // Data messages built for a stream block carry an xid and must be
        // decoded as inside one.
        let with_xid = matches!(
            &msg,
            PgOutputMessage::Relation { xid: Some(_), .. }
                | PgOutputMessage::Type { xid: Some(_), .. }
                | PgOutputMessage::Insert { xid: Some(_), .. }
                | PgOutputMessage::Update { xid: Some(_), .. }
                | PgOutputMessage::Delete { xid: Some(_), .. }
                | PgOutputMessage::Truncate { xid: Some(_), .. }
                | PgOutputMessage::Message { xid: Some(_), .. }
        );
        let bytes = encode_message(&msg, with_xid);
        prop_assert_eq!(decode_message(&bytes, with_xid), Ok(msg));
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256), in_stream in any::<bool>()) {
        let _ = decode_message(&Bytes::from(data), in_stream);
    }

    #[test]
    fn damaged_messages_give_errors_not_panics(
        msg in message(false),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let bytes = encode_message(&msg, false);
        // Truncated anywhere before the end: always an error (except where
        // the v4 fields of Stream Abort begin: that prefix is the v2 form).
        let at = cut.index(bytes.len());
        let v2_abort = matches!(msg, PgOutputMessage::StreamAbort { .. }) && at == 9;
        prop_assert!(v2_abort || decode_message(&bytes.slice(..at), false).is_err());
        // One byte changed: an error or some message, never a panic.
        let mut v = bytes.to_vec();
        let i = flip.index(v.len());
        v[i] = byte;
        let _ = decode_message(&Bytes::from(v), false);
    }
}

#[test]
fn stream_abort_with_and_without_v4_fields() {
    for abort in [None, Some((Lsn::new(7), 9))] {
        let msg = PgOutputMessage::StreamAbort {
            xid: 1,
            subxid: 2,
            abort,
        };
        assert_eq!(decode_message(&encode_message(&msg, false), false), Ok(msg));
    }
}
