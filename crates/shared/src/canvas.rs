//! The canvas fields of a Celery message (the body's third element,
//! `{"callbacks", "errbacks", "chain", "chord"}`), read as hostile input:
//! every signature is checked and bounded, and what Warren cannot run
//! (a group or chord nested in a chain, a signature of another kind) is
//! refused with the field named rather than dropped.

use serde_json::{Map, Value};
use uuid::Uuid;

/// Most signatures one message may carry in all its canvas fields.
pub const MAX_SIGNATURES: usize = 1_000;
/// Largest chord a member may say it belongs to.
pub const MAX_CHORD_SIZE: i64 = crate::workflow::MAX_STEPS as i64;

/// One Celery signature (`add.s(2)`), as a step of the canvas.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// The id Celery froze into it, if it did (chains and chord bodies).
    pub task_id: Option<Uuid>,
    /// `.si()`: given nothing by the task before it.
    pub immutable: bool,
}

/// This message's task is member `index` of the chord `group`. Celery 5
/// keeps a chord's size in the client's result backend, not in the
/// messages: `size` is known only if the message says it (`chord_size`);
/// otherwise the chord's `celery.chord_unlock` message tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordMember {
    pub group: Uuid,
    pub index: i32,
    pub size: Option<i32>,
    pub body: Signature,
}

/// What the message's task starts after it ends.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Canvas {
    pub callbacks: Vec<Signature>,
    pub errbacks: Vec<Signature>,
    /// The rest of the chain, last step first (Celery's order).
    pub chain: Vec<Signature>,
    pub chord: Option<ChordMember>,
}

/// Why a canvas cannot run; `field` names where (`embed.chain[1]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {problem}")]
pub struct CanvasError {
    pub field: String,
    pub problem: String,
}

fn bad(field: impl Into<String>, problem: impl Into<String>) -> CanvasError {
    CanvasError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The message's `group` and `group_index` headers, which place a chord
/// member in its chord.
#[derive(Debug, Clone, Copy, Default)]
pub struct Grouping<'a> {
    pub group: Option<&'a str>,
    pub group_index: Option<i64>,
}

impl Canvas {
    /// Reads the embed; `None` when it asks for nothing.
    pub fn parse(embed: &Value, grouping: Grouping<'_>) -> Result<Option<Canvas>, CanvasError> {
        let Some(o) = embed.as_object() else {
            return Ok(None);
        };
        let mut budget = MAX_SIGNATURES;
        let canvas = Canvas {
            callbacks: signatures(o.get("callbacks"), "embed.callbacks", &mut budget)?,
            errbacks: signatures(o.get("errbacks"), "embed.errbacks", &mut budget)?,
            chain: signatures(o.get("chain"), "embed.chain", &mut budget)?,
            chord: match o.get("chord") {
                None | Some(Value::Null) => None,
                Some(body) => Some(chord_member(body, grouping)?),
            },
        };
        let empty = canvas.callbacks.is_empty()
            && canvas.errbacks.is_empty()
            && canvas.chain.is_empty()
            && canvas.chord.is_none();
        Ok((!empty).then_some(canvas))
    }
}

fn signatures(
    v: Option<&Value>,
    field: &str,
    budget: &mut usize,
) -> Result<Vec<Signature>, CanvasError> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad(field, "must be a list of signatures")),
    };
    if items.len() > *budget {
        return Err(bad(
            field,
            format!("has more than the {MAX_SIGNATURES} signatures a message may carry"),
        ));
    }
    *budget -= items.len();
    items
        .iter()
        .enumerate()
        .map(|(i, s)| signature(s, &format!("{field}[{i}]")))
        .collect()
}

