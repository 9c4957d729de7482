//! Triggers: sessions started without a client, by an inbound webhook or a cron schedule (the
//! proactive-agent pattern: an e-mail arrives, a report is due).
//!
//! A webhook is `POST /v1/hooks/{id}` with no API key: the body is authenticated by an
//! HMAC-SHA256 signature with the trigger's secret (`X-Berth-Signature-256: sha256=<hex>`), or
//! the secret itself as a bearer token for senders that cannot sign. One scheduler task fires
//! due schedules; it re-reads the triggers whenever one is created or deleted. A firing that
//! fails (the box is gone, the tenant is over quota) is recorded in the trigger's
//! `last_error`; a webhook caller also gets the error.

use super::Engine;
use crate::auth::{new_id, now};
use crate::error::ApiError;
use berth_api::{
    BoxRef, BoxState, HookAccepted, SessionObject, SessionSpec, TriggerObject, TriggerSpec,
};
use hmac::{Hmac, Mac};
use serde_json::Value;
use std::sync::Arc;

/// Header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "x-berth-signature-256";

/// Cron patterns: 5 fields, or 6 with seconds first.
pub fn parse_schedule(s: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(s)
        .map_err(|e| format!("schedule {s:?}: {e}"))
}

/// The field at a dotted path of the payload (`a.b.0.c`).
fn lookup<'a>(payload: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(payload, |v, key| match v {
        Value::Object(m) => m.get(key),
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// Fill `{{path}}` placeholders from the payload (see [`TriggerSpec::prompt`]).
pub fn render(template: &str, payload: &Value) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let key = after[..end].trim();
        let value = if key == "payload" {
            Some(payload)
        } else {
            lookup(payload, key)
        };
        match value {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => {}
            Some(v) => out.push_str(&v.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a webhook call carries a valid signature of `body` (or the secret as a bearer token).
pub fn authentic(secret: &str, body: &[u8], signature: Option<&str>, bearer: Option<&str>) -> bool {
    if let Some(sig) = signature {
        let Some(hex_sig) = sig.trim().strip_prefix("sha256=") else {
            return false;
        };
        let Ok(sig) = hex::decode(hex_sig) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
            return false;
        };
        mac.update(body);
        return mac.verify_slice(&sig).is_ok();
    }
    bearer.is_some_and(|t| constant_time_eq(t.trim().as_bytes(), secret.as_bytes()))
}

/// The payload a webhook body stands for: its JSON, `{"body": text}` for anything else, `{}`
/// when empty.
pub fn payload_of(body: &[u8]) -> Value {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Value::Object(Default::default());
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::json!({"body": String::from_utf8_lossy(body)}))
}

