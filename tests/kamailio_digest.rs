//! Digest against a real server: Kamailio (Debian package) as the core, demanding
//! Digest on REGISTER (401) and INVITE (407) from a db_text subscriber table, with
//! `qop=auth`, nonce counting (each `nc` must rise; past 255 the nonce is stale) and
//! nonces that expire after a few seconds. sipp is the Edge and the far end; the Edge
//! sends no credentials and must never see a challenge.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::transport::Side;
use common::kamailio::{DigestCore, Kamailio};
use common::raw::{cseq, final_response, invite, status, RawPeer};
use common::*;

const PASSWORD: &str = "wonderland";

/// A sidecar whose trunk answers the core's challenges as `alice`.
async fn digest_sidecar(
    core: std::net::SocketAddr,
    dir: &std::path::Path,
    password: &str,
) -> Sidecar {
    Sidecar::start_ready(&Sidecar::digest_config(core, dir, password, "")).await
}

/// `calls` calls from sipp through the sidecar and Kamailio to sipp, all of which must
/// succeed; returns the sidecar's counters.
async fn calls_through_kamailio(algorithm: &str, calls: u64) -> byoc_sidecar::stats::StatsSnapshot {
    let far_end_port = free_port();
    let kamailio = Kamailio::digest_core(&DigestCore {
        algorithm,
        nonce_expire: 3,
        far_end_port,
        password: PASSWORD,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = digest_sidecar(kamailio.addr(), dir.path(), PASSWORD).await;
    let uas = Sipp::start(
        "uas",
        &uas_args("uas.xml", far_end_port, Transport::Udp, calls),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    let uac = Sipp::start(
        "uac",
        &uac_args("uac.xml", target, Transport::Udp, calls, 50, 100),
    );
    let uac = uac.finish(Duration::from_secs(90)).await;
    let uas = uas.finish(Duration::from_secs(30)).await;
    let stats = sidecar.app.stats.snapshot();
    if uac.successful != calls {
        eprintln!("kamailio log:\n{}", kamailio.log());
    }
    assert_all_calls_succeeded(&uac, calls, "uac (Edge)");
    assert_all_calls_succeeded(&uas, calls, "uas (far end)");
    sidecar.stop().await;
    stats
}

fn assert_challenges_answered(stats: &byoc_sidecar::stats::StatsSnapshot, calls: u64) {
    eprintln!(
        "challenges answered {}, re-sends {}, absorbed {}",
        stats.digest_challenges_answered, stats.resends, stats.rejections_absorbed
    );
    // The first INVITE is challenged; later ones answer the kept nonce until it expires
    // (every 3 s) or runs past nc 255, and are challenged again as stale.
    assert!(
        stats.digest_challenges_answered >= 2,
        "a first challenge and at least one stale nonce: {stats:?}"
    );
    assert!(
        stats.digest_challenges_answered < calls / 4,
        "the nonce is reused, not every call challenged: {stats:?}"
    );
    assert_eq!(
        (stats.resends_impossible, stats.digest_unanswerable),
        (0, 0),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_pass_kamailio_demanding_md5_digest() {
    let stats = calls_through_kamailio("MD5", 400).await;
    assert_challenges_answered(&stats, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_pass_kamailio_demanding_sha256_digest() {
    let stats = calls_through_kamailio("SHA-256", 400).await;
    assert_challenges_answered(&stats, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_pass_kamailio_demanding_digest() {
    const REGISTRATIONS: u64 = 100;
    let kamailio = Kamailio::digest_core(&DigestCore {
        algorithm: "SHA-256",
        nonce_expire: 30,
        far_end_port: 9,
        password: PASSWORD,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = digest_sidecar(kamailio.addr(), dir.path(), PASSWORD).await;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    let uac = Sipp::start(
        "register",
        &uac_args(
            "uac_register.xml",
            target,
            Transport::Udp,
            REGISTRATIONS,
            50,
            0,
        ),
    );
    let uac = uac.finish(Duration::from_secs(60)).await;
    if uac.successful != REGISTRATIONS {
        eprintln!("kamailio log:\n{}", kamailio.log());
    }
    assert_all_calls_succeeded(&uac, REGISTRATIONS, "register (Edge)");
    let stats = sidecar.app.stats.snapshot();
    // One 401 answered, then the nonce serves every REGISTER; a few more if REGISTERs
    // left before the first answer came back (50 a second on a busy machine).
    assert!(
        (1..=5).contains(&stats.digest_challenges_answered) && stats.resends_impossible == 0,
        "{stats:?}"
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_gets_one_resend_then_the_edge_sees_the_407() {
    let kamailio = Kamailio::digest_core(&DigestCore {
        algorithm: "MD5",
        nonce_expire: 30,
        far_end_port: 9,
        password: PASSWORD,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = digest_sidecar(kamailio.addr(), dir.path(), "not-the-password").await;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    let edge = RawPeer::bind().await;
    edge.send(
        &invite(edge.addr, proxy, "z9hG4bKwrong", "wrong@test"),
        proxy,
    )
    .await;
    let response = final_response(&edge).await;
    assert_eq!(
        (status(&response), cseq(&response)),
        (407, "1 INVITE".into())
    );
    let stats = sidecar.app.stats.snapshot();
    assert_eq!(
        (
            stats.rejections_absorbed,
            stats.resends,
            stats.resends_impossible
        ),
        (2, 1, 1),
        "the first 407 answered; the second, not stale, means a wrong password (RFC 7616 \
         §3.3): a newer one is asked for, none exists, the 407 goes on: {stats:?}"
    );
    sidecar.stop().await;
}
