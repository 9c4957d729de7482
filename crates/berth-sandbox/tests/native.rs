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

/// Every box has all seven namespaces of its own: neither the host's nor another box's (the
/// zygote makes network namespaces ahead; each goes to one box only).
#[tokio::test]
async fn each_box_has_namespaces_of_its_own() {
    let b = &env().backend;
    let kinds = ["net", "pid", "mnt", "uts", "ipc", "cgroup", "user"];
    let script = "for n in net pid mnt uts ipc cgroup user; do readlink /proc/self/ns/$n; done";
    let ids: Vec<String> = (0..4)
        .map(|i| env().fixture.id(&format!("ns{i}")))
        .collect();
    let mut seen: Vec<Vec<String>> = Vec::new();
    for id in &ids {
        b.create(conformance::config(id, conformance::small()))
            .await
            .expect("create");
        let out = conformance::sh(b, id, script).await;
        let links: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(links.len(), kinds.len(), "{links:?}");
        for (link, kind) in links.iter().zip(kinds) {
            let host = std::fs::read_link(format!("/proc/self/ns/{kind}")).expect("host ns");
            assert_ne!(
                std::path::Path::new(link),
                host,
                "a box shares the host's {kind} namespace"
            );
            for other in &seen {
                assert!(!other.contains(link), "two boxes share {link}");
            }
        }
        seen.push(links);
    }
    for id in &ids {
        b.destroy(id).await.expect("destroy");
    }
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
