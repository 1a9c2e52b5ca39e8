//! Stable error codes: the same strings appear in HTTP problem responses, in
//! the `error` stored with a failed task, and in dead-letter headers, so a
//! client or an operator can match on them across all three.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // Request errors (HTTP 4xx).
    /// The task input failed validation (422).
    InvalidInput,
    /// The request body is not JSON (400).
    MalformedJson,
    /// The request body is not declared as JSON (415).
    UnsupportedMediaType,
    /// The request body is larger than `api.max_body_bytes` (413).
    PayloadTooLarge,
    /// No task type of that name (404).
    UnknownTaskType,
    /// No task with that id (of that type, visible to the caller) (404).
    TaskNotFound,
    /// The task has not finished yet, so it has no result (409).
    ResultNotReady,
    /// The task finished without a result (failed, cancelled, expired) (409).
    NoResult,
    /// The task already finished: nothing to cancel (409).
    AlreadyFinished,
    /// Only a task that ended FAILURE, CANCELLED or EXPIRED can be retried (409).
    NotRetryable,
    /// The idempotency key was used before with a different request (409).
    IdempotencyKeyReused,
    /// The task has no artifact of that name (404).
    ArtifactNotFound,
    /// No such webhook delivery for this task.
    DeliveryNotFound,
    /// A redelivery was asked for a delivery still being tried.
    DeliveryPending,
    /// No such workflow for this caller.
    WorkflowNotFound,
    /// No such schedule for this caller (404).
    ScheduleNotFound,
    /// A schedule of that name exists already (409).
    ScheduleExists,
    /// A query parameter is malformed (400).
    InvalidParameter,
    /// No resource at that path (404).
    NotFound,
    /// No `Authorization: Bearer <key>` header (401).
    MissingApiKey,
    /// The key is malformed, unknown or revoked (401).
    InvalidApiKey,
    /// The key is valid but may not do this (an ordinary key on an admin route) (403).
    Forbidden,
    /// The resource exists but not with that method (405).
    MethodNotAllowed,

    // Service errors (HTTP 5xx).
    /// PostgreSQL is unreachable: nothing was recorded (503).
    DatabaseUnavailable,
    /// RabbitMQ's management API did not answer (503).
    BrokerManagementUnavailable,
    /// Every request slot of the replica is taken (503).
    Overloaded,
    /// The request took longer than `api.request_timeout_seconds` (503).
    TimedOut,
    /// Anything else; details are in the logs, never in the response (500).
    Internal,

    // Stored failures.
    /// The task reported a permanent failure.
    TaskFailed,
    /// The task reported a transient failure (and retries, if any, ran out).
    TaskError,
    /// The attempt ran past its hard time limit.
    TimeLimitExceeded,
    /// The task panicked.
    TaskPanicked,
    /// The task stopped because it was asked to.
    Cancelled,
    /// The task was not started before its `expires` time.
    Expired,
    /// A message on a task queue could not be decoded as a Warren/Celery task.
    UndecodableMessage,
    /// A message named a task type this worker does not know.
    UnknownTask,
    /// A message reused the id of another owner's (or another type's) task.
    TaskIdConflict,
    /// PostgreSQL refused to store what a message or a task carried.
    DatabaseRejected,
    /// The task's output cannot be stored (e.g. a NUL character in a string).
    InvalidResult,
}

impl ErrorCode {
    /// Every code, for parsing and for documentation tables.
    pub const ALL: [ErrorCode; 39] = [
        ErrorCode::InvalidInput,
        ErrorCode::MalformedJson,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnknownTaskType,
        ErrorCode::TaskNotFound,
        ErrorCode::ResultNotReady,
        ErrorCode::NoResult,
        ErrorCode::AlreadyFinished,
        ErrorCode::NotRetryable,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::ArtifactNotFound,
        ErrorCode::DeliveryNotFound,
        ErrorCode::DeliveryPending,
        ErrorCode::WorkflowNotFound,
        ErrorCode::ScheduleNotFound,
        ErrorCode::ScheduleExists,
        ErrorCode::InvalidParameter,
        ErrorCode::NotFound,
        ErrorCode::MissingApiKey,
        ErrorCode::InvalidApiKey,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Forbidden,
        ErrorCode::DatabaseUnavailable,
        ErrorCode::BrokerManagementUnavailable,
        ErrorCode::Overloaded,
        ErrorCode::TimedOut,
        ErrorCode::Internal,
        ErrorCode::TaskFailed,
        ErrorCode::TaskError,
        ErrorCode::TimeLimitExceeded,
        ErrorCode::TaskPanicked,
        ErrorCode::Cancelled,
        ErrorCode::Expired,
        ErrorCode::UndecodableMessage,
        ErrorCode::UnknownTask,
        ErrorCode::TaskIdConflict,
        ErrorCode::DatabaseRejected,
        ErrorCode::InvalidResult,
    ];

