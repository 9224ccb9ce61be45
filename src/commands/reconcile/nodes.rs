//! Reconciling a node table: each row's node (properties and the
//! foreign-key relationships the row owns) against the label, both ways.
//!
//! Invariant: only mapped properties are compared (properties only the
//! graph has are left alone), and placeholder nodes are never extra.

use std::collections::HashMap;
use std::sync::Arc;

use neo4rs::{query, BoltList, BoltMap, BoltType};

use super::graph::{bolt_list, key_text, node_ref, own_node, prop_matches, rows_present};
use super::pager::Pager;
use super::{note, Ctx, TableReport};
use crate::batch::cypher::to_bolt;
use crate::batch::Batcher;
use crate::commands::progress::Progress;
use crate::lsn::Lsn;
use crate::mapping::map::GraphOp;
use crate::mapping::{quote, Mapping, NodeTarget};
use crate::pipeline::copy::Table;
use crate::sink::Sink;

/// One node table: its nodes and the foreign-key relationships its rows own.
pub(super) async fn reconcile_nodes(
    cx: &Ctx<'_>,
    t: &Table,
    node: &NodeTarget,
    progress: &mut Progress,
) -> anyhow::Result<TableReport> {
    let (sink, c, mapping, opts, stamp) = (cx.sink, cx.c, cx.mapping, cx.opts, cx.stamp);
    let owned: Vec<Arc<str>> = mapping.tables[&t.name]
        .rels
        .iter()
        .map(|r| Arc::clone(&r.rel_type))
        .collect();
    let mut report = TableReport::new(t, "node", &node.label);
    let mut repairs = Batcher::new();
    let mut after: Option<Vec<String>> = None;
    loop {
        let rows = cx.next_chunk(t, &mut after, &mut report, progress).await?;
        if rows.is_empty() {
            break;
        }
        let mut expected = Vec::with_capacity(rows.len());
        for (change, key) in &rows {
            let mut ops = Vec::new();
            cx.mapper.map_change(change, stamp, &mut ops)?;
            expected.push((key.join(", "), ops));
        }
        let keys: Vec<BoltType> = expected
            .iter()
            .filter_map(|(_, ops)| own_node(ops))
            .map(|n| bolt_list(n.key.0.iter().map(to_bolt)))
            .collect();
        let actual = graph_nodes(sink, &node.label, &node.key_props, &owned, keys).await?;
        for (key, ops) in expected {
            let Some(own) = own_node(&ops) else { continue };
            let bolt_key = key_text(&own.key.0.iter().map(to_bolt).collect::<Vec<_>>());
            let differs = match actual.get(&bolt_key) {
                None => {
                    note(&mut report.missing, &mut report.missing_count, key);
                    true
                }
                Some(found) if !matches(&ops, found, mapping) => {
                    note(&mut report.changed, &mut report.changed_count, key);
                    true
                }
                Some(_) => false,
            };
            if differs && opts.repair {
                repairs.push_transaction(vec![ops], Lsn::ZERO);
            }
        }
        cx.flush(&mut repairs).await?;
    }
    // Nodes whose row is gone.
    let label = quote(&node.label);
    let mut pager = Pager {
        pattern: format!("(n:{label})"),
        var: "n",
        name: label.clone(),
        key: match node.key_props.as_slice() {
            [p] => Some(quote(p)),
            _ => None,
        },
        returned: "[p IN $props | n[p]] AS key, n._lsn IS NULL AS placeholder".into(),
        cursor: None,
        last_id: -1,
    };
    let props: Vec<String> = node.key_props.iter().map(|p| p.to_string()).collect();
    loop {
        let start = pager.position();
        let mut rows = sink
            .graph()
            .execute(pager.query(opts.chunk_rows).param("props", props.clone()))
            .await?;
        let mut batch: Vec<(Vec<BoltType>, bool)> = Vec::new();
        while let Some(row) = rows.next().await? {
            pager.advance(&row);
            let key: BoltList = row.get("key").unwrap_or_default();
            let placeholder = row.get::<bool>("placeholder").unwrap_or(false);
            batch.push((key.value, placeholder));
        }
        if batch.is_empty() {
            break;
        }
        pager.check_moved(&start)?;
        report.in_graph += batch.len() as u64;
        let real: Vec<Vec<BoltType>> = batch
            .into_iter()
            .filter(|(_, placeholder)| !*placeholder)
            .map(|(k, _)| k)
            .collect();
        let present = rows_present(c, t, &real).await?;
        let mut deletes = Batcher::new();
        for k in real {
            let text = key_text(&k);
            if present.contains(&text) {
                continue;
            }
            note(&mut report.extra, &mut report.extra_count, text);
            if opts.repair {
                if let Some(node_ref) = node_ref(&node.label, &k) {
                    deletes.push_transaction(
                        vec![vec![GraphOp::DeleteNode {
                            node: node_ref,
                            lsn: stamp,
                        }]],
                        Lsn::ZERO,
                    );
                }
            }
        }
        cx.flush(&mut deletes).await?;
    }
    report.repaired = opts.repair && report.differs();
    Ok(report)
}

