//! `/workflows`: chains, groups, chords and links submitted as one JSON
//! document (`shared::workflow` reads and plans it), read back with every
//! step's state, cancelled. Owner-scoped like `/tasks`: the workflow and
//! every task it starts belong to the caller's owner.

use crate::{
    ApiError, AppState,
    auth::Caller,
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
use uuid::Uuid;
use warren_shared::{
    settings::Runner,
    store::{StepRow, WorkflowRow},
    workflow::{self, Plan, SpecError},
};
use warren_tasks::{FieldError, ValidationErrors};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(crate) struct WorkflowPath {
    /// The workflow's id.
    id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StepView {
    task_id: Uuid,
    /// Where it sits in the submitted document (`chord[3]`, `body`, `chain[1].link[0]`).
    path: String,
    task_type: String,
    /// `WAITING` (not started: waits on another step), `SKIPPED` (never
    /// will: the workflow failed or was cancelled), or its task's state.
    state: String,
    /// The task it starts after (on that task's failure if `on_failure`).
    after_task: Option<Uuid>,
    on_failure: bool,
    /// The group (join) it starts after.
    after_group: Option<Uuid>,
    /// The group it is a member of, and its position there.
    group: Option<Uuid>,
    group_index: Option<i32>,
    attempts: Option<i32>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    /// `GET` this for the step's task (once started).
    href: String,
}

impl From<StepRow> for StepView {
    fn from(s: StepRow) -> Self {
        let state = match (s.step_state.as_str(), s.task_state) {
            ("RELEASED", Some(task)) => task,
            (other, _) => other.to_owned(),
        };
        Self {
            href: format!("/tasks/{}/{}", s.task_type, s.task_id),
            task_id: s.task_id,
            path: s.path,
            task_type: s.task_type,
            state,
            after_task: s.after_task,
            on_failure: s.on_failure,
            after_group: s.after_join,
            group: s.join_id,
            group_index: s.join_index,
            attempts: s.attempts,
            started_at: s.started_at,
            finished_at: s.finished_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WorkflowView {
    id: Uuid,
    /// `RUNNING`, `SUCCESS`, `FAILURE` or `CANCELLED`.
    state: String,
    /// `api` or `celery` (a Celery client's canvas).
    origin: String,
    /// The last step's result; a group's list of results, in order.
    result: Option<Value>,
    /// The failed step (`step`, `task_id`, `task_type`, `state`) and its error.
    error: Option<Value>,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    step_count: i64,
    steps: Vec<StepView>,
}

impl WorkflowView {
    pub(crate) fn new(w: WorkflowRow, steps: Vec<StepRow>) -> Self {
        Self {
            id: w.id,
            state: w.state,
            origin: w.origin,
            result: w.result,
            error: w.error,
            created_at: w.created_at,
            finished_at: w.finished_at,
            step_count: w.steps,
            steps: steps.into_iter().map(StepView::from).collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WorkflowSubmitted {
    id: Uuid,
    state: String,
    step_count: usize,
    href: String,
}

/// `POST /workflows`: a chain, group, chord or task with links, as one
/// document. The whole plan is recorded before the answer; the steps that
/// wait for nothing start at once.
#[utoipa::path(
    post,
    path = "/workflows",
    tag = "workflows",
    security(("api_key" = [])),
    request_body(content = Object, description = "A node: `{\"task\", \"input\", \"result_as\", \"error_as\", \"link\", \"link_error\"}`, `{\"chain\": [nodes]}`, `{\"group\": [nodes]}` or `{\"chord\": [nodes], \"body\": node, \"allow_failures\": false}`"),
    responses(
        (status = 202, description = "Recorded; the first steps are on their way", body = WorkflowSubmitted),
        (status = 400, description = "The body is not JSON", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared as JSON", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 422, description = "The document or a step's input is invalid; each error names its path", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let spec = json_body(&headers, body, state.settings.api.max_body_bytes)?;
    let plan = workflow::parse(&spec)
        .and_then(|root| workflow::plan(&root, state.catalog.as_ref()))
        .map_err(|e| ApiError::invalid_input(spec_errors(e)))?;
    check_steps(&state, &plan).map_err(ApiError::invalid_input)?;
    let id = Uuid::now_v7();
    state
        .store
        .submit_workflow(id, Some(&caller.owner), &spec, &plan)
        .await?;
    tracing::info!(workflow_id = %id, owner = %caller.owner, steps = plan.steps.len(), "workflow submitted");
    let href = format!("/workflows/{id}");
    let body = WorkflowSubmitted {
        id,
        state: "RUNNING".into(),
        step_count: plan.steps.len(),
        href: href.clone(),
    };
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, href)], Json(body)).into_response())
}

fn spec_errors(e: SpecError) -> ValidationErrors {
    ValidationErrors::single(e.path, e.code, e.message)
}

/// Every step's type runs on Warren workers, and the input of every step
/// that is given nothing is valid now, not at run time.
fn check_steps(state: &AppState, plan: &Plan) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    for step in &plan.steps {
        let Some(entry) = state.catalog.get(&step.task_type) else {
            continue;
        };
        if entry.runner == Runner::Celery {
            errors.push(FieldError::new(
                format!("{}.task", step.path),
                "unsupported",
                format!(
                    "`{}` runs on Celery workers; workflow steps run on Warren's",
                    step.task_type
                ),
            ));
        } else if step.takes == "nothing"
            && let Err(e) = validate_input(entry, &step.input, &format!("{}.input", step.path))
        {
            errors.extend(e.errors().iter().cloned());
        }
        if errors.len() >= 100 {
            break;
        }
    }
    ValidationErrors::check(errors)
}

async fn load(state: &AppState, caller: &Caller, id: &str) -> Result<WorkflowView, ApiError> {
    let not_found = || ApiError::workflow_not_found(id);
    let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
    let row = state
        .store
        .workflow(uuid, caller.owners())
        .await?
        .ok_or_else(not_found)?;
    let steps = state.store.workflow_steps(uuid).await?;
    Ok(WorkflowView::new(row, steps))
}

/// `GET /workflows/{id}`: the workflow and every step's state.
#[utoipa::path(
    get,
    path = "/workflows/{id}",
    tag = "workflows",
    params(WorkflowPath),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The workflow", body = WorkflowView),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such workflow for this key", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn status(
    State(state): State<AppState>,
    caller: Caller,
    Path(WorkflowPath { id }): Path<WorkflowPath>,
) -> Result<Json<WorkflowView>, ApiError> {
    load(&state, &caller, &id).await.map(Json)
}

/// `POST /workflows/{id}/cancel`: nothing more starts; started tasks are
/// cancelled (a running one is asked to stop). A finished workflow is
/// left as it is.
#[utoipa::path(
    post,
    path = "/workflows/{id}/cancel",
    tag = "workflows",
    params(WorkflowPath),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The workflow after the cancel", body = WorkflowView),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such workflow for this key", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(WorkflowPath { id }): Path<WorkflowPath>,
) -> Result<Json<WorkflowView>, ApiError> {
    let not_found = || ApiError::workflow_not_found(&id);
    let uuid = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let after = state.store.cancel_workflow(uuid, caller.owners()).await?;
    if after.is_none() {
        return Err(not_found());
    }
    tracing::info!(workflow_id = %uuid, owner = %caller.owner, "workflow cancel requested");
    load(&state, &caller, &id).await.map(Json)
}
