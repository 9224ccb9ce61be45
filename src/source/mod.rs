//! Source: the logical replication connection.
//!
//! Invariants:
//! - the flush position reported to Postgres is only ever what the caller
//!   passes to [`ReplicationStream::send_status`] — the sink's committed
//!   position — never what was merely read;
//! - a keepalive that asks for a reply is answered at once, and status goes
//!   out at least every `min(1s, wal_sender_timeout/2)` (the caller's loop
//!   drives [`ReplicationStream::status_interval`]);
//! - the session pins the output styles (`DateStyle=ISO`, `TimeZone=UTC`,
//!   `IntervalStyle=iso_8601`, `extra_float_digits=3`, `bytea_output=hex`) so
//!   that text values decode exactly.
//!
//! Protocol: <https://www.postgresql.org/docs/current/protocol-replication.html>
//! (`START_REPLICATION`, XLogData `w`, primary keepalive `k`, standby status
//! update `r`).

pub mod catalog;
pub mod conninfo;
pub mod sql;
pub mod standby;
pub mod tls;
pub mod wire;

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use conninfo::ConnInfo;
use wire::{ServerError, Wire};

use crate::lsn::{pg_now, Lsn};
use sql::{quote_ident, quote_literal};

/// Why the source failed, split by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The connection broke or could not be made; retrying may help.
    #[error("the Postgres connection failed: {0}")]
    Io(#[source] std::io::Error),
    /// Could not reach the server.
    #[error("cannot connect to Postgres at {target}: {source}; is the server running and the address right?")]
    Connect {
        /// The target, without the password.
        target: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The server reported an error.
    #[error("Postgres said: {0}")]
    Server(ServerError),
    /// The server sent something the protocol does not allow.
    #[error("Postgres sent something unexpected: {0}")]
    Protocol(String),
    /// A problem that retrying will not fix.
    #[error("{0}")]
    Definite(String),
}

impl SourceError {
    fn connect(info: &ConnInfo, source: std::io::Error) -> Self {
        SourceError::Connect {
            target: info.to_string(),
            source,
        }
    }

    fn from_error_body(body: &[u8]) -> Self {
        SourceError::Server(ServerError::parse(body))
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Io(_) | SourceError::Connect { .. } => true,
            SourceError::Server(e) => sqlstate_is_transient(&e.code),
            SourceError::Protocol(_) | SourceError::Definite(_) => false,
        }
    }
}

/// Whether an error with this SQLSTATE may go away on retry: connection
/// exceptions, shutdowns, resource shortages, a serialization failure, and
/// a slot still held by a walsender that is going away. Never decided by
/// the text of a message.
pub fn sqlstate_is_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "55006"
        || code == "40001"
}

/// What `IDENTIFY_SYSTEM` says.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    /// The cluster's system identifier.
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The database connected to.
    pub dbname: Option<String>,
}

/// What to stream.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// Slot name.
    pub slot: String,
    /// Publication names.
    pub publications: Vec<String>,
    /// Where to start (`Lsn::ZERO`: the slot's confirmed position).
    pub start: Lsn,
    /// pgoutput protocol version.
    pub proto_version: u32,
    /// Ask for logical decoding messages.
    pub messages: bool,
    /// Ask for in-progress transactions to be streamed (protocol 2+;
    /// `parallel` mode with protocol 4, so rollbacks carry their position).
    pub streaming: bool,
    /// Ask for two-phase transactions to be sent at PREPARE (protocol 3+).
    pub two_phase: bool,
}

/// The highest pgoutput protocol version a server speaks, from its
/// `server_version_num`.
pub fn max_proto_version(server_version_num: u32) -> u32 {
    match server_version_num {
        160_000.. => 4,
        150_000.. => 3,
        140_000.. => 2,
        _ => 1,
    }
}

