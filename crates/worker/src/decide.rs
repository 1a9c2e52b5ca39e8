//! What an ended attempt means: a pure function of the task type's policy
//! and how the attempt ended, so every case is a unit test away.
//!
//! [`decide`] turns an [`Attempt`] into the [`Outcome`] to record (or into
//! "hand the message back"); [`after_record`] turns the recorded outcome
//! into what to tell the broker. Neither touches PostgreSQL or AMQP.

use crate::execute::Attempt;
use warren_shared::{
    codes::{ErrorCode, StoredError},
    envelope,
    store::Outcome,
};
use warren_tasks::{Policy, TaskError};

/// What to do with an attempt that ended.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Record this outcome (guarded by the attempt number).
    Record(Outcome),
    /// Record nothing and hand the message back (shutdown past grace).
    HandBack,
}

/// What to tell the broker once the outcome is (or cannot be) recorded.
#[derive(Debug, PartialEq)]
pub(crate) enum Disposition {
    Ack,
    /// Hand it back for another replica (shutdown, database gone).
    Requeue,
    /// Copy it to the dead-letter queue with a reason, then acknowledge.
    DeadLetter {
        code: ErrorCode,
        reason: String,
        /// The part of the message that was wrong, when one was.
        field: Option<String>,
    },
}

impl Disposition {
    pub(crate) fn dead_letter(code: ErrorCode, reason: impl Into<String>) -> Self {
        Disposition::DeadLetter {
            code,
            reason: reason.into(),
            field: None,
        }
    }
}

/// `attempt` counts the attempts since the task was last reset (by a
/// client's retry or an operator's requeue), this one included: what the
/// retry budget spends. `jitter` is uniform in [0, 1), injected so tests
/// are exact.
pub(crate) fn decide(
    policy: &Policy,
    attempt: i32,
    ended: Attempt,
    cancel_requested: bool,
    jitter: f64,
) -> Decision {
    let failed = match ended {
        Attempt::Interrupted => return Decision::HandBack,
        Attempt::Succeeded(value) => return Decision::Record(checked_success(value)),
        // The client asked, the task stopped: that is a cancellation, not
        // a failure, and nothing to retry.
        Attempt::Failed(TaskError::Cancelled) if cancel_requested => {
            return Decision::Record(Outcome::Cancelled);
        }
        failed => failed,
    };
    let (code, text, retryable) =
        failed
            .error()
            .unwrap_or((ErrorCode::Internal, "unknown failure".into(), false));
    let attempt = u32::try_from(attempt).unwrap_or(1).max(1);
    if retryable && attempt - 1 < policy.max_retries {
        return Decision::Record(Outcome::Retry {
            error: StoredError::new(code, text, true),
            delay: policy.retry_delay_for(attempt, jitter),
        });
    }
    let text = if retryable {
        format!("{text} (gave up after {attempt} attempt(s))")
    } else {
        text
    };
    Decision::Record(Outcome::Failure(StoredError::new(code, text, retryable)))
}

/// A task's output that PostgreSQL could not store (jsonb refuses NUL) is
/// a permanent failure of that task, not an error of the batch it shares.
fn checked_success(value: serde_json::Value) -> Outcome {
    match envelope::find_nul(&value) {
        None => Outcome::Success(value),
        Some(at) => Outcome::Failure(StoredError::new(
            ErrorCode::InvalidResult,
            format!(
                "the task's result has a NUL character at `result{at}`, which cannot be stored"
            ),
            false,
        )),
    }
}

