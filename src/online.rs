//! `byoc-sidecar check --config F --online`: each trunk diagnosed in plain words, the
//! way an operator would by hand. One token request (reachable? HTTP status and OAuth
//! error; the organization and scopes the token carries against the configuration;
//! `expires_in` against `exp`; clock skew against the endpoint's `Date`; the refresh
//! buffer against the lifetime and the request's latency), then one SIP OPTIONS to the
//! trunk's core with that credential (reachable? what it answers). Every problem comes
//! with a likely cause and a fix. Nothing here prints a secret.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::{AuthMode, CredentialSettings, Settings, SourceSettings, Transport, Trunk};
use crate::credentials::oauth2::OAuth2Source;
use crate::credentials::{jwt, CredentialValue, FetchError, Fetched, Source};

/// How far the endpoint's clock may be from ours before it is called skew.
const SKEW_LIMIT: Duration = Duration::from_secs(5);

/// How long the core gets to answer the OPTIONS.
const CORE_WAIT: Duration = Duration::from_secs(4);

/// One thing checked.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked: `token endpoint`, `token`, `clock`, `refresh`, `core`.
    pub check: &'static str,
    pub ok: bool,
    /// What was seen.
    pub detail: String,
    /// For a problem: the likely cause and the fix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Self {
            check,
            ok: true,
            detail: detail.into(),
            cause: None,
            fix: None,
        }
    }

    fn problem(
        check: &'static str,
        detail: impl Into<String>,
        cause: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            check,
            ok: false,
            detail: detail.into(),
            cause: Some(cause.into()),
            fix: Some(fix.into()),
        }
    }
}

/// The diagnosis of one trunk.
#[derive(Debug, Serialize)]
pub struct TrunkReport {
    pub trunk: String,
    pub organization: Option<String>,
    pub healthy: bool,
    pub findings: Vec<Finding>,
}

/// Diagnoses every trunk, one after the other.
pub async fn check(settings: &Settings) -> Vec<TrunkReport> {
    let mut reports = Vec::new();
    for trunk in &settings.trunks {
        let mut findings = Vec::new();
        let credential = match &trunk.credentials {
            Some(credentials) => credential(credentials, &mut findings).await,
            None => {
                findings.push(Finding::ok(
                    "token",
                    "no credentials configured for this trunk",
                ));
                None
            }
        };
        findings.extend(core(settings, trunk, credential.as_ref()).await);
        reports.push(TrunkReport {
            trunk: trunk.name.clone(),
            organization: trunk
                .credentials
                .as_ref()
                .and_then(|credentials| credentials.organization.clone()),
            healthy: findings.iter().all(|finding| finding.ok),
            findings,
        });
    }
    reports
}

/// The trunk's credential, obtained once; what was seen goes to `findings`.
async fn credential(
    settings: &CredentialSettings,
    findings: &mut Vec<Finding>,
) -> Option<CredentialValue> {
    let Some(oauth2) = crate::credentials::oauth2_settings(settings) else {
        return other_source(settings, findings).await;
    };
    let token_url = oauth2.token_url.clone();
    let source = match OAuth2Source::new(oauth2) {
        Ok(source) => source,
        Err(error) => {
            findings.push(Finding::problem(
                "token endpoint",
                error.to_string(),
                "the HTTP client could not be built on this host",
                "check the host's TLS set-up",
            ));
            return None;
        }
    };
    let probe = source.probe().await;
    let latency = probe.latency;
    let fetched = match probe.outcome {
        Ok(fetched) => fetched,
        Err(error) => {
            findings.push(refused(&error, probe.status, &token_url));
            return None;
        }
    };
    let lifetime = fetched.lifetime;
    findings.push(Finding::ok(
        "token endpoint",
        format!(
            "HTTP 200 in {} ms; token {} issued, {}",
            latency.as_millis(),
            fetched.value.fingerprint(),
            lifetime.map_or("without a lifetime".to_string(), |lifetime| {
                format!("expires in {} s", lifetime.as_secs())
            })
        ),
    ));
    token_findings(settings, &fetched, probe.sent_at, findings);
    findings.push(clock(probe.sent_at, latency, probe.server_date));
    findings.push(refresh(settings, lifetime, latency));
    Some(fetched.value)
}

