//! Typed settings: environment first, `.env` when present, and a TOML file for warehouses.
//!
//! Every value is validated here, once, and reported with the key it came from and what was
//! expected, so the rest of the code works with types that cannot be invalid. Passwords are
//! held as `SecretString` and never printed: `Debug` of a connection shows `***`.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One key has a bad value.
    #[error("configuration key {key}: {reason}")]
    Invalid {
        /// Where the value came from (`DB_URL`, `warehouses[0].url`, …).
        key: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// The TOML file could not be read or parsed.
    #[error("configuration file {path}: {reason}")]
    File {
        /// File path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// libpq's `sslmode`, the subset we support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, without verifying the certificate.
    #[default]
    Prefer,
    /// TLS required, certificate not verified (libpq semantics).
    Require,
    /// TLS required, certificate chain and host name verified.
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" | "allow" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(format!(
                "sslmode {other:?} is not supported; expected disable, prefer, require or verify-full"
            )),
        }
    }
}

/// A parsed Postgres connection URL. The password is secret.
#[derive(Clone)]
pub struct ConnInfo {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role name.
    pub user: String,
    /// Password, if any.
    pub password: Option<SecretString>,
    /// Database name.
    pub dbname: String,
    /// TLS mode.
    pub sslmode: SslMode,
    /// PEM file with the CA certificates to trust for verify-full.
    pub sslrootcert: Option<PathBuf>,
    /// Connect timeout in seconds: for the whole connection setup (TCP, TLS, startup and
    /// authentication), as libpq counts it.
    pub connect_timeout_secs: u64,
    /// TCP keepalives (`keepalives`, `keepalives_idle`, `keepalives_interval`,
    /// `keepalives_count`, as libpq names them); none when `keepalives=0`.
    pub keepalives: Option<Keepalives>,
    /// `tcp_user_timeout` in milliseconds: how long sent data may stay unacknowledged
    /// before the kernel drops the connection (0: the system's default).
    pub tcp_user_timeout_ms: u64,
}

/// TCP keepalive settings of a connection: a peer that stops answering is noticed after
/// about `idle + interval × count` seconds of silence, even when nothing is being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalives {
    /// Seconds of idleness before the first probe.
    pub idle_secs: u64,
    /// Seconds between probes.
    pub interval_secs: u64,
    /// Unanswered probes before the connection is dropped.
    pub count: u32,
}

impl Default for Keepalives {
    /// 10 s idle, then a probe every 5 s, 3 probes: a dead peer is noticed in about 25 s
    /// (libpq leaves it to the system, two hours on Linux).
    fn default() -> Self {
        Self {
            idle_secs: 10,
            interval_secs: 5,
            count: 3,
        }
    }
}

