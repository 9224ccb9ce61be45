//! Events and history: logical messages and outbox rows applied as graph
//! operations with their transaction, exactly once across SIGKILLs, and
//! the versions of history labels against Postgres' own audit.

use std::time::Duration;

use serde_json::json;
use walgraph::config::OnError;
use walgraph::lsn::Lsn;

use crate::support::{eventually, Fixture, SERVICES};

/// `SELECT pg_logical_emit_message(true, prefix, json)` (no quotes in `json`).
fn emit(prefix: &str, json: &str) -> String {
    format!("SELECT pg_logical_emit_message(true, '{prefix}', '{json}');")
}

/// Waits until the checkpoint covers everything written so far.
async fn caught_up(fx: &Fixture) -> Lsn {
    let target = fx.wal_lsn().await;
    eventually(
        Duration::from_secs(120),
        "the checkpoint to catch up",
        || async { fx.checkpoint().await.filter(|c| *c >= target) },
    )
    .await
}

impl Fixture {
    /// Postgres' clock, in microseconds since the Unix epoch.
    async fn pg_now(&self) -> i64 {
        self.pg
            .query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
                &[],
            )
            .await
            .expect("clock")
            .get(0)
    }
}

/// Waits for an in-process run to fail and returns its sentence.
async fn failure(run: crate::support::Running) -> String {
    match tokio::time::timeout(Duration::from_secs(60), run.handle).await {
        Ok(Ok(Err(e))) => walgraph::error_sentence(&anyhow::Error::from(e)),
        Ok(Ok(Ok(()))) => panic!("run stopped without an error"),
        Ok(Err(e)) => panic!("run panicked: {e}"),
        Err(_) => panic!("run did not stop within 60 s"),
    }
}

const MESSAGES_DDL: &str = "CREATE TABLE {s}.customers (id int PRIMARY KEY, name text NOT NULL);";

const MESSAGES_MAPPING: &str = r#"
[[node]]
table = "{s}.customers"
label = "{p}Customer"

