//! The native backend: Linux namespaces, cgroups, seccomp and Landlock, a loop-mounted quota
//! disk, and a small supervisor inside each box. Needs nothing but a Linux kernel, root, and
//! `mkfs.ext4` for quota disks.
//!
//! Boxes are made by the backend's zygote ([`zygote`]), which keeps each image's root prepared.
//!
//! Host layout per box under `<data>/native/boxes/<id>/`: `disk.img` (the box's writable disk,
//! when it is an ext4 image), `run/` (gateway seam, bound at `/run/berth`), `ctl.sock` (exec
//! control socket, reachable only from the host). A template is mounted on
//! `<data>/native/templates/*` only while the zygote roots a namespace in it.

pub mod boost;
pub mod bridge;
pub mod cgroup;
mod children;
pub mod client;
pub mod confine;
pub mod disk;
mod disks;
pub mod fds;
pub mod init;
pub mod pid1;
pub mod protocol;
mod pty;
mod report;
pub mod shared_disk;
pub mod spawn;
pub mod supervisor;
pub mod zygote;

pub use crate::Bridge;
use crate::{
    BoxConfig, BoxExit, BoxInfo, Capabilities, ExecHandle, ExecSpec, FileContent, Image, Result,
    Sandbox, SandboxError, Stats, AGENT_UID,
};
use cgroup::BoxCgroup;
use disks::DiskSupply;
pub use disks::Disks;
pub(crate) use fds::BOX_NOFILE;
use init::{InitConfig, RootSpec, UID_RANGE};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Native boxes' host uid ranges: slot `s` maps box uids onto `UID_REGION.base + s·UID_RANGE`.
const UID_REGION: crate::uids::UidRegion = crate::uids::NATIVE;
const MAX_SLOTS: u32 = UID_REGION.slots;
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const DEFAULT_WRITABLE: [&str; 4] = ["/workspace", "/home/agent", "/tmp", "/dev/shm"];

#[derive(Debug, Clone)]
pub struct NativeConfig {
    pub data_dir: PathBuf,
    /// Executable that runs the box bring-up when invoked as `<helper> __box-init`.
    pub helper: PathBuf,
    /// Formatted disk images kept ready per size (ext4 disks only).
    pub pool_size: usize,
    /// Where boxes' disks come from.
    pub disks: Disks,
}

struct LiveBox {
    dir: PathBuf,
    pid1: i32,
    slot: u32,
    agent_host_uid: u32,
    files_gate: crate::files::Gate,
    limits: crate::Limits,
    env: Vec<(String, String)>,
    cgroup: Arc<BoxCgroup>,
    exit: watch::Receiver<Option<BoxExit>>,
    destroying: Arc<AtomicBool>,
    /// The loop device holding the box's disk, watched for its release after destroy.
    loop_dev: Option<u32>,
}

impl LiveBox {
    fn ctl(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }
    fn workspace(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root/workspace", self.pid1))
    }
    fn running(&self) -> bool {
        self.exit.borrow().is_none()
    }
}

pub struct NativeBackend {
    cfg: NativeConfig,
    caps: Capabilities,
    disks: DiskSupply,
    boxes: Mutex<HashMap<String, Arc<LiveBox>>>,
    /// Uid-range slots no box holds; a create takes the lowest (O(log n), not a scan).
    free_slots: Mutex<BTreeSet<u32>>,
    /// Ids of destroyed boxes whose files and loop devices are still being released.
    reaping: Arc<Mutex<HashSet<String>>>,
    /// Notified each time a reap finishes.
    settled: Arc<tokio::sync::Notify>,
    /// Spawned at the first create, and again should it have died.
    zygote: Mutex<Option<Arc<zygote::Zygote>>>,
    /// Boxes' start boost budgets and the boosts in progress.
    booster: Arc<boost::Booster>,
}

/// Host paths bound read-only into a `host`-image box, and the secrets masked inside them.
fn host_layers() -> Vec<(PathBuf, String)> {
    [
        "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt",
    ]
    .iter()
    .map(|d| (PathBuf::from(format!("/{d}")), format!("/{d}")))
    .collect()
}

pub(crate) const MASKED_FILES: [&str; 6] = [
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/shadow-",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/security/opasswd",
];
pub(crate) const MASKED_DIRS: [&str; 3] = ["/etc/ssh", "/etc/sudoers.d", "/etc/ssl/private"];

