//! TLS for warehouse connections, with rustls: the `sslmode` semantics of libpq.
//!
//! `require` and `prefer` encrypt without verifying the certificate, as libpq does;
//! `verify-full` checks the chain against the Mozilla roots (or `sslrootcert`) and the host name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use super::{ConnInfo, SslMode};

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(String),
    /// The network failed (or the setup took longer than the connect timeout).
    #[error("connection to {target}: {source}")]
    Io {
        /// `host:port`.
        target: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Connecting or authenticating failed.
    #[error("query on the warehouse failed: {}", crate::pg::error_text(.0))]
    Sql(#[from] tokio_postgres::Error),
}

/// The rustls client configuration for a connection.
pub fn client_config(conn: &ConnInfo) -> Result<Arc<ClientConfig>, ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    let config = if conn.sslmode == SslMode::VerifyFull {
        let mut roots = rustls::RootCertStore::empty();
        match &conn.sslrootcert {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ConnectError::Tls(format!("sslrootcert {}: {e}", path.display()))
                })?;
                for cert in rustls_pemfile_certs(&pem)? {
                    roots
                        .add(cert)
                        .map_err(|e| ConnectError::Tls(format!("sslrootcert: {e}")))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The server name to present and verify.
pub fn server_name(conn: &ConnInfo) -> Result<ServerName<'static>, ConnectError> {
    ServerName::try_from(conn.host.clone())
        .map_err(|e| ConnectError::Tls(format!("host {:?} as TLS server name: {e}", conn.host)))
}

fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ConnectError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConnectError::Tls(format!("sslrootcert is not PEM: {e}")))
}

/// Encrypts without authenticating the server: libpq's `require`/`prefer`.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Opens an ordinary SQL connection (tokio-postgres) to the same server, with TLS per
/// `sslmode`, within the connect timeout (startup and authentication included).
///
/// Several hosts are tried in order until one accepts the connection and fits
/// `target_session_attrs`, as libpq does; the error is the last host's.
pub async fn connect_sql(conn: &ConnInfo) -> Result<tokio_postgres::Client, ConnectError> {
    let mut last = None;
    for one in conn.candidates() {
        let attempt = async {
            let client = connect_sql_now(&one).await?;
            if let Some(probe) = conn.target_session_attrs.probe() {
                let fits: String = client.query_one(probe, &[]).await?.get(0);
                if fits != "true" {
                    return Err(wrong_session(&one));
                }
            }
            Ok(client)
        };
        match within_connect_timeout(&one, "SQL connection", attempt).await {
            Ok(client) => return Ok(client),
            Err(e) => {
                tracing::debug!(target = %format!("{}:{}", one.host, one.port), error = %e, "server not taken");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| wrong_session(conn)))
}

/// A server that does not fit `target_session_attrs` (a standby where writes are wanted):
/// an I/O error, so that the connection is tried again (a failover may be under way).
pub fn wrong_session(conn: &ConnInfo) -> ConnectError {
    ConnectError::Io {
        target: format!("{}:{}", conn.host, conn.port),
        source: std::io::Error::other(format!(
            "the server does not fit target_session_attrs={}",
            conn.target_session_attrs.as_str()
        )),
    }
}

/// Runs a connection's whole setup (`what`) within `conn`'s connect timeout, as libpq
/// counts it: a server that accepts the connection and then says nothing is given up.
pub(crate) async fn within_connect_timeout<T, E: From<ConnectError>>(
    conn: &ConnInfo,
    what: &str,
    setup: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let timeout = std::time::Duration::from_secs(conn.connect_timeout_secs.max(1));
    tokio::time::timeout(timeout, setup)
        .await
        .unwrap_or_else(|_| {
            Err(E::from(ConnectError::Io {
                target: format!("{}:{}", conn.host, conn.port),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no {what} within connect_timeout ({} s)", timeout.as_secs()),
                ),
            }))
        })
}

async fn connect_sql_now(conn: &ConnInfo) -> Result<tokio_postgres::Client, ConnectError> {
    let cfg = conn.to_pg_config();
    if conn.sslmode == SslMode::Disable {
        let (client, connection) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "warehouse SQL connection ended");
            }
        });
        Ok(client)
    } else {
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*client_config(conn)?).clone());
        let (client, connection) = cfg.connect(tls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "warehouse SQL connection ended");
            }
        });
        Ok(client)
    }
}
