//! The states of a task and the moves between them.
//!
//! ```text
//! PENDING ─▶ QUEUED ─▶ STARTED ─▶ SUCCESS
//!    │          │         ├──────▶ FAILURE
//!    │          │         └──────▶ RETRY ─▶ QUEUED ─▶ STARTED ─▶ …
//!    └──────────┴─────────────────▶ CANCELLED | EXPIRED
//! ```
//!
//! PENDING means "recorded in PostgreSQL, not yet confirmed by the broker"
//! (or waiting for its countdown); the relay moves it on. Every transition is
//! one guarded SQL statement in [`crate::store`].

use sea_orm::{DeriveActiveEnum, EnumIter};
use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, EnumIter, DeriveActiveEnum,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[sea_orm(rs_type = "String", db_type = "Text")]
pub enum TaskState {
    #[sea_orm(string_value = "PENDING")]
    Pending,
    #[sea_orm(string_value = "QUEUED")]
    Queued,
    #[sea_orm(string_value = "STARTED")]
    Started,
    #[sea_orm(string_value = "RETRY")]
    Retry,
    #[sea_orm(string_value = "SUCCESS")]
    Success,
    #[sea_orm(string_value = "FAILURE")]
    Failure,
    #[sea_orm(string_value = "CANCELLED")]
    Cancelled,
    #[sea_orm(string_value = "EXPIRED")]
    Expired,
}

impl TaskState {
    pub const ALL: [TaskState; 8] = [
        TaskState::Pending,
        TaskState::Queued,
        TaskState::Started,
        TaskState::Retry,
        TaskState::Success,
        TaskState::Failure,
        TaskState::Cancelled,
        TaskState::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Queued => "QUEUED",
            TaskState::Started => "STARTED",
            TaskState::Retry => "RETRY",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Cancelled => "CANCELLED",
            TaskState::Expired => "EXPIRED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str().eq_ignore_ascii_case(s))
    }

    /// Terminal states never change again; a redelivered message for such a
    /// task is acknowledged without running.
    pub fn is_terminal(self) -> bool {
        match self {
            TaskState::Success | TaskState::Failure | TaskState::Cancelled | TaskState::Expired => {
                true
            }
            TaskState::Pending | TaskState::Queued | TaskState::Started | TaskState::Retry => false,
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_and_ignores_case() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
        }
        assert_eq!(TaskState::parse("success"), Some(TaskState::Success));
        assert_eq!(TaskState::parse("DONE"), None);
    }

    #[test]
    fn serde_uses_the_wire_names() {
        assert_eq!(
            serde_json::to_string(&TaskState::Retry).unwrap(),
            "\"RETRY\""
        );
    }
}
