//! `berth shell` against a server behind a TLS terminator (`https://` → `wss://`): a real
//! server, a real native box, and a TLS front the test runs on loopback with a certificate
//! from its own CA, which the CLI trusts through `BERTH_CA_CERT` and only then.

mod common;

use common::{tenant_key, tls_front, Server};
use std::sync::atomic::Ordering;
use std::time::Duration;

async fn shell(
    url: &str,
    token: &str,
    bx: &str,
    ca: Option<&std::path::Path>,
    input: &[u8],
) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.args(["shell", bx])
        .env("BERTH_URL", url)
        .env("BERTH_TOKEN", token)
        .env_remove("BERTH_CA_CERT")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(ca) = ca {
        cmd.env("BERTH_CA_CERT", ca);
    }
    let mut child = cmd.spawn().expect("berth shell");
    let mut stdin = child.stdin.take().expect("stdin");
    // The shell may be gone already (a refused handshake): a failed write is its answer.
    let _ = stdin.write_all(input).await;
    drop(stdin);
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("berth shell ends in time")
        .expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_shell_reaches_a_box_over_wss_through_a_tls_terminator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data")).await;
    let (_, api) = tenant_key(&server.client(), "acme").await;
    let r = api
        .post(
            "/v1/boxes",
            serde_json::json!({"resources": {"memory_mib": 256, "disk_mib": 128, "pids": 128}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let bx = r.json["id"].as_str().expect("id").to_string();
    let backend = server
        .url
        .strip_prefix("http://")
        .expect("http url")
        .to_string();
    let (port, ca, handshakes) = tls_front(dir.path(), backend).await;
    let https = format!("https://127.0.0.1:{port}");

    // Trusting the test CA: a shell in the box, through TLS, with its exit status.
    let out = shell(
        &https,
        &api.token,
        &bx,
        Some(&ca),
        b"echo tls-$((6*7)); tty; exit 3\n",
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("tls-42"), "{stdout} {stderr}");
    assert!(stdout.contains("/dev/pts/"), "{stdout}");
    assert_eq!(out.status.code(), Some(3), "{stdout} {stderr}");
    assert_eq!(handshakes.load(Ordering::SeqCst), 1, "one TLS connection");

    // Without the CA the server's certificate is refused: no shell, a certificate error.
    let out = shell(&https, &api.token, &bx, None, b"echo never-$((1+1))\n").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(!stdout.contains("never-2"), "{stdout}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        1,
        "no handshake completed"
    );

    // A CA file without a certificate is named in the error.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("write");
    let out = shell(&https, &api.token, &bx, Some(&empty), b"").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("BERTH_CA_CERT"), "{stderr}");
    server.stop().await;
}
