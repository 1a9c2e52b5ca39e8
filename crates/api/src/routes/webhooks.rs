//! `/webhooks/secrets`: the caller's owner's signing secrets. Creating one
//! rotates: the previous secret keeps signing for
//! `webhooks.secret_overlap_seconds`, so receivers switch without missing
//! a delivery; the secret itself is shown once, at creation.

use crate::{ApiError, AppState, auth::Caller};
use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;
use utoipa::ToSchema;
use uuid::Uuid;
use warren_shared::{store::SecretInfo, webhooks};

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SecretView {
    id: Uuid,
    /// The first characters, to tell secrets apart.
    prefix: String,
    created_at: DateTime<Utc>,
    /// When it stops signing; none for the newest.
    retires_at: Option<DateTime<Utc>>,
}

impl From<SecretInfo> for SecretView {
    fn from(s: SecretInfo) -> Self {
        Self {
            id: s.id,
            prefix: s.prefix,
            created_at: s.created_at,
            retires_at: s.retires_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NewSecret {
    /// `whsec_…`: verify `webhook-signature` with it (Standard Webhooks).
    /// Shown only now.
    secret: String,
    #[serde(flatten)]
    info: SecretView,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SecretsPage {
    /// The secrets that sign now, newest first.
    items: Vec<SecretView>,
}

/// `POST /webhooks/secrets`: a new signing secret for the caller's owner.
#[utoipa::path(
    post,
    path = "/webhooks/secrets",
    tag = "webhooks",
    security(("api_key" = [])),
    responses(
        (status = 201, description = "The new secret, shown once; the previous one retires after the overlap", body = NewSecret),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let secret = webhooks::new_secret().map_err(|e| ApiError::internal(&e))?;
    let overlap = Duration::from_secs_f64(state.settings.webhooks.secret_overlap_seconds);
    let info = state
        .store
        .rotate_webhook_secret(&caller.owner, &secret, overlap)
        .await?;
    tracing::info!(owner = %caller.owner, secret_id = %info.id, "webhook signing secret rotated");
    let body = NewSecret {
        secret,
        info: info.into(),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /webhooks/secrets`: the caller's owner's secrets that sign now.
#[utoipa::path(
    get,
    path = "/webhooks/secrets",
    tag = "webhooks",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Newest first, without the secrets themselves", body = SecretsPage),
        (status = 401, description = "No API key, or an unknown or revoked one", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let items = state
        .store
        .webhook_secrets(&caller.owner)
        .await?
        .into_iter()
        .map(SecretView::from)
        .collect();
    Ok(Json(SecretsPage { items }).into_response())
}
