//! Mapping changes followed: what the graph owes when the mapping (or a
//! table's columns) is not what it was when `run` last wrote the table.
//!
//! Each table's *shape* — the label and key of its node, the properties
//! with the columns and types they come from, and each relationship's
//! type, endpoints, key and properties — is recorded in
//! `(:WalgraphTable {slot, table, shape})`. At start the recorded shapes
//! are compared with what the mapping makes of the tables now, and the
//! difference becomes work:
//!
//! - a label renamed (same key): the nodes are relabelled, in steps,
//!   before anything streams;
//! - a node's key changed, a label given up by its table or taken over by
//!   another one, a table taken out of the mapping: the old label's nodes
//!   are deleted with their edges, and every table whose nodes or
//!   relationships use that label is copied again;
//! - properties no longer mapped (excluded, renamed away, left out of an
//!   `include` list): removed from every node or edge;
//! - properties newly mapped or sourced from another column or type, a
//!   relationship added: the table is copied again;
//! - a relationship taken out, or whose endpoints or key changed: its edges
//!   are deleted (and copied again if it is still mapped).
//!
//! Invariants: deletions and removals run (between the stream's batches)
//! before any table is copied again, and the copies are the online
//! backfill's, so stream and copy keep each other's newer state; the new
//! records are written only once every copy is done, so a crash before
//! then finds the same difference at the next start and does the work
//! again (each step can be repeated).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::decode::Column;
use crate::mapping::{quote, type_kind, RelKind, TableTarget};

/// What the mapping makes of one table, as recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Shape {
    /// The node its rows become.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeShape>,
    /// The relationships its rows carry.
    #[serde(default)]
    pub rels: Vec<RelShape>,
}

/// A table's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct NodeShape {
    /// Label.
    pub label: String,
    /// The key, `property=column:kind` (see [`type_kind`]).
    pub key: Vec<String>,
    /// The other properties, `property=column:type-oid`.
    pub props: Vec<String>,
}

/// A relationship endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct EndShape {
    /// The node's label.
    pub label: String,
    /// Its key from this table's columns, `property=column:kind`.
    pub key: Vec<String>,
}

/// One relationship of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RelShape {
    /// Relationship type.
    #[serde(rename = "type")]
    pub rel_type: String,
    /// How rows make edges.
    pub kind: String,
    /// Start node.
    pub from: EndShape,
    /// End node.
    pub to: EndShape,
    /// The table's key columns (an edge's identity when not its two nodes).
    pub key: Vec<String>,
    /// Properties, `property=column:type-oid`.
    pub props: Vec<String>,
}

impl Shape {
    /// What `target` makes of a table with `columns`.
    pub(super) fn of(target: &TableTarget, columns: &[Column]) -> Shape {
        let oid = |column: &str| {
            columns
                .iter()
                .find(|c| c.name == column)
                .map_or(0, |c| c.type_oid)
        };
        let typed = |prop: &str, column: &str| format!("{prop}={column}:{}", oid(column));
        // A key holds equal values for types of one kind (`int4` and
        // `int8`): a change within the kind leaves every node what it is.
        let keyed =
            |prop: &str, column: &str| format!("{prop}={column}:{}", type_kind(oid(column)));
        let node = target.node.as_ref().map(|n| NodeShape {
            label: n.label.to_string(),
            key: n
                .key_props
                .iter()
                .zip(&n.key_columns)
                .map(|(p, c)| keyed(p, c))
                .collect(),
            props: n
                .props_for(columns)
                .iter()
                .map(|p| typed(&p.property, &p.column))
                .collect(),
        });
        let end = |e: &crate::mapping::EndpointTarget| EndShape {
            label: e.label.to_string(),
            key: e
                .key_props
                .iter()
                .zip(&e.columns)
                .map(|(p, c)| keyed(p, c))
                .collect(),
        };
        let rels = target
            .rels
            .iter()
            .map(|r| RelShape {
                rel_type: r.rel_type.to_string(),
                kind: match r.kind {
                    RelKind::RowOwned { own_is_from: true } => "row-owned-from".into(),
                    RelKind::RowOwned { own_is_from: false } => "row-owned-to".into(),
                    RelKind::Edge {
                        pair_identity: true,
                    } => "edge-pair".into(),
                    RelKind::Edge {
                        pair_identity: false,
                    } => "edge-keyed".into(),
                },
                from: end(&r.from),
                to: end(&r.to),
                key: r.key_columns.iter().map(|c| keyed("", c)).collect(),
                props: r
                    .props
                    .iter()
                    .map(|p| typed(&p.property, &p.column))
                    .collect(),
            })
            .collect();
        Shape { node, rels }
    }

