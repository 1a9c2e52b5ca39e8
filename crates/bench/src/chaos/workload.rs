//! The clients of a chaos run: an open loop of operations at a fixed rate
//! spread over the API replicas, each operation's every HTTP attempt and
//! final answer written to the history the checker reads.
//!
//! An operation is one of: a single `multiply` with an Idempotency-Key
//! (retried, on any replica, until an answer or its deadline: the key
//! makes a retry safe), a batch of ten (never retried: a batch has no key,
//! so a lost answer leaves it unknown), a `flaky` task that fails its first
//! attempt and is retried by Warren, and a `sleep` with a countdown, half of
//! them cancelled right after they were accepted.

use super::rng::Rng;
use serde::Serialize;
use serde_json::{Value, json};
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::time::Instant;
use uuid::Uuid;

/// What an accepted task must end as.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Expect {
    /// SUCCESS with this product.
    Product { value: i64 },
    /// SUCCESS, having failed its first attempt on purpose.
    Flaky,
    /// SUCCESS.
    Slept,
    /// CANCELLED (the cancel was accepted before it started), or SUCCESS
    /// if the answer said it was already running or finished.
    Cancelled { acknowledged: bool },
}

#[derive(Debug, Clone, Serialize)]
pub struct Task {
    pub id: Uuid,
    pub task_type: &'static str,
    pub expect: Expect,
}

/// One HTTP attempt: when (ms since the run started), which replica, and
/// its status (0: no answer: refused, reset or timed out).
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub at_ms: u64,
    pub replica: usize,
    pub status: u16,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// 202: these tasks exist and must each end once.
    Accepted { tasks: Vec<Task> },
    /// A final refusal (4xx other than 409/429), or out of retries.
    Refused { status: u16 },
    /// No answer that says what happened (a batch whose answer was lost).
    Unknown,
}

#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub n: u64,
    pub kind: &'static str,
    pub key: Option<String>,
    pub started_ms: u64,
    pub attempts: Vec<Attempt>,
    pub outcome: Outcome,
}

#[derive(Clone)]
pub struct Clients {
    pub apis: Vec<String>,
    pub key: String,
    pub http: reqwest::Client,
    pub epoch: Instant,
    pub history: Arc<Mutex<Vec<Op>>>,
    /// Every operation a batch of ten.
    pub batches_only: bool,
}

/// How long a keyed single submission keeps retrying.
const OP_DEADLINE: Duration = Duration::from_secs(60);
const BATCH: i64 = 10;

