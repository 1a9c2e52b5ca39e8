//! Periodic tasks: what a schedule is (`[schedules.<name>]` or `POST
//! /schedules`) and the arithmetic of its ticks. Firing is in
//! `store::schedules`: every replica's relay looks for due schedules,
//! each schedule's row locked `FOR UPDATE SKIP LOCKED` while its ticks are
//! recorded with the new `next_at` in one transaction, and each tick's
//! task id derived from (schedule, tick instant): a tick can be recorded
//! once, whoever fires it, and a replica killed mid-way leaves nothing
//! half-done for the next one to repeat.

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::{
    Cron,
    parser::{CronParser, Seconds},
};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

/// Most ticks one firing catches up with (`missed = "run_all"`).
pub const MAX_CATCH_UP: usize = 100;
/// Shortest interval: a schedule is not a busy loop.
pub const MIN_EVERY_SECONDS: f64 = 1.0;
/// A tick this late is missed rather than on time (`missed = "skip"`).
pub const ON_TIME: TimeDelta = TimeDelta::seconds(5);

/// What to do with ticks that fell due while nothing could fire them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Drop them; fire only a tick that is on time.
    Skip,
    /// Fire the latest one once.
    #[default]
    RunOnce,
    /// Fire each, at most [`MAX_CATCH_UP`] (the latest ones).
    RunAll,
}

/// What to do when a tick falls due while the previous run is unfinished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    #[default]
    Allow,
    Skip,
}

impl Missed {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::RunOnce => "run_once",
            Self::RunAll => "run_all",
        }
    }
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Skip => "skip",
        }
    }
}

/// A schedule as written (config or API body); [`Spec::parse`] checks it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFields {
    pub task: String,
    #[serde(default)]
    pub input: Option<Value>,
    /// Five fields, or six with seconds first (`* * * * * *`: every second).
    pub cron: Option<String>,
    pub every_seconds: Option<f64>,
    /// IANA name (`Europe/Paris`); UTC by default.
    pub timezone: Option<String>,
    #[serde(default)]
    pub missed: Missed,
    #[serde(default)]
    pub overlap: Overlap,
    /// Whose tasks its ticks are (config only; the API uses the caller).
    pub owner: Option<String>,
}

/// When a schedule ticks.
#[derive(Debug, Clone)]
pub enum When {
    Cron(Box<Cron>),
    Every(TimeDelta),
}

/// A checked schedule.
#[derive(Debug, Clone)]
pub struct Spec {
    pub task: String,
    pub input: Value,
    pub when: When,
    /// As written, for the row and the listing.
    pub cron: Option<String>,
    pub every_seconds: Option<f64>,
    pub timezone: Tz,
    pub missed: Missed,
    pub overlap: Overlap,
}

/// A field of a schedule that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

impl Spec {
    pub fn parse(f: &SpecFields) -> Result<Self, SpecError> {
        let when = match (&f.cron, f.every_seconds) {
            (Some(_), Some(_)) => return Err(bad("cron", "give cron or every_seconds, not both")),
            (None, None) => return Err(bad("cron", "give cron or every_seconds")),
            (Some(text), None) => When::Cron(Box::new(parse_cron(text)?)),
            (None, Some(s)) if !(MIN_EVERY_SECONDS..=366.0 * 86_400.0).contains(&s) => {
                return Err(bad(
                    "every_seconds",
                    "must be between 1 and 31,622,400 (a year)",
                ));
            }
            (None, Some(s)) => When::Every(TimeDelta::milliseconds((s * 1000.0).round() as i64)),
        };
        let timezone = match &f.timezone {
            None => Tz::UTC,
            Some(name) => name
                .parse::<Tz>()
                .map_err(|_| bad("timezone", format!("{name:?} is not an IANA time zone")))?,
        };
        let input = f
            .input
            .clone()
            .unwrap_or_else(|| Value::Object(Default::default()));
        if !input.is_object() {
            return Err(bad("input", "must be an object (the task's input)"));
        }
        Ok(Self {
            task: f.task.clone(),
            input,
            when,
            cron: f.cron.clone(),
            every_seconds: f.every_seconds,
            timezone,
            missed: f.missed,
            overlap: f.overlap,
        })
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::Every(every) => Some(t + *every),
            When::Cron(cron) => cron
                .find_next_occurrence(&t.with_timezone(&self.timezone), false)
                .ok()
                .map(|next| next.with_timezone(&Utc)),
        }
    }

    /// The ticks to fire at `now` for a schedule due since `next_at`, by
    /// its `missed` policy, oldest first; and its next tick after `now`.
    pub fn due(
        &self,
        next_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> (Vec<DateTime<Utc>>, Option<DateTime<Utc>>) {
        let mut due = Vec::new();
        let mut tick = Some(next_at);
        while let Some(t) = tick.filter(|t| *t <= now) {
            due.push(t);
            if due.len() > MAX_CATCH_UP {
                due.remove(0);
            }
            tick = self.next_after(t);
            // Long behind: jump to the last hour instead of walking every
            // second of a week-long outage.
            if due.len() == MAX_CATCH_UP
                && let Some(n) = tick
                && now - n > TimeDelta::hours(1)
            {
                tick = self.skip_to(n, now - TimeDelta::hours(1));
            }
        }
        let fire = match self.missed {
            Missed::RunAll => due,
            Missed::RunOnce => due.pop().into_iter().collect(),
            Missed::Skip => due
                .pop()
                .filter(|t| now - *t <= ON_TIME)
                .into_iter()
                .collect(),
        };
        (fire, tick)
    }
}

