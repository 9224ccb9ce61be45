//! Retrying what may succeed later: one backoff for every stage, and one
//! loop for idempotent operations.
//!
//! Invariant: only errors that say they are transient ([`Transient`]) are
//! retried; every other error returns at once, so a permanent failure is
//! never hidden behind retries.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

/// An error that knows whether trying again later may succeed.
pub trait Transient {
    /// Whether trying again later may succeed.
    fn is_transient(&self) -> bool;
}

/// Exponential backoff with full jitter, capped.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(200);
    let cap = Duration::from_secs(15);
    let exp = base.saturating_mul(1u32 << attempt.min(10)).min(cap);
    let jitter = fastrand::u64(0..=u64::try_from(exp.as_millis()).unwrap_or(u64::MAX));
    Duration::from_millis(jitter.max(50))
}

/// Runs `f` again after a transient failure, with backoff, up to five
/// times; for idempotent operations only.
pub async fn retry_transient<T, E, Fut>(
    what: &'static str,
    mut f: impl FnMut() -> Fut,
) -> Result<T, E>
where
    E: Transient + Display,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0u32;
    loop {
        match f().await {
            Err(e) if e.is_transient() && attempt < 5 => {
                let wait = backoff(attempt);
                attempt += 1;
                tracing::warn!(error = %e, attempt, retry_in = ?wait, "{what}");
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}