impl Clients {
    pub fn ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Runs operations at `rate` per second until `stop` is set, at most
    /// `max_in_flight` at once (an operation retrying through an outage
    /// holds its place, so the load is bounded whatever the faults).
    pub async fn run(self, rate: f64, stop: Arc<AtomicBool>, seed: u64, max_in_flight: usize) {
        let mut rng = Rng::new(seed);
        let gate = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut tasks = tokio::task::JoinSet::new();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let Ok(permit) = gate.clone().try_acquire_owned() else {
                continue;
            };
            n += 1;
            let choice = if self.batches_only {
                50
            } else {
                rng.below(100)
            };
            let (a, b) = (rng.below(1000) as i64, rng.below(1000) as i64);
            let replica = rng.below(self.apis.len() as u64) as usize;
            let me = self.clone();
            tasks.spawn(async move {
                let op = me.operation(n, choice, a, b, replica).await;
                me.history.lock().map(|mut h| h.push(op)).ok();
                drop(permit);
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn operation(&self, n: u64, choice: u64, a: i64, b: i64, replica: usize) -> Op {
        match choice {
            0..=49 => {
                self.single(
                    n,
                    "multiply",
                    json!({"x": a, "y": b}),
                    "",
                    replica,
                    Expect::Product { value: a * b },
                )
                .await
            }
            50..=64 => self.batch(n, a, b, replica).await,
            65..=79 => {
                self.single(
                    n,
                    "flaky",
                    json!({"fail_times": 1}),
                    "",
                    replica,
                    Expect::Flaky,
                )
                .await
            }
            _ => self.countdown(n, choice.is_multiple_of(2), replica).await,
        }
    }

    /// A keyed single submission, retried until it is answered.
    async fn single(
        &self,
        n: u64,
        task_type: &'static str,
        input: Value,
        query: &str,
        mut replica: usize,
        expect: Expect,
    ) -> Op {
        let key = Uuid::new_v4().to_string();
        let started_ms = self.ms();
        let deadline = Instant::now() + OP_DEADLINE;
        let mut attempts = Vec::new();
        let outcome = loop {
            let url = format!("{}/tasks/{task_type}{query}", self.apis[replica]);
            let sent = self.ms();
            let answer = self
                .http
                .post(&url)
                .bearer_auth(&self.key)
                .header("Idempotency-Key", &key)
                .json(&input)
                .send()
                .await;
            let (status, body) = read(answer).await;
            attempts.push(Attempt {
                at_ms: sent,
                replica,
                status,
            });
            match status {
                200..=202 => match id_of(&body) {
                    Some(id) => {
                        break Outcome::Accepted {
                            tasks: vec![Task {
                                id,
                                task_type,
                                expect,
                            }],
                        };
                    }
                    None => break Outcome::Unknown,
                },
                // Unanswered, overloaded, unavailable, or the first request
                // with this key still in progress: the key makes it safe to
                // ask again.
                0 | 409 | 429 | 500..=599 if Instant::now() < deadline => {
                    replica = (replica + 1) % self.apis.len();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                0 => break Outcome::Unknown,
                s => break Outcome::Refused { status: s },
            }
        };
        Op {
            n,
            kind: task_type,
            key: Some(key),
            started_ms,
            attempts,
            outcome,
        }
    }

    /// Ten multiplications in one request. Not retried when unanswered:
    /// without a key a second request would be ten more tasks.
    async fn batch(&self, n: u64, a: i64, b: i64, replica: usize) -> Op {
        let inputs: Vec<Value> = (0..BATCH).map(|i| json!({"x": a + i, "y": b})).collect();
        let started_ms = self.ms();
        let url = format!("{}/tasks/multiply/batch", self.apis[replica]);
        let answer = self
            .http
            .post(&url)
            .bearer_auth(&self.key)
            .json(&json!({ "tasks": inputs }))
            .send()
            .await;
        let (status, body) = read(answer).await;
        let outcome = match status {
            202 => batch_tasks(&body, a, b),
            400..=499 => Outcome::Refused { status },
            _ => Outcome::Unknown,
        };
        let attempts = vec![Attempt {
            at_ms: started_ms,
            replica,
            status,
        }];
        Op {
            n,
            kind: "batch",
            key: None,
            started_ms,
            attempts,
            outcome,
        }
    }

    /// A sleep that waits two seconds before it may start; cancelled right
    /// away when `cancel`.
    async fn countdown(&self, n: u64, cancel: bool, replica: usize) -> Op {
        let mut op = self
            .single(
                n,
                "sleep",
                json!({"seconds": 0.05}),
                "?countdown=2",
                replica,
                Expect::Slept,
            )
            .await;
        if !cancel {
            return op;
        }
        op.kind = "cancel";
        if let Outcome::Accepted { tasks } = &mut op.outcome {
            for task in tasks.iter_mut() {
                let acknowledged = self.cancel(task.id, replica, &mut op.attempts).await;
                task.expect = Expect::Cancelled { acknowledged };
            }
        }
        op
    }

    /// Cancels until answered: true if the answer was "cancelled" (200).
    async fn cancel(&self, id: Uuid, mut replica: usize, attempts: &mut Vec<Attempt>) -> bool {
        let deadline = Instant::now() + OP_DEADLINE;
        loop {
            let url = format!("{}/tasks/sleep/{id}/cancel", self.apis[replica]);
            let sent = self.ms();
            let answer = self.http.post(&url).bearer_auth(&self.key).send().await;
            let (status, _) = read(answer).await;
            attempts.push(Attempt {
                at_ms: sent,
                replica,
                status,
            });
            match status {
                200 => return true,
                0 | 429 | 500..=599 if Instant::now() < deadline => {
                    replica = (replica + 1) % self.apis.len();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => return false,
            }
        }
    }
}

async fn read(answer: Result<reqwest::Response, reqwest::Error>) -> (u16, Value) {
    match answer {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

fn id_of(body: &Value) -> Option<Uuid> {
    body.get("id")?.as_str()?.parse().ok()
}

fn batch_tasks(body: &Value, a: i64, b: i64) -> Outcome {
    let ids: Vec<Uuid> = body
        .get("tasks")
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(id_of).collect())
        .unwrap_or_default();
    if ids.len() != BATCH as usize {
        return Outcome::Unknown;
    }
    let tasks = ids
        .into_iter()
        .zip(0..)
        .map(|(id, i)| Task {
            id,
            task_type: "multiply",
            expect: Expect::Product { value: (a + i) * b },
        })
        .collect();
    Outcome::Accepted { tasks }
}
