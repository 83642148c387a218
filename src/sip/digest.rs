//! The Digest state of one trunk as a UAC (RFC 3261 §22.2, RFC 7616 §3.4), pure.
//!
//! The core challenges with 401 (`WWW-Authenticate`, answered in `Authorization`) or 407
//! (`Proxy-Authenticate`, answered in `Proxy-Authorization`). The last challenge of each
//! kind is kept and answered pre-emptively on every later request of the trunk, the
//! nonce reused with an incrementing `nc`, so after the first challenge requests pass
//! without a round trip until the server declares the nonce stale or hands out a
//! `nextnonce`.
//!
//! [`DigestClient::learn`] also decides what a rejection means for the request it
//! rejected: answer at once (a first challenge, a stale nonce, a nonce the server no
//! longer knows), or the credential itself was refused (the very nonce it was computed
//! with, not stale), in which case only a newer credential helps.

use super::auth::{parse_auth_params, Challenge, DigestChallenge, DigestSession};
use crate::credentials::Secret;

/// Which of the two challenge/credential header pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// 401, `WWW-Authenticate` / `Authorization` / `Authentication-Info`.
    Www,
    /// 407, `Proxy-Authenticate` / `Proxy-Authorization` / `Proxy-Authentication-Info`.
    Proxy,
}

impl ChallengeKind {
    pub const BOTH: [ChallengeKind; 2] = [ChallengeKind::Www, ChallengeKind::Proxy];

    /// The kind a status code challenges with: 401 or 407.
    pub fn of_status(code: u16) -> Option<Self> {
        match code {
            401 => Some(ChallengeKind::Www),
            407 => Some(ChallengeKind::Proxy),
            _ => None,
        }
    }

    pub fn challenge_header(self) -> &'static str {
        match self {
            ChallengeKind::Www => "WWW-Authenticate",
            ChallengeKind::Proxy => "Proxy-Authenticate",
        }
    }

    pub fn credentials_header(self) -> &'static str {
        match self {
            ChallengeKind::Www => "Authorization",
            ChallengeKind::Proxy => "Proxy-Authorization",
        }
    }

    pub fn info_header(self) -> &'static str {
        match self {
            ChallengeKind::Www => "Authentication-Info",
            ChallengeKind::Proxy => "Proxy-Authentication-Info",
        }
    }
}

/// What a 401/407 means for the request it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Answer the challenge now with the credential at hand: the request carried no
    /// answer for it, or its nonce was stale or unknown to the server.
    AnswerNow {
        /// The server called the nonce stale.
        stale: bool,
    },
    /// The request's answer used this very nonce and the server refused it without
    /// calling it stale: the username or password is wrong, only a newer one helps.
    CredentialRefused,
    /// No Digest challenge this UAC can answer (another scheme, an unknown algorithm,
    /// `auth-int` only, no realm or nonce). `offered` names what was offered, for logs.
    Unanswerable { offered: String },
}

/// The Digest sessions of one trunk, one per challenge kind.
#[derive(Debug, Default)]
pub struct DigestClient {
    www: Option<DigestSession>,
    proxy: Option<DigestSession>,
}

impl DigestClient {
    fn session_mut(&mut self, kind: ChallengeKind) -> &mut Option<DigestSession> {
        match kind {
            ChallengeKind::Www => &mut self.www,
            ChallengeKind::Proxy => &mut self.proxy,
        }
    }

    pub fn session(&self, kind: ChallengeKind) -> Option<&DigestSession> {
        match kind {
            ChallengeKind::Www => self.www.as_ref(),
            ChallengeKind::Proxy => self.proxy.as_ref(),
        }
    }

