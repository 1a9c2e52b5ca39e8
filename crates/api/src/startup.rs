//! Building the application: connections, router, listener.

use crate::{
    ApiError, AppState,
    auth::Authenticator,
    fail::FailPoints,
    limits,
    metrics::{self, ApiMetrics},
    openapi, routes,
    state::{Management, Publishing, Shared, Submissions},
    waiters,
};
use axum::{
    Router,
    extract::{DefaultBodyLimit, Request},
    http::header,
    response::IntoResponse,
    routing::{get, post, put},
};
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    sensitive_headers::SetSensitiveRequestHeadersLayer,
    trace::TraceLayer,
};
use warren_shared::{
    artifacts::PgArtifacts,
    broker::{Publisher, process_identity},
    catalog::Catalog,
    db::{self, DbErr},
    relay,
    settings::{Settings, SettingsError},
    store::Store,
};
use warren_tasks::Registry;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("connecting to PostgreSQL: {0}")]
    Database(DbErr),
    #[error("applying migrations: {0}")]
    Migrate(DbErr),
    #[error("setting up metrics: {0}")]
    Metrics(warren_shared::metrics::MetricsError),
    #[error("binding {addr}: {cause}")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

/// A built API: connected, bound, not yet serving.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
}

impl Application {
    /// Connects to PostgreSQL (migrating if configured) and binds the
    /// listener. The broker is connected lazily: the API starts, and
    /// accepts tasks, while RabbitMQ is still down.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        Self::build_named(settings, process_identity("warren-api")).await
    }

    /// Like [`Application::build`] with an explicit identity (the broker
    /// connection name and Celery `origin`), for running several APIs in
    /// one process.
    pub async fn build_named(settings: Settings, identity: String) -> Result<Self, StartupError> {
        let catalog = Catalog::new(&Registry::builtin(), &settings)?;
        // Checked here so a bad `[schedules.*]` stops startup.
        catalog.schedules(&settings)?;
        let connection = db::connect(&settings.database, &identity)
            .await
            .map_err(StartupError::Database)?;
        if settings.database.migrate_on_start {
            db::migrate(&connection)
                .await
                .map_err(StartupError::Migrate)?;
        }
        db::warn_if_short_of_connections(&connection, &settings.database).await;
        let publisher = Arc::new(
            Publisher::new(
                settings.amqp.url.clone(),
                identity.clone(),
                settings.amqp.connect_timeout(),
                settings.amqp.publish_timeout(),
                Arc::clone(catalog.topology()),
            )
            // Validated with the settings; the owner of every task is signed.
            .with_signer(settings.amqp.signer()?),
        );
        if let Err(e) = publisher.warm_up().await {
            tracing::warn!(error = %e, "broker not reachable yet; tasks will be published once it is");
        }
        let addr = settings.api.listen;
        let listener = bind(addr).map_err(|cause| StartupError::Bind { addr, cause })?;
        let local_addr = listener
            .local_addr()
            .map_err(|cause| StartupError::Bind { addr, cause })?;
        let auth = Arc::new(Authenticator::new(
            connection.clone(),
            &settings.api.static_keys,
            &settings.api.static_admin_keys,
            std::time::Duration::from_secs(settings.api.key_cache_seconds),
        ));
        let management = Arc::new(Management::new(&settings.amqp)?);
        warren_shared::management::ensure_policy(&management, &catalog.topology().policy()).await;
        let metrics = Arc::new(
            ApiMetrics::new(&connection, settings.database.max_connections)
                .map_err(StartupError::Metrics)?,
        );
        let store = Store::new(connection.clone());
        let catalog = Arc::new(catalog);
        let fail_points = Arc::<FailPoints>::default();
        let publishing = Publishing {
            publisher: Arc::clone(&publisher),
            catalog: Arc::clone(&catalog),
            metrics: Arc::clone(&metrics),
            fail_points: Arc::clone(&fail_points),
        };
        let (submissions, inserting) = Submissions::new(&store, &publishing);
        tokio::spawn(inserting);
        let waiters = Arc::new(waiters::Waiters::new(&metrics));
        let state = AppState::new(Shared {
            metrics,
            submissions: Arc::new(submissions),
            requests: Arc::new(tokio::sync::Semaphore::new(
                settings.api.max_concurrent_requests,
            )),
            management,
            artifacts: Arc::new(PgArtifacts::new(connection.clone())),
            waiters,
            auth,
            settings: Arc::new(settings),
            catalog,
            store,
            publisher,
            identity: identity.into(),
            fail_points,
            stopping: CancellationToken::new(),
            queue_history: Arc::default(),
            relay_wake: Arc::default(),
            openapi: Arc::default(),
        });
        Ok(Self {
            listener,
            local_addr,
            state,
        })
    }

    /// The bound address; with port 0 configured, the port the OS picked.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` is cancelled, then finishes in-flight
    /// requests, stops the relay and closes the broker connection.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) {
        let background = TaskTracker::new();
        let settings = &self.state.settings;
        if settings.relay.enabled {
            let relay = relay::Relay::new(
                self.state.store.clone(),
                Arc::clone(&self.state.publisher),
                settings.relay.clone(),
                &self.state.catalog,
                self.state.catalog.schedules(settings).unwrap_or_default(),
                Arc::clone(&self.state.relay_wake),
            );
            background.spawn(relay.run(shutdown.clone()));
        }
        background.spawn(waiters::listen(
            Arc::clone(&self.state.waiters),
            self.state.store.clone(),
            Arc::clone(&self.state.artifacts),
            shutdown.clone(),
        ));
        background.spawn(crate::ui::sample_queues(
            self.state.clone(),
            shutdown.clone(),
        ));
        tracing::info!(
            addr = %self.local_addr,
            version = warren_shared::VERSION,
            "API listening"
        );
        let publisher = Arc::clone(&self.state.publisher);
        let stopping = self.state.stopping.clone();
        let stop = shutdown.clone();
        background.spawn(async move {
            stop.cancelled().await;
            stopping.cancel();
        });
        // Validated with the settings: positive and at most a day.
        let head_timeout = Duration::from_secs_f64(settings.api.head_timeout_seconds);
        crate::serve::serve(self.listener, router(self.state), head_timeout, shutdown).await;
        background.close();
        background.wait().await;
        publisher.close().await;
        tracing::info!("API stopped");
    }
}

