//! Sink: batches → Neo4j, one transaction each, together with the checkpoint.
//!
//! Invariants:
//! - a batch's data statements and its checkpoint update commit in one
//!   Neo4j transaction, or not at all;
//! - [`Sink::apply`] returns `Ok` only after Neo4j confirmed the commit, and
//!   only then may the caller report the batch's end LSN to Postgres;
//! - transient failures (Neo4j down, connection lost, timeouts, transient
//!   server errors) are reported as such so the caller retries the whole
//!   batch; nothing is confirmed that is not committed.

use std::time::Duration;

use neo4rs::{query, BoltType, ConfigBuilder, Graph, Neo4jClientErrorKind, Neo4jErrorKind, Query};

use crate::batch::Batch;
use crate::config::Neo4jConfig;
use crate::lsn::Lsn;
use crate::mapping::Mapping;
use crate::retry::{retry_transient, Transient};

pub mod checkpoint;
mod schema;
pub mod snapshot_state;

/// Why a write to Neo4j failed, split by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Neo4j is unreachable, restarting or busy; retrying the same batch may succeed.
    #[error("Neo4j is unavailable: {0}")]
    Transient(String),
    /// Neo4j refused the credentials.
    #[error("Neo4j refused the login for user {user}: {message}; check WALGRAPH_NEO4J_USER and WALGRAPH_NEO4J_PASSWORD")]
    Auth {
        /// The user.
        user: String,
        /// Neo4j's message.
        message: String,
    },
    /// Neo4j rejected a statement; retrying will not help.
    #[error("Neo4j rejected the write: {0}")]
    Rejected(String),
    /// One change Neo4j (or the driver) refuses for good, located in its
    /// batch, with `neo4j.on_error = "stop"`.
    #[error("Neo4j rejected the write: the change to {table} key {key}{at} ({error}); fix the data or the graph, or set neo4j.on_error = \"dead_letter\" to record such changes and go on", at = lsn.map_or_else(String::new, |l| format!(" committed at {l}")))]
    ChangeRejected {
        /// The source table.
        table: String,
        /// The row's key, shortened to 200 characters (a key can be huge,
        /// which may be why it failed).
        key: String,
        /// The commit LSN of its transaction, where known.
        lsn: Option<Lsn>,
        /// What Neo4j or the driver said.
        error: String,
    },
    /// Neo4j failed the write on its side (a `Neo.DatabaseError`, which
    /// drivers do not retry): for good when one change causes it (a key
    /// too large for its index), else perhaps not (a database stopping).
    #[error("Neo4j failed the write: {0}")]
    Database(String),
    /// The driver cannot encode a change's values for Neo4j (a string,
    /// list or map past what Bolt can carry, a number out of range): the
    /// same on every retry, so it is treated like a rejected change.
    #[error("the write cannot be sent to Neo4j: {0}")]
    Unencodable(String),
    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),
}

impl Transient for SinkError {
    fn is_transient(&self) -> bool {
        SinkError::is_transient(self)
    }
}

