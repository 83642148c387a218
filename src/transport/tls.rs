//! TLS (rustls with ring, TLS 1.2 and 1.3): the client side toward a trunk's peers, with
//! SNI and certificate checks against the configured name, the system's CA roots or a
//! bundle, and an optional client certificate; the server side for `tls:` listeners, with
//! a certificate that is re-read on SIGHUP or when its files change. Connections then
//! behave like TCP ones ([`super::tcp`]).
//!
//! Certificates and keys are read from files only and never logged; errors name the
//! file, not its content. A failed handshake is explained in plain words
//! ([`Failure`]) and counted by reason.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ClientTls, ServerTls};
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path} holds no PEM {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("no CA certificates: the system has none and no ca_file is set")]
    NoRoots,
    #[error("{name:?} is not a name or address a certificate can be checked against")]
    ServerName { name: String },
}

/// Why a handshake failed, in the words an operator needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The peer's certificate is not issued by a CA we trust.
    UnknownCa,
    /// The peer's certificate is for another name.
    NameMismatch,
    /// The peer's certificate expired or is not valid yet.
    Expired,
    /// The peer wants a client certificate we did not present, or refused ours.
    ClientCertificateRefused,
    /// Anything else: the rustls error or alert as text.
    Other(String),
}

impl Failure {
    /// Reads a failure out of an error from tokio-rustls (a `rustls::Error` inside an
    /// `io::Error`), or from the first read after the handshake (TLS 1.3 servers refuse
    /// a client certificate only then).
    pub fn of(error: &io::Error) -> Failure {
        let Some(tls) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return Failure::Other(error.to_string());
        };
        match tls {
            rustls::Error::InvalidCertificate(certificate) => match certificate {
                CertificateError::UnknownIssuer => Failure::UnknownCa,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Failure::NameMismatch,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Failure::Expired,
                other => Failure::Other(format!("invalid peer certificate: {other:?}")),
            },
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::CertificateRequired
                | AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateUnknown => Failure::ClientCertificateRefused,
                AlertDescription::UnknownCA => Failure::ClientCertificateRefused,
                AlertDescription::CertificateExpired => Failure::ClientCertificateRefused,
                // OpenSSL servers under TLS 1.2 answer a missing client certificate so.
                AlertDescription::HandshakeFailure => Failure::Other(
                    "the peer refused the handshake (handshake_failure alert): most often it requires a client certificate, else it shares no cipher or version".into(),
                ),
                other => Failure::Other(format!("the peer sent alert {other:?}")),
            },
            rustls::Error::NoCertificatesPresented => Failure::ClientCertificateRefused,
            other => Failure::Other(other.to_string()),
        }
    }

    /// The same failure seen by a listener (the peer connected to us): the peer refusing
    /// a certificate refuses the listener's, not a client certificate of ours.
    pub fn as_listener(self) -> Failure {
        match self {
            Failure::ClientCertificateRefused => Failure::Other(
                "the connecting peer refused this listener's certificate (check [edge.tls]/[core_side.tls] and the CAs the peer trusts)".into(),
            ),
            other => other,
        }
    }

    /// Whether this is a TLS failure at all (not a plain connection reset).
    pub fn is_tls(error: &io::Error) -> bool {
        error
            .get_ref()
            .is_some_and(|inner| inner.is::<rustls::Error>())
    }

    /// The counter of this failure.
    pub fn counter<'a>(&self, stats: &'a Stats) -> &'a AtomicU64 {
        match self {
            Failure::UnknownCa => &stats.tls_unknown_ca,
            Failure::NameMismatch => &stats.tls_name_mismatch,
            Failure::Expired => &stats.tls_expired_certificate,
            Failure::ClientCertificateRefused => &stats.tls_client_certificate_refused,
            Failure::Other(_) => &stats.tls_other_failures,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::UnknownCa => f.write_str(
                "unknown CA: the peer's certificate is not issued by a trusted CA (set tls.ca_file to the CA that issued it)",
            ),
            Failure::NameMismatch => f.write_str(
                "name mismatch: the peer's certificate is not for the configured name (check the host or tls.server_name)",
            ),
            Failure::Expired => f.write_str(
                "expired certificate: the peer's certificate is expired or not valid yet (or this clock is wrong)",
            ),
            Failure::ClientCertificateRefused => f.write_str(
                "no client certificate: the peer requires a client certificate it accepts (set tls.certificate_file and tls.key_file)",
            ),
            Failure::Other(reason) => write!(f, "handshake failed: {reason}"),
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|error| TlsError::Invalid(format!("{what} {}: {error}", path.display())))?;
    if certificates.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "certificate",
        });
    }
    Ok(certificates)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("key file", path)?;
    // The parser's error could quote the file; say only what and where.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::Empty {
        what: "key file",
        path: path.to_path_buf(),
        expected: "private key (PKCS#8, PKCS#1 or SEC1)",
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How connections to one peer are made: the verified name and the client config.
pub struct TlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// A client for a peer configured as `host`: SNI and the certificate check use
    /// `settings.server_name` or else `host`.
    pub fn new(settings: &ClientTls, host: &str) -> Result<Self, TlsError> {
        let name = settings
            .server_name
            .clone()
            .unwrap_or_else(|| crate::sip::via::strip_brackets(host).to_string());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName { name })?;
        let mut roots = RootCertStore::empty();
        match &settings.ca {
            Some(path) => {
                for certificate in certificates("CA file", path)? {
                    roots.add(certificate).map_err(|error| {
                        TlsError::Invalid(format!("CA file {}: {error}", path.display()))
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for certificate in found.certs {
                    // Unparseable system certificates are skipped, as browsers do.
                    let _ = roots.add(certificate);
                }
                if roots.is_empty() {
                    return Err(TlsError::NoRoots);
                }
            }
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Invalid(error.to_string()))?
            .with_root_certificates(roots);
        let config = match &settings.identity {
            Some((certificate, key)) => builder
                .with_client_auth_cert(
                    certificates("certificate file", certificate)?,
                    private_key(key)?,
                )
                .map_err(|error| {
                    TlsError::Invalid(format!(
                        "client certificate {} and key {} do not go together: {error}",
                        certificate.display(),
                        key.display()
                    ))
                })?,
            None => builder.with_no_client_auth(),
        };
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    pub fn connector(&self) -> &TlsConnector {
        &self.connector
    }

    pub fn server_name(&self) -> ServerName<'static> {
        self.server_name.clone()
    }
}

/// The certificate of a side's TLS listeners, swapped when its files change.
pub struct TlsServer {
    files: Mutex<ServerTls>,
    config: ArcSwap<ServerConfig>,
    /// Modification times of certificate and key when last loaded.
    stamp: Mutex<Option<(SystemTime, SystemTime)>>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer").finish_non_exhaustive()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .ok()
}

fn server_config(files: &ServerTls) -> Result<ServerConfig, TlsError> {
    let chain = certificates("certificate file", &files.certificate)?;
    let key = private_key(&files.key)?;
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Invalid(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| {
            TlsError::Invalid(format!(
                "certificate {} and key {} do not go together: {error}",
                files.certificate.display(),
                files.key.display()
            ))
        })
}

impl TlsServer {
    pub fn load(files: &ServerTls) -> Result<Self, TlsError> {
        let stamp = modified(&files.certificate).zip(modified(&files.key));
        let config = server_config(files)?;
        Ok(Self {
            files: Mutex::new(files.clone()),
            config: ArcSwap::from_pointee(config),
            stamp: Mutex::new(stamp),
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// Reads the certificate and key again (from `files` when given, a reloaded
    /// configuration) and uses them for new connections. On an error the old ones stay.
    pub fn reload(&self, files: Option<&ServerTls>) -> Result<(), TlsError> {
        let mut current = self
            .files
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let files = files.unwrap_or(&current).clone();
        let stamp = modified(&files.certificate).zip(modified(&files.key));
        let config = server_config(&files)?;
        self.config.store(Arc::new(config));
        *current = files;
        *self
            .stamp
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = stamp;
        Ok(())
    }

    /// Whether the files changed since they were last loaded.
    fn changed(&self) -> bool {
        let files = self
            .files
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone();
        let now = modified(&files.certificate).zip(modified(&files.key));
        now.is_some()
            && now
                != *self
                    .stamp
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Looks at the files every `every` and reloads them when they changed.
    pub fn watch(
        self: Arc<Self>,
        every: Duration,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) {
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                if !self.changed() {
                    continue;
                }
                match self.reload(None) {
                    Ok(()) => tracing::info!("TLS certificate files changed; new connections use the new certificate"),
                    Err(error) => tracing::warn!(error = %error, "TLS certificate files changed but cannot be used; keeping the old certificate"),
                }
            }
        });
    }
}

/// What the TLS files of a valid configuration hold, checked as `run` would load them:
/// each listener's certificate and key, each trunk's CA bundle (or the system's roots),
/// client certificate and key. One line per problem, naming the key.
pub fn problems(settings: &crate::config::Settings) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, side) in [("edge", &settings.edge), ("core_side", &settings.core_side)] {
        if let Some(files) = &side.tls {
            if let Err(error) = TlsServer::load(files) {
                problems.push(format!("{name}.tls: {error}"));
            }
        }
    }
    for trunk in &settings.trunks {
        for (endpoint, side) in [
            (&trunk.edge, &settings.edge),
            (&trunk.core, &settings.core_side),
        ] {
            if endpoint.may_use_tls(&side.listen) {
                if let Err(error) = TlsClient::new(&trunk.tls, &endpoint.host) {
                    problems.push(format!("trunk \"{}\".tls: {error}", trunk.name));
                }
            }
        }
    }
    problems.dedup();
    problems
}

