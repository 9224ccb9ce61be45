//! Cypher text and Bolt parameters for graph operations.
//!
//! Every statement is `UNWIND $rows AS row …` over one group of operations.
//! Labels, types and property names were validated by the mapping and are
//! backtick-quoted here; values only ever travel in `$rows`.
//!
//! Every write is guarded by `_lsn`: a node or relationship is changed only
//! when its `_lsn` is absent (a placeholder) or not newer than the change's
//! commit LSN, so a replayed older change never overwrites a newer state.
//!
//! Invariant: no value is ever formatted into Cypher text.

use neo4rs::{
    BoltBoolean, BoltBytes, BoltFloat, BoltInteger, BoltList, BoltMap, BoltNull, BoltString,
    BoltType,
};

use crate::decode::Value;
use crate::mapping::map::{Key, Props};
use crate::mapping::quote;

/// A pattern property map matching a key: ``{`id`: row.k[0]}``.
pub(crate) fn key_pattern(props: &[std::sync::Arc<str>], param: &str) -> String {
    let parts: Vec<String> = props
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}: row.{param}[{i}]", quote(p)))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// ` USING INDEX SEEK var:Label(p, …)`: seek the key in its index whatever
/// the statistics say. Without it, a plan made while the label was empty or
/// small (a fresh mapping, the first seconds of a load) scans the whole
/// index once per row and filters (the scan looked free at 0 rows), and
/// stays cached for seconds while the label grows — measured: single
/// `DETACH DELETE` statements of 500 rows taking 1–2 s instead of 20–70 ms
/// (docs/benchmarks.md). A plain `USING INDEX` hint still allows the scan.
fn index_hint(var: &str, label_or_type: &str, props: &[std::sync::Arc<str>]) -> String {
    let props: Vec<String> = props.iter().map(|p| quote(p)).collect();
    format!(
        " USING INDEX SEEK {var}:{}({})",
        quote(label_or_type),
        props.join(", ")
    )
}

fn arcs(cols: &[String]) -> Vec<std::sync::Arc<str>> {
    cols.iter()
        .map(|c| std::sync::Arc::from(c.as_str()))
        .collect()
}

/// Starts every statement: keep the cached plan. The hints fix each plan's
/// shape, so a replan can only cost time; Neo4j replans a statement when its
/// label's statistics change (every ~10 s while a label grows), and a wave
/// of replans stalled batches by 100–300 ms (docs/benchmarks.md).
const PREFIX: &str = "CYPHER replan=skip ";

/// Guard: the entity is a placeholder or not newer than the change.
fn guard(var: &str) -> String {
    format!("({var}._lsn IS NULL OR {var}._lsn <= row.lsn)")
}

/// Upsert nodes: rows `{k, p, lsn}`.
pub fn upsert_nodes(label: &str, key_props: &[std::sync::Arc<str>]) -> String {
    format!(
        "{PREFIX}UNWIND $rows AS row MERGE (n:{} {}) WITH n, row WHERE {} SET n += row.p, n._lsn = row.lsn",
        quote(label),
        key_pattern(key_props, "k"),
        guard("n")
    )
}

/// Upsert nodes whose row changed its key: rows `{k, s, sl, p, lsn}`. The
/// new node first takes every property of the node under the old key `s`
/// (unless that one is newer than `sl`), with the new key, so a column the
/// change did not send (an unchanged TOASTed value) keeps its value.
pub fn move_nodes(label: &str, key_props: &[std::sync::Arc<str>]) -> String {
    let new_key: Vec<String> = key_props
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}: row.k[{i}]", quote(p)))
        .collect();
    format!(
        "{PREFIX}UNWIND $rows AS row OPTIONAL MATCH (o:{l} {}){} WHERE o._lsn IS NULL OR o._lsn <= row.sl \
         WITH row, o {{.*, {}}} AS kept \
         MERGE (n:{l} {}) WITH n, row, kept WHERE {} \
         SET n += coalesce(kept, {{}}) SET n += row.p, n._lsn = row.lsn",
        key_pattern(key_props, "s"),
        index_hint("o", label, key_props),
        new_key.join(", "),
        key_pattern(key_props, "k"),
        guard("n"),
        l = quote(label),
    )
}

