//! Reading tasks: listings, status (optionally long-polling), result,
//! per-item errors, artifacts.

use super::submit::instant;
use super::*;

// ----------------------------------------------------------------- reads

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Comma-separated states, e.g. `FAILURE,CANCELLED`.
    #[param(
        pattern = r"^(PENDING|QUEUED|STARTED|RETRY|SUCCESS|FAILURE|CANCELLED|EXPIRED)(,(PENDING|QUEUED|STARTED|RETRY|SUCCESS|FAILURE|CANCELLED|EXPIRED))*$"
    )]
    state: Option<String>,
    /// Only tasks created after this instant (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    created_after: Option<String>,
    /// Only tasks created before this instant (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    created_before: Option<String>,
    /// Page size, 50 by default.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// A task id, or text to find (case-insensitively) in the input.
    #[param(max_length = 200)]
    q: Option<String>,
}

impl ListParams {
    pub(crate) fn new(
        state: Option<String>,
        created_after: Option<String>,
        created_before: Option<String>,
        cursor: Option<String>,
        q: Option<String>,
    ) -> Self {
        Self {
            state,
            created_after,
            created_before,
            limit: None,
            cursor,
            q,
        }
    }

    /// The store's filter, every parameter checked.
    pub(crate) fn filter(&self) -> Result<ListFilter, ApiError> {
        let limit = page_size(self.limit)?;
        let states = match &self.state {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|s| {
                    TaskState::parse(s.trim()).ok_or_else(|| {
                        ApiError::invalid_parameter(
                            "state",
                            format!("unknown state `{s}`; states are {:?}", TaskState::ALL),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let after = match &self.cursor {
            None => None,
            Some(c) => Some(parse_cursor(c)?),
        };
        if let Some(q) = &self.q {
            if q.chars().count() > 200 {
                return Err(ApiError::invalid_parameter("q", "at most 200 characters"));
            }
            super::nul::text_parameter("q", q)?;
        }
        Ok(ListFilter {
            states,
            created_after: self
                .created_after
                .as_deref()
                .map(|t| instant("created_after", t))
                .transpose()?,
            created_before: self
                .created_before
                .as_deref()
                .map(|t| instant("created_before", t))
                .transpose()?,
            after,
            search: self.q.clone(),
            limit,
        })
    }
}

fn parse_cursor(c: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let bad = || ApiError::invalid_parameter("cursor", "not a cursor this API returned");
    let text = decode_cursor(c).ok_or_else(bad)?;
    let (micros, id) = text.split_once('.').ok_or_else(bad)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| bad())?))
}

/// A page of a listing: at most `limit` rows, and the cursor of the next
/// page when the store returned the extra row that says there is one.
pub(crate) fn paginate(
    mut rows: Vec<TaskSummary>,
    limit: u64,
) -> (Vec<TaskSummary>, Option<String>) {
    let more = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more.then(|| rows.last()).flatten().map(|last| {
        encode_cursor(&format!(
            "{}.{}",
            last.created_at.timestamp_micros(),
            last.id
        ))
    });
    (rows, next_cursor)
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Page<T> {
    items: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

fn page_size(limit: Option<u64>) -> Result<u64, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid_parameter(
            "limit",
            format!("limit must be 1 to {MAX_PAGE}"),
        )),
    }
}

pub(super) fn encode_cursor(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(text)
}

pub(super) fn decode_cursor(cursor: &str) -> Option<String> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

/// `GET /tasks/{type}`: the caller's tasks of that type (an admin key's:
/// every owner's), newest first.
#[utoipa::path(
    get,
    path = "/tasks/{task_type}",
    tag = "tasks",
    security(("api_key" = [])),
    params(TypePath, ListParams),
    responses(
        (status = 200, description = "The caller's tasks of this type, newest first", body = Page<TaskView>),
        (status = 400, description = "A malformed parameter", body = Problem, content_type = PROBLEM_JSON),
        CommonErrors,
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(TypePath { task_type }): Path<TypePath>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page<TaskView>>, ApiError> {
    let limits = Some(&entry(&state, &task_type)?.limits);
    let filter = query(params)?.filter()?;
    let rows = state
        .store
        .list(caller.owners(), &task_type, &filter)
        .await?;
    let (rows, next_cursor) = paginate(rows, filter.limit);
    Ok(Json(Page {
        items: rows
            .into_iter()
            .map(|t| TaskView::new(t, None, limits))
            .collect(),
        next_cursor,
    }))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct StatusParams {
    /// Wait up to this many seconds for the task to finish (at most
    /// `api.max_wait_seconds`, 60 by default; the document served says
    /// this deployment's).
    #[param(minimum = 0, maximum = 60)]
    wait: Option<f64>,
}

/// `GET /tasks/{type}/{id}`, optionally `?wait=<seconds>`: answers as soon
/// as the task has finished, or when the wait is over, whichever is first.
#[utoipa::path(
    get,
    path = "/tasks/{task_type}/{id}",
    tag = "tasks",
    security(("api_key" = [])),
    params(TaskPath, StatusParams),
    responses(
        (status = 200, description = "The task's status", body = TaskView),
        (status = 400, description = "A malformed parameter", body = Problem, content_type = PROBLEM_JSON),
        CommonErrors,
    ),
)]
pub(crate) async fn status(
    State(state): State<AppState>,
    caller: Caller,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
    params: Result<Query<StatusParams>, QueryRejection>,
) -> Result<Json<TaskView>, ApiError> {
    let p = query(params)?;
    let max = state.settings.api.max_wait_seconds as f64;
    let wait = match p.wait {
        None => None,
        Some(w) if (0.0..=max).contains(&w) => Some(Duration::from_secs_f64(w)),
        Some(_) => {
            return Err(ApiError::invalid_parameter(
                "wait",
                format!("wait must be 0 to {max} seconds"),
            ));
        }
    };
    // The database calls are boxed: a future is as large as its largest
    // await, and a request parked in the wait below would otherwise hold
    // the space of a whole query's state machine (10,000 waiting requests).
    let t = Box::pin(load(&state, &caller, &task_type, &id)).await?;
    let Some(wait) = wait.filter(|_| !t.state.is_terminal()) else {
        return Ok(Json(Box::pin(view(&state, t)).await?));
    };
    let answer = Box::pin(wait_for_finish(
        &state, &caller, &task_type, &id, t.id, wait,
    ))
    .await?;
    Ok(Json(answer))
}

/// The long-poll itself: register, look again (a finish in between is not
/// missed), wait; then answer from the row the listener read for every
/// request woken on this task, or read it here if there is none.
async fn wait_for_finish(
    state: &AppState,
    caller: &Caller,
    task_type: &str,
    id: &str,
    uuid: Uuid,
    wait: Duration,
) -> Result<TaskView, ApiError> {
    let registration = state.waiters.register(uuid);
    let notified = registration.notified();
    let t = Box::pin(load(state, caller, task_type, id)).await?;
    if t.state.is_terminal() {
        return Box::pin(view(state, t)).await;
    }
    registration.park();
    let woken = tokio::time::timeout(wait, notified).await.is_ok();
    let answers = &state.metrics.long_poll_answers;
    // The shared row was read without a scope: apply the caller's here,
    // as `load` does in SQL.
    let shared = woken.then(|| registration.finished()).flatten();
    if let Some(f) = shared.filter(|f| {
        f.summary.task_type == task_type && caller.owners().admit(f.summary.owner.as_deref())
    }) {
        answers.with_label_values(&["shared"]).inc();
        return Ok(view_with(state, f.summary.clone(), f.artifacts.clone()));
    }
    drop(registration);
    answers.with_label_values(&["own"]).inc();
    let t = Box::pin(load(state, caller, task_type, id)).await?;
    Box::pin(view(state, t)).await
}

/// `GET /tasks/{type}/{id}/result`: the task's output as the JSON body
/// (200) once it succeeded; 409 `result_not_ready` (with `Retry-After`)
/// while it has not finished; 409 `no_result` if it ended otherwise.
#[utoipa::path(
    get,
    path = "/tasks/{task_type}/{id}/result",
    tag = "tasks",
    security(("api_key" = [])),
    params(TaskPath),
    responses(
        (status = 200, description = "The task's output, as it returned it", body = Value),
        CommonErrors,
        (status = 409, description = "Not finished yet (result_not_ready, with Retry-After), or ended without a result (no_result)", body = Problem, content_type = PROBLEM_JSON),
    ),
)]
pub(crate) async fn result(
    State(state): State<AppState>,
    caller: Caller,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
) -> Result<Json<Value>, ApiError> {
    let t = load(&state, &caller, &task_type, &id).await?;
    match t.state {
        TaskState::Success => Ok(Json(
            state.store.result_of(t.id).await?.unwrap_or(Value::Null),
        )),
        s if s.is_terminal() => Err(ApiError::no_result(s.as_str(), t.error)),
        s => Err(ApiError::result_not_ready(s.as_str())),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ErrorsParams {
    /// Page size, 50 by default.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ItemErrorView {
    /// Position of the item in the task's input list.
    index: i32,
    code: String,
    field: String,
    message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorsPage {
    /// Failed items in all.
    total: i64,
    items: Vec<ItemErrorView>,
    next_cursor: Option<String>,
}

/// `GET /tasks/{type}/{id}/errors`: the items of a batch task that failed,
/// in input order, with the same codes and messages a synchronous
/// validation of each gives.
#[utoipa::path(
    get,
    path = "/tasks/{task_type}/{id}/errors",
    tag = "tasks",
    security(("api_key" = [])),
    params(TaskPath, ErrorsParams),
    responses(
        (status = 200, description = "Failed items, in input order", body = ErrorsPage),
        (status = 400, description = "A malformed parameter", body = Problem, content_type = PROBLEM_JSON),
        CommonErrors,
    ),
)]
pub(crate) async fn errors(
    State(state): State<AppState>,
    caller: Caller,
    Path(TaskPath { task_type, id }): Path<TaskPath>,
    params: Result<Query<ErrorsParams>, QueryRejection>,
) -> Result<Json<ErrorsPage>, ApiError> {
    let p = query(params)?;
    let limit = page_size(p.limit)?;
    let after = match &p.cursor {
        None => None,
        Some(c) => Some(
            decode_cursor(c)
                .and_then(|t| t.parse::<i32>().ok())
                .ok_or_else(|| {
                    ApiError::invalid_parameter("cursor", "not a cursor this API returned")
                })?,
        ),
    };
    let t = load(&state, &caller, &task_type, &id).await?;
    let mut rows = state.store.item_errors(t.id, after, limit).await?;
    let more = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last())
        .flatten()
        .map(|(i, _)| encode_cursor(&i.to_string()));
    Ok(Json(ErrorsPage {
        total: state.store.item_error_count(t.id).await?,
        items: rows
            .into_iter()
            .map(|(index, e)| ItemErrorView {
                index,
                code: e.code,
                field: e.field,
                message: e.message,
            })
            .collect(),
        next_cursor,
    }))
}

