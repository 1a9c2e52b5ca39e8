//! Submitting tasks: alone (optionally idempotent) or in batches, with
//! optional scheduling.

use super::*;
use crate::state::Publishing;
use warren_shared::{
    envelope::TaskMessage, settings::WebhookSettings, trace::TraceParent, webhooks,
};

// ------------------------------------------------------------- scheduling

/// Optional scheduling for a submission, as query parameters so the body
/// stays exactly the task's input.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct SubmitParams {
    /// Do not start before this many seconds from now.
    #[param(minimum = 0, maximum = 2_592_000)]
    countdown: Option<f64>,
    /// Do not start before this instant (RFC 3339), at most 30 days ahead.
    #[param(value_type = Option<String>, format = DateTime)]
    eta: Option<String>,
    /// Do not start after this instant (RFC 3339); the task ends EXPIRED.
    #[param(value_type = Option<String>, format = DateTime)]
    expires: Option<String>,
    /// Do not start after this many seconds from now.
    #[param(minimum = 0, maximum = 2_592_000)]
    expires_in: Option<f64>,
    /// POST the task's events here, signed with the owner's webhook secret
    /// (`POST /webhooks/secrets` first). https, and public hosts only,
    /// unless configured otherwise.
    #[param(max_length = 2048)]
    callback_url: Option<String>,
    /// Which events, comma-separated: `finished` (any end, the default),
    /// `failed` (FAILURE or EXPIRED), `progress`.
    callback_events: Option<String>,
    /// 0–9, higher first; default: the type's (`[tasks.<type>] priority`).
    /// Orders what waits in PostgreSQL (admission, the outbox, a resume),
    /// not what is already on the broker.
    #[param(minimum = 0, maximum = 9)]
    priority: Option<u8>,
    /// At most one unfinished task of this type per owner and key: a
    /// second submission gets the first task back (`unique-existing: true`).
    #[param(max_length = 200)]
    unique_key: Option<String>,
    /// With `unique_key`: the task waits this long, and a submission with
    /// the same key before it is published replaces its input and restarts
    /// the wait.
    #[param(minimum = 0, maximum = 86_400)]
    debounce_seconds: Option<f64>,
}

struct Schedule {
    eta: Option<DateTime<Utc>>,
    expires: Option<DateTime<Utc>>,
    /// The webhook target and its events.
    callback: Option<(String, String)>,
    priority: Option<u8>,
    /// `unique_key`, and whether it debounces.
    unique: Option<(String, bool)>,
}

/// Longest debounce: a day.
const MAX_DEBOUNCE_SECONDS: f64 = 86_400.0;

/// A unique key and whether it debounces; a debounce's ETA.
type Uniqueness = (Option<(String, bool)>, Option<DateTime<Utc>>);

/// `?unique_key=` and `?debounce_seconds=`, checked; a debounce is a
/// countdown the next submission with the key restarts.
fn uniqueness(params: &SubmitParams, now: DateTime<Utc>) -> Result<Uniqueness, ApiError> {
    let Some(key) = &params.unique_key else {
        if params.debounce_seconds.is_some() {
            return Err(ApiError::invalid_parameter(
                "debounce_seconds",
                "debounce_seconds needs a unique_key",
            ));
        }
        return Ok((None, None));
    };
    if key.is_empty() || key.len() > warren_shared::admission::MAX_KEY_BYTES {
        return Err(ApiError::invalid_parameter(
            "unique_key",
            "unique_key must be 1 to 200 bytes",
        ));
    }
    super::nul::text_parameter("unique_key", key)?;
    let Some(seconds) = params.debounce_seconds else {
        return Ok((Some((key.clone(), false)), None));
    };
    if !(0.0..=MAX_DEBOUNCE_SECONDS).contains(&seconds) {
        return Err(ApiError::invalid_parameter(
            "debounce_seconds",
            "debounce_seconds must be between 0 and 86400",
        ));
    }
    if params.countdown.is_some() || params.eta.is_some() {
        return Err(ApiError::invalid_parameter(
            "debounce_seconds",
            "a debounced task's countdown is debounce_seconds: give no countdown or eta",
        ));
    }
    let eta = now + chrono::TimeDelta::milliseconds((seconds * 1000.0) as i64);
    Ok((Some((key.clone(), true)), Some(eta)))
}

