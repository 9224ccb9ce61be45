//! The decoder against what a real Postgres sends: every listed type, TOAST,
//! DDL mid-stream, TRUNCATE, partitions, streamed and prepared transactions.
//! Read with `walgraph peek` from each test's own slot.

use serde_json::{json, Value as Json};
use walgraph::config::SpillSettings;
use walgraph::lsn::Lsn;

use crate::support::{Fixture, SERVICES};

fn node_mapping(tables: &[&str]) -> String {
    tables
        .iter()
        .map(|t| format!("[[node]]\ntable = \"{{s}}.{t}\"\nlabel = \"{{p}}{t}\"\n"))
        .collect()
}

/// The `id` of each transaction's first new row.
fn first_ids(txns: &[Json]) -> Vec<i64> {
    txns.iter()
        .map(|t| t["changes"][0]["new"]["id"]["value"].as_i64().unwrap_or(-1))
        .collect()
}

/// The `new` row of the only change of the only transaction.
fn only_new_row(txns: &[Json]) -> &Json {
    assert_eq!(txns.len(), 1, "{txns:#?}");
    let changes = txns[0]["changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 1, "{changes:#?}");
    &changes[0]["new"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_type_decodes_to_its_typed_value() {
    let _shared = SERVICES.read().await;
    let ddl = "CREATE TYPE {s}.mood AS ENUM ('sad', 'happy');
        CREATE TABLE {s}.typed (
            id int PRIMARY KEY, i2 int2, i8 int8, f4 float4, f8 float8, num numeric(30,10), b bool,
            t text, vc varchar(10), ch char(3), nm name, by bytea, u uuid, j json, jb jsonb,
            d date, tm time, ttz timetz, ts timestamp, tstz timestamptz, iv interval,
            ip inet, net cidr, arr int[], tarr text[], mood {s}.mood, pt point, nothing text);";
    let fx = Fixture::new(ddl, &node_mapping(&["typed"])).await;
    fx.setup().await;
    fx.sql(
        r#"INSERT INTO {s}.typed VALUES (1, -2, 9007199254740993, 1.5, -2.25,
            12345678901234567890.0123456789, true, 'héllo', 'vc', 'ab', 'nm', '\xdeadbeef',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2]}', '{"b": null}',
            '2024-02-29', '13:14:15.5', '10:00:00+05:30', '2024-02-29 13:14:15.123456',
            '2024-02-29 13:14:15.123456+02', '1 year 2 mons 3 days 04:05:06.5',
            '192.168.0.1/24', '10.0.0.0/8', '{1,NULL,3}', '{"a b","c"}', 'happy', '(1,2)', NULL)"#,
    )
    .await;
    let txns = fx.peek(1).await;
    let row = only_new_row(&txns);
    let want = json!({
        "id": {"type": "int", "value": 1},
        "i2": {"type": "int", "value": -2},
        "i8": {"type": "int", "value": 9007199254740993_i64},
        "f4": {"type": "float", "value": 1.5},
        "f8": {"type": "float", "value": -2.25},
        "num": {"type": "numeric", "value": "12345678901234567890.0123456789"},
        "b": {"type": "bool", "value": true},
        "t": {"type": "text", "value": "héllo"},
        "vc": {"type": "text", "value": "vc"},
        // char(n) without its padding (docs/configuration.md).
        "ch": {"type": "text", "value": "ab"},
        "nm": {"type": "text", "value": "nm"},
        "by": {"type": "bytes", "value": [222, 173, 190, 239]},
        "u": {"type": "uuid", "value": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"},
        "j": {"type": "json", "value": "{\"a\": [1, 2]}"},
        "jb": {"type": "json", "value": "{\"b\": null}"},
        "d": {"type": "date", "value": "2024-02-29"},
        "tm": {"type": "time", "value": "13:14:15.500"},
        "ttz": {"type": "time_tz", "value": ["10:00:00", 19800]},
        "ts": {"type": "timestamp", "value": "2024-02-29T13:14:15.123456"},
        "tstz": {"type": "timestamp_tz", "value": "2024-02-29T11:14:15.123456Z"},
        "iv": {"type": "interval", "value": {"months": 14, "days": 3, "micros": 14_706_500_000_i64}},
        "ip": {"type": "inet", "value": "192.168.0.1/24"},
        "net": {"type": "inet", "value": "10.0.0.0/8"},
        "arr": {"type": "array", "value": [{"type": "int", "value": 1}, {"type": "null"}, {"type": "int", "value": 3}]},
        "tarr": {"type": "array", "value": [{"type": "text", "value": "a b"}, {"type": "text", "value": "c"}]},
        "mood": {"type": "text", "value": "happy"},
        "pt": {"type": "text", "value": "(1,2)"},
        "nothing": {"type": "null"},
    });
    assert_eq!(row, &want);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untouched_toasted_column_is_unchanged_not_null() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.docs (id int PRIMARY KEY, title text, body text);",
        &node_mapping(&["docs"]),
    )
    .await;
    fx.setup().await;
    fx.sql("INSERT INTO {s}.docs SELECT 1, 't', string_agg(md5(g::text), '') FROM generate_series(1, 4000) g")
        .await;
    fx.sql("UPDATE {s}.docs SET title = 'new title' WHERE id = 1")
        .await;
    let txns = fx.peek(2).await;
    assert_eq!(txns.len(), 2);
    let inserted = &txns[0]["changes"][0]["new"]["body"]["value"];
    assert_eq!(inserted.as_str().map(str::len), Some(4000 * 32));
    let updated = &txns[1]["changes"][0]["new"];
    assert_eq!(
        updated["title"],
        json!({"type": "text", "value": "new title"})
    );
    assert_eq!(updated["body"], json!("unchanged"));
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_added_and_dropped_between_inserts_take_effect_mid_stream() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.evolving (id int PRIMARY KEY, a text);",
        &node_mapping(&["evolving"]),
    )
    .await;
    fx.setup().await;
    // Each statement on its own: a multi-statement string is one transaction.
    for stmt in [
        "INSERT INTO {s}.evolving VALUES (1, 'a1')",
        "ALTER TABLE {s}.evolving ADD COLUMN b int",
        "INSERT INTO {s}.evolving VALUES (2, 'a2', 2)",
        "ALTER TABLE {s}.evolving DROP COLUMN a",
        "INSERT INTO {s}.evolving VALUES (3, 3)",
        "ALTER TABLE {s}.evolving RENAME COLUMN b TO c",
        "INSERT INTO {s}.evolving VALUES (4, 4)",
    ] {
        fx.sql(stmt).await;
    }
    let txns = fx.peek(4).await;
    let columns: Vec<Vec<String>> = txns
        .iter()
        .map(|t| {
            let mut c: Vec<String> = t["changes"][0]["new"]
                .as_object()
                .expect("row")
                .keys()
                .cloned()
                .collect();
            c.sort();
            c
        })
        .collect();
    assert_eq!(
        columns,
        vec![
            vec!["a", "id"],
            vec!["a", "b", "id"],
            vec!["b", "id"],
            vec!["c", "id"]
        ]
    );
    assert_eq!(
        txns[3]["changes"][0]["new"]["c"],
        json!({"type": "int", "value": 4})
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_of_two_tables_is_one_transaction_with_both() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.a (id int PRIMARY KEY); CREATE TABLE {s}.b (id int PRIMARY KEY);",
        &node_mapping(&["a", "b"]),
    )
    .await;
    fx.setup().await;
    fx.sql("INSERT INTO {s}.a VALUES (1); INSERT INTO {s}.b VALUES (1); TRUNCATE {s}.a, {s}.b;")
        .await;
    let txns = fx.peek(1).await;
    let ops: Vec<(String, String)> = txns[0]["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            (
                c["relation"].as_str().unwrap_or("").to_string(),
                c["op"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let s = &fx.schema;
    assert_eq!(
        ops,
        vec![
            (format!("{s}.a"), "insert".into()),
            (format!("{s}.b"), "insert".into()),
            (format!("{s}.a"), "truncate".into()),
            (format!("{s}.b"), "truncate".into()),
        ]
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_is_published_via_its_root() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.measurements (id int, region text, v int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE {s}.measurements_eu PARTITION OF {s}.measurements FOR VALUES IN ('eu');
         CREATE TABLE {s}.measurements_us PARTITION OF {s}.measurements FOR VALUES IN ('us');",
        &node_mapping(&["measurements"]),
    )
    .await;
    fx.setup().await;
    fx.sql("INSERT INTO {s}.measurements VALUES (1, 'eu', 10), (2, 'us', 20)")
        .await;
    let txns = fx.peek(1).await;
    let rels: Vec<&str> = txns[0]["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["relation"].as_str().unwrap_or(""))
        .collect();
    let root = format!("{}.measurements", fx.schema);
    assert_eq!(rels, vec![root.as_str(), root.as_str()]);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_and_deletes_carry_the_old_key_or_the_full_old_row() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.k (id int PRIMARY KEY, v text);
         CREATE TABLE {s}.f (id int PRIMARY KEY, v text); ALTER TABLE {s}.f REPLICA IDENTITY FULL;",
        &node_mapping(&["k", "f"]),
    )
    .await;
    fx.setup().await;
    fx.sql(
        "INSERT INTO {s}.k VALUES (1, 'x'); INSERT INTO {s}.f VALUES (1, 'x');
         UPDATE {s}.k SET id = 2 WHERE id = 1; DELETE FROM {s}.f WHERE id = 1;",
    )
    .await;
    let txns = fx.peek(1).await;
    let c = &txns[0]["changes"];
    assert_eq!(c[2]["op"], "update");
    assert_eq!(c[2]["old"]["id"], json!({"type": "int", "value": 1}));
    assert_eq!(
        c[2]["old"]["v"],
        json!({"type": "null"}),
        "a key-only old tuple has no other columns"
    );
    assert_eq!(c[2]["old_is_full_row"], false);
    assert_eq!(c[3]["op"], "delete");
    assert_eq!(c[3]["old"]["v"], json!({"type": "text", "value": "x"}));
    assert_eq!(c[3]["old_is_full_row"], true);
    fx.cleanup().await;
}

/// How many transactions Postgres streamed for the fixture's slot.
async fn streamed_txns(fx: &Fixture) -> i64 {
    let row = fx
        .pg
        .query_one(
            "SELECT coalesce(stream_txns, 0) FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&fx.config.postgres.slot],
        )
        .await
        .expect("slot stats");
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_is_assembled_spilled_and_applied_at_commit() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.big (id int PRIMARY KEY, pad text);",
        &node_mapping(&["big"]),
    )
    .await;
    fx.setup().await;
    let spill_dir = std::env::temp_dir().join(format!("walgraph-test-spill-{}", fx.id));
    std::fs::create_dir_all(&spill_dir).expect("spill dir");
    let spill = SpillSettings {
        memory_limit: 64 * 1024,
        dir: spill_dir.clone(),
    };
    let writes = async {
        fx.sql("INSERT INTO {s}.big SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g")
            .await;
        let (before_abort, after_abort) = fx
            .roll_back_streamed(
                "INSERT INTO {s}.big SELECT g, 'gone' FROM generate_series(20001, 40000) g",
            )
            .await;
        for stmt in [
            "BEGIN",
            "INSERT INTO {s}.big SELECT g, 'kept' FROM generate_series(40001, 50000) g",
            "SAVEPOINT s",
            "INSERT INTO {s}.big SELECT g, 'rolled back' FROM generate_series(50001, 60000) g",
            "ROLLBACK TO SAVEPOINT s",
            "INSERT INTO {s}.big VALUES (60001, 'after')",
            "COMMIT",
        ] {
            fx.sql(stmt).await;
        }
        (before_abort, after_abort)
    };
    let (mut txns, (before_abort, after_abort)) = tokio::join!(fx.peek_rollbacks(3, spill), writes);
    assert!(
        streamed_txns(&fx).await >= 2,
        "Postgres did not stream; is logical_decoding_work_mem low?"
    );
    assert_eq!(
        txns.len(),
        3,
        "two transactions and the rollback between them"
    );
    // The rollback is reported, never applied; from PostgreSQL 16 on the
    // stream is asked for in 'parallel' mode, and the abort carries where
    // and when it happened.
    let rolled = txns.remove(1);
    let rolled = &rolled["rolled_back"];
    assert!(rolled["messages"].as_u64().unwrap_or(0) > 0, "{rolled}");
    assert!(rolled["bytes"].as_u64().unwrap_or(0) > 0, "{rolled}");
    if fx.server_version().await >= 160_000 {
        let lsn: Lsn = rolled["abort_lsn"]
            .as_str()
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("no abort LSN on protocol 4: {rolled}"));
        assert!(
            lsn > before_abort.0 && lsn <= after_abort.0,
            "abort at {lsn}, not between {} and {}",
            before_abort.0,
            after_abort.0
        );
        let at = rolled["abort_time"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .unwrap_or_else(|| panic!("no abort time on protocol 4: {rolled}"))
            .timestamp_micros();
        assert!(
            at >= before_abort.1 && at <= after_abort.1,
            "abort at {at} µs, not between {} and {}",
            before_abort.1,
            after_abort.1
        );
    } else {
        assert!(rolled["abort_lsn"].is_null(), "{rolled}");
        assert!(rolled["abort_time"].is_null(), "{rolled}");
    }
    assert!(
        txns.iter().all(|t| t.get("rolled_back").is_none()),
        "the aborted transaction must leave no other trace"
    );
    let ids = |t: &Json| -> Vec<i64> {
        t["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .map(|c| c["new"]["id"]["value"].as_i64().unwrap_or(-1))
            .collect()
    };
    // Compared whole, reported as ranges: 20,000 ids in a failure help nobody.
    let first = ids(&txns[0]);
    assert!(
        first == (1..=20000).collect::<Vec<_>>(),
        "first transaction: {} changes, {:?}..{:?}",
        first.len(),
        first.first(),
        first.last()
    );
    let mut want: Vec<i64> = (40001..=50000).collect();
    want.push(60001);
    let second = ids(&txns[1]);
    assert!(
        second == want,
        "the rolled-back subtransaction must leave no trace: {} changes, {:?}..{:?}",
        second.len(),
        second.first(),
        second.last()
    );
    let left = std::fs::read_dir(&spill_dir).expect("spill dir").count();
    assert_eq!(
        left, 0,
        "spill files are removed once their transaction is done"
    );
    let _ = std::fs::remove_dir_all(&spill_dir);
    fx.cleanup().await;
}

/// Prepares two transactions (rows 1 and 2), commits a row 3, commits the
/// first prepared one, rolls the second back, and commits a row 4.
async fn prepare_commit_and_roll_back(fx: &Fixture) {
    let g1 = format!("{}_g1", fx.id);
    let g2 = format!("{}_g2", fx.id);
    // COMMIT/ROLLBACK PREPARED cannot run inside a multi-statement string.
    for stmt in [
        format!("BEGIN; INSERT INTO {{s}}.p VALUES (1); PREPARE TRANSACTION '{g1}'"),
        format!("BEGIN; INSERT INTO {{s}}.p VALUES (2); PREPARE TRANSACTION '{g2}'"),
        "INSERT INTO {s}.p VALUES (3)".to_string(),
        format!("COMMIT PREPARED '{g1}'"),
        format!("ROLLBACK PREPARED '{g2}'"),
        "INSERT INTO {s}.p VALUES (4)".to_string(),
    ] {
        fx.sql(&stmt).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_transaction_arrives_at_commit_and_a_rolled_back_one_never() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.p (id int PRIMARY KEY);",
        &node_mapping(&["p"]),
    )
    .await;
    fx.setup().await;
    prepare_commit_and_roll_back(&fx).await;
    let txns = fx.peek(3).await;
    let ids = first_ids(&txns);
    assert_eq!(
        ids,
        vec![3, 1, 4],
        "in commit order, without the rolled-back one"
    );
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_logical_messages_travel_with_their_transaction() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.m (id int PRIMARY KEY);",
        &node_mapping(&["m"]),
    )
    .await;
    fx.setup().await;
    fx.sql(
        "BEGIN; INSERT INTO {s}.m VALUES (1);
         SELECT pg_logical_emit_message(true, 'walgraph-test', 'hello');
         COMMIT;",
    )
    .await;
    let txns = fx.peek_messages(1).await;
    assert_eq!(
        txns[0]["messages"],
        json!([{"prefix": "walgraph-test", "content": "hello"}])
    );
    fx.cleanup().await;
}

/// The peak resident memory of a process, in KiB, from /proc.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_streams_through_peek_in_bounded_memory() {
    use tokio::io::AsyncReadExt;

    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.huge (id int PRIMARY KEY, pad text);",
        &node_mapping(&["huge"]),
    )
    .await;
    fx.setup().await;
    const ROWS: usize = 1_000_000;
    fx.sql(&format!(
        "INSERT INTO {{s}}.huge SELECT g, 'row ' || g FROM generate_series(1, {ROWS}) g"
    ))
    .await;

    let dir = std::env::temp_dir().join(format!("walgraph-huge-{}", fx.id));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("peek.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nslot = \"{}\"\npublication = \"{}\"\nstream_memory_mib = 16\nspill_dir = \"{}\"\n",
            fx.config.postgres.slot,
            fx.config.postgres.publication,
            dir.display()
        ),
    )
    .expect("config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
        .args([
            "--config",
            &config.to_string_lossy(),
            "peek",
            "--limit",
            "1",
            "--idle-timeout",
            "300s",
        ])
        .env("WALGRAPH_PG_URL", &fx.env.pg_url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start walgraph peek");
    let pid = child.id().expect("pid");
    let mut stdout = child.stdout.take().expect("stdout");

    // Count the changes as the line streams by, and watch walgraph's memory.
    let needle = b"\"op\":\"insert\"";
    let mut inserts = 0usize;
    let mut lines = 0usize;
    let mut peak_kib = 0u64;
    let mut carry: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        if let Some(p) = peak_rss_kib(pid) {
            peak_kib = peak_kib.max(p);
        }
        let n = tokio::time::timeout_at(deadline, stdout.read(&mut buf))
            .await
            .expect("peek took over 10 minutes")
            .expect("read peek output");
        if n == 0 {
            break;
        }
        carry.extend_from_slice(&buf[..n]);
        inserts += carry.windows(needle.len()).filter(|w| *w == needle).count();
        lines += carry.iter().filter(|b| **b == b'\n').count();
        let keep = carry.len().min(needle.len() - 1);
        carry.drain(..carry.len() - keep);
    }
    let out = child.wait_with_output().await.expect("peek exit");
    assert!(
        out.status.success(),
        "peek failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines, 1, "one transaction, one line");
    assert_eq!(inserts, ROWS, "every row of the transaction");
    // 16 MiB of the transaction in memory, the rest spilled; the process as a
    // whole stays far below the size of the transaction (1M rows).
    assert!(peak_kib > 0, "could not read walgraph's memory");
    eprintln!(
        "walgraph peek: {ROWS} rows, peak RSS {} MiB",
        peak_kib / 1024
    );
    assert!(
        peak_kib < 96 * 1024,
        "walgraph peaked at {} MiB",
        peak_kib / 1024
    );
    assert_eq!(
        std::fs::read_dir(&dir).expect("dir").count(),
        1,
        "only the config is left: the spill file was removed"
    );
    let _ = std::fs::remove_dir_all(&dir);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_phase_decoding_prepared_transactions_still_apply_only_at_commit() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.p (id int PRIMARY KEY);",
        &node_mapping(&["p"]),
    )
    .await;
    fx.setup().await;
    // A slot of the test's own: two-phase decoding, once on, stays on.
    let slot = format!("{}_2pc", fx.config.postgres.slot);
    fx.pg
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .expect("a second slot");
    prepare_commit_and_roll_back(&fx).await;
    if fx.server_version().await < 150_000 {
        // pgoutput decodes prepared transactions from protocol 3 (15) on:
        // asked for before, peek says so rather than decoding without it.
        let info = walgraph::source::ConnInfo::parse(&fx.env.pg_url).expect("pg url");
        let opts = walgraph::commands::peek::PeekOptions {
            slot: Some(slot.clone()),
            publications: vec![fx.config.postgres.publication.clone()],
            proto_version: None,
            streaming: true,
            two_phase: true,
            messages: false,
            rollbacks: false,
            spill: walgraph::config::SpillSettings::default(),
            limit: Some(3),
            idle_timeout: Some(std::time::Duration::from_secs(5)),
            confirm: false,
        };
        let mut out: Vec<u8> = Vec::new();
        let refused =
            walgraph::commands::peek::peek(&info, &opts, &mut out, std::future::pending())
                .await
                .expect_err("--two-phase is refused below PostgreSQL 15");
        assert!(
            walgraph::error_sentence(&refused).contains("PostgreSQL 15"),
            "{}",
            walgraph::error_sentence(&refused)
        );
        let _ = fx
            .pg
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await;
        fx.cleanup().await;
        return;
    }
    // Begin Prepare, Prepare, Commit Prepared and Rollback Prepared travel
    // now; the transactions that come out are the same.
    let txns = fx.peek_two_phase(&slot, 3).await;
    let ids = first_ids(&txns);
    assert_eq!(ids, vec![3, 1, 4]);
    let row = fx
        .pg
        .query_one(
            "SELECT two_phase FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot");
    assert!(
        row.get::<_, bool>(0),
        "the slot did not switch to two-phase decoding"
    );
    let _ = fx
        .pg
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_replica_identity_and_a_replication_origin_are_seen_mid_stream() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.r (id int PRIMARY KEY, v text);",
        &node_mapping(&["r"]),
    )
    .await;
    fx.setup().await;
    let origin = format!("wgt_origin_{}", fx.id);
    for stmt in [
        "INSERT INTO {s}.r VALUES (1, 'a'), (2, 'b')".to_string(),
        "DELETE FROM {s}.r WHERE id = 1".to_string(),
        "ALTER TABLE {s}.r REPLICA IDENTITY FULL".to_string(),
        "DELETE FROM {s}.r WHERE id = 2".to_string(),
        format!("SELECT pg_replication_origin_create('{origin}')"),
        format!(
            "SELECT pg_replication_origin_session_setup('{origin}'); \
             BEGIN; SELECT pg_replication_origin_xact_setup('0/10', now()); INSERT INTO {{s}}.r VALUES (3, 'c'); COMMIT; \
             SELECT pg_replication_origin_session_reset()"
        ),
    ] {
        fx.sql(&stmt).await;
    }
    let txns = fx.peek(4).await;
    let del1 = &txns[1]["changes"][0];
    let del2 = &txns[2]["changes"][0];
    assert_eq!(
        (del1["op"].as_str(), del1["old_is_full_row"].as_bool()),
        (Some("delete"), Some(false))
    );
    assert_eq!(del1["old"]["v"], json!({"type": "null"}));
    assert_eq!(
        (del2["op"].as_str(), del2["old_is_full_row"].as_bool()),
        (Some("delete"), Some(true))
    );
    assert_eq!(del2["old"]["v"], json!({"type": "text", "value": "b"}));
    assert_eq!(txns[3]["origin"], json!(origin));
    fx.sql(&format!("SELECT pg_replication_origin_drop('{origin}')"))
        .await;
    fx.cleanup().await;
}
