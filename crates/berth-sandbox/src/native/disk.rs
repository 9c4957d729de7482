//! The box's writable disk: a sparse ext4 image per box on a loop device, mounted into the
//! box's own mount namespace only. Writing past `disk_mib` fails with ENOSPC inside the box and
//! the host file system is untouched beyond the image's size. The loop device is set to
//! auto-clear, so when the box's last process dies the kernel unmounts the file system and
//! frees the loop device by itself.
//!
//! Formatting an image costs ~10 ms and mounting it ~2 ms, so [`ImagePool`] keeps a few disks
//! per size formatted and mounted *detached* ([`ReadyDisk`]) in the background; a box only
//! moves the mount into its namespace.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const LOOP_CTL_REMOVE: libc::c_ulong = 0x4C81;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Whether this host can give boxes a loop-mounted quota disk.
pub fn loop_supported() -> bool {
    Path::new("/dev/loop-control").exists() && which("mkfs.ext4").is_some()
}

pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// A box disk ready to be attached: its image on a loop device (auto-clear), the ext4 file
/// system mounted but *detached* (`fsmount`: in no namespace yet). The box moves the mount into
/// its own namespace (`move_mount`); should that never happen, closing the last descriptor of
/// the mount unmounts it and frees the loop device.
pub struct ReadyDisk {
    pub mount: OwnedFd,
    pub loop_dev: u32,
}

/// Attach `img` to a free loop device and mount it detached, nosuid and nodev. ~2 ms, most of
/// it the ext4 mount: done by the pool in the background, not on a box's create path.
pub fn mount_detached(img: &Path) -> Result<ReadyDisk, String> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .map_err(|e| format!("open disk image: {e}"))?;
    let (mount, n) = on_free_loop(&file, fsmount_ext4)?;
    Ok(ReadyDisk { mount, loop_dev: n })
}

/// Attach `file` to a free loop device (auto-clear) and `mount` it (given the device's path):
/// the mount and the device's number. The device is held until the mount holds it, so it is
/// freed by the kernel when the mount's last user goes.
pub fn on_free_loop<T>(
    file: &fs::File,
    mount: impl Fn(&str) -> rustix::io::Result<T>,
) -> Result<(T, u32), String> {
    let ctl = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| format!("open loop-control: {e}"))?;
    // Another box may grab the same free device between GET_FREE and CONFIGURE: retry.
    for _ in 0..64 {
        // SAFETY: ioctl without argument on a loop-control fd.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(format!("LOOP_CTL_GET_FREE: {}", io::Error::last_os_error()));
        }
        let dev_path = format!("/dev/loop{n}");
        let dev = match fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev_path)
        {
            Ok(d) => d,
            // Removed meanwhile (see `remove_loop`): take another.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENXIO) =>
            {
                continue;
            }
            Err(e) => return Err(format!("open {dev_path}: {e}")),
        };
        // SAFETY: zeroed is a valid bit pattern for this plain C struct.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = file.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_CONFIGURE reads a loop_config we own.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::ENXIO)) {
                continue;
            }
            return Err(format!("LOOP_CONFIGURE {dev_path}: {e}"));
        }
        // Held until the mount holds the device: auto-clear frees it on the last release.
        let mounted = mount(&dev_path);
        drop(dev);
        return mounted
            .map(|m| (m, n as u32))
            .map_err(|e| format!("mount {dev_path}: {e}"));
    }
    Err("no free loop device".into())
}

fn fsmount_ext4(dev_path: &str) -> rustix::io::Result<OwnedFd> {
    use rustix::mount::{
        fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, FsMountFlags,
        FsOpenFlags, MountAttrFlags,
    };
    let fs = fsopen("ext4", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, "source", dev_path)?;
    // The disk lives as long as its box: no background zeroing of inode tables (mkfs left
    // them for lazy init), which would compete with the boxes for the disk.
    fsconfig_set_flag(&fs, "noinit_itable")?;
    // No cache flushes: the disk promises nothing across a host crash (no journal either, see
    // `format_image`), and each flush reaches the host's own disk through the loop device's
    // backing file. An agent's CLI fsyncs its config file about eight times while starting
    // (3-9 ms each here; 0.3 ms without the flush).
    fsconfig_set_flag(&fs, "nobarrier")?;
    fsconfig_create(&fs)?;
    fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
    )
}

/// Attach a detached disk mount at `target`, in the caller's mount namespace.
pub fn attach(mount: std::os::fd::BorrowedFd<'_>, target: &Path) -> Result<(), String> {
    rustix::mount::move_mount(
        mount,
        "",
        rustix::fs::CWD,
        target,
        rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| format!("attaching the disk at {}: {e}", target.display()))
}

