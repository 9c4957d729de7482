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

use crate::native::client;
use crate::native::init::{SUPERVISOR_BRIDGES_ENV, SUPERVISOR_CTL_ENV, SUPERVISOR_NPROC_ENV};
use crate::{
    BoxConfig, BoxExit, BoxInfo, Capabilities, ExecHandle, ExecSpec, FileContent, Image, Result,
    Sandbox, SandboxError, Stats, AGENT_UID,
};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountTypeEnum};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StatsOptionsBuilder, WaitContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The local image `host` boxes start from; its tag is a digest of its content, so a change
/// of the host's `/etc` makes a new one.
pub const HOST_IMAGE_REPO: &str = "berth-host";
/// Label every berth container carries (value: the box id), to find them after a restart.
pub const BOX_LABEL: &str = "dev.berth.box";
/// Label naming the backend that made the container.
pub const BACKEND_LABEL: &str = "dev.berth.backend";
const CTL_DIR: &str = "/run/berth-ctl";
const HELPER_IN_BOX: &str = "/run/berth-ctl/init";
const TINI_IN_BOX: &str = "/run/berth-ctl/tini";
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Where gVisor boxes find the compatibility shim (read-only, readable by the agent).
const COMPAT_IN_BOX: &str = "/run/berth-compat";
/// The shim, built from `compat/statx_compat.c` by the build script.
const STATX_COMPAT_SO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/statx_compat.so"));
/// Host threads a gVisor sandbox needs beyond its guest's processes.
const GVISOR_THREADS: u64 = 512;
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

/// Top-level host directories of the `host` image: bound read-only when they are directories,
/// recreated as the same symlink when they are symlinks (merged /usr).
const HOST_DIRS: [&str; 8] = [
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "opt",
];

