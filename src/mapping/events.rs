//! Graph operations written by the database itself: logical messages
//! (`[[messages]]`) and outbox tables (`[[outbox]]`) carry JSON operations
//! — merge or delete a node by label and key, merge or delete a
//! relationship between two keyed nodes — that become [`GraphOp`]s. Pure:
//! no I/O.
//!
//! Invariants:
//! - an operation touches only the labels and types its section allows,
//!   and keys a label by exactly the properties walgraph keys it by (its
//!   mapped key, or the section's `keys`), so it meets the nodes rows made;
//! - a message is applied whole or not at all: any bad item rejects it;
//! - names are checked identifiers and values travel as parameters: no
//!   text from the database ever becomes Cypher.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value as Json};

use super::map::{canonical_numeric, GraphOp, Key, NodeRef, Props};
use super::{check_name, is_identifier, type_kind, Catalog, MappingError, NodeTarget};
use crate::config::{MessagesMapping, OutboxMapping};
use crate::decode::Value;
use crate::lsn::Lsn;

/// How a key property's values are read from JSON: as the values of the
/// mapped column they must meet, or freely for a label no table maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A JSON integer (an integer column).
    Integer,
    /// A JSON string or number, in Postgres' canonical form (a numeric column).
    Numeric,
    /// A JSON string (a text column).
    Text,
    /// A JSON string, lower-cased (a uuid column).
    Uuid,
    /// A JSON boolean (a boolean column).
    Boolean,
    /// Any JSON scalar but null (a label no table maps).
    Free,
}

/// A label an operation may touch, with its key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelRule {
    /// The label.
    pub label: Arc<str>,
    /// Key property names.
    pub key: Vec<Arc<str>>,
    /// How each key value is read, aligned with `key`.
    pub kinds: Vec<KeyKind>,
    /// Its versions are kept (`validFrom` and `validTo` are then theirs).
    pub history: bool,
}

/// What the operations of one `[[messages]]` or `[[outbox]]` section may
/// touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Where the operations come from, for sentences (`prefix walgraph`,
    /// `outbox public.outbox`).
    pub source: String,
    /// Allowed labels.
    pub labels: HashMap<Arc<str>, LabelRule>,
    /// Allowed relationship types.
    pub types: HashSet<Arc<str>>,
}

/// A compiled `[[outbox]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxTarget {
    /// The column holding the operation.
    pub column: String,
    /// The aggregate's label and key columns (Debezium's `aggregatetype`
    /// and `aggregateid`), when both are given.
    pub aggregate: Option<(String, String)>,
    /// What its operations may touch.
    pub rules: Rules,
}

/// Compiles the `[[messages]]` and `[[outbox]]` sections against the
/// compiled table mapping and the catalog: each section's rules, and the
/// keys of the labels only they write (for their uniqueness constraints).
#[allow(clippy::type_complexity)]
pub fn compile_events(
    messages: &[MessagesMapping],
    outbox: &[OutboxMapping],
    mapped: &HashMap<String, super::TableTarget>,
    externals: &BTreeMap<Arc<str>, Vec<Arc<str>>>,
    catalog: &Catalog,
) -> Result<
    (
        HashMap<String, Rules>,
        HashMap<String, OutboxTarget>,
        BTreeMap<Arc<str>, Vec<Arc<str>>>,
    ),
    MappingError,