impl NativeBackend {
    /// Probe the host and prepare the data directory.
    pub fn new(cfg: NativeConfig) -> Result<NativeBackend> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(SandboxError::Unsupported(
                "the native backend needs root (user, mount and cgroup setup)".into(),
            ));
        }
        fds::raise_open_files();
        let boxes_dir = cfg.data_dir.join("native").join("boxes");
        std::fs::create_dir_all(&boxes_dir)?;
        // Mount points of an earlier run's zygote templates (empty on the host).
        let templates = cfg.data_dir.join("native").join("templates");
        std::fs::create_dir_all(&templates)?;
        for e in std::fs::read_dir(&templates)?.flatten() {
            let _ = std::fs::remove_dir(e.path());
        }
        let disks = DiskSupply::open(&cfg.data_dir.join("native"), cfg.disks, cfg.pool_size)?;
        let v2 = cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode();
        let caps = Capabilities {
            name: "native".into(),
            isolation: "linux namespaces (user, pid, mount, net, uts, ipc, cgroup), pivot_root"
                .into(),
            user_namespace: true,
            seccomp: true,
            landlock: confine::landlock_supported(),
            disk_quota: disks.quota(),
            process_oom_kill: true,
            adoption: false,
            cgroup: if v2 { "v2".into() } else { "v1".into() },
            network: "loopback only; egress through gateway bridges".into(),
            oci_images: true,
            image_references: false,
        };
        Ok(NativeBackend {
            cfg,
            caps,
            disks,
            boxes: Mutex::new(HashMap::new()),
            free_slots: Mutex::new((0..MAX_SLOTS).collect()),
            reaping: Arc::new(Mutex::new(HashSet::new())),
            settled: Arc::new(tokio::sync::Notify::new()),
            zygote: Mutex::new(None),
            booster: Arc::default(),
        })
    }

    /// Hand a box request to the zygote, spawning it first if there is none or it died. The
    /// box's report socket is its log too ([`report`]): the helper's fds 1 and 2.
    fn request_box(
        &self,
        cfg: &InitConfig,
        report: std::os::fd::BorrowedFd<'_>,
        disk: std::os::fd::BorrowedFd<'_>,
    ) -> Result<()> {
        let log = report;
        let mut slot = self
            .zygote
            .lock()
            .map_err(|_| SandboxError::Io(std::io::Error::other("zygote lock poisoned")))?;
        if let Some(z) = slot.as_ref() {
            if z.request(cfg, report, log, disk).is_ok() {
                return Ok(());
            }
        }
        // None yet, or the last one is gone (its socket refuses): start a new one.
        let z = Arc::new(
            zygote::Zygote::spawn(&self.cfg.helper)
                .map_err(|e| SandboxError::Start(e.to_string()))?,
        );
        *slot = Some(z.clone());
        z.request(cfg, report, log, disk)
            .map_err(|e| SandboxError::Start(format!("box zygote: {e}")))
    }

    fn box_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("native").join("boxes").join(id)
    }

    fn get(&self, id: &str) -> Result<Arc<LiveBox>> {
        self.boxes
            .lock()
            .map_err(|_| SandboxError::Io(std::io::Error::other("box table poisoned")))?
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))
    }

    fn get_running(&self, id: &str) -> Result<Arc<LiveBox>> {
        let b = self.get(id)?;
        if !b.running() {
            return Err(SandboxError::NotRunning(id.to_string()));
        }
        Ok(b)
    }

    fn alloc_slot(&self) -> Result<u32> {
        self.free_slots
            .lock()
            .map_err(|_| SandboxError::Io(std::io::Error::other("slot table poisoned")))?
            .pop_first()
            .ok_or_else(|| SandboxError::Start("too many boxes".into()))
    }

    fn free_slot(&self, slot: u32) {
        if let Ok(mut s) = self.free_slots.lock() {
            s.insert(slot);
        }
    }

    async fn start(&self, cfg: &BoxConfig, dir: &Path, slot: u32) -> Result<(LiveBox, BoxInfo)> {
        let run_dir = dir.join("run");
        // Plain directory calls: microseconds, not worth a blocking-pool hop.
        std::fs::create_dir_all(&run_dir)?;
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755))?;
        let disk = self.disks.take(&cfg.id, cfg.limits.disk_mib, dir).await?;
        let uid_base = UID_REGION
            .slot_base(slot)
            .ok_or_else(|| SandboxError::Start("too many boxes".into()))?;
        let root = match &cfg.image {
            Image::Host => RootSpec {
                layers: host_layers(),
                masked_files: MASKED_FILES.iter().map(|s| s.to_string()).collect(),
                masked_dirs: MASKED_DIRS.iter().map(|s| s.to_string()).collect(),
            },
            Image::Oci(r) => {
                return Err(SandboxError::Unsupported(format!(
                    "OCI image references ({r}) in the native backend (unpack it and use a root)"
                )))
            }
            Image::Rootfs(path) => {
                let mut layers = Vec::new();
                for e in std::fs::read_dir(path)?.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if ["proc", "dev", "sys", "tmp", "workspace", "home", "run"]
                        .contains(&name.as_str())
                    {
                        continue;
                    }
                    layers.push((e.path(), format!("/{name}")));
                }
                // Directory order is arbitrary: sorted, equal roots share one template.
                layers.sort();
                RootSpec {
                    layers,
                    masked_files: MASKED_FILES.iter().map(|s| s.to_string()).collect(),
                    masked_dirs: vec![],
                }
            }
        };

        let limits = cfg.limits;
        let id = cfg.id.clone();
        let init_cfg = InitConfig {
            box_id: cfg.id.clone(),
            root,
            template_dir: self.cfg.data_dir.join("native").join("templates"),
            run_dir: run_dir.clone(),
            ctl_socket: dir.join("ctl.sock"),
            uid_base,
            agent_uid: AGENT_UID,
            // The id itself (at most 64 bytes of [A-Za-z0-9_-], a valid host name).
            hostname: cfg.id.clone(),
            bridges: cfg.bridges.clone(),
            // The paths only: the cgroup is made below, while the zygote forks the helper.
            cgroup_join: BoxCgroup::load(&id).join_files(),
        };
        let fail = |cg: &BoxCgroup, msg: String| {
            // Kills the box's helper too: it joined the cgroup first thing.
            let _ = cg.destroy();
            SandboxError::Start(msg)
        };
        // The box's end of its report socket (the box dies when ours closes), which is its
        // log too ([`report`]): one descriptor per box in the server, not two.
        let (mut report, report_box) = std::os::unix::net::UnixStream::pair()?;
        {
            use std::os::fd::AsFd;
            self.request_box(&init_cfg, report_box.as_fd(), disk.mount.as_fd())?;
        }
        // The box holds its own copies now (or, if it fails, the disk goes with them).
        let loop_dev = disk.loop_dev;
        drop((report_box, disk));
        // The cgroup, in parallel with the fork of the helper, which waits for this go-ahead
        // before it joins (a helper that reads EOF instead gives up: so does the box).
        let cg = Arc::new(BoxCgroup::create(&id, &limits)?);
        {
            use std::io::Write;
            if let Err(e) = report.write_all(init::CGROUP_READY) {
                return Err(fail(&cg, format!("box helper gone: {e}")));
            }
        }
        let report = match report
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(report))
        {
            Ok(r) => r,
            Err(e) => return Err(fail(&cg, format!("report socket: {e}"))),
        };
        let mut reports = report::Reports::new(report, &cfg.id);
        let first = match tokio::time::timeout(START_TIMEOUT, reports.next()).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(fail(&cg, "box init exited without a report".into())),
            Err(_) => return Err(fail(&cg, "box init timed out".into())),
        };
        let pid1 = match (first.pid, first.error) {
            (Some(p), None) => p,
            (_, Some(e)) => return Err(fail(&cg, e)),
            (None, None) => return Err(fail(&cg, "empty init report".into())),
        };

        let (exit_tx, exit_rx) = watch::channel(None);
        let destroying = Arc::new(AtomicBool::new(false));
        let flag = destroying.clone();
        let cg_for_exit = cg.clone();
        // Holds our end of the report socket for the box's life (dropping it ends the box),
        // logging what the box's init and supervisor print, until PID 1 reports its end.
        tokio::spawn(async move {
            let mut code = None;
            while let Some(r) = reports.next().await {
                if r.exit.is_some() {
                    code = r.exit;
                    break;
                }
            }
            let reason = if flag.load(Ordering::SeqCst) {
                BoxExit::Destroyed
            } else if cg_for_exit.counters().oom_kills > 0 && code != Some(0) {
                BoxExit::OomKilled
            } else {
                BoxExit::Exited {
                    code: code.unwrap_or(-1),
                }
            };
            let _ = exit_tx.send(Some(reason));
        });

        let live = LiveBox {
            dir: dir.to_path_buf(),
            pid1,
            slot,
            agent_host_uid: uid_base + AGENT_UID,
            files_gate: crate::files::new_gate(),
            limits: cfg.limits,
            env: cfg.env.clone(),
            cgroup: cg,
            exit: exit_rx,
            destroying,
            loop_dev,
        };
        let info = BoxInfo {
            id: cfg.id.clone(),
            pid: Some(pid1),
            run_dir,
        };
        Ok((live, info))
    }
}

