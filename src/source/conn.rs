//! The replication connection: the frontend/backend protocol on a raw socket.
//!
//! `tokio-postgres` cannot run `START_REPLICATION`, so this module speaks the protocol itself
//! with `postgres-protocol` for message framing and SCRAM/MD5: startup with
//! `replication=database`, authentication (trust, cleartext, MD5, SCRAM-SHA-256), optional
//! TLS, simple queries (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, `SHOW`, catalog reads),
//! and then the CopyBoth stream that carries WAL one way and status updates the other.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{Header, Message};
use postgres_protocol::message::frontend;
use secrecy::ExposeSecret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::SourceError;
use super::error::ServerError;
use crate::Lsn;
use crate::pg::tls;
use crate::pg::{ConnInfo, SslMode};

/// A byte stream that may be TLS.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// One backend frame: CopyData is split out because it is the hot path.
pub enum Frame {
    /// A CopyData payload.
    CopyData(Bytes),
    /// CopyBothResponse: the replication stream begins.
    CopyBoth,
    /// The server ended the copy.
    CopyDone,
    /// Any other message.
    Other(Message),
}

/// Reads frames from the read half of a connection.
pub struct FrameReader {
    io: ReadHalf<Box<dyn Transport>>,
    buf: BytesMut,
    target: String,
}

