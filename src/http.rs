//! HTTP for operators: `/health` (the process runs), `/ready` (it streams)
//! and `/metrics` (Prometheus text format). A deliberately small HTTP/1.1
//! responder: GET only, one response per connection, no keep-alive.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::lsn::Lsn;
use crate::pipeline::Shutdown;

/// What the running pipeline reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Replication is streaming.
    pub ready: AtomicBool,
    /// Row changes committed to Neo4j.
    pub changes: AtomicU64,
    /// Source transactions committed to Neo4j.
    pub transactions: AtomicU64,
    /// Neo4j transactions (batches) committed.
    pub batches: AtomicU64,
    /// Batch attempts that failed transiently and were retried.
    pub retries: AtomicU64,
    /// The position confirmed to Postgres.
    pub flushed_lsn: AtomicU64,
    /// The server's WAL end, as last heard.
    pub server_wal_lsn: AtomicU64,
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let flushed = get(&self.flushed_lsn);
        let server = get(&self.server_wal_lsn);
        let lag = Lsn::new(server).bytes_since(Lsn::new(flushed));
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        };
        metric(
            "walgraph_ready",
            "gauge",
            "1 while replication is streaming.",
            u64::from(self.ready.load(Ordering::Relaxed)),
        );
        metric(
            "walgraph_changes_applied_total",
            "counter",
            "Row changes committed to Neo4j.",
            get(&self.changes),
        );
        metric(
            "walgraph_transactions_applied_total",
            "counter",
            "Source transactions committed to Neo4j.",
            get(&self.transactions),
        );
        metric(
            "walgraph_batches_committed_total",
            "counter",
            "Neo4j transactions committed.",
            get(&self.batches),
        );
        metric(
            "walgraph_batch_retries_total",
            "counter",
            "Batch writes retried after a transient failure.",
            get(&self.retries),
        );
        metric(
            "walgraph_flushed_lsn",
            "gauge",
            "WAL position confirmed to Postgres.",
            flushed,
        );
        metric(
            "walgraph_server_wal_lsn",
            "gauge",
            "The server's WAL end, as last heard.",
            server,
        );
        metric(
            "walgraph_lag_bytes",
            "gauge",
            "Bytes of WAL between the server's end and the confirmed position.",
            lag,
        );
        out
    }
}

/// Serves until `shutdown` flips.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, mut shutdown: Shutdown) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            a = listener.accept() => a,
        };
        let Ok((mut socket, _)) = accepted else {
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await;
            let Ok(Ok(n)) = read else { return };
            let request = String::from_utf8_lossy(&buf[..n]);
            let mut words = request.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, body, kind) = match (method, path) {
                ("GET", "/health") => ("200 OK", "ok\n".to_string(), "text/plain"),
                ("GET", "/ready") if metrics.ready.load(Ordering::Relaxed) => {
                    ("200 OK", "ready\n".to_string(), "text/plain")
                }
                ("GET", "/ready") => (
                    "503 Service Unavailable",
                    "not streaming\n".to_string(),
                    "text/plain",
                ),
                ("GET", "/metrics") => ("200 OK", metrics.render(), "text/plain; version=0.0.4"),
                ("GET", _) => ("404 Not Found", "not found\n".to_string(), "text/plain"),
                _ => (
                    "405 Method Not Allowed",
                    "GET only\n".to_string(),
                    "text/plain",
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// Binds the listener, with a sentence when the address is unusable.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for HTTP ({e}); choose another http.listen")
    })
}
