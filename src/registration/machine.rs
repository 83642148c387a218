//! The registration of one binding, pure (DESIGN.md item 7): when to send a REGISTER,
//! with which CSeq and expiry, and what each outcome means. Time comes in as `now`; the
//! driver sends, receives and sleeps until [`Registration::next_at`].
//!
//! - One Call-ID per binding and a CSeq that rises with every REGISTER (re-sends for
//!   authentication included); never two REGISTERs in flight.
//! - A success refreshes at the earlier of granted − margin and 80 % of granted, from
//!   the time the REGISTER was sent (the registrar's clock started no earlier).
//! - 423 raises the requested expiry to `Min-Expires` and tries again at once.
//! - Failures back off exponentially (capped, with jitter), faster while the binding may
//!   still be valid, and never stop: a registration is not disabled for good.
//! - A credential change re-registers at once; during a REGISTER in flight, right after.
//! - Shutdown unregisters (`Expires: 0`) when a binding may exist.

use std::time::{Duration, Instant};

use crate::config::RegistrationSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Nothing registered yet.
    Unregistered,
    /// The first REGISTER (or one after the binding lapsed) is out.
    Registering,
    /// Registered until the granted expiry.
    Registered,
    /// A refresh of a valid binding is out.
    Refreshing,
    /// The last attempt failed; waiting for the next.
    BackingOff,
    /// The unregistering REGISTER is out.
    Unregistering,
    /// Shut down (unregistered, or given up on unregistering at the deadline).
    Stopped,
}

impl State {
    /// Every state, for exporting one series per state.
    pub const ALL: [State; 7] = [
        State::Unregistered,
        State::Registering,
        State::Registered,
        State::Refreshing,
        State::BackingOff,
        State::Unregistering,
        State::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Unregistered => "unregistered",
            State::Registering => "registering",
            State::Registered => "registered",
            State::Refreshing => "refreshing",
            State::BackingOff => "backing_off",
            State::Unregistering => "unregistering",
            State::Stopped => "stopped",
        }
    }
}

/// A REGISTER to send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    pub cseq: u32,
    /// The expiry to ask for; zero unregisters.
    pub expires: Duration,
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A final response that is not a success (after any re-send for credentials).
    Rejected { status: u16, reason: String },
    /// No final response: timeout or transport failure.
    NoAnswer,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Rejected { status, reason } => write!(f, "{status} {reason}"),
            Failure::NoAnswer => f.write_str("no answer (timeout or transport failure)"),
        }
    }
}

/// What the driver should log after an input: only changes of state, and a failure
/// only when it differs from the previous one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notice {
    pub state_changed: Option<(State, State)>,
    pub new_failure: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    sent_at: Instant,
    expires: Duration,
}

#[derive(Debug)]
pub struct Registration {
    settings: RegistrationSettings,
    state: State,
    cseq: u32,
    in_flight: Option<InFlight>,
    /// The expiry asked for; raised by 423.
    requested: Duration,
    /// Until when the registrar holds the binding, as far as we know.
    valid_until: Option<Instant>,
    /// When the next REGISTER is due (none while one is in flight or when stopped).
    next_at: Option<Instant>,
    consecutive_failures: u32,
    last_failure: Option<String>,
    /// A credential change during a REGISTER in flight: one more right after it.
    reregister_after: bool,
    shutting_down: bool,
    /// 423 answers in a row.
    too_brief: u32,
}

/// Refresh at this fraction of the granted expiry at the latest.
const REFRESH_FRACTION: f64 = 0.8;
/// The longest expiry taken from a registrar (`Min-Expires` beyond it is a failure).
const MAX_EXPIRES: Duration = Duration::from_secs(24 * 3600);
/// 423 answers followed at once within one attempt; more are a failure.
const MAX_TOO_BRIEF: u32 = 3;

