//! The credential manager against the simulated token endpoint (and a scripted source for
//! the exact-timing cases), in tokio's paused clock where timing matters. Every test runs
//! under a TRACE-level log capture and finally asserts that neither the client secret nor
//! any token the endpoint issued appears in it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use byoc_sidecar::credentials::file::{FileFormat, FileSource};
use byoc_sidecar::credentials::oauth2::{ClientAuth, OAuth2Settings, OAuth2Source};
use byoc_sidecar::credentials::schedule::RefreshPolicy;
use byoc_sidecar::credentials::{
    Credential, CredentialManager, CredentialValue, FetchError, FetchFuture, Fetched,
    ManagerOptions, Secret, Source,
};
use byoc_sidecar::sim::idp::{Fault, Idp, TokenKind};
use common::sim::SimIdp;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const CLIENT_SECRET: &str = "client-secret-that-must-never-be-logged-7f3a";

// ---- log capture -------------------------------------------------------------------

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("one global subscriber per test binary");
        buffer
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned()
}

/// The capture holds neither the secret nor any token `idp` issued.
fn assert_nothing_leaked(idp: Option<&Idp>, secrets: &[&str]) {
    let text = logs();
    // The capture works: it holds the manager's own lines, fingerprints included.
    assert!(
        text.contains("credential manager started"),
        "log capture is empty"
    );
    for secret in secrets {
        assert!(!text.contains(secret), "a secret appeared in the logs");
    }
    for issued in idp.map(Idp::issued).unwrap_or_default() {
        assert!(
            !text.contains(&issued.token),
            "an issued token appeared in the logs"
        );
        // Not even the random part of it.
        let tail = &issued.token[issued.token.len() - 16..];
        assert!(
            !text.contains(tail),
            "part of an issued token appeared in the logs"
        );
    }
}

// ---- set-up ------------------------------------------------------------------------

struct Fixture {
    idp: Idp,
    /// Keeps the endpoint running as long as the fixture.
    _sim: SimIdp,
    manager: CredentialManager,
    cancel: CancellationToken,
}

fn policy() -> RefreshPolicy {
    RefreshPolicy {
        refresh_buffer: Duration::from_secs(15),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(8),
        slow_retry: Duration::from_secs(60),
        force_interval: Duration::from_secs(5),
        activation_delay: Duration::ZERO,
        resend_wait: Duration::from_secs(8),
    }
}

async fn fixture(
    ttl: Duration,
    secret: &str,
    organization: &str,
    policy: RefreshPolicy,
) -> Fixture {
    log_buffer();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let sim = SimIdp::start("edge-a", CLIENT_SECRET, "org-a", ttl, TokenKind::Jwt).await;
    let idp = sim.idp.clone();
    let source = OAuth2Source::new(OAuth2Settings {
        token_url: idp.url(),
        client_id: "edge-a".into(),
        client_secret: Secret::new(secret),
        scopes: vec!["trunk:write".into()],
        organization: Some(organization.into()),
        organization_header: "X-Genesys-Organization".into(),
        client_auth: ClientAuth::Basic,
        extra_params: vec![],
        request_timeout: Duration::from_secs(2),
        default_lifetime: Duration::from_secs(300),
    })
    .unwrap();
    let manager =
        CredentialManager::start(Arc::new(source), options(policy), cancel.clone(), &tracker);
    Fixture {
        idp,
        _sim: sim,
        manager,
        cancel,
    }
}

fn options(policy: RefreshPolicy) -> ManagerOptions {
    ManagerOptions {
        trunk: "org-a-trunk".into(),
        organization: Some("org-a".into()),
        scopes: vec!["trunk:write".into()],
        organization_claim: None,
        policy,
        skew_threshold: Duration::from_secs(30),
    }
}

/// Waits (in whatever clock runs) until `attempts` more attempts finished.
async fn attempts_finished(manager: &CredentialManager, count: u64) {
    attempts_finished_from(manager.attempts(), count).await;
}

async fn first_credential(manager: &CredentialManager) -> u64 {
    let mut attempts = manager.attempts();
    tokio::time::timeout(
        Duration::from_secs(10),
        attempts.wait_for(|_| manager.current().is_some()),
    )
    .await
    .expect("a first credential")
    .unwrap();
    manager.current().unwrap().generation
}

