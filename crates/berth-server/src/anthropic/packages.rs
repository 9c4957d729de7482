//! An environment's `packages`, installed into each session's box before its first turn: as
//! the agent's user (no root), into its home (kept across parks), through the box's egress
//! proxy like everything else the box fetches.
//!
//! berth serves `pip` (`python3 -m pip install --user`) and `npm` (`npm install --global
//! --prefix ~/.local`, linked as `~/.node_modules` so `require` finds them), with the box's own
//! Python and npm. `apt` needs root in the box, which
//! berth never gives; `cargo`, `gem` and `go` are not served yet: each is a 400 naming it.
//! The registries' hosts are added to the box's allowlist for the session; a mirror is named in
//! the environment's metadata (`berth_pip_index_url`, `berth_npm_registry`: a berth extension,
//! for servers without the internet).

use super::tools::url_host;
use super::{AError, AResult};
use crate::engine::Engine;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const MANAGERS: [&str; 6] = ["apt", "cargo", "gem", "go", "npm", "pip"];
const MAX_PACKAGES: usize = 100;
const MAX_SPEC: usize = 200;
/// Metadata keys naming mirrors.
pub const PIP_INDEX: &str = "berth_pip_index_url";
pub const NPM_REGISTRY: &str = "berth_npm_registry";
/// How long one manager's install may take.
const INSTALL_TIMEOUT_S: u64 = 900;

/// Why a manager berth does not run is refused.
fn unserved(manager: &str) -> Option<&'static str> {
    match manager {
        "apt" => Some("apt installs as root, and berth boxes give the agent no root"),
        "cargo" | "gem" | "go" => Some("berth installs only pip and npm packages so far"),
        _ => None,
    }
}

/// A package spec as a manager takes it on its command line: no options, no spaces.
fn spec_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SPEC
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'@')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.=<>!~[],@/:+^*".contains(&b))
}

/// `packages` with every list present; a 400 naming a manager berth cannot serve or a spec it
/// will not pass on.
pub fn check(v: Option<&Value>) -> AResult<Value> {
    let mut out = json!({"type": "packages", "apt": [], "cargo": [], "gem": [], "go": [], "npm": [], "pip": []});
    let Some(p) = v.filter(|p| !p.is_null()) else {
        return Ok(out);
    };
    if !p.is_object() {
        return Err(AError::invalid("packages must be an object"));
    }
    for m in MANAGERS {
        let list: Vec<String> = match p.get(m) {
            None | Some(Value::Null) => Vec::new(),
            Some(l) => serde_json::from_value(l.clone())
                .map_err(|_| AError::invalid(format!("packages.{m} must be a list of strings")))?,
        };
        if list.is_empty() {
            continue;
        }
        if let Some(why) = unserved(m) {
            return Err(AError::invalid(format!(
                "berth cannot install {m} packages: {why}"
            )));
        }
        if list.len() > MAX_PACKAGES {
            return Err(AError::invalid(format!(
                "at most {MAX_PACKAGES} {m} packages"
            )));
        }
        if let Some(bad) = list.iter().find(|s| !spec_ok(s)) {
            return Err(AError::invalid(format!(
                "packages.{m}: {bad:?} is not a package spec berth passes on"
            )));
        }
        out[m] = json!(list);
    }
    Ok(out)
}

fn list<'a>(env: &'a Value, manager: &str) -> Vec<&'a str> {
    env["config"]["packages"][manager]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// A mirror URL from the environment's metadata, checked.
fn mirror(env: &Value, key: &str) -> AResult<Option<String>> {
    match env["metadata"].get(key).and_then(Value::as_str) {
        None => Ok(None),
        Some(u) if url_host(u).is_some() => Ok(Some(u.to_string())),
        Some(u) => Err(AError::invalid(format!(
            "environment metadata {key} is not an http(s) URL with a host name: {u:?}"
        ))),
    }
}

/// Hosts a session's box must reach to install its environment's packages.
pub fn hosts(env: &Value) -> AResult<Vec<String>> {
    let mut out = Vec::new();
    if !list(env, "pip").is_empty() {
        match mirror(env, PIP_INDEX)? {
            Some(u) => out.extend(url_host(&u)),
            None => out.extend(["pypi.org".into(), "files.pythonhosted.org".into()]),
        }
    }
    if !list(env, "npm").is_empty() {
        match mirror(env, NPM_REGISTRY)? {
            Some(u) => out.extend(url_host(&u)),
            None => out.push("registry.npmjs.org".into()),
        }
    }
    Ok(out)
}

