//! How the sidecar answers the core's 401, 403 and 407 to a request carrying a trunk's
//! credential: the one policy the proxy's re-send and the registration driver both
//! follow (STYLE rule 11), over the trunk's one Digest state ([`TrunkDigest`]). Pure.
//!
//! - A Digest challenge (RFC 7616 §3.3, RFC 8760) to a first send, a stale nonce (§3.5),
//!   or a realm the request did not answer yet: answer it now with the same password.
//! - The very answer refused, a re-send challenged afresh, a 403, or a bearer trunk's
//!   401: only a newer credential helps (RFC 8898 §3: a rejected token is refreshed,
//!   not re-offered); whether one is worth waiting for is
//!   [`super::verdict`]'s reading. A re-send gets no second re-send except to answer a
//!   stale nonce or a new realm.
//! - A challenge the sidecar cannot answer (algorithm, qop, realm): the refusal stands.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::AuthMode;
use crate::credentials::Credential;
use crate::sip::digest::{ChallengeKind, DigestClient, Verdict};

/// What to do about a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Answer the core's challenge now, with the same credential.
    AnswerChallenge,
    /// Re-send once with a newer credential, if the manager has one to give.
    NeedNewer,
    /// The challenge cannot be answered; `offered` says what the core offered.
    Unanswerable { offered: String },
    /// Not the sidecar's to re-send: the answer stands.
    Stands,
}

/// One trunk's Digest state (the core's challenges, nonces and counts), shared by the
/// proxy and the trunk's registration so that both count one `nc` per nonce.
#[derive(Debug, Clone)]
pub struct TrunkDigest(Arc<Mutex<DigestClient>>);

impl TrunkDigest {
    /// The state of a trunk that answers only `realm` (any, when `None`).
    pub fn new(realm: Option<String>) -> Self {
        Self(Arc::new(Mutex::new(DigestClient::new(realm))))
    }

