//! A task's webhook deliveries: each event sent to its `callback_url`,
//! every attempt with its status code, and redelivery of one that ended.

use super::*;
use warren_shared::store::{Delivery, DeliveryAttempt};

/// Path parameters of `/tasks/{task_type}/{id}/deliveries/{delivery_id}…`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct DeliveryPath {
    /// A task type this deployment runs.
    task_type: String,
    /// The task id.
    id: String,
    /// The delivery id (the `webhook-id` header receivers saw).
    delivery_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AttemptView {
    attempt: i32,
    started_at: DateTime<Utc>,
    duration_ms: i32,
    /// The receiver's status code; none if it could not be reached.
    status: Option<i32>,
    error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeliveryView {
    id: Uuid,
    /// `finished`, `failed` or `progress`.
    event: String,
    url: String,
    /// `pending`, `delivered` or `failed`.
    state: String,
    attempts: i32,
    /// While pending: when it is tried next.
    next_attempt_at: Option<DateTime<Utc>>,
    last_status: Option<i32>,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    history: Vec<AttemptView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeliveriesPage {
    items: Vec<DeliveryView>,
}

fn view(d: Delivery, attempts: &[DeliveryAttempt]) -> DeliveryView {
    DeliveryView {
        history: attempts
            .iter()
            .filter(|a| a.delivery_id == d.id)
            .map(|a| AttemptView {
                attempt: a.attempt,
                started_at: a.started_at,
                duration_ms: a.duration_ms,
                status: a.status,
                error: a.error.clone(),
            })
            .collect(),
        next_attempt_at: (d.state == "pending")
            .then_some(d.next_attempt_at)
            .flatten(),
        id: d.id,
        event: d.event,
        url: d.url,
        state: d.state,
        attempts: d.attempts,
        last_status: d.last_status,
        last_error: d.last_error,
        created_at: d.created_at,
        finished_at: d.finished_at,
    }
}

/// `GET /tasks/{type}/{id}/deliveries`: the task's webhook deliveries,
/// oldest first, with every attempt.
#[utoipa::path(
    get,
    path = "/tasks/{task_type}/{id}/deliveries",
    tag = "webhooks",
    security(("api_key" = [])),
    params(TaskPath),
    responses(
        (status = 200, description = "The deliveries, oldest first", body = DeliveriesPage),
        CommonErrors,
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
) -> Result<Response, ApiError> {
    let task = load(&state, &caller, &task_type, &id).await?;
    let (deliveries, attempts) = state.store.deliveries(task.id).await?;
    let items = deliveries.into_iter().map(|d| view(d, &attempts)).collect();
    Ok(Json(DeliveriesPage { items }).into_response())
}

/// `POST /tasks/{type}/{id}/deliveries/{delivery_id}/redeliver`: a
/// delivery that failed (or was delivered) is sent again, with a fresh
/// retry window (202); 409 while it is still being tried.
#[utoipa::path(
    post,
    path = "/tasks/{task_type}/{id}/deliveries/{delivery_id}/redeliver",
    tag = "webhooks",
    security(("api_key" = [])),
    params(DeliveryPath),
    responses(
        (status = 202, description = "Due again now", body = DeliveriesPage),
        CommonErrors,
        (status = 409, description = "It is still being tried", body = Problem, content_type = PROBLEM_JSON),
    ),
)]
pub(crate) async fn redeliver(
    State(state): State<AppState>,
    caller: Caller,
    Path(DeliveryPath {
        task_type,
        id,
        delivery_id,
    }): Path<DeliveryPath>,
) -> Result<Response, ApiError> {
    let task = load(&state, &caller, &task_type, &id).await?;
    let not_found = || ApiError::delivery_not_found(&delivery_id);
    let delivery = Uuid::parse_str(&delivery_id).map_err(|_| not_found())?;
    match state.store.redeliver(task.id, delivery).await? {
        None => return Err(not_found()),
        Some(false) => return Err(ApiError::delivery_pending()),
        Some(true) => {
            tracing::info!(task_id = %task.id, %delivery, "webhook delivery due again at the client's request");
        }
    }
    let (deliveries, attempts) = state.store.deliveries(task.id).await?;
    let items = deliveries
        .into_iter()
        .filter(|d| d.id == delivery)
        .map(|d| view(d, &attempts))
        .collect();
    Ok((StatusCode::ACCEPTED, Json(DeliveriesPage { items })).into_response())
}
