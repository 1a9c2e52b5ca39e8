//! Signing in to the dashboard with an API key.
//!
//! The key is typed into a form (`/ui/login`, field `key`) and never
//! appears in a URL. A valid key gets a session: a random token in an
//! `HttpOnly`, `SameSite=Strict` cookie (`Secure` over TLS), of which
//! PostgreSQL keeps only a hash, beside the hash of the key. Every request
//! turns the session back into the key's identity through the same
//! [`Authenticator`](crate::auth::Authenticator) as the API, so a revoked
//! key ends its sessions. Every form carries the session's CSRF token; the
//! sign-in form, before any session exists, a token also set as a cookie
//! (double submit).

use super::{UiError, UiForm, UiQuery, layout};
use crate::{
    AppState,
    auth::{Caller, Identity, KeyHash, hash},
};
use axum::{
    extract::{FromRequestParts, State},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Redirect, Response},
};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use warren_shared::store::StoreError;

pub(crate) const SESSION_COOKIE: &str = "warren_session";
const LOGIN_COOKIE: &str = "warren_login";
/// How long the sign-in form stays valid.
const LOGIN_FORM_SECONDS: u64 = 3600;

/// A signed-in person: who the key speaks for, and the session's CSRF token.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) caller: Caller,
    pub(crate) csrf: String,
}

impl Session {
    /// Refuses a form that does not carry this session's token.
    pub(crate) fn check(&self, token: &str) -> Result<(), UiError> {
        if same(token.as_bytes(), self.csrf.as_bytes()) {
            Ok(())
        } else {
            tracing::warn!(owner = %self.caller.owner, "dashboard form with a wrong CSRF token");
            Err(UiError::Csrf)
        }
    }

