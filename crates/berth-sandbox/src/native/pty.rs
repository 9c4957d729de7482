//! Terminal execs in the supervisor: an interactive process on a pseudo-terminal.
//!
//! The terminal is opened *inside* the box, by the supervisor, from the box's own `devpts`
//! instance (native boxes mount one per box; Docker and gVisor give every container its own),
//! so the device, its number and whoever may open it are the box's alone. The process on it
//! is started exactly like any exec ([`spawn::spawn_on_tty`]: same uid, Landlock, seccomp,
//! cgroup and namespaces), as the leader of a new session with the terminal as its
//! controlling terminal. The host only relays bytes.
//!
//! Protocol (one connection, as for any exec; see [`super::protocol`]): after the request the
//! supervisor sends `Started`, the terminal's output as `Stdout` frames, then one `Exit`. The
//! host sends `Stdin` (typed into the terminal), `Resize` and `Signal` frames; a closed
//! connection kills the process group.
//!
//! Both descriptors are close-on-exec from the moment they exist: the supervisor starts other
//! execs concurrently, and a master inherited by one of them could read and type into this
//! terminal. The master is non-blocking: a process that stops reading its terminal holds back
//! the host's input (the connection's buffers fill up), but no supervisor thread outlives the
//! process waiting on it.

use super::confine::Confinement;
use super::protocol::{read_frame, ExecRequest, Kind, WireExit};
use super::spawn;
use super::supervisor::{self, send, Writer, DRAIN_GRACE};
use crate::TtySize;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

/// How often blocked helper threads look at whether the process has ended.
const WAKE_MS: i32 = 100;

