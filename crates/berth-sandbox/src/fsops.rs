//! Host-side file operations on a box's workspace that can never leave it.
//!
//! The box owns its file tree and may plant symlinks or rename directories at any moment, so
//! every path is resolved by the kernel with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`
//! relative to a directory fd of the workspace root: a `..` or a symlink that would lead out is
//! refused (EXDEV), not followed. Paths are also checked lexically first so that the caller gets
//! a clear "outside the workspace" error for `../x` or `/etc/passwd`. Writes go to a temporary
//! name and are renamed into place, so a reader never sees half a file and a symlink at the
//! destination is replaced, not followed.

use rustix::fs::{Mode, OFlags, ResolveFlags};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Largest file the API reads into memory in one piece.
pub const MAX_READ: u64 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("path resolves outside the workspace: {0}")]
    Outside(String),
    #[error("invalid path: {0}")]
    Invalid(String),
    #[error("no such file or directory: {0}")]
    NotFound(String),
    #[error("file too large to read at once ({0} bytes)")]
    TooLarge(u64),
    #[error("no space left in the box's disk quota")]
    NoSpace,
    /// The box's file operations are stuck or too many (see [`crate::files`]).
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<rustix::io::Errno> for FsError {
    fn from(e: rustix::io::Errno) -> Self {
        FsError::Io(e.into())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub modified: i64,
}

/// Most entries one listing returns: a box can make millions of files in one directory, and
/// a listing is held whole in memory and sent as one JSON document.
pub const MAX_LIST_ENTRIES: usize = 10_000;

/// A directory's entries, sorted by name: all of them, or (`truncated`) the first
/// [`MAX_LIST_ENTRIES`] the kernel returned, which are an arbitrary subset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<DirEntry>,
    pub truncated: bool,
}

#[derive(Debug)]
pub enum FileContent {
    File(Vec<u8>),
    Dir(Listing),
}

/// Lexically validate a workspace-relative path; `""` and `"."` name the root.
pub fn clean(path: &str) -> Result<PathBuf, FsError> {
    if path.contains('\0') {
        return Err(FsError::Invalid("path contains NUL".into()));
    }
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(FsError::Outside(path.to_string()));
            }
        }
    }
    Ok(out)
}

fn map_errno(e: rustix::io::Errno, path: &str) -> FsError {
    match e {
        rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => FsError::Outside(path.to_string()),
        rustix::io::Errno::NOENT => FsError::NotFound(path.to_string()),
        rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT => FsError::NoSpace,
        other => FsError::Io(other.into()),
    }
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

fn open_root(root: &Path) -> Result<OwnedFd, FsError> {
    rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| map_errno(e, &root.display().to_string()))
}

fn open_beneath(root: &OwnedFd, rel: &Path, flags: OFlags, orig: &str) -> Result<OwnedFd, FsError> {
    let p = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    rustix::fs::openat2(root, p, flags | OFlags::CLOEXEC, Mode::empty(), RESOLVE)
        .map_err(|e| map_errno(e, orig))
}

/// An opened workspace path: a regular file ready to read, or a directory's listing.
#[derive(Debug)]
pub enum Opened {
    File { file: File, size: u64 },
    Dir(Listing),
}

