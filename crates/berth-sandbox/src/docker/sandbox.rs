//! The [`Sandbox`] contract for Docker boxes: create (image, host directory, container spec,
//! start, supervisor up), exec and port connections over the supervisor's control socket,
//! files in the box's workspace, adoption of a container a previous server made, and destroy
//! (container, disk, directory and uid range all released).

use super::host_dir::{release_dir, release_disk};
use super::stats::oom_kill_count;
use super::{
    engine_err, poisoned, DockerBackend, DockerBox, BACKEND_LABEL, BOX_LABEL, UID_BASE_LABEL,
    UID_RANGE,
};
use crate::native::client;
use crate::{
    BoxConfig, BoxExit, BoxInfo, Capabilities, ExecHandle, ExecSpec, FileContent, Image, Result,
    Sandbox, SandboxError, Stats,
};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use tokio::sync::watch;

impl Sandbox for DockerBackend {
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    async fn health(&self) -> Result<()> {
        self.docker.ping().await.map_err(engine_err)?;
        Ok(())
    }

    async fn create(&self, cfg: BoxConfig) -> Result<BoxInfo> {
        if !crate::valid_box_id(&cfg.id) {
            return Err(SandboxError::InvalidSpec(format!(
                "invalid box id {:?}",
                cfg.id
            )));
        }
        cfg.limits.validate()?;
        if self
            .boxes
            .lock()
            .map_err(|_| poisoned())?
            .contains_key(&cfg.id)
        {
            return Err(SandboxError::Exists(cfg.id.clone()));
        }
        let image = match &cfg.image {
            Image::Host => self.ensure_host_image().await?,
            Image::Oci(reference) => reference.clone(),
            Image::Rootfs(_) => {
                return Err(SandboxError::Unsupported(
                    "an unpacked root file system (use an OCI image reference)".into(),
                ))
            }
        };
        let dir = self.box_dir(&cfg.id);
        let uid_base = self.take_uid_base(&cfg.id, None)?;
        if let Err(e) = self.prepare_dirs(&dir, &cfg, uid_base) {
            release_dir(&dir);
            self.release_uid_base(&cfg.id);
            return Err(e);
        }
        let name = self.container_name(&cfg.id);
        let body = self.container_spec(&cfg, &dir, image, uid_base);
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self.docker.create_container(Some(opts), body).await;
        if let Err(e) = created {
            release_dir(&dir);
            self.release_uid_base(&cfg.id);
            return Err(SandboxError::Start(format!("creating the container: {e}")));
        }
        let (b, exit_tx) = DockerBox::new(&name, &dir, &cfg, uid_base);
        self.boxes
            .lock()
            .map_err(|_| poisoned())?
            .insert(cfg.id.clone(), b.clone());
        if let Err(e) = self
            .docker
            .start_container(
                &name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
        {
            let _ = self.destroy(&cfg.id).await;
            return Err(SandboxError::Start(format!("starting the container: {e}")));
        }
        self.watch_exit(name.clone(), exit_tx);
        let ready = self.until_ready(&b, cfg.id.clone()).await;
        if ready.is_err() {
            let _ = self.destroy(&cfg.id).await;
        }
        ready
    }

    async fn exec(&self, id: &str, spec: ExecSpec) -> Result<ExecHandle> {
        let b = self.get_running(id)?;
        let mut req = client::exec_request(&b.env, spec)?;
        if req.uid >= UID_RANGE {
            return Err(SandboxError::InvalidSpec(format!(
                "uid must be below {UID_RANGE}"
            )));
        }
        // The box's uid as the host knows it (0 stays 0: the supervisor refuses it).
        req.uid += b.uid_base;

        let pid = b.pid.load(std::sync::atomic::Ordering::SeqCst);
        let oom_before = oom_kill_count(pid);
        let bx = b.clone();
        client::exec(
            &b.ctl(),
            &req,
            client::Probes {
                oom_killed: Box::new(move || oom_kill_count(pid) > oom_before),
                running: Box::new(move || bx.running()),
                first_output: None,
            },
        )
        .await
    }

    fn files(&self, id: &str) -> Result<crate::files::FilesRoot> {
        let b = self.get_running(id)?;
        Ok(crate::files::FilesRoot {
            root: b.workspace(),
            owner: Some(b.agent_host_uid()),
            gate: b.files_gate.clone(),
        })
    }

    async fn read_file(&self, id: &str, path: &str) -> Result<FileContent> {
        self.files(id)?.read_whole(path).await
    }

    async fn write_file(&self, id: &str, path: &str, data: Vec<u8>, mode: u32) -> Result<()> {
        self.files(id)?.write_whole(path, data, mode).await
    }

    async fn delete_file(&self, id: &str, path: &str) -> Result<()> {
        self.files(id)?.delete(path).await
    }

    async fn stats(&self, id: &str) -> Result<Stats> {
        self.box_stats(id).await
    }

    async fn connect(&self, id: &str, port: u16) -> Result<crate::PortStream> {
        client::connect(&self.get_running(id)?.ctl(), port).await
    }

    fn exit_watch(&self, id: &str) -> Result<watch::Receiver<Option<BoxExit>>> {
        Ok(self.get(id)?.exit.clone())
    }

    async fn adopt(&self, cfg: BoxConfig) -> Result<BoxInfo> {
        if !crate::valid_box_id(&cfg.id) {
            return Err(SandboxError::InvalidSpec(format!(
                "invalid box id {:?}",
                cfg.id
            )));
        }
        let name = self.container_name(&cfg.id);
        let gone = || SandboxError::NotFound(cfg.id.clone());
        let info = match self
            .docker
            .inspect_container(
                &name,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        {
            Ok(i) => i,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Err(gone()),
            Err(e) => return Err(engine_err(e)),
        };
        // Only a running container this backend made for this very box.
        let labels = info
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let ours = labels.get(BOX_LABEL) == Some(&cfg.id)
            && labels.get(BACKEND_LABEL) == Some(&self.cfg.name);
        let running = info.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        let dir = self.box_dir(&cfg.id);
        if !ours || !running || !dir.join("ctl").is_dir() {
            return Err(gone());
        }
        // Boxes made before per-box uids ran as host uid AGENT_UID (base 0).
        let uid_base = labels
            .get(UID_BASE_LABEL)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0);
        self.take_uid_base(&cfg.id, Some(uid_base))?;
        let (b, exit_tx) = DockerBox::new(&name, &dir, &cfg, uid_base);
        {
            let mut boxes = self.boxes.lock().map_err(|_| poisoned())?;
            if boxes.contains_key(&cfg.id) {
                return Err(SandboxError::Exists(cfg.id.clone()));
            }
            boxes.insert(cfg.id.clone(), b.clone());
        }
        self.watch_exit(name, exit_tx);
        let ready = self.until_ready(&b, cfg.id.clone()).await;
        if ready.is_err() {
            self.boxes.lock().map_err(|_| poisoned())?.remove(&cfg.id);
        }
        ready
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        if !crate::valid_box_id(id) {
            return Err(SandboxError::InvalidSpec(format!("invalid box id {id:?}")));
        }
        let known = self.boxes.lock().map_err(|_| poisoned())?.remove(id);
        let name = known
            .as_ref()
            .map(|b| b.container.clone())
            .unwrap_or_else(|| self.container_name(id));
        let opts = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(&name, Some(opts)).await {
            Ok(()) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(engine_err(e)),
        }
        let dir = self.box_dir(id);
        if dir.exists() {
            tokio::task::spawn_blocking(move || {
                release_disk(&dir);
                std::fs::remove_dir_all(&dir)
            })
            .await
            .map_err(crate::blocking_err)??;
        }
        self.release_uid_base(id);
        Ok(())
    }
}
