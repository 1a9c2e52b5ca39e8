//! Workflows: links, chains, groups and chords, turned into rows.
//!
//! A workflow is planned whole at submission: every task it will run gets
//! its id and a `workflow_steps` row saying what it waits for (nothing, a
//! task's success, a task's failure, or a join) and what it is given (the
//! result, the error, the failed task's id) in which field of its input.
//! A group is a `workflow_joins` row counting its members down. From then
//! on PostgreSQL runs it: the `tasks_workflows` trigger starts the steps an
//! outcome releases in the transaction that commits the outcome (see the
//! migration), so a chord's body is created exactly once, by whichever
//! commit takes the count to zero, and nothing polls.
//!
//! Two front doors build the same plan: the JSON of `POST /workflows`
//! ([`parse`], then [`plan`]) and the canvas fields of a Celery message
//! (`callbacks`, `errbacks`, `chain`, `chord`: [`crate::canvas::Canvas`],
//! planned by [`celery_plan`]).

use crate::canvas::{Canvas, ChordUnlock, Signature};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

/// Most tasks one workflow may plan: a chord of ten thousand is large; a
/// hundred thousand rows in one submission is an attack on the database.
pub const MAX_STEPS: usize = 10_000;
/// Deepest nesting of chains, groups, chords and links.
pub const MAX_DEPTH: usize = 16;
/// Longest field name a result or error may be given as.
const MAX_FIELD: usize = 200;

/// What was wrong with a workflow, and where (`chain[1].group[3].task`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    pub path: String,
    pub code: &'static str,
    pub message: String,
}

fn err(path: &str, code: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        path: path.to_owned(),
        code,
        message: message.into(),
    }
}

/// A workflow as submitted.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Task(TaskNode),
    /// Each one starts when the one before it succeeds, given its result.
    Chain(Vec<Node>),
    /// All start together; the result is the list of theirs, in order.
    Group(Vec<Node>),
    /// A group, then `body` given the group's list.
    Chord {
        header: Vec<Node>,
        body: Box<Node>,
        allow_failures: bool,
    },
}

/// Where a step is given what it waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassAs {
    /// The type's first positional field (Celery's rule).
    Default,
    /// Given nothing (Celery's immutable signature, `.si()`).
    Nothing,
    /// As the whole input.
    Input,
    /// Merged into the input (an object's fields).
    Merge,
    Field(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskNode {
    pub task: String,
    pub input: Map<String, Value>,
    /// Where the previous result goes (a step after another).
    pub result_as: PassAs,
    /// Where the failed task's error goes (a `link_error` step).
    pub error_as: PassAs,
    /// Started with this task's result when it succeeds.
    pub link: Vec<TaskNode>,
    /// Started with this task's error when it fails.
    pub link_error: Vec<TaskNode>,
}

/// Reads the JSON of `POST /workflows`. Every error names its path.
pub fn parse(v: &Value) -> Result<Node, SpecError> {
    node(v, "", 0)
}

fn join_path(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_owned()
    } else {
        format!("{base}.{key}")
    }
}

fn node(v: &Value, path: &str, depth: usize) -> Result<Node, SpecError> {
    if depth > MAX_DEPTH {
        return Err(err(
            path,
            "too_deep",
            format!("nested more than {MAX_DEPTH} levels"),
        ));
    }
    let Some(o) = v.as_object() else {
        return Err(err(
            path,
            "invalid_type",
            "must be an object with one of task, chain, group, chord",
        ));
    };
    let kinds: Vec<&str> = ["task", "chain", "group", "chord"]
        .into_iter()
        .filter(|k| o.contains_key(*k))
        .collect();
    match kinds.as_slice() {
        ["task"] => task_node(o, path, depth).map(Node::Task),
        ["chain"] => {
            only(o, path, &["chain"])?;
            Ok(Node::Chain(list(o, "chain", path, depth)?))
        }
        ["group"] => {
            only(o, path, &["group"])?;
            Ok(Node::Group(list(o, "group", path, depth)?))
        }
        ["chord"] => {
            only(o, path, &["chord", "body", "allow_failures"])?;
            let body = o.get("body").ok_or_else(|| {
                err(
                    &join_path(path, "body"),
                    "missing_field",
                    "a chord needs a body",
                )
            })?;
            Ok(Node::Chord {
                header: list(o, "chord", path, depth)?,
                body: Box::new(node(body, &join_path(path, "body"), depth + 1)?),
                allow_failures: flag(o, "allow_failures", path)?,
            })
        }
        [] => Err(err(
            path,
            "invalid_type",
            "needs one of task, chain, group, chord",
        )),
        _ => Err(err(
            path,
            "invalid_type",
            format!(
                "has {} where one of task, chain, group, chord is allowed",
                kinds.join(" and ")
            ),
        )),
    }
}

