//! Connecting: every password method walgraph speaks, and bad input that
//! must end in one clear sentence and a non-zero exit, changing nothing.

use std::process::Command;

use walgraph::source::{ConnInfo, ReplicationStream};

use crate::support::{env, url_as, Fixture, SERVICES};

fn test_password() -> String {
    let info = ConnInfo::parse(&env().pg_url).expect("test url");
    info.password
        .expect("the test url has a password")
        .expose()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_md5_cleartext_and_trust_logins_all_replicate() {
    let _shared = SERVICES.read().await;
    let pw = test_password();
    for (role, password) in [
        ("walgraph", Some(pw.as_str())),
        ("walgraph_md5", Some(pw.as_str())),
        ("walgraph_plain", Some(pw.as_str())),
        ("walgraph_trust", None),
    ] {
        let info = ConnInfo::parse(&url_as(&env().pg_url, role, password)).expect("url");
        let mut stream = ReplicationStream::connect(&info)
            .await
            .unwrap_or_else(|e| panic!("{role} cannot connect: {e}"));
        let system = stream
            .identify_system()
            .await
            .unwrap_or_else(|e| panic!("{role}: IDENTIFY_SYSTEM failed: {e}"));
        assert!(!system.system_id.is_empty(), "{role}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_reported_as_postgres_said_it() {
    let _shared = SERVICES.read().await;
    for role in ["walgraph", "walgraph_md5", "walgraph_plain"] {
        let info =
            ConnInfo::parse(&url_as(&env().pg_url, role, Some("not-the-password"))).expect("url");
        let err = ReplicationStream::connect(&info)
            .await
            .err()
            .expect("a refused login");
        let text = err.to_string();
        assert!(
            text.contains("password authentication failed"),
            "{role}: {text}"
        );
        assert!(
            !err.is_transient(),
            "a wrong password must not be retried forever"
        );
    }
}

/// Runs deploy/local/services with `args`; returns what it printed.
fn services_script(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/services");
    let out = std::process::Command::new(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run deploy/local/services: {e}"));
    assert!(
        out.status.success(),
        "deploy/local/services {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn walgraph(args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walgraph"));
    cmd.args(args).env_remove("WALGRAPH_CONFIG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run walgraph");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    (out.status.success(), stderr)
}

/// The last line of stderr: the error sentence (log lines may come before).
fn sentence(stderr: &str) -> &str {
    stderr.lines().last().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_one_sentence_and_a_non_zero_exit() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.t (id int PRIMARY KEY, v text); CREATE TABLE {s}.nokey (v text);
         CREATE TABLE {s}.noident (id int PRIMARY KEY); ALTER TABLE {s}.noident REPLICA IDENTITY NOTHING;",
        "[[node]]\ntable = \"{s}.t\"\nlabel = \"{p}T\"\n",
    )
    .await;
    let dir = std::env::temp_dir().join(format!("walgraph-badinput-{}", fx.id));
    std::fs::create_dir_all(&dir).expect("dir");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(
            &p,
            text.replace("{s}", &fx.schema).replace("{p}", &fx.prefix),
        )
        .expect("write");
        p.to_string_lossy().into_owned()
    };
    let slot_section = format!(
        "[postgres]\nslot = \"{}\"\npublication = \"{}\"\n",
        fx.config.postgres.slot, fx.config.postgres.publication
    );
    let good = write(
        "good.toml",
        &format!("{slot_section}[[node]]\ntable = \"{{s}}.t\"\nlabel = \"{{p}}T\"\n"),
    );
    let neo = [
        ("WALGRAPH_NEO4J_URI", fx.env.neo4j_uri.as_str()),
        ("WALGRAPH_NEO4J_USER", fx.env.neo4j_user.as_str()),
        ("WALGRAPH_NEO4J_PASSWORD", fx.env.neo4j_password.as_str()),
    ];
    let with = |extra: &[(&'static str, &str)]| -> Vec<(&str, String)> {
        let mut v: Vec<(&str, String)> = neo.iter().map(|(k, v)| (*k, v.to_string())).collect();
        v.push(("WALGRAPH_PG_URL", fx.env.pg_url.clone()));
        for (k, val) in extra {
            v.retain(|(key, _)| key != k);
            v.push((k, val.to_string()));
        }
        v
    };
    let run = |args: &[&str], envs: Vec<(&str, String)>| {
        let e: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        walgraph(args, &e)
    };

    let typo = write("typo.toml", "[postgres]\nslots = \"x\"\n");
    let missing_column = write(
        "col.toml",
        &format!("{slot_section}[[node]]\ntable = \"{{s}}.t\"\nlabel = \"{{p}}T\"\nexclude = [\"nope\"]\n"),
    );
    let no_key = write(
        "nokey.toml",
        &format!("{slot_section}[[node]]\ntable = \"{{s}}.nokey\"\nlabel = \"{{p}}N\"\n"),
    );
    let no_identity = write(
        "noident.toml",
        &format!("{slot_section}[[node]]\ntable = \"{{s}}.noident\"\nlabel = \"{{p}}N\"\n"),
    );
    // A throwaway cluster with wal_level = replica (a cluster of ours cannot
    // be switched: Postgres refuses to start below logical with logical
    // slots in it).
    let replica_level = services_script(&["replica-level-postgres", "up"]);
    // (what, arguments, environment, what the sentence must say)
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "missing config file",
            vec!["--config", "/nonexistent/walgraph.toml", "setup"],
            with(&[]),
            "cannot read the configuration file",
        ),
        (
            "unknown key",
            vec!["--config", &typo, "setup"],
            with(&[]),
            "unknown field `slots`",
        ),
        (
            "malformed DSN",
            vec!["--config", &good, "setup"],
            with(&[("WALGRAPH_PG_URL", "postgres://[::1")]),
            "connection string is invalid",
        ),
        (
            "wrong Postgres password",
            vec!["--config", &good, "setup"],
            with(&[(
                "WALGRAPH_PG_URL",
                &url_as(&env().pg_url, "walgraph", Some("wrong")),
            )]),
            "password authentication failed",
        ),
        (
            "Postgres not listening",
            vec!["--config", &good, "setup"],
            with(&[(
                "WALGRAPH_PG_URL",
                "postgres://walgraph:x@127.0.0.1:9/walgraph",
            )]),
            "cannot connect to Postgres",
        ),
        (
            "mapping names a missing column",
            vec!["--config", &missing_column, "setup"],
            with(&[]),
            "has no such column",
        ),
        (
            "table without a key",
            vec!["--config", &no_key, "setup"],
            with(&[]),
            "has no primary key",
        ),
        (
            "table with replica identity nothing",
            vec!["--config", &no_identity, "setup"],
            with(&[]),
            "has REPLICA IDENTITY NOTHING",
        ),
        (
            "wrong Neo4j password",
            vec!["--config", &good, "setup"],
            with(&[("WALGRAPH_NEO4J_PASSWORD", "wrong")]),
            "Neo4j refused the login",
        ),
        (
            "Neo4j not listening",
            vec!["--config", &good, "setup"],
            with(&[("WALGRAPH_NEO4J_URI", "bolt://127.0.0.1:9")]),
            "is Neo4j running at bolt://127.0.0.1:9",
        ),
        (
            "wal_level not logical",
            vec!["--config", &good, "setup"],
            with(&[("WALGRAPH_PG_URL", replica_level.trim())]),
            "wal_level = replica, but logical replication needs logical",
        ),
        (
            "run before setup",
            vec!["--config", &good, "run"],
            with(&[]),
            "run `walgraph setup` first",
        ),
    ];
    for (what, args, envs, expect) in cases {
        let (ok, stderr) = run(&args, envs);
        assert!(!ok, "{what}: walgraph succeeded");
        let s = sentence(&stderr);
        assert!(
            s.starts_with("walgraph: ") && s.contains(expect),
            "{what}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
    // Nothing was created along the way: no publication, no slot.
    let pubs = fx
        .pg
        .query(
            "SELECT 1 FROM pg_publication WHERE pubname = $1 UNION ALL SELECT 1 FROM pg_replication_slots WHERE slot_name = $2",
            &[&fx.config.postgres.publication, &fx.config.postgres.slot],
        )
        .await
        .expect("query");
    assert!(
        pubs.is_empty(),
        "a failed setup left a publication or slot behind"
    );
    services_script(&["replica-level-postgres", "down"]);

    // A publication dropped after setup: run refuses and names it.
    let (ok, stderr) = run(&["--config", &good, "setup"], with(&[]));
    assert!(ok, "setup: {stderr}");
    fx.sql(&format!(
        "DROP PUBLICATION {}",
        fx.config.postgres.publication
    ))
    .await;
    let (ok, stderr) = run(&["--config", &good, "run"], with(&[]));
    assert!(!ok, "run without its publication succeeded");
    let s = sentence(&stderr);
    assert!(
        s.contains(&format!(
            "publication {} does not exist; run `walgraph setup` first",
            fx.config.postgres.publication
        )),
        "{stderr}"
    );
    let (ok, stderr) = run(&["--config", &good, "teardown", "--yes"], with(&[]));
    assert!(ok, "teardown: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
    fx.cleanup().await;
}

/// Whether the connection the query runs on uses TLS, asked of the server.
const SSL_IN_USE: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_behave_as_in_libpq_on_both_connections() {
    let _shared = SERVICES.read().await;
    let ca = std::env::var("WALGRAPH_PG_SSLROOTCERT")
        .expect("WALGRAPH_PG_SSLROOTCERT is not set: run `eval \"$(deploy/local/services env)\"`");
    let base = env().pg_url;
    for (query, want_tls) in [
        ("sslmode=disable".to_string(), "f"),
        ("sslmode=prefer".to_string(), "t"),
        ("sslmode=require".to_string(), "t"),
        (format!("sslmode=verify-ca&sslrootcert={ca}"), "t"),
        (format!("sslmode=verify-full&sslrootcert={ca}"), "t"),
    ] {
        for url in [
            format!("{base}?{query}"),
            format!("{}?{query}", base.replace("127.0.0.1", "localhost")),
        ] {
            let info = ConnInfo::parse(&url).expect("url");
            let mut stream = ReplicationStream::connect(&info)
                .await
                .unwrap_or_else(|e| panic!("{query}: replication connection failed: {e}"));
            let rows = stream.command(SSL_IN_USE).await.expect("pg_stat_ssl");
            assert_eq!(
                rows[0][0].as_deref(),
                Some(want_tls),
                "{query} (replication)"
            );
            let pg = walgraph::source::catalog::PgClient::connect(&info)
                .await
                .unwrap_or_else(|e| panic!("{query}: catalog connection failed: {e}"));
            let ssl: bool = pg
                .client()
                .query_one(SSL_IN_USE, &[])
                .await
                .expect("pg_stat_ssl")
                .get(0);
            assert_eq!(ssl, want_tls == "t", "{query} (catalog)");
        }
    }
    // verify-full refuses a server whose certificate the roots do not vouch for.
    let info = ConnInfo::parse(&format!("{base}?sslmode=verify-full")).expect("url");
    let err = ReplicationStream::connect(&info)
        .await
        .err()
        .expect("an untrusted certificate");
    assert!(err.to_string().contains("TLS handshake"), "{err}");
    assert!(walgraph::source::catalog::PgClient::connect(&info)
        .await
        .is_err());
}

/// Makes a role with `sql/walgraph_role.sql` for the fixture's schema;
/// returns its name and password.
async fn least_privilege_role(fx: &Fixture, prefix: &str) -> (String, String) {
    let role = format!("{prefix}_{}", fx.id);
    let password: String = (0..20).map(|_| fastrand::alphanumeric()).collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/walgraph_role.sql");
    let out = Command::new("psql")
        .arg(&fx.env.pg_url)
        .args(["-q", "-X", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-v",
            &format!("role={role}"),
            "-v",
            &format!("password={password}"),
        ])
        .args(["-v", &format!("schema={}", fx.schema), "-f", script])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "sql/walgraph_role.sql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (role, password)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_works_as_the_least_privilege_role_from_sql() {
    let _shared = SERVICES.read().await;
    let mut fx = Fixture::new(
        "CREATE TABLE {s}.items (id int PRIMARY KEY, v text);",
        "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n",
    )
    .await;
    fx.setup().await;
    let (role, password) = least_privilege_role(&fx, "wgt_role").await;
    let row = fx
        .pg
        .query_one(
            "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .expect("role");
    assert_eq!(
        (row.get::<_, bool>(0), row.get::<_, bool>(1)),
        (false, true),
        "not a superuser, may replicate"
    );

    fx.config.postgres.url = Some(url_as(&env().pg_url, &role, Some(&password)));
    let run = fx.start();
    fx.sql("INSERT INTO {s}.items VALUES (1, 'x')").await;
    crate::support::eventually(
        std::time::Duration::from_secs(30),
        "the row, streamed as the least-privilege role",
        || async {
            let rows = fx.cypher("MATCH (n:{p}Item) RETURN n.id AS id").await;
            (rows.len() == 1).then_some(())
        },
    )
    .await;
    run.stop().await;
    let _ = fx
        .pg
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_is_idempotent_status_reports_and_teardown_removes_everything() {
    let _shared = SERVICES.read().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.items (id int PRIMARY KEY);",
        "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n",
    )
    .await;
    let first = fx.setup().await;
    assert!(first[0].starts_with("created publication"), "{first:?}");
    assert!(
        first[1].starts_with("created replication slot"),
        "{first:?}"
    );
    let second = fx.setup().await;
    assert!(
        second[0].contains("already covers every mapped table"),
        "{second:?}"
    );
    assert!(second[1].contains("already exists"), "{second:?}");
    assert_eq!(second[2], "Neo4j constraints and indexes already present");

    // Run once so there is a checkpoint, then look at it through status.
    let run = fx.start();
    fx.sql("INSERT INTO {s}.items VALUES (1)").await;
    crate::support::eventually(
        std::time::Duration::from_secs(30),
        "the checkpoint",
        || async { fx.checkpoint().await },
    )
    .await;
    run.stop().await;
    // WAL the stopped walgraph has not seen: lag in bytes, and in time the
    // age of the last commit applied.
    fx.sql("INSERT INTO {s}.items SELECT g FROM generate_series(2, 2000) g")
        .await;
    let config = std::env::temp_dir().join(format!("walgraph-status-{}.toml", fx.id));
    std::fs::write(
        &config,
        format!(
            "[postgres]\nslot = \"{}\"\npublication = \"{}\"\n[[node]]\ntable = \"{}.items\"\nlabel = \"{}Item\"\n",
            fx.config.postgres.slot, fx.config.postgres.publication, fx.schema, fx.prefix
        ),
    )
    .expect("config");
    let cfg = config.to_string_lossy().into_owned();
    let envs = fx.env.vars();
    let out = Command::new(env!("CARGO_BIN_EXE_walgraph"))
        .args(["--config", &cfg, "status", "--json"])
        .envs(envs)
        .output()
        .expect("status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["slot_exists"], true);
    assert_eq!(status["slot_active"], false);
    assert_eq!(status["labels"][0]["count"], 1);
    assert!(status["checkpoint"].is_string(), "{status}");
    assert!(status["lag_bytes"].as_u64().unwrap_or(0) > 8192, "{status}");
    assert!(
        status["lag_seconds"]
            .as_f64()
            .is_some_and(|t| t > 0.0 && t < 60.0),
        "{status}"
    );

    let (ok, stderr) = walgraph(&["--config", &cfg, "teardown"], &envs);
    assert!(
        !ok && stderr.contains("pass --yes"),
        "teardown without --yes off a terminal must refuse: {stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_walgraph"))
        .args(["--config", &cfg, "teardown", "--yes", "--drop-checkpoint"])
        .envs(envs)
        .output()
        .expect("teardown");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("dropped replication slot") && said.contains("dropped publication"),
        "{said}"
    );
    assert!(said.contains("deleted the checkpoint"), "{said}");
    assert!(fx.checkpoint().await.is_none());
    let left = fx
        .pg
        .query(
            "SELECT 1 FROM pg_publication WHERE pubname = $1 UNION ALL SELECT 1 FROM pg_replication_slots WHERE slot_name = $2",
            &[&fx.config.postgres.publication, &fx.config.postgres.slot],
        )
        .await
        .expect("query");
    assert!(left.is_empty(), "teardown left the slot or the publication");
    let _ = std::fs::remove_file(&config);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_to_emit_messages_run_says_so_once_and_streams_without_heartbeats() {
    // Exclusive: the function's rights are the server's.
    let _exclusive = SERVICES.write().await;
    let fx = Fixture::new(
        "CREATE TABLE {s}.items (id int PRIMARY KEY, v text);",
        "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n",
    )
    .await;
    fx.setup().await;
    let (role, password) = least_privilege_role(&fx, "wgt_nobeat").await;
    let function = "pg_catalog.pg_logical_emit_message(boolean, text, text)";
    fx.sql(&format!(
        "REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC, {role}"
    ))
    .await;
    let result = async {
        let config = fx.config_file(
            "nobeat.toml",
            "heartbeat = \"1s\"\n",
            "[[node]]\ntable = \"{s}.items\"\nlabel = \"{p}Item\"\n",
        );
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walgraph"))
            .args(["--config", &config.to_string_lossy(), "run"])
            .envs(fx.env.vars())
            .env(
                "WALGRAPH_PG_URL",
                url_as(&env().pg_url, &role, Some(&password)),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start walgraph run");
        // Idle for several heartbeat periods, then a row.
        tokio::time::sleep(std::time::Duration::from_secs(4)).await;
        fx.sql("INSERT INTO {s}.items VALUES (1, 'x')").await;
        crate::support::eventually(std::time::Duration::from_secs(30), "the row", || async {
            (fx.cypher("MATCH (n:{p}Item) RETURN n.id AS id").await.len() == 1).then_some(())
        })
        .await;
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let out = crate::support::sigterm_and_wait(child).await;
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let log = Box::pin(result).await;
    fx.sql(&format!("GRANT EXECUTE ON FUNCTION {function} TO PUBLIC"))
        .await;
    let said = log.matches("may not call pg_logical_emit_message").count();
    assert_eq!(said, 1, "said once: {log}");
    assert!(!log.contains("ERROR"), "and went on: {log}");
    let _ = fx
        .pg
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await;
    fx.cleanup().await;
}
