//! `walgraph setup`: the publication, the slot and the Neo4j constraints and
//! indexes. Reuses the pre-flight's mapping compilation and the sink's schema.
//!
//! Invariant: everything is checked before anything is created, and every
//! step is idempotent, so running it again only reports what exists.

use super::conninfo;
use crate::config::Config;
use crate::sink::Sink;
use crate::source::catalog::PgClient;

/// Creates (or finds) the publication, the slot and the Neo4j constraints;
/// returns one line for each thing created or found.
pub async fn setup(cfg: &Config) -> anyhow::Result<Vec<String>> {
    let info = conninfo(cfg)?;
    let pg = PgClient::connect(&info).await?;
    pg.check_wal_level().await?;
    // Check everything before changing anything.
    let mapping = crate::pipeline::compile_mapping(&pg, cfg).await?;
    let sink = Sink::connect(&cfg.neo4j, &cfg.postgres.slot).await?;
    let mut lines = vec![
        pg.ensure_publication(&cfg.postgres.publication, &mapping.table_names())
            .await?,
        pg.ensure_slot(&cfg.postgres.slot).await?,
    ];
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

/// `walgraph setup`: prints one line per thing created or found.
pub async fn command(cfg: &Config) -> anyhow::Result<()> {
    for line in setup(cfg).await? {
        println!("{line}");
    }
    Ok(())
}
