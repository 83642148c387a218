//! The operators' story end to end, with the sidecar's default settings: cores that stop
//! accepting tokens on their own schedule (another holder of the client reissuing every
//! 2 s; the token endpoint revoking every token every 4 s, faster than the 5 s forced-
//! refresh rate limit), and sipp placing calls through the sidecar. Every call must
//! complete, every BYE must be answered by the core (the CSeq translation works), and
//! token requests stay within the rate limit. A core that refuses every token gets every
//! call's 403 passed on, none re-sent twice, none held for the rate limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::sim::core::SimCore;
use byoc_sidecar::sim::idp::{TokenKind, Validation};
use byoc_sidecar::transport::Side;
use common::sim::SimIdp;
use common::*;

const RATE: u64 = 20;
const SECONDS: u64 = 30;
const HOLD_MS: u64 = 3000;

/// A token endpoint with one client, a simulated core checking its tokens under
/// `validation`, and a bearer sidecar in front (`extra` credentials lines added).
async fn rig(
    client: &str,
    secret: &str,
    organization: &str,
    ttl: Duration,
    kind: TokenKind,
    validation: Validation,
    extra: &str,
) -> (SimIdp, SimCore, Sidecar, tempfile::TempDir) {
    let sim = SimIdp::start(client, secret, organization, ttl, kind).await;
    let core = sim.core(validation).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = sim.bearer_sidecar(dir.path(), core.addr, extra).await;
    (sim, core, sidecar, dir)
}

/// One token at start, then at most one forced refresh per default 5 s interval.
fn assert_tokens_within_the_rate_limit(idp: &byoc_sidecar::sim::idp::Idp, elapsed: Duration) {
    let allowed = 1 + elapsed.as_secs() / 5 + 1;
    assert!(
        idp.tokens_issued() <= allowed,
        "{} tokens in {elapsed:?}",
        idp.tokens_issued()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_revoke_on_reissue_rotation_every_two_seconds() {
    let (sim, core, sidecar, _dir) = rig(
        "edge-r",
        "rotation-secret",
        "org-r",
        Duration::from_secs(10),
        TokenKind::Jwt,
        Validation::RevokeOnReissue,
        "",
    )
    .await;
    let (idp, cancel) = (&sim.idp, &sim.cancel);

    // Another holder of the same client credentials reissues every 2 s, revoking ours.
    let rotator = {
        let idp = idp.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(2));
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = ticker.tick() => { idp.issue_for("edge-r"); }
                }
            }
        })
    };

    let calls = RATE * SECONDS;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    let uac = Sipp::start(
        "uac",
        &uac_args("uac.xml", target, Transport::Udp, calls, RATE, HOLD_MS),
    );
    let outcome = uac.finish(Duration::from_secs(SECONDS + 60)).await;
    assert_all_calls_succeeded(&outcome, calls, "uac");
    let core_stats = &core.stats;
    assert_eq!(
        core_stats.byes_answered.load(Ordering::Relaxed),
        calls,
        "every BYE answered 200 by the core"
    );
    assert_eq!(
        core_stats.out_of_order_500.load(Ordering::Relaxed),
        0,
        "a request reached the core out of CSeq order"
    );
    let stats = sidecar.app.stats.snapshot();
    assert!(
        stats.rejections_absorbed > 0,
        "no 403 was absorbed: {stats:?}"
    );
    assert!(stats.resends > 0, "{stats:?}");
    assert_eq!(stats.resends_impossible, 0, "{stats:?}");
    assert_eq!(stats.dialog_translation_failures, 0, "{stats:?}");
    println!(
        "rotation: {calls} calls, {} absorbed 403s, {} re-sends, {} tokens issued, core saw {} 403s",
        stats.rejections_absorbed,
        stats.resends,
        idp.tokens_issued(),
        core_stats.rejected_403.load(Ordering::Relaxed)
    );
    cancel.cancel();
    rotator.abort();
    sidecar.stop().await;
}

/// Acceptance of issue 12: the token endpoint revokes every token it issued (a signing-
/// key rotation) every 4 s, faster than the default 5 s forced-refresh rate limit; sipp
/// places 10 calls/s for 40 s. A request refused inside the rate-limit window waits for
/// the next allowed refresh and is re-sent once: no call fails, every BYE is answered,
/// and token requests stay at one per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_revocations_faster_than_the_forced_refresh_rate_limit() {
    const CALLS: u64 = 400;
    const CALL_RATE: u64 = 10;
    const REVOKE_EVERY: Duration = Duration::from_secs(4);
    let (sim, core, sidecar, _dir) = rig(
        "edge-k",
        "key-rotation-secret",
        "org-k",
        Duration::from_secs(3600),
        TokenKind::Jwt,
        Validation::AnyUnexpired,
        "",
    )
    .await;
    let (idp, cancel) = (&sim.idp, &sim.cancel);
    let revoker = {
        let (idp, cancel) = (idp.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + REVOKE_EVERY, REVOKE_EVERY);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = ticks.tick() => idp.revoke_all(),
                }
            }
        })
    };
    let start = tokio::time::Instant::now();
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    let uac = Sipp::start(
        "uac",
        &uac_args("uac.xml", target, Transport::Udp, CALLS, CALL_RATE, 1000),
    );
    let outcome = uac.finish(Duration::from_secs(120)).await;
    let elapsed = start.elapsed();
    revoker.abort();
    assert_all_calls_succeeded(&outcome, CALLS, "uac");
    assert_eq!(
        core.stats.byes_answered.load(Ordering::Relaxed),
        CALLS,
        "every BYE answered 200 by the core"
    );
    assert_eq!(core.stats.out_of_order_500.load(Ordering::Relaxed), 0);
    let stats = sidecar.app.stats.snapshot();
    let manager = sidecar.app.credentials["test"].stats();
    assert!(idp.revocations() >= 9, "{} revocations", idp.revocations());
    assert!(stats.rejections_absorbed > 0, "{stats:?}");
    assert_eq!(stats.resends_impossible, 0, "{stats:?}");
    assert!(
        manager.forced_waited > 0,
        "no refusal waited for the rate limit: {manager:?}"
    );
    assert_eq!(manager.refusals_permanent, 0, "{manager:?}");
    // No proactive refresh within the hour-long lifetime.
    assert_tokens_within_the_rate_limit(idp, elapsed);
    println!(
        "revocations every 4 s: {CALLS} calls, {} failed, {} revocations, {} 403s absorbed, {} re-sends, \
         {} token requests, {} refusals waited for the rate limit, longest wait {:.3} s, run {:.1} s",
        outcome.failed,
        idp.revocations(),
        stats.rejections_absorbed,
        stats.resends,
        idp.requests(),
        manager.forced_waited,
        stats.longest_resend_wait_micros as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    cancel.cancel();
    sidecar.stop().await;
}

