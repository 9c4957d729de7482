//! Box commands: `ls`, `create`, `exec`, `cp`, `rm`.

use crate::client::Client;
use crate::Conn;
use anyhow::{bail, Context, Result};
use berth_api::*;
use clap::Args;
use std::collections::BTreeMap;

#[derive(Args, Clone)]
pub(crate) struct LsArgs {
    /// Also list ended boxes and sessions (stopped, destroyed, failed).
    #[arg(long)]
    all: bool,
    /// Only objects in this state (box: creating, running, parking, parked, restoring,
    /// stopped, destroyed, failed; session: starting, running, idle, stopped, failed,
    /// interrupted). Implies --all.
    #[arg(long)]
    state: Option<String>,
    /// Only boxes with this label (KEY=VALUE), and their sessions.
    #[arg(long)]
    label: Option<String>,
    /// Print {"boxes": [...], "sessions": [...]} as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub(crate) conn: Conn,
}

#[derive(Args, Clone)]
pub(crate) struct CreateArgs {
    /// What happens when the box is idle or its session ends: ephemeral (destroyed with its
    /// session), persistent (stops after the idle timeout), hybrid (parked to the snapshot
    /// store when idle, restored on next use).
    #[arg(long, default_value = "persistent", value_parser = ["ephemeral", "persistent", "hybrid"])]
    lifecycle: String,
    /// CPU limit, in CPUs (fractions allowed) [default: 1]
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory limit, in MiB [default: 1024]
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Disk quota for /workspace, /home/agent and /tmp, in MiB [default: 5120]
    #[arg(long)]
    disk_mib: Option<u64>,
    /// Most processes at once [default: 512]
    #[arg(long)]
    pids: Option<u64>,
    /// Seconds without activity before the box stops (hybrid: parks) [default: the server's,
    /// 900]
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// Seconds after which the box stops, busy or not [default: none]
    #[arg(long)]
    max_lifetime: Option<u64>,
    /// KEY=VALUE environment for every process in the box (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    /// KEY=VALUE label (repeatable); `berth ls --label` filters on it.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// KEY=VALUE node label the box's node must carry (repeatable; a cluster's
    /// `node_labels`, see `berth node ls`).
    #[arg(long = "node-selector")]
    node_selector: Vec<String>,
    /// Spread this tenant's boxes over the values of this node label (fewest first).
    #[arg(long)]
    spread_by: Option<String>,
    /// Print the box as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub(crate) conn: Conn,
}

#[derive(Args)]
pub(crate) struct ExecArgs {
    /// Box id (`box-…`).
    #[arg(value_name = "BOX")]
    box_id: String,
    /// Seconds before the command is killed.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print {exit_code, signal, timed_out, oom_killed, stdout, stderr} as JSON.
    #[arg(long)]
    json: bool,
    /// Give the command the model as agents have it (`ANTHROPIC_BASE_URL` and a token of its
    /// own as `ANTHROPIC_API_KEY`, metered to the box): an Agent SDK app then needs no set-up.
    #[arg(long)]
    model: bool,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
    #[command(flatten)]
    pub(crate) conn: Conn,
}

pub(crate) fn key_values(flag: &str, items: &[String]) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for kv in items {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--{flag} {kv}: expected KEY=VALUE"))?;
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}

pub(crate) fn box_spec(a: &CreateArgs) -> Result<BoxSpec> {
    let lifecycle = match a.lifecycle.as_str() {
        "ephemeral" => Lifecycle::Ephemeral,
        "persistent" => Lifecycle::Persistent,
        "hybrid" => Lifecycle::Hybrid,
        other => bail!("unknown lifecycle {other:?} (ephemeral, persistent, hybrid)"),
    };
    let mut r = Resources::default();
    if let Some(v) = a.cpus {
        r.cpus = v;
    }
    if let Some(v) = a.memory_mib {
        r.memory_mib = v;
    }
    if let Some(v) = a.disk_mib {
        r.disk_mib = v;
    }
    if let Some(v) = a.pids {
        r.pids = v;
    }
    let node_selector = key_values("node-selector", &a.node_selector)?;
    let placement = (!node_selector.is_empty() || a.spread_by.is_some()).then(|| Placement {
        node_selector,
        spread_by: a.spread_by.clone(),
    });
    Ok(BoxSpec {
        lifecycle: Some(lifecycle),
        resources: r,
        placement,
        env: key_values("env", &a.env)?,
        labels: key_values("label", &a.labels)?,
        // Unset: the server's default for the lifecycle.
        idle_timeout_s: a.idle_timeout.map(Some),
        max_lifetime_s: a.max_lifetime,
        ..Default::default()
    })
}

