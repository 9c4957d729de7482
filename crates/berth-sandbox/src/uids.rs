//! Host uid ranges handed to boxes. Every box gets [`UID_RANGE`] host uids of its own (box uid
//! `u` is host uid `base + u`), so the kernel's per-user counters and limits are the box's
//! alone. Each backend draws its ranges from a region of its own; the regions are disjoint
//! (checked at compile time below), so a native, a Docker and a gVisor box never share a uid.

/// Host uids per box (box uids 0–65535).
pub const UID_RANGE: u32 = 65536;

/// A backend's region: `slots` ranges of [`UID_RANGE`] uids starting at `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRegion {
    pub base: u32,
    pub slots: u32,
}

impl UidRegion {
    /// The first host uid of slot `slot`, if the region has it.
    pub const fn slot_base(self, slot: u32) -> Option<u32> {
        if slot < self.slots {
            Some(self.base + slot * UID_RANGE)
        } else {
            None
        }
    }

    /// One past the region's last uid (as u64: a region may end at 2^32).
    pub const fn end(self) -> u64 {
        self.base as u64 + self.slots as u64 * UID_RANGE as u64
    }

    const fn disjoint(self, other: UidRegion) -> bool {
        self.end() <= other.base as u64 || other.end() <= self.base as u64
    }
}

/// Native boxes (user namespaces mapped onto these).
pub const NATIVE: UidRegion = UidRegion {
    base: 0x4000_0000,
    slots: 8192,
};
/// Docker boxes with runc.
pub const DOCKER: UidRegion = UidRegion {
    base: 0x6000_0000,
    slots: 4096,
};
/// Docker boxes with gVisor (`runsc`).
pub const GVISOR: UidRegion = UidRegion {
    base: 0x7000_0000,
    slots: 4095,
};

pub const REGIONS: [UidRegion; 3] = [NATIVE, DOCKER, GVISOR];

const fn regions_are_sound() -> bool {
    let mut i = 0;
    while i < REGIONS.len() {
        // Above the host's own users; below uid 2^31, so that no box uid reads as negative
        // in a signed `uid_t` and none is `u32::MAX` ((uid_t)-1, "no change" to the kernel).
        if REGIONS[i].base < 0x1000_0000 || REGIONS[i].end() > 0x8000_0000 {
            return false;
        }
        if !REGIONS[i].base.is_multiple_of(UID_RANGE) || REGIONS[i].slots == 0 {
            return false;
        }
        let mut j = i + 1;
        while j < REGIONS.len() {
            if !REGIONS[i].disjoint(REGIONS[j]) {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

const _: () = assert!(
    regions_are_sound(),
    "box uid regions overlap or leave bounds"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_disjoint_and_in_bounds() {
        assert!(regions_are_sound());
        for (i, a) in REGIONS.iter().enumerate() {
            let last = a.slot_base(a.slots - 1).expect("last slot") as u64 + UID_RANGE as u64;
            assert_eq!(last, a.end());
            assert!(a.slot_base(a.slots).is_none());
            for b in &REGIONS[i + 1..] {
                // Every uid of every slot of `a` lies outside `b`.
                for s in [0, a.slots / 2, a.slots - 1] {
                    let lo = a.slot_base(s).expect("slot") as u64;
                    let hi = lo + UID_RANGE as u64 - 1;
                    for u in [lo, hi] {
                        assert!(u < b.base as u64 || u >= b.end(), "{a:?} slot {s} in {b:?}");
                    }
                }
            }
        }
        // The old layout (native 16 000 slots from 0x4000_0000, Docker and gVisor both at
        // 0x6000_0000) is what the check exists to refuse.
        let old_native = UidRegion {
            base: 0x4000_0000,
            slots: 16_000,
        };
        assert!(!old_native.disjoint(DOCKER));
        assert!(!DOCKER.disjoint(DOCKER));
    }
}
