//! Nodes: servers sharing one store form a cluster. Each node registers itself (`nodes` table:
//! name, advertise URL, backends, capacity, load, state, incarnation, lease) and renews its
//! lease every fifth of `lease`; every box names the node that holds it (`BoxObject::node`).
//!
//! Contract:
//! - A node's lease is renewed only by the process holding its newest incarnation
//!   ([`berth_store::Store::renew_node`]). A lease past its end is claimed `lost` by exactly one other node
//!   ([`berth_store::Store::claim_lost_node`]), which then settles the lost node's boxes (hybrid boxes with
//!   a snapshot become restorable anywhere: parked, no node; the others `lost`) and its live
//!   sessions (`interrupted`).
//! - A node that cannot renew for a whole lease, while it knows of another node that could take
//!   its boxes over, fences itself: it stops and destroys the boxes
//!   it runs (their records can no longer be its to write: [`berth_store::Store::put_box`] refuses a
//!   holder that is not the row's). When the store answers again it settles its own boxes as
//!   a lost node's (unless another node did) and joins with a new incarnation; the boxes the
//!   cluster replaced are never resurrected.
//! - A process that finds its incarnation superseded by a live one (a second process under
//!   the same name) fences itself and stays out: the newer one is the node.
//! - With SQLite the one server is a one-node cluster: it registers and renews like any node.

use super::Engine;
use berth_api::{BoxObject, BoxState, NodeCapacity, NodeObject, NodeState, SessionState};
use berth_store::NodeRow;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the cron scheduler re-reads the triggers even when none changed here (another
/// node may have made one).
pub const TRIGGER_RESCAN: Duration = Duration::from_secs(5);

/// How this process takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_name: String,
    pub advertise_url: String,
    /// Signs forwarded requests; without it nothing is forwarded and boxes are placed here.
    pub secret: Option<String>,
    pub lease: Duration,
    pub capacity: NodeCapacity,
    /// `node_labels`: what box placements select and spread on.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// This node's view of the cluster.
pub struct Cluster {
    pub(crate) cfg: ClusterConfig,
    incarnation: AtomicI64,
    /// When this process (re)joined, RFC 3339.
    joined_at: Mutex<String>,
    /// Set while this process must not run boxes (lease lost or superseded).
    fenced: AtomicBool,
    /// A drain pass (parking hybrid boxes) is under way.
    draining_now: AtomicBool,
    /// The nodes as last read (with the lease renewal).
    view: Mutex<Vec<NodeRow>>,
    /// Boxes this node placed lately, by node and when: counted on top of the view's load
    /// until the placed node has surely renewed its lease (and its load) since.
    placed: Mutex<Vec<(String, tokio::time::Instant)>>,
    /// Other nodes' boxes as last read from the store (see [`super::owners`]).
    owners: super::owners::Owners,
    /// Placements made here whose create has not answered yet: tenant → node → count. Added
    /// to the store's counts of a tenant's boxes for `spread_by`, so that simultaneous creates
    /// through this node see each other (each would otherwise read the same store counts and
    /// pick the same label value). Creates placed by other nodes are not in it: see
    /// [`super::placement`].
    in_flight: Arc<Mutex<InFlightLedger>>,
}

pub use super::in_flight::Placed;
use super::in_flight::{InFlight, InFlightLedger};

/// Wall-clock Unix ms: leases are compared across processes (clocks must agree to well
/// within a lease; NTP does).
pub(crate) fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The host's name (the default node name).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "berth".into())
}

impl Cluster {
    pub fn name(&self) -> &str {
        &self.cfg.node_name
    }

    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// A live node's advertise URL (None: unknown, lost, or its lease lapsed).
    pub fn url_of(&self, name: &str) -> Option<String> {
        let now = wall_ms();
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        view.iter()
            .find(|r| r.node.name == name && r.node.state != NodeState::Lost && r.lease_ms >= now)
            .map(|r| r.node.advertise_url.clone())
    }

