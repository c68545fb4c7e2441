//! The commands besides `run` (which is [`crate::service`]): their arguments and what each
//! does, so that `main.rs` only parses and dispatches.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::Lsn;
use crate::central::server::{CentralServer, CentralStore, Faults};
use crate::config::{Config, ConnInfo, Streaming, validate_name};
use crate::source::stream::SourceOptions;
use crate::store::StateDb;
use crate::tail::{Output, tail};

/// `inventorysync central`'s arguments.
#[derive(clap::Args)]
pub struct CentralArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: std::net::SocketAddr,
    /// Keep state in Postgres (table central_inventory) at this URL instead of in memory.
    #[arg(long, env = "CENTRAL_DB_URL", hide_env_values = true)]
    pub db_url: Option<String>,
    /// Require this bearer token.
    #[arg(long, env = "CENTRAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Share of change requests answered with --error-status (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Status of injected errors.
    #[arg(long, default_value_t = 503)]
    pub error_status: u16,
    /// Retry-After seconds sent with injected errors.
    #[arg(long)]
    pub retry_after_secs: Option<u64>,
    /// Delay before answering each change request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Answer `rejected` for changes whose key contains this text.
    #[arg(long)]
    pub reject_key_substring: Option<String>,
    /// Answer 422 for whole batches holding a change whose key contains this text.
    #[arg(long)]
    pub invalid_key_substring: Option<String>,
    /// Answer 413 for whole batches holding a change whose key contains this text.
    #[arg(long)]
    pub too_large_key_substring: Option<String>,
}

/// `inventorysync tail`'s arguments.
#[derive(clap::Args)]
pub struct TailArgs {
    /// Warehouse database URL: postgres://user:password@host:port/database[?sslmode=…].
    #[arg(
        long,
        env = "INVENTORYSYNC_SOURCE_URL",
        hide_env_values = true,
        required_unless_present = "warehouse"
    )]
    pub source: Option<String>,
    /// Take URL, slot and publication of this warehouse from the configuration file instead.
    #[arg(long, conflicts_with = "source")]
    pub warehouse: Option<String>,
    /// Replication slot name (default with --warehouse: the configured one).
    #[arg(long, required_unless_present = "warehouse")]
    pub slot: Option<String>,
    /// Publication name (default with --warehouse: the configured one).
    #[arg(long)]
    pub publication: Option<String>,
    /// Warehouse id written into events (default: the --warehouse id, else the database name).
    #[arg(long)]
    pub warehouse_id: Option<String>,
    /// Create the slot if missing, reading the published tables first (initial load).
    #[arg(long)]
    pub create_slot: bool,
    /// Exit once everything committed up to this LSN is written.
    #[arg(long)]
    pub endpos: Option<String>,
    /// Output file (appended to, resuming after its last line), or - for stdout.
    #[arg(short = 'o', long, default_value = "-")]
    pub output: String,
    /// Use pgoutput protocol 2 with streaming of large in-progress transactions.
    #[arg(long)]
    pub streaming: bool,
    /// Memory for in-progress streamed transactions before spilling to disk, in MiB.
    #[arg(long, default_value_t = 64)]
    pub stream_memory_mib: usize,
}

/// `inventorysync rebase <warehouse>`: see [`crate::rebase`].
pub async fn run_rebase(config_path: &Path, warehouse: &str) -> ExitCode {
    let config = match Config::load(config_path, true) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    let Some(w) = config.warehouses.iter().find(|w| w.id == warehouse) else {
        return fail(format!("no warehouse {warehouse:?} is configured"), 2);
    };
    let state = match migrated_state_db(config.db_url.as_ref()).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match crate::rebase::rebase(&state, w).await {
        Ok(r) => {
            println!(
                "warehouse {warehouse}: WAL moved from {} to {} (past {}, {} segment switch(es)); slot {} {}; {} load(s)/resync(s) under way failed; history recorded (system {}, timeline {}). Start run: it creates the slot and reloads every published table at versions above what central holds.",
                r.from,
                r.to,
                r.past,
                r.switches,
                w.slot,
                if r.dropped_slot {
                    "dropped"
                } else {
                    "was absent"
                },
                r.failed_jobs,
                r.origin.system_id,
                r.origin.timeline
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e, 1),
    }
}

/// `inventorysync check`: prints the report; exit code 1 when something must be fixed.
pub async fn run_check(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path, true) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    let report = crate::check::check(&config).await;
    print!("{}", report.render());
    if report.failed() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Prints `error: <message>` and gives exit code `code` (2: configuration, 1: the rest).
pub fn fail(message: impl std::fmt::Display, code: i32) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code as u8)
}

/// A token cancelled by Ctrl-C or SIGTERM.
pub fn shutdown_token() -> CancellationToken {
    let cancel = CancellationToken::new();
    let signal_cancel = cancel.clone();
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        signal_cancel.cancel();
    });
    cancel
}