// ---- forced refresh ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_forced_refreshes_make_one_token_request() {
    let fixture = fixture(Duration::from_secs(3600), CLIENT_SECRET, "org-a", policy()).await;
    let generation = first_credential(&fixture.manager).await;
    let before = fixture.idp.requests();
    let calls: Vec<_> = (0..1000)
        .map(|_| {
            let manager = fixture.manager.clone();
            tokio::spawn(async move { manager.force_refresh(generation).await })
        })
        .collect();
    for call in calls {
        let credential = call
            .await
            .unwrap()
            .expect("a credential after the forced refresh");
        assert_eq!(credential.generation, generation + 1);
    }
    assert_eq!(
        fixture.idp.requests(),
        before + 1,
        "exactly one token request"
    );
    let stats = fixture.manager.stats();
    assert_eq!(stats.forced, 1);
    assert_eq!(
        stats.forced_coalesced + stats.forced_rate_limited + stats.forced,
        1000 - already_newer(&stats)
    );

    // The rejected generation is history now: no request, the current one comes back.
    let current = fixture.manager.force_refresh(generation).await.unwrap();
    assert_eq!(current.generation, generation + 1);
    assert_eq!(fixture.idp.requests(), before + 1);

    // Rejecting the new one within the rate-limit interval makes no request either.
    let limited = fixture.manager.force_refresh(generation + 1).await.unwrap();
    assert_eq!(limited.generation, generation + 1);
    assert_eq!(fixture.idp.requests(), before + 1);
    assert_eq!(
        fixture.manager.stats().forced_rate_limited,
        stats.forced_rate_limited + 1
    );
    fixture.cancel.cancel();
    assert_nothing_leaked(Some(&fixture.idp), &[CLIENT_SECRET]);
}

/// Callers that arrived after the new generation was published return at once and are
/// in no counter.
fn already_newer(stats: &byoc_sidecar::credentials::manager::CredentialStatsSnapshot) -> u64 {
    1000 - stats.forced - stats.forced_coalesced - stats.forced_rate_limited
}

// ---- outages -----------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn outage_of_five_lifetimes_serves_the_token_until_expiry_then_none_and_recovers() {
    let ttl = Duration::from_secs(60);
    let fixture = fixture(ttl, CLIENT_SECRET, "org-a", policy()).await;
    let generation = first_credential(&fixture.manager).await;
    let credential = fixture.manager.current().unwrap();
    let expires = tokio::time::Instant::from_std(credential.expires.unwrap());
    fixture.idp.set_fault(Some(Fault::Status {
        code: 503,
        retry_after: None,
    }));
    let outage_end = tokio::time::Instant::now() + ttl * 5;

    // Walk through the outage in 250 ms steps of virtual time.
    let mut saw_none = false;
    while tokio::time::Instant::now() < outage_end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = tokio::time::Instant::now();
        match fixture.manager.current() {
            Some(current) => {
                assert!(now < expires, "an expired credential was served");
                assert_eq!(current.generation, generation);
            }
            None => {
                assert!(now >= expires, "credential withdrawn before it expired");
                saw_none = true;
            }
        }
        assert!(fixture.manager.refresher_alive());
    }
    assert!(saw_none);
    let failures = fixture.manager.stats().transient_failures;
    assert!(failures >= 30, "retried throughout the outage: {failures}");

    fixture.idp.set_fault(None);
    let recovered_at = tokio::time::Instant::now();
    let mut attempts = fixture.manager.attempts();
    attempts
        .wait_for(|_| fixture.manager.current().is_some())
        .await
        .unwrap();
    assert!(
        recovered_at.elapsed() <= policy().backoff_max,
        "fresh token within one backoff step"
    );
    assert_eq!(
        fixture.manager.current().unwrap().generation,
        generation + 1
    );
    assert!(fixture.manager.refresher_alive());
    fixture.cancel.cancel();
    assert_nothing_leaked(Some(&fixture.idp), &[CLIENT_SECRET]);
}

#[tokio::test(start_paused = true)]
async fn unusable_answers_are_transient_and_retry_after_is_honoured() {
    let fixture = fixture(Duration::from_secs(3600), CLIENT_SECRET, "org-a", policy()).await;
    fixture.idp.push_faults([
        Fault::EmptyBody,
        Fault::Garbage,
        Fault::Drop,
        Fault::Delay(Duration::from_secs(10)), // beyond the 2 s request timeout
        Fault::Status {
            code: 429,
            retry_after: Some(20),
        },
    ]);
    let mut attempts = fixture.manager.attempts();
    let mut finished_at = Vec::new();
    let start = tokio::time::Instant::now();
    while finished_at.len() < 6 {
        attempts.changed().await.unwrap();
        finished_at.push(start.elapsed());
    }
    let stats = fixture.manager.stats();
    assert_eq!(
        (
            stats.transient_failures,
            stats.configuration_failures,
            stats.refreshed
        ),
        (5, 0, 1)
    );
    assert!(fixture.manager.current().is_some());
    // The attempt after the 429 came no sooner than its Retry-After of 20 s.
    assert!(
        finished_at[5] - finished_at[4] >= Duration::from_secs(20),
        "{finished_at:?}"
    );
    assert!(
        finished_at[5] - finished_at[4] < Duration::from_secs(21),
        "{finished_at:?}"
    );
    fixture.cancel.cancel();
    assert_nothing_leaked(Some(&fixture.idp), &[CLIENT_SECRET]);
}