    /// The code whose [`ErrorCode::as_str`] is `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnknownTaskType => "unknown_task_type",
            ErrorCode::TaskNotFound => "task_not_found",
            ErrorCode::ResultNotReady => "result_not_ready",
            ErrorCode::NoResult => "no_result",
            ErrorCode::AlreadyFinished => "already_finished",
            ErrorCode::NotRetryable => "not_retryable",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::ArtifactNotFound => "artifact_not_found",
            ErrorCode::DeliveryNotFound => "delivery_not_found",
            ErrorCode::DeliveryPending => "delivery_pending",
            ErrorCode::WorkflowNotFound => "workflow_not_found",
            ErrorCode::ScheduleNotFound => "schedule_not_found",
            ErrorCode::ScheduleExists => "schedule_exists",
            ErrorCode::InvalidParameter => "invalid_parameter",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MissingApiKey => "missing_api_key",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::DatabaseUnavailable => "database_unavailable",
            ErrorCode::BrokerManagementUnavailable => "broker_management_unavailable",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::TimedOut => "timed_out",
            ErrorCode::Internal => "internal",
            ErrorCode::TaskFailed => "task_failed",
            ErrorCode::TaskError => "task_error",
            ErrorCode::TimeLimitExceeded => "time_limit_exceeded",
            ErrorCode::TaskPanicked => "task_panicked",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Expired => "expired",
            ErrorCode::UndecodableMessage => "undecodable_message",
            ErrorCode::UnknownTask => "unknown_task",
            ErrorCode::TaskIdConflict => "task_id_conflict",
            ErrorCode::DatabaseRejected => "database_rejected",
            ErrorCode::InvalidResult => "invalid_result",
        }
    }
}

impl From<&warren_tasks::TaskError> for ErrorCode {
    fn from(e: &warren_tasks::TaskError) -> Self {
        use warren_tasks::TaskError;
        match e {
            TaskError::Retryable(_) => ErrorCode::TaskError,
            TaskError::Permanent(_) => ErrorCode::TaskFailed,
            TaskError::InvalidInput(_) => ErrorCode::InvalidInput,
            TaskError::Cancelled => ErrorCode::Cancelled,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure as stored in a task's `error` column and shown by the API.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct StoredError {
    pub code: String,
    pub message: String,
    /// Whether another attempt was (or would have been) worth it.
    pub retryable: bool,
}

/// Longest error message kept (stored, logged, sent in a dead letter's
/// header). A serde error quotes the offending value, and a client chooses
/// that value: a 16 MiB string quoted into a header is a header frame the
/// broker refuses, and the connection with it.
pub const MESSAGE_MAX_CHARS: usize = 1000;

/// `text`, cut to [`MESSAGE_MAX_CHARS`] characters with an ellipsis.
pub fn bounded(text: impl Into<String>) -> String {
    let mut text = text.into();
    if let Some((cut, _)) = text.char_indices().nth(MESSAGE_MAX_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

impl StoredError {
    pub fn new(code: ErrorCode, message: impl Into<String>, retryable: bool) -> Self {
        Self {
            code: code.as_str().to_owned(),
            message: bounded(message),
            retryable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_and_as_str_agree() {
        for code in [
            ErrorCode::InvalidInput,
            ErrorCode::TimeLimitExceeded,
            ErrorCode::UnknownTask,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "y".repeat(5 * MESSAGE_MAX_CHARS);
        let e = StoredError::new(ErrorCode::InvalidInput, long, false);
        assert_eq!(e.message.chars().count(), MESSAGE_MAX_CHARS + 1);
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn every_code_parses_back() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
        assert_eq!(ErrorCode::parse("no_such_code"), None);
    }
}
