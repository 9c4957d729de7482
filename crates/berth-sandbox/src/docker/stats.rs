//! A Docker box's usage: cpu, memory and pids as the engine reports them, disk use from the
//! box's disk (or its directory where the host has no loop devices), and OOM kills from the
//! memory cgroup of the container's init (also how an exec learns that it was OOM-killed).

use super::{engine_err, DockerBackend};
use crate::{Result, SandboxError, Stats};
use bollard::query_parameters::StatsOptionsBuilder;
use futures::StreamExt;
use std::path::Path;

impl DockerBackend {
    /// [`crate::Sandbox::stats`] of box `id`.
    pub(super) async fn box_stats(&self, id: &str) -> Result<Stats> {
        let b = self.get_running(id)?;
        let opts = StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        let s = self
            .docker
            .stats(&b.container, Some(opts))
            .next()
            .await
            .ok_or_else(|| SandboxError::Unreachable("no stats from the engine".into()))?
            .map_err(engine_err)?;
        let (root, quota) = (b.workspace(), b.quota);
        let used = tokio::task::spawn_blocking(move || {
            if quota {
                crate::fsops::disk_usage(&root).map(|(u, _)| u).unwrap_or(0)
            } else {
                dir_usage(&root)
            }
        })
        .await
        .map_err(crate::blocking_err)?;
        let mem = s.memory_stats.as_ref();
        Ok(Stats {
            cpu_usage_ns: s
                .cpu_stats
                .and_then(|c| c.cpu_usage)
                .and_then(|u| u.total_usage)
                .unwrap_or(0),
            memory_bytes: mem.and_then(|m| m.usage).unwrap_or(0),
            memory_limit_bytes: b.limits.memory_mib << 20,
            pids: s.pids_stats.and_then(|p| p.current).unwrap_or(0),
            pids_limit: b.limits.pids,
            disk_used_bytes: used,
            disk_limit_bytes: b.limits.disk_mib << 20,
            oom_kills: oom_kill_count(b.pid.load(std::sync::atomic::Ordering::SeqCst)),
        })
    }
}

/// OOM kills in the memory cgroup of the process `pid` (the container's init), read from the
/// cgroup files (v1 `memory.oom_control`, v2 `memory.events`).
pub(super) fn oom_kill_count(pid: i32) -> u64 {
    let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return 0;
    };
    let keyed = |file: String| -> Option<u64> {
        std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|v| v.trim().parse().ok())
        })
    };
    for line in cg.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let n = if controllers.split(',').any(|c| c == "memory") {
            keyed(format!("/sys/fs/cgroup/memory{path}/memory.oom_control"))
        } else if controllers.is_empty() {
            keyed(format!("/sys/fs/cgroup{path}/memory.events"))
        } else {
            None
        };
        if let Some(n) = n {
            return n;
        }
    }
    0
}

/// Bytes used by files under `root` (not following symlinks).
fn dir_usage(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}
