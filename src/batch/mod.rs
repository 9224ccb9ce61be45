//! Batch: graph operations of consecutive transactions → a few `UNWIND` statements.
//!
//! Invariants:
//! - applying a batch's statements in order gives the same graph as applying
//!   its operations one by one;
//! - operations on the same node or edge are coalesced to the final state;
//! - within a *segment*, statements run in a fixed order — node upserts,
//!   row-owned relationships, edge deletes, edge merges, node deletes — which
//!   is only equivalent to the original order when no operation touches a
//!   node deleted earlier in the segment; such an operation, and every
//!   TRUNCATE, starts a new segment.
//! - a batch never ends inside a transaction: its end LSN is the end LSN of
//!   the last transaction it holds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use neo4rs::{BoltInteger, BoltList, BoltType};

use crate::checkpoint::{Checkpoint, Partial};
use crate::cypher;
use crate::lsn::Lsn;
use crate::map::{GraphOp, Key, NodeRef, Props};
use crate::mapping::{Mapping, RelKind};

/// One Cypher statement and its rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// Cypher text (`UNWIND $rows AS row …`).
    pub cypher: String,
    /// The `$rows` parameter.
    pub rows: BoltList,
}

/// A batch ready for the sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The operations, one group per statement (kept to find the one a
    /// permanent error comes from).
    pub plan: Vec<Vec<GraphOp>>,
    /// Statements, to run in order in one Neo4j transaction.
    pub statements: Vec<Statement>,
    /// End LSN of the last whole transaction in the batch (or before it):
    /// the new checkpoint, and what may be confirmed to Postgres.
    pub end_lsn: Lsn,
    /// When the batch ends inside a transaction too large for one batch:
    /// that transaction and how many of its changes are applied with it.
    pub partial: Option<Partial>,
    /// Row changes the batch holds.
    pub changes: usize,
    /// Transactions the batch holds.
    pub transactions: usize,
    /// Commit time (microseconds since 2000-01-01 UTC) and change count of
    /// each transaction the batch completes, for latency metrics.
    pub commits: Vec<(i64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum EdgeId {
    Pair(Arc<str>, NodeRef, NodeRef),
    Key(Arc<str>, Key),
}

#[derive(Debug, Clone)]
struct EdgeMerge {
    from: NodeRef,
    to: NodeRef,
    props: Props,
    lsn: Lsn,
}

/// A row-owned edge to set: type, own-is-start, own node, other node, LSN.
type OwnedRel = (Arc<str>, bool, NodeRef, Option<NodeRef>, Lsn);

#[derive(Debug, Default)]
struct Segment {
    upserts: Vec<Option<(NodeRef, Props, Lsn)>>,
    upsert_idx: HashMap<NodeRef, usize>,
    owned: Vec<OwnedRel>,
    owned_idx: HashMap<(Arc<str>, NodeRef), usize>,
    edge_deletes: Vec<(EdgeId, Lsn)>,
    edge_delete_idx: HashSet<EdgeId>,
    edge_merges: Vec<Option<(EdgeId, EdgeMerge)>>,
    edge_merge_idx: HashMap<EdgeId, usize>,
    deletes: Vec<(NodeRef, Lsn)>,
    deleted: HashMap<NodeRef, usize>,
    /// Nodes that a coalesced-away operation would have created as
    /// placeholders; they are created all the same.
    ensure: Vec<NodeRef>,
    ensured: std::collections::HashSet<NodeRef>,
    truncate: Option<GraphOp>,
}

impl Segment {
    fn is_empty(&self) -> bool {
        self.upsert_idx.is_empty()
            && self.owned.is_empty()
            && self.edge_deletes.is_empty()
            && self.edge_merge_idx.is_empty()
            && self.ensure.is_empty()
            && self.deletes.is_empty()
            && self.truncate.is_none()
    }

    /// Whether `op` would be reordered across a delete of a node it touches.
    fn conflicts(&self, op: &GraphOp) -> bool {
        let touched = |n: &NodeRef| self.deleted.contains_key(n);
        match op {
            GraphOp::UpsertNode { node, .. } => touched(node),
            GraphOp::SetOwnedRel { own, other, .. } => {
                touched(own) || other.as_ref().is_some_and(touched)
            }
            GraphOp::MergeEdge { from, to, .. } => touched(from) || touched(to),
            GraphOp::DeleteNode { .. }
            | GraphOp::DeleteEdge { .. }
            | GraphOp::EnsureNode { .. } => false,
            GraphOp::TruncateLabel { .. } | GraphOp::TruncateType { .. } => true,
        }
    }

    fn ensure(&mut self, node: &NodeRef) {
        if self.ensured.insert(node.clone()) {
            self.ensure.push(node.clone());
        }
    }

    fn add(&mut self, op: GraphOp) {
        match op {
            GraphOp::EnsureNode { node } => self.ensure(&node),
            GraphOp::UpsertNode { node, props, lsn } => match self.upsert_idx.get(&node) {
                Some(&i) => {
                    let Some(entry) = self.upserts[i].as_mut() else {
                        return;
                    };
                    for (name, v) in props {
                        match entry.1.iter_mut().find(|(n, _)| *n == name) {
                            Some(slot) => slot.1 = v,
                            None => entry.1.push((name, v)),
                        }
                    }
                    entry.2 = entry.2.max(lsn);
                }
                None => {
                    self.upsert_idx.insert(node.clone(), self.upserts.len());
                    self.upserts.push(Some((node, props, lsn)));
                }
            },
            GraphOp::DeleteNode { node, lsn } => {
                // An upsert before it stays: it runs first, so whatever
                // it let happen (a placeholder at the other end of one of its
                // edges) happens, and this delete, which runs last, removes
                // the node and its edges as it would have one by one.
                match self.deleted.get(&node) {
                    Some(&i) => self.deletes[i].1 = self.deletes[i].1.max(lsn),
                    None => {
                        self.deleted.insert(node.clone(), self.deletes.len());
                        self.deletes.push((node, lsn));
                    }
                }
            }
            GraphOp::SetOwnedRel {
                rel_type,
                own,
                other,
                own_is_from,
                lsn,
            } => {
                let id = (Arc::clone(&rel_type), own.clone());
                match self.owned_idx.get(&id) {
                    Some(&i) => {
                        if let Some(prev) = self.owned[i].3.clone() {
                            self.ensure(&prev);
                        }
                        self.owned[i] = (rel_type, own_is_from, own, other, lsn);
                    }
                    None => {
                        self.owned_idx.insert(id, self.owned.len());
                        self.owned.push((rel_type, own_is_from, own, other, lsn));
                    }
                }
            }
            GraphOp::MergeEdge {
                rel_type,
                key,
                from,
                to,
                props,
                lsn,
            } => {
                let id = if key.0.is_empty() {
                    EdgeId::Pair(rel_type, from.clone(), to.clone())
                } else {
                    EdgeId::Key(rel_type, key)
                };
                match self.edge_merge_idx.get(&id) {
                    Some(&i) => {
                        let Some((_, m)) = self.edge_merges[i].as_mut() else {
                            return;
                        };
                        if m.from != from || m.to != to {
                            // The edge moves: one by one, the first merge left
                            // its ends (placeholders, maybe) and the second
                            // makes a new edge with only its own properties.
                            let prev_from = std::mem::replace(&mut m.from, from);
                            let prev_to = std::mem::replace(&mut m.to, to);
                            m.props.clear();
                            self.ensure(&prev_from);
                            self.ensure(&prev_to);
                        }
                        let Some((_, m)) = self.edge_merges[i].as_mut() else {
                            return;
                        };
                        for (name, v) in props {
                            match m.props.iter_mut().find(|(n, _)| *n == name) {
                                Some(slot) => slot.1 = v,
                                None => m.props.push((name, v)),
                            }
                        }
                        m.lsn = m.lsn.max(lsn);
                    }
                    None => {
                        self.edge_merge_idx
                            .insert(id.clone(), self.edge_merges.len());
                        self.edge_merges.push(Some((
                            id,
                            EdgeMerge {
                                from,
                                to,
                                props,
                                lsn,
                            },
                        )));
                    }
                }
            }
            GraphOp::DeleteEdge {
                rel_type,
                key,
                ends,
                lsn,
            } => {
                let id = match ends {
                    Some((f, t)) => EdgeId::Pair(rel_type, f, t),
                    None => EdgeId::Key(rel_type, key),
                };
                // A merge of the same edge earlier in the segment is void.
                if let Some(i) = self.edge_merge_idx.remove(&id) {
                    if let Some((_, m)) = self.edge_merges[i].take() {
                        self.ensure(&m.from);
                        self.ensure(&m.to);
                    }
                }
                if self.edge_delete_idx.insert(id.clone()) {
                    self.edge_deletes.push((id, lsn));
                }
            }
            op @ (GraphOp::TruncateLabel { .. } | GraphOp::TruncateType { .. }) => {
                self.truncate = Some(op)
            }
        }
    }

    /// The operations of this segment grouped into statements (each group
    /// one statement of one kind and target), in the order that keeps it exact.
    fn plan(self, out: &mut Vec<Vec<GraphOp>>) {
        if let Some(op) = self.truncate {
            out.push(vec![op]);
            return;
        }
        // 1. node upserts, by label (voided entries were deleted later).
        let mut groups: Groups<Arc<str>> = Groups::default();
        for (node, props, lsn) in self.upserts.into_iter().flatten() {
            groups.push(
                Arc::clone(&node.label),
                GraphOp::UpsertNode { node, props, lsn },
            );
        }
        out.extend(groups.into_inner());
        let mut groups: Groups<Arc<str>> = Groups::default();
        for node in self.ensure {
            groups.push(Arc::clone(&node.label), GraphOp::EnsureNode { node });
        }
        out.extend(groups.into_inner());

        // 2. row-owned relationships, by type, direction and label.
        let mut groups: Groups<(Arc<str>, bool, Arc<str>)> = Groups::default();
        for (rel_type, own_is_from, own, other, lsn) in self.owned {
            groups.push(
                (Arc::clone(&rel_type), own_is_from, Arc::clone(&own.label)),
                GraphOp::SetOwnedRel {
                    rel_type,
                    own,
                    other,
                    own_is_from,
                    lsn,
                },
            );
        }
        out.extend(groups.into_inner());

        // 3. edge deletes, by type and identity.
        let mut groups: Groups<(Arc<str>, bool)> = Groups::default();
        for (id, lsn) in self.edge_deletes {
            match id {
                EdgeId::Pair(t, f, to) => groups.push(
                    (Arc::clone(&t), true),
                    GraphOp::DeleteEdge {
                        rel_type: t,
                        key: Key(Vec::new()),
                        ends: Some((f, to)),
                        lsn,
                    },
                ),
                EdgeId::Key(t, k) => groups.push(
                    (Arc::clone(&t), false),
                    GraphOp::DeleteEdge {
                        rel_type: t,
                        key: k,
                        ends: None,
                        lsn,
                    },
                ),
            }
        }
        out.extend(groups.into_inner());

        // 4. edge merges, by type.
        let mut groups: Groups<Arc<str>> = Groups::default();
        for (id, m) in self.edge_merges.into_iter().flatten() {
            let (t, key) = match id {
                EdgeId::Pair(t, _, _) => (t, Key(Vec::new())),
                EdgeId::Key(t, k) => (t, k),
            };
            groups.push(
                Arc::clone(&t),
                GraphOp::MergeEdge {
                    rel_type: t,
                    key,
                    from: m.from,
                    to: m.to,
                    props: m.props,
                    lsn: m.lsn,
                },
            );
        }
        out.extend(groups.into_inner());

        // 5. node deletes, by label.
        let mut groups: Groups<Arc<str>> = Groups::default();
        for (node, lsn) in self.deletes {
            groups.push(Arc::clone(&node.label), GraphOp::DeleteNode { node, lsn });
        }
        out.extend(groups.into_inner());
    }
}

impl Batch {
    /// The checkpoint this batch writes.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            lsn: self.end_lsn,
            partial: self.partial,
        }
    }
}

