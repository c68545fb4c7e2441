//! Test services: real PostgreSQL servers (15 by default, 14–18 by choice) started with `initdb`, one per kind, shared by
//! every test of this binary; each test gets its own database, slot and publication names.
//!
//! `INVENTORYSYNC_TEST_PG_BIN` names the Postgres bin directory (default: the Debian
//! location). Running as root, the servers run as the `postgres` OS user. Each server is
//! stopped by a watchdog once this test process exits.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use inventorysync::Lsn;
use inventorysync::config::ConnInfo;
use inventorysync::source::assemble::StreamItem;
use inventorysync::source::stream::{SourceOptions, run};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Password of the roles the tests create.
pub const PASSWORD: &str = "s3cret-pw";

/// A running server.
pub struct Pg {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Data and socket directory.
    pub dir: PathBuf,
}

/// The Postgres bin directory: `INVENTORYSYNC_TEST_PG_BIN`, else Debian's PostgreSQL 15. With
/// `INVENTORYSYNC_TEST_PG_VERSION` (14–18, as `scripts/test` installs them), its server must
/// be of that major version.
fn pg_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let wanted = std::env::var("INVENTORYSYNC_TEST_PG_VERSION").ok();
        let bin = match std::env::var_os("INVENTORYSYNC_TEST_PG_BIN") {
            Some(b) => PathBuf::from(b),
            None if wanted.is_some() => panic!(
                "INVENTORYSYNC_TEST_PG_VERSION={} needs INVENTORYSYNC_TEST_PG_BIN: run the tests with scripts/test, which installs that version",
                wanted.unwrap_or_default()
            ),
            None => PathBuf::from("/usr/lib/postgresql/15/bin"),
        };
        if let Some(wanted) = wanted {
            let out = Command::new(bin.join("postgres"))
                .arg("--version")
                .output()
                .expect("postgres --version runs");
            let version = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                version
                    .split_whitespace()
                    .nth(2)
                    .is_some_and(|v| v.split('.').next() == Some(wanted.as_str())),
                "INVENTORYSYNC_TEST_PG_VERSION={wanted}, but {} is {version}",
                bin.display()
            );
        }
        bin
    })
    .clone()
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Postgres refuses to run as root: when we are root, its files belong to `postgres`.
fn give_to_postgres(path: &Path) {
    if is_root() {
        Command::new("chown")
            .args(["-R", "postgres"])
            .arg(path)
            .status()
            .unwrap();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Pg {
    /// Starts a server with these extra `postgresql.conf` lines.
    pub fn start(name: &str, conf: &str) -> Pg {
        let dir =
            std::env::temp_dir().join(format!("inventorysync-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        give_to_postgres(&dir);
        let data = dir.join("data");
        let out = as_pg_user(&pg_bin().join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let hba = "local all all trust\n\
                   host all postgres 127.0.0.1/32 trust\n\
                   host replication postgres 127.0.0.1/32 trust\n\
                   host all md5_user 127.0.0.1/32 md5\n\
                   host replication md5_user 127.0.0.1/32 md5\n\
                   host all clear_user 127.0.0.1/32 password\n\
                   host replication clear_user 127.0.0.1/32 password\n\
                   host all all 127.0.0.1/32 scram-sha-256\n\
                   host replication all 127.0.0.1/32 scram-sha-256\n";
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        let conf_all = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_wal_senders = 200\nmax_replication_slots = 400\nmax_connections = 300\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             password_encryption = 'scram-sha-256'\nshared_buffers = '128MB'\n{conf}\n",
            dir.display()
        );
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        existing.push_str(&conf_all);
        std::fs::write(data.join("postgresql.conf"), existing).unwrap();
        give_to_postgres(&dir);
        let out = as_pg_user(&pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "start"])
            .stdout(Stdio::null())
            .output()
            .expect("pg_ctl runs");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        let pg = Pg { port, dir };
        watch_and_remove(&pg);
        pg
    }
}

/// Stops the server and removes its files when this process goes away, however it ends
/// (each run's clusters take over a gigabyte).
fn watch_and_remove(pg: &Pg) {
    let (dir, data) = (&pg.dir, pg.dir.join("data"));
    let watchdog = format!(
        "while [ -d /proc/{pid} ]; do sleep 1; done; {ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        ctl = pg_bin().join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display(),
    );
    let mut w = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", &watchdog]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &watchdog]);
        c
    };
    w.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // The watchdog must outlive this process, so it is never waited for.
    #[allow(clippy::zombie_processes)]
    w.spawn().expect("watchdog starts");
}

impl Pg {
    /// Runs `pg_ctl` on this server's data directory; whether it succeeded.
    pub fn ctl(&self, args: &[&str]) -> bool {
        as_pg_user(&pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A physical standby of this server, from a copy of its cleanly stopped data directory
    /// (the npm packages have no `pg_basebackup`), streaming through the physical slot
    /// `slot` (created here) with `conf` added; both servers run when it returns.
    pub fn standby(&self, name: &str, slot: &str, conf: &str) -> Pg {
        run_sql_blocking(
            self.port,
            &format!("SELECT pg_create_physical_replication_slot('{slot}')"),
        );
        assert!(self.ctl(&["-m", "fast", "-w", "stop"]), "the primary stops");
        let dir =
            std::env::temp_dir().join(format!("inventorysync-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("cp")
            .arg("-a")
            .arg(self.dir.join("data"))
            .arg(dir.join("data"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "copy of the primary's data directory");
        let data = dir.join("data");
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        let port = free_port();
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&format!(
            "port = {port}\nunix_socket_directories = '{}'\nhot_standby = on\n\
             primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres application_name={name}'\n\
             primary_slot_name = '{slot}'\n{conf}\n",
            dir.display(),
            self.port
        ));
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        std::fs::write(data.join("standby.signal"), "").unwrap();
        give_to_postgres(&dir);
        let standby = Pg { port, dir };
        assert!(self.ctl(&["-w", "start"]), "the primary starts again");
        assert!(
            standby.ctl(&["-w", "start"]),
            "the standby starts: {}",
            std::fs::read_to_string(standby.dir.join("log")).unwrap_or_default()
        );
        watch_and_remove(&standby);
        standby
    }

    /// URL for `user` (password auth unless postgres) on `db`.
    pub fn url(&self, user: &str, db: &str) -> String {
        if user == "postgres" {
            format!(
                "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
                self.port
            )
        } else {
            format!(
                "postgres://{user}:{PASSWORD}@127.0.0.1:{}/{db}?sslmode=disable",
                self.port
            )
        }
    }

    /// The existing database `name` (on a standby: the primary's, copied), with a client.
    pub async fn db(&self, name: &str) -> TestDb {
        TestDb {
            name: name.to_string(),
            port: self.port,
            url: self.url("postgres", "x"),
            client: connect(&self.url("postgres", name)).await,
        }
    }

    /// A fresh database with a client connected as postgres.
    pub async fn new_db(&self, prefix: &str) -> TestDb {
        init_logs();
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{}_{}",
            prefix.to_lowercase(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let admin = connect(&self.url("postgres", "postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let client = connect(&self.url("postgres", &name)).await;
        TestDb {
            name,
            port: self.port,
            url: self.url("postgres", "x"),
            client,
        }
    }
}

/// Runs SQL on a server's postgres database from outside any runtime.
fn run_sql_blocking(port: u16, sql: &str) {
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable");
    let sql = sql.to_string();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                connect(&url).await.batch_execute(&sql).await.unwrap();
            })
    })
    .join()
    .unwrap();
}

/// The major version of the servers the tests run (14 to 18).
pub fn pg_major() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        let out = Command::new(pg_bin().join("postgres"))
            .arg("--version")
            .output()
            .expect("postgres --version runs");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next()?.parse().ok())
            .expect("a version in postgres --version")
    })
}

/// Sends the engine's logs to the test output when `INVENTORYSYNC_LOG` is set.
pub fn init_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if let Ok(filter) = std::env::var("INVENTORYSYNC_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// The main server: logical WAL, TLS on with a self-signed certificate for `localhost`.
pub fn pg() -> &'static Pg {
    static PG: OnceLock<Pg> = OnceLock::new();
    PG.get_or_init(|| {
        let pg = Pg::start(
            "main",
            "wal_level = logical\nlogical_decoding_work_mem = '64kB'\n",
        );
        make_tls_cert(&pg);
        pg
    })
}

/// A second server whose `wal_level` is `replica`.
pub fn pg_replica_level() -> &'static Pg {
    static PG: OnceLock<Pg> = OnceLock::new();
    PG.get_or_init(|| Pg::start("replica", "wal_level = replica\n"))
}

