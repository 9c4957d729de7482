//! The conformance suite: behaviour and isolation checks every [`Sandbox`] backend must pass.
//!
//! Each check is an async function taking the backend under test and a [`Fixture`]; backend
//! test files call them one per `#[tokio::test]`. Checks panic (with a clear message) on
//! failure, so they are meant for tests only. Every isolation check asserts on the effect that
//! the protection exists to prevent, so removing the protection makes it fail.

use crate::{
    BoxConfig, ExecOutput, ExecSpec, FileContent, FsError, Image, Limits, Sandbox, SandboxError,
};
use std::time::Duration;

pub struct Fixture {
    /// Unique prefix for box ids made by this run.
    pub prefix: String,
    /// Bytes of the `berth-escape-probe` binary, copied into boxes.
    pub probe: Vec<u8>,
}

impl Fixture {
    pub fn id(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }
}

pub fn config(id: &str, limits: Limits) -> BoxConfig {
    BoxConfig {
        id: id.to_string(),
        image: Image::Host,
        limits,
        env: vec![],
        bridges: vec![],
    }
}

pub fn small() -> Limits {
    Limits {
        cpus: 1.0,
        memory_mib: 256,
        disk_mib: 64,
        pids: 64,
    }
}

/// Run `argv` in the box (60 s timeout) and collect its output.
pub async fn run<B: Sandbox>(b: &B, id: &str, argv: Vec<String>) -> ExecOutput {
    b.exec(
        id,
        ExecSpec {
            argv,
            timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        },
    )
    .await
    .expect("exec")
    .collect(None, 4 << 20)
    .await
    .expect("collect")
}

