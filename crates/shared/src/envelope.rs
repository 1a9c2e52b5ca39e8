//! The task message on the wire: Celery's message protocol v2, JSON body.
//!
//! A Python `celery.send_task(...)` reaches a Warren worker and a Warren
//! publish reaches a Celery worker. Properties: `content_type`,
//! `content_encoding`, `correlation_id` (= task id), `delivery_mode = 2`.
//! Headers: `lang, task, id, root_id, parent_id, group, retries, eta,
//! expires, timelimit ([hard, soft]), argsrepr, kwargsrepr, origin`, with
//! absent values sent as AMQP void as Celery does. Body:
//! `[args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]`.
//!
//! Warren's own fields travel as extra headers (`warren_owner`,
//! `traceparent`); a Celery peer ignores headers it does not know. The
//! embed's canvas fields (links, the rest of a chain, chord membership)
//! are read by [`crate::canvas`] and become workflow steps in PostgreSQL;
//! Warren's own messages never carry them (the row knows its workflow).

use crate::{signing::Signer, wire};
use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeDelta, Utc};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
};
use serde_json::{Map, Value, json};
use uuid::Uuid;

pub const CONTENT_TYPE: &str = "application/json";
pub const CONTENT_ENCODING: &str = "utf-8";
/// The submitting API key's owner; the row in PostgreSQL stays authoritative.
pub const OWNER_HEADER: &str = "warren_owner";
/// W3C trace context of the submitting request.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Celery truncates `argsrepr`/`kwargsrepr` to this many characters too.
const REPR_MAX_CHARS: usize = 1024;
/// Persistent: the broker writes the message to disk.
const DELIVERY_MODE_PERSISTENT: u8 = 2;

// Bounds on what a publisher may put in a message. Every message is client
// input (Celery clients publish straight to the exchange), so each field is
// checked before anything is claimed; a message outside them is
// dead-lettered alone, naming the field.

/// Longest task name; Celery's dotted paths are far shorter.
const MAX_TASK_NAME: usize = 200;
/// Longest string header (ids, origin, owner, trace context). Celery's own
/// are a UUID or `gen123@host`.
pub const MAX_HEADER_TEXT: usize = 1024;
/// Longest time limit a message may ask for: a day. RabbitMQ's
/// `consumer_timeout` (two hours in `rabbitmq/rabbitmq.conf`) takes an
/// unacknowledged delivery back long before that anyway.
pub const MAX_TIME_LIMIT_SECONDS: f64 = 86_400.0;
/// Most retries a message may say already failed: `attempts + 1` must fit
/// PostgreSQL's int4 with room to spare.
pub const MAX_RETRIES: u32 = 1_000_000;
/// Furthest ahead an `eta` or `expires` may be; an ETA in year 9999 is a
/// mistake or an attack, not a schedule.
pub const MAX_SCHEDULE_AHEAD: TimeDelta = TimeDelta::days(3660);
/// Largest body a worker decodes unless configured otherwise
/// (`worker.max_message_bytes`).
pub const DEFAULT_MAX_BODY_BYTES: usize = 17 * 1024 * 1024;

/// One task invocation as carried by a message.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    pub id: Uuid,
    /// The task name (Warren's task type).
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// Attempts that already failed before this message was published.
    pub retries: u32,
    /// Do not start before this instant (countdown/ETA).
    pub eta: Option<DateTime<Utc>>,
    /// Do not start after this instant; the task ends EXPIRED instead.
    pub expires: Option<DateTime<Utc>>,
    /// Hard time limit in seconds, as requested by the publisher.
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds, as requested by the publisher.
    pub soft_time_limit: Option<f64>,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    /// Who published it (`warren-api@host:pid`, `gen123@host` for Celery).
    pub origin: Option<String>,
    pub owner: Option<String>,
    pub traceparent: Option<String>,
    /// A Celery `rpc://` client's reply queue. Decoding keeps only a name
    /// of Celery's own shape (a UUID), so a message cannot point replies
    /// at Warren's queues or anyone else's.
    pub reply_to: Option<String>,
    /// What the task starts when it ends (Celery's `link`, `link_error`,
    /// chain and chord), `None` for a message without a canvas.
    pub canvas: Option<crate::canvas::Canvas>,
    /// 0–9, higher first: the AMQP `priority` property (Celery's too),
    /// which picks the queue's band when Warren publishes.
    pub priority: u8,
}

/// A message ready for `basic_publish`.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

