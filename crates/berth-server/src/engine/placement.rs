//! Placement: which node of the cluster a new box goes to.
//!
//! In order:
//! 1. the candidates: active nodes with a live lease offering the requested backend;
//! 2. `placement.node_selector`: only nodes whose `node_labels` carry every pair (none left:
//!    [`Unplaceable`], a 409 — the box is not run somewhere its spec says it must not);
//! 3. room: the nodes with room for the box's resources, when any has;
//! 4. `placement.spread_by`: only nodes carrying that label, and of those only the ones whose
//!    label value holds the fewest of this tenant's live boxes (counted over every selected
//!    node with the value, full or not);
//! 5. the fewest boxes (the node's reported load plus what this node placed on it lately),
//!    the asking node on a tie, then by name.
//!
//! Pure: the caller brings the nodes as last read, the counts, and the clock.
//!
//! The tenant's box counts are the store's plus the placements this node made for the tenant
//! whose create has not answered yet (`Cluster::place`'s in-flight ledger), so simultaneous
//! creates through one node spread as sequential ones do. Simultaneous creates through
//! different nodes still race: each node sees only its own placements in flight and the
//! store's boxes, so two nodes may send one box each to the same label value. A narrower
//! window remains on one node as well: a create that answers between another placement's
//! store read and its choice is counted by neither.

use berth_api::{NodeState, Placement, Resources};
use berth_store::NodeRow;

/// What a new box asks of its node.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub backend: Option<&'a str>,
    pub want: &'a Resources,
    pub placement: Option<&'a Placement>,
}

/// No node may take the box.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unplaceable {
    #[error("no active node matches placement.node_selector {0} (see GET /v1/nodes for the nodes' labels)")]
    NoMatch(String),
    #[error(
        "no active node matching the placement has the label {0:?} that placement.spread_by names"
    )]
    NoSpreadLabel(String),
}

/// The node for `ask` among `nodes` (None: no live candidate at all, and no selector; the
/// asking node then serves the create itself, as a cluster of one does). `recent` counts the
/// boxes this node placed on a node lately (not yet in its reported load); `tenant_boxes` the
/// asking tenant's live boxes on a node (read only when `spread_by` is set).
pub fn choose<'a>(
    nodes: &'a [NodeRow],
    me: &str,
    now_ms: i64,
    ask: Ask<'_>,
    recent: &dyn Fn(&str) -> u64,
    tenant_boxes: &dyn Fn(&str) -> u64,
) -> Result<Option<&'a NodeRow>, Unplaceable> {
    let selector = ask.placement.filter(|p| !p.node_selector.is_empty());
    let selected: Vec<&NodeRow> = nodes
        .iter()
        .filter(|r| r.node.state == NodeState::Active && r.lease_ms >= now_ms)
        .filter(|r| {
            ask.backend
                .is_none_or(|b| r.node.backends.iter().any(|x| x == b))
        })
        .filter(|r| ask.placement.is_none_or(|p| p.selects(&r.node.labels)))
        .collect();
    if selected.is_empty() {
        return match selector {
            Some(p) => Err(Unplaceable::NoMatch(
                serde_json::to_string(&p.node_selector).unwrap_or_default(),
            )),
            None => Ok(None),
        };
    }
    let fits = |r: &NodeRow| {
        let (c, l) = (r.node.capacity, r.node.load);
        l.cpus + ask.want.cpus <= c.cpus
            && l.memory_mib + ask.want.memory_mib <= c.memory_mib
            && (c.boxes == 0 || l.boxes < c.boxes)
    };
    let any_fits = selected.iter().any(|r| fits(r));
    let mut pool: Vec<&NodeRow> = selected
        .iter()
        .copied()
        .filter(|r| !any_fits || fits(r))
        .collect();
    if let Some(key) = ask.placement.and_then(|p| p.spread_by.as_deref()) {
        fn value_of<'r>(r: &'r NodeRow, key: &str) -> Option<&'r str> {
            r.node.labels.get(key).map(String::as_str)
        }
        let value_of = |r: &'a NodeRow| value_of(r, key);
        // This tenant's boxes per label value, over every selected node with the value.
        let count = |v: &str| -> u64 {
            selected
                .iter()
                .filter(|r| value_of(r) == Some(v))
                .map(|r| tenant_boxes(&r.node.name))
                .sum()
        };
        pool.retain(|r| value_of(r).is_some());
        let fewest = pool
            .iter()
            .filter_map(|r| value_of(r))
            .map(count)
            .min()
            .ok_or_else(|| Unplaceable::NoSpreadLabel(key.to_string()))?;
        pool.retain(|r| value_of(r).is_some_and(|v| count(v) == fewest));
    }
    Ok(pool.into_iter().min_by_key(|r| {
        let n = r.node.load.boxes + recent(&r.node.name);
        (n, r.node.name != me, r.node.name.clone())
    }))
}

