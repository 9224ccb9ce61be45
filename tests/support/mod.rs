//! Shared test fixtures: real Postgres and real Neo4j, started by
//! `deploy/local/services up`, found through the `WALGRAPH_*` variables.
//!
//! Each fixture has its own schema, slot, publication and label prefix, so
//! tests run in parallel against one Postgres and one Neo4j.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use neo4rs::{query, Graph};
use tokio::sync::{watch, RwLock};
use tokio_postgres::{Client, NoTls};
use walgraph::config::{Config, Secret};
use walgraph::lsn::Lsn;

/// Tests that restart a database take this for writing; all others for reading.
pub static SERVICES: RwLock<()> = RwLock::const_new(());

/// Connection settings from the environment.
#[derive(Clone, Debug)]
pub struct Env {
    pub pg_url: String,
    pub neo4j_uri: String,
    pub neo4j_user: String,
    pub neo4j_password: String,
}

impl Env {
    /// The `WALGRAPH_*` connection variables, for a walgraph child process.
    pub fn vars(&self) -> [(&'static str, &str); 4] {
        [
            ("WALGRAPH_PG_URL", self.pg_url.as_str()),
            ("WALGRAPH_NEO4J_URI", self.neo4j_uri.as_str()),
            ("WALGRAPH_NEO4J_USER", self.neo4j_user.as_str()),
            ("WALGRAPH_NEO4J_PASSWORD", self.neo4j_password.as_str()),
        ]
    }
}

/// Reads the `WALGRAPH_*` variables; fails the test (never skips) when absent.
pub fn env() -> Env {
    let get = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!(
                "{k} is not set: start the databases with `deploy/local/services up` and load \
                 their settings with `eval \"$(deploy/local/services env)\"` (deploy/local/test does both)"
            )
        })
    };
    Env {
        pg_url: get("WALGRAPH_PG_URL"),
        neo4j_uri: get("WALGRAPH_NEO4J_URI"),
        neo4j_user: get("WALGRAPH_NEO4J_USER"),
        neo4j_password: get("WALGRAPH_NEO4J_PASSWORD"),
    }
}

/// The connection URL `base` with another role (and its password).
pub fn url_as(base: &str, role: &str, password: Option<&str>) -> String {
    let info = walgraph::source::ConnInfo::parse(base).expect("test url");
    let pw = password.map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "postgres://{role}{pw}@{}:{}/{}",
        info.host, info.port, info.dbname
    )
}

/// A regular Postgres client.
pub async fn pg(env: &Env) -> Client {
    let (client, conn) = tokio_postgres::connect(&env.pg_url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("cannot connect to Postgres ({e}); is `deploy/local/services up` running?")
        });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A Neo4j client.
pub async fn graph(env: &Env) -> Graph {
    Graph::new(&env.neo4j_uri, &env.neo4j_user, &env.neo4j_password).unwrap_or_else(|e| {
        panic!("cannot reach Neo4j ({e}); is `deploy/local/services up` running?")
    })
}

/// Waits until `check` returns `Some`, or fails after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A test's own schema, slot, publication and labels.
pub struct Fixture {
    pub env: Env,
    /// Short unique id, lowercase.
    pub id: String,
    /// Postgres schema.
    pub schema: String,
    /// Label and type prefix, like `T1a2b3c`.
    pub prefix: String,
    pub pg: Client,
    pub graph: Graph,
    pub config: Config,
}

/// A walgraph `run` inside the test process.
pub struct Running {
    pub handle: tokio::task::JoinHandle<Result<(), walgraph::pipeline::RunError>>,
    pub stop: watch::Sender<bool>,
}

impl Running {
    /// Asks it to stop and waits; panics if it failed.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        match tokio::time::timeout(Duration::from_secs(30), self.handle).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("walgraph run failed: {e}"),
            Ok(Err(e)) => panic!("walgraph run panicked: {e}"),
            Err(_) => panic!("walgraph run did not stop within 30s of shutdown"),
        }
    }
}