    /// Pick the node for a new box ([`super::placement::choose`], on the nodes as last read,
    /// counting what this node placed in the last half lease on top of their reported load).
    /// `tenant_boxes`: the store's count of `tenant`'s live boxes per node (for `spread_by`),
    /// to which this node's placements for `tenant` still in flight are added; the placement
    /// returned is one of them until dropped. `url` None: this node (also when there is no
    /// cluster secret: nothing is forwarded).
    pub fn place(
        &self,
        tenant: Option<&str>,
        ask: super::placement::Ask<'_>,
        tenant_boxes: &std::collections::HashMap<String, u64>,
        read_mark: u64,
    ) -> Result<Placed, super::placement::Unplaceable> {
        if self.cfg.secret.is_none() {
            return Ok(Placed::here());
        }
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let mut placed = self.placed.lock().unwrap_or_else(|p| p.into_inner());
        // Held until this placement is in the ledger: a concurrent one then sees it.
        let mut ledger = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = self.cfg.lease / 2;
        placed.retain(|(_, at)| at.elapsed() < fresh);
        let recent = |name: &str| placed.iter().filter(|(n, _)| n == name).count() as u64;
        let best =
            super::placement::choose(&view, &self.cfg.node_name, wall_ms(), ask, &recent, &|n| {
                tenant_boxes.get(n).copied().unwrap_or(0)
                    + tenant.map_or(0, |t| ledger.count(t, n, read_mark))
            })?;
        let Some(best) = best else {
            return Ok(Placed::here());
        };
        let (name, url) = (best.node.name.clone(), best.node.advertise_url.clone());
        placed.push((name.clone(), tokio::time::Instant::now()));
        let flight = tenant.map(|t| {
            ledger.add(t, &name);
            InFlight {
                ledger: self.in_flight.clone(),
                tenant: t.to_string(),
                node: name.clone(),
            }
        });
        Ok(Placed {
            url: (name != self.cfg.node_name).then_some(url),
            _flight: flight,
        })
    }

    /// Taken before reading a tenant's boxes from the store for [`Cluster::place`]: placements
    /// answered after it are counted on top of that read.
    pub fn placement_mark(&self) -> u64 {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mark()
    }

    /// The nodes as last read, with their lease ends as timestamps.
    pub fn nodes(&self) -> Vec<NodeObject> {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        view.iter()
            .map(|r| {
                let mut n = r.node.clone();
                n.lease_expires_at = rfc3339_ms(r.lease_ms);
                n
            })
            .collect()
    }

    /// Whether the last view holds another node that is not lost.
    fn others_known(&self) -> bool {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        view.iter()
            .any(|r| r.node.name != self.cfg.node_name && r.node.state != NodeState::Lost)
    }

    /// The holder's URL of another node's box, remembered from an earlier store read.
    fn remembered_owner(&self, box_id: &str) -> Option<String> {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        self.owners.box_url(&view, box_id, wall_ms())
    }

    fn remember_owner(&self, box_id: &str, node: &str) {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        self.owners.remember_box(&view, box_id, node);
    }

    fn set_view(&self, rows: Vec<NodeRow>) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = rows;
    }
}

impl Engine {
    /// This node's cluster membership (None before [`Engine::join_cluster`], e.g. in the
    /// actor tests).
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// The name new boxes are recorded under.
    pub(crate) fn node_name(&self) -> Option<String> {
        self.cluster().map(|c| c.cfg.node_name.clone())
    }

