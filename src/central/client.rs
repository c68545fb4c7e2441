//! The REST client the consumer stage pushes batches with: every row of DESIGN §3's table.
//!
//! - `200`: one result per change, handed back in order.
//! - `400`/`422` for the whole batch: the batch is bisected until the change(s) central
//!   refuses are alone; those come back as [`Verdict::Invalid`], the rest are delivered.
//! - `401`/`403`: a credential problem. The sink is marked unhealthy and the same batch is
//!   retried slowly; nothing is dead-lettered for it.
//! - `408`/`429`/`5xx`/timeouts/connection errors: retried with capped exponential backoff
//!   and full jitter, honouring `Retry-After`. Consecutive failures open a circuit breaker
//!   shared by every warehouse: while it is open no request is made (consumption pauses), then
//!   one request probes whether central is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[cfg(doc)]
use super::ChangeBatch;
use super::{BatchResponse, ChangeResult, Outgoing};
use crate::consumer::settings::CentralSettings;

/// Central's answer for one change.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// A `200` result.
    Result(ChangeResult),
    /// Central refused the change as a request (`400`/`422`, isolated by bisection).
    Invalid {
        /// HTTP status.
        status: u16,
        /// Central's message.
        message: String,
    },
}

/// The client was cancelled before every change had a verdict.
#[derive(Debug, thiserror::Error)]
#[error("cancelled while delivering to central")]
pub struct Cancelled;

/// What one request came to.
enum Attempt {
    Results(Vec<ChangeResult>),
    Invalid {
        status: u16,
        message: String,
    },
    Credentials {
        status: u16,
    },
    Retry {
        reason: String,
        after: Option<Duration>,
    },
}

struct Breaker {
    state: std::sync::Mutex<BreakerState>,
}

#[derive(Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
}

/// A pooled HTTP client for one central endpoint.
pub struct CentralClient {
    http: reqwest::Client,
    endpoint: String,
    token: Option<SecretString>,
    settings: CentralSettings,
    breaker: Breaker,
    healthy: AtomicBool,
}

