//! Authentication headers, pure: parsing `WWW-Authenticate` / `Proxy-Authenticate`
//! challenges (RFC 3261 §25 auth-param syntax), answering Digest challenges as a UAC
//! (RFC 3261 §22, RFC 7616, RFC 8760: MD5, SHA-256 and SHA-512-256, each also `-sess`,
//! `qop=auth`, `cnonce`, `nc`, `opaque`, `stale`), and reading Bearer challenges
//! (RFC 8898 §2.3: `realm`, `scope`, `error`, `authz_server`).
//!
//! `rsip` 0.4 rejects `algorithm=SHA-256` and has no Bearer challenge type, hence this
//! module.

use std::fmt::Write as _;

use md5::Md5;
use sha2::{Digest as _, Sha256, Sha512_256};

use crate::credentials::Secret;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChallengeError {
    #[error("empty challenge")]
    Empty,
    #[error("malformed auth-param near {near:?}")]
    Malformed { near: String },
    #[error("unterminated quoted string")]
    Unterminated,
}

/// A challenge: its scheme and its parameters, names lower-cased, values unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn parse(value: &str) -> Result<Self, ChallengeError> {
        let value = value.trim();
        let scheme_end = value.find(char::is_whitespace).unwrap_or(value.len());
        let scheme = &value[..scheme_end];
        if scheme.is_empty() {
            return Err(ChallengeError::Empty);
        }
        Ok(Self {
            scheme: scheme.to_string(),
            params: parse_auth_params(&value[scheme_end..])?,
        })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn is_scheme(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }
}