/// Open a regular file for reading, or list a directory. Anything else (a FIFO, socket or
/// device node the box made) is refused without being opened for reading: opening a FIFO
/// waits for a writer, reading one waits for data, and the box controls both.
pub fn open_read(root: &Path, path: &str) -> Result<Opened, FsError> {
    let rel = clean(path)?;
    let rootfd = open_root(root)?;
    // O_PATH opens nothing for I/O: no FIFO open, no device driver's open.
    let pathfd = open_beneath(&rootfd, &rel, OFlags::PATH, path)?;
    let st = rustix::fs::fstat(&pathfd)?;
    match rustix::fs::FileType::from_raw_mode(st.st_mode) {
        rustix::fs::FileType::Directory => {
            let fd = open_beneath(&rootfd, &rel, OFlags::RDONLY | OFlags::DIRECTORY, path)?;
            return Ok(Opened::Dir(list(fd)?));
        }
        rustix::fs::FileType::RegularFile => {}
        _ => return Err(not_regular(path)),
    }
    // The box may swap the path for a FIFO in between: O_NONBLOCK keeps that open from
    // waiting, and the second look refuses it.
    let fd = open_beneath(
        &rootfd,
        &rel,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
        path,
    )?;
    let st2 = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st2.st_mode) != rustix::fs::FileType::RegularFile
        || st2.st_ino != st.st_ino
        || st2.st_dev != st.st_dev
    {
        return Err(not_regular(path));
    }
    Ok(Opened::File {
        file: File::from(fd),
        size: st2.st_size as u64,
    })
}

fn not_regular(path: &str) -> FsError {
    FsError::Invalid(format!(
        "{path} is not a regular file or directory (a FIFO, socket or device)"
    ))
}

/// Read a file's bytes or a directory's listing (whole; at most [`MAX_READ`] bytes).
pub fn read(root: &Path, path: &str) -> Result<FileContent, FsError> {
    match open_read(root, path)? {
        Opened::Dir(l) => Ok(FileContent::Dir(l)),
        Opened::File { mut file, size } => {
            if size > MAX_READ {
                return Err(FsError::TooLarge(size));
            }
            let mut buf = Vec::with_capacity(size as usize);
            (&mut file).take(MAX_READ).read_to_end(&mut buf)?;
            Ok(FileContent::File(buf))
        }
    }
}

fn list(dirfd: OwnedFd) -> Result<Listing, FsError> {
    let mut out = Vec::new();
    let mut truncated = false;
    let dir = rustix::fs::Dir::read_from(&dirfd)?;
    for ent in dir {
        let ent = ent?;
        if out.len() >= MAX_LIST_ENTRIES {
            // Only `.` or `..` may follow without more: look no further either way.
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                truncated = true;
                break;
            }
            continue;
        }
        let name = ent.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        let st = match rustix::fs::statat(
            &dirfd,
            ent.file_name(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(s) => s,
            Err(_) => continue, // raced with a deletion inside the box
        };
        let kind = match rustix::fs::FileType::from_raw_mode(st.st_mode) {
            rustix::fs::FileType::RegularFile => "file",
            rustix::fs::FileType::Directory => "dir",
            rustix::fs::FileType::Symlink => "symlink",
            _ => "other",
        };
        out.push(DirEntry {
            name,
            kind: kind.into(),
            size: st.st_size as u64,
            mode: st.st_mode & 0o7777,
            modified: st.st_mtime,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Listing {
        entries: out,
        truncated,
    })
}

/// Create the directories of `rel` beneath `rootfd` (owned by `owner`) and return an fd of the
/// innermost one.
fn mkdirs(
    rootfd: &OwnedFd,
    rel: &Path,
    owner: Option<u32>,
    orig: &str,
) -> Result<OwnedFd, FsError> {
    let mut cur = PathBuf::new();
    let mut fd = open_beneath(rootfd, &cur, OFlags::PATH | OFlags::DIRECTORY, orig)?;
    for c in rel.components() {
        cur.push(c);
        match rustix::fs::mkdirat(&fd, c.as_os_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) => {
                if let Some(uid) = owner {
                    let uid = rustix::fs::Uid::from_raw(uid);
                    let gid = rustix::fs::Gid::from_raw(uid.as_raw());
                    rustix::fs::chownat(
                        &fd,
                        c.as_os_str(),
                        Some(uid),
                        Some(gid),
                        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                    )?;
                }
            }
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(map_errno(e, orig)),
        }
        fd = open_beneath(rootfd, &cur, OFlags::PATH | OFlags::DIRECTORY, orig)?;
    }
    Ok(fd)
}

/// Write `data` to `path` atomically, creating parent directories. New files and directories
/// are owned by `owner` (the box's agent uid as seen from the host).
pub fn write(
    root: &Path,
    path: &str,
    data: &[u8],
    mode: u32,
    owner: Option<u32>,
) -> Result<(), FsError> {
    let mut w = Writer::create(root, path, mode, owner)?;
    w.write_chunk(data)?;
    w.commit()
}

fn write_errno(e: std::io::Error) -> FsError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        FsError::NoSpace
    } else {
        FsError::Io(e)
    }
}

