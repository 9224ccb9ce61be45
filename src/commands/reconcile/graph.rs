//! Reading back by key: graph values as keys and decoded values, and which
//! graph keys still have a row in Postgres.
//!
//! Invariant: keys compare as text in the table's key order on both sides,
//! so a key read from the graph finds its row whatever the column types.

use std::collections::HashSet;
use std::sync::Arc;

use neo4rs::{BoltList, BoltType};

use crate::batch::cypher::to_bolt;
use crate::decode::Value;
use crate::mapping::map::{GraphOp, Key, NodeRef};
use crate::pipeline::copy::Table;
use crate::source::sql::{quote_literal, quote_qualified};

/// Whether a property as found in the graph is the mapped value (a NULL
/// value is an absent property).
pub(super) fn prop_matches(actual: Option<&BoltType>, want: &Value) -> bool {
    match want {
        Value::Null => actual.is_none(),
        v => actual == Some(&to_bolt(v)),
    }
}

pub(super) fn bolt_list(items: impl Iterator<Item = BoltType>) -> BoltType {
    BoltType::List(BoltList::from(items.collect::<Vec<_>>()))
}

/// A node reference from a label and key values read from the graph.
pub(super) fn node_ref(label: &Arc<str>, key: &[BoltType]) -> Option<NodeRef> {
    key.iter()
        .map(bolt_value)
        .collect::<Option<Vec<_>>>()
        .map(|values| NodeRef {
            label: Arc::clone(label),
            key: Key(values),
        })
}

/// The node a row's operations upsert.
pub(super) fn own_node(ops: &[GraphOp]) -> Option<&NodeRef> {
    ops.iter().find_map(|op| match op {
        GraphOp::UpsertNode { node, .. } => Some(node),
        _ => None,
    })
}

/// A key as comparable text.
pub(super) fn key_text(key: &[BoltType]) -> String {
    key.iter()
        .map(|v| match v {
            BoltType::String(s) => s.value.clone(),
            BoltType::Integer(i) => i.value.to_string(),
            BoltType::Float(f) => f.value.to_string(),
            BoltType::Boolean(b) => b.value.to_string(),
            other => format!("{other:?}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A key value read from the graph as a decoded value (the types keys have).
pub(super) fn bolt_value(v: &BoltType) -> Option<Value> {
    Some(match v {
        BoltType::String(s) => Value::Text(s.value.clone()),
        BoltType::Integer(i) => Value::Int(i.value),
        BoltType::Float(f) => Value::Float(f.value),
        BoltType::Boolean(b) => Value::Bool(b.value),
        _ => return None,
    })
}

/// Which of `keys` (as read from the graph) still have a row.
pub(super) async fn rows_present(
    c: &tokio_postgres::Client,
    t: &Table,
    keys: &[Vec<BoltType>],
) -> anyhow::Result<HashSet<String>> {
    let mut present = HashSet::new();
    if keys.is_empty() {
        return Ok(present);
    }
    let tuples: Vec<String> = keys
        .iter()
        .map(|k| {
            let vals: Vec<String> = k
                .iter()
                .zip(&t.key)
                .map(|(v, col)| {
                    format!(
                        "{}::{}",
                        quote_literal(&key_text(std::slice::from_ref(v))),
                        col.2
                    )
                })
                .collect();
            format!("({})", vals.join(", "))
        })
        .collect();
    let cols: Vec<&str> = t.key.iter().map(|k| k.0.as_str()).collect();
    let sql = format!(
        "SELECT {} FROM {} WHERE ({}) IN ({})",
        cols.iter()
            .map(|c| format!("{c}::text"))
            .collect::<Vec<_>>()
            .join(", "),
        quote_qualified(&t.name),
        cols.join(", "),
        tuples.join(", ")
    );
    for m in c.simple_query(&sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let key: Vec<String> = (0..cols.len())
                .map(|i| r.get(i).unwrap_or_default().to_string())
                .collect();
            present.insert(key.join(", "));
        }
    }
    Ok(present)
}
