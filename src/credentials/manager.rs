//! Keeps one credential fresh (DESIGN.md item 4).
//!
//! - A single refresher task per credential talks to the [`Source`]; readers never do.
//!   [`CredentialManager::current`] is one atomic load (`arc-swap`).
//! - Expiry is measured from the monotonic time read *before* the request was sent.
//! - Refresh happens at the point [`RefreshPolicy::refresh_at`] picks; failures back off
//!   per [`RefreshPolicy::retry_delay`]; a configuration error is retried slowly and
//!   logged once per change of state, not per attempt.
//! - The current credential is served until it really expires, then `None` ("no
//!   credential"): an expired credential is never handed out.
//! - A new credential gets the next generation; the same value fetched again keeps its
//!   generation (and gets the new expiry).
//! - [`CredentialManager::force_refresh`] refreshes only while the rejected generation is
//!   still current, lets one caller through per `force_interval`, and makes every
//!   concurrent caller wait for that one attempt.
//! - [`CredentialManager::replacement`] is what a caller uses when the core refused a
//!   request: it reads the refusal by the rule of [`super::verdict`] (rotation, refusal of
//!   the request, permanent refusal) and, for a rotation, forces a refresh, waiting for
//!   the rate limit up to `resend_wait`, so no rotation schedule can fail a call.
//! - Each attempt runs in its own task, so a panicking source cannot take the refresher
//!   down with it where panics unwind (the tests); the binary makes every panic end the
//!   process instead ([`crate::fatal`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::jwt::{self, Diagnostic};
use super::schedule::{ForceLimiter, RefreshPolicy};
use super::verdict::CoreView;

mod refusals;
use super::{Credential, FetchError, Fetched, Source};

/// How long a forced refresh waits for its attempt before answering with what there is:
/// well inside the 32 s a client waits for a non-INVITE transaction (Timer F).
const FORCE_WAIT: Duration = Duration::from_secs(10);

/// The longest one attempt may take, whatever the source does (the OAuth2 source has its
/// own, shorter, request timeout).
const ATTEMPT_LIMIT: Duration = Duration::from_secs(60);

/// A credential that arrives with less life than this left is treated as a failure: using
/// it would mean asking again at once, and again.
const MIN_USEFUL_LIFETIME: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// The trunk the credential belongs to, for logs.
    pub trunk: String,
    pub organization: Option<String>,
    pub scopes: Vec<String>,
    /// JWT claim holding the organization, tried before the usual names.
    pub organization_claim: Option<String>,
    pub policy: RefreshPolicy,
    /// `exp` versus `expires_in` disagreement tolerated before warning.
    pub skew_threshold: Duration,
}

/// Counters for the metrics exporter.
#[derive(Debug, Default)]
pub struct CredentialStats {
    pub attempts: AtomicU64,
    pub refreshed: AtomicU64,
    pub transient_failures: AtomicU64,
    pub configuration_failures: AtomicU64,
    pub forced: AtomicU64,
    pub forced_coalesced: AtomicU64,
    pub forced_rate_limited: AtomicU64,
    /// Forced refreshes that waited for the rate limit to let them through.
    pub forced_waited: AtomicU64,
    /// Refusals read as a rotation (refresh and re-send).
    pub refusals_rotation: AtomicU64,
    /// Refusals of a credential the core accepted on a later request.
    pub refusals_of_the_request: AtomicU64,
    /// Refusals read as permanent (passed on at once).
    pub refusals_permanent: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CredentialStatsSnapshot {
    pub attempts: u64,
    pub refreshed: u64,
    pub transient_failures: u64,
    pub configuration_failures: u64,
    pub forced: u64,
    pub forced_coalesced: u64,
    pub forced_rate_limited: u64,
    pub forced_waited: u64,
    pub refusals_rotation: u64,
    pub refusals_of_the_request: u64,
    pub refusals_permanent: u64,
}

/// How the last refresh attempt ended, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshOutcome {
    /// Whether it brought a usable credential.
    pub succeeded: bool,
    /// `configuration` or `transient` when it failed.
    pub error_class: Option<&'static str>,
    /// What went wrong, as logged (never a secret).
    pub error: Option<String>,
    /// When it ended.
    pub at: Instant,
}

/// Point-in-time values for the metrics exporter.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CredentialGauges {
    /// Generation of the last credential obtained (0: none yet).
    pub generation: u64,
    /// Time since the request that produced it was sent.
    pub age: Option<Duration>,
    /// Time until it expires (zero once expired); `None` without a lifetime.
    pub time_to_expiry: Option<Duration>,
    /// Whether a valid credential is available now (readiness).
    pub valid: bool,
}