> {
    let nodes: HashMap<&str, (&str, &NodeTarget)> = mapped
        .iter()
        .filter_map(|(t, tt)| tt.node.as_ref().map(|n| (&*n.label, (t.as_str(), n))))
        .collect();
    let mapped_types: HashSet<&str> = mapped
        .values()
        .flat_map(|t| &t.rels)
        .map(|r| &*r.rel_type)
        .collect();
    let version_labels: HashSet<String> = nodes
        .values()
        .filter(|(_, n)| n.history)
        .map(|(_, n)| version_label(&n.label))
        .collect();
    let mut free_keys: BTreeMap<Arc<str>, Vec<Arc<str>>> = BTreeMap::new();
    let mut rules_of = |source: String,
                        labels: &[String],
                        types: &[String],
                        keys: &BTreeMap<String, Vec<String>>|
     -> Result<Rules, MappingError> {
        let mut rules = Rules {
            source: source.clone(),
            ..Rules::default()
        };
        if labels.is_empty() && types.is_empty() {
            return Err(MappingError(format!(
                "the {source} section allows no labels and no types, so every operation would be refused: list them in `labels = [...]` and `types = [...]`"
            )));
        }
        for k in keys.keys() {
            if !labels.contains(k) {
                return Err(MappingError(format!(
                    "the {source} section gives a key for {k}, which is not among its labels"
                )));
            }
        }
        for l in labels {
            check_name("label", l)?;
            if l.starts_with("Walgraph") || version_labels.contains(l) {
                return Err(MappingError(format!(
                    "the {source} section allows the label {l}, which is walgraph's own: choose another"
                )));
            }
            let rule = match nodes.get(l.as_str()) {
                Some((table, n)) => {
                    if keys.contains_key(l) {
                        return Err(MappingError(format!(
                            "the {source} section gives a key for {l}, which {table} maps: operations key it by its mapped key ({}); take the key out",
                            n.key_props.join(", ")
                        )));
                    }
                    let info = catalog
                        .get(*table)
                        .ok_or_else(|| MappingError(format!("{table} is not in the catalog")))?;
                    let mut kinds = Vec::new();
                    for c in &n.key_columns {
                        let at = info.columns.iter().position(|x| x == c);
                        let kind = match at.and_then(|i| info.types.get(i)).map(|t| type_kind(*t)) {
                            Some("integer") => KeyKind::Integer,
                            Some("numeric") => KeyKind::Numeric,
                            Some("uuid") => KeyKind::Uuid,
                            Some("boolean") => KeyKind::Boolean,
                            Some("text") | None => KeyKind::Text,
                            Some(other) => {
                                return Err(MappingError(format!(
                                    "the {source} section allows the label {l}, whose key column {table}.{c} is of the {other} kind, which a JSON operation cannot name exactly: allow only labels keyed by integers, numerics, text, uuids or booleans"
                                )))
                            }
                        };
                        kinds.push(kind);
                    }
                    LabelRule {
                        label: Arc::clone(&n.label),
                        key: n.key_props.clone(),
                        kinds,
                        history: n.history,
                    }
                }
                None if externals.contains_key(l.as_str()) => {
                    if keys.contains_key(l) {
                        return Err(MappingError(format!(
                            "the {source} section gives a key for {l}, an [[external]] label: operations key it by the key given there; take the key out"
                        )));
                    }
                    let key = externals[l.as_str()].clone();
                    LabelRule {
                        label: Arc::from(l.as_str()),
                        kinds: vec![KeyKind::Free; key.len()],
                        key,
                        history: false,
                    }
                }
                None => {
                    let key: Vec<String> =
                        keys.get(l).cloned().unwrap_or_else(|| vec!["id".into()]);
                    if key.is_empty() {
                        return Err(MappingError(format!(
                            "the {source} section gives {l} an empty key"
                        )));
                    }
                    for k in &key {
                        check_name("key property", k)?;
                    }
                    let key: Vec<Arc<str>> = key.iter().map(|k| Arc::from(k.as_str())).collect();
                    let label: Arc<str> = Arc::from(l.as_str());
                    match free_keys.get(&label) {
                        Some(had) if *had != key => {
                            return Err(MappingError(format!(
                                "two sections key {l} differently ({} and {}); give it one key",
                                had.join(", "),
                                key.join(", ")
                            )))
                        }
                        _ => {
                            free_keys.insert(Arc::clone(&label), key.clone());
                        }
                    }
                    LabelRule {
                        label,
                        kinds: vec![KeyKind::Free; key.len()],
                        key,
                        history: false,
                    }
                }
            };
            rules.labels.insert(Arc::clone(&rule.label), rule);
        }
        for t in types {
            check_name("relationship type", t)?;
            if mapped_types.contains(t.as_str()) {
                return Err(MappingError(format!(
                    "the {source} section allows the relationship type {t}, which a [[relationship]] maps from a table: the table decides those relationships, so give the operations a type of their own"
                )));
            }
            if t == "VERSION" && !version_labels.is_empty() {
                return Err(MappingError(format!(
                    "the {source} section allows the relationship type VERSION, which history uses: choose another"
                )));
            }
            rules.types.insert(Arc::from(t.as_str()));
        }
        Ok(rules)
    };
    let mut by_prefix = HashMap::new();
    for m in messages {
        if m.prefix.is_empty() || m.prefix == crate::config::HEARTBEAT_PREFIX {
            return Err(MappingError(format!(
                "[[messages]] prefix `{}` is not allowed: give a non-empty prefix other than walgraph's heartbeat prefix",
                m.prefix
            )));
        }
        let rules = rules_of(
            format!("[[messages]] prefix {}", m.prefix),
            &m.labels,
            &m.types,
            &m.keys,
        )?;
        if by_prefix.insert(m.prefix.clone(), rules).is_some() {
            return Err(MappingError(format!(
                "two [[messages]] sections have the prefix {}; merge them",
                m.prefix
            )));
        }
    }
    let mut outboxes = HashMap::new();
    for o in outbox {
        let info = super::table_info(catalog, &o.table)?;
        if mapped.contains_key(&o.table) {
            return Err(MappingError(format!(
                "{} is both mapped and an outbox; an outbox table's rows are operations, not nodes: keep one",
                o.table
            )));
        }
        if info.replica_identity == 'n'
            || (info.replica_identity == 'd' && info.primary_key.is_empty())
        {
            return Err(MappingError(format!(
                "the outbox {} has no primary key (or REPLICA IDENTITY NOTHING), so once it is published Postgres refuses to delete or update its rows: add a primary key or run ALTER TABLE {} REPLICA IDENTITY FULL",
                o.table, o.table
            )));
        }
        let mut cols = vec![o.column.clone()];
        cols.extend(o.type_column.iter().cloned());
        cols.extend(o.aggregate_column.iter().cloned());
        super::check_columns(&o.table, info, &cols, "outbox")?;
        let aggregate = match (&o.type_column, &o.aggregate_column) {
            (Some(t), Some(a)) => Some((t.clone(), a.clone())),
            (None, None) => None,
            _ => {
                return Err(MappingError(format!(
                    "the [[outbox]] of {} gives only one of type_column and aggregate_column; give both (the aggregate's label and key) or neither",
                    o.table
                )))
            }
        };
        let rules = rules_of(
            format!("[[outbox]] {}", o.table),
            &o.labels,
            &o.types,
            &o.keys,
        )?;
        if aggregate.is_some() && rules.labels.values().any(|r| r.key.len() != 1) {
            return Err(MappingError(format!(
                "the [[outbox]] of {} names its aggregate by one key column, so its labels must have a one-property key",
                o.table
            )));
        }
        outboxes.insert(
            o.table.clone(),
            OutboxTarget {
                column: o.column.clone(),
                aggregate,
                rules,
            },
        );
    }
    Ok((by_prefix, outboxes, free_keys))
}