/// Create placeholder nodes unless they exist: rows `{k}`.
pub fn ensure_nodes(label: &str, key_props: &[std::sync::Arc<str>]) -> String {
    format!(
        "{PREFIX}UNWIND $rows AS row MERGE (n:{} {})",
        quote(label),
        key_pattern(key_props, "k")
    )
}

/// Create placeholder nodes unless they exist, each only where the guard of
/// its owner's coalesced-away edge would have let it: the owner exists and
/// passes the guard, or does not exist and `w` (the batch creates it
/// first): rows `{k, o, w, lsn}`.
pub fn ensure_end_nodes(
    node: (&str, &[std::sync::Arc<str>]),
    owner: (&str, &[std::sync::Arc<str>]),
) -> String {
    format!(
        "{PREFIX}UNWIND $rows AS row OPTIONAL MATCH (a:{} {}){} \
         WITH row, a WHERE CASE WHEN a IS NULL THEN row.w ELSE {} END MERGE (n:{} {})",
        quote(owner.0),
        key_pattern(owner.1, "o"),
        index_hint("a", owner.0, owner.1),
        guard("a"),
        quote(node.0),
        key_pattern(node.1, "k")
    )
}

/// Detach `n` (matched, guard passed) from its relationships not newer
/// than `row.lsn`, then delete it, or keep it as a placeholder (its key
/// alone, no `_lsn`) where a newer relationship holds it.
fn detach_older(key_props: &[std::sync::Arc<str>]) -> String {
    let key: Vec<String> = key_props.iter().map(|p| format!(".{}", quote(p))).collect();
    format!(
        "OPTIONAL MATCH (n)-[r]-() WHERE {} DELETE r WITH DISTINCT n, row \
         FOREACH (_ IN CASE WHEN EXISTS {{ (n)--() }} THEN [1] ELSE [] END | SET n = n {{{}}}) \
         WITH n WHERE NOT EXISTS {{ (n)--() }} DELETE n",
        guard("r"),
        key.join(", ")
    )
}

/// Delete nodes with their relationships: rows `{k, lsn}`. A relationship
/// newer than the delete (stamped by a snapshot chunk or a repair after
/// it) stays, and keeps the node as a placeholder.
pub fn delete_nodes(label: &str, key_props: &[std::sync::Arc<str>]) -> String {
    format!(
        "{PREFIX}UNWIND $rows AS row MATCH (n:{} {}){} WHERE {} {}",
        quote(label),
        key_pattern(key_props, "k"),
        index_hint("n", label, key_props),
        guard("n"),
        detach_older(key_props)
    )
}

/// Replace a row-owned edge: rows `{o, t, lsn}` (`t` null: no edge).
pub fn set_owned_rels(
    rel_type: &str,
    own_label: &str,
    own_key: &[std::sync::Arc<str>],
    other_label: &str,
    other_key: &[std::sync::Arc<str>],
    own_is_from: bool,
) -> String {
    let t = quote(rel_type);
    let (old_pat, new_pat) = if own_is_from {
        (format!("(a)-[old:{t}]->()"), format!("(a)-[r:{t}]->(b)"))
    } else {
        (format!("()-[old:{t}]->(a)"), format!("(b)-[r:{t}]->(a)"))
    };
    format!(
        "{PREFIX}UNWIND $rows AS row MATCH (a:{} {}){} WHERE {} \
         OPTIONAL MATCH {old_pat} DELETE old \
         WITH DISTINCT a, row WHERE row.t IS NOT NULL \
         MERGE (b:{} {}) MERGE {new_pat} SET r._lsn = row.lsn",
        quote(own_label),
        key_pattern(own_key, "o"),
        index_hint("a", own_label, own_key),
        guard("a"),
        quote(other_label),
        key_pattern(other_key, "t"),
    )
}

