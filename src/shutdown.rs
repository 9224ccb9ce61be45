//! Shutdown: a signal that flips once, from SIGTERM or Ctrl-C, and that every
//! long-running task watches.
//!
//! Invariant: once requested, a shutdown stays requested; a task that waits
//! for it after its sender is gone waits forever rather than waking falsely.

use tokio::sync::watch;

/// A shutdown signal: flips to `true` once.
pub type Shutdown = watch::Receiver<bool>;

/// Resolves when `rx` has flipped (at once if it already has).
pub async fn requested(rx: &mut Shutdown) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            // The sender is gone: nobody can ask any more, so never resolve.
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A [`Shutdown`] that flips on SIGTERM or Ctrl-C (logged as `log`, if given).
pub fn on_signal(log: Option<&'static str>) -> Shutdown {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        signal().await;
        if let Some(msg) = log {
            tracing::info!("{msg}");
        }
        let _ = tx.send(true);
    });
    rx
}
