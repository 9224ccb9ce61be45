//! `walgraph reconcile` finds a node deleted, a node added, a property and a
//! relationship changed behind walgraph's back, and `--repair` fixes them.

use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, Fixture, SERVICES};

const DDL: &str = "
CREATE TABLE {s}.groups (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE {s}.items (id int PRIMARY KEY, grp int REFERENCES {s}.groups, val int NOT NULL, name text);
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
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_and_repairs_what_changed_behind_walgraphs_back() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    let run = fx.start();
    fx.sql(
        "INSERT INTO {s}.groups SELECT g, 'group ' || g FROM generate_series(1, 3) g;
         INSERT INTO {s}.items SELECT g, 1 + g % 3, g * 10, 'item ' || g FROM generate_series(1, 50) g;",
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "the items in the graph",
        || async {
            (fx.cypher("MATCH (:{p}Item)-[:{p}IN_GROUP]->(:{p}Group) RETURN count(*) AS n")
                .await
                == vec![json!({"n": 50})])
            .then_some(())
        },
    )
    .await;
    run.stop().await;
    let config = fx.config_file("reconcile.toml", "", MAPPING);
    let config = config.to_string_lossy().into_owned();

    let clean = fx.walgraph(&["--config", &config, "reconcile"]).await;
    assert!(
        clean.status.success(),
        "an untouched graph reconciles: {}",
        String::from_utf8_lossy(&clean.stderr)
    );

    // Behind walgraph's back.
    fx.cypher_write("MATCH (i:{p}Item {id: 5}) DETACH DELETE i")
        .await;
    fx.cypher_write("MATCH (i:{p}Item {id: 7}) SET i.val = -1")
        .await;
    fx.cypher_write("MATCH (:{p}Item {id: 9})-[r:{p}IN_GROUP]->() DELETE r")
        .await;
    fx.cypher_write("CREATE (:{p}Item {id: 999, val: 1, _lsn: 1})")
        .await;
    fx.cypher_write("MATCH (i:{p}Item {id: 11}) SET i.only_in_graph = true")
        .await;

    let found = fx
        .walgraph(&["--config", &config, "reconcile", "--json", "--dry-run"])
        .await;
    assert!(
        !found.status.success(),
        "differences make the exit non-zero"
    );
    let report: serde_json::Value = serde_json::from_slice(&found.stdout).expect("JSON report");
    let items = report
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|t| t["label"].as_str().is_some_and(|l| l.ends_with("Item")))
        })
        .expect("the items table")
        .clone();
    assert_eq!(items["rows"], json!(50));
    assert_eq!(items["missing"], json!(["5"]));
    assert_eq!(items["extra"], json!(["999"]));
    assert_eq!(items["changed"], json!(["7", "9"]), "{items}");
    assert!(String::from_utf8_lossy(&found.stderr).contains("--repair"));

    // Repair works beside a running walgraph.
    let beside = fx.start();
    let repaired = fx
        .walgraph(&["--config", &config, "reconcile", "--repair"])
        .await;
    assert!(
        repaired.status.success(),
        "{}",
        String::from_utf8_lossy(&repaired.stderr)
    );
    assert!(String::from_utf8_lossy(&repaired.stdout).contains("repaired"));
    beside.stop().await;
    let after = fx.walgraph(&["--config", &config, "reconcile"]).await;
    assert!(
        after.status.success(),
        "nothing left to repair: {}",
        String::from_utf8_lossy(&after.stdout)
    );
    let rows = fx
        .cypher(
            "MATCH (i:{p}Item) WHERE i.id IN [5, 7, 9, 11, 999] \
             OPTIONAL MATCH (i)-[:{p}IN_GROUP]->(g) \
             RETURN i.id AS id, i.val AS val, g.id AS grp, i.only_in_graph AS graph_only ORDER BY id",
        )
        .await;
    assert_eq!(
        rows,
        vec![
            json!({"id": 5, "val": 50, "grp": 3, "graph_only": null}),
            json!({"id": 7, "val": 70, "grp": 2, "graph_only": null}),
            json!({"id": 9, "val": 90, "grp": 1, "graph_only": null}),
            json!({"id": 11, "val": 110, "grp": 3, "graph_only": true}),
        ]
    );
    fx.cleanup().await;
}
