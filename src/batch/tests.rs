//! Model-based property test of the batcher: random but realistic change
//! streams (a simulated database with foreign keys), mapped to graph
//! operations, applied to an in-memory graph model one by one and as
//! batches. The batched graph must equal the one-by-one graph, and both
//! must equal the graph the database's final state describes.
//!
//! The model applies each operation the way its Cypher statement does
//! (see `crate::batch::cypher`): MERGE creates what is missing, MATCH skips what
//! is absent, and the `_lsn` guard skips writes older than the entity.
//!
//! Longer than most files because it is one model: the simulated database,
//! the graph model and the properties that compare them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::Batcher;
use crate::config::Config;
use crate::decode::value::oid;
use crate::decode::{Column, Field, Relation, Value};
use crate::lsn::Lsn;
use crate::mapping::map::{GraphOp, Key, Mapper, NodeRef};
use crate::mapping::{compile, Catalog, TableInfo};
use crate::transactions::{Change, Op};

const MAPPING: &str = r#"
[[node]]
table = "public.users"
label = "User"
[[node]]
table = "public.roles"
label = "Role"
[[node]]
table = "public.orders"
label = "Order"
[[relationship]]
table = "public.orders"
type = "PLACED_BY"
from = { label = "Order", columns = ["id"] }
to = { label = "User", columns = ["user_id"] }
[[relationship]]
table = "public.user_roles"
type = "HAS_ROLE"
from = { label = "User", columns = ["user_id"] }
to = { label = "Role", columns = ["role_id"] }
properties = ["granted"]
[[relationship]]
table = "public.memberships"
type = "MEMBER_OF"
from = { label = "User", columns = ["user_id"] }
to = { label = "Role", columns = ["role_id"] }
properties = ["note"]
"#;

/// Table name, columns (name, is_key) — all int except `name` and `note`.
const TABLES: [(&str, &[(&str, bool)]); 5] = [
    ("users", &[("id", true), ("name", false)]),
    ("roles", &[("id", true), ("name", false)]),
    (
        "orders",
        &[("id", true), ("user_id", false), ("total", false)],
    ),
    (
        "user_roles",
        &[("user_id", true), ("role_id", true), ("granted", false)],
    ),
    (
        "memberships",
        &[
            ("id", true),
            ("user_id", false),
            ("role_id", false),
            ("note", false),
        ],
    ),
];

fn relations() -> BTreeMap<&'static str, Arc<Relation>> {
    TABLES
        .iter()
        .enumerate()
        .map(|(i, (name, cols))| {
            let rel = Relation {
                oid: 1000 + i as u32,
                schema: "public".into(),
                name: (*name).into(),
                replica_identity: 'd',
                columns: cols
                    .iter()
                    .map(|(c, k)| Column {
                        name: (*c).into(),
                        type_oid: if matches!(*c, "name" | "note") {
                            oid::TEXT
                        } else {
                            oid::INT4
                        },
                        is_key: *k,
                    })
                    .collect(),
            };
            (*name, Arc::new(rel))
        })
        .collect()
}

fn mapper() -> Mapper {
    let mut catalog = Catalog::new();
    for (name, cols) in TABLES {
        let key: Vec<String> = cols
            .iter()
            .filter(|(_, k)| *k)
            .map(|(c, _)| c.to_string())
            .collect();
        catalog.insert(
            format!("public.{name}"),
            TableInfo {
                columns: cols.iter().map(|(c, _)| c.to_string()).collect(),
                primary_key: key.clone(),
                unique: vec![key],
                replica_identity: 'd',
                ..TableInfo::default()
            },
        );
    }
    let cfg = Config::parse(MAPPING).expect("mapping");
    Mapper::new(Arc::new(
        compile(&cfg.nodes, &cfg.relationships, &catalog).expect("compiles"),
    ))
}

// ---------------------------------------------------------------- the database

/// A small database with foreign keys (RESTRICT), driven by a seeded RNG.
#[derive(Default, Clone)]
struct Db {
    users: BTreeMap<i64, String>,
    roles: BTreeMap<i64, String>,
    orders: BTreeMap<i64, (Option<i64>, i64)>,
    user_roles: BTreeMap<(i64, i64), Option<i64>>,
    memberships: BTreeMap<i64, (i64, i64, String)>,
}

fn int(v: i64) -> Field {
    Field::Value(Value::Int(v))
}

fn opt(v: Option<i64>) -> Field {
    Field::Value(v.map_or(Value::Null, Value::Int))
}

fn text(s: &str) -> Field {
    Field::Value(Value::Text(s.to_string()))
}

const NULL: Field = Field::Value(Value::Null);

struct Sim {
    db: Db,
    /// Enforce foreign keys; without them rows may point at missing rows
    /// (placeholders) and referenced rows may be deleted.
    fk: bool,
    /// An update that leaves a text value alone may not send it (TOAST).
    toast: bool,
    rels: BTreeMap<&'static str, Arc<Relation>>,
    rng: fastrand::Rng,
}

impl Sim {
    fn change(
        &self,
        table: &str,
        op: Op,
        new: Option<Vec<Field>>,
        old: Option<Vec<Field>>,
    ) -> Change {
        Change {
            relation: Arc::clone(&self.rels[table]),
            op,
            new,
            old,
            old_is_full_row: false,
        }
    }

