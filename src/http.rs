//! HTTP for operators: `/health` (the process runs), `/ready` (it streams)
//! and `/metrics` (Prometheus text format). A deliberately small HTTP/1.1
//! responder: GET only, one response per connection, no keep-alive. It only
//! serves what [`crate::metrics`] holds; the stages never import it.
//!
//! Invariant: a request never blocks the pipeline; a slow client times out.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

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
                ("GET", "/ready") if metrics.is_ready() => {
                    ("200 OK", "ready\n".to_string(), "text/plain")
                }
                ("GET", "/ready") if metrics.batch_stuck.load(Ordering::Relaxed) => (
                    "503 Service Unavailable",
                    format!(
                        "stuck: a batch has failed for {:.0} s\n",
                        metrics
                            .batch_failing_for()
                            .unwrap_or_default()
                            .as_secs_f64()
                    ),
                    "text/plain",
                ),
                ("GET", "/ready") => (
                    "503 Service Unavailable",
                    "not streaming\n".to_string(),
                    "text/plain",
                ),
                ("GET", "/metrics") => (
                    "200 OK",
                    metrics.render(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
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

/// GETs `/metrics` from a walgraph process serving HTTP at `addr`.
pub async fn scrape(addr: &str) -> Option<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

/// The value of the sample `name` (with its labels, if any) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