/// `GET /tasks/{type}/{id}/artifacts/{name}`: a file the task produced,
/// with its content type (a labels PDF is `application/pdf`).
#[utoipa::path(
    get,
    path = "/tasks/{task_type}/{id}/artifacts/{name}",
    tag = "tasks",
    security(("api_key" = [])),
    params(ArtifactPath),
    responses(
        (status = 200, description = "The file, with its own content type (application/pdf for labels)", body = Vec<u8>, content_type = "*/*"),
        CommonErrors,
        (status = 404, description = "No such task, or no such artifact of it", body = Problem, content_type = PROBLEM_JSON),
    ),
)]
pub(crate) async fn artifact(
    State(state): State<AppState>,
    caller: Caller,
    Path(ArtifactPath {
        task_type,
        id,
        name,
    }): Path<ArtifactPath>,
) -> Result<Response, ApiError> {
    serve_artifact(&state, &caller, &task_type, &id, &name, false).await
}

/// A visible task's artifact as a download; with `inline`, a PDF opens in
/// the browser instead (the dashboard's link). Anything else is sandboxed:
/// a task's file never runs as a page of this origin. (Chrome refuses to
/// show a sandboxed PDF, and its viewer runs no script of ours.)
pub(crate) async fn serve_artifact(
    state: &AppState,
    caller: &Caller,
    task_type: &str,
    id: &str,
    name: &str,
    inline: bool,
) -> Result<Response, ApiError> {
    let t = load(state, caller, task_type, id).await?;
    let not_found = || ApiError::artifact_not_found(name);
    if !warren_shared::artifacts::valid_name(name) {
        return Err(not_found());
    }
    let a = state
        .artifacts
        .get(t.id, name)
        .await?
        .ok_or_else(not_found)?;
    let mut response = a.data.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&a.meta.content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    let how = if inline && a.meta.content_type == "application/pdf" {
        "inline"
    } else {
        "attachment"
    };
    if let Ok(v) = HeaderValue::from_str(&format!("{how}; filename=\"{}\"", a.meta.name)) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    if how == "attachment" {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox"),
        );
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    /// The size of what an `async fn` of four arguments returns, read off
    /// its type: nothing is called.
    fn future_size<F, A, B, C, D, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> R,
    {
        std::mem::size_of::<R>()
    }

    fn future_size6<F, A, B, C, D, E, G, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D, E, G) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// A long-poll's future lives as long as the wait: with every query
    /// inline it held their state machines too, many kilobytes a request
    /// at 10,000 waiting requests.
    #[test]
    fn a_waiting_request_holds_a_small_future() {
        let size = future_size(super::status);
        assert!(
            size <= 2048,
            "GET /tasks/{{type}}/{{id}}?wait= holds {size} bytes"
        );
        // What is parked for the wait's whole length.
        let waiting = future_size6(super::wait_for_finish);
        assert!(waiting <= 1024, "the wait itself holds {waiting} bytes");
    }
}
