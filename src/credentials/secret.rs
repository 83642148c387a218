//! Secrets as a type: client secrets, passwords and tokens live in [`Secret`], whose
//! `Debug` is redacted, which has no `Display` or `Serialize`, and which zeroes its bytes
//! when dropped. A secret is identified in logs by its [`Secret::fingerprint`].

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first 8 hex digits of the SHA-256 of the secret: enough to tell two tokens
    /// apart in a log, useless for recovering either.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.0.as_bytes())
    }
}

pub fn fingerprint(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest[..4]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted_and_fingerprint_is_short_and_stable() {
        let secret = Secret::new("hunter2-very-secret");
        let shown = format!("{secret:?} {:?}", vec![secret.clone()]);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(secret.fingerprint().len(), 8);
        assert_eq!(
            secret.fingerprint(),
            Secret::new("hunter2-very-secret").fingerprint()
        );
        assert_ne!(
            secret.fingerprint(),
            Secret::new("hunter3-very-secret").fingerprint()
        );
        assert!(!secret.fingerprint().contains("hunter"));
    }
}
