//! Past one process: two walgraph processes, each with its own slot and
//! publication over a disjoint set of tables, write one Neo4j; their
//! relationships meet through placeholder nodes. Under SIGKILLs of either,
//! the graph ends equal to the database.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use walgraph::lsn::Lsn;

use crate::support::{eventually, Fixture, SERVICES};

const DDL: &str = "
CREATE TABLE {s}.customers (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE {s}.products (id int PRIMARY KEY, title text NOT NULL);
CREATE TABLE {s}.orders (id int PRIMARY KEY, customer_id int REFERENCES {s}.customers ON DELETE SET NULL,
                         total int NOT NULL);
CREATE TABLE {s}.order_items (order_id int REFERENCES {s}.orders ON DELETE CASCADE,
                              product_id int REFERENCES {s}.products ON DELETE CASCADE,
                              qty int NOT NULL, PRIMARY KEY (order_id, product_id));
INSERT INTO {s}.products SELECT g, 'product ' || g FROM generate_series(1, 20) g;
";

/// Shard A: the customers and products.
const SHARD_A: &str = r#"
[[node]]
table = "{s}.customers"
label = "{p}Customer"
[[node]]
table = "{s}.products"
label = "{p}Product"
"#;

/// Shard B: the orders, pointing at A's labels.
const SHARD_B: &str = r#"
[[node]]
table = "{s}.orders"
label = "{p}Order"
[[relationship]]
table = "{s}.orders"
type = "{p}PLACED_BY"
from = { label = "{p}Order", columns = ["id"] }
to = { label = "{p}Customer", columns = ["customer_id"] }
[[relationship]]
table = "{s}.order_items"
type = "{p}CONTAINS"
from = { label = "{p}Order", columns = ["order_id"] }
to = { label = "{p}Product", columns = ["product_id"] }
properties = ["qty"]
[[external]]
label = "{p}Customer"
key = ["id"]
[[external]]
label = "{p}Product"
key = ["id"]
"#;

async fn random_write(pg: &tokio_postgres::Client, s: &str, rng: &mut fastrand::Rng) {
    let c = rng.i32(1..=40);
    let o = rng.i32(1..=80);
    let p = rng.i32(1..=20);
    let v = rng.i32(0..1000);
    let sql = match rng.u8(..10) {
        0..=1 => format!("INSERT INTO {s}.customers VALUES ({c}, 'c{v}') ON CONFLICT (id) DO UPDATE SET name = excluded.name"),
        2 => format!("DELETE FROM {s}.customers WHERE id = {c}"),
        3 => format!("UPDATE {s}.products SET title = 'p{v}' WHERE id = {p}"),
        4..=5 => format!(
            "INSERT INTO {s}.customers VALUES ({c}, 'c{v}') ON CONFLICT (id) DO NOTHING;
             INSERT INTO {s}.orders VALUES ({o}, {c}, {v}) ON CONFLICT (id) DO UPDATE SET customer_id = excluded.customer_id, total = excluded.total"
        ),
        6 => format!("DELETE FROM {s}.orders WHERE id = {o}"),
        7..=8 => format!("INSERT INTO {s}.order_items SELECT {o}, {p}, {v} WHERE EXISTS (SELECT 1 FROM {s}.orders WHERE id = {o}) ON CONFLICT (order_id, product_id) DO UPDATE SET qty = excluded.qty"),
        _ => format!("DELETE FROM {s}.order_items WHERE order_id = {o} AND product_id = {p}"),
    };
    if pg
        .batch_execute(&format!("BEGIN; {sql}; COMMIT"))
        .await
        .is_err()
    {
        let _ = pg.batch_execute("ROLLBACK").await;
    }
}

/// What the database holds, in the graph's terms.
async fn database(fx: &Fixture) -> serde_json::Value {
    let s = &fx.schema;
    let rows = |sql: String| async move { fx.pg.query(&sql, &[]).await.expect("query") };
    let customers: BTreeMap<i32, String> = rows(format!("SELECT id, name FROM {s}.customers"))
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let products: BTreeMap<i32, String> = rows(format!("SELECT id, title FROM {s}.products"))
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let orders: BTreeMap<i32, i32> = rows(format!("SELECT id, total FROM {s}.orders"))
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let placed: Vec<(i32, i32)> = rows(format!(
        "SELECT id, customer_id FROM {s}.orders WHERE customer_id IS NOT NULL ORDER BY 1"
    ))
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let contains: Vec<(i32, i32, i32)> = rows(format!(
        "SELECT order_id, product_id, qty FROM {s}.order_items ORDER BY 1, 2"
    ))
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect();
    json!({"customers": customers, "products": products, "orders": orders, "placed": placed, "contains": contains})
}

/// What the graph holds: nodes that carry a row (placeholders aside), and
/// every relationship.
async fn graph(fx: &Fixture) -> serde_json::Value {
    let pairs = |q: &str| {
        let q = q.to_string();
        async move {
            fx.cypher(&q)
                .await
                .into_iter()
                .map(|r| (r["k"].as_i64().unwrap_or(-1), r["v"].clone()))
                .collect::<BTreeMap<i64, serde_json::Value>>()
        }
    };
    let customers =
        pairs("MATCH (n:{p}Customer) WHERE n._lsn IS NOT NULL RETURN n.id AS k, n.name AS v").await;
    let products =
        pairs("MATCH (n:{p}Product) WHERE n._lsn IS NOT NULL RETURN n.id AS k, n.title AS v").await;
    let orders =
        pairs("MATCH (n:{p}Order) WHERE n._lsn IS NOT NULL RETURN n.id AS k, n.total AS v").await;
    let placed: Vec<(i64, i64)> = fx
        .cypher("MATCH (o:{p}Order)-[:{p}PLACED_BY]->(c:{p}Customer) RETURN o.id AS o, c.id AS c ORDER BY o, c")
        .await
        .iter()
        .map(|r| (r["o"].as_i64().unwrap_or(-1), r["c"].as_i64().unwrap_or(-1)))
        .collect();
    let contains: Vec<(i64, i64, i64)> = fx
        .cypher("MATCH (o:{p}Order)-[r:{p}CONTAINS]->(p:{p}Product) RETURN o.id AS o, p.id AS p, r.qty AS q ORDER BY o, p")
        .await
        .iter()
        .map(|r| {
            (
                r["o"].as_i64().unwrap_or(-1),
                r["p"].as_i64().unwrap_or(-1),
                r["q"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    json!({"customers": customers, "products": products, "orders": orders, "placed": placed, "contains": contains})
}

async fn checkpoint_of(fx: &Fixture, slot: &str) -> Option<Lsn> {
    let rows = fx
        .cypher(&format!(
            "MATCH (c:WalgraphCheckpoint {{slot: '{slot}'}}) RETURN c.lsn AS lsn"
        ))
        .await;
    rows.first()
        .and_then(|r| r["lsn"].as_i64())
        .map(Lsn::from_i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_disjoint_tables_build_one_graph_under_sigkills() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(DDL, SHARD_A).await;
    let a = fx.config_file("shard-a.toml", "", SHARD_A);
    // Shard B: a slot and publication of its own, and the routing scheme
    // (neo4j://), which a single server answers as one member.
    let slot_b = format!("{}_b", fx.config.postgres.slot);
    let publication_b = format!("{}_b", fx.config.postgres.publication);
    let b = fx.config_file("shard-b.toml", "", SHARD_B);
    let text = std::fs::read_to_string(&b).expect("config");
    let text = text
        .replacen(
            &format!("slot = \"{}\"", fx.config.postgres.slot),
            &format!("slot = \"{slot_b}\""),
            1,
        )
        .replacen(
            &format!("publication = \"{}\"", fx.config.postgres.publication),
            &format!("publication = \"{publication_b}\""),
            1,
        );
    std::fs::write(&b, text).expect("config");
    let (a, b) = (
        a.to_string_lossy().into_owned(),
        b.to_string_lossy().into_owned(),
    );
    let routed = fx.env.neo4j_uri.replacen("bolt://", "neo4j://", 1);
    for config in [&a, &b] {
        let out = fx.walgraph(&["--config", config, "setup"]).await;
        assert!(
            out.status.success(),
            "setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let spawn_b = || {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"));
        cmd.args(["--config", &b, "run"])
            .envs(fx.env.vars())
            .env("WALGRAPH_NEO4J_URI", &routed)
            .env("WALGRAPH_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd.spawn().expect("start shard b")
    };
    let mut run_a = fx.spawn(&["--config", &a, "run"]);
    let mut run_b = spawn_b();

    let writer = {
        let env = fx.env.clone();
        let s = fx.schema.clone();
        tokio::spawn(async move {
            let pg = crate::support::pg(&env).await;
            let mut rng = fastrand::Rng::with_seed(7);
            let until = tokio::time::Instant::now() + Duration::from_secs(20);
            while tokio::time::Instant::now() < until {
                random_write(&pg, &s, &mut rng).await;
            }
        })
    };
    let mut kills = 0;
    while !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if kills % 2 == 0 {
            run_a.start_kill().expect("SIGKILL a");
            let _ = run_a.wait().await;
            run_a = fx.spawn(&["--config", &a, "run"]);
        } else {
            run_b.start_kill().expect("SIGKILL b");
            let _ = run_b.wait().await;
            run_b = spawn_b();
        }
        kills += 1;
    }
    writer.await.expect("writer");
    assert!(
        kills >= 4,
        "each process was killed during the writes ({kills})"
    );
    let target = fx.wal_lsn().await;
    for slot in [fx.config.postgres.slot.clone(), slot_b.clone()] {
        eventually(
            Duration::from_secs(120),
            "both shards to catch up",
            || async { checkpoint_of(&fx, &slot).await.filter(|c| *c >= target) },
        )
        .await;
    }
    let want = database(&fx).await;
    assert_eq!(graph(&fx).await, want, "the graph equals the database");
    // A placeholder left over is a key the other shard deleted before this
    // one applied a reference to it: no property, no relationship.
    let leftover = fx
        .cypher(
            "MATCH (n) WHERE (n:{p}Customer OR n:{p}Product OR n:{p}Order) AND n._lsn IS NULL \
             RETURN count(n) AS n, count(CASE WHEN EXISTS { (n)--() } OR size(keys(n)) > 1 THEN 1 END) AS busy",
        )
        .await;
    assert_eq!(leftover[0]["busy"], json!(0), "{leftover:?}");
    for (child, name) in [(run_a, "a"), (run_b, "b")] {
        let out = crate::support::sigterm_and_wait(child).await;
        assert!(out.status.success(), "shard {name} stops cleanly");
    }
    // Each shard's reconcile agrees.
    for config in [&a, &b] {
        let out = fx
            .walgraph(&["--config", config, "reconcile", "--dry-run"])
            .await;
        assert!(
            out.status.success(),
            "reconcile: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = fx
        .pg
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot_b.as_str()])
        .await;
    let _ = fx
        .pg
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {publication_b}"))
        .await;
    fx.cypher_write(&format!(
        "MATCH (c:WalgraphCheckpoint {{slot: '{slot_b}'}}) DETACH DELETE c"
    ))
    .await;
    fx.cleanup().await;
}
