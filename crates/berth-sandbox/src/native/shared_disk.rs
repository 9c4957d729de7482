//! Boxes' disks as subvolumes of one shared btrfs file system, each held to its `disk_mib` by
//! a qgroup limit: no loop device, no file system and no superblock per box.
//!
//! Why: a file system per box (the ext4 images of [`super::disk`]) costs a loop device, a
//! block queue and a superblock each, and every superblock registers a memory-cgroup-aware
//! shrinker, whose per-cgroup bookkeeping the kernel grows in every box's memory cgroup: the
//! memory of N boxes grows as N² and the N-th create slows with N. Subvolumes share one
//! superblock.
//!
//! Contract: [`SharedDisk::open`] formats a sparse image (deleted once attached: nothing is
//! left on the host after the last user goes), attaches it to one loop device and mounts it
//! *detached* — in no mount namespace, reached only through the descriptor this type holds
//! and the boxes' own bind mounts of their subvolumes. [`SharedDisk::create`] makes a box's
//! subvolume with its limit and its directories and returns a detached mount of just that
//! subvolume (the same device mounted again: the same superblock) for the box to attach; [`SharedDisk::remove`] deletes it (idempotent). Writing past the limit
//! fails with EDQUOT inside the box.
//!
//! Trust: a box must not make subvolumes or snapshots of its own (a new subvolume has a
//! qgroup of its own, outside the box's limit) nor use any other btrfs ioctl: the box's
//! seccomp filter refuses every ioctl of btrfs's type (`confine.rs`).

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use super::disk::{on_free_loop, which, DISK_DIRS};
use crate::fsops::open_subdir;
use std::ffi::OsStr;

const fn iow(nr: u64, size: usize) -> libc::c_ulong {
    (1 << 30 | (size as u64) << 16 | 0x94 << 8 | nr) as libc::c_ulong
}
const fn ior(nr: u64, size: usize) -> libc::c_ulong {
    (2 << 30 | (size as u64) << 16 | 0x94 << 8 | nr) as libc::c_ulong
}
const fn iowr(nr: u64, size: usize) -> libc::c_ulong {
    (3 << 30 | (size as u64) << 16 | 0x94 << 8 | nr) as libc::c_ulong
}
const fn io_(nr: u64) -> libc::c_ulong {
    (0x94 << 8 | nr) as libc::c_ulong
}

/// btrfs's ioctl type: the box's seccomp filter refuses all of them.
pub const BTRFS_IOCTL_MAGIC: u64 = 0x94;

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

#[repr(C)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

#[repr(C)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused1: u64,
    unused2: u64,
    unused3: u64,
    unused4: u64,
}

#[repr(C)]
struct SearchArgs {
    key: SearchKey,
    buf: [u8; 3992],
}

const BTRFS_IOC_SYNC: libc::c_ulong = io_(8);
const BTRFS_IOC_SUBVOL_CREATE: libc::c_ulong = iow(14, std::mem::size_of::<VolArgs>());
const BTRFS_IOC_SNAP_DESTROY: libc::c_ulong = iow(15, std::mem::size_of::<VolArgs>());
const BTRFS_IOC_TREE_SEARCH: libc::c_ulong = iowr(17, std::mem::size_of::<SearchArgs>());
const BTRFS_IOC_INO_LOOKUP: libc::c_ulong = iowr(18, std::mem::size_of::<InoLookupArgs>());
const BTRFS_IOC_QUOTA_CTL: libc::c_ulong = iowr(40, std::mem::size_of::<QuotaCtlArgs>());
const BTRFS_IOC_QGROUP_LIMIT: libc::c_ulong = ior(43, std::mem::size_of::<QgroupLimitArgs>());
const QUOTA_CTL_ENABLE: u64 = 1;
const QUOTA_CTL_ENABLE_SIMPLE_QUOTA: u64 = 4;
const QGROUP_LIMIT_MAX_RFER: u64 = 1;
const QUOTA_TREE_OBJECTID: u64 = 8;
const QGROUP_INFO_KEY: u32 = 242;
const FIRST_FREE_OBJECTID: u64 = 256;

/// Whether this host can hold boxes' disks on a shared btrfs: the kernel knows btrfs, loop
/// devices exist and `mkfs.btrfs` (btrfs-progs) is installed.
pub fn supported() -> bool {
    Path::new("/dev/loop-control").exists()
        && which("mkfs.btrfs").is_some()
        && fs::read_to_string("/proc/filesystems").is_ok_and(|f| {
            f.lines()
                .any(|l| l.split_whitespace().last() == Some("btrfs"))
        })
}

