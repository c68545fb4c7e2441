//! `inventorysync central`: the reference central inventory server. It implements DESIGN §3
//! (versions per key; `applied`, `duplicate`, `stale`, `rejected`), keeps its state in memory
//! or in Postgres, and takes injected faults (error rate, status codes, latency,
//! `Retry-After`, whole-batch 422s, rejections) so the demo and the tests can show how the
//! engine copes. The real central system belongs to the user; this one is a yardstick.
//!
//! Routes (the engine's `WAREHOUSE_API_ENDPOINT` is `http://host:port/api/warehouse`):
//! - `POST /api/warehouse/{id}/changes` — the contract.
//! - `GET /api/warehouse/{id}/inventory` — the live entities of a warehouse.
//! - `GET|PUT /admin/faults` — read or replace the injected faults.
//! - `GET /admin/stats` — requests and results counted since start (`reordered`: changes that
//!   repeat a key of their request at a version that does not grow), and the latency from
//!   warehouse commit to applied here (p50/p90/p99; `DELETE` clears the samples;
//!   `?latency=false` leaves the percentiles out: a poller that only counts does not sort
//!   the samples each time; `?applied_at_least=N&wait_s=S` answers once N changes are
//!   applied, or after S seconds: a benchmark waits for its end with one request instead
//!   of polling, whose processes took a third of the two cores from the engine measured).
//! - `GET /health`.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::time::parse_rfc3339_utc_micros;

use super::{BatchResponse, ChangeOp, Entity, ResultStatus};

mod store;
use store::Edit;
pub use store::{CentralStore, Stored};

/// Faults the server injects; all off by default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer the listing (`GET …/entities`) with 404, as a central without it does.
    pub no_listing: bool,
    /// Delay before answering each page of the listing, in milliseconds.
    pub listing_latency_ms: u64,
    /// Share of change requests answered with `error_status` (0.0 to 1.0).
    pub error_rate: f64,
    /// The next this-many change requests are answered with `error_status`.
    pub fail_next: u64,
    /// Status of injected errors (default 503).
    pub error_status: Option<u16>,
    /// `Retry-After` seconds sent with injected errors.
    pub retry_after_secs: Option<u64>,
    /// Delay before handling each change request, in milliseconds.
    pub latency_ms: u64,
    /// Delay between applying a request's changes and answering, in milliseconds (a client
    /// that gives up or dies meanwhile will send them again: duplicates).
    pub answer_delay_ms: u64,
    /// A change whose key (as JSON) contains this text is answered `rejected`.
    pub reject_key_substring: Option<String>,
    /// A batch holding a change whose key (as JSON) contains this text is answered 422 as a
    /// whole.
    pub invalid_key_substring: Option<String>,
    /// A batch holding a change whose key (as JSON) contains this text is answered 413 as a
    /// whole (as a central with a request size limit answers a change too large for it).
    pub too_large_key_substring: Option<String>,
    /// Share of change requests answered 429 with `Retry-After: throttle_retry_after_secs`
    /// (pacing, as a real central throttles), besides `error_rate`.
    pub throttle_rate: f64,
    /// `Retry-After` seconds of throttled answers (default 1).
    pub throttle_retry_after_secs: Option<u64>,
    /// Share of change requests handled only after `slow_ms` (a slow answer, not an error).
    pub slow_rate: f64,
    /// Delay of slow answers in milliseconds.
    pub slow_ms: u64,
    /// A request holding a change whose key (as JSON) contains this text is handled only
    /// after `slow_ms` (one slow key lane).
    pub slow_key_substring: Option<String>,
    /// With `slow_rate`: only a request's first try (by `Idempotency-Key`) may be slow, as
    /// when a request is stuck on one node of central and a second try meets another.
    pub slow_first_try: bool,
}

/// One stored entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Entity kind.
    pub entity: Entity,
    /// Key fields.
    pub key: Value,
    /// The version applied last.
    pub version: String,
    /// The data; `None` once deleted (the version is kept, so an older upsert stays stale).
    pub data: Option<Value>,
}

/// A change request as the server reads it: strings borrowed from the body, each change's
/// data kept as the JSON text it arrived as (stored as such; parsed only to check a stock
/// level's quantities). The same JSON as [`super::ChangeBatch`], read with fewer allocations.
#[derive(Debug, Deserialize)]
pub struct Request<'a> {
    /// Warehouse id.
    #[serde(borrow)]
    pub warehouse_id: Cow<'a, str>,
    /// The batch id.
    #[serde(borrow)]
    pub batch_id: Cow<'a, str>,
    /// Changes in source order.
    #[serde(borrow)]
    pub changes: Vec<WireChange<'a>>,
}

