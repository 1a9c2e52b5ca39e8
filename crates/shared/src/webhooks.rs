//! Completion webhooks: a submission's `?callback_url=` and
//! `?callback_events=`, checked before anything is recorded; the owners'
//! signing secrets; and the sender that POSTs due deliveries.
//!
//! A delivery is a row, written by the `tasks_webhooks` trigger in the
//! transaction that records the task's event, so no outcome is committed
//! without its webhook and none waits in memory. The sender (`run`, in
//! every worker) claims due rows with a lease, POSTs them with Standard
//! Webhooks headers (`webhook-id`, `webhook-timestamp`, `webhook-signature`:
//! HMAC-SHA256 over `id.timestamp.body` with each of the owner's signing
//! secrets), and records each attempt. A failed POST is retried with
//! exponential backoff and jitter until the retry window closes, then the
//! delivery is `failed`; an operator or client can redeliver it. Receivers
//! see a delivery at least once and dedupe by `webhook-id`.
//!
//! Targets are client input: only `https` where configured, no
//! credentials in the URL, and no loopback, private, link-local or other
//! non-public address (SSRF), checked at submission for addresses written
//! in the URL and on every connection for the addresses a name resolves to.
//! Deliveries go straight to their targets (the environment's proxies are
//! ignored) unless `webhooks.proxy_url` names an egress proxy, which then
//! resolves names and answers for what it lets through.

use crate::{
    settings::WebhookSettings,
    store::{AttemptEnd, DeliveryAttempt, DueDelivery, Store},
};
use base64::Engine;
use chrono::Utc;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

/// The events a submission may ask for; `finished` when it names none.
pub const EVENTS: [&str; 3] = ["finished", "failed", "progress"];
/// Longest `callback_url` accepted.
const MAX_URL_LEN: usize = 2048;
/// A claimed delivery stays this sender's for this many times the POST's
/// timeout: room to record the attempt, and soon due again if the sender
/// died mid-POST.
const LEASE_FACTOR: u32 = 2;

/// How many attempts a sender records at once. A receiver answering all
/// of a pass's POSTs together (they were sent together) would otherwise
/// have them all ask the pool for a connection at the same instant, and
/// the tasks' own claims and outcomes waited behind them: a 2 s receiver
/// slowed a drain of 50 ms tasks by 14 %.
const RECORDS_AT_ONCE: usize = 2;
/// Longest error text kept per attempt.
const MAX_ERROR_LEN: usize = 500;

/// A query parameter that was wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {message}")]
pub struct CallbackError {
    pub parameter: &'static str,
    pub message: String,
}

fn refuse(parameter: &'static str, message: impl Into<String>) -> CallbackError {
    CallbackError {
        parameter,
        message: message.into(),
    }
}

/// Checks a submission's callback: the URL as a target and the events as
/// a list of known names. Returns the URL and the events, comma-joined.
pub fn callback(
    url: &str,
    events: Option<&str>,
    settings: &WebhookSettings,
) -> Result<(String, String), CallbackError> {
    check_target(url, settings).map_err(|m| refuse("callback_url", m))?;
    let events = match events {
        None => vec!["finished"],
        Some(list) => {
            let mut named: Vec<&str> = list.split(',').map(str::trim).collect();
            if let Some(bad) = named.iter().find(|e| !EVENTS.contains(e)) {
                return Err(refuse(
                    "callback_events",
                    format!("unknown event {bad:?} (events: {})", EVENTS.join(", ")),
                ));
            }
            named.sort_unstable();
            named.dedup();
            named
        }
    };
    Ok((url.to_owned(), events.join(",")))
}

/// Whether `url` may be POSTed to under `settings`; the reason if not.
pub fn check_target(url: &str, settings: &WebhookSettings) -> Result<reqwest::Url, String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("longer than {MAX_URL_LEN} characters"));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => {}
        "http" if !settings.require_https => {}
        other => return Err(format!("scheme {other:?} is not allowed (https only)")),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("credentials in the URL are not allowed".into());
    }
    let private = match parsed.host() {
        None => return Err("no host".into()),
        Some(url::Host::Ipv4(ip)) => !is_public(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => !is_public(IpAddr::V6(ip)),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    };
    if private && !settings.allow_private_targets {
        return Err("targets on loopback, private or link-local addresses are not allowed".into());
    }
    Ok(parsed)
}

