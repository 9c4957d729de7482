//! A cluster of real nodes: three `berth serve` processes, each in a network namespace of its
//! own with its own address on a bridge this test creates (and removes), sharing a real
//! PostgreSQL and moto's S3 server (both reached at the bridge's address). Boxes spread over
//! the nodes, any node answers for any box or session, a node killed or cut off is declared
//! lost (its hybrid boxes restore elsewhere, the rest are marked lost) and, coming back, runs
//! nothing the cluster replaced; cron fires once per instant with every node scheduling.

mod common;

use common::Api;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

const SECRET: &str = "cluster-test-secret";
const ADMIN: &str = "berth_cluster_test_admin_key_0123456789";
const BUCKET: &str = "berth-cluster";
/// Short leases keep the loss tests quick (renewed every 400 ms).
const LEASE_MS: u64 = 2000;

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge and one namespace per node, named uniquely for this run, removed on drop.
struct Net {
    tag: String,
    prefix: String,
    nodes: usize,
}

impl Net {
    fn create(nodes: usize) -> Net {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:x}{n}", pid % 0xfffff);
        // 10.a.b.0/24, a and b from the pid and a counter (tests of one run differ).
        let prefix = format!("10.{}.{}", 100 + (pid % 100), (pid / 100 + n * 7) % 250);
        let net = Net { tag, prefix, nodes };
        let br = net.bridge();
        sh(&["ip", "link", "add", &br, "type", "bridge"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", net.host_ip()),
            "dev",
            &br,
        ]);
        sh(&["ip", "link", "set", &br, "up"]);
        // Bridged traffic passes iptables' FORWARD chain (br_netfilter), whose policy a Docker
        // host sets to DROP: let this bridge's own traffic through (removed on drop).
        if net.iptables(true).is_err() {
            eprintln!("iptables unavailable: node-to-node traffic relies on the FORWARD policy");
        }
        for i in 1..=nodes {
            let ns = net.ns(i);
            let (host, peer) = (net.veth(i), format!("cp{}{i}", net.tag));
            sh(&["ip", "netns", "add", &ns]);
            sh(&[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", &peer,
            ]);
            sh(&["ip", "link", "set", &peer, "netns", &ns]);
            sh(&["ip", "link", "set", &host, "master", &br]);
            sh(&["ip", "link", "set", &host, "up"]);
            let ip = format!("{}/24", net.node_ip(i));
            sh(&["ip", "-n", &ns, "addr", "add", &ip, "dev", &peer]);
            sh(&["ip", "-n", &ns, "link", "set", &peer, "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }
    /// Insert (or delete) the rule accepting traffic between this bridge's ports.
    fn iptables(&self, add: bool) -> std::io::Result<()> {
        let br = self.bridge();
        let st = std::process::Command::new("iptables")
            .args([
                if add { "-I" } else { "-D" },
                "FORWARD",
                "-i",
                &br,
                "-o",
                &br,
                "-j",
                "ACCEPT",
            ])
            .stderr(Stdio::null())
            .status()?;
        if st.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("iptables: {st}")))
        }
    }

    fn bridge(&self) -> String {
        format!("cb{}", self.tag)
    }
    fn ns(&self, i: usize) -> String {
        format!("berth-cluster-{}-{i}", self.tag)
    }
    fn veth(&self, i: usize) -> String {
        format!("ch{}{i}", self.tag)
    }
    fn host_ip(&self) -> String {
        format!("{}.1", self.prefix)
    }
    fn node_ip(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, 10 + i)
    }
    /// Cut node `i` off (its veth down) or connect it again.
    fn link(&self, i: usize, up: bool) {
        sh(&[
            "ip",
            "link",
            "set",
            &self.veth(i),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 1..=self.nodes {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .status();
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .status();
        let _ = self.iptables(false);
    }
}

/// A TCP relay from `listen` to `to`, for the life of the test (PostgreSQL listens on
/// loopback only; the nodes reach it at the bridge's address).
async fn relay(listen: &str, to: String) -> u16 {
    let l = tokio::net::TcpListener::bind(format!("{listen}:0"))
        .await
        .expect("relay bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut u) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
            });
        }
    });
    port
}

/// moto's S3 server on the bridge's address, killed on drop.
struct Moto {
    _child: tokio::process::Child,
    endpoint: String,
}

