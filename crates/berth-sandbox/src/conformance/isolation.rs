//! Conformance checks of isolation: the box sees neither host processes, host secrets nor
//! another box, writes only where it may (Landlock included), has per-user kernel counters of
//! its own, and runs its processes under the box's identity (the agent's uid and, for shared
//! boxes, another uid confined to its own directory).

use super::{config, run, sh, small, text, Fixture};
use crate::{ExecSpec, Sandbox};
use std::time::Duration;

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
    // The pattern is split so the search does not find its own command line. `/usr` and
    // `/opt` are the host's read-only layers, the same in every box (gigabytes on a CI host,
    // over a minute for gVisor to read with a cold page cache).
    let (head, tail) = token.split_at(5);
    let out = sh(b, &c, &format!("grep -rl --exclude-dir=proc --exclude-dir=usr --exclude-dir=opt '{head}''{tail}' / 2>/dev/null; echo end")).await;
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
