//! Admission: the limits a task type declares in `[tasks.<type>]` and the
//! arithmetic that applies them. A type with a concurrency cap or a rate
//! limit is never published on submission: its tasks wait in PostgreSQL
//! (`hold = 'admission'`, no worker slot, no prefetch slot) and the relay's
//! admission pass (`store::admission`) releases them into the outbox, in
//! round-robin across keys and by priority within a key, when their key
//! has room under its cap and a token of its rate. Types without limits
//! never meet any of this.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;
use std::time::Duration;

/// Keys longer than this are cut (at a character boundary): a key names a
/// tenant or a partner, not a document.
pub const MAX_KEY_BYTES: usize = 200;

/// What a concurrency or rate key is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// One key for the whole type: a rate limit without `rate_limit_key`.
    Type,
    /// The API key owner who submitted the task.
    Owner,
    /// A top-level field of the input (`"input.<field>"`).
    Input(String),
}

impl KeySource {
    /// `"owner"` or `"input.<field>"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once('.') {
            None if text == "owner" => Ok(Self::Owner),
            Some(("input", field)) if !field.is_empty() && !field.contains('.') => {
                Ok(Self::Input(field.to_owned()))
            }
            _ => Err(format!(
                "{text:?} is not a key: use \"owner\" or \"input.<field>\" (a top-level field)"
            )),
        }
    }

    /// The key of one task. A missing or null field is the empty key (all
    /// such tasks share it); a string is itself; any other value its JSON.
    pub fn key(&self, owner: Option<&str>, input: &Value) -> String {
        let raw = match self {
            Self::Type => String::new(),
            Self::Owner => owner.unwrap_or_default().to_owned(),
            Self::Input(field) => match input.get(field) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            },
        };
        cut(raw)
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Type => f.write_str("type"),
            Self::Owner => f.write_str("owner"),
            Self::Input(field) => write!(f, "input.{field}"),
        }
    }
}

fn cut(mut key: String) -> String {
    if key.len() > MAX_KEY_BYTES {
        let mut end = MAX_KEY_BYTES;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        key.truncate(end);
    }
    key
}

/// `N/s`, `N/m` or `N/h`: how many tasks may start per period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_second: f64,
}

/// The window a burst may fill: a rate admits at most this much of its
/// allowance at once, so a 1-second window never sees much more than N.
const BURST_WINDOW: Duration = Duration::from_millis(50);

/// The window admission's bursts may fill ([`Rate::admission_burst`]).
const ADMISSION_WINDOW: Duration = Duration::from_millis(250);

impl Rate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a rate: use \"20/s\", \"600/m\" or \"1000/h\"");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let seconds = match unit.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(format!(
                "{text:?}: a rate of 0 admits nothing; pause the type instead"
            ));
        }
        Ok(Self {
            per_second: f64::from(count) / seconds,
        })
    }

    /// Time between two admissions at an even pace.
    pub fn interval(&self) -> TimeDelta {
        TimeDelta::microseconds((1e6 / self.per_second).round().max(1.0) as i64)
    }

    /// How many may start at once: 50 ms worth, at least one.
    pub fn burst(&self) -> i64 {
        Self::worth(self.per_second, BURST_WINDOW)
    }

    /// How many admission may release at once: 250 ms worth, at least
    /// one. More than a start's burst: the start bucket spaces the starts
    /// exactly, so admission only has to keep the slots fed, and a relay
    /// pass that comes late on a loaded machine must not cost rate.
    pub fn admission_burst(&self) -> i64 {
        Self::worth(self.per_second, ADMISSION_WINDOW)
    }

    fn worth(per_second: f64, window: Duration) -> i64 {
        (per_second * window.as_secs_f64()).floor().max(1.0) as i64
    }

    /// GCRA: given the bucket's theoretical arrival time `tat` (`None`:
    /// never used), how many of `wanted` may go at `now`, and the new
    /// `tat`. Admissions are spaced by [`Rate::interval`], at most
    /// [`Rate::admission_burst`] at a time, so no window of a second holds
    /// more than N plus one burst. A pass that comes late (a loaded machine) keeps
    /// the grid for up to an interval, so lateness is not lost rate.
    pub fn grant(
        &self,
        tat: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        wanted: i64,
    ) -> (i64, DateTime<Utc>) {
        let interval = self.interval();
        let burst_back = interval * i32::try_from(self.admission_burst() - 1).unwrap_or(0);
        let start = match tat {
            None => now - burst_back,
            Some(t) => t.max(now - burst_back - interval),
        };
        if start > now || wanted <= 0 {
            return (0, start);
        }
        let due = (now - start).num_microseconds().unwrap_or(i64::MAX)
            / interval.num_microseconds().unwrap_or(1).max(1)
            + 1;
        let granted = due.min(self.admission_burst()).min(wanted);
        (
            granted,
            start + interval * i32::try_from(granted).unwrap_or(i32::MAX),
        )
    }
}

