//! A client's operations inside a running box — exec, files, ports, stats — as engine methods.
//! Each resolves its [`Route`](super::route::Route) (tenant check, restore of a parked box,
//! activity) and then speaks to the backend; the API edge only translates HTTP.

use super::boxes::InUse;
use super::error::EngineError;
use super::route::Use;
use super::Engine;
use berth_api::{BoxStats, DirEntry, DirListing, ExecRequest, ExecResponse};
use berth_sandbox::files::{FileWriter, Reading};
use berth_sandbox::{ExecHandle, ExecSpec, PortStream, Sandbox, SandboxError};
use std::sync::Arc;
use std::time::Duration;

/// Longest exec the collected (REST) call waits for.
pub const MAX_EXEC_TIMEOUT_S: u64 = 3600;

/// A file or a directory opened for reading.
pub enum FileRead {
    /// A file: its size at open, and its bytes in chunks (never whole in memory). The stream is
    /// cut at `size`; a file that shrinks meanwhile ends it with an error.
    File {
        size: u64,
        chunks: futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
    },
    Dir(DirListing),
}

/// A file being written into a box: pieces in order, then [`BoxFile::commit`] makes it appear
/// whole (dropped uncommitted, nothing appears).
pub struct BoxFile {
    writer: FileWriter,
    /// The box is busy until the file is committed or dropped.
    _in_use: Option<InUse>,
}

impl BoxFile {
    pub async fn write(&mut self, data: bytes::Bytes) -> Result<(), EngineError> {
        Ok(self.writer.write(data).await?)
    }

    pub async fn commit(self) -> Result<(), EngineError> {
        Ok(self.writer.commit().await?)
    }
}

/// A program that could not start is the client's request, named by its program.
fn exec_error(program: &str) -> impl Fn(SandboxError) -> EngineError + '_ {
    move |e| match e {
        SandboxError::Start(m) => EngineError::Invalid(super::start_failure(program, &m)),
        other => other.into(),
    }
}

impl Engine {
    /// Run a command in the box and wait for it, its output collected up to the server's
    /// `max_exec_output` per stream.
    pub async fn exec(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        req: ExecRequest,
    ) -> Result<ExecResponse, EngineError> {
        if req.argv.is_empty() {
            return Err(EngineError::Invalid("argv must not be empty".into()));
        }
        let timeout = req.timeout_s.unwrap_or(300);
        if timeout == 0 || timeout > MAX_EXEC_TIMEOUT_S {
            return Err(EngineError::Invalid(format!(
                "timeout_s must be between 1 and {MAX_EXEC_TIMEOUT_S}"
            )));
        }
        let program = req.argv[0].clone();
        let mut env: Vec<(String, String)> = req.env.into_iter().collect();
        // Revoked when the exec is over, whichever way it ends.
        let _model = if req.model {
            let token = ModelToken::register(self, tenant, id);
            env.retain(|(k, _)| k != "ANTHROPIC_BASE_URL" && k != "ANTHROPIC_API_KEY");
            env.push((
                "ANTHROPIC_BASE_URL".into(),
                format!("http://127.0.0.1:{}", super::GATEWAY_PORT),
            ));
            env.push(("ANTHROPIC_API_KEY".into(), token.token.clone()));
            Some(token)
        } else {
            None
        };
        let spec = ExecSpec {
            argv: req.argv,
            cwd: req.cwd,
            env,
            timeout: Some(Duration::from_secs(timeout)),
            ..Default::default()
        };
        let (handle, _in_use) = self.exec_stream(tenant, id, spec).await?;
        let out = handle
            .collect(
                req.stdin.map(String::into_bytes),
                self.config.max_exec_output,
            )
            .await
            .map_err(exec_error(&program))?;
        Ok(ExecResponse {
            exit_code: out.exit.code,
            signal: out.exit.signal,
            timed_out: out.exit.timed_out,
            oom_killed: out.exit.oom_killed,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            truncated: out.truncated,
        })
    }

    /// Start a command in the box and hand back its streams: stdin pieces, EOF and signals go
    /// in through `input` as the caller has them, output and the exit come out of `events`.
    /// The box is busy (not idle) while the caller keeps the `InUse`.
    pub async fn exec_stream(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        spec: ExecSpec,
    ) -> Result<(ExecHandle, Option<InUse>), EngineError> {
        let program = spec.argv.first().cloned().unwrap_or_default();
        let r = self.route(tenant, id, Use::Serve).await?;
        let handle = r
            .backend
            .exec(r.box_id(), spec)
            .await
            .map_err(exec_error(&program))?;
        Ok((handle, r.in_use))
    }