pub(super) fn instant(name: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ApiError::invalid_parameter(name, format!("{name} is not an RFC 3339 timestamp: {e}"))
        })
}

impl SubmitParams {
    fn resolve(
        &self,
        now: DateTime<Utc>,
        webhook_settings: &WebhookSettings,
    ) -> Result<Schedule, ApiError> {
        let seconds = |name: &str, s: f64| -> Result<DateTime<Utc>, ApiError> {
            if !(0.0..=MAX_DELAY.as_seconds_f64()).contains(&s) {
                return Err(ApiError::invalid_parameter(
                    name,
                    format!(
                        "{name} must be between 0 and {} seconds",
                        MAX_DELAY.num_seconds()
                    ),
                ));
            }
            Ok(now + chrono::TimeDelta::milliseconds((s * 1000.0) as i64))
        };
        let ahead = |name: &str, text: &str| -> Result<DateTime<Utc>, ApiError> {
            let at = instant(name, text)?;
            if at - now > MAX_DELAY {
                return Err(ApiError::invalid_parameter(
                    name,
                    format!("{name} is more than {} days ahead", MAX_DELAY.num_days()),
                ));
            }
            Ok(at)
        };
        if let Some(p) = self.priority
            && p > 9
        {
            return Err(ApiError::invalid_parameter(
                "priority",
                "priority must be 0 to 9",
            ));
        }
        let (unique, debounced) = uniqueness(self, now)?;
        let eta = match (&self.countdown, &self.eta) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_parameter(
                    "eta",
                    "give countdown or eta, not both",
                ));
            }
            (Some(s), None) => Some(seconds("countdown", *s)?),
            (None, Some(t)) => Some(ahead("eta", t)?),
            (None, None) => debounced,
        };
        let expires = match (&self.expires_in, &self.expires) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_parameter(
                    "expires",
                    "give expires_in or expires, not both",
                ));
            }
            (Some(s), None) => Some(seconds("expires_in", *s)?),
            (None, Some(t)) => Some(ahead("expires", t)?),
            (None, None) => None,
        };
        if let (Some(eta), Some(expires)) = (eta, expires)
            && expires <= eta
        {
            return Err(ApiError::invalid_parameter(
                "expires",
                "expires must be after the eta",
            ));
        }
        let callback = match (&self.callback_url, &self.callback_events) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ApiError::invalid_parameter(
                    "callback_events",
                    "callback_events needs a callback_url",
                ));
            }
            (Some(url), events) => Some(
                webhooks::callback(url, events.as_deref(), webhook_settings)
                    .map_err(|e| ApiError::invalid_parameter(e.parameter, e.message))?,
            ),
        };
        Ok(Schedule {
            eta,
            expires,
            callback,
            priority: self.priority,
            unique,
        })
    }
}

/// A callback is signed with its owner's secret: without one, a receiver
/// could not tell Warren's deliveries from anyone's.
async fn check_signing_secret(
    state: &AppState,
    caller: &Caller,
    schedule: &Schedule,
) -> Result<(), ApiError> {
    if schedule.callback.is_some() && state.store.webhook_secrets(&caller.owner).await?.is_empty() {
        return Err(ApiError::invalid_parameter(
            "callback_url",
            "this owner has no webhook signing secret yet: create one with POST /webhooks/secrets",
        ));
    }
    Ok(())
}

fn new_task(
    state: &AppState,
    caller: &Caller,
    entry: &Entry,
    task_type: &str,
    input: Value,
    schedule: &Schedule,
    now: DateTime<Utc>,
) -> NewTask {
    let lease = chrono::Duration::from_std(state.settings.relay.lease()).unwrap_or_default();
    let (reply_to, time_limit, soft_time_limit) = entry.runner_fields(state.catalog.topology());
    let admission = entry.limits.keys(Some(&caller.owner), &input);
    NewTask {
        id: Uuid::now_v7(),
        task_type: task_type.to_owned(),
        queue: entry.queue.clone(),
        owner: Some(caller.owner.clone()),
        input,
        eta: schedule.eta,
        expires_at: schedule.expires,
        idempotency_key: None,
        idempotency_fingerprint: None,
        origin: state.identity.to_string(),
        traceparent: None,
        // A delayed task waits in the outbox until its ETA; any other is
        // published right away, and the relay steps in only if that fails.
        publish_at: match schedule.eta {
            Some(eta) if eta > now => eta,
            _ => now + lease,
        },
        reply_to,
        time_limit,
        soft_time_limit,
        callback: schedule.callback.clone(),
        priority: i16::from(schedule.priority.unwrap_or(entry.priority)),
        admission,
        unique: schedule.unique.clone(),
    }
}

