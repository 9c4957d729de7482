//! The host side of the in-box supervisor's protocol: start an exec and stream it, or open a
//! connection to a port in the box. Every backend that runs berth's supervisor in its boxes
//! (native, Docker, gVisor) talks to it through these functions over the box's control socket.
//!
//! Ordering and cancellation: events arrive as the supervisor sends them (`Started`, output in
//! order per stream, then one `Exit` or `Failed`); dropping the [`ExecHandle`]'s input side
//! keeps the process running until it exits, but a closed connection (the handle and its reader
//! gone) makes the supervisor kill the process group.

use super::protocol::{aio, ExecRequest, Kind, WireExit};
use super::{DEFAULT_PATH, DEFAULT_WRITABLE};
use crate::{
    ExecEvent, ExecHandle, ExecInput, ExecSpec, ExitStatus, Result, SandboxError, AGENT_UID,
};
use std::path::Path;
use tokio::sync::mpsc;

/// What the backend knows about the box that the protocol does not say.
pub struct Probes {
    /// Whether the box's memory limit killed something since the exec started.
    pub oom_killed: Box<dyn Fn() -> bool + Send + Sync>,
    /// Whether the box still runs (a broken stream then is an error, not the box stopping).
    pub running: Box<dyn Fn() -> bool + Send + Sync>,
    /// Called once, at the process's first output on stdout or its end (whichever comes
    /// first; stderr does not count): ends a start boost.
    pub first_output: Option<Box<dyn FnOnce() + Send>>,
}

/// The supervisor request for `spec` in a box whose own environment is `box_env`.
pub fn exec_request(box_env: &[(String, String)], spec: ExecSpec) -> Result<ExecRequest> {
    if spec.argv.is_empty() {
        return Err(SandboxError::InvalidSpec("argv must not be empty".into()));
    }
    let uid = spec.uid.unwrap_or(AGENT_UID);
    if uid == 0 {
        return Err(SandboxError::InvalidSpec(
            "uid 0 is not allowed in a box".into(),
        ));
    }
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), "/home/agent".into()),
        ("USER".into(), "agent".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TMPDIR".into(), "/tmp".into()),
    ];
    for (k, v) in box_env.iter().chain(spec.env.iter()) {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(SandboxError::InvalidSpec(format!(
                "invalid environment variable {k:?}"
            )));
        }
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    Ok(ExecRequest {
        argv: spec.argv,
        cwd: spec.cwd.unwrap_or_else(|| "/workspace".into()),
        env,
        uid,
        writable: spec
            .writable
            .unwrap_or_else(|| DEFAULT_WRITABLE.iter().map(|s| s.to_string()).collect()),
        timeout_ms: spec.timeout.map(|d| d.as_millis() as u64),
        tty: spec.tty,
    })
}

/// Start `req` through the supervisor listening on `ctl` and stream it.
pub async fn exec(ctl: &Path, req: &ExecRequest, probes: Probes) -> Result<ExecHandle> {
    let stream = tokio::net::UnixStream::connect(ctl).await?;
    let (mut rd, mut wr) = stream.into_split();
    let body = serde_json::to_vec(req).map_err(|e| SandboxError::Io(std::io::Error::other(e)))?;
    aio::write_frame(&mut wr, Kind::Request, &body).await?;
    let (ev_tx, ev_rx) = mpsc::channel(64);
    let (in_tx, mut in_rx) = mpsc::channel::<ExecInput>(64);
    // The reader drops `done_tx` when the exec has ended, which lets the writer close its half
    // of the connection.
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let mut first_output = probes.first_output;
    tokio::spawn(async move {
        let _done = done_tx;
        loop {
            // A dropped receiver ends the exec even while the process is silent: returning
            // here lets the writer close the connection, which the supervisor answers by
            // killing the process group.
            let frame = tokio::select! {
                f = aio::read_frame(&mut rd) => f,
                _ = ev_tx.closed() => return,
            };
            if matches!(
                frame,
                Ok((Kind::Stdout | Kind::Exit | Kind::Error, _)) | Err(_)
            ) {
                if let Some(f) = first_output.take() {
                    f();
                }
            }
            let ev = match frame {
                Ok((Kind::Started, p)) => ExecEvent::Started {
                    pid: String::from_utf8_lossy(&p).parse().unwrap_or(0),
                },
                Ok((Kind::Stdout, p)) => ExecEvent::Stdout(p.into()),
                Ok((Kind::Stderr, p)) => ExecEvent::Stderr(p.into()),
                Ok((Kind::Exit, p)) => {
                    let w: WireExit = serde_json::from_slice(&p).unwrap_or_default();
                    let oom =
                        w.signal == Some(libc::SIGKILL) && !w.timed_out && (probes.oom_killed)();
                    let _ = ev_tx
                        .send(ExecEvent::Exit(ExitStatus {
                            code: w.code,
                            signal: w.signal,
                            timed_out: w.timed_out,
                            oom_killed: oom,
                        }))
                        .await;
                    return;
                }
                Ok((Kind::Error, p)) => {
                    let _ = ev_tx
                        .send(ExecEvent::Failed(String::from_utf8_lossy(&p).into_owned()))
                        .await;
                    return;
                }
                Ok(_) => continue,
                Err(e) => {
                    let msg = if (probes.running)() {
                        format!("exec stream broke: {e}")
                    } else {
                        "the box stopped".to_string()
                    };
                    let _ = ev_tx.send(ExecEvent::Failed(msg)).await;
                    return;
                }
            };
            if ev_tx.send(ev).await.is_err() {
                return; // nobody listens any more: end the exec, as above
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = in_rx.recv() => m,
                _ = &mut done_rx => return,
            };
            let Some(msg) = msg else { break };
            let r = match msg {
                ExecInput::Stdin(b) => aio::write_frame(&mut wr, Kind::Stdin, &b).await,
                ExecInput::CloseStdin => aio::write_frame(&mut wr, Kind::StdinEof, &[]).await,
                ExecInput::Signal(s) => {
                    aio::write_frame(&mut wr, Kind::Signal, s.to_string().as_bytes()).await
                }
                ExecInput::Resize(size) => match serde_json::to_vec(&size) {
                    Ok(body) => aio::write_frame(&mut wr, Kind::Resize, &body).await,
                    Err(_) => Ok(()),
                },
            };
            if r.is_err() {
                break;
            }
        }
        // Keep the write half open until the exec ends: the supervisor treats a closed
        // connection as "kill the process".
        let _ = done_rx.await;
    });
    Ok(ExecHandle {
        events: ev_rx,
        input: in_tx,
    })
}

/// A byte stream to `port` on the box's loopback, through the supervisor on `ctl`.
pub async fn connect(ctl: &Path, port: u16) -> Result<crate::PortStream> {
    let mut stream = tokio::net::UnixStream::connect(ctl).await?;
    aio::write_frame(&mut stream, Kind::Connect, port.to_string().as_bytes()).await?;
    match aio::read_frame(&mut stream).await? {
        (Kind::Started, _) => Ok(Box::new(stream)),
        (_, msg) => Err(SandboxError::Unreachable(
            String::from_utf8_lossy(&msg).into_owned(),
        )),
    }
}
