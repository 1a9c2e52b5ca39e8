//! The API's and the relay's publisher: many batches at once on one
//! channel, each result the broker's answer for that very message.

use lapin::{
    BasicProperties, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use std::{collections::HashSet, sync::Arc, time::Duration};
use warren_shared::{
    broker::{Outgoing, PublishError, Publisher},
    envelope::Encoded,
    wire::short_string,
};
use warren_tests::TestEnv;

/// A queue that holds `CAPACITY` messages and has the broker refuse (nack)
/// every publish beyond that: which messages are refused depends on the
/// order they reach the broker, so the only way for the publisher to say
/// which were stored is to match each confirm or nack with its message.
/// Batches published from several threads at once must not cross them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_confirm_or_nack_is_matched_with_its_own_message_across_concurrent_batches() {
    const CAPACITY: i64 = 300;
    const PUBLISHERS: usize = 4;
    const BATCHES: usize = 25;
    const PER_BATCH: usize = 10;
    let env = TestEnv::new().await;
    let settings = env.settings();
    let name = format!("{}capped", settings.amqp.prefix);
    let amqp = env.amqp().await;
    let channel = amqp.channel();
    channel
        .exchange_declare(
            short_string(&name),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut capped = FieldTable::default();
    capped.insert("x-max-length".into(), AMQPValue::LongLongInt(CAPACITY));
    capped.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(short_string(&name), QueueDeclareOptions::default(), capped)
        .await
        .unwrap();
    channel
        .queue_bind(
            short_string(&name),
            short_string(&name),
            short_string("capped"),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let publisher = Arc::new(publisher(&env, Arc::new(env.topology())));
    let publishing = (0..PUBLISHERS).map(|p| {
        let (publisher, name) = (Arc::clone(&publisher), name.clone());
        tokio::spawn(async move {
            let mut stored = Vec::new();
            for b in 0..BATCHES {
                let batch: Vec<Outgoing> = (0..PER_BATCH)
                    .map(|m| Outgoing {
                        exchange: name.clone(),
                        routing_key: "capped".into(),
                        message: Encoded {
                            properties: BasicProperties::default(),
                            body: format!("{p}-{b}-{m}").into_bytes(),
                        },
                    })
                    .collect();
                for (out, result) in batch.iter().zip(publisher.publish_all(&batch).await) {
                    match result {
                        Ok(()) => stored.push(out.message.body.clone()),
                        Err(PublishError::Nacked) => {}
                        Err(e) => panic!("neither confirmed nor refused: {e}"),
                    }
                }
            }
            stored
        })
    });
    let mut confirmed = HashSet::new();
    for stored in futures_util::future::join_all(publishing).await {
        confirmed.extend(stored.unwrap());
    }
    publisher.close().await;

    let on_queue: HashSet<Vec<u8>> = amqp
        .drain(&name)
        .await
        .into_iter()
        .map(|m| m.delivery.data)
        .collect();
    assert_eq!(on_queue.len() as i64, CAPACITY, "the queue filled up");
    assert_eq!(
        confirmed.len(),
        on_queue.len(),
        "as many confirmed as stored"
    );
    assert!(
        confirmed == on_queue,
        "the confirmed messages are the stored ones"
    );
    channel
        .queue_delete(short_string(&name), QueueDeleteOptions::default())
        .await
        .unwrap();
    amqp.close().await;
}

/// A closed publisher stays closed. A publish after `close()` (a batch of
/// submissions that finished after the API stopped) fails as unavailable,
/// its rows left to the outbox, rather than reconnecting and declaring
/// the topology again: after a test's teardown had deleted the queues,
/// that put them back on the shared broker (seen once in CI, from
/// `api_abuse::a_request_past_its_timeout_gets_503`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_publisher_neither_reconnects_nor_declares_the_topology() {
    let env = TestEnv::new().await;
    let topology = Arc::new(env.topology());
    let publisher = publisher(&env, Arc::clone(&topology));
    publisher.warm_up().await.unwrap();
    publisher.close().await;
    let amqp = env.amqp().await;
    topology.delete(amqp.channel()).await.unwrap();
    let out = Outgoing {
        exchange: topology.exchange(),
        routing_key: "noop".into(),
        message: Encoded {
            properties: BasicProperties::default(),
            body: b"after close".to_vec(),
        },
    };
    let published = publisher.publish(&out).await;
    assert!(
        matches!(published, Err(PublishError::Unavailable(_))),
        "{published:?}"
    );
    assert!(!publisher.is_connected());
    let queue = topology.queue("default");
    let declared = amqp
        .connection()
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            short_string(&queue),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await;
    assert!(declared.is_err(), "{queue} was declared again");
}

/// The publisher the API builds, on this test's broker and topology.
fn publisher(env: &TestEnv, topology: Arc<warren_shared::topology::Topology>) -> Publisher {
    let settings = env.settings();
    Publisher::new(
        settings.amqp.url.clone(),
        format!("{}publisher", settings.amqp.prefix),
        Duration::from_secs(5),
        Duration::from_secs(10),
        topology,
    )
}
