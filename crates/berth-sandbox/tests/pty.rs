//! Terminal execs (`ExecSpec::tty`) on the native backend and, with a running `dockerd`, the
//! Docker and gVisor backends: a real pseudo-terminal opened inside the box, the process on it
//! confined like any exec, resized on request, its exit status reported.

use berth_sandbox::conformance::{config, small};
use berth_sandbox::native::{NativeBackend, NativeConfig};
use berth_sandbox::{ExecEvent, ExecInput, ExecSpec, Sandbox, TtySize};
use std::time::Duration;

async fn read_until(h: &mut berth_sandbox::ExecHandle, out: &mut String, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !out.contains(want) {
        match tokio::time::timeout_at(deadline, h.events.recv()).await {
            Ok(Some(ExecEvent::Stdout(b))) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(ExecEvent::Started { .. })) => {}
            Ok(other) => panic!("{other:?} before {want:?}; output: {out}"),
            Err(_) => panic!("no {want:?} within 20 s; output: {out}"),
        }
    }
}

/// The checks every backend passes (`nnp_shown`: the kernel reports `NoNewPrivs` in
/// `/proc/self/status`; gVisor's does not).
async fn terminal_checks<B: Sandbox>(b: &B, id: &str, nnp_shown: bool) {
    let mut h = b
        .exec(
            id,
            ExecSpec {
                argv: vec!["/bin/sh".into()],
                env: vec![("PS1".into(), "$ ".into())],
                tty: Some(TtySize {
                    cols: 100,
                    rows: 30,
                }),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    let mut out = String::new();
    let send = |s: &str| ExecInput::Stdin(s.as_bytes().to_vec().into());
    // Output of the command only (the shell expands `$((…))`; the terminal echoes it as typed).
    h.input
        .send(send("echo t-$((1+1)); tty; echo size-$(stty size)-x\n"))
        .await
        .expect("type");
    read_until(&mut h, &mut out, "size-30 100-x").await;
    assert!(out.contains("t-2"), "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");
    // The terminal echoed what was typed: a terminal, not pipes.
    assert!(out.contains("echo t-$((1+1))"), "{out}");

    h.input
        .send(ExecInput::Resize(TtySize { cols: 61, rows: 17 }))
        .await
        .expect("resize");
    h.input
        .send(send("echo size-$(stty size)-y\n"))
        .await
        .expect("type");
    read_until(&mut h, &mut out, "size-17 61-y").await;

    // Confined as any exec: not root, no_new_privs, seccomp on; TIOCSTI (typing into the
    // terminal's input) refused.
    h.input
        .send(send(
            "echo u-$(id -u)-n-$(grep NoNewPrivs /proc/self/status | tr -dc 0-9)-s-$(grep '^Seccomp:' /proc/self/status | tr -dc 0-9)-end-$((6+1))\n",
        ))
        .await
        .expect("type");
    read_until(&mut h, &mut out, "-end-7").await;
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("-end-7"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("u-") && !line.contains("u-0-"), "{line}");
    let nnp = if nnp_shown { "-n-1-" } else { "-n--" };
    assert!(line.contains(nnp) && line.contains("-s-2-end-7"), "{line}");

    // Typing into its own terminal's input queue (TIOCSTI, a way to run commands as whoever
    // reads the terminal next) is refused: berth's seccomp filter (and, on kernels that set
    // `dev.tty.legacy_tiocsti = 0`, the kernel) refuses it on a terminal as anywhere.
    h.input
        .send(send(
            "python3 -c 'import fcntl, termios; fcntl.ioctl(0, termios.TIOCSTI, b\"x\")' 2>&1 | tail -1; echo sti-$((5+5))\n",
        ))
        .await
        .expect("type");
    read_until(&mut h, &mut out, "sti-10").await;
    let refused = out
        .lines()
        .rev()
        .find(|l| l.contains("Error"))
        .unwrap_or_else(|| panic!("TIOCSTI was not refused: {out}"));
    assert!(refused.contains("PermissionError"), "{refused}");
    // ...also with high bits set in the 64-bit register: the kernel reads only the low 32 bits
    // of `cmd`, so a filter comparing all 64 would let this one through (CVE-2019-10063).
    h.input
        .send(send(
            "python3 -c 'import ctypes; l=ctypes.CDLL(None, use_errno=True); c=ctypes.c_char(b\"x\"); r=l.syscall(16, 0, ctypes.c_ulong(0x100005412), ctypes.byref(c)); print(\"hib\", r, ctypes.get_errno(), \"end\")'; echo hib-$((6+6))\n",
        ))
        .await
        .expect("type");
    read_until(&mut h, &mut out, "hib-12").await;
    // The shell's prompt may be drawn before the answer on its line ("$ hib -1 1 end").
    let high = out
        .lines()
        .rev()
        .filter_map(|l| l.find("hib ").map(|i| &l[i..]))
        .find(|l| l.ends_with(" end"))
        .unwrap_or_else(|| panic!("no answer to the high-bits TIOCSTI: {out}"));
    assert_eq!(
        high,
        format!("hib -1 {} end", libc::EPERM),
        "TIOCSTI with high bits set was not refused"
    );

    h.input.send(send("exit 3\n")).await.expect("type");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let exit = loop {
        match tokio::time::timeout_at(deadline, h.events.recv()).await {
            Ok(Some(ExecEvent::Exit(s))) => break s,
            Ok(Some(ExecEvent::Stdout(_))) => {}
            other => panic!("no exit: {other:?}"),
        }
    };
    assert_eq!(exit.code, Some(3));

    // Dropping the stream ends the shell (its process group is killed).
    let mut h = b
        .exec(
            id,
            ExecSpec {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo ready; sleep 1000".into(),
                ],
                tty: Some(TtySize { cols: 80, rows: 24 }),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    let mut out = String::new();
    read_until(&mut h, &mut out, "ready").await;
    drop(h);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let o = berth_sandbox::conformance::sh(b, id, "pgrep -x sleep || true").await;
        if String::from_utf8_lossy(&o.stdout).trim().is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the terminal's process outlived its stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_terminals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = NativeBackend::new(NativeConfig {
        data_dir: dir.path().to_path_buf(),
        helper: env!("CARGO_BIN_EXE_berth-box-init").into(),
        pool_size: 1,
        disks: Default::default(),
    })
    .expect("native backend (run as root)");
    let id = format!("pty{}", std::process::id());
    b.create(config(&id, small())).await.expect("create");
    terminal_checks(&b, &id, true).await;
    // The box's devpts is its own: only its own terminals are there, and an agent process
    // cannot allocate one (Landlock: /dev/pts is not writable to it).
    let o = berth_sandbox::conformance::sh(
        &b,
        &id,
        "ls /dev/pts; python3 -c 'import os; os.open(\"/dev/ptmx\", os.O_RDWR)' 2>&1 | tail -1",
    )
    .await;
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.lines().next() == Some("ptmx"), "{text}");
    assert!(text.contains("PermissionError"), "{text}");
    b.destroy(&id).await.expect("destroy");
}

async fn docker_terminals(name: &str, runtime: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = berth_sandbox::docker::DockerBackend::new(berth_sandbox::docker::DockerConfig {
        name: name.into(),
        runtime: runtime.into(),
        data_dir: dir.path().to_path_buf(),
        helper: env!("CARGO_BIN_EXE_berth-box-init").into(),
        socket: None,
    })
    .await
    .expect("docker backend (a running dockerd with the runsc runtime)");
    let id = format!("pty{name}{}", std::process::id());
    b.create(config(&id, small())).await.expect("create");
    terminal_checks(&b, &id, runtime != "runsc").await;
    b.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_runc_terminals() {
    docker_terminals("docker", "runc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_terminals() {
    docker_terminals("gvisor", "runsc").await;
}