/// The label of a history label's versions.
pub fn version_label(label: &str) -> String {
    format!("{label}Version")
}

/// Why an operation is refused: one sentence, without the source or the
/// position (the caller adds them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(msg.into()))
}

/// Parses one message or outbox payload (a JSON operation or a list of
/// them) into graph operations stamped with `lsn`; nothing when any item
/// is refused.
pub fn parse_operations(text: &str, rules: &Rules, lsn: Lsn) -> Result<Vec<GraphOp>, Refused> {
    let json: Json =
        serde_json::from_str(text).map_err(|e| Refused(format!("it is not JSON ({e})")))?;
    operations(&json, rules, lsn)
}

/// As [`parse_operations`], from parsed JSON.
pub fn operations(json: &Json, rules: &Rules, lsn: Lsn) -> Result<Vec<GraphOp>, Refused> {
    let mut out = Vec::new();
    match json {
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                operation(item, rules, lsn, &mut out)
                    .map_err(|Refused(e)| Refused(format!("item {i} of the list: {e}")))?;
            }
        }
        other => operation(other, rules, lsn, &mut out)?,
    }
    Ok(out)
}

fn fields<'j>(v: &'j Json, what: &str, allowed: &[&str]) -> Result<&'j Map<String, Json>, Refused> {
    let Json::Object(m) = v else {
        return refuse(format!("{what} must be a JSON object"));
    };
    if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
        return refuse(format!(
            "{what} has the field `{k}`, which it does not take (it takes {})",
            allowed.join(", ")
        ));
    }
    Ok(m)
}

