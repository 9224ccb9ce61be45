//! A transaction larger than a batch is applied across several Neo4j
//! transactions, and a crash in the middle of it neither loses nor repeats
//! a change.

use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, Fixture, SERVICES};

const DDL: &str =
    "CREATE TABLE {s}.items (id int PRIMARY KEY, grp int NOT NULL, val int NOT NULL);";

const MAPPING: &str = r#"
[[node]]
table = "{s}.items"
label = "{p}Item"
"#;

const ROWS: i64 = 20_000;

/// One transaction: 20,000 inserts, then 10,000 updates and 2,000 deletes
/// of the rows it inserted (32,000 changes, 64 batches of 500).
async fn big_transaction(fx: &Fixture) {
    fx.sql(&format!(
        "BEGIN;
         INSERT INTO {{s}}.items SELECT g, g % 10, 0 FROM generate_series(1, {ROWS}) g ORDER BY g;
         UPDATE {{s}}.items SET val = id WHERE id % 2 = 0;
         DELETE FROM {{s}}.items WHERE id % 10 = 3;
         COMMIT;"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_a_batch_survives_sigkill_in_its_middle_exactly_once() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    let config = fx.config_file("large.toml", "[batch]\nmax_changes = 500\n", MAPPING);
    let config = config.to_string_lossy().into_owned();
    let mut child = fx.spawn(&["--config", &config, "run"]);
    let before = fx.wal_lsn().await;

    big_transaction(&fx).await;
    let txn_end = fx.wal_lsn().await;

    // Kill walgraph once the graph holds part of the transaction.
    let (partial_end, applied) = eventually(
        Duration::from_secs(120),
        "a checkpoint inside the transaction",
        || async { fx.checkpoint_partial().await.filter(|(_, n)| *n > 0) },
    )
    .await;
    child.start_kill().expect("SIGKILL");
    let _ = child.wait().await;
    assert!(
        partial_end > before && partial_end <= txn_end,
        "the partial transaction is the big one: {partial_end} in ({before}, {txn_end}]"
    );
    let applied_now = fx.checkpoint_partial().await.map_or(0, |p| p.1);
    assert!(
        applied_now >= applied && applied_now < 32_000,
        "killed in the middle: {applied_now} of 32000 changes applied"
    );
    assert!(
        fx.confirmed_flush().await < partial_end,
        "Postgres is not told about a transaction applied in part"
    );

    // Behind walgraph's back: remove a node the applied part created. If the
    // restart applied the transaction's first changes again, it would return.
    let gone = fx
        .cypher("MATCH (i:{p}Item {id: 1}) DETACH DELETE i RETURN count(*) AS n")
        .await;
    assert_eq!(gone, vec![json!({"n": 1})], "row 1 was in the applied part");

    let mut child = fx.spawn(&["--config", &config, "run"]);
    let want_nodes = ROWS - ROWS / 10 - 1; // deleted by the transaction, and node 1
    eventually(
        Duration::from_secs(180),
        "the rest of the transaction",
        || async {
            let n = fx.cypher("MATCH (i:{p}Item) RETURN count(i) AS n").await;
            (n == vec![json!({"n": want_nodes})] && fx.checkpoint_partial().await.is_none())
                .then_some(())
        },
    )
    .await;
    let cp = fx.checkpoint().await.expect("a checkpoint");
    assert!(
        cp >= partial_end,
        "the checkpoint moved past the transaction"
    );

    // Every other row is exactly as in Postgres.
    let sums = fx
        .cypher(
            "MATCH (i:{p}Item) RETURN sum(i.val) AS val, sum(i.id) AS id, \
             count(CASE WHEN i.id % 10 = 3 THEN 1 END) AS deleted",
        )
        .await;
    let pg = fx
        .pg
        .query_one(
            &format!(
                "SELECT sum(val)::bigint, (sum(id) - 1)::bigint FROM {}.items",
                fx.schema
            ),
            &[],
        )
        .await
        .expect("sums");
    let (val, id): (i64, i64) = (pg.get(0), pg.get(1));
    assert_eq!(sums, vec![json!({"val": val, "id": id, "deleted": 0})]);
    assert!(fx
        .cypher("MATCH (i:{p}Item {id: 1}) RETURN i")
        .await
        .is_empty());

    child.start_kill().expect("stop");
    let _ = child.wait().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_inside_a_split_transaction_survives_a_second_sigkill() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    let config = fx.config_file("resume.toml", "[batch]\nmax_changes = 500\n", MAPPING);
    let config = config.to_string_lossy().into_owned();
    let mut child = fx.spawn(&["--config", &config, "run"]);

    // A small transaction first, so the stored checkpoint is not zero.
    fx.sql("INSERT INTO {s}.items VALUES (0, 0, 0)").await;
    eventually(Duration::from_secs(60), "the small transaction", || async {
        let n = fx
            .cypher("MATCH (i:{p}Item {id: 0}) RETURN count(i) AS n")
            .await;
        (n == vec![json!({"n": 1})] && fx.checkpoint().await.is_some()).then_some(())
    })
    .await;
    big_transaction(&fx).await;

    // First kill, during the inserts.
    let _ = eventually(
        Duration::from_secs(120),
        "a checkpoint inside the transaction",
        || async { fx.checkpoint_partial().await.filter(|(_, n)| *n > 0) },
    )
    .await;
    child.start_kill().expect("SIGKILL");
    let _ = child.wait().await;
    let (end, n1) = fx.checkpoint_partial().await.expect("a partial checkpoint");
    assert!(n1 < 20_000, "killed during the inserts: {n1}");

    // Restart: the checkpoint must move on inside the same transaction.
    let mut child = fx.spawn(&["--config", &config, "run"]);
    let _ = eventually(
        Duration::from_secs(120),
        "the checkpoint to move inside the resumed transaction",
        || async {
            fx.checkpoint_partial()
                .await
                .filter(|(e, n)| *e == end && *n > n1 + 1000)
        },
    )
    .await;
    child.start_kill().expect("SIGKILL");
    let _ = child.wait().await;
    let (_, n2) = fx.checkpoint_partial().await.expect("still in part");
    assert!(fx.confirmed_flush().await < end, "not confirmed in part");

    // Behind walgraph's back: delete a node applied after the first restart.
    let k = (n1 + 1..=n2.min(ROWS))
        .find(|i| i % 10 != 3)
        .expect("an id applied after the restart");
    let gone = fx
        .cypher(&format!(
            "MATCH (i:{{p}}Item {{id: {k}}}) DETACH DELETE i RETURN count(*) AS n"
        ))
        .await;
    assert_eq!(gone, vec![json!({"n": 1})], "row {k} was applied");

    let mut child = fx.spawn(&["--config", &config, "run"]);
    let want = ROWS - ROWS / 10 + 1 - 1; // with row 0, without row k
    eventually(
        Duration::from_secs(180),
        "the rest of the transaction",
        || async {
            let n = fx.cypher("MATCH (i:{p}Item) RETURN count(i) AS n").await;
            (fx.checkpoint_partial().await.is_none() && n == vec![json!({"n": want})]).then_some(())
        },
    )
    .await;
    assert!(
        fx.cypher(&format!("MATCH (i:{{p}}Item {{id: {k}}}) RETURN i"))
            .await
            .is_empty(),
        "row {k}, applied before the second kill, was not applied again"
    );
    child.start_kill().expect("stop");
    let _ = child.wait().await;
    fx.cleanup().await;
}

/// A backlog written while walgraph was stopped: batches may grow past
/// `batch.max_changes` up to `batch.max_changes_behind`, never beyond, and
/// the graph ends exactly as the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_written_in_batches_within_max_changes_behind_exactly() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    // 20 transactions of 500 inserts, then 10 of 500 updates: 15,000 changes.
    for t in 0..20 {
        fx.sql(&format!(
            "INSERT INTO {{s}}.items SELECT g, g % 10, 0 FROM generate_series({}, {}) g",
            t * 500 + 1,
            t * 500 + 500
        ))
        .await;
    }
    for t in 0..10 {
        fx.sql(&format!(
            "UPDATE {{s}}.items SET val = id + {t} WHERE id BETWEEN {} AND {}",
            t * 1000 + 1,
            t * 1000 + 500
        ))
        .await;
    }
    let changes = 15_000.0;
    let addr = crate::support::free_address();
    let config = fx.config_file(
        "backlog.toml",
        &format!(
            "[batch]\nmax_changes = 300\nmax_changes_behind = 600\n[http]\nlisten = \"{addr}\"\n"
        ),
        MAPPING,
    );
    let config = config.to_string_lossy().into_owned();
    let mut child = fx.spawn(&["--config", &config, "run"]);
    let metrics = eventually(Duration::from_secs(120), "the backlog applied", || async {
        let (_, m) = crate::support::http_get(&addr.to_string(), "/metrics").await?;
        (walgraph::http::metric(&m, "walgraph_changes_applied_total") == Some(changes)).then_some(m)
    })
    .await;
    let metric = |name: &str| walgraph::http::metric(&metrics, name).unwrap_or(f64::NAN);
    let batches = metric("walgraph_batches_committed_total");
    assert!(
        batches >= changes / 600.0,
        "no batch holds more than max_changes_behind: {batches} batches for {changes} changes"
    );
    let limit = metric("walgraph_batch_limit");
    assert!((300.0..=600.0).contains(&limit), "the limit now: {limit}");

    let graph = fx
        .cypher("MATCH (i:{p}Item) RETURN count(i) AS n, sum(i.val) AS val")
        .await;
    let pg = fx
        .pg
        .query_one(
            &format!("SELECT count(*), sum(val)::bigint FROM {}.items", fx.schema),
            &[],
        )
        .await
        .expect("sums");
    let (n, val): (i64, i64) = (pg.get(0), pg.get(1));
    assert_eq!(graph, vec![json!({"n": n, "val": val})]);
    child.start_kill().expect("stop");
    let _ = child.wait().await;
    fx.cleanup().await;
}