impl Fixture {
    /// Creates the schema with `ddl` and a config with `mapping`; in both,
    /// `{s}` stands for the schema and `{p}` for the label prefix.
    pub async fn new(ddl: &str, mapping: &str) -> Fixture {
        let env = env();
        let id: String = (0..8).map(|_| fastrand::lowercase()).collect();
        let schema = format!("t_{id}");
        let prefix = format!("T{id}");
        let pg = pg(&env).await;
        drop_stale_slots(&pg).await;
        let fill = |s: &str| s.replace("{s}", &schema).replace("{p}", &prefix);
        pg.batch_execute(&format!("CREATE SCHEMA {schema}; {}", fill(ddl)))
            .await
            .unwrap_or_else(|e| panic!("test DDL failed: {e}"));
        let mut config =
            Config::parse(&fill(mapping)).unwrap_or_else(|e| panic!("test mapping: {e}"));
        config.postgres.url = Some(env.pg_url.clone());
        config.postgres.slot = format!("wgt_{}_{id}", std::process::id());
        config.postgres.publication = format!("wgt_{id}");
        config.neo4j.uri = env.neo4j_uri.clone();
        config.neo4j.user = env.neo4j_user.clone();
        config.neo4j.password = Some(Secret::new(env.neo4j_password.clone()));
        config.batch.max_delay = Duration::from_millis(20);
        let graph = graph(&env).await;
        Fixture {
            env,
            id,
            schema,
            prefix,
            pg,
            graph,
            config,
        }
    }

    /// Opens a new Postgres connection (after a server restart).
    pub async fn reconnect(&mut self) {
        self.pg = pg(&self.env).await;
    }

    /// The server's `server_version_num` (150004 for 15.4).
    pub async fn server_version(&self) -> i32 {
        self.pg
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .expect("server_version_num")
            .get(0)
    }