impl SinkError {
    /// Whether retrying the same batch may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Transient(_))
    }

    fn from_neo4rs(e: neo4rs::Error, user: &str) -> SinkError {
        use neo4rs::Error as E;
        match e {
            E::Neo4j(n) => match n.kind() {
                Neo4jErrorKind::Transient
                | Neo4jErrorKind::Client(Neo4jClientErrorKind::SessionExpired) => {
                    SinkError::Transient(format!("{}: {}", n.code(), n.message()))
                }
                Neo4jErrorKind::Database => {
                    SinkError::Database(format!("{}: {}", n.code(), n.message()))
                }
                Neo4jErrorKind::Client(Neo4jClientErrorKind::Security(_)) => SinkError::Auth {
                    user: user.to_string(),
                    message: n.message().to_string(),
                },
                _ => SinkError::Rejected(format!("{}: {}", n.code(), n.message())),
            },
            E::AuthenticationError(m) => SinkError::Auth {
                user: user.to_string(),
                message: m,
            },
            E::UrlParseError(_)
            | E::UnsupportedScheme(_)
            | E::InvalidDnsName(_)
            | E::InvalidConfig => SinkError::Config(format!("the Neo4j URI is invalid: {e}")),
            E::UnsupportedVersion(..) | E::ProtocolMismatch(_) => SinkError::Config(format!(
                "the server at the Neo4j URI does not speak a Bolt version walgraph supports: {e}"
            )),
            // What the driver cannot encode is the data's doing: the same
            // on every retry.
            E::StringTooLong
            | E::MapTooBig
            | E::BytesTooBig
            | E::ListTooLong
            | E::IntegerOverflow(..)
            | E::InvalidInteger(..)
            | E::ConversionError => SinkError::Unencodable(e.to_string()),
            // The connection broke, timed out, or the exchange on it went
            // wrong (a reply the driver did not expect or could not read):
            // a new connection may well succeed, and a batch that keeps
            // failing so is reported stuck (`neo4j.stuck_after`).
            E::IOError { .. }
            | E::ConnectionError
            | E::ConnectionTimedOut
            | E::IncompleteBoltExchange
            | E::RequestIgnoredError
            | E::Ignored(_)
            | E::ServerUnavailableError(_)
            | E::RoutingTableError(_)
            | E::RoutingTableRefreshFailed(_)
            | E::UnexpectedMessage(_)
            | E::UnknownMessage(_)
            | E::UnknownType(_)
            | E::InvalidTypeMarker(_)
            | E::DeserializationError(_)
            | E::NoMoreRows
            | E::NotSingleResult => SinkError::Transient(e.to_string()),
            // An error a later driver version adds: retried, and reported
            // stuck if it persists.
            _ => SinkError::Transient(e.to_string()),
        }
    }
}

pub use crate::batch::DeadLetter;

/// A connection pool to Neo4j for one slot's checkpoint.
#[derive(Clone)]
pub struct Sink {
    graph: Graph,
    /// Neo4j's addresses, to find the driver's sockets.
    peers: Vec<std::net::SocketAddr>,
    slot: String,
    user: String,
    timeout: Duration,
}

impl Sink {
    /// Connects and checks the connection with a trivial query.
    pub async fn connect(cfg: &Neo4jConfig, slot: &str) -> Result<Sink, SinkError> {
        let password = cfg.password.as_ref().ok_or_else(|| {
            SinkError::Config(
                "no Neo4j password given: set WALGRAPH_NEO4J_PASSWORD or neo4j.password_file"
                    .into(),
            )
        })?;
        let mut builder = ConfigBuilder::default()
            .uri(cfg.uri.clone())
            .user(cfg.user.clone())
            .password(password.expose())
            .max_connections(4)
            .fetch_size(1000)
            .connection_timeout(cfg.timeout)
            .tcp_keepalive(Some(Duration::from_secs(15)));
        if let Some(db) = &cfg.database {
            builder = builder.db(db.as_str());
        }
        let config = builder
            .build()
            .map_err(|e| SinkError::Config(format!("the Neo4j settings are invalid: {e}")))?;
        let graph = Graph::connect(config).map_err(|e| SinkError::from_neo4rs(e, &cfg.user))?;
        let peers = neo4j_addresses(&cfg.uri).await;
        let sink = Sink {
            graph,
            peers,
            slot: slot.to_string(),
            user: cfg.user.clone(),
            timeout: cfg.timeout,
        };
        sink.ping().await.map_err(|e| match e {
            SinkError::Transient(m) => SinkError::Transient(format!(
                "{m}; is Neo4j running at {}, and is neo4j.uri right?",
                cfg.uri
            )),
            other => other,
        })?;
        Ok(sink)
    }

