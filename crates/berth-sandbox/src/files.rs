//! Streaming file access to a box's workspace for the API, with a bound on what one box can
//! hold of the host's blocking threads.
//!
//! Contract: every blocking step (open, one chunk read or write, commit) runs on tokio's
//! blocking pool holding one of the box's [`FILE_OPS_PER_BOX`] permits; the permit goes with
//! the step, so a step the kernel never finishes keeps only its own box's slot, and the
//! caller is answered after [`FILE_OP_DEADLINE`] either way ([`FsError::Busy`]). Nothing is
//! held between steps: a slow client costs a buffer, not a thread. Paths resolve beneath the
//! workspace exactly as in [`crate::fsops`].

use crate::fsops::{self, FsError, Listing, Opened};
use crate::{Result, SandboxError};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Blocking file steps of one box that may run at once.
pub const FILE_OPS_PER_BOX: usize = 4;
/// How long a file step may take (waiting for a permit included) before the caller is told.
pub const FILE_OP_DEADLINE: Duration = Duration::from_secs(20);
/// Bytes read per step of a streamed read.
pub const CHUNK: usize = 128 * 1024;

/// A box's file gate: one per box, shared by all its file operations.
pub type Gate = Arc<Semaphore>;

pub fn new_gate() -> Gate {
    Arc::new(Semaphore::new(FILE_OPS_PER_BOX))
}

/// Where a running box's workspace is on the host, and who owns what the API writes there.
#[derive(Clone)]
pub struct FilesRoot {
    pub root: PathBuf,
    pub owner: Option<u32>,
    pub gate: Gate,
}

/// Run `f` on the blocking pool under `gate`, within [`FILE_OP_DEADLINE`].
pub async fn step<T: Send + 'static>(
    gate: &Gate,
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T> {
    step_within(gate, FILE_OP_DEADLINE, f).await
}

async fn step_within<T: Send + 'static>(
    gate: &Gate,
    within: Duration,
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + within;
    let permit = tokio::time::timeout_at(deadline, gate.clone().acquire_owned())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())?;
    let task = tokio::task::spawn_blocking(move || {
        let r = f();
        drop(permit);
        r
    });
    match tokio::time::timeout_at(deadline, task).await {
        Ok(joined) => Ok(joined.map_err(crate::blocking_err)??),
        Err(_) => Err(busy()),
    }
}

fn busy() -> SandboxError {
    SandboxError::Fs(FsError::Busy(format!(
        "the box's file operations did not finish within {}s",
        FILE_OP_DEADLINE.as_secs()
    )))
}

pub enum Reading {
    File(FileReader),
    Dir(Listing),
}

/// A regular file of the workspace, read in chunks.
pub struct FileReader {
    file: Option<std::fs::File>,
    size: u64,
    gate: Gate,
}

impl FileReader {
    /// The file's size when it was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>> {
        let Some(mut file) = self.file.take() else {
            return Ok(None);
        };
        let (file, chunk) = step(&self.gate, move || {
            let mut buf = vec![0u8; CHUNK];
            let n = file.read(&mut buf)?;
            buf.truncate(n);
            Ok((file, buf))
        })
        .await?;
        if chunk.is_empty() {
            return Ok(None);
        }
        self.file = Some(file);
        Ok(Some(chunk.into()))
    }
}

/// A file being written in chunks; see [`fsops::Writer`].
pub struct FileWriter {
    w: Option<fsops::Writer>,
    gate: Gate,
}

impl FileWriter {
    pub async fn write(&mut self, data: bytes::Bytes) -> Result<()> {
        let mut w = self
            .w
            .take()
            .ok_or_else(|| SandboxError::Fs(FsError::Invalid("write after an error".into())))?;
        let w = step(&self.gate, move || {
            w.write_chunk(&data)?;
            Ok(w)
        })
        .await?;
        self.w = Some(w);
        Ok(())
    }

    pub async fn commit(mut self) -> Result<()> {
        let w = self
            .w
            .take()
            .ok_or_else(|| SandboxError::Fs(FsError::Invalid("write after an error".into())))?;
        step(&self.gate, move || w.commit()).await
    }
}

impl FilesRoot {
    /// Open `path` for a streamed read (a file) or list it (a directory).
    pub async fn open_read(&self, path: &str) -> Result<Reading> {
        let (root, path) = (self.root.clone(), path.to_string());
        Ok(
            match step(&self.gate, move || fsops::open_read(&root, &path)).await? {
                Opened::Dir(l) => Reading::Dir(l),
                Opened::File { file, size } => Reading::File(FileReader {
                    file: Some(file),
                    size,
                    gate: self.gate.clone(),
                }),
            },
        )
    }

    /// Start writing `path` (in place once committed).
    pub async fn create(&self, path: &str, mode: u32) -> Result<FileWriter> {
        let (root, path, owner) = (self.root.clone(), path.to_string(), self.owner);
        let w = step(&self.gate, move || {
            fsops::Writer::create(&root, &path, mode, owner)
        })
        .await?;
        Ok(FileWriter {
            w: Some(w),
            gate: self.gate.clone(),
        })
    }

    pub async fn read_whole(&self, path: &str) -> Result<crate::FileContent> {
        let (root, path) = (self.root.clone(), path.to_string());
        step(&self.gate, move || fsops::read(&root, &path)).await
    }

    pub async fn write_whole(&self, path: &str, data: Vec<u8>, mode: u32) -> Result<()> {
        let (root, path, owner) = (self.root.clone(), path.to_string(), self.owner);
        step(&self.gate, move || {
            fsops::write(&root, &path, &data, mode, owner)
        })
        .await
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        let (root, path) = (self.root.clone(), path.to_string());
        step(&self.gate, move || fsops::delete(&root, &path)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps that never finish hold their own box's permits only: that box's next step is
    /// answered `Busy` at the deadline, another box's runs at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stuck_steps_hold_only_their_own_box() {
        let (stuck, other) = (new_gate(), new_gate());
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let hold = Arc::new(std::sync::Mutex::new(hold));
        let within = Duration::from_millis(300);
        let mut waiting = Vec::new();
        for _ in 0..FILE_OPS_PER_BOX {
            let (gate, hold) = (stuck.clone(), hold.clone());
            waiting.push(tokio::spawn(async move {
                step_within(&gate, within, move || {
                    let _ = hold.lock().map(|h| h.recv());
                    Ok(())
                })
                .await
            }));
        }
        for w in waiting {
            let r = w.await.expect("join");
            assert!(
                matches!(r, Err(SandboxError::Fs(FsError::Busy(_)))),
                "{r:?}"
            );
        }
        // All four permits are still held by the stuck steps.
        let t = tokio::time::Instant::now();
        let r = step_within(&stuck, within, || Ok(())).await;
        assert!(
            matches!(r, Err(SandboxError::Fs(FsError::Busy(_)))),
            "{r:?}"
        );
        assert!(t.elapsed() >= within);
        let t = tokio::time::Instant::now();
        step_within(&other, within, || Ok(()))
            .await
            .expect("another box's step");
        assert!(t.elapsed() < within);
        // Once the stuck steps end, their box's permits come back.
        for _ in 0..FILE_OPS_PER_BOX {
            release.send(()).expect("release");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stuck.available_permits() < FILE_OPS_PER_BOX {
            assert!(
                tokio::time::Instant::now() < deadline,
                "permits not returned"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        step_within(&stuck, within, || Ok(()))
            .await
            .expect("after release");
    }
}
