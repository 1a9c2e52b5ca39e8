//! One error type for every handler, rendered as RFC 9457 problem+json:
//!
//! ```json
//! {"type": "urn:warren:error:invalid_input", "title": "Invalid task input",
//!  "status": 422, "code": "invalid_input", "detail": "x: invalid type: ...",
//!  "errors": [{"field": "x", "code": "invalid_type", "message": "..."}]}
//! ```
//!
//! 4xx responses say exactly what was wrong; 5xx responses say only that
//! something went wrong on our side, and the cause chain is logged once.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};
use warren_shared::{
    codes::{ErrorCode, bounded},
    store::StoreError,
};
use warren_tasks::{FieldError, ValidationErrors};

pub const PROBLEM_JSON: &str = "application/problem+json";
/// Field errors one 422 lists: enough to fix a form, bounded so that a
/// body of a million bad fields is not a response of a million errors.
pub const MAX_FIELD_ERRORS: usize = 100;
/// Field errors repeated in `detail`, for people reading one line.
const DETAIL_FIELDS: usize = 3;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    title: &'static str,
    detail: String,
    errors: Option<ValidationErrors>,
    /// Extension members (RFC 9457 §3.2), e.g. the task's current state.
    extra: Map<String, Value>,
    retry_after_seconds: Option<u32>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        code: ErrorCode,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            title,
            detail: detail.into(),
            errors: None,
            extra: Map::new(),
            retry_after_seconds: None,
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_seconds = Some(seconds);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn title(&self) -> &'static str {
        self.title
    }

    /// What a person is told; for a 5xx only that it was our side.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// 422 naming every bad field, up to [`MAX_FIELD_ERRORS`]; the rest are
    /// counted in `errors_omitted`. Fields and messages come from the
    /// client's input (keys, quoted values), so each is cut to a bound.
    pub fn invalid_input(errors: ValidationErrors) -> Self {
        let all = errors.errors();
        let omitted = all.len().saturating_sub(MAX_FIELD_ERRORS);
        let kept: Vec<FieldError> = all
            .iter()
            .take(MAX_FIELD_ERRORS)
            .map(|f| {
                FieldError::new(
                    bounded(f.field.as_str()),
                    f.code,
                    bounded(f.message.as_str()),
                )
            })
            .collect();
        let mut detail = kept
            .iter()
            .take(DETAIL_FIELDS)
            .map(|f| match f.field.is_empty() {
                true => f.message.clone(),
                false => format!("{}: {}", f.field, f.message),
            })
            .collect::<Vec<_>>()
            .join("; ");
        if all.len() > DETAIL_FIELDS {
            detail.push_str(&format!(" (and {} more)", all.len() - DETAIL_FIELDS));
        }
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidInput,
            "Invalid task input",
            detail,
        );
        if omitted > 0 {
            e = e.with("errors_omitted", omitted);
        }
        e.errors = ValidationErrors::check(kept).err();
        e
    }

    pub fn malformed_json(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MalformedJson,
            "Malformed JSON",
            detail,
        )
    }

    pub fn unsupported_media_type(got: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            "Unsupported media type",
            format!("expected content-type application/json, got {got}"),
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            "Request body too large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
        .with("limit_bytes", limit)
    }

    pub fn invalid_parameter(name: &str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidParameter,
            "Invalid parameter",
            detail,
        )
        .with("parameter", name)
    }

    pub fn unknown_task_type<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownTaskType,
            "Unknown task type",
            format!("there is no task type `{name}`"),
        )
        .with("known_task_types", known.collect::<Vec<_>>())
    }

    pub fn task_not_found(task_type: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::TaskNotFound,
            "Task not found",
            format!("no {task_type} task with id `{id}`"),
        )
    }

    pub fn missing_api_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::MissingApiKey,
            "Missing API key",
            "send `Authorization: Bearer <key>`; keys come from `warren-api keys create`",
        )
    }

    /// Every request slot is taken (`api.max_concurrent_requests`).
    pub fn overloaded() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Overloaded,
            "Overloaded",
            "too many requests in flight on this replica; retry shortly",
        )
        .retry_after(1)
    }

    pub fn timed_out(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::TimedOut,
            "Timed out",
            format!(
                "no answer within {:.0}s; retry shortly",
                limit.as_secs_f64()
            ),
        )
        .retry_after(1)
    }

    pub fn forbidden(detail: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "Forbidden",
            detail,
        )
    }

    pub fn invalid_api_key(detail: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::InvalidApiKey,
            "Invalid API key",
            detail,
        )
    }

    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "Not found",
            format!("no resource at {path}"),
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            "Method not allowed",
            "this resource does not support that method",
        )
    }

    /// The task exists but has not finished: ask again later.
    pub fn result_not_ready(state: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorCode::ResultNotReady,
            "Result not ready",
            format!("the task is {state}; its result is available once it is SUCCESS"),
        )
        .with("state", state)
        .retry_after(1)
    }

    /// The task finished without producing a result.
    pub fn no_result(state: &str, error: Option<Value>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorCode::NoResult,
            "Task has no result",
            format!("the task ended {state} and produced no result"),
        )
        .with("state", state)
        .with("error", error.unwrap_or(Value::Null))
    }

    pub fn already_finished(state: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorCode::AlreadyFinished,
            "Task already finished",
            format!("the task ended {state}; there is nothing to cancel"),
        )
        .with("state", state)
    }

    pub fn not_retryable(state: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorCode::NotRetryable,
            "Task cannot be retried",
            format!("the task is {state}; only a task that ended FAILURE, CANCELLED or EXPIRED can be retried"),
        )
        .with("state", state)
    }

    pub fn idempotency_key_reused(key: &str, task: uuid::Uuid) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorCode::IdempotencyKeyReused,
            "Idempotency key reused",
            format!("the key `{key}` was used for a different request (task {task}); use a new key for a new request"),
        )
        .with("task_id", task.to_string())
    }

    pub fn artifact_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ArtifactNotFound,
            "Artifact not found",
            format!("the task has no artifact `{name}`"),
        )
    }

    pub fn delivery_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::DeliveryNotFound,
            "Delivery not found",
            format!("the task has no webhook delivery `{id}`"),
        )
    }

    pub fn schedule_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ScheduleNotFound,
            "Schedule not found",
            format!("no schedule `{name}` for this API key"),
        )
    }

    pub fn schedule_exists(name: &str, detail: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorCode::ScheduleExists,
            "Schedule exists",
            format!("schedule `{name}`: {detail}"),
        )
    }

    pub fn workflow_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::WorkflowNotFound,
            "Workflow not found",
            format!("no workflow `{id}` for this API key"),
        )
    }

    pub fn delivery_pending() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorCode::DeliveryPending,
            "Delivery still pending",
            "the delivery is still being tried; redeliver it once it has failed or been delivered",
        )
    }

    pub fn broker_management_unavailable(detail: &str) -> Self {
        tracing::warn!(%detail, "RabbitMQ management API unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::BrokerManagementUnavailable,
            "Broker management unavailable",
            "RabbitMQ's management API did not answer; queue depths are unknown",
        )
        .retry_after(5)
    }

    pub fn database_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::DatabaseUnavailable,
            "Service unavailable",
            "the task store is unreachable; nothing was recorded, retry later",
        )
        .retry_after(1)
    }

    /// Logs the full cause chain once and says nothing of it to the client.
    pub fn internal(err: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(error = %chain, "internal error");
        warren_shared::error_tracking::internal_error(&chain, None);
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "Internal error",
            "internal error",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_retryable() {
            // Both mean "try again shortly": 503 with Retry-After.
            tracing::warn!(error = %e, "database unavailable or in conflict");
            ApiError::database_unavailable()
        } else {
            ApiError::internal(&e)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": format!("urn:warren:error:{}", self.code.as_str()),
            "title": self.title,
            "status": self.status.as_u16(),
            "code": self.code.as_str(),
            "detail": self.detail,
        });
        if let (Some(errors), Some(obj)) = (&self.errors, body.as_object_mut()) {
            obj.insert("errors".into(), json!(errors));
        }
        if let Some(obj) = body.as_object_mut() {
            obj.extend(self.extra);
        }
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(s) = self.retry_after_seconds {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
