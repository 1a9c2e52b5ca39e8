//! `sleep`: waits without holding a thread, the stand-in for slow I/O-bound
//! work (a carrier's API, a report query). Stops early when cancelled.

use crate::{FieldError, Input, Task, TaskContext, TaskError, ValidationErrors};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub struct Sleep;

/// A day: longer sleeps are almost certainly a unit mistake (ms for s).
pub const MAX_SLEEP_SECONDS: f64 = 86_400.0;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SleepInput {
    #[schemars(range(min = 0.0, max = MAX_SLEEP_SECONDS))]
    pub seconds: f64,
}

impl Input for SleepInput {
    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        if !(0.0..=MAX_SLEEP_SECONDS).contains(&self.seconds) {
            errors.push(FieldError::new(
                "seconds",
                "out_of_range",
                format!("must be between 0 and {MAX_SLEEP_SECONDS}"),
            ));
        }
        ValidationErrors::check(errors)
    }
}

#[derive(Debug, Serialize)]
pub struct SleepOutput {
    pub slept_seconds: f64,
}

impl Task for Sleep {
    const NAME: &'static str = "sleep";
    const POSITIONAL: &'static [&'static str] = &["seconds"];
    type Input = SleepInput;
    type Output = SleepOutput;

    /// Reports progress once a second (seconds slept of the total), so a
    /// long sleep shows something moving on the dashboard.
    async fn run(&self, input: SleepInput, ctx: TaskContext) -> Result<SleepOutput, TaskError> {
        let until = tokio::time::Instant::now() + Duration::from_secs_f64(input.seconds);
        let total = input.seconds.ceil() as u64;
        let mut done = 0;
        loop {
            let next = (tokio::time::Instant::now() + Duration::from_secs(1)).min(until);
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = ctx.cancelled() => return Err(TaskError::Cancelled),
            }
            if next >= until {
                return Ok(SleepOutput {
                    slept_seconds: input.seconds,
                });
            }
            done += 1;
            ctx.set_progress(done, total, Some(format!("slept {done} of {total} s")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn rejects_negative_and_absurd_durations() {
        for bad in [-1.0, MAX_SLEEP_SECONDS + 1.0, f64::NAN] {
            let err = SleepInput { seconds: bad }.validate().unwrap_err();
            assert_eq!(err.errors()[0].field, "seconds");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sleeps_for_the_requested_time() {
        let started = tokio::time::Instant::now();
        let ctx = TaskContext::detached(uuid::Uuid::nil(), 1);
        let out = Sleep.run(SleepInput { seconds: 3.0 }, ctx).await.unwrap();
        assert_eq!(out.slept_seconds, 3.0);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn reports_each_whole_second_slept() {
        let recorder = Arc::new(crate::Recorder::default());
        let ctx = TaskContext::new(
            uuid::Uuid::nil(),
            1,
            CancellationToken::new(),
            recorder.clone(),
        );
        Sleep.run(SleepInput { seconds: 2.5 }, ctx).await.unwrap();
        let reports: Vec<(u64, u64)> = recorder
            .progress
            .lock()
            .unwrap()
            .iter()
            .map(|p| (p.done, p.total))
            .collect();
        assert_eq!(reports, [(1, 3), (2, 3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_when_cancelled() {
        let cancel = CancellationToken::new();
        let ctx = TaskContext::new(
            uuid::Uuid::nil(),
            1,
            cancel.clone(),
            Arc::new(crate::Recorder::default()),
        );
        let run = tokio::spawn(async move { Sleep.run(SleepInput { seconds: 60.0 }, ctx).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        cancel.cancel();
        let err = run.await.unwrap().unwrap_err();
        assert!(matches!(err, TaskError::Cancelled));
    }
}
