//! Direct access to RabbitMQ for tests: raw AMQP and the management API.

use lapin::{
    BasicProperties, Channel, Connection,
    message::BasicGetMessage,
    options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
};
use secrecy::ExposeSecret;
use serde_json::Value;
use std::time::Duration;
use warren_shared::{broker::BrokerError, settings::Settings, wire::short_string};

/// A confirm-mode channel on its own connection.
pub struct Amqp {
    connection: Connection,
    channel: Channel,
}

impl Amqp {
    pub async fn connect(settings: &Settings) -> Self {
        Self::try_connect(settings)
            .await
            .expect("connect to RabbitMQ")
    }

    pub async fn try_connect(settings: &Settings) -> Result<Self, BrokerError> {
        let connection = warren_shared::broker::connect(
            &settings.amqp.url,
            "warren-tests",
            Duration::from_secs(5),
        )
        .await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(BrokerError::Channel)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::Channel)?;
        Ok(Self {
            connection,
            channel,
        })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// (ready messages, consumers) of an existing queue.
    pub async fn queue_depth(&self, queue: &str) -> (u32, u32) {
        let q = self
            .channel
            .queue_declare(
                short_string(queue),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue {queue} exists: {e}"));
        (q.message_count(), q.consumer_count())
    }

    /// Takes one message off a queue (acknowledged), if there is one.
    pub async fn get(&self, queue: &str) -> Option<BasicGetMessage> {
        let msg = self
            .channel
            .basic_get(short_string(queue), BasicGetOptions::default())
            .await
            .expect("basic.get")?;
        msg.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        Some(msg)
    }

    /// Takes every message off a queue (acknowledged).
    pub async fn drain(&self, queue: &str) -> Vec<BasicGetMessage> {
        let mut all = Vec::new();
        while let Some(msg) = self.get(queue).await {
            all.push(msg);
        }
        all
    }

    /// Publishes anything anywhere, as a foreign client would, and waits
    /// for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
    ) {
        let confirm = self
            .channel
            .basic_publish(
                short_string(exchange),
                short_string(routing_key),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "broker refused the message");
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// RabbitMQ's management HTTP API (plugin `rabbitmq_management`).
pub struct Management {
    base: String,
    client: reqwest::Client,
    user: String,
    password: String,
}

impl Management {
    /// `TEST_RABBITMQ_MANAGEMENT_URL` (default `http://127.0.0.1:15672`)
    /// with the credentials of the AMQP URL.
    pub fn new(settings: &Settings) -> Self {
        let url = settings.amqp.url.expose_secret();
        let creds = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .map(|(creds, _)| creds.to_owned())
            .unwrap_or_else(|| "guest:guest".to_owned());
        let (user, password) = creds.split_once(':').unwrap_or(("guest", "guest"));
        Self {
            base: std::env::var("TEST_RABBITMQ_MANAGEMENT_URL")
                .unwrap_or_else(|_| "http://127.0.0.1:15672".to_owned()),
            client: reqwest::Client::new(),
            user: user.to_owned(),
            password: password.to_owned(),
        }
    }

    async fn get(&self, path: &str) -> Value {
        let response = self
            .client
            .get(format!("{}/api/{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "RabbitMQ management API at {} (is rabbitmq_management enabled?): {e}",
                    self.base
                )
            });
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.expect("management API returns JSON")
    }

    pub async fn exchange(&self, name: &str) -> Value {
        self.get(&format!("exchanges/%2F/{name}")).await
    }

    pub async fn queue(&self, name: &str) -> Value {
        self.get(&format!("queues/%2F/{name}")).await
    }

    /// A connection by its broker-side name (`127.0.0.1:5432 -> ...`).
    pub async fn connection(&self, name: &str) -> Value {
        let encoded: String = name
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        self.get(&format!("connections/{encoded}")).await
    }

    /// Connections whose client-given name starts with `name_prefix`, as
    /// the management API lists them (once their first statistics are in,
    /// a few seconds after they open).
    async fn connections_named(&self, name_prefix: &str) -> Vec<Value> {
        let all = self.get("connections").await;
        all.as_array()
            .into_iter()
            .flatten()
            .filter(|c| {
                c["client_properties"]["connection_name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
            })
            .cloned()
            .collect()
    }

    pub async fn count_connections(&self, name_prefix: &str) -> usize {
        self.connections_named(name_prefix).await.len()
    }

    /// Force-closes every connection whose client-given name starts with
    /// `name_prefix`, as an operator (or a network failure) would. Returns
    /// how many were closed.
    pub async fn close_connections(&self, name_prefix: &str) -> usize {
        let names: Vec<String> = self
            .connections_named(name_prefix)
            .await
            .iter()
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect();
        for name in &names {
            let response = self
                .client
                .delete(format!("{}/api/connections/{}", self.base, encode(name)))
                .basic_auth(&self.user, Some(&self.password))
                .header("X-Reason", "closed by a Warren fault test")
                .send()
                .await
                .expect("close connection");
            assert!(
                response.status().is_success(),
                "closing {name}: {}",
                response.status()
            );
        }
        names.len()
    }

    /// Sends a request with the management credentials; for what the
    /// helpers above do not cover.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .request(method, format!("{}/api/{path}", self.base))
            .basic_auth(&self.user, Some(&self.password));
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().await.expect("management API request")
    }

    /// Consumers of a queue as the broker sees them (prefetch, ack mode, ...).
    pub async fn consumers_of(&self, queue: &str) -> Vec<Value> {
        let all = self.get("consumers/%2F").await;
        all.as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["queue"]["name"] == queue)
            .cloned()
            .collect()
    }
}

/// Percent-encodes a path segment.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A RabbitMQ virtual host of a test's own, deleted (with everything in
/// it) when dropped. For tests that run a real Celery worker: with quorum
/// queues it declares Celery's native delayed-delivery topology
/// (`celery_delayed_*`, shared by the whole vhost), which must not be left
/// on the machine's default vhost.
pub struct Vhost {
    pub name: String,
    management: Management,
}

impl Vhost {
    /// `t-<12 hex>`, matching `scripts/lib.sh`'s sweep of interrupted runs.
    pub async fn create(settings: &Settings, prefix: &str) -> Self {
        let name = prefix.trim_end_matches('.').to_owned();
        let management = Management::new(settings);
        let path = format!("vhosts/{name}");
        let r = management.request(reqwest::Method::PUT, &path, None).await;
        assert!(
            r.status().is_success(),
            "creating vhost {name}: {}",
            r.status()
        );
        let all = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
        let path = format!("permissions/{name}/{}", management.user);
        let r = management
            .request(reqwest::Method::PUT, &path, Some(&all))
            .await;
        assert!(
            r.status().is_success(),
            "permissions on {name}: {}",
            r.status()
        );
        Self { name, management }
    }

    /// `url` (an `amqp://…/vhost` URL) pointed at this vhost instead.
    pub fn url(&self, url: &str) -> String {
        let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
        format!("{base}/{}", self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let path = format!("vhosts/{}", self.name);
        let base = self.management.base.clone();
        let (user, password) = (
            self.management.user.clone(),
            self.management.password.clone(),
        );
        // Drop cannot await on the test's runtime: a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    let _ = reqwest::Client::new()
                        .delete(format!("{base}/api/{path}"))
                        .basic_auth(user, Some(password))
                        .send()
                        .await;
                });
            }
        })
        .join();
    }
}
