//! The files API against trees a box builds to hurt the server, end to end against a real
//! `berth serve` and a real native box: a directory nested 20 000 deep is deleted without the
//! server losing its stack (the recursive delete aborted the whole process), and a directory of
//! 12 000 files lists its first 10 000 and says the listing is truncated.

mod common;

use common::{Api, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A box nests 20 000 directories (relative `mkdir`+`chdir`, far past PATH_MAX) and fills
/// another with 12 000 files; the operator lists and deletes them through the files API. The
/// server answers both, another client's requests are answered meanwhile, and it keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_and_wide_trees_a_box_makes_are_served_safely() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let r = api
        .post(
            "/v1/boxes",
            json!({"backend": "native", "resources": {"memory_mib": 256, "disk_mib": 512, "pids": 64}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let bx = r.json["id"].as_str().expect("id").to_string();
    let made = exec(
        &api,
        &bx,
        "cd /workspace && python3 -c \"\nimport os\nos.mkdir('many')\nfor i in range(12000):\n    open('many/f%05d' % i, 'w').close()\nos.mkdir('deep')\nos.chdir('deep')\nfor i in range(20000):\n    os.mkdir('d')\n    os.chdir('d')\nprint('made')\n\"",
    )
    .await;
    assert_eq!(made["stdout"].as_str(), Some("made\n"), "{made}");

    // The listing stops at 10 000 entries and says so; a small one is whole.
    let l = api.get(&format!("/v1/boxes/{bx}/files/many")).await;
    assert_eq!(l.status, 200, "{}", l.json);
    assert_eq!(l.json["truncated"], json!(true));
    let entries = l.json["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 10_000);
    let root = api.get(&format!("/v1/boxes/{bx}/files/")).await;
    assert_eq!(root.status, 200, "{}", root.json);
    assert_eq!(root.json["truncated"], json!(false));
    let names: Vec<&str> = root.json["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        names.contains(&"deep") && names.contains(&"many"),
        "{names:?}"
    );

    // Delete the deep tree; meanwhile the server answers another request promptly.
    let del = {
        let api = api.clone();
        let bx = bx.clone();
        tokio::spawn(async move { api.delete(&format!("/v1/boxes/{bx}/files/deep")).await })
    };
    let other = Api::new(&srv.url, &srv.admin);
    let deadline = Instant::now() + Duration::from_secs(240);
    while !del.is_finished() {
        assert!(Instant::now() < deadline, "the delete did not finish");
        let t = Instant::now();
        let h = other.get("/healthz").await;
        assert_eq!(h.status, 200, "server stopped answering during the delete");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = del.await.expect("delete task");
    assert!(
        (200..300).contains(&d.status),
        "delete: {} {}",
        d.status,
        d.json
    );

    // Gone, the rest kept, and the server (same process) still serves the box.
    let after = exec(&api, &bx, "cd /workspace && ls; test -e deep; echo $?").await;
    assert_eq!(after["stdout"].as_str(), Some("many\n1\n"), "{after}");
    let h = api.get("/healthz").await;
    assert_eq!(h.status, 200);
    let r = api.delete(&format!("/v1/boxes/{bx}")).await;
    assert!((200..300).contains(&r.status), "{}", r.json);
    assert!(srv.stop().await.success(), "the server exits cleanly");
}

async fn exec(api: &Api, bx: &str, script: &str) -> Value {
    common::exec_sh(api, bx, script, 240).await
}
