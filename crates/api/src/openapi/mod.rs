//! The OpenAPI 3.1 document, generated from the handlers and their types
//! (utoipa), served at `/openapi.json`; `ui::reference` renders it at `/docs`.

use crate::routes::{health, ops, pauses, schedules, tasks, webhooks, workflows};
use axum::{body::Bytes, extract::State, http::header::CONTENT_TYPE, response::IntoResponse};
use serde::Serialize;
use std::sync::OnceLock;
use utoipa::{
    Modify, OpenApi, ToSchema,
    openapi::{
        RefOr,
        link::Link,
        path::Operation,
        schema::{Object, ObjectBuilder, Type},
        security::{Http, HttpAuthScheme, SecurityScheme},
    },
};
use warren_shared::{catalog::Catalog, settings::ApiSettings};

mod task_types;

pub(crate) use task_types::is_path_segment as has_own_path;

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
        (name = "task types", description = "One path per task type this deployment runs: POST with that type's input schema, GET its listing"),
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
/// types it runs, each has its own submission with its input's schema,
/// and `?wait=` goes up to the configured `api.max_wait_seconds`.
pub fn document(catalog: &Catalog, api: &ApiSettings) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    let task_type = one_of(catalog.task_types().collect());
    let wait = ObjectBuilder::new()
        .schema_type(Type::Number)
        .minimum(Some(0))
        .maximum(Some(api.max_wait_seconds))
        .build();
    for item in doc.paths.paths.values_mut() {
        set_schemas(
            [&mut item.get, &mut item.post],
            &[("task_type", &task_type), ("wait", &wait)],
        );
    }
    add_links(&mut doc);
    pause_targets(&mut doc, catalog);
    task_types::add(&mut doc, catalog);
    doc
}

/// A string that is one of `values`.
fn one_of(values: Vec<&str>) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .build()
}

/// Gives each parameter of `operations` named in `schemas` that schema.
fn set_schemas<const N: usize>(
    operations: [&mut Option<Operation>; N],
    schemas: &[(&str, &Object)],
) {
    for op in operations.into_iter().flatten() {
        for p in op.parameters.iter_mut().flatten() {
            if let RefOr::T(p) = p
                && let Some((_, schema)) = schemas.iter().find(|(name, _)| *name == p.name)
            {
                p.schema = Some((*schema).clone().into());
            }
        }
    }
}

/// `PUT`/`DELETE /pauses/{kind}/{name}`: `kind` is `type` or `queue`, and
/// `name` one of this deployment's task types or queues (which of the two
/// the kind says; a name of the other kind is a 404).
fn pause_targets(doc: &mut utoipa::openapi::OpenApi, catalog: &Catalog) {
    let Some(item) = doc.paths.paths.get_mut("/pauses/{kind}/{name}") else {
        return;
    };
    let names: std::collections::BTreeSet<&str> = catalog
        .task_types()
        .chain(catalog.topology().queues())
        .collect();
    let (kind, name) = (
        one_of(vec!["type", "queue"]),
        one_of(names.into_iter().collect()),
    );
    set_schemas(
        [&mut item.put, &mut item.delete],
        &[("kind", &kind), ("name", &name)],
    );
}

/// A `POST` whose answer (`status`) leads to operations `to`: link name,
/// path, method.
struct Leads {
    from: &'static str,
    status: &'static str,
    to: &'static [(&'static str, &'static str, &'static str)],
}

/// What a created resource leads to, as OpenAPI links: a client (or a
/// generator such as Schemathesis) follows a `202` to the task's own
/// operations with the id it returned, instead of guessing ids.
/// `operationRef`, not `operationId`: utoipa names operations after their
/// functions, and `submit` is two of them.
const LINKS: &[Leads] = &[
    Leads {
        from: "/tasks/{task_type}",
        status: "202",
        to: &[
            ("status", "/tasks/{task_type}/{id}", "get"),
            ("result", "/tasks/{task_type}/{id}/result", "get"),
            ("errors", "/tasks/{task_type}/{id}/errors", "get"),
            ("cancel", "/tasks/{task_type}/{id}/cancel", "post"),
            ("retry", "/tasks/{task_type}/{id}/retry", "post"),
            ("deliveries", "/tasks/{task_type}/{id}/deliveries", "get"),
        ],
    },
    Leads {
        from: "/workflows",
        status: "202",
        to: &[
            ("status", "/workflows/{id}", "get"),
            ("cancel", "/workflows/{id}/cancel", "post"),
        ],
    },
    Leads {
        from: "/schedules",
        status: "201",
        to: &[
            ("show", "/schedules/{name}", "get"),
            ("pause", "/schedules/{name}/pause", "post"),
            ("resume", "/schedules/{name}/resume", "post"),
            ("delete", "/schedules/{name}", "delete"),
        ],
    },
];

