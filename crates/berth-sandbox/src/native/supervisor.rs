//! The supervisor: the long-lived process inside a box (PID 2, child of the box's PID 1).
//!
//! It accepts exec connections on the control socket the host bound before the box was sealed
//! (the socket's path is not inside the box's file tree, so box processes cannot reach it),
//! starts each process confined by [`Confinement`], and streams its output back as frames. It
//! also runs the loopback bridges that are the box's only way out: a TCP listener on
//! `127.0.0.1:PORT` inside the box whose connections are spliced to a Unix socket the host
//! placed in `/run/berth`.
//!
//! Ordering: for one exec the supervisor sends `Started`, then output frames in the order the
//! process wrote them per stream, then exactly one `Exit` or `Error`, after which it closes the
//! connection. A dropped host connection kills the process group (no orphaned work).

use super::confine::Confinement;
use super::protocol::{read_frame, write_frame, ExecRequest, Kind, WireExit};
use super::Bridge;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How long output pumps may lag behind the exit of the main process (a background child may
/// hold the pipe open forever; we do not wait for it).
const DRAIN_GRACE: Duration = Duration::from_millis(200);

pub fn run(listener: UnixListener, bridges: Vec<Bridge>) -> ! {
    for b in bridges {
        thread::spawn(move || bridge(b));
    }
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || {
                    if let Err(e) = serve(stream) {
                        eprintln!("berth-supervisor: exec connection: {e}");
                    }
                });
            }
            Err(e) => eprintln!("berth-supervisor: accept: {e}"),
        }
    }
    std::process::exit(0)
}

fn bridge(b: Bridge) {
    let listener = match TcpListener::bind(("127.0.0.1", b.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("berth-supervisor: bridge port {}: {e}", b.port);
            return;
        }
    };
    let target = format!("/run/berth/{}", b.socket);
    for conn in listener.incoming() {
        let Ok(tcp) = conn else { continue };
        let target = target.clone();
        thread::spawn(move || {
            if let Ok(unix) = UnixStream::connect(&target) {
                splice(tcp, unix);
            }
        });
    }
}

fn splice(tcp: TcpStream, unix: UnixStream) {
    let (Ok(mut tcp_r), Ok(mut unix_w)) = (tcp.try_clone(), unix.try_clone()) else {
        return;
    };
    let up = thread::spawn(move || {
        let _ = io::copy(&mut tcp_r, &mut unix_w);
        let _ = unix_w.shutdown(std::net::Shutdown::Write);
    });
    let (mut unix_r, mut tcp_w) = (unix, tcp);
    let _ = io::copy(&mut unix_r, &mut tcp_w);
    let _ = tcp_w.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

type Writer = Arc<Mutex<UnixStream>>;

fn send(w: &Writer, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let mut guard = w
        .lock()
        .map_err(|_| io::Error::other("writer lock poisoned"))?;
    write_frame(&mut *guard, kind, payload)
}

fn serve(stream: UnixStream) -> io::Result<()> {
    let mut reader = stream.try_clone()?;
    let writer: Writer = Arc::new(Mutex::new(stream));
    let (kind, payload) = read_frame(&mut reader)?;
    if kind != Kind::Request {
        return send(&writer, Kind::Error, b"expected a request frame");
    }
    let req: ExecRequest = match serde_json::from_slice(&payload) {
        Ok(r) => r,
        Err(e) => return send(&writer, Kind::Error, format!("bad request: {e}").as_bytes()),
    };
    match spawn_and_stream(req, &mut reader, &writer) {
        Ok(()) => Ok(()),
        Err(e) => send(&writer, Kind::Error, e.to_string().as_bytes()),
    }
}

fn spawn_and_stream(req: ExecRequest, reader: &mut UnixStream, writer: &Writer) -> io::Result<()> {
    let Some((prog, args)) = req.argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "argv is empty"));
    };
    let mut confinement = Confinement::prepare(req.uid, &req.writable)?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&req.cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: `apply` only makes system calls on the forked child.
    unsafe {
        cmd.pre_exec(move || confinement.apply());
    }
    let mut child = cmd.spawn()?;
    let pid = child.id() as i32;
    send(writer, Kind::Started, pid.to_string().as_bytes())?;

    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    let mut pumps = 0;
    for (pipe, kind) in [
        (
            stdout.map(|p| Box::new(p) as Box<dyn Read + Send>),
            Kind::Stdout,
        ),
        (
            stderr.map(|p| Box::new(p) as Box<dyn Read + Send>),
            Kind::Stderr,
        ),
    ] {
        if let Some(mut pipe) = pipe {
            pumps += 1;
            let w = writer.clone();
            let done = drained_tx.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if send(&w, kind, &buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = done.send(());
            });
        }
    }
    drop(drained_tx);

    // Host → process: stdin bytes, EOF, signals. A closed host connection kills the group.
    let mut host = reader.try_clone()?;
    let stdin_slot = Arc::new(Mutex::new(stdin.take()));
    let slot = stdin_slot.clone();
    let keep = req.keep_stdin;
    thread::spawn(move || loop {
        match read_frame(&mut host) {
            Ok((Kind::Stdin, data)) => {
                if let Ok(mut g) = slot.lock() {
                    if let Some(s) = g.as_mut() {
                        if s.write_all(&data).is_err() {
                            *g = None;
                        }
                    }
                }
            }
            Ok((Kind::StdinEof, _)) => {
                if let Ok(mut g) = slot.lock() {
                    *g = None;
                }
            }
            Ok((Kind::Signal, data)) => {
                let sig = std::str::from_utf8(&data)
                    .ok()
                    .and_then(|s| s.parse::<i32>().ok())
                    .unwrap_or(libc::SIGKILL);
                // SAFETY: signalling our own child's process group.
                unsafe { libc::kill(-pid, sig) };
            }
            Ok(_) => {}
            Err(_) => {
                // SAFETY: as above; the host is gone, so is the work it asked for.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                return;
            }
        }
    });
    if !keep {
        // Nothing more will come unless the host sends it right away; leave stdin to the host
        // frames above, which close it on StdinEof.
    }

    // Timeout watchdog.
    let (exited_tx, exited_rx) = mpsc::channel::<()>();
    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(ms) = req.timeout_ms {
        let flag = timed_out.clone();
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) =
                exited_rx.recv_timeout(Duration::from_millis(ms))
            {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                // SAFETY: killing the exec's own process group.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
        });
    }

    let status = child.wait()?;
    let _ = exited_tx.send(());
    for _ in 0..pumps {
        if drained_rx.recv_timeout(DRAIN_GRACE).is_err() {
            break;
        }
    }
    let exit = WireExit {
        code: status.code(),
        signal: status.signal(),
        timed_out: timed_out.load(std::sync::atomic::Ordering::SeqCst),
    };
    let body = serde_json::to_vec(&exit).map_err(io::Error::other)?;
    send(writer, Kind::Exit, &body)
}
