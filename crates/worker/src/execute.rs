//! Running one attempt of a task under its time limits.
//!
//! The task runs in its own tokio task so a panic is caught as one failed
//! attempt instead of taking the worker down, and so the hard limit can
//! abandon it. A task that blocks its thread without ever awaiting cannot
//! be pre-empted by any async runtime: CPU-heavy tasks belong on
//! `spawn_blocking`, and their hard limit then only stops the waiting.

use serde_json::Value;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use warren_shared::codes::ErrorCode;
use warren_tasks::{TaskError, TaskFuture};

/// How an attempt ended, before deciding what to record.
#[derive(Debug)]
pub(crate) enum Attempt {
    Succeeded(Value),
    /// The task returned an error.
    Failed(TaskError),
    /// Ran past its hard limit, or stopped after its soft limit fired.
    TimedOut {
        limit: Duration,
        soft: bool,
    },
    Panicked(String),
    /// The worker is shutting down past its grace period; the attempt is
    /// abandoned unrecorded and its message goes back to the broker.
    Interrupted,
}

impl Attempt {
    /// The stable code and message stored for a failed attempt.
    pub(crate) fn error(&self) -> Option<(ErrorCode, String, bool)> {
        match self {
            Attempt::Succeeded(_) | Attempt::Interrupted => None,
            Attempt::Failed(e) => Some((ErrorCode::from(e), e.to_string(), e.is_retryable())),
            Attempt::TimedOut { limit, soft } => Some((
                ErrorCode::TimeLimitExceeded,
                format!(
                    "time limit exceeded: {} limit of {:.3}s",
                    if *soft { "soft" } else { "hard" },
                    limit.as_secs_f64()
                ),
                // Slow is usually transient (a slow dependency); the retry
                // policy decides how often that is worth another go.
                true,
            )),
            Attempt::Panicked(msg) => Some((
                ErrorCode::TaskPanicked,
                format!("task panicked: {msg}"),
                true,
            )),
        }
    }
}

/// Soft limit: the task's cancellation fires, it may wrap up. Hard limit:
/// the attempt is abandoned. `stop` is the worker's "grace period over".
pub(crate) async fn run(
    future: TaskFuture,
    cancel: CancellationToken,
    soft: Option<Duration>,
    hard: Option<Duration>,
    stop: &CancellationToken,
) -> Attempt {
    let mut handle = tokio::spawn(future);
    let soft_timer = sleep_or_never(soft);
    let hard_timer = sleep_or_never(hard);
    tokio::pin!(soft_timer, hard_timer);
    let mut soft_fired = false;
    loop {
        tokio::select! {
            joined = &mut handle => {
                return match joined {
                    Ok(Ok(value)) => Attempt::Succeeded(value),
                    Ok(Err(TaskError::Cancelled)) if soft_fired => Attempt::TimedOut {
                        limit: soft.unwrap_or_default(),
                        soft: true,
                    },
                    Ok(Err(TaskError::Cancelled)) if stop.is_cancelled() => Attempt::Interrupted,
                    Ok(Err(e)) => Attempt::Failed(e),
                    Err(e) if e.is_panic() => Attempt::Panicked(panic_message(e.into_panic())),
                    Err(_) => Attempt::Interrupted,
                };
            }
            () = &mut soft_timer, if !soft_fired => {
                soft_fired = true;
                cancel.cancel();
            }
            () = &mut hard_timer => {
                handle.abort();
                return Attempt::TimedOut { limit: hard.unwrap_or_default(), soft: false };
            }
            () = stop.cancelled(), if !cancel.is_cancelled() => {
                // Ask politely first; the loop keeps waiting for the task.
                cancel.cancel();
            }
        }
    }
}

async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    fn boxed<F>(f: F) -> TaskFuture
    where
        F: Future<Output = Result<Value, TaskError>> + Send + 'static,
    {
        Box::pin(f)
    }

    #[tokio::test(start_paused = true)]
    async fn success_passes_through() {
        let out = run(
            boxed(async { Ok(Value::from(42)) }),
            CancellationToken::new(),
            None,
            None,
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(out, Attempt::Succeeded(v) if v == 42));
    }

    #[tokio::test(start_paused = true)]
    async fn hard_limit_abandons_the_attempt() {
        let started = tokio::time::Instant::now();
        let never = boxed(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Value::Null)
        });
        let out = run(
            never,
            CancellationToken::new(),
            None,
            Some(Duration::from_secs(2)),
            &CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(out, Attempt::TimedOut { soft: false, .. }),
            "{out:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let (code, message, retryable) = out.error().unwrap();
        assert_eq!(code, ErrorCode::TimeLimitExceeded);
        assert!(message.starts_with("time limit exceeded"), "{message}");
        assert!(retryable);
    }

    #[tokio::test(start_paused = true)]
    async fn soft_limit_cancels_the_context() {
        let cancel = CancellationToken::new();
        let observed = cancel.clone();
        let polite = boxed(async move {
            observed.cancelled().await;
            Err(TaskError::Cancelled)
        });
        let out = run(
            polite,
            cancel,
            Some(Duration::from_secs(1)),
            Some(Duration::from_secs(10)),
            &CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(out, Attempt::TimedOut { soft: true, .. }),
            "{out:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_is_one_failed_attempt() {
        let out = run(
            boxed(async { panic!("boom") }),
            CancellationToken::new(),
            None,
            None,
            &CancellationToken::new(),
        )
        .await;
        let (code, message, _) = out.error().unwrap();
        assert_eq!(code, ErrorCode::TaskPanicked);
        assert!(message.contains("boom"), "{message}");
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_interrupts_a_task_that_honours_cancellation() {
        let cancel = CancellationToken::new();
        let observed = cancel.clone();
        let stop = CancellationToken::new();
        stop.cancel();
        let polite = boxed(async move {
            observed.cancelled().await;
            Err(TaskError::Cancelled)
        });
        let out = run(polite, cancel, None, None, &stop).await;
        assert!(matches!(out, Attempt::Interrupted), "{out:?}");
    }
}
