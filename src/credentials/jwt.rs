//! Reading a JWT access token's claims without verifying it (RFC 7519, RFC 9068), for
//! diagnostics only: when it expires by its own account, which organization and scopes it
//! was issued for. The sidecar never trusts these claims for anything but log lines; an
//! opaque token simply has none.

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::Value;

/// Claim names that carry an organization id, tried in order after the configured one.
const ORGANIZATION_CLAIMS: &[&str] = &["org_id", "organization_id", "organization", "org", "tid"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// `exp`, seconds since the Unix epoch.
    pub expires: Option<i64>,
    /// `iat`, seconds since the Unix epoch.
    pub issued: Option<i64>,
    pub organization: Option<String>,
    /// `scope` (space-separated) or `scp` (array or string).
    pub scopes: Option<Vec<String>>,
}

/// The claims of `token` if it is a JWT (three base64url parts, the middle one a JSON
/// object), `None` for an opaque token.
pub fn claims(token: &str, organization_claim: Option<&str>) -> Option<Claims> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .or_else(|_| URL_SAFE.decode(payload))
        .ok()?;
    let Value::Object(object) = serde_json::from_slice::<Value>(&bytes).ok()? else {
        return None;
    };
    let number = |name: &str| object.get(name).and_then(Value::as_i64);
    let organization = organization_claim
        .into_iter()
        .chain(ORGANIZATION_CLAIMS.iter().copied())
        .find_map(|name| object.get(name))
        .and_then(|value| match value {
            Value::String(text) => Some(text.clone()),
            Value::Number(number) => Some(number.to_string()),
            _ => None,
        });
    let scopes = object
        .get("scope")
        .or_else(|| object.get("scp"))
        .map(|value| match value {
            Value::String(text) => text.split_whitespace().map(str::to_string).collect(),
            Value::Array(items) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        });
    Some(Claims {
        expires: number("exp"),
        issued: number("iat"),
        organization,
        scopes,
    })
}

/// Something about an issued token that an operator should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Diagnostic {
    /// The token's `exp` and the response's `expires_in` disagree: one of the clocks is
    /// off, or the endpoint misreports lifetimes.
    ExpiryDisagreement { exp_minus_expected_seconds: i64 },
    /// Issued for another organization than the trunk's.
    OrganizationMismatch { configured: String, token: String },
    /// Configured scopes the endpoint did not grant.
    MissingScopes { missing: Vec<String> },
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Diagnostic::ExpiryDisagreement { exp_minus_expected_seconds } => write!(
                f,
                "token exp differs from the time of request plus expires_in by {exp_minus_expected_seconds} s: clock skew between this host and the token endpoint, or a misreported lifetime"
            ),
            Diagnostic::OrganizationMismatch { configured, token } => write!(
                f,
                "token was issued for organization {token:?}, but the trunk belongs to {configured:?}"
            ),
            Diagnostic::MissingScopes { missing } => {
                write!(f, "token lacks configured scopes: {}", missing.join(" "))
            }
        }
    }
}

/// What to say about a token: `expected_expiry` is the wall-clock time of the request
/// plus `expires_in` (Unix seconds), `granted` the scopes the token response or the JWT
/// lists (`None` when neither says: RFC 6749 §5.1 means "as requested").
pub fn diagnose(
    claims: Option<&Claims>,
    expected_expiry: Option<i64>,
    granted: Option<&[String]>,
    organization: Option<&str>,
    scopes: &[String],
    skew_threshold_seconds: i64,
) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    if let (Some(exp), Some(expected)) = (claims.and_then(|claims| claims.expires), expected_expiry)
    {
        let difference = exp.saturating_sub(expected);
        if difference.saturating_abs() > skew_threshold_seconds {
            found.push(Diagnostic::ExpiryDisagreement {
                exp_minus_expected_seconds: difference,
            });
        }
    }
    if let (Some(configured), Some(token)) = (
        organization,
        claims.and_then(|claims| claims.organization.as_deref()),
    ) {
        if configured != token {
            found.push(Diagnostic::OrganizationMismatch {
                configured: configured.to_string(),
                token: token.to_string(),
            });
        }
    }
    if let Some(granted) = granted {
        let missing: Vec<String> = scopes
            .iter()
            .filter(|scope| !granted.contains(scope))
            .cloned()
            .collect();
        if !missing.is_empty() {
            found.push(Diagnostic::MissingScopes { missing });
        }
    }
    found
}