impl Sandbox for NativeBackend {
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    async fn health(&self) -> Result<()> {
        let helper = std::fs::metadata(&self.cfg.helper).map_err(|e| {
            SandboxError::Unreachable(format!("box helper {}: {e}", self.cfg.helper.display()))
        })?;
        if helper.permissions().mode() & 0o111 == 0 {
            return Err(SandboxError::Unreachable(format!(
                "box helper {} is not executable",
                self.cfg.helper.display()
            )));
        }
        std::fs::metadata(&self.cfg.data_dir).map_err(|e| {
            SandboxError::Unreachable(format!("data dir {}: {e}", self.cfg.data_dir.display()))
        })?;
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
        if let Image::Rootfs(p) = &cfg.image {
            if !p.is_dir() {
                return Err(SandboxError::InvalidSpec(format!(
                    "image root {} is not a directory",
                    p.display()
                )));
            }
        }
        if self.get(&cfg.id).is_ok() {
            return Err(SandboxError::Exists(cfg.id.clone()));
        }
        // The same id destroyed a moment ago (a hybrid box's restore): its files are still
        // being released in the background; reusing the directory now would race that.
        self.reaped(|r| !r.contains(&cfg.id)).await;
        let dir = self.box_dir(&cfg.id);
        if dir.exists() {
            // Left over from a crash: clear it before reuse.
            cleanup_leftovers(&cfg.id, &dir).await;
        }
        // Refused whole, before anything of the box exists, when the server's open files would
        // run out (the server checks too, before it records the box).
        fds::room_for_box()?;
        std::fs::create_dir_all(&dir)?;
        let slot = self.alloc_slot()?;
        match self.start(&cfg, &dir, slot).await {
            Ok((live, info)) => {
                self.boxes
                    .lock()
                    .map_err(|_| SandboxError::Io(std::io::Error::other("box table poisoned")))?
                    .insert(cfg.id.clone(), Arc::new(live));
                Ok(info)
            }
            Err(e) => {
                self.free_slot(slot);
                let _ = self.disks.remove(&cfg.id);
                let _ = tokio::fs::remove_dir_all(&dir).await;
                Err(e)
            }
        }
    }

