//! # warren-bench
//!
//! Measures Warren as users run it: the release binaries as separate
//! processes, on the local RabbitMQ and PostgreSQL, each measurement on a
//! system of its own (fresh database, unique queue prefix) that is taken
//! down afterwards. Prints a Markdown table to stdout, progress to
//! stderr, and writes the figures as JSON.
//!
//! `scripts/bench.sh` builds the binaries, makes sure the services run
//! and calls this; `warren-bench --help` lists the scenarios.

pub mod drain;
pub mod report;
pub mod scaling;
pub mod system;