#[derive(Debug)]
struct ForceState {
    limiter: ForceLimiter,
    /// The generation a forced refresh was asked to replace, while it is requested or
    /// under way.
    pending: Option<u64>,
    /// The last attempt failed with a configuration error: forcing would only hammer.
    configuration_error: bool,
    /// No forced attempt before this (the backoff or `Retry-After` after a failure).
    not_before: Option<Instant>,
    /// What the core's answers showed of the generations (see [`super::verdict`]).
    view: CoreView,
}

struct Shared {
    options: ManagerOptions,
    current: ArcSwapOption<Credential>,
    /// The credential `current` replaced, served instead of it during its activation
    /// delay while still valid.
    previous: ArcSwapOption<Credential>,
    force: Mutex<ForceState>,
    wake: Notify,
    /// Counts finished attempts; forced refreshes wait on it.
    finished: watch::Sender<u64>,
    stats: CredentialStats,
    refresher_alive: AtomicBool,
    /// Whether a fetch can bring a different credential (not for `static`).
    renewable: bool,
    last_refresh: Mutex<Option<RefreshOutcome>>,
}

/// A handle to one managed credential; cheap to clone.
#[derive(Clone)]
pub struct CredentialManager {
    shared: Arc<Shared>,
    source: Arc<dyn Source>,
}

impl std::fmt::Debug for CredentialManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.shared.current.load();
        f.debug_struct("CredentialManager")
            .field("trunk", &self.shared.options.trunk)
            .field(
                "generation",
                &current.as_ref().map(|credential| credential.generation),
            )
            .field(
                "fingerprint",
                &current
                    .as_ref()
                    .map(|credential| credential.fingerprint.clone()),
            )
            .finish()
    }
}

