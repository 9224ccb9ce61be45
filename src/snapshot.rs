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
//! - each chunk is written in one Neo4j transaction together with the
//!   progress record `(:WalgraphSnapshot {slot})` (table, last key, rows), so
//!   an interrupted snapshot resumes after the last chunk Neo4j committed;
//! - it refuses to run while `walgraph run` streams from the slot (a change
//!   applied before its row is copied could be undone by the copy), and `run`
//!   refuses to start while a snapshot is unfinished.
//!
//! Exported snapshots: <https://www.postgresql.org/docs/current/protocol-replication.html#PROTOCOL-REPLICATION-CREATE-REPLICATION-SLOT>
//! and `SET TRANSACTION SNAPSHOT`.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use neo4rs::{query, Query};
use tokio_postgres::SimpleQueryMessage;

use crate::batch::Batcher;
use crate::catalog::{quote_ident, quote_literal, quote_qualified, PgClient};
use crate::config::Config;
use crate::decode::message::{RelationBody, RelationColumn, TupleValue};
use crate::decode::{decode_row, RelationCache};
use crate::lsn::Lsn;
use crate::map::Mapper;
use crate::mapping::Mapping;
use crate::pipeline;
use crate::progress::Progress;
use crate::sink::Sink;
use crate::source::ReplicationStream;
use crate::transactions::{Change, Op};

/// Output formats the decoder reads values in (as the replication
/// connection sets them), for the current transaction.
pub(crate) const TEXT_FORMATS: &str = "SET LOCAL DateStyle = ISO; SET LOCAL TimeZone = 'UTC'; \
     SET LOCAL IntervalStyle = iso_8601; SET LOCAL extra_float_digits = 3; SET LOCAL bytea_output = hex;";

/// The progress record's label.
pub const LABEL: &str = "WalgraphSnapshot";

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

/// A snapshot's progress as recorded in Neo4j.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotState {
    /// All tables copied.
    pub done: bool,
    /// Tables copied completely.
    pub tables_done: Vec<String>,
    /// The table being copied.
    pub table: Option<String>,
    /// Its last copied key, as text.
    pub last_key: Option<Vec<String>>,
    /// Rows copied so far.
    pub rows: u64,
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

/// Reads the progress record of `slot`.
pub async fn read_state(sink: &Sink, slot: &str) -> anyhow::Result<Option<SnapshotState>> {
    let mut rows = sink
        .graph()
        .execute(
            query(
                "MATCH (s:WalgraphSnapshot {slot: $slot}) RETURN s.done AS done, \
                 s.tables_done AS tables_done, s.table AS table, s.last_key AS last_key, s.rows AS rows",
            )
            .param("slot", slot),
        )
        .await?;
    let Some(row) = rows.next().await? else {
        return Ok(None);
    };
    Ok(Some(SnapshotState {
        done: row.get::<bool>("done").unwrap_or(false),
        tables_done: row.get::<Vec<String>>("tables_done").unwrap_or_default(),
        table: row.get::<String>("table").ok(),
        last_key: row.get::<Vec<String>>("last_key").ok(),
        rows: row
            .get::<i64>("rows")
            .ok()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0),
    }))
}

fn progress_query(slot: &str, state: &SnapshotState, lsn: Lsn) -> Query {
    query(
        "MERGE (s:WalgraphSnapshot {slot: $slot}) \
         SET s.done = $done, s.tables_done = $tables_done, s.table = $table, \
             s.last_key = $last_key, s.rows = $rows, s.lsn_text = $lsn_text, \
             s.updated_at = datetime()",
    )
    .param("slot", slot)
    .param("done", state.done)
    .param("tables_done", state.tables_done.clone())
    .param("table", state.table.clone())
    .param("last_key", state.last_key.clone())
    .param("rows", i64::try_from(state.rows).unwrap_or(i64::MAX))
    .param("lsn_text", lsn.to_string())
}

