//! In-dialog requests are never refused for lack of a credential (issue 12): when the
//! token endpoint is down past the token's expiry, a BYE or an INFO of a running call
//! waits (at most `resend_wait`) for a valid token and goes with it; past the wait it
//! goes without one, counted, and the core decides. Before, the sidecar answered 503 and
//! a call could not even be hung up. A new call still gets 503 at once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::sim::idp::{Fault, TokenKind};
use byoc_sidecar::transport::Side;
use common::raw::{
    answer, cseq, final_for, final_response, header_values, invite, next_request, record_routes,
    status, with_dialog, EdgeDialog, RawPeer,
};
use common::sim::SimIdp;
use common::Sidecar;

const WAIT: Duration = Duration::from_secs(5);

/// The token endpoint goes down (503) and stays down until `manager`'s token expired.
async fn endpoint_down_until_expired(
    sim: &SimIdp,
    manager: &byoc_sidecar::credentials::CredentialManager,
) {
    sim.idp.set_fault(Some(Fault::Status {
        code: 503,
        retry_after: None,
    }));
    let expired = async {
        while manager.current().is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), expired)
        .await
        .expect("the token expires");
}

/// A bearer trunk getting tokens of `ttl` from a simulated endpoint, quick to retry
/// (backoff 100-300 ms) and waiting at most 3 s for a token; a hand-driven core and Edge.
struct WaitRig {
    sim: SimIdp,
    _dir: tempfile::TempDir,
    core: RawPeer,
    sidecar: Sidecar,
    edge: RawPeer,
    /// The sidecar's Edge-side UDP address.
    proxy: std::net::SocketAddr,
    manager: byoc_sidecar::credentials::CredentialManager,
}

impl WaitRig {
    async fn start(client: &str, ttl: Duration) -> WaitRig {
        let sim = SimIdp::start(client, "wait-secret", "org-w", ttl, TokenKind::Opaque).await;
        let dir = tempfile::tempdir().unwrap();
        let core = RawPeer::bind().await;
        let text = format!(
            "{}auth = \"bearer\"\n{}",
            Sidecar::config("udp:127.0.0.1:9", &format!("udp:{}", core.addr), ""),
            sim.credentials_toml(
                dir.path(),
                "refresh_buffer = \"1s\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"300ms\"\n\
                 force_refresh_interval = \"1s\"\nresend_wait = \"3s\"\n"
            )
        );
        let sidecar = Sidecar::start_ready(&text).await;
        let edge = RawPeer::bind().await;
        let proxy = sidecar.addr(Side::Edge, Transport::Udp);
        let manager = sidecar.app.credentials["test"].clone();
        WaitRig {
            sim,
            _dir: dir,
            core,
            sidecar,
            edge,
            proxy,
            manager,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_dialog_requests_wait_for_a_valid_token_then_go_without_one_past_the_wait() {
    let WaitRig {
        sim,
        _dir,
        core,
        sidecar,
        edge,
        proxy,
        manager,
    } = WaitRig::start("edge-w", Duration::from_secs(3)).await;

    // A call is set up while the token is good.
    edge.send(&invite(edge.addr, proxy, "z9hG4bKwait", "wait@test"), proxy)
        .await;
    let (at_core, from) = next_request(&core, rsip::Method::Invite).await;
    assert!(header_values(&at_core, "Authorization")[0].starts_with("Bearer "));
    let ok = with_dialog(
        &answer(&at_core, 200, "OK", "core-tag"),
        &record_routes(&at_core),
        core.addr,
        "",
    );
    core.send(&ok, from).await;
    let answered = final_response(&edge).await;
    assert_eq!(status(&answered), 200);
    let dialog = EdgeDialog::from_response(&answered, edge.addr);
    edge.send(&dialog.request("ACK", 1, "z9hG4bKwaitack", ""), proxy)
        .await;
    next_request(&core, rsip::Method::Ack).await;

    // The token endpoint goes down and the token expires.
    let before = manager.current().unwrap().generation;
    endpoint_down_until_expired(&sim, &manager).await;

    // A new call is refused at once: nothing expired goes to the core.
    edge.send(&invite(edge.addr, proxy, "z9hG4bKnew", "new@test"), proxy)
        .await;
    assert_eq!(status(&final_for(&edge, "new@test").await), 503);

    // An INFO of the running call waits, and past resend_wait goes without a token.
    edge.send(&dialog.request("INFO", 2, "z9hG4bKinfo", ""), proxy)
        .await;
    let early = tokio::time::timeout(Duration::from_millis(500), core.receive(WAIT, "INFO")).await;
    assert!(early.is_err(), "the INFO did not wait for a token");
    let (info, from) = next_request(&core, rsip::Method::Info).await;
    assert!(
        header_values(&info, "Authorization").is_empty(),
        "an expired token was sent"
    );
    assert_eq!(cseq(&info), "2 INFO");
    core.send(&answer(&info, 200, "OK", "core-tag"), from).await;
    assert_eq!(status(&final_for(&edge, "wait@test").await), 200);
    let stats = sidecar.app.stats.snapshot();
    assert_eq!(
        (stats.credential_waits, stats.sent_without_credential),
        (1, 1)
    );

    // The BYE waits too; the endpoint recovers meanwhile, and the BYE goes with the new
    // token: the call is hung up on the core.
    edge.send(&dialog.request("BYE", 3, "z9hG4bKbye", ""), proxy)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.idp.set_fault(None);
    let (bye, from) = next_request(&core, rsip::Method::Bye).await;
    let authorization = header_values(&bye, "Authorization");
    assert_eq!(authorization.len(), 1, "{authorization:?}");
    let current = manager.current().expect("a token again");
    assert!(current.generation > before);
    assert_ne!(
        authorization[0],
        header_values(&at_core, "Authorization")[0]
    );
    core.send(&answer(&bye, 200, "OK", "core-tag"), from).await;
    assert_eq!(status(&final_for(&edge, "wait@test").await), 200);
    let stats = sidecar.app.stats.snapshot();
    assert_eq!(
        (stats.credential_waits, stats.sent_without_credential),
        (2, 1)
    );
    sidecar.stop().await;
}

/// A CANCEL for an in-dialog re-INVITE that waits for a token ends it with 487 without
/// sending it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_reinvite_cancelled_by_the_edge_is_answered_487_and_never_sent() {
    let WaitRig {
        sim,
        _dir,
        core,
        sidecar,
        edge,
        proxy,
        manager,
    } = WaitRig::start("edge-c", Duration::from_secs(2)).await;
    endpoint_down_until_expired(&sim, &manager).await;
    // A re-INVITE of a dialog (a To tag), then its CANCEL while it waits.
    let reinvite = invite(edge.addr, proxy, "z9hG4bKre", "re@test").replace(
        &format!("To: <sip:service@{proxy}>"),
        &format!("To: <sip:service@{proxy}>;tag=core-tag"),
    );
    edge.send(&reinvite, proxy).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancel = reinvite
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    edge.send(&cancel, proxy).await;
    let mut codes = Vec::new();
    while !codes.contains(&487) {
        let (message, _) = edge.receive(WAIT, "487").await;
        codes.push(status(&message));
    }
    assert!(codes.contains(&200), "the CANCEL answered: {codes:?}");
    let sent = core.drain(Duration::from_secs(4)).await;
    assert!(
        sent.is_empty(),
        "the cancelled re-INVITE was sent: {sent:?}"
    );
    sidecar.stop().await;
}
