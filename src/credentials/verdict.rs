//! What the core's answers say about a trunk's credential: the one rule that the proxy's
//! re-send and the registration driver both follow when the core refuses a request with
//! 401 or 403 (DESIGN.md item 6). Pure: the caller says when each request was sent.
//!
//! Three readings of a refusal of credential generation `g`, when no newer one exists:
//!
//! - **the request, not the credential**: the core accepted `g` on a request sent *after*
//!   the refused one, so `g` is good; the refusal is about this request (a barred
//!   number, a missing permission for one destination) and goes to the Edge at once;
//! - **permanent**: a credential obtained to replace a refused one was itself refused
//!   before the core ever accepted it (a wrong scope, a wrong organization, a client
//!   without the right role). No refresh helps; every refusal goes to the Edge at once,
//!   until the core accepts some credential again;
//! - **rotation**: anything else (a credential the core accepted until now, or one it has
//!   not seen yet, refused). The credential is refreshed, waiting for the rate limit if
//!   needed, and the request re-sent once.
//!
//! The view is per credential (per trunk), fed with every answer that shows the core
//! accepting a credential ([`shows_acceptance`]): a response above 100 other than 401,
//! 403 and 407 to a request the core is known to check ([`checked_by_core`]).

use std::time::Instant;

use crate::sip::wire::Method;

/// Whether the core's answer to a request like this tells whether it took the request's
/// credential: only requests outside a dialog, other than OPTIONS, CANCEL and ACK. Cores
/// commonly check credentials on initial requests only (Kamailio's usual set-up lets
/// in-dialog requests through on the strength of the dialog) and answer OPTIONS
/// keep-alives before any check, so their answers prove nothing.
pub fn checked_by_core(method: Method, in_dialog: bool) -> bool {
    !in_dialog && !matches!(method, Method::Options | Method::Cancel | Method::Ack)
}

/// Whether a response code to a request the core checks shows it took the credential.
pub fn shows_acceptance(code: u16) -> bool {
    code > 100 && !matches!(code, 401 | 403 | 407)
}

/// How a refusal of a credential is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// The credential may have been revoked or rotated: refresh and re-send.
    Rotation,
    /// The core accepted this very credential on a later request: pass the refusal on.
    RequestRefused,
    /// A fresh credential refused at once: pass the refusal on without waiting.
    Permanent,
}

impl Reading {
    pub fn as_str(self) -> &'static str {
        match self {
            Reading::Rotation => "rotation",
            Reading::RequestRefused => "request refused",
            Reading::Permanent => "permanent refusal",
        }
    }
}

/// The newest acceptance seen: the generation and the latest send time of a request
/// carrying it that the core accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Accepted {
    generation: u64,
    sent_at: Instant,
}

/// What the core has shown of one credential's generations.
#[derive(Debug, Clone, Default)]
pub struct CoreView {
    accepted: Option<Accepted>,
    /// The newest generation obtained by a refresh forced by a refusal.
    forced: Option<u64>,
    /// Since the core refused this forced generation without accepting it first, every
    /// refusal is permanent until the core accepts this generation or a newer one.
    refusing: Option<u64>,
}

impl CoreView {
    /// The core accepted a request carrying `generation`, sent at `sent_at`.
    pub fn accepted(&mut self, generation: u64, sent_at: Instant) {
        match &mut self.accepted {
            Some(accepted) if accepted.generation == generation => {
                accepted.sent_at = accepted.sent_at.max(sent_at);
            }
            Some(accepted) if accepted.generation > generation => {}
            _ => {
                self.accepted = Some(Accepted {
                    generation,
                    sent_at,
                })
            }
        }
        if self.refusing.is_some_and(|refused| generation >= refused) {
            self.refusing = None;
        }
    }

    /// `generation` was obtained by a refresh forced by a refusal.
    pub fn forced(&mut self, generation: u64) {
        self.forced = Some(
            self.forced
                .map_or(generation, |known| known.max(generation)),
        );
    }

    /// Reads the refusal of a request carrying `generation`, sent at `sent_at`, when no
    /// newer generation is at hand.
    pub fn refused(&mut self, generation: u64, sent_at: Instant) -> Reading {
        let accepted_generation = self.accepted.map(|accepted| accepted.generation);
        if self
            .accepted
            .is_some_and(|accepted| accepted.generation == generation && accepted.sent_at > sent_at)
        {
            return Reading::RequestRefused;
        }
        if self.refusing.is_some() {
            return Reading::Permanent;
        }
        let never_accepted = accepted_generation.is_none_or(|accepted| accepted < generation);
        if self.forced == Some(generation) && never_accepted {
            self.refusing = Some(generation);
            return Reading::Permanent;
        }
        Reading::Rotation
    }