/// A file being written in pieces: a temporary name beside the destination, renamed over it
/// by [`Writer::commit`]; dropped uncommitted, the temporary file is removed.
pub struct Writer {
    parent: OwnedFd,
    tmp: String,
    name: std::ffi::OsString,
    file: Option<File>,
    path: String,
}

impl Writer {
    pub fn create(
        root: &Path,
        path: &str,
        mode: u32,
        owner: Option<u32>,
    ) -> Result<Writer, FsError> {
        let rel = clean(path)?;
        let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
            return Err(FsError::Invalid(
                "cannot write to the workspace root".into(),
            ));
        };
        let rootfd = open_root(root)?;
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        mkdirs(&rootfd, parent_rel, owner, path)?;
        let parent = open_beneath(
            &rootfd,
            parent_rel,
            OFlags::RDONLY | OFlags::DIRECTORY,
            path,
        )?;
        refuse_special(&parent, &name, path)?;
        let tmp = format!(".berth-tmp-{}-{}", std::process::id(), rand_suffix());
        let fd = rustix::fs::openat(
            &parent,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode & 0o777),
        )
        .map_err(|e| map_errno(e, path))?;
        let w = Writer {
            parent,
            tmp,
            name,
            file: Some(File::from(fd)),
            path: path.to_string(),
        };
        if let (Some(uid), Some(f)) = (owner, &w.file) {
            rustix::fs::fchown(
                f,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(uid)),
            )?;
        }
        Ok(w)
    }

    pub fn write_chunk(&mut self, data: &[u8]) -> Result<(), FsError> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| FsError::Invalid("write after commit".into()))?;
        f.write_all(data).map_err(write_errno)
    }

    /// Flush the data and put the file in place of the destination.
    pub fn commit(mut self) -> Result<(), FsError> {
        let f = self
            .file
            .take()
            .ok_or_else(|| FsError::Invalid("committed twice".into()))?;
        f.sync_data().map_err(write_errno)?;
        drop(f);
        // The box may have made a FIFO at the destination meanwhile: still not replaced.
        refuse_special(&self.parent, &self.name, &self.path)?;
        rustix::fs::renameat(
            &self.parent,
            self.tmp.as_str(),
            &self.parent,
            self.name.as_os_str(),
        )
        .map_err(|e| map_errno(e, &self.path))?;
        self.tmp.clear();
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.tmp.is_empty() {
            let _ = rustix::fs::unlinkat(
                &self.parent,
                self.tmp.as_str(),
                rustix::fs::AtFlags::empty(),
            );
        }
    }
}

/// Refuse to write over a FIFO, socket or device node: the caller meant a file.
fn refuse_special(dir: &OwnedFd, name: &std::ffi::OsStr, path: &str) -> Result<(), FsError> {
    match rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => match rustix::fs::FileType::from_raw_mode(st.st_mode) {
            rustix::fs::FileType::RegularFile
            | rustix::fs::FileType::Symlink
            | rustix::fs::FileType::Directory => Ok(()),
            _ => Err(not_regular(path)),
        },
        Err(_) => Ok(()),
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    t ^ (N.fetch_add(1, Ordering::Relaxed) << 32)
}

/// Delete a file, symlink or (recursively) a directory. Deleting the root is refused.
pub fn delete(root: &Path, path: &str) -> Result<(), FsError> {
    let rel = clean(path)?;
    let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
        return Err(FsError::Invalid("cannot delete the workspace root".into()));
    };
    let rootfd = open_root(root)?;
    let parent_rel = rel.parent().unwrap_or(Path::new(""));
    let parent = open_beneath(
        &rootfd,
        parent_rel,
        OFlags::RDONLY | OFlags::DIRECTORY,
        path,
    )?;
    remove_at(&parent, name.as_os_str(), path)
}