fn only(o: &Map<String, Value>, path: &str, allowed: &[&str]) -> Result<(), SpecError> {
    match o.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(err(
            &join_path(path, k),
            "unknown_field",
            format!("`{k}` is not allowed here"),
        )),
        None => Ok(()),
    }
}

fn flag(o: &Map<String, Value>, key: &str, path: &str) -> Result<bool, SpecError> {
    match o.get(key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(err(
            &join_path(path, key),
            "invalid_type",
            "must be true or false",
        )),
    }
}

fn list(
    o: &Map<String, Value>,
    key: &str,
    path: &str,
    depth: usize,
) -> Result<Vec<Node>, SpecError> {
    let at = join_path(path, key);
    let Some(items) = o.get(key).and_then(Value::as_array) else {
        return Err(err(&at, "invalid_type", "must be an array"));
    };
    if items.is_empty() {
        return Err(err(&at, "invalid_length", "must not be empty"));
    }
    if items.len() > MAX_STEPS {
        return Err(err(
            &at,
            "invalid_length",
            format!("at most {MAX_STEPS} entries"),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| node(v, &format!("{at}[{i}]"), depth + 1))
        .collect()
}

fn task_node(o: &Map<String, Value>, path: &str, depth: usize) -> Result<TaskNode, SpecError> {
    only(
        o,
        path,
        &[
            "task",
            "input",
            "result_as",
            "error_as",
            "link",
            "link_error",
        ],
    )?;
    let task = match o.get("task") {
        Some(Value::String(t)) if !t.is_empty() && t.len() <= 200 => t.clone(),
        _ => {
            return Err(err(
                &join_path(path, "task"),
                "invalid_type",
                "must be a task type name",
            ));
        }
    };
    let input = match o.get("input") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(err(
                &join_path(path, "input"),
                "invalid_type",
                "must be an object",
            ));
        }
    };
    let links = |key: &str| -> Result<Vec<TaskNode>, SpecError> {
        let Some(v) = o.get(key) else {
            return Ok(Vec::new());
        };
        let at = join_path(path, key);
        let items = v
            .as_array()
            .ok_or_else(|| err(&at, "invalid_type", "must be an array of tasks"))?;
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match node(v, &format!("{at}[{i}]"), depth + 1)? {
                Node::Task(t) => Ok(t),
                _ => Err(err(
                    &format!("{at}[{i}]"),
                    "invalid_type",
                    "a link is a task",
                )),
            })
            .collect()
    };
    Ok(TaskNode {
        task,
        input,
        result_as: pass_as(o.get("result_as"), &join_path(path, "result_as"))?,
        error_as: pass_as(o.get("error_as"), &join_path(path, "error_as"))?,
        link: links("link")?,
        link_error: links("link_error")?,
    })
}

fn pass_as(v: Option<&Value>, path: &str) -> Result<PassAs, SpecError> {
    match v {
        None => Ok(PassAs::Default),
        Some(Value::Bool(false)) => Ok(PassAs::Nothing),
        Some(Value::String(s)) if s == "input" => Ok(PassAs::Input),
        Some(Value::String(s)) if s == "merge" => Ok(PassAs::Merge),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_FIELD => {
            Ok(PassAs::Field(s.clone()))
        }
        Some(_) => Err(err(
            path,
            "invalid_value",
            "must be \"input\", \"merge\", a field name, or false",
        )),
    }
}

