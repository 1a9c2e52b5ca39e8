//! `/docs`: the HTTP API's reference, rendered here from the same OpenAPI
//! document `/openapi.json` serves. It used to be a page that loaded a
//! renderer from a CDN, unpinned: a script from elsewhere, running on the
//! origin where dashboard sessions live, and a blank page wherever the
//! API cannot reach the internet. Now it is plain HTML under the
//! dashboard's Content-Security-Policy, with no script at all.

use super::layout;
use crate::AppState;
use axum::{extract::State, response::Response};
use maud::{Markup, PreEscaped, html};
use serde_json::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

pub(crate) async fn page(State(state): State<AppState>) -> Response {
    let body = state.openapi.page(&state, |doc| render(doc).into_string());
    layout::document_page("HTTP API reference", PreEscaped(body.to_owned()))
}

/// One operation of the document, with what locates it.
struct Operation<'a> {
    method: &'a str,
    path: &'a str,
    op: &'a Value,
}

impl Operation<'_> {
    /// The anchor of its section, from its method and path (operation ids
    /// repeat: utoipa names them after their functions, and there are two
    /// `submit`s): `post-tasks-task_type` for `POST /tasks/{task_type}`.
    fn anchor(&self) -> String {
        anchor(self.method, self.path)
    }
}

/// The id of the section documenting `method` (lower case) on `path`.
pub(crate) fn anchor(method: &str, path: &str) -> String {
    let path: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace(['{', '}'], ""))
        .collect();
    format!("{method}-{}", path.join("-"))
}

fn operations(doc: &Value) -> Vec<Operation<'_>> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in METHODS {
            if item[method].is_object() {
                out.push(Operation {
                    method,
                    path,
                    op: &item[method],
                });
            }
        }
    }
    out
}

fn render(doc: &Value) -> Markup {
    let ops = operations(doc);
    let tags: std::collections::BTreeSet<&str> = ops.iter().map(|o| tag(o.op)).collect();
    html! {
        h1 { (doc["info"]["title"].as_str().unwrap_or("Warren")) " HTTP API" }
        @if let Some(d) = doc["info"]["description"].as_str() { (prose(d)) }
        p.muted {
            "The same document, for code generators and tools: "
            a href="/openapi.json" { "/openapi.json" } " (OpenAPI " (doc["openapi"].as_str().unwrap_or("3")) ")."
        }
        nav aria-label="Operations" {
            @for t in &tags {
                h2 { (t) }
                ul.ops {
                    @for o in ops.iter().filter(|o| tag(o.op) == *t) {
                        li { a href=(format!("#{}", o.anchor())) { (method_badge(o.method)) " " code { (o.path) } } }
                    }
                }
            }
        }
        @for o in &ops { (operation(o)) }
        @if let Some(schemas) = doc["components"]["schemas"].as_object() {
            h2 { "Schemas" }
            @for (name, schema) in schemas {
                section.schema id=(format!("schema-{name}")) {
                    h3 { (name) }
                    (layout::json_block("JSON Schema", schema))
                }
            }
        }
    }
}

/// A description as the document writes it (CommonMark), with its inline
/// code set as code and its blank lines as paragraphs; the rest is text.
fn prose(text: &str) -> Markup {
    html! {
        @for para in text.split("\n\n") {
            p {
                @for (i, part) in para.split('`').enumerate() {
                    @if i % 2 == 1 { code { (part) } } @else { (part) }
                }
            }
        }
    }
}

fn tag(op: &Value) -> &str {
    op["tags"][0].as_str().unwrap_or("other")
}

fn method_badge(method: &str) -> Markup {
    html! { span.badge.method.(method) { (method.to_uppercase()) } }
}

fn operation(o: &Operation<'_>) -> Markup {
    let op = o.op;
    let parameters = op["parameters"].as_array().map_or(&[][..], Vec::as_slice);
    html! {
        section.operation id=(o.anchor()) {
            h3 { (method_badge(o.method)) " " code { (o.path) } }
            @if let Some(s) = op["summary"].as_str() { div.summary { (prose(s)) } }
            @if let Some(d) = op["description"].as_str() { div.description { (prose(d)) } }
            @if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
                p.muted { "Needs " code { "Authorization: Bearer <key>" } "." }
            }
            @if !parameters.is_empty() {
                h4 { "Parameters" }
                div.scroll { table {
                    thead { tr { th { "name" } th { "in" } th { "schema" } th { "description" } } }
                    tbody {
                        @for p in parameters {
                            tr {
                                td { code { (p["name"].as_str().unwrap_or("?")) }
                                     @if p["required"].as_bool() == Some(true) { " " span.muted { "required" } } }
                                td { (p["in"].as_str().unwrap_or("")) }
                                td { (schema_summary(&p["schema"])) }
                                td { (prose(p["description"].as_str().unwrap_or(""))) }
                            }
                        }
                    }
                } }
            }
            @if let Some(body) = op["requestBody"].as_object() {
                h4 { "Request body" @if body.get("required").and_then(Value::as_bool) == Some(true) { " " span.muted { "required" } } }
                @if let Some(d) = body.get("description").and_then(Value::as_str) { (prose(d)) }
                (contents(body.get("content").unwrap_or(&Value::Null)))
            }
            h4 { "Responses" }
            div.scroll { table {
                thead { tr { th { "status" } th { "description" } th { "body" } } }
                tbody {
                    @for (status, r) in op["responses"].as_object().into_iter().flatten() {
                        tr {
                            td { code { (status) } }
                            td { (prose(r["description"].as_str().unwrap_or(""))) }
                            td { (contents(&r["content"])) }
                        }
                    }
                }
            } }
        }
    }
}