/// Publishes tasks recorded already (committed) that are due now
/// ([`Publishing::publish_committed`]); returns the ids marked QUEUED.
/// For what was committed before it was published: a retried task, an
/// idempotent or unique submission.
pub(super) async fn publish_due(state: &AppState, rows: &[task::Model]) -> Vec<Uuid> {
    let now = Utc::now();
    let due: Vec<TaskMessage> = rows
        .iter()
        .filter(|r| r.eta.is_none_or(|eta| eta <= now))
        .map(message_from_row)
        .collect();
    Publishing::of(state)
        .publish_committed(&state.store, &due)
        .await
}

/// The caller's trace continued one hop (the API's own span), or a new
/// trace: carried with the task so the worker's logs join it.
fn trace_context(headers: &HeaderMap) -> TraceParent {
    let mut random = [0u8; 24];
    // Without OS randomness, fall back to the time: ids must be unique,
    // not secret.
    if getrandom::fill(&mut random).is_err() {
        let nanos = Utc::now()
            .timestamp_nanos_opt()
            .unwrap_or_default()
            .to_le_bytes();
        random[..8].copy_from_slice(&nanos);
        random[16..].copy_from_slice(&nanos);
    }
    let mut span = [0u8; 8];
    span.copy_from_slice(&random[16..]);
    let tp = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
        .map_or_else(
            || {
                let mut trace_id = [0u8; 16];
                trace_id.copy_from_slice(&random[..16]);
                TraceParent {
                    trace_id,
                    parent_id: span,
                    flags: 1,
                }
            },
            |caller| caller.child(span),
        );
    tracing::Span::current().record("trace_id", tp.trace_id_hex().as_str());
    tp
}

// --------------------------------------------------------------- submit

