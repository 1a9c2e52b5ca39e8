//! What each fault cost, read from the history and the rows: the longest
//! gap between completions around it, p99 submit→end latency of the tasks
//! submitted during it and after it, and how long until the API answered
//! 2xx again. Pure, so its arithmetic is unit-tested.

use super::checker::Row;
use super::nemesis::Event;
use super::workload::Op;
use serde::Serialize;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Impact {
    pub nemesis: &'static str,
    pub target: String,
    pub at_s: f64,
    /// Longest time without a completed task, from the fault until ten
    /// seconds after the cluster was whole again (or the next fault).
    pub longest_gap_ms: f64,
    /// p99 created→ended of no-countdown tasks created while the fault
    /// lasted, and in the 30 s after recovery (or until the next fault).
    pub p99_during_ms: Option<f64>,
    pub p99_after_ms: Option<f64>,
    /// From the fault to the first 2xx after the last failed HTTP attempt
    /// (0: no request failed).
    pub api_back_ms: f64,
    /// Failed attempts (no answer or 5xx) in that window.
    pub failed_requests: u64,
    /// The slowest of the tasks p99 during counts, and where its time went.
    pub slowest_during: Option<Slowest>,
}

/// A task and, after its creation, when it was first put on the broker,
/// last started and ended (ms). A long wait before `queued` is the outbox
/// (a refused publish waiting for the relay); between `queued` and
/// `started`, the broker or a cut-off, paused or busy worker.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Slowest {
    pub task_id: Uuid,
    pub queued_after_ms: Option<f64>,
    pub started_after_ms: Option<f64>,
    pub ended_after_ms: f64,
}

/// The faults of one kind over a run: how often, and the worst of each figure.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub nemesis: &'static str,
    pub times: usize,
    pub worst_gap_ms: f64,
    pub worst_p99_during_ms: Option<f64>,
    pub worst_p99_after_ms: Option<f64>,
    pub worst_api_back_ms: f64,
    pub failed_requests: u64,
}

/// One [`Summary`] per kind of fault, in the order they first struck.
pub fn summarize(impacts: &[Impact]) -> Vec<Summary> {
    let worst = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    let mut out: Vec<Summary> = Vec::new();
    for i in impacts {
        let at = match out.iter().position(|s| s.nemesis == i.nemesis) {
            Some(at) => at,
            None => {
                out.push(Summary {
                    nemesis: i.nemesis,
                    times: 0,
                    worst_gap_ms: 0.0,
                    worst_p99_during_ms: None,
                    worst_p99_after_ms: None,
                    worst_api_back_ms: 0.0,
                    failed_requests: 0,
                });
                out.len() - 1
            }
        };
        let s = &mut out[at];
        s.times += 1;
        s.worst_gap_ms = s.worst_gap_ms.max(i.longest_gap_ms);
        s.worst_p99_during_ms = worst(s.worst_p99_during_ms, i.p99_during_ms);
        s.worst_p99_after_ms = worst(s.worst_p99_after_ms, i.p99_after_ms);
        s.worst_api_back_ms = s.worst_api_back_ms.max(i.api_back_ms);
        s.failed_requests += i.failed_requests;
    }
    out
}

const AFTER_MS: f64 = 30_000.0;

pub fn impacts(events: &[Event], ops: &[Op], rows: &[&Row]) -> Vec<Impact> {
    let mut done: Vec<f64> = rows.iter().filter_map(|r| r.finished_ms).collect();
    done.sort_by(f64::total_cmp);
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (start, healed, whole) =
                (e.start_ms as f64, e.healed_ms as f64, e.recovered_ms as f64);
            // A window ends where the next fault begins, so no fault is
            // charged with the next one's cost.
            let next = events.get(i + 1).map_or(f64::MAX, |n| n.start_ms as f64);
            let end = (whole + AFTER_MS).min(next);
            let (back, failed) = api_back(ops, e.start_ms, end as u64);
            let during = healed.max(start + 1000.0);
            Impact {
                nemesis: e.nemesis.name(),
                target: e.target.clone(),
                at_s: start / 1000.0,
                longest_gap_ms: longest_gap(&done, start, (whole + 10_000.0).min(next)),
                p99_during_ms: p99(rows, start, during),
                p99_after_ms: p99(rows, whole, end),
                api_back_ms: back,
                failed_requests: failed,
                slowest_during: slowest(rows, start, during),
            }
        })
        .collect()
}