impl<'a> Request<'a> {
    /// Parses a request body; the error says what is malformed and where.
    pub fn parse(body: &'a [u8]) -> Result<Self, serde_json::Error> {
        crate::json::from_bytes(body)
    }
}

/// One change of a [`Request`].
#[derive(Debug, Deserialize)]
pub struct WireChange<'a> {
    /// Entity kind.
    pub entity: Entity,
    /// Upsert or delete.
    pub op: ChangeOp,
    /// Key fields (read as a map: the store's key is their canonical text).
    pub key: Map<String, Value>,
    /// Data fields as JSON text; `None` for a delete.
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    /// The change's version.
    #[serde(borrow)]
    pub version: Cow<'a, str>,
    /// Origin.
    #[serde(borrow)]
    pub source: WireSource<'a>,
}

/// The `source` of a [`WireChange`].
#[derive(Debug, Deserialize)]
pub struct WireSource<'a> {
    /// `schema.table`.
    #[serde(borrow)]
    pub table: Cow<'a, str>,
    /// The change's LSN.
    #[serde(borrow)]
    pub lsn: Cow<'a, str>,
    /// Commit time, RFC 3339.
    #[serde(borrow)]
    pub committed_at: Cow<'a, str>,
    /// Whether a snapshot read it.
    pub snapshot: bool,
}

/// Counts since start.
#[derive(Debug, Default)]
struct Stats {
    requests: AtomicU64,
    injected_errors: AtomicU64,
    unauthorized: AtomicU64,
    invalid_batches: AtomicU64,
    applied: AtomicU64,
    duplicate: AtomicU64,
    stale: AtomicU64,
    rejected: AtomicU64,
    /// Changes that repeat a key of their request at a version not above the earlier one's.
    reordered: AtomicU64,
    /// Changes answered `duplicate` or `stale` in a second try of a request already applied
    /// (same `Idempotency-Key`): what a hedge or a lost answer sends again, as opposed to a
    /// replay of changes in a new request.
    second_tries: AtomicU64,
    /// Requests of [`crate::central::air::SMALL`] changes or more being handled now...
    full_in_hand: AtomicU64,
    /// ...and the most at once since the stats were last reset: what a client's limit on
    /// requests in the air let through.
    full_in_hand_peak: AtomicU64,
}

/// A request of [`crate::central::air::SMALL`] changes or more, counted in
/// [`Stats::full_in_hand`] from its arrival until its answer (or the client hangs up).
struct InHand<'a>(&'a Stats);

