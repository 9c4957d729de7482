//! Box bring-up: the helper (H) and the box's PID 1 (C), forked from the zygote
//! ([`super::zygote`]), never from the server.
//!
//! The zygote keeps each image's root prepared in its own mount namespace (a *template*: a
//! read-only tmpfs with the image's directories bound read-only, secrets masked, a minimal
//! `/dev`, and empty mount points; [`build_template`]). For a box it forks H, which joins the
//! box's cgroup, binds the control socket and `clone`s C into new mount, PID, network, UTS, IPC
//! and cgroup namespaces. C's mount namespace is a copy of the zygote's, so the template is
//! already there: C adds only what is the box's own ([`mount_box_parts`]): the quota-limited
//! disk for `/workspace`, `/home/agent`, `/tmp` and `/dev/shm`, `/run/berth` (the gateway seam)
//! read-only, its own `devpts` instance at `/dev/pts`, and a fresh `/proc`. It brings up
//! `lo`, `pivot_root`s into the template and detaches everything else, and only then enters
//! a new user namespace in which box uid 0..65536 maps to an unprivileged host range that H
//! writes. Every namespace but the user namespace stays owned by the host's, so even the
//! box's "root" cannot reconfigure its network, mounts or hostname. C forks the supervisor
//! (PID 2) and reaps orphans for the box's whole life.
//!
//! H waits on its report socket (fd 1, the server holds the other end) for [`CGROUP_READY`],
//! which the server sends once it has made the box's cgroup, and then writes an [`InitReport`]
//! line to it, `{"pid": <host pid of C>}` or `{"error": "..."}`, and exits: C passes to the
//! zygote (a subreaper). C holds the same socket as its fd 1 and writes `{"exit": code}` when
//! its supervisor ends. Should the server's end close (the server died or dropped the box), C
//! returns, which ends every process of the box: no box outlives the process responsible for
//! it. An idle box is thus two processes, C and its one-threaded supervisor.

use super::disk;
use super::supervisor;
use super::Bridge;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{pivot_root, sethostname, Gid, Pid, Uid};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Box uid range size mapped into the box's user namespace.
pub const UID_RANGE: u32 = crate::uids::UID_RANGE;

/// Where H and C find the box's detached disk mount ([`DiskSource::Mounted`]).
pub const DISK_FD: i32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DiskSource {
    /// An ext4 image on a loop device, mounted detached ([`disk::ReadyDisk`]) and passed as
    /// fd [`DISK_FD`]: a real quota.
    Mounted,
    /// A plain host directory (no loop devices on this host): no quota.
    Dir(PathBuf),
}

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
    /// Empty per-box host directory C mounts the disk on (in its own mount namespace) before
    /// binding the disk's parts into the root.
    pub disk_mount: PathBuf,
    pub disk: DiskSource,
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

/// Set in a container's environment (Docker and gVisor backends), the helper runs only the
/// supervisor: the container runtime has already built the box. Its value is the control
/// socket's path; [`SUPERVISOR_BRIDGES_ENV`] lists the bridges as `port=socket,…`.
pub const SUPERVISOR_CTL_ENV: &str = "BERTH_SUPERVISOR_CTL";
pub const SUPERVISOR_BRIDGES_ENV: &str = "BERTH_SUPERVISOR_BRIDGES";
/// When set, the supervisor holds itself and every process it starts to this many tasks of the
/// box's uid (`RLIMIT_NPROC`, soft and hard; no capability in the box can raise it). For
/// runtimes whose host cgroup cannot count the box's processes (gVisor: a fork bomb there
/// exhausts the *sandbox's* host threads and kills the whole sandbox instead of failing a fork).
pub const SUPERVISOR_NPROC_ENV: &str = "BERTH_SUPERVISOR_NPROC";

