//! The zygote: one long-lived helper process per native backend that makes every box.
//!
//! Starting a box from a fresh `exec` of the helper cost ~1 ms (spawn, dynamic linking, page
//! faults), and building each box's root from scratch ~45 mount calls. The zygote is spawned
//! once (`<helper> __box-init`), enters its own mount namespace and keeps, per image, a mount
//! namespace already rooted in a prepared root (a *template*, [`init::build_template`],
//! [`rooted_template`]). For each box the server sends it one
//! request on a `SOCK_SEQPACKET` socket: the [`InitConfig`] and two or three descriptors, the
//! box's report socket, its log and its detached disk mount. The zygote forks the box's helper
//! (H), which runs [`init::helper`] with those as fd 1, 2 and [`init::DISK_FD`], and goes back
//! to waiting. Everything after the fork (cgroup, control socket, the box's namespaces)
//! happens in H and the box, in parallel with other creates.
//!
//! Contract:
//! - Requests are handled in order, one fork each; a request the zygote cannot serve (bad
//!   config, template failure) is answered with an error on its own report socket.
//! - A template is rebuilt when a source it binds or masks is replaced on the host (its device
//!   and inode change: e.g. `/etc/shadow` rewritten by `passwd`), so a new box's masks never
//!   sit on a replaced file (a running box's can: bind masks follow the file they cover).
//!   At most [`MAX_TEMPLATES`] are kept, least recently used first out.
//! - The zygote dies with the server (parent-death signal from the thread that spawned it,
//!   which lives until the zygote ends) and exits when the server closes its socket. Boxes do
//!   not depend on the zygote: each is tied to the server through its own report socket.
//! - Between requests it makes network namespaces ahead (at most [`NETNS_READY`], never while
//!   a request waits); a box gets one or, if none is ready, makes its own.
//! - The zygote holds no descriptor but its socket, those network namespaces and its
//!   templates' mount namespaces: a request's descriptors are closed in it right after the
//!   fork and the helper closes every namespace that is not its box's, so no box inherits
//!   another's.

use super::init::{self, InitConfig, InitReport, RootSpec};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Network namespaces kept ready (with `lo` up). Making one is ~0.6 ms of CPU, done while the
/// zygote has nothing else to do instead of on a box's create path.
const NETNS_READY: usize = 2;

/// Templates kept at once (each a mount namespace of ~25 mounts the zygote holds open).
pub const MAX_TEMPLATES: usize = 4;
/// How long a request waits for room on the zygote's socket.
const SEND_WAIT_MS: i32 = 5_000;

/// Largest request accepted (an `InitConfig` is ~1-2 KiB).
const MAX_REQUEST: usize = 256 * 1024;

/// The server's handle on its zygote.
pub struct Zygote {
    sock: OwnedFd,
    pid: u32,
}