impl<'a> InHand<'a> {
    fn new(stats: &'a Stats) -> Self {
        let now = stats.full_in_hand.fetch_add(1, Ordering::Relaxed) + 1;
        stats.full_in_hand_peak.fetch_max(now, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        self.0.full_in_hand.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Commit-to-applied latencies of applied changes, in microseconds (bounded).
#[derive(Debug, Default)]
struct Latencies {
    samples: Vec<i64>,
}

const MAX_LATENCY_SAMPLES: usize = 1_000_000;

impl Latencies {
    /// The percentiles of `samples` (a copy: sorting happens outside the lock that request
    /// handlers take to add samples).
    fn summary(mut s: Vec<i64>) -> Value {
        if s.is_empty() {
            return json!({"count": 0});
        }
        s.sort_unstable();
        let pct = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
        json!({"count": s.len(), "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "max_ms": pct(1.0)})
    }
}

struct ServerState {
    latencies: std::sync::Mutex<Latencies>,
    store: CentralStore,
    token: Option<String>,
    faults: std::sync::Mutex<Faults>,
    /// `Idempotency-Key`s seen (for `slow_first_try`; forgotten by the 100,000).
    tried: std::sync::Mutex<std::collections::HashSet<String>>,
    /// `Idempotency-Key`s of requests applied (forgotten by the 100,000): a request that
    /// comes again is a second try (a hedge, or a retry after a lost answer), not a replay.
    applied_keys: std::sync::Mutex<std::collections::HashSet<String>>,
    stats: Stats,
    /// Told when changes were applied, to those waiting for a count (`applied_at_least`).
    applied_more: tokio::sync::Notify,
}

/// The server's settings.
pub struct CentralServer {
    /// Its state.
    pub store: CentralStore,
    /// Bearer token the server requires, if any.
    pub token: Option<String>,
    /// Faults to start with.
    pub faults: Faults,
}

impl CentralServer {
    /// The routes, ready to serve.
    pub fn router(self) -> Router {
        let state = Arc::new(ServerState {
            latencies: std::sync::Mutex::new(Latencies::default()),
            store: self.store,
            token: self.token,
            faults: std::sync::Mutex::new(self.faults),
            tried: Default::default(),
            applied_keys: Default::default(),
            stats: Stats::default(),
            applied_more: tokio::sync::Notify::new(),
        });
        Router::new()
            .route("/api/warehouse/{id}/changes", post(post_changes))
            .route("/api/warehouse/{id}/inventory", get(get_inventory))
            .route("/api/warehouse/{id}/entities", get(get_entities))
            .route("/admin/faults", get(get_faults).put(put_faults))
            .route("/admin/stats", get(get_stats).delete(reset_stats))
            .route(
                "/admin/inventory/{id}",
                axum::routing::delete(wipe_inventory),
            )
            .route("/admin/inventory/{id}/tamper", post(tamper_inventory))
            .route("/admin/inventory/{id}/plant", post(plant_item))
            .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
            .with_state(state)
    }

    /// Serves on `listener` until `cancel`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        use axum::serve::ListenerExt;
        // Answers go out at once (no Nagle delay against the client's delayed ACK).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, self.router())
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
    }

    /// Binds `addr` and serves in the background; returns the bound address.
    pub async fn spawn(
        self,
        addr: SocketAddr,
        cancel: CancellationToken,
    ) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = self.serve(listener, cancel).await {
                tracing::error!(error = %e, "central server stopped");
            }
        });
        Ok(local)
    }
}

fn error(status: StatusCode, error: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": error, "message": message.into()})),
    )
        .into_response()
}

fn current_faults(state: &ServerState) -> Faults {
    state
        .faults
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// A 401 when the server has a token and `headers` do not carry it as a bearer token.
fn unauthorized(state: &ServerState, headers: &HeaderMap) -> Option<Response> {
    let token = state.token.as_ref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(token.as_str()) {
        return None;
    }
    state.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid bearer token is required",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

/// The query of `GET /{warehouse_id}/entities` (DESIGN §3), as text: each is checked by
/// [`get_entities`], which names the one that is wrong.
#[derive(Deserialize)]
struct EntitiesQuery {
    entity: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

/// The most rows one page of the listing holds, and how many when `limit` is not given.
const MAX_PAGE: usize = 10_000;
const DEFAULT_PAGE: usize = 1_000;

/// `GET /{warehouse_id}/entities?entity=E&after=K&limit=N`: central's live rows of one
/// entity of a warehouse in key order, a page at a time (DESIGN §3).
async fn get_entities(
    State(state): State<Arc<ServerState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<EntitiesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    let faults = current_faults(&state);
    if faults.listing_latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.listing_latency_ms)).await;
    }
    if faults.no_listing {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route (this central has no listing)",
        );
    }
    let bad = |m: String| error(StatusCode::BAD_REQUEST, "bad_request", m);
    let Ok(Query(q)) = query else {
        return bad("the query string is not valid: expected entity=…&after=…&limit=…".into());
    };
    let entity = match q.entity.as_deref() {
        None => return bad("entity is required: stock_level, product or location".into()),
        Some(e) => match serde_json::from_value::<Entity>(Value::String(e.to_string())) {
            Ok(entity) => entity,
            Err(_) => {
                return bad(format!(
                    "entity {e:?} is not one of stock_level, product, location"
                ));
            }
        },
    };
    let limit = match q.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return bad(format!(
                    "limit {l:?} is not a whole number from 1 to {MAX_PAGE}"
                ));
            }
        },
    };
    if let Some(after) = q.after.as_deref() {
        // A cursor is a key's canonical JSON, as `next` gave it.
        let canonical = serde_json::from_str::<Map<String, Value>>(after)
            .ok()
            .and_then(|m| serde_json::to_string(&m).ok());
        if canonical.as_deref() != Some(after) {
            return bad(format!(
                "after {after:?} is not a key's canonical JSON (an object, fields in byte order, no spaces), as `next` gives it"
            ));
        }
    }
    match state
        .store
        .page(&id, entity, q.after.as_deref(), limit)
        .await
    {
        Ok((items, next)) => Json(json!({
            "warehouse_id": id,
            "entity": entity,
            "items": items,
            "next": next,
        }))
        .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("store: {e}"),
        ),
    }
}

