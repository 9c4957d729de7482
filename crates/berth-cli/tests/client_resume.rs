//! The real CLI's `berth logs -f` survives its server being killed and restarted on the same
//! address: `berth-client` reconnects with `Last-Event-ID`, and the output has every event
//! once, in order.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// `berth serve` on a fixed address (a restart must come back where the client looks).
async fn serve(data: &Path, addr: &str) -> tokio::process::Child {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--listen", addr, "--data-dir"])
        .arg(data)
        .env("BERTH_LOG", "warn")
        .env_remove("BERTH_URL")
        .env_remove("BERTH_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn berth serve");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("server start timed out")
        .expect("read")
        .expect("server exited before listening");
    assert!(ready.contains(addr), "{ready}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

#[tokio::test]
async fn logs_follow_resumes_across_a_server_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let addr = format!("127.0.0.1:{port}");
    let url = format!("http://{addr}");
    let mut server = serve(dir.path(), &addr).await;
    let admin = std::fs::read_to_string(dir.path().join("admin.key"))
        .expect("admin key")
        .trim()
        .to_string();
    let c = berth_client::Client::new(&url, &admin);
    let s: berth_api::SessionObject = c
        .post(
            "/v1/sessions",
            &serde_json::json!({
                "box": {"resources": {"memory_mib": 128, "disk_mib": 32}},
                // Output, then alive until the server dies.
                "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "seq 1 300; exec cat"]},
            }),
        )
        .await
        .expect("session");

    let mut cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["logs", &s.id, "-f", "--json"])
        .env("BERTH_URL", &url)
        .env("BERTH_TOKEN", &admin)
        .env("BERTH_DATA_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn berth logs");
    let mut out = BufReader::new(cli.stdout.take().expect("stdout")).lines();
    let mut events: Vec<berth_api::Event> = Vec::new();
    // Until the CLI has printed the last line of output.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !events
        .iter()
        .any(|e| e.kind == "stdout" && e.data["text"] == "300")
    {
        let line = tokio::time::timeout_at(deadline, out.next_line())
            .await
            .expect("the CLI printed the output in time")
            .expect("read")
            .expect("the CLI exited early");
        events.push(serde_json::from_str(&line).expect("an event per line"));
    }
    let committed = c.get_session(&s.id).await.expect("session").last_seq;

    server.start_kill().expect("kill -9");
    server.wait().await.expect("wait");
    let server = serve(dir.path(), &addr).await;

    // The CLI reconnects, gets what it missed, and ends with the (interrupted) session.
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = out.next_line().await.expect("read") {
            events.push(serde_json::from_str(&line).expect("an event per line"));
        }
        cli.wait().await.expect("wait")
    })
    .await
    .expect("berth logs -f ended after the restart");
    let mut err = String::new();
    if let Some(mut e) = cli.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut err).await;
    }
    assert!(status.success(), "berth logs failed: {err}");
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=committed).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let after = c.get_session(&s.id).await.expect("session");
    assert_eq!(after.last_seq, committed);
    assert!(after.state.is_terminal(), "{:?}", after.state);
    drop(server);
}
