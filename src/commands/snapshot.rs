//! Snapshot: loads the rows that existed before streaming began, so that the
//! graph plus the stream equals the database.
//!
//! Invariants:
//! - tables are copied in key order, in chunks, each chunk read under a
//!   snapshot of its own *exported by a replication slot* (a temporary one,
//!   created for that chunk), so chunk `i` holds exactly the transactions
//!   that committed before that slot's consistent point `Ti`; every node and
//!   relationship it writes carries `_lsn = Ti`, and when the stream runs
//!   from the slot's start the `_lsn` guard skips exactly the streamed
//!   changes a chunk already holds (commit LSN below its `Ti`) while applying
//!   every later one. No transaction stays open longer than one chunk's read;
//! - the next chunk is read (and mapped) while one is written, and chunks
//!   are written in the order they were read;
//! - each chunk is written in one Neo4j transaction together with the
//!   progress record `(:WalgraphSnapshot {slot})` (table, last key, rows), so
//!   an interrupted snapshot resumes after the last chunk Neo4j committed;
//! - it refuses to run while `walgraph run` streams from the slot (a change
//!   applied before its row is copied could be undone by the copy), and `run`
//!   refuses to start while a snapshot is unfinished.
//!
//! Exported snapshots: <https://www.postgresql.org/docs/current/protocol-replication.html#PROTOCOL-REPLICATION-CREATE-REPLICATION-SLOT>
//! and `SET TRANSACTION SNAPSHOT`.

use std::sync::Arc;

use anyhow::{anyhow, bail};

use super::progress::Progress;
use crate::batch::Batcher;
use crate::config::Config;
use crate::lsn::Lsn;
use crate::mapping::map::Mapper;
use crate::pipeline;
use crate::pipeline::copy::{begin_exported_snapshot, describe_table, read_chunk, table_order};
use crate::sink::snapshot_state::{progress_query, read_state, SnapshotState};
use crate::source::catalog::PgClient;
use crate::source::sql::quote_qualified;

/// How to take the snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Rows per chunk (one Neo4j transaction each).
    pub chunk_rows: usize,
    /// Start over even if a snapshot finished or is half done.
    pub restart: bool,
    /// Show a progress bar (else log lines).
    pub progress_bar: bool,
}

/// What a snapshot did.
#[derive(Debug, Clone, Default)]
pub struct SnapshotReport {
    /// Rows copied by this invocation.
    pub rows: u64,
    /// Whether it continued an interrupted snapshot.
    pub resumed: bool,
    /// The consistent point of the snapshot its last chunk was read under.
    pub consistent_lsn: Lsn,
    /// Nothing was left to do.
    pub already_done: bool,
}

