//! Mapping changes while `run` streams (issue 11, item 4): a property
//! excluded or renamed, a label renamed, a relationship replaced, a table
//! taken out and mapped again — after SIGHUP or a restart, with a writer changing rows and a
//! SIGKILL in the middle of the work; the graph follows, and a reload that
//! cannot run changes nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use walgraph::config::Config;

use crate::backfill::{caught_up, copied, take_snapshot, writer, DDL, ITEMS, NOTES};
use crate::support::{eventually, Fixture, SERVICES};

/// Items without their quantity; notes with `body` as `text`.
const ITEMS_NO_QTY: &str = r#"
[[node]]
table = "{s}.items"
label = "{p}Item"
exclude = ["qty"]
"#;

const NOTES_RENAMED: &str = r#"
[[node]]
table = "{s}.notes"
label = "{p}Note"
rename = { body = "text" }

[[relationship]]
table = "{s}.notes"
type = "{p}ABOUT"
from = { label = "{p}Note", columns = ["id"] }
to = { label = "{p}Item", columns = ["item_id"] }
"#;

/// The notes' label renamed.
const MEMOS: &str = r#"
[[node]]
table = "{s}.notes"
label = "{p}Memo"
rename = { body = "text" }

[[relationship]]
table = "{s}.notes"
type = "{p}ABOUT"
from = { label = "{p}Memo", columns = ["id"] }
to = { label = "{p}Item", columns = ["item_id"] }
"#;

/// ABOUT replaced by MENTIONS.
const MEMOS_MENTION: &str = r#"
[[node]]
table = "{s}.notes"
label = "{p}Memo"
rename = { body = "text" }

[[relationship]]
table = "{s}.notes"
type = "{p}MENTIONS"
from = { label = "{p}Memo", columns = ["id"] }
to = { label = "{p}Item", columns = ["item_id"] }
"#;

/// The running walgraph child and its config file.
struct Child {
    proc: tokio::process::Child,
    config: String,
}

impl Child {
    fn signal(&self, sig: &str) {
        let pid = self.proc.id().expect("walgraph runs").to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }
}

/// Points `fx.config` and the child's config file at `mapping`, and runs
/// `setup` (constraints for new labels, the publication).
async fn remap(fx: &mut Fixture, config: &str, mapping: &str) {
    let text = mapping
        .replace("{s}", &fx.schema)
        .replace("{p}", &fx.prefix);
    let parsed = Config::parse(&text).expect("mapping");
    fx.config.nodes = parsed.nodes;
    fx.config.relationships = parsed.relationships;
    Box::pin(fx.setup()).await;
    let path = fx.config_file(config, "[batch]\nmax_changes = 200", mapping);
    assert!(path.exists());
}

async fn count(fx: &Fixture, q: &str) -> i64 {
    fx.cypher(q)
        .await
        .first()
        .and_then(|r| r["n"].as_i64())
        .unwrap_or(-1)
}

async fn pg_count(fx: &Fixture, q: &str) -> i64 {
    fx.pg
        .query_one(&q.replace("{s}", &fx.schema), &[])
        .await
        .expect("count")
        .get(0)
}

