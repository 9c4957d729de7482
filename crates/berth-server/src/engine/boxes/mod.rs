//! Boxes: the engine's box operations (the façade: create, read, list, delete, park, restore,
//! artifacts, events) next to the box's owner task (`actor`), its park and restore
//! (`snapshot`) and what a spec may hold (`spec`). A handler calls these; only the owner task
//! changes a box.

mod actor;
mod snapshot;
mod spec;

pub use actor::*;
pub use spec::validate_spec;

use super::error::EngineError;
use super::{rules, tenant_filter, tokio_stream_from, Engine};
use crate::auth::{new_id, now};
use berth_api::*;
use berth_sandbox::Sandbox;
use spec::valid_image_ref;
use std::sync::Arc;
use tokio::sync::oneshot;

impl Engine {
    pub async fn create_box(
        self: &Arc<Self>,
        tenant: &str,
        spec: BoxSpec,
    ) -> Result<BoxObject, EngineError> {
        self.create_box_labelled(tenant, spec, Default::default())
            .await
    }

    /// [`Engine::create_box`], with labels of the server's own (`berth.*`, which a client's
    /// spec may not carry) added after the spec is checked.
    pub(crate) async fn create_box_labelled(
        self: &Arc<Self>,
        tenant: &str,
        mut spec: BoxSpec,
        server_labels: std::collections::BTreeMap<String, String>,
    ) -> Result<BoxObject, EngineError> {
        let backend_name = spec
            .backend
            .clone()
            .unwrap_or_else(|| self.config.default_backend.clone());
        let backend = self.backends.get(&backend_name).cloned().ok_or_else(|| {
            EngineError::Invalid(format!(
                "backend {backend_name:?} is not enabled on this server"
            ))
        })?;
        let image = spec.image.clone().unwrap_or_else(|| "host".into());
        if image != "host" && !backend.capabilities().image_references {
            return Err(EngineError::Invalid(format!(
                "image {image:?} is not available on the {backend_name} backend (use \"host\")"
            )));
        }
        if image != "host" && !valid_image_ref(&image) {
            return Err(EngineError::Invalid(format!(
                "image {image:?} is not an image reference (e.g. debian:12)"
            )));
        }
        validate_spec(&spec)?;
        // The edge placed the create on a node the selector matches; one that lands here
        // anyway (no cluster secret, a single node, a box the engine makes itself) is refused
        // rather than run where its selector says it must not.
        self.placement_allows_here(spec.placement.as_ref())?;
        // Refused before the box is recorded: a server out of open files would fail it
        // half-made (or fail its clients' connections and its boxes' model requests).
        berth_sandbox::native::fds::room_for_box()
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        spec.labels.extend(server_labels);
        // Held until the box is in the registry, where the next admission counts it.
        let ticket = self.admit(tenant, &spec.resources)?;
        let spec_secrets = spec.secrets.clone();
        // An unsaid lifecycle here is a box of its own (`POST /v1/boxes`); a session's own box
        // has its lifecycle filled in before (ephemeral). An unsaid idle timeout is the
        // server's default for the lifecycle; `null` is "never".
        let lifecycle = spec.lifecycle.unwrap_or(Lifecycle::Persistent);
        let idle_timeout_s = spec
            .idle_timeout_s
            .unwrap_or_else(|| self.config.idle_timeout.for_lifecycle(lifecycle));
        let ts = now();
        let obj = BoxObject {
            id: new_id("box"),
            tenant: tenant.to_string(),
            state: BoxState::Creating,
            state_reason: None,
            backend: backend_name,
            lifecycle,
            image,
            resources: spec.resources,
            network: spec.network,
            env: spec.env,
            idle_timeout_s,
            max_lifetime_s: spec.max_lifetime_s,
            labels: spec.labels,
            secrets: spec
                .secrets
                .iter()
                .map(|s| SecretRef {
                    host: s.host.clone(),
                    header: s.header.clone(),
                    tls: s.tls,
                })
                .collect(),
            shared: spec.shared,
            keep_workspace: spec.keep_workspace,
            artifact: None,
            snapshot: None,
            node: self.node_name(),
            placement: spec.placement,
            created_at: ts.clone(),
            updated_at: ts,
        };
        self.store.put_box(&obj).await?;
        let secrets = spec_secrets
            .into_iter()
            .map(|s| berth_gateway::egress::Secret {
                host: s.host,
                header: s.header,
                value: s.value,
                tls: s.tls,
            })
            .collect();
        let handle = spawn(
            self.box_deps(),
            backend,
            obj.clone(),
            secrets,
            Start::Create,
        );
        self.registry.insert_box(&obj.id, handle.clone());
        drop(ticket);
        metrics::counter!("berth_boxes_created_total").increment(1);
        let mut rx = handle.state.clone();
        let settled = rx
            .wait_for(|b| b.state != BoxState::Creating)
            .await
            .map_err(|_| EngineError::Internal("box owner task ended during create".into()))?
            .clone();
        if settled.state == BoxState::Failed {
            return Err(EngineError::Unavailable(format!(
                "box {} failed to start: {}",
                settled.id,
                settled.state_reason.unwrap_or_default()
            )));
        }
        Ok(settled)
    }

