//! Session commands: `start`, `logs`, `chat`.

use crate::client::{self, Client};
use crate::render;
use crate::Conn;
use anyhow::{bail, Result};
use berth_api::*;
use clap::Args;

#[derive(Args)]
pub(crate) struct StartArgs {
    /// Existing box to run in (`box-…`) [default: a new ephemeral box]
    #[arg(long = "box")]
    box_id: Option<String>,
    /// First message for the agent (a line on its stdin).
    #[arg(long)]
    prompt: Option<String>,
    /// Print the session id and return at once.
    #[arg(long)]
    detach: bool,
    /// Follow the events until the session ends, not only until its first result.
    #[arg(short, long)]
    follow: bool,
    /// Print the session (--detach) or its events as JSON.
    #[arg(long)]
    json: bool,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
    #[command(flatten)]
    pub(crate) conn: Conn,
}

pub(crate) async fn start(c: &Client, a: StartArgs) -> Result<()> {
    let spec = SessionSpec {
        box_ref: match a.box_id {
            Some(id) => BoxRef::Id(id),
            None => BoxRef::Spec(Box::new(BoxSpec {
                lifecycle: Some(Lifecycle::Ephemeral),
                ..Default::default()
            })),
        },
        agent: AgentSpec::Command(CommandAgent {
            argv: a.argv,
            unknown: Default::default(),
        }),
        pool: None,
        workdir: None,
        prompt: a.prompt,
        keep_open: false,
    };
    let s = c.create_session(&spec).await?;
    if a.detach {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            println!("{}", s.id);
        }
        return Ok(());
    }
    eprintln!("session {} in box {}", s.id, s.box_id);
    if a.follow {
        return logs(c, &s.id, true, a.json, 0).await;
    }
    // Until the agent's first result and the status it leads to (idle, stopped, failed), or
    // the session's end.
    let mut r = render::Renderer::new(a.json, true);
    let mut ended = false;
    let mut result = false;
    let mut failed = None;
    client::follow(c, &s.id, 0, |e| {
        r.event(&e);
        if e.kind == "result" {
            result = true;
        }
        if e.kind == "status" {
            let st = e.data["state"].as_str().and_then(SessionState::parse);
            ended = st.is_some_and(|st| st.is_terminal());
            if st == Some(SessionState::Failed) {
                failed = Some(e.data["reason"].as_str().unwrap_or("").to_string());
            }
            if ended || (result && st.is_some()) {
                return false;
            }
        }
        true
    })
    .await?;
    r.finish();
    if let Some(why) = failed {
        bail!("session {} failed: {why}", s.id);
    }
    if !ended && !a.json {
        let now = c.get_session(&s.id).await?;
        if !now.state.is_terminal() {
            eprintln!(
                "session {} is {}: `berth logs {} -f` to follow, `berth rm {}` to end it",
                s.id,
                now.state.as_str(),
                s.id,
                s.id
            );
        }
    }
    Ok(())
}

pub(crate) async fn logs(
    c: &Client,
    session: &str,
    follow: bool,
    json: bool,
    after: i64,
) -> Result<()> {
    let mut r = render::Renderer::new(json, follow);
    if follow {
        client::follow(c, session, after, |e| {
            r.event(&e);
            true
        })
        .await?;
    } else {
        let mut last = after;
        loop {
            let mut got = 0;
            let s = c.get_session(session).await?;
            if last >= s.last_seq {
                break;
            }
            client::follow(c, session, last, |e| {
                got += 1;
                last = e.seq;
                r.event(&e);
                e.seq < s.last_seq
            })
            .await?;
            if got == 0 {
                break;
            }
        }
    }
    r.finish();
    Ok(())
}

pub(crate) async fn chat(c: &Client, session: &str) -> Result<()> {
    let s = c.get_session(session).await?;
    if s.state.is_terminal() {
        bail!("session {session} has ended ({})", s.state.as_str());
    }
    let follower = {
        let c = c.clone();
        let id = session.to_string();
        tokio::spawn(async move {
            let mut r = render::Renderer::new(false, false);
            let _ = client::follow(&c, &id, s.last_seq, |e| {
                r.event(&e);
                true
            })
            .await;
        })
    };
    let cost = live_cost(c.clone(), session.to_string());
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    use tokio::io::AsyncBufReadExt;
    let mut lines = stdin.lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        c.send_message(
            session,
            &MessageRequest {
                content: serde_json::Value::String(line),
            },
        )
        .await?;
    }
    follower.abort();
    cost.abort();
    Ok(())
}

/// Print the session's metered cost to stderr whenever it changes (polled every 2 s) until
/// aborted.
pub(crate) fn live_cost(c: Client, id: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut shown = 0.0;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let Ok(u) = c.session_usage(&id).await else {
                continue;
            };
            if (u.total_usd - shown).abs() >= 0.00005 {
                shown = u.total_usd;
                eprintln!(
                    "[cost so far: ${:.4} (model ${:.4} + box ${:.4}), metered by berth]",
                    u.total_usd, u.total.cost_usd, u.container_usd
                );
            }
        }
    })
}
