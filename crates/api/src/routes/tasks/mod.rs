//! `/tasks/{type}…`: submit (alone, idempotently, or in batches), list,
//! read status (optionally long-polling), result, item errors, artifacts,
//! cancel and retry. Every handler takes a [`Caller`]: all of it is scoped
//! to the API key's owner.
//!
//! - this module: what the handlers share: parsing and validating input,
//!   loading a task, the views, the answers every route can give;
//! - `submit`: submitting, alone or in batches, scheduling, idempotency;
//! - `read`: listing, status (long-poll), result, item errors, artifacts;
//! - `control`: cancel and retry;
//! - `deliveries`: the task's webhook deliveries, and redelivery.

use crate::openapi::Problem;
use crate::{ApiError, AppState, auth::Caller, fail::FailPoint};
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
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::time::Duration;
use utoipa::{IntoParams, IntoResponses, ToSchema};
use uuid::Uuid;
use warren_shared::{
    admission::Limits,
    artifacts::ArtifactMeta,
    catalog::Entry,
    db::task,
    state::TaskState,
    store::{
        Cancellation, Inserted, ListFilter, NewTask, Retry, TaskSummary, Unique, message_from_row,
    },
};
use warren_tasks::{FieldError, ValidationErrors};

/// Countdowns and ETAs further out than this are almost certainly mistakes
/// (a timestamp in milliseconds read as seconds).
const MAX_DELAY: chrono::TimeDelta = chrono::TimeDelta::days(30);
const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 500;
/// A batch with thousands of bad tasks answers with the first ones.
const MAX_REPORTED_ERRORS: usize = 1000;

pub(crate) mod control;
pub(crate) mod deliveries;
mod nul;
pub(crate) mod read;
pub(crate) mod submit;

// ---------------------------------------------------------------- helpers

fn task_path(task_type: &str, id: Uuid) -> String {
    format!("/tasks/{task_type}/{id}")
}

fn entry<'a>(state: &'a AppState, task_type: &str) -> Result<&'a Entry, ApiError> {
    state
        .catalog
        .get(task_type)
        .ok_or_else(|| ApiError::unknown_task_type(task_type, state.catalog.task_types()))
}

/// 404 unless this deployment runs `task_type` (the dashboard's listings).
pub(crate) fn entry_exists(state: &AppState, task_type: &str) -> Result<(), ApiError> {
    entry(state, task_type).map(drop)
}

fn query<T: DeserializeOwned>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::invalid_parameter("query", e.body_text()))
}

fn parse_id(task_type: &str, id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::task_not_found(task_type, id))
}

/// Reads a JSON request body: declared as JSON (or undeclared), parseable,
/// within the size limit.
pub(crate) fn json_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Value, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::malformed_json(e.body_text())
        }
    })?;
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("(not text)");
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !(essence == "application/json" || essence.ends_with("+json")) {
            return Err(ApiError::unsupported_media_type(ct));
        }
    }
    let nuls = nul::scan(&body);
    if !nuls.is_empty() {
        return Err(ApiError::invalid_input(
            ValidationErrors::check(nuls).err().unwrap_or_else(|| {
                ValidationErrors::single("", "invalid_value", "text must not contain NUL")
            }),
        ));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::malformed_json(e.to_string()))
}

/// Everything wrong with one task's input, fields prefixed by `prefix`.
pub(crate) fn validate_input(
    entry: &Entry,
    input: &Value,
    prefix: &str,
) -> Result<(), ValidationErrors> {
    let field = |f: &str| match (prefix.is_empty(), f.is_empty()) {
        (true, _) => f.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) => format!("{prefix}.{f}"),
    };
    if !input.is_object() {
        return Err(ValidationErrors::single(
            field(""),
            "invalid_type",
            "a task input must be a JSON object",
        ));
    }
    // NULs were refused in `json_body`, before the body became a value.
    entry.task.validate(input).map_err(|errors| {
        let prefixed = errors
            .errors()
            .iter()
            .map(|e| FieldError::new(field(&e.field), e.code, e.message.clone()))
            .collect();
        ValidationErrors::check(prefixed).err().unwrap_or(errors)
    })
}

