//! The guards of the task state machine (`shared::store`), on a real
//! PostgreSQL: the races they exist for, played out deterministically.

use chrono::Utc;
use serde_json::{Map, json};
use std::{sync::Arc, time::Duration};
use tokio::sync::Barrier;
use uuid::Uuid;
use warren_shared::{
    codes::{ErrorCode, StoredError},
    envelope::TaskMessage,
    state::TaskState,
    store::{Cancellation, Claim, NewTask, Outcome, Owners, Retry, Store, Unique},
};
use warren_tests::TestEnv;

fn new_task(id: Uuid) -> NewTask {
    NewTask {
        id,
        task_type: "multiply".into(),
        queue: "default".into(),
        owner: None,
        input: json!({"x": 1, "y": 2}),
        eta: None,
        expires_at: None,
        idempotency_key: None,
        idempotency_fingerprint: None,
        origin: "test".into(),
        traceparent: None,
        publish_at: Utc::now() + chrono::Duration::seconds(60),
        reply_to: None,
        time_limit: None,
        soft_time_limit: None,
        callback: None,
        priority: 0,
        admission: None,
        unique: None,
    }
}

fn message(id: Uuid) -> TaskMessage {
    let mut kwargs = Map::new();
    kwargs.insert("x".into(), json!(1));
    kwargs.insert("y".into(), json!(2));
    TaskMessage::new(id, "multiply", kwargs)
}

async fn claim(store: &Store, id: Uuid, worker: &str, redelivered: bool) -> Claim {
    store
        .claim(
            &message(id),
            &json!({"x": 1, "y": 2}),
            "default",
            worker,
            redelivered,
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_attempt_never_overwrites_a_newer_one() {
    let env = TestEnv::new().await;
    let store = env.store();
    let id = Uuid::now_v7();
    store.insert(&new_task(id)).await.unwrap();

    assert!(matches!(
        claim(store, id, "a", false).await,
        Claim::Run { attempt: 1, .. }
    ));
    // Worker a's channel died; the broker redelivered to worker b.
    assert!(matches!(
        claim(store, id, "b", true).await,
        Claim::Run { attempt: 2, .. }
    ));

    assert!(
        store
            .finish(id, 2, &Outcome::Success(json!("from b")))
            .await
            .unwrap()
    );
    let stale = Outcome::Failure(StoredError::new(ErrorCode::TaskFailed, "from a", false));
    assert!(
        !store.finish(id, 1, &stale).await.unwrap(),
        "attempt 1 is stale"
    );

    let row = store.get(id).await.unwrap().unwrap();
    assert_eq!(row.state, TaskState::Success);
    assert_eq!(row.result, Some(json!("from b")));
    assert_eq!(row.worker.as_deref(), Some("b"));
}

/// An operator requeues a task whose attempt 1 is still running somewhere
/// (its message was dead-lettered by the delivery limit, say). The reset
/// once set attempts back to 0, so the new run was attempt 1 again and the
/// old attempt's late outcome passed the guard. Attempts now only grow,
/// and the retry budget starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_from_before_a_requeue_never_overwrites_the_new_run() {
    let env = TestEnv::new().await;
    let store = env.store();
    let id = Uuid::now_v7();
    store.insert(&new_task(id)).await.unwrap();
    assert!(matches!(
        claim(store, id, "old", false).await,
        Claim::Run {
            attempt: 1,
            budget_used: 1,
            ..
        }
    ));
    assert_eq!(
        store.reset_for_requeue(id).await.unwrap(),
        Some(TaskState::Started)
    );
    let again = claim(store, id, "new", false).await;
    assert!(
        matches!(
            again,
            Claim::Run {
                attempt: 2,
                budget_used: 1,
                ..
            }
        ),
        "{again:?}"
    );
    let late = Outcome::Success(json!("from the old attempt"));
    assert!(
        !store.finish(id, 1, &late).await.unwrap(),
        "attempt 1 is stale"
    );
    assert!(
        store
            .finish(id, 2, &Outcome::Success(json!("new")))
            .await
            .unwrap()
    );
    let row = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (row.state, row.result, row.attempts),
        (TaskState::Success, Some(json!("new")), 2)
    );
}

