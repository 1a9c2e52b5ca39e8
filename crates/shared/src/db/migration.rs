//! Schema migrations (sea-orm-migration), written as SQL: partial indexes
//! and check constraints read best in the language PostgreSQL speaks. A
//! migration is data: a name, the SQL that applies it, the SQL that undoes
//! it. Append new ones; never edit one that has shipped.

use sea_orm_migration::prelude::*;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(Sql {
                name: "m20261123_000001_create_tasks",
                up: CREATE_TASKS,
                down: "DROP TABLE tasks",
            }),
            // The history of failed attempts. A successful attempt needs no
            // row here: the task row itself holds its start, end and worker.
            Box::new(Sql {
                name: "m20261123_000002_create_task_attempts",
                up: CREATE_TASK_ATTEMPTS,
                down: "DROP TABLE task_attempts",
            }),
            Box::new(Sql {
                name: "m20261123_000003_keys_items_artifacts",
                up: KEYS_ITEMS_ARTIFACTS,
                down: KEYS_ITEMS_ARTIFACTS_DOWN,
            }),
            // Live workers, for `GET /workers`: each replica upserts its row
            // every heartbeat and deletes it on a clean exit.
            Box::new(Sql {
                name: "m20261123_000004_workers",
                up: WORKERS,
                down: "DROP TABLE workers",
            }),
            // Room on every page for a row's later versions: a worker's
            // claim and its outcome change no indexed column, so with space
            // on the page they are HOT updates (no new index entries, dead
            // versions pruned in passing). On full pages every update adds
            // an entry to each index. A claim of 1,000 fresh rows: none HOT
            // at the default 100, all at 50 (test
            // `pipeline::a_worker_claims_task_rows_in_place_without_new_index_entries`).
            // API and worker end to end, claims and outcomes: 35 % HOT at
            // 100, 72 % at 70, 60-90 % at 50 (pruning waits for older
            // snapshots); draining 100k tasks went from 20k to 25k/s.
            Box::new(Sql {
                name: "m20261124_000005_tasks_fillfactor",
                up: "ALTER TABLE tasks SET (fillfactor = 50)",
                down: "ALTER TABLE tasks RESET (fillfactor)",
            }),
            // An admin key sees operations (workers, queues, dead letters,
            // every owner); an ordinary key only its owner's tasks.
            Box::new(Sql {
                name: "m20261201_000006_key_scopes",
                up: "ALTER TABLE api_keys ADD COLUMN admin boolean NOT NULL DEFAULT false",
                down: "ALTER TABLE api_keys DROP COLUMN admin",
            }),
            // Attempts only ever grow, so the stale-attempt guard holds
            // across a client's retry or an operator's requeue; the retry
            // budget counts from the attempts a reset found.
            Box::new(Sql {
                name: "m20261201_000007_attempt_base",
                up: "ALTER TABLE tasks ADD COLUMN attempt_base integer NOT NULL DEFAULT 0",
                down: "ALTER TABLE tasks DROP COLUMN attempt_base",
            }),
            Box::new(Sql {
                name: "m20261202_000008_dashboard",
                up: DASHBOARD,
                down: DASHBOARD_DOWN,
            }),
            // A Celery client's rpc:// reply queue outlives the message
            // that named it: retries and countdowns are republished from
            // the row.
            Box::new(Sql {
                name: "m20261202_000009_reply_to",
                up: "ALTER TABLE tasks ADD COLUMN reply_to text",
                down: "ALTER TABLE tasks DROP COLUMN reply_to",
            }),
            Box::new(Sql {
                name: "m20261203_000010_webhooks",
                up: WEBHOOKS,
                down: WEBHOOKS_DOWN,
            }),
            Box::new(Sql {
                name: "m20261203_000011_workflows",
                up: WORKFLOWS,
                down: WORKFLOWS_DOWN,
            }),
            // Issue 19: admission (concurrency keys, rate limits), pauses,
            // unique keys and priorities.
            Box::new(Sql {
                name: "m20261203_000012_admission",
                up: ADMISSION,
                down: ADMISSION_DOWN,
            }),
            Box::new(Sql {
                name: "m20261203_000013_schedules",
                up: SCHEDULES,
                down: "DROP TABLE schedules",
            }),
            Box::new(Sql {
                name: "m20261203_000014_start_buckets",
                up: START_BUCKETS,
                down: "DROP TABLE start_buckets",
            }),
            Box::new(Sql {
                name: "m20261203_000015_listing_by_phase",
                up: LISTING_BY_PHASE,
                down: "CREATE INDEX tasks_listing ON tasks (owner, task_type, created_at DESC, id DESC);
                       DROP INDEX tasks_listing_by_phase;
                       ALTER TABLE tasks DROP COLUMN phase",
            }),
            Box::new(Sql {
                name: "m20261204_000016_notify_finished_ids",
                up: NOTIFY_FINISHED_IDS,
                down: "CREATE OR REPLACE FUNCTION warren_notify_finished() RETURNS trigger
                       LANGUAGE plpgsql AS $$
                       BEGIN PERFORM pg_notify('warren_task_finished', ''); RETURN NULL; END $$",
            }),
            Box::new(Sql {
                name: "m20261206_000017_unique_release_after",
                up: UNIQUE_RELEASE_AFTER,
                down: UNIQUE_RELEASE_AFTER_DOWN,
            }),
            Box::new(Sql {
                name: "m20261206_000018_notify_finished_per_statement",
                up: NOTIFY_FINISHED_PER_STATEMENT,
                down: NOTIFY_FINISHED_PER_STATEMENT_DOWN,
            }),
        ]
    }
}

