//! How the engine reaches a PostgreSQL server: a connection's settings as libpq takes them
//! (URL or key/value form, `sslmode`, TCP keepalives), shared by the source (warehouses),
//! the state DB and the consumer's reads of unchanged TOAST values.

use std::fmt;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::setting::{ConfigError, invalid};

pub mod tls;
pub use tls::{ConnectError, connect_sql};

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

/// Which of several servers a connection takes (`target_session_attrs`, as libpq names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionAttrs {
    /// The first server that accepts the connection.
    #[default]
    Any,
    /// A server that accepts writes (`transaction_read_only` off): after a failover, the
    /// promoted standby.
    ReadWrite,
    /// A server not in recovery.
    Primary,
    /// A server in recovery (a hot standby).
    Standby,
}

impl SessionAttrs {
    /// The libpq name.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
        }
    }

    /// The query that tells, on a server, whether it fits (`true` when it does); none for
    /// any.
    pub fn probe(self) -> Option<&'static str> {
        match self {
            SessionAttrs::Any => None,
            SessionAttrs::ReadWrite => {
                Some("SELECT (current_setting('transaction_read_only') = 'off')::text")
            }
            SessionAttrs::Primary => Some("SELECT (NOT pg_is_in_recovery())::text"),
            SessionAttrs::Standby => Some("SELECT pg_is_in_recovery()::text"),
        }
    }
}