impl CredentialManager {
    /// Starts the refresher task; the first attempt is made at once.
    pub fn start(
        source: Arc<dyn Source>,
        options: ManagerOptions,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Self {
        let shared = Self::shared(options, source.renewable());
        tracker.spawn(refresher(shared.clone(), source.clone(), cancel));
        Self { shared, source }
    }

    fn shared(options: ManagerOptions, renewable: bool) -> Arc<Shared> {
        let (finished, _) = watch::channel(0);
        Arc::new(Shared {
            previous: ArcSwapOption::empty(),
            force: Mutex::new(ForceState {
                limiter: ForceLimiter::new(options.policy.force_interval),
                pending: None,
                configuration_error: false,
                not_before: None,
                view: CoreView::default(),
            }),
            options,
            current: ArcSwapOption::empty(),
            wake: Notify::new(),
            finished,
            stats: CredentialStats::default(),
            refresher_alive: AtomicBool::new(true),
            renewable,
            last_refresh: Mutex::new(None),
        })
    }

    /// A manager without a refresher, whose credentials a test publishes itself
    /// ([`CredentialManager::publish`]): for driving the proxy's pure core.
    #[cfg(test)]
    pub(crate) fn detached(options: ManagerOptions) -> Self {
        let source = Arc::new(crate::credentials::StaticSource::new(
            crate::credentials::CredentialValue::Token(crate::credentials::Secret::new("")),
        ));
        Self {
            shared: Self::shared(options, true),
            source,
        }
    }

    /// Publishes `credential` as a refresh would (the current one becomes the previous).
    #[cfg(test)]
    pub(crate) fn publish(&self, credential: Credential) {
        self.shared.previous.store(self.shared.current.load_full());
        self.shared.current.store(Some(Arc::new(credential)));
    }

    /// The credential to use now, or `None` when there is no valid one.
    pub fn current(&self) -> Option<Arc<Credential>> {
        self.current_at(Instant::now().into_std())
    }

    /// The credential to use at `now` (the caller's clock), or `None` when there is no
    /// valid one then.
    pub fn current_at(&self, now: std::time::Instant) -> Option<Arc<Credential>> {
        let newest = self
            .shared
            .current
            .load_full()
            .filter(|credential| credential.is_valid_at(now));
        let delay = self.shared.options.policy.activation_delay;
        if let Some(newest) = newest.as_ref().filter(|_| !delay.is_zero()) {
            if now < newest.obtained + delay {
                let previous = self
                    .shared
                    .previous
                    .load_full()
                    .filter(|previous| previous.is_valid_at(now));
                if previous.is_some() {
                    return previous;
                }
            }
        }
        newest
    }

    /// How long a new credential waits before it is used (`activation_delay`).
    pub fn activation_delay(&self) -> Duration {
        self.shared.options.policy.activation_delay
    }

    /// The newest valid credential, even one still within its activation delay.
    fn newest(&self) -> Option<Arc<Credential>> {
        let now = Instant::now().into_std();
        self.shared
            .current
            .load_full()
            .filter(|credential| credential.is_valid_at(now))
    }

    pub fn trunk(&self) -> &str {
        &self.shared.options.trunk
    }

    /// Takes re-read secret material (SIGHUP); when it changed, fetches at once with it
    /// (so a new password or client secret is in use right away) and returns true.
    pub fn reload(&self, settings: &crate::config::CredentialSettings) -> bool {
        if !self.source.reload(&settings.source) {
            return false;
        }
        let current = self
            .shared
            .current
            .load()
            .as_ref()
            .map(|credential| credential.generation);
        let mut force = self.lock_force();
        if force.pending.is_none() {
            // The refresher fetches for a pending generation that is still current.
            force.pending = Some(current.unwrap_or(0));
            self.shared.wake.notify_one();
        }
        true
    }

    /// The organization the credential is asked for, if configured.
    pub fn organization(&self) -> Option<&str> {
        self.shared.options.organization.as_deref()
    }

    /// How the last refresh attempt ended (`None` before the first ended).
    pub fn last_refresh(&self) -> Option<RefreshOutcome> {
        self.shared
            .last_refresh
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn refresher_alive(&self) -> bool {
        self.shared.refresher_alive.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> CredentialStatsSnapshot {
        let stats = &self.shared.stats;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CredentialStatsSnapshot {
            attempts: load(&stats.attempts),
            refreshed: load(&stats.refreshed),
            transient_failures: load(&stats.transient_failures),
            configuration_failures: load(&stats.configuration_failures),
            forced: load(&stats.forced),
            forced_coalesced: load(&stats.forced_coalesced),
            forced_rate_limited: load(&stats.forced_rate_limited),
            forced_waited: load(&stats.forced_waited),
            refusals_rotation: load(&stats.refusals_rotation),
            refusals_of_the_request: load(&stats.refusals_of_the_request),
            refusals_permanent: load(&stats.refusals_permanent),
        }
    }

    pub fn gauges(&self) -> CredentialGauges {
        let now = Instant::now().into_std();
        match self.shared.current.load_full() {
            None => CredentialGauges::default(),
            Some(credential) => CredentialGauges {
                generation: credential.generation,
                age: Some(now.saturating_duration_since(credential.obtained)),
                time_to_expiry: credential
                    .expires
                    .map(|expires| expires.saturating_duration_since(now)),
                valid: credential.is_valid_at(now),
            },
        }
    }

    /// A receiver that ticks after every attempt, successful or not.
    pub fn attempts(&self) -> watch::Receiver<u64> {
        self.shared.finished.subscribe()
    }

    fn lock_force(&self) -> std::sync::MutexGuard<'_, ForceState> {
        lock(&self.shared.force)
    }
}

/// The force state is plain data; a panic elsewhere while holding it leaves it usable.
fn lock(mutex: &Mutex<ForceState>) -> std::sync::MutexGuard<'_, ForceState> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the refresher remembers between attempts.
#[derive(Default)]
struct RefresherMemory {
    consecutive_failures: u32,
    /// The last failure logged, so a failure that repeats is not logged again.
    last_failure: Option<String>,
    last_diagnostics: Vec<Diagnostic>,
    warned_buffer: bool,
}

/// Marks the refresher dead however it ends (returning or unwinding).
struct AliveGuard<'a>(&'a AtomicBool);

impl Drop for AliveGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

async fn refresher(shared: Arc<Shared>, source: Arc<dyn Source>, cancel: CancellationToken) {
    let _alive = AliveGuard(&shared.refresher_alive);
    let options = &shared.options;
    let organization = options.organization.as_deref().unwrap_or("-");
    let scopes = options.scopes.join(" ");
    tracing::info!(trunk = %options.trunk, organization, scopes, source = %source.describe(), "credential manager started");
    let mut changes = source.changes();
    let mut memory = RefresherMemory::default();
    let mut next_attempt = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(next_attempt) => {}
            _ = shared.wake.notified() => {
                // A permit can outlive the request that left it, and a forced refresh can
                // be overtaken by a scheduled one: fetch only for a rejection that stands.
                let stands = {
                    let mut force = lock(&shared.force);
                    let current = shared.current.load().as_ref().map(|credential| credential.generation);
                    match force.pending {
                        Some(rejected) if current.is_none_or(|current| current == rejected) => true,
                        Some(_) => {
                            force.pending = None;
                            false
                        }
                        None => false,
                    }
                };
                if !stands {
                    shared.finished.send_modify(|count| *count += 1);
                    continue;
                }
            }
            changed = wait_for_change(&mut changes) => {
                if !changed {
                    changes = None;
                    continue;
                }
            }
        }
        let forced = lock(&shared.force).pending.is_some();
        let sent_at = Instant::now();
        let wall_sent_at = SystemTime::now();
        shared.stats.attempts.fetch_add(1, Ordering::Relaxed);
        let attempt_source = source.clone();
        let attempt = tokio::spawn(async move {
            tokio::time::timeout(ATTEMPT_LIMIT, attempt_source.fetch())
                .await
                .unwrap_or_else(|_| {
                    Err(FetchError::Transient {
                        reason: format!(
                            "credential source did not answer within {ATTEMPT_LIMIT:?}"
                        ),
                        retry_after: None,
                    })
                })
        });
        let result = tokio::select! {
            _ = cancel.cancelled() => break,
            // The panic's message is not logged: it could quote what the source held.
            result = attempt => result.unwrap_or_else(|_| Err(FetchError::Transient {
                reason: "credential source panicked".into(),
                retry_after: None,
            })),
        };
        let result = result.and_then(|fetched| usable(fetched, sent_at));
        let fetched_one = result.is_ok();
        let outcome = RefreshOutcome {
            succeeded: result.is_ok(),
            error_class: result.as_ref().err().map(FetchError::class),
            error: result.as_ref().err().map(ToString::to_string),
            at: Instant::now(),
        };
        next_attempt = match result {
            Ok(fetched) => on_success(&shared, &mut memory, fetched, sent_at, wall_sent_at),
            Err(error) => on_failure(&shared, &mut memory, &error, &source.describe()),
        };
        *shared
            .last_refresh
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(outcome);
        {
            let mut force = lock(&shared.force);
            if forced {
                force.pending = None;
                // A credential fetched to replace a refused one (a new one, or the same
                // value again): if the core refuses it before taking it, the refusal is
                // permanent (see `verdict`).
                if let Some(generation) = generation_of(&shared).filter(|_| fetched_one) {
                    force.view.forced(generation);
                }
            }
        }
        shared.finished.send_modify(|count| *count += 1);
    }
    tracing::debug!(trunk = %shared.options.trunk, "credential manager stopped");
}

