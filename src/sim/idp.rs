//! A simulated OAuth 2.0 token endpoint (client credentials, RFC 6749 §4.4) on loopback.
//!
//! It knows clients by id, secret and organization; checks the organization header
//! (403 `invalid_scope` on a mismatch) and the secret (401 `invalid_client`); issues JWT
//! or opaque tokens with a configurable lifetime; and injects faults on demand: status
//! codes with `Retry-After`, delays, empty or garbage bodies, dropped connections. It
//! counts requests and issued tokens and remembers every token it issued, so tests can
//! check that none of them leaked into a log.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::credentials::jwt;

#[derive(Debug, Clone)]
pub struct SimClient {
    pub id: String,
    pub secret: String,
    pub organization: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Jwt,
    Opaque,
}

#[derive(Debug, Clone)]
pub struct IdpSettings {
    pub clients: Vec<SimClient>,
    pub ttl: Duration,
    pub kind: TokenKind,
    pub organization_header: String,
}

impl IdpSettings {
    pub fn new(clients: Vec<SimClient>, ttl: Duration, kind: TokenKind) -> Self {
        Self {
            clients,
            ttl,
            kind,
            organization_header: "X-Genesys-Organization".into(),
        }
    }
}

/// What to do instead of (or before) answering normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and an OAuth error body, with `Retry-After` in seconds.
    Status { code: u16, retry_after: Option<u64> },
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// 200 with an empty body.
    EmptyBody,
    /// 200 with a body that is not JSON.
    Garbage,
    /// Close the connection without answering.
    Drop,
}

/// How a core decides whether a token is acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// Any token the endpoint issued that has not expired.
    AnyUnexpired,
    /// Only the newest token of each client: issuing a new one revokes the older ones at
    /// once (the behaviour that makes rotation drop calls).
    RevokeOnReissue,
    /// No token at all: a permission problem that no refresh fixes.
    RejectAll,
    /// A token is accepted only this long after it was issued (it propagates through the
    /// core meanwhile); earlier tokens stay valid until they expire.
    PropagationLag(std::time::Duration),
}

/// What a core learns about a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCheck {
    Valid,
    Unknown,
    Expired,
    Revoked,
    /// Valid, but not allowed here.
    Forbidden,
    /// Issued, but not yet propagated to where it is checked.
    NotYetValid,
}

/// A token the endpoint issued.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub client_id: String,
    pub organization: String,
    pub issued_at: Instant,
    pub expires_at: Instant,
}

#[derive(Default)]
struct Faults {
    /// Applies to every request until cleared.
    persistent: Option<Fault>,
    /// One-shot faults, used up in order before the persistent one.
    queue: VecDeque<Fault>,
}

struct State {
    settings: IdpSettings,
    faults: Mutex<Faults>,
    issued: Mutex<Vec<IssuedToken>>,
    /// Every token issued at or before this moment is revoked (a signing-key rotation).
    revoked_before: Mutex<Option<Instant>>,
    revocations: AtomicU64,
    requests: AtomicU64,
    tokens: AtomicU64,
}

/// A running simulated token endpoint; stops with its cancellation token.
#[derive(Clone)]
pub struct Idp {
    pub addr: SocketAddr,
    state: Arc<State>,
}

/// Ends the connection: the service's error makes hyper close it without an answer.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault injection: connection dropped")
    }
}