/// What a planned step needs to know of its task type.
pub trait Types {
    /// The type's queue and its positional field names; `None` if unknown.
    fn lookup(&self, task_type: &str) -> Option<(String, Vec<&'static str>)>;
}

impl Types for crate::catalog::Catalog {
    fn lookup(&self, task_type: &str) -> Option<(String, Vec<&'static str>)> {
        self.get(task_type)
            .map(|e| (e.queue.clone(), e.task.positional().to_vec()))
    }
}

/// One row of `workflow_steps`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub task_id: Uuid,
    pub seq: i32,
    pub path: String,
    pub task_type: String,
    pub queue: String,
    pub input: Value,
    pub after_task: Option<Uuid>,
    pub on_failure: bool,
    pub after_join: Option<Uuid>,
    /// `nothing`, `result`, `error` or `task_id`.
    pub takes: &'static str,
    /// `""` the whole input, `"*"` merged, otherwise a field.
    pub pass_as: Option<String>,
    pub join_id: Option<Uuid>,
    pub join_index: Option<i32>,
    #[serde(rename = "final")]
    pub is_final: bool,
    /// `WAITING`, or `RELEASED` for a Celery task already running.
    pub state: &'static str,
    /// A Celery `rpc://` client's reply queue: the steps of its canvas
    /// report there too, so `chain(...).apply_async().get()` returns.
    pub reply_to: Option<String>,
}

/// One row of `workflow_joins`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Join {
    pub id: Uuid,
    /// `None` until known: a Celery chord's members arrive before its size.
    pub size: Option<i32>,
    pub allow_failures: bool,
    pub parent_join: Option<Uuid>,
    pub parent_index: Option<i32>,
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// Everything a workflow will run, as rows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub joins: Vec<Join>,
}

/// What a step starts after.
#[derive(Debug, Clone, Copy, PartialEq)]
enum After {
    Start,
    Task(Uuid, bool),
    Join(Uuid),
}

/// Where a node's value comes out: one task's result or a join's list.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Exit {
    Task(Uuid),
    Join(Uuid),
}

impl After {
    /// As `workflow_steps` has it: `after_task`, `on_failure`, `after_join`.
    fn columns(self) -> (Option<Uuid>, bool, Option<Uuid>) {
        match self {
            After::Start => (None, false, None),
            After::Task(parent, failed) => (Some(parent), failed, None),
            After::Join(j) => (None, false, Some(j)),
        }
    }
}

impl Exit {
    fn then(self) -> After {
        match self {
            Exit::Task(id) => After::Task(id, false),
            Exit::Join(id) => After::Join(id),
        }
    }
}

/// Plans `root` for `types`: every step with a fresh id.
pub fn plan(root: &Node, types: &dyn Types) -> Result<Plan, SpecError> {
    let mut p = Planner {
        types,
        plan: Plan::default(),
    };
    let exit = p.node(root, After::Start, "", None)?;
    p.mark_final(exit);
    Ok(p.plan)
}

struct Planner<'a> {
    types: &'a dyn Types,
    plan: Plan,
}

