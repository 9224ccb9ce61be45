//! Reconcile: compares the rows of the mapped node tables with their nodes in
//! the graph, and optionally repairs the graph from Postgres.
//!
//! Invariants:
//! - Postgres is read in primary-key order, in chunks, inside one
//!   repeatable-read transaction (one consistent view for the whole pass);
//!   the graph is looked up by the chunk's keys, so the two databases'
//!   different orderings never matter;
//! - a row is *missing* when its node is absent, *changed* when a mapped
//!   property or its foreign-key relationship differs (properties only the
//!   graph has are not compared); a node is *extra* when its row is gone
//!   (placeholder nodes, which carry only a key and no `_lsn`, are not);
//! - a repair writes what the mapping makes of the row, stamped with the
//!   WAL position read *before* the rows, so the `_lsn` guard lets any
//!   later streamed change win over it.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use neo4rs::{query, BoltList, BoltMap, BoltType};
use serde::Serialize;

use crate::batch::Batcher;
use crate::catalog::{quote_literal, quote_qualified, PgClient};
use crate::config::Config;
use crate::cypher::to_bolt;
use crate::decode::Value;
use crate::lsn::Lsn;
use crate::map::{GraphOp, Mapper, NodeRef};
use crate::mapping::{quote, Mapping};
use crate::pipeline;
use crate::sink::Sink;
use crate::snapshot::{describe_table, read_chunk, TEXT_FORMATS};

/// How to reconcile.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// Only this table (schema-qualified).
    pub table: Option<String>,
    /// Fix the graph.
    pub repair: bool,
    /// Rows per chunk.
    pub chunk_rows: usize,
}

/// What one table looked like.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableReport {
    /// The table.
    pub table: String,
    /// Its label.
    pub label: String,
    /// Rows read from Postgres.
    pub rows: u64,
    /// Nodes of the label read from the graph (placeholders included).
    pub nodes: u64,
    /// Rows without a node (up to 20 keys shown).
    pub missing: Vec<String>,
    /// How many rows lack a node.
    pub missing_count: u64,
    /// Nodes whose row is gone.
    pub extra: Vec<String>,
    /// How many.
    pub extra_count: u64,
    /// Rows whose node differs.
    pub changed: Vec<String>,
    /// How many.
    pub changed_count: u64,
    /// Whether the differences were repaired.
    pub repaired: bool,
}

impl TableReport {
    /// Any difference.
    pub fn differs(&self) -> bool {
        self.missing_count + self.extra_count + self.changed_count > 0
    }
}

const SHOWN: usize = 20;

fn note(list: &mut Vec<String>, count: &mut u64, key: String) {
    *count += 1;
    if list.len() < SHOWN {
        list.push(key);
    }
}

