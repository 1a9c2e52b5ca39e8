//! `/pauses`: pausing and resuming a task type or a queue, for operators.
//! A paused type's (or queue's) tasks start nowhere: a worker handed one
//! parks it in PostgreSQL (`hold = 'paused'`), admission admits none, and
//! the resume puts them back into the outbox by priority, then submission
//! order. Tasks already running finish.

use crate::{ApiError, AppState, auth::Admin, openapi::Problem};
use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use warren_shared::store::Pause;

/// `type` or `queue`, and its name.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct PausePath {
    /// `type` (a task type) or `queue` (a queue's short name).
    kind: String,
    name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PauseView {
    kind: String,
    name: String,
    paused_at: chrono::DateTime<chrono::Utc>,
    /// The admin key's owner who paused it.
    paused_by: Option<String>,
}

impl From<Pause> for PauseView {
    fn from(p: Pause) -> Self {
        Self {
            kind: p.kind,
            name: p.name,
            paused_at: p.paused_at,
            paused_by: p.paused_by,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PausesView {
    pauses: Vec<PauseView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Resumed {
    kind: String,
    name: String,
    /// Parked tasks put back into the outbox.
    released: u64,
}

/// The path names something this deployment has.
fn check(state: &AppState, path: &PausePath) -> Result<(), ApiError> {
    let known = match path.kind.as_str() {
        "type" => state.catalog.get(&path.name).is_some(),
        "queue" => state
            .catalog
            .topology()
            .queues()
            .contains(path.name.as_str()),
        _ => {
            return Err(ApiError::invalid_parameter(
                "kind",
                "kind is `type` or `queue`",
            ));
        }
    };
    if known {
        Ok(())
    } else {
        Err(ApiError::route_not_found(&format!(
            "/pauses/{}/{} (no such {})",
            path.kind, path.name, path.kind
        )))
    }
}

/// `GET /pauses`: what is paused now.
#[utoipa::path(
    get,
    path = "/pauses",
    tag = "operations",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Paused types and queues", body = PausesView),
        (status = 401, description = "No API key, or an unknown or revoked one", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key is not an admin key", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<PausesView>, ApiError> {
    let pauses = state.store.pauses().await?;
    Ok(Json(PausesView {
        pauses: pauses.into_iter().map(Into::into).collect(),
    }))
}

/// `PUT /pauses/{kind}/{name}`: pause a task type or a queue. 201 when
/// paused now, 200 when it was already.
#[utoipa::path(
    put,
    path = "/pauses/{kind}/{name}",
    tag = "operations",
    security(("api_key" = [])),
    params(PausePath),
    responses(
        (status = 201, description = "Paused now"),
        (status = 200, description = "Already paused"),
        (status = 400, description = "kind is neither `type` nor `queue`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No API key, or an unknown or revoked one", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key is not an admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such type or queue", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn pause(
    State(state): State<AppState>,
    admin: Admin,
    Path(path): Path<PausePath>,
) -> Result<StatusCode, ApiError> {
    check(&state, &path)?;
    let by = admin.0.owner.as_str();
    let new = state.store.pause(&path.kind, &path.name, by).await?;
    tracing::warn!(kind = %path.kind, name = %path.name, by, new, "paused");
    Ok(if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    })
}

/// `DELETE /pauses/{kind}/{name}`: resume; parked tasks go back into the
/// outbox in priority, then submission, order.
#[utoipa::path(
    delete,
    path = "/pauses/{kind}/{name}",
    tag = "operations",
    security(("api_key" = [])),
    params(PausePath),
    responses(
        (status = 200, description = "Resumed", body = Resumed),
        (status = 400, description = "kind is neither `type` nor `queue`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No API key, or an unknown or revoked one", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key is not an admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such type or queue, or it is not paused", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn resume(
    State(state): State<AppState>,
    admin: Admin,
    Path(path): Path<PausePath>,
) -> Result<Json<Resumed>, ApiError> {
    check(&state, &path)?;
    let Some(released) = state.store.resume(&path.kind, &path.name).await? else {
        return Err(ApiError::route_not_found(&format!(
            "/pauses/{}/{} (not paused)",
            path.kind, path.name
        )));
    };
    state.relay_wake.notify_one();
    tracing::warn!(kind = %path.kind, name = %path.name, by = admin.0.owner.as_str(), released, "resumed");
    Ok(Json(Resumed {
        kind: path.kind,
        name: path.name,
        released,
    }))
}
