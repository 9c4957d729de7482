//! Which disk each box gets, by what the host offers and `native.disks` asks: a subvolume of
//! one shared btrfs ([`super::shared_disk`]), an ext4 image on a loop device of its own
//! ([`super::disk`]), or a plain directory (no quota). One place for the choice, a box's disk
//! at create, its removal after destroy, and its usage.
//!
//! Contract: [`DiskSupply::take`] gives a box its disk; [`DiskSupply::remove`] is called once
//! the box's mounts are gone (and after a failed create), is idempotent, and is a no-op where
//! the disk goes with the box's files (images, directories).

use super::{disk, shared_disk};
use crate::{fsops, Result, SandboxError};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

/// Where boxes' quota disks come from (the server's `native.disks`: `auto`, `btrfs`, `ext4`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Disks {
    /// A subvolume each of one shared btrfs where the host can ([`shared_disk`]), else an
    /// ext4 image each ([`disk`]), else a plain directory (no quota).
    #[default]
    Auto,
    /// A subvolume each of one shared btrfs, or the backend does not start.
    Btrfs,
    /// An ext4 image each on a loop device (a plain directory where loop devices are missing).
    Ext4,
}

/// The boxes' disks this backend gives.
#[derive(Clone)]
pub(super) enum DiskSupply {
    Shared(Arc<shared_disk::SharedDisk>),
    Images(disk::ImagePool),
    Dirs,
}

/// A box's disk mounted detached, for the box to attach, and the loop device of its own it
/// may have.
pub(super) struct BoxDisk {
    pub mount: OwnedFd,
    pub loop_dev: Option<u32>,
}

impl DiskSupply {
    /// The supply `want` asks for under `native_dir`, falling back as [`Disks`] says.
    pub(super) fn open(native_dir: &Path, want: Disks, pool_size: usize) -> Result<DiskSupply> {
        let shared = match want {
            Disks::Ext4 => None,
            Disks::Auto if !shared_disk::supported() => None,
            Disks::Auto | Disks::Btrfs => {
                let dir = native_dir.join("shared");
                match shared_disk::SharedDisk::open(&dir, shared_disk::default_size(native_dir)) {
                    Ok(d) => Some(d),
                    Err(e) if want == Disks::Auto => {
                        tracing::warn!(error = %e, "no shared btrfs for box disks; using ext4 images");
                        None
                    }
                    Err(e) => {
                        return Err(SandboxError::Unsupported(format!(
                            "native.disks = btrfs: {e}"
                        )))
                    }
                }
            }
        };
        Ok(match shared {
            Some(d) => DiskSupply::Shared(Arc::new(d)),
            None if disk::loop_supported() => {
                let pool = disk::ImagePool::new(native_dir.join("pool"), pool_size)?;
                pool.refill(crate::Limits::default().disk_mib);
                DiskSupply::Images(pool)
            }
            None => DiskSupply::Dirs,
        })
    }

    /// Whether boxes' disks hold them to their `disk_mib`.
    pub(super) fn quota(&self) -> bool {
        !matches!(self, DiskSupply::Dirs)
    }

    /// Box `id`'s disk of `mib` MiB; `dir` is the box's directory (images and plain
    /// directories live there).
    pub(super) async fn take(&self, id: &str, mib: u64, dir: &Path) -> Result<BoxDisk> {
        Ok(match self {
            DiskSupply::Shared(shared) => {
                let mount = shared.create(id, mib)?;
                BoxDisk {
                    mount,
                    loop_dev: None,
                }
            }
            DiskSupply::Images(pool) => {
                let img = dir.join("disk.img");
                let ready = match pool.take_ready(mib, &img)? {
                    Some(d) => d,
                    None => {
                        // None ready: format and mount one now (~12 ms) off the async threads.
                        let pool = pool.clone();
                        tokio::task::spawn_blocking(move || pool.take(mib, &img))
                            .await
                            .map_err(|e| SandboxError::Start(format!("disk task: {e}")))??
                    }
                };
                BoxDisk {
                    mount: ready.mount,
                    loop_dev: Some(ready.loop_dev),
                }
            }
            DiskSupply::Dirs => {
                let d = dir.join("disk");
                std::fs::create_dir_all(&d)?;
                // A detached copy of the directory, for the box to attach like any disk (the
                // box makes it nosuid and nodev).
                use rustix::mount::OpenTreeFlags as F;
                let mount = rustix::mount::open_tree(
                    rustix::fs::CWD,
                    &d,
                    F::OPEN_TREE_CLONE | F::OPEN_TREE_CLOEXEC | F::AT_RECURSIVE,
                )
                .map_err(|e| SandboxError::Start(format!("box disk directory: {e}")))?;
                BoxDisk {
                    mount,
                    loop_dev: None,
                }
            }
        })
    }

    /// Delete box `id`'s subvolume, if its disk is one (blocking).
    pub(super) fn remove(&self, id: &str) -> std::io::Result<()> {
        match self {
            DiskSupply::Shared(d) => d.remove(id),
            _ => Ok(()),
        }
    }

    /// Bytes used and the limit of box `id`'s disk, whose `/workspace` is `root` (blocking).
    /// A subvolume's statfs is the shared file system's: its qgroup says what it holds.
    pub(super) fn usage(&self, id: &str, root: &Path, mib: u64) -> Result<(u64, u64)> {
        Ok(match self {
            DiskSupply::Shared(d) => (d.used(id)?, mib << 20),
            _ => fsops::disk_usage(root)?,
        })
    }

    /// Descriptors held for the supply itself: the ready images, or the shared disk's root.
    pub(super) fn own_descriptors(&self) -> usize {
        match self {
            DiskSupply::Shared(_) => 1,
            DiskSupply::Images(p) => p.ready_count(),
            DiskSupply::Dirs => 0,
        }
    }

    /// Boxes' subvolumes present, on a shared disk (for leak checks).
    pub(super) fn subvolumes(&self) -> Option<usize> {
        match self {
            DiskSupply::Shared(d) => d.subvolumes().ok(),
            _ => None,
        }
    }
}
