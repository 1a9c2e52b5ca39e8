//! Talking to RabbitMQ: named connections, and a [`Publisher`] that waits for
//! publisher confirms and reconnects by itself.
//!
//! The publisher never blocks a caller for long when the broker is away: a
//! failed connect is remembered and retried on a growing backoff, and calls
//! in between fail at once. Callers (the API, the relay) have the task
//! recorded in PostgreSQL already, so a failed publish delays a task but
//! never loses it.

use crate::{
    envelope::{Encoded, TaskMessage},
    signing::Signer,
    topology::{Topology, TopologyError},
    wire::short_string as short,
};
use futures_util::future::{MaybeDone, join_all, maybe_done};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use secrecy::{ExposeSecret, SecretString};
use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::{sync::Mutex, time::Instant};

/// Publishes of one batch handed to lapin's I/O thread at once.
const SENDS_AT_ONCE: usize = 64;

/// First pause after a failed connect; doubles up to [`RECONNECT_BACKOFF_MAX`].
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A broker that has been away for a while is retried at least this often.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("connecting to the broker timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("connecting to the broker: {0}")]
    Connect(lapin::Error),
    #[error("opening a channel: {0}")]
    Channel(lapin::Error),
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker unavailable ({0}); retrying in the background")]
    Unavailable(String),
    #[error("publishing: {0}")]
    Failed(lapin::Error),
    #[error("the broker did not confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound for routing key `{0}`")]
    Unroutable(String),
}

/// Opens a connection named so the management UI shows who is who
/// (`warren-worker@host:pid`). The URL's password never reaches a log line.
///
/// `url` may name several nodes of a cluster, separated by `;` (Celery's
/// form): each connection starts at a node picked by the clock's
/// nanoseconds, so the connections of many replicas spread over the nodes,
/// then tries each of the rest in turn (a dead node refuses at once).
pub async fn connect(
    url: &SecretString,
    name: &str,
    timeout: Duration,
) -> Result<Connection, BrokerError> {
    let nodes: Vec<&str> = node_urls(url).collect();
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    let mut last = BrokerError::ConnectTimeout(timeout);
    for k in 0..nodes.len() {
        let node = nodes[(start + k) % nodes.len()];
        match connect_node(node, name, timeout).await {
            Ok(conn) => {
                if nodes.len() > 1 {
                    tracing::info!(node = %node_label(node), connection = name, "connected to broker node");
                }
                return Ok(conn);
            }
            Err(e) => {
                if nodes.len() > 1 {
                    tracing::warn!(node = %node_label(node), error = %e, "broker node unavailable; trying the next");
                }
                last = e;
            }
        }
    }
    Err(last)
}

async fn connect_node(url: &str, name: &str, timeout: Duration) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(timeout, Connection::connect(url, properties)).await {
        Err(_) => Err(BrokerError::ConnectTimeout(timeout)),
        Ok(Err(e)) => Err(BrokerError::Connect(e)),
        Ok(Ok(conn)) => Ok(conn),
    }
}

/// The node URLs in `amqp.url`: one, or several separated by `;`.
pub fn node_urls(url: &SecretString) -> impl Iterator<Item = &str> {
    url.expose_secret()
        .split(';')
        .map(str::trim)
        .filter(|u| !u.is_empty())
}

/// `host:port` of a node URL, for logs (never the password).
fn node_label(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

/// User, password and vhost of an AMQP URL (its first node's, when it
/// names several): the management API takes the same credentials. `None`
/// if the URL does not parse.
pub fn credentials(url: &SecretString) -> Option<(String, SecretString, String)> {
    let uri: lapin::uri::AMQPUri = node_urls(url).next()?.parse().ok()?;
    let info = uri.authority.userinfo;
    Some((info.username, SecretString::from(info.password), uri.vhost))
}

/// One identity per process and role, used for connection names, the
/// `worker` recorded on tasks and Celery's `origin` header.
pub fn process_identity(role: &str) -> String {
    identity(role, std::process::id())
}

/// `role@host:pid`, the identity of a process on this host.
pub fn identity(role: &str, pid: u32) -> String {
    let host = gethostname::gethostname();
    format!("{role}@{}:{pid}", host.to_string_lossy())
}

/// A message to publish: where to, and what.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub message: Encoded,
}

