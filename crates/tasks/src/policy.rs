//! Retry and time-limit policy: what a task declares as sensible defaults,
//! and what a deployment may override per task type in configuration.

use std::time::Duration;

/// How often and how patiently a task is retried, and how long it may run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Retries after the first attempt; `max_retries + 1` attempts in all.
    pub max_retries: u32,
    /// Delay before the first retry; doubles with every further retry.
    pub retry_delay: Duration,
    /// Upper bound of the doubling.
    pub retry_delay_max: Duration,
    /// After this long the task's context is cancelled: a polite request to
    /// stop that a task may observe and honour.
    pub soft_time_limit: Option<Duration>,
    /// After this long the attempt is abandoned and fails with
    /// `time limit exceeded` (retryable, like any transient failure).
    pub time_limit: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            retry_delay: Duration::from_secs(2),
            retry_delay_max: Duration::from_secs(600),
            soft_time_limit: None,
            time_limit: None,
        }
    }
}

impl Policy {
    /// Delay before the retry that follows failed attempt number `attempt`
    /// (1-based): exponential backoff with "equal jitter", i.e. uniformly
    /// drawn from `[d/2, d]` where `d = min(retry_delay * 2^(attempt-1), max)`.
    /// Half the delay is guaranteed so a thundering herd still spreads out
    /// while a retry never comes absurdly early. `unit_random` is a draw
    /// from `[0, 1)`, passed in so the schedule is testable.
    pub fn retry_delay_for(&self, attempt: u32, unit_random: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(31);
        let full = self
            .retry_delay
            .saturating_mul(1u32 << exponent)
            .min(self.retry_delay_max);
        let jitter = unit_random.clamp(0.0, 1.0);
        full.mul_f64(0.5 + 0.5 * jitter)
    }

    /// Applies configured overrides, checking that the result makes sense.
    pub fn with_overrides(mut self, o: &PolicyOverrides) -> Result<Self, PolicyError> {
        if let Some(n) = o.max_retries {
            self.max_retries = n;
        }
        if let Some(s) = o.retry_delay_seconds {
            self.retry_delay = seconds("retry_delay_seconds", s)?;
        }
        if let Some(s) = o.retry_delay_max_seconds {
            self.retry_delay_max = seconds("retry_delay_max_seconds", s)?;
        }
        if let Some(s) = o.soft_time_limit_seconds {
            self.soft_time_limit = Some(positive("soft_time_limit_seconds", s)?);
        }
        if let Some(s) = o.time_limit_seconds {
            self.time_limit = Some(positive("time_limit_seconds", s)?);
        }
        if self.retry_delay_max < self.retry_delay {
            return Err(PolicyError {
                field: "retry_delay_max_seconds",
                message: "must not be smaller than retry_delay_seconds".into(),
            });
        }
        if let (Some(soft), Some(hard)) = (self.soft_time_limit, self.time_limit)
            && soft > hard
        {
            return Err(PolicyError {
                field: "soft_time_limit_seconds",
                message: "must not be larger than time_limit_seconds".into(),
            });
        }
        Ok(self)
    }
}

/// Per-task-type overrides a deployment configures; every field optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyOverrides {
    pub max_retries: Option<u32>,
    pub retry_delay_seconds: Option<f64>,
    pub retry_delay_max_seconds: Option<f64>,
    pub soft_time_limit_seconds: Option<f64>,
    pub time_limit_seconds: Option<f64>,
}

/// A policy override that makes no sense; `field` names the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: &'static str,
    pub message: String,
}

/// Upper bound for any configured duration: a task type that needs more than
/// a week per attempt or between retries wants a different tool.
const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

fn seconds(field: &'static str, s: f64) -> Result<Duration, PolicyError> {
    if !(0.0..=MAX_SECONDS).contains(&s) {
        return Err(PolicyError {
            field,
            message: format!("must be between 0 and {MAX_SECONDS} seconds, got {s}"),
        });
    }
    Ok(Duration::from_secs_f64(s))
}

fn positive(field: &'static str, s: f64) -> Result<Duration, PolicyError> {
    if s <= 0.0 {
        return Err(PolicyError {
            field,
            message: format!("must be greater than 0, got {s}"),
        });
    }
    seconds(field, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(base: u64, max: u64) -> Policy {
        Policy {
            retry_delay: Duration::from_secs(base),
            retry_delay_max: Duration::from_secs(max),
            ..Policy::default()
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = policy(1, 10);
        // unit_random = 1.0 gives the full, un-jittered delay.
        let full: Vec<u64> = (1..=6)
            .map(|a| p.retry_delay_for(a, 1.0).as_secs())
            .collect();
        assert_eq!(full, vec![1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn jitter_keeps_at_least_half() {
        let p = policy(4, 100);
        assert_eq!(p.retry_delay_for(1, 0.0), Duration::from_secs(2));
        assert_eq!(p.retry_delay_for(1, 0.5), Duration::from_secs(3));
        // Out-of-range draws are clamped rather than trusted.
        assert_eq!(p.retry_delay_for(1, 7.0), Duration::from_secs(4));
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = policy(1, 60);
        assert_eq!(p.retry_delay_for(u32::MAX, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn overrides_apply_and_are_checked() {
        let o = PolicyOverrides {
            max_retries: Some(5),
            time_limit_seconds: Some(2.5),
            ..Default::default()
        };
        let p = Policy::default().with_overrides(&o).unwrap();
        assert_eq!(p.max_retries, 5);
        assert_eq!(p.time_limit, Some(Duration::from_millis(2500)));

        let bad = PolicyOverrides {
            soft_time_limit_seconds: Some(10.0),
            time_limit_seconds: Some(5.0),
            ..Default::default()
        };
        let err = Policy::default().with_overrides(&bad).unwrap_err();
        assert_eq!(err.field, "soft_time_limit_seconds");

        let negative = PolicyOverrides {
            retry_delay_seconds: Some(-1.0),
            ..Default::default()
        };
        let err = Policy::default().with_overrides(&negative).unwrap_err();
        assert_eq!(err.field, "retry_delay_seconds");
    }
}
