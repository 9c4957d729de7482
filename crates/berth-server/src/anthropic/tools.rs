//! An agent's tools and MCP servers: checked when the agent is written, then turned into the
//! Claude Code CLI's settings for a session (`claude`) and the permission picture the event
//! mapping needs (`Policy`).
//!
//! - `agent_toolset_20260401`: the CLI's built-in tools (`TOOLS`), each enabled or not, asking
//!   first or not.
//! - `custom`: the client runs them. The CLI reaches them through berth's own MCP server
//!   (`engine::custom_tools`), so custom tool `x` is the CLI's `mcp__berth__x`.
//! - `mcp_servers` (`{type:"url",name,url}`) with an `mcp_toolset` each: the CLI's `--mcp-config`
//!   (HTTP transport, through the box's egress proxy), tools `mcp__<server>__<tool>`.

use super::{AError, AResult};
use crate::engine::custom_tools::{mcp_server_config, SERVER, TOOL_PREFIX};
use berth_api::{ClaudeAgent, PermissionRule};
use serde_json::{json, Map, Value};

/// The built-in tools of `agent_toolset_20260401` and the Claude Code CLI tools they are.
pub const TOOLS: [(&str, &str); 8] = [
    ("bash", "Bash"),
    ("read", "Read"),
    ("write", "Write"),
    ("edit", "Edit"),
    ("glob", "Glob"),
    ("grep", "Grep"),
    ("web_fetch", "WebFetch"),
    ("web_search", "WebSearch"),
];

/// The built-in tools the `auto` policy runs without asking: they only read the box's files.
/// `web_fetch` and `web_search` read too, but what they send leaves the box (a URL or a query
/// can carry the box's data), so under `auto` they ask like the tools that write.
const READ_ONLY: [&str; 3] = ["read", "glob", "grep"];

/// Whether a tool under `policy` asks the client first. `auto` decides per tool: read-only
/// built-in tools (`READ_ONLY`) run, everything else asks (MCP tools included: berth cannot
/// tell which of a server's tools only read).
fn asks_under(policy: &Value, builtin: Option<&str>) -> bool {
    match policy["type"].as_str() {
        Some("always_ask") => true,
        Some("auto") => !builtin.is_some_and(|n| READ_ONLY.contains(&n)),
        _ => false,
    }
}

/// Longest custom tool name: the model sees `mcp__berth__<name>`, at most 64 characters.
const MAX_CUSTOM_NAME: usize = 64 - TOOL_PREFIX.len();
/// Bytes of one custom tool's definition (as JSON).
const MAX_CUSTOM_DEFINITION: usize = 64 * 1024;
const MAX_MCP_SERVERS: usize = 20;

fn policy_of(v: Option<&Value>, default: &Value) -> AResult<Value> {
    let p = v.cloned().unwrap_or_else(|| default.clone());
    match p.get("type").and_then(Value::as_str) {
        Some("always_allow") | Some("always_ask") | Some("auto") => Ok(p),
        _ => Err(AError::invalid("unknown permission_policy")),
    }
}

fn name_ok(n: &str, max: usize) -> bool {
    !n.is_empty()
        && n.len() <= max
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `default_config` and `configs` of a toolset, defaults filled in; `known` checks a config's
/// tool name.
fn toolset_configs(t: &Value, known: impl Fn(&str) -> bool) -> AResult<(Value, Vec<Value>)> {
    let allow = json!({"type": "always_allow"});
    let dc = t.get("default_config").cloned().unwrap_or(json!({}));
    let enabled = dc.get("enabled").and_then(Value::as_bool).unwrap_or(true);
    let pol = policy_of(dc.get("permission_policy"), &allow)?;
    let mut configs = Vec::new();
    for c in t
        .get("configs")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let name = c
            .get("name")
            .or_else(|| c.get("type"))
            .and_then(Value::as_str)
            .ok_or_else(|| AError::invalid("a tool config needs a name"))?;
        if !known(name) {
            return Err(AError::invalid(format!("unknown tool {name:?} in configs")));
        }
        configs.push(json!({
            "name": name,
            "enabled": c.get("enabled").and_then(Value::as_bool).unwrap_or(enabled),
            "permission_policy": policy_of(c.get("permission_policy"), &pol)?,
        }));
    }
    Ok((
        json!({"enabled": enabled, "permission_policy": pol}),
        configs,
    ))
}

