//! The pipeline: source → decode → transactions → map → batch → sink, and
//! the committed position back to Postgres. `run` is the loop around
//! [reconnects](run_with); the parts are [`preflight`] (checks before
//! streaming), `stream` (one replication session), `writer` (the Neo4j
//! task), [`replay`] and [`copy`] (chunked table reads for the commands).
//!
//! Invariants:
//! - the flush position sent to Postgres is the end LSN of the last batch
//!   Neo4j committed (or the checkpoint read at start), never more;
//! - transactions at or below the checkpoint are skipped;
//! - at most one batch is in flight while the next one fills (pipelining
//!   without reordering: batches commit in order);
//! - reading stops while the next batch is full and one is in flight
//!   (backpressure), but status updates keep going out so
//!   `wal_sender_timeout` never fires;
//! - when nothing is pending, the checkpoint follows the server's WAL end
//!   (throttled), so a quiet publication does not hold WAL back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, Instant};

use crate::config::Config;
use crate::lsn::Lsn;
use crate::mapping::map::MapError;
use crate::mapping::MappingError;
use crate::metrics::Metrics;
use crate::retry::backoff;
use crate::shutdown::{self, Shutdown};
use crate::sink::SinkError;
use crate::source::catalog::CatalogError;
use crate::source::SourceError;
use crate::transactions::AssembleError;
use stream::stream_once;

mod backfill;
pub mod copy;
mod follow;
mod heartbeat;
pub mod preflight;
mod remap;
pub mod replay;
mod stream;
mod writer;

pub use preflight::{
    compile_mapping, compile_mapping_as, prepare, prepare_beside_run, prepare_for_snapshot,
    prepare_with, Prepared,
};
pub use replay::{replay, ReplayRange};

/// Why `run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Postgres replication failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Neo4j failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The catalog could not be read or is not ready.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The mapping does not fit the database.
    #[error("the mapping does not fit the database: {0}")]
    Mapping(#[from] MappingError),
    /// The stream could not be decoded or assembled.
    #[error("cannot read the replication stream at {lsn}: {source}")]
    Stream {
        /// Where.
        lsn: Lsn,
        /// Why.
        #[source]
        source: AssembleError,
    },
    /// A change could not be mapped.
    #[error(transparent)]
    Map(#[from] MapError),
    /// The setup is incomplete.
    #[error("{0}")]
    NotReady(String),
    /// The graph is behind the slot: changes Postgres no longer holds are
    /// missing from it.
    #[error("{0}")]
    GraphBehind(String),
    /// A mapped table was dropped or renamed while walgraph ran.
    #[error("{0}")]
    TableChanged(String),
    /// Copying a table added to the mapping failed.
    #[error(transparent)]
    Backfill(#[from] backfill::BackfillError),
}

impl RunError {
    /// Whether reconnecting later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            RunError::Source(e) => e.is_transient(),
            RunError::Sink(e) => e.is_transient(),
            RunError::Catalog(e) => e.is_transient(),
            RunError::Backfill(e) => e.transient,
            _ => false,
        }
    }
}

/// Sleeps `wait`; false when shutdown came first.
async fn pause(shutdown: &mut Shutdown, wait: Duration) -> bool {
    tokio::select! {
        _ = shutdown::requested(shutdown) => false,
        _ = sleep(wait) => true,
    }
}

/// Runs the pipeline until `shutdown` flips, reconnecting after transient
/// failures of either database.
pub async fn run(cfg: &Config, shutdown: Shutdown) -> Result<(), RunError> {
    run_with_metrics(cfg, shutdown, Arc::new(Metrics::default())).await
}

/// As [`run`], reporting progress in `metrics`.
pub async fn run_with_metrics(
    cfg: &Config,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
) -> Result<(), RunError> {
    run_with(cfg, shutdown, metrics, false).await
}

/// As [`run_with_metrics`]; with `null_sink`, batches are built and then
/// dropped instead of written, and their positions confirmed to Postgres:
/// the decode path's speed limit, for benchmarks. It consumes the slot.
pub async fn run_with(
    cfg: &Config,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    null_sink: bool,
) -> Result<(), RunError> {
    use tracing::Instrument;
    // Every line the pipeline logs names the slot.
    let span = tracing::info_span!("run", slot = %cfg.postgres.slot);
    run_in_span(cfg, shutdown, metrics, null_sink)
        .instrument(span)
        .await
}

async fn run_in_span(
    cfg: &Config,
    mut shutdown: Shutdown,
    metrics: Arc<Metrics>,
    null_sink: bool,
) -> Result<(), RunError> {
    let mut attempt = 0u32;
    let prepared = loop {
        match prepare_with(cfg, null_sink).await {
            Ok(p) => break p,
            Err(e) if e.is_transient() => {
                let wait = backoff(attempt);
                attempt += 1;
                tracing::warn!(error = %e, retry_in = ?wait, "not ready yet, retrying");
                if !pause(&mut shutdown, wait).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    };
    attempt = 0;
    loop {
        let started = Instant::now();
        let result = stream_once(cfg, &prepared, &mut shutdown, &metrics, None).await;
        metrics.ready.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                if started.elapsed() > Duration::from_secs(60) {
                    attempt = 0;
                }
                let wait = backoff(attempt);
                attempt += 1;
                tracing::warn!(error = %e, retry_in = ?wait, "replication interrupted, reconnecting");
                if !pause(&mut shutdown, wait).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}
