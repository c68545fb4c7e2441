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
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::jobs::new_job_id;
use tokio_util::sync::CancellationToken;

pub use auth::ApiKeys;

use crate::app::WarehouseStatus;
use crate::store::StateDb;
use crate::store::{ConflictQuery, JobQuery};

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
    /// How long a sync cycle may take before it fails.
    pub job_timeout: Duration,
    /// Where the consumer's lag is read.
    pub consumer_lag: ConsumerLag,
    /// The consumer stage that sends dead letters again, once it runs (none in a process
    /// without one: `--stages source`, or no central endpoint).
    pub replayer: Arc<std::sync::OnceLock<Arc<crate::consumer::Stage>>>,
    /// The warehouses' last 15 minutes, for the console.
    pub history: Arc<crate::console::History>,
    /// Every configured warehouse's slot: the others with the engine's prefix are unused.
    pub slots: Vec<String>,
    /// The mapped tables (`[[mappings]]`), as configured: what a verify may name.
    pub mapped: Vec<String>,
}

/// Where `/metrics` reads the consumer stage's lag.
pub enum ConsumerLag {
    /// The embedded bus: events published without an outcome yet.
    Embedded(Arc<crate::bus::embedded::EmbeddedBus>),
    /// Kafka: records between the group's committed offsets and the topics' ends.
    Kafka(Arc<crate::consumer::kafka::GroupProgress>),
}

/// An error answer: status, a stable code and a message naming what was wrong.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    job_id: Option<String>,
}

impl ApiError {
    /// Adds the id of the job this error is about (409 for a running resync).
    fn with_job(mut self, job_id: String) -> Self {
        self.job_id = Some(job_id);
        self
    }

    /// An error with `status`, machine-readable `code` and a human `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            job_id: None,
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
        let mut body = json!({"error": self.code, "message": self.message});
        if let Some(id) = self.job_id {
            body["jobId"] = id.into();
        }
        // (Shaped as [`ErrorBody`], whose `job_id` is `jobId` in JSON.)
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// The OpenAPI document's frame; the paths come from the handlers' annotations.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "InventorySync",
        description = "Sync cycles, forced resyncs, jobs, conflicts, health and metrics of an InventorySync engine."
    ),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody, crate::store::WorkerRow, crate::store::ConflictRow, crate::store::DeadLetterRow,
        crate::console::WarehouseView, crate::console::Sample, crate::console::Notice, ConflictStatus, ConflictKind, JobStatus,
        JobKind, CloseStatus))
)]
struct ApiDoc;

/// Declares the Bearer scheme the `/sync` routes require.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every error's body.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// A stable code: `unauthorized`, `not_found`, `bad_request`, `payload_too_large`,
    /// `unprocessable`, `conflict`, `method_not_allowed`, `unavailable`, `internal`.
    pub error: String,
    /// What was wrong, naming the field or value.
    pub message: String,
    /// The running job (409 of a resync).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// The API's routes over `state`, and the OpenAPI document built from the same handlers
/// (a route cannot exist without its documentation).
pub fn router_and_doc(state: Arc<ApiState>) -> (Router, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi;
    use utoipa_axum::router::OpenApiRouter;
    use utoipa_axum::routes;
    let sync = OpenApiRouter::new()
        .routes(routes!(trigger))
        .routes(routes!(verify))
        .routes(routes!(job_status))
        .routes(routes!(resync))
        .routes(routes!(list_jobs))
        .routes(routes!(list_conflicts))
        .routes(routes!(close_conflict))
        .routes(routes!(list_dead_letters))
        .routes(routes!(replay_dead_letter))
        .routes(routes!(overview))
        .routes(routes!(list_workers))
        .route_layer(middleware::from_fn(refuse_nul))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(console_page))
        .routes(routes!(console_style))
        .routes(routes!(console_script))
        .merge(sync)
        .split_for_parts();
    link_jobs(&mut doc);
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::Extension(Arc::new(served_doc(&doc, &state))))
        .with_state(state);
    (router, doc)
}

