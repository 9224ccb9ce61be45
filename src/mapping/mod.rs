//! The mapping: which tables become nodes and which become relationships.
//!
//! The file form ([`NodeMapping`], [`RelationshipMapping`], part of the
//! [`crate::config`]) is compiled
//! against the database catalog into a [`Mapping`]. Compilation refuses, with
//! one sentence each, a missing table or column, a key that is not unique, and
//! labels, types or property names that are not plain identifiers. Names are
//! later quoted in Cypher; values only ever travel as parameters.
//!
//! Invariant: a compiled [`Mapping`] names only tables, columns and keys the
//! catalog has.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

pub use crate::config::{EndpointMapping, NodeMapping, RelationshipMapping};
pub use crate::source::catalog::{Catalog, TableInfo};

pub mod events;
pub mod infer;
pub mod map;

/// Why a mapping cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MappingError(pub String);

fn err<T>(msg: String) -> Result<T, MappingError> {
    Err(MappingError(msg))
}

/// A column and the property it becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyMap {
    /// Column name.
    pub column: String,
    /// Property name.
    pub property: Arc<str>,
}

/// A compiled `[[node]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTarget {
    /// Label.
    pub label: Arc<str>,
    /// Key columns.
    pub key_columns: Vec<String>,
    /// Key property names, aligned with `key_columns`.
    pub key_props: Vec<Arc<str>>,
    /// Non-key columns that become properties.
    pub props: Vec<PropertyMap>,
    /// Without an `include` list the properties follow the table's columns
    /// as they are now (see [`Follow`]); `None` with one.
    pub follow: Option<Follow>,
    /// Every version is kept as a `(:LabelVersion)` (`history = true`).
    pub history: bool,
}

/// How a `[[node]]` without an `include` list maps the columns a table has
/// now: every column but the key and the excluded ones, renamed as the
/// mapping says. `props` of the target is this applied to `columns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follow {
    /// The table's columns at compile time, in order.
    pub columns: Vec<String>,
    /// Excluded columns.
    pub exclude: Vec<String>,
    /// Renamed columns.
    pub rename: std::collections::BTreeMap<String, String>,
}

impl NodeTarget {
    /// The properties of a row with these columns: the compiled ones while
    /// the table has the columns it had, else what [`Follow`] makes of the
    /// columns it has now (columns whose property name is not allowed are
    /// left out).
    pub fn props_for<'a>(
        &'a self,
        columns: &[crate::decode::Column],
    ) -> std::borrow::Cow<'a, [PropertyMap]> {
        let Some(f) = &self.follow else {
            return std::borrow::Cow::Borrowed(&self.props);
        };
        if f.columns.len() == columns.len()
            && f.columns.iter().zip(columns).all(|(a, b)| *a == b.name)
        {
            return std::borrow::Cow::Borrowed(&self.props);
        }
        let mut seen: HashSet<&str> = self.key_props.iter().map(|p| &**p).collect();
        let mut out = Vec::new();
        for c in columns.iter().map(|c| &c.name) {
            if self.key_columns.contains(c) || f.exclude.contains(c) {
                continue;
            }
            let p = f.rename.get(c).unwrap_or(c);
            let reserved = self.history && (p == "validFrom" || p == "validTo");
            if !is_identifier(p) || p == "_lsn" || reserved || !seen.insert(p.as_str()) {
                continue;
            }
            out.push(PropertyMap {
                column: c.clone(),
                property: Arc::from(p.as_str()),
            });
        }
        std::borrow::Cow::Owned(out)
    }
}

/// A compiled relationship endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointTarget {
    /// Label.
    pub label: Arc<str>,
    /// This table's columns holding the key.
    pub columns: Vec<String>,
    /// The node's key property names, aligned with `columns`.
    pub key_props: Vec<Arc<str>>,
}

/// How a relationship relates to its table's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelKind {
    /// A foreign key on a node table: each row owns at most one edge of this
    /// type, attached to the row's own node.
    RowOwned {
        /// The row's own node is the start (else the end) of the edge.
        own_is_from: bool,
    },
    /// A join table: each row is an edge.
    Edge {
        /// The table key is exactly the endpoint columns, so an edge is
        /// identified by its two nodes; otherwise by key properties on it.
        pair_identity: bool,
    },
}

