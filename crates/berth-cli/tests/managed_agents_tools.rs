//! What a Managed Agents session's box gets beyond the built-in toolset, end to end (real server,
//! real box, the real Claude Code CLI, the mock model): custom tools (the client runs them; the
//! CLI reaches them through berth's MCP server on the box-side API) driven by the official
//! Python SDK, an agent's own MCP server reached through the box's egress allowlist, and an
//! environment's pip and npm packages installed from an index and a registry the test serves.

mod common;
mod managed_harness;

use axum::response::IntoResponse;
use berth_mock_model::{scenario::Scenario, Mock};
use common::{exec_sh, run_sdk_script, tenant_key, venv_python, Api, Server};
use managed_harness::{anth, events_until, idle_with};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn scenario() -> Scenario {
    serde_json::from_value(json!({"rules": [
        {"match": "weather", "steps": [
            {"text": "Let me ask.", "tool_use": [{"name": "mcp__berth__get_weather", "input": {"city": "Paris"}}]},
            {"text": "It is sunny in Paris."}
        ]},
        {"match": "look it up", "steps": [
            {"tool_use": [{"name": "mcp__docs__lookup", "input": {"word": "berth"}}]},
            {"text": "Found it."}
        ]},
        {"match": "wait for me", "steps": [
            {"tool_use": [{"name": "mcp__berth__get_weather", "input": {"city": "Oslo"}}]},
            {"text": "ok"}
        ]}
    ]}))
    .expect("scenario")
}

async fn setup(extra: &[(&str, &str)]) -> (tempfile::TempDir, Server, Mock) {
    managed_harness::setup(scenario(), Duration::ZERO, extra).await
}

