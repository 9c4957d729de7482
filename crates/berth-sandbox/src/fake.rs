//! An in-memory backend for tests (cargo feature `fake`; never in a release build).
//!
//! A fake box is a record, a run directory (so the server's Unix sockets can be bound as for a
//! real box) and a workspace directory (so the files API works); nothing is isolated and no
//! process runs. Tests script what happens: each exec is answered by the first rule whose
//! matcher accepts its argv ([`FakeBackend::on_exec`]; unmatched execs exit 0 silently), and
//! creates, execs and destroys can be made to fail or to take time. Delays are tokio sleeps,
//! so tests under `tokio::time::pause()` run them in no real time.
//!
//! It keeps the backend contract where the engine relies on it: exec events arrive `Started`,
//! output, then one `Exit` or `Failed`; an exec does not outlive its box (destroying or killing
//! the box ends every exec still running with `Failed`); `destroy` is idempotent;
//! `exit_watch` reports once; `adopt` takes back a box this backend still holds.

use crate::files::{self, FilesRoot};
use crate::{
    BoxConfig, BoxExit, BoxInfo, Capabilities, ExecEvent, ExecHandle, ExecInput, ExecSpec,
    FileContent, PortStream, Result, SandboxError, Stats,
};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How a scripted exec answers.
#[derive(Debug, Clone, Default)]
pub struct FakeExec {
    /// Written to stdout, then stderr, after `delay`.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Exit code (ignored when `fail` or `hang` is set).
    pub code: i32,
    /// Answer with `Failed(message)` instead of an exit (a program that could not start).
    pub fail: Option<String>,
    /// Wait this long (tokio time) before answering.
    pub delay: Duration,
    /// Never exit on its own: runs until its box is destroyed or killed, or the caller drops
    /// the exec. Otherwise it exits once it has answered and its stdin is closed.
    pub hang: bool,
    /// Echo every stdin piece to stdout as it arrives (a line-based agent's loop).
    pub echo: bool,
    /// Exit once answered, whether or not stdin was closed (a program that never reads it).
    pub ignores_stdin: bool,
}

impl FakeExec {
    pub fn exit(code: i32) -> FakeExec {
        FakeExec {
            code,
            ..Default::default()
        }
    }

    pub fn stdout(bytes: impl Into<Vec<u8>>) -> FakeExec {
        FakeExec {
            stdout: bytes.into(),
            ..Default::default()
        }
    }

    pub fn fail(message: &str) -> FakeExec {
        FakeExec {
            fail: Some(message.to_string()),
            ..Default::default()
        }
    }

    pub fn hang() -> FakeExec {
        FakeExec {
            hang: true,
            ..Default::default()
        }
    }

    /// An agent that answers each stdin piece with the same bytes and runs until stopped.
    pub fn echo() -> FakeExec {
        FakeExec {
            hang: true,
            echo: true,
            ..Default::default()
        }
    }

    pub fn ignoring_stdin(mut self) -> FakeExec {
        self.ignores_stdin = true;
        self
    }

    pub fn after(mut self, delay: Duration) -> FakeExec {
        self.delay = delay;
        self
    }
}

type Matcher = Box<dyn Fn(&[String]) -> bool + Send + Sync>;

struct FakeBox {
    cfg: BoxConfig,
    exit: watch::Sender<Option<BoxExit>>,
    /// Fires when the box goes away: its running execs end.
    gone: watch::Sender<bool>,
    gate: files::Gate,
}

#[derive(Default)]
struct State {
    boxes: HashMap<String, FakeBox>,
    rules: Vec<(Matcher, FakeExec)>,
    create_failures: VecDeque<String>,
    create_delay: Duration,
    destroy_failures: VecDeque<String>,
    /// What was done, in order: "create <id>", "adopt <id>", "exec <id> <argv…>",
    /// "destroy <id>".
    calls: Vec<String>,
    /// Bytes each exec got on stdin, by the exec's argv joined with spaces.
    stdin: Vec<(String, Vec<u8>)>,
}

/// The fake backend; clones share their boxes and script (a restarted server given the same
/// backend finds its boxes, as Docker's would).
#[derive(Clone)]
pub struct FakeBackend {
    root: PathBuf,
    adoption: bool,
    state: Arc<Mutex<State>>,
}

