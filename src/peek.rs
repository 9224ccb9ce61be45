//! `walgraph peek`: what walgraph sees, as JSON lines.
//!
//! Reads the slot (or a temporary slot of its own) and prints each committed
//! transaction — relation, operation, new and old values with their types,
//! positions — without writing anywhere. By default it confirms nothing, so
//! the slot's position is left where it was. Transactions with no change to
//! a published table (Postgres sends streamed ones even when empty) are not
//! shown.

use std::time::Duration;

use serde_json::{json, Map, Value as Json};
use tokio::time::Instant;

use crate::decode::{Field, Relation, Row};
use crate::lsn::Lsn;
use crate::source::{ConnInfo, ReplicationEvent, ReplicationStream, StartOptions};
use crate::transactions::{Assembler, Transaction};

/// What to peek at.
#[derive(Debug, Clone)]
pub struct PeekOptions {
    /// The slot to read, or `None` for a temporary slot created now (which
    /// sees only changes made after it).
    pub slot: Option<String>,
    /// Publications to decode.
    pub publications: Vec<String>,
    /// pgoutput protocol version (default: the server's highest).
    pub proto_version: Option<u32>,
    /// Stream in-progress transactions (protocol 2+).
    pub streaming: bool,
    /// Show prepared transactions at PREPARE (protocol 3+).
    pub two_phase: bool,
    /// Spill settings for streamed transactions.
    pub spill: crate::transactions::SpillSettings,
    /// Stop after this many transactions.
    pub limit: Option<usize>,
    /// Stop after this long without a new transaction.
    pub idle_timeout: Option<Duration>,
    /// Confirm what was printed (advances the slot).
    pub confirm: bool,
}

/// A row as `{column: {"type": ..., "value": ...}}`; unchanged TOAST columns
/// are `"unchanged"`.
pub fn row_json(rel: &Relation, row: &Row) -> Json {
    let mut m = Map::new();
    for (col, field) in rel.columns.iter().zip(row) {
        let v = match field {
            Field::Unchanged => Json::String("unchanged".into()),
            Field::Value(v) => serde_json::to_value(v).unwrap_or(Json::Null),
        };
        m.insert(col.name.clone(), v);
    }
    Json::Object(m)
}

/// A transaction as one JSON object.
pub fn transaction_json(txn: &Transaction) -> Json {
    let changes: Vec<Json> = txn
        .changes
        .iter()
        .map(|c| {
            let key: Vec<&str> = c
                .relation
                .columns
                .iter()
                .filter(|col| col.is_key)
                .map(|col| col.name.as_str())
                .collect();
            json!({
                "relation": c.relation.qualified_name(),
                "op": c.op,
                "key_columns": key,
                "new": c.new.as_ref().map(|r| row_json(&c.relation, r)),
                "old": c.old.as_ref().map(|r| row_json(&c.relation, r)),
                "old_is_full_row": c.old_is_full_row,
            })
        })
        .collect();
    json!({
        "xid": txn.xid,
        "commit_lsn": txn.commit_lsn,
        "end_lsn": txn.end_lsn,
        "commit_time": pg_time_text(txn.commit_time),
        "origin": txn.origin,
        "changes": changes,
        "messages": txn.messages,
    })
}

/// Microseconds since 2000-01-01 UTC as RFC 3339 text.
fn pg_time_text(micros: i64) -> String {
    const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
    let secs = micros.div_euclid(1_000_000) + PG_EPOCH_UNIX_SECS;
    let nanos = u32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0);
    chrono::DateTime::from_timestamp(secs, nanos)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

/// Streams transactions to `out` until the limit, the idle timeout or
/// `stop` resolves. Returns how many were printed.
pub async fn peek(
    info: &ConnInfo,
    opts: &PeekOptions,
    out: &mut (dyn std::io::Write + Send),
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<usize> {
    let mut stream = ReplicationStream::connect(info).await?;
    let proto_version = stream.negotiate_proto_version(opts.proto_version).await?;
    let slot = match &opts.slot {
        Some(s) => s.clone(),
        None => {
            let name = format!("walgraph_peek_{}", std::process::id());
            stream
                .command(&format!(
                    "CREATE_REPLICATION_SLOT {name} TEMPORARY LOGICAL pgoutput"
                ))
                .await?;
            name
        }
    };
    stream
        .start(&StartOptions {
            slot,
            publications: opts.publications.clone(),
            start: Lsn::ZERO,
            proto_version,
            messages: true,
            streaming: opts.streaming,
            two_phase: opts.two_phase,
        })
        .await?;
    let mut assembler = Assembler::with_spill(opts.spill.clone());
    let mut printed = 0usize;
    let mut last_end = Lsn::ZERO;
    let mut status = tokio::time::interval(stream.status_interval());
    let mut last_txn = Instant::now();
    tokio::pin!(stop);
    // Confirming Lsn::ZERO (InvalidXLogRecPtr) keeps the connection alive
    // without moving the slot.
    let flush = |last_end: Lsn| if opts.confirm { last_end } else { Lsn::ZERO };
    loop {
        if opts.limit.is_some_and(|l| printed >= l) {
            break;
        }
        if opts.idle_timeout.is_some_and(|t| last_txn.elapsed() >= t) {
            break;
        }
        tokio::select! {
            biased;
            _ = &mut stop => break,
            ev = stream.next_event() => match ev? {
                ReplicationEvent::XLogData { data, wal_start, .. } => {
                    let txn = assembler
                        .push_raw(&data)
                        .map_err(|e| anyhow::anyhow!("cannot read the message at {wal_start}: {e}"))?;
                    // A streamed transaction that touched no published table
                        // still arrives (empty); it says nothing, so skip it.
                    if let Some(txn) = txn.filter(|t| !t.changes.is_empty() || !t.messages.is_empty()) {
                        writeln!(out, "{}", transaction_json(&txn))?;
                        out.flush()?;
                        printed += 1;
                        last_end = txn.end_lsn;
                        last_txn = Instant::now();
                    }
                }
                ReplicationEvent::Keepalive { reply_requested, .. } => {
                    if reply_requested {
                        stream.send_status(flush(last_end), false).await?;
                    }
                }
                ReplicationEvent::End => break,
            },
            _ = status.tick() => stream.send_status(flush(last_end), false).await?,
        }
    }
    stream.finish(flush(last_end)).await?;
    Ok(printed)
}