/// A comma-separated auth-param list (`name=token` or `name="quoted"`), as in challenges,
/// credentials and `Authentication-Info` (RFC 3261 §25.1): names lower-cased, values
/// unquoted. Leniently, a bare token after a comma continues the previous value, as
/// cores that write `qop=auth,auth-int` unquoted mean.
pub fn parse_auth_params(text: &str) -> Result<Vec<(String, String)>, ChallengeError> {
    let mut params: Vec<(String, String)> = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let segment_end = rest.find(',').unwrap_or(rest.len());
        let segment = rest[..segment_end].trim();
        if let Some((_, previous)) = params.last_mut() {
            if !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.!%*+`'~".contains(c))
            {
                previous.push(',');
                previous.push_str(segment);
                rest = rest[segment_end..].trim_start();
                rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
                continue;
            }
        }
        let equals = rest.find('=').ok_or_else(|| ChallengeError::Malformed {
            near: rest.chars().take(20).collect(),
        })?;
        let name = rest[..equals].trim().to_ascii_lowercase();
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ',' || c == '"') {
            return Err(ChallengeError::Malformed {
                near: rest.chars().take(20).collect(),
            });
        }
        rest = rest[equals + 1..].trim_start();
        let (parsed, remainder) = if let Some(quoted) = rest.strip_prefix('"') {
            let mut text = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((index, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            text.push(escaped);
                        }
                    }
                    '"' => {
                        end = Some(index);
                        break;
                    }
                    other => text.push(other),
                }
            }
            let end = end.ok_or(ChallengeError::Unterminated)?;
            (text, &quoted[end + 1..])
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            (rest[..end].trim().to_string(), &rest[end..])
        };
        params.push((name, parsed));
        rest = remainder.trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after.trim_start();
        } else if !rest.is_empty() {
            return Err(ChallengeError::Malformed {
                near: rest.chars().take(20).collect(),
            });
        }
    }
    Ok(params)
}

/// What a Bearer challenge (RFC 8898 §2.3, RFC 6750 §3) says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BearerChallenge {
    pub realm: Option<String>,
    pub scope: Option<String>,
    pub error: Option<String>,
    pub authz_server: Option<String>,
}

impl BearerChallenge {
    pub fn from_challenge(challenge: &Challenge) -> Option<Self> {
        challenge.is_scheme("Bearer").then(|| Self {
            realm: challenge.param("realm").map(str::to_string),
            scope: challenge.param("scope").map(str::to_string),
            error: challenge.param("error").map(str::to_string),
            authz_server: challenge.param("authz_server").map(str::to_string),
        })
    }
}

/// Digest algorithms, weakest first, so `max` picks the strongest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    Md5,
    Sha256,
    Sha512_256,
}

impl Algorithm {
    fn token(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Sha512_256 => "SHA-512-256",
        }
    }

    fn hash(self, input: &str) -> String {
        fn hex(bytes: &[u8]) -> String {
            bytes
                .iter()
                .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
                    let _ = write!(out, "{byte:02x}");
                    out
                })
        }
        match self {
            Algorithm::Md5 => hex(&Md5::digest(input.as_bytes())),
            Algorithm::Sha256 => hex(&Sha256::digest(input.as_bytes())),
            Algorithm::Sha512_256 => hex(&Sha512_256::digest(input.as_bytes())),
        }
    }
}

/// A Digest challenge this UAC can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestChallenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    pub algorithm: Algorithm,
    pub session: bool,
    /// The server offered `qop=auth` (the only qop this UAC uses; `auth-int` alone is
    /// not supported).
    pub qop_auth: bool,
    pub stale: bool,
}

impl DigestChallenge {
    /// `None` when the challenge is not Digest or asks for what this UAC cannot do
    /// (an unknown algorithm, `auth-int` only, no nonce).
    pub fn from_challenge(challenge: &Challenge) -> Option<Self> {
        if !challenge.is_scheme("Digest") {
            return None;
        }
        let algorithm_text = challenge
            .param("algorithm")
            .unwrap_or("MD5")
            .to_ascii_uppercase();
        let (base, session) = match algorithm_text.strip_suffix("-SESS") {
            Some(base) => (base.to_string(), true),
            None => (algorithm_text, false),
        };
        let algorithm = match base.as_str() {
            "MD5" => Algorithm::Md5,
            "SHA-256" => Algorithm::Sha256,
            "SHA-512-256" => Algorithm::Sha512_256,
            _ => return None,
        };
        let qop_auth = match challenge.param("qop") {
            None => false,
            Some(qops) => {
                let offered: Vec<&str> = qops.split(',').map(str::trim).collect();
                if offered.iter().any(|qop| qop.eq_ignore_ascii_case("auth")) {
                    true
                } else {
                    return None;
                }
            }
        };
        Some(Self {
            realm: challenge.param("realm")?.to_string(),
            nonce: challenge.param("nonce")?.to_string(),
            opaque: challenge.param("opaque").map(str::to_string),
            algorithm,
            session,
            qop_auth,
            stale: challenge
                .param("stale")
                .is_some_and(|stale| stale.eq_ignore_ascii_case("true")),
        })
    }

    /// The strongest answerable challenge among header values (SHA-512-256 over
    /// SHA-256 over MD5, RFC 8760 §2.4); ties go to the first offered.
    pub fn strongest<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let mut best: Option<Self> = None;
        for value in values {
            let Some(candidate) = Challenge::parse(value)
                .ok()
                .and_then(|challenge| Self::from_challenge(&challenge))
            else {
                continue;
            };
            if best
                .as_ref()
                .is_none_or(|best| candidate.algorithm > best.algorithm)
            {
                best = Some(candidate);
            }
        }
        best
    }
}

/// Answers one Digest challenge for successive requests: the nonce is reused with an
/// incrementing nonce count (RFC 7616 §3.4), so one challenge serves many requests
/// until the server says `stale=true`.
#[derive(Debug, Clone)]
pub struct DigestSession {
    pub challenge: DigestChallenge,
    nonce_count: u32,
}

impl DigestSession {
    pub fn new(challenge: DigestChallenge) -> Self {
        Self {
            challenge,
            nonce_count: 0,
        }
    }

    pub fn nonce_count(&self) -> u32 {
        self.nonce_count
    }

    /// The `Authorization` (or `Proxy-Authorization`) value for `method` and `uri`,
    /// using `cnonce` (a fresh random string per request).
    pub fn authorize(
        &mut self,
        method: &str,
        uri: &str,
        username: &str,
        password: &Secret,
        cnonce: &str,
    ) -> String {
        self.nonce_count = self.nonce_count.wrapping_add(1).max(1);
        let challenge = &self.challenge;
        let hash = |input: &str| challenge.algorithm.hash(input);
        let nc = format!("{:08x}", self.nonce_count);
        let mut ha1 = hash(&format!(
            "{username}:{}:{}",
            challenge.realm,
            password.expose()
        ));
        if challenge.session {
            ha1 = hash(&format!("{ha1}:{}:{cnonce}", challenge.nonce));
        }
        let ha2 = hash(&format!("{method}:{uri}"));
        let response = if challenge.qop_auth {
            hash(&format!(
                "{ha1}:{}:{nc}:{cnonce}:auth:{ha2}",
                challenge.nonce
            ))
        } else {
            hash(&format!("{ha1}:{}:{ha2}", challenge.nonce))
        };
        let algorithm = format!(
            "{}{}",
            challenge.algorithm.token(),
            if challenge.session { "-sess" } else { "" }
        );
        let mut value = format!(
            "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\", response=\"{response}\", algorithm={algorithm}",
            quote(username),
            quote(&challenge.realm),
            quote(&challenge.nonce),
            quote(uri)
        );
        if challenge.qop_auth || challenge.session {
            let _ = write!(value, ", cnonce=\"{}\"", quote(cnonce));
        }
        if let Some(opaque) = &challenge.opaque {
            let _ = write!(value, ", opaque=\"{}\"", quote(opaque));
        }
        if challenge.qop_auth {
            let _ = write!(value, ", qop=auth, nc={nc}");
        }
        value
    }
}

fn quote(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7616 §3.9.1.
    const NONCE: &str = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
    const OPAQUE: &str = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS";
    const CNONCE: &str = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";

    fn rfc_challenge(algorithm: &str) -> String {
        format!(
            "Digest realm=\"http-auth@example.org\", qop=\"auth, auth-int\", algorithm={algorithm}, nonce=\"{NONCE}\", opaque=\"{OPAQUE}\""
        )
    }

    fn answer(algorithm: &str) -> String {
        let challenge = DigestChallenge::strongest([rfc_challenge(algorithm).as_str()]).unwrap();
        let mut session = DigestSession::new(challenge);
        session.authorize(
            "GET",
            "/dir/index.html",
            "Mufasa",
            &Secret::new("Circle of Life"),
            CNONCE,
        )
    }

    fn response_of(authorization: &str) -> String {
        let challenge = Challenge::parse(authorization).unwrap();
        challenge.param("response").unwrap().to_string()
    }

    #[test]
    fn rfc_7616_md5_and_sha256_examples() {
        assert_eq!(
            response_of(&answer("MD5")),
            "8ca523f5e9506fed4657c9700eebdbec"
        );
        assert_eq!(
            response_of(&answer("SHA-256")),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
        let full = answer("SHA-256");
        for part in [
            "username=\"Mufasa\"",
            "qop=auth",
            "nc=00000001",
            "algorithm=SHA-256",
            &format!("opaque=\"{OPAQUE}\""),
        ] {
            assert!(full.contains(part), "{part} missing in {full}");
        }
    }

    /// SHA-512-256 and the -sess variants on the same inputs, computed independently with
    /// Python's hashlib.
    #[test]
    fn sha512_256_and_session_variants() {
        assert_eq!(
            response_of(&answer("SHA-512-256")),
            "430d05014cecc49cab6fbe03176d41a1da86cbfe24a16580e22aaad928d960d0"
        );
        assert_eq!(
            response_of(&answer("MD5-sess")),
            "e783283f46242139c486a698fec7211d"
        );
        assert_eq!(
            response_of(&answer("SHA-256-sess")),
            "2fd51b3a77ad75bad6afad6003e818d767133c46d9e2749e7f5232ae1ea3efd7"
        );
        assert_eq!(
            response_of(&answer("SHA-512-256-sess")),
            "3f2a34f923c38b0fb26dce2fdfc2ce326c23cecf86fbb1444f3e51fbbc2cb92e"
        );
    }

    #[test]
    fn strongest_of_several_challenges_is_chosen() {
        let md5 = rfc_challenge("MD5");
        let sha = rfc_challenge("SHA-256");
        let unknown = rfc_challenge("SHA-3");
        let chosen =
            DigestChallenge::strongest([md5.as_str(), unknown.as_str(), sha.as_str()]).unwrap();
        assert_eq!(chosen.algorithm, Algorithm::Sha256);
        let best =
            DigestChallenge::strongest([sha.as_str(), rfc_challenge("SHA-512-256-sess").as_str()])
                .unwrap();
        assert_eq!(
            (best.algorithm, best.session),
            (Algorithm::Sha512_256, true)
        );
        assert!(DigestChallenge::strongest([unknown.as_str(), "Bearer realm=\"x\""]).is_none());
    }

    #[test]
    fn nonce_is_reused_with_an_incrementing_count() {
        let challenge = DigestChallenge::strongest([rfc_challenge("SHA-256").as_str()]).unwrap();
        let mut session = DigestSession::new(challenge);
        let password = Secret::new("Circle of Life");
        let first = session.authorize("INVITE", "sip:a@b", "Mufasa", &password, "c1");
        let second = session.authorize("BYE", "sip:a@b", "Mufasa", &password, "c2");
        assert!(first.contains("nc=00000001") && second.contains("nc=00000002"));
        assert_eq!(session.nonce_count(), 2);
        assert_ne!(response_of(&first), response_of(&second));
    }

    #[test]
    fn stale_auth_int_only_and_no_qop() {
        let stale =
            Challenge::parse("Digest realm=\"r\", nonce=\"n\", stale=TRUE, algorithm=MD5").unwrap();
        let stale = DigestChallenge::from_challenge(&stale).unwrap();
        assert!(stale.stale && !stale.qop_auth);
        // RFC 2069 style (no qop): response = H(HA1:nonce:HA2), no cnonce or nc sent.
        let value =
            DigestSession::new(stale).authorize("REGISTER", "sip:r", "u", &Secret::new("p"), "c");
        assert!(
            !value.contains("nc=") && !value.contains("cnonce"),
            "{value}"
        );
        let int_only =
            Challenge::parse("Digest realm=\"r\", nonce=\"n\", qop=\"auth-int\"").unwrap();
        assert_eq!(DigestChallenge::from_challenge(&int_only), None);
    }

    #[test]
    fn bearer_challenge_parameters() {
        let challenge = Challenge::parse(
            "Bearer realm=\"sip.example.com\", scope=\"trunk:write\", error=\"invalid_token\", authz_server=\"https://as.example.com/\"",
        )
        .unwrap();
        let bearer = BearerChallenge::from_challenge(&challenge).unwrap();
        assert_eq!(bearer.realm.as_deref(), Some("sip.example.com"));
        assert_eq!(bearer.scope.as_deref(), Some("trunk:write"));
        assert_eq!(bearer.error.as_deref(), Some("invalid_token"));
        assert_eq!(
            bearer.authz_server.as_deref(),
            Some("https://as.example.com/")
        );
        assert!(
            BearerChallenge::from_challenge(&Challenge::parse("Digest realm=\"x\"").unwrap())
                .is_none()
        );
    }

    #[test]
    fn an_unquoted_qop_list_is_read_as_one_value() {
        let challenge =
            Challenge::parse("Digest realm=\"r\", qop=auth,auth-int, nonce=\"n\", algorithm=MD5")
                .unwrap();
        assert_eq!(challenge.param("qop"), Some("auth,auth-int"));
        assert_eq!(challenge.param("nonce"), Some("n"));
        let digest = DigestChallenge::from_challenge(&challenge).unwrap();
        assert!(digest.qop_auth);
        // A bare token with nothing before it is still an error.
        assert!(Challenge::parse("Digest auth, realm=\"r\"").is_err());
    }

    #[test]
    fn auth_param_syntax_edge_cases() {
        let challenge =
            Challenge::parse(r#"Digest realm="a \"quoted\", realm", nonce=abc , stale=false"#)
                .unwrap();
        assert_eq!(challenge.param("realm"), Some("a \"quoted\", realm"));
        assert_eq!(challenge.param("NONCE"), Some("abc"));
        assert_eq!(Challenge::parse("  "), Err(ChallengeError::Empty));
        assert_eq!(
            Challenge::parse("Digest realm=\"open"),
            Err(ChallengeError::Unterminated)
        );
        assert!(matches!(
            Challenge::parse("Digest realm"),
            Err(ChallengeError::Malformed { .. })
        ));
        assert!(matches!(
            Challenge::parse("Digest a=\"b\" c=d"),
            Err(ChallengeError::Malformed { .. })
        ));
    }
}
