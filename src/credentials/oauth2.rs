//! OAuth 2.0 client credentials (RFC 6749 §4.4) over HTTPS with `reqwest` and rustls.
//!
//! The organization id goes in a configurable header (default `X-Genesys-Organization`);
//! the client authenticates with HTTP Basic (§2.3.1, the default) or in the form body;
//! redirects are not followed (a redirected token request is a configuration problem, and
//! following it could hand the secret to another host). Answers are sorted into
//! configuration errors, retried slowly, and transient ones, retried with backoff
//! (RFC 6749 §5.2 error codes; 408, 429 with Retry-After, 5xx, bad bodies, timeouts).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::Value;

use super::{CredentialValue, FetchError, FetchFuture, Fetched, Secret, Source};

/// Token responses larger than this are not a token response.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `Authorization: Basic base64(client_id:client_secret)`.
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Body,
}

#[derive(Debug)]
pub struct OAuth2Source {
    client: reqwest::Client,
    settings: OAuth2Settings,
    /// The client secret in use: the configured one until a reload replaces it.
    secret: arc_swap::ArcSwap<Secret>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct ClientError(String);

impl ClientError {
    /// Asked to build an OAuth2 source from settings of another kind.
    pub fn not_oauth2() -> Self {
        Self("the credential settings are not oauth2".into())
    }
}

/// Everything an [`OAuth2Source`] is made from.
#[derive(Debug)]
pub struct OAuth2Settings {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub scopes: Vec<String>,
    pub organization: Option<String>,
    pub organization_header: String,
    pub client_auth: ClientAuth,
    pub extra_params: Vec<(String, String)>,
    pub request_timeout: Duration,
    /// Lifetime assumed when the response has no `expires_in` (and no JWT `exp`).
    pub default_lifetime: Duration,
}

/// Makes rustls use the `ring` provider (installing it once per process).
pub fn install_crypto_provider() {
    // Fails only when a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl OAuth2Source {
    pub fn new(settings: OAuth2Settings) -> Result<Self, ClientError> {
        install_crypto_provider();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout)
            .user_agent(concat!("byoc-sidecar/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| ClientError(error.to_string()))?;
        let secret = arc_swap::ArcSwap::from_pointee(settings.client_secret.clone());
        Ok(Self {
            client,
            settings,
            secret,
        })
    }

    /// The token request, ready to send, with `secret` as the client secret.
    fn build(&self, secret: &Secret) -> Result<reqwest::RequestBuilder, FetchError> {
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        let scope = self.settings.scopes.join(" ");
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        for (name, value) in &self.settings.extra_params {
            form.push((name, value));
        }
        let mut request = self
            .client
            .post(&self.settings.token_url)
            .header("Accept", "application/json");
        match self.settings.client_auth {
            ClientAuth::Basic => {
                let credentials = Secret::new(format!(
                    "{}:{}",
                    form_urlencode(&self.settings.client_id),
                    form_urlencode(secret.expose())
                ));
                let header =
                    Secret::new(format!("Basic {}", STANDARD.encode(credentials.expose())));
                let mut value =
                    reqwest::header::HeaderValue::from_str(header.expose()).map_err(|_| {
                        FetchError::Configuration {
                            reason: "client id or secret cannot be sent in an HTTP header".into(),
                            detail: None,
                        }
                    })?;
                value.set_sensitive(true);
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            ClientAuth::Body => {
                form.push(("client_id", &self.settings.client_id));
                form.push(("client_secret", secret.expose()));
            }
        }
        if let Some(organization) = &self.settings.organization {
            request = request.header(
                self.settings.organization_header.as_str(),
                organization.as_str(),
            );
        }
        Ok(request.form(&form))
    }

    async fn request(&self) -> Result<Fetched, FetchError> {
        self.probe().await.outcome
    }

    /// One token request, with what a diagnosis needs besides its outcome: the HTTP
    /// status, the endpoint's `Date`, and how long it took (`check --online`).
    pub async fn probe(&self) -> Probe {
        let secret = self.secret.load_full();
        let sent_at = std::time::SystemTime::now();
        let started = tokio::time::Instant::now();
        let mut probe = Probe {
            sent_at,
            latency: Duration::ZERO,
            status: None,
            server_date: None,
            outcome: Err(FetchError::Transient {
                reason: "not sent".into(),
                retry_after: None,
            }),
        };
        let request = match self.build(&secret) {
            Ok(request) => request,
            Err(error) => {
                probe.outcome = Err(error);
                return probe;
            }
        };
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                probe.latency = started.elapsed();
                probe.outcome = Err(scrub(transport_error(&error), &secret));
                return probe;
            }
        };
        let status = response.status().as_u16();
        probe.status = Some(status);
        let header = |name: reqwest::header::HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_string)
        };
        probe.server_date =
            header(reqwest::header::DATE).and_then(|value| httpdate::parse_http_date(&value).ok());
        let retry_after = header(reqwest::header::RETRY_AFTER)
            .and_then(|value| parse_retry_after(&value, std::time::SystemTime::now()));
        let body = read_body(response).await;
        probe.latency = started.elapsed();
        probe.outcome = body
            .and_then(|body| classify(status, &body, retry_after, self.settings.default_lifetime))
            .map_err(|error| scrub(error, &secret));
        probe
    }
}