impl Engine {
    pub async fn create_trigger(
        self: &Arc<Self>,
        tenant: &str,
        spec: TriggerSpec,
    ) -> Result<TriggerObject, ApiError> {
        if spec.prompt.trim().is_empty() {
            return Err(ApiError::Invalid("prompt must not be empty".into()));
        }
        if let Some(s) = &spec.schedule {
            parse_schedule(s).map_err(ApiError::Invalid)?;
        }
        if spec.schedule.is_none() && !spec.webhook {
            return Err(ApiError::Invalid(
                "a trigger needs a schedule, a webhook, or both".into(),
            ));
        }
        let unknown = spec.agent.unknown_fields();
        if !unknown.is_empty() {
            return Err(ApiError::Invalid(format!(
                "unknown field(s) in agent: {}",
                unknown.join(", ")
            )));
        }
        match &spec.box_ref {
            BoxRef::Id(id) => {
                let b = self.get_box(tenant, id).await?;
                if matches!(b.state, BoxState::Destroyed | BoxState::Failed) {
                    return Err(ApiError::Conflict(format!(
                        "box {id} is {}",
                        b.state.as_str()
                    )));
                }
            }
            BoxRef::Spec(b) => {
                // The trigger is stored and listed whole: secret values must not be in it.
                if !b.secrets.is_empty() {
                    return Err(ApiError::Invalid(
                        "a trigger's box spec cannot hold secrets; create the box (with its secrets) and give its id".into(),
                    ));
                }
                super::boxes::validate_spec(b)?
            }
        }
        let id = new_id("trg");
        let secret = {
            use rand::RngCore;
            let mut b = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut b);
            format!("whsec_{}", hex::encode(b))
        };
        let mut t = TriggerObject {
            webhook_path: spec.webhook.then(|| format!("/v1/hooks/{id}")),
            id,
            tenant: tenant.to_string(),
            box_ref: spec.box_ref,
            agent: spec.agent,
            prompt: spec.prompt,
            schedule: spec.schedule,
            workdir: spec.workdir,
            secret: None,
            fired: 0,
            last_fired_at: None,
            last_session_id: None,
            last_error: None,
            created_at: now(),
        };
        self.store.put_trigger(&t, &secret).await?;
        self.triggers_changed.notify_one();
        t.secret = Some(secret);
        Ok(t)
    }

    pub async fn list_triggers(&self, tenant: &str) -> Result<Vec<TriggerObject>, ApiError> {
        Ok(self.store.list_triggers(Some(tenant)).await?)
    }

    pub async fn get_trigger(&self, tenant: &str, id: &str) -> Result<TriggerObject, ApiError> {
        self.store
            .get_trigger(Some(tenant), id)
            .await?
            .map(|(t, _)| t)
            .ok_or_else(|| ApiError::not_found("trigger", id))
    }

    pub async fn delete_trigger(&self, tenant: &str, id: &str) -> Result<(), ApiError> {
        if !self.store.delete_trigger(Some(tenant), id).await? {
            return Err(ApiError::not_found("trigger", id));
        }
        self.triggers_changed.notify_one();
        Ok(())
    }

    /// Start the trigger's session with its prompt filled from `payload`; the outcome is
    /// recorded on the trigger.
    pub async fn fire_trigger(
        self: &Arc<Self>,
        t: &TriggerObject,
        payload: &Value,
    ) -> Result<SessionObject, ApiError> {
        let spec = SessionSpec {
            box_ref: t.box_ref.clone(),
            agent: t.agent.clone(),
            workdir: t.workdir.clone(),
            prompt: Some(render(&t.prompt, payload)),
            keep_open: false,
        };
        let r = self.create_session(&t.tenant, spec).await;
        // Re-read: the trigger may have fired concurrently (or been deleted meanwhile).
        if let Ok(Some((mut cur, _))) = self.store.get_trigger(None, &t.id).await {
            cur.fired += 1;
            cur.last_fired_at = Some(now());
            match &r {
                Ok(s) => {
                    cur.last_session_id = Some(s.id.clone());
                    cur.last_error = None;
                }
                Err(e) => cur.last_error = Some(e.to_string()),
            }
            if let Err(e) = self.store.update_trigger(&cur).await {
                tracing::warn!(trigger_id = %t.id, error = %e, "recording a firing");
            }
        }
        metrics::counter!("berth_trigger_firings_total", "ok" => if r.is_ok() { "true" } else { "false" })
            .increment(1);
        r
    }

    /// Count a webhook call against its trigger's minute; 429 past the limit.
    fn take_hook_call(&self, trigger_id: &str) -> Result<(), ApiError> {
        let now = tokio::time::Instant::now();
        let mut windows = self
            .hook_windows
            .lock()
            .map_err(|_| ApiError::Internal("hook windows poisoned".into()))?;
        // Forget idle triggers' windows so the map stays as small as the active set.
        windows.retain(|_, (start, _)| {
            now.duration_since(*start) < std::time::Duration::from_secs(60)
        });
        let (_, taken) = windows.entry(trigger_id.to_string()).or_insert((now, 0));
        if *taken >= self.config.hook_rate_per_minute {
            return Err(ApiError::Rejected(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "trigger {trigger_id} takes {} webhook calls a minute",
                    self.config.hook_rate_per_minute
                ),
            ));
        }
        *taken += 1;
        Ok(())
    }

    /// An inbound webhook: authenticate, then fire.
    pub async fn hook(
        self: &Arc<Self>,
        id: &str,
        body: &[u8],
        signature: Option<&str>,
        bearer: Option<&str>,
    ) -> Result<HookAccepted, ApiError> {
        let Some((t, secret)) = self.store.get_trigger(None, id).await? else {
            return Err(ApiError::not_found("trigger", id));
        };
        if t.webhook_path.is_none() {
            return Err(ApiError::not_found("trigger", id));
        }
        if !authentic(&secret, body, signature, bearer) {
            return Err(ApiError::Unauthorized);
        }
        self.take_hook_call(&t.id)?;
        let s = self.fire_trigger(&t, &payload_of(body)).await?;
        Ok(HookAccepted {
            trigger_id: t.id,
            session_id: s.id,
        })
    }
}

