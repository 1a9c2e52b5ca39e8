//! `multiply`: the product of two numbers. The smallest task that still has
//! typed input, validation and an output worth checking.

use crate::{Input, Task, TaskContext, TaskError};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Number;

pub struct Multiply;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MultiplyInput {
    pub x: Number,
    pub y: Number,
}

impl Input for MultiplyInput {}

impl Task for Multiply {
    const NAME: &'static str = "multiply";
    const POSITIONAL: &'static [&'static str] = &["x", "y"];
    type Input = MultiplyInput;
    type Output = Number;

    async fn run(&self, input: MultiplyInput, _: TaskContext) -> Result<Number, TaskError> {
        product(&input.x, &input.y)
    }
}

/// Integers stay integers (6 × 7 is `42`, not `42.0`) unless the product
/// overflows 64 bits; everything else is computed in floating point.
fn product(x: &Number, y: &Number) -> Result<Number, TaskError> {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64())
        && let Some(p) = a.checked_mul(b)
    {
        return Ok(p.into());
    }
    let (a, b) = (
        x.as_f64().unwrap_or(f64::NAN),
        y.as_f64().unwrap_or(f64::NAN),
    );
    Number::from_f64(a * b).ok_or_else(|| {
        TaskError::Permanent(format!("the product of {x} and {y} is not a finite number"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(input: serde_json::Value) -> Vec<(String, &'static str)> {
        let errors = MultiplyInput::parse(&input).unwrap_err();
        errors
            .errors()
            .iter()
            .map(|e| (e.field.clone(), e.code))
            .collect()
    }

    #[test]
    fn every_bad_field_is_named_not_only_the_first() {
        let missing = |f: &str| (f.to_owned(), "missing_field");
        assert_eq!(fields(json!({})), [missing("x"), missing("y")]);
        assert_eq!(
            fields(json!({"x": "six", "z": 1})),
            [
                ("x".to_owned(), "invalid_type"),
                ("z".to_owned(), "unknown_field"),
                missing("y")
            ]
        );
        assert!(MultiplyInput::parse(&json!({"x": 6, "y": 7})).is_ok());
    }

    fn n(v: serde_json::Value) -> Number {
        match v {
            serde_json::Value::Number(n) => n,
            other => panic!("not a number: {other}"),
        }
    }

    #[test]
    fn integers_stay_integers() {
        let p = product(&n(6.into()), &n(7.into())).unwrap();
        assert_eq!(p.to_string(), "42");
    }

    #[test]
    fn floats_and_overflow_use_floating_point() {
        assert_eq!(
            product(&n((1.5).into()), &n(2.into())).unwrap().as_f64(),
            Some(3.0)
        );
        let big = product(&n(i64::MAX.into()), &n(2.into())).unwrap();
        assert_eq!(big.as_f64(), Some(i64::MAX as f64 * 2.0));
    }

    #[test]
    fn infinite_products_fail_permanently() {
        let err = product(&n(1e308.into()), &n(1e308.into())).unwrap_err();
        assert!(!err.is_retryable());
    }
}