impl Outgoing {
    /// A task message to the tasks exchange, routed by its task type (or
    /// to its queue's high band, see [`Topology::publish_target`]), its
    /// owner signed when a signer is given (what Warren's own publishers do).
    /// A message for Celery workers to run (its `reply_to` is Warren's
    /// reply queue) carries a reply token as its correlation id, which
    /// their results echo back (`Signer::reply_token`).
    pub fn task(topology: &Topology, message: &TaskMessage, signer: Option<&Signer>) -> Self {
        let mut encoded = match signer {
            Some(signer) => message.encode_signed(signer),
            None => message.encode(),
        };
        let to_celery = message.reply_to.is_some() && message.reply_to == topology.reply_queue();
        if let (true, Some(signer), Some(owner)) = (to_celery, signer, &message.owner) {
            let token = signer.reply_token(message.id, &message.task, owner);
            encoded.properties = encoded
                .properties
                .with_correlation_id(crate::wire::short_string(&token));
        }
        let (exchange, routing_key) = topology.publish_target(&message.task, message.priority);
        Self {
            exchange,
            routing_key,
            message: encoded,
        }
    }
}

/// Publishes with confirms over one lazily (re)connected channel.
/// Cheap to share (`Arc<Publisher>`); publishes from many tasks pipeline on
/// the same channel.
pub struct Publisher {
    url: SecretString,
    connection_name: String,
    connect_timeout: Duration,
    confirm_timeout: Duration,
    topology: Arc<Topology>,
    /// Signs the owners of the task messages this publisher builds.
    signer: Option<Signer>,
    link: Mutex<Link>,
    connected: AtomicBool,
    /// Set by [`Publisher::close`]: no reconnecting after it.
    closed: AtomicBool,
    /// Held while a batch's publishes take their delivery tags and queue
    /// their frames (see [`Publisher::publish_all`]).
    first_polls: std::sync::Mutex<()>,
}

#[derive(Default)]
struct Link {
    current: Option<(Connection, Channel)>,
    backoff: Option<Duration>,
    retry_at: Option<Instant>,
    last_error: String,
}

impl Publisher {
    pub fn new(
        url: SecretString,
        connection_name: String,
        connect_timeout: Duration,
        confirm_timeout: Duration,
        topology: Arc<Topology>,
    ) -> Self {
        Self {
            url,
            connection_name,
            connect_timeout,
            confirm_timeout,
            topology,
            signer: None,
            link: Mutex::new(Link::default()),
            connected: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            first_polls: std::sync::Mutex::new(()),
        }
    }

    /// Signs the owner of every task message built by [`Publisher::task`].
    pub fn with_signer(mut self, signer: Signer) -> Self {
        self.signer = Some(signer);
        self
    }

    /// A task message to the tasks exchange, signed with this publisher's key.
    pub fn task(&self, message: &TaskMessage) -> Outgoing {
        Outgoing::task(&self.topology, message, self.signer.as_ref())
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// Whether the last attempt to use the broker found it there.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Connects now rather than on the first publish, so startup logs say
    /// whether the broker is reachable. Failure is not fatal.
    pub async fn warm_up(&self) -> Result<(), PublishError> {
        self.channel().await.map(drop)
    }

    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut link = self.link.lock().await;
        if self.closed.load(Ordering::Relaxed) {
            return Err(PublishError::Unavailable(
                "the publisher is closed (shutting down)".into(),
            ));
        }
        if let Some((conn, channel)) = &link.current {
            if conn.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
            tracing::warn!("broker connection lost; reconnecting");
            link.current = None;
            self.connected.store(false, Ordering::Relaxed);
        }
        if let Some(at) = link.retry_at
            && Instant::now() < at
        {
            return Err(PublishError::Unavailable(link.last_error.clone()));
        }
        match self.open().await {
            Ok((conn, channel)) => {
                if link.backoff.is_some() {
                    tracing::info!("broker connection restored");
                }
                link.current = Some((conn, channel.clone()));
                link.backoff = None;
                link.retry_at = None;
                self.connected.store(true, Ordering::Relaxed);
                Ok(channel)
            }
            Err(e) => {
                let backoff = link.backoff.map_or(RECONNECT_BACKOFF_MIN, |b| {
                    (b * 2).min(RECONNECT_BACKOFF_MAX)
                });
                tracing::warn!(error = %e, retry_in = ?backoff, "broker unavailable");
                link.backoff = Some(backoff);
                link.retry_at = Some(Instant::now() + backoff);
                link.last_error = e.to_string();
                Err(PublishError::Unavailable(link.last_error.clone()))
            }
        }
    }