/// One mapped table as the copy reads it.
pub(crate) struct Table {
    pub(crate) name: String,
    /// `SELECT` list, quoted, in column order.
    pub(crate) columns: Vec<String>,
    /// Key columns to order and resume by: (quoted name, position, SQL type).
    pub(crate) key: Vec<(String, usize, String)>,
    pub(crate) relation: Arc<crate::decode::Relation>,
}

/// Reads up to `limit` rows of `t` after the key `after` (text values), in
/// key order, as insert changes with their keys as text.
pub(crate) async fn read_chunk(
    c: &tokio_postgres::Client,
    t: &Table,
    after: Option<&[String]>,
    limit: usize,
) -> anyhow::Result<Vec<(Change, Vec<String>)>> {
    let order: Vec<&str> = t.key.iter().map(|k| k.0.as_str()).collect();
    let filter = match after {
        Some(key) => {
            let values: Vec<String> = key
                .iter()
                .zip(&t.key)
                .map(|(v, k)| format!("{}::{}", quote_literal(v), k.2))
                .collect();
            format!("WHERE ({}) > ({})", order.join(", "), values.join(", "))
        }
        None => String::new(),
    };
    let sql = format!(
        "SELECT {} FROM {} {filter} ORDER BY {} LIMIT {limit}",
        t.columns.join(", "),
        quote_qualified(&t.name),
        order.join(", "),
    );
    let messages = c
        .simple_query(&sql)
        .await
        .with_context(|| format!("cannot read {}", t.name))?;
    let mut out = Vec::new();
    for m in messages {
        let SimpleQueryMessage::Row(row) = m else {
            continue;
        };
        let tuple: Vec<TupleValue> = (0..t.columns.len())
            .map(|i| match row.get(i) {
                Some(s) => TupleValue::Text(Bytes::copy_from_slice(s.as_bytes())),
                None => TupleValue::Null,
            })
            .collect();
        let new = decode_row(&t.relation, &tuple)?;
        let key = t
            .key
            .iter()
            .map(|k| row.get(k.1).unwrap_or_default().to_string())
            .collect();
        out.push((
            Change {
                relation: Arc::clone(&t.relation),
                op: Op::Insert,
                new: Some(new),
                old: None,
                old_is_full_row: false,
            },
            key,
        ));
    }
    Ok(out)
}

/// The mapped tables in copy order: node tables first (relationships from
/// join tables then find their end nodes), each by name.
fn table_order(mapping: &Mapping) -> Vec<String> {
    let mut nodes: Vec<String> = Vec::new();
    let mut joins: Vec<String> = Vec::new();
    for (name, t) in &mapping.tables {
        if t.node.is_some() {
            nodes.push(name.clone());
        } else {
            joins.push(name.clone());
        }
    }
    nodes.sort();
    joins.sort();
    nodes.extend(joins);
    nodes
}

