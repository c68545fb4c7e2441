//! Typed settings: environment first, `.env` when present, and a TOML file for warehouses.
//!
//! Every value is validated here, once, and reported with the key it came from and what was
//! expected, so the rest of the code works with types that cannot be invalid. Passwords are
//! held as `SecretString` and never printed: `Debug` of a connection shows `***`.

use std::collections::HashSet;

use std::path::Path;

use secrecy::SecretString;
use serde::Deserialize;

pub use crate::app::{Streaming, WarehouseConfig};
pub use crate::pg::{ConnInfo, Keepalives, SslMode};
pub use crate::setting::ConfigError;
use crate::setting::invalid;

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
    #[serde(default)]
    verify: FileVerify,
}

/// `[verify]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVerify {
    every: Option<String>,
    max_rows_per_second: Option<u64>,
}

pub use crate::jobs::verify::{DEFAULT_VERIFY_ROWS_PER_SECOND, VerifySchedule};

/// A duration written `90s`, `30m`, `24h` or `7d`.
fn duration(key: &str, text: &str) -> Result<std::time::Duration, ConfigError> {
    let t = text.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let secs = match (n.parse::<u64>(), unit) {
        (Ok(n), "s") => Some(n),
        (Ok(n), "m") => n.checked_mul(60),
        (Ok(n), "h") => n.checked_mul(3600),
        (Ok(n), "d") => n.checked_mul(86_400),
        _ => None,
    };
    match secs {
        Some(s) if s > 0 => Ok(std::time::Duration::from_secs(s)),
        _ => Err(invalid(
            key,
            format!(
                "{text:?} is not a duration; expected a positive whole number and s, m, h or d, e.g. \"24h\""
            ),
        )),
    }
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
    /// A failover slot (PostgreSQL 17+).
    #[serde(default)]
    failover: bool,
    /// The primary of a standby that `url` points at: where logical messages are written.
    primary_url: Option<String>,
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
    /// This process's id among the `run` processes of the state DB (`WORKER_ID`; default
    /// `{host}:{API port}`).
    pub worker_id: Option<String>,
    /// Scheduled verification (`[verify]`).
    pub verify: VerifySchedule,
}

/// The HTTP API's default address.
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:8080";

/// The central API's bearer token from `raw`: without the white space around it (the line
/// break a secret read from a file keeps), and refused when a character of it cannot go in an
/// HTTP header (it would be left out of every request, and central's 401s would blame the
/// credential). The error never shows the token.
fn api_token(raw: &str) -> Result<SecretString, ConfigError> {
    let token = raw.trim();
    // RFC 9110 §5.5: visible ASCII, spaces and tabs (and obsolete bytes, which no token holds).
    if let Some((at, c)) = token
        .char_indices()
        .find(|&(_, c)| !(c == ' ' || c == '\t' || c.is_ascii_graphic()))
    {
        let what = match c {
            '\n' => "a line feed".to_string(),
            '\r' => "a carriage return".to_string(),
            c if c.is_control() => format!("control character U+{:04X}", c as u32),
            c => format!("non-ASCII character U+{:04X}", c as u32),
        };
        return Err(invalid(
            "WAREHOUSE_API_TOKEN",
            format!(
                "has {what} at byte {at} of {}, which an HTTP header cannot carry; expected visible ASCII characters",
                token.len()
            ),
        ));
    }
    Ok(SecretString::from(token.to_string()))
}

impl Config {
    /// Loads `.env` (when present), the environment, and the TOML file at `path` (a missing
    /// file is fine unless `required`).
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let _ = dotenvy::dotenv();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let db_url = env("DB_URL").map(|v| state_db_url(&v)).transpose()?;
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
        let (warehouses, consumer, verify) = parse_file(path, &text)?;
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
            warehouse_api_token: env("WAREHOUSE_API_TOKEN")
                .map(|t| api_token(&t))
                .transpose()?,
            warehouses,
            consumer,
            api_listen,
            api_keys,
            job_timeout,
            worker_id: env("WORKER_ID"),
            verify,
        })
    }
}