/// What a unique submission found, and the task it names.
async fn submit_unique(store: &Store, key: &str, debounce: bool) -> (&'static str, Uuid) {
    let t = NewTask {
        owner: Some("acme".into()),
        unique: Some((key.into(), debounce)),
        ..new_task(Uuid::now_v7())
    };
    match store.insert_unique(&t).await.unwrap() {
        Unique::New(row) => ("new", row.id),
        Unique::Existing(row) => ("existing", row.id),
        Unique::Debounced(row) => ("debounced", row.id),
    }
}

/// A unique key is held while its task is unfinished and let go when it
/// ends (a debounced one: when it leaves PENDING), by the next statement
/// at the latest. For good: the old task, retried, runs without it beside
/// the new holder, where taking it back would fail the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_key_is_released_for_good_when_its_task_ends() {
    let env = TestEnv::new().await;
    let store = env.store();
    let ("new", first) = submit_unique(store, "report", false).await else {
        panic!("the key was free");
    };
    assert_eq!(
        submit_unique(store, "report", false).await,
        ("existing", first)
    );
    let cancelled = store
        .cancel(first, Owners::One("acme"), "multiply")
        .await
        .unwrap();
    assert!(
        matches!(cancelled, Cancellation::Cancelled),
        "{cancelled:?}"
    );
    assert_eq!(store.get(first).await.unwrap().unwrap().unique_key, None);
    let ("new", second) = submit_unique(store, "report", false).await else {
        panic!("the key was not let go when its task ended");
    };
    let retried = store
        .retry(
            first,
            Owners::One("acme"),
            "multiply",
            chrono::Duration::seconds(60),
        )
        .await
        .unwrap();
    let Retry::Requeued(row) = retried else {
        panic!("{retried:?}");
    };
    assert_eq!((row.state, row.unique_key), (TaskState::Pending, None));
    assert_eq!(
        submit_unique(store, "report", false).await,
        ("existing", second)
    );

    let ("new", waiting) = submit_unique(store, "index", true).await else {
        panic!("the key was free");
    };
    assert_eq!(
        submit_unique(store, "index", true).await,
        ("debounced", waiting)
    );
    assert!(store.mark_queued(waiting).await.unwrap());
    assert!(matches!(
        submit_unique(store, "index", true).await,
        ("new", id) if id != waiting
    ));
}

