//! Configuration: one TOML file, with connection settings from the
//! environment winning over the file.
//!
//! Unknown keys are refused with their name and line (serde's
//! `deny_unknown_fields`). Secrets are wrapped in [`Secret`] so they never
//! print.
//!
//! Invariant: a loaded [`Config`] is complete (defaults filled in) and a
//! secret is never printed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A string that never prints.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The source database.
    #[serde(default)]
    pub postgres: PostgresConfig,
    /// The target graph.
    #[serde(default)]
    pub neo4j: Neo4jConfig,
    /// How changes are grouped into Neo4j transactions.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Health, readiness and metrics over HTTP.
    #[serde(default)]
    pub http: HttpConfig,
    /// Tables mapped to nodes.
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeMapping>,
    /// Foreign keys and join tables mapped to relationships.
    #[serde(default, rename = "relationship")]
    pub relationships: Vec<RelationshipMapping>,
    /// Labels another walgraph process maps (a shard of the tables):
    /// relationships here may end at their nodes.
    #[serde(default, rename = "external")]
    pub externals: Vec<ExternalLabel>,
    /// Logical messages (`pg_logical_emit_message`) applied as graph
    /// operations, by prefix.
    #[serde(default)]
    pub messages: Vec<MessagesMapping>,
    /// Outbox tables whose inserted rows are applied as graph operations.
    #[serde(default)]
    pub outbox: Vec<OutboxMapping>,
}

/// `[[external]]`: a label whose nodes another walgraph process maps (its
/// own slot and publication over other tables); relationships of this one
/// may end at them, meeting through placeholder nodes until the other
/// process writes them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalLabel {
    /// The label.
    pub label: String,
    /// Its key properties, as the other process's mapping has them.
    pub key: Vec<String>,
}

/// The prefix of walgraph's heartbeat messages.
pub const HEARTBEAT_PREFIX: &str = "walgraph_heartbeat";

/// `[[messages]]`: transactional logical messages with this prefix are
/// graph operations (JSON, see docs/configuration.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagesMapping {
    /// The prefix given to `pg_logical_emit_message`.
    pub prefix: String,
    /// Labels an operation may merge, delete or connect.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Relationship types an operation may merge or delete.
    #[serde(default)]
    pub types: Vec<String>,
    /// Key properties of labels no `[[node]]` maps (default `["id"]`).
    #[serde(default)]
    pub keys: BTreeMap<String, Vec<String>>,
}

/// `[[outbox]]`: a table whose inserted rows each carry a graph operation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxMapping {
    /// Schema-qualified table name.
    pub table: String,
    /// The column holding the operation (json, jsonb or text).
    pub column: String,
    /// A column naming the aggregate's label (Debezium's `aggregatetype`):
    /// with `aggregate_column`, a payload that is not an operation is the
    /// properties of that node, and a NULL payload deletes it.
    #[serde(default)]
    pub type_column: Option<String>,
    /// A column holding the aggregate's key (Debezium's `aggregateid`).
    #[serde(default)]
    pub aggregate_column: Option<String>,
    /// Labels an operation may merge, delete or connect.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Relationship types an operation may merge or delete.
    #[serde(default)]
    pub types: Vec<String>,
    /// Key properties of labels no `[[node]]` maps (default `["id"]`).
    #[serde(default)]
    pub keys: BTreeMap<String, Vec<String>>,
}