    pub(crate) fn is_admin(&self) -> bool {
        self.caller.scope == crate::auth::Scope::Admin
    }
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_hex() -> Result<String, UiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        UiError::Api(crate::ApiError::internal(&std::io::Error::other(
            e.to_string(),
        )))
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The value of cookie `name`, if the request carries it.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A token we issued is 64 hex digits; anything else is not looked up.
fn well_formed(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

fn secure(state: &AppState, headers: &HeaderMap) -> bool {
    state.settings.api.ui_secure_cookies
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

fn set_cookie(name: &str, value: &str, max_age: u64, secure: bool) -> Option<HeaderValue> {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .ok()
}

/// Where to go after signing in: only a dashboard path, never elsewhere,
/// and only visible ASCII (it becomes a `Location` header).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with("/ui")
                && !n.starts_with("/ui/login")
                && !n.contains("//")
                && !n.contains('\\')
                && n.bytes().all(|b| b.is_ascii_graphic())
                && n.len() <= 2000 =>
        {
            n.to_owned()
        }
        _ => "/ui".to_owned(),
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = UiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let next = parts
            .uri
            .path_and_query()
            .map_or("/ui".to_owned(), |p| p.as_str().to_owned());
        let sign_in = || UiError::SignIn { next: next.clone() };
        let token = cookie(&parts.headers, SESSION_COOKIE)
            .filter(|t| well_formed(t))
            .ok_or_else(sign_in)?;
        let row = state
            .store
            .connection()
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT key_hash, csrf_token FROM ui_sessions
                 WHERE token_hash = $1 AND expires_at > now()",
                vec![token_hash(token).into()],
            ))
            .await
            .map_err(StoreError::from)?
            .ok_or_else(sign_in)?;
        let key: Vec<u8> = row.try_get("", "key_hash").map_err(StoreError::from)?;
        let csrf: String = row.try_get("", "csrf_token").map_err(StoreError::from)?;
        let key: KeyHash = key.try_into().map_err(|_| sign_in())?;
        match state.auth.identify_hash(key).await? {
            Some(Identity { owner, scope }) => {
                tracing::Span::current().record("owner", owner.as_str());
                Ok(Session {
                    caller: Caller { owner, scope },
                    csrf,
                })
            }
            // The key was revoked: the session ends with it.
            None => Err(sign_in()),
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginQuery {
    next: Option<String>,
}

/// `GET /ui/login`: the form, with a fresh double-submit token.
pub(crate) async fn login_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    UiQuery(q): UiQuery<LoginQuery>,
) -> Result<Response, UiError> {
    login_page(&state, &headers, &safe_next(q.next.as_deref()), None)
}

fn login_page(
    state: &AppState,
    headers: &HeaderMap,
    next: &str,
    problem: Option<&str>,
) -> Result<Response, UiError> {
    let token = random_hex()?;
    let status = if problem.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    let mut response = (status, layout::login(&token, next, problem)).into_response();
    if let Some(c) = set_cookie(
        LOGIN_COOKIE,
        &token,
        LOGIN_FORM_SECONDS,
        secure(state, headers),
    ) {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(response)
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    key: String,
    csrf: String,
    next: Option<String>,
}

/// `POST /ui/login`: a valid key becomes a session.
pub(crate) async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    UiForm(form): UiForm<LoginForm>,
) -> Result<Response, UiError> {
    let next = safe_next(form.next.as_deref());
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !same(expected.as_bytes(), form.csrf.as_bytes()) {
        return login_page(
            &state,
            &headers,
            &next,
            Some("The sign-in form expired. Please try again."),
        );
    }
    let key = form.key.trim();
    let Some(who) = state.auth.identify(key).await? else {
        tracing::info!("dashboard sign-in with an unknown or revoked key");
        return login_page(&state, &headers, &next, Some("Unknown or revoked API key."));
    };
    let (token, csrf) = (random_hex()?, random_hex()?);
    let hours = state.settings.api.ui_session_hours;
    let db = state.store.connection();
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "DELETE FROM ui_sessions WHERE expires_at < now()",
        vec![],
    ))
    .await
    .map_err(StoreError::from)?;
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO ui_sessions (token_hash, key_hash, csrf_token, expires_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        vec![
            token_hash(&token).into(),
            hash(key).to_vec().into(),
            csrf.into(),
            (hours * 3600.0).into(),
        ],
    ))
    .await
    .map_err(StoreError::from)?;
    tracing::info!(owner = %who.owner, scope = ?who.scope, "dashboard sign-in");
    let secure = secure(&state, &headers);
    let mut response = Redirect::to(&next).into_response();
    let max_age = (hours * 3600.0) as u64;
    let h = response.headers_mut();
    if let Some(c) = set_cookie(SESSION_COOKIE, &token, max_age, secure) {
        h.append(header::SET_COOKIE, c);
    }
    if let Some(c) = set_cookie(LOGIN_COOKIE, "", 0, secure) {
        h.append(header::SET_COOKIE, c);
    }
    Ok(response)
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    csrf: String,
}

/// `POST /ui/logout`: the session is deleted, not only forgotten by the browser.
pub(crate) async fn logout(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    UiForm(form): UiForm<CsrfForm>,
) -> Result<Response, UiError> {
    session.check(&form.csrf)?;
    if let Some(token) = cookie(&headers, SESSION_COOKIE) {
        state
            .store
            .connection()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "DELETE FROM ui_sessions WHERE token_hash = $1",
                vec![token_hash(token).into()],
            ))
            .await
            .map_err(StoreError::from)?;
    }
    tracing::info!(owner = %session.caller.owner, "dashboard sign-out");
    let mut response = Redirect::to("/ui/login").into_response();
    if let Some(c) = set_cookie(SESSION_COOKIE, "", 0, secure(&state, &headers)) {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dashboard_paths_are_followed_after_sign_in() {
        assert_eq!(
            safe_next(Some("/ui/tasks/sleep?state=STARTED")),
            "/ui/tasks/sleep?state=STARTED"
        );
        for bad in [
            "https://evil.example",
            "//evil.example",
            "/ui//evil",
            "/uix\\..",
            "/tasks",
            "/ui/login?next=/ui",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui", "{bad}");
        }
        assert_eq!(safe_next(None), "/ui");
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; warren_session=abc; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