impl Registration {
    /// A binding to register at once; `first_cseq` starts its CSeq.
    pub fn new(settings: RegistrationSettings, now: Instant, first_cseq: u32) -> Self {
        let requested = settings.expires;
        Self {
            settings,
            state: State::Unregistered,
            cseq: first_cseq.saturating_sub(1),
            in_flight: None,
            requested,
            valid_until: None,
            next_at: Some(now),
            consecutive_failures: 0,
            last_failure: None,
            reregister_after: false,
            shutting_down: false,
            too_brief: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn cseq(&self) -> u32 {
        self.cseq
    }

    pub fn valid_until(&self) -> Option<Instant> {
        self.valid_until
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn requested(&self) -> Duration {
        self.requested
    }

    /// When the driver must call [`Registration::poll`] next.
    pub fn next_at(&self) -> Option<Instant> {
        self.next_at
    }

    fn set_state(&mut self, state: State, notice: &mut Notice) {
        if self.state != state {
            notice.state_changed = Some((self.state, state));
            self.state = state;
        }
    }

    /// The REGISTER due at `now`, if any; it is in flight from then on.
    pub fn poll(&mut self, now: Instant) -> (Option<Send>, Notice) {
        let mut notice = Notice::default();
        if self.in_flight.is_some() || self.next_at.is_none_or(|at| now < at) {
            return (None, notice);
        }
        let expires = if self.shutting_down {
            Duration::ZERO
        } else {
            self.requested
        };
        let next_state = if self.shutting_down {
            State::Unregistering
        } else if self.valid_until.is_some_and(|until| now < until) {
            State::Refreshing
        } else {
            State::Registering
        };
        self.set_state(next_state, &mut notice);
        (Some(self.send(now, expires)), notice)
    }

    fn send(&mut self, now: Instant, expires: Duration) -> Send {
        self.cseq = self.cseq.wrapping_add(1).max(1);
        self.in_flight = Some(InFlight {
            sent_at: now,
            expires,
        });
        self.next_at = None;
        Send {
            cseq: self.cseq,
            expires,
        }
    }

    /// The REGISTER in flight was challenged or refused and goes out again with fresh
    /// credentials: same expiry, next CSeq. `None` when nothing is in flight.
    pub fn resend(&mut self, now: Instant) -> Option<Send> {
        let expires = self.in_flight?.expires;
        Some(self.send(now, expires))
    }

    /// The registrar accepted; `granted` is the expiry it granted (Contact `expires`,
    /// else `Expires`), `None` when it said nothing (the requested value stands).
    pub fn succeeded(&mut self, now: Instant, granted: Option<Duration>) -> Notice {
        let mut notice = Notice::default();
        let Some(in_flight) = self.in_flight.take() else {
            return notice;
        };
        self.consecutive_failures = 0;
        self.last_failure = None;
        self.too_brief = 0;
        if in_flight.expires.is_zero() {
            self.valid_until = None;
            self.next_at = None;
            self.set_state(State::Stopped, &mut notice);
            return notice;
        }
        // A registrar may shorten the expiry, not lengthen it (§10.3 step 7).
        let granted = granted.unwrap_or(in_flight.expires).min(in_flight.expires);
        if self.shutting_down {
            // A binding now exists: the unregister goes next.
            self.valid_until = Some(in_flight.sent_at + granted);
            self.next_at = Some(now);
            return notice;
        }
        if granted.is_zero() {
            // The registrar removed the binding while accepting (it should not): register
            // again after a backoff step rather than in a tight loop.
            self.valid_until = None;
            self.next_at = Some(now + self.settings.backoff_initial);
            self.set_state(State::BackingOff, &mut notice);
            return notice;
        }
        self.valid_until = Some(in_flight.sent_at + granted);
        let refresh_in = granted
            .saturating_sub(self.settings.margin)
            .min(granted.mul_f64(REFRESH_FRACTION))
            .max(Duration::from_secs(1));
        self.next_at = Some(if self.reregister_after {
            now
        } else {
            in_flight.sent_at + refresh_in
        });
        self.reregister_after = false;
        self.set_state(State::Registered, &mut notice);
        notice
    }

    /// 423 Interval Too Brief: ask for at least `min_expires` and try again at once. A
    /// registrar that keeps answering 423 is a failure like any other.
    pub fn interval_too_brief(&mut self, now: Instant, min_expires: Option<Duration>) -> Notice {
        let unregistering = self
            .in_flight
            .is_some_and(|in_flight| in_flight.expires.is_zero());
        match min_expires {
            Some(min)
                if min > self.requested
                    && min <= MAX_EXPIRES
                    && self.too_brief < MAX_TOO_BRIEF
                    && self.in_flight.is_some()
                    && !unregistering =>
            {
                self.in_flight = None;
                self.too_brief += 1;
                self.requested = min;
                self.next_at = Some(now);
                Notice::default()
            }
            _ => {
                self.too_brief = 0;
                self.failed(
                    now,
                    Failure::Rejected {
                        status: 423,
                        reason: "Interval Too Brief without a usable larger Min-Expires".into(),
                    },
                    None,
                    0.5,
                )
            }
        }
    }

    /// The attempt failed. `jitter` is uniform in [0, 1). The next attempt comes after
    /// `backoff_initial · 2^(n−1)` capped at `backoff_max`, scaled into its upper half by
    /// the jitter, or after `retry_after` (a registrar's `Retry-After`, capped at
    /// `backoff_max`) when that is longer; while the binding is still valid, no later than
    /// halfway to its end, but not sooner than `backoff_initial`.
    pub fn failed(
        &mut self,
        now: Instant,
        failure: Failure,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Notice {
        let mut notice = Notice::default();
        let Some(in_flight) = self.in_flight.take() else {
            return notice;
        };
        let text = failure.to_string();
        if self.last_failure.as_deref() != Some(text.as_str()) {
            notice.new_failure = Some(text.clone());
            self.last_failure = Some(text);
        }
        let may_exist = self.valid_until.is_some_and(|until| now < until);
        if in_flight.expires.is_zero() || (self.shutting_down && !may_exist) {
            // Unregistering failed, or there is nothing to unregister: the binding, if
            // any, lapses by itself.
            self.next_at = None;
            self.set_state(State::Stopped, &mut notice);
            return notice;
        }
        if self.shutting_down {
            self.next_at = Some(now);
            return notice;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let exponent = self.consecutive_failures.saturating_sub(1).min(30);
        let ceiling = self
            .settings
            .backoff_initial
            .saturating_mul(1u32 << exponent)
            .min(self.settings.backoff_max);
        let mut delay = ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        if let Some(asked) = retry_after {
            delay = delay.max(asked.min(self.settings.backoff_max));
        }
        if let Some(until) = self.valid_until.filter(|until| now < *until) {
            // Try again before the binding lapses, without a burst at its very end.
            delay = delay
                .min((until - now) / 2)
                .max(self.settings.backoff_initial.min(delay));
        } else {
            self.valid_until = None;
        }
        self.next_at = Some(now + delay.max(Duration::from_millis(100)));
        if self.reregister_after {
            // The swap that asked for it is served by this next attempt.
            self.reregister_after = false;
        }
        self.set_state(State::BackingOff, &mut notice);
        notice
    }

    /// The trunk's credential changed. With `reregister_on_refresh`, a registration
    /// carrying it goes out at once, or right after the REGISTER in flight.
    pub fn credentials_changed(&mut self, now: Instant) {
        if !self.settings.reregister_on_refresh || self.shutting_down {
            return;
        }
        if self.in_flight.is_some() {
            self.reregister_after = true;
        } else {
            self.next_at = Some(now);
        }
    }

    /// Stop: unregister when a binding may exist (registered, or a REGISTER out that may
    /// have created one). Returns whether an unregistering REGISTER will be sent; after
    /// it, or at once when not, the state is [`State::Stopped`].
    pub fn shut_down(&mut self, now: Instant) -> (bool, Notice) {
        let mut notice = Notice::default();
        self.shutting_down = true;
        self.reregister_after = false;
        let may_exist =
            self.in_flight.is_some() || self.valid_until.is_some_and(|until| now < until);
        if !may_exist {
            self.next_at = None;
            self.set_state(State::Stopped, &mut notice);
            return (false, notice);
        }
        if self.in_flight.is_none() {
            self.next_at = Some(now);
        }
        // With one in flight, `succeeded`/`failed` see `shutting_down` and make the
        // unregister due after it.
        (true, notice)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start their virtual clock at a real Instant
mod tests;
