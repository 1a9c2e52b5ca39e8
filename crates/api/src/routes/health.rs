//! Liveness and readiness, for load balancers and orchestrators.

use crate::AppState;
use axum::{Json, extract::State, http::StatusCode, response::IntoResponse};
use serde_json::json;

/// The process is up and serving HTTP. Deliberately checks nothing else:
/// restarting the API does not fix a database outage.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Alive", body = Object)))]
pub(crate) async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok", "version": warren_shared::VERSION}))
}

/// Ready to take tasks: PostgreSQL answers (without it nothing can be
/// accepted). The broker is reported but does not make the API unready:
/// tasks are still accepted durably and published by the relay later.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready: PostgreSQL answers", body = Object),
        (status = 503, description = "Not ready: PostgreSQL does not answer", body = Object),
    ),
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let database = state.store.connection().ping().await.is_ok();
    let broker = state.publisher.is_connected() || state.publisher.warm_up().await.is_ok();
    let status = if database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if database { "ready" } else { "unavailable" },
            "database": if database { "up" } else { "down" },
            "broker": if broker { "up" } else { "down" },
        })),
    )
}
