//! Integration tests against a real Postgres and a real Neo4j.
//!
//! Start them with `deploy/local/services up` and load their settings with
//! `eval "$(deploy/local/services env)"`; `deploy/local/test` does both.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod support;

mod backfill;
mod bench;
mod chaos;
mod cli;
mod connect;
mod decoding;
mod deploy;
mod end_to_end;
mod events;
mod exactness;
mod failover;
mod large;
mod layout;
mod oracle;
mod outages;
mod reconcile;
mod remap;
mod replay;
mod shards;
mod snapshot;
mod status_page;
