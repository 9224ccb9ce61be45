//! `walgraph status`: where the slot is, where the graph is, and what the
//! graph holds for the mapped labels and types.
//!
//! Invariant: it only reads (the slot, the checkpoint, the graph, and the
//! running process's `/metrics`), so it is safe beside `walgraph run`.

use neo4rs::query;
use serde::Serialize;

use crate::config::Config;
use crate::lsn::Lsn;
use crate::mapping::quote;
use crate::sink::Sink;
use crate::source::catalog::PgClient;
use crate::source::ConnInfo;

/// The running `walgraph run`, as its `/metrics` tell (when `[http]
/// listen` is set and it answers).
#[derive(Debug, Serialize)]
pub struct Process {
    /// Where it was asked.
    pub address: String,
    /// Row changes applied since it started.
    pub changes_applied: u64,
    /// Changes applied per second, over one second of sampling.
    pub changes_per_sec: f64,
    /// Commit-to-graph latency since it started, milliseconds: p50, p99, max.
    pub latency_ms: [f64; 3],
    /// How long the batch being written has been failing (0 while writes
    /// go through).
    pub batch_failing_seconds: f64,
    /// The batch has failed for longer than `neo4j.stuck_after`.
    pub batch_stuck: bool,
}

/// What `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The running process, if it serves metrics.
    pub process: Option<Process>,
    /// Why the graph could not be read (Neo4j unreachable), if it could not.
    pub neo4j_error: Option<String>,
    /// Tables added to the mapping that `run` is still copying, if any.
    pub backfill: Option<String>,
    /// Slot name.
    pub slot: String,
    /// Whether the slot exists.
    pub slot_exists: bool,
    /// Whether a consumer is attached to it.
    pub slot_active: bool,
    /// `confirmed_flush_lsn`.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// `restart_lsn`.
    pub restart_lsn: Option<Lsn>,
    /// `wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    pub wal_status: Option<String>,
    /// `safe_wal_size` in bytes, if `max_slot_wal_keep_size` is set.
    pub safe_wal_size: Option<i64>,
    /// A failover slot (PostgreSQL 17+; `null` before).
    pub failover: Option<bool>,
    /// Synchronized from a primary, on a standby (17+).
    pub synced: Option<bool>,
    /// Invalidated by a recovery conflict (16+).
    pub conflicting: Option<bool>,
    /// Why the slot was invalidated (17+), if it was.
    pub invalidation_reason: Option<String>,
    /// The server's `idle_replication_slot_timeout` in seconds (18+), if
    /// set: a slot unused for longer is invalidated.
    pub idle_slot_timeout_seconds: Option<u64>,
    /// The server's current WAL position (on a standby: replayed up to).
    pub server_wal_lsn: Lsn,
    /// Whether walgraph reads from a standby (`postgres.url` in recovery).
    pub standby: bool,
    /// Bytes of WAL not yet confirmed.
    pub lag_bytes: Option<u64>,
    /// Lag in time: 0 when caught up, otherwise the age of the commit of
    /// the last transaction in the graph (as `now() -
    /// pg_last_xact_replay_timestamp()` is for a physical standby); `null`
    /// before the first one.
    pub lag_seconds: Option<f64>,
    /// Bytes of WAL the slot makes the server keep.
    pub retained_wal_bytes: Option<u64>,
    /// walgraph's checkpoint in Neo4j.
    pub checkpoint: Option<Lsn>,
    /// Seconds since the checkpoint last moved.
    pub checkpoint_age_seconds: Option<f64>,
    /// Node counts per mapped label.
    pub labels: Vec<Count>,
    /// Relationship counts per mapped type.
    pub relationships: Vec<Count>,
    /// Up to `--sample` nodes per label and relationships per type, as JSON.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<serde_json::Value>,
}

/// A count of graph entities.
#[derive(Debug, Serialize)]
pub struct Count {
    /// Label or type.
    pub name: String,
    /// How many.
    pub count: i64,
    /// Placeholders: endpoint nodes whose own row has not arrived.
    pub placeholders: i64,
}