pub async fn sh<B: Sandbox>(b: &B, id: &str, script: &str) -> ExecOutput {
    run(b, id, vec!["/bin/sh".into(), "-c".into(), script.into()]).await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn with_probe<B: Sandbox>(b: &B, f: &Fixture, id: &str) {
    b.write_file(id, "probe", f.probe.clone(), 0o755)
        .await
        .expect("copy probe");
}

async fn probe<B: Sandbox>(b: &B, id: &str, args: &[&str]) -> ExecOutput {
    let mut argv = vec!["/workspace/probe".to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    run(b, id, argv).await
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("probe printed no {key}: {out}"))
}

/// Exec basics: argv, cwd, env, stdin, exit codes, signals, timeouts, ordered output.
pub async fn exec_basics<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("exec");
    b.create(config(&id, small())).await.expect("create");
    let out = b
        .exec(
            &id,
            ExecSpec {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "pwd; echo $FOO; cat; id -un; exit 7".into(),
                ],
                cwd: Some("/tmp".into()),
                env: vec![("FOO".into(), "bar baz".into())],
                ..Default::default()
            },
        )
        .await
        .expect("exec")
        .collect(Some(b"from-stdin\n".to_vec()), 1 << 20)
        .await
        .expect("collect");
    // The agent's uid is `agent` in every box (its number on the host may be the box's own).
    assert_eq!(text(&out.stdout), "/tmp\nbar baz\nfrom-stdin\nagent\n");
    assert_eq!(out.exit.code, Some(7));

    let out = sh(b, &id, "seq 1 20000; echo done >&2").await;
    let expected: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        text(&out.stdout),
        expected,
        "stdout arrives whole and in order"
    );
    assert_eq!(text(&out.stderr), "done\n");

    let out = sh(b, &id, "kill -TERM $$").await;
    assert_eq!(out.exit.signal, Some(libc::SIGTERM));
    assert_eq!(out.exit.code, None);

    let t = std::time::Instant::now();
    let out = b
        .exec(
            &id,
            ExecSpec {
                argv: vec!["sleep".into(), "30".into()],
                timeout: Some(Duration::from_millis(300)),
                ..Default::default()
            },
        )
        .await
        .expect("exec")
        .collect(None, 1024)
        .await
        .expect("collect");
    assert!(out.exit.timed_out, "{:?}", out.exit);
    assert_eq!(out.exit.signal, Some(libc::SIGKILL));
    assert!(t.elapsed() < Duration::from_secs(10));

    // Kill through the input channel while the process streams.
    let mut h = b
        .exec(
            &id,
            ExecSpec {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo up; exec sleep 60".into(),
                ],
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    loop {
        match h.events.recv().await.expect("event") {
            crate::ExecEvent::Stdout(b) => {
                assert_eq!(&b[..], b"up\n");
                break;
            }
            crate::ExecEvent::Started { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    h.input
        .send(crate::ExecInput::Signal(libc::SIGKILL))
        .await
        .expect("send");
    let exit = loop {
        match h.events.recv().await.expect("event") {
            crate::ExecEvent::Exit(e) => break e,
            crate::ExecEvent::Failed(m) => panic!("{m}"),
            _ => {}
        }
    };
    assert_eq!(exit.signal, Some(libc::SIGKILL));

    let err = b
        .exec(
            &id,
            ExecSpec {
                argv: vec![],
                ..Default::default()
            },
        )
        .await
        .err();
    assert!(matches!(err, Some(SandboxError::InvalidSpec(_))));
    let err = b
        .exec(
            &id,
            ExecSpec {
                argv: vec!["true".into()],
                uid: Some(0),
                ..Default::default()
            },
        )
        .await
        .err();
    assert!(
        matches!(err, Some(SandboxError::InvalidSpec(_))),
        "uid 0 refused"
    );
    let failed = b
        .exec(
            &id,
            ExecSpec {
                argv: vec!["/no/such/program".into()],
                ..Default::default()
            },
        )
        .await
        .expect("exec")
        .collect(None, 1024)
        .await;
    assert!(
        failed.is_err(),
        "a missing program is an error, not a silent exit"
    );
    // What every process starts with (read by one the supervisor starts directly, not through
    // a shell, which blocks signals around its own children): no capability now or through
    // exec, no new privileges, seccomp on, killable by the box's OOM killer, no signal blocked
    // or ignored (SIGPIPE included). gVisor's status has no SigBlk, SigIgn, CapAmb or
    // NoNewPrivs line.
    let out = run(
        b,
        &id,
        vec![
            "cat".into(),
            "/proc/self/status".into(),
            "/proc/self/oom_score_adj".into(),
        ],
    )
    .await;
    let status = text(&out.stdout);
    let oom_score_adj = status.lines().last().unwrap_or_default();
    assert_eq!(oom_score_adj, "0", "oom_score_adj of a process in the box");
    let zero = "0000000000000000";
    for (field, want, everywhere) in [
        ("CapInh", zero, true),
        ("CapPrm", zero, true),
        ("CapEff", zero, true),
        ("CapBnd", zero, true),
        ("CapAmb", zero, false),
        ("Seccomp", "2", true),
        ("NoNewPrivs", "1", false),
        ("SigBlk", zero, false),
        ("SigIgn", zero, false),
    ] {
        let got = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .map(str::trim);
        match got {
            Some(v) => assert_eq!(v, want, "{field} of a process in the box"),
            None => assert!(!everywhere, "no {field} in {status}"),
        }
    }
    assert_eq!(text(&out.stderr), "");
    b.destroy(&id).await.expect("destroy");
}

/// Files through the backend: round trip, listing, hostile paths, symlinks planted by the box.
pub async fn files_and_hostile_paths<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("files");
    b.create(config(&id, small())).await.expect("create");
    b.write_file(&id, "dir/a.txt", b"hello".to_vec(), 0o644)
        .await
        .expect("write");
    let out = sh(
        b,
        &id,
        "cat /workspace/dir/a.txt; stat -c %U /workspace/dir/a.txt",
    )
    .await;
    assert_eq!(
        text(&out.stdout),
        "helloagent\n",
        "written file visible inside, owned by the agent"
    );
    match b.read_file(&id, "dir").await.expect("list") {
        FileContent::Dir(l) => assert_eq!(
            l.entries
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            vec!["a.txt"]
        ),
        FileContent::File(_) => panic!("expected a listing"),
    }
    let out = sh(
        b,
        &id,
        "ln -s /etc/passwd /workspace/pw; ln -s / /workspace/rootlink; ln -s .. /workspace/up; \
         mkdir -p /workspace/d; ln -s ../../.. /workspace/d/deep; echo inside > /tmp/t",
    )
    .await;
    assert!(out.exit.success(), "{}", text(&out.stderr));
    for p in [
        "pw",
        "rootlink/etc/shadow",
        "up/x",
        "../x",
        "/etc/passwd",
        "d/deep/etc/hostname",
        "dir/../../x",
    ] {
        let r = b.read_file(&id, p).await;
        assert!(
            matches!(r, Err(SandboxError::Fs(FsError::Outside(_)))),
            "read {p}: {r:?}"
        );
    }
    for p in ["up/evil", "rootlink/tmp/evil", "../evil", "d/deep/evil"] {
        let r = b.write_file(&id, p, b"x".to_vec(), 0o644).await;
        assert!(
            matches!(r, Err(SandboxError::Fs(FsError::Outside(_)))),
            "write {p}: {r:?}"
        );
    }
    assert!(matches!(
        b.delete_file(&id, "up/x").await,
        Err(SandboxError::Fs(FsError::Outside(_)))
    ));
    // Writing over the planted symlink replaces the link; the host's file is untouched.
    let before = std::fs::read("/etc/passwd").expect("host passwd");
    b.write_file(&id, "pw", b"replaced".to_vec(), 0o644)
        .await
        .expect("replace link");
    assert_eq!(std::fs::read("/etc/passwd").expect("host passwd"), before);
    assert!(matches!(
        b.read_file(&id, "nope").await,
        Err(SandboxError::Fs(FsError::NotFound(_)))
    ));
    b.delete_file(&id, "dir").await.expect("delete");
    assert!(matches!(
        b.read_file(&id, "dir/a.txt").await,
        Err(SandboxError::Fs(FsError::NotFound(_)))
    ));
    b.destroy(&id).await.expect("destroy");
}

/// The box sees neither host processes, nor host secrets, nor another box, and cannot write
/// outside its writable paths.
pub async fn isolation<B: Sandbox>(b: &B, f: &Fixture) {
    let a = f.id("iso-a");
    let c = f.id("iso-b");
    b.create(config(&a, small())).await.expect("create a");
    b.create(config(&c, small())).await.expect("create b");
    let token = format!("berth-secret-{}", std::process::id());
    b.write_file(&a, "secret.txt", token.clone().into_bytes(), 0o600)
        .await
        .expect("write");

    let me = std::process::id();
    let out = sh(b, &c, "ls /proc | grep -c '^[0-9]'").await;
    let nprocs: u32 = text(&out.stdout).trim().parse().expect("count");
    assert!(nprocs < 10, "box sees {nprocs} processes");
    let out = sh(b, &c, &format!("test -e /proc/{me} && echo SEE-HOST; cat /proc/[0-9]*/cmdline | tr '\\0' ' ' | grep -c 'carg[o]'")).await;
    assert_eq!(
        text(&out.stdout),
        "0\n",
        "host processes visible in the box"
    );
    // The pattern is split so the search does not find its own command line.
    let (head, tail) = token.split_at(5);
    let out = sh(b, &c, &format!("grep -rl --exclude-dir=proc --exclude-dir=usr '{head}''{tail}' / 2>/dev/null; echo end")).await;
    assert_eq!(text(&out.stdout), "end\n", "box b found box a's file");
    let out = sh(b, &c, "ls /root; cat /etc/shadow; cat /etc/gshadow").await;
    assert!(
        text(&out.stderr).contains("No such file"),
        "/root must not exist: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "", "shadow files must read as nothing");
    assert!(
        std::fs::metadata("/etc/shadow")
            .map(|m| m.len() > 0)
            .unwrap_or(false),
        "host has a shadow file to hide"
    );

    let out = sh(b, &c, "for p in /etc/x /usr/x /x /run/berth/x /proc/sys/kernel/hostname; do (echo x > $p) 2>/dev/null && echo WROTE $p; done; echo x > /workspace/ok && echo x > /tmp/ok && echo x > /home/agent/ok && echo fine").await;
    let s = text(&out.stdout);
    assert!(!s.contains("WROTE"), "{s}");
    assert!(s.contains("fine"), "{s} {}", text(&out.stderr));
    b.destroy(&a).await.expect("destroy");
    b.destroy(&c).await.expect("destroy");
}

/// Only loopback inside; a host loopback service is unreachable; escapes and privileged
/// syscalls fail.
pub async fn network_and_syscalls<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("net");
    b.create(config(&id, small())).await.expect("create");
    let out = sh(b, &id, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo routes; tail -n +2 /proc/net/route | wc -l").await;
    assert_eq!(text(&out.stdout), "lo\nroutes\n0\n");
    // A service on the host's loopback must be out of reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let out = sh(
        b,
        &id,
        &format!(
            "(echo hi > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo REACHED || echo refused"
        ),
    )
    .await;
    // `sh` may be dash without /dev/tcp; fall back to bash explicitly.
    let script = format!(
        "(echo hi > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo REACHED || echo refused"
    );
    let out2 = run(b, &id, vec!["bash".into(), "-c".into(), script]).await;
    assert!(!text(&out.stdout).contains("REACHED"));
    assert_eq!(text(&out2.stdout), "refused\n");

    with_probe(b, f, &id).await;
    let out = probe(b, &id, &["escape"]).await;
    let s = text(&out.stdout);
    for k in [
        "mount",
        "umount",
        "ptrace_traceme",
        "ptrace_attach_pid1",
        "init_module",
        "finit_module",
        "clock_settime",
        "setuid0",
        "unshare_user",
        "unshare_net",
        "chroot",
        "sethostname",
        "reboot",
        "bpf",
        "io_uring_setup",
        "keyctl",
        "socket_packet",
        "mknod",
        "perf_event_open",
        "write_etc",
        "write_root",
        "write_run",
        "read_shadow",
        "setpriority_neg",
    ] {
        assert!(
            field(&s, k).starts_with("errno"),
            "{k} succeeded inside the box:\n{s}"
        );
    }
    // The box's init cannot be killed from inside: refused (native: another uid), or, where
    // it runs as the agent's uid (docker), dropped by the kernel (SIGKILL from inside a PID
    // namespace never reaches its init). Either way the box still runs.
    let alive = sh(b, &id, "echo alive").await;
    assert_eq!(
        text(&alive.stdout),
        "alive\n",
        "the box died after kill(1, SIGKILL) from inside ({})",
        field(&s, "kill_pid1")
    );
    assert!(b.exit_watch(&id).expect("watch").borrow().is_none());
    assert_eq!(field(&s, "write_workspace"), "ok");
    // seccomp specifically: these would succeed for an unprivileged process without it.
    assert_eq!(field(&s, "ptrace_traceme"), format!("errno{}", libc::EPERM));
    assert_eq!(field(&s, "unshare_user"), format!("errno{}", libc::EPERM));
    assert_eq!(field(&s, "io_uring_setup"), format!("errno{}", libc::EPERM));
    b.destroy(&id).await.expect("destroy");
}

/// Landlock: a process whose writable list excludes /tmp cannot write there even though the
/// mount is writable.
pub async fn landlock_write_paths<B: Sandbox>(b: &B, f: &Fixture) {
    if !b.capabilities().landlock {
        // Not offered, and reported as such: the backend's own file system view is what
        // limits writes (read-only root, writable binds only).
        eprintln!(
            "conformance: {} offers no Landlock (capabilities.landlock = false)",
            b.capabilities().name
        );
        return;
    }
    let id = f.id("ll");
    b.create(config(&id, small())).await.expect("create");
    let out = b
        .exec(
            &id,
            ExecSpec {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo a > /workspace/ok && echo ws; echo b > /tmp/no && echo TMP".into(),
                ],
                writable: Some(vec!["/workspace".into()]),
                ..Default::default()
            },
        )
        .await
        .expect("exec")
        .collect(None, 4096)
        .await
        .expect("collect");
    assert_eq!(text(&out.stdout), "ws\n", "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    b.destroy(&id).await.expect("destroy");
}

/// pids, memory, CPU and disk limits are enforced by the kernel.
pub async fn limits<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("limits");
    let limits = Limits {
        cpus: 0.25,
        memory_mib: 128,
        disk_mib: 64,
        pids: 32,
    };
    b.create(config(&id, limits)).await.expect("create");
    with_probe(b, f, &id).await;

    // Fork bomb held by pids.
    let out = probe(b, &id, &["forks", "1000"]).await;
    let s = text(&out.stdout);
    let forks: u32 = field(&s, "forks")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("forks");
    assert!(forks < 32, "forked {forks} with pids=32: {s}");
    assert!(s.contains(&format!("errno={}", libc::EAGAIN)), "{s}");

    // Memory bomb OOM-killed and reported (last, where it ends the whole box).
    let process_oom_kill = b.capabilities().process_oom_kill;
    if process_oom_kill {
        let out = probe(b, &id, &["alloc", "1024"]).await;
        assert!(out.exit.oom_killed, "{:?} {}", out.exit, text(&out.stdout));
        assert!(!text(&out.stdout).contains("allocated_all"));
        let st = b.stats(&id).await.expect("stats");
        assert!(st.oom_kills >= 1);
    }
    assert_eq!(
        b.stats(&id).await.expect("stats").memory_limit_bytes,
        128 * 1024 * 1024
    );

    // A spinning process gets its CPU share: 0.25 CPU over ~1.5 s wall.
    let before = b.stats(&id).await.expect("stats").cpu_usage_ns;
    let t = std::time::Instant::now();
    let out = b
        .exec(
            &id,
            ExecSpec {
                argv: vec!["/bin/sh".into(), "-c".into(), "while :; do :; done".into()],
                timeout: Some(Duration::from_millis(1500)),
                ..Default::default()
            },
        )
        .await
        .expect("exec")
        .collect(None, 1024)
        .await
        .expect("collect");
    let wall = t.elapsed().as_nanos() as f64;
    assert!(out.exit.timed_out);
    let used = (b.stats(&id).await.expect("stats").cpu_usage_ns - before) as f64;
    assert!(
        used < 0.5 * wall,
        "used {used} ns of CPU in {wall} ns wall at cpus=0.25"
    );
    assert!(
        used > 0.1 * wall,
        "the spinner barely ran: {used} ns in {wall} ns"
    );

    // Disk fill stops at the quota with ENOSPC; the box keeps working.
    if b.capabilities().disk_quota {
        let out = sh(
            b,
            &id,
            "dd if=/dev/zero of=/workspace/big bs=1M count=200 2>&1; echo rc=$?",
        )
        .await;
        let s = text(&out.stdout);
        assert!(s.contains("No space left"), "{s}");
        assert!(!s.contains("rc=0"), "{s}");
        let st = b.stats(&id).await.expect("stats");
        assert!(st.disk_limit_bytes <= 64 * 1024 * 1024, "{st:?}");
        assert!(st.disk_used_bytes > 50 * 1024 * 1024, "{st:?}");
        let host_write = b.write_file(&id, "more", vec![0u8; 8 << 20], 0o644).await;
        assert!(
            matches!(host_write, Err(SandboxError::Fs(FsError::NoSpace))),
            "{host_write:?}"
        );
        let out = sh(
            b,
            &id,
            "rm /workspace/big && echo x > /workspace/small && cat /workspace/small",
        )
        .await;
        assert_eq!(text(&out.stdout), "x\n");
    } else {
        // Not offered, and reported as such in the capabilities: the box is told its size
        // but the kernel does not hold it to it.
        eprintln!(
            "conformance: {} offers no disk quota (capabilities.disk_quota = false)",
            b.capabilities().name
        );
    }
    if !process_oom_kill {
        // The limit holds the box as a whole: the bomb never gets its gigabyte, and the box
        // ends, reported as killed for memory.
        let mut w = b.exit_watch(&id).expect("watch");
        let spec = ExecSpec {
            argv: vec!["/workspace/probe".into(), "alloc".into(), "1024".into()],
            timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let out = match b.exec(&id, spec).await {
            Ok(h) => h.collect(None, 1 << 16).await.ok(),
            Err(_) => None,
        };
        if let Some(out) = out {
            assert!(!text(&out.stdout).contains("allocated_all"));
        }
        let reason = tokio::time::timeout(Duration::from_secs(20), w.wait_for(|e| e.is_some()))
            .await
            .expect("the box ends in time")
            .expect("watch")
            .clone();
        assert_eq!(reason, Some(crate::BoxExit::OomKilled));
    }
    b.destroy(&id).await.expect("destroy");
}

/// A box whose processes all die is noticed, with the reason; destroy is idempotent.
pub async fn death_and_destroy<B: Sandbox>(b: &B, f: &Fixture, kill_box: impl FnOnce(&str)) {
    let id = f.id("death");
    b.create(config(&id, small())).await.expect("create");
    let mut w = b.exit_watch(&id).expect("watch");
    assert!(w.borrow().is_none());
    kill_box(&id);
    let reason = tokio::time::timeout(Duration::from_secs(10), w.wait_for(|e| e.is_some()))
        .await
        .expect("death noticed in time")
        .expect("watch")
        .clone();
    assert!(
        matches!(reason, Some(crate::BoxExit::Exited { .. })),
        "{reason:?}"
    );
    let r = b
        .exec(
            &id,
            ExecSpec {
                argv: vec!["true".into()],
                ..Default::default()
            },
        )
        .await;
    assert!(
        matches!(r, Err(SandboxError::NotRunning(_))),
        "exec on a dead box: {:?}",
        r.err()
    );
    b.destroy(&id).await.expect("destroy");
    b.destroy(&id).await.expect("destroy twice");
    assert!(matches!(b.exit_watch(&id), Err(SandboxError::NotFound(_))));
    let dup = f.id("dup");
    b.create(config(&dup, small())).await.expect("create");
    assert!(matches!(
        b.create(config(&dup, small())).await,
        Err(SandboxError::Exists(_))
    ));
    assert!(matches!(
        b.create(config("../evil", small())).await,
        Err(SandboxError::InvalidSpec(_))
    ));
    let mut bad = small();
    bad.memory_mib = 1;
    assert!(matches!(
        b.create(config(&f.id("bad"), bad)).await,
        Err(SandboxError::InvalidSpec(_))
    ));
    b.destroy(&dup).await.expect("destroy");
    // An id is free again as soon as destroy returns (a hybrid box is restored under its own
    // id right after it was parked), whatever the backend still releases in the background.
    for round in 0..3 {
        b.create(config(&dup, small()))
            .await
            .unwrap_or_else(|e| panic!("re-create {round} right after destroy: {e}"));
        let out = sh(b, &dup, "echo again").await;
        assert_eq!(text(&out.stdout), "again\n");
        b.destroy(&dup).await.expect("destroy");
    }
}

/// Adoption after a server restart: a box made by one instance of the backend is taken back by
/// a new instance (same name and data directory) with its files, minus the processes the old
/// instance's execs ran; a box that is gone is `NotFound`. `make` builds an instance; the
/// first is dropped without destroying anything, as a killed server would.
pub async fn adoption<B, F, Fut>(make: F, f: &Fixture)
where
    B: Sandbox,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = B>,
{
    let id = f.id("adopt");
    let first = make().await;
    let offered = first.capabilities().adoption;
    first.create(config(&id, small())).await.expect("create");
    if !offered {
        let r = first.adopt(config(&id, small())).await;
        assert!(matches!(r, Err(SandboxError::Unsupported(_))), "{r:?}");
        eprintln!(
            "conformance: {} boxes die with the server (capabilities.adoption = false)",
            first.capabilities().name
        );
        first.destroy(&id).await.expect("destroy");
        return;
    }
    first
        .write_file(&id, "kept.txt", b"still here".to_vec(), 0o644)
        .await
        .expect("write");
    let mut running = first
        .exec(
            &id,
            ExecSpec {
                argv: vec!["sleep".into(), "1000".into()],
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert!(matches!(
        running.events.recv().await,
        Some(crate::ExecEvent::Started { .. })
    ));
    drop(running);
    drop(first);

    let second = make().await;
    assert!(matches!(
        second.adopt(config(&f.id("never-made"), small())).await,
        Err(SandboxError::NotFound(_))
    ));
    second
        .adopt(config(&id, small()))
        .await
        .expect("adopt the running box");
    assert!(matches!(
        second.adopt(config(&id, small())).await,
        Err(SandboxError::Exists(_))
    ));
    let out = sh(&second, &id, "cat /workspace/kept.txt").await;
    assert_eq!(text(&out.stdout), "still here");
    // The old server's exec ended with its stream: its process is gone (killed as the stream
    // closed, which the supervisor does asynchronously; poll with a deadline).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = sh(
            &second,
            &id,
            "pgrep -x sleep >/dev/null && echo left || echo gone",
        )
        .await;
        if text(&out.stdout) == "gone\n" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the old exec's process survived adoption"
        );
        tokio::task::yield_now().await;
    }
    let w = second.exit_watch(&id).expect("watch");
    assert!(w.borrow().is_none(), "adopted box is running");
    second.destroy(&id).await.expect("destroy");
    // Destroyed: nothing left to take back.
    assert!(matches!(
        make().await.adopt(config(&id, small())).await,
        Err(SandboxError::NotFound(_))
    ));
}

/// A FIFO or socket the box makes in its workspace is refused by the file operations at
/// once (never opened for reading, so never waited on), and fifty such requests at once leave
/// another box's file operations fast.
pub async fn special_files_answer_at_once<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("fifo");
    let other = f.id("fifo-other");
    b.create(config(&id, small())).await.expect("create");
    b.create(config(&other, small()))
        .await
        .expect("create other");
    b.write_file(&other, "plain.txt", b"plain".to_vec(), 0o644)
        .await
        .expect("write other");
    let out = sh(
        b,
        &id,
        "mkfifo /workspace/f && python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('/workspace/s')\" && ls -l /workspace",
    )
    .await;
    assert!(out.exit.success(), "{}", text(&out.stderr));
    let quick = Duration::from_secs(5);
    // gVisor keeps FIFOs and sockets inside its own kernel: the host's directory has no such
    // file (NotFound on read, a plain file made on write), and nothing there to wait on.
    let mut fifo_on_host = true;
    for p in ["f", "s"] {
        let r = tokio::time::timeout(quick, b.read_file(&id, p))
            .await
            .unwrap_or_else(|_| panic!("reading {p} hung"));
        let on_host = fs_outcome(&r) != "not_found";
        if p == "f" {
            fifo_on_host = on_host;
        }
        let expected: &[&str] = if on_host {
            &["invalid"]
        } else {
            &["not_found"]
        };
        assert!(expected.contains(&fs_outcome(&r)), "read {p}: {r:?}");
        let r = tokio::time::timeout(quick, b.write_file(&id, p, b"x".to_vec(), 0o644))
            .await
            .unwrap_or_else(|_| panic!("writing {p} hung"));
        let expected: &[&str] = if on_host {
            &["invalid"]
        } else {
            &["ok", "invalid"]
        };
        assert!(expected.contains(&fs_outcome(&r)), "write {p}: {r:?}");
    }
    let on_host = fifo_on_host;
    if on_host {
        // The FIFO is still a FIFO: writing was refused, not done by replacing it.
        let out = sh(b, &id, "test -p /workspace/f && echo fifo").await;
        assert_eq!(text(&out.stdout), "fifo\n");
    }

    let t = std::time::Instant::now();
    let storm = futures::future::join_all((0..50).map(|_| b.read_file(&id, "f")));
    let probe_other = async {
        let t = std::time::Instant::now();
        let r = b.read_file(&other, "plain.txt").await;
        (t.elapsed(), r)
    };
    let (results, (other_took, other_read)) = tokio::join!(storm, probe_other);
    assert!(
        results.iter().all(|r| match fs_outcome(r) {
            "invalid" => true,
            "other" => false,
            _ => !on_host,
        }),
        "{results:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    match other_read.expect("other box's read") {
        FileContent::File(c) => assert_eq!(c, b"plain"),
        FileContent::Dir(_) => panic!("expected a file"),
    }
    assert!(other_took < Duration::from_secs(3), "{other_took:?}");
    b.destroy(&id).await.expect("destroy");
    b.destroy(&other).await.expect("destroy other");
}

