//! What a box spec may hold (checked before anything is made), and the environment and
//! limits a box is made with.

use crate::engine::error::EngineError;
use berth_api::{BoxObject, BoxSpec, Lifecycle};
use berth_sandbox::Limits;

/// Labels under this prefix are the server's own (`berth.pool` marks a warm pool's box, which
/// the start-up sweep may destroy): a client's spec cannot set them.
pub const RESERVED_LABEL_PREFIX: &str = "berth.";

pub fn validate_spec(spec: &BoxSpec) -> Result<(), EngineError> {
    if let Some(k) = spec
        .labels
        .keys()
        .find(|k| k.starts_with(RESERVED_LABEL_PREFIX))
    {
        return Err(EngineError::Invalid(format!(
            "label {k:?} is reserved: labels starting with {RESERVED_LABEL_PREFIX:?} are set by the server only"
        )));
    }
    limits(spec)
        .validate()
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(EngineError::Invalid(format!(
                "invalid environment variable name {k:?}"
            )));
        }
    }
    for p in &spec.network.allow {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.trim_start_matches("*.")
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            return Err(EngineError::Invalid(format!(
                "invalid network.allow pattern {p:?}"
            )));
        }
    }
    if spec.shared && (spec.lifecycle == Some(Lifecycle::Hybrid) || spec.keep_workspace) {
        // Parking archives the box as its operator uid, which cannot read the sessions'
        // private directories.
        return Err(EngineError::Invalid(
            "a shared box can be neither hybrid nor keep_workspace (its archive could not read the sessions' directories)".into(),
        ));
    }
    if spec.idle_timeout_s == Some(Some(0)) || spec.max_lifetime_s == Some(0) {
        return Err(EngineError::Invalid(
            "timeouts must be at least 1 second".into(),
        ));
    }
    for sec in &spec.secrets {
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        if !token(&sec.header) {
            return Err(EngineError::Invalid(format!(
                "secret header {:?} is not a valid header name",
                sec.header
            )));
        }
        if sec
            .value
            .bytes()
            .any(|b| b == b'\r' || b == b'\n' || b == 0)
        {
            return Err(EngineError::Invalid(
                "secret values must not contain CR, LF or NUL".into(),
            ));
        }
        if !berth_gateway::egress::allowed(&spec.network.allow, &sec.host) {
            return Err(EngineError::Invalid(format!(
                "secret host {:?} is not on network.allow",
                sec.host
            )));
        }
    }
    if spec.labels.len() > 64 || spec.env.len() > 256 || spec.secrets.len() > 64 {
        return Err(EngineError::Invalid(
            "too many labels or environment variables".into(),
        ));
    }
    Ok(())
}

/// Every process in a box finds the egress proxy through the usual variables; the box's own
/// `env` comes after and may change them (the proxy stays the only way out regardless).
pub(super) fn box_env(obj: &BoxObject) -> Vec<(String, String)> {
    let proxy = format!("http://127.0.0.1:{}", crate::engine::EGRESS_PORT);
    let mut env: Vec<(String, String)> = ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
        .iter()
        .map(|k| (k.to_string(), proxy.clone()))
        .collect();
    env.push(("NO_PROXY".into(), "127.0.0.1,localhost".into()));
    env.push(("no_proxy".into(), "127.0.0.1,localhost".into()));
    env.push(("NODE_USE_ENV_PROXY".into(), "1".into()));
    env.extend(obj.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

pub(super) fn limits(spec: &BoxSpec) -> Limits {
    Limits {
        cpus: spec.resources.cpus,
        memory_mib: spec.resources.memory_mib,
        disk_mib: spec.resources.disk_mib,
        pids: spec.resources.pids,
    }
}

/// An OCI image reference: `name[:tag][@digest]` with the characters references allow.
pub(super) fn valid_image_ref(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && !r.starts_with(['-', '.', '/', ':'])
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
}