/// The `host` image's root as a tar: a copy of the host's `/etc` without its secrets (in the
/// image rather than bound, so the engine can place `/etc/hosts` and friends on top, which
/// gVisor cannot do over a read-only bind), the merged-/usr symlinks, and empty mount points.
fn host_image_tar() -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let dir = |b: &mut tar::Builder<Vec<u8>>, d: &str, mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, format!("{d}/"), std::io::empty())
    };
    for d in HOST_DIRS {
        let p = Path::new("/").join(d);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&p)?;
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mtime(0);
                h.set_mode(0o777);
                b.append_link(&mut h, d, target)?;
            }
            Ok(_) => dir(&mut b, d, 0o755)?,
            Err(_) => {}
        }
    }
    for d in [
        "workspace",
        "home",
        "home/agent",
        "run",
        "run/berth",
        "run/berth-ctl",
        "proc",
        "sys",
        "dev",
        "root",
    ] {
        dir(&mut b, d, 0o755)?;
    }
    dir(&mut b, "tmp", 0o1777)?;
    // /etc, minus what boxes must not read.
    let hidden: Vec<&Path> = crate::native::MASKED_FILES
        .iter()
        .chain(crate::native::MASKED_DIRS.iter())
        .map(Path::new)
        .collect();
    let mut stack = vec![PathBuf::from("/etc")];
    while let Some(d) = stack.pop() {
        let rel = d.strip_prefix("/").unwrap_or(&d).to_path_buf();
        b.append_path_with_name(&d, &rel)?;
        let mut entries: Vec<_> = std::fs::read_dir(&d)?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if hidden.contains(&p.as_path()) {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix("/").unwrap_or(&p).to_path_buf();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() || m.file_type().is_symlink() {
                b.append_path_with_name(&p, &rel)?;
            }
        }
    }
    b.into_inner()
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

    /// The engine's pids limit for a box allowed `pids` processes. Under gVisor the guest's
    /// processes are not host processes: the host cgroup counts the sandbox's own threads
    /// (sentry and gofer), so the box gets headroom for them.
    fn host_pids(&self, pids: u64) -> i64 {
        if self.gvisor() {
            (pids + GVISOR_THREADS) as i64
        } else {
            pids as i64
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The in-box process limit the supervisor sets (empty: none, the host cgroup counts).
    fn guest_nproc(&self, pids: u64) -> String {
        if self.gvisor() {
            // The box's init and supervisor count towards `pids` as in a cgroup; they run as
            // root, so the agent uid's share is what is left.
            pids.saturating_sub(2).max(1).to_string()
        } else {
            String::new()
        }
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

    /// Import the `host` base image once, if the engine does not have it; its reference.
    async fn ensure_host_image(&self) -> Result<String> {
        self.image
            .get_or_try_init(|| async {
                let tar = tokio::task::spawn_blocking(host_image_tar)
                    .await
                    .map_err(crate::blocking_err)??;
                let digest = {
                    use sha2::Digest;
                    hex::encode(&sha2::Sha256::digest(&tar)[..8])
                };
                let reference = format!("{HOST_IMAGE_REPO}:{digest}");
                if self.docker.inspect_image(&reference).await.is_ok() {
                    return Ok(reference);
                }
                let opts = CreateImageOptionsBuilder::new()
                    .from_src("-")
                    .repo(HOST_IMAGE_REPO)
                    .tag(&digest)
                    .build();
                let mut s = self.docker.create_image(
                    Some(opts),
                    Some(bollard::body_full(tar.into())),
                    None,
                );
                while let Some(r) = s.next().await {
                    r.map_err(engine_err)?;
                }
                Ok(reference)
            })
            .await
            .cloned()
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

    fn mounts(&self, cfg: &BoxConfig, dir: &Path) -> Vec<Mount> {
        let bind = |src: &Path, dst: &str, ro: bool| Mount {
            target: Some(dst.to_string()),
            source: Some(src.to_string_lossy().into_owned()),
            typ: Some(MountTypeEnum::BIND),
            read_only: Some(ro),
            ..Default::default()
        };
        let mut m = Vec::new();
        if matches!(cfg.image, Image::Host) {
            // /etc is in the image (secrets left out); the rest is bound read-only.
            for d in HOST_DIRS {
                let p = Path::new("/").join(d);
                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                    m.push(bind(&p, &format!("/{d}"), true));
                }
            }
        }
        if self.gvisor() {
            let compat = self.cfg.compat_dir();
            m.push(bind(&compat, COMPAT_IN_BOX, true));
            m.push(bind(
                &compat.join("ld.so.preload"),
                "/etc/ld.so.preload",
                true,
            ));
        }
        let data = if dir.join("disk").is_dir() {
            dir.join("disk")
        } else {
            dir.to_path_buf()
        };
        m.push(bind(&data.join("workspace"), "/workspace", false));
        m.push(bind(&data.join("home"), "/home/agent", false));
        if dir.join("etc").is_dir() {
            m.push(bind(&dir.join("etc").join("passwd"), "/etc/passwd", true));
            m.push(bind(&dir.join("etc").join("group"), "/etc/group", true));
        }
        m.push(bind(&dir.join("run"), "/run/berth", false));
        m.push(bind(&dir.join("ctl"), CTL_DIR, false));
        m.push(Mount {
            target: Some("/tmp".into()),
            typ: Some(MountTypeEnum::TMPFS),
            tmpfs_options: Some(bollard::models::MountTmpfsOptions {
                size_bytes: Some((cfg.limits.disk_mib.min(1024) as i64) << 20),
                mode: Some(0o1777),
                ..Default::default()
            }),
            ..Default::default()
        });
        m
    }

    /// Host directories of a new box, owned by the agent's host uid where the box writes: its
    /// disk (an ext4 image of `disk_mib` on a loop device, mounted at `<dir>/disk`, where the
    /// host has loop devices) and, for the `host` image, its own user database.
    fn prepare_dirs(&self, dir: &Path, cfg: &BoxConfig, uid_base: u32) -> Result<()> {
        let agent = uid_base + AGENT_UID;
        let owned = |p: &Path| -> Result<()> {
            std::fs::create_dir_all(p)?;
            std::os::unix::fs::chown(p, Some(agent), Some(agent))?;
            Ok(())
        };
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
        let disk = dir.join("disk");
        std::fs::create_dir_all(&disk)?;
        if self.caps.disk_quota {
            mount_disk(dir, &disk, cfg.limits.disk_mib)?;
        }
        owned(&disk.join("workspace"))?;
        owned(&disk.join("home"))?;
        if matches!(cfg.image, Image::Host) {
            let etc = dir.join("etc");
            std::fs::create_dir_all(&etc)?;
            let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
            let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
            std::fs::write(etc.join("passwd"), crate::identity::passwd(&passwd, agent))?;
            std::fs::write(etc.join("group"), crate::identity::group(&group, agent))?;
            for f in ["passwd", "group"] {
                std::fs::set_permissions(etc.join(f), std::fs::Permissions::from_mode(0o644))?;
            }
        }
        // The supervisor's control socket: for the box's root alone (agents cannot reach it).
        std::fs::create_dir_all(dir.join("ctl"))?;
        std::fs::set_permissions(dir.join("ctl"), std::fs::Permissions::from_mode(0o700))?;
        // The gateway and egress sockets are made here by the host after the box starts; the
        // box's uid must be able to connect to them.
        std::fs::create_dir_all(dir.join("run"))?;
        std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o755))?;
        std::fs::copy(&self.cfg.helper, dir.join("ctl").join("init"))?;
        std::fs::set_permissions(
            dir.join("ctl").join("init"),
            std::fs::Permissions::from_mode(0o555),
        )?;
        if let Some(tini) = &self.tini {
            std::fs::copy(tini, dir.join("ctl").join("tini"))?;
            std::fs::set_permissions(
                dir.join("ctl").join("tini"),
                std::fs::Permissions::from_mode(0o555),
            )?;
        }
        Ok(())
    }

    /// Wait until the supervisor accepts connections, or the container has stopped.
    /// Report the container's end, with the reason, on `exit_tx` (for exit_watch).
    fn watch_exit(&self, name: String, exit_tx: watch::Sender<Option<BoxExit>>) {
        let docker = self.docker.clone();
        tokio::spawn(async move {
            let mut w = docker.wait_container(&name, None::<WaitContainerOptions>);
            let code = match w.next().await {
                Some(Ok(r)) => r.status_code,
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
                _ => -1,
            };
            let oom = docker
                .inspect_container(
                    &name,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await
                .ok()
                .and_then(|i| i.state)
                .and_then(|s| s.oom_killed)
                .unwrap_or(false);
            let _ = exit_tx.send(Some(if oom {
                BoxExit::OomKilled
            } else {
                BoxExit::Exited { code: code as i32 }
            }));
        });
    }

    /// Wait for the box's supervisor, then record the container's PID: the box as started.
    async fn until_ready(&self, b: &DockerBox, id: String) -> Result<BoxInfo> {
        self.wait_ready(b).await?;
        let pid = self.container_pid(&b.container).await;
        b.pid
            .store(pid.unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
        Ok(BoxInfo {
            id,
            pid,
            run_dir: b.dir.join("run"),
        })
    }

    /// The container's host PID (its init), as the engine reports it.
    async fn container_pid(&self, container: &str) -> Option<i32> {
        self.docker
            .inspect_container(
                container,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .ok()
            .and_then(|i| i.state)
            .and_then(|s| s.pid)
            .map(|p| p as i32)
    }

    async fn wait_ready(&self, b: &DockerBox) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            if tokio::net::UnixStream::connect(b.ctl()).await.is_ok() {
                return Ok(());
            }
            if !b.running() || tokio::time::Instant::now() > deadline {
                let logs = self.logs_tail(&b.container).await;
                return Err(SandboxError::Start(format!(
                    "the box's supervisor did not come up: {logs}"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    async fn logs_tail(&self, container: &str) -> String {
        let opts = bollard::query_parameters::LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail("20")
            .build();
        let mut s = self.docker.logs(container, Some(opts));
        let mut out = String::new();
        while let Some(Ok(l)) = s.next().await {
            out.push_str(&l.to_string());
        }
        out
    }
}

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
        let bridges = cfg
            .bridges
            .iter()
            .map(|b| format!("{}={}", b.port, b.socket))
            .collect::<Vec<_>>()
            .join(",");
        let mut labels = HashMap::new();
        labels.insert(BOX_LABEL.to_string(), cfg.id.clone());
        labels.insert(BACKEND_LABEL.to_string(), self.cfg.name.clone());
        labels.insert(UID_BASE_LABEL.to_string(), uid_base.to_string());
        let memory = (cfg.limits.memory_mib as i64) << 20;
        let body = ContainerCreateBody {
            image: Some(image),
            cmd: Some(match self.tini {
                Some(_) => vec![
                    TINI_IN_BOX.into(),
                    "--".into(),
                    HELPER_IN_BOX.into(),
                    "__box-init".into(),
                ],
                None => vec![HELPER_IN_BOX.into(), "__box-init".into()],
            }),
            entrypoint: Some(vec![]),
            env: Some(vec![
                format!("{SUPERVISOR_CTL_ENV}={CTL_DIR}/ctl.sock"),
                format!("{SUPERVISOR_BRIDGES_ENV}={bridges}"),
                format!(
                    "{SUPERVISOR_NPROC_ENV}={}",
                    self.guest_nproc(cfg.limits.pids)
                ),
            ]),
            // The box's init and supervisor run as the container's root with only the
            // capabilities needed to start (and signal) agent processes as AGENT_UID with none at all
            // (bounding set emptied, ids switched, no_new_privs): an agent can then neither
            // signal nor trace them, so it cannot end its own box by killing pid 1 (gVisor
            // does not shield a namespace's init from SIGKILL) or stall the supervisor.
            user: Some("0:0".into()),
            working_dir: Some("/workspace".into()),
            hostname: Some(cfg.id.clone()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                runtime: Some(self.cfg.runtime.clone()),
                network_mode: Some("none".into()),
                init: Some(false),
                readonly_rootfs: Some(true),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(vec![
                    "SETUID".into(),
                    "SETGID".into(),
                    "SETPCAP".into(),
                    "KILL".into(),
                ]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                nano_cpus: Some((cfg.limits.cpus * 1e9) as i64),
                memory: Some(memory),
                memory_swap: Some(memory),
                pids_limit: Some(self.host_pids(cfg.limits.pids)),
                mounts: Some(self.mounts(&cfg, &dir)),
                ipc_mode: Some("private".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
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
        let b = self.get_running(id)?;
        let opts = StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        let s = self
            .docker
            .stats(&b.container, Some(opts))
            .next()
            .await
            .ok_or_else(|| SandboxError::Unreachable("no stats from the engine".into()))?
            .map_err(engine_err)?;
        let (root, quota) = (b.workspace(), b.quota);
        let used = tokio::task::spawn_blocking(move || {
            if quota {
                crate::fsops::disk_usage(&root).map(|(u, _)| u).unwrap_or(0)
            } else {
                dir_usage(&root)
            }
        })
        .await
        .map_err(crate::blocking_err)?;
        let mem = s.memory_stats.as_ref();
        Ok(Stats {
            cpu_usage_ns: s
                .cpu_stats
                .and_then(|c| c.cpu_usage)
                .and_then(|u| u.total_usage)
                .unwrap_or(0),
            memory_bytes: mem.and_then(|m| m.usage).unwrap_or(0),
            memory_limit_bytes: b.limits.memory_mib << 20,
            pids: s.pids_stats.and_then(|p| p.current).unwrap_or(0),
            pids_limit: b.limits.pids,
            disk_used_bytes: used,
            disk_limit_bytes: b.limits.disk_mib << 20,
            oom_kills: oom_kill_count(b.pid.load(std::sync::atomic::Ordering::SeqCst)),
        })
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

/// OOM kills in the memory cgroup of the process `pid` (the container's init), read from the
/// The shim gVisor boxes preload (see `compat/statx_compat.c`) and the `ld.so.preload` naming
/// it, written into `dir` (world-readable: the agent's programs load it).
fn write_gvisor_compat(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let so = dir.join("statx_compat.so");
    std::fs::write(&so, STATX_COMPAT_SO)?;
    std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o644))?;
    let preload = dir.join("ld.so.preload");
    std::fs::write(&preload, format!("{COMPAT_IN_BOX}/statx_compat.so\n"))?;
    std::fs::set_permissions(&preload, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// cgroup files (v1 `memory.oom_control`, v2 `memory.events`).
fn oom_kill_count(pid: i32) -> u64 {
    let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return 0;
    };
    let keyed = |file: String| -> Option<u64> {
        std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|v| v.trim().parse().ok())
        })
    };
    for line in cg.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let n = if controllers.split(',').any(|c| c == "memory") {
            keyed(format!("/sys/fs/cgroup/memory{path}/memory.oom_control"))
        } else if controllers.is_empty() {
            keyed(format!("/sys/fs/cgroup{path}/memory.events"))
        } else {
            None
        };
        if let Some(n) = n {
            return n;
        }
    }
    0
}

/// Bytes used by files under `root` (not following symlinks).
fn dir_usage(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// Format a `mib` MiB ext4 image in `dir`, attach it to a loop device (auto-clear) and mount
/// it at `target` (nosuid, nodev): the box's disk quota. The engine binds from it.
fn mount_disk(dir: &Path, target: &Path, mib: u64) -> Result<()> {
    use crate::native::disk;
    let img = dir.join("disk.img");
    disk::format_image(&img, mib, None)?;
    let ready = disk::mount_detached(&img).map_err(SandboxError::Start)?;
    disk::attach(std::os::fd::AsFd::as_fd(&ready.mount), target).map_err(SandboxError::Start)?;
    // Mounted where the engine sees it; the loop device is freed when it is unmounted.
    let _ = std::fs::remove_file(&img);
    Ok(())
}

/// Unmount a box's disk, if it has one (its loop device then frees itself).
fn release_disk(dir: &Path) {
    let disk = dir.join("disk");
    if is_mount_point(&disk) {
        let _ = nix::mount::umount2(&disk, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Remove what a box that never started left in `dir`.
fn release_dir(dir: &Path) {
    release_disk(dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// Whether `p` is the root of a mount (its device differs from its parent's).
fn is_mount_point(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}
