//! The command line: `walgraph [--config FILE] <command>`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::catalog::PgClient;
use crate::config::Config;
use crate::pipeline;
use crate::sink::Sink;
use crate::source::ConnInfo;

/// Keeps a Neo4j graph exactly in step with a PostgreSQL database through
/// logical replication.
#[derive(Debug, Parser)]
#[command(name = "walgraph", version, about, long_about = None)]
pub struct Cli {
    /// The configuration file (TOML). Connection settings may also come from
    /// WALGRAPH_PG_URL, WALGRAPH_NEO4J_URI, WALGRAPH_NEO4J_USER and
    /// WALGRAPH_NEO4J_PASSWORD, which win over the file.
    #[arg(long, short, env = "WALGRAPH_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the publication, the replication slot and the Neo4j uniqueness
    /// constraints. Safe to run again: says what it created and what it found.
    Setup,
    /// Load the rows the tables held before streaming began, read under a
    /// snapshot exported by a replication slot so the stream continues
    /// exactly where the copy ends. Copies in key order and chunks; when
    /// interrupted, running it again resumes after the last chunk written.
    /// Run it after `setup` and before `run`.
    Snapshot {
        /// Rows per chunk; each chunk is one Neo4j transaction.
        #[arg(long, default_value_t = 10_000)]
        chunk_rows: usize,
        /// Start over, even if a snapshot already finished or is half done.
        #[arg(long)]
        restart: bool,
    },
    /// Apply the transactions between two positions again, from WAL the
    /// slot still holds (see postgres.replay_window_mib). Idempotent: a node
    /// or relationship already changed by a later transaction keeps that
    /// state. Leaves the slot and the checkpoint where they are. Stop
    /// `walgraph run` first.
    Replay {
        /// Apply transactions that end after this position (like 0/16B3748).
        #[arg(long, value_parser = parse_lsn)]
        from: crate::lsn::Lsn,
        /// ...and at or before this one (default: the checkpoint, i.e. what
        /// the graph already holds).
        #[arg(long, value_parser = parse_lsn)]
        to: Option<crate::lsn::Lsn>,
    },
    /// Compare the rows of the mapped tables with the graph: node tables with
    /// their nodes and foreign-key relationships, join tables with their
    /// edges (missing, extra, changed), in key order and chunks, with a
    /// progress bar on a terminal; with --repair, fix the graph from
    /// Postgres. Exits 1 when something differs and --repair was not given.
    Reconcile {
        /// Only report (the default).
        #[arg(long, conflicts_with = "repair")]
        dry_run: bool,
        /// Fix the differences in the graph.
        #[arg(long)]
        repair: bool,
        /// Only this table (schema-qualified, as in the mapping).
        #[arg(long)]
        table: Option<String>,
        /// Rows compared per chunk.
        #[arg(long, default_value_t = 5_000)]
        chunk_rows: usize,
        /// Print JSON for scripts instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stream changes into Neo4j until stopped (SIGINT or SIGTERM).
    Run {
        /// Benchmarks only: decode, map and batch, then drop the batches
        /// instead of writing them, and confirm them to Postgres. This
        /// consumes the slot: the graph misses every change it reads.
        #[arg(long)]
        null_sink: bool,
    },
    /// Print the decoded transactions as JSON lines, writing nowhere and (by
    /// default) confirming nothing, so the slot stays where it was.
    Peek {
        /// Read from a temporary slot created now (sees only new changes)
        /// instead of the configured slot.
        #[arg(long)]
        temporary: bool,
        /// Stop after this many transactions.
        #[arg(long)]
        limit: Option<usize>,
        /// Stop after this long without a new transaction (like `5s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        idle_timeout: Option<std::time::Duration>,
        /// Confirm what was printed, advancing the slot (walgraph `run` will
        /// then not see those transactions).
        #[arg(long)]
        confirm: bool,
        /// Show two-phase transactions at PREPARE time (protocol 3+); on a
        /// non-temporary slot this turns two-phase decoding on for good.
        #[arg(long)]
        two_phase: bool,
    },
    /// Show the slot's position and lag, the checkpoint in Neo4j, and how
    /// many nodes and relationships each mapped label and type has.
    Status {
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// Also show up to this many nodes of each label and relationships of each type.
        #[arg(long, default_value_t = 0)]
        sample: usize,
    },
    /// Measure throughput, latency, CPU and memory on a generated workload,
    /// against pg_recvlogical, one Neo4j transaction per change and
    /// pre-built batches, in its own schema, slots and labels (removed at
    /// the end). Uses the configured connections; ignores the mapping.
    Bench(crate::bench::BenchOptions),
    /// Work with the mapping.
    Mapping {
        /// What to do.
        #[command(subcommand)]
        command: MappingCommand,
    },
    /// Drop the replication slot and the publication (a forgotten slot makes
    /// Postgres keep WAL forever and fills its disk).
    Teardown {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Also delete walgraph's checkpoint for this slot from Neo4j (do
        /// this before pointing walgraph at another database).
        #[arg(long)]
        drop_checkpoint: bool,
    },
}

/// `walgraph mapping …`.
#[derive(Debug, Subcommand)]
pub enum MappingCommand {
    /// Print a mapping inferred from the catalog: every table with a primary
    /// key a label, every foreign key a relationship, every table whose
    /// primary key is two foreign keys a relationship whose rows are edges.
    Infer {
        /// The schema to read.
        #[arg(long, default_value = "public")]
        schema: String,
    },
}

/// Runs a parsed command line.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Setup => {
            for line in setup(&cfg).await? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Run { null_sink } => run(&cfg, null_sink).await,
        Command::Reconcile {
            dry_run: _,
            repair,
            table,
            chunk_rows,
            json,
        } => {
            let opts = crate::reconcile::ReconcileOptions {
                table,
                repair,
                chunk_rows: chunk_rows.max(1),
                progress_bar: crate::snapshot::stderr_is_terminal(),
            };
            let reports = crate::reconcile::reconcile(&cfg, &opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                print!("{}", crate::reconcile::render(&reports));
            }
            let differ = reports.iter().filter(|r| r.differs()).count();
            if differ > 0 && !repair {
                anyhow::bail!(
                    "{differ} table(s) differ from Postgres; run `walgraph reconcile --repair` to fix the graph"
                );
            }
            Ok(())
        }
        Command::Replay { from, to } => {
            let to = match to {
                Some(to) => to,
                None => Sink::connect(&cfg.neo4j, &cfg.postgres.slot)
                    .await?
                    .read_checkpoint()
                    .await?
                    .map(|c| c.lsn)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "there is no checkpoint for slot {} yet, so nothing to replay up to; give --to",
                            cfg.postgres.slot
                        )
                    })?,
            };
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                wait_for_signal().await;
                let _ = tx.send(true);
            });
            let n = pipeline::replay(&cfg, pipeline::ReplayRange { from, to }, rx).await?;
            println!("replayed {n} changes of the transactions ending after {from} and at or before {to}");
            Ok(())
        }
        Command::Snapshot {
            chunk_rows,
            restart,
        } => {
            let opts = crate::snapshot::SnapshotOptions {
                chunk_rows,
                restart,
                progress_bar: crate::snapshot::stderr_is_terminal(),
            };
            let r = crate::snapshot::snapshot(&cfg, &opts).await?;
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
        Command::Bench(opts) => {
            let report = crate::bench::bench(&cfg, &opts).await?;
            print!("{}", crate::bench::render(&report));
            if let Some(path) = &opts.json {
                std::fs::write(path, serde_json::to_string_pretty(&report)?).map_err(|e| {
                    anyhow::anyhow!("cannot write the report to {}: {e}", path.display())
                })?;
            }
            Ok(())
        }
        Command::Peek {
            temporary,
            limit,
            idle_timeout,
            confirm,
            two_phase,
        } => {
            let opts = crate::peek::PeekOptions {
                slot: (!temporary).then(|| cfg.postgres.slot.clone()),
                publications: vec![cfg.postgres.publication.clone()],
                proto_version: cfg.postgres.proto_version,
                streaming: cfg.postgres.streaming,
                two_phase,
                spill: cfg.postgres.spill(),
                limit,
                idle_timeout,
                confirm,
            };
            let mut out = std::io::stdout();
            crate::peek::peek(&conninfo(&cfg)?, &opts, &mut out, wait_for_signal()).await?;
            Ok(())
        }
        Command::Status { json, sample } => {
            let s = crate::status::collect(&cfg, sample).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", crate::status::render(&s));
            }
            Ok(())
        }
        Command::Mapping {
            command: MappingCommand::Infer { schema },
        } => {
            let pg = PgClient::connect(&conninfo(&cfg)?).await?;
            let tables = crate::infer::read_schema(&pg, &schema).await?;
            if tables.is_empty() {
                anyhow::bail!("schema {schema} has no tables; name another with --schema");
            }
            print!("{}", crate::infer::render(&schema, &tables));
            Ok(())
        }
        Command::Teardown {
            yes,
            drop_checkpoint,
        } => teardown(&cfg, yes, drop_checkpoint).await,
    }
}

