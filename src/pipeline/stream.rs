//! The stream loop: one replication session, from connect until shutdown
//! or an error — WAL in, transactions assembled and mapped into the batcher,
//! batches handed to the [writer](super::writer), committed positions back
//! to Postgres.
//!
//! Invariants:
//! - the flush position sent is the end LSN of the last batch Neo4j
//!   committed (or the checkpoint read at start), never more;
//! - transactions at or below the checkpoint are skipped, and of a
//!   transaction applied in part only the changes after its applied count
//!   are taken;
//! - reading stops while the next batch is full and one is in flight, but
//!   status updates keep going out.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use super::backfill::Backfill;
use super::follow::{ColumnWatch, REMOVE_STEP};
use super::preflight::Prepared;
use super::replay::ReplayRange;
use super::writer::{sink_task, SinkEvent};
use super::RunError;
use crate::batch::{Batch, Batcher, DeadLetter};
use crate::config::{Config, OnError};
use crate::lsn::{Checkpoint, Lsn};
use crate::mapping::map::{MapError, Mapper};
use crate::mapping::Mapping;
use crate::metrics::Metrics;
use crate::shutdown::{self, Shutdown};
use crate::sink::Sink;
use crate::source::catalog::PgClient;
use crate::source::{ReplicationEvent, ReplicationStream, SourceError, StartOptions};
use crate::transactions::{Assembler, TxnPart, PARTS_PER_TURN};

/// How often the checkpoint may follow the WAL end while idle.
const IDLE_ADVANCE_EVERY: Duration = Duration::from_secs(5);

