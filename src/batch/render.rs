//! Rendering: planned groups of operations → `UNWIND $rows AS row …`
//! statements, their rows built straight as Bolt values, with the statement
//! texts from [`super::cypher`].
//!
//! Invariant: one statement per group, in plan order; names come from the
//! mapping (validated and quoted), values only ever travel as parameters.

use std::collections::HashMap;
use std::sync::Arc;

use neo4rs::{BoltInteger, BoltList, BoltType};

use super::{cypher, Batch, CommitTimes, Statement};
use crate::lsn::Lsn;
use crate::mapping::map::{GraphOp, Key};
use crate::mapping::{Mapping, RelKind};

/// The statements for a plan, in order (versions, if any, stamped with
/// the time they are written).
pub fn render_plan(plan: &[Vec<GraphOp>], mapping: &Mapping) -> Vec<Statement> {
    render_plan_at(plan, mapping, &CommitTimes::new())
}

/// The statements for a plan, in order; the versions of history labels
/// start at the commit times of their transactions (`times`, by commit
/// LSN), or when they are written where it has none.
pub fn render_plan_at(
    plan: &[Vec<GraphOp>],
    mapping: &Mapping,
    times: &CommitTimes,
) -> Vec<Statement> {
    let lookup = Lookup::new(mapping);
    let mut out = Vec::with_capacity(plan.len());
    for group in plan {
        let Some(st) = render(group, &lookup) else {
            continue;
        };
        let history = group.first().and_then(|op| match op {
            GraphOp::UpsertNode { node, .. } | GraphOp::DeleteNode { node, .. } => {
                Some(&node.label)
            }
            GraphOp::TruncateLabel { label, .. } => Some(label),
            _ => None,
        });
        match history.filter(|l| lookup.history.contains(&***l)) {
            Some(label) => {
                let v = versions(group, label, &lookup, times);
                out.push(st);
                out.push(v);
            }
            None => out.push(st),
        }
    }
    out
}

