//! `[trunk.registration]`: keeping the trunk registered with the core (DESIGN.md item 7).

use std::time::Duration;

use serde::Deserialize;

use super::Problems;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    /// The address of record registered: `sip:user@domain` (From and To).
    pub aor: String,
    /// The Request-URI of the REGISTER; `sip:` plus the AOR's domain when absent.
    pub registrar: Option<String>,
    /// The expiry asked for; the registrar may grant less (or demand more with 423).
    pub expires: Option<String>,
    /// Refresh this long before the granted expiry at the latest.
    pub margin: Option<String>,
    /// Re-REGISTER as soon as the trunk's credential changes (default true).
    pub reregister_on_refresh: Option<bool>,
    /// The user part of the Contact registered (default: the AOR's user).
    pub contact_user: Option<String>,
    /// First and largest delay between attempts after failures.
    pub backoff_initial: Option<String>,
    pub backoff_max: Option<String>,
}

/// A validated registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationSettings {
    pub aor: String,
    pub registrar: String,
    pub expires: Duration,
    pub margin: Duration,
    pub reregister_on_refresh: bool,
    pub contact_user: String,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 3600);

impl RegistrationConfig {
    pub(super) fn validate(
        &self,
        label: &str,
        problems: &mut Problems,
    ) -> Option<RegistrationSettings> {
        let key = |name: &str| format!("{label}.registration.{name}");
        let before = problems.0.len();
        let (user, domain) = match split_aor(&self.aor) {
            Some(parts) => parts,
            None => {
                problems.add(
                    &key("aor"),
                    format!(
                        "{:?} is not a sip: URI with a user and a domain (sip:trunk@core.example)",
                        self.aor
                    ),
                );
                ("", "")
            }
        };
        let registrar = match &self.registrar {
            Some(registrar)
                if rsip::Uri::try_from(registrar.as_str()).is_err()
                    || !registrar.starts_with("sip:") =>
            {
                problems.add(
                    &key("registrar"),
                    format!("{registrar:?} is not a sip: URI"),
                );
                String::new()
            }
            Some(registrar) => registrar.clone(),
            None => format!("sip:{domain}"),
        };
        let mut duration = |name: &str,
                            value: &Option<String>,
                            default: Duration,
                            low: Duration,
                            high: Duration| {
            let value = match value {
                Some(text) => problems.duration(&key(name), text).unwrap_or(default),
                None => default,
            };
            problems.within(&key(name), value, low, high);
            value
        };
        let expires = duration(
            "expires",
            &self.expires,
            Duration::from_secs(300),
            Duration::from_secs(10),
            DAY,
        );
        let margin = duration(
            "margin",
            &self.margin,
            Duration::from_secs(10),
            Duration::ZERO,
            10 * MINUTE,
        );
        let backoff_initial = duration(
            "backoff_initial",
            &self.backoff_initial,
            Duration::from_secs(1),
            Duration::from_millis(100),
            10 * MINUTE,
        );
        let backoff_max = duration(
            "backoff_max",
            &self.backoff_max,
            MINUTE,
            Duration::from_millis(100),
            DAY,
        );
        if backoff_max < backoff_initial {
            problems.add(
                &key("backoff_max"),
                "must be at least backoff_initial".into(),
            );
        }
        let contact_user = self
            .contact_user
            .clone()
            .unwrap_or_else(|| user.to_string());
        if contact_user.is_empty()
            || !contact_user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.!~*'()&=+$,;?/".contains(c))
        {
            problems.add(
                &key("contact_user"),
                format!("{contact_user:?} is not a SIP user part"),
            );
        }
        (problems.0.len() == before).then(|| RegistrationSettings {
            aor: self.aor.clone(),
            registrar,
            expires,
            margin,
            reregister_on_refresh: self.reregister_on_refresh.unwrap_or(true),
            contact_user,
            backoff_initial,
            backoff_max,
        })
    }
}

/// The user and domain of `sip:user@domain` (a port is allowed after the domain).
fn split_aor(aor: &str) -> Option<(&str, &str)> {
    let rest = aor.strip_prefix("sip:")?;
    let (user, domain) = rest.split_once('@')?;
    let valid = !user.is_empty()
        && !domain.is_empty()
        && !domain.contains(|c: char| c.is_whitespace() || c == ';' || c == '>' || c == '<');
    (valid && rsip::Uri::try_from(aor).is_ok()).then_some((user, domain))
}
