//! The conformance suite and native-specific checks, on the real kernel.

use berth_sandbox::conformance::{self, Fixture};
use berth_sandbox::native::{NativeBackend, NativeConfig};
use berth_sandbox::Sandbox;
use std::sync::OnceLock;

struct Env {
    backend: NativeBackend,
    fixture: Fixture,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = NativeBackend::new(NativeConfig {
            data_dir: dir.path().to_path_buf(),
            helper: env!("CARGO_BIN_EXE_berth-box-init").into(),
            pool_size: 2,
        })
        .expect("native backend (run as root)");
        let probe = std::fs::read(env!("CARGO_BIN_EXE_berth-escape-probe")).expect("probe binary");
        Env {
            backend,
            fixture: Fixture {
                prefix: format!("t{}", std::process::id()),
                probe,
            },
            _dir: dir,
        }
    })
}

#[tokio::test]
async fn exec_basics() {
    conformance::exec_basics(&env().backend, &env().fixture).await;
}

#[tokio::test]
async fn files_and_hostile_paths() {
    conformance::files_and_hostile_paths(&env().backend, &env().fixture).await;
}

#[tokio::test]
async fn isolation() {
    conformance::isolation(&env().backend, &env().fixture).await;
}

#[tokio::test]
async fn network_and_syscalls() {
    conformance::network_and_syscalls(&env().backend, &env().fixture).await;
}

#[tokio::test]
async fn landlock_write_paths() {
    conformance::landlock_write_paths(&env().backend, &env().fixture).await;
}

#[tokio::test]
async fn limits() {
    conformance::limits(&env().backend, &env().fixture).await;
}

#[tokio::test]
async fn death_and_destroy() {
    let b = &env().backend;
    conformance::death_and_destroy(b, &env().fixture, |id| {
        // Crash the box from the outside: kill its init, as the kernel's OOM killer or an
        // operator might.
        let pid = b.pid1(id).expect("pid");
        // SAFETY: signalling a process this test's backend started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    })
    .await;
}

/// Native boxes die with the server: adoption is refused, and the capabilities say so.
#[tokio::test]
async fn adoption_is_not_offered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let make = || async {
        NativeBackend::new(NativeConfig {
            data_dir: dir.path().to_path_buf(),
            helper: env!("CARGO_BIN_EXE_berth-box-init").into(),
            pool_size: 0,
        })
        .expect("native backend")
    };
    assert!(!env().backend.capabilities().adoption);
    conformance::adoption(make, &env().fixture).await;
}

#[tokio::test]
async fn capabilities_reported() {
    let caps = env().backend.capabilities();
    assert_eq!(caps.name, "native");
    assert!(caps.seccomp && caps.user_namespace && caps.disk_quota);
}
