//! The Docker backend, and gVisor through Docker's `runsc` runtime.
//!
//! A box is a container: the engine builds its namespaces, cgroup and root; berth's own
//! supervisor (the `berth-box-init` helper, bound in read-only) is its main process behind the
//! engine's `docker-init` (tini, reaping orphans), so exec streaming, stdin, signals, timeouts, port connections and the gateway
//! bridges are the same protocol as in native boxes, over a control socket in a host directory
//! bound into the container.
//!
//! The `host` image is the host's `/usr`, `/lib*` and `/opt` bound read-only onto a small
//! local image (`berth-host:<digest>`, imported from an in-memory tar holding a copy of the
//! host's `/etc` without its secrets and the merged-/usr symlinks: no registry needed). An OCI
//! image reference can take its place. Every box runs as the agent uid with no capabilities,
//! `no-new-privileges`, Docker's default seccomp profile plus berth's own filter per process,
//! a read-only root, `--network none` (loopback only; the gateway seam is the bridged Unix
//! sockets), and cpu, memory (no swap) and pids limits.
//!
//! Each box has a host uid range of its own (box uid `u` is host uid `base + u`) and a disk of
//! its own (an ext4 image on a loop device mounted under the box's directory; `/workspace` and
//! `/home/agent` are bound from it), like a native box. What it does not offer (reported in
//! [`Capabilities`]): user namespaces (the daemon's userns-remap is one mapping for all
//! containers; the agent's uid in the box is its host uid), Landlock under gVisor (its kernel
//! does not implement it).

mod host_dir;
mod image;
mod lifecycle;
mod sandbox;
mod spec;
mod stats;

use crate::{BoxConfig, BoxExit, Capabilities, Result, SandboxError, AGENT_UID};
use bollard::query_parameters::ListContainersOptionsBuilder;
use bollard::Docker;
use host_dir::is_mount_point;
use image::write_gvisor_compat;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The local image `host` boxes start from; its tag is a digest of its content, so a change
/// of the host's `/etc` makes a new one.
pub const HOST_IMAGE_REPO: &str = "berth-host";
/// Label every berth container carries (value: the box id), to find them after a restart.
pub const BOX_LABEL: &str = "dev.berth.box";
/// Label naming the backend that made the container.
pub const BACKEND_LABEL: &str = "dev.berth.backend";
/// Where gVisor boxes find the compatibility shim (read-only, readable by the agent).
const COMPAT_IN_BOX: &str = "/run/berth-compat";
// Box uid `u` runs as host uid `base + slot·UID_RANGE + u`: each box's users are host users
// of their own, so the kernel's per-user counters and limits (inotify instances, processes,
// message queues, ...) are the box's alone. runc and gVisor boxes draw from disjoint regions
// (`crate::uids`): the server runs one backend of each, each with its own slot table.
use crate::uids::UID_RANGE;
/// Label recording a container's uid base, for adoption after a restart.
const UID_BASE_LABEL: &str = "dev.berth.uid-base";

#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Name the server knows the backend by (`docker`, `gvisor`).
    pub name: String,
    /// The engine's runtime for these boxes (`runc`, `runsc`).
    pub runtime: String,
    pub data_dir: PathBuf,
    /// The `berth-box-init` helper (or the `berth` binary), bound into each box.
    pub helper: PathBuf,
    /// The engine's socket (default: `$DOCKER_HOST` or `/var/run/docker.sock`).
    pub socket: Option<PathBuf>,
}

impl DockerConfig {
    /// Whether the runtime is gVisor's (`runsc`, or a variant such as `runsc-debug`).
    fn is_gvisor(&self) -> bool {
        self.runtime.starts_with("runsc")
    }

    /// The host uid region this backend's boxes draw from.
    fn uid_region(&self) -> crate::uids::UidRegion {
        if self.is_gvisor() {
            crate::uids::GVISOR
        } else {
            crate::uids::DOCKER
        }
    }

    /// Where the gVisor compatibility shim is kept for this backend's boxes.
    fn compat_dir(&self) -> PathBuf {
        self.data_dir.join(format!("{}-compat", self.name))
    }
}

struct DockerBox {
    container: String,
    /// Host PID of the container's init (0 until started, or when the engine did not say).
    pid: std::sync::atomic::AtomicI32,
    dir: PathBuf,
    limits: crate::Limits,
    env: Vec<(String, String)>,
    exit: watch::Receiver<Option<BoxExit>>,
    files_gate: crate::files::Gate,
    /// Host uid of the box's uid 0 (never used: the box's root is the container's).
    uid_base: u32,
    /// Holds `workspace/` and `home/`: the box's disk (an ext4 image, the quota) mounted at
    /// `<dir>/disk`, or the box directory itself where the host has no loop devices.
    data: PathBuf,
    quota: bool,
}

impl DockerBox {
    /// A box's record, before its container is known to run; the sender reports its end.
    fn new(
        container: &str,
        dir: &Path,
        cfg: &BoxConfig,
        uid_base: u32,
    ) -> (Arc<DockerBox>, watch::Sender<Option<BoxExit>>) {
        let disk = dir.join("disk");
        let quota = is_mount_point(&disk);
        let (exit_tx, exit) = watch::channel(None);
        let b = Arc::new(DockerBox {
            container: container.to_string(),
            pid: std::sync::atomic::AtomicI32::new(0),
            dir: dir.to_path_buf(),
            limits: cfg.limits,
            env: cfg.env.clone(),
            exit,
            files_gate: crate::files::new_gate(),
            uid_base,
            data: if disk.is_dir() {
                disk
            } else {
                dir.to_path_buf()
            },
            quota,
        });
        (b, exit_tx)
    }

