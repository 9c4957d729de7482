//! `berth-client` against a real `berth serve`: typed calls, the server's errors as typed
//! errors, and a session's event stream followed to its end (and resumed from the middle)
//! with multi-byte output intact.

mod common;

use berth_api::{AgentSpec, BoxRef, BoxSpec, CommandAgent, Lifecycle, Resources, SessionSpec};
use common::Server;
use futures::StreamExt;
use std::time::Duration;

const LINES: usize = 200;

async fn follow(c: &berth_client::Client, sid: &str, after: Option<i64>) -> Vec<berth_api::Event> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut out = Vec::new();
        let mut events = std::pin::pin!(c.events(sid, after));
        while let Some(e) = events.next().await {
            out.push(e.expect("event"));
        }
        out
    })
    .await
    .expect("the stream ends with the session")
}

#[tokio::test]
async fn typed_calls_and_a_followed_session() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let c = srv.client().typed();

    assert_eq!(c.health().await.expect("healthz")["status"], "ok");
    assert!(!c.backends().await.expect("backends").items.is_empty());

    // The server's error body, typed.
    let e = c
        .get_session("ses-nope")
        .await
        .expect_err("no such session");
    assert_eq!(e.status(), Some(404));
    assert_eq!(e.code(), Some("not_found"));
    let e = berth_client::Client::new(&srv.url, "wrong-key")
        .list_boxes()
        .await
        .expect_err("a wrong key");
    assert_eq!(e.status(), Some(401));

    let script = format!(
        "i=0; while [ $i -lt {LINES} ]; do echo \"caf\u{e9} $i \u{1f600}\"; i=$((i+1)); done"
    );
    let s = c
        .create_session(&SessionSpec {
            box_ref: BoxRef::Spec(Box::new(BoxSpec {
                lifecycle: Some(Lifecycle::Ephemeral),
                resources: Resources {
                    memory_mib: 128,
                    disk_mib: 32,
                    ..Default::default()
                },
                ..Default::default()
            })),
            agent: AgentSpec::Command(CommandAgent {
                argv: vec!["/bin/sh".into(), "-c".into(), script],
                unknown: Default::default(),
            }),
            pool: None,
            workdir: None,
            prompt: None,
            keep_open: false,
        })
        .await
        .expect("session");
    assert!(c
        .list_sessions()
        .await
        .expect("sessions")
        .items
        .iter()
        .any(|x| x.id == s.id));

    // Followed live from the start until the server ends the stream.
    let all = follow(&c, &s.id, None).await;
    let seqs: Vec<i64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "gapless, once each"
    );
    let last = all.last().expect("events");
    assert_eq!(last.kind, "status");
    assert_eq!(last.data["state"], "stopped", "{:?}", last.data);
    let out: String = all
        .iter()
        .filter(|e| e.kind == "stdout")
        .filter_map(|e| e.data["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for i in 0..LINES {
        let line = format!("caf\u{e9} {i} \u{1f600}");
        assert!(out.contains(&line), "{line:?} missing or mangled");
    }
    assert!(
        !out.contains('\u{fffd}'),
        "a replacement character: a split character"
    );

    // From the middle: exactly the rest.
    let mid = all[all.len() / 2].seq;
    let rest: Vec<i64> = follow(&c, &s.id, Some(mid))
        .await
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        rest,
        ((mid + 1)..=*seqs.last().expect("last")).collect::<Vec<_>>()
    );

    // The same events as the raw one-connection reader sees.
    let raw = srv
        .client()
        .sse(&format!("/v1/sessions/{}/events", s.id), None, usize::MAX)
        .await;
    assert_eq!(
        raw.iter()
            .map(|e| e["seq"].as_i64().expect("seq"))
            .collect::<Vec<_>>(),
        seqs
    );

    let u = c.session_usage(&s.id).await.expect("usage");
    assert_eq!(u.session_id, s.id);
    srv.stop().await;
}