/// Fire scheduled triggers when due, for the life of the server.
pub async fn scheduler(engine: Arc<Engine>) {
    use chrono::Utc;
    loop {
        let triggers = match engine.store.list_triggers(None).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "listing triggers");
                Vec::new()
            }
        };
        let start = Utc::now();
        let mut due: Vec<(chrono::DateTime<Utc>, TriggerObject)> = triggers
            .into_iter()
            .filter_map(|t| {
                let cron = parse_schedule(t.schedule.as_deref()?).ok()?;
                let next = cron.find_next_occurrence(&start, false).ok()?;
                Some((next, t))
            })
            .collect();
        due.sort_by_key(|(at, _)| *at);
        let wait = due
            .first()
            .map(|(at, _)| (*at - start).to_std().unwrap_or(std::time::Duration::ZERO));
        tokio::select! {
            _ = engine.triggers_changed.notified() => continue,
            _ = super::sleep_until_opt(wait.map(|w| tokio::time::Instant::now() + w)) => {}
        }
        let Some(first) = due.first().map(|(at, _)| *at) else {
            continue;
        };
        for (_, t) in due.into_iter().take_while(|(at, _)| *at == first) {
            let engine = engine.clone();
            let payload = serde_json::json!({"scheduled_at": first.to_rfc3339()});
            tokio::spawn(async move {
                if let Err(e) = engine.fire_trigger(&t, &payload).await {
                    tracing::warn!(trigger_id = %t.id, error = %e, "scheduled trigger failed");
                }
            });
        }
        // Past the fired instant before computing the next ones.
        let wake = (first - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wake + std::time::Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_fill_fields_and_leave_missing_ones_empty() {
        let p = json!({"from": "ann@example.com", "n": 3, "to": ["a", "b"], "meta": {"x": true}});
        assert_eq!(
            render(
                "From {{from}} ({{ n }}), {{to.1}} {{meta.x}} [{{nope}}] {{meta}}",
                &p
            ),
            "From ann@example.com (3), b true [] {\"x\":true}"
        );
        assert_eq!(render("unclosed {{from", &p), "unclosed {{from");
        assert_eq!(render("{{payload}}", &json!({"a": 1})), "{\"a\":1}");
    }

    #[test]
    fn signatures_and_bearer_tokens() {
        let body = b"{\"a\":1}";
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").expect("key");
        mac.update(body);
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert!(authentic("s3cret", body, Some(&good), None));
        assert!(!authentic("s3cret", b"{\"a\":2}", Some(&good), None));
        assert!(!authentic("other", body, Some(&good), None));
        assert!(!authentic("s3cret", body, Some("sha256=zz"), None));
        assert!(authentic("s3cret", body, None, Some("s3cret")));
        assert!(!authentic("s3cret", body, None, Some("s3cre")));
        assert!(!authentic("s3cret", body, None, None));
    }

    #[test]
    fn schedules_parse_with_or_without_seconds() {
        assert!(parse_schedule("*/5 * * * *").is_ok());
        assert!(parse_schedule("*/2 * * * * *").is_ok());
        assert!(parse_schedule("every day").is_err());
    }
}