/// Copies every mapped table into the graph, each chunk under an exported
/// snapshot of its own.
pub async fn snapshot(cfg: &Config, opts: &SnapshotOptions) -> anyhow::Result<SnapshotReport> {
    if opts.chunk_rows == 0 {
        bail!("--chunk-rows must be at least 1");
    }
    let prepared = pipeline::prepare_for_snapshot(cfg).await?;
    let sink = prepared
        .sink
        .as_ref()
        .ok_or_else(|| anyhow!("no Neo4j connection"))?;
    let slot = cfg.postgres.slot.as_str();
    let pg = PgClient::connect(&prepared.info).await?;
    if let Some(s) = pg.slot(slot).await? {
        if s.active {
            bail!(
                "replication slot {slot} is in use (is `walgraph run` running?); stop it before taking a snapshot"
            );
        }
    }
    let mut state = match read_state(sink, slot).await? {
        Some(s) if opts.restart => {
            tracing::info!(rows = s.rows, "starting the snapshot over");
            SnapshotState::default()
        }
        Some(s) if s.done => {
            return Ok(SnapshotReport {
                already_done: true,
                rows: s.rows,
                ..SnapshotReport::default()
            })
        }
        Some(s) => s,
        None => SnapshotState::default(),
    };
    let resumed = state.rows > 0 || !state.tables_done.is_empty();

    let temp_slot = format!(
        "walgraph_snapshot_{}_{}",
        std::process::id(),
        fastrand::u32(..)
    );
    let reader = PgClient::connect(&prepared.info).await?;
    let c = reader.client();

    let tables = table_order(&prepared.mapping);
    let catalog = reader.catalog(&tables, &prepared.publication).await?;
    let mut described = Vec::new();
    let mut total = state.rows;
    for name in &tables {
        if state.tables_done.contains(name) {
            continue;
        }
        let (pk, leave_out) = catalog
            .get(name)
            .map(|t| (t.primary_key.clone(), t.generated.clone()))
            .unwrap_or_default();
        let t = describe_table(c, name, &pk, &leave_out).await?;
        let count = c
            .query_one(
                &format!("SELECT count(*) FROM {}", quote_qualified(name)),
                &[],
            )
            .await?
            .try_get::<_, i64>(0)?;
        total += u64::try_from(count).unwrap_or(0);
        described.push(t);
    }
    // Rows of the table being resumed that are already copied are counted
    // twice above; the bar's total is an estimate anyway.
    let mut progress = Progress::new("snapshot", total, state.rows, opts.progress_bar);
    let started_rows = state.rows;
    let mapper = Mapper::new(Arc::clone(&prepared.mapping));
    let mut copied = 0u64;
    let mut consistent = Lsn::ZERO;

    for t in &described {
        progress.table(&t.name);
        let after: Option<Vec<String>> = match &state.table {
            Some(name) if *name == t.name => state.last_key.clone(),
            _ => None,
        };
        // The next chunk is read (and mapped) while this one is written:
        // reads stay in key order, each under its own snapshot, and chunks
        // are written in the order read, so the invariants above hold.
        let (chunks, mut ready) = tokio::sync::mpsc::channel::<Chunk>(1);
        let read = async {
            // The reader owns the sender: when it stops, the writer's
            // queue ends.
            let chunks = chunks;
            let mut after = after;
            loop {
                // Each chunk under a snapshot of its own: no transaction
                // stays open for the whole copy (which would hold back
                // vacuum). Versions of history labels start when the
                // chunk's snapshot was taken: before any transaction
                // streamed after it.
                let taken_at = crate::lsn::pg_now();
                let begun = std::time::Instant::now();
                let consistent = begin_exported_snapshot(&prepared.info, c, &temp_slot).await?;
                let exported = begun.elapsed();
                let rows = read_chunk(c, t, after.as_deref(), opts.chunk_rows).await;
                let _ = c.batch_execute("COMMIT").await;
                let rows = rows?;
                let read = begun.elapsed();
                let mut batcher = Batcher::new();
                batcher.note_time(consistent, taken_at);
                let n = rows.len() as u64;
                let last = rows.last().map(|r| r.1.clone());
                for (change, _) in rows {
                    let mut ops = Vec::new();
                    mapper.map_change(&change, consistent, &mut ops)?;
                    batcher.push_transaction(vec![ops], Lsn::ZERO);
                }
                if n == 0 {
                    return Ok::<(), anyhow::Error>(());
                }
                let batch = batcher.take(&prepared.mapping);
                tracing::debug!(
                    rows = n,
                    snapshot_ms = exported.as_millis() as u64,
                    read_ms = (read - exported).as_millis() as u64,
                    map_ms = (begun.elapsed() - read).as_millis() as u64,
                    "chunk read"
                );
                let full = n >= opts.chunk_rows as u64;
                let chunk = Chunk {
                    batch,
                    rows: n,
                    last: last.clone(),
                    consistent,
                };
                if chunks.send(chunk).await.is_err() {
                    // The writer stopped; it says why.
                    return Ok(());
                }
                after = last;
                if !full {
                    return Ok(());
                }
            }
        };
        let write = async {
            loop {
                let idle = std::time::Instant::now();
                let Some(chunk) = ready.recv().await else {
                    break;
                };
                tracing::debug!(
                    waited_ms = idle.elapsed().as_millis() as u64,
                    "chunk to write"
                );
                consistent = chunk.consistent;
                state.table = Some(t.name.clone());
                state.last_key = chunk.last;
                state.rows += chunk.rows;
                sink.apply_with(&chunk.batch, progress_query(slot, &state, consistent))
                    .await?;
                copied += chunk.rows;
                progress.add(chunk.rows, &t.name, started_rows);
            }
            Ok::<(), anyhow::Error>(())
        };
        tokio::try_join!(read, write)?;
        state.tables_done.push(t.name.clone());
        state.table = None;
        state.last_key = None;
        sink.apply_with(
            &Batcher::new().take(&prepared.mapping),
            progress_query(slot, &state, consistent),
        )
        .await?;
    }
    // Every table is read past the slot's confirmed position: if the graph
    // was behind it (restored, wiped), it is not any more.
    if let Some(at) = prepared.confirmed_flush {
        sink.advance_checkpoint_to(at).await?;
    }
    state.done = true;
    sink.apply_with(
        &Batcher::new().take(&prepared.mapping),
        progress_query(slot, &state, consistent),
    )
    .await?;
    progress.finish();
    Ok(SnapshotReport {
        rows: copied,
        resumed,
        consistent_lsn: consistent,
        already_done: false,
    })
}

/// A chunk read and mapped, waiting to be written.
struct Chunk {
    batch: crate::batch::Batch,
    rows: u64,
    last: Option<Vec<String>>,
    consistent: Lsn,
}

/// `walgraph snapshot`: copies, then says what it did.
pub async fn command(cfg: &Config, opts: &SnapshotOptions) -> anyhow::Result<()> {
    let r = snapshot(cfg, opts).await?;
    if r.already_done {
        println!(
            "the snapshot for slot {} is already complete ({} rows); use --restart to take it again",
            cfg.postgres.slot, r.rows
        );
    } else {
        println!(
            "snapshot complete: {} rows copied{} at {}; start `walgraph run` to stream from there",
            r.rows,
            if r.resumed { " (resumed)" } else { "" },
            r.consistent_lsn
        );
    }
    Ok(())
}
