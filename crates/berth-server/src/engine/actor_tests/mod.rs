//! The box and session actors' state machines on the fake backend with paused time: each test
//! runs through minutes of the box's life in milliseconds.
//!
//! Waits are bounded in real time by a watchdog thread, not by tokio timers: under paused
//! time a tokio timeout would be the next timer and fire as soon as the runtime waits on the
//! store's worker thread.

mod world;

use super::*;
use berth_sandbox::fake::FakeExec;
use std::time::Duration;
use world::{bounded, box_until, engine_over, world, FAKE_CLAUDE};

fn spec(lifecycle: Lifecycle, idle_s: Option<u64>, lifetime_s: Option<u64>) -> BoxSpec {
    BoxSpec {
        lifecycle: Some(lifecycle),
        idle_timeout_s: Some(idle_s),
        max_lifetime_s: lifetime_s,
        ..Default::default()
    }
}

fn run(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        cwd: None,
        env: Default::default(),
        stdin: None,
        timeout_s: None,
        model: false,
    }
}

const ARCHIVE: &[u8] = b"the box's workspace, as tar would write it";

#[tokio::test(start_paused = true)]
async fn an_idle_hybrid_box_parks_and_its_next_use_restores_it() {
    let w = world(false, 10).await;
    // tar -c in the box writes the archive; tar -x reads it back (recorded by the fake).
    w.fake.on_exec(
        |argv| argv.iter().any(|a| a == "-cf"),
        FakeExec::stdout(ARCHIVE),
    );
    w.fake.on_program("hello", FakeExec::stdout("hi\n"));
    let b = bounded(
        "create",
        w.engine
            .create_box("t1", spec(Lifecycle::Hybrid, Some(60), None)),
    )
    .await
    .expect("create");
    assert_eq!(b.state, BoxState::Running);
    let t0 = tokio::time::Instant::now();
    let parked = box_until(&w, &b.id, "park", |b| b.state == BoxState::Parked).await;
    // Parked at the idle deadline, not before.
    assert!(
        t0.elapsed() >= Duration::from_secs(60),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(parked.state_reason.as_deref(), Some("idle_timeout"));
    let snap = parked
        .snapshot
        .clone()
        .expect("a parked box records its snapshot");
    assert!(
        !w.fake.holds(&b.id),
        "a parked box holds nothing in its backend"
    );
    assert_eq!(
        w.store
            .get_box(None, &b.id)
            .await
            .expect("read")
            .map(|b| b.state),
        Some(BoxState::Parked),
        "the park is persisted"
    );

    // The next use restores it: a fresh box, the archive unpacked in it, then the exec.
    let out = bounded("exec", w.engine.exec("t1", &b.id, run(&["hello"])))
        .await
        .expect("exec restores the box");
    assert_eq!(out.stdout, "hi\n");
    assert_eq!(w.fake.stdin_of("-xf"), vec![ARCHIVE.to_vec()]);
    let now = w.engine.get_box("t1", &b.id).await.expect("get");
    assert_eq!(now.state, BoxState::Running);
    assert_eq!(
        now.state_reason.as_deref(),
        Some("restored from its snapshot")
    );
    assert!(
        now.snapshot.is_none(),
        "the snapshot is dropped once restored"
    );
    assert!(
        w.engine
            .config
            .snapshots
            .verify(&snap.key, &snap.sha256)
            .await
            .is_err(),
        "the snapshot's object is deleted once restored"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_park_leaves_the_box_running() {
    let w = world(false, 10).await;
    w.fake.on_exec(
        |argv| argv.iter().any(|a| a == "-cf"),
        FakeExec {
            stderr: b"tar: disk on fire".to_vec(),
            code: 2,
            ..Default::default()
        },
    );
    let b = w
        .engine
        .create_box("t1", spec(Lifecycle::Hybrid, Some(60), None))
        .await
        .expect("create");
    let after = box_until(&w, &b.id, "park attempt", |b| {
        b.state_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("park failed"))
    })
    .await;
    assert_eq!(after.state, BoxState::Running);
    assert!(w.fake.holds(&b.id), "the box was not destroyed");
    assert!(after.snapshot.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_box_stops_at_its_lifetime() {
    let w = world(false, 10).await;
    let b = w
        .engine
        .create_box("t1", spec(Lifecycle::Persistent, None, Some(300)))
        .await
        .expect("create");
    let t0 = tokio::time::Instant::now();
    // Activity does not extend a lifetime.
    tokio::time::advance(Duration::from_secs(200)).await;
    bounded("exec", w.engine.exec("t1", &b.id, run(&["true"])))
        .await
        .expect("exec");
    let stopped = box_until(&w, &b.id, "lifetime", |b| b.state == BoxState::Stopped).await;
    assert_eq!(stopped.state_reason.as_deref(), Some("max_lifetime"));
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(300) && waited < Duration::from_secs(301),
        "{waited:?}"
    );
    assert!(!w.fake.holds(&b.id));
}

#[tokio::test(start_paused = true)]
async fn an_idle_persistent_box_stops_and_activity_postpones_it() {
    let w = world(false, 10).await;
    let b = w
        .engine
        .create_box("t1", spec(Lifecycle::Persistent, Some(100), None))
        .await
        .expect("create");
    let t0 = tokio::time::Instant::now();
    tokio::time::advance(Duration::from_secs(90)).await;
    bounded("exec", w.engine.exec("t1", &b.id, run(&["true"])))
        .await
        .expect("exec");
    let stopped = box_until(&w, &b.id, "idle", |b| b.state == BoxState::Stopped).await;
    assert_eq!(stopped.state_reason.as_deref(), Some("idle_timeout"));
    assert!(
        t0.elapsed() >= Duration::from_secs(190),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_failure_during_create_fails_the_box_and_frees_its_place() {
    // One box per tenant: the failed one must not keep the place.
    let w = world(false, 1).await;
    w.fake.set_create_delay(Duration::from_secs(5));
    w.fake.fail_next_create("no room at the inn");
    let e = bounded(
        "create",
        w.engine
            .create_box("t1", spec(Lifecycle::Persistent, None, None)),
    )
    .await
    .expect_err("the create fails");
    assert!(
        matches!(&e, EngineError::Unavailable(m) if m.contains("no room at the inn")),
        "{e:?}"
    );
    let boxes = w.engine.list_boxes("t1").await.expect("list");
    assert_eq!(boxes.len(), 1);
    assert_eq!(boxes[0].state, BoxState::Failed);
    assert!(
        w.engine.box_handle(&boxes[0].id).is_none(),
        "its owner task ended"
    );
    assert!(!w.fake.holds(&boxes[0].id));
    let b = bounded(
        "second create",
        w.engine
            .create_box("t1", spec(Lifecycle::Persistent, None, None)),
    )
    .await
    .expect("the failed box holds no place under the tenant's limit");
    assert_eq!(b.state, BoxState::Running);
}

fn command_session(box_id: &str) -> SessionSpec {
    serde_json::from_value(serde_json::json!({
        "box": box_id,
        "agent": {"kind": "command", "argv": ["fake-agent"]},
    }))
    .expect("session spec")
}

/// A persistent box of tenant `t1` with a command session whose agent echoes its input.
async fn echo_session(w: &world::World) -> (BoxObject, SessionObject) {
    w.fake.on_program("fake-agent", FakeExec::echo());
    let b = w
        .engine
        .create_box("t1", spec(Lifecycle::Persistent, None, None))
        .await
        .expect("create");
    let s = bounded(
        "session",
        w.engine.create_session("t1", command_session(&b.id)),
    )
    .await
    .expect("session");
    (b, s)
}

/// Wait (bounded) until session `id`'s owner task has published a terminal state.
async fn session_ended(w: &world::World, id: &str) {
    let mut rx = w.engine.session_handle(id).map(|h| h.state);
    if let Some(rx) = rx.as_mut() {
        bounded("session end", rx.wait_for(|s| s.state.is_terminal()))
            .await
            .expect("session owner task");
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_outliving_its_box_ends_when_the_box_dies() {
    let w = world(false, 10).await;
    let (b, s) = echo_session(&w).await;
    assert!(!s.state.is_terminal(), "{:?}", s.state);
    w.fake
        .kill(&b.id, berth_sandbox::BoxExit::Exited { code: 137 });
    let dead = box_until(&w, &b.id, "box death", |b| b.state == BoxState::Failed).await;
    assert_eq!(
        dead.state_reason.as_deref(),
        Some("box init exited with code 137")
    );
    session_ended(&w, &s.id).await;
    let ended = w.engine.get_session("t1", &s.id).await.expect("get");
    assert!(ended.state.is_terminal(), "{:?}", ended.state);
    let e = w
        .engine
        .send_message("t1", &s.id, serde_json::json!("hello?"))
        .await
        .expect_err("an ended session takes no message");
    assert!(matches!(e, EngineError::Conflict(_)), "{e:?}");
}

#[tokio::test(start_paused = true)]
async fn a_restarted_server_adopts_the_running_box() {
    let w = world(true, 10).await;
    w.fake.on_program("hello", FakeExec::stdout("still here\n"));
    let b = w
        .engine
        .create_box("t1", spec(Lifecycle::Persistent, None, None))
        .await
        .expect("create");
    // A second server over the same store and backend: the first one "died" without a
    // shutdown (its box still runs in the backend).
    let again = engine_over(w.dir.path(), w.store.clone(), &w.fake, 10);
    bounded("reconcile", again.reconcile())
        .await
        .expect("reconcile");
    let adopted = again.get_box("t1", &b.id).await.expect("get");
    assert_eq!(adopted.state, BoxState::Running);
    assert_eq!(
        adopted.state_reason.as_deref(),
        Some("adopted after a server restart")
    );
    assert!(w.fake.calls().contains(&format!("adopt {}", b.id)));
    assert!(
        !w.fake.calls().contains(&format!("destroy {}", b.id)),
        "an adopted box is not destroyed"
    );
    let out = bounded("exec", again.exec("t1", &b.id, run(&["hello"])))
        .await
        .expect("exec in the adopted box");
    assert_eq!(out.stdout, "still here\n");
}

#[tokio::test(start_paused = true)]
async fn a_restarted_server_stops_boxes_its_backend_cannot_keep() {
    let w = world(false, 10).await;
    let b = w
        .engine
        .create_box("t1", spec(Lifecycle::Persistent, None, None))
        .await
        .expect("create");
    let again = engine_over(w.dir.path(), w.store.clone(), &w.fake, 10);
    bounded("reconcile", again.reconcile())
        .await
        .expect("reconcile");
    let after = again.get_box("t1", &b.id).await.expect("get");
    assert_eq!(after.state, BoxState::Stopped);
    assert_eq!(after.state_reason.as_deref(), Some("server restarted"));
    assert!(!w.fake.holds(&b.id), "the left-over box is destroyed");
}

#[tokio::test(start_paused = true)]
async fn a_park_stops_the_boxs_sessions_and_the_restore_resumes_them() {
    let w = world(false, 10).await;
    w.fake.on_exec(
        |argv| argv.iter().any(|a| a == "-cf"),
        FakeExec::stdout(ARCHIVE),
    );
    w.fake.on_program("fake-agent", FakeExec::echo());
    let b = w
        .engine
        .create_box("t1", spec(Lifecycle::Hybrid, Some(60), None))
        .await
        .expect("create");
    let s = bounded(
        "session",
        w.engine.create_session("t1", command_session(&b.id)),
    )
    .await
    .expect("session");
    let parked = box_until(&w, &b.id, "park", |b| b.state == BoxState::Parked).await;

    assert_eq!(
        parked.snapshot.as_ref().map(|s| s.sessions.clone()),
        Some(vec![s.id.clone()]),
        "the park records the sessions it stopped"
    );
    let stopped = w.engine.get_session("t1", &s.id).await.expect("get");
    assert_eq!(stopped.state, SessionState::Stopped);
    assert_eq!(stopped.state_reason.as_deref(), Some("box parked"));

    // A message to the session restores its box and resumes it, then reaches its agent.
    bounded(
        "message",
        w.engine
            .send_message("t1", &s.id, serde_json::json!("are you there")),
    )
    .await
    .expect("a message to a parked box's session restores and resumes it");
    assert_eq!(
        w.engine.get_box("t1", &b.id).await.expect("get").state,
        BoxState::Running
    );
    let resumed = w.engine.get_session("t1", &s.id).await.expect("get");
    assert!(!resumed.state.is_terminal(), "{:?}", resumed.state);
    let agents = w
        .fake
        .calls()
        .iter()
        .filter(|c| c.contains("fake-agent"))
        .count();
    assert_eq!(agents, 2, "the agent was started again in the restored box");
}

#[tokio::test(start_paused = true)]
async fn deleting_a_box_stops_its_sessions_first() {
    let w = world(false, 10).await;
    let (b, s) = echo_session(&w).await;
    let deleted = bounded("delete", w.engine.delete_box("t1", &b.id))
        .await
        .expect("delete");
    assert_eq!(deleted.state, BoxState::Destroyed);
    let ended = w.engine.get_session("t1", &s.id).await.expect("get");
    assert_eq!(ended.state, SessionState::Stopped);
    assert_eq!(ended.state_reason.as_deref(), Some("box deleted"));
    assert!(!w.fake.holds(&b.id));
}

#[tokio::test(start_paused = true)]
async fn simultaneous_deletes_of_a_box_all_answer_with_the_destroyed_box() {
    let w = world(false, 10).await;
    let (b, _s) = echo_session(&w).await;
    // All four reach the box's owner task before it ends: three find it gone with their
    // command still queued (schemathesis's two workers met this as a 500).
    let (r1, r2, r3, r4) = bounded("deletes", async {
        tokio::join!(
            w.engine.delete_box("t1", &b.id),
            w.engine.delete_box("t1", &b.id),
            w.engine.delete_box("t1", &b.id),
            w.engine.delete_box("t1", &b.id),
        )
    })
    .await;
    for r in [r1, r2, r3, r4] {
        let d = r.expect("every delete succeeds");
        assert_eq!(d.state, BoxState::Destroyed);
    }
    assert!(!w.fake.holds(&b.id));
}

#[tokio::test(start_paused = true)]
async fn a_tenants_quota_follows_its_boxes_states() {
    let w = world(false, 2).await;
    w.fake.on_exec(
        |argv| argv.iter().any(|a| a == "-cf"),
        FakeExec::stdout(ARCHIVE),
    );
    let hybrid = bounded(
        "create",
        w.engine
            .create_box("t1", spec(Lifecycle::Hybrid, Some(60), None)),
    )
    .await
    .expect("create");
    let kept = bounded(
        "create",
        w.engine
            .create_box("t1", spec(Lifecycle::Persistent, None, None)),
    )
    .await
    .expect("create");
    let quota = |r: Result<BoxObject, EngineError>| matches!(r, Err(EngineError::Quota(_)));
    let third = || {
        w.engine
            .create_box("t1", spec(Lifecycle::Persistent, None, None))
    };
    assert!(quota(bounded("create", third()).await), "two boxes run");
    // Another tenant counts apart.
    bounded(
        "create",
        w.engine
            .create_box("t2", spec(Lifecycle::Persistent, None, None)),
    )
    .await
    .expect("another tenant's box");
    // A parked box holds nothing: its place is free.
    box_until(&w, &hybrid.id, "park", |b| b.state == BoxState::Parked).await;
    bounded("create", third())
        .await
        .expect("the parked box's place");
    assert!(
        quota(bounded("create", third()).await),
        "two boxes run again"
    );
    // A deleted box frees its place; its second delete changes nothing.
    for _ in 0..2 {
        bounded("delete", w.engine.delete_box("t1", &kept.id))
            .await
            .expect("delete");
    }
    bounded("create", third())
        .await
        .expect("the deleted box's place");
    assert!(quota(bounded("create", third()).await), "and no more");
    assert_eq!(w.engine.registry.held("t1").boxes, 2);
    assert_eq!(w.engine.registry.held("t2").boxes, 1);
}

#[tokio::test(start_paused = true)]
async fn the_cron_scheduler_fires_on_the_engines_clock() {
    let w = world(false, 10).await;
    w.fake.on_program("fake-agent", FakeExec::echo());
    let b = w
        .engine
        .create_box("t1", spec(Lifecycle::Persistent, None, None))
        .await
        .expect("create");
    // The engine's clock starts at 2023-11-14T22:13:20Z: every 5 minutes is first due at
    // 22:15:00, 100 s on, then at 22:20:00.
    let trigger: TriggerSpec = serde_json::from_value(serde_json::json!({
        "box": b.id,
        "agent": {"kind": "command", "argv": ["fake-agent"]},
        "prompt": "tick {{scheduled_at}}",
        "schedule": "0 */5 * * * *",
        "webhook": false,
    }))
    .expect("trigger spec");
    w.engine
        .create_trigger("t1", trigger)
        .await
        .expect("trigger");
    let t0 = tokio::time::Instant::now();
    tokio::spawn(triggers::scheduler(w.engine.clone()));
    let mut firings = vec![];
    bounded("two firings", async {
        // Polled every 100 ms of paused time, for at most 20 minutes of it.
        for _ in 0..12_000 {
            let n = w
                .engine
                .list_sessions("t1", None)
                .await
                .expect("list")
                .len();
            if n > firings.len() {
                firings.push(t0.elapsed());
            }
            if firings.len() == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("fired {} times in 20 minutes", firings.len());
    })
    .await;
    let near = |d: Duration, s: u64| d >= Duration::from_secs(s) && d < Duration::from_secs(s + 1);
    assert!(near(firings[0], 100), "{firings:?}");
    assert!(near(firings[1], 400), "{firings:?}");
}

#[tokio::test(start_paused = true)]
async fn an_ephemeral_sessions_end_destroys_its_box() {
    let w = world(false, 10).await;
    // The agent works for 30 s, says so and exits on its own.
    w.fake.on_program(
        "fake-agent",
        FakeExec::stdout("done\n")
            .after(Duration::from_secs(30))
            .ignoring_stdin(),
    );
    let spec: SessionSpec = serde_json::from_value(serde_json::json!({
        "box": {},
        "agent": {"kind": "command", "argv": ["fake-agent"]},
    }))
    .expect("session spec");
    let s = bounded("session", w.engine.create_session("t1", spec))
        .await
        .expect("session");
    let b = w.engine.get_box("t1", &s.box_id).await.expect("its box");
    assert_eq!(b.lifecycle, Lifecycle::Ephemeral);
    let gone = box_until(&w, &b.id, "teardown", |b| b.state == BoxState::Destroyed).await;
    assert!(gone.state_reason.is_none(), "{:?}", gone.state_reason);
    assert!(!w.fake.holds(&b.id), "the box is gone from its backend");
    let ended = w.engine.get_session("t1", &s.id).await.expect("get");
    assert!(ended.state.is_terminal(), "{:?}", ended.state);
}

#[tokio::test(start_paused = true)]
async fn a_stop_does_not_hang_on_a_session_stuck_in_the_store() {
    let w = world(false, 10).await;
    let (b, s) = echo_session(&w).await;
    // The database stops answering while the agent has something to record.
    w.gate.set_open(false);
    let engine = w.engine.clone();
    let sid = s.id.clone();
    let message = tokio::spawn(async move {
        engine
            .send_message("t1", &sid, serde_json::json!("hi"))
            .await
    });
    bounded("the session's owner task held at the store", async {
        while w.gate.waiting() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let e = bounded("delete", w.engine.delete_session("t1", &s.id))
        .await
        .expect_err("a session stuck in the store cannot answer a stop");
    assert!(matches!(e, EngineError::Unavailable(_)), "{e:?}");
    // Parking or deleting its box does not hang on it either.
    let stopped = bounded(
        "box sessions",
        w.engine.registry.stop_box_sessions(&b.id, "box deleted"),
    )
    .await;
    assert!(stopped.is_empty(), "{stopped:?}");
    // The database comes back: the queued stops are taken and the session ends.
    w.gate.set_open(true);
    let _ = bounded("message", message).await;
    session_ended(&w, &s.id).await;
    let ended = w.engine.get_session("t1", &s.id).await.expect("get");
    assert_eq!(ended.state, SessionState::Stopped, "{ended:?}");
}

#[tokio::test(start_paused = true)]
async fn an_sdk_client_keeps_its_box_up_and_a_park_ends_its_session_for_good() {
    let w = world(false, 10).await;
    w.fake.on_program(FAKE_CLAUDE, FakeExec::echo());
    let b = w
        .engine
        .create_box("t1", spec(Lifecycle::Hybrid, Some(30), None))
        .await
        .expect("create");
    let sdk: SessionSpec = serde_json::from_value(serde_json::json!({
        "box": b.id,
        "agent": {"kind": "claude", "client": "sdk", "args": []},
    }))
    .expect("spec");
    let s = bounded("session", w.engine.create_session("t1", sdk))
        .await
        .expect("session");
    let relay = w.engine.sdk_relay("t1", &s.id).await.expect("relay");
    let (generation, _) = relay.attach();
    // Ten idle timeouts with a client connected: the box stays up.
    tokio::time::sleep(Duration::from_secs(300)).await;
    let up = w.engine.get_box("t1", &b.id).await.expect("get");
    assert_eq!(up.state, BoxState::Running, "{up:?}");
    // The client goes away: the idle box parks (before the session's 60 s grace) and takes the
    // session with it.
    relay.detach(generation);
    box_until(&w, &b.id, "park", |b| b.state == BoxState::Parked).await;
    let after_park = w.engine.get_session("t1", &s.id).await.expect("get");
    assert!(after_park.state.is_terminal(), "{after_park:?}");
    // Its next use restores the box; the sdk session is not restarted without its client.
    let out = bounded("exec", w.engine.exec("t1", &b.id, run(&["true"])))
        .await
        .expect("exec restores the box");
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    assert!(w.engine.session_handle(&s.id).is_none());
    let ended = w.engine.get_session("t1", &s.id).await.expect("get");
    assert!(ended.state.is_terminal(), "{ended:?}");
    let reason = ended.state_reason.unwrap_or_default();
    assert!(reason.contains("--resume"), "{reason}");
}