    /// The recorded form.
    pub(super) fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A recorded shape; `None` when it cannot be read.
    pub(super) fn from_json(text: &str) -> Option<Shape> {
        serde_json::from_str(text).ok()
    }
}

/// The property a `property=column:type` entry maps.
fn prop_name(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(p, _)| p)
}

/// The properties of `old` entries that no `new` entry maps.
fn gone(old: &[String], new: &[String]) -> Vec<String> {
    old.iter()
        .map(|e| prop_name(e))
        .filter(|p| !new.iter().any(|e| prop_name(e) == *p))
        .map(str::to_string)
        .collect()
}

/// One kind of work over many graph items, done in steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Properties taken off every node of a label.
    RemoveNodeProps {
        /// Label.
        label: String,
        /// Properties.
        props: Vec<String>,
    },
    /// Properties taken off every edge of a type.
    RemoveEdgeProps {
        /// Relationship type.
        rel_type: String,
        /// Properties.
        props: Vec<String>,
    },
    /// Every edge of a type deleted.
    DeleteEdges {
        /// Relationship type.
        rel_type: String,
    },
    /// Every node of a label deleted, with its edges.
    DeleteNodes {
        /// Label.
        label: String,
    },
    /// Every node of a label given another one.
    Relabel {
        /// The label now.
        from: String,
        /// The label it becomes.
        to: String,
    },
}

impl Step {
    /// The Cypher of one step: up to `$limit` items, returning how many it
    /// changed as `c`.
    pub(super) fn cypher(&self) -> String {
        let list = |var: &str, props: &[String], sep: &str, suffix: &str| {
            props
                .iter()
                .map(|p| format!("{var}.{}{suffix}", quote(p)))
                .collect::<Vec<_>>()
                .join(sep)
        };
        match self {
            Step::RemoveNodeProps { label, props } => format!(
                "MATCH (n:{}) WHERE {} WITH n LIMIT $limit REMOVE {} RETURN count(n) AS c",
                quote(label),
                list("n", props, " OR ", " IS NOT NULL"),
                list("n", props, ", ", "")
            ),
            Step::RemoveEdgeProps { rel_type, props } => format!(
                "MATCH ()-[r:{}]->() WHERE {} WITH r LIMIT $limit REMOVE {} RETURN count(r) AS c",
                quote(rel_type),
                list("r", props, " OR ", " IS NOT NULL"),
                list("r", props, ", ", "")
            ),
            Step::DeleteEdges { rel_type } => format!(
                "MATCH ()-[r:{}]->() WITH r LIMIT $limit DELETE r RETURN count(r) AS c",
                quote(rel_type)
            ),
            Step::DeleteNodes { label } => format!(
                "MATCH (n:{}) WITH n LIMIT $limit DETACH DELETE n RETURN count(n) AS c",
                quote(label)
            ),
            Step::Relabel { from, to } => format!(
                "MATCH (n:{}) WITH n LIMIT $limit SET n:{} REMOVE n:{} RETURN count(n) AS c",
                quote(from),
                quote(to),
                quote(from)
            ),
        }
    }

    /// What the step does, for logs and errors.
    pub(super) fn describe(&self) -> String {
        match self {
            Step::RemoveNodeProps { label, props } => {
                format!("removing {} from the {label} nodes", props.join(", "))
            }
            Step::RemoveEdgeProps { rel_type, props } => {
                format!("removing {} from the {rel_type} edges", props.join(", "))
            }
            Step::DeleteEdges { rel_type } => format!("deleting the {rel_type} edges"),
            Step::DeleteNodes { label } => format!("deleting the {label} nodes"),
            Step::Relabel { from, to } => format!("relabelling the {from} nodes {to}"),
        }
    }
}