/// Why a delivery is not a task Warren can run. The text is what lands in
/// the dead-letter queue's `x-warren-reason` header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("content_type is {0}, expected application/json")]
    ContentType(String),
    #[error("content_encoding is {0}, expected utf-8")]
    ContentEncoding(String),
    #[error("no `{0}` header: not a Celery protocol v2 message")]
    MissingHeader(&'static str),
    #[error("header `{header}` {problem}")]
    BadHeader {
        header: &'static str,
        problem: String,
    },
    #[error("body {0}")]
    Body(String),
    #[error("body is {size} bytes, more than the {max} a message may have")]
    BodyTooLarge { size: usize, max: usize },
    #[error("{field} contains a NUL character, which PostgreSQL cannot store")]
    Nul { field: String },
    #[error("{0}")]
    Canvas(#[from] crate::canvas::CanvasError),
}

impl DecodeError {
    /// The part of the message that was wrong, for the dead letter's
    /// `x-warren-error-field` header.
    pub fn field(&self) -> String {
        match self {
            DecodeError::ContentType(_) => "content_type".into(),
            DecodeError::ContentEncoding(_) => "content_encoding".into(),
            DecodeError::MissingHeader(h) | DecodeError::BadHeader { header: h, .. } => {
                (*h).to_owned()
            }
            DecodeError::Body(_) | DecodeError::BodyTooLarge { .. } => "body".into(),
            DecodeError::Nul { field } => field.clone(),
            DecodeError::Canvas(e) => e.field.clone(),
        }
    }
}

/// What decoding needs besides the message: the bounds and whom to
/// believe about owners.
#[derive(Debug, Clone, Copy)]
pub struct Door<'a> {
    pub max_body_bytes: usize,
    /// Verifies `x-warren-signature`; without it no owner header is believed.
    pub signer: Option<&'a Signer>,
    /// The clock the schedule bounds are read against.
    pub now: DateTime<Utc>,
}

impl Door<'_> {
    /// The bounds with nobody's owner believed, for tools and tests.
    pub fn untrusting() -> Door<'static> {
        Door {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            signer: None,
            now: Utc::now(),
        }
    }
}

impl TaskMessage {
    /// A fresh invocation: no retries yet, its own root.
    pub fn new(id: Uuid, task: impl Into<String>, kwargs: Map<String, Value>) -> Self {
        Self {
            id,
            task: task.into(),
            args: Vec::new(),
            kwargs,
            retries: 0,
            eta: None,
            expires: None,
            time_limit: None,
            soft_time_limit: None,
            root_id: Some(id.to_string()),
            parent_id: None,
            group: None,
            origin: None,
            owner: None,
            traceparent: None,
            reply_to: None,
            canvas: None,
            priority: 0,
        }
    }

    /// [`TaskMessage::encode`], with the owner signed so a worker believes it.
    pub fn encode_signed(&self, signer: &Signer) -> Encoded {
        self.encode_with(Some(signer))
    }

    pub fn encode(&self) -> Encoded {
        self.encode_with(None)
    }

    /// The body first, so the signature (which covers it) goes into the
    /// header table as it is built: adding it afterwards cloned the whole
    /// table, ~20 allocations per publish (in `encode_signed`, 6 % of the
    /// API's samples under single POSTs, that clone included).
    fn encode_with(&self, signer: Option<&Signer>) -> Encoded {
        let (args_repr, kwargs_repr) = (repr(&self.args), repr(&self.kwargs));
        // Serialised from references, as a Value of the three would be:
        // JSON values and string-keyed maps cannot fail to serialise.
        let body = serde_json::to_vec(&(&self.args, &self.kwargs, NO_CANVAS)).unwrap_or_default();
        let mut h = FieldTable::default();
        let mut put = |k: &'static str, v: AMQPValue| {
            h.insert(ShortString::from(k), v);
        };
        put("lang", long("rs"));
        put("task", long(&self.task));
        put("id", long(&self.id.to_string()));
        put("shadow", AMQPValue::Void);
        put("eta", opt_long(self.eta.map(iso8601).as_deref()));
        put("expires", opt_long(self.expires.map(iso8601).as_deref()));
        put("group", opt_long(self.group.as_deref()));
        put("group_index", AMQPValue::Void);
        put("retries", AMQPValue::LongLongInt(i64::from(self.retries)));
        put(
            "timelimit",
            AMQPValue::FieldArray(FieldArray::from(vec![
                opt_double(self.time_limit),
                opt_double(self.soft_time_limit),
            ])),
        );
        put("root_id", opt_long(self.root_id.as_deref()));
        put("parent_id", opt_long(self.parent_id.as_deref()));
        put("argsrepr", long(&args_repr));
        put("kwargsrepr", long(&kwargs_repr));
        put("origin", opt_long(self.origin.as_deref()));
        put("ignore_result", AMQPValue::Boolean(false));
        put("replaced_task_nesting", AMQPValue::LongLongInt(0));
        put("stamped_headers", AMQPValue::Void);
        put("stamps", AMQPValue::FieldTable(FieldTable::default()));
        if let Some(owner) = &self.owner {
            put(OWNER_HEADER, long(owner));
        }
        if let Some(tp) = &self.traceparent {
            put(TRACEPARENT_HEADER, long(tp));
        }
        if let (Some(signer), Some(owner)) = (signer, &self.owner) {
            let sig = signer.sign(self.id, &self.task, owner, &body);
            put(crate::signing::SIGNATURE_HEADER, long(&sig));
        }
        let mut properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_content_encoding(CONTENT_ENCODING.into())
            .with_correlation_id(self.id.to_string().into())
            .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
            .with_priority(self.priority)
            .with_headers(h);
        if let Some(queue) = &self.reply_to {
            properties = properties.with_reply_to(queue.as_str().into());
        }
        Encoded { properties, body }
    }

    /// Decodes with the default bounds, believing no owner header.
    pub fn decode(properties: &BasicProperties, body: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_at(properties, body, Door::untrusting())
    }

    /// Decodes and checks every field against its bound. Never panics,
    /// whatever the bytes: an error names what was wrong.
    pub fn decode_at(
        properties: &BasicProperties,
        body: &[u8],
        door: Door<'_>,
    ) -> Result<Self, DecodeError> {
        check_content(properties)?;
        if body.len() > door.max_body_bytes {
            return Err(DecodeError::BodyTooLarge {
                size: body.len(),
                max: door.max_body_bytes,
            });
        }
        let empty = FieldTable::default();
        let h = Headers(properties.headers().as_ref().unwrap_or(&empty));

        let task = h.required_string("task")?;
        if task.is_empty() || task.len() > MAX_TASK_NAME {
            return Err(bad("task", "must be a task name of 1 to 200 characters"));
        }
        let id_text = h.required_string("id")?;
        let id = Uuid::parse_str(&id_text)
            .map_err(|_| bad("id", format!("is {:?}, which is not a UUID", cut(&id_text))))?;
        let retries = match h.get("retries") {
            None => 0,
            Some(v) => as_i64(v)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n <= MAX_RETRIES)
                .ok_or_else(|| {
                    bad(
                        "retries",
                        format!("must be an integer from 0 to {MAX_RETRIES}"),
                    )
                })?,
        };
        let (time_limit, soft_time_limit) = h.time_limits()?;
        let (args, kwargs, embed) = decode_body(body)?;
        if let Some(at) = nul_in_array(&args) {
            return Err(DecodeError::Nul {
                field: format!("args{at}"),
            });
        }
        if let Some(at) = nul_in_object(&kwargs) {
            return Err(DecodeError::Nul {
                field: format!("kwargs{at}"),
            });
        }
        if let Some(at) = find_nul(&embed) {
            return Err(DecodeError::Nul {
                field: format!("embed{at}"),
            });
        }
        let owner = h.optional_string(OWNER_HEADER)?;
        let owner = owner.filter(|o| h.owner_is_signed(door.signer, id, &task, o, body));
        let group = h.optional_string("group")?;
        let canvas = crate::canvas::Canvas::parse(
            &embed,
            crate::canvas::Grouping {
                group: group.as_deref(),
                group_index: h.get("group_index").and_then(as_i64),
            },
        )?;
        Ok(Self {
            id,
            task,
            args,
            kwargs,
            retries,
            eta: h.schedule("eta", door.now)?,
            expires: h.schedule("expires", door.now)?,
            time_limit,
            soft_time_limit,
            root_id: h.optional_string("root_id")?,
            parent_id: h.optional_string("parent_id")?,
            group,
            origin: h.optional_string("origin")?,
            owner,
            traceparent: h.optional_string(TRACEPARENT_HEADER)?,
            reply_to: celery_reply_queue(properties),
            canvas,
            // Celery allows 0–255; Warren's scale stops at 9.
            priority: properties.priority().unwrap_or(0).min(9),
        })
    }
}