impl Planner<'_> {
    fn node(
        &mut self,
        n: &Node,
        after: After,
        path: &str,
        member: Option<(Uuid, i32)>,
    ) -> Result<Exit, SpecError> {
        match n {
            Node::Task(t) => self.task(t, after, path, member, false).map(Exit::Task),
            Node::Chain(items) => {
                let mut after = after;
                let mut exit = None;
                for (i, item) in items.iter().enumerate() {
                    let last = i + 1 == items.len();
                    let at = format!("{}[{i}]", join_path(path, "chain"));
                    let e = self.node(item, after, &at, if last { member } else { None })?;
                    after = e.then();
                    exit = Some(e);
                }
                exit.ok_or_else(|| err(path, "invalid_length", "an empty chain"))
            }
            Node::Group(items) => {
                self.group(items, after, &join_path(path, "group"), member, false)
            }
            Node::Chord {
                header,
                body,
                allow_failures,
            } => {
                let join = self.group(
                    header,
                    after,
                    &join_path(path, "chord"),
                    None,
                    *allow_failures,
                )?;
                self.node(body, join.then(), &join_path(path, "body"), member)
            }
        }
    }

    fn group(
        &mut self,
        items: &[Node],
        after: After,
        path: &str,
        member: Option<(Uuid, i32)>,
        allow_failures: bool,
    ) -> Result<Exit, SpecError> {
        let id = Uuid::now_v7();
        let size = i32::try_from(items.len())
            .map_err(|_| err(path, "invalid_length", "too many members"))?;
        self.plan.joins.push(Join {
            id,
            size: Some(size),
            allow_failures,
            parent_join: member.map(|m| m.0),
            parent_index: member.map(|m| m.1),
            is_final: false,
        });
        for (i, item) in items.iter().enumerate() {
            let index = i32::try_from(i).unwrap_or(i32::MAX);
            self.node(item, after, &format!("{path}[{i}]"), Some((id, index)))?;
        }
        Ok(Exit::Join(id))
    }

    fn task(
        &mut self,
        t: &TaskNode,
        after: After,
        path: &str,
        member: Option<(Uuid, i32)>,
        errback: bool,
    ) -> Result<Uuid, SpecError> {
        let (queue, positional) = self.room_for(&t.task, path)?;
        let (takes, how, key) = match after {
            After::Start => ("nothing", &PassAs::Nothing, "result_as"),
            _ if errback => ("error", &t.error_as, "error_as"),
            _ => ("result", &t.result_as, "result_as"),
        };
        let pass = resolve(how, &positional, &t.task, &join_path(path, key))?;
        let id = Uuid::now_v7();
        let (after_task, on_failure, after_join) = after.columns();
        self.plan.steps.push(Step {
            task_id: id,
            seq: i32::try_from(self.plan.steps.len()).unwrap_or(i32::MAX),
            path: if path.is_empty() {
                "task".into()
            } else {
                path.to_owned()
            },
            task_type: t.task.clone(),
            queue,
            input: Value::Object(t.input.clone()),
            after_task,
            on_failure,
            after_join,
            takes: if pass.is_none() { "nothing" } else { takes },
            pass_as: pass,
            join_id: member.map(|m| m.0),
            join_index: member.map(|m| m.1),
            is_final: false,
            state: "WAITING",
            reply_to: None,
        });
        for (i, l) in t.link.iter().enumerate() {
            self.task(
                l,
                After::Task(id, false),
                &format!("{}[{i}]", join_path(path, "link")),
                None,
                false,
            )?;
        }
        for (i, l) in t.link_error.iter().enumerate() {
            self.task(
                l,
                After::Task(id, true),
                &format!("{}[{i}]", join_path(path, "link_error")),
                None,
                true,
            )?;
        }
        Ok(id)
    }

    /// The type's queue and positional fields, if it exists and the plan
    /// has room for one more step.
    fn room_for(&self, task: &str, path: &str) -> Result<(String, Vec<&'static str>), SpecError> {
        if self.plan.steps.len() >= MAX_STEPS {
            return Err(err(
                path,
                "too_many_steps",
                format!("a workflow has at most {MAX_STEPS} tasks"),
            ));
        }
        self.types.lookup(task).ok_or_else(|| {
            err(
                &join_path(path, "task"),
                "unknown_task_type",
                format!("no task type `{task}`"),
            )
        })
    }

    fn mark_final(&mut self, exit: Exit) {
        match exit {
            Exit::Task(id) => {
                if let Some(s) = self.plan.steps.iter_mut().find(|s| s.task_id == id) {
                    s.is_final = true;
                }
            }
            Exit::Join(id) => {
                if let Some(j) = self.plan.joins.iter_mut().find(|j| j.id == id) {
                    j.is_final = true;
                }
            }
        }
    }
}