impl FrameReader {
    /// The next frame; an error at end of stream.
    pub async fn next(&mut self) -> Result<Frame, SourceError> {
        loop {
            if let Some(f) = self.parse()? {
                return Ok(f);
            }
            if self.buf.capacity() - self.buf.len() < 64 * 1024 {
                self.buf.reserve(256 * 1024);
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| self.io_err(e))?;
            if n == 0 {
                return Err(self.io_err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
        }
    }

    /// Whether a complete frame is already buffered, so `next` will not wait for the socket.
    pub fn has_buffered_frame(&self) -> bool {
        matches!(Header::parse(&self.buf), Ok(Some(h)) if self.buf.len() > h.len() as usize)
    }

    fn io_err(&self, source: std::io::Error) -> SourceError {
        SourceError::Io {
            target: self.target.clone(),
            source,
        }
    }

    fn parse(&mut self) -> Result<Option<Frame>, SourceError> {
        let Some(header) = Header::parse(&self.buf).map_err(|e| self.io_err(e))? else {
            return Ok(None);
        };
        let total = header.len() as usize + 1;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        Ok(Some(match header.tag() {
            b'd' => {
                let mut b = self.buf.split_to(total).freeze();
                b.advance(5);
                Frame::CopyData(b)
            }
            b'W' => {
                self.buf.advance(total);
                Frame::CopyBoth
            }
            b'c' => {
                self.buf.advance(total);
                Frame::CopyDone
            }
            _ => match Message::parse(&mut self.buf).map_err(|e| self.io_err(e))? {
                Some(m) => Frame::Other(m),
                None => return Ok(None),
            },
        }))
    }
}

/// The write half of a connection.
pub struct FrameWriter {
    io: WriteHalf<Box<dyn Transport>>,
    buf: BytesMut,
    target: String,
}

impl FrameWriter {
    /// Sends `bytes` as one CopyData message.
    pub async fn send_copy_data(&mut self, bytes: &[u8]) -> Result<(), SourceError> {
        self.buf.clear();
        frontend::CopyData::new(bytes)
            .map_err(|e| SourceError::Protocol(e.to_string()))?
            .write(&mut self.buf);
        self.flush_buf().await
    }

    /// Sends CopyDone.
    pub async fn send_copy_done(&mut self) -> Result<(), SourceError> {
        self.buf.clear();
        frontend::copy_done(&mut self.buf);
        self.flush_buf().await
    }

    async fn flush_buf(&mut self) -> Result<(), SourceError> {
        let r = async {
            self.io.write_all(&self.buf).await?;
            self.io.flush().await
        }
        .await;
        r.map_err(|source| SourceError::Io {
            target: self.target.clone(),
            source,
        })
    }
}

/// Result rows of a simple query, as text.
pub type Rows = Vec<Vec<Option<String>>>;

/// An open connection in `replication=database` mode.
pub struct ReplicationConnection {
    reader: FrameReader,
    writer: FrameWriter,
    conn: ConnInfo,
    /// Server version number (`server_version_num`).
    pub server_version: u32,
}

impl ReplicationConnection {
    /// Connects, negotiates TLS per `sslmode`, and authenticates, all within the connect
    /// timeout (a server that accepts the connection and then says nothing is given up).
    ///
    /// Several hosts are tried in order until one accepts and fits `target_session_attrs`
    /// (libpq's rule); [`ReplicationConnection::server`] tells which one it is.
    pub async fn connect(conn: &ConnInfo) -> Result<Self, SourceError> {
        let mut last = None;
        for one in conn.candidates() {
            let attempt = async {
                let mut c = Self::connect_now(&one).await?;
                if let Some(probe) = conn.target_session_attrs.probe() {
                    let rows = c.simple_query(probe).await?;
                    let fits = rows.first().and_then(|r| r.first()).cloned().flatten();
                    if fits.as_deref() != Some("true") {
                        return Err(SourceError::from(crate::pg::tls::wrong_session(&one)));
                    }
                }
                Ok(c)
            };
            match crate::pg::tls::within_connect_timeout(&one, "replication connection", attempt)
                .await
            {
                Ok(c) => return Ok(c),
                // A definite refusal (a bad password, no such database) is the same on every
                // server of a cluster: said at once.
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::debug!(target = %format!("{}:{}", one.host, one.port), error = %e, "server not taken");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| SourceError::from(crate::pg::tls::wrong_session(conn))))
    }

    /// The one server this connection went to (of the URL's hosts).
    pub fn server(&self) -> &ConnInfo {
        &self.conn
    }

    async fn connect_now(conn: &ConnInfo) -> Result<Self, SourceError> {
        let target = format!("{}:{}", conn.host, conn.port);
        let io_err = |source| SourceError::Io {
            target: target.clone(),
            source,
        };
        let tcp = TcpStream::connect((conn.host.as_str(), conn.port))
            .await
            .map_err(io_err)?;
        tcp.set_nodelay(true).map_err(io_err)?;
        let socket = socket2::SockRef::from(&tcp);
        if let Some(k) = &conn.keepalives {
            socket.set_tcp_keepalive(&k.tcp()).map_err(io_err)?;
        }
        if conn.tcp_user_timeout_ms > 0 {
            socket
                .set_tcp_user_timeout(Some(Duration::from_millis(conn.tcp_user_timeout_ms)))
                .map_err(io_err)?;
        }
        let stream: Box<dyn Transport> = if conn.sslmode == SslMode::Disable {
            Box::new(tcp)
        } else {
            negotiate_tls(tcp, conn, &target).await?
        };
        let (r, w) = tokio::io::split(stream);
        let mut this = Self {
            reader: FrameReader {
                io: r,
                buf: BytesMut::with_capacity(256 * 1024),
                target: target.clone(),
            },
            writer: FrameWriter {
                io: w,
                buf: BytesMut::new(),
                target,
            },
            conn: conn.clone(),
            server_version: 0,
        };
        this.startup().await?;
        Ok(this)
    }

    async fn startup(&mut self) -> Result<(), SourceError> {
        let params = [
            ("user", self.conn.user.as_str()),
            ("database", self.conn.dbname.as_str()),
            ("replication", "database"),
            ("application_name", "inventorysync"),
            ("client_encoding", "UTF8"),
            ("TimeZone", "UTC"),
            ("DateStyle", "ISO"),
            ("extra_float_digits", "3"),
        ];
        let mut buf = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut buf)
            .map_err(|e| SourceError::Protocol(e.to_string()))?;
        self.writer.buf = buf;
        self.writer.flush_buf().await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = match self.reader.next().await? {
                Frame::Other(m) => m,
                _ => return Err(SourceError::Protocol("copy message during startup".into())),
            };
            match msg {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let pw = self.password()?;
                    self.send(|b| frontend::password_message(pw.as_bytes(), b))
                        .await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = self.password()?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        self.conn.user.as_bytes(),
                        pw.as_bytes(),
                        body.salt(),
                    );
                    self.send(|b| frontend::password_message(hash.as_bytes(), b))
                        .await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechs
                        .next()
                        .map_err(|e| SourceError::Protocol(e.to_string()))?
                    {
                        has_scram |= m == SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(SourceError::Config(
                            "the server offers no SASL mechanism we support (SCRAM-SHA-256)".into(),
                        ));
                    }
                    let pw = self.password()?;
                    let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    let first = s.message().to_vec();
                    scram = Some(s);
                    self.send(|b| frontend::sasl_initial_response(SCRAM_SHA_256, &first, b))
                        .await?;
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        SourceError::Protocol("SASL continue before SASL start".into())
                    })?;
                    s.update(body.data())
                        .map_err(|e| self.auth_err(e.to_string()))?;
                    let msg = s.message().to_vec();
                    self.send(|b| frontend::sasl_response(&msg, b)).await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        SourceError::Protocol("SASL final before SASL start".into())
                    })?;
                    s.finish(body.data())
                        .map_err(|e| self.auth_err(format!("server signature invalid: {e}")))?;
                }
                Message::ParameterStatus(p) => {
                    if p.name().ok() == Some("server_version") {
                        self.server_version = parse_server_version(p.value().unwrap_or(""));
                    }
                }
                Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    let e = server_error(&body)?;
                    return Err(self.classify_startup_error(e));
                }
                _ => {
                    return Err(SourceError::Protocol(
                        "unexpected message during authentication".into(),
                    ));
                }
            }
        }
    }

    fn password(&self) -> Result<String, SourceError> {
        self.conn
            .password
            .as_ref()
            .map(|p| p.expose_secret().to_string())
            .ok_or_else(|| {
                self.auth_err("the server asks for a password and none is configured".into())
            })
    }

    fn auth_err(&self, server: String) -> SourceError {
        SourceError::AuthFailed {
            user: self.conn.user.clone(),
            server,
        }
    }

    fn classify_startup_error(&self, e: ServerError) -> SourceError {
        match e.code.as_str() {
            "28P01" | "28000" => self.auth_err(e.message),
            "42501" => SourceError::NoReplicationPrivilege {
                user: self.conn.user.clone(),
                server: e.message,
            },
            _ => SourceError::Server(e),
        }
    }

    async fn send(
        &mut self,
        f: impl FnOnce(&mut BytesMut) -> std::io::Result<()>,
    ) -> Result<(), SourceError> {
        let mut buf = BytesMut::new();
        f(&mut buf).map_err(|e| SourceError::Protocol(e.to_string()))?;
        self.writer.buf = buf;
        self.writer.flush_buf().await
    }

    /// Runs one simple-protocol query and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, SourceError> {
        self.send(|b| frontend::query(sql, b)).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let msg = match self.reader.next().await? {
                Frame::Other(m) => m,
                _ => {
                    return Err(SourceError::Protocol(format!(
                        "copy message answering {sql:?}"
                    )));
                }
            };
            match msg {
                Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(r) = ranges
                        .next()
                        .map_err(|e| SourceError::Protocol(e.to_string()))?
                    {
                        row.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => error = Some(server_error(&body)?),
                Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(SourceError::Server(e)),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: system id, timeline, current WAL flush position, database.
    pub async fn identify_system(&mut self) -> Result<(String, u32, Lsn), SourceError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| SourceError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let timeline = field(1)
            .parse()
            .map_err(|_| SourceError::Protocol("IDENTIFY_SYSTEM timeline".into()))?;
        let lsn = field(2)
            .parse()
            .map_err(|e| SourceError::Protocol(format!("IDENTIFY_SYSTEM xlogpos: {e}")))?;
        Ok((field(0), timeline, lsn))
    }

    /// Where timeline `ancestor` ended in timeline `timeline`'s history
    /// (`TIMELINE_HISTORY`); none when it is not an ancestor.
    pub async fn timeline_switch(
        &mut self,
        timeline: u32,
        ancestor: u32,
    ) -> Result<Option<Lsn>, SourceError> {
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {timeline}"))
            .await?;
        let content = rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .unwrap_or_default();
        Ok(parse_timeline_switch(&content, ancestor))
    }

    /// Sends `START_REPLICATION` and waits for the CopyBoth stream to open.
    pub async fn start_replication(
        mut self,
        sql: &str,
    ) -> Result<(FrameReader, FrameWriter), SourceError> {
        self.send(|b| frontend::query(sql, b)).await?;
        loop {
            match self.reader.next().await? {
                Frame::CopyBoth => return Ok((self.reader, self.writer)),
                Frame::Other(Message::ErrorResponse(body)) => {
                    let e = server_error(&body)?;
                    // Drain to ReadyForQuery is pointless: the caller drops the connection.
                    return Err(SourceError::Server(e));
                }
                Frame::Other(Message::NoticeResponse(_)) => {}
                _ => {
                    return Err(SourceError::Protocol(
                        "unexpected answer to START_REPLICATION".into(),
                    ));
                }
            }
        }
    }
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    conn: &ConnInfo,
    target: &str,
) -> Result<Box<dyn Transport>, SourceError> {
    let io_err = |source| SourceError::Io {
        target: target.to_string(),
        source,
    };
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await.map_err(io_err)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io_err)?;
    match answer[0] {
        b'S' => {
            let config = tls::client_config(conn)?;
            let name = tls::server_name(conn)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| SourceError::Tls(format!("handshake with {target}: {e}")))?;
            Ok(Box::new(stream))
        }
        b'N' if conn.sslmode == SslMode::Prefer => Ok(Box::new(tcp)),
        b'N' => Err(SourceError::Tls(format!(
            "{target} does not accept TLS connections and sslmode is {:?}",
            conn.sslmode
        ))),
        other => Err(SourceError::Protocol(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}

/// The server error in an ErrorResponse, as a `SourceError`.
pub fn error_from_body(
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> Result<SourceError, SourceError> {
    Ok(SourceError::Server(server_error(body)?))
}

fn server_error(
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> Result<ServerError, SourceError> {
    let mut e = ServerError {
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    let mut fields = body.fields();
    while let Some(f) = fields
        .next()
        .map_err(|e| SourceError::Protocol(e.to_string()))?
    {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    Ok(e)
}

fn parse_server_version(v: &str) -> u32 {
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    major * 10000 + minor
}

/// Quotes a SQL literal that reads back as `s` whatever the session's
/// `standard_conforming_strings` says: with a backslash in it, as an escape string (`E'…'`,
/// backslashes doubled), as PostgreSQL's own `quote_literal` does. A plain `'…'` literal
/// holding `\'` breaks out of the quotes on a server where that setting is off.
pub fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// The switch point of timeline `ancestor` in a timeline history file's `content` (lines of
/// `timeline<TAB>switch point<TAB>reason`).
pub fn parse_timeline_switch(content: &str, ancestor: u32) -> Option<Lsn> {
    content.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let tli: u32 = fields.next()?.parse().ok()?;
        let at: Lsn = fields.next()?.parse().ok()?;
        (tli == ancestor).then_some(at)
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_timeline_switch, quote_literal};
    use crate::Lsn;

    #[test]
    fn a_literal_with_a_backslash_is_an_escape_string() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\'b"), "E'a\\\\''b'");
        assert_eq!(quote_literal("\\"), "E'\\\\'");
    }

    #[test]
    fn a_timeline_history_gives_each_ancestors_switch_point() {
        let history = "1\t0/3000158\tno recovery target specified\n\n2\t1/A0000D8\tbefore 2026-12-01 10:00:00+00\n";
        assert_eq!(parse_timeline_switch(history, 1), Some(Lsn(0x300_0158)));
        assert_eq!(parse_timeline_switch(history, 2), Some(Lsn(0x1_0A00_00D8)));
        assert_eq!(parse_timeline_switch(history, 3), None);
        assert_eq!(parse_timeline_switch("garbage", 1), None);
    }
}
