//! Where other nodes' boxes live, as last read from the shared store: what lets a node forward
//! a request for a box on another node without a store round trip per request.
//!
//! Contract: an entry (box → node, the node's incarnation when read) answers only while the
//! node, in this node's current view of the cluster, still has that incarnation, is not
//! `lost` and its lease has not lapsed. That is exactly as fresh as reading the store: a box
//! changes node only when its node is declared lost (`settle_lost_node` releases it; another
//! node takes it at its next use), and a node is declared lost only once its lease lapsed in
//! the store — and the lease in this node's view, read earlier, lapsed no later. A node that
//! comes back joins with a new incarnation, so its old entries never answer again. A deleted
//! box's entry still names its old node, which answers 404 as the store would.
//!
//! Session → box is fixed for a session's life, so that map needs no validity rule. Both maps
//! are bounded: when full they are emptied (the next request of each id reads the store).

use berth_api::NodeState;
use berth_store::NodeRow;
use std::collections::HashMap;
use std::sync::Mutex;

/// Entries per map before it is emptied (~100 bytes each).
const MAX_ENTRIES: usize = 65_536;

#[derive(Default)]
pub struct Owners {
    boxes: Mutex<HashMap<String, (String, i64)>>,
    sessions: Mutex<HashMap<String, String>>,
}

fn insert<V>(map: &Mutex<HashMap<String, V>>, key: &str, value: V) {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    if m.len() >= MAX_ENTRIES && !m.contains_key(key) {
        m.clear();
    }
    m.insert(key.to_string(), value);
}

impl Owners {
    /// The URL of the node holding `box_id`, if an entry is still valid in `view` at `now_ms`.
    pub fn box_url(&self, view: &[NodeRow], box_id: &str, now_ms: i64) -> Option<String> {
        let (node, incarnation) = self
            .boxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(box_id)
            .cloned()?;
        let r = view.iter().find(|r| r.node.name == node)?;
        let valid = r.node.incarnation == incarnation
            && r.node.state != NodeState::Lost
            && r.lease_ms >= now_ms;
        metrics::counter!("berth_forward_owner_cache_total", "result" => if valid { "hit" } else { "stale" })
            .increment(1);
        valid.then(|| r.node.advertise_url.clone())
    }

    /// Remember that the store places `box_id` on `node` (with its incarnation in `view`).
    pub fn remember_box(&self, view: &[NodeRow], box_id: &str, node: &str) {
        if let Some(r) = view.iter().find(|r| r.node.name == node) {
            insert(&self.boxes, box_id, (node.to_string(), r.node.incarnation));
        }
    }

    pub fn session_box(&self, session_id: &str) -> Option<String> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(session_id)
            .cloned()
    }

    pub fn remember_session(&self, session_id: &str, box_id: &str) {
        insert(&self.sessions, session_id, box_id.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::{NodeCapacity, NodeObject};

    const NOW: i64 = 1_000_000;

    fn row(name: &str, incarnation: i64, state: NodeState, lease_ms: i64) -> NodeRow {
        NodeRow {
            node: NodeObject {
                name: name.into(),
                advertise_url: format!("http://{name}"),
                state,
                incarnation,
                lease_expires_at: String::new(),
                backends: vec![],
                capacity: NodeCapacity::default(),
                load: NodeCapacity::default(),
                state_reason: None,
                labels: Default::default(),
                joined_at: String::new(),
            },
            lease_ms,
        }
    }

    #[test]
    fn an_entry_answers_only_while_its_node_is_the_same_live_incarnation() {
        let o = Owners::default();
        let live = vec![row("n2", 3, NodeState::Active, NOW + 1)];
        assert_eq!(o.box_url(&live, "b1", NOW), None, "nothing remembered yet");
        o.remember_box(&live, "b1", "n2");
        assert_eq!(o.box_url(&live, "b1", NOW).as_deref(), Some("http://n2"));
        // Draining nodes still serve their boxes.
        let draining = vec![row("n2", 3, NodeState::Draining, NOW + 1)];
        assert_eq!(
            o.box_url(&draining, "b1", NOW).as_deref(),
            Some("http://n2")
        );
        // Its lease lapsed: its boxes may be taken by another node any moment.
        assert_eq!(o.box_url(&live, "b1", NOW + 2), None);
        let lost = vec![row("n2", 3, NodeState::Lost, NOW + 1)];
        assert_eq!(o.box_url(&lost, "b1", NOW), None);
        // Back with a new incarnation: what it held before may live elsewhere now.
        let back = vec![row("n2", 4, NodeState::Active, NOW + 1)];
        assert_eq!(o.box_url(&back, "b1", NOW), None);
        // Gone from the view.
        assert_eq!(o.box_url(&[], "b1", NOW), None);
        // A node not in the view is not remembered.
        o.remember_box(&live, "b2", "n9");
        assert_eq!(o.box_url(&live, "b2", NOW), None);
    }

    #[test]
    fn the_maps_stay_bounded() {
        let o = Owners::default();
        for i in 0..=MAX_ENTRIES {
            o.remember_session(&format!("s{i}"), "b");
        }
        let n = o.sessions.lock().map(|m| m.len()).unwrap_or(0);
        assert!(n <= MAX_ENTRIES, "{n}");
        assert_eq!(
            o.session_box(&format!("s{MAX_ENTRIES}")).as_deref(),
            Some("b")
        );
    }
}