/// The document as served: the configured warehouses are the values a trigger or a verify
/// may name, the mapped tables those a verify may (a client generated from it offers exactly
/// those; any other is answered 422).
fn served_doc(doc: &utoipa::openapi::OpenApi, state: &ApiState) -> serde_json::Value {
    let mut served = serde_json::to_value(doc).unwrap_or_default();
    let ids: Vec<&str> = state.warehouses.iter().map(|w| w.id.as_str()).collect();
    for body in ["TriggerBody", "VerifyBody"] {
        if let Some(list) =
            served.pointer_mut(&format!("/components/schemas/{body}/properties/warehouses"))
        {
            list["minItems"] = json!(1);
            list["items"] = json!({"type": "string", "enum": ids});
        }
    }
    // And the mapped tables are those a verify may name.
    if let Some(list) = served.pointer_mut("/components/schemas/VerifyBody/properties/tables") {
        list["minItems"] = json!(1);
        list["items"] = json!({"type": "string", "enum": state.mapped});
    }
    // No id, filter or note can hold a NUL character (the state DB cannot store one): the
    // document says so of every parameter and request body, and such a request is answered
    // 400.
    let mut bodies: Vec<String> = Vec::new();
    if let Some(paths) = served.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for (_, ops) in paths.iter_mut() {
            for (_, op) in ops.as_object_mut().into_iter().flatten() {
                if let Some(params) = op.get_mut("parameters") {
                    no_nul(params);
                }
                if let Some(body) = op.get_mut("requestBody") {
                    no_nul(body);
                    refs(body, &mut bodies);
                }
            }
        }
    }
    for name in bodies {
        if let Some(schema) = served.pointer_mut(&format!("/components/schemas/{name}")) {
            no_nul(schema);
        }
    }
    // Every /sync route but the overview (held in memory) reads or writes the state DB, and
    // answers 500 when it fails.
    if let Some(paths) = served.get_mut("paths").and_then(|p| p.as_object_mut()) {
        let uses_db = |p: &str| p.starts_with("/sync/") && p != "/sync/overview";
        for (_, ops) in paths.iter_mut().filter(|(p, _)| uses_db(p)) {
            for (_, op) in ops.as_object_mut().into_iter().flatten() {
                if let Some(responses) = op.get_mut("responses").and_then(|r| r.as_object_mut()) {
                    responses.entry("500").or_insert_with(|| {
                        json!({
                            "description": "The state DB failed; the message says how",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
                        })
                    });
                }
            }
        }
    }
    served
}

/// Gives every free-text string of the document (a parameter, a property; not an enum) the
/// pattern that refuses a NUL character.
fn no_nul(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            let is_string = match o.get("type") {
                Some(serde_json::Value::String(t)) => t == "string",
                Some(serde_json::Value::Array(ts)) => ts.iter().any(|t| t == "string"),
                _ => false,
            };
            if is_string && !o.contains_key("enum") && !o.contains_key("pattern") {
                o.insert("pattern".into(), json!("^[^\\x00]*$"));
            }
            for (_, child) in o.iter_mut() {
                no_nul(child);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(no_nul),
        _ => {}
    }
}

/// The component schemas `v` refers to (`#/components/schemas/NAME`), added to `out`.
fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(o) => {
            if let Some(name) = o
                .get("$ref")
                .and_then(|r| r.as_str())
                .and_then(|r| r.strip_prefix("#/components/schemas/"))
            {
                out.push(name.to_string());
            }
            o.values().for_each(|c| refs(c, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|c| refs(c, out)),
        _ => {}
    }
}

/// Links the job a trigger or a resync queues (`jobId`) to `GET /sync/status/{job_id}`, so
/// that a client (or a stateful fuzzer) follows one to the other.
fn link_jobs(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{RefOr, link::LinkBuilder};
    for path in [
        "/sync/trigger",
        "/sync/verify",
        "/sync/warehouses/{warehouse_id}",
    ] {
        let Some(op) = doc.paths.paths.get_mut(path).and_then(|p| p.post.as_mut()) else {
            continue;
        };
        if let Some(RefOr::T(accepted)) = op.responses.responses.get_mut("202") {
            accepted.links.insert(
                "status".to_string(),
                RefOr::T(
                    LinkBuilder::new()
                        .operation_id("job_status")
                        .parameter("job_id", "$response.body#/jobId")
                        .description("The job it queued")
                        .build(),
                ),
            );
        }
    }
}

/// The API's routes over `state`.
pub fn router(state: Arc<ApiState>) -> Router {
    router_and_doc(state).0
}

/// The OpenAPI 3 document of this API.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json")))]
async fn openapi_json(
    axum::Extension(doc): axum::Extension<Arc<serde_json::Value>>,
) -> Json<serde_json::Value> {
    Json((*doc).clone())
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

/// Who made a `/sync` request: the fingerprint of the key it presented.
#[derive(Debug, Clone)]
struct Caller(String);

async fn require_key(State(state): State<Arc<ApiState>>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").map(str::trim));
    let caller = match presented {
        _ if state.keys.is_empty() => {
            Err("no API keys are configured: set API_KEYS to use the /sync routes")
        }
        None => Err("an API key is required: Authorization: Bearer <key>"),
        Some(k) if !state.keys.accepts(k) => Err("the API key is not valid"),
        Some(k) => Ok(auth::fingerprint(k)),
    };
    match caller {
        Ok(caller) => {
            req.extensions_mut().insert(Caller(caller));
            next.run(req).await
        }
        Err(message) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response()
        }
    }
}

/// Refuses a path or query holding an encoded NUL character: no id or filter holds one, and
/// the state DB cannot store or compare one (it answered 500).
async fn refuse_nul(req: Request, next: Next) -> Response {
    let uri = req.uri();
    let encoded = |s: &str| {
        s.as_bytes()
            .windows(3)
            .any(|w| w.eq_ignore_ascii_case(b"%00"))
    };
    if encoded(uri.path()) || uri.query().is_some_and(encoded) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the path or query holds a NUL character (%00), which no id or filter can hold",
        )
        .into_response();
    }
    next.run(req).await
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

