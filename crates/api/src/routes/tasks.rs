//! `/tasks/{type}`: submit a task, read its status and its result.

use crate::{ApiError, AppState, fail::FailPoint};
use axum::{
    Json,
    body::Bytes,
    extract::{
        Path, Query, State,
        rejection::{BytesRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;
use warren_shared::{
    broker::Outgoing,
    catalog::Entry,
    db::task,
    state::TaskState,
    store::{NewTask, message_from_row},
};
use warren_tasks::ValidationErrors;

/// Countdowns and ETAs further out than this are almost certainly mistakes
/// (a timestamp in milliseconds read as seconds).
const MAX_DELAY: chrono::TimeDelta = chrono::TimeDelta::days(30);

/// Optional scheduling for a submission, as query parameters so the body
/// stays exactly the task's input.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubmitParams {
    /// Do not start before this many seconds from now.
    countdown: Option<f64>,
    /// Do not start before this instant (RFC 3339).
    eta: Option<String>,
    /// Do not start after this instant (RFC 3339); the task ends EXPIRED.
    expires: Option<String>,
    /// Do not start after this many seconds from now.
    expires_in: Option<f64>,
}

struct Schedule {
    eta: Option<DateTime<Utc>>,
    expires: Option<DateTime<Utc>>,
}

impl SubmitParams {
    fn resolve(&self, now: DateTime<Utc>) -> Result<Schedule, ApiError> {
        let seconds = |name: &str, s: f64| -> Result<DateTime<Utc>, ApiError> {
            if !(0.0..=MAX_DELAY.as_seconds_f64()).contains(&s) {
                return Err(ApiError::invalid_parameter(
                    name,
                    format!(
                        "{name} must be between 0 and {} seconds",
                        MAX_DELAY.num_seconds()
                    ),
                ));
            }
            Ok(now + chrono::TimeDelta::milliseconds((s * 1000.0) as i64))
        };
        let instant = |name: &str, text: &str| -> Result<DateTime<Utc>, ApiError> {
            let at = DateTime::parse_from_rfc3339(text)
                .map_err(|e| {
                    ApiError::invalid_parameter(
                        name,
                        format!("{name} is not an RFC 3339 timestamp: {e}"),
                    )
                })?
                .with_timezone(&Utc);
            if at - now > MAX_DELAY {
                return Err(ApiError::invalid_parameter(
                    name,
                    format!("{name} is more than {} days ahead", MAX_DELAY.num_days()),
                ));
            }
            Ok(at)
        };
        let eta = match (&self.countdown, &self.eta) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_parameter(
                    "eta",
                    "give countdown or eta, not both",
                ));
            }
            (Some(s), None) => Some(seconds("countdown", *s)?),
            (None, Some(t)) => Some(instant("eta", t)?),
            (None, None) => None,
        };
        let expires = match (&self.expires_in, &self.expires) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_parameter(
                    "expires",
                    "give expires_in or expires, not both",
                ));
            }
            (Some(s), None) => Some(seconds("expires_in", *s)?),
            (None, Some(t)) => Some(instant("expires", t)?),
            (None, None) => None,
        };
        if let (Some(eta), Some(expires)) = (eta, expires)
            && expires <= eta
        {
            return Err(ApiError::invalid_parameter(
                "expires",
                "expires must be after the eta",
            ));
        }
        Ok(Schedule { eta, expires })
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Submitted {
    id: Uuid,
    task_type: String,
    state: TaskState,
    created_at: DateTime<Utc>,
    eta: Option<DateTime<Utc>>,
    status_url: String,
    result_url: String,
}

fn status_path(task_type: &str, id: Uuid) -> String {
    format!("/tasks/{task_type}/{id}")
}

fn entry<'a>(state: &'a AppState, task_type: &str) -> Result<&'a Entry, ApiError> {
    state
        .catalog
        .get(task_type)
        .ok_or_else(|| ApiError::unknown_task_type(task_type, state.catalog.task_types()))
}

