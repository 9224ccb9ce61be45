//! Failover slots (issue 12, item 3): on PostgreSQL 17+ walgraph's slot is
//! a failover slot, a physical standby keeps a copy of it, and after the
//! standby is promoted walgraph goes on from it with nothing lost and
//! nothing applied twice; before 17, `setup` refuses `postgres.failover`
//! with a sentence.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use walgraph::config::Config;

use crate::support::{eventually, pg, Fixture, SERVICES};

const DDL: &str = "CREATE TABLE {s}.items (id int PRIMARY KEY, qty int NOT NULL);
    INSERT INTO {s}.items SELECT g, 0 FROM generate_series(1, 500) g;";
const MAPPING: &str = "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n";

fn standby(cmd: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/services");
    let out = Command::new(script)
        .args(["standby-postgres", cmd])
        .output()
        .unwrap_or_else(|e| panic!("cannot run deploy/local/services: {e}"));
    assert!(
        out.status.success(),
        "deploy/local/services standby-postgres {cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Writes to `url` until told to stop: updates, deletes and inserts.
fn writer(
    url: String,
    schema: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let env = crate::support::Env {
            pg_url: url,
            ..crate::support::env()
        };
        let pg = pg(&env).await;
        let mut i: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let id = fastrand::i64(1..=600);
            let sql = match i % 4 {
                0 => format!("DELETE FROM {schema}.items WHERE id = {id}"),
                1 => format!(
                    "INSERT INTO {schema}.items VALUES ({id}, {i}) ON CONFLICT (id) DO UPDATE SET qty = EXCLUDED.qty"
                ),
                _ => format!("UPDATE {schema}.items SET qty = qty + 1 WHERE id = {id}"),
            };
            if pg.batch_execute(&sql).await.is_ok() {
                done.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

async fn differs(cfg: &Config) -> Option<String> {
    let report = crate::backfill::reconcile_report(cfg).await;
    report
        .iter()
        .any(|t| t.differs())
        .then(|| format!("{report:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_goes_on_from_a_promoted_standby_with_nothing_lost_or_applied_twice() {
    Box::pin(scenario()).await;
}

async fn scenario() {
    // The standby changes the primary's settings for failover slots.
    let _exclusive = SERVICES.write().await;
    let mut fx = Fixture::new(DDL, MAPPING).await;
    fx.config.postgres.failover = true;
    if fx.server_version().await < 170_000 {
        let refused = walgraph::commands::setup::setup(&fx.config)
            .await
            .map(|_| ())
            .expect_err("postgres.failover is refused before PostgreSQL 17");
        let sentence = walgraph::error_sentence(&refused);
        assert!(sentence.contains("PostgreSQL 17"), "{sentence}");
        let slots: i64 = fx
            .pg
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&fx.config.postgres.slot],
            )
            .await
            .expect("slots")
            .get(0);
        assert_eq!(slots, 0, "nothing created before the refusal");
        fx.cleanup().await;
        return;
    }
    // An existing slot is made a failover slot by `setup`.
    fx.config.postgres.failover = false;
    fx.setup().await;
    fx.config.postgres.failover = true;
    let lines = fx.setup().await;
    assert!(
        lines.iter().any(|l| l.contains("failover slot now")),
        "{lines:?}"
    );
    let st = walgraph::commands::status::collect(&fx.config, 0)
        .await
        .unwrap_or_else(|e| panic!("status: {}", walgraph::error_sentence(&e)));
    assert_eq!(st.failover, Some(true), "status shows the failover slot");
    assert_eq!(st.invalidation_reason, None);

    crate::backfill::take_snapshot(&fx.config).await;
    let port = standby("up");
    let standby_url = fx.env.pg_url.replace(
        &format!(":{}/", url_port(&fx.env.pg_url)),
        &format!(":{port}/"),
    );
    let result = async {
        // Under load on the primary, killed in the middle.
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let w = writer(
            fx.env.pg_url.clone(),
            fx.schema.clone(),
            Arc::clone(&stop),
            Arc::clone(&done),
        );
        let run = fx.start();
        let standby_env = crate::support::Env {
            pg_url: standby_url.clone(),
            ..crate::support::env()
        };
        let on_standby = pg(&standby_env).await;
        // The standby keeps a synchronized copy of the slot.
        let slot = fx.config.postgres.slot.clone();
        eventually(
            Duration::from_secs(120),
            "the standby to hold a synchronized copy of the slot",
            || async {
                let row = on_standby
                    .query_opt(
                        "SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await
                    .ok()
                    .flatten()?;
                row.get::<_, Option<bool>>(0).filter(|s| *s)
            },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        run.handle.abort();
        let _ = run.handle.await;
        stop.store(true, Ordering::Relaxed);
        w.await.expect("writer");
        assert!(done.load(Ordering::Relaxed) > 0);

        // The standby becomes the primary; walgraph goes there.
        standby("promote");
        let mut cfg = fx.config.clone();
        cfg.postgres.url = Some(standby_url.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let w = writer(
            standby_url.clone(),
            fx.schema.clone(),
            Arc::clone(&stop),
            Arc::clone(&done),
        );
        let (tx, rx) = tokio::sync::watch::channel(false);
        let run_cfg = cfg.clone();
        let handle = tokio::spawn(async move { walgraph::pipeline::run(&run_cfg, rx).await });
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        w.await.expect("writer");
        eventually(
            Duration::from_secs(90),
            "the graph to equal the promoted standby",
            || async { differs(&cfg).await.is_none().then_some(()) },
        )
        .await;
        assert!(
            !handle.is_finished(),
            "run streams from the promoted standby"
        );
        let _ = tx.send(true);
        let ended = handle.await.expect("run task");
        assert!(ended.is_ok(), "{ended:?}");
        // Nothing applied twice: every node is one row of the new primary,
        // with its quantity.
        let rows: i64 = on_standby
            .query_one(&format!("SELECT count(*) FROM {}.items", fx.schema), &[])
            .await
            .expect("rows")
            .get(0);
        let nodes = fx
            .cypher("MATCH (n:{p}Item) RETURN count(n) AS n")
            .await
            .first()
            .and_then(|r| r["n"].as_i64())
            .unwrap_or(-1);
        assert_eq!(nodes, rows);
        let _ = on_standby
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await;
    };
    Box::pin(result).await;
    standby("down");
    fx.cleanup().await;
}

fn url_port(url: &str) -> String {
    url.rsplit_once(':')
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(port, _)| port.to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_the_server_invalidated_for_standing_idle_is_explained_never_streamed() {
    // Exclusive: the timeout applies to every slot of the server.
    let _exclusive = SERVICES.write().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    crate::backfill::take_snapshot(&fx.config).await;
    let config = fx.config_file("idle.toml", "", MAPPING);
    let config = config.to_string_lossy().into_owned();
    let status = || async {
        let out = fx
            .walgraph(&["--config", &config, "status", "--json"])
            .await;
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_else(|e| {
            panic!("status JSON: {e}: {}", String::from_utf8_lossy(&out.stderr))
        })
    };
    if fx.server_version().await < 180_000 {
        // No such setting before 18.
        let s = status().await;
        assert!(s["idle_slot_timeout_seconds"].is_null(), "{s}");
        fx.cleanup().await;
        return;
    }
    let admin = pg(&fx.env).await;
    for sql in [
        "ALTER SYSTEM SET idle_replication_slot_timeout = '1s'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("set the timeout");
    }
    let s = eventually(
        Duration::from_secs(10),
        "status to show the timeout",
        || async {
            let s = status().await;
            (s["idle_slot_timeout_seconds"] == serde_json::json!(1)).then_some(s)
        },
    )
    .await;
    assert!(s["invalidation_reason"].is_null(), "{s}");
    // Idle past the timeout; the checkpoint invalidates it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let checkpoint = admin.batch_execute("CHECKPOINT").await;
    for sql in [
        "ALTER SYSTEM RESET idle_replication_slot_timeout",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("reset the timeout");
    }
    checkpoint.expect("CHECKPOINT");
    let s = status().await;
    assert_eq!(s["invalidation_reason"], "idle_timeout", "{s}");
    let text = fx.walgraph(&["--config", &config, "status"]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("INVALIDATED            idle_timeout"),
        "{text}"
    );

    // `run` says what happened and what to do, and writes nothing.
    fx.sql("UPDATE {s}.items SET qty = 99 WHERE id = 1").await;
    let refused = fx.walgraph(&["--config", &config, "run"]).await;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "run must refuse: {err}");
    assert!(
        err.contains("was invalidated (it stayed idle longer than the server's idle_replication_slot_timeout)")
            && err.contains("walgraph snapshot --restart"),
        "{err}"
    );
    let qty = fx
        .cypher(&format!(
            "MATCH (n:{} {{id: 1}}) RETURN n.qty AS q",
            fx.label("Item")
        ))
        .await;
    assert_eq!(qty[0]["q"], serde_json::json!(0), "nothing streamed");
    fx.cleanup().await;
}

/// Takes the standby down however the test ends.
struct StandbyGuard;

impl Drop for StandbyGuard {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/services");
        let _ = Command::new(script)
            .args(["standby-postgres", "down"])
            .output();
    }
}

async fn count(c: &tokio_postgres::Client, sql: &str, slot: &str) -> i64 {
    c.query_one(sql, &[&slot]).await.expect(sql).get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walgraph_streams_from_a_hot_standby_and_writes_only_to_the_primary() {
    Box::pin(from_a_standby()).await;
}

async fn from_a_standby() {
    // Exclusive: the standby copies the whole cluster.
    let _exclusive = SERVICES.write().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    let version = fx.server_version().await;
    let port = standby("up");
    let _down = StandbyGuard;
    let standby_url = fx.env.pg_url.replace(
        &format!(":{}/", url_port(&fx.env.pg_url)),
        &format!(":{port}/"),
    );
    let standby_env = crate::support::Env {
        pg_url: standby_url.clone(),
        ..crate::support::env()
    };
    let on_standby = pg(&standby_env).await;
    let table = format!("{}.items", fx.schema);
    eventually(
        Duration::from_secs(60),
        "the standby to replay the test's table",
        || async {
            on_standby
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
                .await
                .ok()
                .map(|r| r.get::<_, bool>(0))
                .filter(|b| *b)
        },
    )
    .await;
    let mut cfg = fx.config.clone();
    cfg.postgres.url = Some(standby_url.clone());
    let slot = cfg.postgres.slot.clone();
    let slots = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1";
    let setup = |cfg: Config| async move {
        walgraph::commands::setup::setup(&cfg)
            .await
            .map_err(|e| walgraph::error_sentence(&e))
    };
    if version < 160_000 {
        cfg.postgres.primary_url = Some(fx.env.pg_url.clone());
        let refused = setup(cfg.clone())
            .await
            .expect_err("a standby before 16 is refused");
        assert!(refused.contains("PostgreSQL 16"), "{refused}");
        assert_eq!(count(&on_standby, slots, &slot).await, 0);
        drop(_down);
        fx.cleanup().await;
        return;
    }
    // Without a primary to write to: refused, nothing made.
    let refused = setup(cfg.clone())
        .await
        .expect_err("a standby without postgres.primary_url is refused");
    assert!(refused.contains("postgres.primary_url"), "{refused}");
    assert_eq!(count(&on_standby, slots, &slot).await, 0);

    // The publication on the primary, the slot on the standby.
    cfg.postgres.primary_url = Some(fx.env.pg_url.clone());
    let lines = setup(cfg.clone())
        .await
        .unwrap_or_else(|e| panic!("setup: {e}"));
    assert!(
        lines.iter().any(|l| l.contains("created publication")),
        "{lines:?}"
    );
    assert_eq!(
        count(&on_standby, slots, &slot).await,
        1,
        "slot on the standby"
    );
    assert_eq!(
        count(&fx.pg, slots, &slot).await,
        0,
        "no slot on the primary"
    );
    // Read on the standby, under a snapshot exported there.
    crate::backfill::take_snapshot(&cfg).await;

    // Streams from the standby while the primary takes writes, across a
    // kill of walgraph in the middle.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let w = writer(
        fx.env.pg_url.clone(),
        fx.schema.clone(),
        Arc::clone(&stop),
        Arc::clone(&done),
    );
    let start = |cfg: &Config| {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let run_cfg = cfg.clone();
        (
            tx,
            tokio::spawn(async move { walgraph::pipeline::run(&run_cfg, rx).await }),
        )
    };
    let (_tx, handle) = start(&cfg);
    tokio::time::sleep(Duration::from_secs(3)).await;
    handle.abort();
    let _ = handle.await;
    let (tx, handle) = start(&cfg);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    w.await.expect("writer");
    assert!(done.load(Ordering::Relaxed) > 0, "the primary took writes");
    let st = walgraph::commands::status::collect(&cfg, 0)
        .await
        .unwrap_or_else(|e| panic!("status: {}", walgraph::error_sentence(&e)));
    assert!(st.standby, "status says it reads a standby");
    assert!(st.slot_active, "run streams from the standby's slot");
    // The standby replays every write of the primary, and the graph
    // equals the standby.
    let state = format!("SELECT count(*) * 1000003 + coalesce(sum(qty), 0) FROM {table}");
    let on_primary: i64 = fx
        .pg
        .query_one(&state, &[])
        .await
        .expect("primary rows")
        .get(0);
    eventually(
        Duration::from_secs(60),
        "the standby to replay every write",
        || async {
            let replayed: i64 = on_standby.query_one(&state, &[]).await.ok()?.get(0);
            (replayed == on_primary).then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(90),
        "the graph to equal the standby",
        || async { differs(&cfg).await.is_none().then_some(()) },
    )
    .await;
    let _ = tx.send(true);
    let ended = handle.await.expect("run task");
    assert!(ended.is_ok(), "{ended:?}");

    // Teardown drops the slot on the standby and the publication on the
    // primary.
    walgraph::commands::teardown::command(&cfg, true, false)
        .await
        .unwrap_or_else(|e| panic!("teardown: {}", walgraph::error_sentence(&e)));
    assert_eq!(count(&on_standby, slots, &slot).await, 0);
    let pubs = "SELECT count(*) FROM pg_publication WHERE pubname = $1";
    assert_eq!(count(&fx.pg, pubs, &cfg.postgres.publication).await, 0);
    drop(_down);
    fx.cleanup().await;
}
