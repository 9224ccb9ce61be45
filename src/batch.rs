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
    /// Statements, to run in order in one Neo4j transaction.
    pub statements: Vec<Statement>,
    /// End LSN of the last transaction in the batch: the new checkpoint.
    pub end_lsn: Lsn,
    /// Row changes the batch holds.
    pub changes: usize,
    /// Transactions the batch holds.
    pub transactions: usize,
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
    truncate: Option<GraphOp>,
}

impl Segment {
    fn is_empty(&self) -> bool {
        self.upsert_idx.is_empty()
            && self.owned.is_empty()
            && self.edge_deletes.is_empty()
            && self.edge_merge_idx.is_empty()
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
            GraphOp::DeleteNode { .. } | GraphOp::DeleteEdge { .. } => false,
            GraphOp::TruncateLabel { .. } | GraphOp::TruncateType { .. } => true,
        }
    }

    fn add(&mut self, op: GraphOp) {
        match op {
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
                // The upsert before it is void; the delete removes the node
                // (and its edges) whatever came before in this segment.
                if let Some(i) = self.upsert_idx.remove(&node) {
                    self.upserts[i] = None;
                }
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
                    Some(&i) => self.owned[i] = (rel_type, own_is_from, own, other, lsn),
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
                        m.from = from;
                        m.to = to;
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
                    self.edge_merges[i] = None;
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

    /// The statements of this segment, in the order that keeps it exact.
    fn statements(self, mapping: &Mapping, out: &mut Vec<Statement>) {
        if let Some(op) = self.truncate {
            let cypher = match op {
                GraphOp::TruncateLabel { label } => cypher::truncate_label(&label),
                GraphOp::TruncateType { rel_type } => cypher::truncate_type(&rel_type),
                _ => return,
            };
            out.push(Statement {
                cypher,
                rows: BoltList::new(),
            });
            return;
        }
        let lookup = Lookup::new(mapping);
        let lsn = |l: Lsn| BoltType::Integer(BoltInteger::new(l.to_i64()));

        // 1. node upserts, by label (voided entries were deleted later).
        let mut groups: Groups<Arc<str>> = Groups::default();
        for (node, props, l) in self.upserts.into_iter().flatten() {
            let row = cypher::row(vec![
                ("k", cypher::key_list(&node.key)),
                ("p", cypher::props_map(&props)),
                ("lsn", lsn(l)),
            ]);
            groups.push(Arc::clone(&node.label), row);
        }
        for (label, rows) in groups.into_inner() {
            out.push(Statement {
                cypher: cypher::upsert_nodes(&label, lookup.key_props(&label)),
                rows,
            });
        }

        // 2. row-owned relationships, by type.
        let mut groups: Groups<(Arc<str>, bool, Arc<str>)> = Groups::default();
        for (rel_type, own_is_from, own, other, l) in self.owned {
            let row = cypher::row(vec![
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
            ]);
            groups.push((rel_type, own_is_from, own.label), row);
        }
        for ((rel_type, own_is_from, own_label), rows) in groups.into_inner() {
            let Some(other_label) = lookup.other_end(&rel_type, own_is_from) else {
                continue;
            };
            out.push(Statement {
                cypher: cypher::set_owned_rels(
                    &rel_type,
                    &own_label,
                    lookup.key_props(&own_label),
                    &other_label,
                    lookup.key_props(&other_label),
                    own_is_from,
                ),
                rows,
            });
        }

        // 3. edge deletes, by type and identity.
        let mut groups: Groups<(Arc<str>, bool)> = Groups::default();
        for (id, l) in self.edge_deletes {
            match id {
                EdgeId::Pair(t, f, to) => groups.push(
                    (t, true),
                    cypher::row(vec![
                        ("f", cypher::key_list(&f.key)),
                        ("t", cypher::key_list(&to.key)),
                        ("lsn", lsn(l)),
                    ]),
                ),
                EdgeId::Key(t, k) => groups.push(
                    (t, false),
                    cypher::row(vec![("k", cypher::key_list(&k)), ("lsn", lsn(l))]),
                ),
            }
        }
        for ((t, pair), rows) in groups.into_inner() {
            let Some(rel) = lookup.rel(&t) else { continue };
            let cypher = if pair {
                cypher::delete_edges_by_ends(
                    &t,
                    (&rel.from.label, &rel.from.key_props),
                    (&rel.to.label, &rel.to.key_props),
                )
            } else {
                cypher::delete_edges_by_key(&t, &rel.key_columns)
            };
            out.push(Statement { cypher, rows });
        }

        // 4. edge merges, by type.
        let mut groups: Groups<Arc<str>> = Groups::default();
        for (id, m) in self.edge_merges.into_iter().flatten() {
            let (t, k) = match id {
                EdgeId::Pair(t, _, _) => (t, Key(Vec::new())),
                EdgeId::Key(t, k) => (t, k),
            };
            groups.push(
                t,
                cypher::row(vec![
                    ("f", cypher::key_list(&m.from.key)),
                    ("t", cypher::key_list(&m.to.key)),
                    ("k", cypher::key_list(&k)),
                    ("p", cypher::props_map(&m.props)),
                    ("lsn", lsn(m.lsn)),
                ]),
            );
        }
        for (t, rows) in groups.into_inner() {
            let Some(rel) = lookup.rel(&t) else { continue };
            let edge_key = match rel.kind {
                RelKind::Edge {
                    pair_identity: false,
                } => Some(rel.key_columns.as_slice()),
                _ => None,
            };
            out.push(Statement {
                cypher: cypher::merge_edges(
                    &t,
                    (&rel.from.label, &rel.from.key_props),
                    (&rel.to.label, &rel.to.key_props),
                    edge_key,
                ),
                rows,
            });
        }

        // 5. node deletes, by label.
        let mut groups: Groups<Arc<str>> = Groups::default();
        for (node, l) in self.deletes {
            groups.push(
                Arc::clone(&node.label),
                cypher::row(vec![("k", cypher::key_list(&node.key)), ("lsn", lsn(l))]),
            );
        }
        for (label, rows) in groups.into_inner() {
            out.push(Statement {
                cypher: cypher::delete_nodes(&label, lookup.key_props(&label)),
                rows,
            });
        }
    }
}

/// Rows grouped by a key, in first-seen order.
struct Groups<K> {
    order: Vec<(K, BoltList)>,
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
    fn push(&mut self, k: K, row: BoltType) {
        let i = *self.idx.entry(k.clone()).or_insert_with(|| {
            self.order.push((k, BoltList::new()));
            self.order.len() - 1
        });
        self.order[i].1.push(row);
    }

    fn into_inner(self) -> Vec<(K, BoltList)> {
        self.order
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
    changes: usize,
    transactions: usize,
}

impl Batcher {
    /// An empty batcher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.transactions == 0
    }

    /// Row changes waiting.
    pub fn changes(&self) -> usize {
        self.changes
    }

    /// End LSN of the last transaction added.
    pub fn end_lsn(&self) -> Lsn {
        self.end_lsn
    }

    /// Adds one whole transaction's operations.
    pub fn push_transaction(&mut self, ops: Vec<GraphOp>, changes: usize, end_lsn: Lsn) {
        debug_assert!(
            end_lsn >= self.end_lsn,
            "transactions arrive in commit order"
        );
        for op in ops {
            let new_segment = match self.segments.last() {
                None => true,
                Some(s) => s.truncate.is_some() || s.conflicts(&op),
            };
            if new_segment {
                self.segments.push(Segment::default());
            }
            let is_truncate = matches!(
                op,
                GraphOp::TruncateLabel { .. } | GraphOp::TruncateType { .. }
            );
            if let Some(s) = self.segments.last_mut() {
                s.add(op);
            }
            if is_truncate {
                // Nothing may be reordered across a truncate.
                self.segments.push(Segment::default());
            }
        }
        self.end_lsn = self.end_lsn.max(end_lsn);
        self.changes += changes;
        self.transactions += 1;
    }

    /// Takes the waiting operations as a batch of statements.
    pub fn take(&mut self, mapping: &Mapping) -> Batch {
        let mut statements = Vec::new();
        for s in std::mem::take(&mut self.segments) {
            if !s.is_empty() {
                s.statements(mapping, &mut statements);
            }
        }
        let batch = Batch {
            statements,
            end_lsn: self.end_lsn,
            changes: self.changes,
            transactions: self.transactions,
        };
        self.changes = 0;
        self.transactions = 0;
        batch
    }
}
