//! Sandbox backends for berth.
//!
//! A *box* is an isolated place where agent processes run: its own process tree, file tree,
//! network (loopback only) and resource limits. The [`Sandbox`] trait is the contract every
//! backend implements (native today; gVisor, Docker, Kubernetes and microVMs later) and the
//! conformance tests in `tests/` are written against it. [`Backend`] is the closed set of
//! backends the server can hold, dispatched by `match` rather than trait objects.
//!
//! # Contract
//!
//! - **Identity**: the caller chooses box ids (`[A-Za-z0-9_-]{1,64}`); a backend refuses an id it
//!   already holds.
//! - **Ordering**: operations on one box may run concurrently; the server serialises lifecycle
//!   changes (create, destroy) through the box's owner task, so a backend need not.
//! - **Exec streams**: events for one exec arrive in order: `Started`, output chunks (per stream
//!   in the order written), then exactly one terminal `Exit` or `Failed`. Dropping the
//!   handle's event receiver ends the exec (its process group is killed: no orphaned work);
//!   dropping only the input sender leaves it running. A process never outlives its box.
//! - **Files**: paths are relative to the box's workspace; anything that resolves outside it,
//!   lexically or through symlinks planted by the box, is refused with [`FsError::Outside`];
//!   a FIFO, socket or device node is refused with [`FsError::Invalid`] without being opened
//!   for reading or replaced. No file operation waits on the box: see [`files`].
//! - **Destroy** is idempotent and leaves no process, mount, cgroup, loop device or file behind.
//! - **Death**: [`Sandbox::exit_watch`] reports, once, why a box stopped on its own (or that it
//!   was destroyed).
//! - **Cancellation**: dropping a future of this trait mid-way may leave a half-created box,
//!   which a later `destroy` of the same id removes.

pub mod conformance;
pub mod docker;
#[cfg(feature = "fake")]
pub mod fake;
pub mod files;
pub mod fsops;
pub mod identity;
pub mod native;
pub mod uids;

pub use fsops::{DirEntry, FileContent, FsError, Listing};

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("box {0} not found")]
    NotFound(String),
    #[error("box {0} already exists")]
    Exists(String),
    #[error("invalid box spec: {0}")]
    InvalidSpec(String),
    #[error("box is not running: {0}")]
    NotRunning(String),
    #[error("not supported by this backend: {0}")]
    Unsupported(String),
    #[error("box failed to start: {0}")]
    Start(String),
    #[error("{0}")]
    Unreachable(String),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("sandbox I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub cpus: f64,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub pids: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpus: 1.0,
            memory_mib: 1024,
            disk_mib: 5120,
            pids: 512,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(SandboxError::InvalidSpec(m.into()));
        if !(self.cpus.is_finite() && self.cpus >= 0.01 && self.cpus <= 1024.0) {
            return bad("cpus must be between 0.01 and 1024");
        }
        if !(16..=1024 * 1024).contains(&self.memory_mib) {
            return bad("memory_mib must be between 16 and 1048576");
        }
        if !(16..=16 * 1024 * 1024).contains(&self.disk_mib) {
            return bad("disk_mib must be between 16 and 16777216");
        }
        if !(8..=1_000_000).contains(&self.pids) {
            return bad("pids must be between 8 and 1000000");
        }
        Ok(())
    }
}

/// What the box's root file system is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Image {
    /// The host's `/usr`, `/bin`, `/lib*`, `/etc` (secrets masked), read-only.
    Host,
    /// An unpacked root file system (e.g. an OCI image's layers), read-only.
    Rootfs(PathBuf),
    /// An OCI image reference the backend's engine resolves (Docker, gVisor).
    Oci(String),
}

/// A loopback TCP port inside the box spliced to a Unix socket the host placed in the box's
/// run directory (mounted at `/run/berth`): the gateway seam. Each connection begins with the
/// port, two bytes big-endian, so that several bridges may share one socket
/// ([`native::bridge::preface`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bridge {
    pub port: u16,
    pub socket: String,
}

#[derive(Debug, Clone)]
pub struct BoxConfig {
    pub id: String,
    pub image: Image,
    pub limits: Limits,
    /// Environment every process in the box starts with (exec env overrides it).
    pub env: Vec<(String, String)>,
    pub bridges: Vec<Bridge>,
}

