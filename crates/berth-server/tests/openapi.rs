//! The committed `openapi.json` must match what the code generates. Refresh it with
//! `BERTH_UPDATE_OPENAPI=1 cargo test -p berth-server --test openapi`.

#[test]
fn committed_openapi_is_fresh() {
    let generated = berth_server::api::openapi_json() + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json");
    if std::env::var_os("BERTH_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write openapi.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.json is stale; run BERTH_UPDATE_OPENAPI=1 cargo test -p berth-server --test openapi"
    );
    let v: serde_json::Value = serde_json::from_str(&generated).expect("valid JSON");
    for p in [
        "/v1/boxes",
        "/v1/boxes/{id}/exec",
        "/v1/sessions/{id}/events",
        "/v1/keys",
        "/readyz",
        "/v1/boxes/{id}/ports/{port}/{path}",
        "/v1/boxes/{id}/ports/{port}",
    ] {
        assert!(v["paths"].get(p).is_some(), "{p} missing from the document");
    }
    // Creates link to what takes their ids (schemathesis' stateful phase follows them).
    for (path, target) in [
        ("/v1/sessions", "post_message"),
        ("/v1/sessions", "box_get_file"),
        ("/v1/boxes", "artifact"),
        ("/v1/boxes", "port_get"),
        ("/v1/triggers", "hook"),
    ] {
        let links = &v["paths"][path]["post"]["responses"]["201"]["links"];
        assert!(links.get(target).is_some(), "{path} has no link {target}");
    }
}
