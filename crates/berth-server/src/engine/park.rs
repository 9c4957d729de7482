//! Park and restore for hybrid boxes: the box's state as one archive.
//!
//! The archive is `tar` of `/workspace` and `/home/agent` (each session's `CLAUDE_CONFIG_DIR`
//! is under it), made and unpacked by `tar` *inside* the box as the agent's uid: the host never
//! walks a tree the box controls, so no symlink the agent planted can point the host anywhere,
//! and the same code serves every backend. The host compresses the stream (zstd, level 1, on a
//! blocking thread while the box writes) and streams it into `SnapshotStore`: the server holds a
//! few chunks of an archive, never the archive (restores stream the same way back).

use berth_sandbox::{Backend, ExecEvent, ExecInput, ExecSpec, Sandbox};
use bytes::Bytes;
use std::time::Duration;

/// The box's writable state, relative to its root.
pub const PATHS: [&str; 2] = ["workspace", "home/agent"];
/// Longest a box may take to write or unpack its archive.
const TAR_TIMEOUT: Duration = Duration::from_secs(600);
/// Bytes of the uncompressed archive fed to the box per stdin message.
const CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ParkError {
    #[error("box: {0}")]
    Box(#[from] berth_sandbox::SandboxError),
    #[error("tar in the box failed: {0}")]
    Tar(String),
    #[error("compression: {0}")]
    Compress(#[from] std::io::Error),
    #[error("snapshot store: {0}")]
    Store(#[from] berth_store::snapshots::SnapshotError),
}

/// The in-box `tar` by its path, with an environment of our own: `env -i` drops whatever the
/// box's `env` set (`TAR_OPTIONS`, `LD_PRELOAD`, a `PATH` to a planted `tar`, a locale).
fn tar_spec(args: &[&str]) -> ExecSpec {
    let mut argv: Vec<String> = [
        "/usr/bin/env",
        "-i",
        "PATH=/usr/bin:/bin",
        "LC_ALL=C",
        "/usr/bin/tar",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(args.iter().map(|s| s.to_string()));
    ExecSpec {
        argv,
        cwd: Some("/".into()),
        timeout: Some(TAR_TIMEOUT),
        ..Default::default()
    }
}

/// Wait for the exec's end, keeping stderr's tail for the error; stdout goes to `stdout`
/// (waiting while it is full, so a fast box is held back rather than buffered).
/// More than `max_stdout` bytes on stdout fail it (and dropping `events` ends the exec).
async fn finish(
    events: &mut tokio::sync::mpsc::Receiver<ExecEvent>,
    stdout: Option<tokio::sync::mpsc::Sender<Bytes>>,
    max_stdout: u64,
) -> Result<(), ParkError> {
    let mut stderr = Vec::new();
    let mut written: u64 = 0;
    while let Some(ev) = events.recv().await {
        match ev {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(b) => {
                written = written.saturating_add(b.len() as u64);
                if written > max_stdout {
                    return Err(ParkError::Tar(format!(
                        "the archive passed {max_stdout} bytes (the box's disk and then some)"
                    )));
                }
                if let Some(tx) = &stdout {
                    tx.send(b).await.map_err(|_| {
                        ParkError::Compress(std::io::Error::other("compressor stopped"))
                    })?;
                }
            }
            ExecEvent::Stderr(b) => {
                stderr.extend_from_slice(&b);
                let excess = stderr.len().saturating_sub(2048);
                stderr.drain(..excess);
            }
            ExecEvent::Exit(st) if st.code == Some(0) => return Ok(()),
            ExecEvent::Exit(st) => {
                return Err(ParkError::Tar(format!(
                    "{st:?}: {}",
                    String::from_utf8_lossy(&stderr).trim()
                )))
            }
            ExecEvent::Failed(e) => return Err(ParkError::Tar(e)),
        }
    }
    Err(ParkError::Tar("the exec stream ended early".into()))
}

/// Entries left out of a sanitised archive: how many, and the first few names.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub count: u64,
    pub names: Vec<String>,
}

/// Names of dropped entries kept for the box's event.
const DROPPED_NAMES: usize = 20;

/// Whether the archive is for the box itself (a park snapshot, unpacked in the box again, so
/// its links are the box's own business) or leaves the box (a workspace artifact a client
/// unpacks on its own machine: see [`sanitize_tar`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Box,
    Client,
}

/// Reads a channel's chunks as one byte stream (on a blocking thread).
pub(crate) struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl ChunkReader {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<Bytes>) -> ChunkReader {
        ChunkReader {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// Sends what is written as chunks of [`CHUNK`] bytes over a channel (from a blocking thread).
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader stopped"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Room an archive gets past the box's disk: tar's headers and padding (a 1 KiB record for
/// an empty file that holds no block on disk).
fn slack(disk_mib: u64) -> u64 {
    (disk_mib.saturating_mul(1 << 20) / 8).saturating_add(64 << 20)
}

/// Chunks in flight between the box, the (de)compressor and the store, per channel.
const IN_FLIGHT: usize = 8;

/// An archive of `paths` (relative to the box's root), compressed (and for a client,
/// sanitised) as the box writes it, into `out`: the server holds a few chunks, never the
/// archive. The caller finishes (or aborts) `out`. `disk_mib` is the box's disk: an archive
/// (or, for a client, its files' contents) past it plus [`slack`] fails rather than streaming
/// zeros until the timeout (sparse files are archived as such, `--sparse`).
pub async fn capture_paths(
    backend: &Backend,
    box_id: &str,
    paths: &[&str],
    audience: Audience,
    disk_mib: u64,
    out: &mut berth_store::snapshots::SnapshotWriter,
) -> Result<Dropped, ParkError> {
    let max_bytes = disk_mib
        .saturating_mul(1 << 20)
        .saturating_add(slack(disk_mib));
    let mut argv = vec!["-C", "/", "--numeric-owner", "--sparse", "-cf", "-"];
    argv.extend(paths);
    let mut h = backend.exec(box_id, tar_spec(&argv)).await?;
    drop(h.input);
    let (raw_tx, raw_rx) = tokio::sync::mpsc::channel::<Bytes>(IN_FLIGHT);
    let (zst_tx, mut zst_rx) = tokio::sync::mpsc::channel::<Bytes>(IN_FLIGHT);
    let encoder = tokio::task::spawn_blocking(move || -> std::io::Result<Dropped> {
        use std::io::Write;
        let sink = ChunkWriter {
            tx: zst_tx,
            buf: Vec::with_capacity(CHUNK),
        };
        let mut enc = zstd::stream::Encoder::new(sink, 1)?;
        let mut reader = ChunkReader {
            rx: raw_rx,
            cur: Bytes::new(),
        };
        let dropped = match audience {
            Audience::Box => {
                std::io::copy(&mut reader, &mut enc)?;
                Dropped::default()
            }
            Audience::Client => {
                let d = sanitize_tar(&mut reader, &mut enc, max_bytes)?;
                // Drain what the box wrote past the archive's end so its tar is not cut off.
                std::io::copy(&mut reader, &mut std::io::sink())?;
                d
            }
        };
        let mut sink = enc.finish()?;
        sink.flush()?;
        Ok(dropped)
    });
    let store = async {
        while let Some(chunk) = zst_rx.recv().await {
            out.write(chunk).await?;
        }
        Ok::<(), ParkError>(())
    };
    let (streamed, stored) = tokio::join!(finish(&mut h.events, Some(raw_tx), max_bytes), store);
    let dropped = encoder
        .await
        .map_err(|e| ParkError::Compress(std::io::Error::other(e)))?;
    // Over the size is the box's doing, and the reason the box's stream was cut: said first.
    if let Err(e) = &dropped {
        if e.kind() == std::io::ErrorKind::FileTooLarge {
            return Err(ParkError::Tar(e.to_string()));
        }
    }
    stored?;
    streamed?;
    Ok(dropped?)
}

/// The top directory of an artifact: every name in one is `workspace` or under it.
const ARTIFACT_TOP: &str = "workspace";

/// What a sanitised archive already holds at a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A directory only implied by a deeper name (it may still be declared, once).
    Implied,
    Dir,
    File,
    HardLink,
    Symlink,
}

/// Reads exactly `left` bytes of `inner`, failing if it ends first: the header written
/// before the data promised that many.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: std::io::Read> std::io::Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Copy a tar stream the box wrote, leaving out every entry that could reach outside the
/// archive's top directory (`workspace/`) when a client unpacks it: names that are not
/// `workspace` or under it, hold `..` or a backslash, pass through a symbolic link of the
/// archive, or declare a name again; symbolic links whose target is absolute, holds a
/// backslash or climbs above the top directory (`..` only as leading components, no deeper
/// than the link sits); hard links to anything but a regular file already written; devices
/// and FIFOs. Every kept entry gets a fresh header made here (type, size, permission bits
/// without setuid/setgid/sticky, mtime; owner 0, no names, no PAX records), so nothing of the
/// box's headers reaches the client but the name and link target, re-encoded by the builder
/// (GNU long names past 100 bytes). Fails once the files' contents pass `max_bytes`.
///
/// Why `..` only leads: after a normal component it may climb out of a directory that is
/// itself a link, which a lexical check cannot see. With names never passing through a
/// link, a leading `..` climbs real directories, so counting them is exact.
pub fn sanitize_tar(
    input: impl std::io::Read,
    output: impl std::io::Write,
    max_bytes: u64,
) -> std::io::Result<Dropped> {
    use std::collections::HashMap;
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Component, Path, PathBuf};
    let mut archive = tar::Archive::new(input);
    let mut out = tar::Builder::new(output);
    out.follow_symlinks(false);
    // Keyed by components, so `a/./b`, `a//b` and `a/b/` are one name.
    let mut seen: HashMap<PathBuf, Seen> = HashMap::new();
    let mut dropped = Dropped::default();
    let mut total: u64 = 0;
    // Under the top directory, normal components only, no backslash, no link of the archive
    // among its ancestors.
    let plain = |p: &Path, seen: &HashMap<PathBuf, Seen>| {
        let b = p.as_os_str().as_bytes();
        !b.contains(&b'\\')
            && (b == ARTIFACT_TOP.as_bytes()
                || b.strip_prefix(ARTIFACT_TOP.as_bytes())
                    .is_some_and(|rest| rest.starts_with(b"/")))
            && p.components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
            && !p
                .ancestors()
                .skip(1)
                .any(|a| matches!(seen.get(a), Some(Seen::Symlink)))
    };
    for entry in archive.entries()? {
        let mut e = entry?;
        let path = e.path()?.into_owned();
        let kind = e.header().entry_type();
        let target = e.link_name()?.map(|t| t.into_owned());
        let key = normal(&path);
        let fresh = match seen.get(&key) {
            None => true,
            Some(Seen::Implied) => kind == tar::EntryType::Directory,
            Some(_) => false,
        };
        let as_seen = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                Some(Seen::File)
            }
            tar::EntryType::Directory => Some(Seen::Dir),
            tar::EntryType::Link => target
                .as_deref()
                .filter(|t| plain(t, &seen) && seen.get(&normal(t)) == Some(&Seen::File))
                .map(|_| Seen::HardLink),
            tar::EntryType::Symlink => target
                .as_deref()
                .filter(|t| {
                    !t.as_os_str().as_bytes().contains(&b'\\') && link_stays_inside(&path, t)
                })
                .map(|_| Seen::Symlink),
            _ => None,
        };
        let as_seen = as_seen.filter(|_| fresh && plain(&path, &seen));
        let Some(as_seen) = as_seen else {
            dropped.count += 1;
            if dropped.names.len() < DROPPED_NAMES {
                dropped.names.push(path.to_string_lossy().into_owned());
            }
            continue;
        };
        let mut header = tar::Header::new_gnu();
        header.set_mtime(e.header().mtime().unwrap_or(0));
        header.set_uid(0);
        header.set_gid(0);
        let mode = e.header().mode().unwrap_or(0o644) & 0o777;
        match (as_seen, target) {
            (Seen::File, _) => {
                let size = e.size();
                total = total.saturating_add(size);
                if total > max_bytes {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::FileTooLarge,
                        format!("the archive's files pass {max_bytes} bytes (the box's disk and then some)"),
                    ));
                }
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(mode);
                header.set_size(size);
                out.append_data(
                    &mut header,
                    &path,
                    Exact {
                        inner: &mut e,
                        left: size,
                    },
                )?;
            }
            (Seen::Dir, _) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(mode);
                header.set_size(0);
                out.append_data(&mut header, &path, std::io::empty())?;
            }
            (Seen::HardLink | Seen::Symlink, Some(t)) => {
                header.set_entry_type(if as_seen == Seen::Symlink {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                header.set_mode(0o777);
                header.set_size(0);
                out.append_link(&mut header, &path, &t)?;
            }
            _ => continue,
        }
        for a in key.ancestors().skip(1) {
            if a.as_os_str().is_empty() {
                break;
            }
            seen.entry(a.to_path_buf()).or_insert(Seen::Implied);
        }
        seen.insert(key, as_seen);
    }
    out.into_inner()?;
    Ok(dropped)
}