fn conninfo(cfg: &Config) -> anyhow::Result<ConnInfo> {
    Ok(ConnInfo::parse(cfg.postgres.url.as_deref().unwrap_or(""))?)
}

/// Creates (or finds) the publication, the slot and the Neo4j constraints;
/// returns one line for each thing created or found.
pub async fn setup(cfg: &Config) -> anyhow::Result<Vec<String>> {
    let info = conninfo(cfg)?;
    let pg = PgClient::connect(&info).await?;
    pg.check_wal_level().await?;
    // Check everything before changing anything.
    let mapping = pipeline::compile_mapping(&pg, cfg).await?;
    let sink = Sink::connect(&cfg.neo4j, &cfg.postgres.slot).await?;
    let mut lines = vec![
        pg.ensure_publication(&cfg.postgres.publication, &mapping.table_names())
            .await?,
        pg.ensure_slot(&cfg.postgres.slot).await?,
    ];
    let created = sink.ensure_schema(&mapping).await?;
    lines.push(if created.is_empty() {
        "Neo4j constraints and indexes already present".to_string()
    } else {
        format!(
            "created Neo4j constraints and indexes: {}",
            created.join(", ")
        )
    });
    Ok(lines)
}

async fn run(cfg: &Config, null_sink: bool) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    let metrics = std::sync::Arc::new(crate::http::Metrics::default());
    if let Some(addr) = cfg.http.listen {
        let listener = crate::http::bind(addr).await?;
        tracing::info!(%addr, "serving /health, /ready and /metrics");
        tokio::spawn(crate::http::serve(
            listener,
            std::sync::Arc::clone(&metrics),
            rx.clone(),
        ));
    }
    if null_sink {
        tracing::warn!("null sink: changes are read, confirmed and dropped; the graph misses them");
    }
    pipeline::run_with(cfg, rx, metrics, null_sink).await?;
    Ok(())
}

