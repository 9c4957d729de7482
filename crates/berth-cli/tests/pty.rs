//! Terminals into boxes (`GET /v1/boxes/{id}/pty`, `berth shell`) against a real server with
//! real native boxes: a shell on a real pseudo-terminal inside the box, confined like exec,
//! resizable, ending with its exit status; tenancy, revocation and hostile clients.

mod common;

use common::{exec_sh, tenant_key, Api, Server};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn new_box(api: &Api) -> String {
    let r = api
        .post(
            "/v1/boxes",
            serde_json::json!({"resources": {"memory_mib": 256, "disk_mib": 128, "pids": 128}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    r.json["id"].as_str().expect("id").to_string()
}

fn pty_url(api: &Api, bx: &str, query: &str) -> String {
    format!(
        "{}/v1/boxes/{bx}/pty{query}",
        api.url.replace("http://", "ws://")
    )
}

/// Open a terminal with the bearer header; the handshake's error status if refused.
async fn open(api: &Api, bx: &str, query: &str) -> Result<Ws, u16> {
    let mut req = pty_url(api, bx, query).into_client_request().expect("req");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", api.token).parse().expect("hdr"),
    );
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("terminal handshake: {e}"),
    }
}

async fn type_in(ws: &mut Ws, s: &str) {
    ws.send(Message::Binary(s.as_bytes().to_vec().into()))
        .await
        .expect("send keys");
}

/// Read terminal output until it contains `want` (10 s at most); everything read so far.
async fn read_until(ws: &mut Ws, out: &mut String, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !out.contains(want) {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(Message::Text(t)))) => panic!("control message {t} before {want:?}: {out}"),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("terminal ended before {want:?}: {other:?}; output: {out}"),
            Err(_) => panic!("no {want:?} within 10 s; output: {out}"),
        }
    }
}

