//! Planning: one segment's operations coalesced per node and edge and
//! grouped into statements in the fixed order — node upserts and
//! placeholders, row-owned edges, edge deletes, edge merges, node deletes.
//!
//! Invariant: within a segment the groups, applied in order, equal the
//! segment's operations applied one by one (the batcher opens a new segment
//! wherever that would not hold).

use std::collections::HashMap;
use std::sync::Arc;

use crate::lsn::Lsn;
use crate::mapping::map::{GraphOp, Key, NodeRef, Props};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum EdgeId {
    Pair(Arc<str>, NodeRef, NodeRef),
    Key(Arc<str>, Key),
}

#[derive(Debug, Clone)]
struct Upsert {
    node: NodeRef,
    props: Props,
    lsn: Lsn,
    source: Option<(NodeRef, Lsn)>,
}

#[derive(Debug, Clone)]
struct EdgeMerge {
    from: NodeRef,
    to: NodeRef,
    props: Props,
    lsn: Lsn,
}

/// Operations that may be reordered among themselves: coalesced per node
/// and edge, run in the fixed statement order.
#[derive(Debug, Default)]
pub(super) struct Segment {
    upserts: Vec<Option<Upsert>>,
    upsert_idx: HashMap<NodeRef, usize>,
    /// Row-owned edges to set (`SetOwnedRel`), one per type and owner, each
    /// with whether an upsert of its owner came before it in the segment.
    owned: Vec<(GraphOp, bool)>,
    owned_idx: HashMap<(Arc<str>, NodeRef), usize>,
    edge_deletes: Vec<(EdgeId, Lsn)>,
    /// Where each edge's delete is in `edge_deletes`.
    edge_delete_idx: HashMap<EdgeId, usize>,
    edge_merges: Vec<Option<(EdgeId, EdgeMerge)>>,
    edge_merge_idx: HashMap<EdgeId, usize>,
    deletes: Vec<(NodeRef, Lsn)>,
    deleted: HashMap<NodeRef, usize>,
    /// Labels of the nodes deleted in this segment.
    deleted_labels: std::collections::HashSet<Arc<str>>,
    /// Nodes that a coalesced-away operation would have created as
    /// placeholders; they are created all the same.
    ensure: Vec<NodeRef>,
    ensured: std::collections::HashSet<NodeRef>,
    /// Placeholders a coalesced-away row-owned edge would have made only if
    /// its owner passed the edge's guard (`EnsureEndOf`). Checked before
    /// this segment's upserts, so against the owner as it was before them.
    ensure_if: Vec<GraphOp>,
    pub(super) truncate: Option<GraphOp>,
}

impl Segment {
    pub(super) fn is_empty(&self) -> bool {
        self.upsert_idx.is_empty()
            && self.owned.is_empty()
            && self.edge_deletes.is_empty()
            && self.edge_merge_idx.is_empty()
            && self.ensure.is_empty()
            && self.ensure_if.is_empty()
            && self.deletes.is_empty()
            && self.truncate.is_none()
    }

