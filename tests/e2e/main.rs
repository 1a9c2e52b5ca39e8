//! End-to-end tests: real RabbitMQ, real PostgreSQL, real HTTP, real
//! worker processes where a test needs to kill or signal one.
//!
//! One binary (one link) for all of them; each test builds its own
//! [`warren_tests::TestEnv`], so they run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_input;
mod celery;
mod crashes;
mod dead_letters;
mod delays;
mod faults;
mod lifecycle;
mod load_sharing;
mod outbox;
mod retries;
mod state_machine;
mod submit;
mod time_limits;
