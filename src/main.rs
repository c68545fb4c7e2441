//! The `inventorysync` command line: parse, set up logging, run.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use inventorysync::Lsn;
use inventorysync::bus::embedded::EmbeddedBus;
use inventorysync::bus::kafka::KafkaBus;
use inventorysync::central::client::CentralClient;
use inventorysync::central::server::{CentralServer, CentralStore, Faults};
use inventorysync::config::{Config, ConnInfo, Streaming, kafka_settings, validate_name};
use inventorysync::consumer::{self, DeadLetters, Stage};
use inventorysync::source::stream::SourceOptions;
use inventorysync::store::StateDb;
use inventorysync::tail::{Output, tail};
use tokio_util::sync::CancellationToken;

/// Events are many small allocations that live briefly; mimalloc handles that pattern with
/// far fewer instructions than the system allocator (see benches/decode.rs). Its `override`
/// feature also takes `malloc`/`free` of the C code linked in: librdkafka copies every
/// message it produces and fetches, and glibc's `malloc` and `free` were an eighth of the
/// Kafka source stage's CPU in a profile (scripts/bench-consumer, stages apart).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Events each warehouse's embedded queue holds before the source waits.
const EMBEDDED_QUEUE_EVENTS: usize = 16_384;

#[derive(Parser)]
#[command(
    name = "inventorysync",
    version,
    about = "Change data capture from warehouse PostgreSQL databases"
)]
struct Cli {
    /// Configuration file listing the warehouses.
    #[arg(long, global = true, default_value = "inventorysync.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream one slot as JSON change events, one per line (like pg_recvlogical).
    Tail(TailArgs),
    /// Create or update the state DB's tables (DB_URL).
    Migrate,
    /// Stream every configured warehouse to Kafka (or the embedded bus) and the consumer stage.
    Run(RunArgs),
    /// Serve the reference central inventory API (for the demo and tests).
    Central(CentralArgs),
    /// Check the configuration and every connection; exits 1 when something must be fixed.
    Check,
    /// After a warehouse was restored or recovered to an earlier point: move its WAL past
    /// every version central holds, so that the next run reloads it (stop run first).
    Rebase {
        /// The warehouse id (`[[warehouses]]`).
        warehouse: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Which stages this process runs. With Kafka, `source` processes (one owner per
    /// warehouse) and `consumer` processes (sharing the partitions in the consumer group) can
    /// run and scale apart; the embedded bus needs both in one process.
    #[arg(long, env = "RUN_STAGES", value_enum, default_value_t = Stages::All)]
    stages: Stages,
}

/// The stages one `run` process takes part in.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Stages {
    /// Source and consumer stage.
    All,
    /// Warehouses to the bus only (with the /sync jobs that drive the sources).
    Source,
    /// The consumer stage only: the change topic to central.
    Consumer,
}

#[derive(clap::Args)]
struct CentralArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: std::net::SocketAddr,
    /// Keep state in Postgres (table central_inventory) at this URL instead of in memory.
    #[arg(long, env = "CENTRAL_DB_URL", hide_env_values = true)]
    db_url: Option<String>,
    /// Require this bearer token.
    #[arg(long, env = "CENTRAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Share of change requests answered with --error-status (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Status of injected errors.
    #[arg(long, default_value_t = 503)]
    error_status: u16,
    /// Retry-After seconds sent with injected errors.
    #[arg(long)]
    retry_after_secs: Option<u64>,
    /// Delay before answering each change request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Answer `rejected` for changes whose key contains this text.
    #[arg(long)]
    reject_key_substring: Option<String>,
    /// Answer 422 for whole batches holding a change whose key contains this text.
    #[arg(long)]
    invalid_key_substring: Option<String>,
    /// Answer 413 for whole batches holding a change whose key contains this text.
    #[arg(long)]
    too_large_key_substring: Option<String>,
}