/// Credentials of the other kinds: fetched once through their source.
async fn other_source(
    settings: &CredentialSettings,
    findings: &mut Vec<Finding>,
) -> Option<CredentialValue> {
    let outcome: Result<Fetched, FetchError> = match &settings.source {
        SourceSettings::Static { value } => Ok(Fetched {
            value: value.clone(),
            lifetime: None,
            granted_scopes: None,
        }),
        SourceSettings::Ephemeral {
            user,
            secret,
            algorithm,
            lifetime,
        } => {
            crate::credentials::ephemeral::EphemeralSource::new(
                user.clone(),
                secret.clone(),
                *algorithm,
                *lifetime,
            )
            .fetch()
            .await
        }
        SourceSettings::File { path, format, .. } => {
            crate::credentials::file::read_credential(path, *format)
        }
        SourceSettings::OAuth2 { .. } => return None,
    };
    match outcome {
        Ok(fetched) => {
            findings.push(Finding::ok(
                "token",
                format!(
                    "{} credential {} read",
                    settings.source.kind(),
                    fetched.value.fingerprint()
                ),
            ));
            Some(fetched.value)
        }
        Err(error) => {
            findings.push(Finding::problem(
                "token",
                error.to_string(),
                "the credential cannot be read or built",
                "check the file the configuration names and its permissions",
            ));
            None
        }
    }
}

/// A token request that did not bring a token, with its likely cause.
fn refused(error: &FetchError, status: Option<u16>, token_url: &str) -> Finding {
    let detail = error.to_string();
    let Some(status) = status else {
        return Finding::problem(
            "token endpoint",
            format!("no answer from {token_url}: {detail}"),
            "the token endpoint cannot be reached or does not answer in time: a wrong token_url, DNS, a firewall or proxy, or the endpoint is down or hanging",
            "check token_url and that this host reaches it (curl -v the URL)",
        );
    };
    let (cause, fix) = if detail.contains("invalid_client") {
        (
            "the endpoint does not know this client id and secret: a wrong client_id, a wrong or rotated secret",
            "check client_id and the secret file; after rotating the secret send SIGHUP to a running sidecar",
        )
    } else if detail.contains("invalid_scope") {
        (
            "a scope this client may not request, or a token asked for an organization the client does not belong to (a parent-org client on a child-org trunk)",
            "compare scopes and organization with what the OAuth client is granted",
        )
    } else if detail.contains("unauthorized_client") {
        (
            "the client may not use the client-credentials grant",
            "enable the client-credentials grant for this client",
        )
    } else if matches!(error, FetchError::Transient { .. }) {
        (
            "the endpoint is failing, throttling or answering what is no token response",
            "retry later; a running sidecar backs off by itself and serves its current token meanwhile",
        )
    } else {
        (
            "the endpoint refused the request",
            "read the endpoint's error above and compare the configuration with the OAuth client",
        )
    };
    Finding::problem(
        "token endpoint",
        format!("HTTP {status}: {detail}"),
        cause,
        fix,
    )
}