/// `p` without `.` components (as links are looked up).
fn normal(p: &std::path::Path) -> std::path::PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// Whether the symbolic link at `link` (an archive name) pointing to `target` resolves
/// inside the archive's top directory (the first component of `link`).
fn link_stays_inside(link: &std::path::Path, target: &std::path::Path) -> bool {
    use std::path::Component;
    // Directories between the top directory and the link: how far a target may climb.
    let depth = normal(link).components().count().saturating_sub(2);
    let mut climbs = 0;
    let mut descended = false;
    for c in target.components() {
        match c {
            Component::ParentDir if !descended => climbs += 1,
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return false,
            Component::CurDir => {}
            Component::Normal(_) => descended = true,
        }
    }
    climbs <= depth && !target.as_os_str().is_empty()
}

/// Unpack an archive made by [`capture_paths`] into the box (same paths), decompressing as
/// it is read from `archive`. An error anywhere in `archive` (a digest mismatch comes last)
/// fails the unpack, whatever the box already wrote.
pub async fn unpack(
    backend: &Backend,
    box_id: &str,
    mut archive: impl futures::Stream<Item = Result<Bytes, berth_store::snapshots::SnapshotError>>
        + Unpin,
) -> Result<(), ParkError> {
    use futures::StreamExt;
    let h = backend
        .exec(box_id, tar_spec(&["-C", "/", "-xf", "-"]))
        .await?;
    let (input, mut events) = (h.input, h.events);
    let (zst_tx, zst_rx) = tokio::sync::mpsc::channel::<Bytes>(IN_FLIGHT);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(IN_FLIGHT);
    // Decompress on a blocking thread, feeding the box as it goes.
    let decoder = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut dec = zstd::stream::Decoder::new(ChunkReader {
            rx: zst_rx,
            cur: Bytes::new(),
        })?;
        let mut sink = ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        match std::io::copy(&mut dec, &mut sink).and_then(|_| std::io::Write::flush(&mut sink)) {
            // The exec ended (its status says why) or the archive did.
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            Err(e) => Err(e),
        }
    });
    let read = async move {
        while let Some(chunk) = archive.next().await {
            if zst_tx.send(chunk?).await.is_err() {
                break;
            }
        }
        Ok::<(), ParkError>(())
    };
    let feed = async move {
        while let Some(chunk) = rx.recv().await {
            if input.send(ExecInput::Stdin(chunk)).await.is_err() {
                return;
            }
        }
        let _ = input.send(ExecInput::CloseStdin).await;
    };
    let (read, _, done) = tokio::join!(read, feed, finish(&mut events, None, u64::MAX));
    decoder
        .await
        .map_err(|e| ParkError::Compress(std::io::Error::other(e)))??;
    read?;
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, name: &str, link: Option<&str>, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(size);
        // Raw names: the builder would refuse the hostile ones a box can write.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        h
    }

    /// An archive of `entries` (raw headers; regular files hold "hi"), sanitised without a size
    /// limit: the output and what was dropped.
    fn sanitised(entries: &[(tar::EntryType, &str, Option<&str>)]) -> (Vec<u8>, Dropped) {
        let mut b = tar::Builder::new(Vec::new());
        for (kind, name, link) in entries {
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"hi"
            } else {
                b""
            };
            b.append(&header(*kind, name, *link, data.len() as u64), data)
                .expect("append");
        }
        let input = b.into_inner().expect("tar");
        let mut out = Vec::new();
        let dropped = sanitize_tar(&input[..], &mut out, u64::MAX).expect("sanitise");
        (out, dropped)
    }

    #[test]
    fn sanitising_drops_everything_that_leads_out_of_the_archive() {
        use tar::EntryType::*;
        let entries: &[(tar::EntryType, &str, Option<&str>)] = &[
            (Directory, "workspace/", None),
            (Regular, "workspace/a.txt", None),
            (Symlink, "workspace/ok", Some("a.txt")),
            (Directory, "workspace/d/", None),
            (Symlink, "workspace/d/up", Some("../a.txt")),
            (Symlink, "workspace/x", Some("/etc/passwd")),
            (Symlink, "workspace/y", Some("../../..")),
            (Symlink, "workspace/z", Some("..")),
            (Symlink, "workspace/d/sneak", Some("up/../../..")),
            (Symlink, "workspace/here", Some(".")),
            (Regular, "workspace/here/through", None),
            (Regular, "../evil", None),
            (Regular, "/abs", None),
            (Link, "workspace/hard", Some("workspace/a.txt")),
            (Link, "workspace/hard2", Some("/etc/shadow")),
            (Fifo, "workspace/fifo", None),
        ];
        let (out, dropped) = sanitised(entries);
        let mut kept = Vec::new();
        let mut ar = tar::Archive::new(&out[..]);
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            kept.push(e.path().expect("path").to_string_lossy().into_owned());
        }
        assert_eq!(
            kept,
            [
                "workspace/",
                "workspace/a.txt",
                "workspace/ok",
                "workspace/d/",
                "workspace/d/up",
                "workspace/here",
                "workspace/hard"
            ]
        );
        assert_eq!(dropped.count, 9, "{dropped:?}");
        assert!(dropped.names.contains(&"workspace/x".to_string()));
    }

    /// A PAX record `key=value` with its length prefix (which counts itself).
    fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}").len() + body.len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    /// An entry as read back: name, type, size, contents, link target, mode, owner name.
    #[derive(Debug)]
    struct Read {
        name: String,
        kind: tar::EntryType,
        data: Vec<u8>,
        link: Option<String>,
        mode: u32,
        user: Option<String>,
    }

    /// `out` read back by the `tar` crate, checking that every header's own size field is the
    /// size the entry has (so a reader that ignores PAX records sees the same entries).
    fn read_back(out: &[u8]) -> Vec<Read> {
        use std::io::Read as _;
        let mut ar = tar::Archive::new(out);
        let mut got = Vec::new();
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            assert_eq!(e.header().entry_size().expect("raw size"), e.size());
            assert!(
                e.pax_extensions().expect("pax").is_none(),
                "no PAX records in a sanitised archive"
            );
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("data");
            got.push(Read {
                name: e.path().expect("path").to_string_lossy().into_owned(),
                kind: e.header().entry_type(),
                data,
                link: e
                    .link_name()
                    .expect("link")
                    .map(|l| l.to_string_lossy().into_owned()),
                mode: e.header().mode().expect("mode"),
                user: e.header().username().ok().flatten().map(str::to_owned),
            });
        }
        got
    }

    /// The names a reader that knows only the raw ustar/GNU header fields sees, walking
    /// 512-byte blocks by each header's size field.
    fn raw_names(out: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        let mut at = 0;
        while at + 512 <= out.len() {
            let block = &out[at..at + 512];
            if block.iter().all(|b| *b == 0) {
                break;
            }
            let mut h = tar::Header::new_old();
            h.as_mut_bytes().copy_from_slice(block);
            names.push(String::from_utf8_lossy(&h.path_bytes()).into_owned());
            let size = h.entry_size().expect("raw size");
            at += 512 + (size as usize).div_ceil(512) * 512;
        }
        names
    }

    #[test]
    fn a_pax_size_over_a_zero_raw_size_cannot_inject_an_entry() {
        // The file's data is itself a tar header: a reader trusting the raw size (0) of the
        // box's header would take it for the next entry.
        let mut inner = tar::Header::new_gnu();
        inner.set_entry_type(tar::EntryType::Symlink);
        inner.set_path("workspace/injected").expect("path");
        inner.set_link_name("/etc").expect("link");
        inner.set_size(0);
        inner.set_mode(0o777);
        inner.set_cksum();
        let payload = inner.as_bytes().to_vec();
        let mut b = tar::Builder::new(Vec::new());
        let dir = header(tar::EntryType::Directory, "workspace/", None, 0);
        b.append(&dir, &[][..]).expect("dir");
        let pax = pax_record("size", &payload.len().to_string());
        let ph = header(tar::EntryType::XHeader, "PaxHeader", None, pax.len() as u64);
        b.append(&ph, &pax[..]).expect("pax");
        let file = header(tar::EntryType::Regular, "workspace/f", None, 0);
        b.append(&file, &payload[..]).expect("file");
        let input = b.into_inner().expect("tar");
        // The hostile input does what it says: a raw reader sees the injected entry.
        assert!(raw_names(&input).contains(&"workspace/injected".to_string()));

        let mut out = Vec::new();
        sanitize_tar(&input[..], &mut out, u64::MAX).expect("sanitise");
        let got = read_back(&out);
        let names: Vec<_> = got.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["workspace/", "workspace/f"]);
        assert_eq!(
            got[1].data, payload,
            "the file keeps its PAX-sized contents"
        );
        assert_eq!(raw_names(&out), ["workspace/", "workspace/f"]);
    }

    #[test]
    fn names_outside_workspace_backslashes_and_redeclarations_are_dropped() {
        use tar::EntryType::*;
        let entries: &[(tar::EntryType, &str, Option<&str>)] = &[
            (Directory, "workspace/", None),
            (Directory, "workspace/d/", None),
            (Regular, "workspace/d/f", None),
            (Regular, "etc/passwd", None),
            (Regular, "workspacex/a", None),
            (Regular, "./workspace/a", None),
            (Regular, "home/agent/.bashrc", None),
            (Regular, "workspace/..\\..\\evil", None),
            (Symlink, "workspace/bs", Some("..\\..\\etc")),
            // A symbolic link over a directory already written: what is under it would then
            // land wherever the link points.
            (Symlink, "workspace/d", Some(".")),
            (Symlink, "workspace/d/", Some(".")),
            // A directory only implied by a deeper name counts too.
            (Regular, "workspace/q/f", None),
            (Symlink, "workspace/q", Some(".")),
            // Any name twice.
            (Regular, "workspace/d/f", None),
            (Directory, "workspace/d", None),
            // A directory declared after a deeper name implied it is fine.
            (Directory, "workspace/q/", None),
            (Regular, "workspace", None),
        ];
        let (out, dropped) = sanitised(entries);
        let names: Vec<_> = read_back(&out).into_iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            [
                "workspace/",
                "workspace/d/",
                "workspace/d/f",
                "workspace/q/f",
                "workspace/q/"
            ]
        );
        assert_eq!(dropped.count, 12, "{dropped:?}");
    }

    #[test]
    fn hard_links_must_point_at_a_regular_file_already_written() {
        use tar::EntryType::*;
        let entries: &[(tar::EntryType, &str, Option<&str>)] = &[
            (Directory, "workspace/", None),
            (Link, "workspace/early", Some("workspace/later")),
            (Regular, "workspace/later", None),
            (Link, "workspace/ok", Some("workspace/later")),
            (Link, "workspace/to-dir", Some("workspace")),
            (Symlink, "workspace/sl", Some("later")),
            (Link, "workspace/to-symlink", Some("workspace/sl")),
            (Link, "workspace/to-hardlink", Some("workspace/ok")),
            (Link, "workspace/outside", Some("home/agent/.bashrc")),
        ];
        let (out, dropped) = sanitised(entries);
        let got = read_back(&out);
        let names: Vec<_> = got.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "workspace/",
                "workspace/later",
                "workspace/ok",
                "workspace/sl"
            ]
        );
        assert_eq!(got[2].kind, tar::EntryType::Link);
        assert_eq!(got[2].link.as_deref(), Some("workspace/later"));
        assert_eq!(dropped.count, 5, "{dropped:?}");
    }

    #[test]
    fn headers_are_made_fresh_special_bits_stripped_long_names_kept() {
        let long = format!("workspace/{}", "n".repeat(150));
        let mut b = tar::Builder::new(Vec::new());
        b.append(
            &header(tar::EntryType::Directory, "workspace/", None, 0),
            &[][..],
        )
        .expect("dir");
        let mut h = header(tar::EntryType::Regular, "workspace/suid", None, 2);
        h.set_mode(0o7755);
        h.set_username("root").expect("uname");
        h.set_uid(0);
        h.set_cksum();
        b.append(&h, &b"hi"[..]).expect("suid");
        // A long name as a PAX `path` record, the way GNU tar's posix format writes it.
        let pax = pax_record("path", &long);
        let ph = header(tar::EntryType::XHeader, "PaxHeader", None, pax.len() as u64);
        b.append(&ph, &pax[..]).expect("pax");
        b.append(
            &header(tar::EntryType::Regular, "workspace/short", None, 3),
            &b"abc"[..],
        )
        .expect("long");
        let input = b.into_inner().expect("tar");
        let mut out = Vec::new();
        sanitize_tar(&input[..], &mut out, u64::MAX).expect("sanitise");
        let got = read_back(&out);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[1].name, "workspace/suid");
        assert_eq!(got[1].mode, 0o755);
        assert_eq!(got[1].user.as_deref().unwrap_or(""), "");
        assert_eq!(got[2].name, long);
        assert_eq!(got[2].data, b"abc");
    }

    #[test]
    fn contents_past_the_limit_fail_the_archive() {
        let mut b = tar::Builder::new(Vec::new());
        for name in ["workspace/a", "workspace/b"] {
            b.append(
                &header(tar::EntryType::Regular, name, None, 600),
                &[7u8; 600][..],
            )
            .expect("append");
        }
        let input = b.into_inner().expect("tar");
        assert!(sanitize_tar(&input[..], Vec::new(), 1200).is_ok());
        assert!(sanitize_tar(&input[..], Vec::new(), 1199).is_err());
    }
}
