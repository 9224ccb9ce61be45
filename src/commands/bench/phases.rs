//! The measurements: each drains or follows its own slot.
//!
//! Invariant: every measurement reads the same WAL from a slot made before
//! the workload, so their figures compare.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::AsyncReadExt;

use super::child::{find_pg_binary, metric, proc_stats, scrape, stop_child, tail, wait_ready};
use super::{
    child_toml, Bench, Measurement, Phase, LABEL_PREFIX, PUBLICATION, SCHEMA, SLOT_PREFIX,
};
use crate::batch::{Batch, Batcher};
use crate::config::Config;
use crate::mapping::map::Mapper;
use crate::pipeline::compile_mapping;
use crate::sink::Sink;
use crate::source::{ConnInfo, ReplicationEvent, ReplicationStream, StartOptions};
use crate::transactions::{Assembler, TxnPart};

impl Bench {
    /// `pg_recvlogical` from its slot to /dev/null, until `target`.
    pub(super) async fn recvlogical(
        &self,
        target: crate::lsn::Lsn,
        total: u64,
        wal_mib: f64,
    ) -> anyhow::Result<Measurement> {
        let bin = find_pg_binary("pg_recvlogical")?;
        // The protocol options walgraph negotiates, so both read the same output.
        let version: i32 = self
            .client()
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await?
            .try_get(0)?;
        let proto = match version {
            v if v >= 160_000 => 4,
            v if v >= 150_000 => 3,
            v if v >= 140_000 => 2,
            _ => 1,
        };
        let mut protocol = vec![format!("proto_version={proto}")];
        if proto >= 2 && self.cfg.postgres.streaming {
            protocol.push("streaming=on".into());
        }
        let url = self.cfg.postgres.url.clone().unwrap_or_default();
        let started = Instant::now();
        let mut child = tokio::process::Command::new(&bin)
            .args([
                "--dbname",
                &url,
                "--slot",
                &format!("{SLOT_PREFIX}recv"),
                "--start",
                "--no-loop",
                "--endpos",
                &target.to_string(),
                "--file",
                "/dev/null",
                "--option",
                &format!("publication_names={PUBLICATION}"),
            ])
            .args(protocol.iter().flat_map(|o| ["--option", o.as_str()]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id().unwrap_or(0);
        let mut peak = 0.0f64;
        let mut cpu = 0.0f64;
        let status = loop {
            if let Some((c, r)) = proc_stats(pid) {
                cpu = cpu.max(c);
                peak = peak.max(r);
            }
            tokio::select! {
                s = child.wait() => break s?,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if started.elapsed() > Duration::from_secs(1800) {
                bail!("pg_recvlogical did not reach {target} in 30 minutes");
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err).await;
            }
            bail!("pg_recvlogical failed: {}", err.trim());
        }
        Ok(Measurement {
            name: "pg_recvlogical to /dev/null".into(),
            settings: protocol.join(", "),
            changes: total,
            seconds,
            changes_per_sec: total as f64 / seconds,
            wal_mib_per_sec: Some(wal_mib / seconds),
            cpu_sec_per_million: (cpu > 0.0).then(|| cpu / (total as f64 / 1e6)),
            peak_rss_mib: (peak > 0.0).then_some(peak),
            ..Measurement::default()
        })
    }

    /// Runs `walgraph run` as a child with `cfg` until it has applied
    /// `total` changes (or for `limit`), sampling its CPU time and memory.
    pub(super) async fn drain_child(
        &self,
        phase: &Phase,
        null_sink: bool,
        total: u64,
        limit: Option<Duration>,
    ) -> anyhow::Result<Measurement> {
        let (mut child, addr, log) = self.spawn_run(phase, null_sink).await?;
        let pid = child.id().unwrap_or(0);
        // The clock starts when replication does.
        wait_ready(&mut child, &addr, &log).await?;
        let started = Instant::now();
        let mut cpu_at_start = proc_stats(pid).map_or(0.0, |s| s.0);
        if cpu_at_start.is_nan() {
            cpu_at_start = 0.0;
        }
        let mut peak = 0.0f64;
        let mut cpu = 0.0f64;
        let mut applied;
        loop {
            if let Some((c, r)) = proc_stats(pid) {
                cpu = c;
                peak = peak.max(r);
            }
            let m = scrape(&addr).await.unwrap_or_default();
            applied = metric(&m, "walgraph_changes_applied_total").unwrap_or(0.0) as u64;
            if applied >= total || limit.is_some_and(|l| started.elapsed() >= l) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("walgraph run stopped ({status}): {}", tail(&log));
            }
            if started.elapsed() > Duration::from_secs(3600) {
                bail!("walgraph did not catch up within an hour: {applied} of {total} changes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        stop_child(&mut child).await;
        Ok(Measurement {
            changes: applied,
            seconds,
            changes_per_sec: applied as f64 / seconds,
            cpu_sec_per_million: Some((cpu - cpu_at_start) / (applied.max(1) as f64 / 1e6)),
            peak_rss_mib: Some(peak),
            ..Measurement::default()
        })
    }

    pub(super) async fn spawn_run(
        &self,
        phase: &Phase,
        null_sink: bool,
    ) -> anyhow::Result<(tokio::process::Child, String, PathBuf)> {
        let cfg = &phase.cfg;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let path = self.dir.join(format!("{}.toml", cfg.postgres.slot));
        let log = self.dir.join(format!("{}.log", cfg.postgres.slot));
        std::fs::write(
            &path,
            child_toml(cfg, &phase.tag, &addr, &phase.extra_mapping),
        )?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("--config").arg(&path).arg("run");
        if null_sink {
            cmd.arg("--null-sink");
        }
        if let Some(url) = &cfg.postgres.url {
            cmd.env("WALGRAPH_PG_URL", url);
        }
        cmd.env("WALGRAPH_NEO4J_URI", &cfg.neo4j.uri)
            .env("WALGRAPH_NEO4J_USER", &cfg.neo4j.user);
        if let Some(p) = &cfg.neo4j.password {
            cmd.env("WALGRAPH_NEO4J_PASSWORD", p.expose());
        }
        let child = cmd
            .env(
                "WALGRAPH_LOG",
                std::env::var("WALGRAPH_BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start walgraph run")?;
        Ok((child, addr, log))
    }

    /// Logical messages as graph writes: `n` messages, each a merge_node
    /// of one event with a value and the workload's payload, in
    /// transactions of `--changes-per-txn`, drained by `run` with the null
    /// sink and into Neo4j (max_changes 5000).
    pub(super) async fn messages(&self, n: u64) -> anyhow::Result<Vec<Measurement>> {
        const PREFIX: &str = "walgraph_bench";
        let label = format!("{LABEL_PREFIX}MsgEvent");
        let extra = format!("[[messages]]\nprefix = \"{PREFIX}\"\nlabels = [\"{label}\"]\n");
        let sections = Config::parse(&extra).map_err(|e| anyhow::anyhow!(e))?;
        for slot in ["msg_null", "msg_e2e"] {
            self.create_slot(slot).await?;
        }
        eprintln!(
            "bench: writing {n} logical messages in transactions of {}",
            self.opts.changes_per_txn
        );
        let payload = "x".repeat(self.opts.width);
        let per_txn = self.opts.changes_per_txn.max(1);
        let mut done = 0u64;
        while done < n {
            let to = (done + per_txn).min(n);
            self.client()
                .execute(
                    "SELECT count(pg_logical_emit_message(true, $1, json_build_object('op', 'merge_node', 'label', $2::text, \
                     'key', json_build_object('id', g), 'properties', json_build_object('val', g, 'payload', $3::text))::text)) \
                     FROM generate_series($4::bigint, $5::bigint) g",
                    &[&PREFIX, &label, &payload, &((done + 1) as i64), &(to as i64)],
                )
                .await?;
            done = to;
        }
        let mut out = Vec::new();
        for (slot, tag, null) in [("msg_null", "MsgNull", true), ("msg_e2e", "MsgE2e", false)] {
            let mut phase = self.phase_config(slot, tag, 5000, Duration::from_millis(100))?;
            phase.cfg.messages = sections.messages.clone();
            phase.extra_mapping = extra.clone();
            if !null {
                self.ensure_constraints(&phase).await?;
            }
            eprintln!(
                "bench: walgraph, {n} messages {}",
                if null {
                    "with the null sink"
                } else {
                    "into Neo4j"
                }
            );
            let mut m = self.drain_child(&phase, null, n, None).await?;
            m.name = if null {
                "messages, null sink".into()
            } else {
                "messages end to end".into()
            };
            m.settings = "max_changes 5000".into();
            out.push(m);
        }
        Ok(out)
    }

    /// Reads the slot into batches, then times writing them to Neo4j one
    /// after another.
    pub(super) async fn prebuilt(&self, phase: &Phase, total: u64) -> anyhow::Result<Measurement> {
        let cfg = &phase.cfg;
        let mapping = std::sync::Arc::new(compile_mapping(&self.pg, cfg).await?);
        let info = ConnInfo::parse(cfg.postgres.url.as_deref().unwrap_or(""))?;
        let mut stream = ReplicationStream::connect(&info).await?;
        let proto_version = stream
            .negotiate_proto_version(cfg.postgres.proto_version)
            .await?;
        stream
            .start(&StartOptions {
                slot: cfg.postgres.slot.clone(),
                publications: vec![PUBLICATION.into()],
                start: crate::lsn::Lsn::ZERO,
                proto_version,
                messages: false,
                streaming: cfg.postgres.streaming,
                two_phase: false,
            })
            .await?;
        let mapper = Mapper::new(std::sync::Arc::clone(&mapping));
        let mut assembler = Assembler::with_spill(cfg.postgres.spill());
        let mut batcher = Batcher::new();
        let mut batches: Vec<Batch> = Vec::new();
        let mut seen = 0u64;
        let mut current = (crate::lsn::Lsn::ZERO, crate::lsn::Lsn::ZERO, 0u64);
        while seen < total {
            let ReplicationEvent::XLogData { data, .. } = stream.next_event().await? else {
                continue;
            };
            assembler.push(&data)?;
            while let Some(part) = assembler.next_part()? {
                match part {
                    TxnPart::Begin(h) => current = (h.commit_lsn, h.end_lsn, 0),
                    TxnPart::Change(c) => {
                        let mut ops = Vec::new();
                        mapper.map_change(&c, current.0, &mut ops)?;
                        current.2 += 1;
                        batcher.push_partial(ops, current.1, current.2);
                        seen += 1;
                    }
                    TxnPart::Commit(h) => batcher.end_transaction(h.end_lsn),
                    TxnPart::Message(_) => {}
                }
                if batcher.changes() >= cfg.batch.max_changes {
                    batches.push(batcher.take(&mapping));
                }
            }
        }
        if !batcher.is_empty() {
            batches.push(batcher.take(&mapping));
        }
        drop(stream);
        let sink = Sink::connect(&cfg.neo4j, &cfg.postgres.slot).await?;
        let started = Instant::now();
        for b in &batches {
            sink.apply(b, &[]).await?;
        }
        let seconds = started.elapsed().as_secs_f64();
        Ok(Measurement {
            name: "pre-built batches to Neo4j".into(),
            settings: format!(
                "{} batches, {:.1} statements each",
                batches.len(),
                batches.iter().map(|b| b.statements.len()).sum::<usize>() as f64
                    / batches.len().max(1) as f64
            ),
            changes: total,
            seconds,
            changes_per_sec: total as f64 / seconds,
            ..Measurement::default()
        })
    }

    /// A paced workload while walgraph runs; latency from its metrics.
    pub(super) async fn steady(
        &self,
        i: usize,
        rate: u64,
        delay: Duration,
        mix: [u64; 3],
    ) -> anyhow::Result<Measurement> {
        // The same workload for every run: it starts from an empty table
        // (emptied before the slot exists, so the slot does not see it).
        self.client()
            .batch_execute(&format!("TRUNCATE {SCHEMA}.items"))
            .await?;
        let slot = format!("steady_{i}");
        self.create_slot(&slot).await?;
        let phase = self.phase_config(
            &slot,
            &format!("S{i}"),
            crate::config::BatchConfig::default().max_changes,
            delay,
        )?;
        self.ensure_constraints(&phase).await?;
        let (mut child, addr, log) = self.spawn_run(&phase, false).await?;
        let pid = child.id().unwrap_or(0);
        wait_ready(&mut child, &addr, &log).await?;
        let cpu0 = proc_stats(pid).map_or(0.0, |s| s.0);
        let gc0 = self.neo4j_gc().await.ok();
        let changes = rate * self.opts.steady_secs;
        let started = Instant::now();
        let w = self.write_workload(changes, mix, Some(rate)).await?;
        let written_in = started.elapsed().as_secs_f64();
        let mut peak = 0.0f64;
        let mut cpu = 0.0;
        let m = loop {
            if let Some((c, r)) = proc_stats(pid) {
                cpu = c;
                peak = peak.max(r);
            }
            let m = scrape(&addr).await.unwrap_or_default();
            if metric(&m, "walgraph_changes_applied_total").unwrap_or(0.0) as u64 >= w.changes {
                break m;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("walgraph run stopped ({status}): {}", tail(&log));
            }
            if started.elapsed() > Duration::from_secs(self.opts.steady_secs * 10 + 60) {
                bail!("walgraph fell behind the steady workload and did not catch up");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        stop_child(&mut child).await;
        let gc = match (gc0, self.neo4j_gc().await.ok()) {
            (Some(a), Some(b)) => Some(gc_between(&a, &b)),
            _ => None,
        };
        Ok(Measurement {
            name: "steady rate, commit to graph".into(),
            settings: format!("{rate}/s, max_delay {}", humantime::format_duration(delay)),
            changes: w.changes,
            seconds: written_in,
            changes_per_sec: w.changes as f64 / written_in,
            wal_mib_per_sec: None,
            cpu_sec_per_million: Some((cpu - cpu0) / (w.changes.max(1) as f64 / 1e6)),
            peak_rss_mib: Some(peak),
            latency_ms: Some(latency_ms(&m)),
            latency_p999_ms: metric(
                &m,
                "walgraph_commit_to_graph_since_start_seconds{quantile=\"0.999\"}",
            )
            .map(|v| v * 1000.0),
            stages_ms: stages_ms(&m),
            neo4j_gc: gc,
        })
    }

    /// Neo4j's garbage collectors so far: name, collections, milliseconds
    /// (from its JVM's management beans, `dbms.queryJmx`).
    async fn neo4j_gc(&self) -> anyhow::Result<Vec<(String, u64, f64)>> {
        let sink = Sink::connect(&self.cfg.neo4j, "walgraph_bench").await?;
        let mut rows = sink
            .graph()
            .execute(neo4rs::query(
                "CALL dbms.queryJmx('java.lang:type=GarbageCollector,name=*') YIELD name, attributes \
                 RETURN name, attributes.CollectionCount.value AS count, attributes.CollectionTime.value AS ms",
            ))
            .await?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().await? {
            let name: String = r.get("name").unwrap_or_default();
            // `java.lang:name=G1 Young Generation,type=GarbageCollector`
            let name = name
                .split("name=")
                .nth(1)
                .and_then(|n| n.split(',').next())
                .unwrap_or(&name)
                .to_string();
            let count: i64 = r.get("count").unwrap_or(0);
            let ms: i64 = r.get("ms").unwrap_or(0);
            out.push((name, count.max(0) as u64, ms.max(0) as f64));
        }
        Ok(out)
    }

    /// A table of `rows` rows added to the mapping after the snapshot:
    /// `run` copies it while a steady workload of `rate` changes/s streams.
    /// Reports the copy's rows/s and the stream's commit-to-graph latency
    /// over the copy (compare with the steady runs).
    pub(super) async fn backfill(
        &self,
        rows: u64,
        rate: u64,
        mix: [u64; 3],
    ) -> anyhow::Result<Measurement> {
        let c = self.client();
        c.batch_execute(&format!(
            "TRUNCATE {SCHEMA}.items;
             DROP TABLE IF EXISTS {SCHEMA}.wide;
             CREATE TABLE {SCHEMA}.wide (id bigint PRIMARY KEY, a bigint NOT NULL, b text NOT NULL);
             INSERT INTO {SCHEMA}.wide SELECT g, g, 'row ' || g FROM generate_series(1, {rows}) g;
             ALTER PUBLICATION {PUBLICATION} ADD TABLE {SCHEMA}.wide;"
        ))
        .await?;
        self.create_slot("backfill").await?;
        let mut phase = self.phase_config(
            "backfill",
            "F",
            crate::config::BatchConfig::default().max_changes,
            crate::config::BatchConfig::default().max_delay,
        )?;
        phase.extra_mapping = format!(
            "[[node]]\ntable = \"{SCHEMA}.wide\"\nlabel = \"{}FWide\"\n",
            super::LABEL_PREFIX
        );
        let extra = Config::parse(&phase.extra_mapping).map_err(|e| anyhow::anyhow!(e))?;
        phase.cfg.nodes.extend(extra.nodes);
        self.ensure_constraints(&phase).await?;
        // As if a snapshot had copied the bench's own tables (empty) and
        // `wide` joined the mapping afterwards.
        let sink = Sink::connect(&phase.cfg.neo4j, &phase.cfg.postgres.slot).await?;
        sink.graph()
            .run(
                neo4rs::query(
                    "MERGE (s:WalgraphSnapshot {slot: $slot}) SET s.done = true, s.rows = 0, \
                     s.tables_done = [$groups, $items]",
                )
                .param("slot", phase.cfg.postgres.slot.as_str())
                .param("groups", format!("{SCHEMA}.groups"))
                .param("items", format!("{SCHEMA}.items")),
            )
            .await?;
        let (mut child, addr, log) = self.spawn_run(&phase, false).await?;
        let pid = child.id().unwrap_or(0);
        wait_ready(&mut child, &addr, &log).await?;
        let cpu0 = proc_stats(pid).map_or(0.0, |s| s.0);
        let started = Instant::now();
        // The copy, watched while the workload is written.
        let watch = async {
            loop {
                let m = scrape(&addr).await.unwrap_or_default();
                let left = metric(&m, "walgraph_backfill_tables_left").unwrap_or(1.0);
                let copied = metric(&m, "walgraph_backfill_rows_total").unwrap_or(0.0);
                if left == 0.0 && copied as u64 >= rows {
                    return Ok::<f64, anyhow::Error>(started.elapsed().as_secs_f64());
                }
                if started.elapsed() > Duration::from_secs(3600) {
                    bail!("the backfill did not finish within an hour");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let steady = async {
            let mut written = 0u64;
            // Streams for as long as the copy runs (whole steady runs).
            loop {
                let w = self
                    .write_workload(rate * self.opts.steady_secs.max(1), mix, Some(rate))
                    .await?;
                written += w.changes;
                let m = scrape(&addr).await.unwrap_or_default();
                if metric(&m, "walgraph_backfill_tables_left") == Some(0.0) {
                    return Ok::<u64, anyhow::Error>(written);
                }
            }
        };
        let (copy_secs, written) = tokio::try_join!(watch, steady)?;
        let m = loop {
            let m = scrape(&addr).await.unwrap_or_default();
            if metric(&m, "walgraph_changes_applied_total").unwrap_or(0.0) as u64 >= written {
                break m;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("walgraph run stopped ({status}): {}", tail(&log));
            }
            if started.elapsed() > Duration::from_secs(3600) {
                bail!("walgraph did not catch up with the workload");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let cpu = proc_stats(pid).map_or(cpu0, |s| s.0);
        stop_child(&mut child).await;
        Ok(Measurement {
            name: "online backfill beside a steady rate".into(),
            settings: format!(
                "{rows} rows, {rate} changes/s, {written} changes streamed meanwhile"
            ),
            changes: rows,
            seconds: copy_secs,
            changes_per_sec: rows as f64 / copy_secs,
            wal_mib_per_sec: None,
            cpu_sec_per_million: Some((cpu - cpu0) / (rows.max(1) as f64 / 1e6)),
            peak_rss_mib: None,
            latency_ms: Some(latency_ms(&m)),
            stages_ms: stages_ms(&m),
            ..Measurement::default()
        })
    }

    /// `walgraph snapshot` of a table of `rows` rows (`id bigint`, `a
    /// bigint`, `b text`, one label), against the same rows read and
    /// batched beforehand (chunks of `--snapshot-chunk-rows`, as the
    /// snapshot reads them) and written straight to Neo4j one after
    /// another with nothing else running: the sink-path limit of a copy.
    pub(super) async fn snapshot(&self, rows: u64) -> anyhow::Result<Vec<Measurement>> {
        let chunk_rows = self.opts.snapshot_chunk_rows.max(1);
        self.client()
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {SCHEMA}.wide;
                 CREATE TABLE {SCHEMA}.wide (id bigint PRIMARY KEY, a bigint NOT NULL, b text NOT NULL);
                 INSERT INTO {SCHEMA}.wide SELECT g, g, 'row ' || g FROM generate_series(1, {rows}) g;
                 ANALYZE {SCHEMA}.wide;
                 ALTER PUBLICATION {PUBLICATION} ADD TABLE {SCHEMA}.wide;"
            ))
            .await?;
        self.create_slot("snapshot").await?;
        let wide_only = |slot: &str, tag: &str| -> anyhow::Result<Phase> {
            let mut phase = self.phase_config(
                slot,
                tag,
                crate::config::BatchConfig::default().max_changes,
                crate::config::BatchConfig::default().max_delay,
            )?;
            let extra = Config::parse(&format!(
                "[[node]]\ntable = \"{SCHEMA}.wide\"\nlabel = \"{}{tag}Wide\"\n",
                super::LABEL_PREFIX
            ))
            .map_err(|e| anyhow::anyhow!(e))?;
            phase.cfg.nodes = extra.nodes;
            phase.cfg.relationships.clear();
            Ok(phase)
        };
        // The snapshot, as a user runs it (in this process).
        let phase = wide_only("snapshot", "P")?;
        self.ensure_constraints(&phase).await?;
        let started = Instant::now();
        let report = crate::commands::snapshot::snapshot(
            &phase.cfg,
            &crate::commands::snapshot::SnapshotOptions {
                chunk_rows,
                restart: true,
                progress_bar: false,
            },
        )
        .await?;
        let snapshot_secs = started.elapsed().as_secs_f64();
        // The same rows, read and batched first, then written.
        let phase = wide_only("snapshot", "Q")?;
        self.ensure_constraints(&phase).await?;
        let mapping = std::sync::Arc::new(compile_mapping(&self.pg, &phase.cfg).await?);
        let mapper = Mapper::new(std::sync::Arc::clone(&mapping));
        let c = self.client();
        let pk = vec!["id".to_string()];
        let table =
            crate::pipeline::copy::describe_table(c, &format!("{SCHEMA}.wide"), &pk, &[]).await?;
        let mut batches = Vec::new();
        let mut after: Option<Vec<String>> = None;
        let stamp = self.wal_lsn().await?;
        loop {
            let chunk =
                crate::pipeline::copy::read_chunk(c, &table, after.as_deref(), chunk_rows).await?;
            let Some(last) = chunk.last().map(|r| r.1.clone()) else {
                break;
            };
            let mut batcher = Batcher::new();
            let n = chunk.len();
            for (change, _) in chunk {
                let mut ops = Vec::new();
                mapper.map_change(&change, stamp, &mut ops)?;
                batcher.push_transaction(vec![ops], crate::lsn::Lsn::ZERO);
            }
            batches.push(batcher.take(&mapping));
            after = Some(last);
            if n < chunk_rows {
                break;
            }
        }
        let sink = Sink::connect(&phase.cfg.neo4j, &phase.cfg.postgres.slot).await?;
        let started = Instant::now();
        for b in &batches {
            sink.apply_with(b, neo4rs::query("RETURN 1")).await?;
        }
        let prebuilt_secs = started.elapsed().as_secs_f64();
        Ok(vec![
            Measurement {
                name: "snapshot".into(),
                settings: format!("{rows} rows, chunks of {chunk_rows}"),
                changes: report.rows,
                seconds: snapshot_secs,
                changes_per_sec: report.rows as f64 / snapshot_secs,
                ..Measurement::default()
            },
            Measurement {
                name: "snapshot rows as pre-built batches".into(),
                settings: format!("{} batches of {chunk_rows}", batches.len()),
                changes: rows,
                seconds: prebuilt_secs,
                changes_per_sec: rows as f64 / prebuilt_secs,
                ..Measurement::default()
            },
        ])
    }

    /// One transaction of `rows` inserts, then walgraph through it.
    pub(super) async fn big_txn(&self, rows: u64) -> anyhow::Result<Measurement> {
        self.create_slot("big").await?;
        let phase = self.phase_config(
            "big",
            "Big",
            crate::config::BatchConfig::default().max_changes,
            Duration::from_millis(100),
        )?;
        self.ensure_constraints(&phase).await?;
        let row = self
            .client()
            .query_one(
                &format!("SELECT coalesce(max(id), 0) FROM {SCHEMA}.items"),
                &[],
            )
            .await?;
        let first: i64 = row.try_get::<_, i64>(0)? + 1;
        let payload = "x".repeat(self.opts.width);
        self.client()
            .batch_execute(&format!(
                "INSERT INTO {SCHEMA}.items SELECT g, NULL, g, '{payload}' FROM generate_series({first}::bigint, {}) g",
                first + rows as i64 - 1
            ))
            .await?;
        let mut m = self.drain_child(&phase, false, rows, None).await?;
        m.name = "one huge transaction".into();
        m.settings = format!("{rows} rows, max_changes {}", phase.cfg.batch.max_changes);
        Ok(m)
    }
}

/// The commit-to-graph summary in `/metrics` text, in milliseconds: p50,
/// p95, p99 and the maximum.
/// The collections between two readings of [`Bench::neo4j_gc`].
fn gc_between(a: &[(String, u64, f64)], b: &[(String, u64, f64)]) -> super::report::Gc {
    let by_collector: Vec<(String, u64, f64)> = b
        .iter()
        .map(|(n, c, ms)| {
            let (c0, ms0) = a
                .iter()
                .find(|x| x.0 == *n)
                .map_or((0, 0.0), |x| (x.1, x.2));
            (n.clone(), c.saturating_sub(c0), (ms - ms0).max(0.0))
        })
        .collect();
    super::report::Gc {
        collections: by_collector.iter().map(|x| x.1).sum(),
        total_ms: by_collector.iter().map(|x| x.2).sum(),
        by_collector,
    }
}

/// The stage quantiles a `run` serves, in milliseconds.
fn stages_ms(metrics: &str) -> Vec<(String, [f64; 5])> {
    ["ready", "wait", "write"]
        .iter()
        .map(|stage| {
            let q = crate::metrics::QUANTILES.map(|q| {
                metric(
                    metrics,
                    &format!(
                        "walgraph_stage_since_start_seconds{{stage=\"{stage}\",quantile=\"{q}\"}}"
                    ),
                )
                .unwrap_or(f64::NAN)
                    * 1000.0
            });
            (stage.to_string(), q)
        })
        .collect()
}

fn latency_ms(metrics: &str) -> [f64; 4] {
    ["0.5", "0.95", "0.99", "1"].map(|q| {
        metric(
            metrics,
            &format!("walgraph_commit_to_graph_since_start_seconds{{quantile=\"{q}\"}}"),
        )
        .unwrap_or(f64::NAN)
            * 1000.0
    })
}