/// The statements for a plan, in order.
pub fn render_plan(plan: &[Vec<GraphOp>], mapping: &Mapping) -> Vec<Statement> {
    let lookup = Lookup::new(mapping);
    plan.iter()
        .filter_map(|group| render(group, &lookup))
        .collect()
}

impl Batch {
    /// Drops one operation (one that Neo4j rejects for good) and renders
    /// the statements again.
    pub fn remove(&mut self, group: usize, index: usize, mapping: &Mapping) -> Option<GraphOp> {
        let ops = self.plan.get_mut(group)?;
        if index >= ops.len() {
            return None;
        }
        let op = ops.remove(index);
        self.plan.retain(|g| !g.is_empty());
        self.statements = render_plan(&self.plan, mapping);
        Some(op)
    }
}

/// Where a graph operation comes from, for messages: the table, the key
/// values and the commit LSN.
pub fn describe(op: &GraphOp, mapping: &Mapping) -> (String, String, Option<Lsn>) {
    let table_of_label = |label: &str| {
        mapping
            .tables
            .iter()
            .find(|(_, t)| t.node.as_ref().is_some_and(|n| &*n.label == label))
            .map(|(name, _)| name.clone())
    };
    let table_of_type = |t: &str| {
        mapping
            .tables
            .iter()
            .find(|(_, tt)| tt.rels.iter().any(|r| &*r.rel_type == t))
            .map(|(name, _)| name.clone())
    };
    let key_text = |k: &Key| {
        let parts: Vec<String> = k.0.iter().map(|v| v.to_plain_json().to_string()).collect();
        format!("({})", parts.join(", "))
    };
    let (table, key, lsn) = match op {
        GraphOp::UpsertNode { node, lsn, .. } | GraphOp::DeleteNode { node, lsn } => {
            (table_of_label(&node.label), key_text(&node.key), Some(*lsn))
        }
        GraphOp::EnsureNode { node } => (table_of_label(&node.label), key_text(&node.key), None),
        GraphOp::SetOwnedRel {
            rel_type, own, lsn, ..
        } => (table_of_type(rel_type), key_text(&own.key), Some(*lsn)),
        GraphOp::MergeEdge {
            rel_type,
            key,
            from,
            to,
            lsn,
            ..
        } => (
            table_of_type(rel_type),
            if key.0.is_empty() {
                format!("{}→{}", key_text(&from.key), key_text(&to.key))
            } else {
                key_text(key)
            },
            Some(*lsn),
        ),
        GraphOp::DeleteEdge {
            rel_type,
            key,
            ends,
            lsn,
        } => (
            table_of_type(rel_type),
            match ends {
                Some((f, t)) => format!("{}→{}", key_text(&f.key), key_text(&t.key)),
                None => key_text(key),
            },
            Some(*lsn),
        ),
        GraphOp::TruncateLabel { label } => (table_of_label(label), "(all rows)".into(), None),
        GraphOp::TruncateType { rel_type } => (table_of_type(rel_type), "(all rows)".into(), None),
    };
    (
        table.unwrap_or_else(|| "an unmapped table".into()),
        key,
        lsn,
    )
}

