//! Several PostgreSQL servers in one URL, as libpq writes them:
//! `postgres://user@h1:5432,h2:5432/warren?target_session_attrs=read-write`.
//!
//! sqlx connects to one host, so Warren picks the writable one itself: at
//! connect it asks each host `pg_is_in_recovery()` and builds the pool on
//! the first primary; a watcher asks the pool's host once a second and,
//! when it is gone or has become a standby, finds the new primary and
//! points the pool's future connections at it
//! ([`sqlx::Pool::set_connect_options`]). A connection is never handed out
//! to a standby: `after_connect` refuses one (see [`connect`](super::connect)).
//! In between, statements fail as unavailable, which a worker retries and
//! the API answers with 503 and Retry-After.

use sea_orm::sqlx::{
    self, Connection as _, PgPool,
    postgres::{PgConnectOptions, PgConnection},
};
use std::time::Duration;

/// What a multi-host URL could not be read as.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostsError {
    #[error("not a postgres:// URL")]
    Scheme,
    #[error("host `{0}` has a port that is not a number")]
    Port(String),
    #[error("no host")]
    NoHost,
    #[error(
        "target_session_attrs={0} is not supported (Warren writes: any, read-write or primary)"
    )]
    SessionAttrs(String),
}

/// The hosts of a database URL and the single-host URL of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts {
    /// One URL per host, in the order given, without `target_session_attrs`
    /// (sqlx does not know it).
    urls: Vec<String>,
    /// Only a primary will do (`target_session_attrs=read-write`).
    pub read_write: bool,
}

impl Hosts {
    pub fn parse(url: &str) -> Result<Hosts, HostsError> {
        let (scheme, rest) = url.split_once("://").ok_or(HostsError::Scheme)?;
        if !matches!(scheme, "postgres" | "postgresql") {
            return Err(HostsError::Scheme);
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hostlist) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
        let (read_write, query) = session_attrs(query)?;
        let mut urls = Vec::new();
        for host in hostlist.split(',').filter(|h| !h.is_empty()) {
            check_port(host)?;
            let user = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{query}")
            };
            urls.push(format!("{scheme}://{user}{host}{path}{query}"));
        }
        if urls.is_empty() {
            return Err(HostsError::NoHost);
        }
        Ok(Hosts { urls, read_write })
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    pub fn is_multi(&self) -> bool {
        self.urls.len() > 1
    }
}

fn check_port(host: &str) -> Result<(), HostsError> {
    // `[::1]:5432`: the port follows the bracket; `h:5432` the colon.
    let after = host.rsplit_once(']').map_or(host, |(_, a)| a);
    match after.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_err() => Err(HostsError::Port(host.to_owned())),
        _ => Ok(()),
    }
}

/// Takes `target_session_attrs` out of a query string: whether it asks for
/// a primary, and the rest of the query.
fn session_attrs(query: &str) -> Result<(bool, String), HostsError> {
    let mut read_write = false;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("target_session_attrs", value)) => match value {
                "any" => read_write = false,
                "read-write" | "primary" => read_write = true,
                other => return Err(HostsError::SessionAttrs(other.to_owned())),
            },
            _ => rest.push(pair),
        }
    }
    Ok((read_write, rest.join("&")))
}

/// Whether a server is a standby (or a primary gone read-only).
pub(crate) async fn is_read_only(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let (ro,): (bool,) = sqlx::query_as(
        "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'",
    )
    .fetch_one(conn)
    .await?;
    Ok(ro)
}

/// The index of the first host that answers and (if asked for) is a
/// primary, trying each in turn from `start`.
pub(crate) async fn find_primary(hosts: &Hosts, start: usize, timeout: Duration) -> Option<usize> {
    let n = hosts.urls.len();
    for i in (0..n).map(|k| (start + k) % n) {
        let Ok(options) = hosts.urls[i].parse::<PgConnectOptions>() else {
            continue;
        };
        let probe = async {
            let mut conn = PgConnection::connect_with(&options).await?;
            let ro = is_read_only(&mut conn).await;
            let _ = conn.close().await;
            ro
        };
        match tokio::time::timeout(timeout, probe).await {
            Ok(Ok(false)) => return Some(i),
            Ok(Ok(true)) if !hosts.read_write => return Some(i),
            Ok(Ok(true)) => tracing::debug!(host = i, "PostgreSQL host is read-only"),
            Ok(Err(e)) => tracing::debug!(host = i, error = %e, "PostgreSQL host unreachable"),
            Err(_) => tracing::debug!(host = i, "PostgreSQL host did not answer in time"),
        }
    }
    None
}

/// How often the watcher asks whether the pool's host is still the primary.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Keeps `pool` pointed at the primary until the pool is closed.
pub(crate) async fn watch(pool: PgPool, hosts: Hosts, mut current: usize, timeout: Duration) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !pool.is_closed() {
        tick.tick().await;
        if still_primary(&pool, hosts.read_write, timeout).await {
            continue;
        }
        let Some(found) = find_primary(&hosts, current + 1, timeout).await else {
            tracing::warn!("no PostgreSQL host is a reachable primary; looking again");
            continue;
        };
        if found != current {
            let Ok(options) = hosts.urls[found].parse::<PgConnectOptions>() else {
                continue;
            };
            let old = pool.connect_options();
            // Keep what sea-orm set (application name, statement logging);
            // only where to connect changes.
            let moved = (*old)
                .clone()
                .host(options.get_host())
                .port(options.get_port());
            pool.set_connect_options(moved);
            tracing::warn!(
                from = current,
                to = found,
                "PostgreSQL primary moved; pool follows"
            );
            current = found;
        }
    }
}

/// The pool reaches its host and, if a primary is required, it is one.
async fn still_primary(pool: &PgPool, read_write: bool, timeout: Duration) -> bool {
    let check = async {
        let mut conn = pool.acquire().await?;
        is_read_only(&mut conn).await
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(ro)) => !(ro && read_write),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_is_one_url_unchanged() {
        let h = Hosts::parse("postgres://u:p@db:5432/w?sslmode=disable").unwrap();
        assert_eq!(h.urls(), ["postgres://u:p@db:5432/w?sslmode=disable"]);
        assert!(!h.read_write && !h.is_multi());
    }

    #[test]
    fn several_hosts_become_one_url_each_without_session_attrs() {
        let h = Hosts::parse(
            "postgresql://u:p%40s@a:5491,b:5492,[::1]:5493/w?target_session_attrs=read-write&sslmode=prefer",
        )
        .unwrap();
        assert_eq!(
            h.urls(),
            [
                "postgresql://u:p%40s@a:5491/w?sslmode=prefer",
                "postgresql://u:p%40s@b:5492/w?sslmode=prefer",
                "postgresql://u:p%40s@[::1]:5493/w?sslmode=prefer",
            ]
        );
        assert!(h.read_write && h.is_multi());
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        assert_eq!(Hosts::parse("mysql://a/w"), Err(HostsError::Scheme));
        assert_eq!(Hosts::parse("postgres://u@/w"), Err(HostsError::NoHost));
        assert_eq!(
            Hosts::parse("postgres://a:x,b/w"),
            Err(HostsError::Port("a:x".into()))
        );
        assert_eq!(
            Hosts::parse("postgres://a,b/w?target_session_attrs=standby"),
            Err(HostsError::SessionAttrs("standby".into()))
        );
    }
}
