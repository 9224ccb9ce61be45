//! `walgraph peek`: what walgraph sees, as JSON lines.
//!
//! Reads the slot (or a temporary slot of its own) and prints each committed
//! transaction — relation, operation, new and old values with their types,
//! positions — without writing anywhere. By default it confirms nothing, so
//! the slot's position is left where it was. Transactions with no change to
//! a published table (Postgres sends streamed ones even when empty) are not
//! shown.
//!
//! Invariant: without `--confirm` the slot's confirmed position never moves.

use std::time::Duration;

use serde_json::{json, Map, Value as Json};
use tokio::time::Instant;

use crate::decode::{Field, Relation, Row};
use crate::lsn::Lsn;
use crate::source::catalog::PgClient;
use crate::source::{ConnInfo, ReplicationEvent, ReplicationStream, StartOptions};
use crate::transactions::{
    Assembler, Change, LogicalMessage, StreamRollback, TxnHeader, TxnPart, PARTS_PER_TURN,
};

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
    /// Ask for logical messages (`pg_logical_emit_message`): every slot
    /// gets every database's messages, whatever its publications.
    pub messages: bool,
    /// Also print a line for each streamed transaction that rolled back
    /// (with its abort position and time on protocol 4).
    pub rollbacks: bool,
    /// Spill settings for streamed transactions.
    pub spill: crate::config::SpillSettings,
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

/// One change as a JSON object.
pub fn change_json(c: &Change) -> Json {
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
}

/// Writes committed transactions as JSON lines, one change at a time, so a
/// transaction of any size needs no more memory than one change:
/// `{"xid":…,"commit_lsn":…,"end_lsn":…,"commit_time":…,"origin":…,"changes":[…],"messages":[…]}`.
/// A transaction with no change and no message is not written.
struct JsonLines<'w> {
    out: &'w mut (dyn std::io::Write + Send),
    header: Option<TxnHeader>,
    started: bool,
    changes: usize,
    messages: Vec<LogicalMessage>,
    written: usize,
}

impl JsonLines<'_> {
    fn start(&mut self) -> std::io::Result<()> {
        if !self.started {
            self.started = true;
            let h = self.header.as_ref();
            let head = json!({
                "xid": h.map(|h| h.xid),
                "commit_lsn": h.map(|h| h.commit_lsn),
                "end_lsn": h.map(|h| h.end_lsn),
                "commit_time": h.map(|h| pg_time_text(h.commit_time)),
                "origin": h.and_then(|h| h.origin.clone()),
            })
            .to_string();
            // `{...}` without its closing brace, then the changes array.
            write!(self.out, "{},\"changes\":[", &head[..head.len() - 1])?;
        }
        Ok(())
    }

    fn part(&mut self, part: TxnPart) -> std::io::Result<()> {
        match part {
            TxnPart::Begin(h) => {
                self.header = Some(h);
                self.started = false;
                self.changes = 0;
                self.messages.clear();
            }
            TxnPart::Change(c) => {
                self.start()?;
                if self.changes > 0 {
                    self.out.write_all(b",")?;
                }
                serde_json::to_writer(&mut *self.out, &change_json(&c))?;
                self.changes += 1;
            }
            TxnPart::Message(m) => {
                self.start()?;
                self.messages.push(m);
            }
            TxnPart::Commit(_) => {
                if self.started {
                    writeln!(
                        self.out,
                        "],\"messages\":{}}}",
                        serde_json::to_string(&self.messages)?
                    )?;
                    self.out.flush()?;
                    self.written += 1;
                }
            }
        }
        Ok(())
    }
}

/// A streamed transaction that rolled back, as one JSON line:
/// `{"rolled_back":{"xid":…,"abort_lsn":…,"abort_time":…,"messages":…,"bytes":…}}`.
fn rollback_json(r: &StreamRollback) -> Json {
    json!({"rolled_back": {
        "xid": r.xid,
        "abort_lsn": r.abort.map(|(lsn, _)| lsn),
        "abort_time": r.abort.map(|(_, t)| pg_time_text(t)),
        "messages": r.messages,
        "bytes": r.bytes,
    }})
}