#[utoipa::path(get, path = "/health", tag = "meta",
    responses((status = 200, description = "The process is alive", body = Object, example = json!({"status": "ok"}))))]
async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Why warehouse `w` is not served as it should be, if it is not: its pipeline's state, and
/// a central that refuses every request of it (delivery paused).
fn why_not_ready(state: &ApiState, w: &crate::app::WarehouseStatus) -> Option<String> {
    let (_, reason) = w.readiness();
    let refusing = state
        .replayer
        .get()
        .and_then(|stage| stage.client())
        .and_then(|c| c.refusing(&w.id));
    match (reason, refusing) {
        (Some(r), Some(c)) => Some(format!("{r}; {c}")),
        (r, c) => r.or(c),
    }
}

/// What asks the operator to act about warehouse `w` though it streams: slots of its
/// database with the engine's prefix that no configured warehouse uses (they retain WAL for
/// ever), and mapped tables published under another name now. Read from the slot health
/// the stream reads, so only the owner of the warehouse knows them.
fn notices(state: &ApiState, w: &crate::app::WarehouseStatus) -> Vec<crate::console::Notice> {
    let Some(health) = w.slot_health.borrow().clone() else {
        return Vec::new();
    };
    let mut notices: Vec<crate::console::Notice> = health
        .other_slots
        .iter()
        .filter(|s| !state.slots.contains(&s.name))
        .map(|s| crate::console::Notice {
            kind: "unused_slot",
            detail: s.detail(),
            fix: format!("if no other deployment uses it: {}", s.drop_statement()),
        })
        .collect();
    if let Some(stage) = state.replayer.get() {
        notices.extend(
            stage
                .renamed_tables(&w.id, &health.published)
                .into_iter()
                .map(|r| crate::console::Notice {
                    kind: "renamed_table",
                    detail: format!(
                        "{} was renamed or moved to {}: the mapping follows the table, its changes flow",
                        r.mapped_table, r.current_name
                    ),
                    fix: format!(
                        "update the configuration: [[mappings]] table = {:?}",
                        r.current_name
                    ),
                }),
        );
    }
    notices
}

/// Ready when the state DB answers and every warehouse streams; otherwise 503 with each
/// reason.
#[utoipa::path(get, path = "/ready", tag = "meta", responses(
    (status = 200, description = "State DB reachable and every warehouse streaming (here or by the lease holder)", body = Object),
    (status = 503, description = "Not ready; `problems` says why", body = Object)))]
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
        let (streaming, _) = w.readiness();
        let reason = why_not_ready(&state, w);
        if let Some(r) = &reason {
            problems.push(format!("warehouse {}: {r}", w.id));
        }
        let owner = w.owner.borrow().clone();
        let here = w.owned_here();
        warehouses.insert(
            w.id.clone(),
            json!({"streaming": streaming, "reason": reason, "owner": owner, "ownedHere": here}),
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

/// The `run` processes sharing the state DB: their heartbeats and the warehouses each owns
/// (from `sync_workers`; a process whose heartbeat expired reads `alive: false` for an hour).
#[utoipa::path(get, path = "/sync/workers", tag = "sync", security(("bearer" = [])),
    responses(
        (status = 200, description = "`{items: [WorkerRow], unowned: [warehouse id]}`: every process by worker id, and the configured warehouses no live process owns", body = Object),
        (status = 401, description = "No or wrong API key", body = ErrorBody)))]
async fn list_workers(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = state.state.workers().await.map_err(ApiError::internal)?;
    let unowned: Vec<&str> = state
        .warehouses
        .iter()
        .map(|w| w.id.as_str())
        .filter(|id| {
            !rows
                .iter()
                .any(|r| r.alive && r.owned.iter().any(|o| o == id))
        })
        .collect();
    Ok(Json(json!({"items": rows, "unowned": unowned})))
}

/// Conflicts, newest first, in pages (`next` is the `before` of the next page).
#[utoipa::path(get, path = "/sync/conflicts", tag = "sync", security(("bearer" = [])),
    params(
        ("warehouse" = Option<String>, Query, description = "Only this warehouse's"),
        ("status" = Option<ConflictStatus>, Query, description = "open, resolved or ignored"),
        ("kind" = Option<ConflictKind>, Query, description = "stale_version, rejected, invalid or truncate"),
        ("limit" = Option<i64>, Query, description = "1 to 500 (default 50)", minimum = 1, maximum = 500),
        ("before" = Option<i64>, Query, description = "Only conflicts with a smaller id"),
    ),
    responses(
        (status = 200, description = "`{items: [ConflictRow], next}`", body = Object),
        (status = 400, description = "A bad filter", body = ErrorBody),
        (status = 401, description = "No or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown warehouse", body = ErrorBody)))]