    async fn exec(&self, id: &str, spec: ExecSpec) -> Result<ExecHandle> {
        let b = self.get_running(id)?;
        if let Some(uid) = spec.uid {
            if uid == 0 || uid >= UID_RANGE {
                return Err(SandboxError::InvalidSpec(format!(
                    "uid {uid} is not allowed in a box"
                )));
            }
        }
        // Raised before the process starts, so that its first instructions run boosted.
        let boost = spec
            .start_boost
            .and_then(|p| self.booster.begin(id, &b.cgroup, &p));
        let req = client::exec_request(&b.env, spec)?;
        let oom_before = b.cgroup.counters().oom_kills;
        let (cg, bx) = (b.cgroup.clone(), b.clone());
        client::exec(
            &b.ctl(),
            &req,
            client::Probes {
                oom_killed: Box::new(move || cg.counters().oom_kills > oom_before),
                running: Box::new(move || bx.running()),
                first_output: boost.map(|b| Box::new(move || b.end()) as Box<dyn FnOnce() + Send>),
            },
        )
        .await
    }

    fn files(&self, id: &str) -> Result<crate::files::FilesRoot> {
        let b = self.get_running(id)?;
        Ok(crate::files::FilesRoot {
            root: b.workspace(),
            owner: Some(b.agent_host_uid),
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
        self.read_stats(id, true).await
    }

    fn exit_watch(&self, id: &str) -> Result<watch::Receiver<Option<BoxExit>>> {
        Ok(self.get(id)?.exit.clone())
    }

    async fn connect(&self, id: &str, port: u16) -> Result<crate::PortStream> {
        let b = self.get_running(id)?;
        client::connect(&b.ctl(), port).await
    }

    async fn adopt(&self, cfg: BoxConfig) -> Result<BoxInfo> {
        // A native box's processes die with the process that made it (parent-death signals
        // down the chain): there is nothing to take back.
        Err(SandboxError::Unsupported(format!(
            "native box {} did not survive the server",
            cfg.id
        )))
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        if !crate::valid_box_id(id) {
            return Err(SandboxError::InvalidSpec(format!("invalid box id {id:?}")));
        }
        let found = self
            .boxes
            .lock()
            .map_err(|_| SandboxError::Io(std::io::Error::other("box table poisoned")))?
            .get(id)
            .cloned();
        let dir = self.box_dir(id);
        let Some(b) = found else {
            if dir.exists() || BoxCgroup::load(id).exists() {
                cleanup_leftovers(id, &dir).await;
            }
            return Ok(());
        };
        b.destroying.store(true, Ordering::SeqCst);
        // Killing PID 1 of a PID namespace kills every process in it. Its mount namespace is
        // held first, until the background reaper drops it: the box's ~35 mounts are then
        // taken down there (the ext4 disk shut down with them), off the destroy path, instead
        // of in the exit of the box's last process (~0.7 ms, and ~1.5 ms for the disk).
        // Both are opened only now, not held for the box's life: a server holds seven
        // descriptors per box otherwise, and its open-file limit caps the boxes it holds.
        let mounts_ref = if b.running() {
            let mounts = std::fs::File::open(format!("/proc/{}/ns/mnt", b.pid1))
                .ok()
                .map(std::os::fd::OwnedFd::from);
            // Not signalled should its pid have come to name another process (see `pid1`);
            // nor is that process's mount namespace held then.
            match pid1::kill(b.pid1, &b.cgroup) {
                pid1::Killed::NotTheBox => {
                    tracing::warn!(box_id = %id, pid = b.pid1, "the pid of a destroyed box's PID 1 names another process");
                    None
                }
                _ => mounts,
            }
        } else {
            None
        };
        let mut exit = b.exit.clone();
        let ended = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|e| e.is_some()))
            .await
            .is_ok();
        if !ended {
            // Not seen to end: kill what is left through the cgroup, here and now.
            let bx = b.clone();
            tokio::task::spawn_blocking(move || bx.cgroup.destroy())
                .await
                .map_err(crate::blocking_err)??;
        }
        // Its PID 1 has ended, and with it every process in the box. Removing the cgroup
        // (~0.4 ms on v1: one directory per controller), taking down the box's mounts (its
        // namespace, held until now), waiting for the loop device's release and removing the
        // files happen off the caller's path; `settle` waits for them, and a create of the
        // same id waits for them too.
        self.booster.forget(id);
        let dir = b.dir.clone();
        let loop_dev = b.loop_dev;
        let box_id = id.to_string();
        if let Ok(mut r) = self.reaping.lock() {
            r.insert(box_id.clone());
        }
        let reaping = self.reaping.clone();
        let settled = self.settled.clone();
        let cgroup = b.cgroup.clone();
        let disks = self.disks.clone();
        tokio::task::spawn_blocking(move || {
            // Also ends the box's helper, should it not have exited yet.
            if let Err(e) = cgroup.destroy() {
                tracing::warn!(%box_id, error = %e, "removing a destroyed box's cgroup");
            }
            drop(mounts_ref);
            if let Err(e) = disks.remove(&box_id) {
                tracing::warn!(%box_id, error = %e, "deleting a destroyed box's subvolume");
            }
            // Boxes on a plain directory (no loop devices on this host) have none to wait for.
            let detached = loop_dev.is_none_or(|n| {
                disk::wait_detached(&dir.join("disk.img"), n, Duration::from_secs(10))
            });
            if !detached {
                tracing::warn!(%box_id, "loop device of a destroyed box is still attached");
            } else if let Some(n) = loop_dev {
                // EBUSY: someone took the number meanwhile, and keeps it.
                let _ = disk::remove_loop(n);
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(%box_id, error = %e, "removing a destroyed box's files");
                }
            }
            if let Ok(mut r) = reaping.lock() {
                r.remove(&box_id);
            }
            settled.notify_waiters();
        });
        if let Ok(mut m) = self.boxes.lock() {
            m.remove(id);
        }
        self.free_slot(b.slot);
        Ok(())
    }
}

