//! `/schedules`: periodic tasks made, listed (with their next runs),
//! paused, resumed and deleted over HTTP. Owner-scoped like `/tasks`: a
//! schedule's ticks are its owner's tasks, and a key sees and changes its
//! owner's schedules only (an admin key, every one, including those
//! `[schedules.*]` declares). Firing is the relays' (`shared::relay`).

use crate::{
    ApiError, AppState,
    auth::{Caller, Scope},
    openapi::Problem,
    routes::tasks::{json_body, validate_input},
};
use axum::{
    Json,
    body::Bytes,
    extract::{Path, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use warren_shared::{
    names,
    schedule::{Spec, SpecFields},
    store::{NewSchedule, ScheduleRow},
};
use warren_tasks::ValidationErrors;

/// Next runs a listing shows per schedule.
const NEXT_RUNS: usize = 5;
/// Longest schedule name.
const MAX_NAME: usize = 100;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(crate) struct SchedulePath {
    name: String,
}

/// `POST /schedules`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct NewScheduleBody {
    /// Letters, digits, `-`, `_`, `.`; at most 100.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,100}$")]
    name: String,
    /// The task type each tick submits.
    task: String,
    #[schema(value_type = Object)]
    input: Option<Value>,
    /// Five fields, or six with seconds first.
    cron: Option<String>,
    every_seconds: Option<f64>,
    /// IANA time zone; UTC by default.
    timezone: Option<String>,
    /// `skip`, `run_once` (default) or `run_all` (at most 100).
    missed: Option<String>,
    /// `allow` (default) or `skip` (while the previous run is unfinished).
    overlap: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ScheduleView {
    pub(crate) name: String,
    pub(crate) owner: String,
    pub(crate) task: String,
    #[schema(value_type = Object)]
    pub(crate) input: Value,
    pub(crate) cron: Option<String>,
    pub(crate) every_seconds: Option<f64>,
    pub(crate) timezone: String,
    pub(crate) missed: String,
    pub(crate) overlap: String,
    /// `config` (`[schedules.<name>]`) or `api`.
    pub(crate) source: String,
    pub(crate) paused: bool,
    /// The next ticks, the first one `next_at` (none while paused).
    pub(crate) next_runs: Vec<DateTime<Utc>>,
    pub(crate) last_tick_at: Option<DateTime<Utc>>,
    /// The task the last tick submitted.
    pub(crate) last_task_id: Option<uuid::Uuid>,
    /// Ticks that submitted a task, and ticks dropped by `missed`/`overlap`.
    pub(crate) fired: i64,
    pub(crate) skipped: i64,
}

impl From<ScheduleRow> for ScheduleView {
    fn from(r: ScheduleRow) -> Self {
        let mut next_runs = Vec::new();
        if let (false, Some(spec)) = (r.paused, r.spec()) {
            let mut at = Some(r.next_at);
            while let (Some(t), true) = (at, next_runs.len() < NEXT_RUNS) {
                next_runs.push(t);
                at = spec.next_after(t);
            }
        }
        Self {
            name: r.name,
            owner: r.owner,
            task: r.task_type,
            input: r.input,
            cron: r.cron,
            every_seconds: r.every_seconds,
            timezone: r.timezone,
            missed: r.missed,
            overlap: r.overlap,
            source: r.source,
            paused: r.paused,
            next_runs,
            last_tick_at: r.last_tick_at,
            last_task_id: r.last_task_id,
            fired: r.fired,
            skipped: r.skipped,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SchedulesView {
    schedules: Vec<ScheduleView>,
}

/// Whose schedules a caller sees: its owner's, or all for an admin.
pub(crate) fn scope(caller: &Caller) -> Option<&str> {
    match caller.scope {
        Scope::Admin => None,
        Scope::Owner => Some(&caller.owner),
    }
}

/// The body read as a schedule, every error a 422 naming its field.
fn read_body(state: &AppState, body: &Value) -> Result<(String, Spec), ApiError> {
    let one = |field: &str, code: &'static str, message: String| {
        ApiError::invalid_input(ValidationErrors::single(field, code, message))
    };
    let Some(Value::String(name)) = body.get("name") else {
        return Err(one("name", "required", "a schedule needs a name".into()));
    };
    // The document's pattern for `name` says the same; keep them together.
    if !names::is_plain_name(name, MAX_NAME) {
        return Err(one(
            "name",
            "invalid_name",
            format!("1 to {MAX_NAME} of {}", names::PLAIN_CHARS),
        ));
    }
    let mut fields = body.clone();
    if let Value::Object(map) = &mut fields {
        map.remove("name");
    }
    let fields: SpecFields =
        serde_json::from_value(fields).map_err(|e| one("", "invalid_schedule", e.to_string()))?;
    let spec = Spec::parse(&fields).map_err(|e| one(e.field, "invalid", e.message))?;
    let Some(entry) = state.catalog.get(&spec.task) else {
        return Err(one(
            "task",
            "unknown_task_type",
            format!("no task type {:?}", spec.task),
        ));
    };
    validate_input(entry, &spec.input, "input").map_err(ApiError::invalid_input)?;
    Ok((name.clone(), spec))
}

/// `POST /schedules`: a periodic task of the caller's owner.
#[utoipa::path(
    post,
    path = "/schedules",
    tag = "schedules",
    security(("api_key" = [])),
    request_body(content = NewScheduleBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Made; it fires from its next tick", body = ScheduleView),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body exceeds api.max_body_bytes", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared as JSON", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is wrong (named)", body = Problem, content_type = "application/problem+json"),
        crate::routes::tasks::CommonErrors,
    ),
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(&headers, body, state.settings.api.max_body_bytes)?;
    let (name, spec) = read_body(&state, &body)?;
    let Some(next_at) = spec.next_after(Utc::now()) else {
        return Err(ApiError::invalid_input(ValidationErrors::single(
            "cron",
            "never",
            "this schedule never fires",
        )));
    };
    let new = NewSchedule {
        name: &name,
        owner: &caller.owner,
        spec: &spec,
        next_at,
    };
    if !state.store.create_schedule(&new).await? {
        return Err(ApiError::schedule_exists(&name, "the name is taken"));
    }
    tracing::info!(schedule = %name, owner = %caller.owner, task = %spec.task, "schedule created");
    let row = state.store.schedule_named(&name, None).await?;
    let row = row.ok_or_else(|| ApiError::schedule_not_found(&name))?;
    let href = format!("/schedules/{name}");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, href)],
        Json(ScheduleView::from(row)),
    )
        .into_response())
}