/// The `pass_as` column for `how`; `None` when the step is given nothing.
fn resolve(
    how: &PassAs,
    positional: &[&str],
    task: &str,
    path: &str,
) -> Result<Option<String>, SpecError> {
    Ok(match how {
        PassAs::Nothing => None,
        PassAs::Input => Some(String::new()),
        PassAs::Merge => Some("*".into()),
        PassAs::Field(f) => Some(f.clone()),
        PassAs::Default => match positional.first() {
            Some(first) => Some((*first).to_owned()),
            None => {
                return Err(err(
                    path,
                    "missing_field",
                    format!(
                        "`{task}` has no positional field to be given the value in; say where (a field, \"input\", \"merge\" or false)"
                    ),
                ));
            }
        },
    })
}

/// The plan of a Celery message's canvas, for the task `id` of `task_type`
/// that carries it: its callbacks and errbacks, the rest of its chain, and
/// the chord it is a member of. Steps and joins take the ids Celery froze
/// into the signatures, so a redelivered message plans the same rows.
pub fn celery_plan(
    id: Uuid,
    task_type: &str,
    canvas: &Canvas,
    types: &dyn Types,
) -> Result<Plan, SpecError> {
    let mut plan = Plan::default();
    let mut me = own_step(id, task_type, types)?;
    if let Some(chord) = &canvas.chord {
        me.join_id = Some(chord.group);
        me.join_index = Some(chord.index);
        plan.joins.push(Join {
            id: chord.group,
            size: chord.size,
            allow_failures: false,
            parent_join: None,
            parent_index: None,
            is_final: false,
        });
    }
    plan.steps.push(me);
    let mut p = Planner { types, plan };
    for (i, sig) in canvas.callbacks.iter().enumerate() {
        p.signature(sig, After::Task(id, false), &format!("callbacks[{i}]"), 0)?;
    }
    for (i, sig) in canvas.errbacks.iter().enumerate() {
        p.signature(sig, After::Task(id, true), &format!("errbacks[{i}]"), i)?;
    }
    // Celery keeps the rest of a chain last-first: it pops the next one.
    let mut after = After::Task(id, false);
    for (i, sig) in canvas.chain.iter().rev().enumerate() {
        after = After::Task(p.signature(sig, after, &format!("chain[{i}]"), 0)?, false);
    }
    if let Some(chord) = &canvas.chord {
        let body = p.signature(&chord.body, After::Join(chord.group), "chord", 0)?;
        p.mark_final(Exit::Task(body));
    } else if let After::Task(last, _) = after {
        p.mark_final(Exit::Task(last));
    }
    Ok(p.plan)
}

/// The plan a `celery.chord_unlock` message adds: the chord's size (its
/// members counted) and its body, in case no member has said it yet.
pub fn chord_unlock_plan(unlock: &ChordUnlock, types: &dyn Types) -> Result<Plan, SpecError> {
    let size = i32::try_from(unlock.members.len())
        .map_err(|_| err("kwargs.result", "invalid_length", "too many members"))?;
    let mut p = Planner {
        types,
        plan: Plan::default(),
    };
    p.plan.joins.push(Join {
        id: unlock.group,
        size: Some(size),
        allow_failures: false,
        parent_join: None,
        parent_index: None,
        is_final: false,
    });
    let body = p.signature(&unlock.body, After::Join(unlock.group), "chord", 0)?;
    p.mark_final(Exit::Task(body));
    Ok(p.plan)
}

fn own_step(id: Uuid, task_type: &str, types: &dyn Types) -> Result<Step, SpecError> {
    let (queue, _) = types.lookup(task_type).ok_or_else(|| {
        err(
            "task",
            "unknown_task_type",
            format!("no task type `{task_type}`"),
        )
    })?;
    Ok(Step {
        task_id: id,
        seq: 0,
        path: "task".into(),
        task_type: task_type.to_owned(),
        queue,
        input: Value::Object(Map::new()),
        after_task: None,
        on_failure: false,
        after_join: None,
        takes: "nothing",
        pass_as: None,
        join_id: None,
        join_index: None,
        is_final: false,
        state: "RELEASED",
        reply_to: None,
    })
}