    /// Whether `op` would be reordered across a delete of a node it
    /// touches, or would coalesce a node of a `history` label with its
    /// state from another transaction (each is a version).
    pub(super) fn conflicts(
        &self,
        op: &GraphOp,
        history: &std::collections::HashSet<Arc<str>>,
    ) -> bool {
        let touched = |n: &NodeRef| self.deleted.contains_key(n);
        match op {
            // A key change reads the old node: neither it nor the new one
            // may have been written earlier in the segment (the statement
            // that copies runs before the segment's other upserts).
            GraphOp::UpsertNode {
                node,
                source: Some((old, _)),
                ..
            } => {
                touched(node)
                    || touched(old)
                    || self.upsert_idx.contains_key(node)
                    || self.upsert_idx.contains_key(old)
            }
            // A later write must not join a key change (its guard would
            // judge the copy at the later LSN).
            GraphOp::UpsertNode { node, lsn, .. } => {
                touched(node)
                    || self
                        .upsert_idx
                        .get(node)
                        .and_then(|&i| self.upserts[i].as_ref())
                        .is_some_and(|u| {
                            u.source.is_some() || (u.lsn != *lsn && history.contains(&node.label))
                        })
            }
            GraphOp::SetOwnedRel { own, other, .. } => {
                touched(own) || other.as_ref().is_some_and(touched)
            }
            // An edge with key identity may move, taking its properties from
            // wherever it is: the delete of a node of either end's label
            // (which runs later in the segment) may have removed it.
            GraphOp::MergeEdge { from, to, key, .. } => {
                touched(from)
                    || touched(to)
                    || (!key.0.is_empty()
                        && (self.deleted_labels.contains(&from.label)
                            || self.deleted_labels.contains(&to.label)))
            }
            // Deleted again by another transaction (messages can): for a
            // history label the first delete closes the version.
            GraphOp::DeleteNode { node, lsn } => {
                history.contains(&node.label)
                    && self
                        .deleted
                        .get(node)
                        .is_some_and(|&i| self.deletes[i].1 != *lsn)
            }
            GraphOp::DeleteEdge { .. }
            | GraphOp::EnsureNode { .. }
            | GraphOp::EnsureEndOf { .. } => false,
            GraphOp::TruncateLabel { .. } | GraphOp::TruncateType { .. } => true,
        }
    }

    fn ensure(&mut self, node: &NodeRef) {
        if self.ensured.insert(node.clone()) {
            self.ensure.push(node.clone());
        }
    }