pub(crate) async fn ls(c: &Client, a: &LsArgs) -> Result<()> {
    let boxes = c.list_boxes().await?;
    let sessions = c.list_sessions().await?;
    if let Some(st) = &a.state {
        if BoxState::parse(st).is_none() && SessionState::parse(st).is_none() {
            bail!("--state {st:?}: not a box state (creating, running, parking, parked, restoring, stopped, destroyed, failed) or session state (starting, running, idle, stopped, failed, interrupted)");
        }
    }
    let label = match &a.label {
        Some(l) => Some(
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--label {l}: expected KEY=VALUE"))?,
        ),
        None => None,
    };
    let boxes: Vec<BoxObject> = boxes
        .items
        .into_iter()
        .filter(|b| match &a.state {
            Some(st) => b.state.as_str() == st,
            None => a.all || !b.state.is_terminal(),
        })
        .filter(|b| {
            label
                .as_ref()
                .is_none_or(|(k, v)| b.labels.get(k) == Some(v))
        })
        .collect();
    let sessions: Vec<SessionObject> = sessions
        .items
        .into_iter()
        .filter(|s| match &a.state {
            Some(st) => s.state.as_str() == st,
            None => a.all || !s.state.is_terminal(),
        })
        // A label selects boxes; their sessions come with them.
        .filter(|s| label.is_none() || boxes.iter().any(|b| b.id == s.box_id))
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"boxes": boxes, "sessions": sessions})
        );
        return Ok(());
    }
    println!(
        "{:<22} {:<10} {:<10} {:<8} {:>5} {:>8} {:>9} {:>9} {:>5} {:>9}  CREATED",
        "BOX",
        "STATE",
        "LIFECYCLE",
        "BACKEND",
        "CPUS",
        "MEM_MIB",
        "CPU_S",
        "MEM_USED",
        "PIDS",
        "DISK_USED"
    );
    for b in &boxes {
        // Live figures from the box's cgroup and quota, for running boxes.
        let stats: Option<BoxStats> = if b.state == BoxState::Running {
            c.box_stats(&b.id).await.ok()
        } else {
            None
        };
        let (cpu, mem, pids, disk) = match &stats {
            Some(st) => (
                format!("{:.2}", st.cpu_usage_ns as f64 / 1e9),
                mib(st.memory_bytes),
                st.pids.to_string(),
                mib(st.disk_used_bytes),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<22} {:<10} {:<10} {:<8} {:>5} {:>8} {:>9} {:>9} {:>5} {:>9}  {}",
            b.id,
            b.state.as_str(),
            format!("{:?}", b.lifecycle).to_lowercase(),
            b.backend,
            b.resources.cpus,
            b.resources.memory_mib,
            cpu,
            mem,
            pids,
            disk,
            b.created_at
        );
    }
    println!();
    println!(
        "{:<22} {:<22} {:<12} {:>6}  CREATED",
        "SESSION", "BOX", "STATE", "EVENTS"
    );
    for s in &sessions {
        println!(
            "{:<22} {:<22} {:<12} {:>6}  {}",
            s.id,
            s.box_id,
            s.state.as_str(),
            s.last_seq,
            s.created_at
        );
    }
    if !a.all && a.state.is_none() {
        eprintln!("(live objects only; --all lists ended ones too)");
    }
    Ok(())
}

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1024.0 * 1024.0))
}

pub(crate) fn split_box_path(s: &str) -> Option<(&str, &str)> {
    let (b, p) = s.split_once(':')?;
    (b.starts_with("box-")).then_some((
        b,
        p.trim_start_matches("/workspace/").trim_start_matches('/'),
    ))
}

pub(crate) async fn cp(c: &Client, src: &str, dst: &str) -> Result<()> {
    match (split_box_path(src), split_box_path(dst)) {
        (Some((b, p)), None) => {
            let f = c.get_file(b, p).await?;
            if f.is_json {
                bail!("{src} is a directory; copy files one at a time");
            }
            std::fs::write(dst, f.bytes).with_context(|| format!("writing {dst}"))?;
        }
        (None, Some((b, p))) => {
            let data = std::fs::read(src).with_context(|| format!("reading {src}"))?;
            c.put_file(b, p, data).await?;
        }
        _ => bail!("exactly one of SRC and DST must be BOX:path"),
    }
    Ok(())
}

/// `berth create`.
pub(crate) async fn create(c: &Client, a: &CreateArgs) -> Result<()> {
    let b = c.create_box(&box_spec(a)?).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&b)?);
    } else {
        println!("{}", b.id);
    }
    Ok(())
}

/// `berth exec`: exits with the command's exit code.
pub(crate) async fn exec(c: &Client, a: ExecArgs) -> Result<()> {
    let req = ExecRequest {
        argv: a.argv,
        timeout_s: Some(a.timeout),
        model: a.model,
        ..Default::default()
    };
    let r = c.exec(&a.box_id, &req).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", r.stdout);
        eprint!("{}", r.stderr);
    }
    let code = r.exit_code.unwrap_or(128 + r.signal.unwrap_or(0));
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// `berth rm`.
pub(crate) async fn rm(c: &Client, ids: Vec<String>, json: bool) -> Result<()> {
    let mut ended = Vec::new();
    for id in ids {
        let (v, line) = if id.starts_with("ses-") {
            let s = c.delete_session(&id).await?;
            let line = format!("{} {}", s.id, s.state.as_str());
            (serde_json::to_value(s)?, line)
        } else {
            let b = c.delete_box(&id).await?;
            let line = format!("{} {}", b.id, b.state.as_str());
            (serde_json::to_value(b)?, line)
        };
        if json {
            ended.push(v);
        } else {
            println!("{line}");
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&ended)?);
    }
    Ok(())
}