/// The version statement of a group of a history label: after upserts, a
/// new version of each node written (the previous one closed); after
/// deletes and truncates, the last version closed.
fn versions(
    group: &[GraphOp],
    label: &Arc<str>,
    lookup: &Lookup<'_>,
    times: &CommitTimes,
) -> Statement {
    let at = |l: Lsn| match times.get(&l) {
        Some(t) => crate::batch::cypher::to_bolt(&crate::decode::Value::TimestampTz(
            crate::lsn::pg_time(*t).fixed_offset(),
        )),
        None => BoltType::Null(neo4rs::BoltNull),
    };
    let lsn = |l: Lsn| BoltType::Integer(BoltInteger::new(l.to_i64()));
    let mut rows = BoltList::with_capacity(group.len());
    for op in group {
        let row = match op {
            GraphOp::UpsertNode { node, lsn: l, .. } | GraphOp::DeleteNode { node, lsn: l } => {
                cypher::row(vec![
                    ("k", cypher::key_list(&node.key)),
                    ("lsn", lsn(*l)),
                    ("at", at(*l)),
                ])
            }
            GraphOp::TruncateLabel { lsn: l, .. } => {
                cypher::row(vec![("lsn", lsn(*l)), ("at", at(*l))])
            }
            _ => continue,
        };
        rows.push(row);
    }
    let key = lookup.key_props(label);
    let cypher = match group.first() {
        Some(GraphOp::UpsertNode { .. }) => cypher::open_versions(label, key),
        Some(GraphOp::DeleteNode { .. }) => cypher::close_versions(label, key),
        _ => cypher::close_all_versions(label, key),
    };
    Statement { cypher, rows }
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
        self.statements = render_plan_at(&self.plan, mapping, &self.times);
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
        GraphOp::EnsureEndOf { owner, lsn, .. } => (
            table_of_label(&owner.label),
            key_text(&owner.key),
            Some(*lsn),
        ),
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
        GraphOp::TruncateLabel { label, lsn } => {
            (table_of_label(label), "(all rows)".into(), Some(*lsn))
        }
        GraphOp::TruncateType { rel_type, lsn } => {
            (table_of_type(rel_type), "(all rows)".into(), Some(*lsn))
        }
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
                source,
            } => {
                let mut fields = vec![
                    ("k", cypher::key_list(&node.key)),
                    ("p", cypher::props_map(&props)),
                    ("lsn", lsn(l)),
                ];
                if let Some((old, sl)) = source {
                    fields.push(("s", cypher::key_list(&old.key)));
                    fields.push(("sl", lsn(sl)));
                }
                cypher::row(fields)
            }
            GraphOp::DeleteNode { node, lsn: l } => {
                cypher::row(vec![("k", cypher::key_list(&node.key)), ("lsn", lsn(l))])
            }
            GraphOp::EnsureNode { node } => cypher::row(vec![("k", cypher::key_list(&node.key))]),
            GraphOp::EnsureEndOf {
                node,
                owner,
                owner_written,
                lsn: l,
            } => cypher::row(vec![
                ("k", cypher::key_list(&node.key)),
                ("o", cypher::key_list(&owner.key)),
                (
                    "w",
                    BoltType::Boolean(neo4rs::BoltBoolean::new(owner_written)),
                ),
                ("lsn", lsn(l)),
            ]),
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
            GraphOp::TruncateLabel { lsn: l, .. } | GraphOp::TruncateType { lsn: l, .. } => {
                cypher::row(vec![("lsn", lsn(l))])
            }
        };
        rows.push(row);
    }
    let cypher = match first {
        GraphOp::UpsertNode {
            node, source: None, ..
        } => cypher::upsert_nodes(&node.label, lookup.key_props(&node.label)),
        GraphOp::UpsertNode { node, .. } => {
            cypher::move_nodes(&node.label, lookup.key_props(&node.label))
        }
        GraphOp::DeleteNode { node, .. } => {
            cypher::delete_nodes(&node.label, lookup.key_props(&node.label))
        }
        GraphOp::EnsureNode { node } => {
            cypher::ensure_nodes(&node.label, lookup.key_props(&node.label))
        }
        GraphOp::EnsureEndOf { node, owner, .. } => cypher::ensure_end_nodes(
            (&node.label, lookup.key_props(&node.label)),
            (&owner.label, lookup.key_props(&owner.label)),
        ),
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
        // The ends' labels come from the operation: a type from messages
        // may join several pairs of labels (a mapped type joins one).
        GraphOp::DeleteEdge { rel_type, ends, .. } => match ends {
            Some((f, t)) => cypher::delete_edges_by_ends(
                rel_type,
                (&f.label, lookup.key_props(&f.label)),
                (&t.label, lookup.key_props(&t.label)),
            ),
            None => cypher::delete_edges_by_key(rel_type, &lookup.rel(rel_type)?.key_columns),
        },
        GraphOp::MergeEdge {
            rel_type, from, to, ..
        } => {
            // A type no table maps (from messages) is identified by its ends.
            let edge_key = match lookup.rel(rel_type).map(|r| (r.kind, r)) {
                Some((
                    RelKind::Edge {
                        pair_identity: false,
                    },
                    rel,
                )) => Some(rel.key_columns.as_slice()),
                _ => None,
            };
            cypher::merge_edges(
                rel_type,
                (&from.label, lookup.key_props(&from.label)),
                (&to.label, lookup.key_props(&to.label)),
                edge_key,
            )
        }
        GraphOp::TruncateLabel { label, .. } => {
            cypher::truncate_label(label, lookup.key_props(label))
        }
        GraphOp::TruncateType { rel_type, .. } => cypher::truncate_type(rel_type),
    };
    Some(Statement { cypher, rows })
}

/// Finds mapping details by label or type.
struct Lookup<'m> {
    labels: HashMap<&'m str, &'m [Arc<str>]>,
    rels: HashMap<&'m str, &'m crate::mapping::RelTarget>,
    /// Labels whose versions are kept.
    history: std::collections::HashSet<&'m str>,
}