impl FakeBackend {
    /// Boxes' run and workspace directories go under `root`; `adoption` says whether its boxes
    /// outlive a server (as Docker's do).
    pub fn new(root: impl Into<PathBuf>, adoption: bool) -> FakeBackend {
        FakeBackend {
            root: root.into(),
            adoption,
            state: Arc::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; go on with the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answer execs whose argv `matches` with `reply` (rules are tried in the order added).
    pub fn on_exec(
        &self,
        matches: impl Fn(&[String]) -> bool + Send + Sync + 'static,
        reply: FakeExec,
    ) {
        self.state().rules.push((Box::new(matches), reply));
    }

    /// Answer execs that run `program` (an argv element equal to it or ending in `/program`).
    pub fn on_program(&self, program: &str, reply: FakeExec) {
        let p = program.to_string();
        let suffix = format!("/{program}");
        self.on_exec(
            move |argv| argv.iter().any(|a| *a == p || a.ends_with(&suffix)),
            reply,
        );
    }

    /// The next create fails with `SandboxError::Start(message)`.
    pub fn fail_next_create(&self, message: &str) {
        self.state().create_failures.push_back(message.to_string());
    }

    /// Every create takes `delay` (tokio time) before it answers.
    pub fn set_create_delay(&self, delay: Duration) {
        self.state().create_delay = delay;
    }

    /// The next destroy fails (the box stays).
    pub fn fail_next_destroy(&self, message: &str) {
        self.state().destroy_failures.push_back(message.to_string());
    }

    /// The box dies on its own (its init exited, or was OOM-killed): its exit watch reports
    /// `why` and its running execs end. The record stays until destroyed, as with a real box.
    pub fn kill(&self, id: &str, why: BoxExit) {
        let st = self.state();
        if let Some(b) = st.boxes.get(id) {
            b.gone.send_replace(true);
            b.exit.send_replace(Some(why));
        }
    }

    /// Whether the backend holds a box by this id.
    pub fn holds(&self, id: &str) -> bool {
        self.state().boxes.contains_key(id)
    }

    /// What was done so far (see `State::calls`).
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// Stdin each exec whose argv (joined with spaces) contains `needle` was given, in order.
    pub fn stdin_of(&self, needle: &str) -> Vec<Vec<u8>> {
        self.state()
            .stdin
            .iter()
            .filter(|(argv, _)| argv.contains(needle))
            .map(|(_, b)| b.clone())
            .collect()
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.root.join(id).join("run")
    }

    fn workspace(&self, id: &str) -> PathBuf {
        self.root.join(id).join("workspace")
    }

    fn make_box(&self, cfg: BoxConfig) -> Result<BoxInfo> {
        let id = cfg.id.clone();
        let run_dir = self.run_dir(&id);
        std::fs::create_dir_all(&run_dir)?;
        std::fs::create_dir_all(self.workspace(&id))?;
        let mut st = self.state();
        if st.boxes.contains_key(&id) {
            return Err(SandboxError::Exists(id));
        }
        st.boxes.insert(
            id.clone(),
            FakeBox {
                cfg,
                exit: watch::channel(None).0,
                gone: watch::channel(false).0,
                gate: files::new_gate(),
            },
        );
        Ok(BoxInfo {
            id,
            pid: None,
            run_dir,
        })
    }

    fn running(&self, id: &str) -> Result<()> {
        match self.state().boxes.get(id) {
            Some(b) if b.exit.borrow().is_none() => Ok(()),
            Some(_) => Err(SandboxError::NotRunning(id.to_string())),
            None => Err(SandboxError::NotFound(id.to_string())),
        }
    }
}

impl crate::Sandbox for FakeBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "fake".into(),
            isolation: "none (test double)".into(),
            user_namespace: false,
            seccomp: false,
            landlock: false,
            disk_quota: false,
            process_oom_kill: false,
            cgroup: "none".into(),
            network: "none".into(),
            oci_images: false,
            image_references: false,
            adoption: self.adoption,
        }
    }

    async fn health(&self) -> Result<()> {
        Ok(())
    }

    async fn create(&self, cfg: BoxConfig) -> Result<BoxInfo> {
        let (delay, failure) = {
            let mut st = self.state();
            st.calls.push(format!("create {}", cfg.id));
            (st.create_delay, st.create_failures.pop_front())
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(m) = failure {
            return Err(SandboxError::Start(m));
        }
        self.make_box(cfg)
    }

    async fn exec(&self, id: &str, spec: ExecSpec) -> Result<ExecHandle> {
        let argv = spec.argv.join(" ");
        let (reply, gone) = {
            let mut st = self.state();
            st.calls.push(format!("exec {id} {argv}"));
            let Some(b) = st.boxes.get(id) else {
                return Err(SandboxError::NotFound(id.to_string()));
            };
            if b.exit.borrow().is_some() {
                return Err(SandboxError::NotRunning(id.to_string()));
            }
            let gone = b.gone.subscribe();
            let reply = st
                .rules
                .iter()
                .find(|(m, _)| m(&spec.argv))
                .map(|(_, r)| r.clone())
                .unwrap_or_default();
            (reply, gone)
        };
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(run_exec(state, argv, reply, gone, ev_tx, in_rx));
        Ok(ExecHandle {
            events: ev_rx,
            input: in_tx,
        })
    }

    fn files(&self, id: &str) -> Result<FilesRoot> {
        let gate = match self.state().boxes.get(id) {
            Some(b) => b.gate.clone(),
            None => return Err(SandboxError::NotFound(id.to_string())),
        };
        Ok(FilesRoot {
            root: self.workspace(id),
            owner: None,
            gate,
        })
    }

    async fn read_file(&self, id: &str, path: &str) -> Result<FileContent> {
        self.files(id)?.read_whole(path).await
    }

    async fn write_file(&self, id: &str, path: &str, data: Vec<u8>, mode: u32) -> Result<()> {
        self.files(id)?.write_whole(path, data, mode).await
    }

    async fn delete_file(&self, id: &str, path: &str) -> Result<()> {
        self.files(id)?.delete(path).await
    }

    async fn stats(&self, id: &str) -> Result<Stats> {
        self.running(id)?;
        let st = self.state();
        let limits = st.boxes.get(id).map(|b| b.cfg.limits).unwrap_or_default();
        Ok(Stats {
            memory_limit_bytes: limits.memory_mib * 1024 * 1024,
            pids_limit: limits.pids,
            disk_limit_bytes: limits.disk_mib * 1024 * 1024,
            ..Default::default()
        })
    }

    async fn connect(&self, id: &str, port: u16) -> Result<PortStream> {
        self.running(id)?;
        // Nothing listens in a fake box.
        Err(SandboxError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("nothing listens on port {port}"),
        )))
    }

    fn exit_watch(&self, id: &str) -> Result<watch::Receiver<Option<BoxExit>>> {
        match self.state().boxes.get(id) {
            Some(b) => Ok(b.exit.subscribe()),
            None => Err(SandboxError::NotFound(id.to_string())),
        }
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        let mut st = self.state();
        st.calls.push(format!("destroy {id}"));
        if let Some(m) = st.destroy_failures.pop_front() {
            return Err(SandboxError::Io(std::io::Error::other(m)));
        }
        if let Some(b) = st.boxes.remove(id) {
            b.gone.send_replace(true);
            b.exit.send_replace(Some(BoxExit::Destroyed));
        }
        drop(st);
        let _ = std::fs::remove_dir_all(self.root.join(id));
        Ok(())
    }

    async fn adopt(&self, cfg: BoxConfig) -> Result<BoxInfo> {
        if !self.adoption {
            return Err(SandboxError::Unsupported(
                "this fake backend's boxes die with the server".into(),
            ));
        }
        let mut st = self.state();
        st.calls.push(format!("adopt {}", cfg.id));
        let Some(b) = st.boxes.get_mut(&cfg.id) else {
            return Err(SandboxError::NotFound(cfg.id));
        };
        if b.exit.borrow().is_some() {
            return Err(SandboxError::NotFound(cfg.id));
        }
        // A fresh exit watch, as the contract says.
        b.exit = watch::channel(None).0;
        Ok(BoxInfo {
            run_dir: self.run_dir(&cfg.id),
            id: cfg.id,
            pid: None,
        })
    }
}