/// `[postgres]`: where the changes come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// A libpq URL or `key=value` string. `WALGRAPH_PG_URL` overrides it;
    /// what neither gives comes from the `PG*` variables.
    #[serde(default)]
    pub url: Option<String>,
    /// The primary, when `url` is a hot standby walgraph streams from
    /// (PostgreSQL 16+): `setup` and `teardown` change the publication
    /// there, and slots made on the standby ask it for the snapshot they
    /// wait for. `WALGRAPH_PG_PRIMARY_URL` overrides it.
    #[serde(default)]
    pub primary_url: Option<String>,
    /// A file holding the Postgres password, used when the URL gives none
    /// (a systemd credential, a mounted Secret). `WALGRAPH_PG_PASSWORD_FILE`
    /// overrides it.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The password read from `password_file`.
    #[serde(skip)]
    pub password: Option<Secret>,
    /// The logical replication slot walgraph reads (and owns).
    #[serde(default = "default_name")]
    pub slot: String,
    /// The publication naming the mapped tables.
    #[serde(default = "default_name")]
    pub publication: String,
    /// The pgoutput protocol version to ask for (1 to 4). Default: the
    /// highest the server speaks (PostgreSQL 14: 2, 15: 3, 16 and later: 4).
    #[serde(default)]
    pub proto_version: Option<u32>,
    /// Ask the server to stream large in-progress transactions (protocol 2
    /// and later) instead of spilling them to its own disk until they commit.
    #[serde(default = "default_true")]
    pub streaming: bool,
    /// MiB of one streamed transaction walgraph keeps in memory before the
    /// rest goes to a spill file.
    #[serde(default = "default_stream_memory_mib")]
    pub stream_memory_mib: usize,
    /// Where spill files go (default: the system's temporary directory).
    #[serde(default)]
    pub spill_dir: Option<PathBuf>,
    /// MiB of WAL to keep behind the checkpoint for `walgraph replay`: the
    /// position confirmed to Postgres stays this far behind what Neo4j has,
    /// so Postgres keeps that much more WAL on disk (default 0: none).
    #[serde(default)]
    pub replay_window_mib: u64,
    /// Make the slot a failover slot (PostgreSQL 17+): standbys with
    /// `sync_replication_slots = on` keep a copy of it, so walgraph goes on
    /// from a promoted standby. `setup` creates it so, or turns it on.
    #[serde(default)]
    pub failover: bool,
    /// Publish stored generated columns (PostgreSQL 18+): `setup` gives
    /// the publication `publish_generated_columns = stored`, so the stream
    /// carries them and they are mapped like other columns (and copied by
    /// the snapshot, backfill and reconcile alike).
    #[serde(default)]
    pub generated_columns: bool,
    /// When nothing has streamed for this long, `run` emits a heartbeat
    /// (a logical message) and times its trip to the graph; `0s` turns
    /// heartbeats off.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}

impl PostgresConfig {
    /// The spill settings for streamed transactions.
    pub fn spill(&self) -> SpillSettings {
        SpillSettings {
            memory_limit: self.stream_memory_mib.saturating_mul(1 << 20),
            dir: self.spill_dir.clone().unwrap_or_else(std::env::temp_dir),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_stream_memory_mib() -> usize {
    64
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: None,
            primary_url: None,
            password_file: None,
            password: None,
            slot: default_name(),
            publication: default_name(),
            proto_version: None,
            streaming: true,
            stream_memory_mib: default_stream_memory_mib(),
            spill_dir: None,
            replay_window_mib: 0,
            failover: false,
            generated_columns: false,
            heartbeat: default_heartbeat(),
        }
    }
}

fn default_name() -> String {
    "walgraph".into()
}

/// `[neo4j]`: where the graph lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Neo4jConfig {
    /// `bolt://host:port` (or `neo4j://`, `bolt+s://`). `WALGRAPH_NEO4J_URI` overrides it.
    #[serde(default = "default_neo4j_uri")]
    pub uri: String,
    /// User name. `WALGRAPH_NEO4J_USER` overrides it.
    #[serde(default = "default_neo4j_user")]
    pub user: String,
    /// A file holding the password. `WALGRAPH_NEO4J_PASSWORD` wins over it;
    /// the password never comes from the command line.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The password, filled from the environment or `password_file`.
    #[serde(skip)]
    pub password: Option<Secret>,
    /// The database to write to (default: the server's default database).
    #[serde(default)]
    pub database: Option<String>,
    /// How long to wait to connect and for each reply before treating the
    /// server as unavailable.
    #[serde(default = "default_neo4j_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// What to do when Neo4j rejects a change for good (a constraint the
    /// data violates): `stop` names the table, key and LSN and exits;
    /// `dead_letter` records it as a `WalgraphDeadLetter` node in the same
    /// transaction and goes on.
    #[serde(default)]
    pub on_error: OnError,
    /// How long one batch may keep failing (Neo4j down, a database error
    /// no single change causes) before walgraph reports itself stuck:
    /// `/ready` answers 503, `walgraph_batch_stuck` is 1 and `status` says
    /// so. It goes on retrying.
    #[serde(default = "default_stuck_after", with = "humantime_serde")]
    pub stuck_after: Duration,
}

/// `neo4j.on_error`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop with the offending table, key and LSN named.
    #[default]
    Stop,
    /// Record the change as a dead letter and go on.
    DeadLetter,
}

impl Default for Neo4jConfig {
    fn default() -> Self {
        Neo4jConfig {
            uri: default_neo4j_uri(),
            user: default_neo4j_user(),
            password_file: None,
            password: None,
            database: None,
            timeout: default_neo4j_timeout(),
            on_error: OnError::Stop,
            stuck_after: default_stuck_after(),
        }
    }
}