    /// Refuses a box whose `placement.node_selector` this node's labels do not match (409):
    /// the edge places creates on matching nodes, so one lands here only unplaced (no cluster
    /// secret, or a box the engine makes itself), and must not run where its spec forbids.
    pub(crate) fn placement_allows_here(
        &self,
        p: Option<&berth_api::Placement>,
    ) -> Result<(), super::error::EngineError> {
        let Some(p) = p.filter(|p| !p.node_selector.is_empty()) else {
            return Ok(());
        };
        let empty = Default::default();
        let (name, labels) = match self.cluster() {
            Some(c) => (c.cfg.node_name.as_str(), &c.cfg.labels),
            None => ("this server", &empty),
        };
        if p.selects(labels) {
            return Ok(());
        }
        Err(super::error::EngineError::Conflict(format!(
            "node {name} does not match placement.node_selector {} (its labels: {})",
            serde_json::to_string(&p.node_selector).unwrap_or_default(),
            serde_json::to_string(labels).unwrap_or_default()
        )))
    }

    /// What this node's live boxes hold.
    fn node_load(&self) -> NodeCapacity {
        let mut load = NodeCapacity::default();
        self.registry.for_each_box(|h| {
            let b = h.state.borrow();
            if b.state.is_terminal() || b.state == BoxState::Parked {
                return;
            }
            load.boxes += 1;
            load.cpus += b.resources.cpus;
            load.memory_mib += b.resources.memory_mib;
            load.disk_mib += b.resources.disk_mib;
        });
        load
    }

