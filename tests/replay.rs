//! `walgraph replay`: the graph rebuilt from retained WAL, and the positions
//! Postgres can no longer go back to refused with the oldest one named.

use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, Fixture, SERVICES};

const DDL: &str = "CREATE TABLE {s}.items (id int PRIMARY KEY, val int NOT NULL);";

const MAPPING: &str = r#"
[[node]]
table = "{s}.items"
label = "{p}Item"
"#;

async fn graph(fx: &Fixture) -> serde_json::Value {
    json!(
        fx.cypher("MATCH (i:{p}Item) RETURN i.id AS id, i.val AS val ORDER BY id")
            .await
    )
}

async fn postgres(fx: &Fixture) -> serde_json::Value {
    let rows = fx
        .pg
        .query(
            &format!("SELECT id, val FROM {}.items ORDER BY id", fx.schema),
            &[],
        )
        .await
        .expect("rows");
    json!(rows
        .iter()
        .map(|r| json!({"id": r.get::<_, i32>(0), "val": r.get::<_, i32>(1)}))
        .collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_an_lsn_reproduces_the_graph_and_refuses_what_the_slot_no_longer_holds() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    let config = fx.config_file("replay.toml", "replay_window_mib = 4096\n", MAPPING);
    // The window belongs in [postgres]: the file starts with that section.
    let config = config.to_string_lossy().into_owned();
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replacen("replay_window_mib = 4096\n", "", 1).replacen(
        "[postgres]\n",
        "[postgres]\nreplay_window_mib = 4096\n",
        1,
    );
    std::fs::write(&config, text).expect("config");

    let mut run = fx.spawn(&["--config", &config, "run"]);
    let from = fx.wal_lsn().await;
    fx.sql(
        "INSERT INTO {s}.items SELECT g, g FROM generate_series(1, 100) g;
         UPDATE {s}.items SET val = val * 10 WHERE id % 3 = 0;
         DELETE FROM {s}.items WHERE id % 10 = 7;",
    )
    .await;
    let want = postgres(&fx).await;
    eventually(
        Duration::from_secs(60),
        "the changes in the graph",
        || async { (graph(&fx).await == want).then_some(()) },
    )
    .await;

    let busy = fx
        .walgraph(&["--config", &config, "replay", "--from", &from.to_string()])
        .await;
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    run.start_kill().expect("stop run");
    let _ = run.wait().await;
    let checkpoint = fx.checkpoint().await.expect("a checkpoint");
    let confirmed = fx.confirmed_flush().await;
    assert!(
        confirmed <= from,
        "the replay window kept the slot at {confirmed}, before {from}"
    );

    // Behind walgraph's back: nodes removed, a property changed.
    fx.cypher_write("MATCH (i:{p}Item) WHERE i.id <= 40 DETACH DELETE i")
        .await;
    fx.cypher_write("MATCH (i:{p}Item {id: 60}) SET i.val = -1")
        .await;
    assert_ne!(graph(&fx).await, want);

    let out = fx
        .walgraph(&["--config", &config, "replay", "--from", &from.to_string()])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("replayed"), "{stdout}");
    assert_eq!(graph(&fx).await, want, "the replay rebuilt the graph");
    assert_eq!(
        fx.checkpoint().await,
        Some(checkpoint),
        "checkpoint unchanged"
    );
    assert_eq!(fx.confirmed_flush().await, confirmed, "slot unchanged");

    // Before what the slot holds: refused, naming the oldest position.
    let early = fx
        .walgraph(&["--config", &config, "replay", "--from", "0/1"])
        .await;
    let stderr = String::from_utf8_lossy(&early.stderr);
    assert!(!early.status.success());
    assert!(
        stderr.contains("oldest position it can replay from is"),
        "{stderr}"
    );
    // A malformed LSN is a usage error.
    let bad = fx
        .walgraph(&["--config", &config, "replay", "--from", "nonsense"])
        .await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("an LSN looks like"));
    fx.cleanup().await;
}
