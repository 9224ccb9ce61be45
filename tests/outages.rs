//! Database outages while `run` is active: walgraph retries, confirms
//! nothing new while Neo4j cannot commit, and loses nothing.
//!
//! These tests stop and start the shared databases, so they hold
//! [`SERVICES`] for writing and run alone.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, free_address, http_get, Fixture, SERVICES};

fn services(cmd: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/services");
    let out = Command::new(script)
        .arg(cmd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run deploy/local/services {cmd}: {e}"));
    assert!(
        out.status.success(),
        "deploy/local/services {cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const DDL: &str = "CREATE TABLE {s}.items (id int PRIMARY KEY, qty int NOT NULL);";
const MAPPING: &str = r#"
[[node]]
table = "{s}.items"
label = "{p}Item"
"#;

async fn items(fx: &Fixture) -> Vec<serde_json::Value> {
    fx.cypher("MATCH (n:{p}Item) RETURN n.id AS id, n.qty AS qty ORDER BY id")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neo4j_outage_while_running_is_retried_and_loses_nothing() {
    let _exclusive = SERVICES.write().await;
    let mut fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    let addr = free_address();
    fx.config.http.listen = Some(addr);
    fx.config.neo4j.stuck_after = Duration::from_secs(2);
    let addr = addr.to_string();
    let run = fx.start_serving().await;
    fx.sql("INSERT INTO {s}.items SELECT g, g FROM generate_series(1, 50) g")
        .await;
    eventually(Duration::from_secs(30), "the first rows", || async {
        (items(&fx).await.len() == 50).then_some(())
    })
    .await;
    let before = fx.checkpoint().await.expect("a checkpoint");

    services("stop-neo4j");
    fx.sql("UPDATE {s}.items SET qty = qty + 1000; INSERT INTO {s}.items VALUES (51, 51)")
        .await;
    // Neo4j cannot commit, so Postgres must not hear of anything new, and
    // walgraph keeps retrying rather than giving up or hanging.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        fx.confirmed_flush().await <= before,
        "the slot was confirmed past the last Neo4j commit during the outage"
    );
    assert!(
        !run.handle.is_finished(),
        "walgraph gave up while Neo4j was down"
    );
    // A batch failing past neo4j.stuck_after is reported: /ready, the
    // metrics, and `status` (which says why it cannot read the graph).
    let body = eventually(Duration::from_secs(30), "/ready to say stuck", || async {
        http_get(&addr, "/ready")
            .await
            .filter(|(code, body)| *code == 503 && body.starts_with("stuck"))
            .map(|r| r.1)
    })
    .await;
    let metrics = http_get(&addr, "/metrics").await.expect("metrics").1;
    assert_eq!(
        walgraph::http::metric(&metrics, "walgraph_batch_stuck"),
        Some(1.0),
        "{body}{metrics}"
    );
    assert!(
        walgraph::http::metric(&metrics, "walgraph_batch_failing_seconds").unwrap_or(0.0) >= 2.0,
        "{metrics}"
    );
    let status = walgraph::commands::status::collect(&fx.config, 0)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "status while Neo4j is down: {}",
                walgraph::error_sentence(&e)
            )
        });
    assert!(
        status.process.as_ref().is_some_and(|p| p.batch_stuck) && status.neo4j_error.is_some(),
        "status shows the stuck batch and the unreadable graph: {status:?}"
    );
    let text = walgraph::commands::status::render(&status);
    assert!(text.contains("STUCK"), "{text}");

    services("start-neo4j");
    eventually(
        Duration::from_secs(90),
        "the changes made during the outage",
        || async {
            let rows = items(&fx).await;
            let ok = rows.len() == 51
                && rows.iter().all(|r| {
                    let id = r["id"].as_i64().unwrap_or(0);
                    r["qty"].as_i64() == Some(if id == 51 { 51 } else { id + 1000 })
                });
            ok.then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "/ready to answer 200 again",
        || async {
            http_get(&addr, "/ready")
                .await
                .filter(|(code, _)| *code == 200)
        },
    )
    .await;
    let metrics = http_get(&addr, "/metrics").await.expect("metrics").1;
    assert_eq!(
        walgraph::http::metric(&metrics, "walgraph_batch_stuck"),
        Some(0.0)
    );
    assert_eq!(
        walgraph::http::metric(&metrics, "walgraph_batch_failing_seconds"),
        Some(0.0)
    );
    run.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_while_running_reconnects_and_resumes() {
    let _exclusive = SERVICES.write().await;
    let mut fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    let run = fx.start();
    fx.sql("INSERT INTO {s}.items VALUES (1, 1)").await;
    eventually(Duration::from_secs(30), "the first row", || async {
        (items(&fx).await.len() == 1).then_some(())
    })
    .await;

    services("restart-postgres");
    // The fixture's own connection died with the server.
    fx.reconnect().await;
    fx.sql("INSERT INTO {s}.items VALUES (2, 2)").await;
    eventually(
        Duration::from_secs(60),
        "the row written after the restart",
        || async {
            (items(&fx).await == vec![json!({"id": 1, "qty": 1}), json!({"id": 2, "qty": 2})])
                .then_some(())
        },
    )
    .await;
    run.stop().await;
    fx.cleanup().await;
}