/// A third server where slots lose WAL quickly (`max_slot_wal_keep_size`).
pub fn pg_small_keep() -> &'static Pg {
    static PG: OnceLock<Pg> = OnceLock::new();
    PG.get_or_init(|| {
        Pg::start(
            "smallkeep",
            "wal_level = logical\nmax_slot_wal_keep_size = '1MB'\nmin_wal_size = '32MB'\nmax_wal_size = '32MB'\n",
        )
    })
}

/// A server whose commits wait for a synchronous standby that never comes
/// (`synchronous_standby_names = 'nobody'`) when a session asks for `synchronous_commit = on`:
/// such a commit is in the WAL (and decoded) but invisible to other sessions until its wait
/// is cancelled.
pub fn pg_sync_standby() -> &'static Pg {
    static PG: OnceLock<Pg> = OnceLock::new();
    PG.get_or_init(|| {
        Pg::start(
            "syncstandby",
            "wal_level = logical\nsynchronous_standby_names = 'nobody'\n",
        )
    })
}

fn make_tls_cert(pg: &Pg) {
    let data = pg.dir.join("data");
    let script = format!(
        "set -e; cd {d}; \
         openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=inventorysync-test-ca -keyout ca.key -out ca.crt; \
         openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr; \
         printf 'subjectAltName=DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > ext.cnf; \
         openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out server.crt",
        d = data.display()
    );
    let ok = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "openssl could not make a test certificate");
    if is_root() {
        Command::new("chown")
            .args(["postgres"])
            .arg(data.join("server.key"))
            .arg(data.join("server.crt"))
            .status()
            .unwrap();
    }
    Command::new("chmod")
        .arg("600")
        .arg(data.join("server.key"))
        .status()
        .unwrap();
    std::fs::copy(data.join("ca.crt"), pg.dir.join("ca.crt")).unwrap();
    let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    std::fs::write(data.join("postgresql.conf"), conf).unwrap();
    let out = as_pg_user(&pg_bin().join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("reload")
        .output()
        .unwrap();
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(300));
}

