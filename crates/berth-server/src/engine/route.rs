//! The routing decision: which box, which backend (and, once there are several nodes, which
//! node) serves a client's operation on a box. Every operation that reaches into a running box
//! (exec, files, ports, stats, a session's agent) resolves its [`Route`] here and nowhere else,
//! so a cluster replaces this one function (a remote route) rather than every handler.

use super::boxes::InUse;
use super::error::EngineError;
use super::Engine;
use berth_api::{BoxObject, BoxState};
use berth_sandbox::Backend;
use std::sync::Arc;

/// What an operation does with the box it routes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Uses the box (exec, files, ports): a parked box is restored first, and the call counts
    /// as activity (resets the idle timer).
    Serve,
    /// Only looks at it (stats): a parked box stays parked (409) and the idle timer is not
    /// reset, so monitoring does not keep boxes alive.
    Observe,
}

/// Where a box's operations go: the box as it was when routed, and the backend that holds it.
/// Local today; the cluster issue adds a remote variant behind the same methods.
pub struct Route {
    pub(crate) backend: Arc<Backend>,
    pub(crate) box_obj: BoxObject,
    /// A serving use holds the box busy while the caller keeps this (`BoxHandle::hold`).
    pub(crate) in_use: Option<InUse>,
}

impl Route {
    pub fn box_id(&self) -> &str {
        &self.box_obj.id
    }
}

impl Engine {
    /// Resolve the route to a running box of `tenant` for a call that `use`s it.
    pub(crate) async fn route(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        how: Use,
    ) -> Result<Route, EngineError> {
        if how == Use::Serve {
            self.ensure_unparked(tenant, id).await?;
        }
        let b = self.get_box(tenant, id).await?;
        let not_running = || EngineError::Conflict(format!("box {id} is {}", b.state.as_str()));
        let Some(h) = self.box_handle(id) else {
            return Err(not_running());
        };
        if b.state != BoxState::Running {
            return Err(not_running());
        }
        let in_use = (how == Use::Serve).then(|| h.hold());
        let backend = self.backend(&b.backend)?;
        Ok(Route {
            backend,
            box_obj: b,
            in_use,
        })
    }

    /// The backend named `name` (a box's recorded backend must still be enabled).
    pub(crate) fn backend(&self, name: &str) -> Result<Arc<Backend>, EngineError> {
        self.backends
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::Internal(format!("backend {name} vanished")))
    }

    /// The backend of a running box, after checking the tenant; restores a parked box and
    /// counts as activity. Prefer the operation methods (`exec`, `open_file`, …): this hands
    /// out the backend itself and will not survive the routing becoming remote.
    pub(crate) async fn running_box(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
    ) -> Result<(Arc<Backend>, BoxObject), EngineError> {
        let r = self.route(tenant, id, Use::Serve).await?;
        Ok((r.backend, r.box_obj))
    }
}
