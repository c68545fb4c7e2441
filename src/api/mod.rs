//! The HTTP API of `run` (DESIGN §6): what ops drive and what probes and Prometheus read.
//!
//! `/health` and `/ready` are open; every `/sync` route needs a Bearer API key (see
//! [`auth`]). Every error is JSON `{"error", "message"}` with its status code, including
//! unknown routes (404), oversized bodies (413) and malformed JSON (400), so scripts never
//! have to parse HTML or plain text.

pub mod auth;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub use auth::ApiKeys;

use crate::app::WarehouseStatus;
use crate::store::ConflictQuery;
use crate::store::StateDb;

/// Largest request body accepted (JSON bodies of the `/sync` routes are small).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Default page size of the listing routes.
const DEFAULT_LIMIT: i64 = 50;
/// Largest page size of the listing routes.
const MAX_LIMIT: i64 = 500;

/// What the handlers share.
pub struct ApiState {
    /// The state DB.
    pub state: StateDb,
    /// Accepted API keys.
    pub keys: ApiKeys,
    /// Every configured warehouse's stream status.
    pub warehouses: Vec<Arc<WarehouseStatus>>,
}

/// An error answer: status, a stable code and a message naming what was wrong.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// An error with `status`, machine-readable `code` and a human `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "API request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the state DB failed: {e}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// The API's routes over `state`.
pub fn router(state: Arc<ApiState>) -> Router {
    let sync = Router::new()
        .route("/sync/conflicts", get(list_conflicts))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(sync)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the API on `listener` until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(listen = %listener.local_addr()?, "HTTP API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

async fn require_key(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").map(str::trim));
    let refusal = match presented {
        _ if state.keys.is_empty() => {
            Some("no API keys are configured: set API_KEYS to use the /sync routes".to_string())
        }
        None => Some("an API key is required: Authorization: Bearer <key>".to_string()),
        Some(k) if !state.keys.accepts(k) => Some("the API key is not valid".to_string()),
        Some(_) => None,
    };
    match refusal {
        Some(message) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response()
        }
        None => next.run(req).await,
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the state DB answers and every warehouse streams; otherwise 503 with each
/// reason.
async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    let mut problems = Vec::new();
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(state.state.pool()),
    )
    .await;
    let db_ok = matches!(db, Ok(Ok(_)));
    if !db_ok {
        let why = match db {
            Ok(Err(e)) => e.to_string(),
            _ => "no answer within 2 s".to_string(),
        };
        problems.push(format!("state DB: {why}"));
    }
    let mut warehouses = serde_json::Map::new();
    for w in &state.warehouses {
        let (streaming, reason) = w.readiness();
        if let Some(r) = &reason {
            problems.push(format!("warehouse {}: {r}", w.id));
        }
        warehouses.insert(
            w.id.clone(),
            json!({"streaming": streaming, "reason": reason}),
        );
    }
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if problems.is_empty() { "ready" } else { "not_ready" },
        "stateDb": db_ok,
        "warehouses": warehouses,
        "problems": problems,
    });
    (status, Json(body)).into_response()
}

/// Query string of `GET /sync/conflicts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConflictParams {
    warehouse: Option<String>,
    status: Option<String>,
    kind: Option<String>,
    limit: Option<i64>,
    before: Option<i64>,
}

/// A query string that fails to parse is a 400 naming the problem.
struct Params<T>(T);

impl<S, T> FromRequestParts<S> for Params<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(t)| Params(t))
            .map_err(|e: QueryRejection| {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
            })
    }
}

async fn list_conflicts(
    State(state): State<Arc<ApiState>>,
    Params(p): Params<ConflictParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    const STATUSES: [&str; 2] = ["open", "resolved"];
    const KINDS: [&str; 4] = ["stale_version", "rejected", "invalid", "truncate"];
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m);
    if let Some(s) = &p.status
        && !STATUSES.contains(&s.as_str())
    {
        return Err(bad(format!(
            "status {s:?} is not one of {}",
            STATUSES.join(", ")
        )));
    }
    if let Some(k) = &p.kind
        && !KINDS.contains(&k.as_str())
    {
        return Err(bad(format!(
            "kind {k:?} is not one of {}",
            KINDS.join(", ")
        )));
    }
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(bad(format!(
            "limit {limit} is out of range: expected 1 to {MAX_LIMIT}"
        )));
    }
    if let Some(w) = &p.warehouse
        && !state.warehouses.iter().any(|s| &s.id == w)
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no warehouse {w:?} is configured"),
        ));
    }
    let rows = state
        .state
        .list_conflicts(&ConflictQuery {
            warehouse: p.warehouse,
            status: p.status,
            kind: p.kind,
            before_id: p.before,
            limit: limit + 1,
        })
        .await
        .map_err(ApiError::internal)?;
    let more = rows.len() as i64 > limit;
    let items: Vec<_> = rows.into_iter().take(limit as usize).collect();
    let next = if more {
        items.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Json(json!({"items": items, "next": next})))
}
