//! Workflows: the caller's newest, and one as a tree. A step hangs under
//! what it waits for (a task's success or failure; a group's end); the
//! members of a group sit together under it. Read through the same store
//! calls, scoped by the same `Caller`, as `GET /workflows/{id}`.

use super::{
    UiError,
    layout::{self, Nav, maybe_time, time},
    session::Session,
};
use crate::{ApiError, AppState};
use axum::{
    extract::{Path, State},
    response::Response,
};
use maud::{Markup, html};
use serde::Deserialize;
use std::collections::BTreeMap;
use uuid::Uuid;
use warren_shared::store::{StepRow, WorkflowRow};

/// How many workflows the list shows.
const LIST_LIMIT: u64 = 100;

#[derive(Debug, Deserialize)]
pub(crate) struct WorkflowPath {
    id: String,
}

pub(crate) async fn list(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, UiError> {
    let rows = state
        .store
        .workflows(session.caller.owners(), LIST_LIMIT)
        .await?;
    let body = html! {
        h1 { "Workflows" }
        @if rows.is_empty() { (layout::empty("No workflows yet. POST /workflows, or send a Celery canvas.")) }
        @else {
            table {
                thead { tr { th { "Workflow" } th { "State" } th { "Origin" } th { "Steps" } th { "Created" } th { "Finished" } } }
                tbody {
                    @for w in &rows {
                        tr {
                            td.mono { a href=(format!("/ui/workflows/{}", w.id)) { (w.id) } }
                            td { (badge(&w.state)) }
                            td { (w.origin) }
                            td { (w.steps) }
                            td { (time(w.created_at)) }
                            td { (maybe_time(w.finished_at)) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page("Workflows", &session, Nav::Workflows, body))
}

pub(crate) async fn detail(
    State(state): State<AppState>,
    session: Session,
    Path(WorkflowPath { id }): Path<WorkflowPath>,
) -> Result<Response, UiError> {
    let not_found = || UiError::Api(ApiError::workflow_not_found(&id));
    let uuid = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let w = state
        .store
        .workflow(uuid, session.caller.owners())
        .await?
        .ok_or_else(not_found)?;
    let steps = state.store.workflow_steps(uuid).await?;
    let body = page_body(&w, &steps);
    Ok(layout::page(
        &format!("Workflow {}", w.id),
        &session,
        Nav::Workflows,
        body,
    ))
}

fn page_body(w: &WorkflowRow, steps: &[StepRow]) -> Markup {
    let tree = Tree::new(steps);
    html! {
        p.crumbs { a href="/ui/workflows" { "Workflows" } }
        h1.mono { (w.id) }
        div.status-line data-state=(w.state) { (badge(&w.state)) }
        dl.facts {
            dt { "Origin" } dd { (w.origin) }
            dt { "Steps" } dd { (w.steps) " (" (count(steps, "SUCCESS")) " succeeded)" }
            dt { "Created" } dd { (time(w.created_at)) }
            dt { "Finished" } dd { (maybe_time(w.finished_at)) }
        }
        @if let Some(e) = &w.error { section { h2 { "Error" } (layout::json_block("Error", e)) } }
        @if let Some(r) = &w.result { section { h2 { "Result" } (layout::json_block("Result", r)) } }
        section #workflow-tree {
            h2 { "Steps" }
            ul.tree { (tree.after(Anchor::Start)) }
        }
    }
}

fn count(steps: &[StepRow], state: &str) -> usize {
    steps.iter().filter(|s| shown_state(s) == state).count()
}

/// The task's state once it exists; the step's (`WAITING`, `SKIPPED`) before.
fn shown_state(s: &StepRow) -> &str {
    match (&s.task_state, s.step_state.as_str()) {
        (Some(t), "RELEASED") => t,
        (_, step) => step,
    }
}

fn badge(state: &str) -> Markup {
    let class = format!("badge state state-{}", state.to_ascii_lowercase());
    html! { span class=(class) { (state) } }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Anchor {
    Start,
    Task(Uuid),
    Join(Uuid),
}

/// Steps indexed by what they wait for.
struct Tree<'a> {
    children: BTreeMap<Anchor, Vec<&'a StepRow>>,
}

impl<'a> Tree<'a> {
    fn new(steps: &'a [StepRow]) -> Self {
        let mut children: BTreeMap<Anchor, Vec<&StepRow>> = BTreeMap::new();
        for s in steps {
            let anchor = match (s.after_task, s.after_join) {
                (Some(t), _) => Anchor::Task(t),
                (None, Some(j)) => Anchor::Join(j),
                (None, None) => Anchor::Start,
            };
            children.entry(anchor).or_default().push(s);
        }
        Self { children }
    }

    /// What starts after `anchor`: single steps, and a group's members
    /// together under one node with what follows the group.
    fn after(&self, anchor: Anchor) -> Markup {
        let steps = self.children.get(&anchor).map(Vec::as_slice).unwrap_or(&[]);
        let mut groups: Vec<(Uuid, Vec<&StepRow>)> = Vec::new();
        for s in steps.iter().copied() {
            let Some(j) = s.join_id else { continue };
            match groups.iter_mut().find(|g| g.0 == j) {
                Some(g) => g.1.push(s),
                None => groups.push((j, vec![s])),
            }
        }
        html! {
            @for s in steps.iter().filter(|s| s.join_id.is_none()) { (self.step(s)) }
            @for (j, members) in &groups {
                li.group {
                    span.kind { "group of " (members.len()) } " "
                    span.muted { (count_done(members)) " done" }
                    ul { @for m in members { (self.step(m)) } }
                    @if self.children.contains_key(&Anchor::Join(*j)) {
                        ul.then { (self.after(Anchor::Join(*j))) }
                    }
                }
            }
        }
    }

    fn step(&self, s: &StepRow) -> Markup {
        let state = shown_state(s);
        html! {
            li.step data-state=(state) {
                (badge(state)) " "
                @if s.on_failure { span.badge.warn { "on failure" } " " }
                @if s.step_state == "RELEASED" {
                    a.mono href=(format!("/ui/tasks/{}/{}", s.task_type, s.task_id)) { (s.task_type) }
                } @else { span.mono { (s.task_type) } }
                " " span.muted { (s.path) }
                @if self.children.contains_key(&Anchor::Task(s.task_id)) {
                    ul { (self.after(Anchor::Task(s.task_id))) }
                }
            }
        }
    }
}

fn count_done(members: &[&StepRow]) -> usize {
    members
        .iter()
        .filter(|m| shown_state(m) == "SUCCESS")
        .count()
}
