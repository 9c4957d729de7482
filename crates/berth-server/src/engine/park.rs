//! Park and restore for hybrid boxes: the box's state as one archive.
//!
//! The archive is `tar` of `/workspace` and `/home/agent` (each session's `CLAUDE_CONFIG_DIR`
//! is under it), made and unpacked by `tar` *inside* the box as the agent's uid: the host never
//! walks a tree the box controls, so no symlink the agent planted can point the host anywhere,
//! and the same code serves every backend. The host compresses the stream (zstd, level 1, on a
//! blocking thread while the box writes) and streams it into `SnapshotStore`: the server holds a
//! few chunks of an archive, never the archive (restores stream the same way back).

pub use super::tar_sanitize::{sanitize_tar, Dropped};
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

/// Whether the archive is for the box itself (a park snapshot, unpacked in the box again, so
/// its links are the box's own business) or leaves the box (a workspace artifact a client
/// unpacks on its own machine: see [`sanitize_tar`], in `tar_sanitize`).
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