/// A claim commits, then the connection drops before its answer arrives;
/// the worker sends it again. It must get the task back at the same
/// attempt: once it found its own claim "run by another worker", acked the
/// message, and left the task STARTED for good. A duplicate that is not a
/// retry is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_retried_after_a_lost_answer_gets_the_task_back_at_the_same_attempt() {
    use warren_shared::store::ClaimRequest;
    let env = TestEnv::new().await;
    let store = env.store();
    let id = Uuid::now_v7();
    store.insert(&new_task(id)).await.unwrap();
    let request = ClaimRequest::new(
        &message(id),
        &json!({"x": 1, "y": 2}),
        "default",
        false,
        true,
    );
    let first = store
        .claim_many(std::slice::from_ref(&request), "w")
        .await
        .unwrap();
    assert!(
        matches!(first[..], [Claim::Run { attempt: 1, .. }]),
        "{first:?}"
    );
    // The answer was lost; the same worker retries.
    let again = store.claim_many(&[request.retried()], "w").await.unwrap();
    assert!(
        matches!(again[..], [Claim::Run { attempt: 1, .. }]),
        "{again:?}"
    );
    // Not a retry, or another worker's retry: refused as before.
    let duplicate = store
        .claim_many(std::slice::from_ref(&request), "w")
        .await
        .unwrap();
    assert!(
        matches!(duplicate[..], [Claim::Skip { .. }]),
        "{duplicate:?}"
    );
    let theirs = store
        .claim_many(&[request.retried()], "other")
        .await
        .unwrap();
    assert!(matches!(theirs[..], [Claim::Skip { .. }]), "{theirs:?}");
    assert_eq!(store.get(id).await.unwrap().unwrap().attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_refused_for_finished_tasks_and_for_duplicates_of_running_ones() {
    let env = TestEnv::new().await;
    let store = env.store();
    let id = Uuid::now_v7();
    store.insert(&new_task(id)).await.unwrap();
    assert!(matches!(
        claim(store, id, "a", false).await,
        Claim::Run { attempt: 1, .. }
    ));

    // A second copy of the message (not a redelivery) while it runs.
    assert!(matches!(
        claim(store, id, "b", false).await,
        Claim::Skip {
            state: Some(TaskState::Started),
            ..
        }
    ));
    assert!(
        store
            .finish(id, 1, &Outcome::Success(json!(2)))
            .await
            .unwrap()
    );
    // Redelivered after it finished: acknowledged, not rerun.
    assert!(matches!(
        claim(store, id, "b", true).await,
        Claim::Skip {
            state: Some(TaskState::Success),
            reason: "already finished"
        }
    ));
    assert_eq!(store.get(id).await.unwrap().unwrap().attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marking_queued_never_undoes_a_faster_worker() {
    let env = TestEnv::new().await;
    let store = env.store();
    let id = Uuid::now_v7();
    store.insert(&new_task(id)).await.unwrap();
    // The worker got the message before the API recorded the confirm.
    assert!(matches!(
        claim(store, id, "fast", false).await,
        Claim::Run { attempt: 1, .. }
    ));
    assert!(!store.mark_queued(id).await.unwrap());
    let row = store.get(id).await.unwrap().unwrap();
    assert_eq!(row.state, TaskState::Started);
    assert!(
        row.publish_at.is_none(),
        "the claim took it out of the outbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_relays_never_take_the_same_row() {
    let env = TestEnv::new().await;
    let store = env.store().clone();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let mut t = new_task(Uuid::now_v7());
        t.publish_at = Utc::now() - chrono::Duration::seconds(1);
        store.insert(&t).await.unwrap();
        ids.push(t.id);
    }
    // Two relays, each holding its batch until both have one.
    let barrier = Arc::new(Barrier::new(2));
    let pass = |store: Store, barrier: Arc<Barrier>| async move {
        let mut taken = Vec::new();
        store
            .relay_pass(15, Duration::from_secs(1), &[], |due| {
                taken = due.iter().map(|d| d.message.id).collect();
                let ok: Vec<(Uuid, bool)> = taken.iter().map(|id| (*id, true)).collect();
                async move {
                    barrier.wait().await;
                    ok
                }
            })
            .await
            .unwrap();
        taken
    };
    let (a, b) = tokio::join!(
        pass(store.clone(), Arc::clone(&barrier)),
        pass(store.clone(), Arc::clone(&barrier))
    );
    assert_eq!(
        a.len() + b.len(),
        20,
        "between them they took every row once"
    );
    assert!(a.iter().all(|id| !b.contains(id)), "no row taken twice");
    for row in env.tasks(&ids).await {
        assert_eq!(row.state, TaskState::Queued);
        assert!(row.publish_at.is_none());
    }
}

/// Rows for a batch of claims to meet: `waiting` as recorded, `running`
/// claimed by worker `a`, `finished` claimed by `a` and succeeded.
async fn seed(store: &Store, waiting: &[Uuid], running: &[Uuid], finished: Uuid) {
    for &id in waiting.iter().chain(running).chain([&finished]) {
        store.insert(&new_task(id)).await.unwrap();
    }
    for &id in running.iter().chain([&finished]) {
        assert!(matches!(
            claim(store, id, "a", false).await,
            Claim::Run { .. }
        ));
    }
    assert!(
        store
            .finish(finished, 1, &Outcome::Success(json!(2)))
            .await
            .unwrap()
    );
}

/// The attempt each claim runs, `None` for one not run.
fn attempts_of(claims: &[Claim]) -> Vec<Option<i32>> {
    claims
        .iter()
        .map(|c| match c {
            Claim::Run { attempt, .. } => Some(*attempt),
            Claim::Skip { .. } | Claim::Conflict { .. } => None,
        })
        .collect()
}

/// Why a claim was not run, if it was skipped.
fn skipped_because(claim: &Claim) -> Option<&'static str> {
    match claim {
        Claim::Skip { reason, .. } => Some(reason),
        Claim::Run { .. } | Claim::Conflict { .. } => None,
    }
}

/// What a busy worker does: one statement claims many messages, and each
/// answer is what a claim of its own would have said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_claims_answers_each_like_a_single_claim() {
    use warren_shared::store::{ClaimRequest, Success};
    let env = TestEnv::new().await;
    let store = env.store();
    let input = json!({"x": 1, "y": 2});
    let request = |id: Uuid, redelivered: bool| {
        ClaimRequest::new(&message(id), &input, "default", redelivered, true)
    };
    let (queued, celery, finished, running, orphaned) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    seed(store, &[queued], &[running, orphaned], finished).await;

    let claims = store
        .claim_many(
            &[
                request(queued, false),
                request(celery, false),  // no row yet: created
                request(finished, true), // redelivered after it finished
                request(running, false), // a duplicate while it runs
                request(orphaned, true), // redelivered: its holder died
                request(queued, false),  // the same message twice in one batch
            ],
            "b",
        )
        .await
        .unwrap();
    assert_eq!(
        attempts_of(&claims),
        [Some(1), Some(1), None, None, Some(2), None],
        "{claims:?}"
    );
    assert_eq!(skipped_because(&claims[2]), Some("already finished"));
    assert_eq!(
        skipped_because(&claims[5]),
        Some("another worker is running it")
    );
    let created = store.get(celery).await.unwrap().unwrap();
    assert_eq!(
        (created.state, created.input, created.worker.as_deref()),
        (TaskState::Started, input.clone(), Some("b"))
    );

    // Results in one statement: the stale attempt of `orphaned` (1, now
    // 2 runs) is refused, the others recorded.
    let recorded = store
        .finish_successes(&[
            Success {
                id: queued,
                attempt: 1,
                result: json!(null),
            },
            Success {
                id: orphaned,
                attempt: 1,
                result: json!("stale"),
            },
            Success {
                id: celery,
                attempt: 1,
                result: json!({"n": 3}),
            },
        ])
        .await
        .unwrap();
    assert_eq!(recorded, [true, false, true]);
    let rows = env.tasks(&[queued, orphaned, celery]).await;
    let by_id = |id: Uuid| rows.iter().find(|r| r.id == id).unwrap();
    assert_eq!(
        by_id(queued).result,
        Some(json!(null)),
        "JSON null is a result"
    );
    assert_eq!(by_id(queued).state, TaskState::Success);
    assert_eq!(by_id(orphaned).state, TaskState::Started);
    assert_eq!(by_id(celery).result, Some(json!({"n": 3})));
}

/// A claim by key takes the committed rows of a batch at once and leaves
/// everything else to the full claim, without waiting for a row another
/// transaction is still inserting (an API between its INSERT and its
/// COMMIT, waiting for the broker's confirm). Whatever it leaves, the
/// full claim then answers as it always did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_by_key_takes_committed_rows_and_never_waits_for_an_insert() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    use warren_shared::store::ClaimRequest;
    let env = TestEnv::new().await;
    let store = env.store();
    let input = json!({"x": 1, "y": 2});
    let request = |id: Uuid, redelivered: bool, signed: bool| {
        ClaimRequest::new(&message(id), &input, "default", redelivered, signed)
    };
    let [ready, open, finished, running, unsigned, granted] = [(); 6].map(|_| Uuid::now_v7());
    seed(store, &[ready, unsigned, granted], &[running], finished).await;
    // The API's transaction: its row inserted, not yet committed.
    let api = sea_orm::Database::connect(env.database_url())
        .await
        .unwrap();
    let inserting = api.begin().await.unwrap();
    inserting
        .execute_unprepared(&format!(
            "INSERT INTO tasks (id, task_type, queue, state, input, queued_at)
             VALUES ('{open}', 'multiply', 'default', 'QUEUED', '{{\"x\": 1, \"y\": 2}}', now())"
        ))
        .await
        .unwrap();
    // Whole microseconds, as PostgreSQL keeps them (it would round ours).
    let at =
        chrono::SubsecRound::trunc_subsecs(Utc::now() - chrono::Duration::milliseconds(250), 6);
    let requests = [
        request(ready, false, true),
        request(open, false, true),
        request(finished, true, true),
        request(running, true, true), // redelivered: for the full claim
        request(ready, false, true),  // the same message twice
        request(unsigned, false, false),
        ClaimRequest::granted(&message(granted), &input, "default", false, true, at),
    ];
    let by_key = tokio::time::timeout(Duration::from_secs(10), store.claim_by_key(&requests, "b"))
        .await
        .expect("the claim by key waited for the uncommitted insert")
        .unwrap();
    let attempts: Vec<Option<i32>> = by_key
        .iter()
        .map(|c| match c {
            Some(Claim::Run { attempt, input, .. }) => {
                assert_eq!(*input, None, "a signed message's body is the row's input");
                Some(*attempt)
            }
            Some(other) => panic!("a claim by key answers Run or nothing: {other:?}"),
            None => None,
        })
        .collect();
    assert_eq!(attempts, [Some(1), None, None, None, None, None, Some(1)]);
    let row = store.get(granted).await.unwrap().unwrap();
    assert_eq!(
        (
            row.state,
            row.worker.as_deref(),
            row.started_at.map(|t| t.timestamp_micros())
        ),
        (TaskState::Started, Some("b"), Some(at.timestamp_micros())),
        "a granted start is recorded at the instant the rate limit gave"
    );
    let row = store.get(unsigned).await.unwrap().unwrap();
    assert_eq!(
        row.state,
        TaskState::Pending,
        "an unsigned message is left to the full claim"
    );

    // What it left, the full claim decides as before.
    inserting.commit().await.unwrap();
    let full = store.claim_many(&requests[1..6], "b").await.unwrap();
    assert_eq!(
        attempts_of(&full),
        [Some(1), None, Some(2), None, Some(1)],
        "{full:?}"
    );
    assert_eq!(skipped_because(&full[1]), Some("already finished"));
    assert_eq!(
        skipped_because(&full[3]),
        Some("another worker is running it")
    );

    // A paused type: nothing new starts by key either.
    let paused = Uuid::now_v7();
    store.insert(&new_task(paused)).await.unwrap();
    assert!(store.pause("type", "multiply", "test").await.unwrap());
    let by_key = store
        .claim_by_key(&[request(paused, false, true)], "b")
        .await
        .unwrap();
    assert_eq!(by_key, [None]);
    assert_eq!(
        store.get(paused).await.unwrap().unwrap().state,
        TaskState::Pending
    );
}