    pub async fn get_box(&self, tenant: &str, id: &str) -> Result<BoxObject, EngineError> {
        if let Some(h) = self.box_handle(id) {
            let b = h.state.borrow().clone();
            if b.tenant == tenant {
                return Ok(b);
            }
            return Err(EngineError::not_found("box", id));
        }
        self.store
            .get_box(tenant_filter(tenant), id)
            .await?
            .ok_or_else(|| EngineError::not_found("box", id))
    }

    pub async fn list_boxes(&self, tenant: &str) -> Result<Vec<BoxObject>, EngineError> {
        let mut items = self.store.list_boxes(tenant_filter(tenant)).await?;
        for b in items.iter_mut() {
            if let Some(h) = self.box_handle(&b.id) {
                *b = h.state.borrow().clone();
            }
        }
        Ok(items)
    }

    pub async fn delete_box(&self, tenant: &str, id: &str) -> Result<BoxObject, EngineError> {
        let b = self.get_box(tenant, id).await?;
        // Sessions in the box end with it: its owner task stops them first.
        match self.box_handle(id) {
            Some(h) => {
                let (tx, rx) = oneshot::channel();
                let cmd = BoxCmd::Destroy {
                    stop_sessions: Some("box deleted".into()),
                    reply: tx,
                };
                let answered = match h.tx.send(cmd).await {
                    Ok(()) => rx.await.ok(),
                    Err(_) => None,
                };
                match answered {
                    Some(r) => r,
                    // The owner task ended with this command still queued: another delete (or
                    // the server's shutdown) went first. It published the box's last state
                    // before ending, so a delete that lost the race answers as a repeated one.
                    None => {
                        let last = h.state.borrow().clone();
                        if last.state == BoxState::Destroyed {
                            Ok(last)
                        } else {
                            Err(EngineError::Conflict(format!(
                                "box {id} is {}; retry the delete",
                                last.state.as_str()
                            )))
                        }
                    }
                }
            }
            None => {
                self.stop_box_sessions(id, "box deleted").await;
                if b.state == BoxState::Destroyed {
                    return Ok(b);
                }
                let mut b = b;
                if let Some(backend) = self.backends.get(&b.backend) {
                    backend.destroy(&b.id).await?;
                }
                b.state = BoxState::Destroyed;
                b.updated_at = now();
                self.store.put_box(&b).await?;
                Ok(b)
            }
        }
    }