async fn moto(ip: &str) -> Moto {
    let venv = std::env::var("BERTH_TEST_VENV").unwrap_or_else(|_| "/opt/berth/test-venv".into());
    let bin = PathBuf::from(venv).join("bin/moto_server");
    let port = std::net::TcpListener::bind(format!("{ip}:0"))
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let child = tokio::process::Command::new(bin)
        .args(["-H", ip, "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("moto_server");
    let endpoint = format!("http://{ip}:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.put(format!("{endpoint}/{BUCKET}")).send().await {
            assert!(r.status().is_success(), "create bucket: {}", r.status());
            break;
        }
        assert!(Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Moto {
        _child: child,
        endpoint,
    }
}

/// One node: `berth serve` inside its namespace.
struct Node {
    name: String,
    api: Api,
    child: Option<tokio::process::Child>,
    data: tempfile::TempDir,
}

/// The shared parts and the nodes.
struct Cluster {
    net: Net,
    db: String,
    s3: Moto,
    nodes: Vec<Node>,
    _pg: Option<berth_store::testing::PgCluster>,
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        let net = Net::create(n);
        let (admin, pg) = match std::env::var("BERTH_TEST_DATABASE_URL") {
            Ok(u) if !u.is_empty() => (u, None),
            _ => {
                let c = berth_store::testing::PgCluster::start().expect("test PostgreSQL");
                (c.url(), Some(c))
            }
        };
        let name = format!("cluster_{}", net.tag);
        let local = berth_store::postgres::ensure_database(&admin, &name)
            .await
            .expect("database");
        // postgres://user:pw@127.0.0.1:port/db → the relay on the bridge.
        let (head, rest) = local.split_once('@').expect("url with credentials");
        let (hostport, db) = rest.split_once('/').expect("url with a database");
        let port = relay(&net.host_ip(), hostport.to_string()).await;
        let db = format!("{head}@{}:{port}/{db}", net.host_ip());
        let s3 = moto(&net.host_ip()).await;
        let mut c = Cluster {
            net,
            db,
            s3,
            nodes: Vec::new(),
            _pg: pg,
        };
        for i in 1..=n {
            let data = tempfile::tempdir().expect("tmp");
            let node = c.spawn(i, data).await;
            c.nodes.push(node);
        }
        c
    }

    async fn spawn(&self, i: usize, data: tempfile::TempDir) -> Node {
        let ip = self.net.node_ip(i);
        // nsenter into the network namespace only: `ip netns exec` would also remount /sys,
        // hiding the cgroup hierarchy the native backend needs.
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.net.ns(i)))
            .args(["--", env!("CARGO_BIN_EXE_berth")])
            .args(["serve", "--mock-model", "--listen", &format!("{ip}:7700")])
            .arg("--data-dir")
            .arg(data.path())
            .env("BERTH_LOG", "warn")
            .env_remove("BERTH_URL")
            .env_remove("BERTH_TOKEN")
            .env("BERTH_NODE_NAME", format!("node{i}"))
            .env("BERTH_CLUSTER_SECRET", SECRET)
            .env("BERTH_NODE_LEASE_MS", LEASE_MS.to_string())
            .env("BERTH_ADMIN_KEY", ADMIN)
            .env("BERTH_DATABASE_URL", &self.db)
            .env(
                "BERTH_SNAPSHOT_URL",
                format!("s3://{BUCKET}/{}", self.net.tag),
            )
            .env("AWS_ENDPOINT_URL", &self.s3.endpoint)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn berth serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("node start timed out")
            .expect("read")
            .expect("node exited before listening");
        assert!(line.contains(&ip), "{line}");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Node {
            name: format!("node{i}"),
            api: Api::new(&format!("http://{ip}:7700"), ADMIN),
            child: Some(child),
            data,
        }
    }

    fn api(&self, i: usize) -> &Api {
        &self.nodes[i - 1].api
    }

    /// The index (1-based) of the node named `name`.
    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .expect("known node")
            + 1
    }

    async fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i - 1].child.take() {
            c.start_kill().expect("kill");
            c.wait().await.expect("wait");
        }
    }

    /// SIGTERM, a clean exit within 30 s.
    async fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i - 1].child.take() {
            // SAFETY: signalling a process this test started.
            unsafe { libc::kill(c.id().expect("pid") as i32, libc::SIGTERM) };
            let st = tokio::time::timeout(Duration::from_secs(30), c.wait())
                .await
                .expect("stopped in time")
                .expect("wait");
            assert!(st.success(), "node{i} exited with {st}");
        }
    }

    /// Stop node `i` cleanly and start it again on the same data dir.
    async fn restart(&mut self, i: usize) {
        self.stop(i).await;
        let data = std::mem::replace(
            &mut self.nodes[i - 1].data,
            tempfile::tempdir().expect("tmp"),
        );
        let node = self.spawn(i, data).await;
        self.nodes[i - 1] = node;
    }

    async fn stop_all(mut self) {
        for i in 1..=self.nodes.len() {
            if self.nodes[i - 1].child.is_some() {
                self.stop(i).await;
            }
        }
    }
}

