//! What an idle native box costs the host in tasks: its PID 1, which is also its supervisor,
//! with one thread (no helper waiting beside it, no thread per bridge, no second process), a
//! detached process outliving the exec that started it and reaped by PID 1 when it ends,
//! bridges served by that one thread, and PID 1's death as the box's. Its own test binary: it
//! counts tasks in box cgroups.

use berth_sandbox::conformance::{config, sh, small};
use berth_sandbox::native::cgroup::BoxCgroup;
use berth_sandbox::native::{NativeBackend, NativeConfig};
use berth_sandbox::{BoxExit, Bridge, Sandbox};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Poll `f` every 10 ms until it holds, for at most `secs` seconds.
async fn until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `sleep` started so that it outlives its exec. The exec's process group is killed when it
/// ends, so the exec waits until the process has left the group (its session id is its pid).
const DETACHED_SLEEP: &str = "setsid sh -c 'exec sleep 600' </dev/null >/dev/null 2>&1 & p=$!; \
     while [ \"$(cut -d' ' -f6 /proc/$p/stat)\" != \"$p\" ]; do :; done";

fn comm(pid: u64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_box_is_one_task_and_a_detached_process_outlives_its_exec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = NativeBackend::new(NativeConfig {
        data_dir: dir.path().to_path_buf(),
        helper: env!("CARGO_BIN_EXE_berth-box-init").into(),
        pool_size: 1,
        disks: Default::default(),
    })
    .expect("native backend (run as root)");
    let id = format!("dens{}", std::process::id());
    let mut cfg = config(&id, small());
    // Three bridges to one socket, as the server gives every box.
    cfg.bridges = (0..3)
        .map(|i| Bridge {
            port: 47100 + i,
            socket: "door.sock".into(),
        })
        .collect();
    let info = b.create(cfg).await.expect("create");
    let cg = BoxCgroup::load(&id);

    // Idle: PID 1, the supervisor, with its one thread (no thread per listener), and nothing
    // of the box's on the host besides (the helper that made it has exited).
    let idle = until(10, || cg.counters().pids == 1).await;
    assert!(
        idle,
        "an idle box holds {} tasks: {:?}",
        cg.counters().pids,
        cg.procs()
    );
    let pid1 = b.pid1(&id).expect("pid1") as u64;
    let procs = cg.procs();
    assert_eq!(procs, vec![pid1]);

    // A bridge still answers, served by that one thread, its connection prefaced with the
    // port it was made to.
    let sock = info.run_dir.join("door.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    // The supervisor is the box's root, an unprivileged host uid: it needs write access.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .expect("chmod");
    let host = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut line = [0u8; 5];
        c.read_exact(&mut line).expect("read");
        c.write_all(b"yo\n").expect("write");
        line
    });
    // dash has no /dev/tcp; bash has.
    let out = sh(
        &b,
        &id,
        "bash -c 'exec 3<>/dev/tcp/127.0.0.1/47101 && echo hi >&3 && head -n1 <&3'",
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "yo\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = host.join().expect("host side");
    assert_eq!(
        got[..2],
        47101u16.to_be_bytes(),
        "the port preface: {got:?}"
    );
    assert_eq!(&got[2..], b"hi\n");

    // A process started so that it outlives its exec: still there after the exec's end.
    let out = sh(&b, &id, DETACHED_SLEEP).await;
    assert_eq!(out.exit.code, Some(0));
    let settled = until(10, || {
        let p = cg.procs();
        p.len() == 2 && p.iter().any(|p| comm(*p) == "sleep") && cg.counters().pids == 2
    })
    .await;
    assert!(
        settled,
        "box tasks after the detached start: {} ({:?})",
        cg.counters().pids,
        cg.procs().iter().map(|p| comm(*p)).collect::<Vec<_>>()
    );

    // Its end is reaped by PID 1 (an orphan's status, not an exec's): the box's pids count
    // holds a task until it is reaped, a zombie included.
    let sleeper = cg
        .procs()
        .into_iter()
        .find(|p| comm(*p) == "sleep")
        .expect("sleep");
    // SAFETY: signalling a process of a box this test made.
    unsafe { libc::kill(sleeper as i32, libc::SIGKILL) };
    assert!(
        until(10, || cg.counters().pids == 1).await,
        "the orphan was not reaped: {} tasks",
        cg.counters().pids
    );
    // Exec statuses still reach their execs, beside the orphans' reaping: execs that end at
    // once, four at a time, each with a timeout (its wait opens the child's pidfd, which PID 1
    // may have reaped by then), and one leaving an orphan behind.
    let (backend, box_id) = (&b, id.as_str());
    for round in 0..250 {
        let codes = futures::future::join_all((0..8).map(|i| async move {
            sh(backend, box_id, &format!("exit {}", (round + i) % 5))
                .await
                .exit
                .code
        }))
        .await;
        let want: Vec<_> = (0..8).map(|i| Some((round + i) % 5)).collect();
        assert_eq!(codes, want, "round {round}");
    }
    let out = sh(&b, &id, "sleep 0.1 & exit 7").await;
    assert_eq!(out.exit.code, Some(7));

    // PID 1's death is the box's, the end of every process in it. The box's own root cannot
    // kill it (a PID namespace's init takes no signal it has no handler for from inside).
    let _ = sh(&b, &id, "kill -9 1").await;
    let out = sh(&b, &id, DETACHED_SLEEP).await;
    assert_eq!(
        out.exit.code,
        Some(0),
        "the box outlived its own kill of PID 1"
    );
    assert!(until(10, || cg.counters().pids == 2).await);
    let mut w = b.exit_watch(&id).expect("watch");
    // SAFETY: signalling the PID 1 of a box this test made.
    unsafe { libc::kill(pid1 as i32, libc::SIGKILL) };
    let reason = tokio::time::timeout(Duration::from_secs(10), w.wait_for(|e| e.is_some()))
        .await
        .expect("the box's end noticed in time")
        .expect("watch")
        .clone();
    // Killed, it reported no exit code of its own.
    assert_eq!(reason, Some(BoxExit::Exited { code: -1 }));
    assert!(
        until(10, || cg.procs().is_empty()).await,
        "{:?}",
        cg.procs()
    );
    b.destroy(&id).await.expect("destroy");
    b.settle().await;
    assert!(!cg.exists(), "cgroup left");
}