/// The tool results (`tool_use_id`, text) in a recorded model request's messages.
fn tool_results(body: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for m in body["messages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        for b in m["content"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if b["type"] == "tool_result" {
                out.push((
                    b["tool_use_id"].as_str().unwrap_or("").to_string(),
                    b["content"].to_string(),
                ));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_tool_round_trip_with_the_official_python_sdk() {
    let (_d, srv, mock) = setup(&[]).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/managed_agents_custom.py"
    );
    let mut cmd = tokio::process::Command::new(venv_python());
    cmd.arg(script);
    let res = run_sdk_script(cmd, &srv, &a.token).await;
    assert_eq!(res["refused"].as_array().map(Vec::len), Some(2), "{res}");
    // The model saw the client's tool (as the CLI names it, with the client's schema), and its
    // next request carried the client's result for exactly that call.
    let seen: Vec<_> = mock
        .recorded()
        .into_iter()
        .filter(|r| r.path == "/v1/messages")
        .collect();
    let asked = seen
        .iter()
        .find(|r| tool_results(&r.body).is_empty())
        .expect("the first request");
    let tool = asked.body["tools"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "mcp__berth__get_weather"))
        .unwrap_or_else(|| panic!("the custom tool was offered: {}", asked.body["tools"]));
    assert_eq!(
        tool["input_schema"]["properties"]["city"]["type"], "string",
        "{tool}"
    );
    let answered: Vec<_> = seen.iter().flat_map(|r| tool_results(&r.body)).collect();
    assert!(
        answered
            .iter()
            .any(|(id, text)| id.starts_with("toolu_") && text.contains("sunny, 21 C in Paris")),
        "the client's result reached the model: {answered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_tool_calls_are_bound_to_the_sessions_token_and_answers_are_checked() {
    let (_d, srv, _mock) = setup(&[]).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let (_, b) = tenant_key(&srv.client(), "team-b").await;
    // Names the CLI cannot carry, and schemas that are not objects, are refused up front.
    for bad in [
        json!({"type": "custom", "name": "x".repeat(60), "input_schema": {"type": "object"}}),
        json!({"type": "custom", "name": "a b", "input_schema": {"type": "object"}}),
        json!({"type": "custom", "name": "t", "input_schema": {"type": "string"}}),
    ] {
        let (s, body) = anth(
            &a,
            "POST",
            "/v1/agents",
            Some(json!({"name": "n", "model": "m", "tools": [bad]})),
        )
        .await;
        assert_eq!(s, 400, "{body}");
    }
    let (_, env) = anth(&a, "POST", "/v1/environments", Some(json!({"name": "e"}))).await;
    let (s, agent) = anth(
        &a,
        "POST",
        "/v1/agents",
        Some(json!({"name": "w", "model": "claude-sonnet-4-5", "tools": [
            {"type": "custom", "name": "get_weather", "input_schema": {"type": "object"}}]})),
    )
    .await;
    assert_eq!(s, 200, "{agent}");
    let (s, sess) = anth(
        &a,
        "POST",
        "/v1/sessions",
        Some(json!({"agent": agent["id"], "environment_id": env["id"]})),
    )
    .await;
    assert_eq!(s, 200, "{sess}");
    let sid = sess["id"].as_str().expect("id").to_string();
    let (s, _) = anth(
        &a,
        "POST",
        &format!("/v1/sessions/{sid}/events"),
        Some(json!({"events": [{"type": "user.message", "content": "wait for me"}]})),
    )
    .await;
    assert_eq!(s, 200);
    let evs = events_until(&a, &sid, idle_with("requires_action")).await;
    let use_id = evs
        .iter()
        .find(|e| e["type"] == "agent.custom_tool_use")
        .and_then(|e| e["id"].as_str())
        .expect("custom tool use")
        .to_string();

    // From inside the session's box, the MCP endpoint answers nobody without the session's
    // token, and a forged one is no better.
    let boxes = a.get("/v1/boxes").await;
    let bx = boxes.json["items"][0]["id"]
        .as_str()
        .expect("the session's box")
        .to_string();
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","arguments":{},"_meta":{"claudecode/toolUseId":"toolu_x"}}}"#;
    for auth in ["", "-H 'Authorization: Bearer berth_forged_token'"] {
        let r = exec_sh(
            &a,
            &bx,
            &format!(
                "curl -s -o /dev/null -w '%{{http_code}}' -m 10 {auth} -H 'content-type: application/json' -d '{call}' http://127.0.0.1:47102/v1/custom_tools/mcp"
            ),
            30,
        )
        .await;
        assert_eq!(r["stdout"], "401", "{r}");
    }
    // Another tenant cannot answer, and answers are checked: a non-custom event, an oversized
    // result.
    let send = |api: Api, ev: Value| {
        let sid = sid.clone();
        async move {
            anth(
                &api,
                "POST",
                &format!("/v1/sessions/{sid}/events"),
                Some(json!({ "events": [ev] })),
            )
            .await
        }
    };
    let (s, _) = send(
        b.clone(),
        json!({"type": "user.custom_tool_result", "custom_tool_use_id": use_id, "content": []}),
    )
    .await;
    assert_eq!(s, 404);
    let first = evs[0]["id"].as_str().expect("id");
    let (s, body) = send(
        a.clone(),
        json!({"type": "user.custom_tool_result", "custom_tool_use_id": first, "content": []}),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    let big = "x".repeat(300 * 1024);
    let (s, body) = send(
        a.clone(),
        json!({"type": "user.custom_tool_result", "custom_tool_use_id": use_id, "content": [{"type": "text", "text": big}]}),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    // The real answer still goes through, once.
    let answer = json!({"type": "user.custom_tool_result", "custom_tool_use_id": use_id, "content": "cold", "is_error": false});
    let (s, body) = send(a.clone(), answer.clone()).await;
    assert_eq!(s, 200, "{body}");
    let (s, _) = send(a.clone(), answer).await;
    assert_eq!(s, 409, "a second answer to the same use");
    let evs = events_until(&a, &sid, idle_with("end_turn")).await;
    let result = evs
        .iter()
        .find(|e| e["type"] == "user.custom_tool_result")
        .expect("result event");
    assert_eq!(result["custom_tool_use_id"], use_id.as_str());
    assert!(result["content"].to_string().contains("cold"), "{result}");
    assert_eq!(srv.client().get("/healthz").await.status, 200);
}

/// A small MCP server (Streamable HTTP, JSON answers) with one tool, `lookup`, recording calls.
async fn mcp_server() -> (u16, Arc<Mutex<Vec<Value>>>) {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let calls: Arc<Mutex<Vec<Value>>> = Arc::default();
    let seen = calls.clone();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |axum::Json(req): axum::Json<Value>| {
            let seen = seen.clone();
            async move {
                let id = req["id"].clone();
                let result = match req["method"].as_str().unwrap_or("") {
                    _ if req.get("id").is_none() => return StatusCode::ACCEPTED.into_response(),
                    "initialize" => json!({
                        "protocolVersion": req["params"]["protocolVersion"],
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": "docs", "version": "1"},
                    }),
                    "tools/list" => json!({"tools": [{
                        "name": "lookup", "description": "Look a word up",
                        "inputSchema": {"type": "object", "properties": {"word": {"type": "string"}}},
                    }]}),
                    "tools/call" => {
                        if let Ok(mut s) = seen.lock() {
                            s.push(req["params"].clone());
                        }
                        json!({"content": [{"type": "text", "text": "lookup says: a place for a ship"}]})
                    }
                    _ => json!({}),
                };
                axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": result})).into_response()
            }
        })
        .get(|| async { StatusCode::METHOD_NOT_ALLOWED }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (port, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_mcp_server_is_reached_through_the_egress_allowlist() {
    let (port, calls) = mcp_server().await;
    let overrides = format!("mcp.test=127.0.0.1:{port}");
    let (_d, srv, mock) = setup(&[("BERTH_EGRESS_OVERRIDES", &overrides)]).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let url = format!("http://mcp.test:{port}/mcp");
    // A server without its toolset, and a toolset without its server, are refused.
    for body in [
        json!({"name": "n", "model": "m", "mcp_servers": [{"type": "url", "name": "docs", "url": url}]}),
        json!({"name": "n", "model": "m", "tools": [{"type": "mcp_toolset", "mcp_server_name": "docs"}]}),
        json!({"name": "n", "model": "m", "mcp_servers": [{"type": "url", "name": "x", "url": "http://127.0.0.1/mcp"}], "tools": [{"type": "mcp_toolset", "mcp_server_name": "x"}]}),
    ] {
        let (s, b) = anth(&a, "POST", "/v1/agents", Some(body)).await;
        assert_eq!(s, 400, "{b}");
    }
    let (s, agent) = anth(
        &a,
        "POST",
        "/v1/agents",
        Some(json!({"name": "m", "model": "claude-sonnet-4-5",
            "mcp_servers": [{"type": "url", "name": "docs", "url": url}],
            "tools": [{"type": "mcp_toolset", "mcp_server_name": "docs"}]})),
    )
    .await;
    assert_eq!(s, 200, "{agent}");
    assert_eq!(agent["mcp_servers"][0]["name"], "docs", "{agent}");
    let (_, env) = anth(
        &a,
        "POST",
        "/v1/environments",
        Some(json!({"name": "e", "config": {"type": "cloud", "networking": {"type": "limited", "allowed_hosts": [], "allow_mcp_servers": true}}})),
    )
    .await;
    let (s, sess) = anth(
        &a,
        "POST",
        "/v1/sessions",
        Some(json!({"agent": agent["id"], "environment_id": env["id"]})),
    )
    .await;
    assert_eq!(s, 200, "{sess}");
    let sid = sess["id"].as_str().expect("id");
    // The box's allowlist is the MCP server's host, exactly.
    let bx = a.get("/v1/boxes").await.json["items"][0].clone();
    assert_eq!(bx["network"]["allow"], json!(["mcp.test"]), "{bx}");
    let (s, _) = anth(
        &a,
        "POST",
        &format!("/v1/sessions/{sid}/events"),
        Some(json!({"events": [{"type": "user.message", "content": "look it up"}]})),
    )
    .await;
    assert_eq!(s, 200);
    let evs = events_until(&a, sid, idle_with("end_turn")).await;
    let used = evs
        .iter()
        .find(|e| e["type"] == "agent.mcp_tool_use")
        .unwrap_or_else(|| panic!("an MCP tool use: {evs:?}"));
    assert_eq!(used["mcp_server_name"], "docs", "{used}");
    assert_eq!(used["name"], "lookup", "{used}");
    let result = evs
        .iter()
        .find(|e| e["type"] == "agent.mcp_tool_result")
        .expect("an MCP tool result");
    assert_eq!(result["mcp_tool_use_id"], used["id"]);
    // The call reached the server, with the model's arguments, and its answer the model.
    let got = calls.lock().expect("calls").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["name"], "lookup");
    assert_eq!(got[0]["arguments"]["word"], "berth");
    let answered: Vec<_> = mock
        .recorded()
        .iter()
        .flat_map(|r| tool_results(&r.body))
        .collect();
    assert!(
        answered
            .iter()
            .any(|(_, t)| t.contains("lookup says: a place for a ship")),
        "{answered:?}"
    );
}

/// A pure-Python wheel `berthdemo` 1.0, made by the test's Python (no build tools needed).
async fn demo_wheel() -> Vec<u8> {
    let script = r#"
import base64, hashlib, io, sys, zipfile
files = {
    "berthdemo/__init__.py": b'VALUE = "from the test index"\n',
    "berthdemo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: berthdemo\nVersion: 1.0\n",
    "berthdemo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: berth-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = ""
for name, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record += f"{name},sha256={digest},{len(data)}\n"
record += "berthdemo-1.0.dist-info/RECORD,,\n"
files["berthdemo-1.0.dist-info/RECORD"] = record.encode()
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
sys.stdout.write(buf.getvalue().hex())
"#;
    let out = python(script).await;
    hex::decode(out.trim_ascii()).expect("hex")
}

/// Serves on `l` what `answer` gives for a path (None: 404), recording every path asked for
/// (what the test then checks the box fetched).
fn recording_server(
    l: tokio::net::TcpListener,
    answer: impl Fn(&str) -> Option<axum::response::Response> + Clone + Send + Sync + 'static,
) -> Arc<Mutex<Vec<String>>> {
    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = asked.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let (seen, answer) = (seen.clone(), answer.clone());
        async move {
            if let Ok(mut s) = seen.lock() {
                s.push(uri.path().to_string());
            }
            answer(uri.path()).unwrap_or_else(|| axum::http::StatusCode::NOT_FOUND.into_response())
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    asked
}

/// An environment's packages of one manager, end to end.
struct PackageCase<'a> {
    manager: &'static str,
    /// The environment's metadata naming the test's index or registry.
    meta: Value,
    package: &'static str,
    /// Each must match a path the index was asked for.
    fetched: &'a [&'a dyn Fn(&str) -> bool],
    /// Run in the box: prints `prints` when the package is installed.
    check: &'static str,
    prints: &'static str,
}

/// An environment with `c.package` is installed from the test's index, through the egress
/// proxy, before its first session is there; one with a package the index lacks refuses the
/// session with the manager's own words.
async fn installs_before_the_first_turn(a: &Api, asked: &Mutex<Vec<String>>, c: PackageCase<'_>) {
    let m = c.manager;
    let (s, env) = anth(
        a,
        "POST",
        "/v1/environments",
        Some(json!({"name": m, "metadata": c.meta,
            "config": {"type": "cloud", "packages": {"type": "packages", m: [c.package]}}})),
    )
    .await;
    assert_eq!(s, 200, "{env}");
    assert_eq!(env["config"]["packages"][m], json!([c.package]));
    let (_, agent) = anth(
        a,
        "POST",
        "/v1/agents",
        Some(json!({"name": m, "model": "claude-sonnet-4-5"})),
    )
    .await;
    let (s, sess) = anth(
        a,
        "POST",
        "/v1/sessions",
        Some(json!({"agent": agent["id"], "environment_id": env["id"]})),
    )
    .await;
    assert_eq!(s, 200, "{sess}");
    let got = asked.lock().expect("asked").clone();
    for (i, f) in c.fetched.iter().enumerate() {
        assert!(got.iter().any(|p| f(p)), "fetch {i}: {got:?}");
    }
    let bx = a.get("/v1/boxes").await.json["items"][0]["id"]
        .as_str()
        .expect("box")
        .to_string();
    let r = exec_sh(a, &bx, c.check, 60).await;
    assert_eq!(r["stdout"].as_str().map(str::trim), Some(c.prints), "{r}");

    let (_, env2) = anth(
        a,
        "POST",
        "/v1/environments",
        Some(json!({"name": format!("{m}2"), "metadata": c.meta,
            "config": {"type": "cloud", "packages": {m: ["nosuchpackage"]}}})),
    )
    .await;
    let (s, b) = anth(
        a,
        "POST",
        "/v1/sessions",
        Some(json!({"agent": agent["id"], "environment_id": env2["id"]})),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap_or("").contains(m),
        "{b}"
    );
}

/// The stdout of the test venv's Python running `script` (which must succeed).
async fn python(script: &str) -> Vec<u8> {
    let out = tokio::process::Command::new(venv_python())
        .args(["-c", script])
        .output()
        .await
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A PEP 503 index on loopback serving `berthdemo`, recording the paths asked for.
async fn pip_index() -> (u16, Arc<Mutex<Vec<String>>>) {
    use sha2::Digest;
    let wheel = demo_wheel().await;
    let name = "berthdemo-1.0-py3-none-any.whl";
    let page = format!(
        "<!DOCTYPE html><html><body><a href=\"/files/{name}#sha256={}\">{name}</a></body></html>",
        hex::encode(sha2::Sha256::digest(&wheel))
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let files = format!("/files/{name}");
    let asked = recording_server(l, move |path| match path {
        "/simple/berthdemo/" | "/simple/berthdemo" => {
            Some(([("content-type", "text/html")], page.clone()).into_response())
        }
        p if p == files => Some(wheel.clone().into_response()),
        _ => None,
    });
    (port, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environments_pip_packages_are_installed_before_the_first_turn() {
    let (port, asked) = pip_index().await;
    let overrides = format!("pypi.test=127.0.0.1:{port}");
    let (_d, srv, _mock) = setup(&[("BERTH_EGRESS_OVERRIDES", &overrides)]).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    // Managers berth cannot serve, and specs that look like options, are refused by name.
    for (packages, word) in [
        (json!({"apt": ["curl"]}), "apt"),
        (json!({"gem": ["rails"]}), "gem"),
        (json!({"pip": ["--index-url=http://evil"]}), "pip"),
    ] {
        let (s, b) = anth(
            &a,
            "POST",
            "/v1/environments",
            Some(json!({"name": format!("bad-{word}"), "config": {"type": "cloud", "packages": packages}})),
        )
        .await;
        assert_eq!(s, 400, "{b}");
        assert!(
            b["error"]["message"].as_str().unwrap_or("").contains(word),
            "{b}"
        );
    }
    let index = format!("http://pypi.test:{port}/simple");
    let case = PackageCase {
        manager: "pip",
        meta: json!({"berth_pip_index_url": index}),
        package: "berthdemo==1.0",
        fetched: &[&|p: &str| p.starts_with("/simple/berthdemo"), &|p: &str| {
            p.starts_with("/files/")
        }],
        check: "python3 -c 'import berthdemo; print(berthdemo.VALUE)'",
        prints: "from the test index",
    };
    installs_before_the_first_turn(&a, &asked, case).await;
}

/// A tiny npm registry on loopback serving `berthnpm` 1.0.0 (a tarball the test's Python
/// makes), recording the paths asked for; `host` is the name the box reaches it by.
async fn npm_registry(host: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let script = r#"
import base64, hashlib, io, json, sys, tarfile
files = {
    "package/package.json": json.dumps({"name": "berthnpm", "version": "1.0.0", "main": "index.js"}).encode(),
    "package/index.js": b'module.exports = "from the test registry";\n',
}
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz") as t:
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        t.addfile(info, io.BytesIO(data))
tgz = buf.getvalue()
print(json.dumps({"tgz": tgz.hex(), "shasum": hashlib.sha1(tgz).hexdigest(),
    "integrity": "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode()}))
"#;
    let out = python(script).await;
    let made: Value = serde_json::from_slice(&out).expect("json");
    let tgz = hex::decode(made["tgz"].as_str().expect("tgz")).expect("hex");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let packument = json!({
        "name": "berthnpm",
        "dist-tags": {"latest": "1.0.0"},
        "versions": {"1.0.0": {
            "name": "berthnpm", "version": "1.0.0", "main": "index.js",
            "dist": {
                "tarball": format!("http://{host}:{port}/berthnpm/-/berthnpm-1.0.0.tgz"),
                "shasum": made["shasum"], "integrity": made["integrity"],
            },
        }},
    })
    .to_string();
    let asked = recording_server(l, move |path| match path {
        "/berthnpm" => {
            Some(([("content-type", "application/json")], packument.clone()).into_response())
        }
        "/berthnpm/-/berthnpm-1.0.0.tgz" => {
            Some(([("content-type", "application/octet-stream")], tgz.clone()).into_response())
        }
        _ => None,
    });
    (port, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environments_npm_packages_are_installed_before_the_first_turn() {
    let (port, asked) = npm_registry("npm.test").await;
    let overrides = format!("npm.test=127.0.0.1:{port}");
    let (_d, srv, _mock) = setup(&[("BERTH_EGRESS_OVERRIDES", &overrides)]).await;
    let (_, a) = tenant_key(&srv.client(), "team-a").await;
    let registry = format!("http://npm.test:{port}/");
    let case = PackageCase {
        manager: "npm",
        meta: json!({"berth_npm_registry": registry}),
        package: "berthnpm@1.0.0",
        fetched: &[&|p: &str| p == "/berthnpm", &|p: &str| p.ends_with(".tgz")],
        // `require` finds it from the agent's working directory.
        check: "cd /workspace && node -e 'console.log(require(\"berthnpm\"))'",
        prints: "from the test registry",
    };
    installs_before_the_first_turn(&a, &asked, case).await;
}
