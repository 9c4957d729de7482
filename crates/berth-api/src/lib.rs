//! The berth API's wire types, declared apart from the server that implements them.
//!
//! Everything here is plain data with serde and OpenAPI (utoipa) derives. Defaults follow the
//! contract in the brief: `resources` 1 CPU / 1024 MiB / 5120 MiB disk / 512 pids, `network.allow`
//! `["api.anthropic.com"]`, image `host`.

pub mod calendar;
mod event_kind;
pub mod secret;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

pub use event_kind::EventKind;

/// Time stamps are RFC 3339 strings in UTC.
pub type Timestamp = String;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Destroyed when its session ends.
    Ephemeral,
    /// Outlives its sessions; stopped after `idle_timeout_s` without activity.
    #[default]
    Persistent,
    /// Parked (snapshotted and destroyed) when idle, restored on next use.
    Hybrid,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Resources {
    pub cpus: f64,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub pids: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: 1.0,
            memory_mib: 1024,
            disk_mib: 5120,
            pids: 512,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSpec {
    /// Domain patterns the box may reach through the egress proxy: exact names or `*.suffix`.
    pub allow: Vec<String>,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        NetworkSpec {
            allow: vec!["api.anthropic.com".into()],
        }
    }
}

/// Body of `POST /v1/boxes`, and the `box` of a session when it creates its own box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(default, deny_unknown_fields)]
pub struct BoxSpec {
    /// Default: `persistent` for `POST /v1/boxes`, `ephemeral` for a session's own box (`"box":
    /// {}` and an omitted `box` alike).
    pub lifecycle: Option<Lifecycle>,
    /// `host` (the host's read-only root) or a backend-specific image reference.
    pub image: Option<String>,
    /// Sandbox backend; defaults to the server's default backend.
    pub backend: Option<String>,
    pub resources: Resources,
    pub network: NetworkSpec,
    pub env: BTreeMap<String, String>,
    /// Seconds without activity before the box stops (a hybrid box: parks). Absent: the
    /// server's default for the lifecycle (`[idle_timeout]` in its config, 900 s unless set);
    /// `null`: never.
    #[serde(
        default,
        deserialize_with = "present_or_null",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<u64>, minimum = 1)]
    pub idle_timeout_s: Option<Option<u64>>,
    pub max_lifetime_s: Option<u64>,
    pub labels: BTreeMap<String, String>,
    /// Several agents share the box, each as its own user: a session gets its own uid, a
    /// working directory `/workspace/sessions/<id>` only it can read or write, read-only access
    /// to `/workspace/shared` (written through the files API), and no way to signal or trace
    /// its neighbours. Agents message each other through berth (`127.0.0.1:47102` in the box).
    pub shared: bool,
    /// Archive the box's `/workspace` when it is destroyed (an ephemeral box: when its session
    /// ends), to download from `GET /v1/boxes/{id}/artifact` after the box is gone.
    pub keep_workspace: bool,
    /// Credentials the egress proxy adds to the box's requests for a host; the box never
    /// holds them. The box calls `http://host/…`; the proxy adds `header: value` and (with
    /// `tls`, the default) speaks HTTPS to the host. The host must be on `network.allow`.
    pub secrets: Vec<SecretSpec>,
    /// Where in a cluster the box may run (see [`Placement`]); absent: any node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// Where in a cluster a box may run: on the nodes whose `node_labels` carry every pair of
/// `node_selector`, spread over the values of the node label `spread_by` (the value holding
/// the fewest of this tenant's live boxes first). No matching node: 409.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Placement {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread_by: Option<String>,
}

impl Placement {
    /// Whether a node with `labels` may take the box.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    pub host: String,
    pub header: String,
    pub value: String,
    #[serde(default = "yes")]
    pub tls: bool,
}

/// A field that may be absent (outer `None`), `null` (`Some(None)`) or a value.
fn present_or_null<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

fn yes() -> bool {
    true
}

