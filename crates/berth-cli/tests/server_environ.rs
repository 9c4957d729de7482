//! The server's environment holds the real secrets (the upstream key, a database URL with its
//! password, the cluster secret). None of it may reach a box: not its processes, and not the
//! box's own init or supervisor (which a process escaping the confinement would read first).

mod common;

use common::{exec_sh, Server};

/// Every process on the host whose environment names `needle`, with its command line.
fn holders(needle: &[u8]) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.windows(needle.len()).any(|w| w == needle) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    found
}

#[tokio::test]
async fn no_box_process_inherits_the_servers_environment() {
    let canary = format!("canary-{}", std::process::id());
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_with(
        dir.path(),
        &[
            ("BERTH_BACKEND", "native"),
            ("SECRET_CANARY", canary.as_str()),
        ],
    )
    .await;
    let server_pid = u32::try_from(srv.pid()).expect("pid");
    let api = srv.client();
    let b = api
        .post(
            "/v1/boxes",
            serde_json::json!({"lifecycle": "persistent", "resources": {"memory_mib": 128, "disk_mib": 64}}),
        )
        .await;
    assert_eq!(b.status, 201, "{}", b.json);
    let bx = b.json["id"].as_str().expect("id").to_string();
    // A process of the box sees none of it.
    let r = exec_sh(
        &api,
        &bx,
        "env; cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'; true",
        30,
    )
    .await;
    assert_eq!(r["exit_code"], 0, "{r}");
    let out = r["stdout"].as_str().unwrap_or_default();
    assert!(
        !out.contains(&canary),
        "a box process sees the server's environment: {out}"
    );
    // Nor does any process the server started: zygote, supervisors, box inits.
    let leaked: Vec<_> = holders(canary.as_bytes())
        .into_iter()
        .filter(|(pid, _)| *pid != server_pid)
        .collect();
    assert!(
        leaked.is_empty(),
        "the server's environment reached: {leaked:?}"
    );
    srv.stop().await;
}