/// The longest stretch in `[from, to]` with no completion in `done` (sorted).
pub fn longest_gap(done: &[f64], from: f64, to: f64) -> f64 {
    let mut last = from;
    let mut longest: f64 = 0.0;
    for &t in done.iter().filter(|&&t| t >= from && t <= to) {
        longest = longest.max(t - last);
        last = t;
    }
    longest.max(to - last)
}

/// The ended tasks without a countdown created in `[from, to)`, each with
/// its created→ended time.
fn ended_in<'r>(rows: &'r [&Row], from: f64, to: f64) -> impl Iterator<Item = (&'r Row, f64)> {
    rows.iter()
        .filter(move |r| r.task_type == "multiply" && r.created_ms >= from && r.created_ms < to)
        .filter_map(|r| Some((*r, r.finished_ms? - r.created_ms)))
}

/// p99 of created→ended for tasks without a countdown created in `[from, to)`.
pub fn p99(rows: &[&Row], from: f64, to: f64) -> Option<f64> {
    let mut lat: Vec<f64> = ended_in(rows, from, to).map(|(_, ms)| ms).collect();
    if lat.is_empty() {
        return None;
    }
    lat.sort_by(f64::total_cmp);
    let i = ((lat.len() as f64 * 0.99).ceil() as usize).saturating_sub(1);
    lat.get(i).copied()
}

/// The slowest of the tasks [`p99`] reads, and where its time went.
pub fn slowest(rows: &[&Row], from: f64, to: f64) -> Option<Slowest> {
    let (r, ended) = ended_in(rows, from, to).max_by(|a, b| a.1.total_cmp(&b.1))?;
    Some(Slowest {
        task_id: r.id,
        queued_after_ms: r.queued_ms.map(|q| q - r.created_ms),
        started_after_ms: r.started_ms.map(|s| s - r.created_ms),
        ended_after_ms: ended,
    })
}

/// From `from` to the first 2xx after the last failed attempt sent
/// before `to`, and how many attempts failed in between.
fn api_back(ops: &[Op], from: u64, to: u64) -> (f64, u64) {
    let mut attempts: Vec<(u64, u16)> = ops
        .iter()
        .flat_map(|o| o.attempts.iter())
        // `to` is exclusive: an attempt sent as the next fault struck is that fault's.
        .filter(|a| a.at_ms >= from && a.at_ms < to)
        .map(|a| (a.at_ms, a.status))
        .collect();
    attempts.sort_unstable();
    let failed = |s: u16| s == 0 || s >= 500;
    let Some(last_failed) = attempts.iter().rposition(|&(_, s)| failed(s)) else {
        return (0.0, 0);
    };
    let count = attempts.iter().filter(|&&(_, s)| failed(s)).count() as u64;
    let back = attempts[last_failed..]
        .iter()
        .find(|&&(_, s)| (200..300).contains(&s))
        .map_or(to, |&(at, _)| at);
    ((back - from) as f64, count)
}

#[cfg(test)]
mod tests {
    use super::super::workload::{Attempt, Outcome};
    use super::*;

    #[test]
    fn the_longest_gap_counts_the_edges_of_the_window() {
        let done = [10.0, 20.0, 60.0, 65.0, 500.0];
        assert_eq!(longest_gap(&done, 0.0, 100.0), 40.0);
        assert_eq!(
            longest_gap(&done, 0.0, 200.0),
            135.0,
            "nothing after 65 until the end"
        );
        assert_eq!(longest_gap(&[], 0.0, 50.0), 50.0);
    }

