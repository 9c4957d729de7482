//! The conformance suite and native-specific checks, on the real kernel.

use berth_sandbox::conformance::{self, Fixture};
use berth_sandbox::native::{Disks, NativeBackend, NativeConfig};
use berth_sandbox::Sandbox;
use std::sync::OnceLock;

struct Env {
    backend: NativeBackend,
    fixture: Fixture,
    _dir: tempfile::TempDir,
}

fn make_env(disks: Disks) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = NativeBackend::new(NativeConfig {
        data_dir: dir.path().to_path_buf(),
        helper: env!("CARGO_BIN_EXE_berth-box-init").into(),
        pool_size: 2,
        disks,
    })
    .expect("native backend (run as root; btrfs-progs for the shared disk)");
    let probe = std::fs::read(env!("CARGO_BIN_EXE_berth-escape-probe")).expect("probe binary");
    let prefix = match disks {
        Disks::Ext4 => format!("e{}", std::process::id()),
        _ => format!("t{}", std::process::id()),
    };
    Env {
        backend,
        fixture: Fixture { prefix, probe },
        _dir: dir,
    }
}

/// Boxes' disks as subvolumes of one shared btrfs (the default where the host can).
fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| make_env(Disks::Btrfs))
}

/// Boxes' disks as ext4 images on loop devices of their own (the fallback).
fn ext4_env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| make_env(Disks::Ext4))
}

#[tokio::test]
async fn x32_syscalls_refused() {
    conformance::x32_syscalls_refused(&env().backend, &env().fixture).await;
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

/// The zygote only makes boxes: should it die, the boxes it made go on, and the next create
/// starts a new one.
#[tokio::test]
async fn boxes_outlive_their_zygote_and_a_new_one_takes_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = NativeBackend::new(NativeConfig {
        data_dir: dir.path().to_path_buf(),
        helper: env!("CARGO_BIN_EXE_berth-box-init").into(),
        pool_size: 0,
        disks: Default::default(),
    })
    .expect("backend");
    let id = env().fixture.id("zyg-a");
    b.create(conformance::config(&id, conformance::small()))
        .await
        .expect("create");
    let zygote = b.zygote_pid().expect("a zygote made the box");
    // SAFETY: pidfd_open, kill and poll on the zygote this test's backend started.
    let ended = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, zygote as i32, 0) as i32;
        assert!(pidfd >= 0, "pidfd_open");
        libc::kill(zygote as i32, libc::SIGKILL);
        let mut p = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        let n = libc::poll(&mut p, 1, 10_000);
        libc::close(pidfd);
        n == 1
    };
    assert!(ended, "zygote {zygote} still runs");
    let out = conformance::sh(&b, &id, "echo still here").await;
    assert_eq!(out.stdout, b"still here\n");
    assert!(b.exit_watch(&id).expect("watch").borrow().is_none());

    let other = env().fixture.id("zyg-b");
    b.create(conformance::config(&other, conformance::small()))
        .await
        .expect("create after the zygote died");
    assert_ne!(b.zygote_pid(), Some(zygote));
    let out = conformance::sh(&b, &other, "echo fine").await;
    assert_eq!(out.stdout, b"fine\n");
    for i in [&id, &other] {
        b.destroy(i).await.expect("destroy");
    }
}

/// A root of `cat` and what it links to, copied from the host (no shell, nothing else).
fn minimal_rootfs(root: &std::path::Path) {
    let out = std::process::Command::new("ldd")
        .arg("/usr/bin/cat")
        .output()
        .expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let libs = text
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_string);
    for file in std::iter::once("/usr/bin/cat".to_string()).chain(libs) {
        let dest = root.join(file.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&file, &dest).expect("copy");
    }
    std::fs::create_dir_all(root.join("etc")).expect("etc");
}

