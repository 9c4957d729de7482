//! Parks, restores and artifacts through a real S3-protocol server (moto's, from the test
//! venv `scripts/test` prepares), reached through a loopback relay the test can cut: the object
//! store unreachable during a park (the box keeps running, saying why) and during a restore
//! (the box stays parked, saying why, and restores once the store is back); and the store over
//! HTTPS with a CA of the test's own.

mod common;

use common::{tls_front, Api, Server};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

const BUCKET: &str = "berth-test";
const PREFIX: &str = "install-a";

/// moto's S3 server on a free loopback port, killed on drop.
struct Moto {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl Moto {
    async fn start() -> Moto {
        let venv =
            std::env::var("BERTH_TEST_VENV").unwrap_or_else(|_| "/opt/berth/test-venv".into());
        let bin = PathBuf::from(venv).join("bin/moto_server");
        assert!(
            bin.exists(),
            "{} missing (scripts/test installs moto[server] into the test venv)",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let child = tokio::process::Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("moto_server");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        // Create the bucket (moto takes unsigned requests), which also proves it is up.
        loop {
            if let Ok(r) = http.put(format!("http://{addr}/{BUCKET}")).send().await {
                assert!(r.status().is_success(), "create bucket: {}", r.status());
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "moto did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Moto { child, addr }
    }

    /// Keys under `prefix` in the bucket (moto's ListObjectsV2, unsigned).
    async fn keys(&self, prefix: &str) -> Vec<String> {
        let body = reqwest::Client::new()
            .get(format!(
                "http://{}/{BUCKET}?list-type=2&prefix={prefix}",
                self.addr
            ))
            .send()
            .await
            .expect("list")
            .text()
            .await
            .expect("body");
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A loopback relay to moto that the test can cut (connections refused, open ones dropped)
/// and restore on the same port.
struct Relay {
    addr: SocketAddr,
    upstream: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut r = Relay {
            addr,
            upstream,
            task: None,
        };
        r.serve(l);
        r
    }

    fn serve(&mut self, l: TcpListener) {
        let upstream = self.upstream;
        self.task = Some(tokio::spawn(async move {
            // Dropped with this task (when cut), aborting every relayed connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut down, _)) = l.accept().await else {
                    return;
                };
                conns.spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        }));
    }

    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    async fn restore(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let l = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "rebind: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(l);
    }
}

async fn serve_on_s3(data: &std::path::Path, relay: &Relay) -> Server {
    serve_on_s3_at(
        data,
        &format!("http://{}", relay.addr),
        &[("AWS_ALLOW_HTTP", "true")],
    )
    .await
}

/// A server whose snapshots go to the bucket at `endpoint`, with `extra` variables.
async fn serve_on_s3_at(data: &std::path::Path, endpoint: &str, extra: &[(&str, &str)]) -> Server {
    let url = format!("s3://{BUCKET}/{PREFIX}");
    // An upstream that accepts connections (the kernel completes the handshakes of a bound
    // listener), so that readiness is down to the stores.
    static UPSTREAM: std::sync::OnceLock<(std::net::TcpListener, String)> =
        std::sync::OnceLock::new();
    let (_, upstream) = UPSTREAM.get_or_init(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        (l, url)
    });
    let mut env = vec![
        ("BERTH_UPSTREAM_URL", upstream.as_str()),
        ("BERTH_SNAPSHOT_URL", url.as_str()),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    env.extend_from_slice(extra);
    Server::start_with(data, &env).await
}

async fn hybrid_box(api: &Api, idle_s: u64) -> String {
    let r = api
        .post(
            "/v1/boxes",
            json!({"lifecycle": "hybrid", "idle_timeout_s": idle_s,
                   "resources": {"memory_mib": 256, "disk_mib": 64, "pids": 64}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    r.json["id"].as_str().expect("id").to_string()
}

async fn put_file(api: &Api, bx: &str, name: &str, body: Vec<u8>) {
    let put = api
        .raw(
            api.http
                .put(format!("{}/v1/boxes/{bx}/files/{name}", api.url))
                .bearer_auth(&api.token)
                .body(body),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.json);
}

async fn cat(api: &Api, bx: &str, argv: Value) -> Value {
    let out = api.post(&format!("/v1/boxes/{bx}/exec"), argv).await;
    assert_eq!(out.status, 200, "{}", out.json);
    out.json
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Put `body` at `/workspace/<name>` and wait for the (idle) box to park: the body's
/// digest, the parked box, and its snapshot's key.
async fn put_and_park(api: &Api, bx: &str, name: &str, body: Vec<u8>) -> (String, Value, String) {
    let digest = sha256_hex(&body);
    put_file(api, bx, name, body).await;
    let b = api
        .wait_for(&format!("/v1/boxes/{bx}"), 60, |b| b["state"] == "parked")
        .await;
    let key = b["snapshot"]["key"]
        .as_str()
        .expect("snapshot key")
        .to_string();
    (digest, b, key)
}

/// The box's `/workspace/<name>` is what was put (its digest, by `sha256sum` in the box):
/// after a park and a restore through the bucket, the workspace came back intact.
async fn assert_digest(api: &Api, bx: &str, name: &str, digest: &str) {
    let out = cat(
        api,
        bx,
        json!({"argv": ["sha256sum", format!("/workspace/{name}")]}),
    )
    .await;
    assert_eq!(
        out["stdout"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .next(),
        Some(digest),
        "{out}"
    );
}

/// Park to S3 and restore from it (a multi-part archive), an artifact kept in S3 and
/// downloaded; readiness covers the object store.
#[tokio::test]
async fn park_restore_and_artifact_through_s3() {
    let moto = Moto::start().await;
    let relay = Relay::start(moto.addr).await;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = serve_on_s3(dir.path(), &relay).await;
    let api = srv.client();
    let bx = hybrid_box(&api, 1).await;
    // 20 MiB of incompressible bytes: more than two 8 MiB parts after compression.
    let big: Vec<u8> = {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..20 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let (digest, b, key) = put_and_park(&api, &bx, "big.bin", big).await;
    assert!(
        b["snapshot"]["bytes"].as_u64().unwrap_or(0) > 16 << 20,
        "{b}"
    );
    assert_eq!(
        moto.keys(&format!("{PREFIX}/boxes/{bx}/")).await,
        vec![format!("{PREFIX}/{key}")],
        "the snapshot is in the bucket, under the prefix"
    );
    assert!(
        !dir.path().join("snapshots").join("boxes").exists(),
        "nothing parked on local disk"
    );
    assert_digest(&api, &bx, "big.bin", &digest).await;
    // Restored: the box no longer stands on that snapshot (with a 1 s idle timeout it may
    // already be parking again under load, onto a snapshot of a new key).
    let b = api.get(&format!("/v1/boxes/{bx}")).await.json;
    assert_ne!(b["snapshot"]["key"].as_str(), Some(key.as_str()), "{b}");
    let old = format!("{PREFIX}/{key}");
    let gone = tokio::time::Instant::now() + Duration::from_secs(10);
    while moto
        .keys(&format!("{PREFIX}/boxes/{bx}/"))
        .await
        .contains(&old)
    {
        assert!(
            tokio::time::Instant::now() < gone,
            "restored snapshot not deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An artifact: the workspace of an ephemeral box, kept in the bucket.
    let r = api.post("/v1/sessions", json!({
        "box": {"lifecycle": "ephemeral", "keep_workspace": true, "resources": {"memory_mib": 128, "disk_mib": 32}},
        "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "mkdir -p out && echo report > out/r.txt"]}
    })).await;
    assert_eq!(r.status, 201, "{}", r.json);
    let kept = r.json["box_id"].as_str().expect("box").to_string();
    let b = api
        .wait_for(&format!("/v1/boxes/{kept}"), 30, |b| {
            b["state"] == "destroyed"
        })
        .await;
    assert!(b["artifact"]["bytes"].as_u64().unwrap_or(0) > 0, "{b}");
    assert_eq!(
        moto.keys(&format!("{PREFIX}/artifacts/{kept}")).await.len(),
        1
    );
    let tar = api.get(&format!("/v1/boxes/{kept}/artifact")).await;
    assert_eq!(tar.status, 200);
    let unpacked = tempfile::tempdir().expect("tmp");
    let file = unpacked.path().join("a.tar");
    std::fs::write(&file, &tar.bytes).expect("write");
    let st = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&file)
        .arg("-C")
        .arg(unpacked.path())
        .status()
        .expect("tar");
    assert!(st.success());
    assert_eq!(
        std::fs::read_to_string(unpacked.path().join("workspace/out/r.txt")).expect("kept"),
        "report\n"
    );
    let ready = api.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.json);
    assert_eq!(ready.json["checks"]["snapshots"], "ok");
    // The object store's latencies are in /metrics.
    let metrics = String::from_utf8_lossy(&api.get("/metrics").await.bytes).into_owned();
    for op in ["ping", "complete", "verify"] {
        assert!(
            metrics.contains(&format!("berth_snapshot_op_seconds_count{{op=\"{op}\"}}")),
            "{op} missing from /metrics"
        );
    }
    // moto gives multipart uploads S3's ETag (the MD5 of the parts' MD5s): each upload was
    // checked by it, none read back.
    assert!(
        metrics.contains("berth_snapshot_verified_total{by=\"etag\"}"),
        "no upload checked by its ETag"
    );
    assert!(
        !metrics.contains("berth_snapshot_verified_total{by=\"read_back\"}"),
        "an upload to moto was read back"
    );
    srv.stop().await;
}

/// The object store unreachable: a park fails and the box keeps running with its files and a
/// reason; readiness names the snapshot store. Back: the box parks. Unreachable again: the
/// restore fails, the box stays parked with a reason; back: the restore works.
#[tokio::test]
async fn an_unreachable_object_store_keeps_boxes_whole() {
    let moto = Moto::start().await;
    let mut relay = Relay::start(moto.addr).await;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = serve_on_s3(dir.path(), &relay).await;
    let api = srv.client();
    relay.cut();
    let bx = hybrid_box(&api, 1).await;
    put_file(&api, &bx, "notes.txt", b"keep me".to_vec()).await;
    let b = api
        .wait_for(&format!("/v1/boxes/{bx}"), 60, |b| {
            b["state_reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("park failed"))
        })
        .await;
    assert_eq!(b["state"], "running", "{b}");
    assert_eq!(
        b["state_reason"], "park failed: the archive could not be stored",
        "{b}"
    );
    assert!(b.get("snapshot").is_none(), "{b}");
    let r = api.get("/readyz").await;
    assert_eq!(r.status, 503);
    // The unauthenticated answer names the check, not the store's own error (endpoint, bucket).
    let why = r.json["error"]["message"].as_str().unwrap_or("");
    assert!(!why.contains("127.0.0.1") && !why.contains("http"), "{why}");
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("snapshot store"),
        "{}",
        r.json
    );
    let out = cat(&api, &bx, json!({"argv": ["cat", "/workspace/notes.txt"]})).await;
    assert_eq!(out["stdout"], "keep me", "{out}");
    assert!(moto.keys(PREFIX).await.is_empty(), "nothing half-stored");

    relay.restore().await;
    api.wait_for(&format!("/v1/boxes/{bx}"), 60, |b| b["state"] == "parked")
        .await;
    relay.cut();
    let r = api
        .post(
            &format!("/v1/boxes/{bx}/exec"),
            json!({"argv": ["cat", "/workspace/notes.txt"]}),
        )
        .await;
    assert!(r.status >= 500, "{} {}", r.status, r.json);
    let b = api.get(&format!("/v1/boxes/{bx}")).await.json;
    assert_eq!(b["state"], "parked", "{b}");
    assert_eq!(
        b["state_reason"], "restore failed: the snapshot could not be read intact",
        "{b}"
    );
    assert!(
        b["snapshot"]["key"].is_string(),
        "the snapshot is kept: {b}"
    );

    relay.restore().await;
    let out = cat(&api, &bx, json!({"argv": ["cat", "/workspace/notes.txt"]})).await;
    assert_eq!(
        out["stdout"], "keep me",
        "restored once the store is back: {out}"
    );
    srv.stop().await;
}

/// The object store over HTTPS, as every hosted S3 is: a TLS front with a certificate of the
/// test's own CA before moto. The server trusts that CA through the standard `SSL_CERT_FILE`,
/// and only then: without it readiness names the snapshot store; with it a 2 MiB workspace
/// parks to the bucket and restores intact, over TLS.
#[tokio::test]
async fn park_and_restore_through_s3_over_https() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let (port, ca, handshakes) = tls_front(dir.path(), moto.addr.to_string()).await;
    let endpoint = format!("https://127.0.0.1:{port}");

    let untrusted = dir.path().join("untrusted");
    std::fs::create_dir(&untrusted).expect("mkdir");
    let srv = serve_on_s3_at(&untrusted, &endpoint, &[]).await;
    let r = srv.client().get("/readyz").await;
    assert_eq!(r.status, 503, "{}", r.json);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("snapshot store"),
        "{}",
        r.json
    );
    srv.stop().await;

    let trusted = dir.path().join("trusted");
    std::fs::create_dir(&trusted).expect("mkdir");
    let ca = ca.to_string_lossy().into_owned();
    let srv = serve_on_s3_at(&trusted, &endpoint, &[("SSL_CERT_FILE", ca.as_str())]).await;
    let api = srv.client();
    let r = api.get("/readyz").await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["checks"]["snapshots"], "ok");
    let bx = hybrid_box(&api, 1).await;
    let body: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (digest, _, key) = put_and_park(&api, &bx, "w.bin", body).await;
    assert_eq!(
        moto.keys(&format!("{PREFIX}/boxes/{bx}/")).await,
        vec![format!("{PREFIX}/{key}")],
        "the snapshot went to the bucket"
    );
    assert_digest(&api, &bx, "w.bin", &digest).await;
    assert!(
        handshakes.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the store was reached over TLS"
    );
    srv.stop().await;
}
