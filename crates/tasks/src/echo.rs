//! `echo`: returns its `value`, whatever JSON it is. The follow-up task in
//! tests and examples of links: an error callback that receives a failed
//! task's error shows it as its result.

use crate::{Input, Task, TaskContext, TaskError};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

pub struct Echo;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EchoInput {
    /// Any JSON; `null` when left out.
    #[serde(default)]
    // Said outright: OpenAPI tools read a schema without `type` poorly.
    #[schemars(extend("type" = ["null", "boolean", "number", "string", "array", "object"]))]
    pub value: Value,
}

impl Input for EchoInput {}

impl Task for Echo {
    const NAME: &'static str = "echo";
    const POSITIONAL: &'static [&'static str] = &["value"];
    type Input = EchoInput;
    type Output = Value;

    async fn run(&self, input: EchoInput, _: TaskContext) -> Result<Value, TaskError> {
        Ok(input.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn returns_its_value_and_refuses_other_fields() {
        let ctx = TaskContext::detached(uuid::Uuid::nil(), 1);
        let input = EchoInput::parse(&json!({"value": {"a": [1, 2]}})).unwrap();
        assert_eq!(Echo.run(input, ctx).await.unwrap(), json!({"a": [1, 2]}));
        assert!(EchoInput::parse(&json!({"other": 1})).is_err());
    }
}
