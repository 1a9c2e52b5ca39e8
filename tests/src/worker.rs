//! A worker in-process: quick to start, for tests that do not kill it.

use crate::wait_until;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren_shared::settings::Settings;
use warren_worker::{Worker, WorkerError};

pub struct TestWorker {
    pub identity: String,
    /// Its `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), WorkerError>>,
}

impl TestWorker {
    /// A worker with these settings (normally via [`crate::TestEnv::spawn_worker`]).
    pub async fn spawn_with(settings: Settings, name: &str) -> Self {
        let settings_prefix = settings.amqp.prefix.clone();
        let identity = format!("warren-worker@test:{settings_prefix}{name}");
        let worker = Worker::build_named(settings, identity)
            .await
            .expect("worker builds");
        let identity = worker.identity().to_owned();
        let metrics_addr = worker.metrics_addr();
        let running = crate::running::under(&settings_prefix);
        let shutdown = running.shutdown();
        let health = worker.health();
        let handle = running.spawn(worker.run(shutdown.clone()));
        wait_until(
            &format!("worker {identity} to consume"),
            Duration::from_secs(20),
            || async { health.is_consuming().then_some(()) },
        )
        .await;
        Self {
            identity,
            metrics_addr,
            shutdown,
            handle,
        }
    }

    /// Its `/metrics`, as Prometheus would read them.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .expect("worker /metrics")
            .text()
            .await
            .expect("worker /metrics body")
    }

    /// Graceful stop, as on SIGTERM; returns once it has drained.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.expect("worker task").expect("worker ran");
    }
}
