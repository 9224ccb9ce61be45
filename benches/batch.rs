//! Batch builder throughput: decoded changes → graph operations → `UNWIND`
//! statements with their parameters (what walgraph does between the decoder
//! and Neo4j), for inserts with a relationship and for updates.
//!
//! `cargo bench --bench batch`; figures in docs/benchmarks.md.

#![allow(missing_docs, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use walgraph::batch::Batcher;
use walgraph::config::Config;
use walgraph::decode::encode::encode_message;
use walgraph::decode::message::{PgOutputMessage, RelationBody, RelationColumn, TupleValue};
use walgraph::decode::value::oid;
use walgraph::lsn::Lsn;
use walgraph::mapping::map::Mapper;
use walgraph::mapping::{compile, Catalog, Mapping, TableInfo};
use walgraph::transactions::{Assembler, Change};

const MAPPING: &str = r#"
[[node]]
table = "s.groups"
label = "Group"

[[node]]
table = "s.items"
label = "Item"

[[relationship]]
table = "s.items"
type = "IN_GROUP"
from = { label = "Item", columns = ["id"] }
to = { label = "Group", columns = ["grp"] }
"#;

fn mapping() -> Mapping {
    let cfg = Config::parse(MAPPING).expect("mapping");
    let mut catalog = Catalog::new();
    let table = |cols: &[&str]| TableInfo {
        columns: cols.iter().map(|c| c.to_string()).collect(),
        primary_key: vec!["id".into()],
        unique: vec![vec!["id".into()]],
        replica_identity: 'd',
        ..TableInfo::default()
    };
    catalog.insert("s.groups".into(), table(&["id", "name"]));
    catalog.insert("s.items".into(), table(&["id", "grp", "val", "payload"]));
    compile(&cfg.nodes, &cfg.relationships, &catalog).expect("compiles")
}

/// 1000 changes to `s.items`: inserts, or updates of the same rows.
fn changes(update: bool) -> Vec<Change> {
    let rel = PgOutputMessage::Relation {
        xid: None,
        body: RelationBody {
            oid: 16385,
            namespace: "s".into(),
            name: "items".into(),
            replica_identity: b'd',
            columns: [
                ("id", oid::INT8),
                ("grp", oid::INT8),
                ("val", oid::INT8),
                ("payload", oid::TEXT),
            ]
            .iter()
            .map(|(n, t)| RelationColumn {
                is_key: *n == "id",
                name: n.to_string(),
                type_oid: *t,
                type_modifier: -1,
            })
            .collect(),
        },
    };
    let row = |id: i64| {
        vec![
            TupleValue::Text(Bytes::from(id.to_string())),
            TupleValue::Text(Bytes::from((id % 100).to_string())),
            TupleValue::Text(Bytes::from((id * 7).to_string())),
            TupleValue::Text(Bytes::from("x".repeat(100))),
        ]
    };
    let mut msgs = vec![
        PgOutputMessage::Begin {
            final_lsn: Lsn::new(1000),
            commit_time: 0,
            xid: 1,
        },
        rel,
    ];
    for id in 0..1000 {
        msgs.push(if update {
            PgOutputMessage::Update {
                xid: None,
                relation: 16385,
                old: None,
                new: row(id),
            }
        } else {
            PgOutputMessage::Insert {
                xid: None,
                relation: 16385,
                new: row(id),
            }
        });
    }
    msgs.push(PgOutputMessage::Commit {
        flags: 0,
        commit_lsn: Lsn::new(1000),
        end_lsn: Lsn::new(1100),
        commit_time: 0,
    });
    let mut a = Assembler::new();
    let mut txn = None;
    for m in msgs {
        if let Some(t) = a.push_raw(&encode_message(&m, false)).expect("decodes") {
            txn = Some(t);
        }
    }
    txn.expect("a transaction").changes
}

fn bench(c: &mut Criterion) {
    let mapping = Arc::new(mapping());
    let mapper = Mapper::new(Arc::clone(&mapping));
    for (name, update) in [("inserts_with_relationship", false), ("updates", true)] {
        let changes = changes(update);
        let mut g = c.benchmark_group(format!("batch/{name}"));
        g.throughput(Throughput::Elements(changes.len() as u64));
        g.bench_function("map_batch_render", |b| {
            b.iter(|| {
                let mut batcher = Batcher::new();
                let groups: Vec<_> = changes
                    .iter()
                    .map(|ch| {
                        let mut ops = Vec::new();
                        mapper
                            .map_change(ch, Lsn::new(1000), &mut ops)
                            .expect("maps");
                        ops
                    })
                    .collect();
                batcher.push_transaction(groups, Lsn::new(1100));
                black_box(batcher.take(&mapping))
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
