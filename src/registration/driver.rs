//! The task that keeps one trunk registered: it sleeps until the [`Registration`] says a
//! REGISTER is due, builds it with the trunk's current credentials, hands it to the
//! proxy ([`Outgoing`]: the proxy runs the client transaction toward the trunk's core)
//! and feeds the outcome back. It is the UAC of its own REGISTERs, so it answers their
//! refusals itself, by the one policy the proxy's re-send follows too
//! ([`crate::credentials::refusal`]) and over the trunk's one Digest state, shared with
//! the proxy: a Digest challenge is answered at once, a 403 or a refused credential
//! only with a newer credential from the manager's `replacement` (the one rule of
//! `credentials::verdict`: a rotation waits for the next refresh the rate limit allows,
//! a permanent refusal does not wait); one re-send per REGISTER, one more for a stale
//! nonce. Every answer that shows the registrar accepting the credential is reported to
//! the manager.

use std::sync::Arc;
use std::time::Duration;

use rsip::Response;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::machine::{Failure, Notice, Registration, Send, State};
use crate::config::{AuthMode, RegistrationSettings};
use crate::credentials::refusal::{qualifies, read_refusal, Refusal, TrunkDigest};
use crate::credentials::{Credential, CredentialManager, CredentialValue};
use crate::sip::digest::{sent_answers, ChallengeKind};
use crate::sip::header::{header_params, name_addr_uri, param, split_list};
use crate::sip::message::{self, header_values};
use crate::stats::Stats;

/// A REGISTER (or any request the sidecar itself sends) for the proxy to send toward
/// trunk `trunk`'s core: the proxy adds its Via and runs the client transaction; the
/// final response, its Via removed, goes to `reply`. No final response (timeout,
/// transport failure) drops `reply`. Credentials are the sender's business.
pub struct Outgoing {
    pub trunk: usize,
    pub request: Box<rsip::Request>,
    pub reply: oneshot::Sender<Response>,
}

/// What the registration of a trunk looks like from outside (metrics, readiness, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationStatus {
    pub state: State,
    /// Until when the binding is held, as far as the sidecar knows.
    pub valid_until: Option<tokio::time::Instant>,
    pub consecutive_failures: u32,
    /// REGISTERs sent, re-sends included.
    pub sent: u64,
    /// The last failure, as logged.
    pub last_failure: Option<String>,
    /// The credential generation of the last successful REGISTER.
    pub generation: Option<u64>,
}

/// Everything a driver needs about its trunk.
pub struct TrunkRegistration {
    pub trunk: String,
    pub index: usize,
    pub auth: AuthMode,
    /// The trunk's Digest state, shared with the proxy (one `nc` count per nonce).
    pub digest: TrunkDigest,
    pub credentials: Option<CredentialManager>,
    pub settings: RegistrationSettings,
    /// The Contact URI registered (the sidecar's core side, with the trunk's index).
    pub contact: String,
}

/// How long the first REGISTER waits for the trunk's first credential.
const FIRST_CREDENTIAL_WAIT: Duration = Duration::from_secs(10);

/// How much longer than its deadline a refused REGISTER waits for the manager's answer
/// (which comes by the deadline; this only bounds the wait whatever happens).
const REFRESH_MARGIN: Duration = Duration::from_secs(2);