impl CentralClient {
    /// A client for `endpoint` (the `WAREHOUSE_API_ENDPOINT` base URL).
    pub fn new(
        endpoint: &url::Url,
        token: Option<SecretString>,
        settings: CentralSettings,
    ) -> Result<Self, reqwest::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let mut builder = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("inventorysync/", env!("CARGO_PKG_VERSION")));
        if let Ok(tls) = tls {
            builder = builder.tls_backend_preconfigured(tls);
        }
        Ok(Self {
            http: builder.build()?,
            endpoint: endpoint.as_str().trim_end_matches('/').to_string(),
            token,
            settings,
            breaker: Breaker {
                state: std::sync::Mutex::new(BreakerState::default()),
            },
            healthy: AtomicBool::new(true),
        })
    }

    /// False while central refuses our credentials or the breaker is open.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Delivers `changes` (one warehouse's, in source order) until each has a verdict;
    /// retries whatever can be retried, for as long as it takes, until `cancel`.
    pub async fn deliver(
        &self,
        warehouse_id: &str,
        changes: &[Outgoing<'_>],
        cancel: &CancellationToken,
    ) -> Result<Vec<Verdict>, Cancelled> {
        // Bisection, depth first and left to right, keeps source order.
        let mut out = Vec::with_capacity(changes.len());
        let mut stack = vec![changes];
        while let Some(part) = stack.pop() {
            match self.send_until_answered(warehouse_id, part, cancel).await? {
                Answer::Results(r) => out.extend(r.into_iter().map(Verdict::Result)),
                Answer::Invalid { status, message } if part.len() == 1 => {
                    tracing::warn!(warehouse = %warehouse_id, status, version = %part[0].change.version, message = %message, "central refuses this change");
                    out.push(Verdict::Invalid { status, message });
                }
                Answer::Invalid { status, message } => {
                    tracing::info!(warehouse = %warehouse_id, status, changes = part.len(), message = %message, "central refused the batch; bisecting");
                    let (left, right) = part.split_at(part.len() / 2);
                    stack.push(right);
                    stack.push(left);
                }
            }
        }
        Ok(out)
    }

    async fn send_until_answered(
        &self,
        warehouse_id: &str,
        changes: &[Outgoing<'_>],
        cancel: &CancellationToken,
    ) -> Result<Answer, Cancelled> {
        let idempotency_key = match (changes.first(), changes.last()) {
            (Some(first), Some(last)) => {
                super::batch_id(warehouse_id, &[first.change, last.change])
            }
            _ => super::batch_id(warehouse_id, &[]),
        };
        let body = bytes::Bytes::from(super::request_body(warehouse_id, &idempotency_key, changes));
        let mut attempt: u32 = 0;
        loop {
            self.wait_for_breaker(cancel).await?;
            let result = tokio::select! {
                r = self.post(warehouse_id, &idempotency_key, body.clone(), changes.len()) => r,
                _ = cancel.cancelled() => return Err(Cancelled),
            };
            let wait = match result {
                Attempt::Results(r) => {
                    self.succeeded();
                    return Ok(Answer::Results(r));
                }
                Attempt::Invalid { status, message } => {
                    self.succeeded();
                    return Ok(Answer::Invalid { status, message });
                }
                Attempt::Credentials { status } => {
                    self.healthy.store(false, Ordering::Relaxed);
                    tracing::error!(warehouse = %warehouse_id, status, retry_in_s = self.settings.credential_retry.as_secs(), "central refuses our credentials (check WAREHOUSE_API_TOKEN); pushing stops until it accepts them, nothing is dead-lettered");
                    self.settings.credential_retry
                }
                Attempt::Retry { reason, after } => {
                    attempt += 1;
                    self.failed();
                    let wait = after.unwrap_or_else(|| self.backoff(attempt));
                    tracing::warn!(warehouse = %warehouse_id, attempt, reason = %reason, retry_in_ms = wait.as_millis() as u64, "central request failed; retrying");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return Err(Cancelled),
            }
        }
    }

    /// Full jitter: a uniform wait in [0, min(cap, 200 ms × 2^attempt)].
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = Duration::from_millis(200).saturating_mul(1 << attempt.min(16));
        let cap = exp.min(self.settings.max_backoff);
        cap.mul_f64(rand::random::<f64>())
    }

    async fn post(
        &self,
        warehouse_id: &str,
        idempotency_key: &str,
        body: bytes::Bytes,
        expected: usize,
    ) -> Attempt {
        let m = crate::metrics::metrics();
        m.batch_changes
            .with_label_values(&[warehouse_id])
            .observe(expected as f64);
        let _timer = m
            .central_request_seconds
            .with_label_values(&[warehouse_id])
            .start_timer();
        let retry = || m.central_retries.with_label_values(&[warehouse_id]).inc();
        let answered = |label: &str| {
            m.central_responses
                .with_label_values(&[warehouse_id, label])
                .inc()
        };
        let url = format!("{}/{}/changes", self.endpoint, warehouse_id);
        let mut req = self
            .http
            .post(&url)
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", idempotency_key)
            .body(body);
        if let Some(t) = &self.token
            && let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", t.expose_secret()))
        {
            v.set_sensitive(true);
            req = req.header(AUTHORIZATION, v);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                retry();
                let (kind, label) = if e.is_timeout() {
                    ("timeout", "timeout")
                } else if e.is_connect() {
                    ("connection failed", "connect")
                } else {
                    ("request failed", "error")
                };
                answered(label);
                return Attempt::Retry {
                    reason: format!("{kind}: {}", e.without_url()),
                    after: None,
                };
            }
        };
        let status = resp.status();
        answered(status.as_str());
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        match status {
            s if s.is_success() => {
                let bytes = match resp.bytes().await {
                    Ok(b) => b,
                    Err(e) => {
                        retry();
                        return Attempt::Retry {
                            reason: format!("reading the answer: {}", e.without_url()),
                            after: None,
                        };
                    }
                };
                match crate::json::from_bytes::<BatchResponse>(&bytes) {
                    Ok(r) if r.results.len() == expected => Attempt::Results(r.results),
                    Ok(r) => {
                        retry();
                        Attempt::Retry {
                            reason: format!(
                                "central answered {} results for {expected} changes",
                                r.results.len()
                            ),
                            after: None,
                        }
                    }
                    Err(e) => {
                        retry();
                        Attempt::Retry {
                            reason: format!("central's answer is not a result list: {e}"),
                            after: None,
                        }
                    }
                }
            }
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
                let message = resp.text().await.unwrap_or_default();
                Attempt::Invalid {
                    status: status.as_u16(),
                    message: truncate(&message, 500),
                }
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Attempt::Credentials {
                status: status.as_u16(),
            },
            s => {
                retry();
                let message = resp.text().await.unwrap_or_default();
                Attempt::Retry {
                    reason: format!("HTTP {}: {}", s.as_u16(), truncate(&message, 200)),
                    after: retry_after,
                }
            }
        }
    }

    async fn wait_for_breaker(&self, cancel: &CancellationToken) -> Result<(), Cancelled> {
        loop {
            let open_until = {
                let s = self.breaker.state.lock().unwrap_or_else(|p| p.into_inner());
                s.open_until
            };
            match open_until {
                Some(t) if t > Instant::now() => tokio::select! {
                    _ = tokio::time::sleep_until(t) => {}
                    _ = cancel.cancelled() => return Err(Cancelled),
                },
                _ => return Ok(()),
            }
        }
    }

    fn succeeded(&self) {
        let mut s = self.breaker.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.open_until.is_some() {
            tracing::info!("central answers again; circuit breaker closed");
        }
        *s = BreakerState::default();
        self.healthy.store(true, Ordering::Relaxed);
    }

    fn failed(&self) {
        let mut s = self.breaker.state.lock().unwrap_or_else(|p| p.into_inner());
        s.failures += 1;
        if s.failures >= self.settings.breaker_threshold {
            if s.open_until.is_none_or(|t| t <= Instant::now()) {
                crate::metrics::metrics()
                    .breaker_opened
                    .with_label_values(&[] as &[&str])
                    .inc();
                tracing::warn!(
                    failures = s.failures,
                    pause_s = self.settings.breaker_cooldown.as_secs(),
                    "central keeps failing; circuit breaker open, consumption paused"
                );
            }
            s.open_until = Some(Instant::now() + self.settings.breaker_cooldown);
            self.healthy.store(false, Ordering::Relaxed);
        }
    }
}

/// A settled answer for one request.
enum Answer {
    Results(Vec<ChangeResult>),
    Invalid { status: u16, message: String },
}

/// `Retry-After` in seconds (an HTTP date is ignored: the backoff applies), at most 10 min.
fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(600)))
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_capped_at_ten_minutes() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("99999"), Some(Duration::from_secs(600)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT"), None);
    }

    #[test]
    fn backoff_has_full_jitter_under_the_cap() {
        let url = url::Url::parse("http://127.0.0.1:1/api").expect("url");
        let c = CentralClient::new(&url, None, CentralSettings::default()).expect("client");
        for attempt in 1..40 {
            let d = c.backoff(attempt);
            assert!(d <= Duration::from_secs(30), "{d:?}");
        }
        let early: Vec<Duration> = (0..50).map(|_| c.backoff(1)).collect();
        assert!(early.iter().all(|d| *d <= Duration::from_millis(400)));
        assert!(early.iter().any(|d| *d != early[0]), "jittered");
    }
}
