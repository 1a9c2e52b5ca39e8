//! The checker: after the faults are healed and the system is quiet, what
//! the clients were told (the history) against what PostgreSQL and the
//! broker hold. Pure: [`check`] takes what was read and returns the
//! counts, so its rules are unit-tested with injected anomalies.
//!
//! - **lost**: accepted (202) but no row, or a row that never ended while
//!   nothing is left on the broker that could end it.
//! - **double-committed**: a task whose row became terminal more than once
//!   (read from the audit trigger's log of every state change).
//! - **duplicates executed**: a task started more often than its attempts
//!   explain: a start beyond the first that was not a retry Warren decided
//!   (a worker killed or cut off mid-task; at-least-once, and honest).
//! - **wrong**: a SUCCESS whose result is not what the input implies, or
//!   an end other than the one expected (FAILURE, EXPIRED, a cancelled task
//!   that ran).
//! - **stuck**: rows not terminal at the end.

use super::workload::{Expect, Op, Outcome};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use uuid::Uuid;

/// A task's row as the checker reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: Uuid,
    pub state: String,
    pub result: Option<Value>,
    pub attempts: i32,
    pub task_type: String,
    /// When it was created, first put on the broker, last started and
    /// ended, ms since the run began.
    pub created_ms: f64,
    pub queued_ms: Option<f64>,
    pub started_ms: Option<f64>,
    pub finished_ms: Option<f64>,
}

/// From the audit log: how often the row entered STARTED, RETRY and a
/// terminal state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Audit {
    pub starts: u32,
    pub retries: u32,
    pub terminal_writes: u32,
}

/// What was left on the broker once every replica stopped.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerLeft {
    /// Messages on the work queues (their bands included).
    pub messages: u64,
    /// Dead letters, counted by reason.
    pub dead_letters: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Report {
    pub operations: u64,
    pub accepted: u64,
    pub recorded: u64,
    /// Ops the clients never learnt the fate of (a batch whose answer was lost).
    pub unknown_ops: u64,
    /// Rows no client was told about (an unknown op that did commit).
    pub unacknowledged_rows: u64,
    pub lost: u64,
    pub double_committed: u64,
    pub duplicates_executed: u64,
    pub wrong: u64,
    pub stuck: u64,
    /// HTTP answers with a status of 500 or above other than 503: a fault
    /// must surface as 503 (retry), never as an internal error.
    pub server_errors: u64,
    pub messages_left: u64,
    pub dead_letters: u64,
    /// Up to ten examples per finding, for the note and the replay.
    pub examples: BTreeMap<String, Vec<String>>,
}

impl Report {
    /// No lost, double-committed, wrong or stuck task, no internal error.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.double_committed == 0
            && self.wrong == 0
            && self.stuck == 0
            && self.server_errors == 0
    }

    fn example(&mut self, finding: &str, what: String) {
        let list = self.examples.entry(finding.to_owned()).or_default();
        if list.len() < 10 {
            list.push(what);
        }
    }
}

const TERMINAL: [&str; 4] = ["SUCCESS", "FAILURE", "CANCELLED", "EXPIRED"];

pub fn check(
    history: &[Op],
    rows: &HashMap<Uuid, Row>,
    audit: &HashMap<Uuid, Audit>,
    broker: &BrokerLeft,
) -> Report {
    let mut r = Report {
        operations: history.len() as u64,
        messages_left: broker.messages,
        dead_letters: broker.dead_letters.values().sum(),
        ..Report::default()
    };
    let mut told = HashSet::new();
    for op in history {
        r.server_errors += op
            .attempts
            .iter()
            .filter(|a| a.status >= 500 && a.status != 503)
            .count() as u64;
        let tasks = match &op.outcome {
            Outcome::Accepted { tasks } => tasks,
            Outcome::Unknown => {
                r.unknown_ops += 1;
                continue;
            }
            Outcome::Refused { .. } => continue,
        };
        for task in tasks {
            told.insert(task.id);
            r.accepted += 1;
            check_task(&mut r, task.id, &task.expect, rows.get(&task.id), broker);
        }
    }
    for (id, a) in audit {
        if a.terminal_writes > 1 {
            r.double_committed += 1;
            r.example(
                "double_committed",
                format!("{id}: {} terminal writes", a.terminal_writes),
            );
        }
        if a.starts > 1 + a.retries {
            r.duplicates_executed += 1;
        }
    }
    r.unacknowledged_rows = rows.keys().filter(|id| !told.contains(id)).count() as u64;
    r
}

fn check_task(r: &mut Report, id: Uuid, expect: &Expect, row: Option<&Row>, broker: &BrokerLeft) {
    let Some(row) = row else {
        r.lost += 1;
        r.example("lost", format!("{id}: accepted, no row"));
        return;
    };
    r.recorded += 1;
    if !TERMINAL.contains(&row.state.as_str()) {
        r.stuck += 1;
        r.example("stuck", format!("{id}: {}", row.state));
        // Nothing left on the broker can end it: its outcome is lost.
        if broker.messages == 0 {
            r.lost += 1;
            r.example(
                "lost",
                format!("{id}: accepted, still {} with nothing queued", row.state),
            );
        }
        return;
    }
    if let Some(why) = wrong(expect, row) {
        r.wrong += 1;
        r.example("wrong", format!("{id}: {why}"));
    }
}

