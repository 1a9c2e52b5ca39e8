//! The connection loop: connect, declare, consume, hand each delivery to a
//! free slot; on any broker failure, reconnect with backoff; on shutdown,
//! stop consuming and let in-flight tasks finish within the grace period.

use crate::{Worker, acks::Acks, handler};
use futures_util::stream::{self, BoxStream, PollNext, SelectAll, StreamExt};
use lapin::{
    Channel, Connection, Consumer,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use std::{sync::Arc, time::Duration};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use warren_shared::{broker, wire::short_string};

/// First pause after losing the broker; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// A worker keeps trying at least this often, forever: the broker coming
/// back is the only way forward, and exiting would just restart us.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a session with the broker ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Runs sessions until shutdown, then drains. Returns when every in-flight
/// task has finished or the grace period is over.
pub(crate) async fn run(worker: Arc<Worker>, shutdown: CancellationToken) {
    let slots = Arc::clone(&worker.slots);
    let in_flight = TaskTracker::new();
    // Cancelled when the grace period runs out: running tasks are asked to
    // stop and handlers stop retrying database writes.
    let hard_stop = CancellationToken::new();
    let mut backoff = BACKOFF_MIN;
    // Channels of earlier sessions stay open while their in-flight tasks
    // finish, so those can still be acknowledged on them.
    let mut connections: Vec<(Connection, Channel, Arc<Acks>)> = Vec::new();
    // A settled delivery may wait behind a running one for a later
    // `multiple` acknowledgement; at most a quarter of the window does.
    let hold = usize::from(worker.settings.worker.effective_prefetch()) / 4;

    loop {
        let end = match open(&worker).await {
            Ok((conn, channel, consumers)) => {
                backoff = BACKOFF_MIN;
                worker.health.set_consuming(true);
                let acks = Acks::new(hold);
                let end = consume(
                    &worker, &channel, &acks, consumers, &slots, &in_flight, &hard_stop, &shutdown,
                )
                .await;
                worker.health.set_consuming(false);
                connections.retain(|(c, _, _)| c.status().connected());
                connections.push((conn, channel, acks));
                end
            }
            Err(e) => SessionEnd::Lost(e),
        };
        match end {
            SessionEnd::Shutdown => break,
            SessionEnd::Lost(reason) => {
                worker.metrics.reconnects.inc();
                tracing::warn!(%reason, retry_in = ?backoff, "broker session lost; reconnecting");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    drain(&worker, &in_flight, &hard_stop).await;
    for (conn, channel, acks) in connections {
        // Settled deliveries still waiting for a `multiple` go now.
        acks.finish().await;
        // Closing the channel hands every unacknowledged delivery back to
        // the broker, which redelivers it to another replica.
        let _ = channel.close(200, "worker shutting down".into()).await;
        let _ = conn.close(200, "worker shutting down".into()).await;
    }
}

/// Every consumer of a session as one stream: the high bands before the
/// normal queues, two deliveries to one while both have work.
type Deliveries = BoxStream<'static, Result<Delivery, lapin::Error>>;

async fn open(worker: &Worker) -> Result<(Connection, Channel, Deliveries), String> {
    // Prefetch is the number of deliveries the broker may push before we
    // acknowledge; with prefetch = concurrency every delivery of a queue
    // has a slot, so none waits here while another replica sits idle. It
    // applies per consumer: a high band's deliveries still arrive while the
    // normal queue's fill every slot, and wait here for the next free one.
    let prefetch = worker.settings.worker.effective_prefetch();
    let (conn, channel) = connect_channel(worker, &worker.identity, prefetch).await?;
    let normal = consume_all(worker, &channel, &worker.queues).await?;
    let high = consume_all(worker, &channel, &worker.high_bands).await?;
    tracing::info!(queues = ?worker.queues, high_bands = ?worker.high_bands, "consuming");
    let deliveries = stream::select_with_strategy(high, normal, two_to_one);
    Ok((conn, channel, deliveries.boxed()))
}

/// The weighting between the bands, as RabbitMQ 4's quorum queues weigh
/// their two priorities: the high band first twice, then the normal band
/// once. Whichever has nothing ready is skipped, so neither waits for the
/// other and the normal band is never starved.
fn two_to_one(turn: &mut u8) -> PollNext {
    *turn = (*turn + 1) % 3;
    if *turn == 0 {
        PollNext::Right
    } else {
        PollNext::Left
    }
}

async fn consume_all(
    worker: &Worker,
    channel: &Channel,
    queues: &[String],
) -> Result<SelectAll<Consumer>, String> {
    let mut consumers = SelectAll::new();
    for queue in queues {
        let consumer = channel
            .basic_consume(
                short_string(queue),
                short_string(&consumer_tag(worker, queue)),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("consuming from {queue}: {e}"))?;
        consumers.push(consumer);
    }
    Ok(consumers)
}

fn consumer_tag(worker: &Worker, queue: &str) -> String {
    format!("{}/{queue}", worker.identity)
}

/// A named connection with the topology declared on it, and a channel
/// with `prefetch`: what the task consumer and the Celery results loop
/// (`remote`) both start from.
pub(crate) async fn connect_channel(
    worker: &Worker,
    connection_name: &str,
    prefetch: u16,
) -> Result<(Connection, Channel), String> {
    let amqp = &worker.settings.amqp;
    let conn = broker::connect(&amqp.url, connection_name, amqp.connect_timeout())
        .await
        .map_err(|e| e.to_string())?;
    worker
        .catalog
        .topology()
        .declare(&conn)
        .await
        .map_err(|e| e.to_string())?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| format!("setting prefetch: {e}"))?;
    Ok((conn, channel))
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    worker: &Arc<Worker>,
    channel: &Channel,
    acks: &Arc<Acks>,
    mut consumers: Deliveries,
    slots: &Arc<Semaphore>,
    in_flight: &TaskTracker,
    hard_stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> SessionEnd {
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => break,
            next = consumers.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => return SessionEnd::Lost(e.to_string()),
            None => return SessionEnd::Lost("the broker cancelled our consumer".into()),
        };
        // Registered in the order the broker sent them, before anything
        // can be acknowledged after them.
        let own = acks.register(&delivery);
        if handler::try_adopt(worker, &delivery, &own) {
            continue;
        }
        // Wait for a free slot; with prefetch = concurrency this is immediate.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let worker = Arc::clone(worker);
        let hard_stop = hard_stop.clone();
        in_flight.spawn(async move {
            handler::handle(&worker, delivery, own, &hard_stop).await;
            drop(permit);
        });
    }
    // Stop new deliveries; those already prefetched but not started go
    // back to the broker when the channel closes.
    for queue in worker.queues.iter().chain(&worker.high_bands) {
        let tag = short_string(&consumer_tag(worker, queue));
        if let Err(e) = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await
        {
            tracing::debug!(error = %e, %queue, "cancelling consumer");
        }
    }
    SessionEnd::Shutdown
}

async fn drain(worker: &Worker, in_flight: &TaskTracker, hard_stop: &CancellationToken) {
    in_flight.close();
    let grace = worker.settings.worker.shutdown_grace();
    if !in_flight.is_empty() {
        tracing::info!(
            tasks = in_flight.len(),
            ?grace,
            "waiting for in-flight tasks"
        );
    }
    if tokio::time::timeout(grace, in_flight.wait()).await.is_err() {
        tracing::warn!(
            tasks = in_flight.len(),
            "grace period over; stopping the rest, their messages go back to the broker"
        );
        hard_stop.cancel();
        // Handlers stop at their next await point; give them a moment to
        // notice rather than dropping them mid-write.
        let _ = tokio::time::timeout(Duration::from_secs(2), in_flight.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::two_to_one;
    use futures_util::stream::{self, StreamExt};

    #[tokio::test]
    async fn the_high_band_gets_two_of_three_and_the_normal_band_the_rest() {
        let high = stream::iter(["h1", "h2", "h3", "h4"]);
        let normal = stream::iter(["n1", "n2", "n3", "n4"]);
        let order: Vec<&str> = stream::select_with_strategy(high, normal, two_to_one)
            .collect()
            .await;
        assert_eq!(
            order,
            ["h1", "h2", "n1", "h3", "h4", "n2", "n3", "n4"],
            "two high for each normal while both have work, then the normal band alone"
        );
    }
}