    /// Takes in a 401/407: `offered` are its challenge header values of `kind`,
    /// `sent_nonce` the nonce the rejected request answered with in the matching
    /// credentials header, if it carried one. The strongest answerable challenge
    /// replaces the kept one unless it repeats its nonce (then the count goes on).
    pub fn learn<'a>(
        &mut self,
        kind: ChallengeKind,
        offered: impl IntoIterator<Item = &'a str> + Clone,
        sent_nonce: Option<&str>,
    ) -> Verdict {
        let Some(challenge) = DigestChallenge::strongest(offered.clone()) else {
            return Verdict::Unanswerable {
                offered: describe_offered(offered),
            };
        };
        let stale = challenge.stale;
        let refused = !stale && sent_nonce == Some(challenge.nonce.as_str());
        let session = self.session_mut(kind);
        let same_nonce = session
            .as_ref()
            .is_some_and(|session| session.challenge.nonce == challenge.nonce);
        if !same_nonce || stale {
            *session = Some(DigestSession::new(challenge));
        }
        if refused {
            Verdict::CredentialRefused
        } else {
            Verdict::AnswerNow { stale }
        }
    }

    /// Takes in an `Authentication-Info` (or `Proxy-Authentication-Info`) value from a
    /// successful response: a `nextnonce` replaces the kept nonce (RFC 7616 §3.5).
    /// Returns whether it did.
    pub fn next_nonce(&mut self, kind: ChallengeKind, info: &str) -> bool {
        let Ok(params) = parse_auth_params(info) else {
            return false;
        };
        let Some((_, next)) = params.iter().find(|(name, _)| name == "nextnonce") else {
            return false;
        };
        match self.session_mut(kind) {
            Some(session) if session.challenge.nonce != *next => {
                let mut challenge = session.challenge.clone();
                challenge.nonce = next.clone();
                challenge.stale = false;
                *session = DigestSession::new(challenge);
                true
            }
            _ => false,
        }
    }

    /// The credentials for one request: for each kind a challenge is kept for, the
    /// header value answering it for `method` and `uri` (the Request-URI as sent).
    /// `cnonce` gives a fresh client nonce per answer.
    pub fn authorize(
        &mut self,
        method: &str,
        uri: &str,
        username: &str,
        password: &Secret,
        mut cnonce: impl FnMut() -> String,
    ) -> Vec<(ChallengeKind, String)> {
        let mut answers = Vec::new();
        for kind in ChallengeKind::BOTH {
            if let Some(session) = self.session_mut(kind) {
                let value = session.authorize(method, uri, username, password, &cnonce());
                answers.push((kind, value));
            }
        }
        answers
    }
}

/// The nonce a credentials header value (`Digest username=..., nonce=...`) answered.
pub fn nonce_of_credentials(value: &str) -> Option<String> {
    let credentials = Challenge::parse(value).ok()?;
    if !credentials.is_scheme("Digest") {
        return None;
    }
    credentials.param("nonce").map(str::to_string)
}

