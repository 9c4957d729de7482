//! Killing a box's PID 1 at destroy. The server knows PID 1 by its pid, which names the box's
//! process only while it lives: PID 1 is the zygote's child, reaped the moment it ends, and
//! with thousands of boxes on a host whose `pid_max` is 32,768 a pid comes round again soon.
//! So the process is pinned first (a pidfd), checked to be in the box's cgroup, and signalled
//! through the pidfd: a pid that has come to name another process is never signalled.

use super::cgroup::BoxCgroup;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Killed {
    /// SIGKILL sent to the box's PID 1.
    Signalled,
    /// No process has that pid any more (the box has already ended).
    Gone,
    /// The pid names a process outside the box's cgroup: PID 1 ended and its pid was reused.
    NotTheBox,
}

/// SIGKILL the process `pid` if it is in `cg` (killing PID 1 of a PID namespace kills every
/// process in it).
pub fn kill(pid: i32, cg: &BoxCgroup) -> Killed {
    // SAFETY: pidfd_open takes no pointers; the descriptor is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Killed::Gone;
        }
        // No pidfds here (an old kernel): checked, then by pid (a narrow window remains).
        if !cg.procs().contains(&(pid as u64)) {
            return Killed::NotTheBox;
        }
        // SAFETY: signalling a process just seen in the box's cgroup.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        return Killed::Signalled;
    }
    // SAFETY: a descriptor pidfd_open just gave us.
    let fd: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    // The pidfd pins the process the pid named at open; the cgroup read after it says whether
    // that process is the box's (had it ended in between, the signal below finds nothing).
    if !cg.procs().contains(&(pid as u64)) {
        return Killed::NotTheBox;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r == 0 {
        Killed::Signalled
    } else {
        Killed::Gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_outside_the_box_is_not_signalled() {
        // Stands for a process that was given the pid of a box's ended PID 1.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let cg = BoxCgroup::load("pid1-test-no-such-box");
        assert_eq!(kill(other.id() as i32, &cg), Killed::NotTheBox);
        assert!(other.try_wait().expect("wait").is_none(), "killed");
        other.kill().expect("kill");
        other.wait().expect("reap");
        assert_eq!(kill(other.id() as i32, &cg), Killed::Gone);
    }
}
