//! Placements made by this node whose create has not answered yet ([`Placed`]), and those
//! answered lately: counted on top of the store's counts of a tenant's boxes for `spread_by`
//! (see [`super::nodes::Cluster::place`]). A placement is answered when it is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// How long an answered placement is remembered: far longer than any store read takes.
const ANSWERED_KEPT: std::time::Duration = std::time::Duration::from_secs(30);

/// Per tenant and node: placements in flight, and placements answered lately. A placement
/// counts the store's boxes as read, plus those in flight, plus those answered since its read
/// began ([`InFlightLedger::mark`]): their boxes may be missing from that read, and they are
/// no longer in flight. (One answered just after being stored may be counted twice by a read
/// that began in between: a window of the create's answer's way back.)
#[derive(Default)]
pub(super) struct InFlightLedger {
    flying: HashMap<String, HashMap<String, u64>>,
    /// (sequence number, tenant, node, when), oldest first.
    answered: VecDeque<(u64, String, String, std::time::Instant)>,
    seq: u64,
}

impl InFlightLedger {
    /// Taken before a store read of a tenant's boxes, given back to [`Self::count`].
    pub(super) fn mark(&self) -> u64 {
        self.seq
    }

    /// `tenant`'s placements on `node` that a store read begun at `mark` may not show.
    pub(super) fn count(&self, tenant: &str, node: &str, mark: u64) -> u64 {
        let flying = self
            .flying
            .get(tenant)
            .and_then(|f| f.get(node))
            .copied()
            .unwrap_or(0);
        let answered = self
            .answered
            .iter()
            .filter(|(seq, t, n, _)| *seq > mark && t == tenant && n == node)
            .count() as u64;
        flying + answered
    }

    pub(super) fn add(&mut self, tenant: &str, node: &str) {
        *self
            .flying
            .entry(tenant.to_string())
            .or_default()
            .entry(node.to_string())
            .or_default() += 1;
    }

    fn answer(&mut self, tenant: &str, node: &str) {
        if let Some(nodes) = self.flying.get_mut(tenant) {
            if let Some(n) = nodes.get_mut(node) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    nodes.remove(node);
                }
            }
            if nodes.is_empty() {
                self.flying.remove(tenant);
            }
        }
        let now = std::time::Instant::now();
        while self
            .answered
            .front()
            .is_some_and(|(_, _, _, at)| now.duration_since(*at) > ANSWERED_KEPT)
        {
            self.answered.pop_front();
        }
        self.seq += 1;
        self.answered
            .push_back((self.seq, tenant.to_string(), node.to_string(), now));
    }
}

/// A placement made by [`super::nodes::Cluster::place`]: the chosen node's URL (None: this node), and its
/// entry in the ledger of placements in flight, released when this is dropped. Hold it until
/// the create has answered: then its box is in the store (which counts it from there on), or
/// there is no box.
#[must_use = "dropping the placement releases it from the in-flight ledger at once"]
pub struct Placed {
    pub url: Option<String>,
    pub(super) _flight: Option<InFlight>,
}

impl Placed {
    /// This node, with nothing in flight (no cluster, or nothing placed).
    pub fn here() -> Placed {
        Placed::to(None)
    }

    /// A node chosen without placing (an existing box's node), nothing in flight.
    pub fn to(url: Option<String>) -> Placed {
        Placed { url, _flight: None }
    }
}

pub(super) struct InFlight {
    pub(super) ledger: Arc<Mutex<InFlightLedger>>,
    pub(super) tenant: String,
    pub(super) node: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        l.answer(&self.tenant, &self.node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answered_placements_count_for_reads_begun_before_them() {
        let mut l = InFlightLedger::default();
        l.add("t", "a");
        l.add("t", "a");
        let before = l.mark();
        assert_eq!(l.count("t", "a", before), 2);
        l.answer("t", "a");
        // A read begun before the answer may miss that box: still counted for it.
        assert_eq!(l.count("t", "a", before), 2);
        // A read begun after it shows the box: only the one in flight is added.
        assert_eq!(l.count("t", "a", l.mark()), 1);
        assert_eq!(l.count("t", "b", before), 0);
        assert_eq!(l.count("u", "a", before), 0);
    }
}