/// Connects as a plain SQL client.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// One test's database.
pub struct TestDb {
    /// Database name.
    pub name: String,
    /// Server port.
    pub port: u16,
    url: String,
    /// SQL client as postgres.
    pub client: tokio_postgres::Client,
}

impl TestDb {
    /// URL of this database for `user`.
    pub fn url_as(&self, user: &str) -> String {
        let base = if user == "postgres" {
            format!("postgres://postgres@127.0.0.1:{}", self.port)
        } else {
            format!("postgres://{user}:{PASSWORD}@127.0.0.1:{}", self.port)
        };
        let _ = &self.url;
        format!("{base}/{}?sslmode=disable", self.name)
    }

    /// Connection info for postgres on this database.
    pub fn conn(&self) -> ConnInfo {
        ConnInfo::parse("test", &self.url_as("postgres")).unwrap()
    }

    /// Runs SQL (several statements allowed).
    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// WAL the slot `slot` (as named by [`TestDb::slot`]) retains past its confirmed position.
    /// Drops `slot`, waiting (up to 10 s) for a killed client's walsender to let go of it.
    pub async fn drop_slot_when_free(&self, slot: &str) {
        let sql = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'"
        );
        for _ in 0..100 {
            if self.client.simple_query(&sql).await.is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("slot {slot} could not be dropped within 10 s");
    }

