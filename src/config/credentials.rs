//! `[trunk.credentials]`: one table whose `kind` says which other keys apply. Checked
//! like the rest of the configuration: every problem reported, each naming trunk and key.
//! Secrets are read here, from files or environment variables (never inline), so `check`
//! reports an unreadable secret before `run` needs it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{parse_duration, Problems};
use crate::credentials::ephemeral::HmacAlgorithm;
use crate::credentials::file::FileFormat;
use crate::credentials::oauth2::ClientAuth;
use crate::credentials::schedule::RefreshPolicy;
use crate::credentials::{read_secret, Secret};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// The longest `resend_wait` (and so `force_refresh_interval`): a refused BYE must still
/// be answered before the Edge gives up on it (Timer F, 32 s with the default T1).
const MAX_RESEND_WAIT: Duration = Duration::from_secs(30);
/// The longest lifetime a credential may be configured with.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    /// `oauth2`, `file`, `ephemeral` or `static`.
    pub kind: String,
    // oauth2
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub client_secret_env: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub organization: Option<String>,
    pub organization_header: Option<String>,
    pub organization_claim: Option<String>,
    pub client_auth: Option<String>,
    pub extra_params: Option<std::collections::BTreeMap<String, String>>,
    pub request_timeout: Option<String>,
    pub default_lifetime: Option<String>,
    // file
    pub path: Option<PathBuf>,
    pub format: Option<String>,
    pub poll_interval: Option<String>,
    // ephemeral
    pub user: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
    pub algorithm: Option<String>,
    pub lifetime: Option<String>,
    // static
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    // refresh policy (oauth2, ephemeral)
    pub refresh_buffer: Option<String>,
    pub backoff_initial: Option<String>,
    pub backoff_max: Option<String>,
    pub slow_retry: Option<String>,
    pub force_refresh_interval: Option<String>,
    pub activation_delay: Option<String>,
    pub resend_wait: Option<String>,
}

/// A validated credential configuration.
#[derive(Debug, Clone)]
pub struct CredentialSettings {
    pub source: SourceSettings,
    pub policy: RefreshPolicy,
    pub organization: Option<String>,
    pub scopes: Vec<String>,
    pub organization_claim: Option<String>,
}

#[derive(Debug, Clone)]
pub enum SourceSettings {
    OAuth2 {
        token_url: String,
        client_id: String,
        client_secret: Secret,
        organization_header: String,
        client_auth: ClientAuth,
        extra_params: Vec<(String, String)>,
        request_timeout: Duration,
        default_lifetime: Duration,
    },
    File {
        path: PathBuf,
        format: FileFormat,
        poll_interval: Duration,
    },
    Ephemeral {
        user: String,
        secret: Secret,
        algorithm: HmacAlgorithm,
        lifetime: Duration,
    },
    Static {
        value: crate::credentials::CredentialValue,
    },
}

impl SourceSettings {
    /// Whether the source produces a bearer token (rather than a username and password).
    pub fn yields_token(&self) -> bool {
        match self {
            SourceSettings::OAuth2 { .. } => true,
            SourceSettings::File { format, .. } => *format == FileFormat::Token,
            SourceSettings::Ephemeral { .. } => false,
            SourceSettings::Static { value } => {
                matches!(value, crate::credentials::CredentialValue::Token(_))
            }
        }
    }

    /// The configured `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceSettings::OAuth2 { .. } => "oauth2",
            SourceSettings::File { .. } => "file",
            SourceSettings::Ephemeral { .. } => "ephemeral",
            SourceSettings::Static { .. } => "static",
        }
    }
}

impl CredentialsConfig {
    /// The keys given, by name, for the "does not apply" check.
    fn given(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        macro_rules! check {
            ($($field:ident),*) => { $( if self.$field.is_some() { given.push(stringify!($field)); } )* };
        }
        check!(
            token_url,
            client_id,
            client_secret_file,
            client_secret_env,
            scopes,
            organization,
            organization_header,
            organization_claim,
            client_auth,
            extra_params,
            request_timeout,
            default_lifetime,
            path,
            format,
            poll_interval,
            user,
            secret_file,
            secret_env,
            algorithm,
            lifetime,
            token_file,
            token_env,
            username,
            password_file,
            password_env,
            refresh_buffer,
            backoff_initial,
            backoff_max,
            slow_retry,
            force_refresh_interval,
            activation_delay,
            resend_wait
        );
        given
    }