    pub(super) fn add(&mut self, op: GraphOp) {
        match op {
            GraphOp::EnsureNode { node } => self.ensure(&node),
            op @ GraphOp::EnsureEndOf { .. } => self.ensure_if.push(op),
            GraphOp::UpsertNode {
                node,
                props,
                lsn,
                source,
            } => match self.upsert_idx.get(&node) {
                Some(&i) => {
                    // Later writes of the same node coalesce (never into or
                    // onto a key change: those open a new segment).
                    let Some(entry) = self.upserts[i].as_mut() else {
                        return;
                    };
                    for (name, v) in props {
                        match entry.props.iter_mut().find(|(n, _)| *n == name) {
                            Some(slot) => slot.1 = v,
                            None => entry.props.push((name, v)),
                        }
                    }
                    entry.lsn = entry.lsn.max(lsn);
                }
                None => {
                    self.upsert_idx.insert(node.clone(), self.upserts.len());
                    self.upserts.push(Some(Upsert {
                        node,
                        props,
                        lsn,
                        source,
                    }));
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
                        self.deleted_labels.insert(Arc::clone(&node.label));
                        self.deleted.insert(node.clone(), self.deletes.len());
                        self.deletes.push((node, lsn));
                    }
                }
            }
            GraphOp::SetOwnedRel {
                ref rel_type,
                ref own,
                ..
            } => {
                let id = (Arc::clone(rel_type), own.clone());
                // Whether the owner's guard surely passes for this edge: an
                // upsert of the owner came earlier in the segment.
                let owner_written = self.upsert_idx.contains_key(own);
                match self.owned_idx.get(&id) {
                    Some(&i) => {
                        // The edge it replaces would have made a placeholder
                        // at its other end, if its owner's guard let it.
                        if let (
                            GraphOp::SetOwnedRel {
                                own,
                                other: Some(prev),
                                lsn,
                                ..
                            },
                            written,
                        ) = &self.owned[i]
                        {
                            self.ensure_if.push(GraphOp::EnsureEndOf {
                                node: prev.clone(),
                                owner: own.clone(),
                                owner_written: *written,
                                lsn: *lsn,
                            });
                        }
                        self.owned[i] = (op, owner_written);
                    }
                    None => {
                        self.owned_idx.insert(id, self.owned.len());
                        self.owned.push((op, owner_written));
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
                            // moves the edge with its properties.
                            let prev_from = std::mem::replace(&mut m.from, from);
                            let prev_to = std::mem::replace(&mut m.to, to);
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
                // Deleted again later in the segment: the later delete
                // decides (an edge stamped between the two must go).
                match self.edge_delete_idx.get(&id) {
                    Some(&i) => self.edge_deletes[i].1 = self.edge_deletes[i].1.max(lsn),
                    None => {
                        self.edge_delete_idx
                            .insert(id.clone(), self.edge_deletes.len());
                        self.edge_deletes.push((id, lsn));
                    }
                }
            }
            op @ (GraphOp::TruncateLabel { .. } | GraphOp::TruncateType { .. }) => {
                self.truncate = Some(op)
            }
        }
    }

    /// The operations of this segment grouped into statements (each group
    /// one statement of one kind and target), in the order that keeps it exact.
    pub(super) fn plan(self, out: &mut Vec<Vec<GraphOp>>) {
        if let Some(op) = self.truncate {
            out.push(vec![op]);
            return;
        }
        // 0. conditional placeholders, against the owners as they were
        //    before this segment, by label and owner label.
        let mut groups: Groups<(Arc<str>, Arc<str>)> = Groups::default();
        for op in self.ensure_if {
            if let GraphOp::EnsureEndOf { node, owner, .. } = &op {
                let group = (Arc::clone(&node.label), Arc::clone(&owner.label));
                groups.push(group, op);
            }
        }
        out.extend(groups.into_inner());
        // 1. node upserts, by label, key changes first (voided entries were
        //    deleted later).
        let mut groups: Groups<Arc<str>> = Groups::default();
        let mut moves: Groups<Arc<str>> = Groups::default();
        for u in self.upserts.into_iter().flatten() {
            let to = if u.source.is_some() {
                &mut moves
            } else {
                &mut groups
            };
            to.push(
                Arc::clone(&u.node.label),
                GraphOp::UpsertNode {
                    node: u.node,
                    props: u.props,
                    lsn: u.lsn,
                    source: u.source,
                },
            );
        }
        out.extend(moves.into_inner());
        out.extend(groups.into_inner());
        let mut groups: Groups<Arc<str>> = Groups::default();
        for node in self.ensure {
            groups.push(Arc::clone(&node.label), GraphOp::EnsureNode { node });
        }
        out.extend(groups.into_inner());

        // 2. row-owned relationships, by type, direction and label.
        let mut groups: Groups<(Arc<str>, bool, Arc<str>)> = Groups::default();
        for (op, _) in self.owned {
            if let GraphOp::SetOwnedRel {
                rel_type,
                own_is_from,
                own,
                ..
            } = &op
            {
                let group = (Arc::clone(rel_type), *own_is_from, Arc::clone(&own.label));
                groups.push(group, op);
            }
        }
        out.extend(groups.into_inner());

        // 3. edge deletes, by type, identity and the ends' labels.
        let mut groups: Groups<(Arc<str>, Option<Ends>)> = Groups::default();
        for (id, lsn) in self.edge_deletes {
            match id {
                EdgeId::Pair(t, f, to) => groups.push(
                    (
                        Arc::clone(&t),
                        Some((Arc::clone(&f.label), Arc::clone(&to.label))),
                    ),
                    GraphOp::DeleteEdge {
                        rel_type: t,
                        key: Key(Vec::new()),
                        ends: Some((f, to)),
                        lsn,
                    },
                ),
                EdgeId::Key(t, k) => groups.push(
                    (Arc::clone(&t), None),
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

        // 4. edge merges, by type and the ends' labels (one type from
        //    messages may join several pairs of labels).
        let mut groups: Groups<(Arc<str>, Arc<str>, Arc<str>)> = Groups::default();
        for (id, m) in self.edge_merges.into_iter().flatten() {
            let (t, key) = match id {
                EdgeId::Pair(t, _, _) => (t, Key(Vec::new())),
                EdgeId::Key(t, k) => (t, k),
            };
            groups.push(
                (
                    Arc::clone(&t),
                    Arc::clone(&m.from.label),
                    Arc::clone(&m.to.label),
                ),
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

/// The labels at the start and the end of an edge.
type Ends = (Arc<str>, Arc<str>);

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