/// Scheme and algorithm of each offered challenge, e.g. `Digest/SHA-1, Basic`.
fn describe_offered<'a>(offered: impl IntoIterator<Item = &'a str>) -> String {
    let described: Vec<String> = offered
        .into_iter()
        .map(|value| match Challenge::parse(value) {
            Ok(challenge) => match challenge.param("algorithm") {
                Some(algorithm) => format!("{}/{algorithm}", challenge.scheme),
                None => challenge.scheme,
            },
            Err(error) => format!("unparsable ({error})"),
        })
        .collect();
    if described.is_empty() {
        "no challenge".to_string()
    } else {
        described.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::auth::Algorithm;

    fn challenge(nonce: &str, extra: &str) -> String {
        format!("Digest realm=\"core.test\", nonce=\"{nonce}\", qop=\"auth\"{extra}")
    }

    fn password() -> Secret {
        Secret::new("pw")
    }

    fn answer(client: &mut DigestClient, method: &str) -> Vec<(ChallengeKind, String)> {
        client.authorize(method, "sip:b@core.test", "alice", &password(), || {
            "c0ffee".to_string()
        })
    }

    fn param(value: &str, name: &str) -> Option<String> {
        Challenge::parse(value)
            .ok()?
            .param(name)
            .map(str::to_string)
    }

    #[test]
    fn nothing_is_sent_before_the_first_challenge() {
        let mut client = DigestClient::default();
        assert!(answer(&mut client, "INVITE").is_empty());
    }

    #[test]
    fn a_challenge_is_answered_and_then_reused_with_a_rising_count() {
        let mut client = DigestClient::default();
        let first = challenge("n1", "");
        assert_eq!(
            client.learn(ChallengeKind::Proxy, [first.as_str()], None),
            Verdict::AnswerNow { stale: false }
        );
        let answers = answer(&mut client, "INVITE");
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].0, ChallengeKind::Proxy);
        assert_eq!(param(&answers[0].1, "nc").as_deref(), Some("00000001"));
        assert_eq!(param(&answers[0].1, "nonce").as_deref(), Some("n1"));
        let later = answer(&mut client, "BYE");
        assert_eq!(param(&later[0].1, "nc").as_deref(), Some("00000002"));
        assert_eq!(param(&later[0].1, "nonce").as_deref(), Some("n1"));
    }

    #[test]
    fn kinds_are_kept_apart() {
        let mut client = DigestClient::default();
        client.learn(ChallengeKind::Www, [challenge("w", "").as_str()], None);
        client.learn(ChallengeKind::Proxy, [challenge("p", "").as_str()], None);
        let answers = answer(&mut client, "REGISTER");
        let nonces: Vec<(ChallengeKind, Option<String>)> = answers
            .iter()
            .map(|(kind, value)| (*kind, param(value, "nonce")))
            .collect();
        assert_eq!(
            nonces,
            vec![
                (ChallengeKind::Www, Some("w".into())),
                (ChallengeKind::Proxy, Some("p".into()))
            ]
        );
    }

    #[test]
    fn verdicts_tell_a_stale_or_unknown_nonce_from_a_refused_credential() {
        let mut client = DigestClient::default();
        let n1 = challenge("n1", "");
        client.learn(ChallengeKind::Www, [n1.as_str()], None);
        // The same nonce again, not stale: the answer computed with it was refused.
        assert_eq!(
            client.learn(ChallengeKind::Www, [n1.as_str()], Some("n1")),
            Verdict::CredentialRefused
        );
        // A new nonce for a request that used the old one: the old one is unknown now.
        assert_eq!(
            client.learn(
                ChallengeKind::Www,
                [challenge("n2", "").as_str()],
                Some("n1")
            ),
            Verdict::AnswerNow { stale: false }
        );
        // Stale, even repeating the nonce the request used: answer again (RFC 7616 §3.3).
        assert_eq!(
            client.learn(
                ChallengeKind::Www,
                [challenge("n2", ", stale=true").as_str()],
                Some("n2")
            ),
            Verdict::AnswerNow { stale: true }
        );
    }

    #[test]
    fn a_repeated_nonce_keeps_counting_a_new_or_stale_one_restarts() {
        let mut client = DigestClient::default();
        let n1 = challenge("n1", "");
        client.learn(ChallengeKind::Www, [n1.as_str()], None);
        answer(&mut client, "INVITE");
        answer(&mut client, "INVITE");
        client.learn(ChallengeKind::Www, [n1.as_str()], None);
        assert_eq!(client.session(ChallengeKind::Www).unwrap().nonce_count(), 2);
        client.learn(
            ChallengeKind::Www,
            [challenge("n1", ", stale=TRUE").as_str()],
            None,
        );
        assert_eq!(client.session(ChallengeKind::Www).unwrap().nonce_count(), 0);
        answer(&mut client, "INVITE");
        client.learn(ChallengeKind::Www, [challenge("n2", "").as_str()], None);
        assert_eq!(client.session(ChallengeKind::Www).unwrap().nonce_count(), 0);
    }

    #[test]
    fn the_strongest_offer_is_kept() {
        let mut client = DigestClient::default();
        let md5 = challenge("m", ", algorithm=MD5");
        let sha = challenge("s", ", algorithm=SHA-256");
        client.learn(ChallengeKind::Proxy, [md5.as_str(), sha.as_str()], None);
        let kept = &client.session(ChallengeKind::Proxy).unwrap().challenge;
        assert_eq!(kept.algorithm, Algorithm::Sha256);
        assert_eq!(kept.nonce, "s");
    }

    #[test]
    fn unanswerable_challenges_are_named_and_change_nothing() {
        let mut client = DigestClient::default();
        let n1 = challenge("n1", "");
        client.learn(ChallengeKind::Www, [n1.as_str()], None);
        let verdict = client.learn(
            ChallengeKind::Www,
            [
                "Digest realm=\"r\", nonce=\"x\", algorithm=SHA-1",
                "Basic realm=\"r\"",
                "Digest realm=\"unterminated",
            ],
            Some("n1"),
        );
        let Verdict::Unanswerable { offered } = verdict else {
            panic!("{verdict:?}")
        };
        assert!(
            offered.starts_with("Digest/SHA-1, Basic, unparsable"),
            "{offered}"
        );
        assert_eq!(
            client.session(ChallengeKind::Www).unwrap().challenge.nonce,
            "n1"
        );
        assert!(matches!(
            client.learn(ChallengeKind::Www, std::iter::empty::<&str>(), None),
            Verdict::Unanswerable { offered } if offered == "no challenge"
        ));
    }

    #[test]
    fn next_nonce_replaces_the_kept_nonce() {
        let mut client = DigestClient::default();
        client.learn(ChallengeKind::Www, [challenge("n1", "").as_str()], None);
        answer(&mut client, "REGISTER");
        assert!(client.next_nonce(
            ChallengeKind::Www,
            "nextnonce=\"n2\", qop=auth, rspauth=\"abc\", cnonce=\"c0ffee\", nc=00000001"
        ));
        let answers = answer(&mut client, "REGISTER");
        assert_eq!(param(&answers[0].1, "nonce").as_deref(), Some("n2"));
        assert_eq!(param(&answers[0].1, "nc").as_deref(), Some("00000001"));
        assert!(!client.next_nonce(ChallengeKind::Www, "nextnonce=\"n2\""));
        assert!(!client.next_nonce(ChallengeKind::Www, "qop=auth"));
        assert!(!client.next_nonce(ChallengeKind::Proxy, "nextnonce=\"p\""));
        assert!(!client.next_nonce(ChallengeKind::Www, "nextnonce=\"broken"));
    }

    #[test]
    fn the_nonce_of_sent_credentials() {
        assert_eq!(
            nonce_of_credentials(
                "Digest username=\"a\", realm=\"r\", nonce=\"n, 1\", uri=\"sip:x\", response=\"0\""
            )
            .as_deref(),
            Some("n, 1")
        );
        assert_eq!(nonce_of_credentials("Bearer abc"), None);
        assert_eq!(nonce_of_credentials(""), None);
    }
}
