//! # warren-tasks
//!
//! What a Warren task *is*, independent of how it travels or where its result
//! lands. The API uses this crate to validate input before anything is queued;
//! the worker uses the very same code to run it, so "valid at submission" and
//! "valid at execution" can never drift apart.
//!
//! Layout:
//! - [`Task`]: the trait a task implements: typed [`Input`] (validated on
//!   construction) → `run(ctx)` → typed output.
//! - [`Registry`]: the one list of tasks that api and worker share.
//! - [`TaskContext`]: what a running task may observe or report (attempt,
//!   cancellation and soft time limit, progress, per-item outcomes,
//!   artifacts), through [`Services`] that whoever runs it provides.
//! - [`TaskError`]: every failure answers "is another attempt worth it?".
//! - [`Policy`]: retry and time-limit defaults a task declares; deployments
//!   override them in configuration.
//! - [`ExternalTask`]: a type declared in configuration whose code runs
//!   elsewhere (Python Celery workers): a name, a JSON Schema its input
//!   must satisfy, a policy. Validated here like any task, never run here.
//! - one file per built-in task: [`multiply`], [`sum`], [`noop`], [`sleep`], [`flaky`],
//!   [`beneficiaries`] (`beneficiaries.create`, `beneficiaries.import`),
//!   [`labels`] (`labels.generate`, a PDF of shipping labels).
//!
//! This crate deliberately knows nothing about AMQP, HTTP or SQL, depends on
//! no other Warren crate, and spawns nothing: it is a library of pure work.

mod context;
mod error;
mod external;
#[cfg(test)]
mod input_schemas;
mod policy;
mod registry;
mod task;
mod validation;

pub mod beneficiaries;
pub mod echo;
pub mod flaky;
pub mod labels;
pub mod multiply;
pub mod noop;
pub mod sleep;
pub mod sum;

pub use context::{BoxFuture, ItemOutcome, NewArtifact, Progress, Recorder, Services, TaskContext};
pub use error::TaskError;
pub use external::{ExternalTask, SchemaError};
pub use policy::{Policy, PolicyError, PolicyOverrides};
pub use registry::{DynTask, Registry, TaskFuture};
pub use task::{Input, Task};
pub use validation::{FieldError, ValidationErrors};
