//! # warren-shared
//!
//! What api and worker both need and neither owns: the vocabulary and the
//! plumbing of a Warren deployment.
//!
//! - [`settings`]: layered configuration, validated, errors naming the key.
//! - [`catalog`]: the task registry joined with configuration (queue and
//!   policy per task type).
//! - [`envelope`]: the task message, Celery protocol v2 on the wire.
//! - [`topology`]: exchange and queue names, idempotent declaration.
//! - [`broker`]: named connections and a confirming, self-healing publisher.
//! - [`management`]: RabbitMQ's management API: queue depths, the work queues' policy.
//! - [`db`]: sea-orm connection, entities, migrations.
//! - [`batch`]: group commit, many callers' writes as one statement.
//! - [`store`]: the task state machine as guarded SQL statements; item
//!   outcomes, progress, listings.
//! - [`dead_letters`]: the dead-letter queue for operators: list, requeue.
//! - [`artifacts`]: files tasks produce, behind an interface (PostgreSQL now).
//! - [`relay`]: the outbox relay (recorded → published, delays, retries),
//!   and admission (held → outbox, under each type's caps and rates).
//! - [`retention`]: finished tasks and workflows deleted when old, in
//!   small batches.
//! - [`schedule`]: periodic tasks (cron with seconds, intervals, time
//!   zones, missed-tick and overlap policies), fired once per tick.
//! - [`admission`]: a type's limits (concurrency keys, rate limits) and
//!   their arithmetic.
//! - [`webhooks`]: completion webhooks: callback targets checked (SSRF),
//!   signing secrets, the sender of durable deliveries.
//! - [`state`], [`codes`]: task states and stable error codes.
//! - [`names`]: the one character set of plain names (queues,
//!   schedules, artifacts, task types in URLs).
//! - [`telemetry`], [`shutdown`]: logging setup and signal handling.
//! - [`error_tracking`]: Sentry events for failed tasks, panics and dead
//!   letters (off without a DSN).
//! - [`probe`]: the `healthcheck` subcommands' HTTP probe.
//! - [`metrics`]: registries that label every series with the version.
//! - [`trace`]: W3C `traceparent`, from request to task to worker logs.
//!
//! It deliberately serves no HTTP (only `api` depends on axum; it is an
//! HTTP *client* of RabbitMQ's management API and of webhook receivers),
//! never acknowledges a task's delivery (only `worker` does; [`dead_letters`]
//! acknowledges only what an operator takes off the dead-letter queue), and spawns nothing:
//! long-running loops such as [`relay::Relay::run`] are futures the binaries spawn
//! (the one exception: [`error_tracking`]'s sender thread, with a DSN only).

pub mod admission;
pub mod artifacts;
pub mod batch;
pub mod broker;
pub mod canvas;
pub mod catalog;
pub mod codes;
pub mod db;
pub mod dead_letters;
pub mod envelope;
pub mod error_tracking;
pub mod management;
pub mod metrics;
pub mod names;
pub mod probe;
pub mod relay;
pub mod retention;
pub mod schedule;
pub mod settings;
pub mod shutdown;
pub mod signing;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod topology;
pub mod trace;
pub mod webhooks;
pub mod wire;
pub mod workflow;

/// The version of this build, carried in logs, metrics and worker records.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