fn text_field<'j>(m: &'j Map<String, Json>, name: &str, what: &str) -> Result<&'j str, Refused> {
    match m.get(name) {
        Some(Json::String(s)) => Ok(s),
        Some(_) => refuse(format!("the `{name}` of {what} must be a string")),
        None => refuse(format!("{what} lacks `{name}`")),
    }
}

fn operation(v: &Json, rules: &Rules, lsn: Lsn, out: &mut Vec<GraphOp>) -> Result<(), Refused> {
    let Json::Object(m) = v else {
        return refuse("an operation must be a JSON object with an `op` field, or a list of them");
    };
    let op = match m.get("op") {
        Some(Json::String(s)) => s.as_str(),
        _ => return refuse("an operation lacks `op` (merge_node, delete_node, merge_relationship or delete_relationship)"),
    };
    match op {
        "merge_node" => {
            let m = fields(v, "a merge_node", &["op", "label", "key", "properties"])?;
            let node = node_ref(m, rules, "a merge_node")?;
            let props = properties(m.get("properties"), &rules.labels[&node.label])?;
            out.push(GraphOp::UpsertNode {
                node,
                props,
                lsn,
                source: None,
            });
        }
        "delete_node" => {
            let m = fields(v, "a delete_node", &["op", "label", "key"])?;
            out.push(GraphOp::DeleteNode {
                node: node_ref(m, rules, "a delete_node")?,
                lsn,
            });
        }
        "merge_relationship" | "delete_relationship" => {
            let merge = op == "merge_relationship";
            let what = if merge {
                "a merge_relationship"
            } else {
                "a delete_relationship"
            };
            let allowed: &[&str] = if merge {
                &["op", "type", "from", "to", "properties"]
            } else {
                &["op", "type", "from", "to"]
            };
            let m = fields(v, what, allowed)?;
            let t = text_field(m, "type", what)?;
            let Some(rel_type) = rules.types.get(t) else {
                return refuse(format!(
                    "the relationship type `{t}` is not among the types the {} section allows",
                    rules.source
                ));
            };
            let end = |name: &str| -> Result<NodeRef, Refused> {
                let e = m
                    .get(name)
                    .ok_or_else(|| Refused(format!("{what} lacks `{name}`")))?;
                let em = fields(e, &format!("the `{name}` of {what}"), &["label", "key"])?;
                node_ref(em, rules, &format!("the `{name}` of {what}"))
            };
            let (from, to) = (end("from")?, end("to")?);
            if merge {
                let props = properties(m.get("properties"), &LabelRule::default())?;
                out.push(GraphOp::MergeEdge {
                    rel_type: Arc::clone(rel_type),
                    key: Key(Vec::new()),
                    from,
                    to,
                    props,
                    lsn,
                });
            } else {
                out.push(GraphOp::DeleteEdge {
                    rel_type: Arc::clone(rel_type),
                    key: Key(Vec::new()),
                    ends: Some((from, to)),
                    lsn,
                });
            }
        }
        other => {
            return refuse(format!(
                "`{other}` is not an operation (merge_node, delete_node, merge_relationship or delete_relationship)"
            ))
        }
    }
    Ok(())
}

