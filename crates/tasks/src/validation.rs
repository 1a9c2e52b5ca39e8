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

/// Most deserialisation attempts spent looking for further bad fields.
const MAX_PROBES: usize = 64;

/// Stand-ins tried in place of a missing or mistyped top-level field, so
/// that deserialisation gets past it and reports the next bad one.
fn stand_ins() -> [serde_json::Value; 6] {
    use serde_json::json;
    [
        json!(0),
        json!(""),
        json!(false),
        json!([]),
        json!({}),
        json!(null),
    ]
}

/// serde stops at the first error; a client fixing a form wants all of
/// them (`{}` for `multiply` is "x missing" *and* "y missing"). After the
/// first error at a top-level field, that field is replaced by a stand-in
/// (removed, if unknown) and deserialisation tried again, until it passes
/// or an error is not about a top-level field. Only on the error path.
pub(crate) fn every_field_error<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
    first: serde_path_to_error::Error<serde_json::Error>,
) -> ValidationErrors {
    let mut found = ValidationErrors::from_serde(first).0;
    let serde_json::Value::Object(original) = value else {
        return ValidationErrors(found);
    };
    let mut probe = original.clone();
    let mut stand_in = 0;
    for _ in 0..MAX_PROBES {
        let Some(last) = found.last() else { break };
        let field = last.field.clone();
        if field.is_empty() || field.contains(['.', '[']) {
            break; // the input as a whole, or nested: not ours to probe
        }
        if last.code == "unknown_field" {
            probe.remove(&field);
        } else {
            let Some(value) = stand_ins().into_iter().nth(stand_in) else {
                break;
            };
            probe.insert(field.clone(), value);
        }
        match serde_path_to_error::deserialize::<_, T>(serde_json::Value::Object(probe.clone())) {
            Ok(_) => break,
            Err(e) => {
                let next = ValidationErrors::from_serde(e).0;
                match next.first() {
                    // The stand-in did not fit: try the next one.
                    Some(n) if n.field == field => stand_in += 1,
                    Some(_) => {
                        stand_in = 0;
                        found.extend(next);
                    }
                    None => break,
                }
            }
        }
    }
    ValidationErrors(found)
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