fn generation_of(shared: &Shared) -> Option<u64> {
    shared
        .current
        .load()
        .as_ref()
        .map(|credential| credential.generation)
}

/// Bounds a fetched lifetime and refuses a credential that is (nearly) dead on arrival.
fn usable(mut fetched: Fetched, sent_at: Instant) -> Result<Fetched, FetchError> {
    if let Some(lifetime) = fetched.lifetime {
        let lifetime = lifetime.min(super::schedule::MAX_SPAN);
        let left = (sent_at + lifetime).saturating_duration_since(Instant::now());
        if left < MIN_USEFUL_LIFETIME {
            return Err(FetchError::Transient {
                reason: format!(
                    "the credential arrived with {:.3} s of life left",
                    left.as_secs_f64()
                ),
                retry_after: None,
            });
        }
        fetched.lifetime = Some(lifetime);
    }
    Ok(fetched)
}

/// Waits for the source's change channel to tick; false when it closed (or there is none,
/// in which case it never returns).
async fn wait_for_change(changes: &mut Option<watch::Receiver<u64>>) -> bool {
    match changes {
        Some(receiver) => receiver.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

fn on_success(
    shared: &Shared,
    memory: &mut RefresherMemory,
    fetched: Fetched,
    sent_at: Instant,
    wall_sent_at: SystemTime,
) -> Instant {
    let options = &shared.options;
    let policy = &options.policy;
    memory.consecutive_failures = 0;
    {
        let mut force = lock(&shared.force);
        force.configuration_error = false;
        force.not_before = None;
    }
    if let Some(previous) = memory.last_failure.take() {
        tracing::info!(trunk = %options.trunk, previous_error = %previous, "credential source recovered");
    }
    let expires = fetched.lifetime.map(|lifetime| sent_at + lifetime);
    let previous = shared.current.load_full();
    let fingerprint = fetched.value.fingerprint();
    let unchanged = previous
        .as_ref()
        .is_some_and(|previous| previous.value == fetched.value);
    let generation = match &previous {
        Some(previous) if unchanged => previous.generation,
        Some(previous) => previous.generation + 1,
        None => 1,
    };
    let credential = Arc::new(Credential {
        value: fetched.value.clone(),
        generation,
        fingerprint: fingerprint.clone(),
        obtained: sent_at.into_std(),
        expires: expires.map(Instant::into_std),
    });
    if !unchanged {
        shared.previous.store(previous);
    }
    shared.current.store(Some(credential));
    shared.stats.refreshed.fetch_add(1, Ordering::Relaxed);
    let lifetime_seconds = fetched.lifetime.map(|lifetime| lifetime.as_secs());
    if unchanged {
        tracing::debug!(trunk = %options.trunk, generation, fingerprint, expires_in_seconds = ?lifetime_seconds, "credential unchanged");
    } else {
        tracing::info!(trunk = %options.trunk, generation, fingerprint, expires_in_seconds = ?lifetime_seconds, "credential refreshed");
    }
    report_diagnostics(options, memory, &fetched, wall_sent_at);
    match expires {
        Some(expires) => {
            let lifetime = expires - sent_at;
            if policy.buffer_too_long(lifetime) && !memory.warned_buffer {
                memory.warned_buffer = true;
                tracing::warn!(
                    trunk = %options.trunk,
                    lifetime_seconds = lifetime.as_secs_f64(),
                    refresh_buffer_seconds = policy.refresh_buffer.as_secs_f64(),
                    "refresh_buffer is more than 90 % of the credential lifetime; refreshing at 50-60 % of the lifetime instead"
                );
            }
            let at = policy.refresh_at(
                sent_at.into_std(),
                expires.into_std(),
                rand::random::<f64>(),
            );
            Instant::from_std(at)
        }
        // Valid until replaced: only a change notification (or a force) brings news.
        None => Instant::now() + Duration::from_secs(365 * 24 * 3600),
    }
}

fn on_failure(
    shared: &Shared,
    memory: &mut RefresherMemory,
    error: &FetchError,
    source: &str,
) -> Instant {
    let options = &shared.options;
    memory.consecutive_failures = memory.consecutive_failures.saturating_add(1);
    let counter = match error {
        FetchError::Configuration { .. } => &shared.stats.configuration_failures,
        FetchError::Transient { .. } => &shared.stats.transient_failures,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let delay = options.policy.retry_delay(
        error.failure(),
        memory.consecutive_failures,
        rand::random::<f64>(),
    );
    {
        let mut force = lock(&shared.force);
        force.configuration_error = matches!(error, FetchError::Configuration { .. });
        force.not_before = Some(Instant::now() + delay);
    }
    let summary = error.state_key();
    let still_valid = shared
        .current
        .load()
        .as_ref()
        .is_some_and(|credential| credential.is_valid_at(Instant::now().into_std()));
    if memory.last_failure.as_deref() != Some(summary.as_str()) {
        let organization = options.organization.as_deref().unwrap_or("-");
        let scopes = options.scopes.join(" ");
        match error {
            FetchError::Configuration { .. } => tracing::error!(
                trunk = %options.trunk, organization, scopes, source, error = %error,
                retry_in_seconds = delay.as_secs_f64(),
                "credential request rejected: configuration problem (client id, secret, scopes or organization)"
            ),
            FetchError::Transient { .. } => tracing::warn!(
                trunk = %options.trunk, organization, source, error = %error, still_valid,
                retry_in_seconds = delay.as_secs_f64(),
                "credential refresh failed; retrying with backoff"
            ),
        }
        memory.last_failure = Some(summary);
    } else {
        tracing::debug!(trunk = %options.trunk, error = %error, attempt = memory.consecutive_failures, "credential refresh failed again");
    }
    Instant::now() + delay
}

fn report_diagnostics(
    options: &ManagerOptions,
    memory: &mut RefresherMemory,
    fetched: &Fetched,
    wall_sent_at: SystemTime,
) {
    let Some(reading) = jwt::read_token(
        fetched,
        wall_sent_at,
        options.organization.as_deref(),
        options.organization_claim.as_deref(),
        &options.scopes,
        i64::try_from(options.skew_threshold.as_secs()).unwrap_or(i64::MAX),
    ) else {
        return;
    };
    let found = reading.diagnostics;
    if found != memory.last_diagnostics {
        for diagnostic in &found {
            tracing::warn!(trunk = %options.trunk, diagnostic = %diagnostic, "credential diagnostic");
        }
        memory.last_diagnostics = found;
    }
}
