//! The operators' story end to end: a core that accepts only the newest token (issuing a
//! new one revokes the older ones at once), tokens rotating every 2 s, and sipp placing
//! 3 s calls at 20 calls/s for 60 s through the sidecar. Every call must complete, every
//! BYE must be answered by the core (the CSeq translation works), and the sidecar must
//! have absorbed 403s along the way.

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
const SECONDS: u64 = 60;
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

/// A real permission problem: the core refuses every token. Each call is re-sent at most
/// once (only when a newer token could be had), the Edge gets the 403, and token requests
/// stay within the forced-refresh rate limit however many calls are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_403_reaches_the_edge_after_at_most_one_resend_within_the_rate_limit() {
    const CALLS: u64 = 200;
    const CALL_RATE: u64 = 20;
    let (sim, core, sidecar, _dir) = rig(
        "edge-p",
        "persistent-secret",
        "org-p",
        Duration::from_secs(3600),
        TokenKind::Opaque,
        Validation::RejectAll,
        "force_refresh_interval = \"2s\"\n",
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
    // One token at start, then at most one forced refresh per 2 s interval.
    let allowed = 1 + elapsed.as_secs() / 2 + 1;
    assert!(
        idp.tokens_issued() <= allowed,
        "{} tokens in {elapsed:?}",
        idp.tokens_issued()
    );
    println!(
        "persistent 403: {CALLS} calls, {} re-sent, {} passed on without a newer token, {} tokens issued in {:.1} s",
        stats.resends,
        stats.resends_impossible,
        idp.tokens_issued(),
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