/// One replication session: from connect until shutdown or an error.
pub(super) async fn stream_once(
    cfg: &Config,
    p: &Prepared,
    shutdown: &mut Shutdown,
    metrics: &Arc<Metrics>,
    replay: Option<ReplayRange>,
) -> Result<(), RunError> {
    let checkpoint = match (&p.sink, replay) {
        (_, Some(r)) => Checkpoint::at(r.from),
        // Without a checkpoint yet, the graph starts where the slot does:
        // Postgres sends nothing from before its confirmed position, and the
        // first checkpoint written (even one inside a transaction) is then
        // never below it.
        (Some(sink), None) => sink
            .read_checkpoint()
            .await?
            .unwrap_or_else(|| Checkpoint::at(p.confirmed_flush.unwrap_or(Lsn::ZERO))),
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
    // Tables added to the mapping after the snapshot, copied between the
    // stream's batches (not during a replay).
    let mut backfill = match replay {
        None => Backfill::start(p, &cfg.postgres.slot, cfg.batch.max_changes, metrics).await?,
        Some(_) => None,
    };
    // The mapped tables, watched for a DROP or RENAME on a quiet table (a
    // change to a renamed one stops the mapper at once).
    let catalog = PgClient::connect(&p.info).await?;
    // Tables mapped without an `include` list follow their columns, and
    // every table the mapping: what the graph owes for a change of either,
    // done between batches (a label renamed is relabelled now, before the
    // replication session starts, so no status update is owed meanwhile).
    let (mut watch, mut followups) = match (&p.sink, replay) {
        (Some(sink), None) => {
            let (w, owed) = ColumnWatch::start(p, &catalog, sink, &cfg.postgres.slot).await?;
            (Some(w), VecDeque::from(owed))
        }
        _ => (None, VecDeque::new()),
    };
    if let Some(sink) = &p.sink {
        plan_ahead(sink, &p.mapping, cfg.batch.max_changes).await;
    }
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
            // Heartbeats are logical messages.
            messages: true,
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
    let sink_handle = tokio::spawn(tracing::Instrument::in_current_span(sink_task(
        p.sink.clone(),
        Arc::clone(&p.mapping),
        Arc::clone(metrics),
        cfg.neo4j.on_error,
        cfg.neo4j.stuck_after,
        batch_rx,
        event_tx,
    )));
    let _abort_sink = AbortOnDrop(sink_handle);
    // The checkpoint last written, which a backfill chunk writes again.
    let mut stored = checkpoint;
    // A stream batch went out since the last chunk: the next turn is the
    // backfill's, so the stream takes nothing until the chunk is read.
    let mut chunk_next = false;

    let mapper = Mapper::new(Arc::clone(&p.mapping));
    let mut assembler = Assembler::with_spill(cfg.postgres.spill());
    let mut batcher = Batcher::starting_at(checkpoint.lsn).with_history(&p.mapping);
    let on_error = cfg.neo4j.on_error;
    let mut flushed = checkpoint.lsn;
    let mut open: Option<OpenTxn> = None;
    let mut wal_start = Lsn::ZERO;
    let mut in_flight: Option<Lsn> = None;
    let mut deadline: Option<Instant> = None;
    // When the batch filling now reached its limit (it is due then,
    // though the writer may still be busy).
    let mut full_since: Option<Instant> = None;
    let mut server_wal_end = Lsn::ZERO;
    let mut last_idle_advance = Instant::now();
    let mut last_catalog_check = Instant::now();
    let mut status = tokio::time::interval(stream.status_interval());
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The batch limit: `batch.max_changes`, more while walgraph is behind.
    let mut size = crate::batch::size::BatchSize::new(
        cfg.batch.max_changes,
        cfg.batch.ceiling(),
        cfg.batch.commit_target,
    );
    // When the stream batch in flight went out, and whether it was full.
    let mut sized: Option<(Instant, bool)> = None;
    // The next batch, full and rendered while the writer is busy with the
    // one in flight, so the writer takes it the moment it is free.
    let mut ready: Option<Batch> = None;
    metrics
        .batch_limit
        .store(size.limit() as u64, Ordering::Relaxed);
    let mut applied_changes: u64 = 0;
    let mut last_report = Instant::now();
    // Heartbeats go where writes go (the primary, from a standby); none in
    // a replay or without a graph.
    let beats = p.sink.is_some() && replay.is_none();
    let mut heartbeat = super::heartbeat::Heartbeat::new(
        beats.then_some(cfg.postgres.heartbeat),
        &cfg.postgres.slot,
    );
    let heartbeat_pg = match (&p.info.primary, beats) {
        (Some(primary), true) => Some(PgClient::connect(primary).await?),
        _ => None,
    };

    let result: Result<(), RunError> = 'stream: loop {
        let max_changes = size.limit();
        let pending = assembler.has_parts();
        let can_read =
            !pending && ready.is_none() && (batcher.changes() < max_changes || in_flight.is_none());
        let owed = !followups.is_empty() || backfill.as_ref().is_some_and(|b| !b.is_done());
        let can_take = pending
            && ready.is_none()
            && batcher.changes() < max_changes
            && !(chunk_next && open.is_none() && owed);
        let can_backfill = owed && in_flight.is_none() && batcher.is_empty() && open.is_none();
        let can_dispatch =
            in_flight.is_none() && (!batcher.is_empty() || heartbeat.wants_dispatch());
        tokio::select! {
            biased;
            // 1. Shutdown: stop reading; the in-flight batch is awaited below.
            _ = shutdown::requested(shutdown) => break Ok(()),
            // 2. A batch committed (or failed for good): confirm its end LSN.
            ev = event_rx.recv() => match ev {
                Some(SinkEvent::Committed(b)) => {
                    debug_assert!(b.end_lsn >= flushed, "commits arrive in order");
                    flushed = flushed.max(b.end_lsn);
                    stored = b.checkpoint();
                    in_flight = None;
                    if let Some(next) = ready.take() {
                        // First of all: the writer waits for nothing else.
                        in_flight = Some(next.end_lsn);
                        if batch_tx.send(next).await.is_err() {
                            break Err(RunError::NotReady("the Neo4j writer stopped unexpectedly".into()));
                        }
                        chunk_next = true;
                    }
                    let sent_next = in_flight.is_some();
                    if let Some((since, full)) = sized.take() {
                        size.committed(b.changes, full, since.elapsed());
                        metrics.batch_limit.store(size.limit() as u64, Ordering::Relaxed);
                    }
                    if sent_next {
                        sized = Some((Instant::now(), true));
                    }
                    applied_changes += b.changes as u64;
                    metrics.changes.fetch_add(b.changes as u64, Ordering::Relaxed);
                    metrics.transactions.fetch_add(b.transactions as u64, Ordering::Relaxed);
                    metrics.batches.fetch_add(1, Ordering::Relaxed);
                    metrics.flushed_lsn.store(flushed.raw(), Ordering::Relaxed);
                    metrics.record_commits(&b.commits);
                    if let Some(trip) = heartbeat.committed(b.end_lsn) {
                        metrics.record_heartbeat(trip);
                    }
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
                if in_flight.is_none() && batcher.is_empty() && open.is_none() && !assembler.has_parts() {
                    heartbeat.maybe_send(heartbeat_pg.as_ref().unwrap_or(&catalog)).await;
                }
                let idle = replay.is_none() && assembler.is_idle() && open.is_none() && batcher.is_empty() && in_flight.is_none();
                if idle && may_advance_idle(&checkpoint, flushed, server_wal_end) && last_idle_advance.elapsed() >= IDLE_ADVANCE_EVERY {
                    last_idle_advance = Instant::now();
                    batcher.advance_to(server_wal_end);
                    let b = batcher.take(&p.mapping);
                    in_flight = Some(b.end_lsn);
                    if batch_tx.send(b).await.is_err() {
                        break Err(RunError::NotReady("the Neo4j writer stopped unexpectedly".into()));
                    }
                }
                if last_catalog_check.elapsed() >= CATALOG_CHECK_EVERY {
                    last_catalog_check = Instant::now();
                    match catalog.slot_sample(&cfg.postgres.slot).await {
                        Ok(sample) => {
                            if let Ok(mut s) = metrics.slot.lock() {
                                *s = sample;
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "cannot read the slot for the metrics"),
                    }
                    if let Some(why) = mapped_tables_changed(&catalog, &p.mapping).await {
                        break Err(RunError::TableChanged(why));
                    }
                    if let Some(w) = watch.as_mut() {
                        // A failed look-up says nothing; the next one may.
                        if let Err(e) = w.poll_catalog(&catalog).await {
                            tracing::debug!(error = %e, "cannot look up the followed columns");
                        }
                    }
                }
                if let Some(w) = watch.as_mut() {
                    // Everything up to the last transaction taken whole; when
                    // nothing is on its way, up to the server's WAL end.
                    let mut taken = batcher.checkpoint().lsn.max(stored.lsn);
                    if assembler.is_idle() && open.is_none() && !assembler.has_parts() {
                        taken = taken.max(server_wal_end);
                    }
                    followups.extend(w.catalog_due(taken));
                }
                if last_report.elapsed() >= Duration::from_secs(10) && applied_changes > 0 {
                    tracing::info!(changes = applied_changes, flushed = %flushed, "applied");
                    applied_changes = 0;
                    last_report = Instant::now();
                }
            }
            // 4. The batch is due: hand it to the sink.
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if can_dispatch && deadline.is_some() => {
                let due = deadline.unwrap_or_else(Instant::now);
                sized = Some((Instant::now(), batcher.changes() >= max_changes));
                in_flight = Some(dispatch(&mut batcher, &p.mapping, &batch_tx, due).await?);
                full_since = None;
                heartbeat.dispatched();
                deadline = None;
                chunk_next = true;
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
                    if let (TxnPart::Change(c), Some(w)) = (&part, watch.as_mut()) {
                        if let Some(f) = w.observe(&c.relation) {
                            followups.push_back(f);
                        }
                    }
                    let was_empty = batcher.is_empty();
                    match &part {
                        TxnPart::Message(m) => heartbeat.message(m),
                        TxnPart::Commit(h) => {
                            heartbeat.activity();
                            heartbeat.commit(h);
                            if heartbeat.wants_dispatch() && deadline.is_none() {
                                deadline = Some(Instant::now() + cfg.batch.max_delay);
                            }
                        }
                        _ => {}
                    }
                    if take_part(part, &checkpoint, limit, &mut open, &mapper, &mut batcher, on_error)? {
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
                    for (lsn, m) in assembler.take_loose_messages() {
                        if !mapper.takes_messages(&m.prefix) || lsn <= checkpoint.lsn {
                            continue;
                        }
                        let refused = MapError::Refused {
                            origin: format!("the non-transactional message with prefix {}", m.prefix),
                            lsn,
                            why: "walgraph applies only transactional messages (pg_logical_emit_message(true, …)), which commit or roll back with their transaction".into(),
                            text: m.content,
                        };
                        if on_error == OnError::Stop {
                            break 'stream Err(refused.into());
                        }
                        tracing::error!(%lsn, prefix = %m.prefix, "a non-transactional message is refused (walgraph applies only transactional ones); recording it as a dead letter");
                        batcher.dead_letter(dead_letter(refused));
                        if deadline.is_none() {
                            deadline = Some(Instant::now() + cfg.batch.max_delay);
                        }
                    }
                    for r in assembler.take_rollbacks() {
                        metrics.streamed_rollbacks.fetch_add(1, Ordering::Relaxed);
                        let at = r.abort.map_or_else(|| format!("near {start}"), |(lsn, t)| {
                            format!("at {lsn}, {:.1} s ago", (crate::lsn::pg_now() - t) as f64 / 1e6)
                        });
                        tracing::info!(xid = r.xid, messages = r.messages, bytes = r.bytes, "a streamed transaction rolled back {at}; what had arrived of it is discarded");
                    }
                    let new_types = assembler.take_new_types();
                    if !new_types.is_empty() {
                        assembler.add_base_types(&catalog.base_types(&new_types).await?);
                    }
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
            // 7. Last, when nothing else is ready and all the stream has
            //    taken is committed: a chunk of a table added to the mapping
            //    (see the backfill module for why this order is exact).
            _ = std::future::ready(()), if can_backfill => {
                chunk_next = false;
                if let Some(f) = followups.front_mut() {
                    // Removals and deletions first, a step at a time; then
                    // the copies (or just the records) of what is mapped now.
                    if let Some(step) = f.steps.front() {
                        let n = match &p.sink {
                            Some(sink) => sink.count_step(&step.describe(), &step.cypher(), REMOVE_STEP).await?,
                            None => 0,
                        };
                        tracing::debug!(what = %f.what, items = n, "{}", step.describe());
                        if n < REMOVE_STEP as u64 {
                            tracing::info!("{} done", step.describe());
                            f.steps.pop_front();
                        }
                    } else if let Some(f) = followups.pop_front() {
                        match (f.recopy.is_empty(), backfill.as_mut(), &p.sink) {
                            (false, Some(bf), _) => bf.recopy(&f.recopy, f.records, f.after_all),
                            (_, _, Some(sink)) => {
                                for r in &f.records {
                                    sink.run_statement(r).await?;
                                }
                            }
                            _ => {}
                        }
                    }
                } else if let Some(bf) = backfill.as_mut() {
                    let b = bf.next_batch(&p.mapping, stored).await?;
                    in_flight = Some(b.end_lsn);
                    if batch_tx.send(b).await.is_err() {
                        break Err(RunError::NotReady("the Neo4j writer stopped unexpectedly".into()));
                    }
                }
            }
        }
        if past_end {
            break Ok(());
        }
        // A full batch waits for the sink; send it as soon as it is free.
        if batcher.changes() >= max_changes && full_since.is_none() {
            full_since = Some(Instant::now());
        }
        // (Full at the limit it filled under: a limit that grew with the
        // commit just reported does not keep the writer idle meanwhile.)
        // While the writer is busy, it is rendered now and waits as `ready`.
        if full_since.is_some() && ready.is_none() {
            let due = full_since.take().unwrap_or_else(Instant::now);
            let batch = take_batch(&mut batcher, &p.mapping, due);
            deadline = None;
            if in_flight.is_none() {
                sized = Some((Instant::now(), true));
                in_flight = Some(send(&batch_tx, batch).await?);
                chunk_next = true;
            } else {
                ready = Some(batch);
            }
        }
    };

    if past_end && result.is_ok() {
        // A replay that reached its end: write what is left, and wait.
        if in_flight.is_some() {
            await_commit(&mut event_rx, metrics).await?;
            in_flight = None;
        }
        if let Some(b) = ready.take() {
            send(&batch_tx, b).await?;
            await_commit(&mut event_rx, metrics).await?;
        }
        if !batcher.is_empty() {
            dispatch(&mut batcher, &p.mapping, &batch_tx, Instant::now()).await?;
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

/// How often the mapped tables are looked up in the catalog.
const CATALOG_CHECK_EVERY: Duration = Duration::from_secs(5);

/// A sentence when a mapped table is gone or has another name now. A failed
/// look-up says nothing (the replication connection reports an outage).
async fn mapped_tables_changed(catalog: &PgClient, mapping: &Mapping) -> Option<String> {
    let oids: Vec<u32> = mapping.oids.keys().copied().collect();
    let now = match catalog.table_names(&oids).await {
        Ok(now) => now,
        Err(e) => {
            tracing::debug!(error = %e, "cannot look up the mapped tables");
            return None;
        }
    };
    let mut mapped: Vec<(&u32, &String)> = mapping.oids.iter().collect();
    mapped.sort_by(|a, b| a.1.cmp(b.1));
    mapped.into_iter().find_map(|(oid, was)| match now.get(oid) {
        None => Some(format!(
            "the mapped table {was} was dropped while walgraph ran; take it out of the mapping (its nodes and relationships stay in the graph until you remove them) and start walgraph again"
        )),
        Some(name) if name != was => Some(format!(
            "the mapped table {was} is now called {name}; name it so in the mapping, run `walgraph setup`, and start walgraph again"
        )),
        Some(_) => None,
    })
}

/// Whether the idle advance may move the checkpoint to `server_wal_end`
/// (writing it without a partial): not while the transaction the starting
/// checkpoint holds in part has not been applied whole in this session, or
/// the stored count of its applied changes would be lost before Postgres
/// sends it again.
fn may_advance_idle(start: &Checkpoint, flushed: Lsn, server_wal_end: Lsn) -> bool {
    server_wal_end > flushed && start.partial.is_none_or(|p| flushed >= p.end_lsn)
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

/// A refused operation as a dead letter.
fn dead_letter(e: MapError) -> DeadLetter {
    let (origin, lsn, why, text) = match e {
        MapError::Refused {
            origin,
            lsn,
            why,
            text,
        } => (origin, Some(lsn), why, text),
        other => (String::new(), None, other.to_string(), String::new()),
    };
    DeadLetter {
        table: origin,
        key: String::new(),
        lsn,
        operation: text,
        error: why,
    }
}

/// A refused message or outbox row stops the stream, or with
/// `neo4j.on_error = "dead_letter"` is recorded with the batch (and
/// applies nothing); any other mapping error stops it.
fn refuse_or_stop(
    mapped: Result<(), MapError>,
    on_error: OnError,
    batcher: &mut Batcher,
    ops: &mut Vec<crate::mapping::map::GraphOp>,
) -> Result<(), RunError> {
    match mapped {
        Ok(()) => Ok(()),
        Err(MapError::Refused {
            origin,
            lsn,
            why,
            text,
        }) if on_error == OnError::DeadLetter => {
            tracing::error!(%lsn, "{origin} is refused: {why}; recording it as a dead letter");
            let e = MapError::Refused {
                origin,
                lsn,
                why,
                text,
            };
            ops.clear();
            batcher.dead_letter(dead_letter(e));
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
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
    on_error: OnError,
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
            batcher.note_commit_time(h.commit_lsn, h.commit_time);
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
            refuse_or_stop(
                mapper.map_change(&c, t.commit_lsn, &mut ops),
                on_error,
                batcher,
                &mut ops,
            )?;
            if mapper.is_outbox(&c.relation) {
                batcher.push_partial_each(ops, t.end_lsn, t.index);
            } else {
                batcher.push_partial(ops, t.end_lsn, t.index);
            }
            batcher.note_change(c.relation.oid, c.op, || c.relation.qualified_name());
        }
        TxnPart::Message(m) => {
            // Every transactional message counts with the changes (whatever
            // its prefix, so the count does not depend on the
            // configuration): a transaction resumed in part skips them the
            // same way.
            let t = open.as_mut().ok_or_else(|| {
                RunError::NotReady("a message arrived outside a transaction".into())
            })?;
            t.index += 1;
            if t.applied.is_none_or(|n| t.index <= n) || !mapper.takes_messages(&m.prefix) {
                return Ok(false);
            }
            let mut ops = Vec::new();
            refuse_or_stop(
                mapper.map_message(&m, t.commit_lsn, &mut ops),
                on_error,
                batcher,
                &mut ops,
            )?;
            batcher.push_partial_each(ops, t.end_lsn, t.index);
        }
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

/// Hands the batch to the writer; `due` is when it became ready (its
/// deadline, or when it filled up), which may be before now when the
/// writer was busy.
async fn dispatch(
    batcher: &mut Batcher,
    mapping: &Mapping,
    tx: &mpsc::Sender<Batch>,
    due: Instant,
) -> Result<Lsn, RunError> {
    send(tx, take_batch(batcher, mapping, due)).await
}

/// Takes the batch out of the batcher, rendered, stamped with when it
/// became due.
fn take_batch(batcher: &mut Batcher, mapping: &Mapping, due: Instant) -> Batch {
    let mut batch = batcher.take(mapping);
    let due = due.min(Instant::now());
    let waited = i64::try_from(due.elapsed().as_micros()).unwrap_or(0);
    batch.ready = Some((due.into_std(), crate::lsn::pg_now() - waited));
    batch
}

/// Hands a taken batch to the writer; its end LSN.
async fn send(tx: &mpsc::Sender<Batch>, batch: Batch) -> Result<Lsn, RunError> {
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

/// Has Neo4j plan the mapping's statements before the stream starts (at
/// most [`PLAN_AHEAD_BUDGET`]), so the first batches do not pay for it.
/// A failure here costs nothing but the head start: the first batch
/// meets the same server and handles what it says.
async fn plan_ahead(sink: &Sink, mapping: &Mapping, max_changes: usize) {
    let texts = crate::batch::render::statement_texts(mapping, max_changes);
    let started = std::time::Instant::now();
    match sink.plan_ahead(&texts, PLAN_AHEAD_BUDGET).await {
        Ok(n) => tracing::info!(
            plans = n,
            statements = texts.len(),
            took = ?started.elapsed(),
            "Neo4j planned the mapping's statements"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "planning the mapping's statements ahead failed; they are planned on first use")
        }
    }
}

/// How long `run` lets Neo4j plan statements before it streams.
const PLAN_AHEAD_BUDGET: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Partial;

    #[test]
    fn the_idle_advance_waits_for_a_transaction_held_in_part() {
        let start = Checkpoint {
            lsn: Lsn::new(100),
            partial: Some(Partial {
                end_lsn: Lsn::new(500),
                changes: 7,
            }),
        };
        assert!(!may_advance_idle(&start, Lsn::new(100), Lsn::new(900)));
        assert!(may_advance_idle(&start, Lsn::new(500), Lsn::new(900)));
        assert!(!may_advance_idle(&start, Lsn::new(900), Lsn::new(900)));
        assert!(may_advance_idle(
            &Checkpoint::at(Lsn::new(100)),
            Lsn::new(100),
            Lsn::new(900)
        ));
    }

    #[test]
    fn a_resumed_transaction_s_batches_carry_the_stored_checkpoint() {
        let mut b = Batcher::starting_at(Lsn::new(100));
        b.push_partial(Vec::new(), Lsn::new(500), 3);
        let batch = b.take(&crate::mapping::tests::demo_mapping());
        assert_eq!(
            batch.checkpoint(),
            Checkpoint {
                lsn: Lsn::new(100),
                partial: Some(Partial {
                    end_lsn: Lsn::new(500),
                    changes: 3
                }),
            }
        );
    }
}