use super::error::EngineError;
use super::nodes::Placed;
use super::Engine;
use berth_api::{BoxRef, BoxSpec, SessionObject, TriggerObject};
use std::collections::HashMap;

/// Where a node-signed request has another node start a trigger's session.
pub fn fire_path(trigger_id: &str) -> String {
    format!("/v1/triggers/{trigger_id}/fire-here")
}

impl Engine {
    /// Where a box this engine makes itself for `tenant` goes, as the API edge places a
    /// `POST /v1/boxes`: `url` None here, else the chosen node's URL; 409 when no node may
    /// take it. Hold the placement until the box is made (it counts as in flight until then).
    pub(crate) async fn place_box(
        &self,
        tenant: &str,
        spec: &BoxSpec,
    ) -> Result<Placed, EngineError> {
        let Some(c) = self.cluster() else {
            return Ok(Placed::here());
        };
        let spread = spec
            .placement
            .as_ref()
            .is_some_and(|p| p.spread_by.is_some());
        let mark = c.placement_mark();
        let counts = if spread {
            self.tenant_boxes_per_node(tenant).await
        } else {
            HashMap::new()
        };
        c.place(
            Some(tenant),
            Ask {
                backend: spec.backend.as_deref(),
                want: &spec.resources,
                placement: spec.placement.as_ref(),
            },
            &counts,
            mark,
        )
        .map_err(|e| EngineError::Conflict(e.to_string()))
    }