/// Builds an unsigned-looking JWT from claims (the signature part is not checked by
/// anyone here); used by the simulated token endpoint and tests.
pub fn encode_unverified(claims: &Value, signature: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.{signature}")
}

/// What one fetched token tells: its claims, the scopes granted (from the response, else
/// the token), and the diagnostics against the configuration. `sent_at` is the wall-clock
/// time the token request was sent. `None` for credentials that are no token.
pub struct TokenReading {
    pub claims: Option<Claims>,
    pub granted: Option<Vec<String>>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Reads `fetched` as [`TokenReading`]; the one place the manager and `check --online`
/// diagnose a token.
pub fn read_token(
    fetched: &super::Fetched,
    sent_at: std::time::SystemTime,
    organization: Option<&str>,
    organization_claim: Option<&str>,
    scopes: &[String],
    skew_threshold_seconds: i64,
) -> Option<TokenReading> {
    let super::CredentialValue::Token(token) = &fetched.value else {
        return None;
    };
    let claims = claims(token.expose(), organization_claim);
    let expected_expiry = fetched.lifetime.and_then(|lifetime| {
        let at = sent_at
            .checked_add(lifetime)?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        i64::try_from(at.as_secs()).ok()
    });
    let granted = fetched
        .granted_scopes
        .clone()
        .or_else(|| claims.as_ref().and_then(|claims| claims.scopes.clone()));
    let diagnostics = diagnose(
        claims.as_ref(),
        expected_expiry,
        granted.as_deref(),
        organization,
        scopes,
        skew_threshold_seconds,
    );
    Some(TokenReading {
        claims,
        granted,
        diagnostics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_exp_iat_org_and_scopes() {
        let token = encode_unverified(
            &json!({"exp": 1_800_000_100, "iat": 1_800_000_000, "org_id": "org-a", "scope": "a b"}),
            "sig",
        );
        let claims = claims(&token, None).unwrap();
        assert_eq!(claims.expires, Some(1_800_000_100));
        assert_eq!(claims.issued, Some(1_800_000_000));
        assert_eq!(claims.organization.as_deref(), Some("org-a"));
        assert_eq!(claims.scopes, Some(vec!["a".to_string(), "b".to_string()]));
    }

    #[test]
    fn configured_claim_name_and_scp_array() {
        let token = encode_unverified(&json!({"tenant": "t-9", "scp": ["x", "y"]}), "s");
        let claims = claims(&token, Some("tenant")).unwrap();
        assert_eq!(claims.organization.as_deref(), Some("t-9"));
        assert_eq!(claims.scopes, Some(vec!["x".to_string(), "y".to_string()]));
    }

    #[test]
    fn opaque_and_malformed_tokens_have_no_claims() {
        assert_eq!(claims("2YotnFZFEjr1zCsicMWpAA", None), None);
        assert_eq!(claims("a.b.c", None), None);
        assert_eq!(claims("a.e30.c.d", None), None);
        assert_eq!(
            claims(&format!("h.{}.s", URL_SAFE_NO_PAD.encode("[1,2]")), None),
            None
        );
        assert_eq!(claims("", None), None);
    }

    #[test]
    fn diagnoses_skew_wrong_org_and_missing_scopes() {
        let claims = Claims {
            expires: Some(1000 + 3600 + 120),
            issued: Some(1000),
            organization: Some("org-b".into()),
            scopes: None,
        };
        let scopes = vec!["trunk:write".to_string(), "trunk:read".to_string()];
        let granted = vec!["trunk:read".to_string()];
        let found = diagnose(
            Some(&claims),
            Some(1000 + 3600),
            Some(&granted),
            Some("org-a"),
            &scopes,
            30,
        );
        assert_eq!(
            found,
            vec![
                Diagnostic::ExpiryDisagreement {
                    exp_minus_expected_seconds: 120
                },
                Diagnostic::OrganizationMismatch {
                    configured: "org-a".into(),
                    token: "org-b".into()
                },
                Diagnostic::MissingScopes {
                    missing: vec!["trunk:write".into()]
                },
            ]
        );
        let within = diagnose(
            Some(&claims),
            Some(1000 + 3600 + 100),
            None,
            Some("org-b"),
            &scopes,
            30,
        );
        assert!(within.is_empty(), "{within:?}");
    }
}
