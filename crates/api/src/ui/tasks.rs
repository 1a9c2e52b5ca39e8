//! Tasks in the browser: every type with counts by state, its limits,
//! default priority and whether it is paused, a listing per
//! type (filters, cursor pages, live first page), a task's detail (live
//! status, attempts, input, result, item errors, artifacts) and its
//! actions. Every read goes through `routes::tasks` (`load`, the list
//! filter, pagination) and the store, scoped by the session's caller.

use super::{
    UiError, UiForm, UiQuery, layout,
    layout::{Nav, given, maybe_time, state_badge, time},
    live,
    session::Session,
};
use crate::{
    ApiError, AppState,
    routes::tasks::{
        control::{cancel_task, retry_task},
        load,
        read::{ListParams, paginate, serve_artifact},
    },
};
use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use maud::{Markup, html};
use serde::Deserialize;
use std::{collections::BTreeMap, time::Duration};
use warren_shared::{
    state::TaskState,
    store::{AttemptRecord, TaskSummary},
};

/// Counts by state cover tasks created this many hours ago or later.
const COUNT_HOURS: u32 = 24;
const ITEM_ERRORS_PAGE: u64 = 50;

#[derive(Deserialize)]
pub(crate) struct TypePath {
    task_type: String,
}

#[derive(Deserialize)]
pub(crate) struct TaskPath {
    task_type: String,
    id: String,
}

#[derive(Deserialize)]
pub(crate) struct ArtifactPath {
    task_type: String,
    id: String,
    name: String,
}