impl Keepalives {
    /// The socket's keepalive setting.
    pub fn tcp(&self) -> socket2::TcpKeepalive {
        socket2::TcpKeepalive::new()
            .with_time(std::time::Duration::from_secs(self.idle_secs.max(1)))
            .with_interval(std::time::Duration::from_secs(self.interval_secs.max(1)))
            .with_retries(self.count.max(1))
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl ConnInfo {
    /// Parses `postgres://user:pass@host:port/db?sslmode=…` (also `postgresql://` and the
    /// `jdbc:postgresql://` form, where user and password may be query parameters).
    /// `key` names the setting in errors.
    pub fn parse(key: &str, input: &str) -> Result<Self, ConfigError> {
        let raw = input.trim();
        let raw = raw.strip_prefix("jdbc:").unwrap_or(raw);
        let url = url::Url::parse(raw).map_err(|e| {
            invalid(
                key,
                format!("not a URL ({e}); expected postgres://user:password@host:port/database"),
            )
        })?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(invalid(
                key,
                format!(
                    "scheme {:?} is not postgres:// or postgresql://",
                    url.scheme()
                ),
            ));
        }
        let decode = |s: &str| {
            percent_decode(s).map_err(|_| invalid(key, "user or password is not valid UTF-8"))
        };
        let mut user = decode(url.username())?;
        let mut password = url.password().map(decode).transpose()?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("localhost")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port().unwrap_or(5432);
        let mut dbname = decode(url.path().trim_start_matches('/'))?;
        let mut sslmode = SslMode::Prefer;
        let mut sslrootcert = None;
        let mut connect_timeout_secs = 10;
        let mut keepalives = Some(Keepalives::default());
        let mut ka = Keepalives::default();
        let mut tcp_user_timeout_ms = 0;
        let number = |name: &str, v: &str, what: &str| -> Result<u64, ConfigError> {
            v.trim()
                .parse()
                .map_err(|_| invalid(key, format!("{name} {v:?} is not {what}")))
        };
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "keepalives" => match v.as_ref() {
                    "0" => keepalives = None,
                    "1" => {}
                    other => {
                        return Err(invalid(key, format!("keepalives {other:?} is not 0 or 1")));
                    }
                },
                "keepalives_idle" => ka.idle_secs = number(&k, &v, "a number of seconds")?,
                "keepalives_interval" => ka.interval_secs = number(&k, &v, "a number of seconds")?,
                "keepalives_count" => {
                    ka.count = u32::try_from(number(&k, &v, "a count")?)
                        .map_err(|_| invalid(key, format!("keepalives_count {v:?} is too large")))?
                }
                "tcp_user_timeout" => {
                    tcp_user_timeout_ms = number(&k, &v, "a number of milliseconds")?
                }
                "sslmode" => sslmode = v.parse().map_err(|e: String| invalid(key, e))?,
                "sslrootcert" => sslrootcert = Some(PathBuf::from(v.as_ref())),
                "user" => user = v.into_owned(),
                "password" => password = Some(v.into_owned()),
                "dbname" => dbname = v.into_owned(),
                "connect_timeout" => {
                    connect_timeout_secs = v.parse().map_err(|_| {
                        invalid(
                            key,
                            format!("connect_timeout {v:?} is not a number of seconds"),
                        )
                    })?
                }
                "application_name" | "options" | "ssl" => {}
                other => {
                    return Err(invalid(
                        key,
                        format!(
                            "unknown connection parameter {other:?}; expected sslmode, sslrootcert, user, password, dbname, connect_timeout, keepalives, keepalives_idle, keepalives_interval, keepalives_count or tcp_user_timeout"
                        ),
                    ));
                }
            }
        }
        if user.is_empty() {
            user = std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into());
        }
        if password.is_none() {
            password = std::env::var("PGPASSWORD").ok();
        }
        if dbname.is_empty() {
            dbname = user.clone();
        }
        Ok(Self {
            host,
            port,
            user,
            password: password.map(SecretString::from),
            dbname,
            sslmode,
            sslrootcert,
            connect_timeout_secs,
            keepalives: keepalives.map(|_| ka),
            tcp_user_timeout_ms,
        })
    }

    /// The URL with the password replaced by `***`, safe to log.
    pub fn redacted(&self) -> String {
        let pw = if self.password.is_some() { ":***" } else { "" };
        format!(
            "postgres://{}{}@{}:{}/{}",
            self.user, pw, self.host, self.port, self.dbname
        )
    }

    /// A `tokio_postgres::Config` for ordinary SQL on the same server.
    pub fn to_pg_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("inventorysync")
            .connect_timeout(std::time::Duration::from_secs(self.connect_timeout_secs))
            .options("-c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=3");
        match &self.keepalives {
            Some(k) => {
                c.keepalives(true)
                    .keepalives_idle(std::time::Duration::from_secs(k.idle_secs.max(1)))
                    .keepalives_interval(std::time::Duration::from_secs(k.interval_secs.max(1)))
                    .keepalives_retries(k.count.max(1));
            }
            None => {
                c.keepalives(false);
            }
        }
        if self.tcp_user_timeout_ms > 0 {
            c.tcp_user_timeout(std::time::Duration::from_millis(self.tcp_user_timeout_ms));
        }
        if let Some(p) = &self.password {
            c.password(p.expose_secret());
        }
        c.ssl_mode(match self.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        c
    }
}

fn percent_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out)
}

/// A name used in SQL identifiers: publication and slot names.
fn check_identifier(key: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{v:?} must be 1 to 63 characters of a-z, 0-9 and _"),
        ))
    }
}

/// The default slot name for a warehouse: `inventorysync_<id>` sanitized to `[a-z0-9_]`.
pub fn default_slot_name(warehouse_id: &str) -> String {
    let mut s: String = format!("inventorysync_{warehouse_id}")
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.truncate(63);
    s
}

