//! Field-level validation errors, shared by the API's 422 answers and the
//! reasons stored for messages that fail validation in the worker.

use serde::Serialize;
use std::fmt;

/// One thing wrong with one field of a task's input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Dotted path to the field (`x`, `items[3].iban`); empty for the input
    /// as a whole.
    pub field: String,
    /// Stable, machine-readable code (`invalid_type`, `missing_field`, ...).
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            code,
            message: message.into(),
        }
    }
}

/// Everything wrong with an input; never empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ValidationErrors(Vec<FieldError>);

impl ValidationErrors {
    pub fn single(
        field: impl Into<String>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self(vec![FieldError::new(field, code, message)])
    }

    /// `Ok` when `errors` is empty, so validators can collect then decide.
    pub fn check(errors: Vec<FieldError>) -> Result<(), Self> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Self(errors))
        }
    }

    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// Turns a deserialisation failure into a field error. serde reports
    /// *where* (the path) and *what* separately; a missing field is named
    /// only in the message, so it is lifted into the path.
    pub(crate) fn from_serde(err: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = match err.path().to_string() {
            root if root == "." => String::new(),
            path => path,
        };
        let message = err.inner().to_string();
        let named = |prefix: &str| {
            message
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('`').next())
                .map(|name| join_path(&path, name))
        };
        let (field, code) = if let Some(field) = named("missing field `") {
            (field, "missing_field")
        } else if message.starts_with("unknown field `") {
            // Unlike a missing field, an unknown one is already in the path.
            (path, "unknown_field")
        } else if message.starts_with("invalid type") {
            (path, "invalid_type")
        } else {
            (path, "invalid_value")
        };
        Self::single(field, code, message)
    }
}

fn join_path(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            if e.field.is_empty() {
                write!(f, "{}", e.message)?;
            } else {
                write!(f, "{}: {}", e.field, e.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}