fn parse_lsn(s: &str) -> Result<crate::lsn::Lsn, String> {
    s.parse::<crate::lsn::Lsn>()
        .map_err(|e| format!("{e} (an LSN looks like 0/16B3748)"))
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn teardown(cfg: &Config, yes: bool, drop_checkpoint: bool) -> anyhow::Result<()> {
    let slot = &cfg.postgres.slot;
    let publication = &cfg.postgres.publication;
    if !yes {
        use std::io::{BufRead, IsTerminal, Write};
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("teardown drops slot {slot} and publication {publication}; pass --yes to confirm when not at a terminal");
        }
        print!("drop replication slot {slot} and publication {publication}? [y/N] ");
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing dropped");
            return Ok(());
        }
    }
    let pg = PgClient::connect(&conninfo(cfg)?).await?;
    if let Some(s) = pg.slot(slot).await? {
        if s.active {
            anyhow::bail!("replication slot {slot} is in use by a running walgraph (or another consumer); stop it first");
        }
    }
    println!(
        "{}",
        if pg.drop_slot(slot).await? {
            format!("dropped replication slot {slot}")
        } else {
            format!("replication slot {slot} did not exist")
        }
    );
    println!(
        "{}",
        if pg.drop_publication(publication).await? {
            format!("dropped publication {publication}")
        } else {
            format!("publication {publication} did not exist")
        }
    );
    if drop_checkpoint {
        let sink = Sink::connect(&cfg.neo4j, slot).await?;
        println!(
            "{}",
            if sink.drop_checkpoint().await? {
                format!("deleted the checkpoint of slot {slot} from Neo4j")
            } else {
                format!("Neo4j had no checkpoint for slot {slot}")
            }
        );
    }
    Ok(())
}