/// Microseconds since 2000-01-01 UTC as RFC 3339 text.
fn pg_time_text(micros: i64) -> String {
    let unix = crate::lsn::pg_micros_to_unix(micros);
    let secs = unix.div_euclid(1_000_000);
    let nanos = u32::try_from(unix.rem_euclid(1_000_000) * 1000).unwrap_or(0);
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
    if opts.two_phase && proto_version < 3 {
        anyhow::bail!(
            "--two-phase needs pgoutput protocol 3 (PostgreSQL 15 or later); this server or postgres.proto_version gives {proto_version}: leave --two-phase out"
        );
    }
    let slot = match &opts.slot {
        Some(s) => s.clone(),
        None => {
            let name = format!("walgraph_peek_{}_{}", std::process::id(), fastrand::u32(..));
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
            messages: opts.messages,
            streaming: opts.streaming,
            two_phase: opts.two_phase,
        })
        .await?;
    let mut assembler = Assembler::with_spill(opts.spill.clone());
    // Asked what user types (domains) are, once one is announced.
    let mut catalog: Option<PgClient> = None;
    let mut printed = 0usize;
    let mut lines = JsonLines {
        out,
        header: None,
        started: false,
        changes: 0,
        messages: Vec::new(),
        written: 0,
    };
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
        let pending = assembler.has_parts();
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = status.tick() => stream.send_status(flush(last_end), false).await?,
            // Parts of a committed transaction, a bounded number per turn so
            // a huge one read back from its spill file does not starve the
            // status updates.
            _ = std::future::ready(()), if pending => {
                let before = lines.written;
                for _ in 0..PARTS_PER_TURN {
                    let part = assembler
                        .next_part()
                        .map_err(|e| anyhow::anyhow!("cannot read the transaction being received: {e}"))?;
                    let Some(part) = part else { break };
                    if let TxnPart::Commit(h) = &part {
                        last_end = h.end_lsn;
                    }
                    lines
                        .part(part)
                        .map_err(|e| anyhow::anyhow!("cannot write the output: {e}"))?;
                }
                if lines.written > before {
                    printed = lines.written;
                    last_txn = Instant::now();
                }
            }
            ev = stream.next_event(), if !pending => match ev? {
                ReplicationEvent::XLogData { data, wal_start, .. } => {
                    assembler
                        .push(&data)
                        .map_err(|e| anyhow::anyhow!("cannot read the message at {wal_start}: {e}"))?;
                    for r in assembler.take_rollbacks() {
                        if opts.rollbacks {
                            writeln!(lines.out, "{}", rollback_json(&r))
                                .and_then(|()| lines.out.flush())
                                .map_err(|e| anyhow::anyhow!("cannot write the output: {e}"))?;
                            lines.written += 1;
                            printed = lines.written;
                            last_txn = Instant::now();
                        }
                    }
                    let new_types = assembler.take_new_types();
                    if !new_types.is_empty() {
                        let catalog = match &catalog {
                            Some(c) => c,
                            None => catalog.insert(PgClient::connect(info).await?),
                        };
                        assembler.add_base_types(&catalog.base_types(&new_types).await?);
                    }
                }
                ReplicationEvent::Keepalive { reply_requested, .. } => {
                    if reply_requested {
                        stream.send_status(flush(last_end), false).await?;
                    }
                }
                ReplicationEvent::End => break,
            },
        }
    }
    stream.finish(flush(last_end)).await?;
    Ok(printed)
}

/// `walgraph peek`: JSON lines on stdout until the limit, the idle timeout
/// or a signal.
pub async fn command(cfg: &crate::config::Config, opts: &PeekOptions) -> anyhow::Result<()> {
    if let (true, Some(slot)) = (opts.two_phase, &opts.slot) {
        anyhow::bail!(
            "peek --two-phase would turn two-phase decoding on for good on slot {slot}, which walgraph run reads; add --temporary to peek from a slot of its own"
        );
    }
    let mut out = std::io::stdout();
    peek(
        &super::conninfo(cfg)?,
        opts,
        &mut out,
        crate::shutdown::signal(),
    )
    .await?;
    Ok(())
}
