//! `walgraph run`: the sidecar — the [pipeline](crate::pipeline) until a
//! signal, and the HTTP endpoints serving its [metrics](crate::metrics).
//!
//! Invariants:
//! - SIGTERM stops reading, lets the in-flight batch finish and confirms
//!   what committed before exiting 0;
//! - SIGHUP reads the configuration file again; a file that does not load,
//!   or a mapping that does not compile against the catalog, changes
//!   nothing (one sentence in the log). Otherwise the pipeline stops as on
//!   SIGTERM and starts again with the new configuration — which follows a
//!   changed mapping like a restart does. `[http]` is read only at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::http;
use crate::metrics::Metrics;
use crate::shutdown;

/// `walgraph run`: the pipeline until SIGTERM or Ctrl-C, with HTTP when
/// `[http] listen` is set; SIGHUP reloads the configuration from `path`.
pub async fn command(cfg: &Config, path: Option<&Path>, null_sink: bool) -> anyhow::Result<()> {
    let rx = shutdown::on_signal(Some("shutdown requested"));
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = cfg.http.listen {
        let listener = http::bind(addr).await?;
        tracing::info!(%addr, "serving /health, /ready and /metrics");
        tokio::spawn(http::serve(listener, Arc::clone(&metrics), rx.clone()));
    }
    if null_sink {
        tracing::warn!("null sink: changes are read, confirmed and dropped; the graph misses them");
    }
    let mut reloads = Reloads::new(path.map(Path::to_path_buf));
    let mut cfg = cfg.clone();
    loop {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut pipeline = Box::pin(crate::pipeline::run_with(
            &cfg,
            stop_rx,
            Arc::clone(&metrics),
            null_sink,
        ));
        let mut shutdown = rx.clone();
        // Runs until shutdown, or until a reload gives a configuration
        // worth restarting for.
        let next = loop {
            tokio::select! {
                r = &mut pipeline => {
                    r?;
                    return Ok(());
                }
                _ = shutdown::requested(&mut shutdown) => {
                    // The pipeline sees the same signal through `stop`.
                    let _ = stop_tx.send(true);
                    pipeline.await?;
                    return Ok(());
                }
                new = reloads.next(&cfg) => {
                    if let Some(new) = new {
                        break new;
                    }
                }
            }
        };
        let _ = stop_tx.send(true);
        pipeline.await?;
        // A configuration that loads and compiles may still fail the
        // checks before streaming (a constraint `setup` has not made yet):
        // then nothing of it has been done, and the one before goes on.
        match crate::pipeline::prepare_with(&next, null_sink).await {
            Ok(_) => {
                tracing::info!("configuration reloaded; streaming with it");
                cfg = next;
            }
            Err(e) => tracing::error!(
                "the reloaded configuration cannot run ({}); walgraph goes on with the one it had",
                crate::error_sentence(&anyhow::Error::new(e))
            ),
        }
    }
}

/// SIGHUPs, each turned into the configuration to run with next.
struct Reloads {
    path: Option<PathBuf>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Reloads {
    fn new(path: Option<PathBuf>) -> Reloads {
        Reloads {
            path,
            #[cfg(unix)]
            hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// Waits for a SIGHUP and reads the configuration again: `Some` when it
    /// loads and its mapping compiles against the catalog; `None` (said in
    /// the log) otherwise.
    async fn next(&mut self, running: &Config) -> Option<Config> {
        #[cfg(unix)]
        match self.hup.as_mut() {
            Some(hup) => {
                hup.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
        tracing::info!("SIGHUP: reading the configuration again");
        let Some(path) = &self.path else {
            tracing::warn!("no configuration file was given (--config); nothing to reload");
            return None;
        };
        let new = match Config::load(Some(path)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    "the configuration is not reloaded: {}; walgraph goes on with the one it had",
                    crate::error_sentence(&anyhow::Error::new(e))
                );
                return None;
            }
        };
        if let Err(e) = compiles(&new).await {
            tracing::error!(
                "the configuration is not reloaded: {e}; walgraph goes on with the one it had"
            );
            return None;
        }
        if new.http.listen != running.http.listen {
            tracing::warn!("[http] listen is read only at start; restart walgraph to change it");
        }
        Some(new)
    }
}

/// Whether `cfg`'s mapping compiles against the catalog now.
async fn compiles(cfg: &Config) -> Result<(), String> {
    let info = crate::source::ConnInfo::of(&cfg.postgres).map_err(|e| e.to_string())?;
    let pg = crate::source::catalog::PgClient::connect(&info)
        .await
        .map_err(|e| crate::error_sentence(&anyhow::Error::new(e)))?;
    crate::pipeline::compile_mapping(&pg, cfg)
        .await
        .map(|_| ())
        .map_err(|e| crate::error_sentence(&anyhow::Error::new(e)))
}