pub(crate) async fn describe_table(
    pg: &tokio_postgres::Client,
    name: &str,
    primary_key: &[String],
) -> anyhow::Result<Table> {
    let rows = pg
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, format_type(a.atttypid, a.atttypmod),
                    c.oid::int8, n.nspname::text, c.relname::text
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&quote_qualified(name)],
        )
        .await
        .with_context(|| format!("cannot read the columns of {name}"))?;
    let Some(first) = rows.first() else {
        bail!("{name} has no columns");
    };
    let oid = u32::try_from(first.get::<_, i64>(4)).unwrap_or(0);
    let body = RelationBody {
        oid,
        namespace: first.get(5),
        name: first.get(6),
        replica_identity: b'd',
        columns: rows
            .iter()
            .map(|r| {
                let col: String = r.get(0);
                RelationColumn {
                    is_key: primary_key.contains(&col),
                    name: col,
                    type_oid: u32::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                    type_modifier: r.get(2),
                }
            })
            .collect(),
    };
    let mut cache = RelationCache::default();
    let relation = cache.update(&body);
    let names: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    if primary_key.is_empty() {
        bail!(
            "{name} has no primary key, which the snapshot needs to copy it in order and resume; add one"
        );
    }
    let key = primary_key
        .iter()
        .map(|k| {
            let pos = names
                .iter()
                .position(|n| n == k)
                .ok_or_else(|| anyhow!("the key column {k} of {name} does not exist"))?;
            Ok((quote_ident(k), pos, rows[pos].get::<_, String>(3)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Table {
        name: name.to_string(),
        columns: names.iter().map(|n| quote_ident(n)).collect(),
        key,
        relation,
    })
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

    let temp_slot = format!("walgraph_snapshot_{}", std::process::id());
    let reader = PgClient::connect(&prepared.info).await?;
    let c = reader.client();
    c.batch_execute(TEXT_FORMATS).await?;

    let tables = table_order(&prepared.mapping);
    let catalog = reader.catalog(&tables).await?;
    let mut described = Vec::new();
    let mut total = state.rows;
    for name in &tables {
        if state.tables_done.contains(name) {
            continue;
        }
        let pk = catalog
            .get(name)
            .map(|t| t.primary_key.clone())
            .unwrap_or_default();
        let t = describe_table(c, name, &pk).await?;
        let count = c
            .query_one(
                &format!("SELECT count(*) FROM {}", quote_qualified(name)),
                &[],
            )
            .await?
            .get::<_, i64>(0);
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
        let mut after: Option<Vec<String>> = match &state.table {
            Some(name) if *name == t.name => state.last_key.clone(),
            _ => None,
        };
        loop {
            // Each chunk under a snapshot of its own: no transaction stays
            // open for the whole copy (which would hold back vacuum).
            consistent = begin_exported_snapshot(&prepared.info, c, &temp_slot).await?;
            let rows = read_chunk(c, t, after.as_deref(), opts.chunk_rows).await;
            let _ = c.batch_execute("COMMIT").await;
            let rows = rows?;
            let mut batcher = Batcher::new();
            let n = rows.len() as u64;
            let last = rows.last().map(|r| r.1.clone());
            for (change, _) in rows {
                let mut ops = Vec::new();
                mapper.map_change(&change, consistent, &mut ops)?;
                batcher.push_transaction(vec![ops], Lsn::ZERO);
            }
            if n == 0 {
                break;
            }
            let batch = batcher.take(&prepared.mapping);
            state.table = Some(t.name.clone());
            state.last_key = last.clone();
            state.rows += n;
            sink.apply_with(&batch, progress_query(slot, &state, consistent))
                .await?;
            copied += n;
            progress.add(n, &t.name, started_rows);
            after = last;
            if n < opts.chunk_rows as u64 {
                break;
            }
        }
        state.tables_done.push(t.name.clone());
        state.table = None;
        state.last_key = None;
        sink.apply_with(
            &Batcher::new().take(&prepared.mapping),
            progress_query(slot, &state, consistent),
        )
        .await?;
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

/// Opens a repeatable-read transaction on `c` under a snapshot exported by a
/// new temporary replication slot, and returns that slot's consistent point:
/// the transaction sees exactly what committed before it. The slot goes
/// when its connection closes, here; the transaction keeps the snapshot.
async fn begin_exported_snapshot(
    info: &crate::source::ConnInfo,
    c: &tokio_postgres::Client,
    temp_slot: &str,
) -> anyhow::Result<Lsn> {
    let mut repl = ReplicationStream::connect(info).await?;
    let created = repl
        .command(&format!(
            "CREATE_REPLICATION_SLOT {temp_slot} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"
        ))
        .await?;
    let row = created
        .first()
        .ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT returned nothing"))?;
    let consistent: Lsn = row
        .get(1)
        .cloned()
        .flatten()
        .ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT returned no consistent point"))?
        .parse()
        .map_err(|e| anyhow!("CREATE_REPLICATION_SLOT returned a bad consistent point: {e}"))?;
    let snapshot_name = row
        .get(2)
        .cloned()
        .flatten()
        .ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT exported no snapshot"))?;
    tracing::debug!(consistent_lsn = %consistent, snapshot = %snapshot_name, "reading a chunk under an exported snapshot");
    c.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(&snapshot_name)
    ))
    .await
    .context("cannot read under the exported snapshot")?;
    drop(repl);
    Ok(consistent)
}

/// Whether to draw a progress bar: stderr is a terminal.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
