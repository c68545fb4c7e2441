//! `inventorysync run`, composed: the bus (embedded or Kafka), one pipeline per warehouse
//! (see [`crate::app`]), the consumer stage, the job runners and the HTTP API, and the order in
//! which they stop. [`run_service`] reads top-down as the pipeline in docs/ARCHITECTURE.md:
//!
//! ```text
//!  plan: configuration, Kafka settings, central client, state DB URL (exit 2 on a bad value)
//!   └▶ state DB (migrated) ─▶ bus: embedded queue, or Kafka + the group's progress reader
//!       └▶ job runners (sync cycles; loads and resyncs), unless this is a consumer process
//!       └▶ HTTP API
//!       └▶ consumer stage (embedded: one reader per warehouse; Kafka: the consumer group)
//!       └▶ sources: one pipeline per warehouse (crate::app::run), until Ctrl-C or SIGTERM
//!  stop: consumers, then the API, then the job runners; the exit code says how it ended
//! ```

use std::collections::HashSet;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use crate::bus::embedded::EmbeddedBus;
use crate::bus::kafka::KafkaBus;
use crate::central::client::CentralClient;
use crate::cli::{fail, shutdown_token};
use crate::config::{Config, kafka_settings};
use crate::consumer::{self, DeadLetters, Stage};
use crate::store::StateDb;
use tokio_util::sync::CancellationToken;

/// Events each warehouse's embedded queue holds before the source waits (counted in
/// events, whatever the size of their transactions). 4,096 saved about 10 MB of peak RSS,
/// but a handover under a slow central then read its open transaction on to the commit too
/// slowly (see [`crate::consumer::IN_FLIGHT_CHANGES`]).
const EMBEDDED_QUEUE_EVENTS: usize = 16_384;

/// `inventorysync run`'s arguments.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Which stages this process runs. With Kafka, `source` processes (one owner per
    /// warehouse) and `consumer` processes (sharing the partitions in the consumer group) can
    /// run and scale apart; the embedded bus needs both in one process.
    #[arg(long, env = "RUN_STAGES", value_enum, default_value_t = Stages::All)]
    pub stages: Stages,
}

/// The stages one `run` process takes part in.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stages {
    /// Source and consumer stage.
    All,
    /// Warehouses to the bus only (with the /sync jobs that drive the sources).
    Source,
    /// The consumer stage only: the change topic to central.
    Consumer,
}

/// What `run` needs before it starts anything, checked first: the configuration, the Kafka
/// settings (none: the embedded bus), the central client (none: nothing is mapped) and the
/// state DB's URL. A bad value is an exit code 2 with its reason.
struct Plan {
    config: Config,
    kafka: Option<crate::bus::kafka::KafkaSettings>,
    client: Option<Arc<CentralClient>>,
    db_url: crate::pg::ConnInfo,
    run_source: bool,
    run_consumer: bool,
}

/// Loads and checks everything [`Plan`] holds.
fn plan(config_path: &Path, stages: Stages) -> Result<Plan, ExitCode> {
    let config = match Config::load(config_path, true) {
        Ok(c) => c,
        Err(e) => return Err(fail(e, 2)),
    };
    if stages != Stages::All && config.kafka_brokers.is_none() {
        return Err(fail(
            "RUN_STAGES (--stages) source or consumer needs KAFKA_BROKERS: the embedded bus runs both stages in one process",
            2,
        ));
    }
    let (run_source, run_consumer) = (stages != Stages::Consumer, stages != Stages::Source);
    if config.warehouses.is_empty() {
        return Err(fail(
            format!("{} lists no [[warehouses]]", config_path.display()),
            2,
        ));
    }
    let Some(db_url) = config.db_url.clone() else {
        return Err(fail(
            "DB_URL is not set: it names the state DB that holds the checkpoints",
            2,
        ));
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
                k.group_instance_id = crate::config::default_group_instance_id(config.api_listen);
            }
            k
        }
        Err(e) => return Err(fail(e, 2)),
    };
    let mapped = config.consumer.mappings.len();
    let client = match &config.warehouse_api_endpoint {
        Some(endpoint) => match CentralClient::new(
            endpoint,
            config.warehouse_api_token.clone(),
            config.consumer.central,
        ) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => return Err(fail(format!("WAREHOUSE_API_ENDPOINT: {e}"), 2)),
        },
        None if mapped > 0 => {
            return Err(fail(
                format!(
                    "{mapped} table(s) are mapped in [[mappings]] but WAREHOUSE_API_ENDPOINT is not set: it names the central inventory API, e.g. http://central:8080/api/warehouse"
                ),
                2,
            ));
        }
        None => None,
    };
    if mapped == 0 {
        tracing::warn!(
            "no [[mappings]] in the configuration: changes are published but none is sent to central"
        );
    }
    Ok(Plan {
        config,
        kafka,
        client,
        db_url,
        run_source,
        run_consumer,
    })
}