// ---- configuration errors ------------------------------------------------------------

async fn configuration_error_story(secret: &str, organization: &str, expected: &str) {
    let fixture = fixture(Duration::from_secs(3600), secret, organization, policy()).await;
    attempts_finished(&fixture.manager, 1).await;
    let start = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(200)).await;
    // Attempts at 0, 60, 120, 180 s: one per slow-retry interval.
    let stats = fixture.manager.stats();
    assert_eq!(stats.configuration_failures, 4, "{stats:?}");
    assert_eq!(fixture.idp.requests(), 4);
    assert!(fixture.manager.current().is_none());
    // Forcing does not hammer a misconfigured endpoint.
    assert!(fixture.manager.force_refresh(0).await.is_none());
    assert_eq!(fixture.idp.requests(), 4);
    assert!(start.elapsed() >= Duration::from_secs(200));
    fixture.cancel.cancel();

    let text = logs();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("configuration problem") && line.contains(expected))
        .collect();
    assert_eq!(lines.len(), 1, "logged once per state change: {lines:#?}");
    for needle in [
        "org-a-trunk",
        "organization=\"org-a\"",
        "scopes=\"trunk:write\"",
    ] {
        assert!(
            lines[0].contains(needle),
            "{needle} missing from {}",
            lines[0]
        );
    }
    assert_nothing_leaked(Some(&fixture.idp), &[CLIENT_SECRET, secret]);
}

#[tokio::test(start_paused = true)]
async fn invalid_client_is_a_configuration_error_retried_slowly_and_logged_once() {
    configuration_error_story("wrong-secret-value-0b1d", "org-a", "invalid_client").await;
}

#[tokio::test(start_paused = true)]
async fn wrong_organization_gets_invalid_scope_retried_slowly_and_logged_once() {
    // A separate client so the two stories' log lines stay apart.
    configuration_error_story(CLIENT_SECRET, "org-b", "invalid_scope").await;
}

// ---- scripted source: exact schedule ---------------------------------------------------

struct Scripted {
    lifetime: Duration,
    serial: Mutex<u64>,
}

impl Source for Scripted {
    fn fetch(&self) -> FetchFuture<'_> {
        let mut serial = self.serial.lock().unwrap();
        *serial += 1;
        let value = CredentialValue::Token(Secret::new(format!("scripted-{serial}")));
        let lifetime = self.lifetime;
        Box::pin(async move {
            Ok::<_, FetchError>(Fetched {
                value,
                lifetime: Some(lifetime),
                granted_scopes: None,
            })
        })
    }
    fn describe(&self) -> String {
        "scripted".into()
    }
}

#[tokio::test(start_paused = true)]
async fn proactive_refresh_happens_between_50_and_60_percent_of_the_lifetime() {
    log_buffer();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let source = Arc::new(Scripted {
        lifetime: Duration::from_secs(1000),
        serial: Mutex::new(0),
    });
    let manager = CredentialManager::start(source, options(policy()), cancel.clone(), &tracker);
    first_credential(&manager).await;
    let start = tokio::time::Instant::now();
    let mut previous = start;
    for generation in 2..=6 {
        let mut attempts = manager.attempts();
        attempts.changed().await.unwrap();
        let now = tokio::time::Instant::now();
        let gap = now - previous;
        assert!(
            gap >= Duration::from_secs(500) && gap <= Duration::from_secs(600),
            "refresh after {gap:?}"
        );
        assert_eq!(manager.current().unwrap().generation, generation);
        previous = now;
    }
    let debug = format!("{:?} {:?}", manager, manager.current());
    assert!(
        !debug.contains("scripted-"),
        "Debug output shows the token: {debug}"
    );
    cancel.cancel();
}

// ---- file source -----------------------------------------------------------------------

async fn file_manager(
    path: &std::path::Path,
    format: FileFormat,
) -> (CredentialManager, CancellationToken) {
    log_buffer();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let source = FileSource::start(
        path.to_path_buf(),
        format,
        Duration::from_millis(250),
        cancel.clone(),
        &tracker,
    );
    let manager = CredentialManager::start(
        Arc::new(source),
        options(policy()),
        cancel.clone(),
        &tracker,
    );
    (manager, cancel)
}

