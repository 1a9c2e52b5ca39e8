//! # warren-api
//!
//! The HTTP front door. `POST /tasks/{type}` validates the input with the
//! task's own code, records the task in PostgreSQL (that is what `202`
//! promises), publishes it with a publisher confirm, and answers with the
//! task id. Read endpoints serve status and results from PostgreSQL. A relay
//! publishes whatever was recorded but not confirmed.
//!
//! Layout:
//! - [`startup`]: [`Application::build`] binds (port 0 works) and
//!   [`router`] assembles routes and middleware, separately so tests can
//!   drive either.
//! - `serve`: the accept loop, hyper with a deadline for a request's head
//!   and small per-connection buffers.
//! - [`state`]: [`AppState`], everything handlers share.
//! - [`error`]: [`ApiError`], the one error type; RFC 9457 problem+json.
//! - [`auth`]: API keys and the [`auth::Caller`] extractor that scopes
//!   every request to the key's owner.
//! - `routes/`: one module per resource.
//! - `ui`: the dashboard under `/ui`, HTML for people, scoped and served by
//!   the same code as the routes.
//! - [`waiters`]: long-polling, woken by PostgreSQL notifications.
//! - [`openapi`]: the OpenAPI 3.1 document generated from the handlers.
//! - [`metrics`]: what the API counts, at `/metrics`.
//! - [`fail`]: fail points that tests arm to simulate a crash mid-request.
//!
//! The API never acknowledges a task's delivery and never runs a task; it is the
//! only crate that knows about HTTP.

pub mod auth;
pub mod error;
pub mod fail;
pub mod limits;
pub mod metrics;
pub mod openapi;
mod routes;
mod serve;
pub mod startup;
pub mod state;
mod ui;
pub mod waiters;

pub use error::ApiError;
pub use startup::{Application, StartupError, router};
pub use state::AppState;
