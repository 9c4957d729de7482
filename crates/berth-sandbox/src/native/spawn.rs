//! Starting a confined process from the supervisor without copying the supervisor.
//!
//! `fork` of the multi-threaded supervisor cost ~0.4 ms per exec (page tables of every
//! thread's stack and heap). Like `posix_spawn`, this starts the child with
//! `clone(CLONE_VM | CLONE_VFORK)`: it shares the supervisor's memory and the calling thread
//! sleeps until the child has `exec`ed or died. The child therefore only makes raw system
//! calls on data prepared beforehand ([`Confinement::apply`], `dup2`, `chdir`, `execve`): no
//! allocation, no lock, nothing another supervisor thread could be holding. A failure is
//! written, as an errno, to a slot the parent reads after `clone` returns.

use super::confine::Confinement;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI32, Ordering};

/// A started process and the supervisor's ends of its standard streams.
pub struct Spawned {
    pub pid: i32,
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
}

/// Everything the child needs, prepared (allocated) by the parent.
struct ChildArgs<'a> {
    /// Paths to `execve` in turn (a `PATH` search is done by trying each).
    candidates: &'a [CString],
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    cwd: &'a CStr,
    /// stdin read end, stdout write end, stderr write end (or a terminal, three times).
    fds: [RawFd; 3],
    /// Make `fds[0]` the controlling terminal (after the new session starts).
    ctty: bool,
    confinement: &'a Confinement,
    /// 0 until the child fails; then the errno of the failing step.
    errno: AtomicI32,
}

const CHILD_STACK: usize = 64 * 1024;

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in argument"))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Start `argv` with exactly `env`, in `cwd`, confined. A program name without `/` is looked
/// up in the `PATH` of `env`, as `execvp` does.
pub fn spawn(
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    confinement: &Confinement,
) -> io::Result<Spawned> {
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let fds = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let pid = start(argv, env, cwd, confinement, fds, false)?;
    drop((in_r, out_w, err_w));
    Ok(Spawned {
        pid,
        stdin: File::from(in_w),
        stdout: File::from(out_r),
        stderr: File::from(err_r),
    })
}

/// Like [`spawn`], with the terminal `tty` (a pseudo-terminal's slave end, close-on-exec) as
/// its standard streams and its controlling terminal (the child is a new session's leader).
/// Returns the child's pid; the caller keeps (and should then close) its `tty`.
pub fn spawn_on_tty(
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    confinement: &Confinement,
    tty: RawFd,
) -> io::Result<i32> {
    start(argv, env, cwd, confinement, [tty; 3], true)
}

fn start(
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    confinement: &Confinement,
    fds: [RawFd; 3],
    ctty: bool,
) -> io::Result<i32> {
    let prog = argv
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "argv is empty"))?;
    let candidates: Vec<CString> = if prog.contains('/') {
        vec![cstring(prog.as_bytes())?]
    } else {
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or(super::DEFAULT_PATH);
        std::env::split_paths(path)
            .map(|d| cstring(d.join(prog).as_os_str().as_bytes()))
            .collect::<io::Result<_>>()?
    };
    let argv_c: Vec<CString> = argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<_>>()?;
    let env_c: Vec<CString> = env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
        .collect::<io::Result<_>>()?;
    let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let (argv_p, envp_p) = (ptrs(&argv_c), ptrs(&env_c));
    let cwd_c = cstring(cwd.as_bytes())?;
    let args = ChildArgs {
        candidates: &candidates,
        argv: &argv_p,
        envp: &envp_p,
        cwd: &cwd_c,
        fds,
        ctty,
        confinement,
        errno: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    let top = stack.as_mut_ptr().wrapping_add(CHILD_STACK) as usize & !15;
    // SAFETY: the stack grows down from its (16-byte aligned) top; the child only reads `args`
    // (alive until clone returns: CLONE_VFORK) and writes its atomic errno slot.
    let pid = super::children::start(|| unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &args as *const ChildArgs as *mut libc::c_void,
        )
    })?;
    let errno = args.errno.load(Ordering::SeqCst);
    if errno != 0 {
        // It has exited: reap it.
        let _ = wait(pid);
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok(pid)
}

/// Wait for child `pid` to end (and reap it, or take its status from the box's reaper).
pub fn wait(pid: i32) -> io::Result<std::process::ExitStatus> {
    super::children::wait(pid)
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the parent's ChildArgs, alive while the parent waits for us.
    let args = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: raw system calls only; see the module docs.
    let errno = unsafe { child_steps(args) };
    args.errno.store(errno.max(1), Ordering::SeqCst);
    // SAFETY: leaving without running any of the parent's exit handlers.
    unsafe { libc::_exit(127) }
}

/// Returns only on failure, with the errno.
///
/// # Safety
/// Runs in the vfork-style child: raw system calls only.
unsafe fn child_steps(a: &ChildArgs) -> i32 {
    // SAFETY: as the function's contract.
    unsafe {
        let errno = || *libc::__errno_location();
        // Every signal at its default, as a fresh program expects: the supervisor ignores
        // SIGPIPE (Rust's runtime does) and may have inherited other ignored signals, which
        // survive exec. Raw rt_sigaction: glibc refuses the real-time signals it uses itself.
        // An all-zero kernel sigaction is SIG_DFL, no flags, empty mask on every architecture.
        let dfl = [0u64; 4];
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(libc::SYS_rt_sigaction, sig, dfl.as_ptr(), 0usize, 8usize);
            }
        }
        // The signal mask of the calling thread is inherited: empty it.
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        for (i, fd) in a.fds.iter().enumerate() {
            // dup2 onto 0/1/2 clears close-on-exec there; the originals close at exec.
            if libc::dup2(*fd, i as i32) < 0 {
                return errno();
            }
        }
        if let Err(e) = a.confinement.apply() {
            return e;
        }
        // A session leader (apply started the session) without a terminal takes its own.
        if a.ctty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return errno();
        }
        // As the process's own user: the supervisor may lack the right to enter a directory
        // only that user may (no CAP_DAC_OVERRIDE in a Docker box), and should not lend it.
        if libc::chdir(a.cwd.as_ptr()) < 0 {
            return errno();
        }
        // Like execvp: the first candidate that exists and may be run; EACCES only if no other
        // candidate fared better.
        let mut result = libc::ENOENT;
        for c in a.candidates {
            libc::execve(c.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr());
            match errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => result = libc::EACCES,
                e => return e,
            }
        }
        result
    }
}
