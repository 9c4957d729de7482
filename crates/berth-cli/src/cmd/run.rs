//! `berth run`: a prompt in a new ephemeral box, the workspace copied in and out.

use crate::client::{self, Client};
use crate::cmd::sessions::live_cost;
use crate::render;
use crate::Conn;
use anyhow::{bail, Context, Result};
use berth_api::*;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct RunArgs {
    /// Local directory copied into the box's /workspace first.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Local directory the box's /workspace is copied out to when the agent is done.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Model id [default: the agent's default]
    #[arg(long)]
    model: Option<String>,
    /// Most agent turns before it stops.
    #[arg(long)]
    max_turns: Option<u32>,
    /// Print each event and then {session, result, usage} as JSON lines.
    #[arg(long)]
    json: bool,
    /// The task for the agent.
    prompt: String,
    #[command(flatten)]
    pub(crate) conn: Conn,
}

pub(crate) async fn run(c: &Client, a: RunArgs) -> Result<()> {
    // The box first, so that `--dir` is in it before the agent starts; ephemeral, so that it
    // ends with the session (at the agent's first result), leaving its workspace as an
    // artifact when `--out` asks for it.
    let b = c
        .create_box(&BoxSpec {
            lifecycle: Some(Lifecycle::Ephemeral),
            keep_workspace: a.out.is_some(),
            ..Default::default()
        })
        .await?;
    let started = async {
        if let Some(dir) = &a.dir {
            let (files, bytes) = upload_dir(c, &b.id, dir).await?;
            if !a.json {
                eprintln!(
                    "copied {files} files ({bytes} bytes) from {} into /workspace",
                    dir.display()
                );
            }
        }
        let spec = SessionSpec {
            box_ref: BoxRef::Id(b.id.clone()),
            agent: AgentSpec::Claude(ClaudeAgent {
                model: a.model.clone(),
                max_turns: a.max_turns,
                ..Default::default()
            }),
            pool: None,
            workdir: None,
            prompt: Some(a.prompt.clone()),
            keep_open: false,
        };
        Ok::<_, anyhow::Error>(c.create_session(&spec).await?)
    }
    .await;
    let s = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = c.delete_box(&b.id).await;
            return Err(e);
        }
    };
    let cost = (!a.json).then(|| live_cost(c.clone(), s.id.clone()));
    let mut r = render::Renderer::new(a.json, true);
    let mut result: Option<serde_json::Value> = None;
    let mut ended: Option<(String, String)> = None;
    // The server ends the session at its result; one that does not (a server from before
    // that rule) is given a moment, then ended below.
    let answered = std::sync::Arc::new(tokio::sync::Notify::new());
    let grace = {
        let answered = answered.clone();
        async move {
            answered.notified().await;
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        }
    };
    let follow = client::follow(c, &s.id, 0, |e| {
        r.event(&e);
        if e.kind == "result" && result.is_none() {
            result = Some(e.data.clone());
            answered.notify_one();
        }
        if e.kind == "status" {
            let st = e.data["state"].as_str().unwrap_or("");
            if matches!(st, "stopped" | "failed") {
                ended = Some((
                    st.to_string(),
                    e.data["reason"].as_str().unwrap_or("").to_string(),
                ));
                return false;
            }
        }
        true
    });
    let followed = tokio::select! {
        f = follow => f,
        _ = grace => Ok(0),
    };
    r.finish();
    if let Some(cost) = cost {
        cost.abort();
    }
    if followed.is_err() || ended.is_none() {
        // Interrupted: do not leave the session (and its box) running.
        let _ = c.delete_session(&s.id).await;
        followed?;
    }
    if let Some(out) = &a.out {
        let (files, bytes) = fetch_artifact(c, &b.id, out).await?;
        if !a.json {
            eprintln!(
                "copied {files} files ({bytes} bytes) from /workspace to {}",
                out.display()
            );
        }
    }
    let usage = c.session_usage(&s.id).await?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"session": s.id, "box": b.id, "result": result, "usage": usage})
        );
    } else {
        if let Some(r) = &result {
            println!("\n{}", r["result"].as_str().unwrap_or(""));
            eprintln!(
                "turns: {}  tokens: {} in / {} out  cost metered by berth: ${:.4} model + ${:.4} box = ${:.4} (agent-reported: ${:.4}{})",
                r["num_turns"],
                usage.total.input_tokens,
                usage.total.output_tokens,
                usage.total.cost_usd,
                usage.container_usd,
                usage.total_usd,
                r["total_cost_usd"].as_f64().unwrap_or(0.0),
                if usage.cost_gap { "; the two differ: check the price table" } else { "" }
            );
        }
    }
    match (&ended, &result) {
        (Some((st, reason)), _) if st == "failed" => bail!("the agent failed: {reason}"),
        (_, Some(r)) if r["is_error"] == true => {
            bail!("the agent stopped with {}", r["subtype"])
        }
        (_, None) => bail!(
            "the agent ended without a result: {}",
            ended.map(|(_, r)| r).unwrap_or_default()
        ),
        _ => {
            if !a.json {
                eprintln!("done");
            }
            Ok(())
        }
    }
}

/// Unpack the workspace archive an ended `keep_workspace` box left into `dest`; returns the
/// files and bytes written. Only plain files and directories inside `dest` are written.
pub(crate) async fn fetch_artifact(
    c: &Client,
    box_id: &str,
    dest: &std::path::Path,
) -> Result<(u64, u64)> {
    // The box is destroyed (and its archive stored) just after the session ends.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let b = c.get_box(box_id).await?;
        if b.artifact.is_some() {
            break;
        }
        if b.state.is_terminal() {
            bail!(
                "box {box_id} ended without a workspace archive ({}); `berth ls --all` and GET /v1/boxes/{box_id}/events say why",
                b.state_reason.unwrap_or_default()
            );
        }
        if std::time::Instant::now() > deadline {
            bail!("box {box_id} did not end within 120 s; its workspace was not copied");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let tar = c.artifact(box_id).await?;
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut archive = tar::Archive::new(&tar[..]);
    let (mut files, mut bytes) = (0u64, 0u64);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        // Entries are `workspace/…`; anything else, or anything leaving it, is skipped.
        let Ok(rel) = path.strip_prefix("workspace") else {
            continue;
        };
        if rel.as_os_str().is_empty()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            continue;
        }
        let target = dest.join(rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => std::fs::create_dir_all(&target)?,
            tar::EntryType::Regular => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let mut f = std::fs::File::create(&target)
                    .with_context(|| format!("writing {}", target.display()))?;
                bytes += std::io::copy(&mut entry, &mut f)?;
                files += 1;
            }
            _ => {}
        }
    }
    Ok((files, bytes))
}

/// Copy `dir` into the box's workspace; returns the files and bytes copied.
pub(crate) async fn upload_dir(
    c: &Client,
    box_id: &str,
    dir: &std::path::Path,
) -> Result<(u64, u64)> {
    let mut stack = vec![dir.to_path_buf()];
    let (mut files, mut bytes) = (0u64, 0u64);
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(dir)?.to_string_lossy().into_owned();
                let data = std::fs::read(&p)?;
                bytes += data.len() as u64;
                files += 1;
                c.put_file(box_id, &rel, data).await?;
            }
        }
    }
    Ok((files, bytes))
}
