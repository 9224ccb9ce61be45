//! The assembler on hand-made message streams: streamed, spilled, aborted
//! and prepared transactions.

use bytes::Bytes;

use super::*;
use crate::config::SpillSettings;
use crate::decode::encode::encode_message;
use crate::decode::message::{PrepareBody, RelationBody, RelationColumn, TupleValue};
use crate::decode::PgOutputMessage;
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
fn a_spill_file_has_no_name_while_it_is_written_so_a_kill_cannot_leak_it() {
    let dir = std::env::temp_dir().join(format!("walgraph-unit-unlinked-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut a = Assembler::with_spill(SpillSettings {
        memory_limit: 0,
        dir: dir.clone(),
    });
    for (m, in_stream) in [
        (
            PgOutputMessage::StreamStart {
                xid: 10,
                first_segment: true,
            },
            false,
        ),
        (relation(Some(10)), true),
        (insert(Some(10), 1), true),
        (insert(Some(10), 2), true),
        (PgOutputMessage::StreamStop, false),
    ] {
        assert!(a
            .push_raw(&encode_message(&m, in_stream))
            .unwrap()
            .is_none());
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "the open spill file is already unlinked: a SIGKILL now leaves nothing behind"
    );
    let t = a
        .push_raw(&encode_message(
            &PgOutputMessage::StreamCommit {
                xid: 10,
                flags: 0,
                commit_lsn: Lsn::new(100),
                end_lsn: Lsn::new(120),
                commit_time: 0,
            },
            false,
        ))
        .unwrap()
        .expect("the committed transaction");
    assert_eq!(
        ids(&t),
        vec![Field::Value(Value::Int(1)), Field::Value(Value::Int(2))],
        "read back from the unnamed file"
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
        (insert(Some(5), 2), true),
        (PgOutputMessage::StreamStop, false),
        (
            PgOutputMessage::StreamAbort {
                xid: 5,
                subxid: 6,
                abort: Some((Lsn::new(0x90), 1_000)),
            },
            false,
        ),
    ] {
        assert!(a.push_raw(&encode_message(&m, s)).unwrap().is_none());
    }
    assert!(
        a.take_rollbacks().is_empty(),
        "a subtransaction's abort is no rollback of the transaction"
    );
    let abort = PgOutputMessage::StreamAbort {
        xid: 5,
        subxid: 5,
        abort: Some((Lsn::new(0xa0), 2_000)),
    };
    let raw = encode_message(&abort, false);
    assert!(a.push_raw(&raw).unwrap().is_none());
    assert!(a.is_idle());
    assert!(a.relations().get(7).is_err());
    let rolled = a.take_rollbacks();
    assert_eq!(rolled.len(), 1, "{rolled:?}");
    assert_eq!(rolled[0].xid, 5);
    assert_eq!(rolled[0].abort, Some((Lsn::new(0xa0), 2_000)));
    assert_eq!(rolled[0].messages, 3, "the relation and two inserts");
    assert!(rolled[0].bytes > 0);
    assert!(a.take_rollbacks().is_empty(), "taken once");
    // An abort of a transaction never seen (its streaming began before the
    // slot's position) reports nothing.
    assert!(a.push_raw(&raw).unwrap().is_none());
    assert!(a.take_rollbacks().is_empty());
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

#[test]
fn a_transaction_s_messages_keep_their_place_among_its_changes() {
    let message = |content: &str| PgOutputMessage::Message {
        xid: None,
        transactional: true,
        lsn: Lsn::new(50),
        prefix: "walgraph".into(),
        content: Bytes::from(content.to_string()),
    };
    let mut a = Assembler::new();
    let msgs = vec![
        PgOutputMessage::Begin {
            final_lsn: Lsn::new(100),
            commit_time: 0,
            xid: 5,
        },
        relation(None),
        insert(None, 1),
        message("between"),
        insert(None, 2),
        message("last"),
        PgOutputMessage::Commit {
            flags: 0,
            commit_lsn: Lsn::new(100),
            end_lsn: Lsn::new(120),
            commit_time: 0,
        },
    ];
    let mut parts = Vec::new();
    for m in msgs {
        a.push(&encode_message(&m, false)).unwrap();
        while let Some(p) = a.next_part().unwrap() {
            parts.push(match p {
                TxnPart::Begin(_) => "begin".to_string(),
                TxnPart::Change(c) => format!("{:?}", c.new.unwrap()[0]),
                TxnPart::Message(m) => m.content,
                TxnPart::Commit(_) => "commit".to_string(),
            });
        }
    }
    assert_eq!(
        parts,
        [
            "begin",
            "Value(Int(1))",
            "between",
            "Value(Int(2))",
            "last",
            "commit"
        ]
    );
}
