//! A Docker box's host directory (`<data_dir>/<backend>/<id>`): made before its container
//! (the agent's directories, owned by its host uid, on the box's own disk: an ext4 image on a
//! loop device, the quota; the box's user database; the control-socket directory with the
//! helper and tini), and removed after it (the disk unmounted, its loop device freed).

use super::DockerBackend;
use crate::{BoxConfig, Image, Result, SandboxError, AGENT_UID};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

impl DockerBackend {
    /// Host directories of a new box, owned by the agent's host uid where the box writes: its
    /// disk (an ext4 image of `disk_mib` on a loop device, mounted at `<dir>/disk`, where the
    /// host has loop devices) and, for the `host` image, its own user database.
    pub(super) fn prepare_dirs(&self, dir: &Path, cfg: &BoxConfig, uid_base: u32) -> Result<()> {
        let agent = uid_base + AGENT_UID;
        let owned = |p: &Path| -> Result<()> {
            std::fs::create_dir_all(p)?;
            std::os::unix::fs::chown(p, Some(agent), Some(agent))?;
            Ok(())
        };
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
        let disk = dir.join("disk");
        std::fs::create_dir_all(&disk)?;
        if self.caps.disk_quota {
            mount_disk(dir, &disk, cfg.limits.disk_mib)?;
        }
        owned(&disk.join("workspace"))?;
        owned(&disk.join("home"))?;
        if matches!(cfg.image, Image::Host) {
            let etc = dir.join("etc");
            std::fs::create_dir_all(&etc)?;
            let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
            let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
            std::fs::write(etc.join("passwd"), crate::identity::passwd(&passwd, agent))?;
            std::fs::write(etc.join("group"), crate::identity::group(&group, agent))?;
            for f in ["passwd", "group"] {
                std::fs::set_permissions(etc.join(f), std::fs::Permissions::from_mode(0o644))?;
            }
        }
        // The supervisor's control socket: for the box's root alone (agents cannot reach it).
        std::fs::create_dir_all(dir.join("ctl"))?;
        std::fs::set_permissions(dir.join("ctl"), std::fs::Permissions::from_mode(0o700))?;
        // The gateway and egress sockets are made here by the host after the box starts; the
        // box's uid must be able to connect to them.
        std::fs::create_dir_all(dir.join("run"))?;
        std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o755))?;
        std::fs::copy(&self.cfg.helper, dir.join("ctl").join("init"))?;
        std::fs::set_permissions(
            dir.join("ctl").join("init"),
            std::fs::Permissions::from_mode(0o555),
        )?;
        if let Some(tini) = &self.tini {
            std::fs::copy(tini, dir.join("ctl").join("tini"))?;
            std::fs::set_permissions(
                dir.join("ctl").join("tini"),
                std::fs::Permissions::from_mode(0o555),
            )?;
        }
        Ok(())
    }
}

/// Format a `mib` MiB ext4 image in `dir`, attach it to a loop device (auto-clear) and mount
/// it at `target` (nosuid, nodev): the box's disk quota. The engine binds from it.
fn mount_disk(dir: &Path, target: &Path, mib: u64) -> Result<()> {
    use crate::native::disk;
    let img = dir.join("disk.img");
    disk::format_image(&img, mib, None)?;
    let ready = disk::mount_detached(&img).map_err(SandboxError::Start)?;
    disk::attach(std::os::fd::AsFd::as_fd(&ready.mount), target).map_err(SandboxError::Start)?;
    // Mounted where the engine sees it; the loop device is freed when it is unmounted.
    let _ = std::fs::remove_file(&img);
    Ok(())
}

/// Unmount a box's disk, if it has one (its loop device then frees itself).
pub(super) fn release_disk(dir: &Path) {
    let disk = dir.join("disk");
    if is_mount_point(&disk) {
        let _ = nix::mount::umount2(&disk, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Remove what a box that never started left in `dir`.
pub(super) fn release_dir(dir: &Path) {
    release_disk(dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// Whether `p` is the root of a mount (its device differs from its parent's).
pub(super) fn is_mount_point(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}