    /// `{p}Name` for this fixture.
    pub fn label(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Runs `walgraph setup` for this fixture.
    pub async fn setup(&self) -> Vec<String> {
        walgraph::commands::setup::setup(&self.config)
            .await
            .unwrap_or_else(|e| panic!("setup failed: {}", walgraph::error_sentence(&e)))
    }

    /// Starts `walgraph run` in the background.
    pub fn start(&self) -> Running {
        let (stop, rx) = watch::channel(false);
        let cfg = self.config.clone();
        let handle = tokio::spawn(async move { walgraph::pipeline::run(&cfg, rx).await });
        Running { handle, stop }
    }

    /// Starts `walgraph run` in the background serving `/ready` and
    /// `/metrics` on the config's `http.listen`, as the `run` command does.
    pub async fn start_serving(&self) -> Running {
        let addr = self.config.http.listen.expect("http.listen set");
        let listener = walgraph::http::bind(addr).await.expect("listen");
        let metrics = std::sync::Arc::new(walgraph::metrics::Metrics::default());
        let (stop, rx) = watch::channel(false);
        tokio::spawn(walgraph::http::serve(
            listener,
            std::sync::Arc::clone(&metrics),
            rx.clone(),
        ));
        let cfg = self.config.clone();
        let handle =
            tokio::spawn(
                async move { walgraph::pipeline::run_with(&cfg, rx, metrics, false).await },
            );
        Running { handle, stop }
    }

    /// Runs SQL.
    pub async fn sql(&self, sql: &str) {
        let sql = sql.replace("{s}", &self.schema);
        self.pg.batch_execute(&sql).await.unwrap_or_else(|e| {
            panic!(
                "SQL failed: {}\n{sql}",
                e.as_db_error()
                    .map_or(e.to_string(), |d| d.message().to_string())
            )
        });
    }

    /// The server's current WAL position.
    pub async fn wal_lsn(&self) -> Lsn {
        let row = self
            .pg
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("pg_current_wal_lsn");
        row.get::<_, String>(0).parse().expect("an LSN")
    }

    /// Where the server inserts WAL (not where it has written it: the WAL
    /// buffers may hold megabytes) and its clock, in microseconds since the
    /// Unix epoch.
    pub async fn wal_insert_position(&self) -> (Lsn, i64) {
        let row = self
            .pg
            .query_one(
                "SELECT pg_current_wal_insert_lsn()::text, \
                        (extract(epoch FROM clock_timestamp()) * 1000000)::int8",
                &[],
            )
            .await
            .expect("the WAL insert position");
        (row.get::<_, String>(0).parse().expect("an LSN"), row.get(1))
    }

    /// Runs `insert` in a transaction and rolls it back once the walsender
    /// of the fixture's slot (peek or run must be reading it) has decoded
    /// it — so streamed it, when it is above logical_decoding_work_mem:
    /// PostgreSQL 18 does not stream a transaction it already knows to be
    /// rolled back. Returns the WAL insert position and clock just before
    /// and just after the ROLLBACK.
    pub async fn roll_back_streamed(&self, insert: &str) -> ((Lsn, i64), (Lsn, i64)) {
        self.sql(&format!("BEGIN; {insert}")).await;
        let inserted = self.wal_insert_position().await.0;
        // A commit elsewhere flushes the WAL for the walsender to read.
        pg(&self.env)
            .await
            .batch_execute("SELECT pg_current_xact_id()")
            .await
            .expect("a commit");
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let sent: Option<String> = self
                .pg
                .query_one(
                    "SELECT (SELECT r.sent_lsn::text FROM pg_stat_replication r \
                       JOIN pg_replication_slots s ON s.active_pid = r.pid \
                      WHERE s.slot_name = $1)",
                    &[&self.config.postgres.slot],
                )
                .await
                .expect("pg_stat_replication")
                .get(0);
            if sent.and_then(|l| l.parse::<Lsn>().ok()) >= Some(inserted) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the slot's walsender did not decode the open transaction within 90 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let before = self.wal_insert_position().await;
        self.sql("ROLLBACK").await;
        (before, self.wal_insert_position().await)
    }

    /// The slot's `confirmed_flush_lsn`.
    pub async fn confirmed_flush(&self) -> Lsn {
        let row = self
            .pg
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn, '0/0')::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.config.postgres.slot],
            )
            .await
            .expect("slot row");
        row.get::<_, String>(0).parse().expect("an LSN")
    }

    /// The checkpoint walgraph keeps in Neo4j.
    pub async fn checkpoint(&self) -> Option<Lsn> {
        let mut rows = self
            .graph
            .execute(
                query("MATCH (c:WalgraphCheckpoint {slot: $slot}) RETURN c.lsn AS lsn")
                    .param("slot", self.config.postgres.slot.as_str()),
            )
            .await
            .expect("checkpoint query");
        let row = rows.next().await.expect("checkpoint row")?;
        row.get::<i64>("lsn").ok().map(Lsn::from_i64)
    }

    /// The checkpoint's record of a transaction applied in part:
    /// `(partial_end, partial_changes)`.
    pub async fn checkpoint_partial(&self) -> Option<(Lsn, i64)> {
        let mut rows = self
            .graph
            .execute(
                query(
                    "MATCH (c:WalgraphCheckpoint {slot: $slot}) \
                     RETURN c.partial_end AS e, c.partial_changes AS n",
                )
                .param("slot", self.config.postgres.slot.as_str()),
            )
            .await
            .expect("checkpoint query");
        let row = rows.next().await.expect("checkpoint row")?;
        let end = row.get::<i64>("e").ok()?;
        let n = row.get::<i64>("n").ok()?;
        Some((Lsn::from_i64(end), n))
    }

    /// Writes a config file for a `walgraph` child process: this fixture's
    /// slot and publication, `extra` TOML, and `mapping` with `{s}`/`{p}`
    /// filled in. Connection settings come from [`Env::vars`].
    pub fn config_file(&self, name: &str, extra: &str, mapping: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("walgraph-test-{}", self.id));
        std::fs::create_dir_all(&dir).expect("config dir");
        let path = dir.join(name);
        let mapping = mapping
            .replace("{s}", &self.schema)
            .replace("{p}", &self.prefix);
        std::fs::write(
            &path,
            format!(
                "[postgres]\nslot = \"{}\"\npublication = \"{}\"\n{extra}\n{mapping}",
                self.config.postgres.slot, self.config.postgres.publication
            ),
        )
        .expect("config file");
        path
    }

    /// Runs `walgraph <args…>` to the end (at most 10 minutes) with this
    /// fixture's connection settings and returns what it printed.
    pub async fn walgraph(&self, args: &[&str]) -> std::process::Output {
        tokio::time::timeout(
            Duration::from_secs(600),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
                .args(args)
                .envs(self.env.vars())
                .env("WALGRAPH_LOG", "warn")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("walgraph finishes within 10 minutes")
        .expect("walgraph runs")
    }

    /// Starts `walgraph <args…>` as a child process with this fixture's
    /// connection settings; it is killed when dropped.
    pub fn spawn(&self, args: &[&str]) -> tokio::process::Child {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
            .args(args)
            .envs(self.env.vars())
            .env("WALGRAPH_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start walgraph")
    }

    /// Runs a read query and returns each row's columns as JSON.
    pub async fn cypher(&self, q: &str) -> Vec<serde_json::Value> {
        let q = q.replace("{p}", &self.prefix);
        let mut rows = self
            .graph
            .execute(query(&q))
            .await
            .unwrap_or_else(|e| panic!("cypher failed: {e}\n{q}"));
        let mut out = Vec::new();
        while let Some(row) = rows
            .next()
            .await
            .unwrap_or_else(|e| panic!("cypher failed: {e}\n{q}"))
        {
            let v: serde_json::Value = row.to().unwrap_or_else(|e| panic!("row to JSON: {e}"));
            out.push(v);
        }
        out
    }

    /// Runs a write query.
    pub async fn cypher_write(&self, q: &str) {
        let q = q.replace("{p}", &self.prefix);
        self.graph
            .run(query(&q))
            .await
            .unwrap_or_else(|e| panic!("cypher failed: {e}\n{q}"));
    }

    /// Reads up to `n` transactions from the fixture's slot with `walgraph
    /// peek` (confirming nothing), as JSON, without logical messages (every
    /// slot gets every test's); gives up after 60 s of silence.
    pub async fn peek(&self, n: usize) -> Vec<serde_json::Value> {
        self.peek_with(n, walgraph::config::SpillSettings::default())
            .await
    }

    /// As [`Fixture::peek`], with spill settings for streamed transactions.
    pub async fn peek_with(
        &self,
        n: usize,
        spill: walgraph::config::SpillSettings,
    ) -> Vec<serde_json::Value> {
        self.peek_inner(n, spill, None, false, false).await
    }

    /// As [`Fixture::peek_with`], with a line for each streamed transaction
    /// that rolled back (`{"rolled_back": {…}}`).
    pub async fn peek_rollbacks(
        &self,
        n: usize,
        spill: walgraph::config::SpillSettings,
    ) -> Vec<serde_json::Value> {
        self.peek_inner(n, spill, None, false, true).await
    }

    /// As [`Fixture::peek`], asking for two-phase transactions at PREPARE.
    /// As [`Fixture::peek`], with two-phase decoding, from the slot `slot`
    /// (never walgraph's own: two-phase decoding stays on for a slot).
    pub async fn peek_two_phase(&self, slot: &str, n: usize) -> Vec<serde_json::Value> {
        self.peek_inner(
            n,
            walgraph::config::SpillSettings::default(),
            Some(slot),
            false,
            false,
        )
        .await
    }

    /// As [`Fixture::peek`], with logical messages — which every slot gets
    /// from every test, so only the test of messages asks for them.
    pub async fn peek_messages(&self, n: usize) -> Vec<serde_json::Value> {
        self.peek_inner(
            n,
            walgraph::config::SpillSettings::default(),
            None,
            true,
            false,
        )
        .await
    }

    async fn peek_inner(
        &self,
        n: usize,
        spill: walgraph::config::SpillSettings,
        two_phase_slot: Option<&str>,
        messages: bool,
        rollbacks: bool,
    ) -> Vec<serde_json::Value> {
        let info = walgraph::source::ConnInfo::parse(&self.env.pg_url).expect("pg url");
        let opts = walgraph::commands::peek::PeekOptions {
            slot: Some(
                two_phase_slot.map_or_else(|| self.config.postgres.slot.clone(), str::to_string),
            ),
            publications: vec![self.config.postgres.publication.clone()],
            proto_version: None,
            streaming: true,
            two_phase: two_phase_slot.is_some(),
            messages,
            rollbacks,
            spill,
            limit: Some(n),
            // Long: a slot decodes every test's WAL before its own changes.
            idle_timeout: Some(Duration::from_secs(60)),
            confirm: false,
        };
        let mut out: Vec<u8> = Vec::new();
        walgraph::commands::peek::peek(&info, &opts, &mut out, std::future::pending())
            .await
            .unwrap_or_else(|e| panic!("peek failed: {}", walgraph::error_sentence(&e)));
        String::from_utf8(out)
            .expect("utf-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// Drops the slot, publication, schema and this fixture's graph data.
    pub async fn cleanup(self) {
        let slot = &self.config.postgres.slot;
        // A prepared transaction left behind would block every new slot.
        if let Ok(rows) = self
            .pg
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE $1",
                &[&format!("{}%", self.id)],
            )
            .await
        {
            for r in rows {
                let gid: String = r.get(0);
                let _ = self
                    .pg
                    .batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
                    .await;
            }
        }
        let _ = self
            .pg
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[slot],
            )
            .await;
        let _ = self
            .pg
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}; DROP SCHEMA IF EXISTS {} CASCADE",
                self.config.postgres.publication, self.schema
            ))
            .await;
        // Label by label and in slices: one transaction deleting a million
        // nodes would exhaust Neo4j's heap.
        let labels: Vec<String> = match self
            .graph
            .execute(
                query("CALL db.labels() YIELD label WHERE label STARTS WITH $p RETURN collect(label) AS l")
                    .param("p", self.prefix.clone()),
            )
            .await
        {
            Ok(mut rows) => match rows.next().await {
                Ok(Some(r)) => r.get("l").unwrap_or_default(),
                _ => Vec::new(),
            },
            Err(_) => Vec::new(),
        };
        for label in labels {
            // Relationships first: a node with a hundred thousand of them
            // would otherwise go in one transaction.
            for q in [
                format!("MATCH (:`{label}`)-[r]-() WITH DISTINCT r LIMIT 20000 DELETE r RETURN count(*) AS n"),
                format!("MATCH (n:`{label}`) WITH n LIMIT 20000 DETACH DELETE n RETURN count(*) AS n"),
            ] {
                slices(&self.graph, &q).await;
            }
        }
        let _ = self
            .graph
            .run(
                query(
                    "MATCH (n) WHERE (n:WalgraphCheckpoint OR n:WalgraphSnapshot OR n:WalgraphTable OR n:WalgraphDeadLetter) AND n.slot = $slot DETACH DELETE n",
                )
                .param("slot", slot.as_str()),
            )
            .await;
    }
}

