//! The mock speaks the Messages API wire format.

use berth_mock_model::{scenario::Scenario, Mock};
use serde_json::{json, Value};

async fn start(s: Scenario) -> (String, Mock) {
    let mock = Mock::new(s, std::time::Duration::ZERO);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = mock.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, mock)
}

#[tokio::test]
async fn streaming_events_are_well_formed() {
    let (url, mock) = start(Scenario::demo()).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", "k1")
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.expect("body");
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let ev = b
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .expect("event line")
                .to_string();
            let data: Value = serde_json::from_str(
                b.lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .expect("data"),
            )
            .expect("json");
            assert_eq!(data["type"], ev.as_str(), "event name matches data.type");
            (ev, data)
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    assert!(names.contains(&"ping"));
    // Reassemble the tool input from its JSON deltas.
    let partial: String = events
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "input_json_delta")
        .map(|(_, d)| {
            d["delta"]["partial_json"]
                .as_str()
                .expect("partial")
                .to_string()
        })
        .collect();
    let input: Value = serde_json::from_str(&partial).expect("input json");
    assert_eq!(input["file_path"], "/workspace/hello.txt");
    let delta = events
        .iter()
        .find(|(e, _)| e == "message_delta")
        .expect("message_delta");
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
    assert!(delta.1["usage"]["output_tokens"].as_u64().expect("tokens") > 0);
    let seen = mock.recorded();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].api_key_is("k1"), "{:?}", seen[0].api_key);
    assert_eq!(seen[0].anthropic_version.as_deref(), Some("2023-06-01"));
    assert_eq!(
        seen[0].usage["output_tokens"],
        delta.1["usage"]["output_tokens"]
    );
}

#[tokio::test]
async fn non_streaming_errors_and_count_tokens() {
    let s: Scenario = serde_json::from_value(json!({"rules": [
        {"match": "overload", "steps": [{"error": {"status": 529, "type": "overloaded_error", "message": "busy"}}]},
        {"steps": [{"text": "plain", "usage": {"input_tokens": 11, "output_tokens": 7, "cache_read_input_tokens": 5}}]}
    ]})).expect("scenario");
    let (url, _) = start(s).await;
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(format!("{url}/v1/messages"))
            .header("x-api-key", "k")
            .json(&body)
            .send()
    };
    let r = post(
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .expect("send");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], "plain");
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 11, "output_tokens": 7, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 0, "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}})
    );
    let r = post(json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "overload please"}]})).await.expect("send");
    assert_eq!(r.status().as_u16(), 529);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["type"], "overloaded_error");
    let r = post(json!({"model": "m"})).await.expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let r = http
        .post(format!("{url}/v1/messages"))
        .json(&json!({"messages": []}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    let r = http
        .post(format!("{url}/v1/messages/count_tokens"))
        .header("x-api-key", "k")
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "abcdefgh"}]}))
        .send()
        .await
        .expect("send");
    let v: Value = r.json().await.expect("json");
    assert!(v["input_tokens"].as_u64().expect("n") > 0);
}

#[tokio::test]
async fn the_record_holds_no_credential_and_opens_only_to_the_operator() {
    let (url, mock) = start(Scenario::demo()).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", "sk-ant-real-secret")
        .header("authorization", "Bearer sk-ant-other-secret")
        .json(&json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    // Without the token (or with a wrong one, or the API key): the same 404 as any unknown path.
    for token in [None, Some("wrong"), Some("sk-ant-real-secret")] {
        let mut get = http.get(format!("{url}/_mock/requests"));
        let mut del = http.delete(format!("{url}/_mock/requests"));
        if let Some(t) = token {
            get = get.header(berth_mock_model::INSPECT_HEADER, t);
            del = del.header(berth_mock_model::INSPECT_HEADER, t);
        }
        assert_eq!(get.send().await.expect("get").status().as_u16(), 404);
        assert_eq!(del.send().await.expect("del").status().as_u16(), 404);
    }
    assert_eq!(mock.recorded().len(), 1, "a refused DELETE cleared nothing");
    let r = http
        .get(format!("{url}/_mock/requests"))
        .header(berth_mock_model::INSPECT_HEADER, mock.inspect_token())
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.expect("text");
    assert!(
        !text.contains("sk-ant-"),
        "a credential in the record: {text}"
    );
    let seen: Vec<berth_mock_model::Recorded> = serde_json::from_str(&text).expect("json");
    assert_eq!(seen.len(), 1);
    assert!(seen[0].api_key_is("sk-ant-real-secret"));
    assert!(seen[0].authorization_is("Bearer sk-ant-other-secret"));
    let r = http
        .delete(format!("{url}/_mock/requests"))
        .header(berth_mock_model::INSPECT_HEADER, mock.inspect_token())
        .send()
        .await
        .expect("del");
    assert_eq!(r.status().as_u16(), 204);
    assert!(mock.recorded().is_empty());
}
