//! The trait every task implements.

use crate::{Policy, TaskContext, TaskError, ValidationErrors};
use schemars::{JsonSchema, generate::SchemaSettings};
use serde::{Serialize, de::DeserializeOwned};
use std::future::Future;

/// A task's typed input. Deserialisation checks shapes and types; `validate`
/// checks what types cannot say (ranges, checksums, cross-field rules).
/// The JSON Schema is derived from the same type, so what the API
/// documents cannot drift from what it parses; `#[schemars(...)]` bounds
/// say as much of `validate` as a schema can, never more.
pub trait Input: DeserializeOwned + JsonSchema + Send + 'static {
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

    /// This input as a JSON Schema (2020-12), self-contained: nested types
    /// inlined, no `$schema` or `title`, so it can sit inside an OpenAPI
    /// document as a request body.
    fn schema() -> serde_json::Value {
        let mut schema = SchemaSettings::draft2020_12()
            .with(|s| {
                s.inline_subschemas = true;
                s.meta_schema = None;
            })
            .into_generator()
            .into_root_schema_for::<Self>();
        schema.remove("title");
        schema.to_value()
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
