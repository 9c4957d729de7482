//! Conformance checks of a box's life: a box whose processes all die is noticed with the reason
//! and destroy is idempotent; a box survives a server restart through adoption, and one that
//! is gone is `NotFound`.

use super::{config, sh, small, text, Fixture};
use crate::{ExecSpec, Sandbox, SandboxError};
use std::time::Duration;

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
