//! The usage report: model usage and container time, summed by session, box, tenant or model.

use super::{Json, Query};
use crate::auth::Caller;
use crate::clock::parse_rfc3339_ms;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::State;
use berth_api::{ErrorBody, UsageGroupBy, UsageReport};

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// `session`, `box`, `tenant` (default) or `model`.
    group_by: Option<UsageGroupBy>,
    /// Window start, RFC 3339, inclusive.
    from: Option<String>,
    /// Window end, RFC 3339, exclusive.
    to: Option<String>,
    /// Admin keys only: one tenant (default: all). Other keys always see their own tenant.
    tenant: Option<String>,
}

fn instant(name: &str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
    v.map(|s| {
        parse_rfc3339_ms(s).ok_or_else(|| {
            ApiError::Invalid(format!(
                "{name} must be an RFC 3339 time such as 2026-11-01T00:00:00Z, not {s:?}"
            ))
        })
    })
    .transpose()
}

/// Tokens, model cost, container-hours and container cost in a window, grouped.
#[utoipa::path(get, path = "/v1/usage", security(("bearer" = [])), params(UsageParams),
    responses((status = 200, body = UsageReport), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn report(
    State(st): State<AppState>,
    c: Caller,
    Query(p): Query<UsageParams>,
) -> Result<Json<UsageReport>, ApiError> {
    let from = instant("from", p.from.as_deref())?;
    let to = instant("to", p.to.as_deref())?;
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            return Err(ApiError::Invalid("from is after to".into()));
        }
    }
    let scope = match (c.admin, p.tenant) {
        (true, t) => t,
        (false, Some(t)) if t != c.tenant => {
            return Err(ApiError::Forbidden(
                "only admin keys may read another tenant's usage".into(),
            ))
        }
        (false, _) => Some(c.tenant.clone()),
    };
    Ok(Json(
        st.engine
            .usage_report(
                scope.as_deref(),
                p.group_by.unwrap_or(UsageGroupBy::Tenant),
                from,
                to,
            )
            .await?,
    ))
}