/// A real permission problem: the core refuses every token. The first refusal is taken
/// for a rotation (one forced refresh, one re-send); the fresh token refused at once
/// makes every later refusal permanent: passed on to the Edge without waiting for the
/// rate limit and without a re-send. No call is re-sent twice, and token requests stay
/// within the forced-refresh rate limit however many calls are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_403_reaches_the_edge_without_waiting_and_within_the_rate_limit() {
    const CALLS: u64 = 200;
    const CALL_RATE: u64 = 20;
    let (sim, core, sidecar, _dir) = rig(
        "edge-p",
        "persistent-secret",
        "org-p",
        Duration::from_secs(3600),
        TokenKind::Opaque,
        Validation::RejectAll,
        "",
    )
    .await;
    let (idp, cancel) = (&sim.idp, &sim.cancel);
    let start = tokio::time::Instant::now();
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    let uac = Sipp::start(
        "uac",
        &uac_args(
            "uac_forbidden.xml",
            target,
            Transport::Udp,
            CALLS,
            CALL_RATE,
            0,
        ),
    );
    let outcome = uac.finish(Duration::from_secs(60)).await;
    let elapsed = start.elapsed();
    // Every call saw its 403 at the Edge.
    assert_all_calls_succeeded(&outcome, CALLS, "uac");
    let stats = sidecar.app.stats.snapshot();
    let manager = sidecar.app.credentials["test"].stats();
    let invites = core.stats.invites_answered.load(Ordering::Relaxed)
        + core.stats.rejected_403.load(Ordering::Relaxed);
    assert_eq!(stats.rejections_absorbed, CALLS, "{stats:?}");
    assert_eq!(stats.resends + stats.resends_impossible, CALLS, "{stats:?}");
    assert_eq!(
        invites,
        CALLS + stats.resends,
        "never more than one re-send per call"
    );
    assert!(stats.resends >= 1, "{stats:?}");
    assert_eq!(
        manager.forced_waited, 0,
        "a refusal waited for the rate limit: {manager:?}"
    );
    assert!(
        manager.refusals_permanent >= CALLS - stats.resends - 1,
        "{manager:?} {stats:?}"
    );
    assert_tokens_within_the_rate_limit(idp, elapsed);
    println!(
        "persistent 403: {CALLS} calls, {} re-sent, {} passed on at once as permanent, {} tokens issued, \
         longest wait {:.3} s, run {:.1} s",
        stats.resends,
        manager.refusals_permanent,
        idp.tokens_issued(),
        stats.longest_resend_wait_micros as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    cancel.cancel();
    sidecar.stop().await;
}

/// A core that accepts a new token only 800 ms after it was issued (propagation lag),
/// while earlier tokens stay valid until they expire; tokens live 4 s, so the sidecar
/// renews about every 2 s. With `activation_delay = "1s"` the sidecar keeps using the
/// previous token for a second after each renewal, so after start-up no request meets
/// the lag; at start-up there is no previous token, and requests refused for the first
/// one are re-sent with it once its delay has passed. No call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_a_core_that_accepts_new_tokens_only_after_a_propagation_lag() {
    const CALLS: u64 = 300;
    const CALL_RATE: u64 = 20;
    let (sim, core, sidecar, _dir) = rig(
        "edge-l",
        "lag-secret",
        "org-l",
        Duration::from_secs(4),
        TokenKind::Jwt,
        Validation::PropagationLag(Duration::from_millis(800)),
        "refresh_buffer = \"1s\"\nactivation_delay = \"1s\"\n",
    )
    .await;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    let uac = Sipp::start(
        "uac",
        &uac_args("uac.xml", target, Transport::Udp, CALLS, CALL_RATE, 500),
    );
    // Start-up: the first token is younger than the lag for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_startup = core.stats.rejected_403.load(Ordering::Relaxed);
    let outcome = uac.finish(Duration::from_secs(90)).await;
    assert_all_calls_succeeded(&outcome, CALLS, "uac");
    let tokens = sim.idp.tokens_issued();
    assert!(tokens >= 6, "the token rotated: {tokens} issued");
    assert_eq!(
        core.stats.rejected_403.load(Ordering::Relaxed),
        at_startup,
        "after start-up a request carried a token the core did not accept yet"
    );
    println!(
        "propagation lag: {CALLS} calls, {tokens} tokens, {at_startup} 403s at start-up, {} absorbed",
        sidecar.app.stats.snapshot().rejections_absorbed
    );
    sim.cancel.cancel();
    sidecar.stop().await;
}