/// A box's secret as the API shows it: never the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretRef {
    pub host: String,
    pub header: String,
    pub tls: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BoxState {
    Creating,
    Running,
    Parking,
    Parked,
    Restoring,
    Stopped,
    Destroyed,
    Failed,
    /// Its node was lost (lease lapsed, see `NodeObject`); the box is gone with it.
    Lost,
}

impl BoxState {
    pub fn as_str(&self) -> &'static str {
        match self {
            BoxState::Creating => "creating",
            BoxState::Running => "running",
            BoxState::Parking => "parking",
            BoxState::Parked => "parked",
            BoxState::Restoring => "restoring",
            BoxState::Stopped => "stopped",
            BoxState::Destroyed => "destroyed",
            BoxState::Failed => "failed",
            BoxState::Lost => "lost",
        }
    }
    pub fn parse(s: &str) -> Option<BoxState> {
        Some(match s {
            "creating" => BoxState::Creating,
            "running" => BoxState::Running,
            "parking" => BoxState::Parking,
            "parked" => BoxState::Parked,
            "restoring" => BoxState::Restoring,
            "stopped" => BoxState::Stopped,
            "destroyed" => BoxState::Destroyed,
            "failed" => BoxState::Failed,
            "lost" => BoxState::Lost,
            _ => return None,
        })
    }
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            BoxState::Destroyed | BoxState::Failed | BoxState::Stopped | BoxState::Lost
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BoxObject {
    pub id: String,
    pub tenant: String,
    pub state: BoxState,
    /// Why the box is in its state (failure message, exit reason), when there is one.
    pub state_reason: Option<String>,
    pub backend: String,
    pub lifecycle: Lifecycle,
    pub image: String,
    pub resources: Resources,
    pub network: NetworkSpec,
    pub env: BTreeMap<String, String>,
    pub idle_timeout_s: Option<u64>,
    pub max_lifetime_s: Option<u64>,
    pub labels: BTreeMap<String, String>,
    /// Hosts and headers the egress proxy injects secrets for (values are never shown).
    #[serde(default)]
    pub secrets: Vec<SecretRef>,
    /// Agents share the box, each as its own user (see `BoxSpec::shared`).
    #[serde(default)]
    pub shared: bool,
    /// See `BoxSpec::keep_workspace`.
    #[serde(default)]
    pub keep_workspace: bool,
    /// The workspace archived when the box was destroyed (`keep_workspace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<SnapshotInfo>,
    /// A parked hybrid box: the snapshot it is restored from on its next use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
    /// The node that holds the box (cluster); none for a parked box any node may restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The spec's `placement`, as asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// The archive a parked hybrid box left in the object store: its `/workspace` and
/// `/home/agent` (where each session's `CLAUDE_CONFIG_DIR` lives), zstd-compressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    pub key: String,
    /// Compressed size.
    pub bytes: u64,
    pub sha256: String,
    pub taken_at: Timestamp,
    /// Sessions that were live when the box parked; they are resumed when it is restored.
    pub sessions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Working directory inside the box (default `/workspace`).
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Text fed to the process's standard input, then EOF.
    pub stdin: Option<String>,
    pub timeout_s: Option<u64>,
    /// Give the process the model, as an agent has it: `ANTHROPIC_BASE_URL` (the box's
    /// gateway) and, as `ANTHROPIC_API_KEY`, a token of its own that is valid while it runs —
    /// its requests metered to the box (session `exec-…` in usage rows), the tenant's budget
    /// applied, the real key never in the box.
    pub model: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    /// Exit code, or null when a signal ended the process.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub oom_killed: bool,
    /// Output as UTF-8 (invalid sequences replaced).
    pub stdout: String,
    pub stderr: String,
    /// Output beyond the server's limit was dropped.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BoxStats {
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids: u64,
    pub pids_limit: u64,
    pub disk_used_bytes: u64,
    pub disk_limit_bytes: u64,
    pub oom_kills: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub modified: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirListing {
    pub path: String,
    pub entries: Vec<DirEntry>,
    /// The directory has more entries than one listing returns (10 000): `entries` is an
    /// arbitrary subset of them, sorted by name. Absent from older servers: false.
    #[serde(default)]
    pub truncated: bool,
}

/// The agent a session runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
// One per session request, never in a hot collection: the size of the Claude variant is fine.
#[allow(clippy::large_enum_variant)]
pub enum AgentSpec {
    /// The Claude Code CLI driven over stream-json.
    Claude(ClaudeAgent),
    /// Any program: client messages are lines on its stdin, its output becomes events.
    Command(CommandAgent),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(default)]
pub struct ClaudeAgent {
    pub model: Option<String>,
    pub max_turns: Option<u32>,
    pub max_budget_usd: Option<f64>,
    pub system_prompt: Option<String>,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    pub permission_mode: Option<String>,
    pub mcp_servers: Option<serde_json::Value>,
    /// Answered automatically, first match wins; anything else becomes a
    /// `permission_request` event for a client to answer.
    pub permission_rules: Vec<PermissionRule>,
    /// Unanswered permission requests are denied after this long (default 300 s).
    pub permission_timeout_s: Option<u64>,
    /// A session of the Managed Agents API (which sets it): the CLI runs with
    /// `--include-partial-messages`, so the model's answer also streams as it is written, as
    /// live previews (never stored) for that API's streams that ask for `event_deltas`; and
    /// each model answer's metered usage is logged (`model_usage` events) before the CLI has
    /// read the answer's end.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub managed_agents: bool,
    /// `sdk`: the client drives the CLI itself over `GET /v1/sessions/{id}/sdk` (the Agent
    /// SDK's control protocol runs in the client's process); `args` are its CLI arguments,
    /// checked against berth's allowlist.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<ClaudeClient>,
    /// CLI arguments of an `sdk` session (refused without `client: "sdk"`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Fields this server does not know; a non-empty map is refused (see `unknown_fields`).
    #[serde(flatten, skip_serializing)]
    #[schema(ignore)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// Who drives a Claude session's CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClaudeClient {
    /// An Agent SDK app, over the session's `sdk` WebSocket.
    Sdk,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommandAgent {
    pub argv: Vec<String>,
    /// Fields this server does not know; a non-empty map is refused.
    #[serde(flatten, skip_serializing, default)]
    #[schema(ignore)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl AgentSpec {
    /// Names of fields in the agent spec this server does not understand. (The structs cannot
    /// use `deny_unknown_fields` inside an internally tagged enum without making the OpenAPI
    /// schema unsatisfiable, so the check is done here.)
    pub fn unknown_fields(&self) -> Vec<String> {
        match self {
            AgentSpec::Claude(c) => c.unknown.keys().cloned().collect(),
            AgentSpec::Command(c) => c.unknown.keys().cloned().collect(),
        }
    }
}

/// An automatic answer to tool permission requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PermissionRule {
    /// Tool name (`Bash`, `Write`, …) or `*`.
    pub tool: String,
    /// Glob (`*` matches anything) over the tool's main argument: the command for `Bash`, the
    /// path for file tools, the JSON input otherwise. Absent: any input.
    #[serde(default)]
    pub pattern: Option<String>,
    pub allow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PermissionModeRequest {
    /// `default`, `acceptEdits`, `bypassPermissions`, `plan` or `dontAsk`.
    pub mode: String,
}

/// A session's box: the id of an existing box, or the spec of a new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum BoxRef {
    Id(String),
    Spec(Box<BoxSpec>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    #[serde(rename = "box", default = "default_box_ref")]
    pub box_ref: BoxRef,
    /// Default: `{"kind": "claude"}`.
    #[serde(default = "default_agent")]
    pub agent: AgentSpec,
    /// Take a ready box of this warm pool (its agent already started); the pool's box and
    /// agent specs then govern (giving another `box` or `agent` is refused), and with none
    /// ready the session starts cold from them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Working directory inside the box (default `/workspace`).
    #[serde(default)]
    pub workdir: Option<String>,
    /// First user message.
    #[serde(default)]
    pub prompt: Option<String>,
    /// A session started with a `prompt` in an ephemeral box ends when the agent has answered
    /// it (its first `result`), and the box is destroyed with it. `true` keeps the session open
    /// for further messages (as does sending a message before that first result); the box then
    /// ends with the session, or after its `idle_timeout_s`.
    #[serde(default)]
    pub keep_open: bool,
}

fn default_agent() -> AgentSpec {
    AgentSpec::Claude(ClaudeAgent::default())
}

fn default_box_ref() -> BoxRef {
    BoxRef::Spec(Box::new(BoxSpec {
        lifecycle: Some(Lifecycle::Ephemeral),
        ..Default::default()
    }))
}

/// Body of `POST /v1/triggers`: what starts a session without a client — an inbound webhook
/// (`POST /v1/hooks/{id}`, signed with the trigger's secret) and/or a cron schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerSpec {
    /// Where each firing's session runs: an existing box's id (a persistent box, typically),
    /// or the spec of a new box per firing.
    #[serde(rename = "box", default = "default_box_ref")]
    pub box_ref: BoxRef,
    pub agent: AgentSpec,
    /// The session's first message. `{{a.b}}` is replaced by that field of the payload (text
    /// as is, other values as JSON, missing ones by nothing); `{{payload}}` by all of it. A
    /// scheduled firing's payload is `{"scheduled_at": "<RFC 3339>"}`.
    pub prompt: String,
    /// Cron schedule, UTC: 5 fields, or 6 with seconds first (e.g. `0 */15 * * * *`).
    #[serde(default)]
    pub schedule: Option<String>,
    /// Accept webhooks (default true).
    #[serde(default = "yes")]
    pub webhook: bool,
    #[serde(default)]
    pub workdir: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TriggerObject {
    pub id: String,
    pub tenant: String,
    #[serde(rename = "box")]
    pub box_ref: BoxRef,
    pub agent: AgentSpec,
    pub prompt: String,
    pub schedule: Option<String>,
    /// Path of the webhook (`POST`, no API key: signed with the secret), when enabled.
    pub webhook_path: Option<String>,
    pub workdir: Option<String>,
    /// The webhook's secret: only in the answer to the create call. Sign the raw body with it
    /// (`X-Berth-Signature-256: sha256=<hex HMAC-SHA256>`) or send it as a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub fired: u64,
    pub last_fired_at: Option<Timestamp>,
    pub last_session_id: Option<String>,
    /// Why the last firing failed, if it did.
    pub last_error: Option<String>,
    pub created_at: Timestamp,
}

/// Answer to a webhook: the session it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HookAccepted {
    pub trigger_id: String,
    pub session_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Box and agent are being started.
    Starting,
    /// The agent is working on a message.
    Running,
    /// The agent waits for the next message.
    Idle,
    /// The agent ended normally or was stopped by a client.
    Stopped,
    /// The agent could not start or crashed.
    Failed,
    /// The server restarted while the session ran; it can be resumed.
    Interrupted,
}

impl SessionState {
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionState::Starting => "starting",
            SessionState::Running => "running",
            SessionState::Idle => "idle",
            SessionState::Stopped => "stopped",
            SessionState::Failed => "failed",
            SessionState::Interrupted => "interrupted",
        }
    }
    pub fn parse(s: &str) -> Option<SessionState> {
        Some(match s {
            "starting" => SessionState::Starting,
            "running" => SessionState::Running,
            "idle" => SessionState::Idle,
            "stopped" => SessionState::Stopped,
            "failed" => SessionState::Failed,
            "interrupted" => SessionState::Interrupted,
            _ => return None,
        })
    }
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            SessionState::Stopped | SessionState::Failed | SessionState::Interrupted
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionObject {
    pub id: String,
    pub tenant: String,
    pub box_id: String,
    pub state: SessionState,
    pub state_reason: Option<String>,
    pub agent: AgentSpec,
    pub workdir: String,
    /// The CLI's own session id, once known.
    pub agent_session_id: Option<String>,
    pub cli_version: Option<String>,
    /// What the agent itself reports having spent (Claude's `total_cost_usd`, summed over its
    /// runs); the gateway's metered figure is in the session's usage.
    #[serde(default)]
    pub agent_cost_usd: Option<f64>,
    /// Sequence number of the newest event.
    pub last_seq: i64,
    /// In a shared box: the uid the session's agent runs as (its own, unlike its neighbours').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The node running the session's agent (cluster); only that node writes the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One entry of a session's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub seq: i64,
    pub session_id: String,
    pub ts: Timestamp,
    /// `status`, `assistant`, `user`, `tool_use`, `tool_result`, `permission_request`, `result`,
    /// `stdout`, `stderr`, `error`, `system`, `events_dropped`, `budget_warning`, …; an agent's
    /// other message types pass through as they came.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: EventKind,
    /// The agent's own message, whole.
    pub data: serde_json::Value,
}