impl std::error::Error for DropConnection {}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Idp {
    pub async fn start(
        settings: IdpSettings,
        listen: SocketAddr,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> std::io::Result<Idp> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            settings,
            faults: Mutex::new(Faults::default()),
            issued: Mutex::new(Vec::new()),
            revoked_before: Mutex::new(None),
            revocations: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
        });
        let served = state.clone();
        let connections = tracker.clone();
        tracker.spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            tracing::debug!(error = %error, "simulated idp accept failed");
                            continue;
                        }
                    },
                };
                let state = served.clone();
                let cancel = cancel.clone();
                connections.spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request| handle(state.clone(), request));
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        // Errors here are the injected drops and clients going away.
                        _ = connection => {}
                    }
                });
            }
        });
        Ok(Idp { addr, state })
    }

    pub fn url(&self) -> String {
        format!("http://{}/oauth/token", self.addr)
    }

    /// Sets (or with `None` clears) a fault for every request.
    pub fn set_fault(&self, fault: Option<Fault>) {
        lock(&self.state.faults).persistent = fault;
    }

    /// Queues one-shot faults for the next requests.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state.faults).queue.extend(faults);
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    pub fn tokens_issued(&self) -> u64 {
        self.state.tokens.load(Ordering::Relaxed)
    }

    pub fn issued(&self) -> Vec<IssuedToken> {
        lock(&self.state.issued).clone()
    }

    /// Issues a token to `client_id` without an HTTP request, as another instance sharing
    /// the client would: under revoke-on-reissue it invalidates every earlier token.
    pub fn issue_for(&self, client_id: &str) -> Option<String> {
        let client = self
            .state
            .settings
            .clients
            .iter()
            .find(|client| client.id == client_id)?;
        Some(mint(&self.state, client, ""))
    }

    /// Revokes every token issued so far, of every client, as rotating the signing key
    /// does: each validation mode then refuses them as revoked.
    pub fn revoke_all(&self) {
        *lock(&self.state.revoked_before) = Some(Instant::now());
        self.state.revocations.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times [`Idp::revoke_all`] ran.
    pub fn revocations(&self) -> u64 {
        self.state.revocations.load(Ordering::Relaxed)
    }

    /// Whether `token` is acceptable now under `validation`.
    pub fn check(&self, token: &str, validation: Validation) -> TokenCheck {
        let revoked_before = *lock(&self.state.revoked_before);
        let issued = lock(&self.state.issued);
        let Some(position) = issued
            .iter()
            .rposition(|candidate| candidate.token == token)
        else {
            return TokenCheck::Unknown;
        };
        let found = &issued[position];
        if Instant::now() >= found.expires_at {
            return TokenCheck::Expired;
        }
        if revoked_before.is_some_and(|revoked| found.issued_at <= revoked) {
            return TokenCheck::Revoked;
        }
        match validation {
            Validation::AnyUnexpired => TokenCheck::Valid,
            Validation::PropagationLag(lag) => {
                if Instant::now() < found.issued_at + lag {
                    TokenCheck::NotYetValid
                } else {
                    TokenCheck::Valid
                }
            }
            Validation::RejectAll => TokenCheck::Forbidden,
            Validation::RevokeOnReissue => {
                let newer = issued[position + 1..]
                    .iter()
                    .any(|later| later.client_id == found.client_id);
                if newer {
                    TokenCheck::Revoked
                } else {
                    TokenCheck::Valid
                }
            }
        }
    }
}

type Answer = Result<Response<Full<Bytes>>, DropConnection>;

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    response
}

fn oauth_error(status: StatusCode, code: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        json!({"error": code, "error_description": description}),
    )
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Answer {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let fault = {
        let mut faults = lock(&state.faults);
        faults
            .queue
            .pop_front()
            .or_else(|| faults.persistent.clone())
    };
    match fault {
        Some(Fault::Status { code, retry_after }) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut response = oauth_error(
                status,
                "temporarily_unavailable",
                "fault injected by the simulator",
            );
            if let Some(seconds) = retry_after {
                response.headers_mut().insert(
                    hyper::header::RETRY_AFTER,
                    hyper::header::HeaderValue::from(seconds),
                );
            }
            return Ok(response);
        }
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::EmptyBody) => return Ok(Response::new(Full::new(Bytes::new()))),
        Some(Fault::Garbage) => {
            return Ok(Response::new(Full::new(Bytes::from_static(
                b"<html>not a token</html>",
            ))))
        }
        Some(Fault::Drop) => return Err(DropConnection),
        None => {}
    }
    Ok(issue(&state, request).await)
}