    /// Turns Nagle's algorithm off on this process's connections to Neo4j.
    ///
    /// neo4rs leaves it on and offers no way to change that: a Bolt message
    /// larger than its 8 KiB write buffer then leaves in several writes, and
    /// the tail waits for the server's delayed ACK (40 ms on Linux) — a
    /// measured 100 ms on every batch of a few hundred changes (see
    /// docs/neo4j-driver.md). The driver's sockets are found among the
    /// process's open descriptors by their peer address. Cheap (one
    /// `getpeername` per open descriptor); run before each write so pooled
    /// connections opened since are covered too.
    fn disable_nagle(&self) {
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
            return;
        };
        for entry in dir.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
            if !is_socket {
                continue;
            }
            // SAFETY: the descriptor is only borrowed for two socket option
            // calls. Should another thread close it meanwhile, the calls fail
            // with EBADF, or (if the number was reused) act on another socket
            // of this process: reading its peer and, only for a Neo4j peer,
            // disabling Nagle — harmless either way. No memory is involved.
            #[allow(unsafe_code)]
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let sock = socket2::SockRef::from(&borrowed);
            let Some(peer) = sock.peer_addr().ok().and_then(|a| a.as_socket()) else {
                continue;
            };
            if self.peers.contains(&peer) && !sock.tcp_nodelay().unwrap_or(true) {
                let _ = sock.set_tcp_nodelay(true);
            }
        }
    }

    /// The underlying driver handle, for tools and tests.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub(super) fn err(&self, e: neo4rs::Error) -> SinkError {
        SinkError::from_neo4rs(e, &self.user)
    }

    pub(super) async fn timed<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, SinkError>>,
    ) -> Result<T, SinkError> {
        // Each round trip is bounded by the driver's timeout; this bounds the
        // whole operation so a stuck server cannot hang walgraph.
        let limit = self.timeout * 4;
        match tokio::time::timeout(limit, f).await {
            Err(_) => Err(SinkError::Transient(format!(
                "{what} did not finish within {limit:?}"
            ))),
            // Name the step: "connection timed out" alone does not say
            // whether connecting, a schema statement or a write was slow.
            Ok(Err(SinkError::Transient(m))) => Err(SinkError::Transient(format!("{m} ({what})"))),
            Ok(other) => other,
        }
    }

    /// Runs `RETURN 1`.
    pub async fn ping(&self) -> Result<(), SinkError> {
        self.timed("connecting to Neo4j", async {
            let mut rows = self
                .graph
                .execute(query("RETURN 1 AS one"))
                .await
                .map_err(|e| self.err(e))?;
            rows.next().await.map_err(|e| self.err(e))?;
            Ok(())
        })
        .await
    }

    /// Applies a batch and moves the checkpoint to its end LSN, in one
    /// transaction. Returns only after the commit.
    pub async fn apply(&self, batch: &Batch, dead: &[DeadLetter]) -> Result<(), SinkError> {
        let dead_letters = dead.iter().map(|d| {
            query(
                "CREATE (:WalgraphDeadLetter {slot: $slot, table: $table, key: $key, lsn: $lsn, \
                 lsn_text: $lsn_text, operation: $operation, error: $error, at: datetime()})",
            )
            .param("slot", self.slot.as_str())
            .param("table", d.table.as_str())
            .param("key", d.key.as_str())
            .param("lsn", d.lsn.map(Lsn::to_i64))
            .param("lsn_text", d.lsn.map(|l| l.to_string()))
            .param("operation", d.operation.as_str())
            .param("error", d.error.as_str())
        });
        let checkpoint = checkpoint::write_query(
            &self.slot,
            batch.checkpoint(),
            batch.commits.last().map(|c| c.0),
        );
        self.commit_all(
            dead_letters
                .chain(statements(batch))
                .chain(std::iter::once(checkpoint)),
        )
        .await
    }

    /// Runs `queries` in one transaction and commits it; rolls back at the
    /// first failure.
    async fn commit_all(&self, queries: impl Iterator<Item = Query>) -> Result<(), SinkError> {
        self.disable_nagle();
        self.timed("writing a batch", async {
            let started = std::time::Instant::now();
            let mut txn = self.graph.start_txn().await.map_err(|e| self.err(e))?;
            let mut steps = Vec::new();
            for q in queries {
                let at = std::time::Instant::now();
                if let Err(e) = txn.run(q).await {
                    let e = self.err(e);
                    let _ = txn.rollback().await;
                    return Err(e);
                }
                if tracing::enabled!(tracing::Level::TRACE) {
                    steps.push(at.elapsed().as_millis() as u64);
                }
            }
            let at = std::time::Instant::now();
            txn.commit().await.map_err(|e| self.err(e))?;
            tracing::trace!(
                total_ms = started.elapsed().as_millis() as u64,
                commit_ms = at.elapsed().as_millis() as u64,
                statements_ms = ?steps,
                "transaction committed"
            );
            Ok(())
        })
        .await
    }

    /// Applies a batch's statements and then `extra`, in one transaction,
    /// without touching the checkpoint (the snapshot's chunks, reconcile's
    /// repairs). Transient failures are retried with backoff, a few times:
    /// the statements are idempotent and `extra` commits with them.
    pub async fn apply_with(&self, batch: &Batch, extra: Query) -> Result<(), SinkError> {
        retry_transient("neo4j write failed, retrying", || {
            self.apply_with_once(batch, extra.clone())
        })
        .await
    }

    async fn apply_with_once(&self, batch: &Batch, extra: Query) -> Result<(), SinkError> {
        self.commit_all(statements(batch).chain(std::iter::once(extra)))
            .await
    }

    /// Finds the operation of a batch that Neo4j rejects: runs the plan one
    /// operation at a time in a transaction that is rolled back. Returns the
    /// group and index of the first rejected operation and the error.
    pub async fn locate(
        &self,
        batch: &Batch,
        mapping: &Mapping,
    ) -> Result<Option<(usize, usize, String)>, SinkError> {
        self.timed("looking for the rejected change", async {
            let mut txn = self.graph.start_txn().await.map_err(|e| self.err(e))?;
            for (gi, group) in batch.plan.iter().enumerate() {
                for (oi, op) in group.iter().enumerate() {
                    for st in crate::batch::render::render_plan_at(
                        &[vec![op.clone()]],
                        mapping,
                        &batch.times,
                    ) {
                        let q = query(&st.cypher).param("rows", BoltType::List(st.rows));
                        if let Err(e) = txn.run(q).await {
                            let e = self.err(e);
                            let _ = txn.rollback().await;
                            return match e {
                                SinkError::Rejected(msg)
                                | SinkError::Database(msg)
                                | SinkError::Unencodable(msg) => Ok(Some((gi, oi, msg))),
                                other => Err(other),
                            };
                        }
                    }
                }
            }
            let _ = txn.rollback().await;
            Ok(None)
        })
        .await
    }

    /// Runs one step of work over many graph items: `cypher` takes
    /// `$limit` and returns the number of items it changed as `c` (fewer
    /// than the limit once nothing is left).
    pub async fn count_step(
        &self,
        what: &str,
        cypher: &str,
        limit: usize,
    ) -> Result<u64, SinkError> {
        let rows = self
            .fetch(
                what,
                query(cypher).param("limit", i64::try_from(limit).unwrap_or(i64::MAX)),
            )
            .await?;
        Ok(rows
            .first()
            .and_then(|r| r.get::<i64>("c").ok())
            .and_then(|c| u64::try_from(c).ok())
            .unwrap_or(0))
    }

    /// Has Neo4j plan `statements` before they are first needed, each
    /// with `$rows` of each order of magnitude up to its most rows (Neo4j
    /// keeps a plan per text and per order of magnitude of a list
    /// parameter's length): run in a transaction that is rolled back, with
    /// rows whose keys no table has, or only `EXPLAIN`ed. Without it the
    /// first batches after a start (or after Neo4j restarted) pay for
    /// planning: measured 50–190 ms per statement, 0.4–0.7 s for the first
    /// batches of a fresh run (docs/benchmarks.md). Stops after `budget`
    /// (the rest is planned on first use, as before) or at the first
    /// failure, which it returns; returns how many were planned.
    pub async fn plan_ahead(
        &self,
        statements: &[crate::batch::render::PlanAhead],
        budget: Duration,
    ) -> Result<usize, SinkError> {
        let started = std::time::Instant::now();
        let mut work: Vec<(&crate::batch::render::PlanAhead, usize)> = Vec::new();
        for st in statements {
            for size in row_counts(st.rows) {
                work.push((st, size));
            }
        }
        // The sizes a steady stream's statements have first (tens to
        // hundreds of rows), then the rest.
        work.sort_by_key(|(_, size)| match *size {
            101..=1000 => 0,
            11..=100 => 1,
            2..=10 => 2,
            1 => 3,
            _ => 4,
        });
        let mut planned = 0;
        for (st, size) in work {
            if started.elapsed() >= budget {
                break;
            }
            if st.run {
                let rows = BoltType::List(neo4rs::BoltList::from(
                    (0..size)
                        .map(|i| plan_ahead_row(i, st.key_width))
                        .collect::<Vec<_>>(),
                ));
                self.timed("planning a statement", async {
                    let mut txn = self.graph.start_txn().await.map_err(|e| self.err(e))?;
                    let ran = txn.run(query(&st.text).param("rows", rows)).await;
                    let _ = txn.rollback().await;
                    ran.map_err(|e| self.err(e))
                })
                .await?;
            } else {
                let rows = BoltType::List(neo4rs::BoltList::from(vec![BoltType::from(0i64); size]));
                self.fetch(
                    "planning a statement",
                    query(&format!("EXPLAIN {}", st.text)).param("rows", rows),
                )
                .await?;
            }
            planned += 1;
        }
        Ok(planned)
    }

    /// Runs one statement in a transaction of its own.
    pub async fn run_statement(&self, st: &crate::batch::Statement) -> Result<(), SinkError> {
        self.commit_all(std::iter::once(
            query(&st.cypher).param("rows", BoltType::List(st.rows.clone())),
        ))
        .await
    }

    /// Runs a read query and collects its rows (small results only).
    pub(super) async fn fetch(&self, what: &str, q: Query) -> Result<Vec<neo4rs::Row>, SinkError> {
        self.timed(what, async {
            let mut rows = self.graph.execute(q).await.map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().await.map_err(|e| self.err(e))? {
                out.push(row);
            }
            Ok(out)
        })
        .await
    }
}