impl<'m> Lookup<'m> {
    fn new(mapping: &'m Mapping) -> Self {
        let mut labels = HashMap::new();
        let mut rels = HashMap::new();
        let mut history = std::collections::HashSet::new();
        for t in mapping.tables.values() {
            if let Some(n) = &t.node {
                labels.insert(&*n.label, n.key_props.as_slice());
                if n.history {
                    history.insert(&*n.label);
                }
            }
            for r in &t.rels {
                rels.insert(&*r.rel_type, r);
            }
        }
        for (label, key) in mapping.event_keys.iter().chain(&mapping.external_keys) {
            labels.insert(&**label, key.as_slice());
        }
        Lookup {
            labels,
            rels,
            history,
        }
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

/// A statement to plan before the stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanAhead {
    /// Its text.
    pub text: String,
    /// The most rows it carries in a batch.
    pub rows: usize,
    /// Run it (in a transaction rolled back) with rows of keys no table
    /// has, rather than only `EXPLAIN` it: a plan's first run costs more
    /// than later ones.
    pub run: bool,
    /// The longest key among the mapping's labels and types (the length of
    /// each key list in those rows).
    pub key_width: usize,
}

/// Every statement text the mapping's changes can render to, each with the
/// largest number of rows it can carry in a batch of `max_changes`
/// (TRUNCATE's carry one; key changes are planned for few): what
/// [`crate::sink::Sink::plan_ahead`] has Neo4j plan before the stream
/// starts. Neo4j caches a plan per statement text *and* per order of
/// magnitude of a list parameter's length (`$rows` of 200 and of 1,000
/// rows share a plan, 50 rows get their own), so a statement is planned
/// once per power of ten up to its largest size.
pub fn statement_texts(mapping: &Mapping, max_changes: usize) -> Vec<PlanAhead> {
    let lookup = Lookup::new(mapping);
    let key_width = lookup
        .labels
        .values()
        .map(|k| k.len())
        .chain(
            mapping
                .tables
                .values()
                .flat_map(|t| t.rels.iter().map(|r| r.key_columns.len())),
        )
        .max()
        .unwrap_or(1)
        .max(1);
    let mut out: Vec<PlanAhead> = Vec::new();
    let mut add = |text: String, rows: usize| {
        if !out.iter().any(|p| p.text == text) {
            // A TRUNCATE's statement reads the whole label or type: planned
            // only, never run; the rest find their rows by key.
            let run = rows > 1;
            out.push(PlanAhead {
                text,
                rows,
                run,
                key_width,
            });
        }
    };
    let few = max_changes.min(10);
    let mut labels: Vec<&str> = lookup.labels.keys().copied().collect();
    labels.sort_unstable();
    for label in labels {
        let key = lookup.key_props(label);
        add(cypher::upsert_nodes(label, key), max_changes);
        add(cypher::delete_nodes(label, key), max_changes);
        add(cypher::ensure_nodes(label, key), max_changes);
        add(cypher::move_nodes(label, key), few);
        add(cypher::truncate_label(label, key), 1);
        if lookup.history.contains(label) {
            add(cypher::open_versions(label, key), max_changes);
            add(cypher::close_versions(label, key), max_changes);
            add(cypher::close_all_versions(label, key), 1);
        }
    }
    let mut tables: Vec<_> = mapping.tables.iter().collect();
    tables.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (_, table) in tables {
        for rel in &table.rels {
            let t = &*rel.rel_type;
            let from = (&*rel.from.label, lookup.key_props(&rel.from.label));
            let to = (&*rel.to.label, lookup.key_props(&rel.to.label));
            match rel.kind {
                RelKind::RowOwned { own_is_from } => {
                    let (own, other) = if own_is_from { (from, to) } else { (to, from) };
                    add(
                        cypher::set_owned_rels(t, own.0, own.1, other.0, other.1, own_is_from),
                        max_changes,
                    );
                    add(cypher::ensure_end_nodes(other, own), max_changes);
                }
                RelKind::Edge { pair_identity } => {
                    let key = (!pair_identity).then_some(rel.key_columns.as_slice());
                    add(cypher::merge_edges(t, from, to, key), max_changes);
                    if pair_identity {
                        add(cypher::delete_edges_by_ends(t, from, to), max_changes);
                    } else {
                        add(
                            cypher::delete_edges_by_key(t, &rel.key_columns),
                            max_changes,
                        );
                    }
                }
            }
            add(cypher::truncate_type(t), 1);
        }
    }
    out
}