fn fs_outcome<T>(r: &crate::Result<T>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(SandboxError::Fs(FsError::Invalid(_))) => "invalid",
        Err(SandboxError::Fs(FsError::NotFound(_))) => "not_found",
        Err(_) => "other",
    }
}

/// Socket families are an allowlist inside a box: `socket` and `socketpair` with anything but
/// `AF_UNIX`, `AF_INET` and `AF_INET6` get EPERM from the seccomp filter (netlink, vsock,
/// packet, key, alg, tipc, rds, xdp, can, bluetooth: without the filter an unprivileged
/// process gets several of these, and the others fail with a different errno).
pub async fn socket_families_refused<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("sockfam");
    b.create(config(&id, small())).await.expect("create");
    let script = "import socket\n\
        fams = [(16, 3), (40, 1), (17, 3), (15, 3), (38, 5), (30, 5), (21, 5), (44, 3), (29, 3), (31, 1), (1, 1), (2, 1), (10, 1)]\n\
        for fam, typ in fams:\n\
        \x20   for call in (socket.socket, socket.socketpair):\n\
        \x20       try:\n\
        \x20           r = call(fam, typ, 0)\n\
        \x20           for s in (r if isinstance(r, tuple) else (r,)): s.close()\n\
        \x20           print(fam, 'ok')\n\
        \x20       except OSError as e:\n\
        \x20           print(fam, 'errno%d' % e.errno)\n";
    let out = run(b, &id, vec!["python3".into(), "-c".into(), script.into()]).await;
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 26, "{stdout} {}", text(&out.stderr));
    let eperm = format!("errno{}", libc::EPERM);
    for line in &lines {
        let (fam, result) = line.split_once(' ').expect("fam result");
        if ["1", "2", "10"].contains(&fam) {
            // Allowed (socketpair of AF_INET is EOPNOTSUPP from the kernel, not the filter).
            assert_ne!(result, eperm, "family {fam} refused: {stdout}");
        } else {
            assert_eq!(result, eperm, "family {fam} not refused: {stdout}");
        }
    }
    assert!(stdout.contains("1 ok"), "AF_UNIX works: {stdout}");
    b.destroy(&id).await.expect("destroy");
}

