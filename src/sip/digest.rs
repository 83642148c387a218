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
        /// A realm the request carried no answer for at all.
        new_realm: bool,
    },
    /// The request's answer used this very nonce and the server refused it without
    /// calling it stale: the username or password is wrong, only a newer one helps.
    CredentialRefused,
    /// No Digest challenge this UAC can answer (another scheme, an unknown algorithm,
    /// `auth-int` only, no realm or nonce, a realm other than the trunk's). `offered`
    /// names what was offered, for logs.
    Unanswerable { offered: String },
}

/// One challenge kept: its kind, the session answering it, and the methods it was
/// issued for (only those get answers before being challenged).
#[derive(Debug)]
struct Kept {
    kind: ChallengeKind,
    session: DigestSession,
    methods: Vec<String>,
}

/// Challenges kept per trunk at most: one per realm and kind; a core uses one or two.
const MAX_KEPT: usize = 8;

/// The Digest sessions of one trunk, one per realm and challenge kind.
#[derive(Debug, Default)]
pub struct DigestClient {
    /// When set, only challenges of this realm are answered: the password is never
    /// offered to a realm beyond the core.
    realm: Option<String>,
    kept: Vec<Kept>,
}

impl DigestClient {
    pub fn new(realm: Option<String>) -> Self {
        Self {
            realm,
            kept: Vec::new(),
        }
    }

    /// The session kept for `kind` and `realm`.
    pub fn session(&self, kind: ChallengeKind, realm: &str) -> Option<&DigestSession> {
        self.kept
            .iter()
            .find(|kept| kept.kind == kind && kept.session.challenge.realm == realm)
            .map(|kept| &kept.session)
    }

    /// Takes in a 401/407 for a `method` request: `offered` are its challenge header
    /// values of `kind`, `sent` the (realm, nonce) pairs the rejected request answered
    /// with in the matching credentials header. For each realm the strongest answerable
    /// challenge replaces the kept one unless it repeats its nonce (then the count goes
    /// on).
    pub fn learn<'a>(
        &mut self,
        kind: ChallengeKind,
        method: &str,
        offered: impl IntoIterator<Item = &'a str> + Clone,
        sent: &[(String, String)],
    ) -> Verdict {
        let mut chosen: Vec<DigestChallenge> = Vec::new();
        for value in offered.clone() {
            let Some(candidate) = Challenge::parse(value)
                .ok()
                .and_then(|challenge| DigestChallenge::from_challenge(&challenge))
            else {
                continue;
            };
            if self
                .realm
                .as_ref()
                .is_some_and(|realm| *realm != candidate.realm)
            {
                continue;
            }
            match chosen.iter_mut().find(|best| best.realm == candidate.realm) {
                Some(best) if candidate.algorithm > best.algorithm => *best = candidate,
                Some(_) => {}
                None => chosen.push(candidate),
            }
        }
        if chosen.is_empty() {
            return Verdict::Unanswerable {
                offered: describe_offered(offered),
            };
        }
        let (mut refused, mut stale, mut new_realm) = (false, false, false);
        for challenge in chosen {
            let sent_nonce = sent
                .iter()
                .find(|(realm, _)| *realm == challenge.realm)
                .map(|(_, nonce)| nonce.as_str());
            refused |= !challenge.stale && sent_nonce == Some(challenge.nonce.as_str());
            stale |= challenge.stale;
            new_realm |= sent_nonce.is_none();
            self.keep(kind, method, challenge);
        }
        if refused {
            Verdict::CredentialRefused
        } else {
            Verdict::AnswerNow { stale, new_realm }
        }
    }

    fn keep(&mut self, kind: ChallengeKind, method: &str, challenge: DigestChallenge) {
        let position = self
            .kept
            .iter()
            .position(|kept| kept.kind == kind && kept.session.challenge.realm == challenge.realm);
        let kept = match position {
            Some(position) => &mut self.kept[position],
            None => {
                if self.kept.len() >= MAX_KEPT {
                    self.kept.remove(0);
                }
                self.kept.push(Kept {
                    kind,
                    session: DigestSession::new(challenge.clone()),
                    methods: Vec::new(),
                });
                let last = self.kept.len() - 1;
                &mut self.kept[last]
            }
        };
        if kept.session.challenge.nonce != challenge.nonce || challenge.stale {
            kept.session = DigestSession::new(challenge);
        }
        if !kept.methods.iter().any(|known| known == method) {
            kept.methods.push(method.to_string());
        }
    }

    /// Takes in an `Authentication-Info` (or `Proxy-Authentication-Info`) value from a
    /// successful response: a `nextnonce` replaces the kept nonce (RFC 7616 §3.5). The
    /// header names no realm, so it is used only while one challenge of its kind is kept.
    /// Returns whether it was used.
    pub fn next_nonce(&mut self, kind: ChallengeKind, info: &str) -> bool {
        let Ok(params) = parse_auth_params(info) else {
            return false;
        };
        let Some((_, next)) = params.iter().find(|(name, _)| name == "nextnonce") else {
            return false;
        };
        let mut of_kind = self.kept.iter_mut().filter(|kept| kept.kind == kind);
        let (Some(kept), None) = (of_kind.next(), of_kind.next()) else {
            return false;
        };
        if kept.session.challenge.nonce == *next {
            return false;
        }
        let mut challenge = kept.session.challenge.clone();
        challenge.nonce = next.clone();
        challenge.stale = false;
        kept.session = DigestSession::new(challenge);
        true
    }

    /// The credentials for one `method` request: for each kept challenge issued for that
    /// method, the header value answering it for `uri` (the Request-URI as sent).
    /// `cnonce` gives a fresh client nonce per answer.
    pub fn authorize(
        &mut self,
        method: &str,
        uri: &str,
        username: &str,
        password: &Secret,
        mut cnonce: impl FnMut() -> String,
    ) -> Vec<(ChallengeKind, String)> {
        self.kept
            .iter_mut()
            .filter(|kept| kept.methods.iter().any(|known| known == method))
            .map(|kept| {
                let value = kept
                    .session
                    .authorize(method, uri, username, password, &cnonce());
                (kept.kind, value)
            })
            .collect()
    }
}

