//! Exactness in the ordinary life of a database: server settings other than
//! the defaults, and the other cases a careful reader finds (issue 10).

use std::time::Duration;

use walgraph::commands::reconcile::{reconcile, ReconcileOptions};
use walgraph::commands::snapshot::{snapshot, SnapshotOptions};

use crate::support::{eventually, url_as, Fixture, SERVICES};

/// One table `items (id)` mapped to `{p}Item`, set up, and a config file
/// with that mapping for a `walgraph` child process.
async fn items_with_config_file(name: &str) -> (Fixture, std::path::PathBuf) {
    const MAPPING: &str = "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n";
    let fx = Fixture::new("CREATE TABLE {s}.items (id int PRIMARY KEY);", MAPPING).await;
    fx.setup().await;
    let config = fx.config_file(name, "", MAPPING);
    (fx, config)
}

/// A whole snapshot in chunks of 100 rows.
async fn take_snapshot(
    cfg: &walgraph::config::Config,
) -> walgraph::commands::snapshot::SnapshotReport {
    snapshot(
        cfg,
        &SnapshotOptions {
            chunk_rows: 100,
            restart: false,
            progress_bar: false,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("snapshot: {}", walgraph::error_sentence(&e)))
}

/// Reconciles every table in chunks of 100 rows, repairing or not.
async fn reconcile_all(
    cfg: &walgraph::config::Config,
    repair: bool,
) -> Vec<walgraph::commands::reconcile::TableReport> {
    reconcile(
        cfg,
        &ReconcileOptions {
            table: None,
            repair,
            chunk_rows: 100,
            progress_bar: false,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("reconcile: {}", walgraph::error_sentence(&e)))
}

/// A superuser whose sessions default to other output formats than walgraph
/// reads: as if the database had been configured so.
async fn role_with_other_formats(fx: &Fixture) -> (String, String) {
    let role = format!("wgt_fmt_{}", fx.id);
    let password: String = (0..20).map(|_| fastrand::alphanumeric()).collect();
    fx.pg
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN SUPERUSER REPLICATION PASSWORD '{password}';
             ALTER ROLE {role} SET timezone = 'Europe/Berlin';
             ALTER ROLE {role} SET DateStyle = 'German';
             ALTER ROLE {role} SET IntervalStyle = 'sql_standard';"
        ))
        .await
        .expect("create the role");
    (role, password)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_under_other_server_formats_stores_what_streaming_stores() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(
        "CREATE TABLE {s}.events (id int PRIMARY KEY, at timestamptz, day date, local timestamp,
                                  dur interval, clock time, amount numeric, ratio float8);
         INSERT INTO {s}.events VALUES
           (1, '2026-03-29 01:30:00+00', '2026-12-24', '2026-12-24 18:00:00', '1 day 02:03:04.5',
            '23:59:59', 12.50, 0.1);",
        "[[node]]\ntable = \"{s}.events\"\nlabel = \"{p}Event\"\n",
    )
    .await;
    let (role, password) = role_with_other_formats(&fx).await;
    fx.config.postgres.url = Some(url_as(&fx.env.pg_url, &role, Some(&password)));
    fx.setup().await;
    take_snapshot(&fx.config).await;
    let run = fx.start();
    // The same values again, streamed.
    fx.sql(
        "INSERT INTO {s}.events SELECT 2, at, day, local, dur, clock, amount, ratio
           FROM {s}.events WHERE id = 1",
    )
    .await;
    let q = "MATCH (n:{p}Event) RETURN n.id AS id, \
             [k IN ['at', 'day', 'local', 'dur', 'clock', 'amount', 'ratio'] | \
              [k, valueType(n[k]), toString(n[k])]] AS props ORDER BY id";
    let rows = eventually(Duration::from_secs(30), "the streamed row", || async {
        let rows = fx.cypher(q).await;
        (rows.len() == 2).then_some(rows)
    })
    .await;
    run.stop().await;
    assert_eq!(
        rows[0]["props"], rows[1]["props"],
        "the copied row (id 1) and the streamed one (id 2) hold the same values and types"
    );
    let type_of = |i: usize| rows[0]["props"][i][1].as_str().unwrap_or("").to_string();
    assert!(
        type_of(0).starts_with("ZONED DATETIME"),
        "an instant, not text: {}",
        rows[0]
    );
    assert!(
        type_of(1).starts_with("DATE"),
        "a date, not text: {}",
        rows[0]
    );
    assert!(
        type_of(3).starts_with("DURATION"),
        "an interval is a duration: {}",
        rows[0]
    );
    let reports = reconcile_all(&fx.config, false).await;
    assert!(
        reports.iter().all(|r| !r.differs()),
        "reconcile right after the snapshot finds nothing: {reports:?}"
    );
    let pg = crate::support::pg(&fx.env).await;
    fx.cleanup().await;
    let _ = pg
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let _shared = SERVICES.read().await;
    let (fx, config) = items_with_config_file("log.toml").await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
        .args(["--config", &config.to_string_lossy(), "status"])
        .envs(fx.env.vars())
        .env("WALGRAPH_LOG", "debug")
        .output()
        .await
        .expect("walgraph status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status failed: {stderr}");
    assert!(
        stderr.contains("DEBUG"),
        "debug log lines were written: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "no terminal escape codes in a log written to a pipe: {:?}",
        stderr.lines().next()
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_key_changed_twice_in_one_batch_ends_at_the_last_target() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.users (id int PRIMARY KEY);
         CREATE TABLE {s}.orders (id int PRIMARY KEY, user_id int REFERENCES {s}.users);",
        r#"
[[node]]
table = "{s}.users"
label = "{p}User"
[[node]]
table = "{s}.orders"
label = "{p}Order"
[[relationship]]
table = "{s}.orders"
type = "{p}PLACED_BY"
from = { label = "{p}Order", columns = ["id"] }
to = { label = "{p}User", columns = ["user_id"] }
"#,
    )
    .await;
    fx.setup().await;
    let run = fx.start();
    // One transaction: the coalesced-away edges (to users 1 and 2) go
    // through the conditional placeholder statement.
    fx.sql(
        "BEGIN;
         INSERT INTO {s}.users SELECT generate_series(1, 3);
         INSERT INTO {s}.orders VALUES (1, 1);
         UPDATE {s}.orders SET user_id = 2 WHERE id = 1;
         UPDATE {s}.orders SET user_id = 3 WHERE id = 1;
         COMMIT;",
    )
    .await;
    let rows = eventually(Duration::from_secs(30), "the order's last user", || async {
        let rows = fx
            .cypher(
                "MATCH (o:{p}Order {id: 1})-[:{p}PLACED_BY]->(u:{p}User) \
                 RETURN u.id AS u, count{(:{p}User)} AS users",
            )
            .await;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    run.stop().await;
    assert_eq!(rows, vec![serde_json::json!({"u": 3, "users": 3})]);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn peek_never_turns_two_phase_decoding_on_for_walgraphs_slot() {
    let _shared = SERVICES.read().await;
    let (fx, config) = items_with_config_file("peek.toml").await;
    let config = config.to_string_lossy().into_owned();
    let out = fx
        .walgraph(&[
            "--config",
            &config,
            "peek",
            "--two-phase",
            "--idle-timeout",
            "1s",
        ])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "peek --two-phase on the slot is refused"
    );
    assert!(
        stderr.contains("--temporary"),
        "and says what to do: {stderr}"
    );
    let two_phase: bool = fx
        .pg
        .query_one(
            "SELECT two_phase FROM pg_replication_slots WHERE slot_name = $1",
            &[&fx.config.postgres.slot],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(!two_phase, "the slot is as setup made it");
    // And run streams from it as ever.
    let run = fx.start();
    fx.sql("INSERT INTO {s}.items VALUES (1)").await;
    eventually(Duration::from_secs(30), "the row", || async {
        (fx.cypher("MATCH (n:{p}Item) RETURN n.id AS id").await.len() == 1).then_some(())
    })
    .await;
    run.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_columns_never_stop_run_and_map_the_same_in_snapshot_and_stream() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.lines (id int PRIMARY KEY, qty int NOT NULL, price numeric NOT NULL,
                                 total numeric GENERATED ALWAYS AS (qty * price) STORED,
                                 words tsvector GENERATED ALWAYS AS (to_tsvector('simple', 'x' || id)) STORED);
         INSERT INTO {s}.lines (id, qty, price) VALUES (1, 2, 3.5);",
        "[[node]]\ntable = \"{s}.lines\"\nlabel = \"{p}Line\"\n",
    )
    .await;
    fx.setup().await;
    take_snapshot(&fx.config).await;
    let run = fx.start();
    fx.sql(
        "INSERT INTO {s}.lines (id, qty, price) VALUES (2, 2, 3.5);
         UPDATE {s}.lines SET qty = 4 WHERE id = 1;",
    )
    .await;
    let q = "MATCH (n:{p}Line) RETURN n.id AS id, keys(n) AS keys ORDER BY id";
    eventually(Duration::from_secs(30), "both rows streamed", || async {
        let rows = fx
            .cypher("MATCH (n:{p}Line) WHERE n.qty = 4 OR n.id = 2 RETURN count(n) AS n")
            .await;
        (rows == vec![serde_json::json!({"n": 2})]).then_some(())
    })
    .await;
    assert!(
        !run.handle.is_finished(),
        "run still streams after changes to a table with generated columns"
    );
    let shapes = fx.cypher(q).await;
    run.stop().await;
    assert_eq!(
        shapes[0]["keys"].as_array().map(|k| {
            let mut k: Vec<String> = k.iter().map(|v| v.to_string()).collect();
            k.sort();
            k
        }),
        shapes[1]["keys"].as_array().map(|k| {
            let mut k: Vec<String> = k.iter().map(|v| v.to_string()).collect();
            k.sort();
            k
        }),
        "the copied row and the streamed row have the same properties: {shapes:?}"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_key_that_is_not_the_replica_identity_is_refused_or_followed_exactly() {
    let _shared = SERVICES.read().await;
    let mapping = "[[node]]\ntable = \"{s}.people\"\nlabel = \"{p}Person\"\nkey = [\"email\"]\n";
    let fx = Fixture::new(
        "CREATE TABLE {s}.people (id int PRIMARY KEY, email text NOT NULL UNIQUE, name text);
         CREATE TABLE {s}.codes (id int PRIMARY KEY, code text UNIQUE);
         ALTER TABLE {s}.codes REPLICA IDENTITY FULL;",
        mapping,
    )
    .await;
    let refused = walgraph::commands::setup::setup(&fx.config)
        .await
        .map(|_| ())
        .expect_err("a key outside the replica identity is refused");
    let sentence = walgraph::error_sentence(&refused);
    assert!(
        sentence.contains("replica identity") && sentence.contains("REPLICA IDENTITY USING INDEX"),
        "{sentence}"
    );
    // A nullable unique key, even with REPLICA IDENTITY FULL: refused too.
    let mut nullable = fx.config.clone();
    let other = walgraph::config::Config::parse(
        &"[[node]]\ntable = \"{s}.codes\"\nlabel = \"{p}Code\"\nkey = [\"code\"]\n"
            .replace("{s}", &fx.schema)
            .replace("{p}", &fx.prefix),
    )
    .expect("mapping");
    nullable.nodes = other.nodes;
    let refused = walgraph::commands::setup::setup(&nullable)
        .await
        .map(|_| ())
        .expect_err("a nullable key is refused");
    assert!(
        walgraph::error_sentence(&refused).contains("may be NULL"),
        "{}",
        walgraph::error_sentence(&refused)
    );

    // With the key's index as the replica identity, re-keys and deletes are exact.
    fx.sql("ALTER TABLE {s}.people REPLICA IDENTITY USING INDEX people_email_key")
        .await;
    fx.setup().await;
    let run = fx.start();
    fx.sql(
        "INSERT INTO {s}.people VALUES (1, 'a@x', 'A'), (2, 'c@x', 'C');
         UPDATE {s}.people SET email = 'b@x' WHERE id = 1;
         DELETE FROM {s}.people WHERE id = 2;",
    )
    .await;
    let want = vec![serde_json::json!({"email": "b@x", "name": "A"})];
    eventually(
        Duration::from_secs(30),
        "the re-keyed row alone",
        || async {
            let rows = fx
                .cypher(
                    "MATCH (n:{p}Person) RETURN n.email AS email, n.name AS name ORDER BY email",
                )
                .await;
            (rows == want).then_some(())
        },
    )
    .await;
    run.stop().await;
    fx.cleanup().await;
}

/// Waits for an in-process `run` to stop by itself; returns its error sentence.
async fn run_stops(run: crate::support::Running, what: &str) -> String {
    match tokio::time::timeout(Duration::from_secs(60), run.handle).await {
        Ok(Ok(Err(e))) => e.to_string(),
        Ok(Ok(Ok(()))) => panic!("run ended without an error; expected it to stop: {what}"),
        Ok(Err(e)) => panic!("run panicked: {e}"),
        Err(_) => panic!("run did not stop within 60 s: {what}"),
    }
}

/// Tables `a` and `quiet`, mapped, with `run` streaming and one row of `a`
/// in the graph.
async fn two_tables_streaming() -> (Fixture, crate::support::Running) {
    let fx = Fixture::new(
        "CREATE TABLE {s}.a (id int PRIMARY KEY); CREATE TABLE {s}.quiet (id int PRIMARY KEY);",
        "[[node]]\ntable = \"{s}.a\"\nlabel = \"{p}A\"\n\
         [[node]]\ntable = \"{s}.quiet\"\nlabel = \"{p}Quiet\"\n",
    )
    .await;
    fx.setup().await;
    let run = fx.start();
    fx.sql("INSERT INTO {s}.a VALUES (1)").await;
    eventually(Duration::from_secs(30), "the first row", || async {
        (fx.cypher("MATCH (n:{p}A) RETURN n.id AS id").await.len() == 1).then_some(())
    })
    .await;
    (fx, run)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mapped_table_renamed_or_dropped_while_running_stops_run_with_a_sentence() {
    let _shared = SERVICES.read().await;
    let (fx, run) = two_tables_streaming().await;
    let before = fx.wal_lsn().await;
    fx.sql("ALTER TABLE {s}.a RENAME TO b; INSERT INTO {s}.b VALUES (2);")
        .await;
    let why = run_stops(run, "a change to a renamed table").await;
    assert!(why.contains("is now called"), "{why}");
    assert!(
        fx.checkpoint().await.unwrap_or_default() <= before && fx.confirmed_flush().await <= before,
        "the change to the renamed table is not passed over"
    );
    fx.cleanup().await;

    // A quiet mapped table dropped: no change ever arrives, the catalog says so.
    let (fx, run) = two_tables_streaming().await;
    fx.sql("DROP TABLE {s}.quiet").await;
    let why = run_stops(run, "a dropped quiet table").await;
    assert!(why.contains("was dropped"), "{why}");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graph_behind_the_slot_stops_run_until_it_is_repaired() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.items (id int PRIMARY KEY, v text);",
        "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n",
    )
    .await;
    fx.setup().await;
    let run = fx.start();
    fx.sql("INSERT INTO {s}.items VALUES (1, 'a')").await;
    let count = || async {
        fx.cypher("MATCH (n:{p}Item) RETURN count(n) AS n").await[0]["n"]
            .as_i64()
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(30), "the first row", || async {
        (count().await == 1).then_some(())
    })
    .await;
    run.stop().await;
    // While walgraph is stopped, a change is confirmed past it (as `peek
    // --confirm` or a graph restored from an older backup would leave it).
    fx.sql("INSERT INTO {s}.items VALUES (2, 'b')").await;
    fx.pg
        .execute(
            "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())",
            &[&fx.config.postgres.slot],
        )
        .await
        .expect("advance the slot");
    let why = run_stops(fx.start(), "a graph behind its slot").await;
    assert!(
        why.contains("snapshot --restart") && why.contains("reconcile --repair"),
        "{why}"
    );
    assert_eq!(count().await, 1, "nothing streamed over the gap");
    let reports = reconcile_all(&fx.config, true).await;
    assert!(reports.iter().any(|r| r.missing_count == 1), "{reports:?}");
    let run = fx.start();
    fx.sql("INSERT INTO {s}.items VALUES (3, 'c')").await;
    eventually(
        Duration::from_secs(30),
        "the repaired graph streaming again",
        || async { (count().await == 3).then_some(()) },
    )
    .await;
    run.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_taken_for_an_earlier_slot_of_the_same_name_does_not_count() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.items (id int PRIMARY KEY);
         INSERT INTO {s}.items SELECT generate_series(1, 3);",
        "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n",
    )
    .await;
    fx.setup().await;
    let first = take_snapshot(&fx.config).await;
    assert_eq!(first.rows, 3);
    // The slot dropped and made again; a row written while there was none.
    fx.pg
        .execute(
            "SELECT pg_drop_replication_slot($1)",
            &[&fx.config.postgres.slot],
        )
        .await
        .expect("drop the slot");
    fx.sql("INSERT INTO {s}.items VALUES (4)").await;
    let lines = fx.setup().await;
    assert!(
        lines.iter().any(|l| l.contains("does not count")),
        "setup says the old snapshot does not count: {lines:?}"
    );
    let again = take_snapshot(&fx.config).await;
    assert!(!again.already_done, "copied again, not 'already complete'");
    assert_eq!(again.rows, 4);
    let run = fx.start();
    fx.sql("INSERT INTO {s}.items VALUES (5)").await;
    eventually(Duration::from_secs(30), "every row", || async {
        let n = fx.cypher("MATCH (n:{p}Item) RETURN count(n) AS n").await;
        (n == vec![serde_json::json!({"n": 5})]).then_some(())
    })
    .await;
    run.stop().await;
    fx.cleanup().await;
}

/// Puts the server's commits on hold (a synchronous standby that never
/// answers) until dropped. Only under the exclusive services lock.
struct CommitsOnHold {
    c: tokio_postgres::Client,
    url: String,
    released: bool,
}

impl CommitsOnHold {
    async fn start(env: &crate::support::Env) -> Self {
        let c = crate::support::pg(env).await;
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = 'walgraph_nobody'",
            "SELECT pg_reload_conf()",
        ] {
            c.batch_execute(sql).await.expect("hold commits");
        }
        CommitsOnHold {
            c,
            url: env.pg_url.clone(),
            released: false,
        }
    }

    async fn release(mut self) {
        self.released = true;
        for sql in [
            "ALTER SYSTEM RESET synchronous_standby_names",
            "SELECT pg_reload_conf()",
        ] {
            self.c.batch_execute(sql).await.expect("release commits");
        }
    }
}

impl Drop for CommitsOnHold {
    /// A test that failed before releasing must not leave every later
    /// commit of the suite waiting.
    fn drop(&mut self) {
        if !self.released {
            let _ = std::process::Command::new("psql")
                .arg(&self.url)
                .args([
                    "-X",
                    "-q",
                    "-c",
                    "ALTER SYSTEM RESET synchronous_standby_names",
                ])
                .args(["-c", "SELECT pg_reload_conf()"])
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repair_never_writes_back_a_row_older_than_the_graph() {
    let _exclusive = SERVICES.write().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.items (id int PRIMARY KEY, v text);
         INSERT INTO {s}.items VALUES (1, 'old');",
        "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n",
    )
    .await;
    fx.setup().await;
    take_snapshot(&fx.config).await;
    let run = fx.start();
    let value =
        || async { fx.cypher("MATCH (n:{p}Item {id: 1}) RETURN n.v AS v").await[0]["v"].clone() };
    // A commit whose record is written (and streamed) but which is not yet
    // visible: it waits for a synchronous standby.
    let hold = CommitsOnHold::start(&fx.env).await;
    let writer = crate::support::pg(&fx.env).await;
    let update = format!("UPDATE {}.items SET v = 'new' WHERE id = 1", fx.schema);
    let waiting = tokio::spawn(async move { writer.batch_execute(&update).await });
    eventually(
        Duration::from_secs(30),
        "the waiting commit in the graph",
        || async { (value().await == serde_json::json!("new")).then_some(()) },
    )
    .await;
    // A repair now must not read the row as it was and stamp it newer.
    let cfg = fx.config.clone();
    let repair = tokio::spawn(async move {
        reconcile_all(&cfg, true)
            .await
            .iter()
            .map(|r| r.changed_count)
            .sum::<u64>()
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    hold.release().await;
    waiting.await.expect("join").expect("the update commits");
    let changed = repair.await.expect("join");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        value().await,
        serde_json::json!("new"),
        "the repair changed {changed} row(s)"
    );
    run.stop().await;
    fx.cleanup().await;
}

/// Accounts and orders (`{fk}`: the foreign key's clause, or nothing),
/// snapshot with `writes` committed after `accounts` is copied and before
/// `orders` is, then streamed to the end. Returns the fixture, still set up.
async fn snapshot_with_writes_between_tables(fk: &str, writes: &[&str]) -> Fixture {
    let fx = Fixture::new(
        &format!(
            "CREATE TABLE {{s}}.accounts (id int PRIMARY KEY, name text);
             CREATE TABLE {{s}}.orders (id int PRIMARY KEY, account_id int {fk});
             INSERT INTO {{s}}.accounts SELECT g, 'first' FROM generate_series(1, 10) g;
             INSERT INTO {{s}}.orders SELECT g, g FROM generate_series(1, 4) g;"
        ),
        "[[node]]\ntable = \"{s}.accounts\"\nlabel = \"{p}Account\"\n\
         [[node]]\ntable = \"{s}.orders\"\nlabel = \"{p}Order\"\n\
         [[relationship]]\ntable = \"{s}.orders\"\ntype = \"{p}PLACED_BY\"\n\
         from = { label = \"{p}Order\", columns = [\"id\"] }\n\
         to = { label = \"{p}Account\", columns = [\"account_id\"] }\n",
    )
    .await;
    fx.setup().await;
    // Neo4j holds the accounts chunk's write (a key it MERGEs is locked by
    // an open transaction) after the chunk was read: its consistent point
    // is fixed, the orders chunk's is not yet taken.
    let mut lock = fx.graph.start_txn().await.expect("a Neo4j transaction");
    lock.run(neo4rs::query(&format!(
        "MERGE (:{}Account {{id: 5}})",
        fx.prefix
    )))
    .await
    .expect("lock account 5");
    let cfg = fx.config.clone();
    let copy = tokio::spawn(async move { take_snapshot(&cfg).await });
    let watcher = crate::support::graph(&fx.env).await;
    eventually(
        Duration::from_secs(30),
        "the accounts chunk waiting for its lock",
        || async {
            let mut rows = watcher
                .execute(neo4rs::query(
                    "SHOW TRANSACTIONS YIELD currentQuery, status \
                     WHERE status STARTS WITH 'Blocked' RETURN currentQuery",
                ))
                .await
                .ok()?;
            let row = rows.next().await.ok()??;
            let q: String = row.get("currentQuery").ok()?;
            q.contains("Account").then_some(())
        },
    )
    .await;
    for sql in writes {
        fx.sql(sql).await;
    }
    lock.rollback().await.expect("release account 5");
    copy.await.expect("the snapshot");
    let end = fx.wal_lsn().await;
    let run = fx.start();
    eventually(Duration::from_secs(60), "the stream applied", || async {
        fx.checkpoint().await.filter(|c| *c >= end)
    })
    .await;
    run.stop().await;
    fx
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_node_never_removes_a_foreign_key_edge_newer_than_the_delete() {
    let _shared = SERVICES.read().await;
    let placed_by_5 = "MATCH (:{p}Order {id: 20000})-[r:{p}PLACED_BY]->(a:{p}Account {id: 5}) \
                       RETURN a.name AS name, count(r) AS n";
    // Account 5 deleted and inserted again, and an order placed by it,
    // between the two tables' copies.
    let fx = snapshot_with_writes_between_tables(
        "REFERENCES {s}.accounts",
        &[
            "DELETE FROM {s}.accounts WHERE id = 5",
            "INSERT INTO {s}.accounts VALUES (5, 'again')",
            "INSERT INTO {s}.orders VALUES (20000, 5)",
        ],
    )
    .await;
    let edge = fx.cypher(placed_by_5).await;
    assert_eq!(
        edge,
        vec![serde_json::json!({"name": "again", "n": 1})],
        "after a delete"
    );
    let reports = reconcile_all(&fx.config, false).await;
    assert!(reports.iter().all(|r| !r.differs()), "{reports:?}");
    fx.cleanup().await;
    // The same across a TRUNCATE of the accounts alone (no foreign key
    // constraint): every order keeps its edge to its account.
    let fx = snapshot_with_writes_between_tables(
        "",
        &[
            "TRUNCATE {s}.accounts",
            "INSERT INTO {s}.accounts SELECT g, 'again' FROM generate_series(1, 10) g",
            "INSERT INTO {s}.orders VALUES (20000, 5)",
        ],
    )
    .await;
    assert_eq!(
        fx.cypher(placed_by_5).await,
        vec![serde_json::json!({"name": "again", "n": 1})],
        "after a TRUNCATE"
    );
    let edges = fx
        .cypher("MATCH (:{p}Order)-[r:{p}PLACED_BY]->(:{p}Account {name: 'again'}) RETURN count(r) AS n")
        .await;
    assert_eq!(edges[0]["n"], 5, "orders 1 to 4 and 20000");
    let reports = reconcile_all(&fx.config, false).await;
    assert!(reports.iter().all(|r| !r.differs()), "{reports:?}");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_sharing_edges_and_self_loops_are_deleted_in_one_statement() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.people (id int PRIMARY KEY, boss int REFERENCES {s}.people);",
        "[[node]]\ntable = \"{s}.people\"\nlabel = \"{p}Person\"\n\
         [[relationship]]\ntable = \"{s}.people\"\ntype = \"{p}REPORTS_TO\"\n\
         from = { label = \"{p}Person\", columns = [\"id\"] }\n\
         to = { label = \"{p}Person\", columns = [\"boss\"] }\n",
    )
    .await;
    fx.setup().await;
    let run = fx.start();
    fx.sql("INSERT INTO {s}.people VALUES (1, 1), (2, 1), (3, 2), (4, 2)")
        .await;
    let count = || async {
        fx.cypher("MATCH (n:{p}Person) RETURN count(n) AS n").await[0]["n"]
            .as_i64()
            .unwrap_or(-1)
    };
    eventually(Duration::from_secs(30), "four people", || async {
        (count().await == 4).then_some(())
    })
    .await;
    // One transaction: one delete statement whose rows share edges, one of
    // them a self-loop.
    fx.sql("DELETE FROM {s}.people WHERE id IN (3, 4); DELETE FROM {s}.people")
        .await;
    eventually(Duration::from_secs(30), "nobody left", || async {
        (count().await == 0).then_some(())
    })
    .await;
    let rels = fx
        .cypher("MATCH ()-[r:{p}REPORTS_TO]->() RETURN count(r) AS n")
        .await;
    assert_eq!(rels[0]["n"], 0);
    run.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_change_keeps_a_toasted_value_it_did_not_send() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.docs (id int PRIMARY KEY, body text);
         CREATE TABLE {s}.links (id int PRIMARY KEY, a int, b int, body text);",
        "[[node]]\ntable = \"{s}.docs\"\nlabel = \"{p}Doc\"\n\
         [[relationship]]\ntable = \"{s}.links\"\ntype = \"{p}LINKS\"\n\
         from = { label = \"{p}Doc\", columns = [\"a\"] }\n\
         to = { label = \"{p}Doc\", columns = [\"b\"] }\n\
         properties = [\"body\"]\n",
    )
    .await;
    fx.setup().await;
    let run = fx.start();
    // 100 kB of text that does not compress: stored out of line, and not
    // sent by an update that leaves it alone.
    let body =
        "(SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 3200) g)";
    fx.sql(&format!(
        "INSERT INTO {{s}}.docs VALUES (1, {body}), (3, 'three'), (4, 'four'), (5, 'five');
         INSERT INTO {{s}}.links VALUES (10, 3, 4, {body});"
    ))
    .await;
    let stored = fx
        .pg
        .query_one(
            &format!(
                "SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class WHERE oid = '{}.docs'::regclass",
                fx.schema
            ),
            &[],
        )
        .await
        .expect("column size")
        .get::<_, bool>(0);
    assert!(stored, "the value is stored out of line");
    fx.sql("UPDATE {s}.docs SET id = 2 WHERE id = 1").await;
    fx.sql("UPDATE {s}.links SET b = 5 WHERE id = 10").await;
    let doc = eventually(Duration::from_secs(30), "doc 2", || async {
        let rows = fx
            .cypher("MATCH (n:{p}Doc {id: 2}) RETURN size(n.body) AS len")
            .await;
        rows.first().cloned()
    })
    .await;
    assert_eq!(doc["len"], 102_400, "node 2 has the value");
    let link = eventually(Duration::from_secs(30), "the moved link", || async {
        let rows = fx
            .cypher(
                "MATCH (:{p}Doc {id: 3})-[r:{p}LINKS]->(:{p}Doc {id: 5}) RETURN size(r.body) AS len",
            )
            .await;
        rows.first().cloned()
    })
    .await;
    assert_eq!(link["len"], 102_400, "the moved edge has the value");
    let ones = fx
        .cypher("MATCH (n:{p}Doc {id: 1}) RETURN count(n) AS n")
        .await;
    assert_eq!(ones[0]["n"], 0);
    let reports = reconcile_all(&fx.config, false).await;
    assert!(reports.iter().all(|r| !r.differs()), "{reports:?}");
    run.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_neo4j_can_never_apply_is_not_retried_for_ever() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.tags (name text PRIMARY KEY);",
        "[[node]]\ntable = \"{s}.tags\"\nlabel = \"{p}Tag\"\n",
    )
    .await;
    fx.setup().await;
    let run = fx.start();
    // Postgres indexes it compressed; Neo4j's index cannot hold the key.
    fx.sql("INSERT INTO {s}.tags VALUES (repeat('x', 40000))")
        .await;
    let err = run_stops(run, "a change that cannot apply, instead of retrying it").await;
    assert!(
        err.contains(&format!("{}.tags", fx.schema))
            && err.contains("committed at")
            && err.contains("Neo.DatabaseError"),
        "{}",
        &err[..err.len().min(600)]
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_of_related_types_meet_and_every_column_keeps_one_type() {
    let _shared = SERVICES.read().await;
    const MAPPING: &str = r#"
[[node]]
table = "{s}.accounts"
label = "{p}Account"
[[node]]
table = "{s}.big"
label = "{p}Big"
[[node]]
table = "{s}.lots"
label = "{p}Lot"
[[node]]
table = "{s}.codes"
label = "{p}Code"
[[node]]
table = "{s}.orders"
label = "{p}Order"
[[relationship]]
table = "{s}.orders"
type = "{p}PLACED_BY"
from = { label = "{p}Order", columns = ["id"] }
to = { label = "{p}Account", columns = ["account_id"] }
[[relationship]]
table = "{s}.orders"
type = "{p}IN_BIG"
from = { label = "{p}Order", columns = ["id"] }
to = { label = "{p}Big", columns = ["big_id"] }
[[relationship]]
table = "{s}.orders"
type = "{p}ON_LOT"
from = { label = "{p}Order", columns = ["id"] }
to = { label = "{p}Lot", columns = ["lot"] }
[[relationship]]
table = "{s}.orders"
type = "{p}HAS_CODE"
from = { label = "{p}Order", columns = ["id"] }
to = { label = "{p}Code", columns = ["code"] }
"#;
    // A key that is a domain over int, an int8 key, a numeric key and a
    // char(n) key, each named by a column of a related type; and values
    // Neo4j has no direct form for.
    let row = |id: i32, born: &str, at: &str, at_tz: &str| {
        format!(
            "INSERT INTO {{s}}.orders VALUES ({id}, 5, 7, 3.50, 'ab', 5, '{born}', '{at}', '{at_tz}',
               '24:00:00', '{{2020-01-01,infinity}}', ARRAY['\\x00ff'::bytea, '\\x01'::bytea],
               '{{{{1,2}},{{3,4}}}}');"
        )
    };
    let fx = Fixture::new(
        &format!(
            "CREATE DOMAIN {{s}}.positive AS integer CHECK (VALUE > 0);
             CREATE DOMAIN {{s}}.account_id AS {{s}}.positive;
             CREATE TABLE {{s}}.accounts (id {{s}}.account_id PRIMARY KEY, score {{s}}.positive);
             CREATE TABLE {{s}}.big (id int8 PRIMARY KEY);
             CREATE TABLE {{s}}.lots (n numeric PRIMARY KEY);
             CREATE TABLE {{s}}.codes (code char(6) PRIMARY KEY);
             CREATE TABLE {{s}}.orders (id int PRIMARY KEY, account_id int4, big_id int4,
                 lot numeric(12,2), code varchar(10), qty {{s}}.positive, born date, at timestamp,
                 at_tz timestamptz, t time, days date[], blobs bytea[], grid int[]);
             INSERT INTO {{s}}.accounts VALUES (5, 9);
             INSERT INTO {{s}}.big VALUES (7);
             INSERT INTO {{s}}.lots VALUES (3.5);
             INSERT INTO {{s}}.codes VALUES ('ab');
             {}",
            row(1, "infinity", "-infinity", "infinity")
        ),
        MAPPING,
    )
    .await;
    fx.setup().await;
    take_snapshot(&fx.config).await;
    let run = fx.start();
    fx.sql(&row(2, "infinity", "-infinity", "infinity")).await;
    fx.sql(&row(
        3,
        "0044-03-15 BC",
        "12345-01-01 10:00:00",
        "0010-01-01 00:00:00+00 BC",
    ))
    .await;
    fx.sql(&row(4, "-infinity", "infinity", "-infinity")).await;
    eventually(Duration::from_secs(30), "the orders streamed", || async {
        if run.handle.is_finished() {
            return Some(());
        }
        let rows = fx.cypher("MATCH (n:{p}Order) RETURN count(n) AS n").await;
        (rows == vec![serde_json::json!({"n": 4})]).then_some(())
    })
    .await;
    assert!(
        !run.handle.is_finished(),
        "run stopped on values of these types"
    );
    let ends = fx
        .cypher(
            "MATCH (o:{p}Order)-[r]->(n) RETURN type(r) AS t, labels(n)[0] AS l, count(*) AS orders,
                    count(DISTINCT n) AS nodes ORDER BY t",
        )
        .await;
    let nodes = fx
        .cypher("MATCH (n) WHERE NOT n:{p}Order AND any(l IN labels(n) WHERE l STARTS WITH '{p}') RETURN count(n) AS n")
        .await;
    let types = fx
        .cypher(
            "MATCH (n) WHERE any(l IN labels(n) WHERE l STARTS WITH '{p}')
             UNWIND keys(n) AS k
             WITH labels(n)[0] AS l, k, collect(DISTINCT valueType(n[k])) AS types
             RETURN l, k, types ORDER BY l, k",
        )
        .await;
    let dates = fx
        .cypher("MATCH (o:{p}Order) RETURN o.id AS id, toString(o.born) AS born, toString(o.at) AS at ORDER BY id")
        .await;
    run.stop().await;
    assert_eq!(
        ends.len(),
        4,
        "each foreign key type reaches its node: {ends:?}"
    );
    for e in &ends {
        assert_eq!(
            (e["orders"].as_i64(), e["nodes"].as_i64()),
            (Some(4), Some(1)),
            "every order meets the one existing node: {e}"
        );
    }
    assert_eq!(
        nodes,
        vec![serde_json::json!({"n": 4})],
        "no placeholder under a key of another type: {ends:?}"
    );
    for t in &types {
        assert_eq!(
            t["types"].as_array().map(Vec::len),
            Some(1),
            "one type per column, in snapshot and stream alike: {types:?}"
        );
    }
    let type_of = |l: &str, k: &str| {
        types
            .iter()
            .find(|t| t["l"].as_str().is_some_and(|x| x.ends_with(l)) && t["k"] == k)
            .map(|t| t["types"][0].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(
        type_of("Account", "id").as_deref(),
        Some("INTEGER NOT NULL")
    );
    assert_eq!(
        type_of("Account", "score").as_deref(),
        Some("INTEGER NOT NULL")
    );
    assert_eq!(type_of("Order", "born").as_deref(), Some("DATE NOT NULL"));
    assert_eq!(
        type_of("Order", "at_tz").as_deref(),
        Some("ZONED DATETIME NOT NULL")
    );
    assert_eq!(
        type_of("Order", "t").as_deref(),
        Some("LOCAL TIME NOT NULL")
    );
    assert_eq!(
        type_of("Order", "days").as_deref(),
        Some("LIST<DATE NOT NULL> NOT NULL")
    );
    assert_eq!(
        type_of("Order", "blobs").as_deref(),
        Some("STRING NOT NULL")
    );
    assert_eq!(dates[2]["born"], "-0043-03-15", "{dates:?}");
    assert_eq!(dates[2]["at"], "+12345-01-01T10:00:00", "{dates:?}");
    assert!(
        dates[0]["born"]
            .as_str()
            .is_some_and(|d| d.starts_with("+262142-12-31")),
        "{dates:?}"
    );
    let report = reconcile_all(&fx.config, false).await;
    assert!(
        report.iter().all(|t| !t.differs()),
        "reconcile finds nothing to repair: {report:?}"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_that_streams_a_subset_is_refused_never_streamed() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.items (id int PRIMARY KEY, qty int NOT NULL, secret text);
         INSERT INTO {s}.items SELECT g, g, 's' FROM generate_series(1, 20) g;",
        "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n",
    )
    .await;
    let publication = fx.config.postgres.publication.clone();
    let cases = [
        (
            format!("CREATE PUBLICATION {publication} FOR TABLE {{s}}.items WHERE (qty > 10)"),
            "a row filter on",
        ),
        (
            format!("CREATE PUBLICATION {publication} FOR TABLE {{s}}.items (id, qty)"),
            "a column list on",
        ),
        (
            format!("CREATE PUBLICATION {publication} FOR TABLE {{s}}.items WITH (publish = 'insert, update')"),
            "does not publish delete, truncate",
        ),
    ];
    for (create, says) in cases {
        fx.sql(&format!(
            "DROP PUBLICATION IF EXISTS {publication}; {create}"
        ))
        .await;
        fx.setup().await;
        for (what, refused) in [
            ("run", walgraph::pipeline::prepare(&fx.config).await.err()),
            (
                "snapshot",
                walgraph::pipeline::prepare_for_snapshot(&fx.config)
                    .await
                    .err(),
            ),
        ] {
            let sentence = refused
                .map(|e| walgraph::error_sentence(&anyhow::Error::new(e)))
                .unwrap_or_else(|| panic!("{what} accepts a publication with {says}"));
            assert!(
                sentence.contains(says) && sentence.contains("walgraph setup"),
                "{what}: {sentence}"
            );
        }
    }
    // Recreated whole, as the sentence says: accepted.
    fx.sql(&format!("DROP PUBLICATION {publication}")).await;
    fx.setup().await;
    walgraph::pipeline::prepare(&fx.config)
        .await
        .unwrap_or_else(|e| panic!("{}", walgraph::error_sentence(&anyhow::Error::new(e))));
    fx.cleanup().await;
}
