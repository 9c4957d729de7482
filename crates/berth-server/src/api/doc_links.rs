//! What the generated OpenAPI document cannot say through the handlers' annotations: links
//! from each create to the operations that take the id it returns (so that a stateful client,
//! schemathesis' stateful phase included, reaches them with live ids, not only 404s), and the
//! port proxy, which answers any method on any path below a port.

use serde_json::{json, Map, Value};

/// Operations reachable from a new box's `id`.
const BOX_OPS: &[&str] = &[
    "get_box",
    "delete_box",
    "artifact",
    "box_events",
    "exec",
    "get_file",
    "put_file",
    "delete_file",
    "park_box",
    "stats",
    "port_get",
    "port_post",
    "port_put",
    "port_delete",
    "port_root_get",
];

/// Operations reachable from a new session's `id`.
const SESSION_OPS: &[&str] = &[
    "get_session",
    "delete_session",
    "events",
    "interrupt",
    "post_message",
    "permission_mode",
    "answer_permission",
    "restart",
    "usage",
];

const TRIGGER_OPS: &[&str] = &["get_trigger", "delete_trigger", "hook"];

const PROXY_METHODS: &[&str] = &["get", "post", "put", "delete"];

/// Request bodies that create something usable on a small server (a generated body is
/// mostly refused, and then nothing downstream is reached).
fn examples() -> [(&'static str, Value); 4] {
    let small = json!({"resources": {"memory_mib": 128, "disk_mib": 32, "pids": 64}});
    [
        ("/v1/boxes", small.clone()),
        (
            "/v1/sessions",
            json!({"box": small, "agent": {"kind": "command", "argv": ["/bin/cat"]}, "keep_open": true}),
        ),
        (
            "/v1/triggers",
            json!({"box": small, "agent": {"kind": "command", "argv": ["/bin/cat"]}, "prompt": "hello {{name}}"}),
        ),
        ("/v1/keys", json!({"tenant": "example"})),
    ]
}

/// Add the links, the request examples and the port proxy's paths to the generated document.
pub fn augment(doc: &mut Value) {
    add_ports(doc);
    for (path, example) in examples() {
        if let Some(media) = doc.pointer_mut(&format!(
            "/paths/{}/post/requestBody/content/application~1json",
            path.replace('/', "~1")
        )) {
            if let Some(o) = media.as_object_mut() {
                o.insert("example".into(), example);
            }
        }
    }
    let links = |ops: &[&str], param: &str, pointer: &str| -> Map<String, Value> {
        ops.iter()
            .map(|op| {
                (
                    op.to_string(),
                    json!({"operationId": op, "parameters": {param: format!("$response.body#{pointer}")}}),
                )
            })
            .collect()
    };
    let mut session_links = links(SESSION_OPS, "id", "/id");
    // A session's box, by the box id the session answers with.
    for (name, link) in links(BOX_OPS, "id", "/box_id") {
        session_links.insert(format!("box_{name}"), link);
    }
    let targets = [
        ("/v1/boxes", "post", "201", links(BOX_OPS, "id", "/id")),
        ("/v1/sessions", "post", "201", session_links),
        (
            "/v1/triggers",
            "post",
            "201",
            links(TRIGGER_OPS, "id", "/id"),
        ),
        (
            "/v1/keys",
            "post",
            "201",
            links(&["delete_key"], "id", "/id"),
        ),
        (
            "/v1/tenants/{name}",
            "put",
            "200",
            links(&["get_tenant"], "name", "/name"),
        ),
    ];
    for (path, method, status, links) in targets {
        if let Some(resp) = doc.pointer_mut(&format!(
            "/paths/{}/{method}/responses/{status}",
            path.replace('~', "~0").replace('/', "~1")
        )) {
            if let Some(o) = resp.as_object_mut() {
                o.insert("links".into(), Value::Object(links));
            }
        }
    }
}

/// `/v1/boxes/{id}/ports/{port}/{path}` (and the port's root): the box's own server answers,
/// so any status and body may come back; berth itself answers 400, 404 and 502.
fn add_ports(doc: &mut Value) {
    let error = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}});
    let op = |id: String, with_path: bool| {
        let mut params = vec![
            json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}),
            json!({"name": "port", "in": "path", "required": true,
                   "description": "TCP port a process in the box listens on (loopback inside the box)",
                   "schema": {"type": "integer", "minimum": 1, "maximum": 65535}}),
        ];
        if with_path {
            params.push(json!({"name": "path", "in": "path", "required": true,
                "description": "Path passed on to the box's server (may contain `/`)",
                "schema": {"type": "string"}}));
        }
        json!({
            "tags": ["boxes"],
            "summary": "Reverse proxy (HTTP/1.1 and WebSocket) to a port a process in the box listens on; the caller's API key is not passed on.",
            "operationId": id,
            "parameters": params,
            "responses": {
                "default": {"description": "The box's server's own answer"},
                "400": error("Bad port"),
                "404": error("No such box"),
                "409": error("The box is not running"),
                "502": error("Nothing answers on that port in the box"),
            },
            "security": [{"bearer": []}],
        })
    };
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let mut sub = Map::new();
    for m in PROXY_METHODS {
        sub.insert(m.to_string(), op(format!("port_{m}"), true));
    }
    paths.insert(
        "/v1/boxes/{id}/ports/{port}/{path}".into(),
        Value::Object(sub),
    );
    let mut root = Map::new();
    root.insert("get".into(), op("port_root_get".into(), false));
    paths.insert("/v1/boxes/{id}/ports/{port}".into(), Value::Object(root));
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_link_names_an_operation_of_the_document() {
        let doc: serde_json::Value =
            serde_json::from_str(&super::super::openapi_json()).expect("json");
        let mut ops = std::collections::BTreeSet::new();
        for item in doc["paths"].as_object().expect("paths").values() {
            for op in item.as_object().expect("item").values() {
                if let Some(id) = op["operationId"].as_str() {
                    ops.insert(id.to_string());
                }
            }
        }
        let mut n = 0;
        for item in doc["paths"].as_object().expect("paths").values() {
            for op in item.as_object().expect("item").values() {
                for resp in op["responses"]
                    .as_object()
                    .into_iter()
                    .flat_map(|r| r.values())
                {
                    for link in resp["links"]
                        .as_object()
                        .into_iter()
                        .flat_map(|l| l.values())
                    {
                        let target = link["operationId"].as_str().expect("operationId");
                        assert!(ops.contains(target), "link to unknown {target}");
                        n += 1;
                    }
                }
            }
        }
        assert!(n > 30, "{n} links");
    }
}