/// A row every statement accepts, for a run that is rolled back: each
/// key (`k`, `s`, `o`, `t`, `f`) a list of text values no table's key has,
/// no properties, the lowest LSN.
fn plan_ahead_row(i: usize, width: usize) -> BoltType {
    let key = BoltType::List(neo4rs::BoltList::from(vec![
        BoltType::from(format!(
            "\u{1}walgraph plan ahead {i}"
        ));
        width
    ]));
    let lsn = BoltType::from(i64::MIN);
    crate::batch::cypher::row(vec![
        ("k", key.clone()),
        ("s", key.clone()),
        ("o", key.clone()),
        ("t", key.clone()),
        ("f", key),
        ("p", BoltType::Map(neo4rs::BoltMap::new())),
        ("lsn", lsn.clone()),
        ("sl", lsn),
        ("w", BoltType::from(false)),
    ])
}

/// One row count per order of magnitude up to `most` (1, 10, 100, …,
/// then `most` itself): a list of each length falls in its own bucket of
/// Neo4j's plan cache.
fn row_counts(most: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut n = 1usize;
    while n < most {
        out.push(n);
        n = n.saturating_mul(10);
    }
    out.push(most.max(1));
    out
}

/// A batch's statements with their rows.
fn statements(batch: &Batch) -> impl Iterator<Item = Query> + '_ {
    batch
        .statements
        .iter()
        .chain(&batch.after)
        .map(|st| query(&st.cypher).param("rows", BoltType::List(st.rows.clone())))
}

