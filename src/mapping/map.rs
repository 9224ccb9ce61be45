//! Map: row changes → graph operations. Pure: no I/O.
//!
//! Invariants:
//! - only mapped columns become properties; an unchanged TOASTed column is
//!   left out of the operation (so the graph keeps its value), a NULL column
//!   removes the property;
//! - a change of a row's key deletes the node under the old key and upserts
//!   it under the new one, which takes the old node's properties first (an
//!   unchanged TOASTed column is not in the change);
//! - a delete or TRUNCATE never removes what is newer than it: a
//!   relationship stamped after it keeps its end as a placeholder;
//! - a NULL (or partly NULL) foreign key means no relationship;
//! - every operation carries the commit LSN of its transaction.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::decode::{Field, Relation, Value};
use crate::lsn::Lsn;
use crate::mapping::{EndpointTarget, Mapping, NodeTarget, PropertyMap, RelKind, RelTarget};
use crate::transactions::{Change, Op};

/// Key values, compared exactly (floats by their bits).
#[derive(Debug, Clone)]
pub struct Key(pub Vec<Value>);

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(&other.0).all(|(a, b)| value_eq(a, b))
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        for v in &self.0 {
            hash_value(v, state);
        }
    }
}

fn value_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| value_eq(a, b))
        }
        _ => a == b,
    }
}

fn hash_value<H: Hasher>(v: &Value, state: &mut H) {
    std::mem::discriminant(v).hash(state);
    match v {
        Value::Null => {}
        Value::Bool(b) => b.hash(state),
        Value::Int(i) => i.hash(state),
        Value::Float(f) => f.to_bits().hash(state),
        Value::Numeric(s) | Value::Text(s) | Value::Uuid(s) | Value::Json(s) | Value::Inet(s) => {
            s.hash(state)
        }
        Value::Bytes(b) => b.hash(state),
        Value::Date(d) => d.hash(state),
        Value::Time(t) => t.hash(state),
        Value::TimeTz(t, o) => (t, o).hash(state),
        Value::Timestamp(t) => t.hash(state),
        Value::TimestampTz(t) => t.hash(state),
        Value::Interval(i) => i.hash(state),
        Value::Array(items) => {
            items.len().hash(state);
            for i in items {
                hash_value(i, state);
            }
        }
    }
}

impl Hash for crate::decode::value::Interval {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.months, self.days, self.micros).hash(state);
    }
}

/// A node by label and key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeRef {
    /// Label.
    pub label: Arc<str>,
    /// Key values, aligned with the label's key properties.
    pub key: Key,
}

/// Properties to set: name and value (NULL removes the property).
pub type Props = Vec<(Arc<str>, Value)>;

