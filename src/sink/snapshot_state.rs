//! The snapshot's progress record `(:WalgraphSnapshot {slot})`: which tables
//! are copied and the last key of the one being copied, written in the same
//! Neo4j transaction as each chunk.
//!
//! Invariant: the record only describes chunks Neo4j committed, so a copy
//! resumes after the last one and never skips a row.

use neo4rs::{query, Query};

use super::Sink;
use crate::lsn::Lsn;

/// The progress record's label.
pub const LABEL: &str = "WalgraphSnapshot";

/// A snapshot's progress as recorded in Neo4j.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotState {
    /// All tables copied.
    pub done: bool,
    /// Tables copied completely.
    pub tables_done: Vec<String>,
    /// The table being copied.
    pub table: Option<String>,
    /// Its last copied key, as text.
    pub last_key: Option<Vec<String>>,
    /// Rows copied so far.
    pub rows: u64,
}

/// Reads the progress record of `slot`.
pub async fn read_state(sink: &Sink, slot: &str) -> Result<Option<SnapshotState>, neo4rs::Error> {
    let mut rows = sink
        .graph()
        .execute(
            query(
                "MATCH (s:WalgraphSnapshot {slot: $slot}) RETURN s.done AS done, \
                 s.tables_done AS tables_done, s.table AS table, s.last_key AS last_key, s.rows AS rows",
            )
            .param("slot", slot),
        )
        .await?;
    let Some(row) = rows.next().await? else {
        return Ok(None);
    };
    Ok(Some(SnapshotState {
        done: row.get::<bool>("done").unwrap_or(false),
        tables_done: row.get::<Vec<String>>("tables_done").unwrap_or_default(),
        table: row.get::<String>("table").ok(),
        last_key: row.get::<Vec<String>>("last_key").ok(),
        rows: row
            .get::<i64>("rows")
            .ok()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0),
    }))
}

/// Writes `state` as the progress record of `slot`, at `lsn`.
pub fn progress_query(slot: &str, state: &SnapshotState, lsn: Lsn) -> Query {
    query(
        "MERGE (s:WalgraphSnapshot {slot: $slot}) \
         SET s.done = $done, s.tables_done = $tables_done, s.table = $table, \
             s.last_key = $last_key, s.rows = $rows, s.lsn_text = $lsn_text, \
             s.updated_at = datetime()",
    )
    .param("slot", slot)
    .param("done", state.done)
    .param("tables_done", state.tables_done.clone())
    .param("table", state.table.clone())
    .param("last_key", state.last_key.clone())
    .param("rows", i64::try_from(state.rows).unwrap_or(i64::MAX))
    .param("lsn_text", lsn.to_string())
}

/// What `run` last made of a table, as recorded in Neo4j:
/// `(:WalgraphTable {slot, table, columns, shape})`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableRecord {
    /// Its columns (`name:type-oid`) as last copied or followed.
    pub columns: Vec<String>,
    /// What the mapping made of it then (JSON), absent in records written
    /// before walgraph recorded it.
    pub shape: Option<String>,
}

/// The record of each table `run` writes for `slot`, by table. Tables
/// without a record are missing.
pub async fn read_tables(
    sink: &Sink,
    slot: &str,
) -> Result<std::collections::HashMap<String, TableRecord>, neo4rs::Error> {
    let mut rows = sink
        .graph()
        .execute(
            query(
                "MATCH (t:WalgraphTable {slot: $slot}) \
                 RETURN t.table AS table, t.columns AS columns, t.shape AS shape",
            )
            .param("slot", slot),
        )
        .await?;
    let mut out = std::collections::HashMap::new();
    while let Some(row) = rows.next().await? {
        if let Ok(t) = row.get::<String>("table") {
            out.insert(
                t,
                TableRecord {
                    columns: row.get::<Vec<String>>("columns").unwrap_or_default(),
                    shape: row.get::<String>("shape").ok(),
                },
            );
        }
    }
    Ok(out)
}

/// Records `table`'s columns and what the mapping makes of it, as a batch
/// statement.
pub fn table_statement(
    slot: &str,
    table: &str,
    columns: &[String],
    shape: &str,
) -> crate::batch::Statement {
    use neo4rs::{BoltList, BoltString, BoltType};
    let list = BoltType::List(BoltList::from(
        columns
            .iter()
            .map(|c| BoltType::String(BoltString::new(c)))
            .collect::<Vec<_>>(),
    ));
    crate::batch::Statement {
        cypher: "UNWIND $rows AS row MERGE (t:WalgraphTable {slot: row.slot, table: row.table}) \
                 SET t.columns = row.columns, t.shape = row.shape, t.updated_at = datetime()"
            .into(),
        rows: BoltList::from(vec![crate::batch::cypher::row(vec![
            ("slot", BoltType::String(BoltString::new(slot))),
            ("table", BoltType::String(BoltString::new(table))),
            ("columns", list),
            ("shape", BoltType::String(BoltString::new(shape))),
        ])]),
    }
}

/// Forgets the record of a table taken out of the mapping, as a batch
/// statement.
pub fn forget_table_statement(slot: &str, table: &str) -> crate::batch::Statement {
    use neo4rs::{BoltList, BoltString, BoltType};
    crate::batch::Statement {
        cypher: "UNWIND $rows AS row MATCH (t:WalgraphTable {slot: row.slot, table: row.table}) DELETE t"
            .into(),
        rows: BoltList::from(vec![crate::batch::cypher::row(vec![
            ("slot", BoltType::String(BoltString::new(slot))),
            ("table", BoltType::String(BoltString::new(table))),
        ])]),
    }
}
