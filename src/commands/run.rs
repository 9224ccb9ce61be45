//! `walgraph run`: the sidecar — the [pipeline](crate::pipeline) until a
//! signal, and the HTTP endpoints serving its [metrics](crate::metrics).
//!
//! Invariant: SIGTERM stops reading, lets the in-flight batch finish and
//! confirms what committed before exiting 0.

use std::sync::Arc;

use crate::config::Config;
use crate::http;
use crate::metrics::Metrics;
use crate::shutdown;

/// `walgraph run`: the pipeline until SIGTERM or Ctrl-C, with HTTP when
/// `[http] listen` is set.
pub async fn command(cfg: &Config, null_sink: bool) -> anyhow::Result<()> {
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
    crate::pipeline::run_with(cfg, rx, metrics, null_sink).await?;
    Ok(())
}
