//! The cluster tests' harness: real `berth serve` nodes, each in a network namespace of its
//! own with its own address on a bridge the test creates (and removes), sharing a real
//! PostgreSQL and moto's S3 server (both reached at the bridge's address). Each node carries
//! the labels `zone` (`a` for nodes 1 and 2, `b` for node 3) and `host` (its own name).
#![allow(dead_code)]

use crate::common::Api;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

pub const SECRET: &str = "cluster-test-secret";
pub const ADMIN: &str = "berth_cluster_test_admin_key_0123456789";
pub const BUCKET: &str = "berth-cluster";
/// Short leases keep the loss tests quick (renewed every 400 ms).
pub const LEASE_MS: u64 = 2000;

pub fn sh(args: &[&str]) {
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
pub struct Net {
    pub tag: String,
    pub prefix: String,
    pub nodes: usize,
}

impl Net {
    pub fn create(nodes: usize) -> Net {
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
    pub fn iptables(&self, add: bool) -> std::io::Result<()> {
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

    pub fn bridge(&self) -> String {
        format!("cb{}", self.tag)
    }
    pub fn ns(&self, i: usize) -> String {
        format!("berth-cluster-{}-{i}", self.tag)
    }
    pub fn veth(&self, i: usize) -> String {
        format!("ch{}{i}", self.tag)
    }
    pub fn host_ip(&self) -> String {
        format!("{}.1", self.prefix)
    }
    pub fn node_ip(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, 10 + i)
    }
    /// Cut node `i` off (its veth down) or connect it again.
    pub fn link(&self, i: usize, up: bool) {
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
pub async fn relay(listen: &str, to: String) -> u16 {
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
pub struct Moto {
    pub _child: tokio::process::Child,
    pub endpoint: String,
}

pub async fn moto(ip: &str) -> Moto {
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
pub struct Node {
    pub name: String,
    pub api: Api,
    pub child: Option<tokio::process::Child>,
    pub data: tempfile::TempDir,
}

/// The shared parts and the nodes.
pub struct Cluster {
    pub net: Net,
    pub db: String,
    pub s3: Moto,
    pub nodes: Vec<Node>,
    pub _pg: Option<berth_store::testing::PgCluster>,
}

impl Cluster {
    pub async fn start(n: usize) -> Cluster {
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

    pub async fn spawn(&self, i: usize, data: tempfile::TempDir) -> Node {
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
            .env(
                "BERTH_NODE_LABELS",
                format!("zone={},host=node{i}", if i == 3 { "b" } else { "a" }),
            )
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

    pub fn api(&self, i: usize) -> &Api {
        &self.nodes[i - 1].api
    }

    /// The index (1-based) of the node named `name`.
    pub fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .expect("known node")
            + 1
    }

    pub async fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i - 1].child.take() {
            c.start_kill().expect("kill");
            c.wait().await.expect("wait");
        }
    }

    /// SIGTERM, a clean exit within 30 s.
    pub async fn stop(&mut self, i: usize) {
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
    pub async fn restart(&mut self, i: usize) {
        self.stop(i).await;
        let data = std::mem::replace(
            &mut self.nodes[i - 1].data,
            tempfile::tempdir().expect("tmp"),
        );
        let node = self.spawn(i, data).await;
        self.nodes[i - 1] = node;
    }

    pub async fn stop_all(mut self) {
        for i in 1..=self.nodes.len() {
            if self.nodes[i - 1].child.is_some() {
                self.stop(i).await;
            }
        }
    }
}

/// Poll `f` until it gives Some, at most `secs`.
pub async fn until<T, F: std::future::Future<Output = Option<T>>>(
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

pub async fn node_states(api: &Api) -> Vec<(String, String)> {
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

pub async fn new_box(api: &Api, extra: Value) -> Value {
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
pub async fn box_on(c: &Cluster, i: usize, extra: Value) -> String {
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

pub async fn exec(api: &Api, id: &str, argv: &[&str], stdin: Option<&str>) -> Value {
    let r = api
        .post(
            &format!("/v1/boxes/{id}/exec"),
            json!({"argv": argv, "stdin": stdin, "timeout_s": 30}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json
}

pub const WS_ECHO: &str = r#"
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
pub async fn ws_echo(api: &Api, id: &str, text: &str) -> String {
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

pub fn echo_agent() -> Value {
    json!({"kind": "command", "argv": ["/bin/sh", "-c", "while read -r l; do echo \"echo: $l\"; done"]})
}

/// Whether any process on the machine has `marker` in its command line.
pub fn process_with(marker: &str) -> bool {
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

pub trait CloneApi {
    fn clone_api(&self) -> Api;
}

impl CloneApi for Api {
    fn clone_api(&self) -> Api {
        Api::new(&self.url, &self.token)
    }
}