/// The shared file system: its root directory, opened through the detached mount.
pub struct SharedDisk {
    root: OwnedFd,
    /// The loop device (held by the mount: freed when the last box and `root` are gone).
    dev: String,
}

fn ioctl<T>(fd: &impl AsRawFd, req: libc::c_ulong, arg: &mut T, what: &str) -> io::Result<()> {
    // SAFETY: `arg` is the `repr(C)` struct `req` names, owned by the caller for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn ctx(e: rustix::io::Errno, what: &str) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn vol_args(name: &str) -> io::Result<Box<VolArgs>> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= 4088 || bytes.contains(&b'/') || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("subvolume name {name:?}"),
        ));
    }
    let mut a = Box::new(VolArgs {
        fd: 0,
        name: [0; 4088],
    });
    a.name[..bytes.len()].copy_from_slice(bytes);
    Ok(a)
}

impl SharedDisk {
    /// Format a sparse image of `bytes` under `dir`, attach it to a loop device, mount it
    /// detached and turn quotas on. The image is unlinked once attached.
    pub fn open(dir: &Path, bytes: u64) -> io::Result<SharedDisk> {
        fs::create_dir_all(dir)?;
        let img = dir.join(format!("shared-{}.btrfs", std::process::id()));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img)?;
        file.set_len(bytes)?;
        let made = (|| {
            let mkfs =
                which("mkfs.btrfs").ok_or_else(|| io::Error::other("mkfs.btrfs not found"))?;
            let out = Command::new(mkfs)
                // Single copies (one device), no discard pass over the new image.
                .args(["-q", "-f", "-m", "single", "-d", "single", "-K"])
                .arg(&img)
                .output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "mkfs.btrfs failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            on_free_loop(&file, |dev| fsmount_btrfs(dev, None)).map_err(io::Error::other)
        })();
        // Attached or not, the name is no longer needed: the loop device holds the file.
        let _ = fs::remove_file(&img);
        let (mount, n) = made?;
        let root = open_subdir(&mount, OsStr::new("."))?;
        let disk = SharedDisk {
            root,
            dev: format!("/dev/loop{n}"),
        };
        // Simple quotas (Linux 6.7+) account at allocation, without the backref walks of full
        // qgroups; full qgroups otherwise.
        let mut q = QuotaCtlArgs {
            cmd: QUOTA_CTL_ENABLE_SIMPLE_QUOTA,
            status: 0,
        };
        if ioctl(
            &disk.root,
            BTRFS_IOC_QUOTA_CTL,
            &mut q,
            "enable simple quotas",
        )
        .is_err()
        {
            let mut q = QuotaCtlArgs {
                cmd: QUOTA_CTL_ENABLE,
                status: 0,
            };
            ioctl(&disk.root, BTRFS_IOC_QUOTA_CTL, &mut q, "enable quotas")?;
        }
        Ok(disk)
    }

    /// A subvolume for box `id` limited to `mib` MiB, holding [`DISK_DIRS`]: a detached mount
    /// of it (nosuid, nodev) for the box to attach.
    pub fn create(&self, id: &str, mib: u64) -> io::Result<OwnedFd> {
        let mut a = vol_args(id)?;
        ioctl(
            &self.root,
            BTRFS_IOC_SUBVOL_CREATE,
            &mut *a,
            "create subvolume",
        )?;
        let made = (|| {
            let (sub, treeid) = self.open_subvolume(id)?;
            let mut lim = QgroupLimitArgs {
                qgroupid: treeid,
                flags: QGROUP_LIMIT_MAX_RFER,
                max_rfer: mib << 20,
                max_excl: 0,
                rsv_rfer: 0,
                rsv_excl: 0,
            };
            ioctl(&self.root, BTRFS_IOC_QGROUP_LIMIT, &mut lim, "qgroup limit")?;
            for d in DISK_DIRS {
                rustix::fs::mkdirat(&sub, d, rustix::fs::Mode::from_raw_mode(0o755))
                    .map_err(|e| ctx(e, "mkdir in subvolume"))?;
            }
            // A mount of just the subvolume: the same device mounted again shares the file
            // system (one superblock); a clone of the detached mount would be refused.
            let m =
                fsmount_btrfs(&self.dev, Some(id)).map_err(|e| ctx(e, "mount the subvolume"))?;
            Ok::<_, io::Error>(m)
        })();
        if made.is_err() {
            let _ = self.remove(id);
        }
        made
    }

    /// Delete box `id`'s subvolume and what it holds (the space is freed in the background);
    /// one already gone is not an error.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        let mut a = vol_args(id)?;
        match ioctl(
            &self.root,
            BTRFS_IOC_SNAP_DESTROY,
            &mut *a,
            "delete subvolume",
        ) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Box `id`'s subvolume, opened, and its id (its qgroup's, at level 0).
    fn open_subvolume(&self, id: &str) -> io::Result<(OwnedFd, u64)> {
        let sub = open_subdir(&self.root, OsStr::new(id)).map_err(|e| ctx(e, "open subvolume"))?;
        let mut l = Box::new(InoLookupArgs {
            treeid: 0,
            objectid: FIRST_FREE_OBJECTID,
            name: [0; 4080],
        });
        ioctl(&sub, BTRFS_IOC_INO_LOOKUP, &mut *l, "subvolume id")?;
        Ok((sub, l.treeid))
    }

    /// Bytes box `id`'s subvolume holds, as its qgroup counts them, after committing what is
    /// in flight (the counts are written at commit).
    pub fn used(&self, id: &str) -> io::Result<u64> {
        let (_, treeid) = self.open_subvolume(id)?;
        // SAFETY: BTRFS_IOC_SYNC takes no argument.
        if unsafe { libc::ioctl(self.root.as_raw_fd(), BTRFS_IOC_SYNC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut s = Box::new(SearchArgs {
            key: SearchKey {
                tree_id: QUOTA_TREE_OBJECTID,
                min_objectid: 0,
                max_objectid: 0,
                min_offset: treeid,
                max_offset: treeid,
                min_transid: 0,
                max_transid: u64::MAX,
                min_type: QGROUP_INFO_KEY,
                max_type: QGROUP_INFO_KEY,
                nr_items: 1,
                unused: 0,
                unused1: 0,
                unused2: 0,
                unused3: 0,
                unused4: 0,
            },
            buf: [0; 3992],
        });
        ioctl(&self.root, BTRFS_IOC_TREE_SEARCH, &mut *s, "qgroup info")?;
        if s.key.nr_items == 0 {
            return Ok(0);
        }
        // One search header (transid, objectid, offset: u64; type, len: u32), then the
        // btrfs_qgroup_info_item: generation, rfer, … (little-endian u64s).
        let item = &s.buf[32..];
        let rfer = item
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| io::Error::other("short qgroup info item"))?;
        Ok(rfer)
    }

    /// The boxes' subvolumes present (for leak checks).
    pub fn subvolumes(&self) -> io::Result<usize> {
        let dir = open_subdir(&self.root, OsStr::new("."))?;
        let mut n = 0;
        for e in rustix::fs::Dir::new(dir)? {
            let name = e?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// The btrfs on `dev_path` mounted detached (nosuid, nodev, noatime): its top, or only
/// `subvol`.
fn fsmount_btrfs(dev_path: &str, subvol: Option<&str>) -> rustix::io::Result<OwnedFd> {
    use rustix::mount::{
        fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, FsMountFlags,
        FsOpenFlags, MountAttrFlags,
    };
    let fs = fsopen("btrfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, "source", dev_path)?;
    if let Some(s) = subvol {
        fsconfig_set_string(&fs, "subvol", s)?;
    }
    // As for the ext4 disks: no cache flushes to the host's disk (nothing on it outlives its
    // box but through snapshots); no atime writes either.
    fsconfig_set_flag(&fs, "nobarrier")?;
    fsconfig_create(&fs)?;
    fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOATIME,
    )
}

/// The size to give the shared image under `dir`: 90 % of the space free there now (it is
/// sparse: it takes only what the boxes write), at least 1 GiB.
pub fn default_size(dir: &Path) -> u64 {
    let free = rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(0);
    (free / 10 * 9).max(1 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From linux/btrfs.h, as the kernel computes them.
        assert_eq!(BTRFS_IOC_SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(BTRFS_IOC_SNAP_DESTROY, 0x5000_940f);
        assert_eq!(BTRFS_IOC_TREE_SEARCH, 0xd000_9411);
        assert_eq!(BTRFS_IOC_INO_LOOKUP, 0xd000_9412);
        assert_eq!(BTRFS_IOC_QUOTA_CTL, 0xc010_9428);
        assert_eq!(BTRFS_IOC_QGROUP_LIMIT, 0x8030_942b);
        assert_eq!(BTRFS_IOC_SYNC, 0x9408);
    }
}
