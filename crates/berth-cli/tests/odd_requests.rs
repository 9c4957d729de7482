//! Requests schemathesis found answered 500: a path component longer than a file name may be
//! (ENAMETOOLONG) and a port connection the box resets. Both are the client's or the box's
//! doing: 400 and 502, never an internal error.

mod common;

use common::Server;
use serde_json::json;

#[tokio::test]
async fn a_too_long_name_is_400_and_a_dead_port_is_502() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(dir.path()).await;
    let api = srv.client();
    let r = api
        .post(
            "/v1/boxes",
            json!({"resources": {"memory_mib": 256, "disk_mib": 64}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let bx = r.json["id"].as_str().expect("id").to_string();

    // 300 bytes in one component (the limit is 255).
    let long = "é".repeat(150);
    for method in ["GET", "PUT", "DELETE"] {
        let r = api
            .call(method, &format!("/v1/boxes/{bx}/files/{long}"), None)
            .await;
        assert_eq!(r.status, 400, "{method}: {}", r.json);
        assert_eq!(r.json["error"]["code"], "invalid_request", "{}", r.json);
    }

    // Nothing listens on the port inside the box.
    for method in ["GET", "PUT"] {
        let r = api
            .call(method, &format!("/v1/boxes/{bx}/ports/445/x%1By"), None)
            .await;
        assert_eq!(r.status, 502, "{method}: {}", r.json);
    }
    assert_eq!(api.get("/healthz").await.status, 200);
    srv.stop().await;
}