/// Remove what a crashed server may have left of a box: its processes, cgroup and files.
async fn cleanup_leftovers(id: &str, dir: &Path) {
    let cg = BoxCgroup::load(id);
    if cg.exists() {
        let _ = tokio::task::spawn_blocking(move || cg.destroy()).await;
    }
    let _ = tokio::fs::remove_dir_all(dir).await;
}

/// The helper to run box bring-up with: the small `berth-box-init` beside `exe` when it is
/// there (it starts ~2 ms faster per box than a large binary, and so does every exec, since
/// the in-box supervisor is a fork of it), else `exe` itself (`exe __box-init`).
pub fn helper_beside(exe: &Path) -> PathBuf {
    let small = exe.with_file_name("berth-box-init");
    let usable = std::fs::metadata(&small)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false);
    if usable {
        small
    } else {
        exe.to_path_buf()
    }
}

impl NativeBackend {
    /// Wait until every destroyed box's loop device is released and its files are removed.
    pub async fn settle(&self) {
        self.reaped(|r| r.is_empty()).await
    }

    /// Wait until `done` holds of the set of ids being reaped.
    async fn reaped(&self, done: impl Fn(&HashSet<String>) -> bool) {
        loop {
            // Created before the check: a reap that ends in between still wakes it.
            let notified = self.settled.notified();
            if self.reaping.lock().map(|r| done(&r)).unwrap_or(true) {
                return;
            }
            notified.await;
        }
    }