impl std::str::FromStr for SessionAttrs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" => Ok(SessionAttrs::Any),
            "read-write" => Ok(SessionAttrs::ReadWrite),
            "primary" => Ok(SessionAttrs::Primary),
            "standby" => Ok(SessionAttrs::Standby),
            other => Err(format!(
                "target_session_attrs {other:?} is not supported; expected any, read-write, primary or standby"
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
    /// The servers after the first, tried in order when it is down or does not fit
    /// `target_session_attrs` (`postgres://h1:p1,h2:p2/db`, or `host=h1,h2&port=p1,p2`).
    pub more_hosts: Vec<(String, u16)>,
    /// Which server of several to take.
    pub target_session_attrs: SessionAttrs,
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
    /// Why the connection's traffic can be read or altered on the way, when it can: a
    /// server that is not on this machine (any host but loopback or a socket directory) is
    /// reached without a verified certificate (`sslmode` below `verify-full`).
    pub fn unverified_remote(&self) -> Option<String> {
        let loopback = |h: &str| {
            h.starts_with('/')
                || h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        };
        let remote: Vec<&str> = std::iter::once(self.host.as_str())
            .chain(self.more_hosts.iter().map(|(h, _)| h.as_str()))
            .filter(|h| !loopback(h))
            .collect();
        if remote.is_empty() || self.sslmode == SslMode::VerifyFull {
            return None;
        }
        let mode = match self.sslmode {
            SslMode::Disable => "disable: no TLS at all",
            SslMode::Prefer => "prefer: TLS if offered, the certificate not verified",
            SslMode::Require => "require: TLS, the certificate not verified",
            SslMode::VerifyFull => "verify-full",
        };
        Some(format!(
            "{} is reached with sslmode={mode}: anyone on the network path can read the data or pose as the server",
            remote.join(", ")
        ))
    }

    /// Parses `postgres://user:pass@host:port/db?sslmode=…` (also `postgresql://` and the
    /// `jdbc:postgresql://` form, where user and password may be query parameters).
    /// `key` names the setting in errors.
    pub fn parse(key: &str, input: &str) -> Result<Self, ConfigError> {
        let raw = input.trim();
        let raw = raw.strip_prefix("jdbc:").unwrap_or(raw);
        let (raw, listed) = split_host_list(key, raw)?;
        let url = url::Url::parse(&raw).map_err(|e| {
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
        let mut query_hosts: Option<Vec<String>> = None;
        let mut query_ports: Option<Vec<u16>> = None;
        let mut target_session_attrs = SessionAttrs::Any;
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
                "host" => query_hosts = Some(v.split(',').map(|h| h.trim().to_string()).collect()),
                "port" => {
                    query_ports = Some(
                        v.split(',')
                            .map(|p| {
                                p.trim().parse::<u16>().map_err(|_| {
                                    invalid(key, format!("port {p:?} is not a TCP port"))
                                })
                            })
                            .collect::<Result<_, _>>()?,
                    )
                }
                "target_session_attrs" => {
                    target_session_attrs = v.parse().map_err(|e: String| invalid(key, e))?
                }
                "application_name" | "options" | "ssl" => {}
                other => {
                    return Err(invalid(
                        key,
                        format!(
                            "unknown connection parameter {other:?}; expected sslmode, sslrootcert, user, password, dbname, host, port, target_session_attrs, connect_timeout, keepalives, keepalives_idle, keepalives_interval, keepalives_count or tcp_user_timeout"
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
        let mut hosts: Vec<(String, u16)> = std::iter::once((host, port)).chain(listed).collect();
        if let Some(names) = query_hosts {
            hosts = names.into_iter().map(|h| (h, 5432)).collect();
        }
        if let Some(ports) = query_ports {
            match ports.len() {
                1 => hosts.iter_mut().for_each(|h| h.1 = ports[0]),
                n if n == hosts.len() => hosts.iter_mut().zip(ports).for_each(|(h, p)| h.1 = p),
                n => {
                    return Err(invalid(
                        key,
                        format!(
                            "{n} ports for {} hosts; give one port, or one per host",
                            hosts.len()
                        ),
                    ));
                }
            }
        }
        if hosts.iter().any(|(h, _)| h.is_empty()) {
            return Err(invalid(key, "an empty host name in the host list"));
        }
        let (host, port) = hosts.remove(0);
        Ok(Self {
            host,
            port,
            more_hosts: hosts,
            target_session_attrs,
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
        let mut hosts = format!("{}:{}", self.host, self.port);
        for (h, p) in &self.more_hosts {
            hosts.push_str(&format!(",{h}:{p}"));
        }
        let attrs = match self.target_session_attrs {
            SessionAttrs::Any => String::new(),
            a => format!("?target_session_attrs={}", a.as_str()),
        };
        format!(
            "postgres://{}{pw}@{hosts}/{}{attrs}",
            self.user, self.dbname
        )
    }

    /// Each server to try, in order, as a connection to that one server.
    pub fn candidates(&self) -> Vec<ConnInfo> {
        std::iter::once((self.host.clone(), self.port))
            .chain(self.more_hosts.iter().cloned())
            .map(|(host, port)| ConnInfo {
                host,
                port,
                more_hosts: Vec::new(),
                ..self.clone()
            })
            .collect()
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

/// Takes a host list (`h1:p1,h2:p2`) out of a URL's authority: the URL keeps the first host,
/// the others are returned.
fn split_host_list(key: &str, raw: &str) -> Result<(String, Vec<(String, u16)>), ConfigError> {
    let Some(scheme_end) = raw.find("://") else {
        return Ok((raw.to_string(), Vec::new()));
    };
    let rest = &raw[scheme_end + 3..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let hosts_at = authority.rfind('@').map_or(0, |i| i + 1);
    let list = &authority[hosts_at..];
    if !list.contains(',') {
        return Ok((raw.to_string(), Vec::new()));
    }
    let mut entries = list.split(',');
    let first = entries.next().unwrap_or_default();
    let more = entries
        .map(|entry| {
            let entry = entry.trim();
            let (host, port) = match entry.rsplit_once(':') {
                Some((h, p)) if !h.starts_with('[') || h.ends_with(']') => {
                    let port = p.parse::<u16>().map_err(|_| {
                        invalid(key, format!("host {entry:?}: port {p:?} is not a TCP port"))
                    })?;
                    (h, port)
                }
                _ => (entry, 5432),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(invalid(
                    key,
                    format!("an empty host name in the host list {list:?}"),
                ));
            }
            Ok((host.to_string(), port))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let start = scheme_end + 3 + hosts_at;
    let rebuilt = format!("{}{first}{}", &raw[..start], &rest[hosts_at + list.len()..]);
    Ok((rebuilt, more))
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

/// A tokio-postgres error as a sentence: for a server error its message, SQLSTATE, detail
/// and hint (its own text is only "db error"), else the error and its cause.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Quotes an identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
