//! Triggers: sessions started without a client, by an inbound webhook or a cron schedule (the
//! proactive-agent pattern: an e-mail arrives, a report is due).
//!
//! A webhook is `POST /v1/hooks/{id}` with no API key: the call is authenticated by an
//! HMAC-SHA256 signature with the trigger's secret over `<timestamp>.<body>`
//! (`X-Berth-Timestamp: <unix seconds>`, `X-Berth-Signature-256: sha256=<hex>`), accepted once
//! and only within [`HOOK_WINDOW_S`] of the server's clock; or the secret itself as a bearer
//! token for senders that cannot sign. One scheduler task fires
//! due schedules; it re-reads the triggers whenever one is created or deleted. A firing that
//! fails (the box is gone, the tenant is over quota) is recorded in the trigger's
//! `last_error`; a webhook caller also gets the error.

use super::Engine;
use crate::auth::{new_id, now};
use crate::engine::error::EngineError;
use berth_api::{
    BoxRef, BoxState, HookAccepted, SessionObject, SessionSpec, TriggerObject, TriggerSpec,
};
use hmac::{Hmac, Mac};
use serde_json::Value;
use std::sync::Arc;

/// Header carrying the signature of `<timestamp>.<body>`.
pub const SIGNATURE_HEADER: &str = "x-berth-signature-256";
/// Header carrying the signed call's time, unix seconds.
pub const TIMESTAMP_HEADER: &str = "x-berth-timestamp";
/// How far a signed call's timestamp may be from the server's clock, seconds.
pub const HOOK_WINDOW_S: i64 = 300;

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

/// How a webhook call proved it knows the trigger's secret.
#[derive(Debug, PartialEq, Eq)]
pub enum HookAuth {
    /// A signature over the timestamp and body: accepted once (replays are refused).
    Signed { mac: String, timestamp: i64 },
    /// The secret itself as a bearer token (for senders that cannot sign; no replay defence
    /// beyond the rate limit).
    Bearer,
}

/// Why a webhook call was refused (the message is the client's).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HookRefusal {
    #[error("missing or invalid webhook signature")]
    BadSignature,
    #[error("a signed webhook needs an X-Berth-Timestamp header (unix seconds)")]
    NoTimestamp,
    #[error("the webhook's timestamp is outside the {HOOK_WINDOW_S} s window")]
    Stale,
    #[error("this signed webhook was already accepted (a replay)")]
    Replay,
}

/// The signature covers `<timestamp>.<body>`: a captured call cannot be sent again later
/// (the window) nor again now (the seen-signature cache, see [`Engine::hook`]).
pub fn signed_payload(timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(timestamp.len() + 1 + body.len());
    m.extend_from_slice(timestamp.as_bytes());
    m.push(b'.');
    m.extend_from_slice(body);
    m
}

