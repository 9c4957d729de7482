//! The registry: which boxes and sessions have an owner task, by id, and their handles. Each
//! object's state is its owner's `watch`; the registry keeps only, per tenant, what its boxes
//! holding resources hold (updated by each box owner's publish, read by admission on every
//! create). It is shared by the engine and the actors (a box asks whether an agent in it is
//! mid-turn; an owner task removes itself when it ends).

use super::admission::{holds_resources, Held};
use super::boxes::BoxHandle;
use super::sessions::{SessionCmd, SessionHandle};
use berth_api::{BoxObject, Resources, SessionState};
use std::collections::HashMap;
use std::sync::RwLock;

#[derive(Default)]
pub struct Registry {
    boxes: RwLock<Boxes>,
    sessions: RwLock<HashMap<String, SessionHandle>>,
}

/// The boxes with an owner task, and what those holding resources hold per tenant, kept as
/// their owners publish states (admission reads a tenant's sum instead of walking every box).
#[derive(Default)]
struct Boxes {
    handles: HashMap<String, BoxHandle>,
    /// Boxes counted against their tenant: id → (tenant, resources).
    counted: HashMap<String, (String, Resources)>,
    held: HashMap<String, Held>,
}

impl Boxes {
    fn uncount(&mut self, id: &str) {
        if let Some((tenant, r)) = self.counted.remove(id) {
            if let Some(h) = self.held.get_mut(&tenant) {
                h.sub(&r);
                if h.boxes == 0 {
                    self.held.remove(&tenant);
                }
            }
        }
    }

    /// Count `b` as its state says, if it has an owner task here.
    fn recount(&mut self, b: &BoxObject) {
        self.uncount(&b.id);
        if holds_resources(b.state) && self.handles.contains_key(&b.id) {
            self.held
                .entry(b.tenant.clone())
                .or_default()
                .add(&b.resources);
            self.counted
                .insert(b.id.clone(), (b.tenant.clone(), b.resources));
        }
    }
}

impl Registry {
    pub fn box_handle(&self, id: &str) -> Option<BoxHandle> {
        self.boxes.read().ok()?.handles.get(id).cloned()
    }

    pub fn session_handle(&self, id: &str) -> Option<SessionHandle> {
        self.sessions.read().ok()?.get(id).cloned()
    }

    /// Its state is read here, under the lock its owner's [`Registry::publish_box`] takes
    /// after each change: whichever comes first, the count ends on the latest state.
    pub fn insert_box(&self, id: &str, h: BoxHandle) {
        if let Ok(mut m) = self.boxes.write() {
            m.handles.insert(id.to_string(), h.clone());
            let b = h.state.borrow();
            m.recount(&b);
        }
    }

    /// A box's owner has published `b` (its new state): count it accordingly.
    pub fn publish_box(&self, b: &BoxObject) {
        if let Ok(mut m) = self.boxes.write() {
            m.recount(b);
        }
    }

    /// What `tenant`'s boxes with an owner task hold (those whose state holds resources).
    pub fn held(&self, tenant: &str) -> Held {
        self.boxes
            .read()
            .ok()
            .and_then(|m| m.held.get(tenant).copied())
            .unwrap_or_default()
    }

    pub fn insert_session(&self, id: &str, h: SessionHandle) {
        if let Ok(mut m) = self.sessions.write() {
            m.insert(id.to_string(), h);
        }
    }

    pub fn forget_box(&self, id: &str) {
        if let Ok(mut m) = self.boxes.write() {
            m.handles.remove(id);
            m.uncount(id);
        }
    }

    pub fn forget_session(&self, id: &str) {
        if let Ok(mut m) = self.sessions.write() {
            m.remove(id);
        }
    }

    /// Every box with an owner task.
    pub fn boxes(&self) -> Vec<BoxHandle> {
        self.boxes
            .read()
            .map(|m| m.handles.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Call `f` with every box that has an owner task, under the registry's read lock (no
    /// handle cloned, nothing allocated). `f` must not touch the registry.
    pub fn for_each_box(&self, mut f: impl FnMut(&BoxHandle)) {
        if let Ok(m) = self.boxes.read() {
            m.handles.values().for_each(&mut f);
        }
    }

    /// Every session with an owner task.
    pub fn sessions(&self) -> Vec<SessionHandle> {
        self.sessions
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The live sessions in a box.
    pub fn sessions_in(&self, box_id: &str) -> Vec<SessionHandle> {
        self.sessions
            .read()
            .map(|m| {
                m.values()
                    .filter(|h| h.state.borrow().box_id == box_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether an agent in the box is in the middle of a turn (a box is not idle then, even
    /// when the model is slow to answer), or an Agent SDK client is connected to one of its
    /// sdk sessions (the client holds that conversation's hooks and callbacks: a park would
    /// end it).
    pub fn box_busy(&self, box_id: &str) -> bool {
        self.sessions
            .read()
            .map(|m| {
                m.values().any(|h| {
                    let s = h.state.borrow();
                    s.box_id == box_id
                        && (matches!(s.state, SessionState::Running | SessionState::Starting)
                            || h.sdk.as_ref().is_some_and(|r| r.attached().0))
                })
            })
            .unwrap_or(false)
    }

    /// Stop every live session in a box (it is parking or being deleted), each by a message to
    /// its owner task; the ids of those that stopped.
    pub async fn stop_box_sessions(&self, box_id: &str, reason: &str) -> Vec<String> {
        let mut stopped = Vec::new();
        for h in self.sessions_in(box_id) {
            let id = h.state.borrow().id.clone();
            if let Stopped::Yes(_) = stop_session(&h, reason).await {
                stopped.push(id);
            }
        }
        stopped
    }
}

/// How long a stop waits for a session's owner task to take the message and answer. An owner
/// task answers a stop at once unless it is stuck in a store write (a database that stopped
/// answering): the park, delete or shutdown that asked must not hang with it.
pub const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What became of a stop sent to a session's owner task.
pub enum Stopped {
    /// It stopped; its final state.
    Yes(Box<berth_api::SessionObject>),
    /// It had already ended (its queue is closed, or it dropped the reply).
    Gone,
    /// It did not answer within [`STOP_WAIT`]. The message may still be taken later.
    TimedOut,
}

/// Ask a session's owner task to stop, waiting at most [`STOP_WAIT`] in all.
pub async fn stop_session(h: &SessionHandle, reason: &str) -> Stopped {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cmd = SessionCmd::Stop {
        reason: reason.to_string(),
        reply: tx,
    };
    let asked = async {
        if h.tx.send(cmd).await.is_err() {
            return Stopped::Gone;
        }
        match rx.await {
            Ok(obj) => Stopped::Yes(Box::new(obj)),
            Err(_) => Stopped::Gone,
        }
    };
    match tokio::time::timeout(STOP_WAIT, asked).await {
        Ok(r) => r,
        Err(_) => {
            let id = h.state.borrow().id.clone();
            tracing::warn!(session_id = %id, "the session's owner task did not answer a stop in time");
            Stopped::TimedOut
        }
    }
}
