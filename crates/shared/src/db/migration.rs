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
