//! What a newcomer trips over (#15): the `berth` binary as a user runs it, against a live
//! server; ephemeral sessions that end with their task; default idle timeouts; errors that
//! name the thing; event order.

mod common;

use common::{claude_bin, Api, Server};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const REAL_KEY: &str = "sk-ant-real-secret-for-tests-0123456789";

/// `berth ARGS` as a user runs it: no BERTH_* variables but `env`, a HOME of its own (so the
/// default data dir is empty), bounded in time.
async fn berth(home: &Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.args(args)
        .env("HOME", home)
        .env_remove("XDG_DATA_HOME")
        .kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("BERTH_") {
            cmd.env_remove(&k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("berth {args:?} did not finish in 180 s"))
        .expect("run berth")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run `berth` against `srv` (found through its data dir, as on the server's machine) and
/// insist it succeeds; its stdout and stderr.
async fn ok(home: &Path, srv: &Server, args: &[&str]) -> (String, String) {
    let data = srv.data.to_string_lossy().into_owned();
    let out = berth(home, &[("BERTH_DATA_DIR", &data)], args).await;
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "berth {args:?}: {o}\n{e}");
    (o, e)
}

async fn wait_box_state(api: &Api, id: &str, state: &str) -> Value {
    api.wait_for(&format!("/v1/boxes/{id}"), 60, |b| b["state"] == state)
        .await
}

/// A server whose model upstream is the mock (the demo scenario: "make a file" writes
/// /workspace/hello.txt), with the real Claude Code CLI.
async fn claude_server(data: &Path, extra: &[(&str, &str)]) -> (Server, berth_mock_model::Mock) {
    let mock =
        berth_mock_model::Mock::new(berth_mock_model::scenario::Scenario::demo(), Duration::ZERO);
    let url = berth_mock_model::spawn_loopback(&mock).await.expect("mock");
    let bin = claude_bin();
    let mut env = vec![
        ("BERTH_UPSTREAM_URL", url.as_str()),
        ("ANTHROPIC_API_KEY", REAL_KEY),
        ("BERTH_CLAUDE_BIN", bin.as_str()),
    ];
    env.extend_from_slice(extra);
    (Server::start_with(data, &env).await, mock)
}

// ---- 1. ephemeral means it ends ----

#[tokio::test]
async fn ephemeral_api_session_with_a_prompt_ends_and_leaves_no_box() {
    let dir = tempfile::tempdir().expect("tmp");
    // Box time priced high enough to show in a 4-decimal table.
    let (srv, _mock) = claude_server(dir.path(), &[("BERTH_BOX_HOUR_USD", "360")]).await;
    let api = srv.client();

    // The hosting guide's one-off pattern: no box spec, a prompt, the real Claude CLI.
    let r = api
        .post(
            "/v1/sessions",
            json!({"agent": {"kind": "claude"}, "prompt": "make a file"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    let bx = r.json["box_id"].as_str().expect("box").to_string();
    let s = api
        .wait_for(&format!("/v1/sessions/{sid}"), 120, |s| {
            s["state"] == "stopped" || s["state"] == "failed"
        })
        .await;
    assert_eq!(s["state"], "stopped", "{s}");
    assert_eq!(s["state_reason"], "done", "{s}");
    wait_box_state(&api, &bx, "destroyed").await;
    let evs = api
        .sse(&format!("/v1/sessions/{sid}/events"), None, usize::MAX)
        .await;
    let result = evs
        .iter()
        .position(|e| e["type"] == "result")
        .expect("a result");
    assert_eq!(evs[result]["data"]["is_error"], false);
    assert_eq!(
        evs.last().map(|e| e["data"]["state"].clone()),
        Some(json!("stopped")),
        "the log ends with the session's end: {evs:?}"
    );
    let live = api.get("/v1/boxes").await.json;
    assert!(
        live["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|b| b["state"] != "running"),
        "no box left running: {live}"
    );

    // "box": {} is the same: ephemeral. A command agent ends at exit; its box goes too.
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {}, "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "read l; echo got $l"]},
                   "prompt": "x"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let bx2 = r.json["box_id"].as_str().expect("box").to_string();
    let b = wait_box_state(&api, &bx2, "destroyed").await;
    assert_eq!(b["lifecycle"], "ephemeral");

    // keep_open: the session stays for more messages after its result; the box with it.
    let r = api
        .post(
            "/v1/sessions",
            json!({"agent": {"kind": "claude"}, "prompt": "make a file", "keep_open": true}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let kept = r.json["id"].as_str().expect("id").to_string();
    let kept_box = r.json["box_id"].as_str().expect("box").to_string();
    api.until(&kept, "result", 1).await;
    let s = api
        .wait_for(&format!("/v1/sessions/{kept}"), 30, |s| {
            s["state"] == "idle"
        })
        .await;
    assert!(s["state_reason"].is_null(), "{s}");
    assert_eq!(
        api.get(&format!("/v1/boxes/{kept_box}")).await.json["state"],
        "running"
    );
    assert_eq!(
        api.delete(&format!("/v1/sessions/{kept}")).await.json["state"],
        "stopped"
    );
    wait_box_state(&api, &kept_box, "destroyed").await;

    // `berth usage`: the rows add up to the total (box time is not any session's row).
    let home = tempfile::tempdir().expect("home");
    let (table, _) = ok(home.path(), &srv, &["usage", "--by", "session"]).await;
    let mut rows = 0.0;
    let mut total = None;
    for line in table.lines().skip(1) {
        let usd: f64 = line
            .split_whitespace()
            .last()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{table}"));
        if line.starts_with("TOTAL") {
            total = Some(usd);
        } else {
            rows += usd;
        }
    }
    let total = total.unwrap_or_else(|| panic!("{table}"));
    assert!(total > 0.01, "box time priced in: {table}");
    assert!(
        (rows - total).abs() < 0.0005,
        "rows {rows} != total {total}:\n{table}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_message_before_the_first_result_keeps_an_ephemeral_session_open() {
    let dir = tempfile::tempdir().expect("tmp");
    let (srv, mock) = claude_server(dir.path(), &[]).await;
    let api = srv.client();
    let r = api
        .post(
            "/v1/sessions",
            json!({"agent": {"kind": "claude"}, "prompt": "be slow please"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sid = r.json["id"].as_str().expect("id").to_string();
    let bx = r.json["box_id"].as_str().expect("box").to_string();
    // Mid-turn (the model has the prompt), the client says more: it is a conversation now.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !mock
        .recorded()
        .iter()
        .any(|r| r.body["messages"].to_string().contains("be slow please"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the model was never asked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = api
        .post(
            &format!("/v1/sessions/{sid}/messages"),
            json!({"content": "make a file"}),
        )
        .await;
    assert_eq!(m.status, 202, "{}", m.json);
    // The slow turn takes 30 s; then the second message is answered (it writes hello.txt).
    // Polled, not streamed: the stream helper gives up after 30 s without an event.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s = api.get(&format!("/v1/sessions/{sid}")).await.json;
        assert_ne!(s["state"], "stopped", "ended at its first result: {s}");
        let file = api.get(&format!("/v1/boxes/{bx}/files/hello.txt")).await;
        if s["state"] == "idle" && file.status == 200 {
            assert!(s["state_reason"].is_null(), "{s}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "second task not done: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    api.until(&sid, "result", 2).await;
    assert_eq!(
        api.get(&format!("/v1/boxes/{bx}")).await.json["state"],
        "running"
    );
    // Ending the session ends its ephemeral box.
    api.delete(&format!("/v1/sessions/{sid}")).await;
    wait_box_state(&api, &bx, "destroyed").await;
    srv.stop().await;
}

#[tokio::test]
async fn berth_run_says_done_and_what_out_copied() {
    let dir = tempfile::tempdir().expect("tmp");
    let (srv, _mock) = claude_server(dir.path(), &[]).await;
    let api = srv.client();
    let home = tempfile::tempdir().expect("home");
    let project = home.path().join("project");
    std::fs::create_dir_all(project.join("src")).expect("mkdir");
    std::fs::write(project.join("src/main.txt"), "input\n").expect("write");
    let out = home.path().join("result");
    let (stdout, stderr) = ok(
        home.path(),
        &srv,
        &[
            "run",
            "--dir",
            &project.to_string_lossy(),
            "--out",
            &out.to_string_lossy(),
            "make a file",
        ],
    )
    .await;
    let all = format!("{stdout}\n{stderr}");
    assert!(!all.contains("stopped by client"), "{all}");
    assert_eq!(stderr.lines().last(), Some("done"), "{all}");
    assert!(
        stderr.contains("copied 1 files (6 bytes) from"),
        "says what --dir copied: {all}"
    );
    assert!(
        stderr.contains(&format!("from /workspace to {}", out.display())),
        "says what --out copied: {all}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("src/main.txt")).expect("copied back"),
        "input\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("hello.txt")).expect("the agent's file"),
        "Hello from an agent in a berth box!\n"
    );
    // Nothing left running.
    let boxes = api.get("/v1/boxes").await.json;
    assert!(
        boxes["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|b| b["state"] == "destroyed"),
        "{boxes}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn boxes_get_a_default_idle_timeout_and_null_means_never() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(dir.path(), &[("BERTH_IDLE_TIMEOUT_S", "2")]).await;
    let api = srv.client();
    let spec = |extra: Value| {
        let mut s = json!({"resources": {"memory_mib": 128, "disk_mib": 32}});
        if let (Some(o), Some(e)) = (s.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        s
    };
    let unsaid = api.post("/v1/boxes", spec(json!({}))).await;
    assert_eq!(unsaid.status, 201, "{}", unsaid.json);
    assert_eq!(unsaid.json["idle_timeout_s"], 2);
    assert_eq!(unsaid.json["lifecycle"], "persistent");
    let never = api
        .post("/v1/boxes", spec(json!({"idle_timeout_s": null})))
        .await;
    assert_eq!(never.status, 201, "{}", never.json);
    assert!(never.json["idle_timeout_s"].is_null(), "{}", never.json);
    let unsaid = unsaid.json["id"].as_str().expect("id").to_string();
    let never = never.json["id"].as_str().expect("id").to_string();
    let b = wait_box_state(&api, &unsaid, "stopped").await;
    assert_eq!(b["state_reason"], "idle_timeout");
    // Well past its neighbour's deadline, the "never" box still runs.
    assert_eq!(
        api.get(&format!("/v1/boxes/{never}")).await.json["state"],
        "running"
    );
    // The CLI's create leaves the timeout to the server too.
    let home = tempfile::tempdir().expect("home");
    let (o, _) = ok(home.path(), &srv, &["create", "--json"]).await;
    let b: Value = serde_json::from_str(&o).expect("json");
    assert_eq!(b["idle_timeout_s"], 2, "{b}");
    srv.stop().await;
}

// ---- #14.8: a failed create does not leak the box it made ----

#[tokio::test]
async fn a_session_create_that_fails_destroys_the_box_it_made() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    // A shared box's per-session directory is made by `mkdir` from PATH: an empty PATH makes
    // the create fail after the box exists.
    let r = api
        .post(
            "/v1/sessions",
            json!({"box": {"shared": true, "env": {"PATH": "/nonexistent"},
                           "resources": {"memory_mib": 128, "disk_mib": 32}},
                   "agent": {"kind": "command", "argv": ["/bin/cat"]}}),
        )
        .await;
    assert!(r.status >= 400, "{}", r.json);
    let boxes = api.get("/v1/boxes").await.json;
    let items = boxes["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "the box was made: {boxes}");
    let id = items[0]["id"].as_str().expect("id");
    wait_box_state(&api, id, "destroyed").await;
    srv.stop().await;
}

// ---- 7. event order ----

#[tokio::test]
async fn running_status_comes_before_the_output_it_causes() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let r = api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 256, "disk_mib": 32, "pids": 256}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let bx = r.json["id"].as_str().expect("id").to_string();
    let mut sids = Vec::new();
    for _ in 0..16 {
        // Output at once, unprompted; then it waits.
        let r = api
            .post(
                "/v1/sessions",
                json!({"box": bx, "agent": {"kind": "command", "argv": ["/bin/sh", "-c", "echo one; echo two; exec cat"]}}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.json);
        sids.push(r.json["id"].as_str().expect("id").to_string());
    }
    for sid in &sids {
        let evs = api.until(sid, "stdout", 2).await;
        let running = evs
            .iter()
            .find(|e| e["type"] == "status" && e["data"]["state"] == "running")
            .unwrap_or_else(|| panic!("no running status: {evs:?}"));
        let first_out = evs.iter().find(|e| e["type"] == "stdout").expect("stdout");
        assert!(
            running["seq"].as_i64() < first_out["seq"].as_i64(),
            "running committed after the output it caused: {evs:?}"
        );
        api.delete(&format!("/v1/sessions/{sid}")).await;
    }
    srv.stop().await;
}

// ---- 5, 6: errors name the thing; box events name the box ----

#[tokio::test]
async fn errors_name_the_program_and_the_allowed_values() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let home = tempfile::tempdir().expect("home");
    let (id, _) = ok(home.path(), &srv, &["create", "--memory-mib", "128"]).await;
    let id = id.trim().to_string();
    let data = srv.data.to_string_lossy().into_owned();
    let out = berth(
        home.path(),
        &[("BERTH_DATA_DIR", &data)],
        &["exec", &id, "--", "no-such-prog"],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("program not found: no-such-prog"),
        "{}",
        text(&out.stderr)
    );
    // A command agent that cannot start says which program.
    let out = berth(
        home.path(),
        &[("BERTH_DATA_DIR", &data)],
        &["start", "--box", &id, "--", "no-such-agent"],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("program not found: no-such-agent"),
        "{}",
        text(&out.stderr)
    );
    // --by is checked by the CLI, with the allowed values.
    let out = berth(
        home.path(),
        &[("BERTH_DATA_DIR", &data)],
        &["usage", "--by", "bogus"],
    )
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("bogus") && err.contains("session, box, tenant, model"),
        "{err}"
    );
    // The box's own log names the box, not a session.
    let evs = api.get(&format!("/v1/boxes/{id}/events")).await.json;
    let first = &evs["items"][0];
    assert_eq!(first["box_id"], id.as_str(), "{evs}");
    assert!(first.get("session_id").is_none(), "{evs}");
    srv.stop().await;
}

// ---- 2. the CLI finds its server the way the server was configured ----

#[tokio::test]
async fn the_cli_finds_the_server_through_its_data_dir_and_config() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let home = tempfile::tempdir().expect("home");
    let data = srv.data.to_string_lossy().into_owned();
    // BERTH_DATA_DIR.
    let out = berth(home.path(), &[("BERTH_DATA_DIR", &data)], &["ls", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The config file's data_dir.
    let cfg = home.path().join("berth.toml");
    std::fs::write(&cfg, format!("data_dir = {:?}\n", data)).expect("config");
    let cfg = cfg.to_string_lossy().into_owned();
    let out = berth(home.path(), &[("BERTH_CONFIG", &cfg)], &["ls", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(v["boxes"].is_array(), "{v}");
    // Nowhere to find a key: the error says where it looked and what to set.
    let out = berth(home.path(), &[], &["ls"]).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    for needle in [
        "BERTH_TOKEN",
        "--token",
        "BERTH_DATA_DIR",
        "BERTH_CONFIG",
        &home
            .path()
            .join(".local/share/berth/admin.key")
            .display()
            .to_string(),
    ] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    srv.stop().await;
}

// ---- 3. help and output ----

#[tokio::test]
async fn every_flag_is_described_and_client_flags_stay_off_serve() {
    let home = tempfile::tempdir().expect("home");
    let commands: &[&[&str]] = &[
        &["serve"],
        &["mock-model"],
        &["ls"],
        &["create"],
        &["exec"],
        &["cp"],
        &["rm"],
        &["start"],
        &["logs"],
        &["chat"],
        &["run"],
        &["keys", "create"],
        &["keys", "ls"],
        &["keys", "rm"],
        &["usage"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = berth(home.path(), &[], &args).await;
        assert!(out.status.success(), "{cmd:?}");
        let help = text(&out.stdout);
        let options = help
            .split("Options:")
            .nth(1)
            .unwrap_or_else(|| panic!("{help}"));
        let lines: Vec<&str> = options.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            if !t.starts_with('-') {
                continue;
            }
            // "--flag <VALUE>  Description", or the description on the next line.
            let described = t.split("  ").filter(|p| !p.trim().is_empty()).count() > 1
                || lines.get(i + 1).is_some_and(|n| {
                    let n = n.trim_start();
                    !n.is_empty() && !n.starts_with('-')
                });
            assert!(described, "{cmd:?}: undescribed flag {t:?}\n{help}");
        }
        let client_only = help.contains("--token") || help.contains("--url");
        let server_side = matches!(cmd, ["serve"] | ["mock-model"]);
        assert_eq!(
            client_only, !server_side,
            "{cmd:?}: client flags shown where they do not apply:\n{help}"
        );
    }
    // Units and allowed values where they matter.
    let out = berth(home.path(), &[], &["create", "--help"]).await;
    let help = text(&out.stdout);
    assert!(
        help.contains("in MiB") && help.contains("Seconds"),
        "{help}"
    );
    assert!(help.contains("ephemeral, persistent, hybrid"), "{help}");
}

#[tokio::test]
async fn cli_output_json_headers_and_live_listing() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let home = tempfile::tempdir().expect("home");
    let h = home.path();

    // keys create: its id, its secret, and that it is shown once; --json for scripts.
    let (o, e) = ok(h, &srv, &["keys", "create", "--tenant", "acme"]).await;
    assert!(o.contains("id:     key-"), "{o}");
    assert!(o.contains("key:    "), "{o}");
    assert!(e.contains("shown only this once"), "{e}");
    let (o, _) = ok(h, &srv, &["keys", "create", "--tenant", "acme", "--json"]).await;
    let k: Value = serde_json::from_str(&o).expect("json");
    assert!(
        k["id"].as_str().is_some_and(|i| i.starts_with("key-")),
        "{k}"
    );
    assert!(k["key"].as_str().is_some_and(|s| !s.is_empty()), "{k}");
    let (o, _) = ok(h, &srv, &["keys", "ls", "--json"]).await;
    let keys: Value = serde_json::from_str(&o).expect("json");
    assert_eq!(keys.as_array().map(Vec::len), Some(3), "{keys}");
    let (o, _) = ok(h, &srv, &["keys", "ls"]).await;
    assert!(o.lines().next().is_some_and(|l| l.starts_with("ID")), "{o}");
    let (o, _) = ok(h, &srv, &["usage", "--json"]).await;
    serde_json::from_str::<Value>(&o).expect("usage json");

    // ls: live objects by default; --all, --state and --label for the rest.
    let small = ["--memory-mib", "128", "--disk-mib", "32"];
    let mut args = vec!["create", "--label", "team=a"];
    args.extend(small);
    let (a, _) = ok(h, &srv, &args).await;
    let mut args = vec!["create"];
    args.extend(small);
    let (gone, _) = ok(h, &srv, &args).await;
    let (a, gone) = (a.trim().to_string(), gone.trim().to_string());
    let (o, _) = ok(h, &srv, &["rm", "--json", &gone]).await;
    let removed: Value = serde_json::from_str(&o).expect("rm json");
    assert_eq!(removed[0]["id"], gone.as_str(), "{removed}");
    assert_eq!(removed[0]["state"], "destroyed", "{removed}");
    let ls = |extra: &'static [&'static str]| {
        let srv = &srv;
        async move {
            let mut args = vec!["ls", "--json"];
            args.extend(extra);
            let (o, _) = ok(h, srv, &args).await;
            let v: Value = serde_json::from_str(&o).expect("json");
            v["boxes"]
                .as_array()
                .expect("boxes")
                .iter()
                .map(|b| b["id"].as_str().expect("id").to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ls(&[]).await, vec![a.clone()]);
    let all = ls(&["--all"]).await;
    assert!(all.contains(&a) && all.contains(&gone), "{all:?}");
    assert_eq!(ls(&["--state", "destroyed"]).await, vec![gone.clone()]);
    assert_eq!(ls(&["--label", "team=a"]).await, vec![a.clone()]);
    assert!(ls(&["--label", "team=b"]).await.is_empty());
    let (table, _) = ok(h, &srv, &["ls"]).await;
    assert!(table.starts_with("BOX "), "{table}");
    assert!(table.contains("\nSESSION "), "{table}");
    assert!(!table.contains(&gone), "{table}");

    // A command session prints its exit, not a Claude-style result line; start returns
    // after the first result.
    let (o, _) = ok(
        h,
        &srv,
        &["start", "--box", &a, "--", "/bin/sh", "-c", "echo hi"],
    )
    .await;
    assert!(o.contains("hi"), "{o}");
    assert!(o.contains("[exited with code 0]"), "{o}");
    assert!(!o.contains("[result:"), "{o}");
    // The README's example, as written there.
    let (o, _) = ok(
        h,
        &srv,
        &[
            "start",
            "--box",
            &a,
            "--prompt",
            "hello",
            "--",
            "/bin/sh",
            "-c",
            "read l; echo \"got $l\"",
        ],
    )
    .await;
    assert!(o.contains("got hello"), "{o}");
    srv.stop().await;
}

// ---- 4. quickstart installs only what the main job needs ----

#[test]
fn setup_installs_only_the_main_jobs_needs_and_says_so() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let setup = std::fs::read_to_string(root.join("scripts/setup")).expect("setup");
    // What it runs, not what its comments say.
    let code: String = setup
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for test_only in ["docker", "runsc", "schemathesis", "dockerd", "python3"] {
        assert!(
            !code.contains(test_only),
            "scripts/setup mentions {test_only}"
        );
    }
    let test = std::fs::read_to_string(root.join("scripts/test")).expect("test");
    for needed in [
        "scripts/setup",
        "docker.io",
        "runsc",
        "dockerd",
        "schemathesis",
    ] {
        assert!(test.contains(needed), "scripts/test lacks {needed}");
    }
    // Every install step is announced by the line before it.
    for (name, body) in [("setup", &setup), ("test", &test)] {
        let lines: Vec<&str> = body.lines().map(str::trim).collect();
        for (i, l) in lines.iter().enumerate() {
            let installs = l.starts_with("apt-get install")
                || l.starts_with("npm install")
                || l.contains("/pip\" install")
                || l.starts_with("setsid dockerd");
            if installs {
                let announced = lines[..i]
                    .iter()
                    .rev()
                    .take(4)
                    .any(|p| p.starts_with("echo \"setup: ") || p.starts_with("echo \"test: "));
                assert!(announced, "scripts/{name}: {l:?} is not announced");
            }
        }
    }
    let quickstart = std::fs::read_to_string(root.join("scripts/quickstart")).expect("quickstart");
    assert!(
        !quickstart.contains("docker"),
        "quickstart starts no docker"
    );
}
