//! Admission of new boxes: the operator's ceiling on one box's resources, and per-tenant limits
//! on the boxes alive at once (their count and the sums of their cpus, memory and disk).
//!
//! Contract: [`Admission::admit`] checks and reserves in one critical section, so concurrent
//! creates cannot pass a limit together; the [`Ticket`] it returns holds the reservation until
//! it is dropped, which the caller does once the box is in the registry (where the next check
//! counts it) or has failed. A box counts while it is `creating` or `running`; a parked box
//! holds nothing and is admitted again when it is restored.

use super::registry::Registry;
use crate::engine::error::EngineError;
use berth_api::{BoxState, Resources};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The largest box the server makes (each field a ceiling on the spec's own).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaxBox {
    pub cpus: f64,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub pids: u64,
}

/// What a tenant's live boxes may hold together (None: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TenantTotals {
    pub cpus: Option<f64>,
    pub memory_mib: Option<u64>,
    pub disk_mib: Option<u64>,
}

/// What some boxes hold together.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Held {
    pub boxes: usize,
    pub cpus: f64,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

impl Held {
    pub fn add(&mut self, r: &Resources) {
        self.boxes += 1;
        self.cpus += r.cpus;
        self.memory_mib = self.memory_mib.saturating_add(r.memory_mib);
        self.disk_mib = self.disk_mib.saturating_add(r.disk_mib);
    }

    fn plus(self, o: &Held) -> Held {
        Held {
            boxes: self.boxes + o.boxes,
            cpus: self.cpus + o.cpus,
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            disk_mib: self.disk_mib.saturating_add(o.disk_mib),
        }
    }

    pub fn sub(&mut self, r: &Resources) {
        self.boxes = self.boxes.saturating_sub(1);
        self.cpus = (self.cpus - r.cpus).max(0.0);
        self.memory_mib = self.memory_mib.saturating_sub(r.memory_mib);
        self.disk_mib = self.disk_mib.saturating_sub(r.disk_mib);
    }
}

/// Reservations of creates in flight, per tenant.
#[derive(Default)]
pub struct Reservations(Mutex<HashMap<String, Held>>);

/// A create's place under its tenant's limits; released on drop.
pub struct Ticket {
    reservations: Arc<Reservations>,
    tenant: String,
    resources: Resources,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut m) = self.reservations.0.lock() {
            if let Some(h) = m.get_mut(&self.tenant) {
                h.sub(&self.resources);
                if h.boxes == 0 {
                    m.remove(&self.tenant);
                }
            }
        }
    }
}

/// The host's cores and memory: the default ceiling for one box.
pub fn host_max_box() -> MaxBox {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0);
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(4096);
    MaxBox {
        cpus,
        memory_mib,
        disk_mib: DEFAULT_MAX_DISK_MIB,
        pids: DEFAULT_MAX_PIDS,
    }
}

/// Default ceiling on one box's disk (100 GiB).
pub const DEFAULT_MAX_DISK_MIB: u64 = 100 * 1024;
/// Default ceiling on one box's processes.
pub const DEFAULT_MAX_PIDS: u64 = 4096;

/// The spec's resources against the server's ceiling: 400 naming the first one exceeded.
pub fn check_max_box(r: &Resources, max: &MaxBox) -> Result<(), EngineError> {
    let over = |what: &str, asked: String, limit: String| {
        Err(EngineError::Invalid(format!(
            "resources.{what} {asked} is over this server's ceiling max_box.{what} = {limit}"
        )))
    };
    if r.cpus > max.cpus {
        return over("cpus", r.cpus.to_string(), max.cpus.to_string());
    }
    if r.memory_mib > max.memory_mib {
        return over(
            "memory_mib",
            r.memory_mib.to_string(),
            max.memory_mib.to_string(),
        );
    }
    if r.disk_mib > max.disk_mib {
        return over("disk_mib", r.disk_mib.to_string(), max.disk_mib.to_string());
    }
    if r.pids > max.pids {
        return over("pids", r.pids.to_string(), max.pids.to_string());
    }
    Ok(())
}

/// Whether a box in `state` has a running sandbox, so counts against its tenant's limits:
/// a box being parked or restored runs (its archive is being made or unpacked).
pub fn holds_resources(state: BoxState) -> bool {
    matches!(
        state,
        BoxState::Creating | BoxState::Running | BoxState::Parking | BoxState::Restoring
    )
}

