//! The `inventorysync` command line: parse, set up logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use inventorysync::cli::{self, CentralArgs, TailArgs};
use inventorysync::service::{self, RunArgs};

/// jemalloc with one arena, for Rust's allocations and (unprefixed) the C code's: librdkafka
/// copies every message it produces and fetches.
///
/// Events are allocated by the source's task and freed by the lanes' tasks, and tokio moves
/// tasks between its worker threads. An allocator with an arena or heap per thread (glibc's
/// default, mimalloc) reuses a freed block only on the thread that allocated it, so after an
/// outage, while the full queues turned over at full speed, `run` peaked at 130 to 142 MB of
/// RSS with mimalloc and glibc alike, against a heap of 67 MB (heaptrack). With one arena
/// every thread reuses what any other freed: 107 to 111 MB in the same catch-up, and no more
/// CPU per change than mimalloc on either bus (scripts/bench-faults, bench-consumer and
/// bench-drain, A/B in one session; docs/PERFORMANCE.md). Freed pages go back to the system
/// after a second, from jemalloc's own thread (its default of ten seconds held the Kafka
/// source stage at twice mimalloc's RSS).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation, before `main` (see [`GLOBAL`]).
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "malloc_conf")]
static MALLOC_CONF: &u8 =
    &b"narenas:1,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

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
    /// Compare central with a warehouse (the `run` process that streams it does the work) and
    /// print what differs; exits 0 when equal (or repaired), 3 when drift remains, 1 when it
    /// could not tell.
    Verify(cli::VerifyArgs),
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
        Command::Tail(args) => runtime.block_on(cli::run_tail(args, &cli.config)),
        Command::Migrate => runtime.block_on(cli::run_migrate(&cli.config)),
        Command::Run(args) => runtime.block_on(service::run_service(&cli.config, args.stages)),
        Command::Central(args) => runtime.block_on(cli::run_central(args)),
        Command::Check => runtime.block_on(cli::run_check(&cli.config)),
        Command::Rebase { warehouse } => runtime.block_on(cli::run_rebase(&cli.config, &warehouse)),
        Command::Verify(args) => runtime.block_on(cli::run_verify(&cli.config, args)),
    }
}