async fn list_conflicts(
    State(state): State<Arc<ApiState>>,
    Params(p): Params<ConflictParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    const STATUSES: [&str; 3] = ["open", "resolved", "ignored"];
    const KINDS: [&str; 4] = ["stale_version", "rejected", "invalid", "truncate"];
    one_of("status", p.status.as_deref(), &STATUSES)?;
    one_of("kind", p.kind.as_deref(), &KINDS)?;
    let limit = page_limit(p.limit)?;
    configured(&state, p.warehouse.as_deref())?;
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
    Ok(page(rows, limit, |r| json!(r.id)))
}

/// The longest note a conflict may be closed with.
const MAX_NOTE_CHARS: usize = 2000;

/// A numeric id in a path: 400 naming it otherwise.
fn path_id(what: &str, raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{what} id {raw:?} is not a number"),
        )
    })
}

/// Body of `PATCH /sync/conflicts/{id}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    /// `resolved` (central is right now, or was made right) or `ignored` (leave it as it is).
    #[schema(value_type = CloseStatus)]
    status: String,
    /// Why, in words (at most 2,000 characters).
    note: Option<String>,
}

/// Closes an open conflict as `resolved` or `ignored`, recording who (the key's fingerprint),
/// when and why. Closing it again the same way answers the row unchanged.
#[utoipa::path(patch, path = "/sync/conflicts/{id}", tag = "sync", security(("bearer" = [])),
    params(("id" = i64, Path, description = "The conflict's id")),
    request_body(content = CloseBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The conflict as it is now", body = crate::store::ConflictRow),
        (status = 400, description = "Malformed JSON, an unknown field or an id that is no number", body = ErrorBody),
        (status = 401, description = "No or wrong API key", body = ErrorBody),
        (status = 404, description = "No conflict has this id", body = ErrorBody),
        (status = 409, description = "It was closed otherwise before; the message says by whom and when", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "No body, a status other than resolved or ignored, or a note over 2,000 characters", body = ErrorBody)))]
async fn close_conflict(
    State(state): State<Arc<ApiState>>,
    axum::Extension(Caller(caller)): axum::Extension<Caller>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Body(body): Body<CloseBody>,
) -> Result<Json<crate::store::ConflictRow>, ApiError> {
    let id = path_id("conflict", &id)?;
    let unprocessable =
        |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable", m);
    let Some(body) = body else {
        return Err(unprocessable(
            "a body is required: {\"status\": \"resolved\" | \"ignored\", \"note\": \"why\"}"
                .into(),
        ));
    };
    if !["resolved", "ignored"].contains(&body.status.as_str()) {
        return Err(unprocessable(format!(
            "status {:?} is not one of resolved, ignored",
            body.status
        )));
    }
    let note = body
        .note
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    if let Some(n) = note
        && n.chars().count() > MAX_NOTE_CHARS
    {
        return Err(unprocessable(format!(
            "note has {} characters: at most {MAX_NOTE_CHARS} are kept",
            n.chars().count()
        )));
    }
    match state
        .state
        .close_conflict(id, &body.status, note, &caller)
        .await
        .map_err(ApiError::internal)?
    {
        crate::store::Closing::Closed(row) => {
            tracing::info!(conflict = id, status = %row.status, by = %caller, "conflict closed");
            Ok(Json(row))
        }
        crate::store::Closing::ClosedOtherwise(row) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "conflict {id} is {} already (by {}, at {})",
                row.status,
                row.resolved_by.as_deref().unwrap_or("someone"),
                row.resolved_at.as_deref().unwrap_or("an unknown time")
            ),
        )),
        crate::store::Closing::Unknown => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no conflict has id {id}"),
        )),
    }
}

/// Query string of `GET /sync/dead-letters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterParams {
    warehouse: Option<String>,
    table: Option<String>,
    rule: Option<String>,
    replayed: Option<bool>,
    limit: Option<i64>,
    before: Option<i64>,
}

/// Dead letters (with Kafka also records of the dead-letter topic), newest first, in pages
/// (`next` is the `before` of the next page).
#[utoipa::path(get, path = "/sync/dead-letters", tag = "sync", security(("bearer" = [])),
    params(
        ("warehouse" = Option<String>, Query, description = "Only this warehouse's"),
        ("table" = Option<String>, Query, description = "Only of this `schema.table`"),
        ("rule" = Option<String>, Query, description = "Only those that broke this rule (`quantity_non_negative`, `rejected`, …)"),
        ("replayed" = Option<bool>, Query, description = "Only those replayed at least once (true) or never (false)"),
        ("limit" = Option<i64>, Query, description = "1 to 500 (default 50)", minimum = 1, maximum = 500),
        ("before" = Option<i64>, Query, description = "Only dead letters with a smaller id"),
    ),
    responses(
        (status = 200, description = "`{items: [DeadLetterRow], next}`", body = Object),
        (status = 400, description = "A bad filter", body = ErrorBody),
        (status = 401, description = "No or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown warehouse", body = ErrorBody)))]
