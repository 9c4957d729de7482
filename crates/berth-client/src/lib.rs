//! A typed client for the berth HTTP API, shared by the CLI, its tests and the bench.
//!
//! [`Client`] wraps one `reqwest::Client` (connection pool) with the server's base URL and a
//! bearer token. Every typed method maps one route to its `berth-api` types; a non-2xx answer
//! becomes [`Error::Api`] with the HTTP status and the server's `{"error":{code,message}}`.
//! [`Client::events`] follows a session's Server-Sent Events and resumes a dropped connection
//! with `Last-Event-ID` (see [`sse`]).

pub mod sse;

use berth_api::{
    Accepted, BackendInfo, BoxObject, BoxSpec, BoxStats, ErrorBody, ExecRequest, ExecResponse,
    KeyCreate, KeyObject, List, MessageRequest, PermissionAnswer, PermissionModeRequest,
    SessionObject, SessionSpec, SessionUsage, UsageReport,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

pub use sse::{Frame, Retry};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No TCP connection to the server. `detail` is not the error's `source()`, so that the
    /// message a CLI prints with its causes stays this one line.
    #[error("cannot reach the berth server at {url}: is `berth serve` running?")]
    Connect { url: String, detail: reqwest::Error },
    /// The server answered with an error body.
    #[error("{status} ({code}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The server answered with a non-2xx status and a body that is not an error body (a
    /// proxy in between, say).
    #[error("{status}: {body}")]
    Http { status: StatusCode, body: String },
    /// The connection broke, or a body could not be read.
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    #[error("decoding the server's answer: {0}")]
    Decode(#[from] serde_json::Error),
    /// A malformed Server-Sent Events stream.
    #[error("event stream: {0}")]
    Sse(String),
    /// The event stream kept breaking; `last` is why it broke the last time.
    #[error("the event stream broke {attempts} times in a row; last: {last}")]
    Resume { attempts: u32, last: Box<Error> },
}

impl Error {
    /// The HTTP status the server answered with, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            Error::Http { status, .. } => Some(status.as_u16()),
            Error::Transport(e) => e.status().map(|s| s.as_u16()),
            Error::Resume { last, .. } => last.status(),
            _ => None,
        }
    }

    /// The server's error code (`not_found`, `conflict`, …), when it sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Worth trying again: the connection failed or broke, or a gateway in front of the server
    /// had a moment. Errors the server itself decided (4xx, 500) are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Transport(_) => true,
            Error::Http { status, .. } => matches!(status.as_u16(), 502..=504),
            Error::Api { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }
}

/// A file's content, or a directory listing (JSON) when the path is a directory.
#[derive(Debug, Clone)]
pub struct FileBody {
    pub bytes: Vec<u8>,
    pub is_json: bool,
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
    retry: Retry,
}

impl Client {
    /// `url` is the server's base URL (`http://127.0.0.1:7070`); `token` an API key.
    pub fn new(url: &str, token: &str) -> Client {
        Client {
            base: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
            retry: Retry::default(),
        }
    }

    /// How [`Client::events`] retries a dropped stream.
    pub fn with_retry(mut self, retry: Retry) -> Client {
        self.retry = retry;
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The underlying HTTP client (shared pool), for requests this crate has no method for.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A request to `path` (which starts with `/`) with the bearer token set.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
    }