/// An address anyone on the internet could reach: not loopback, private,
/// link-local (cloud metadata), shared (CGNAT), unspecified, broadcast,
/// multicast, documentation or reserved. An IPv4 address inside an IPv6
/// one (mapped, the deprecated compatible form, or 6to4's `2002::/16`) is
/// judged as that IPv4 address: a host that still routes those forms
/// would carry `::127.0.0.1` or `2002:a9fe:a9fe::` to loopback or to the
/// cloud's metadata service.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

/// The IPv4 address an IPv6 address carries for a host to reach, if any.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    if s[0] == 0x2002 {
        let [a, b] = s[1].to_be_bytes();
        let [c, d] = s[2].to_be_bytes();
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    // `to_ipv4` takes `::ffff:a.b.c.d` and `::a.b.c.d` (so `::1` is
    // 0.0.0.1, not public either way).
    ip.to_ipv4()
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated, still routed by some)
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || (first & 0xfff0) == 0x3ff0 // documentation (RFC 9637)
        || first == 0x2001 && ip.segments()[1] < 0x0200 // Teredo, benchmarking, ORCHID and other IETF blocks
        || first == 0x0100 && ip.segments()[1..4] == [0, 0, 0] // discard-only
        || first == 0x0064 && ip.segments()[1] == 0xff9b) // NAT64: an IPv4 inside (well-known and local-use)
}

/// The operating system gave no random bytes.
#[derive(Debug, thiserror::Error)]
#[error("no randomness from the operating system: {0}")]
pub struct NoRandomness(String);

/// A new signing secret in Standard Webhooks' form: `whsec_` and 32
/// random bytes in base64.
pub fn new_secret() -> Result<String, NoRandomness> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| NoRandomness(e.to_string()))?;
    Ok(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    ))
}