/// The `reply_to` property, if it names a queue Celery's rpc backend makes.
fn celery_reply_queue(properties: &BasicProperties) -> Option<String> {
    let queue = properties.reply_to().as_ref()?.as_str();
    if Uuid::parse_str(queue).is_err() {
        tracing::warn!(
            reply_to = cut(queue),
            "reply_to is not a Celery reply queue; no replies will be sent"
        );
        return None;
    }
    Some(queue.to_owned())
}

fn check_content(properties: &BasicProperties) -> Result<(), DecodeError> {
    match properties.content_type().as_ref().map(|s| s.as_str()) {
        Some(CONTENT_TYPE) => {}
        Some(other) => return Err(DecodeError::ContentType(format!("{:?}", cut(other)))),
        None => return Err(DecodeError::ContentType("missing".into())),
    }
    match properties
        .content_encoding()
        .as_ref()
        .map(|s| s.as_str().to_ascii_lowercase())
    {
        None => Ok(()),
        Some(enc) if enc == "utf-8" || enc == "utf8" => Ok(()),
        Some(other) => Err(DecodeError::ContentEncoding(format!("{:?}", cut(&other)))),
    }
}

/// At most 64 characters of a client's text, for an error message.
fn cut(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// Where a NUL is (`[3].name`), if anywhere: in a string or an object key.
/// PostgreSQL's jsonb cannot store one, so a value holding one is refused.
pub fn find_nul(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if s.contains('\0') => Some(String::new()),
        Value::Array(items) => nul_in_array(items),
        Value::Object(map) => nul_in_object(map),
        _ => None,
    }
}

fn nul_in_array(items: &[Value]) -> Option<String> {
    items
        .iter()
        .enumerate()
        .find_map(|(i, v)| find_nul(v).map(|rest| format!("[{i}]{rest}")))
}

fn nul_in_object(map: &Map<String, Value>) -> Option<String> {
    map.iter().find_map(|(k, v)| {
        if k.contains('\0') {
            return Some(format!(".{}", k.replace('\0', "\\0")));
        }
        find_nul(v).map(|rest| format!(".{k}{rest}"))
    })
}

/// The task id of a message that may not decode as a whole, so the task's
/// row can still be told why its message was dead-lettered.
/// The `task` header, without decoding anything else.
pub fn peek_task_name(properties: &BasicProperties) -> Option<String> {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("task"))
        .and_then(wire::text)
}