/// An image root (`Image::Rootfs`): its files are the box's, its secrets are masked, and a
/// secret replaced on the host between two creates is masked in the second box too (the
/// zygote rebuilds a template whose masked files changed instead of reusing one whose mask
/// sits on the replaced file).
#[tokio::test]
async fn an_image_root_with_a_secret_replaced_between_boxes() {
    let b = &env().backend;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("rootfs");
    minimal_rootfs(&root);
    let write = |name: &str, body: &str| {
        let tmp = root.join("etc").join(format!("{name}.new"));
        std::fs::write(&tmp, body).expect("write");
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        std::fs::rename(&tmp, root.join("etc").join(name)).expect("rename");
    };
    write("marker", "from the image\n");
    write("shadow", "secret-one\n");
    let cat = vec![
        "cat".to_string(),
        "/etc/marker".into(),
        "/etc/shadow".into(),
    ];
    let mut cfg = conformance::config(&env().fixture.id("img-a"), conformance::small());
    cfg.image = berth_sandbox::Image::Rootfs(root.clone());
    b.create(cfg.clone()).await.expect("create a");
    let out = conformance::run(b, &cfg.id, cat.clone()).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the image\n");

    // The host replaces the secret (as `passwd` does: a new file renamed over the old).
    write("shadow", "secret-two\n");
    let mut cfg2 = cfg.clone();
    cfg2.id = env().fixture.id("img-b");
    b.create(cfg2.clone()).await.expect("create b");
    let out = conformance::run(b, &cfg2.id, cat).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from the image\n",
        "the replaced secret must be masked in a new box"
    );
    for id in [&cfg.id, &cfg2.id] {
        b.destroy(id).await.expect("destroy");
    }
}

/// More images than the zygote keeps templates for: each box sees its own image and nothing of
/// another's (its mount namespace is a copy of its template's alone), the boxes whose templates
/// were dropped keep working, and an image whose template was dropped gets a new one.
#[tokio::test]
async fn more_images_than_templates_kept() {
    let b = &env().backend;
    let dir = tempfile::tempdir().expect("tempdir");
    let images = berth_sandbox::native::zygote::MAX_TEMPLATES + 1;
    let roots: Vec<_> = (0..images)
        .map(|i| {
            let root = dir.path().join(format!("image-{i}"));
            minimal_rootfs(&root);
            std::fs::write(root.join("etc/marker"), format!("image {i}\n")).expect("marker");
            root
        })
        .collect();
    let mut ids = Vec::new();
    for (i, root) in roots.iter().enumerate() {
        let mut cfg =
            conformance::config(&env().fixture.id(&format!("tpl-{i}")), conformance::small());
        cfg.image = berth_sandbox::Image::Rootfs(root.clone());
        b.create(cfg.clone()).await.expect("create");
        let out = conformance::run(b, &cfg.id, vec!["cat".into(), "/etc/marker".into()]).await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("image {i}\n"));
        let mounts = conformance::run(
            b,
            &cfg.id,
            vec!["cat".into(), "/proc/self/mountinfo".into()],
        )
        .await;
        let mounts = String::from_utf8_lossy(&mounts.stdout).into_owned();
        let name = |r: &std::path::PathBuf| format!("{}/", r.display());
        assert!(
            mounts.contains(&name(root)),
            "box {i} lacks its own image: {mounts}"
        );
        for (j, other) in roots.iter().enumerate().filter(|(j, _)| *j != i) {
            assert!(
                !mounts.contains(&name(other)),
                "box {i} holds image {j}'s mounts: {mounts}"
            );
        }
        ids.push(cfg.id);
    }
    // The first image's template was dropped to make room: its box still runs, and a new box
    // of that image gets a template again.
    for (i, id) in ids.iter().enumerate() {
        let out = conformance::run(b, id, vec!["cat".into(), "/etc/marker".into()]).await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("image {i}\n"));
    }
    let mut cfg = conformance::config(&env().fixture.id("tpl-again"), conformance::small());
    cfg.image = berth_sandbox::Image::Rootfs(roots[0].clone());
    b.create(cfg.clone()).await.expect("create again");
    let out = conformance::run(b, &cfg.id, vec!["cat".into(), "/etc/marker".into()]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "image 0\n");
    ids.push(cfg.id);
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
async fn limits_on_ext4_images() {
    conformance::limits(&ext4_env().backend, &ext4_env().fixture).await;
}