/// One statement for a group of operations of the same kind and target.
fn render(group: &[GraphOp], lookup: &Lookup<'_>) -> Option<Statement> {
    let lsn = |l: Lsn| BoltType::Integer(BoltInteger::new(l.to_i64()));
    let first = group.first()?;
    let mut rows = BoltList::with_capacity(group.len());
    for op in group {
        let op = op.clone();
        let row = match op {
            GraphOp::UpsertNode {
                node,
                props,
                lsn: l,
            } => cypher::row(vec![
                ("k", cypher::key_list(&node.key)),
                ("p", cypher::props_map(&props)),
                ("lsn", lsn(l)),
            ]),
            GraphOp::DeleteNode { node, lsn: l } => {
                cypher::row(vec![("k", cypher::key_list(&node.key)), ("lsn", lsn(l))])
            }
            GraphOp::EnsureNode { node } => cypher::row(vec![("k", cypher::key_list(&node.key))]),
            GraphOp::SetOwnedRel {
                own, other, lsn: l, ..
            } => cypher::row(vec![
                ("o", cypher::key_list(&own.key)),
                (
                    "t",
                    other
                        .as_ref()
                        .map_or(BoltType::Null(neo4rs::BoltNull), |o| {
                            cypher::key_list(&o.key)
                        }),
                ),
                ("lsn", lsn(l)),
            ]),
            GraphOp::DeleteEdge {
                key, ends, lsn: l, ..
            } => match ends {
                Some((f, t)) => cypher::row(vec![
                    ("f", cypher::key_list(&f.key)),
                    ("t", cypher::key_list(&t.key)),
                    ("lsn", lsn(l)),
                ]),
                None => cypher::row(vec![("k", cypher::key_list(&key)), ("lsn", lsn(l))]),
            },
            GraphOp::MergeEdge {
                key,
                from,
                to,
                props,
                lsn: l,
                ..
            } => cypher::row(vec![
                ("f", cypher::key_list(&from.key)),
                ("t", cypher::key_list(&to.key)),
                ("k", cypher::key_list(&key)),
                ("p", cypher::props_map(&props)),
                ("lsn", lsn(l)),
            ]),
            GraphOp::TruncateLabel { .. } | GraphOp::TruncateType { .. } => continue,
        };
        rows.push(row);
    }
    let cypher = match first {
        GraphOp::UpsertNode { node, .. } => {
            cypher::upsert_nodes(&node.label, lookup.key_props(&node.label))
        }
        GraphOp::DeleteNode { node, .. } => {
            cypher::delete_nodes(&node.label, lookup.key_props(&node.label))
        }
        GraphOp::EnsureNode { node } => {
            cypher::ensure_nodes(&node.label, lookup.key_props(&node.label))
        }
        GraphOp::SetOwnedRel {
            rel_type,
            own,
            own_is_from,
            ..
        } => {
            let other = lookup.other_end(rel_type, *own_is_from)?;
            cypher::set_owned_rels(
                rel_type,
                &own.label,
                lookup.key_props(&own.label),
                &other,
                lookup.key_props(&other),
                *own_is_from,
            )
        }
        GraphOp::DeleteEdge { rel_type, ends, .. } => {
            let rel = lookup.rel(rel_type)?;
            if ends.is_some() {
                cypher::delete_edges_by_ends(
                    rel_type,
                    (&rel.from.label, &rel.from.key_props),
                    (&rel.to.label, &rel.to.key_props),
                )
            } else {
                cypher::delete_edges_by_key(rel_type, &rel.key_columns)
            }
        }
        GraphOp::MergeEdge { rel_type, .. } => {
            let rel = lookup.rel(rel_type)?;
            let edge_key = match rel.kind {
                RelKind::Edge {
                    pair_identity: false,
                } => Some(rel.key_columns.as_slice()),
                _ => None,
            };
            cypher::merge_edges(
                rel_type,
                (&rel.from.label, &rel.from.key_props),
                (&rel.to.label, &rel.to.key_props),
                edge_key,
            )
        }
        GraphOp::TruncateLabel { label } => cypher::truncate_label(label),
        GraphOp::TruncateType { rel_type } => cypher::truncate_type(rel_type),
    };
    Some(Statement { cypher, rows })
}