/// Supervisor only, inside a box a container runtime made.
fn container_supervisor(ctl: std::path::PathBuf) -> ! {
    let mut bridges = Vec::new();
    for item in std::env::var(SUPERVISOR_BRIDGES_ENV)
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
    {
        match item
            .split_once('=')
            .and_then(|(p, s)| Some((p.parse().ok()?, s)))
        {
            Some((port, socket)) => bridges.push(Bridge {
                port,
                socket: socket.to_string(),
            }),
            None => {
                eprintln!("berth-supervisor: bad bridge {item:?}");
                std::process::exit(2)
            }
        }
    }
    if let Some(n) = std::env::var(SUPERVISOR_NPROC_ENV)
        .ok()
        .filter(|v| !v.is_empty())
    {
        let limited = n.parse::<u64>().ok().is_some_and(|n| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NPROC, n, n).is_ok()
        });
        if !limited {
            eprintln!("berth-supervisor: cannot hold the box to {n:?} processes");
            std::process::exit(2)
        }
    }
    let _ = std::fs::remove_file(&ctl);
    match std::os::unix::net::UnixListener::bind(&ctl) {
        Ok(listener) => supervisor::run(listener, bridges),
        Err(e) => {
            eprintln!("berth-supervisor: binding {}: {e}", ctl.display());
            std::process::exit(1)
        }
    }
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

/// Body of H, in a fresh fork of the zygote: fd 1 is the report socket, fd 2 the box's log.
/// `net` is a network namespace the zygote made ahead for the box, if it had one; `reported`
/// is closed once the box is up or has failed (the zygote waits for that before idle work).
pub(super) fn helper(
    cfg: &InitConfig,
    template: &Path,
    net: Option<OwnedFd>,
    reported: Option<OwnedFd>,
) -> ! {
    // The server makes the cgroup while the zygote forks us: wait for its go-ahead.
    let mut go = [0u8; 1];
    // SAFETY: reading one byte from our report socket into a buffer we own.
    let n = unsafe { libc::read(1, go.as_mut_ptr().cast(), 1) };
    if n != 1 || go != *CGROUP_READY {
        std::process::exit(1); // the server gave up on this box
    }
    for f in &cfg.cgroup_join {
        if let Err(e) = fs::write(f, "0") {
            fail(format!("joining cgroup {}: {e}", f.display()));
        }
    }
    let started = start(cfg, template, net);
    drop(reported);
    match started {
        Ok(child) => {
            report(&InitReport {
                pid: Some(child.as_raw()),
                ..Default::default()
            });
            // From here on the box's PID 1 watches the server's end of the report socket and
            // reports its own exit: an idle box keeps no waiting process of its own on the
            // host (its memory, a task of the host's `pid_max`). PID 1 passes to the zygote,
            // a subreaper that reaps it when it ends.
            std::process::exit(0)
        }
        Err(e) => fail(e),
    }
}

fn fail(msg: String) -> ! {
    report(&InitReport {
        error: Some(msg),
        ..Default::default()
    });
    std::process::exit(1)
}

fn ctx<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Start C (in `net`, else in a network namespace of its own). Returns its pid.
fn start(cfg: &InitConfig, template: &Path, net: Option<OwnedFd>) -> Result<Pid, String> {
    let _ = fs::remove_file(&cfg.ctl_socket);
    let listener = ctx(
        UnixListener::bind(&cfg.ctl_socket),
        "binding control socket",
    )?;
    ctx(
        fs::set_permissions(&cfg.ctl_socket, fs::Permissions::from_mode(0o600)),
        "chmod control socket",
    )?;
    let (map_r, map_w) = ctx(nix::unistd::pipe(), "pipe")?;
    let (need_r, need_w) = ctx(nix::unistd::pipe(), "pipe")?;
    let (ready_r, ready_w) = ctx(nix::unistd::pipe(), "pipe")?;

    let mut pipes = Some((map_r, need_w, ready_w, listener));
    let mut stack = vec![0u8; 256 * 1024];
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWCGROUP;
    // A namespace made ahead: H enters it and C inherits it (its `lo` is up already).
    let net_ready = match net {
        Some(ns) => ctx(
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET),
            "entering the box's network namespace",
        )
        .is_ok(),
        None => false,
    };
    if !net_ready {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    let cb = Box::new(|| -> isize {
        let Some((map_r, need_w, ready_w, listener)) = pipes.take() else {
            return 1;
        };
        box_pid1(cfg, template, net_ready, map_r, need_w, ready_w, listener)
    });
    // SAFETY: H is single-threaded; the child gets its own copy of the address space.
    let child = ctx(
        unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) },
        "clone",
    )?;
    drop(pipes);
    // C has its own copy of the disk mount's descriptor.
    // SAFETY: closing a descriptor this process owns and no longer uses.
    unsafe { libc::close(DISK_FD) };

    // Wait until C has entered its user namespace, then map it.
    let mut need = fs::File::from(need_r);
    let mut b = [0u8; 1];
    let mut ready = fs::File::from(ready_r);
    if need.read_exact(&mut b).is_err() {
        let mut msg = String::new();
        let _ = ready.read_to_string(&mut msg);
        let _ = waitpid(child, None);
        return Err(if msg.is_empty() {
            "box init died during setup".into()
        } else {
            msg
        });
    }
    let map = format!("0 {} {}\n", cfg.uid_base, UID_RANGE);
    let pid = child.as_raw();
    ctx(fs::write(format!("/proc/{pid}/uid_map"), &map), "uid_map")?;
    ctx(fs::write(format!("/proc/{pid}/gid_map"), &map), "gid_map")?;
    ctx(fs::File::from(map_w).write_all(b"m"), "signal map")?;

    let mut msg = String::new();
    let _ = ready.read_to_string(&mut msg);
    if msg.trim() == "ok" {
        Ok(child)
    } else {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(child, None);
        Err(if msg.is_empty() {
            "box init died during setup".into()
        } else {
            msg
        })
    }
}

