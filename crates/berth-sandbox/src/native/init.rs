//! Box bring-up, run in a fresh helper process (`berth __box-init`), never in the server.
//!
//! The server spawns the helper (H), places it in the box's cgroup and then writes an
//! [`InitConfig`] line to its stdin. H binds the control socket, then `clone`s the box's PID 1
//! (C) into new mount, PID, network, UTS, IPC and cgroup namespaces. C is still host root at
//! that point, so it can build the box's file tree without any host path needing to be
//! world-readable: a read-only tmpfs root, the image's directories bound read-only, secrets
//! masked, the quota-limited disk for `/workspace`, `/home/agent` and `/tmp`, fresh `/proc` and a
//! minimal `/dev`, `/run/berth` (the gateway seam) read-only. It brings up `lo`, `pivot_root`s
//! into the new root, and only then enters a new user namespace in which box uid 0..65536 maps to
//! an unprivileged host range that H writes. Every namespace but the user namespace stays owned
//! by the host's, so even the box's "root" cannot reconfigure its network, mounts or hostname.
//! C forks the supervisor (PID 2) and reaps orphans for the box's whole life.
//!
//! H reports `{"pid": <host pid of C>}` or `{"error": "..."}` on stdout, waits for C, and exits
//! with its status: the server learns that a box died when H exits.

use super::disk;
use super::supervisor;
use super::Bridge;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{pivot_root, sethostname, Gid, Pid, Uid};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Box uid range size mapped into the box's user namespace.
pub const UID_RANGE: u32 = 65536;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DiskSource {
    /// An ext4 image attached through a loop device: a real quota.
    Image(PathBuf),
    /// A plain host directory (no loop devices on this host): no quota.
    Dir(PathBuf),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    pub box_id: String,
    /// Empty host directory C mounts the box's root tmpfs on (in its own mount namespace).
    pub root_mount: PathBuf,
    pub disk: DiskSource,
    /// Host directory bound read-only at `/run/berth` (gateway sockets live here).
    pub run_dir: PathBuf,
    pub ctl_socket: PathBuf,
    pub uid_base: u32,
    pub agent_uid: u32,
    /// Host directories bound read-only into the box: (host source, path in box).
    pub layers: Vec<(PathBuf, String)>,
    /// Files inside the box masked with an empty file.
    pub masked_files: Vec<String>,
    /// Directories inside the box masked with an empty read-only tmpfs.
    pub masked_dirs: Vec<String>,
    pub hostname: String,
    pub bridges: Vec<Bridge>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InitReport {
    pub pid: Option<i32>,
    pub error: Option<String>,
}

fn report(r: &InitReport) {
    let mut out = io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, r);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Entry point of the helper process. Never returns.
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

/// Set by the native backend to its own pid: the helper dies with that process.
pub const PARENT_ENV: &str = "BERTH_BOX_PARENT";

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
            fail("the server that started this box is gone".into());
        }
    }
    let mut line = String::new();
    if let Err(e) = io::stdin().lock().read_line(&mut line) {
        fail(format!("reading config: {e}"));
    }
    let cfg: InitConfig = match serde_json::from_str(&line) {
        Ok(c) => c,
        Err(e) => fail(format!("bad config: {e}")),
    };
    match start(&cfg) {
        Ok(child) => {
            report(&InitReport {
                pid: Some(child.as_raw()),
                error: None,
            });
            let code = match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, c)) => c,
                Ok(WaitStatus::Signaled(_, s, _)) => 128 + s as i32,
                _ => 1,
            };
            std::process::exit(code)
        }
        Err(e) => fail(e),
    }
}

fn fail(msg: String) -> ! {
    report(&InitReport {
        pid: None,
        error: Some(msg),
    });
    std::process::exit(1)
}

fn ctx<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn start(cfg: &InitConfig) -> Result<Pid, String> {
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
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWCGROUP;
    let cb = Box::new(|| -> isize {
        let Some((map_r, need_w, ready_w, listener)) = pipes.take() else {
            return 1;
        };
        box_pid1(cfg, map_r, need_w, ready_w, listener)
    });
    // SAFETY: the helper is single-threaded; the child gets its own copy of the address space.
    let child = ctx(
        unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) },
        "clone",
    )?;
    drop(pipes);

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

/// Body of the box's PID 1.
fn box_pid1(
    cfg: &InitConfig,
    map_r: OwnedFd,
    need_w: OwnedFd,
    ready_w: OwnedFd,
    listener: UnixListener,
) -> isize {
    let mut ready = fs::File::from(ready_w);
    let mut need = fs::File::from(need_w);
    // The box dies with its helper, which dies with the server (see `NativeBackend`): no box
    // outlives the process responsible for it.
    // SAFETY: plain prctl on ourselves.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let result = (|| -> Result<(), String> {
        build_root(cfg)?;
        ctx(sethostname(&cfg.hostname), "sethostname")?;
        loopback_up()?;
        enter_root(&cfg.root_mount)?;
        // Protect PID 1 and the supervisor from the box's own OOM kills; agent processes
        // reset this to 0 before exec.
        let _ = fs::write("/proc/self/oom_score_adj", "-1000");
        ctx(
            nix::sched::unshare(CloneFlags::CLONE_NEWUSER),
            "unshare user ns",
        )?;
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
        // Changing credentials cleared the parent-death signal: set it again. Should the
        // helper have died in between, the write of "ok" below fails and PID 1 gives up.
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
    // SAFETY: PID 1 is single-threaded here.
    let worker = match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            drop(ready);
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
    if ready.write_all(b"ok").is_err() {
        // The helper is gone (and with it the server): no box without its owner.
        let _ = nix::sys::signal::kill(worker, nix::sys::signal::Signal::SIGKILL);
        return 1;
    }
    drop(ready);
    // Reap everything; the box lives as long as its supervisor.
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(p, c)) if p == worker => return c as isize,
            Ok(WaitStatus::Signaled(p, s, _)) if p == worker => return 128 + s as isize,
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => return 1,
            Err(_) => {}
        }
    }
}