/// What the token itself says: organization, scopes, `exp` against `expires_in`.
fn token_findings(
    settings: &CredentialSettings,
    fetched: &Fetched,
    sent_at: SystemTime,
    findings: &mut Vec<Finding>,
) {
    let Some(jwt::TokenReading {
        claims,
        granted,
        diagnostics,
    }) = jwt::read_token(
        fetched,
        sent_at,
        settings.organization.as_deref(),
        settings.organization_claim.as_deref(),
        &settings.scopes,
        i64::try_from(SKEW_LIMIT.as_secs()).unwrap_or(5),
    )
    else {
        return;
    };
    for diagnostic in &diagnostics {
        let (cause, fix) = match diagnostic {
            jwt::Diagnostic::OrganizationMismatch { .. } => (
                "the token endpoint issued the token for another organization: a parent-org client used for a child-org trunk, or the organization header is not the one the endpoint reads",
                "use the OAuth client of the trunk's organization, or set organization / organization_header",
            ),
            jwt::Diagnostic::MissingScopes { .. } => (
                "the OAuth client is not granted those scopes",
                "grant them to the client, or remove them from scopes",
            ),
            jwt::Diagnostic::ExpiryDisagreement { .. } => (
                "this host's clock and the endpoint's disagree, or the endpoint misreports lifetimes",
                "synchronise the clock (NTP)",
            ),
        };
        findings.push(Finding::problem(
            "token",
            diagnostic.to_string(),
            cause,
            fix,
        ));
    }
    if diagnostics.is_empty() {
        let organization = claims
            .as_ref()
            .and_then(|claims| claims.organization.clone())
            .map_or("no organization claim".to_string(), |organization| {
                format!("organization {organization:?}")
            });
        let scopes = granted.map_or("scopes as requested".to_string(), |scopes| {
            format!("scopes {:?}", scopes.join(" "))
        });
        findings.push(Finding::ok("token", format!("{organization}, {scopes}")));
    }
}

/// Clock skew against the endpoint's `Date` (to the second; the request's midpoint).
fn clock(sent_at: SystemTime, latency: Duration, server: Option<SystemTime>) -> Finding {
    let Some(server) = server else {
        return Finding::ok(
            "clock",
            "the endpoint sent no Date header; skew not measured",
        );
    };
    let ours = sent_at + latency / 2;
    let skew = match server.duration_since(ours) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    };
    // Date has whole seconds: up to a second of difference is rounding.
    if skew.abs() > SKEW_LIMIT.as_secs_f64() + 1.0 {
        Finding::problem(
            "clock",
            format!("the endpoint's clock is {skew:+.0} s from this host's"),
            "this host's clock or the endpoint's is off; tokens may look expired or not yet valid",
            "synchronise the clock (NTP)",
        )
    } else {
        Finding::ok(
            "clock",
            format!("within {:.0} s of the endpoint's", skew.abs().max(1.0)),
        )
    }
}

/// The refresh buffer against the token's lifetime and the request's latency.
fn refresh(
    settings: &CredentialSettings,
    lifetime: Option<Duration>,
    latency: Duration,
) -> Finding {
    let buffer = settings.policy.refresh_buffer;
    let Some(lifetime) = lifetime else {
        return Finding::ok(
            "refresh",
            "the token has no lifetime; refreshed when refused",
        );
    };
    if settings.policy.buffer_too_long(lifetime) {
        return Finding::problem(
            "refresh",
            format!(
                "refresh_buffer {} s is more than 90 % of the {} s lifetime",
                buffer.as_secs(),
                lifetime.as_secs()
            ),
            "the buffer cannot be honoured: the sidecar refreshes at 50-60 % of the lifetime instead",
            "lower refresh_buffer below the lifetime",
        );
    }
    if buffer < latency * 2 {
        return Finding::problem(
            "refresh",
            format!(
                "refresh_buffer {} ms is shorter than twice the token request's {} ms",
                buffer.as_millis(),
                latency.as_millis()
            ),
            "a refresh at the last moment would end after the token expired",
            "raise refresh_buffer",
        );
    }
    Finding::ok(
        "refresh",
        format!(
            "refresh_buffer {} s fits the {} s lifetime and the {} ms request",
            buffer.as_secs(),
            lifetime.as_secs(),
            latency.as_millis()
        ),
    )
}

/// The hosts of a core `check --online` asks at most.
const CORE_HOSTS_PROBED: usize = 8;