    async fn open(&self) -> Result<(Connection, Channel), BrokerError> {
        let conn = connect(&self.url, &self.connection_name, self.connect_timeout).await?;
        self.topology.declare(&conn).await?;
        let channel = conn.create_channel().await.map_err(BrokerError::Channel)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::Channel)?;
        Ok((conn, channel))
    }

    /// Forgets a channel that just failed so the next call reconnects.
    async fn invalidate(&self, failed: &Channel) {
        let mut link = self.link.lock().await;
        if link
            .current
            .as_ref()
            .is_some_and(|(_, ch)| ch.id() == failed.id())
        {
            link.current = None;
            self.connected.store(false, Ordering::Relaxed);
        }
    }

    /// Publishes one message and waits for the broker's confirm.
    pub async fn publish(&self, out: &Outgoing) -> Result<(), PublishError> {
        self.publish_all(std::slice::from_ref(out))
            .await
            .pop()
            .unwrap_or(Err(PublishError::Nacked))
    }

    /// Publishes a batch back to back, then waits for all confirms: one
    /// round trip's latency for the whole batch. One result per message,
    /// in order.
    pub async fn publish_all(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishError>> {
        let channel = match self.channel().await {
            Ok(ch) => ch,
            Err(e) => return batch.iter().map(|_| Err(clone_unavailable(&e))).collect(),
        };
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // lapin answers a publish once its I/O thread has written the
        // frames. Awaited one by one, every message would cost two thread
        // hand-offs (most of the API's publishing CPU); started together,
        // up to `SENDS_AT_ONCE` are written at once. Not the whole batch:
        // the frames of a thousand messages queued at once raised the
        // API's peak memory by half under batch submissions.
        let mut sent = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(SENDS_AT_ONCE) {
            let mut sends: Vec<Pin<Box<MaybeDone<_>>>> = chunk
                .iter()
                .map(|out| {
                    Box::pin(maybe_done(channel.basic_publish(
                        short(&out.exchange),
                        short(&out.routing_key),
                        mandatory,
                        &out.message.body,
                        out.message.properties.clone(),
                    )))
                })
                .collect();
            // A publish takes its delivery tag and queues its frames in its
            // first poll, under two different locks: batches on other
            // threads polled at the same moment could interleave the two
            // steps, and a confirm (or a nack) would be matched with the
            // wrong message. The first polls happen together, under one lock.
            std::future::poll_fn(|cx| {
                let _in_order = self
                    .first_polls
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for send in &mut sends {
                    let _ = send.as_mut().poll(cx);
                }
                std::task::Poll::Ready(())
            })
            .await;
            join_all(sends.iter_mut().map(|send| send.as_mut())).await;
            sent.extend(
                sends
                    .into_iter()
                    .map(|mut send| send.as_mut().take_output()),
            );
        }
        let confirms = sent.into_iter().map(|sent| {
            async move {
                match sent {
                    // Not reached: every send completed above.
                    None => Err(PublishError::Nacked),
                    Some(Err(e)) => Err(PublishError::Failed(e)),
                    Some(Ok(confirm)) => {
                        match tokio::time::timeout(self.confirm_timeout, confirm).await {
                            Err(_) => Err(PublishError::ConfirmTimeout(self.confirm_timeout)),
                            Ok(Err(e)) => Err(PublishError::Failed(e)),
                            Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(
                                PublishError::Unroutable(returned.delivery.routing_key.to_string()),
                            ),
                            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                            Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => {
                                Err(PublishError::Nacked)
                            }
                        }
                    }
                }
            }
        });
        let results = join_all(confirms).await;
        if results.iter().any(|r| {
            matches!(
                r,
                Err(PublishError::Failed(_) | PublishError::ConfirmTimeout(_))
            )
        }) {
            self.invalidate(&channel).await;
        }
        results
    }

    /// Closes the connection politely (on shutdown), for good: a publish
    /// still in flight (a batch of submissions finishing after the server
    /// stopped) then fails as unavailable and its rows wait in the outbox
    /// for the relay. Reconnecting instead would declare the topology
    /// again, from a process that is going away, on a broker whose queues
    /// may have been deleted since (a test's teardown: queues leaked).
    pub async fn close(&self) {
        let mut link = self.link.lock().await;
        self.closed.store(true, Ordering::Relaxed);
        if let Some((conn, channel)) = link.current.take() {
            let _ = channel.close(200, "shutting down".into()).await;
            let _ = conn.close(200, "shutting down".into()).await;
        }
        self.connected.store(false, Ordering::Relaxed);
    }
}

fn clone_unavailable(e: &PublishError) -> PublishError {
    PublishError::Unavailable(e.to_string())
}

/// Properties of a message being forwarded unchanged but for extra headers
/// (dead letters carry the reason next to the original headers).
pub fn with_extra_headers(
    properties: &BasicProperties,
    extra: impl IntoIterator<Item = (&'static str, String)>,
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    for (k, v) in extra {
        headers.insert(
            k.into(),
            lapin::types::AMQPValue::LongString(v.into_bytes().into()),
        );
    }
    properties.clone().with_headers(headers)
}
