//! When to refresh and when to retry: pure functions of time, tested in virtual time.
//!
//! The rules, gathered from how Envoy, Vault Agent, the kubelet and the cloud SDKs
//! refresh credentials and from their bug histories:
//! - refresh proactively at a random point in 50–60 % of the lifetime (so a fleet started
//!   together does not refresh together), and never later than `refresh_buffer` before
//!   expiry;
//! - after a failure, retry with capped exponential backoff and full jitter (so clients do
//!   not stampede an endpoint that just recovered), honouring `Retry-After`;
//! - a configuration error (`invalid_client`, `invalid_scope`) is retried only every
//!   `slow_retry`: it will not fix itself quickly, and hammering helps nobody;
//! - forced refreshes (after the core rejected a credential) are rate-limited.

use std::time::{Duration, Instant};

/// The smallest delay between attempts, so no combination of jitter, configuration or
/// token lifetime turns the refresher into a busy loop.
pub const MIN_RETRY: Duration = Duration::from_millis(100);

/// The longest lifetime or delay the schedule works with: far beyond any real token,
/// and far from `Instant` overflow.
pub const MAX_SPAN: Duration = Duration::from_secs(366 * 24 * 3600);

/// The share of the lifetime `refresh_buffer` may take before it stops being honoured:
/// a buffer of 95 % of a 10 s token would mean a refresh every 0.5 s.
const MAX_BUFFER_SHARE: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshPolicy {
    pub refresh_buffer: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub slow_retry: Duration,
    /// At most one forced refresh per this interval.
    pub force_interval: Duration,
    /// A new credential is used only this long after it was requested, while the one it
    /// replaces is still valid: for cores that accept a new token only some time after
    /// it was issued (propagation lag). Zero: at once.
    pub activation_delay: Duration,
    /// How long a request the core refused may wait for its replacement credential
    /// (for the rate limit, a backoff, the token request itself) before the refusal goes
    /// to the Edge; also how long an in-dialog request waits for a valid credential.
    pub resend_wait: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            refresh_buffer: Duration::from_secs(15),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            slow_retry: Duration::from_secs(300),
            force_interval: Duration::from_secs(5),
            activation_delay: Duration::ZERO,
            resend_wait: Duration::from_secs(8),
        }
    }
}

/// What kind of failure a refresh attempt ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Will not fix itself: wrong client, secret, scope or organization.
    Configuration,
    /// Worth retrying soon; the endpoint may have said how soon.
    Transient { retry_after: Option<Duration> },
}

impl RefreshPolicy {
    /// When to refresh a credential obtained at `obtained` that expires at `expires`;
    /// `jitter` is uniform in [0, 1). The point is 50–60 % into the lifetime, pulled
    /// earlier to `expires - refresh_buffer` when that comes first. A buffer of more than
    /// 90 % of the lifetime cannot be honoured sensibly (it would refresh almost at once,
    /// again and again), so then the 50–60 % point stands (see
    /// [`RefreshPolicy::buffer_too_long`]). Never sooner than [`MIN_RETRY`].
    pub fn refresh_at(&self, obtained: Instant, expires: Instant, jitter: f64) -> Instant {
        let lifetime = expires.saturating_duration_since(obtained).min(MAX_SPAN);
        let fraction = 0.5 + 0.1 * jitter.clamp(0.0, 1.0);
        let mut at = obtained + lifetime.mul_f64(fraction);
        if !self.buffer_too_long(lifetime) {
            at = at.min(obtained + (lifetime - self.refresh_buffer));
        }
        at.max(obtained + MIN_RETRY)
    }

    pub fn buffer_too_long(&self, lifetime: Duration) -> bool {
        self.refresh_buffer > lifetime.mul_f64(MAX_BUFFER_SHARE)
    }

    /// The delay before the next attempt after `consecutive` failures (1 for the first),
    /// `jitter` uniform in [0, 1).
    pub fn retry_delay(&self, failure: Failure, consecutive: u32, jitter: f64) -> Duration {
        match failure {
            Failure::Configuration => self.slow_retry.clamp(MIN_RETRY, MAX_SPAN),
            Failure::Transient { retry_after } => {
                let exponent = consecutive.saturating_sub(1).min(30);
                let ceiling = self
                    .backoff_initial
                    .saturating_mul(1u32 << exponent)
                    .min(self.backoff_max);
                let delay = ceiling.mul_f64(jitter.clamp(0.0, 1.0)).max(MIN_RETRY);
                let delay = match retry_after {
                    Some(asked) => delay.max(asked.min(self.slow_retry)),
                    None => delay,
                };
                delay.min(MAX_SPAN)
            }
        }
    }
}

/// Lets one forced refresh through per interval.
#[derive(Debug, Clone)]
pub struct ForceLimiter {
    interval: Duration,
    last: Option<Instant>,
}

impl ForceLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
        }
    }

    /// When the next forced refresh may go, if not at `now`.
    pub fn available_at(&self, now: Instant) -> Option<Instant> {
        let next = self.last?.checked_add(self.interval)?;
        (next > now).then_some(next)
    }

    /// True (and the slot taken) when a forced refresh may go now.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start their virtual clock at a real Instant
mod tests {
    use super::*;

    fn secs(value: u64) -> Duration {
        Duration::from_secs(value)
    }

    #[test]
    fn refresh_falls_between_50_and_60_percent_of_the_lifetime() {
        let policy = RefreshPolicy::default();
        let start = Instant::now();
        let expires = start + secs(3600);
        assert_eq!(policy.refresh_at(start, expires, 0.0), start + secs(1800));
        assert_eq!(policy.refresh_at(start, expires, 0.5), start + secs(1980));
        let latest = policy.refresh_at(start, expires, 0.999_999);
        assert!(latest <= start + secs(2160) && latest > start + secs(2159));
    }

