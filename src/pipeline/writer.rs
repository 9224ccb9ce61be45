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
                Err(failed @ (SinkError::Rejected(_) | SinkError::Database(_))) => {
                    let located = match sink.locate(&batch, &mapping).await {
                        Ok(l) => l,
                        Err(e) if e.is_transient() => continue,
                        Err(e) => {
                            let _ = events.send(SinkEvent::Failed(e)).await;
                            return;
                        }
                    };
                    let Some((group, index, error)) = located else {
                        if let SinkError::Database(_) = failed {
                            // No single change causes it: Neo4j's own trouble
                            // (a database stopping), so the batch is retried.
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
                    let at = lsn.map_or_else(String::new, |l| format!(" committed at {l}"));
                    if on_error == OnError::Stop {
                        // A key can be huge (that may be why it failed).
                        let key = match key.char_indices().nth(200) {
                            Some((end, _)) => format!("{}…", &key[..end]),
                            None => key,
                        };
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
