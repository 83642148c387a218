//! How a credential manager answers the core's refusals (DESIGN.md item 6): the one rule
//! of [`crate::credentials::verdict`] applied, forced refreshes started, coalesced and
//! rate-limited, and waits for the rate limit bounded by the caller's deadline. The
//! refresher itself (in the parent module) carries the attempts out.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{CredentialManager, FORCE_WAIT};
use crate::credentials::verdict::Reading;
use crate::credentials::Credential;

impl CredentialManager {
    /// How long a caller may wait for a replacement credential (`resend_wait`).
    pub fn resend_wait(&self) -> Duration {
        self.shared.options.policy.resend_wait
    }

    /// The core accepted a request carrying `generation` that was sent at `sent_at`.
    pub fn note_accepted(&self, generation: u64, sent_at: std::time::Instant) {
        self.lock_force().view.accepted(generation, sent_at);
    }

    /// Whether the core's refusals are read as permanent now (a credential fetched to
    /// replace a refused one was refused too, and none was accepted since).
    pub fn core_refusing(&self) -> bool {
        self.lock_force().view.is_refusing()
    }

    /// Waits until a valid credential is at hand, at most until `deadline`.
    pub async fn wait_valid(&self, deadline: Instant) -> Option<Arc<Credential>> {
        let mut finished = self.shared.finished.subscribe();
        let valid = finished.wait_for(|_| self.current().is_some());
        // Past the deadline the caller goes on without; the refresher carries on.
        let _ = tokio::time::timeout_at(deadline, valid).await;
        self.current()
    }

    /// The core refused a request that carried generation `rejected` and was sent at
    /// `sent_at` (DESIGN.md item 6). Returns the credential to re-send it with, or `None`
    /// when the refusal should go to the Edge:
    ///
    /// - a newer credential at hand, or `rejected` itself once its activation delay has
    ///   passed: that one, at once;
    /// - a refusal read as one of the request ([`super::verdict`]): `None` at once;
    /// - a permanent refusal: a forced refresh only if the rate limit allows one now (so
    ///   a repaired configuration is picked up), never a wait for it;
    /// - a rotation: a forced refresh, waiting for the rate limit (or the backoff after
    ///   a failed attempt) until `deadline` at most, then the newest credential.
    ///
    /// Callers give `deadline` as when the request reached the sidecar plus
    /// [`CredentialManager::resend_wait`], so every wait of one request together stays
    /// within it.
    pub async fn replacement(
        &self,
        rejected: u64,
        sent_at: std::time::Instant,
        deadline: Instant,
    ) -> Option<Arc<Credential>> {
        match self.without_fetching(rejected, Some(deadline)).await {
            Early::Use(credential) => return Some(credential),
            Early::PassOn => return None,
            Early::Fetch => {}
        }
        if !self.shared.renewable {
            return None;
        }
        let reading = self.lock_force().view.refused(rejected, sent_at);
        let stats = &self.shared.stats;
        let counter = match reading {
            Reading::Rotation => &stats.refusals_rotation,
            Reading::RequestRefused => &stats.refusals_of_the_request,
            Reading::Permanent => &stats.refusals_permanent,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(trunk = %self.shared.options.trunk, generation = rejected, reading = reading.as_str(), "core refused the credential");
        match reading {
            Reading::RequestRefused => None,
            // No waiting for the rate limit: a refresh only when it is allowed now (so a
            // repaired configuration is picked up), else the refusal goes on at once.
            Reading::Permanent => self.refresh_for(rejected, None).await,
            Reading::Rotation => self.refresh_for(rejected, Some(deadline)).await,
        }
    }

    /// The core rejected generation `rejected`: get a newer credential if one can be had
    /// now, without waiting for the rate limit. Returns the newest credential afterwards,
    /// even one still within its activation delay (which may still be `rejected` when
    /// the source handed out the same value, or when `rejected` was itself within its
    /// delay and is offered again after it; `None` when there is none).
    pub async fn force_refresh(&self, rejected: u64) -> Option<Arc<Credential>> {
        match self.without_fetching(rejected, None).await {
            Early::Use(credential) => Some(credential),
            Early::PassOn => self.newest(),
            Early::Fetch => self.refresh_for(rejected, None).await,
        }
    }

    /// What answers a rejection of `rejected` without a fetch: a newer credential, or
    /// `rejected` itself once its activation delay has passed (by `deadline`, if any).
    async fn without_fetching(&self, rejected: u64, deadline: Option<Instant>) -> Early {
        // A newer credential in its activation delay is used at once when the one served
        // meanwhile is rejected.
        let Some(newest) = self.newest() else {
            return Early::Fetch;
        };
        if newest.generation != rejected {
            return Early::Use(newest);
        }
        // The rejected credential is the newest and still within its activation delay:
        // it may not have propagated yet, and neither would another one. Offer it again
        // once the delay has passed instead of fetching; a delay that outlasts the
        // caller's wait means the rejection goes on.
        let delay = self.shared.options.policy.activation_delay;
        let active_at = Instant::from_std(newest.obtained + delay);
        if !delay.is_zero() && Instant::now() < active_at {
            if deadline.is_some_and(|deadline| active_at > deadline) {
                return Early::PassOn;
            }
            tokio::time::sleep_until(active_at).await;
            return Early::Use(newest);
        }
        Early::Fetch
    }

    /// Forces a refresh replacing `rejected`; with a `deadline`, waits for the rate limit
    /// or a backoff that ends before it instead of giving up.
    async fn refresh_for(
        &self,
        rejected: u64,
        deadline: Option<Instant>,
    ) -> Option<Arc<Credential>> {
        let stats = &self.shared.stats;
        let mut finished = self.shared.finished.subscribe();
        let mut waited = false;
        loop {
            match self.start_forced(rejected) {
                Start::Newer => return self.newest(),
                Start::Started | Start::Joined => break,
                Start::Busy => {
                    // Another forced attempt is under way: its end may bring what we need.
                    let limit = deadline.unwrap_or_else(|| Instant::now() + FORCE_WAIT);
                    if tokio::time::timeout_at(limit, finished.changed())
                        .await
                        .is_err()
                    {
                        return self.newest();
                    }
                }
                Start::Blocked { until } => match (deadline, until) {
                    (Some(deadline), Some(until)) if until <= deadline => {
                        if !waited {
                            waited = true;
                            stats.forced_waited.fetch_add(1, Ordering::Relaxed);
                        }
                        // A scheduled refresh may bring a newer credential meanwhile.
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => {}
                            _ = finished.changed() => {}
                        }
                    }
                    _ => {
                        stats.forced_rate_limited.fetch_add(1, Ordering::Relaxed);
                        return self.newest();
                    }
                },
            }
        }
        let wait = finished
            .wait_for(|_| self.has_newer(rejected) || self.lock_force().pending != Some(rejected));
        // Past the limit, answer with what there is; the refresher carries on.
        let limit = Instant::now() + FORCE_WAIT;
        let limit = deadline.map_or(limit, |deadline| deadline.min(limit));
        let _ = tokio::time::timeout_at(limit, wait).await;
        self.newest()
    }