fn add_links(doc: &mut utoipa::openapi::OpenApi) {
    for leads in LINKS {
        let links: Vec<(&str, Link)> = leads
            .to
            .iter()
            .map(|(name, to, verb)| (*name, link(to, verb)))
            .collect();
        let response = doc
            .paths
            .paths
            .get_mut(leads.from)
            .and_then(|item| item.post.as_mut())
            .and_then(|op| op.responses.responses.get_mut(leads.status));
        if let Some(RefOr::T(response)) = response {
            for (name, link) in links {
                response.links.insert(name.to_owned(), RefOr::T(link));
            }
        }
    }
}

/// Where a link's path parameters come from: the request's type, the
/// answer's id or name.
const LINK_PARAMETERS: [(&str, &str); 3] = [
    ("{task_type}", "$request.path.task_type"),
    ("{id}", "$response.body#/id"),
    ("{name}", "$response.body#/name"),
];

/// A link to `verb` `to`, each of its path parameters fed.
fn link(to: &str, verb: &str) -> Link {
    let pointer = to.replace('~', "~0").replace('/', "~1");
    let mut link = Link::builder().operation_ref(format!("#/paths/{pointer}/{verb}"));
    for (param, source) in LINK_PARAMETERS {
        if to.contains(param) {
            link = link.parameter(param.trim_matches(['{', '}']), source);
        }
    }
    link.build()
}

/// The document as served, made on first use and kept: it depends only on
/// the catalog and settings, fixed for the process's life, and building
/// and serialising it (some 150 KB) costs far more than any other request
/// anyone may send without a key.
#[derive(Default)]
pub struct Served {
    json: OnceLock<Bytes>,
    page: OnceLock<String>,
}

impl Served {
    fn json(&self, state: &crate::AppState) -> Bytes {
        let json = self.json.get_or_init(|| {
            let doc = document(&state.catalog, &state.settings.api);
            // Serialising a document of our own types cannot fail.
            serde_json::to_vec(&doc)
                .map(Bytes::from)
                .unwrap_or_default()
        });
        json.clone()
    }

    /// `/docs`'s body, rendered by `render` from the served JSON once.
    pub(crate) fn page(
        &self,
        state: &crate::AppState,
        render: impl FnOnce(&serde_json::Value) -> String,
    ) -> &str {
        self.page.get_or_init(|| {
            let doc = serde_json::from_slice(&self.json(state)).unwrap_or_default();
            render(&doc)
        })
    }
}

pub(crate) async fn openapi_json(State(state): State<crate::AppState>) -> impl IntoResponse {
    let json = state.openapi.json(&state);
    ([(CONTENT_TYPE, "application/json")], json)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document says this deployment's `?wait=` bound, which the API
    /// enforces, not the default's.
    #[test]
    fn the_wait_bound_is_the_configured_one() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let vars = std::collections::HashMap::from([
            ("WARREN_ENV".to_owned(), "test".to_owned()),
            ("WARREN_API__MAX_WAIT_SECONDS".to_owned(), "7".to_owned()),
        ]);
        let settings = warren_shared::settings::Settings::load_from(&dir, &vars).unwrap();
        let catalog = Catalog::new(&warren_tasks::Registry::builtin(), &settings).unwrap();
        let doc = serde_json::to_value(document(&catalog, &settings.api)).unwrap();
        let params = &doc["paths"]["/tasks/{task_type}/{id}"]["get"]["parameters"];
        let wait = params
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "wait")
            .unwrap();
        assert_eq!(wait["schema"]["maximum"], 7, "{wait}");
        assert_eq!(wait["schema"]["minimum"], 0, "{wait}");
    }

    /// A pause names one of this deployment's types or queues, and the
    /// document lists them, as it lists the task types.
    #[test]
    fn pause_targets_are_the_deployments_types_and_queues() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let vars = std::collections::HashMap::from([("WARREN_ENV".to_owned(), "test".to_owned())]);
        let settings = warren_shared::settings::Settings::load_from(&dir, &vars).unwrap();
        let catalog = Catalog::new(&warren_tasks::Registry::builtin(), &settings).unwrap();
        let doc = serde_json::to_value(document(&catalog, &settings.api)).unwrap();
        for method in ["put", "delete"] {
            let params = doc["paths"]["/pauses/{kind}/{name}"][method]["parameters"]
                .as_array()
                .unwrap()
                .clone();
            let schema =
                |name: &str| params.iter().find(|p| p["name"] == name).unwrap()["schema"].clone();
            assert_eq!(schema("kind")["enum"], serde_json::json!(["type", "queue"]));
            let names = schema("name")["enum"].as_array().unwrap().clone();
            let queue = catalog.topology().queues().into_iter().next().unwrap();
            for known in ["multiply", "sleep", queue] {
                assert!(names.contains(&known.into()), "{known} in {names:?}");
            }
            assert_eq!(
                names.len(),
                catalog.task_types().count() + catalog.topology().queues().len(),
                "{names:?}"
            );
        }
    }

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
