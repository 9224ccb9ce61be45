//! How many changes the next batch may hold: `batch.max_changes` while
//! walgraph keeps up, more while it is behind and larger batches are
//! measured to write faster.
//!
//! Invariants:
//! - the limit is always within `[floor, ceiling]` (`batch.max_changes`,
//!   `batch.max_changes_behind`); with the two equal it never moves;
//! - it only grows while batches are full — the stream had more waiting
//!   than a batch could take — and committed within `batch.commit_target`,
//!   and only after measuring that twice the size writes faster: the limit
//!   alternates between the two sizes, batch by batch (so a Neo4j that
//!   slows as its store grows slows both alike), until each has
//!   [`PROBE_BATCHES`] batches, and the larger is taken when its median
//!   Neo4j time per change is at least [`GAIN`] below the smaller's;
//! - a larger size that did not pay leaves the smaller one, kept for
//!   [`SETTLE_BATCHES`] batches before the larger is tried again;
//! - a commit slower than the target halves it, and a batch that was not
//!   full (walgraph caught up) brings it back to the floor.
//!
//! A caught-up stream is not slowed by a large limit: its batches go out
//! when `batch.max_delay` runs out, whatever the limit. The limit only
//! matters when changes wait (docs/configuration.md, `[batch]`).

use std::time::Duration;

/// Batches measured at each of the two sizes compared.
pub const PROBE_BATCHES: usize = 3;
/// How much cheaper per change the larger size must write.
pub const GAIN: f64 = 0.03;
/// Batches kept at a settled size before a larger one is tried again.
pub const SETTLE_BATCHES: usize = 100;

/// The adaptive batch limit.
#[derive(Debug, Clone)]
pub struct BatchSize {
    floor: usize,
    ceiling: usize,
    target: Duration,
    /// The size settled on (or the smaller of the two compared).
    level: usize,
    limit: usize,
    /// Microseconds per change of full batches at `level` and at twice it.
    small: Vec<f64>,
    large: Vec<f64>,
    /// Batches left before growing is tried again (0: free to grow).
    settled: usize,
}

impl BatchSize {
    /// Starts at `floor`; `ceiling` below `floor` is taken as `floor`.
    pub fn new(floor: usize, ceiling: usize, target: Duration) -> Self {
        let floor = floor.max(1);
        BatchSize {
            floor,
            ceiling: ceiling.max(floor),
            target,
            level: floor,
            limit: floor,
            small: Vec::new(),
            large: Vec::new(),
            settled: 0,
        }
    }

    /// Changes the batch filling now may take.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The largest limit it can reach.
    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// A batch of `changes` committed in `took`; `full` when it went out
    /// because it had reached the limit it filled under (more was
    /// waiting), which may not be the limit now.
    pub fn committed(&mut self, changes: usize, full: bool, took: Duration) {
        let before = self.limit;
        if !full {
            self.settle(self.floor, 0);
        } else if took > self.target {
            self.settle((self.level.min(self.limit) / 2).max(self.floor), 0);
        } else if self.settled > 0 {
            self.settled -= 1;
        } else if self.level < self.ceiling {
            let larger = self.level.saturating_mul(2).min(self.ceiling);
            // A batch counts for the size it was filled to.
            let us = took.as_secs_f64() * 1e6 / changes.max(1) as f64;
            if changes >= larger {
                self.large.push(us);
            } else if changes >= self.level {
                self.small.push(us);
            }
            if self.small.len() >= PROBE_BATCHES && self.large.len() >= PROBE_BATCHES {
                let (small, large) = (median(&mut self.small), median(&mut self.large));
                if large <= small * (1.0 - GAIN) {
                    self.settle(larger, 0);
                } else {
                    self.settle(self.level, SETTLE_BATCHES);
                }
            } else {
                // Alternate, the one with fewer batches next.
                self.limit = if self.large.len() < self.small.len() {
                    larger
                } else {
                    self.level
                };
            }
        }
        if self.limit != before {
            tracing::debug!(
                from = before,
                to = self.limit,
                changes,
                full,
                took_ms = took.as_millis() as u64,
                "batch limit"
            );
        }
    }