/// Operations grouped by a key, in first-seen order.
struct Groups<K> {
    order: Vec<(K, Vec<GraphOp>)>,
    idx: HashMap<K, usize>,
}

impl<K> Default for Groups<K> {
    fn default() -> Self {
        Groups {
            order: Vec::new(),
            idx: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Groups<K> {
    fn push(&mut self, k: K, op: GraphOp) {
        let i = *self.idx.entry(k.clone()).or_insert_with(|| {
            self.order.push((k, Vec::new()));
            self.order.len() - 1
        });
        self.order[i].1.push(op);
    }

    fn into_inner(self) -> impl Iterator<Item = Vec<GraphOp>> {
        self.order.into_iter().map(|(_, ops)| ops)
    }
}

/// Finds mapping details by label or type.
struct Lookup<'m> {
    labels: HashMap<&'m str, &'m [Arc<str>]>,
    rels: HashMap<&'m str, &'m crate::mapping::RelTarget>,
}

impl<'m> Lookup<'m> {
    fn new(mapping: &'m Mapping) -> Self {
        let mut labels = HashMap::new();
        let mut rels = HashMap::new();
        for t in mapping.tables.values() {
            if let Some(n) = &t.node {
                labels.insert(&*n.label, n.key_props.as_slice());
            }
            for r in &t.rels {
                rels.insert(&*r.rel_type, r);
            }
        }
        Lookup { labels, rels }
    }

    fn key_props(&self, label: &str) -> &'m [Arc<str>] {
        self.labels.get(label).copied().unwrap_or(&[])
    }

    fn rel(&self, t: &str) -> Option<&'m crate::mapping::RelTarget> {
        self.rels.get(t).copied()
    }