/// Runs the service until Ctrl-C or SIGTERM; the exit code says how it ended.
pub async fn run_service(config_path: &Path, stages: Stages) -> ExitCode {
    let Plan {
        config,
        kafka,
        client,
        db_url,
        run_source,
        run_consumer,
    } = match plan(config_path, stages) {
        Ok(p) => p,
        Err(code) => return code,
    };
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
        .map(|w| crate::app::WarehouseStatus::new(&w.id))
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
        Some(k) => match crate::consumer::kafka::GroupProgress::new(k) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => return fail(e, 2),
        },
    };
    let consumer_lag = match (&progress, &embedded_bus) {
        (Some(p), _) => crate::api::ConsumerLag::Kafka(p.clone()),
        (None, Some(bus)) => crate::api::ConsumerLag::Embedded(bus.clone()),
        (None, None) => return fail("no bus: neither KAFKA_BROKERS nor the embedded bus", 1),
    };
    // The console's sparklines: every warehouse's figures, sampled while the process runs.
    let history = Arc::new(crate::console::History::default());
    tokio::spawn(history.clone().run(statuses.clone(), cancel.clone()));
    // The consumer stage, for the API's replays of dead letters, once it exists.
    let replayer: Arc<std::sync::OnceLock<Arc<Stage>>> = Default::default();
    let api_state = Arc::new(crate::api::ApiState {
        state: state.clone(),
        keys: config.api_keys.clone(),
        warehouses: statuses.clone(),
        job_timeout: config.job_timeout,
        consumer_lag,
        replayer: replayer.clone(),
        history: history.clone(),
        slots: warehouses.iter().map(|w| w.slot.clone()).collect(),
        mapped: {
            let mut m: Vec<String> = config.consumer.mappings.keys().cloned().collect();
            m.sort();
            m
        },
    });
    let job_warehouses = || -> Vec<crate::jobs::Warehouse> {
        warehouses
            .iter()
            .zip(&statuses)
            .map(|(w, s)| crate::jobs::Warehouse {
                config: w.clone(),
                status: s.clone(),
            })
            .collect()
    };
    let delivery = || match &progress {
        None => crate::jobs::Delivery::Embedded,
        Some(p) => crate::jobs::Delivery::Kafka(p.clone()),
    };
    let mut mapped_tables: crate::jobs::MappedTables = config
        .consumer
        .mappings
        .iter()
        .map(|(table, m)| (table.clone(), m.fingerprint()))
        .collect();
    mapped_tables.sort();
    // Jobs drive the sources (cycles capture WAL positions, resyncs read chunks through the
    // stream): a consumer-only process leaves them to the source processes.
    let mut runners = tokio::task::JoinSet::new();
    if run_source {
        runners.spawn(crate::jobs::run(
            state.clone(),
            job_warehouses(),
            delivery(),
            cancel.clone(),
        ));
        let verifier = client
            .clone()
            .filter(|_| !config.consumer.mappings.is_empty())
            .map(|central| {
                Arc::new(crate::jobs::verify::Verifier {
                    settings: config.consumer.clone(),
                    central,
                })
            });
        runners.spawn(crate::jobs::run_resyncs(
            state.clone(),
            job_warehouses(),
            mapped_tables,
            delivery(),
            verifier,
            config.verify,
            cancel.clone(),
        ));
    }
    let listener = match tokio::net::TcpListener::bind(config.api_listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("API_LISTEN {}: {e}", config.api_listen), 1),
    };
    let api_address = listener.local_addr().unwrap_or(config.api_listen);
    let host = crate::ownership::host_name();
    let me = crate::store::WorkerIdentity {
        worker_id: crate::ownership::worker_id(config.worker_id.as_deref(), &host, api_address),
        session: format!("{:016x}", rand::random::<u64>()),
        host,
        pid: std::process::id(),
        api: api_address.to_string(),
    };
    let api_cancel = cancel.clone();
    let api = tokio::spawn(async move {
        if let Err(e) = crate::api::serve(listener, api_state, api_cancel.clone()).await {
            tracing::error!(error = %e, "the HTTP API stopped");
            api_cancel.cancel();
        }
    });
    let ids: HashSet<String> = warehouses.iter().map(|w| w.id.clone()).collect();
    let toast = || {
        crate::consumer::toast::ToastReader::new(
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
                let _ = replayer.set(stage.clone());
                bind_mappings(&stage, ids.iter());
                let consumer_cancel = cancel.clone();
                let failed = consumer_failed.clone();
                consumers.spawn(async move {
                    let result =
                        consumer::kafka::run(kafka, ids, stage.clone(), consumer_cancel.clone())
                            .await;
                    if let Err(e) = result {
                        tracing::error!(error = %e, "the consumer stage stopped");
                        let code = if e.is_transient() { 1 } else { 2 };
                        failed.store(code, std::sync::atomic::Ordering::SeqCst);
                        consumer_cancel.cancel();
                    }
                    stage.stopped().await;
                });
            }
            if run_source {
                tracing::info!(warehouses = warehouses.len(), bus = "kafka", worker = %me.worker_id, "running");
                let membership = crate::app::Membership::new(me);
                crate::app::run(
                    warehouses,
                    &statuses,
                    state,
                    bus,
                    membership,
                    cancel.clone(),
                )
                .await;
            } else {
                // The sources run in other processes; this one answers for them as a standby.
                for s in &statuses {
                    s.state.send_replace(crate::app::StreamState::Standby);
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
            // The consumer stage stops after the pipelines: at shutdown they wait (for a
            // while) for the outcome of what their streams handed on, which it gives.
            let stage_cancel = CancellationToken::new();
            let stage = Arc::new(Stage::new(
                config.consumer,
                client,
                state.clone(),
                DeadLetters::StateDb,
                toast(),
                stage_cancel.clone(),
            ));
            let _ = replayer.set(stage.clone());
            bind_mappings(&stage, warehouses.iter().map(|w| &w.id));
            for w in &warehouses {
                let Some(rx) = bus.subscribe(&w.id) else {
                    return fail(format!("warehouse {} is configured twice", w.id), 2);
                };
                consumers.spawn(consumer::embedded::run(
                    w.id.clone(),
                    rx,
                    stage.clone(),
                    stage_cancel.clone(),
                ));
            }
            tracing::info!(warehouses = warehouses.len(), bus = "embedded", worker = %me.worker_id, "running");
            // A warehouse this process comes to own may have been delivered by another since
            // this one last knew its lanes: they are read again from the state DB.
            let lanes = stage.clone();
            let membership = crate::app::Membership {
                me,
                on_owned: Some(Arc::new(move |id: String| {
                    let lanes = lanes.clone();
                    Box::pin(async move { lanes.forget_lanes(Some(&id)).await })
                })),
            };
            crate::app::run(
                warehouses,
                &statuses,
                state,
                bus,
                membership,
                cancel.clone(),
            )
            .await;
            stage_cancel.cancel();
            while consumers.join_next().await.is_some() {}
            stage.stopped().await;
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

/// Binds each warehouse's mappings to their tables in the background (see
/// [`crate::consumer::bindings`]).
fn bind_mappings<'a>(stage: &Arc<Stage>, warehouses: impl Iterator<Item = &'a String>) {
    for id in warehouses {
        let (stage, id) = (stage.clone(), id.clone());
        tokio::spawn(async move { stage.bind_mappings(&id).await });
    }
}