/// A writer changing rows until stopped.
struct Writes {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn writes(fx: &Fixture) -> Writes {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let task = writer(fx, Arc::clone(&stop), Arc::clone(&done));
    Writes { stop, done, task }
}

impl Writes {
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer");
        self.done.load(Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapping_changes_are_followed_after_sighup_or_a_restart_while_rows_change() {
    // On the heap: the whole scenario is one large future.
    Box::pin(scenario()).await;
}

async fn scenario() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(DDL, &format!("{ITEMS}{NOTES}")).await;
    fx.config.batch.max_changes = 200;
    fx.setup().await;
    Box::pin(take_snapshot(&fx.config)).await;
    Box::pin(remap(&mut fx, "run.toml", &format!("{ITEMS}{NOTES}"))).await;
    let config = fx
        .config_file(
            "run.toml",
            "[batch]\nmax_changes = 200",
            &format!("{ITEMS}{NOTES}"),
        )
        .to_string_lossy()
        .to_string();
    let spawn = |fx: &Fixture| Child {
        proc: fx.spawn(&["--config", &config, "run"]),
        config: config.clone(),
    };
    let mut run = spawn(&fx);
    Box::pin(caught_up(&fx.config)).await;
    assert!(
        count(
            &fx,
            "MATCH (n:{p}Item) WHERE n.qty IS NOT NULL RETURN count(n) AS n"
        )
        .await
            > 0
    );

    // 1. A property excluded and one renamed, by SIGHUP, rows changing; a
    //    SIGKILL while the notes are copied again, then a restart.
    let w = writes(&fx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    remap(
        &mut fx,
        "run.toml",
        &format!("{ITEMS_NO_QTY}{NOTES_RENAMED}"),
    )
    .await;
    let (_, _, rows_before) = copied(&fx).await;
    run.signal("-HUP");
    eventually(
        Duration::from_secs(60),
        "the notes to be copied again",
        || async {
            let (_, table, rows) = copied(&fx).await;
            (table.is_some_and(|t| t.ends_with(".notes")) && rows > rows_before + 400).then_some(())
        },
    )
    .await;
    run.signal("-KILL");
    let _ = run.proc.wait().await;
    assert!(
        count(
            &fx,
            "MATCH (n:{p}Note) WHERE n.body IS NOT NULL RETURN count(n) AS n"
        )
        .await
            > 0
            || count(
                &fx,
                "MATCH (n:{p}Note) WHERE n.text IS NULL RETURN count(n) AS n"
            )
            .await
                > 0,
        "killed before the renamed property was on every note"
    );
    run = spawn(&fx);
    assert_eq!(run.config, config);
    eventually(Duration::from_secs(120), "qty gone and body renamed text", || async {
        let stale = count(
            &fx,
            "MATCH (n) WHERE (n:{p}Item AND n.qty IS NOT NULL) OR (n:{p}Note AND n.body IS NOT NULL) RETURN count(n) AS n",
        )
        .await;
        let texts = count(&fx, "MATCH (n:{p}Note) WHERE n.text IS NOT NULL RETURN count(n) AS n").await;
        let rows = pg_count(&fx, "SELECT count(*) FROM {s}.notes WHERE body IS NOT NULL").await;
        (stale == 0 && texts >= rows).then_some(())
    })
    .await;
    assert!(w.stop().await > 0, "rows changed meanwhile");
    Box::pin(caught_up(&fx.config)).await;
    assert_eq!(
        count(&fx, "MATCH (n) WHERE (n:{p}Item AND n.qty IS NOT NULL) OR (n:{p}Note AND n.body IS NOT NULL) RETURN count(n) AS n").await,
        0
    );

    // 2. The notes' label renamed, by SIGHUP: relabelled, their edges kept.
    let w = writes(&fx);
    let edges_before = count(&fx, "MATCH ()-[r:{p}ABOUT]->() RETURN count(r) AS n").await;
    assert!(edges_before > 0);
    Box::pin(remap(
        &mut fx,
        "run.toml",
        &format!("{ITEMS_NO_QTY}{MEMOS}"),
    ))
    .await;
    run.signal("-HUP");
    eventually(Duration::from_secs(60), "every note a memo", || async {
        let notes = count(&fx, "MATCH (n:{p}Note) RETURN count(n) AS n").await;
        let memos = count(&fx, "MATCH (n:{p}Memo) RETURN count(n) AS n").await;
        (notes == 0 && memos > 0).then_some(())
    })
    .await;
    w.stop().await;
    Box::pin(caught_up(&fx.config)).await;

    // 3. ABOUT replaced by MENTIONS, by a restart.
    let w = writes(&fx);
    remap(
        &mut fx,
        "run.toml",
        &format!("{ITEMS_NO_QTY}{MEMOS_MENTION}"),
    )
    .await;
    run.signal("-TERM");
    let status = run.proc.wait().await.expect("walgraph exits");
    assert!(status.success(), "SIGTERM exits 0: {status}");
    run = spawn(&fx);
    eventually(
        Duration::from_secs(90),
        "ABOUT replaced by MENTIONS",
        || async {
            let about = count(&fx, "MATCH ()-[r:{p}ABOUT]->() RETURN count(r) AS n").await;
            let mentions = count(&fx, "MATCH ()-[r:{p}MENTIONS]->() RETURN count(r) AS n").await;
            let rows = pg_count(
                &fx,
                "SELECT count(*) FROM {s}.notes WHERE item_id IS NOT NULL",
            )
            .await;
            (about == 0 && mentions >= rows).then_some(())
        },
    )
    .await;
    w.stop().await;
    Box::pin(caught_up(&fx.config)).await;

    // 4. A reload that cannot run changes nothing: a file that does not
    //    parse, then a mapping naming a column the table lacks.
    std::fs::write(&config, "this is not toml [").expect("write");
    run.signal("-HUP");
    tokio::time::sleep(Duration::from_secs(1)).await;
    fx.config_file(
        "run.toml",
        "[batch]\nmax_changes = 200",
        &format!("[[node]]\ntable = \"{{s}}.items\"\nlabel = \"{{p}}Item\"\ninclude = [\"nope\"]\n{MEMOS_MENTION}"),
    );
    run.signal("-HUP");
    tokio::time::sleep(Duration::from_secs(1)).await;
    fx.sql("UPDATE {s}.items SET qty = 424242 WHERE id = 7")
        .await;
    fx.sql("UPDATE {s}.notes SET n = 4242 WHERE id = (SELECT min(id) FROM {s}.notes)")
        .await;
    eventually(
        Duration::from_secs(30),
        "streaming to go on as before",
        || async {
            let memo = count(
                &fx,
                "MATCH (m:{p}Memo)-[r:{p}MENTIONS]->() WHERE m.n = 4242 RETURN count(r) AS n",
            )
            .await;
            (memo == 1).then_some(())
        },
    )
    .await;
    assert!(
        run.proc.try_wait().expect("child").is_none(),
        "a reload that cannot run leaves walgraph running"
    );
    assert_eq!(
        count(
            &fx,
            "MATCH (n:{p}Item) WHERE n.qty IS NOT NULL RETURN count(n) AS n"
        )
        .await,
        0,
        "still the mapping before the bad reloads"
    );

    // 5. The notes taken out of the mapping, by SIGHUP: their nodes and
    //    edges leave; the items stay.
    let w = writes(&fx);
    Box::pin(remap(&mut fx, "run.toml", ITEMS_NO_QTY)).await;
    run.signal("-HUP");
    eventually(Duration::from_secs(60), "the memos gone", || async {
        let left = count(&fx, "MATCH (n:{p}Memo) RETURN count(n) AS n").await
            + count(&fx, "MATCH ()-[r:{p}MENTIONS]->() RETURN count(r) AS n").await;
        (left == 0).then_some(())
    })
    .await;
    w.stop().await;
    let report = Box::pin(caught_up(&fx.config)).await;
    assert_eq!(
        count(&fx, "MATCH (n:{p}Item) RETURN count(n) AS n").await,
        pg_count(&fx, "SELECT count(*) FROM {s}.items").await,
        "{report:?}"
    );
    // 6. ...and mapped again, by SIGHUP: copied while streaming.
    let w = writes(&fx);
    remap(
        &mut fx,
        "run.toml",
        &format!("{ITEMS_NO_QTY}{MEMOS_MENTION}"),
    )
    .await;
    run.signal("-HUP");
    eventually(
        Duration::from_secs(90),
        "the notes copied again",
        || async {
            let memos = count(&fx, "MATCH (n:{p}Memo) RETURN count(n) AS n").await;
            let rows = pg_count(&fx, "SELECT count(*) FROM {s}.notes").await;
            (memos >= rows && rows > 0).then_some(())
        },
    )
    .await;
    w.stop().await;
    Box::pin(caught_up(&fx.config)).await;
    Box::pin(remap(&mut fx, "run.toml", ITEMS_NO_QTY)).await;
    run.signal("-HUP");
    eventually(Duration::from_secs(60), "the memos gone again", || async {
        let left = count(&fx, "MATCH (n:{p}Memo) RETURN count(n) AS n").await;
        (left == 0).then_some(())
    })
    .await;
    // The record goes in the turn after the last deletion.
    let want = vec![serde_json::json!({"t": format!("{}.items", fx.schema)})];
    eventually(
        Duration::from_secs(30),
        "the notes' record forgotten",
        || async {
            let records = fx
                .cypher(&format!(
                    "MATCH (t:WalgraphTable {{slot: '{}'}}) RETURN t.table AS t ORDER BY t",
                    fx.config.postgres.slot
                ))
                .await;
            (records == want).then_some(())
        },
    )
    .await;
    let _ = run.proc.start_kill();
    let _ = run.proc.wait().await;
    fx.cleanup().await;
}
