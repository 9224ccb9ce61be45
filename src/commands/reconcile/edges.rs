//! Reconciling a join table: each row's edge (by its two ends, or by its own
//! key) against the relationships of its type, both ways — rows without a
//! matching edge, then edges without a row.
//!
//! Invariant: an edge is compared and repaired as the mapping makes it from
//! the row (an update without an old row), stamped like every repair.

use std::collections::HashMap;
use std::sync::Arc;

use neo4rs::{query, BoltList, BoltMap, BoltType};

use super::graph::{bolt_list, bolt_value, key_text, node_ref, prop_matches, rows_present};
use super::pager::Pager;
use super::{note, Ctx, TableReport};
use crate::batch::cypher::{key_pattern, to_bolt};
use crate::batch::Batcher;
use crate::commands::progress::Progress;
use crate::lsn::Lsn;
use crate::mapping::map::{GraphOp, Key, NodeRef, Props};
use crate::mapping::{quote, RelKind, RelTarget};
use crate::pipeline::copy::Table;

/// How a relationship type's edges are identified and read back.
struct Shape {
    /// Edges are told apart by their two ends (else by their own key).
    pair_identity: bool,
    /// The key properties of the start and end labels.
    from_props: Vec<String>,
    to_props: Vec<String>,
    /// The edge's own key properties.
    edge_props: Vec<Arc<str>>,
}

impl Shape {
    fn of(rel: &RelTarget) -> Self {
        let strings = |v: &[Arc<str>]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        Shape {
            pair_identity: matches!(
                rel.kind,
                RelKind::Edge {
                    pair_identity: true
                }
            ),
            from_props: strings(&rel.from.key_props),
            to_props: strings(&rel.to.key_props),
            edge_props: rel
                .key_columns
                .iter()
                .map(|c| Arc::from(c.as_str()))
                .collect(),
        }
    }
}

/// One join table's relationship type: an edge per row.
pub(super) async fn reconcile_edges(
    cx: &Ctx<'_>,
    t: &Table,
    rel: &RelTarget,
    progress: &mut Progress,
) -> anyhow::Result<TableReport> {
    let shape = Shape::of(rel);
    let mut report = TableReport::new(t, "relationship", &rel.rel_type);
    rows_to_edges(cx, t, rel, &shape, &mut report, progress).await?;
    edges_to_rows(cx, t, rel, &shape, &mut report).await?;
    report.repaired = cx.opts.repair && report.differs();
    Ok(report)
}