    /// Task `i` of type `task_type`, created at `i` ms, first queued,
    /// started and ended the given ms after that.
    fn row(i: u128, task_type: &str, queued: f64, started: f64, ended: f64) -> Row {
        let created = i as f64;
        Row {
            id: Uuid::from_u128(i),
            state: "SUCCESS".into(),
            result: None,
            attempts: 1,
            task_type: task_type.into(),
            created_ms: created,
            queued_ms: Some(created + queued),
            started_ms: Some(created + started),
            finished_ms: Some(created + ended),
        }
    }

    #[test]
    fn p99_reads_only_tasks_created_in_the_window() {
        let rows: Vec<Row> = (0..100)
            .map(|i| match i {
                99 => row(i, "multiply", 990.0, 995.0, 1000.0),
                _ => row(i, "multiply", 1.0, 2.0, 10.0),
            })
            .collect();
        let refs: Vec<&Row> = rows.iter().collect();
        assert_eq!(p99(&refs, 0.0, 100.0), Some(10.0));
        assert_eq!(p99(&refs, 99.0, 100.0), Some(1000.0));
        assert_eq!(p99(&refs, 200.0, 300.0), None);
    }

    #[test]
    fn the_slowest_task_says_where_its_time_went() {
        // Task 40 waited 900 ms before the broker had it and ended after
        // 910; task 50, slower still, is of a type p99 leaves out.
        let rows: Vec<Row> = (0..100)
            .map(|i| match i {
                40 => row(i, "multiply", 900.0, 905.0, 910.0),
                50 => row(i, "fail_once", 1.0, 2.0, 5000.0),
                _ => row(i, "multiply", 1.0, 2.0, 10.0),
            })
            .collect();
        let refs: Vec<&Row> = rows.iter().collect();
        let s = slowest(&refs, 0.0, 100.0).unwrap();
        assert_eq!(s.task_id, Uuid::from_u128(40), "the slowest counted task");
        assert_eq!(
            (s.queued_after_ms, s.started_after_ms, s.ended_after_ms),
            (Some(900.0), Some(905.0), 910.0)
        );
        assert_eq!(
            slowest(&refs, 41.0, 42.0).unwrap().task_id,
            Uuid::from_u128(41)
        );
        assert_eq!(slowest(&refs, 200.0, 300.0), None);
    }

    #[test]
    fn a_summary_keeps_the_worst_of_each_kind() {
        let impact = |nemesis, gap, p99: Option<f64>| Impact {
            nemesis,
            target: String::new(),
            at_s: 0.0,
            longest_gap_ms: gap,
            p99_during_ms: p99,
            p99_after_ms: None,
            api_back_ms: gap / 2.0,
            failed_requests: 1,
            slowest_during: None,
        };
        let s = summarize(&[
            impact("kill-leader", 900.0, Some(50.0)),
            impact("partition", 100.0, None),
            impact("kill-leader", 300.0, Some(70.0)),
        ]);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].nemesis, s[0].times), ("kill-leader", 2));
        assert_eq!(
            (s[0].worst_gap_ms, s[0].worst_p99_during_ms),
            (900.0, Some(70.0))
        );
        assert_eq!((s[0].worst_api_back_ms, s[0].failed_requests), (450.0, 2));
        assert_eq!(s[1].worst_p99_during_ms, None);
    }

    #[test]
    fn the_api_is_back_at_the_first_success_after_the_last_failure() {
        let op = Op {
            n: 1,
            kind: "multiply",
            key: None,
            started_ms: 0,
            attempts: [(100, 202), (150, 0), (300, 503), (320, 202), (400, 202)]
                .map(|(at_ms, status)| Attempt {
                    at_ms,
                    replica: 0,
                    status,
                })
                .to_vec(),
            outcome: Outcome::Unknown,
        };
        assert_eq!(api_back(&[op], 100, 1000), (220.0, 2));
    }
}
