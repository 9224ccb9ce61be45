//! The `run` loop: source → decode → transactions → map → batch → sink, and
//! the committed position back to Postgres.
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

use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, sleep_until, Instant};

use crate::batch::{describe, Batch, Batcher};
use crate::catalog::{CatalogError, PgClient};
use crate::checkpoint::Checkpoint;
use crate::config::{Config, OnError};
use crate::http::Metrics;
use crate::lsn::Lsn;
use crate::map::{MapError, Mapper};
use crate::mapping::{self, Mapping, MappingError};
use crate::sink::{DeadLetter, Sink, SinkError};
use crate::source::{ConnInfo, ReplicationEvent, ReplicationStream, SourceError, StartOptions};
use crate::transactions::{AssembleError, Assembler, TxnPart, PARTS_PER_TURN};

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
}

impl RunError {
    /// Whether reconnecting later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            RunError::Source(e) => e.is_transient(),
            RunError::Sink(e) => e.is_transient(),
            RunError::Catalog(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// A shutdown signal: flips to `true` once.
pub type Shutdown = watch::Receiver<bool>;

async fn shutdown_requested(rx: &mut Shutdown) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            // The sender is gone: nobody can ask any more, so never resolve.
            std::future::pending::<()>().await;
        }
    }
}

/// Exponential backoff with full jitter, capped.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(200);
    let cap = Duration::from_secs(15);
    let exp = base.saturating_mul(1u32 << attempt.min(10)).min(cap);
    let jitter = fastrand::u64(0..=u64::try_from(exp.as_millis()).unwrap_or(u64::MAX));
    Duration::from_millis(jitter.max(50))
}

/// Everything checked before streaming.
pub struct Prepared {
    /// Postgres connection settings.
    pub info: ConnInfo,
    /// The compiled mapping.
    pub mapping: Arc<Mapping>,
    /// Neo4j; `None` for the null sink, which writes nothing (benchmarks).
    pub sink: Option<Sink>,
}

/// Reads the catalog of the mapped tables and compiles the mapping against it.
pub async fn compile_mapping(pg: &PgClient, cfg: &Config) -> Result<Mapping, RunError> {
    let tables: Vec<String> = cfg
        .nodes
        .iter()
        .map(|n| n.table.clone())
        .chain(cfg.relationships.iter().map(|r| r.table.clone()))
        .collect();
    let catalog = pg.catalog(&tables).await?;
    Ok(mapping::compile(&cfg.nodes, &cfg.relationships, &catalog)?)
}

/// Checks the world before streaming: `wal_level`, the mapping against the
/// catalog, publication, slot, Neo4j and its constraints.
pub async fn prepare(cfg: &Config) -> Result<Prepared, RunError> {
    prepare_with(cfg, false).await
}

/// As [`prepare`]; with `null_sink`, Neo4j is neither contacted nor written.
pub async fn prepare_with(cfg: &Config, null_sink: bool) -> Result<Prepared, RunError> {
    let p = prepare_checks(cfg, null_sink, true).await?;
    if let Some(sink) = &p.sink {
        let state = crate::snapshot::read_state(sink, &cfg.postgres.slot)
            .await
            .map_err(|e| {
                RunError::NotReady(format!("cannot read the snapshot state from Neo4j: {e}"))
            })?;
        if state.is_some_and(|s| !s.done) {
            return Err(RunError::NotReady(format!(
                "a snapshot for slot {} was started and not finished; run `walgraph snapshot` to finish it first",
                cfg.postgres.slot
            )));
        }
    }
    Ok(p)
}

/// The checks of [`prepare`] without the one for an unfinished snapshot
/// (for `walgraph snapshot` itself).
pub async fn prepare_for_snapshot(cfg: &Config) -> Result<Prepared, RunError> {
    prepare_checks(cfg, false, true).await
}

/// The checks of [`prepare`] for commands that only read the slot's state
/// and may run beside `walgraph run` (`reconcile`).
pub async fn prepare_beside_run(cfg: &Config) -> Result<Prepared, RunError> {
    prepare_checks(cfg, false, false).await
}