/// Tools with defaults filled in; anything berth cannot run is refused.
pub fn tools(v: Option<&Value>) -> AResult<Value> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(json!([]));
    };
    let list = v
        .as_array()
        .ok_or_else(|| AError::invalid("tools must be an array"))?;
    if list.len() > 256 {
        return Err(AError::invalid("at most 256 tools"));
    }
    let mut out = Vec::new();
    let mut custom_names = Vec::new();
    for t in list {
        match t.get("type").and_then(Value::as_str) {
            Some("agent_toolset_20260401") => {
                let (dc, configs) = toolset_configs(t, |n| TOOLS.iter().any(|(b, _)| *b == n))?;
                let configs = configs
                    .into_iter()
                    .map(|mut c| {
                        c["type"] = c["name"].clone();
                        c
                    })
                    .collect::<Vec<_>>();
                out.push(json!({"type": "agent_toolset_20260401", "default_config": dc, "configs": configs}));
            }
            Some("mcp_toolset") => {
                let server = t
                    .get("mcp_server_name")
                    .and_then(Value::as_str)
                    .filter(|s| name_ok(s, 64))
                    .ok_or_else(|| AError::invalid("mcp_toolset needs an mcp_server_name"))?;
                let (dc, configs) = toolset_configs(t, |n| name_ok(n, 64))?;
                if dc["enabled"] == false && configs.iter().any(|c| c["enabled"] == true) {
                    return Err(AError::invalid(
                        "berth cannot enable single tools of a disabled mcp_toolset: enable the toolset and disable the others",
                    ));
                }
                out.push(json!({"type": "mcp_toolset", "mcp_server_name": server, "default_config": dc, "configs": configs}));
            }
            Some("custom") => {
                let name = t.get("name").and_then(Value::as_str).unwrap_or("");
                if !name_ok(name, MAX_CUSTOM_NAME) {
                    return Err(AError::invalid(format!(
                        "a custom tool's name is 1 to {MAX_CUSTOM_NAME} letters, digits, _ or -"
                    )));
                }
                if custom_names.contains(&name) {
                    return Err(AError::invalid(format!("two custom tools named {name:?}")));
                }
                custom_names.push(name);
                let description = match t.get("description") {
                    None | Some(Value::Null) => "",
                    Some(Value::String(s)) => s.as_str(),
                    Some(_) => return Err(AError::invalid("description must be a string")),
                };
                let schema = t.get("input_schema").cloned().unwrap_or(json!({}));
                if schema.get("type").and_then(Value::as_str) != Some("object") {
                    return Err(AError::invalid(
                        "a custom tool's input_schema is an object schema ({\"type\":\"object\",…})",
                    ));
                }
                let def = json!({"type": "custom", "name": name, "description": description, "input_schema": schema});
                if def.to_string().len() > MAX_CUSTOM_DEFINITION {
                    return Err(AError::invalid(format!(
                        "a custom tool's definition is at most {MAX_CUSTOM_DEFINITION} bytes"
                    )));
                }
                out.push(def);
            }
            _ => return Err(AError::invalid("unknown tool type")),
        }
    }
    Ok(Value::Array(out))
}

