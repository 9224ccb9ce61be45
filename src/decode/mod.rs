//! Decode: bytes of the replication stream → `pgoutput` messages → typed rows.
//!
//! Invariants:
//! - arbitrary bytes give a [`DecodeError`], never a panic;
//! - a Relation message replaces the cached shape of its table (Postgres
//!   resends it after DDL, so added, dropped and renamed columns and a changed
//!   replica identity take effect mid-stream);
//! - an unchanged TOASTed column stays [`Field::Unchanged`], never null.
//!
//! Protocol reference: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.

pub mod encode;
pub mod message;
#[cfg(test)]
mod proptests;
pub mod value;

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

pub use message::{
    decode_message, DecodeError, Decoder, OldKind, PgOutputMessage, RelationBody, TupleValue, Xid,
};
pub use value::Value;

/// A column of a cached relation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Part of the replica identity key.
    pub is_key: bool,
}

/// The shape of a table as last announced by a Relation message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Relation {
    /// The table's OID.
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// `relreplident` (`d`, `n`, `f` or `i`) as a character.
    pub replica_identity: char,
    /// Columns in table order.
    pub columns: Vec<Column>,
}

impl Relation {
    /// `schema.name`, the form mappings use.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The position of a column by name.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// One column of a decoded row.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Field {
    /// A TOASTed value the change did not touch; keep what the target has.
    Unchanged,
    /// A value (possibly [`Value::Null`]).
    Value(Value),
}

/// A decoded row, aligned with its relation's columns.
pub type Row = Vec<Field>;

/// Why a change could not be resolved against the relation cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// A change named a relation no Relation message announced.
    #[error("a change refers to relation OID {0}, which the stream never described; the stream is corrupt or was started mid-transaction")]
    UnknownRelation(u32),
    /// A tuple has a different number of columns than its relation.
    #[error("a row of {table} has {got} columns but its Relation message announced {want}")]
    ColumnCount {
        /// The table.
        table: String,
        /// Columns in the tuple.
        got: usize,
        /// Columns in the relation.
        want: usize,
    },
    /// A value is not valid UTF-8 text.
    #[error("column {column} of {table} holds text that is not valid UTF-8")]
    NotUtf8 {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
}

/// Relations and types announced so far on this stream.
#[derive(Debug, Default, Clone)]
pub struct RelationCache {
    relations: HashMap<u32, Arc<Relation>>,
    types: HashMap<u32, (String, String)>,
    /// User type OIDs looked up in the catalog, with the built-in type
    /// their values are read as (a domain's base type; see
    /// [`crate::source::catalog::base_types`]).
    bases: HashMap<u32, u32>,
}

impl RelationCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores (or replaces) a relation from its Relation message.
    pub fn update(&mut self, body: &RelationBody) -> Arc<Relation> {
        let rel = Arc::new(Relation {
            oid: body.oid,
            schema: if body.namespace.is_empty() {
                "pg_catalog".to_string()
            } else {
                body.namespace.clone()
            },
            name: body.name.clone(),
            replica_identity: body.replica_identity as char,
            columns: body
                .columns
                .iter()
                .map(|c| Column {
                    name: c.name.clone(),
                    type_oid: self.bases.get(&c.type_oid).copied().unwrap_or(c.type_oid),
                    is_key: c.is_key,
                })
                .collect(),
        });
        self.relations.insert(body.oid, Arc::clone(&rel));
        rel
    }

    /// Remembers a type's name from its Type message.
    pub fn update_type(&mut self, oid: u32, namespace: &str, name: &str) {
        self.types
            .insert(oid, (namespace.to_string(), name.to_string()));
    }

    /// Whether the catalog has been asked what `oid` is read as (built-in
    /// types need no asking).
    pub fn knows_type(&self, oid: u32) -> bool {
        oid < crate::source::catalog::FIRST_USER_OID || self.bases.contains_key(&oid)
    }

    /// Remembers what user types are read as; relations announced from
    /// now on use it.
    pub fn add_base_types(&mut self, bases: &HashMap<u32, u32>) {
        self.bases.extend(bases.iter().map(|(k, v)| (*k, *v)));
    }

    /// The name of a type announced by a Type message.
    pub fn type_name(&self, oid: u32) -> Option<(&str, &str)> {
        self.types.get(&oid).map(|(n, t)| (n.as_str(), t.as_str()))
    }

    /// The cached relation for an OID.
    pub fn get(&self, oid: u32) -> Result<&Arc<Relation>, ResolveError> {
        self.relations
            .get(&oid)
            .ok_or(ResolveError::UnknownRelation(oid))
    }

    /// Decodes a tuple into a typed row of `rel`.
    pub fn decode_row(&self, rel: &Relation, tuple: &[TupleValue]) -> Result<Row, ResolveError> {
        decode_row(rel, tuple)
    }
}

/// Decodes a tuple into a typed row of `rel`.
pub fn decode_row(rel: &Relation, tuple: &[TupleValue]) -> Result<Row, ResolveError> {
    if tuple.len() != rel.columns.len() {
        return Err(ResolveError::ColumnCount {
            table: rel.qualified_name(),
            got: tuple.len(),
            want: rel.columns.len(),
        });
    }
    tuple
        .iter()
        .zip(&rel.columns)
        .map(|(v, col)| {
            Ok(match v {
                TupleValue::Null => Field::Value(Value::Null),
                TupleValue::UnchangedToast => Field::Unchanged,
                TupleValue::Text(bytes) => {
                    let text = std::str::from_utf8(bytes).map_err(|_| ResolveError::NotUtf8 {
                        table: rel.qualified_name(),
                        column: col.name.clone(),
                    })?;
                    Field::Value(value::decode_text(col.type_oid, text))
                }
                // The binary option is not requested; keep the raw bytes if a
                // server sends them anyway.
                TupleValue::Binary(bytes) => Field::Value(Value::Bytes(bytes.to_vec())),
            })
        })
        .collect()
}