/// Merge join-table edges: rows `{f, t, k, p, lsn}`. With key identity an
/// edge of the same key between other nodes is moved (deleted, then merged).
pub fn merge_edges(
    rel_type: &str,
    from: (&str, &[std::sync::Arc<str>]),
    to: (&str, &[std::sync::Arc<str>]),
    edge_key: Option<&[String]>,
) -> String {
    let t = quote(rel_type);
    let ends = format!(
        "{PREFIX}UNWIND $rows AS row MERGE (a:{} {}) MERGE (b:{} {}) ",
        quote(from.0),
        key_pattern(from.1, "f"),
        quote(to.0),
        key_pattern(to.1, "t")
    );
    match edge_key {
        None => format!(
            "{ends}MERGE (a)-[r:{t}]->(b) WITH r, row WHERE {} SET r += row.p, r._lsn = row.lsn",
            guard("r")
        ),
        Some(cols) => {
            let props = arcs(cols);
            let kp = key_pattern(&props, "k");
            let hint = index_hint("old", rel_type, &props);
            // The edge moves with its properties: a column the change did
            // not send (an unchanged TOASTed value) keeps its value.
            format!(
                "{ends}WITH a, b, row OPTIONAL MATCH (x)-[old:{t} {kp}]->(y){hint} WHERE NOT (x = a AND y = b) AND {} \
                 WITH a, b, row, collect(old) AS olds \
                 WITH a, b, row, olds, [o IN olds | o {{.*}}] AS kept FOREACH (o IN olds | DELETE o) \
                 MERGE (a)-[r:{t} {kp}]->(b) WITH r, row, kept WHERE {} \
                 SET r += coalesce(kept[0], {{}}) SET r += row.p, r._lsn = row.lsn",
                guard("old"),
                guard("r")
            )
        }
    }
}

/// Delete join-table edges by their ends: rows `{f, t, lsn}`.
pub fn delete_edges_by_ends(
    rel_type: &str,
    from: (&str, &[std::sync::Arc<str>]),
    to: (&str, &[std::sync::Arc<str>]),
) -> String {
    format!(
        "{PREFIX}UNWIND $rows AS row MATCH (a:{} {})-[r:{}]->(b:{} {}){}{} WHERE {} DELETE r",
        quote(from.0),
        key_pattern(from.1, "f"),
        quote(rel_type),
        quote(to.0),
        key_pattern(to.1, "t"),
        index_hint("a", from.0, from.1),
        index_hint("b", to.0, to.1),
        guard("r")
    )
}

/// Delete join-table edges by their key: rows `{k, lsn}`.
pub fn delete_edges_by_key(rel_type: &str, key_cols: &[String]) -> String {
    let props = arcs(key_cols);
    format!(
        "{PREFIX}UNWIND $rows AS row MATCH ()-[r:{} {}]->(){} WHERE {} DELETE r",
        quote(rel_type),
        key_pattern(&props, "k"),
        index_hint("r", rel_type, &props),
        guard("r")
    )
}

/// Delete every node of a label (TRUNCATE) as `delete_nodes` deletes one:
/// one row `{lsn}`.
pub fn truncate_label(label: &str, key_props: &[std::sync::Arc<str>]) -> String {
    format!(
        "{PREFIX}UNWIND $rows AS row MATCH (n:{}) WHERE {} {}",
        quote(label),
        guard("n"),
        detach_older(key_props)
    )
}

/// Delete every relationship of a type not newer than the TRUNCATE: one
/// row `{lsn}`.
pub fn truncate_type(rel_type: &str) -> String {
    format!(
        "{PREFIX}UNWIND $rows AS row MATCH ()-[r:{}]->() WHERE {} DELETE r",
        quote(rel_type),
        guard("r")
    )
}

