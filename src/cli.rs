//! The command line: `walgraph [--config FILE] <command>`.
//!
//! Invariant: only parsing and dispatch live here; each command's work is in
//! [`crate::commands`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::commands;
use crate::config::Config;

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

    /// How log lines look on stderr: `text` (colour only at a terminal) or
    /// `json` (one object per line, for log shippers).
    #[arg(
        long,
        env = "WALGRAPH_LOG_FORMAT",
        global = true,
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The shape of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the publication, the slot and the Neo4j constraints.
    ///
    /// Creates the publication, the replication slot and the Neo4j
    /// uniqueness constraints. Safe to run again: says what it created and
    /// what it found.
    Setup,
    /// Load the rows the tables held before streaming began.
    ///
    /// Reads them under a snapshot exported by a replication slot, so the stream continues
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
    /// Apply the transactions between two positions again.
    ///
    /// Reads them from WAL the slot still holds (see
    /// postgres.replay_window_mib). Idempotent: a node
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
    /// Compare the mapped tables with the graph, and repair it on request.
    ///
    /// Compares node tables with their nodes and foreign-key relationships, join tables with their
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
    /// Stream changes into Neo4j until stopped.
    ///
    /// Runs until SIGINT or SIGTERM; SIGHUP reloads the configuration.
    Run {
        /// Benchmarks only: decode, map and batch, then drop the batches
        /// instead of writing them, and confirm them to Postgres. This
        /// consumes the slot: the graph misses every change it reads.
        #[arg(long)]
        null_sink: bool,
    },
    /// Print the decoded transactions as JSON lines.
    ///
    /// Writes nowhere and (by default) confirms nothing, so the slot stays
    /// where it was.
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
        /// Show two-phase transactions at PREPARE time (protocol 3+). Only
        /// with --temporary: it would turn two-phase decoding on for good on
        /// walgraph's own slot.
        #[arg(long)]
        two_phase: bool,
        /// Leave logical messages (`pg_logical_emit_message`) out; every
        /// slot gets all of them, whatever its publications.
        #[arg(long)]
        no_messages: bool,
        /// Also print a line for each streamed transaction that rolled back
        /// (`{"rolled_back":{…}}`, with the abort's LSN and time on
        /// PostgreSQL 16+); these lines count towards --limit.
        #[arg(long)]
        rollbacks: bool,
    },
    /// Show the slot, the lag, the checkpoint and the graph's counts.
    ///
    /// Shows the slot's position and lag, the checkpoint in Neo4j, and how
    /// many nodes and relationships each mapped label and type has.
    Status {
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        /// Also show up to this many nodes of each label and relationships of each type.
        #[arg(long, default_value_t = 0)]
        sample: usize,
    },
    /// Measure throughput, latency, CPU and memory.
    ///
    /// Runs a generated workload against pg_recvlogical, one Neo4j transaction per change and
    /// pre-built batches, in its own schema, slots and labels (removed at
    /// the end). Uses the configured connections; ignores the mapping.
    Bench(Box<commands::bench::BenchOptions>),
    /// Work with the mapping.
    Mapping {
        /// What to do.
        #[command(subcommand)]
        command: MappingCommand,
    },
    /// Drop the replication slot and the publication.
    ///
    /// A forgotten slot makes Postgres keep WAL forever and fills its disk.
    Teardown {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Also delete walgraph's checkpoint for this slot from Neo4j (do
        /// this before pointing walgraph at another database).
        #[arg(long)]
        drop_checkpoint: bool,
    },
    /// Print a shell completion script.
    ///
    /// For example `walgraph completions bash > /etc/bash_completion.d/walgraph`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), generated from these definitions.
    ///
    /// For example `walgraph man > walgraph.1 && man -l walgraph.1`.
    Man,
}

/// `walgraph mapping …`.
#[derive(Debug, Subcommand)]
pub enum MappingCommand {
    /// Print a mapping inferred from the catalog.
    ///
    /// Every table with a primary key becomes a label, every foreign key a relationship, every table whose
    /// primary key is two foreign keys a relationship whose rows are edges.
    Infer {
        /// The schema to read.
        #[arg(long, default_value = "public")]
        schema: String,
    },
}

/// Runs a parsed command line.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    // These need no configuration.
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "walgraph",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Command::Man => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut std::io::stdout())?;
            return Ok(());
        }
        _ => {}
    }
    let cfg = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Setup => commands::setup::command(&cfg).await,
        Command::Run { null_sink } => {
            commands::run::command(&cfg, cli.config.as_deref(), null_sink).await
        }
        Command::Reconcile {
            dry_run: _,
            repair,
            table,
            chunk_rows,
            json,
        } => {
            let opts = commands::reconcile::ReconcileOptions {
                table,
                repair,
                chunk_rows: chunk_rows.max(1),
                progress_bar: commands::progress::stderr_is_terminal(),
            };
            commands::reconcile::command(&cfg, &opts, json).await
        }
        Command::Replay { from, to } => commands::replay::command(&cfg, from, to).await,
        Command::Snapshot {
            chunk_rows,
            restart,
        } => {
            let opts = commands::snapshot::SnapshotOptions {
                chunk_rows,
                restart,
                progress_bar: commands::progress::stderr_is_terminal(),
            };
            commands::snapshot::command(&cfg, &opts).await
        }
        Command::Bench(opts) => commands::bench::command(&cfg, &opts).await,
        Command::Peek {
            temporary,
            limit,
            idle_timeout,
            confirm,
            two_phase,
            no_messages,
            rollbacks,
        } => {
            let opts = commands::peek::PeekOptions {
                slot: (!temporary).then(|| cfg.postgres.slot.clone()),
                publications: vec![cfg.postgres.publication.clone()],
                proto_version: cfg.postgres.proto_version,
                streaming: cfg.postgres.streaming,
                two_phase,
                messages: !no_messages,
                rollbacks,
                spill: cfg.postgres.spill(),
                limit,
                idle_timeout,
                confirm,
            };
            commands::peek::command(&cfg, &opts).await
        }
        Command::Status { json, sample } => commands::status::command(&cfg, sample, json).await,
        Command::Mapping {
            command: MappingCommand::Infer { schema },
        } => commands::infer::command(&cfg, &schema).await,
        Command::Teardown {
            yes,
            drop_checkpoint,
        } => commands::teardown::command(&cfg, yes, drop_checkpoint).await,
        // Answered above, before the configuration is read.
        Command::Completions { .. } | Command::Man => Ok(()),
    }
}

fn parse_lsn(s: &str) -> Result<crate::lsn::Lsn, String> {
    s.parse::<crate::lsn::Lsn>()
        .map_err(|e| format!("{e} (an LSN looks like 0/16B3748)"))
}
