//! HTTP for operators: `/health` (the process runs), `/ready` (it streams),
//! `/metrics` (OpenMetrics), and the live status page: `/` (the page, its
//! assets built into the binary), `/api/status` (its data as JSON) and
//! `/events` (the same every second, as server-sent events). A
//! deliberately small HTTP/1.1 responder: GET only, one response per
//! connection, no keep-alive. It only serves what [`crate::metrics`]
//! holds; the stages never import it.
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
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await;
            let Ok(Ok(n)) = read else { return };
            let request = String::from_utf8_lossy(&buf[..n]);
            let mut words = request.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            if (method, path) == ("GET", "/events") {
                events(&mut socket, &metrics, &mut stop).await;
                return;
            }
            let (status, body, kind) = match (method, path) {
                ("GET", "/") => ("200 OK", PAGE.to_string(), "text/html; charset=utf-8"),
                ("GET", "/assets/uPlot.iife.min.js") => (
                    "200 OK",
                    UPLOT_JS.to_string(),
                    "text/javascript; charset=utf-8",
                ),
                ("GET", "/assets/uPlot.min.css") => {
                    ("200 OK", UPLOT_CSS.to_string(), "text/css; charset=utf-8")
                }
                ("GET", "/api/status") => (
                    "200 OK",
                    status_json(&metrics, &metrics.latency_now()).to_string(),
                    "application/json",
                ),
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

/// The status page and the charting library it uses (uPlot, MIT licence,
/// `http_assets/uPlot.LICENSE`), built into the binary.
const PAGE: &str = include_str!("http_assets/status.html");
const UPLOT_JS: &str = include_str!("http_assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("http_assets/uPlot.min.css");

/// The page's data: what the metrics hold, and the last warnings and
/// errors logged.
fn status_json(metrics: &Metrics, window: &crate::metrics::Latency) -> serde_json::Value {
    let mut v = metrics.status_json(window);
    v["recent"] = serde_json::json!(crate::recent::entries());
    v
}

/// How many seconds of latency the page's live figure covers.
const LATENCY_WINDOW: usize = 10;

/// `/events`: the status as a server-sent event every second until the
/// client goes or walgraph stops; the latency covers the last
/// [`LATENCY_WINDOW`] seconds.
async fn events(socket: &mut tokio::net::TcpStream, metrics: &Metrics, stop: &mut Shutdown) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: keep-alive\r\n\r\nretry: 2000\n\n";
    if socket.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut seen = std::collections::VecDeque::new();
    seen.push_back(metrics.latency_now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let now = metrics.latency_now();
        let window = seen
            .front()
            .map_or_else(|| now.clone(), |old| now.since(old));
        seen.push_back(now);
        if seen.len() > LATENCY_WINDOW {
            seen.pop_front();
        }
        let event = format!("data: {}\n\n", status_json(metrics, &window));
        if socket.write_all(event.as_bytes()).await.is_err() {
            return;
        }
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