fn default_neo4j_uri() -> String {
    "bolt://127.0.0.1:7687".into()
}

fn default_neo4j_user() -> String {
    "neo4j".into()
}

fn default_stuck_after() -> Duration {
    Duration::from_secs(60)
}

fn default_neo4j_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `[http]`: health, readiness and Prometheus metrics for `run`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to serve `/health`, `/ready` and `/metrics` on, like
    /// `127.0.0.1:9187` (default: no HTTP server).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// `[batch]`: how consecutive transactions are grouped into one Neo4j write.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Write once this many changes are waiting.
    #[serde(default = "default_max_changes")]
    pub max_changes: usize,
    /// Write at the latest this long after the first waiting change arrived.
    #[serde(default = "default_max_delay", with = "humantime_serde")]
    pub max_delay: Duration,
    /// While walgraph is behind, batches may grow up to this many changes
    /// where larger ones are measured to write faster (default: twice
    /// `max_changes`); equal to `max_changes`, every batch has that fixed
    /// size.
    #[serde(default)]
    pub max_changes_behind: Option<usize>,
    /// Batches stop growing, and shrink, when Neo4j takes longer than this
    /// to commit one.
    #[serde(default = "default_commit_target", with = "humantime_serde")]
    pub commit_target: Duration,
}

impl BatchConfig {
    /// The most changes a batch may hold while walgraph is behind.
    pub fn ceiling(&self) -> usize {
        self.max_changes_behind
            .unwrap_or_else(|| self.max_changes.saturating_mul(2))
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_changes: default_max_changes(),
            max_delay: default_max_delay(),
            max_changes_behind: None,
            commit_target: default_commit_target(),
        }
    }
}

fn default_commit_target() -> Duration {
    Duration::from_secs(1)
}

fn default_max_changes() -> usize {
    5000
}