/// Parses and validates the `[[warehouses]]` of a TOML document.
pub fn parse_warehouses(path: &Path, text: &str) -> Result<Vec<WarehouseConfig>, ConfigError> {
    parse_file(path, text).map(|(w, ..)| w)
}

/// Parses and validates a whole TOML document: warehouses, then the consumer's sections.
fn parse_file(
    path: &Path,
    text: &str,
) -> Result<
    (
        Vec<WarehouseConfig>,
        crate::consumer::settings::ConsumerSettings,
        VerifySchedule,
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
    let verify = VerifySchedule {
        every: file
            .verify
            .every
            .as_deref()
            .map(|e| duration("verify.every", e))
            .transpose()?,
        max_rows_per_second: match file.verify.max_rows_per_second {
            None => DEFAULT_VERIFY_ROWS_PER_SECOND,
            Some(0) => {
                return Err(invalid(
                    "verify.max_rows_per_second",
                    "0 would never finish; expected a positive number of rows per second",
                ));
            }
            Some(n) => n,
        },
    };
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
            failover: w.failover,
            primary: w
                .primary_url
                .as_deref()
                .map(|u| ConnInfo::parse(&key("primary_url"), u))
                .transpose()?,
        });
    }
    Ok((out, consumer, verify))
}

/// Parses `DB_URL`: one server (the state DB's client takes no host list; a failover of the
/// state DB goes through a proxy or a DNS name that follows the primary).
pub fn state_db_url(v: &str) -> Result<ConnInfo, ConfigError> {
    let conn = ConnInfo::parse("DB_URL", v)?;
    if !conn.more_hosts.is_empty() || conn.target_session_attrs != crate::pg::SessionAttrs::Any {
        return Err(invalid(
            "DB_URL",
            "takes one host, without target_session_attrs (several hosts are for warehouse URLs); point it at the state DB's primary, a proxy, or a DNS name that follows the primary",
        ));
    }
    Ok(conn)
}

/// `url` as it may be printed: a password as `***`, and the query's values (an API key
/// given as `?key=…`) as `***` too.
pub fn redacted_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    if shown.query().is_some() {
        let names: Vec<String> = shown.query_pairs().map(|(n, _)| n.into_owned()).collect();
        shown.query_pairs_mut().clear();
        for n in names {
            shown.query_pairs_mut().append_pair(&n, "***");
        }
    }
    shown.to_string()
}