/// One graph operation.
#[derive(Debug, Clone, PartialEq)]
pub enum GraphOp {
    /// Create or update a node, setting only the given properties.
    UpsertNode {
        /// The node.
        node: NodeRef,
        /// Properties to set.
        props: Props,
        /// Commit LSN.
        lsn: Lsn,
        /// On a change of the row's key: the node under the old key, whose
        /// properties the new node takes first (unless it is newer than the
        /// LSN given with it), so a value the change did not send (an
        /// unchanged TOASTed column) comes along.
        source: Option<(NodeRef, Lsn)>,
    },
    /// Delete a node and its relationships not newer than `lsn`; a node
    /// that keeps a newer relationship (one a snapshot chunk or a repair
    /// stamped after the delete) stays as a placeholder.
    DeleteNode {
        /// The node.
        node: NodeRef,
        /// Commit LSN.
        lsn: Lsn,
    },
    /// Replace the one edge of `rel_type` a row owns (foreign key); `other`
    /// `None` removes it.
    SetOwnedRel {
        /// Relationship type.
        rel_type: Arc<str>,
        /// The row's own node.
        own: NodeRef,
        /// The node at the other end, if the foreign key is not NULL.
        other: Option<NodeRef>,
        /// The own node is the start of the edge.
        own_is_from: bool,
        /// Commit LSN.
        lsn: Lsn,
    },
    /// Create or update an edge row (join table).
    MergeEdge {
        /// Relationship type.
        rel_type: Arc<str>,
        /// The edge's identity: its key values (empty with pair identity).
        key: Key,
        /// Start node.
        from: NodeRef,
        /// End node.
        to: NodeRef,
        /// Properties to set.
        props: Props,
        /// Commit LSN.
        lsn: Lsn,
    },
    /// Delete an edge row (join table).
    DeleteEdge {
        /// Relationship type.
        rel_type: Arc<str>,
        /// The edge's key values (empty with pair identity).
        key: Key,
        /// Start and end node (pair identity only).
        ends: Option<(NodeRef, NodeRef)>,
        /// Commit LSN.
        lsn: Lsn,
    },
    /// Create the node as a placeholder (key only, no `_lsn`) unless it
    /// exists. The mapper never emits this; the batcher does, where it
    /// coalesces away an operation that would have created the node.
    EnsureNode {
        /// The node.
        node: NodeRef,
    },
    /// Create the node as a placeholder unless it exists, as the row-owned
    /// edge of `owner` at `lsn` that the batcher coalesced away would have:
    /// only where that edge's guard would have let it, judged against the
    /// owner as it was before the batch's segment — it exists and its
    /// `_lsn` is absent or not newer than `lsn`, or it does not exist yet
    /// and the segment created it before the edge (`owner_written`). The
    /// mapper never emits this.
    EnsureEndOf {
        /// The node at the other end.
        node: NodeRef,
        /// The row's own node.
        owner: NodeRef,
        /// An upsert of the owner came before the edge in the segment.
        owner_written: bool,
        /// Commit LSN of the coalesced-away edge.
        lsn: Lsn,
    },
    /// Delete every node with a label (TRUNCATE of a node table), as
    /// `DeleteNode` does each: nodes and relationships newer than `lsn`
    /// stay.
    TruncateLabel {
        /// Label.
        label: Arc<str>,
        /// Commit LSN.
        lsn: Lsn,
    },
    /// Delete every relationship of a type (TRUNCATE of a join table) not
    /// newer than `lsn`.
    TruncateType {
        /// Relationship type.
        rel_type: Arc<str>,
        /// Commit LSN.
        lsn: Lsn,
    },
}

/// Why a change could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// A mapped column is not in the table (any more).
    #[error("{table} has no column `{column}` any more, but the mapping uses it; restore the column or change the mapping")]
    MissingColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// A mapped table was renamed while walgraph ran.
    #[error("the mapped table {was} is now called {now} (a change to it at {lsn}); name it so in the mapping, run `walgraph setup`, and start walgraph again: the slot still holds the change")]
    Renamed {
        /// The name the mapping has.
        was: String,
        /// The table's name now.
        now: String,
        /// Commit LSN of the change.
        lsn: Lsn,
    },
    /// A message or an outbox row whose operation walgraph refuses
    /// (malformed, or touching what its section does not allow).
    #[error("{origin} at {lsn} is refused: {why}; fix what writes it, or set neo4j.on_error = \"dead_letter\" to record such operations and go on")]
    Refused {
        /// Where it came from (`the message with prefix walgraph`, `a row
        /// inserted into public.outbox`).
        origin: String,
        /// Commit LSN of its transaction (or its own, outside one).
        lsn: Lsn,
        /// Why.
        why: String,
        /// The operation's text.
        text: String,
    },
    /// A key column came without a value.
    #[error("a change to {table} at {lsn} has no value for key column `{column}`; give the table a primary key or REPLICA IDENTITY FULL")]
    MissingKey {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Commit LSN.
        lsn: Lsn,
    },
}

/// Maps changes to graph operations.
#[derive(Debug, Clone)]
pub struct Mapper {
    mapping: Arc<Mapping>,
}

fn column<'r>(rel: &Relation, row: &'r [Field], name: &str) -> Result<&'r Field, MapError> {
    let i = rel
        .column_index(name)
        .ok_or_else(|| MapError::MissingColumn {
            table: rel.qualified_name(),
            column: name.to_string(),
        })?;
    row.get(i).ok_or_else(|| MapError::MissingColumn {
        table: rel.qualified_name(),
        column: name.to_string(),
    })
}