/// x32 system calls (number | 0x4000_0000) are refused inside a box with EPERM, before any
/// rule: the seccomp rules compare raw x86_64 numbers, so on a kernel with x32 enabled they
/// would be a way around every denial (`unshare`, `bpf`, `io_uring_setup`...). Outside a box
/// the same program gets the pid (x32 enabled) or ENOSYS (disabled); either way, never EPERM.
#[cfg(target_arch = "x86_64")]
pub async fn x32_syscalls_refused<B: Sandbox>(b: &B, f: &Fixture) {
    let script = "import ctypes\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        for nr, arg in [(39, 0), (272, 0x10000000), (425, 0)]:\n\
        \x20   ctypes.set_errno(0)\n\
        \x20   r = libc.syscall(ctypes.c_long(0x40000000 + nr), ctypes.c_long(arg), ctypes.c_long(0))\n\
        \x20   print(nr, r, ctypes.get_errno())\n";
    // getpid only outside: unshare/io_uring_setup on the host would do real things.
    let host_script = script.replace("(272, 0x10000000), (425, 0)", "");
    let host = std::process::Command::new("python3")
        .args(["-c", &host_script])
        .output()
        .expect("python3 on the host");
    let host_out = text(&host.stdout);
    let host_errno: i32 = host_out
        .split_whitespace()
        .nth(2)
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("host probe: {host_out} {}", text(&host.stderr)));
    assert_ne!(host_errno, libc::EPERM, "the host has no seccomp filter");
    let x32_on_host = host_errno == 0;
    let id = f.id("x32");
    b.create(config(&id, small())).await.expect("create");
    let out = run(b, &id, vec!["python3".into(), "-c".into(), script.into()]).await;
    let stdout = text(&out.stdout);
    let eperm = libc::EPERM.to_string();
    let lines: Vec<Vec<&str>> = stdout.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 3, "{stdout} {}", text(&out.stderr));
    for l in &lines {
        assert_eq!(
            (l[1], l[2]),
            ("-1", eperm.as_str()),
            "x32 call {} not refused with EPERM (host kernel x32: {x32_on_host}): {stdout}",
            l[0]
        );
    }
    // The ordinary ABI still works in the box.
    assert_eq!(sh(b, &id, "echo $$").await.exit.code, Some(0));
    b.destroy(&id).await.expect("destroy");
}

