//! The REST client the consumer stage pushes batches with: every row of DESIGN §3's table.
//!
//! - `200`: one result per change, handed back in order.
//! - `400`/`413`/`422` for the whole batch: the batch is bisected until the change(s) central
//!   refuses are alone; those come back as [`Verdict::Invalid`], the rest are delivered.
//! - `401`/`403`: a credential problem. The sink is marked unhealthy and the same batch is
//!   retried slowly; nothing is dead-lettered for it.
//! - `408`/`429`/`5xx`/timeouts/connection errors: retried with capped exponential backoff
//!   and full jitter, honouring `Retry-After`. A `429` with `Retry-After` is pacing: that
//!   request waits as told, and it does not count as a failure. A circuit breaker shared by
//!   every warehouse and lane opens when at least half of the last 40 requests failed, or the
//!   last 10 in a row (and at least `breaker_threshold` failures): while it is open no request
//!   is made (consumption pauses), then one request probes (half-open) whether central is
//!   back; a lone failure among many successes never pauses delivery.
//! - Every request: within the adaptive limit of requests in the air, and sent a second
//!   time when it is stuck (see [`air`]).
//! - A central that refuses *everything* (a gateway's body limit, a WAF, a bad deploy
//!   answering 400/413/422 to every request) is down, not a source of bad data: when a batch
//!   and both its halves are refused with the same status and body, or most of a
//!   warehouse's latest answers are refused single changes, that warehouse's delivery
//!   pauses ([`CentralClient::refusing`] says why), probes slowly, and resumes by itself
//!   once central accepts a request again. Only changes central refuses while it accepts
//!   others are dead-lettered.

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
use super::air::{self, InAir};
use super::{BatchResponse, ChangeResult, Outgoing};

/// The central client's knobs.
#[derive(Debug, Clone, Copy)]
pub struct CentralSettings {
    /// Whole-request timeout.
    pub request_timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait between retries.
    pub max_backoff: Duration,
    /// Failures among the latest requests (at least this many, and half of them) that open
    /// the circuit breaker.
    pub breaker_threshold: u32,
    /// How long the breaker stays open before one request may try again.
    pub breaker_cooldown: Duration,
    /// While it stays open, the wait after a failed trial request before the next one.
    pub breaker_probe_interval: Duration,
    /// Wait between retries while central refuses our credentials (401/403).
    pub credential_retry: Duration,
    /// Most requests of [`air::SMALL`] changes or more in the air at once (the limit adapts
    /// below it: see [`air`]).
    pub max_in_flight_requests: usize,
}

impl Default for CentralSettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(2),
            breaker_probe_interval: Duration::from_millis(250),
            credential_retry: Duration::from_secs(30),
            max_in_flight_requests: 64,
        }
    }
}

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
        /// A 429 with `Retry-After`: central paces us; not a failure.
        pacing: bool,
    },
}

struct Breaker {
    state: std::sync::Mutex<BreakerState>,
}

/// Requests the breaker looks back on: it opens when at least half of them failed. (With 20,
/// a central failing 15 % of the requests opened it now and then by chance alone, as 128
/// requests in flight fill a window in a moment: P(Bin(20, 0.17) ≥ 10) ≈ 5e-4 per answer;
/// with 40 it is ≈ 1e-5.)
const BREAKER_WINDOW: usize = 40;
/// This many failures in a row open it at once (central refusing every connection).
const BREAKER_MIN_VOLUME: usize = 10;

/// The circuit breaker's state: the outcomes of the latest requests (`true`: failed), and
/// whether it is open or probing.
#[derive(Debug, Default)]
struct BreakerState {
    window: std::collections::VecDeque<bool>,
    open_until: Option<Instant>,
    /// Half-open: the probe request is out; everyone else waits for its outcome.
    probing: bool,
    /// Probes that failed since it opened (for the log).
    failed_probes: u64,
}

/// What a request may do, as the breaker says.
#[derive(Debug, PartialEq, Eq)]
enum Gate {
    /// Go.
    Pass,
    /// Go, as the half-open probe.
    Probe,
    /// Wait until then (open), or a little (a probe is out).
    Wait(Instant),
}

impl BreakerState {
    fn gate(&mut self, now: Instant) -> Gate {
        match self.open_until {
            Some(t) if t > now => Gate::Wait(t),
            Some(_) if self.probing => Gate::Wait(now + Duration::from_millis(50)),
            Some(_) => {
                self.probing = true;
                Gate::Probe
            }
            None => Gate::Pass,
        }
    }

