//! The connection loop: connect, declare, consume, hand each delivery to a
//! free slot; on any broker failure, reconnect with backoff; on shutdown,
//! stop consuming and let in-flight tasks finish within the grace period.

use crate::{Worker, acks::Acks, handler};
use futures_util::stream::{SelectAll, StreamExt};
use lapin::{
    Channel, Connection, Consumer,
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

async fn open(worker: &Worker) -> Result<(Connection, Channel, SelectAll<Consumer>), String> {
    // Prefetch is the number of deliveries the broker may push before we
    // acknowledge; with prefetch = concurrency every delivery has a slot,
    // so none waits here while another replica sits idle.
    let prefetch = worker.settings.worker.effective_prefetch();
    let (conn, channel) = connect_channel(worker, &worker.identity, prefetch).await?;
    let mut consumers = SelectAll::new();
    for queue in &worker.queues {
        let consumer = channel
            .basic_consume(
                short_string(queue),
                short_string(&format!("{}/{queue}", worker.identity)),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("consuming from {queue}: {e}"))?;
        consumers.push(consumer);
    }
    tracing::info!(queues = ?worker.queues, "consuming");
    Ok((conn, channel, consumers))
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
    mut consumers: SelectAll<Consumer>,
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
    for queue in &worker.queues {
        let tag = short_string(&format!("{}/{queue}", worker.identity));
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