/// Runs a deleting query returning `n` until it deletes nothing.
async fn slices(graph: &Graph, q: &str) {
    loop {
        let deleted = match graph.execute(query(q)).await {
            Ok(mut rows) => match rows.next().await {
                Ok(Some(r)) => r.get::<i64>("n").unwrap_or(0),
                _ => 0,
            },
            Err(_) => 0,
        };
        if deleted == 0 {
            break;
        }
    }
}

/// Drops inactive test slots left behind by earlier test processes (their
/// names carry the pid), so a failed run does not make Postgres keep WAL.
async fn drop_stale_slots(pg: &Client) {
    let mine = format!("wgt_{}_%", std::process::id());
    let _ = pg
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name LIKE 'wgt\\_%' AND slot_name NOT LIKE $1 AND NOT active",
            &[&mine],
        )
        .await;
}

/// GETs `path` from a walgraph serving HTTP at `addr`: the status code and body.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: walgraph\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Sends SIGTERM to a spawned walgraph and waits (30 s at most) for it to
/// end; its output, and whether it exited 0.
pub async fn sigterm_and_wait(child: tokio::process::Child) -> std::process::Output {
    let pid = child.id().expect("pid");
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -TERM {pid}");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("walgraph must stop within 30 s of SIGTERM")
        .expect("wait");
    assert!(
        out.status.success(),
        "exit after SIGTERM: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A free local port, as `127.0.0.1:port`.
pub fn free_address() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}