async fn post_changes(
    State(state): State<Arc<ServerState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    // Parsed at once to count what central holds in hand; refused below, after the faults.
    let parsed = Request::parse(&body);
    let _in_hand = parsed
        .as_ref()
        .is_ok_and(|b| b.changes.len() >= crate::central::air::SMALL)
        .then(|| InHand::new(&state.stats));
    let faults = current_faults(&state);
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let first_try = || {
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let mut tried = state.tried.lock().unwrap_or_else(|p| p.into_inner());
        if tried.len() >= 100_000 {
            tried.clear();
        }
        tried.insert(key.to_string())
    };
    if faults.slow_rate > 0.0
        && rand::random::<f64>() < faults.slow_rate
        && (!faults.slow_first_try || first_try())
    {
        tokio::time::sleep(Duration::from_millis(faults.slow_ms)).await;
    }
    // One draw decides between an error, a throttle and a normal answer, so the shares add.
    let draw = rand::random::<f64>();
    let inject = {
        let mut f = state.faults.lock().unwrap_or_else(|p| p.into_inner());
        if f.fail_next > 0 {
            f.fail_next -= 1;
            true
        } else {
            f.error_rate > 0.0 && draw < f.error_rate
        }
    };
    if !inject && faults.throttle_rate > 0.0 && draw < faults.error_rate + faults.throttle_rate {
        state.stats.injected_errors.fetch_add(1, Ordering::Relaxed);
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "too many requests (fault injected by the reference server)",
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(faults.throttle_retry_after_secs.unwrap_or(1)),
        );
        return r;
    }
    if inject {
        state.stats.injected_errors.fetch_add(1, Ordering::Relaxed);
        let status = StatusCode::from_u16(faults.error_status.unwrap_or(503))
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut r = error(status, "injected", "fault injected by the reference server");
        if let Some(secs) = faults.retry_after_secs {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return r;
    }
    let batch = match parsed {
        Ok(b) => b,
        Err(e) => {
            state.stats.invalid_batches.fetch_add(1, Ordering::Relaxed);
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("invalid change batch: {e}"),
            );
        }
    };
    if batch.warehouse_id != id {
        state.stats.invalid_batches.fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable",
            format!(
                "warehouse_id {:?} does not match the path's {id:?}",
                batch.warehouse_id
            ),
        );
    }
    if let Some(s) = &faults.invalid_key_substring
        && let Some(bad) = batch.changes.iter().find(|c| {
            serde_json::to_string(&c.key)
                .unwrap_or_default()
                .contains(s.as_str())
        })
    {
        state.stats.invalid_batches.fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable",
            format!(
                "change {} has an invalid key {}",
                bad.version,
                Value::Object(bad.key.clone())
            ),
        );
    }
    if let Some(s) = &faults.slow_key_substring
        && batch.changes.iter().any(|c| {
            serde_json::to_string(&c.key)
                .unwrap_or_default()
                .contains(s.as_str())
        })
    {
        tokio::time::sleep(Duration::from_millis(faults.slow_ms)).await;
    }
    if let Some(s) = &faults.too_large_key_substring
        && let Some(big) = batch.changes.iter().find(|c| {
            serde_json::to_string(&c.key)
                .unwrap_or_default()
                .contains(s.as_str())
        })
    {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "change {} of {} is larger than this central takes",
                big.version,
                Value::Object(big.key.clone())
            ),
        );
    }
    // Commit times of streamed changes, for the latency of those that apply.
    let committed: Vec<Option<i64>> = batch
        .changes
        .iter()
        .map(|c| {
            (!c.source.snapshot)
                .then(|| parse_rfc3339_utc_micros(&c.source.committed_at))
                .flatten()
        })
        .collect();
    let second_try = {
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .filter(|k| !k.is_empty());
        key.is_some_and(|key| {
            let mut seen = state.applied_keys.lock().unwrap_or_else(|p| p.into_inner());
            if seen.len() >= 100_000 {
                seen.clear();
            }
            !seen.insert(key.to_string())
        })
    };
    let results = match state.store.apply(&id, batch.changes, &faults).await {
        Ok((r, reordered)) => {
            if reordered > 0 {
                state
                    .stats
                    .reordered
                    .fetch_add(reordered, Ordering::Relaxed);
                tracing::warn!(warehouse = %id, reordered, "a request holds a key twice with a version that does not grow (the contract forbids it)");
            }
            r
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("store: {e}"),
            );
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    {
        let mut l = state.latencies.lock().unwrap_or_else(|p| p.into_inner());
        for (at, r) in committed.iter().zip(&results) {
            if r.status == ResultStatus::Applied
                && l.samples.len() < MAX_LATENCY_SAMPLES
                && let Some(at) = at
            {
                l.samples.push(now - at);
            }
        }
    }
    for r in &results {
        let counter = match r.status {
            ResultStatus::Applied => &state.stats.applied,
            ResultStatus::Duplicate => &state.stats.duplicate,
            ResultStatus::Stale => &state.stats.stale,
            ResultStatus::Rejected => &state.stats.rejected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if second_try && matches!(r.status, ResultStatus::Duplicate | ResultStatus::Stale) {
            state.stats.second_tries.fetch_add(1, Ordering::Relaxed);
        }
    }
    if results.iter().any(|r| r.status == ResultStatus::Applied) {
        state.applied_more.notify_waiters();
    }
    if faults.answer_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.answer_delay_ms)).await;
    }
    Json(BatchResponse { results }).into_response()
}