/// Waits (real time) until the generation reaches `generation`; returns how long it took.
async fn generation_reached(manager: &CredentialManager, generation: u64) -> Duration {
    let start = tokio::time::Instant::now();
    while manager.current().map(|credential| credential.generation) != Some(generation) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "generation {generation} never came"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_rewritten_in_place_or_swapped_by_rename_or_symlink_is_picked_up_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    // Kubernetes-style: token -> ..data/token, ..data -> a timestamped directory.
    let version = |name: &str, token: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("token"), token).unwrap();
    };
    version("v1", "file-token-one-5d2c");
    std::os::unix::fs::symlink("v1", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", dir.path().join("token")).unwrap();
    let path = dir.path().join("token");
    let (manager, cancel) = file_manager(&path, FileFormat::Token).await;
    generation_reached(&manager, 1).await;

    // 1. In place, through the links.
    std::fs::write(dir.path().join("v1/token"), "file-token-two-88af\n").unwrap();
    assert!(generation_reached(&manager, 2).await < Duration::from_secs(1));
    // 2. Atomic symlink swap, the way kubelet updates a secret volume.
    version("v2", "file-token-three-19e0");
    std::os::unix::fs::symlink("v2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    assert!(generation_reached(&manager, 3).await < Duration::from_secs(1));
    // 3. Atomic rename of a new file over the old one.
    let plain = dir.path().join("plain");
    std::fs::write(&plain, "alice\nfirst-password-a1\n").unwrap();
    let (userpass, cancel_userpass) = file_manager(&plain, FileFormat::UsernamePassword).await;
    generation_reached(&userpass, 1).await;
    std::fs::write(dir.path().join("plain.new"), "alice\nsecond-password-b2\n").unwrap();
    std::fs::rename(dir.path().join("plain.new"), &plain).unwrap();
    assert!(generation_reached(&userpass, 2).await < Duration::from_secs(1));
    match &userpass.current().unwrap().value {
        CredentialValue::UserPassword { username, password } => {
            assert_eq!(username, "alice");
            assert_eq!(password.expose(), "second-password-b2");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Touching without changing the content is not a new credential.
    std::fs::write(&plain, "alice\nsecond-password-b2\n").unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(userpass.current().unwrap().generation, 2);
    cancel.cancel();
    cancel_userpass.cancel();
    assert_nothing_leaked(
        None,
        &[
            "file-token-one-5d2c",
            "file-token-two-88af",
            "file-token-three-19e0",
            "first-password-a1",
            "second-password-b2",
        ],
    );
}

// ---- wiring ------------------------------------------------------------------------------

/// A trunk with `[trunk.credentials]` gets a running manager when the proxy starts, and its
/// gauges describe the token it fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_starts_a_manager_per_trunk_credential() {
    log_buffer();
    let sim = SimIdp::start(
        "edge-b",
        CLIENT_SECRET,
        "org-b",
        Duration::from_secs(600),
        TokenKind::Opaque,
    )
    .await;
    let idp = &sim.idp;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[edge]\nlisten = [\"udp:127.0.0.1:0\"]\n[core_side]\nlisten = [\"udp:127.0.0.1:0\"]\n[[trunk]]\n\
         name = \"org-b\"\nedge = \"udp:127.0.0.1:9\"\ncore = \"udp:127.0.0.1:9\"\n{}",
        sim.credentials_toml(dir.path(), "scopes = [\"trunk:write\"]\n")
    );
    let settings = byoc_sidecar::config::Config::from_toml(&text, "t")
        .unwrap()
        .validate()
        .unwrap();
    let root = CancellationToken::new();
    let app = byoc_sidecar::proxy::App::start(settings, &root)
        .await
        .unwrap();
    let manager = app
        .credentials
        .get("org-b")
        .expect("a manager for the trunk")
        .clone();
    first_credential(&manager).await;
    let gauges = manager.gauges();
    assert_eq!(gauges.generation, 1);
    assert!(gauges.valid);
    assert!(gauges.time_to_expiry.unwrap() > Duration::from_secs(590));
    assert_eq!(idp.tokens_issued(), 1);
    assert!(app.shutdown(Duration::from_secs(5)).await);
    assert_nothing_leaked(Some(idp), &[CLIENT_SECRET]);
}

struct WrongOrgJwt;

impl Source for WrongOrgJwt {
    fn fetch(&self) -> FetchFuture<'_> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // Claims 10 minutes more life than expires_in says, for another organization,
        // without one of the configured scopes.
        let token = byoc_sidecar::credentials::jwt::encode_unverified(
            &serde_json::json!({"org_id": "org-x", "scope": "trunk:read", "iat": now, "exp": now + 3600 + 600}),
            "diagnostic-signature-4c1e",
        );
        Box::pin(async move {
            Ok::<_, FetchError>(Fetched {
                value: CredentialValue::Token(Secret::new(token)),
                lifetime: Some(Duration::from_secs(3600)),
                granted_scopes: None,
            })
        })
    }
    fn describe(&self) -> String {
        "wrong-org jwt".into()
    }
}

#[tokio::test(start_paused = true)]
async fn jwt_claims_are_diagnosed_once_without_verifying_the_token() {
    log_buffer();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let mut options = options(policy());
    options.trunk = "diagnosed-trunk".into();
    options.scopes = vec!["trunk:read".into(), "trunk:write".into()];
    let manager =
        CredentialManager::start(Arc::new(WrongOrgJwt), options, cancel.clone(), &tracker);
    first_credential(&manager).await;
    let generation = manager.current().unwrap().generation;
    // A forced refresh gets the same diagnostics: they are not logged again.
    manager.force_refresh(generation).await;
    cancel.cancel();
    let text = logs();
    let diagnostics: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("credential diagnostic") && line.contains("diagnosed-trunk"))
        .collect();
    assert_eq!(diagnostics.len(), 3, "{diagnostics:#?}");
    assert!(diagnostics.iter().any(
        |line| line.contains("issued for organization \\\"org-x\\\"") || line.contains("org-x")
    ));
    assert!(diagnostics
        .iter()
        .any(|line| line.contains("lacks configured scopes: trunk:write")));
    assert!(diagnostics.iter().any(|line| line.contains("by 600 s")));
    assert!(
        !text.contains("diagnostic-signature-4c1e"),
        "the token leaked"
    );
}

