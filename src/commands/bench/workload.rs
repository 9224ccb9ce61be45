//! The generated workload: row changes written to `walgraph_bench.items` in
//! transactions of a given size and mix, optionally paced to a rate.
//!
//! Invariant: it writes only to its own schema.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{Bench, Workload, SCHEMA};

impl Bench {
    /// Writes `changes` row changes in transactions of `changes_per_txn`,
    /// paced to `rate` changes per second when given. Returns what it wrote.
    pub(super) async fn write_workload(
        &self,
        changes: u64,
        mix: [u64; 3],
        pace: Option<u64>,
    ) -> anyhow::Result<Workload> {
        let opts = &self.opts;
        let c = self.client();
        let row = c
            .query_one(
                &format!("SELECT coalesce(max(id), 0) FROM {SCHEMA}.items"),
                &[],
            )
            .await?;
        let mut next_id: i64 = row.try_get::<_, i64>(0)? + 1;
        let rows = c
            .query(&format!("SELECT id FROM {SCHEMA}.items"), &[])
            .await?;
        let mut live: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut rng = fastrand::Rng::with_seed(42 + next_id as u64);
        let mut w = Workload::default();
        let per_txn = opts.changes_per_txn;
        let groups = opts.groups.max(1) as i64;
        let density = (opts.rel_density * 1000.0).round() as i64;
        let payload = "x".repeat(opts.width);
        let started = Instant::now();
        let mut done = 0u64;
        let sum: u64 = mix.iter().sum();
        let mut txn_no = 0u64;
        while done < changes {
            let n = per_txn.min(changes - done);
            let mut ins = 0u64;
            let mut upd: Vec<i64> = Vec::new();
            let mut del: Vec<i64> = Vec::new();
            // Positions in `live` touched by this transaction.
            let mut picked: HashSet<usize> = HashSet::new();
            let mut del_at: Vec<usize> = Vec::new();
            for _ in 0..n {
                let r = rng.u64(0..sum);
                let kind = if r < mix[0] {
                    0
                } else if r < mix[0] + mix[1] {
                    1
                } else {
                    2
                };
                if kind == 0 || live.len() <= picked.len() + 1 {
                    ins += 1;
                    continue;
                }
                // A row not yet touched in this transaction.
                let mut i = rng.usize(0..live.len());
                while picked.contains(&i) {
                    i = rng.usize(0..live.len());
                }
                picked.insert(i);
                if kind == 1 {
                    upd.push(live[i]);
                } else {
                    del.push(live[i]);
                    del_at.push(i);
                }
            }
            let first = next_id;
            next_id += ins as i64;
            let grp = |id: &str| {
                format!("CASE WHEN ({id} * 7919) % 1000 < {density} THEN 1 + ({id} + {txn_no}) % {groups} END")
            };
            let mut sql = String::from("BEGIN;");
            if ins > 0 {
                sql.push_str(&format!(
                    "INSERT INTO {SCHEMA}.items SELECT g, {}, g, '{payload}' FROM generate_series({first}::bigint, {}) g;",
                    grp("g"),
                    next_id - 1
                ));
                live.extend(first..next_id);
            }
            if !upd.is_empty() {
                sql.push_str(&format!(
                    "UPDATE {SCHEMA}.items SET val = val + 1, grp = {} WHERE id = ANY('{{{}}}'::bigint[]);",
                    grp("id"),
                    join(&upd)
                ));
            }
            if !del.is_empty() {
                sql.push_str(&format!(
                    "DELETE FROM {SCHEMA}.items WHERE id = ANY('{{{}}}'::bigint[]);",
                    join(&del)
                ));
                // Highest position first, so each swap_remove leaves the
                // positions still to remove where they were.
                del_at.sort_unstable_by(|a, b| b.cmp(a));
                for i in del_at {
                    live.swap_remove(i);
                }
            }
            sql.push_str("COMMIT;");
            c.batch_execute(&sql).await?;
            w.inserts += ins;
            w.updates += upd.len() as u64;
            w.deletes += del.len() as u64;
            w.transactions += 1;
            done += n;
            txn_no += 1;
            if let Some(rate) = pace {
                let due = started + Duration::from_secs_f64(done as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
        }
        w.changes = w.inserts + w.updates + w.deletes;
        Ok(w)
    }
}

fn join(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}