/// Run `req` on a new terminal of `size` and stream it over the host connection.
pub(super) fn serve(
    req: ExecRequest,
    size: TtySize,
    reader: &mut UnixStream,
    writer: &Writer,
) -> io::Result<()> {
    if req.argv.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "argv is empty"));
    }
    let confinement = Confinement::prepare(req.uid, &req.writable)?;
    let (master, slave) = open(size, req.uid)?;
    let master = Arc::new(master);
    // `exited`: the process has ended (helpers stop once idle); `stop`: stop now.
    let exited = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));

    // Both helper threads exist before the child does (the box's pids limit counts threads).
    let (pump_tx, pump_rx) = mpsc::channel::<bool>();
    let (drained_tx, drained_rx) = mpsc::channel::<()>();
    {
        let (m, w, e, s) = (master.clone(), writer.clone(), exited.clone(), stop.clone());
        thread::Builder::new().spawn(move || {
            if pump_rx.recv() == Ok(true) {
                pump(&m, &w, &e, &s);
            }
            let _ = drained_tx.send(());
        })?;
    }
    let (input_tx, input_rx) = mpsc::channel::<Option<i32>>();
    let mut host = match reader.try_clone() {
        Ok(h) => h,
        Err(e) => {
            let _ = pump_tx.send(false);
            return Err(e);
        }
    };
    let (m, e) = (master.clone(), exited.clone());
    let spawned = thread::Builder::new().spawn(move || {
        if let Ok(Some(pid)) = input_rx.recv() {
            input(&mut host, pid, &m, &e);
        }
    });
    if let Err(e) = spawned {
        let _ = pump_tx.send(false);
        return Err(e);
    }

    let spawned = spawn::spawn_on_tty(
        &req.argv,
        &req.env,
        &req.cwd,
        &confinement,
        slave.as_raw_fd(),
    );
    // Only the process holds the terminal now: when it (and whatever it started on the
    // terminal) is gone, the master reads EIO.
    drop(slave);
    let pid = match spawned {
        Ok(pid) => pid,
        Err(e) => {
            let _ = pump_tx.send(false);
            let _ = input_tx.send(None);
            return Err(e);
        }
    };
    let _ = input_tx.send(Some(pid));
    let r = (|| {
        send(writer, Kind::Started, pid.to_string().as_bytes())?;
        let _ = pump_tx.send(true);
        let (status, timed_out) = supervisor::wait_for(pid, req.timeout_ms)?;
        exited.store(true, Ordering::SeqCst);
        // Output the process wrote before it ended comes first; a background process that
        // keeps writing to the terminal does not hold the exit back.
        let _ = drained_rx.recv_timeout(DRAIN_GRACE);
        stop.store(true, Ordering::SeqCst);
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
    exited.store(true, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    r
}

/// A new pseudo-terminal of `size` from the box's `/dev/ptmx`: the master (non-blocking) and
/// the slave, both close-on-exec.
fn open(size: TtySize, uid: u32) -> io::Result<(File, OwnedFd)> {
    let no_pty = |e: io::Error| io::Error::new(e.kind(), format!("no pseudo-terminal: {e}"));
    // SAFETY: open of a constant path; the descriptor is owned below.
    let m = unsafe {
        libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if m < 0 {
        return Err(no_pty(io::Error::last_os_error()));
    }
    // SAFETY: `m` is a descriptor we just opened and nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from a pointer to our local.
    if unsafe { libc::ioctl(m, libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(no_pty(io::Error::last_os_error()));
    }
    // The slave through the master (no path lookup); by its number where the kernel has no
    // TIOCGPTPEER.
    // SAFETY: TIOCGPTPEER takes open flags and returns a new descriptor.
    let s = unsafe {
        libc::ioctl(
            m,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    let s = if s >= 0 {
        s
    } else {
        let mut n: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes one unsigned int to our local.
        if unsafe { libc::ioctl(m, libc::TIOCGPTN, &mut n) } < 0 {
            return Err(no_pty(io::Error::last_os_error()));
        }
        let path = std::ffi::CString::new(format!("/dev/pts/{n}"))
            .map_err(|_| io::Error::other("terminal path"))?;
        // SAFETY: open of a NUL-terminated path we own.
        let s = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        if s < 0 {
            return Err(no_pty(io::Error::last_os_error()));
        }
        s
    };
    // SAFETY: `s` is a descriptor we just got and nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    // The user's own terminal, as login makes it. Needs CAP_CHOWN, which a Docker box's
    // supervisor does not hold: there it stays root's, usable through the descriptor alike.
    // SAFETY: fchown of a descriptor we own; `u32::MAX` leaves the group as it is.
    unsafe { libc::fchown(s, uid, u32::MAX) };
    set_size(m, size)?;
    Ok((File::from(master), slave))
}

/// Set the terminal's size; the kernel tells its foreground process group (SIGWINCH).
fn set_size(master: RawFd, size: TtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a pointer to our local.
    if unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Wait up to [`WAKE_MS`] for `events` on `fd`; whether they came.
fn ready(fd: RawFd, events: libc::c_short) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own.
    let r = unsafe { libc::poll(&mut p, 1, WAKE_MS) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(r > 0)
}

/// Terminal output → `Stdout` frames, until the terminal hangs up (every slave descriptor is
/// closed: EIO), the process has ended and the terminal is idle, or `stop`.
fn pump(master: &File, w: &Writer, exited: &AtomicBool, stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader = master;
    while !stop.load(Ordering::SeqCst) {
        match ready(master.as_raw_fd(), libc::POLLIN) {
            Ok(true) => {}
            Ok(false) if exited.load(Ordering::SeqCst) => return,
            Ok(false) => continue,
            Err(_) => return,
        }
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if send(w, Kind::Stdout, &buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// Host → terminal: typed bytes, resizes, signals. A closed host connection kills the group.
fn input(host: &mut UnixStream, pid: i32, master: &File, exited: &AtomicBool) {
    loop {
        match read_frame(host) {
            Ok((Kind::Stdin, data)) => type_in(master, &data, exited),
            Ok((Kind::Resize, data)) => {
                if let Ok(size) = serde_json::from_slice::<TtySize>(&data) {
                    let _ = set_size(master.as_raw_fd(), size);
                }
            }
            Ok((Kind::Signal, data)) => {
                let sig = std::str::from_utf8(&data)
                    .ok()
                    .and_then(|s| s.parse::<i32>().ok())
                    .unwrap_or(libc::SIGKILL);
                if !exited.load(Ordering::SeqCst) {
                    // SAFETY: signalling our own child's process group.
                    unsafe { libc::kill(-pid, sig) };
                }
            }
            Ok(_) => {}
            Err(_) => {
                if !exited.load(Ordering::SeqCst) {
                    // SAFETY: as above; the host is gone, so is the work it asked for.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                return;
            }
        }
    }
}

/// Write `data` to the terminal, waiting while its input queue is full, but not past the
/// process's end (then the rest is dropped: nobody would read it).
fn type_in(master: &File, mut data: &[u8], exited: &AtomicBool) {
    let mut writer = master;
    while !data.is_empty() {
        match writer.write(data) {
            Ok(0) => return,
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if exited.load(Ordering::SeqCst)
                    || ready(master.as_raw_fd(), libc::POLLOUT).is_err()
                {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