    /// `tenant`'s live boxes per node (what `spread_by` counts).
    pub(crate) async fn tenant_boxes_per_node(&self, tenant: &str) -> HashMap<String, u64> {
        let mut counts = HashMap::new();
        for b in self.list_boxes(tenant).await.unwrap_or_default() {
            if let Some(n) = b.node.filter(|_| !b.state.is_terminal()) {
                *counts.entry(n).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Where trigger `t` fires: a box of its own is placed; an existing box's node serves
    /// a session in it. `url` None: here.
    pub(crate) async fn place_trigger(&self, t: &TriggerObject) -> Result<Placed, EngineError> {
        match &t.box_ref {
            BoxRef::Spec(spec) => self.place_box(&t.tenant, spec).await,
            BoxRef::Id(id) => Ok(Placed::to(
                self.box_owner_url(id)
                    .await
                    .map_err(EngineError::Unavailable)?,
            )),
        }
    }

    /// Have the node at `url` start trigger `t`'s session (a node-signed call; see
    /// `api::triggers::fire_here`).
    pub(crate) async fn fire_trigger_on(
        &self,
        url: &str,
        t: &TriggerObject,
        payload: &serde_json::Value,
    ) -> Result<SessionObject, EngineError> {
        let c = self
            .cluster()
            .ok_or_else(|| EngineError::Internal("no cluster to fire on".into()))?;
        let body = serde_json::to_vec(payload).map_err(|e| EngineError::Internal(e.to_string()))?;
        let (status, bytes) = crate::api::forward::call_node(c, url, &fire_path(&t.id), body)
            .await
            .map_err(EngineError::Unavailable)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| EngineError::Internal(format!("node at {url} answered: {e}")));
        }
        let msg = serde_json::from_slice::<berth_api::ErrorBody>(&bytes)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        let msg = format!("node at {url}: {msg}");
        Err(match status.as_u16() {
            400 => EngineError::Invalid(msg),
            404 => EngineError::NotFound(msg),
            409 => EngineError::Conflict(msg),
            429 => EngineError::Quota(msg),
            _ => EngineError::Unavailable(msg),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::{NodeCapacity, NodeObject};
    use std::collections::{BTreeMap, HashMap};

    const NOW: i64 = 1_000_000;

    fn node(name: &str, labels: &[(&str, &str)], boxes: u64) -> NodeRow {
        NodeRow {
            node: NodeObject {
                name: name.into(),
                advertise_url: format!("http://{name}"),
                state: NodeState::Active,
                incarnation: 1,
                lease_expires_at: String::new(),
                backends: vec!["native".into()],
                capacity: NodeCapacity {
                    cpus: 8.0,
                    memory_mib: 16_384,
                    disk_mib: 100_000,
                    boxes: 0,
                },
                load: NodeCapacity {
                    boxes,
                    ..Default::default()
                },
                state_reason: None,
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                joined_at: String::new(),
            },
            lease_ms: NOW + 5_000,
        }
    }

    fn placement(sel: &[(&str, &str)], spread: Option<&str>) -> Placement {
        Placement {
            node_selector: sel
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            spread_by: spread.map(str::to_string),
        }
    }

    fn pick(
        nodes: &[NodeRow],
        p: Option<&Placement>,
        tenant: &HashMap<&str, u64>,
    ) -> Result<Option<String>, Unplaceable> {
        let want = Resources::default();
        choose(
            nodes,
            "n1",
            NOW,
            Ask {
                backend: None,
                want: &want,
                placement: p,
            },
            &|_| 0,
            &|n| tenant.get(n).copied().unwrap_or(0),
        )
        .map(|r| r.map(|r| r.node.name.clone()))
    }

    fn three() -> Vec<NodeRow> {
        vec![
            node("n1", &[("zone", "a"), ("disk", "hdd")], 0),
            node("n2", &[("zone", "a"), ("disk", "ssd")], 0),
            node("n3", &[("zone", "b"), ("disk", "ssd"), ("gpu", "yes")], 0),
        ]
    }

    #[test]
    fn without_a_placement_the_fewest_boxes_win_then_this_node() {
        let mut nodes = three();
        assert_eq!(pick(&nodes, None, &HashMap::new()), Ok(Some("n1".into())));
        nodes[0].node.load.boxes = 2;
        nodes[1].node.load.boxes = 1;
        nodes[2].node.load.boxes = 1;
        assert_eq!(pick(&nodes, None, &HashMap::new()), Ok(Some("n2".into())));
        assert_eq!(pick(&[], None, &HashMap::new()), Ok(None), "no view: here");
    }

    #[test]
    fn a_selector_keeps_only_nodes_carrying_all_its_labels() {
        let nodes = three();
        let ssd = placement(&[("disk", "ssd")], None);
        assert_eq!(
            pick(&nodes, Some(&ssd), &HashMap::new()),
            Ok(Some("n2".into()))
        );
        let gpu = placement(&[("gpu", "yes")], None);
        assert_eq!(
            pick(&nodes, Some(&gpu), &HashMap::new()),
            Ok(Some("n3".into()))
        );
        let both = placement(&[("zone", "a"), ("gpu", "yes")], None);
        let err = pick(&nodes, Some(&both), &HashMap::new()).expect_err("no node has both");
        assert!(err.to_string().contains("node_selector"), "{err}");
        assert!(err.to_string().contains("gpu"), "{err}");
        // A matching node that is lost, draining or past its lease is no match either.
        let mut gone = three();
        gone[2].lease_ms = NOW - 1;
        assert!(pick(&gone, Some(&gpu), &HashMap::new()).is_err());
        gone[2].lease_ms = NOW + 1;
        gone[2].node.state = NodeState::Draining;
        assert!(pick(&gone, Some(&gpu), &HashMap::new()).is_err());
    }

    #[test]
    fn spread_goes_to_the_label_value_with_fewest_of_the_tenants_boxes() {
        let nodes = three();
        let by_zone = placement(&[], Some("zone"));
        // Zone a holds one of the tenant's boxes (on n1), zone b none: n3.
        let t = HashMap::from([("n1", 1)]);
        assert_eq!(pick(&nodes, Some(&by_zone), &t), Ok(Some("n3".into())));
        // Zone b holds two, zone a one (n2): zone a, and there the fewer boxes then this node.
        let t = HashMap::from([("n2", 1), ("n3", 2)]);
        assert_eq!(pick(&nodes, Some(&by_zone), &t), Ok(Some("n1".into())));
        // Other tenants' boxes (the nodes' load) do not count for the spread, only within it.
        let mut loaded = three();
        loaded[2].node.load.boxes = 10;
        let t = HashMap::from([("n1", 1)]);
        assert_eq!(pick(&loaded, Some(&by_zone), &t), Ok(Some("n3".into())));
        // With a selector: spread among the selected nodes only.
        let ssd_by_zone = placement(&[("disk", "ssd")], Some("zone"));
        let t = HashMap::from([("n3", 1)]);
        assert_eq!(pick(&nodes, Some(&ssd_by_zone), &t), Ok(Some("n2".into())));
        // Nodes without the label are not spread onto; none with it: refused.
        let by_gpu = placement(&[], Some("gpu"));
        assert_eq!(
            pick(&nodes, Some(&by_gpu), &HashMap::new()),
            Ok(Some("n3".into()))
        );
        let by_rack = placement(&[], Some("rack"));
        let err = pick(&nodes, Some(&by_rack), &HashMap::new()).expect_err("no rack label");
        assert!(err.to_string().contains("rack"), "{err}");
    }

    #[test]
    fn room_comes_before_spread() {
        let mut nodes = three();
        // n3 (zone b, empty for the tenant) is full: zone a, though it holds more.
        nodes[2].node.capacity.boxes = 1;
        nodes[2].node.load.boxes = 1;
        nodes[0].node.load.boxes = 3;
        let by_zone = placement(&[], Some("zone"));
        let t = HashMap::from([("n1", 3)]);
        assert_eq!(pick(&nodes, Some(&by_zone), &t), Ok(Some("n2".into())));
    }
}