/// `inventorysync central`: serves the reference central inventory API.
pub async fn run_central(args: CentralArgs) -> ExitCode {
    if !(0.0..=1.0).contains(&args.error_rate) {
        return fail(
            format!("--error-rate {}: expected 0.0 to 1.0", args.error_rate),
            2,
        );
    }
    let store = match &args.db_url {
        None => CentralStore::memory(),
        Some(url) => {
            let conn = match ConnInfo::parse("CENTRAL_DB_URL", url) {
                Ok(c) => c,
                Err(e) => return fail(e, 2),
            };
            let pool = match sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect_with(crate::store::connect_options(&conn))
                .await
            {
                Ok(p) => p,
                Err(e) => return fail(format!("central store {}: {e}", conn.redacted()), 1),
            };
            match CentralStore::postgres(pool).await {
                Ok(s) => s,
                Err(e) => return fail(format!("central store {}: {e}", conn.redacted()), 1),
            }
        }
    };
    let server = CentralServer {
        store,
        token: args.token,
        faults: Faults {
            error_rate: args.error_rate,
            error_status: Some(args.error_status),
            retry_after_secs: args.retry_after_secs,
            latency_ms: args.latency_ms,
            reject_key_substring: args.reject_key_substring,
            invalid_key_substring: args.invalid_key_substring,
            too_large_key_substring: args.too_large_key_substring,
            ..Faults::default()
        },
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("--listen {}: {e}", args.listen), 2),
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    eprintln!(
        "central inventory API on http://{addr}/api/warehouse (faults: GET/PUT /admin/faults)"
    );
    match server.serve(listener, shutdown_token()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, 1),
    }
}

/// `inventorysync migrate`: creates or updates the state DB's tables.
pub async fn run_migrate(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path, false) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    let Some(db_url) = config.db_url else {
        return fail(
            "DB_URL is not set: it names the state DB, e.g. postgres://user:password@host:5432/inventorysync_state",
            2,
        );
    };
    let db = match StateDb::connect(&db_url).await {
        Ok(db) => db,
        Err(e) => return fail(e, 1),
    };
    match db.migrate().await {
        Ok(()) => {
            println!("state DB {} is up to date", db_url.redacted());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e, 1),
    }
}

/// Resolves the warehouse to tail from the flags, or from the configuration file.
fn tail_target(args: &TailArgs, config_path: &Path) -> Result<SourceOptions, ExitCode> {
    let (conn, warehouse_id, slot, publication, streaming) = match &args.warehouse {
        Some(id) => {
            let config = Config::load(config_path, true).map_err(|e| fail(e, 2))?;
            let Some(w) = config.warehouses.into_iter().find(|w| &w.id == id) else {
                return Err(fail(
                    format!("warehouse {id:?} is not in {}", config_path.display()),
                    2,
                ));
            };
            let streaming = w.streaming == Streaming::On;
            (w.conn, w.id, w.slot, w.publication, streaming)
        }
        None => {
            let source = args.source.as_deref().unwrap_or_default();
            let conn = ConnInfo::parse("--source", source).map_err(|e| fail(e, 2))?;
            let id = conn.dbname.clone();
            let slot = args.slot.clone().unwrap_or_default();
            (conn, id, slot, "inventorysync".to_string(), false)
        }
    };
    let slot = args.slot.clone().unwrap_or(slot);
    let publication = args.publication.clone().unwrap_or(publication);
    for (key, v) in [("--slot", &slot), ("--publication", &publication)] {
        validate_name(key, v).map_err(|e| fail(e, 2))?;
    }
    let warehouse_id = args.warehouse_id.clone().unwrap_or(warehouse_id);
    let mut opts = SourceOptions::new(&warehouse_id, conn, &slot, &publication);
    opts.streaming = args.streaming || streaming;
    Ok(opts)
}

/// `inventorysync tail`: streams one slot as JSON lines.
pub async fn run_tail(args: TailArgs, config_path: &Path) -> ExitCode {
    let mut opts = match tail_target(&args, config_path) {
        Ok(o) => o,
        Err(code) => return code,
    };
    let endpos = match args.endpos.as_deref().map(str::parse::<Lsn>).transpose() {
        Ok(e) => e,
        Err(e) => return fail(format!("--endpos: {e}"), 2),
    };
    opts.create_slot = args.create_slot;
    opts.endpos = endpos;
    opts.stream_memory_bytes = args.stream_memory_mib << 20;
    let output = if args.output == "-" {
        Output::Stdout
    } else {
        Output::File(PathBuf::from(&args.output))
    };
    match tail(opts, output, shutdown_token()).await {
        Ok(summary) => {
            tracing::info!(
                events = summary.events,
                skipped = summary.skipped,
                peak_rss_kb = peak_rss_kb(),
                "tail finished"
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, e.exit_code()),
    }
}

/// Peak resident set size of this process (VmHWM), in KiB.
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `inventorysync verify`'s arguments.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The warehouse id (`[[warehouses]]`).
    #[arg(long)]
    pub warehouse: String,
    /// Fix what is found: upsert missing and different rows, delete rows only at central.
    #[arg(long)]
    pub repair: bool,
    /// Only this mapped table (`schema.table`); repeat for several. All when left out.
    #[arg(long = "table")]
    pub tables: Vec<String>,
    /// Give up waiting after this many seconds (the job goes on in `run`).
    #[arg(long, default_value_t = 3600)]
    pub wait_secs: u64,
}

