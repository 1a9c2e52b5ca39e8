//! What every handler can reach. Cheap to clone: all `Arc`s and pools.

use crate::{auth::Authenticator, fail::FailPoints, metrics::ApiMetrics, waiters::Waiters};
use secrecy::SecretString;
use std::sync::Arc;
use uuid::Uuid;
use warren_shared::{
    artifacts::ArtifactStore,
    batch::Batcher,
    broker::Publisher,
    catalog::Catalog,
    db::task,
    settings::Settings,
    store::{NewTask, Store},
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
    pub submissions: Arc<Submissions>,
}

/// Single submissions' writes, grouped: the requests in flight together
/// share one INSERT (each still answered only after it commits) and one
/// QUEUED update. A lone request is a batch of one, with no timer.
pub struct Submissions {
    pub inserts: Batcher<NewTask, task::Model>,
    pub queued: Batcher<Uuid, ()>,
}

/// Rows per grouped INSERT: about 30 parameters each, well within
/// PostgreSQL's 65,535.
const SUBMISSIONS_PER_STATEMENT: usize = 256;

/// Statements of one kind in flight at once: a commit mostly waits for the
/// disk, and PostgreSQL flushes concurrent commits together.
const STATEMENTS_AT_ONCE: usize = 1;

impl Submissions {
    /// The batchers and their loops, which the caller spawns; the loops
    /// end when the last `AppState` is dropped.
    pub fn new(
        store: &Store,
        metrics: &ApiMetrics,
    ) -> (
        Self,
        impl std::future::Future<Output = ()> + Send + 'static,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (inserts, inserting) = {
            let store = store.clone();
            Batcher::new(
                SUBMISSIONS_PER_STATEMENT,
                STATEMENTS_AT_ONCE,
                metrics.batch_size("insert"),
                move |tasks: Vec<NewTask>| {
                    let store = store.clone();
                    async move {
                        let rows = store.insert_many(&tasks).await?;
                        // Answer each request with its own row, whatever
                        // order RETURNING chose.
                        let mut by_id: std::collections::HashMap<Uuid, task::Model> =
                            rows.into_iter().map(|r| (r.id, r)).collect();
                        Ok(tasks.iter().filter_map(|t| by_id.remove(&t.id)).collect())
                    }
                },
            )
        };
        let (queued, marking) = {
            let store = store.clone();
            Batcher::new(
                SUBMISSIONS_PER_STATEMENT,
                STATEMENTS_AT_ONCE,
                metrics.batch_size("queued"),
                move |ids: Vec<Uuid>| {
                    let store = store.clone();
                    async move {
                        store.mark_queued_many(&ids).await?;
                        Ok(vec![(); ids.len()])
                    }
                },
            )
        };
        (Self { inserts, queued }, inserting, marking)
    }
}

/// RabbitMQ's management API, with the credentials of `amqp.url`.
pub struct Management {
    pub base: String,
    pub user: String,
    pub password: SecretString,
    pub vhost: String,
    pub client: reqwest::Client,
}
