//! End-to-end tests: real RabbitMQ, real PostgreSQL, real HTTP, real
//! worker processes where a test needs to kill or signal one.
//!
//! One binary (one link) for all of them; each test builds its own
//! [`warren_tests::TestEnv`], so they run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admission;
mod api_abuse;
mod bad_input;
mod batches;
mod celery;
mod celery_runner;
mod cluster;
mod control;
mod crashes;
mod dashboard;
mod db_faults;
mod dead_letters;
mod delays;
mod error_tracking;
mod faults;
mod hostile;
mod http_contract;
mod idempotency;
mod keys;
mod lifecycle;
mod listing;
mod load_sharing;
mod long_poll;
mod observability;
mod outbox;
mod pipeline;
mod publisher;
mod real_work;
mod retention;
mod retries;
mod scaling;
mod schedules;
mod state_machine;
mod submit;
mod time_limits;
mod webhooks;
mod workflows;
