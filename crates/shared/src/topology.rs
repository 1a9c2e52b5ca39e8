//! Broker topology: names and declarations of Warren's exchanges and queues.
//!
//! ```text
//!                      routing key = task type
//! publish ─▶ {p}warren.tasks (direct) ──────────────▶ {p}warren.<queue>  (one per route)
//!               │ no binding for that type
//!               └─▶ {p}warren.unrouted (fanout, alternate exchange) ─▶ {p}warren.<default queue>
//!
//! dead letters ─▶ {p}warren.dlx (fanout) ─▶ {p}warren.dead
//! ```
//!
//! Unknown task types land in the default queue rather than vanishing, where
//! the worker dead-letters them with a reason. Declaration is idempotent and
//! done by api and worker at every (re)connect; `rabbitmq/definitions.json`
//! ships the same topology (for the empty prefix) for the management UI.

use crate::{
    settings::{AmqpSettings, QueueType},
    wire::{self, short_string as short},
};
use lapin::{
    Channel, ExchangeKind,
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
}

impl Topology {
    pub fn new(amqp: &AmqpSettings, routes: BTreeMap<String, String>) -> Self {
        Self {
            prefix: amqp.prefix.clone(),
            queue_type: amqp.queue_type,
            delivery_limit: amqp.delivery_limit,
            default_queue: amqp.default_queue.clone(),
            routes,
        }
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

    fn work_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            long_string(&self.dead_letter_exchange()),
        );
        if self.queue_type == QueueType::Quorum {
            args.insert("x-queue-type".into(), long_string("quorum"));
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
            );
            // Dead-letter with publisher confirms inside the broker, so a
            // poison message dropped by the delivery limit is not lost on
            // the way to the dead-letter queue. Requires reject-publish.
            args.insert(
                "x-dead-letter-strategy".into(),
                long_string("at-least-once"),
            );
            args.insert("x-overflow".into(), long_string("reject-publish"));
        }
        args
    }

    fn dead_letter_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            args.insert("x-queue-type".into(), long_string("quorum"));
        }
        args
    }

    /// Declares everything; safe to repeat.
    pub async fn declare(&self, channel: &Channel) -> Result<(), TopologyError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let exchange = |name: String, kind: ExchangeKind, args: FieldTable| async move {
            channel
                .exchange_declare(short(&name), kind, durable, args)
                .await
                .map_err(|cause| TopologyError::Declare {
                    what: "exchange",
                    name,
                    cause,
                })
        };
        let queue = |name: String, args: FieldTable| async move {
            let options = QueueDeclareOptions {
                durable: true,
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
        };
        let bind = |queue: String, exchange: String, key: String| async move {
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
        };

        exchange(
            self.dead_letter_exchange(),
            ExchangeKind::Fanout,
            FieldTable::default(),
        )
        .await?;
        queue(self.dead_letter_queue(), self.dead_letter_queue_arguments()).await?;
        bind(
            self.dead_letter_queue(),
            self.dead_letter_exchange(),
            String::new(),
        )
        .await?;

        exchange(
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
        exchange(self.exchange(), ExchangeKind::Direct, tasks_args).await?;

        for q in self.queues() {
            queue(self.queue(q), self.work_queue_arguments()).await?;
        }
        bind(
            self.queue(&self.default_queue),
            self.unrouted_exchange(),
            String::new(),
        )
        .await?;
        for (task_type, q) in &self.routes {
            bind(self.queue(q), self.exchange(), task_type.clone()).await?;
        }
        Ok(())
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
        json!({
            "vhosts": [{"name": "/"}],
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
        channel
            .queue_delete(
                short(&self.dead_letter_queue()),
                QueueDeleteOptions::default(),
            )
            .await?;
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
