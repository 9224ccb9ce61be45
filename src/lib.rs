//! walgraph keeps a Neo4j graph exactly in step with a PostgreSQL database.
//!
//! ```text
//! Postgres ──(replication conn, CopyBoth)──▶ source ──▶ decode ──▶ transactions
//!    ▲                                                               │
//!    │ standby status: flush = last LSN Neo4j committed              ▼
//!    └──────────────────────────────────── sink ◀── batch ◀── map to graph ops
//!                                            │
//!                                            └──▶ Neo4j: data + checkpoint, one transaction
//! ```
//!
//! Dependencies point one way — [`cli`] → [`commands`] → [`http`] →
//! [`pipeline`] → the stages (in stream order, each using only those before
//! it) → the foundation — and `tests/layout.rs` checks it.
//!
//! Foundation:
//! - [`lsn`]: WAL positions, the [`lsn::Checkpoint`], the protocol's clock.
//! - [`config`]: the validated configuration, including the mapping's file form.
//! - [`retry`]: backoff and retrying of transient failures.
//! - [`metrics`]: what the running pipeline reports.
//! - [`shutdown`]: the stop signal every long task watches.
//!
//! Stages:
//! - [`source`]: the replication connection, the catalog, SQL quoting.
//! - [`decode`]: `pgoutput` messages and typed values.
//! - [`transactions`]: messages → committed transactions (and spill files).
//! - [`mapping`]: the compiled mapping, row changes → graph operations, inference.
//! - [`batch`]: graph operations → planned, ordered `UNWIND` statements.
//! - [`sink`]: statements + checkpoint → one Neo4j transaction; schema; copy progress.
//!
//! Around them:
//! - [`pipeline`]: pre-flight checks, the stream loop and its writer, replay, chunked copies.
//! - [`http`]: `/health`, `/ready`, `/metrics`.
//! - [`commands`]: one module per `walgraph` command.
//! - [`cli`]: the command line, parsed and dispatched.

pub mod batch;
pub mod cli;
pub mod commands;
pub mod config;
pub mod decode;
pub mod http;
pub mod lsn;
pub mod mapping;
pub mod metrics;
pub mod pipeline;
pub mod recent;
pub mod retry;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod transactions;

/// An error and its causes as one sentence, for the command line.
pub fn error_sentence(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out = format!("{out}: {c}");
        }
    }
    out
}