/// The exit control message (skipping output), within 10 s.
async fn exit_message(ws: &mut Ws) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(t.as_str()).expect("control json")
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no exit message: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_is_a_confined_shell_on_a_real_pty_that_resizes_and_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let (_, api) = tenant_key(&server.client(), "acme").await;
    let bx = new_box(&api).await;
    let mut ws = open(&api, &bx, "?cols=80&rows=24").await.expect("open");
    let mut out = String::new();

    // `$((…))` is expanded by the shell only: the marker in the output is the command's, not
    // the terminal echoing what was typed.
    type_in(
        &mut ws,
        "echo hi-$((40+2)); tty; echo size-$(stty size)-end\n",
    )
    .await;
    read_until(&mut ws, &mut out, "size-24 80-end").await;
    assert!(out.contains("hi-42"), "{out}");
    let tty_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("/dev/pts/"))
        .unwrap_or_else(|| panic!("no /dev/pts path from tty: {out}"));
    assert!(
        tty_line.trim()["/dev/pts/".len()..]
            .chars()
            .all(|c| c.is_ascii_digit()),
        "{tty_line}"
    );

    // A resize reaches the terminal (and its foreground process group).
    ws.send(Message::Text(
        serde_json::json!({"type": "resize", "cols": 132, "rows": 43})
            .to_string()
            .into(),
    ))
    .await
    .expect("resize");
    type_in(&mut ws, "echo size-$(stty size)-now\n").await;
    read_until(&mut ws, &mut out, "size-43 132-now").await;

    // Confined as exec is: the agent uid, no_new_privs, seccomp filtering, in the box's own
    // namespaces (its hostname is its id).
    type_in(
        &mut ws,
        "echo id-$(id -u)-nnp-$(awk '/^NoNewPrivs/{print $2}' /proc/self/status)-sc-$(awk '/^Seccomp:/{print $2}' /proc/self/status)-host-$(hostname)-x\n",
    )
    .await;
    read_until(
        &mut ws,
        &mut out,
        &format!("id-1000-nnp-1-sc-2-host-{bx}-x"),
    )
    .await;

    // The box's own terminals only: its devpts holds this one terminal (and ptmx).
    type_in(&mut ws, "echo pts-$(ls /dev/pts | tr '\\n' ' ')-x\n").await;
    read_until(&mut ws, &mut out, "pts-").await;
    read_until(&mut ws, &mut out, "-x").await;

    type_in(&mut ws, "exit 7\n").await;
    let exit = exit_message(&mut ws).await;
    assert_eq!(exit["type"], "exit", "{exit}");
    assert_eq!(exit["code"], 7, "{exit}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_shell_runs_a_terminal_from_the_cli_and_exits_with_its_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let (_, api) = tenant_key(&server.client(), "acme").await;
    let bx = new_box(&api).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["shell", &bx])
        .env("BERTH_URL", &server.url)
        .env("BERTH_TOKEN", &api.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("berth shell");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"echo cli-$((2+3)); tty; exit 5\n")
            .await
            .expect("write");
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("berth shell ends in time")
        .expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("cli-5"), "{stdout}");
    assert!(stdout.contains("/dev/pts/"), "{stdout}");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Another tenant's box: refused with the API's message, no terminal.
    let (_, other) = tenant_key(&server.client(), "globex").await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["shell", &bx])
        .env("BERTH_URL", &server.url)
        .env("BERTH_TOKEN", &other.token)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("berth shell");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not found") && stderr.contains("404"),
        "{stderr}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenancy_keys_in_the_subprotocol_and_revocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let admin = server.client();
    let (key_id, api) = tenant_key(&admin, "acme").await;
    let (_, other) = tenant_key(&admin, "globex").await;
    let bx = new_box(&api).await;

    // Another tenant's box does not exist for it; no key, or a wrong one, is 401.
    assert_eq!(open(&other, &bx, "").await.err(), Some(404));
    assert_eq!(
        open(&Api::new(&api.url, "berth_nope"), &bx, "").await.err(),
        Some(401)
    );
    let plain = pty_url(&api, &bx, "").into_client_request().expect("req");
    match tokio_tungstenite::connect_async(plain).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("no key must be refused: {other:?}"),
    }
    // Sizes out of range are refused before any shell starts.
    assert_eq!(open(&api, &bx, "?cols=0").await.err(), Some(400));
    assert_eq!(open(&api, &bx, "?rows=5000").await.err(), Some(400));
    // Not a WebSocket: a JSON error, not a shell.
    let r = api.get(&format!("/v1/boxes/{bx}/pty")).await;
    assert!(r.status == 400 || r.status == 426, "{}", r.status);
    assert!(r.json["error"]["code"].is_string(), "{}", r.json);

    // A browser's way: the key as a subprotocol entry; the server selects `berth.pty` (never
    // the entry holding the key).
    let mut req = pty_url(&api, &bx, "").into_client_request().expect("req");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("berth.pty, berth.key.{}", api.token)
            .parse()
            .expect("hdr"),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.expect("open");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("berth.pty")
    );
    let mut out = String::new();
    type_in(&mut ws, "echo sub-$((1+1))\n").await;
    read_until(&mut ws, &mut out, "sub-2").await;

    // Deleting the key closes its terminal (1008) within a second or two, and the shell ends.
    let r = admin.delete(&format!("/v1/keys/{key_id}")).await;
    assert_eq!(r.status, 204, "{}", r.json);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let code = loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            other => panic!("no close after revocation: {other:?}"),
        }
    };
    assert_eq!(code, Some(1008));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_terminal_clients_hurt_only_themselves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path()).await;
    let admin = server.client();
    let (_, mallory) = tenant_key(&admin, "mallory").await;
    let (_, alice) = tenant_key(&admin, "alice").await;
    let evil_box = new_box(&mallory).await;
    let good_box = new_box(&alice).await;

    // A client that floods its terminal with output and never reads it.
    let mut flood = open(&mallory, &evil_box, "").await.expect("open");
    type_in(&mut flood, "yes flooding-the-terminal\n").await;
    // A client that sends a frame far over the limit: its socket is closed, its shell ended.
    let mut huge = open(&mallory, &evil_box, "").await.expect("open");
    let _ = huge.send(Message::Binary(vec![b'x'; 4 << 20].into())).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, huge.next()).await {
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break,
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("an oversized frame must end the socket"),
        }
    }
    // The box's terminals are bounded: two open (the flood's and one more), two more fit, the
    // fifth is refused (the oversized one's slot came back).
    let mut held = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while held.len() < 3 {
        match open(&mallory, &evil_box, "").await {
            Ok(ws) => held.push(ws),
            // The closed socket's slot is given back as its task ends.
            Err(429) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("terminal {} refused with {s}", held.len() + 2),
        }
    }
    assert_eq!(open(&mallory, &evil_box, "").await.err(), Some(429));

    // Meanwhile another tenant is served as usual: exec and a terminal of its own answer
    // promptly.
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let r = exec_sh(&alice, &good_box, "echo fine", 30).await;
        assert_eq!(r["stdout"], "fine\n");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "exec took {:?}",
            t.elapsed()
        );
    }
    let mut ws = open(&alice, &good_box, "").await.expect("open");
    let mut out = String::new();
    let t = std::time::Instant::now();
    type_in(&mut ws, "echo ok-$((3*3))\n").await;
    read_until(&mut ws, &mut out, "ok-9").await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "echo took {:?}",
        t.elapsed()
    );
    assert!(
        !out.contains("flooding"),
        "another box's output leaked: {out}"
    );

    // Ending the hostile sockets ends their shells and frees the box's slots.
    drop(flood);
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut reopened = loop {
        match open(&mallory, &evil_box, "").await {
            Ok(ws) => break ws,
            Err(429) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("slots not given back: {s}"),
        }
    };
    // No `yes` outlives its terminal.
    out.clear();
    type_in(
        &mut reopened,
        "for i in $(seq 100); do pgrep -x yes >/dev/null || break; sleep 0.1; done; echo yes-left-$(pgrep -xc yes)-x\n",
    )
    .await;
    read_until(&mut reopened, &mut out, "yes-left-0-x").await;
    server.stop().await;
}