/// Checks a slot or publication name given on the command line.
pub fn validate_name(key: &str, v: &str) -> Result<(), ConfigError> {
    check_identifier(key, v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_printed_url_shows_no_password_and_no_query_value() {
        let url = url::Url::parse("https://ops:pa55@central.example/api/warehouse?key=k3y&v=2")
            .expect("a URL");
        let shown = super::redacted_url(&url);
        assert_eq!(
            shown,
            "https://ops:***@central.example/api/warehouse?key=***&v=***"
        );
        let plain = url::Url::parse("http://127.0.0.1:9000/api").expect("a URL");
        assert_eq!(super::redacted_url(&plain), "http://127.0.0.1:9000/api");
    }

    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn the_api_token_is_trimmed_and_refused_when_a_header_cannot_carry_it() {
        let ok = |raw: &str| api_token(raw).map(|t| t.expose_secret().to_string());
        assert_eq!(ok("tok-1\n").unwrap(), "tok-1");
        assert_eq!(
            ok(" \tBearer-ish.token/+=~ \r\n").unwrap(),
            "Bearer-ish.token/+=~"
        );
        for (raw, what) in [
            ("s3cret\nX-Other: 1", "a line feed at byte 6"),
            ("s3cret\rx", "a carriage return at byte 6"),
            ("s3cret\u{7f}", "control character U+007F at byte 6"),
            ("s3crét", "non-ASCII character U+00E9 at byte 4"),
        ] {
            let e = ok(raw).unwrap_err().to_string();
            assert!(
                e.contains("WAREHOUSE_API_TOKEN") && e.contains(what) && !e.contains("s3cr"),
                "{raw:?}: {e}"
            );
        }
    }

    #[test]
    fn several_hosts_are_tried_in_order_as_libpq_takes_them() {
        let c = ConnInfo::parse(
            "url",
            "postgres://inv:pw@db1:5433,db2:5434,[::1]/wh?target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("db1", 5433));
        assert_eq!(
            c.more_hosts,
            [("db2".to_string(), 5434), ("::1".to_string(), 5432)]
        );
        assert_eq!(c.dbname, "wh");
        assert_eq!(c.target_session_attrs, crate::pg::SessionAttrs::ReadWrite);
        assert_eq!(
            c.redacted(),
            "postgres://inv:***@db1:5433,db2:5434,::1:5432/wh?target_session_attrs=read-write"
        );
        let each: Vec<(String, u16)> = c
            .candidates()
            .into_iter()
            .map(|one| {
                assert!(one.more_hosts.is_empty());
                (one.host, one.port)
            })
            .collect();
        assert_eq!(each.len(), 3);
        assert_eq!(each[1], ("db2".to_string(), 5434));
        // The key/value spelling in the query: one port for all, or one per host.
        let q = ConnInfo::parse("url", "postgres:///wh?host=a,b&port=6000,6001").unwrap();
        assert_eq!((q.host.as_str(), q.port), ("a", 6000));
        assert_eq!(q.more_hosts, [("b".to_string(), 6001)]);
        let one_port = ConnInfo::parse("url", "postgres:///wh?host=a,b&port=6000").unwrap();
        assert_eq!(one_port.more_hosts, [("b".to_string(), 6000)]);
        for (url, says) in [
            (
                "postgres:///wh?host=a,b&port=1,2,3",
                "3 ports for 2 hosts; give one port, or one per host",
            ),
            (
                "postgres://u@db1:5432,db2:x/wh",
                "host \"db2:x\": port \"x\" is not a TCP port",
            ),
            (
                "postgres://u@db1,,db2/wh",
                "an empty host name in the host list",
            ),
            (
                "postgres://u@db1,db2/wh?target_session_attrs=prefer-standby",
                "target_session_attrs \"prefer-standby\" is not supported; expected any, read-write, primary or standby",
            ),
        ] {
            let e = ConnInfo::parse("warehouses[0].url", url)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("warehouses[0].url") && e.contains(says),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn the_state_db_url_takes_one_host() {
        let e = state_db_url("postgres://u@db1,db2/state")
            .unwrap_err()
            .to_string();
        assert!(e.contains("DB_URL") && e.contains("takes one host"), "{e}");
        assert!(state_db_url("postgres://u@db1/state?target_session_attrs=read-write").is_err());
        assert!(state_db_url("postgres://u@db1/state").is_ok());
    }

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
    fn the_verify_schedule_reads_durations_and_names_a_bad_one() {
        let read = |t: &str| parse_file(Path::new("x.toml"), t).map(|(.., v)| v);
        assert_eq!(read("").unwrap(), VerifySchedule::default());
        let v = read("[verify]\nevery = '24h'\nmax_rows_per_second = 800\n").unwrap();
        assert_eq!(v.every, Some(std::time::Duration::from_secs(86_400)));
        assert_eq!(v.max_rows_per_second, 800);
        assert_eq!(
            read("[verify]\nevery = '90s'\n").unwrap().every,
            Some(std::time::Duration::from_secs(90))
        );
        for bad in ["soon", "0h", "24", "1.5h", "-3m"] {
            let e = read(&format!("[verify]\nevery = '{bad}'\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("verify.every") && e.contains("is not a duration"),
                "{bad}: {e}"
            );
        }
        let e = read("[verify]\nmax_rows_per_second = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify.max_rows_per_second"), "{e}");
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