/// A node as found: its properties and the relationships the row owns.
struct Found {
    props: BoltMap,
    /// (type, other end's labels, other end's properties, this node is the start).
    rels: Vec<(String, Vec<String>, BoltMap, bool)>,
}

async fn graph_nodes(
    sink: &Sink,
    label: &str,
    key_props: &[Arc<str>],
    owned: &[Arc<str>],
    keys: Vec<BoltType>,
) -> anyhow::Result<HashMap<String, Found>> {
    let cond: Vec<String> = key_props
        .iter()
        .enumerate()
        .map(|(i, p)| format!("n.{} = k[{i}]", quote(p)))
        .collect();
    let mut rows = sink
        .graph()
        .execute(
            query(&format!(
                "UNWIND $keys AS k MATCH (n:{}) WHERE {} \
                 RETURN k AS key, properties(n) AS props, \
                 [(n)-[r]-(m) WHERE type(r) IN $owned | \
                  {{t: type(r), labels: labels(m), props: properties(m), out: startNode(r) = n}}] AS rels",
                quote(label),
                cond.join(" AND ")
            ))
            .param("keys", BoltType::List(BoltList::from(keys)))
            .param("owned", owned.iter().map(|t| t.to_string()).collect::<Vec<_>>()),
        )
        .await?;
    let mut out = HashMap::new();
    while let Some(row) = rows.next().await? {
        let key: BoltList = row.get("key").unwrap_or_default();
        let props: BoltMap = row.get("props").unwrap_or_default();
        let rels: Vec<BoltMap> = row.get("rels").unwrap_or_default();
        let rels = rels
            .into_iter()
            .map(|r| {
                (
                    r.get::<String>("t").unwrap_or_default(),
                    r.get::<Vec<String>>("labels").unwrap_or_default(),
                    r.get::<BoltMap>("props").unwrap_or_default(),
                    r.get::<bool>("out").unwrap_or(false),
                )
            })
            .collect();
        out.insert(key_text(&key.value), Found { props, rels });
    }
    Ok(out)
}

/// Whether the node as found is what the row's operations would write.
fn matches(ops: &[GraphOp], found: &Found, mapping: &Mapping) -> bool {
    for op in ops {
        match op {
            GraphOp::UpsertNode { props, .. } => {
                for (name, value) in props {
                    if !prop_matches(found.props.value.get(name.as_ref()), value) {
                        return false;
                    }
                }
            }
            GraphOp::SetOwnedRel {
                rel_type,
                other,
                own_is_from,
                ..
            } => {
                let here: Vec<&(String, Vec<String>, BoltMap, bool)> = found
                    .rels
                    .iter()
                    .filter(|r| r.0 == rel_type.as_ref())
                    .collect();
                match other {
                    None => {
                        if !here.is_empty() {
                            return false;
                        }
                    }
                    Some(o) => {
                        let props = mapping
                            .node_keys()
                            .into_iter()
                            .find(|(l, _)| l == &o.label)
                            .map(|(_, p)| p)
                            .unwrap_or_default();
                        let want: Vec<BoltType> = o.key.0.iter().map(to_bolt).collect();
                        let ok = here.len() == 1
                            && here[0].3 == *own_is_from
                            && here[0].1.iter().any(|l| l == o.label.as_ref())
                            && props
                                .iter()
                                .zip(&want)
                                .all(|(p, w)| here[0].2.value.get(p.as_ref()) == Some(w));
                        if !ok {
                            return false;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    true
}