/// The admission rules and the creates in flight: what the engine (a create) and a box's owner
/// task (a restore) consult before a box holds resources.
pub struct Admission {
    pub max_box: MaxBox,
    pub max_boxes_per_tenant: usize,
    pub tenant_totals: TenantTotals,
    reservations: Arc<Reservations>,
    registry: Arc<Registry>,
}

impl Admission {
    pub fn new(
        max_box: MaxBox,
        max_boxes_per_tenant: usize,
        tenant_totals: TenantTotals,
        registry: Arc<Registry>,
    ) -> Admission {
        Admission {
            max_box,
            max_boxes_per_tenant,
            tenant_totals,
            reservations: Arc::default(),
            registry,
        }
    }

    /// Check a new box of `tenant` against the ceilings and the tenant's limits, counting its
    /// live boxes and the creates in flight, and reserve its place (see the module docs).
    pub fn admit(&self, tenant: &str, r: &Resources) -> Result<Ticket, EngineError> {
        check_max_box(r, &self.max_box)?;
        let mut reserved = self
            .reservations
            .0
            .lock()
            .map_err(|_| EngineError::Internal("admission lock poisoned".into()))?;
        let held = reserved
            .get(tenant)
            .copied()
            .unwrap_or_default()
            .plus(&self.registry.held(tenant));
        let quota = |msg: String| Err(EngineError::Quota(msg));
        let max_boxes = self.max_boxes_per_tenant;
        if held.boxes >= max_boxes {
            return quota(format!(
                "tenant {tenant} already has {} boxes alive (limit max_boxes_per_tenant = {max_boxes})",
                held.boxes
            ));
        }
        let t = &self.tenant_totals;
        if let Some(max) = t.cpus.filter(|m| held.cpus + r.cpus > *m) {
            return quota(format!(
                "tenant {tenant}'s live boxes hold {} cpus; {} more is over tenant_max.cpus = {max}",
                held.cpus, r.cpus
            ));
        }
        if let Some(max) = t.memory_mib.filter(|m| held.memory_mib + r.memory_mib > *m) {
            return quota(format!(
                "tenant {tenant}'s live boxes hold {} MiB of memory; {} more is over tenant_max.memory_mib = {max}",
                held.memory_mib, r.memory_mib
            ));
        }
        if let Some(max) = t.disk_mib.filter(|m| held.disk_mib + r.disk_mib > *m) {
            return quota(format!(
                "tenant {tenant}'s live boxes hold {} MiB of disk; {} more is over tenant_max.disk_mib = {max}",
                held.disk_mib, r.disk_mib
            ));
        }
        reserved.entry(tenant.to_string()).or_default().add(r);
        Ok(Ticket {
            reservations: self.reservations.clone(),
            tenant: tenant.to_string(),
            resources: *r,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_names_what_is_exceeded() {
        let max = MaxBox {
            cpus: 2.0,
            memory_mib: 1024,
            disk_mib: 2048,
            pids: 100,
        };
        let ok = Resources {
            cpus: 2.0,
            memory_mib: 1024,
            disk_mib: 2048,
            pids: 100,
        };
        assert!(check_max_box(&ok, &max).is_ok());
        for (r, what) in [
            (Resources { cpus: 2.5, ..ok }, "max_box.cpus"),
            (
                Resources {
                    memory_mib: 1025,
                    ..ok
                },
                "max_box.memory_mib",
            ),
            (
                Resources {
                    disk_mib: 4096,
                    ..ok
                },
                "max_box.disk_mib",
            ),
            (Resources { pids: 101, ..ok }, "max_box.pids"),
        ] {
            let e = check_max_box(&r, &max).expect_err("over");
            assert!(e.to_string().contains(what), "{e}");
        }
    }

    #[test]
    fn boxes_being_parked_or_restored_are_counted() {
        use BoxState::*;
        for s in [Creating, Running, Parking, Restoring] {
            assert!(holds_resources(s), "{s:?}");
        }
        for s in [Parked, Stopped, Destroyed, Failed] {
            assert!(!holds_resources(s), "{s:?}");
        }
    }

    #[test]
    fn the_host_default_fits_the_host() {
        let m = host_max_box();
        assert!(m.cpus >= 1.0 && m.memory_mib >= 64, "{m:?}");
    }
}
