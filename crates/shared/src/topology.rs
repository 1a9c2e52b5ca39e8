//! Broker topology: names and declarations of Warren's exchanges and queues.
//!
//! ```text
//!                      routing key = task type
//! publish ─▶ {p}warren.tasks (direct) ──────────────▶ {p}warren.<queue>  (one per route)
//!               │ no binding for that type
//!               └─▶ {p}warren.unrouted (fanout, alternate exchange) ─▶ {p}warren.<default queue>
//!
//! priority ≥ 5 ─▶ (default exchange) ─▶ {p}warren.<queue>.high  (its high band)
//!
//! dead letters ─▶ {p}warren.dlx (fanout) ─▶ {p}warren.dead
//!
//! Celery workers' rpc results ─▶ (default exchange) ─▶ {p}warren.replies
//! ```
//!
//! A queue whose types Python Celery workers run (`runner = "celery"`) is
//! declared like any work queue but consumed by them, never by a Warren
//! worker ([`Topology::warren_queues`]); their results come back on
//! `{p}warren.replies`, which exists only when such types do.
//!
//! Priorities: RabbitMQ's quorum queues have none before 4.0 (and two
//! levels since), so each queue a Warren worker serves has a high band
//! beside it, as RabbitMQ 4 has: a task of priority 5 to 9 is published to
//! `<queue>.high`, and workers take from the high band two deliveries for
//! each one from the normal band while both have work (`consumer`). Within
//! a band, order is the broker's (first in, first out).
//!
//! Unknown task types land in the default queue rather than vanishing, where
//! the worker dead-letters them with a reason. Declaration is idempotent and
//! done by api and worker at every (re)connect; `rabbitmq/definitions.json`
//! ships the same topology (for the empty prefix) for the management UI.

use crate::{
    settings::{AmqpSettings, CelerySettings, QueueType},
    wire::{self, short_string as short},
};
use lapin::{
    Channel, Connection, ExchangeKind,
    options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    queue_type: QueueType,
    delivery_limit: u32,
    default_queue: String,
    /// Task type → short queue name.
    routes: BTreeMap<String, String>,
    /// Queues Celery clients publish to (full names, no prefix), and
    /// the type their producers declare them with.
    celery_queues: Vec<String>,
    celery_queue_type: QueueType,
    /// Work queues (short names) whose types Celery workers run.
    celery_runs: BTreeSet<String>,
}

/// Tasks of this priority or higher go to their queue's high band.
pub const HIGH_PRIORITY: u8 = 5;

/// What a work queue's high band adds to its name.
pub const HIGH_BAND_SUFFIX: &str = ".high";

/// A RabbitMQ policy for Warren's work queues (see [`Topology::policy`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QueuePolicy {
    pub name: String,
    /// Exactly the work queues' names, nothing else (the dead-letter queue
    /// must not dead-letter to itself).
    pub pattern: String,
    pub definition: serde_json::Value,
}

impl QueuePolicy {
    /// Above the default 0, so it wins over a catch-all operator policy.
    pub const PRIORITY: i64 = 10;

    /// The body of the management API's `PUT /api/policies/{vhost}/{name}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"pattern": self.pattern, "definition": self.definition,
                           "apply-to": "queues", "priority": Self::PRIORITY})
    }

    /// The same for a broker without the management plugin.
    pub fn rabbitmqctl(&self, vhost: &str) -> String {
        format!(
            "rabbitmqctl set_policy -p '{vhost}' --apply-to queues --priority {} '{}' '{}' '{}'",
            Self::PRIORITY,
            self.name,
            self.pattern,
            self.definition
        )
    }
}