#[tokio::test]
async fn files_and_hostile_paths_on_ext4_images() {
    conformance::files_and_hostile_paths(&ext4_env().backend, &ext4_env().fixture).await;
}

/// On the shared btrfs: each box has its own limit (one full box leaves the others room), a
/// box cannot make a subvolume of its own (it would escape its qgroup), and a destroyed box's
/// space comes back.
#[tokio::test]
async fn shared_disk_limits_are_per_box_and_cannot_be_escaped() {
    use berth_sandbox::conformance::{config, sh, small};
    let (b, f) = (&env().backend, &env().fixture);
    let (full, other) = (f.id("sd-full"), f.id("sd-other"));
    for id in [&full, &other] {
        b.create(config(id, small())).await.expect("create");
    }
    let text = |o: &berth_sandbox::ExecOutput| String::from_utf8_lossy(&o.stdout).into_owned();
    let out = sh(
        b,
        &full,
        "dd if=/dev/zero of=/workspace/big bs=1M count=200 2>&1; echo rc=$?",
    )
    .await;
    assert!(text(&out).contains("Disk quota exceeded"), "{}", text(&out));
    let used = b.stats(&full).await.expect("stats").disk_used_bytes;
    assert!((50 << 20..=64 << 20).contains(&used), "{used}");
    let out = sh(
        b,
        &other,
        "dd if=/dev/zero of=/workspace/half bs=1M count=32 2>&1 && echo wrote",
    )
    .await;
    assert!(text(&out).contains("wrote"), "{}", text(&out));
    // A subvolume made from inside, by any path the box has: refused by the seccomp filter.
    let script = "import fcntl, os\n\
        for p in ('/workspace', '/tmp', '/home/agent'):\n\
        \x20   fd = os.open(p, os.O_RDONLY)\n\
        \x20   a = bytearray(4096); a[8:11] = b'sub'\n\
        \x20   try:\n\
        \x20       fcntl.ioctl(fd, 0x5000940e, a); print(p, 'made')\n\
        \x20   except OSError as e:\n\
        \x20       print(p, 'errno', e.errno)\n";
    let out = conformance::run(
        b,
        &other,
        vec!["python3".into(), "-c".into(), script.into()],
    )
    .await;
    let eperm = format!("errno {}", libc::EPERM);
    assert_eq!(
        text(&out).lines().filter(|l| l.ends_with(&eperm)).count(),
        3,
        "{} {}",
        text(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    // Gone with its box: the same id gets an empty disk.
    b.destroy(&full).await.expect("destroy");
    b.settle().await;
    b.create(config(&full, small()))
        .await
        .expect("create again");
    let out = sh(b, &full, "ls /workspace | wc -l").await;
    assert_eq!(text(&out).trim(), "0");
    assert!(b.stats(&full).await.expect("stats").disk_used_bytes < 1 << 20);
    for id in [&full, &other] {
        b.destroy(id).await.expect("destroy");
    }
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
            disks: Default::default(),
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

#[tokio::test]
async fn special_files_answer_at_once() {
    conformance::special_files_answer_at_once(&env().backend, &env().fixture).await;
}

#[tokio::test]
async fn socket_families_refused() {
    conformance::socket_families_refused(&env().backend, &env().fixture).await;
}

#[tokio::test]
async fn kernel_counters_per_box() {
    conformance::kernel_counters_per_box(&env().backend, &env().fixture).await;
}

#[tokio::test]
async fn box_identity() {
    conformance::box_identity(&env().backend, &env().fixture).await;
}

#[tokio::test]
async fn another_uid_in_its_own_directory() {
    conformance::another_uid_in_its_own_directory(&env().backend, &env().fixture).await;
}