    pub async fn slot_lag_bytes(&self, slot: &str) -> i64 {
        self.client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), confirmed_flush_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot(slot)],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// `pg_current_wal_insert_lsn()`: with `synchronous_commit = off` the write position
    /// can lag commits that already happened.
    pub async fn current_lsn(&self) -> Lsn {
        let s: String = self
            .client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        s.parse().unwrap()
    }

    /// The cluster-wide slot name for this database's slot `slot`.
    pub fn slot(&self, slot: &str) -> String {
        format!("{}_{slot}", self.name)
    }

    /// Source options for slot `slot` and publication `pub` on this database.
    pub fn options(&self, slot: &str, publication: &str) -> SourceOptions {
        let mut o = SourceOptions::new(&self.name, self.conn(), &self.slot(slot), publication);
        o.max_reconnects = Some(0);
        o.slot_busy_wait = Duration::from_secs(1);
        o
    }

    /// Streams with `opts` until `endpos` and returns every event as JSON.
    pub async fn drain(&self, opts: SourceOptions) -> Vec<serde_json::Value> {
        drain(opts)
            .await
            .unwrap_or_else(|e| panic!("streaming failed: {e}"))
    }

    /// Streams everything committed so far.
    pub async fn drain_now(&self, mut opts: SourceOptions) -> Vec<serde_json::Value> {
        opts.endpos = Some(self.current_lsn().await);
        self.drain(opts).await
    }
}

/// Runs the source, hands every event to `on_event`, and confirms each commit as soon as
/// its events were handed over. The consumer first sleeps for `stall`.
pub async fn stream_with(
    opts: SourceOptions,
    stall: Duration,
    on_event: impl FnMut(&inventorysync::event::ChangeEvent) + Send + 'static,
) -> Result<(), inventorysync::source::SourceError> {
    stream_until(opts, stall, CancellationToken::new(), on_event).await
}

/// [`stream_with`] that also stops when `cancel` is cancelled.
pub async fn stream_until(
    opts: SourceOptions,
    stall: Duration,
    cancel: CancellationToken,
    mut on_event: impl FnMut(&inventorysync::event::ChangeEvent) + Send + 'static,
) -> Result<(), inventorysync::source::SourceError> {
    let (tx, mut rx) = mpsc::channel::<Vec<StreamItem>>(1);
    let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);
    let consumer = tokio::spawn(async move {
        tokio::time::sleep(stall).await;
        while let Some(batch) = rx.recv().await {
            for item in batch {
                match item {
                    StreamItem::Change(ev) => on_event(&ev),
                    StreamItem::Commit { end_lsn, .. } => {
                        let _ = durable_tx.send(end_lsn);
                    }
                }
            }
        }
    });
    let result = tokio::time::timeout(Duration::from_secs(120), run(&opts, tx, durable_rx, cancel))
        .await
        .expect("streaming finished within 120 s");
    consumer.await.unwrap();
    result
}

/// Streams with `opts` and returns every event as JSON.
pub async fn drain(
    opts: SourceOptions,
) -> Result<Vec<serde_json::Value>, inventorysync::source::SourceError> {
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    stream_with(opts, Duration::ZERO, move |ev| {
        sink.lock()
            .unwrap()
            .push(serde_json::from_str(&ev.to_json()).unwrap())
    })
    .await?;
    let events = std::mem::take(&mut *events.lock().unwrap());
    Ok(events)
}

/// The `after` (or `before` for deletes) of each event as `(op, row)`.
pub fn ops(events: &[serde_json::Value]) -> Vec<(String, serde_json::Value)> {
    events
        .iter()
        .map(|e| {
            let op = e["op"].as_str().unwrap().to_string();
            let row = if op == "d" {
                e["before"].clone()
            } else {
                e["after"].clone()
            };
            (op, row)
        })
        .collect()
}

