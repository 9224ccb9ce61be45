//! Progress of long commands (snapshot, reconcile): a bar on a terminal,
//! log lines every 5 seconds otherwise.
//!
//! Invariant: it only reports; what a command does never depends on it.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Reports progress on a terminal (a bar) or in the log (snapshot,
/// reconcile).
pub struct Progress {
    what: &'static str,
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    /// `what` names the command in log lines; `total` rows are expected,
    /// `already` of them done before; `bar` draws a bar instead of logging.
    pub fn new(what: &'static str, total: u64, already: u64, bar: bool) -> Self {
        let bar = bar.then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {human_pos}/{human_len} rows, {per_sec}, ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_position(already);
            b.reset_eta();
            b
        });
        Progress {
            what,
            bar,
            total,
            done: already,
            started: Instant::now(),
            last_log: Instant::now(),
        }
    }

    /// The table being worked on (shown with the bar).
    pub fn table(&self, name: &str) {
        if let Some(b) = &self.bar {
            b.set_message(name.to_string());
        }
    }

    /// `rows` more are done; `started_at` is the count this run began with
    /// (for the rate).
    pub fn add(&mut self, rows: u64, table: &str, started_at: u64) {
        self.done += rows;
        if let Some(b) = &self.bar {
            b.inc(rows);
            return;
        }
        if self.last_log.elapsed() >= Duration::from_secs(5) {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = (self.done - started_at) as f64 / secs;
            let left = self.total.saturating_sub(self.done) as f64;
            let eta = if rate > 0.0 { left / rate } else { 0.0 };
            tracing::info!(
                %table,
                rows = self.done,
                of = self.total,
                rows_per_sec = rate.round(),
                eta_secs = eta.round(),
                "{} progress",
                self.what
            );
        }
    }

    /// Leaves the finished bar on screen.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// Whether to draw a progress bar: stderr is a terminal.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
