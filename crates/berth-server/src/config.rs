//! Server configuration: embedded defaults, then a TOML file, then environment variables, then
//! command-line flags (applied by the binary), each overriding the one before.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the API listens on.
    pub listen: SocketAddr,
    /// Where the store, snapshots and box state live.
    pub data_dir: PathBuf,
    /// Sandbox backend boxes use unless they ask for another.
    pub default_backend: String,
    /// The model API the gateway forwards to.
    pub upstream_url: String,
    /// The real model API key; stays on the server side, never enters a box.
    #[serde(skip_serializing)]
    pub anthropic_api_key: Option<String>,
    /// How the real key is sent upstream: `x-api-key` (default) or `bearer`.
    pub upstream_auth: String,
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
    pub log_format: String,
    /// Model requests per minute allowed to each session (none: unlimited).
    pub session_rpm: Option<u32>,
    /// Boxes a tenant may have alive at once (creating, running).
    pub max_boxes_per_tenant: usize,
    /// What a committed event survives: `crash` (the server dying; default, no fsync per
    /// commit) or `power` (machine power loss too; fsync per commit, slower event delivery).
    pub durability: String,
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
}

/// The largest box: unset fields default to the host's cores and memory, 100 GiB of disk
/// and 4096 processes.
#[derive(Debug, Clone, Default, Deserialize)]
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
#[derive(Debug, Clone, Default, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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

impl Config {
    /// The hardening block's environment variables (kept apart from the others').
    fn apply_hardening_env(&mut self) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(k: &'static str) -> Result<Option<T>, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            match std::env::var(k).ok().filter(|v| !v.is_empty()) {
                Some(v) => v
                    .parse()
                    .map(Some)
                    .map_err(|e| ConfigError::Env(k, format!("{e}"))),
                None => Ok(None),
            }
        }
        if let Some(v) = parse("BERTH_MAX_BOX_CPUS")? {
            self.max_box.cpus = Some(v);
        }
        if let Some(v) = parse("BERTH_MAX_BOX_MEMORY_MIB")? {
            self.max_box.memory_mib = Some(v);
        }
        if let Some(v) = parse("BERTH_MAX_BOX_DISK_MIB")? {
            self.max_box.disk_mib = Some(v);
        }
        if let Some(v) = parse("BERTH_MAX_BOX_PIDS")? {
            self.max_box.pids = Some(v);
        }
        if let Some(v) = parse("BERTH_TENANT_MAX_CPUS")? {
            self.tenant_max.cpus = Some(v);
        }
        if let Some(v) = parse("BERTH_TENANT_MAX_MEMORY_MIB")? {
            self.tenant_max.memory_mib = Some(v);
        }
        if let Some(v) = parse("BERTH_TENANT_MAX_DISK_MIB")? {
            self.tenant_max.disk_mib = Some(v);
        }
        if let Some(v) = parse("BERTH_HEADER_READ_TIMEOUT_S")? {
            self.listener.header_read_timeout_s = v;
        }
        if let Some(v) = parse("BERTH_MAX_CONNECTIONS")? {
            self.listener.max_connections = v;
        }
        if let Some(v) = parse("BERTH_MAX_CONNECTIONS_PER_PEER")? {
            self.listener.max_connections_per_peer = v;
        }
        if let Some(v) = parse("BERTH_CONN_IDLE_TIMEOUT_S")? {
            self.listener.idle_timeout_s = v;
        }
        if let Some(v) = parse("BERTH_MAX_UPGRADES")? {
            self.listener.max_upgrades = v;
        }
        if let Some(v) = parse("BERTH_EVENTS_PER_SECOND")? {
            self.events.per_second = v;
        }
        if let Some(v) = parse("BERTH_EVENTS_BURST")? {
            self.events.burst = v;
        }
        if let Some(v) = parse("BERTH_EVENT_MAX_BYTES")? {
            self.events.max_bytes = v;
        }
        if let Some(v) = parse("BERTH_EVENTS_PER_SESSION")? {
            self.events.max_per_session = v;
        }
        Ok(())
    }
}

