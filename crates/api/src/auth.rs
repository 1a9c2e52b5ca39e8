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
    store::{Owners, StoreError},
};

/// Every key starts with this, so a leaked one is easy to grep for.
pub const KEY_PREFIX: &str = "wk_";
/// How much of a key is kept in clear to tell keys apart (`wk_1a2b3c4d`).
const SHOWN_CHARS: usize = KEY_PREFIX.len() + 8;
/// Bound on cached valid keys. A full cache first drops expired entries;
/// if none are, a new key is simply not cached (it costs a query).
const CACHE_MAX: usize = 10_000;
/// Bound on cached unknown keys, kept apart: a flood of random keys evicts
/// only other random keys, never a valid one.
const UNKNOWN_MAX: usize = 1_000;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Its owner's tasks, nothing else.
    Owner,
    /// Also operations: workers, queues, dead letters, every owner.
    Admin,
}

/// Who a valid key speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub owner: String,
    pub scope: Scope,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no randomness from the operating system: {0}")]
    Random(getrandom::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Owner(#[from] SettingsError),
}

pub(crate) type KeyHash = [u8; 32];

pub(crate) fn hash(key: &str) -> KeyHash {
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
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Creates a key for `owner`; returns the key (the only time it is seen)
/// and its record.
pub async fn create(
    db: &DatabaseConnection,
    owner: &str,
    name: &str,
    scope: Scope,
) -> Result<(String, KeyRecord), KeyError> {
    check_owner("owner", owner)?;
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(KeyError::Random)?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let key = format!("{KEY_PREFIX}{hex}");
    let record = KeyRecord::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO api_keys (id, owner, name, key_prefix, key_hash, admin) VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, owner, name, key_prefix, admin, created_at, revoked_at",
        vec![
            Uuid::now_v7().into(),
            owner.into(),
            name.into(),
            key[..SHOWN_CHARS].into(),
            hash(&key).to_vec().into(),
            (scope == Scope::Admin).into(),
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
        "SELECT id, owner, name, key_prefix, admin, created_at, revoked_at FROM api_keys
         WHERE $1::text IS NULL OR owner = $1 ORDER BY created_at",
        vec![owner.map(str::to_owned).into()],
    ))
    .all(db)
    .await
    .map_err(StoreError::from)?)
}

/// Turns a presented key into who it speaks for.
pub struct Authenticator {
    db: DatabaseConnection,
    static_keys: HashMap<KeyHash, Identity>,
    ttl: Duration,
    known: Mutex<HashMap<KeyHash, (Identity, Instant)>>,
    unknown: Mutex<HashMap<KeyHash, Instant>>,
}

impl Authenticator {
    pub fn new(
        db: DatabaseConnection,
        static_keys: &BTreeMap<String, SecretString>,
        static_admin_keys: &BTreeMap<String, SecretString>,
        ttl: Duration,
    ) -> Self {
        let identity = |scope| {
            move |(owner, key): (&String, &SecretString)| {
                let who = Identity {
                    owner: owner.clone(),
                    scope,
                };
                (hash(key.expose_secret()), who)
            }
        };
        let static_keys = static_keys
            .iter()
            .map(identity(Scope::Owner))
            .chain(static_admin_keys.iter().map(identity(Scope::Admin)))
            .collect();
        Self {
            db,
            static_keys,
            ttl,
            known: Mutex::default(),
            unknown: Mutex::default(),
        }
    }

    /// Who `key` speaks for, or `None` for an unknown or revoked key.
    pub async fn identify(&self, key: &str) -> Result<Option<Identity>, StoreError> {
        self.identify_hash(hash(key)).await
    }

    /// Like [`Authenticator::identify`], for the key whose hash is `h`: a
    /// dashboard session keeps only that.
    pub(crate) async fn identify_hash(&self, h: KeyHash) -> Result<Option<Identity>, StoreError> {
        if let Some(who) = self.static_keys.get(&h) {
            return Ok(Some(who.clone()));
        }
        if let Some((who, at)) = lock(&self.known).get(&h)
            && at.elapsed() < self.ttl
        {
            return Ok(Some(who.clone()));
        }
        if lock(&self.unknown)
            .get(&h)
            .is_some_and(|at| at.elapsed() < self.ttl)
        {
            return Ok(None);
        }
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT owner, admin FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
                vec![h.to_vec().into()],
            ))
            .await?;
        let Some(row) = row else {
            remember(
                &self.unknown,
                h,
                Instant::now(),
                UNKNOWN_MAX,
                self.ttl,
                |at| *at,
            );
            return Ok(None);
        };
        let admin: bool = row.try_get("", "admin").map_err(StoreError::from)?;
        let who = Identity {
            owner: row.try_get("", "owner").map_err(StoreError::from)?,
            scope: if admin { Scope::Admin } else { Scope::Owner },
        };
        let entry = (who.clone(), Instant::now());
        remember(&self.known, h, entry, CACHE_MAX, self.ttl, |(_, at)| *at);
        Ok(Some(who))
    }
}

/// Caches `value` under `key` unless the cache is full of live entries.
fn remember<V>(
    cache: &Mutex<HashMap<KeyHash, V>>,
    key: KeyHash,
    value: V,
    max: usize,
    ttl: Duration,
    at: impl Fn(&V) -> Instant,
) {
    let mut cache = lock(cache);
    if cache.len() >= max {
        cache.retain(|_, v| at(v).elapsed() < ttl);
    }
    if cache.len() < max {
        cache.insert(key, value);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only whole entries are written under these locks: a poisoned one is
    // still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The authenticated caller of a request: add it to a handler's arguments
/// and the handler only runs for a valid key.
#[derive(Debug, Clone)]
pub struct Caller {
    pub owner: String,
    pub scope: Scope,
}

impl Caller {
    /// Whose tasks this caller may read and control: its owner's, or every
    /// owner's for an admin key. Every read of the API and the dashboard
    /// takes it from here.
    pub fn owners(&self) -> Owners<'_> {
        match self.scope {
            Scope::Owner => Owners::One(&self.owner),
            Scope::Admin => Owners::All,
        }
    }
}

/// A caller with the admin scope: add it to an operations handler's
/// arguments and an ordinary key gets 403.
#[derive(Debug, Clone)]
pub struct Admin(pub Caller);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        match caller.scope {
            Scope::Admin => Ok(Admin(caller)),
            Scope::Owner => Err(ApiError::forbidden(
                "this needs an admin key (`warren-api keys create --admin`)",
            )),
        }
    }
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
        match state.auth.identify(key).await? {
            Some(Identity { owner, scope }) => {
                tracing::Span::current().record("owner", owner.as_str());
                Ok(Caller { owner, scope })
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