/// `POST /tasks/{type}`: the body is the task's input (a JSON object).
///
/// 202 once the task is recorded in PostgreSQL. It is normally also on the
/// broker by then (`state: QUEUED`); if the broker is unreachable the task
/// stays `PENDING` and the relay publishes it as soon as it can.
pub(crate) async fn submit(
    State(state): State<AppState>,
    Path(task_type): Path<String>,
    params: Result<Query<SubmitParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let entry = entry(&state, &task_type)?;
    let Query(params) = params.map_err(|e| ApiError::invalid_parameter("query", e.body_text()))?;
    let body = body.map_err(|e| body_error(&e, state.settings.api.max_body_bytes))?;
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("(not text)");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !(essence.eq_ignore_ascii_case("application/json")
            || essence.to_ascii_lowercase().ends_with("+json"))
        {
            return Err(ApiError::unsupported_media_type(ct));
        }
    }
    let input: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::malformed_json(e.to_string()))?;
    if !input.is_object() {
        return Err(ApiError::invalid_input(ValidationErrors::single(
            "",
            "invalid_type",
            "the task input must be a JSON object",
        )));
    }
    entry
        .task
        .validate(&input)
        .map_err(ApiError::invalid_input)?;

    let now = Utc::now();
    let schedule = params.resolve(now)?;
    let delayed = schedule.eta.is_some_and(|eta| eta > now);
    let lease = chrono::Duration::from_std(state.settings.relay.lease()).unwrap_or_default();
    let new = NewTask {
        id: Uuid::now_v7(),
        task_type: task_type.clone(),
        queue: entry.queue.clone(),
        owner: None,
        input,
        eta: schedule.eta,
        expires_at: schedule.expires,
        idempotency_key: None,
        origin: state.identity.to_string(),
        traceparent: None,
        // A delayed task waits in the outbox until its ETA; any other is
        // published right here, and the relay only steps in if that fails.
        publish_at: match schedule.eta {
            Some(eta) if delayed => eta,
            _ => now + lease,
        },
    };
    let row = state.store.insert(&new).await?;
    if state.fail_points.hit(FailPoint::AfterCommitBeforePublish) {
        tracing::error!(task_id = %row.id, "fail point: dying between commit and publish");
        return Err(ApiError::internal(&std::io::Error::other(
            "fail point AfterCommitBeforePublish",
        )));
    }
    let mut task_state = row.state;
    if !delayed {
        let out = Outgoing::task(state.catalog.topology(), &message_from_row(&row));
        match state.publisher.publish(&out).await {
            Ok(()) => match state.store.mark_queued(row.id).await {
                Ok(true) => task_state = TaskState::Queued,
                // A worker already took it: it is at least queued.
                Ok(false) => task_state = TaskState::Queued,
                Err(e) => {
                    tracing::warn!(task_id = %row.id, error = %e, "published, but could not mark QUEUED; the relay will republish")
                }
            },
            Err(e) => {
                tracing::warn!(task_id = %row.id, error = %e, "recorded but not published; the relay will publish it");
            }
        }
    }
    tracing::info!(task_id = %row.id, task = %task_type, state = %task_state, "task accepted");

    let location = status_path(&task_type, row.id);
    let body = Submitted {
        id: row.id,
        task_type,
        state: task_state,
        created_at: row.created_at,
        eta: row.eta,
        result_url: format!("{location}/result"),
        status_url: location.clone(),
    };
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

fn body_error(e: &BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(limit)
    } else {
        ApiError::malformed_json(e.body_text())
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct ProgressView {
    done: i64,
    total: Option<i64>,
    message: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Links {
    #[serde(rename = "self")]
    this: String,
    /// Present once the task has succeeded.
    result: Option<String>,
}

/// A task's status as the API shows it.
#[derive(Debug, Serialize)]
pub(crate) struct TaskView {
    id: Uuid,
    task_type: String,
    state: TaskState,
    queue: String,
    attempts: i32,
    progress: Option<ProgressView>,
    error: Option<Value>,
    created_at: DateTime<Utc>,
    queued_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    eta: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    /// When a waiting task (delayed or retrying) is next published.
    next_attempt_at: Option<DateTime<Utc>>,
    /// The worker that ran the latest attempt.
    worker: Option<String>,
    links: Links,
}

impl From<task::Model> for TaskView {
    fn from(t: task::Model) -> Self {
        let this = status_path(&t.task_type, t.id);
        let result = (t.state == TaskState::Success).then(|| format!("{this}/result"));
        let waiting = matches!(t.state, TaskState::Pending | TaskState::Retry);
        Self {
            progress: t.progress_done.map(|done| ProgressView {
                done,
                total: t.progress_total,
                message: t.progress_message.clone(),
            }),
            next_attempt_at: if waiting { t.publish_at } else { None },
            id: t.id,
            task_type: t.task_type,
            state: t.state,
            queue: t.queue,
            attempts: t.attempts,
            error: t.error,
            created_at: t.created_at,
            queued_at: t.queued_at,
            started_at: t.started_at,
            finished_at: t.finished_at,
            eta: t.eta,
            expires_at: t.expires_at,
            worker: t.worker,
            links: Links { this, result },
        }
    }
}

/// Loads a task, answering 404 for unknown types, malformed or unknown
/// ids, and ids that belong to a task of another type alike.
async fn load(state: &AppState, task_type: &str, id: &str) -> Result<task::Model, ApiError> {
    entry(state, task_type)?;
    let not_found = || ApiError::task_not_found(task_type, id);
    let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
    match state.store.get(uuid).await? {
        Some(t) if t.task_type == task_type => Ok(t),
        _ => Err(not_found()),
    }
}

/// `GET /tasks/{type}/{id}`
pub(crate) async fn status(
    State(state): State<AppState>,
    Path((task_type, id)): Path<(String, String)>,
) -> Result<Json<TaskView>, ApiError> {
    Ok(Json(load(&state, &task_type, &id).await?.into()))
}

/// `GET /tasks/{type}/{id}/result`: the task's output as the JSON body
/// (200) once it succeeded; 409 `result_not_ready` (with `Retry-After`)
/// while it has not finished; 409 `no_result` if it ended otherwise.
pub(crate) async fn result(
    State(state): State<AppState>,
    Path((task_type, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let t = load(&state, &task_type, &id).await?;
    match t.state {
        TaskState::Success => Ok(Json(t.result.unwrap_or(Value::Null))),
        s if s.is_terminal() => Err(ApiError::no_result(s.as_str(), t.error)),
        s => Err(ApiError::result_not_ready(s.as_str())),
    }
}