/// Key values of `columns`; `Ok(None)` when any is NULL or unchanged.
fn key_of(rel: &Relation, row: &[Field], columns: &[String]) -> Result<Option<Key>, MapError> {
    let mut vals = Vec::with_capacity(columns.len());
    for c in columns {
        match column(rel, row, c)? {
            Field::Value(Value::Null) | Field::Unchanged => return Ok(None),
            Field::Value(Value::Numeric(n)) => vals.push(Value::Numeric(canonical_numeric(n))),
            Field::Value(v) => vals.push(v.clone()),
        }
    }
    Ok(Some(Key(vals)))
}

/// A numeric key in one form for one number: `5.00` (a `numeric(10,2)`
/// foreign key) and `5` (a `numeric` key) are equal to Postgres, so they
/// name one node.
pub(crate) fn canonical_numeric(n: &str) -> String {
    let Some((whole, frac)) = n.split_once('.') else {
        return if n == "-0" { "0".into() } else { n.into() };
    };
    let frac = frac.trim_end_matches('0');
    let out = if frac.is_empty() {
        whole.to_string()
    } else {
        format!("{whole}.{frac}")
    };
    if out == "-0" {
        "0".into()
    } else {
        out
    }
}

fn required_key(
    rel: &Relation,
    row: &[Field],
    columns: &[String],
    lsn: Lsn,
) -> Result<Key, MapError> {
    key_of(rel, row, columns)?.ok_or_else(|| MapError::MissingKey {
        table: rel.qualified_name(),
        column: columns.join(", "),
        lsn,
    })
}

fn props_of(rel: &Relation, row: &[Field], props: &[PropertyMap]) -> Result<Props, MapError> {
    let mut out = Vec::with_capacity(props.len());
    for p in props {
        if let Field::Value(v) = column(rel, row, &p.column)? {
            out.push((Arc::clone(&p.property), v.clone()));
        }
    }
    Ok(out)
}

fn endpoint(
    rel: &Relation,
    row: &[Field],
    e: &EndpointTarget,
) -> Result<Option<NodeRef>, MapError> {
    Ok(key_of(rel, row, &e.columns)?.map(|key| NodeRef {
        label: Arc::clone(&e.label),
        key,
    }))
}

impl Mapper {
    /// A mapper for a compiled mapping.
    pub fn new(mapping: Arc<Mapping>) -> Self {
        Mapper { mapping }
    }

    /// The mapping.
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// Whether the table is an outbox (its rows carry operations lists).
    pub fn is_outbox(&self, rel: &Relation) -> bool {
        !self.mapping.outbox.is_empty() && self.mapping.outbox.contains_key(&rel.qualified_name())
    }

    /// Whether messages with this prefix are graph operations.
    pub fn takes_messages(&self, prefix: &str) -> bool {
        self.mapping.messages.contains_key(prefix)
    }

    /// Appends the operations of a logical message to `out`; nothing for
    /// a prefix no `[[messages]]` section names.
    pub fn map_message(
        &self,
        m: &crate::transactions::LogicalMessage,
        lsn: Lsn,
        out: &mut Vec<GraphOp>,
    ) -> Result<(), MapError> {
        let Some(rules) = self.mapping.messages.get(&m.prefix) else {
            return Ok(());
        };
        let ops = super::events::parse_operations(&m.content, rules, lsn).map_err(|e| {
            MapError::Refused {
                origin: format!("the message with prefix {}", m.prefix),
                lsn,
                why: e.0,
                text: m.content.clone(),
            }
        })?;
        out.extend(ops);
        Ok(())
    }

