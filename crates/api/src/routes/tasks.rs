//! `/tasks/{type}…`: submit (alone, idempotently, or in batches), list,
//! read status (optionally long-polling), result, item errors, artifacts,
//! cancel and retry. Every handler takes a [`Caller`]: all of it is scoped
//! to the API key's owner.

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
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use warren_shared::{
    artifacts::ArtifactMeta,
    broker::Outgoing,
    catalog::Entry,
    db::task,
    state::TaskState,
    store::{Cancellation, Inserted, ListFilter, NewTask, Retry, TaskSummary, message_from_row},
};
use warren_tasks::{FieldError, ValidationErrors};

/// Countdowns and ETAs further out than this are almost certainly mistakes
/// (a timestamp in milliseconds read as seconds).
const MAX_DELAY: chrono::TimeDelta = chrono::TimeDelta::days(30);
const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 500;
/// A batch with thousands of bad tasks answers with the first ones.
const MAX_REPORTED_ERRORS: usize = 1000;

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

fn query<T: DeserializeOwned>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::invalid_parameter("query", e.body_text()))
}

fn parse_id(task_type: &str, id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::task_not_found(task_type, id))
}

/// Reads a JSON request body: declared as JSON (or undeclared), parseable,
/// within the size limit.
fn json_body(
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
    serde_json::from_slice(&body).map_err(|e| ApiError::malformed_json(e.to_string()))
}

/// PostgreSQL's jsonb cannot hold NUL characters; say so up front rather
/// than fail to record the task.
fn nul_problems(v: &Value, path: &str, out: &mut Vec<FieldError>) {
    let here = |p: &str| {
        if path.is_empty() {
            p.to_owned()
        } else {
            format!("{path}.{p}")
        }
    };
    match v {
        Value::String(s) if s.contains('\0') => out.push(FieldError::new(
            path,
            "invalid_value",
            "text must not contain NUL (\\u0000) characters",
        )),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                nul_problems(item, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                if k.contains('\0') {
                    out.push(FieldError::new(
                        path,
                        "invalid_value",
                        "keys must not contain NUL characters",
                    ));
                }
                nul_problems(item, &here(k), out);
            }
        }
        _ => {}
    }
}

/// Everything wrong with one task's input, fields prefixed by `prefix`.
fn validate_input(entry: &Entry, input: &Value, prefix: &str) -> Result<(), ValidationErrors> {
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
    let mut nul = Vec::new();
    nul_problems(input, "", &mut nul);
    if !nul.is_empty() {
        return ValidationErrors::check(
            nul.into_iter()
                .map(|e| FieldError::new(field(&e.field), e.code, e.message))
                .collect(),
        );
    }
    entry.task.validate(input).map_err(|errors| {
        let prefixed = errors
            .errors()
            .iter()
            .map(|e| FieldError::new(field(&e.field), e.code, e.message.clone()))
            .collect();
        ValidationErrors::check(prefixed).err().unwrap_or(errors)
    })
}

// ------------------------------------------------------------- scheduling

/// Optional scheduling for a submission, as query parameters so the body
/// stays exactly the task's input.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct SubmitParams {
    /// Do not start before this many seconds from now.
    #[param(minimum = 0, maximum = 2_592_000)]
    countdown: Option<f64>,
    /// Do not start before this instant (RFC 3339), at most 30 days ahead.
    #[param(value_type = Option<String>, format = DateTime)]
    eta: Option<String>,
    /// Do not start after this instant (RFC 3339); the task ends EXPIRED.
    #[param(value_type = Option<String>, format = DateTime)]
    expires: Option<String>,
    /// Do not start after this many seconds from now.
    #[param(minimum = 0, maximum = 2_592_000)]
    expires_in: Option<f64>,
}

struct Schedule {
    eta: Option<DateTime<Utc>>,
    expires: Option<DateTime<Utc>>,
}

