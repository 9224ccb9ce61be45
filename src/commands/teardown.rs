//! `walgraph teardown`: drops the replication slot and the publication, and
//! on request walgraph's checkpoint in Neo4j.
//!
//! Invariant: refuses while the slot is in use, and asks first unless told
//! not to; what it did not find it says so, and exits 0.

use super::conninfo;
use crate::config::Config;
use crate::sink::Sink;
use crate::source::catalog::PgClient;

/// `walgraph teardown`: drops the slot and publication (after asking, unless
/// `yes`), and with `drop_checkpoint` the checkpoint in Neo4j.
pub async fn command(cfg: &Config, yes: bool, drop_checkpoint: bool) -> anyhow::Result<()> {
    let slot = &cfg.postgres.slot;
    let publication = &cfg.postgres.publication;
    if !yes {
        use std::io::{BufRead, IsTerminal, Write};
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("teardown drops slot {slot} and publication {publication}; pass --yes to confirm when not at a terminal");
        }
        print!("drop replication slot {slot} and publication {publication}? [y/N] ");
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing dropped");
            return Ok(());
        }
    }
    let info = conninfo(cfg)?;
    let pg = PgClient::connect(&info).await?;
    // The publication lives where writes go (the primary, when walgraph
    // streams from a standby).
    let writer = match &info.primary {
        Some(p) => Some(PgClient::connect(p).await?),
        None => None,
    };
    if let Some(s) = pg.slot(slot).await? {
        if s.active {
            anyhow::bail!("replication slot {slot} is in use by a running walgraph (or another consumer); stop it first");
        }
    }
    println!(
        "{}",
        if pg.drop_slot(slot).await? {
            format!("dropped replication slot {slot}")
        } else {
            format!("replication slot {slot} did not exist")
        }
    );
    println!(
        "{}",
        if writer
            .as_ref()
            .unwrap_or(&pg)
            .drop_publication(publication)
            .await?
        {
            format!("dropped publication {publication}")
        } else {
            format!("publication {publication} did not exist")
        }
    );
    if drop_checkpoint {
        let sink = Sink::connect(&cfg.neo4j, slot).await?;
        println!(
            "{}",
            if sink.drop_checkpoint().await? {
                format!("deleted the checkpoint of slot {slot} from Neo4j")
            } else {
                format!("Neo4j had no checkpoint for slot {slot}")
            }
        );
    }
    Ok(())
}