/// The (realm, nonce) pairs of Digest credentials header values.
pub fn sent_answers<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<(String, String)> {
    values
        .into_iter()
        .filter_map(|value| {
            let credentials = Challenge::parse(value).ok()?;
            if !credentials.is_scheme("Digest") {
                return None;
            }
            Some((
                credentials.param("realm")?.to_string(),
                credentials.param("nonce")?.to_string(),
            ))
        })
        .collect()
}

/// Scheme, algorithm and realm of each offered challenge, e.g.
/// `Digest/SHA-1 realm "core", Basic`.
fn describe_offered<'a>(offered: impl IntoIterator<Item = &'a str>) -> String {
    let described: Vec<String> = offered
        .into_iter()
        .map(|value| match Challenge::parse(value) {
            Ok(challenge) => {
                let mut text = challenge.scheme.clone();
                if let Some(algorithm) = challenge.param("algorithm") {
                    text = format!("{text}/{algorithm}");
                }
                if let Some(realm) = challenge.param("realm") {
                    text = format!("{text} realm {realm:?}");
                }
                text
            }
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
        challenge_in("core.test", nonce, extra)
    }

    fn challenge_in(realm: &str, nonce: &str, extra: &str) -> String {
        format!("Digest realm=\"{realm}\", nonce=\"{nonce}\", qop=\"auth\"{extra}")
    }

    fn sent(nonce: &str) -> Vec<(String, String)> {
        vec![("core.test".to_string(), nonce.to_string())]
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

    fn count(client: &DigestClient, kind: ChallengeKind) -> u32 {
        client.session(kind, "core.test").unwrap().nonce_count()
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
            client.learn(ChallengeKind::Proxy, "INVITE", [first.as_str()], &[]),
            Verdict::AnswerNow {
                stale: false,
                new_realm: true
            }
        );
        let answers = answer(&mut client, "INVITE");
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].0, ChallengeKind::Proxy);
        assert_eq!(param(&answers[0].1, "nc").as_deref(), Some("00000001"));
        assert_eq!(param(&answers[0].1, "nonce").as_deref(), Some("n1"));
        let later = answer(&mut client, "INVITE");
        assert_eq!(param(&later[0].1, "nc").as_deref(), Some("00000002"));
        assert_eq!(param(&later[0].1, "nonce").as_deref(), Some("n1"));
    }

    #[test]
    fn answers_go_only_to_methods_the_challenge_was_issued_for() {
        let mut client = DigestClient::default();
        client.learn(
            ChallengeKind::Www,
            "REGISTER",
            [challenge("w", "").as_str()],
            &[],
        );
        client.learn(
            ChallengeKind::Proxy,
            "INVITE",
            [challenge("p", "").as_str()],
            &[],
        );
        let kinds =
            |answers: Vec<(ChallengeKind, String)>| -> Vec<(ChallengeKind, Option<String>)> {
                answers
                    .iter()
                    .map(|(kind, value)| (*kind, param(value, "nonce")))
                    .collect()
            };
        assert_eq!(
            kinds(answer(&mut client, "REGISTER")),
            vec![(ChallengeKind::Www, Some("w".into()))]
        );
        assert_eq!(
            kinds(answer(&mut client, "INVITE")),
            vec![(ChallengeKind::Proxy, Some("p".into()))]
        );
        assert!(answer(&mut client, "OPTIONS").is_empty());
        // OPTIONS challenged too: from then on it gets the same session's answer.
        client.learn(
            ChallengeKind::Proxy,
            "OPTIONS",
            [challenge("p", "").as_str()],
            &[],
        );
        assert_eq!(
            kinds(answer(&mut client, "OPTIONS")),
            vec![(ChallengeKind::Proxy, Some("p".into()))]
        );
        assert_eq!(
            count(&client, ChallengeKind::Proxy),
            2,
            "one session, one count"
        );
    }

    #[test]
    fn verdicts_tell_a_stale_or_unknown_nonce_from_a_refused_credential() {
        let mut client = DigestClient::default();
        let n1 = challenge("n1", "");
        client.learn(ChallengeKind::Www, "REGISTER", [n1.as_str()], &[]);
        // The same nonce again, not stale: the answer computed with it was refused.
        assert_eq!(
            client.learn(ChallengeKind::Www, "REGISTER", [n1.as_str()], &sent("n1")),
            Verdict::CredentialRefused
        );
        // A new nonce for a request that used the old one: the old one is unknown now.
        assert_eq!(
            client.learn(
                ChallengeKind::Www,
                "REGISTER",
                [challenge("n2", "").as_str()],
                &sent("n1")
            ),
            Verdict::AnswerNow {
                stale: false,
                new_realm: false
            }
        );
        // Stale, even repeating the nonce the request used: answer again (RFC 7616 §3.3).
        assert_eq!(
            client.learn(
                ChallengeKind::Www,
                "REGISTER",
                [challenge("n2", ", stale=true").as_str()],
                &sent("n2")
            ),
            Verdict::AnswerNow {
                stale: true,
                new_realm: false
            }
        );
    }

    #[test]
    fn a_repeated_nonce_keeps_counting_a_new_or_stale_one_restarts() {
        let mut client = DigestClient::default();
        let n1 = challenge("n1", "");
        client.learn(ChallengeKind::Www, "INVITE", [n1.as_str()], &[]);
        answer(&mut client, "INVITE");
        answer(&mut client, "INVITE");
        client.learn(ChallengeKind::Www, "INVITE", [n1.as_str()], &[]);
        assert_eq!(count(&client, ChallengeKind::Www), 2);
        client.learn(
            ChallengeKind::Www,
            "INVITE",
            [challenge("n1", ", stale=TRUE").as_str()],
            &[],
        );
        assert_eq!(count(&client, ChallengeKind::Www), 0);
        answer(&mut client, "INVITE");
        client.learn(
            ChallengeKind::Www,
            "INVITE",
            [challenge("n2", "").as_str()],
            &[],
        );
        assert_eq!(count(&client, ChallengeKind::Www), 0);
    }

    #[test]
    fn the_strongest_offer_of_each_realm_is_kept() {
        let mut client = DigestClient::default();
        let md5 = challenge("m", ", algorithm=MD5");
        let sha = challenge("s", ", algorithm=SHA-256");
        let other = challenge_in("edge-proxy.test", "o", "");
        let verdict = client.learn(
            ChallengeKind::Proxy,
            "INVITE",
            [md5.as_str(), other.as_str(), sha.as_str()],
            &[],
        );
        assert!(matches!(verdict, Verdict::AnswerNow { .. }), "{verdict:?}");
        let kept = &client
            .session(ChallengeKind::Proxy, "core.test")
            .unwrap()
            .challenge;
        assert_eq!(
            (kept.algorithm, kept.nonce.as_str()),
            (Algorithm::Sha256, "s")
        );
        // Two proxies on the path (RFC 3261 §22.3): both are answered.
        let realms: Vec<Option<String>> = answer(&mut client, "INVITE")
            .iter()
            .map(|(_, value)| param(value, "realm"))
            .collect();
        assert_eq!(
            realms,
            vec![Some("core.test".into()), Some("edge-proxy.test".into())]
        );
    }

    #[test]
    fn a_configured_realm_is_the_only_one_answered() {
        let mut client = DigestClient::new(Some("core.test".into()));
        let foreign = challenge_in("far-end.test", "f", "");
        let verdict = client.learn(ChallengeKind::Www, "INVITE", [foreign.as_str()], &[]);
        let Verdict::Unanswerable { offered } = verdict else {
            panic!("{verdict:?}")
        };
        assert!(offered.contains("far-end.test"), "{offered}");
        assert!(answer(&mut client, "INVITE").is_empty());
        let ours = challenge("c", "");
        client.learn(
            ChallengeKind::Www,
            "INVITE",
            [foreign.as_str(), ours.as_str()],
            &[],
        );
        let answers = answer(&mut client, "INVITE");
        assert_eq!(answers.len(), 1);
        assert_eq!(param(&answers[0].1, "realm").as_deref(), Some("core.test"));
    }

    #[test]
    fn kept_challenges_are_bounded() {
        let mut client = DigestClient::default();
        for index in 0..20 {
            let offer = challenge_in(&format!("realm-{index}"), "n", "");
            client.learn(ChallengeKind::Proxy, "INVITE", [offer.as_str()], &[]);
        }
        assert_eq!(answer(&mut client, "INVITE").len(), MAX_KEPT);
        assert!(client.session(ChallengeKind::Proxy, "realm-19").is_some());
        assert!(client.session(ChallengeKind::Proxy, "realm-0").is_none());
    }

    #[test]
    fn unanswerable_challenges_are_named_and_change_nothing() {
        let mut client = DigestClient::default();
        let n1 = challenge("n1", "");
        client.learn(ChallengeKind::Www, "INVITE", [n1.as_str()], &[]);
        let verdict = client.learn(
            ChallengeKind::Www,
            "INVITE",
            [
                "Digest realm=\"r\", nonce=\"x\", algorithm=SHA-1",
                "Basic realm=\"r\"",
                "Digest realm=\"unterminated",
            ],
            &sent("n1"),
        );
        let Verdict::Unanswerable { offered } = verdict else {
            panic!("{verdict:?}")
        };
        assert!(
            offered.starts_with("Digest/SHA-1 realm \"r\", Basic realm \"r\", unparsable"),
            "{offered}"
        );
        assert_eq!(
            client
                .session(ChallengeKind::Www, "core.test")
                .unwrap()
                .challenge
                .nonce,
            "n1"
        );
        assert!(matches!(
            client.learn(ChallengeKind::Www, "INVITE", std::iter::empty::<&str>(), &[]),
            Verdict::Unanswerable { offered } if offered == "no challenge"
        ));
    }

    #[test]
    fn next_nonce_replaces_the_kept_nonce() {
        let mut client = DigestClient::default();
        client.learn(
            ChallengeKind::Www,
            "REGISTER",
            [challenge("n1", "").as_str()],
            &[],
        );
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
        // With two realms of the kind, a nextnonce cannot say whose it is.
        client.learn(
            ChallengeKind::Www,
            "REGISTER",
            [challenge_in("other", "o", "").as_str()],
            &[],
        );
        assert!(!client.next_nonce(ChallengeKind::Www, "nextnonce=\"n3\""));
    }

    #[test]
    fn the_answers_a_request_carried() {
        assert_eq!(
            sent_answers([
                "Digest username=\"a\", realm=\"r\", nonce=\"n, 1\", uri=\"sip:x\", response=\"0\"",
                "Bearer abc",
                "Digest username=\"a\", nonce=\"no-realm\"",
                "",
            ]),
            vec![("r".to_string(), "n, 1".to_string())]
        );
    }
}
