//! One `POST /tasks/<type>` per task type this deployment runs, its body
//! the type's input schema. `POST /tasks/{task_type}` takes any object:
//! only here does a client, a code generator or Schemathesis learn what
//! each type needs before a 422 tells it. Both paths are the same route;
//! OpenAPI matches a concrete path before a templated one.

use serde_json::Value;
use utoipa::openapi::{
    OpenApi, PathItem, RefOr, Required, Schema,
    content::ContentBuilder,
    path::{HttpMethod, Operation},
    request_body::RequestBodyBuilder,
    schema::{ObjectBuilder, Type},
};
use warren_shared::catalog::Catalog;

/// Where the per-type operations are listed in the reference; described
/// in `ApiDoc`'s tags.
pub(super) const TAG: &str = "task types";

/// Adds the typed paths, after the links of the templated one so each
/// copy can point its links at its own type. A path carries every method
/// the route answers: `GET /tasks/<type>` lists, as the template does.
pub(super) fn add(doc: &mut OpenApi, catalog: &Catalog) {
    let Some(template) = doc.paths.paths.get("/tasks/{task_type}").cloned() else {
        return;
    };
    for name in catalog.task_types().filter(|name| is_path_segment(name)) {
        let (Some(entry), Some(submit)) = (catalog.get(name), &template.post) else {
            continue;
        };
        let mut item = PathItem::new(
            HttpMethod::Post,
            typed_submit(submit, name, entry.task.input_schema()),
        );
        item.get = template
            .get
            .as_ref()
            .map(|list| for_type(list, name, "list", format!("List `{name}` tasks")));
        doc.paths.paths.insert(format!("/tasks/{name}"), item);
    }
}

/// A name that is one path segment as it stands. Configuration may
/// declare others for Celery workers; they stay reachable through the
/// templated path, percent-encoded.
pub(crate) fn is_path_segment(name: &str) -> bool {
    !name.is_empty() && warren_shared::names::first_not_plain(name).is_none()
}

/// `op` for one type: its own id and tag, no `task_type` parameter, and
/// links fed the type as a constant (the path no longer holds it).
fn for_type(op: &Operation, name: &str, verb: &str, summary: String) -> Operation {
    let mut op = op.clone();
    op.operation_id = Some(format!("{verb}_{}", name.replace(['.', '-'], "_")));
    op.summary = Some(summary);
    op.tags = Some(vec![TAG.to_owned()]);
    if let Some(params) = &mut op.parameters {
        params.retain(|p| !matches!(p, RefOr::T(p) if p.name == "task_type"));
    }
    for response in op.responses.responses.values_mut() {
        if let RefOr::T(response) = response {
            for link in response.links.values_mut() {
                if let RefOr::T(link) = link
                    && let Some(value) = link.parameters.get_mut("task_type")
                {
                    *value = Value::String(name.to_owned());
                }
            }
        }
    }
    op
}

fn typed_submit(template: &Operation, name: &str, schema: Value) -> Operation {
    let mut op = for_type(template, name, "submit", format!("Submit a `{name}` task"));
    op.request_body = Some(RefOr::T(
        RequestBodyBuilder::new()
            .description(Some(format!("The input of `{name}`")))
            .required(Some(Required::True))
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(as_schema(schema)))
                    .build(),
            )
            .build(),
    ));
    op
}

/// The schema as the document's type. One that refers elsewhere (`$ref`,
/// possible in a configured schema) would point into this document, not
/// its own, so it is shown as "an object" and the API still enforces it.
fn as_schema(schema: Value) -> RefOr<Schema> {
    let any_object = || {
        RefOr::T(Schema::Object(
            ObjectBuilder::new().schema_type(Type::Object).build(),
        ))
    };
    if has_ref(&schema) {
        return any_object();
    }
    serde_json::from_value(schema).unwrap_or_else(|_| any_object())
}

fn has_ref(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.contains_key("$ref") || map.values().any(has_ref),
        Value::Array(items) => items.iter().any(has_ref),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_that_are_not_one_segment_get_no_path() {
        assert!(is_path_segment("beneficiaries.create"));
        assert!(is_path_segment("reports-daily_v2"));
        for name in ["", "a/b", "{task_type}", "a b", "é", "a?b"] {
            assert!(!is_path_segment(name), "{name}");
        }
    }

    #[test]
    fn a_schema_that_refers_elsewhere_is_shown_as_an_object() {
        let schema = json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}});
        let shown = serde_json::to_value(as_schema(schema)).unwrap();
        assert_eq!(shown, json!({"type": "object"}));
    }

    /// Every built-in input schema survives utoipa's types unchanged, but
    /// for `default: null` (which it cannot hold, and which says nothing)
    /// and `1000.0` read back as `1000`.
    #[test]
    fn builtin_schemas_are_shown_as_derived() {
        let registry = warren_tasks::Registry::builtin();
        for name in registry.names() {
            let Some(task) = registry.get(name) else {
                continue;
            };
            let derived = task.input_schema();
            let shown = serde_json::to_value(as_schema(derived.clone())).unwrap();
            assert_eq!(normal(shown), normal(derived), "{name}");
        }
    }

    fn normal(value: Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .filter(|(key, value)| !(key == "default" && value.is_null()))
                    .map(|(key, value)| (key, normal(value)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.into_iter().map(normal).collect()),
            Value::Number(n) => json!(n.as_f64()),
            other => other,
        }
    }
}
