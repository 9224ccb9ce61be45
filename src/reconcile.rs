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
use crate::cypher::key_pattern;
use crate::cypher::to_bolt;
use crate::decode::Value;
use crate::lsn::Lsn;
use crate::map::{GraphOp, Mapper, NodeRef};
use crate::mapping::{quote, Mapping, NodeTarget, RelKind, RelTarget};
use crate::pipeline;
use crate::progress::Progress;
use crate::sink::Sink;
use crate::snapshot::{describe_table, read_chunk, Table, TEXT_FORMATS};

/// How to reconcile.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// Only this table (schema-qualified).
    pub table: Option<String>,
    /// Fix the graph.
    pub repair: bool,
    /// Rows per chunk.
    pub chunk_rows: usize,
    /// Draw a progress bar (on a terminal); otherwise progress goes to the log.
    pub progress_bar: bool,
}

/// What one table (node table, or a join table's relationship type) looked
/// like.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableReport {
    /// The table.
    pub table: String,
    /// `node` (a node table: its nodes and foreign-key relationships) or
    /// `relationship` (a join table: its edges).
    pub kind: String,
    /// Its label, or its relationship type.
    pub label: String,
    /// Rows read from Postgres.
    pub rows: u64,
    /// Nodes of the label (placeholders included), or relationships of the
    /// type, read from the graph.
    pub in_graph: u64,
    /// Rows without a node or edge (up to 20 keys shown).
    pub missing: Vec<String>,
    /// How many rows lack a node or edge.
    pub missing_count: u64,
    /// Nodes or edges whose row is gone.
    pub extra: Vec<String>,
    /// How many.
    pub extra_count: u64,
    /// Rows whose node or edge differs.
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

/// What every table's pass shares.
struct Ctx<'a> {
    sink: &'a Sink,
    c: &'a tokio_postgres::Client,
    mapping: &'a Mapping,
    mapper: &'a Mapper,
    /// The WAL position read before the rows; repairs carry it as `_lsn`.
    stamp: Lsn,
    opts: &'a ReconcileOptions,
}

impl Ctx<'_> {
    /// The next chunk of `t`'s rows after `after` (which it moves on),
    /// counted in the report and the progress.
    async fn next_chunk(
        &self,
        t: &Table,
        after: &mut Option<Vec<String>>,
        report: &mut TableReport,
        progress: &mut Progress,
    ) -> anyhow::Result<Vec<(crate::transactions::Change, Vec<String>)>> {
        let rows = read_chunk(self.c, t, after.as_deref(), self.opts.chunk_rows).await?;
        report.rows += rows.len() as u64;
        progress.add(rows.len() as u64, &t.name, 0);
        if let Some(last) = rows.last() {
            *after = Some(last.1.clone());
        }
        Ok(rows)
    }

    /// Writes the repairs collected so far (with `--repair`).
    async fn flush(&self, repairs: &mut Batcher) -> anyhow::Result<()> {
        if self.opts.repair && repairs.changes() > 0 {
            self.sink
                .apply_with(&repairs.take(self.mapping), query("RETURN 1"))
                .await?;
        }
        Ok(())
    }
}

/// Reads a label's nodes or a type's relationships back in pages: by a
/// one-property key through its index when there is one (a range seek per
/// page, in the index's order), else by internal id (a scan per page).
struct Pager {
    /// `MATCH` pattern binding `var`.
    pattern: String,
    var: &'static str,
    /// Quoted label or type.
    name: String,
    /// Quoted key property, when the key is one property with an index.
    key: Option<String>,
    /// What each row returns besides the position.
    returned: String,
    cursor: Option<BoltType>,
    last_id: i64,
}