/// How long a queued verify may wait for a `run` process to start it before the command
/// says that none is working on the warehouse.
const VERIFY_PICKUP: std::time::Duration = std::time::Duration::from_secs(30);

/// Queues a verify job of one warehouse in the state DB (as `POST /sync/verify` does), follows
/// it while the `run` process that streams the warehouse works on it, and prints its report
/// and findings. Exit code: 0 equal or repaired, 3 drift remains, 1 could not tell.
pub async fn run_verify(config_path: &Path, args: VerifyArgs) -> ExitCode {
    let config = match Config::load(config_path, true) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    if !config.warehouses.iter().any(|w| w.id == args.warehouse) {
        return fail(
            format!("no warehouse {:?} is configured", args.warehouse),
            2,
        );
    }
    if let Some(t) = args
        .tables
        .iter()
        .find(|t| !config.consumer.mappings.contains_key(*t))
    {
        let mut mapped: Vec<&String> = config.consumer.mappings.keys().collect();
        mapped.sort();
        return fail(
            format!(
                "table {t:?} is not mapped; mapped: {}",
                mapped
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            2,
        );
    }
    let state = match migrated_state_db(config.db_url.as_ref()).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let options = crate::jobs::verify::Options {
        repair: args.repair,
        tables: (!args.tables.is_empty()).then_some(args.tables.clone()),
        ..Default::default()
    };
    let id = crate::store::new_job_id();
    if let Err(e) = state
        .create_verify_job(
            &id,
            std::slice::from_ref(&args.warehouse),
            &serde_json::to_value(&options).unwrap_or_default(),
            crate::store::RESYNC_TIMEOUT,
        )
        .await
    {
        return fail(e, 1);
    }
    eprintln!(
        "verify job {id} queued for warehouse {} ({}); the run process that streams it does the work",
        args.warehouse,
        if args.repair { "repair" } else { "read-only" }
    );
    let started = std::time::Instant::now();
    let mut shown = String::new();
    let job = loop {
        let job = match state.job(&id).await {
            Ok(Some(j)) => j,
            Ok(None) => return fail(format!("job {id} vanished from the state DB"), 1),
            Err(e) => return fail(e, 1),
        };
        if job.status == "succeeded" || job.status == "failed" {
            break job;
        }
        if job.status == "queued" && started.elapsed() > VERIFY_PICKUP {
            return fail(
                format!(
                    "no run process has started job {id} after {} s: start `inventorysync run` (a verify needs the stream of warehouse {} to know what central has been sent); the job stays queued",
                    VERIFY_PICKUP.as_secs(),
                    args.warehouse
                ),
                1,
            );
        }
        if started.elapsed().as_secs() > args.wait_secs {
            return fail(
                format!(
                    "job {id} is still {} after {} s; it goes on in run (GET /sync/status/{id})",
                    job.status, args.wait_secs
                ),
                1,
            );
        }
        if let Some(r) = job.warehouses.first().and_then(|w| w.verify.as_ref()) {
            let line = format!(
                "compared {} row(s), findings {}",
                r["compared"], r["findings"]
            );
            if line != shown {
                eprintln!("{line}");
                shown = line;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let w = job.warehouses.first();
    let report = w.and_then(|w| w.verify.clone()).unwrap_or_default();
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    let findings = state
        .list_conflicts(&crate::store::ConflictQuery {
            warehouse: Some(args.warehouse.clone()),
            status: None,
            kind: Some("drift".into()),
            before_id: None,
            limit: 50,
        })
        .await
        .unwrap_or_default();
    let since = job.started_at.clone().unwrap_or_default();
    // Open drift (this job's findings, and the same found before), and what this job repaired.
    for c in findings.iter().filter(|c| {
        c.status == "open"
            || c.resolved_at
                .as_deref()
                .is_some_and(|r| r >= since.as_str())
    }) {
        println!(
            "{} #{} {} {}: {} [{}]{}",
            c.status,
            c.id,
            c.rule.as_deref().unwrap_or_default(),
            c.entity_key,
            c.reason,
            c.hint,
            c.resolution_note
                .as_deref()
                .map(|n| format!(" — {n}"))
                .unwrap_or_default()
        );
    }
    if job.status == "failed" {
        return fail(
            format!("verify job {id} failed: {}", job.error.unwrap_or_default()),
            1,
        );
    }
    match report["verdict"].as_str() {
        Some("equal") | Some("repaired") => ExitCode::SUCCESS,
        Some("drift") => ExitCode::from(3),
        _ => ExitCode::from(1),
    }
}

/// The state DB at `DB_URL`, its tables created or upgraded; the exit code when it cannot be.
async fn migrated_state_db(db_url: Option<&ConnInfo>) -> Result<StateDb, ExitCode> {
    let Some(db_url) = db_url else {
        return Err(fail("DB_URL is not set: it names the state DB", 2));
    };
    let state = StateDb::connect(db_url).await.map_err(|e| fail(e, 1))?;
    state.migrate().await.map_err(|e| fail(e, 1))?;
    Ok(state)
}
