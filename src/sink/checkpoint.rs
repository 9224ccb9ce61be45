//! Checkpoint: how far walgraph has applied the stream, kept in Neo4j (the
//! position itself, [`Checkpoint`], is defined beside [`crate::lsn::Lsn`]).
//!
//! Invariants:
//! - the checkpoint is written in the same Neo4j transaction as the data it
//!   covers ([`crate::sink::Sink::apply`]);
//! - it only moves forward;
//! - `lsn` is the end LSN of the last transaction applied whole; on start,
//!   every transaction whose end LSN is at or below it is skipped, and the
//!   flush position sent to Postgres never passes it;
//! - a transaction larger than one batch is applied across several Neo4j
//!   transactions; meanwhile `partial` names it (its end LSN) and how many of
//!   its changes are in the graph, and on start those are skipped when
//!   Postgres sends it again.

use neo4rs::{query, Query};

use super::{Sink, SinkError};

use crate::lsn::{pg_micros_to_unix, Checkpoint, Lsn, Partial};

/// The checkpoint node's label.
pub const LABEL: &str = "WalgraphCheckpoint";

/// Reads a slot's checkpoint: `$slot` → `lsn`, `partial_end`, `partial_changes`.
pub const READ: &str = "MATCH (c:WalgraphCheckpoint {slot: $slot}) \
     RETURN c.lsn AS lsn, c.partial_end AS partial_end, c.partial_changes AS partial_changes";

/// Moves a slot's checkpoint forward to `cp` (never back). `committed_at`
/// is the Postgres commit time (microseconds since 2000-01-01) of the last
/// transaction the write covers, if any; it is kept as `committed_at` for
/// the lag in time (`walgraph status`).
pub fn write_query(slot: &str, cp: Checkpoint, committed_at: Option<i64>) -> Query {
    query(
        "MERGE (c:WalgraphCheckpoint {slot: $slot}) \
         WITH c WHERE c.lsn IS NULL OR c.lsn < $lsn \
           OR (c.lsn = $lsn AND $partial_end IS NOT NULL AND (c.partial_end IS NULL \
               OR c.partial_end < $partial_end \
               OR (c.partial_end = $partial_end AND c.partial_changes < $partial_changes))) \
         SET c.lsn = $lsn, c.lsn_text = $lsn_text, c.partial_end = $partial_end, \
             c.partial_changes = $partial_changes, c.updated_at = datetime(), \
             c.committed_at = CASE WHEN $committed_ms IS NULL THEN c.committed_at \
                              ELSE datetime({epochMillis: $committed_ms}) END",
    )
    .param("slot", slot)
    .param("lsn", cp.lsn.to_i64())
    .param("lsn_text", cp.lsn.to_string())
    .param(
        "committed_ms",
        committed_at.map(|us| pg_micros_to_unix(us).div_euclid(1000)),
    )
    .param("partial_end", cp.partial.map(|p| p.end_lsn.to_i64()))
    .param(
        "partial_changes",
        cp.partial
            .map(|p| i64::try_from(p.changes).unwrap_or(i64::MAX)),
    )
}

impl Sink {
    /// The slot's checkpoint, if walgraph has written one.
    pub async fn read_checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        self.timed("reading the checkpoint", async {
            let mut rows = self
                .graph
                .execute(query(READ).param("slot", self.slot.as_str()))
                .await
                .map_err(|e| self.err(e))?;
            match rows.next().await.map_err(|e| self.err(e))? {
                Some(row) => {
                    let lsn: Option<i64> = row.get("lsn").ok();
                    let partial_end: Option<i64> = row.get("partial_end").ok();
                    let partial_changes: Option<i64> = row.get("partial_changes").ok();
                    Ok(lsn.map(|lsn| Checkpoint {
                        lsn: Lsn::from_i64(lsn),
                        partial: partial_end.zip(partial_changes).map(|(end, n)| Partial {
                            end_lsn: Lsn::from_i64(end),
                            changes: u64::try_from(n).unwrap_or(0),
                        }),
                    }))
                }
                None => Ok(None),
            }
        })
        .await
    }

    /// Deletes this slot's checkpoint; returns whether there was one.
    pub async fn drop_checkpoint(&self) -> Result<bool, SinkError> {
        self.timed("deleting the checkpoint", async {
            let mut rows = self
                .graph
                .execute(
                    query(
                        "MATCH (c:WalgraphCheckpoint {slot: $slot}) DELETE c RETURN count(*) AS n",
                    )
                    .param("slot", self.slot.as_str()),
                )
                .await
                .map_err(|e| self.err(e))?;
            let n = match rows.next().await.map_err(|e| self.err(e))? {
                Some(r) => r.get::<i64>("n").unwrap_or(0),
                None => 0,
            };
            Ok(n > 0)
        })
        .await
    }

    /// Moves this slot's checkpoint forward to `lsn` (never back), outside
    /// any batch: after a full copy or repair has read the tables past `lsn`,
    /// so nothing before it is missing from the graph any more.
    pub async fn advance_checkpoint_to(&self, lsn: Lsn) -> Result<(), SinkError> {
        self.timed("moving the checkpoint", async {
            self.graph
                .run(write_query(&self.slot, Checkpoint::at(lsn), None))
                .await
                .map_err(|e| self.err(e))
        })
        .await
    }
}
