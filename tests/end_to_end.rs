//! One change end to end: rows written in Postgres become nodes and
//! relationships in Neo4j, and Postgres hears of a position only after Neo4j
//! committed it.

use std::time::Duration;

use serde_json::json;
use walgraph::lsn::Lsn;

use crate::support::{eventually, http_get, Fixture, SERVICES};

const USERS_DDL: &str =
    "CREATE TABLE {s}.users (id int PRIMARY KEY, name text NOT NULL, email text);";
const USERS_MAPPING: &str = r#"
[[node]]
table = "{s}.users"
label = "{p}User"
"#;

/// Reads the users as the graph has them.
async fn graph_users(fx: &Fixture) -> Vec<serde_json::Value> {
    fx.cypher("MATCH (n:{p}User) RETURN n.id AS id, n.name AS name, n.email AS email ORDER BY id")
        .await
}

/// Polls until the graph holds `want`, checking on every poll that the
/// slot's confirmed position never passes what Neo4j has committed: once
/// `confirmed_flush_lsn` reaches `after`, the graph must already show `want`.
///
/// `created` is the slot's position when it was made: Postgres starts there
/// before walgraph has written any checkpoint.
async fn expect_users(fx: &Fixture, created: Lsn, after: Lsn, want: serde_json::Value) {
    eventually(
        Duration::from_secs(30),
        &format!("the graph to hold {want}"),
        || async {
            // Read Postgres' confirmed position first, then Neo4j: the checkpoint
            // only grows, so confirmed <= checkpoint must hold.
            let confirmed = fx.confirmed_flush().await;
            let users = graph_users(fx).await;
            let checkpoint = fx.checkpoint().await.unwrap_or_default();
            assert!(
                confirmed <= checkpoint.max(created),
                "Postgres was told {confirmed} but Neo4j's checkpoint is only {checkpoint}"
            );
            if confirmed >= after {
                assert_eq!(
                    serde_json::Value::Array(users.clone()),
                    want,
                    "the slot confirmed {confirmed} before the graph held the change"
                );
            }
            (serde_json::Value::Array(users) == want && confirmed >= after).then_some(())
        },
    )
    .await;
}

