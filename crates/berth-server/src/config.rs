//! Server configuration: embedded defaults, then a TOML file, then environment variables, then
//! command-line flags (applied by the binary), each overriding the one before. The layering is
//! `figment`'s; every key has an environment variable (`BERTH_` and the key's path in capitals,
//! `.` as `_`: `listener.idle_timeout_s` is `BERTH_LISTENER_IDLE_TIMEOUT_S`), and the names
//! older releases read keep working ([`LEGACY_ENV`]). Settings that are a closed set are enums:
//! a value outside it stops the start naming the key and the values allowed.

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the API listens on.
    pub listen: SocketAddr,
    /// Where the store, snapshots and box state live.
    pub data_dir: PathBuf,
    /// Sandbox backend boxes use unless they ask for another.
    pub default_backend: BackendName,
    /// The model API the gateway forwards to.
    pub upstream_url: String,
    /// The real model API key; stays on the server side, never enters a box. (The config is
    /// serialized only to list its keys, from the defaults, where this is unset.)
    pub anthropic_api_key: Option<String>,
    /// How the real key is sent upstream: `x-api-key` (default) or `bearer`.
    pub upstream_auth: UpstreamAuth,
    /// Admin key to install on first start (otherwise one is generated).
    pub admin_key: Option<String>,
    /// Largest request body accepted, in bytes (file uploads included).
    pub max_body_bytes: usize,
    /// Largest output returned by the REST exec call, per stream, in bytes.
    pub max_exec_output_bytes: usize,
    /// Webhook calls a trigger accepts per minute; more answer 429 (each call starts a
    /// session: a leaked URL must not become a flood of boxes).
    pub hook_rate_per_minute: u32,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Model requests per minute allowed to each session (none: unlimited).
    pub session_rpm: Option<u32>,
    /// Boxes a tenant may have alive at once (creating, running).
    pub max_boxes_per_tenant: usize,
    /// What a committed event survives: `crash` (the server dying; default, no fsync per
    /// commit) or `power` (machine power loss too; fsync per commit, slower event delivery).
    pub durability: Durability,
    /// Where parked hybrid boxes' snapshots go (default `<data_dir>/snapshots`).
    pub snapshot_dir: Option<PathBuf>,
    // -- store (issue #19) --
    /// Where records, events and the ledger live: `sqlite://<path>` or `postgres://…`
    /// (default: SQLite at `<data_dir>/berth.db`). Servers sharing a PostgreSQL database serve
    /// each other's session streams live.
    pub database_url: Option<String>,
    /// Where parked boxes' snapshots go: `file:///<dir>` or `s3://<bucket>/<prefix>` (S3 set
    /// up by the standard AWS variables); overrides `snapshot_dir`.
    pub snapshot_url: Option<String>,
    /// The Claude Code CLI (default: `$BERTH_CLAUDE_BIN`, else `claude` on `PATH`). It must live
    /// where `host`-image boxes see it (under /usr, /opt, …), not under /root or /home.
    pub claude_cli: Option<PathBuf>,
    pub native: NativeSection,
    pub docker: DockerSection,
    pub egress: EgressSection,
    pub cost: CostSection,
    pub idle_timeout: IdleTimeoutSection,
    pub box_sockets: BoxSocketsSection,
    // -- hardening (issue #14): limits on what one client, box or tenant can take --
    /// The largest box the server makes; a spec over it gets 400 naming the ceiling.
    pub max_box: MaxBoxSection,
    /// What one tenant's live boxes may hold together; past it, 429 naming the limit.
    pub tenant_max: TenantMaxSection,
    /// Connection limits of the public API listener.
    pub listener: ListenerSection,
    /// Per-session caps on the event log (a flooding agent cannot grow the store unbounded).
    pub events: EventsSection,
    /// The CPU weight an agent's box gets while the agent starts (native backend).
    pub start_boost: StartBoostSection,
    // -- cluster (issue #20) --
    /// This node's name in the cluster (default: the host name). Unique per node.
    pub node_name: Option<String>,
    /// The URL other nodes reach this node's API at (default: `http://<listen address>`, the
    /// host name in place of an unspecified address).
    pub advertise_url: Option<String>,
    /// Shared by every node: signs node-to-node (forwarded) requests. Without it a node
    /// forwards nothing and places every box on itself.
    pub cluster_secret: Option<String>,
    /// How long a node's lease holds without a renewal, in ms (renewed every fifth of it);
    /// past it another node declares the node lost.
    pub node_lease_ms: u64,
    /// This node's labels (`BERTH_NODE_LABELS=k=v,k2=v2`): a box's `placement.node_selector`
    /// picks nodes by them, `placement.spread_by` spreads over their values.
    pub node_labels: std::collections::BTreeMap<String, String>,
    // -- warm pools (issue #22) --
    /// `[[pools]]`: boxes kept ready with their agent started (see `engine::pools`).
    pub pools: Vec<crate::engine::pools::PoolConfig>,
}