/// Which pgoutput protocol to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streaming {
    /// Protocol 1: whole transactions after commit.
    Off,
    /// Protocol 2 with `streaming 'on'`: large transactions in progress.
    On,
}

/// One warehouse database to stream.
#[derive(Debug, Clone)]
pub struct WarehouseConfig {
    /// Warehouse id, used in events and keys.
    pub id: String,
    /// Connection to the warehouse database.
    pub conn: ConnInfo,
    /// Publication name.
    pub publication: String,
    /// Replication slot name.
    pub slot: String,
    /// Protocol choice.
    pub streaming: Streaming,
    /// How often `run` writes a heartbeat message into the warehouse's WAL (none: never).
    pub heartbeat_interval: Option<std::time::Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    warehouses: Vec<FileWarehouse>,
    #[serde(default)]
    mappings: Vec<crate::consumer::settings::FileMapping>,
    #[serde(default)]
    rules: crate::consumer::settings::FileRules,
    #[serde(default)]
    batch: crate::consumer::settings::FileBatch,
    #[serde(default)]
    central: crate::consumer::settings::FileCentral,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWarehouse {
    id: String,
    url: String,
    publication: Option<String>,
    slot: Option<String>,
    sslmode: Option<String>,
    #[serde(default)]
    streaming: bool,
    /// Seconds between heartbeats; 0 turns them off.
    heartbeat_secs: Option<u64>,
}

/// A sync cycle fails unless done within this long (`SYNC_JOB_TIMEOUT_SECS`).
pub const DEFAULT_JOB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// State DB connection (`DB_URL`).
    pub db_url: Option<ConnInfo>,
    /// Kafka bootstrap servers (`KAFKA_BROKERS`); none means the embedded bus.
    pub kafka_brokers: Option<String>,
    /// Central inventory base URL (`WAREHOUSE_API_ENDPOINT`).
    pub warehouse_api_endpoint: Option<url::Url>,
    /// Bearer token for the central API (`WAREHOUSE_API_TOKEN`).
    pub warehouse_api_token: Option<SecretString>,
    /// Warehouses from the TOML file.
    pub warehouses: Vec<WarehouseConfig>,
    /// Mappings, rules, batching and central client knobs from the TOML file.
    pub consumer: crate::consumer::settings::ConsumerSettings,
    /// Address of the HTTP API (`API_LISTEN`, default `0.0.0.0:8080`).
    pub api_listen: std::net::SocketAddr,
    /// Bearer keys of the `/sync` routes (`API_KEYS`: plain or `sha256:<hex>`, comma-separated).
    pub api_keys: crate::api::ApiKeys,
    /// How long a sync cycle may take before it fails (`SYNC_JOB_TIMEOUT_SECS`, default 600).
    pub job_timeout: std::time::Duration,
}

/// The HTTP API's default address.
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:8080";

impl Config {
    /// Loads `.env` (when present), the environment, and the TOML file at `path` (a missing
    /// file is fine unless `required`).
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let _ = dotenvy::dotenv();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let db_url = env("DB_URL")
            .map(|v| ConnInfo::parse("DB_URL", &v))
            .transpose()?;
        let kafka_brokers = env("KAFKA_BROKERS");
        let warehouse_api_endpoint = env("WAREHOUSE_API_ENDPOINT")
            .map(|v| {
                url::Url::parse(&v).map_err(|e| {
                    invalid(
                        "WAREHOUSE_API_ENDPOINT",
                        format!("{e}; expected an http(s) URL"),
                    )
                })
            })
            .transpose()?;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => String::new(),
            Err(e) => {
                return Err(ConfigError::File {
                    path: path.into(),
                    reason: e.to_string(),
                });
            }
        };
        let (warehouses, consumer) = parse_file(path, &text)?;
        let listen = env("API_LISTEN").unwrap_or_else(|| DEFAULT_API_LISTEN.into());
        let api_listen = listen.trim().parse().map_err(|e| {
            invalid(
                "API_LISTEN",
                format!("{listen:?}: {e}; expected host:port such as {DEFAULT_API_LISTEN}"),
            )
        })?;
        let api_keys = crate::api::ApiKeys::parse(&env("API_KEYS").unwrap_or_default())?;
        let job_timeout = match env("SYNC_JOB_TIMEOUT_SECS") {
            None => DEFAULT_JOB_TIMEOUT,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(secs) if secs > 0 => std::time::Duration::from_secs(secs),
                _ => {
                    return Err(invalid(
                        "SYNC_JOB_TIMEOUT_SECS",
                        format!("{v:?} is not a positive number of seconds"),
                    ));
                }
            },
        };
        Ok(Self {
            db_url,
            kafka_brokers,
            warehouse_api_endpoint,
            warehouse_api_token: env("WAREHOUSE_API_TOKEN").map(SecretString::from),
            warehouses,
            consumer,
            api_listen,
            api_keys,
            job_timeout,
        })
    }
}

