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
//! - [`source`]: the replication connection (startup, auth, `START_REPLICATION`,
//!   keepalives, status updates).
//! - [`decode`]: `pgoutput` messages and typed values.
//! - [`transactions`]: messages → committed transactions.
//! - [`map`]: row changes → graph operations, per the [`mapping`].
//! - [`batch`]: graph operations → ordered `UNWIND` statements.
//! - [`sink`]: statements + [`checkpoint`] → one Neo4j transaction.
//! - [`pipeline`]: the loop that joins them, and confirms only what committed.

pub mod batch;
pub mod bench;
pub mod catalog;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod cypher;
pub mod decode;
pub mod http;
pub mod infer;
pub mod lsn;
pub mod map;
pub mod mapping;
pub mod peek;
pub mod pipeline;
pub mod progress;
pub mod reconcile;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod status;
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