/// A client's key for retrying a submission safely: 1 to 255 visible ASCII.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::invalid_parameter(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// What makes two submissions "the same" for an idempotency key.
/// What makes two submissions "the same request": the type, the input and
/// the scheduling parameters *as sent*. Not the resolved instants: a retry
/// of `?countdown=10` a second later resolves to another ETA and was
/// always a 409.
fn fingerprint(task_type: &str, input: &Value, params: &SubmitParams) -> String {
    let mut h = Sha256::new();
    for part in [
        task_type.to_owned(),
        input.to_string(),
        format!("{:?}", params.countdown),
        format!("{:?}", params.eta),
        format!("{:?}", params.expires),
        format!("{:?}", params.expires_in),
        format!("{:?}", params.callback_url),
        format!("{:?}", params.callback_events),
    ] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The `tasks` array of a batch body `{"tasks": [input, ...]}`, moved out.
fn batch_tasks(body: Value) -> Result<Vec<Value>, ApiError> {
    let shape = |field: &str, found: &str| {
        ApiError::invalid_input(ValidationErrors::single(
            field,
            "invalid_type",
            format!("the body must be {{\"tasks\": [input, ...]}}, {found}"),
        ))
    };
    let Value::Object(mut fields) = body else {
        return Err(shape("", "not another JSON value"));
    };
    if let Some(other) = fields.keys().find(|k| k.as_str() != "tasks") {
        let other = warren_shared::codes::bounded(other.clone());
        return Err(shape(&other, "with no other field"));
    }
    match fields.remove("tasks") {
        Some(Value::Array(tasks)) => Ok(tasks),
        Some(_) => Err(shape("tasks", "with `tasks` an array")),
        None => Err(shape("tasks", "and `tasks` is missing")),
    }
}

/// `POST /tasks/{type}`: the body is the task's input (a JSON object).
///
/// 202 once the task is recorded in PostgreSQL. It is normally on the
/// broker by then too (`state: QUEUED`); if the broker is unreachable the
/// task stays `PENDING` and the relay publishes it as soon as it can.
#[utoipa::path(
    post,
    path = "/tasks/{task_type}",
    tag = "tasks",
    security(("api_key" = [])),
    params(TypePath, SubmitParams, ("Idempotency-Key" = Option<String>, Header, description = "Makes retrying this request safe: the same key and body return the same task")),
    request_body(content = Object, description = "The task's input", content_type = "application/json"),
    responses(
        (status = 202, description = "Recorded (and normally queued)", body = Submitted,
         headers(("Location" = String, description = "The task's status URL"))),
        (status = 400, description = "A malformed parameter", body = Problem, content_type = PROBLEM_JSON),
        CommonErrors,
        (status = 409, description = "The idempotency key was used for another request", body = Problem, content_type = PROBLEM_JSON),
        (status = 413, description = "The body exceeds api.max_body_bytes", body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = "The body is not declared as JSON", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "The input is not valid for this task type, per field", body = Problem, content_type = PROBLEM_JSON),
    ),
)]
pub(crate) async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    Path(TypePath { task_type }): Path<TypePath>,
    params: Result<Query<SubmitParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let entry = entry(&state, &task_type)?;
    let params = query(params)?;
    let key = idempotency_key(&headers)?;
    let input = json_body(&headers, body, state.settings.api.max_body_bytes)?;
    validate_input(entry, &input, "").map_err(ApiError::invalid_input)?;
    let now = Utc::now();
    let schedule = params.resolve(now, &state.settings.webhooks)?;
    check_signing_secret(&state, &caller, &schedule).await?;

    let mut new = new_task(&state, &caller, entry, &task_type, input, &schedule, now);
    new.traceparent = Some(trace_context(&headers).to_string());
    let unique = new.unique.is_some();
    if unique && key.is_some() {
        return Err(ApiError::invalid_parameter(
            "unique_key",
            "give an Idempotency-Key or a unique_key, not both",
        ));
    }
    let (row, replayed) = match key {
        None if unique => record_unique(&state, &new).await?,
        // Recorded and published in a transaction shared with the
        // requests in flight beside it.
        None => {
            let _waiting = state.metrics.write_seconds.start_timer();
            (state.submissions.inserts.call(new).await?, false)
        }
        // Committed on its own first, so that a crash before the publish
        // leaves the key's task recorded (the relay publishes it) and the
        // client's retry finds it.
        Some(key) => {
            let fp = fingerprint(&task_type, &new.input, &params);
            new.idempotency_key = Some(key.clone());
            new.idempotency_fingerprint = Some(fp.clone());
            match state.store.insert_idempotent(&new).await? {
                Inserted::New(mut row) => {
                    if state.fail_points.hit(FailPoint::AfterCommitBeforePublish) {
                        tracing::error!(task_id = %row.id, "fail point: dying between commit and publish");
                        return Err(ApiError::internal(&std::io::Error::other(
                            "fail point AfterCommitBeforePublish",
                        )));
                    }
                    if !publish_due(&state, std::slice::from_ref(&row))
                        .await
                        .is_empty()
                    {
                        row.state = TaskState::Queued;
                    }
                    (row, false)
                }
                Inserted::Existing(row)
                    if row.idempotency_fingerprint.as_deref() == Some(fp.as_str()) =>
                {
                    (row, true)
                }
                Inserted::Existing(row) => {
                    return Err(ApiError::idempotency_key_reused(&key, row.id));
                }
            }
        }
    };
    let task_state = if replayed {
        // Its first submission published it (or the relay will).
        state
            .store
            .get(row.id)
            .await?
            .map_or(row.state, |r| r.state)
    } else {
        row.state
    };
    if !replayed {
        state
            .metrics
            .submitted
            .with_label_values(&[&task_type])
            .inc();
    }
    if entry.limits.admits() {
        state.relay_wake.notify_one();
    }
    tracing::info!(task_id = %row.id, task = %task_type, state = %task_state, replayed, "task accepted");

    let body = Submitted::new(&row, task_state);
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&task_path(&task_type, row.id)) {
        headers.insert(header::LOCATION, v);
    }
    if replayed && unique {
        headers.insert("unique-existing", HeaderValue::from_static("true"));
    } else if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// A submission with `?unique_key=`: the new task (published if due), or
/// the unfinished one holding the key (a debounced one with this input
/// now). `true`: not new.
async fn record_unique(state: &AppState, new: &NewTask) -> Result<(task::Model, bool), ApiError> {
    Ok(match state.store.insert_unique(new).await? {
        Unique::New(mut row) => {
            if !publish_due(state, std::slice::from_ref(&row))
                .await
                .is_empty()
            {
                row.state = TaskState::Queued;
            }
            (row, false)
        }
        Unique::Existing(row) => (row, true),
        Unique::Debounced(row) => {
            tracing::info!(task_id = %row.id, "debounced: input replaced, countdown restarted");
            (row, true)
        }
    })
}

