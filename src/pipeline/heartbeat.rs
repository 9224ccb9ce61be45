//! Heartbeats: when nothing has streamed for `postgres.heartbeat`, `run`
//! emits a transactional logical message (`pg_logical_emit_message`)
//! through an ordinary connection — to the primary when it streams from a
//! standby — and times its trip from the Postgres commit to the Neo4j
//! commit. So the lag in seconds is measured continuously, also on a quiet
//! database, and the slot's position moves on with the message's WAL.
//!
//! Without the right to call the function (`sql/walgraph_role.sql` grants
//! it) walgraph says so once and goes on without heartbeats.

use std::time::Duration;

use tokio::time::Instant;

use crate::lsn::Lsn;
use crate::source::catalog::PgClient;
use crate::transactions::{LogicalMessage, TxnHeader};

/// The prefix of walgraph's heartbeat messages.
pub const PREFIX: &str = crate::config::HEARTBEAT_PREFIX;

/// How long a heartbeat may take before another is sent.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// The heartbeat state of one streaming session.
#[derive(Debug)]
pub(super) struct Heartbeat {
    every: Option<Duration>,
    /// What identifies this walgraph's messages (every slot of the
    /// database receives every message).
    slot: String,
    last_activity: Instant,
    /// The content of the message sent and not yet seen, with when.
    sent: Option<(String, Instant)>,
    /// The current transaction carries our heartbeat.
    in_txn: bool,
    /// Our heartbeat's transaction was taken: its end LSN and commit time,
    /// and whether a batch carrying it went out.
    taken: Option<(Lsn, i64, bool)>,
}

impl Heartbeat {
    pub(super) fn new(every: Option<Duration>, slot: &str) -> Self {
        Heartbeat {
            every: every.filter(|d| !d.is_zero()),
            slot: slot.to_string(),
            last_activity: Instant::now(),
            sent: None,
            in_txn: false,
            taken: None,
        }
    }

    /// A transaction was taken from the stream.
    pub(super) fn activity(&mut self) {
        self.last_activity = Instant::now();
    }

    /// Looks at a message of the transaction being taken.
    pub(super) fn message(&mut self, m: &LogicalMessage) {
        if m.prefix == PREFIX && self.sent.as_ref().is_some_and(|(c, _)| *c == m.content) {
            self.in_txn = true;
        }
    }

    /// The transaction being taken committed.
    pub(super) fn commit(&mut self, h: &TxnHeader) {
        if std::mem::take(&mut self.in_txn) {
            self.sent = None;
            self.taken = Some((h.end_lsn, h.commit_time, false));
        }
    }

    /// A batch should go out for the heartbeat, even without changes.
    pub(super) fn wants_dispatch(&self) -> bool {
        self.taken.is_some_and(|(_, _, out)| !out)
    }

    /// A batch went out.
    pub(super) fn dispatched(&mut self) {
        if let Some(t) = self.taken.as_mut() {
            t.2 = true;
        }
    }

    /// A batch ending at `end_lsn` committed: the heartbeat's trip, if it
    /// carried it, in protocol microseconds since its commit.
    pub(super) fn committed(&mut self, end_lsn: Lsn) -> Option<i64> {
        let (end, commit_time, _) = self.taken?;
        if end_lsn < end {
            return None;
        }
        self.taken = None;
        Some((crate::lsn::pg_now() - commit_time).max(0))
    }

    /// Sends a heartbeat through `pg` if one is due; turns heartbeats off
    /// for good when the role may not emit messages.
    pub(super) async fn maybe_send(&mut self, pg: &PgClient) {
        let Some(every) = self.every else { return };
        if let Some((_, at)) = &self.sent {
            if at.elapsed() < GIVE_UP_AFTER {
                return;
            }
            tracing::debug!("a heartbeat did not arrive within 60 s; sending another");
            self.sent = None;
        }
        if self.taken.is_some() || self.last_activity.elapsed() < every {
            return;
        }
        let content = format!("{} {}", self.slot, crate::lsn::pg_now());
        match pg
            .client()
            .execute(
                "SELECT pg_catalog.pg_logical_emit_message(true, $1, $2)::text",
                &[&PREFIX, &content],
            )
            .await
        {
            Ok(_) => {
                self.sent = Some((content, Instant::now()));
                self.last_activity = Instant::now();
            }
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                tracing::warn!("the role may not call pg_logical_emit_message, so walgraph sends no heartbeats (lag in seconds is then known only while changes stream); grant it as sql/walgraph_role.sql does");
                self.every = None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot send a heartbeat");
                self.last_activity = Instant::now();
            }
        }
    }
}