async fn prepare_checks(
    cfg: &Config,
    null_sink: bool,
    slot_must_be_free: bool,
) -> Result<Prepared, RunError> {
    let info = ConnInfo::parse(cfg.postgres.url.as_deref().unwrap_or(""))
        .map_err(|e| RunError::NotReady(e.to_string()))?;
    let pg = PgClient::connect(&info).await?;
    pg.check_wal_level().await?;
    let mapping = Arc::new(compile_mapping(&pg, cfg).await?);
    let publication = &cfg.postgres.publication;
    match pg.publication_tables(publication).await? {
        None => {
            return Err(RunError::NotReady(format!(
                "publication {publication} does not exist; run `walgraph setup` first"
            )))
        }
        Some(have) => {
            let missing: Vec<String> = mapping
                .table_names()
                .into_iter()
                .filter(|t| !have.contains(t))
                .collect();
            if !missing.is_empty() {
                return Err(RunError::NotReady(format!(
                    "publication {publication} does not include {}; run `walgraph setup` to add them",
                    missing.join(", ")
                )));
            }
        }
    }
    let slot = &cfg.postgres.slot;
    match pg.slot(slot).await? {
        None => {
            return Err(RunError::NotReady(format!(
                "replication slot {slot} does not exist; run `walgraph setup` first"
            )))
        }
        Some(s) if s.plugin != "pgoutput" => {
            return Err(RunError::NotReady(format!(
                "replication slot {slot} uses the {} plugin, not pgoutput; drop it or choose another postgres.slot",
                s.plugin
            )))
        }
        Some(s) if s.active && slot_must_be_free => {
            // A walsender whose client just died lets go within moments;
            // one that stays is another consumer.
            let mut held = true;
            for _ in 0..15 {
                sleep(Duration::from_secs(1)).await;
                if !pg.slot(slot).await?.is_some_and(|s| s.active) {
                    held = false;
                    break;
                }
            }
            if held {
                return Err(RunError::NotReady(format!(
                    "replication slot {slot} is in use by another process (another `walgraph run`?); stop it, or give this one its own postgres.slot"
                )));
            }
        }
        Some(_) => {}
    }
    if null_sink {
        return Ok(Prepared {
            info,
            mapping,
            sink: None,
        });
    }
    let sink = Sink::connect(&cfg.neo4j, slot).await?;
    let missing = sink.missing_constraints(&mapping).await?;
    if !missing.is_empty() {
        return Err(RunError::NotReady(format!(
            "Neo4j lacks {}; run `walgraph setup` to create what walgraph needs",
            missing.join(", ")
        )));
    }
    let sink = Some(sink);
    Ok(Prepared {
        info,
        mapping,
        sink,
    })
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
                tokio::select! {
                    _ = shutdown_requested(&mut shutdown) => return Ok(()),
                    _ = sleep(wait) => {}
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
                tokio::select! {
                    _ = shutdown_requested(&mut shutdown) => return Ok(()),
                    _ = sleep(wait) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

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

/// What the sink task reports.
enum SinkEvent {
    Committed(Batch),
    Failed(SinkError),
}

/// Applies batches in order, retrying transient failures with backoff. A
/// change Neo4j rejects for good stops the pipeline with its table, key and
/// LSN named, or becomes a dead letter (`neo4j.on_error`).
async fn sink_task(
    sink: Option<Sink>,
    mapping: Arc<Mapping>,
    metrics: Arc<Metrics>,
    on_error: OnError,
    mut batches: mpsc::Receiver<Batch>,
    events: mpsc::Sender<SinkEvent>,
) {
    while let Some(mut batch) = batches.recv().await {
        let Some(sink) = sink.as_ref() else {
            batch.statements.clear();
            batch.plan.clear();
            if events.send(SinkEvent::Committed(batch)).await.is_err() {
                return;
            }
            continue;
        };
        let mut attempt = 0u32;
        let mut dead: Vec<DeadLetter> = Vec::new();
        loop {
            match sink.apply(&batch, &dead).await {
                Ok(()) => {
                    let mut done = batch;
                    done.statements.clear();
                    done.plan.clear();
                    if events.send(SinkEvent::Committed(done)).await.is_err() {
                        return;
                    }
                    break;
                }
                Err(e) if e.is_transient() => {
                    let wait = backoff(attempt);
                    attempt += 1;
                    metrics.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, attempt, retry_in = ?wait, end_lsn = %batch.end_lsn, "neo4j write failed, retrying the batch");
                    sleep(wait).await;
                }
                Err(SinkError::Rejected(original)) => {
                    let located = match sink.locate(&batch, &mapping).await {
                        Ok(l) => l,
                        Err(e) if e.is_transient() => continue,
                        Err(e) => {
                            let _ = events.send(SinkEvent::Failed(e)).await;
                            return;
                        }
                    };
                    let Some((group, index, error)) = located else {
                        let _ = events
                            .send(SinkEvent::Failed(SinkError::Rejected(original)))
                            .await;
                        return;
                    };
                    let op = batch.plan[group][index].clone();
                    let (table, key, lsn) = describe(&op, &mapping);
                    let at = lsn.map_or_else(String::new, |l| format!(" committed at {l}"));
                    if on_error == OnError::Stop {
                        let _ = events
                            .send(SinkEvent::Failed(SinkError::Rejected(format!(
                                "the change to {table} key {key}{at} ({error}); fix the data or the graph, or set neo4j.on_error = \"dead_letter\" to record such changes and go on"
                            ))))
                            .await;
                        return;
                    }
                    tracing::error!(%table, %key, lsn = ?lsn, %error, "neo4j rejected a change; recording it as a dead letter");
                    batch.remove(group, index, &mapping);
                    dead.push(DeadLetter {
                        table,
                        key,
                        lsn,
                        operation: format!("{op:?}"),
                        error,
                    });
                }
                Err(e) => {
                    let _ = events.send(SinkEvent::Failed(e)).await;
                    return;
                }
            }
        }
    }
}

/// How often the checkpoint may follow the WAL end while idle.
const IDLE_ADVANCE_EVERY: Duration = Duration::from_secs(5);

/// One replication session: from connect until shutdown or an error.
async fn stream_once(
    cfg: &Config,
    p: &Prepared,
    shutdown: &mut Shutdown,
    metrics: &Arc<Metrics>,
    replay: Option<ReplayRange>,
) -> Result<(), RunError> {
    let checkpoint = match (&p.sink, replay) {
        (_, Some(r)) => Checkpoint::at(r.from),
        (Some(sink), None) => sink.read_checkpoint().await?.unwrap_or_default(),
        (None, None) => Checkpoint::default(),
    };
    // What Postgres is told: nothing during a replay (the slot stays where
    // it is), else the checkpoint less the replay window.
    let window = cfg.postgres.replay_window_mib.saturating_mul(1 << 20);
    let report = |flushed: Lsn| match replay {
        Some(_) => Lsn::ZERO,
        None => Lsn::new(flushed.raw().saturating_sub(window)),
    };
    let limit = replay.map(|r| r.to);
    let mut past_end = false;
    let mut stream = ReplicationStream::connect(&p.info).await?;
    let system = stream.identify_system().await?;
    let proto_version = stream
        .negotiate_proto_version(cfg.postgres.proto_version)
        .await?;
    tracing::info!(checkpoint = %checkpoint, server_wal = %system.xlogpos, slot = %cfg.postgres.slot, proto_version, "starting replication");
    stream
        .start(&StartOptions {
            slot: cfg.postgres.slot.clone(),
            publications: vec![cfg.postgres.publication.clone()],
            start: checkpoint.lsn,
            proto_version,
            messages: false,
            streaming: cfg.postgres.streaming,
            // Prepared transactions arrive as ordinary ones at COMMIT
            // PREPARED: applying at commit is all walgraph needs, and it
            // leaves nothing held across a restart.
            two_phase: false,
        })
        .await?;
    metrics.ready.store(true, Ordering::Relaxed);
    metrics
        .flushed_lsn
        .store(checkpoint.lsn.raw(), Ordering::Relaxed);

    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(1);
    let (event_tx, mut event_rx) = mpsc::channel::<SinkEvent>(4);
    let sink_handle = tokio::spawn(sink_task(
        p.sink.clone(),
        Arc::clone(&p.mapping),
        Arc::clone(metrics),
        cfg.neo4j.on_error,
        batch_rx,
        event_tx,
    ));
    let _abort_sink = AbortOnDrop(sink_handle);

    let mapper = Mapper::new(Arc::clone(&p.mapping));
    let mut assembler = Assembler::with_spill(cfg.postgres.spill());
    let mut batcher = Batcher::new();
    let mut flushed = checkpoint.lsn;
    let mut open: Option<OpenTxn> = None;
    let mut wal_start = Lsn::ZERO;
    let mut in_flight: Option<Lsn> = None;
    let mut deadline: Option<Instant> = None;
    let mut server_wal_end = Lsn::ZERO;
    let mut last_idle_advance = Instant::now();
    let mut status = tokio::time::interval(stream.status_interval());
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max_changes = cfg.batch.max_changes;
    let mut applied_changes: u64 = 0;
    let mut last_report = Instant::now();

    let result: Result<(), RunError> = loop {
        let pending = assembler.has_parts();
        let can_read = !pending && (batcher.changes() < max_changes || in_flight.is_none());
        let can_take = pending && batcher.changes() < max_changes;
        let can_dispatch = in_flight.is_none() && !batcher.is_empty();
        tokio::select! {
            biased;
            // 1. Shutdown: stop reading; the in-flight batch is awaited below.
            _ = shutdown_requested(shutdown) => break Ok(()),
            // 2. A batch committed (or failed for good): confirm its end LSN.
            ev = event_rx.recv() => match ev {
                Some(SinkEvent::Committed(b)) => {
                    debug_assert!(b.end_lsn >= flushed, "commits arrive in order");
                    flushed = flushed.max(b.end_lsn);
                    in_flight = None;
                    applied_changes += b.changes as u64;
                    metrics.changes.fetch_add(b.changes as u64, Ordering::Relaxed);
                    metrics.transactions.fetch_add(b.transactions as u64, Ordering::Relaxed);
                    metrics.batches.fetch_add(1, Ordering::Relaxed);
                    metrics.flushed_lsn.store(flushed.raw(), Ordering::Relaxed);
                    record_latency(metrics, &b.commits);
                    tracing::debug!(checkpoint = %b.checkpoint(), changes = b.changes, transactions = b.transactions, "batch committed");
                    stream.send_status(report(flushed), false).await?;
                }
                Some(SinkEvent::Failed(e)) => break Err(e.into()),
                None => break Err(RunError::NotReady("the Neo4j writer stopped unexpectedly".into())),
            },
            // 3. Regular status (even while a huge transaction is taken
            //    apart), and the idle checkpoint advance.
            _ = status.tick() => {
                stream.send_status(report(flushed), false).await?;
                let idle = replay.is_none() && assembler.is_idle() && open.is_none() && batcher.is_empty() && in_flight.is_none();
                if idle && server_wal_end > flushed && last_idle_advance.elapsed() >= IDLE_ADVANCE_EVERY {
                    last_idle_advance = Instant::now();
                    let b = Batch { plan: Vec::new(), statements: Vec::new(), end_lsn: server_wal_end, partial: None, changes: 0, transactions: 0, commits: Vec::new() };
                    in_flight = Some(b.end_lsn);
                    if batch_tx.send(b).await.is_err() {
                        break Err(RunError::NotReady("the Neo4j writer stopped unexpectedly".into()));
                    }
                }
                if last_report.elapsed() >= Duration::from_secs(10) && applied_changes > 0 {
                    tracing::info!(changes = applied_changes, flushed = %flushed, "applied");
                    applied_changes = 0;
                    last_report = Instant::now();
                }
            }
            // 4. The batch is due: hand it to the sink.
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if can_dispatch && deadline.is_some() => {
                in_flight = Some(dispatch(&mut batcher, &p.mapping, &batch_tx).await?);
                deadline = None;
            }
            // 5. Parts of a committed transaction, until the batch is full;
            //    a transaction larger than a batch continues in the next.
            _ = std::future::ready(()), if can_take => {
                for _ in 0..PARTS_PER_TURN {
                    if batcher.changes() >= max_changes {
                        break;
                    }
                    let part = assembler.next_part().map_err(|source| RunError::Stream { lsn: wal_start, source })?;
                    let Some(part) = part else { break };
                    let was_empty = batcher.is_empty();
                    if take_part(part, &checkpoint, limit, &mut open, &mapper, &mut batcher)? {
                        past_end = true;
                        break;
                    }
                    if was_empty && !batcher.is_empty() {
                        deadline = Some(Instant::now() + cfg.batch.max_delay);
                    }
                }
            }
            // 6. WAL from the server.
            ev = stream.next_event(), if can_read => match ev? {
                ReplicationEvent::XLogData { wal_start: start, wal_end, data } => {
                    wal_start = start;
                    server_wal_end = server_wal_end.max(wal_end);
                    metrics.server_wal_lsn.store(server_wal_end.raw(), Ordering::Relaxed);
                    assembler.push(&data).map_err(|source| RunError::Stream { lsn: start, source })?;
                }
                ReplicationEvent::Keepalive { wal_end, reply_requested } => {
                    server_wal_end = server_wal_end.max(wal_end);
                    metrics.server_wal_lsn.store(server_wal_end.raw(), Ordering::Relaxed);
                    // A replay whose end the server has decoded past, with
                    // everything it sent taken: nothing more is coming.
                    if limit.is_some_and(|to| wal_end >= to) && assembler.is_idle() && open.is_none() {
                        past_end = true;
                    }
                    if reply_requested {
                        stream.send_status(report(flushed), false).await?;
                    }
                }
                ReplicationEvent::End => break Err(SourceError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof, "the server ended replication")).into()),
            },
        }
        if past_end {
            break Ok(());
        }
        // A full batch waits for the sink; send it as soon as it is free.
        if in_flight.is_none() && batcher.changes() >= max_changes {
            in_flight = Some(dispatch(&mut batcher, &p.mapping, &batch_tx).await?);
            deadline = None;
        }
    };

    if past_end && result.is_ok() {
        // A replay that reached its end: write what is left, and wait.
        if in_flight.is_some() {
            await_commit(&mut event_rx, metrics).await?;
            in_flight = None;
        }
        if !batcher.is_empty() {
            dispatch(&mut batcher, &p.mapping, &batch_tx).await?;
            await_commit(&mut event_rx, metrics).await?;
        }
    }
    // Let the in-flight batch finish (briefly), then confirm what committed.
    drop(batch_tx);
    if in_flight.is_some() {
        let wait = tokio::time::timeout(Duration::from_secs(10), event_rx.recv()).await;
        if let Ok(Some(SinkEvent::Committed(b))) = wait {
            flushed = flushed.max(b.end_lsn);
        }
    }
    if result.is_ok() {
        stream.finish(report(flushed)).await?;
        tracing::info!(flushed = %flushed, "stopped");
    }
    result
}

