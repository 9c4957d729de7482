//! The router and the OpenAPI document list the same routes. Read off the router's own table
//! (its `Debug`: axum offers no other listing): each path and its methods are the document's, or
//! in `api::UNDOCUMENTED`. Asked of a real server over loopback: every documented operation is
//! served (not the "no such route" fallback, not 405), every other method on a documented path
//! is 405, and every route outside the annotations is served.

use berth_server::api::UNDOCUMENTED;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH"];

/// A concrete path for a template (`{id}`, `{*path}`, …).
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|seg| match seg {
            "{port}" => "8080".to_string(),
            "{path}" | "{*path}" => "a/b.txt".to_string(),
            s if s.starts_with('{') => "x1".to_string(),
            s => s.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// OpenAPI spelling of an axum path (`{*path}` is `{path}`).
fn documented_spelling(axum_path: &str) -> String {
    axum_path.replace("{*", "{")
}

/// One request without credentials; the status and the body.
async fn ask(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: berth\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, text)
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer in 10 s"))
}

fn is_fallback(status: u16, body: &str) -> bool {
    status == 405 || (status == 404 && body.contains("no such route"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_document_list_the_same_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = berth_server::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().join("data"),
        // Readiness asks the upstream: a refused loopback port answers at once.
        upstream_url: "http://127.0.0.1:9".into(),
        ..Default::default()
    };
    cfg.native.disk_pool = 0;
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(berth_server::run(
        cfg,
        berth_server::Runtime::new("/bin/false".into()),
        move |s| {
            let _ = tx.send(s.addr);
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
        .await
        .expect("join")
        .expect("server ready within 60 s");

    // The check can tell the fallback from a route.
    let (st, body) = ask(addr, "GET", "/v1/no-such-thing").await;
    assert!(is_fallback(st, &body), "{st} {body}");
    let (st, body) = ask(addr, "PATCH", "/v1/boxes").await;
    assert!(is_fallback(st, &body), "{st} {body}");

    let doc: serde_json::Value =
        serde_json::from_str(&berth_server::api::openapi_json()).expect("document");
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in item.as_object().expect("item").keys() {
            documented
                .entry(path.clone())
                .or_default()
                .insert(m.to_ascii_uppercase());
        }
    }
    assert!(documented.len() > 25, "{} paths", documented.len());
    let any_method: BTreeSet<String> = UNDOCUMENTED
        .iter()
        .filter(|u| u.methods.is_none())
        .map(|u| documented_spelling(u.path))
        .collect();

    let mut asked = 0;
    for (path, methods) in &documented {
        for m in METHODS {
            let (st, body) = ask(addr, m, &concrete(path)).await;
            asked += 1;
            if methods.contains(*m) {
                assert!(
                    !is_fallback(st, &body),
                    "{m} {path} is documented but not served: {st} {body}"
                );
            } else if !any_method.contains(path) {
                assert_eq!(st, 405, "{m} {path} is served but not documented: {body}");
            }
        }
    }
    for u in UNDOCUMENTED {
        assert!(!u.why.is_empty());
        let methods = u.methods.unwrap_or(METHODS);
        for m in METHODS {
            let (st, body) = ask(addr, m, &concrete(u.path)).await;
            asked += 1;
            let also_documented = documented
                .get(&documented_spelling(u.path))
                .is_some_and(|d| d.contains(*m));
            if methods.contains(m) {
                assert!(
                    !is_fallback(st, &body),
                    "{m} {} not served: {st} {body}",
                    u.path
                );
            } else if !also_documented {
                assert_eq!(st, 405, "{m} {} is served but not listed: {body}", u.path);
            }
        }
    }
    assert!(asked > 150, "{asked} requests");

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("server stops within 30 s")
        .expect("join")
        .expect("server ran");
}

/// The router's table, path (OpenAPI spelling) → (methods, whether any method is served).
fn router_table() -> BTreeMap<String, (BTreeSet<String>, bool)> {
    let (router, _) = berth_server::api::routes().split_for_parts();
    let text = format!("{router:?}");
    // The API's routes; the fallback router's follow.
    let text = text.split("fallback_router").next().expect("table");
    let mut methods: BTreeMap<String, (BTreeSet<String>, bool)> = BTreeMap::new();
    for part in text.split("MethodRouter(MethodRouter { ").skip(1) {
        let id = text[..text.find(part).expect("part")]
            .rsplit("RouteId(")
            .next()
            .and_then(|r| r.split(')').next())
            .expect("route id")
            .to_string();
        let fields = part.split(", allow_header").next().expect("fields");
        let mut set = BTreeSet::new();
        let mut any = false;
        for f in fields.split(", ") {
            let (name, value) = f.split_once(": ").expect("field");
            if value == "None" || name == "head" {
                continue;
            }
            if name == "fallback" {
                any = value == "BoxedHandler";
            } else {
                set.insert(name.to_ascii_uppercase());
            }
        }
        methods.insert(id, (set, any));
    }
    let paths = text.split("node: Node { paths: {").nth(1).expect("paths");
    let mut table = BTreeMap::new();
    for entry in paths.split(", RouteId(") {
        let entry = entry.trim_start_matches("RouteId(");
        let (id, rest) = entry.split_once("): \"").expect("entry");
        let path = rest.split('"').next().expect("path");
        let m = methods
            .get(id)
            .cloned()
            .unwrap_or_else(|| panic!("no methods for {path}"));
        table.insert(documented_spelling(path), m);
    }
    table
}

#[test]
fn the_route_table_is_the_document_plus_the_listed_exceptions() {
    let table = router_table();
    assert!(table.len() > 30, "{table:?}");
    // The annotations' document, before doc_links adds the port proxy's usual methods.
    let doc = serde_json::to_value(berth_server::api::routes().into_openapi()).expect("doc");
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in item.as_object().expect("item").keys() {
            documented
                .entry(path.clone())
                .or_default()
                .insert(m.to_ascii_uppercase());
        }
    }
    assert!(documented.len() > 25);
    for (path, methods) in &documented {
        assert_eq!(
            table.get(path),
            Some(&(methods.clone(), false)),
            "{path}: the router serves other methods than the document says"
        );
    }
    let listed: BTreeMap<String, &berth_server::api::Undocumented> = UNDOCUMENTED
        .iter()
        .map(|u| (documented_spelling(u.path), u))
        .collect();
    for (path, (methods, any)) in &table {
        if documented.contains_key(path) {
            continue;
        }
        let u = listed
            .get(path)
            .unwrap_or_else(|| panic!("{path} is served but neither documented nor listed"));
        match u.methods {
            None => assert!(*any, "{path} is listed as any-method"),
            Some(m) => {
                let m: BTreeSet<String> = m.iter().map(|s| s.to_string()).collect();
                assert_eq!((&m, false), (methods, *any), "{path}");
            }
        }
    }
    for path in listed.keys() {
        assert!(table.contains_key(path), "{path} is listed but not served");
    }
}
