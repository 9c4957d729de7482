//! A small HTTP client for the berth API, used by the CLI (and its tests).

use anyhow::{anyhow, bail, Context, Result};
use berth_api::{ErrorBody, Event};
use futures::StreamExt;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Clone)]
pub struct Client {
    pub base: String,
    token: String,
    http: reqwest::Client,
}

/// Where the local server keeps its admin key and address, found the way the server finds
/// it: `$BERTH_DATA_DIR`, else `data_dir` in the config file (`$BERTH_CONFIG`), else the
/// default. Also the server's configured address, for when it has not written `server.json`.
pub fn local_server() -> Result<(PathBuf, String)> {
    let config = std::env::var_os("BERTH_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    // The same rules as `berth serve` (file, then environment).
    let cfg = berth_server::Config::load(config.as_deref())
        .with_context(|| "reading the server configuration ($BERTH_CONFIG)")?;
    Ok((cfg.data_dir, cfg.listen.to_string()))
}

impl Client {
    /// `--url`/`BERTH_URL` and `--token`/`BERTH_TOKEN`, else what the local server left in its
    /// data dir.
    pub fn from_env(url: Option<String>, token: Option<String>) -> Result<Client> {
        let (dir, listen) = local_server()?;
        let url = url
            .or_else(|| std::env::var("BERTH_URL").ok().filter(|s| !s.is_empty()))
            .or_else(|| {
                let s = std::fs::read_to_string(dir.join("server.json")).ok()?;
                let v: serde_json::Value = serde_json::from_str(&s).ok()?;
                v.get("url")?.as_str().map(str::to_string)
            })
            .unwrap_or_else(|| format!("http://{listen}"));
        let token = match token
            .or_else(|| std::env::var("BERTH_TOKEN").ok().filter(|s| !s.is_empty()))
        {
            Some(t) => t,
            None => {
                let key = dir.join(berth_server::ADMIN_KEY_FILE);
                std::fs::read_to_string(&key)
                    .map(|s| s.trim().to_string())
                    .map_err(|e| {
                        anyhow!(
                            "no API key found. Looked at: --token (not given); $BERTH_TOKEN (not set); {} ({e}; the data dir comes from $BERTH_DATA_DIR, else data_dir in the config file $BERTH_CONFIG, else the default). Set BERTH_TOKEN=<key> (from `berth keys create`, or the server's admin.key), or point BERTH_DATA_DIR at the server's data dir",
                            key.display()
                        )
                    })?
            }
        };
        Ok(Client::new(&url, &token))
    }

    pub fn new(base: &str, token: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
    }

    async fn check(resp: Response) -> Result<Response> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => bail!(
                "{} ({}): {}",
                status.as_u16(),
                e.error.code,
                e.error.message
            ),
            Err(_) => bail!("{}: {}", status, text),
        }
    }

    pub async fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach the berth server at {}: is `berth serve` running?",
                    self.base
                )
            } else {
                anyhow!(e)
            }
        })?;
        Self::check(resp).await
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(self
            .send(self.request(Method::GET, path))
            .await?
            .json()
            .await?)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        Ok(self
            .send(self.request(Method::POST, path).json(body))
            .await?
            .json()
            .await?)
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(self
            .send(self.request(Method::DELETE, path))
            .await?
            .json()
            .await?)
    }

    pub async fn put_bytes(&self, path: &str, data: Vec<u8>) -> Result<()> {
        self.send(self.request(Method::PUT, path).body(data))
            .await?;
        Ok(())
    }

    pub async fn get_bytes(&self, path: &str) -> Result<(Vec<u8>, bool)> {
        let resp = self.send(self.request(Method::GET, path)).await?;
        let is_json = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        Ok((resp.bytes().await?.to_vec(), is_json))
    }

    /// Follow a session's events from `after`, calling `on_event` for each, until the server
    /// ends the stream (session over) or `on_event` returns false.
    pub async fn follow(
        &self,
        session: &str,
        after: i64,
        mut on_event: impl FnMut(Event) -> bool,
    ) -> Result<i64> {
        let mut last = after;
        let resp = self
            .send(self.request(
                Method::GET,
                &format!("/v1/sessions/{session}/events?after={after}"),
            ))
            .await?;
        if resp.status() != StatusCode::OK {
            bail!("unexpected status {}", resp.status());
        }
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        let mut data = String::new();
        while let Some(chunk) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk?));
            while let Some(pos) = buf.find('\n') {
                let line: String = buf.drain(..=pos).collect();
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if !data.is_empty() {
                        if let Ok(ev) = serde_json::from_str::<Event>(&data) {
                            last = ev.seq;
                            if !on_event(ev) {
                                return Ok(last);
                            }
                        }
                        data.clear();
                    }
                } else if let Some(d) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
        }
        Ok(last)
    }
}
