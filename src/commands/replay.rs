//! `walgraph replay --from LSN [--to LSN]`: the pipeline's
//! [replay](crate::pipeline::replay) between two positions, up to the
//! checkpoint by default.
//!
//! Invariant: confirms nothing and leaves the checkpoint where it is.

use crate::config::Config;
use crate::lsn::Lsn;
use crate::pipeline::{replay, ReplayRange};
use crate::shutdown;
use crate::sink::Sink;

/// Replays, then says how many changes it applied.
pub async fn command(cfg: &Config, from: Lsn, to: Option<Lsn>) -> anyhow::Result<()> {
    let to = match to {
        Some(to) => to,
        None => Sink::connect(&cfg.neo4j, &cfg.postgres.slot)
            .await?
            .read_checkpoint()
            .await?
            .map(|c| c.lsn)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "there is no checkpoint for slot {} yet, so nothing to replay up to; give --to",
                    cfg.postgres.slot
                )
            })?,
    };
    let n = replay(cfg, ReplayRange { from, to }, shutdown::on_signal(None)).await?;
    println!("replayed {n} changes of the transactions ending after {from} and at or before {to}");
    Ok(())
}
