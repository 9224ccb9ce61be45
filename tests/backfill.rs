//! Tables added to the mapping after the snapshot: `run` copies their rows
//! while it streams (issue 11), exactly, across a SIGKILL.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use walgraph::commands::reconcile::{reconcile, ReconcileOptions};
use walgraph::commands::snapshot::{snapshot, SnapshotOptions};
use walgraph::config::Config;

use crate::support::{eventually, free_address, http_get, pg, Fixture, SERVICES};

pub(crate) const DDL: &str = "
    CREATE TABLE {s}.items (id int PRIMARY KEY, qty int NOT NULL);
    CREATE TABLE {s}.notes (id int PRIMARY KEY, item_id int, n int NOT NULL, body text);
    ALTER TABLE {s}.notes ALTER COLUMN body SET STORAGE EXTERNAL;
    INSERT INTO {s}.items SELECT g, g FROM generate_series(1, 200) g;
    INSERT INTO {s}.notes SELECT g, g % 200 + 1, 0,
        CASE WHEN g % 97 = 0 THEN repeat('x', 100000) ELSE 'short ' || g END
    FROM generate_series(1, 8000) g;";

pub(crate) const ITEMS: &str = r#"
[[node]]
table = "{s}.items"
label = "{p}Item"
"#;

pub(crate) const NOTES: &str = r#"
[[node]]
table = "{s}.notes"
label = "{p}Note"

[[relationship]]
table = "{s}.notes"
type = "{p}ABOUT"
from = { label = "{p}Note", columns = ["id"] }
to = { label = "{p}Item", columns = ["item_id"] }
"#;

/// The snapshot record's tables copied and rows, as the graph has it.
pub(crate) async fn copied(fx: &Fixture) -> (Vec<String>, Option<String>, i64) {
    let rows = fx
        .graph
        .execute(
            neo4rs::query(
                "MATCH (s:WalgraphSnapshot {slot: $slot}) \
                 RETURN s.tables_done AS done, s.table AS table, s.rows AS rows",
            )
            .param("slot", fx.config.postgres.slot.as_str()),
        )
        .await;
    let Ok(mut rows) = rows else {
        return (Vec::new(), None, 0);
    };
    match rows.next().await {
        Ok(Some(r)) => (
            r.get::<Vec<String>>("done").unwrap_or_default(),
            r.get::<String>("table").ok(),
            r.get::<i64>("rows").unwrap_or(0),
        ),
        _ => (Vec::new(), None, 0),
    }
}

