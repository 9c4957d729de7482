//! How the CLI finds its server (URL and key), and the event-following loop its commands
//! share. The HTTP client itself is `berth-client`.

use anyhow::{anyhow, Context, Result};
use berth_api::Event;
use futures::StreamExt;
use std::path::PathBuf;

pub use berth_client::Client;

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
    let token = match token.or_else(|| std::env::var("BERTH_TOKEN").ok().filter(|s| !s.is_empty()))
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

/// Follow a session's events after `after`, calling `on_event` for each, until the server
/// ends the stream (session over) or `on_event` returns false; returns the last seq seen. A
/// dropped connection is resumed by `berth-client`.
pub async fn follow(
    c: &Client,
    session: &str,
    after: i64,
    mut on_event: impl FnMut(Event) -> bool,
) -> Result<i64> {
    let mut last = after;
    let mut events = std::pin::pin!(c.events(session, Some(after)));
    while let Some(ev) = events.next().await {
        let ev = ev?;
        last = ev.seq;
        if !on_event(ev) {
            break;
        }
    }
    Ok(last)
}