async fn process(addr: &str) -> Option<Process> {
    use crate::http::{metric, scrape};
    let first = scrape(addr).await?;
    let started = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let second = scrape(addr).await?;
    let applied = |t: &str| metric(t, "walgraph_changes_applied_total").unwrap_or(0.0);
    let q = |name: &str| {
        metric(
            &second,
            &format!("walgraph_commit_to_graph_since_start_seconds{{quantile=\"{name}\"}}"),
        )
        .unwrap_or(0.0)
            * 1000.0
    };
    Some(Process {
        address: addr.to_string(),
        changes_applied: applied(&second) as u64,
        changes_per_sec: (applied(&second) - applied(&first)) / started.elapsed().as_secs_f64(),
        latency_ms: [q("0.5"), q("0.99"), q("1")],
        batch_failing_seconds: metric(&second, "walgraph_batch_failing_seconds").unwrap_or(0.0),
        batch_stuck: metric(&second, "walgraph_batch_stuck").unwrap_or(0.0) > 0.0,
    })
}

/// Collects the status.
pub async fn collect(cfg: &Config, sample: usize) -> anyhow::Result<Status> {
    let info = ConnInfo::of(&cfg.postgres)?;
    let pg = PgClient::connect(&info).await?;
    let slot = pg.slot(&cfg.postgres.slot).await?;
    let row = pg
        .client()
        .query_one(
            &format!(
                "SELECT ({})::text,
                        (SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1),
                        (SELECT safe_wal_size FROM pg_replication_slots WHERE slot_name = $1),
                        pg_is_in_recovery()",
                crate::source::standby::WAL_POSITION
            ),
            &[&cfg.postgres.slot],
        )
        .await?;
    let server_wal_lsn: Lsn = row.try_get::<_, String>(0)?.parse()?;
    let wal_status: Option<String> = row.try_get(1)?;
    let safe_wal_size: Option<i64> = row.try_get(2)?;
    let standby: bool = row.try_get(3)?;
    let mapping = crate::pipeline::compile_mapping(&pg, cfg).await?;
    let process = match cfg.http.listen {
        Some(addr) => process(&addr.to_string()).await,
        None => None,
    };
    // Neo4j down is what an operator may be looking into: say so and
    // report the rest.
    let (graph, neo4j_error) = match graph_part(cfg, &mapping, sample).await {
        Ok(g) => (g, None),
        Err(e) => (GraphPart::default(), Some(crate::error_sentence(&e))),
    };
    let GraphPart {
        backfill,
        checkpoint,
        checkpoint_age_seconds,
        commit_age_seconds,
        labels,
        relationships,
        samples,
    } = graph;
    let slot_active = slot.as_ref().is_some_and(|s| s.active);
    let lag_bytes = slot
        .as_ref()
        .and_then(|s| s.confirmed_flush_lsn)
        .map(|c| server_wal_lsn.bytes_since(c));
    // Idle servers write a little WAL of their own, which walgraph follows
    // while it runs; below a page of it nothing is really pending.
    let lag_seconds = if lag_bytes.unwrap_or(0) <= 8192 {
        Some(0.0)
    } else {
        commit_age_seconds
    };
    Ok(Status {
        process,
        neo4j_error,
        backfill,
        slot: cfg.postgres.slot.clone(),
        slot_exists: slot.is_some(),
        slot_active,
        confirmed_flush_lsn: slot.as_ref().and_then(|s| s.confirmed_flush_lsn),
        restart_lsn: slot.as_ref().and_then(|s| s.restart_lsn),
        wal_status,
        safe_wal_size,
        failover: slot.as_ref().and_then(|s| s.failover),
        synced: slot.as_ref().and_then(|s| s.synced),
        conflicting: slot.as_ref().and_then(|s| s.conflicting),
        invalidation_reason: slot.as_ref().and_then(|s| s.invalidation_reason.clone()),
        idle_slot_timeout_seconds: pg.idle_slot_timeout().await?,
        server_wal_lsn,
        standby,
        lag_bytes,
        lag_seconds,
        retained_wal_bytes: slot
            .as_ref()
            .and_then(|s| s.restart_lsn)
            .map(|r| server_wal_lsn.bytes_since(r)),
        checkpoint,
        checkpoint_age_seconds,
        labels,
        relationships,
        samples,
    })
}

/// What the graph holds: the checkpoint and the counts (and samples).
#[derive(Default)]
struct GraphPart {
    backfill: Option<String>,
    checkpoint: Option<Lsn>,
    checkpoint_age_seconds: Option<f64>,
    commit_age_seconds: Option<f64>,
    labels: Vec<Count>,
    relationships: Vec<Count>,
    samples: Vec<serde_json::Value>,
}

