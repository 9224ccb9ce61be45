//! `walgraph reconcile` finds a node deleted, a node added, a property and a
//! relationship changed behind walgraph's back, and the same for join-table
//! edges (identified by their two ends, or by a key of their own), and
//! `--repair` fixes them.

use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, Fixture, SERVICES};

const DDL: &str = "
CREATE TABLE {s}.groups (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE {s}.items (id int PRIMARY KEY, grp int REFERENCES {s}.groups, val int NOT NULL, name text);
CREATE TABLE {s}.item_groups (item int REFERENCES {s}.items, grp int REFERENCES {s}.groups, weight int,
  PRIMARY KEY (item, grp));
CREATE TABLE {s}.links (id int PRIMARY KEY, a int NOT NULL, b int, note text);
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
[[relationship]]
table = "{s}.item_groups"
type = "{p}ALSO_IN"
from = { label = "{p}Item", columns = ["item"] }
to = { label = "{p}Group", columns = ["grp"] }
properties = ["weight"]
[[relationship]]
table = "{s}.links"
type = "{p}LINKS"
from = { label = "{p}Item", columns = ["a"] }
to = { label = "{p}Item", columns = ["b"] }
properties = ["note"]
"#;

fn table<'a>(report: &'a serde_json::Value, label_suffix: &str) -> &'a serde_json::Value {
    report
        .as_array()
        .and_then(|a| {
            a.iter().find(|t| {
                t["label"]
                    .as_str()
                    .is_some_and(|l| l.ends_with(label_suffix))
            })
        })
        .unwrap_or_else(|| panic!("no {label_suffix} in {report}"))
}

async fn join_edges(fx: &Fixture) -> serde_json::Value {
    let also = fx
        .cypher(
            "MATCH (i:{p}Item)-[r:{p}ALSO_IN]->(g:{p}Group) \
             RETURN i.id AS item, g.id AS grp, r.weight AS weight ORDER BY item, grp",
        )
        .await;
    let links = fx
        .cypher(
            "MATCH (a:{p}Item)-[r:{p}LINKS]->(b:{p}Item) \
             RETURN r.id AS id, a.id AS a, b.id AS b, r.note AS note ORDER BY id, a, b",
        )
        .await;
    json!({"also": also, "links": links})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_and_repairs_what_changed_behind_walgraphs_back() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(DDL, MAPPING).await;
    fx.setup().await;
    let run = fx.start();
    fx.sql(
        "INSERT INTO {s}.groups SELECT g, 'group ' || g FROM generate_series(1, 3) g;
         INSERT INTO {s}.items SELECT g, 1 + g % 3, g * 10, 'item ' || g FROM generate_series(1, 50) g;
         INSERT INTO {s}.item_groups SELECT g, 1 + (g + 1) % 3, g FROM generate_series(1, 20) g;
         INSERT INTO {s}.links SELECT g, g, g + 1, 'link ' || g FROM generate_series(1, 20) g;
         INSERT INTO {s}.links VALUES (21, 1, NULL, 'no end');",
    )
    .await;
    let want_edges = json!({
        "also": (1..=20).map(|g| json!({"item": g, "grp": 1 + (g + 1) % 3, "weight": g})).collect::<Vec<_>>(),
        "links": (1..=20).map(|g| json!({"id": g, "a": g, "b": g + 1, "note": format!("link {g}")})).collect::<Vec<_>>(),
    });
    eventually(
        Duration::from_secs(60),
        "the items in the graph",
        || async {
            (fx.cypher("MATCH (:{p}Item)-[:{p}IN_GROUP]->(:{p}Group) RETURN count(*) AS n")
                .await
                == vec![json!({"n": 50})]
                && join_edges(&fx).await == want_edges)
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

    // Behind walgraph's back. (The dry run below reads in chunks of 7, so
    // rows and graph entities are compared and read back over many pages.)
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
    // Join-table edges (deleting item 5 took its edges along): one deleted,
    // one changed, one added (pair identity);
    // one deleted, one moved to another end, one property changed, one added,
    // one for the row without an end (key identity).
    fx.cypher_write("MATCH (:{p}Item {id: 2})-[r:{p}ALSO_IN]->() DELETE r")
        .await;
    fx.cypher_write("MATCH (:{p}Item {id: 3})-[r:{p}ALSO_IN]->() SET r.weight = 0")
        .await;
    fx.cypher_write(
        "MATCH (i:{p}Item {id: 30}), (g:{p}Group {id: 1}) CREATE (i)-[:{p}ALSO_IN {weight: 1, _lsn: 1}]->(g)",
    )
    .await;
    fx.cypher_write("MATCH ()-[r:{p}LINKS {id: 14}]->() DELETE r")
        .await;
    fx.cypher_write(
        "MATCH (a)-[r:{p}LINKS {id: 15}]->(), (c:{p}Item {id: 40}) DELETE r CREATE (a)-[:{p}LINKS {id: 15, note: 'link 15', _lsn: 1}]->(c)",
    )
    .await;
    fx.cypher_write("MATCH ()-[r:{p}LINKS {id: 16}]->() SET r.note = 'edited'")
        .await;
    fx.cypher_write(
        "MATCH (a:{p}Item {id: 1}), (b:{p}Item {id: 2}) CREATE (a)-[:{p}LINKS {id: 77, _lsn: 1}]->(b), (a)-[:{p}LINKS {id: 21, _lsn: 1}]->(b)",
    )
    .await;

    let found = fx
        .walgraph(&[
            "--config",
            &config,
            "reconcile",
            "--json",
            "--dry-run",
            "--chunk-rows",
            "7",
        ])
        .await;
    assert!(
        !found.status.success(),
        "differences make the exit non-zero"
    );
    let report: serde_json::Value = serde_json::from_slice(&found.stdout).expect("JSON report");
    let items = table(&report, "Item").clone();
    assert_eq!(items["rows"], json!(50));
    assert_eq!(items["missing"], json!(["5"]));
    assert_eq!(items["extra"], json!(["999"]));
    assert_eq!(items["changed"], json!(["7", "9"]), "{items}");
    let also = table(&report, "ALSO_IN");
    assert_eq!(also["kind"], json!("relationship"));
    assert_eq!(also["rows"], json!(20));
    assert_eq!(also["missing"], json!(["2, 1", "5, 1"]), "{also}");
    assert_eq!(also["changed"], json!(["3, 2"]), "{also}");
    assert_eq!(also["extra"], json!(["30, 1"]), "{also}");
    let links = table(&report, "LINKS");
    assert_eq!(links["rows"], json!(21));
    assert_eq!(links["missing"], json!(["4", "5", "14"]), "{links}");
    assert_eq!(links["changed"], json!(["15", "16", "21"]), "{links}");
    assert_eq!(links["extra"], json!(["77"]), "{links}");
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
    assert_eq!(join_edges(&fx).await, want_edges);
    fx.cleanup().await;
}
