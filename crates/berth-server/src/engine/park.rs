//! Park and restore for hybrid boxes: the box's state as one archive.
//!
//! The archive is `tar` of `/workspace` and `/home/agent` (each session's `CLAUDE_CONFIG_DIR`
//! is under it), made and unpacked by `tar` *inside* the box as the agent's uid: the host never
//! walks a tree the box controls, so no symlink the agent planted can point the host anywhere,
//! and the same code serves every backend. The host compresses the stream (zstd, level 1, on a
//! blocking thread while the box writes) and stores it through `SnapshotStore`.

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
}

fn tar_spec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        cwd: Some("/".into()),
        timeout: Some(TAR_TIMEOUT),
        ..Default::default()
    }
}

/// Wait for the exec's end, keeping stderr's tail for the error; `on_stdout` takes the output.
async fn finish(
    events: &mut tokio::sync::mpsc::Receiver<ExecEvent>,
    mut on_stdout: impl FnMut(Bytes) -> Result<(), ParkError>,
) -> Result<(), ParkError> {
    let mut stderr = Vec::new();
    while let Some(ev) = events.recv().await {
        match ev {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(b) => on_stdout(b)?,
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

/// An archive of `paths` (relative to the box's root), compressed.
pub async fn capture_paths(
    backend: &Backend,
    box_id: &str,
    paths: &[&str],
) -> Result<Bytes, ParkError> {
    let mut argv = vec!["tar", "-C", "/", "--numeric-owner", "-cf", "-"];
    argv.extend(paths);
    let mut h = backend.exec(box_id, tar_spec(&argv)).await?;
    drop(h.input);
    // Compress on a blocking thread as the chunks arrive.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(64);
    let encoder = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        use std::io::Write;
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1)?;
        for chunk in rx {
            enc.write_all(&chunk)?;
        }
        enc.finish()
    });
    let streamed = finish(&mut h.events, |b| {
        tx.send(b)
            .map_err(|_| ParkError::Compress(std::io::Error::other("compressor stopped")))
    })
    .await;
    drop(tx);
    let compressed = encoder
        .await
        .map_err(|e| ParkError::Compress(std::io::Error::other(e)))??;
    streamed?;
    Ok(Bytes::from(compressed))
}

/// Unpack an archive made by [`capture`] into the box (same paths).
pub async fn unpack(backend: &Backend, box_id: &str, archive: Bytes) -> Result<(), ParkError> {
    let h = backend
        .exec(box_id, tar_spec(&["tar", "-C", "/", "-xf", "-"]))
        .await?;
    let (input, mut events) = (h.input, h.events);
    // Decompress on a blocking thread, feeding the box as it goes.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let decoder = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Read;
        let mut dec = zstd::stream::Decoder::new(&archive[..])?;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                let n = dec.read(&mut buf[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                return Ok(());
            }
            buf.truncate(filled);
            if tx.blocking_send(Bytes::from(buf)).is_err() {
                return Ok(()); // the exec ended; its status says why
            }
        }
    });
    let feed = async move {
        while let Some(chunk) = rx.recv().await {
            if input.send(ExecInput::Stdin(chunk)).await.is_err() {
                return;
            }
        }
        let _ = input.send(ExecInput::CloseStdin).await;
    };
    let (_, done) = tokio::join!(feed, finish(&mut events, |_| Ok(())));
    decoder
        .await
        .map_err(|e| ParkError::Compress(std::io::Error::other(e)))??;
    done
}