async fn graph_part(
    cfg: &Config,
    mapping: &crate::mapping::Mapping,
    sample: usize,
) -> anyhow::Result<GraphPart> {
    let sink = Sink::connect(&cfg.neo4j, &cfg.postgres.slot).await?;
    let graph = sink.graph();
    let mut checkpoint = None;
    let mut checkpoint_age_seconds = None;
    let mut commit_age_seconds = None;
    let mut rows = graph
        .execute(
            query(
                "MATCH (c:WalgraphCheckpoint {slot: $slot}) \
                 RETURN c.lsn AS lsn, toFloat(duration.inSeconds(c.updated_at, datetime()).milliseconds) / 1000.0 AS age, \
                 toFloat(duration.inSeconds(c.committed_at, datetime()).milliseconds) / 1000.0 AS commit_age",
            )
            .param("slot", cfg.postgres.slot.as_str()),
        )
        .await?;
    if let Some(r) = rows.next().await? {
        checkpoint = r.get::<i64>("lsn").ok().map(Lsn::from_i64);
        checkpoint_age_seconds = r.get::<f64>("age").ok();
        commit_age_seconds = r.get::<f64>("commit_age").ok().map(|a| a.max(0.0));
    }
    let mut labels = Vec::new();
    let mut samples = Vec::new();
    for (label, _) in mapping.node_keys() {
        let q = format!(
            "MATCH (n:{}) RETURN count(n) AS n, count(CASE WHEN n._lsn IS NULL THEN 1 END) AS p",
            quote(&label)
        );
        let mut rows = graph.execute(query(&q)).await?;
        if let Some(r) = rows.next().await? {
            labels.push(Count {
                name: label.to_string(),
                count: r.get("n").unwrap_or(0),
                placeholders: r.get("p").unwrap_or(0),
            });
        }
        if sample > 0 {
            let q = format!(
                "MATCH (n:{}) RETURN n {{.*}} AS props ORDER BY elementId(n) LIMIT $limit",
                quote(&label)
            );
            let mut rows = graph
                .execute(query(&q).param("limit", sample as i64))
                .await?;
            while let Some(r) = rows.next().await? {
                let props: serde_json::Value = r.get("props").unwrap_or_default();
                samples.push(serde_json::json!({"label": &*label, "properties": props}));
            }
        }
    }
    let mut relationships = Vec::new();
    let mut types: Vec<&crate::mapping::RelTarget> =
        mapping.tables.values().flat_map(|t| &t.rels).collect();
    types.sort_by(|a, b| a.rel_type.cmp(&b.rel_type));
    for rel in types {
        let q = format!(
            "MATCH ()-[r:{}]->() RETURN count(r) AS n",
            quote(&rel.rel_type)
        );
        let mut rows = graph.execute(query(&q)).await?;
        if let Some(r) = rows.next().await? {
            relationships.push(Count {
                name: rel.rel_type.to_string(),
                count: r.get("n").unwrap_or(0),
                placeholders: 0,
            });
        }
        if sample > 0 {
            let from_key = rel
                .from
                .key_props
                .first()
                .map(|p| quote(p))
                .unwrap_or_default();
            let to_key = rel
                .to
                .key_props
                .first()
                .map(|p| quote(p))
                .unwrap_or_default();
            let q = format!(
                "MATCH (a)-[r:{}]->(b) RETURN a.{from_key} AS from, b.{to_key} AS to, r {{.*}} AS props \
                 ORDER BY elementId(r) LIMIT $limit",
                quote(&rel.rel_type)
            );
            let mut rows = graph
                .execute(query(&q).param("limit", sample as i64))
                .await?;
            while let Some(r) = rows.next().await? {
                let v: serde_json::Value = r.to().unwrap_or_default();
                samples.push(serde_json::json!({
                    "type": &*rel.rel_type,
                    "from": {"label": &*rel.from.label, "key": v["from"]},
                    "to": {"label": &*rel.to.label, "key": v["to"]},
                    "properties": v["props"],
                }));
            }
        }
    }
    let backfill = match crate::sink::snapshot_state::read_state(&sink, &cfg.postgres.slot).await? {
        Some(s) if s.done => {
            let left: Vec<String> = crate::pipeline::copy::table_order(mapping)
                .into_iter()
                .filter(|t| !s.tables_done.contains(t))
                .collect();
            match (&s.table, left.is_empty()) {
                (_, true) => None,
                (Some(t), false) => Some(format!(
                    "copying {t} while streaming (after key ({})); left: {}",
                    s.last_key.unwrap_or_default().join(", "),
                    left.join(", ")
                )),
                (None, false) => Some(format!("to copy while streaming: {}", left.join(", "))),
            }
        }
        _ => None,
    };
    Ok(GraphPart {
        backfill,
        checkpoint,
        checkpoint_age_seconds,
        commit_age_seconds,
        labels,
        relationships,
        samples,
    })
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Renders the status for people.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let slot_state = match (s.slot_exists, s.slot_active) {
        (false, _) => "missing (run `walgraph setup`)",
        (true, true) => "active",
        (true, false) => "inactive (no walgraph attached)",
    };
    out.push_str(&format!("slot {:<24} {slot_state}\n", s.slot));
    out.push_str(&format!(
        "  server WAL             {}{}\n",
        s.server_wal_lsn,
        if s.standby {
            " (a standby: replayed up to)"
        } else {
            ""
        }
    ));
    out.push_str(&format!(
        "  confirmed flush        {}\n",
        opt(&s.confirmed_flush_lsn)
    ));
    let lag_time = match s.lag_seconds {
        Some(0.0) => "caught up".to_string(),
        Some(t) => format!("{t:.1} s behind the last commit applied"),
        None => "unknown (nothing applied yet)".to_string(),
    };
    out.push_str(&format!(
        "  lag                    {} bytes, {lag_time}\n",
        opt(&s.lag_bytes)
    ));
    out.push_str(&format!(
        "  retained WAL           {} bytes\n",
        opt(&s.retained_wal_bytes)
    ));
    out.push_str(&format!(
        "  wal_status             {} (safe_wal_size {})\n",
        opt(&s.wal_status),
        opt(&s.safe_wal_size)
    ));
    if s.failover.is_some() || s.conflicting.is_some() {
        out.push_str(&format!(
            "  failover               {} (synced {}, conflicting {}, invalidation_reason {})\n",
            opt(&s.failover),
            opt(&s.synced),
            opt(&s.conflicting),
            opt(&s.invalidation_reason)
        ));
    }
    if let Some(t) = s.idle_slot_timeout_seconds {
        out.push_str(&format!(
            "  idle slot timeout      {t} s (the server invalidates the slot if nothing uses it for longer)\n"
        ));
    }
    if let Some(reason) = &s.invalidation_reason {
        out.push_str(&format!(
            "  INVALIDATED            {reason}: `walgraph run` cannot go on from this slot; see docs/operations.md\n"
        ));
    }
    if let Some(p) = &s.process {
        out.push_str(&format!(
            "walgraph run at {}        {} changes applied, {:.0} changes/s now, latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms\n",
            p.address, p.changes_applied, p.changes_per_sec, p.latency_ms[0], p.latency_ms[1], p.latency_ms[2]
        ));
        if p.batch_stuck {
            out.push_str(&format!(
                "  STUCK: the batch being written has failed for {:.0} s (see its log); it goes on retrying\n",
                p.batch_failing_seconds
            ));
        } else if p.batch_failing_seconds > 0.0 {
            out.push_str(&format!(
                "  retrying: the batch being written has failed for {:.0} s\n",
                p.batch_failing_seconds
            ));
        }
    }
    if let Some(b) = &s.backfill {
        out.push_str(&format!("backfill                 {b}\n"));
    }
    if let Some(e) = &s.neo4j_error {
        out.push_str(&format!("Neo4j unreadable           {e}\n"));
    }
    out.push_str(&format!("checkpoint in Neo4j      {}", opt(&s.checkpoint)));
    if let Some(age) = s.checkpoint_age_seconds {
        out.push_str(&format!(" (moved {age:.1}s ago)"));
    }
    out.push('\n');
    out.push_str("graph\n");
    for c in &s.labels {
        out.push_str(&format!("  (:{:<20}) {:>10} nodes", c.name, c.count));
        if c.placeholders > 0 {
            out.push_str(&format!(" ({} placeholders)", c.placeholders));
        }
        out.push('\n');
    }
    for c in &s.relationships {
        out.push_str(&format!(
            "  [:{:<20}] {:>10} relationships\n",
            c.name, c.count
        ));
    }
    for v in &s.samples {
        out.push_str(&format!("  {v}\n"));
    }
    out
}

/// `walgraph status`: a table, or JSON for scripts.
pub async fn command(cfg: &Config, sample: usize, json: bool) -> anyhow::Result<()> {
    let s = collect(cfg, sample).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", render(&s));
    }
    Ok(())
}
