//! Route handlers, one module per resource.

pub(crate) mod health;
pub(crate) mod ops;
pub(crate) mod pauses;
pub(crate) mod schedules;
pub(crate) mod tasks;
pub(crate) mod webhooks;
pub(crate) mod workflows;