/// Switch every id to `uid` (the host uid box root maps to) while keeping the capabilities,
/// so that the user namespace entered next is owned by the box's own host uid. The kernel
/// charges per-user counters (user namespaces, inotify instances and watches, ...) of all
/// of a namespace's users to its owner as well: owned by host root, every box would share
/// root's limits with each other and with the host.
fn become_owner(uid: u32) -> Result<(), String> {
    // Keep the capabilities over the uid change (CAP_SYS_ADMIN for `unshare` where the host
    // refuses unprivileged user namespaces); the new namespace resets the securebits.
    // SAFETY: plain prctl on ourselves.
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECUREBITS,
            libc::SECBIT_NO_SETUID_FIXUP as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(format!("securebits: {}", io::Error::last_os_error()));
    }
    ctx(nix::unistd::setgroups(&[]), "setgroups")?;
    let (g, u) = (Gid::from_raw(uid), Uid::from_raw(uid));
    ctx(nix::unistd::setresgid(g, g, g), "setresgid (owner)")?;
    ctx(nix::unistd::setresuid(u, u, u), "setresuid (owner)")?;
    Ok(())
}

/// Body of the box's PID 1.
fn box_pid1(
    cfg: &InitConfig,
    template: &Path,
    net_ready: bool,
    map_r: OwnedFd,
    need_w: OwnedFd,
    ready_w: OwnedFd,
    listener: UnixListener,
) -> isize {
    let mut ready = fs::File::from(ready_w);
    let mut need = fs::File::from(need_w);
    // Until the box is up it dies with H (should H fail or be killed half-way); after that it
    // watches the server itself (see `reap_until_end`).
    // SAFETY: plain prctl on ourselves.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let result = (|| -> Result<(), String> {
        mount_box_parts(cfg, template)?;
        ctx(sethostname(&cfg.hostname), "sethostname")?;
        if !net_ready {
            loopback_up()?;
        }
        enter_root(template)?;
        // Protect PID 1 and the supervisor from the box's own OOM kills; agent processes
        // reset this to 0 before exec.
        let _ = fs::write("/proc/self/oom_score_adj", "-1000");
        become_owner(cfg.uid_base)?;
        ctx(
            nix::sched::unshare(CloneFlags::CLONE_NEWUSER),
            "unshare user ns",
        )?;
        // A new user namespace starts with default securebits (the kernel resets them).
        // SAFETY: plain prctl on ourselves.
        if unsafe { libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0) } != 0 {
            return Err("securebits survived entering the user namespace".into());
        }
        ctx(need.write_all(b"n"), "signal need-map")?;
        let mut b = [0u8; 1];
        ctx(
            fs::File::from(map_r).read_exact(&mut b),
            "waiting for uid map",
        )?;
        let root = Uid::from_raw(0);
        ctx(
            nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)),
            "setresgid",
        )?;
        ctx(nix::unistd::setresuid(root, root, root), "setresuid")?;
        // Changing credentials cleared the parent-death signal: set it again. Should H have
        // died in between, the write of "ok" below fails and PID 1 gives up.
        // SAFETY: plain prctl on ourselves.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        Ok(())
    })();
    if let Err(e) = result {
        drop(need);
        let _ = ready.write_all(e.as_bytes());
        return 1;
    }
    drop(need);
    // SIGCHLD is taken through a descriptor, so that PID 1 waits on its children and on the
    // server's end of the report socket at once; the supervisor unblocks it at once.
    let sigchld = match ChildSignals::new() {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.write_all(format!("signalfd: {e}").as_bytes());
            return 1;
        }
    };
    // SAFETY: PID 1 is single-threaded here.
    let worker = match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            drop(ready);
            sigchld.release();
            // SAFETY: plain prctl on ourselves.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            supervisor::run(listener, cfg.bridges.clone());
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => child,
        Err(e) => {
            let _ = ready.write_all(format!("fork supervisor: {e}").as_bytes());
            return 1;
        }
    };
    drop(listener);
    // H exits once it has reported the box: PID 1 must not die with it. Should H die before
    // it reads "ok", the write fails and PID 1 gives up (the server then removes the cgroup).
    // SAFETY: plain prctl on ourselves.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) };
    if ready.write_all(b"ok").is_err() {
        let _ = nix::sys::signal::kill(worker, nix::sys::signal::Signal::SIGKILL);
        return 1;
    }
    drop(ready);
    let code = reap_until_end(worker, &sigchld);
    report(&InitReport {
        exit: Some(code),
        ..Default::default()
    });
    code as isize
}