/// Poll `f` until it gives Some, at most `secs`.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn node_states(api: &Api) -> Vec<(String, String)> {
    let r = api.get("/v1/nodes").await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or("").to_string(),
                n["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn new_box(api: &Api, extra: Value) -> Value {
    let mut spec = json!({"resources": {"cpus": 0.25, "memory_mib": 128, "disk_mib": 64}});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    let r = api.post("/v1/boxes", spec).await;
    assert_eq!(r.status, 201, "{}", r.json);
    r.json
}

/// A new box on node `i`: the other nodes drained while it is placed (asked of node 1,
/// which forwards the create), then undrained.
async fn box_on(c: &Cluster, i: usize, extra: Value) -> String {
    let a1 = c.api(1);
    for j in 1..=c.nodes.len() {
        if j != i && c.nodes[j - 1].child.is_some() {
            let r = a1
                .post(&format!("/v1/nodes/node{j}/drain"), json!({}))
                .await;
            assert_eq!(r.status, 200, "{}", r.json);
        }
    }
    let b = new_box(a1, extra).await;
    for j in 1..=c.nodes.len() {
        if j != i && c.nodes[j - 1].child.is_some() {
            let r = a1
                .post(&format!("/v1/nodes/node{j}/undrain"), json!({}))
                .await;
            assert_eq!(r.status, 200, "{}", r.json);
        }
    }
    assert_eq!(b["node"], format!("node{i}"), "{b}");
    b["id"].as_str().expect("id").to_string()
}

async fn exec(api: &Api, id: &str, argv: &[&str], stdin: Option<&str>) -> Value {
    let r = api
        .post(
            &format!("/v1/boxes/{id}/exec"),
            json!({"argv": argv, "stdin": stdin, "timeout_s": 30}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json
}

const WS_ECHO: &str = r#"
import base64, hashlib, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8765))
s.listen()
while True:
    c, _ = s.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        head += c.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    h = c.recv(2)
    n = h[1] & 0x7F
    mask = c.recv(4)
    data = b""
    while len(data) < n:
        data += c.recv(n - len(data))
    text = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    c.sendall(bytes([0x81, len(text)]) + text)
"#;