async fn list_dead_letters(
    State(state): State<Arc<ApiState>>,
    Params(p): Params<DeadLetterParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = page_limit(p.limit)?;
    configured(&state, p.warehouse.as_deref())?;
    let rows = state
        .state
        .list_dead_letters(&crate::store::DeadLetterQuery {
            warehouse: p.warehouse,
            table: p.table,
            rule: p.rule,
            replayed: p.replayed,
            before_id: p.before,
            limit: limit + 1,
        })
        .await
        .map_err(ApiError::internal)?;
    Ok(page(rows, limit, |r| json!(r.id)))
}

/// Sends a dead letter again through the consumer stage (once its cause is fixed: the rule,
/// the mapping or central), and records who replayed it and what came of it. A change that
/// still breaks a rule is not sent (`invalid`); one older than what central holds is
/// answered `stale`, and central keeps the newer one. It stays listed either way, with its
/// latest replay; once central has it, the conflict recorded with it is resolved.
#[utoipa::path(post, path = "/sync/dead-letters/{id}/replay", tag = "sync", security(("bearer" = [])),
    params(("id" = i64, Path, description = "The dead letter's id")),
    responses(
        (status = 200, description = "The dead letter with its replay: `replayOutcome` is applied, duplicate, stale, rejected, refused or invalid, `replayDetail` says why", body = crate::store::DeadLetterRow),
        (status = 400, description = "An id that is no number", body = ErrorBody),
        (status = 401, description = "No or wrong API key", body = ErrorBody),
        (status = 404, description = "No dead letter has this id", body = ErrorBody),
        (status = 409, description = "This process runs no consumer stage (`--stages source`, or no central endpoint)", body = ErrorBody),
        (status = 503, description = "The process is stopping; nothing was recorded", body = ErrorBody)))]
async fn replay_dead_letter(
    State(state): State<Arc<ApiState>>,
    axum::Extension(Caller(caller)): axum::Extension<Caller>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<crate::store::DeadLetterRow>, ApiError> {
    let id = path_id("dead letter", &id)?;
    let Some((row, raw)) = state
        .state
        .dead_letter(id)
        .await
        .map_err(ApiError::internal)?
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no dead letter has id {id}"),
        ));
    };
    let Some(stage) = state.replayer.get().filter(|s| s.client().is_some()) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "this process runs no consumer stage to send it with: ask a process that does",
        ));
    };
    let replayed = stage
        .replay(&row.warehouse_id, &row.table_name, &raw)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the process is stopping: the dead letter was not replayed",
            )
        })?;
    let row = state
        .state
        .record_replay(id, &caller, replayed.outcome, &replayed.detail)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("dead letter {id} was removed while it was replayed"),
            )
        })?;
    if matches!(replayed.outcome, "applied" | "duplicate") {
        state
            .state
            .resolve_replayed(&row, &caller)
            .await
            .map_err(ApiError::internal)?;
    }
    Ok(Json(row))
}

/// Each warehouse as the console draws it: owner, stream state, lag (bytes and seconds),
/// changes/s, retained WAL, `wal_status`, and the last 15 minutes sampled every 10 s.
#[utoipa::path(get, path = "/sync/overview", tag = "sync", security(("bearer" = [])),
    responses(
        (status = 200, description = "`{generatedAt, sampleEverySeconds, warehouses: [WarehouseView]}`", body = Object),
        (status = 401, description = "No or wrong API key", body = ErrorBody)))]
async fn overview(State(state): State<Arc<ApiState>>) -> Json<serde_json::Value> {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    Json(json!({
        "generatedAt": crate::time::format_unix_micros(micros),
        "sampleEverySeconds": crate::console::SAMPLE_EVERY.as_secs(),
        "warehouses": state.history.views(&state.warehouses, &|w| crate::console::Remarks {
            reason: why_not_ready(&state, w),
            notices: notices(&state, w),
        }),
    }))
}

/// Headers of the console's files: nothing from elsewhere runs in it, and no other site
/// frames it.
fn console_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                ),
            ),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// The operations console (it asks for the API key itself).
#[utoipa::path(get, path = "/console", tag = "console",
    responses((status = 200, description = "The console's page", content_type = "text/html")))]
async fn console_page() -> Response {
    console_file("text/html; charset=utf-8", crate::console::PAGE)
}

/// The console's style sheet.
#[utoipa::path(get, path = "/console/console.css", tag = "console",
    responses((status = 200, description = "The console's style sheet", content_type = "text/css")))]
async fn console_style() -> Response {
    console_file("text/css; charset=utf-8", crate::console::STYLE)
}

/// The console's script.
#[utoipa::path(get, path = "/console/console.js", tag = "console",
    responses((status = 200, description = "The console's script", content_type = "text/javascript")))]
async fn console_script() -> Response {
    console_file("text/javascript; charset=utf-8", crate::console::SCRIPT)
}