/// Each media type of a body and what its schema is.
fn contents(content: &Value) -> Markup {
    html! {
        @for (media, c) in content.as_object().into_iter().flatten() {
            div { code { (media) } ": " (schema_summary(&c["schema"])) }
        }
    }
}

/// A schema in a line: a link for a named one, the type and its bounds
/// for an inline one, the whole JSON (folded) when it is bigger than that.
fn schema_summary(schema: &Value) -> Markup {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or(r);
        return html! { a href=(format!("#schema-{name}")) { (name) } };
    }
    if schema["type"] == "array" {
        return html! { "array of " (schema_summary(&schema["items"])) };
    }
    let kind = match &schema["type"] {
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" or "),
        _ => String::new(),
    };
    let mut notes = Vec::new();
    if let Some(f) = schema["format"].as_str() {
        notes.push(f.to_owned());
    }
    for (key, word) in [
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minLength", "length ≥"),
        ("maxLength", "length ≤"),
    ] {
        if let Some(n) = schema[key].as_number() {
            notes.push(format!("{word} {n}"));
        }
    }
    if !schema["default"].is_null() {
        notes.push(format!("default {}", schema["default"]));
    }
    let values: Vec<String> = schema["enum"]
        .as_array()
        .into_iter()
        .flatten()
        .map(Value::to_string)
        .collect();
    let simple = schema.as_object().is_none_or(|o| {
        o.keys().all(|k| {
            matches!(
                k.as_str(),
                "type"
                    | "format"
                    | "minimum"
                    | "maximum"
                    | "minLength"
                    | "maxLength"
                    | "default"
                    | "enum"
                    | "description"
            )
        })
    });
    html! {
        @if simple {
            (if kind.is_empty() { "any".to_owned() } else { kind })
            @if !notes.is_empty() { " " span.muted { "(" (notes.join(", ")) ")" } }
            @if !values.is_empty() { ": one of " code { (values.join(" | ")) } }
        } @else {
            (layout::json_block(if kind.is_empty() { "schema" } else { &kind }, schema))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_schema_reads_as_a_line_or_a_link() {
        let line = |s: Value| schema_summary(&s).into_string();
        assert_eq!(
            line(json!({"$ref": "#/components/schemas/Problem"})),
            r##"<a href="#schema-Problem">Problem</a>"##
        );
        assert_eq!(
            line(json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 50})),
            r#"integer <span class="muted">(≥ 1, ≤ 1000, default 50)</span>"#
        );
        assert_eq!(
            line(json!({"type": "string", "enum": ["a", "b"]})),
            "string: one of <code>&quot;a&quot; | &quot;b&quot;</code>"
        );
        assert_eq!(
            line(json!({"type": "array", "items": {"type": "string", "format": "uuid"}})),
            r#"array of string <span class="muted">(uuid)</span>"#
        );
        // An object schema is shown whole, folded, not as a line.
        assert!(
            line(json!({"type": "object", "properties": {"x": {"type": "integer"}}}))
                .contains("<details")
        );
    }

    #[test]
    fn inline_code_is_code_and_the_rest_is_escaped_text() {
        assert_eq!(
            prose("the `state` is <b>\n\nnext").into_string(),
            "<p>the <code>state</code> is &lt;b&gt;</p><p>next</p>"
        );
    }

    #[test]
    fn every_operation_of_the_document_has_its_section_and_an_entry() {
        let doc = json!({
            "openapi": "3.1.0", "info": {"title": "Warren"},
            "paths": {
                "/tasks/{task_type}": {"post": {"tags": ["tasks"], "operationId": "submit", "responses": {"202": {"description": "accepted"}}}},
                "/healthz": {"get": {"tags": ["health"], "responses": {"200": {"description": "up"}}}}
            }
        });
        let page = render(&doc).into_string();
        assert!(
            page.contains(r##"href="#post-tasks-task_type""##)
                && page.contains(r#"id="post-tasks-task_type""#),
            "{page}"
        );
        assert!(page.contains(r#"id="get-healthz""#), "{page}");
        assert!(!page.contains("<script"), "{page}");
    }
}
