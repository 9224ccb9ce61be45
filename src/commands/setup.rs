//! `walgraph setup`: the publication, the slot and the Neo4j constraints and
//! indexes. Reuses the pre-flight's mapping compilation and the sink's schema.
//!
//! Invariant: everything is checked before anything is created, and every
//! step is idempotent, so running it again only reports what exists.

use super::conninfo;
use crate::config::Config;
use crate::sink::{snapshot_state, Sink};
use crate::source::catalog::PgClient;

/// Creates (or finds) the publication, the slot and the Neo4j constraints;
/// returns one line for each thing created or found.
pub async fn setup(cfg: &Config) -> anyhow::Result<Vec<String>> {
    let info = conninfo(cfg)?;
    let pg = PgClient::connect(&info).await?;
    pg.check_wal_level().await?;
    let standby = crate::source::standby::check(&pg, &info).await?;
    // Check everything before changing anything.
    if cfg.postgres.generated_columns {
        pg.check_generated_columns().await?;
    }
    // Compiled as the publication will stream once set up.
    let mapping =
        crate::pipeline::compile_mapping_as(&pg, cfg, cfg.postgres.generated_columns).await?;
    if cfg.postgres.failover {
        pg.check_failover().await?;
        if standby {
            anyhow::bail!("postgres.failover makes a failover slot, which only a primary can have; walgraph streams from a standby here (postgres.url): set postgres.failover = false");
        }
    }
    let sink = Sink::connect(&cfg.neo4j, &cfg.postgres.slot).await?;
    // The publication is made where writes go (the primary when reading
    // from a standby), the slot where walgraph streams from.
    let primary = if standby {
        Some(PgClient::connect(info.writer()).await?)
    } else {
        None
    };
    let mut lines = vec![
        primary
            .as_ref()
            .unwrap_or(&pg)
            .ensure_publication(
                &cfg.postgres.publication,
                &mapping.published_tables(),
                cfg.postgres.generated_columns,
            )
            .await?,
    ];
    if let Some(primary) = &primary {
        crate::source::standby::wait_replayed(&pg, primary, std::time::Duration::from_secs(60))
            .await?;
    }
    let (line, created_at, make_failover) = crate::source::standby::nudged(
        &info,
        pg.ensure_slot(&cfg.postgres.slot, cfg.postgres.failover),
    )
    .await?;
    lines.push(line);
    if make_failover {
        // Only a replication connection can change a slot, and only while
        // no walsender holds it.
        let mut repl = crate::source::ReplicationStream::connect(&info).await?;
        repl.command(&format!(
            "ALTER_REPLICATION_SLOT {} ( FAILOVER true )",
            crate::source::sql::quote_ident(&cfg.postgres.slot)
        ))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot make replication slot {} a failover slot ({}); stop `walgraph run` if it runs and try again",
                cfg.postgres.slot,
                crate::error_sentence(&anyhow::Error::new(e))
            )
        })?;
        lines.push(format!(
            "replication slot {} is a failover slot now",
            cfg.postgres.slot
        ));
    }
    if let Some(at) = created_at {
        lines.extend(forget_an_earlier_slots_snapshot(&sink, &cfg.postgres.slot, at).await?);
    }
    let created = sink.ensure_schema(&mapping).await?;
    lines.push(if created.is_empty() {
        "Neo4j constraints and indexes already present".to_string()
    } else {
        format!(
            "created Neo4j constraints and indexes: {}",
            created.join(", ")
        )
    });
    Ok(lines)
}

/// A snapshot Neo4j records for an earlier slot of the same name (dropped
/// and created again) does not count for the new one: rows changed while no
/// slot existed are in neither. Its record is reset, so `run` waits for a
/// new `walgraph snapshot`, which copies everything again.
async fn forget_an_earlier_slots_snapshot(
    sink: &Sink,
    slot: &str,
    created_at: crate::lsn::Lsn,
) -> anyhow::Result<Option<String>> {
    if snapshot_state::read_state(sink, slot).await?.is_none() {
        return Ok(None);
    }
    let fresh = snapshot_state::SnapshotState::default();
    sink.graph()
        .run(snapshot_state::progress_query(slot, &fresh, created_at))
        .await?;
    Ok(Some(format!(
        "the snapshot Neo4j holds for an earlier slot named {slot} does not count for the new slot; run `walgraph snapshot` before `walgraph run`"
    )))
}

/// `walgraph setup`: prints one line per thing created or found.
pub async fn command(cfg: &Config) -> anyhow::Result<()> {
    for line in setup(cfg).await? {
        println!("{line}");
    }
    Ok(())
}
