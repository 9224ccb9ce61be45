//! `walgraph bench` runs every measurement on a small workload, reports
//! them as JSON, and removes what it created.

use std::time::Duration;

use crate::support::{env, pg, SERVICES};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_everything_and_leaves_nothing_behind() {
    // Exclusive: the bench's timings should not compete with other tests.
    let _exclusive = SERVICES.write().await;
    let env = env();
    let dir = std::env::temp_dir().join(format!("walgraph-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let json = dir.join("report.json");
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
            .args([
                "bench",
                "--changes",
                "3000",
                "--changes-per-txn",
                "50",
                "--batch-sizes",
                "500,2000",
                "--delays",
                "20ms",
                "--steady-secs",
                "3",
                "--steady-rate",
                "500",
                "--per-change-secs",
                "2",
                "--big-txn",
                "3000",
                "--backfill",
                "2000",
                "--snapshot",
                "2500",
                "--snapshot-chunk-rows",
                "1000",
                "--json",
                &json.to_string_lossy(),
            ])
            .envs(env.vars())
            .env("WALGRAPH_LOG", "warn")
            .output(),
    )
    .await
    .expect("bench finishes within 10 minutes")
    .expect("bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("pg_recvlogical to /dev/null"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("JSON");
    let ms = report["measurements"].as_array().expect("measurements");
    let names: Vec<&str> = ms.iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(
        names,
        vec![
            "pg_recvlogical to /dev/null",
            "walgraph, null sink",
            "walgraph end to end",
            "walgraph end to end",
            "walgraph end to end",
            "one transaction per change",
            "pre-built batches to Neo4j",
            "steady rate, commit to graph",
            "online backfill beside a steady rate",
            "snapshot",
            "snapshot rows as pre-built batches",
            "one huge transaction",
        ]
    );
    let workload_changes = report["workload"]["changes"].as_u64().expect("changes");
    assert_eq!(workload_changes, 3000);
    for m in ms {
        assert!(m["changes_per_sec"].as_f64().unwrap_or(0.0) > 0.0, "{m}");
    }
    // Drains process the whole workload; the steady run reports latencies.
    for m in ms.iter().filter(|m| {
        matches!(
            m["name"].as_str(),
            Some("walgraph, null sink" | "walgraph end to end" | "pre-built batches to Neo4j")
        )
    }) {
        assert_eq!(m["changes"].as_u64(), Some(3000), "{m}");
    }
    // The sweep's fixed sizes, then the default (adaptive) settings.
    assert_eq!(
        ms[4]["settings"].as_str(),
        Some("defaults: max_changes 5000, up to 10000 behind")
    );
    let steady = &ms[7];
    let lat = steady["latency_ms"].as_array().expect("latencies");
    let p50 = lat[0].as_f64().expect("p50");
    let max = lat[3].as_f64().expect("max");
    assert!(p50 > 0.0 && p50 <= max, "{steady}");
    let backfill = &ms[8];
    assert_eq!(backfill["changes"].as_u64(), Some(2000), "{backfill}");
    assert!(
        backfill["latency_ms"][2].as_f64().unwrap_or(0.0) > 0.0,
        "the stream's latency during the copy: {backfill}"
    );
    // The snapshot copies every row, as do the pre-built batches of them
    // (three chunks: 1,000, 1,000 and 500 rows).
    assert_eq!(ms[9]["changes"].as_u64(), Some(2500), "{}", ms[9]);
    assert_eq!(ms[10]["changes"].as_u64(), Some(2500), "{}", ms[10]);
    assert_eq!(ms[10]["settings"].as_str(), Some("3 batches of 1000"));
    assert_eq!(ms[11]["changes"].as_u64(), Some(3000));
    assert!(ms[11]["peak_rss_mib"].as_f64().unwrap_or(0.0) > 1.0);
    let ratios: Vec<&str> = report["ratios"]
        .as_array()
        .expect("ratios")
        .iter()
        .filter_map(|r| r[0].as_str())
        .collect();
    assert_eq!(ratios.len(), 5, "{ratios:?}");
    assert!(ratios.contains(&"end to end at the defaults / pre-built batches"));
    assert!(ratios.contains(&"snapshot / its rows as pre-built batches"));

    // Nothing left: no slot, schema or publication, no bench label.
    let pg = pg(&env).await;
    let left = pg
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'walgraph_bench%')
                  + (SELECT count(*) FROM pg_namespace WHERE nspname = 'walgraph_bench')
                  + (SELECT count(*) FROM pg_publication WHERE pubname = 'walgraph_bench')",
            &[],
        )
        .await
        .expect("query");
    assert_eq!(left.get::<_, i64>(0), 0);
    let graph = crate::support::graph(&env).await;
    let mut rows = graph
        .execute(neo4rs::query(
            "MATCH (n) WHERE any(l IN labels(n) WHERE l STARTS WITH 'WgBench') RETURN count(n) AS n",
        ))
        .await
        .expect("count");
    let n: i64 = rows
        .next()
        .await
        .expect("row")
        .expect("a row")
        .get("n")
        .expect("n");
    assert_eq!(n, 0, "bench nodes removed");
    let _ = std::fs::remove_dir_all(&dir);
}