/// A compiled `[[relationship]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelTarget {
    /// Relationship type.
    pub rel_type: Arc<str>,
    /// Row-owned or edge rows.
    pub kind: RelKind,
    /// Start node.
    pub from: EndpointTarget,
    /// End node.
    pub to: EndpointTarget,
    /// Key columns of the table (edge identity when not pair identity).
    pub key_columns: Vec<String>,
    /// Columns copied onto the edge.
    pub props: Vec<PropertyMap>,
}

/// Everything mapped from one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableTarget {
    /// The node its rows become, if any.
    pub node: Option<NodeTarget>,
    /// The relationships its rows carry.
    pub rels: Vec<RelTarget>,
}

/// A compiled mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    /// Targets by schema-qualified table name.
    pub tables: HashMap<String, TableTarget>,
    /// The mapped tables' names by OID, as the catalog had them: a change
    /// that arrives under another name is a renamed mapped table. Outbox
    /// tables are among them.
    pub oids: HashMap<u32, String>,
    /// `[[messages]]` rules by prefix.
    pub messages: HashMap<String, events::Rules>,
    /// `[[outbox]]` tables by schema-qualified name.
    pub outbox: HashMap<String, events::OutboxTarget>,
    /// The keys of labels only messages and outbox rows write.
    pub event_keys: std::collections::BTreeMap<Arc<str>, Vec<Arc<str>>>,
    /// The keys of labels another walgraph process maps (`[[external]]`).
    pub external_keys: std::collections::BTreeMap<Arc<str>, Vec<Arc<str>>>,
}

impl Mapping {
    /// The tables the publication must contain, sorted.
    pub fn table_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tables.keys().cloned().collect();
        v.sort();
        v
    }

    /// The tables the publication must contain: the mapped ones and the
    /// outbox tables, sorted.
    pub fn published_tables(&self) -> Vec<String> {
        let mut v = self.table_names();
        v.extend(self.outbox.keys().cloned());
        v.sort();
        v
    }

    /// Every (label, key properties) pair, for uniqueness constraints:
    /// the mapped labels and those only messages and outbox rows write.
    pub fn node_keys(&self) -> Vec<(Arc<str>, Vec<Arc<str>>)> {
        let mut v: Vec<_> = self
            .tables
            .values()
            .filter_map(|t| t.node.as_ref())
            .map(|n| (Arc::clone(&n.label), n.key_props.clone()))
            .chain(
                self.event_keys
                    .iter()
                    .chain(&self.external_keys)
                    .map(|(l, k)| (Arc::clone(l), k.clone())),
            )
            .collect();
        v.sort();
        v
    }

    /// The labels whose versions are kept, with their key properties.
    pub fn history_keys(&self) -> Vec<(Arc<str>, Vec<Arc<str>>)> {
        let mut v: Vec<_> = self
            .tables
            .values()
            .filter_map(|t| t.node.as_ref())
            .filter(|n| n.history)
            .map(|n| (Arc::clone(&n.label), n.key_props.clone()))
            .collect();
        v.sort();
        v
    }

    /// Every relationship type with edge-key properties (join tables whose
    /// key is not their two endpoints), for indexes.
    pub fn edge_keys(&self) -> Vec<(Arc<str>, Vec<String>)> {
        let mut v: Vec<_> = self
            .tables
            .values()
            .flat_map(|t| &t.rels)
            .filter(|r| {
                r.kind
                    == RelKind::Edge {
                        pair_identity: false,
                    }
            })
            .map(|r| (Arc::clone(&r.rel_type), r.key_columns.clone()))
            .collect();
        v.sort();
        v
    }
}

/// True for names that can be labels, types or properties: a letter or
/// underscore, then letters, digits or underscores.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 128
}

