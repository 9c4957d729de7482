//! Conformance checks of exec: argv, working directory, environment, stdin, exit codes,
//! signals, timeouts and the order of output, as the [`crate::Sandbox`] contract's exec
//! streams promise them.

use super::{config, run, sh, small, text, Fixture};
use crate::{ExecSpec, Sandbox, SandboxError};
use std::time::Duration;

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