    fn referenced_user(&self, u: i64) -> bool {
        self.fk
            && (self.db.orders.values().any(|(x, _)| *x == Some(u))
                || self.db.user_roles.keys().any(|(x, _)| *x == u)
                || self.db.memberships.values().any(|(x, _, _)| *x == u))
    }

    fn referenced_role(&self, r: i64) -> bool {
        self.fk
            && (self.db.user_roles.keys().any(|(_, x)| *x == r)
                || self.db.memberships.values().any(|(_, x, _)| *x == r))
    }

    fn pick<T: Copy>(&mut self, items: Vec<T>) -> Option<T> {
        if items.is_empty() {
            None
        } else {
            Some(items[self.rng.usize(..items.len())])
        }
    }

    /// A transaction of one to four statements' changes; counts the
    /// statements in `done`.
    fn transaction(&mut self, done: &mut usize) -> Vec<Change> {
        let mut changes = Vec::new();
        for _ in 0..self.rng.usize(1..=4) {
            changes.extend(self.step());
            *done += 1;
        }
        changes
    }

    /// One random statement's changes (possibly none, when it cannot apply).
    fn step(&mut self) -> Vec<Change> {
        fn free<V>(m: &BTreeMap<i64, V>) -> Vec<i64> {
            (1..=5i64).filter(|i| !m.contains_key(i)).collect()
        }
        // What a foreign key may point at: existing rows, or anything without FKs.
        let users: Vec<i64> = if self.fk {
            self.db.users.keys().copied().collect()
        } else {
            (1..=5).collect()
        };
        let roles: Vec<i64> = if self.fk {
            self.db.roles.keys().copied().collect()
        } else {
            (1..=5).collect()
        };
        let n = self.rng.u32(..100);
        match n {
            0..=11 => {
                let Some(id) = self.pick(free(&self.db.users)) else {
                    return vec![];
                };
                let name = format!("u{}", self.rng.u8(..10));
                self.db.users.insert(id, name.clone());
                vec![self.change("users", Op::Insert, Some(vec![int(id), text(&name)]), None)]
            }
            12..=17 => {
                let Some(id) = self.pick(self.db.users.keys().copied().collect()) else {
                    return vec![];
                };
                if self.toast && self.rng.bool() {
                    // The name stays, stored out of line: not sent.
                    return vec![self.change(
                        "users",
                        Op::Update,
                        Some(vec![int(id), Field::Unchanged]),
                        None,
                    )];
                }
                let name = format!("u{}", self.rng.u8(..10));
                self.db.users.insert(id, name.clone());
                vec![self.change("users", Op::Update, Some(vec![int(id), text(&name)]), None)]
            }
            18..=21 => {
                // Re-key a user nobody references.
                let existing: Vec<i64> = self
                    .db
                    .users
                    .keys()
                    .copied()
                    .filter(|u| !self.referenced_user(*u))
                    .collect();
                let Some(id) = self.pick(existing) else {
                    return vec![];
                };
                let Some(new_id) = self.pick(free(&self.db.users)) else {
                    return vec![];
                };
                let name = self.db.users.remove(&id).unwrap_or_default();
                self.db.users.insert(new_id, name.clone());
                // The name is unchanged and, stored out of line, not sent.
                let name = if self.toast {
                    Field::Unchanged
                } else {
                    text(&name)
                };
                vec![self.change(
                    "users",
                    Op::Update,
                    Some(vec![int(new_id), name]),
                    Some(vec![int(id), NULL]),
                )]
            }
            22..=25 => {
                let existing: Vec<i64> = self
                    .db
                    .users
                    .keys()
                    .copied()
                    .filter(|u| !self.referenced_user(*u))
                    .collect();
                let Some(id) = self.pick(existing) else {
                    return vec![];
                };
                self.db.users.remove(&id);
                vec![self.change("users", Op::Delete, None, Some(vec![int(id), NULL]))]
            }
            26..=33 => {
                let Some(id) = self.pick(free(&self.db.roles)) else {
                    return vec![];
                };
                let name = format!("r{}", self.rng.u8(..10));
                self.db.roles.insert(id, name.clone());
                vec![self.change("roles", Op::Insert, Some(vec![int(id), text(&name)]), None)]
            }
            34..=36 => {
                let existing: Vec<i64> = self
                    .db
                    .roles
                    .keys()
                    .copied()
                    .filter(|r| !self.referenced_role(*r))
                    .collect();
                let Some(id) = self.pick(existing) else {
                    return vec![];
                };
                self.db.roles.remove(&id);
                vec![self.change("roles", Op::Delete, None, Some(vec![int(id), NULL]))]
            }
            37..=46 => {
                let Some(id) = self.pick(free(&self.db.orders)) else {
                    return vec![];
                };
                let user = if self.rng.bool() {
                    self.pick(users)
                } else {
                    None
                };
                let total = i64::from(self.rng.u8(..100));
                self.db.orders.insert(id, (user, total));
                vec![self.change(
                    "orders",
                    Op::Insert,
                    Some(vec![int(id), opt(user), int(total)]),
                    None,
                )]
            }
            47..=56 => {
                let Some(id) = self.pick(self.db.orders.keys().copied().collect()) else {
                    return vec![];
                };
                let user = if self.rng.u8(..3) > 0 {
                    self.pick(users)
                } else {
                    None
                };
                let total = i64::from(self.rng.u8(..100));
                self.db.orders.insert(id, (user, total));
                vec![self.change(
                    "orders",
                    Op::Update,
                    Some(vec![int(id), opt(user), int(total)]),
                    None,
                )]
            }
            57..=60 => {
                let Some(id) = self.pick(self.db.orders.keys().copied().collect()) else {
                    return vec![];
                };
                self.db.orders.remove(&id);
                vec![self.change("orders", Op::Delete, None, Some(vec![int(id), NULL, NULL]))]
            }
            61..=70 => {
                let (Some(u), Some(r)) = (self.pick(users), self.pick(roles)) else {
                    return vec![];
                };
                let granted = if self.rng.bool() {
                    Some(i64::from(self.rng.u8(..50)))
                } else {
                    None
                };
                let op = if self.db.user_roles.contains_key(&(u, r)) {
                    Op::Update
                } else {
                    Op::Insert
                };
                self.db.user_roles.insert((u, r), granted);
                vec![self.change(
                    "user_roles",
                    op,
                    Some(vec![int(u), int(r), opt(granted)]),
                    None,
                )]
            }
            71..=74 => {
                // Move a grant to another role: a key change, so the old key comes along.
                let Some((u, r)) = self.pick(self.db.user_roles.keys().copied().collect()) else {
                    return vec![];
                };
                let Some(r2) = self.pick(
                    roles
                        .into_iter()
                        .filter(|x| !self.db.user_roles.contains_key(&(u, *x)))
                        .collect(),
                ) else {
                    return vec![];
                };
                let granted = self.db.user_roles.remove(&(u, r)).flatten();
                self.db.user_roles.insert((u, r2), granted);
                vec![self.change(
                    "user_roles",
                    Op::Update,
                    Some(vec![int(u), int(r2), opt(granted)]),
                    Some(vec![int(u), int(r), NULL]),
                )]
            }
            75..=78 => {
                let Some((u, r)) = self.pick(self.db.user_roles.keys().copied().collect()) else {
                    return vec![];
                };
                self.db.user_roles.remove(&(u, r));
                vec![self.change(
                    "user_roles",
                    Op::Delete,
                    None,
                    Some(vec![int(u), int(r), NULL]),
                )]
            }
            79..=86 => {
                let (Some(u), Some(r)) = (self.pick(users), self.pick(roles)) else {
                    return vec![];
                };
                let existing: Vec<i64> = self.db.memberships.keys().copied().collect();
                let id = match self.pick(existing) {
                    Some(id) if self.rng.bool() => id,
                    _ => match self.pick(free(&self.db.memberships)) {
                        Some(id) => id,
                        None => return vec![],
                    },
                };
                let kept = self.db.memberships.get(&id).map(|m| m.2.clone());
                if let (Some(note), true) = (kept, self.toast && self.rng.bool()) {
                    // The edge moves; its note stays, stored out of line.
                    self.db.memberships.insert(id, (u, r, note));
                    return vec![self.change(
                        "memberships",
                        Op::Update,
                        Some(vec![int(id), int(u), int(r), Field::Unchanged]),
                        None,
                    )];
                }
                let op = if self.db.memberships.contains_key(&id) {
                    Op::Update
                } else {
                    Op::Insert
                };
                let note = format!("n{}", self.rng.u8(..10));
                self.db.memberships.insert(id, (u, r, note.clone()));
                vec![self.change(
                    "memberships",
                    op,
                    Some(vec![int(id), int(u), int(r), text(&note)]),
                    None,
                )]
            }
            87..=90 => {
                let Some(id) = self.pick(self.db.memberships.keys().copied().collect()) else {
                    return vec![];
                };
                self.db.memberships.remove(&id);
                vec![self.change(
                    "memberships",
                    Op::Delete,
                    None,
                    Some(vec![int(id), NULL, NULL, NULL]),
                )]
            }
            91..=93 => {
                self.db.orders.clear();
                vec![self.change("orders", Op::Truncate, None, None)]
            }
            94..=95 => {
                self.db.user_roles.clear();
                self.db.memberships.clear();
                vec![
                    self.change("user_roles", Op::Truncate, None, None),
                    self.change("memberships", Op::Truncate, None, None),
                ]
            }
            _ => {
                // TRUNCATE everything (CASCADE).
                self.db = Db::default();
                TABLES
                    .iter()
                    .map(|(t, _)| self.change(t, Op::Truncate, None, None))
                    .collect()
            }
        }
    }
}