/// Compares (and with `repair`, fixes) every mapped node table.
pub async fn reconcile(cfg: &Config, opts: &ReconcileOptions) -> anyhow::Result<Vec<TableReport>> {
    let prepared = pipeline::prepare_beside_run(cfg).await?;
    let sink = prepared.sink.as_ref().context("no Neo4j connection")?;
    let mapping = Arc::clone(&prepared.mapping);
    let mut tables: Vec<String> = mapping
        .tables
        .iter()
        .filter(|(_, t)| t.node.is_some())
        .map(|(n, _)| n.clone())
        .collect();
    tables.sort();
    if let Some(only) = &opts.table {
        if !tables.contains(only) {
            anyhow::bail!(
                "{only} is not a mapped node table; the mapped node tables are {}",
                tables.join(", ")
            );
        }
        tables.retain(|t| t == only);
    }
    let pg = PgClient::connect(&prepared.info).await?;
    let c = pg.client();
    // Repairs are stamped with a position no later than the rows read.
    let stamp: Lsn = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get::<_, String>(0)
        .parse()?;
    c.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {TEXT_FORMATS}"
    ))
    .await?;
    let catalog = pg.catalog(&tables).await?;
    let mapper = Mapper::new(Arc::clone(&mapping));
    let mut reports = Vec::new();
    for name in &tables {
        let pk = catalog
            .get(name)
            .map(|t| t.primary_key.clone())
            .unwrap_or_default();
        let t = describe_table(c, name, &pk).await?;
        let Some(node) = mapping.tables.get(name).and_then(|t| t.node.clone()) else {
            continue;
        };
        let owned: Vec<Arc<str>> = mapping.tables[name]
            .rels
            .iter()
            .map(|r| Arc::clone(&r.rel_type))
            .collect();
        let mut report = TableReport {
            table: name.clone(),
            label: node.label.to_string(),
            ..TableReport::default()
        };
        let mut repairs = Batcher::new();
        let mut after: Option<Vec<String>> = None;
        loop {
            let rows = read_chunk(c, &t, after.as_deref(), opts.chunk_rows).await?;
            if rows.is_empty() {
                break;
            }
            report.rows += rows.len() as u64;
            after = rows.last().map(|r| r.1.clone());
            let mut expected = Vec::with_capacity(rows.len());
            for (change, key) in &rows {
                let mut ops = Vec::new();
                mapper.map_change(change, stamp, &mut ops)?;
                expected.push((key.join(", "), ops));
            }
            let keys: Vec<BoltType> = expected
                .iter()
                .filter_map(|(_, ops)| own_node(ops))
                .map(|n| {
                    BoltType::List(BoltList::from(
                        n.key.0.iter().map(to_bolt).collect::<Vec<_>>(),
                    ))
                })
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
                    Some(found) if !matches(&ops, found, &mapping) => {
                        note(&mut report.changed, &mut report.changed_count, key);
                        true
                    }
                    Some(_) => false,
                };
                if differs && opts.repair {
                    repairs.push_transaction(vec![ops], Lsn::ZERO);
                }
            }
            if opts.repair && repairs.changes() > 0 {
                sink.apply_with(&repairs.take(&mapping), query("RETURN 1"))
                    .await?;
            }
        }
        // Nodes whose row is gone.
        let mut last_id = -1i64;
        loop {
            let mut rows = sink
                .graph()
                .execute(
                    query(&format!(
                        "MATCH (n:{}) WHERE id(n) > $after RETURN id(n) AS id, [p IN $props | n[p]] AS key, \
                         n._lsn IS NULL AS placeholder ORDER BY id LIMIT $limit",
                        quote(&node.label)
                    ))
                    .param("after", last_id)
                    .param("props", node.key_props.iter().map(|p| p.to_string()).collect::<Vec<_>>())
                    .param("limit", i64::try_from(opts.chunk_rows).unwrap_or(10_000)),
                )
                .await?;
            let mut batch: Vec<(Vec<BoltType>, bool)> = Vec::new();
            while let Some(row) = rows.next().await? {
                last_id = row.get::<i64>("id").unwrap_or(last_id);
                let key: BoltList = row.get("key").unwrap_or_default();
                let placeholder = row.get::<bool>("placeholder").unwrap_or(false);
                batch.push((key.value, placeholder));
            }
            if batch.is_empty() {
                break;
            }
            report.nodes += batch.len() as u64;
            let real: Vec<Vec<BoltType>> = batch
                .into_iter()
                .filter(|(_, placeholder)| !*placeholder)
                .map(|(k, _)| k)
                .collect();
            let present = rows_present(c, &t, &real).await?;
            let mut deletes = Batcher::new();
            for k in real {
                let text = key_text(&k);
                if present.contains(&text) {
                    continue;
                }
                note(&mut report.extra, &mut report.extra_count, text);
                if opts.repair {
                    if let Some(values) = k.iter().map(bolt_value).collect::<Option<Vec<_>>>() {
                        deletes.push_transaction(
                            vec![vec![GraphOp::DeleteNode {
                                node: NodeRef {
                                    label: Arc::clone(&node.label),
                                    key: crate::map::Key(values),
                                },
                                lsn: stamp,
                            }]],
                            Lsn::ZERO,
                        );
                    }
                }
            }
            if opts.repair && deletes.changes() > 0 {
                sink.apply_with(&deletes.take(&mapping), query("RETURN 1"))
                    .await?;
            }
        }
        report.repaired = opts.repair && report.differs();
        reports.push(report);
    }
    let _ = c.batch_execute("COMMIT").await;
    Ok(reports)
}

/// The node a row's operations upsert.
fn own_node(ops: &[GraphOp]) -> Option<&NodeRef> {
    ops.iter().find_map(|op| match op {
        GraphOp::UpsertNode { node, .. } => Some(node),
        _ => None,
    })
}

/// A key as comparable text.
fn key_text(key: &[BoltType]) -> String {
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
fn bolt_value(v: &BoltType) -> Option<Value> {
    Some(match v {
        BoltType::String(s) => Value::Text(s.value.clone()),
        BoltType::Integer(i) => Value::Int(i.value),
        BoltType::Float(f) => Value::Float(f.value),
        BoltType::Boolean(b) => Value::Bool(b.value),
        _ => return None,
    })
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
                    let actual = found.props.value.get(name.as_ref());
                    let ok = match value {
                        Value::Null => actual.is_none(),
                        v => actual == Some(&to_bolt(v)),
                    };
                    if !ok {
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

/// Which of `keys` (as read from the graph) still have a row.
async fn rows_present(
    c: &tokio_postgres::Client,
    t: &crate::snapshot::Table,
    keys: &[Vec<BoltType>],
) -> anyhow::Result<std::collections::HashSet<String>> {
    let mut present = std::collections::HashSet::new();
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

/// The reports as text for people.
pub fn render(reports: &[TableReport]) -> String {
    let mut out = String::new();
    for r in reports {
        out.push_str(&format!(
            "{} → :{}: {} rows, {} nodes; {} missing, {} extra, {} changed{}\n",
            r.table,
            r.label,
            r.rows,
            r.nodes,
            r.missing_count,
            r.extra_count,
            r.changed_count,
            if r.repaired { " — repaired" } else { "" }
        ));
        for (what, keys, n) in [
            ("missing", &r.missing, r.missing_count),
            ("extra", &r.extra, r.extra_count),
            ("changed", &r.changed, r.changed_count),
        ] {
            if !keys.is_empty() {
                let more = if n as usize > keys.len() {
                    format!(" and {} more", n as usize - keys.len())
                } else {
                    String::new()
                };
                out.push_str(&format!("  {what}: ({}){more}\n", keys.join("), (")));
            }
        }
    }
    out
}
