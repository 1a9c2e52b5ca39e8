//! `flaky`: fails with a retryable error on its first `fail_times` attempts,
//! then succeeds. Exercises retries, backoff and dead-lettering end to end;
//! with `"panic": true` those attempts panic instead, as buggy task code
//! does (a panic is one failed attempt, reported to error tracking).

use crate::{FieldError, Input, Task, TaskContext, TaskError, ValidationErrors};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub struct Flaky;

/// Enough to exhaust any sane retry policy.
const MAX_FAIL_TIMES: u32 = 1_000;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlakyInput {
    /// Attempts that fail before one succeeds.
    #[schemars(range(max = MAX_FAIL_TIMES))]
    pub fail_times: u32,
    /// Panic on the failing attempts instead of returning an error.
    #[serde(default)]
    pub panic: bool,
}

impl Input for FlakyInput {
    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        if self.fail_times > MAX_FAIL_TIMES {
            errors.push(FieldError::new(
                "fail_times",
                "out_of_range",
                format!("must be at most {MAX_FAIL_TIMES}"),
            ));
        }
        ValidationErrors::check(errors)
    }
}

#[derive(Debug, Serialize)]
pub struct FlakyOutput {
    /// The attempt that finally succeeded (1-based).
    pub succeeded_on_attempt: u32,
}

impl Task for Flaky {
    const NAME: &'static str = "flaky";
    const POSITIONAL: &'static [&'static str] = &["fail_times"];
    type Input = FlakyInput;
    type Output = FlakyOutput;

    async fn run(&self, input: FlakyInput, ctx: TaskContext) -> Result<FlakyOutput, TaskError> {
        // The attempt number comes from the worker's durable record, so the
        // failures are counted across workers and restarts alike.
        let attempt = ctx.attempt();
        if attempt <= input.fail_times && input.panic {
            panic!(
                "panicking on purpose: attempt {attempt} of {}",
                input.fail_times
            );
        }
        if attempt <= input.fail_times {
            return Err(TaskError::Retryable(format!(
                "failing on purpose: attempt {attempt} of {} planned failures",
                input.fail_times
            )));
        }
        Ok(FlakyOutput {
            succeeded_on_attempt: attempt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fails_then_succeeds() {
        for attempt in 1..=2 {
            let ctx = TaskContext::detached(uuid::Uuid::nil(), attempt);
            let err = Flaky
                .run(
                    FlakyInput {
                        fail_times: 2,
                        panic: false,
                    },
                    ctx,
                )
                .await
                .unwrap_err();
            assert!(err.is_retryable());
        }
        let ctx = TaskContext::detached(uuid::Uuid::nil(), 3);
        let out = Flaky
            .run(
                FlakyInput {
                    fail_times: 2,
                    panic: false,
                },
                ctx,
            )
            .await
            .unwrap();
        assert_eq!(out.succeeded_on_attempt, 3);
    }
}