    fn map_outbox(
        &self,
        change: &Change,
        target: &super::events::OutboxTarget,
        lsn: Lsn,
        out: &mut Vec<GraphOp>,
    ) -> Result<(), MapError> {
        // Only inserts are events; an outbox row deleted right after (the
        // usual pattern), or updated, changes nothing.
        if change.op != Op::Insert {
            return Ok(());
        }
        let rel = &change.relation;
        let new: &[Field] = change.new.as_deref().unwrap_or(&[]);
        let table = rel.qualified_name();
        let refused = |why: String, text: String| MapError::Refused {
            origin: format!("a row inserted into {table}"),
            lsn,
            why,
            text,
        };
        let payload = match column(rel, new, &target.column)? {
            Field::Value(Value::Json(s) | Value::Text(s)) => Some(s.as_str()),
            Field::Value(Value::Null) => None,
            Field::Value(v) => {
                return Err(refused(
                    format!(
                        "its column {} holds {}, not JSON text",
                        target.column,
                        v.to_plain_json()
                    ),
                    String::new(),
                ))
            }
            Field::Unchanged => None,
        };
        let aggregate = match &target.aggregate {
            Some((type_col, id_col)) => {
                // A row without an aggregate type carries an operation.
                match column(rel, new, type_col)? {
                    Field::Value(Value::Text(label)) => {
                        let id = match column(rel, new, id_col)? {
                            Field::Value(v) => v.clone(),
                            Field::Unchanged => Value::Null,
                        };
                        Some((label.as_str(), id))
                    }
                    Field::Value(Value::Null) | Field::Unchanged => None,
                    Field::Value(v) => {
                        return Err(refused(
                            format!(
                                "its column {type_col} holds {}, not a label",
                                v.to_plain_json()
                            ),
                            payload.unwrap_or_default().to_string(),
                        ))
                    }
                }
            }
            None => None,
        };
        let ops = super::events::outbox_operations(target, payload, aggregate, lsn)
            .map_err(|e| refused(e.0, payload.unwrap_or_default().to_string()))?;
        out.extend(ops);
        Ok(())
    }

    /// Appends the operations for one change to `out`.
    pub fn map_change(
        &self,
        change: &Change,
        lsn: Lsn,
        out: &mut Vec<GraphOp>,
    ) -> Result<(), MapError> {
        let rel = &change.relation;
        if !self.mapping.outbox.is_empty() {
            if let Some(o) = self.mapping.outbox.get(&rel.qualified_name()) {
                return self.map_outbox(change, o, lsn, out);
            }
        }
        let Some(target) = self.mapping.tables.get(&rel.qualified_name()) else {
            // Not mapped, unless it is a mapped table under a new name:
            // its changes must not be dropped while the checkpoint moves on.
            if let Some(was) = self.mapping.oids.get(&rel.oid) {
                return Err(MapError::Renamed {
                    was: was.clone(),
                    now: rel.qualified_name(),
                    lsn,
                });
            }
            return Ok(());
        };
        if let Some(node) = &target.node {
            self.map_node(change, node, lsn, out)?;
        }
        for r in &target.rels {
            self.map_rel(change, target.node.as_ref(), r, lsn, out)?;
        }
        Ok(())
    }

    fn map_node(
        &self,
        change: &Change,
        node: &NodeTarget,
        lsn: Lsn,
        out: &mut Vec<GraphOp>,
    ) -> Result<(), MapError> {
        let rel = &change.relation;
        let node_ref = |key| NodeRef {
            label: Arc::clone(&node.label),
            key,
        };
        match change.op {
            Op::Insert | Op::Update => {
                // Borrowed: the per-change path copies no row.
                let new: &[Field] = change.new.as_deref().unwrap_or(&[]);
                let new_key = required_key(rel, new, &node.key_columns, lsn)?;
                let mut old_key = None;
                if let Some(old) = &change.old {
                    old_key = key_of(rel, old, &node.key_columns)?.filter(|k| *k != new_key);
                }
                // The new node first, while the old one is there to copy.
                out.push(GraphOp::UpsertNode {
                    node: node_ref(new_key),
                    props: props_of(rel, new, &node.props_for(&rel.columns))?,
                    lsn,
                    source: old_key.clone().map(|k| (node_ref(k), lsn)),
                });
                if let Some(k) = old_key {
                    out.push(GraphOp::DeleteNode {
                        node: node_ref(k),
                        lsn,
                    });
                }
            }
            Op::Delete => {
                let old: &[Field] = change.old.as_deref().unwrap_or(&[]);
                out.push(GraphOp::DeleteNode {
                    node: node_ref(required_key(rel, old, &node.key_columns, lsn)?),
                    lsn,
                });
            }
            Op::Truncate => out.push(GraphOp::TruncateLabel {
                label: Arc::clone(&node.label),
                lsn,
            }),
        }
        Ok(())
    }