/// Limits on each socket a box reaches (model gateway, egress proxy, box-side API), per box
/// and per socket.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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

    fn apply_env(&mut self) -> Result<(), ConfigError> {
        if let Some(v) = std::env::var("BERTH_IDLE_TIMEOUT_S")
            .ok()
            .filter(|v| !v.is_empty())
        {
            let s: u64 = v
                .parse()
                .map_err(|e| ConfigError::Env("BERTH_IDLE_TIMEOUT_S", format!("{e}")))?;
            *self = IdleTimeoutSection {
                ephemeral_s: s,
                persistent_s: s,
                hybrid_s: s,
            };
        }
        Ok(())
    }
}
// ---- end default idle timeouts ----

/// The Docker backend (boxes as containers of a local engine).
#[derive(Debug, Clone, Default, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostSection {
    /// USD per hour a box runs (parked and stopped boxes cost nothing).
    pub box_hour_usd: f64,
    /// `flat`: every box costs `box_hour_usd`; `resources`: scaled by the larger of
    /// cpus / 1 and memory_mib / 1024 (the hosting guide's reference box).
    pub box_hour_scale: String,
    /// Budget fraction at which a `budget_warning` event is sent (session and tenant).
    pub budget_warn_fraction: f64,
    /// Model prices, USD per million tokens, ahead of the built-in table; `model` matches a
    /// substring of the model id; the first match wins.
    pub prices: Vec<PriceEntry>,
    /// The agent's own `total_cost_usd` and the gateway's figure differ by more than this
    /// fraction (and more than $0.0001): the session usage flags it.
    pub gap_fraction: f64,
}

