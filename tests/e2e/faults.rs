//! Infrastructure faults under load: broker connections force-closed,
//! PostgreSQL sessions terminated. Everything recovers by itself and every
//! task ends SUCCESS.

use futures_util::{StreamExt, stream};
use serde_json::json;
use std::{sync::Arc, time::Duration};
use uuid::Uuid;
use warren_shared::state::TaskState;
use warren_tests::{Management, TestEnv, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_closed_mid_load_lose_nothing() {
    const TASKS: usize = 500;
    let env = TestEnv::new().await;
    let api = Arc::new(env.spawn_api().await);
    let worker = env.spawn_worker_process("w", &[("WARREN_WORKER__CONCURRENCY", "8")]);
    let worker_name = worker.identity();
    let mgmt = Management::new(&env.settings());
    // The management API lists a connection once its first statistics are
    // in (a few seconds): wait for both before any load, so the cut lands
    // mid-flow.
    for name in [worker_name.as_str(), api.identity.as_str()] {
        wait_until(
            &format!("{name} to show in the management API"),
            Duration::from_secs(30),
            || async { (mgmt.count_connections(name).await >= 1).then_some(()) },
        )
        .await;
    }

    let submitter = {
        let api = Arc::clone(&api);
        tokio::spawn(async move {
            stream::iter(0..TASKS)
                .map(|_| {
                    let api = Arc::clone(&api);
                    async move { api.submit_ok("sleep", &json!({"seconds": 0.05})).await }
                })
                .buffered(8)
                .collect::<Vec<Uuid>>()
                .await
        })
    };
    let store = env.store();
    wait_until("100 tasks to finish", Duration::from_secs(60), || async {
        let done = store.count_in_state(TaskState::Success).await.unwrap();
        (done >= 100).then_some(())
    })
    .await;
    let cut = chrono::Utc::now();
    assert!(
        mgmt.close_connections(&worker_name).await >= 1,
        "the worker's connections were closed"
    );
    assert!(
        mgmt.close_connections(&api.identity).await >= 1,
        "the API's connection was closed"
    );

    let ids = submitter.await.unwrap();
    assert_eq!(ids.len(), TASKS, "every submission was accepted");
    let rows = env.wait_for_terminal(&ids, Duration::from_secs(90)).await;
    assert!(
        rows.iter().all(|r| r.state == TaskState::Success),
        "all {TASKS} succeeded"
    );
    // Redeliveries of tasks still running here were adopted by the running
    // attempt, not run again.
    let twice: Vec<_> = rows
        .iter()
        .filter(|r| r.attempts != 1)
        .map(|r| (r.id, r.attempts))
        .collect();
    assert!(twice.is_empty(), "tasks run more than once: {twice:?}");
    let after_cut = rows.iter().filter(|r| r.finished_at.unwrap() > cut).count();
    assert!(
        after_cut >= 100,
        "work went on after the cut ({after_cut} tasks)"
    );

    // The worker came back by itself and is consuming again.
    let amqp = env.amqp().await;
    let queue = env.queue("default");
    wait_until(
        "the worker to consume again",
        Duration::from_secs(30),
        || async { (amqp.queue_depth(&queue).await.1 == 1).then_some(()) },
    )
    .await;
    amqp.close().await;
    if std::env::var_os("TEST_LOG").is_none() {
        let log = worker.log();
        assert!(log.contains("broker session lost"), "{log}");
        assert_eq!(
            log.matches("consuming").count(),
            2,
            "consumed, lost, consumed again:\n{log}"
        );
    }
    drop(worker);
    Arc::try_unwrap(api).ok().expect("sole owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sessions_terminated_mid_load_lose_nothing() {
    const TASKS: usize = 300;
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker_process("w", &[("WARREN_WORKER__CONCURRENCY", "8")]);
    let input = json!({"seconds": 0.02});
    let ids: Vec<Uuid> = stream::iter(0..TASKS)
        .map(|_| api.submit_ok("sleep", &input))
        .buffered(16)
        .collect()
        .await;

    let mut killed = 0;
    for round in 1..=3 {
        wait_until("more tasks to finish", Duration::from_secs(60), || async {
            let done = env
                .store()
                .count_in_state(TaskState::Success)
                .await
                .unwrap();
            (done >= 60 * round).then_some(())
        })
        .await;
        // Mid-statement: a claim or an outcome write cut off, committed
        // or not, its answer lost. Polled until one is caught in the act.
        killed += wait_until(
            "a worker statement to cut off",
            Duration::from_secs(30),
            || async {
                let n = env.terminate_active_sessions("warren-worker").await;
                (n > 0).then_some(n)
            },
        )
        .await;
    }
    assert!(killed >= 3, "the worker's statements were cut off mid-way");

    let rows = env.wait_for_terminal(&ids, Duration::from_secs(90)).await;
    assert!(
        rows.iter().all(|r| r.state == TaskState::Success),
        "all {TASKS} succeeded\n{}",
        worker.log()
    );
    // No task ran twice: a claim whose answer was lost is taken back at
    // the same attempt, not left to look like "another worker's".
    let twice: Vec<_> = rows
        .iter()
        .filter(|r| r.attempts != 1)
        .map(|r| (r.id, r.attempts))
        .collect();
    assert!(
        twice.is_empty(),
        "attempts other than 1: {twice:?}\n{}",
        worker.log()
    );
    drop(worker);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_running_when_its_connection_drops_runs_once() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker_process("w", &[("WARREN_WORKER__CONCURRENCY", "4")]);
    let worker_name = worker.identity();
    let mgmt = Management::new(&env.settings());
    wait_until(
        "the worker to show in the management API",
        Duration::from_secs(30),
        || async { (mgmt.count_connections(&worker_name).await >= 1).then_some(()) },
    )
    .await;
    let input = json!({"seconds": 2});
    let ids: Vec<Uuid> = stream::iter(0..4)
        .map(|_| api.submit_ok("sleep", &input))
        .buffered(4)
        .collect()
        .await;
    wait_until("all 4 to be running", Duration::from_secs(20), || async {
        let rows = env.tasks(&ids).await;
        rows.iter()
            .all(|r| r.state == TaskState::Started)
            .then_some(())
    })
    .await;

    // The broker requeues the 4 messages and redelivers them to the
    // reconnected worker while their first runs are still going.
    assert!(mgmt.close_connections(&worker_name).await >= 1);
    let rows = env.wait_for_terminal(&ids, Duration::from_secs(30)).await;
    for row in &rows {
        assert_eq!(row.state, TaskState::Success);
        assert_eq!(
            row.attempts,
            1,
            "task {} ran again after the redelivery\n{}",
            row.id,
            worker.log()
        );
    }
    if std::env::var_os("TEST_LOG").is_none() {
        let log = worker.log();
        assert!(
            log.contains("already running here"),
            "redeliveries of running tasks were adopted:\n{log}"
        );
    }
    // Both deliveries of each task were settled: nothing left behind.
    let amqp = env.amqp().await;
    let queue = env.queue("default");
    wait_until(
        "the queue to be empty and consumed",
        Duration::from_secs(10),
        || async { (amqp.queue_depth(&queue).await == (0, 1)).then_some(()) },
    )
    .await;
    amqp.close().await;
    drop(worker);
    api.stop().await;
}

/// The broker is gone for 30 s from one worker's side (its connections cut
/// and refused by a proxy, the machine's RabbitMQ untouched): the API keeps
/// accepting, the worker keeps retrying with backoff, and once the broker
/// is back every task runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_the_broker_for_30_seconds_catches_up() {
    const DOWN_FOR: Duration = Duration::from_secs(30);
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let proxy = warren_tests::Proxy::start(env.broker_addr()).await;
    let via_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let worker = env.spawn_worker_process("w", &[("WARREN_AMQP__URL", &via_proxy)]);
    let amqp = env.amqp().await;
    let queue = env.queue("default");
    let consumers = |n: u32| {
        let (amqp, queue) = (&amqp, &queue);
        async move { (amqp.queue_depth(queue).await.1 == n).then_some(()) }
    };
    wait_until("the worker to consume", Duration::from_secs(30), || {
        consumers(1)
    })
    .await;

    // Some running when the cut comes, more submitted while it lasts.
    let input = json!({"seconds": 0.5});
    let mut ids: Vec<Uuid> = stream::iter(0..8)
        .map(|_| api.submit_ok("sleep", &input))
        .buffered(8)
        .collect()
        .await;
    wait_until("tasks to be running", Duration::from_secs(20), || async {
        let rows = env.tasks(&ids).await;
        rows.iter()
            .any(|r| r.state == TaskState::Started)
            .then_some(())
    })
    .await;
    proxy.set_up(false);
    let cut = tokio::time::Instant::now();
    wait_until(
        "the broker to see the worker gone",
        Duration::from_secs(30),
        || consumers(0),
    )
    .await;
    for _ in 0..20 {
        ids.push(api.submit_ok("noop", &json!({})).await);
    }
    tokio::time::sleep_until(cut + DOWN_FOR).await; // the outage itself, not a settle
    let waiting = env.store().count_in_state(TaskState::Queued).await.unwrap();
    assert!(
        waiting >= 20,
        "nothing ran while the worker had no broker: {waiting} queued"
    );
    proxy.set_up(true);

    let rows = env.wait_for_terminal(&ids, Duration::from_secs(60)).await;
    for row in &rows {
        assert_eq!(
            (row.state, row.attempts),
            (TaskState::Success, 1),
            "{row:?}\n{}",
            worker.log()
        );
    }
    assert!(
        worker.log().contains("reconnecting"),
        "it noticed and retried"
    );
    amqp.close().await;
    drop(worker);
    api.stop().await;
}
