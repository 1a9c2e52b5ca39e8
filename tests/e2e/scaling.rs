//! Replacing workers while work flows: what a rolling deploy (Kubernetes
//! rolling update, `docker compose up` with a new image, `scripts/scale.sh`)
//! does to a running system.

use serde_json::json;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use warren_shared::state::TaskState;
use warren_tests::{TestEnv, WorkerProcess, wait_until};

const TASKS: usize = 1_000;
const REPLICAS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_every_worker_loses_nothing() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let amqp = env.amqp().await;
    let queue = env.queue("default");
    let concurrency = [("WARREN_WORKER__CONCURRENCY", "4")];
    let consumers_reach = |n: u32| {
        let (amqp, queue) = (&amqp, &queue);
        async move {
            wait_until(
                &format!("{n} consumers on {queue}"),
                Duration::from_secs(30),
                || async move { (amqp.queue_depth(queue).await.1 == n).then_some(()) },
            )
            .await
        }
    };

    let mut old: Vec<WorkerProcess> = (0..REPLICAS)
        .map(|i| env.spawn_worker_process(&format!("old-{i}"), &concurrency))
        .collect();
    consumers_reach(REPLICAS as u32).await;

    // Arrivals spread over several seconds (about 100/s, below the three
    // replicas' 240/s capacity), so every replacement below happens while
    // tasks are still arriving and running.
    let submitted = Arc::new(AtomicUsize::new(0));
    let producer = {
        let api = (*api).clone();
        let submitted = submitted.clone();
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(10));
            let mut requests = tokio::task::JoinSet::new();
            for _ in 0..TASKS {
                pace.tick().await;
                let (api, submitted) = (api.clone(), submitted.clone());
                requests.spawn(async move {
                    let id = api.submit_ok("sleep", &json!({"seconds": 0.05})).await;
                    submitted.fetch_add(1, Ordering::Relaxed);
                    id
                });
            }
            requests.join_all().await
        })
    };
    wait_until("the first 100 submissions", Duration::from_secs(30), || {
        let n = submitted.load(Ordering::Relaxed);
        async move { (n >= 100).then_some(()) }
    })
    .await;

    // One by one: start the replacement, wait until it consumes, then
    // SIGTERM the old replica and insist on a clean exit.
    let mut new = Vec::new();
    let mut retired = Vec::new();
    for i in 0..REPLICAS {
        new.push(env.spawn_worker_process(&format!("new-{i}"), &concurrency));
        consumers_reach(REPLICAS as u32 + 1).await;
        let mut victim = old.remove(0);
        retired.push(victim.identity());
        let in_flight = submitted.load(Ordering::Relaxed) < TASKS;
        let status = victim.terminate(Duration::from_secs(20)).await;
        assert!(
            status.success(),
            "{} exited {status:?}\n{}",
            victim.name,
            victim.log()
        );
        assert!(
            in_flight,
            "replacement {i} happened while tasks were still arriving"
        );
        consumers_reach(REPLICAS as u32).await;
    }

    let ids = producer.await.expect("producer task");
    assert_eq!(ids.len(), TASKS);
    let rows = env.wait_for_terminal(&ids, Duration::from_secs(120)).await;
    let not_once: Vec<_> = rows
        .iter()
        .filter(|r| r.state != TaskState::Success || r.attempts != 1)
        .map(|r| (r.id, r.state, r.attempts))
        .collect();
    assert!(
        not_once.is_empty(),
        "every task succeeds on its first and only attempt; these did not: {not_once:?}"
    );
    for identity in &retired {
        assert!(
            rows.iter().any(|r| r.worker.as_deref() == Some(identity)),
            "{identity} ran tasks before it was replaced"
        );
    }
    let by_new = rows
        .iter()
        .filter(|r| {
            new.iter()
                .any(|w| r.worker.as_deref() == Some(&w.identity()))
        })
        .count();
    assert!(by_new > 0, "the replacements took over the work");
    let (messages, consumers) = amqp.queue_depth(&queue).await;
    assert_eq!(
        (messages, consumers),
        (0, REPLICAS as u32),
        "nothing left in the queue, only the new replicas consuming"
    );
    amqp.close().await;
    api.stop().await;
}
