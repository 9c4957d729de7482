//! Conformance checks of the resource limits: pids, memory, CPU and disk are enforced by the
//! kernel, not merely reported.

use super::{config, field, probe, sh, text, with_probe, Fixture};
use crate::{ExecSpec, FsError, Limits, Sandbox, SandboxError};
use std::time::Duration;

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

    // Disk fill stops at the quota with ENOSPC (a file system of its own) or EDQUOT (a
    // subvolume's qgroup); the box keeps working.
    if b.capabilities().disk_quota {
        let out = sh(
            b,
            &id,
            "dd if=/dev/zero of=/workspace/big bs=1M count=200 2>&1; echo rc=$?",
        )
        .await;
        let s = text(&out.stdout);
        assert!(
            s.contains("No space left") || s.contains("Disk quota exceeded"),
            "{s}"
        );
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