    /// Whether the current credential is another than `rejected` (generations only grow).
    fn has_newer(&self, rejected: u64) -> bool {
        self.shared
            .current
            .load()
            .as_ref()
            .is_some_and(|credential| credential.generation != rejected)
    }

    /// Asks the refresher for an attempt replacing `rejected`, if the rules allow one now.
    fn start_forced(&self, rejected: u64) -> Start {
        let now = Instant::now();
        let stats = &self.shared.stats;
        if self.has_newer(rejected) {
            return Start::Newer;
        }
        let mut force = self.lock_force();
        if force.pending == Some(rejected) {
            stats.forced_coalesced.fetch_add(1, Ordering::Relaxed);
            return Start::Joined;
        }
        if force.pending.is_some() {
            return Start::Busy;
        }
        if force.configuration_error {
            return Start::Blocked { until: None };
        }
        let limited = force
            .limiter
            .available_at(now.into_std())
            .map(Instant::from_std);
        let backing_off = force.not_before.filter(|not_before| now < *not_before);
        if let Some(until) = limited.max(backing_off) {
            return Start::Blocked { until: Some(until) };
        }
        if !force.limiter.try_acquire(now.into_std()) {
            return Start::Blocked { until: None };
        }
        force.pending = Some(rejected);
        stats.forced.fetch_add(1, Ordering::Relaxed);
        self.shared.wake.notify_one();
        Start::Started
    }
}

/// What answers a rejection before any fetch.
enum Early {
    Use(Arc<Credential>),
    PassOn,
    Fetch,
}

/// What asking for a forced attempt led to.
enum Start {
    /// A credential newer than the rejected one is there already.
    Newer,
    /// An attempt for this rejection was requested now.
    Started,
    /// An attempt for this rejection is already under way.
    Joined,
    /// An attempt for another rejection is under way.
    Busy,
    /// Not allowed now: the rate limit or a backoff ends at `until`; a configuration
    /// error (or a clock that refuses) ends never.
    Blocked { until: Option<Instant> },
}