/// The directories every box disk holds (`workspace`, `home`, `tmp`, `shm`), as a skeleton
/// for `mkfs.ext4 -d`: made while formatting, off the create path (an ext4 `mkdir` on a fresh
/// file system costs ~0.2 ms). Their owners and modes are set per box.
pub const DISK_DIRS: [&str; 4] = ["workspace", "home", "tmp", "shm"];

fn skeleton(dir: &Path) -> io::Result<PathBuf> {
    let skel = dir.join(".skel");
    for d in DISK_DIRS {
        fs::create_dir_all(skel.join(d))?;
    }
    Ok(skel)
}

/// Create a sparse image of `mib` MiB and format it ext4 (no journal: the disk's contents do
/// not outlive the box except through snapshots, which are taken from a live box; no online
/// resize reserve), holding the directories of `skel` if given.
pub fn format_image(path: &Path, mib: u64, skel: Option<&Path>) -> io::Result<()> {
    let f = fs::File::create(path)?;
    f.set_len(mib * 1024 * 1024)?;
    drop(f);
    let mkfs = which("mkfs.ext4").ok_or_else(|| io::Error::other("mkfs.ext4 not found"))?;
    let out = Command::new(mkfs)
        .args([
            "-q",
            "-F",
            // No journal; no blocks reserved for growing the file system online (2.6 MB of
            // the 2.7 MB a fresh 5 GiB image holds, copied for every box otherwise).
            "-O",
            "^has_journal,^resize_inode",
            "-E",
            "lazy_itable_init=1,nodiscard",
            "-m",
            "0",
        ])
        .args(skel.map(|d| [Path::new("-d"), d]).into_iter().flatten())
        .arg(path)
        .output()?;
    if !out.status.success() {
        let _ = fs::remove_file(path);
        return Err(io::Error::other(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Copy `src` to `dst` keeping its holes: only the data extents are copied (in the kernel).
pub fn sparse_copy(src: &Path, dst: &Path) -> io::Result<()> {
    let s = fs::File::open(src)?;
    let len = s.metadata()?.len() as i64;
    let d = fs::File::create(dst)?;
    d.set_len(len as u64)?;
    let mut off: i64 = 0;
    while off < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(s.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(s.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut from, mut to) = (data, data);
        while from < hole {
            // SAFETY: copy_file_range between two descriptors we own, offsets owned here.
            let n = unsafe {
                libc::copy_file_range(
                    s.as_raw_fd(),
                    &mut from,
                    d.as_raw_fd(),
                    &mut to,
                    (hole - from) as usize,
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Err(io::Error::other("disk image shrank while being copied"));
            }
        }
        off = hole;
    }
    Ok(())
}

/// Formatted images kept ready so that creating a box does not wait for `mkfs`.
#[derive(Clone)]
pub struct ImagePool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    dir: PathBuf,
    skel: PathBuf,
    /// Held while a size's master image is formatted.
    masters: Mutex<()>,
    target: usize,
    ready: Mutex<Vec<(u64, PathBuf, ReadyDisk)>>,
    counter: AtomicU64,
    refilling: Mutex<std::collections::HashSet<u64>>,
}

impl ImagePool {
    pub fn new(dir: PathBuf, target: usize) -> io::Result<ImagePool> {
        fs::create_dir_all(&dir)?;
        // Images left by an earlier run are reformatted on demand; start clean.
        for e in fs::read_dir(&dir)?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let skel = skeleton(&dir)?;
        Ok(ImagePool {
            inner: Arc::new(PoolInner {
                dir,
                skel,
                masters: Mutex::new(()),
                target,
                ready: Mutex::new(Vec::new()),
                counter: AtomicU64::new(0),
                refilling: Mutex::new(Default::default()),
            }),
        })
    }

    /// Move a ready disk of `mib` MiB to `dest` if there is one (a rename: the loop device
    /// follows the file), and top the pool up in the background.
    pub fn take_ready(&self, mib: u64, dest: &Path) -> io::Result<Option<ReadyDisk>> {
        let found = {
            let mut ready = self
                .inner
                .ready
                .lock()
                .map_err(|_| io::Error::other("pool lock"))?;
            ready
                .iter()
                .position(|(m, _, _)| *m == mib)
                .map(|i| ready.swap_remove(i))
        };
        let took = match found {
            Some((_, path, disk)) => {
                fs::rename(path, dest)?;
                Some(disk)
            }
            None => None,
        };
        self.refill(mib);
        Ok(took)
    }

    /// A ready disk of `mib` MiB at `dest`, formatted and mounted now if none is ready.
    pub fn take(&self, mib: u64, dest: &Path) -> io::Result<ReadyDisk> {
        if let Some(d) = self.take_ready(mib, dest)? {
            return Ok(d);
        }
        self.inner.make_disk(mib, dest)
    }

    /// Disks ready in the pool: each holds a descriptor (its detached mount).
    pub fn ready_count(&self) -> usize {
        self.inner.ready.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Start a background thread filling the pool for `mib` (one per size at a time).
    pub fn refill(&self, mib: u64) {
        if self.inner.target == 0 {
            return;
        }
        match self.inner.refilling.lock() {
            Ok(mut set) => {
                if !set.insert(mib) {
                    return;
                }
            }
            Err(_) => return,
        }
        let inner = self.inner.clone();
        std::thread::spawn(move || {
            // Work ahead of need, at the lowest priority: a box being created must not wait
            // for a CPU behind it.
            // SAFETY: setpriority on this thread (a Linux thread is a PRIO_PROCESS target).
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
            loop {
                let have = inner
                    .ready
                    .lock()
                    .map(|r| r.iter().filter(|(m, _, _)| *m == mib).count())
                    .unwrap_or(usize::MAX);
                if have >= inner.target {
                    break;
                }
                let n = inner.counter.fetch_add(1, Ordering::Relaxed);
                let p = inner
                    .dir
                    .join(format!("{mib}-{}-{n}.img", std::process::id()));
                let Ok(disk) = inner.make_disk(mib, &p) else {
                    break;
                };
                if let Ok(mut r) = inner.ready.lock() {
                    r.push((mib, p, disk));
                }
            }
            if let Ok(mut set) = inner.refilling.lock() {
                set.remove(&mib);
            }
        });
    }
}

impl PoolInner {
    /// A ready disk of `mib` MiB at `dest`: a fresh image, mounted detached.
    fn make_disk(&self, mib: u64, dest: &Path) -> io::Result<ReadyDisk> {
        self.make_image(mib, dest)?;
        mount_detached(dest).map_err(|e| {
            let _ = fs::remove_file(dest);
            io::Error::other(e)
        })
    }

    /// A fresh image of `mib` MiB at `dest`: a sparse copy of the size's master image, which
    /// is formatted once (`mkfs` ~10 ms of CPU per disk; the copy of its ~180 KB of metadata
    /// well under 1 ms). Every disk of a size thus has the same file-system UUID and hash seed, which
    /// nothing relies on: a disk is only ever seen by its own box.
    fn make_image(&self, mib: u64, dest: &Path) -> io::Result<()> {
        let master = self.dir.join(format!(".master-{mib}.img"));
        {
            let _formatting = self
                .masters
                .lock()
                .map_err(|_| io::Error::other("pool lock"))?;
            if !master.exists() {
                let fresh = self.dir.join(format!(".master-{mib}.new"));
                format_image(&fresh, mib, Some(&self.skel))?;
                fs::rename(&fresh, &master)?;
            }
        }
        sparse_copy(&master, dest)
    }
}

/// Loop devices whose backing file is `img`.
pub fn loop_devices_for(img: &Path) -> Vec<String> {
    let want = img.to_string_lossy().into_owned();
    let Ok(rd) = fs::read_dir("/sys/block") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                return None;
            }
            let backing = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim().trim_end_matches(" (deleted)");
            (backing == want).then_some(name)
        })
        .collect()
}

/// Whether loop device `n` is still attached to `img`.
fn attached_to(n: u32, img: &Path) -> bool {
    fs::read_to_string(format!("/sys/block/loop{n}/loop/backing_file"))
        .is_ok_and(|b| Path::new(b.trim().trim_end_matches(" (deleted)")) == img)
}

/// Wait (bounded) until the kernel has released loop device `loop_dev` of a dead box, whose
/// image is `img`: the unmount of a namespace's last mount and the auto-clear that follows
/// complete asynchronously.
pub fn wait_detached(img: &Path, loop_dev: u32, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while attached_to(loop_dev, img) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

/// Remove loop device `n` once it is free again (a destroyed box's, after [`wait_detached`]):
/// an unbound loop device keeps its queue (128 preallocated requests), its disk and its sysfs
/// entries until removed, so a host that once held thousands of boxes would keep thousands of
/// them. The pool adds devices as it needs them, off the create path. Refused (EBUSY) when
/// another user took the number meanwhile; such a user's open then fails with ENXIO or
/// ENOENT and takes another number (as [`mount_detached`] does).
pub fn remove_loop(n: u32) -> io::Result<()> {
    let ctl = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // SAFETY: LOOP_CTL_REMOVE takes the device number by value.
    let r = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_REMOVE, n as libc::c_ulong) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