#[derive(clap::Args)]
struct TailArgs {
    /// Warehouse database URL: postgres://user:password@host:port/database[?sslmode=…].
    #[arg(
        long,
        env = "INVENTORYSYNC_SOURCE_URL",
        hide_env_values = true,
        required_unless_present = "warehouse"
    )]
    source: Option<String>,
    /// Take URL, slot and publication of this warehouse from the configuration file instead.
    #[arg(long, conflicts_with = "source")]
    warehouse: Option<String>,
    /// Replication slot name (default with --warehouse: the configured one).
    #[arg(long, required_unless_present = "warehouse")]
    slot: Option<String>,
    /// Publication name (default with --warehouse: the configured one).
    #[arg(long)]
    publication: Option<String>,
    /// Warehouse id written into events (default: the --warehouse id, else the database name).
    #[arg(long)]
    warehouse_id: Option<String>,
    /// Create the slot if missing, reading the published tables first (initial load).
    #[arg(long)]
    create_slot: bool,
    /// Exit once everything committed up to this LSN is written.
    #[arg(long)]
    endpos: Option<String>,
    /// Output file (appended to, resuming after its last line), or - for stdout.
    #[arg(short = 'o', long, default_value = "-")]
    output: String,
    /// Use pgoutput protocol 2 with streaming of large in-progress transactions.
    #[arg(long)]
    streaming: bool,
    /// Memory for in-progress streamed transactions before spilling to disk, in MiB.
    #[arg(long, default_value_t = 64)]
    stream_memory_mib: usize,
}

/// Turns transparent huge pages off for this process. With THP the first touch of memory the
/// allocator took back from the OS zeroes a whole 2 MiB page; the pipeline's batches make
/// the allocator do that all the time, and profiles of `run` showed a fifth of its CPU in
/// the kernel clearing pages (`scripts/bench-consumer`: 7.4 → 5.4 µs per row for `run`,
/// 4.5 → 3.2 for the reference central server).
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("INVENTORYSYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // `.env` before the arguments, so variables that flags read (RUN_STAGES) come from it too.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Tail(args) => runtime.block_on(run_tail(args, &cli.config)),
        Command::Migrate => runtime.block_on(run_migrate(&cli.config)),
        Command::Run(args) => runtime.block_on(run_service(&cli.config, args.stages)),
        Command::Central(args) => runtime.block_on(run_central(args)),
        Command::Check => runtime.block_on(run_check(&cli.config)),
        Command::Rebase { warehouse } => runtime.block_on(run_rebase(&cli.config, &warehouse)),
    }
}

async fn run_rebase(config_path: &Path, warehouse: &str) -> ExitCode {
    let config = match Config::load(config_path, true) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    let Some(w) = config.warehouses.iter().find(|w| w.id == warehouse) else {
        return fail(format!("no warehouse {warehouse:?} is configured"), 2);
    };
    let Some(db_url) = config.db_url else {
        return fail("DB_URL is not set: it names the state DB", 2);
    };
    let state = match StateDb::connect(&db_url).await {
        Ok(db) => db,
        Err(e) => return fail(e, 1),
    };
    if let Err(e) = state.migrate().await {
        return fail(e, 1);
    }
    match inventorysync::rebase::rebase(&state, w).await {
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

async fn run_check(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path, true) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    let report = inventorysync::check::check(&config).await;
    print!("{}", report.render());
    if report.failed() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn fail(message: impl std::fmt::Display, code: i32) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code as u8)
}

