//! The OpenAPI 3.1 document, generated from the handlers and their types
//! (utoipa), served at `/openapi.json`; `ui::reference` renders it at `/docs`.

use crate::routes::{health, ops, pauses, schedules, tasks, webhooks, workflows};
use axum::{Json, extract::State, response::IntoResponse};
use serde::Serialize;
use utoipa::{
    Modify, OpenApi, ToSchema,
    openapi::{
        RefOr, Schema,
        schema::{ObjectBuilder, Type},
        security::{Http, HttpAuthScheme, SecurityScheme},
    },
};
use warren_shared::catalog::Catalog;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Warren",
        description = "Submit slow work, get `202` and a task id at once, then read status, progress, \
            per-item errors, results and artifacts. Every `/tasks` request needs `Authorization: Bearer <key>`; \
            a key sees only its owner's tasks. Errors are RFC 9457 problem documents with a stable `code`.",
    ),
    paths(
        tasks::submit::submit,
        tasks::submit::submit_batch,
        tasks::read::list,
        tasks::read::status,
        tasks::read::result,
        tasks::read::errors,
        tasks::read::artifact,
        tasks::control::cancel,
        tasks::control::retry,
        tasks::deliveries::list,
        tasks::deliveries::redeliver,
        webhooks::create,
        webhooks::list,
        workflows::submit,
        workflows::status,
        workflows::cancel,
        ops::workers,
        ops::queues,
        pauses::list,
        pauses::pause,
        pauses::resume,
        schedules::create,
        schedules::list,
        schedules::show,
        schedules::pause,
        schedules::resume,
        schedules::delete,
        health::healthz,
        health::readyz,
    ),
    components(schemas(Problem, ProblemFieldError, TaskState)),
    modifiers(&BearerKeys),
    tags(
        (name = "tasks", description = "Submitting and following tasks"),
        (name = "webhooks", description = "Signing secrets, and each task's deliveries to its callback_url"),
        (name = "workflows", description = "Chains, groups, chords and links: tasks that start each other"),
        (name = "schedules", description = "Periodic tasks: cron (with seconds) or intervals, fired once per tick across replicas"),
        (name = "operations", description = "Live workers and queue depths, for operators"),
        (name = "health", description = "For load balancers and orchestrators"),
    ),
)]
pub struct ApiDoc;

/// An RFC 9457 problem document; more members may follow (`state`,
/// `parameter`, `limit_bytes`, …) depending on the `code`.
#[derive(Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// Stable, machine-readable.
    pub code: String,
    pub detail: String,
    /// For `invalid_input`: what is wrong, per field.
    pub errors: Option<Vec<ProblemFieldError>>,
}

#[derive(Serialize, ToSchema)]
pub struct ProblemFieldError {
    /// Dotted path (`x`, `tasks[3].x`, `beneficiaries[7].iban`); empty for the whole input.
    pub field: String,
    pub code: String,
    pub message: String,
}

/// A task's state.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    Pending,
    Queued,
    Started,
    Retry,
    Success,
    Failure,
    Cancelled,
    Expired,
}

struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document for this deployment: `task_type` is the list of task
/// types it runs.
pub fn document(catalog: &Catalog) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    let types: Vec<&str> = catalog.task_types().collect();
    let schema = || -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(types.clone()))
            .into()
    };
    for item in doc.paths.paths.values_mut() {
        let operations = [&mut item.get, &mut item.post];
        for op in operations.into_iter().flatten() {
            for p in op.parameters.iter_mut().flatten() {
                if let RefOr::T(p) = p
                    && p.name == "task_type"
                {
                    p.schema = Some(schema());
                }
            }
        }
    }
    doc
}

pub(crate) async fn openapi_json(State(state): State<crate::AppState>) -> impl IntoResponse {
    Json(document(&state.catalog))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented states are exactly the states.
    #[test]
    fn documented_states_match() {
        let documented: Vec<String> = [
            TaskState::Pending,
            TaskState::Queued,
            TaskState::Started,
            TaskState::Retry,
            TaskState::Success,
            TaskState::Failure,
            TaskState::Cancelled,
            TaskState::Expired,
        ]
        .iter()
        .map(|s| {
            serde_json::to_value(s)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
        let actual: Vec<&str> = warren_shared::state::TaskState::ALL
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(documented, actual);
    }
}