impl Pager {
    fn query(&self, limit: usize) -> neo4rs::Query {
        let (pattern, var, name, returned) = (&self.pattern, self.var, &self.name, &self.returned);
        let text = match (&self.key, &self.cursor) {
            (Some(p), None) => format!(
                "MATCH {pattern} WHERE {var}.{p} IS NOT NULL \
                 RETURN {var}.{p} AS cursor, {returned} ORDER BY {var}.{p} LIMIT $limit"
            ),
            (Some(p), Some(_)) => format!(
                "MATCH {pattern} USING INDEX SEEK {var}:{name}({p}) WHERE {var}.{p} > $after \
                 RETURN {var}.{p} AS cursor, {returned} ORDER BY {var}.{p} LIMIT $limit"
            ),
            (None, _) => format!(
                "MATCH {pattern} WHERE id({var}) > $last_id \
                 RETURN id({var}) AS id, {returned} ORDER BY id LIMIT $limit"
            ),
        };
        query(&text)
            .param(
                "after",
                self.cursor
                    .clone()
                    .unwrap_or(BoltType::Null(neo4rs::BoltNull)),
            )
            .param("last_id", self.last_id)
            .param("limit", i64::try_from(limit).unwrap_or(10_000))
    }

    fn position(&self) -> (Option<BoltType>, i64) {
        (self.cursor.clone(), self.last_id)
    }

    fn advance(&mut self, row: &neo4rs::Row) {
        if self.key.is_some() {
            if let Ok(c) = row.get::<BoltType>("cursor") {
                self.cursor = Some(c);
            }
        } else {
            self.last_id = row.get::<i64>("id").unwrap_or(self.last_id);
        }
    }

    /// Fails when a page did not move the position (it would repeat forever).
    fn check_moved(&self, from: &(Option<BoltType>, i64)) -> anyhow::Result<()> {
        if self.position() == *from {
            anyhow::bail!(
                "reading {} back did not advance past {:?}; a key property of an unexpected type?",
                self.name,
                self.cursor
            );
        }
        Ok(())
    }
}

