//! The box's cgroup, on cgroup v1 or v2 (whichever the host mounts; `cgroups-rs` probes it).
//!
//! Limits: memory (hard limit, swap included where the host accounts it), pids, and CPU as a
//! CFS quota of `cpus` × period, with a burst of up to one period's quota banked while idle.
//! Counters read for stats and exit reasons: CPU time, memory,
//! pids and the OOM-kill count.

use crate::Limits;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup, Controller, MaxValue};
use std::fs;
use std::path::PathBuf;

const CPU_PERIOD_US: u64 = 100_000;
const PARENT: &str = "berth";

pub struct BoxCgroup {
    cg: Cgroup,
    v2: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CgroupCounters {
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
    pub pids: u64,
    pub oom_kills: u64,
}

fn err(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("cgroup {what}: {e}"))
}

impl BoxCgroup {
    pub fn name_for(box_id: &str) -> String {
        format!("{PARENT}/{box_id}")
    }

    /// Create (or reuse, after a restart) the box's cgroup and apply its limits.
    pub fn create(box_id: &str, limits: &Limits) -> std::io::Result<BoxCgroup> {
        let hier = cgroups_rs::fs::hierarchies::auto();
        let v2 = hier.v2();
        let controllers = ["memory", "pids", "cpu", "cpuacct"]
            .iter()
            .filter(|c| !v2 || **c != "cpuacct")
            .map(|c| c.to_string())
            .collect();
        let cg =
            Cgroup::new_with_specified_controllers(hier, Self::name_for(box_id), Some(controllers))
                .map_err(|e| err("create", e))?;
        let me = BoxCgroup { cg, v2 };
        me.apply(limits)?;
        Ok(me)
    }

    /// Handle to an existing cgroup (adoption after a restart, clean-up of leftovers).
    pub fn load(box_id: &str) -> BoxCgroup {
        let hier = cgroups_rs::fs::hierarchies::auto();
        let v2 = hier.v2();
        let controllers = ["memory", "pids", "cpu", "cpuacct"]
            .iter()
            .filter(|c| !v2 || **c != "cpuacct")
            .map(|c| c.to_string())
            .collect();
        let cg = Cgroup::load_with_specified_controllers(hier, Self::name_for(box_id), controllers);
        BoxCgroup { cg, v2 }
    }

