//! What the API counts, served at `/metrics`: HTTP requests by method,
//! route template and status, their durations, tasks submitted by type,
//! publish-confirm latency, the outbox backlog, and long-polls waiting and
//! what woke them. Every series carries
//! the build version (see `warren_shared::metrics`).

use crate::AppState;
use axum::{
    extract::{MatchedPath, Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Registry,
};
use std::time::Instant;
use warren_shared::metrics::{self, MetricsError};

pub struct ApiMetrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_seconds: HistogramVec,
    pub submitted: IntCounterVec,
    /// Requests answered 503 by `limits` before a handler ran.
    refused: IntCounterVec,
    pub confirm_seconds: Histogram,
    outbox: IntGauge,
    /// Tasks neither on the broker nor due in the outbox, by why.
    waiting: IntGaugeVec,
    /// Single submissions per shared transaction.
    pub batch_size: Histogram,
    /// A single submission's wait for its shared transaction.
    pub write_seconds: Histogram,
    /// Requests waiting in `?wait=` right now.
    pub long_polls: IntGauge,
    /// Queries asking which awaited tasks finished.
    pub long_poll_checks: IntCounter,
    /// Tasks whose waiting requests were woken, by what told the API.
    pub long_poll_woken: IntCounterVec,
    /// Queries reading finished tasks for woken long-polls.
    pub long_poll_reads: IntCounter,
    /// Long-polls answered after waiting, by whose read.
    pub long_poll_answers: IntCounterVec,
    /// How late woken long-polls get their row, by where it is counted from.
    pub long_poll_lag: HistogramVec,
}

impl ApiMetrics {
    pub fn new(db: &warren_shared::db::Connection, pool_max: u32) -> Result<Self, MetricsError> {
        let r = metrics::registry("api")?;
        metrics::register_pool(&r, db, pool_max)?;
        Ok(Self {
            http_requests: metrics::counters(
                &r,
                "warren_http_requests_total",
                "HTTP requests by method, route template and status.",
                &["method", "route", "status"],
            )?,
            http_seconds: metrics::seconds(
                &r,
                "warren_http_request_duration_seconds",
                "HTTP request durations by method and route template.",
                &["method", "route"],
            )?,
            submitted: metrics::counters(
                &r,
                "warren_tasks_submitted_total",
                "Tasks accepted (202) by task type.",
                &["task_type"],
            )?,
            refused: metrics::counters(
                &r,
                "warren_http_requests_refused_total",
                "Requests answered 503 by the replica's limits: overloaded (every request slot taken) or timed_out.",
                &["reason"],
            )?,
            confirm_seconds: metrics::register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "warren_publish_confirm_seconds",
                        "From publishing a batch of tasks to the broker's confirms.",
                    )
                    .buckets(metrics::SECONDS_BUCKETS.to_vec()),
                )?,
            )?,
            outbox: metrics::gauge(
                &r,
                "warren_outbox_tasks",
                "Tasks recorded but not on the broker: unpublished, delayed, or waiting to retry.",
            )?,
            waiting: metrics::register(
                &r,
                IntGaugeVec::new(
                    prometheus::Opts::new(
                        "warren_tasks_waiting",
                        "Tasks waiting in PostgreSQL, by reason: key_cap (their key at its concurrency_limit), rate_limit (no token of its rate yet), admission (held by a limit no longer configured), paused (their type or queue), scheduled (a countdown or ETA ahead).",
                    ),
                    &["reason"],
                )?,
            )?,
            batch_size: metrics::register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "warren_api_batch_size",
                        "Single submissions per shared transaction: how many concurrent requests share one INSERT and one COMMIT.",
                    )
                    .buckets(metrics::BATCH_BUCKETS.to_vec()),
                )?,
            )?,
            write_seconds: metrics::register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "warren_api_write_seconds",
                        "How long a single submission waited for its shared transaction (INSERT, publish, \
                         the broker's confirms, COMMIT), queueing for it included.",
                    )
                    .buckets(metrics::WRITE_SECONDS_BUCKETS.to_vec()),
                )?,
            )?,
            long_polls: metrics::gauge(
                &r,
                "warren_api_long_polls",
                "Requests waiting for their task to finish (GET /tasks/{type}/{id}?wait=).",
            )?,
            long_poll_checks: metrics::register(
                &r,
                IntCounter::new(
                    "warren_api_long_poll_checks_total",
                    "Queries asking which awaited tasks have finished, however many wait: after \
                     the listener (re)connects, for a finish notification without a task id, and \
                     every 15 s while anyone waits.",
                )?,
            )?,
            long_poll_woken: metrics::counters(
                &r,
                "warren_api_long_poll_woken_total",
                "Awaited tasks whose requests were woken, by what told: notification (its task id, \
                 no query) or check (a query over every awaited task).",
                &["by"],
            )?,
            long_poll_reads: metrics::register(
                &r,
                IntCounter::new(
                    "warren_api_long_poll_reads_total",
                    "Queries reading finished tasks for the long-polls woken on them: one for all \
                     the tasks that finished while the previous one ran, not one per request.",
                )?,
            )?,
            long_poll_answers: metrics::counters(
                &r,
                "warren_api_long_poll_answers_total",
                "Long-polls answered after their wait, by whose read: shared (the listener's \
                 read of the finished task) or own (the request read it itself: the wait ran \
                 out, or the shared read failed).",
                &["read"],
            )?,
            long_poll_lag: metrics::seconds(
                &r,
                "warren_api_long_poll_lag_seconds",
                "How late long-polls are handed their finished task's row, per task: from the \
                 row's finished_at (from=finished: the worker's commit, the notification and \
                 the read) or from the API receiving the notification (from=notified: the read alone).",
                &["from"],
            )?,
            registry: r,
        })
    }
}