    /// Records an outcome; true when this one opened the breaker.
    ///
    /// Once open it waits `breaker_cooldown` (central gets a pause from the full load), then
    /// tries one request every `breaker_probe_interval`: one request at a time costs central
    /// next to nothing, and the first that succeeds lets every lane go, so catching up
    /// starts within an interval of central's return, not a cooldown.
    fn record(
        &mut self,
        failed: bool,
        probe: bool,
        settings: &CentralSettings,
        now: Instant,
    ) -> bool {
        if probe {
            self.probing = false;
            if failed {
                self.failed_probes += 1;
                self.open_until = Some(now + settings.breaker_probe_interval);
            } else {
                *self = BreakerState::default();
            }
            return false;
        }
        if self.open_until.is_some() {
            // Answers of requests sent before it opened: the probe decides.
            return false;
        }
        self.window.push_back(failed);
        if self.window.len() > BREAKER_WINDOW {
            self.window.pop_front();
        }
        let failures = self.window.iter().filter(|f| **f).count();
        let in_a_row = self.window.iter().rev().take_while(|f| **f).count();
        let open = failures >= settings.breaker_threshold as usize
            && (in_a_row >= BREAKER_MIN_VOLUME
                || (self.window.len() == BREAKER_WINDOW && failures * 2 >= BREAKER_WINDOW));
        if open {
            self.open_until = Some(now + settings.breaker_cooldown);
            self.window.clear();
        }
        open
    }
}

/// Answers the refusal watch looks back on per warehouse: an accepted request, or a single
/// change refused. More than half of them refused means central refuses everything.
const REFUSAL_WINDOW: usize = 20;

/// Tries of one page of central's listing before a verify gives up on it.
pub const LIST_ATTEMPTS: u32 = 8;

/// Why a page of central's listing was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// Central has no listing (`404`): what it cannot list cannot be verified.
    #[error("{0}")]
    NotListed(String),
    /// Central refused or failed, after retries.
    #[error("{0}")]
    Refused(String),
    /// The caller stopped.
    #[error("cancelled")]
    Cancelled,
}

/// A path segment, percent-encoded (a warehouse id is free text).
fn urlencoding_path(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
/// While central refuses everything, the first wait before a part is sent again; it doubles
/// up to [`REFUSAL_PROBE_MAX`].
const REFUSAL_PROBE: Duration = Duration::from_millis(500);
/// The longest wait between two tries while central refuses everything.
const REFUSAL_PROBE_MAX: Duration = Duration::from_secs(8);

/// What one warehouse's latest answers say of refusals.
#[derive(Debug, Default)]
struct Refusals {
    /// `true`: a single change refused; `false`: a request accepted.
    latest: std::collections::VecDeque<bool>,
    /// Since when central refuses everything, and what it answers.
    outage: Option<(Instant, u16, String)>,
}

/// A pooled HTTP client for one central endpoint.
pub struct CentralClient {
    http: reqwest::Client,
    endpoint: String,
    settings: CentralSettings,
    breaker: Breaker,
    air: Arc<InAir>,
    healthy: AtomicBool,
    /// Per warehouse: whether central refuses everything (see the module's doc).
    refusals: std::sync::Mutex<std::collections::HashMap<String, Refusals>>,
}

/// A refused part's split: the part, where its verdicts start, central's refusal of it,
/// and whether its left half was refused alike.
struct Split<'c, 'a> {
    whole: &'c [Outgoing<'a>],
    at: usize,
    status: u16,
    message: String,
    left_alike: bool,
}