// ---- robustness ------------------------------------------------------------------------

/// What one fetch does: how long it takes, and the lifetime it yields or a failure.
type Step = Box<dyn Fn(u64) -> (Duration, Result<Duration, ()>) + Send + Sync>;

/// A source whose every fetch is decided by a function of the fetch number (1-based).
struct Steps {
    fetches: Arc<std::sync::atomic::AtomicU64>,
    step: Step,
}

impl Source for Steps {
    fn fetch(&self) -> FetchFuture<'_> {
        let number = self
            .fetches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let (delay, outcome) = (self.step)(number);
        if number == 1 && delay == Duration::MAX {
            panic!("scripted panic holding step-secret-9a1f");
        }
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            match outcome {
                Ok(lifetime) => Ok(Fetched {
                    value: CredentialValue::Token(Secret::new(format!("step-token-{number}"))),
                    lifetime: Some(lifetime),
                    granted_scopes: None,
                }),
                Err(()) => Err(FetchError::Transient {
                    reason: "scripted failure".into(),
                    retry_after: Some(Duration::from_secs(100)),
                }),
            }
        })
    }
    fn describe(&self) -> String {
        "steps".into()
    }
}

fn steps(
    policy: RefreshPolicy,
    step: impl Fn(u64) -> (Duration, Result<Duration, ()>) + Send + Sync + 'static,
) -> (
    CredentialManager,
    Arc<std::sync::atomic::AtomicU64>,
    CancellationToken,
) {
    log_buffer();
    let fetches = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cancel = CancellationToken::new();
    let source = Steps {
        fetches: fetches.clone(),
        step: Box::new(step),
    };
    let manager = CredentialManager::start(
        Arc::new(source),
        options(policy),
        cancel.clone(),
        &TaskTracker::new(),
    );
    (manager, fetches, cancel)
}

