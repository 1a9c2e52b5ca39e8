//! What every handler can reach. Cheap to clone: all `Arc`s and pools.

use crate::{auth::Authenticator, fail::FailPoints, metrics::ApiMetrics, waiters::Waiters};
use secrecy::SecretString;
use std::sync::Arc;
use warren_shared::{
    artifacts::ArtifactStore, broker::Publisher, catalog::Catalog, settings::Settings, store::Store,
};

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub catalog: Arc<Catalog>,
    pub store: Store,
    pub publisher: Arc<Publisher>,
    pub auth: Arc<Authenticator>,
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Long-polling requests waiting for their task to finish.
    pub waiters: Arc<Waiters>,
    pub metrics: Arc<ApiMetrics>,
    pub management: Arc<Management>,
    /// `warren-api@host:pid`: Celery's `origin` header and connection name.
    pub identity: Arc<str>,
    /// Disarmed unless a test arms one.
    pub fail_points: Arc<FailPoints>,
}

/// RabbitMQ's management API, with the credentials of `amqp.url`.
pub struct Management {
    pub base: String,
    pub user: String,
    pub password: SecretString,
    pub vhost: String,
    pub client: reqwest::Client,
}