/// One OPTIONS with the credential to each host the trunk's core resolves to (as the
/// proxy resolves it: RFC 3263, `[dns]`), in preference order, and what came back: one
/// finding per host, named by it when there are several.
async fn core(
    settings: &Settings,
    trunk: &Trunk,
    credential: Option<&CredentialValue>,
) -> Vec<Finding> {
    let supported: Vec<Transport> = settings
        .core_side
        .listen
        .iter()
        .map(|listen| listen.transport)
        .collect();
    let resolved = match crate::dns::resolve::Resolver::new(&settings.dns) {
        Ok(resolver) => resolver
            .resolve(&trunk.core, &supported)
            .await
            .map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    };
    let mut hosts = match resolved {
        Ok(answer) if !answer.resolved.candidates.is_empty() => answer.resolved.candidates,
        Ok(_) | Err(_) => {
            let reason = resolved.err().unwrap_or_else(|| "no address".into());
            return vec![Finding::problem(
                "core",
                format!("{} does not resolve: {reason}", trunk.core),
                "a wrong host name in core, missing DNS records (SRV, NAPTR, A/AAAA), or an unreachable name server",
                "check core = in the trunk and [dns] servers",
            )];
        }
    };
    hosts.sort_by_key(|candidate| (candidate.rank, std::cmp::Reverse(candidate.weight)));
    let several = hosts.len() > 1;
    let mut findings = Vec::new();
    for candidate in hosts.into_iter().take(CORE_HOSTS_PROBED) {
        let mut finding = core_host(trunk, credential, candidate.transport, candidate.addr).await;
        if several {
            finding.detail = format!(
                "host {}:{}: {}",
                candidate.transport, candidate.addr, finding.detail
            );
        }
        findings.push(finding);
    }
    findings
}

/// One OPTIONS to one core host.
async fn core_host(
    trunk: &Trunk,
    credential: Option<&CredentialValue>,
    transport: Transport,
    addr: SocketAddr,
) -> Finding {
    let authorization = match (trunk.auth, credential) {
        (AuthMode::Bearer, Some(CredentialValue::Token(token))) => Some(
            crate::credentials::Secret::new(format!("Bearer {}", token.expose())),
        ),
        _ => None,
    };
    let answer = match transport {
        Transport::Udp => options_udp(addr, authorization.as_ref()).await,
        Transport::Tcp => options_stream(addr, None, authorization.as_ref()).await,
        Transport::Tls => {
            match crate::transport::tls::TlsClient::new(&trunk.tls, &trunk.core.host) {
                Ok(client) => options_stream(addr, Some(client), authorization.as_ref()).await,
                Err(error) => {
                    return Finding::problem(
                        "core",
                        format!("cannot set up TLS toward {transport}:{addr}: {error}"),
                        "a missing or unreadable CA, certificate or key file",
                        "check [trunk.tls]",
                    )
                }
            }
        }
    };
    match answer {
        Ok(Some(status)) => core_answer(trunk.auth, status),
        Ok(None) => Finding::problem(
            "core",
            format!(
                "no answer to OPTIONS from {transport}:{addr} within {} s",
                CORE_WAIT.as_secs()
            ),
            "a wrong core address or port, a firewall, or a core that ignores unknown sources",
            "check core = and that the core allows this host's address",
        ),
        Err(error) if crate::transport::tls::Failure::is_tls(&error) => Finding::problem(
            "core",
            format!(
                "TLS to {transport}:{addr} failed: {}",
                crate::transport::tls::Failure::of(&error)
            ),
            "the core's certificate and the trunk's [trunk.tls] do not fit",
            "see the reason; check tls.ca_file, tls.server_name, the client certificate",
        ),
        Err(error) => Finding::problem(
            "core",
            format!("cannot send OPTIONS to {transport}:{addr}: {error}"),
            "nothing listens there, or the network refuses",
            "check core = in the trunk",
        ),
    }
}