/// Compares (and with `repair`, fixes) every mapped node table and join
/// table.
pub async fn reconcile(cfg: &Config, opts: &ReconcileOptions) -> anyhow::Result<Vec<TableReport>> {
    let prepared = pipeline::prepare_beside_run(cfg).await?;
    let sink = prepared.sink.as_ref().context("no Neo4j connection")?;
    let mapping = Arc::clone(&prepared.mapping);
    let mut tables: Vec<String> = mapping
        .tables
        .iter()
        .filter(|(_, t)| t.node.is_some() || t.rels.iter().any(is_edge_rel))
        .map(|(n, _)| n.clone())
        .collect();
    tables.sort();
    if let Some(only) = &opts.table {
        if !tables.contains(only) {
            anyhow::bail!(
                "{only} is not a mapped table; the mapped tables are {}",
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
    let cx = Ctx {
        sink,
        c,
        mapping: &mapping,
        mapper: &mapper,
        stamp,
        opts,
    };
    let mut described = Vec::new();
    let mut total = 0u64;
    for name in &tables {
        let pk = catalog
            .get(name)
            .map(|t| t.primary_key.clone())
            .unwrap_or_default();
        let t = describe_table(c, name, &pk).await?;
        let count: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM {}", quote_qualified(name)),
                &[],
            )
            .await?
            .get(0);
        let passes = mapping.tables[name].node.iter().count()
            + mapping.tables[name]
                .rels
                .iter()
                .filter(|r| is_edge_rel(r))
                .count();
        total += u64::try_from(count).unwrap_or(0) * passes as u64;
        described.push(t);
    }
    let mut progress = Progress::new("reconcile", total, 0, opts.progress_bar);
    let mut reports = Vec::new();
    for t in &described {
        progress.table(&t.name);
        let target = &mapping.tables[&t.name];
        if let Some(node) = &target.node {
            reports.push(reconcile_nodes(&cx, t, node, &mut progress).await?);
        }
        for rel in target.rels.iter().filter(|r| is_edge_rel(r)) {
            reports.push(reconcile_edges(&cx, t, rel, &mut progress).await?);
        }
    }
    progress.finish();
    let _ = c.batch_execute("COMMIT").await;
    Ok(reports)
}

fn is_edge_rel(r: &RelTarget) -> bool {
    matches!(r.kind, RelKind::Edge { .. })
}

/// One node table: its nodes and the foreign-key relationships its rows own.
async fn reconcile_nodes(
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
    let mut report = TableReport {
        table: t.name.clone(),
        kind: "node".into(),
        label: node.label.to_string(),
        ..TableReport::default()
    };
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

/// One join table's relationship type: an edge per row.
async fn reconcile_edges(
    cx: &Ctx<'_>,
    t: &Table,
    rel: &RelTarget,
    progress: &mut Progress,
) -> anyhow::Result<TableReport> {
    let (sink, c, opts, stamp) = (cx.sink, cx.c, cx.opts, cx.stamp);
    let pair_identity = matches!(
        rel.kind,
        RelKind::Edge {
            pair_identity: true
        }
    );
    let mut report = TableReport {
        table: t.name.clone(),
        kind: "relationship".into(),
        label: rel.rel_type.to_string(),
        ..TableReport::default()
    };
    let strings = |v: &[Arc<str>]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    let (from_props, to_props) = (strings(&rel.from.key_props), strings(&rel.to.key_props));
    let edge_props: Vec<Arc<str>> = rel
        .key_columns
        .iter()
        .map(|c| Arc::from(c.as_str()))
        .collect();
    let ends = "{p: properties(r), fl: labels(a), f: [x IN $fp | a[x]], tl: labels(b), t: [x IN $tp | b[x]]}";
    let lookup = if pair_identity {
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
            key_pattern(&edge_props, "k"),
        )
    };
    let mut repairs = Batcher::new();
    let mut after: Option<Vec<String>> = None;
    loop {
        let rows = cx.next_chunk(t, &mut after, &mut report, progress).await?;
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
                    .param("fp", from_props.clone())
                    .param("tp", to_props.clone()),
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
    // Edges whose row is gone: their identity (the edge key, or the two
    // ends' keys) put in the table's key order.
    let key_source: Vec<(char, usize)> = t
        .key
        .iter()
        .filter_map(|(_, pos, _)| {
            let col = &t.relation.columns.get(*pos)?.name;
            if pair_identity {
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
        key: match (pair_identity, edge_props.as_slice()) {
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
                    .param("fp", from_props.clone())
                    .param("tp", to_props.clone()),
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
            let op = if pair_identity {
                match (node_ref(&rel.from.label, &f), node_ref(&rel.to.label, &to)) {
                    (Some(a), Some(b)) => Some(GraphOp::DeleteEdge {
                        rel_type: Arc::clone(&rel.rel_type),
                        key: crate::map::Key(Vec::new()),
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
                        key: crate::map::Key(values),
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
    report.repaired = opts.repair && report.differs();
    Ok(report)
}

/// Whether an edge as found (`{p, fl, f, tl, t}`) is what the row makes.
fn edge_matches(found: &BoltMap, from: &NodeRef, to: &NodeRef, props: &crate::map::Props) -> bool {
    let end_ok = |labels: &str, keys: &str, want: &NodeRef| {
        let l: Vec<String> = found.get(labels).unwrap_or_default();
        let k: BoltList = found.get(keys).unwrap_or_default();
        let want_key: Vec<BoltType> = want.key.0.iter().map(to_bolt).collect();
        l.iter().any(|l| l == want.label.as_ref()) && k.value == want_key
    };
    let p: BoltMap = found.get("p").unwrap_or_default();
    end_ok("fl", "f", from)
        && end_ok("tl", "t", to)
        && props.iter().all(|(name, value)| {
            let actual = p.value.get(name.as_ref());
            match value {
                Value::Null => actual.is_none(),
                v => actual == Some(&to_bolt(v)),
            }
        })
}

fn bolt_list(items: impl Iterator<Item = BoltType>) -> BoltType {
    BoltType::List(BoltList::from(items.collect::<Vec<_>>()))
}

/// A node reference from a label and key values read from the graph.
fn node_ref(label: &Arc<str>, key: &[BoltType]) -> Option<NodeRef> {
    key.iter()
        .map(bolt_value)
        .collect::<Option<Vec<_>>>()
        .map(|values| NodeRef {
            label: Arc::clone(label),
            key: crate::map::Key(values),
        })
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
    t: &Table,
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
            "{} → {}: {} rows, {} in the graph; {} missing, {} extra, {} changed{}\n",
            r.table,
            if r.kind == "node" {
                format!(":{}", r.label)
            } else {
                format!("[:{}]", r.label)
            },
            r.rows,
            r.in_graph,
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