/// Records how long the transactions of a committed batch took from their
/// Postgres commit to now.
fn record_latency(metrics: &Metrics, commits: &[(i64, u64)]) {
    const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        - PG_EPOCH_UNIX_MICROS;
    if let Ok(mut l) = metrics.latency.lock() {
        for &(t, n) in commits {
            l.record(u64::try_from(now - t).unwrap_or(0), n);
        }
    }
}

/// The transaction whose parts are being taken.
struct OpenTxn {
    commit_lsn: Lsn,
    end_lsn: Lsn,
    /// How many leading changes are already in the graph (`None`: all).
    applied: Option<u64>,
    /// Changes seen so far.
    index: u64,
}

/// Maps one part of a transaction into the batcher, skipping what the
/// checkpoint says is applied already.
fn take_part(
    part: TxnPart,
    checkpoint: &Checkpoint,
    limit: Option<Lsn>,
    open: &mut Option<OpenTxn>,
    mapper: &Mapper,
    batcher: &mut Batcher,
) -> Result<bool, RunError> {
    match part {
        TxnPart::Begin(h) if limit.is_some_and(|to| h.end_lsn > to) => return Ok(true),
        TxnPart::Begin(h) => {
            let applied = checkpoint.applied_changes(h.end_lsn);
            match applied {
                None => {
                    tracing::debug!(end_lsn = %h.end_lsn, "skipping a transaction already applied")
                }
                Some(n) if n > 0 => {
                    tracing::info!(end_lsn = %h.end_lsn, applied = n, "resuming a transaction applied in part")
                }
                Some(_) => {}
            }
            *open = Some(OpenTxn {
                commit_lsn: h.commit_lsn,
                end_lsn: h.end_lsn,
                applied,
                index: 0,
            });
        }
        TxnPart::Change(c) => {
            let t = open.as_mut().ok_or_else(|| {
                RunError::NotReady("a change arrived outside a transaction".into())
            })?;
            t.index += 1;
            if t.applied.is_none_or(|n| t.index <= n) {
                return Ok(false);
            }
            let mut ops = Vec::new();
            mapper.map_change(&c, t.commit_lsn, &mut ops)?;
            batcher.push_partial(ops, t.end_lsn, t.index);
        }
        TxnPart::Message(_) => {}
        TxnPart::Commit(h) => {
            if let Some(t) = open.take() {
                if let Some(applied) = t.applied {
                    batcher.record_commit(h.commit_time, t.index.saturating_sub(applied));
                    batcher.end_transaction(h.end_lsn);
                }
            }
        }
    }
    Ok(false)
}

/// Waits for the writer to commit the batch in flight (end of a replay).
async fn await_commit(
    events: &mut mpsc::Receiver<SinkEvent>,
    metrics: &Metrics,
) -> Result<(), RunError> {
    match events.recv().await {
        Some(SinkEvent::Committed(b)) => {
            metrics
                .changes
                .fetch_add(b.changes as u64, Ordering::Relaxed);
            Ok(())
        }
        Some(SinkEvent::Failed(e)) => Err(e.into()),
        None => Err(RunError::NotReady(
            "the Neo4j writer stopped unexpectedly".into(),
        )),
    }
}

async fn dispatch(
    batcher: &mut Batcher,
    mapping: &Mapping,
    tx: &mpsc::Sender<Batch>,
) -> Result<Lsn, RunError> {
    let batch = batcher.take(mapping);
    let end = batch.end_lsn;
    tx.send(batch)
        .await
        .map_err(|_| RunError::NotReady("the Neo4j writer stopped unexpectedly".into()))?;
    Ok(end)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