/// The largest box: unset fields default to the host's cores and memory, 100 GiB of disk
/// and 4096 processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaxBoxSection {
    /// `BERTH_MAX_BOX_CPUS`.
    pub cpus: Option<f64>,
    /// `BERTH_MAX_BOX_MEMORY_MIB`.
    pub memory_mib: Option<u64>,
    /// `BERTH_MAX_BOX_DISK_MIB`.
    pub disk_mib: Option<u64>,
    /// `BERTH_MAX_BOX_PIDS`.
    pub pids: Option<u64>,
}

/// Sums over one tenant's creating and running boxes (unset: no limit).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantMaxSection {
    /// `BERTH_TENANT_MAX_CPUS`.
    pub cpus: Option<f64>,
    /// `BERTH_TENANT_MAX_MEMORY_MIB`.
    pub memory_mib: Option<u64>,
    /// `BERTH_TENANT_MAX_DISK_MIB`.
    pub disk_mib: Option<u64>,
}

/// The public API listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerSection {
    /// Seconds a connection has to send a request's headers, from when it opens or its
    /// previous answer ends (slow or silent clients and idle keep-alives are closed after it).
    /// `BERTH_HEADER_READ_TIMEOUT_S`.
    pub header_read_timeout_s: u64,
    /// Connections served at once; more wait in the kernel's backlog. `BERTH_MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// Connections one peer address may hold at once; more are closed at accept.
    /// `BERTH_MAX_CONNECTIONS_PER_PEER`.
    pub max_connections_per_peer: usize,
    /// Seconds a connection (until it is upgraded) may go with no byte moving either way
    /// while the server waits on its client, e.g. for the rest of a body.
    /// `BERTH_CONN_IDLE_TIMEOUT_S`.
    pub idle_timeout_s: u64,
    /// Upgraded connections (WebSocket, proxied port upgrades) open at once, over all peers;
    /// more are answered 503. `BERTH_MAX_UPGRADES`.
    pub max_upgrades: usize,
}

impl Default for ListenerSection {
    fn default() -> Self {
        ListenerSection {
            header_read_timeout_s: 10,
            max_connections: 4096,
            max_connections_per_peer: 256,
            idle_timeout_s: 60,
            max_upgrades: 1024,
        }
    }
}

/// Caps on one session's event log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsSection {
    /// Events a session may store per second, sustained. `BERTH_EVENTS_PER_SECOND`.
    pub per_second: u32,
    /// Events a session may store in a burst above the sustained rate. `BERTH_EVENTS_BURST`.
    pub burst: u32,
    /// Largest event text/data kept, in bytes; longer text is cut with a marker.
    /// `BERTH_EVENT_MAX_BYTES`.
    pub max_bytes: usize,
    /// Agent events one session stores at most (over its whole life; the rest are counted).
    /// `BERTH_EVENTS_PER_SESSION`.
    pub max_per_session: u64,
}

impl Default for EventsSection {
    fn default() -> Self {
        EventsSection {
            per_second: 200,
            burst: 2000,
            max_bytes: 64 << 10,
            max_per_session: 1_000_000,
        }
    }
}