/// `mcp_servers` checked: `{type:"url", name, url}` with an http(s) URL, names unique and not
/// berth's own.
pub fn mcp_servers(v: Option<&Value>) -> AResult<Value> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(json!([]));
    };
    let list = v
        .as_array()
        .ok_or_else(|| AError::invalid("mcp_servers must be an array"))?;
    if list.len() > MAX_MCP_SERVERS {
        return Err(AError::invalid(format!(
            "at most {MAX_MCP_SERVERS} mcp_servers"
        )));
    }
    let mut out: Vec<Value> = Vec::new();
    for s in list {
        if s.get("type").and_then(Value::as_str) != Some("url") {
            return Err(AError::invalid(
                "mcp_servers entries are {\"type\":\"url\",…}",
            ));
        }
        let name = s.get("name").and_then(Value::as_str).unwrap_or("");
        if !name_ok(name, 64) || name.contains("__") {
            return Err(AError::invalid(format!(
                "an MCP server's name is 1 to 64 letters, digits, _ or - (no \"__\"), not {name:?}"
            )));
        }
        if name == SERVER {
            return Err(AError::invalid(format!(
                "the MCP server name {SERVER:?} is berth's own (custom tools)"
            )));
        }
        if out.iter().any(|o| o["name"] == name) {
            return Err(AError::invalid(format!("two MCP servers named {name:?}")));
        }
        let url = s.get("url").and_then(Value::as_str).unwrap_or("");
        if url_host(url).is_none() {
            return Err(AError::invalid(format!(
                "an MCP server's url is http:// or https:// with a host name, not {url:?}"
            )));
        }
        out.push(json!({"type": "url", "name": name, "url": url}));
    }
    Ok(Value::Array(out))
}

/// The host name of an http(s) URL (no IP literals or user info: the egress proxy refuses IP
/// literals anyway).
pub fn url_host(url: &str) -> Option<String> {
    let u = axum::http::Uri::try_from(url).ok()?;
    if !matches!(u.scheme_str(), Some("http" | "https")) {
        return None;
    }
    let authority = u.authority()?;
    let host = authority.host().to_ascii_lowercase();
    let ok = !authority.as_str().contains('@')
        && !host.is_empty()
        && host.len() <= 253
        && host.parse::<std::net::Ipv4Addr>().is_err()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !host.starts_with('.')
        && !host.ends_with('.');
    ok.then_some(host)
}

/// Every `mcp_toolset` names a server of the agent, and every server has a toolset.
pub fn check_toolsets(tools: &Value, servers: &Value) -> AResult<()> {
    let sets: Vec<&str> = toolsets(tools)
        .filter_map(|t| t["mcp_server_name"].as_str())
        .collect();
    for s in servers.as_array().map(Vec::as_slice).unwrap_or_default() {
        let name = s["name"].as_str().unwrap_or("");
        if !sets.contains(&name) {
            return Err(AError::invalid(format!(
                "MCP server {name:?} has no mcp_toolset in tools"
            )));
        }
    }
    for name in &sets {
        let known = servers
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["name"] == *name));
        if !known {
            return Err(AError::invalid(format!(
                "mcp_toolset names {name:?}, which is not in mcp_servers"
            )));
        }
    }
    Ok(())
}

fn toolsets(tools: &Value) -> impl Iterator<Item = &Value> {
    tools
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|t| t["type"] == "mcp_toolset")
}

/// The agent's custom tool definitions.
pub fn custom_tools(agent: &Value) -> Vec<Value> {
    agent["tools"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|t| t["type"] == "custom")
        .cloned()
        .collect()
}

