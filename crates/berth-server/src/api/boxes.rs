//! `/v1/boxes`: lifecycle, exec, files, stats.

use super::{Json, Path, Query};
use crate::auth::Caller;
use crate::engine::box_io::FileRead;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use berth_api::*;
use berth_gateway::HOP_BY_HOP;

/// Create a box and wait until it runs.
#[utoipa::path(post, path = "/v1/boxes", security(("bearer" = [])), request_body = BoxSpec,
    responses((status = 201, body = BoxObject), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create_box(
    State(st): State<AppState>,
    c: Caller,
    Json(spec): Json<BoxSpec>,
) -> Result<(StatusCode, Json<BoxObject>), ApiError> {
    let b = st.engine.create_box(&c.tenant, spec).await?;
    Ok((StatusCode::CREATED, Json(b)))
}

/// The caller's boxes, oldest first.
#[utoipa::path(get, path = "/v1/boxes", security(("bearer" = [])), responses((status = 200, body = List<BoxObject>)))]
pub async fn list_boxes(
    State(st): State<AppState>,
    c: Caller,
) -> Result<Json<List<BoxObject>>, ApiError> {
    Ok(Json(List {
        items: st.engine.list_boxes(&c.tenant).await?,
    }))
}

#[utoipa::path(get, path = "/v1/boxes/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = BoxObject), (status = 404, body = ErrorBody)))]
pub async fn get_box(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<BoxObject>, ApiError> {
    Ok(Json(st.engine.get_box(&c.tenant, &id).await?))
}

/// Destroy a box (and end its sessions). Idempotent.
#[utoipa::path(delete, path = "/v1/boxes/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = BoxObject), (status = 404, body = ErrorBody)))]
pub async fn delete_box(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<BoxObject>, ApiError> {
    Ok(Json(st.engine.delete_box(&c.tenant, &id).await?))
}

/// Park a hybrid box now: its agents stopped, its workspace and agents' state snapshotted to
/// the object store, the box destroyed. Its next use (exec, files, ports, a message) restores it.
#[utoipa::path(post, path = "/v1/boxes/{id}/park", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = BoxObject), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 500, body = ErrorBody)))]
pub async fn park_box(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<BoxObject>, ApiError> {
    Ok(Json(st.engine.park_box(&c.tenant, &id).await?))
}

/// Run a command in the box and wait for it.
#[utoipa::path(post, path = "/v1/boxes/{id}/exec", security(("bearer" = [])), params(("id" = String, Path)), request_body = ExecRequest,
    responses((status = 200, body = ExecResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn exec(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
    Json(req): Json<ExecRequest>,
) -> Result<Json<ExecResponse>, ApiError> {
    Ok(Json(st.engine.exec(&c.tenant, &id, req).await?))
}

/// CPU, memory, pids and disk of the box, from its cgroup and quota.
#[utoipa::path(get, path = "/v1/boxes/{id}/stats", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = BoxStats), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn stats(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Json<BoxStats>, ApiError> {
    Ok(Json(st.engine.box_stats(&c.tenant, &id).await?))
}

/// A file streams from the box's disk in chunks (never whole in memory); a directory is
/// listed as JSON.
async fn read(st: &AppState, c: &Caller, id: &str, path: &str) -> Result<Response, ApiError> {
    match st.engine.open_file(&c.tenant, id, path).await? {
        FileRead::File { size, chunks } => Ok((
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    "application/octet-stream".to_string(),
                ),
                (axum::http::header::CONTENT_LENGTH, size.to_string()),
            ],
            // A long download ends with the key that started it.
            crate::auth::until_revoked(
                axum::body::Body::from_stream(chunks),
                st.engine.key_revoked(&c.key_id),
            ),
        )
            .into_response()),
        FileRead::Dir(listing) => Ok(axum::Json(listing).into_response()),
    }
}

pub async fn get_root(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    read(&st, &c, &id, "").await
}

/// The workspace archive of a destroyed `keep_workspace` box: a tar of `workspace/`.
#[utoipa::path(get, path = "/v1/boxes/{id}/artifact", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, description = "a tar archive (application/x-tar)", content_type = "application/x-tar", body = Vec<u8>),
        (status = 404, body = ErrorBody)))]
pub async fn artifact(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tar = st.engine.box_artifact(&c.tenant, &id).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-tar")],
        crate::auth::until_revoked(
            axum::body::Body::from_stream(tar),
            st.engine.key_revoked(&c.key_id),
        ),
    )
        .into_response())
}

