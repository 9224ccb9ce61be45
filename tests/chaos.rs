//! Chaos: a concurrent workload of inserts, updates, deletes and
//! relationship changes while walgraph is killed with SIGKILL again and
//! again and Neo4j is restarted; afterwards the graph must equal Postgres
//! exactly — same keys per label, same properties, same relationships, no
//! duplicates, and the same sum of a numeric column.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::support::{eventually, Fixture, SERVICES};

const DDL: &str = "
CREATE TABLE {s}.users (id int PRIMARY KEY, name text NOT NULL, score numeric(12,2) NOT NULL DEFAULT 0);
CREATE TABLE {s}.roles (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE {s}.user_roles (user_id int REFERENCES {s}.users ON DELETE CASCADE,
                             role_id int REFERENCES {s}.roles, PRIMARY KEY (user_id, role_id));
CREATE TABLE {s}.orders (id int PRIMARY KEY, user_id int REFERENCES {s}.users ON DELETE SET NULL,
                         total numeric(12,2) NOT NULL);
INSERT INTO {s}.roles SELECT g, 'role ' || g FROM generate_series(1, 5) g;
";

const MAPPING: &str = r#"
[[node]]
table = "{s}.users"
label = "{p}User"
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
"#;

/// One random write transaction; errors from races (a row gone, a key taken)
/// are fine: the transaction simply rolls back.
async fn random_write(pg: &tokio_postgres::Client, s: &str, rng: &mut fastrand::Rng) {
    let u = rng.i32(1..=60);
    let o = rng.i32(1..=120);
    let r = rng.i32(1..=5);
    let v = rng.i32(0..10_000);
    let sql = match rng.u8(..12) {
        0..=2 => format!("INSERT INTO {s}.users VALUES ({u}, 'user {v}', {v} / 100.0) ON CONFLICT (id) DO UPDATE SET name = excluded.name, score = excluded.score"),
        3 => format!("UPDATE {s}.users SET score = score + {v} / 100.0 WHERE id = {u}"),
        4 => format!("DELETE FROM {s}.users WHERE id = {u}"),
        5..=6 => format!("INSERT INTO {s}.orders SELECT {o}, (SELECT id FROM {s}.users WHERE id = {u}), {v} / 100.0 ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, total = excluded.total"),
        7 => format!("UPDATE {s}.orders SET user_id = NULL WHERE id = {o}"),
        8 => format!("DELETE FROM {s}.orders WHERE id = {o}"),
        9..=10 => format!("INSERT INTO {s}.user_roles SELECT {u}, {r} WHERE EXISTS (SELECT 1 FROM {s}.users WHERE id = {u}) ON CONFLICT DO NOTHING"),
        _ => format!("DELETE FROM {s}.user_roles WHERE user_id = {u} AND role_id = {r}"),
    };
    let batch = format!(
        "BEGIN; {sql}; {sql2}; COMMIT",
        sql2 = if rng.bool() {
            "SELECT 1".to_string()
        } else {
            format!(
                "UPDATE {s}.users SET name = name || '' WHERE id = {}",
                rng.i32(1..=60)
            )
        }
    );
    if pg.batch_execute(&batch).await.is_err() {
        let _ = pg.batch_execute("ROLLBACK").await;
    }
}

fn services(cmd: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/services");
    let out = Command::new(script)
        .arg(cmd)
        .output()
        .expect("run services");
    assert!(
        out.status.success(),
        "services {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What Postgres holds, in the graph's terms.
async fn pg_state(fx: &Fixture) -> serde_json::Value {
    let q = |sql: String| async move { fx.pg.query(&sql, &[]).await.expect("query") };
    let s = &fx.schema;
    let users: BTreeMap<String, serde_json::Value> =
        q(format!("SELECT id, name, score::text FROM {s}.users"))
            .await
            .iter()
            .map(|r| {
                (
                    r.get::<_, i32>(0).to_string(),
                    json!({"name": r.get::<_, String>(1), "score": r.get::<_, String>(2)}),
                )
            })
            .collect();
    let orders: BTreeMap<String, serde_json::Value> =
        q(format!("SELECT id, user_id, total::text FROM {s}.orders"))
            .await
            .iter()
            .map(|r| {
                (
                    r.get::<_, i32>(0).to_string(),
                    json!({"user_id": r.get::<_, Option<i32>>(1), "total": r.get::<_, String>(2)}),
                )
            })
            .collect();
    let mut placed: Vec<(i32, i32)> = q(format!(
        "SELECT id, user_id FROM {s}.orders WHERE user_id IS NOT NULL"
    ))
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    placed.sort();
    let mut roles: Vec<(i32, i32)> = q(format!("SELECT user_id, role_id FROM {s}.user_roles"))
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    roles.sort();
    let sum: String = q(format!(
        "SELECT coalesce(sum(score), 0)::text FROM {s}.users"
    ))
    .await[0]
        .get(0);
    json!({"users": users, "orders": orders, "placed": placed, "roles": roles, "score_sum": sum})
}

/// What the graph holds, in the same shape.
async fn graph_state(fx: &Fixture) -> serde_json::Value {
    let users: BTreeMap<String, serde_json::Value> = fx
        .cypher("MATCH (n:{p}User) RETURN n.id AS id, n.name AS name, n.score AS score")
        .await
        .into_iter()
        .map(|r| {
            (
                r["id"].to_string(),
                json!({"name": r["name"], "score": r["score"]}),
            )
        })
        .collect();
    let orders: BTreeMap<String, serde_json::Value> = fx
        .cypher("MATCH (n:{p}Order) RETURN n.id AS id, n.user_id AS user_id, n.total AS total")
        .await
        .into_iter()
        .map(|r| {
            (
                r["id"].to_string(),
                json!({"user_id": r["user_id"], "total": r["total"]}),
            )
        })
        .collect();
    let pairs = |rows: Vec<serde_json::Value>| -> Vec<(i64, i64)> {
        let mut v: Vec<(i64, i64)> = rows
            .iter()
            .map(|r| (r["a"].as_i64().unwrap_or(-1), r["b"].as_i64().unwrap_or(-1)))
            .collect();
        v.sort();
        v
    };
    let placed = pairs(
        fx.cypher("MATCH (o:{p}Order)-[:{p}PLACED_BY]->(u:{p}User) RETURN o.id AS a, u.id AS b")
            .await,
    );
    let roles = pairs(
        fx.cypher("MATCH (u:{p}User)-[:{p}HAS_ROLE]->(r:{p}Role) RETURN u.id AS a, r.id AS b")
            .await,
    );
    // numeric travels as exact text; sum it exactly in cents.
    let cents: i64 = users
        .values()
        .map(|u| {
            let t = u["score"].as_str().unwrap_or("0");
            let (w, f) = t.split_once('.').unwrap_or((t, "0"));
            let neg = w.starts_with('-');
            let c = w.trim_start_matches('-').parse::<i64>().unwrap_or(0) * 100
                + format!("{f:0<2}")[..2].parse::<i64>().unwrap_or(0);
            if neg {
                -c
            } else {
                c
            }
        })
        .sum();
    let sum = format!("{}.{:02}", cents / 100, (cents % 100).abs());
    json!({"users": users, "orders": orders, "placed": placed, "roles": roles, "score_sum": sum})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_neo4j_restarts_under_load_leave_the_graph_equal_to_postgres() {
    let _exclusive = SERVICES.write().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    let dir = std::env::temp_dir().join(format!("walgraph-chaos-{}", fx.id));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("chaos.toml");
    let mapping = MAPPING
        .replace("{s}", &fx.schema)
        .replace("{p}", &fx.prefix);
    std::fs::write(
        &config,
        format!(
            "[postgres]\nslot = \"{}\"\npublication = \"{}\"\n[batch]\nmax_changes = 200\nmax_delay = \"20ms\"\n{mapping}",
            fx.config.postgres.slot, fx.config.postgres.publication
        ),
    )
    .expect("config");
    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
            .args(["--config", &config.to_string_lossy(), "run"])
            .envs(fx.env.vars())
            .env("WALGRAPH_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start walgraph")
    };

    // The workload: two writers for the whole run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let stop = std::sync::Arc::clone(&stop);
        let env = fx.env.clone();
        let s = fx.schema.clone();
        writers.push(tokio::spawn(async move {
            let pg = crate::support::pg(&env).await;
            let mut rng = fastrand::Rng::with_seed(w);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                random_write(&pg, &s, &mut rng).await;
                n += 1;
            }
            n
        }));
    }

    let mut child = spawn();
    let mut kills = 0;
    let mut neo4j_restarts = 0;
    let mut rng = fastrand::Rng::with_seed(7);
    let started = Instant::now();
    while kills < 22 {
        tokio::time::sleep(Duration::from_millis(rng.u64(500..2500))).await;
        child.start_kill().expect("SIGKILL");
        let _ = child.wait().await;
        kills += 1;
        if kills % 8 == 4 {
            // Neo4j goes down while walgraph is down, and comes back.
            services("restart-neo4j");
            neo4j_restarts += 1;
        }
        child = spawn();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.expect("writer");
    }
    let end = fx.wal_lsn().await;
    // Catch up, then compare.
    let want = pg_state(&fx).await;
    eventually(
        Duration::from_secs(120),
        "walgraph to catch up after the chaos",
        || async {
            (fx.checkpoint().await.unwrap_or_default() >= end || fx.confirmed_flush().await >= end)
                .then_some(())
        },
    )
    .await;
    let got = graph_state(&fx).await;
    child.start_kill().expect("stop");
    let _ = child.wait().await;
    eprintln!(
        "chaos: {writes} write transactions, {kills} SIGKILLs, {neo4j_restarts} Neo4j restarts in {:?}",
        started.elapsed()
    );
    assert!(kills >= 20 && neo4j_restarts >= 2);
    assert_eq!(got["users"], want["users"], "user nodes and properties");
    assert_eq!(got["orders"], want["orders"], "order nodes and properties");
    assert_eq!(
        got["placed"], want["placed"],
        "PLACED_BY relationships (no duplicates)"
    );
    assert_eq!(
        got["roles"], want["roles"],
        "HAS_ROLE relationships (no duplicates)"
    );
    assert_eq!(got["score_sum"], want["score_sum"], "sum of users.score");
    let _ = std::fs::remove_dir_all(&dir);
    fx.cleanup().await;
}