impl ReplicationStream {
    /// The protocol version to use: `wanted`, or the server's highest;
    /// an error when the server cannot speak `wanted`.
    pub async fn negotiate_proto_version(
        &mut self,
        wanted: Option<u32>,
    ) -> Result<u32, SourceError> {
        let max = max_proto_version(self.server_version_num().await?);
        match wanted {
            Some(v) if v > max => Err(SourceError::Definite(format!(
                "postgres.proto_version is {v}, but this server speaks pgoutput versions up to {max}; lower it or remove it"
            ))),
            Some(v) => Ok(v),
            None => Ok(max),
        }
    }
}

/// One event from the stream.
#[derive(Debug)]
pub enum ReplicationEvent {
    /// A pgoutput message and its WAL position.
    XLogData {
        /// Start of the data in WAL.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The pgoutput message.
        data: Bytes,
    },
    /// A primary keepalive.
    Keepalive {
        /// The server's current end of WAL (everything before it has been sent).
        wal_end: Lsn,
        /// The server wants a status update now.
        reply_requested: bool,
    },
    /// The server ended the stream.
    End,
}

/// A replication connection, before and during streaming.
pub struct ReplicationStream {
    wire: Wire,
    streaming: bool,
    wal_sender_timeout: Option<Duration>,
    last_written: Lsn,
}

impl ReplicationStream {
    /// Connects in `replication=database` mode.
    pub async fn connect(info: &ConnInfo) -> Result<Self, SourceError> {
        let mut params = vec![("replication", "database")];
        params.extend(sql::OUTPUT_STYLES);
        let wire = Wire::connect(info, &params).await?;
        let mut s = ReplicationStream {
            wire,
            streaming: false,
            wal_sender_timeout: None,
            last_written: Lsn::ZERO,
        };
        s.wal_sender_timeout = s.show_duration("wal_sender_timeout").await?;
        Ok(s)
    }

    async fn show_duration(&mut self, name: &str) -> Result<Option<Duration>, SourceError> {
        let rows = self.wire.simple_query(&format!("SHOW {name}")).await?;
        let text = rows
            .first()
            .and_then(|r| r.first())
            .cloned()
            .flatten()
            .unwrap_or_default();
        Ok(parse_pg_duration(&text))
    }