    /// Send a request; a non-2xx answer is an error.
    pub async fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().await.map_err(|e| {
            if e.is_connect() {
                Error::Connect {
                    url: self.base.clone(),
                    detail: e,
                }
            } else {
                Error::Transport(e)
            }
        })?;
        check(resp).await
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        json(self.send(self.request(Method::GET, path)).await?).await
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        json(
            self.send(self.request(Method::POST, path).json(body))
                .await?,
        )
        .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        json(self.send(self.request(Method::DELETE, path)).await?).await
    }

    /// `DELETE` of a route that answers 204 (no body).
    pub async fn delete_empty(&self, path: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, path)).await?;
        Ok(())
    }

    pub async fn put_bytes(&self, path: &str, data: Vec<u8>) -> Result<()> {
        self.send(self.request(Method::PUT, path).body(data))
            .await?;
        Ok(())
    }

    pub async fn get_bytes(&self, path: &str) -> Result<FileBody> {
        let resp = self.send(self.request(Method::GET, path)).await?;
        let is_json = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        Ok(FileBody {
            bytes: resp.bytes().await?.to_vec(),
            is_json,
        })
    }

    // Boxes.

    pub async fn create_box(&self, spec: &BoxSpec) -> Result<BoxObject> {
        self.post("/v1/boxes", spec).await
    }

    pub async fn list_boxes(&self) -> Result<List<BoxObject>> {
        self.get("/v1/boxes").await
    }

    pub async fn get_box(&self, id: &str) -> Result<BoxObject> {
        self.get(&format!("/v1/boxes/{id}")).await
    }

    pub async fn delete_box(&self, id: &str) -> Result<BoxObject> {
        self.delete(&format!("/v1/boxes/{id}")).await
    }

    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResponse> {
        self.post(&format!("/v1/boxes/{id}/exec"), req).await
    }

    /// A file under `/workspace` (`path` relative to it), or a directory's listing.
    pub async fn get_file(&self, id: &str, path: &str) -> Result<FileBody> {
        self.get_bytes(&format!("/v1/boxes/{id}/files/{path}"))
            .await
    }

    pub async fn put_file(&self, id: &str, path: &str, data: Vec<u8>) -> Result<()> {
        self.put_bytes(&format!("/v1/boxes/{id}/files/{path}"), data)
            .await
    }

    pub async fn delete_file(&self, id: &str, path: &str) -> Result<()> {
        self.delete_empty(&format!("/v1/boxes/{id}/files/{path}"))
            .await
    }

    pub async fn box_stats(&self, id: &str) -> Result<BoxStats> {
        self.get(&format!("/v1/boxes/{id}/stats")).await
    }

    pub async fn park_box(&self, id: &str) -> Result<BoxObject> {
        self.post(&format!("/v1/boxes/{id}/park"), &serde_json::json!({}))
            .await
    }

    /// The kept workspace of an ended box, as a tar.
    pub async fn artifact(&self, id: &str) -> Result<Vec<u8>> {
        Ok(self
            .get_bytes(&format!("/v1/boxes/{id}/artifact"))
            .await?
            .bytes)
    }

    // Sessions.

    pub async fn create_session(&self, spec: &SessionSpec) -> Result<SessionObject> {
        self.post("/v1/sessions", spec).await
    }

    pub async fn list_sessions(&self) -> Result<List<SessionObject>> {
        self.get("/v1/sessions").await
    }

    pub async fn get_session(&self, id: &str) -> Result<SessionObject> {
        self.get(&format!("/v1/sessions/{id}")).await
    }

    pub async fn delete_session(&self, id: &str) -> Result<SessionObject> {
        self.delete(&format!("/v1/sessions/{id}")).await
    }

    pub async fn send_message(&self, id: &str, msg: &MessageRequest) -> Result<Accepted> {
        self.post(&format!("/v1/sessions/{id}/messages"), msg).await
    }

    pub async fn interrupt(&self, id: &str) -> Result<Accepted> {
        self.post(
            &format!("/v1/sessions/{id}/interrupt"),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn answer_permission(
        &self,
        id: &str,
        request_id: &str,
        answer: &PermissionAnswer,
    ) -> Result<Accepted> {
        self.post(
            &format!("/v1/sessions/{id}/permissions/{request_id}"),
            answer,
        )
        .await
    }

    pub async fn set_permission_mode(
        &self,
        id: &str,
        mode: &PermissionModeRequest,
    ) -> Result<Accepted> {
        self.post(&format!("/v1/sessions/{id}/permission-mode"), mode)
            .await
    }

    pub async fn restart_session(&self, id: &str) -> Result<SessionObject> {
        self.post(
            &format!("/v1/sessions/{id}/restart"),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn session_usage(&self, id: &str) -> Result<SessionUsage> {
        self.get(&format!("/v1/sessions/{id}/usage")).await
    }

    // Usage, keys, system.

    /// `GET /v1/usage` with `query` (`group_by`, `from`, `to`, …) as given.
    pub async fn usage(&self, query: &[(&str, &str)]) -> Result<UsageReport> {
        let rb = self.request(Method::GET, "/v1/usage").query(query);
        json(self.send(rb).await?).await
    }

    pub async fn create_key(&self, req: &KeyCreate) -> Result<KeyObject> {
        self.post("/v1/keys", req).await
    }

    pub async fn list_keys(&self) -> Result<List<KeyObject>> {
        self.get("/v1/keys").await
    }

    pub async fn delete_key(&self, id: &str) -> Result<()> {
        self.delete_empty(&format!("/v1/keys/{id}")).await
    }

    pub async fn backends(&self) -> Result<List<BackendInfo>> {
        self.get("/v1/backends").await
    }

    /// `GET /healthz`: `{"status":"ok"}` while the process serves.
    pub async fn health(&self) -> Result<serde_json::Value> {
        self.get("/healthz").await
    }

    /// Time to wait before reconnect attempt `n` (1-based) of [`Client::events`].
    fn backoff(&self, n: u32) -> Duration {
        self.retry.delay(n)
    }
}

async fn check(resp: Response) -> Result<Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    // The body is only for the message: a body that breaks off leaves the status to speak.
    let text = resp.text().await.unwrap_or_default();
    Err(error_from(status, &text))
}

fn error_from(status: StatusCode, text: &str) -> Error {
    match serde_json::from_str::<ErrorBody>(text) {
        Ok(e) => Error::Api {
            status: status.as_u16(),
            code: e.error.code,
            message: e.error.message,
        },
        Err(_) => Error::Http {
            status,
            body: text.to_string(),
        },
    }
}

async fn json<T: DeserializeOwned>(resp: Response) -> Result<T> {
    let bytes = resp.bytes().await?;
    Ok(serde_json::from_slice(&bytes)?)
}