async fn issue(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != hyper::Method::POST {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        );
    }
    let headers = request.headers().clone();
    let body = match Limited::new(request.into_body(), 64 * 1024).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "unreadable body",
            )
        }
    };
    let form = parse_form(&String::from_utf8_lossy(&body));
    let field = |name: &str| {
        form.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    if field("grant_type").as_deref() != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials",
        );
    }
    let basic = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Basic "))
        .and_then(|encoded| STANDARD.decode(encoded.trim()).ok())
        .and_then(|decoded| String::from_utf8(decoded).ok())
        .and_then(|pair| {
            let (id, secret) = pair.split_once(':')?;
            Some((percent_decode(id), percent_decode(secret)))
        });
    let (client_id, secret) = match basic {
        Some(pair) => pair,
        None => (
            field("client_id").unwrap_or_default(),
            field("client_secret").unwrap_or_default(),
        ),
    };
    let Some(client) = state
        .settings
        .clients
        .iter()
        .find(|client| client.id == client_id && client.secret == secret)
    else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "unknown client or wrong secret",
        );
    };
    let organization = headers
        .get(state.settings.organization_header.as_str())
        .and_then(|value| value.to_str().ok());
    if organization != Some(client.organization.as_str()) {
        return oauth_error(
            StatusCode::FORBIDDEN,
            "invalid_scope",
            "the organization header does not match the client's organization",
        );
    }
    let scope = field("scope").unwrap_or_default();
    let token = mint(state, client, &scope);
    let mut body = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": state.settings.ttl.as_secs_f64(),
    });
    if !scope.is_empty() {
        body["scope"] = json!(scope);
    }
    json_response(StatusCode::OK, body)
}

/// Issues and records a token for `client`.
fn mint(state: &State, client: &SimClient, scope: &str) -> String {
    let now = Instant::now();
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let serial = state.tokens.fetch_add(1, Ordering::Relaxed) + 1;
    let nonce = format!("{:016x}", rand::random::<u64>());
    let token = match state.settings.kind {
        TokenKind::Jwt => jwt::encode_unverified(
            &json!({
                "iss": "byoc-sidecar-sim",
                "sub": client.id,
                "org_id": client.organization,
                "scope": scope,
                "iat": wall,
                "exp": wall + state.settings.ttl.as_secs(),
                "jti": format!("{serial}-{nonce}"),
            }),
            &nonce,
        ),
        TokenKind::Opaque => format!("opaque-{serial}-{nonce}"),
    };
    lock(&state.issued).push(IssuedToken {
        token: token.clone(),
        client_id: client.id.clone(),
        organization: client.organization.clone(),
        issued_at: now,
        expires_at: now + state.settings.ttl,
    });
    token
}

fn parse_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) => (percent_decode(key), percent_decode(value)),
            None => (percent_decode(pair), String::new()),
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; a `%`
/// not followed by two hex digits stays as it is.
fn percent_decode(text: &str) -> String {
    fn hex(byte: u8) -> Option<u8> {
        (byte as char)
            .to_digit(16)
            .and_then(|digit| u8::try_from(digit).ok())
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        let escaped = (byte == b'%')
            .then(|| Some((hex(*bytes.get(index + 1)?)?, hex(*bytes.get(index + 2)?)?)))
            .flatten();
        match (byte, escaped) {
            (_, Some((high, low))) => {
                out.push(high << 4 | low);
                index += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                index += 1;
            }
            (other, None) => {
                out.push(other);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        assert_eq!(percent_decode("a+b%3Ac%2Fd"), "a b:c/d");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%é%4"), "%é%4");
        assert_eq!(
            parse_form("grant_type=client_credentials&scope=a+b&x"),
            vec![
                ("grant_type".to_string(), "client_credentials".to_string()),
                ("scope".to_string(), "a b".to_string()),
                ("x".to_string(), String::new()),
            ]
        );
    }
}