/// Apache Kafka's installation that scripts/lib/kafka.sh makes (a directory whose `lib/`
/// holds the broker's jars, and `log4j2.properties`), found as it leaves it when
/// `INVENTORYSYNC_TEST_KAFKA_HOME` is not set.
pub fn kafka_home() -> PathBuf {
    if let Some(p) = std::env::var_os("INVENTORYSYNC_TEST_KAFKA_HOME") {
        return PathBuf::from(p);
    }
    let pom = include_str!("../../scripts/lib/kafka/pom.xml");
    let version = pom
        .split_once("<kafka.version>")
        .and_then(|(_, rest)| rest.split_once('<'))
        .map(|(v, _)| v)
        .expect("scripts/lib/kafka/pom.xml names <kafka.version>");
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_default();
    cache.join(format!("inventorysync/kafka-{version}"))
}

/// The cluster id every test node is formatted with (a node joins only its own cluster's
/// quorum; each test cluster has its own ports and directories).
const CLUSTER_ID: &str = "aW52ZW50b3J5c3luYy10MQ";

/// One Apache Kafka node in KRaft mode, broker and controller combined, on loopback, with
/// its configuration, data and log in a directory of its own. It stops when this process
/// exits (a wrapper shell watches it), and can be killed and started again.
pub struct KafkaNode {
    /// Its node id in the quorum.
    pub id: u32,
    /// `127.0.0.1:port` of its client listener.
    pub address: String,
    dir: PathBuf,
}

impl KafkaNode {
    /// Writes node `id`'s configuration (`port` for clients, `controller` for the quorum,
    /// `voters` the quorum's `id@host:port` list; `extra` more broker settings), formats its
    /// storage and starts it.
    pub fn start(id: u32, port: u16, controller: u16, voters: &str, extra: &str) -> KafkaNode {
        let node = Self::configure(id, port, controller, voters, extra);
        node.spawn();
        node.wait_listening();
        node
    }