pub fn peek_task_id(properties: &BasicProperties) -> Option<Uuid> {
    let from_header = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("id"))
        .and_then(wire::text);
    let from_correlation = properties
        .correlation_id()
        .as_ref()
        .map(|s| s.as_str().to_owned());
    from_header
        .or(from_correlation)
        .and_then(|s| Uuid::parse_str(&s).ok())
}

/// The message as JSON (properties, headers, body), for people and snapshots.
pub fn describe(properties: &BasicProperties, body: &[u8]) -> Value {
    let mut props = Map::new();
    let mut text = |k: &str, v: &Option<ShortString>| {
        if let Some(v) = v {
            props.insert(k.to_owned(), Value::String(v.as_str().to_owned()));
        }
    };
    text("content_type", properties.content_type());
    text("content_encoding", properties.content_encoding());
    text("correlation_id", properties.correlation_id());
    text("reply_to", properties.reply_to());
    text("expiration", properties.expiration());
    if let Some(mode) = properties.delivery_mode() {
        props.insert("delivery_mode".into(), Value::from(*mode));
    }
    if let Some(p) = properties.priority() {
        props.insert("priority".into(), Value::from(*p));
    }
    let headers = properties
        .headers()
        .as_ref()
        .map(wire::table_to_json)
        .unwrap_or_default();
    json!({
        "properties": props,
        "headers": headers,
        "body": String::from_utf8_lossy(body),
    })
}

/// A body's three parts: positional arguments, keyword arguments, embed.
type Body = (Vec<Value>, Map<String, Value>, Value);

fn decode_body(body: &[u8]) -> Result<Body, DecodeError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| DecodeError::Body(format!("is not valid JSON: {e}")))?;
    let Value::Array(mut parts) = value else {
        return Err(DecodeError::Body(
            "must be a JSON array [args, kwargs, embed]".into(),
        ));
    };
    if parts.len() != 3 {
        return Err(DecodeError::Body(format!(
            "must be [args, kwargs, embed], got an array of {} element(s)",
            parts.len()
        )));
    }
    let embed = parts.pop().unwrap_or(Value::Null);
    let kwargs = parts.pop().unwrap_or(Value::Null);
    let args = parts.pop().unwrap_or(Value::Null);
    let Value::Array(args) = args else {
        return Err(DecodeError::Body(
            "args (element 0) must be a JSON array".into(),
        ));
    };
    let Value::Object(kwargs) = kwargs else {
        return Err(DecodeError::Body(
            "kwargs (element 1) must be a JSON object".into(),
        ));
    };
    if !(embed.is_object() || embed.is_null()) {
        return Err(DecodeError::Body(
            "embed (element 2) must be a JSON object".into(),
        ));
    }
    Ok((args, kwargs, embed))
}

struct Headers<'a>(&'a FieldTable);

impl Headers<'_> {
    /// A header that is absent or void reads as `None`, as Celery sends
    /// every optional header as void.
    fn get(&self, name: &str) -> Option<&AMQPValue> {
        match self.0.inner().get(name) {
            None | Some(AMQPValue::Void) => None,
            Some(v) => Some(v),
        }
    }

    fn required_string(&self, name: &'static str) -> Result<String, DecodeError> {
        self.optional_string(name)?
            .ok_or(DecodeError::MissingHeader(name))
    }

    /// A string header: UTF-8, at most [`MAX_HEADER_TEXT`] bytes, no NUL.
    fn optional_string(&self, name: &'static str) -> Result<Option<String>, DecodeError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let text = wire::text(v).ok_or_else(|| bad(name, "must be a UTF-8 string"))?;
        if text.len() > MAX_HEADER_TEXT {
            return Err(bad(
                name,
                format!("is {} bytes, more than {MAX_HEADER_TEXT}", text.len()),
            ));
        }
        if text.contains('\0') {
            return Err(DecodeError::Nul { field: name.into() });
        }
        Ok(Some(text))
    }

    /// An ETA or expiry: a timestamp from 1970 to [`MAX_SCHEDULE_AHEAD`]
    /// after `now`.
    fn schedule(
        &self,
        name: &'static str,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, DecodeError> {
        let Some(text) = self.optional_string(name)? else {
            return Ok(None);
        };
        let at = parse_datetime(&text).ok_or_else(|| {
            bad(
                name,
                format!("is {:?}, not an ISO-8601 timestamp", cut(&text)),
            )
        })?;
        if at < DateTime::UNIX_EPOCH || at > now + MAX_SCHEDULE_AHEAD {
            return Err(bad(
                name,
                format!("is {text}, outside 1970 to ten years from now"),
            ));
        }
        Ok(Some(at))
    }

    /// Whether a Warren publisher holding the deployment's key named this
    /// owner for this message. Any other owner header is ignored.
    fn owner_is_signed(
        &self,
        signer: Option<&Signer>,
        id: Uuid,
        task: &str,
        owner: &str,
        body: &[u8],
    ) -> bool {
        let signature = self
            .0
            .inner()
            .get(crate::signing::SIGNATURE_HEADER)
            .and_then(wire::text);
        let trusted = match (signer, signature) {
            (Some(signer), Some(sig)) => signer.verify(id, task, owner, body, &sig),
            _ => false,
        };
        if !trusted {
            tracing::warn!(task_id = %id, "owner header without a valid signature; ignored");
        }
        trusted
    }

    /// Celery's `timelimit` is `[hard, soft]`, each void or seconds.
    fn time_limits(&self) -> Result<(Option<f64>, Option<f64>), DecodeError> {
        let Some(v) = self.get("timelimit") else {
            return Ok((None, None));
        };
        let AMQPValue::FieldArray(items) = v else {
            return Err(bad("timelimit", "must be an array [hard, soft]"));
        };
        let limit = |i: usize| -> Result<Option<f64>, DecodeError> {
            match items.as_slice().get(i) {
                None | Some(AMQPValue::Void) => Ok(None),
                Some(v) => match as_f64(v) {
                    Some(s) if s > 0.0 && s <= MAX_TIME_LIMIT_SECONDS => Ok(Some(s)),
                    _ => Err(bad(
                        "timelimit",
                        format!(
                            "limits must be numbers of seconds above 0 and at most {MAX_TIME_LIMIT_SECONDS}"
                        ),
                    )),
                },
            }
        };
        Ok((limit(0)?, limit(1)?))
    }
}