    fn apply(&self, limits: &Limits) -> std::io::Result<()> {
        let mem_bytes = (limits.memory_mib * 1024 * 1024) as i64;
        if let Some(mem) = self.cg.controller_of::<MemController>() {
            mem.set_limit(mem_bytes)
                .map_err(|e| err("memory limit", e))?;
            // v1 without swap accounting has no memsw files; that is fine.
            let _ = mem.set_memswap_limit(mem_bytes);
        } else {
            return Err(err("memory", "controller unavailable"));
        }
        if let Some(p) = self.cg.controller_of::<PidController>() {
            p.set_pid_max(MaxValue::Value(limits.pids as i64))
                .map_err(|e| err("pids limit", e))?;
        } else {
            return Err(err("pids", "controller unavailable"));
        }
        if let Some(c) = self.cg.controller_of::<CpuController>() {
            let quota = (limits.cpus * CPU_PERIOD_US as f64).round() as i64;
            let quota = quota.max(1000);
            // Each write of the period, the quota or the burst walks every task group on the
            // host (~0.4 ms each at 4,500 boxes): a new group has the kernel's default
            // period, ours, so the period is written only where it differs.
            let period = (c.cfs_period().ok() != Some(CPU_PERIOD_US)).then_some(CPU_PERIOD_US);
            c.set_cfs_quota_and_period(Some(quota), period)
                .map_err(|e| err("cpu quota", e))?;
            // A process starting in an idle box (an agent's CLI: a burst of work on several
            // threads) may spend the quota the box left unused, up to one period's worth,
            // above its `cpus`; over any longer stretch the box still gets `cpus` at most.
            // Kernels before 5.14 have no burst: the quota alone then.
            if let Err(e) = self.set_cpu_burst(quota as u64) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(err("cpu burst", e));
                }
            }
        }
        Ok(())
    }

    /// Let the box bank CPU time it left unused, up to `burst_us` per period (the kernel takes
    /// at most the quota), and spend it above its quota later (`cpu.cfs_burst_us` on v1,
    /// `cpu.max.burst` on v2). NotFound where the kernel has no burst.
    pub fn set_cpu_burst(&self, burst_us: u64) -> std::io::Result<()> {
        let name = if self.v2 {
            "cpu.max.burst"
        } else {
            "cpu.cfs_burst_us"
        };
        let f = self
            .file("cpu", name)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        fs::write(f, burst_us.to_string())
    }

    /// Set the box's CPU weight against its sibling boxes: `cpu.shares` on v1 (default 1024);
    /// on v2 `cpu.weight`, the same figure scaled (1024 shares ≈ weight 100).
    pub fn set_cpu_shares(&self, shares: u64) -> std::io::Result<()> {
        let (name, value) = shares_file(self.v2, shares);
        let f = self
            .file("cpu", name)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        fs::write(f, value.to_string())
    }

    /// The box's CPU weight, in v1 shares (v2's `cpu.weight` scaled back); `None` when
    /// unreadable.
    pub fn cpu_shares(&self) -> Option<u64> {
        read_shares(self.v2, &self.dir("cpu")?)
    }

    /// The cpu controller's directory of the box's parent (`berth/`, where every box sits):
    /// raising its weight lets the boxes together compete with the host's other groups.
    pub fn parent_cpu_dir(&self) -> Option<PathBuf> {
        Some(self.dir("cpu")?.parent()?.to_path_buf())
    }

    /// Times the box ran out of its CFS quota, and for how long it waited, in total (ns):
    /// `cpu.stat`'s `nr_throttled` and `throttled_time` (v1) or `throttled_usec` (v2).
    pub fn cpu_throttled_ns(&self) -> (u64, u64) {
        let n = self.read_keyed("cpu", "cpu.stat", "nr_throttled");
        let t = if self.v2 {
            self.read_keyed("cpu", "cpu.stat", "throttled_usec") * 1000
        } else {
            self.read_keyed("cpu", "cpu.stat", "throttled_time")
        };
        (n, t)
    }

    /// The files a single-threaded process writes `0` to in order to move itself into the
    /// box's cgroup, one per hierarchy: `tasks` on v1 (moving just the calling thread skips
    /// the kernel's global threadgroup lock, whose first taker waits for an RCU grace period,
    /// 5-8 ms here, unless another move happened just before), `cgroup.procs` on v2.
    pub fn join_files(&self) -> Vec<PathBuf> {
        let name = if self.v2 { "cgroup.procs" } else { "tasks" };
        let mut files: Vec<PathBuf> = ["memory", "pids", "cpu", "cpuacct"]
            .iter()
            .filter_map(|c| self.file(c, name))
            .collect();
        files.sort();
        files.dedup();
        files
    }

    fn dir(&self, controller: &str) -> Option<PathBuf> {
        let dir = match controller {
            "memory" => self.cg.controller_of::<MemController>()?.path(),
            "pids" => self.cg.controller_of::<PidController>()?.path(),
            "cpu" => self.cg.controller_of::<CpuController>()?.path(),
            "cpuacct" => self.cg.controller_of::<CpuAcctController>()?.path(),
            _ => return None,
        };
        Some(dir.to_path_buf())
    }

    fn file(&self, controller: &str, name: &str) -> Option<PathBuf> {
        Some(self.dir(controller)?.join(name))
    }

    fn read_u64(&self, controller: &str, name: &str) -> u64 {
        self.file(controller, name)
            .and_then(|p| fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn read_keyed(&self, controller: &str, name: &str, key: &str) -> u64 {
        self.file(controller, name)
            .and_then(|p| fs::read_to_string(p).ok())
            .and_then(|s| {
                s.lines().find_map(|l| {
                    let mut it = l.split_whitespace();
                    (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
                })
            })
            .unwrap_or(0)
    }

    pub fn counters(&self) -> CgroupCounters {
        if self.v2 {
            CgroupCounters {
                cpu_usage_ns: self.read_keyed("cpu", "cpu.stat", "usage_usec") * 1000,
                memory_bytes: self.read_u64("memory", "memory.current"),
                pids: self.read_u64("pids", "pids.current"),
                oom_kills: self.read_keyed("memory", "memory.events", "oom_kill"),
            }
        } else {
            CgroupCounters {
                cpu_usage_ns: self.read_u64("cpuacct", "cpuacct.usage"),
                memory_bytes: self.read_u64("memory", "memory.usage_in_bytes"),
                pids: self.read_u64("pids", "pids.current"),
                oom_kills: self.read_keyed("memory", "memory.oom_control", "oom_kill"),
            }
        }
    }

    pub fn procs(&self) -> Vec<u64> {
        self.cg.procs().into_iter().map(|p| p.pid).collect()
    }

    /// SIGKILL everything left in the cgroup (processes that escaped the box's PID namespace
    /// cannot exist, but a half-started box may have left its helper) and remove it.
    pub fn destroy(&self) -> std::io::Result<()> {
        for _ in 0..100 {
            let procs = self.procs();
            if procs.is_empty() {
                break;
            }
            for p in procs {
                // SAFETY: signalling a process that lives in this box's cgroup.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            std::thread::yield_now();
        }
        // rmdir fails with EBUSY until the last killed task has been released.
        let mut last = None;
        for _ in 0..1000 {
            match self.cg.delete() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(err(
            "delete",
            last.map(|e| e.to_string()).unwrap_or_default(),
        ))
    }

    pub fn exists(&self) -> bool {
        self.cg.exists()
    }
}

/// The weight file of a cpu cgroup and the value for `shares` (v1 units) in it.
fn shares_file(v2: bool, shares: u64) -> (&'static str, u64) {
    if v2 {
        ("cpu.weight", (shares * 100 / 1024).clamp(1, 10_000))
    } else {
        ("cpu.shares", shares.max(2))
    }
}

/// The weight of the cpu cgroup at `dir`, in v1 shares.
fn read_shares(v2: bool, dir: &std::path::Path) -> Option<u64> {
    let name = if v2 { "cpu.weight" } else { "cpu.shares" };
    let v: u64 = fs::read_to_string(dir.join(name))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(if v2 { v * 1024 / 100 } else { v })
}

/// Set the weight of the cpu cgroup at `dir` (e.g. [`BoxCgroup::parent_cpu_dir`]), in v1
/// shares.
pub fn set_dir_shares(dir: &std::path::Path, shares: u64) -> std::io::Result<()> {
    let v2 = cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode();
    let (name, value) = shares_file(v2, shares);
    fs::write(dir.join(name), value.to_string())
}

/// The weight of the cpu cgroup at `dir`, in v1 shares.
pub fn dir_shares(dir: &std::path::Path) -> Option<u64> {
    read_shares(cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode(), dir)
}