#[derive(Debug, Clone)]
pub struct BoxInfo {
    pub id: String,
    /// Host PID of the box's init process, where the backend has one.
    pub pid: Option<i32>,
    /// Host directory whose Unix sockets the box can reach at `/run/berth`.
    pub run_dir: PathBuf,
}

/// Default uid of agent processes inside a box.
pub const AGENT_UID: u32 = 1000;

#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    /// Working directory inside the box (default `/workspace`).
    pub cwd: Option<String>,
    pub env: Vec<(String, String)>,
    /// uid inside the box (default [`AGENT_UID`]); 0 is refused.
    pub uid: Option<u32>,
    /// Paths the process may write beneath (default: workspace, home, /tmp, /dev/shm).
    pub writable: Option<Vec<String>>,
    pub timeout: Option<Duration>,
    /// Run on a pseudo-terminal of this size allocated inside the box (an interactive shell)
    /// instead of pipes: output arrives as `Stdout` only, and `ExecInput::Resize` resizes it.
    pub tty: Option<TtySize>,
    /// Raise the box's CPU weight while this process starts (an agent's CLI: a burst of work
    /// before its first output), where the backend can; see [`StartBoost`].
    pub start_boost: Option<StartBoost>,
}

/// A temporary raise of a box's CPU weight for an agent's start-up: from the exec until the
/// process's first output (not stderr) or `max`, whichever comes first. Each box has a budget
/// of boost time that refills slowly, so a box cannot keep itself boosted by restarting its
/// agent. The native backend applies it (`native::boost`); others ignore it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StartBoost {
    /// The box's CPU weight while boosted, in cgroup v1 `cpu.shares` (a box has 1024).
    pub shares: u64,
    /// The longest one boost lasts.
    pub max: Duration,
    /// Boost time a box may spend in a row; a start finds the boost refused once it is spent.
    pub budget: Duration,
    /// Budget regained per second of wall time (0.25: a quarter of the time, in the long run).
    pub refill: f64,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub oom_killed: bool,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

#[derive(Debug)]
pub enum ExecEvent {
    Started {
        pid: i32,
    },
    Stdout(bytes::Bytes),
    Stderr(bytes::Bytes),
    Exit(ExitStatus),
    /// The exec could not be started or its stream broke; terminal.
    Failed(String),
}

#[derive(Debug)]
pub enum ExecInput {
    Stdin(bytes::Bytes),
    CloseStdin,
    Signal(i32),
    /// A terminal exec's new size (ignored by one without a terminal).
    Resize(TtySize),
}

pub struct ExecHandle {
    pub events: mpsc::Receiver<ExecEvent>,
    pub input: mpsc::Sender<ExecInput>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    pub exit: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output beyond the collection limit was dropped.
    pub truncated: bool,
}

impl ExecHandle {
    /// Feed `stdin` (then EOF) and collect everything up to `max_output` bytes per stream.
    pub async fn collect(
        mut self,
        stdin: Option<Vec<u8>>,
        max_output: usize,
    ) -> Result<ExecOutput> {
        if let Some(data) = stdin {
            let _ = self.input.send(ExecInput::Stdin(data.into())).await;
        }
        let _ = self.input.send(ExecInput::CloseStdin).await;
        let mut out = ExecOutput::default();
        while let Some(ev) = self.events.recv().await {
            match ev {
                ExecEvent::Started { .. } => {}
                ExecEvent::Stdout(b) => {
                    push_capped(&mut out.stdout, &b, max_output, &mut out.truncated)
                }
                ExecEvent::Stderr(b) => {
                    push_capped(&mut out.stderr, &b, max_output, &mut out.truncated)
                }
                ExecEvent::Exit(s) => {
                    out.exit = s;
                    return Ok(out);
                }
                ExecEvent::Failed(m) => return Err(SandboxError::Start(m)),
            }
        }
        Err(SandboxError::Start(
            "exec stream ended without an exit status".into(),
        ))
    }
}