fn bad(header: &'static str, problem: impl Into<String>) -> DecodeError {
    DecodeError::BadHeader {
        header,
        problem: problem.into(),
    }
}

fn as_i64(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

fn as_f64(v: &AMQPValue) -> Option<f64> {
    match v {
        AMQPValue::Float(f) => Some(f64::from(*f)),
        AMQPValue::Double(f) => Some(*f),
        other => as_i64(other).map(|n| n as f64),
    }
}

/// Python's `isoformat()`: with an offset normally, naive (read as UTC)
/// when the Celery app runs with `enable_utc = False` and no timezone.
fn parse_datetime(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|dt| dt.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|naive| naive.and_utc())
        })
}

fn iso8601(dt: DateTime<Utc>) -> String {
    dt.to_rfc3339_opts(SecondsFormat::Micros, false)
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

fn opt_long(s: Option<&str>) -> AMQPValue {
    s.map_or(AMQPValue::Void, long)
}

fn opt_double(f: Option<f64>) -> AMQPValue {
    f.map_or(AMQPValue::Void, AMQPValue::Double)
}

/// Celery's embed (the body's third element) with no canvas: every field
/// `null`, in the order a `serde_json` map writes them (sorted), so the
/// bytes are what `json!` built before without building it per publish.
#[derive(serde::Serialize)]
struct Embed {
    callbacks: (),
    chain: (),
    chord: (),
    errbacks: (),
}

const NO_CANVAS: Embed = Embed {
    callbacks: (),
    chain: (),
    chord: (),
    errbacks: (),
};

fn repr(v: &impl serde::Serialize) -> String {
    // Values and string-keyed maps of them cannot fail to serialise.
    let text = serde_json::to_string(v).unwrap_or_default();
    match text.char_indices().nth(REPR_MAX_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn sample() -> TaskMessage {
        let id = Uuid::parse_str("0193a0e0-0000-7000-8000-00000000002a").unwrap();
        let mut kwargs = Map::new();
        kwargs.insert("x".into(), json!(6));
        kwargs.insert("y".into(), json!(7));
        let mut m = TaskMessage::new(id, "multiply", kwargs);
        m.retries = 2;
        m.eta = Some(Utc.with_ymd_and_hms(2026, 11, 23, 11, 47, 57).unwrap());
        m.expires = Some(Utc.with_ymd_and_hms(2026, 11, 23, 12, 47, 27).unwrap());
        m.time_limit = Some(60.0);
        m.soft_time_limit = Some(50.0);
        m.origin = Some("warren-api@host:1".into());
        m.owner = Some("team-a".into());
        m.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        m
    }

    #[test]
    fn encoding_matches_snapshot() {
        let e = sample().encode();
        insta::assert_json_snapshot!(describe(&e.properties, &e.body));
    }

    fn signer() -> Signer {
        Signer::new(&secrecy::SecretString::from("k".repeat(32))).unwrap()
    }

    fn door(signer: &Signer) -> Door<'_> {
        Door {
            signer: Some(signer),
            ..Door::untrusting()
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let m = sample();
        let signer = signer();
        let e = m.encode_signed(&signer);
        assert_eq!(
            TaskMessage::decode_at(&e.properties, &e.body, door(&signer)).unwrap(),
            m
        );

        let minimal = TaskMessage::new(Uuid::now_v7(), "noop", Map::new());
        let e = minimal.encode();
        assert_eq!(
            TaskMessage::decode(&e.properties, &e.body).unwrap(),
            minimal
        );
    }

    #[test]
    fn only_a_celery_shaped_reply_queue_is_kept() {
        let mut m = sample();
        m.reply_to = Some(Uuid::now_v7().to_string());
        let e = m.encode();
        let decoded = TaskMessage::decode(&e.properties, &e.body).unwrap();
        assert_eq!(decoded.reply_to, m.reply_to);
        for hostile in ["warren.default", "amq.rabbitmq.reply-to", ""] {
            m.reply_to = Some(hostile.into());
            let e = m.encode();
            let decoded = TaskMessage::decode(&e.properties, &e.body).unwrap();
            assert_eq!(decoded.reply_to, None, "{hostile:?} was kept");
        }
    }

    #[test]
    fn repr_is_truncated_like_celery() {
        let long_list = Value::Array(vec![json!("x"); 1000]);
        let r = repr(&long_list);
        assert_eq!(r.chars().count(), REPR_MAX_CHARS + 3);
        assert!(r.ends_with("..."));
    }

    #[test]
    fn signing_adds_the_signature_header_and_changes_nothing_else() {
        let m = sample();
        let signer = signer();
        let (plain, signed) = (m.encode(), m.encode_signed(&signer));
        assert_eq!(signed.body, plain.body);
        let mut headers = signed.properties.headers().clone().unwrap().inner().clone();
        let sig = headers
            .remove(&ShortString::from(crate::signing::SIGNATURE_HEADER))
            .expect("a signature header");
        assert_eq!(
            &headers,
            plain.properties.headers().as_ref().unwrap().inner()
        );
        let AMQPValue::LongString(sig) = sig else {
            panic!("the signature is a long string: {sig:?}")
        };
        let owner = m.owner.as_deref().unwrap();
        let sig = String::from_utf8_lossy(sig.as_bytes());
        assert!(signer.verify(m.id, &m.task, owner, &plain.body, &sig));
    }

    #[test]
    fn an_owner_is_believed_only_with_a_valid_signature() {
        let m = sample();
        let signer = signer();
        // Unsigned: any publisher could have written the header.
        let e = m.encode();
        let decoded = TaskMessage::decode_at(&e.properties, &e.body, door(&signer)).unwrap();
        assert_eq!(decoded.owner, None);
        // Signed, then the body changed (other arguments under that owner).
        let e = m.encode_signed(&signer);
        let decoded =
            TaskMessage::decode_at(&e.properties, b"[[], {\"x\": 1}, {}]", door(&signer)).unwrap();
        assert_eq!(decoded.owner, None);
        // Signed, then the owner header changed.
        let mut headers = e.properties.headers().clone().unwrap();
        headers.insert(OWNER_HEADER.into(), long("someone-else"));
        let props = e.properties.clone().with_headers(headers);
        let decoded = TaskMessage::decode_at(&props, &e.body, door(&signer)).unwrap();
        assert_eq!(decoded.owner, None);
        // No key to verify with: nobody's owner is believed.
        let decoded = TaskMessage::decode_at(&e.properties, &e.body, Door::untrusting()).unwrap();
        assert_eq!(decoded.owner, None);
    }

    fn with_body(body: &str) -> Result<TaskMessage, DecodeError> {
        let e = sample().encode();
        TaskMessage::decode(&e.properties, body.as_bytes())
    }

    #[test]
    fn malformed_bodies_are_explained() {
        for (body, expect) in [
            ("not json", "not valid JSON"),
            ("{}", "JSON array"),
            ("[[], {}]", "2 element"),
            ("[{}, {}, {}]", "args"),
            ("[[], [], {}]", "kwargs"),
            ("[[], {}, 5]", "embed"),
        ] {
            let err = with_body(body).unwrap_err().to_string();
            assert!(err.contains(expect), "{body}: {err}");
        }
    }

    #[test]
    fn bad_headers_are_named() {
        let e = sample().encode();
        let mut headers = e.properties.headers().clone().unwrap();
        headers.insert("id".into(), long("not-a-uuid"));
        let props = e.properties.clone().with_headers(headers);
        let err = TaskMessage::decode(&props, &e.body).unwrap_err();
        assert!(
            matches!(err, DecodeError::BadHeader { header: "id", .. }),
            "{err}"
        );

        let props = e.properties.clone().with_headers(FieldTable::default());
        let err = TaskMessage::decode(&props, &e.body).unwrap_err();
        assert_eq!(err, DecodeError::MissingHeader("task"));

        let props = e.properties.clone().with_content_type("text/plain".into());
        let err = TaskMessage::decode(&props, &e.body).unwrap_err();
        assert!(matches!(err, DecodeError::ContentType(_)), "{err}");
    }

    /// One header set to a hostile value: the error names that header.
    fn with_header(name: &str, value: AMQPValue) -> Result<TaskMessage, DecodeError> {
        let e = sample().encode();
        let mut headers = e.properties.headers().clone().unwrap();
        headers.insert(name.into(), value);
        let props = e.properties.clone().with_headers(headers);
        TaskMessage::decode(&props, &e.body)
    }

    fn limits(hard: AMQPValue, soft: AMQPValue) -> AMQPValue {
        AMQPValue::FieldArray(FieldArray::from(vec![hard, soft]))
    }

    #[test]
    fn every_header_is_bounded_and_the_error_names_it() {
        let huge = "x".repeat(1024 * 1024);
        let cases: Vec<(&str, AMQPValue, &str)> = vec![
            (
                "timelimit",
                limits(AMQPValue::Double(1e20), AMQPValue::Void),
                "timelimit",
            ),
            (
                "timelimit",
                limits(AMQPValue::Double(-1.0), AMQPValue::Void),
                "timelimit",
            ),
            (
                "timelimit",
                limits(AMQPValue::Double(f64::NAN), AMQPValue::Void),
                "timelimit",
            ),
            (
                "timelimit",
                limits(AMQPValue::Double(f64::INFINITY), AMQPValue::Void),
                "timelimit",
            ),
            (
                "timelimit",
                limits(long("NaN"), AMQPValue::Void),
                "timelimit",
            ),
            (
                "timelimit",
                limits(AMQPValue::Void, AMQPValue::LongLongInt(i64::MAX)),
                "timelimit",
            ),
            ("timelimit", long("[60, 50]"), "timelimit"),
            ("retries", AMQPValue::LongLongInt(i64::MAX), "retries"),
            ("retries", AMQPValue::LongLongInt(i64::MIN), "retries"),
            (
                "retries",
                AMQPValue::LongLongInt(i64::from(i32::MAX)),
                "retries",
            ),
            ("retries", long("3"), "retries"),
            ("eta", long("9999-12-31T23:59:59+00:00"), "eta"),
            ("eta", long("1969-12-31T23:59:59+00:00"), "eta"),
            ("expires", long("not a date"), "expires"),
            ("eta", AMQPValue::LongLongInt(5), "eta"),
            ("task", long("mul\0tiply"), "task"),
            ("task", long(&"t".repeat(201)), "task"),
            ("root_id", long("a\0b"), "root_id"),
            ("origin", long(&huge), "origin"),
            ("parent_id", AMQPValue::Boolean(true), "parent_id"),
            (
                "traceparent",
                AMQPValue::FieldTable(FieldTable::default()),
                "traceparent",
            ),
            ("id", long("\0"), "id"),
        ];
        for (header, value, field) in cases {
            let shown = format!("{value:?}").chars().take(80).collect::<String>();
            let err = with_header(header, value).expect_err(&shown);
            assert_eq!(err.field(), field, "{header} = {shown}: {err}");
            assert!(err.to_string().len() < 300, "the reason is short: {err}");
        }
    }

    #[test]
    fn a_nul_anywhere_in_the_arguments_is_refused_with_its_path() {
        for (body, field) in [
            (r#"[[], {"x": "a\u0000b"}, {}]"#, "kwargs.x"),
            (r#"[[], {"x": [1, {"y": "\u0000"}]}, {}]"#, "kwargs.x[1].y"),
            (r#"[[], {"a\u0000": 1}, {}]"#, "kwargs.a\\0"),
            (r#"[["ok", "\u0000"], {}, {}]"#, "args[1]"),
        ] {
            let err = with_body(body).unwrap_err();
            assert_eq!(err.field(), field, "{body}: {err}");
        }
    }

    #[test]
    fn a_body_over_the_limit_is_refused_before_parsing() {
        let e = sample().encode();
        let door = Door {
            max_body_bytes: 10,
            ..Door::untrusting()
        };
        let err = TaskMessage::decode_at(&e.properties, &e.body, door).unwrap_err();
        assert!(
            matches!(err, DecodeError::BodyTooLarge { max: 10, .. }),
            "{err}"
        );
    }

    #[test]
    fn limits_at_the_bounds_are_accepted() {
        let m = with_header(
            "timelimit",
            limits(
                AMQPValue::Double(MAX_TIME_LIMIT_SECONDS),
                AMQPValue::LongInt(1),
            ),
        )
        .unwrap();
        assert_eq!(
            (m.time_limit, m.soft_time_limit),
            (Some(MAX_TIME_LIMIT_SECONDS), Some(1.0))
        );
        let m = with_header("retries", AMQPValue::LongLongInt(i64::from(MAX_RETRIES))).unwrap();
        assert_eq!(m.retries, MAX_RETRIES);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn amqp_value() -> impl Strategy<Value = AMQPValue> {
            let leaf = prop_oneof![
                Just(AMQPValue::Void),
                any::<bool>().prop_map(AMQPValue::Boolean),
                any::<i64>().prop_map(AMQPValue::LongLongInt),
                any::<i32>().prop_map(AMQPValue::LongInt),
                any::<f64>().prop_map(AMQPValue::Double),
                any::<f32>().prop_map(AMQPValue::Float),
                ".{0,40}".prop_map(|s| long(&s)),
                proptest::collection::vec(any::<u8>(), 0..40)
                    .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
                Just(long("9999-12-31T23:59:59+00:00")),
                Just(long("2026-11-23T11:47:57.210484")),
                Just(long("0193a0e0-0000-7000-8000-00000000002a")),
            ];
            leaf.prop_recursive(2, 8, 4, |inner| {
                proptest::collection::vec(inner, 0..4)
                    .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v)))
            })
        }

        const NAMES: [&str; 14] = [
            "task",
            "id",
            "retries",
            "eta",
            "expires",
            "timelimit",
            "root_id",
            "parent_id",
            "group",
            "origin",
            OWNER_HEADER,
            TRACEPARENT_HEADER,
            "lang",
            crate::signing::SIGNATURE_HEADER,
        ];

        fn headers() -> impl Strategy<Value = FieldTable> {
            proptest::collection::vec((0..NAMES.len(), amqp_value()), 0..14).prop_map(|pairs| {
                let mut t = FieldTable::default();
                // Usually a decodable core, so the checks past it run too.
                t.insert("task".into(), long("multiply"));
                t.insert("id".into(), long("0193a0e0-0000-7000-8000-00000000002a"));
                for (i, v) in pairs {
                    t.insert(NAMES[i].into(), v);
                }
                t
            })
        }

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                "\\PC{0,12}".prop_map(Value::String),
                Just(Value::String("a\u{0}b".into())),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    proptest::collection::btree_map("\\PC{0,6}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn body() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                (json_value(), json_value(), json_value()).prop_map(|(a, k, e)| Value::Array(
                    vec![a, k, e]
                )
                .to_string()
                .into_bytes()),
                (proptest::collection::vec(json_value(), 0..3), json_value()).prop_map(|(a, k)| {
                    let mut kwargs = Map::new();
                    kwargs.insert("x".into(), k);
                    json!([a, kwargs, {}]).to_string().into_bytes()
                }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// Whatever a publisher sends, decoding answers: a message whose
            /// every field is within its bounds, or a typed error naming a field.
            #[test]
            fn decoding_never_panics_and_what_passes_is_in_bounds(h in headers(), body in body()) {
                let props = BasicProperties::default()
                    .with_content_type(CONTENT_TYPE.into())
                    .with_headers(h);
                let signer = super::signer();
                match TaskMessage::decode_at(&props, &body, super::door(&signer)) {
                    Ok(m) => {
                        prop_assert!(m.retries <= MAX_RETRIES);
                        for limit in [m.time_limit, m.soft_time_limit].into_iter().flatten() {
                            prop_assert!(limit > 0.0 && limit <= MAX_TIME_LIMIT_SECONDS);
                            prop_assert!(std::time::Duration::try_from_secs_f64(limit).is_ok());
                        }
                        prop_assert!(find_nul(&Value::Object(m.kwargs.clone())).is_none());
                        prop_assert!(find_nul(&Value::Array(m.args.clone())).is_none());
                        for text in [&m.root_id, &m.parent_id, &m.group, &m.origin, &m.traceparent].into_iter().flatten() {
                            prop_assert!(text.len() <= MAX_HEADER_TEXT && !text.contains('\0'));
                        }
                        // Nothing here signed it: no owner is believed.
                        prop_assert_eq!(m.owner, None);
                    }
                    Err(e) => prop_assert!(!e.field().is_empty()),
                }
            }
        }
    }

    #[test]
    fn peek_finds_the_id_even_when_the_body_is_garbage() {
        let e = sample().encode();
        assert!(TaskMessage::decode(&e.properties, b"garbage").is_err());
        assert_eq!(peek_task_id(&e.properties), Some(sample().id));
    }

    #[test]
    fn naive_timestamps_read_as_utc() {
        let dt = parse_datetime("2026-11-23T11:47:57.210484").unwrap();
        assert_eq!(iso8601(dt), "2026-11-23T11:47:57.210484+00:00");
    }

    /// Replays messages exactly as Celery 5.7 published them
    /// (`tests/fixtures/celery-v2/README.md`), typed as py-amqp encodes them.
    mod celery_fixtures {
        use super::*;

        const FIXTURES: &str = include_str!("../tests/fixtures/celery-v2/send_task-5.7.0.json");

        fn fixture(case: &str) -> (BasicProperties, Vec<u8>) {
            let all: Value = serde_json::from_str(FIXTURES).unwrap();
            let c = &all[case];
            let body = c["body"].as_str().unwrap().as_bytes().to_vec();
            (wire::properties_from_json(c), body)
        }

        fn decode(case: &str) -> TaskMessage {
            let (props, body) = fixture(case);
            TaskMessage::decode(&props, &body).unwrap_or_else(|e| panic!("{case}: {e}"))
        }

        #[test]
        fn positional_args() {
            let m = decode("send_task_args");
            assert_eq!(m.task, "tasks.print_something");
            assert_eq!(m.args, vec![json!("hello"), json!("world")]);
            assert!(m.kwargs.is_empty());
            assert_eq!(m.id.to_string(), "a4d5d370-2ba7-49fb-ad43-b5bbeef9ebed");
            assert_eq!(
                m.root_id.as_deref(),
                Some("a4d5d370-2ba7-49fb-ad43-b5bbeef9ebed")
            );
            assert_eq!(
                (m.parent_id, m.group, m.eta, m.expires),
                (None, None, None, None)
            );
            assert_eq!(m.origin.as_deref(), Some("gen29169@vm"));
        }

        #[test]
        fn keyword_args() {
            let m = decode("send_task_kwargs");
            assert_eq!(m.task, "multiply");
            assert_eq!(Value::Object(m.kwargs), json!({"x": 6, "y": 7}));
            assert_eq!(
                (m.retries, m.time_limit, m.soft_time_limit),
                (0, None, None)
            );
        }

        #[test]
        fn countdown_expires_and_time_limits() {
            let m = decode("countdown_expires_timelimits");
            assert_eq!(m.task, "sleep");
            assert_eq!(iso8601(m.eta.unwrap()), "2026-11-23T11:47:57.210484+00:00");
            assert_eq!(
                iso8601(m.expires.unwrap()),
                "2026-11-23T12:47:27.210484+00:00"
            );
            // Celery sends [hard, soft].
            assert_eq!((m.time_limit, m.soft_time_limit), (Some(60.0), Some(50.0)));
        }

        #[test]
        fn custom_id() {
            let m = decode("priority_custom_id");
            assert_eq!(m.task, "noop");
            assert_eq!(m.id.to_string(), "0191a0e0-0000-7000-8000-000000000001");
        }

        #[test]
        fn warren_reads_its_own_encoding_of_a_celery_message_identically() {
            let m = decode("countdown_expires_timelimits");
            let e = m.encode();
            assert_eq!(TaskMessage::decode(&e.properties, &e.body).unwrap(), m);
        }
    }
}
