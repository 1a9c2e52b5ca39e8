//! The trait every task implements.

use crate::{Policy, TaskContext, TaskError, ValidationErrors};
use serde::{Serialize, de::DeserializeOwned};
use std::future::Future;

/// A task's typed input. Deserialisation checks shapes and types; `validate`
/// checks what types cannot say (ranges, checksums, cross-field rules).
pub trait Input: DeserializeOwned + Send + 'static {
    fn validate(&self) -> Result<(), ValidationErrors> {
        Ok(())
    }

    /// Builds and validates an input from JSON: the one constructor both the
    /// API (before queuing) and the worker (before running) go through.
    fn parse(value: &serde_json::Value) -> Result<Self, ValidationErrors> {
        let input: Self = serde_path_to_error::deserialize(value)
            .map_err(|first| crate::validation::every_field_error::<Self>(value, first))?;
        input.validate()?;
        Ok(input)
    }
}

/// A unit of work Warren can run: typed input → `run(ctx)` → typed output.
pub trait Task: Send + Sync + 'static {
    /// The name clients submit under (`POST /tasks/{NAME}`) and the Celery
    /// task name on the wire.
    const NAME: &'static str;

    /// Field names for Celery's positional arguments, in order, so that
    /// `send_task("multiply", args=[6, 7])` from Python fills `x` and `y`.
    const POSITIONAL: &'static [&'static str] = &[];

    type Input: Input;
    type Output: Serialize + Send + 'static;

    /// Retry and time-limit defaults; configuration may override them.
    fn policy(&self) -> Policy {
        Policy::default()
    }

    fn run(
        &self,
        input: Self::Input,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Self::Output, TaskError>> + Send;
}