/// `GET /ui/tasks`: every task type this deployment runs, with counts.
pub(crate) async fn types(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    let counts = state
        .store
        .state_counts(session.caller.owners(), COUNT_HOURS)
        .await?;
    let mut by_type: BTreeMap<&str, BTreeMap<&str, i64>> = BTreeMap::new();
    for c in &counts {
        by_type
            .entry(c.task_type.as_str())
            .or_default()
            .insert(c.state.as_str(), c.n);
    }
    let mut names: Vec<&str> = state.catalog.task_types().collect();
    names.sort_unstable();
    let pauses = state.store.pauses().await?;
    let paused = |kind: &str, name: &str| pauses.iter().any(|p| p.kind == kind && p.name == name);
    let body = html! {
        h1 { "Tasks" }
        p.muted { "Counts of tasks created in the last " (COUNT_HOURS) " hours." }
        div.scroll {
            table #task-types {
                thead { tr {
                    th scope="col" { "Type" }
                    @for s in TaskState::ALL { th scope="col" .num { (s.as_str()) } }
                    th scope="col" { "Limits" }
                    th scope="col" .num { "Priority" }
                } }
                tbody {
                    @for name in &names {
                        @let row = by_type.get(name);
                        @let entry = state.catalog.get(name);
                        tr data-type=(name) {
                            th scope="row" {
                                a href=(format!("/ui/tasks/{name}")) { (name) }
                                @if paused("type", name) || entry.is_some_and(|e| paused("queue", &e.queue)) {
                                    " " span.badge.warn title="Nothing new starts until it is resumed" { "paused" }
                                }
                            }
                            @for s in TaskState::ALL {
                                @let n = row.and_then(|r| r.get(s.as_str())).copied().unwrap_or(0);
                                td.num {
                                    @if n > 0 {
                                        a href=(format!("/ui/tasks/{name}?state={}", s.as_str())) { (n) }
                                    } @else { span.muted { "0" } }
                                }
                            }
                            @let limits = entry.map(|e| e.limits.describe()).unwrap_or_default();
                            td.limits { @if limits.is_empty() { span.muted { "none" } } @else { (limits) } }
                            td.num { (entry.map_or(0, |e| e.priority)) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page("Tasks", &session, Nav::Tasks, body))
}

/// The listing's query string, as the filter form sends it.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct ListQuery {
    state: Option<String>,
    created_after: Option<String>,
    created_before: Option<String>,
    /// Minutes the browser's clock is behind UTC (`getTimezoneOffset`).
    tz: Option<String>,
    q: Option<String>,
    cursor: Option<String>,
}

impl ListQuery {
    /// The REST listing's parameters: local form times become RFC 3339.
    fn params(&self) -> Result<ListParams, ApiError> {
        let tz = match given(&self.tz) {
            None => 0,
            Some(t) => t
                .parse::<i64>()
                .ok()
                .filter(|m| m.abs() <= 24 * 60)
                .ok_or_else(|| {
                    ApiError::invalid_parameter("tz", "minutes from UTC, at most a day")
                })?,
        };
        let instant = |name: &str, v: &Option<String>| -> Result<Option<String>, ApiError> {
            let Some(text) = given(v) else {
                return Ok(None);
            };
            if chrono::DateTime::parse_from_rfc3339(&text).is_ok() {
                return Ok(Some(text));
            }
            let naive = ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"]
                .iter()
                .find_map(|f| chrono::NaiveDateTime::parse_from_str(&text, f).ok())
                .ok_or_else(|| {
                    ApiError::invalid_parameter(name, "a date and time, e.g. 2026-12-02T14:30")
                })?;
            let utc = naive.and_utc() + chrono::TimeDelta::minutes(tz);
            Ok(Some(utc.to_rfc3339()))
        };
        Ok(ListParams::new(
            given(&self.state),
            instant("created_after", &self.created_after)?,
            instant("created_before", &self.created_before)?,
            given(&self.cursor),
            given(&self.q),
        ))
    }

    /// This query without the cursor: the first page, and the live stream.
    fn first_page(&self) -> String {
        let mut pairs = Vec::new();
        for (k, v) in [
            ("state", &self.state),
            ("created_after", &self.created_after),
            ("created_before", &self.created_before),
            ("tz", &self.tz),
            ("q", &self.q),
        ] {
            if let Some(v) = given(v) {
                pairs.push(format!("{k}={}", layout::encode(&v)));
            }
        }
        pairs.join("&")
    }
}

async fn rows(
    state: &AppState,
    session: &Session,
    task_type: &str,
    q: &ListQuery,
) -> Result<(Vec<TaskSummary>, Option<String>), UiError> {
    crate::routes::tasks::entry_exists(state, task_type)?;
    let filter = q.params()?.filter()?;
    let found = state
        .store
        .list(session.caller.owners(), task_type, &filter)
        .await?;
    Ok(paginate(found, filter.limit))
}

/// `GET /ui/tasks/{type}`: newest first, filtered, one cursor page.
pub(crate) async fn list(
    State(state): State<AppState>,
    session: Session,
    Path(TypePath { task_type }): Path<TypePath>,
    UiQuery(q): UiQuery<ListQuery>,
) -> Result<Response, UiError> {
    let (rows, next) = rows(&state, &session, &task_type, &q).await?;
    let admin = session.is_admin();
    let first = q.first_page();
    let live = given(&q.cursor)
        .is_none()
        .then(|| format!("/ui/live/tasks/{task_type}?{first}"));
    let selected = given(&q.state).unwrap_or_default();
    let body = html! {
        h1 { (task_type) }
        @if let Some((path, href)) = reference_link(&task_type) {
            p.muted #submit-reference { "Submitted with " a href=(href) { code { "POST " (path) } } ": its input in the API reference." }
        }
        form.filters method="get" action=(format!("/ui/tasks/{task_type}")) role="search" {
            label { "State "
                select name="state" {
                    option value="" selected[selected.is_empty()] { "any" }
                    @for s in TaskState::ALL {
                        option value=(s.as_str()) selected[selected == s.as_str()] { (s.as_str()) }
                    }
                }
            }
            label { "Created after " input type="datetime-local" name="created_after" value=[given(&q.created_after)]; }
            label { "Created before " input type="datetime-local" name="created_before" value=[given(&q.created_before)]; }
            label { "Id or input text " input type="search" name="q" maxlength="200" value=[given(&q.q)]; }
            input type="hidden" name="tz" value=[given(&q.tz)] data-tz;
            button type="submit" { "Filter" }
            a href=(format!("/ui/tasks/{task_type}")) { "Clear" }
        }
        @if live.is_some() { p.live-note { span.dot {} " Live: new tasks appear here as they are submitted." } }
        div.scroll {
            table.tasks {
                thead { tr {
                    th scope="col" { "Task" }
                    @if admin { th scope="col" { "Owner" } }
                    th scope="col" { "State" }
                    th scope="col" { "Progress" }
                    th scope="col" .num { "Attempts" }
                    th scope="col" { "Created" }
                    th scope="col" { "Ran for" }
                } }
                tbody #rows data-live=[live] { (table_rows(&task_type, &rows, admin)) }
            }
        }
        nav.pager aria-label="Pages" {
            @if given(&q.cursor).is_some() { a href=(format!("/ui/tasks/{task_type}?{first}")) { "← Newest" } }
            @if let Some(c) = next {
                a rel="next" href=(format!("/ui/tasks/{task_type}?{first}&cursor={}", layout::encode(&c))) { "Older →" }
            }
        }
    };
    Ok(layout::page(&task_type, &session, Nav::Tasks, body))
}

/// Where the API reference documents submitting `task_type`, when the
/// type has a path of its own there (its path, the link).
fn reference_link(task_type: &str) -> Option<(String, String)> {
    let path = format!("/tasks/{task_type}");
    crate::openapi::has_own_path(task_type).then(|| {
        (
            path.clone(),
            format!("/docs#{}", super::reference::anchor("post", &path)),
        )
    })
}

fn table_rows(task_type: &str, rows: &[TaskSummary], admin: bool) -> Markup {
    let cols = if admin { 7 } else { 6 };
    html! {
        @if rows.is_empty() {
            tr { td colspan=(cols) { (layout::empty("No tasks match. Submit one with POST /tasks/{type}, or clear the filters.")) } }
        }
        @for t in rows {
            tr data-id=(t.id) {
                td { a.mono href=(format!("/ui/tasks/{task_type}/{}", t.id)) { (t.id) } }
                @if admin { td { (t.owner.as_deref().unwrap_or("—")) } }
                td { (state_badge(t.state)) }
                td { (progress(t)) }
                td.num { (t.attempts) }
                td { (time(t.created_at)) }
                td { (layout::between(t.started_at, t.finished_at)) }
            }
        }
    }
}

fn progress(t: &TaskSummary) -> Markup {
    html! {
        @match (t.progress_done, t.progress_total) {
            (Some(done), Some(total)) if total > 0 => {
                progress value=(done) max=(total) aria-label="progress" { (done) " / " (total) }
                " " span.muted { (done) " / " (total) }
            }
            (Some(done), _) => { span.muted { (done) " done" } }
            _ => { span.muted { "—" } }
        }
    }
}

/// `GET /ui/live/tasks/{type}`: the first page's rows, as they change.
pub(crate) async fn live_list(
    State(state): State<AppState>,
    session: Session,
    Path(TypePath { task_type }): Path<TypePath>,
    UiQuery(q): UiQuery<ListQuery>,
) -> Result<Response, UiError> {
    let q = ListQuery { cursor: None, ..q };
    rows(&state, &session, &task_type, &q).await?;
    let st = state.clone();
    Ok(live::stream(&state, Duration::from_secs(1), move || {
        let (state, session, task_type, q) =
            (st.clone(), session.clone(), task_type.clone(), q.clone());
        async move {
            let (rows, _) = rows(&state, &session, &task_type, &q).await?;
            Ok(table_rows(&task_type, &rows, session.is_admin()))
        }
    }))
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct DetailQuery {
    /// What the last action did (from a fixed list).
    done: Option<String>,
    errors_after: Option<i32>,
}

fn done_message(done: Option<&str>) -> (Option<&'static str>, bool) {
    match done {
        Some("cancelled") => (Some("Cancelled: the task will not run."), true),
        Some("cancel_requested") => (
            Some("Cancellation requested: its worker is stopping it."),
            true,
        ),
        Some("retried") => (Some("Queued again: attempts are counted afresh."), true),
        _ => (None, true),
    }
}

/// `GET /ui/tasks/{type}/{id}`: everything about one task.
pub(crate) async fn detail(
    State(state): State<AppState>,
    session: Session,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
    UiQuery(q): UiQuery<DetailQuery>,
) -> Result<Response, UiError> {
    let t = load(&state, &session.caller, &task_type, &id).await?;
    let attempts = state.store.attempts(t.id).await?;
    let input = state.store.input_of(t.id).await?;
    let result = if t.state == TaskState::Success {
        state.store.result_of(t.id).await?
    } else {
        None
    };
    let artifacts = if t.state == TaskState::Success {
        state.artifacts.list(t.id).await?
    } else {
        Vec::new()
    };
    let errors = state
        .store
        .item_errors(t.id, q.errors_after, ITEM_ERRORS_PAGE)
        .await?;
    let error_count = state.store.item_error_count(t.id).await?;
    let (deliveries, delivery_attempts) = state.store.deliveries(t.id).await?;
    let (flash, ok) = done_message(q.done.as_deref());
    let live = (!t.state.is_terminal()).then(|| format!("/ui/live/tasks/{task_type}/{}", t.id));
    let trace = t.traceparent.as_deref().and_then(trace_id);
    let base = format!("/ui/tasks/{task_type}/{}", t.id);
    let body = html! {
        p.crumbs { a href="/ui/tasks" { "Tasks" } " / " a href=(format!("/ui/tasks/{task_type}")) { (task_type) } }
        h1.mono { (t.id) }
        (layout::flash(flash, ok))
        dl.facts {
            dt { "Type" } dd { (task_type) }
            @if session.is_admin() { dt { "Owner" } dd { (t.owner.as_deref().unwrap_or("—")) } }
            dt { "Queue" } dd { (t.queue) }
            dt { "Trace id" } dd.mono { (trace.unwrap_or("—")) }
            @if let Some(w) = t.workflow_id {
                dt { "Workflow" } dd.mono { a href=(format!("/ui/workflows/{w}")) { (w) } }
            }
        }
        section #status data-live=[live] { (status(&base, &t, &attempts)) }
        @if let Some(input) = &input { section { h2 { "Input" } (layout::json_block("Input", input)) } }
        @if let Some(result) = &result { section { h2 { "Result" } (layout::json_block("Result", result)) } }
        @if !artifacts.is_empty() {
            section {
                h2 { "Artifacts" }
                ul.artifacts {
                    @for a in &artifacts {
                        li {
                            a.artifact href=(format!("{base}/artifacts/{}", layout::encode(&a.name))) target="_blank" rel="noopener" { (a.name) }
                            " " span.muted { (a.content_type) ", " (layout::bytes(a.size_bytes.max(0) as u64)) }
                        }
                    }
                }
            }
        }
        @if error_count > 0 { (item_errors(&base, error_count, &errors)) }
        @if !deliveries.is_empty() { (webhook_deliveries(&deliveries, &delivery_attempts)) }
    };
    Ok(layout::page(
        &format!("{task_type} {}", t.id),
        &session,
        Nav::Tasks,
        body,
    ))
}

/// The live part of the detail page: state, progress, times, attempts, actions.
fn status(base: &str, t: &TaskSummary, attempts: &[AttemptRecord]) -> Markup {
    let cancellable = !t.state.is_terminal();
    let retryable = matches!(
        t.state,
        TaskState::Failure | TaskState::Cancelled | TaskState::Expired
    );
    html! {
        div.status-line data-state=(t.state.as_str()) {
            (state_badge(t.state))
            @if let Some(m) = &t.progress_message { " " span.progress-message { (m) } }
            @if t.cancel_requested_at.is_some() && !t.state.is_terminal() { " " span.badge.warn { "cancel requested" } }
            div.actions {
                @if cancellable { a.button.danger href=(format!("{base}/cancel")) { "Cancel…" } }
                @if retryable { a.button href=(format!("{base}/retry")) { "Retry…" } }
            }
        }
        @if t.progress_done.is_some() {
            div.progress-row { (progress(t)) }
        }
        @if let Some(e) = &t.error { (error_box(e)) }
        dl.facts {
            dt { "Created" } dd { (time(t.created_at)) }
            dt { "Queued" } dd { (maybe_time(t.queued_at)) }
            dt { "Started" } dd { (maybe_time(t.started_at)) }
            dt { "Finished" } dd { (maybe_time(t.finished_at)) }
            @if matches!(t.state, TaskState::Pending | TaskState::Retry) {
                dt { "Next attempt" } dd { (maybe_time(t.publish_at)) }
            }
            dt { "Worker" } dd { (t.worker.as_deref().unwrap_or("—")) @if let Some(v) = &t.worker_version { " " span.muted { "v" (v) } } }
        }
        h2 { "Attempts" }
        (timeline(t, attempts))
    }
}

/// The task's webhook deliveries: each event, where it went, and every
/// attempt's answer.
fn webhook_deliveries(
    deliveries: &[warren_shared::store::Delivery],
    attempts: &[warren_shared::store::DeliveryAttempt],
) -> Markup {
    html! {
        section #deliveries {
            h2 { "Webhook deliveries" }
            table {
                thead { tr { th { "Event" } th { "State" } th { "Target" } th { "Attempts" } th { "Created" } th { "Finished / next" } } }
                tbody {
                    @for d in deliveries {
                        tr class=(format!("delivery-{}", d.state)) {
                            td { (d.event) }
                            td { span class=(format!("badge {}", delivery_tone(&d.state))) { (d.state) } }
                            td.mono { (d.url) }
                            td {
                                @for a in attempts.iter().filter(|a| a.delivery_id == d.id) {
                                    span.attempt title=(a.error.as_deref().unwrap_or("")) {
                                        (a.status.map_or_else(|| "no answer".to_owned(), |s| s.to_string()))
                                    }
                                    " "
                                }
                            }
                            td { (time(d.created_at)) }
                            td {
                                @if d.state == "pending" { "next " (maybe_time(d.next_attempt_at)) }
                                @else { (maybe_time(d.finished_at)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn delivery_tone(state: &str) -> &'static str {
    match state {
        "delivered" => "ok",
        "failed" => "bad",
        _ => "warn",
    }
}

fn error_box(e: &serde_json::Value) -> Markup {
    let code = e.get("code").and_then(|v| v.as_str()).unwrap_or("error");
    let message = e.get("message").and_then(|v| v.as_str()).unwrap_or("");
    html! { div.error-box role="note" { strong { (code) } " " (message) } }
}

/// Failed attempts from the history, then the current one from the row.
fn timeline(t: &TaskSummary, attempts: &[AttemptRecord]) -> Markup {
    html! {
        @if attempts.is_empty() && t.attempts == 0 {
            (layout::empty("Not started yet."))
        } @else {
            ol.timeline {
                @for a in attempts {
                    li class=(format!("attempt {}", a.outcome.to_ascii_lowercase())) {
                        strong { "Attempt " (a.attempt) } " · " (a.outcome) " · " (a.worker.as_deref().unwrap_or("—"))
                        br;
                        (maybe_time(a.started_at)) " → " (time(a.finished_at))
                        " (" (layout::between(a.started_at, Some(a.finished_at))) ")"
                        @if let Some(e) = &a.error { (error_box(e)) }
                    }
                }
                @if t.attempts > 0 && !attempts.iter().any(|a| a.attempt == t.attempts) {
                    li class=(format!("attempt current state-{}", t.state.as_str().to_ascii_lowercase())) {
                        strong { "Attempt " (t.attempts) } " · " (t.state.as_str()) " · " (t.worker.as_deref().unwrap_or("—"))
                        br;
                        (maybe_time(t.started_at)) " → " (maybe_time(t.finished_at))
                        @if t.finished_at.is_some() { " (" (layout::between(t.started_at, t.finished_at)) ")" }
                    }
                }
            }
        }
    }
}

fn item_errors(
    base: &str,
    count: i64,
    errors: &[(i32, warren_shared::store::ItemError)],
) -> Markup {
    let more = errors.len() as u64 > ITEM_ERRORS_PAGE;
    let shown = &errors[..errors.len().min(ITEM_ERRORS_PAGE as usize)];
    html! {
        section {
            h2 { "Item errors " span.muted { "(" (count) ")" } }
            div.scroll { table {
                thead { tr { th scope="col" .num { "Item" } th scope="col" { "Code" } th scope="col" { "Field" } th scope="col" { "Message" } } }
                tbody {
                    @for (i, e) in shown {
                        tr { td.num { (i) } td { (e.code) } td.mono { (e.field) } td { (e.message) } }
                    }
                }
            } }
            nav.pager aria-label="Item error pages" {
                @if let (true, Some((last, _))) = (more, shown.last()) {
                    a rel="next" href=(format!("{base}?errors_after={last}")) { "Next errors →" }
                }
            }
        }
    }
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|t| t.len() == 32)
}

/// `GET /ui/live/tasks/{type}/{id}`: the status part, as it changes.
pub(crate) async fn live_detail(
    State(state): State<AppState>,
    session: Session,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
) -> Result<Response, UiError> {
    let t = load(&state, &session.caller, &task_type, &id).await?;
    let base = format!("/ui/tasks/{task_type}/{}", t.id);
    let st = state.clone();
    Ok(live::stream(
        &state,
        Duration::from_millis(500),
        move || {
            let (state, session, task_type, id, base) = (
                st.clone(),
                session.clone(),
                task_type.clone(),
                id.clone(),
                base.clone(),
            );
            async move {
                let t = load(&state, &session.caller, &task_type, &id).await?;
                let attempts = state.store.attempts(t.id).await?;
                Ok(status(&base, &t, &attempts))
            }
        },
    ))
}

/// What a confirmation page asks.
struct Confirm {
    verb: &'static str,
    question: &'static str,
    explain: &'static str,
    danger: bool,
}

const CANCEL: Confirm = Confirm {
    verb: "cancel",
    question: "Cancel this task?",
    explain: "A task that has not started will never run; a running one is told to stop and ends CANCELLED.",
    danger: true,
};

const RETRY: Confirm = Confirm {
    verb: "retry",
    question: "Run this task again?",
    explain: "It is queued again with a fresh retry budget; its earlier attempts stay in the history.",
    danger: false,
};

async fn confirm_page(
    state: &AppState,
    session: &Session,
    task_type: &str,
    id: &str,
    c: &Confirm,
) -> Result<Response, UiError> {
    let t = load(state, &session.caller, task_type, id).await?;
    let base = format!("/ui/tasks/{task_type}/{}", t.id);
    let body = html! {
        h1 { (c.question) }
        p { span.mono { (t.id) } " (" (task_type) ") is " (state_badge(t.state)) "." }
        p { (c.explain) }
        form method="post" action=(format!("{base}/{}", c.verb)) {
            input type="hidden" name="csrf" value=(session.csrf);
            button class=(if c.danger { "danger" } else { "" }) type="submit" autofocus { "Yes, " (c.verb) " it" }
            " "
            a href=(base) { "No, go back" }
        }
    };
    Ok(layout::page(c.question, session, Nav::Tasks, body))
}

pub(crate) async fn confirm_cancel(
    State(state): State<AppState>,
    session: Session,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
) -> Result<Response, UiError> {
    confirm_page(&state, &session, &task_type, &id, &CANCEL).await
}

pub(crate) async fn confirm_retry(
    State(state): State<AppState>,
    session: Session,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
) -> Result<Response, UiError> {
    confirm_page(&state, &session, &task_type, &id, &RETRY).await
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    csrf: String,
}

/// `POST /ui/tasks/{type}/{id}/cancel`: the API's cancel, then the task.
pub(crate) async fn cancel(
    State(state): State<AppState>,
    session: Session,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
    UiForm(form): UiForm<CsrfForm>,
) -> Result<Response, UiError> {
    session.check(&form.csrf)?;
    let (status, t) = cancel_task(&state, &session.caller, &task_type, &id).await?;
    let done = if status == StatusCode::OK {
        "cancelled"
    } else {
        "cancel_requested"
    };
    Ok(back_to(&t, done))
}

/// To the task's page, saying what was done (a name from a fixed list).
fn back_to(t: &TaskSummary, done: &str) -> Response {
    let to = format!(
        "/ui/tasks/{}/{}?done={done}",
        layout::encode(&t.task_type),
        t.id
    );
    Redirect::to(&to).into_response()
}

/// `POST /ui/tasks/{type}/{id}/retry`: the API's retry, then the task.
pub(crate) async fn retry(
    State(state): State<AppState>,
    session: Session,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
    UiForm(form): UiForm<CsrfForm>,
) -> Result<Response, UiError> {
    session.check(&form.csrf)?;
    let t = retry_task(&state, &session.caller, &task_type, &id).await?;
    Ok(back_to(&t, "retried"))
}

/// `GET /ui/tasks/{type}/{id}/artifacts/{name}`: a PDF opens in the browser.
pub(crate) async fn artifact(
    State(state): State<AppState>,
    session: Session,
    Path(ArtifactPath {
        task_type,
        id,
        name,
    }): Path<ArtifactPath>,
) -> Result<Response, UiError> {
    Ok(serve_artifact(&state, &session.caller, &task_type, &id, &name, true).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_form_times_become_utc_with_the_browser_offset() {
        let q = ListQuery {
            created_after: Some("2026-12-02T10:30".into()),
            // UTC+1: the browser's clock is 60 minutes ahead, offset -60.
            tz: Some("-60".into()),
            ..ListQuery::default()
        };
        let f = q
            .params()
            .and_then(|p| p.filter())
            .map_err(|e| e.detail().to_owned());
        let after = f.ok().and_then(|f| f.created_after).map(|t| t.to_rfc3339());
        assert_eq!(after.as_deref(), Some("2026-12-02T09:30:00+00:00"));
    }

    #[test]
    fn a_bad_time_or_offset_is_named() {
        for (q, name) in [
            (
                ListQuery {
                    created_before: Some("yesterday".into()),
                    ..ListQuery::default()
                },
                "created_before",
            ),
            (
                ListQuery {
                    tz: Some("99999".into()),
                    ..ListQuery::default()
                },
                "tz",
            ),
        ] {
            let err = q
                .params()
                .err()
                .map(|e| e.detail().to_owned())
                .unwrap_or_default();
            assert!(!err.is_empty(), "{name} accepted");
        }
    }

    #[test]
    fn trace_ids_come_from_traceparents() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("garbage"), None);
    }
}