fn signature(v: &Value, field: &str) -> Result<Signature, CanvasError> {
    let o = v
        .as_object()
        .ok_or_else(|| bad(field, "must be a signature object"))?;
    match o.get("subtask_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(kind)) => {
            return Err(bad(
                field,
                format!(
                    "is a {:.20}; Warren runs links, chains and chord bodies of single tasks",
                    kind
                ),
            ));
        }
        Some(_) => return Err(bad(format!("{field}.subtask_type"), "must be null")),
    }
    let task = match o.get("task") {
        Some(Value::String(t)) if !t.is_empty() && t.len() <= 200 => t.clone(),
        _ => {
            return Err(bad(
                format!("{field}.task"),
                "must be a task name of 1 to 200 characters",
            ));
        }
    };
    let args = match o.get("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(bad(format!("{field}.args"), "must be a list")),
    };
    let kwargs = match o.get("kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(bad(format!("{field}.kwargs"), "must be an object")),
    };
    let options = o.get("options").and_then(Value::as_object);
    let task_id = match options.and_then(|opts| opts.get("task_id")) {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(
            Uuid::parse_str(id)
                .map_err(|_| bad(format!("{field}.options.task_id"), "must be a UUID"))?,
        ),
        Some(_) => return Err(bad(format!("{field}.options.task_id"), "must be a UUID")),
    };
    let immutable = match o.get("immutable") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad(format!("{field}.immutable"), "must be true or false")),
    };
    Ok(Signature {
        task,
        args,
        kwargs,
        task_id,
        immutable,
    })
}

fn chord_member(body: &Value, grouping: Grouping<'_>) -> Result<ChordMember, CanvasError> {
    let field = "embed.chord";
    let sig = signature(body, field)?;
    let size = match body.get("chord_size") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .filter(|n| (1..=MAX_CHORD_SIZE).contains(n))
                .ok_or_else(|| {
                    bad(
                        format!("{field}.chord_size"),
                        format!("must be an integer from 1 to {MAX_CHORD_SIZE}"),
                    )
                })?,
        ),
    };
    let group = grouping
        .group
        .and_then(|g| Uuid::parse_str(g).ok())
        .ok_or_else(|| {
            bad(
                "group",
                "must be the chord's group id (a UUID) in a chord member",
            )
        })?;
    let limit = size.unwrap_or(MAX_CHORD_SIZE);
    let index = grouping
        .group_index
        .filter(|i| (0..limit).contains(i))
        .ok_or_else(|| {
            bad(
                "group_index",
                format!("must be the member's position, 0 to {}", limit - 1),
            )
        })?;
    Ok(ChordMember {
        group,
        index: i32::try_from(index).map_err(|_| bad("group_index", "out of range"))?,
        size: size.and_then(|n| i32::try_from(n).ok()),
        body: sig,
    })
}

/// A `celery.chord_unlock` message: what Celery sends, with a countdown,
/// when the client's result backend cannot join a chord itself (the
/// database backend): `args = [group_id, body]`, `kwargs.result` = the
/// members' results as `[[id, parent], null]`, in order. Warren takes the
/// chord's size from it; the join itself needs no polling.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordUnlock {
    pub group: Uuid,
    pub members: Vec<Uuid>,
    pub body: Signature,
}

/// The task name of Celery's chord poller.
pub const CHORD_UNLOCK: &str = "celery.chord_unlock";