/// A session's agent starts with its box's CPU weight raised (the box's `cpu.shares`, and the
/// boxes' parent group's), until its first output or `max_ms`, so that boxes spinning on CPU
/// beside it do not slow its start; each box may spend `budget_ms` of boost, regained at
/// `refill` per second. The CPU limit (`cpus`) is never raised.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StartBoostSection {
    /// The box's weight while boosted, in cgroup v1 shares (a box has 1024); 0 turns the
    /// boost off. `BERTH_START_BOOST_SHARES`.
    pub shares: u64,
    /// The longest one boost lasts. `BERTH_START_BOOST_MAX_MS`.
    pub max_ms: u64,
    /// Boost time a box may spend in a row. `BERTH_START_BOOST_BUDGET_MS`.
    pub budget_ms: u64,
    /// Budget regained per second. `BERTH_START_BOOST_REFILL`.
    pub refill: f64,
}

impl Default for StartBoostSection {
    fn default() -> Self {
        StartBoostSection {
            shares: 4096,
            max_ms: 5000,
            budget_ms: 10_000,
            refill: 0.25,
        }
    }
}

impl StartBoostSection {
    /// The boost sessions ask for, `None` when turned off.
    pub fn spec(&self) -> Option<berth_sandbox::StartBoost> {
        (self.shares > 0 && self.max_ms > 0).then(|| berth_sandbox::StartBoost {
            shares: self.shares,
            max: std::time::Duration::from_millis(self.max_ms),
            budget: std::time::Duration::from_millis(self.budget_ms),
            refill: self.refill,
        })
    }
}

/// Limits on each socket a box reaches (model gateway, egress proxy, box-side API), per box
/// and per socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BoxSocketsSection {
    /// Connections open at once; more are answered 503 and closed. Also
    /// `BERTH_BOX_MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// Seconds a connection has to send a request head. Also `BERTH_BOX_HEADER_TIMEOUT_SECS`.
    pub header_timeout_secs: u64,
    /// Seconds without a byte moving either way before a connection is closed (a streaming
    /// answer that keeps moving is never cut). Also `BERTH_BOX_IDLE_TIMEOUT_SECS`.
    pub idle_timeout_secs: u64,
}

impl Default for BoxSocketsSection {
    fn default() -> Self {
        BoxSocketsSection {
            max_connections: 128,
            header_timeout_secs: 10,
            idle_timeout_secs: 300,
        }
    }
}

// ---- default idle timeouts (a box whose spec does not say) ----

/// Seconds without activity before a box whose spec has no `idle_timeout_s` stops (hybrid:
/// parks), per lifecycle: nothing runs, and is billed, forever by accident. `0`: never.
/// `BERTH_IDLE_TIMEOUT_S` sets all three.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdleTimeoutSection {
    pub ephemeral_s: u64,
    pub persistent_s: u64,
    pub hybrid_s: u64,
}

impl Default for IdleTimeoutSection {
    fn default() -> Self {
        IdleTimeoutSection {
            ephemeral_s: 900,
            persistent_s: 900,
            hybrid_s: 900,
        }
    }
}

impl IdleTimeoutSection {
    /// The default for a lifecycle; `None` is "never".
    pub fn for_lifecycle(&self, l: berth_api::Lifecycle) -> Option<u64> {
        let s = match l {
            berth_api::Lifecycle::Ephemeral => self.ephemeral_s,
            berth_api::Lifecycle::Persistent => self.persistent_s,
            berth_api::Lifecycle::Hybrid => self.hybrid_s,
        };
        (s > 0).then_some(s)
    }
}
// ---- end default idle timeouts ----

/// The Docker backend (boxes as containers of a local engine).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerSection {
    /// Offer the `docker` backend (also `BERTH_DOCKER=1`).
    pub enabled: bool,
    /// Offer the `gvisor` backend: boxes under the engine's gVisor runtime (also
    /// `BERTH_GVISOR=1`). Independent of `enabled`.
    pub gvisor: bool,
    /// The engine's name for the gVisor runtime (default `runsc`).
    pub gvisor_runtime: Option<String>,
    /// The engine's socket (default: `$DOCKER_HOST` or `/var/run/docker.sock`).
    pub socket: Option<PathBuf>,
}