/// What one token request showed (see [`OAuth2Source::probe`]).
#[derive(Debug)]
pub struct Probe {
    /// Wall-clock time the request was sent.
    pub sent_at: std::time::SystemTime,
    pub latency: Duration,
    /// The HTTP status, when an answer came.
    pub status: Option<u16>,
    /// The endpoint's `Date` header.
    pub server_date: Option<std::time::SystemTime>,
    pub outcome: Result<Fetched, FetchError>,
}

impl Source for OAuth2Source {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(self.request())
    }

    fn reload(&self, settings: &crate::config::SourceSettings) -> bool {
        let crate::config::SourceSettings::OAuth2 { client_secret, .. } = settings else {
            return false;
        };
        if **self.secret.load() == *client_secret {
            return false;
        }
        self.secret
            .store(std::sync::Arc::new(client_secret.clone()));
        true
    }

    fn describe(&self) -> String {
        format!(
            "oauth2 client {:?} at {}",
            self.settings.client_id, self.settings.token_url
        )
    }
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Removes the client secret (as sent, raw or form-encoded) from what the server said,
/// in case it echoes submitted parameters back in `error_description`.
fn scrub(error: FetchError, secret: &Secret) -> FetchError {
    let clean = |text: String| {
        let mut text = text;
        for form in [secret.expose().to_string(), form_urlencode(secret.expose())] {
            if !form.is_empty() {
                text = text.replace(&form, "<redacted>");
            }
        }
        text
    };
    match error {
        FetchError::Configuration { reason, detail } => FetchError::Configuration {
            reason: clean(reason),
            detail: detail.map(clean),
        },
        FetchError::Transient {
            reason,
            retry_after,
        } => FetchError::Transient {
            reason: clean(reason),
            retry_after,
        },
    }
}

/// `application/x-www-form-urlencoded` for the Basic credentials (RFC 6749 §2.3.1).
fn form_urlencode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

/// A failure before any answer: connection refused or reset, timeout, TLS. The error text
/// names the URL and the cause, never a header or the body.
fn transport_error(error: &reqwest::Error) -> FetchError {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    FetchError::Transient {
        reason: format!("token request {what}: {cause}"),
        retry_after: None,
    }
}

async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(FetchError::Transient {
                        reason: format!("token endpoint sent more than {MAX_BODY} bytes"),
                        retry_after: None,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(error) => return Err(transport_error(&error)),
        }
    }
}

/// Sorts an answer into a credential or an error class (RFC 6749 §5.1, §5.2).
pub fn classify(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    default_lifetime: Duration,
) -> Result<Fetched, FetchError> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if status == 200 {
        return parse_success(json.as_ref(), default_lifetime);
    }
    let error_code = json
        .as_ref()
        .and_then(|json| json.get("error"))
        .and_then(Value::as_str)
        .map(|code| {
            code.chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect::<String>()
        });
    let description = json
        .as_ref()
        .and_then(|json| json.get("error_description"))
        .and_then(Value::as_str)
        .map(|text| {
            text.chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>()
        });
    let code = error_code.unwrap_or_else(|| "no OAuth error code".to_string());
    match status {
        408 | 429 | 500..=599 => Err(FetchError::Transient {
            reason: format!("token endpoint answered {status} ({code})"),
            retry_after,
        }),
        300..=399 => Err(FetchError::Configuration {
            reason: format!(
                "token endpoint answered {status} (a redirect, not followed): check token_url"
            ),
            detail: None,
        }),
        _ => Err(FetchError::Configuration {
            reason: format!("token endpoint answered {status} ({code})"),
            detail: description,
        }),
    }
}

