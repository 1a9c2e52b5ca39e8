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
//!
//! The crate's second binary, `warren-chaos` ([`chaos`]), brings up a
//! Warren of several replicas on the local cluster of `scripts/cluster.sh`,
//! injects faults under load and checks what was lost.

pub mod all;
pub mod ceiling;
pub mod chaos;
pub mod cpu;
pub mod drain;
pub mod explain;
pub mod grow;
pub mod latency;
pub mod longpoll;
pub mod memory;
pub mod pages;
pub mod peers;
pub mod report;
pub mod retention;
pub mod scaling;
pub mod submit;
pub mod system;
pub mod webhooks;
pub mod workflows;
