//! Files tasks produce (a labels PDF), stored so that any API replica can
//! serve them. One small interface, [`ArtifactStore`]; PostgreSQL behind it
//! for now ([`PgArtifacts`], fine up to tens of megabytes per file), an
//! S3-compatible store can implement it too.

use crate::store::{StoreError, stmt};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, FromQueryResult};
use serde::Serialize;
use std::{collections::HashMap, future::Future, pin::Pin};
use uuid::Uuid;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromQueryResult)]
pub struct ArtifactMeta {
    pub name: String,
    pub content_type: String,
    pub size_bytes: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Artifact {
    pub meta: ArtifactMeta,
    pub data: Vec<u8>,
}

pub trait ArtifactStore: Send + Sync {
    /// Stores (or replaces, for a retried attempt) a task's artifact.
    fn put<'a>(
        &'a self,
        task_id: Uuid,
        name: &'a str,
        content_type: &'a str,
        data: Vec<u8>,
    ) -> BoxFuture<'a, Result<ArtifactMeta, StoreError>>;
    fn get<'a>(
        &'a self,
        task_id: Uuid,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Artifact>, StoreError>>;
    fn list(&self, task_id: Uuid) -> BoxFuture<'_, Result<Vec<ArtifactMeta>, StoreError>>;
    /// [`Self::list`] for several tasks at once (many long-polls woken
    /// together); a task without artifacts has no entry.
    fn list_many<'a>(
        &'a self,
        task_ids: &'a [Uuid],
    ) -> BoxFuture<'a, Result<HashMap<Uuid, Vec<ArtifactMeta>>, StoreError>>;
}

/// Artifact names are path segments of download URLs: keep them plain.
pub fn valid_name(name: &str) -> bool {
    crate::names::is_plain_name(name, 100) && !name.starts_with('.')
}

pub struct PgArtifacts {
    db: DatabaseConnection,
}

impl PgArtifacts {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

impl ArtifactStore for PgArtifacts {
    fn put<'a>(
        &'a self,
        task_id: Uuid,
        name: &'a str,
        content_type: &'a str,
        data: Vec<u8>,
    ) -> BoxFuture<'a, Result<ArtifactMeta, StoreError>> {
        Box::pin(async move {
            let size = i64::try_from(data.len()).unwrap_or(i64::MAX);
            let meta = ArtifactMeta::find_by_statement(stmt(
                "INSERT INTO artifacts (task_id, name, content_type, size_bytes, data) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (task_id, name) DO UPDATE SET content_type = EXCLUDED.content_type,
                    size_bytes = EXCLUDED.size_bytes, data = EXCLUDED.data, created_at = now()
                 RETURNING name, content_type, size_bytes, created_at",
                vec![task_id.into(), name.into(), content_type.into(), size.into(), data.into()],
            ))
            .one(&self.db)
            .await?;
            meta.ok_or_else(|| StoreError::Other(sea_orm::DbErr::RecordNotInserted))
        })
    }

    fn get<'a>(
        &'a self,
        task_id: Uuid,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Artifact>, StoreError>> {
        Box::pin(async move {
            let row = self
                .db
                .query_one_raw(stmt(
                    "SELECT name, content_type, size_bytes, created_at, data FROM artifacts
                     WHERE task_id = $1 AND name = $2",
                    vec![task_id.into(), name.into()],
                ))
                .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            Ok(Some(Artifact {
                meta: ArtifactMeta::from_query_result(&row, "")?,
                data: row.try_get("", "data")?,
            }))
        })
    }

    fn list(&self, task_id: Uuid) -> BoxFuture<'_, Result<Vec<ArtifactMeta>, StoreError>> {
        Box::pin(async move {
            Ok(ArtifactMeta::find_by_statement(stmt(
                "SELECT name, content_type, size_bytes, created_at FROM artifacts WHERE task_id = $1 ORDER BY name",
                vec![task_id.into()],
            ))
            .all(&self.db)
            .await?)
        })
    }

    fn list_many<'a>(
        &'a self,
        task_ids: &'a [Uuid],
    ) -> BoxFuture<'a, Result<HashMap<Uuid, Vec<ArtifactMeta>>, StoreError>> {
        Box::pin(async move {
            let rows = self
                .db
                .query_all_raw(stmt(
                    "SELECT task_id, name, content_type, size_bytes, created_at FROM artifacts
                     WHERE task_id = ANY($1) ORDER BY task_id, name",
                    vec![task_ids.to_vec().into()],
                ))
                .await?;
            let mut by_task: HashMap<Uuid, Vec<ArtifactMeta>> = HashMap::new();
            for row in rows {
                let task_id: Uuid = row.try_get("", "task_id")?;
                let meta = ArtifactMeta::from_query_result(&row, "")?;
                by_task.entry(task_id).or_default().push(meta);
            }
            Ok(by_task)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_path_segments() {
        for good in ["labels.pdf", "report-2026_11.csv"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "../etc/passwd",
            ".hidden",
            "a/b",
            "a b",
            &"x".repeat(101),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