struct Sql {
    name: &'static str,
    up: &'static str,
    down: &'static str,
}

impl MigrationName for Sql {
    fn name(&self) -> &str {
        self.name
    }
}

// The trait's signature elides the lifetime; matching it exactly is required.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Sql {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(self.up)
            .await
            .map(drop)
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(self.down)
            .await
            .map(drop)
    }
}

const CREATE_TASKS: &str = r#"
CREATE TABLE tasks (
    id               uuid PRIMARY KEY,
    task_type        text NOT NULL,
    queue            text NOT NULL,
    owner            text,
    state            text NOT NULL CHECK (state IN
                       ('PENDING','QUEUED','STARTED','RETRY','SUCCESS','FAILURE','CANCELLED','EXPIRED')),
    input            jsonb NOT NULL,
    result           jsonb,
    error            jsonb,
    progress_done    bigint,
    progress_total   bigint,
    progress_message text,
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    eta              timestamptz,
    expires_at       timestamptz,
    time_limit       double precision,
    soft_time_limit  double precision,
    publish_at       timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    queued_at        timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    worker           text,
    idempotency_key  text,
    origin           text,
    root_id          text,
    parent_id        text,
    group_id         text,
    traceparent      text
);

-- The outbox: tiny, because only tasks waiting to be (re)published are in it.
CREATE INDEX tasks_outbox ON tasks (publish_at) WHERE publish_at IS NOT NULL;

-- "My tasks of this type, newest first", with the id as a stable tie-breaker
-- for cursor pagination.
CREATE INDEX tasks_listing ON tasks (owner, task_type, created_at DESC, id DESC);

CREATE UNIQUE INDEX tasks_idempotency ON tasks (owner, task_type, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
"#;

const CREATE_TASK_ATTEMPTS: &str = r#"
CREATE TABLE task_attempts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    worker      text,
    started_at  timestamptz,
    finished_at timestamptz NOT NULL DEFAULT now(),
    outcome     text NOT NULL CHECK (outcome IN ('RETRY', 'FAILURE')),
    error       jsonb,
    -- For a retried attempt: when the next one was scheduled.
    retry_at    timestamptz
);
-- Attempt numbers restart when an operator requeues a dead task, so they
-- are not a key; the history stays whole, in order.
CREATE INDEX task_attempts_by_task ON task_attempts (task_id, finished_at);
"#;

/// API keys, per-item outcomes of batch tasks, stored artifacts, cancellation
/// and idempotency on tasks, and a notification when a task finishes.
const KEYS_ITEMS_ARTIFACTS: &str = r#"
-- Only a hash of each key is kept; the key itself is shown once, at creation.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    owner       text NOT NULL,
    name        text NOT NULL DEFAULT '',
    key_prefix  text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_by_owner ON api_keys (owner);

ALTER TABLE tasks
    ADD COLUMN cancel_requested_at     timestamptz,
    ADD COLUMN idempotency_fingerprint text;

-- One row per item of a batch task (a beneficiary, a label): its outcome.
-- Keyed by (task, index) so a retried attempt rewrites rather than repeats.
CREATE TABLE task_items (
    task_id       uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    item_index    integer NOT NULL,
    ok            boolean NOT NULL,
    result        jsonb,
    error_code    text,
    error_field   text,
    error_message text,
    PRIMARY KEY (task_id, item_index)
);
-- "the errors of this task, in order" without reading the successes.
CREATE INDEX task_items_errors ON task_items (task_id, item_index) WHERE NOT ok;

-- Files a task produced (a labels PDF). PostgreSQL is enough for now; the
-- code reaches this table through an interface that S3 can implement too.
CREATE TABLE artifacts (
    task_id      uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    name         text NOT NULL,
    content_type text NOT NULL,
    size_bytes   bigint NOT NULL,
    data         bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, name)
);

