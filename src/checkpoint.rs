//! Checkpoint: how far walgraph has applied the stream, kept in Neo4j.
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

use crate::lsn::Lsn;

/// The checkpoint node's label.
pub const LABEL: &str = "WalgraphCheckpoint";

/// Reads a slot's checkpoint: `$slot` → `lsn`, `partial_end`, `partial_changes`.
pub const READ: &str = "MATCH (c:WalgraphCheckpoint {slot: $slot}) \
     RETURN c.lsn AS lsn, c.partial_end AS partial_end, c.partial_changes AS partial_changes";

/// A transaction applied in part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Partial {
    /// End LSN of the transaction.
    pub end_lsn: Lsn,
    /// How many of its changes, from the first, are applied.
    pub changes: u64,
}

/// A position in the stream that the graph reflects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Checkpoint {
    /// End LSN of the last transaction applied whole.
    pub lsn: Lsn,
    /// The transaction after it, when some but not all of its changes are applied.
    pub partial: Option<Partial>,
}

impl Checkpoint {
    /// A checkpoint at a transaction boundary.
    pub fn at(lsn: Lsn) -> Self {
        Checkpoint { lsn, partial: None }
    }

    /// How many leading changes of the transaction ending at `end_lsn` are
    /// already applied: all of them (`None`) when it ends at or below
    /// `lsn`, some when it is the partial one, otherwise none.
    pub fn applied_changes(&self, end_lsn: Lsn) -> Option<u64> {
        if end_lsn <= self.lsn {
            return None;
        }
        match self.partial {
            Some(p) if p.end_lsn == end_lsn => Some(p.changes),
            _ => Some(0),
        }
    }
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.lsn)?;
        if let Some(p) = self.partial {
            write!(
                f,
                " and {} changes of the transaction ending at {}",
                p.changes, p.end_lsn
            )?;
        }
        Ok(())
    }
}

/// Milliseconds from the Unix epoch to Postgres' (2000-01-01).
const PG_EPOCH_UNIX_MS: i64 = 946_684_800_000;

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
        committed_at.map(|us| us.div_euclid(1000) + PG_EPOCH_UNIX_MS),
    )
    .param("partial_end", cp.partial.map(|p| p.end_lsn.to_i64()))
    .param(
        "partial_changes",
        cp.partial
            .map(|p| i64::try_from(p.changes).unwrap_or(i64::MAX)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_changes_skips_whole_and_partial_transactions() {
        let cp = Checkpoint {
            lsn: Lsn::new(100),
            partial: Some(Partial {
                end_lsn: Lsn::new(200),
                changes: 7,
            }),
        };
        assert_eq!(cp.applied_changes(Lsn::new(90)), None);
        assert_eq!(cp.applied_changes(Lsn::new(100)), None);
        assert_eq!(cp.applied_changes(Lsn::new(200)), Some(7));
        assert_eq!(cp.applied_changes(Lsn::new(150)), Some(0));
        assert_eq!(cp.applied_changes(Lsn::new(300)), Some(0));
        assert!(Checkpoint::at(Lsn::new(100)) < cp);
        assert!(cp < Checkpoint::at(Lsn::new(200)));
    }
}