/// A WebSocket through `api`'s node to port 8765 of box `id`; one message echoed.
async fn ws_echo(api: &Api, id: &str, text: &str) -> String {
    use futures::{SinkExt, StreamExt};
    let url = format!(
        "{}/v1/boxes/{id}/ports/8765/",
        api.url.replace("http://", "ws://")
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ws = loop {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
            .expect("req");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", api.token).parse().expect("hdr"),
        );
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => break ws,
            Err(e) => {
                assert!(Instant::now() < deadline, "no WebSocket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    ws.send(tokio_tungstenite::tungstenite::Message::Text(text.into()))
        .await
        .expect("send");
    let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("msg");
    msg.to_text().expect("text").to_string()
}

fn echo_agent() -> Value {
    json!({"kind": "command", "argv": ["/bin/sh", "-c", "while read -r l; do echo \"echo: $l\"; done"]})
}

/// Whether any process on the machine has `marker` in its command line.
fn process_with(marker: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(marker)
        })
}

/// Boxes spread over three nodes; `GET /v1/nodes` and `berth node ls` list them; a box on one
/// node is driven through another (exec with stdin, files, a port's WebSocket, a session's
/// messages, its SSE stream read on a third node); a forged forwarding header is refused; a
/// drained node gets no boxes; cron fires once per instant with all three scheduling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxes_spread_and_any_node_answers() {
    let t0 = Instant::now();
    let c = Cluster::start(3).await;
    let a1 = c.api(1);
    let nodes = node_states(a1).await;
    assert_eq!(
        nodes,
        (1..=3)
            .map(|i| (format!("node{i}"), "active".to_string()))
            .collect::<Vec<_>>()
    );
    // The CLI, with the URL and key from the environment.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["node", "ls", "--json"])
        .env("BERTH_URL", &a1.url)
        .env("BERTH_TOKEN", ADMIN)
        .output()
        .await
        .expect("berth node ls");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    assert!(
        listed[1]["advertise_url"]
            .as_str()
            .is_some_and(|u| u.contains(&c.net.node_ip(2))),
        "{listed}"
    );

    // Six boxes asked of node 1 land on all three nodes.
    let mut on: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for _ in 0..6 {
        let b = new_box(a1, json!({})).await;
        on.entry(b["node"].as_str().expect("node").to_string())
            .or_default()
            .push(b["id"].as_str().expect("id").to_string());
    }
    assert_eq!(on.len(), 3, "boxes by node: {on:?}");

    // A box on node 2, driven through node 1; its records read on node 3.
    let b2 = on["node2"][0].clone();
    let r = exec(
        a1,
        &b2,
        &["/bin/sh", "-c", "cat; hostname"],
        Some("piped in"),
    )
    .await;
    assert_eq!(r["exit_code"], 0, "{r}");
    assert!(
        r["stdout"].as_str().unwrap_or("").starts_with("piped in"),
        "{r}"
    );
    let put = a1
        .raw(
            a1.http
                .put(format!("{}/v1/boxes/{b2}/files/ws.py", a1.url))
                .bearer_auth(ADMIN)
                .body(WS_ECHO),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.json);
    let got = c.api(3).get(&format!("/v1/boxes/{b2}/files/ws.py")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes, WS_ECHO.as_bytes());
    assert_eq!(
        c.api(3).get(&format!("/v1/boxes/{b2}")).await.json["node"],
        "node2"
    );
    let s = a1
        .post(
            "/v1/sessions",
            json!({"box": b2, "agent": {"kind": "command", "argv": ["/usr/bin/python3", "/workspace/ws.py"]}}),
        )
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    assert_eq!(ws_echo(a1, &b2, "across nodes").await, "across nodes");

    // A session in node 2's box, created, messaged and streamed through the other nodes.
    let s = c
        .api(3)
        .post("/v1/sessions", json!({"box": b2, "agent": echo_agent()}))
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    let sid = s.json["id"].as_str().expect("id").to_string();
    for text in ["one", "two"] {
        let r = a1
            .post(
                &format!("/v1/sessions/{sid}/messages"),
                json!({"content": text}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.json);
    }
    let evs = c.api(3).until(&sid, "stdout", 2).await;
    let outs: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["data"]["text"].as_str())
        .collect();
    // One stdout event per line, in order.
    assert_eq!(
        outs.iter().map(|t| t.trim_end()).collect::<Vec<_>>(),
        ["echo: one", "echo: two"]
    );
    let seqs: Vec<i64> = evs.iter().filter_map(|e| e["seq"].as_i64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "gapless");
    let r = a1
        .post(&format!("/v1/sessions/{sid}/interrupt"), json!({}))
        .await;
    assert!(r.status < 500, "{} {}", r.status, r.json);

    // Claiming to be a node without the secret: refused, and the node still answers.
    let forged = a1
        .raw(
            a1.http
                .post(format!("{}/v1/boxes/{b2}/exec", c.api(2).url))
                .bearer_auth(ADMIN)
                .header("x-berth-forwarded-by", "node1")
                .header("x-berth-forwarded-at", "1")
                .header("x-berth-forwarded-sig", "00")
                .json(&json!({"argv": ["true"]})),
        )
        .await;
    assert_eq!(forged.status, 401, "{}", forged.json);
    assert_eq!(c.api(2).get("/v1/nodes").await.status, 200);
    // A tenant's key may not list or drain nodes.
    let (_, tenant) = common::tenant_key(a1, "acme").await;
    assert_eq!(tenant.get("/v1/nodes").await.status, 403);
    // A tenant cannot reach another tenant's box through another node either.
    let r = tenant
        .post(&format!("/v1/boxes/{b2}/exec"), json!({"argv": ["true"]}))
        .await;
    assert_eq!(r.status, 404, "{}", r.json);

    // Drained, node 3 gets no new boxes; undrained, it does again.
    let r = a1.post("/v1/nodes/node3/drain", json!({})).await;
    assert_eq!(
        (r.status, r.json["state"].as_str()),
        (200, Some("draining"))
    );
    for _ in 0..4 {
        let b = new_box(a1, json!({})).await;
        assert_ne!(b["node"], "node3", "{b}");
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["node", "undrain", "node3"])
        .env("BERTH_URL", &a1.url)
        .env("BERTH_TOKEN", ADMIN)
        .output()
        .await
        .expect("berth node undrain");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        node_states(a1).await[2],
        ("node3".to_string(), "active".to_string())
    );

    // Cron every second with three schedulers: each instant fires once.
    let r = a1
        .post(
            "/v1/triggers",
            json!({"box": {"resources": {"cpus": 0.25, "memory_mib": 128, "disk_mib": 64}},
                   "webhook": false, "schedule": "* * * * * *",
                   "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "cat"]},
                   "prompt": "tick at {{scheduled_at}}"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let trig = r.json["id"].as_str().expect("id").to_string();
    let before: Vec<String> = session_ids(a1).await;
    // Long enough for every node's scheduler to have read the trigger (a rescan is 5 s).
    a1.wait_for(&format!("/v1/triggers/{trig}"), 40, |t| {
        t["fired"].as_u64().unwrap_or(0) >= 12
    })
    .await;
    assert_eq!(a1.delete(&format!("/v1/triggers/{trig}")).await.status, 204);
    // Firings in flight when it was deleted settle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fired: Vec<String> = session_ids(a1)
        .await
        .into_iter()
        .filter(|s| !before.contains(s))
        .collect();
    assert!(fired.len() >= 12, "{fired:?}");
    let mut ticks = Vec::new();
    for sid in &fired {
        let evs = a1.until(sid, "stdout", 1).await;
        let text = evs
            .iter()
            .find(|e| e["type"] == "stdout")
            .and_then(|e| e["data"]["text"].as_str())
            .unwrap_or("")
            .trim()
            .to_string();
        assert!(text.starts_with("tick at 20"), "{text}");
        ticks.push(text);
    }
    let distinct: std::collections::BTreeSet<&String> = ticks.iter().collect();
    assert_eq!(
        distinct.len(),
        ticks.len(),
        "an instant fired twice: {ticks:?}"
    );
    // More than one node's scheduler fired (each firing's box is made where it fired).
    let mut firing_nodes = std::collections::BTreeSet::new();
    for sid in &fired {
        let s = a1.get(&format!("/v1/sessions/{sid}")).await.json;
        let b = a1
            .get(&format!("/v1/boxes/{}", s["box_id"].as_str().unwrap_or("")))
            .await
            .json;
        firing_nodes.insert(b["node"].as_str().unwrap_or("").to_string());
    }
    assert!(firing_nodes.len() >= 2, "fired only on {firing_nodes:?}");

    // A signed webhook call is taken once: replayed to another node it is refused.
    let r = a1
        .post(
            "/v1/triggers",
            json!({"box": {"resources": {"cpus": 0.25, "memory_mib": 128, "disk_mib": 64}},
                   "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "cat"]},
                   "prompt": "hook {{n}}"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let (hook_path, secret) = (
        r.json["webhook_path"].as_str().expect("path").to_string(),
        r.json["secret"].as_str().expect("secret").to_string(),
    );
    let body = json!({"n": 1}).to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        .to_string();
    let mut mac =
        <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(secret.as_bytes()).expect("key");
    hmac::Mac::update(&mut mac, format!("{ts}.{body}").as_bytes());
    let sig = format!(
        "sha256={}",
        hex::encode(hmac::Mac::finalize(mac).into_bytes())
    );
    let mut answers = Vec::new();
    for i in [1, 2, 3] {
        let api = c.api(i);
        let r = api
            .raw(
                api.http
                    .post(format!("{}{hook_path}", api.url))
                    .header("x-berth-timestamp", &ts)
                    .header("x-berth-signature-256", &sig)
                    .header("content-type", "application/json")
                    .body(body.clone()),
            )
            .await;
        answers.push(r.status);
    }
    assert_eq!(answers, [202, 401, 401], "the same call at nodes 1, 2, 3");
    c.stop_all().await;
    assert!(
        t0.elapsed() < Duration::from_secs(240),
        "{:?}",
        t0.elapsed()
    );
}

async fn session_ids(api: &Api) -> Vec<String> {
    let r = api.get("/v1/sessions").await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_string))
        .collect()
}

/// `kill -9` of the node holding a parked hybrid box and a live session: within the lease
/// (plus a renewal) the node is lost, its persistent box `lost` and its session
/// `interrupted`; the hybrid box restores on the node that serves its next use, with its
/// files, and its session resumes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_lost_and_its_hybrid_box_restores_elsewhere() {
    let t0 = Instant::now();
    let mut c = Cluster::start(3).await;
    let a1 = c.api(1).clone_api();
    let hy = new_box(&a1, json!({"lifecycle": "hybrid"})).await;
    let hid = hy["id"].as_str().expect("id").to_string();
    let holder = c.index(hy["node"].as_str().expect("node"));
    // Talk through a node other than the holder; put a persistent box on the holder too.
    let via = if holder == 1 { 2 } else { 1 };
    let api = c.api(via).clone_api();
    let put = api
        .raw(
            api.http
                .put(format!("{}/v1/boxes/{hid}/files/notes/kept.txt", api.url))
                .bearer_auth(ADMIN)
                .body("written before the crash"),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.json);
    let s = api
        .post("/v1/sessions", json!({"box": hid, "agent": echo_agent()}))
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    let hsid = s.json["id"].as_str().expect("id").to_string();
    // Parked with its (idle) session, which the restore resumes.
    api.wait_for(&format!("/v1/sessions/{hsid}"), 20, |s| {
        s["state"] == "idle"
    })
    .await;
    let parked = api.post(&format!("/v1/boxes/{hid}/park"), json!({})).await;
    assert_eq!(
        (parked.status, parked.json["state"].as_str()),
        (200, Some("parked")),
        "{}",
        parked.json
    );
    // A live session on a persistent box of the holder.
    let pb = box_on(&c, holder, json!({})).await;
    let s = api
        .post("/v1/sessions", json!({"box": pb, "agent": echo_agent()}))
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    let psid = s.json["id"].as_str().expect("id").to_string();

    let killed = Instant::now();
    c.kill9(holder).await;
    let holder_name = format!("node{holder}");
    until("the killed node declared lost", 15, || {
        let api = api.clone_api();
        let holder_name = holder_name.clone();
        async move {
            node_states(&api)
                .await
                .contains(&(holder_name, "lost".to_string()))
                .then_some(())
        }
    })
    .await;
    let b = until("the hybrid box restorable", 10, || {
        let api = api.clone_api();
        let hid = hid.clone();
        async move {
            let b = api.get(&format!("/v1/boxes/{hid}")).await.json;
            (b["state"] == "parked" && b["node"].is_null()).then_some(b)
        }
    })
    .await;
    let restorable_after = killed.elapsed();
    assert!(
        restorable_after < Duration::from_millis(LEASE_MS + 3000),
        "restorable after {restorable_after:?}"
    );
    assert!(
        b["state_reason"].as_str().unwrap_or("").contains("lost"),
        "{b}"
    );
    api.wait_for(&format!("/v1/boxes/{pb}"), 10, |b| b["state"] == "lost")
        .await;
    api.wait_for(&format!("/v1/sessions/{psid}"), 10, |s| {
        s["state"] == "interrupted"
    })
    .await;

    // Its next use restores it on the node that serves it, with its files.
    let r = exec(&api, &hid, &["cat", "/workspace/notes/kept.txt"], None).await;
    assert_eq!(r["stdout"], "written before the crash", "{r}");
    let b = api.get(&format!("/v1/boxes/{hid}")).await.json;
    assert_eq!(b["state"], "running", "{b}");
    assert_eq!(b["node"], format!("node{via}"), "{b}");
    // The session the park stopped resumed there and answers.
    let r = api
        .post(
            &format!("/v1/sessions/{hsid}/messages"),
            json!({"content": "after"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    let evs = api.until(&hsid, "stdout", 1).await;
    assert!(
        evs.iter().any(|e| e["data"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("echo: after")),
        "{evs:?}"
    );
    eprintln!("node killed → hybrid box restorable: {restorable_after:?}");
    c.stop_all().await;
    assert!(
        t0.elapsed() < Duration::from_secs(240),
        "{:?}",
        t0.elapsed()
    );
}

/// A node cut off from the others (its veth down) is declared lost; its parked hybrid box is
/// taken and restored by another node; the cut-off node fences itself (its running box's
/// processes end) and, connected again, rejoins under a new incarnation without running or
/// rewriting what the cluster replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_is_lost_and_does_not_double_run_when_it_returns() {
    let t0 = Instant::now();
    let c = Cluster::start(3).await;
    let a1 = c.api(1).clone_api();
    // Boxes on node 3: a hybrid one (parked below) and a persistent one with a live session.
    let hid = box_on(&c, 3, json!({"lifecycle": "hybrid"})).await;
    let pid = box_on(&c, 3, json!({})).await;
    let put = a1
        .raw(
            a1.http
                .put(format!("{}/v1/boxes/{hid}/files/state.txt", a1.url))
                .bearer_auth(ADMIN)
                .body("v1"),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.json);
    let parked = a1.post(&format!("/v1/boxes/{hid}/park"), json!({})).await;
    assert_eq!(parked.json["state"], "parked", "{}", parked.json);
    // A live session in node 3's persistent box, its process marked for the test to find.
    let marker = format!(
        "{}.{}",
        600 + std::process::id() % 300,
        c.net.tag.len() * 7 + 1
    );
    let s = a1
        .post(
            "/v1/sessions",
            json!({"box": pid, "agent": {"kind": "command", "argv": ["/bin/sleep", marker]}}),
        )
        .await;
    assert_eq!(s.status, 201, "{}", s.json);
    let psid = s.json["id"].as_str().expect("id").to_string();
    let marker = format!("sleep {marker}");
    until("the marked process runs", 10, || async {
        process_with(&marker).then_some(())
    })
    .await;

    c.net.link(3, false);
    until("node 3 declared lost", 20, || {
        let a1 = a1.clone_api();
        async move {
            node_states(&a1)
                .await
                .contains(&("node3".to_string(), "lost".to_string()))
                .then_some(())
        }
    })
    .await;
    a1.wait_for(&format!("/v1/boxes/{pid}"), 10, |b| b["state"] == "lost")
        .await;
    // Settled just after the claim (boxes first, then their sessions).
    a1.wait_for(&format!("/v1/sessions/{psid}"), 10, |s| {
        s["state"] == "interrupted"
    })
    .await;
    // Cut off, node 3 fences itself within about a lease: its box's processes end.
    until("node 3 fenced its box", 20, || async {
        (!process_with(&marker)).then_some(())
    })
    .await;
    // The hybrid box is restored by node 1 and changed there.
    let r = exec(
        &a1,
        &hid,
        &["/bin/sh", "-c", "cat state.txt; echo v2 > state.txt"],
        None,
    )
    .await;
    assert_eq!(r["stdout"], "v1", "{r}");
    assert_eq!(
        a1.get(&format!("/v1/boxes/{hid}")).await.json["node"],
        "node1"
    );

    c.net.link(3, true);
    let n3 = until("node 3 back", 20, || {
        let a1 = a1.clone_api();
        async move {
            let r = a1.get("/v1/nodes").await.json;
            r["items"]
                .as_array()
                .and_then(|a| a.iter().find(|n| n["name"] == "node3").cloned())
                .filter(|n| n["state"] == "active")
        }
    })
    .await;
    assert!(n3["incarnation"].as_i64().unwrap_or(0) >= 2, "{n3}");
    // Some renewals later nothing was taken back or rewritten.
    tokio::time::sleep(Duration::from_millis(LEASE_MS)).await;
    let h = a1.get(&format!("/v1/boxes/{hid}")).await.json;
    assert_eq!(
        (h["node"].as_str(), h["state"].as_str()),
        (Some("node1"), Some("running")),
        "{h}"
    );
    let p = c.api(3).get(&format!("/v1/boxes/{pid}")).await.json;
    assert_eq!(p["state"], "lost", "{p}");
    assert!(!process_with(&marker));
    let r = exec(&c.api(3).clone_api(), &hid, &["cat", "state.txt"], None).await;
    assert_eq!(
        r["stdout"], "v2\n",
        "served by its new node through node 3: {r}"
    );
    c.stop_all().await;
    assert!(
        t0.elapsed() < Duration::from_secs(240),
        "{:?}",
        t0.elapsed()
    );
}

/// A rolling restart of the three nodes, each drained first (its hybrid boxes park), restarted
/// and undrained: every event committed before is still in each session's log, gapless; the
/// sessions resume at their next message; and no node runs a box the store does not give it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_no_event_and_leaks_no_box() {
    let t0 = Instant::now();
    let mut c = Cluster::start(3).await;
    let a1 = c.api(1).clone_api();
    let mut sessions = Vec::new();
    for i in 1..=3 {
        let b = box_on(&c, i, json!({"lifecycle": "hybrid"})).await;
        let s = a1
            .post("/v1/sessions", json!({"box": b, "agent": echo_agent()}))
            .await;
        assert_eq!(s.status, 201, "{}", s.json);
        let sid = s.json["id"].as_str().expect("id").to_string();
        a1.wait_for(&format!("/v1/sessions/{sid}"), 20, |s| s["state"] == "idle")
            .await;
        sessions.push((b, sid));
    }
    let mut committed = Vec::new();
    for (_, sid) in &sessions {
        let s = a1.get(&format!("/v1/sessions/{sid}")).await.json;
        committed.push(s["last_seq"].as_i64().expect("seq"));
    }
    for i in 1..=3 {
        let r = a1
            .post(&format!("/v1/nodes/node{i}/drain"), json!({}))
            .await;
        assert_eq!(r.status, 200, "{}", r.json);
        // Draining parks the node's hybrid box.
        let (b, _) = &sessions[i - 1];
        a1.wait_for(&format!("/v1/boxes/{b}"), 30, |b| b["state"] == "parked")
            .await;
        c.restart(i).await;
        let r = a1
            .post(&format!("/v1/nodes/node{i}/undrain"), json!({}))
            .await;
        assert_eq!(r.status, 200, "{}", r.json);
        until("the restarted node active", 20, || {
            let api = a1.clone_api();
            async move {
                node_states(&api)
                    .await
                    .contains(&(format!("node{i}"), "active".to_string()))
                    .then_some(())
            }
        })
        .await;
    }
    for ((_, sid), last) in sessions.iter().zip(&committed) {
        let r = a1
            .post(
                &format!("/v1/sessions/{sid}/messages"),
                json!({"content": "after the restarts"}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.json);
        let evs = a1.until(sid, "stdout", 1).await;
        let seqs: Vec<i64> = evs.iter().filter_map(|e| e["seq"].as_i64()).collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "{sid}");
        assert!(seqs.len() as i64 > *last, "{sid}: {seqs:?}");
    }
    // Every node runs exactly the boxes the store gives it (read after a renewal).
    tokio::time::sleep(Duration::from_millis(LEASE_MS / 2)).await;
    let boxes = a1.get("/v1/boxes").await.json;
    let nodes = a1.get("/v1/nodes").await.json;
    for n in nodes["items"].as_array().expect("items") {
        let name = n["name"].as_str().unwrap_or("");
        let held = boxes["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter(|b| b["node"] == name && b["state"] == "running")
            .count();
        assert_eq!(n["load"]["boxes"].as_u64(), Some(held as u64), "{n}");
    }
    c.stop_all().await;
    assert!(
        t0.elapsed() < Duration::from_secs(300),
        "{:?}",
        t0.elapsed()
    );
}

trait CloneApi {
    fn clone_api(&self) -> Api;
}

impl CloneApi for Api {
    fn clone_api(&self) -> Api {
        Api::new(&self.url, &self.token)
    }
}

/// A server on its own (SQLite) is a one-node cluster: it lists itself, active, under the host
/// name, with its backends and the boxes it holds; its boxes name it.
#[tokio::test]
async fn a_single_server_is_a_one_node_cluster() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = common::Server::start(dir.path()).await;
    let api = srv.client();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    let b = new_box(&api, json!({})).await;
    assert_eq!(b["node"], host.as_str(), "{b}");
    let nodes = until("the node's load renewed", 20, || {
        let api = api.clone_api();
        async move {
            let r = api.get("/v1/nodes").await.json;
            (r["items"][0]["load"]["boxes"] == 1).then_some(r)
        }
    })
    .await;
    let items = nodes["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{nodes}");
    assert_eq!(items[0]["name"], host.as_str());
    assert_eq!(items[0]["state"], "active");
    assert_eq!(items[0]["advertise_url"], srv.url.as_str());
    assert!(items[0]["backends"]
        .as_array()
        .is_some_and(|b| b.iter().any(|x| x == "native")));
    srv.stop().await;
}
