//! For operators: which workers are alive, and how deep the queues are.

use crate::{ApiError, AppState, auth::Admin};
use axum::{Json, extract::State};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::ToSchema;
use warren_shared::store::WorkerRecord;

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WorkersView {
    workers: Vec<WorkerView>,
}

/// A worker replica, as its last heartbeat described it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WorkerView {
    id: String,
    host: String,
    pid: i32,
    version: String,
    queues: Vec<String>,
    concurrency: i32,
    in_flight: i32,
    /// Deliveries handled since it started.
    processed: i64,
    /// Where its `/metrics`, `/healthz` and `/readyz` answer.
    metrics_addr: Option<String>,
    started_at: chrono::DateTime<chrono::Utc>,
    last_heartbeat: chrono::DateTime<chrono::Utc>,
}

impl From<WorkerRecord> for WorkerView {
    fn from(w: WorkerRecord) -> Self {
        Self {
            id: w.id,
            host: w.host,
            pid: w.pid,
            version: w.version,
            queues: w.queues,
            concurrency: w.concurrency,
            in_flight: w.in_flight,
            processed: w.processed,
            metrics_addr: w.metrics_addr,
            started_at: w.started_at,
            last_heartbeat: w.last_heartbeat,
        }
    }
}

/// `GET /workers`: replicas that sent a heartbeat within
/// `api.worker_timeout_seconds`; a killed one drops off after that.
#[utoipa::path(
    get,
    path = "/workers",
    tag = "operations",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Live workers", body = WorkersView),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key is not an admin key", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn workers(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<WorkersView>, ApiError> {
    let timeout = Duration::from_secs_f64(state.settings.api.worker_timeout_seconds);
    let workers = state.store.live_workers(timeout).await?;
    Ok(Json(WorkersView {
        workers: workers.into_iter().map(Into::into).collect(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QueuesView {
    queues: Vec<QueueView>,
}

/// One of Warren's queues, as RabbitMQ reports it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct QueueView {
    pub(crate) name: String,
    /// `work`, `high_band` (a work queue's priorities 5–9), `celery` (a
    /// Celery client's default queue) or `dead_letter`.
    pub(crate) kind: &'static str,
    /// Waiting to be delivered.
    pub(crate) ready: u64,
    /// Delivered to a worker, not yet acknowledged (running, or prefetched).
    pub(crate) unacked: u64,
    pub(crate) consumers: u64,
}

/// The fields of RabbitMQ's `/api/queues/{vhost}/{name}` that we show.
#[derive(Debug, Deserialize)]
struct ManagementQueue {
    #[serde(default)]
    messages_ready: u64,
    #[serde(default)]
    messages_unacknowledged: u64,
    #[serde(default)]
    consumers: u64,
}

/// `GET /queues`: every work queue and the dead-letter queue, with ready
/// and unacknowledged messages and consumers, from RabbitMQ's management API.
#[utoipa::path(
    get,
    path = "/queues",
    tag = "operations",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Warren's queues", body = QueuesView),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key is not an admin key", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "RabbitMQ's management API is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn queues(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<QueuesView>, ApiError> {
    Ok(Json(QueuesView {
        queues: fetch_queues(&state).await?,
    }))
}

/// Every work queue and the dead-letter queue, as RabbitMQ's management
/// API reports them now (a queue not declared yet: zeros).
pub(crate) async fn fetch_queues(state: &AppState) -> Result<Vec<QueueView>, ApiError> {
    let topology = state.catalog.topology();
    let mut names: Vec<(String, &'static str)> = topology
        .queues()
        .into_iter()
        .map(|q| (topology.queue(q), "work"))
        .collect();
    names.extend(topology.high_bands().into_iter().map(|q| (q, "high_band")));
    names.extend(
        topology
            .celery_queues()
            .iter()
            .map(|q| (q.clone(), "celery")),
    );
    names.push((topology.dead_letter_queue(), "dead_letter"));
    let m = &state.management;
    let mut queues = Vec::with_capacity(names.len());
    for (name, kind) in names {
        let url = m.url("queues", &name);
        let unavailable = |detail: String| ApiError::broker_management_unavailable(&detail);
        let response = m
            .get(&url)
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            // Not declared yet (no api or worker connected since a reset).
            queues.push(QueueView {
                name,
                kind,
                ready: 0,
                unacked: 0,
                consumers: 0,
            });
            continue;
        }
        if !response.status().is_success() {
            return Err(unavailable(format!(
                "{} answered {}",
                m.base,
                response.status()
            )));
        }
        let q: ManagementQueue = response
            .json()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        queues.push(QueueView {
            name,
            kind,
            ready: q.messages_ready,
            unacked: q.messages_unacknowledged,
            consumers: q.consumers,
        });
    }
    Ok(queues)
}