/// Hosts of the agent's MCP servers (the egress allowlist opens them when the environment
/// allows MCP servers).
pub fn mcp_hosts(agent: &Value) -> Vec<String> {
    agent["mcp_servers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|s| url_host(s["url"].as_str().unwrap_or("")))
        .collect()
}

/// What an agent lets its built-in tools do: (CLI name, enabled, asks first).
fn builtin_policies(agent: &Value) -> Vec<(&'static str, bool, bool)> {
    let mut out: Vec<(&'static str, bool, bool)> =
        TOOLS.iter().map(|(_, cli)| (*cli, false, false)).collect();
    for t in agent["tools"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|t| t["type"] == "agent_toolset_20260401")
    {
        let on = t["default_config"]["enabled"].as_bool().unwrap_or(true);
        let default_policy = &t["default_config"]["permission_policy"];
        for (i, (name, _)) in TOOLS.iter().enumerate() {
            let cfg = t["configs"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["name"] == *name));
            out[i].1 |= cfg.and_then(|c| c["enabled"].as_bool()).unwrap_or(on);
            let policy = cfg.map_or(default_policy, |c| &c["permission_policy"]);
            out[i].2 = asks_under(policy, Some(name));
        }
    }
    out
}

/// An MCP toolset's picture: (server, enabled at all, CLI names of disabled tools, asks by
/// default, CLI names of tools that ask, CLI names of tools configured to allow).
struct McpPolicy {
    server: String,
    enabled: bool,
    disabled: Vec<String>,
    asks_by_default: bool,
    asking: Vec<String>,
    allowing: Vec<String>,
}

fn mcp_policies(agent: &Value) -> Vec<McpPolicy> {
    toolsets(&agent["tools"])
        .map(|t| {
            let server = t["mcp_server_name"].as_str().unwrap_or("").to_string();
            let cli = |c: &Value| format!("mcp__{server}__{}", c["name"].as_str().unwrap_or(""));
            let configs = t["configs"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let asks = |c: &Value| asks_under(&c["permission_policy"], None);
            McpPolicy {
                enabled: t["default_config"]["enabled"] != false,
                disabled: configs
                    .iter()
                    .filter(|c| c["enabled"] == false)
                    .map(cli)
                    .collect(),
                asks_by_default: asks_under(&t["default_config"]["permission_policy"], None),
                asking: configs.iter().filter(|c| asks(c)).map(cli).collect(),
                allowing: configs.iter().filter(|c| !asks(c)).map(cli).collect(),
                server,
            }
        })
        .collect()
}

/// Which of the CLI's tools run without asking the client, and which servers are MCP servers.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// None: nothing asks. Else the tools that do not: CLI names, or `mcp__<server>` for every
    /// tool of a server.
    pub allowed: Option<Vec<String>>,
    /// The agent's MCP servers (tools `mcp__<server>__<tool>`).
    pub servers: Vec<String>,
}

impl Policy {
    pub fn of(agent: &Value) -> Policy {
        let servers = mcp_policies(agent).into_iter();
        let mut allowed = Vec::new();
        let mut any_asks = false;
        for (cli, on, ask) in builtin_policies(agent) {
            any_asks |= on && ask;
            if on && !ask {
                allowed.push(cli.to_string());
            }
        }
        let mut names = Vec::new();
        for m in servers {
            names.push(m.server.clone());
            if !m.enabled {
                continue;
            }
            if !m.asks_by_default && m.asking.is_empty() {
                allowed.push(format!("mcp__{}", m.server));
            } else {
                any_asks = true;
                // Only the tools configured to allow run without asking (a toolset that
                // allows by default but asks for some asks for all it does not name).
                allowed.extend(m.allowing);
            }
        }
        Policy {
            allowed: any_asks.then_some(allowed),
            servers: names,
        }
    }

    /// Whether the CLI asks the client before it runs `cli_tool`.
    pub fn asks(&self, cli_tool: &str) -> bool {
        if cli_tool.starts_with(TOOL_PREFIX) {
            return false;
        }
        self.allowed.as_ref().is_some_and(|a| {
            !a.iter().any(|t| {
                t == cli_tool
                    || (t.starts_with("mcp__")
                        && !t[5..].contains("__")
                        && cli_tool
                            .strip_prefix(t.as_str())
                            .is_some_and(|r| r.starts_with("__")))
            })
        })
    }

    /// (server, tool) of an MCP server's tool.
    pub fn mcp_tool<'a>(&self, cli_tool: &'a str) -> Option<(&str, &'a str)> {
        let rest = cli_tool.strip_prefix("mcp__")?;
        let (server, tool) = rest.split_once("__")?;
        let s = self.servers.iter().find(|s| *s == server)?;
        Some((s.as_str(), tool))
    }
}

