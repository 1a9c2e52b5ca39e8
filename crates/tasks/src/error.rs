use crate::ValidationErrors;

/// Why a run of a task did not produce an output.
///
/// Every variant answers "is another attempt worth it?" in
/// [`TaskError::is_retryable`]; the worker turns retryable errors into a
/// delayed retry and the rest into a final failure.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A transient failure (a timeout talking to a carrier, a lock held by
    /// someone else): another attempt may well succeed.
    #[error("{0}")]
    Retryable(String),
    /// Another attempt would fail the same way.
    #[error("{0}")]
    Permanent(String),
    /// The input does not satisfy the task's contract.
    #[error("invalid input: {0}")]
    InvalidInput(ValidationErrors),
    /// The task observed its cancellation signal and stopped early.
    #[error("cancelled")]
    Cancelled,
}

// Not `#[from]`: the message already includes the errors; exposing them as
// `source()` too would print them twice in every error chain.
impl From<ValidationErrors> for TaskError {
    fn from(e: ValidationErrors) -> Self {
        TaskError::InvalidInput(e)
    }
}

impl TaskError {
    pub fn is_retryable(&self) -> bool {
        match self {
            TaskError::Retryable(_) => true,
            TaskError::Permanent(_) | TaskError::InvalidInput(_) | TaskError::Cancelled => false,
        }
    }

    /// Stable code stored with the failure and shown by the API.
    pub fn code(&self) -> &'static str {
        match self {
            TaskError::Retryable(_) => "task_error",
            TaskError::Permanent(_) => "task_failed",
            TaskError::InvalidInput(_) => "invalid_input",
            TaskError::Cancelled => "cancelled",
        }
    }
}