fn fetched(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn a_panicking_source_does_not_kill_the_refresher() {
    let (manager, _fetches, cancel) =
        steps(policy(), |_| (Duration::MAX, Ok(Duration::from_secs(600))));
    // The first fetch panics; the next one, after a backoff, succeeds.
    let (manager2, fetches2, cancel2) = steps(policy(), |number| {
        if number == 1 {
            (Duration::MAX, Ok(Duration::from_secs(600)))
        } else {
            (Duration::ZERO, Ok(Duration::from_secs(600)))
        }
    });
    first_credential(&manager2).await;
    assert!(manager2.refresher_alive());
    assert_eq!(fetched(&fetches2), 2);
    assert!(manager.refresher_alive());
    let text = logs();
    assert!(text.contains("credential source panicked"));
    assert!(
        !text.contains("step-secret-9a1f"),
        "the panic message reached the log"
    );
    cancel.cancel();
    cancel2.cancel();
}

/// A forced refresh overtaken by a scheduled one that already replaced the rejected
/// generation makes no request of its own.
#[tokio::test(start_paused = true)]
async fn forced_refresh_overtaken_by_a_scheduled_one_makes_no_extra_request() {
    let policy = RefreshPolicy {
        refresh_buffer: Duration::from_secs(8),
        ..policy()
    };
    // Each fetch takes 1 s; tokens live 10 s, so with an 8 s buffer a refresh starts 2 s
    // after each request was sent.
    let (manager, fetches, cancel) = steps(policy, |_| {
        (Duration::from_secs(1), Ok(Duration::from_secs(10)))
    });
    let start = tokio::time::Instant::now();
    first_credential(&manager).await; // t = 1 s, generation 1
    tokio::time::sleep_until(start + Duration::from_millis(2500)).await; // fetch 2 in flight
    assert_eq!(fetched(&fetches), 2);
    let after = manager.force_refresh(1).await.unwrap(); // returns when fetch 2 lands (t = 3)
    assert_eq!(after.generation, 2);
    // The next scheduled refresh is due at t = 4 s (fetch 2 was sent at 2 s); before it,
    // nothing may fetch.
    tokio::time::sleep_until(start + Duration::from_millis(3900)).await;
    assert_eq!(
        fetched(&fetches),
        2,
        "the stale forced refresh fetched anyway"
    );
    assert_eq!(manager.stats().forced, 1);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn forcing_during_backoff_makes_no_request() {
    let (manager, fetches, cancel) = steps(policy(), |number| {
        if number == 1 {
            (Duration::ZERO, Ok(Duration::from_secs(3600)))
        } else {
            (Duration::ZERO, Err(()))
        }
    });
    let generation = first_credential(&manager).await;
    // A forced refresh fails with Retry-After 100 s (capped at slow_retry, 60 s): the
    // next attempt is due at 60 s.
    manager.force_refresh(generation).await;
    assert_eq!(fetched(&fetches), 2);
    tokio::time::sleep(Duration::from_secs(6)).await; // past the 5 s rate-limit interval
    let limited = manager.stats().forced_rate_limited;
    let answer = manager.force_refresh(generation).await;
    assert_eq!(
        answer.map(|credential| credential.generation),
        Some(generation)
    );
    assert_eq!(
        fetched(&fetches),
        2,
        "forcing inside the backoff window made a request"
    );
    assert_eq!(manager.stats().forced_rate_limited, limited + 1);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn credential_arriving_nearly_expired_is_a_failure_not_a_busy_loop() {
    let (manager, fetches, cancel) = steps(policy(), |_| {
        (Duration::ZERO, Ok(Duration::from_millis(500)))
    });
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(manager.current().is_none());
    let count = fetched(&fetches);
    // Backoff from 1 s doubling to 8 s: a handful of attempts in 30 s, not thousands.
    assert!((3..=20).contains(&count), "{count} attempts in 30 s");
    assert_eq!(manager.stats().transient_failures, count);
    cancel.cancel();
}

// ---- activation delay (propagation lag) ---------------------------------------------

/// With an activation delay, a renewed credential is served only once the delay has
/// passed (the previous one meanwhile); a rejection of the one served hands out the
/// newer at once; and a rejection of a credential still within its delay is answered
/// with that same credential once the delay is over, without fetching another.
#[tokio::test(start_paused = true)]
async fn activation_delay_serves_the_previous_credential_until_the_new_one_has_propagated() {
    let fixture = fixture(
        Duration::from_secs(600),
        CLIENT_SECRET,
        "org-a",
        RefreshPolicy {
            activation_delay: Duration::from_secs(1),
            force_interval: Duration::ZERO,
            ..policy()
        },
    )
    .await;
    let manager = &fixture.manager;
    let first = first_credential(manager).await;
    let obtained = tokio::time::Instant::from_std(manager.current().unwrap().obtained);
    // Rejected while still within its delay: offered again after it, no new token.
    let again = manager.force_refresh(first).await.unwrap();
    assert_eq!(again.generation, first);
    assert!(tokio::time::Instant::now() >= obtained + Duration::from_secs(1));
    assert_eq!(fixture.idp.tokens_issued(), 1);
    // Rejected after its delay: a new token is fetched and handed to the caller at once,
    // while `current` keeps serving the first for a second.
    let second = manager.force_refresh(first).await.unwrap();
    assert_eq!(second.generation, first + 1);
    assert_eq!(manager.current().unwrap().generation, first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(manager.current().unwrap().generation, first);
    // The previous one rejected meanwhile (revoked): the newer comes at once.
    assert_eq!(
        manager.force_refresh(first).await.unwrap().generation,
        second.generation
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(manager.current().unwrap().generation, second.generation);
    assert_eq!(fixture.idp.tokens_issued(), 2);
    fixture.cancel.cancel();
}

// ---- reading the core's refusals (credentials::verdict) -------------------------------

fn hour_long_steps() -> (
    CredentialManager,
    Arc<std::sync::atomic::AtomicU64>,
    CancellationToken,
) {
    steps(policy(), |_| {
        (Duration::ZERO, Ok(Duration::from_secs(3600)))
    })
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// The core refused a request carrying `generation` that was sent now and just arrived:
/// the replacement, waiting at most the manager's `resend_wait`.
async fn refused(manager: &CredentialManager, generation: u64) -> Option<Arc<Credential>> {
    let deadline = tokio::time::Instant::now() + manager.resend_wait();
    manager.replacement(generation, now(), deadline).await
}

/// A credential the core took is revoked twice within the 5 s rate limit: the first
/// refusal gets a forced refresh at once, the second waits for the rate limit to let the
/// next one through instead of passing the refusal on (issue 12).
#[tokio::test(start_paused = true)]
async fn a_rotation_inside_the_rate_limit_waits_for_the_next_allowed_refresh() {
    let (manager, fetches, cancel) = hour_long_steps();
    let first = first_credential(&manager).await;
    let start = tokio::time::Instant::now();
    manager.note_accepted(first, now());
    let second = refused(&manager, first).await.unwrap();
    assert_eq!(second.generation, first + 1);
    manager.note_accepted(second.generation, now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let third = refused(&manager, second.generation).await.unwrap();
    assert_eq!(third.generation, first + 2);
    assert!(
        tokio::time::Instant::now() >= start + Duration::from_secs(5),
        "the refresh came before the rate limit allowed it"
    );
    assert_eq!(fetched(&fetches), 3);
    let stats = manager.stats();
    assert_eq!(
        (stats.forced, stats.forced_waited, stats.refusals_rotation),
        (2, 1, 2)
    );
    cancel.cancel();
}

/// The wait is bounded by `resend_wait`: a refusal whose next allowed refresh comes later
/// gets the credential at hand (the rejected one) at once.
#[tokio::test(start_paused = true)]
async fn a_rotation_the_rate_limit_cannot_serve_within_resend_wait_is_not_held() {
    let (manager, fetches, cancel) = steps(
        RefreshPolicy {
            resend_wait: Duration::from_secs(2),
            ..policy()
        },
        |_| (Duration::ZERO, Ok(Duration::from_secs(3600))),
    );
    let first = first_credential(&manager).await;
    let second = refused(&manager, first).await.unwrap();
    manager.note_accepted(second.generation, now());
    let start = tokio::time::Instant::now();
    let answer = refused(&manager, second.generation).await.unwrap();
    assert_eq!(answer.generation, second.generation);
    assert_eq!(tokio::time::Instant::now(), start);
    assert_eq!(fetched(&fetches), 2);
    assert_eq!(manager.stats().forced_rate_limited, 1);
    cancel.cancel();
}

/// A credential fetched to replace a refused one is refused before the core took it:
/// a permanent refusal. Refusals go on at once from then on, never waiting for the rate
/// limit; once the limit allows a refresh, a refusal gets one at once (a repaired
/// configuration is picked up); the first acceptance ends the permanent reading.
#[tokio::test(start_paused = true)]
async fn a_fresh_credential_refused_at_once_is_a_permanent_refusal() {
    let (manager, fetches, cancel) = hour_long_steps();
    let first = first_credential(&manager).await;
    let second = refused(&manager, first).await.unwrap();
    assert_eq!(second.generation, first + 1);
    let start = tokio::time::Instant::now();
    let same = |answer: Option<Arc<Credential>>| answer.map(|credential| credential.generation);
    assert_eq!(
        same(refused(&manager, second.generation).await),
        Some(second.generation)
    );
    assert_eq!(
        same(refused(&manager, second.generation).await),
        Some(second.generation)
    );
    assert_eq!(
        tokio::time::Instant::now(),
        start,
        "a permanent refusal waited"
    );
    assert!(manager.core_refusing());
    assert_eq!(fetched(&fetches), 2);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let third = refused(&manager, second.generation).await.unwrap();
    assert_eq!(
        third.generation,
        first + 2,
        "a refresh once the limit allows one"
    );
    assert_eq!(fetched(&fetches), 3);
    manager.note_accepted(third.generation, now());
    assert!(!manager.core_refusing());
    let stats = manager.stats();
    assert_eq!((stats.refusals_rotation, stats.refusals_permanent), (1, 3));
    assert_eq!(stats.forced_waited, 0);
    cancel.cancel();
}

/// A source that hands out the same value again (a file nobody rewrote, a token server
/// that returns its cached token): the first refusal fetches once and gets nothing new;
/// every refusal after it is permanent and goes on at once.
#[tokio::test(start_paused = true)]
async fn a_refused_credential_fetched_again_unchanged_is_a_permanent_refusal() {
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "unchanging-token").unwrap();
    let source = FileSource::start(
        path,
        FileFormat::Token,
        Duration::from_secs(3600),
        cancel.clone(),
        &TaskTracker::new(),
    );
    let manager = CredentialManager::start(
        Arc::new(source),
        options(policy()),
        cancel.clone(),
        &TaskTracker::new(),
    );
    let first = first_credential(&manager).await;
    let answer = refused(&manager, first)
        .await
        .map(|credential| credential.generation);
    assert_eq!(answer, Some(first), "nothing newer to re-send with");
    let start = tokio::time::Instant::now();
    refused(&manager, first).await;
    assert_eq!(
        tokio::time::Instant::now(),
        start,
        "the second refusal waited"
    );
    let stats = manager.stats();
    assert_eq!((stats.refusals_rotation, stats.refusals_permanent), (1, 1));
    cancel.cancel();
}

/// The core took this very credential on a request sent after the refused one: the
/// refusal is about the request (a barred number), not the credential. No fetch.
#[tokio::test(start_paused = true)]
async fn a_refusal_of_a_credential_taken_on_a_later_request_is_passed_on_at_once() {
    let (manager, fetches, cancel) = hour_long_steps();
    let first = first_credential(&manager).await;
    let refused_sent_at = now();
    tokio::time::sleep(Duration::from_millis(10)).await;
    manager.note_accepted(first, now());
    let deadline = tokio::time::Instant::now() + manager.resend_wait();
    assert!(manager
        .replacement(first, refused_sent_at, deadline)
        .await
        .is_none());
    assert_eq!(fetched(&fetches), 1);
    assert_eq!(manager.stats().refusals_of_the_request, 1);
    cancel.cancel();
}

/// A `static` credential cannot change: its refusal is passed on without a fetch.
#[tokio::test(start_paused = true)]
async fn a_refused_static_credential_is_passed_on_without_a_fetch() {
    let cancel = CancellationToken::new();
    let manager = CredentialManager::start(
        Arc::new(byoc_sidecar::credentials::StaticSource::new(
            CredentialValue::Token(Secret::new("static-token")),
        )),
        options(policy()),
        cancel.clone(),
        &TaskTracker::new(),
    );
    let first = first_credential(&manager).await;
    assert!(refused(&manager, first).await.is_none());
    assert_eq!(manager.stats().attempts, 1);
    cancel.cancel();
}

/// Waits until `count` more attempts finished after `attempts` was taken.
async fn attempts_finished_from(mut attempts: tokio::sync::watch::Receiver<u64>, count: u64) {
    let start = *attempts.borrow_and_update();
    tokio::time::timeout(
        Duration::from_secs(600),
        attempts.wait_for(|seen| *seen >= start + count),
    )
    .await
    .expect("attempts in time")
    .unwrap();
}

/// SIGHUP's part in the manager: a `static` password re-read from its file replaces the
/// credential at once (a new generation), and an unchanged one changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_static_password_is_fetched_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "first-password").unwrap();
    let text = format!(
        "{}auth = \"digest\"\n\n[trunk.credentials]\nkind = \"static\"\nusername = \"alice\"\npassword_file = \"{}\"\n",
        common::Sidecar::config("udp:127.0.0.1:9", "udp:127.0.0.1:9", ""),
        password.display()
    );
    let load = || {
        byoc_sidecar::config::Config::from_toml(&text, "test")
            .unwrap()
            .validate()
            .unwrap()
            .trunks
            .remove(0)
            .credentials
            .unwrap()
    };
    let cancel = CancellationToken::new();
    let manager = byoc_sidecar::credentials::start_manager(
        "test",
        &load(),
        cancel.clone(),
        &TaskTracker::new(),
    )
    .unwrap();
    let first = first_credential(&manager).await;
    assert!(!manager.reload(&load()), "nothing changed");
    std::fs::write(&password, "second-password").unwrap();
    assert!(manager.reload(&load()));
    let mut attempts = manager.attempts();
    tokio::time::timeout(
        Duration::from_secs(5),
        attempts.wait_for(|_| {
            manager
                .current()
                .is_some_and(|credential| credential.generation > first)
        }),
    )
    .await
    .expect("the new password in use")
    .unwrap();
    let CredentialValue::UserPassword { password, .. } = &manager.current().unwrap().value else {
        panic!("not a username and password")
    };
    assert_eq!(password.expose(), "second-password");
    cancel.cancel();
}