/// Handshake failures already logged, so that a peer failing every connection is
/// reported once a minute rather than once per request (each is still counted).
#[derive(Debug, Default)]
pub struct FailureLog {
    last: Mutex<std::collections::HashMap<(std::net::SocketAddr, String), tokio::time::Instant>>,
}

/// How long one peer's same failure is not logged again.
const FAILURE_LOG_QUIET: Duration = Duration::from_secs(60);

impl FailureLog {
    /// Whether `failure` with `peer` should be logged at `now` (not logged in the last
    /// minute).
    pub fn should_log(
        &self,
        peer: std::net::SocketAddr,
        failure: &Failure,
        now: tokio::time::Instant,
    ) -> bool {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if last.len() > 1024 {
            last.retain(|_, at| now.saturating_duration_since(*at) < FAILURE_LOG_QUIET);
        }
        let key = (peer, failure.to_string());
        match last.get(&key) {
            Some(at) if now.saturating_duration_since(*at) < FAILURE_LOG_QUIET => false,
            _ => {
                last.insert(key, now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_read_as_plain_words() {
        let wrap = |error: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, error);
        let certificate = rustls::Error::InvalidCertificate;
        for (error, expected) in [
            (
                certificate(CertificateError::UnknownIssuer),
                Failure::UnknownCa,
            ),
            (
                certificate(CertificateError::NotValidForName),
                Failure::NameMismatch,
            ),
            (certificate(CertificateError::Expired), Failure::Expired),
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
                Failure::ClientCertificateRefused,
            ),
        ] {
            assert_eq!(Failure::of(&wrap(error)), expected);
        }
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(!Failure::is_tls(&reset));
        assert!(matches!(Failure::of(&reset), Failure::Other(_)));
        assert!(Failure::UnknownCa.to_string().starts_with("unknown CA"));
        assert!(Failure::ClientCertificateRefused
            .to_string()
            .starts_with("no client certificate"));
    }

    #[test]
    fn a_broken_key_file_is_named_but_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nU0VDUkVULU1BUktFUg==SECRET-MARKER\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let certificate = dir.path().join("cert.pem");
        std::fs::write(&certificate, "").unwrap();
        let files = ServerTls {
            certificate: certificate.clone(),
            key: key.clone(),
        };
        let settings = ClientTls {
            identity: Some((certificate, key)),
            ..ClientTls::default()
        };
        for error in [
            TlsServer::load(&files).unwrap_err(),
            TlsClient::new(&settings, "core.example").unwrap_err(),
        ] {
            let text = format!("{error} {error:?}");
            assert!(
                !text.contains("SECRET") && !text.contains("U0VDUkVU"),
                "{text}"
            );
        }
        let debug = format!("{:?}", private_key(&dir.path().join("key.pem")));
        assert!(!debug.contains("SECRET"), "{debug}");
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ServerTls {
            certificate: dir.path().join("absent.pem"),
            key: dir.path().join("absent.key"),
        };
        let error = TlsServer::load(&missing).unwrap_err().to_string();
        assert!(error.contains("absent.pem"), "{error}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let settings = ClientTls {
            ca: Some(empty.clone()),
            ..ClientTls::default()
        };
        let error = TlsClient::new(&settings, "core.example")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("empty.pem") && error.contains("no PEM"),
            "{error}"
        );
    }
}