/// Another connection's transaction, holding row locks until dropped.
async fn lock_rows(env: &TestEnv, ids: &[Uuid]) -> sea_orm::DatabaseTransaction {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let db = sea_orm::Database::connect(env.database_url())
        .await
        .unwrap();
    let txn = db.begin().await.unwrap();
    let list: Vec<String> = ids.iter().map(|id| format!("'{id}'")).collect();
    txn.execute_unprepared(&format!(
        "SELECT id FROM tasks WHERE id IN ({}) FOR UPDATE",
        list.join(",")
    ))
    .await
    .unwrap();
    txn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marking_queued_passes_over_a_row_a_worker_is_claiming() {
    // The API marks a batch QUEUED while a worker's claim holds one of its
    // rows: waiting could deadlock against the worker's own batch, so the
    // mark leaves that row to the claim and does the rest at once.
    let env = TestEnv::new().await;
    let store = env.store();
    let (held, free) = (Uuid::now_v7(), Uuid::now_v7());
    for id in [held, free] {
        store.insert(&new_task(id)).await.unwrap();
    }
    let claiming = lock_rows(&env, &[held]).await;
    let marked = tokio::time::timeout(
        Duration::from_secs(10),
        store.mark_queued_many(&[held, free]),
    )
    .await
    .expect("the mark waited for the worker's lock")
    .unwrap();
    assert_eq!(marked, 1);
    drop(claiming);
    let rows = env.tasks(&[held, free]).await;
    let state = |id| rows.iter().find(|r| r.id == id).unwrap().state;
    assert_eq!(state(held), TaskState::Pending, "left for the claim");
    assert_eq!(state(free), TaskState::Queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_is_a_conflict_worth_retrying_not_a_broken_task() {
    use sea_orm::ConnectionTrait;
    use warren_shared::store::StoreError;
    let env = TestEnv::new().await;
    let store = env.store();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    for id in [a, b] {
        store.insert(&new_task(id)).await.unwrap();
    }
    // Two transactions each holding one row and wanting the other's:
    // PostgreSQL picks a victim and rolls it back with 40P01.
    let (first, second) = (lock_rows(&env, &[a]).await, lock_rows(&env, &[b]).await);
    let update = |id: Uuid| format!("UPDATE tasks SET updated_at = now() WHERE id = '{id}'");
    let (to_b, to_a) = (update(b), update(a));
    let (x, y) = tokio::join!(
        first.execute_unprepared(&to_b),
        second.execute_unprepared(&to_a),
    );
    let victim = match (x, y) {
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => StoreError::from(e),
        other => panic!("expected exactly one deadlock victim, got {other:?}"),
    };
    assert!(matches!(victim, StoreError::Conflict(_)), "{victim:?}");
    assert!(victim.is_retryable());
    assert!(
        !victim.is_unavailable(),
        "not a reason to report 'database down'"
    );
}