impl Planner<'_> {
    /// A Celery signature as a step: Celery prepends what a callback is
    /// given to its own positional arguments (a result; an errback is
    /// given the failed task's id), so its arguments fill the positional
    /// fields after the first.
    fn signature(
        &mut self,
        sig: &Signature,
        after: After,
        path: &str,
        n: usize,
    ) -> Result<Uuid, SpecError> {
        let (queue, positional) = self.room_for(&sig.task, path)?;
        let skip = usize::from(!sig.immutable);
        let mut input = sig.kwargs.clone();
        if sig.args.len() + skip > positional.len() {
            return Err(err(
                &join_path(path, "args"),
                "too_many_arguments",
                format!(
                    "`{}` takes {} positional argument(s)",
                    sig.task,
                    positional.len()
                ),
            ));
        }
        for (name, v) in positional.iter().skip(skip).zip(&sig.args) {
            input.insert((*name).to_owned(), v.clone());
        }
        let pass = if sig.immutable {
            None
        } else {
            positional.first().map(|f| (*f).to_owned())
        };
        let (after_task, on_failure, after_join) = after.columns();
        let takes = match (&pass, on_failure) {
            (None, _) => "nothing",
            (Some(_), true) => "task_id",
            (Some(_), false) => "result",
        };
        // Celery gives each callback an id only when it sends it; one
        // derived from the parent and position is the same on redelivery.
        let id = sig.task_id.unwrap_or_else(|| derived_id(after, path, n));
        self.plan.steps.push(Step {
            task_id: id,
            seq: i32::try_from(self.plan.steps.len()).unwrap_or(i32::MAX),
            path: path.to_owned(),
            task_type: sig.task.clone(),
            queue,
            input: Value::Object(input),
            after_task,
            on_failure,
            after_join,
            takes,
            pass_as: pass,
            join_id: None,
            join_index: None,
            is_final: false,
            state: "WAITING",
            reply_to: None,
        });
        Ok(id)
    }
}