    /// The workspace archive a `keep_workspace` box left when it was destroyed: a tar, streamed
    /// (decompressed on a blocking thread as the client reads; the server holds a few chunks).
    /// The stored archive's digest is checked by a first, streamed pass, so a damaged archive
    /// is a clean error rather than a cut-off download.
    pub async fn box_artifact(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<
        impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
        EngineError,
    > {
        use futures::StreamExt;
        let b = self.get_box(tenant, id).await?;
        let Some(a) = b.artifact else {
            return Err(EngineError::NotFound(format!(
                "box {id} has no workspace archive (keep_workspace, once destroyed)"
            )));
        };
        let unreadable = |e: berth_store::snapshots::SnapshotError| {
            tracing::error!(box_id = %id, error = %e, "reading a workspace archive");
            EngineError::Internal("the workspace archive could not be read intact".into())
        };
        let snapshots = &self.config.snapshots;
        snapshots
            .verify(&a.key, &a.sha256)
            .await
            .map_err(unreadable)?;
        let mut compressed = snapshots
            .get_stream(&a.key, &a.sha256)
            .await
            .map_err(unreadable)?;
        let (zst_tx, zst_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
        tokio::spawn(async move {
            while let Some(chunk) = compressed.next().await {
                let Ok(chunk) = chunk else { return };
                if zst_tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let reader = super::park::ChunkReader::new(zst_rx);
            let mut dec = match zstd::stream::Decoder::new(reader) {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            loop {
                let mut buf = vec![0u8; 256 * 1024];
                match dec.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        });
        Ok(tokio_stream_from(rx))
    }

    /// Park a hybrid box now; it is restored on its next use.
    pub async fn park_box(&self, tenant: &str, id: &str) -> Result<BoxObject, EngineError> {
        let b = self.get_box(tenant, id).await?;
        let h = self
            .box_handle(id)
            .ok_or_else(|| EngineError::Conflict(format!("box {id} is {}", b.state.as_str())))?;
        let (tx, rx) = oneshot::channel();
        let gone = || EngineError::Conflict(format!("box {id} is gone"));
        h.tx.send(BoxCmd::Park { reply: tx })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Hand an egress decision to its box's owner task (dropped if the box is gone or its
    /// queue is full: decisions are guest-triggered and must not back up).
    pub fn box_egress_decision(&self, d: berth_gateway::egress::Decision) {
        if let Some(h) = self.box_handle(&d.box_id) {
            if h.tx.try_send(BoxCmd::Egress(d)).is_err() {
                metrics::counter!("berth_box_events_dropped_total").increment(1);
            }
        }
    }

    /// A box's event log after `after` (state changes, egress decisions).
    pub async fn box_events(
        &self,
        tenant: &str,
        id: &str,
        after: i64,
    ) -> Result<Vec<BoxEvent>, EngineError> {
        self.get_box(tenant, id).await?;
        // The store keeps box and session logs alike (its `session_id` is the box's id here);
        // the API names the box.
        Ok(self
            .store
            .box_events_after(id, after, 1000)
            .await?
            .into_iter()
            .map(|e| BoxEvent {
                seq: e.seq,
                box_id: e.session_id,
                ts: e.ts,
                kind: e.kind.into(),
                data: e.data,
            })
            .collect())
    }

    /// Give a box the previous server run left an owner task again (see `reconcile`): a
    /// running box is adopted from its backend (or recorded stopped when it is gone); a parked
    /// one waits for its next use.
    pub async fn resume_box(self: &Arc<Self>, mut obj: BoxObject) -> Result<(), EngineError> {
        let backend = self
            .backends
            .get(&obj.backend)
            .cloned()
            .ok_or_else(|| EngineError::Internal("backend vanished".into()))?;
        let last_seq = self.store.last_box_seq(&obj.id).await?;
        let start = if obj.state == BoxState::Parked {
            Start::Parked { last_seq }
        } else {
            obj.state = BoxState::Creating;
            Start::Adopt { last_seq }
        };
        let handle = spawn(self.box_deps(), backend, obj.clone(), vec![], start);
        self.registry.insert_box(&obj.id, handle.clone());
        let mut rx = handle.state.clone();
        let _ = rx.wait_for(|b| b.state != BoxState::Creating).await;
        Ok(())
    }

    /// If the box is parked, restore it and resume the sessions the park stopped (true);
    /// otherwise nothing (false). Concurrent callers are served in turn by the box's owner task.
    pub async fn ensure_unparked(
        self: &Arc<Self>,
        tenant: &str,
        box_id: &str,
    ) -> Result<bool, EngineError> {
        let b = self.get_box(tenant, box_id).await?;
        if !rules::needs_restore(b.state) {
            return Ok(false);
        }
        self.take_released_box(&b).await?;
        let h = self.box_handle(box_id).ok_or_else(|| {
            EngineError::Conflict(format!("box {box_id} is {}", b.state.as_str()))
        })?;
        // A park in progress finishes first (the owner task takes one command at a time).
        let (tx, rx) = oneshot::channel();
        let gone = || EngineError::Conflict(format!("box {box_id} is gone"));
        h.tx.send(BoxCmd::Restore { reply: tx })
            .await
            .map_err(|_| gone())?;
        // The owner task has resumed the sessions the park stopped before it answers.
        rx.await.map_err(|_| gone())??;
        Ok(true)
    }
}
