//! `noop`: returns at once. Measures Warren's own overhead per task.

use crate::{Input, Task, TaskContext, TaskError};
use schemars::JsonSchema;
use serde::Deserialize;

pub struct Noop;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoopInput {}

impl Input for NoopInput {}

impl Task for Noop {
    const NAME: &'static str = "noop";
    type Input = NoopInput;
    type Output = ();

    async fn run(&self, _: NoopInput, _: TaskContext) -> Result<(), TaskError> {
        Ok(())
    }
}