// ----------------------------------------------------------------- views

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Submitted {
    id: Uuid,
    task_type: String,
    #[schema(value_type = crate::openapi::TaskState)]
    state: TaskState,
    created_at: DateTime<Utc>,
    eta: Option<DateTime<Utc>>,
    status_url: String,
    result_url: String,
}

impl Submitted {
    fn new(row: &task::Model, state: TaskState) -> Self {
        let status_url = task_path(&row.task_type, row.id);
        Self {
            id: row.id,
            task_type: row.task_type.clone(),
            state,
            created_at: row.created_at,
            eta: row.eta,
            result_url: format!("{status_url}/result"),
            status_url,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ProgressView {
    done: i64,
    total: Option<i64>,
    message: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ArtifactView {
    name: String,
    content_type: String,
    size_bytes: i64,
    url: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Links {
    #[serde(rename = "self")]
    this: String,
    /// Per-item errors of a batch task (an empty list for other tasks).
    errors: String,
    /// Present once the task has succeeded.
    result: Option<String>,
}

/// A task's status as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskView {
    id: Uuid,
    task_type: String,
    #[schema(value_type = crate::openapi::TaskState)]
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
    /// 0–9, higher first.
    priority: i16,
    /// Why a task that is not on the broker waits, if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    waiting: Option<WaitingView>,
    /// Set once a client asked to cancel the task while it ran.
    cancel_requested_at: Option<DateTime<Utc>>,
    /// The worker that ran the latest attempt.
    worker: Option<String>,
    /// Files the task produced, once it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    artifacts: Option<Vec<ArtifactView>>,
    links: Links,
}

/// Why a task waits: `key_cap` (its key is at its type's
/// concurrency_limit), `rate_limit` (its key's rate has no token yet),
/// `admission` (held by a limit configuration no longer declares; the
/// next pass releases it), `paused` (its type or queue), `scheduled` (a
/// countdown or ETA ahead), `retry` (a retry's backoff).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WaitingView {
    reason: &'static str,
    /// The concurrency (or rate) key it is admitted under.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

impl WaitingView {
    /// Held for admission, the reason is the limit in the way: its key's
    /// cap (`key_cap`) or its rate (`rate_limit`).
    fn of(t: &TaskSummary, now: DateTime<Utc>, limits: Option<&Limits>) -> Option<Self> {
        let reason = match (t.state, t.hold.as_deref()) {
            (TaskState::Pending, Some("admission")) => admission_reason(t, limits),
            (TaskState::Pending, Some(_)) => "paused",
            (TaskState::Pending, None) if t.eta.is_some_and(|eta| eta > now) => "scheduled",
            (TaskState::Retry, _) => "retry",
            _ => return None,
        };
        Some(Self {
            reason,
            key: t
                .hold
                .as_deref()
                .is_some_and(|h| h == "admission")
                .then(|| t.concurrency_key.clone())
                .flatten()
                // One bucket for the whole type has no key to name.
                .filter(|k| !k.is_empty()),
        })
    }
}

/// As `Store::waiting_by_reason` counts them: below the cap, a type
/// without a rate waits only for the next pass to hand its key the slot.
fn admission_reason(t: &TaskSummary, limits: Option<&Limits>) -> &'static str {
    let cap = limits.and_then(Limits::cap).map(i64::from);
    let rate = limits.is_some_and(|l| l.rate.is_some());
    match (cap, t.key_running) {
        (Some(cap), Some(running)) if i64::from(running) >= cap || !rate => "key_cap",
        _ if rate => "rate_limit",
        _ => "admission",
    }
}

impl TaskView {
    fn new(t: TaskSummary, artifacts: Option<Vec<ArtifactMeta>>, limits: Option<&Limits>) -> Self {
        let this = task_path(&t.task_type, t.id);
        let result = (t.state == TaskState::Success).then(|| format!("{this}/result"));
        let waiting = matches!(t.state, TaskState::Pending | TaskState::Retry);
        Self {
            progress: t.progress_done.map(|done| ProgressView {
                done,
                total: t.progress_total,
                message: t.progress_message.clone(),
            }),
            next_attempt_at: if waiting { t.publish_at } else { None },
            waiting: WaitingView::of(&t, Utc::now(), limits),
            priority: t.priority,
            artifacts: artifacts.map(|list| {
                list.into_iter()
                    .map(|a| ArtifactView {
                        url: format!("{this}/artifacts/{}", a.name),
                        name: a.name,
                        content_type: a.content_type,
                        size_bytes: a.size_bytes,
                    })
                    .collect()
            }),
            links: Links {
                errors: format!("{this}/errors"),
                result,
                this,
            },
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
            cancel_requested_at: t.cancel_requested_at,
            worker: t.worker,
        }
    }
}

/// The caller's task of that type, or 404 (unknown type, malformed or
/// unknown id, another owner's task, a task of another type: all alike).
pub(crate) async fn load(
    state: &AppState,
    caller: &Caller,
    task_type: &str,
    id: &str,
) -> Result<TaskSummary, ApiError> {
    entry(state, task_type)?;
    let uuid = parse_id(task_type, id)?;
    state
        .store
        .summary(caller.owners(), task_type, uuid)
        .await?
        .ok_or_else(|| ApiError::task_not_found(task_type, id))
}

async fn view(state: &AppState, t: TaskSummary) -> Result<TaskView, ApiError> {
    let artifacts = if t.state == TaskState::Success {
        Some(state.artifacts.list(t.id).await?)
    } else {
        None
    };
    Ok(view_with(state, t, artifacts))
}

/// [`view`] with the artifacts already listed (a success's only).
fn view_with(state: &AppState, t: TaskSummary, artifacts: Option<Vec<ArtifactMeta>>) -> TaskView {
    let limits = state.catalog.get(&t.task_type).map(|e| &e.limits);
    TaskView::new(t, artifacts, limits)
}

// ------------------------------------------------------------ documented

/// Path parameters of `/tasks/{task_type}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct TypePath {
    /// A task type this deployment runs.
    pub(crate) task_type: String,
}

/// Path parameters of `/tasks/{task_type}/{id}…`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct TaskPath {
    /// A task type this deployment runs.
    pub(crate) task_type: String,
    /// The task id.
    pub(crate) id: String,
}

/// Path parameters of `/tasks/{task_type}/{id}/artifacts/{name}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct ArtifactPath {
    /// A task type this deployment runs.
    pub(crate) task_type: String,
    /// The task id.
    pub(crate) id: String,
    /// The artifact's name, as the task's status lists it.
    pub(crate) name: String,
}

/// Answers every `/tasks` route can give, for the OpenAPI document.
#[derive(IntoResponses)]
// Never built: ApiError renders these; this type only describes them.
#[allow(dead_code)]
pub(crate) enum CommonErrors {
    /// No API key, or an unknown or revoked one
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// No such task type, or no such task of the caller
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// PostgreSQL is unreachable; nothing was recorded
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// Media type of every error answer.
const PROBLEM_JSON: &str = crate::error::PROBLEM_JSON;

#[cfg(test)]
mod tests {
    use super::read::{decode_cursor, encode_cursor};
    use super::*;

    #[test]
    fn nul_characters_are_found_wherever_they_hide() {
        let v = serde_json::json!({"a": "ok", "b": ["x", "y\u{0}"], "c": {"d": "\u{0}"}});
        let out = nul::scan(v.to_string().as_bytes());
        let fields: Vec<_> = out.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["b[1]", "c.d"]);
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = encode_cursor("1700000000000000.0193a0e0-0000-7000-8000-00000000002a");
        assert_eq!(
            decode_cursor(&c).as_deref(),
            Some("1700000000000000.0193a0e0-0000-7000-8000-00000000002a")
        );
        assert_eq!(decode_cursor("%%%"), None);
    }
}
