//! Replay: the retained WAL between two positions applied again (`walgraph
//! replay`), through the same stream loop as `run`.
//!
//! Invariant: a replay confirms nothing to Postgres and never moves the
//! checkpoint; what it writes is idempotent by the `_lsn` guard.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::preflight::prepare;
use super::stream::stream_once;
use super::RunError;
use crate::config::Config;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::source::catalog::PgClient;

/// The part of the stream `walgraph replay` applies again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayRange {
    /// Transactions that end after this position are applied...
    pub from: Lsn,
    /// ...up to those that end at or before this one.
    pub to: Lsn,
}

/// Applies the retained transactions in `range` again (idempotent by the
/// `_lsn` guard), leaving the slot and the checkpoint where they are.
/// Refuses when the slot is in use or no longer retains `range.from`.
pub async fn replay(
    cfg: &Config,
    range: ReplayRange,
    mut shutdown: Shutdown,
) -> Result<u64, RunError> {
    let prepared = prepare(cfg).await?;
    let pg = PgClient::connect(&prepared.info).await?;
    let slot = &cfg.postgres.slot;
    let info = pg.slot(slot).await?.ok_or_else(|| {
        RunError::NotReady(format!(
            "replication slot {slot} does not exist; run `walgraph setup` first"
        ))
    })?;
    if info.active {
        return Err(RunError::NotReady(format!(
            "replication slot {slot} is in use (is `walgraph run` running?); stop it before replaying"
        )));
    }
    let oldest = info.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
    if range.from < oldest {
        return Err(RunError::NotReady(format!(
            "replication slot {slot} no longer holds the WAL at {}; the oldest position it can replay from is {oldest} (set postgres.replay_window_mib to keep a window for replays)",
            range.from
        )));
    }
    if range.to < range.from {
        return Err(RunError::NotReady(format!(
            "--to {} is before --from {}",
            range.to, range.from
        )));
    }
    let metrics = Arc::new(Metrics::default());
    stream_once(cfg, &prepared, &mut shutdown, &metrics, Some(range)).await?;
    Ok(metrics.changes.load(Ordering::Relaxed))
}
