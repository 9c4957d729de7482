//! A box's park, restore and workspace archive, as its owner task carries them out: the
//! archive is made and unpacked by `tar` inside the box (`engine::park`), stored in the
//! snapshot store, and recorded in the box.

use super::actor::{BoxActor, Served};
use crate::auth::now;
use crate::engine::error::EngineError;
use berth_api::BoxState;
use berth_sandbox::Sandbox;
use tokio::time::Instant;

impl BoxActor {
    /// Idle hybrid box: stop its agents, snapshot it, verify the snapshot, destroy the box. A
    /// failure at any step before the destroy leaves the box running (its agents restarted).
    pub(super) async fn park(&mut self, served: &mut Option<Served>, why: &str) {
        let t = Instant::now();
        self.set(BoxState::Parking, Some(why.into())).await;
        let sessions = self
            .deps
            .registry
            .stop_box_sessions(&self.obj.id, "box parked")
            .await;
        let key = format!("boxes/{}/{}.tar.zst", self.obj.id, self.last_seq + 1);
        let mut snapshot = match self
            .archive(
                &crate::engine::park::PATHS,
                crate::engine::park::Audience::Box,
                key,
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(box_id = %self.obj.id, error = %e, "parking failed; the box keeps running");
                self.set(BoxState::Running, Some(format!("park failed: {e}")))
                    .await;
                if let Some(engine) = self.deps.engine.upgrade() {
                    engine.resume_sessions(&self.obj.tenant, &sessions).await;
                }
                return;
            }
        };
        snapshot.sessions = sessions;
        self.obj.snapshot = Some(snapshot);
        *served = None;
        if let Err(e) = self.backend.destroy(&self.obj.id).await {
            tracing::error!(box_id = %self.obj.id, error = %e, "destroying a parked box");
        }
        self.set(BoxState::Parked, Some(why.into())).await;
        metrics::histogram!("berth_box_park_seconds").record(t.elapsed().as_secs_f64());
    }

    /// A parked box's next use: a fresh box at the same paths with the snapshot unpacked, then
    /// the sessions the park stopped restarted; a box that is not parked answers at once.
    pub(super) async fn restore(&mut self, served: &mut Option<Served>) -> Result<(), EngineError> {
        if self.obj.state != BoxState::Parked {
            return Ok(());
        }
        let Some(snap) = self.obj.snapshot.clone() else {
            return Err(EngineError::Internal(
                "parked box without a snapshot".into(),
            ));
        };
        // A parked box holds nothing: coming back counts against the tenant's limits again.
        let admitted = self
            .deps
            .admission
            .admit(&self.obj.tenant, &self.obj.resources)?;
        let t = Instant::now();
        self.set(BoxState::Restoring, None).await;
        // `restoring` is published: the box now counts as held by its state, not twice.
        drop(admitted);
        let reason = Some("restored from its snapshot".to_string());
        let restored = self.bring_up(false, Some(&snap), reason).await;
        match restored {
            Ok(s) => *served = Some(s),
            Err(e) => {
                // The snapshot stays; the box stays parked and may be tried again.
                self.set(BoxState::Parked, Some(format!("restore failed: {e}")))
                    .await;
                return Err(EngineError::Internal(format!(
                    "restoring box {}: {e}",
                    self.obj.id
                )));
            }
        }
        metrics::histogram!("berth_box_restore_seconds").record(t.elapsed().as_secs_f64());
        self.drop_snapshot().await;
        // The sessions the park stopped come back with the box, before the use that restored
        // it is answered (a message to one of them then finds it running).
        if let Some(engine) = self.deps.engine.upgrade() {
            engine
                .resume_sessions(&self.obj.tenant, &snap.sessions)
                .await;
        }
        Ok(())
    }

    /// Archive `/workspace` for download after the box is gone. A failure is recorded in the
    /// box's events and does not hold up the destroy.
    pub(super) async fn keep_workspace(&mut self) {
        let key = format!("artifacts/{}.tar.zst", self.obj.id);
        match self
            .archive(&["workspace"], crate::engine::park::Audience::Client, key)
            .await
        {
            Ok(a) => self.obj.artifact = Some(a),
            Err(e) => {
                self.event("artifact_failed", serde_json::json!({ "reason": e }))
                    .await
            }
        }
    }

    /// `paths` of the box archived by `tar` inside it and stored at `key`; the error is fit
    /// for clients (the store's own, which names server paths, is only logged).
    pub(super) async fn archive(
        &mut self,
        paths: &[&str],
        audience: crate::engine::park::Audience,
        key: String,
    ) -> Result<berth_api::SnapshotInfo, String> {
        let store_error = |e: &dyn std::fmt::Display| {
            tracing::error!(box_id = %self.obj.id, error = %e, "storing an archive");
            "the archive could not be stored".to_string()
        };
        let mut out = self
            .deps
            .snapshots
            .writer(&key)
            .await
            .map_err(|e| store_error(&e))?;
        let dropped = match crate::engine::park::capture_paths(
            &self.backend,
            &self.obj.id,
            paths,
            audience,
            self.obj.resources.disk_mib,
            &mut out,
        )
        .await
        {
            Ok(d) => d,
            Err(e) => {
                let _ = out.abort().await;
                return Err(match e {
                    crate::engine::park::ParkError::Store(e) => store_error(&e),
                    e => e.to_string(),
                });
            }
        };
        let s = out.finish().await.map_err(|e| store_error(&e))?;
        if dropped.count > 0 {
            self.event(
                "artifact_entries_dropped",
                serde_json::json!({"count": dropped.count, "names": dropped.names,
                    "reason": "links leading out of the archive, unsafe names, devices"}),
            )
            .await;
        }
        Ok(berth_api::SnapshotInfo {
            key: s.key,
            bytes: s.bytes,
            sha256: s.sha256,
            taken_at: now(),
            sessions: vec![],
        })
    }

    /// Forget the box's snapshot (restored or destroyed): the object store's copy goes too.
    pub(super) async fn drop_snapshot(&mut self) {
        if let Some(snap) = self.obj.snapshot.take() {
            if let Err(e) = self.deps.snapshots.delete(&snap.key).await {
                tracing::warn!(box_id = %self.obj.id, error = %e, "deleting a snapshot");
            }
            self.obj.updated_at = now();
            if let Err(e) = self.deps.store.put_box(&self.obj).await {
                tracing::error!(box_id = %self.obj.id, error = %e, "persisting box state");
            }
            self.publish();
        }
    }
}
