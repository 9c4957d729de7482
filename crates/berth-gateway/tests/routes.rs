//! What the gateway forwards: only the listed routes, no redirects followed, bodies streamed
//! both ways. Over real sockets, against a recording upstream.

use berth_gateway::{Gateway, GatewayConfig, SessionLimits, TokenOwner};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// (method, path and query, x-api-key) of every request an upstream saw.
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

async fn serve(router: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    url
}

/// An upstream that records every request; `/v1/messages` redirects to `redirect_to` when the
/// request asks for it, and otherwise answers once the first body chunk has arrived (without
/// waiting for the rest).
async fn upstream(redirect_to: Option<String>) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let s = s.clone();
        let redirect_to = redirect_to.clone();
        async move {
            let key = req
                .headers()
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            if let Ok(mut v) = s.lock() {
                v.push((req.method().to_string(), path, key));
            }
            let redirect = req
                .headers()
                .get("x-test-redirect")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u16>().ok());
            if let Some(status) = redirect {
                let to = redirect_to.unwrap_or_default();
                return axum::response::Response::builder()
                    .status(status)
                    .header("location", format!("{to}/v1/messages"))
                    .body(axum::body::Body::empty())
                    .unwrap_or_default();
            }
            let mut body = req.into_body().into_data_stream();
            let first = futures::StreamExt::next(&mut body).await;
            let n = first.and_then(Result::ok).map(|b| b.len()).unwrap_or(0);
            axum::response::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(format!(
                    "{{\"first_chunk\":{n},\"usage\":{{\"input_tokens\":1,\"output_tokens\":1}}}}"
                )))
                .unwrap_or_default()
        }
    });
    (serve(app).await, seen)
}

async fn gateway(upstream: String) -> String {
    let (gw, _meter) = Gateway::new(GatewayConfig {
        upstream,
        api_key: Some("sk-real".into()),
        ..Default::default()
    })
    .expect("gw");
    gw.register(
        "tok",
        TokenOwner {
            session_id: "s1".into(),
            box_id: "b1".into(),
            tenant: "t".into(),
        },
        SessionLimits::default(),
        0.0,
    );
    serve(gw.router_for_box("b1")).await
}

#[tokio::test]
async fn routes_off_the_list_are_refused_before_the_upstream() {
    let (up, seen) = upstream(None).await;
    let gw = gateway(up).await;
    let http = reqwest::Client::new();
    for (method, path) in [
        ("POST", "/v1/messages/batches"),
        ("GET", "/v1/messages/batches"),
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("POST", "/v1/complete"),
        ("GET", "/_mock/requests"),
        ("DELETE", "/_mock/requests"),
        ("POST", "/v1/messages/../files"),
        ("POST", "/v1/messages/%2e%2e/files"),
        ("GET", "/v1/messages"),
        ("POST", "/v1/organizations/x/api_keys"),
    ] {
        let r = http
            .request(method.parse().expect("method"), format!("{gw}{path}"))
            .header("x-api-key", "tok")
            .body("{}")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 403, "{method} {path}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], "permission_error", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("POST /v1/messages")),
            "the refusal lists what is forwarded: {v}"
        );
    }
    assert!(
        seen.lock().expect("seen").is_empty(),
        "nothing reached the upstream"
    );
    // What is on the list goes through, with the real key (the probe without it).
    for (method, path, key) in [
        ("POST", "/v1/messages?beta=true", Some("sk-real")),
        (
            "POST",
            "/v1/messages/count_tokens?beta=true",
            Some("sk-real"),
        ),
        ("GET", "/v1/models", Some("sk-real")),
        ("GET", "/v1/models/claude-sonnet-4-5", Some("sk-real")),
        ("HEAD", "/api/hello", None),
    ] {
        let r = http
            .request(method.parse().expect("method"), format!("{gw}{path}"))
            .header("x-api-key", "tok")
            .body("{}")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 200, "{method} {path}");
        let last = seen.lock().expect("seen").last().cloned();
        assert_eq!(
            last,
            Some((
                method.to_string(),
                path.to_string(),
                key.map(str::to_string)
            ))
        );
    }
}

#[tokio::test]
async fn an_upstream_redirect_is_not_followed_with_the_key() {
    let (elsewhere, elsewhere_seen) = upstream(None).await;
    let (up, seen) = upstream(Some(elsewhere)).await;
    let gw = gateway(up).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    // 303 turns into a body-less GET a client would follow; 307 and 308 keep the method.
    for status in [301u16, 302, 303, 307, 308] {
        let r = client
            .post(format!("{gw}/v1/messages"))
            .header("x-api-key", "tok")
            .header("x-test-redirect", status.to_string())
            .body("{}")
            .send()
            .await
            .expect("send");
        assert_eq!(
            r.status().as_u16(),
            status,
            "the redirect is passed back as is"
        );
    }
    assert_eq!(seen.lock().expect("seen").len(), 5);
    assert!(
        elsewhere_seen.lock().expect("seen").is_empty(),
        "the gateway followed a redirect (with the real key): {:?}",
        elsewhere_seen.lock().expect("seen")
    );
}

#[tokio::test]
async fn the_request_body_streams_to_the_upstream() {
    let (up, _seen) = upstream(None).await;
    let gw = gateway(up).await;
    // The body's first chunk is sent; the rest waits for the answer. A gateway that buffers
    // the whole body never answers.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tx.send(Ok(b"{\"model\":\"claude-haiku-4-5\",".to_vec()))
        .await
        .expect("send");
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        reqwest::Client::new()
            .post(format!("{gw}/v1/messages"))
            .header("x-api-key", "tok")
            .body(body)
            .send(),
    )
    .await
    .expect("no answer before the whole body was sent: the gateway buffers it")
    .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.expect("json");
    assert!(v["first_chunk"].as_u64().unwrap_or(0) > 0, "{v}");
    drop(tx);
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn an_oversized_declared_body_is_refused_unread() {
    let (up, seen) = upstream(None).await;
    let gw = gateway(up).await;
    let mut s = tokio::net::TcpStream::connect(gw.trim_start_matches("http://"))
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: tok\r\ncontent-length: 999999999999\r\nconnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(seen.lock().expect("seen").is_empty());
}