    pub(super) fn validate(
        &self,
        label: &str,
        problems: &mut Problems,
    ) -> Option<CredentialSettings> {
        let key = |name: &str| format!("{label}.credentials.{name}");
        const POLICY: &[&str] = &[
            "refresh_buffer",
            "backoff_initial",
            "backoff_max",
            "slow_retry",
            "force_refresh_interval",
            "activation_delay",
            "resend_wait",
        ];
        const ORG: &[&str] = &["organization", "scopes", "organization_claim"];
        let allowed: Vec<&str> = match self.kind.as_str() {
            "oauth2" => [
                &[
                    "token_url",
                    "client_id",
                    "client_secret_file",
                    "client_secret_env",
                    "organization_header",
                    "client_auth",
                    "extra_params",
                    "request_timeout",
                    "default_lifetime",
                ][..],
                POLICY,
                ORG,
            ]
            .concat(),
            // A file another agent rewrites is re-read when the core refuses what it
            // held, as often as force_refresh_interval allows.
            "file" => [
                &[
                    "path",
                    "format",
                    "poll_interval",
                    "force_refresh_interval",
                    "resend_wait",
                ][..],
                ORG,
            ]
            .concat(),
            "ephemeral" => [
                &["user", "secret_file", "secret_env", "algorithm", "lifetime"][..],
                POLICY,
                ORG,
            ]
            .concat(),
            "static" => [
                &[
                    "token_file",
                    "token_env",
                    "username",
                    "password_file",
                    "password_env",
                ][..],
                ORG,
            ]
            .concat(),
            other => {
                problems.add(
                    &key("kind"),
                    format!(
                        "{other:?} is not one of \"oauth2\", \"file\", \"ephemeral\", \"static\""
                    ),
                );
                return None;
            }
        };
        for name in self.given() {
            if !allowed.contains(&name) {
                problems.add(
                    &key(name),
                    format!("does not apply to kind = {:?}", self.kind),
                );
            }
        }
        let before = problems.0.len();
        let duration = |problems: &mut Problems,
                        name: &str,
                        value: &Option<String>,
                        default: Duration| match value {
            Some(text) => parse_duration(text)
                .map_err(|message| problems.add(&key(name), message))
                .unwrap_or(default),
            None => default,
        };
        let defaults = RefreshPolicy::default();
        let policy = RefreshPolicy {
            refresh_buffer: duration(
                problems,
                "refresh_buffer",
                &self.refresh_buffer,
                defaults.refresh_buffer,
            ),
            backoff_initial: duration(
                problems,
                "backoff_initial",
                &self.backoff_initial,
                defaults.backoff_initial,
            ),
            backoff_max: duration(
                problems,
                "backoff_max",
                &self.backoff_max,
                defaults.backoff_max,
            ),
            slow_retry: duration(
                problems,
                "slow_retry",
                &self.slow_retry,
                defaults.slow_retry,
            ),
            force_interval: duration(
                problems,
                "force_refresh_interval",
                &self.force_refresh_interval,
                defaults.force_interval,
            ),
            activation_delay: duration(
                problems,
                "activation_delay",
                &self.activation_delay,
                defaults.activation_delay,
            ),
            resend_wait: duration(
                problems,
                "resend_wait",
                &self.resend_wait,
                defaults.resend_wait,
            ),
        };
        if policy.backoff_initial.is_zero() || policy.backoff_max < policy.backoff_initial {
            problems.add(
                &key("backoff_max"),
                "must be at least backoff_initial, which must be more than zero".into(),
            );
        }
        // Bounds that keep every schedule sane (no busy loop, no overflow).
        for (name, value, low, high) in [
            ("refresh_buffer", policy.refresh_buffer, Duration::ZERO, DAY),
            (
                "backoff_initial",
                policy.backoff_initial,
                Duration::from_millis(10),
                DAY,
            ),
            (
                "backoff_max",
                policy.backoff_max,
                Duration::from_millis(10),
                DAY,
            ),
            ("slow_retry", policy.slow_retry, Duration::from_secs(1), DAY),
            // Below a second a refused credential could make token requests back to back.
            (
                "force_refresh_interval",
                policy.force_interval,
                Duration::from_secs(1),
                MAX_RESEND_WAIT,
            ),
            (
                "resend_wait",
                policy.resend_wait,
                Duration::from_secs(1),
                MAX_RESEND_WAIT,
            ),
            (
                "activation_delay",
                policy.activation_delay,
                Duration::ZERO,
                Duration::from_secs(600),
            ),
        ] {
            problems.within(&key(name), value, low, high);
        }
        // A refused request waits for the next forced refresh; the rate limit must let one
        // through within the wait, or a rotation inside the window would fail calls.
        let in_range =
            |value: Duration| (Duration::from_secs(1)..=MAX_RESEND_WAIT).contains(&value);
        if in_range(policy.force_interval)
            && in_range(policy.resend_wait)
            && policy.resend_wait < policy.force_interval
        {
            problems.add(
                &key("resend_wait"),
                format!(
                    "{:?} is shorter than force_refresh_interval ({:?}): a rotation inside the rate-limit window would fail calls",
                    policy.resend_wait, policy.force_interval
                ),
            );
        }
        let secret = |problems: &mut Problems,
                      file: &Option<PathBuf>,
                      env: &Option<String>,
                      names: (&str, &str)|
         -> Option<Secret> {
            match (file, env) {
                (Some(_), Some(_)) => {
                    problems.add(
                        &key(names.0),
                        format!("give {} or {}, not both", names.0, names.1),
                    );
                    None
                }
                (None, None) => {
                    problems.add(
                        &key(names.0),
                        format!(
                            "{} or {} is required (secrets are never written inline)",
                            names.0, names.1
                        ),
                    );
                    None
                }
                _ => read_secret(file.as_deref(), env.as_deref())
                    .map_err(|message| {
                        problems.add(
                            &key(if file.is_some() { names.0 } else { names.1 }),
                            message,
                        )
                    })
                    .ok(),
            }
        };
        let required =
            |problems: &mut Problems, name: &str, value: &Option<String>| -> Option<String> {
                match value.as_deref().map(str::trim) {
                    Some(text) if !text.is_empty() => Some(text.to_string()),
                    _ => {
                        problems.add(
                            &key(name),
                            format!("is required for kind = {:?}", self.kind),
                        );
                        None
                    }
                }
            };
        let source = match self.kind.as_str() {
            "oauth2" => {
                let token_url = required(problems, "token_url", &self.token_url);
                if let Some(url) = &token_url {
                    if let Err(message) = check_token_url(url) {
                        problems.add(&key("token_url"), message);
                    }
                }
                let client_id = required(problems, "client_id", &self.client_id);
                let client_secret = secret(
                    problems,
                    &self.client_secret_file,
                    &self.client_secret_env,
                    ("client_secret_file", "client_secret_env"),
                );
                let client_auth = match self.client_auth.as_deref().unwrap_or("basic") {
                    "basic" => ClientAuth::Basic,
                    "body" => ClientAuth::Body,
                    other => {
                        problems.add(
                            &key("client_auth"),
                            format!("{other:?} is neither \"basic\" nor \"body\""),
                        );
                        ClientAuth::Basic
                    }
                };
                let request_timeout = duration(
                    problems,
                    "request_timeout",
                    &self.request_timeout,
                    Duration::from_secs(10),
                );
                let default_lifetime = duration(
                    problems,
                    "default_lifetime",
                    &self.default_lifetime,
                    Duration::from_secs(300),
                );
                for (name, value, low, high) in [
                    (
                        "request_timeout",
                        request_timeout,
                        Duration::from_millis(100),
                        Duration::from_secs(300),
                    ),
                    (
                        "default_lifetime",
                        default_lifetime,
                        Duration::from_secs(2),
                        MAX_LIFETIME,
                    ),
                ] {
                    problems.within(&key(name), value, low, high);
                }
                SourceSettings::OAuth2 {
                    token_url: token_url.unwrap_or_default(),
                    client_id: client_id.unwrap_or_default(),
                    client_secret: client_secret.unwrap_or_else(|| Secret::new("")),
                    organization_header: self
                        .organization_header
                        .clone()
                        .unwrap_or_else(|| "X-Genesys-Organization".into()),
                    client_auth,
                    extra_params: self
                        .extra_params
                        .clone()
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                    request_timeout,
                    default_lifetime,
                }
            }
            "file" => {
                if self.path.is_none() {
                    problems.add(&key("path"), "is required for kind = \"file\"".into());
                }
                let format = match self.format.as_deref().unwrap_or("token") {
                    "token" => FileFormat::Token,
                    "username_password" => FileFormat::UsernamePassword,
                    other => {
                        problems.add(
                            &key("format"),
                            format!("{other:?} is neither \"token\" nor \"username_password\""),
                        );
                        FileFormat::Token
                    }
                };
                let poll_interval = duration(
                    problems,
                    "poll_interval",
                    &self.poll_interval,
                    Duration::from_millis(250),
                );
                if poll_interval.is_zero() {
                    problems.add(&key("poll_interval"), "must be more than zero".into());
                }
                SourceSettings::File {
                    path: self.path.clone().unwrap_or_default(),
                    format,
                    poll_interval,
                }
            }
            "ephemeral" => {
                let user = required(problems, "user", &self.user);
                let secret = secret(
                    problems,
                    &self.secret_file,
                    &self.secret_env,
                    ("secret_file", "secret_env"),
                );
                let algorithm = match self.algorithm.as_deref().unwrap_or("sha256") {
                    "sha1" => HmacAlgorithm::Sha1,
                    "sha256" => HmacAlgorithm::Sha256,
                    other => {
                        problems.add(
                            &key("algorithm"),
                            format!("{other:?} is neither \"sha1\" nor \"sha256\""),
                        );
                        HmacAlgorithm::Sha256
                    }
                };
                let lifetime = duration(
                    problems,
                    "lifetime",
                    &self.lifetime,
                    Duration::from_secs(3600),
                );
                problems.within(
                    &key("lifetime"),
                    lifetime,
                    Duration::from_secs(2),
                    MAX_LIFETIME,
                );
                SourceSettings::Ephemeral {
                    user: user.unwrap_or_default(),
                    secret: secret.unwrap_or_else(|| Secret::new("")),
                    algorithm,
                    lifetime,
                }
            }
            _ => {
                let value = match (
                    &self.username,
                    self.token_file.is_some() || self.token_env.is_some(),
                ) {
                    (None, true) => secret(
                        problems,
                        &self.token_file,
                        &self.token_env,
                        ("token_file", "token_env"),
                    )
                    .map(crate::credentials::CredentialValue::Token),
                    (Some(username), false) => secret(
                        problems,
                        &self.password_file,
                        &self.password_env,
                        ("password_file", "password_env"),
                    )
                    .map(|password| {
                        crate::credentials::CredentialValue::UserPassword {
                            username: username.clone(),
                            password,
                        }
                    }),
                    _ => {
                        problems.add(&key("kind"), "static needs token_file/token_env, or username with password_file/password_env".into());
                        None
                    }
                };
                SourceSettings::Static {
                    value: value
                        .unwrap_or(crate::credentials::CredentialValue::Token(Secret::new(""))),
                }
            }
        };
        (problems.0.len() == before).then(|| CredentialSettings {
            source,
            policy,
            organization: self.organization.clone(),
            scopes: self.scopes.clone().unwrap_or_default(),
            organization_claim: self.organization_claim.clone(),
        })
    }
}

/// HTTPS, or plain HTTP to a loopback address (the simulator); never user:password@.
fn check_token_url(url: &str) -> Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not an absolute URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(
            "must not carry credentials in the URL; use client_secret_file or client_secret_env"
                .into(),
        );
    }
    let host = crate::sip::via::split_host_port(authority)
        .map(|(host, _)| crate::sip::via::strip_brackets(host).to_ascii_lowercase())
        .map_err(|_| format!("{url:?} has no host"))?;
    match scheme.to_ascii_lowercase().as_str() {
        "https" => Ok(()),
        "http"
            if host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()) =>
        {
            Ok(())
        }
        "http" => Err("must use https (plain http is accepted for loopback addresses only)".into()),
        other => Err(format!("scheme {other:?} is not https")),
    }
}