/// What the core's answer (status line) to the OPTIONS means.
fn core_answer(auth: AuthMode, status: String) -> Finding {
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    match code {
        200..=299 => Finding::ok("core", format!("answered {status} to OPTIONS with the credential")),
        401 | 407 if auth == AuthMode::Digest => Finding::ok(
            "core",
            format!("challenges with {status}: a digest trunk answers the challenge on each request"),
        ),
        401 | 403 | 407 => Finding::problem(
            "core",
            format!("answered {status} to OPTIONS with the credential"),
            "the core does not accept this credential: a token for another organization or without the trunk's scope, or the trunk not provisioned for this client",
            "compare the token's organization and scopes with the core's trunk configuration",
        ),
        _ => Finding::ok(
            "core",
            format!("answered {status} to OPTIONS (reachable; the credential was not refused)"),
        ),
    }
}

fn options_text(
    local: SocketAddr,
    target: SocketAddr,
    transport: &str,
    authorization: Option<&crate::credentials::Secret>,
) -> String {
    let tag = format!("{:08x}", rand::random::<u32>());
    let branch = format!("z9hG4bKcheck{:016x}", rand::random::<u64>());
    let auth = authorization.map_or(String::new(), |value| {
        format!("Authorization: {}\r\n", value.expose())
    });
    format!(
        "OPTIONS sip:{target} SIP/2.0\r\nVia: SIP/2.0/{transport} {local};branch={branch};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:byoc-sidecar-check@{local}>;tag={tag}\r\nTo: <sip:{target}>\r\n\
         Call-ID: check-{tag}@byoc-sidecar\r\nCSeq: 1 OPTIONS\r\n{auth}\
         User-Agent: byoc-sidecar/{version} check\r\nContent-Length: 0\r\n\r\n",
        version = env!("CARGO_PKG_VERSION")
    )
}

/// The status line of the first final answer, over UDP with retransmissions (Timer E).
async fn options_udp(
    target: SocketAddr,
    authorization: Option<&crate::credentials::Secret>,
) -> std::io::Result<Option<String>> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().map_err(std::io::Error::other)?
    } else {
        "[::]:0".parse().map_err(std::io::Error::other)?
    };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    socket.connect(target).await?;
    let local = socket.local_addr()?;
    let request = options_text(local, target, "UDP", authorization);
    let deadline = tokio::time::Instant::now() + CORE_WAIT;
    let mut interval = Duration::from_millis(500);
    let mut buffer = vec![0u8; 65_536];
    loop {
        socket.send(request.as_bytes()).await?;
        let until = (tokio::time::Instant::now() + interval).min(deadline);
        loop {
            match tokio::time::timeout_at(until, socket.recv(&mut buffer)).await {
                Err(_) => break,
                Ok(Ok(length)) => {
                    if let Some(status) = final_status(&buffer[..length]) {
                        return Ok(Some(status));
                    }
                }
                // ICMP port unreachable surfaces here on a connected socket.
                Ok(Err(error)) => return Err(error),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        interval = (interval * 2).min(Duration::from_secs(4));
    }
}

/// The status line of the first final answer over TCP, or TLS with `tls`.
async fn options_stream(
    target: SocketAddr,
    tls: Option<crate::transport::tls::TlsClient>,
    authorization: Option<&crate::credentials::Secret>,
) -> std::io::Result<Option<String>> {
    let connect = tokio::net::TcpStream::connect(target);
    let stream = match tokio::time::timeout(CORE_WAIT, connect).await {
        Ok(stream) => stream?,
        Err(_) => return Ok(None),
    };
    let local = stream.local_addr()?;
    match tls {
        None => exchange(stream, local, target, "TCP", authorization).await,
        Some(tls) => {
            let handshake = tls.connector().connect(tls.server_name(), stream);
            let stream = match tokio::time::timeout(CORE_WAIT, handshake).await {
                Ok(stream) => stream?,
                Err(_) => return Ok(None),
            };
            exchange(stream, local, target, "TLS", authorization).await
        }
    }
}

/// Writes the OPTIONS on a connected stream and reads up to its final answer.
async fn exchange(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    local: SocketAddr,
    target: SocketAddr,
    transport: &str,
    authorization: Option<&crate::credentials::Secret>,
) -> std::io::Result<Option<String>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(options_text(local, target, transport, authorization).as_bytes())
        .await?;
    let deadline = tokio::time::Instant::now() + CORE_WAIT;
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 16_384];
    while received.len() < 1 << 20 {
        let read = match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(read) => read?,
            Err(_) => return Ok(None),
        };
        if read == 0 {
            return Ok(None);
        }
        received.extend_from_slice(&buffer[..read]);
        // Messages follow one another; a provisional one may come first.
        for message in received
            .split(|byte| *byte == b'\n')
            .filter(|line| line.starts_with(b"SIP/2.0 "))
        {
            if let Some(status) = final_status(message) {
                return Ok(Some(status));
            }
        }
    }
    Ok(None)
}

