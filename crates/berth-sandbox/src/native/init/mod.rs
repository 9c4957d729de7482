//! Box bring-up: the helper (H) and the box's PID 1 (C), forked from the zygote
//! ([`super::zygote`]), never from the server.
//!
//! The zygote keeps each image's root prepared in its own mount namespace (a *template*: a
//! read-only tmpfs with the image's directories bound read-only, secrets masked, a minimal
//! `/dev`, and empty mount points; [`build_template`]). For a box it forks H, which joins the
//! box's cgroup, binds the control socket and `clone`s C into new mount, PID, network, UTS, IPC
//! and cgroup namespaces. C's mount namespace is a copy of the zygote's, so the template is
//! already there: C adds only what is the box's own ([`mounts::mount_box_parts`]): the
//! quota-limited disk for `/workspace`, `/home/agent`, `/tmp` and `/dev/shm`, `/run/berth` (the
//! gateway seam) read-only, its own `devpts` instance at `/dev/pts`, and a fresh `/proc`. It
//! brings up `lo`, `pivot_root`s into the template and detaches everything else, and only then
//! enters a new user namespace in which box uid 0..65536 maps to an unprivileged host range
//! that H writes. Every namespace but the user namespace stays owned by the host's, so even the
//! box's "root" cannot reconfigure its network, mounts or hostname. C then becomes the box's
//! supervisor, which also reaps orphans for the box's whole life.
//!
//! H waits on its report socket (fd 1, the server holds the other end) for [`CGROUP_READY`],
//! which the server sends once it has made the box's cgroup, and then writes an [`InitReport`]
//! line to it, `{"pid": <host pid of C>}` or `{"error": "..."}`, and exits: C passes to the
//! zygote (a subreaper). C holds the same socket as its fd 1 and writes `{"exit": code}` when
//! its supervisor's loop ends. Should the server's end close (the server died or dropped the
//! box), C exits, which ends every process of the box: no box outlives the process responsible
//! for it. An idle box is thus one process, C, with one thread.
//!
//! The stages live in their own modules: `container` (the supervisor alone, in a box a
//! container runtime made), `helper` (H: joining the cgroup, starting C, writing its uid
//! map), `box_pid1` (C's set-up, in order, before it becomes the supervisor), `template`
//! (the shared root), `mounts` (C's own mounts, and the template's `pivot_root`), `loopback` (bringing
//! up `lo`) and `reap` (the SIGCHLD descriptor PID 1 reaps by).

mod box_pid1;
mod container;
mod helper;
mod loopback;
mod mounts;
mod reap;
mod template;

use container::container_supervisor;
pub use container::{SUPERVISOR_BRIDGES_ENV, SUPERVISOR_CTL_ENV, SUPERVISOR_NPROC_ENV};
pub(super) use helper::helper;
pub(super) use loopback::loopback_up;
pub(super) use mounts::enter_root;
pub(super) use template::build_template;

use super::Bridge;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Box uid range size mapped into the box's user namespace.
pub const UID_RANGE: u32 = crate::uids::UID_RANGE;

/// Where H finds the box's disk, a detached mount: an ext4 image on a loop device, a btrfs
/// subvolume, or a plain directory where the host has neither (no quota).
pub const DISK_FD: i32 = 3;

/// What a box's root is made of. Boxes with equal specs share one template in the zygote.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RootSpec {
    /// Host directories (or symlinks) placed read-only into the root: (host source, path in box).
    pub layers: Vec<(PathBuf, String)>,
    /// Files inside the box masked with an empty file.
    pub masked_files: Vec<String>,
    /// Directories inside the box masked with an empty read-only tmpfs.
    pub masked_dirs: Vec<String>,
}

impl RootSpec {
    /// The host path behind a path in the box (through the layer that holds it).
    pub fn host_path(&self, in_box: &str) -> Option<PathBuf> {
        self.layers.iter().find_map(|(src, dst)| {
            let rest = in_box.strip_prefix(dst.as_str())?;
            if rest.is_empty() {
                Some(src.clone())
            } else {
                rest.strip_prefix('/').map(|r| src.join(r))
            }
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    pub box_id: String,
    pub root: RootSpec,
    /// Host directory under which the zygote mounts its templates (in its own namespace).
    pub template_dir: PathBuf,
    /// Host directory bound read-only at `/run/berth` (gateway sockets live here).
    pub run_dir: PathBuf,
    pub ctl_socket: PathBuf,
    pub uid_base: u32,
    pub agent_uid: u32,
    pub hostname: String,
    pub bridges: Vec<Bridge>,
    /// Files of the box's cgroup H writes `0` to, to join it (`tasks` of each v1 hierarchy;
    /// `cgroup.procs` on v2), before the box's first process exists, so that everything in
    /// the box is counted. H is single-threaded: moving its one thread moves all of it.
    pub cgroup_join: Vec<PathBuf>,
}

/// What the server writes on the report socket once the box's cgroup exists (the only byte
/// it ever writes there).
pub const CGROUP_READY: &[u8; 1] = b"c";

/// A line H writes on its report socket.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct InitReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// C's end: its exit code, or 128 + the signal that killed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<i32>,
}

/// Write one report line to `socket` (a box's report socket).
pub(super) fn report_on(socket: std::os::fd::BorrowedFd<'_>, r: &InitReport) {
    let mut line = serde_json::to_vec(r).unwrap_or_default();
    line.push(b'\n');
    // A line is far smaller than a socket buffer: one write takes it whole.
    let _ = nix::unistd::write(socket, &line);
}

/// Write one report line to fd 1 (H's report socket).
fn report(r: &InitReport) {
    // SAFETY: fd 1 is the report socket in H and in the box's PID 1 for their whole lives.
    report_on(unsafe { std::os::fd::BorrowedFd::borrow_raw(1) }, r)
}

/// Set by the native backend to its own pid: the zygote dies with that process.
pub const PARENT_ENV: &str = "BERTH_BOX_PARENT";

/// Entry point of `<helper> __box-init`. Never returns: a container's supervisor when
/// [`SUPERVISOR_CTL_ENV`] is set, else the native backend's zygote.
pub fn run() -> ! {
    if let Some(ctl) = std::env::var_os(SUPERVISOR_CTL_ENV) {
        container_supervisor(ctl.into())
    }
    if let Some(parent) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    {
        // SAFETY: plain prctl and getppid on ourselves.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        // The server may have died before the prctl: then our parent is someone else.
        if unsafe { libc::getppid() } != parent {
            std::process::exit(1);
        }
    }
    super::zygote::serve()
}

fn ctx<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}
