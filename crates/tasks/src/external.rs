//! A task type whose code runs outside Warren, on Python Celery workers
//! (`runner = "celery"` in configuration). Warren validates its input
//! against a JSON Schema, records it, publishes it and records what the
//! Python worker reports; it never runs it. The schema is the contract the
//! API enforces before anything is queued, as a Rust type's `Input` is.

use crate::{DynTask, FieldError, Policy, TaskContext, TaskError, TaskFuture, ValidationErrors};
use jsonschema::{ValidationError, error::ValidationErrorKind, paths::LocationSegment};
use serde_json::{Map, Value};

/// Fields named in one 422 at most: a schema can fail a huge input in as
/// many places as it has values, and the API caps the list anyway.
const MAX_ERRORS: usize = 200;

/// A declared type: its name, its input's schema and its policy.
pub struct ExternalTask {
    name: String,
    validator: jsonschema::Validator,
    /// As configured: the API document shows it.
    schema: Value,
    policy: Policy,
}

/// The schema itself is not a valid JSON Schema (or refers to one Warren
/// will not fetch).
#[derive(Debug, thiserror::Error)]
#[error("not a usable JSON Schema: {0}")]
pub struct SchemaError(String);

impl ExternalTask {
    pub fn new(
        name: impl Into<String>,
        schema: &Value,
        policy: Policy,
    ) -> Result<Self, SchemaError> {
        let validator =
            jsonschema::validator_for(schema).map_err(|e| SchemaError(e.to_string()))?;
        Ok(Self {
            name: name.into(),
            validator,
            schema: schema.clone(),
            policy,
        })
    }
}

impl std::fmt::Debug for ExternalTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalTask")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl DynTask for ExternalTask {
    fn name(&self) -> &str {
        &self.name
    }

    fn policy(&self) -> Policy {
        self.policy
    }

    fn validate(&self, input: &Value) -> Result<(), ValidationErrors> {
        let errors = self
            .validator
            .iter_errors(input)
            .take(MAX_ERRORS)
            .map(|e| field_error(&e))
            .collect();
        ValidationErrors::check(errors)
    }

    fn input_schema(&self) -> Value {
        self.schema.clone()
    }

    fn positional(&self) -> &[&'static str] {
        &[]
    }

    /// A Python task's positional parameters are not known to Warren: only
    /// keyword arguments, which are the input object.
    fn input_from_call(
        &self,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Result<Value, ValidationErrors> {
        if !args.is_empty() {
            return Err(ValidationErrors::single(
                "",
                "too_many_arguments",
                "a task type declared in configuration takes keyword arguments only",
            ));
        }
        let input = Value::Object(kwargs);
        self.validate(&input)?;
        Ok(input)
    }

    fn run(&self, _input: Value, _ctx: TaskContext) -> TaskFuture {
        let name = self.name.clone();
        Box::pin(async move {
            Err(TaskError::Permanent(format!(
                "`{name}` runs on Celery workers, not on a Warren worker"
            )))
        })
    }
}

/// One schema violation as a field error: the field is the path into the
/// input (`lines[2].sku`), the code the schema keyword that failed.
fn field_error(e: &ValidationError<'_>) -> FieldError {
    let mut path = String::new();
    for segment in e.instance_path().iter() {
        match segment {
            LocationSegment::Property(p) if path.is_empty() => path.push_str(&p),
            LocationSegment::Property(p) => {
                path.push('.');
                path.push_str(&p);
            }
            LocationSegment::Index(i) => path.push_str(&format!("[{i}]")),
        }
    }
    // A missing property is reported at its parent; name the property.
    if let ValidationErrorKind::Required { property } = e.kind() {
        let name = property
            .as_str()
            .map_or_else(|| property.to_string(), str::to_owned);
        path = if path.is_empty() {
            name
        } else {
            format!("{path}.{name}")
        };
        return FieldError::new(path, "missing_field", e.to_string());
    }
    FieldError::new(path, keyword_code(e.kind()), e.to_string())
}

/// The code of the schema keyword that failed (`schema_type`,
/// `schema_minimum`, …): stable, so clients can branch on it.
fn keyword_code(kind: &ValidationErrorKind) -> &'static str {
    match kind.keyword() {
        "type" => "invalid_type",
        "minLength" | "maxLength" | "minItems" | "maxItems" | "minProperties" | "maxProperties" => {
            "invalid_length"
        }
        "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" | "multipleOf" => {
            "out_of_range"
        }
        "enum" | "const" => "invalid_choice",
        "pattern" | "format" => "invalid_format",
        "additionalProperties" | "unevaluatedProperties" => "unknown_field",
        _ => "invalid_value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wordcount() -> ExternalTask {
        let schema = json!({
            "type": "object",
            "required": ["text"],
            "additionalProperties": false,
            "properties": {
                "text": {"type": "string", "minLength": 1},
                "lines": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}
            }
        });
        ExternalTask::new("reports.wordcount", &schema, Policy::default())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_violation_names_its_field_and_keyword() {
        let t = wordcount();
        assert!(t.validate(&json!({"text": "a b"})).is_ok());
        let errors = t
            .validate(&json!({"colour": 1, "lines": [{"n": 1}, {"n": -1}]}))
            .unwrap_err();
        let mut got: Vec<(&str, &str)> = errors
            .errors()
            .iter()
            .map(|e| (e.field.as_str(), e.code))
            .collect();
        got.sort_unstable();
        assert_eq!(
            got,
            vec![
                ("", "unknown_field"),
                ("lines[1].n", "out_of_range"),
                ("text", "missing_field"),
            ]
        );
        let wrong = t.validate(&json!({"text": 5})).unwrap_err();
        assert_eq!(wrong.errors()[0].field, "text");
        assert_eq!(wrong.errors()[0].code, "invalid_type");
    }

    #[test]
    fn a_schema_that_is_not_one_is_refused_and_refs_are_never_fetched() {
        assert!(ExternalTask::new("x", &json!({"type": 12}), Policy::default()).is_err());
        let remote = json!({"$ref": "https://example.invalid/schema.json"});
        assert!(ExternalTask::new("x", &remote, Policy::default()).is_err());
    }

    #[test]
    fn positional_arguments_are_refused_and_keywords_validated() {
        let t = wordcount();
        assert!(t.input_from_call(vec![json!("a")], Map::new()).is_err());
        let mut kwargs = Map::new();
        kwargs.insert("text".into(), json!("a b c"));
        assert_eq!(
            t.input_from_call(Vec::new(), kwargs).ok(),
            Some(json!({"text": "a b c"}))
        );
    }
}