/// Escapes a queue name for a policy pattern (RabbitMQ's are PCRE).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Usually an existing queue declared with other arguments (another
    /// queue type, another dead-letter exchange): RabbitMQ refuses to change
    /// a queue in place.
    #[error(
        "declaring {what} `{name}` failed: {cause}; if it exists with other arguments, delete it or use another amqp.prefix"
    )]
    Declare {
        what: &'static str,
        name: String,
        cause: lapin::Error,
    },
    #[error("migrating queue `{queue}`: {cause}")]
    Migrate { queue: String, cause: lapin::Error },
    #[error(
        "queue `{queue}` has {consumers} consumer(s): stop every worker (and the API) before migrating it"
    )]
    InUse { queue: String, consumers: u32 },
    #[error("migrating queue `{queue}`: the broker did not confirm a moved message")]
    NotConfirmed { queue: String },
}

/// What [`Topology::migrate_queues`] did to one queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Migrated {
    pub queue: String,
    /// Messages moved out and back, none lost.
    pub messages: u64,
}

impl Topology {
    pub fn new(amqp: &AmqpSettings, routes: BTreeMap<String, String>) -> Self {
        Self {
            prefix: amqp.prefix.clone(),
            queue_type: amqp.queue_type,
            delivery_limit: amqp.delivery_limit,
            default_queue: amqp.default_queue.clone(),
            routes,
            celery_queues: Vec::new(),
            celery_queue_type: QueueType::Classic,
            celery_runs: BTreeSet::new(),
        }
    }

    /// Marks the work queues (short names) that Python Celery workers
    /// consume, for the types they run.
    pub fn with_celery_runs(mut self, queues: BTreeSet<String>) -> Self {
        self.celery_runs = queues;
        self
    }

    /// Work queues (short names) a Warren worker consumes: all but those
    /// Celery workers serve.
    pub fn warren_queues(&self) -> BTreeSet<&str> {
        let mut all = self.queues();
        all.retain(|q| !self.celery_runs.contains(*q));
        all
    }