/// Why a terminal row is not what its input implies, if it is not.
fn wrong(expect: &Expect, row: &Row) -> Option<String> {
    let success = row.state == "SUCCESS";
    match expect {
        Expect::Product { .. } if !success => Some(format!("{} instead of SUCCESS", row.state)),
        Expect::Product { value } => {
            let got = row.result.as_ref().and_then(Value::as_i64);
            (got != Some(*value)).then(|| format!("result {got:?}, expected {value}"))
        }
        Expect::Flaky => {
            let attempt = row
                .result
                .as_ref()
                .and_then(|v| v.get("succeeded_on_attempt"))
                .and_then(Value::as_u64);
            match attempt {
                Some(a) if success && a >= 2 => None,
                _ => Some(format!(
                    "{} with {:?}, expected SUCCESS after a retry",
                    row.state, row.result
                )),
            }
        }
        Expect::Slept if !success => Some(format!("{} instead of SUCCESS", row.state)),
        Expect::Slept => None,
        Expect::Cancelled { acknowledged: true } if row.state != "CANCELLED" => {
            Some(format!("cancel acknowledged, ended {}", row.state))
        }
        Expect::Cancelled { .. } => {
            (!matches!(row.state.as_str(), "CANCELLED" | "SUCCESS")).then(|| row.state.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::workload::{Attempt, Task};
    use super::*;

    fn op(tasks: Vec<(Uuid, Expect)>, statuses: &[u16]) -> Op {
        Op {
            n: 1,
            kind: "multiply",
            key: None,
            started_ms: 0,
            attempts: statuses
                .iter()
                .map(|&status| Attempt {
                    at_ms: 0,
                    replica: 0,
                    status,
                })
                .collect(),
            outcome: Outcome::Accepted {
                tasks: tasks
                    .into_iter()
                    .map(|(id, expect)| Task {
                        id,
                        task_type: "multiply",
                        expect,
                    })
                    .collect(),
            },
        }
    }

    fn done(result: i64) -> Row {
        Row {
            id: Uuid::nil(),
            state: "SUCCESS".into(),
            result: Some(result.into()),
            attempts: 1,
            task_type: "multiply".into(),
            created_ms: 0.0,
            queued_ms: Some(1.0),
            started_ms: Some(2.0),
            finished_ms: Some(5.0),
        }
    }

    fn once() -> Audit {
        Audit {
            starts: 1,
            retries: 0,
            terminal_writes: 1,
        }
    }

    #[test]
    fn a_clean_history_is_clean() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let history = [op(
            vec![(a, Expect::Product { value: 6 }), (b, Expect::Slept)],
            &[503, 202],
        )];
        let rows = HashMap::from([(a, done(6)), (b, done(0))]);
        let audit = HashMap::from([(a, once()), (b, once())]);
        let r = check(&history, &rows, &audit, &BrokerLeft::default());
        assert!(r.clean(), "{r:?}");
        assert_eq!((r.accepted, r.recorded, r.server_errors), (2, 2, 0));
    }

    #[test]
    fn each_injected_anomaly_is_counted() {
        let ids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
        let history = [op(
            ids.iter()
                .map(|&id| (id, Expect::Product { value: 6 }))
                .collect(),
            &[500, 202],
        )];
        let mut rows: HashMap<Uuid, Row> = ids.iter().map(|&id| (id, done(6))).collect();
        rows.remove(&ids[0]); // accepted, never recorded
        rows.entry(ids[1]).and_modify(|r| r.state = "QUEUED".into()); // never ran
        rows.entry(ids[2]).and_modify(|r| r.result = Some(7.into())); // wrong answer
        let mut audit: HashMap<Uuid, Audit> = ids.iter().map(|&id| (id, once())).collect();
        audit.insert(
            ids[3],
            Audit {
                starts: 2,
                retries: 0,
                terminal_writes: 2,
            },
        );
        audit.insert(
            ids[4],
            Audit {
                starts: 2,
                retries: 0,
                terminal_writes: 1,
            },
        );
        audit.insert(
            ids[5],
            Audit {
                starts: 2,
                retries: 1,
                terminal_writes: 1,
            },
        );
        let r = check(&history, &rows, &audit, &BrokerLeft::default());
        assert_eq!(r.lost, 2, "no row, and a row that can never end: {r:?}");
        assert_eq!(r.stuck, 1);
        assert_eq!(r.wrong, 1);
        assert_eq!(r.double_committed, 1);
        assert_eq!(
            r.duplicates_executed, 2,
            "a retry Warren decided is not a duplicate"
        );
        assert_eq!(r.server_errors, 1);
        assert!(!r.clean());
    }

    #[test]
    fn a_task_still_queued_on_the_broker_is_stuck_not_lost() {
        let a = Uuid::new_v4();
        let history = [op(vec![(a, Expect::Slept)], &[202])];
        let mut row = done(0);
        row.state = "QUEUED".into();
        let broker = BrokerLeft {
            messages: 1,
            ..BrokerLeft::default()
        };
        let r = check(
            &history,
            &HashMap::from([(a, row)]),
            &HashMap::new(),
            &broker,
        );
        assert_eq!((r.stuck, r.lost), (1, 0));
    }

    #[test]
    fn an_acknowledged_cancel_must_end_cancelled() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let history = [op(
            vec![
                (a, Expect::Cancelled { acknowledged: true }),
                (
                    b,
                    Expect::Cancelled {
                        acknowledged: false,
                    },
                ),
            ],
            &[202],
        )];
        let rows = HashMap::from([(a, done(0)), (b, done(0))]);
        let r = check(&history, &rows, &HashMap::new(), &BrokerLeft::default());
        assert_eq!(r.wrong, 1, "{r:?}");
        assert_eq!(r.examples["wrong"].len(), 1);
    }
}