/// Most entries one delete visits (files, directories, moves): bounds the time a delete of a
/// huge tree holds a blocking thread; past it the caller gets a clear error and deletes the
/// rest from inside the box.
pub const MAX_DELETE_ENTRIES: u64 = 1_000_000;
/// Directory fds one delete holds at once. A deeper tree (a box can nest directories without
/// limit) has its subtrees at this depth moved up into the directory being deleted and taken
/// from there, so any depth is removed with a bounded stack and bounded fds.
const MAX_DELETE_DEPTH: usize = 64;

/// The directory `name` in `dir`, opened for reading; a symlink there is refused.
pub(crate) fn open_subdir(dir: &OwnedFd, name: &std::ffi::OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Removes `name` in `dir`, a whole tree if it is a directory. Iterative: the stack is on
/// the heap and at most [`MAX_DELETE_DEPTH`] deep whatever the tree's depth.
fn remove_at(dir: &OwnedFd, name: &std::ffi::OsStr, orig: &str) -> Result<(), FsError> {
    remove_bounded(dir, name, orig, MAX_DELETE_ENTRIES)
}

fn remove_bounded(
    dir: &OwnedFd,
    name: &std::ffi::OsStr,
    orig: &str,
    max_entries: u64,
) -> Result<(), FsError> {
    use rustix::io::Errno;
    let st = rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| map_errno(e, orig))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
        return rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty())
            .map_err(|e| map_errno(e, orig));
    }
    let too_many = || {
        FsError::Invalid(format!(
            "{orig}: more than {max_entries} entries to delete; delete part of it from inside the box first"
        ))
    };
    let mut visited = 0u64;
    let mut moved = 0u64;
    // stack[i + 1] is the directory names[i] in stack[i]; stack[0] is the one being deleted.
    let mut stack: Vec<OwnedFd> = vec![open_subdir(dir, name).map_err(|e| map_errno(e, orig))?];
    let mut names: Vec<std::ffi::OsString> = Vec::new();
    loop {
        let Some(cur) = stack.last() else {
            return Ok(());
        };
        // Every pass counts, so a box refilling a directory as fast as it empties cannot keep
        // the loop going.
        visited += 1;
        if visited > max_entries {
            return Err(too_many());
        }
        // Remove what can be removed at once; stop at the first non-empty subdirectory.
        let mut descend = None;
        for ent in rustix::fs::Dir::read_from(cur)? {
            let ent = ent?;
            let n = std::ffi::OsStr::from_bytes(ent.file_name().to_bytes());
            if n == "." || n == ".." {
                continue;
            }
            visited += 1;
            if visited > max_entries {
                return Err(too_many());
            }
            match rustix::fs::unlinkat(cur, n, rustix::fs::AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => continue,
                Err(Errno::ISDIR) | Err(Errno::PERM) => {}
                Err(e) => return Err(map_errno(e, orig)),
            }
            match rustix::fs::unlinkat(cur, n, rustix::fs::AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::NOTEMPTY) | Err(Errno::EXIST) => {
                    descend = Some(n.to_os_string());
                    break;
                }
                Err(e) => return Err(map_errno(e, orig)),
            }
        }
        match descend {
            Some(n) if stack.len() >= MAX_DELETE_DEPTH => {
                // Too deep to hold another fd: move the subtree up into the top directory,
                // where a later pass over it finds it.
                loop {
                    let tmp = format!(".berth-deleting-{moved}");
                    moved += 1;
                    visited += 1;
                    if visited > max_entries {
                        return Err(too_many());
                    }
                    match rustix::fs::renameat_with(
                        cur,
                        &n,
                        &stack[0],
                        tmp.as_str(),
                        rustix::fs::RenameFlags::NOREPLACE,
                    ) {
                        Ok(()) | Err(Errno::NOENT) => break,
                        Err(Errno::EXIST) => continue,
                        Err(e) => return Err(map_errno(e, orig)),
                    }
                }
            }
            Some(n) => match open_subdir(cur, &n) {
                Ok(sub) => {
                    stack.push(sub);
                    names.push(n);
                }
                // Swapped for something else by the box meanwhile: the next pass sees it.
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => {}
                Err(e) => return Err(map_errno(e, orig)),
            },
            None => {
                // `cur` is empty (unless the box refilled it: then a pass over it again).
                stack.pop();
                let (parent, n) = match (stack.last(), names.pop()) {
                    (Some(p), Some(n)) => (p, n),
                    _ => (dir, name.to_os_string()),
                };
                match rustix::fs::unlinkat(parent, &n, rustix::fs::AtFlags::REMOVEDIR) {
                    Ok(()) | Err(Errno::NOENT) if stack.is_empty() => return Ok(()),
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(Errno::NOTEMPTY) | Err(Errno::EXIST) if stack.is_empty() => {
                        stack.push(open_subdir(dir, name).map_err(|e| map_errno(e, orig))?);
                    }
                    // The parent's next pass finds it again.
                    Err(Errno::NOTEMPTY) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(map_errno(e, orig)),
                }
            }
        }
    }
}

