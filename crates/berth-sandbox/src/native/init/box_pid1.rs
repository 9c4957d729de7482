//! C, the box's PID 1: its set-up, in this order and no other, then its supervisor. It starts
//! in its own copy of the template's rooted namespace (its root is the template already). The
//! box's mounts go onto it, the hostname is set, `lo` comes up (unless the zygote's namespace
//! made ahead has it up); only then does it become the box's host uid and enter a new user
//! namespace (so every other namespace stays owned by the host's), wait for H to map it and
//! become the box's root in it. It then becomes the box's supervisor, which also reaps the
//! box's orphans until the end.

use super::loopback::loopback_up;
use super::mounts::mount_box_parts;
use super::reap::ChildSignals;
use super::{ctx, InitConfig};
use crate::native::supervisor;
use nix::sched::CloneFlags;
use nix::unistd::{sethostname, Gid, Uid};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;

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

/// What H hands C across the `clone`.
pub(super) struct Handoff {
    /// The box's disk, a detached mount.
    pub disk: OwnedFd,
    /// The gateway seam (`/run/berth`), a detached mount.
    pub run: OwnedFd,
    /// Read: H has written C's uid map.
    pub map_r: OwnedFd,
    /// Written: C is in its user namespace and needs its map.
    pub need_w: OwnedFd,
    /// Written: `ok`, or why the set-up failed.
    pub ready_w: OwnedFd,
    /// The box's control socket.
    pub listener: UnixListener,
}

/// Body of the box's PID 1.
pub(super) fn box_pid1(cfg: &InitConfig, net_ready: bool, h: Handoff) -> isize {
    let Handoff {
        disk,
        run,
        map_r,
        need_w,
        ready_w,
        listener,
    } = h;
    let mut ready = fs::File::from(ready_w);
    let mut need = fs::File::from(need_w);
    // Until the box is up it dies with H (should H fail or be killed half-way); after that it
    // watches the server itself (see `reap_until_end`).
    // SAFETY: plain prctl on ourselves.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let result = (|| -> Result<(), String> {
        mount_box_parts(cfg, disk, run)?;
        ctx(sethostname(&cfg.hostname), "sethostname")?;
        if !net_ready {
            loopback_up()?;
        }
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
    // SIGCHLD is taken through a descriptor, blocked before any thread exists (threads inherit
    // the mask), so that the supervisor's one poll waits on the box's children, its sockets and
    // the server's end of the report socket at once.
    let sigchld = match ChildSignals::new() {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.write_all(format!("signalfd: {e}").as_bytes());
            return 1;
        }
    };
    crate::native::children::reap_for_everyone();
    // H exits once it has reported the box: PID 1 must not die with it. Should H die before
    // it reads "ok", the write fails and PID 1 gives up (the server then removes the cgroup).
    // SAFETY: plain prctl on ourselves.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) };
    if ready.write_all(b"ok").is_err() {
        return 1;
    }
    drop(ready);
    // PID 1 is the supervisor: one process per idle box.
    supervisor::serve_box(
        listener,
        cfg.bridges.clone(),
        Some(supervisor::InitDuties {
            sigchld: sigchld.into_fd(),
            report: 1,
        }),
    )
}