fn parse_success(json: Option<&Value>, default_lifetime: Duration) -> Result<Fetched, FetchError> {
    let unusable = |what: &str| FetchError::Transient {
        reason: format!("token endpoint answered 200 with an unusable body: {what}"),
        retry_after: None,
    };
    let json = json.ok_or_else(|| unusable("not JSON"))?;
    let token = json
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| unusable("no access_token"))?;
    if let Some(kind) = json.get("token_type").and_then(Value::as_str) {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(FetchError::Configuration {
                reason: format!(
                    "token endpoint issued a {:?} token; only Bearer tokens are supported",
                    kind.chars().take(32).collect::<String>()
                ),
                detail: None,
            });
        }
    }
    let lifetime = match json.get("expires_in") {
        Some(Value::Number(number)) => number.as_f64(),
        Some(Value::String(text)) => text.trim().parse::<f64>().ok(),
        _ => None,
    };
    let lifetime = match lifetime {
        Some(seconds) if seconds.is_finite() && seconds > 0.0 => {
            Duration::from_secs_f64(seconds.min(1e9))
        }
        Some(_) => return Err(unusable("expires_in is not a positive number")),
        None => super::jwt::claims(token, None)
            .and_then(|claims| claims.expires?.checked_sub(claims.issued?))
            .and_then(|seconds| u64::try_from(seconds).ok())
            .filter(|seconds| *seconds > 0)
            .map(|seconds| Duration::from_secs(seconds).min(super::schedule::MAX_SPAN))
            .unwrap_or(default_lifetime),
    };
    let granted_scopes = json
        .get("scope")
        .and_then(Value::as_str)
        .map(|scopes| scopes.split_whitespace().map(str::to_string).collect());
    Ok(Fetched {
        value: CredentialValue::Token(Secret::new(token)),
        lifetime: Some(lifetime),
        granted_scopes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn success_gives_token_lifetime_and_scopes() {
        let body =
            br#"{"access_token":"abc","token_type":"bearer","expires_in":3600,"scope":"a b"}"#;
        let fetched = classify(200, body, None, DAY).unwrap();
        assert_eq!(fetched.value, CredentialValue::Token(Secret::new("abc")));
        assert_eq!(fetched.lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(fetched.granted_scopes, Some(vec!["a".into(), "b".into()]));
        let string_lifetime =
            classify(200, br#"{"access_token":"x","expires_in":"60"}"#, None, DAY).unwrap();
        assert_eq!(string_lifetime.lifetime, Some(Duration::from_secs(60)));
        let no_lifetime = classify(200, br#"{"access_token":"x"}"#, None, DAY).unwrap();
        assert_eq!(no_lifetime.lifetime, Some(DAY));
    }

    #[test]
    fn unusable_200_bodies_are_transient() {
        for body in [
            &b""[..],
            b"<html>",
            b"{}",
            br#"{"access_token":""}"#,
            br#"{"access_token":"x","expires_in":-5}"#,
        ] {
            let error = classify(200, body, None, DAY).unwrap_err();
            assert_eq!(error.class(), "transient", "{error}");
        }
    }

    #[test]
    fn oauth_errors_are_configuration_problems() {
        let error = classify(401, br#"{"error":"invalid_client"}"#, None, DAY).unwrap_err();
        assert_eq!(error.class(), "configuration");
        assert!(
            error.to_string().contains("401 (invalid_client)"),
            "{error}"
        );
        let error = classify(
            400,
            br#"{"error":"invalid_scope","error_description":"org mismatch"}"#,
            None,
            DAY,
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "token endpoint answered 400 (invalid_scope) (org mismatch)"
        );
        // Detail that varies per attempt does not make a new state.
        let again = classify(
            400,
            br#"{"error":"invalid_scope","error_description":"trace 2"}"#,
            None,
            DAY,
        )
        .unwrap_err();
        assert_eq!(error.state_key(), again.state_key());
        assert_eq!(
            classify(302, b"", None, DAY).unwrap_err().class(),
            "configuration"
        );
        assert_eq!(
            classify(
                200,
                br#"{"access_token":"x","token_type":"mac"}"#,
                None,
                DAY
            )
            .unwrap_err()
            .class(),
            "configuration"
        );
    }

    #[test]
    fn overload_and_server_errors_are_transient_with_retry_after() {
        let error = classify(429, b"slow down", Some(Duration::from_secs(7)), DAY).unwrap_err();
        assert_eq!(
            error.failure(),
            super::super::schedule::Failure::Transient {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        for status in [408, 500, 502, 503, 504] {
            assert_eq!(
                classify(status, b"", None, DAY).unwrap_err().class(),
                "transient"
            );
        }
    }

    #[test]
    fn echoed_secret_is_scrubbed_from_the_description() {
        let secret = Secret::new("p@ss word");
        let body = br#"{"error":"invalid_client","error_description":"bad secret p@ss word / p%40ss+word"}"#;
        let error = scrub(classify(401, body, None, DAY).unwrap_err(), &secret);
        let text = error.to_string();
        assert!(
            !text.contains("p@ss word") && !text.contains("p%40ss+word"),
            "{text}"
        );
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn jwt_lifetime_without_expires_in_is_bounded() {
        let token = crate::credentials::jwt::encode_unverified(
            &serde_json::json!({"exp": i64::MAX, "iat": i64::MIN}),
            "s",
        );
        let body = serde_json::json!({"access_token": token}).to_string();
        assert_eq!(
            classify(200, body.as_bytes(), None, DAY).unwrap().lifetime,
            Some(DAY)
        );
        let token = crate::credentials::jwt::encode_unverified(
            &serde_json::json!({"exp": i64::MAX, "iat": 0}),
            "s",
        );
        let body = serde_json::json!({"access_token": token}).to_string();
        assert_eq!(
            classify(200, body.as_bytes(), None, DAY).unwrap().lifetime,
            Some(super::super::schedule::MAX_SPAN)
        );
    }

    #[test]
    fn basic_credentials_are_form_encoded() {
        assert_eq!(form_urlencode("a b:c/d+é"), "a+b%3Ac%2Fd%2B%C3%A9");
    }
}
