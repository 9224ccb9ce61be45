//! The live status page at `/`, in a real headless browser (Debian's
//! Chromium, driven over the DevTools protocol): the page loads, the charts
//! draw, and the values move while changes stream.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{eventually, free_address, Fixture, SERVICES};

const DDL: &str = "CREATE TABLE {s}.items (id int PRIMARY KEY, qty int NOT NULL);";
const MAPPING: &str = "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Headless Chromium with one page, spoken to over DevTools.
struct Browser {
    _child: tokio::process::Child,
    ws: Socket,
    next: u64,
    dir: std::path::PathBuf,
}

/// GET over plain TCP with the Host header DevTools accepts; its server
/// keeps the connection open, so the body is read to its Content-Length.
async fn devtools_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut got: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse().ok())?;
            if body.len() >= length {
                return Some(body.to_string());
            }
        }
    }
}

impl Browser {
    async fn launch() -> Browser {
        let port = free_address().port();
        let dir =
            std::env::temp_dir().join(format!("walgraph-chromium-{}-{port}", std::process::id()));
        let child = tokio::process::Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1280,1150",
                &format!("--remote-debugging-port={port}"),
                &format!("--user-data-dir={}", dir.display()),
                "about:blank",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium (deploy/local/services tools installs it)");
        let addr = format!("127.0.0.1:{port}");
        let url = eventually(Duration::from_secs(30), "Chromium's DevTools", || async {
            let list: Value =
                serde_json::from_str(&devtools_get(&addr, "/json/list").await?).ok()?;
            list.as_array()?
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                .map(str::to_string)
        })
        .await;
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("the DevTools socket");
        Browser {
            _child: child,
            ws,
            next: 0,
            dir,
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(Message::text(msg))
            .await
            .expect("send to DevTools");
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("DevTools did not answer {method}"))
                .expect("DevTools socket open")
                .expect("a DevTools message");
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Ink on a chart's canvas: pixels not fully transparent.
fn inked(chart: &str) -> String {
    format!(
        "(() => {{ const c = document.querySelector('#chart-{chart} canvas'); if (!c) return 0; \
         const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0; \
         for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }})()"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_loads_draws_its_charts_and_moves_while_changes_stream() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    let addr = free_address();
    let config = fx.config_file(
        "page.toml",
        "heartbeat = \"1s\"\n[http]\nlisten = \"ADDR\"\n"
            .replace("ADDR", &addr.to_string())
            .as_str(),
        MAPPING,
    );
    let _run = tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
        .args(["--config", &config.to_string_lossy(), "run"])
        .envs(fx.env.vars())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start walgraph run");
    eventually(
        Duration::from_secs(30),
        "walgraph to serve /ready",
        || async {
            crate::support::http_get(&addr.to_string(), "/ready")
                .await
                .filter(|(code, _)| *code == 200)
        },
    )
    .await;

    let mut b = Browser::launch().await;
    b.call("Page.enable", json!({})).await;
    b.call("Page.navigate", json!({"url": format!("http://{addr}/")}))
        .await;
    let mut updates = 0;
    for _ in 0..100 {
        updates = b
            .eval("Number(document.body && document.body.dataset.updates || 0)")
            .await
            .as_i64()
            .unwrap_or(0);
        if updates >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(updates >= 2, "the page receives live updates");
    assert_eq!(b.eval("document.title").await, json!("walgraph"));
    assert_eq!(
        b.eval("document.getElementById('state').textContent").await,
        json!("streaming")
    );
    assert_eq!(
        b.eval("document.querySelectorAll('canvas').length").await,
        json!(3)
    );
    let before = b
        .eval("document.getElementById('changes').textContent")
        .await;
    assert_eq!(before, json!("0"));

    // Changes stream: the numbers move and the throughput chart draws them.
    for round in 0..10 {
        fx.sql(&format!(
            "INSERT INTO {{s}}.items SELECT g, g FROM generate_series({}, {}) g",
            round * 100 + 1,
            round * 100 + 100
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut shown = String::new();
    for _ in 0..100 {
        shown = b
            .eval("document.getElementById('changes').textContent")
            .await
            .as_str()
            .unwrap_or("")
            .to_string();
        if shown == "1,000" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(shown, "1,000", "the page shows every change applied");
    let peak = b
        .eval("Math.max(...window.walgraphCharts.rate.data[1])")
        .await
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        peak > 0.0,
        "the throughput chart holds the changes/s: {peak}"
    );
    let latency = b
        .eval("document.getElementById('latency').textContent")
        .await;
    assert!(
        latency.as_str().is_some_and(|l| l.contains("p99")),
        "{latency}"
    );
    for chart in ["rate", "latency", "lag"] {
        let ink = b.eval(&inked(chart)).await.as_i64().unwrap_or(0);
        assert!(ink > 1000, "the {chart} chart is drawn ({ink} pixels)");
    }
    let heartbeat = b
        .eval("document.getElementById('heartbeat').textContent")
        .await;
    assert!(
        heartbeat
            .as_str()
            .is_some_and(|h| h.ends_with("heartbeat)") || h.ends_with("heartbeats)")),
        "{heartbeat}"
    );

    // A screenshot for the docs (docs/status-page.png is one).
    let shot = b
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        shot["data"].as_str().expect("screenshot data"),
    )
    .expect("base64");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&out, &png).expect("write the screenshot");
    fx.cleanup().await;
}
