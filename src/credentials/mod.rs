//! Credentials toward the core: where they come from ([`Source`]: OAuth2 client
//! credentials, a watched file, time-limited HMAC "ephemeral" credentials, static), and the
//! [`manager::CredentialManager`] that keeps one fresh per trunk, refreshing it before it
//! expires and publishing each new one with a single atomic swap.
//!
//! A [`Credential`] carries a generation number (one more for every change) and a short
//! fingerprint, which is how logs and errors name it. The secret material itself lives in
//! [`Secret`] and never reaches a log line, an error message or `Debug` output.

pub mod ephemeral;
pub mod file;
pub mod jwt;
pub mod manager;
pub mod oauth2;
pub mod refusal;
pub mod schedule;
pub mod secret;
pub mod verdict;

pub use manager::{CredentialManager, ManagerOptions};
pub use secret::Secret;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The secret material of a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialValue {
    /// A bearer token (RFC 6750, RFC 8898).
    Token(Secret),
    /// A username and password for Digest (RFC 7616).
    UserPassword { username: String, password: Secret },
}

impl CredentialValue {
    /// The fingerprint of the secret part (and the username, which distinguishes
    /// ephemeral credentials).
    pub fn fingerprint(&self) -> String {
        match self {
            CredentialValue::Token(token) => token.fingerprint(),
            CredentialValue::UserPassword { username, password } => {
                let mut material = username.as_bytes().to_vec();
                material.push(0);
                material.extend_from_slice(password.expose().as_bytes());
                secret::fingerprint(&material)
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            CredentialValue::Token(_) => "token",
            CredentialValue::UserPassword { .. } => "username/password",
        }
    }
}

/// One published credential. Immutable: a change is a new `Credential`.
#[derive(Debug, Clone)]
pub struct Credential {
    pub value: CredentialValue,
    pub generation: u64,
    pub fingerprint: String,
    /// When the request that produced it was sent (monotonic).
    pub obtained: Instant,
    /// When it stops being valid (monotonic); `None` for credentials without a lifetime.
    pub expires: Option<Instant>,
}

impl Credential {
    pub fn is_valid_at(&self, now: Instant) -> bool {
        self.expires.is_none_or(|expires| now < expires)
    }
}

/// What a source produced.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub value: CredentialValue,
    /// How long it is valid from the moment the request was sent; `None`: until replaced.
    pub lifetime: Option<Duration>,
    /// Scopes the endpoint says it granted, when it says so.
    pub granted_scopes: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// Will not fix itself: a wrong client id, secret, scope or organization. Retried
    /// slowly. `detail` is what the server said, if anything.
    Configuration {
        reason: String,
        detail: Option<String>,
    },
    /// Worth retrying with backoff.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Configuration {
                reason,
                detail: Some(detail),
            } => write!(f, "{reason} ({detail})"),
            FetchError::Configuration { reason, .. } | FetchError::Transient { reason, .. } => {
                f.write_str(reason)
            }
        }
    }
}

impl std::error::Error for FetchError {}

impl FetchError {
    pub fn failure(&self) -> schedule::Failure {
        match self {
            FetchError::Configuration { .. } => schedule::Failure::Configuration,
            FetchError::Transient { retry_after, .. } => schedule::Failure::Transient {
                retry_after: *retry_after,
            },
        }
    }

    /// What stays the same while the failure stays the same: class and reason, without
    /// server-supplied detail that may vary per attempt (trace ids, timestamps).
    pub fn state_key(&self) -> String {
        match self {
            FetchError::Configuration { reason, .. } | FetchError::Transient { reason, .. } => {
                format!("{}: {reason}", self.class())
            }
        }
    }

    pub fn class(&self) -> &'static str {
        match self {
            FetchError::Configuration { .. } => "configuration",
            FetchError::Transient { .. } => "transient",
        }
    }
}

pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send + 'a>>;

/// Where credentials come from.
pub trait Source: Send + Sync + 'static {
    /// Obtains the current credential (a token request, a file read, an HMAC).
    fn fetch(&self) -> FetchFuture<'_>;

    /// A channel that ticks when the source's backing data changed (a watched file), so
    /// the manager fetches again at once.
    fn changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    /// What the source is, for logs ("oauth2 https://login.example/token").
    fn describe(&self) -> String;

    /// Whether fetching again can bring a different credential: a refusal of one that
    /// cannot change is passed on without a refresh.
    fn renewable(&self) -> bool {
        true
    }

    /// Takes the secret material of `settings` (re-read on SIGHUP) for the next fetch;
    /// true when it changed. Sources whose secrets cannot change while running keep
    /// theirs.
    fn reload(&self, _settings: &crate::config::SourceSettings) -> bool {
        false
    }
}

