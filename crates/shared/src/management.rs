//! RabbitMQ's management API (HTTP), with the credentials of `amqp.url`:
//! queue depths for `GET /queues` and the dashboard, and the work queues'
//! policy ([`crate::topology::QueuePolicy`]), applied at startup.

use crate::{
    broker,
    settings::{AmqpSettings, SettingsError},
    topology::QueuePolicy,
};
use secrecy::{ExposeSecret, SecretString};

pub struct Management {
    pub base: String,
    pub user: String,
    pub password: SecretString,
    pub vhost: String,
    pub client: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("RabbitMQ's management API at {base} did not answer: {cause}")]
    Unreachable { base: String, cause: reqwest::Error },
    #[error("RabbitMQ's management API answered {status} to {what}: {body}")]
    Refused {
        what: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("building the HTTP client: {0}")]
    Client(reqwest::Error),
}

impl Management {
    pub fn new(amqp: &AmqpSettings) -> Result<Self, SettingsError> {
        let (user, password, vhost) =
            broker::credentials(&amqp.url).ok_or_else(|| SettingsError::Invalid {
                key: "amqp.url".into(),
                message: "is not a valid amqp://user:password@host:port/vhost URL".into(),
            })?;
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| SettingsError::Invalid {
                key: "amqp.management_url".into(),
                message: format!("no HTTP client: {e}"),
            })?;
        Ok(Self {
            base: amqp.management_url.trim_end_matches('/').to_owned(),
            user,
            password,
            vhost,
            client,
        })
    }

    /// `{base}/api/{path}/{vhost}/{name}`, each segment percent-encoded.
    pub fn url(&self, path: &str, name: &str) -> String {
        format!(
            "{}/api/{path}/{}/{}",
            self.base,
            encode(&self.vhost),
            encode(name)
        )
    }

    pub fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.client
            .get(url)
            .basic_auth(&self.user, Some(self.password.expose_secret()))
    }

    /// Creates or updates the work queues' policy (idempotent).
    pub async fn apply_policy(&self, policy: &QueuePolicy) -> Result<(), ManagementError> {
        let url = self.url("policies", &policy.name);
        let response = self
            .client
            .put(&url)
            .basic_auth(&self.user, Some(self.password.expose_secret()))
            .json(&policy.body())
            .send()
            .await
            .map_err(|cause| ManagementError::Unreachable {
                base: self.base.clone(),
                cause,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        Err(ManagementError::Refused {
            what: format!("setting policy {}", policy.name),
            status,
            body: response.text().await.unwrap_or_default(),
        })
    }

    /// Removes a policy (tests, tearing down a prefix).
    pub async fn delete_policy(&self, name: &str) -> Result<(), ManagementError> {
        self.client
            .delete(self.url("policies", name))
            .basic_auth(&self.user, Some(self.password.expose_secret()))
            .send()
            .await
            .map(drop)
            .map_err(|cause| ManagementError::Unreachable {
                base: self.base.clone(),
                cause,
            })
    }
}

/// Applies the policy, or says loudly what is missing and how to fix it:
/// without it, a message that keeps killing workers is redelivered forever
/// instead of dead-lettered.
pub async fn ensure_policy(management: &Management, policy: &QueuePolicy) {
    match management.apply_policy(policy).await {
        Ok(()) => {
            tracing::info!(policy = %policy.name, pattern = %policy.pattern, "work queue policy applied")
        }
        Err(e) => tracing::error!(
            error = %e,
            fix = %policy.rabbitmqctl(&management.vhost),
            "could not apply the work queues' policy (dead-letter exchange, delivery limit); \
             apply it with the `fix` command or import rabbitmq/definitions.json"
        ),
    }
}

/// Percent-encodes a path segment (a vhost is often `/`).
pub fn encode(segment: &str) -> String {
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