fn node_ref(m: &Map<String, Json>, rules: &Rules, what: &str) -> Result<NodeRef, Refused> {
    let label = text_field(m, "label", what)?;
    let Some(rule) = rules.labels.get(label) else {
        return refuse(format!(
            "the label `{label}` is not among the labels the {} section allows",
            rules.source
        ));
    };
    let key = match m.get("key") {
        Some(Json::Object(k)) => k,
        Some(_) => return refuse(format!("the `key` of {what} must be a JSON object")),
        None => return refuse(format!("{what} lacks `key`")),
    };
    if let Some(extra) = key
        .keys()
        .find(|k| !rule.key.iter().any(|p| &**p == k.as_str()))
    {
        return refuse(format!(
            "the key of {label} is ({}), but {what} gives `{extra}`",
            rule.key.join(", ")
        ));
    }
    let mut vals = Vec::with_capacity(rule.key.len());
    for (p, kind) in rule.key.iter().zip(&rule.kinds) {
        let v = key.get(&**p).ok_or_else(|| {
            Refused(format!(
                "the key of {what} lacks `{p}` (the key of {label} is ({}))",
                rule.key.join(", ")
            ))
        })?;
        vals.push(key_value(v, *kind).ok_or_else(|| {
            Refused(format!(
                "the key `{p}` of {label} must be {}, not {v}",
                match kind {
                    KeyKind::Integer => "a JSON integer",
                    KeyKind::Numeric => "a number or a string holding one",
                    KeyKind::Text | KeyKind::Uuid => "a JSON string",
                    KeyKind::Boolean => "true or false",
                    KeyKind::Free => "a string, number or boolean",
                }
            ))
        })?);
    }
    Ok(NodeRef {
        label: Arc::clone(&rule.label),
        key: Key(vals),
    })
}

fn key_value(v: &Json, kind: KeyKind) -> Option<Value> {
    Some(match (kind, v) {
        (KeyKind::Integer, Json::Number(n)) => Value::Int(n.as_i64()?),
        (KeyKind::Numeric, Json::Number(n)) => Value::Numeric(numeric_text(&n.to_string())?),
        (KeyKind::Numeric, Json::String(s)) => Value::Numeric(numeric_text(s)?),
        (KeyKind::Text, Json::String(s)) => Value::Text(s.clone()),
        (KeyKind::Uuid, Json::String(s)) => Value::Uuid(s.to_ascii_lowercase()),
        (KeyKind::Boolean, Json::Bool(b)) => Value::Bool(*b),
        (KeyKind::Free, Json::Number(n)) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64()?),
        },
        (KeyKind::Free, Json::String(s)) => Value::Text(s.clone()),
        (KeyKind::Free, Json::Bool(b)) => Value::Bool(*b),
        _ => return None,
    })
}

/// A numeric key as Postgres writes it (digits, maybe a point and more
/// digits, maybe a minus; or `NaN`), in its one form per number; `None`
/// for anything else (an exponent, a bare point), which could not be
/// matched to the row's key exactly.
fn numeric_text(s: &str) -> Option<String> {
    if s == "NaN" {
        return Some(s.into());
    }
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, frac) = match digits.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (digits, None),
    };
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || frac.is_some_and(|f| !all_digits(f)) {
        return None;
    }
    let whole = whole.trim_start_matches('0');
    let whole = if whole.is_empty() { "0" } else { whole };
    let text = match frac {
        Some(f) => format!("{}{whole}.{f}", if neg { "-" } else { "" }),
        None => format!("{}{whole}", if neg { "-" } else { "" }),
    };
    Some(canonical_numeric(&text))
}

fn properties(v: Option<&Json>, rule: &LabelRule) -> Result<Props, Refused> {
    let key = &rule.key;
    let m = match v {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Object(m)) => m,
        Some(_) => return refuse("`properties` must be a JSON object"),
    };
    let mut out = Vec::with_capacity(m.len());
    for (name, v) in m {
        if !is_identifier(name) || name == "_lsn" {
            return refuse(format!(
                "the property name `{name}` is not allowed: use letters, digits and underscores, starting with a letter, and not _lsn"
            ));
        }
        if rule.history && (name == "validFrom" || name == "validTo") {
            return refuse(format!(
                "`{name}` is what the versions of {} say, which history keeps: give the property another name",
                rule.label
            ));
        }
        if key.iter().any(|k| &**k == name.as_str()) {
            return refuse(format!(
                "`{name}` is a key property; it goes in `key`, not `properties`"
            ));
        }
        out.push((Arc::from(name.as_str()), property_value(name, v)?));
    }
    Ok(out)
}

fn scalar(v: &Json) -> Option<Value> {
    Some(match v {
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64()?),
        },
        Json::String(s) => Value::Text(s.clone()),
        _ => return None,
    })
}

