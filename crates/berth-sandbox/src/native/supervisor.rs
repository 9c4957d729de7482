//! The supervisor: the long-lived process inside a box. In a native box it is the box's PID 1
//! itself (after set-up, [`super::init`]): it also reaps the box's orphans ([`super::children`])
//! and ends, and with it the box, when the server's end of the report socket closes. In a
//! container it is the runtime's entry point.
//!
//! It accepts exec connections on the control socket the host bound before the box was sealed
//! (the socket's path is not inside the box's file tree, so box processes cannot reach it),
//! starts each process confined by [`Confinement`], and streams its output back as frames. It
//! also runs the loopback bridges that are the box's only way out ([`super::bridge`]).
//!
//! Ordering: for one exec the supervisor sends `Started`, then output frames in the order the
//! process wrote them per stream, then exactly one `Exit` or `Error`, after which it closes the
//! connection. A dropped host connection kills the process group (no orphaned work).

use super::confine::Confinement;
use super::protocol::{read_frame, write_frame, ExecRequest, Kind, WireExit};
use super::spawn;
use super::{bridge, Bridge};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How long output pumps may lag behind the exit of the main process (a background child may
/// hold the pipe open forever; we do not wait for it).
pub(super) const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// What the supervisor also does as a native box's PID 1.
pub(super) struct InitDuties {
    /// SIGCHLD, blocked in every thread and read here: the box's children to reap.
    pub sigchld: std::os::fd::OwnedFd,
    /// The report socket (the server's end closing ends the box).
    pub report: std::os::fd::RawFd,
}

pub fn run(listener: UnixListener, bridges: Vec<Bridge>) -> ! {
    serve_box(listener, bridges, None)
}

/// The supervisor's life; with `init`, as the box's PID 1. Returns only by exiting: 0 when its
/// control socket fails, 128 + SIGKILL when the server's end of the report socket closes.
pub(super) fn serve_box(
    listener: UnixListener,
    bridges: Vec<Bridge>,
    init: Option<InitDuties>,
) -> ! {
    // Once here instead of in every exec; should it fail, each exec empties its own.
    if let Err(e) = super::confine::empty_bounding_set() {
        eprintln!("berth-supervisor: bounding set: {e}");
    }
    let bridges = bridge::listen(bridges);
    // Build the seccomp filters and the default Landlock ruleset now, while the host is still
    // answering the create, instead of in the box's first exec (both are cached). In this
    // thread, once the bridges listen (connections wait in their backlogs): a first exec
    // would wait for the cache's lock anyway, and a thread of its own left an idle box a
    // malloc arena it no longer used.
    let writable: Vec<String> = super::DEFAULT_WRITABLE
        .iter()
        .map(|s| s.to_string())
        .collect();
    let _ = Confinement::prepare(crate::AGENT_UID, &writable);
    let code = accept_loop(&listener, &bridges, init.as_ref());
    if let Some(d) = &init {
        // SAFETY: the report socket stays open for PID 1's whole life.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(d.report) };
        super::init::report_on(
            socket,
            &super::init::InitReport {
                exit: Some(code),
                ..Default::default()
            },
        );
    }
    std::process::exit(code)
}

/// Wait on the control socket and every bridge listener at once (and, as PID 1, on SIGCHLD and
/// the report socket), in this one thread: an idle box's supervisor is a single thread (a
/// thread per listener cost each box three more tasks, of the host's `pid_max`, and their
/// stacks). Each connection gets threads of its own. Returns the exit code.
fn accept_loop(
    listener: &UnixListener,
    bridges: &[bridge::Listening],
    init: Option<&InitDuties>,
) -> i32 {
    use std::os::fd::AsRawFd;
    let poll_in = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
        .chain(bridges.iter().map(|b| b.listener.as_raw_fd()))
        .map(poll_in)
        .collect();
    let first_duty = fds.len();
    if let Some(d) = init {
        fds.push(poll_in(d.sigchld.as_raw_fd()));
        fds.push(poll_in(d.report));
    }
    // A connection reset between the poll and the accept must not block the loop.
    if listener.set_nonblocking(true).is_err()
        || bridges
            .iter()
            .any(|b| b.listener.set_nonblocking(true).is_err())
    {
        eprintln!("berth-supervisor: listeners cannot be made non-blocking");
        return 1;
    }
    loop {
        // SAFETY: poll over pollfds we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("berth-supervisor: poll: {}", io::Error::last_os_error());
            return 1;
        }
        if let Some(d) = init {
            if fds[first_duty + 1].revents != 0 {
                // The server writes nothing after the go-ahead: readable means its end is gone.
                return 128 + libc::SIGKILL;
            }
            if fds[first_duty].revents != 0 {
                // Drain the notifications (coalesced: the reaping finds every child).
                let mut info = [0u8; 128 * 4];
                // SAFETY: reading into a buffer we own from our own signalfd.
                unsafe { libc::read(d.sigchld.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
                super::children::reap_ready();
            }
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return 0;
        }
        if fds[0].revents != 0 {
            accept_exec(listener);
        }
        for (i, b) in bridges.iter().enumerate() {
            if fds[i + 1].revents != 0 {
                bridge::accept_bridge(b);
            }
        }
    }
}

fn accept_exec(listener: &UnixListener) {
    match listener.accept() {
        Ok((stream, _)) => {
            // Accepted sockets do not inherit O_NONBLOCK on Linux; made sure of here.
            if stream.set_nonblocking(false).is_err() {
                return;
            }
            // Failing to get a thread (the box's pids limit) drops the connection: the host
            // reports the exec as failed.
            let spawned = thread::Builder::new().spawn(move || {
                if let Err(e) = serve(stream) {
                    eprintln!("berth-supervisor: exec connection: {e}");
                }
                // Give back what the exec's buffers used: an idle box keeps little.
                // SAFETY: malloc_trim has no preconditions.
                #[cfg(target_env = "gnu")]
                unsafe {
                    libc::malloc_trim(0);
                }
            });
            if let Err(e) = spawned {
                eprintln!("berth-supervisor: no thread for an exec: {e}");
            }
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => {
            eprintln!("berth-supervisor: accept: {e}");
            // Out of descriptors, say: the socket stays readable, so do not spin on it.
            thread::sleep(Duration::from_millis(10));
        }
    }
}

pub(super) type Writer = Arc<Mutex<UnixStream>>;

pub(super) fn send(w: &Writer, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let mut guard = w
        .lock()
        .map_err(|_| io::Error::other("writer lock poisoned"))?;
    write_frame(&mut *guard, kind, payload)
}

fn serve(stream: UnixStream) -> io::Result<()> {
    let mut reader = stream.try_clone()?;
    let writer: Writer = Arc::new(Mutex::new(stream));
    let (kind, payload) = read_frame(&mut reader)?;
    if kind == Kind::Connect {
        return connect_port(&payload, reader, &writer);
    }
    if kind != Kind::Request {
        return send(&writer, Kind::Error, b"expected a request frame");
    }
    let req: ExecRequest = match serde_json::from_slice(&payload) {
        Ok(r) => r,
        Err(e) => return send(&writer, Kind::Error, format!("bad request: {e}").as_bytes()),
    };
    let served = match req.tty {
        Some(size) => super::pty::serve(req, size, &mut reader, &writer),
        None => spawn_and_stream(req, &mut reader, &writer),
    };
    match served {
        Ok(()) => Ok(()),
        Err(e) => send(&writer, Kind::Error, e.to_string().as_bytes()),
    }
}

/// Splice the host connection to a TCP port on the box's loopback.
fn connect_port(payload: &[u8], reader: UnixStream, writer: &Writer) -> io::Result<()> {
    let port = std::str::from_utf8(payload)
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0);
    let Some(port) = port else {
        return send(writer, Kind::Error, b"bad port");
    };
    match TcpStream::connect(("127.0.0.1", port)) {
        Ok(tcp) => {
            send(writer, Kind::Started, b"")?;
            bridge::splice(tcp, reader);
            Ok(())
        }
        Err(e) => send(
            writer,
            Kind::Error,
            format!("nothing listens on port {port} in the box: {e}").as_bytes(),
        ),
    }
}

type Pipes = (std::fs::File, std::fs::File);

fn spawn_and_stream(req: ExecRequest, reader: &mut UnixStream, writer: &Writer) -> io::Result<()> {
    if req.argv.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "argv is empty"));
    }
    let confinement = Confinement::prepare(req.uid, &req.writable)?;

    // Both helper threads exist before the child does: a box's pids limit counts threads, and
    // a child that forks at once (a fork bomb) must not starve the supervisor of them.
    let (pipes_tx, pipes_rx) = mpsc::channel::<Option<Pipes>>();
    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    let w = writer.clone();
    thread::Builder::new().spawn(move || {
        if let Ok(Some((out, err))) = pipes_rx.recv() {
            pump(out, err, &w);
        }
        let _ = drained_tx.send(());
    })?;
    let (input_tx, input_rx) = mpsc::channel::<Option<(i32, std::fs::File)>>();
    let mut host = match reader.try_clone() {
        Ok(h) => h,
        Err(e) => {
            let _ = pipes_tx.send(None);
            return Err(e);
        }
    };
    let spawned = thread::Builder::new().spawn(move || {
        if let Ok(Some((pid, stdin))) = input_rx.recv() {
            host_input(&mut host, pid, Some(stdin));
        }
    });
    if let Err(e) = spawned {
        let _ = pipes_tx.send(None);
        return Err(e);
    }

    let child = match spawn::spawn(&req.argv, &req.env, &req.cwd, &confinement) {
        Ok(c) => c,
        Err(e) => {
            let _ = pipes_tx.send(None);
            let _ = input_tx.send(None);
            return Err(e);
        }
    };
    let pid = child.pid;
    let _ = pipes_tx.send(Some((child.stdout, child.stderr)));
    let _ = input_tx.send(Some((pid, child.stdin)));
    let r = (|| {
        send(writer, Kind::Started, pid.to_string().as_bytes())?;
        let (status, timed_out) = wait_for(pid, req.timeout_ms)?;
        let _ = drained_rx.recv_timeout(DRAIN_GRACE);
        let exit = WireExit {
            code: status.code(),
            signal: status.signal(),
            timed_out,
        };
        let body = serde_json::to_vec(&exit).map_err(io::Error::other)?;
        send(writer, Kind::Exit, &body)
    })();
    if r.is_err() {
        // Never leave work running that nobody can see or stop.
        // SAFETY: killing the exec's own process group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = spawn::wait(pid);
    }
    r
}

