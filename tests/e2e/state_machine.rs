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
    store::{Claim, NewTask, Outcome, Store},
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
            .relay_pass(15, Duration::from_secs(1), |due| {
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