/// The socket addresses a Neo4j URI like `bolt://host:7687` resolves to.
async fn neo4j_addresses(uri: &str) -> Vec<std::net::SocketAddr> {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let host_port = rest.split(['/', '?']).next().unwrap_or("");
    let with_port = if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host_port.to_string()
    } else {
        format!("{host_port}:7687")
    };
    match tokio::net::lookup_host(with_port).await {
        Ok(addrs) => addrs.collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::{row_counts, SinkError};

    #[test]
    fn statements_are_planned_once_per_order_of_magnitude_of_their_rows() {
        assert_eq!(row_counts(1), [1]);
        assert_eq!(row_counts(0), [1]);
        assert_eq!(row_counts(10), [1, 10]);
        assert_eq!(row_counts(11), [1, 10, 11]);
        assert_eq!(row_counts(5000), [1, 10, 100, 1000, 5000]);
    }

    #[test]
    fn driver_errors_are_split_by_whether_a_retry_can_succeed() {
        use neo4rs::Error as E;
        let class = |e: E| match SinkError::from_neo4rs(e, "neo4j") {
            SinkError::Transient(_) => "retry",
            SinkError::Unencodable(_) => "per change",
            other => panic!("unexpected {other:?}"),
        };
        for e in [
            E::StringTooLong,
            E::MapTooBig,
            E::BytesTooBig,
            E::ListTooLong,
            E::ConversionError,
            E::InvalidInteger("fetch_size", -5),
        ] {
            assert_eq!(class(e), "per change");
        }
        for e in [
            E::ConnectionError,
            E::ConnectionTimedOut,
            E::IOError {
                detail: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
            },
            E::RequestIgnoredError,
            E::UnexpectedMessage("SUCCESS".into()),
        ] {
            assert_eq!(class(e), "retry");
        }
    }
}