/// Prices, container time and budget warnings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostSection {
    /// USD per hour a box runs (parked and stopped boxes cost nothing).
    pub box_hour_usd: f64,
    /// `flat`: every box costs `box_hour_usd`; `resources`: scaled by the larger of
    /// cpus / 1 and memory_mib / 1024 (the hosting guide's reference box).
    pub box_hour_scale: BoxHourScale,
    /// Budget fraction at which a `budget_warning` event is sent (session and tenant).
    pub budget_warn_fraction: f64,
    /// Model prices, USD per million tokens, ahead of the built-in table; `model` matches a
    /// substring of the model id; the first match wins.
    pub prices: Vec<PriceEntry>,
    /// The agent's own `total_cost_usd` and the gateway's figure differ by more than this
    /// fraction (and more than $0.0001): the session usage flags it.
    pub gap_fraction: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    pub model: String,
    pub input: f64,
    pub output: f64,
}

impl Default for CostSection {
    fn default() -> Self {
        CostSection {
            box_hour_usd: 0.05,
            box_hour_scale: BoxHourScale::Flat,
            budget_warn_fraction: 0.8,
            prices: vec![],
            gap_fraction: 0.05,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressSection {
    /// Resolver overrides for the egress proxy, `name = "addr:port"`, trusted as given
    /// (air-gapped mirrors, tests). Also `BERTH_EGRESS_OVERRIDES="name=addr:port,…"`.
    pub overrides: std::collections::BTreeMap<String, String>,
    /// Extra root certificates (PEM files) trusted for TLS the proxy originates when it injects
    /// secrets. Also `BERTH_EGRESS_CA_FILE`.
    pub ca_files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NativeSection {
    /// Formatted disk images kept ready per size (ext4 disks).
    pub disk_pool: usize,
    /// Where boxes' quota disks come from: `auto` (a subvolume each of one shared btrfs where
    /// the host can, else an ext4 image each), `btrfs` or `ext4`.
    pub disks: berth_sandbox::native::Disks,
}

impl Default for NativeSection {
    fn default() -> Self {
        NativeSection {
            disk_pool: 4,
            disks: berth_sandbox::native::Disks::Auto,
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";

/// `$BERTH_DATA_DIR`, else `$XDG_DATA_HOME/berth`, else `~/.local/share/berth`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BERTH_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("berth");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    home.join(".local/share/berth")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7700))),
            data_dir: default_data_dir(),
            default_backend: BackendName::Native,
            upstream_url: "https://api.anthropic.com".into(),
            anthropic_api_key: None,
            upstream_auth: UpstreamAuth::XApiKey,
            admin_key: None,
            max_body_bytes: 64 << 20,
            max_exec_output_bytes: 16 << 20,
            hook_rate_per_minute: 60,
            log_format: LogFormat::Text,
            session_rpm: None,
            max_boxes_per_tenant: 100,
            durability: Durability::Crash,
            snapshot_dir: None,
            database_url: None,
            snapshot_url: None,
            claude_cli: None,
            native: NativeSection::default(),
            docker: DockerSection::default(),
            egress: EgressSection::default(),
            cost: CostSection::default(),
            idle_timeout: IdleTimeoutSection::default(),
            box_sockets: BoxSocketsSection::default(),
            max_box: MaxBoxSection::default(),
            tenant_max: TenantMaxSection::default(),
            listener: ListenerSection::default(),
            events: EventsSection::default(),
            start_boost: StartBoostSection::default(),
            node_name: None,
            advertise_url: None,
            cluster_secret: None,
            node_lease_ms: 5000,
            node_labels: Default::default(),
            pools: Vec::new(),
        }
    }
}

/// A setting that is one of a closed set of names: parsed (from the file, the environment or
/// a flag) into the enum, so a typo stops the start instead of surfacing later.
macro_rules! closed_set {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, as written in the config.
            pub const ALLOWED: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        "{other:?} is not one of {}",
                        Self::ALLOWED.join(", ")
                    )),
                }
            }
        }
    };
}