/// Install the environment's packages into the box (nothing to do without any); a failure is a
/// 400 with the manager's last words.
pub async fn install(e: &Arc<Engine>, tenant: &str, box_id: &str, env: &Value) -> AResult<()> {
    let pip = list(env, "pip");
    if !pip.is_empty() {
        let mut argv: Vec<String> = [
            "python3",
            "-m",
            "pip",
            "install",
            "--user",
            "--no-input",
            "--disable-pip-version-check",
            "--no-warn-script-location",
        ]
        .map(String::from)
        .to_vec();
        if let Some(u) = mirror(env, PIP_INDEX)? {
            if u.starts_with("http://") {
                argv.extend(["--trusted-host".into(), url_host(&u).unwrap_or_default()]);
            }
            argv.extend(["--index-url".into(), u]);
        }
        // Not the image's own Python environment: the agent's user site.
        let vars = BTreeMap::from([("PIP_BREAK_SYSTEM_PACKAGES".into(), "1".into())]);
        run(e, tenant, box_id, "pip", argv, &pip, vars).await?;
    }
    let npm = list(env, "npm");
    if !npm.is_empty() {
        let mut argv: Vec<String> = [
            "npm",
            "install",
            "--global",
            "--prefix",
            "/home/agent/.local",
            "--no-fund",
            "--no-audit",
            "--no-update-notifier",
        ]
        .map(String::from)
        .to_vec();
        if let Some(u) = mirror(env, NPM_REGISTRY)? {
            argv.push(format!("--registry={u}"));
        }
        run(e, tenant, box_id, "npm", argv, &npm, BTreeMap::new()).await?;
        // Node's `require` looks in `$HOME/.node_modules`, not in a global prefix: the link
        // lets the agent's scripts load what was installed, from any directory.
        let link = [
            "ln",
            "-sfn",
            "/home/agent/.local/lib/node_modules",
            "/home/agent/.node_modules",
        ]
        .map(String::from)
        .to_vec();
        let out = e
            .exec(
                tenant,
                box_id,
                berth_api::ExecRequest {
                    argv: link,
                    cwd: Some("/home/agent".into()),
                    env: BTreeMap::new(),
                    stdin: None,
                    timeout_s: Some(30),
                    model: false,
                },
            )
            .await?;
        if out.exit_code != Some(0) {
            return Err(AError::invalid(format!(
                "linking the npm packages for require failed: {}",
                out.stderr.trim()
            )));
        }
    }
    Ok(())
}

async fn run(
    e: &Arc<Engine>,
    tenant: &str,
    box_id: &str,
    manager: &str,
    mut argv: Vec<String>,
    specs: &[&str],
    env: BTreeMap<String, String>,
) -> AResult<()> {
    // Everything after `--` is a package, whatever it looks like.
    argv.push("--".into());
    argv.extend(specs.iter().map(|s| s.to_string()));
    let out = e
        .exec(
            tenant,
            box_id,
            berth_api::ExecRequest {
                argv,
                cwd: Some("/home/agent".into()),
                env,
                stdin: None,
                timeout_s: Some(INSTALL_TIMEOUT_S),
                model: false,
            },
        )
        .await?;
    if out.exit_code == Some(0) {
        return Ok(());
    }
    let tail: String = {
        let text = if out.stderr.trim().is_empty() {
            &out.stdout
        } else {
            &out.stderr
        };
        let t = text.trim();
        let mut cut = t.len().saturating_sub(600);
        while !t.is_char_boundary(cut) {
            cut += 1;
        }
        t[cut..].to_string()
    };
    Err(AError::invalid(format!(
        "installing the environment's {manager} packages failed ({}): {tail}",
        match (out.timed_out, out.exit_code) {
            (true, _) => "timed out".to_string(),
            (_, Some(c)) => format!("exit {c}"),
            _ => "killed".to_string(),
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_managers_pass_and_the_others_are_named() {
        let ok = check(Some(
            &json!({"pip": ["requests==2.32.3", "numpy>=2"], "npm": ["@scope/pkg@1.2.3"]}),
        ))
        .expect("ok");
        assert_eq!(ok["pip"], json!(["requests==2.32.3", "numpy>=2"]));
        assert_eq!(ok["apt"], json!([]));
        for m in ["apt", "cargo", "gem", "go"] {
            let mut p = json!({});
            p[m] = json!(["x"]);
            let e = check(Some(&p)).expect_err(m);
            assert!(e.message.contains(m), "{}", e.message);
        }
        for bad in ["--index-url=http://x", "-r", "a b", "x;rm", ""] {
            assert!(check(Some(&json!({"pip": [bad]}))).is_err(), "{bad}");
        }
    }

    #[test]
    fn registries_join_the_allowlist() {
        let env = json!({"config": {"packages": {"pip": ["x"], "npm": ["y"]}}, "metadata": {}});
        assert_eq!(
            hosts(&env).expect("hosts"),
            vec!["pypi.org", "files.pythonhosted.org", "registry.npmjs.org"]
        );
        let env = json!({"config": {"packages": {"pip": ["x"]}}, "metadata": {PIP_INDEX: "http://pypi.test:8080/simple"}});
        assert_eq!(hosts(&env).expect("hosts"), vec!["pypi.test"]);
        let env = json!({"config": {"packages": {"pip": ["x"]}}, "metadata": {PIP_INDEX: "http://10.0.0.1/"}});
        assert!(hosts(&env).is_err());
    }
}
