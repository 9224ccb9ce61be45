//! A second opinion: messages captured from a real server are decoded by
//! walgraph and by the independent `pg_walstream` parser, and must agree.

use std::time::Duration;

use bytes::Bytes;
use pg_walstream::protocol::{LogicalReplicationMessage as W, LogicalReplicationParser, TupleData};
use walgraph::decode::message::{OldKind, TupleValue};
use walgraph::decode::{Decoder, PgOutputMessage as P};
use walgraph::lsn::Lsn;
use walgraph::source::{ConnInfo, ReplicationEvent, ReplicationStream, StartOptions};

use crate::support::{Fixture, SERVICES};

fn ours_tuple(t: &[TupleValue]) -> String {
    t.iter()
        .map(|v| match v {
            TupleValue::Null => "n".to_string(),
            TupleValue::UnchangedToast => "u".to_string(),
            TupleValue::Text(b) => format!("t:{}", String::from_utf8_lossy(b)),
            TupleValue::Binary(b) => format!("b:{}", String::from_utf8_lossy(b)),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn theirs_tuple(t: &TupleData) -> String {
    t.columns
        .iter()
        .map(|c| {
            if c.is_null() {
                "n".to_string()
            } else if c.is_unchanged() {
                "u".to_string()
            } else {
                let kind = if c.is_binary() { "b" } else { "t" };
                format!("{kind}:{}", c.as_str().unwrap_or_default())
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn ours(m: &P) -> String {
    let x = |xid: &Option<u32>| xid.map_or(String::new(), |x| format!("x={x} "));
    match m {
        P::Begin {
            final_lsn,
            commit_time,
            xid,
        } => format!("B {} {commit_time} {xid}", final_lsn.raw()),
        P::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => format!(
            "C {flags} {} {} {commit_time}",
            commit_lsn.raw(),
            end_lsn.raw()
        ),
        P::Origin { lsn, name } => format!("O {} {name}", lsn.raw()),
        P::Relation { xid, body } => format!(
            "{}R {} {} {} {} [{}]",
            x(xid),
            body.oid,
            body.namespace,
            body.name,
            body.replica_identity,
            body.columns
                .iter()
                .map(|c| format!(
                    "{}:{}:{}:{}",
                    u8::from(c.is_key),
                    c.name,
                    c.type_oid,
                    c.type_modifier
                ))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        P::Type {
            xid,
            oid,
            namespace,
            name,
        } => format!("{}Y {oid} {namespace} {name}", x(xid)),
        P::Insert { xid, relation, new } => format!("{}I {relation} {}", x(xid), ours_tuple(new)),
        P::Update {
            xid,
            relation,
            old,
            new,
        } => {
            let old = old.as_ref().map_or("-".to_string(), |(k, t)| {
                format!(
                    "{}{}",
                    if *k == OldKind::Key { 'K' } else { 'O' },
                    ours_tuple(t)
                )
            });
            format!("{}U {relation} {old} {}", x(xid), ours_tuple(new))
        }
        P::Delete { xid, relation, old } => format!(
            "{}D {relation} {}{}",
            x(xid),
            if old.0 == OldKind::Key { 'K' } else { 'O' },
            ours_tuple(&old.1)
        ),
        P::Truncate {
            xid,
            cascade,
            restart_identity,
            relations,
        } => format!(
            "{}T {} {relations:?}",
            x(xid),
            u8::from(*cascade) | (u8::from(*restart_identity) << 1)
        ),
        P::Message {
            xid,
            transactional,
            lsn,
            prefix,
            content,
        } => format!(
            "{}M {} {} {prefix} {}",
            x(xid),
            u8::from(*transactional),
            lsn.raw(),
            String::from_utf8_lossy(content)
        ),
        P::StreamStart { xid, first_segment } => format!("S {xid} {first_segment}"),
        P::StreamStop => "E".into(),
        P::StreamCommit {
            xid,
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => format!(
            "c {xid} {flags} {} {} {commit_time}",
            commit_lsn.raw(),
            end_lsn.raw()
        ),
        P::StreamAbort { xid, subxid, .. } => format!("A {xid} {subxid}"),
        other => format!("{other:?}"),
    }
}

fn theirs(m: &W, xid: Option<u32>) -> String {
    let x = xid.map_or(String::new(), |x| format!("x={x} "));
    match m {
        W::Begin {
            final_lsn,
            timestamp,
            xid,
        } => format!("B {final_lsn} {timestamp} {xid}"),
        W::Commit {
            flags,
            commit_lsn,
            end_lsn,
            timestamp,
        } => format!("C {flags} {commit_lsn} {end_lsn} {timestamp}"),
        W::Origin {
            origin_lsn,
            origin_name,
        } => format!("O {origin_lsn} {origin_name}"),
        W::Relation {
            relation_id,
            namespace,
            relation_name,
            replica_identity,
            columns,
        } => format!(
            "{x}R {relation_id} {namespace} {relation_name} {replica_identity} [{}]",
            columns
                .iter()
                .map(|c| format!(
                    "{}:{}:{}:{}",
                    u8::from(c.is_key()),
                    c.name,
                    c.type_id,
                    c.type_modifier
                ))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        W::Type {
            type_id,
            namespace,
            type_name,
        } => format!("{x}Y {type_id} {namespace} {type_name}"),
        W::Insert { relation_id, tuple } => format!("{x}I {relation_id} {}", theirs_tuple(tuple)),
        W::Update {
            relation_id,
            old_tuple,
            new_tuple,
            key_type,
        } => {
            let old = match (old_tuple, key_type) {
                (Some(t), Some(k)) => format!("{k}{}", theirs_tuple(t)),
                _ => "-".to_string(),
            };
            format!("{x}U {relation_id} {old} {}", theirs_tuple(new_tuple))
        }
        W::Delete {
            relation_id,
            old_tuple,
            key_type,
        } => format!("{x}D {relation_id} {key_type}{}", theirs_tuple(old_tuple)),
        W::Truncate {
            relation_ids,
            flags,
        } => format!("{x}T {flags} {relation_ids:?}"),
        W::Message {
            flags,
            lsn,
            prefix,
            content,
        } => format!(
            "{x}M {} {lsn} {prefix} {}",
            flags & 1,
            String::from_utf8_lossy(content)
        ),
        W::StreamStart { xid, first_segment } => format!("S {xid} {first_segment}"),
        W::StreamStop => "E".into(),
        W::StreamCommit {
            xid,
            flags,
            commit_lsn,
            end_lsn,
            timestamp,
        } => format!("c {xid} {flags} {commit_lsn} {end_lsn} {timestamp}"),
        W::StreamAbort {
            xid,
            subtransaction_xid,
            ..
        } => format!("A {xid} {subtransaction_xid}"),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walgraph_and_an_independent_parser_agree_on_captured_messages() {
    let _shared = SERVICES.read().await;
    let ddl = "CREATE TYPE {s}.mood AS ENUM ('sad', 'happy');
        CREATE TABLE {s}.a (id int PRIMARY KEY, t text, m {s}.mood, big text);
        CREATE TABLE {s}.b (id int PRIMARY KEY, v numeric); ALTER TABLE {s}.b REPLICA IDENTITY FULL;";
    let mapping = "[[node]]\ntable = \"{s}.a\"\nlabel = \"{p}A\"\n[[node]]\ntable = \"{s}.b\"\nlabel = \"{p}B\"\n";
    let fx = Fixture::new(ddl, mapping).await;
    fx.setup().await;
    for stmt in [
        "INSERT INTO {s}.a VALUES (1, 'x', 'happy', NULL), (2, NULL, 'sad', NULL)",
        "INSERT INTO {s}.a SELECT 3, 'toast', 'sad', string_agg(md5(g::text), '') FROM generate_series(1, 3000) g",
        "UPDATE {s}.a SET t = 'y' WHERE id = 3",
        "UPDATE {s}.a SET id = 4 WHERE id = 1",
        "DELETE FROM {s}.a WHERE id = 2",
        "INSERT INTO {s}.b VALUES (1, 1.5), (2, 2.5)",
        "UPDATE {s}.b SET v = 3.5 WHERE id = 1",
        "DELETE FROM {s}.b WHERE id = 2",
        "SELECT pg_logical_emit_message(false, 'oracle', 'plain')",
        "BEGIN; SELECT pg_logical_emit_message(true, 'oracle', 'in txn'); INSERT INTO {s}.b VALUES (3, 0); COMMIT",
        "INSERT INTO {s}.b SELECT g, g FROM generate_series(10, 5000) g",
        "BEGIN; INSERT INTO {s}.b SELECT g, g FROM generate_series(5001, 9000) g; SAVEPOINT s; INSERT INTO {s}.b SELECT g, g FROM generate_series(9001, 12000) g; ROLLBACK TO s; COMMIT",
        "TRUNCATE {s}.a, {s}.b",
    ] {
        fx.sql(stmt).await;
    }

    let info = ConnInfo::parse(&fx.env.pg_url).expect("url");
    let mut stream = ReplicationStream::connect(&info).await.expect("connect");
    let proto_version = stream.negotiate_proto_version(None).await.expect("version");
    stream
        .start(&StartOptions {
            slot: fx.config.postgres.slot.clone(),
            publications: vec![fx.config.postgres.publication.clone()],
            start: Lsn::ZERO,
            proto_version,
            messages: true,
            streaming: true,
            two_phase: false,
        })
        .await
        .expect("start");
    let mut captured: Vec<Bytes> = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), stream.next_event()).await {
            Ok(Ok(ReplicationEvent::XLogData { data, .. })) => captured.push(data),
            Ok(Ok(ReplicationEvent::Keepalive { .. })) => {}
            Ok(Ok(ReplicationEvent::End)) | Err(_) => break,
            Ok(Err(e)) => panic!("stream failed: {e}"),
        }
    }
    let _ = stream.finish(Lsn::ZERO).await;

    let mut decoder = Decoder::new();
    let mut parser = LogicalReplicationParser::with_protocol_version(proto_version);
    let mut kinds = std::collections::BTreeSet::new();
    for (i, raw) in captured.iter().enumerate() {
        let a = decoder
            .decode(raw)
            .unwrap_or_else(|e| panic!("walgraph cannot decode message {i}: {e}"));
        let b = parser
            .parse_wal_message(raw)
            .unwrap_or_else(|e| panic!("pg_walstream cannot decode message {i}: {e}"));
        let ours = ours(&a);
        let theirs = theirs(
            &b.message,
            b.xid.filter(|_| b.is_streaming && ours.starts_with("x=")),
        );
        assert_eq!(ours, theirs, "message {i} of {}", captured.len());
        kinds.insert(raw[0] as char);
    }
    // The workload must have produced every kind it is meant to cover.
    for k in ['B', 'C', 'R', 'Y', 'I', 'U', 'D', 'T', 'M', 'S', 'E', 'c'] {
        assert!(
            kinds.contains(&k),
            "no `{k}` message was captured; saw {kinds:?}"
        );
    }
    fx.cleanup().await;
}
