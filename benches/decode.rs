//! Decode throughput: pgoutput bytes → messages, and messages → typed rows
//! of committed transactions, for narrow and wide rows.
//!
//! `cargo bench --bench decode`; figures in docs/benchmarks.md.

#![allow(missing_docs)]

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use walgraph::decode::encode::encode_message;
use walgraph::decode::message::{PgOutputMessage, RelationBody, RelationColumn, TupleValue};
use walgraph::decode::{decode_message, value::oid};
use walgraph::lsn::Lsn;
use walgraph::transactions::Assembler;

/// A relation of `ncols` columns: an int key, then alternating text, int,
/// numeric and timestamptz columns.
fn shape(ncols: usize) -> (PgOutputMessage, Vec<u32>) {
    let types: Vec<u32> = (0..ncols)
        .map(|i| match i {
            0 => oid::INT4,
            i if i % 4 == 1 => oid::TEXT,
            i if i % 4 == 2 => oid::INT8,
            i if i % 4 == 3 => oid::NUMERIC,
            _ => oid::TIMESTAMPTZ,
        })
        .collect();
    let columns = types
        .iter()
        .enumerate()
        .map(|(i, t)| RelationColumn {
            is_key: i == 0,
            name: format!("c{i}"),
            type_oid: *t,
            type_modifier: -1,
        })
        .collect();
    let rel = PgOutputMessage::Relation {
        xid: None,
        body: RelationBody {
            oid: 16384,
            namespace: "public".into(),
            name: "bench".into(),
            replica_identity: b'd',
            columns,
        },
    };
    (rel, types)
}

fn insert(types: &[u32], id: i64) -> PgOutputMessage {
    let new = types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let text = match *t {
                oid::INT4 => id.to_string(),
                oid::TEXT => format!("some text value {i:04}"),
                oid::INT8 => (id * 1_000_003).to_string(),
                oid::NUMERIC => "12345.678900".to_string(),
                _ => "2024-02-29 13:14:15.123456+00".to_string(),
            };
            TupleValue::Text(Bytes::from(text))
        })
        .collect();
    PgOutputMessage::Insert {
        xid: None,
        relation: 16384,
        new,
    }
}

/// One transaction of `rows` inserts, as the server would send it.
fn transaction(ncols: usize, rows: i64) -> Vec<Bytes> {
    let (rel, types) = shape(ncols);
    let mut out = vec![
        encode_message(
            &PgOutputMessage::Begin {
                final_lsn: Lsn::new(1000),
                commit_time: 0,
                xid: 1,
            },
            false,
        ),
        encode_message(&rel, false),
    ];
    out.extend((0..rows).map(|id| encode_message(&insert(&types, id), false)));
    out.push(encode_message(
        &PgOutputMessage::Commit {
            flags: 0,
            commit_lsn: Lsn::new(1000),
            end_lsn: Lsn::new(1100),
            commit_time: 0,
        },
        false,
    ));
    out
}

fn bench(c: &mut Criterion) {
    for (name, ncols) in [("narrow_3_columns", 3), ("wide_30_columns", 30)] {
        let msgs = transaction(ncols, 1000);
        let bytes: u64 = msgs.iter().map(|m| m.len() as u64).sum();
        let mut g = c.benchmark_group(format!("decode/{name}"));
        g.throughput(Throughput::Elements(msgs.len() as u64));
        g.bench_function("messages", |b| {
            b.iter(|| {
                for m in &msgs {
                    black_box(decode_message(m, false).ok());
                }
            })
        });
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function("typed_transactions", |b| {
            b.iter_batched(
                Assembler::new,
                |mut a| {
                    let mut last = None;
                    for m in &msgs {
                        if let Ok(Some(t)) = a.push_raw(m) {
                            last = Some(t);
                        }
                    }
                    black_box(last)
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