fn property_value(name: &str, v: &Json) -> Result<Value, Refused> {
    match v {
        Json::Null => Ok(Value::Null),
        Json::Array(items) => {
            let vals: Option<Vec<Value>> = items.iter().map(scalar).collect();
            let vals = vals.filter(|vs| {
                vs.windows(2).all(|w| match (&w[0], &w[1]) {
                    (Value::Int(_) | Value::Float(_), Value::Int(_) | Value::Float(_)) => true,
                    (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
                })
            });
            match vals {
                // Neo4j lists hold one type: integers among floats become floats.
                Some(vs) if vs.iter().any(|v| matches!(v, Value::Float(_))) => Ok(Value::Array(
                    vs.into_iter()
                        .map(|v| match v {
                            Value::Int(i) => Value::Float(i as f64),
                            other => other,
                        })
                        .collect(),
                )),
                Some(vs) => Ok(Value::Array(vs)),
                None => refuse(format!(
                    "the property `{name}` is a list of mixed or nested values, which Neo4j cannot store; send it as a string"
                )),
            }
        }
        Json::Object(_) => refuse(format!(
            "the property `{name}` is a JSON object, which Neo4j cannot store as a property; send it as a string"
        )),
        other => scalar(other).ok_or_else(|| Refused(format!("the property `{name}` is out of range"))),
    }
}

/// The operations of an outbox row: its payload as operations, or, with
/// aggregate columns, a payload that is not an operation as the
/// properties of the aggregate's node (and a NULL payload as its delete).
pub fn outbox_operations(
    target: &OutboxTarget,
    payload: Option<&str>,
    aggregate: Option<(&str, Value)>,
    lsn: Lsn,
) -> Result<Vec<GraphOp>, Refused> {
    let json: Option<Json> = match payload {
        Some(t) => {
            Some(serde_json::from_str(t).map_err(|e| Refused(format!("it is not JSON ({e})")))?)
        }
        None => None,
    };
    let is_operation = |j: &Json| match j {
        Json::Array(_) => true,
        Json::Object(m) => m.contains_key("op"),
        _ => false,
    };
    match (json, aggregate) {
        (Some(j), _) if is_operation(&j) => operations(&j, &target.rules, lsn),
        (j, Some((label, id))) => {
            let Some(rule) = target.rules.labels.get(label) else {
                return refuse(format!(
                    "the aggregate type `{label}` is not among the labels the {} section allows",
                    target.rules.source
                ));
            };
            let id = match (rule.kinds[0], id) {
                (KeyKind::Integer, v @ Value::Int(_)) => v,
                (KeyKind::Integer, Value::Text(s)) => Value::Int(s.trim().parse().map_err(|_| {
                    Refused(format!("the aggregate id `{s}` is not an integer, as the key of {label} is"))
                })?),
                (KeyKind::Numeric, Value::Numeric(s) | Value::Text(s)) => Value::Numeric(canonical_numeric(&s)),
                (KeyKind::Uuid, Value::Uuid(s) | Value::Text(s)) => Value::Uuid(s.to_ascii_lowercase()),
                (KeyKind::Text | KeyKind::Free, Value::Text(s) | Value::Uuid(s)) => Value::Text(s),
                (KeyKind::Free, v @ Value::Int(_)) => v,
                (_, Value::Null) => return refuse("the aggregate id is NULL"),
                (_, v) => {
                    return refuse(format!(
                        "the aggregate id {} does not fit the key of {label}",
                        v.to_plain_json()
                    ))
                }
            };
            let node = NodeRef {
                label: Arc::clone(&rule.label),
                key: Key(vec![id]),
            };
            match j {
                None | Some(Json::Null) => Ok(vec![GraphOp::DeleteNode { node, lsn }]),
                Some(j @ Json::Object(_)) => Ok(vec![GraphOp::UpsertNode {
                    node,
                    props: properties(Some(&j), rule)?,
                    lsn,
                    source: None,
                }]),
                Some(_) => refuse("the payload is neither an operation nor an object of properties"),
            }
        }
        (None, None) => refuse("the payload is NULL"),
        (Some(_), None) => refuse(
            "the payload is not an operation (an object with `op`, or a list of them); give the section type_column and aggregate_column to apply plain payloads to their aggregate",
        ),
    }
}

#[cfg(test)]
mod tests;