/// A token cancelled by Ctrl-C or SIGTERM.
fn shutdown_token() -> CancellationToken {
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

async fn run_service(config_path: &Path, stages: Stages) -> ExitCode {
    let config = match Config::load(config_path, true) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    if stages != Stages::All && config.kafka_brokers.is_none() {
        return fail(
            "RUN_STAGES (--stages) source or consumer needs KAFKA_BROKERS: the embedded bus runs both stages in one process",
            2,
        );
    }
    let (run_source, run_consumer) = (stages != Stages::Consumer, stages != Stages::Source);
    if config.warehouses.is_empty() {
        return fail(
            format!("{} lists no [[warehouses]]", config_path.display()),
            2,
        );
    }
    let Some(db_url) = config.db_url.clone() else {
        return fail(
            "DB_URL is not set: it names the state DB that holds the checkpoints",
            2,
        );
    };
    let kafka = match config
        .kafka_brokers
        .as_deref()
        .map(kafka_settings)
        .transpose()
    {
        Ok(mut k) => {
            if let Some(k) = k.as_mut()
                && k.group_instance_id.is_none()
            {
                k.group_instance_id =
                    inventorysync::config::default_group_instance_id(config.api_listen);
            }
            k
        }
        Err(e) => return fail(e, 2),
    };
    let mapped = config.consumer.mappings.len();
    let client = match &config.warehouse_api_endpoint {
        Some(endpoint) => match CentralClient::new(
            endpoint,
            config.warehouse_api_token.clone(),
            config.consumer.central,
        ) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => return fail(format!("WAREHOUSE_API_ENDPOINT: {e}"), 2),
        },
        None if mapped > 0 => {
            return fail(
                format!(
                    "{mapped} table(s) are mapped in [[mappings]] but WAREHOUSE_API_ENDPOINT is not set: it names the central inventory API, e.g. http://central:8080/api/warehouse"
                ),
                2,
            );
        }
        None => None,
    };
    if mapped == 0 {
        tracing::warn!(
            "no [[mappings]] in the configuration: changes are published but none is sent to central"
        );
    }
    let state = match StateDb::connect(&db_url).await {
        Ok(s) => s,
        Err(e) => return fail(e, 1),
    };
    if let Err(e) = state.migrate().await {
        return fail(e, 1);
    }
    let cancel = shutdown_token();
    let warehouses = config.warehouses;
    let statuses: Vec<_> = warehouses
        .iter()
        .map(|w| inventorysync::app::WarehouseStatus::new(&w.id))
        .collect();
    if config.api_keys.is_empty() {
        tracing::warn!("API_KEYS is not set: the /sync routes answer 401 until it is");
    }
    // The embedded bus (no Kafka) or the reader of the consumer group's progress (Kafka).
    let embedded_bus = kafka
        .is_none()
        .then(|| EmbeddedBus::new(EMBEDDED_QUEUE_EVENTS));
    let progress = match &kafka {
        None => None,
        Some(k) => match inventorysync::consumer::kafka::GroupProgress::new(k) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => return fail(e, 2),
        },
    };
    let consumer_lag = match (&progress, &embedded_bus) {
        (Some(p), _) => inventorysync::api::ConsumerLag::Kafka(p.clone()),
        (None, Some(bus)) => inventorysync::api::ConsumerLag::Embedded(bus.clone()),
        (None, None) => return fail("no bus: neither KAFKA_BROKERS nor the embedded bus", 1),
    };
    let api_state = Arc::new(inventorysync::api::ApiState {
        state: state.clone(),
        keys: config.api_keys.clone(),
        warehouses: statuses.clone(),
        job_timeout: config.job_timeout,
        consumer_lag,
    });
    let job_warehouses = || -> Vec<inventorysync::jobs::Warehouse> {
        warehouses
            .iter()
            .zip(&statuses)
            .map(|(w, s)| inventorysync::jobs::Warehouse {
                config: w.clone(),
                status: s.clone(),
            })
            .collect()
    };
    let delivery = || match &progress {
        None => inventorysync::jobs::Delivery::Embedded,
        Some(p) => inventorysync::jobs::Delivery::Kafka(p.clone()),
    };
    let mut mapped_tables: Vec<String> = config.consumer.mappings.keys().cloned().collect();
    mapped_tables.sort();
    // Jobs drive the sources (cycles capture WAL positions, resyncs read chunks through the
    // stream): a consumer-only process leaves them to the source processes.
    let mut runners = tokio::task::JoinSet::new();
    if run_source {
        runners.spawn(inventorysync::jobs::run(
            state.clone(),
            job_warehouses(),
            delivery(),
            cancel.clone(),
        ));
        runners.spawn(inventorysync::jobs::run_resyncs(
            state.clone(),
            job_warehouses(),
            mapped_tables,
            delivery(),
            cancel.clone(),
        ));
    }
    let listener = match tokio::net::TcpListener::bind(config.api_listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("API_LISTEN {}: {e}", config.api_listen), 1),
    };
    let api_cancel = cancel.clone();
    let api = tokio::spawn(async move {
        if let Err(e) = inventorysync::api::serve(listener, api_state, api_cancel.clone()).await {
            tracing::error!(error = %e, "the HTTP API stopped");
            api_cancel.cancel();
        }
    });
    let ids: HashSet<String> = warehouses.iter().map(|w| w.id.clone()).collect();
    let toast = || {
        inventorysync::consumer::toast::ToastReader::new(
            warehouses
                .iter()
                .map(|w| (w.id.clone(), w.conn.clone()))
                .collect(),
        )
    };
    let mut consumers = tokio::task::JoinSet::new();
    // The exit code when the consumer stage stopped the process (0: it did not).
    let consumer_failed = Arc::new(std::sync::atomic::AtomicU8::new(0));
    match kafka {
        Some(kafka) => {
            let bus = match KafkaBus::connect(kafka.clone()).await {
                Ok(b) => b,
                Err(e) => {
                    let code = if e.is_transient() { 1 } else { 2 };
                    return fail(e, code);
                }
            };
            if run_consumer && client.is_some() {
                let dead_letters = DeadLetters::Kafka {
                    bus: bus.clone(),
                    topic: kafka.dlq_topic.clone(),
                };
                let stage = Arc::new(Stage::new(
                    config.consumer,
                    client,
                    state.clone(),
                    dead_letters,
                    toast(),
                    cancel.clone(),
                ));
                let consumer_cancel = cancel.clone();
                let failed = consumer_failed.clone();
                consumers.spawn(async move {
                    if let Err(e) =
                        consumer::kafka::run(kafka, ids, stage, consumer_cancel.clone()).await
                    {
                        tracing::error!(error = %e, "the consumer stage stopped");
                        let code = if e.is_transient() { 1 } else { 2 };
                        failed.store(code, std::sync::atomic::Ordering::SeqCst);
                        consumer_cancel.cancel();
                    }
                });
            }
            if run_source {
                tracing::info!(warehouses = warehouses.len(), bus = "kafka", "running");
                inventorysync::app::run(warehouses, &statuses, state, bus, cancel.clone()).await;
            } else {
                // The sources run in other processes; this one answers for them as a standby.
                for s in &statuses {
                    s.state
                        .send_replace(inventorysync::app::StreamState::Standby);
                }
                tracing::info!(
                    warehouses = warehouses.len(),
                    bus = "kafka",
                    "running the consumer stage only"
                );
                cancel.cancelled().await;
            }
        }
        None => {
            let Some(bus) = embedded_bus else {
                return fail("no bus: neither KAFKA_BROKERS nor the embedded bus", 1);
            };
            let stage = Arc::new(Stage::new(
                config.consumer,
                client,
                state.clone(),
                DeadLetters::StateDb,
                toast(),
                cancel.clone(),
            ));
            for w in &warehouses {
                let Some(rx) = bus.subscribe(&w.id) else {
                    return fail(format!("warehouse {} is configured twice", w.id), 2);
                };
                consumers.spawn(consumer::embedded::run(
                    w.id.clone(),
                    rx,
                    stage.clone(),
                    cancel.clone(),
                ));
            }
            tracing::info!(warehouses = warehouses.len(), bus = "embedded", "running");
            inventorysync::app::run(warehouses, &statuses, state, bus, cancel.clone()).await;
        }
    }
    cancel.cancel();
    while consumers.join_next().await.is_some() {}
    let _ = api.await;
    while runners.join_next().await.is_some() {}
    match consumer_failed.load(std::sync::atomic::Ordering::SeqCst) {
        0 => ExitCode::SUCCESS,
        code => ExitCode::from(code),
    }
}

async fn run_central(args: CentralArgs) -> ExitCode {
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
                .connect_with(inventorysync::store::connect_options(&conn))
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

async fn run_migrate(config_path: &Path) -> ExitCode {
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

async fn run_tail(args: TailArgs, config_path: &Path) -> ExitCode {
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