/// A credential that never changes on its own (`kind = "static"`); a reload (SIGHUP)
/// can replace it.
#[derive(Debug)]
pub struct StaticSource {
    value: arc_swap::ArcSwap<CredentialValue>,
}

impl StaticSource {
    pub fn new(value: CredentialValue) -> Self {
        Self {
            value: arc_swap::ArcSwap::from_pointee(value),
        }
    }
}

impl Source for StaticSource {
    fn fetch(&self) -> FetchFuture<'_> {
        let fetched = Fetched {
            value: CredentialValue::clone(&self.value.load()),
            lifetime: None,
            granted_scopes: None,
        };
        Box::pin(async move { Ok(fetched) })
    }

    fn describe(&self) -> String {
        format!("static {}", self.value.load().kind())
    }

    fn renewable(&self) -> bool {
        false
    }

    fn reload(&self, settings: &crate::config::SourceSettings) -> bool {
        let crate::config::SourceSettings::Static { value } = settings else {
            return false;
        };
        if **self.value.load() == *value {
            return false;
        }
        self.value.store(std::sync::Arc::new(value.clone()));
        true
    }
}

/// The OAuth2 source's settings of an `oauth2` credential configuration.
pub fn oauth2_settings(
    settings: &crate::config::CredentialSettings,
) -> Option<oauth2::OAuth2Settings> {
    let crate::config::SourceSettings::OAuth2 {
        token_url,
        client_id,
        client_secret,
        organization_header,
        client_auth,
        extra_params,
        request_timeout,
        default_lifetime,
    } = &settings.source
    else {
        return None;
    };
    Some(oauth2::OAuth2Settings {
        token_url: token_url.clone(),
        client_id: client_id.clone(),
        client_secret: client_secret.clone(),
        scopes: settings.scopes.clone(),
        organization: settings.organization.clone(),
        organization_header: organization_header.clone(),
        client_auth: *client_auth,
        extra_params: extra_params.clone(),
        request_timeout: *request_timeout,
        default_lifetime: *default_lifetime,
    })
}

/// Builds the source a trunk's configuration describes and starts its manager.
pub fn start_manager(
    trunk: &str,
    settings: &crate::config::CredentialSettings,
    cancel: tokio_util::sync::CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<CredentialManager, oauth2::ClientError> {
    use crate::config::SourceSettings;
    let source: std::sync::Arc<dyn Source> = match &settings.source {
        SourceSettings::OAuth2 { .. } => {
            let Some(oauth2) = oauth2_settings(settings) else {
                return Err(oauth2::ClientError::not_oauth2());
            };
            std::sync::Arc::new(oauth2::OAuth2Source::new(oauth2)?)
        }
        SourceSettings::File {
            path,
            format,
            poll_interval,
        } => std::sync::Arc::new(file::FileSource::start(
            path.clone(),
            *format,
            *poll_interval,
            cancel.clone(),
            tracker,
        )),
        SourceSettings::Ephemeral {
            user,
            secret,
            algorithm,
            lifetime,
        } => std::sync::Arc::new(ephemeral::EphemeralSource::new(
            user.clone(),
            secret.clone(),
            *algorithm,
            *lifetime,
        )),
        SourceSettings::Static { value } => std::sync::Arc::new(StaticSource::new(value.clone())),
    };
    let options = ManagerOptions {
        trunk: trunk.to_string(),
        organization: settings.organization.clone(),
        scopes: settings.scopes.clone(),
        organization_claim: settings.organization_claim.clone(),
        policy: settings.policy,
        skew_threshold: std::time::Duration::from_secs(30),
    };
    Ok(CredentialManager::start(source, options, cancel, tracker))
}

/// Reads a secret from a file (trimmed of surrounding whitespace) or an environment
/// variable; the error names the file or variable, never the content.
pub fn read_secret(file: Option<&std::path::Path>, env: Option<&str>) -> Result<Secret, String> {
    let value = match (file, env) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read secret file {}: {error}", path.display()))?,
        (None, Some(name)) => std::env::var(name)
            .map_err(|_| format!("environment variable {name} is not set or not UTF-8"))?,
        (None, None) => return Err("no secret file or environment variable given".into()),
    };
    let secret = Secret::new(value.trim());
    if secret.is_empty() {
        return Err(match (file, env) {
            (Some(path), _) => format!("secret file {} is empty", path.display()),
            (None, Some(name)) => format!("environment variable {name} is empty"),
            _ => "secret is empty".into(),
        });
    }
    Ok(secret)
}
