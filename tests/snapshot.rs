//! `walgraph snapshot`: rows that existed before the slot reach the graph,
//! consistent with the stream that follows — taken while writes continue,
//! and resumed after an interruption.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, Fixture, SERVICES};

const DDL: &str = "
CREATE TABLE {s}.groups (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE {s}.items (id bigint PRIMARY KEY, grp int REFERENCES {s}.groups, val bigint NOT NULL);
CREATE TABLE {s}.members (item_id bigint REFERENCES {s}.items ON DELETE CASCADE,
                          group_id int REFERENCES {s}.groups, since int NOT NULL,
                          PRIMARY KEY (item_id, group_id));
INSERT INTO {s}.groups SELECT g, 'group ' || g FROM generate_series(1, 100) g;
";

const MAPPING: &str = r#"
[[node]]
table = "{s}.groups"
label = "{p}Group"
[[node]]
table = "{s}.items"
label = "{p}Item"
[[relationship]]
table = "{s}.items"
type = "{p}IN_GROUP"
from = { label = "{p}Item", columns = ["id"] }
to = { label = "{p}Group", columns = ["grp"] }
[[relationship]]
table = "{s}.members"
type = "{p}MEMBER_OF"
from = { label = "{p}Item", columns = ["item_id"] }
to = { label = "{p}Group", columns = ["group_id"] }
properties = ["since"]
"#;

async fn fill(fx: &Fixture, rows: i64) {
    fx.sql(&format!(
        "INSERT INTO {{s}}.items SELECT g, CASE WHEN g % 7 = 0 THEN NULL ELSE 1 + g % 100 END, g
           FROM generate_series(1, {rows}) g;
         INSERT INTO {{s}}.members SELECT g, 1 + (g * 3) % 100, g % 1000
           FROM generate_series(1, {rows}, 10) g;"
    ))
    .await;
}

/// What both sides must agree on.
async fn pg_state(fx: &Fixture) -> serde_json::Value {
    let r = fx
        .pg
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {s}.items), (SELECT coalesce(sum(val), 0)::bigint FROM {s}.items),
                        (SELECT coalesce(sum(id), 0)::bigint FROM {s}.items),
                        (SELECT count(grp) FROM {s}.items), (SELECT coalesce(sum(id * grp), 0)::bigint FROM {s}.items),
                        (SELECT count(*) FROM {s}.members),
                        (SELECT coalesce(sum(item_id * group_id + since), 0)::bigint FROM {s}.members),
                        (SELECT count(*) FROM {s}.groups)",
                s = fx.schema
            ),
            &[],
        )
        .await
        .expect("postgres state");
    let g = |i: usize| r.get::<_, i64>(i);
    json!({"items": g(0), "val": g(1), "ids": g(2), "in_group": g(3), "in_group_sum": g(4),
           "members": g(5), "members_sum": g(6), "groups": g(7)})
}

async fn graph_state(fx: &Fixture) -> serde_json::Value {
    let items = fx
        .cypher("MATCH (i:{p}Item) RETURN count(i) AS n, coalesce(sum(i.val), 0) AS v, coalesce(sum(i.id), 0) AS s")
        .await;
    let rels = fx
        .cypher("MATCH (i:{p}Item)-[:{p}IN_GROUP]->(g:{p}Group) RETURN count(*) AS n, coalesce(sum(i.id * g.id), 0) AS s")
        .await;
    let members = fx
        .cypher("MATCH (i:{p}Item)-[m:{p}MEMBER_OF]->(g:{p}Group) RETURN count(*) AS n, coalesce(sum(i.id * g.id + m.since), 0) AS s")
        .await;
    let groups = fx
        .cypher("MATCH (g:{p}Group) WHERE g.name IS NOT NULL RETURN count(g) AS n")
        .await;
    json!({"items": items[0]["n"], "val": items[0]["v"], "ids": items[0]["s"],
           "in_group": rels[0]["n"], "in_group_sum": rels[0]["s"],
           "members": members[0]["n"], "members_sum": members[0]["s"], "groups": groups[0]["n"]})
}

/// Mixed writes, one transaction each, until stopped; returns how many.
fn writer(fx: &Fixture, first_new: i64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let env = fx.env.clone();
    let s = fx.schema.clone();
    tokio::spawn(async move {
        let pg = crate::support::pg(&env).await;
        let mut rng = fastrand::Rng::with_seed(11);
        let mut next = first_new;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let id = rng.i64(1..next);
            let sql = match rng.u8(0..5) {
                0 => {
                    next += 1;
                    format!("INSERT INTO {s}.items VALUES ({next}, {}, {next})", 1 + next % 100)
                }
                1 => format!("DELETE FROM {s}.items WHERE id = {id}"),
                2 => format!("UPDATE {s}.items SET grp = {} WHERE id = {id}", rng.i64(1..=100)),
                3 => format!(
                    "INSERT INTO {s}.members SELECT {id}, {}, 5 WHERE EXISTS (SELECT FROM {s}.items WHERE id = {id})
                     ON CONFLICT (item_id, group_id) DO UPDATE SET since = {s}.members.since + 1",
                    rng.i64(1..=100)
                ),
                _ => format!("UPDATE {s}.items SET val = val + 1 WHERE id = {id}"),
            };
            pg.batch_execute(&sql).await.expect("write");
            n += 1;
        }
        n
    })
}