/// Records every request. The route is the matched template
/// (`/tasks/{task_type}/{id}`), never the raw path, so ids cannot blow up
/// the number of series; what matched nothing is `unmatched`.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let m = &state.metrics;
    m.http_requests
        .with_label_values(&[method, &route, response.status().as_str()])
        .inc();
    m.http_seconds
        .with_label_values(&[method, &route])
        .observe(started.elapsed().as_secs_f64());
    response
}

impl ApiMetrics {
    /// Counts a request the limits refused (`overloaded`, `timed_out`).
    pub fn refused(&self, reason: &'static str) {
        self.refused.with_label_values(&[reason]).inc();
    }
}

/// The method as a label from a closed set: anyone can send `FOO /`, and
/// each new label value would be a new series kept for the process's life.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// `GET /metrics`: open, or with `api.metrics_token` set, for the bearer of
/// that token only (a tenant's API key is not enough: the series name
/// every task type and route of every owner).
pub async fn serve(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if let Some(token) = &state.settings.api.metrics_token
        && !bearer_is(&headers, token)
    {
        return crate::ApiError::invalid_api_key("GET /metrics needs the scrape token")
            .into_response();
    }
    match state.store.outbox_len().await {
        Ok(n) => state.metrics.outbox.set(n),
        Err(e) => tracing::warn!(error = %e, "metrics: could not count the outbox"),
    }
    let limits: Vec<(&str, Option<u32>, bool)> = state
        .catalog
        .task_types()
        .filter_map(|t| state.catalog.get(t).map(|e| (t, &e.limits)))
        .filter(|(_, l)| l.admits())
        .map(|(t, l)| (t, l.cap(), l.rate.is_some()))
        .collect();
    match state.store.waiting_by_reason(&limits).await {
        Ok(counts) => {
            for reason in ["key_cap", "rate_limit", "admission", "paused", "scheduled"] {
                let n = counts.get(reason).copied().unwrap_or(0);
                state.metrics.waiting.with_label_values(&[reason]).set(n);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: could not count waiting tasks"),
    }
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::encode(&state.metrics.registry),
    )
        .into_response()
}

/// Whether the request carries `Authorization: Bearer <token>`, compared by
/// digest so the time taken says nothing about the token.
fn bearer_is(headers: &axum::http::HeaderMap, token: &secrecy::SecretString) -> bool {
    use secrecy::ExposeSecret;
    use sha2::{Digest, Sha256};
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    Sha256::digest(presented.as_bytes()) == Sha256::digest(token.expose_secret().as_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn unknown_methods_share_one_label() {
        let odd = axum::http::Method::from_bytes(b"BREW").unwrap();
        assert_eq!(super::method_label(&odd), "other");
        assert_eq!(super::method_label(&axum::http::Method::POST), "POST");
    }
}