/// A file's bytes, or a directory's JSON listing. Paths are relative to `/workspace`.
#[utoipa::path(get, path = "/v1/boxes/{id}/files/{path}", security(("bearer" = [])), params(("id" = String, Path), ("path" = String, Path)),
    responses((status = 200, description = "file bytes (application/octet-stream) or a DirListing (application/json)", body = DirListing),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_file(
    State(st): State<AppState>,
    c: Caller,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    read(&st, &c, &id, &path).await
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
pub struct PutParams {
    /// Octal permission bits for a new file, e.g. `755` (default `644`).
    mode: Option<String>,
}

/// Write a file (parents are created). The body is the file's bytes.
#[utoipa::path(put, path = "/v1/boxes/{id}/files/{path}", security(("bearer" = [])), params(("id" = String, Path), ("path" = String, Path), PutParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 507, body = ErrorBody)))]
pub async fn put_file(
    State(st): State<AppState>,
    c: Caller,
    Path((id, path)): Path<(String, String)>,
    Query(p): Query<PutParams>,
    req: axum::extract::Request,
) -> Result<StatusCode, ApiError> {
    use axum::RequestExt;
    use futures::StreamExt;
    let mode = match p.mode {
        Some(m) => u32::from_str_radix(&m, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ApiError::Invalid("mode must be octal permission bits, e.g. 644".into())
            })?,
        None => 0o644,
    };
    let mut file = st.engine.create_file(&c.tenant, &id, &path, mode).await?;
    // The body goes to the file as it arrives, in pieces of at most one chunk: memory per
    // upload stays at a chunk or two whatever the file's size. The request body limit holds
    // for bodies without a declared length too.
    let mut body = req.with_limited_body().into_body().into_data_stream();
    let mut pending = bytes::BytesMut::new();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(body_error)?;
        pending.extend_from_slice(&piece);
        if pending.len() >= crate::engine::box_io::FILE_CHUNK {
            file.write(pending.split().freeze()).await?;
        }
    }
    if !pending.is_empty() {
        file.write(pending.freeze()).await?;
    }
    file.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

fn body_error(e: axum::Error) -> ApiError {
    let inner = e.into_inner();
    if inner
        .downcast_ref::<http_body_util::LengthLimitError>()
        .is_some()
    {
        ApiError::Rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than the limit".into(),
        )
    } else {
        ApiError::Invalid(format!("reading the request body: {inner}"))
    }
}

/// Delete a file or (recursively) a directory.
#[utoipa::path(delete, path = "/v1/boxes/{id}/files/{path}", security(("bearer" = [])), params(("id" = String, Path), ("path" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_file(
    State(st): State<AppState>,
    c: Caller,
    Path((id, path)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    st.engine.delete_file(&c.tenant, &id, &path).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Reverse proxy (HTTP/1.1) to a port a process in the box listens on, at
/// `/v1/boxes/{id}/ports/{port}/{rest}`. The caller's API key is not passed on.
pub async fn ports(
    State(st): State<AppState>,
    c: Caller,
    Path((id, port, rest)): Path<(String, u16, String)>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    proxy_port(st, c, id, port, rest, req).await
}

/// The same, for the port's root (`/v1/boxes/{id}/ports/{port}` or `…/{port}/`).
pub async fn ports_root(
    State(st): State<AppState>,
    c: Caller,
    Path((id, port)): Path<(String, u16)>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    proxy_port(st, c, id, port, String::new(), req).await
}

pub(crate) async fn proxy_port(
    st: AppState,
    c: Caller,
    id: String,
    port: u16,
    rest: String,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let upgrade = req.headers().contains_key(axum::http::header::UPGRADE);
    let stream = st.engine.connect_port(&c.tenant, &id, port).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| {
                ApiError::Rejected(StatusCode::BAD_GATEWAY, format!("port {port}: {e}"))
            })?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut req = req;
    // The client's side of a protocol switch (WebSocket), taken before the request is consumed.
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let mut out = axum::http::Request::builder()
        .method(parts.method)
        .uri(format!("/{rest}{query}"));
    for (k, v) in parts.headers.iter() {
        let name = k.as_str();
        let hop =
            HOP_BY_HOP.contains(&name) && !(upgrade && (name == "connection" || name == "upgrade"));
        if hop || name == "authorization" || name == "host" {
            continue;
        }
        out = out.header(k, v);
    }
    let out = out
        .header("host", format!("127.0.0.1:{port}"))
        .body(body)
        .map_err(|e| ApiError::Invalid(e.to_string()))?;
    let resp = sender
        .send_request(out)
        .await
        .map_err(|e| ApiError::Rejected(StatusCode::BAD_GATEWAY, format!("port {port}: {e}")))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ApiError::Rejected(
                StatusCode::BAD_GATEWAY,
                "the box switched protocols unasked".into(),
            ));
        };
        let mut resp = resp;
        let box_upgrade = hyper::upgrade::on(&mut resp);
        let revoked = st.engine.key_revoked(&c.key_id);
        tokio::spawn(async move {
            if let (Ok(a), Ok(b)) = (client_upgrade.await, box_upgrade.await) {
                let (mut a, mut b) = (
                    hyper_util::rt::TokioIo::new(a),
                    hyper_util::rt::TokioIo::new(b),
                );
                // Until either side closes, or the key that opened it is revoked.
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    () = revoked => {}
                }
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, axum::body::Body::empty()));
    }
    let (mut parts, body) = resp.into_parts();
    for h in HOP_BY_HOP {
        parts.headers.remove(h);
    }
    let body = crate::auth::until_revoked(
        axum::body::Body::new(body),
        st.engine.key_revoked(&c.key_id),
    );
    Ok(Response::from_parts(parts, body))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
pub struct BoxEventParams {
    /// Events with `seq` greater than this (default 0).
    after: Option<i64>,
}

/// The box's own event log: state changes and egress decisions (at most 1,000 per call).
#[utoipa::path(get, path = "/v1/boxes/{id}/events", security(("bearer" = [])), params(("id" = String, Path), BoxEventParams),
    responses((status = 200, body = List<BoxEvent>), (status = 404, body = ErrorBody)))]
pub async fn box_events(
    State(st): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
    Query(p): Query<BoxEventParams>,
) -> Result<Json<List<BoxEvent>>, ApiError> {
    let after = p.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::Invalid("after must be >= 0".into()));
    }
    Ok(Json(List {
        items: st.engine.box_events(&c.tenant, &id, after).await?,
    }))
}
