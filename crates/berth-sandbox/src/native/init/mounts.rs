//! C's own mounts, made in its copy of the template's rooted mount namespace: the box's disk
//! and its parts (`/workspace`, `/home/agent`, `/tmp`, `/dev/shm`), the gateway seam read-only,
//! its own `devpts` and a fresh `/proc` with the host's sensitive entries masked. Also the
//! mount helpers the template uses, and the `pivot_root` that roots a template's namespace.

use super::{ctx, InitConfig};
use crate::native::disk;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::pivot_root;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub(super) fn mkdir_p(p: &Path) -> Result<(), String> {
    ctx(fs::create_dir_all(p), &format!("mkdir {}", p.display()))
}

pub(super) fn bind(src: &Path, dst: &Path, readonly: bool, extra: MsFlags) -> Result<(), String> {
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
pub(super) fn bind_only(src: &Path, dst: &Path) -> Result<(), String> {
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
pub(super) fn remount(dst: &Path, flags: MsFlags) -> Result<(), String> {
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

pub(super) fn inside(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

pub(super) fn tmpfs(target: &Path, flags: MsFlags, data: &str, what: &str) -> Result<(), String> {
    ctx(
        mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(data)),
        what,
    )
}

/// In C's own copy of the template's rooted namespace (its root is the template): attach the
/// box's disk and bind its parts into the template's mount points, attach the gateway seam and
/// mount a fresh `/proc`. `disk` and `run` are detached mounts (see [`super::helper`]).
pub(super) fn mount_box_parts(cfg: &InitConfig, disk: OwnedFd, run: OwnedFd) -> Result<(), String> {
    // The writable disk: workspace, home, tmp and shm all count against one quota. It is
    // attached whole for as long as its parts are bound, at `/proc` (an empty mount point
    // until proc is mounted there below), and detached again; nosuid and nodev, which the
    // binds below keep, whatever the disk's source.
    let disk_mnt = Path::new("/proc");
    disk::attach(disk.as_fd(), disk_mnt)?;
    // No process in the box may inherit it.
    drop(disk);
    remount(disk_mnt, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
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
        bind_only(&disk_mnt.join(sub), Path::new(dst))?;
    }
    bind(
        &disk_mnt.join("shm"),
        Path::new("/dev/shm"),
        false,
        MsFlags::MS_NOEXEC,
    )?;
    ctx(
        umount2(disk_mnt, MntFlags::MNT_DETACH),
        "detaching the whole disk",
    )?;
    let run_dir = Path::new("/run/berth");
    disk::attach(run.as_fd(), run_dir)?;
    remount(
        run_dir,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )?;

    // The box's own terminals (the supervisor opens one per terminal exec): a new devpts
    // instance, so a box sees and numbers only its own, and at most `max` of them.
    ctx(
        mount(
            Some("devpts"),
            "/dev/pts",
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,max=64"),
        ),
        "mount /dev/pts",
    )?;

    let proc_dir = disk_mnt;
    ctx(
        mount(
            Some("proc"),
            proc_dir,
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

/// Make the template at `root` the root of the calling process's mount namespace and detach
/// the rest: the host's tree and the zygote's other templates go with the old root (see
/// [`super::super::zygote`]: done once per template, never per box).
pub(in crate::native) fn enter_root(root: &Path) -> Result<(), String> {
    ctx(nix::unistd::chdir(root), "chdir root")?;
    // The old root ends up stacked on the new one, at "/": no directory for it is needed
    // (the template is read-only).
    ctx(pivot_root(".", "."), "pivot_root")?;
    ctx(umount2(".", MntFlags::MNT_DETACH), "detach old root")?;
    ctx(nix::unistd::chdir("/"), "chdir /")
}
