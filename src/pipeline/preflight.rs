//! Pre-flight: everything checked before a command streams or copies —
//! `wal_level`, the mapping against the catalog, the publication, the slot
//! (and whether another process holds it), Neo4j and its constraints, and an
//! unfinished snapshot.
//!
//! Invariant: a check that fails says what is wrong and which command fixes
//! it, and nothing has been changed in either database by then.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::sleep;

use super::RunError;
use crate::config::Config;
use crate::lsn::Lsn;
use crate::mapping::{self, Mapping};
use crate::sink::{snapshot_state, Sink};
use crate::source::catalog::PgClient;
use crate::source::ConnInfo;

/// Everything checked before streaming.
pub struct Prepared {
    /// Postgres connection settings.
    pub info: ConnInfo,
    /// The compiled mapping.
    pub mapping: Arc<Mapping>,
    /// The publication streamed (whose settings say which generated
    /// columns the stream carries).
    pub publication: String,
    /// Neo4j; `None` for the null sink, which writes nothing (benchmarks).
    pub sink: Option<Sink>,
    /// The slot's `confirmed_flush_lsn` when it was checked: Postgres sends
    /// nothing from before it any more.
    pub confirmed_flush: Option<Lsn>,
}

/// Reads the catalog of the mapped tables as the publication streams them
/// and compiles the mapping against it.
pub async fn compile_mapping(pg: &PgClient, cfg: &Config) -> Result<Mapping, RunError> {
    let gencols = pg
        .publishes_generated_columns(&cfg.postgres.publication)
        .await?;
    compile_mapping_as(pg, cfg, gencols).await
}

/// As [`compile_mapping`], for a publication that does (`gencols`) or does
/// not publish stored generated columns.
pub async fn compile_mapping_as(
    pg: &PgClient,
    cfg: &Config,
    gencols: bool,
) -> Result<Mapping, RunError> {
    let tables: Vec<String> = cfg
        .nodes
        .iter()
        .map(|n| n.table.clone())
        .chain(cfg.relationships.iter().map(|r| r.table.clone()))
        .chain(cfg.outbox.iter().map(|o| o.table.clone()))
        .collect();
    let catalog = pg.catalog_as(&tables, gencols).await?;
    Ok(mapping::compile_config(cfg, &catalog)?)
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
        let state = snapshot_state::read_state(sink, &cfg.postgres.slot)
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
        let checkpoint = sink.read_checkpoint().await?;
        if let Some(gap) = graph_behind_slot(checkpoint.map(|c| c.lsn), p.confirmed_flush) {
            return Err(RunError::GraphBehind(format!(
                "Neo4j's checkpoint for slot {} is at {}, behind {}, where Postgres has let go of the WAL: the graph misses what changed in between (Neo4j restored from a backup, the graph changed by hand, or `peek --confirm`); run `walgraph snapshot --restart` or `walgraph reconcile --repair`, then start walgraph again",
                cfg.postgres.slot, gap.0, gap.1
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
    let info = ConnInfo::of(&cfg.postgres).map_err(|e| RunError::NotReady(e.to_string()))?;
    let pg = PgClient::connect(&info).await?;
    pg.check_wal_level().await?;
    crate::source::standby::check(&pg, &info).await?;
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
                .published_tables()
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
    if cfg.postgres.generated_columns {
        pg.check_generated_columns().await?;
        if !pg.publishes_generated_columns(publication).await? {
            return Err(RunError::NotReady(format!(
                "postgres.generated_columns is set, but publication {publication} does not publish generated columns; run `walgraph setup`"
            )));
        }
    }
    let subsets = pg.publication_subsets(publication).await?;
    if !subsets.is_empty() {
        return Err(RunError::NotReady(format!(
            "publication {publication} streams only part of the changes of its tables ({}), while a snapshot, a backfill and reconcile read every row: the graph would drift from the database; recreate it without them (`DROP PUBLICATION {publication}`, then `walgraph setup`)",
            subsets.join("; ")
        )));
    }
    let slot = &cfg.postgres.slot;
    let slot_info = pg.slot(slot).await?;
    let confirmed_flush = slot_info.as_ref().and_then(|s| s.confirmed_flush_lsn);
    let is_failover = slot_info.as_ref().and_then(|s| s.failover);
    match slot_info {
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
        Some(s) if s.invalidation_reason.is_some() || s.conflicting == Some(true) => {
            let why = match s.invalidation_reason.as_deref() {
                Some("idle_timeout") => "it stayed idle longer than the server's idle_replication_slot_timeout".to_string(),
                Some("wal_removed") => "the server removed WAL it still needed (max_slot_wal_keep_size)".to_string(),
                Some("rows_removed") => "a standby's recovery removed catalog rows it needed".to_string(),
                Some("wal_level_insufficient") => "the primary's wal_level fell below logical".to_string(),
                Some(other) => format!("invalidation reason {other}"),
                None => "a recovery conflict".to_string(),
            };
            return Err(RunError::NotReady(format!(
                "replication slot {slot} was invalidated ({why}): Postgres no longer keeps what walgraph needs from it; drop and create it (`walgraph teardown --yes`, `walgraph setup`), then take a new snapshot (`walgraph snapshot --restart`)"
            )));
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
    if let Some(secs) = pg.idle_slot_timeout().await? {
        tracing::warn!(%slot, idle_replication_slot_timeout_s = secs, "Postgres invalidates a replication slot no connection uses for longer than idle_replication_slot_timeout: should walgraph stay stopped (or disconnected) longer than {secs} s, its slot is lost and a new snapshot is needed");
    }
    if cfg.postgres.failover && is_failover == Some(false) {
        tracing::warn!(%slot, "postgres.failover is set but the slot is no failover slot; run `walgraph setup` (with walgraph stopped) to make it one");
    }
    if null_sink {
        return Ok(Prepared {
            info,
            mapping,
            publication: cfg.postgres.publication.clone(),
            sink: None,
            confirmed_flush,
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
        publication: cfg.postgres.publication.clone(),
        sink,
        confirmed_flush,
    })
}

/// `(checkpoint, confirmed flush)` when the graph's checkpoint is behind the
/// position Postgres has confirmed: what lies between is gone from the slot.
/// walgraph never confirms past its checkpoint, so only something outside it
/// (a restored or edited graph, `peek --confirm`) gets there.
pub fn graph_behind_slot(checkpoint: Option<Lsn>, confirmed: Option<Lsn>) -> Option<(Lsn, Lsn)> {
    match (checkpoint, confirmed) {
        // A checkpoint at 0/0 holds only a transaction applied in part,
        // written before walgraph seeded new checkpoints at the slot's start.
        (Some(c), Some(f)) if c > Lsn::ZERO && c < f => Some((c, f)),
        _ => None,
    }
}