    /// The server's `server_version_num`.
    pub async fn server_version_num(&mut self) -> Result<u32, SourceError> {
        let rows = self.wire.simple_query("SHOW server_version_num").await?;
        rows.first()
            .and_then(|r| r.first())
            .cloned()
            .flatten()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| SourceError::Protocol("SHOW server_version_num gave no number".into()))
    }

    /// Runs `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, SourceError> {
        let rows = self.wire.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| SourceError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let get = |i: usize| row.get(i).cloned().flatten();
        Ok(SystemInfo {
            system_id: get(0).unwrap_or_default(),
            timeline: get(1).and_then(|t| t.parse().ok()).unwrap_or(0),
            xlogpos: get(2)
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| SourceError::Protocol("IDENTIFY_SYSTEM gave no xlogpos".into()))?,
            dbname: get(3),
        })
    }

    /// How often status must go out: `min(1s, wal_sender_timeout/2)`.
    pub fn status_interval(&self) -> Duration {
        let one = Duration::from_secs(1);
        match self.wal_sender_timeout {
            Some(t) if !t.is_zero() => one.min(t / 2),
            _ => one,
        }
    }

    /// Starts streaming from a logical slot.
    pub async fn start(&mut self, opts: &StartOptions) -> Result<(), SourceError> {
        let pubs = opts
            .publications
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join(",");
        let mut options = vec![
            format!("proto_version '{}'", opts.proto_version),
            format!("publication_names {}", quote_literal(&pubs)),
        ];
        if opts.messages {
            options.push("messages 'true'".into());
        }
        // 'parallel' (protocol 4) differs on the wire only in that a
        // stream abort carries the abort's LSN and time, which walgraph
        // reports; it applies at commit either way.
        if opts.streaming && opts.proto_version >= 4 {
            options.push("streaming 'parallel'".into());
        } else if opts.streaming && opts.proto_version >= 2 {
            options.push("streaming 'on'".into());
        }
        if opts.two_phase && opts.proto_version >= 3 {
            options.push("two_phase 'on'".into());
        }
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            quote_ident(&opts.slot),
            opts.start,
            options.join(", ")
        );
        tracing::debug!(%sql, "starting replication");
        self.wire.start_copy_both(&sql).await?;
        self.streaming = true;
        self.last_written = opts.start;
        Ok(())
    }

    /// The next event. Cancel-safe.
    pub async fn next_event(&mut self) -> Result<ReplicationEvent, SourceError> {
        loop {
            let frame = self.wire.read_frame().await?;
            match frame.tag {
                b'd' => {
                    let mut b = frame.body;
                    if b.is_empty() {
                        return Err(SourceError::Protocol("empty CopyData".into()));
                    }
                    match b.get_u8() {
                        b'w' => {
                            if b.len() < 24 {
                                return Err(SourceError::Protocol("short XLogData header".into()));
                            }
                            let wal_start = Lsn::new(b.get_u64());
                            let wal_end = Lsn::new(b.get_u64());
                            let _send_time = b.get_i64();
                            self.last_written = self.last_written.max(wal_start);
                            return Ok(ReplicationEvent::XLogData {
                                wal_start,
                                wal_end,
                                data: b,
                            });
                        }
                        b'k' => {
                            if b.len() < 17 {
                                return Err(SourceError::Protocol("short keepalive".into()));
                            }
                            let wal_end = Lsn::new(b.get_u64());
                            let _send_time = b.get_i64();
                            let reply_requested = b.get_u8() == 1;
                            return Ok(ReplicationEvent::Keepalive {
                                wal_end,
                                reply_requested,
                            });
                        }
                        other => {
                            return Err(SourceError::Protocol(format!(
                                "unknown CopyData message {:?}",
                                other as char
                            )))
                        }
                    }
                }
                b'c' | b'C' | b'Z' => {
                    self.streaming = false;
                    return Ok(ReplicationEvent::End);
                }
                b'E' => {
                    self.streaming = false;
                    return Err(SourceError::from_error_body(&frame.body));
                }
                // Notices and parameter changes are harmless.
                _ => {}
            }
        }
    }

    /// Sends a standby status update. `flush` must be a position the sink
    /// has committed.
    pub async fn send_status(
        &mut self,
        flush: Lsn,
        reply_requested: bool,
    ) -> Result<(), SourceError> {
        let write = self.last_written.max(flush);
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(write.raw());
        msg.put_u64(flush.raw());
        msg.put_u64(flush.raw());
        msg.put_i64(pg_now());
        msg.put_u8(u8::from(reply_requested));
        self.wire.queue_copy_data(&msg)?;
        self.wire.flush().await
    }

    /// Sends a last status update and ends the stream cleanly.
    pub async fn finish(mut self, flush: Lsn) -> Result<(), SourceError> {
        if !self.streaming {
            return Ok(());
        }
        self.send_status(flush, false).await?;
        self.wire.queue_copy_done();
        self.wire.flush().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(frame) = tokio::time::timeout_at(deadline, self.wire.read_frame()).await {
            match frame?.tag {
                b'Z' => break,
                b'E' => break,
                _ => {}
            }
        }
        Ok(())
    }

    /// Runs a replication command (such as `CREATE_REPLICATION_SLOT`) and
    /// returns its rows.
    pub async fn command(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        self.wire.simple_query(sql).await
    }
}

/// Parses what `SHOW` prints for a time setting (`60s`, `1min`, `500ms`, `0`).
fn parse_pg_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().ok()?;
    Some(match unit.trim() {
        "" | "ms" => Duration::from_millis(n),
        "us" => Duration::from_micros(n),
        "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_durations_parse() {
        assert_eq!(parse_pg_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_pg_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_pg_duration("soon"), None);
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