fn derived_id(after: After, path: &str, n: usize) -> Uuid {
    let parent = match after {
        After::Start => Uuid::nil(),
        After::Task(id, _) | After::Join(id) => id,
    };
    Uuid::new_v5(&parent, format!("{path}/{n}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Builtin;
    impl Types for Builtin {
        fn lookup(&self, t: &str) -> Option<(String, Vec<&'static str>)> {
            match t {
                "multiply" => Some(("default".into(), vec!["x", "y"])),
                "sum" => Some(("default".into(), vec!["values"])),
                "noop" => Some(("default".into(), vec![])),
                _ => None,
            }
        }
    }

    fn planned(v: Value) -> Result<Plan, SpecError> {
        plan(&parse(&v)?, &Builtin)
    }

    #[test]
    fn a_chain_passes_each_result_to_the_next_first_positional_field() {
        let p = planned(json!({"chain": [
            {"task": "multiply", "input": {"x": 2, "y": 3}},
            {"task": "multiply", "input": {"y": 4}},
            {"task": "multiply", "input": {"x": 5}, "result_as": "y"}
        ]}))
        .unwrap();
        let s = &p.steps;
        assert_eq!((s[0].takes, s[0].after_task), ("nothing", None));
        assert_eq!(
            (s[1].after_task, s[1].pass_as.as_deref()),
            (Some(s[0].task_id), Some("x"))
        );
        assert_eq!(
            (s[2].after_task, s[2].pass_as.as_deref()),
            (Some(s[1].task_id), Some("y"))
        );
        assert_eq!(
            s.iter().map(|s| s.is_final).collect::<Vec<_>>(),
            [false, false, true]
        );
        assert_eq!(s[2].path, "chain[2]");
    }

    #[test]
    fn a_chord_joins_its_members_in_order_and_its_body_waits_on_the_join() {
        let members: Vec<Value> = (0..3)
            .map(|i| json!({"task": "multiply", "input": {"x": i, "y": i}}))
            .collect();
        let p = planned(json!({"chord": members, "body": {"task": "sum"}})).unwrap();
        assert_eq!(p.joins.len(), 1);
        let j = &p.joins[0];
        assert_eq!((j.size, j.is_final), (Some(3), false));
        let idx: Vec<_> = p.steps[..3]
            .iter()
            .map(|s| (s.join_id, s.join_index))
            .collect();
        assert_eq!(
            idx,
            [
                (Some(j.id), Some(0)),
                (Some(j.id), Some(1)),
                (Some(j.id), Some(2))
            ]
        );
        let body = &p.steps[3];
        assert_eq!(
            (body.after_join, body.pass_as.as_deref(), body.is_final),
            (Some(j.id), Some("values"), true)
        );
    }

    #[test]
    fn a_group_in_a_group_reports_to_its_parent_and_the_outer_one_is_the_result() {
        let p = planned(json!({"group": [
            {"task": "noop"},
            {"group": [{"task": "noop"}, {"task": "noop"}]}
        ]}))
        .unwrap();
        let (outer, inner) = (&p.joins[0], &p.joins[1]);
        assert!(outer.is_final && !inner.is_final);
        assert_eq!(
            (inner.parent_join, inner.parent_index),
            (Some(outer.id), Some(1))
        );
    }

    #[test]
    fn links_take_the_result_and_link_errors_the_error() {
        let p = planned(json!({"task": "multiply", "input": {"x": 1, "y": 2},
            "link": [{"task": "sum", "result_as": "input"}],
            "link_error": [{"task": "multiply", "input": {"y": 1}, "error_as": "x"}]}))
        .unwrap();
        let (root, ok, bad) = (&p.steps[0], &p.steps[1], &p.steps[2]);
        assert_eq!(
            (
                ok.after_task,
                ok.on_failure,
                ok.takes,
                ok.pass_as.as_deref()
            ),
            (Some(root.task_id), false, "result", Some(""))
        );
        assert_eq!(
            (
                bad.after_task,
                bad.on_failure,
                bad.takes,
                bad.pass_as.as_deref()
            ),
            (Some(root.task_id), true, "error", Some("x"))
        );
        assert!(root.is_final);
    }

    #[test]
    fn errors_name_the_path() {
        let cases = [
            (
                json!({"chain": [{"task": "multiply"}, {"task": "nope"}]}),
                "chain[1].task",
                "unknown_task_type",
            ),
            (
                json!({"chain": [{"task": "noop"}, {"task": "noop"}]}),
                "chain[1].result_as",
                "missing_field",
            ),
            (json!({"group": []}), "group", "invalid_length"),
            (
                json!({"chord": [{"task": "noop"}]}),
                "body",
                "missing_field",
            ),
            (
                json!({"task": "noop", "extra": 1}),
                "extra",
                "unknown_field",
            ),
            (json!({"task": "noop", "chain": []}), "", "invalid_type"),
            (
                json!({"task": "noop", "input": [1]}),
                "input",
                "invalid_type",
            ),
            (json!([1]), "", "invalid_type"),
            (
                json!({"task": "sum", "link": [{"chain": []}]}),
                "link[0].chain",
                "invalid_length",
            ),
        ];
        for (spec, path, code) in cases {
            let e = planned(spec.clone()).unwrap_err();
            assert_eq!((e.path.as_str(), e.code), (path, code), "{spec}: {e}");
        }
    }

    #[test]
    fn nesting_and_size_are_bounded() {
        let mut deep = json!({"task": "noop"});
        for _ in 0..=MAX_DEPTH {
            deep = json!({"chain": [deep]});
        }
        assert_eq!(planned(deep).unwrap_err().code, "too_deep");
        let many: Vec<Value> = (0..=MAX_STEPS).map(|_| json!({"task": "noop"})).collect();
        assert_eq!(
            planned(json!({"group": many})).unwrap_err().code,
            "invalid_length"
        );
    }
}