    /// Whether refusals are read as permanent now.
    pub fn is_refusing(&self) -> bool {
        self.refusing.is_some()
    }

    /// The newest generation the core accepted.
    pub fn accepted_generation(&self) -> Option<u64> {
        self.accepted.map(|accepted| accepted.generation)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start their virtual clock at a real Instant
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn a_credential_the_core_accepted_before_is_a_rotation_when_refused() {
        let start = Instant::now();
        let mut view = CoreView::default();
        view.accepted(1, at(start, 10));
        assert_eq!(view.refused(1, at(start, 20)), Reading::Rotation);
        // The replacement, fetched for that refusal, is accepted: the next revocation of
        // it is a rotation again, however soon.
        view.forced(2);
        view.accepted(2, at(start, 30));
        assert_eq!(view.refused(2, at(start, 40)), Reading::Rotation);
    }

    #[test]
    fn a_credential_the_core_has_not_seen_yet_is_a_rotation_when_refused() {
        // Revoked between its proactive refresh and its first use, or at start-up by
        // another holder of the same client: one refresh may well fix it.
        let start = Instant::now();
        let mut view = CoreView::default();
        assert_eq!(view.refused(1, start), Reading::Rotation);
        view.accepted(1, at(start, 10));
        assert_eq!(view.refused(2, at(start, 20)), Reading::Rotation);
    }

    #[test]
    fn a_replacement_refused_before_any_acceptance_makes_every_refusal_permanent() {
        let start = Instant::now();
        let mut view = CoreView::default();
        assert_eq!(view.refused(1, start), Reading::Rotation);
        view.forced(2);
        assert_eq!(view.refused(2, at(start, 5)), Reading::Permanent);
        assert!(view.is_refusing());
        // Later generations, proactive or forced, are refused at once too...
        assert_eq!(view.refused(3, at(start, 10)), Reading::Permanent);
        assert_eq!(view.refused(2, at(start, 10)), Reading::Permanent);
        // ...until the core accepts one: an old generation's late acceptance does not count.
        view.accepted(1, at(start, 1));
        assert!(view.is_refusing());
        view.accepted(3, at(start, 11));
        assert!(!view.is_refusing());
        assert_eq!(view.refused(3, at(start, 12)), Reading::Rotation);
    }

    #[test]
    fn a_refusal_of_a_credential_accepted_on_a_later_request_is_about_the_request() {
        let start = Instant::now();
        let mut view = CoreView::default();
        view.accepted(4, at(start, 100));
        // Sent before the accepted one: the credential is fine, the request is not.
        assert_eq!(view.refused(4, at(start, 50)), Reading::RequestRefused);
        // Sent after it: the credential may have been revoked since.
        assert_eq!(view.refused(4, at(start, 150)), Reading::Rotation);
        // An older acceptance does not vouch for a newer generation.
        assert_eq!(view.refused(5, at(start, 50)), Reading::Rotation);
        assert_eq!(view.accepted_generation(), Some(4));
    }

    #[test]
    fn only_answers_to_requests_the_core_checks_show_acceptance() {
        assert!(checked_by_core(Method::Invite, false));
        assert!(checked_by_core(Method::Register, false));
        assert!(checked_by_core(Method::Message, false));
        assert!(!checked_by_core(Method::Invite, true), "a re-INVITE");
        assert!(!checked_by_core(Method::Bye, true));
        assert!(!checked_by_core(Method::Options, false));
        assert!(!checked_by_core(Method::Cancel, false));
        assert!(!checked_by_core(Method::Ack, true));
        for code in [180, 183, 200, 202, 404, 486, 503] {
            assert!(shows_acceptance(code), "{code}");
        }
        for code in [100, 401, 403, 407] {
            assert!(!shows_acceptance(code), "{code}");
        }
    }

    #[test]
    fn acceptances_keep_the_newest_generation_and_the_latest_send_time() {
        let start = Instant::now();
        let mut view = CoreView::default();
        view.accepted(2, at(start, 100));
        view.accepted(2, at(start, 50));
        view.accepted(1, at(start, 500));
        assert_eq!(view.accepted_generation(), Some(2));
        assert_eq!(view.refused(2, at(start, 99)), Reading::RequestRefused);
        assert_eq!(view.refused(2, at(start, 100)), Reading::Rotation);
    }
}