/// What the graph owes for the difference between the recorded shapes and
/// the shapes now.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// Labels renamed, done before anything streams.
    pub relabel: Vec<Step>,
    /// Removals and deletions, done between the stream's batches.
    pub steps: Vec<Step>,
    /// Tables to copy again, in order: those copied only because their
    /// edges or nodes went with a deleted label first.
    pub recopy: Vec<String>,
    /// Tables whose record is to be written (the shape now).
    pub record: Vec<String>,
    /// Tables whose record is to be deleted (taken out of the mapping).
    pub forget: Vec<String>,
}

impl Plan {
    /// Nothing to do but, perhaps, records to write.
    pub(super) fn is_work_free(&self) -> bool {
        self.relabel.is_empty() && self.steps.is_empty() && self.recopy.is_empty()
    }
}

/// The work that takes the graph from the `old` shapes (recorded; tables
/// without a record are absent) to the `new` ones (every mapped table).
pub(super) fn plan(old: &BTreeMap<String, Shape>, new: &BTreeMap<String, Shape>) -> Plan {
    let mut p = Plan::default();
    let old_labels: BTreeSet<&str> = old
        .values()
        .filter_map(|s| s.node.as_ref().map(|n| n.label.as_str()))
        .collect();
    let new_labels: BTreeSet<&str> = new
        .values()
        .filter_map(|s| s.node.as_ref().map(|n| n.label.as_str()))
        .collect();
    let mut relabel: BTreeMap<String, String> = BTreeMap::new();
    let mut deleted: BTreeSet<String> = BTreeSet::new();
    let mut changed: BTreeSet<String> = BTreeSet::new();
    let mut remove_node_props: Vec<Step> = Vec::new();

    for (table, o) in old {
        let n = new.get(table);
        match (o.node.as_ref(), n.and_then(|s| s.node.as_ref())) {
            (Some(on), Some(nn)) if on.key == nn.key => {
                if on.label != nn.label {
                    if old_labels.contains(nn.label.as_str())
                        || new_labels.contains(on.label.as_str())
                    {
                        // A label swapped or handed on: no relabel can
                        // keep the two apart, so both are rebuilt.
                        deleted.insert(on.label.clone());
                        changed.insert(table.clone());
                        continue;
                    }
                    relabel.insert(on.label.clone(), nn.label.clone());
                }
                let gone = gone(&on.props, &nn.props);
                if !gone.is_empty() {
                    remove_node_props.push(Step::RemoveNodeProps {
                        label: nn.label.clone(),
                        props: gone,
                    });
                }
                if nn.props.iter().any(|e| !on.props.contains(e)) {
                    changed.insert(table.clone());
                }
            }
            (Some(on), Some(_)) => {
                deleted.insert(on.label.clone());
                changed.insert(table.clone());
            }
            (Some(on), None) => {
                deleted.insert(on.label.clone());
            }
            (None, Some(_)) => {
                changed.insert(table.clone());
            }
            (None, None) => {}
        }
    }

    // Relationships by type (a type is mapped once), their old endpoints
    // under the labels they are renamed to.
    let renamed = |e: &EndShape| EndShape {
        label: relabel
            .get(&e.label)
            .cloned()
            .unwrap_or_else(|| e.label.clone()),
        key: e.key.clone(),
    };
    let old_rels: BTreeMap<&str, (&String, RelShape)> = old
        .iter()
        .flat_map(|(t, s)| {
            s.rels.iter().map(move |r| {
                (
                    r.rel_type.as_str(),
                    (
                        t,
                        RelShape {
                            from: renamed(&r.from),
                            to: renamed(&r.to),
                            ..r.clone()
                        },
                    ),
                )
            })
        })
        .collect();
    let new_rels: BTreeMap<&str, (&String, &RelShape)> = new
        .iter()
        .flat_map(|(t, s)| s.rels.iter().map(move |r| (r.rel_type.as_str(), (t, r))))
        .collect();
    let mut edge_steps = Vec::new();
    for (ty, (ot, or)) in &old_rels {
        match new_rels.get(ty) {
            Some((nt, nr))
                if nt == ot
                    && or.kind == nr.kind
                    && or.from == nr.from
                    && or.to == nr.to
                    && or.key == nr.key =>
            {
                let gone = gone(&or.props, &nr.props);
                if !gone.is_empty() {
                    edge_steps.push(Step::RemoveEdgeProps {
                        rel_type: ty.to_string(),
                        props: gone,
                    });
                }
                if nr.props.iter().any(|e| !or.props.contains(e)) {
                    changed.insert((*nt).clone());
                }
            }
            Some((nt, _)) => {
                edge_steps.push(Step::DeleteEdges {
                    rel_type: ty.to_string(),
                });
                changed.insert((*nt).clone());
            }
            None => edge_steps.push(Step::DeleteEdges {
                rel_type: ty.to_string(),
            }),
        }
    }
    for (ty, (nt, _)) in &new_rels {
        if !old_rels.contains_key(ty) && old.contains_key(*nt) {
            changed.insert((*nt).clone());
        }
    }

    // A deleted label takes every edge at its nodes with it: each table
    // whose nodes or relationships use it now is copied again.
    let mut dependents = BTreeSet::new();
    for (table, s) in new {
        let uses = s.node.as_ref().is_some_and(|n| deleted.contains(&n.label))
            || s.rels
                .iter()
                .any(|r| deleted.contains(&r.from.label) || deleted.contains(&r.to.label));
        if uses && !changed.contains(table) {
            dependents.insert(table.clone());
        }
    }
    // Only tables the graph already holds are copied again; one new to the
    // mapping is copied by the backfill anyway.
    changed.retain(|t| new.contains_key(t));

    p.relabel = relabel
        .into_iter()
        .map(|(from, to)| Step::Relabel { from, to })
        .collect();
    p.steps = edge_steps;
    p.steps.extend(remove_node_props);
    p.steps
        .extend(deleted.into_iter().map(|label| Step::DeleteNodes { label }));
    p.recopy = dependents.into_iter().chain(changed).collect();
    p.record = new
        .iter()
        .filter(|(t, s)| old.get(*t) != Some(*s))
        .map(|(t, _)| t.clone())
        .collect();
    p.forget = old
        .keys()
        .filter(|t| !new.contains_key(*t))
        .cloned()
        .collect();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(label: &str, key: &[&str], props: &[&str]) -> Option<NodeShape> {
        Some(NodeShape {
            label: label.into(),
            key: key.iter().map(|s| s.to_string()).collect(),
            props: props.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn fk(ty: &str, from: &str, to: &str, col: &str) -> RelShape {
        RelShape {
            rel_type: ty.into(),
            kind: "row-owned-from".into(),
            from: EndShape {
                label: from.into(),
                key: vec!["id=id:23".into()],
            },
            to: EndShape {
                label: to.into(),
                key: vec![format!("id={col}:23")],
            },
            key: vec![],
            props: vec![],
        }
    }

    fn world() -> BTreeMap<String, Shape> {
        let mut m = BTreeMap::new();
        m.insert(
            "public.users".to_string(),
            Shape {
                node: node("User", &["id=id:23"], &["name=name:25", "email=email:25"]),
                rels: vec![],
            },
        );
        m.insert(
            "public.orders".to_string(),
            Shape {
                node: node("Order", &["id=id:23"], &["total=total:1700"]),
                rels: vec![fk("PLACED_BY", "Order", "User", "user_id")],
            },
        );
        m
    }

    #[test]
    fn the_same_shapes_owe_nothing() {
        let w = world();
        let p = plan(&w, &w);
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn an_excluded_property_is_removed_and_nothing_copied() {
        let old = world();
        let mut new = world();
        new.get_mut("public.users").unwrap().node = node("User", &["id=id:23"], &["name=name:25"]);
        let p = plan(&old, &new);
        assert_eq!(
            p.steps,
            vec![Step::RemoveNodeProps {
                label: "User".into(),
                props: vec!["email".into()]
            }]
        );
        assert!(p.recopy.is_empty() && p.relabel.is_empty());
        assert_eq!(p.record, vec!["public.users".to_string()]);
    }

    #[test]
    fn a_renamed_property_is_removed_and_the_table_copied_again() {
        let old = world();
        let mut new = world();
        new.get_mut("public.users").unwrap().node =
            node("User", &["id=id:23"], &["name=name:25", "mail=email:25"]);
        let p = plan(&old, &new);
        assert_eq!(
            p.steps,
            vec![Step::RemoveNodeProps {
                label: "User".into(),
                props: vec!["email".into()]
            }]
        );
        assert_eq!(p.recopy, vec!["public.users".to_string()]);
    }

    #[test]
    fn a_renamed_label_is_relabelled_and_its_edges_kept() {
        let old = world();
        let mut new = world();
        new.get_mut("public.users").unwrap().node =
            node("Person", &["id=id:23"], &["name=name:25", "email=email:25"]);
        new.get_mut("public.orders").unwrap().rels =
            vec![fk("PLACED_BY", "Order", "Person", "user_id")];
        let p = plan(&old, &new);
        assert_eq!(
            p.relabel,
            vec![Step::Relabel {
                from: "User".into(),
                to: "Person".into()
            }]
        );
        assert!(p.steps.is_empty(), "{:?}", p.steps);
        assert!(p.recopy.is_empty(), "{:?}", p.recopy);
    }

    #[test]
    fn a_changed_key_rebuilds_the_label_and_every_table_pointing_at_it() {
        let old = world();
        let mut new = world();
        new.get_mut("public.users").unwrap().node =
            node("User", &["email=email:25"], &["name=name:25", "id=id:23"]);
        new.get_mut("public.orders").unwrap().rels = vec![RelShape {
            to: EndShape {
                label: "User".into(),
                key: vec!["email=user_email:25".into()],
            },
            ..fk("PLACED_BY", "Order", "User", "user_id")
        }];
        let p = plan(&old, &new);
        assert!(p.steps.contains(&Step::DeleteNodes {
            label: "User".into()
        }));
        assert!(p.steps.contains(&Step::DeleteEdges {
            rel_type: "PLACED_BY".into()
        }));
        assert_eq!(
            p.recopy,
            vec!["public.orders".to_string(), "public.users".to_string()]
        );
    }

    #[test]
    fn a_table_taken_out_leaves_with_its_nodes_and_edges() {
        let old = world();
        let mut new = world();
        new.remove("public.orders");
        let p = plan(&old, &new);
        assert_eq!(
            p.steps,
            vec![
                Step::DeleteEdges {
                    rel_type: "PLACED_BY".into()
                },
                Step::DeleteNodes {
                    label: "Order".into()
                }
            ]
        );
        assert!(p.recopy.is_empty());
        assert_eq!(p.forget, vec!["public.orders".to_string()]);
    }

    #[test]
    fn a_new_relationship_on_a_copied_table_copies_it_again() {
        let old = world();
        let mut new = world();
        new.get_mut("public.users").unwrap().rels.push(fk(
            "REFERRED_BY",
            "User",
            "User",
            "referrer",
        ));
        let p = plan(&old, &new);
        assert!(p.steps.is_empty());
        assert_eq!(p.recopy, vec!["public.users".to_string()]);
    }

    #[test]
    fn a_new_table_is_only_recorded() {
        let mut old = world();
        old.remove("public.orders");
        let p = plan(&old, &world());
        assert!(p.is_work_free());
        assert_eq!(p.record, vec!["public.orders".to_string()]);
    }

    #[test]
    fn two_labels_swapped_are_both_rebuilt() {
        let old = world();
        let mut new = world();
        new.get_mut("public.users")
            .unwrap()
            .node
            .as_mut()
            .unwrap()
            .label = "Order".into();
        new.get_mut("public.orders")
            .unwrap()
            .node
            .as_mut()
            .unwrap()
            .label = "User".into();
        new.get_mut("public.orders").unwrap().rels =
            vec![fk("PLACED_BY", "User", "Order", "user_id")];
        let p = plan(&old, &new);
        assert!(p.relabel.is_empty());
        assert!(p.steps.contains(&Step::DeleteNodes {
            label: "User".into()
        }));
        assert!(p.steps.contains(&Step::DeleteNodes {
            label: "Order".into()
        }));
        assert_eq!(p.recopy.len(), 2);
    }

    #[test]
    fn a_recorded_shape_reads_back() {
        let w = world();
        for s in w.values() {
            assert_eq!(Shape::from_json(&s.to_json()).as_ref(), Some(s));
        }
    }
}
