//! Streaming from a hot standby (PostgreSQL 16+, logical decoding on
//! standbys): the slot, the stream and every read are on the standby
//! (`postgres.url`); what writes — the publication — goes to the primary
//! (`postgres.primary_url`).
//!
//! A logical slot made on a standby waits for the primary to log the
//! transactions running (`xl_running_xacts`), which it does every 15 s only
//! while it is busy; walgraph asks for one (`pg_log_standby_snapshot()` on
//! the primary) while it waits, so `setup`, `snapshot`, the online backfill
//! and `reconcile` do not hang on a quiet primary.

use std::future::Future;
use std::time::Duration;

use super::catalog::{CatalogError, PgClient};
use super::ConnInfo;
use crate::lsn::Lsn;

/// SQL for the server's WAL position a reader has seen: where a standby
/// has replayed to, the primary's current position otherwise.
pub const WAL_POSITION: &str = "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                                ELSE pg_current_wal_lsn() END";

/// Checks the source: `Ok(false)` for a primary, `Ok(true)` for a standby
/// walgraph can stream from; a standby before 16 or without a primary to
/// write to is refused with a sentence.
pub async fn check(pg: &PgClient, info: &ConnInfo) -> Result<bool, CatalogError> {
    if !pg.in_recovery().await? {
        return Ok(false);
    }
    let version = pg.server_version_num().await?;
    if version < 160_000 {
        return Err(CatalogError::NotReady(format!(
            "{info} is a standby, and logical decoding on a standby needs PostgreSQL 16 or later (this server is {}): point postgres.url at the primary",
            version / 10_000
        )));
    }
    if info.primary.is_none() {
        return Err(CatalogError::NotReady(format!(
            "{info} is a standby: set postgres.primary_url to its primary, where the publication is changed and which walgraph asks for the snapshot a slot on a standby waits for"
        )));
    }
    if pg.setting("hot_standby_feedback").await?.as_deref() != Some("on") {
        tracing::warn!(%info, "the standby has hot_standby_feedback off: the primary may remove catalog rows walgraph's slot still needs, and the slot is then invalidated (rows_removed); turn it on");
    }
    Ok(true)
}

/// Runs `work` (making a slot on the source) while asking the primary, if
/// there is one, to log a standby snapshot every half second: a slot on a
/// standby waits for one.
pub async fn nudged<T>(info: &ConnInfo, work: impl Future<Output = T>) -> T {
    let Some(primary) = info.primary.as_deref() else {
        return work.await;
    };
    let nudge = async {
        let pg = match PgClient::connect(primary).await {
            Ok(pg) => pg,
            Err(e) => {
                tracing::warn!(%primary, error = %e, "cannot reach the primary to hurry the slot being made on the standby; it waits for the primary's next standby snapshot");
                return std::future::pending::<()>().await;
            }
        };
        loop {
            if let Err(e) = pg.log_standby_snapshot().await {
                tracing::debug!(error = %e, "pg_log_standby_snapshot failed");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        out = work => out,
        () = nudge => unreachable!("the nudge loop never ends"),
    }
}

/// Waits until the standby has replayed the primary's WAL up to where it
/// is now (after a change made there, such as the publication), at most
/// `limit`.
pub async fn wait_replayed(
    standby: &PgClient,
    primary: &PgClient,
    limit: Duration,
) -> Result<(), CatalogError> {
    let target = primary.wal_position().await?;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let at = standby.wal_position().await?;
        if at >= target {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CatalogError::NotReady(format!(
                "the standby has not replayed the primary's WAL up to {target} within {} s (it is at {at}); is it replicating?",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl PgClient {
    /// Whether the server is in recovery (a standby).
    pub async fn in_recovery(&self) -> Result<bool, CatalogError> {
        Ok(self
            .client()
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(super::catalog::db_error)?
            .get(0))
    }

    /// A setting's value, `None` where the server has no such setting.
    pub async fn setting(&self, name: &str) -> Result<Option<String>, CatalogError> {
        Ok(self
            .client()
            .query_one("SELECT current_setting($1, true)", &[&name])
            .await
            .map_err(super::catalog::db_error)?
            .get(0))
    }

    /// The WAL position this server's readers see ([`WAL_POSITION`]).
    pub async fn wal_position(&self) -> Result<Lsn, CatalogError> {
        let text: String = self
            .client()
            .query_one(&format!("SELECT ({WAL_POSITION})::text"), &[])
            .await
            .map_err(super::catalog::db_error)?
            .get(0);
        text.parse()
            .map_err(|e| CatalogError::NotReady(format!("the server gave a bad WAL position: {e}")))
    }

    /// The slot's state for the metrics, `None` if it does not exist.
    pub async fn slot_sample(
        &self,
        slot: &str,
    ) -> Result<Option<crate::metrics::SlotSample>, CatalogError> {
        let row = self
            .client()
            .query_opt(
                &format!(
                    "SELECT active, (({WAL_POSITION}) - restart_lsn)::int8, wal_status, safe_wal_size \
                     FROM pg_replication_slots WHERE slot_name = $1"
                ),
                &[&slot],
            )
            .await
            .map_err(super::catalog::db_error)?;
        Ok(row.map(|r| crate::metrics::SlotSample {
            active: r.get(0),
            retained_wal_bytes: r
                .get::<_, Option<i64>>(1)
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(0),
            wal_status: r.get(2),
            safe_wal_size: r.get(3),
        }))
    }

    /// `pg_log_standby_snapshot()` (on a primary, 16+).
    pub async fn log_standby_snapshot(&self) -> Result<(), CatalogError> {
        self.client()
            .batch_execute("SELECT pg_log_standby_snapshot()")
            .await
            .map_err(super::catalog::db_error)
    }
}