/// Starts the driver; its status is published on the returned receiver. The task ends
/// after `stop` is cancelled and the unregister (if any) is done.
pub fn spawn(
    trunk: TrunkRegistration,
    engine: mpsc::Sender<Outgoing>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> watch::Receiver<RegistrationStatus> {
    let now = tokio::time::Instant::now();
    let machine = Registration::new(
        trunk.settings.clone(),
        now.into_std(),
        rand::random::<u32>() % 10_000 + 1,
    );
    let status = RegistrationStatus {
        state: machine.state(),
        valid_until: None,
        consecutive_failures: 0,
        sent: 0,
        last_failure: None,
        generation: None,
    };
    let (publish, receiver) = watch::channel(status);
    let driver = Driver {
        call_id: format!("{:032x}@byoc-sidecar", rand::random::<u128>()),
        from_tag: format!("{:016x}", rand::random::<u64>()),
        trunk,
        machine,
        engine,
        stats,
        publish,
        attempt: Attempt::default(),
    };
    tracker.spawn(driver.run(stop));
    receiver
}

/// The REGISTER in flight: what it carried and how many times it was re-sent.
#[derive(Default)]
struct Attempt {
    resends: u8,
    generation: Option<u64>,
    /// When the REGISTER carrying `generation` was sent.
    sent_at: Option<std::time::Instant>,
    /// Its credentials header values, for telling a stale nonce from a refused password.
    answers: Vec<(ChallengeKind, String)>,
}

struct Driver {
    trunk: TrunkRegistration,
    machine: Registration,
    call_id: String,
    from_tag: String,
    engine: mpsc::Sender<Outgoing>,
    stats: Arc<Stats>,
    publish: watch::Sender<RegistrationStatus>,
    attempt: Attempt,
}

/// The outcome of a REGISTER, as the driver reads it.
enum Reading {
    Success(Option<Duration>),
    IntervalTooBrief(Option<Duration>),
    /// Re-send with the credential at hand (a challenge to answer).
    ResendNow,
    /// Re-send only with a credential newer than the one used.
    ResendIfNewer,
    Failed(Failure),
}

impl Driver {
    async fn run(mut self, stop: CancellationToken) {
        let mut generations = self
            .trunk
            .credentials
            .as_ref()
            .map(CredentialManager::attempts);
        let mut known_generation = self.current_generation();
        let mut pending: Option<oneshot::Receiver<Response>> = None;
        let mut stopping = false;
        tracing::info!(trunk = %self.trunk.trunk, aor = %self.trunk.settings.aor, contact = %self.trunk.contact, "registration started");
        // The first REGISTER waits for the first credential (briefly: a source that
        // cannot deliver one makes the attempt fail and back off like any other).
        if let (Some(manager), true) = (&self.trunk.credentials, self.trunk.auth != AuthMode::None)
        {
            let mut attempts = manager.attempts();
            let first = attempts.wait_for(|_| manager.current().is_some());
            tokio::select! {
                _ = tokio::time::timeout(FIRST_CREDENTIAL_WAIT, first) => {}
                _ = stop.cancelled() => {}
            }
        }
        loop {
            if pending.is_none() {
                let (send, notice) = self.machine.poll(now());
                self.log(&notice);
                if let Some(send) = send {
                    self.attempt = Attempt::default();
                    pending = self.transmit(send).await;
                    if pending.is_none() {
                        continue;
                    }
                }
            }
            self.publish_status();
            if self.machine.state() == State::Stopped {
                break;
            }
            let wake = self.machine.next_at().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    let (unregister, notice) = self.machine.shut_down(now());
                    self.log(&notice);
                    if unregister {
                        tracing::info!(trunk = %self.trunk.trunk, "unregistering");
                    }
                }
                // The engine answers or drops the sender: at Timer F, on a transport
                // failure, or when it stops. No timer of our own, so two REGISTERs are
                // never in flight whatever T1 is.
                answer = async {
                    match pending.as_mut() {
                        Some(receiver) => receiver.await,
                        None => std::future::pending().await,
                    }
                } => {
                    pending = self.handle(answer.ok(), stopping, &stop).await;
                }
                _ = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if pending.is_none() => {}
                changed = async {
                    match generations.as_mut() {
                        Some(receiver) => receiver.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if changed.is_err() {
                        generations = None;
                        continue;
                    }
                    let generation = self.current_generation();
                    if generation.is_some() && generation != known_generation {
                        known_generation = generation;
                        if generation == self.attempt.generation {
                            // The REGISTER just sent (a re-send after a forced refresh)
                            // carries it already.
                            continue;
                        }
                        tracing::debug!(trunk = %self.trunk.trunk, generation = ?generation, "credential changed; re-registering");
                        self.machine.credentials_changed(now());
                    }
                }
            }
        }
        self.publish_status();
        tracing::info!(trunk = %self.trunk.trunk, "registration stopped");
    }

    fn current_generation(&self) -> Option<u64> {
        self.trunk
            .credentials
            .as_ref()
            .and_then(CredentialManager::current)
            .map(|credential| credential.generation)
    }

    fn current_credential(&self) -> Option<Arc<Credential>> {
        self.trunk
            .credentials
            .as_ref()
            .and_then(CredentialManager::current)
    }

    /// Builds and hands the REGISTER to the engine. `None` when it could not be sent
    /// (no credential, the engine gone); the machine has been told.
    async fn transmit(&mut self, send: Send) -> Option<oneshot::Receiver<Response>> {
        self.transmit_with(send, None).await
    }

    /// [`Driver::transmit`] with `credential` instead of the current one, if given.
    async fn transmit_with(
        &mut self,
        send: Send,
        credential: Option<Arc<Credential>>,
    ) -> Option<oneshot::Receiver<Response>> {
        let credential = credential.or_else(|| self.current_credential());
        let request = match self.build(send, credential.as_deref()) {
            Ok(request) => request,
            Err(reason) => {
                let notice = self.machine.failed(
                    now(),
                    Failure::Rejected { status: 0, reason },
                    None,
                    rand::random::<f64>(),
                );
                self.log(&notice);
                return None;
            }
        };
        self.attempt.generation = credential.map(|credential| credential.generation);
        self.attempt.sent_at = Some(now());
        let (reply, receiver) = oneshot::channel();
        let event = Outgoing {
            trunk: self.trunk.index,
            request: Box::new(request),
            reply,
        };
        Stats::bump(&self.stats.registers_sent);
        self.publish.send_modify(|status| status.sent += 1);
        if self.engine.send(event).await.is_err() {
            let notice = self
                .machine
                .failed(now(), Failure::NoAnswer, None, rand::random::<f64>());
            self.log(&notice);
            return None;
        }
        Some(receiver)
    }

    /// The REGISTER for `send`, with the trunk's credentials.
    fn build(
        &mut self,
        send: Send,
        credential: Option<&Credential>,
    ) -> Result<rsip::Request, String> {
        let settings = &self.trunk.settings;
        let text = format!(
            "REGISTER {registrar} SIP/2.0\r\n\
             From: <{aor}>;tag={tag}\r\n\
             To: <{aor}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <{contact}>\r\n\
             Expires: {expires}\r\n\
             Max-Forwards: 70\r\n\
             User-Agent: byoc-sidecar/{version}\r\n\
             Content-Length: 0\r\n\r\n",
            registrar = settings.registrar,
            aor = settings.aor,
            tag = self.from_tag,
            call_id = self.call_id,
            cseq = send.cseq,
            contact = self.trunk.contact,
            expires = send.expires.as_secs(),
            version = env!("CARGO_PKG_VERSION"),
        );
        let rsip::SipMessage::Request(mut request) = message::parse(text.as_bytes(), true)
            .map_err(|error| format!("cannot build the REGISTER: {error}"))?
        else {
            return Err("cannot build the REGISTER".into());
        };
        self.attempt.answers.clear();
        match (
            self.trunk.auth,
            credential.map(|credential| &credential.value),
        ) {
            (AuthMode::None, _) => {}
            (AuthMode::Bearer, Some(CredentialValue::Token(token))) => {
                request.headers.push(rsip::Header::Authorization(
                    format!("Bearer {}", token.expose()).into(),
                ));
            }
            (AuthMode::Digest, Some(CredentialValue::UserPassword { username, password })) => {
                let uri = request.uri.to_string();
                let cnonce = || format!("{:016x}", rand::random::<u64>());
                let answers = self
                    .trunk
                    .digest
                    .lock()
                    .authorize("REGISTER", &uri, username, password, cnonce);
                for (kind, value) in answers {
                    request.headers.push(match kind {
                        ChallengeKind::Www => rsip::Header::Authorization(value.clone().into()),
                        ChallengeKind::Proxy => {
                            rsip::Header::ProxyAuthorization(value.clone().into())
                        }
                    });
                    self.attempt.answers.push((kind, value));
                }
            }
            _ => return Err("no valid credential of the kind the trunk's auth needs".into()),
        }
        Ok(request)
    }

    /// Feeds a final response (or its absence) to the machine, re-sending when the
    /// rules allow. Returns the receiver of a re-sent REGISTER's answer.
    async fn handle(
        &mut self,
        response: Option<Response>,
        stopping: bool,
        stop: &CancellationToken,
    ) -> Option<oneshot::Receiver<Response>> {
        let now = now();
        let reading = match &response {
            None => Reading::Failed(Failure::NoAnswer),
            Some(response) => self.read(response),
        };
        if let (Some(response), Some(manager), Some(generation), Some(sent_at)) = (
            &response,
            &self.trunk.credentials,
            self.attempt.generation,
            self.attempt.sent_at,
        ) {
            // A REGISTER is checked by the registrar: any answer but a refusal shows it
            // took the credential (the same rule as the proxy's, `verdict`).
            let checked = crate::credentials::verdict::checked_by_core(
                crate::sip::wire::Method::Register,
                false,
            );
            if checked && crate::credentials::verdict::shows_acceptance(response.status_code.code())
            {
                manager.note_accepted(generation, sent_at);
            }
        }
        // A challenge is answered even while unregistering (the kept nonce is often
        // stale by then); waiting for a newer credential is not worth the deadline.
        let resend_allowed = self.attempt.resends < 2;
        let notice = match reading {
            Reading::Success(granted) => {
                let notice = self.machine.succeeded(now, granted);
                self.publish
                    .send_modify(|status| status.generation = self.attempt.generation);
                notice
            }
            Reading::IntervalTooBrief(min) => self.machine.interval_too_brief(now, min),
            Reading::ResendNow if resend_allowed => {
                return self.resend().await;
            }
            Reading::ResendIfNewer if resend_allowed && !stopping => {
                if let Some(manager) = self.trunk.credentials.clone() {
                    let rejected = self.attempt.generation.unwrap_or(0);
                    let sent_at = self.attempt.sent_at.unwrap_or(now);
                    let deadline = tokio::time::Instant::now() + manager.resend_wait();
                    let replacement = manager.replacement(rejected, sent_at, deadline);
                    // Shutdown does not wait for this.
                    let refreshed = tokio::select! {
                        refreshed = tokio::time::timeout_at(deadline + REFRESH_MARGIN, replacement) => {
                            refreshed.ok().flatten()
                        }
                        _ = stop.cancelled() => None,
                    };
                    let qualified = refreshed.filter(|credential| {
                        qualifies(
                            credential,
                            rejected,
                            sent_at,
                            true,
                            manager.activation_delay(),
                        )
                    });
                    if let Some(newer) = qualified {
                        // With the replacement itself: during an activation delay
                        // `current` would still serve the refused one.
                        return self.resend_with(Some(newer)).await;
                    }
                }
                self.machine.failed(
                    now,
                    rejection(response.as_ref()),
                    None,
                    rand::random::<f64>(),
                )
            }
            Reading::ResendNow | Reading::ResendIfNewer => self.machine.failed(
                now,
                rejection(response.as_ref()),
                None,
                rand::random::<f64>(),
            ),
            Reading::Failed(failure) => {
                // Retry-After: delta-seconds, optionally followed by a comment (§20.33).
                let retry_after = response.as_ref().and_then(|response| {
                    header_values(&response.headers, "Retry-After")
                        .next()
                        .and_then(|value| {
                            delta_seconds(value.split([';', '(']).next().unwrap_or(""))
                        })
                });
                self.machine
                    .failed(now, failure, retry_after, rand::random::<f64>())
            }
        };
        if matches!(self.machine.state(), State::BackingOff) {
            Stats::bump(&self.stats.register_failures);
        }
        self.log(&notice);
        None
    }

    async fn resend(&mut self) -> Option<oneshot::Receiver<Response>> {
        self.resend_with(None).await
    }

    /// Re-sends the REGISTER, with `credential` or else the current one.
    async fn resend_with(
        &mut self,
        credential: Option<Arc<Credential>>,
    ) -> Option<oneshot::Receiver<Response>> {
        self.attempt.resends += 1;
        let send = self.machine.resend(now())?;
        self.transmit_with(send, credential).await
    }

    /// What a final response means for this REGISTER.
    fn read(&mut self, response: &Response) -> Reading {
        let code = response.status_code.code();
        match code {
            200..=299 => Reading::Success(self.granted(response)),
            423 => Reading::IntervalTooBrief(
                header_values(&response.headers, "Min-Expires")
                    .next()
                    .and_then(delta_seconds),
            ),
            401 | 403 | 407 => {
                let kind = ChallengeKind::of_status(code);
                let sent = sent_answers(
                    self.attempt
                        .answers
                        .iter()
                        .filter(|(answered, _)| Some(*answered) == kind)
                        .map(|(_, value)| value.as_str()),
                );
                let challenges: Vec<&str> = kind
                    .map(|kind| header_values(&response.headers, kind.challenge_header()).collect())
                    .unwrap_or_default();
                match read_refusal(
                    self.trunk.auth,
                    code,
                    "REGISTER",
                    &challenges,
                    &sent,
                    self.attempt.resends > 0,
                    &mut self.trunk.digest.lock(),
                ) {
                    Refusal::AnswerChallenge => Reading::ResendNow,
                    Refusal::NeedNewer => Reading::ResendIfNewer,
                    Refusal::Unanswerable { offered } => Reading::Failed(Failure::Rejected {
                        status: code,
                        reason: format!("challenge cannot be answered: {offered}"),
                    }),
                    Refusal::Stands => Reading::Failed(rejection(Some(response))),
                }
            }
            _ => Reading::Failed(rejection(Some(response))),
        }
    }

    /// The expiry the registrar granted our Contact: its `expires` parameter, else the
    /// `Expires` header, else `None` (the requested value stands).
    fn granted(&self, response: &Response) -> Option<Duration> {
        let ours = contact_key(&self.trunk.contact);
        let from_contact = header_values(&response.headers, "Contact")
            .flat_map(split_list)
            .filter(|value| ours.is_some() && contact_key(name_addr_uri(value)) == ours)
            .find_map(|value| delta_seconds(param(header_params(value), "expires").flatten()?));
        from_contact.or_else(|| {
            header_values(&response.headers, "Expires")
                .next()
                .and_then(delta_seconds)
        })
    }

    fn publish_status(&self) {
        let state = self.machine.state();
        let valid_until = self
            .machine
            .valid_until()
            .map(tokio::time::Instant::from_std);
        let failures = self.machine.consecutive_failures();
        self.publish.send_if_modified(|status| {
            let changed = status.state != state
                || status.valid_until != valid_until
                || status.consecutive_failures != failures;
            status.state = state;
            status.valid_until = valid_until;
            status.consecutive_failures = failures;
            changed
        });
    }

    fn log(&self, notice: &Notice) {
        if let Some((from, to)) = notice.state_changed {
            tracing::info!(trunk = %self.trunk.trunk, from = from.as_str(), to = to.as_str(), "registration state");
        }
        if let Some(failure) = &notice.new_failure {
            tracing::warn!(trunk = %self.trunk.trunk, failure = %failure, failures = self.machine.consecutive_failures(), "registration failed; retrying with backoff");
            self.publish
                .send_modify(|status| status.last_failure = Some(failure.clone()));
        }
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

fn rejection(response: Option<&Response>) -> Failure {
    match response {
        Some(response) => {
            let status = response.status_code.code();
            // rsip writes the code in front of the phrase.
            let text = response.status_code.to_string();
            let reason = text
                .strip_prefix(&format!("{status} "))
                .unwrap_or(&text)
                .to_string();
            Failure::Rejected { status, reason }
        }
        None => Failure::NoAnswer,
    }
}

/// RFC 3261 delta-seconds, capped at 2^32 - 1 (§20.19) so no arithmetic can overflow.
fn delta_seconds(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let seconds = text
        .parse::<u64>()
        .unwrap_or(u64::MAX)
        .min(u64::from(u32::MAX));
    Some(Duration::from_secs(seconds))
}

/// A Contact URI as registrars echo it: the user part as is (case matters there, and it
/// may hold `;` or `?`), the host in lower case, the port, and the trunk parameter. Other
/// URI parameters may be reordered or dropped by the registrar.
type ContactKey = (String, String, String, Option<String>);

fn contact_key(uri: &str) -> Option<ContactKey> {
    let uri = uri.trim();
    let rest = uri
        .strip_prefix("sip:")
        .or_else(|| uri.strip_prefix("sips:"))?;
    let (user, host_and_params) = match rest.rfind('@') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => ("", rest),
    };
    let end = host_and_params
        .find([';', '?'])
        .unwrap_or(host_and_params.len());
    let host_port = host_and_params[..end].to_ascii_lowercase();
    // The port follows the last ':' unless that ':' is inside an IPv6 reference.
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port))
            if !port.contains(']') && (!host.contains(':') || host.ends_with(']')) =>
        {
            (host.to_string(), port.to_string())
        }
        _ => (host_port.clone(), "5060".to_string()),
    };
    let params = &host_and_params[end..];
    let params = &params[..params.find('?').unwrap_or(params.len())];
    let trunk = param(params, crate::sip::TRUNK_PARAM)
        .flatten()
        .map(str::to_string);
    Some((user.to_string(), host, port, trunk))
}

