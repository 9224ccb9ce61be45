//! Checkpoint: the end LSN of the last applied transaction, kept in Neo4j.
//!
//! Invariants:
//! - the checkpoint is written in the same Neo4j transaction as the data it
//!   covers ([`crate::sink::Sink::apply`]);
//! - it only moves forward;
//! - on start, every transaction whose end LSN is at or below it is skipped,
//!   and the flush position sent to Postgres never passes it.

use neo4rs::{query, Query};

use crate::lsn::Lsn;

/// The checkpoint node's label.
pub const LABEL: &str = "WalgraphCheckpoint";

/// Reads a slot's checkpoint: `$slot` → `lsn`.
pub const READ: &str = "MATCH (c:WalgraphCheckpoint {slot: $slot}) RETURN c.lsn AS lsn";

/// Moves a slot's checkpoint forward to `lsn` (never back).
pub fn write_query(slot: &str, lsn: Lsn) -> Query {
    query(
        "MERGE (c:WalgraphCheckpoint {slot: $slot}) \
         WITH c WHERE c.lsn IS NULL OR c.lsn < $lsn \
         SET c.lsn = $lsn, c.lsn_text = $lsn_text, c.updated_at = datetime()",
    )
    .param("slot", slot)
    .param("lsn", lsn.to_i64())
    .param("lsn_text", lsn.to_string())
}
