//! # warren-worker
//!
//! Consumes task messages and turns each into exactly one recorded outcome.
//! Per delivery: decode (garbage is dead-lettered with a reason), claim the
//! task in PostgreSQL (a duplicate or finished task is acknowledged without
//! running), run it under its time limits, commit the outcome, and only then
//! acknowledge. A retry is written back to the outbox with its due time and
//! acknowledged: it waits in PostgreSQL, never in worker memory.
//!
//! Layout:
//! - [`Worker`] (`app`): wiring: database, catalog, publisher, relay.
//! - `consumer`: the connection loop: reconnect with backoff, prefetch as
//!   slots, graceful shutdown.
//! - `handler`: one delivery from decode to ack, as named steps
//!   (prepare → claim → run → decide → record → settle); a panic in any
//!   of them still settles the delivery.
//! - `decide`: what an ended attempt means (retry, fail, dead-letter), a
//!   pure function of policy and outcome.
//! - claims and successes go through `warren_shared::batch` (group
//!   commit): concurrent handlers share one statement per round trip.
//! - `acks`: acknowledgements per channel, the settled prefix in one
//!   `multiple` frame, never ahead of the commit.
//! - `execute`: running a task with soft/hard time limits, panics caught.
//! - `services`: what a running task can ask of the worker (progress, item
//!   outcomes, artifacts), over PostgreSQL; cancellation of running tasks.
//! - [`dead_letters`]: re-exported from `warren-shared`, for the operator CLI.
//! - `remote`: results of the types Python Celery workers run (`runner =
//!   "celery"`), read from Warren's reply queue and recorded like a
//!   Warren worker's outcomes.
//! - `metrics`: what a replica counts, served with `/healthz` and `/readyz`
//!   on `worker.metrics_listen`; heartbeats for `GET /workers`.
//!
//! This crate is the only one that acknowledges deliveries. It serves no
//! HTTP API and knows nothing of how tasks were submitted.

mod acks;
mod app;
mod consumer;
pub use warren_shared::dead_letters;
mod decide;
mod events;
mod execute;
mod handler;
mod metrics;
mod pidbox;
mod remote;
mod replies;
mod services;

pub use app::{Health, Worker, WorkerError};