closed_set!(
    /// A sandbox backend's name.
    BackendName {
        Native = "native",
        Docker = "docker",
        Gvisor = "gvisor",
    }
);

closed_set!(
    /// How the real model key is sent upstream.
    UpstreamAuth {
        XApiKey = "x-api-key",
        Bearer = "bearer",
    }
);

closed_set!(
    /// The server's log lines.
    LogFormat {
        Text = "text",
        Json = "json",
    }
);

closed_set!(
    /// What a committed event survives.
    Durability {
        /// The server dying (no fsync per commit).
        Crash = "crash",
        /// Machine power loss too (fsync per commit).
        Power = "power",
    }
);

closed_set!(
    /// How a box's hourly price scales.
    BoxHourScale {
        /// Every box costs `box_hour_usd`.
        Flat = "flat",
        /// Scaled by the larger of cpus / 1 and memory_mib / 1024.
        Resources = "resources",
    }
);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// A value (from the file or the environment) the key does not take; the message names
    /// the key, where the value came from and what was expected.
    #[error("configuration: {0}")]
    Invalid(Box<figment::Error>),
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Invalid(Box::new(e))
    }
}

/// Older environment names, each still read, and the keys it sets (a canonical name set at
/// the same time wins). `BERTH_EGRESS_CA_FILE` adds one file to `egress.ca_files`.
pub const LEGACY_ENV: &[(&str, &[&str])] = &[
    ("BERTH_BACKEND", &["default_backend"]),
    ("ANTHROPIC_API_KEY", &["anthropic_api_key"]),
    ("BERTH_CLAUDE_BIN", &["claude_cli"]),
    ("BERTH_DOCKER", &["docker.enabled"]),
    ("BERTH_GVISOR", &["docker.gvisor"]),
    ("BERTH_BOX_HOUR_USD", &["cost.box_hour_usd"]),
    ("BERTH_EGRESS_CA_FILE", &["egress.ca_files"]),
    (
        "BERTH_IDLE_TIMEOUT_S",
        &[
            "idle_timeout.ephemeral_s",
            "idle_timeout.persistent_s",
            "idle_timeout.hybrid_s",
        ],
    ),
    (
        "BERTH_BOX_MAX_CONNECTIONS",
        &["box_sockets.max_connections"],
    ),
    (
        "BERTH_BOX_HEADER_TIMEOUT_SECS",
        &["box_sockets.header_timeout_secs"],
    ),
    (
        "BERTH_BOX_IDLE_TIMEOUT_SECS",
        &["box_sockets.idle_timeout_secs"],
    ),
    (
        "BERTH_HEADER_READ_TIMEOUT_S",
        &["listener.header_read_timeout_s"],
    ),
    ("BERTH_MAX_CONNECTIONS", &["listener.max_connections"]),
    (
        "BERTH_MAX_CONNECTIONS_PER_PEER",
        &["listener.max_connections_per_peer"],
    ),
    ("BERTH_CONN_IDLE_TIMEOUT_S", &["listener.idle_timeout_s"]),
    ("BERTH_MAX_UPGRADES", &["listener.max_upgrades"]),
    ("BERTH_EVENT_MAX_BYTES", &["events.max_bytes"]),
    ("BERTH_EVENTS_PER_SESSION", &["events.max_per_session"]),
];