/// A JSON body (possibly empty) of at most [`MAX_BODY_BYTES`]: 413 beyond, 400 when it is
/// not the expected JSON, naming the problem.
struct Body<T>(Option<T>);

impl<S, T> axum::extract::FromRequest<S> for Body<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        format!("the body exceeds {MAX_BODY_BYTES} bytes"),
                    )
                } else {
                    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
                }
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(None));
        }
        let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message);
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("the body is not valid JSON for this route: {e}")))?;
        match &value {
            // A JSON `null` is no body too.
            serde_json::Value::Null => return Ok(Body(None)),
            // serde reads a struct from an array too (`[null]` was a body with no fields).
            serde_json::Value::Object(_) => {}
            other => {
                return Err(bad(format!(
                    "the body is not valid JSON for this route: it must be a JSON object or null, not {}",
                    crate::json::kind_of(other)
                )));
            }
        }
        if let Some(at) = crate::json::nul_at(&value) {
            return Err(bad(format!(
                "{at} holds a NUL character (\\u0000), which the state DB cannot store"
            )));
        }
        serde_json::from_value::<T>(value)
            .map(|t| Body(Some(t)))
            .map_err(|e| bad(format!("the body is not valid JSON for this route: {e}")))
    }
}

/// Body of `POST /sync/trigger` (optional: none for every warehouse).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TriggerBody {
    /// The warehouses to sync (at least one); left out, every configured warehouse.
    warehouses: Option<Vec<String>>,
    /// Also prove that central *equals* each warehouse: the job is a verify that waits for
    /// every change committed before it, compares, and succeeds only with no finding.
    #[serde(default)]
    verify: bool,
}

/// Body of `POST /sync/verify` (optional: none verifies every warehouse, read-only).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    /// The warehouses to verify (at least one); left out, every configured warehouse.
    #[schema(min_items = 1)]
    warehouses: Option<Vec<String>>,
    /// Only these mapped tables (`schema.table`, as `[[mappings]]` names them; at least one);
    /// left out, all.
    #[schema(min_items = 1)]
    tables: Option<Vec<String>>,
    /// Fix what is found: upsert missing and different rows, delete rows only at central.
    #[serde(default)]
    repair: bool,
}

/// A conflict's status, as the filters name it (documentation: the handler checks the text
/// and names the value it refuses).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum ConflictStatus {
    Open,
    Resolved,
    Ignored,
}

/// What a conflict is closed as (documentation: the handler names a value it refuses).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum CloseStatus {
    Resolved,
    Ignored,
}

/// A conflict's kind, as the filters name it.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum ConflictKind {
    StaleVersion,
    Rejected,
    Invalid,
    Truncate,
}

/// A job's status, as the filters name it.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
}

/// A job's kind, as the filters name it.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum JobKind {
    Cycle,
    Resync,
    Load,
    Verify,
}

/// Starts a sync cycle: done once every change committed before it has an outcome.
#[utoipa::path(post, path = "/sync/trigger", tag = "sync", security(("bearer" = [])),
    request_body(content = Option<TriggerBody>, description = "Optional `{\"warehouses\": [\"wh-east\"]}`; no body for all", content_type = "application/json"),
    responses(
        (status = 202, description = "`{jobId, status: queued}`", body = Object),
        (status = 400, description = "Malformed JSON or an unknown field", body = ErrorBody),
        (status = 401, description = "No or wrong API key", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "An unknown or empty warehouse list", body = ErrorBody)))]
async fn trigger(
    State(state): State<Arc<ApiState>>,
    Body(body): Body<TriggerBody>,
) -> Result<Response, ApiError> {
    let (warehouses, verify) = body.map_or((None, false), |b| (b.warehouses, b.verify));
    let chosen = chosen_warehouses(&state, warehouses)?;
    let id = new_job_id();
    if verify {
        let options = serde_json::to_value(crate::jobs::verify::Options {
            strict: true,
            ..Default::default()
        })
        .unwrap_or_default();
        state
            .state
            .create_verify_job(&id, &chosen, &options, crate::jobs::RESYNC_TIMEOUT)
            .await
            .map_err(ApiError::internal)?;
        tracing::info!(job = %id, warehouses = ?chosen, "sync cycle with verify queued");
    } else {
        state
            .state
            .create_job(&id, "cycle", &chosen, state.job_timeout)
            .await
            .map_err(ApiError::internal)?;
        tracing::info!(job = %id, warehouses = ?chosen, "sync cycle queued");
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"jobId": id, "status": "queued"})),
    )
        .into_response())
}

/// Starts a verify job: compares each warehouse's mapped tables with central's listing.
#[utoipa::path(post, path = "/sync/verify", tag = "sync", security(("bearer" = [])),
    request_body(content = Option<VerifyBody>, description = "Optional `{\"warehouses\": [\"wh-east\"], \"tables\": [\"public.stock_levels\"], \"repair\": false}`; no body verifies every warehouse, read-only", content_type = "application/json"),
    responses(
        (status = 202, description = "`{jobId, status: queued}`; its status (`GET /sync/status/{jobId}`) carries each warehouse's `verify` report", body = Object),
        (status = 400, description = "Malformed JSON or an unknown field", body = ErrorBody),
        (status = 401, description = "No or wrong API key", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "An unknown or empty warehouse list, or a table no mapping names", body = ErrorBody)))]