    fn map_rel(
        &self,
        change: &Change,
        own: Option<&NodeTarget>,
        r: &RelTarget,
        lsn: Lsn,
        out: &mut Vec<GraphOp>,
    ) -> Result<(), MapError> {
        let rel = &change.relation;
        match (r.kind, change.op) {
            (_, Op::Truncate) => {
                if own.is_none() {
                    out.push(GraphOp::TruncateType {
                        rel_type: Arc::clone(&r.rel_type),
                        lsn,
                    });
                }
            }
            // Deleting the row's node detaches its edges.
            (RelKind::RowOwned { .. }, Op::Delete) => {}
            (RelKind::RowOwned { own_is_from }, Op::Insert | Op::Update) => {
                let new: &[Field] = change.new.as_deref().unwrap_or(&[]);
                let (own_end, other_end) = if own_is_from {
                    (&r.from, &r.to)
                } else {
                    (&r.to, &r.from)
                };
                let own_ref = endpoint(rel, new, own_end)?.ok_or_else(|| MapError::MissingKey {
                    table: rel.qualified_name(),
                    column: own_end.columns.join(", "),
                    lsn,
                })?;
                // An unchanged TOASTed foreign key cannot occur (keys are not
                // TOASTed), so None here means NULL: no edge.
                let other = endpoint(rel, new, other_end)?;
                out.push(GraphOp::SetOwnedRel {
                    rel_type: Arc::clone(&r.rel_type),
                    own: own_ref,
                    other,
                    own_is_from,
                    lsn,
                });
            }
            (RelKind::Edge { pair_identity }, op) => {
                let edge_key = |row: &[Field]| -> Result<Key, MapError> {
                    if pair_identity {
                        Ok(Key(Vec::new()))
                    } else {
                        required_key(rel, row, &r.key_columns, lsn)
                    }
                };
                let ends = |row: &[Field]| -> Result<Option<(NodeRef, NodeRef)>, MapError> {
                    Ok(
                        match (endpoint(rel, row, &r.from)?, endpoint(rel, row, &r.to)?) {
                            (Some(f), Some(t)) => Some((f, t)),
                            _ => None,
                        },
                    )
                };
                if let Some(old) = change.old.as_ref().filter(|_| op != Op::Insert) {
                    // With pair identity the old key holds both ends; with key
                    // identity the key alone finds the edge.
                    let old_ends = if pair_identity { ends(old)? } else { None };
                    let old_key = if pair_identity {
                        Some(Key(Vec::new()))
                    } else {
                        key_of(rel, old, &r.key_columns)?
                    };
                    let moved = match op {
                        Op::Delete => true,
                        _ => {
                            let new: &[Field] = change.new.as_deref().unwrap_or(&[]);
                            if pair_identity {
                                old_ends != ends(new)?
                            } else {
                                old_key.as_ref() != Some(&edge_key(new)?)
                            }
                        }
                    };
                    if moved && (old_ends.is_some() || !pair_identity) {
                        if let Some(key) = old_key {
                            out.push(GraphOp::DeleteEdge {
                                rel_type: Arc::clone(&r.rel_type),
                                key,
                                ends: old_ends,
                                lsn,
                            });
                        }
                    }
                }
                if let Some(new) = &change.new {
                    if let Some((from, to)) = ends(new)? {
                        out.push(GraphOp::MergeEdge {
                            rel_type: Arc::clone(&r.rel_type),
                            key: edge_key(new)?,
                            from,
                            to,
                            props: props_of(rel, new, &r.props)?,
                            lsn,
                        });
                    } else if !pair_identity && change.old.is_none() && op == Op::Update {
                        // The edge lost an end: remove it by its key.
                        out.push(GraphOp::DeleteEdge {
                            rel_type: Arc::clone(&r.rel_type),
                            key: edge_key(new)?,
                            ends: None,
                            lsn,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_numeric;

    #[test]
    fn numeric_keys_have_one_form_per_number() {
        for (text, want) in [
            ("5", "5"),
            ("5.00", "5"),
            ("5.50", "5.5"),
            ("-0.000", "0"),
            ("-0", "0"),
            ("100", "100"),
            ("-12.0100", "-12.01"),
            ("NaN", "NaN"),
        ] {
            assert_eq!(canonical_numeric(text), want, "{text}");
        }
    }
}