    fn settle(&mut self, level: usize, batches: usize) {
        self.level = level;
        self.limit = level;
        self.small.clear();
        self.large.clear();
        self.settled = batches;
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TARGET: Duration = Duration::from_secs(1);

    /// Commits full batches at the limit, at `us` microseconds per change
    /// for a batch of `n`, until the limit has stayed put for a while.
    fn settle(s: &mut BatchSize, us: impl Fn(usize) -> f64) -> Vec<usize> {
        let mut seen = vec![s.limit()];
        for _ in 0..60 {
            let n = s.limit();
            s.committed(n, true, Duration::from_secs_f64(us(n) * n as f64 / 1e6));
            if seen.last() != Some(&s.limit()) {
                seen.push(s.limit());
            }
        }
        seen
    }

    #[test]
    fn a_backlog_grows_the_limit_while_larger_batches_write_faster() {
        let mut s = BatchSize::new(5000, 50_000, TARGET);
        // Ever cheaper per change, and every batch within the target.
        let seen = settle(&mut s, |n| 10.0 + 200_000.0 / n as f64);
        // Each size is tried against twice it, then kept; 50,000 at last.
        assert!(seen.windows(2).all(|w| w[1] <= 2 * w[0]));
        assert_eq!(seen.last(), Some(&50_000));
        assert_eq!(s.limit(), 50_000);
    }

    #[test]
    fn a_size_that_does_not_write_faster_is_left_for_the_one_below() {
        let mut s = BatchSize::new(5000, 50_000, TARGET);
        // Cheaper up to 10,000 a batch, dearer beyond.
        let us = |n: usize| {
            if n <= 10_000 {
                30.0 - n as f64 / 1000.0
            } else {
                35.0
            }
        };
        let mut limits = Vec::new();
        for _ in 0..(SETTLE_BATCHES + 40) {
            let n = s.limit();
            limits.push(n);
            s.committed(n, true, Duration::from_secs_f64(us(n) * n as f64 / 1e6));
        }
        // 5,000 against 10,000, then 10,000 against 20,000 (PROBE_BATCHES
        // of each), then 10,000 for SETTLE_BATCHES, then 20,000 again.
        assert!(limits.iter().all(|&n| n <= 20_000));
        let twenty = limits.iter().position(|&n| n == 20_000).unwrap();
        assert!(limits[..twenty].iter().all(|&n| n == 5000 || n == 10_000));
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &n in &limits[twenty..] {
            match runs.last_mut() {
                Some((m, k)) if *m == n => *k += 1,
                _ => runs.push((n, 1)),
            }
        }
        let settled = runs.iter().position(|&(_, k)| k >= SETTLE_BATCHES).unwrap();
        assert_eq!(runs[settled].0, 10_000);
        let probed: usize = runs[..settled]
            .iter()
            .filter(|r| r.0 == 20_000)
            .map(|r| r.1)
            .sum();
        assert_eq!(probed, PROBE_BATCHES);
        assert_eq!(runs.get(settled + 1).map(|r| r.0), Some(20_000));
    }

    #[test]
    fn sizes_are_compared_batch_by_batch_so_a_neo4j_warming_up_does_not_decide() {
        // Neo4j gets 2 % faster per batch whatever the size, and twice the
        // size costs the same per change: growing must not be taken. (Six
        // batches of the smaller size and then six of the larger would see
        // the larger 6 % cheaper.)
        let mut s = BatchSize::new(5000, 50_000, TARGET);
        let mut pace = 1.0f64;
        for _ in 0..(2 * PROBE_BATCHES + 2) {
            let n = s.limit();
            s.committed(
                n,
                true,
                Duration::from_secs_f64(20.0 * pace * n as f64 / 1e6),
            );
            pace *= 0.98;
        }
        assert_eq!(s.limit(), 5000);
    }

    #[test]
    fn slow_commits_and_a_caught_up_stream_bring_it_back_down() {
        let mut s = BatchSize::new(5000, 50_000, TARGET);
        settle(&mut s, |n| 10.0 + 200_000.0 / n as f64);
        assert_eq!(s.limit(), 50_000);
        s.committed(50_000, true, Duration::from_secs(3));
        assert_eq!(s.limit(), 25_000);
        s.committed(800, false, Duration::from_millis(20));
        assert_eq!(s.limit(), 5000);
    }

    #[test]
    fn equal_bounds_are_a_fixed_size() {
        let mut s = BatchSize::new(2000, 2000, TARGET);
        assert_eq!(settle(&mut s, |_| 1.0), [2000]);
        s.committed(2000, true, Duration::from_secs(3));
        s.committed(3, false, Duration::ZERO);
        assert_eq!(s.limit(), 2000);
        assert_eq!(BatchSize::new(2000, 10, TARGET).ceiling(), 2000);
        assert_eq!(BatchSize::new(0, 0, TARGET).limit(), 1);
    }

    proptest! {
        #[test]
        fn the_limit_stays_within_its_bounds(
            floor in 1usize..20_000,
            extra in 0usize..100_000,
            commits in proptest::collection::vec((0usize..200_000, any::<bool>(), 0u64..3000), 0..200),
        ) {
            let mut s = BatchSize::new(floor, floor + extra, TARGET);
            for (changes, full, ms) in commits {
                let before = s.limit();
                let took = Duration::from_millis(ms);
                s.committed(changes, full, took);
                prop_assert!(s.limit() >= floor && s.limit() <= floor + extra);
                if s.limit() > before {
                    prop_assert!(full && took <= TARGET);
                }
            }
        }
    }
}
