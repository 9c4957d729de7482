//! Placements made by this node whose create has not answered yet ([`Placed`]): counted on
//! top of the store's counts of a tenant's boxes for `spread_by` (see
//! [`super::nodes::Cluster::place`]), released when the placement is dropped.

use std::sync::{Arc, Mutex};

pub(super) type InFlightLedger =
    std::collections::HashMap<String, std::collections::HashMap<String, u64>>;

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
        if let Some(nodes) = l.get_mut(&self.tenant) {
            if let Some(n) = nodes.get_mut(&self.node) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    nodes.remove(&self.node);
                }
            }
            if nodes.is_empty() {
                l.remove(&self.tenant);
            }
        }
    }
}