/// SIGCHLD blocked and readable from a signalfd (PID 1 only).
struct ChildSignals {
    fd: OwnedFd,
}

impl ChildSignals {
    fn new() -> io::Result<ChildSignals> {
        // SAFETY: sigset and signalfd calls on values we own; PID 1 is single-threaded.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(ChildSignals {
                fd: std::os::fd::FromRawFd::from_raw_fd(fd),
            })
        }
    }

    /// In a fork of PID 1: SIGCHLD unblocked again and the descriptor closed.
    fn release(self) {
        // SAFETY: as above, on the calling (single) thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

/// PID 1's life after set-up: reap every child (orphans included) until the supervisor ends,
/// returning its exit code (128 + signal when killed); or, should the server's end of the
/// report socket (fd 1) close, return at once — PID 1's end ends every process of the box.
fn reap_until_end(worker: Pid, sigchld: &ChildSignals) -> i32 {
    use std::os::fd::AsRawFd;
    loop {
        loop {
            match waitpid(
                Pid::from_raw(-1),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            ) {
                Ok(WaitStatus::Exited(p, c)) if p == worker => return c,
                Ok(WaitStatus::Signaled(p, s, _)) if p == worker => return 128 + s as i32,
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return 1,
            }
        }
        let mut fds = [
            libc::pollfd {
                fd: sigchld.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: 1,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll over two pollfds we own.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return 1;
        }
        if fds[1].revents != 0 {
            // The server writes nothing after the go-ahead: readable means its end is gone.
            return 128 + libc::SIGKILL;
        }
        if fds[0].revents != 0 {
            // Drain the pending notifications (the reaping above finds every child).
            let mut info = [0u8; 128 * 4];
            // SAFETY: reading into a buffer we own from our own signalfd.
            unsafe { libc::read(sigchld.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        }
    }
}

fn mkdir_p(p: &Path) -> Result<(), String> {
    ctx(fs::create_dir_all(p), &format!("mkdir {}", p.display()))
}

fn bind(src: &Path, dst: &Path, readonly: bool, extra: MsFlags) -> Result<(), String> {
    bind_only(src, dst)?;
    let mut flags = MsFlags::MS_NOSUID | extra;
    if !is_device_node(src) {
        flags |= MsFlags::MS_NODEV;
    }
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    remount(dst, flags)
}

/// A bind mount that keeps the source mount's flags (a bind copies them): one mount call.
fn bind_only(src: &Path, dst: &Path) -> Result<(), String> {
    ctx(
        mount(
            Some(src),
            dst,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
        &format!("bind {} -> {}", src.display(), dst.display()),
    )
}

/// Set the flags of the mount at `dst` (to exactly `flags`).
fn remount(dst: &Path, flags: MsFlags) -> Result<(), String> {
    ctx(
        mount(
            None::<&str>,
            dst,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
            None::<&str>,
        ),
        &format!("remount {}", dst.display()),
    )
}

fn is_device_node(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::metadata(p)
        .map(|m| m.file_type().is_char_device())
        .unwrap_or(false)
}

fn inside(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

fn tmpfs(target: &Path, flags: MsFlags, data: &str, what: &str) -> Result<(), String> {
    ctx(
        mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(data)),
        what,
    )
}

/// Mount points every template has, filled per box by [`mount_box_parts`].
const BOX_MOUNT_POINTS: [&str; 6] = [
    "/workspace",
    "/home/agent",
    "/tmp",
    "/run/berth",
    "/proc",
    "/dev/shm",
];

/// Build the shared, read-only part of a box root at `root` (in the zygote's namespace): a
/// tmpfs with the image's layers bound read-only, secrets masked, a minimal `/dev` and the
/// box's mount points. Nothing in it is per box; a box's copy of it gets its own mounts.
pub(super) fn build_template(root: &Path, spec: &RootSpec) -> Result<(), String> {
    tmpfs(
        root,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755,size=1m",
        "mount root tmpfs",
    )?;
    for (src, dst) in &spec.layers {
        let meta = match fs::symlink_metadata(src) {
            Ok(m) => m,
            Err(_) => continue,
        };
        let target = inside(root, dst);
        if meta.file_type().is_symlink() {
            let link = ctx(fs::read_link(src), "readlink")?;
            ctx(symlink(&link, &target), "symlink")?;
        } else if meta.is_dir() {
            mkdir_p(&target)?;
            bind(src, &target, true, MsFlags::empty())?;
        }
    }
    for f in &spec.masked_files {
        let t = inside(root, f);
        if t.exists() {
            bind_only(Path::new("/dev/null"), &t)?;
        }
    }
    for d in &spec.masked_dirs {
        let t = inside(root, d);
        if t.is_dir() {
            tmpfs(
                &t,
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                "size=4k,mode=0755",
                "mask dir",
            )?;
        }
    }
    place_identity(root)?;

    // Minimal /dev, read-only: its nodes are binds of the host's.
    let dev = inside(root, "/dev");
    mkdir_p(&dev)?;
    tmpfs(
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755,size=64k",
        "mount /dev",
    )?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let t = dev.join(node);
        ctx(fs::File::create(&t), "create dev node")?;
        bind_only(&Path::new("/dev").join(node), &t)?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ctx(symlink(target, dev.join(name)), "dev symlink")?;
    }
    // Terminals: each box mounts its own devpts instance here (`mount_box_parts`).
    mkdir_p(&dev.join("pts"))?;
    ctx(symlink("pts/ptmx", dev.join("ptmx")), "dev symlink")?;
    for p in BOX_MOUNT_POINTS {
        mkdir_p(&inside(root, p))?;
    }
    remount(
        &dev,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
    )?;
    remount(
        root,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )
}

/// The box's own `/etc/passwd` and `/etc/group` ([`crate::identity`]) over the image's: each
/// written into the template's tmpfs, bound read-only over the image's file and unlinked
/// (the bind keeps it), so nothing else of it shows in the box.
fn place_identity(root: &Path) -> Result<(), String> {
    for (name, make) in [
        ("passwd", crate::identity::passwd as fn(&str, u32) -> String),
        ("group", crate::identity::group),
    ] {
        let target = inside(root, &format!("/etc/{name}"));
        let Ok(image) = fs::read_to_string(&target) else {
            continue; // an image without one: nothing to name
        };
        let staged = inside(root, &format!("/.berth-{name}"));
        ctx(
            fs::write(&staged, make(&image, crate::AGENT_UID)),
            "write the box's user database",
        )?;
        ctx(
            fs::set_permissions(&staged, fs::Permissions::from_mode(0o644)),
            "chmod the box's user database",
        )?;
        bind(&staged, &target, true, MsFlags::empty())?;
        ctx(fs::remove_file(&staged), "unlink the staged user database")?;
    }
    Ok(())
}

/// In C's own copy of the zygote's namespace: attach the box's disk, bind its parts into the
/// template's mount points, bind the gateway seam and mount a fresh `/proc`.
fn mount_box_parts(cfg: &InitConfig, root: &Path) -> Result<(), String> {
    // The writable disk: workspace, home, tmp and shm all count against one quota. Its mount
    // carries nosuid and nodev, which the binds below keep.
    let disk_mnt = cfg.disk_mount.as_path();
    match &cfg.disk {
        DiskSource::Mounted => {
            // SAFETY: H passed the disk mount as DISK_FD; it stays open for this call.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(DISK_FD) };
            let attached = disk::attach(fd, disk_mnt);
            // No process in the box may inherit it.
            // SAFETY: closing our own copy of the descriptor.
            unsafe { libc::close(DISK_FD) };
            attached?
        }
        DiskSource::Dir(dir) => bind(dir, disk_mnt, false, MsFlags::empty())?,
    }
    let agent = cfg.uid_base + cfg.agent_uid;
    let box_root = cfg.uid_base;
    for (name, owner, mode) in [
        ("workspace", agent, 0o755),
        ("home", agent, 0o755),
        ("tmp", box_root, 0o1777),
        ("shm", box_root, 0o1777),
    ] {
        let p = disk_mnt.join(name);
        // Pool images come with these directories (made by mkfs, off this path).
        if !p.is_dir() {
            mkdir_p(&p)?;
        }
        ctx(
            std::os::unix::fs::chown(&p, Some(owner), Some(owner)),
            "chown",
        )?;
        ctx(
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)),
            "chmod",
        )?;
    }
    for (sub, dst) in [
        ("workspace", "/workspace"),
        ("home", "/home/agent"),
        ("tmp", "/tmp"),
    ] {
        bind_only(&disk_mnt.join(sub), &inside(root, dst))?;
    }
    let shm = inside(root, "/dev/shm");
    bind(&disk_mnt.join("shm"), &shm, false, MsFlags::MS_NOEXEC)?;
    bind(
        &cfg.run_dir,
        &inside(root, "/run/berth"),
        true,
        MsFlags::MS_NOEXEC,
    )?;

    // The box's own terminals (the supervisor opens one per terminal exec): a new devpts
    // instance, so a box sees and numbers only its own, and at most `max` of them.
    ctx(
        mount(
            Some("devpts"),
            &inside(root, "/dev/pts"),
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,max=64"),
        ),
        "mount /dev/pts",
    )?;

    let proc_dir = inside(root, "/proc");
    ctx(
        mount(
            Some("proc"),
            &proc_dir,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
        "mount /proc",
    )?;
    for p in [
        "kcore",
        "keys",
        "timer_list",
        "sched_debug",
        "sysrq-trigger",
        "latency_stats",
    ] {
        let t = proc_dir.join(p);
        if t.exists() {
            bind_only(Path::new("/dev/null"), &t)?;
        }
    }
    for p in ["sys", "bus", "fs", "irq"] {
        let t = proc_dir.join(p);
        if t.is_dir() {
            bind(&t, &t, true, MsFlags::empty())?;
        }
    }
    Ok(())
}

/// Make the template (with the box's mounts on it) the root and detach the rest: the host's
/// tree, the zygote's other templates and the disk's own mount point go with the old root.
fn enter_root(root: &Path) -> Result<(), String> {
    ctx(nix::unistd::chdir(root), "chdir root")?;
    // The old root ends up stacked on the new one, at "/": no directory for it is needed
    // (the template is read-only).
    ctx(pivot_root(".", "."), "pivot_root")?;
    ctx(umount2(".", MntFlags::MNT_DETACH), "detach old root")?;
    ctx(nix::unistd::chdir("/"), "chdir /")
}

pub(super) fn loopback_up() -> Result<(), String> {
    // SAFETY: ioctl on a socket we own with a properly initialised ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", io::Error::last_os_error()));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if r < 0 {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(format!("SIOCGIFFLAGS: {e}"));
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        let e = io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            return Err(format!("SIOCSIFFLAGS: {e}"));
        }
    }
    Ok(())
}