/// The batch body's schema, for the OpenAPI document; `batch_tasks` reads it.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub(crate) struct BatchBody {
    /// The tasks' inputs, each a JSON object (at most `api.max_batch`).
    #[schema(value_type = Vec<Object>, min_items = 1)]
    tasks: Vec<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchItem {
    id: Uuid,
    status_url: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchSubmitted {
    count: usize,
    /// How many are on the broker already; the rest are in the outbox
    /// (delayed, or the broker was unreachable) and follow by themselves.
    queued: usize,
    tasks: Vec<BatchItem>,
}

/// `POST /tasks/{type}/batch` with `{"tasks": [input, …]}`: many tasks in
/// one request and one transaction. All are valid or none is recorded.
#[utoipa::path(
    post,
    path = "/tasks/{task_type}/batch",
    tag = "tasks",
    security(("api_key" = [])),
    params(TypePath, SubmitParams),
    request_body(content = BatchBody, content_type = "application/json"),
    responses(
        (status = 202, description = "All recorded in one transaction", body = BatchSubmitted),
        (status = 400, description = "A malformed parameter", body = Problem, content_type = PROBLEM_JSON),
        CommonErrors,
        (status = 413, description = "The body exceeds api.max_body_bytes", body = Problem, content_type = PROBLEM_JSON),
        (status = 415, description = "The body is not declared as JSON", body = Problem, content_type = PROBLEM_JSON),
        (status = 422, description = "Some task is invalid (fields named tasks[i].field); none was recorded", body = Problem, content_type = PROBLEM_JSON),
    ),
)]
pub(crate) async fn submit_batch(
    State(state): State<AppState>,
    caller: Caller,
    Path(TypePath { task_type }): Path<TypePath>,
    params: Result<Query<SubmitParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let entry = entry(&state, &task_type)?;
    let params = query(params)?;
    let body = json_body(&headers, body, state.settings.api.max_body_bytes)?;
    // Taken apart, not deserialized: `deserialize(&body)` copied every
    // task's input before its length could be checked.
    let tasks = batch_tasks(body)?;
    let max = state.settings.api.max_batch;
    if tasks.is_empty() || tasks.len() > max {
        return Err(ApiError::invalid_input(ValidationErrors::single(
            "tasks",
            "invalid_length",
            format!("a batch holds 1 to {max} tasks, got {}", tasks.len()),
        )));
    }
    let mut problems: Vec<FieldError> = Vec::new();
    for (i, input) in tasks.iter().enumerate() {
        if let Err(e) = validate_input(entry, input, &format!("tasks[{i}]")) {
            problems.extend(e.errors().iter().cloned());
        }
        if problems.len() >= MAX_REPORTED_ERRORS {
            problems.truncate(MAX_REPORTED_ERRORS);
            break;
        }
    }
    ValidationErrors::check(problems).map_err(ApiError::invalid_input)?;

    let now = Utc::now();
    let schedule = params.resolve(now, &state.settings.webhooks)?;
    if schedule.unique.is_some() {
        return Err(ApiError::invalid_parameter(
            "unique_key",
            "unique_key applies to single submissions (POST /tasks/{type})",
        ));
    }
    check_signing_secret(&state, &caller, &schedule).await?;
    let new: Vec<NewTask> = tasks
        .into_iter()
        .map(|input| new_task(&state, &caller, entry, &task_type, input, &schedule, now))
        .collect();
    let rows = Publishing::of(&state).record(&state.store, &new).await?;
    let queued = rows.iter().filter(|r| r.state == TaskState::Queued).count();
    if entry.limits.admits() {
        state.relay_wake.notify_one();
    }
    state
        .metrics
        .submitted
        .with_label_values(&[&task_type])
        .inc_by(rows.len() as u64);
    tracing::info!(task = %task_type, count = rows.len(), queued, "batch accepted");
    let body = BatchSubmitted {
        count: rows.len(),
        queued,
        tasks: rows
            .iter()
            .map(|r| BatchItem {
                id: r.id,
                status_url: task_path(&task_type, r.id),
            })
            .collect(),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