    #[test]
    fn refresh_is_never_later_than_the_buffer_before_expiry() {
        let policy = RefreshPolicy {
            refresh_buffer: secs(40),
            ..RefreshPolicy::default()
        };
        let start = Instant::now();
        // 100 s lifetime, 40 s buffer: the 50-60 s point already comes before 60 s.
        assert!(policy.refresh_at(start, start + secs(100), 0.99) <= start + secs(60));
        // With a 45 s buffer the latest allowed moment is 55 s, earlier than the 59 s point.
        let policy = RefreshPolicy {
            refresh_buffer: secs(45),
            ..RefreshPolicy::default()
        };
        assert_eq!(
            policy.refresh_at(start, start + secs(100), 0.9),
            start + secs(55)
        );
        // A 20 s token with a 15 s buffer refreshes at 5 s, not at the 10-12 s point.
        let policy = RefreshPolicy::default();
        assert_eq!(
            policy.refresh_at(start, start + secs(20), 0.5),
            start + secs(5)
        );
    }

    #[test]
    fn buffer_longer_than_the_lifetime_keeps_the_proportional_point() {
        // A 10 s token with the default 15 s buffer: refreshing at "expiry - 15 s" would be
        // before it was even issued, so the 50-60 % point is used.
        let policy = RefreshPolicy::default();
        let start = Instant::now();
        assert!(policy.buffer_too_long(secs(10)));
        assert!(!policy.buffer_too_long(secs(17)));
        assert_eq!(
            policy.refresh_at(start, start + secs(10), 0.0),
            start + secs(5)
        );
    }

    #[test]
    fn degenerate_inputs_never_give_a_busy_loop_or_an_overflow() {
        let start = Instant::now();
        let policy = RefreshPolicy {
            slow_retry: Duration::ZERO,
            backoff_initial: Duration::ZERO,
            ..RefreshPolicy::default()
        };
        assert_eq!(
            policy.retry_delay(Failure::Configuration, 1, 0.0),
            MIN_RETRY
        );
        assert_eq!(
            policy.retry_delay(Failure::Transient { retry_after: None }, 1, 0.0),
            MIN_RETRY
        );
        // An already expired or instant-lifetime token: not before MIN_RETRY.
        assert_eq!(policy.refresh_at(start, start, 0.5), start + MIN_RETRY);
        let huge = RefreshPolicy {
            slow_retry: Duration::MAX,
            ..RefreshPolicy::default()
        };
        assert_eq!(huge.retry_delay(Failure::Configuration, 1, 0.0), MAX_SPAN);
        let _ = start + huge.retry_delay(Failure::Configuration, 1, 0.0);
    }

    #[test]
    fn transient_backoff_is_capped_exponential_with_full_jitter() {
        let policy = RefreshPolicy::default();
        let transient = Failure::Transient { retry_after: None };
        // The ceiling doubles from 1 s and stops at 60 s; jitter picks a point below it.
        let ceilings: Vec<Duration> = (1..=9)
            .map(|n| policy.retry_delay(transient, n, 0.999_999_999))
            .map(|d| Duration::from_secs(d.as_secs_f64().round() as u64))
            .collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60].map(secs));
        assert_eq!(policy.retry_delay(transient, 5, 0.5), secs(8));
        assert_eq!(policy.retry_delay(transient, 1, 0.0), MIN_RETRY);
        assert!(policy.retry_delay(transient, u32::MAX, 0.5) <= secs(60));
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_slow_retry_interval() {
        let policy = RefreshPolicy::default();
        let asked = Failure::Transient {
            retry_after: Some(secs(30)),
        };
        assert_eq!(policy.retry_delay(asked, 1, 0.5), secs(30));
        let absurd = Failure::Transient {
            retry_after: Some(secs(86_400)),
        };
        assert_eq!(policy.retry_delay(absurd, 1, 0.5), secs(300));
    }

    #[test]
    fn configuration_errors_retry_slowly() {
        let policy = RefreshPolicy::default();
        assert_eq!(
            policy.retry_delay(Failure::Configuration, 1, 0.0),
            secs(300)
        );
        assert_eq!(
            policy.retry_delay(Failure::Configuration, 50, 0.9),
            secs(300)
        );
    }

    #[test]
    fn forced_refreshes_are_rate_limited() {
        let mut limiter = ForceLimiter::new(secs(5));
        let start = Instant::now();
        assert!(limiter.try_acquire(start));
        assert!(!limiter.try_acquire(start + secs(1)));
        assert!(!limiter.try_acquire(start + Duration::from_millis(4999)));
        assert!(limiter.try_acquire(start + secs(5)));
    }

    #[test]
    fn the_limiter_says_when_the_next_forced_refresh_may_go() {
        let mut limiter = ForceLimiter::new(secs(5));
        let start = Instant::now();
        assert_eq!(limiter.available_at(start), None);
        assert!(limiter.try_acquire(start + secs(1)));
        assert_eq!(limiter.available_at(start + secs(2)), Some(start + secs(6)));
        assert!(!limiter.try_acquire(start + secs(5)));
        assert_eq!(limiter.available_at(start + secs(6)), None);
        assert!(limiter.try_acquire(start + secs(6)));
        assert_eq!(
            limiter.available_at(start + secs(6)),
            Some(start + secs(11))
        );
    }
}
