//! The helper's job in a Docker or gVisor box: the container runtime has already built the
//! box, so `__box-init` runs only the supervisor, on the control socket named by
//! [`SUPERVISOR_CTL_ENV`], with the bridges and the process limit the backend set in the
//! container's environment.

use crate::native::supervisor;
use crate::native::Bridge;

/// Set in a container's environment (Docker and gVisor backends), the helper runs only the
/// supervisor: the container runtime has already built the box. Its value is the control
/// socket's path; [`SUPERVISOR_BRIDGES_ENV`] lists the bridges as `port=socket,…`.
pub const SUPERVISOR_CTL_ENV: &str = "BERTH_SUPERVISOR_CTL";
pub const SUPERVISOR_BRIDGES_ENV: &str = "BERTH_SUPERVISOR_BRIDGES";
/// When set, the supervisor holds itself and every process it starts to this many tasks of the
/// box's uid (`RLIMIT_NPROC`, soft and hard; no capability in the box can raise it). For
/// runtimes whose host cgroup cannot count the box's processes (gVisor: a fork bomb there
/// exhausts the *sandbox's* host threads and kills the whole sandbox instead of failing a fork).
pub const SUPERVISOR_NPROC_ENV: &str = "BERTH_SUPERVISOR_NPROC";

/// Supervisor only, inside a box a container runtime made.
pub(super) fn container_supervisor(ctl: std::path::PathBuf) -> ! {
    let mut bridges = Vec::new();
    for item in std::env::var(SUPERVISOR_BRIDGES_ENV)
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
    {
        match item
            .split_once('=')
            .and_then(|(p, s)| Some((p.parse().ok()?, s)))
        {
            Some((port, socket)) => bridges.push(Bridge {
                port,
                socket: socket.to_string(),
            }),
            None => {
                eprintln!("berth-supervisor: bad bridge {item:?}");
                std::process::exit(2)
            }
        }
    }
    if let Some(n) = std::env::var(SUPERVISOR_NPROC_ENV)
        .ok()
        .filter(|v| !v.is_empty())
    {
        let limited = n.parse::<u64>().ok().is_some_and(|n| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NPROC, n, n).is_ok()
        });
        if !limited {
            eprintln!("berth-supervisor: cannot hold the box to {n:?} processes");
            std::process::exit(2)
        }
    }
    let _ = std::fs::remove_file(&ctl);
    match std::os::unix::net::UnixListener::bind(&ctl) {
        Ok(listener) => supervisor::run(listener, bridges),
        Err(e) => {
            eprintln!("berth-supervisor: binding {}: {e}", ctl.display());
            std::process::exit(1)
        }
    }
}