/// Bytes used and available on the file system holding `root`.
pub fn disk_usage(root: &Path) -> Result<(u64, u64), FsError> {
    let fd = open_root(root)?;
    let st = rustix::fs::fstatvfs(fd.as_fd())?;
    let total = st.f_blocks * st.f_frsize;
    let free = st.f_bavail * st.f_frsize;
    Ok((total.saturating_sub(free), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `depth` nested directories `d` under `root/name` (files in the first `files` levels),
    /// made with fds: the path is far longer than PATH_MAX.
    fn deep_tree(root: &Path, name: &str, depth: usize, files: usize) {
        let mut cur = rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
            .expect("open root");
        let mut n = name;
        for level in 0..depth {
            rustix::fs::mkdirat(&cur, n, Mode::from_raw_mode(0o755)).expect("mkdir");
            cur = rustix::fs::openat(&cur, n, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
                .expect("open");
            n = "d";
            if level >= files {
                continue;
            }
            let f = rustix::fs::openat(
                &cur,
                "f",
                OFlags::WRONLY | OFlags::CREATE,
                Mode::from_raw_mode(0o644),
            )
            .expect("file");
            drop(f);
        }
    }

    /// Past its entry budget a delete stops with a clear error (what is left stays, and a
    /// later delete goes on from there).
    #[test]
    fn a_delete_past_its_budget_stops_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        deep_tree(dir.path(), "t", 300, 300);
        let fd = rustix::fs::open(
            dir.path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .expect("open");
        let e = remove_bounded(&fd, std::ffi::OsStr::new("t"), "t", 100).expect_err("budget");
        assert!(
            matches!(&e, FsError::Invalid(m) if m.contains("more than 100 entries")),
            "{e}"
        );
        assert!(dir.path().join("t").is_dir());
        delete(dir.path(), "t").expect("the rest");
        assert!(!dir.path().join("t").exists());
    }

    /// A listing stops at [`MAX_LIST_ENTRIES`] and says so; one entry fewer is listed whole.
    #[test]
    fn listings_are_capped_and_say_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big");
        std::fs::create_dir(&big).expect("mkdir");
        for i in 0..MAX_LIST_ENTRIES + 2 {
            std::fs::File::create(big.join(format!("f{i:05}"))).expect("create");
        }
        let FileContent::Dir(l) = read(dir.path(), "big").expect("list") else {
            panic!("expected a listing");
        };
        assert!(l.truncated);
        assert_eq!(l.entries.len(), MAX_LIST_ENTRIES);
        assert!(l.entries.windows(2).all(|w| w[0].name < w[1].name));
        for i in 0..2 {
            std::fs::remove_file(big.join(format!("f{i:05}"))).expect("rm");
        }
        let FileContent::Dir(l) = read(dir.path(), "big").expect("list") else {
            panic!("expected a listing");
        };
        assert!(!l.truncated);
        assert_eq!(l.entries.len(), MAX_LIST_ENTRIES);
    }

    /// A tree deeper than any recursion could take on a 2 MiB thread stack is deleted, with
    /// its siblings kept; the recursive version overflowed the stack and aborted the process.
    #[test]
    fn a_very_deep_tree_is_deleted_iteratively() {
        // tmpfs where there is one: making 20 000 directories on a full ext4 takes many seconds.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("tempdir");
        deep_tree(dir.path(), "deep", 20_000, 200);
        std::fs::write(dir.path().join("keep"), b"k").expect("write");
        // The test harness's threads have 2 MiB stacks, as tokio's blocking threads do.
        delete(dir.path(), "deep").expect("delete");
        assert!(!dir.path().join("deep").exists());
        assert!(dir.path().join("keep").exists());
        // A wide and moderately deep tree, and a file.
        for i in 0..50 {
            deep_tree(dir.path(), &format!("w{i}"), 100, 100);
            std::fs::rename(dir.path().join(format!("w{i}")), {
                std::fs::create_dir_all(dir.path().join("wide")).expect("mkdir");
                dir.path().join("wide").join(format!("w{i}"))
            })
            .expect("mv");
        }
        delete(dir.path(), "wide").expect("delete wide");
        assert!(!dir.path().join("wide").exists());
        delete(dir.path(), "keep").expect("delete file");
        assert!(!dir.path().join("keep").exists());
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    }

    #[test]
    fn lexical_check_refuses_escapes() {
        assert!(matches!(clean("../etc/passwd"), Err(FsError::Outside(_))));
        assert!(matches!(clean("/etc/passwd"), Err(FsError::Outside(_))));
        assert!(matches!(clean("a/../../b"), Err(FsError::Outside(_))));
        assert!(matches!(clean("a\0b"), Err(FsError::Invalid(_))));
        assert_eq!(clean("./a/b").expect("ok"), PathBuf::from("a/b"));
        assert_eq!(clean("").expect("ok"), PathBuf::new());
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("ws");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::write(dir.path().join("secret"), b"s3cret").expect("write");
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("abs")).expect("ln");
        std::os::unix::fs::symlink("../secret", root.join("rel")).expect("ln");
        std::os::unix::fs::symlink("..", root.join("up")).expect("ln");
        assert!(matches!(read(&root, "abs"), Err(FsError::Outside(_))));
        assert!(matches!(read(&root, "rel"), Err(FsError::Outside(_))));
        assert!(matches!(
            write(&root, "up/secret", b"x", 0o644, None),
            Err(FsError::Outside(_))
        ));
        assert_eq!(
            std::fs::read(dir.path().join("secret")).expect("read"),
            b"s3cret"
        );
        // Writing over a symlink replaces the link, never the target.
        write(&root, "abs", b"new", 0o644, None).expect("write");
        assert_eq!(
            std::fs::read(dir.path().join("secret")).expect("read"),
            b"s3cret"
        );
        write(&root, "d/e/f.txt", b"deep", 0o644, None).expect("write deep");
        match read(&root, "d/e/f.txt").expect("read") {
            FileContent::File(b) => assert_eq!(b, b"deep"),
            FileContent::Dir(_) => panic!("expected a file"),
        }
        match read(&root, "d").expect("read") {
            FileContent::Dir(l) => assert_eq!(l.entries[0].name, "e"),
            FileContent::File(_) => panic!("expected a dir"),
        }
        delete(&root, "d").expect("delete");
        assert!(matches!(read(&root, "d"), Err(FsError::NotFound(_))));
        assert!(matches!(
            delete(&root, "up/secret"),
            Err(FsError::Outside(_))
        ));
        assert!(dir.path().join("secret").exists());
    }
}
