//! Bounds on the request path, so overload is a fast 503 rather than
//! memory growth: at most `api.max_concurrent_requests` in flight (health
//! and metrics exempt, so an overloaded replica still says so), and each
//! answered within `api.request_timeout_seconds` (plus the `?wait=` a
//! long-poll asked for).

use crate::{ApiError, AppState};
use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use std::time::Duration;

/// Paths that must answer however busy the replica is.
const EXEMPT: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if EXEMPT.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let Ok(_permit) = state.requests.clone().try_acquire_owned() else {
        state.metrics.refused("overloaded");
        return ApiError::overloaded().into_response();
    };
    let api = &state.settings.api;
    let wait = requested_wait(request.uri().query()).min(api.max_wait_seconds);
    let limit = Duration::from_secs_f64(api.request_timeout_seconds) + Duration::from_secs(wait);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            state.metrics.refused("timed_out");
            ApiError::timed_out(limit).into_response()
        }
    }
}

/// The `wait` query parameter's seconds, if any (the handler validates it).
fn requested_wait(query: Option<&str>) -> u64 {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("wait="))
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(0, |s| s.ceil().min(u64::MAX as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::requested_wait;

    #[test]
    fn the_wait_parameter_extends_the_deadline() {
        assert_eq!(requested_wait(Some("wait=30")), 30);
        assert_eq!(requested_wait(Some("a=1&wait=2.5")), 3);
        assert_eq!(requested_wait(Some("wait=-1")), 0);
        assert_eq!(requested_wait(Some("wait=NaN")), 0);
        assert_eq!(requested_wait(Some("wait=1e300")), u64::MAX);
        assert_eq!(requested_wait(None), 0);
    }
}
