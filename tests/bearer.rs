//! RFC 8898 Bearer toward the core: every request of a `bearer` trunk, initial and
//! in-dialog, carries the trunk's current token in place of whatever the Edge sent, no
//! credential travels toward the Edge, and without a valid token nothing is sent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::transport::Side;
use common::raw::{
    cseq, final_response, header_values, invite, next_request, status, top_branch, RawPeer,
};
use common::Sidecar;
use rsip::SipMessage;

const WAIT: Duration = Duration::from_secs(5);

fn bearer_config(core: std::net::SocketAddr, token_path: &std::path::Path) -> String {
    format!(
        "{}auth = \"bearer\"\n\n[trunk.credentials]\nkind = \"file\"\npath = \"{}\"\n",
        Sidecar::config("udp:127.0.0.1:9", &format!("udp:{core}"), ""),
        token_path.display()
    )
}

/// A bearer trunk whose token comes from a file, between a hand-driven core and Edge;
/// ready once the first token is read.
struct FileBearer {
    _dir: tempfile::TempDir,
    token_path: std::path::PathBuf,
    core: RawPeer,
    sidecar: Sidecar,
    edge: RawPeer,
    proxy: std::net::SocketAddr,
}

async fn file_bearer(first_token: &str) -> FileBearer {
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, first_token).unwrap();
    let core = RawPeer::bind().await;
    let sidecar = Sidecar::start_with(&bearer_config(core.addr, &token_path)).await;
    wait_for_generation(&sidecar, 1).await;
    let edge = RawPeer::bind().await;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    FileBearer {
        _dir: dir,
        token_path,
        core,
        sidecar,
        edge,
        proxy,
    }
}