/// Per-user kernel counters are the box's own: box A holding every inotify instance it can
/// get leaves box B (and the host's root) able to make one.
pub async fn kernel_counters_per_box<B: Sandbox>(b: &B, f: &Fixture) {
    let a = f.id("ucount-a");
    let c = f.id("ucount-b");
    b.create(config(&a, small())).await.expect("create a");
    b.create(config(&c, small())).await.expect("create b");
    let hog = "import ctypes, sys\n\
        l = ctypes.CDLL(None, use_errno=True)\n\
        n = 0\n\
        while n < 4096:\n\
        \x20   if l.inotify_init1(0) < 0:\n\
        \x20       break\n\
        \x20   n += 1\n\
        print('held', n, ctypes.get_errno(), flush=True)\n\
        sys.stdin.read()\n";
    let mut h = b
        .exec(
            &a,
            ExecSpec {
                argv: vec!["python3".into(), "-c".into(), hog.into()],
                timeout: Some(Duration::from_secs(60)),
                ..Default::default()
            },
        )
        .await
        .expect("exec hog");
    let held = tokio::time::timeout(Duration::from_secs(30), async {
        let mut line = String::new();
        while let Some(ev) = h.events.recv().await {
            match ev {
                crate::ExecEvent::Stdout(d) => {
                    line.push_str(&text(&d));
                    if line.ends_with('\n') {
                        return line;
                    }
                }
                crate::ExecEvent::Exit(e) => panic!("hog ended early: {e:?} {line}"),
                crate::ExecEvent::Failed(m) => panic!("hog failed: {m}"),
                _ => {}
            }
        }
        panic!("hog's stream ended: {line}")
    })
    .await
    .expect("the hog reports within 30 s");
    let n: u32 = held
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{held}"));
    assert!(n >= 1, "box A made no inotify instance: {held}");

    let one = "import ctypes\n\
        l = ctypes.CDLL(None, use_errno=True)\n\
        print('ok' if l.inotify_init1(0) >= 0 else 'errno%d' % ctypes.get_errno())\n";
    let out = run(b, &c, vec!["python3".into(), "-c".into(), one.into()]).await;
    assert_eq!(
        text(&out.stdout),
        "ok\n",
        "box B cannot make an inotify instance while box A holds {held} ({})",
        text(&out.stderr)
    );
    // SAFETY: inotify_init1 has no preconditions; the descriptor is closed right after.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    assert!(
        fd >= 0,
        "the host cannot make an inotify instance while box A holds {held}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: closing the descriptor made above.
    unsafe { libc::close(fd) };
    drop(h);
    b.destroy(&a).await.expect("destroy a");
    b.destroy(&c).await.expect("destroy b");
}