    /// Full names of the queues Celery workers serve.
    pub fn celery_run_queues(&self) -> impl Iterator<Item = String> + '_ {
        self.celery_runs.iter().map(|q| self.queue(q))
    }

    /// Whether `short` is a queue Celery workers serve.
    pub fn is_celery_run(&self, short: &str) -> bool {
        self.celery_runs.contains(short)
    }

    /// Where Celery workers send the results of the tasks Warren gave
    /// them (their `reply_to`), when any type is run by them.
    pub fn reply_queue(&self) -> Option<String> {
        (!self.celery_runs.is_empty()).then(|| format!("{}warren.replies", self.prefix))
    }

    /// The reply queue's declaration: its type, and a single active
    /// consumer, so one replica at a time records a task's reports in the
    /// order they were sent (STARTED before SUCCESS) and another takes over
    /// when it goes.
    fn reply_queue_arguments(&self) -> FieldTable {
        let mut args = type_only(self.queue_type);
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args
    }

    /// Adds Celery's queues (`celery.queues`), declared as Celery does.
    pub fn with_celery_queues(mut self, celery: &CelerySettings) -> Self {
        self.celery_queues = celery.queues.clone();
        self.celery_queue_type = celery.queue_type;
        self
    }

    /// Celery's queues Warren consumes too (full names).
    pub fn celery_queues(&self) -> &[String] {
        &self.celery_queues
    }

    /// Every queue a worker may consume, by full name: the work queues
    /// (short names given) and Celery's.
    pub fn consumed(&self, short_names: &[String]) -> Vec<String> {
        short_names
            .iter()
            .map(|q| self.queue(q))
            .chain(self.celery_queues.iter().cloned())
            .collect()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where tasks are published, routing key = task type.
    pub fn exchange(&self) -> String {
        format!("{}warren.tasks", self.prefix)
    }

    /// Catches task types without a binding and hands them to the default queue.
    pub fn unrouted_exchange(&self) -> String {
        format!("{}warren.unrouted", self.prefix)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}warren.dlx", self.prefix)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}warren.dead", self.prefix)
    }

    /// Full name of a queue given its short name.
    pub fn queue(&self, short: &str) -> String {
        format!("{}warren.{short}", self.prefix)
    }

    /// Full name of a work queue's high band.
    pub fn high_band(&self, short: &str) -> String {
        format!("{}{HIGH_BAND_SUFFIX}", self.queue(short))
    }

    /// Every high band (full names): one per queue Warren workers serve.
    pub fn high_bands(&self) -> Vec<String> {
        self.warren_queues()
            .into_iter()
            .map(|q| self.high_band(q))
            .collect()
    }

    /// Where a task of `task_type` and `priority` is published: the tasks
    /// exchange by its type, or, from [`HIGH_PRIORITY`] on and for a queue
    /// Warren workers serve, straight to the queue's high band.
    pub fn publish_target(&self, task_type: &str, priority: u8) -> (String, String) {
        let q = self.route(task_type);
        if priority >= HIGH_PRIORITY && !self.is_celery_run(q) {
            return (String::new(), self.high_band(q));
        }
        (self.exchange(), task_type.to_owned())
    }

    /// Short name of the queue a task type is routed to.
    pub fn route(&self, task_type: &str) -> &str {
        self.routes
            .get(task_type)
            .map_or(self.default_queue.as_str(), String::as_str)
    }

    /// Every work queue (short names): the default one and every route.
    pub fn queues(&self) -> BTreeSet<&str> {
        let mut all: BTreeSet<&str> = self.routes.values().map(String::as_str).collect();
        all.insert(&self.default_queue);
        all
    }

    /// A work queue's declaration carries only its type, exactly what a
    /// Celery client declares (`task_default_queue_type = "quorum"`, or
    /// classic), so any AMQP client may redeclare it. The rest of what
    /// Warren needs is the [`Topology::policy`].
    fn work_queue_arguments(&self) -> FieldTable {
        type_only(self.queue_type)
    }

    /// What Warren needs on its work queues besides their type, as a
    /// RabbitMQ policy (so declarations stay equal to a Celery client's):
    /// dead letters to `{p}warren.dlx`; on quorum queues a delivery limit
    /// and at-least-once dead-lettering (confirmed inside the broker, which
    /// requires `overflow = reject-publish`). Applied by api and worker at
    /// startup through the management API; `warren-api definitions` ships
    /// it, and prints the `rabbitmqctl set_policy` line for a broker
    /// without the management plugin.
    pub fn policy(&self) -> QueuePolicy {
        let names: Vec<String> = self
            .queues()
            .into_iter()
            .map(|q| self.queue(q))
            .chain(self.high_bands())
            .chain(self.celery_queues.iter().cloned())
            .map(|q| regex_escape(&q))
            .collect();
        let mut definition = serde_json::Map::new();
        definition.insert(
            "dead-letter-exchange".into(),
            self.dead_letter_exchange().into(),
        );
        if self.queue_type == QueueType::Quorum {
            definition.insert("delivery-limit".into(), self.delivery_limit.into());
            definition.insert("dead-letter-strategy".into(), "at-least-once".into());
            definition.insert("overflow".into(), "reject-publish".into());
        }
        QueuePolicy {
            name: format!("{}warren.work-queues", self.prefix),
            pattern: format!("^(?:{})$", names.join("|")),
            definition: serde_json::Value::Object(definition),
        }
    }

    fn dead_letter_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            args.insert("x-queue-type".into(), long_string("quorum"));
        }
        args
    }

    /// Declares everything on a channel of its own; safe to repeat. A work
    /// queue an older Warren declared with its dead-letter arguments
    /// (`x-dead-letter-exchange`, ...) is refused by RabbitMQ as
    /// inequivalent; it keeps working as it is (its arguments do what the
    /// policy would) and is only checked to exist, with a warning naming
    /// `warren-worker migrate-queues`.
    pub async fn declare(&self, conn: &Connection) -> Result<(), TopologyError> {
        let mut channel = open_channel(conn).await?;
        exchange(
            &channel,
            self.dead_letter_exchange(),
            ExchangeKind::Fanout,
            FieldTable::default(),
        )
        .await?;
        queue(
            &channel,
            self.dead_letter_queue(),
            self.dead_letter_queue_arguments(),
            false,
        )
        .await?;
        bind(
            &channel,
            self.dead_letter_queue(),
            self.dead_letter_exchange(),
            String::new(),
        )
        .await?;
        if let Some(replies) = self.reply_queue() {
            queue(&channel, replies, self.reply_queue_arguments(), false).await?;
        }
        exchange(
            &channel,
            self.unrouted_exchange(),
            ExchangeKind::Fanout,
            FieldTable::default(),
        )
        .await?;
        let mut tasks_args = FieldTable::default();
        tasks_args.insert(
            "alternate-exchange".into(),
            long_string(&self.unrouted_exchange()),
        );
        exchange(&channel, self.exchange(), ExchangeKind::Direct, tasks_args).await?;
        for q in self.queues() {
            let name = self.queue(q);
            match queue(&channel, name.clone(), self.work_queue_arguments(), false).await {
                Err(TopologyError::Declare { cause, .. }) if is_inequivalent(&cause) => {
                    // The broker closed the channel: check on a new one.
                    channel = open_channel(conn).await?;
                    queue(&channel, name.clone(), FieldTable::default(), true).await?;
                    tracing::warn!(
                        queue = %name,
                        "queue declared by an older Warren with dead-letter arguments; it keeps working, \
                         but Celery clients cannot declare it: run `warren-worker migrate-queues`"
                    );
                }
                other => other?,
            }
        }
        for band in self.high_bands() {
            queue(&channel, band, self.work_queue_arguments(), false).await?;
        }
        bind(
            &channel,
            self.queue(&self.default_queue),
            self.unrouted_exchange(),
            String::new(),
        )
        .await?;
        for (task_type, q) in &self.routes {
            bind(&channel, self.queue(q), self.exchange(), task_type.clone()).await?;
        }
        for name in &self.celery_queues {
            // As Celery declares its default queue: a direct exchange of the
            // same name, the queue bound with its own name.
            exchange(
                &channel,
                name.clone(),
                ExchangeKind::Direct,
                FieldTable::default(),
            )
            .await?;
            match queue(
                &channel,
                name.clone(),
                type_only(self.celery_queue_type),
                false,
            )
            .await
            {
                Err(TopologyError::Declare { cause, .. }) if is_inequivalent(&cause) => {
                    channel = open_channel(conn).await?;
                    queue(&channel, name.clone(), FieldTable::default(), true).await?;
                    tracing::warn!(
                        queue = %name,
                        "Celery's queue exists with other arguments (another type?); consuming it as it is: \
                         set celery.queue_type to what the producers declare"
                    );
                }
                other => other?,
            }
            bind(&channel, name.clone(), name.clone(), name.clone()).await?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// Redeclares every work queue an older Warren declared with its
    /// dead-letter arguments, so that it carries only its type: its
    /// messages move to `<queue>.migrating`, the queue is deleted and
    /// declared again, the messages move back (each move confirmed before
    /// the original is acknowledged), then bindings and the rest are
    /// declared as usual. Refuses a queue that has consumers; the API must
    /// be stopped too, or a task published meanwhile could be dropped.
    pub async fn migrate_queues(&self, conn: &Connection) -> Result<Vec<Migrated>, TopologyError> {
        let mut done = Vec::new();
        for q in self.queues() {
            let name = self.queue(q);
            let probe = open_channel(conn).await?;
            match queue(&probe, name.clone(), self.work_queue_arguments(), false).await {
                Ok(()) => {
                    let _ = probe.close(200, "current".into()).await;
                    continue;
                }
                Err(TopologyError::Declare { cause, .. }) if is_inequivalent(&cause) => {}
                Err(e) => return Err(e),
            }
            let messages = self.migrate_one(conn, &name).await?;
            tracing::info!(queue = %name, messages, "queue migrated to the policy");
            done.push(Migrated {
                queue: name,
                messages,
            });
        }
        self.declare(conn).await?;
        Ok(done)
    }

    async fn migrate_one(&self, conn: &Connection, name: &str) -> Result<u64, TopologyError> {
        let failed = |cause| TopologyError::Migrate {
            queue: name.to_owned(),
            cause,
        };
        let channel = open_channel(conn).await?;
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .map_err(failed)?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let state = channel
            .queue_declare(short(name), passive, FieldTable::default())
            .await
            .map_err(failed)?;
        if state.consumer_count() > 0 {
            return Err(TopologyError::InUse {
                queue: name.to_owned(),
                consumers: state.consumer_count(),
            });
        }
        let temp = format!("{name}.migrating");
        queue(&channel, temp.clone(), self.work_queue_arguments(), false).await?;
        let moved = drain_into(&channel, name, &temp).await?;
        // Quorum queues cannot be deleted "if empty": the drain made sure.
        channel
            .queue_delete(short(name), QueueDeleteOptions::default())
            .await
            .map_err(failed)?;
        queue(
            &channel,
            name.to_owned(),
            self.work_queue_arguments(),
            false,
        )
        .await?;
        let back = drain_into(&channel, &temp, name).await?;
        channel
            .queue_delete(short(&temp), QueueDeleteOptions::default())
            .await
            .map_err(failed)?;
        let _ = channel.close(200, "migrated".into()).await;
        debug_assert_eq!(moved, back);
        Ok(back)
    }

    /// The same topology as RabbitMQ definitions (the format the management
    /// UI imports and `load_definitions` reads), for the default vhost.
    pub fn definitions(&self) -> serde_json::Value {
        use serde_json::json;
        let exchange = |name: String, kind: &str, args: FieldTable| {
            json!({"name": name, "vhost": "/", "type": kind, "durable": true,
                   "auto_delete": false, "internal": false, "arguments": wire::table_to_json(&args)})
        };
        let queue = |name: String, args: FieldTable| {
            json!({"name": name, "vhost": "/", "durable": true, "auto_delete": false,
                   "arguments": wire::table_to_json(&args)})
        };
        let binding = |source: String, destination: String, key: &str| {
            json!({"source": source, "vhost": "/", "destination": destination,
                   "destination_type": "queue", "routing_key": key, "arguments": {}})
        };
        let mut tasks_args = FieldTable::default();
        tasks_args.insert(
            "alternate-exchange".into(),
            long_string(&self.unrouted_exchange()),
        );
        let mut queues = vec![queue(
            self.dead_letter_queue(),
            self.dead_letter_queue_arguments(),
        )];
        queues.extend(
            self.queues()
                .into_iter()
                .map(|q| queue(self.queue(q), self.work_queue_arguments())),
        );
        queues.extend(
            self.high_bands()
                .into_iter()
                .map(|q| queue(q, self.work_queue_arguments())),
        );
        if let Some(replies) = self.reply_queue() {
            queues.push(queue(replies, self.reply_queue_arguments()));
        }
        let mut bindings = vec![
            binding(self.dead_letter_exchange(), self.dead_letter_queue(), ""),
            binding(
                self.unrouted_exchange(),
                self.queue(&self.default_queue),
                "",
            ),
        ];
        bindings.extend(
            self.routes
                .iter()
                .map(|(task_type, q)| binding(self.exchange(), self.queue(q), task_type)),
        );
        let policy = self.policy();
        let mut policy_json = policy.body();
        policy_json["name"] = policy.name.into();
        policy_json["vhost"] = "/".into();
        json!({
            "vhosts": [{"name": "/"}],
            "policies": [policy_json],
            "exchanges": [
                exchange(self.dead_letter_exchange(), "fanout", FieldTable::default()),
                exchange(self.unrouted_exchange(), "fanout", FieldTable::default()),
                exchange(self.exchange(), "direct", tasks_args),
            ],
            "queues": queues,
            "bindings": bindings,
        })
    }

    /// Removes everything `declare` created, messages included. For tests
    /// and for tearing down a prefix; never called by api or worker.
    pub async fn delete(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for q in self.queues() {
            channel
                .queue_delete(short(&self.queue(q)), QueueDeleteOptions::default())
                .await?;
        }
        for band in self.high_bands() {
            channel
                .queue_delete(short(&band), QueueDeleteOptions::default())
                .await?;
        }
        channel
            .queue_delete(
                short(&self.dead_letter_queue()),
                QueueDeleteOptions::default(),
            )
            .await?;
        if let Some(replies) = self.reply_queue() {
            channel
                .queue_delete(short(&replies), QueueDeleteOptions::default())
                .await?;
        }
        for name in &self.celery_queues {
            channel
                .queue_delete(short(name), QueueDeleteOptions::default())
                .await?;
            channel
                .exchange_delete(short(name), ExchangeDeleteOptions::default())
                .await?;
        }
        for ex in [
            self.exchange(),
            self.unrouted_exchange(),
            self.dead_letter_exchange(),
        ] {
            channel
                .exchange_delete(short(&ex), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

/// Moves messages from `from` to `to` until `from` is seen empty.
async fn drain_into(channel: &Channel, from: &str, to: &str) -> Result<u64, TopologyError> {
    let mut moved = 0;
    loop {
        moved += move_all(channel, from, to).await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let left = channel
            .queue_declare(short(from), passive, FieldTable::default())
            .await
            .map_err(|cause| TopologyError::Migrate {
                queue: from.to_owned(),
                cause,
            })?
            .message_count();
        if left == 0 {
            return Ok(moved);
        }
    }
}

/// Moves every message of `from` to `to`: each publish confirmed before
/// the original is acknowledged, so a crash leaves a duplicate, never a loss.
async fn move_all(channel: &Channel, from: &str, to: &str) -> Result<u64, TopologyError> {
    let failed = |cause| TopologyError::Migrate {
        queue: from.to_owned(),
        cause,
    };
    let mut moved = 0;
    while let Some(msg) = channel
        .basic_get(short(from), lapin::options::BasicGetOptions::default())
        .await
        .map_err(failed)?
    {
        let confirm = channel
            .basic_publish(
                short(""),
                short(to),
                lapin::options::BasicPublishOptions::default(),
                &msg.delivery.data,
                msg.delivery.properties.clone(),
            )
            .await
            .map_err(failed)?
            .await
            .map_err(failed)?;
        if !confirm.is_ack() {
            return Err(TopologyError::NotConfirmed {
                queue: from.to_owned(),
            });
        }
        msg.delivery
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .map_err(failed)?;
        moved += 1;
    }
    Ok(moved)
}

async fn open_channel(conn: &Connection) -> Result<Channel, TopologyError> {
    conn.create_channel()
        .await
        .map_err(|cause| TopologyError::Declare {
            what: "channel",
            name: "topology".into(),
            cause,
        })
}

/// `406 PRECONDITION_FAILED`: the queue exists with other arguments.
fn is_inequivalent(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.kind().get_id() == 406)
}

async fn exchange(
    channel: &Channel,
    name: String,
    kind: ExchangeKind,
    args: FieldTable,
) -> Result<(), TopologyError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(short(&name), kind, durable, args)
        .await
        .map_err(|cause| TopologyError::Declare {
            what: "exchange",
            name,
            cause,
        })
}

async fn queue(
    channel: &Channel,
    name: String,
    args: FieldTable,
    passive: bool,
) -> Result<(), TopologyError> {
    let options = QueueDeclareOptions {
        durable: true,
        passive,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(short(&name), options, args)
        .await
        .map(drop)
        .map_err(|cause| TopologyError::Declare {
            what: "queue",
            name,
            cause,
        })
}

async fn bind(
    channel: &Channel,
    queue: String,
    exchange: String,
    key: String,
) -> Result<(), TopologyError> {
    channel
        .queue_bind(
            short(&queue),
            short(&exchange),
            short(&key),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|cause| TopologyError::Declare {
            what: "binding",
            name: format!("{exchange} -[{key}]-> {queue}"),
            cause,
        })
}

/// Arguments that carry only a queue's type, as Celery declares it.
fn type_only(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), long_string("quorum"));
    }
    args
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        let mut amqp: AmqpSettings = serde_json::from_value(serde_json::json!({
            "url": "amqp://localhost", "prefix": "t1.", "queue_type": "quorum",
            "default_queue": "default", "delivery_limit": 5, "management_url": "http://localhost:15672",
            "connect_timeout_seconds": 1, "publish_timeout_seconds": 1
        }))
        .unwrap();
        amqp.prefix = "t1.".into();
        let routes = [("multiply", "default"), ("report", "slow")]
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect();
        Topology::new(&amqp, routes)
    }

    #[test]
    fn names_carry_the_prefix() {
        let t = topology();
        assert_eq!(t.exchange(), "t1.warren.tasks");
        assert_eq!(t.queue("default"), "t1.warren.default");
        assert_eq!(t.dead_letter_queue(), "t1.warren.dead");
    }

    #[test]
    fn priority_five_and_up_goes_to_the_high_band_of_a_warren_queue_only() {
        let t = topology().with_celery_runs(BTreeSet::from(["slow".to_owned()]));
        let tasks = || ("t1.warren.tasks".to_owned(), "multiply".to_owned());
        assert_eq!(t.publish_target("multiply", 0), tasks());
        assert_eq!(t.publish_target("multiply", 4), tasks());
        let high = (String::new(), "t1.warren.default.high".to_owned());
        assert_eq!(t.publish_target("multiply", 5), high);
        assert_eq!(t.publish_target("multiply", 9), high);
        // Unknown types go where the alternate exchange would send them.
        assert_eq!(t.publish_target("no-such-task", 9), high);
        // Celery workers consume only the queue itself.
        assert_eq!(
            t.publish_target("report", 9),
            ("t1.warren.tasks".to_owned(), "report".to_owned())
        );
        assert_eq!(t.high_bands(), ["t1.warren.default.high"]);
        assert!(
            t.policy().pattern.contains("default\\.high"),
            "{}",
            t.policy().pattern
        );
    }

    /// `rabbitmq/definitions.json` is what an operator imports; it must say
    /// exactly what api and worker declare for the default configuration.
    #[test]
    fn shipped_definitions_match_the_declared_topology() {
        use crate::{catalog::Catalog, settings::Settings};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let vars =
            std::collections::HashMap::from([("WARREN_ENV".to_owned(), "production".to_owned())]);
        let settings = Settings::load_from(&dir.join("config"), &vars).unwrap();
        let catalog = Catalog::new(&warren_tasks::Registry::builtin(), &settings).unwrap();
        let expected = catalog.topology().definitions();
        let shipped: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("rabbitmq/definitions.json")).unwrap(),
        )
        .unwrap();
        assert!(
            shipped == expected,
            "rabbitmq/definitions.json is stale; regenerate it with\n  \
             WARREN_ENV=production cargo run -q -p warren-api -- definitions > rabbitmq/definitions.json"
        );
    }

    #[test]
    fn unknown_types_route_to_the_default_queue() {
        let t = topology();
        assert_eq!(t.route("report"), "slow");
        assert_eq!(t.route("no-such-task"), "default");
        assert_eq!(
            t.queues().into_iter().collect::<Vec<_>>(),
            vec!["default", "slow"]
        );
    }
}