async fn verify(
    State(state): State<Arc<ApiState>>,
    Body(body): Body<VerifyBody>,
) -> Result<Response, ApiError> {
    let (warehouses, tables, repair) =
        body.map_or((None, None, false), |b| (b.warehouses, b.tables, b.repair));
    let chosen = chosen_warehouses(&state, warehouses)?;
    if let Some(tables) = &tables {
        if tables.is_empty() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unprocessable",
                "tables must name at least one mapped table (or leave it out for all)",
            ));
        }
        if let Some(unknown) = tables.iter().find(|t| !state.mapped.contains(t)) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unprocessable",
                format!(
                    "table {unknown:?} is not mapped; mapped: {}",
                    state.mapped.join(", ")
                ),
            ));
        }
    }
    let options = serde_json::to_value(crate::jobs::verify::Options {
        repair,
        tables,
        ..Default::default()
    })
    .unwrap_or_default();
    let id = new_job_id();
    state
        .state
        .create_verify_job(&id, &chosen, &options, crate::jobs::RESYNC_TIMEOUT)
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(job = %id, warehouses = ?chosen, repair, "verify queued");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"jobId": id, "status": "queued"})),
    )
        .into_response())
}

/// The warehouses a job body names (all configured when left out), sorted, each once.
fn chosen_warehouses(
    state: &ApiState,
    warehouses: Option<Vec<String>>,
) -> Result<Vec<String>, ApiError> {
    let configured: Vec<String> = state.warehouses.iter().map(|w| w.id.clone()).collect();
    let mut chosen = match warehouses {
        None => configured.clone(),
        Some(list) if list.is_empty() => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unprocessable",
                "warehouses must name at least one warehouse (or leave it out for all)",
            ));
        }
        Some(list) => {
            if let Some(unknown) = list.iter().find(|w| !configured.contains(w)) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unprocessable",
                    format!(
                        "warehouse {unknown:?} is not configured; configured: {}",
                        configured.join(", ")
                    ),
                ));
            }
            list
        }
    };
    chosen.sort();
    chosen.dedup();
    Ok(chosen)
}

/// A job: status, timestamps and per-warehouse progress.
#[utoipa::path(get, path = "/sync/status/{job_id}", tag = "sync", security(("bearer" = [])),
    params(("job_id" = String, Path, description = "The job id (`sync-…`)")),
    responses(
        (status = 200, description = "The job", body = crate::store::Job),
        (status = 401, description = "No or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown job", body = ErrorBody)))]
async fn job_status(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(job_id): axum::extract::Path<String>,
) -> Result<Json<crate::store::Job>, ApiError> {
    match state.state.job(&job_id).await.map_err(ApiError::internal)? {
        Some(job) => Ok(Json(job)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job {job_id:?}"),
        )),
    }
}

/// Query string of `GET /sync/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobParams {
    status: Option<String>,
    kind: Option<String>,
    limit: Option<i64>,
    before: Option<String>,
}

/// Jobs, newest first, in pages (`next` is the `before` of the next page).
#[utoipa::path(get, path = "/sync/jobs", tag = "sync", security(("bearer" = [])),
    params(
        ("status" = Option<JobStatus>, Query, description = "queued, running, succeeded or failed"),
        ("kind" = Option<JobKind>, Query, description = "cycle, resync, load (a slot's initial load) or verify"),
        ("limit" = Option<i64>, Query, description = "1 to 500 (default 50)", minimum = 1, maximum = 500),
        ("before" = Option<String>, Query, description = "Only jobs older than this job id"),
    ),
    responses(
        (status = 200, description = "`{items: [Job], next}`", body = Object),
        (status = 400, description = "A bad filter", body = ErrorBody),
        (status = 401, description = "No or wrong API key", body = ErrorBody)))]
async fn list_jobs(
    State(state): State<Arc<ApiState>>,
    Params(p): Params<JobParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    const STATUSES: [&str; 4] = ["queued", "running", "succeeded", "failed"];
    const KINDS: [&str; 4] = [
        "cycle",
        "resync",
        crate::jobs::LOAD_JOB,
        crate::store::VERIFY_JOB,
    ];
    one_of("status", p.status.as_deref(), &STATUSES)?;
    one_of("kind", p.kind.as_deref(), &KINDS)?;
    let limit = page_limit(p.limit)?;
    let jobs = state
        .state
        .list_jobs(&JobQuery {
            status: p.status,
            kind: p.kind,
            before: p.before,
            limit: limit + 1,
        })
        .await
        .map_err(ApiError::internal)?;
    Ok(page(jobs, limit, |j| json!(j.job_id)))
}

