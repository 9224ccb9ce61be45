//! The commands around the pipeline. Each module is one `walgraph` command
//! (or a part of one) and reuses the stages and the pipeline below it; none
//! of them is imported by anything but [`crate::cli`] and its siblings.
//!
//! - [`setup`], [`teardown`]: publication, slot, Neo4j schema;
//! - [`run`]: the sidecar (pipeline + HTTP); [`replay`]: retained WAL again;
//! - [`snapshot`]: the initial copy (pipeline's copy + batcher + sink);
//! - [`reconcile`]: graph against tables, and repairs;
//! - [`status`], [`peek`]: what the slot, the checkpoint and the stream hold;
//! - [`bench`]: the benchmark harness; [`infer`]: a mapping from the catalog;
//! - [`progress`]: the progress bar or log lines of long commands.

use crate::config::Config;
use crate::source::ConnInfo;

pub mod bench;
pub mod infer;
pub mod peek;
pub mod progress;
pub mod reconcile;
pub mod replay;
pub mod run;
pub mod setup;
pub mod snapshot;
pub mod status;
pub mod teardown;

/// The Postgres connection settings of `cfg`.
pub fn conninfo(cfg: &Config) -> anyhow::Result<ConnInfo> {
    Ok(ConnInfo::of(&cfg.postgres)?)
}