/// Changes rows of both tables until told to stop: updates that leave the
/// TOASTed body out, foreign keys moved, deletes, inserts, key changes.
pub(crate) fn writer(
    fx: &Fixture,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let env = fx.env.clone();
    let s = fx.schema.clone();
    tokio::spawn(async move {
        let pg = pg(&env).await;
        let mut i: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let id = fastrand::i64(1..=8000);
            let sql = match i % 6 {
                0 => format!("UPDATE {s}.notes SET n = n + 1 WHERE id = {id}"),
                1 => format!(
                    "UPDATE {s}.notes SET item_id = {} WHERE id = {id}",
                    fastrand::i64(1..=200)
                ),
                2 => format!("DELETE FROM {s}.notes WHERE id = {id}"),
                3 => format!(
                    "INSERT INTO {s}.notes VALUES ({}, {}, 1, 'new') ON CONFLICT DO NOTHING",
                    8000 + i,
                    fastrand::i64(1..=200)
                ),
                4 => format!("UPDATE {s}.notes SET id = {} WHERE id = {id}", 100_000 + i),
                _ => format!(
                    "UPDATE {s}.items SET qty = qty + 1 WHERE id = {}",
                    fastrand::i64(1..=200)
                ),
            };
            if pg.batch_execute(&sql).await.is_ok() {
                done.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

/// A whole snapshot in chunks of 1,000 rows.
pub(crate) async fn take_snapshot(cfg: &Config) {
    snapshot(
        cfg,
        &SnapshotOptions {
            chunk_rows: 1000,
            restart: false,
            progress_bar: false,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("snapshot: {}", walgraph::error_sentence(&e)));
}

/// Waits until `reconcile --dry-run` reports nothing; returns its report.
pub(crate) async fn caught_up(cfg: &Config) -> Vec<walgraph::commands::reconcile::TableReport> {
    eventually(
        Duration::from_secs(60),
        "the graph to equal the database",
        || async {
            let r = reconcile_report(cfg).await;
            r.iter().all(|t| !t.differs()).then_some(r)
        },
    )
    .await
}

pub(crate) async fn reconcile_report(
    cfg: &Config,
) -> Vec<walgraph::commands::reconcile::TableReport> {
    reconcile(
        cfg,
        &ReconcileOptions {
            table: None,
            repair: false,
            chunk_rows: 1000,
            progress_bar: false,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("reconcile: {}", walgraph::error_sentence(&e)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_the_mapping_is_copied_while_run_streams_even_across_a_sigkill() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(DDL, ITEMS).await;
    fx.setup().await;
    take_snapshot(&fx.config).await;
    let (done, _, snapshot_rows) = copied(&fx).await;
    assert_eq!(done.len(), 1, "{done:?}");

    // The notes join the mapping; `setup` adds them to the publication.
    let both = format!("{ITEMS}{NOTES}")
        .replace("{s}", &fx.schema)
        .replace("{p}", &fx.prefix);
    let parsed = Config::parse(&both).expect("mapping");
    fx.config.nodes = parsed.nodes;
    fx.config.relationships = parsed.relationships;
    fx.setup().await;
    let addr = free_address();
    let config = fx.config_file(
        "run.toml",
        &format!("[batch]\nmax_changes = 200\n[http]\nlisten = \"{addr}\""),
        &format!("{ITEMS}{NOTES}"),
    );
    let config = config.to_string_lossy().to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let w = writer(&fx, Arc::clone(&stop), Arc::clone(&writes));
    let mut run = fx.spawn(&["--config", &config, "run"]);
    // Killed in the middle of the copy, with the writer going on.
    eventually(
        Duration::from_secs(60),
        "the copy to be under way",
        || async {
            let (_, table, rows) = copied(&fx).await;
            (table.is_some_and(|t| t.ends_with(".notes")) && rows > snapshot_rows + 1000)
                .then_some(())
        },
    )
    .await;
    run.start_kill().expect("SIGKILL");
    let _ = run.wait().await;
    let (done, _, rows_at_kill) = copied(&fx).await;
    assert_eq!(
        done.len(),
        1,
        "the copy was killed before its end: {done:?}"
    );
    // Rows at or below the last key copied before the kill: a copy that
    // started over would read them again.
    let mut r = fx
        .graph
        .execute(
            neo4rs::query("MATCH (s:WalgraphSnapshot {slot: $slot}) RETURN s.last_key[0] AS k")
                .param("slot", fx.config.postgres.slot.as_str()),
        )
        .await
        .expect("last key");
    let last_key: i64 = r
        .next()
        .await
        .expect("row")
        .and_then(|row| row.get::<String>("k").ok())
        .and_then(|k| k.parse().ok())
        .expect("a last key while the copy is under way");
    let at_or_below: i64 = fx
        .pg
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.notes WHERE id <= {last_key}",
                fx.schema
            ),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    let writes_before = writes.load(Ordering::Relaxed);
    let st = walgraph::commands::status::collect(&fx.config, 0)
        .await
        .unwrap_or_else(|e| panic!("status: {}", walgraph::error_sentence(&e)));
    assert!(
        st.backfill.as_deref().is_some_and(|b| b.contains(".notes")),
        "status shows the copy under way: {:?}",
        st.backfill
    );

    let mut run = fx.spawn(&["--config", &config, "run"]);
    eventually(Duration::from_secs(120), "the copy to finish", || async {
        let (done, _, _) = copied(&fx).await;
        (done.len() == 2).then_some(())
    })
    .await;
    let metrics = http_get(&addr.to_string(), "/metrics")
        .await
        .expect("metrics")
        .1;
    stop.store(true, Ordering::Relaxed);
    w.await.expect("writer");
    assert!(
        writes.load(Ordering::Relaxed) > writes_before,
        "rows changed while the copy resumed"
    );
    let (_, _, rows_total) = copied(&fx).await;
    let above: i64 = fx
        .pg
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.notes WHERE id > {last_key}",
                fx.schema
            ),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(
        rows_total - rows_at_kill <= above + at_or_below / 2,
        "the copy resumed after its last chunk ({last_key}) rather than from the start: {rows_at_kill} then {rows_total}; {at_or_below} rows at or below, {above} above"
    );
    assert!(
        walgraph::http::metric(&metrics, "walgraph_backfill_rows_total").unwrap_or(0.0) > 0.0,
        "{metrics}"
    );
    assert_eq!(
        walgraph::http::metric(&metrics, "walgraph_backfill_tables_left"),
        Some(0.0),
        "{metrics}"
    );
    // Caught up, the graph equals the database.
    let report = caught_up(&fx.config).await;
    let notes = fx
        .cypher("MATCH (n:{p}Note) WHERE n._lsn IS NOT NULL RETURN count(n) AS n")
        .await;
    let rows: i64 = fx
        .pg
        .query_one(&format!("SELECT count(*) FROM {}.notes", fx.schema), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(notes, vec![serde_json::json!({"n": rows})], "{report:?}");
    let long = fx
        .cypher("MATCH (n:{p}Note) WHERE size(n.body) = 100000 RETURN count(n) AS n")
        .await;
    let long_rows: i64 = fx
        .pg
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.notes WHERE length(body) = 100000",
                fx.schema
            ),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        long,
        vec![serde_json::json!({"n": long_rows})],
        "TOASTed values copied"
    );
    let _ = run.start_kill();
    let _ = run.wait().await;
    fx.cleanup().await;
}

/// Counts of `MATCH (n:{p}Item) WHERE <cond>`.
async fn items_where(fx: &Fixture, cond: &str) -> i64 {
    fx.cypher(&format!(
        "MATCH (n:{{p}}Item) WHERE {cond} RETURN count(n) AS n"
    ))
    .await
    .first()
    .and_then(|r| r["n"].as_i64())
    .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_added_dropped_renamed_or_retyped_are_followed_running_or_stopped() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(
        "CREATE TABLE {s}.items (id int PRIMARY KEY, a int NOT NULL, b text, c int, d text, e int);
         INSERT INTO {s}.items SELECT g, g, 'b' || g, g, repeat('d', g % 7), g FROM generate_series(1, 3000) g;",
        "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\nexclude = [\"e\"]\n",
    )
    .await;
    fx.config.batch.max_changes = 500;
    fx.setup().await;
    take_snapshot(&fx.config).await;
    let run = fx.start();
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let env = fx.env.clone();
        let s = fx.schema.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let pg = pg(&env).await;
            while !stop.load(Ordering::Relaxed) {
                let _ = pg
                    .batch_execute(&format!(
                        "UPDATE {s}.items SET a = a + 1 WHERE id = {}",
                        fastrand::i64(1..=3000)
                    ))
                    .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // While run streams and rows keep changing: a column added with a
    // default (no WAL for the rows it fills), one dropped, one renamed, one
    // given another type.
    fx.sql(
        "ALTER TABLE {s}.items ADD COLUMN f int DEFAULT 7;
         ALTER TABLE {s}.items DROP COLUMN b;
         ALTER TABLE {s}.items RENAME COLUMN c TO c2;
         ALTER TABLE {s}.items ALTER COLUMN d TYPE int USING length(d);",
    )
    .await;
    eventually(Duration::from_secs(90), "the graph to follow the columns", || async {
        let left = items_where(
            &fx,
            "n.b IS NOT NULL OR n.c IS NOT NULL OR n.f IS NULL OR n.c2 IS NULL OR valueType(n.d) <> 'INTEGER NOT NULL'",
        )
        .await;
        (left == 0).then_some(())
    })
    .await;
    assert!(
        !run.handle.is_finished(),
        "run goes on after the columns changed"
    );
    stop.store(true, Ordering::Relaxed);
    w.await.expect("writer");
    let report = caught_up(&fx.config).await;
    assert_eq!(items_where(&fx, "n.e IS NOT NULL").await, 0, "{report:?}");
    // On a quiet table (no row change after the DDL, so pgoutput announces
    // nothing): found in the catalog within seconds.
    fx.sql(
        "ALTER TABLE {s}.items ADD COLUMN h int DEFAULT 3;
         ALTER TABLE {s}.items DROP COLUMN c2;",
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "a quiet table's columns followed",
        || async {
            let left = items_where(&fx, "n.c2 IS NOT NULL OR n.h IS NULL OR n.h <> 3").await;
            (left == 0).then_some(())
        },
    )
    .await;
    run.stop().await;

    // While walgraph is stopped: found at the next start.
    fx.sql(
        "ALTER TABLE {s}.items ADD COLUMN g text DEFAULT 'gee';
         ALTER TABLE {s}.items DROP COLUMN a;",
    )
    .await;
    let run = fx.start();
    eventually(
        Duration::from_secs(60),
        "the graph to follow the columns",
        || async {
            let left = items_where(&fx, "n.a IS NOT NULL OR n.g IS NULL OR n.g <> 'gee'").await;
            (left == 0).then_some(())
        },
    )
    .await;
    let report = reconcile_report(&fx.config).await;
    assert!(report.iter().all(|t| !t.differs()), "{report:?}");
    assert_eq!(items_where(&fx, "true").await, 3000);
    run.stop().await;
    fx.cleanup().await;
}