/// Quotes a validated name for Cypher.
pub fn quote(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

fn check_name(kind: &str, s: &str) -> Result<(), MappingError> {
    if !is_identifier(s) {
        return err(format!(
            "the {kind} `{s}` is not allowed: use letters, digits and underscores, starting with a letter"
        ));
    }
    if s == "_lsn" {
        return err(format!(
            "the {kind} `_lsn` is reserved for walgraph's own bookkeeping"
        ));
    }
    Ok(())
}

fn table_info<'a>(catalog: &'a Catalog, table: &str) -> Result<&'a TableInfo, MappingError> {
    if !table.contains('.') {
        return err(format!(
            "the mapping names table `{table}` without a schema; write it schema-qualified, like public.{table}"
        ));
    }
    catalog.get(table).ok_or_else(|| {
        MappingError(format!(
            "the mapping names table {table}, which does not exist in the database"
        ))
    })
}

fn check_columns(
    table: &str,
    info: &TableInfo,
    cols: &[String],
    what: &str,
) -> Result<(), MappingError> {
    for c in cols {
        if info.generated.contains(c) {
            return err(format!(
                "the mapping names column `{c}` ({what}) of {table}, a generated column, which the stream does not carry: leave it out of the mapping, or on PostgreSQL 18 or later (stored generated columns only) set postgres.generated_columns = true and run `walgraph setup`"
            ));
        }
        if !info.columns.contains(c) {
            return err(format!(
                "the mapping names column `{c}` ({what}) of {table}, which has no such column"
            ));
        }
    }
    Ok(())
}

/// Refuses a key that Postgres would not send of a deleted or re-keyed row:
/// only the replica identity's columns come with those (all of them with
/// `REPLICA IDENTITY FULL`), so a key outside it leaves a stale node behind
/// or stops `run` at the first delete.
fn check_identity(
    table: &str,
    info: &TableInfo,
    key: &[String],
    what: &str,
) -> Result<(), MappingError> {
    let Some(identity) = info.identity_columns() else {
        return Ok(());
    };
    if key.iter().all(|k| identity.contains(k)) {
        return Ok(());
    }
    let identity = if identity.is_empty() {
        "none".to_string()
    } else {
        identity.join(", ")
    };
    err(format!(
        "the {what} ({}) of {table} is not its replica identity ({identity}), and Postgres sends only the replica identity of a deleted or re-keyed row: run ALTER TABLE {table} REPLICA IDENTITY USING INDEX <a unique index on ({})>, or REPLICA IDENTITY FULL, or key it by the primary key",
        key.join(", "),
        key.join(", ")
    ))
}

/// What a column's values are as node keys, by the value they decode to:
/// columns meet at one node only when their kinds agree (`int4` and `int8`
/// do; `int4` and `numeric`, or `text` and `uuid`, do not). `None` where the
/// catalog gave no type.
fn key_kind(info: &TableInfo, column: &str) -> Option<&'static str> {
    let at = info.columns.iter().position(|c| c == column)?;
    Some(type_kind(*info.types.get(at)?))
}

/// The kind of values a column of type `t` keys a node with (see
/// [`key_kind`]): types of one kind give equal keys for equal values.
pub fn type_kind(t: u32) -> &'static str {
    use crate::decode::value::{array_element, oid};
    match t {
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => "integer",
        oid::NUMERIC => "numeric",
        oid::FLOAT4 | oid::FLOAT8 => "floating-point",
        oid::BOOL => "boolean",
        oid::BYTEA => "bytea",
        oid::UUID => "uuid",
        oid::JSON | oid::JSONB => "json",
        oid::DATE => "date",
        oid::TIME => "time",
        oid::TIMETZ => "timetz",
        oid::TIMESTAMP => "timestamp",
        oid::TIMESTAMPTZ => "timestamptz",
        oid::INTERVAL => "interval",
        oid::INET | oid::CIDR => "inet",
        _ if array_element(t).is_some() => "array",
        _ => "text",
    }
}

fn is_unique(info: &TableInfo, cols: &[String]) -> bool {
    let set: HashSet<&String> = cols.iter().collect();
    info.unique
        .iter()
        .any(|u| !u.is_empty() && u.iter().all(|c| set.contains(c)))
}