    fn node_object(&self, c: &Cluster) -> NodeObject {
        let mut backends: Vec<String> = self.backends.keys().cloned().collect();
        backends.sort();
        NodeObject {
            name: c.cfg.node_name.clone(),
            advertise_url: c.cfg.advertise_url.clone(),
            state: NodeState::Active,
            incarnation: c.incarnation.load(Ordering::SeqCst),
            lease_expires_at: String::new(),
            backends,
            capacity: c.cfg.capacity,
            load: self.node_load(),
            state_reason: None,
            labels: c.cfg.labels.clone(),
            joined_at: c
                .joined_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// Register this node (a new incarnation) and start renewing its lease. Called once at
    /// start-up, before `reconcile` (which then touches only this node's boxes).
    pub async fn join_cluster(
        self: &Arc<Self>,
        cfg: ClusterConfig,
    ) -> Result<(), super::error::EngineError> {
        let lease = cfg.lease;
        let c = Arc::new(Cluster {
            cfg,
            incarnation: AtomicI64::new(0),
            joined_at: Mutex::new(crate::auth::now()),
            fenced: AtomicBool::new(false),
            draining_now: AtomicBool::new(false),
            view: Mutex::new(Vec::new()),
            placed: Mutex::new(Vec::new()),
            owners: Default::default(),
            in_flight: Default::default(),
        });
        let me = self.node_object(&c);
        let inc = self
            .store
            .join_node(&me, wall_ms() + lease.as_millis() as i64)
            .await?;
        c.incarnation.store(inc, Ordering::SeqCst);
        c.set_view(self.store.list_nodes().await?);
        tracing::info!(node = %c.cfg.node_name, incarnation = inc, "joined the cluster");
        let _ = self.cluster.set(c);
        tokio::spawn(lease_loop(Arc::downgrade(self)));
        Ok(())
    }

    /// Drain (`true`) or undrain a node: a draining node gets no new boxes and parks its
    /// hybrid boxes (it does so itself on its next renewal).
    pub async fn set_node_draining(
        &self,
        name: &str,
        draining: bool,
    ) -> Result<NodeObject, super::error::EngineError> {
        let state = if draining {
            NodeState::Draining
        } else {
            NodeState::Active
        };
        if !self.store.set_node_state(name, state).await? {
            return Err(super::error::EngineError::NotFound(format!(
                "no node {name:?} that is not lost"
            )));
        }
        let rows = self.store.list_nodes().await?;
        if let Some(c) = self.cluster() {
            c.set_view(rows.clone());
        }
        rows.into_iter()
            .find(|r| r.node.name == name)
            .map(|r| {
                let mut n = r.node;
                n.lease_expires_at = rfc3339_ms(r.lease_ms);
                n
            })
            .ok_or_else(|| super::error::EngineError::not_found("node", name))
    }

    /// Every node, read from the store now.
    pub async fn list_nodes(&self) -> Result<Vec<NodeObject>, super::error::EngineError> {
        let rows = self.store.list_nodes().await?;
        if let Some(c) = self.cluster() {
            c.set_view(rows);
            return Ok(c.nodes());
        }
        Ok(rows.into_iter().map(|r| r.node).collect())
    }

    /// Where a request about box `id` must go: None when this node serves it (it holds the
    /// box, nobody does, or there is no cluster), else the holder's URL; `Err` when the holder
    /// is not reachable as a live node.
    pub async fn box_owner_url(&self, id: &str) -> Result<Option<String>, String> {
        let Some(c) = self.cluster() else {
            return Ok(None);
        };
        if !c.fenced() && self.registry.box_handle(id).is_some() {
            return Ok(None);
        }
        // Forwarding must not cost a store round trip per request (issue 20: ≤ 1 ms added).
        if c.cfg.secret.is_some() {
            if let Some(url) = c.remembered_owner(id) {
                return Ok(Some(url));
            }
        }
        let b = match self.store.get_box(None, id).await {
            Ok(Some(b)) => b,
            // Unknown (or unreadable): answered here, as any missing box.
            Ok(None) | Err(_) => return Ok(None),
        };
        match b.node {
            Some(n) if n != c.cfg.node_name && !b.state.is_terminal() => {
                if c.cfg.secret.is_none() {
                    return Err(format!(
                        "box {id} is on node {n}, and this node has no cluster_secret to reach it"
                    ));
                }
                let url = c
                    .url_of(&n)
                    .ok_or_else(|| format!("box {id} is on node {n}, which is not reachable"))?;
                c.remember_owner(id, &n);
                Ok(Some(url))
            }
            _ => Ok(None),
        }
    }

    /// [`Engine::box_owner_url`] for a session (its box's node).
    pub async fn session_owner_url(&self, id: &str) -> Result<Option<String>, String> {
        let Some(c) = self.cluster() else {
            return Ok(None);
        };
        if self.registry.session_handle(id).is_some() {
            return Ok(None);
        }
        if let Some(box_id) = c.owners.session_box(id) {
            return self.box_owner_url(&box_id).await;
        }
        match self.store.get_session(None, id).await {
            Ok(Some(s)) => {
                c.owners.remember_session(id, &s.box_id);
                self.box_owner_url(&s.box_id).await
            }
            _ => Ok(None),
        }
    }

    /// Whether reconcile may touch `b`: this node's boxes; with no cluster, all. A live box no
    /// node holds (written before nodes existed) is taken by this node with a compare-and-set.
    pub(crate) async fn reconcile_owns(&self, b: &mut BoxObject) -> bool {
        let Some(me) = self.node_name() else {
            return true;
        };
        match b.node.as_deref() {
            Some(n) => n == me,
            None if b.state == BoxState::Parked => false,
            None => {
                let mut mine = b.clone();
                mine.node = Some(me);
                if self.store.claim_box(&mine, None).await.unwrap_or(false) {
                    *b = mine;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// A parked box that no node holds (its node was lost) is taken by this node — one
    /// compare-and-set, so one node wins — and given an owner task here, so that its restore
    /// runs here. Nothing when the box is held or this process has no cluster.
    pub(crate) async fn take_released_box(
        self: &Arc<Self>,
        b: &BoxObject,
    ) -> Result<(), super::error::EngineError> {
        let Some(me) = self.node_name() else {
            return Ok(());
        };
        if b.node.is_some() || b.state != BoxState::Parked || self.box_handle(&b.id).is_some() {
            return Ok(());
        }
        let mut mine = b.clone();
        mine.node = Some(me);
        mine.state_reason = None;
        mine.updated_at = crate::auth::now();
        if !self.store.claim_box(&mine, None).await? {
            return Err(super::error::EngineError::Conflict(format!(
                "box {} is being taken by another node; try again",
                b.id
            )));
        }
        self.resume_box(mine).await
    }

    /// Settle the boxes and sessions of `node`, which this node has just declared lost.
    async fn settle_lost_node(&self, node: &str, reason: &str) {
        let boxes = match self.store.list_boxes(None).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(node, error = %e, "settling a lost node's boxes");
                return;
            }
        };
        let now_ms = wall_ms();
        let mut lost_boxes = Vec::new();
        for b in boxes {
            if b.node.as_deref() != Some(node) || b.state.is_terminal() {
                continue;
            }
            let mut n = b.clone();
            n.node = None;
            n.updated_at = crate::auth::now();
            if b.snapshot.is_some() && b.state != BoxState::Parking {
                // Its snapshot is whole (a park stores it before it destroys the box): any
                // node restores it at its next use.
                n.state = BoxState::Parked;
                n.state_reason = Some(format!("{reason}; restorable on any node"));
            } else {
                n.state = BoxState::Lost;
                n.state_reason = Some(reason.to_string());
                n.snapshot = None;
            }
            match self.store.claim_box(&n, Some(node)).await {
                Ok(true) => {
                    let _ = self.store.close_box_span(&b.id, now_ms).await;
                    lost_boxes.push(b.id.clone());
                    metrics::counter!("berth_boxes_lost_total", "restorable" => if n.state == BoxState::Parked { "true" } else { "false" }).increment(1);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(box_id = %b.id, error = %e, "settling a lost box"),
            }
        }
        let sessions = match self.store.list_sessions(None, None).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(node, error = %e, "settling a lost node's sessions");
                return;
            }
        };
        for mut s in sessions {
            if s.state.is_terminal() || !lost_boxes.contains(&s.box_id) {
                continue;
            }
            s.state = SessionState::Interrupted;
            s.state_reason = Some(format!("{reason} while the session ran"));
            // Its box has no holder now, nor has the session: the lost node, should it come
            // back, can write neither (`put_session` is fenced on them).
            s.node = None;
            s.updated_at = crate::auth::now();
            if let Err(e) = self.store.put_session(&s).await {
                tracing::warn!(session_id = %s.id, error = %e, "settling a lost session");
            }
        }
        tracing::warn!(node, boxes = lost_boxes.len(), "settled a lost node");
    }

    /// Stop what this process runs without the right to: its boxes torn down in their
    /// backends at once (their processes end), then sessions and box owner tasks told to stop
    /// (their records are no longer this node's to write: those writes fail, bounded).
    async fn fence(self: &Arc<Self>) {
        use berth_sandbox::Sandbox;
        let boxes = self.registry.boxes();
        for h in &boxes {
            let (id, backend) = {
                let b = h.state.borrow();
                (b.id.clone(), b.backend.clone())
            };
            if let Some(be) = self.backends.get(&backend) {
                let _ = be.destroy(&id).await;
            }
        }
        let bound = Duration::from_secs(10);
        for h in self.registry.sessions() {
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let stop = super::sessions::SessionCmd::Stop {
                    reason: "node fenced".into(),
                    reply: tx,
                };
                if h.tx.send(stop).await.is_ok() {
                    let _ = tokio::time::timeout(bound, rx).await;
                }
            });
        }
        for h in boxes {
            let id = h.state.borrow().id.clone();
            self.registry.forget_box(&id);
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if h.tx
                    .send(super::boxes::BoxCmd::Shutdown { reply: tx })
                    .await
                    .is_ok()
                {
                    let _ = tokio::time::timeout(bound, rx).await;
                }
            });
        }
    }

    /// A draining node parks its running hybrid boxes (each once).
    async fn drain_step(&self) {
        for h in self.registry.boxes() {
            let (id, tenant, hybrid_running) = {
                let b = h.state.borrow();
                (
                    b.id.clone(),
                    b.tenant.clone(),
                    b.lifecycle == berth_api::Lifecycle::Hybrid && b.state == BoxState::Running,
                )
            };
            if hybrid_running {
                if let Err(e) = self.park_box(&tenant, &id).await {
                    tracing::warn!(box_id = %id, error = %e, "parking a box of a draining node");
                }
            }
        }
    }
}