    fn ctl(&self) -> PathBuf {
        self.dir.join("ctl").join("ctl.sock")
    }
    fn workspace(&self) -> PathBuf {
        self.data.join("workspace")
    }
    fn agent_host_uid(&self) -> u32 {
        self.uid_base + AGENT_UID
    }
    fn running(&self) -> bool {
        self.exit.borrow().is_none()
    }
}

pub struct DockerBackend {
    cfg: DockerConfig,
    docker: Docker,
    caps: Capabilities,
    boxes: Mutex<HashMap<String, Arc<DockerBox>>>,
    image: tokio::sync::OnceCell<String>,
    /// The engine's `docker-init` (tini), run as the box's PID 1 to reap orphans. Docker's
    /// own `--init` mounts it at `/sbin/docker-init`, which the read-only host `/sbin` hides.
    tini: Option<PathBuf>,
    /// Uid slots taken, by box id (see [`DockerConfig::uid_region`]).
    uid_slots: Arc<Mutex<HashMap<String, u32>>>,
}

fn engine_err(e: bollard::errors::Error) -> SandboxError {
    SandboxError::Unreachable(format!("docker engine: {e}"))
}

fn poisoned() -> SandboxError {
    SandboxError::Io(std::io::Error::other("box table poisoned"))
}

impl DockerBackend {
    /// Connect to the engine and check it answers and offers `cfg.runtime`.
    pub async fn new(cfg: DockerConfig) -> Result<DockerBackend> {
        let docker = match &cfg.socket {
            Some(p) => {
                Docker::connect_with_unix(&p.to_string_lossy(), 120, bollard::API_DEFAULT_VERSION)
            }
            None => Docker::connect_with_local_defaults(),
        }
        .map_err(engine_err)?;
        let info = docker.info().await.map_err(engine_err)?;
        let runtimes = info.runtimes.unwrap_or_default();
        if !runtimes.contains_key(&cfg.runtime) {
            return Err(SandboxError::Unsupported(format!(
                "the docker engine has no {:?} runtime (it has {:?})",
                cfg.runtime,
                runtimes.keys().collect::<Vec<_>>()
            )));
        }
        let gvisor = cfg.is_gvisor();
        let caps = Capabilities {
            name: cfg.name.clone(),
            isolation: if gvisor {
                "gvisor: a user-space kernel (runsc) between the box and the host, via docker"
                    .into()
            } else {
                "docker container (runc): namespaces, cgroup, seccomp".into()
            },
            user_namespace: false,
            seccomp: true,
            landlock: !gvisor,
            disk_quota: crate::native::disk::loop_supported(),
            // gVisor's guest memory is the sandbox's: the host's OOM killer ends the sandbox.
            process_oom_kill: !gvisor,
            cgroup: "docker".into(),
            network: "none; loopback only, gateway and egress over bridged unix sockets".into(),
            oci_images: false,
            image_references: true,
            adoption: true,
        };
        std::fs::create_dir_all(cfg.data_dir.join(&cfg.name))?;
        if gvisor {
            write_gvisor_compat(&cfg.compat_dir())?;
        }
        Ok(DockerBackend {
            cfg,
            docker,
            caps,
            boxes: Mutex::new(HashMap::new()),
            image: tokio::sync::OnceCell::new(),
            tini: ["/usr/bin/docker-init", "/usr/libexec/docker/docker-init"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file()),
            uid_slots: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    fn gvisor(&self) -> bool {
        self.cfg.is_gvisor()
    }

    fn box_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join(&self.cfg.name).join(id)
    }

    fn container_name(&self, id: &str) -> String {
        format!("berth-{}-{id}", self.cfg.name)
    }

    /// Reserve a uid range for box `id`: `known` (an adopted box's) or the lowest free one.
    fn take_uid_base(&self, id: &str, known: Option<u32>) -> Result<u32> {
        let mut slots = self.uid_slots.lock().map_err(|_| poisoned())?;
        if let Some(base) = known {
            slots.insert(id.to_string(), base);
            return Ok(base);
        }
        let taken: std::collections::HashSet<u32> = slots.values().copied().collect();
        let region = self.cfg.uid_region();
        let base = (0..region.slots)
            .filter_map(|slot| region.slot_base(slot))
            .find(|b| !taken.contains(b))
            .ok_or_else(|| SandboxError::Start("no free uid range for another box".into()))?;
        slots.insert(id.to_string(), base);
        Ok(base)
    }

    fn release_uid_base(&self, id: &str) {
        if let Ok(mut slots) = self.uid_slots.lock() {
            slots.remove(id);
        }
    }

    fn get(&self, id: &str) -> Result<Arc<DockerBox>> {
        self.boxes
            .lock()
            .map_err(|_| poisoned())?
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))
    }

    fn get_running(&self, id: &str) -> Result<Arc<DockerBox>> {
        let b = self.get(id)?;
        if !b.running() {
            return Err(SandboxError::NotRunning(id.to_string()));
        }
        Ok(b)
    }

    /// Containers this backend made that are still in the engine (after a server restart).
    pub async fn leftovers(&self) -> Result<Vec<String>> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_string(),
            vec![format!("{BACKEND_LABEL}={}", self.cfg.name)],
        );
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(engine_err)?;
        Ok(list
            .into_iter()
            .filter_map(|c| c.labels.and_then(|l| l.get(BOX_LABEL).cloned()))
            .collect())
    }
}