/// After the outcome was written (`recorded`: it was still the current
/// attempt's to write): failures go to the dead-letter queue, everything
/// else is acknowledged.
pub(crate) fn after_record(outcome: &Outcome, recorded: bool) -> Disposition {
    match outcome {
        Outcome::Failure(error) if recorded => Disposition::DeadLetter {
            code: ErrorCode::parse(&error.code).unwrap_or(ErrorCode::TaskFailed),
            reason: error.message.clone(),
            field: None,
        },
        _ => Disposition::Ack,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn policy(max_retries: u32) -> Policy {
        Policy {
            max_retries,
            retry_delay: Duration::from_secs(1),
            retry_delay_max: Duration::from_secs(60),
            ..Policy::default()
        }
    }

    fn record(d: Decision) -> Outcome {
        match d {
            Decision::Record(o) => o,
            Decision::HandBack => panic!("handed back"),
        }
    }

    #[test]
    fn success_is_recorded_as_is() {
        let o = record(decide(
            &policy(0),
            1,
            Attempt::Succeeded(json!(42)),
            false,
            0.5,
        ));
        assert!(matches!(o, Outcome::Success(v) if v == 42));
    }

    #[test]
    fn a_result_that_cannot_be_stored_fails_the_task() {
        let o = record(decide(
            &policy(3),
            1,
            Attempt::Succeeded(json!({"a": ["x\u{0}"]})),
            false,
            0.5,
        ));
        let Outcome::Failure(e) = o else {
            panic!("{o:?}")
        };
        assert_eq!(e.code, "invalid_result");
        assert!(e.message.contains("result.a[0]"), "{}", e.message);
        assert!(!e.retryable);
    }

    #[test]
    fn retryable_failures_retry_until_the_budget_is_spent() {
        let failed = || Attempt::Failed(TaskError::Retryable("flaky".into()));
        for attempt in 1..=3 {
            let o = record(decide(&policy(3), attempt, failed(), false, 0.0));
            assert!(
                matches!(o, Outcome::Retry { .. }),
                "attempt {attempt}: {o:?}"
            );
        }
        let o = record(decide(&policy(3), 4, failed(), false, 0.0));
        let Outcome::Failure(e) = o else {
            panic!("{o:?}")
        };
        assert!(
            e.message.contains("gave up after 4 attempt(s)"),
            "{}",
            e.message
        );
        assert!(e.retryable);
    }

    #[test]
    fn permanent_failures_never_retry() {
        let o = record(decide(
            &policy(5),
            1,
            Attempt::Failed(TaskError::Permanent("bad".into())),
            false,
            0.0,
        ));
        assert!(
            matches!(o, Outcome::Failure(ref e) if e.code == "task_failed" && !e.retryable),
            "{o:?}"
        );
    }

    #[test]
    fn panics_and_time_limits_are_retryable_failures() {
        let panicked = decide(&policy(1), 1, Attempt::Panicked("boom".into()), false, 0.0);
        assert!(
            matches!(record(panicked), Outcome::Retry { ref error, .. } if error.code == "task_panicked")
        );
        let slow = Attempt::TimedOut {
            limit: Duration::from_secs(1),
            soft: false,
        };
        assert!(
            matches!(record(decide(&policy(0), 1, slow, false, 0.0)), Outcome::Failure(ref e) if e.code == "time_limit_exceeded")
        );
    }

    #[test]
    fn a_requested_cancellation_is_cancelled_and_any_other_is_a_failure() {
        let o = record(decide(
            &policy(3),
            1,
            Attempt::Failed(TaskError::Cancelled),
            true,
            0.0,
        ));
        assert!(matches!(o, Outcome::Cancelled));
        let o = record(decide(
            &policy(0),
            1,
            Attempt::Failed(TaskError::Cancelled),
            false,
            0.0,
        ));
        assert!(matches!(o, Outcome::Failure(_)), "{o:?}");
    }

    #[test]
    fn an_interrupted_attempt_is_handed_back_unrecorded() {
        assert!(matches!(
            decide(&policy(3), 1, Attempt::Interrupted, false, 0.0),
            Decision::HandBack
        ));
    }

    #[test]
    fn odd_attempt_numbers_do_not_panic() {
        for attempt in [i32::MIN, -1, 0, i32::MAX] {
            let failed = Attempt::Failed(TaskError::Retryable("x".into()));
            let _ = decide(&policy(u32::MAX), attempt, failed, false, 0.999);
        }
    }

    #[test]
    fn only_a_recorded_failure_is_dead_lettered() {
        let failure =
            Outcome::Failure(StoredError::new(ErrorCode::TimeLimitExceeded, "slow", true));
        assert_eq!(
            after_record(&failure, true),
            Disposition::DeadLetter {
                code: ErrorCode::TimeLimitExceeded,
                reason: "slow".into(),
                field: None
            }
        );
        // A newer attempt owns the task: this one's outcome is discarded.
        assert_eq!(after_record(&failure, false), Disposition::Ack);
        assert_eq!(
            after_record(&Outcome::Success(json!(1)), true),
            Disposition::Ack
        );
        assert_eq!(after_record(&Outcome::Cancelled, true), Disposition::Ack);
    }
}