fn mkdir_p(p: &Path) -> Result<(), String> {
    ctx(fs::create_dir_all(p), &format!("mkdir {}", p.display()))
}

fn bind(src: &Path, dst: &Path, readonly: bool, extra: MsFlags) -> Result<(), String> {
    ctx(
        mount(
            Some(src),
            dst,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
        &format!("bind {} -> {}", src.display(), dst.display()),
    )?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | extra;
    if !is_device_node(src) {
        flags |= MsFlags::MS_NODEV;
    }
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    ctx(
        mount(None::<&str>, dst, None::<&str>, flags, None::<&str>),
        &format!("remount {}", dst.display()),
    )
}

/// A plain bind mount without the read-only remount, for targets where the flags change
/// nothing (masks with `/dev/null`, device nodes): one mount call instead of two.
fn bind_only(src: &Path, dst: &Path) -> Result<(), String> {
    ctx(
        mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>),
        &format!("bind {} -> {}", src.display(), dst.display()),
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

fn build_root(cfg: &InitConfig) -> Result<(), String> {
    ctx(
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
        "make / private",
    )?;
    let root = cfg.root_mount.as_path();
    ctx(
        mount(
            Some("tmpfs"),
            root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=4m"),
        ),
        "mount root tmpfs",
    )?;

    // The writable disk: workspace, home and tmp all count against one quota.
    let disk_mnt = root.join(".disk");
    mkdir_p(&disk_mnt)?;
    match &cfg.disk {
        DiskSource::Image(img) => disk::attach_and_mount(img, &disk_mnt)?,
        DiskSource::Dir(dir) => bind(dir, &disk_mnt, false, MsFlags::empty())?,
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
        if !p.exists() {
            mkdir_p(&p)?;
            ctx(
                std::os::unix::fs::chown(&p, Some(owner), Some(owner)),
                "chown",
            )?;
        }
        ctx(
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)),
            "chmod",
        )?;
    }

    for (src, dst) in &cfg.layers {
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
    for f in &cfg.masked_files {
        let t = inside(root, f);
        if t.exists() {
            bind_only(Path::new("/dev/null"), &t)?;
        }
    }
    for d in &cfg.masked_dirs {
        let t = inside(root, d);
        if t.is_dir() {
            ctx(
                mount(
                    Some("tmpfs"),
                    &t,
                    Some("tmpfs"),
                    MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC,
                    Some("size=4k,mode=0755"),
                ),
                "mask dir",
            )?;
        }
    }

    for (sub, dst) in [
        ("workspace", "/workspace"),
        ("home", "/home/agent"),
        ("tmp", "/tmp"),
    ] {
        let t = inside(root, dst);
        mkdir_p(&t)?;
        bind(&disk_mnt.join(sub), &t, false, MsFlags::empty())?;
    }

    let run = inside(root, "/run/berth");
    mkdir_p(&run)?;
    bind(&cfg.run_dir, &run, true, MsFlags::MS_NOEXEC)?;

    // Minimal /dev.
    let dev = inside(root, "/dev");
    mkdir_p(&dev)?;
    ctx(
        mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=64k"),
        ),
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
    let shm = dev.join("shm");
    mkdir_p(&shm)?;
    bind(&disk_mnt.join("shm"), &shm, false, MsFlags::MS_NOEXEC)?;

    let proc_dir = inside(root, "/proc");
    mkdir_p(&proc_dir)?;
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

fn enter_root(root: &Path) -> Result<(), String> {
    let old = root.join(".oldroot");
    mkdir_p(&old)?;
    ctx(nix::unistd::chdir(root), "chdir root")?;
    ctx(pivot_root(".", ".oldroot"), "pivot_root")?;
    ctx(
        umount2("/.oldroot", MntFlags::MNT_DETACH),
        "detach old root",
    )?;
    ctx(fs::remove_dir("/.oldroot"), "rmdir old root")?;
    // The disk's own mount point is no longer needed: its subdirectories are bound in place.
    ctx(umount2("/.disk", MntFlags::MNT_DETACH), "detach disk")?;
    ctx(fs::remove_dir("/.disk"), "rmdir disk")?;
    ctx(nix::unistd::chdir("/"), "chdir /")?;
    ctx(
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            None::<&str>,
        ),
        "remount root read-only",
    )
}

fn loopback_up() -> Result<(), String> {
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
    let _ = io::stdout().as_raw_fd();
    Ok(())
}