    /// Descriptors the backend holds for itself, not for any box: the zygote's socket and the
    /// pool's ready disks or the shared disk's root (for leak checks).
    pub fn own_descriptors(&self) -> usize {
        let zygote = self
            .zygote
            .lock()
            .map(|z| z.is_some() as usize)
            .unwrap_or(0);
        zygote + self.disks.own_descriptors()
    }

    /// A running box's cgroup figures without its disk's (`disk_*` are 0): what the server
    /// samples from every box every few seconds. Reading a subvolume's usage commits the
    /// shared file system, which thousands of boxes sampled must not do.
    pub async fn sample(&self, id: &str) -> Result<Stats> {
        self.read_stats(id, false).await
    }

    async fn read_stats(&self, id: &str, disk: bool) -> Result<Stats> {
        let b = self.get_running(id)?;
        let root = b.workspace();
        let disks = self.disks.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let c = b.cgroup.counters();
            let (used, total) = match disk {
                false => (0, 0),
                true => disks.usage(&id, &root, b.limits.disk_mib)?,
            };
            Ok(Stats {
                cpu_usage_ns: c.cpu_usage_ns,
                memory_bytes: c.memory_bytes,
                memory_limit_bytes: b.limits.memory_mib * 1024 * 1024,
                pids: c.pids,
                pids_limit: b.limits.pids,
                disk_used_bytes: used,
                disk_limit_bytes: total,
                oom_kills: c.oom_kills,
            })
        })
        .await
        .map_err(crate::blocking_err)?
    }

    /// Boxes' subvolumes on the shared btrfs, if boxes' disks are there (for leak checks).
    pub fn shared_subvolumes(&self) -> Option<usize> {
        self.disks.subvolumes()
    }

    /// Host PID of the zygote, if one runs (for operators and tests).
    pub fn zygote_pid(&self) -> Option<u32> {
        self.zygote.lock().ok()?.as_ref().map(|z| z.pid())
    }

    /// Host PID of a box's init (for operators and tests).
    pub fn pid1(&self, id: &str) -> Result<i32> {
        Ok(self.get(id)?.pid1)
    }
}