/// `{items, next}` from `rows` fetched with `limit + 1`: `next` (the last item's `cursor`)
/// only when there is another page.
fn page<T: serde::Serialize>(
    mut rows: Vec<T>,
    limit: i64,
    cursor: impl Fn(&T) -> serde_json::Value,
) -> Json<serde_json::Value> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = match rows.last() {
        Some(last) if more => cursor(last),
        _ => serde_json::Value::Null,
    };
    Json(json!({"items": rows, "next": next}))
}

/// 404 unless `warehouse` is absent or configured.
fn configured(state: &ApiState, warehouse: Option<&str>) -> Result<(), ApiError> {
    match warehouse {
        Some(w) if !state.warehouses.iter().any(|s| s.id == w) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no warehouse {w:?} is configured"),
        )),
        _ => Ok(()),
    }
}

/// 400 unless `value` is absent or one of `allowed`.
fn one_of(name: &str, value: Option<&str>, allowed: &[&str]) -> Result<(), ApiError> {
    match value {
        Some(v) if !allowed.contains(&v) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{name} {v:?} is not one of {}", allowed.join(", ")),
        )),
        _ => Ok(()),
    }
}

/// The page size: default 50, 1 to 500.
fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("limit {limit} is out of range: expected 1 to {MAX_LIMIT}"),
        ))
    }
}

/// Prometheus text: the counters and histograms as they stand, and the gauges read now.
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text format 0.0.4 (`inventorysync_*`)", content_type = "text/plain")))]
async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let m = crate::metrics::metrics();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for w in &state.warehouses {
        let id = w.id.as_str();
        m.warehouse_ready
            .with_label_values(&[id])
            .set(i64::from(w.readiness().0));
        if let (Some(bytes), Some(seconds), Some(retained)) = crate::console::lag(w, now) {
            m.replication_lag_bytes.with_label_values(&[id]).set(bytes);
            m.replication_lag_seconds
                .with_label_values(&[id])
                .set(seconds);
            m.retained_wal_bytes.with_label_values(&[id]).set(retained);
        }
        if let Some(h) = &*w.slot_health.borrow() {
            for status in ["reserved", "extended", "unreserved", "lost", "unknown"] {
                m.wal_status
                    .with_label_values(&[id, status])
                    .set(i64::from(h.wal_status == status));
            }
        }
    }
    match &state.consumer_lag {
        ConsumerLag::Embedded(bus) => {
            for (w, n) in bus.pending() {
                m.consumer_lag
                    .with_label_values(&[w.as_str()])
                    .set(n as i64);
            }
        }
        ConsumerLag::Kafka(progress) => {
            let progress = progress.clone();
            let lag = tokio::task::spawn_blocking(move || progress.lag()).await;
            match lag {
                Ok(Ok(per_topic)) => {
                    for (topic, n) in per_topic {
                        m.consumer_lag.with_label_values(&[topic.as_str()]).set(n);
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "consumer lag unavailable"),
                Err(e) => tracing::debug!(error = %e, "consumer lag unavailable"),
            }
        }
    }
    match state.state.job_counts().await {
        Ok(counts) => {
            for kind in [
                "cycle",
                "resync",
                crate::jobs::LOAD_JOB,
                crate::store::VERIFY_JOB,
            ] {
                for status in ["queued", "running", "succeeded", "failed"] {
                    let n = counts
                        .iter()
                        .find(|(k, s, _)| k == kind && s == status)
                        .map_or(0, |c| c.2);
                    m.jobs.with_label_values(&[kind, status]).set(n);
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "job counts unavailable"),
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        m.render(),
    )
        .into_response()
}

/// `POST /sync/warehouses/{warehouseId}`: queues a forced resync of the warehouse's mapped
/// tables; 404 for an unknown warehouse, 409 (with its id) while one is queued or running.
#[utoipa::path(post, path = "/sync/warehouses/{warehouse_id}", tag = "sync", security(("bearer" = [])),
    params(("warehouse_id" = String, Path, description = "A configured warehouse")),
    responses(
        (status = 202, description = "`{jobId, status: queued}`", body = Object),
        (status = 401, description = "No or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown warehouse", body = ErrorBody),
        (status = 409, description = "A resync of this warehouse is queued or running; `jobId` names it", body = ErrorBody)))]
async fn resync(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(warehouse_id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    if !state.warehouses.iter().any(|w| w.id == warehouse_id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no warehouse {warehouse_id:?} is configured"),
        ));
    }
    if let Some(running) = state
        .state
        .active_job_for("resync", &warehouse_id)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("a resync of {warehouse_id} is already queued or running: {running}"),
        )
        .with_job(running));
    }
    let id = new_job_id();
    state
        .state
        .create_job(
            &id,
            "resync",
            std::slice::from_ref(&warehouse_id),
            crate::jobs::RESYNC_TIMEOUT,
        )
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(job = %id, warehouse = %warehouse_id, "resync queued");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"jobId": id, "status": "queued"})),
    )
        .into_response())
}