async fn get_inventory(State(state): State<Arc<ServerState>>, Path(id): Path<String>) -> Response {
    match state.store.list(&id).await {
        Ok(items) => Json(json!({"warehouse_id": id, "items": items})).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("store: {e}"),
        ),
    }
}

async fn get_faults(State(state): State<Arc<ServerState>>) -> Json<Faults> {
    Json(current_faults(&state))
}

async fn put_faults(State(state): State<Arc<ServerState>>, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            *state.faults.lock().unwrap_or_else(|p| p.into_inner()) = f.clone();
            Json(f).into_response()
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("invalid faults: {e}"),
        ),
    }
}

/// The query of `GET /admin/stats`.
#[derive(Debug, Deserialize)]
struct StatsQuery {
    /// Whether to compute the latency percentiles (unless `false`).
    latency: Option<bool>,
    /// Answer only once this many changes are applied (or `wait_s` passed).
    applied_at_least: Option<u64>,
    /// How long `applied_at_least` waits at most, in seconds (default 60, at most 600).
    wait_s: Option<u64>,
}

async fn get_stats(
    State(state): State<Arc<ServerState>>,
    Query(q): Query<StatsQuery>,
) -> Json<Value> {
    if let Some(target) = q.applied_at_least {
        let wait = Duration::from_secs(q.wait_s.unwrap_or(60).min(600));
        let reached = async {
            loop {
                // Listening before the count is read: an apply in between is not missed.
                let more = state.applied_more.notified();
                tokio::pin!(more);
                more.as_mut().enable();
                if state.stats.applied.load(Ordering::Relaxed) >= target {
                    return;
                }
                more.await;
            }
        };
        // Timed out: the counts as they are (the caller compares them with its target).
        let _ = tokio::time::timeout(wait, reached).await;
    }
    let s = &state.stats;
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let latency = if q.latency != Some(false) {
        let samples = state
            .latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .samples
            .clone();
        Latencies::summary(samples)
    } else {
        Value::Null
    };
    Json(json!({
        "requests": n(&s.requests),
        "injected_errors": n(&s.injected_errors),
        "unauthorized": n(&s.unauthorized),
        "invalid_batches": n(&s.invalid_batches),
        "applied": n(&s.applied),
        "duplicate": n(&s.duplicate),
        "stale": n(&s.stale),
        "rejected": n(&s.rejected),
        "reordered": n(&s.reordered),
        "second_tries": n(&s.second_tries),
        "peak_full_requests_in_hand": n(&s.full_in_hand_peak),
        "latency": latency,
    }))
}