/// `20/s`, `90/m`, `1000/h`: per the shortest period that counts whole
/// tasks (`600/m` reads back as `10/s`).
impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (per, unit) in [(1.0, "s"), (60.0, "m")] {
            let n = self.per_second * per;
            if (n - n.round()).abs() < 1e-9 && n >= 1.0 {
                return write!(f, "{}/{unit}", n.round());
            }
        }
        write!(f, "{}/h", (self.per_second * 3600.0).round())
    }
}

/// A type's limits, from `[tasks.<type>]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Tasks admitted and unfinished per key, at most.
    pub concurrency: Option<(KeySource, u32)>,
    pub rate: Option<(KeySource, Rate)>,
}

/// The keys one task is admitted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// Its round-robin group: the concurrency key, or the rate key for a
    /// type with a rate only.
    pub group: String,
    pub rate: Option<String>,
}

impl Limits {
    /// Whether tasks of this type wait for admission.
    pub fn admits(&self) -> bool {
        self.concurrency.is_some() || self.rate.is_some()
    }

    pub fn cap(&self) -> Option<u32> {
        self.concurrency.as_ref().map(|(_, cap)| *cap)
    }

    /// In words, for people: `8 per owner, 20/s per input.partner`;
    /// empty without limits.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some((source, cap)) = &self.concurrency {
            parts.push(format!("{cap} at once per {source}"));
        }
        match &self.rate {
            Some((KeySource::Type, rate)) => parts.push(rate.to_string()),
            Some((source, rate)) => parts.push(format!("{rate} per {source}")),
            None => {}
        }
        parts.join(", ")
    }

    /// `None` for a type without limits.
    pub fn keys(&self, owner: Option<&str>, input: &Value) -> Option<Keys> {
        let rate = self
            .rate
            .as_ref()
            .map(|(source, _)| source.key(owner, input));
        let group = match (&self.concurrency, &rate) {
            (Some((source, _)), _) => source.key(owner, input),
            (None, Some(key)) => key.clone(),
            (None, None) => return None,
        };
        Some(Keys { group, rate })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_read_from_the_owner_or_an_input_field() {
        assert_eq!(KeySource::parse("owner"), Ok(KeySource::Owner));
        assert_eq!(
            KeySource::parse("input.partner"),
            Ok(KeySource::Input("partner".into()))
        );
        for bad in ["", "input.", "input.a.b", "owners", "body.x"] {
            assert!(KeySource::parse(bad).is_err(), "{bad}");
        }
        let input = json!({"partner": "dhl", "n": 7, "none": null});
        let key = |s: &str| KeySource::parse(s).unwrap().key(Some("acme"), &input);
        assert_eq!(key("owner"), "acme");
        assert_eq!(key("input.partner"), "dhl");
        assert_eq!(key("input.n"), "7");
        assert_eq!(key("input.none"), "");
        assert_eq!(key("input.missing"), "");
        let long = json!({"k": "é".repeat(300)});
        let cut = KeySource::Input("k".into()).key(None, &long);
        assert!(cut.len() <= MAX_KEY_BYTES && cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn limits_read_back_as_configured() {
        for (text, shown) in [
            ("20/s", "20/s"),
            ("600/m", "10/s"),
            ("90/m", "90/m"),
            ("1000/h", "1000/h"),
            ("1/h", "1/h"),
        ] {
            assert_eq!(Rate::parse(text).unwrap().to_string(), shown);
        }
        let limits = Limits {
            concurrency: Some((KeySource::Owner, 8)),
            rate: Some((
                KeySource::Input("partner".into()),
                Rate::parse("20/s").unwrap(),
            )),
        };
        assert_eq!(
            limits.describe(),
            "8 at once per owner, 20/s per input.partner"
        );
        let rate_only = Limits {
            concurrency: None,
            rate: Some((KeySource::Type, Rate::parse("600/m").unwrap())),
        };
        assert_eq!(rate_only.describe(), "10/s");
        assert_eq!(Limits::default().describe(), "");
    }

    #[test]
    fn rates_parse_per_second_minute_and_hour() {
        assert_eq!(
            Rate::parse("20/s").unwrap().interval(),
            TimeDelta::milliseconds(50)
        );
        assert_eq!(
            Rate::parse("600/m").unwrap().interval(),
            TimeDelta::milliseconds(100)
        );
        assert_eq!(
            Rate::parse("3600/h").unwrap().interval(),
            TimeDelta::seconds(1)
        );
        assert_eq!(Rate::parse("20/s").unwrap().burst(), 1);
        assert_eq!(Rate::parse("1000/s").unwrap().burst(), 50);
        for bad in ["20", "20/d", "x/s", "-1/s", "0/s", "1.5/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_bucket_spaces_admissions_evenly() {
        let rate = Rate::parse("20/s").unwrap();
        let t0 = DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000);
        // A fresh bucket admits a burst (250 ms worth: 5) and asks for 50 ms.
        let (n, tat) = rate.grant(None, t0, 100);
        assert_eq!((n, tat), (5, t0 + TimeDelta::milliseconds(50)));
        // Too early: nothing, the bucket unchanged.
        assert_eq!(
            rate.grant(Some(tat), t0 + TimeDelta::milliseconds(10), 5),
            (0, tat)
        );
        // Idle for a long time: still one burst, not the whole backlog.
        let (n, _) = rate.grant(Some(tat), t0 + TimeDelta::seconds(60), 100);
        assert_eq!(n, 5);
        // Simulated millisecond by millisecond: never more than 20 and a
        // burst (24) in any second.
        let mut tat = None;
        let mut admitted = Vec::new();
        for ms in 0..5_000 {
            let now = t0 + TimeDelta::milliseconds(ms);
            let (n, next) = rate.grant(tat, now, 1_000);
            tat = Some(next);
            admitted.extend(std::iter::repeat_n(ms, usize::try_from(n).unwrap()));
        }
        assert!((100..=104).contains(&admitted.len()), "{}", admitted.len());
        for w in admitted.windows(25) {
            assert!(w[24] - w[0] >= 1000, "25 admissions within a second: {w:?}");
        }
    }

    #[test]
    fn passes_that_come_late_keep_the_rate() {
        let rate = Rate::parse("20/s").unwrap();
        let t0 = DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000);
        // Each pass 15 ms after the bucket's time, as on a loaded machine.
        let (mut n, mut tat) = rate.grant(None, t0, 1_000);
        while tat < t0 + TimeDelta::seconds(10) {
            let (granted, next) = rate.grant(Some(tat), tat + TimeDelta::milliseconds(15), 1_000);
            n += granted;
            tat = next;
        }
        // 200 at the rate, and the first burst (5) at once.
        assert!((199..=205).contains(&n), "{n} in 10 s");
    }

    #[test]
    fn a_fast_rate_admits_in_bursts_of_250_ms() {
        let rate = Rate::parse("1000/s").unwrap();
        let t0 = DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000);
        let (n, tat) = rate.grant(None, t0, 10_000);
        assert_eq!(n, 250);
        let (n, _) = rate.grant(Some(tat), t0 + TimeDelta::milliseconds(50), 10_000);
        assert!((49..=51).contains(&n), "{n}");
    }

    #[test]
    fn passes_100_ms_apart_keep_the_rate() {
        let rate = Rate::parse("20/s").unwrap();
        let t0 = DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20_000);
        let (mut n, mut tat) = rate.grant(None, t0, 1_000);
        let mut now = t0;
        while now < t0 + TimeDelta::seconds(10) {
            now += TimeDelta::milliseconds(100);
            let (granted, next) = rate.grant(Some(tat), now, 1_000);
            n += granted;
            tat = next;
        }
        assert!((200..=206).contains(&n), "{n} in 10 s");
    }

    #[test]
    fn limits_give_a_group_and_a_rate_key() {
        let none = Limits::default();
        assert!(!none.admits());
        assert_eq!(none.keys(Some("a"), &json!({})), None);
        let both = Limits {
            concurrency: Some((KeySource::Owner, 8)),
            rate: Some((KeySource::Input("p".into()), Rate::parse("5/s").unwrap())),
        };
        assert_eq!(
            both.keys(Some("acme"), &json!({"p": "ups"})),
            Some(Keys {
                group: "acme".into(),
                rate: Some("ups".into())
            })
        );
        let rate_only = Limits {
            concurrency: None,
            rate: Some((KeySource::Owner, Rate::parse("5/s").unwrap())),
        };
        assert_eq!(
            rate_only.keys(Some("acme"), &json!({})).unwrap().group,
            "acme"
        );
    }
}
