//! PID 1's life after set-up: SIGCHLD taken through a signalfd, so that PID 1 reaps every
//! child (orphans included) and watches the server's end of the report socket at once; the
//! supervisor's end, or the server's, ends PID 1 and with it every process of the box.

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::io;
use std::os::fd::OwnedFd;

/// SIGCHLD blocked and readable from a signalfd (PID 1 only).
pub(super) struct ChildSignals {
    fd: OwnedFd,
}

impl ChildSignals {
    pub(super) fn new() -> io::Result<ChildSignals> {
        // SAFETY: sigset and signalfd calls on values we own; PID 1 is single-threaded.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(ChildSignals {
                fd: std::os::fd::FromRawFd::from_raw_fd(fd),
            })
        }
    }

    /// In a fork of PID 1: SIGCHLD unblocked again and the descriptor closed.
    pub(super) fn release(self) {
        // SAFETY: as above, on the calling (single) thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

/// PID 1's life after set-up: reap every child (orphans included) until the supervisor ends,
/// returning its exit code (128 + signal when killed); or, should the server's end of the
/// report socket (fd 1) close, return at once — PID 1's end ends every process of the box.
pub(super) fn reap_until_end(worker: Pid, sigchld: &ChildSignals) -> i32 {
    use std::os::fd::AsRawFd;
    loop {
        loop {
            match waitpid(
                Pid::from_raw(-1),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            ) {
                Ok(WaitStatus::Exited(p, c)) if p == worker => return c,
                Ok(WaitStatus::Signaled(p, s, _)) if p == worker => return 128 + s as i32,
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return 1,
            }
        }
        let mut fds = [
            libc::pollfd {
                fd: sigchld.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: 1,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll over two pollfds we own.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return 1;
        }
        if fds[1].revents != 0 {
            // The server writes nothing after the go-ahead: readable means its end is gone.
            return 128 + libc::SIGKILL;
        }
        if fds[0].revents != 0 {
            // Drain the pending notifications (the reaping above finds every child).
            let mut info = [0u8; 128 * 4];
            // SAFETY: reading into a buffer we own from our own signalfd.
            unsafe { libc::read(sigchld.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        }
    }
}
