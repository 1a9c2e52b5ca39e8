//! `sum`: the sum of a list of numbers (`{"values": [1, 2, 3]}`, or
//! `sum([1, 2, 3])` from Celery). The body of a chord in tests and
//! examples: it adds up every member's result.

use crate::{FieldError, Input, Task, TaskContext, TaskError, ValidationErrors};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Number;

pub struct Sum;

/// A chord of a hundred thousand members is as large as a sum gets here.
const MAX_VALUES: usize = 100_000;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SumInput {
    #[schemars(length(max = MAX_VALUES))]
    pub values: Vec<Number>,
}

impl Input for SumInput {
    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        if self.values.len() > MAX_VALUES {
            errors.push(FieldError::new(
                "values",
                "invalid_length",
                format!("at most {MAX_VALUES} values"),
            ));
        }
        ValidationErrors::check(errors)
    }
}

impl Task for Sum {
    const NAME: &'static str = "sum";
    const POSITIONAL: &'static [&'static str] = &["values"];
    type Input = SumInput;
    type Output = Number;

    async fn run(&self, input: SumInput, _: TaskContext) -> Result<Number, TaskError> {
        total(&input.values)
    }
}

/// Integers add up as integers while they fit in 64 bits; otherwise, or
/// with any fraction, in floating point.
fn total(values: &[Number]) -> Result<Number, TaskError> {
    let exact = values
        .iter()
        .try_fold(0i64, |acc, v| v.as_i64().and_then(|n| acc.checked_add(n)));
    if let Some(n) = exact {
        return Ok(n.into());
    }
    let float: f64 = values.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).sum();
    Number::from_f64(float)
        .ok_or_else(|| TaskError::Permanent("the sum is not a finite number".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sum(values: serde_json::Value) -> Result<Number, TaskError> {
        let input = SumInput::parse(&json!({ "values": values })).map_err(TaskError::from)?;
        total(&input.values)
    }

    #[test]
    fn integers_stay_integers_and_the_rest_is_floating_point() {
        assert_eq!(sum(json!([1, 2, 3])).ok(), Some(6.into()));
        assert_eq!(sum(json!([])).ok(), Some(0.into()));
        assert_eq!(
            sum(json!([0.5, 1])).ok().and_then(|n| n.as_f64()),
            Some(1.5)
        );
        let past_i64 = sum(json!([i64::MAX, 1])).ok().and_then(|n| n.as_f64());
        assert!(past_i64.is_some_and(|f| f > 9.2e18), "{past_i64:?}");
        assert!(sum(json!([1e308, 1e308])).is_err(), "infinite");
        assert!(sum(json!(["1"])).is_err(), "not a number");
    }
}