/// Renew this node's lease, watch the others', and act on what is found, until the engine
/// is gone.
async fn lease_loop(engine: std::sync::Weak<Engine>) {
    let Some(c) = engine.upgrade().and_then(|e| e.cluster().cloned()) else {
        return;
    };
    let lease = c.cfg.lease;
    let lease_ms = lease.as_millis() as i64;
    let mut tick = tokio::time::interval((lease / 5).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_renewed = tokio::time::Instant::now();
    let mut superseded = false;
    loop {
        tick.tick().await;
        let Some(e) = engine.upgrade() else { return };
        if superseded {
            continue;
        }
        let inc = c.incarnation.load(Ordering::SeqCst);
        let me = e.node_object(&c);
        // Bounded: a store that does not answer (a node cut off) must not hold the loop past
        // the point where it has to fence.
        let bound = lease / 2;
        let renewed =
            match tokio::time::timeout(bound, e.store.renew_node(&me, inc, wall_ms() + lease_ms))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(berth_store::StoreError::Conflict(
                    "the store did not answer within half a lease".into(),
                )),
            };
        match renewed {
            Ok(true) if !c.fenced() => last_renewed = tokio::time::Instant::now(),
            Ok(_) => {
                // Lost, superseded, or fenced after a silence: find out which.
                let rows = match tokio::time::timeout(bound, e.store.list_nodes()).await {
                    Ok(Ok(r)) => r,
                    _ => continue,
                };
                let row = rows.iter().find(|r| r.node.name == c.cfg.node_name);
                let newer_live = row.is_some_and(|r| {
                    r.node.incarnation > inc
                        && r.node.state != NodeState::Lost
                        && r.lease_ms >= wall_ms()
                });
                if !c.fenced.swap(true, Ordering::SeqCst) {
                    tracing::error!(node = %c.cfg.node_name, "this node lost its lease: stopping its boxes");
                    e.fence().await;
                }
                if newer_live {
                    tracing::error!(node = %c.cfg.node_name, "another process joined under this node's name: this one stays out");
                    superseded = true;
                    continue;
                }
                // Our own boxes are settled as a lost node's unless another node did it.
                if let Some(r) = row {
                    if r.node.state != NodeState::Lost
                        && e.store
                            .claim_lost_node(
                                &c.cfg.node_name,
                                r.node.incarnation,
                                i64::MAX,
                                "node fenced after losing its lease",
                            )
                            .await
                            .unwrap_or(false)
                    {
                        e.settle_lost_node(&c.cfg.node_name, "node fenced after losing its lease")
                            .await;
                    }
                }
                *c.joined_at.lock().unwrap_or_else(|p| p.into_inner()) = crate::auth::now();
                let me = e.node_object(&c);
                match e.store.join_node(&me, wall_ms() + lease_ms).await {
                    Ok(n) => {
                        c.incarnation.store(n, Ordering::SeqCst);
                        c.fenced.store(false, Ordering::SeqCst);
                        last_renewed = tokio::time::Instant::now();
                        tracing::warn!(node = %c.cfg.node_name, incarnation = n, "rejoined the cluster");
                    }
                    Err(err) => tracing::warn!(error = %err, "rejoining the cluster"),
                }
                continue;
            }
            Err(err) => {
                tracing::warn!(error = %err, "renewing this node's lease");
                // Only another node can take this node's boxes over: alone (or the last of a
                // cluster) a node keeps its boxes through a store outage of any length.
                if last_renewed.elapsed() >= lease
                    && c.others_known()
                    && !c.fenced.swap(true, Ordering::SeqCst)
                {
                    tracing::error!(node = %c.cfg.node_name, "no lease renewal for a whole lease: fencing this node");
                    e.fence().await;
                }
                continue;
            }
        }
        let rows = match tokio::time::timeout(bound, e.store.list_nodes()).await {
            Ok(Ok(r)) => r,
            _ => continue,
        };
        let now = wall_ms();
        for r in &rows {
            if r.node.name == c.cfg.node_name
                || r.node.state == NodeState::Lost
                || r.lease_ms >= now
            {
                continue;
            }
            let reason = format!(
                "node {} lost: its lease lapsed (seen by {})",
                r.node.name, c.cfg.node_name
            );
            match e
                .store
                .claim_lost_node(&r.node.name, r.node.incarnation, now, &reason)
                .await
            {
                Ok(true) => {
                    // Off the lease loop: settling reads every box, and this node's own
                    // renewal must not wait for it.
                    let (e, name) = (e.clone(), r.node.name.clone());
                    tokio::spawn(async move {
                        e.settle_lost_node(&name, &format!("node {name} lost"))
                            .await
                    });
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "declaring a node lost"),
            }
        }
        let draining = rows
            .iter()
            .any(|r| r.node.name == c.cfg.node_name && r.node.state == NodeState::Draining);
        c.set_view(rows);
        if draining && !c.draining_now.swap(true, Ordering::SeqCst) {
            let (e, c) = (e.clone(), c.clone());
            tokio::spawn(async move {
                e.drain_step().await;
                c.draining_now.store(false, Ordering::SeqCst);
            });
        }
    }
}

