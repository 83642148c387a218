//! Time-limited HMAC credentials, the scheme Kamailio's `auth_ephemeral` module (and
//! TURN's REST API) verifies: `username = <unix-expiry>:<user>`,
//! `password = base64(HMAC(shared secret, username))`, with SHA-1 or SHA-256.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};

use super::{CredentialValue, FetchError, FetchFuture, Fetched, Secret, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacAlgorithm {
    Sha1,
    Sha256,
}

#[derive(Debug)]
pub struct EphemeralSource {
    user: String,
    /// The shared secret: the configured one until a reload (SIGHUP) replaces it.
    secret: arc_swap::ArcSwap<Secret>,
    algorithm: HmacAlgorithm,
    lifetime: Duration,
}

impl EphemeralSource {
    pub fn new(user: String, secret: Secret, algorithm: HmacAlgorithm, lifetime: Duration) -> Self {
        Self {
            user,
            secret: arc_swap::ArcSwap::from_pointee(secret),
            algorithm,
            lifetime,
        }
    }
}

/// The credential valid until `expiry` (Unix seconds).
// HMAC takes keys of any length (RFC 2104 §2), so `new_from_slice` cannot fail.
#[allow(clippy::expect_used)]
pub fn credential(
    user: &str,
    secret: &Secret,
    algorithm: HmacAlgorithm,
    expiry: u64,
) -> CredentialValue {
    let username = format!("{expiry}:{user}");
    let digest = match algorithm {
        HmacAlgorithm::Sha1 => {
            let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(secret.expose().as_bytes())
                .expect("invariant: HMAC accepts keys of any length");
            mac.update(username.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        HmacAlgorithm::Sha256 => {
            let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.expose().as_bytes())
                .expect("invariant: HMAC accepts keys of any length");
            mac.update(username.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
    };
    CredentialValue::UserPassword {
        username,
        password: Secret::new(STANDARD.encode(digest)),
    }
}

impl Source for EphemeralSource {
    fn fetch(&self) -> FetchFuture<'_> {
        let result = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| FetchError::Configuration {
                reason: "system clock is before 1970; cannot compute an expiry".into(),
                detail: None,
            })
            .map(|now| {
                // The server checks whole seconds: report the lifetime up to the second
                // written into the username, not beyond it.
                let expiry = (now + self.lifetime).as_secs();
                Fetched {
                    value: credential(&self.user, &self.secret.load(), self.algorithm, expiry),
                    lifetime: Some(Duration::from_secs(expiry).saturating_sub(now)),
                    granted_scopes: None,
                }
            });
        Box::pin(async move { result })
    }

    fn describe(&self) -> String {
        format!("ephemeral HMAC for user {:?}", self.user)
    }

    fn reload(&self, settings: &crate::config::SourceSettings) -> bool {
        let crate::config::SourceSettings::Ephemeral { secret, .. } = settings else {
            return false;
        };
        if **self.secret.load() == *secret {
            return false;
        }
        self.secret.store(std::sync::Arc::new(secret.clone()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed independently with
    /// `printf %s '1700000000:trunk-a' | openssl dgst -sha1|-sha256 -hmac s3cret -binary | base64`.
    #[test]
    fn matches_openssl_hmac_for_both_algorithms() {
        let secret = Secret::new("s3cret");
        let CredentialValue::UserPassword { username, password } =
            credential("trunk-a", &secret, HmacAlgorithm::Sha1, 1_700_000_000)
        else {
            unreachable!()
        };
        assert_eq!(username, "1700000000:trunk-a");
        assert_eq!(password.expose(), SHA1_EXPECTED);
        let CredentialValue::UserPassword { password, .. } =
            credential("trunk-a", &secret, HmacAlgorithm::Sha256, 1_700_000_000)
        else {
            unreachable!()
        };
        assert_eq!(password.expose(), SHA256_EXPECTED);
    }

    const SHA1_EXPECTED: &str = "R5rnWGbnxC8Jc03CQkjuZs+Egzc=";
    const SHA256_EXPECTED: &str = "zJchmR5P35honWIgpeYIvQmWeZPx8kZc7Klfcrf/h7g=";
}