/// Which half of which split a part is.
#[derive(Clone, Copy)]
enum Half {
    Left(usize),
    Right(usize),
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
        // Built once, not per request (configuration refuses a token no header can carry).
        if let Some(t) = &token
            && let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", t.expose_secret()))
        {
            v.set_sensitive(true);
            builder = builder
                .default_headers(reqwest::header::HeaderMap::from_iter([(AUTHORIZATION, v)]));
        }
        Ok(Self {
            http: builder.build()?,
            endpoint: endpoint.as_str().trim_end_matches('/').to_string(),
            settings,
            breaker: Breaker {
                state: std::sync::Mutex::new(BreakerState::default()),
            },
            air: Arc::new(InAir::new(settings.max_in_flight_requests)),
            healthy: AtomicBool::new(true),
            refusals: Default::default(),
        })
    }

    /// Why delivery of `warehouse_id` is paused because central refuses every request, if
    /// it is: since when, and what central answers.
    pub fn refusing(&self, warehouse_id: &str) -> Option<String> {
        let all = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let (since, status, message) = all.get(warehouse_id)?.outage.as_ref()?;
        Some(format!(
            "central refuses every request (HTTP {status}: {message}) for {} s: delivery is paused and retried, nothing is dead-lettered meanwhile; check the gateway in front of central or central itself",
            since.elapsed().as_secs()
        ))
    }

    /// Notes an answer of central for `warehouse_id` (`refused`: a single change refused),
    /// and says whether central now counts as refusing everything.
    fn note_answer(&self, warehouse_id: &str, refused: Option<(u16, &str)>) -> bool {
        let mut all = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let r = all.entry(warehouse_id.to_string()).or_default();
        r.latest.push_back(refused.is_some());
        if r.latest.len() > REFUSAL_WINDOW {
            r.latest.pop_front();
        }
        match refused {
            None => {
                if let Some((since, ..)) = r.outage.take() {
                    tracing::warn!(warehouse = %warehouse_id, refused_for_s = since.elapsed().as_secs(), "central accepts changes again: delivery resumes");
                    crate::metrics::metrics()
                        .central_refusing
                        .with_label_values(&[warehouse_id])
                        .set(0);
                }
                false
            }
            Some((status, message)) => {
                let most = r.latest.iter().filter(|&&x| x).count() * 2 > REFUSAL_WINDOW;
                if most && r.outage.is_none() {
                    drop(all);
                    self.enter_outage(
                        warehouse_id,
                        status,
                        message,
                        "most of the latest answers refused single changes",
                    );
                    return true;
                }
                r.outage.is_some()
            }
        }
    }

    /// Whether central counts as refusing everything for `warehouse_id`.
    fn in_outage(&self, warehouse_id: &str) -> bool {
        let all = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        all.get(warehouse_id).is_some_and(|r| r.outage.is_some())
    }

    fn enter_outage(&self, warehouse_id: &str, status: u16, message: &str, why: &str) {
        let mut all = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let r = all.entry(warehouse_id.to_string()).or_default();
        if r.outage.is_none() {
            tracing::error!(warehouse = %warehouse_id, status, message = %message, why, "central refuses every request: delivery of this warehouse pauses and is retried until central accepts changes again; nothing is dead-lettered meanwhile");
            crate::metrics::metrics()
                .central_refusing
                .with_label_values(&[warehouse_id])
                .set(1);
            r.outage = Some((Instant::now(), status, message.to_string()));
        }
    }

    /// Whether a request could take a slot in the air now (see [`InAir::room`]).
    pub fn has_room(&self) -> bool {
        self.air.has_room()
    }

    /// Waits until a request could take a slot in the air (see [`InAir::room`]).
    pub async fn room(&self) {
        self.air.room().await
    }

    /// False while central refuses our credentials or the breaker is open.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Delivers `changes` (one warehouse's, in source order) until each has a verdict;
    /// retries whatever can be retried, for as long as it takes, until `cancel`.
    ///
    /// A refused request is bisected until the changes central refuses are alone, unless
    /// central refuses everything (see the module's doc): then the part waits and goes again,
    /// whole, and what the bisection had found is forgotten (verdicts are only handed back
    /// at the end, so nothing of it was recorded).
    pub async fn deliver(
        &self,
        warehouse_id: &str,
        changes: &[Outgoing<'_>],
        cancel: &CancellationToken,
    ) -> Result<Vec<Verdict>, Cancelled> {
        // Bisection, depth first and left to right, keeps source order: a part's verdicts
        // start at `out.len()` when it is taken from the stack.
        let mut out = Vec::with_capacity(changes.len());
        let mut splits: Vec<Split<'_, '_>> = Vec::new();
        let mut stack: Vec<(&[Outgoing<'_>], Option<Half>)> = vec![(changes, None)];
        let mut paused: u32 = 0;
        while let Some((part, half)) = stack.pop() {
            let (status, message) =
                match self.send_until_answered(warehouse_id, part, cancel).await? {
                    Answer::Results(r) => {
                        self.note_answer(warehouse_id, None);
                        paused = 0;
                        out.extend(r.into_iter().map(Verdict::Result));
                        continue;
                    }
                    Answer::Invalid { status, message } => (status, message),
                };
            // Refused alike: the half of a part refused with the same status and body.
            let alike = |i: usize| splits[i].status == status && splits[i].message == message;
            let mut outage = self.in_outage(warehouse_id);
            match half {
                Some(Half::Left(i)) if alike(i) => splits[i].left_alike = true,
                Some(Half::Right(i)) if alike(i) && splits[i].left_alike && !outage => {
                    self.enter_outage(
                        warehouse_id,
                        status,
                        &message,
                        "a batch and both its halves were refused alike",
                    );
                    outage = true;
                    // The whole part goes again; what its left half came to is forgotten.
                    let split = &splits[i];
                    out.truncate(split.at);
                    stack.push((split.whole, None));
                    self.pause_refused(&mut paused, cancel).await?;
                    continue;
                }
                _ => {}
            }
            if outage {
                stack.push((part, None));
                self.pause_refused(&mut paused, cancel).await?;
                continue;
            }
            if part.len() == 1 {
                if self.note_answer(warehouse_id, Some((status, &message))) {
                    stack.push((part, None));
                    self.pause_refused(&mut paused, cancel).await?;
                    continue;
                }
                tracing::warn!(warehouse = %warehouse_id, status, version = %part[0].version, message = %message, "central refuses this change");
                out.push(Verdict::Invalid { status, message });
                continue;
            }
            tracing::info!(warehouse = %warehouse_id, status, changes = part.len(), message = %message, "central refused the batch; bisecting");
            let (left, right) = part.split_at(part.len() / 2);
            splits.push(Split {
                whole: part,
                at: out.len(),
                status,
                message,
                left_alike: false,
            });
            let i = splits.len() - 1;
            stack.push((right, Some(Half::Right(i))));
            stack.push((left, Some(Half::Left(i))));
        }
        Ok(out)
    }

    /// While central refuses everything: waits before a part goes again, longer each time
    /// (up to [`REFUSAL_PROBE_MAX`]).
    async fn pause_refused(
        &self,
        paused: &mut u32,
        cancel: &CancellationToken,
    ) -> Result<(), Cancelled> {
        let wait = REFUSAL_PROBE
            .saturating_mul(1 << (*paused).min(8))
            .min(REFUSAL_PROBE_MAX);
        *paused += 1;
        tokio::select! {
            _ = tokio::time::sleep(wait) => Ok(()),
            _ = cancel.cancelled() => Err(Cancelled),
        }
    }

    async fn send_until_answered(
        &self,
        warehouse_id: &str,
        changes: &[Outgoing<'_>],
        cancel: &CancellationToken,
    ) -> Result<Answer, Cancelled> {
        let idempotency_key = super::batch_id_of(warehouse_id, changes);
        let body = bytes::Bytes::from(super::request_body(warehouse_id, &idempotency_key, changes));
        // Failed attempts (they lengthen the backoff), paced ones (429s with `Retry-After`:
        // their own backoff), and every try (for the log).
        let mut attempt: u32 = 0;
        let mut paced: u32 = 0;
        let mut tries: u32 = 0;
        let first_try = Instant::now();
        // A try whose stand-in failed while it went unanswered (a slow answer): it may still
        // bring the results while the next tries go.
        let mut earlier: Option<Pending<'_>> = None;
        loop {
            let probe = self.wait_for_breaker(cancel).await?;
            let raced = tokio::select! {
                r = racing(self.post_hedged(warehouse_id, &idempotency_key, &body, changes.len()), &mut earlier) => r,
                _ = cancel.cancelled() => {
                    if probe {
                        self.record(false, true, None);
                    }
                    return Err(Cancelled);
                }
            };
            let (result, unanswered) = match raced {
                Ok(pair) => pair,
                Err(results) => {
                    self.record(false, probe, None);
                    tracing::debug!(warehouse = %warehouse_id, tries = tries + 1, since_first_try_ms = first_try.elapsed().as_millis() as u64, changes = changes.len(), "central answered after retries (an earlier try)");
                    return Ok(Answer::Results(results));
                }
            };
            // The older one started first, and is likelier to answer first.
            earlier = earlier.or(unanswered);
            let wait = match result {
                Attempt::Results(r) => {
                    self.record(false, probe, None);
                    if tries > 0 {
                        tracing::debug!(warehouse = %warehouse_id, tries = tries + 1, since_first_try_ms = first_try.elapsed().as_millis() as u64, changes = changes.len(), "central answered after retries");
                    }
                    return Ok(Answer::Results(r));
                }
                Attempt::Invalid { status, message } => {
                    self.record(false, probe, None);
                    return Ok(Answer::Invalid { status, message });
                }
                Attempt::Credentials { status } => {
                    if probe {
                        self.record(false, true, None);
                    }
                    self.healthy.store(false, Ordering::Relaxed);
                    tracing::error!(warehouse = %warehouse_id, status, retry_in_s = self.settings.credential_retry.as_secs(), "central refuses our credentials (check WAREHOUSE_API_TOKEN); pushing stops until it accepts them, nothing is dead-lettered");
                    self.settings.credential_retry
                }
                Attempt::Retry {
                    reason,
                    after,
                    pacing,
                } => {
                    tries += 1;
                    let count = if pacing {
                        // Central says when to come back: pacing, not failure, and it does
                        // not lengthen the backoff of failures.
                        if probe {
                            self.record(false, true, None);
                        }
                        paced += 1;
                        paced
                    } else {
                        attempt += 1;
                        self.record(true, probe, Some(&reason));
                        attempt
                    };
                    // While the breaker is open it paces every lane (one probe, then all at
                    // once when central answers again): a lane's own backoff would keep it
                    // waiting, up to max_backoff, after central is back.
                    let backoff = if self.breaker_open() {
                        Duration::ZERO
                    } else {
                        self.backoff(count)
                    };
                    // A `Retry-After` is waited for as told, but no less than the backoff:
                    // one of 0 s (or a date already past) on every answer would otherwise be
                    // a busy loop (measured: 9,891 requests in 3 s).
                    let wait = after.map_or(backoff, |after| after.max(backoff));
                    tracing::warn!(warehouse = %warehouse_id, attempt = tries, reason = %reason, retry_in_ms = wait.as_millis() as u64, "central request failed; retrying");
                    wait
                }
            };
            tokio::select! {
                r = racing(tokio::time::sleep(wait), &mut earlier) => {
                    if let Err(results) = r {
                        tracing::debug!(warehouse = %warehouse_id, tries = tries + 1, since_first_try_ms = first_try.elapsed().as_millis() as u64, changes = changes.len(), "central answered after retries (an earlier try)");
                        return Ok(Answer::Results(results));
                    }
                }
                _ = cancel.cancelled() => return Err(Cancelled),
            }
        }
    }

    /// One page of central's listing of `warehouse_id`'s `entity` (DESIGN §3): the rows
    /// after the key whose canonical JSON is `after`, at most `limit`. Retries what can be
    /// retried ([`LIST_ATTEMPTS`] times, with backoff); a central without the listing (`404`)
    /// is [`ListError::NotListed`], never an empty page.
    pub async fn list_entities(
        &self,
        warehouse_id: &str,
        entity: super::Entity,
        after: Option<&str>,
        limit: usize,
        cancel: &CancellationToken,
    ) -> Result<super::EntityPage, ListError> {
        let url = format!(
            "{}/{}/entities",
            self.endpoint,
            urlencoding_path(warehouse_id)
        );
        let url = {
            let mut u = url::Url::parse(&url)
                .map_err(|e| ListError::Refused(format!("listing URL {url}: {e}")))?;
            u.query_pairs_mut()
                .append_pair("entity", entity.as_str())
                .append_pair("limit", &limit.to_string());
            if let Some(a) = after {
                u.query_pairs_mut().append_pair("after", a);
            }
            u
        };
        let mut last = String::new();
        for attempt in 0..LIST_ATTEMPTS {
            if attempt > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(self.backoff(attempt).max(Duration::from_millis(100))) => {}
                    _ = cancel.cancelled() => return Err(ListError::Cancelled),
                }
            }
            let sent = tokio::select! {
                r = self.http.get(url.clone()).send() => r,
                _ = cancel.cancelled() => return Err(ListError::Cancelled),
            };
            let r = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = format!("no answer: {e}");
                    continue;
                }
            };
            let status = r.status();
            let body = r.bytes().await.unwrap_or_default();
            let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            match status {
                StatusCode::OK => {
                    return serde_json::from_slice(&body).map_err(|e| {
                        ListError::Refused(format!(
                            "central's listing is not the contract's JSON ({e}): {}",
                            text()
                        ))
                    });
                }
                StatusCode::NOT_FOUND
                | StatusCode::METHOD_NOT_ALLOWED
                | StatusCode::NOT_IMPLEMENTED => {
                    return Err(ListError::NotListed(format!(
                        "GET {url} answered {status}: this central does not list its entities (DESIGN §3's optional listing)"
                    )));
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(ListError::Refused(format!(
                        "central refuses our credentials for its listing ({status}): check WAREHOUSE_API_TOKEN"
                    )));
                }
                s if s.is_server_error()
                    || s == StatusCode::TOO_MANY_REQUESTS
                    || s == StatusCode::REQUEST_TIMEOUT =>
                {
                    last = format!("{status}: {}", text());
                }
                _ => {
                    return Err(ListError::Refused(format!(
                        "central refused the listing ({status}): {}",
                        text()
                    )));
                }
            }
        }
        Err(ListError::Refused(format!(
            "central's listing failed {LIST_ATTEMPTS} times; the last: {last}"
        )))
    }

    /// Full jitter: a uniform wait in [0, min(cap, 50 ms × 2^attempt)].
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = Duration::from_millis(50).saturating_mul(1 << attempt.min(16));
        let cap = exp.min(self.settings.max_backoff);
        cap.mul_f64(rand::random::<f64>())
    }

    /// Posts a request within the limit of requests in the air; one slow or stuck at central
    /// of its own (see [`air`]) gives its slot up and goes a second time, and the first answer
    /// counts. When that is a failure, the other request is handed back unanswered: the
    /// caller waits and tries again while it may still bring the results (a slow answer after
    /// 2 s need not hold back a retry that a 429's second makes possible). While central is
    /// slow on most requests, a slow one keeps its slot and waits for its answer.
    async fn post_hedged<'a>(
        &'a self,
        warehouse_id: &'a str,
        idempotency_key: &'a str,
        body: &bytes::Bytes,
        expected: usize,
    ) -> (Attempt, Option<Pending<'a>>) {
        let mut slot = self.air.acquire(expected).await;
        let started = Instant::now();
        let mut first: Pending<'a> =
            Box::pin(self.post(warehouse_id, idempotency_key, body.clone(), expected));
        let slow = self.air.slow_after();
        let stuck = self.air.stuck_after().max(slow);
        tokio::select! {
            r = &mut first => {
                self.air.answered_quickly();
                self.learn(&slot, &r, expected, started.elapsed());
                return (r, None);
            }
            _ = tokio::time::sleep(slow) => {}
        }
        let mut alone = slot.went_slow();
        let mut wait = stuck - slow;
        loop {
            tokio::select! {
                r = &mut first => {
                    // Of one that kept its slot, central's slowness teaches the limit.
                    self.learn(&slot, &r, expected, started.elapsed());
                    return (r, None);
                }
                _ = tokio::time::sleep(wait) => {}
            }
            // Stuck. While central is slow on most requests it waits on; once others answer
            // quickly again (a stuck node of central), it gives its slot up and goes again.
            alone = alone || slot.still_slow_alone();
            if alone {
                break;
            }
            wait = stuck;
        }
        // The second goes without a slot: it stands in for the stuck one, whose slot went to
        // the next request (waiting behind every queued request, it would go last). It needs
        // a place, though: the configured most holds for second tries too.
        let place = tokio::select! {
            r = &mut first => {
                self.learn(&slot, &r, expected, started.elapsed());
                return (r, None);
            }
            place = self.air.acquire_place(expected) => place,
        };
        crate::metrics::metrics()
            .central_hedged
            .with_label_values(&[warehouse_id])
            .inc();
        tracing::debug!(warehouse = %warehouse_id, after_ms = started.elapsed().as_millis() as u64, changes = expected, "no answer yet; sending the request a second time");
        let again = Instant::now();
        let mut second: Pending<'a> =
            Box::pin(self.post(warehouse_id, idempotency_key, body.clone(), expected));
        let (r, other, its_place) = tokio::select! {
            r = &mut first => (r, second, place),
            r = &mut second => {
                self.learn(&place, &r, expected, again.elapsed());
                (r, first, slot)
            }
        };
        match r {
            // The other one stays in the air, and holds its place until it ends.
            Attempt::Retry { .. } => (
                r,
                Some(Box::pin(async move {
                    let _place = its_place;
                    other.await
                })),
            ),
            r => (r, None),
        }
    }

    /// Tells the limit of requests in the air how long central's results took.
    fn learn(&self, slot: &air::Slot, attempt: &Attempt, changes: usize, took: Duration) {
        if matches!(attempt, Attempt::Results(_)) {
            self.air.answered(slot, changes, took);
        }
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
        // In the air until its answer, or its end (a timeout, a cancellation).
        let _unanswered = crate::metrics::Held::new(
            m.central_changes_in_air.with_label_values(&[warehouse_id]),
            expected,
        );
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
        let req = self
            .http
            .post(&url)
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", idempotency_key)
            .body(body);
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
                    pacing: false,
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
                            pacing: false,
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
                            pacing: false,
                        }
                    }
                    Err(e) => {
                        retry();
                        Attempt::Retry {
                            reason: format!("central's answer is not a result list: {e}"),
                            after: None,
                            pacing: false,
                        }
                    }
                }
            }
            // 413: a request too large for central; bisected like a refused batch, so only
            // a change too large on its own is given up (dead-lettered as too_large).
            StatusCode::BAD_REQUEST
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNPROCESSABLE_ENTITY => {
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
                    pacing: s == StatusCode::TOO_MANY_REQUESTS && retry_after.is_some(),
                    after: retry_after,
                }
            }
        }
    }

    /// Whether the breaker is open (or probing).
    fn breaker_open(&self) -> bool {
        let s = self.breaker.state.lock().unwrap_or_else(|p| p.into_inner());
        s.open_until.is_some()
    }

    /// Waits until the breaker lets a request go; true when it goes as the half-open probe.
    async fn wait_for_breaker(&self, cancel: &CancellationToken) -> Result<bool, Cancelled> {
        loop {
            let gate = {
                let mut s = self.breaker.state.lock().unwrap_or_else(|p| p.into_inner());
                s.gate(Instant::now())
            };
            match gate {
                Gate::Pass => return Ok(false),
                Gate::Probe => return Ok(true),
                Gate::Wait(t) => tokio::select! {
                    _ = tokio::time::sleep_until(t) => {}
                    _ = cancel.cancelled() => return Err(Cancelled),
                },
            }
        }
    }

    /// Records a request's outcome with the breaker (`failure`: why it failed).
    fn record(&self, failed: bool, probe: bool, failure: Option<&str>) {
        let mut s = self.breaker.state.lock().unwrap_or_else(|p| p.into_inner());
        let was_open = s.open_until.is_some();
        let opened = s.record(failed, probe, &self.settings, Instant::now());
        if probe && failed {
            // Said in the same words, so that "circuit breaker open" in the log reads true
            // for as long as it is; the 1st, 2nd, 4th, 8th… failed probe, as they come often.
            let failed_probes = s.failed_probes;
            let retry_in_ms = self.settings.breaker_probe_interval.as_millis() as u64;
            if failed_probes.is_power_of_two() {
                tracing::info!(
                    reason = failure.unwrap_or_default(),
                    failed_probes,
                    retry_in_ms,
                    "the probe request failed; circuit breaker open again, consumption paused"
                );
            } else {
                tracing::debug!(
                    reason = failure.unwrap_or_default(),
                    failed_probes,
                    retry_in_ms,
                    "the probe request failed; circuit breaker open again, consumption paused"
                );
            }
        }
        if opened {
            crate::metrics::metrics()
                .breaker_opened
                .with_label_values(&[] as &[&str])
                .inc();
            tracing::warn!(
                reason = failure.unwrap_or_default(),
                pause_ms = self.settings.breaker_cooldown.as_millis() as u64,
                "central keeps failing (half of the latest requests or more); circuit breaker open, consumption paused"
            );
        }
        if s.open_until.is_some() {
            self.healthy.store(false, Ordering::Relaxed);
        } else if !failed {
            if was_open {
                tracing::info!("central answers again; circuit breaker closed");
            }
            self.healthy.store(true, Ordering::Relaxed);
        }
    }
}