fn push_capped(buf: &mut Vec<u8>, b: &[u8], max: usize, truncated: &mut bool) {
    let room = max.saturating_sub(buf.len());
    if b.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&b[..b.len().min(room)]);
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids: u64,
    pub pids_limit: u64,
    pub disk_used_bytes: u64,
    pub disk_limit_bytes: u64,
    pub oom_kills: u64,
}

/// Why a box stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum BoxExit {
    Destroyed,
    Exited { code: i32 },
    OomKilled,
}

/// What a backend guarantees; reported by `GET /v1/backends` and in each box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub name: String,
    pub isolation: String,
    pub user_namespace: bool,
    pub seccomp: bool,
    pub landlock: bool,
    pub disk_quota: bool,
    /// Going over the memory limit kills the offending process and the box lives on. When
    /// false, the limit holds the box as a whole: going over it ends the box (`OomKilled`).
    pub process_oom_kill: bool,
    pub cgroup: String,
    pub network: String,
    /// Can run an OCI image's unpacked root (`Image::Rootfs`).
    pub oci_images: bool,
    /// Resolves OCI image references itself (`Image::Oci`, e.g. `debian:12`).
    pub image_references: bool,
    /// Boxes outlive the server and are taken back after a restart ([`Sandbox::adopt`]).
    pub adoption: bool,
}

/// The contract every sandbox backend implements. See the crate docs for ordering,
/// cancellation and idempotence.
pub trait Sandbox: Send + Sync {
    fn capabilities(&self) -> Capabilities;
    /// Whether the backend can create boxes right now (readiness); cheap, no box is made.
    fn health(&self) -> impl Future<Output = Result<()>> + Send;
    fn create(&self, cfg: BoxConfig) -> impl Future<Output = Result<BoxInfo>> + Send;
    fn exec(&self, id: &str, spec: ExecSpec) -> impl Future<Output = Result<ExecHandle>> + Send;
    /// The running box's workspace for streamed file access ([`files`]), behind the box's
    /// file gate, which `read_file`, `write_file` and `delete_file` use too.
    fn files(&self, id: &str) -> Result<files::FilesRoot>;
    fn read_file(&self, id: &str, path: &str) -> impl Future<Output = Result<FileContent>> + Send;
    fn write_file(
        &self,
        id: &str,
        path: &str,
        data: Vec<u8>,
        mode: u32,
    ) -> impl Future<Output = Result<()>> + Send;
    fn delete_file(&self, id: &str, path: &str) -> impl Future<Output = Result<()>> + Send;
    fn stats(&self, id: &str) -> impl Future<Output = Result<Stats>> + Send;
    /// A byte stream to a TCP port listening on the box's loopback (for the port proxy).
    fn connect(&self, id: &str, port: u16) -> impl Future<Output = Result<PortStream>> + Send;
    /// Resolves to `Some` once the box has stopped, with the reason.
    fn exit_watch(&self, id: &str) -> Result<watch::Receiver<Option<BoxExit>>>;
    fn destroy(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Take back a box this backend (same name and data directory) started before the server
    /// restarted, given the config it was created with. `Ok`: the box runs and is served as
    /// if just created (a fresh exit watch; its workspace as it was; no process of the old
    /// server's execs survives, since their streams ended). `Err(NotFound)`: it is gone;
    /// `Err(Unsupported)`: this backend's boxes die with the server (`capabilities.adoption`
    /// is false). Either way the caller `destroy`s the id to release what is left.
    fn adopt(&self, cfg: BoxConfig) -> impl Future<Output = Result<BoxInfo>> + Send;
}

/// A connection into a box (to a port a process in it listens on).
pub trait BoxIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> BoxIo for T {}
pub type PortStream = Box<dyn BoxIo>;

/// The closed set of backends a server can run.
pub enum Backend {
    Native(native::NativeBackend),
    /// Docker with the `runc` runtime, or gVisor (`runsc`) through Docker.
    Docker(docker::DockerBackend),
    /// In-memory boxes whose execs tests script (feature `fake`: tests only).
    #[cfg(feature = "fake")]
    Fake(fake::FakeBackend),
}

impl Backend {
    /// CPU, memory and pids of a running box for periodic sampling; disk figures only where
    /// they are cheap (a native box's are 0, see [`native::NativeBackend::sample`]).
    pub async fn sample(&self, id: &str) -> Result<Stats> {
        match self {
            Backend::Native(b) => b.sample(id).await,
            b => b.stats(id).await,
        }
    }