fn default_max_delay() -> Duration {
    Duration::from_millis(50)
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("the configuration file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's account, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("the configuration is invalid: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a config file (if given) and applies the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, |k| std::env::var(k).ok())
    }

    /// As [`Config::load`], reading variables through `env`.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse {
                    path: p.to_path_buf(),
                    message,
                })?
            }
            None => Config::default(),
        };
        if let Some(url) = env("WALGRAPH_PG_URL") {
            cfg.postgres.url = Some(url);
        }
        if let Some(url) = env("WALGRAPH_PG_PRIMARY_URL") {
            cfg.postgres.primary_url = Some(url);
        }
        if let Some(uri) = env("WALGRAPH_NEO4J_URI") {
            cfg.neo4j.uri = uri;
        }
        if let Some(user) = env("WALGRAPH_NEO4J_USER") {
            cfg.neo4j.user = user;
        }
        if let Some(file) = env("WALGRAPH_NEO4J_PASSWORD_FILE") {
            cfg.neo4j.password_file = Some(PathBuf::from(file));
        }
        if let Some(file) = env("WALGRAPH_PG_PASSWORD_FILE") {
            cfg.postgres.password_file = Some(PathBuf::from(file));
        }
        let read_secret = |file: &PathBuf| -> Result<Secret, ConfigError> {
            let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
                path: file.clone(),
                source,
            })?;
            Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
        };
        if let Some(pw) = env("WALGRAPH_NEO4J_PASSWORD") {
            cfg.neo4j.password = Some(Secret::new(pw));
        } else if let Some(file) = &cfg.neo4j.password_file {
            cfg.neo4j.password = Some(read_secret(file)?);
        }
        if let Some(file) = &cfg.postgres.password_file {
            cfg.postgres.password = Some(read_secret(file)?);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text; the error names the key and line.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', " "))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.batch.max_changes == 0 {
            return Err(ConfigError::Invalid(
                "batch.max_changes must be at least 1".into(),
            ));
        }
        if let Some(behind) = self.batch.max_changes_behind {
            if behind < self.batch.max_changes {
                return Err(ConfigError::Invalid(format!(
                    "batch.max_changes_behind ({behind}) must be at least batch.max_changes ({}); set them equal for batches of a fixed size",
                    self.batch.max_changes
                )));
            }
        }
        if let Some(v) = self.postgres.proto_version.filter(|v| !(1..=4).contains(v)) {
            return Err(ConfigError::Invalid(format!(
                "postgres.proto_version is {v}, but pgoutput speaks versions 1 to 4"
            )));
        }
        for (what, name) in [
            ("slot", &self.postgres.slot),
            ("publication", &self.postgres.publication),
        ] {
            let ok = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "postgres.{what} `{name}` must be 1 to 63 lowercase letters, digits or underscores"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused_with_name_and_line() {
        let err = Config::parse("[postgres]\nslot = \"s\"\nslots = 3\n").unwrap_err();
        assert!(err.contains("slots"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn passwords_come_from_files_named_by_the_environment() {
        let dir = std::env::temp_dir().join(format!("walgraph-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pg"), "pg secret\n").unwrap();
        std::fs::write(dir.join("neo"), "neo secret\n").unwrap();
        let (pg, neo) = (dir.join("pg"), dir.join("neo"));
        let env = |k: &str| match k {
            "WALGRAPH_PG_PASSWORD_FILE" => Some(pg.to_string_lossy().into_owned()),
            "WALGRAPH_NEO4J_PASSWORD_FILE" => Some(neo.to_string_lossy().into_owned()),
            "WALGRAPH_PG_URL" => Some("postgres://walgraph@127.0.0.1:5432/db".to_string()),
            _ => None,
        };
        let cfg = Config::load_with_env(None, env).unwrap();
        assert_eq!(
            cfg.neo4j.password.as_ref().map(Secret::expose),
            Some("neo secret")
        );
        assert_eq!(
            cfg.postgres.password.as_ref().map(Secret::expose),
            Some("pg secret")
        );
        // A file that cannot be read is one sentence.
        let missing =
            |k: &str| (k == "WALGRAPH_PG_PASSWORD_FILE").then(|| "/nonexistent/pw".to_string());
        let err = Config::load_with_env(None, missing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/pw"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn environment_wins_over_the_file() {
        let dir = std::env::temp_dir().join(format!("walgraph-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "[neo4j]\nuri = \"bolt://file:1\"\n[batch]\nmax_delay = \"250ms\"\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "WALGRAPH_NEO4J_URI" => Some("bolt://env:2".to_string()),
            "WALGRAPH_NEO4J_PASSWORD" => Some("hunter2".to_string()),
            _ => None,
        };
        let cfg = Config::load_with_env(Some(&path), env).unwrap();
        assert_eq!(cfg.neo4j.uri, "bolt://env:2");
        assert_eq!(cfg.batch.max_delay, Duration::from_millis(250));
        assert!(!format!("{cfg:?}").contains("hunter2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_get_a_sentence() {
        let cfg = Config::parse("[postgres]\nslot = \"Bad-Slot\"\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("postgres.slot"), "{err}");
    }
}

/// `[[node]]`: a table whose rows are nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeMapping {
    /// Schema-qualified table name, like `public.users`.
    pub table: String,
    /// The node label.
    pub label: String,
    /// Key columns (default: the primary key). They must be unique.
    #[serde(default)]
    pub key: Option<Vec<String>>,
    /// Only these columns become properties (default: all).
    #[serde(default)]
    pub include: Option<Vec<String>>,
    /// These columns do not become properties.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Property names for columns, where they differ.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Keep every version of each node as a `(:LabelVersion)` with
    /// `validFrom`/`validTo`, linked from the node by `VERSION`.
    #[serde(default)]
    pub history: bool,
}

/// One end of a relationship.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointMapping {
    /// The label of the node at this end (a mapped node label).
    pub label: String,
    /// The columns of this table holding that node's key, in key order.
    pub columns: Vec<String>,
}

/// `[[relationship]]`: a foreign key on a node table, or a join table whose
/// rows are edges.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelationshipMapping {
    /// Schema-qualified table name.
    pub table: String,
    /// The relationship type.
    #[serde(rename = "type")]
    pub rel_type: String,
    /// The start node.
    pub from: EndpointMapping,
    /// The end node.
    pub to: EndpointMapping,
    /// Columns copied onto the relationship (join tables).
    #[serde(default)]
    pub properties: Vec<String>,
}

/// Where streamed transactions wait for their commit.
#[derive(Debug, Clone)]
pub struct SpillSettings {
    /// Bytes of raw messages one streamed transaction keeps in memory before
    /// the rest goes to a file.
    pub memory_limit: usize,
    /// The directory for spill files.
    pub dir: PathBuf,
}

impl Default for SpillSettings {
    fn default() -> Self {
        SpillSettings {
            memory_limit: 64 << 20,
            dir: std::env::temp_dir(),
        }
    }
}