/// Compiles and checks the whole mapping of a configuration against the
/// catalog: tables, messages and outbox tables.
pub fn compile_config(
    cfg: &crate::config::Config,
    catalog: &Catalog,
) -> Result<Mapping, MappingError> {
    let mut m = compile_with(&cfg.nodes, &cfg.relationships, &cfg.externals, catalog)?;
    let (messages, outbox, keys) = events::compile_events(
        &cfg.messages,
        &cfg.outbox,
        &m.tables,
        &m.external_keys,
        catalog,
    )?;
    for table in outbox.keys() {
        if let Some(info) = catalog.get(table) {
            if info.oid != 0 {
                m.oids.insert(info.oid, table.clone());
            }
        }
    }
    m.messages = messages;
    m.outbox = outbox;
    m.event_keys = keys;
    Ok(m)
}

/// Compiles and checks the mapping against the catalog.
pub fn compile(
    nodes: &[NodeMapping],
    relationships: &[RelationshipMapping],
    catalog: &Catalog,
) -> Result<Mapping, MappingError> {
    compile_with(nodes, relationships, &[], catalog)
}

/// As [`compile`], with labels another walgraph process maps, which
/// relationships may end at.
pub fn compile_with(
    nodes: &[NodeMapping],
    relationships: &[RelationshipMapping],
    externals: &[crate::config::ExternalLabel],
    catalog: &Catalog,
) -> Result<Mapping, MappingError> {
    let mut mapping = Mapping::default();
    let mut labels: HashMap<String, NodeTarget> = HashMap::new();
    // The table each label comes from.
    let mut label_tables: HashMap<String, &str> = HashMap::new();
    if nodes.is_empty() && relationships.is_empty() {
        return err(
            "the mapping is empty: add [[node]] or [[relationship]] sections to the configuration"
                .into(),
        );
    }
    let versions: HashSet<String> = nodes
        .iter()
        .filter(|n| n.history)
        .map(|n| events::version_label(&n.label))
        .collect();
    if let Some(n) = nodes.iter().find(|n| versions.contains(&n.label)) {
        return err(format!(
            "the label {} is the label of another label's versions (history = true); choose another",
            n.label
        ));
    }
    if !versions.is_empty() {
        if let Some(r) = relationships.iter().find(|r| r.rel_type == "VERSION") {
            return err(format!(
                "the relationship type VERSION of {} is the one history links versions with; choose another",
                r.table
            ));
        }
    }
    for n in nodes {
        let info = table_info(catalog, &n.table)?;
        check_name("label", &n.label)?;
        if labels.contains_key(&n.label) {
            return err(format!(
                "the label {} is mapped from two tables; map each label once",
                n.label
            ));
        }
        let key = match &n.key {
            Some(k) if !k.is_empty() => k.clone(),
            _ if !info.primary_key.is_empty() => info.primary_key.clone(),
            _ => {
                return err(format!(
                    "{} has no primary key: add one, or give `key = [...]` naming unique columns in its [[node]] section",
                    n.table
                ))
            }
        };
        check_columns(&n.table, info, &key, "key")?;
        if !is_unique(info, &key) {
            return err(format!(
                "the key ({}) of {} is not unique in the database: add a unique constraint on it or choose the primary key",
                key.join(", "),
                n.table
            ));
        }
        check_identity(&n.table, info, &key, "key")?;
        if let Some(c) = key.iter().find(|k| info.nullable.contains(k)) {
            return err(format!(
                "the key column {c} of {} may be NULL, and a row without a key cannot be a node: add NOT NULL to it or choose a key that has it",
                n.table
            ));
        }
        check_columns(&n.table, info, &n.exclude, "exclude")?;
        if let Some(inc) = &n.include {
            check_columns(&n.table, info, inc, "include")?;
        }
        let renames: Vec<String> = n.rename.keys().cloned().collect();
        check_columns(&n.table, info, &renames, "rename")?;
        let prop_name = |c: &String| -> Result<Arc<str>, MappingError> {
            let p = n.rename.get(c).unwrap_or(c);
            check_name("property", p)?;
            Ok(Arc::from(p.as_str()))
        };
        let key_props = key.iter().map(prop_name).collect::<Result<Vec<_>, _>>()?;
        let mut props = Vec::new();
        let mut seen: HashSet<Arc<str>> = key_props.iter().cloned().collect();
        for c in &info.columns {
            let included = n.include.as_ref().is_none_or(|inc| inc.contains(c));
            if key.contains(c) || !included || n.exclude.contains(c) {
                continue;
            }
            let property = prop_name(c)?;
            if n.history && (&*property == "validFrom" || &*property == "validTo") {
                return err(format!(
                    "the column {c} of {} becomes the property {property}, which the versions of {} use (history = true): rename it",
                    n.table, n.label
                ));
            }
            if !seen.insert(Arc::clone(&property)) {
                return err(format!(
                    "two columns of {} map to the property {property}",
                    n.table
                ));
            }
            props.push(PropertyMap {
                column: c.clone(),
                property,
            });
        }
        let target = NodeTarget {
            label: Arc::from(n.label.as_str()),
            key_columns: key,
            key_props,
            props,
            follow: n.include.is_none().then(|| Follow {
                columns: info.columns.clone(),
                exclude: n.exclude.clone(),
                rename: n.rename.clone(),
            }),
            history: n.history,
        };
        labels.insert(n.label.clone(), target.clone());
        label_tables.insert(n.label.clone(), &n.table);
        let entry = mapping.tables.entry(n.table.clone()).or_default();
        if entry.node.is_some() {
            return err(format!(
                "{} is mapped to two labels; map each table to one label",
                n.table
            ));
        }
        entry.node = Some(target);
    }
    for x in externals {
        check_name("label", &x.label)?;
        if labels.contains_key(&x.label) {
            return err(format!(
                "the label {} is both mapped here and [[external]]; an external label is one another walgraph process maps: keep one",
                x.label
            ));
        }
        if mapping.external_keys.contains_key(x.label.as_str()) {
            return err(format!("the [[external]] label {} is given twice", x.label));
        }
        if x.key.is_empty() {
            return err(format!(
                "the [[external]] label {} needs its key, as the process that maps it keys it (key = [\"id\"])",
                x.label
            ));
        }
        for k in &x.key {
            check_name("key property", k)?;
        }
        let key: Vec<Arc<str>> = x.key.iter().map(|k| Arc::from(k.as_str())).collect();
        mapping
            .external_keys
            .insert(Arc::from(x.label.as_str()), key.clone());
        labels.insert(
            x.label.clone(),
            NodeTarget {
                label: Arc::from(x.label.as_str()),
                key_columns: Vec::new(),
                key_props: key,
                props: Vec::new(),
                follow: None,
                history: false,
            },
        );
    }
    let mut types = HashSet::new();
    for r in relationships {
        let info = table_info(catalog, &r.table)?;
        check_name("relationship type", &r.rel_type)?;
        if !types.insert(r.rel_type.clone()) {
            return err(format!(
                "the relationship type {} is mapped twice; map each type once",
                r.rel_type
            ));
        }
        let endpoint = |e: &EndpointMapping, side: &str| -> Result<EndpointTarget, MappingError> {
            let node = labels.get(&e.label).ok_or_else(|| {
                MappingError(format!(
                    "relationship {} points {side} label {}, which no [[node]] section maps (a label another walgraph process maps is declared with [[external]])",
                    r.rel_type, e.label
                ))
            })?;
            check_columns(&r.table, info, &e.columns, side)?;
            if e.columns.len() != node.key_props.len() {
                return err(format!(
                    "relationship {} gives {} column(s) for its {side} end, but {} has a key of {}",
                    r.rel_type,
                    e.columns.len(),
                    e.label,
                    node.key_props.len()
                ));
            }
            if let Some(node_info) = label_tables
                .get(&e.label)
                .and_then(|t| catalog.get(*t).map(|i| (*t, i)))
            {
                for (c, k) in e.columns.iter().zip(&node.key_columns) {
                    if let (Some(here), Some(there)) = (key_kind(info, c), key_kind(node_info.1, k))
                    {
                        if here != there {
                            return err(format!(
                                "relationship {} takes its {side} end from {}.{c} ({here}), but the key of {} is {}.{k} ({there}): values of different types never meet at one node, so make both columns the same type (ALTER TABLE … ALTER COLUMN … TYPE …)",
                                r.rel_type, r.table, e.label, node_info.0
                            ));
                        }
                    }
                }
            }
            Ok(EndpointTarget {
                label: Arc::clone(&node.label),
                columns: e.columns.clone(),
                key_props: node.key_props.clone(),
            })
        };
        let from = endpoint(&r.from, "from")?;
        let to = endpoint(&r.to, "to")?;
        check_columns(&r.table, info, &r.properties, "properties")?;
        let props = r
            .properties
            .iter()
            .map(|c| {
                check_name("property", c)?;
                Ok(PropertyMap {
                    column: c.clone(),
                    property: Arc::from(c.as_str()),
                })
            })
            .collect::<Result<Vec<_>, MappingError>>()?;
        let own = mapping.tables.get(&r.table).and_then(|t| t.node.clone());
        let (kind, key_columns) = match own {
            Some(own) => {
                let is_own =
                    |e: &EndpointTarget| e.label == own.label && e.columns == own.key_columns;
                let own_is_from = if is_own(&from) {
                    true
                } else if is_own(&to) {
                    false
                } else {
                    return err(format!(
                        "relationship {} is on node table {}, so one of its ends must be that table's own node ({} by its key columns)",
                        r.rel_type, r.table, own.label
                    ));
                };
                if !r.properties.is_empty() {
                    return err(format!(
                        "relationship {} is a foreign key on node table {}, whose columns are properties of its {} nodes already; `properties` is for join tables: take it out",
                        r.rel_type, r.table, own.label
                    ));
                }
                (RelKind::RowOwned { own_is_from }, own.key_columns.clone())
            }
            None => {
                let key = if info.primary_key.is_empty() {
                    let mut k = from.columns.clone();
                    k.extend(to.columns.iter().cloned());
                    if !is_unique(info, &k) {
                        return err(format!(
                            "join table {} has no primary key and its endpoint columns are not unique: add a primary key",
                            r.table
                        ));
                    }
                    k
                } else {
                    info.primary_key.clone()
                };
                let endpoints: HashSet<&String> = from.columns.iter().chain(&to.columns).collect();
                let keyset: HashSet<&String> = key.iter().collect();
                if keyset.is_empty() {
                    return err(format!("join table {} needs a key", r.table));
                }
                for c in &key {
                    check_name("key property", c)?;
                }
                check_identity(&r.table, info, &key, "edge key")?;
                (
                    RelKind::Edge {
                        pair_identity: keyset == endpoints,
                    },
                    key,
                )
            }
        };
        mapping
            .tables
            .entry(r.table.clone())
            .or_default()
            .rels
            .push(RelTarget {
                rel_type: Arc::from(r.rel_type.as_str()),
                kind,
                from,
                to,
                key_columns,
                props,
            });
    }
    for (table, target) in &mapping.tables {
        let info = table_info(catalog, table)?;
        if info.replica_identity == 'n' {
            return err(format!(
                "{table} has REPLICA IDENTITY NOTHING, so Postgres cannot say which row an update or delete touched: run ALTER TABLE {table} REPLICA IDENTITY DEFAULT (with a primary key) or FULL"
            ));
        }
        if info.replica_identity == 'd' && info.primary_key.is_empty() {
            return err(format!(
                "{table} has no primary key, so Postgres cannot say which row an update or delete touched: add a primary key or run ALTER TABLE {table} REPLICA IDENTITY FULL"
            ));
        }
        let _ = target;
        if info.oid != 0 {
            mapping.oids.insert(info.oid, table.clone());
        }
    }
    Ok(mapping)
}

#[cfg(test)]
pub(crate) mod tests;