fn instant(name: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ApiError::invalid_parameter(name, format!("{name} is not an RFC 3339 timestamp: {e}"))
        })
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
        let ahead = |name: &str, text: &str| -> Result<DateTime<Utc>, ApiError> {
            let at = instant(name, text)?;
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
            (None, Some(t)) => Some(ahead("eta", t)?),
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
            (None, Some(t)) => Some(ahead("expires", t)?),
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

fn new_task(
    state: &AppState,
    caller: &Caller,
    entry: &Entry,
    task_type: &str,
    input: Value,
    schedule: &Schedule,
    now: DateTime<Utc>,
) -> NewTask {
    let lease = chrono::Duration::from_std(state.settings.relay.lease()).unwrap_or_default();
    NewTask {
        id: Uuid::now_v7(),
        task_type: task_type.to_owned(),
        queue: entry.queue.clone(),
        owner: Some(caller.owner.clone()),
        input,
        eta: schedule.eta,
        expires_at: schedule.expires,
        idempotency_key: None,
        idempotency_fingerprint: None,
        origin: state.identity.to_string(),
        traceparent: None,
        // A delayed task waits in the outbox until its ETA; any other is
        // published right away, and the relay steps in only if that fails.
        publish_at: match schedule.eta {
            Some(eta) if eta > now => eta,
            _ => now + lease,
        },
    }
}

/// Publishes tasks that are due now (not delayed), waits for the broker's
/// confirms, and marks the confirmed ones QUEUED. Whatever fails stays in
/// the outbox for the relay; it is never an error for the client, whose
/// tasks are recorded already. Returns the confirmed ids.
async fn publish_due(state: &AppState, rows: &[task::Model]) -> Vec<Uuid> {
    let now = Utc::now();
    let due: Vec<&task::Model> = rows
        .iter()
        .filter(|r| r.eta.is_none_or(|eta| eta <= now))
        .collect();
    if due.is_empty() {
        return Vec::new();
    }
    let topology = state.catalog.topology();
    let batch: Vec<Outgoing> = due
        .iter()
        .map(|r| Outgoing::task(topology, &message_from_row(r)))
        .collect();
    let results = state.publisher.publish_all(&batch).await;
    let mut confirmed = Vec::with_capacity(due.len());
    for (row, result) in due.iter().zip(results) {
        match result {
            Ok(()) => confirmed.push(row.id),
            Err(e) => {
                tracing::warn!(task_id = %row.id, error = %e, "recorded, not yet published; the relay will publish it")
            }
        }
    }
    if !confirmed.is_empty()
        && let Err(e) = state.store.mark_queued_many(&confirmed).await
    {
        tracing::warn!(error = %e, "published, but could not mark QUEUED; the relay will republish");
    }
    confirmed
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
    /// Set once a client asked to cancel the task while it ran.
    cancel_requested_at: Option<DateTime<Utc>>,
    /// The worker that ran the latest attempt.
    worker: Option<String>,
    /// Files the task produced, once it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    artifacts: Option<Vec<ArtifactView>>,
    links: Links,
}

impl TaskView {
    fn new(t: TaskSummary, artifacts: Option<Vec<ArtifactMeta>>) -> Self {
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
async fn load(
    state: &AppState,
    caller: &Caller,
    task_type: &str,
    id: &str,
) -> Result<TaskSummary, ApiError> {
    entry(state, task_type)?;
    let uuid = parse_id(task_type, id)?;
    state
        .store
        .summary(&caller.owner, task_type, uuid)
        .await?
        .ok_or_else(|| ApiError::task_not_found(task_type, id))
}

async fn view(state: &AppState, t: TaskSummary) -> Result<TaskView, ApiError> {
    let artifacts = if t.state == TaskState::Success {
        Some(state.artifacts.list(t.id).await?)
    } else {
        None
    };
    Ok(TaskView::new(t, artifacts))
}

// --------------------------------------------------------------- submit

/// A client's key for retrying a submission safely: 1 to 255 visible ASCII.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::invalid_parameter(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// What makes two submissions "the same" for an idempotency key.
fn fingerprint(task_type: &str, input: &Value, schedule: &Schedule) -> String {
    let mut h = Sha256::new();
    for part in [
        task_type.to_owned(),
        input.to_string(),
        format!("{:?}", schedule.eta),
        format!("{:?}", schedule.expires),
    ] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /tasks/{type}`: the body is the task's input (a JSON object).
///
/// 202 once the task is recorded in PostgreSQL. It is normally on the
/// broker by then too (`state: QUEUED`); if the broker is unreachable the
/// task stays `PENDING` and the relay publishes it as soon as it can.
#[utoipa::path(
    post,
    path = "/tasks/{task_type}",
    tag = "tasks",
    security(("api_key" = [])),
    params(("task_type" = String, Path, description = "A task type this deployment runs"), SubmitParams, ("Idempotency-Key" = Option<String>, Header, description = "Makes retrying this request safe: the same key and body return the same task")),
    request_body(content = Object, description = "The task's input", content_type = "application/json"),
    responses(
        (status = 202, description = "Recorded (and normally queued)", body = Submitted,
         headers(("Location" = String, description = "The task's status URL"))),
        (status = 400, description = "A malformed parameter", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task type, or no such task of the caller", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "The idempotency key was used for another request", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body exceeds api.max_body_bytes", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared as JSON", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 422, description = "The input is not valid for this task type, per field", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    Path(task_type): Path<String>,
    params: Result<Query<SubmitParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let entry = entry(&state, &task_type)?;
    let params = query(params)?;
    let key = idempotency_key(&headers)?;
    let input = json_body(&headers, body, state.settings.api.max_body_bytes)?;
    validate_input(entry, &input, "").map_err(ApiError::invalid_input)?;
    let now = Utc::now();
    let schedule = params.resolve(now)?;

    let mut new = new_task(&state, &caller, entry, &task_type, input, &schedule, now);
    let (row, replayed) = match key {
        None => (state.store.insert(&new).await?, false),
        Some(key) => {
            let fp = fingerprint(&task_type, &new.input, &schedule);
            new.idempotency_key = Some(key.clone());
            new.idempotency_fingerprint = Some(fp.clone());
            match state.store.insert_idempotent(&new).await? {
                Inserted::New(row) => (row, false),
                Inserted::Existing(row)
                    if row.idempotency_fingerprint.as_deref() == Some(fp.as_str()) =>
                {
                    (row, true)
                }
                Inserted::Existing(row) => {
                    return Err(ApiError::idempotency_key_reused(&key, row.id));
                }
            }
        }
    };
    if state.fail_points.hit(FailPoint::AfterCommitBeforePublish) {
        tracing::error!(task_id = %row.id, "fail point: dying between commit and publish");
        return Err(ApiError::internal(&std::io::Error::other(
            "fail point AfterCommitBeforePublish",
        )));
    }
    let task_state = if replayed {
        // Its first submission published it (or the relay will).
        state
            .store
            .get(row.id)
            .await?
            .map_or(row.state, |r| r.state)
    } else if publish_due(&state, std::slice::from_ref(&row))
        .await
        .is_empty()
    {
        row.state
    } else {
        TaskState::Queued
    };
    tracing::info!(task_id = %row.id, task = %task_type, state = %task_state, replayed, "task accepted");

    let body = Submitted::new(&row, task_state);
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&task_path(&task_type, row.id)) {
        headers.insert(header::LOCATION, v);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchBody {
    /// The tasks' inputs, each a JSON object (at most `api.max_batch`).
    #[schema(value_type = Vec<Object>, min_items = 1)]
    tasks: Vec<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchItem {
    id: Uuid,
    status_url: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchSubmitted {
    count: usize,
    /// How many are on the broker already; the rest are in the outbox
    /// (delayed, or the broker was unreachable) and follow by themselves.
    queued: usize,
    tasks: Vec<BatchItem>,
}

/// `POST /tasks/{type}/batch` with `{"tasks": [input, …]}`: many tasks in
/// one request and one transaction. All are valid or none is recorded.
#[utoipa::path(
    post,
    path = "/tasks/{task_type}/batch",
    tag = "tasks",
    security(("api_key" = [])),
    params(("task_type" = String, Path, description = "A task type this deployment runs"), SubmitParams),
    request_body(content = BatchBody, content_type = "application/json"),
    responses(
        (status = 202, description = "All recorded in one transaction", body = BatchSubmitted),
        (status = 400, description = "A malformed parameter", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task type, or no such task of the caller", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body exceeds api.max_body_bytes", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared as JSON", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Some task is invalid (fields named tasks[i].field); none was recorded", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn submit_batch(
    State(state): State<AppState>,
    caller: Caller,
    Path(task_type): Path<String>,
    params: Result<Query<SubmitParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let entry = entry(&state, &task_type)?;
    let params = query(params)?;
    let body = json_body(&headers, body, state.settings.api.max_body_bytes)?;
    let BatchBody { tasks } = serde_path_to_error::deserialize(&body).map_err(|e| {
        ApiError::invalid_input(ValidationErrors::single(
            e.path().to_string().trim_start_matches('.'),
            "invalid_type",
            format!(
                "the body must be {{\"tasks\": [input, ...]}}: {}",
                e.inner()
            ),
        ))
    })?;
    let max = state.settings.api.max_batch;
    if tasks.is_empty() || tasks.len() > max {
        return Err(ApiError::invalid_input(ValidationErrors::single(
            "tasks",
            "invalid_length",
            format!("a batch holds 1 to {max} tasks, got {}", tasks.len()),
        )));
    }
    let mut problems: Vec<FieldError> = Vec::new();
    for (i, input) in tasks.iter().enumerate() {
        if let Err(e) = validate_input(entry, input, &format!("tasks[{i}]")) {
            problems.extend(e.errors().iter().cloned());
        }
        if problems.len() >= MAX_REPORTED_ERRORS {
            problems.truncate(MAX_REPORTED_ERRORS);
            break;
        }
    }
    ValidationErrors::check(problems).map_err(ApiError::invalid_input)?;

    let now = Utc::now();
    let schedule = params.resolve(now)?;
    let new: Vec<NewTask> = tasks
        .into_iter()
        .map(|input| new_task(&state, &caller, entry, &task_type, input, &schedule, now))
        .collect();
    let rows = state.store.insert_many(&new).await?;
    let queued = publish_due(&state, &rows).await.len();
    tracing::info!(task = %task_type, count = rows.len(), queued, "batch accepted");
    let body = BatchSubmitted {
        count: rows.len(),
        queued,
        tasks: rows
            .iter()
            .map(|r| BatchItem {
                id: r.id,
                status_url: task_path(&task_type, r.id),
            })
            .collect(),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

// ----------------------------------------------------------------- reads

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Comma-separated states, e.g. `FAILURE,CANCELLED`.
    #[param(
        pattern = r"^(PENDING|QUEUED|STARTED|RETRY|SUCCESS|FAILURE|CANCELLED|EXPIRED)(,(PENDING|QUEUED|STARTED|RETRY|SUCCESS|FAILURE|CANCELLED|EXPIRED))*$"
    )]
    state: Option<String>,
    /// Only tasks created after this instant (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    created_after: Option<String>,
    /// Only tasks created before this instant (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    created_before: Option<String>,
    /// Page size, 50 by default.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Page<T> {
    items: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

fn page_size(limit: Option<u64>) -> Result<u64, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid_parameter(
            "limit",
            format!("limit must be 1 to {MAX_PAGE}"),
        )),
    }
}

fn encode_cursor(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(text)
}

fn decode_cursor(cursor: &str) -> Option<String> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

/// `GET /tasks/{type}`: the caller's tasks of that type, newest first.
#[utoipa::path(
    get,
    path = "/tasks/{task_type}",
    tag = "tasks",
    security(("api_key" = [])),
    params(("task_type" = String, Path, description = "A task type this deployment runs"), ListParams),
    responses(
        (status = 200, description = "The caller's tasks of this type, newest first", body = Page<TaskView>),
        (status = 400, description = "A malformed parameter", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task type, or no such task of the caller", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(task_type): Path<String>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page<TaskView>>, ApiError> {
    entry(&state, &task_type)?;
    let p = query(params)?;
    let limit = page_size(p.limit)?;
    let states = match &p.state {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|s| {
                TaskState::parse(s.trim()).ok_or_else(|| {
                    ApiError::invalid_parameter(
                        "state",
                        format!("unknown state `{s}`; states are {:?}", TaskState::ALL),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let after = match &p.cursor {
        None => None,
        Some(c) => {
            let bad = || ApiError::invalid_parameter("cursor", "not a cursor this API returned");
            let text = decode_cursor(c).ok_or_else(bad)?;
            let (micros, id) = text.split_once('.').ok_or_else(bad)?;
            let at = micros
                .parse::<i64>()
                .ok()
                .and_then(DateTime::from_timestamp_micros)
                .ok_or_else(bad)?;
            Some((at, Uuid::parse_str(id).map_err(|_| bad())?))
        }
    };
    let filter = ListFilter {
        states,
        created_after: p
            .created_after
            .as_deref()
            .map(|t| instant("created_after", t))
            .transpose()?,
        created_before: p
            .created_before
            .as_deref()
            .map(|t| instant("created_before", t))
            .transpose()?,
        after,
        limit,
    };
    let mut rows = state.store.list(&caller.owner, &task_type, &filter).await?;
    let more = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more.then(|| rows.last()).flatten().map(|last| {
        encode_cursor(&format!(
            "{}.{}",
            last.created_at.timestamp_micros(),
            last.id
        ))
    });
    Ok(Json(Page {
        items: rows.into_iter().map(|t| TaskView::new(t, None)).collect(),
        next_cursor,
    }))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct StatusParams {
    /// Wait up to this many seconds for the task to finish (at most
    /// `api.max_wait_seconds`, 60 by default).
    #[param(minimum = 0, maximum = 60)]
    wait: Option<f64>,
}

/// `GET /tasks/{type}/{id}`, optionally `?wait=<seconds>`: answers as soon
/// as the task has finished, or when the wait is over, whichever is first.
#[utoipa::path(
    get,
    path = "/tasks/{task_type}/{id}",
    tag = "tasks",
    security(("api_key" = [])),
    params(("task_type" = String, Path, description = "A task type this deployment runs"), ("id" = String, Path, description = "The task id"), StatusParams),
    responses(
        (status = 200, description = "The task's status", body = TaskView),
        (status = 400, description = "A malformed parameter", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task type, or no such task of the caller", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn status(
    State(state): State<AppState>,
    caller: Caller,
    Path((task_type, id)): Path<(String, String)>,
    params: Result<Query<StatusParams>, QueryRejection>,
) -> Result<Json<TaskView>, ApiError> {
    let p = query(params)?;
    let max = state.settings.api.max_wait_seconds as f64;
    let wait = match p.wait {
        None => None,
        Some(w) if (0.0..=max).contains(&w) => Some(Duration::from_secs_f64(w)),
        Some(_) => {
            return Err(ApiError::invalid_parameter(
                "wait",
                format!("wait must be 0 to {max} seconds"),
            ));
        }
    };
    let t = load(&state, &caller, &task_type, &id).await?;
    let Some(wait) = wait.filter(|_| !t.state.is_terminal()) else {
        return Ok(Json(view(&state, t).await?));
    };
    // Register, then look again: a finish in between is not missed.
    let registration = state.waiters.register(t.id);
    let t = load(&state, &caller, &task_type, &id).await?;
    if !t.state.is_terminal() {
        let _ = tokio::time::timeout(wait, registration.notify.notified()).await;
    }
    drop(registration);
    let t = load(&state, &caller, &task_type, &id).await?;
    Ok(Json(view(&state, t).await?))
}

/// `GET /tasks/{type}/{id}/result`: the task's output as the JSON body
/// (200) once it succeeded; 409 `result_not_ready` (with `Retry-After`)
/// while it has not finished; 409 `no_result` if it ended otherwise.
#[utoipa::path(
    get,
    path = "/tasks/{task_type}/{id}/result",
    tag = "tasks",
    security(("api_key" = [])),
    params(("task_type" = String, Path, description = "A task type this deployment runs"), ("id" = String, Path, description = "The task id")),
    responses(
        (status = 200, description = "The task's output, as it returned it", body = Value),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task type, or no such task of the caller", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not finished yet (result_not_ready, with Retry-After), or ended without a result (no_result)", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn result(
    State(state): State<AppState>,
    caller: Caller,
    Path((task_type, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let t = load(&state, &caller, &task_type, &id).await?;
    match t.state {
        TaskState::Success => Ok(Json(
            state.store.result_of(t.id).await?.unwrap_or(Value::Null),
        )),
        s if s.is_terminal() => Err(ApiError::no_result(s.as_str(), t.error)),
        s => Err(ApiError::result_not_ready(s.as_str())),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ErrorsParams {
    /// Page size, 50 by default.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ItemErrorView {
    /// Position of the item in the task's input list.
    index: i32,
    code: String,
    field: String,
    message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorsPage {
    /// Failed items in all.
    total: i64,
    items: Vec<ItemErrorView>,
    next_cursor: Option<String>,
}

/// `GET /tasks/{type}/{id}/errors`: the items of a batch task that failed,
/// in input order, with the same codes and messages a synchronous
/// validation of each gives.
#[utoipa::path(
    get,
    path = "/tasks/{task_type}/{id}/errors",
    tag = "tasks",
    security(("api_key" = [])),
    params(("task_type" = String, Path, description = "A task type this deployment runs"), ("id" = String, Path, description = "The task id"), ErrorsParams),
    responses(
        (status = 200, description = "Failed items, in input order", body = ErrorsPage),
        (status = 400, description = "A malformed parameter", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task type, or no such task of the caller", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn errors(
    State(state): State<AppState>,
    caller: Caller,
    Path((task_type, id)): Path<(String, String)>,
    params: Result<Query<ErrorsParams>, QueryRejection>,
) -> Result<Json<ErrorsPage>, ApiError> {
    let p = query(params)?;
    let limit = page_size(p.limit)?;
    let after = match &p.cursor {
        None => None,
        Some(c) => Some(
            decode_cursor(c)
                .and_then(|t| t.parse::<i32>().ok())
                .ok_or_else(|| {
                    ApiError::invalid_parameter("cursor", "not a cursor this API returned")
                })?,
        ),
    };
    let t = load(&state, &caller, &task_type, &id).await?;
    let mut rows = state.store.item_errors(t.id, after, limit).await?;
    let more = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last())
        .flatten()
        .map(|(i, _)| encode_cursor(&i.to_string()));
    Ok(Json(ErrorsPage {
        total: state.store.item_error_count(t.id).await?,
        items: rows
            .into_iter()
            .map(|(index, e)| ItemErrorView {
                index,
                code: e.code,
                field: e.field,
                message: e.message,
            })
            .collect(),
        next_cursor,
    }))
}

/// `GET /tasks/{type}/{id}/artifacts/{name}`: a file the task produced,
/// with its content type (a labels PDF is `application/pdf`).
#[utoipa::path(
    get,
    path = "/tasks/{task_type}/{id}/artifacts/{name}",
    tag = "tasks",
    security(("api_key" = [])),
    params(("task_type" = String, Path, description = "A task type this deployment runs"), ("id" = String, Path, description = "The task id"), ("name" = String, Path, description = "The artifact's name, as the task's status lists it")),
    responses(
        (status = 200, description = "The file, with its own content type (application/pdf for labels)", body = Vec<u8>, content_type = "*/*"),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task, or no such artifact of it", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn artifact(
    State(state): State<AppState>,
    caller: Caller,
    Path((task_type, id, name)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let t = load(&state, &caller, &task_type, &id).await?;
    let not_found = || ApiError::artifact_not_found(&name);
    if !warren_shared::artifacts::valid_name(&name) {
        return Err(not_found());
    }
    let a = state
        .artifacts
        .get(t.id, &name)
        .await?
        .ok_or_else(not_found)?;
    let mut response = a.data.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&a.meta.content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}\"", a.meta.name)) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

// --------------------------------------------------------------- control

/// `POST /tasks/{type}/{id}/cancel`: 200 when the task had not started (it
/// is CANCELLED and never runs); 202 when it is running (its worker tells
/// it to stop and it ends CANCELLED); 409 when it already finished.
#[utoipa::path(
    post,
    path = "/tasks/{task_type}/{id}/cancel",
    tag = "tasks",
    security(("api_key" = [])),
    params(("task_type" = String, Path, description = "A task type this deployment runs"), ("id" = String, Path, description = "The task id")),
    responses(
        (status = 200, description = "It had not started: CANCELLED, and it never runs", body = TaskView),
        (status = 202, description = "It is running: its worker tells it to stop", body = TaskView),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task type, or no such task of the caller", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "It already finished", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path((task_type, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    entry(&state, &task_type)?;
    let uuid = parse_id(&task_type, &id)?;
    let status = match state.store.cancel(uuid, &caller.owner, &task_type).await? {
        Cancellation::Cancelled => StatusCode::OK,
        Cancellation::Requested => StatusCode::ACCEPTED,
        Cancellation::AlreadyFinished(s) => return Err(ApiError::already_finished(s.as_str())),
        Cancellation::NotFound => return Err(ApiError::task_not_found(&task_type, &id)),
    };
    let t = load(&state, &caller, &task_type, &id).await?;
    Ok((status, Json(view(&state, t).await?)).into_response())
}

/// `POST /tasks/{type}/{id}/retry`: a task that ended FAILURE, CANCELLED or
/// EXPIRED runs again, attempts counted afresh (202); 409 otherwise.
#[utoipa::path(
    post,
    path = "/tasks/{task_type}/{id}/retry",
    tag = "tasks",
    security(("api_key" = [])),
    params(("task_type" = String, Path, description = "A task type this deployment runs"), ("id" = String, Path, description = "The task id")),
    responses(
        (status = 202, description = "Queued again, attempts counted afresh", body = TaskView),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such task type, or no such task of the caller", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "Only a task that ended FAILURE, CANCELLED or EXPIRED can be retried", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    Path((task_type, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    entry(&state, &task_type)?;
    let uuid = parse_id(&task_type, &id)?;
    let lease = chrono::Duration::from_std(state.settings.relay.lease()).unwrap_or_default();
    match state
        .store
        .retry(uuid, &caller.owner, &task_type, lease)
        .await?
    {
        Retry::Requeued(row) => {
            publish_due(&state, std::slice::from_ref(&row)).await;
        }
        Retry::NotRetryable(s) => return Err(ApiError::not_retryable(s.as_str())),
        Retry::NotFound => return Err(ApiError::task_not_found(&task_type, &id)),
    }
    let t = load(&state, &caller, &task_type, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&state, t).await?)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_are_found_wherever_they_hide() {
        let v = serde_json::json!({"a": "ok", "b": ["x", "y\u{0}"], "c": {"d": "\u{0}"}});
        let mut out = Vec::new();
        nul_problems(&v, "", &mut out);
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