/// Every row's edge: missing, or changed (properties, other ends, duplicates,
/// an edge for a row with a NULL end).
async fn rows_to_edges(
    cx: &Ctx<'_>,
    t: &Table,
    rel: &RelTarget,
    shape: &Shape,
    report: &mut TableReport,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let (sink, opts, stamp) = (cx.sink, cx.opts, cx.stamp);
    let ends = "{p: properties(r), fl: labels(a), f: [x IN $fp | a[x]], tl: labels(b), t: [x IN $tp | b[x]]}";
    let lookup = if shape.pair_identity {
        format!(
            "UNWIND $rows AS row OPTIONAL MATCH (a:{} {})-[r:{}]->(b:{} {}) \
             RETURN row.i AS i, collect(CASE WHEN r IS NULL THEN NULL ELSE {ends} END) AS found",
            quote(&rel.from.label),
            key_pattern(&rel.from.key_props, "f"),
            quote(&rel.rel_type),
            quote(&rel.to.label),
            key_pattern(&rel.to.key_props, "t"),
        )
    } else {
        format!(
            "UNWIND $rows AS row OPTIONAL MATCH (a)-[r:{} {}]->(b) \
             RETURN row.i AS i, collect(CASE WHEN r IS NULL THEN NULL ELSE {ends} END) AS found",
            quote(&rel.rel_type),
            key_pattern(&shape.edge_props, "k"),
        )
    };
    let mut repairs = Batcher::new();
    let mut after: Option<Vec<String>> = None;
    loop {
        let rows = cx.next_chunk(t, &mut after, report, progress).await?;
        if rows.is_empty() {
            break;
        }
        // Mapped as an update without an old row: an edge (MergeEdge), or,
        // for a row with a NULL end, the removal of its edge (DeleteEdge).
        let mut expected: Vec<(String, GraphOp)> = Vec::with_capacity(rows.len());
        for (change, key) in &rows {
            let mut change = change.clone();
            change.op = crate::transactions::Op::Update;
            let mut ops = Vec::new();
            cx.mapper.map_change(&change, stamp, &mut ops)?;
            let op = ops.into_iter().find(|op| match op {
                GraphOp::MergeEdge { rel_type, .. } | GraphOp::DeleteEdge { rel_type, .. } => {
                    *rel_type == rel.rel_type
                }
                _ => false,
            });
            if let Some(op) = op {
                expected.push((key.join(", "), op));
            }
        }
        let params: Vec<BoltType> = expected
            .iter()
            .enumerate()
            .map(|(i, (_, op))| {
                let mut m = BoltMap::new();
                m.put("i".into(), BoltType::from(i as i64));
                match op {
                    GraphOp::MergeEdge { key, from, to, .. } => {
                        m.put("k".into(), bolt_list(key.0.iter().map(to_bolt)));
                        m.put("f".into(), bolt_list(from.key.0.iter().map(to_bolt)));
                        m.put("t".into(), bolt_list(to.key.0.iter().map(to_bolt)));
                    }
                    GraphOp::DeleteEdge { key, .. } => {
                        m.put("k".into(), bolt_list(key.0.iter().map(to_bolt)));
                    }
                    _ => {}
                }
                BoltType::Map(m)
            })
            .collect();
        let mut found: HashMap<usize, Vec<BoltMap>> = HashMap::new();
        let mut result = sink
            .graph()
            .execute(
                query(&lookup)
                    .param("rows", BoltType::List(BoltList::from(params)))
                    .param("fp", shape.from_props.clone())
                    .param("tp", shape.to_props.clone()),
            )
            .await?;
        while let Some(row) = result.next().await? {
            let i = row.get::<i64>("i").unwrap_or(-1);
            let edges: Vec<BoltMap> = row.get("found").unwrap_or_default();
            if let Ok(i) = usize::try_from(i) {
                found.insert(i, edges);
            }
        }
        for (i, (key, op)) in expected.into_iter().enumerate() {
            let edges = found.remove(&i).unwrap_or_default();
            let differs = match &op {
                GraphOp::MergeEdge { .. } if edges.is_empty() => {
                    note(&mut report.missing, &mut report.missing_count, key);
                    true
                }
                GraphOp::MergeEdge {
                    from, to, props, ..
                } => {
                    let ok = edges.len() == 1 && edge_matches(&edges[0], from, to, props);
                    if !ok {
                        note(&mut report.changed, &mut report.changed_count, key);
                    }
                    !ok
                }
                _ if edges.is_empty() => false,
                _ => {
                    note(&mut report.changed, &mut report.changed_count, key);
                    true
                }
            };
            if differs && opts.repair {
                repairs.push_transaction(vec![vec![op]], Lsn::ZERO);
            }
        }
        cx.flush(&mut repairs).await?;
    }
    Ok(())
}