-- Wake long-polling API requests when a task finishes. The payload is empty
-- on purpose: PostgreSQL folds identical notifications of one transaction
-- into one, so a batch of results costs one notification, and listeners
-- re-check the tasks they wait for.
CREATE FUNCTION warren_notify_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('warren_task_finished', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_finished
    AFTER INSERT OR UPDATE OF state ON tasks
    FOR EACH ROW
    WHEN (NEW.state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED'))
    EXECUTE FUNCTION warren_notify_finished();
"#;

const KEYS_ITEMS_ARTIFACTS_DOWN: &str = r#"
DROP TRIGGER tasks_finished ON tasks;
DROP FUNCTION warren_notify_finished();
DROP TABLE artifacts;
DROP TABLE task_items;
ALTER TABLE tasks DROP COLUMN cancel_requested_at, DROP COLUMN idempotency_fingerprint;
DROP TABLE api_keys;
"#;

const WORKERS: &str = r#"
CREATE TABLE workers (
    id             text PRIMARY KEY,
    host           text NOT NULL,
    pid            integer NOT NULL,
    version        text NOT NULL,
    queues         text[] NOT NULL,
    concurrency    integer NOT NULL,
    in_flight      integer NOT NULL DEFAULT 0,
    processed      bigint NOT NULL DEFAULT 0,
    metrics_addr   text,
    started_at     timestamptz NOT NULL,
    last_heartbeat timestamptz NOT NULL
);
"#;

/// What the dashboard needs: its sign-in sessions, the version that ran
/// each task, and a cheap way to the last hours of tasks.
const DASHBOARD: &str = r#"
-- A signed-in browser. Only hashes are kept: of the session token in the
-- cookie, and of the API key it signed in with (so revoking the key ends
-- the session at the next request).
CREATE TABLE ui_sessions (
    token_hash  bytea PRIMARY KEY,
    key_hash    bytea NOT NULL,
    csrf_token  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX ui_sessions_expiry ON ui_sessions (expires_at);

ALTER TABLE tasks ADD COLUMN worker_version text;

-- "Tasks of the last hour" without reading the table: rows are appended in
-- created_at order, so a BRIN index (a few pages for millions of rows,
-- nothing to update on a claim or an outcome, HOT updates kept) leads the
-- overview's queries to the newest pages only.
CREATE INDEX tasks_created_brin ON tasks USING brin (created_at);
"#;

const DASHBOARD_DOWN: &str = r#"
DROP INDEX tasks_created_brin;
ALTER TABLE tasks DROP COLUMN worker_version;
DROP TABLE ui_sessions;
"#;

/// Completion webhooks: where a task's events go, the owners' signing
/// secrets, and the deliveries, durable rows a sender works through.
const WEBHOOKS: &str = r#"
-- callback_events: a comma-separated list of finished, failed, progress.
ALTER TABLE tasks ADD COLUMN callback_url text, ADD COLUMN callback_events text;

-- Signing secrets per owner. At most two sign at once: the newest, and the
-- one it replaced until retires_at. Kept in clear: an HMAC needs the key.
CREATE TABLE webhook_secrets (
    id         uuid PRIMARY KEY,
    owner      text NOT NULL,
    secret     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    retires_at timestamptz
);
CREATE INDEX webhook_secrets_owner ON webhook_secrets (owner, created_at DESC);

-- One event of one task for its callback_url. `pending` until a 2xx
-- (`delivered`) or until the retry window from window_start is over
-- (`failed`); next_attempt_at is also the sender's lease on a claimed one.
CREATE TABLE webhook_deliveries (
    id              uuid PRIMARY KEY,
    task_id         uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    owner           text,
    event           text NOT NULL,
    url             text NOT NULL,
    payload         jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    window_start    timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_task ON webhook_deliveries (task_id, created_at);
-- A task reporting progress faster than its receiver answers has one
-- progress delivery waiting, carrying the latest figures.
CREATE UNIQUE INDEX webhook_deliveries_progress ON webhook_deliveries (task_id)
    WHERE event = 'progress' AND state = 'pending' AND attempts = 0;

CREATE TABLE webhook_attempts (
    delivery_id uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    started_at  timestamptz NOT NULL,
    duration_ms integer NOT NULL,
    status      integer,
    error       text,
    PRIMARY KEY (delivery_id, attempt)
);

-- The delivery is written by the statement that records the event, in its
-- transaction: an outcome is never committed without its webhook, whoever
-- records it (a worker, a Celery report, a cancel, an expiry).
CREATE FUNCTION warren_webhook_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ev text;
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state
       AND NEW.state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED') THEN
        IF 'failed' = ANY (string_to_array(NEW.callback_events, ',')) AND NEW.state IN ('FAILURE', 'EXPIRED') THEN
            ev := 'failed';
        ELSIF 'finished' = ANY (string_to_array(NEW.callback_events, ',')) THEN
            ev := 'finished';
        END IF;
    ELSIF NEW.progress_done IS DISTINCT FROM OLD.progress_done
          AND NEW.state = 'STARTED' AND 'progress' = ANY (string_to_array(NEW.callback_events, ',')) THEN
        ev := 'progress';
    END IF;
    IF ev IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (id, task_id, owner, event, url, payload, next_attempt_at)
    VALUES (gen_random_uuid(), NEW.id, NEW.owner, ev, NEW.callback_url,
            jsonb_build_object(
                'type', 'task.' || ev,
                'timestamp', now(),
                'data', jsonb_build_object(
                    'task_id', NEW.id, 'task_type', NEW.task_type, 'state', NEW.state,
                    'attempts', NEW.attempts, 'result', NEW.result, 'error', NEW.error,
                    'progress', CASE WHEN NEW.progress_done IS NULL THEN NULL ELSE
                        jsonb_build_object('done', NEW.progress_done, 'total', NEW.progress_total,
                                           'message', NEW.progress_message) END,
                    'created_at', NEW.created_at, 'started_at', NEW.started_at,
                    'finished_at', NEW.finished_at)),
            now())
    ON CONFLICT (task_id) WHERE event = 'progress' AND state = 'pending' AND attempts = 0
    DO UPDATE SET payload = EXCLUDED.payload;
    RETURN NULL;
END
$$;
-- Tasks without a callback pay for the WHEN test only.
CREATE TRIGGER tasks_webhooks
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN (NEW.callback_url IS NOT NULL)
    EXECUTE FUNCTION warren_webhook_event();
"#;

const WEBHOOKS_DOWN: &str = r#"
DROP TRIGGER tasks_webhooks ON tasks;
DROP FUNCTION warren_webhook_event();
DROP TABLE webhook_attempts;
DROP TABLE webhook_deliveries;
DROP TABLE webhook_secrets;
ALTER TABLE tasks DROP COLUMN callback_url, DROP COLUMN callback_events;
"#;

/// Links, chains, groups and chords: the steps a workflow has yet to start
/// wait here as rows, and a trigger on `tasks` starts them in the
/// transaction that commits the outcome they wait for. Nothing polls.
const WORKFLOWS: &str = r#"
CREATE TABLE workflows (
    id          uuid PRIMARY KEY,
    owner       text,
    -- 'api' (POST /workflows) or 'celery' (a canvas in a Celery message).
    origin      text NOT NULL,
    spec        jsonb,
    state       text NOT NULL DEFAULT 'RUNNING'
                CHECK (state IN ('RUNNING', 'SUCCESS', 'FAILURE', 'CANCELLED')),
    result      jsonb,
    error       jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX workflows_listing ON workflows (owner, created_at DESC, id DESC);

-- A join: a group's members, counted as each succeeds; the commit that
-- brings `done` to `size` starts what waits on it, with the members'
-- results read back in order from their rows. The row stays small (a
-- count), because every member's commit updates it. `size` is NULL until
-- known: a Celery chord's members can arrive before its size does.
CREATE TABLE workflow_joins (
    id             uuid PRIMARY KEY,
    workflow_id    uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    size           integer CHECK (size > 0),
    done           integer NOT NULL DEFAULT 0,
    -- The list, once complete (what a parent join reads of it).
    result         jsonb,
    allow_failures boolean NOT NULL DEFAULT false,
    -- A group inside a group: completing this one is a member of that one.
    parent_join    uuid,
    parent_index   integer,
    final          boolean NOT NULL DEFAULT false,
    state          text NOT NULL DEFAULT 'WAITING' CHECK (state IN ('WAITING', 'DONE', 'FAILED'))
);
CREATE INDEX workflow_joins_parent ON workflow_joins (parent_join) WHERE parent_join IS NOT NULL;

-- Every task of a workflow, from the moment it is submitted. Its row in
-- `tasks` (same id) exists once the step is RELEASED.
CREATE TABLE workflow_steps (
    task_id     uuid PRIMARY KEY,
    workflow_id uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    owner       text,
    -- Plan order, for showing the steps as submitted.
    seq         integer NOT NULL DEFAULT 0,
    path        text NOT NULL,
    task_type   text NOT NULL,
    queue       text NOT NULL,
    input       jsonb NOT NULL,
    -- Started when this task ends (in failure if on_failure: a link_error),
    -- or when this join completes; neither: at submission.
    after_task  uuid,
    on_failure  boolean NOT NULL DEFAULT false,
    after_join  uuid,
    -- What it is given, and where in its input: '' the whole input, '*'
    -- merged into it, otherwise that field.
    takes       text NOT NULL DEFAULT 'nothing'
                CHECK (takes IN ('nothing', 'result', 'error', 'task_id')),
    pass_as     text,
    join_id     uuid,
    join_index  integer,
    -- Counted in its join: a member counts once, even if retried.
    counted     boolean NOT NULL DEFAULT false,
    final       boolean NOT NULL DEFAULT false,
    state       text NOT NULL DEFAULT 'WAITING' CHECK (state IN ('WAITING', 'RELEASED', 'SKIPPED')),
    released_at timestamptz,
    -- A Celery rpc:// client's reply queue, for its canvas's steps.
    reply_to    text
);
CREATE INDEX workflow_steps_after_task ON workflow_steps (after_task) WHERE state = 'WAITING';
CREATE INDEX workflow_steps_after_join ON workflow_steps (after_join) WHERE state = 'WAITING';
CREATE INDEX workflow_steps_workflow ON workflow_steps (workflow_id);
CREATE INDEX workflow_steps_join ON workflow_steps (join_id, join_index) WHERE join_id IS NOT NULL;

ALTER TABLE tasks ADD COLUMN workflow_id uuid;

-- The input a step starts with, given what it waited for.
CREATE FUNCTION warren_step_input(s workflow_steps, v jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN s.takes = 'nothing' THEN s.input
        WHEN s.pass_as = '' THEN COALESCE(v, 'null'::jsonb)
        WHEN s.pass_as = '*' THEN s.input || COALESCE(v, '{}'::jsonb)
        ELSE s.input || jsonb_build_object(s.pass_as, v)
    END
$$;

-- Starts the waiting steps `cond` selects: each becomes a task row in the
-- outbox (the relay publishes it). `event` holds what a step may take:
-- {"result", "error", "task_id"}.
CREATE FUNCTION warren_release(w uuid, after_t uuid, failed boolean, after_j uuid, event jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    s workflow_steps;
BEGIN
    FOR s IN
        UPDATE workflow_steps SET state = 'RELEASED', released_at = now()
        WHERE state = 'WAITING' AND workflow_id = w
          AND CASE WHEN after_t IS NOT NULL THEN after_task = after_t AND on_failure = failed
                   WHEN after_j IS NOT NULL THEN after_join = after_j
                   ELSE after_task IS NULL AND after_join IS NULL END
        RETURNING *
    LOOP
        INSERT INTO tasks (id, task_type, queue, owner, state, input, publish_at, origin,
                           root_id, parent_id, workflow_id, reply_to, created_at, updated_at)
        VALUES (s.task_id, s.task_type, s.queue, s.owner, 'PENDING',
                warren_step_input(s, CASE s.takes WHEN 'nothing' THEN NULL ELSE event -> s.takes END),
                now(), 'workflow', w::text, after_t::text, w, s.reply_to, now(), now())
        ON CONFLICT (id) DO NOTHING;
    END LOOP;
END
$$;

-- One more member of join `j` is in; the last one completes it.
CREATE FUNCTION warren_join_member(j uuid)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workflow_joins SET done = done + 1 WHERE id = j AND state = 'WAITING';
    IF FOUND THEN
        PERFORM warren_join_check(j);
    END IF;
END
$$;

-- Completes join `j` if every member is in: once, since the row is locked
-- and moved out of WAITING by the statement that sees it complete. The
-- list is read then: members' results (a failed member's state and error,
-- where failures are allowed) and inner groups' lists, by position.
CREATE FUNCTION warren_join_check(j uuid)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    jr workflow_joins;
    list jsonb;
BEGIN
    UPDATE workflow_joins SET state = 'DONE'
    WHERE id = j AND state = 'WAITING' AND size IS NOT NULL AND done >= size
    RETURNING * INTO jr;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT COALESCE(jsonb_agg(m.v ORDER BY m.i), '[]'::jsonb) INTO list FROM (
        SELECT s.join_index AS i,
               CASE WHEN t.state = 'SUCCESS' THEN COALESCE(t.result, 'null'::jsonb)
                    ELSE jsonb_build_object('state', t.state, 'error', t.error) END AS v
        FROM workflow_steps s JOIN tasks t ON t.id = s.task_id
        WHERE s.join_id = j AND s.counted
        UNION ALL
        SELECT c.parent_index, c.result FROM workflow_joins c
        WHERE c.parent_join = j AND c.state = 'DONE'
    ) m;
    UPDATE workflow_joins SET result = list WHERE id = j;
    PERFORM warren_release(jr.workflow_id, NULL, false, j, jsonb_build_object('result', list));
    IF jr.parent_join IS NOT NULL THEN
        PERFORM warren_join_member(jr.parent_join);
    END IF;
    IF jr.final THEN
        UPDATE workflows SET state = 'SUCCESS', result = list, finished_at = now()
        WHERE id = jr.workflow_id AND state = 'RUNNING';
    END IF;
END
$$;

-- Counts task `t` in its join, once.
CREATE FUNCTION warren_count_member(t uuid, j uuid)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workflow_steps SET counted = true WHERE task_id = t AND NOT counted;
    IF FOUND THEN
        PERFORM warren_join_member(j);
    END IF;
END
$$;

-- The workflow failed: nothing more starts (error callbacks of tasks that
-- did run still do).
CREATE FUNCTION warren_workflow_fail(w uuid, err jsonb)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workflows SET state = 'FAILURE', error = err, finished_at = now()
    WHERE id = w AND state = 'RUNNING';
    WITH skipped AS (
        UPDATE workflow_steps SET state = 'SKIPPED'
        WHERE workflow_id = w AND state = 'WAITING' AND NOT on_failure
        RETURNING task_id
    )
    UPDATE workflow_steps SET state = 'SKIPPED'
    WHERE workflow_id = w AND state = 'WAITING' AND on_failure
      AND after_task IN (SELECT task_id FROM skipped);
    UPDATE workflow_joins SET state = 'FAILED' WHERE workflow_id = w AND state = 'WAITING';
END
$$;

CREATE FUNCTION warren_workflow_outcome() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    me workflow_steps;
    tolerant boolean;
BEGIN
    SELECT * INTO me FROM workflow_steps WHERE task_id = NEW.id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NEW.state = 'SUCCESS' THEN
        PERFORM warren_release(me.workflow_id, NEW.id, false, NULL, jsonb_build_object('result', NEW.result));
        UPDATE workflow_steps SET state = 'SKIPPED'
        WHERE after_task = NEW.id AND on_failure AND state = 'WAITING';
        IF me.join_id IS NOT NULL THEN
            PERFORM warren_count_member(NEW.id, me.join_id);
        END IF;
        IF me.final THEN
            UPDATE workflows SET state = 'SUCCESS', result = NEW.result, finished_at = now()
            WHERE id = me.workflow_id AND state = 'RUNNING';
        END IF;
        RETURN NULL;
    END IF;
    PERFORM warren_release(me.workflow_id, NEW.id, true, NULL, jsonb_build_object(
        'task_id', NEW.id::text,
        'error', jsonb_build_object('task_id', NEW.id, 'task_type', NEW.task_type,
                                    'state', NEW.state, 'error', NEW.error)));
    SELECT allow_failures INTO tolerant FROM workflow_joins WHERE id = me.join_id;
    IF tolerant THEN
        PERFORM warren_count_member(NEW.id, me.join_id);
    ELSE
        PERFORM warren_workflow_fail(me.workflow_id, jsonb_build_object(
            'step', me.path, 'task_id', NEW.id, 'task_type', NEW.task_type,
            'state', NEW.state, 'error', NEW.error));
    END IF;
    RETURN NULL;
END
$$;
-- Tasks outside workflows pay for the WHEN test only.
CREATE TRIGGER tasks_workflows
    AFTER UPDATE OF state ON tasks
    FOR EACH ROW
    WHEN (NEW.workflow_id IS NOT NULL AND NEW.state IS DISTINCT FROM OLD.state
          AND NEW.state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED'))
    EXECUTE FUNCTION warren_workflow_outcome();
"#;

const WORKFLOWS_DOWN: &str = r#"
DROP TRIGGER tasks_workflows ON tasks;
DROP FUNCTION warren_workflow_outcome();
DROP FUNCTION warren_workflow_fail(uuid, jsonb);
DROP FUNCTION warren_count_member(uuid, uuid);
DROP FUNCTION warren_join_member(uuid);
DROP FUNCTION warren_join_check(uuid);
DROP FUNCTION warren_release(uuid, uuid, boolean, uuid, jsonb);
DROP FUNCTION warren_step_input(workflow_steps, jsonb);
ALTER TABLE tasks DROP COLUMN workflow_id;
DROP TABLE workflow_steps;
DROP TABLE workflow_joins;
DROP TABLE workflows;
"#;

/// Rows a type's limits hold back wait as PENDING with `hold` set, out of
/// the outbox; the admission pass releases them into it. Nothing here adds
/// `state` to an index (a claim or an outcome stays a HOT update): the
/// running count per key is kept by a trigger instead, and only rows with
/// a key run it.
const ADMISSION: &str = r#"
ALTER TABLE tasks
    ADD COLUMN priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    -- Why a PENDING row is neither on the broker nor in the outbox:
    -- 'admission' (its key's cap or rate), 'paused' (its type or queue).
    ADD COLUMN hold text CHECK (hold IN ('admission', 'paused')),
    -- The round-robin group of an admitted type: its concurrency key (or
    -- its rate key when it has no cap).
    ADD COLUMN concurrency_key text,
    ADD COLUMN rate_key text,
    -- `?unique_key=`: at most one unfinished task per (type, owner, key);
    -- cleared by the trigger below when the task ends (or, for a
    -- debounced one, when it leaves PENDING).
    ADD COLUMN unique_key text,
    ADD COLUMN debounce boolean NOT NULL DEFAULT false;

CREATE INDEX tasks_held ON tasks (task_type, concurrency_key, priority DESC, id)
    WHERE hold IS NOT NULL;
CREATE UNIQUE INDEX tasks_unique ON tasks (task_type, owner, unique_key)
    WHERE unique_key IS NOT NULL;

-- Admitted and unfinished tasks per (type, key): what the cap is checked
-- against. Kept by the trigger, so it cannot drift from the rows.
CREATE TABLE admission_counts (
    task_type text NOT NULL,
    key       text NOT NULL,
    running   integer NOT NULL DEFAULT 0,
    PRIMARY KEY (task_type, key)
);
-- A rate limit's state (GCRA): the instant the next task may be admitted.
CREATE TABLE rate_buckets (
    task_type text NOT NULL,
    key       text NOT NULL,
    tat       timestamptz NOT NULL,
    PRIMARY KEY (task_type, key)
);
-- Paused task types and queues: nothing of theirs is admitted or started.
CREATE TABLE pauses (
    kind      text NOT NULL CHECK (kind IN ('type', 'queue')),
    name      text NOT NULL,
    paused_at timestamptz NOT NULL DEFAULT now(),
    paused_by text,
    PRIMARY KEY (kind, name)
);

CREATE FUNCTION warren_counted(k text, h text, st text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT (k IS NOT NULL AND h IS DISTINCT FROM 'admission'
            AND st IN ('PENDING', 'QUEUED', 'STARTED', 'RETRY'))::int
$$;

CREATE FUNCTION warren_admission_count() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta integer;
BEGIN
    IF TG_OP = 'DELETE' THEN
        delta := -warren_counted(OLD.concurrency_key, OLD.hold, OLD.state);
    ELSE
        delta := warren_counted(NEW.concurrency_key, NEW.hold, NEW.state)
               - warren_counted(OLD.concurrency_key, OLD.hold, OLD.state);
    END IF;
    IF delta <> 0 THEN
        INSERT INTO admission_counts AS c (task_type, key, running)
        VALUES (OLD.task_type, OLD.concurrency_key, greatest(delta, 0))
        ON CONFLICT (task_type, key) DO UPDATE SET running = greatest(c.running + delta, 0);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_admission_update
    AFTER UPDATE OF state, hold ON tasks
    FOR EACH ROW WHEN (OLD.concurrency_key IS NOT NULL)
    EXECUTE FUNCTION warren_admission_count();
CREATE TRIGGER tasks_admission_delete
    AFTER DELETE ON tasks
    FOR EACH ROW WHEN (OLD.concurrency_key IS NOT NULL)
    EXECUTE FUNCTION warren_admission_count();

CREATE FUNCTION warren_unique_release() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED')
       OR (NEW.debounce AND NEW.state <> 'PENDING') THEN
        NEW.unique_key := NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER tasks_unique_release
    BEFORE UPDATE OF state ON tasks
    FOR EACH ROW WHEN (OLD.unique_key IS NOT NULL)
    EXECUTE FUNCTION warren_unique_release();
"#;

const ADMISSION_DOWN: &str = r#"
DROP TRIGGER tasks_unique_release ON tasks;
DROP FUNCTION warren_unique_release();
DROP TRIGGER tasks_admission_delete ON tasks;
DROP TRIGGER tasks_admission_update ON tasks;
DROP FUNCTION warren_admission_count();
DROP FUNCTION warren_counted(text, text, text);
DROP TABLE pauses;
DROP TABLE rate_buckets;
DROP TABLE admission_counts;
ALTER TABLE tasks DROP COLUMN debounce, DROP COLUMN unique_key, DROP COLUMN rate_key,
    DROP COLUMN concurrency_key, DROP COLUMN hold, DROP COLUMN priority;
"#;

/// Periodic tasks. A schedule's row is its lock: whoever fires it holds
/// the row (`FOR UPDATE SKIP LOCKED`) while it records the ticks' tasks
/// and the next `next_at`, in one transaction.
const SCHEDULES: &str = r#"
CREATE TABLE schedules (
    name          text PRIMARY KEY,
    owner         text NOT NULL,
    task_type     text NOT NULL,
    input         jsonb NOT NULL,
    cron          text,
    every_seconds float8,
    timezone      text NOT NULL,
    missed        text NOT NULL CHECK (missed IN ('skip', 'run_once', 'run_all')),
    overlap       text NOT NULL CHECK (overlap IN ('allow', 'skip')),
    -- 'config' ([schedules.<name>], synced at startup) or 'api'.
    source        text NOT NULL CHECK (source IN ('config', 'api')),
    paused        boolean NOT NULL DEFAULT false,
    next_at       timestamptz NOT NULL,
    last_tick_at  timestamptz,
    last_task_id  uuid,
    fired         bigint NOT NULL DEFAULT 0,
    skipped       bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every_seconds IS NULL))
);
CREATE INDEX schedules_due ON schedules (next_at) WHERE NOT paused;
"#;

/// A rate limit's second bucket, spent by workers as a task starts: the
/// relay's admission paces releases, but the time from a release to a
/// start varies (publishing, prefetch, a busy slot), so starts would bunch.
/// This one spaces the starts themselves. Its own table, as the keys are
/// tenants' values and may not share a namespace with admission's.
const START_BUCKETS: &str = "
CREATE TABLE start_buckets (
    task_type text NOT NULL,
    key       text NOT NULL,
    tat       timestamptz NOT NULL,
    PRIMARY KEY (task_type, key)
);
";

/// A listing filtered by state read every row of the owner when few
/// matched (`?state=FAILURE` among 700k successes: 281 ms at 1 M rows).
/// The state itself in the index would make every claim and outcome a
/// non-HOT update (an index entry per index per change); the phase, a
/// generated column, changes once per task, when it ends, and the ranges
/// of the phases a filter needs are merged newest first (`list_statement`).
/// Adding a stored generated column rewrites the table once.
const LISTING_BY_PHASE: &str = r#"
ALTER TABLE tasks ADD COLUMN phase text NOT NULL GENERATED ALWAYS AS (
    CASE WHEN state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED') THEN state ELSE 'live' END
) STORED;
CREATE INDEX tasks_listing_by_phase ON tasks (owner, task_type, phase, created_at DESC, id DESC);
DROP INDEX tasks_listing;
"#;

/// A long-poll learns which task finished from the notification itself.
/// With an empty payload every API process asked PostgreSQL which of all
/// its awaited tasks had finished, once per committed batch: at 10,000
/// waiters each ask took 0.45 s and answers came 2 s late. One notification
/// per finished row costs the committing transaction one queue entry each
/// (PostgreSQL de-duplicates them by hash, not by scanning); listeners wake
/// the awaited ids in memory. An empty payload still means "check them
/// all", so an API of either version understands the other's trigger.
const NOTIFY_FINISHED_IDS: &str = r#"
CREATE OR REPLACE FUNCTION warren_notify_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('warren_task_finished', NEW.id::text);
    RETURN NULL;
END
$$;
"#;

/// A unique key is let go after the update that ends its task, not
/// before it. For any `BEFORE ROW` trigger PostgreSQL locks the old row
/// (a WAL record and a dirtied page) before it evaluates the trigger's
/// `WHEN`, so the old trigger cost every claim and every outcome of every
/// task a row lock, keyed or not: 115 of 835 WAL bytes a task in a drain,
/// a third of its WAL records. An `AFTER` trigger's `WHEN` is read from the
/// row versions the update already has. Only a keyed task that ends pays
/// more: a second, small update of its row, at the end of the statement,
/// so no later statement can see the key still held. The key is released
/// for good, as before: a task retried or requeued later runs without it
/// (test `state_machine::a_unique_key_is_released_for_good_when_its_task_ends`;
/// the locks: `pipeline::claims_by_key_and_outcomes_lock_no_task_row`).
const UNIQUE_RELEASE_AFTER: &str = r#"
DROP TRIGGER tasks_unique_release ON tasks;
CREATE OR REPLACE FUNCTION warren_unique_release() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasks SET unique_key = NULL WHERE id = NEW.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_unique_release
    AFTER UPDATE OF state ON tasks
    FOR EACH ROW
    WHEN (NEW.unique_key IS NOT NULL
          AND (NEW.state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED')
               OR (NEW.debounce AND NEW.state <> 'PENDING')))
    EXECUTE FUNCTION warren_unique_release();
"#;

/// One notification per statement, not per finished row: an outcome
/// statement of 512 rows ran the row trigger's PL/pgSQL 512 times and
/// queued 512 notifications, which the listening session of every API
/// process then read and sent one by one. In a scratch table (153,600
/// claims and successes in statements of 512, the writing backend's CPU)
/// the row trigger cost 2.9 µs a finished row, this one 1.4; in
/// `warren-bench drain` PostgreSQL as a whole (the listening sessions and
/// the notification queue too) spent 6–8 µs a task less (README,
/// "Performance"). A statement's finished ids go out comma-separated, up
/// to 200 a notification (7,400 bytes, under PostgreSQL's 8,000).
///
/// An `UPDATE` trigger with a transition table cannot name columns, so it
/// runs for every update of `tasks` and reports the rows it leaves
/// finished, whether or not it changed their state: the release of a
/// finished task's unique key notifies its id a second time, which wakes
/// nobody (the API hands a finished row to whoever waits for it). That
/// costs a one-row update 5–7 µs more (a progress write, a cancel; 20,000
/// in the scratch table: 15–16 µs each without the trigger, 20–22 with it),
/// where the row trigger cost one that finished nothing almost nothing;
/// the batched claims and outcomes of every task are what it is for.
/// Inserts keep the row trigger: few inserted rows are finished, and a
/// transition table would copy every row a batch submission inserts.
const NOTIFY_FINISHED_PER_STATEMENT: &str = r#"
DROP TRIGGER tasks_finished ON tasks;
CREATE TRIGGER tasks_finished
    AFTER INSERT ON tasks
    FOR EACH ROW
    WHEN (NEW.state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED'))
    EXECUTE FUNCTION warren_notify_finished();
CREATE FUNCTION warren_notify_finished_rows() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids text;
BEGIN
    FOR ids IN
        SELECT string_agg(id::text, ',')
        FROM (SELECT id, (row_number() OVER ()) / 200 AS chunk
              FROM finished
              WHERE state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED')) f
        GROUP BY chunk
    LOOP
        PERFORM pg_notify('warren_task_finished', ids);
    END LOOP;
    RETURN NULL;
END
$$;
CREATE TRIGGER tasks_finished_rows
    AFTER UPDATE ON tasks
    REFERENCING NEW TABLE AS finished
    FOR EACH STATEMENT
    EXECUTE FUNCTION warren_notify_finished_rows();
"#;

const NOTIFY_FINISHED_PER_STATEMENT_DOWN: &str = r#"
DROP TRIGGER tasks_finished_rows ON tasks;
DROP FUNCTION warren_notify_finished_rows();
DROP TRIGGER tasks_finished ON tasks;
CREATE TRIGGER tasks_finished
    AFTER INSERT OR UPDATE OF state ON tasks
    FOR EACH ROW
    WHEN (NEW.state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED'))
    EXECUTE FUNCTION warren_notify_finished();
"#;

const UNIQUE_RELEASE_AFTER_DOWN: &str = r#"
DROP TRIGGER tasks_unique_release ON tasks;
CREATE OR REPLACE FUNCTION warren_unique_release() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IN ('SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED')
       OR (NEW.debounce AND NEW.state <> 'PENDING') THEN
        NEW.unique_key := NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER tasks_unique_release
    BEFORE UPDATE OF state ON tasks
    FOR EACH ROW WHEN (OLD.unique_key IS NOT NULL)
    EXECUTE FUNCTION warren_unique_release();
"#;