/// A key's environment variable: `BERTH_` and its path in capitals, `.` as `_`.
pub fn env_name(key: &str) -> String {
    format!("BERTH_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Every key of the config, as dotted paths (`listen`, `listener.idle_timeout_s`), read off
/// the defaults: a struct is a section, anything else (maps and lists included) one key.
pub fn keys() -> Vec<String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&path, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut out = Vec::new();
    walk(
        "",
        &serde_json::to_value(Config::default()).unwrap_or_default(),
        &mut out,
    );
    out.sort();
    out
}

/// The value an environment variable gives `key`. Scalars stay strings (extraction reads
/// them as the key's type); `egress.overrides` is `name=addr:port,…`, `node_labels`
/// `key=value,…`, `egress.ca_files` comma-separated paths, other lists and tables figment's
/// inline syntax
/// (`[{model = "x", input = 1, output = 2}]`).
fn env_value(key: &str, name: &str, raw: &str) -> Result<Value, String> {
    Ok(match key {
        "egress.overrides" => {
            let mut d = Dict::new();
            for pair in raw.split(',').filter(|p| !p.is_empty()) {
                let (host, addr) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("{name}: {pair:?} is not name=addr:port"))?;
                d.insert(host.to_string(), Value::from(addr.to_string()));
            }
            Value::from(d)
        }
        "node_labels" => {
            let mut d = Dict::new();
            for pair in raw.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("{name}: {pair:?} is not key=value"))?;
                d.insert(k.trim().to_string(), Value::from(v.trim().to_string()));
            }
            Value::from(d)
        }
        "egress.ca_files" => Value::from(
            raw.split(',')
                .filter(|p| !p.is_empty())
                .map(|p| Value::from(p.to_string()))
                .collect::<Vec<_>>(),
        ),
        "cost.prices" | "pools" => raw.parse::<Value>().map_err(|e| format!("{name}: {e}"))?,
        _ => Value::from(raw.to_string()),
    })
}

/// Insert `value` at the dotted `key` of `dict`.
fn insert(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_string(), value);
        }
        Some((section, rest)) => {
            let entry = dict
                .entry(section.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, sub) = entry {
                insert(sub, rest, value);
            }
        }
    }
}

/// The environment as a figment provider: the canonical names, or (`legacy`) the older ones.
/// Empty variables count as unset.
struct Environment {
    legacy: bool,
}

impl Environment {
    /// (variable, keys it sets) for this provider.
    fn names(&self) -> Vec<(String, Vec<String>)> {
        if self.legacy {
            LEGACY_ENV
                .iter()
                .map(|(n, ks)| (n.to_string(), ks.iter().map(|k| k.to_string()).collect()))
                .collect()
        } else {
            keys()
                .into_iter()
                .map(|k| (env_name(&k), vec![k]))
                .collect()
        }
    }
}

impl Provider for Environment {
    fn metadata(&self) -> Metadata {
        let legacy = self.legacy;
        Metadata::named(if legacy {
            "environment variable (older name)"
        } else {
            "environment variable"
        })
        // An error names the key and the variable it came from.
        .interpolater(move |_profile, path| {
            let key = path.join(".");
            let name = if legacy {
                LEGACY_ENV
                    .iter()
                    .find(|(_, ks)| ks.contains(&key.as_str()))
                    .map(|(n, _)| n.to_string())
                    .unwrap_or_default()
            } else {
                env_name(&key)
            };
            format!("{key} ({name})")
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (name, keys) in self.names() {
            let Some(raw) = std::env::var(&name).ok().filter(|v| !v.is_empty()) else {
                continue;
            };
            for key in keys {
                let value = env_value(&key, &name, &raw).map_err(figment::Error::from)?;
                insert(&mut dict, &key, value);
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

impl Config {
    /// Defaults, overridden by the TOML file (if given), then by the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Ok(Self::figment(file)?.extract_lossy()?)
    }

    /// The layers [`Config::load`] extracts: the file, the older environment names (lists
    /// they give are added to the file's), then the canonical ones.
    pub fn figment(file: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut fig = Figment::new();
        if let Some(p) = file {
            // A named file that cannot be read is an error, not an empty layer.
            std::fs::File::open(p).map_err(|e| ConfigError::Read(p.to_path_buf(), e))?;
            fig = fig.merge(Toml::file_exact(p));
        }
        Ok(fig
            .admerge(Environment { legacy: true })
            .merge(Environment { legacy: false }))
    }
}