    fn other_end(&self, t: &str, own_is_from: bool) -> Option<Arc<str>> {
        let r = self.rel(t)?;
        Some(Arc::clone(if own_is_from {
            &r.to.label
        } else {
            &r.from.label
        }))
    }
}

/// Accumulates transactions' operations until the batch is full or due.
#[derive(Debug, Default)]
pub struct Batcher {
    segments: Vec<Segment>,
    end_lsn: Lsn,
    partial: Option<Partial>,
    changes: usize,
    transactions: usize,
    commits: Vec<(i64, u64)>,
}

impl Batcher {
    /// An empty batcher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.transactions == 0 && self.partial.is_none()
    }

    /// Row changes waiting.
    pub fn changes(&self) -> usize {
        self.changes
    }

    /// Adds one whole transaction: the operations of each of its changes.
    pub fn push_transaction(&mut self, changes: Vec<Vec<GraphOp>>, end_lsn: Lsn) {
        debug_assert!(
            end_lsn >= self.end_lsn,
            "transactions arrive in commit order"
        );
        self.push_changes(changes);
        self.end_transaction(end_lsn);
    }

    /// Adds the operations of one change of the transaction ending at
    /// `end_lsn`, its `applied`-th (counting from 1, so that many are then
    /// waiting or applied): a transaction
    /// too large for one batch arrives this way, and a batch taken before
    /// [`Batcher::end_transaction`] applies it in part.
    pub fn push_partial(&mut self, change: Vec<GraphOp>, end_lsn: Lsn, applied: u64) {
        debug_assert!(
            end_lsn > self.end_lsn,
            "a partial transaction comes after the last whole one"
        );
        self.push_change(change);
        self.partial = Some(Partial {
            end_lsn,
            changes: applied,
        });
    }

    /// The transaction ending at `end_lsn` is complete.
    pub fn end_transaction(&mut self, end_lsn: Lsn) {
        self.end_lsn = self.end_lsn.max(end_lsn);
        self.partial = None;
        self.transactions += 1;
    }

    /// Notes the commit time and change count of the transaction just
    /// completed (for latency metrics).
    pub fn record_commit(&mut self, commit_time: i64, changes: u64) {
        self.commits.push((commit_time, changes));
    }

    /// The checkpoint a batch taken now would write.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            lsn: self.end_lsn,
            partial: self.partial,
        }
    }

    fn push_changes(&mut self, changes: Vec<Vec<GraphOp>>) {
        for group in changes {
            self.push_change(group);
        }
    }

    fn push_change(&mut self, group: Vec<GraphOp>) {
        self.changes += 1;
        {
            // The operations of one change stay in one segment: split across
            // two, the first would see a node already coalesced to the
            // change's final version and its LSN.
            let new_segment = match self.segments.last() {
                None => true,
                Some(s) => s.truncate.is_some() || group.iter().any(|op| s.conflicts(op)),
            };
            if new_segment {
                self.segments.push(Segment::default());
            }
            for op in group {
                let is_truncate = matches!(
                    op,
                    GraphOp::TruncateLabel { .. } | GraphOp::TruncateType { .. }
                );
                if is_truncate && !self.segments.last().is_none_or(Segment::is_empty) {
                    self.segments.push(Segment::default());
                }
                if let Some(s) = self.segments.last_mut() {
                    s.add(op);
                }
                if is_truncate {
                    // Nothing may be reordered across a truncate.
                    self.segments.push(Segment::default());
                }
            }
        }
    }

    /// Takes the waiting operations as groups, one per statement, in the
    /// order they must run (what [`Batcher::take`] renders as Cypher).
    fn take_plan(&mut self) -> Vec<Vec<GraphOp>> {
        let mut plan = Vec::new();
        for s in std::mem::take(&mut self.segments) {
            if !s.is_empty() {
                s.plan(&mut plan);
            }
        }
        plan
    }

    /// Takes the waiting operations as a batch of statements.
    pub fn take(&mut self, mapping: &Mapping) -> Batch {
        let plan = self.take_plan();
        let statements = render_plan(&plan, mapping);
        let batch = Batch {
            plan,
            statements,
            end_lsn: self.end_lsn,
            partial: self.partial.take(),
            changes: self.changes,
            transactions: self.transactions,
            commits: std::mem::take(&mut self.commits),
        };
        self.changes = 0;
        self.transactions = 0;
        batch
    }
}

#[cfg(test)]
mod tests;