/// Parses and validates the `[[warehouses]]` of a TOML document.
pub fn parse_warehouses(path: &Path, text: &str) -> Result<Vec<WarehouseConfig>, ConfigError> {
    parse_file(path, text).map(|(w, _)| w)
}

/// Parses and validates a whole TOML document: warehouses, then the consumer's sections.
fn parse_file(
    path: &Path,
    text: &str,
) -> Result<
    (
        Vec<WarehouseConfig>,
        crate::consumer::settings::ConsumerSettings,
    ),
    ConfigError,
> {
    let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::File {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let consumer = crate::consumer::settings::ConsumerSettings::from_file(
        crate::consumer::settings::FileConsumer {
            mappings: file.mappings,
            rules: file.rules,
            batch: file.batch,
            central: file.central,
        },
    )?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, w) in file.warehouses.into_iter().enumerate() {
        let key = |f: &str| format!("warehouses[{i}].{f}");
        if w.id.trim().is_empty() {
            return Err(invalid(key("id"), "must not be empty"));
        }
        if !seen.insert(w.id.clone()) {
            return Err(invalid(key("id"), format!("{:?} is listed twice", w.id)));
        }
        let mut conn = ConnInfo::parse(&key("url"), &w.url)?;
        if let Some(m) = &w.sslmode {
            conn.sslmode = m.parse().map_err(|e: String| invalid(key("sslmode"), e))?;
        }
        let publication = w.publication.unwrap_or_else(|| "inventorysync".into());
        check_identifier(&key("publication"), &publication)?;
        let slot = w.slot.unwrap_or_else(|| default_slot_name(&w.id));
        check_identifier(&key("slot"), &slot)?;
        out.push(WarehouseConfig {
            id: w.id,
            conn,
            publication,
            slot,
            streaming: if w.streaming {
                Streaming::On
            } else {
                Streaming::Off
            },
            heartbeat_interval: match w.heartbeat_secs.unwrap_or(60) {
                0 => None,
                secs => Some(std::time::Duration::from_secs(secs)),
            },
        });
    }
    Ok((out, consumer))
}

