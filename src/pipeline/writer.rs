//! Writer: the task that applies batches to Neo4j, one at a time and in
//! order, while the stream loop fills the next one.
//!
//! Invariants: a batch is reported committed only after Neo4j committed it;
//! transient failures retry the whole batch with backoff; a change Neo4j
//! rejects for good (a client error, or a database error that one change
//! causes) stops the pipeline naming it, or becomes a dead letter; a
//! database error no single change causes is retried like a transient one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::sleep;

use crate::batch::{describe, Batch};
use crate::config::OnError;
use crate::mapping::Mapping;
use crate::metrics::Metrics;
use crate::retry::backoff;
use crate::sink::{DeadLetter, Sink, SinkError};

/// What the sink task reports.
pub(super) enum SinkEvent {
    Committed(Batch),
    Failed(SinkError),
}

/// Applies batches in order, retrying transient failures with backoff. A
/// change Neo4j rejects for good stops the pipeline with its table, key and
/// LSN named, or becomes a dead letter (`neo4j.on_error`).
pub(super) async fn sink_task(
    sink: Option<Sink>,
    mapping: Arc<Mapping>,
    metrics: Arc<Metrics>,
    on_error: OnError,
    stuck_after: Duration,
    mut batches: mpsc::Receiver<Batch>,
    events: mpsc::Sender<SinkEvent>,
) {
    // A failed attempt at the batch being written: once it has failed for
    // longer than `stuck_after`, walgraph says it is stuck (`/ready`,
    // `/metrics`, `status`, one error in the log) and goes on retrying.
    let failed_attempt = |end_lsn: crate::lsn::Lsn| {
        let now = crate::metrics::unix_ms();
        let since = match metrics.batch_failing_since_ms.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => now,
            Err(since) => since,
        };
        let failing = Duration::from_millis(now.saturating_sub(since));
        if failing >= stuck_after && !metrics.batch_stuck.swap(true, Ordering::Relaxed) {
            tracing::error!(%end_lsn, failing_for = ?failing, "a batch has failed for longer than neo4j.stuck_after; /ready answers 503 until it is written, and walgraph goes on retrying");
        }
    };
    let written = |end_lsn: crate::lsn::Lsn| {
        metrics.batch_failing_since_ms.store(0, Ordering::Relaxed);
        if metrics.batch_stuck.swap(false, Ordering::Relaxed) {
            tracing::info!(%end_lsn, "the stuck batch is written; walgraph is ready again");
        }
    };
    while let Some(mut batch) = batches.recv().await {
        let taken = std::time::Instant::now();
        let Some(sink) = sink.as_ref() else {
            batch.statements.clear();
            batch.plan.clear();
            if events.send(SinkEvent::Committed(batch)).await.is_err() {
                return;
            }
            continue;
        };
        let mut attempt = 0u32;
        // What the stream refused (bad operations) goes with the batch.
        let mut dead: Vec<DeadLetter> = std::mem::take(&mut batch.dead);
        loop {
            let attempt_started = std::time::Instant::now();
            match sink.apply(&batch, &dead).await {
                Ok(()) => {
                    written(batch.end_lsn);
                    metrics.record_batch(batch.changes, attempt_started.elapsed(), &batch.by_table);
                    metrics.record_stages(&batch.commits, batch.ready, taken);
                    metrics
                        .dead_letters
                        .fetch_add(dead.len() as u64, Ordering::Relaxed);
                    // Reported first, and the written statements freed
                    // aside (a large batch takes a while to): the next
                    // batch waits for neither.
                    let mut done = batch;
                    let written = (
                        std::mem::take(&mut done.statements),
                        std::mem::take(&mut done.plan),
                    );
                    if events.send(SinkEvent::Committed(done)).await.is_err() {
                        return;
                    }
                    tokio::task::spawn_blocking(move || drop(written));
                    break;
                }
                Err(e) if e.is_transient() => {
                    failed_attempt(batch.end_lsn);
                    let wait = backoff(attempt);
                    attempt += 1;
                    metrics.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, attempt, retry_in = ?wait, end_lsn = %batch.end_lsn, "neo4j write failed, retrying the batch");
                    sleep(wait).await;
                }
                Err(
                    failed @ (SinkError::Rejected(_)
                    | SinkError::Database(_)
                    | SinkError::Unencodable(_)),
                ) => {
                    let located = match sink.locate(&batch, &mapping).await {
                        Ok(l) => l,
                        Err(e) if e.is_transient() => {
                            failed_attempt(batch.end_lsn);
                            sleep(backoff(attempt)).await;
                            attempt += 1;
                            continue;
                        }
                        Err(e) => {
                            let _ = events.send(SinkEvent::Failed(e)).await;
                            return;
                        }
                    };
                    let Some((group, index, error)) = located else {
                        if let SinkError::Database(_) = failed {
                            // No single change causes it: Neo4j's own trouble
                            // (a database stopping), so the batch is retried.
                            failed_attempt(batch.end_lsn);
                            let wait = backoff(attempt);
                            attempt += 1;
                            metrics.retries.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %failed, attempt, retry_in = ?wait, end_lsn = %batch.end_lsn, "neo4j failed the write and no single change causes it, retrying the batch");
                            sleep(wait).await;
                            continue;
                        }
                        let _ = events.send(SinkEvent::Failed(failed)).await;
                        return;
                    };
                    let op = batch.plan[group][index].clone();
                    let (table, key, lsn) = describe(&op, &mapping);
                    if on_error == OnError::Stop {
                        // A key can be huge (that may be why it failed).
                        let key = match key.char_indices().nth(200) {
                            Some((end, _)) => format!("{}…", &key[..end]),
                            None => key,
                        };
                        let _ = events
                            .send(SinkEvent::Failed(SinkError::ChangeRejected {
                                table,
                                key,
                                lsn,
                                error,
                            }))
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
