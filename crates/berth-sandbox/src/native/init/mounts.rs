//! C's own mounts, made in its copy of the zygote's mount namespace: the box's disk and its
//! parts (`/workspace`, `/home/agent`, `/tmp`, `/dev/shm`), the gateway seam read-only, its own
//! `devpts` and a fresh `/proc` with the host's sensitive entries masked; then the
//! `pivot_root` into the template that detaches the rest. Also the mount helpers the template
//! uses.

use super::{ctx, DiskSource, InitConfig, DISK_FD};
use crate::native::disk;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::pivot_root;
use std::fs;
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

/// In C's own copy of the zygote's namespace: attach the box's disk, bind its parts into the
/// template's mount points, bind the gateway seam and mount a fresh `/proc`.
pub(super) fn mount_box_parts(cfg: &InitConfig, root: &Path) -> Result<(), String> {
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
pub(super) fn enter_root(root: &Path) -> Result<(), String> {
    ctx(nix::unistd::chdir(root), "chdir root")?;
    // The old root ends up stacked on the new one, at "/": no directory for it is needed
    // (the template is read-only).
    ctx(pivot_root(".", "."), "pivot_root")?;
    ctx(umount2(".", MntFlags::MNT_DETACH), "detach old root")?;
    ctx(nix::unistd::chdir("/"), "chdir /")
}
