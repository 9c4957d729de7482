//! The conformance suite on the Docker backend, with the `runc` runtime (`docker`) and with
//! gVisor's `runsc` (`gvisor`), against the real engine. Needs a running `dockerd` with the
//! `runsc` runtime registered (`scripts/setup` starts one).

use berth_sandbox::conformance::{self, Fixture};
use berth_sandbox::docker::{DockerBackend, DockerConfig};
use berth_sandbox::Sandbox;

struct Env {
    backend: DockerBackend,
    fixture: Fixture,
    _dir: tempfile::TempDir,
}

async fn backend(name: &str, runtime: &str, dir: &std::path::Path) -> DockerBackend {
    DockerBackend::new(DockerConfig {
        name: name.into(),
        runtime: runtime.into(),
        data_dir: dir.to_path_buf(),
        helper: env!("CARGO_BIN_EXE_berth-box-init").into(),
        socket: None,
    })
    .await
    .expect("docker backend (a running dockerd with the runsc runtime)")
}

fn fixture(name: &str) -> Fixture {
    let probe = std::fs::read(env!("CARGO_BIN_EXE_berth-escape-probe")).expect("probe binary");
    Fixture {
        prefix: format!("{name}{}", std::process::id()),
        probe,
    }
}

async fn make(name: &str, runtime: &str) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    Env {
        backend: backend(name, runtime, dir.path()).await,
        fixture: fixture(name),
        _dir: dir,
    }
}

/// One backend per test thread runtime would not share: each test makes its own.
macro_rules! suite {
    ($modname:ident, $name:literal, $runtime:literal) => {
        mod $modname {
            use super::*;

            async fn env() -> Env {
                make($name, $runtime).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn exec_basics() {
                let e = env().await;
                conformance::exec_basics(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn files_and_hostile_paths() {
                let e = env().await;
                conformance::files_and_hostile_paths(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn isolation() {
                let e = env().await;
                conformance::isolation(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn network_and_syscalls() {
                let e = env().await;
                conformance::network_and_syscalls(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn landlock_write_paths() {
                let e = env().await;
                conformance::landlock_write_paths(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn limits() {
                let e = env().await;
                conformance::limits(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn special_files_answer_at_once() {
                let e = env().await;
                conformance::special_files_answer_at_once(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn socket_families_refused() {
                let e = env().await;
                conformance::socket_families_refused(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn x32_syscalls_refused() {
                let e = env().await;
                conformance::x32_syscalls_refused(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kernel_counters_per_box() {
                let e = env().await;
                conformance::kernel_counters_per_box(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn box_identity() {
                let e = env().await;
                conformance::box_identity(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn another_uid_in_its_own_directory() {
                let e = env().await;
                conformance::another_uid_in_its_own_directory(&e.backend, &e.fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn adoption_after_restart() {
                let dir = tempfile::tempdir().expect("tempdir");
                let make = || backend($name, $runtime, dir.path());
                conformance::adoption(make, &fixture($name)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn death_and_destroy() {
                let e = env().await;
                let name = format!("berth-{}-", $name);
                conformance::death_and_destroy(&e.backend, &e.fixture, |id| {
                    // Crash the box from the outside, as an operator or the engine might.
                    let st = std::process::Command::new("docker")
                        .args(["kill", &format!("{name}{id}")])
                        .output()
                        .expect("docker kill");
                    assert!(st.status.success(), "{st:?}");
                })
                .await;
            }
        }
    };
}

suite!(docker, "docker", "runc");

// gVisor (`runsc` through Docker; Debian's 2022-12-19 build): the whole suite. Where it
// differs it says so in its capabilities (no Landlock, the memory limit ends
// the whole box).
suite!(gvisor, "gvisor", "runsc");

#[tokio::test]
async fn capabilities_say_what_is_not_offered() {
    let d = make("docker", "runc").await.backend.capabilities();
    assert!(d.seccomp && d.landlock && !d.user_namespace && d.image_references);
    // A loop-mounted ext4 image per box where the host has loop devices (this one does).
    assert!(d.disk_quota);
}

#[tokio::test]
async fn gvisor_capabilities_say_what_is_not_offered() {
    let g = make("gvisor", "runsc").await.backend.capabilities();
    assert!(g.isolation.contains("gvisor") && g.seccomp);
    assert!(!g.landlock && g.disk_quota && !g.process_oom_kill);
}

/// The uid base a box's container records (the label its adoption reads back).
fn uid_base_of(backend: &str, id: &str) -> u32 {
    let out = std::process::Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{index .Config.Labels \"dev.berth.uid-base\"}}",
            &format!("berth-{backend}-{id}"),
        ])
        .output()
        .expect("docker inspect");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("uid base label: {text:?}"))
}

/// A runc box and a gVisor box (each backend's first) get disjoint host uid ranges, and the
/// agent in each runs as its own range's uid 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_and_gvisor_boxes_get_disjoint_uid_ranges() {
    let d = make("docker", "runc").await;
    let g = make("gvisor", "runsc").await;
    let (di, gi) = (d.fixture.id("uidr"), g.fixture.id("uidr"));
    d.backend
        .create(conformance::config(&di, conformance::small()))
        .await
        .expect("create docker box");
    g.backend
        .create(conformance::config(&gi, conformance::small()))
        .await
        .expect("create gvisor box");
    let (db, gb) = (uid_base_of("docker", &di), uid_base_of("gvisor", &gi));
    let range = berth_sandbox::uids::UID_RANGE;
    assert!(
        db.abs_diff(gb) >= range,
        "docker box at {db:#x} and gvisor box at {gb:#x} share a uid range"
    );
    for (b, id, base) in [(&d.backend, &di, db), (&g.backend, &gi, gb)] {
        let out = conformance::sh(b, id, "id -u").await;
        let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(uid, (base + 1000).to_string(), "{id}");
    }
    d.backend.destroy(&di).await.expect("destroy");
    g.backend.destroy(&gi).await.expect("destroy");
}