/// Whether a webhook call carries a valid, fresh signature of `timestamp.body` (or the secret
/// as a bearer token); `now` is unix seconds.
pub fn authentic(
    secret: &str,
    body: &[u8],
    signature: Option<&str>,
    timestamp: Option<&str>,
    bearer: Option<&str>,
    now: i64,
) -> Result<HookAuth, HookRefusal> {
    if let Some(sig) = signature {
        let Some(hex_sig) = sig.trim().strip_prefix("sha256=") else {
            return Err(HookRefusal::BadSignature);
        };
        let Ok(sig) = hex::decode(hex_sig) else {
            return Err(HookRefusal::BadSignature);
        };
        let ts_text = timestamp.map(str::trim).ok_or(HookRefusal::NoTimestamp)?;
        let ts: i64 = ts_text.parse().map_err(|_| HookRefusal::NoTimestamp)?;
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
            return Err(HookRefusal::BadSignature);
        };
        mac.update(&signed_payload(ts_text, body));
        mac.verify_slice(&sig)
            .map_err(|_| HookRefusal::BadSignature)?;
        // Checked after the signature so an unsigned caller learns nothing about the clock.
        if (now - ts).abs() > HOOK_WINDOW_S {
            return Err(HookRefusal::Stale);
        }
        return Ok(HookAuth::Signed {
            mac: hex::encode(sig),
            timestamp: ts,
        });
    }
    if bearer.is_some_and(|t| berth_api::secret::secret_eq(t.trim().as_bytes(), secret.as_bytes()))
    {
        return Ok(HookAuth::Bearer);
    }
    Err(HookRefusal::BadSignature)
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
    ) -> Result<TriggerObject, EngineError> {
        if spec.prompt.trim().is_empty() {
            return Err(EngineError::Invalid("prompt must not be empty".into()));
        }
        if let Some(s) = &spec.schedule {
            parse_schedule(s).map_err(EngineError::Invalid)?;
        }
        if spec.schedule.is_none() && !spec.webhook {
            return Err(EngineError::Invalid(
                "a trigger needs a schedule, a webhook, or both".into(),
            ));
        }
        let unknown = spec.agent.unknown_fields();
        if !unknown.is_empty() {
            return Err(EngineError::Invalid(format!(
                "unknown field(s) in agent: {}",
                unknown.join(", ")
            )));
        }
        match &spec.box_ref {
            BoxRef::Id(id) => {
                let b = self.get_box(tenant, id).await?;
                if matches!(b.state, BoxState::Destroyed | BoxState::Failed) {
                    return Err(EngineError::Conflict(format!(
                        "box {id} is {}",
                        b.state.as_str()
                    )));
                }
            }
            BoxRef::Spec(b) => {
                // The trigger is stored and listed whole: secret values must not be in it.
                if !b.secrets.is_empty() {
                    return Err(EngineError::Invalid(
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

    pub async fn list_triggers(&self, tenant: &str) -> Result<Vec<TriggerObject>, EngineError> {
        Ok(self.store.list_triggers(Some(tenant)).await?)
    }

    pub async fn get_trigger(&self, tenant: &str, id: &str) -> Result<TriggerObject, EngineError> {
        self.store
            .get_trigger(Some(tenant), id)
            .await?
            .map(|(t, _)| t)
            .ok_or_else(|| EngineError::not_found("trigger", id))
    }

    /// Any tenant's trigger (node-to-node calls name it by id only).
    pub(crate) async fn trigger_by_id(&self, id: &str) -> Result<TriggerObject, EngineError> {
        self.store
            .get_trigger(None, id)
            .await?
            .map(|(t, _)| t)
            .ok_or_else(|| EngineError::not_found("trigger", id))
    }

    pub async fn delete_trigger(&self, tenant: &str, id: &str) -> Result<(), EngineError> {
        if !self.store.delete_trigger(Some(tenant), id).await? {
            return Err(EngineError::not_found("trigger", id));
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
    ) -> Result<SessionObject, EngineError> {
        // A trigger making its own box places it as `POST /v1/boxes` would: on another node,
        // that node starts the session (a signed node-to-node call).
        // The placement is held until the session (and its box) is made: in flight till then.
        let r = match self.place_trigger(t).await {
            Ok(placed) => match placed.url.as_deref() {
                None => self.fire_trigger_here(t, payload).await,
                Some(url) => self.fire_trigger_on(url, t, payload).await,
            },
            Err(e) => Err(e),
        };
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

    /// Start trigger `t`'s session on this node (the firing is recorded by the node that
    /// fired it).
    pub(crate) async fn fire_trigger_here(
        self: &Arc<Self>,
        t: &TriggerObject,
        payload: &Value,
    ) -> Result<SessionObject, EngineError> {
        let spec = SessionSpec {
            box_ref: t.box_ref.clone(),
            agent: t.agent.clone(),
            pool: None,
            workdir: t.workdir.clone(),
            prompt: Some(render(&t.prompt, payload)),
            keep_open: false,
        };
        self.create_session(&t.tenant, spec).await
    }

    /// Count a webhook call against its trigger's rate; 429 past the limit. (A GCRA: a
    /// trigger takes `hook_rate_per_minute` calls at once, then one more each
    /// minute/`hook_rate_per_minute`; no span of a minute ever takes more than twice the rate,
    /// as with the fixed minute windows it replaces, and a shorter span takes fewer.)
    fn take_hook_call(&self, trigger_id: &str) -> Result<(), EngineError> {
        let admitted = self.hook_rate.as_ref().is_some_and(|r| {
            // Forget triggers whose state is back to full so the map stays as small as the
            // active set.
            r.retain_recent();
            r.check_key(&trigger_id.to_string()).is_ok()
        });
        if !admitted {
            return Err(EngineError::Quota(format!(
                "trigger {trigger_id} takes {} webhook calls a minute",
                self.config.hook_rate_per_minute
            )));
        }
        Ok(())
    }

    /// Refuse a signed call seen before; otherwise count it against the trigger's rate and
    /// remember it until its timestamp leaves the window. A call refused for the rate is not
    /// remembered, so its sender may retry it. The cache holds at most the accepted calls of
    /// one window (older ones are pruned here), which the rate limit bounds.
    fn first_sighting(
        &self,
        trigger_id: &str,
        mac: String,
        timestamp: i64,
        now: i64,
    ) -> Result<(), EngineError> {
        let mut seen = self
            .hook_seen
            .lock()
            .map_err(|_| EngineError::Internal("hook cache poisoned".into()))?;
        seen.retain(|_, forget_at| *forget_at >= now);
        let key = format!("{trigger_id}:{mac}");
        if seen.contains_key(&key) {
            metrics::counter!("berth_webhook_replays_refused_total").increment(1);
            return Err(EngineError::Unauthenticated(
                HookRefusal::Replay.to_string(),
            ));
        }
        // Under the cache's lock: two copies of one call arriving together pass one at a time.
        self.take_hook_call(trigger_id)?;
        seen.insert(key, timestamp + HOOK_WINDOW_S);
        Ok(())
    }

    /// Whether `id` names a webhook trigger (checked before its caller's body is read).
    pub async fn hook_target(&self, id: &str) -> Result<(), EngineError> {
        match self.store.get_trigger(None, id).await? {
            Some((t, _)) if t.webhook_path.is_some() => Ok(()),
            _ => Err(EngineError::not_found("trigger", id)),
        }
    }

    /// An inbound webhook: authenticate, then fire.
    pub async fn hook(
        self: &Arc<Self>,
        id: &str,
        body: &[u8],
        signature: Option<&str>,
        timestamp: Option<&str>,
        bearer: Option<&str>,
    ) -> Result<HookAccepted, EngineError> {
        let Some((t, secret)) = self.store.get_trigger(None, id).await? else {
            return Err(EngineError::not_found("trigger", id));
        };
        if t.webhook_path.is_none() {
            return Err(EngineError::not_found("trigger", id));
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let auth = authentic(&secret, body, signature, timestamp, bearer, now)
            .map_err(|r| EngineError::Unauthenticated(r.to_string()))?;
        match auth {
            HookAuth::Signed { mac, timestamp } => {
                self.first_sighting(&t.id, mac.clone(), timestamp, now)?;
                // Another node may have taken the same call: the store decides (a cluster).
                self.claim_hook_call(&t, &mac).await?
            }
            HookAuth::Bearer => self.take_hook_call(&t.id)?,
        }
        let s = self.fire_trigger(&t, &payload_of(body)).await?;
        Ok(HookAccepted {
            trigger_id: t.id,
            session_id: s.id,
        })
    }
}

/// Fire scheduled triggers when due, for the life of the server.
pub async fn scheduler(engine: Arc<Engine>) {
    let deps = SchedulerDeps {
        store: engine.store.clone(),
        changed: engine.triggers_changed.clone(),
        clock: engine.config.clock.clone(),
        engine: Arc::downgrade(&engine),
    };
    drop(engine);
    run_scheduler(deps).await;
}

/// What the cron scheduler uses: the triggers in the store, the wake-up when they change, the
/// engine's clock (tests move it with tokio's paused time), and the engine, weakly, to fire a
/// due trigger (a session create: a façade call).
pub struct SchedulerDeps {
    pub store: Arc<dyn berth_store::Store>,
    pub changed: Arc<tokio::sync::Notify>,
    pub clock: crate::clock::Clock,
    pub engine: std::sync::Weak<Engine>,
}

/// How far back the cron scheduler still fires an instant it has not fired (see the loop).
const CATCH_UP: chrono::Duration = chrono::Duration::seconds(1);

async fn run_scheduler(deps: SchedulerDeps) {
    use chrono::Utc;
    let clock = deps.clock.clone();
    let wall =
        move || chrono::DateTime::<Utc>::from_timestamp_millis(clock.now_ms()).unwrap_or_default();
    // The instant fired last: the search for the next ones starts after it.
    let mut last_fired: Option<chrono::DateTime<Utc>> = None;
    loop {
        let triggers = match deps.store.list_triggers(None).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "listing triggers");
                Vec::new()
            }
        };
        let start = wall();
        // Instants up to `CATCH_UP` old still count: a rescan (or a change) that wakes at or
        // just after a due instant, before this loop fired it, must not skip it. Never one
        // fired already (`last_fired`); across nodes the store's claim keeps it once.
        let mut from = start - CATCH_UP;
        if let Some(f) = last_fired {
            from = from.max(f + chrono::Duration::milliseconds(1));
        }
        let mut due: Vec<(chrono::DateTime<Utc>, TriggerObject)> = triggers
            .into_iter()
            .filter_map(|t| {
                let cron = parse_schedule(t.schedule.as_deref()?).ok()?;
                let next = cron.find_next_occurrence(&from, true).ok()?;
                Some((next, t))
            })
            .collect();
        due.sort_by_key(|(at, _)| *at);
        let wait = due
            .first()
            .map(|(at, _)| (*at - start).to_std().unwrap_or(std::time::Duration::ZERO));
        tokio::select! {
            // A due instant wins over a rescan that is ready at the same time.
            biased;
            _ = super::sleep_until_opt(wait.map(|w| tokio::time::Instant::now() + w)) => {}
            _ = deps.changed.notified() => continue,
            // Triggers made through another node (a shared store) are seen at the next rescan.
            _ = tokio::time::sleep(super::nodes::TRIGGER_RESCAN) => continue,
        }
        let Some(first) = due.first().map(|(at, _)| *at) else {
            continue;
        };
        // The engine is gone: the server is shutting down.
        let Some(engine) = deps.engine.upgrade() else {
            return;
        };
        for (_, t) in due.into_iter().take_while(|(at, _)| *at == first) {
            // Every node runs this scheduler: the store's compare-and-set picks one firing.
            if !engine.claim_cron_fire(&t, first.timestamp_millis()).await {
                continue;
            }
            let engine = engine.clone();
            let payload = serde_json::json!({"scheduled_at": first.to_rfc3339()});
            tokio::spawn(async move {
                if let Err(e) = engine.fire_trigger(&t, &payload).await {
                    tracing::warn!(trigger_id = %t.id, error = %e, "scheduled trigger failed");
                }
            });
        }
        drop(engine);
        last_fired = Some(first);
        // Past the fired instant before computing the next ones.
        let wake = (first - wall()).to_std().unwrap_or_default();
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

    fn sign(secret: &[u8], ts: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("key");
        mac.update(&signed_payload(ts, body));
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn signatures_cover_the_timestamp_and_bearer_tokens() {
        let body = b"{\"a\":1}";
        let now = 1_700_000_000;
        let ts = now.to_string();
        let good = sign(b"s3cret", &ts, body);
        let check = |body: &[u8], sig: Option<&str>, ts: Option<&str>, bearer: Option<&str>| {
            authentic("s3cret", body, sig, ts, bearer, now)
        };
        assert!(matches!(
            check(body, Some(&good), Some(&ts), None),
            Ok(HookAuth::Signed { timestamp, .. }) if timestamp == now
        ));
        assert_eq!(
            check(b"{\"a\":2}", Some(&good), Some(&ts), None),
            Err(HookRefusal::BadSignature)
        );
        // The same signature under another timestamp does not verify.
        let later = (now + 1).to_string();
        assert_eq!(
            check(body, Some(&good), Some(&later), None),
            Err(HookRefusal::BadSignature)
        );
        assert_eq!(
            check(body, Some(&good), None, None),
            Err(HookRefusal::NoTimestamp)
        );
        let old = (now - HOOK_WINDOW_S - 1).to_string();
        assert_eq!(
            check(body, Some(&sign(b"s3cret", &old, body)), Some(&old), None),
            Err(HookRefusal::Stale)
        );
        let edge = (now - HOOK_WINDOW_S).to_string();
        assert!(check(body, Some(&sign(b"s3cret", &edge, body)), Some(&edge), None).is_ok());
        assert_eq!(
            authentic("other", body, Some(&good), Some(&ts), None, now),
            Err(HookRefusal::BadSignature)
        );
        assert_eq!(
            check(body, Some("sha256=zz"), Some(&ts), None),
            Err(HookRefusal::BadSignature)
        );
        assert_eq!(
            check(body, None, None, Some("s3cret")),
            Ok(HookAuth::Bearer)
        );
        assert_eq!(
            check(body, None, None, Some("s3cre")),
            Err(HookRefusal::BadSignature)
        );
        assert_eq!(
            check(body, None, None, None),
            Err(HookRefusal::BadSignature)
        );
    }

    #[test]
    fn schedules_parse_with_or_without_seconds() {
        assert!(parse_schedule("*/5 * * * *").is_ok());
        assert!(parse_schedule("*/2 * * * * *").is_ok());
        assert!(parse_schedule("every day").is_err());
    }
}