/// All routes and middleware, without a socket: tests can call it directly.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.api.max_body_bytes;
    Router::new()
        .route(
            "/tasks/{task_type}",
            post(routes::tasks::submit::submit).get(routes::tasks::read::list),
        )
        .route(
            "/tasks/{task_type}/batch",
            post(routes::tasks::submit::submit_batch),
        )
        .route("/tasks/{task_type}/{id}", get(routes::tasks::read::status))
        .route(
            "/tasks/{task_type}/{id}/result",
            get(routes::tasks::read::result),
        )
        .route(
            "/tasks/{task_type}/{id}/errors",
            get(routes::tasks::read::errors),
        )
        .route(
            "/tasks/{task_type}/{id}/artifacts/{name}",
            get(routes::tasks::read::artifact),
        )
        .route(
            "/tasks/{task_type}/{id}/cancel",
            post(routes::tasks::control::cancel),
        )
        .route(
            "/tasks/{task_type}/{id}/retry",
            post(routes::tasks::control::retry),
        )
        .route(
            "/tasks/{task_type}/{id}/deliveries",
            get(routes::tasks::deliveries::list),
        )
        .route(
            "/tasks/{task_type}/{id}/deliveries/{delivery_id}/redeliver",
            post(routes::tasks::deliveries::redeliver),
        )
        .route(
            "/webhooks/secrets",
            post(routes::webhooks::create).get(routes::webhooks::list),
        )
        .route("/workflows", post(routes::workflows::submit))
        .route("/workflows/{id}", get(routes::workflows::status))
        .route("/workflows/{id}/cancel", post(routes::workflows::cancel))
        .route("/workers", get(routes::ops::workers))
        .route("/queues", get(routes::ops::queues))
        .route("/pauses", get(routes::pauses::list))
        .route(
            "/schedules",
            post(routes::schedules::create).get(routes::schedules::list),
        )
        .route(
            "/schedules/{name}",
            get(routes::schedules::show).delete(routes::schedules::delete),
        )
        .route("/schedules/{name}/pause", post(routes::schedules::pause))
        .route("/schedules/{name}/resume", post(routes::schedules::resume))
        .route(
            "/pauses/{kind}/{name}",
            put(routes::pauses::pause).delete(routes::pauses::resume),
        )
        .route("/metrics", get(metrics::serve))
        .route("/healthz", get(routes::health::healthz))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/readyz", get(routes::health::readyz))
        .merge(crate::ui::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let request_id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info_span!(
                "http",
                method = %req.method(),
                path = %req.uri().path(),
                request_id,
                owner = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            )
        }))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::COOKIE,
        ]))
        .with_state(state)
}

/// Handshakes the kernel queues until the API accepts them. Tokio's
/// default of 1,024 overflowed under 10,000 clients connecting at once (a
/// restart under long-polls), and a handshake dropped there is dropped
/// silently: its client times out ~30 s later. The kernel caps this at
/// `net.core.somaxconn` (4,096 by default).
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted API rebinds at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn not_found(req: Request) -> impl IntoResponse {
    ApiError::route_not_found(req.uri().path())
}

async fn method_not_allowed() -> impl IntoResponse {
    ApiError::method_not_allowed()
}
