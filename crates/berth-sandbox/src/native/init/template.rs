//! The template: the shared, read-only part of a box root the zygote keeps mounted per image
//! (the image's layers bound read-only, secrets masked, the box's user database, a minimal
//! `/dev` and empty mount points). Nothing in it is per box.

use super::mounts::{bind, bind_only, inside, mkdir_p, remount, tmpfs};
use super::{ctx, RootSpec};
use nix::mount::MsFlags;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

/// Mount points every template has, filled per box by [`super::mounts::mount_box_parts`].
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
pub(in crate::native) fn build_template(root: &Path, spec: &RootSpec) -> Result<(), String> {
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