    /// The state, for one step. Never held across a wait.
    pub fn lock(&self) -> MutexGuard<'_, DigestClient> {
        // The state is plain data; a panic elsewhere while holding it leaves it usable.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reads refusal `code` of a request of `method` that carried the trunk's credential
/// (`auth`): `challenges` are the response's challenge header values of the kind the
/// code names, `sent` the Digest answers the refused request carried
/// ([`crate::sip::digest::sent_answers`]), `is_resend` whether it was already a re-send.
/// Digest challenges are learnt into `digest`.
pub fn read_refusal(
    auth: AuthMode,
    code: u16,
    method: &str,
    challenges: &[&str],
    sent: &[(String, String)],
    is_resend: bool,
    digest: &mut DigestClient,
) -> Refusal {
    if !matches!(code, 401 | 403 | 407) {
        return Refusal::Stands;
    }
    match (auth, ChallengeKind::of_status(code)) {
        (AuthMode::Digest, Some(kind)) => {
            match digest.learn(kind, method, challenges.iter().copied(), sent) {
                Verdict::AnswerNow { stale, new_realm } if !is_resend || stale || new_realm => {
                    Refusal::AnswerChallenge
                }
                // The very answer was refused (or a re-send was challenged afresh, which
                // RFC 7616 §3.3 reads the same way): only a newer password helps.
                Verdict::AnswerNow { .. } | Verdict::CredentialRefused => Refusal::NeedNewer,
                Verdict::Unanswerable { offered } => Refusal::Unanswerable { offered },
            }
        }
        (AuthMode::Bearer, _) | (AuthMode::Digest, None) if code != 407 && !is_resend => {
            Refusal::NeedNewer
        }
        _ => Refusal::Stands,
    }
}

/// Whether `credential` may carry the re-send of a request that carried generation
/// `rejected`, sent at `sent_at`: a newer generation always; the same one only to answer
/// a Digest challenge (`require_newer` false: the nonce is what is new), or when it was
/// refused while still within its `activation_delay` and is offered again after it (a
/// core that accepts new tokens only after a propagation lag).
pub fn qualifies(
    credential: &Credential,
    rejected: u64,
    sent_at: Instant,
    require_newer: bool,
    activation_delay: Duration,
) -> bool {
    let was_young = !activation_delay.is_zero() && sent_at < credential.obtained + activation_delay;
    credential.generation > rejected
        || (credential.generation == rejected && (!require_newer || was_young))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHALLENGE: &str =
        r#"Digest realm="core.example", nonce="n-1", qop="auth", algorithm=SHA-256"#;

    fn read(auth: AuthMode, code: u16, is_resend: bool, digest: &mut DigestClient) -> Refusal {
        read_refusal(auth, code, "INVITE", &[CHALLENGE], &[], is_resend, digest)
    }

    #[test]
    fn a_bearer_trunk_refreshes_on_401_and_403_once_and_never_on_407() {
        let mut digest = DigestClient::new(None);
        assert_eq!(
            read(AuthMode::Bearer, 401, false, &mut digest),
            Refusal::NeedNewer
        );
        assert_eq!(
            read(AuthMode::Bearer, 403, false, &mut digest),
            Refusal::NeedNewer
        );
        assert_eq!(
            read(AuthMode::Bearer, 403, true, &mut digest),
            Refusal::Stands
        );
        assert_eq!(
            read(AuthMode::Bearer, 407, false, &mut digest),
            Refusal::Stands
        );
        assert_eq!(
            read(AuthMode::Bearer, 404, false, &mut digest),
            Refusal::Stands
        );
    }

    #[test]
    fn a_digest_challenge_is_answered_at_once_and_a_403_needs_a_newer_password() {
        let mut digest = DigestClient::new(None);
        assert_eq!(
            read(AuthMode::Digest, 401, false, &mut digest),
            Refusal::AnswerChallenge
        );
        assert_eq!(
            read(AuthMode::Digest, 403, false, &mut digest),
            Refusal::NeedNewer
        );
        assert_eq!(
            read(AuthMode::Digest, 403, true, &mut digest),
            Refusal::Stands
        );
    }

    #[test]
    fn a_digest_resend_challenged_afresh_needs_a_newer_password() {
        let mut digest = DigestClient::new(None);
        assert_eq!(
            read(AuthMode::Digest, 407, false, &mut digest),
            Refusal::AnswerChallenge
        );
        // The re-send answered realm core.example (nonce n-0) and is challenged again
        // with a fresh, not stale, nonce: the password itself is refused.
        let sent = [("core.example".to_string(), "n-0".to_string())];
        let again = read_refusal(
            AuthMode::Digest,
            407,
            "INVITE",
            &[CHALLENGE],
            &sent,
            true,
            &mut digest,
        );
        assert_eq!(again, Refusal::NeedNewer);
        // The same with the nonce it answered: refused outright.
        let sent = [("core.example".to_string(), "n-1".to_string())];
        let refused = read_refusal(
            AuthMode::Digest,
            401,
            "INVITE",
            &[CHALLENGE],
            &sent,
            false,
            &mut digest,
        );
        assert_eq!(refused, Refusal::NeedNewer);
        // A stale nonce is answered once more even on a re-send.
        let stale = [format!("{CHALLENGE}, stale=true")];
        let stale: Vec<&str> = stale.iter().map(String::as_str).collect();
        let sent = [("core.example".to_string(), "n-1".to_string())];
        assert_eq!(
            read_refusal(
                AuthMode::Digest,
                401,
                "INVITE",
                &stale,
                &sent,
                true,
                &mut digest
            ),
            Refusal::AnswerChallenge
        );
    }

    #[test]
    fn a_challenge_in_an_unknown_algorithm_stands() {
        let mut digest = DigestClient::new(None);
        let refusal = read_refusal(
            AuthMode::Digest,
            401,
            "INVITE",
            &[r#"Digest realm="r", nonce="n", algorithm=SHA-1-ROT13"#],
            &[],
            false,
            &mut digest,
        );
        assert!(
            matches!(refusal, Refusal::Unanswerable { .. }),
            "{refusal:?}"
        );
    }

    #[test]
    fn a_trunk_without_auth_never_re_sends() {
        let mut digest = DigestClient::new(None);
        for code in [401, 403, 407] {
            assert_eq!(
                read(AuthMode::None, code, false, &mut digest),
                Refusal::Stands
            );
        }
    }

    #[test]
    fn the_shared_state_is_one_for_every_holder() {
        let shared = TrunkDigest::new(None);
        let other = shared.clone();
        assert_eq!(
            read(AuthMode::Digest, 401, false, &mut shared.lock()),
            Refusal::AnswerChallenge
        );
        // The other holder sees the challenge learnt through the first one.
        assert!(other
            .lock()
            .session(ChallengeKind::Www, "core.example")
            .is_some());
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a fixed instant; nothing here runs on a clock
    fn a_newer_credential_qualifies_and_the_same_one_only_after_its_activation_delay() {
        let obtained = Instant::now();
        let credential = Credential {
            value: crate::credentials::CredentialValue::Token(crate::credentials::Secret::new("t")),
            generation: 4,
            fingerprint: "fp".into(),
            obtained,
            expires: None,
        };
        let delay = Duration::from_secs(1);
        let young = obtained + Duration::from_millis(200);
        let old = obtained + Duration::from_secs(2);
        assert!(qualifies(&credential, 3, old, true, Duration::ZERO));
        assert!(!qualifies(&credential, 4, old, true, Duration::ZERO));
        assert!(!qualifies(&credential, 4, old, true, delay));
        // Refused while young (before it propagated): offered again.
        assert!(qualifies(&credential, 4, young, true, delay));
        // A Digest challenge: the same password with the new nonce.
        assert!(qualifies(&credential, 4, old, false, Duration::ZERO));
        assert!(!qualifies(&credential, 5, old, false, Duration::ZERO));
    }
}
