//! The start boost: an agent's CLI does a burst of CPU work before its first output (the
//! pinned Claude Code CLI: about a second of CPU on two threads), and a box competes for CPU
//! with its sibling boxes at the same weight. While other boxes spin, a starting agent then
//! gets a third of what the same CLI started by hand gets. During the boost the box's CPU
//! weight is raised (its `cpu.shares`), and so is that of the boxes' parent cgroup (`berth/`,
//! so that the boxes together are not held at one host group's weight meanwhile); both go
//! back at the process's first output, at its end, or after `max`, whichever comes first.
//!
//! The CFS quota (`cpus`) is untouched: a boost reorders who runs first among boxes that want
//! the CPU, it never lets a box use more than its limit.
//!
//! Each box has a budget of boost time (`budget`, refilled at `refill` per second), charged
//! with the time its boosts actually lasted: a box that restarts its agent in a loop, or
//! whose agent never prints, runs out and starts at the normal weight.

use super::cgroup::{self, BoxCgroup};
use crate::StartBoost;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Boosts are granted (the default) or not, process-wide: for benchmarks that compare starts
/// with and without in one run. A server turns the boost off with `start_boost.shares = 0`.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Grant boosts (`true`, the default) or refuse them all from now on.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// The weight boxes and their parent have when not boosted (the kernel's default, which
/// berth never changes otherwise). Restored as a constant rather than as read before the
/// boost: several servers on one host (a cluster's nodes, tests) share the parent, and one
/// that read another's raised weight as "normal" would leave it raised for good.
const NORMAL_SHARES: u64 = 1024;

/// Budget below which a boost is not worth starting.
const MIN_GRANT: Duration = Duration::from_millis(20);

/// Every box's boost budget and the boosts in progress (one per native backend).
#[derive(Default)]
pub struct Booster {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    boxes: HashMap<String, BoxState>,
    /// Boosts in progress over all boxes, and the parent raised by the first of them.
    parent_active: u32,
    parent: Option<PathBuf>,
}

struct BoxState {
    /// Budget left as of `at`.
    left: Duration,
    at: Instant,
    /// Boosts in progress in this box (sessions start in parallel).
    active: u32,
}

impl BoxState {
    /// Add what the budget regained since it was last looked at.
    fn refill(&mut self, now: Instant, p: &StartBoost) {
        let regained = now.duration_since(self.at).mul_f64(p.refill.max(0.0));
        self.left = (self.left + regained).min(p.budget);
        self.at = now;
    }
}

/// One boost in progress; ends (once) at [`Boost::end`] or when dropped.
pub struct Boost {
    booster: Arc<Booster>,
    box_id: String,
    cg: Arc<BoxCgroup>,
    started: Instant,
    granted: Duration,
    ended: AtomicBool,
}

impl Booster {
    /// Raise box `box_id`'s weight for a start if its budget allows (`None`: refused, or the
    /// cgroup could not be changed). The boost ends at `max` (or when the budget runs out) by
    /// itself; the caller ends it earlier at the process's first output.
    pub fn begin(
        self: &Arc<Self>,
        box_id: &str,
        cg: &Arc<BoxCgroup>,
        p: &StartBoost,
    ) -> Option<Arc<Boost>> {
        if !ENABLED.load(Ordering::SeqCst) {
            return None;
        }
        let now = Instant::now();
        let granted = {
            let mut st = self.state.lock().ok()?;
            let b = st.boxes.entry(box_id.to_string()).or_insert(BoxState {
                left: p.budget,
                at: now,
                active: 0,
            });
            b.refill(now, p);
            if b.left < MIN_GRANT {
                tracing::debug!(box_id, "start boost refused: budget spent");
                return None;
            }
            let granted = p.max.min(b.left);
            if b.active == 0 {
                if let Err(e) = cg.set_cpu_shares(p.shares) {
                    tracing::debug!(box_id, error = %e, "start boost: box weight");
                    return None;
                }
            }
            b.active += 1;
            // Charged up front; what a boost did not use is given back when it ends.
            b.left -= granted;
            if st.parent_active == 0 {
                if let Some(dir) = cg.parent_cpu_dir() {
                    match cgroup::set_dir_shares(&dir, p.shares) {
                        Ok(()) => st.parent = Some(dir),
                        Err(e) => tracing::debug!(error = %e, "start boost: parent weight"),
                    }
                }
            }
            st.parent_active += 1;
            granted
        };
        let boost = Arc::new(Boost {
            booster: self.clone(),
            box_id: box_id.to_string(),
            cg: cg.clone(),
            started: now,
            granted,
            ended: AtomicBool::new(false),
        });
        let timer = Arc::downgrade(&boost);
        tokio::spawn(async move {
            tokio::time::sleep(granted).await;
            if let Some(b) = timer.upgrade() {
                b.end();
            }
        });
        Some(boost)
    }

    /// Box `box_id` is gone: drop its budget.
    pub fn forget(&self, box_id: &str) {
        if let Ok(mut st) = self.state.lock() {
            st.boxes.remove(box_id);
        }
    }
}

impl Boost {
    /// Put the weights back (the box's once its last boost ends, the parent's once every
    /// box's has) and give back the budget this boost did not use. Idempotent.
    pub fn end(&self) {
        if self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let used = self.started.elapsed().min(self.granted);
        let Ok(mut st) = self.booster.state.lock() else {
            return;
        };
        if let Some(b) = st.boxes.get_mut(&self.box_id) {
            b.left += self.granted - used;
            b.active = b.active.saturating_sub(1);
            if b.active == 0 {
                // A box destroyed meanwhile has no cgroup left to write to.
                let _ = self.cg.set_cpu_shares(NORMAL_SHARES);
            }
        }
        st.parent_active = st.parent_active.saturating_sub(1);
        if st.parent_active == 0 {
            if let Some(dir) = st.parent.take() {
                if let Err(e) = cgroup::set_dir_shares(&dir, NORMAL_SHARES) {
                    tracing::warn!(error = %e, "start boost: restoring the boxes' parent weight");
                }
            }
        }
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget arithmetic alone (no cgroup): a box that spends its budget is refused until
    /// it has refilled.
    #[test]
    fn budget_refills_at_its_rate() {
        let p = StartBoost {
            shares: 4096,
            max: Duration::from_secs(5),
            budget: Duration::from_secs(10),
            refill: 0.25,
        };
        let t0 = Instant::now();
        let mut b = BoxState {
            left: Duration::ZERO,
            at: t0,
            active: 0,
        };
        b.refill(t0 + Duration::from_secs(8), &p);
        assert_eq!(b.left, Duration::from_secs(2));
        b.refill(t0 + Duration::from_secs(1000), &p);
        assert_eq!(b.left, p.budget, "never above the budget");
    }
}