/// One scripted exec: record its stdin, answer as scripted, end early when its box goes.
async fn run_exec(
    state: Arc<Mutex<State>>,
    argv: String,
    reply: FakeExec,
    mut gone: watch::Receiver<bool>,
    events: mpsc::Sender<ExecEvent>,
    mut input: mpsc::Receiver<ExecInput>,
) {
    let record = |bytes: &[u8]| {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        match st.stdin.iter_mut().rev().find(|(a, _)| *a == argv) {
            Some((_, b)) => b.extend_from_slice(bytes),
            None => st.stdin.push((argv.clone(), bytes.to_vec())),
        }
    };
    record(&[]);
    if let Some(m) = reply.fail {
        let _ = events.send(ExecEvent::Failed(m)).await;
        return;
    }
    if events.send(ExecEvent::Started { pid: 1 }).await.is_err() {
        return;
    }
    let answer = async {
        tokio::time::sleep(reply.delay).await;
        if !reply.stdout.is_empty() {
            let _ = events
                .send(ExecEvent::Stdout(reply.stdout.clone().into()))
                .await;
        }
        if !reply.stderr.is_empty() {
            let _ = events
                .send(ExecEvent::Stderr(reply.stderr.clone().into()))
                .await;
        }
    };
    let mut answered = false;
    let mut stdin_open = true;
    tokio::pin!(answer);
    loop {
        // Like a program that reads its stdin to the end: it exits once it has answered and
        // its input is closed.
        if answered && (!stdin_open || reply.ignores_stdin) && !reply.hang {
            let _ = events
                .send(ExecEvent::Exit(crate::ExitStatus {
                    code: Some(reply.code),
                    ..Default::default()
                }))
                .await;
            return;
        }
        tokio::select! {
            () = &mut answer, if !answered => answered = true,
            i = input.recv(), if stdin_open => match i {
                Some(ExecInput::Stdin(b)) => {
                    record(&b);
                    if reply.echo && events.send(ExecEvent::Stdout(b)).await.is_err() {
                        return;
                    }
                }
                Some(ExecInput::CloseStdin) | None => stdin_open = false,
                // A fake box has no terminal to resize.
                Some(ExecInput::Resize(_)) => {}
                Some(ExecInput::Signal(sig)) => {
                    let _ = events
                        .send(ExecEvent::Exit(crate::ExitStatus {
                            signal: Some(sig),
                            ..Default::default()
                        }))
                        .await;
                    return;
                }
            },
            _ = async { gone.wait_for(|g| *g).await.is_ok() } => {
                let _ = events.send(ExecEvent::Failed("the box went away".into())).await;
                return;
            }
            () = events.closed() => return,
        }
    }
}