impl Zygote {
    /// Spawn `<helper> __box-init` as the zygote.
    pub fn spawn(helper: &Path) -> io::Result<Zygote> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let helper = helper.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        // The zygote's parent-death signal fires when the *thread* that spawned it ends: this
        // thread stays, waiting for the zygote, for as long as the zygote lives.
        let nofile = super::BOX_NOFILE.get().copied();
        std::thread::Builder::new()
            .name("berth-zygote".into())
            .spawn(move || {
                // Nothing of the server's environment (its keys, database URL, cluster secret)
                // reaches the zygote, and so no box's supervisor or init: only a PATH for the
                // disk tools it runs.
                let path = std::env::var_os("PATH")
                    .unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
                let mut cmd = Command::new(&helper);
                if let Some(lim) = nofile {
                    // SAFETY: setrlimit is async-signal-safe; `lim` is a plain copy.
                    unsafe {
                        cmd.pre_exec(move || {
                            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                                return Err(io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                }
                let spawned = cmd
                    .arg("__box-init")
                    .env_clear()
                    .env("PATH", path)
                    // Every box's supervisor is a fork of the zygote: one malloc arena and no
                    // cache of exited threads' stacks, so that an idle box does not keep the
                    // memory its last exec's threads used (a new arena and a cached stack per
                    // thread: ~190 KiB per box after one exec). Execs get only the
                    // environment they ask for, not this.
                    .env(
                        "GLIBC_TUNABLES",
                        "glibc.malloc.arena_max=1:glibc.pthread.stack_cache_size=0",
                    )
                    .env(init::PARENT_ENV, std::process::id().to_string())
                    .stdin(Stdio::from(theirs))
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .process_group(0)
                    .spawn();
                match spawned {
                    Ok(mut child) => {
                        let _ = tx.send(Ok(child.id()));
                        let _ = child.wait();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::new(
                            e.kind(),
                            format!("spawning {}: {e}", helper.display()),
                        )));
                    }
                }
            })?;
        let pid = rx
            .recv()
            .map_err(|_| io::Error::other("zygote thread ended"))??;
        Ok(Zygote { sock: ours, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Ask for a box. The answer arrives on `report` (see [`init`]'s module docs).
    pub fn request(
        &self,
        cfg: &InitConfig,
        report: BorrowedFd<'_>,
        log: BorrowedFd<'_>,
        disk: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let body = serde_json::to_vec(cfg).map_err(io::Error::other)?;
        let fds = [report.as_raw_fd(), log.as_raw_fd(), disk.as_raw_fd()];
        loop {
            let sent = sendmsg::<()>(
                self.sock.as_raw_fd(),
                &[IoSlice::new(&body)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            );
            match sent {
                Ok(_) => return Ok(()),
                // The socket's buffer is full (the zygote is behind): wait, boundedly, for
                // room rather than block a caller's thread for good on a stuck zygote.
                Err(nix::errno::Errno::EAGAIN) => {
                    let mut p = libc::pollfd {
                        fd: self.sock.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: poll on one pollfd we own.
                    if unsafe { libc::poll(&mut p, 1, SEND_WAIT_MS) } == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the box zygote takes no requests",
                        ));
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

struct Template {
    spec: RootSpec,
    identity: Vec<Option<(u64, u64)>>,
    /// A mount namespace rooted in the template (see [`rooted_template`]).
    ns: OwnedFd,
}

struct Templates {
    /// Most recently used first.
    list: Vec<Template>,
    next: u64,
    /// The zygote's own mount namespace, to return to after rooting a template.
    home: Result<OwnedFd, String>,
}

/// Device and inode of everything a template binds, masks or copies (the user database the
/// box's own is made from), as the host has them now.
fn identity(spec: &RootSpec) -> Vec<Option<(u64, u64)>> {
    let masked = spec
        .masked_files
        .iter()
        .map(String::as_str)
        .chain(spec.masked_dirs.iter().map(String::as_str))
        .chain(["/etc/passwd", "/etc/group"])
        .map(|m| spec.host_path(m));
    spec.layers
        .iter()
        .map(|(src, _)| Some(src.clone()))
        .chain(masked)
        .map(|p| {
            let m = std::fs::symlink_metadata(p?).ok()?;
            Some((m.dev(), m.ino()))
        })
        .collect()
}

impl Templates {
    fn new() -> Templates {
        Templates {
            list: Vec::new(),
            next: 0,
            home: std::fs::File::open("/proc/self/ns/mnt")
                .map(OwnedFd::from)
                .map_err(|e| format!("the zygote's mount namespace: {e}")),
        }
    }

    /// Make the template for `cfg` the first of the list (building it if it is missing or
    /// a source it binds was replaced on the host).
    fn get(&mut self, cfg: &InitConfig) -> Result<(), String> {
        let id = identity(&cfg.root);
        if let Some(i) = self.list.iter().position(|t| t.spec == cfg.root) {
            let t = self.list.remove(i);
            if t.identity == id {
                self.list.insert(0, t);
                return Ok(());
            }
        }
        let home = self.home.as_ref().map_err(Clone::clone)?;
        let dir = cfg
            .template_dir
            .join(format!("{}-{}", std::process::id(), self.next));
        self.next += 1;
        let ns = rooted_template(home, &dir, &cfg.root)
            .map_err(|e| format!("preparing the box root: {e}"))?;
        self.list.insert(
            0,
            Template {
                spec: cfg.root.clone(),
                identity: id,
                ns,
            },
        );
        self.list.truncate(MAX_TEMPLATES);
        Ok(())
    }

    /// In a helper: the namespace of the template [`Templates::get`] put first; every other
    /// descriptor the zygote holds for templates is closed.
    fn into_first(mut self) -> Option<OwnedFd> {
        (!self.list.is_empty()).then(|| self.list.swap_remove(0).ns)
    }
}

/// Build the template for `spec` and return a mount namespace rooted in it: the zygote enters
/// a copy of its own namespace, mounts the template at `dir` there, `pivot_root`s into it,
/// detaches the rest (the host's tree, other templates) and goes back `home`, keeping only a
/// descriptor of that namespace. A box's helper enters it and the box's PID 1 copies it: no
/// box pivots its own root (each `pivot_root` walks every task on the host, 2.6 ms per box at
/// 4,500 boxes) and a box's copied namespace holds its template's mounts and nothing else.
fn rooted_template(home: &OwnedFd, dir: &Path, spec: &RootSpec) -> Result<OwnedFd, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("template dir: {e}"))?;
    let rooted = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("template mount namespace: {e}"))
        .and_then(|()| {
            // The namespace, not a path: once rooted, the template has no `/proc` mounted.
            let ns = std::fs::File::open("/proc/self/ns/mnt")
                .map_err(|e| format!("template mount namespace: {e}"))?;
            init::build_template(dir, spec)?;
            init::enter_root(dir)?;
            Ok(OwnedFd::from(ns))
        });
    // Home, whatever happened (the copy is freed with its last descriptor). The zygote cannot
    // go on from inside a template: it exits and the server reports every create failing.
    if nix::sched::setns(home, nix::sched::CloneFlags::CLONE_NEWNS).is_err() {
        std::process::exit(1);
    }
    // Only the rooted copy ever had the template mounted there.
    let _ = std::fs::remove_dir(dir);
    rooted
}

/// Network namespaces made ahead. Each is owned by the host's user namespace, exactly like
/// one a box's `clone` would make, and holds only `lo`, up.
struct NetPool {
    /// The zygote's own network namespace, to return to after making one.
    home: Option<OwnedFd>,
    ready: Vec<OwnedFd>,
}

impl NetPool {
    fn new() -> NetPool {
        NetPool {
            home: std::fs::File::open("/proc/self/ns/net")
                .ok()
                .map(OwnedFd::from),
            ready: Vec::new(),
        }
    }

    fn wants_more(&self) -> bool {
        self.home.is_some() && self.ready.len() < NETNS_READY
    }

    fn make_one(&mut self) {
        let Some(home) = &self.home else { return };
        // At the lowest priority: the helper just forked (or a server thread) must not wait
        // for a CPU behind work done ahead of need.
        // SAFETY: setpriority on ourselves.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        let made = (|| -> Result<OwnedFd, String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
            let ns = std::fs::File::open("/proc/self/ns/net").map_err(|e| e.to_string())?;
            init::loopback_up()?;
            Ok(OwnedFd::from(ns))
        })();
        // Back to normal priority (helpers inherit it) and home, whatever happened; should
        // the latter fail, stop making them (boxes then make their own).
        // SAFETY: setpriority on ourselves (root may raise it again).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) };
        if nix::sched::setns(home, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
            self.home = None;
            self.ready.clear();
            return;
        }
        match made {
            Ok(ns) => self.ready.push(ns),
            Err(_) => self.home = None,
        }
    }
}

/// How long idle work waits for the boxes being made to report (then it goes ahead anyway).
const BUSY_WAIT_MS: i32 = 50;

/// Wait until the zygote may do its idle work: returns false as soon as a request waits on
/// its socket, true once no box it forked is still being made (each helper holds the write
/// end of a pipe in `making` until it has reported), or after [`BUSY_WAIT_MS`]. Idle work
/// done while a box is being made would compete with it for the CPU (its helper waited
/// ~0.5 ms for one behind a namespace being made).
fn idle(making: &mut Vec<OwnedFd>) -> bool {
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(0)
            .chain(making.iter().map(|f| f.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let wait = if making.is_empty() { 0 } else { BUSY_WAIT_MS };
        // SAFETY: poll over pollfds we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false;
        }
        if fds[0].revents != 0 {
            return false;
        }
        if n == 0 {
            // Nothing reported within the wait (or nothing being made): go ahead.
            making.clear();
            return true;
        }
        let done: Vec<bool> = fds[1..].iter().map(|p| p.revents != 0).collect();
        let mut i = 0;
        making.retain(|_| {
            i += 1;
            !done[i - 1]
        });
        if making.is_empty() {
            return true;
        }
    }
}

/// Write an error answer on a request's report socket.
fn answer_error(report: &OwnedFd, msg: String) {
    use std::os::fd::AsFd;
    init::report_on(
        report.as_fd(),
        &InitReport {
            error: Some(msg),
            ..Default::default()
        },
    );
}

/// One request off the socket on fd 0: its bytes and descriptors. `None` when the server
/// closed its end.
fn receive(buf: &mut [u8]) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(0, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: descriptors just received are ours alone.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((msg.bytes, fds)))
}

/// The zygote's loop (fd 0 is its socket). Never returns.
pub(super) fn serve() -> ! {
    // Templates live in the zygote's own mount namespace, invisible to the host.
    let setup = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .and_then(|()| {
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
                None::<&str>,
            )
        })
        .map_err(|e| format!("zygote mount namespace: {e}"));
    // Compiled once here, inherited by every box's supervisor.
    super::confine::prewarm();
    // Helpers are reaped by the kernel; each resets this before it makes its box. Each box's
    // PID 1 outlives its helper and passes to the zygote (a subreaper), which the kernel
    // reaps the same way when the box ends.
    // SAFETY: setting a signal disposition and a prctl in a single-threaded process.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let mut templates = Templates::new();
    let mut netns = NetPool::new();
    let mut making: Vec<OwnedFd> = Vec::new();
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        // Idle: top up the network namespaces, one at a time, while no request waits.
        while netns.wants_more() && idle(&mut making) {
            netns.make_one();
        }
        let (n, fds) = match receive(&mut buf) {
            Ok(Some(r)) => r,
            Ok(None) => std::process::exit(0),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(_) => std::process::exit(1),
        };
        let mut fds = fds.into_iter();
        let (Some(report), Some(log), Some(disk), None) =
            (fds.next(), fds.next(), fds.next(), fds.next())
        else {
            continue;
        };
        let prepared = setup
            .clone()
            .and_then(|()| {
                serde_json::from_slice::<InitConfig>(&buf[..n])
                    .map_err(|e| format!("bad box config: {e}"))
            })
            .and_then(|cfg| templates.get(&cfg).map(|()| cfg));
        let cfg = match prepared {
            Ok(p) => p,
            Err(e) => {
                answer_error(&report, e);
                continue;
            }
        };
        let net = netns.ready.pop();
        // The helper holds the write end until it has reported (see `idle`).
        let made = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok();
        // SAFETY: the zygote is single-threaded.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                // The other boxes' namespaces and helpers, and the other templates, are not
                // this one's to hold.
                drop(netns);
                making.clear();
                let Some(template) = templates.into_first().and_then(out_of_the_way) else {
                    std::process::exit(1)
                };
                let reported = made.map(|(r, w)| {
                    drop(r);
                    w
                });
                become_helper(report, log, disk);
                init::helper(&cfg, template, net, reported)
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => {
                making.extend(made.map(|(r, _w)| r));
            }
            Err(e) => answer_error(&report, format!("fork: {e}")),
        }
    }
}

/// In the fresh fork: the request's report socket becomes fd 1, its log fd 2 and its disk
/// mount [`init::DISK_FD`]; the zygote's socket is replaced by `/dev/null`.
fn become_helper(report: OwnedFd, log: OwnedFd, disk: OwnedFd) {
    // Out of the way of the numbers it is given below (received descriptors start at 3).
    let disk = out_of_the_way(disk);
    // SAFETY: dup2 and open on descriptors this single-threaded process owns.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        } else {
            libc::close(0);
        }
        libc::dup2(report.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
    }
    drop(report);
    drop(log);
    if let Some(d) = disk {
        // SAFETY: moving our own descriptor to its agreed number.
        unsafe { libc::dup3(d.as_raw_fd(), init::DISK_FD, libc::O_CLOEXEC) };
    }
}

/// `fd` moved to a number above those [`become_helper`] places descriptors at.
fn out_of_the_way(fd: OwnedFd) -> Option<OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(&fd, 10).ok()
}
