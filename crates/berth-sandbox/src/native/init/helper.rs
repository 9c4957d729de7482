//! H, the helper the zygote forks for each box: it waits for the server's go-ahead, joins the
//! box's cgroup, binds the control socket, takes what the box needs of the host's tree as
//! detached mounts (the gateway seam, a directory disk), enters the template's rooted mount
//! namespace and `clone`s C (the box's PID 1) into its new namespaces, writes C's uid and gid
//! maps once C has entered its user namespace, and reports C's pid (or why the box failed) on
//! its report socket before it exits.

use super::box_pid1::{box_pid1, Handoff};
use super::{ctx, report, InitConfig, InitReport, CGROUP_READY, DISK_FD, UID_RANGE};
use nix::sched::CloneFlags;
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Body of H, in a fresh fork of the zygote: fd 1 is the report socket, fd 2 the box's log.
/// `template` is the mount namespace rooted in the box's template; `net` is a network
/// namespace the zygote made ahead for the box, if it had one; `reported` is closed once the
/// box is up or has failed (the zygote waits for that before idle work).
pub(in crate::native) fn helper(
    cfg: &InitConfig,
    template: OwnedFd,
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

/// A detached copy of the host's directory `dir`, to be attached inside the box root.
fn detached_copy(dir: &Path) -> Result<OwnedFd, String> {
    use rustix::mount::OpenTreeFlags as F;
    ctx(
        rustix::mount::open_tree(
            rustix::fs::CWD,
            dir,
            F::OPEN_TREE_CLONE | F::OPEN_TREE_CLOEXEC | F::AT_RECURSIVE,
        ),
        &format!("copying {}", dir.display()),
    )
}

/// Start C (in `net`, else in a network namespace of its own) in a copy of the `template`
/// namespace. Returns its pid.
fn start(cfg: &InitConfig, template: OwnedFd, net: Option<OwnedFd>) -> Result<Pid, String> {
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

    // What C mounts of the host's tree comes as detached mounts: the template's namespace
    // holds nothing of it. The disk is one already (from the server).
    let run = detached_copy(&cfg.run_dir)?;
    // SAFETY: the zygote placed the box's detached disk mount at DISK_FD; H owns it.
    let disk = unsafe { OwnedFd::from_raw_fd(DISK_FD) };
    // C's uid map is written through the host's /proc: the template has none mounted.
    let proc = ctx(
        rustix::fs::open(
            "/proc",
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ),
        "opening /proc",
    )?;
    ctx(
        nix::sched::setns(&template, CloneFlags::CLONE_NEWNS),
        "entering the box's template",
    )?;
    drop(template);
    ctx(nix::unistd::chdir("/"), "chdir /")?;

    let mut pipes = Some(Handoff {
        disk,
        run,
        map_r,
        need_w,
        ready_w,
        listener,
    });
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
        let Some(h) = pipes.take() else {
            return 1;
        };
        box_pid1(cfg, net_ready, h)
    });
    // SAFETY: H is single-threaded; the child gets its own copy of the address space.
    let child = ctx(
        unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) },
        "clone",
    )?;
    // C has its own copies of the descriptors it needs (the disk's among them).
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
    for file in ["uid_map", "gid_map"] {
        let f = ctx(
            rustix::fs::openat(
                &proc,
                format!("{pid}/{file}"),
                rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            ),
            file,
        )?;
        ctx(fs::File::from(f).write_all(map.as_bytes()), file)?;
    }
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