async fn stream_until_equal(fx: &Fixture, config: &str) {
    let mut run = fx.spawn(&["--config", config, "run"]);
    let want = pg_state(fx).await;
    eventually(
        Duration::from_secs(300),
        "the graph to equal Postgres",
        || async { (graph_state(fx).await == want).then_some(()) },
    )
    .await;
    run.start_kill().expect("stop");
    let _ = run.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_million_rows_taken_while_writes_continue_then_streaming_equals_the_database(
) {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    fill(&fx, 1_000_000).await;
    fx.setup().await;
    let config = fx.config_file("snapshot.toml", "", MAPPING);
    let config = config.to_string_lossy().into_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(&fx, 1_000_000, Arc::clone(&stop));
    let out = fx.walgraph(&["--config", &config, "snapshot"]).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writes.await.expect("writer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("snapshot complete"), "{stdout}");
    assert!(writes > 0, "writes went on during the snapshot");

    // Running it again has nothing to do.
    let again = fx.walgraph(&["--config", &config, "snapshot"]).await;
    assert!(String::from_utf8_lossy(&again.stdout).contains("already complete"));

    stream_until_equal(&fx, &config).await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_snapshot_resumes_where_it_stopped_and_ends_the_same() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    fill(&fx, 60_000).await;
    fx.setup().await;
    let config = fx.config_file("snapshot.toml", "", MAPPING);
    let config = config.to_string_lossy().into_owned();

    let mut child = fx.spawn(&["--config", &config, "snapshot", "--chunk-rows", "1000"]);
    eventually(Duration::from_secs(120), "part of the snapshot", || async {
        let n = fx
            .cypher(
                "MATCH (s:WalgraphSnapshot {slot: '{slot}'}) RETURN s.rows AS n"
                    .replace("{slot}", &fx.config.postgres.slot)
                    .as_str(),
            )
            .await;
        n.first()
            .and_then(|r| r["n"].as_i64())
            .filter(|n| *n >= 5_000)
            .map(|_| ())
    })
    .await;
    child.start_kill().expect("SIGKILL");
    let _ = child.wait().await;
    let copied = fx.cypher("MATCH (i:{p}Item) RETURN count(i) AS n").await[0]["n"]
        .as_i64()
        .unwrap_or(0);
    assert!(
        copied > 0 && copied < 60_000,
        "interrupted halfway: {copied} of 60000 items"
    );

    // `run` refuses until the snapshot is finished.
    let refused = fx.walgraph(&["--config", &config, "run"]).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not finished"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Changes meanwhile, to rows already copied and rows not yet copied.
    fx.sql(
        "UPDATE {s}.items SET val = val + 1000 WHERE id IN (1, 2, 59999);
         DELETE FROM {s}.items WHERE id IN (3, 59998);
         UPDATE {s}.items SET grp = NULL WHERE id = 4;
         INSERT INTO {s}.items VALUES (70000, 5, 7);
         INSERT INTO {s}.members VALUES (5, 50, 1) ON CONFLICT DO NOTHING;",
    )
    .await;
    let out = fx
        .walgraph(&["--config", &config, "snapshot", "--chunk-rows", "1000"])
        .await;
    assert!(
        out.status.success(),
        "resumed snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(resumed)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    stream_until_equal(&fx, &config).await;
    let one = fx
        .cypher("MATCH (i:{p}Item {id: 1}) RETURN i.val AS v")
        .await;
    assert_eq!(one, vec![json!({"v": 1001})]);
    fx.cleanup().await;
}

const PRICED_DDL: &str = "
CREATE TABLE {s}.priced (id int PRIMARY KEY, price int NOT NULL,
                         doubled int GENERATED ALWAYS AS (price * 2) STORED);
INSERT INTO {s}.priced (id, price) SELECT g, g FROM generate_series(1, 500) g;
";

const PRICED_MAPPING: &str = r#"
[[node]]
table = "{s}.priced"
label = "{p}Priced"
"#;

/// `(nodes, nodes whose doubled is price * 2, nodes with a doubled)`.
async fn doubled(fx: &Fixture) -> (i64, i64, i64) {
    let rows = fx
        .cypher(&format!(
            "MATCH (n:{}) RETURN count(n) AS n, \
             count(CASE WHEN n.doubled = n.price * 2 THEN 1 END) AS right, \
             count(n.doubled) AS have",
            fx.label("Priced")
        ))
        .await;
    let get = |k: &str| rows[0][k].as_i64().unwrap_or(-1);
    (get("n"), get("right"), get("have"))
}

/// Changes prices (so doubled) and adds rows while `run` streams.
async fn reprice(fx: &Fixture, round: i64) {
    fx.sql(&format!(
        "UPDATE {{s}}.priced SET price = price + {round} WHERE id % 7 = 0;
         INSERT INTO {{s}}.priced (id, price) VALUES ({id}, {id});",
        id = 1000 + round
    ))
    .await;
}

async fn clean(fx: &Fixture, what: &str) {
    let report = crate::backfill::reconcile_report(&fx.config).await;
    assert!(
        !report.iter().any(|t| t.differs()),
        "{what}: reconcile finds differences: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_generated_columns_are_mapped_exactly_when_the_publication_publishes_them() {
    Box::pin(generated_columns()).await;
}

async fn generated_columns() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(PRICED_DDL, PRICED_MAPPING).await;
    let sentence = |e: anyhow::Error| walgraph::error_sentence(&e);
    if fx.server_version().await < 180_000 {
        // Before 18 nothing sends generated columns: asking is refused, a
        // mapping that names one is refused, and the rest is mapped.
        fx.config.postgres.generated_columns = true;
        let refused = walgraph::commands::setup::setup(&fx.config)
            .await
            .map_err(sentence)
            .expect_err("generated_columns is refused before 18");
        assert!(refused.contains("PostgreSQL 18"), "{refused}");
        fx.config.postgres.generated_columns = false;
        fx.config.nodes[0].include = Some(vec!["price".into(), "doubled".into()]);
        let refused = walgraph::commands::setup::setup(&fx.config)
            .await
            .map_err(sentence)
            .expect_err("a generated column in the mapping is refused before 18");
        assert!(refused.contains("a generated column"), "{refused}");
        fx.config.nodes[0].include = None;
        fx.setup().await;
        crate::backfill::take_snapshot(&fx.config).await;
        assert_eq!(doubled(&fx).await, (500, 0, 0));
        fx.cleanup().await;
        return;
    }

    // 1. Asked for: setup publishes them, the snapshot copies them and the
    //    stream keeps them right.
    fx.config.postgres.generated_columns = true;
    let lines = fx.setup().await.join("\n");
    assert!(lines.contains("created publication"), "{lines}");
    let gencols: String = fx
        .pg
        .query_one(
            "SELECT to_jsonb(p) ->> 'pubgencols' FROM pg_publication p WHERE pubname = $1",
            &[&fx.config.postgres.publication],
        )
        .await
        .expect("pubgencols")
        .get(0);
    assert_eq!(gencols, "s");
    crate::backfill::take_snapshot(&fx.config).await;
    assert_eq!(
        doubled(&fx).await,
        (500, 500, 500),
        "copied by the snapshot"
    );
    let run = fx.start();
    for round in 1..=3 {
        reprice(&fx, round).await;
    }
    eventually(
        Duration::from_secs(60),
        "streamed doubled values",
        || async { (doubled(&fx).await == (503, 503, 503)).then_some(()) },
    )
    .await;
    run.stop().await;
    clean(&fx, "published").await;

    // 2. Turned off: setup stops publishing them, and the next run takes
    //    the property off every node (a mapping change).
    fx.config.postgres.generated_columns = false;
    let lines = fx.setup().await.join("\n");
    assert!(
        lines.contains("publishes generated columns: none"),
        "{lines}"
    );
    let run = fx.start();
    reprice(&fx, 4).await;
    eventually(
        Duration::from_secs(60),
        "doubled gone from every node",
        || async { (doubled(&fx).await == (504, 0, 0)).then_some(()) },
    )
    .await;

    // 3. Published by hand while run streams (the stream carries them at
    //    once): followed like a column added — every node gets them, not
    //    only the rows changed from now on.
    fx.sql(&format!(
        "ALTER PUBLICATION {} SET (publish_generated_columns = stored)",
        fx.config.postgres.publication
    ))
    .await;
    for round in 5..=6 {
        reprice(&fx, round).await;
    }
    eventually(
        Duration::from_secs(90),
        "doubled on every node again",
        || async { (doubled(&fx).await == (506, 506, 506)).then_some(()) },
    )
    .await;
    run.stop().await;
    clean(&fx, "published by hand").await;
    fx.cleanup().await;
}