/// The `webhook-signature` header: `v1,<base64 HMAC-SHA256>` for each
/// secret, space-separated, over `{id}.{timestamp}.{body}`.
pub fn signature_header(secrets: &[String], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .filter_map(|s| sign(s, id, timestamp, body))
        .map(|sig| format!("v1,{sig}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine.decode(secret.strip_prefix("whsec_")?).ok()?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).ok()?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    Some(engine.encode(mac.finalize().into_bytes()))
}

/// Resolves names for the sender, keeping public addresses only: a name
/// that points at a private address (or is made to, later: DNS
/// rebinding) is never connected to.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let public: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if public.is_empty() {
                return Err(format!("{host} resolves to no public address").into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Why the sender could not start.
#[derive(Debug, thiserror::Error)]
#[error("building the webhook HTTP client: {0}")]
pub struct SenderError(#[from] reqwest::Error);

/// POSTs due deliveries, one pass after another, until shutdown.
pub struct Sender {
    store: Store,
    client: reqwest::Client,
    settings: WebhookSettings,
    backoff: warren_tasks::Policy,
    records: tokio::sync::Semaphore,
}

impl Sender {
    pub fn new(store: Store, settings: WebhookSettings) -> Result<Self, SenderError> {
        let mut client = reqwest::Client::builder()
            .timeout(settings.timeout())
            .redirect(reqwest::redirect::Policy::none())
            .https_only(settings.require_https)
            .user_agent(concat!("warren-webhooks/", env!("CARGO_PKG_VERSION")));
        // The environment's proxies are not ours to follow: through one,
        // the check below would resolve the proxy's name, not the target's.
        client = client.no_proxy();
        match settings.proxy() {
            Some(url) => client = client.proxy(reqwest::Proxy::all(url)?),
            None if !settings.allow_private_targets => {
                client = client.dns_resolver(Arc::new(PublicOnly));
            }
            None => {}
        }
        let backoff = warren_tasks::Policy {
            retry_delay: Duration::from_secs_f64(settings.retry_delay_seconds),
            retry_delay_max: Duration::from_secs_f64(settings.retry_delay_max_seconds),
            ..warren_tasks::Policy::default()
        };
        Ok(Self {
            store,
            client: client.build()?,
            settings,
            backoff,
            records: tokio::sync::Semaphore::new(RECORDS_AT_ONCE),
        })
    }

    /// Runs passes until `shutdown`; a pass that found work is followed
    /// at once by the next, an idle one by a pause.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let busy = match self.pass().await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "webhooks: could not read due deliveries");
                    false
                }
            };
            if !busy {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(self.settings.interval()) => {}
                }
            } else if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Claims what is due (at most `max_in_flight`) and sends it all
    /// concurrently; how many were sent.
    async fn pass(&self) -> Result<usize, crate::store::StoreError> {
        let lease = self.settings.timeout() * LEASE_FACTOR;
        let due = self
            .store
            .claim_due_deliveries(self.settings.max_in_flight, lease)
            .await?;
        if due.is_empty() {
            return Ok(0);
        }
        let mut owners: Vec<String> = due.iter().filter_map(|d| d.owner.clone()).collect();
        owners.sort_unstable();
        owners.dedup();
        let secrets = self.store.signing_secrets(&owners).await?;
        let n = due.len();
        futures_util::stream::iter(due)
            .for_each_concurrent(None, |d| self.attempt(d, &secrets))
            .await;
        Ok(n)
    }

    async fn attempt(&self, d: DueDelivery, secrets: &HashMap<String, Vec<String>>) {
        let started_at = Utc::now();
        let clock = Instant::now();
        let result = self.post(&d, secrets, started_at.timestamp()).await;
        let (status, error) = match &result {
            Ok(status) => (Some(i32::from(*status)), None),
            Err(e) => (
                None,
                Some(crate::codes::bounded(
                    e.chars().take(MAX_ERROR_LEN).collect::<String>(),
                )),
            ),
        };
        let end = match result {
            Ok(s) if (200..300).contains(&s) => AttemptEnd::Delivered,
            Ok(410) => AttemptEnd::GiveUp,
            _ => AttemptEnd::RetryAfter(
                self.backoff
                    .retry_delay_for(u32::try_from(d.attempts).unwrap_or(1), fastrand::f64()),
            ),
        };
        let attempt = DeliveryAttempt {
            delivery_id: d.id,
            attempt: d.attempts,
            started_at,
            duration_ms: i32::try_from(clock.elapsed().as_millis()).unwrap_or(i32::MAX),
            status,
            error,
        };
        let window = Duration::from_secs_f64(self.settings.retry_window_seconds);
        // Never closed; without a permit the record would just not wait.
        let _turn = self.records.acquire().await.ok();
        match self
            .store
            .record_delivery_attempt(&d, &attempt, end, window)
            .await
        {
            Ok(true) => {
                tracing::info!(task_id = %d.task_id, delivery_id = %d.id, attempt = d.attempts,
                status = ?attempt.status, error = ?attempt.error, outcome = ?end, "webhook attempt")
            }
            Ok(false) => tracing::info!(task_id = %d.task_id, delivery_id = %d.id,
                "webhook attempt outlived its lease; another sender has the delivery"),
            Err(e) => tracing::warn!(task_id = %d.task_id, delivery_id = %d.id, error = %e,
                "webhook attempt not recorded; the delivery is sent again when its lease ends"),
        }
    }

    /// One POST; the response status, or why there was none.
    async fn post(
        &self,
        d: &DueDelivery,
        secrets: &HashMap<String, Vec<String>>,
        timestamp: i64,
    ) -> Result<u16, String> {
        // Settings may have tightened since the submission was accepted.
        check_target(&d.url, &self.settings)?;
        let signing = d.owner.as_ref().and_then(|o| secrets.get(o));
        let Some(signing) = signing.filter(|s| !s.is_empty()) else {
            return Err("the owner has no webhook signing secret (POST /webhooks/secrets)".into());
        };
        let body = d.payload.to_string();
        let id = d.id.to_string();
        let response = self
            .client
            .post(&d.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature_header(signing, &id, timestamp, body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        Ok(response.status().as_u16())
    }
}

/// A reqwest error without its URL (a callback URL may carry a token).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_redirect() {
        "redirected (redirects are not followed)"
    } else {
        "request failed"
    };
    let mut text = kind.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> WebhookSettings {
        WebhookSettings {
            enabled: true,
            require_https: true,
            allow_private_targets: false,
            proxy_url: None,
            retry_window_seconds: 60.0,
            retry_delay_seconds: 1.0,
            retry_delay_max_seconds: 10.0,
            timeout_seconds: 5.0,
            max_in_flight: 8,
            interval_ms: 100,
            secret_overlap_seconds: 60.0,
        }
    }

    #[test]
    fn non_public_targets_and_plain_http_are_refused() {
        let s = strict();
        for url in [
            "http://example.com/hook",
            "https://127.0.0.1/hook",
            "https://10.1.2.3/",
            "https://172.16.0.1/",
            "https://192.168.1.1/",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://[::1]/",
            "https://[fd00::1]/",
            "https://[fe80::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::127.0.0.1]/",
            "https://[::a9fe:a9fe]/",
            "https://[2002:7f00:1::1]/",
            "https://[2002:a9fe:a9fe::]/",
            "https://[2002:c0a8:101::]/",
            "https://[fec0::1]/",
            "https://[2001::1]/",
            "https://[2001:2::1]/",
            "https://[100::1]/",
            "https://[3fff::1]/",
            "https://[64:ff9b:1::a00:1]/",
            "https://localhost:8080/",
            "https://api.localhost/",
            "https://user:secret@example.com/",
            "ftp://example.com/",
            "not a url",
        ] {
            assert!(check_target(url, &s).is_err(), "{url} was accepted");
        }
        for url in [
            "https://example.com/hooks?t=1",
            "https://93.184.215.14/",
            "https://[2606:4700::1111]/",
            "https://[2002:5db8:d70e::1]/",
            "https://[2001:4860:4860::8888]/",
            "https://[::5db8:d70e]/",
        ] {
            assert!(check_target(url, &s).is_ok(), "{url} was refused");
        }
        let open = WebhookSettings {
            require_https: false,
            allow_private_targets: true,
            ..strict()
        };
        assert!(check_target("http://127.0.0.1:9/hook", &open).is_ok());
    }

    /// A name is judged by what it resolves to when the sender connects,
    /// whatever it resolved to at submission (DNS rebinding); `localhost`
    /// stands here for a public-looking name pointed at loopback.
    #[tokio::test]
    async fn names_resolving_to_private_addresses_are_never_connected_to() {
        use reqwest::dns::Resolve;
        let Ok(name) = "localhost".parse() else {
            panic!("a valid name")
        };
        let Err(e) = PublicOnly.resolve(name).await else {
            panic!("localhost was connected to")
        };
        assert_eq!(e.to_string(), "localhost resolves to no public address");
    }

    #[test]
    fn events_are_checked_and_default_to_finished() {
        let s = strict();
        let url = "https://example.com/h";
        assert_eq!(callback(url, None, &s), Ok((url.into(), "finished".into())));
        assert_eq!(
            callback(url, Some("progress, failed,progress"), &s),
            Ok((url.into(), "failed,progress".into()))
        );
        let bad = callback(url, Some("finished,done"), &s).unwrap_err();
        assert_eq!(bad.parameter, "callback_events");
        assert_eq!(
            callback("http://x.test/", None, &s).unwrap_err().parameter,
            "callback_url"
        );
    }

    /// The example of the Standard Webhooks specification, verified.
    #[test]
    fn signatures_follow_standard_webhooks() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned();
        let body = br#"{"test": 2432232314}"#;
        let header = signature_header(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(header, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let two = signature_header(
            &[
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
                "whsec_AAAA".into(),
                "nonsense".into(),
            ],
            "m",
            1,
            b"{}",
        );
        assert_eq!(two.split(' ').count(), 2, "{two}");
    }

    #[test]
    fn secrets_are_random_and_in_the_standard_form() {
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        assert!(a.starts_with("whsec_") && a.len() == 6 + 44, "{a}");
        assert_ne!(a, b);
        assert!(sign(&a, "id", 1, b"x").is_some());
    }
}
