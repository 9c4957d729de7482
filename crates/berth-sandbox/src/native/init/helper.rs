//! H, the helper the zygote forks for each box: it waits for the server's go-ahead, joins the
//! box's cgroup, binds the control socket and `clone`s C (the box's PID 1) into its new
//! namespaces, writes C's uid and gid maps once C has entered its user namespace, and reports
//! C's pid (or why the box failed) on its report socket before it exits.

use super::box_pid1::box_pid1;
use super::{ctx, report, InitConfig, InitReport, CGROUP_READY, DISK_FD, UID_RANGE};
use nix::sched::CloneFlags;
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Body of H, in a fresh fork of the zygote: fd 1 is the report socket, fd 2 the box's log.
/// `net` is a network namespace the zygote made ahead for the box, if it had one; `reported`
/// is closed once the box is up or has failed (the zygote waits for that before idle work).
pub(in crate::native) fn helper(
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