/// One entry of a box's own log (`GET /v1/boxes/{id}/events`): state changes, egress
/// decisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BoxEvent {
    pub seq: i64,
    pub box_id: String,
    pub ts: Timestamp,
    /// `state`, `egress`, `egress_suppressed`, …
    #[serde(rename = "type")]
    pub kind: String,
    pub data: serde_json::Value,
}

/// One Server-Sent Events frame of `GET /v1/sessions/{id}/events`: `id` is the event's `seq`,
/// `event` its `type`, and `data` the [`Event`] encoded as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SseFrame {
    pub id: String,
    pub event: String,
    pub data: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    /// Text, or an array of content blocks.
    pub content: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PermissionAnswer {
    pub allow: bool,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub accepted: bool,
}

/// What a WebSocket client may send on `/v1/sessions/{id}/ws`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WsClientMessage {
    Message {
        content: serde_json::Value,
    },
    Interrupt,
    SetPermissionMode {
        mode: String,
    },
    Permission {
        request_id: String,
        allow: bool,
        #[serde(default)]
        message: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyCreate {
    pub tenant: String,
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyObject {
    pub id: String,
    /// The secret; only present in the response that created it.
    pub key: Option<String>,
    pub tenant: String,
    pub admin: bool,
    pub created_at: Timestamp,
}

/// Body of `PUT /v1/tenants/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantUpdate {
    /// Spending cap per calendar month (UTC), enforced by the gateway; null removes it.
    pub budget_usd_month: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TenantObject {
    pub name: String,
    pub budget_usd_month: Option<f64>,
    /// Model cost metered this calendar month.
    pub spent_usd_month: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackendInfo {
    pub name: String,
    pub default: bool,
    pub capabilities: serde_json::Value,
}

/// Tokens one session spent on one model, as metered by the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct ModelUsage {
    pub model: String,
    /// Priced with the server's table (USD).
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_5m_tokens: u64,
    pub cache_creation_1h_tokens: u64,
    pub cache_read_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionUsage {
    pub session_id: String,
    pub by_model: Vec<ModelUsage>,
    /// Model usage summed over models (`model` is `*`).
    pub total: ModelUsage,
    /// Running time of the session's box when the box is the session's alone (ephemeral);
    /// 0 for a box shared with other sessions (see `GET /v1/usage?group_by=box`).
    pub container_hours: f64,
    pub container_usd: f64,
    /// Model cost plus container cost.
    pub total_usd: f64,
    /// What the agent itself reported spending (Claude's `total_cost_usd`), when it did.
    pub agent_reported_usd: Option<f64>,
    /// The agent's figure and the gateway's differ by more than the configured fraction (and
    /// more than $0.0001): a price table out of date, or traffic the gateway did not see.
    pub cost_gap: bool,
}

/// What `GET /v1/usage` sums by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UsageGroupBy {
    Session,
    Box,
    Tenant,
    Model,
}

/// Totals of one group (or of the whole report).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct UsageTotals {
    /// Model requests metered.
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_5m_tokens: u64,
    pub cache_creation_1h_tokens: u64,
    pub cache_read_tokens: u64,
    pub model_usd: f64,
    /// Box running time within the report's window (not attributed when grouping by session
    /// or model: a box may serve several sessions and models).
    pub container_hours: f64,
    pub container_usd: f64,
    pub total_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageGroup {
    /// The session id, box id, tenant name or model id.
    pub key: String,
    pub usage: UsageTotals,
    /// The group's model usage per model.
    pub by_model: Vec<ModelUsage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageReport {
    pub group_by: UsageGroupBy,
    /// Window start (inclusive), when given.
    pub from: Option<Timestamp>,
    /// Window end (exclusive), when given.
    pub to: Option<Timestamp>,
    pub groups: Vec<UsageGroup>,
    pub total: UsageTotals,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `not_found`, `invalid_request`, `conflict`.
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_contract() {
        let spec: BoxSpec = serde_json::from_str("{}").expect("parse");
        assert_eq!(spec.resources, Resources::default());
        assert_eq!(spec.network.allow, vec!["api.anthropic.com".to_string()]);
        let s: SessionSpec =
            serde_json::from_str(r#"{"agent":{"kind":"command","argv":["cat"]}}"#).expect("parse");
        assert!(
            matches!(s.box_ref, BoxRef::Spec(ref b) if b.lifecycle == Some(Lifecycle::Ephemeral))
        );
        let s: SessionSpec =
            serde_json::from_str(r#"{"box":"b1","agent":{"kind":"claude"}}"#).expect("parse");
        assert_eq!(s.box_ref, BoxRef::Id("b1".into()));
        assert!(serde_json::from_str::<BoxSpec>(r#"{"bogus":1}"#).is_err());
        assert!(serde_json::from_str::<BoxSpec>(r#"{"resources":{"cpus":"x"}}"#).is_err());
    }

    #[test]
    fn idle_timeout_absent_null_and_set_differ() {
        let parse = |j: &str| serde_json::from_str::<BoxSpec>(j).expect("parse");
        assert_eq!(parse("{}").idle_timeout_s, None);
        assert_eq!(
            parse(r#"{"idle_timeout_s":null}"#).idle_timeout_s,
            Some(None)
        );
        assert_eq!(
            parse(r#"{"idle_timeout_s":60}"#).idle_timeout_s,
            Some(Some(60))
        );
        // And back: a stored trigger's box spec keeps the difference.
        for j in [
            "{}",
            r#"{"idle_timeout_s":null}"#,
            r#"{"idle_timeout_s":60}"#,
        ] {
            let spec = parse(j);
            let again = parse(&serde_json::to_string(&spec).expect("ser"));
            assert_eq!(again.idle_timeout_s, spec.idle_timeout_s, "{j}");
        }
        assert_eq!(parse("{}").lifecycle, None);
    }
}

/// A berth node of a cluster (servers sharing one database): `GET /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeObject {
    pub name: String,
    /// Where the other nodes reach its API.
    pub advertise_url: String,
    /// `active` (boxes are placed on it), `draining` (none are; its hybrid boxes were
    /// parked) or `lost` (its lease lapsed; its boxes were marked lost or made restorable).
    pub state: NodeState,
    /// Bumped each time the node (re)joins: a process holding an older one is superseded.
    pub incarnation: i64,
    /// Until when its lease holds (RFC 3339); past it, any node may declare it lost.
    pub lease_expires_at: Timestamp,
    /// The backends it offers.
    pub backends: Vec<String>,
    /// What it can hold.
    pub capacity: NodeCapacity,
    /// What its live boxes hold now (as of its last lease renewal).
    pub load: NodeCapacity,
    /// Why it is in its state (e.g. what declared it lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// Its `node_labels`, which box placements select and spread on.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub joined_at: Timestamp,
}

/// Resources of a node: what it can hold, or what its live boxes hold.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct NodeCapacity {
    pub cpus: f64,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub boxes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Active,
    Draining,
    Lost,
}

impl NodeState {
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Lost => "lost",
        }
    }
    pub fn parse(s: &str) -> Option<NodeState> {
        Some(match s {
            "active" => NodeState::Active,
            "draining" => NodeState::Draining,
            "lost" => NodeState::Lost,
            _ => return None,
        })
    }
}
