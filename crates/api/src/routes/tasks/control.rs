//! Controlling tasks: cancel and retry.

use super::submit::publish_due;
use super::*;

// --------------------------------------------------------------- control

/// `POST /tasks/{type}/{id}/cancel`: 200 when the task had not started (it
/// is CANCELLED and never runs); 202 when it is running (its worker tells
/// it to stop and it ends CANCELLED); 409 when it already finished.
#[utoipa::path(
    post,
    path = "/tasks/{task_type}/{id}/cancel",
    tag = "tasks",
    security(("api_key" = [])),
    params(TaskPath),
    responses(
        (status = 200, description = "It had not started: CANCELLED, and it never runs", body = TaskView),
        (status = 202, description = "It is running: its worker tells it to stop", body = TaskView),
        CommonErrors,
        (status = 409, description = "It already finished", body = Problem, content_type = PROBLEM_JSON),
    ),
)]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
) -> Result<Response, ApiError> {
    let (status, t) = cancel_task(&state, &caller, &task_type, &id).await?;
    Ok((status, Json(view(&state, t).await?)).into_response())
}

/// Cancels a visible task: 200 when it had not started, 202 when its worker
/// is told to stop; the task as it is now. Shared by the API and the dashboard.
pub(crate) async fn cancel_task(
    state: &AppState,
    caller: &Caller,
    task_type: &str,
    id: &str,
) -> Result<(StatusCode, TaskSummary), ApiError> {
    entry(state, task_type)?;
    let uuid = parse_id(task_type, id)?;
    let status = match state.store.cancel(uuid, caller.owners(), task_type).await? {
        Cancellation::Cancelled => StatusCode::OK,
        Cancellation::Requested => StatusCode::ACCEPTED,
        Cancellation::AlreadyFinished(s) => return Err(ApiError::already_finished(s.as_str())),
        Cancellation::NotFound => return Err(ApiError::task_not_found(task_type, id)),
    };
    if status == StatusCode::OK {
        tracing::info!(task_id = %uuid, task = task_type, "task cancelled");
    } else {
        tracing::info!(task_id = %uuid, task = task_type, "cancellation requested");
    }
    Ok((status, load(state, caller, task_type, id).await?))
}

/// `POST /tasks/{type}/{id}/retry`: a task that ended FAILURE, CANCELLED or
/// EXPIRED runs again, attempts counted afresh (202); 409 otherwise.
#[utoipa::path(
    post,
    path = "/tasks/{task_type}/{id}/retry",
    tag = "tasks",
    security(("api_key" = [])),
    params(TaskPath),
    responses(
        (status = 202, description = "Queued again, attempts counted afresh", body = TaskView),
        CommonErrors,
        (status = 409, description = "Only a task that ended FAILURE, CANCELLED or EXPIRED can be retried", body = Problem, content_type = PROBLEM_JSON),
    ),
)]
pub(crate) async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
) -> Result<Response, ApiError> {
    let t = retry_task(&state, &caller, &task_type, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&state, t).await?)).into_response())
}

/// Queues a visible task that ended without success again; the task as it
/// is now. Shared by the API and the dashboard.
pub(crate) async fn retry_task(
    state: &AppState,
    caller: &Caller,
    task_type: &str,
    id: &str,
) -> Result<TaskSummary, ApiError> {
    entry(state, task_type)?;
    let uuid = parse_id(task_type, id)?;
    let lease = chrono::Duration::from_std(state.settings.relay.lease()).unwrap_or_default();
    match state
        .store
        .retry(uuid, caller.owners(), task_type, lease)
        .await?
    {
        Retry::Requeued(row) => {
            publish_due(state, std::slice::from_ref(&row)).await;
        }
        Retry::NotRetryable(s) => return Err(ApiError::not_retryable(s.as_str())),
        Retry::NotFound => return Err(ApiError::task_not_found(task_type, id)),
    }
    tracing::info!(task_id = %uuid, task = task_type, "task retried");
    load(state, caller, task_type, id).await
}