/// `SIP/2.0 200 OK` from the start of a message when it is a final response.
fn final_status(bytes: &[u8]) -> Option<String> {
    let line = bytes.split(|byte| *byte == b'\n').next()?;
    let line = String::from_utf8_lossy(line).trim().to_string();
    let code: u16 = line
        .strip_prefix("SIP/2.0 ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    (code >= 200).then_some(line)
}

/// The report as plain text, one block per trunk.
pub fn render(reports: &[TrunkReport]) -> String {
    let mut text = String::new();
    for report in reports {
        let organization = report
            .organization
            .as_deref()
            .map_or(String::new(), |organization| {
                format!(" (organization {organization})")
            });
        let verdict = if report.healthy {
            "healthy"
        } else {
            "PROBLEMS"
        };
        text.push_str(&format!(
            "trunk {}{organization}: {verdict}\n",
            report.trunk
        ));
        for finding in &report.findings {
            let mark = if finding.ok { "ok     " } else { "PROBLEM" };
            text.push_str(&format!(
                "  {mark} {:<15} {}\n",
                finding.check, finding.detail
            ));
            if let Some(cause) = &finding.cause {
                text.push_str(&format!("          likely cause: {cause}\n"));
            }
            if let Some(fix) = &finding.fix {
                text.push_str(&format!("          fix: {fix}\n"));
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_beyond_the_limit_is_a_problem_and_rounding_is_not() {
        let sent = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let latency = Duration::from_millis(200);
        assert!(clock(sent, latency, Some(sent + Duration::from_secs(1))).ok);
        assert!(clock(sent, latency, Some(sent - Duration::from_secs(5))).ok);
        let ahead = clock(sent, latency, Some(sent + Duration::from_secs(90)));
        assert!(!ahead.ok && ahead.detail.contains("+90 s"), "{ahead:?}");
        let behind = clock(sent, latency, Some(sent - Duration::from_secs(30)));
        assert!(!behind.ok && behind.detail.contains("-30 s"), "{behind:?}");
        assert!(clock(sent, latency, None).ok);
    }

    #[test]
    fn the_core_answer_names_a_refused_credential() {
        assert!(core_answer(AuthMode::Bearer, "SIP/2.0 200 OK".into()).ok);
        assert!(core_answer(AuthMode::Bearer, "SIP/2.0 405 Method Not Allowed".into()).ok);
        let refused = core_answer(AuthMode::Bearer, "SIP/2.0 403 Forbidden".into());
        assert!(!refused.ok && refused.cause.unwrap().contains("organization"));
        assert!(core_answer(AuthMode::Digest, "SIP/2.0 401 Unauthorized".into()).ok);
    }

    #[test]
    fn only_final_responses_end_the_wait() {
        assert_eq!(final_status(b"SIP/2.0 100 Trying\r\n"), None);
        assert_eq!(
            final_status(b"SIP/2.0 200 OK\r\nVia: x\r\n").as_deref(),
            Some("SIP/2.0 200 OK")
        );
        assert_eq!(final_status(b"OPTIONS sip:x SIP/2.0\r\n"), None);
        assert_eq!(final_status(b"SIP/2.0 abc\r\n"), None);
    }
}