/// Clears the latency samples and restarts the peak of requests in hand (between benchmark
/// phases, or test steps).
async fn reset_stats(State(state): State<Arc<ServerState>>) -> StatusCode {
    let stats = &state.stats;
    stats.full_in_hand_peak.store(
        stats.full_in_hand.load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    state
        .latencies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .samples
        .clear();
    StatusCode::NO_CONTENT
}

/// `DELETE /admin/inventory/{id}`: forgets everything of a warehouse (an operator's mistake
/// or a restore from an old backup, for resync demos and tests).
async fn wipe_inventory(State(state): State<Arc<ServerState>>, Path(id): Path<String>) -> Response {
    match state.store.edit(&id, Edit::Wipe).await {
        Ok(n) => Json(json!({"wiped": n})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// `POST /admin/inventory/{id}/tamper`: replaces the data of every live entity of a
/// warehouse with `{"tampered": true}`, keeping versions (a manual edit at central).
async fn tamper_inventory(
    State(state): State<Arc<ServerState>>,
    Path(id): Path<String>,
) -> Response {
    match state.store.edit(&id, Edit::Tamper).await {
        Ok(n) => Json(json!({"tampered": n})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// Body of `POST /admin/inventory/{id}/plant`: one entity set as given (`data` null: the
/// entity removed, no tombstone left), as a hand edit or a restored backup would leave it.
#[derive(Debug, Deserialize)]
struct Plant {
    entity: Entity,
    key: Map<String, Value>,
    version: Option<String>,
    data: Option<Value>,
}

/// `POST /admin/inventory/{id}/plant`: sets or removes one entity behind the contract's
/// back (tests plant drift with it).
async fn plant_item(
    State(state): State<Arc<ServerState>>,
    Path(id): Path<String>,
    Json(p): Json<Plant>,
) -> Response {
    let edit = store::Planted {
        entity: p.entity,
        key: serde_json::to_string(&p.key).unwrap_or_default(),
        version: p.version,
        data: p.data.map(|d| d.to_string()),
    };
    match state.store.plant(&id, edit).await {
        Ok(n) => Json(json!({"planted": n})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::store::{decide, item_key, reject_reason, stored_data};
    use super::*;

    #[test]
    fn latency_percentiles_come_from_the_sorted_samples() {
        assert_eq!(Latencies::summary(Vec::new()), json!({"count": 0}));
        let s = Latencies::summary((1..=100).rev().map(|ms| ms * 1000).collect());
        assert_eq!(s["count"], 100);
        assert_eq!(s["p50_ms"], 51.0);
        assert_eq!(s["p99_ms"], 99.0);
        assert_eq!(s["max_ms"], 100.0);
    }

    #[test]
    fn a_request_is_read_in_place_and_judged_like_the_contract_says() {
        let body = br#"{"warehouse_id":"wh","batch_id":"wh:a-b","changes":[
            {"entity":"stock_level","op":"upsert","key":{"sku":"S\"1","location":"A"},
             "data":{"on_hand":5,"reserved":1,"available":4},"version":"0000000000000010:00000000",
             "source":{"table":"public.stock_levels","lsn":"0/10","committed_at":"2026-11-25T00:00:00.000000Z","snapshot":false}},
            {"entity":"stock_level","op":"delete","key":{"sku":"S\"1","location":"A"},"data":null,
             "version":"0000000000000020:00000000",
             "source":{"table":"public.stock_levels","lsn":"0/20","committed_at":"2026-11-25T00:00:01.000000Z","snapshot":false}},
            {"entity":"stock_level","op":"upsert","key":{"sku":"S2","location":"A"},
             "data":{"on_hand":5,"reserved":1,"available":3},"version":"0000000000000030:00000000",
             "source":{"table":"public.stock_levels","lsn":"0/30","committed_at":"2026-11-25T00:00:02.000000Z","snapshot":true}}]}"#;
        let r = Request::parse(body).expect("parses");
        assert_eq!(r.warehouse_id, "wh");
        assert_eq!(r.changes.len(), 3);
        let faults = Faults::default();
        // Stored as the text it arrived as; a delete stores nothing.
        assert_eq!(
            stored_data(&r.changes[0]),
            Some(r#"{"on_hand":5,"reserved":1,"available":4}"#)
        );
        assert_eq!(stored_data(&r.changes[1]), None);
        assert_eq!(
            item_key(&r.changes[0]),
            r#"stock_level:{"location":"A","sku":"S\"1"}"#
        );
        assert_eq!(reject_reason(&r.changes[0], &faults), None);
        let wrong =
            reject_reason(&r.changes[2], &faults).expect("available is not on_hand - reserved");
        assert!(wrong.contains(r#""available":3"#), "{wrong}");
        assert_eq!(
            decide(&r.changes[0], Some("0000000000000010:00000000"), &faults).0,
            ResultStatus::Duplicate
        );
        assert_eq!(
            decide(&r.changes[0], Some("0000000000000011:00000000"), &faults).0,
            ResultStatus::Stale
        );
        let bad = Request::parse(
            br#"{"warehouse_id":"wh","batch_id":"x","changes":[{"entity":"pallet"}]}"#,
        )
        .expect_err("unknown entity");
        assert!(
            bad.to_string().contains("unknown variant `pallet`"),
            "{bad}"
        );
    }
}
