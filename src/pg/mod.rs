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

/// Quotes an identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