/// Wait for child `pid` (and reap it), killing its group past `timeout_ms`: the timeout is
/// enforced on a pidfd (no watchdog thread), or, where the kernel has no pidfd_open (gVisor),
/// by a watchdog thread. Returns the status and whether the timeout fired.
pub(super) fn wait_for(
    pid: i32,
    timeout_ms: Option<u64>,
) -> io::Result<(std::process::ExitStatus, bool)> {
    match timeout_ms {
        Some(ms) => match wait_or_kill(pid, ms) {
            Ok(t) => Ok((spawn::wait(pid)?, t)),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => wait_with_watchdog(pid, ms),
            Err(e) => Err(e),
        },
        None => Ok((spawn::wait(pid)?, false)),
    }
}

/// Host → process: stdin bytes, EOF, signals. A closed host connection kills the group.
fn host_input(host: &mut UnixStream, pid: i32, mut stdin: Option<std::fs::File>) {
    loop {
        match read_frame(host) {
            Ok((Kind::Stdin, data)) => {
                if let Some(s) = stdin.as_mut() {
                    if s.write_all(&data).is_err() {
                        stdin = None;
                    }
                }
            }
            Ok((Kind::StdinEof, _)) => stdin = None,
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
    }
}

/// Copy both output pipes to the host as frames until both are closed.
fn pump(mut stdout: std::fs::File, mut stderr: std::fs::File, w: &Writer) {
    use std::os::fd::AsRawFd;
    let raw = [stdout.as_raw_fd(), stderr.as_raw_fd()];
    let mut open = [true, true];
    let mut buf = vec![0u8; 64 * 1024];
    while open[0] || open[1] {
        let mut fds = [0usize, 1].map(|i| libc::pollfd {
            fd: if open[i] { raw[i] } else { -1 },
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: poll on two pollfd structs we own.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        for i in 0..2 {
            if !open[i] || fds[i].revents == 0 {
                continue;
            }
            let (n, kind) = if i == 0 {
                (stdout.read(&mut buf), Kind::Stdout)
            } else {
                (stderr.read(&mut buf), Kind::Stderr)
            };
            match n {
                Ok(0) | Err(_) => open[i] = false,
                Ok(n) => {
                    if send(w, kind, &buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Wait for child `pid`; a thread kills its process group if it outlives `ms`. Returns the
/// status and whether the timeout fired.
fn wait_with_watchdog(pid: i32, ms: u64) -> io::Result<(std::process::ExitStatus, bool)> {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = fired.clone();
    let dog = thread::Builder::new().spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) =
            done_rx.recv_timeout(Duration::from_millis(ms))
        {
            f.store(true, std::sync::atomic::Ordering::SeqCst);
            // SAFETY: killing the exec's own process group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    })?;
    let status = spawn::wait(pid);
    drop(done_tx);
    let _ = dog.join();
    Ok((status?, fired.load(std::sync::atomic::Ordering::SeqCst)))
}

/// Wait up to `ms` for process `pid` to exit (without reaping it); kill its group and return
/// true if it did not.
fn wait_or_kill(pid: i32, ms: u64) -> io::Result<bool> {
    // SAFETY: pidfd_open on our own child; the fd is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        let e = io::Error::last_os_error();
        // The box's reaper may have reaped it already: it ended in time.
        if e.raw_os_error() == Some(libc::ESRCH) && super::children::reaped(pid) {
            return Ok(false);
        }
        return Err(e);
    }
    // Opened after the child was reaped, the pid may name another process: then it has ended.
    if super::children::reaped(pid) {
        // SAFETY: closing the pidfd we opened.
        unsafe { libc::close(fd) };
        return Ok(false);
    }
    let deadline = std::time::Instant::now() + Duration::from_millis(ms);
    let expired = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let wait_ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one pollfd we own.
        let r = unsafe { libc::poll(&mut p, 1, wait_ms) };
        if r > 0 {
            break false;
        }
        if r == 0 && left.is_zero() {
            break true;
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break false;
        }
    };
    // SAFETY: closing the pidfd we opened.
    unsafe { libc::close(fd) };
    if expired {
        // SAFETY: killing the exec's own process group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    Ok(expired)
}