/// The Claude Code CLI's settings for an agent: model, system prompt, its tools, its MCP servers
/// (berth's own for custom tools among them). A tool that asks first has no rule, so the CLI's
/// permission request reaches the client.
pub fn claude(agent: &Value) -> ClaudeAgent {
    let mut disallowed: Vec<String> = builtin_policies(agent)
        .into_iter()
        .filter(|(_, on, _)| !on)
        .map(|(cli, _, _)| cli.to_string())
        .collect();
    let mcp = mcp_policies(agent);
    for m in &mcp {
        if m.enabled {
            disallowed.extend(m.disabled.iter().cloned());
        } else {
            disallowed.push(format!("mcp__{}", m.server));
        }
    }
    let allow = |tool: &str| PermissionRule {
        tool: tool.into(),
        pattern: None,
        allow: true,
    };
    let policy = Policy::of(agent);
    let custom = custom_tools(agent);
    // The CLI asks only outside its bypass mode.
    let (permission_mode, mut permission_rules, allowed_tools) = match &policy.allowed {
        None => (None, vec![allow("*")], Vec::new()),
        Some(tools) => {
            // Whole servers are allowed by the CLI itself (its rules take `mcp__<server>`);
            // single tools by berth's rules.
            let (servers, single): (Vec<&String>, Vec<&String>) = tools
                .iter()
                .partition(|t| t.starts_with("mcp__") && !t[5..].contains("__"));
            (
                Some("default".to_string()),
                single.iter().map(|t| allow(t)).collect(),
                servers.into_iter().cloned().collect(),
            )
        }
    };
    for c in &custom {
        permission_rules.push(allow(&format!(
            "{TOOL_PREFIX}{}",
            c["name"].as_str().unwrap_or("")
        )));
    }
    let mut servers = Map::new();
    for s in agent["mcp_servers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if let Some(name) = s["name"].as_str() {
            servers.insert(name.into(), json!({"type": "http", "url": s["url"]}));
        }
    }
    if !custom.is_empty() {
        servers.insert(SERVER.into(), mcp_server_config());
    }
    ClaudeAgent {
        model: agent["model"]["id"].as_str().map(str::to_string),
        system_prompt: agent["system"].as_str().map(str::to_string),
        disallowed_tools: disallowed,
        allowed_tools,
        permission_rules,
        permission_mode,
        mcp_servers: (!servers.is_empty()).then_some(Value::Object(servers)),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(tools: Value, servers: Value) -> Value {
        let tools = super::tools(Some(&tools)).expect("tools");
        let servers = mcp_servers(Some(&servers)).expect("servers");
        check_toolsets(&tools, &servers).expect("toolsets");
        json!({"model": {"id": "m"}, "tools": tools, "mcp_servers": servers})
    }

    #[test]
    fn custom_tools_get_berths_mcp_server_and_an_allow_rule() {
        let a = agent(
            json!([{"type": "agent_toolset_20260401", "default_config": {"permission_policy": {"type": "always_ask"}}},
                   {"type": "custom", "name": "get_weather", "input_schema": {"type": "object"}}]),
            json!([]),
        );
        let c = claude(&a);
        let servers = c.mcp_servers.expect("servers");
        assert_eq!(servers[SERVER]["type"], "http");
        assert!(servers[SERVER]["headers"]["Authorization"]
            .as_str()
            .is_some_and(|h| h.contains("${BERTH_SESSION_TOKEN}")));
        assert_eq!(c.permission_mode.as_deref(), Some("default"));
        assert!(c
            .permission_rules
            .iter()
            .any(|r| r.tool == "mcp__berth__get_weather" && r.allow));
        let p = Policy::of(&a);
        assert!(!p.asks("mcp__berth__get_weather"));
        assert!(p.asks("Bash"));
    }

    #[test]
    fn mcp_toolsets_map_to_the_clis_settings_and_the_permission_picture() {
        let servers = json!([{"type": "url", "name": "docs", "url": "https://mcp.example.com/mcp"},
                             {"type": "url", "name": "off", "url": "https://off.example.com/"}]);
        let a = agent(
            json!([{"type": "mcp_toolset", "mcp_server_name": "docs",
                    "default_config": {"permission_policy": {"type": "always_ask"}},
                    "configs": [{"name": "search", "permission_policy": {"type": "always_allow"}},
                                {"name": "drop", "enabled": false}]},
                   {"type": "mcp_toolset", "mcp_server_name": "off", "default_config": {"enabled": false}}]),
            servers,
        );
        let c = claude(&a);
        assert_eq!(
            c.mcp_servers.expect("servers")["docs"]["url"],
            "https://mcp.example.com/mcp"
        );
        assert!(c.disallowed_tools.contains(&"mcp__docs__drop".to_string()));
        assert!(c.disallowed_tools.contains(&"mcp__off".to_string()));
        let p = Policy::of(&a);
        assert!(!p.asks("mcp__docs__search"));
        assert!(p.asks("mcp__docs__other"));
        assert_eq!(p.mcp_tool("mcp__docs__search"), Some(("docs", "search")));
        assert_eq!(p.mcp_tool("mcp__nope__x"), None);
        // A server allowed whole: every tool of it runs without asking, others' do not.
        let b = agent(
            json!([{"type": "mcp_toolset", "mcp_server_name": "docs"},
                   {"type": "agent_toolset_20260401", "configs": [{"name": "bash", "permission_policy": {"type": "always_ask"}}]}]),
            json!([{"type": "url", "name": "docs", "url": "http://mcp.test/mcp"}]),
        );
        let p = Policy::of(&b);
        assert!(!p.asks("mcp__docs__anything"));
        assert!(p.asks("mcp__docsx__anything"));
        assert!(p.asks("Bash"));
        assert_eq!(claude(&b).allowed_tools, vec!["mcp__docs".to_string()]);
    }

    /// `auto`: the read-only built-ins run, every other tool asks (MCP tools too), also when
    /// one tool's config says `auto` under a toolset that allows.
    #[test]
    fn auto_runs_read_only_tools_and_asks_for_the_rest() {
        let a = agent(
            json!([{"type": "agent_toolset_20260401", "default_config": {"permission_policy": {"type": "auto"}}},
                   {"type": "mcp_toolset", "mcp_server_name": "docs", "default_config": {"permission_policy": {"type": "auto"}}}]),
            json!([{"type": "url", "name": "docs", "url": "https://mcp.example.com/mcp"}]),
        );
        let p = Policy::of(&a);
        for t in ["Read", "Glob", "Grep"] {
            assert!(!p.asks(t), "{t}");
        }
        for t in [
            "Bash",
            "Write",
            "Edit",
            "WebFetch",
            "WebSearch",
            "mcp__docs__search",
        ] {
            assert!(p.asks(t), "{t}");
        }
        let c = claude(&a);
        assert_eq!(c.permission_mode.as_deref(), Some("default"));
        let rules: Vec<&str> = c.permission_rules.iter().map(|r| r.tool.as_str()).collect();
        assert_eq!(rules, vec!["Read", "Glob", "Grep"]);
        let b = agent(
            json!([{"type": "agent_toolset_20260401",
                    "configs": [{"name": "bash", "permission_policy": {"type": "auto"}},
                                {"name": "grep", "permission_policy": {"type": "auto"}}]}]),
            json!([]),
        );
        let p = Policy::of(&b);
        assert!(p.asks("Bash"));
        assert!(!p.asks("Grep") && !p.asks("Write"));
    }

    #[test]
    fn bad_definitions_are_refused() {
        for t in [
            json!([{"type": "custom", "name": "x".repeat(MAX_CUSTOM_NAME + 1), "input_schema": {"type": "object"}}]),
            json!([{"type": "custom", "name": "a b", "input_schema": {"type": "object"}}]),
            json!([{"type": "custom", "name": "t", "input_schema": {"type": "array"}}]),
            json!([{"type": "custom", "name": "t", "input_schema": {"type": "object"}},
                   {"type": "custom", "name": "t", "input_schema": {"type": "object"}}]),
            json!([{"type": "mcp_toolset", "mcp_server_name": "s", "default_config": {"enabled": false},
                    "configs": [{"name": "one", "enabled": true}]}]),
        ] {
            assert!(super::tools(Some(&t)).is_err(), "{t}");
        }
        for s in [
            json!([{"type": "url", "name": "berth", "url": "https://a.example/"}]),
            json!([{"type": "url", "name": "a", "url": "http://127.0.0.1/"}]),
            json!([{"type": "url", "name": "a", "url": "http://user@a.example/"}]),
            json!([{"type": "url", "name": "a", "url": "ftp://a.example/"}]),
            json!([{"type": "url", "name": "a__b", "url": "https://a.example/"}]),
        ] {
            assert!(mcp_servers(Some(&s)).is_err(), "{s}");
        }
        assert_eq!(
            url_host("https://MCP.Example.com:8443/x").as_deref(),
            Some("mcp.example.com")
        );
    }
}