#[derive(Debug, Clone, Deserialize)]
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
            box_hour_scale: "flat".into(),
            budget_warn_fraction: 0.8,
            prices: vec![],
            gap_fraction: 0.05,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressSection {
    /// Resolver overrides for the egress proxy, `name = "addr:port"`, trusted as given
    /// (air-gapped mirrors, tests). Also `BERTH_EGRESS_OVERRIDES="name=addr:port,…"`.
    pub overrides: std::collections::BTreeMap<String, String>,
    /// Extra root certificates (PEM files) trusted for TLS the proxy originates when it injects
    /// secrets. Also `BERTH_EGRESS_CA_FILE`.
    pub ca_files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NativeSection {
    /// Formatted disk images kept ready per size.
    pub disk_pool: usize,
}

impl Default for NativeSection {
    fn default() -> Self {
        NativeSection { disk_pool: 4 }
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
            default_backend: "native".into(),
            upstream_url: "https://api.anthropic.com".into(),
            anthropic_api_key: None,
            upstream_auth: "x-api-key".into(),
            admin_key: None,
            max_body_bytes: 64 << 20,
            max_exec_output_bytes: 16 << 20,
            hook_rate_per_minute: 60,
            log_format: "text".into(),
            session_rpm: None,
            max_boxes_per_tenant: 100,
            durability: "crash".into(),
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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("{0}: {1}")]
    Env(&'static str, String),
}

impl Config {
    /// Defaults, overridden by the TOML file (if given), then by the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ConfigError::Read(p.to_path_buf(), e))?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse(p.to_path_buf(), e))?
            }
            None => Config::default(),
        };
        cfg.apply_env()?;
        cfg.idle_timeout.apply_env()?;
        Ok(cfg)
    }

    fn apply_env(&mut self) -> Result<(), ConfigError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(v) = var("BERTH_LISTEN") {
            self.listen = v
                .parse()
                .map_err(|e| ConfigError::Env("BERTH_LISTEN", format!("{e}")))?;
        }
        if let Some(v) = var("BERTH_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = var("BERTH_UPSTREAM_URL") {
            self.upstream_url = v;
        }
        if let Some(v) = var("BERTH_UPSTREAM_AUTH") {
            self.upstream_auth = v;
        }
        if let Some(v) = var("BERTH_ADMIN_KEY") {
            self.admin_key = Some(v);
        }
        if let Some(v) = var("ANTHROPIC_API_KEY") {
            self.anthropic_api_key = Some(v);
        }
        if let Some(v) = var("BERTH_LOG_FORMAT") {
            self.log_format = v;
        }
        if let Some(v) = var("BERTH_CLAUDE_BIN") {
            self.claude_cli = Some(PathBuf::from(v));
        }
        if let Some(v) = var("BERTH_SESSION_RPM") {
            self.session_rpm = Some(
                v.parse()
                    .map_err(|e| ConfigError::Env("BERTH_SESSION_RPM", format!("{e}")))?,
            );
        }
        if let Some(v) = var("BERTH_HOOK_RATE_PER_MINUTE") {
            self.hook_rate_per_minute = v
                .parse()
                .map_err(|e| ConfigError::Env("BERTH_HOOK_RATE_PER_MINUTE", format!("{e}")))?;
        }
        if let Some(v) = var("BERTH_MAX_BOXES_PER_TENANT") {
            self.max_boxes_per_tenant = v
                .parse()
                .map_err(|e| ConfigError::Env("BERTH_MAX_BOXES_PER_TENANT", format!("{e}")))?;
        }
        if let Some(v) = var("BERTH_BOX_HOUR_USD") {
            self.cost.box_hour_usd = v
                .parse()
                .map_err(|e| ConfigError::Env("BERTH_BOX_HOUR_USD", format!("{e}")))?;
        }
        if let Some(v) = var("BERTH_DOCKER") {
            self.docker.enabled = matches!(v.as_str(), "1" | "true" | "yes");
        }
        if let Some(v) = var("BERTH_GVISOR") {
            self.docker.gvisor = matches!(v.as_str(), "1" | "true" | "yes");
        }
        if let Some(v) = var("BERTH_SNAPSHOT_DIR") {
            self.snapshot_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = var("BERTH_DATABASE_URL") {
            self.database_url = Some(v);
        }
        if let Some(v) = var("BERTH_SNAPSHOT_URL") {
            self.snapshot_url = Some(v);
        }
        if let Some(v) = var("BERTH_DURABILITY") {
            self.durability = v;
        }
        if let Some(v) = var("BERTH_EGRESS_OVERRIDES") {
            for pair in v.split(',').filter(|p| !p.is_empty()) {
                let (name, addr) = pair.split_once('=').ok_or_else(|| {
                    ConfigError::Env(
                        "BERTH_EGRESS_OVERRIDES",
                        format!("{pair:?} is not name=addr:port"),
                    )
                })?;
                self.egress
                    .overrides
                    .insert(name.to_string(), addr.to_string());
            }
        }
        for (name, slot) in [
            (
                "BERTH_BOX_HEADER_TIMEOUT_SECS",
                &mut self.box_sockets.header_timeout_secs,
            ),
            (
                "BERTH_BOX_IDLE_TIMEOUT_SECS",
                &mut self.box_sockets.idle_timeout_secs,
            ),
        ] {
            if let Some(v) = var(name) {
                *slot = v
                    .parse()
                    .map_err(|e| ConfigError::Env(name, format!("{e}")))?;
            }
        }
        if let Some(v) = var("BERTH_BOX_MAX_CONNECTIONS") {
            self.box_sockets.max_connections = v
                .parse()
                .map_err(|e| ConfigError::Env("BERTH_BOX_MAX_CONNECTIONS", format!("{e}")))?;
        }
        if let Some(v) = var("BERTH_EGRESS_CA_FILE") {
            self.egress.ca_files.push(PathBuf::from(v));
        }
        if let Some(v) = var("BERTH_BACKEND") {
            self.default_backend = v;
        }
        self.apply_hardening_env()?;
        Ok(())
    }
}