/// The document kind a signed webhook call is recorded under while its timestamp is valid.
const HOOK_CALL_KIND: &str = "berth.hook_call";

impl Engine {
    /// A signed webhook call is taken once across the cluster: each node's replay cache sees
    /// only its own calls, so on a shared store the call is also recorded as a document
    /// (`put_document` without replace: a second insert of the same call is a conflict) and
    /// forgotten once its timestamp has left the window. Nothing to do without a cluster
    /// secret (a node alone, or nodes that do not forward to each other).
    pub(crate) async fn claim_hook_call(
        &self,
        t: &berth_api::TriggerObject,
        mac: &str,
    ) -> Result<(), super::error::EngineError> {
        if self.cluster().is_none_or(|c| c.cfg.secret.is_none()) {
            return Ok(());
        }
        let doc = berth_store::Document {
            kind: HOOK_CALL_KIND.into(),
            tenant: t.tenant.clone(),
            id: format!("{}:{mac}", t.id),
            version: 1,
            body: serde_json::json!({}),
        };
        match self.store.put_document(&doc, false).await {
            Ok(()) => {
                let store = self.store.clone();
                let window = Duration::from_secs(super::triggers::HOOK_WINDOW_S as u64 * 2 + 60);
                tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    let _ = store.delete_document(&doc.kind, &doc.tenant, &doc.id).await;
                });
                Ok(())
            }
            Err(berth_store::StoreError::Conflict(_)) => {
                metrics::counter!("berth_webhook_replays_refused_total").increment(1);
                Err(super::error::EngineError::Unauthenticated(
                    super::triggers::HookRefusal::Replay.to_string(),
                ))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether this node fires cron trigger `t` due at `due_ms`: a trigger in an existing box
    /// is fired by the node holding the box; the claim itself is a compare-and-set in the
    /// store ([`berth_store::Store::claim_cron_fire`]) rather than a leader (e.g. a PostgreSQL advisory
    /// lock): it works on both stores, needs no election, and a dead node never holds
    /// firings up.
    pub(crate) async fn claim_cron_fire(&self, t: &berth_api::TriggerObject, due_ms: i64) -> bool {
        if let berth_api::BoxRef::Id(id) = &t.box_ref {
            if matches!(self.box_owner_url(id).await, Ok(Some(_)) | Err(_)) {
                return false;
            }
        }
        match self.store.claim_cron_fire(&t.id, due_ms).await {
            Ok(won) => won,
            Err(e) => {
                tracing::warn!(trigger_id = %t.id, error = %e, "claiming a cron firing");
                false
            }
        }
    }
}