#[cfg(test)]
mod tests {
    use super::contact_key;

    #[test]
    fn contacts_compare_by_user_host_port_and_trunk() {
        let ours = contact_key("sip:trunk@10.0.0.5:5070;bsct=0");
        assert!(ours.is_some());
        assert_eq!(
            contact_key("sip:trunk@10.0.0.5:5070;transport=udp;bsct=0"),
            ours
        );
        assert_eq!(
            contact_key("sip:trunk@10.0.0.5:5070;bsct=1").map(|key| key.3),
            Some(Some("1".into()))
        );
        assert_ne!(contact_key("sip:trunk@10.0.0.5:5070;bsct=1"), ours);
        assert_ne!(
            contact_key("sip:Trunk@10.0.0.5:5070;bsct=0"),
            ours,
            "user parts are case-sensitive"
        );
        assert_ne!(contact_key("sip:trunk@10.0.0.5:5071;bsct=0"), ours);
        // A user part with ';' (a telephone-subscriber) is not cut short.
        let phone =
            contact_key("sip:+1555;phone-context=example.com@10.0.0.5:5070;bsct=0").unwrap();
        assert_eq!(phone.0, "+1555;phone-context=example.com");
        assert_ne!(
            contact_key("sip:+1555@10.0.0.5:5070;bsct=0").unwrap(),
            phone
        );
        assert_eq!(
            contact_key("sip:trunk@[::1]:5070").map(|key| (key.1, key.2)),
            Some(("[::1]".into(), "5070".into()))
        );
        assert_eq!(
            contact_key("sip:trunk@[::1]").map(|key| key.2),
            Some("5060".into())
        );
        assert_eq!(contact_key("tel:+1555"), None);
    }

    #[test]
    fn delta_seconds_are_capped_and_junk_refused() {
        use super::delta_seconds;
        use std::time::Duration;
        assert_eq!(delta_seconds(" 60 "), Some(Duration::from_secs(60)));
        assert_eq!(
            delta_seconds("10000000000000000000000"),
            Some(Duration::from_secs(u64::from(u32::MAX)))
        );
        assert_eq!(delta_seconds("-1"), None);
        assert_eq!(delta_seconds("60s"), None);
        assert_eq!(delta_seconds(""), None);
    }
}