[[messages]]
prefix = "{p}"
labels = ["{p}Event", "{p}Customer"]
types = ["{p}ABOUT"]
keys = { {p}Event = ["uid"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_graph_writes_in_stream_order_with_their_transaction() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(MESSAGES_DDL, MESSAGES_MAPPING).await;
    let p = fx.prefix.clone();
    let created = fx.setup().await.join("\n");
    assert!(
        created.contains(&format!("walgraph_{p}Event_key")),
        "setup makes the message label's constraint: {created}"
    );
    let run = fx.start();

    fx.sql(&format!(
        "BEGIN; INSERT INTO {{s}}.customers VALUES (1, 'Ada'); {} COMMIT;",
        emit(
            &p,
            &format!(
                r#"[{{"op": "merge_node", "label": "{p}Event", "key": {{"uid": "e1"}}, "properties": {{"kind": "signup", "n": 1}}}},
                    {{"op": "merge_relationship", "type": "{p}ABOUT", "from": {{"label": "{p}Event", "key": {{"uid": "e1"}}}},
                      "to": {{"label": "{p}Customer", "key": {{"id": 1}}}}, "properties": {{"w": 0.5}}}}]"#
            )
        )
    ))
    .await;
    // The row and the message's writes commit together: no read sees one
    // without the other.
    let seen = eventually(Duration::from_secs(60), "customer 1", || async {
        let r = fx
            .cypher(
                "MATCH (c:{p}Customer {id: 1}) OPTIONAL MATCH (e:{p}Event {uid: 'e1'})-[a:{p}ABOUT]->(c) \
                 RETURN e.kind AS kind, a.w AS w",
            )
            .await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(seen, vec![json!({"kind": "signup", "w": 0.5})]);

    // An aborted transaction leaves nothing.
    fx.sql(&format!(
        "BEGIN; {} INSERT INTO {{s}}.customers VALUES (99, 'never'); ROLLBACK;",
        emit(
            &p,
            &format!(r#"{{"op": "merge_node", "label": "{p}Event", "key": {{"uid": "aborted"}}}}"#)
        )
    ))
    .await;
    // Stream order: the link to customer 2 comes before the row's delete,
    // which removes it; applied after the changes it would stay, with a
    // placeholder customer.
    fx.sql(&format!(
        "BEGIN; {} INSERT INTO {{s}}.customers VALUES (2, 'Bob'); {} {} {} DELETE FROM {{s}}.customers WHERE id = 2; COMMIT;",
        emit(&p, &format!(r#"{{"op": "merge_node", "label": "{p}Event", "key": {{"uid": "e2"}}, "properties": {{"v": 1}}}}"#)),
        emit(&p, &format!(r#"{{"op": "delete_node", "label": "{p}Event", "key": {{"uid": "e2"}}}}"#)),
        emit(&p, &format!(r#"{{"op": "merge_node", "label": "{p}Event", "key": {{"uid": "e2"}}, "properties": {{"v": 2}}}}"#)),
        emit(&p, &format!(
            r#"{{"op": "merge_relationship", "type": "{p}ABOUT", "from": {{"label": "{p}Event", "key": {{"uid": "e2"}}}}, "to": {{"label": "{p}Customer", "key": {{"id": 2}}}}}}"#
        )),
    ))
    .await;
    // The operations of one message keep their order too.
    fx.sql(&emit(
        &p,
        &format!(
            r#"[{{"op": "delete_node", "label": "{p}Event", "key": {{"uid": "e2"}}}},
                {{"op": "merge_node", "label": "{p}Event", "key": {{"uid": "e2"}}, "properties": {{"v": 3}}}}]"#
        ),
    ))
    .await;
    // Messages with another prefix (another application's, or walgraph's
    // own heartbeats) are not operations.
    fx.sql(&format!(
        "BEGIN; SELECT pg_logical_emit_message(true, '{p}_other', 'not for walgraph'); COMMIT;"
    ))
    .await;
    caught_up(&fx).await;
    let events = fx
        .cypher("MATCH (e:{p}Event) RETURN e.uid AS uid, e.v AS v ORDER BY uid")
        .await;
    assert_eq!(
        events,
        vec![
            json!({"uid": "e1", "v": null}),
            json!({"uid": "e2", "v": 3})
        ]
    );
    let customers = fx
        .cypher("MATCH (c:{p}Customer) RETURN c.id AS id ORDER BY id")
        .await;
    assert_eq!(customers, vec![json!({"id": 1})]);
    let about = fx
        .cypher("MATCH (e)-[:{p}ABOUT]->(c) RETURN e.uid AS e, c.id AS c")
        .await;
    assert_eq!(about, vec![json!({"e": "e1", "c": 1})]);

    // A message walgraph refuses stops it, naming the position; nothing of
    // its transaction is applied.
    let mark = fx.wal_lsn().await;
    fx.sql(&format!(
        "BEGIN; INSERT INTO {{s}}.customers VALUES (4, 'Cy'); {} COMMIT;",
        emit(
            &p,
            &format!(r#"{{"op": "merge_node", "label": "{p}Secret", "key": {{"id": 1}}}}"#)
        )
    ))
    .await;
    let after = fx.wal_lsn().await;
    let why = failure(run).await;
    assert!(
        why.contains(&format!("the message with prefix {p} at "))
            && why.contains(&format!(
                "is refused: the label `{p}Secret` is not among the labels the [[messages]] prefix {p} section allows"
            ))
            && why.contains("neo4j.on_error"),
        "{why}"
    );
    assert!(fx
        .cypher("MATCH (c:{p}Customer {id: 4}) RETURN c")
        .await
        .is_empty());
    let at: Lsn = why
        .split(" at ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("an LSN in: {why}"));
    assert!(
        at > mark && at < after,
        "{at} is the refused transaction's, in ({mark}, {after})"
    );
    let cp = fx.checkpoint().await.expect("a checkpoint");
    assert!(cp < at, "the checkpoint {cp} stays before it");

    // With dead letters, it is recorded and the rest goes on: its row
    // change, a malformed message, a non-transactional one.
    fx.config.neo4j.on_error = OnError::DeadLetter;
    let run = fx.start();
    fx.sql(&format!(
        "BEGIN; INSERT INTO {{s}}.customers VALUES (5, 'Di'); {} COMMIT;",
        emit(&p, r#"{"op": "merge_node", "label": "#)
    ))
    .await;
    fx.sql(&format!(
        "SELECT pg_logical_emit_message(false, '{p}', '{}');",
        format_args!(r#"{{"op": "merge_node", "label": "{p}Event", "key": {{"uid": "loose"}}}}"#)
    ))
    .await;
    fx.sql("INSERT INTO {s}.customers VALUES (6, 'Ed')").await;
    caught_up(&fx).await;
    let customers = fx
        .cypher("MATCH (c:{p}Customer) RETURN c.id AS id ORDER BY id")
        .await;
    assert_eq!(
        customers,
        vec![
            json!({"id": 1}),
            json!({"id": 4}),
            json!({"id": 5}),
            json!({"id": 6})
        ]
    );
    let dead = fx
        .cypher(&format!(
            "MATCH (d:WalgraphDeadLetter {{slot: '{}'}}) RETURN d.table AS source, d.error AS error, d.operation AS op, d.lsn IS NOT NULL AS lsn ORDER BY d.lsn",
            fx.config.postgres.slot
        ))
        .await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    let text = |i: usize, f: &str| dead[i][f].as_str().unwrap_or_default().to_string();
    assert_eq!(text(0, "source"), format!("the message with prefix {p}"));
    assert!(
        text(0, "error").contains("is not among the labels"),
        "{dead:?}"
    );
    assert!(text(0, "op").contains(&format!("{p}Secret")), "{dead:?}");
    assert!(text(1, "error").starts_with("it is not JSON"), "{dead:?}");
    assert_eq!(
        text(2, "source"),
        format!("the non-transactional message with prefix {p}")
    );
    assert!(dead.iter().all(|d| d["lsn"] == json!(true)));
    assert!(fx
        .cypher("MATCH (e:{p}Event {uid: 'loose'}) RETURN e")
        .await
        .is_empty());
    run.stop().await;

    // Reconcile compares the mapped tables only: the events' nodes and
    // relationships are no difference.
    let config = fx.config_file("events.toml", "", MESSAGES_MAPPING);
    let out = fx
        .walgraph(&[
            "--config",
            &config.to_string_lossy(),
            "reconcile",
            "--dry-run",
        ])
        .await;
    assert!(
        out.status.success(),
        "reconcile: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fx.cleanup().await;
}

const BURST_DDL: &str = "CREATE TABLE {s}.tallies (id int PRIMARY KEY, value int NOT NULL);";

const BURST_MAPPING: &str = r#"
[[node]]
table = "{s}.tallies"
label = "{p}Tally"
history = true

[[messages]]
prefix = "{p}"
labels = ["{p}Event", "{p}Tally"]
"#;

/// Transactions in the burst, and how many of them carry a long list of
/// messages (larger than a batch).
const BURST: i64 = 1_200;
const LONG_EVERY: i64 = 100;
const LONG: i64 = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_messages_survives_sigkills_with_no_operation_lost_or_doubled() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(BURST_DDL, BURST_MAPPING).await;
    let p = fx.prefix.clone();
    fx.setup().await;
    let config = fx.config_file("burst.toml", "[batch]\nmax_changes = 50\n", BURST_MAPPING);
    let config = config.to_string_lossy().into_owned();
    let mut child = fx.spawn(&["--config", &config, "run"]);

    // Each transaction i sets the tally to i (a version each: a doubled
    // or lost one shows in the chain) and makes event i; every 100th also
    // makes 120 more events, one message each, across several batches.
    let writer = {
        let env = fx.env.clone();
        let p = p.clone();
        tokio::spawn(async move {
            let pg = crate::support::pg(&env).await;
            for i in 1..=BURST {
                let mut sql = format!(
                    "BEGIN; {}",
                    emit(
                        &p,
                        &format!(
                            r#"[{{"op": "merge_node", "label": "{p}Event", "key": {{"id": {i}}}}},
                                {{"op": "merge_node", "label": "{p}Tally", "key": {{"id": 1}}, "properties": {{"value": {i}}}}}]"#
                        )
                    )
                );
                if i % LONG_EVERY == 0 {
                    for j in 1..=LONG {
                        sql.push_str(&emit(
                            &p,
                            &format!(
                                r#"{{"op": "merge_node", "label": "{p}Event", "key": {{"id": {}}}}}"#,
                                i * 1000 + j
                            ),
                        ));
                    }
                }
                sql.push_str("COMMIT;");
                pg.batch_execute(&sql).await.expect("a burst transaction");
                // Paced (about 3 s in all), so the kills below fall inside
                // the burst however fast the server takes it.
                tokio::time::sleep(Duration::from_micros(2500)).await;
            }
        })
    };
    let mut kills = 0;
    while !writer.is_finished() && kills < 6 {
        tokio::time::sleep(Duration::from_millis(400 + 150 * kills)).await;
        child.start_kill().expect("SIGKILL");
        let _ = child.wait().await;
        kills += 1;
        child = fx.spawn(&["--config", &config, "run"]);
    }
    writer.await.expect("the writer");
    assert!(
        kills >= 2,
        "walgraph was killed during the burst ({kills} times)"
    );
    caught_up(&fx).await;
    child.start_kill().expect("stop");
    let _ = child.wait().await;

    let events = fx
        .cypher("MATCH (e:{p}Event) RETURN count(e) AS n, count(DISTINCT e.id) AS ids")
        .await;
    let want = BURST + BURST / LONG_EVERY * LONG;
    assert_eq!(
        events,
        vec![json!({"n": want, "ids": want})],
        "no event lost"
    );
    let chain = fx
        .cypher(
            "MATCH (t:{p}Tally {id: 1})-[:VERSION]->(v:{p}TallyVersion) \
             RETURN v.value AS value, v.validFrom = v.validTo AS empty ORDER BY v._lsn",
        )
        .await;
    let values: Vec<i64> = chain
        .iter()
        .map(|v| v["value"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(
        values,
        (1..=BURST).collect::<Vec<_>>(),
        "one version per transaction, none lost, none doubled"
    );
    let count = fx
        .cypher("MATCH (v:{p}TallyVersion) RETURN count(v) AS n, count(v.validTo) AS closed")
        .await;
    assert_eq!(count, vec![json!({"n": BURST, "closed": BURST - 1})]);
    fx.cleanup().await;
}

const OUTBOX_DDL: &str = "
CREATE TABLE {s}.customers (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE {s}.outbox (id bigserial PRIMARY KEY, aggregatetype text, aggregateid text, payload jsonb);
INSERT INTO {s}.customers VALUES (1, 'Ada');
";

const OUTBOX_MAPPING: &str = r#"
[[node]]
table = "{s}.customers"
label = "{p}Customer"

[[outbox]]
table = "{s}.outbox"
column = "payload"
type_column = "aggregatetype"
aggregate_column = "aggregateid"
labels = ["{p}Invoice", "{p}Customer"]
types = ["{p}BILLS"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_is_applied_once_when_inserted_and_never_copied() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(OUTBOX_DDL, OUTBOX_MAPPING).await;
    let p = fx.prefix.clone();
    // A row already in the outbox before walgraph: history, not to copy.
    fx.sql(&format!(
        "INSERT INTO {{s}}.outbox (aggregatetype, aggregateid, payload) VALUES ('{p}Invoice', 'old', '{{\"total\": 1}}')"
    ))
    .await;
    fx.setup().await;
    let config = fx.config_file("outbox.toml", "", OUTBOX_MAPPING);
    let config = config.to_string_lossy().into_owned();
    let snap = fx.walgraph(&["--config", &config, "snapshot"]).await;
    assert!(
        snap.status.success(),
        "snapshot: {}",
        String::from_utf8_lossy(&snap.stderr)
    );
    assert_eq!(
        fx.cypher("MATCH (c:{p}Customer) RETURN count(c) AS n")
            .await,
        vec![json!({"n": 1})]
    );
    assert!(
        fx.cypher("MATCH (i:{p}Invoice) RETURN i").await.is_empty(),
        "the snapshot leaves the outbox alone"
    );
    let run = fx.start();
    // The usual outbox: insert the event and delete it in one transaction.
    let op = format!(
        r#"[{{"op": "merge_node", "label": "{p}Invoice", "key": {{"id": "i1"}}, "properties": {{"total": 30}}}},
            {{"op": "merge_relationship", "type": "{p}BILLS", "from": {{"label": "{p}Invoice", "key": {{"id": "i1"}}}},
              "to": {{"label": "{p}Customer", "key": {{"id": 1}}}}}}]"#
    );
    fx.sql(&format!(
        "BEGIN; INSERT INTO {{s}}.outbox (payload) VALUES ('{op}'); DELETE FROM {{s}}.outbox WHERE payload IS NOT NULL AND aggregateid IS NULL; COMMIT;"
    ))
    .await;
    // Debezium's shape: the payload is the aggregate's properties.
    fx.sql(&format!(
        "INSERT INTO {{s}}.outbox (aggregatetype, aggregateid, payload) VALUES ('{p}Invoice', 'i2', '{{\"total\": 45.5}}')"
    ))
    .await;
    // Updating or deleting outbox rows does nothing.
    fx.sql("UPDATE {s}.outbox SET payload = '{\"total\": -1}'")
        .await;
    fx.sql("DELETE FROM {s}.outbox WHERE aggregateid = 'old'")
        .await;
    caught_up(&fx).await;
    let invoices = fx
        .cypher(
            "MATCH (i:{p}Invoice) OPTIONAL MATCH (i)-[:{p}BILLS]->(c) RETURN i.id AS id, i.total AS total, c.id AS customer ORDER BY id",
        )
        .await;
    assert_eq!(
        invoices,
        vec![
            json!({"id": "i1", "total": 30, "customer": 1}),
            json!({"id": "i2", "total": 45.5, "customer": null})
        ]
    );
    // A NULL payload deletes the aggregate.
    fx.sql(&format!(
        "INSERT INTO {{s}}.outbox (aggregatetype, aggregateid, payload) VALUES ('{p}Invoice', 'i2', NULL)"
    ))
    .await;
    caught_up(&fx).await;
    assert_eq!(
        fx.cypher("MATCH (i:{p}Invoice) RETURN i.id AS id").await,
        vec![json!({"id": "i1"})]
    );
    run.stop().await;
    // Reconcile checks the customers and leaves the outbox out.
    let out = fx
        .walgraph(&["--config", &config, "reconcile", "--dry-run"])
        .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "reconcile: {text}");
    assert!(
        !text.contains("outbox"),
        "reconcile leaves the outbox alone: {text}"
    );
    fx.cleanup().await;
}

const HISTORY_DDL: &str = "
CREATE TABLE {s}.items (id int PRIMARY KEY, n int NOT NULL, note text);
CREATE TABLE {s}.audit (seq bigserial PRIMARY KEY, item int NOT NULL, op text NOT NULL, n int, xid xid8 NOT NULL DEFAULT pg_current_xact_id());
CREATE FUNCTION {s}.audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO {s}.audit (item, op, n) VALUES (OLD.id, TG_OP, NULL);
  ELSE
    INSERT INTO {s}.audit (item, op, n) VALUES (NEW.id, TG_OP, NEW.n);
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON {s}.items FOR EACH ROW EXECUTE FUNCTION {s}.audit();
";

const HISTORY_MAPPING: &str = r#"
[[node]]
table = "{s}.items"
label = "{p}Item"
history = true
"#;

const UPDATES: i64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_chain_of_a_row_updated_a_thousand_times_matches_its_audit() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(HISTORY_DDL, HISTORY_MAPPING).await;
    fx.config.postgres.replay_window_mib = 4096;
    fx.config.batch.max_changes = 50;
    // A row there before walgraph: the snapshot makes its first version,
    // valid from when it was copied.
    fx.sql("INSERT INTO {s}.items VALUES (3, 3, 'before')")
        .await;
    fx.setup().await;
    let copied_after = fx.pg_now().await;
    crate::backfill::take_snapshot(&fx.config).await;
    let copied_before = fx.pg_now().await;
    let run = fx.start();
    let from = fx.wal_lsn().await;
    fx.sql("INSERT INTO {s}.items VALUES (1, 0, 'first'), (2, 0, 'other')")
        .await;
    for i in 1..=UPDATES {
        // Every tenth transaction changes the row twice: one version, its
        // state at commit.
        let twice = if i % 10 == 0 {
            format!("UPDATE {{s}}.items SET n = -{i} WHERE id = 1;")
        } else {
            String::new()
        };
        fx.sql(&format!(
            "BEGIN; {twice} UPDATE {{s}}.items SET n = {i}{} WHERE id = 1; COMMIT;",
            if i % 100 == 0 { ", note = NULL" } else { "" }
        ))
        .await;
    }
    fx.sql("DELETE FROM {s}.items WHERE id = 1").await;
    fx.sql("INSERT INTO {s}.items VALUES (1, 7, 'again')").await;
    // Item 2, in transactions that write it more than once, across
    // segments and batches (100 other rows between, batches of 50): one
    // version each, with the state at commit, or none where it ends deleted.
    fx.sql(
        "BEGIN; UPDATE {s}.items SET n = 10 WHERE id = 2; DELETE FROM {s}.items WHERE id = 2;
         INSERT INTO {s}.items VALUES (2, 11, 'x');
         INSERT INTO {s}.items SELECT g, g, 'filler' FROM generate_series(1000, 1099) g;
         UPDATE {s}.items SET n = 12 WHERE id = 2; COMMIT;",
    )
    .await;
    fx.sql(
        "BEGIN; UPDATE {s}.items SET n = 13 WHERE id = 2; DELETE FROM {s}.items WHERE id = 2;
         DELETE FROM {s}.items WHERE id >= 1000; COMMIT;",
    )
    .await;
    fx.sql("INSERT INTO {s}.items VALUES (2, 14, 'y')").await;
    caught_up(&fx).await;
    run.stop().await;
    let chain2 = chain_matches_audit(&fx, 2).await;
    assert_eq!(
        chain2, 3,
        "item 2: its insert, the first transaction, the last insert"
    );

    let states = chain_matches_audit(&fx, 1).await;
    assert_eq!(states as i64, UPDATES + 2, "insert, updates, insert again");
    let versions = fx
        .cypher("MATCH (v:{p}ItemVersion {id: 1}) RETURN v.note AS note ORDER BY v._lsn")
        .await;
    assert_eq!(
        versions[100]["note"],
        json!(null),
        "a NULL column is no property"
    );
    assert_eq!(
        versions[99]["note"],
        json!("first"),
        "what a change did not touch stays"
    );
    // The node after its delete and insert again links its whole history.
    let linked = fx
        .cypher("MATCH (:{p}Item {id: 1})-[:VERSION]->(v) RETURN count(v) AS n")
        .await;
    assert_eq!(linked, vec![json!({"n": states})]);
    // "As of T": the version valid at the 500th update's commit.
    let t: i64 = fx
        .pg
        .query_one(
            &format!(
                "SELECT (extract(epoch FROM pg_xact_commit_timestamp(xid::text::xid)) * 1000000)::bigint FROM {}.audit WHERE item = 1 AND n = 500",
                fx.schema
            ),
            &[],
        )
        .await
        .expect("the 500th update")
        .get(0);
    let as_of = fx
        .cypher(&format!(
            "WITH datetime({{epochMillis: {}}}) + duration({{microseconds: {}}}) AS t \
             MATCH (v:{{p}}ItemVersion {{id: 1}}) WHERE v.validFrom <= t AND (v.validTo IS NULL OR v.validTo > t) RETURN v.n AS n",
            t / 1000,
            t % 1000
        ))
        .await;
    assert_eq!(as_of, vec![json!({"n": 500})]);

    // A replay of everything adds no version.
    let config = fx.config_file("history.toml", "", HISTORY_MAPPING);
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replacen("[postgres]\n", "[postgres]\nreplay_window_mib = 4096\n", 1),
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();
    let out = fx
        .walgraph(&["--config", &config, "replay", "--from", &from.to_string()])
        .await;
    assert!(
        out.status.success(),
        "replay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = fx
        .cypher("MATCH (v:{p}ItemVersion) RETURN count(v) AS n")
        .await;
    assert_eq!(
        count,
        vec![json!({"n": states + chain2 + 1 + 100})],
        "item 3 has one version, the hundred others one each"
    );
    let snapped = fx
        .cypher(
            "MATCH (:{p}Item {id: 3})-[:VERSION]->(v) RETURN v.n AS n, v.validTo IS NULL AS open, \
             v.validFrom.epochMillis * 1000 + v.validFrom.microsecond % 1000 AS from",
        )
        .await;
    assert_eq!(snapped.len(), 1, "{snapped:?}");
    assert_eq!(
        (snapped[0]["n"].clone(), snapped[0]["open"].clone()),
        (json!(3), json!(true))
    );
    let from = snapped[0]["from"].as_i64().unwrap_or(0);
    assert!(
        from >= copied_after && from <= copied_before,
        "the snapshot's version starts when it was copied: {from} in [{copied_after}, {copied_before}]"
    );
    // Reconcile checks the current state only.
    let out = fx
        .walgraph(&["--config", &config, "reconcile", "--dry-run"])
        .await;
    assert!(
        out.status.success(),
        "reconcile: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A TRUNCATE closes every open version at its commit.
    let run = fx.start();
    fx.sql(
        "BEGIN; TRUNCATE {s}.items; INSERT INTO {s}.audit (item, op) VALUES (0, 'TRUNCATE'); COMMIT;",
    )
    .await;
    caught_up(&fx).await;
    run.stop().await;
    let at: i64 = fx
        .pg
        .query_one(
            &format!(
                "SELECT (extract(epoch FROM pg_xact_commit_timestamp(xid::text::xid)) * 1000000)::bigint FROM {}.audit WHERE op = 'TRUNCATE'",
                fx.schema
            ),
            &[],
        )
        .await
        .expect("the truncate's commit")
        .get(0);
    let closed = fx
        .cypher(
            "MATCH (v:{p}ItemVersion) WITH v, v.validTo.epochMillis * 1000 + v.validTo.microsecond % 1000 AS to \
             RETURN count(v.validTo) = count(v) AS all_closed, count(CASE WHEN to = $at THEN 1 END) AS at_truncate"
                .replace("$at", &at.to_string())
                .as_str(),
        )
        .await;
    assert_eq!(
        closed,
        vec![json!({"all_closed": true, "at_truncate": 3})],
        "items 1, 2 and 3 closed at the TRUNCATE's commit"
    );
    assert!(fx.cypher("MATCH (i:{p}Item) RETURN i").await.is_empty());
    fx.cleanup().await;
}

/// Checks the versions of item `id` against the audit: one per transaction
/// that left the row in place, with its state at commit, valid from that
/// commit until the next that changed the row; returns how many.
async fn chain_matches_audit(fx: &Fixture, id: i32) -> usize {
    // Postgres' audit: the state at each commit, with the commit's time.
    let audit = fx
        .pg
        .query(
            &format!(
                "SELECT DISTINCT ON (xid) op, n, (extract(epoch FROM pg_xact_commit_timestamp(xid::text::xid)) * 1000000)::bigint AS at \
                 FROM {}.audit WHERE item = $1 ORDER BY xid, seq DESC",
                fx.schema
            ),
            &[&id],
        )
        .await
        .expect("audit");
    let audit: Vec<(String, Option<i32>, i64)> = audit
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let versions = fx
        .cypher(
            "MATCH (v:{p}ItemVersion {id: $id}) RETURN v.n AS n, v.note AS note, \
             v.validFrom.epochMillis * 1000 + v.validFrom.microsecond % 1000 AS from, \
             v.validTo.epochMillis * 1000 + v.validTo.microsecond % 1000 AS to ORDER BY v._lsn"
                .replace("$id", &id.to_string())
                .as_str(),
        )
        .await;
    // Every state but the delete is a version; each closes when the next
    // commit changes the row, the delete closes the last before it.
    let states: Vec<&(String, Option<i32>, i64)> =
        audit.iter().filter(|a| a.0 != "DELETE").collect();
    assert_eq!(versions.len(), states.len(), "one version per transaction");
    for (i, (v, a)) in versions.iter().zip(&states).enumerate() {
        assert_eq!(v["n"].as_i64(), a.1.map(i64::from), "item {id} version {i}");
        assert_eq!(
            v["from"].as_i64(),
            Some(a.2),
            "version {i} starts at its commit"
        );
        let closed_by = audit.get(audit.iter().position(|x| std::ptr::eq(x, *a)).unwrap_or(0) + 1);
        assert_eq!(
            v["to"].as_i64(),
            closed_by.map(|c| c.2),
            "version {i} ends at the next commit"
        );
    }
    states.len()
}
