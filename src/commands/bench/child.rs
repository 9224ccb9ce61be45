//! The processes the bench runs and watches: `walgraph run` children (their
//! metrics, CPU time and peak memory) and Postgres' own programs.
//!
//! Invariant: a child is stopped with SIGTERM (SIGKILL after 20 s) and
//! waited for, so its figures include its clean shutdown.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;

pub(super) use crate::http::{metric, scrape};

pub(super) async fn wait_ready(
    child: &mut tokio::process::Child,
    addr: &str,
    log: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Some(m) = scrape(addr).await {
            if metric(&m, "walgraph_ready") == Some(1.0) {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("walgraph run stopped ({status}): {}", tail(log));
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("walgraph run was not streaming after 60 s: {}", tail(log));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(super) async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

pub(super) fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().rev().take(3).collect::<Vec<_>>().join(" / ")
}

/// CPU seconds (user + system) and peak RSS in MiB of a live process.
pub(super) fn proc_stats(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state(0) … utime(11) stime(12), in USER_HZ (100/s).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(((utime + stime) / 100.0, hwm_kib / 1024.0))
}

pub(super) fn find_pg_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut found: Vec<PathBuf> = dirs
            .filter_map(Result::ok)
            .map(|d| d.path().join("bin").join(name))
            .filter(|p| p.exists())
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Ok(p);
        }
    }
    let in_path = std::process::Command::new(name).arg("--version").output();
    if in_path.is_ok() {
        return Ok(PathBuf::from(name));
    }
    bail!("{name} was not found (install the PostgreSQL client programs, or skip it with --skip recvlogical)")
}
