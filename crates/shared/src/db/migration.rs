//! Schema migrations (sea-orm-migration). Written as SQL: partial indexes and
//! check constraints read best in the language PostgreSQL speaks.

use sea_orm_migration::prelude::*;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateTasks)]
    }
}

struct CreateTasks;

impl MigrationName for CreateTasks {
    fn name(&self) -> &str {
        "m20261123_000001_create_tasks"
    }
}

// The trait's signature elides the lifetime; matching it exactly is required.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for CreateTasks {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                r#"
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
"#,
            )
            .await
            .map(drop)
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP TABLE tasks")
            .await
            .map(drop)
    }
}
