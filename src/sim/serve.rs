//! The simulators as standalone processes (`byoc-sidecar sim idp|core`), for load runs
//! and rehearsals with real programs around them: they print where they listen and run
//! until cancelled.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::core::SimCore;
use super::idp::{Fault, Idp, IdpSettings, SimClient, TokenKind, Validation};

/// How tokens are issued.
#[derive(Debug, Clone)]
pub struct IdpOptions {
    pub listen: SocketAddr,
    pub ttl: Duration,
    pub kind: TokenKind,
    pub client: SimClient,
    /// Another instance of the client takes a token this often (revoking earlier ones
    /// under revoke-on-reissue).
    pub reissue_every: Option<Duration>,
    /// Every token issued so far is revoked this often (a signing-key rotation).
    pub revoke_every: Option<Duration>,
    /// The next token request fails this way once per interval.
    pub fault: Option<(Fault, Duration)>,
}

/// Parses a fault for the token endpoint: `status=503`, `status=429,retry-after=2`,
/// `delay=3s`, `empty`, `garbage` or `drop`.
pub fn parse_fault(text: &str) -> Result<Fault, String> {
    match text {
        "empty" => return Ok(Fault::EmptyBody),
        "garbage" => return Ok(Fault::Garbage),
        "drop" => return Ok(Fault::Drop),
        _ => {}
    }
    if let Some(delay) = text.strip_prefix("delay=") {
        return crate::config::parse_duration(delay).map(Fault::Delay);
    }
    if let Some(rest) = text.strip_prefix("status=") {
        let (code, retry_after) = match rest.split_once(",retry-after=") {
            Some((code, seconds)) => (
                code,
                Some(
                    seconds
                        .parse::<u64>()
                        .map_err(|_| format!("retry-after {seconds:?} is not seconds"))?,
                ),
            ),
            None => (rest, None),
        };
        let code = code
            .parse::<u16>()
            .ok()
            .filter(|code| (400..600).contains(code))
            .ok_or_else(|| format!("status {code:?} is not an error status 400-599"))?;
        return Ok(Fault::Status { code, retry_after });
    }
    Err(format!(
        "{text:?} is not status=<code>[,retry-after=<s>], delay=<duration>, empty, garbage or drop"
    ))
}

/// Parses `revoke-on-reissue`, `any-unexpired`, `reject-all` or
/// `propagation-lag=<duration>`.
pub fn parse_validation(text: &str) -> Result<Validation, String> {
    match text {
        "revoke-on-reissue" => Ok(Validation::RevokeOnReissue),
        "any-unexpired" => Ok(Validation::AnyUnexpired),
        "reject-all" => Ok(Validation::RejectAll),
        other => match other.strip_prefix("propagation-lag=") {
            Some(lag) => crate::config::parse_duration(lag)
                .map(Validation::PropagationLag)
                .map_err(|error| format!("propagation-lag: {error}")),
            None => Err(format!(
                "{other:?} is not revoke-on-reissue, any-unexpired, reject-all or propagation-lag=<duration>"
            )),
        },
    }
}

/// Parses `id:secret:organization`.
pub fn parse_client(text: &str) -> Result<SimClient, String> {
    let mut parts = text.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(id), Some(secret), Some(organization))
            if !id.is_empty() && !secret.is_empty() && !organization.is_empty() =>
        {
            Ok(SimClient {
                id: id.into(),
                secret: secret.into(),
                organization: organization.into(),
            })
        }
        _ => Err(format!("{text:?} is not id:secret:organization")),
    }
}

/// Parses `jwt` or `opaque`.
pub fn parse_kind(text: &str) -> Result<TokenKind, String> {
    match text {
        "jwt" => Ok(TokenKind::Jwt),
        "opaque" => Ok(TokenKind::Opaque),
        other => Err(format!("{other:?} is neither jwt nor opaque")),
    }
}

/// Runs `action` every `period`, first after one period, until cancelled.
fn repeat(
    period: Duration,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
    mut action: impl FnMut() + Send + 'static,
) {
    let cancel = cancel.clone();
    tracker.spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => action(),
            }
        }
    });
}

/// Starts the token endpoint (and the rival reissuer, the revoker and the fault
/// injector, if asked); prints its URL.
pub async fn start_idp(
    options: &IdpOptions,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<Idp> {
    let idp = Idp::start(
        IdpSettings::new(vec![options.client.clone()], options.ttl, options.kind),
        options.listen,
        cancel.clone(),
        tracker,
    )
    .await?;
    println!(
        "sim idp: token endpoint {} for client {:?} (organization {:?}), tokens live {:?}",
        idp.url(),
        options.client.id,
        options.client.organization,
        options.ttl
    );
    if let Some(every) = options.reissue_every {
        let (issuer, client) = (idp.clone(), options.client.id.clone());
        repeat(every, cancel, tracker, move || {
            let _ = issuer.issue_for(&client);
        });
        println!("sim idp: another instance of the client takes a token every {every:?}");
    }
    if let Some(every) = options.revoke_every {
        let revoker = idp.clone();
        repeat(every, cancel, tracker, move || revoker.revoke_all());
        println!("sim idp: every token issued so far is revoked every {every:?}");
    }
    if let Some((fault, every)) = options.fault.clone() {
        let injector = idp.clone();
        println!("sim idp: the next token request after every {every:?} fails with {fault:?}");
        repeat(every, cancel, tracker, move || {
            injector.push_faults([fault.clone()])
        });
    }
    Ok(idp)
}

/// Starts the token endpoint and the core checking its tokens; prints both.
pub async fn start_core(
    idp_options: &IdpOptions,
    listen: SocketAddr,
    validation: Validation,
    far_end: Option<SocketAddr>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<(Idp, SimCore)> {
    let idp = start_idp(idp_options, cancel, tracker).await?;
    let core = SimCore::start_relay(
        idp.clone(),
        validation,
        listen,
        far_end,
        cancel.clone(),
        tracker,
    )
    .await?;
    match far_end {
        Some(far_end) => println!(
            "sim core: udp:{} checking tokens ({validation:?}), relaying accepted calls to {far_end}",
            core.addr
        ),
        None => println!(
            "sim core: udp:{} checking tokens ({validation:?}), answering calls itself",
            core.addr
        ),
    }
    Ok((idp, core))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_name_what_is_wrong() {
        assert_eq!(
            parse_validation("propagation-lag=800ms"),
            Ok(Validation::PropagationLag(Duration::from_millis(800)))
        );
        assert_eq!(
            parse_validation("revoke-on-reissue"),
            Ok(Validation::RevokeOnReissue)
        );
        assert!(parse_validation("lag")
            .unwrap_err()
            .contains("propagation-lag"));
        assert!(parse_validation("propagation-lag=soon").is_err());
        let client = parse_client("edge-a:s3cret:org:with:colons").unwrap();
        assert_eq!(
            (
                client.id.as_str(),
                client.secret.as_str(),
                client.organization.as_str()
            ),
            ("edge-a", "s3cret", "org:with:colons")
        );
        assert!(parse_client("edge-a:secret").is_err());
        assert!(parse_kind("saml").is_err());
        assert_eq!(
            parse_fault("status=429,retry-after=2"),
            Ok(Fault::Status {
                code: 429,
                retry_after: Some(2)
            })
        );
        assert_eq!(
            parse_fault("delay=3s"),
            Ok(Fault::Delay(Duration::from_secs(3)))
        );
        assert_eq!(parse_fault("drop"), Ok(Fault::Drop));
        assert!(parse_fault("status=200").is_err());
        assert!(parse_fault("explode")
            .unwrap_err()
            .contains("status=<code>"));
    }
}