    /// The name the server offers the backend under (`native`, `docker`, `gvisor`).
    pub fn name(&self) -> &str {
        match self {
            Backend::Native(_) => "native",
            Backend::Docker(b) => b.name(),
            #[cfg(feature = "fake")]
            Backend::Fake(_) => "fake",
        }
    }
}

impl Sandbox for Backend {
    fn capabilities(&self) -> Capabilities {
        match self {
            Backend::Native(b) => b.capabilities(),
            Backend::Docker(b) => b.capabilities(),
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.capabilities(),
        }
    }
    async fn health(&self) -> Result<()> {
        match self {
            Backend::Native(b) => b.health().await,
            Backend::Docker(b) => b.health().await,
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.health().await,
        }
    }
    async fn create(&self, cfg: BoxConfig) -> Result<BoxInfo> {
        match self {
            Backend::Native(b) => b.create(cfg).await,
            Backend::Docker(b) => b.create(cfg).await,
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.create(cfg).await,
        }
    }
    async fn exec(&self, id: &str, spec: ExecSpec) -> Result<ExecHandle> {
        match self {
            Backend::Native(b) => b.exec(id, spec).await,
            Backend::Docker(b) => b.exec(id, spec).await,
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.exec(id, spec).await,
        }
    }
    fn files(&self, id: &str) -> Result<files::FilesRoot> {
        match self {
            Backend::Native(b) => b.files(id),
            Backend::Docker(b) => b.files(id),
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.files(id),
        }
    }
    async fn read_file(&self, id: &str, path: &str) -> Result<FileContent> {
        match self {
            Backend::Native(b) => b.read_file(id, path).await,
            Backend::Docker(b) => b.read_file(id, path).await,
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.read_file(id, path).await,
        }
    }
    async fn write_file(&self, id: &str, path: &str, data: Vec<u8>, mode: u32) -> Result<()> {
        match self {
            Backend::Native(b) => b.write_file(id, path, data, mode).await,
            Backend::Docker(b) => b.write_file(id, path, data, mode).await,
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.write_file(id, path, data, mode).await,
        }
    }
    async fn delete_file(&self, id: &str, path: &str) -> Result<()> {
        match self {
            Backend::Native(b) => b.delete_file(id, path).await,
            Backend::Docker(b) => b.delete_file(id, path).await,
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.delete_file(id, path).await,
        }
    }
    async fn stats(&self, id: &str) -> Result<Stats> {
        match self {
            Backend::Native(b) => b.stats(id).await,
            Backend::Docker(b) => b.stats(id).await,
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.stats(id).await,
        }
    }
    fn exit_watch(&self, id: &str) -> Result<watch::Receiver<Option<BoxExit>>> {
        match self {
            Backend::Native(b) => b.exit_watch(id),
            Backend::Docker(b) => b.exit_watch(id),
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.exit_watch(id),
        }
    }
    async fn connect(&self, id: &str, port: u16) -> Result<PortStream> {
        match self {
            Backend::Native(b) => b.connect(id, port).await,
            Backend::Docker(b) => b.connect(id, port).await,
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.connect(id, port).await,
        }
    }
    async fn destroy(&self, id: &str) -> Result<()> {
        match self {
            Backend::Native(b) => b.destroy(id).await,
            Backend::Docker(b) => b.destroy(id).await,
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.destroy(id).await,
        }
    }
    async fn adopt(&self, cfg: BoxConfig) -> Result<BoxInfo> {
        match self {
            Backend::Native(b) => b.adopt(cfg).await,
            Backend::Docker(b) => b.adopt(cfg).await,
            #[cfg(feature = "fake")]
            Backend::Fake(b) => b.adopt(cfg).await,
        }
    }
}

pub(crate) fn blocking_err(e: tokio::task::JoinError) -> SandboxError {
    SandboxError::Io(std::io::Error::other(format!("blocking task: {e}")))
}

pub fn valid_box_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
