//! The dashboard, `/ui`: what a person watches and does, served by the API
//! itself. Server-rendered HTML (maud), one small script of our own for
//! live parts (SSE) and local times, SVG charts drawn here; every asset is
//! compiled into the binary and the Content-Security-Policy allows nothing
//! from elsewhere.
//!
//! It is a second face of the same API, not a second API: every page is
//! owner-scoped by the same [`Caller`](crate::auth::Caller) (a session
//! stands for the key it signed in with), reads go through the same store
//! functions, and actions call the same code as their REST routes.
//!
//! - `session`: sign-in with an API key, the session cookie, CSRF tokens;
//! - `layout`: the page shell and the small pieces every page uses;
//! - `chart`: line charts and sparklines as inline SVG;
//! - `live`: server-sent events that re-render a fragment when it changes;
//! - `tasks`: task types (with their limits and pauses), listings, a
//!   task's detail, cancel and retry;
//! - `workflows`: the newest workflows, one as a tree;
//! - `schedules`: schedules with their next runs;
//! - `ops`: overview, workers, queues, dead letters, releases;
//! - `reference`: `/docs`, the HTTP API's reference, for anyone.

use crate::{ApiError, AppState};
use axum::{
    Router,
    extract::{Path, Request},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
    routing::get,
};

mod chart;
mod layout;
mod live;
mod ops;
mod reference;
mod schedules;
pub(crate) mod session;
mod tasks;
mod workflows;

pub(crate) use ops::{QueueHistory, sample_queues};

/// Everything under `/ui`, and `/` sending a person there.
pub(crate) fn router() -> Router<AppState> {
    let pages = Router::new()
        .route("/ui", get(ops::overview))
        .route("/ui/login", get(session::login_form).post(session::login))
        .route("/ui/logout", axum::routing::post(session::logout))
        .route("/ui/tasks", get(tasks::types))
        .route("/ui/tasks/{task_type}", get(tasks::list))
        .route("/ui/tasks/{task_type}/{id}", get(tasks::detail))
        .route(
            "/ui/tasks/{task_type}/{id}/cancel",
            get(tasks::confirm_cancel).post(tasks::cancel),
        )
        .route(
            "/ui/tasks/{task_type}/{id}/retry",
            get(tasks::confirm_retry).post(tasks::retry),
        )
        .route(
            "/ui/tasks/{task_type}/{id}/artifacts/{name}",
            get(tasks::artifact),
        )
        .route("/ui/workflows", get(workflows::list))
        .route("/ui/workflows/{id}", get(workflows::detail))
        .route("/ui/schedules", get(schedules::list))
        .route("/ui/workers", get(ops::workers))
        .route("/ui/queues", get(ops::queues))
        .route("/ui/dead-letters", get(ops::dead_letters))
        .route(
            "/ui/dead-letters/requeue",
            axum::routing::post(ops::requeue),
        )
        .route("/ui/releases", get(ops::releases))
        .route("/ui/live/overview", get(ops::live_overview))
        .route("/ui/live/tasks/{task_type}", get(tasks::live_list))
        .route("/ui/live/tasks/{task_type}/{id}", get(tasks::live_detail))
        .route("/ui/live/workers", get(ops::live_workers))
        .route("/ui/live/queues", get(ops::live_queues))
        .route("/ui/assets/{name}", get(asset))
        .route("/docs", get(reference::page))
        .layer(axum::middleware::from_fn(protect));
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui") }))
        .merge(pages)
}

/// What every dashboard answer carries: nothing may load from elsewhere,
/// no script but ours, no framing, no referrer, and pages are not cached.
async fn protect(request: Request, next: Next) -> Response {
    let is_asset = request.uri().path().starts_with("/ui/assets/");
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                 connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        );
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !is_asset && !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

const APP_CSS: &str = include_str!("assets/app.css");
const APP_JS: &str = include_str!("assets/app.js");
const FAVICON: &str = include_str!("assets/favicon.svg");

/// The embedded assets; their URLs carry the version, so they may be cached.
async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "favicon.svg" => (FAVICON, "image/svg+xml"),
        _ => return UiError::Api(ApiError::route_not_found(&name)).into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}

/// A query string, refused as a page naming what was wrong.
pub(crate) struct UiQuery<T>(pub(crate) T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for UiQuery<T>
{
    type Rejection = UiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(q)| UiQuery(q))
            .map_err(|e| UiError::Api(ApiError::invalid_parameter("query", e.body_text())))
    }
}

/// A form body, refused as a page naming what was wrong.
pub(crate) struct UiForm<T>(pub(crate) T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for UiForm<T> {
    type Rejection = UiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::Form::<T>::from_request(request, state)
            .await
            .map(|axum::Form(f)| UiForm(f))
            .map_err(|e| UiError::Api(ApiError::invalid_parameter("form", e.body_text())))
    }
}

/// Why a dashboard request did not get its page.
#[derive(Debug)]
pub(crate) enum UiError {
    /// No valid session: to the sign-in form, and back here afterwards.
    SignIn { next: String },
    /// What the API would have answered, as a page.
    Api(ApiError),
    /// A form without this session's CSRF token (stale, or forged).
    Csrf,
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> Self {
        UiError::Api(e)
    }
}

impl From<warren_shared::store::StoreError> for UiError {
    fn from(e: warren_shared::store::StoreError) -> Self {
        UiError::Api(e.into())
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        match self {
            UiError::SignIn { next } => {
                Redirect::to(&format!("/ui/login?next={}", layout::encode(&next))).into_response()
            }
            UiError::Csrf => layout::error_page(
                StatusCode::FORBIDDEN,
                "Form expired",
                "This form was not sent from a page of this session. Reload the page and try again.",
            ),
            UiError::Api(e) => {
                let status = e.status();
                if status.is_server_error() {
                    tracing::warn!(code = %e.code().as_str(), detail = e.detail(), "dashboard page failed");
                }
                layout::error_page(status, e.title(), e.detail())
            }
        }
    }
}
