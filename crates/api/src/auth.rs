//! API keys. Every `/tasks` request carries `Authorization: Bearer <key>`;
//! the key's owner scopes every read and write, so one owner never sees
//! another's tasks (theirs answer 404, as if they did not exist).
//!
//! A key is `wk_` and 64 hex digits of OS randomness, shown once when it is
//! created; PostgreSQL keeps only its SHA-256. Verified keys are cached for
//! `api.key_cache_seconds`, so authentication costs no query per request
//! and a revoked key stops working within that time.

use crate::{ApiError, AppState};
use axum::{extract::FromRequestParts, http::request::Parts};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, FromQueryResult, Statement};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};
use uuid::Uuid;
use warren_shared::{
    settings::{SettingsError, check_owner},
    store::StoreError,
};

/// Every key starts with this, so a leaked one is easy to grep for.
pub const KEY_PREFIX: &str = "wk_";
/// How much of a key is kept in clear to tell keys apart (`wk_1a2b3c4d`).
const SHOWN_CHARS: usize = KEY_PREFIX.len() + 8;
/// Bound on cached verdicts, good and bad, so a flood of random keys cannot
/// grow memory without end.
const CACHE_MAX: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no randomness from the operating system: {0}")]
    Random(getrandom::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Owner(#[from] SettingsError),
}

type KeyHash = [u8; 32];

fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// A stored key, without the key.
#[derive(Debug, Clone, Serialize, FromQueryResult)]
pub struct KeyRecord {
    pub id: Uuid,
    pub owner: String,
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Creates a key for `owner`; returns the key (the only time it is seen)
/// and its record.
pub async fn create(
    db: &DatabaseConnection,
    owner: &str,
    name: &str,
) -> Result<(String, KeyRecord), KeyError> {
    check_owner("owner", owner)?;
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(KeyError::Random)?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let key = format!("{KEY_PREFIX}{hex}");
    let record = KeyRecord::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO api_keys (id, owner, name, key_prefix, key_hash) VALUES ($1, $2, $3, $4, $5)
         RETURNING id, owner, name, key_prefix, created_at, revoked_at",
        vec![
            Uuid::now_v7().into(),
            owner.into(),
            name.into(),
            key[..SHOWN_CHARS].into(),
            hash(&key).to_vec().into(),
        ],
    ))
    .one(db)
    .await
    .map_err(StoreError::from)?
    .ok_or_else(|| StoreError::from(sea_orm::DbErr::RecordNotInserted))?;
    Ok((key, record))
}

/// Revokes the keys whose prefix (as listed) or id is `which`; returns how many.
pub async fn revoke(db: &DatabaseConnection, which: &str) -> Result<u64, KeyError> {
    let id = Uuid::parse_str(which).ok();
    let res = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE api_keys SET revoked_at = now()
             WHERE revoked_at IS NULL AND (key_prefix = $1 OR id = $2)",
            vec![which.into(), id.into()],
        ))
        .await
        .map_err(StoreError::from)?;
    Ok(res.rows_affected())
}

pub async fn list(
    db: &DatabaseConnection,
    owner: Option<&str>,
) -> Result<Vec<KeyRecord>, KeyError> {
    Ok(KeyRecord::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT id, owner, name, key_prefix, created_at, revoked_at FROM api_keys
         WHERE $1::text IS NULL OR owner = $1 ORDER BY created_at",
        vec![owner.map(str::to_owned).into()],
    ))
    .all(db)
    .await
    .map_err(StoreError::from)?)
}

/// Turns a presented key into its owner.
pub struct Authenticator {
    db: DatabaseConnection,
    static_keys: HashMap<KeyHash, String>,
    ttl: Duration,
    cache: Mutex<HashMap<KeyHash, (Option<String>, Instant)>>,
}

impl Authenticator {
    pub fn new(
        db: DatabaseConnection,
        static_keys: &BTreeMap<String, SecretString>,
        ttl: Duration,
    ) -> Self {
        Self {
            db,
            static_keys: static_keys
                .iter()
                .map(|(owner, key)| (hash(key.expose_secret()), owner.clone()))
                .collect(),
            ttl,
            cache: Mutex::default(),
        }
    }

    /// The owner of `key`, or `None` for an unknown or revoked key.
    pub async fn owner_of(&self, key: &str) -> Result<Option<String>, StoreError> {
        let h = hash(key);
        if let Some(owner) = self.static_keys.get(&h) {
            return Ok(Some(owner.clone()));
        }
        if let Some((owner, at)) = self.lock().get(&h)
            && at.elapsed() < self.ttl
        {
            return Ok(owner.clone());
        }
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT owner FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
                vec![h.to_vec().into()],
            ))
            .await?;
        let owner: Option<String> = match row {
            Some(r) => Some(r.try_get("", "owner").map_err(StoreError::from)?),
            None => None,
        };
        let mut cache = self.lock();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(h, (owner.clone(), Instant::now()));
        Ok(owner)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyHash, (Option<String>, Instant)>> {
        // Only whole entries are written under this lock: a poisoned one is
        // still consistent.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The authenticated caller of a request: add it to a handler's arguments
/// and the handler only runs for a valid key.
#[derive(Debug, Clone)]
pub struct Caller {
    pub owner: String,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(ApiError::missing_api_key)?;
        let key = header
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::invalid_api_key("expected `Authorization: Bearer <key>`"))?;
        match state.auth.owner_of(key).await? {
            Some(owner) => {
                tracing::Span::current().record("owner", owner.as_str());
                Ok(Caller { owner })
            }
            None => Err(ApiError::invalid_api_key("unknown or revoked key")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_differ_for_different_keys_and_match_for_equal_ones() {
        assert_eq!(hash("wk_a"), hash("wk_a"));
        assert_ne!(hash("wk_a"), hash("wk_b"));
    }
}