    /// Writes node `id`'s configuration (see [`KafkaNode::start`]) without starting it.
    pub fn configure(id: u32, port: u16, controller: u16, voters: &str, extra: &str) -> KafkaNode {
        let dir = std::env::temp_dir().join(format!("inventorysync-kafka-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the broker's directory");
        let replicas = voters.split(',').count().min(3);
        std::fs::write(
            dir.join("server.properties"),
            format!(
                "process.roles=broker,controller\n\
                 node.id={id}\n\
                 controller.quorum.voters={voters}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
                 controller.listener.names=CONTROLLER\n\
                 listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
                 inter.broker.listener.name=PLAINTEXT\n\
                 log.dirs={data}\n\
                 num.partitions=1\n\
                 offsets.topic.replication.factor={replicas}\n\
                 offsets.topic.num.partitions=10\n\
                 transaction.state.log.replication.factor={replicas}\n\
                 transaction.state.log.min.isr=1\n\
                 group.initial.rebalance.delay.ms=0\n\
                 {extra}\n",
                data = dir.join("data").display(),
            ),
        )
        .expect("the broker's configuration");
        KafkaNode {
            id,
            address: format!("127.0.0.1:{port}"),
            dir,
        }
    }

    /// Starts the node (again): [`KafkaNode::spawn`], then waits until it listens.
    pub fn run(&self) {
        self.spawn();
        self.wait_listening();
    }

    /// Starts the node without waiting: formats its storage the first time, then runs the
    /// broker under a wrapper that kills it once this test process is gone. (The nodes of a
    /// cluster start together: a node's broker serves once the quorum has a leader.)
    pub fn spawn(&self) {
        let home = kafka_home();
        assert!(
            home.join("lib").is_dir(),
            "Apache Kafka is not installed at {} (scripts/test installs it; or set INVENTORYSYNC_TEST_KAFKA_HOME)",
            home.display()
        );
        let java = format!(
            "java -Xms128m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true -Dlog4j2.configurationFile={log4j} -cp '{lib}/*'",
            log4j = home.join("log4j2.properties").display(),
            lib = home.join("lib").display(),
        );
        let script = format!(
            "cd {dir} || exit 1; \
             [ -f data/meta.properties ] || {java} kafka.tools.StorageTool format --ignore-formatted -t {CLUSTER_ID} -c server.properties >>broker.log 2>&1 || exit 1; \
             {java} kafka.Kafka server.properties >>broker.log 2>&1 & b=$!; \
             echo $b > pid; \
             while [ -d /proc/{me} ] && kill -0 $b 2>/dev/null; do sleep 1; done; kill -9 $b 2>/dev/null; \
             [ -d /proc/{me} ] || rm -rf {dir}",
            dir = self.dir.display(),
            me = std::process::id(),
        );
        let _ = std::fs::remove_file(self.dir.join("pid"));
        // The wrapper outlives this process on purpose, to stop the broker after it.
        #[allow(clippy::zombie_processes)]
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh starts the broker");
    }

    /// Waits until the node listens for clients (120 s at most: a JVM starting on two busy
    /// cores).
    pub fn wait_listening(&self) {
        for _ in 0..1200 {
            if std::net::TcpStream::connect(&self.address).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "Apache Kafka did not listen on {} within 120 s; its log ends:\n{}",
            self.address,
            self.log_tail()
        );
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`, `KILL`) to the broker's JVM.
    pub fn signal(&self, signal: &str) {
        let pid = std::fs::read_to_string(self.dir.join("pid")).expect("the broker's pid file");
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.trim())
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{signal} the broker of node {}", self.id);
    }

    /// Kills the broker's JVM (kill -9) and waits until its port is free.
    pub fn kill(&self) {
        self.signal("KILL");
        for _ in 0..100 {
            if std::net::TcpStream::connect(&self.address).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A Kafka broker for the tests: Apache Kafka, a single KRaft node (DESIGN §8).
pub struct Broker {
    /// `127.0.0.1:port`.
    pub address: String,
    /// The node; none for an external broker.
    node: Option<KafkaNode>,
}

impl Broker {
    /// Starts a single-node broker that stops when this process exits.
    pub fn start() -> Broker {
        let (port, controller) = (free_port(), free_port());
        let node = KafkaNode::start(
            1,
            port,
            controller,
            &format!("1@127.0.0.1:{controller}"),
            "",
        );
        Broker {
            address: node.address.clone(),
            node: Some(node),
        }
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the broker process.
    pub fn signal(&self, signal: &str) {
        self.node
            .as_ref()
            .expect(
                "an external broker cannot be signalled; start a dedicated one with Broker::start",
            )
            .signal(signal);
    }
}

/// The broker shared by the tests of this binary, started on first use; an external one
/// when `INVENTORYSYNC_TEST_KAFKA_BROKERS` names it (e.g. from docker-compose.test.yml).
pub fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(|| match std::env::var("INVENTORYSYNC_TEST_KAFKA_BROKERS") {
        Ok(address) if !address.trim().is_empty() => Broker {
            address,
            node: None,
        },
        _ => Broker::start(),
    })
}

/// A TCP proxy in front of a server, able to partition the network: while partitioned it
/// forwards nothing and says nothing (no reset, no close), as packets dropped on the way
/// would; what was in flight waits, as TCP retransmits it, and goes on once healed.
pub struct Proxy {
    /// The port to connect to instead of the server's.
    pub port: u16,
    partitioned: tokio::sync::watch::Sender<bool>,
    _stop: tokio_util::sync::DropGuard,
}

impl Proxy {
    /// Forwards 127.0.0.1:`port` (a new free port) to 127.0.0.1:`upstream`.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (partitioned, gate) = tokio::sync::watch::channel(false);
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    a = listener.accept() => match a { Ok((c, _)) => c, Err(_) => continue },
                    _ = token.cancelled() => return,
                };
                let (mut gate, token) = (gate.clone(), token.clone());
                tokio::spawn(async move {
                    wait_healed(&mut gate).await;
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = async { tokio::join!(pump(cr, sw, gate.clone()), pump(sr, cw, gate)) } => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            partitioned,
            _stop: stop.drop_guard(),
        }
    }

    /// Cuts (`true`) or heals (`false`) the network between the clients and the server.
    pub fn partition(&self, cut: bool) {
        self.partitioned.send_replace(cut);
    }
}

async fn wait_healed(gate: &mut tokio::sync::watch::Receiver<bool>) {
    while *gate.borrow_and_update() {
        if gate.changed().await.is_err() {
            return;
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        wait_healed(&mut gate).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        wait_healed(&mut gate).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