/// Checks a slot or publication name given on the command line.
pub fn validate_name(key: &str, v: &str) -> Result<(), ConfigError> {
    check_identifier(key, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_hides_the_password() {
        let c = ConnInfo::parse(
            "DB_URL",
            "postgres://inv:s3cr%40t@db.local:6543/state?sslmode=require",
        )
        .unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.user.as_str()),
            ("db.local", 6543, "inv")
        );
        assert_eq!(c.password.as_ref().unwrap().expose_secret(), "s3cr@t");
        assert_eq!(c.sslmode, SslMode::Require);
        assert!(!format!("{c:?}").contains("s3cr"));
        assert_eq!(c.redacted(), "postgres://inv:***@db.local:6543/state");
    }

    #[test]
    fn accepts_the_jdbc_form() {
        let c = ConnInfo::parse(
            "DB_URL",
            "jdbc:postgresql://localhost:5432/inventory?user=app&password=pw",
        )
        .unwrap();
        assert_eq!((c.user.as_str(), c.dbname.as_str()), ("app", "inventory"));
    }

    #[test]
    fn tcp_keepalives_are_on_by_default_and_take_libpq_parameters() {
        let c = ConnInfo::parse("DB_URL", "postgres://h/db").unwrap();
        assert_eq!(c.keepalives, Some(Keepalives::default()));
        assert_eq!(c.tcp_user_timeout_ms, 0);
        let c = ConnInfo::parse(
            "DB_URL",
            "postgres://h/db?keepalives_idle=30&keepalives_interval=2&keepalives_count=4&tcp_user_timeout=20000",
        )
        .unwrap();
        assert_eq!(
            c.keepalives,
            Some(Keepalives {
                idle_secs: 30,
                interval_secs: 2,
                count: 4
            })
        );
        assert_eq!(c.tcp_user_timeout_ms, 20_000);
        let c = ConnInfo::parse("DB_URL", "postgres://h/db?keepalives=0").unwrap();
        assert_eq!(c.keepalives, None);
        let e = ConnInfo::parse("DB_URL", "postgres://h/db?keepalives_idle=soon")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("keepalives_idle \"soon\" is not a number of seconds"),
            "{e}"
        );
        let e = ConnInfo::parse("DB_URL", "postgres://h/db?keepalives=yes")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keepalives \"yes\" is not 0 or 1"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = ConnInfo::parse("DB_URL", "mysql://x")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("configuration key DB_URL:"), "{e}");
        let e = ConnInfo::parse("DB_URL", "postgres://h/db?sslmode=maybe")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode \"maybe\""), "{e}");
        let e = parse_warehouses(
            Path::new("x.toml"),
            "[[warehouses]]\nid='a'\nurl='postgres://h/db'\nslot='Bad-Name'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("warehouses[0].slot"), "{e}");
        let e = parse_warehouses(
            Path::new("x.toml"),
            "[[warehouses]]\nid='a'\nurl='postgres://h/db'\nbogus=1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn warehouse_defaults() {
        let w = parse_warehouses(
            Path::new("x.toml"),
            "[[warehouses]]\nid='WH-East'\nurl='postgres://u:pw@h/db'\n",
        )
        .unwrap();
        assert_eq!(w[0].publication, "inventorysync");
        assert_eq!(w[0].slot, "inventorysync_wh_east");
        assert_eq!(w[0].streaming, Streaming::Off);
    }
}

/// Kafka settings from the environment: `KAFKA_BROKERS` (given), `KAFKA_TOPIC` (name or
/// template with `{warehouse}`, `{schema}`, `{table}`), `KAFKA_PARTITIONS`,
/// `KAFKA_REPLICATION_FACTOR`, `KAFKA_LINGER_MS`, `KAFKA_BATCH_BYTES`, `KAFKA_COMPRESSION`,
/// `KAFKA_MESSAGE_TIMEOUT_MS`, and any librdkafka property as `KAFKA_PROPERTY_<NAME>`
/// (`KAFKA_PROPERTY_SECURITY_PROTOCOL=SASL_SSL` sets `security.protocol`).
pub fn kafka_settings(brokers: &str) -> Result<crate::bus::kafka::KafkaSettings, ConfigError> {
    kafka_settings_from(brokers, std::env::vars())
}