impl Spec {
    /// The first tick at or after `target`, on the grid `from` is on.
    fn skip_to(&self, from: DateTime<Utc>, target: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::Every(every) => {
                let step = every.num_milliseconds().max(1);
                let behind = (target - from).num_milliseconds().max(0);
                let steps = i32::try_from(behind / step).ok()?;
                Some(from + *every * steps)
            }
            When::Cron(_) => self.next_after(target - TimeDelta::microseconds(1)),
        }
    }
}

fn parse_cron(text: &str) -> Result<Cron, SpecError> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(text)
        .map_err(|e| bad("cron", format!("{text:?}: {e}")))
}

/// The task id of a schedule's tick: the same for whoever fires it.
pub fn tick_id(schedule: &str, tick: DateTime<Utc>) -> Uuid {
    let name = format!("warren-schedule:{schedule}:{}", tick.timestamp_micros());
    Uuid::new_v5(&Uuid::NAMESPACE_URL, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(fields: serde_json::Value) -> Result<Spec, SpecError> {
        let fields: SpecFields = serde_json::from_value(fields).unwrap();
        Spec::parse(&fields)
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn cron_with_seconds_every_second_and_time_zones() {
        let s = spec(json!({"task": "noop", "cron": "* * * * * *"})).unwrap();
        let t = at("2026-12-03T10:00:00.300Z");
        assert_eq!(s.next_after(t), Some(at("2026-12-03T10:00:01Z")));
        // 02:30 every night in Paris is 01:30 UTC in winter.
        let s = spec(json!({"task": "noop", "cron": "30 2 * * *", "timezone": "Europe/Paris"}))
            .unwrap();
        assert_eq!(
            s.next_after(at("2026-12-03T10:00:00Z")),
            Some(at("2026-12-04T01:30:00Z"))
        );
    }

    #[test]
    fn bad_schedules_name_the_field() {
        let field = |v| spec(v).unwrap_err().field;
        assert_eq!(field(json!({"task": "noop"})), "cron");
        assert_eq!(
            field(json!({"task": "noop", "cron": "* *", "every_seconds": 5})),
            "cron"
        );
        assert_eq!(field(json!({"task": "noop", "cron": "61 * * * *"})), "cron");
        assert_eq!(
            field(json!({"task": "noop", "every_seconds": 0.1})),
            "every_seconds"
        );
        assert_eq!(
            field(json!({"task": "noop", "every_seconds": 5, "timezone": "Mars/Olympus"})),
            "timezone"
        );
        assert_eq!(
            field(json!({"task": "noop", "every_seconds": 5, "input": [1]})),
            "input"
        );
        assert!(
            serde_json::from_value::<SpecFields>(json!({"task": "x", "missed": "later"})).is_err()
        );
    }

    #[test]
    fn missed_ticks_follow_the_policy() {
        let base = json!({"task": "noop", "every_seconds": 10});
        let with = |missed: &str| {
            let mut v = base.clone();
            v["missed"] = json!(missed);
            spec(v).unwrap()
        };
        let next_at = at("2026-12-03T10:00:00Z");
        let now = at("2026-12-03T10:00:35Z"); // 4 ticks due: :00 :10 :20 :30
        let (all, next) = with("run_all").due(next_at, now);
        assert_eq!(all.len(), 4);
        assert_eq!(next, Some(at("2026-12-03T10:00:40Z")));
        assert_eq!(
            with("run_once").due(next_at, now).0,
            vec![at("2026-12-03T10:00:30Z")]
        );
        // :30 is 5 s late: on time still; 6 s late is missed.
        assert_eq!(with("skip").due(next_at, now).0.len(), 1);
        assert!(
            with("skip")
                .due(next_at, at("2026-12-03T10:00:36Z"))
                .0
                .is_empty()
        );
        // Nothing due yet.
        assert!(
            with("run_all")
                .due(next_at, at("2026-12-03T09:59:59Z"))
                .0
                .is_empty()
        );
    }

    #[test]
    fn catching_up_is_capped() {
        let s = spec(json!({"task": "noop", "cron": "* * * * * *", "missed": "run_all"})).unwrap();
        let next_at = at("2026-12-01T00:00:00Z");
        let now = at("2026-12-03T00:00:00Z");
        let (fire, next) = s.due(next_at, now);
        assert_eq!(fire.len(), MAX_CATCH_UP);
        assert_eq!(fire.last(), Some(&now));
        assert_eq!(next, Some(now + TimeDelta::seconds(1)));
    }

    #[test]
    fn a_tick_has_one_id() {
        let t = at("2026-12-03T10:00:00Z");
        assert_eq!(tick_id("nightly", t), tick_id("nightly", t));
        assert_ne!(
            tick_id("nightly", t),
            tick_id("nightly", t + TimeDelta::seconds(1))
        );
        assert_ne!(tick_id("nightly", t), tick_id("hourly", t));
    }
}