/// The box is called by its id, and the agent's uid is `agent` inside it (`id`, `whoami`,
/// `ls -l`), whatever user of that uid the host has.
pub async fn box_identity<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("ident");
    b.create(config(&id, small())).await.expect("create");
    let out = sh(
        b,
        &id,
        "hostname; id -un; id -gn; whoami; touch /workspace/mine; ls -l /workspace/mine | awk '{print $3, $4}'; echo ~agent",
    )
    .await;
    assert_eq!(
        text(&out.stdout),
        format!("{id}\nagent\nagent\nagent\nagent agent\n/home/agent\n"),
        "{}",
        text(&out.stderr)
    );
    b.destroy(&id).await.expect("destroy");
}

/// What a shared box needs of a backend: a process of another uid (2000) starts in a
/// directory only that uid may enter, writing only beneath it; the agent's uid cannot get in.
pub async fn another_uid_in_its_own_directory<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("uid2000");
    b.create(config(&id, small())).await.expect("create");
    let out = sh(b, &id, "mkdir -p /workspace/s && chmod 1777 /workspace/s").await;
    assert!(out.exit.success(), "{}", text(&out.stderr));
    let as_2000 = |argv: Vec<String>, cwd: Option<String>, writable: Vec<String>| ExecSpec {
        argv,
        cwd,
        uid: Some(2000),
        writable: Some(writable),
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let out = b
        .exec(
            &id,
            as_2000(
                vec![
                    "mkdir".into(),
                    "-m".into(),
                    "700".into(),
                    "/workspace/s/own".into(),
                ],
                None,
                vec!["/workspace/s".into()],
            ),
        )
        .await
        .expect("exec mkdir")
        .collect(None, 1 << 16)
        .await
        .expect("collect");
    assert!(out.exit.success(), "{}", text(&out.stderr));
    let out = b
        .exec(
            &id,
            as_2000(
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "pwd; echo x > f && cat f; echo y > /workspace/s/no".into(),
                ],
                Some("/workspace/s/own".into()),
                vec!["/workspace/s/own".into()],
            ),
        )
        .await
        .expect("exec in its own directory")
        .collect(None, 1 << 16)
        .await
        .expect("collect");
    assert_eq!(
        text(&out.stdout),
        "/workspace/s/own\nx\n",
        "{}",
        text(&out.stderr)
    );
    if b.capabilities().landlock {
        assert!(!out.exit.success(), "wrote outside its writable directory");
    }
    let out = sh(
        b,
        &id,
        "ls /workspace/s/own 2>&1; cat /workspace/s/own/f 2>&1",
    )
    .await;
    assert!(
        text(&out.stdout).contains("Permission denied") && !text(&out.stdout).contains("x\n"),
        "{}",
        text(&out.stdout)
    );
    b.destroy(&id).await.expect("destroy");
}
