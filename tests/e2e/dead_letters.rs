//! Messages that cannot be run are dead-lettered with a reason; the worker
//! keeps going; an operator can list and requeue them.

use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, BasicNackOptions},
    types::FieldTable,
};
use serde_json::{Value, json};
use std::{collections::BTreeMap, time::Duration};
use uuid::Uuid;
use warren_shared::{envelope, state::TaskState, wire};
use warren_tests::{TestEnv, wait_until};
use warren_worker::dead_letters;

/// A Celery-shaped message with the given body and task name.
fn celery_props(id: Uuid, task: &str) -> BasicProperties {
    wire::properties_from_json(&json!({
        "properties": {"content_type": "application/json", "content_encoding": "utf-8",
                       "correlation_id": id.to_string(), "delivery_mode": 2},
        "headers": {"lang": "py", "task": task, "id": id.to_string(), "retries": 0,
                    "timelimit": [null, null], "eta": null, "expires": null},
    }))
}

fn reasons(letters: &[dead_letters::DeadLetter]) -> BTreeMap<String, (String, String)> {
    letters
        .iter()
        .map(|l| {
            (
                l.task_id.map(|id| id.to_string()).unwrap_or_default(),
                (
                    l.code.clone().unwrap_or_default(),
                    l.reason.clone().unwrap_or_default(),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_dead_lettered_with_a_reason_and_the_worker_keeps_going() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker("w1").await;
    let amqp = env.amqp().await;
    let queue = env.queue("default");

    let before = api.submit_ok("multiply", &json!({"x": 2, "y": 3})).await;
    let (not_json, wrong_shape, unknown, pickled) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    amqp.publish(
        "",
        &queue,
        celery_props(not_json, "multiply"),
        b"\x80\x04not json at all",
    )
    .await;
    amqp.publish(
        "",
        &queue,
        celery_props(wrong_shape, "multiply"),
        br#"{"x": 6, "y": 7}"#,
    )
    .await;
    amqp.publish(
        "",
        &queue,
        celery_props(unknown, "no.such.task"),
        br#"[[], {}, {}]"#,
    )
    .await;
    amqp.publish(
        "",
        &queue,
        celery_props(pickled, "multiply")
            .with_content_type("application/x-python-serialize".into()),
        b"\x80\x04\x95garbage",
    )
    .await;
    // Not even Celery-shaped: no headers at all.
    amqp.publish("", &queue, BasicProperties::default(), b"hello")
        .await;
    // Through the tasks exchange with a routing key nobody bound: the
    // alternate exchange still brings it to a worker, which says why.
    let unrouted = Uuid::now_v7();
    amqp.publish(
        &env.topology().exchange(),
        "not.a.route",
        celery_props(unrouted, "not.a.route"),
        br#"[[], {}, {}]"#,
    )
    .await;
    let after = api.submit_ok("multiply", &json!({"x": 4, "y": 5})).await;

    let rows = env
        .wait_for_terminal(&[before, after], Duration::from_secs(10))
        .await;
    assert!(
        rows.iter().all(|r| r.state == TaskState::Success),
        "valid tasks around the garbage ran"
    );

    let dlq = env.topology().dead_letter_queue();
    wait_until("six dead letters", Duration::from_secs(10), || async {
        (amqp.queue_depth(&dlq).await.0 == 6).then_some(())
    })
    .await;
    let letters = dead_letters::list(
        &env.settings(),
        &env.topology(),
        &Default::default(),
        100,
        usize::MAX,
    )
    .await
    .unwrap();
    assert_eq!(letters.len(), 6);
    let by_id = reasons(&letters);
    let expect = |id: Uuid, code: &str, fragment: &str| {
        let (c, reason) = &by_id[&id.to_string()];
        assert_eq!(c, code, "{id}: {reason}");
        assert!(
            reason.contains(fragment),
            "{id}: `{reason}` lacks `{fragment}`"
        );
    };
    expect(not_json, "undecodable_message", "not valid JSON");
    expect(wrong_shape, "undecodable_message", "[args, kwargs, embed]");
    expect(unknown, "unknown_task", "unknown task type `no.such.task`");
    expect(
        pickled,
        "undecodable_message",
        "application/x-python-serialize",
    );
    expect(unrouted, "unknown_task", "unknown task type `not.a.route`");
    let headerless = letters
        .iter()
        .find(|l| l.task_id.is_none())
        .expect("the headerless one");
    assert_eq!(headerless.code.as_deref(), Some("undecodable_message"));
    // Listing removed nothing: the quorum queue takes the listed messages
    // back (asynchronously) when the listing's channel closes.
    wait_until(
        "the listed dead letters to be back",
        Duration::from_secs(10),
        || async { (amqp.queue_depth(&dlq).await.0 == 6).then_some(()) },
    )
    .await;
    amqp.close().await;
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_task_whose_message_is_garbled_is_marked_failed() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    // A garbled message proves no owner, so it may speak only for the
    // default owner's tasks (those any publisher can create anyway).
    let celery = api.client_for("celery").await;
    let id = celery.submit_ok("multiply", &json!({"x": 6, "y": 7})).await;
    let other = api.submit_ok("multiply", &json!({"x": 1, "y": 7})).await;
    // Take the real messages off the queue and put back garbled copies.
    let amqp = env.amqp().await;
    for _ in 0..2 {
        let original = amqp
            .get(&env.queue("default"))
            .await
            .expect("the task's message");
        amqp.publish(
            "",
            &env.queue("default"),
            original.delivery.properties.clone(),
            b"[[], {\"x\":",
        )
        .await;
    }

    let worker = env.spawn_worker("w1").await;
    let row = env
        .wait_for_terminal(&[id], Duration::from_secs(10))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Failure);
    let error = row.error.unwrap();
    assert_eq!(error["code"], "undecodable_message");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{error}"
    );
    let dlq = env.topology().dead_letter_queue();
    wait_until(
        "both garbled copies dead-lettered",
        Duration::from_secs(10),
        || async { (amqp.queue_depth(&dlq).await.0 == 2).then_some(()) },
    )
    .await;
    let untouched = env.tasks(&[other]).await.remove(0);
    assert_eq!(
        untouched.state,
        TaskState::Queued,
        "another owner's task is not failed by an unproven message"
    );
    assert_eq!(untouched.error, None);
    amqp.close().await;
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redelivered_past_the_delivery_limit_is_dead_lettered_by_the_broker() {
    let env = TestEnv::with(|s| s.amqp.delivery_limit = 2).await;
    let api = env.spawn_api().await;
    let id = api.submit_ok("noop", &json!({})).await;

    // A consumer that keeps handing the message back, like a worker that
    // crashes every time it takes it.
    let amqp = env.amqp().await;
    let mut consumer = amqp
        .channel()
        .basic_consume(
            wire::short_string(&env.queue("default")),
            "crashing".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let dlq = env.topology().dead_letter_queue();
    let mut deliveries = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // Each delivery is handed back; the broker dead-letters asynchronously
    // once the limit is passed, so watch for both.
    while amqp.queue_depth(&dlq).await.0 == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter after {deliveries} deliveries"
        );
        if let Ok(Some(delivery)) =
            tokio::time::timeout(Duration::from_millis(100), consumer.next()).await
        {
            deliveries += 1;
            assert!(deliveries <= 5, "the delivery limit never kicked in");
            delivery
                .unwrap()
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    assert_eq!(
        deliveries, 3,
        "delivered once, then redelivered up to the limit of 2"
    );
    let letters = dead_letters::list(
        &env.settings(),
        &env.topology(),
        &Default::default(),
        10,
        usize::MAX,
    )
    .await
    .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].task_id, Some(id));
    assert_eq!(
        letters[0].reason.as_deref(),
        Some("delivery_limit"),
        "{:?}",
        letters[0]
    );
    amqp.close().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_gives_a_failed_task_another_chance() {
    // Deploy 1 has a time limit far too tight: the report fails and is
    // dead-lettered.
    let env = TestEnv::with(|s| {
        let sleep = s.tasks.entry("sleep".into()).or_default();
        sleep.time_limit_seconds = Some(0.2);
        sleep.max_retries = Some(0);
    })
    .await;
    let api = env.spawn_api().await;
    let tight = env.spawn_worker("tight").await;
    let id = api.submit_ok("sleep", &json!({"seconds": 0.5})).await;
    let row = env
        .wait_for_terminal(&[id], Duration::from_secs(10))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Failure);
    tight.stop().await;

    // Deploy 2 fixes the limit; the operator requeues the dead letter.
    let mut fixed = env.settings();
    fixed.tasks.remove("sleep");
    let amqp = env.amqp().await;
    let dlq = env.topology().dead_letter_queue();
    wait_until("the dead letter", Duration::from_secs(10), || async {
        (amqp.queue_depth(&dlq).await.0 == 1).then_some(())
    })
    .await;
    let report = dead_letters::requeue(
        &fixed,
        &env.topology(),
        env.store(),
        &dead_letters::Matching::task_id(id),
        10,
    )
    .await
    .unwrap();
    assert_eq!(report.tasks_reset, 1, "{report:?}");
    assert_eq!(
        amqp.queue_depth(&dlq).await.0,
        0,
        "removed from the dead-letter queue"
    );

    let healthy = warren_tests::TestWorker::spawn_with(fixed, "healthy").await;
    let row = env
        .wait_for_terminal(&[id], Duration::from_secs(15))
        .await
        .remove(0);
    assert_eq!(row.state, TaskState::Success, "{:?}", row.error);
    assert_eq!(row.worker.as_deref(), Some(healthy.identity.as_str()));
    let history = env.store().attempts(id).await.unwrap();
    assert_eq!(
        history.len(),
        1,
        "the failed attempt is kept in the history"
    );
    assert_eq!(
        history[0].error.as_ref().unwrap()["code"],
        "time_limit_exceeded"
    );
    amqp.close().await;
    healthy.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_republishes_a_message_that_has_no_task() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker("w1").await;
    let amqp = env.amqp().await;
    let queue = env.queue("default");
    let id = Uuid::now_v7();
    amqp.publish(
        "",
        &queue,
        celery_props(id, "not.deployed.yet"),
        br#"[[], {}, {}]"#,
    )
    .await;
    let dlq = env.topology().dead_letter_queue();
    wait_until("the dead letter", Duration::from_secs(10), || async {
        (amqp.queue_depth(&dlq).await.0 == 1).then_some(())
    })
    .await;
    worker.stop().await;

    let report = dead_letters::requeue(
        &env.settings(),
        &env.topology(),
        env.store(),
        &Default::default(),
        10,
    )
    .await
    .unwrap();
    assert_eq!(report.republished, 1, "{report:?}");
    let back = amqp
        .get(&queue)
        .await
        .expect("back on the queue it was sent to");
    let d = envelope::describe(&back.delivery.properties, &back.delivery.data);
    assert_eq!(d["headers"]["task"], "not.deployed.yet");
    assert!(
        d["headers"].get("x-warren-reason").is_none(),
        "bookkeeping headers removed: {d}"
    );
    assert_eq!(d["body"], Value::from("[[], {}, {}]"));
    amqp.close().await;
}
