//! The API, in-process on a free port, with one helper per endpoint.

use crate::wait_until;
use reqwest::{Response, StatusCode};
use serde_json::Value;
use std::{net::SocketAddr, time::Duration};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_shared::settings::Settings;

pub struct TestApi {
    pub addr: SocketAddr,
    /// Broker connection name, unique per test.
    pub identity: String,
    pub state: warren_api::AppState,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    handle: JoinHandle<std::io::Result<()>>,
}

impl TestApi {
    /// An API with these settings (normally via [`crate::TestEnv::spawn_api`]).
    pub async fn spawn_with(settings: Settings) -> Self {
        let identity = format!("warren-api@test:{}", settings.amqp.prefix);
        let app = warren_api::Application::build_named(settings, identity.clone())
            .await
            .expect("API builds");
        let addr = app.local_addr();
        let state = app.state().clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Self {
            addr,
            identity,
            state,
            client: reqwest::Client::new(),
            shutdown,
            handle,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    /// POSTs `body` verbatim with the given content type.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Response {
        self.client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("POST")
    }

    pub async fn submit(&self, task_type: &str, input: &Value) -> Response {
        self.post_raw(
            &format!("/tasks/{task_type}"),
            "application/json",
            input.to_string(),
        )
        .await
    }

    /// Submits with query parameters (`countdown=3`, ...).
    pub async fn submit_with(&self, task_type: &str, query: &str, input: &Value) -> Response {
        self.post_raw(
            &format!("/tasks/{task_type}?{query}"),
            "application/json",
            input.to_string(),
        )
        .await
    }

    /// Submits and insists on 202; returns the task id.
    pub async fn submit_ok(&self, task_type: &str, input: &Value) -> Uuid {
        let response = self.submit(task_type, input).await;
        let status = response.status();
        let body: Value = response.json().await.expect("JSON body");
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("id is a UUID")
    }

    /// `GET /tasks/{type}/{id}`, insisting on 200.
    pub async fn task(&self, task_type: &str, id: Uuid) -> Value {
        let response = self.get(&format!("/tasks/{task_type}/{id}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("JSON body")
    }

    /// Waits until the task reaches one of `states`; returns its view.
    pub async fn wait_for_state(
        &self,
        task_type: &str,
        id: Uuid,
        states: &[&str],
        timeout: Duration,
    ) -> Value {
        wait_until(
            &format!("task {id} to reach {states:?}"),
            timeout,
            || async {
                let t = self.task(task_type, id).await;
                let state = t["state"].as_str().unwrap_or_default().to_owned();
                states.contains(&state.as_str()).then_some(t)
            },
        )
        .await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.expect("API task").expect("API served");
    }
}