// ------------------------------------------------------------------ the graph

type NodeId = (String, String);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    t: String,
    from: NodeId,
    to: NodeId,
    key: String,
    props: BTreeMap<String, String>,
    lsn: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Graph {
    nodes: BTreeMap<NodeId, (BTreeMap<String, String>, Option<u64>)>,
    edges: Vec<Edge>,
}

fn id(n: &NodeRef) -> NodeId {
    (n.label.to_string(), format!("{:?}", n.key.0))
}

fn key_text(k: &Key) -> String {
    format!("{:?}", k.0)
}

fn guard(current: Option<u64>, lsn: Lsn) -> bool {
    current.is_none_or(|c| c <= lsn.raw())
}

fn set_props(target: &mut BTreeMap<String, String>, props: &[(Arc<str>, Value)]) {
    for (k, v) in props {
        match v {
            Value::Null => {
                target.remove(&**k);
            }
            v => {
                target.insert(k.to_string(), format!("{v:?}"));
            }
        }
    }
}

impl Graph {
    fn merge_node(&mut self, n: &NodeRef) -> NodeId {
        let i = id(n);
        self.nodes
            .entry(i.clone())
            .or_insert_with(|| (BTreeMap::new(), None));
        i
    }

    /// Applies one operation the way its Cypher statement does.
    fn apply(&mut self, op: &GraphOp) {
        match op {
            GraphOp::UpsertNode {
                node,
                props,
                lsn,
                source,
            } => {
                // A key change: the old node's properties come along.
                let kept = source.as_ref().and_then(|(s, sl)| {
                    self.nodes
                        .get(&id(s))
                        .filter(|n| guard(n.1, *sl))
                        .map(|n| n.0.clone())
                });
                let i = self.merge_node(node);
                let entry = self.nodes.get_mut(&i).expect("merged");
                if guard(entry.1, *lsn) {
                    entry.0.extend(kept.unwrap_or_default());
                    set_props(&mut entry.0, props);
                    entry.1 = Some(lsn.raw());
                }
            }
            GraphOp::DeleteNode { node, lsn } => {
                let i = id(node);
                if self.nodes.get(&i).is_some_and(|n| guard(n.1, *lsn)) {
                    self.detach_older(&BTreeSet::from([i]), *lsn);
                }
            }
            GraphOp::SetOwnedRel {
                rel_type,
                own,
                other,
                own_is_from,
                lsn,
            } => {
                let o = id(own);
                if !self.nodes.get(&o).is_some_and(|n| guard(n.1, *lsn)) {
                    return;
                }
                let t = rel_type.to_string();
                self.edges
                    .retain(|e| !(e.t == t && if *own_is_from { e.from == o } else { e.to == o }));
                if let Some(other) = other {
                    let b = self.merge_node(other);
                    let (from, to) = if *own_is_from { (o, b) } else { (b, o) };
                    self.merge_edge(
                        &t,
                        from,
                        to,
                        String::new(),
                        BTreeMap::new(),
                        &[],
                        *lsn,
                        false,
                    );
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
                let a = self.merge_node(from);
                let b = self.merge_node(to);
                let t = rel_type.to_string();
                let k = if key.0.is_empty() {
                    String::new()
                } else {
                    key_text(key)
                };
                // With key identity the edge moves, its properties with it.
                let mut kept = BTreeMap::new();
                if !k.is_empty() {
                    self.edges.retain(|e| {
                        let moved = e.t == t
                            && e.key == k
                            && !(e.from == a && e.to == b)
                            && guard(e.lsn, *lsn);
                        if moved && kept.is_empty() {
                            kept = e.props.clone();
                        }
                        !moved
                    });
                }
                self.merge_edge(&t, a, b, k, kept, props, *lsn, true);
            }
            GraphOp::DeleteEdge {
                rel_type,
                key,
                ends,
                lsn,
            } => {
                let t = rel_type.to_string();
                match ends {
                    Some((f, to)) => {
                        let (a, b) = (id(f), id(to));
                        self.edges.retain(|e| {
                            !(e.t == t && e.from == a && e.to == b && guard(e.lsn, *lsn))
                        });
                    }
                    None => {
                        let k = key_text(key);
                        self.edges
                            .retain(|e| !(e.t == t && e.key == k && guard(e.lsn, *lsn)));
                    }
                }
            }
            GraphOp::TruncateLabel { label, lsn } => {
                let gone: BTreeSet<NodeId> = self
                    .nodes
                    .iter()
                    .filter(|((l, _), n)| **l == **label && guard(n.1, *lsn))
                    .map(|(k, _)| k.clone())
                    .collect();
                self.detach_older(&gone, *lsn);
            }
            GraphOp::TruncateType { rel_type, lsn } => self
                .edges
                .retain(|e| !(e.t == **rel_type && guard(e.lsn, *lsn))),
            GraphOp::EnsureNode { node } => {
                self.merge_node(node);
            }
            GraphOp::EnsureEndOf {
                node,
                owner,
                owner_written,
                lsn,
            } => {
                let passes = match self.nodes.get(&id(owner)) {
                    Some(n) => guard(n.1, *lsn),
                    None => *owner_written,
                };
                if passes {
                    self.merge_node(node);
                }
            }
        }
    }

    /// Applies what the batcher holds, as its plan's statements would.
    fn apply_plan(&mut self, batcher: &mut Batcher) {
        for group in batcher.take_plan() {
            for op in &group {
                self.apply(op);
            }
        }
    }

    /// Removes the edges of `gone` not newer than `lsn`, then each node of
    /// `gone`: deleted, or left a placeholder where a newer edge holds it.
    fn detach_older(&mut self, gone: &BTreeSet<NodeId>, lsn: Lsn) {
        self.edges
            .retain(|e| !((gone.contains(&e.from) || gone.contains(&e.to)) && guard(e.lsn, lsn)));
        for i in gone {
            if self.edges.iter().any(|e| e.from == *i || e.to == *i) {
                self.nodes.insert(i.clone(), (BTreeMap::new(), None));
            } else {
                self.nodes.remove(i);
            }
        }
    }

    /// MERGE (a)-[r:T {key}]->(b), then (guarded, for join-table edges) SET
    /// `kept` (a moved edge's properties) and `props`.
    #[allow(clippy::too_many_arguments)]
    fn merge_edge(
        &mut self,
        t: &str,
        a: NodeId,
        b: NodeId,
        k: String,
        kept: BTreeMap<String, String>,
        props: &[(Arc<str>, Value)],
        lsn: Lsn,
        guarded: bool,
    ) {
        let matching = |e: &Edge| e.t == t && e.from == a && e.to == b && e.key == k;
        if !self.edges.iter().any(matching) {
            self.edges.push(Edge {
                t: t.to_string(),
                from: a.clone(),
                to: b.clone(),
                key: k.clone(),
                props: BTreeMap::new(),
                lsn: None,
            });
        }
        for e in self.edges.iter_mut().filter(|e| matching(e)) {
            if !guarded || guard(e.lsn, lsn) {
                e.props.extend(kept.clone());
                set_props(&mut e.props, props);
                e.lsn = Some(lsn.raw());
            }
        }
    }

    /// Nodes and edges without `_lsn`, in a canonical order.
    fn shape(&self) -> (BTreeMap<NodeId, BTreeMap<String, String>>, Vec<Edge>) {
        let nodes = self
            .nodes
            .iter()
            .map(|(k, (p, _))| (k.clone(), p.clone()))
            .collect();
        let mut edges: Vec<Edge> = self
            .edges
            .iter()
            .cloned()
            .map(|e| Edge { lsn: None, ..e })
            .collect();
        edges.sort();
        (nodes, edges)
    }

    fn canonical(&self) -> Graph {
        let mut g = self.clone();
        g.edges.sort();
        g
    }

    /// The canonical graph without orphan placeholders (a key, no
    /// properties, no `_lsn`, no edge). No statement tells one from a
    /// missing node: MERGE fills or creates it alike, a row's own node is
    /// always upserted before its edge, a delete removes it, and reconcile
    /// skips placeholders. Where a stamped graph keeps a node as a
    /// placeholder for a newer edge that a later change removes, one by one
    /// leaves it orphaned and a batch (which deletes nodes last) may not.
    fn without_orphans(&self) -> Graph {
        let mut g = self.canonical();
        let held: BTreeSet<NodeId> = g
            .edges
            .iter()
            .flat_map(|e| [e.from.clone(), e.to.clone()])
            .collect();
        g.nodes
            .retain(|k, (props, lsn)| !props.is_empty() || lsn.is_some() || held.contains(k));
        g
    }
}

/// Every row of the database, as (table, row), node tables first.
fn rows(db: &Db) -> Vec<(&'static str, Vec<Field>)> {
    db.users
        .iter()
        .map(|(id, n)| ("users", vec![int(*id), text(n)]))
        .chain(
            db.roles
                .iter()
                .map(|(id, n)| ("roles", vec![int(*id), text(n)])),
        )
        .chain(
            db.orders
                .iter()
                .map(|(id, (u, t))| ("orders", vec![int(*id), opt(*u), int(*t)])),
        )
        .chain(
            db.user_roles
                .iter()
                .map(|((u, r), gr)| ("user_roles", vec![int(*u), int(*r), opt(*gr)])),
        )
        .chain(
            db.memberships
                .iter()
                .map(|(id, (u, r, n))| ("memberships", vec![int(*id), int(*u), int(*r), text(n)])),
        )
        .collect()
}

/// The operations that copy rows, stamped `stamp`, as a snapshot chunk does.
fn copy_ops(m: &Mapper, rows: Vec<(&'static str, Vec<Field>)>, stamp: Lsn) -> Vec<GraphOp> {
    let sim = Sim {
        db: Db::default(),
        fk: true,
        toast: true,
        rels: relations(),
        rng: fastrand::Rng::with_seed(0),
    };
    let mut ops = Vec::new();
    for (table, row) in rows {
        let c = sim.change(table, Op::Insert, Some(row), None);
        m.map_change(&c, stamp, &mut ops).expect("maps");
    }
    ops
}

/// The graph the database's final state describes.
fn expected(db: &Db, m: &Mapper) -> (BTreeMap<NodeId, BTreeMap<String, String>>, Vec<Edge>) {
    let mut g = Graph::default();
    for op in &copy_ops(m, rows(db), Lsn::new(1)) {
        g.apply(op);
    }
    g.shape()
}

/// A graph written by changes of another simulated database, each at a
/// random LSN between 1 and the stream's last commit: stamped nodes, edges
/// and placeholders, as copies and repairs leave them.
fn stamped_graph(m: &Mapper, seed: u64, steps: usize) -> Graph {
    let mut sim = Sim {
        db: Db::default(),
        fk: false,
        toast: true,
        rels: relations(),
        rng: fastrand::Rng::with_seed(seed ^ 0x5eed),
    };
    let mut g = Graph::default();
    let top = (steps as u64 + 1) * 100;
    for _ in 0..steps {
        for c in sim.step() {
            let stamp = Lsn::new(sim.rng.u64(1..top));
            let mut ops = Vec::new();
            m.map_change(&c, stamp, &mut ops).expect("maps");
            for op in &ops {
                g.apply(op);
            }
        }
    }
    g
}

#[test]
fn a_join_edge_deleted_twice_in_a_batch_carries_the_later_delete() {
    let m = mapper();
    let sim = Sim {
        db: Db::default(),
        fk: false,
        toast: true,
        rels: relations(),
        rng: fastrand::Rng::with_seed(0),
    };
    let row = || Some(vec![int(1), int(2), opt(Some(7))]);
    let changes = [
        (Op::Delete, None, row(), 100),
        (Op::Insert, row(), None, 200),
        (Op::Delete, None, row(), 300),
    ];
    // The edge as a copy stamped between the insert and the last delete left it.
    let mut start = Graph::default();
    let mut ops = Vec::new();
    m.map_change(
        &sim.change("user_roles", Op::Insert, row(), None),
        Lsn::new(250),
        &mut ops,
    )
    .expect("maps");
    for op in &ops {
        start.apply(op);
    }
    let (mut one_by_one, mut batched) = (start.clone(), start);
    let mut batcher = Batcher::new();
    for (i, (op, new, old, lsn)) in changes.into_iter().enumerate() {
        let mut ops = Vec::new();
        m.map_change(
            &sim.change("user_roles", op, new, old),
            Lsn::new(lsn),
            &mut ops,
        )
        .expect("maps");
        for op in &ops {
            one_by_one.apply(op);
        }
        batcher.push_transaction(vec![ops], Lsn::new(lsn + 10 + i as u64));
    }
    batched.apply_plan(&mut batcher);
    assert!(
        one_by_one.edges.is_empty(),
        "one by one, the last delete removes it"
    );
    assert_eq!(batched.canonical(), one_by_one.canonical());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn batches_equal_one_by_one_and_the_database(seed in any::<u64>(), steps in 1usize..80, fk in any::<bool>(), stamped in any::<bool>()) {
        let m = mapper();
        let mut sim = Sim { db: Db::default(), fk, toast: !stamped, rels: relations(), rng: fastrand::Rng::with_seed(seed) };
        // Unsent (TOASTed) values only from an empty graph: the stamped
        // graph's values are another database's, so an update that sends
        // none would keep values the stream's database never had (a real
        // stamp holds that database's values at its LSN, which the snapshot
        // property below covers).
        // The graph the stream starts on: empty, or stamped as a snapshot
        // chunk or a repair leaves it (nodes and edges with `_lsn`s that
        // fall anywhere among the stream's commit LSNs).
        let start = if stamped { stamped_graph(&m, seed, steps) } else { Graph::default() };
        let mut one_by_one = start.clone();
        let mut batched = start;
        let mut batcher = Batcher::new();
        let mut txn = 0u64;
        let mut done = 0;
        while done < steps {
            let changes = sim.transaction(&mut done);
            txn += 1;
            let commit = Lsn::new(txn * 100);
            let mut groups = Vec::new();
            for c in &changes {
                let mut ops = Vec::new();
                m.map_change(c, commit, &mut ops).expect("maps");
                for op in &ops {
                    one_by_one.apply(op);
                }
                groups.push(ops);
            }
            batcher.push_transaction(groups, Lsn::new(txn * 100 + 10));
            if sim.rng.u8(..4) == 0 {
                batched.apply_plan(&mut batcher);
            }
        }
        batched.apply_plan(&mut batcher);
        if stamped {
            prop_assert_eq!(batched.without_orphans(), one_by_one.without_orphans(), "seed {}", seed);
        } else {
            prop_assert_eq!(batched.canonical(), one_by_one.canonical(), "seed {}", seed);
        }
        // With foreign keys there are no placeholders: the graph is the
        // database (when it started empty).
        if fk && !stamped {
            prop_assert_eq!(one_by_one.shape(), expected(&sim.db, &m), "seed {}", seed);
        }
    }

    /// `snapshot` with writes going on, then `run`: every table is copied in
    /// two chunks (split on its first key column), node tables first, each
    /// chunk under its own exported snapshot — the rows of the database
    /// after some transaction, stamped with a consistent point just above
    /// that transaction's commit, and never below an earlier chunk's. Then
    /// the whole stream since the slot was created is applied, one by one
    /// and as batches. With foreign keys both graphs must be the database.
    /// With unsent (TOASTed) values each table is one chunk: a row re-keyed
    /// from a range not yet copied into one already copied has no old node
    /// to take an unsent value from (docs/configuration.md).
    #[test]
    fn a_snapshot_taken_during_writes_then_the_stream_equals_the_database(seed in any::<u64>(), steps in 1usize..80, toast in any::<bool>()) {
        let m = mapper();
        let mut sim = Sim { db: Db::default(), fk: true, toast, rels: relations(), rng: fastrand::Rng::with_seed(seed) };
        // The database after each transaction (states[0]: before the first).
        let mut states = vec![Db::default()];
        let mut txns: Vec<(Lsn, Vec<Vec<GraphOp>>)> = Vec::new();
        let mut done = 0;
        while done < steps {
            let changes = sim.transaction(&mut done);
            let commit = Lsn::new((txns.len() as u64 + 1) * 100);
            let mut groups = Vec::new();
            for c in &changes {
                let mut ops = Vec::new();
                m.map_change(c, commit, &mut ops).expect("maps");
                groups.push(ops);
            }
            txns.push((commit, groups));
            states.push(sim.db.clone());
        }
        // The copy: chunks in order, each at a transaction no earlier than
        // the one before.
        let mut start = Graph::default();
        let mut at = 0usize;
        for (table, _) in TABLES {
            let split = if toast { 5 } else { sim.rng.i64(0..=5) };
            for first_chunk in [true, false] {
                at = sim.rng.usize(at..states.len());
                let chunk: Vec<_> = rows(&states[at])
                    .into_iter()
                    .filter(|(t, row)| {
                        *t == table
                            && matches!(&row[0], Field::Value(Value::Int(k)) if (*k <= split) == first_chunk)
                    })
                    .collect();
                for op in &copy_ops(&m, chunk, Lsn::new(at as u64 * 100 + 50)) {
                    start.apply(op);
                }
            }
        }
        let mut one_by_one = start.clone();
        let mut batched = start;
        let mut batcher = Batcher::new();
        for (commit, groups) in txns {
            for op in groups.iter().flatten() {
                one_by_one.apply(op);
            }
            batcher.push_transaction(groups, Lsn::new(commit.raw() + 10));
            if sim.rng.u8(..4) == 0 {
                batched.apply_plan(&mut batcher);
            }
        }
        batched.apply_plan(&mut batcher);
        prop_assert_eq!(one_by_one.shape(), expected(&sim.db, &m), "seed {}", seed);
        prop_assert_eq!(batched.shape(), one_by_one.shape(), "seed {}", seed);
    }
}

// ------------------------------------------------- history and event types

fn history_mapping() -> crate::mapping::Mapping {
    use crate::mapping::tests::{demo_catalog, DEMO_MAPPING};
    let text = DEMO_MAPPING.replacen("label = \"Role\"\n", "label = \"Role\"\nhistory = true\n", 1)
        + "[[messages]]\nprefix = \"app\"\nlabels = [\"Event\", \"User\", \"Role\"]\ntypes = [\"ABOUT\"]\n";
    let cfg = Config::parse(&text).expect("mapping");
    crate::mapping::compile_config(&cfg, &demo_catalog()).expect("compiles")
}

fn node(label: &str, id: i64) -> NodeRef {
    NodeRef {
        label: Arc::from(label),
        key: Key(vec![Value::Int(id)]),
    }
}

fn upsert(n: &NodeRef, name: &str, lsn: u64) -> GraphOp {
    GraphOp::UpsertNode {
        node: n.clone(),
        props: vec![(Arc::from("name"), Value::Text(name.into()))],
        lsn: Lsn::new(lsn),
        source: None,
    }
}

#[test]
fn a_history_node_changed_by_two_transactions_of_a_batch_makes_a_version_for_each() {
    let mapping = history_mapping();
    let mut b = Batcher::new().with_history(&mapping);
    let (role, user) = (node("Role", 1), node("User", 1));
    b.note_commit_time(Lsn::new(10), 1_000_000);
    b.push_transaction(
        vec![
            vec![upsert(&role, "a", 10)],
            vec![upsert(&role, "b", 10)],
            vec![upsert(&user, "a", 10)],
        ],
        Lsn::new(11),
    );
    b.note_commit_time(Lsn::new(20), 2_000_000);
    b.push_transaction(
        vec![vec![upsert(&role, "c", 20)], vec![upsert(&user, "b", 20)]],
        Lsn::new(21),
    );
    b.note_commit_time(Lsn::new(30), 3_000_000);
    b.push_transaction(
        vec![vec![GraphOp::DeleteNode {
            node: role.clone(),
            lsn: Lsn::new(30),
        }]],
        Lsn::new(31),
    );
    let batch = b.take(&mapping);
    let opened: Vec<_> = batch
        .statements
        .iter()
        .filter(|s| {
            s.cypher
                .contains("CREATE (n)-[:VERSION]->(v:`RoleVersion`)")
        })
        .collect();
    assert_eq!(
        opened.len(),
        2,
        "one version per transaction, the two changes of the first coalesced"
    );
    let closed = batch
        .statements
        .iter()
        .filter(|s| {
            s.cypher
                .contains("FOREACH (s IN same | DETACH DELETE s) WITH row MATCH (o:`RoleVersion`")
        })
        .count();
    assert_eq!(closed, 1, "the delete closes the last version");
    assert!(!batch
        .statements
        .iter()
        .any(|s| s.cypher.contains("UserVersion")));
    // Each version starts at its own transaction's commit time.
    let at = |s: &super::Statement| match &s.rows.value[0] {
        neo4rs::BoltType::Map(m) => m.value.get(&neo4rs::BoltString::new("at")).cloned(),
        _ => None,
    };
    assert_ne!(at(opened[0]), at(opened[1]));
    assert!(at(opened[0]).is_some_and(|v| matches!(v, neo4rs::BoltType::DateTime(_))));
}

#[test]
fn one_relationship_type_from_messages_joins_several_pairs_of_labels() {
    let mapping = history_mapping();
    let mut b = Batcher::new();
    let edge = |to: &NodeRef| GraphOp::MergeEdge {
        rel_type: Arc::from("ABOUT"),
        key: Key(Vec::new()),
        from: node("Event", 1),
        to: to.clone(),
        props: Vec::new(),
        lsn: Lsn::new(5),
    };
    b.push_transaction(
        vec![vec![edge(&node("User", 1)), edge(&node("Role", 2))]],
        Lsn::new(6),
    );
    let batch = b.take(&mapping);
    let merges: Vec<&str> = batch
        .statements
        .iter()
        .map(|s| s.cypher.as_str())
        .filter(|c| c.contains("[r:`ABOUT`]"))
        .collect();
    assert_eq!(merges.len(), 2, "{merges:?}");
    assert!(
        merges[0].contains("MERGE (b:`User` {`id`: row.t[0]})"),
        "{}",
        merges[0]
    );
    assert!(
        merges[1].contains("MERGE (b:`Role` {`id`: row.t[0]})"),
        "{}",
        merges[1]
    );
    assert!(
        merges[0].contains("MERGE (a:`Event` {`id`: row.f[0]})"),
        "{}",
        merges[0]
    );
}

#[test]
fn the_operations_of_one_message_keep_their_order() {
    let mapping = history_mapping();
    let event = node("Event", 1);
    // delete, then merge: one by one the node exists at the end.
    let mut b = Batcher::new().with_history(&mapping);
    b.push_partial_each(
        vec![
            GraphOp::DeleteNode {
                node: event.clone(),
                lsn: Lsn::new(5),
            },
            upsert(&event, "back", 5),
        ],
        Lsn::new(6),
        1,
    );
    b.end_transaction(Lsn::new(6));
    let batch = b.take(&mapping);
    let kinds: Vec<&str> = batch
        .plan
        .iter()
        .map(|g| match &g[0] {
            GraphOp::DeleteNode { .. } => "delete",
            GraphOp::UpsertNode { .. } => "upsert",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["delete", "upsert"]);
    assert_eq!(batch.changes, 1, "a message counts as one change");
}

#[test]
fn a_history_node_deleted_again_by_a_later_transaction_keeps_the_first_delete() {
    let mapping = history_mapping();
    let role = node("Role", 1);
    let mut b = Batcher::new().with_history(&mapping);
    for lsn in [10, 20] {
        b.note_commit_time(Lsn::new(lsn), lsn as i64 * 1_000_000);
        b.push_transaction(
            vec![vec![GraphOp::DeleteNode {
                node: role.clone(),
                lsn: Lsn::new(lsn),
            }]],
            Lsn::new(lsn + 1),
        );
    }
    let batch = b.take(&mapping);
    let closes = batch
        .statements
        .iter()
        .filter(|s| {
            s.cypher
                .contains("FOREACH (s IN same | DETACH DELETE s) WITH row MATCH (o:`RoleVersion`")
        })
        .count();
    assert_eq!(closes, 2, "each delete closes at its own commit time");
}

#[test]
fn a_transaction_split_across_batches_keeps_its_commit_time() {
    let mapping = history_mapping();
    let role = node("Role", 1);
    let mut b = Batcher::new().with_history(&mapping);
    b.note_commit_time(Lsn::new(10), 7_000_000);
    b.push_partial(vec![upsert(&role, "a", 10)], Lsn::new(11), 1);
    let first = b.take(&mapping);
    b.push_partial(vec![upsert(&role, "b", 10)], Lsn::new(11), 2);
    b.end_transaction(Lsn::new(11));
    let second = b.take(&mapping);
    assert_eq!(first.times.get(&Lsn::new(10)), Some(&7_000_000));
    assert_eq!(second.times.get(&Lsn::new(10)), Some(&7_000_000));
    // Without history labels nothing is kept.
    let mut plain = Batcher::new();
    plain.note_commit_time(Lsn::new(10), 7_000_000);
    assert!(plain.take(&mapping).times.is_empty());
}

// ------------------------------------------------------ planning ahead

proptest! {
    /// Every statement a batch of random changes renders to (with and
    /// without foreign keys, TOASTed values, key changes, deletes, join
    /// tables of both identities) is among the texts `run` has Neo4j plan
    /// before it streams, and none of those texts is repeated.
    #[test]
    fn every_statement_a_batch_renders_is_planned_ahead(seed in any::<u64>(), steps in 1usize..60, fk in any::<bool>()) {
        let m = mapper();
        let planned = super::render::statement_texts(m.mapping(), 5000);
        let texts: BTreeSet<&str> = planned.iter().map(|p| p.text.as_str()).collect();
        prop_assert_eq!(texts.len(), planned.len());
        let mut sim = Sim { db: Db::default(), fk, toast: true, rels: relations(), rng: fastrand::Rng::with_seed(seed) };
        let mut batcher = Batcher::new();
        let mut done = 0;
        let mut txn = 0u64;
        while done < steps {
            let changes = sim.transaction(&mut done);
            txn += 1;
            let mut groups = Vec::new();
            for c in &changes {
                let mut ops = Vec::new();
                m.map_change(c, Lsn::new(txn * 100), &mut ops).expect("maps");
                groups.push(ops);
            }
            batcher.push_transaction(groups, Lsn::new(txn * 100 + 10));
            if sim.rng.u8(..3) == 0 || done >= steps {
                let batch = batcher.take(m.mapping());
                for st in &batch.statements {
                    prop_assert!(texts.contains(st.cypher.as_str()), "not planned ahead: {}", st.cypher);
                    let most = planned.iter().find(|p| p.text == st.cypher).map(|p| p.rows);
                    prop_assert!(most.is_some_and(|n| n >= st.rows.len() || n < 5000 && st.rows.len() <= 10), "{} rows: {}", st.rows.len(), st.cypher);
                }
            }
        }
    }
}

#[test]
fn truncates_are_planned_ahead_and_never_run() {
    let m = mapper();
    let planned = super::render::statement_texts(m.mapping(), 5000);
    let truncates: Vec<_> = planned
        .iter()
        .filter(|p| {
            p.text.contains("MATCH (n:`User`) WHERE")
                || p.text.contains("MATCH ()-[r:`HAS_ROLE`]->() WHERE")
        })
        .collect();
    assert_eq!(truncates.len(), 2, "{planned:#?}");
    assert!(truncates.iter().all(|p| !p.run && p.rows == 1));
    assert!(planned.iter().filter(|p| p.run).all(|p| p.key_width == 2));
}
