//! The last warnings and errors walgraph logged, for the status page: a
//! `tracing` layer keeps the newest [`KEEP`] in memory.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// How many are kept.
pub const KEEP: usize = 50;

/// One warning or error.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `WARN` or `ERROR`.
    pub level: String,
    /// The message and its fields.
    pub text: String,
}

static RECENT: Mutex<VecDeque<Entry>> = Mutex::new(VecDeque::new());

/// The newest first.
pub fn entries() -> Vec<Entry> {
    RECENT
        .lock()
        .map(|r| r.iter().rev().cloned().collect())
        .unwrap_or_default()
}

/// The layer that records them.
#[derive(Debug, Default)]
pub struct RecentLayer;

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for RecentLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        if let Ok(mut r) = RECENT.lock() {
            if r.len() == KEEP {
                r.pop_front();
            }
            r.push_back(Entry {
                at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                level: level.to_string(),
                text: text.0,
            });
        }
    }
}