/// The versions of a history label's nodes just upserted: rows `{k, lsn,
/// at}`. Where the node holds this change (its `_lsn` is the row's) and no
/// version of its key is newer (a replay adds none): the version of this
/// transaction, if an earlier statement of it made one, takes the node's
/// state now (its state at commit, once the transaction's last statement
/// ran); else the open version is closed at `at` and a new one made of the
/// node's properties, valid from `at` (null: now). Versions left by a
/// delete of the key are linked again.
pub fn open_versions(label: &str, key_props: &[std::sync::Arc<str>]) -> String {
    let v = quote(&crate::mapping::events::version_label(label));
    let kp = key_pattern(key_props, "k");
    format!(
        "{PREFIX}UNWIND $rows AS row MATCH (n:{l} {kp}){hint} \
         WHERE n._lsn = row.lsn AND NOT EXISTS {{ MATCH (x:{v} {kp}) WHERE x._lsn > row.lsn }} \
         WITH n, row, coalesce(row.at, datetime()) AS at \
         OPTIONAL MATCH (s:{v} {kp}) WHERE s._lsn = row.lsn \
         WITH n, row, at, collect(s) AS same \
         OPTIONAL MATCH (o:{v} {kp}) WHERE o.validTo IS NULL AND o._lsn < row.lsn \
         WITH n, row, at, same, collect(o) AS open FOREACH (o IN open | SET o.validTo = at) \
         WITH n, row, at, same OPTIONAL MATCH (d:{v} {kp}) WHERE NOT EXISTS {{ (d)<-[:VERSION]-() }} \
         WITH n, row, at, same, collect(d) AS left FOREACH (d IN left | MERGE (n)-[:VERSION]->(d)) \
         FOREACH (s IN same | SET s = properties(n) SET s.validFrom = at, s._lsn = row.lsn) \
         WITH n, row, at, same WHERE size(same) = 0 \
         CREATE (n)-[:VERSION]->(v:{v}) SET v = properties(n), v.validFrom = at, v._lsn = row.lsn",
        l = quote(label),
        hint = index_hint("n", label, key_props),
    )
}

/// Closes the open version of each deleted node at `at`: rows `{k, lsn,
/// at}`. A version the same transaction made (its state before the delete
/// was never seen by anyone else) is removed instead. Nothing happens where
/// a version of the key is newer than the delete (a replay).
pub fn close_versions(label: &str, key_props: &[std::sync::Arc<str>]) -> String {
    let v = quote(&crate::mapping::events::version_label(label));
    let kp = key_pattern(key_props, "k");
    format!(
        "{PREFIX}UNWIND $rows AS row WITH row WHERE NOT EXISTS {{ MATCH (x:{v} {kp}) WHERE x._lsn > row.lsn }} \
         OPTIONAL MATCH (s:{v} {kp}) WHERE s._lsn = row.lsn \
         WITH row, collect(s) AS same FOREACH (s IN same | DETACH DELETE s) \
         WITH row MATCH (o:{v} {kp}) WHERE o.validTo IS NULL AND o._lsn < row.lsn \
         SET o.validTo = coalesce(row.at, datetime())",
    )
}

/// Closes every open version of a label (TRUNCATE), as [`close_versions`]
/// closes one, key by key: one row `{lsn, at}`.
pub fn close_all_versions(label: &str, key_props: &[std::sync::Arc<str>]) -> String {
    let v = quote(&crate::mapping::events::version_label(label));
    let same_key: Vec<String> = key_props
        .iter()
        .map(|p| format!("x.{q} = s.{q}", q = quote(p)))
        .collect();
    let same_key = if same_key.is_empty() {
        "true".to_string()
    } else {
        same_key.join(" AND ")
    };
    format!(
        "{PREFIX}UNWIND $rows AS row OPTIONAL MATCH (s:{v}) WHERE s._lsn = row.lsn \
         AND NOT EXISTS {{ MATCH (x:{v}) WHERE {same_key} AND x._lsn > row.lsn }} \
         WITH row, collect(s) AS same FOREACH (s IN same | DETACH DELETE s) \
         WITH row MATCH (o:{v}) WHERE o.validTo IS NULL AND o._lsn < row.lsn \
         SET o.validTo = coalesce(row.at, datetime())",
    )
}