    /// CPU, memory, pids and disk of a running box (does not restore a parked one, nor count as
    /// activity).
    pub async fn box_stats(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
    ) -> Result<BoxStats, EngineError> {
        let r = self.route(tenant, id, Use::Observe).await?;
        let s = r.backend.stats(r.box_id()).await?;
        Ok(BoxStats {
            cpu_usage_ns: s.cpu_usage_ns,
            memory_bytes: s.memory_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            pids: s.pids,
            pids_limit: s.pids_limit,
            disk_used_bytes: s.disk_used_bytes,
            disk_limit_bytes: s.disk_limit_bytes,
            oom_kills: s.oom_kills,
        })
    }

    /// Open `path` (relative to `/workspace`; "" is the workspace) for reading.
    pub async fn open_file(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        path: &str,
    ) -> Result<FileRead, EngineError> {
        use futures::StreamExt;
        let r = self.route(tenant, id, Use::Serve).await?;
        match r.backend.files(r.box_id())?.open_read(path).await? {
            Reading::File(reader) => {
                let size = reader.size();
                // The box stays busy until the stream is done with (read to its end or dropped).
                let in_use = r.in_use;
                // The declared length is the size at open: a file the box grows meanwhile is
                // cut there, one it shrinks ends the stream early (the client sees it short).
                let chunks =
                    futures::stream::try_unfold((reader, 0u64), move |(mut r, sent)| async move {
                        if sent >= size {
                            return Ok(None);
                        }
                        match r.next_chunk().await {
                            Ok(Some(mut c)) => {
                                c.truncate(c.len().min((size - sent) as usize));
                                let sent = sent + c.len() as u64;
                                Ok(Some((c, (r, sent))))
                            }
                            Ok(None) => {
                                Err(std::io::Error::other("the file shrank while being read"))
                            }
                            Err(e) => Err(std::io::Error::other(e.to_string())),
                        }
                    });
                Ok(FileRead::File {
                    size,
                    chunks: chunks
                        .map(move |c| {
                            let _held = &in_use;
                            c
                        })
                        .boxed(),
                })
            }
            Reading::Dir(listing) => Ok(FileRead::Dir(DirListing {
                path: path.to_string(),
                truncated: listing.truncated,
                entries: listing
                    .entries
                    .into_iter()
                    .map(|e| DirEntry {
                        name: e.name,
                        kind: e.kind,
                        size: e.size,
                        mode: e.mode,
                        modified: e.modified,
                    })
                    .collect(),
            })),
        }
    }

    /// Start writing the file `path` (parents are created) with permission bits `mode`.
    pub async fn create_file(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        path: &str,
        mode: u32,
    ) -> Result<BoxFile, EngineError> {
        let r = self.route(tenant, id, Use::Serve).await?;
        Ok(BoxFile {
            writer: r.backend.files(r.box_id())?.create(path, mode).await?,
            _in_use: r.in_use,
        })
    }

    /// Delete a file or (recursively) a directory.
    pub async fn delete_file(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        path: &str,
    ) -> Result<(), EngineError> {
        let r = self.route(tenant, id, Use::Serve).await?;
        Ok(r.backend.delete_file(r.box_id(), path).await?)
    }

    /// A connection to `127.0.0.1:port` inside the box. A refused or reset connection is the
    /// box's port, not the server: unreachable.
    pub async fn connect_port(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        port: u16,
    ) -> Result<PortStream, EngineError> {
        if port == 0 {
            return Err(EngineError::Invalid("port must be 1-65535".into()));
        }
        let r = self.route(tenant, id, Use::Serve).await?;
        let stream = r
            .backend
            .connect(r.box_id(), port)
            .await
            .map_err(|e| match e {
                SandboxError::Io(io) => EngineError::Unreachable(format!("port {port}: {io}")),
                other => other.into(),
            })?;
        Ok(Box::new(HeldPort {
            stream,
            _in_use: r.in_use,
        }))
    }
}

/// A connection into a box that holds the box busy while it is open (a dev server's page or
/// WebSocket in use is not idleness).
struct HeldPort {
    stream: PortStream,
    _in_use: Option<InUse>,
}

impl tokio::io::AsyncRead for HeldPort {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for HeldPort {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Largest piece a file write takes at once (callers buffer up to it).
pub const FILE_CHUNK: usize = berth_sandbox::files::CHUNK;

/// An exec's own gateway token (`ExecRequest::model`), registered for the exec's life and
/// revoked when dropped.
struct ModelToken {
    gateway: Arc<berth_gateway::Gateway>,
    token: String,
}

impl ModelToken {
    fn register(engine: &Engine, tenant: &str, box_id: &str) -> ModelToken {
        let token = berth_gateway::new_token();
        engine.gateway.register(
            &token,
            berth_gateway::TokenOwner {
                session_id: crate::auth::new_id("exec"),
                box_id: box_id.to_string(),
                tenant: tenant.to_string(),
            },
            berth_gateway::SessionLimits {
                budget_usd: None,
                requests_per_minute: engine.config.session_rpm,
            },
            0.0,
        );
        ModelToken {
            gateway: engine.gateway.clone(),
            token,
        }
    }
}

impl Drop for ModelToken {
    fn drop(&mut self) {
        self.gateway.revoke(&self.token);
    }
}