/// `GET /schedules`: the caller's schedules with their next runs.
#[utoipa::path(
    get,
    path = "/schedules",
    tag = "schedules",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Schedules, by name", body = SchedulesView),
        crate::routes::tasks::CommonErrors,
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SchedulesView>, ApiError> {
    let rows = state.store.schedules(scope(&caller)).await?;
    Ok(Json(SchedulesView {
        schedules: rows.into_iter().map(Into::into).collect(),
    }))
}

/// `GET /schedules/{name}`.
#[utoipa::path(
    get,
    path = "/schedules/{name}",
    tag = "schedules",
    security(("api_key" = [])),
    params(SchedulePath),
    responses(
        (status = 200, description = "The schedule", body = ScheduleView),
        (status = 404, description = "No such schedule for this key", body = Problem, content_type = "application/problem+json"),
        crate::routes::tasks::CommonErrors,
    ),
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(SchedulePath { name }): Path<SchedulePath>,
) -> Result<Json<ScheduleView>, ApiError> {
    let row = state.store.schedule_named(&name, scope(&caller)).await?;
    Ok(Json(
        row.ok_or_else(|| ApiError::schedule_not_found(&name))?
            .into(),
    ))
}

/// `POST /schedules/{name}/pause`: no ticks until resumed.
#[utoipa::path(
    post,
    path = "/schedules/{name}/pause",
    tag = "schedules",
    security(("api_key" = [])),
    params(SchedulePath),
    responses(
        (status = 200, description = "Paused", body = ScheduleView),
        (status = 404, description = "No such schedule for this key", body = Problem, content_type = "application/problem+json"),
        crate::routes::tasks::CommonErrors,
    ),
)]
pub(crate) async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(SchedulePath { name }): Path<SchedulePath>,
) -> Result<Json<ScheduleView>, ApiError> {
    set_paused(&state, &caller, &name, true).await
}

/// `POST /schedules/{name}/resume`: from the next tick after now; what
/// fell due while paused is not caught up.
#[utoipa::path(
    post,
    path = "/schedules/{name}/resume",
    tag = "schedules",
    security(("api_key" = [])),
    params(SchedulePath),
    responses(
        (status = 200, description = "Resumed", body = ScheduleView),
        (status = 404, description = "No such schedule for this key", body = Problem, content_type = "application/problem+json"),
        crate::routes::tasks::CommonErrors,
    ),
)]
pub(crate) async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(SchedulePath { name }): Path<SchedulePath>,
) -> Result<Json<ScheduleView>, ApiError> {
    set_paused(&state, &caller, &name, false).await
}

async fn set_paused(
    state: &AppState,
    caller: &Caller,
    name: &str,
    paused: bool,
) -> Result<Json<ScheduleView>, ApiError> {
    let not_found = || ApiError::schedule_not_found(name);
    let row = state.store.schedule_named(name, scope(caller)).await?;
    let row = row.ok_or_else(not_found)?;
    let next_at = (!paused)
        .then(|| row.spec().and_then(|s| s.next_after(Utc::now())))
        .flatten();
    if !state
        .store
        .set_schedule_paused(name, scope(caller), paused, next_at)
        .await?
    {
        return Err(not_found());
    }
    tracing::info!(schedule = %name, paused, "schedule paused or resumed");
    let row = state.store.schedule_named(name, scope(caller)).await?;
    Ok(Json(row.ok_or_else(not_found)?.into()))
}

/// `DELETE /schedules/{name}`: one declared in configuration comes back
/// at the next start, so it is paused instead (409).
#[utoipa::path(
    delete,
    path = "/schedules/{name}",
    tag = "schedules",
    security(("api_key" = [])),
    params(SchedulePath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such schedule for this key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Declared in configuration: pause it, or remove it there", body = Problem, content_type = "application/problem+json"),
        crate::routes::tasks::CommonErrors,
    ),
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(SchedulePath { name }): Path<SchedulePath>,
) -> Result<StatusCode, ApiError> {
    let row = state.store.schedule_named(&name, scope(&caller)).await?;
    let row = row.ok_or_else(|| ApiError::schedule_not_found(&name))?;
    if row.source == "config" {
        return Err(ApiError::schedule_exists(
            &name,
            "declared in configuration: pause it, or remove it there",
        ));
    }
    if !state.store.delete_schedule(&name, scope(&caller)).await? {
        return Err(ApiError::schedule_not_found(&name));
    }
    tracing::info!(schedule = %name, "schedule deleted");
    Ok(StatusCode::NO_CONTENT)
}