/// Converts a value to its Bolt form. Neo4j properties cannot hold maps,
/// lists with nulls or mixed types, or lists of byte arrays: JSON stays
/// text, and such arrays are stored as JSON text (bytes as hex).
pub fn to_bolt(v: &Value) -> BoltType {
    match v {
        Value::Null => BoltType::Null(BoltNull),
        Value::Bool(b) => BoltType::Boolean(BoltBoolean::new(*b)),
        Value::Int(i) => BoltType::Integer(BoltInteger::new(*i)),
        Value::Float(f) => BoltType::Float(BoltFloat::new(*f)),
        Value::Numeric(s) | Value::Text(s) | Value::Uuid(s) | Value::Json(s) | Value::Inet(s) => {
            BoltType::String(BoltString::new(s))
        }
        Value::Bytes(b) => BoltType::Bytes(BoltBytes::new(bytes::Bytes::copy_from_slice(b))),
        Value::Date(d) => BoltType::from(*d),
        Value::Time(t) => BoltType::from(*t),
        Value::TimeTz(t, off) => match chrono::FixedOffset::east_opt(*off) {
            Some(o) => BoltType::from((*t, o)),
            None => BoltType::from(*t),
        },
        Value::Timestamp(t) => BoltType::from(*t),
        Value::TimestampTz(t) => BoltType::from(*t),
        Value::Interval(iv) => BoltType::Duration(neo4rs::BoltDuration::new(
            BoltInteger::new(iv.months),
            BoltInteger::new(iv.days),
            BoltInteger::new(iv.micros.div_euclid(1_000_000)),
            BoltInteger::new(iv.micros.rem_euclid(1_000_000) * 1000),
        )),
        Value::Array(items) => {
            let homogeneous = items
                .windows(2)
                .all(|w| std::mem::discriminant(&w[0]) == std::mem::discriminant(&w[1]));
            let storable = items.iter().all(|i| {
                !matches!(
                    i,
                    Value::Null | Value::Array(_) | Value::Json(_) | Value::Bytes(_)
                )
            });
            if homogeneous && storable {
                BoltType::List(BoltList::from(
                    items.iter().map(to_bolt).collect::<Vec<_>>(),
                ))
            } else {
                BoltType::String(BoltString::new(&v.to_plain_json().to_string()))
            }
        }
    }
}

/// A key as a Bolt list.
pub fn key_list(k: &Key) -> BoltType {
    BoltType::List(BoltList::from(k.0.iter().map(to_bolt).collect::<Vec<_>>()))
}

/// Properties as a Bolt map.
pub fn props_map(props: &Props) -> BoltType {
    let mut m = BoltMap::with_capacity(props.len());
    for (name, v) in props {
        m.put(BoltString::new(name), to_bolt(v));
    }
    BoltType::Map(m)
}

/// Builds one `$rows` element from named fields.
pub fn row(fields: Vec<(&str, BoltType)>) -> BoltType {
    let mut m = BoltMap::with_capacity(fields.len());
    for (k, v) in fields {
        m.put(BoltString::new(k), v);
    }
    BoltType::Map(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn names_are_quoted_and_values_are_parameters() {
        let q = upsert_nodes("User", &[Arc::from("id")]);
        assert_eq!(
            q,
            "CYPHER replan=skip UNWIND $rows AS row MERGE (n:`User` {`id`: row.k[0]}) WITH n, row WHERE (n._lsn IS NULL OR n._lsn <= row.lsn) SET n += row.p, n._lsn = row.lsn"
        );
        assert!(truncate_label("a`b", &[Arc::from("id")]).contains("`a``b`"));
    }

    #[test]
    fn arrays_with_nulls_become_json_text() {
        let v = Value::Array(vec![Value::Int(1), Value::Null]);
        assert_eq!(to_bolt(&v), BoltType::String(BoltString::new("[1,null]")));
        let v = Value::Array(vec![Value::Int(1), Value::Int(2)]);
        assert!(matches!(to_bolt(&v), BoltType::List(_)));
    }
}