/// Inserts user 1 and waits for its node.
async fn insert_first_user(fx: &Fixture) {
    fx.sql("INSERT INTO {s}.users VALUES (1, 'ann', NULL)")
        .await;
    eventually(Duration::from_secs(30), "the node", || async {
        (graph_users(fx).await.len() == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_updates_and_deletes_reach_the_graph_and_flush_follows_commit() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(USERS_DDL, USERS_MAPPING).await;
    fx.setup().await;
    let start = fx.confirmed_flush().await;
    let run = fx.start();

    fx.sql("INSERT INTO {s}.users VALUES (1, 'ann', 'ann@example.com'), (2, 'bob', NULL)")
        .await;
    let after_insert = fx.wal_lsn().await;
    assert!(after_insert > start);
    expect_users(
        &fx,
        start,
        after_insert,
        json!([
            {"id": 1, "name": "ann", "email": "ann@example.com"},
            {"id": 2, "name": "bob", "email": null},
        ]),
    )
    .await;

    fx.sql("UPDATE {s}.users SET name = 'anne', email = NULL WHERE id = 1; UPDATE {s}.users SET email = 'bob@example.com' WHERE id = 2")
        .await;
    let after_update = fx.wal_lsn().await;
    expect_users(
        &fx,
        start,
        after_update,
        json!([
            {"id": 1, "name": "anne", "email": null},
            {"id": 2, "name": "bob", "email": "bob@example.com"},
        ]),
    )
    .await;

    fx.sql("DELETE FROM {s}.users WHERE id = 1").await;
    let after_delete = fx.wal_lsn().await;
    expect_users(
        &fx,
        start,
        after_delete,
        json!([{"id": 2, "name": "bob", "email": "bob@example.com"}]),
    )
    .await;

    run.stop().await;
    fx.cleanup().await;
}

const SHOP_DDL: &str = "
CREATE TABLE {s}.users (id int PRIMARY KEY, name text NOT NULL, password_hash text);
CREATE TABLE {s}.roles (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE {s}.user_roles (user_id int REFERENCES {s}.users, role_id int REFERENCES {s}.roles,
                             granted_at date, PRIMARY KEY (user_id, role_id));
CREATE TABLE {s}.orders (id int PRIMARY KEY, user_id int REFERENCES {s}.users, total numeric(10,2));
";

const SHOP_MAPPING: &str = r#"
[[node]]
table = "{s}.users"
label = "{p}User"
exclude = ["password_hash"]

[[node]]
table = "{s}.roles"
label = "{p}Role"

[[node]]
table = "{s}.orders"
label = "{p}Order"

[[relationship]]
table = "{s}.orders"
type = "{p}PLACED_BY"
from = { label = "{p}Order", columns = ["id"] }
to = { label = "{p}User", columns = ["user_id"] }

[[relationship]]
table = "{s}.user_roles"
type = "{p}HAS_ROLE"
from = { label = "{p}User", columns = ["user_id"] }
to = { label = "{p}Role", columns = ["role_id"] }
properties = ["granted_at"]
"#;

async fn edges(fx: &Fixture) -> serde_json::Value {
    let placed = fx
        .cypher("MATCH (o:{p}Order)-[r:{p}PLACED_BY]->(u:{p}User) RETURN o.id AS order, u.id AS user ORDER BY order")
        .await;
    let roles = fx
        .cypher(
            "MATCH (u:{p}User)-[r:{p}HAS_ROLE]->(x:{p}Role) \
             RETURN u.id AS user, x.id AS role, toString(r.granted_at) AS granted ORDER BY user, role",
        )
        .await;
    json!({"placed": placed, "roles": roles})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_and_join_tables_become_relationships() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(SHOP_DDL, SHOP_MAPPING).await;
    fx.setup().await;
    let run = fx.start();

    fx.sql(
        "INSERT INTO {s}.users VALUES (1, 'ann', 'secret'), (2, 'bob', 'secret');
         INSERT INTO {s}.roles VALUES (10, 'admin'), (11, 'viewer');
         INSERT INTO {s}.user_roles VALUES (1, 10, '2024-01-02'), (2, 11, NULL);
         INSERT INTO {s}.orders VALUES (100, 1, 9.99), (101, NULL, 1.00);",
    )
    .await;
    let want = json!({
        "placed": [{"order": 100, "user": 1}],
        "roles": [{"user": 1, "role": 10, "granted": "2024-01-02"}, {"user": 2, "role": 11, "granted": null}],
    });
    eventually(
        Duration::from_secs(30),
        "relationships to appear",
        || async { (edges(&fx).await == want).then_some(()) },
    )
    .await;
    // Excluded columns never reach the graph; numeric keeps its exact text.
    let users = fx
        .cypher("MATCH (u:{p}User) RETURN u.id AS id, u.password_hash AS pw ORDER BY id")
        .await;
    assert_eq!(
        users,
        vec![json!({"id": 1, "pw": null}), json!({"id": 2, "pw": null})]
    );
    let orders = fx
        .cypher("MATCH (o:{p}Order {id: 100}) RETURN o.total AS total")
        .await;
    assert_eq!(orders, vec![json!({"total": "9.99"})]);

    // Move an order to another user, give the other order a user, revoke a role.
    fx.sql(
        "UPDATE {s}.orders SET user_id = 2 WHERE id = 100;
         UPDATE {s}.orders SET user_id = 1 WHERE id = 101;
         DELETE FROM {s}.user_roles WHERE user_id = 1;
         UPDATE {s}.user_roles SET role_id = 10 WHERE user_id = 2;",
    )
    .await;
    let want = json!({
        "placed": [{"order": 100, "user": 2}, {"order": 101, "user": 1}],
        "roles": [{"user": 2, "role": 10, "granted": null}],
    });
    eventually(Duration::from_secs(30), "relationships to move", || async {
        (edges(&fx).await == want).then_some(())
    })
    .await;
    // One edge per row: nothing was duplicated along the way.
    let counts = fx
        .cypher("MATCH ()-[r]->() WHERE type(r) STARTS WITH '{p}' RETURN count(r) AS n")
        .await;
    assert_eq!(counts, vec![json!({"n": 3})]);

    run.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_only_properties_survive_updates() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(USERS_DDL, USERS_MAPPING).await;
    fx.setup().await;
    let run = fx.start();
    insert_first_user(&fx).await;
    fx.cypher_write("MATCH (n:{p}User {id: 1}) SET n.score = 42")
        .await;
    fx.sql("UPDATE {s}.users SET name = 'anne' WHERE id = 1")
        .await;
    eventually(Duration::from_secs(30), "the update", || async {
        let rows = fx
            .cypher("MATCH (n:{p}User {id: 1}) RETURN n.name AS name, n.score AS score")
            .await;
        (rows == vec![json!({"name": "anne", "score": 42})]).then_some(())
    })
    .await;
    run.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_the_checkpoint_without_reapplying() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(SHOP_DDL, SHOP_MAPPING).await;
    // Postgres is told a position 64 MiB behind the checkpoint, so on
    // restart it sends the first run's transactions again: only walgraph's
    // own checkpoint keeps them from being applied twice.
    fx.config.postgres.replay_window_mib = 64;
    fx.setup().await;
    let run = fx.start();
    fx.sql(
        "INSERT INTO {s}.users VALUES (1, 'ann', NULL);
         INSERT INTO {s}.roles VALUES (10, 'admin');
         INSERT INTO {s}.user_roles VALUES (1, 10, NULL);",
    )
    .await;
    eventually(Duration::from_secs(30), "the first changes", || async {
        (edges(&fx).await["roles"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    run.stop().await;
    let checkpoint = fx
        .checkpoint()
        .await
        .expect("a checkpoint after the first run");
    assert!(
        fx.confirmed_flush().await < checkpoint,
        "Postgres keeps the first run's WAL and will send it again"
    );
    // Behind walgraph's back: remove the first run's edge. Applying the
    // first run's transactions again would bring it back.
    fx.cypher_write("MATCH (:{p}User {id: 1})-[r:{p}HAS_ROLE]->() DELETE r")
        .await;

    // Written while walgraph is stopped.
    fx.sql(
        "INSERT INTO {s}.users VALUES (2, 'bob', NULL);
         INSERT INTO {s}.user_roles VALUES (2, 10, NULL);
         UPDATE {s}.users SET name = 'anne' WHERE id = 1;",
    )
    .await;
    let run = fx.start();
    let want = json!({
        "placed": [],
        "roles": [{"user": 2, "role": 10, "granted": null}],
    });
    eventually(
        Duration::from_secs(30),
        "the changes made while stopped",
        || async { (edges(&fx).await == want).then_some(()) },
    )
    .await;
    let names = fx
        .cypher("MATCH (u:{p}User) RETURN u.name AS name ORDER BY name")
        .await;
    assert_eq!(names, vec![json!({"name": "anne"}), json!({"name": "bob"})]);
    assert!(fx.checkpoint().await.unwrap_or_default() > checkpoint);
    let counts = fx
        .cypher(
            "MATCH (n) WHERE any(l IN labels(n) WHERE l STARTS WITH '{p}') RETURN count(n) AS n",
        )
        .await;
    assert_eq!(counts, vec![json!({"n": 3})], "no node was created twice");
    run.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_publication_does_not_hold_wal_back() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(USERS_DDL, USERS_MAPPING).await;
    fx.setup().await;
    let run = fx.start();
    insert_first_user(&fx).await;
    // Writes to a table outside the publication: walgraph receives nothing
    // to apply, yet must let Postgres recycle that WAL.
    fx.sql(
        "CREATE TABLE {s}.noise (x int); INSERT INTO {s}.noise SELECT generate_series(1, 20000)",
    )
    .await;
    let after = fx.wal_lsn().await;
    eventually(
        Duration::from_secs(30),
        "the slot to move past unrelated WAL",
        || async {
            let confirmed = fx.confirmed_flush().await;
            let checkpoint = fx.checkpoint().await.unwrap_or_default();
            assert!(
                confirmed <= checkpoint,
                "confirmed {confirmed} is past the checkpoint {checkpoint}"
            );
            (confirmed >= after).then_some(())
        },
    )
    .await;
    run.stop().await;
    fx.cleanup().await;
}

const DOCS_DDL: &str = "CREATE TABLE {s}.docs (id int PRIMARY KEY, title text, body text);
    CREATE TABLE {s}.tags (doc_id int, tag text, PRIMARY KEY (doc_id, tag));";
const DOCS_MAPPING: &str = r#"
[[node]]
table = "{s}.docs"
label = "{p}Doc"

[[node]]
table = "{s}.tags"
label = "{p}Tag"
key = ["doc_id", "tag"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekeys_truncates_and_untouched_toast_reach_the_graph_exactly() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(DOCS_DDL, DOCS_MAPPING).await;
    fx.setup().await;
    let run = fx.start();
    let docs = || async {
        fx.cypher("MATCH (d:{p}Doc) RETURN d.id AS id, d.title AS title, size(d.body) AS body ORDER BY id")
            .await
    };
    fx.sql(
        "INSERT INTO {s}.docs SELECT 1, 'first', string_agg(md5(g::text), '') FROM generate_series(1, 3000) g;
         INSERT INTO {s}.docs VALUES (2, 'second', 'short');
         INSERT INTO {s}.tags VALUES (1, 'a'), (1, 'b'), (2, 'a');",
    )
    .await;
    eventually(Duration::from_secs(30), "the first rows", || async {
        (docs().await.len() == 2).then_some(())
    })
    .await;
    // An update that leaves the TOASTed body alone, and a primary key change.
    fx.sql("UPDATE {s}.docs SET title = 'first, renamed' WHERE id = 1")
        .await;
    fx.sql("UPDATE {s}.docs SET id = 20 WHERE id = 2").await;
    let want = vec![
        json!({"id": 1, "title": "first, renamed", "body": 96000}),
        json!({"id": 20, "title": "second", "body": 5}),
    ];
    eventually(
        Duration::from_secs(30),
        "the update and the re-key",
        || async { (docs().await == want).then_some(()) },
    )
    .await;
    let tags = || async { fx.cypher("MATCH (t:{p}Tag) RETURN count(t) AS n").await };
    assert_eq!(tags().await, vec![json!({"n": 3})]);
    fx.sql("TRUNCATE {s}.tags").await;
    eventually(Duration::from_secs(30), "the truncate", || async {
        (tags().await == vec![json!({"n": 0})]).then_some(())
    })
    .await;
    // Other labels are untouched by the truncate.
    assert_eq!(docs().await, want);
    run.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_neo4j_rejects_stops_with_table_key_and_lsn_or_becomes_a_dead_letter() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(USERS_DDL, USERS_MAPPING).await;
    fx.setup().await;
    // A constraint only the graph has: two users may share an email in Postgres.
    let constraint = format!("{}_email", fx.prefix);
    fx.cypher_write(&format!(
        "CREATE CONSTRAINT {constraint} FOR (n:{{p}}User) REQUIRE n.email IS UNIQUE"
    ))
    .await;
    let run = fx.start();
    fx.sql("INSERT INTO {s}.users VALUES (1, 'ann', 'same@example.com')")
        .await;
    eventually(Duration::from_secs(30), "the first user", || async {
        (graph_users(&fx).await.len() == 1).then_some(())
    })
    .await;
    fx.sql("INSERT INTO {s}.users VALUES (2, 'bob', 'same@example.com')")
        .await;
    let result = tokio::time::timeout(Duration::from_secs(60), run.handle)
        .await
        .expect("walgraph must stop on a rejected change")
        .expect("no panic");
    let err = result
        .expect_err("a rejected change is an error")
        .to_string();
    let table = format!("{}.users", fx.schema);
    assert!(
        err.contains(&table) && err.contains("key (2)") && err.contains("committed at"),
        "{err}"
    );
    assert!(err.contains("ConstraintValidationFailed"), "{err}");

    // With dead letters it records the change and goes on.
    fx.config.neo4j.on_error = walgraph::config::OnError::DeadLetter;
    let run = fx.start();
    fx.sql("INSERT INTO {s}.users VALUES (3, 'cy', 'other@example.com')")
        .await;
    eventually(
        Duration::from_secs(30),
        "the changes after the rejected one",
        || async {
            let ids: Vec<i64> = graph_users(&fx)
                .await
                .iter()
                .filter_map(|u| u["id"].as_i64())
                .collect();
            (ids == vec![1, 3]).then_some(())
        },
    )
    .await;
    let dead = fx
        .cypher(&format!(
            "MATCH (d:WalgraphDeadLetter {{slot: '{}'}}) RETURN d.table AS table, d.key AS key",
            fx.config.postgres.slot
        ))
        .await;
    assert_eq!(dead, vec![json!({"table": table, "key": "(2)"})]);
    run.stop().await;
    fx.cypher_write(&format!(
        "MATCH (d:WalgraphDeadLetter {{slot: '{}'}}) DELETE d",
        fx.config.postgres.slot
    ))
    .await;
    fx.cypher_write(&format!("DROP CONSTRAINT {constraint}"))
        .await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inferred_mapping_compiles_and_streams() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(SHOP_DDL, SHOP_MAPPING).await;
    fx.sql("CREATE TABLE {s}.notes (body text)").await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
        .args(["mapping", "infer", "--schema", &fx.schema])
        .env_remove("WALGRAPH_CONFIG")
        .env("WALGRAPH_PG_URL", &fx.env.pg_url)
        .output()
        .expect("run walgraph mapping infer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inferred = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        inferred.contains(&format!("# {}.notes has no primary key", fx.schema)),
        "{inferred}"
    );
    // This test's own labels and types, so it cannot meet other tests' nodes.
    let prefixed = inferred
        .replace("label = \"", &format!("label = \"{}", fx.prefix))
        .replace("type = \"", &format!("type = \"{}", fx.prefix));
    let mapping =
        walgraph::config::Config::parse(&prefixed).unwrap_or_else(|e| panic!("{e}\n{inferred}"));
    assert_eq!(mapping.nodes.len(), 3, "{inferred}");
    assert_eq!(mapping.relationships.len(), 2, "{inferred}");
    fx.config.nodes = mapping.nodes;
    fx.config.relationships = mapping.relationships;
    fx.setup().await;
    let run = fx.start();
    fx.sql(
        "INSERT INTO {s}.users VALUES (1, 'ann', 'x');
         INSERT INTO {s}.roles VALUES (10, 'admin');
         INSERT INTO {s}.user_roles VALUES (1, 10, '2024-01-02');
         INSERT INTO {s}.orders VALUES (100, 1, 9.99);",
    )
    .await;
    let want = json!([
        {"t": format!("{}USER", fx.prefix), "a": 100, "b": 1},
        {"t": format!("{}USER_ROLES", fx.prefix), "a": 1, "b": 10},
    ]);
    eventually(Duration::from_secs(30), "the inferred relationships", || async {
        let rows = fx
            .cypher("MATCH (a)-[r]->(b) WHERE type(r) STARTS WITH '{p}' RETURN type(r) AS t, a.id AS a, b.id AS b ORDER BY t")
            .await;
        (serde_json::Value::Array(rows) == want).then_some(())
    })
    .await;
    run.stop().await;
    fx.cleanup().await;
}

/// A plain HTTP GET against walgraph's endpoints: (status code, body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_health_readiness_and_metrics_and_stops_cleanly_on_sigterm() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(USERS_DDL, USERS_MAPPING).await;
    fx.setup().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let dir = std::env::temp_dir().join(format!("walgraph-http-{}", fx.id));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nslot = \"{}\"\npublication = \"{}\"\n[http]\nlisten = \"{addr}\"\n{}",
            fx.config.postgres.slot,
            fx.config.postgres.publication,
            USERS_MAPPING
                .replace("{s}", &fx.schema)
                .replace("{p}", &fx.prefix)
        ),
    )
    .expect("config");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
        .args(["--config", &config.to_string_lossy(), "run"])
        .envs(fx.env.vars())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start walgraph run");
    eventually(Duration::from_secs(30), "/ready to answer 200", || async {
        http_get(&addr, "/ready")
            .await
            .filter(|(code, _)| *code == 200)
    })
    .await;
    assert_eq!(http_get(&addr, "/health").await.map(|r| r.0), Some(200));
    assert_eq!(http_get(&addr, "/nope").await.map(|r| r.0), Some(404));
    fx.sql("INSERT INTO {s}.users VALUES (1, 'ann', NULL), (2, 'bob', NULL)")
        .await;
    let metrics = eventually(
        Duration::from_secs(30),
        "the changes in /metrics",
        || async {
            http_get(&addr, "/metrics")
                .await
                .filter(|(_, body)| body.contains("walgraph_changes_applied_total 2"))
        },
    )
    .await;
    assert!(
        metrics.1.contains("# TYPE walgraph_lag_bytes gauge"),
        "{}",
        metrics.1
    );
    assert!(metrics.1.contains("walgraph_ready 1"), "{}", metrics.1);
    assert!(
        metrics
            .1
            .contains("walgraph_commit_to_graph_seconds_count 2"),
        "{}",
        metrics.1
    );
    let table = format!("{}.users", fx.schema);
    assert!(
        metrics.1.contains(&format!(
            "walgraph_table_changes_applied_total{{table=\"{table}\",op=\"insert\"}} 2"
        )) && metrics
            .1
            .contains("# TYPE walgraph_commit_to_graph_seconds histogram")
            && metrics.1.contains("walgraph_batch_write_seconds_count")
            && metrics.1.contains("walgraph_build_info{version=")
            && metrics.1.ends_with("# EOF\n"),
        "{}",
        metrics.1
    );
    // The slot as run reads it, every few seconds.
    eventually(Duration::from_secs(30), "the slot in /metrics", || async {
        http_get(&addr, "/metrics").await.filter(|(_, body)| {
            body.contains("walgraph_slot_active 1")
                && body.contains("walgraph_slot_wal_status{status=\"reserved\"} 1")
        })
    })
    .await;
    // A large transaction streamed while it runs, then rolled back, is
    // counted and logged, and nothing of it reaches the graph.
    fx.roll_back_streamed(
        "INSERT INTO {s}.users SELECT g, 'gone ' || g, NULL FROM generate_series(10, 5009) g",
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the rollback in /metrics",
        || async {
            http_get(&addr, "/metrics")
                .await
                .filter(|(_, body)| body.contains("walgraph_streamed_rollbacks_total 1"))
        },
    )
    .await;

    // `status` reports the running process from the same endpoint.
    let status = fx
        .walgraph(&["--config", &config.to_string_lossy(), "status", "--json"])
        .await;
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(status["process"]["changes_applied"], json!(2), "{status}");
    assert!(status["slot_active"].as_bool().unwrap_or(false), "{status}");

    // SIGTERM: finish, confirm, exit 0.
    let out = crate::support::sigterm_and_wait(child).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("a streamed transaction rolled back"),
        "the rollback is logged: {log}"
    );
    // Plain text into a pipe, and each line of the pipeline names the slot.
    assert!(!log.contains('\x1b'), "no terminal colour codes: {log:?}");
    let slot = format!("slot={}", fx.config.postgres.slot);
    assert!(
        log.lines()
            .any(|l| l.contains(" stopped ") && l.contains(&slot) && l.contains("flushed=")),
        "the last line of the stream carries the slot and the LSN: {log}"
    );
    let gone = fx
        .cypher(&format!(
            "MATCH (u:{}) WHERE u.id >= 10 RETURN count(u) AS n",
            fx.label("User")
        ))
        .await;
    assert_eq!(gone[0]["n"], json!(0), "nothing of the rollback applied");
    let _ = std::fs::remove_dir_all(&dir);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_a_slot_in_use_stops_with_a_sentence() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(USERS_DDL, USERS_MAPPING).await;
    fx.setup().await;
    let config = fx.config_file("first.toml", "", USERS_MAPPING);
    let config = config.to_string_lossy().into_owned();
    let mut first = fx.spawn(&["--config", &config, "run"]);
    insert_first_user(&fx).await;
    eventually(
        Duration::from_secs(30),
        "the first run streaming",
        || async { (!graph_users(&fx).await.is_empty()).then_some(()) },
    )
    .await;
    let second = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
            .args(["--config", &config, "run"])
            .envs(fx.env.vars())
            .output(),
    )
    .await
    .expect("the second run gives up within a minute")
    .expect("walgraph runs");
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("is in use by another process"), "{stderr}");
    first.start_kill().expect("stop");
    let _ = first.wait().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_upsert_delete_and_carry_relationships() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.sites (region text, id int, name text, PRIMARY KEY (region, id));
         CREATE TABLE {s}.racks (id int PRIMARY KEY, region text, site int,
           FOREIGN KEY (region, site) REFERENCES {s}.sites);",
        r#"
[[node]]
table = "{s}.sites"
label = "{p}Site"
[[node]]
table = "{s}.racks"
label = "{p}Rack"
[[relationship]]
table = "{s}.racks"
type = "{p}IN_SITE"
from = { label = "{p}Rack", columns = ["id"] }
to = { label = "{p}Site", columns = ["region", "site"] }
"#,
    )
    .await;
    fx.setup().await;
    let run = fx.start();
    fx.sql(
        "INSERT INTO {s}.sites VALUES ('eu', 1, 'a'), ('eu', 2, 'b'), ('us', 1, 'c');
         INSERT INTO {s}.racks VALUES (10, 'eu', 1), (11, 'us', 1), (12, 'eu', 2);
         UPDATE {s}.sites SET name = 'a2' WHERE region = 'eu' AND id = 1;
         UPDATE {s}.racks SET region = 'eu', site = 2 WHERE id = 11;
         DELETE FROM {s}.racks WHERE id = 12;
         DELETE FROM {s}.sites WHERE region = 'us' AND id = 1;",
    )
    .await;
    let want = json!([
        {"rack": 10, "region": "eu", "site": 1, "name": "a2"},
        {"rack": 11, "region": "eu", "site": 2, "name": "b"},
    ]);
    eventually(Duration::from_secs(30), "sites and racks", || async {
        let got = fx
            .cypher(
                "MATCH (r:{p}Rack)-[:{p}IN_SITE]->(s:{p}Site) \
                 RETURN r.id AS rack, s.region AS region, s.id AS site, s.name AS name ORDER BY rack",
            )
            .await;
        let sites = fx
            .cypher("MATCH (s:{p}Site) RETURN count(s) AS n")
            .await;
        (json!(got) == want && sites == vec![json!({"n": 2})]).then_some(())
    })
    .await;
    run.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_log_format_json_every_line_is_an_object_naming_the_slot() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(USERS_DDL, USERS_MAPPING).await;
    fx.setup().await;
    let config = fx.config_file("json.toml", "", USERS_MAPPING);
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
        .args([
            "--config",
            &config.to_string_lossy(),
            "--log-format",
            "json",
            "run",
        ])
        .envs(fx.env.vars())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start walgraph run");
    fx.sql("INSERT INTO {s}.users VALUES (1, 'ann', NULL)")
        .await;
    eventually(Duration::from_secs(30), "the node", || async {
        (graph_users(&fx).await.len() == 1).then_some(())
    })
    .await;
    let out = crate::support::sigterm_and_wait(child).await;
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let applied = lines
        .iter()
        .find(|l| l["fields"]["message"] == "stopped")
        .unwrap_or_else(|| panic!("no stopped line: {log}"));
    assert_eq!(
        applied["span"]["slot"],
        json!(fx.config.postgres.slot),
        "{applied}"
    );
    assert!(applied["fields"]["flushed"].is_string(), "{applied}");
    assert!(
        applied["level"] == "INFO" && applied["timestamp"].is_string(),
        "{applied}"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_measure_the_lag_and_move_the_slot_while_nothing_changes() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(USERS_DDL, USERS_MAPPING).await;
    fx.setup().await;
    let addr = crate::support::free_address();
    fx.config.http.listen = Some(addr);
    fx.config.postgres.heartbeat = Duration::from_secs(1);
    let run = fx.start_serving().await;
    let addr = addr.to_string();
    let metric = |body: &str, name: &str| walgraph::http::metric(body, name).unwrap_or(0.0);
    let first = eventually(Duration::from_secs(60), "a heartbeat's trip", || async {
        let (_, body) = http_get(&addr, "/metrics").await?;
        (metric(&body, "walgraph_heartbeats_total") >= 1.0).then_some(body)
    })
    .await;
    let trip = metric(&first, "walgraph_heartbeat_trip_seconds");
    assert!(
        trip > 0.0 && trip < 10.0,
        "a measured trip: {trip} s\n{first}"
    );
    let flushed = fx.confirmed_flush().await;
    // Nothing changes in the mapped tables, yet heartbeats go on and the
    // slot's position moves with them.
    eventually(
        Duration::from_secs(60),
        "more heartbeats and a moving slot",
        || async {
            let (_, body) = http_get(&addr, "/metrics").await?;
            (metric(&body, "walgraph_heartbeats_total")
                >= metric(&first, "walgraph_heartbeats_total") + 2.0
                && fx.confirmed_flush().await > flushed)
                .then_some(())
        },
    )
    .await;
    let (_, body) = http_get(&addr, "/metrics").await.expect("metrics");
    let lag = metric(&body, "walgraph_lag_seconds");
    assert!(
        lag > 0.0 && lag < 10.0,
        "lag in seconds while idle is the heartbeat's trip: {lag}"
    );
    assert_eq!(metric(&body, "walgraph_changes_applied_total"), 0.0);
    assert!(
        graph_users(&fx).await.is_empty(),
        "heartbeats write no node"
    );
    run.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_of_a_mapping_is_planned_ahead_and_nothing_is_written() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.sites (region text, id int, name text, PRIMARY KEY (region, id));
         CREATE TABLE {s}.racks (id int PRIMARY KEY, region text, site int,
           FOREIGN KEY (region, site) REFERENCES {s}.sites);
         CREATE TABLE {s}.links (a int, b int, note text, PRIMARY KEY (a, b));
         CREATE TABLE {s}.cables (id int PRIMARY KEY, a int, b int, len int);",
        r#"
[[node]]
table = "{s}.sites"
label = "{p}Site"
history = true
[[node]]
table = "{s}.racks"
label = "{p}Rack"
[[relationship]]
table = "{s}.racks"
type = "{p}IN_SITE"
from = { label = "{p}Rack", columns = ["id"] }
to = { label = "{p}Site", columns = ["region", "site"] }
[[relationship]]
table = "{s}.links"
type = "{p}LINK"
from = { label = "{p}Rack", columns = ["a"] }
to = { label = "{p}Rack", columns = ["b"] }
[[relationship]]
table = "{s}.cables"
type = "{p}CABLE"
from = { label = "{p}Rack", columns = ["a"] }
to = { label = "{p}Rack", columns = ["b"] }
"#,
    )
    .await;
    fx.setup().await;
    let info = walgraph::source::conninfo::ConnInfo::parse(
        fx.config.postgres.url.as_deref().expect("a url"),
    )
    .expect("url");
    let pg = walgraph::source::catalog::PgClient::connect(&info)
        .await
        .expect("postgres");
    let mapping = walgraph::pipeline::preflight::compile_mapping(&pg, &fx.config)
        .await
        .expect("compiles");
    let max_changes = 5000;
    let texts = walgraph::batch::render::statement_texts(&mapping, max_changes);
    // Per label: upsert, delete, placeholder, key change, truncate (and the
    // three version statements of the history label); per type: its two
    // statements and a truncate.
    assert_eq!(texts.len(), 2 * 5 + 3 + 3 * 3, "{texts:#?}");
    let orders = |rows: usize| match rows {
        1 => 1,
        10 => 2,
        _ => 5,
    };
    let want: usize = texts.iter().map(|p| orders(p.rows)).sum();
    let sink = walgraph::sink::Sink::connect(&fx.config.neo4j, &fx.config.postgres.slot)
        .await
        .expect("neo4j");
    let planned = sink
        .plan_ahead(&texts, Duration::from_secs(300))
        .await
        .expect("every statement runs");
    assert_eq!(planned, want);
    // Everything ran in transactions that were rolled back.
    let left = fx
        .cypher(
            "MATCH (n) WHERE any(l IN labels(n) WHERE l STARTS WITH '{p}') RETURN count(n) AS n",
        )
        .await;
    assert_eq!(left, vec![json!({"n": 0})]);
    // A budget bounds it.
    let few = sink
        .plan_ahead(&texts, Duration::ZERO)
        .await
        .expect("plans nothing");
    assert_eq!(few, 0);
    fx.cleanup().await;
}