async fn wait_for_generation(sidecar: &Sidecar, generation: u64) {
    let manager = sidecar.app.credentials.get("test").unwrap();
    for _ in 0..250 {
        if manager.current().map(|credential| credential.generation) == Some(generation) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("generation {generation} never came");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_toward_the_core_carries_the_current_token_and_nothing_goes_to_the_edge() {
    let FileBearer {
        _dir,
        token_path,
        core,
        sidecar,
        edge,
        proxy,
    } = file_bearer("bearer-token-one").await;

    // The Edge sends credentials of its own; they must not reach the core.
    let request = invite(edge.addr, proxy, "z9hG4bKbearer", "bearer@test").replace(
        "Max-Forwards: 70\r\n",
        "Max-Forwards: 70\r\nAuthorization: Digest username=\"edge\", response=\"x\"\r\nProxy-Authorization: Basic ZWRnZTpwdw==\r\n",
    );
    edge.send(&request, proxy).await;
    let (forwarded, core_sidecar) = core.receive(WAIT, "INVITE at the core").await;
    assert_eq!(
        header_values(&forwarded, "Authorization"),
        vec!["Bearer bearer-token-one"]
    );
    assert!(header_values(&forwarded, "Proxy-Authorization").is_empty());
    let record_route = common::raw::record_routes(&forwarded);
    assert_eq!(record_route.len(), 2);
    assert!(
        record_route.iter().all(|uri| uri.contains(";bsct=0")),
        "{record_route:?}"
    );

    // The core answers 200 with the Record-Route echoed and its own Contact.
    let ok = common::raw::with_dialog(
        &common::raw::answer(&forwarded, 200, "OK", "core-tag"),
        &record_route,
        core.addr,
        "",
    );
    core.send(&ok, core_sidecar).await;
    let answer = loop {
        let (response, _) = edge.receive(WAIT, "200 at the Edge").await;
        if status(&response) == 200 {
            break response;
        }
    };
    assert!(header_values(&answer, "Authorization").is_empty());

    let dialog = common::raw::EdgeDialog::from_response(&answer, edge.addr);
    edge.send(&dialog.request("ACK", 1, "z9hG4bKbearerack", ""), proxy)
        .await;
    let (ack, _) = core.receive(WAIT, "ACK at the core").await;
    assert!(matches!(&ack, SipMessage::Request(request) if request.method == rsip::Method::Ack));
    assert_eq!(
        header_values(&ack, "Authorization"),
        vec!["Bearer bearer-token-one"]
    );

    // A request from the core toward the Edge loses any credential on the way.
    let core_routes = record_route.join(", ");
    let to = header_values(&answer, "To")[0].clone();
    let info = format!(
        "INFO sip:edge@{} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKcoreinfo\r\n\
         From: {to}\r\nTo: <sip:edge@{}>;tag=edge-tag\r\nCall-ID: bearer@test\r\nCSeq: 1 INFO\r\n\
         Route: {core_routes}\r\nAuthorization: Bearer core-side-secret\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        edge.addr, core.addr, edge.addr
    );
    core.send(&info, sidecar.addr(Side::Core, Transport::Udp))
        .await;
    let (info_at_edge, _) = edge.receive(WAIT, "INFO at the Edge").await;
    assert!(
        matches!(&info_at_edge, SipMessage::Request(request) if request.method == rsip::Method::Info)
    );
    assert!(
        header_values(&info_at_edge, "Authorization").is_empty(),
        "a credential reached the Edge"
    );

    // The token rotates; the BYE carries the new one.
    std::fs::write(&token_path, "bearer-token-two").unwrap();
    wait_for_generation(&sidecar, 2).await;
    edge.send(&dialog.request("BYE", 2, "z9hG4bKbearerbye", ""), proxy)
        .await;
    let bye = loop {
        let (message, _) = core.receive(WAIT, "BYE at the core").await;
        if matches!(&message, SipMessage::Request(request) if request.method == rsip::Method::Bye) {
            break message;
        }
    };
    assert_eq!(
        header_values(&bye, "Authorization"),
        vec!["Bearer bearer-token-two"]
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_token_requests_get_503_and_nothing_reaches_the_core() {
    let dir = tempfile::tempdir().unwrap();
    let core = RawPeer::bind().await;
    let sidecar = Sidecar::start_with(&bearer_config(core.addr, &dir.path().join("missing"))).await;
    let edge = RawPeer::bind().await;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    edge.send(
        &invite(edge.addr, proxy, "z9hG4bKnotoken", "notoken@test"),
        proxy,
    )
    .await;
    let mut codes = Vec::new();
    while codes.last() != Some(&503) {
        codes.push(status(&edge.receive(WAIT, "503").await.0));
    }
    assert_eq!(codes, vec![100, 503]);
    let leaked = tokio::time::timeout(
        Duration::from_millis(300),
        core.socket.recv_from(&mut [0u8; 10]),
    )
    .await;
    assert!(
        leaked.is_err(),
        "an unauthenticated request reached the core"
    );
    sidecar.stop().await;
}

// ---- one re-send with a fresh credential ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_token_403_is_retried_once_with_cseq_plus_one_and_the_dialog_is_translated() {
    let FileBearer {
        _dir,
        token_path,
        core,
        sidecar,
        edge,
        proxy,
    } = file_bearer("rotating-token-one").await;
    edge.send(
        &invite(edge.addr, proxy, "z9hG4bKstale", "stale@test"),
        proxy,
    )
    .await;

    let (first, from) = next_request(&core, rsip::Method::Invite).await;
    assert_eq!(cseq(&first), "1 INVITE");
    // The token rotated meanwhile and the core revoked the old one.
    std::fs::write(&token_path, "rotating-token-two").unwrap();
    core.send(
        &common::raw::answer(&first, 403, "Forbidden", "core-tag"),
        from,
    )
    .await;

    let (second, from) = next_request(&core, rsip::Method::Invite).await;
    assert_eq!(cseq(&second), "2 INVITE", "re-sent with CSeq + 1");
    assert_eq!(
        header_values(&second, "Authorization"),
        vec!["Bearer rotating-token-two"]
    );
    assert_eq!(
        header_values(&second, "Call-ID"),
        header_values(&first, "Call-ID")
    );
    assert_eq!(
        header_values(&second, "From"),
        header_values(&first, "From")
    );
    assert_ne!(
        top_branch(&first),
        top_branch(&second),
        "a new client transaction"
    );

    let record_route = common::raw::record_routes(&second);
    let ok = common::raw::with_dialog(
        &common::raw::answer(&second, 200, "OK", "core-tag"),
        &record_route,
        core.addr,
        "",
    );
    core.send(&ok, from).await;
    let answer = final_response(&edge).await;
    assert_eq!(status(&answer), 200, "the Edge never sees the 403");
    assert_eq!(cseq(&answer), "1 INVITE", "the Edge's own CSeq");

    let dialog = common::raw::EdgeDialog::from_response(&answer, edge.addr);
    edge.send(&dialog.request("ACK", 1, "z9hG4bKstaleack", ""), proxy)
        .await;
    let (ack, _) = next_request(&core, rsip::Method::Ack).await;
    assert_eq!(
        cseq(&ack),
        "2 ACK",
        "the ACK for the 2xx follows the INVITE's new number"
    );
    // A re-INVITE after the translation (a known breakage in other proxies).
    edge.send(
        &dialog.request("INVITE", 2, "z9hG4bKstalereinvite", ""),
        proxy,
    )
    .await;
    let (reinvite, from) = next_request(&core, rsip::Method::Invite).await;
    assert_eq!(cseq(&reinvite), "3 INVITE");
    core.send(&common::raw::answer(&reinvite, 200, "OK", "core-tag"), from)
        .await;
    let reinvite_answer = final_response(&edge).await;
    assert_eq!(
        (status(&reinvite_answer), cseq(&reinvite_answer)),
        (200, "2 INVITE".to_string())
    );
    edge.send(&dialog.request("ACK", 2, "z9hG4bKstaleack2", ""), proxy)
        .await;
    let (ack, _) = next_request(&core, rsip::Method::Ack).await;
    assert_eq!(cseq(&ack), "3 ACK");
    edge.send(&dialog.request("BYE", 3, "z9hG4bKstalebye", ""), proxy)
        .await;
    let (bye, from) = next_request(&core, rsip::Method::Bye).await;
    assert_eq!(cseq(&bye), "4 BYE", "later requests keep the offset");
    core.send(&common::raw::answer(&bye, 200, "OK", "core-tag"), from)
        .await;
    let bye_answer = final_response(&edge).await;
    assert_eq!(
        (status(&bye_answer), cseq(&bye_answer)),
        (200, "3 BYE".to_string())
    );
    let stats = sidecar.app.stats.snapshot();
    assert_eq!(
        (
            stats.rejections_absorbed,
            stats.resends,
            stats.resends_impossible
        ),
        (1, 1, 0)
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_403_gets_exactly_one_resend_then_reaches_the_edge() {
    let FileBearer {
        _dir,
        token_path,
        core,
        sidecar,
        edge,
        proxy,
    } = file_bearer("persistent-one").await;
    edge.send(&invite(edge.addr, proxy, "z9hG4bKperm", "perm@test"), proxy)
        .await;
    let (first, from) = next_request(&core, rsip::Method::Invite).await;
    std::fs::write(&token_path, "persistent-two").unwrap();
    core.send(&common::raw::answer(&first, 403, "Forbidden", "t"), from)
        .await;
    let (second, from) = next_request(&core, rsip::Method::Invite).await;
    core.send(&common::raw::answer(&second, 403, "Forbidden", "t"), from)
        .await;
    let answer = final_response(&edge).await;
    assert_eq!(
        (status(&answer), cseq(&answer)),
        (403, "1 INVITE".to_string())
    );
    // No third INVITE.
    let third = tokio::time::timeout(
        Duration::from_millis(500),
        next_request(&core, rsip::Method::Invite),
    )
    .await;
    assert!(third.is_err(), "a second rejection must be final");
    assert_eq!(sidecar.app.stats.snapshot().resends, 1);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejection_without_a_newer_credential_goes_to_the_edge() {
    let FileBearer {
        _dir,
        token_path: _,
        core,
        sidecar,
        edge,
        proxy,
    } = file_bearer("unchanged-token").await;
    edge.send(&invite(edge.addr, proxy, "z9hG4bKsame", "same@test"), proxy)
        .await;
    let (first, from) = next_request(&core, rsip::Method::Invite).await;
    core.send(&common::raw::answer(&first, 403, "Forbidden", "t"), from)
        .await;
    let answer = final_response(&edge).await;
    assert_eq!(
        (status(&answer), cseq(&answer)),
        (403, "1 INVITE".to_string())
    );
    let stats = sidecar.app.stats.snapshot();
    assert_eq!(
        (
            stats.rejections_absorbed,
            stats.resends,
            stats.resends_impossible
        ),
        (1, 0, 1)
    );
    sidecar.stop().await;
}

/// The Edge cancels while the re-send waits for its token: nothing is outstanding at the
/// core (it refused the INVITE), so the CANCEL is answered 200 and the INVITE 487 at once,
/// and the INVITE is never sent again (no ringing after the caller gave up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_arriving_during_the_resend_ends_the_invite_with_487_and_nothing_is_re_sent() {
    use byoc_sidecar::sim::idp::{Fault, TokenKind};
    let sim = common::sim::SimIdp::start(
        "edge-c",
        "cancel-test-secret",
        "org-c",
        Duration::from_secs(600),
        TokenKind::Opaque,
    )
    .await;
    let idp = &sim.idp;
    let dir = tempfile::tempdir().unwrap();
    let core = RawPeer::bind().await;
    let sidecar = sim.bearer_sidecar(dir.path(), core.addr, "").await;
    wait_for_generation(&sidecar, 1).await;
    let edge = RawPeer::bind().await;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    let request = invite(
        edge.addr,
        proxy,
        "z9hG4bKcancelresend",
        "cancel-resend@test",
    );
    edge.send(&request, proxy).await;
    let (first, from) = next_request(&core, rsip::Method::Invite).await;

    // The forced refresh will take 800 ms; the Edge cancels meanwhile.
    idp.push_faults([Fault::Delay(Duration::from_millis(800))]);
    core.send(
        &common::raw::answer(&first, 403, "Forbidden", "core-tag"),
        from,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancel = common::raw::as_cancel(&request);
    edge.send(&cancel, proxy).await;
    let mut codes = Vec::new();
    while !codes.contains(&(200, "1 CANCEL".to_string()))
        || !codes.contains(&(487, "1 INVITE".to_string()))
    {
        let (message, _) = edge.receive(WAIT, "200 for the CANCEL and 487").await;
        codes.push((status(&message), cseq(&message)));
    }
    // The refresh lands later; the cancelled INVITE is not sent again.
    let resent = core.drain(Duration::from_millis(1500)).await;
    assert!(
        resent.iter().all(|text| !text.starts_with("INVITE")),
        "the cancelled INVITE was re-sent: {resent:?}"
    );
    sidecar.stop().await;
}

/// BYE after PRACK (RFC 3262) once a re-send raised the dialog's CSeq: the PRACK's CSeq
/// and the INVITE CSeq quoted in its RAck are both translated, and so is everything after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prack_and_bye_after_a_resend_are_translated_including_rack() {
    let FileBearer {
        _dir,
        token_path,
        core,
        sidecar,
        edge,
        proxy,
    } = file_bearer("prack-token-one").await;
    edge.send(
        &invite(edge.addr, proxy, "z9hG4bKprack", "prack@test"),
        proxy,
    )
    .await;
    let (first, from) = next_request(&core, rsip::Method::Invite).await;
    std::fs::write(&token_path, "prack-token-two").unwrap();
    core.send(
        &common::raw::answer(&first, 403, "Forbidden", "core-tag"),
        from,
    )
    .await;
    let (second, from) = next_request(&core, rsip::Method::Invite).await;
    assert_eq!(cseq(&second), "2 INVITE");

    // A reliable 183 (RSeq 1) establishes the early dialog.
    let record_route = common::raw::record_routes(&second);
    let progress = common::raw::with_dialog(
        &common::raw::answer(&second, 183, "Session Progress", "core-tag"),
        &record_route,
        core.addr,
        "Require: 100rel\r\nRSeq: 1\r\n",
    );
    core.send(&progress, from).await;
    let early = loop {
        let (message, _) = edge.receive(WAIT, "183 at the Edge").await;
        if status(&message) == 183 {
            break message;
        }
    };
    assert_eq!(cseq(&early), "1 INVITE");

    let dialog = common::raw::EdgeDialog::from_response(&early, edge.addr);
    edge.send(
        &dialog.request("PRACK", 2, "z9hG4bKprack1", "RAck: 1 1 INVITE\r\n"),
        proxy,
    )
    .await;
    let (prack, from) = next_request(&core, rsip::Method::PRack).await;
    assert_eq!(cseq(&prack), "3 PRACK");
    assert_eq!(
        header_values(&prack, "RAck"),
        vec!["1 2 INVITE"],
        "RAck names the INVITE as the core numbered it"
    );
    core.send(&common::raw::answer(&prack, 200, "OK", "core-tag"), from)
        .await;
    assert_eq!(cseq(&final_response(&edge).await), "2 PRACK");

    let ok = common::raw::with_dialog(
        &common::raw::answer(&second, 200, "OK", "core-tag"),
        &record_route,
        core.addr,
        "",
    );
    core.send(&ok, from).await;
    let answer = final_response(&edge).await;
    assert_eq!(
        (status(&answer), cseq(&answer)),
        (200, "1 INVITE".to_string())
    );
    edge.send(&dialog.request("ACK", 1, "z9hG4bKprackack", ""), proxy)
        .await;
    assert_eq!(
        cseq(&next_request(&core, rsip::Method::Ack).await.0),
        "2 ACK"
    );
    edge.send(&dialog.request("BYE", 3, "z9hG4bKprackbye", ""), proxy)
        .await;
    let (bye, from) = next_request(&core, rsip::Method::Bye).await;
    assert_eq!(cseq(&bye), "4 BYE");
    core.send(&common::raw::answer(&bye, 200, "OK", "core-tag"), from)
        .await;
    assert_eq!(cseq(&final_response(&edge).await), "3 BYE");
    sidecar.stop().await;
}

/// Finding from review: the INVITE went out unshifted, then a PRACK was re-sent. The ACK
/// for the INVITE's 2xx must keep the INVITE's number, later requests move up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_keeps_its_invites_number_when_a_later_prack_was_resent() {
    let FileBearer {
        _dir,
        token_path,
        core,
        sidecar,
        edge,
        proxy,
    } = file_bearer("midcall-token-one").await;
    edge.send(
        &invite(edge.addr, proxy, "z9hG4bKmidcall", "midcall@test"),
        proxy,
    )
    .await;
    let (first, from) = next_request(&core, rsip::Method::Invite).await;
    assert_eq!(cseq(&first), "1 INVITE");
    let record_route = common::raw::record_routes(&first);
    let progress = common::raw::with_dialog(
        &common::raw::answer(&first, 183, "Session Progress", "core-tag"),
        &record_route,
        core.addr,
        "Require: 100rel\r\nRSeq: 1\r\n",
    );
    core.send(&progress, from).await;
    let early = loop {
        let (message, _) = edge.receive(WAIT, "183").await;
        if status(&message) == 183 {
            break message;
        }
    };
    let dialog = common::raw::EdgeDialog::from_response(&early, edge.addr);
    // The token rotates while ringing; the PRACK is rejected and re-sent.
    std::fs::write(&token_path, "midcall-token-two").unwrap();
    edge.send(
        &dialog.request("PRACK", 2, "z9hG4bKmidprack", "RAck: 1 1 INVITE\r\n"),
        proxy,
    )
    .await;
    let (prack, from) = next_request(&core, rsip::Method::PRack).await;
    assert_eq!(cseq(&prack), "2 PRACK");
    core.send(
        &common::raw::answer(&prack, 403, "Forbidden", "core-tag"),
        from,
    )
    .await;
    let (prack_again, from) = next_request(&core, rsip::Method::PRack).await;
    assert_eq!(cseq(&prack_again), "3 PRACK");
    assert_eq!(
        header_values(&prack_again, "RAck"),
        vec!["1 1 INVITE"],
        "the INVITE went out as 1"
    );
    core.send(
        &common::raw::answer(&prack_again, 200, "OK", "core-tag"),
        from,
    )
    .await;
    assert_eq!(cseq(&final_response(&edge).await), "2 PRACK");

    core.send(
        &common::raw::with_dialog(
            &common::raw::answer(&first, 200, "OK", "core-tag"),
            &record_route,
            core.addr,
            "",
        ),
        from,
    )
    .await;
    assert_eq!(cseq(&final_response(&edge).await), "1 INVITE");
    edge.send(&dialog.request("ACK", 1, "z9hG4bKmidack", ""), proxy)
        .await;
    assert_eq!(
        cseq(&next_request(&core, rsip::Method::Ack).await.0),
        "1 ACK",
        "the ACK matches the INVITE as sent"
    );
    edge.send(&dialog.request("BYE", 3, "z9hG4bKmidbye", ""), proxy)
        .await;
    let (bye, from) = next_request(&core, rsip::Method::Bye).await;
    assert_eq!(cseq(&bye), "4 BYE");
    core.send(&common::raw::answer(&bye, 200, "OK", "core-tag"), from)
        .await;
    assert_eq!(cseq(&final_response(&edge).await), "3 BYE");
    sidecar.stop().await;
}

/// Finding from review: an Edge cannot borrow another trunk's token by writing that
/// trunk's index into a Route to the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_trunk_parameter_borrows_no_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, "guarded-token").unwrap();
    let core = RawPeer::bind().await;
    // Trunk 0 serves only 127.0.0.2 and has a token; trunk 1 takes everyone else.
    let text = Sidecar::config("udp:127.0.0.2:9", &format!("udp:{}", core.addr), "")
        .replace("name = \"test\"", "name = \"test\"\nmatch = { source = [\"127.0.0.2/32\"] }")
        + &format!(
            "auth = \"bearer\"\n\n[trunk.credentials]\nkind = \"file\"\npath = \"{}\"\n\n[[trunk]]\nname = \"open\"\nedge = \"udp:127.0.0.1:9\"\ncore = \"udp:{}\"\n",
            token_path.display(),
            core.addr
        );
    let sidecar = Sidecar::start_with(&text).await;
    wait_for_generation(&sidecar, 1).await;
    let edge = RawPeer::bind().await; // 127.0.0.1: trunk "open"
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    let forged = format!(
        "BYE sip:x@{} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKforged\r\nRoute: <sip:{proxy};lr;bsct=0>\r\n\
         From: <sip:edge@a>;tag=1\r\nTo: <sip:x@b>;tag=2\r\nCall-ID: forged@test\r\n\
         CSeq: 2 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        core.addr, edge.addr
    );
    edge.send(&forged, proxy).await;
    let (bye, _) = next_request(&core, rsip::Method::Bye).await;
    assert!(
        header_values(&bye, "Authorization").is_empty(),
        "trunk 0's token was attached"
    );
    sidecar.stop().await;
}