/// [`kafka_settings`] over any set of variables (for tests).
pub fn kafka_settings_from(
    brokers: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<crate::bus::kafka::KafkaSettings, ConfigError> {
    let mut s = crate::bus::kafka::KafkaSettings::new(brokers);
    if brokers.trim().is_empty() {
        return Err(invalid(
            "KAFKA_BROKERS",
            "is empty; expected host:port[,host:port]",
        ));
    }
    fn number<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, ConfigError> {
        v.trim()
            .parse()
            .map_err(|_| invalid(key, format!("{v:?} is not a valid number")))
    }
    for (k, v) in vars {
        match k.as_str() {
            "KAFKA_TOPIC" => {
                s.topic = crate::bus::topic::TopicTemplate::parse("KAFKA_TOPIC", &v)
                    .map_err(|e| invalid("KAFKA_TOPIC", e.to_string()))?;
            }
            "KAFKA_GROUP_ID" if !v.trim().is_empty() => s.group_id = v,
            "KAFKA_GROUP_INSTANCE_ID" if !v.trim().is_empty() => {
                let v = v.trim();
                let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
                if v.len() > 249 || !v.chars().all(valid) {
                    return Err(invalid(
                        &k,
                        format!("{v:?}: expected at most 249 of [a-zA-Z0-9._-]"),
                    ));
                }
                s.group_instance_id = Some(v.to_string());
            }
            "KAFKA_DLQ_TOPIC" => {
                let t = crate::bus::topic::TopicTemplate::parse("KAFKA_DLQ_TOPIC", &v)
                    .map_err(|e| invalid("KAFKA_DLQ_TOPIC", e.to_string()))?;
                if t.as_str().contains('{') {
                    return Err(invalid(
                        &k,
                        format!("{v:?}: the dead-letter topic is one topic, not a template"),
                    ));
                }
                s.dlq_topic = v;
            }
            "KAFKA_PARTITIONS" => s.partitions = number(&k, &v)?,
            "KAFKA_REPLICATION_FACTOR" => s.replication_factor = number(&k, &v)?,
            "KAFKA_LINGER_MS" => s.linger_ms = number(&k, &v)?,
            "KAFKA_BATCH_BYTES" => s.batch_bytes = number(&k, &v)?,
            "KAFKA_MESSAGE_TIMEOUT_MS" => s.message_timeout_ms = number(&k, &v)?,
            "KAFKA_COMPRESSION" => match v.as_str() {
                "none" | "gzip" | "snappy" | "lz4" | "zstd" => s.compression = v,
                other => {
                    return Err(invalid(
                        &k,
                        format!("{other:?}; expected none, gzip, snappy, lz4 or zstd"),
                    ));
                }
            },
            _ => {
                if let Some(name) = k.strip_prefix("KAFKA_PROPERTY_") {
                    let prop = name.to_ascii_lowercase().replace('_', ".");
                    s.properties.push((prop, SecretString::from(v)));
                }
            }
        }
    }
    if s.partitions < 1 || s.replication_factor < 1 {
        return Err(invalid(
            "KAFKA_PARTITIONS / KAFKA_REPLICATION_FACTOR",
            "must be at least 1",
        ));
    }
    Ok(s)
}

/// The default `group.instance.id` of a `run` process listening on `listen`: the host name
/// and the API port, the same when the process restarts and different for each process of
/// one host (two cannot listen on one port). None for port 0 (an ephemeral port differs at
/// each start: such a process joins as a dynamic member).
pub fn default_group_instance_id(listen: std::net::SocketAddr) -> Option<String> {
    if listen.port() == 0 {
        return None;
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(200)
        .collect();
    let host = if host.is_empty() {
        "inventorysync".into()
    } else {
        host
    };
    Some(format!("{host}-{}", listen.port()))
}

#[cfg(test)]
mod kafka_tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kafka_settings_read_the_environment() {
        let s = kafka_settings_from(
            "b:9092",
            vars(&[
                ("KAFKA_TOPIC", "cdc.{warehouse}.{table}"),
                ("KAFKA_PARTITIONS", "3"),
                ("KAFKA_PROPERTY_SECURITY_PROTOCOL", "SASL_SSL"),
                ("KAFKA_PROPERTY_SASL_PASSWORD", "hunter2"),
            ]),
        )
        .unwrap();
        assert_eq!(s.partitions, 3);
        assert_eq!(s.properties[0].0, "security.protocol");
        assert!(!format!("{s:?}").contains("hunter2"), "secrets stay hidden");
    }

    #[test]
    fn the_group_instance_id_is_stable_per_port_and_checked() {
        let a = default_group_instance_id("127.0.0.1:8080".parse().unwrap()).unwrap();
        assert_eq!(
            Some(a.clone()),
            default_group_instance_id("0.0.0.0:8080".parse().unwrap())
        );
        assert!(a.ends_with("-8080"), "{a}");
        assert_ne!(
            Some(a),
            default_group_instance_id("127.0.0.1:8081".parse().unwrap())
        );
        assert_eq!(
            default_group_instance_id("127.0.0.1:0".parse().unwrap()),
            None
        );
        let s =
            kafka_settings_from("b:9092", vars(&[("KAFKA_GROUP_INSTANCE_ID", "host-1")])).unwrap();
        assert_eq!(s.group_instance_id.as_deref(), Some("host-1"));
        let e = kafka_settings_from("b:9092", vars(&[("KAFKA_GROUP_INSTANCE_ID", "a b")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KAFKA_GROUP_INSTANCE_ID"), "{e}");
    }

    #[test]
    fn bad_kafka_settings_name_their_key() {
        let e = kafka_settings_from("b:9092", vars(&[("KAFKA_TOPIC", "cdc.{db}")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KAFKA_TOPIC"), "{e}");
        let e = kafka_settings_from("b:9092", vars(&[("KAFKA_LINGER_MS", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KAFKA_LINGER_MS") && e.contains("soon"), "{e}");
        assert!(kafka_settings_from(" ", vars(&[])).is_err());
    }
}