/// A settled answer for one request.
enum Answer {
    Results(Vec<ChangeResult>),
    Invalid { status: u16, message: String },
}

/// A try of a request still unanswered.
type Pending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Attempt> + Send + 'a>>;

/// Runs `next` while `earlier` (a try still unanswered) may still answer: results from it
/// win (`Err`); a failure of it only ends it.
async fn racing<T>(
    next: impl std::future::Future<Output = T>,
    earlier: &mut Option<Pending<'_>>,
) -> Result<T, Vec<ChangeResult>> {
    tokio::pin!(next);
    loop {
        let Some(e) = earlier.as_mut() else {
            return Ok(next.await);
        };
        tokio::select! {
            t = &mut next => return Ok(t),
            r = e => {
                *earlier = None;
                if let Attempt::Results(r) = r {
                    return Err(r);
                }
            }
        }
    }
}

/// `Retry-After` in seconds (an HTTP date is ignored: the backoff applies), at most 10 min.
/// A `Retry-After` value (RFC 9110 §10.2.3: seconds, or an HTTP-date), at most ten minutes.
fn parse_retry_after(v: &str) -> Option<Duration> {
    retry_after_at(v, std::time::SystemTime::now())
}

/// [`parse_retry_after`] as of `now`.
fn retry_after_at(v: &str, now: std::time::SystemTime) -> Option<Duration> {
    const MOST: Duration = Duration::from_secs(600);
    let v = v.trim();
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MOST))
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{BreakerState, CentralSettings, Gate};
    use std::time::Duration;
    use tokio::time::Instant;

    const COOLDOWN: Duration = Duration::from_secs(10);
    const PROBE_INTERVAL: Duration = Duration::from_secs(1);
    const SETTINGS: CentralSettings = CentralSettings {
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        max_backoff: Duration::from_secs(30),
        breaker_threshold: 5,
        breaker_cooldown: COOLDOWN,
        breaker_probe_interval: PROBE_INTERVAL,
        credential_retry: Duration::from_secs(30),
        max_in_flight_requests: 64,
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_goes_while_a_slow_try_is_unanswered_after_its_stand_in_failed() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        // The first try is answered only after 5 s, its stand-in (the hedge) fails at once,
        // the retry after it is answered at once: the retry's results count, not the slow
        // answer's (waiting for that held a request's changes for all of its 5 s).
        let tries = Arc::new(AtomicUsize::new(0));
        let counted = tries.clone();
        let app = axum::Router::new().route(
            "/api/warehouse/{w}/changes",
            axum::routing::post(move || {
                let tries = counted.clone();
                async move {
                    let answer = |reason: &str| {
                        axum::Json(serde_json::json!({"results": [{"status": "applied", "reason": reason}]}))
                    };
                    match tries.fetch_add(1, Ordering::SeqCst) {
                        0 => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            Ok(answer("the slow first try"))
                        }
                        1 => Err(axum::http::StatusCode::SERVICE_UNAVAILABLE),
                        _ => Ok(answer("the retry")),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let endpoint = url::Url::parse(&format!("http://{addr}/api/warehouse")).unwrap();
        let client = super::CentralClient::new(&endpoint, None, SETTINGS).unwrap();
        let json = br#"{"entity":"product","op":"upsert","key":{"sku":"SKU-1"},"data":{"name":"one"},"version":"0000000000000001:00000000","source":{"table":"public.products","lsn":"0/1","committed_at":"2026-12-04T00:00:00.000000Z","snapshot":false}}"#;
        let changes = [crate::central::Outgoing {
            version: "0000000000000001:00000000",
            json,
        }];
        let cancel = tokio_util::sync::CancellationToken::new();
        let verdicts = client.deliver("wh", &changes, &cancel).await.unwrap();
        match &verdicts[..] {
            [super::Verdict::Result(r)] => {
                assert_eq!(r.reason.as_deref(), Some("the retry"), "{verdicts:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(tries.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_quarter_of_failures_never_opens_the_breaker() {
        let mut b = BreakerState::default();
        let now = Instant::now();
        for i in 0..1000 {
            assert!(!b.record(i % 4 == 0, false, &SETTINGS, now), "request {i}");
            assert_eq!(b.gate(now), Gate::Pass);
        }
    }

    #[test]
    fn half_the_latest_requests_failing_opens_it_and_one_probe_closes_it() {
        let mut b = BreakerState::default();
        let now = Instant::now();
        // Nine failures in a row among the first requests: not enough to tell yet.
        for _ in 0..9 {
            assert!(!b.record(true, false, &SETTINGS, now));
        }
        // Then every other one fails: half of a full window.
        for i in 0..30 {
            assert!(!b.record(i % 2 == 1, false, &SETTINGS, now), "request {i}");
        }
        assert!(b.record(false, false, &SETTINGS, now), "24 of 40 failed");
        assert_eq!(b.gate(now), Gate::Wait(now + COOLDOWN));
        let later = now + COOLDOWN;
        assert_eq!(b.gate(later), Gate::Probe);
        assert!(
            matches!(b.gate(later), Gate::Wait(_)),
            "one probe at a time"
        );
        b.record(true, true, &SETTINGS, later);
        assert_eq!(
            b.gate(later),
            Gate::Wait(later + PROBE_INTERVAL),
            "a failed probe reopens it until the next probe"
        );
        let after = later + PROBE_INTERVAL;
        assert_eq!(b.gate(after), Gate::Probe);
        b.record(true, true, &SETTINGS, after);
        assert_eq!(b.failed_probes, 2);
        let after = after + PROBE_INTERVAL;
        assert_eq!(b.gate(after), Gate::Probe);
        b.record(false, true, &SETTINGS, after);
        assert_eq!(b.gate(after), Gate::Pass, "a good probe closes it");
        assert!(b.window.is_empty());
    }

    #[test]
    fn every_request_refused_opens_it_after_ten() {
        let mut b = BreakerState::default();
        let now = Instant::now();
        let opened = (0..10)
            .filter(|_| b.record(true, false, &SETTINGS, now))
            .count();
        assert_eq!(opened, 1);
        assert!(matches!(b.gate(now), Gate::Wait(_)));
    }

    use super::*;

    #[test]
    fn retry_after_is_seconds_or_an_http_date_capped_at_ten_minutes() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_792_567_680); // 21 Oct 2026 07:28:00
        let at = |v: &str| retry_after_at(v, now);
        assert_eq!(at("3"), Some(Duration::from_secs(3)));
        assert_eq!(at(" 0 "), Some(Duration::ZERO));
        assert_eq!(at("99999"), Some(Duration::from_secs(600)));
        // RFC 9110 §10.2.3: an HTTP-date (some gateways and CDNs send it) says when.
        assert_eq!(
            at("Wed, 21 Oct 2026 07:28:02 GMT"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            at("Wed, 21 Oct 2026 09:28:00 GMT"),
            Some(Duration::from_secs(600))
        );
        // A moment already past: at once.
        assert_eq!(at("Wed, 21 Oct 2026 07:27:00 GMT"), Some(Duration::ZERO));
        // Neither: no Retry-After (the backoff decides, and the answer counts as a failure).
        assert_eq!(at("soon"), None);
        assert_eq!(at("-1"), None);
        assert_eq!(at("1.5"), None);
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
