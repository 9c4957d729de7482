//! SIGCHLD for the box's PID 1, taken through a signalfd: PID 1, once it is the supervisor,
//! polls it beside its sockets and reaps every child of the box, orphans included
//! ([`crate::native::children`]).

use std::io;
use std::os::fd::OwnedFd;

/// SIGCHLD blocked and readable from a signalfd (PID 1 only).
pub(super) struct ChildSignals {
    fd: OwnedFd,
}

impl ChildSignals {
    /// Blocks SIGCHLD in the calling thread, and so in every thread it starts afterwards.
    pub(super) fn new() -> io::Result<ChildSignals> {
        // SAFETY: sigset and signalfd calls on values we own; PID 1 is single-threaded here.
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

    pub(super) fn into_fd(self) -> OwnedFd {
        self.fd
    }
}