impl ChordUnlock {
    pub fn parse(args: &[Value], kwargs: &Map<String, Value>) -> Result<ChordUnlock, CanvasError> {
        let group = args
            .first()
            .and_then(Value::as_str)
            .and_then(|g| Uuid::parse_str(g).ok())
            .ok_or_else(|| bad("args[0]", "must be the chord's group id (a UUID)"))?;
        let body = args
            .get(1)
            .ok_or_else(|| bad("args[1]", "must be the chord's body"))?;
        let body = signature(body, "args[1]")?;
        let results = kwargs
            .get("result")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("kwargs.result", "must be the list of the members' results"))?;
        if results.is_empty() || results.len() as i64 > MAX_CHORD_SIZE {
            return Err(bad(
                "kwargs.result",
                format!("must list 1 to {MAX_CHORD_SIZE} members"),
            ));
        }
        let members = results
            .iter()
            .enumerate()
            .map(|(i, r)| {
                member_id(r).ok_or_else(|| {
                    bad(
                        format!("kwargs.result[{i}]"),
                        "must be [[id, parent], null]",
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ChordUnlock {
            group,
            members,
            body,
        })
    }
}

/// The id in an `AsyncResult.as_tuple()`: `[[id, parent], null]`.
fn member_id(r: &Value) -> Option<Uuid> {
    let first = r.get(0)?;
    let id = first
        .as_str()
        .or_else(|| first.get(0).and_then(Value::as_str))?;
    Uuid::parse_str(id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GROUP: &str = "5d3c3f1e-8a9b-4c2d-9e1f-0a1b2c3d4e5f";

    fn sig(task: &str) -> Value {
        json!({"task": task, "args": [4], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false})
    }

    #[test]
    fn an_empty_embed_is_no_canvas() {
        let none = json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null});
        assert_eq!(Canvas::parse(&none, Grouping::default()).unwrap(), None);
    }

    #[test]
    fn links_chains_and_chord_membership_are_read() {
        let mut body = sig("sum");
        body["chord_size"] = json!(3);
        body["options"]["task_id"] = json!(GROUP);
        let embed = json!({"callbacks": [sig("multiply")], "errbacks": null, "chain": [sig("a"), sig("b")], "chord": body});
        let c = Canvas::parse(
            &embed,
            Grouping {
                group: Some(GROUP),
                group_index: Some(2),
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!((c.callbacks.len(), c.chain[1].task.as_str()), (1, "b"));
        let chord = c.chord.unwrap();
        assert_eq!(
            (
                chord.index,
                chord.size,
                chord.body.task_id.map(|u| u.to_string())
            ),
            (2, Some(3), Some(GROUP.into()))
        );
    }

    #[test]
    fn what_cannot_run_is_refused_naming_the_field() {
        let mut group = sig("x");
        group["subtask_type"] = json!("group");
        let mut chord_body = sig("sum");
        chord_body["chord_size"] = json!(2);
        let cases = [
            (
                json!({"chain": [sig("a"), group]}),
                Grouping::default(),
                "embed.chain[1]",
            ),
            (
                json!({"callbacks": "x"}),
                Grouping::default(),
                "embed.callbacks",
            ),
            (
                json!({"callbacks": [{"task": 5}]}),
                Grouping::default(),
                "embed.callbacks[0].task",
            ),
            (
                json!({"errbacks": [{"task": "a", "options": {"task_id": "x"}}]}),
                Grouping::default(),
                "embed.errbacks[0].options.task_id",
            ),
            (json!({"chord": sig("sum")}), Grouping::default(), "group"),
            (
                json!({"chord": chord_body.clone()}),
                Grouping {
                    group: Some(GROUP),
                    group_index: Some(-1),
                },
                "group_index",
            ),
            (
                json!({"chord": chord_body.clone()}),
                Grouping {
                    group: Some("nope"),
                    group_index: Some(0),
                },
                "group",
            ),
            (
                json!({"chord": chord_body}),
                Grouping {
                    group: Some(GROUP),
                    group_index: Some(2),
                },
                "group_index",
            ),
        ];
        for (embed, g, field) in cases {
            let e = Canvas::parse(&embed, g).unwrap_err();
            assert_eq!(e.field, field, "{embed}: {e}");
        }
        let many: Vec<Value> = (0..=MAX_SIGNATURES).map(|_| sig("a")).collect();
        let e = Canvas::parse(&json!({"chain": many}), Grouping::default()).unwrap_err();
        assert_eq!(e.field, "embed.chain");
    }

    #[test]
    fn a_chord_unlock_gives_the_members_in_order() {
        let a = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let b = "6fa459ea-ee8a-3ca4-894e-db77e160355e";
        let kwargs = json!({"result": [[[a, null], null], [[b, null], null]], "interval": 1});
        let u =
            ChordUnlock::parse(&[json!(GROUP), sig("sum")], kwargs.as_object().unwrap()).unwrap();
        assert_eq!(
            u.members.iter().map(Uuid::to_string).collect::<Vec<_>>(),
            [a, b]
        );
        assert_eq!(u.body.task, "sum");
        let bad_kwargs = json!({"result": [[["nope", null], null]]});
        let e = ChordUnlock::parse(&[json!(GROUP), sig("sum")], bad_kwargs.as_object().unwrap())
            .unwrap_err();
        assert_eq!(e.field, "kwargs.result[0]");
        let e = ChordUnlock::parse(&[json!("x")], &Map::new()).unwrap_err();
        assert_eq!(e.field, "args[0]");
    }
}
