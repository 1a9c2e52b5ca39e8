//! The API, in-process on a free port, and clients with one helper per
//! endpoint, each acting as one owner (API key).

use crate::wait_until;
use reqwest::{Response, StatusCode};
use serde_json::Value;
use std::{net::SocketAddr, ops::Deref, time::Duration};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_shared::settings::Settings;

/// The owner the default client of a [`TestApi`] acts as.
pub const DEFAULT_OWNER: &str = "alice";

pub struct TestApi {
    pub addr: SocketAddr,
    /// Broker connection name, unique per test.
    pub identity: String,
    pub state: warren_api::AppState,
    client: ApiClient,
    shutdown: CancellationToken,
    handle: JoinHandle<()>,
}

/// Requests as one owner; `TestApi` derefs to its default client.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
    key: Option<String>,
    pub owner: Option<String>,
}

impl Deref for TestApi {
    type Target = ApiClient;

    fn deref(&self) -> &ApiClient {
        &self.client
    }
}

impl TestApi {
    /// An API with these settings (normally via [`crate::TestEnv::spawn_api`]).
    pub async fn spawn_with(settings: Settings) -> Self {
        let running = crate::running::under(&settings.amqp.prefix);
        let identity = format!("warren-api@test:{}", settings.amqp.prefix);
        let app = warren_api::Application::build_named(settings, identity.clone())
            .await
            .expect("API builds");
        let addr = app.local_addr();
        let state = app.state().clone();
        let shutdown = running.shutdown();
        let handle = running.spawn(app.run_until_stopped(shutdown.clone()));
        let mut api = Self {
            addr,
            identity,
            state,
            client: ApiClient {
                base: format!("http://{addr}"),
                http: reqwest::Client::new(),
                key: None,
                owner: None,
            },
            shutdown,
            handle,
        };
        api.client = api.client_for(DEFAULT_OWNER).await;
        api
    }

    /// A client acting as `owner`, with a freshly created API key.
    pub async fn client_for(&self, owner: &str) -> ApiClient {
        self.client_scoped(owner, warren_api::auth::Scope::Owner)
            .await
    }

    /// A client with an admin key (operations: workers, queues, every owner).
    pub async fn admin_client(&self) -> ApiClient {
        self.client_scoped("ops", warren_api::auth::Scope::Admin)
            .await
    }

    async fn client_scoped(&self, owner: &str, scope: warren_api::auth::Scope) -> ApiClient {
        let (key, _) =
            warren_api::auth::create(self.state.store.connection(), owner, "test", scope)
                .await
                .expect("create an API key");
        self.client_with_key(&key).with_owner(owner)
    }

    /// A client sending this (possibly bogus) key.
    pub fn client_with_key(&self, key: &str) -> ApiClient {
        ApiClient {
            key: Some(key.to_owned()),
            owner: None,
            ..self.client.clone()
        }
    }

    /// A client sending no key at all.
    pub fn anonymous(&self) -> ApiClient {
        ApiClient {
            key: None,
            owner: None,
            ..self.client.clone()
        }
    }

    /// The OpenAPI document this API serves (no key needed).
    pub async fn openapi(&self) -> Value {
        let response = self.anonymous().get("/openapi.json").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        response.json().await.expect("/openapi.json is JSON")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.expect("API task");
    }
}

impl ApiClient {
    fn with_owner(mut self, owner: &str) -> Self {
        self.owner = Some(owner.to_owned());
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The API key this client sends (a person types it into the dashboard).
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.authorized(self.http.get(self.url(path)))
            .send()
            .await
            .expect("GET")
    }

    pub async fn put(&self, path: &str) -> Response {
        self.authorized(self.http.put(self.url(path)))
            .send()
            .await
            .expect("PUT")
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.authorized(self.http.delete(self.url(path)))
            .send()
            .await
            .expect("DELETE")
    }

    /// POSTs `body` verbatim with the given content type and extra headers.
    pub async fn post_with(
        &self,
        path: &str,
        content_type: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> Response {
        let mut request = self.authorized(self.http.post(self.url(path)));
        request = request.header("content-type", content_type);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request.body(body).send().await.expect("POST")
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Response {
        self.post_with(path, content_type, &[], body).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.post_raw(path, "application/json", body.to_string())
            .await
    }

    pub async fn submit(&self, task_type: &str, input: &Value) -> Response {
        self.post_json(&format!("/tasks/{task_type}"), input).await
    }

    /// Submits with query parameters (`countdown=3`, ...).
    pub async fn submit_with(&self, task_type: &str, query: &str, input: &Value) -> Response {
        self.post_json(&format!("/tasks/{task_type}?{query}"), input)
            .await
    }

    /// Submits and insists on 202; returns the task id.
    pub async fn submit_ok(&self, task_type: &str, input: &Value) -> Uuid {
        self.accepted(&format!("/tasks/{task_type}"), input).await
    }

    /// POSTs `body` to `path`, insists on 202; returns the `id` it answers.
    pub async fn accepted(&self, path: &str, body: &Value) -> Uuid {
        let response = self.post_json(path, body).await;
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
        let status = response.status();
        let body: Value = response.json().await.expect("JSON body");
        assert_eq!(status, StatusCode::OK, "{body}");
        body
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
}

/// The request body schema `doc` gives `POST /tasks/<task_type>`.
pub fn input_schema<'a>(doc: &'a Value, task_type: &str) -> &'a Value {
    &doc["paths"][format!("/tasks/{task_type}")]["post"]["requestBody"]["content"]["application/json"]
        ["schema"]
}
