//! The `walgraph` binary: parses the command line, sets up logging and hands
//! over to the library. Errors print as one sentence and exit non-zero.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = walgraph::cli::Cli::parse();
    let filter = EnvFilter::try_from_env("WALGRAPH_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,neo4rs=warn"));
    // The status page shows the last warnings and errors.
    let logs = tracing_subscriber::registry()
        .with(filter)
        .with(walgraph::recent::RecentLayer);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match cli.log_format {
        walgraph::cli::LogFormat::Json => logs.with(lines.json().with_current_span(true)).init(),
        // Colour only for a person at a terminal, never in a file or pipe.
        walgraph::cli::LogFormat::Text => logs
            .with(lines.with_ansi(std::io::stderr().is_terminal()))
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walgraph: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(walgraph::cli::dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walgraph: {}", walgraph::error_sentence(&e));
            ExitCode::FAILURE
        }
    }
}