/// Edges whose row is gone: extra.
async fn edges_to_rows(
    cx: &Ctx<'_>,
    t: &Table,
    rel: &RelTarget,
    shape: &Shape,
    report: &mut TableReport,
) -> anyhow::Result<()> {
    let (sink, c, opts, stamp) = (cx.sink, cx.c, cx.opts, cx.stamp);
    // Edges whose row is gone: their identity (the edge key, or the two
    // ends' keys) put in the table's key order.
    let key_source: Vec<(char, usize)> = t
        .key
        .iter()
        .filter_map(|(_, pos, _)| {
            let col = &t.relation.columns.get(*pos)?.name;
            if shape.pair_identity {
                let in_from = rel.from.columns.iter().position(|c| c == col);
                let in_to = rel.to.columns.iter().position(|c| c == col);
                in_from.map(|i| ('f', i)).or(in_to.map(|i| ('t', i)))
            } else {
                rel.key_columns
                    .iter()
                    .position(|c| c == col)
                    .map(|i| ('k', i))
            }
        })
        .collect();
    if key_source.len() != t.key.len() {
        anyhow::bail!(
            "{}: cannot tell the rows of relationship {} apart by the table's key; map the key columns",
            t.name,
            rel.rel_type
        );
    }
    let rt = quote(&rel.rel_type);
    let mut pager = Pager {
        pattern: format!("(a)-[r:{rt}]->(b)"),
        var: "r",
        name: rt.clone(),
        key: match (shape.pair_identity, shape.edge_props.as_slice()) {
            (false, [p]) => Some(quote(p)),
            _ => None,
        },
        returned: "[x IN $kp | r[x]] AS k, [x IN $fp | a[x]] AS f, [x IN $tp | b[x]] AS t".into(),
        cursor: None,
        last_id: -1,
    };
    loop {
        let start = pager.position();
        let mut rows = sink
            .graph()
            .execute(
                pager
                    .query(opts.chunk_rows)
                    .param("kp", rel.key_columns.clone())
                    .param("fp", shape.from_props.clone())
                    .param("tp", shape.to_props.clone()),
            )
            .await?;
        // (row key in table order, edge key, from key, to key)
        type Seen = (Vec<BoltType>, Vec<BoltType>, Vec<BoltType>, Vec<BoltType>);
        let mut batch: Vec<Seen> = Vec::new();
        let mut read = 0u64;
        while let Some(row) = rows.next().await? {
            read += 1;
            pager.advance(&row);
            let k: BoltList = row.get("k").unwrap_or_default();
            let f: BoltList = row.get("f").unwrap_or_default();
            let to: BoltList = row.get("t").unwrap_or_default();
            let row_key: Option<Vec<BoltType>> = key_source
                .iter()
                .map(|(side, i)| {
                    match side {
                        'f' => f.value.get(*i),
                        't' => to.value.get(*i),
                        _ => k.value.get(*i),
                    }
                    .cloned()
                })
                .collect();
            if let Some(row_key) = row_key {
                batch.push((row_key, k.value, f.value, to.value));
            }
        }
        if read == 0 {
            break;
        }
        pager.check_moved(&start)?;
        report.in_graph += read;
        let keys: Vec<Vec<BoltType>> = batch.iter().map(|b| b.0.clone()).collect();
        let present = rows_present(c, t, &keys).await?;
        let mut deletes = Batcher::new();
        for (row_key, k, f, to) in batch {
            let text = key_text(&row_key);
            if present.contains(&text) {
                continue;
            }
            note(&mut report.extra, &mut report.extra_count, text);
            if !opts.repair {
                continue;
            }
            let op = if shape.pair_identity {
                match (node_ref(&rel.from.label, &f), node_ref(&rel.to.label, &to)) {
                    (Some(a), Some(b)) => Some(GraphOp::DeleteEdge {
                        rel_type: Arc::clone(&rel.rel_type),
                        key: Key(Vec::new()),
                        ends: Some((a, b)),
                        lsn: stamp,
                    }),
                    _ => None,
                }
            } else {
                k.iter()
                    .map(bolt_value)
                    .collect::<Option<Vec<_>>>()
                    .map(|values| GraphOp::DeleteEdge {
                        rel_type: Arc::clone(&rel.rel_type),
                        key: Key(values),
                        ends: None,
                        lsn: stamp,
                    })
            };
            if let Some(op) = op {
                deletes.push_transaction(vec![vec![op]], Lsn::ZERO);
            }
        }
        cx.flush(&mut deletes).await?;
    }
    Ok(())
}

/// Whether an edge as found (`{p, fl, f, tl, t}`) is what the row makes.
fn edge_matches(found: &BoltMap, from: &NodeRef, to: &NodeRef, props: &Props) -> bool {
    let end_ok = |labels: &str, keys: &str, want: &NodeRef| {
        let l: Vec<String> = found.get(labels).unwrap_or_default();
        let k: BoltList = found.get(keys).unwrap_or_default();
        let want_key: Vec<BoltType> = want.key.0.iter().map(to_bolt).collect();
        l.iter().any(|l| l == want.label.as_ref()) && k.value == want_key
    };
    let p: BoltMap = found.get("p").unwrap_or_default();
    end_ok("fl", "f", from)
        && end_ok("tl", "t", to)
        && props
            .iter()
            .all(|(name, value)| prop_matches(p.value.get(name.as_ref()), value))
}
