//! Who reaps the supervisor's children.
//!
//! In a native box the supervisor is the box's PID 1 (one process per idle box, not two): every
//! orphan in the box is reparented to it and must be reaped, while each exec's thread waits for
//! its own child. A `waitpid(pid)` per thread and a `waitpid(-1)` for the orphans would steal
//! each other's statuses, so once [`reap_for_everyone`] is called one reaper (the supervisor's
//! accept loop, woken by SIGCHLD through a signalfd) reaps every child with [`reap_ready`] and
//! hands the statuses of exec children to their waiters; an orphan's is dropped.
//!
//! Ordering: a child is registered ([`start`]) under the same lock the reaper takes to file a
//! status, and the lock is held from before the child exists until it is registered, so a
//! status is never filed before its waiter is known, however soon the child dies. The lock
//! is held over a start's `vfork` (until the child has `exec`ed, ~1 ms): a program whose exec
//! never returns (its interpreter a FIFO nobody writes, say) stalls that box's other execs and
//! its reaping with it, and nothing outside the box.
//!
//! Elsewhere (a container's supervisor, the tests) nothing calls [`reap_for_everyone`] and each
//! waiter reaps its own child with `waitpid(pid)`.

use std::collections::HashMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Condvar, Mutex, OnceLock};

/// Exec children awaited: pid → raw wait status once reaped.
struct Awaited {
    statuses: Mutex<HashMap<i32, Option<i32>>>,
    filed: Condvar,
}

static REAPER: OnceLock<Awaited> = OnceLock::new();

/// From now on this process's children are reaped by [`reap_ready`] only. Called once, by the
/// box's PID 1, before it starts any child.
pub(super) fn reap_for_everyone() {
    let _ = REAPER.set(Awaited {
        statuses: Mutex::new(HashMap::new()),
        filed: Condvar::new(),
    });
}

fn lock(a: &Awaited) -> std::sync::MutexGuard<'_, HashMap<i32, Option<i32>>> {
    // The map stays consistent whatever a panicking holder did: take it back.
    a.statuses.lock().unwrap_or_else(|p| p.into_inner())
}

/// Start a child with `clone` (which returns its pid, or a negative number on failure) and
/// register it to be waited for.
pub(super) fn start(clone: impl FnOnce() -> i32) -> io::Result<i32> {
    let guard = REAPER.get().map(lock);
    let pid = clone();
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some(mut g) = guard {
        g.insert(pid, None);
    }
    Ok(pid)
}

/// Wait for child `pid` (started by [`start`]) to end, and forget it.
pub(super) fn wait(pid: i32) -> io::Result<ExitStatus> {
    let Some(a) = REAPER.get() else {
        return wait_own(pid);
    };
    let mut g = lock(a);
    loop {
        match g.get(&pid) {
            Some(Some(status)) => {
                let status = *status;
                g.remove(&pid);
                return Ok(ExitStatus::from_raw(status));
            }
            Some(None) => g = a.filed.wait(g).unwrap_or_else(|p| p.into_inner()),
            None => return Err(io::Error::from_raw_os_error(libc::ECHILD)),
        }
    }
}

/// Whether child `pid` has already been reaped (so it is no longer there to be opened or
/// signalled by its pid). A child found gone by its pid is found here: its reap and the
/// filing of its status are one step under the lock.
pub(super) fn reaped(pid: i32) -> bool {
    REAPER
        .get()
        .is_some_and(|a| matches!(lock(a).get(&pid), Some(Some(_))))
}

/// Reap every child that has ended, filing the statuses of awaited ones (the reaper's job,
/// after each SIGCHLD).
///
/// Each reap happens under the lock: a child is never seen gone (its pid freed, a pidfd
/// refused) without its status filed, as [`reaped`] tells.
pub(super) fn reap_ready() {
    let reaper = REAPER.get();
    loop {
        let mut guard = reaper.map(lock);
        let mut status = 0;
        // SAFETY: waitpid on any child of ours, with a status slot we own.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if let (Some(a), Some(g)) = (reaper, guard.as_mut()) {
            if let Some(slot) = g.get_mut(&pid) {
                *slot = Some(status);
                a.filed.notify_all();
            }
        }
    }
}

/// `waitpid(pid)`, retried when interrupted.
fn wait_own(pid: i32) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
