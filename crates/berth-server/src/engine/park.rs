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

fn tar_spec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        cwd: Some("/".into()),
        timeout: Some(TAR_TIMEOUT),
        ..Default::default()
    }
}

/// Wait for the exec's end, keeping stderr's tail for the error; stdout goes to `stdout`
/// (waiting while it is full, so a fast box is held back rather than buffered).
async fn finish(
    events: &mut tokio::sync::mpsc::Receiver<ExecEvent>,
    stdout: Option<tokio::sync::mpsc::Sender<Bytes>>,
) -> Result<(), ParkError> {
    let mut stderr = Vec::new();
    while let Some(ev) = events.recv().await {
        match ev {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(b) => {
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

/// Chunks in flight between the box, the (de)compressor and the store, per channel.
const IN_FLIGHT: usize = 8;

/// An archive of `paths` (relative to the box's root), compressed (and for a client,
/// sanitised) as the box writes it, into `out`: the server holds a few chunks, never the
/// archive. The caller finishes (or aborts) `out`.
pub async fn capture_paths(
    backend: &Backend,
    box_id: &str,
    paths: &[&str],
    audience: Audience,
    out: &mut berth_store::snapshots::SnapshotWriter,
) -> Result<Dropped, ParkError> {
    let mut argv = vec!["tar", "-C", "/", "--numeric-owner", "-cf", "-"];
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
                let d = sanitize_tar(&mut reader, &mut enc)?;
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
    let (streamed, stored) = tokio::join!(finish(&mut h.events, Some(raw_tx)), store);
    let dropped = encoder
        .await
        .map_err(|e| ParkError::Compress(std::io::Error::other(e)))?;
    stored?;
    streamed?;
    Ok(dropped?)
}

/// Copy a tar stream the box wrote, leaving out every entry that could reach outside the
/// archive's top directory when a client unpacks it: names that are absolute, hold `..`, or
/// pass through a symbolic link of the archive; symbolic links whose target is absolute or
/// climbs above the top directory (`..` only as leading components, no deeper than the link
/// sits); hard links to such names; and devices and FIFOs. Kept entries keep their metadata.
///
/// Why `..` only leads: after a normal component it may climb out of a directory that is
/// itself a link, which a lexical check cannot see. With names never passing through a
/// link, a leading `..` climbs real directories, so counting them is exact.
pub fn sanitize_tar(
    input: impl std::io::Read,
    output: impl std::io::Write,
) -> std::io::Result<Dropped> {
    use std::path::{Component, Path, PathBuf};
    let mut archive = tar::Archive::new(input);
    let mut out = tar::Builder::new(output);
    out.follow_symlinks(false);
    let mut links: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut dropped = Dropped::default();
    // A name made of normal components only, none of whose ancestors is a link in the archive.
    let plain = |p: &Path, links: &std::collections::HashSet<PathBuf>| {
        p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
            && p.components().next().is_some()
            && !p.ancestors().skip(1).any(|a| links.contains(a))
    };
    for entry in archive.entries()? {
        let mut e = entry?;
        let path = e.path()?.into_owned();
        let kind = e.header().entry_type();
        let target = e.link_name()?.map(|t| t.into_owned());
        let keep = plain(&path, &links)
            && match kind {
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::Directory => true,
                tar::EntryType::Link => target.as_deref().is_some_and(|t| plain(t, &links)),
                tar::EntryType::Symlink => target
                    .as_deref()
                    .is_some_and(|t| link_stays_inside(&path, t)),
                _ => false,
            };
        if !keep {
            dropped.count += 1;
            if dropped.names.len() < DROPPED_NAMES {
                dropped.names.push(path.to_string_lossy().into_owned());
            }
            continue;
        }
        let mut header = e.header().clone();
        match (kind, target) {
            (tar::EntryType::Symlink | tar::EntryType::Link, Some(t)) => {
                if kind == tar::EntryType::Symlink {
                    links.insert(normal(&path));
                }
                out.append_link(&mut header, &path, &t)?;
            }
            _ => out.append_data(&mut header, &path, &mut e)?,
        }
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
        .exec(box_id, tar_spec(&["tar", "-C", "/", "-xf", "-"]))
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
    let (read, _, done) = tokio::join!(read, feed, finish(&mut events, None));
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

    #[test]
    fn sanitising_drops_everything_that_leads_out_of_the_archive() {
        use tar::EntryType::*;
        let mut b = tar::Builder::new(Vec::new());
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
        for (kind, name, link) in entries {
            let data: &[u8] = if *kind == Regular { b"hi" } else { b"" };
            let h = header(*kind, name, *link, data.len() as u64);
            b.append(&h, data).expect("append");
        }
        let input = b.into_inner().expect("tar");
        let mut out = Vec::new();
        let dropped = sanitize_tar(&input[..], &mut out).expect("sanitise");
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
}
