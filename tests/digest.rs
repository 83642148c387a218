//! Digest toward the core (RFC 3261 §22, RFC 7616): a hand-driven core challenges, the
//! sidecar answers with the trunk's username and password by re-sending once, reuses the
//! nonce with a rising count, answers a stale nonce once more, and hands the Edge a
//! rejection it cannot do anything about only when the credential itself was refused.
//! The answers are checked against the RFC 7616 formulas computed here independently.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;

use byoc_sidecar::config::Transport;
use byoc_sidecar::sip::auth::Challenge;
use byoc_sidecar::transport::Side;
use common::raw::{
    answer, cseq, final_response, header_values, invite, next_request, status, top_branch, RawPeer,
};
use common::Sidecar;
use rsip::{Method, SipMessage};
use sha2::Digest as _;

/// A `digest` trunk whose username and password come from a file, between a
/// hand-driven core and Edge; ready once the first credential is read.
struct DigestRig {
    dir: tempfile::TempDir,
    core: RawPeer,
    sidecar: Sidecar,
    edge: RawPeer,
    proxy: SocketAddr,
}

impl DigestRig {
    async fn start(password: &str) -> DigestRig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("login"), format!("alice\n{password}\n")).unwrap();
        let core = RawPeer::bind().await;
        let config = format!(
            // The file is not polled: only a forced refresh (a refused password) reads it.
            "{}auth = \"digest\"\n\n[trunk.credentials]\nkind = \"file\"\nformat = \"username_password\"\npoll_interval = \"1h\"\nforce_refresh_interval = \"1s\"\npath = \"{}\"\n",
            Sidecar::config("udp:127.0.0.1:9", &format!("udp:{}", core.addr), ""),
            dir.path().join("login").display()
        );
        let sidecar = Sidecar::start_ready(&config).await;
        let edge = RawPeer::bind().await;
        let proxy = sidecar.addr(Side::Edge, Transport::Udp);
        DigestRig {
            dir,
            core,
            sidecar,
            edge,
            proxy,
        }
    }

    fn change_password(&self, password: &str) {
        std::fs::write(
            self.dir.path().join("login"),
            format!("alice\n{password}\n"),
        )
        .unwrap();
    }

    /// An INVITE from the Edge, numbered `seq`, with `extra` header lines.
    async fn call(&self, call_id: &str, seq: u32, extra: &str) {
        let request = invite(
            self.edge.addr,
            self.proxy,
            &format!("z9hG4bK{call_id}"),
            call_id,
        )
        .replace(
            "CSeq: 1 INVITE\r\n",
            &format!("CSeq: {seq} INVITE\r\n{extra}"),
        );
        self.edge.send(&request, self.proxy).await;
    }

    /// Answers `request` at the core with `code` and the given challenge header lines.
    async fn challenge(&self, request: &SipMessage, from: SocketAddr, code: u16, lines: &str) {
        let reason = if code == 401 {
            "Unauthorized"
        } else {
            "Proxy Authentication Required"
        };
        let text = answer(request, code, reason, "core-tag").replace(
            "Content-Length: 0\r\n",
            &format!("{lines}Content-Length: 0\r\n"),
        );
        self.core.send(&text, from).await;
    }
}

fn proxy_challenge(algorithm: &str, nonce: &str, extra: &str) -> String {
    format!(
        "Proxy-Authenticate: Digest realm=\"core.test\", nonce=\"{nonce}\", algorithm={algorithm}, qop=\"auth\", opaque=\"op-1\"{extra}\r\n"
    )
}

/// The parameters of a credentials header value.
fn params(value: &str) -> Challenge {
    let credentials = Challenge::parse(value).unwrap();
    assert!(credentials.is_scheme("Digest"), "{value}");
    credentials
}

/// RFC 7616 §3.4.1 `response` for qop=auth, computed here, independently of the sidecar.
fn expected_response(
    algorithm: &str,
    password: &str,
    method: &str,
    credentials: &Challenge,
) -> String {
    let hash = |text: String| -> String {
        match algorithm {
            "MD5" => hex(&md5::Md5::digest(text.as_bytes())),
            "SHA-256" => hex(&sha2::Sha256::digest(text.as_bytes())),
            other => panic!("no test hash for {other}"),
        }
    };
    let get = |name: &str| credentials.param(name).unwrap().to_string();
    let ha1 = hash(format!("{}:{}:{password}", get("username"), get("realm")));
    let ha2 = hash(format!("{method}:{}", get("uri")));
    hash(format!(
        "{ha1}:{}:{}:{}:auth:{ha2}",
        get("nonce"),
        get("nc"),
        get("cnonce")
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Checks one Digest answer: the nonce, count and algorithm it should have, and that
/// its `response` is right for `password`.
fn assert_answer(
    value: &str,
    method: &str,
    nonce: &str,
    nc: &str,
    algorithm: &str,
    password: &str,
) {
    let credentials = params(value);
    assert_eq!(credentials.param("username"), Some("alice"), "{value}");
    assert_eq!(credentials.param("realm"), Some("core.test"), "{value}");
    assert_eq!(credentials.param("nonce"), Some(nonce), "{value}");
    assert_eq!(credentials.param("nc"), Some(nc), "{value}");
    assert_eq!(credentials.param("algorithm"), Some(algorithm), "{value}");
    assert_eq!(credentials.param("opaque"), Some("op-1"), "{value}");
    assert_eq!(credentials.param("qop"), Some("auth"), "{value}");
    assert_eq!(
        credentials.param("response").unwrap(),
        expected_response(algorithm, password, method, &credentials),
        "{value}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_407_is_answered_by_one_resend_and_the_nonce_serves_later_requests() {
    let rig = DigestRig::start("wonderland").await;
    // The Edge's own credentials for the core are never passed on.
    rig.call("digest-1", 1, "Proxy-Authorization: Digest username=\"edge\", realm=\"x\", nonce=\"y\", uri=\"sip:z\", response=\"0\"\r\n")
        .await;
    let (first, from) = next_request(&rig.core, Method::Invite).await;
    assert_eq!(cseq(&first), "1 INVITE");
    assert!(header_values(&first, "Proxy-Authorization").is_empty());
    assert!(header_values(&first, "Authorization").is_empty());
    // MD5 and SHA-256 offered: SHA-256 is chosen.
    let offered = format!(
        "{}{}",
        proxy_challenge("MD5", "nonce-md5", ""),
        proxy_challenge("SHA-256", "nonce-sha", "")
    );
    rig.challenge(&first, from, 407, &offered).await;

    let (ack, _) = next_request(&rig.core, Method::Ack).await;
    assert_eq!(cseq(&ack), "1 ACK", "the 407 is acknowledged hop by hop");
    let (second, from) = next_request(&rig.core, Method::Invite).await;
    assert_eq!(cseq(&second), "2 INVITE", "re-sent with CSeq + 1");
    let answers = header_values(&second, "Proxy-Authorization");
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_answer(
        &answers[0],
        "INVITE",
        "nonce-sha",
        "00000001",
        "SHA-256",
        "wonderland",
    );

    let record_route = common::raw::record_routes(&second);
    let ok = common::raw::with_dialog(
        &answer(&second, 200, "OK", "core-tag"),
        &record_route,
        rig.core.addr,
        "",
    );
    rig.core.send(&ok, from).await;
    let response = final_response(&rig.edge).await;
    assert_eq!(status(&response), 200, "the Edge never sees the 407");
    assert_eq!(cseq(&response), "1 INVITE");

    let dialog = common::raw::EdgeDialog::from_response(&response, rig.edge.addr);
    rig.edge
        .send(&dialog.request("ACK", 1, "z9hG4bKdigestack", ""), rig.proxy)
        .await;
    let (ack, _) = next_request(&rig.core, Method::Ack).await;
    assert_eq!(cseq(&ack), "2 ACK");
    assert!(
        header_values(&ack, "Proxy-Authorization").is_empty(),
        "ACK cannot be challenged"
    );
    rig.edge
        .send(&dialog.request("BYE", 2, "z9hG4bKdigestbye", ""), rig.proxy)
        .await;
    let (bye, from) = next_request(&rig.core, Method::Bye).await;
    assert_eq!(cseq(&bye), "3 BYE");
    assert!(
        header_values(&bye, "Proxy-Authorization").is_empty(),
        "in a dialog answers wait for a challenge: the far end must not see them"
    );
    rig.core
        .send(&answer(&bye, 200, "OK", "core-tag"), from)
        .await;
    let response = final_response(&rig.edge).await;
    assert_eq!((status(&response), cseq(&response)), (200, "2 BYE".into()));

    // The next call answers the kept challenge at once: no round trip.
    rig.call("digest-2", 1, "").await;
    let (next, from) = next_request(&rig.core, Method::Invite).await;
    assert_eq!(cseq(&next), "1 INVITE");
    let answers = header_values(&next, "Proxy-Authorization");
    assert_answer(
        &answers[0],
        "INVITE",
        "nonce-sha",
        "00000002",
        "SHA-256",
        "wonderland",
    );
    // The core hands out the next nonce with its success (RFC 7616 §3.5). That header
    // is about the sidecar's credentials: the Edge does not get it.
    let ok = answer(&next, 200, "OK", "core-tag").replace(
        "Content-Length: 0\r\n",
        "Proxy-Authentication-Info: nextnonce=\"nonce-next\", qop=auth, rspauth=\"0\"\r\nContent-Length: 0\r\n",
    );
    rig.core.send(&ok, from).await;
    let response = final_response(&rig.edge).await;
    assert_eq!(status(&response), 200);
    assert!(header_values(&response, "Proxy-Authentication-Info").is_empty());
    rig.call("digest-3", 1, "").await;
    let (third, from) = next_request(&rig.core, Method::Invite).await;
    assert_answer(
        &header_values(&third, "Proxy-Authorization")[0],
        "INVITE",
        "nonce-next",
        "00000001",
        "SHA-256",
        "wonderland",
    );
    rig.core
        .send(&answer(&third, 486, "Busy Here", "core-tag"), from)
        .await;
    assert_eq!(status(&final_response(&rig.edge).await), 486);

    let stats = rig.sidecar.app.stats.snapshot();
    assert_eq!(
        (
            stats.rejections_absorbed,
            stats.digest_challenges_answered,
            stats.resends,
            stats.resends_impossible
        ),
        (1, 1, 1, 0)
    );
    rig.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_nonce_is_answered_once_more_and_a_third_challenge_reaches_the_edge() {
    let rig = DigestRig::start("wonderland").await;
    rig.call("stale", 1, "").await;
    let (first, from) = next_request(&rig.core, Method::Invite).await;
    rig.challenge(&first, from, 407, &proxy_challenge("MD5", "n1", ""))
        .await;
    let (second, from) = next_request(&rig.core, Method::Invite).await;
    assert_eq!(cseq(&second), "2 INVITE");
    assert_answer(
        &header_values(&second, "Proxy-Authorization")[0],
        "INVITE",
        "n1",
        "00000001",
        "MD5",
        "wonderland",
    );
    // The server let n1 expire meanwhile: stale, so the same password is tried again.
    rig.challenge(
        &second,
        from,
        407,
        &proxy_challenge("MD5", "n2", ", stale=true"),
    )
    .await;
    let (third, from) = next_request(&rig.core, Method::Invite).await;
    assert_eq!(cseq(&third), "3 INVITE");
    assert_answer(
        &header_values(&third, "Proxy-Authorization")[0],
        "INVITE",
        "n2",
        "00000001",
        "MD5",
        "wonderland",
    );
    // Stale again: enough. The Edge gets the challenge with its own CSeq.
    rig.challenge(
        &third,
        from,
        407,
        &proxy_challenge("MD5", "n3", ", stale=true"),
    )
    .await;
    let response = final_response(&rig.edge).await;
    assert_eq!(
        (status(&response), cseq(&response)),
        (407, "1 INVITE".into())
    );
    let stats = rig.sidecar.app.stats.snapshot();
    assert_eq!((stats.resends, stats.digest_challenges_answered), (2, 2));
    rig.sidecar.stop().await;
}

/// A REGISTER from the Edge on Call-ID `call_id`, numbered `seq`, with From tag `tag`.
fn register(edge: SocketAddr, seq: u32, call_id: &str, tag: &str) -> String {
    format!(
        "REGISTER sip:core.test SIP/2.0\r\nVia: SIP/2.0/UDP {edge};branch=z9hG4bKreg{seq}{call_id}\r\n\
         From: <sip:alice@core.test>;tag={tag}\r\nTo: <sip:alice@core.test>\r\n\
         Call-ID: {call_id}\r\nCSeq: {seq} REGISTER\r\nContact: <sip:alice@{edge}>\r\n\
         Expires: 300\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

fn www(nonce: &str, extra: &str) -> String {
    format!("WWW-Authenticate: Digest realm=\"core.test\", nonce=\"{nonce}\", qop=\"auth\", opaque=\"op-1\"{extra}\r\n")
}

/// A registration refreshed 40 times on one Call-ID, each refresh meeting a stale nonce
/// and re-sent: the registrar sees CSeq rise every time (RFC 3261 §10.3 step 7), though
/// the Edge changes its From tag on every refresh, as many UAs do, and the re-sends
/// outnumber the steps the dialog table keeps one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_refreshed_through_stale_nonces_keeps_its_cseq_rising() {
    let rig = DigestRig::start("wonderland").await;
    let mut seen = Vec::new();
    for seq in 1..=40u32 {
        let tag = format!("refresh-{seq}");
        rig.edge
            .send(
                &register(rig.edge.addr, seq, "reg-refresh", &tag),
                rig.proxy,
            )
            .await;
        let (request, from) = next_request(&rig.core, Method::Register).await;
        seen.push(request_cseq(&request));
        rig.challenge(
            &request,
            from,
            401,
            &www(&format!("n{seq}"), ", stale=true"),
        )
        .await;
        let (resent, from) = next_request(&rig.core, Method::Register).await;
        seen.push(request_cseq(&resent));
        assert_answer(
            &header_values(&resent, "Authorization")[0],
            "REGISTER",
            &format!("n{seq}"),
            "00000001",
            "MD5",
            "wonderland",
        );
        rig.core
            .send(&answer(&resent, 200, "OK", "core-tag"), from)
            .await;
        let response = final_response(&rig.edge).await;
        assert_eq!(
            (status(&response), cseq(&response)),
            (200, format!("{seq} REGISTER"))
        );
    }
    assert!(
        seen.windows(2).all(|pair| pair[0] < pair[1]),
        "CSeq at the registrar: {seen:?}"
    );
    rig.sidecar.stop().await;
}

fn request_cseq(message: &SipMessage) -> u32 {
    cseq(message)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_is_retried_only_when_a_newer_one_exists() {
    let rig = DigestRig::start("old-password").await;
    let register = |seq: u32, call_id: &str| register(rig.edge.addr, seq, call_id, "edge-tag");
    let www = |nonce: &str| www(nonce, "");
    rig.edge.send(&register(1, "reg"), rig.proxy).await;
    let (first, from) = next_request(&rig.core, Method::Register).await;
    assert!(header_values(&first, "Authorization").is_empty());
    rig.challenge(&first, from, 401, &www("w1")).await;
    let (second, from) = next_request(&rig.core, Method::Register).await;
    assert_eq!(cseq(&second), "2 REGISTER");
    assert_answer(
        &header_values(&second, "Authorization")[0],
        "REGISTER",
        "w1",
        "00000001",
        "MD5",
        "old-password",
    );
    // A wrong password: the server challenges afresh, not stale (RFC 7616 §3.3). No
    // newer password exists, so the challenge is passed on.
    rig.challenge(&second, from, 401, &www("w2")).await;
    let response = final_response(&rig.edge).await;
    assert_eq!(
        (status(&response), cseq(&response)),
        (401, "1 REGISTER".into())
    );
    let stats = rig.sidecar.app.stats.snapshot();
    assert_eq!((stats.resends, stats.resends_impossible), (1, 1));

    // The password changes; the next REGISTER still goes with the old one and the
    // server refuses it with the very nonce it used. The old password was fetched again
    // unchanged after a refusal, so this refusal is read as permanent: no wait for the
    // rate limit, but once the limit (1 s here) allows a refresh, the refusal gets one,
    // and the newer password is found.
    rig.change_password("new-password");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    rig.edge.send(&register(2, "reg"), rig.proxy).await;
    let (third, from) = next_request(&rig.core, Method::Register).await;
    assert_eq!(
        cseq(&third),
        "3 REGISTER",
        "the registrar saw 2 for this Call-ID already (§10.3 step 7)"
    );
    let sent = header_values(&third, "Authorization");
    assert_eq!(params(&sent[0]).param("nonce"), Some("w2"));
    rig.challenge(&third, from, 401, &www("w2")).await;
    let (fourth, from) = next_request(&rig.core, Method::Register).await;
    assert_eq!(cseq(&fourth), "4 REGISTER");
    assert_answer(
        &header_values(&fourth, "Authorization")[0],
        "REGISTER",
        "w2",
        "00000002",
        "MD5",
        "new-password",
    );
    rig.core
        .send(&answer(&fourth, 200, "OK", "core-tag"), from)
        .await;
    let response = final_response(&rig.edge).await;
    assert_eq!(
        (status(&response), cseq(&response)),
        (200, "2 REGISTER".into())
    );
    rig.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_no_supported_digest_answers_goes_to_the_edge_at_once() {
    let rig = DigestRig::start("wonderland").await;
    rig.call("sha1", 1, "").await;
    let (first, from) = next_request(&rig.core, Method::Invite).await;
    rig.challenge(
        &first,
        from,
        407,
        "Proxy-Authenticate: Digest realm=\"core.test\", nonce=\"n\", algorithm=SHA-1\r\n",
    )
    .await;
    let response = final_response(&rig.edge).await;
    assert_eq!(status(&response), 407);
    let stats = rig.sidecar.app.stats.snapshot();
    assert_eq!((stats.resends, stats.digest_unanswerable), (0, 1));
    rig.sidecar.stop().await;
}

/// A CANCEL after a challenge was answered follows the re-sent INVITE: its branch and
/// its (translated) CSeq, and the Edge gets 487 with its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_the_answered_challenge_goes_on_the_new_branch() {
    let rig = DigestRig::start("wonderland").await;
    rig.call("cancel", 1, "").await;
    let (first, from) = next_request(&rig.core, Method::Invite).await;
    rig.challenge(&first, from, 407, &proxy_challenge("MD5", "n1", ""))
        .await;
    let (second, from) = next_request(&rig.core, Method::Invite).await;
    rig.core
        .send(&answer(&second, 180, "Ringing", "core-tag"), from)
        .await;
    loop {
        let (message, _) = rig
            .edge
            .receive(std::time::Duration::from_secs(5), "180")
            .await;
        if status(&message) == 180 {
            break;
        }
    }
    let cancel =
        common::raw::as_cancel(&invite(rig.edge.addr, rig.proxy, "z9hG4bKcancel", "cancel"));
    rig.edge.send(&cancel, rig.proxy).await;
    let (core_cancel, from) = next_request(&rig.core, Method::Cancel).await;
    assert_eq!(top_branch(&core_cancel), top_branch(&second));
    assert_eq!(cseq(&core_cancel), "2 CANCEL");
    rig.core
        .send(&answer(&core_cancel, 200, "OK", "core-tag"), from)
        .await;
    rig.core
        .send(
            &answer(&second, 487, "Request Terminated", "core-tag"),
            from,
        )
        .await;
    let response = loop {
        let response = final_response(&rig.edge).await;
        if cseq(&response).ends_with("INVITE") {
            break response;
        }
    };
    assert_eq!(
        (status(&response), cseq(&response)),
        (487, "1 INVITE".into())
    );
    rig.sidecar.stop().await;
}

/// The Edge cancelled before the core's challenge came back: the INVITE is not sent
/// again (a far end answering it at once would set up a call nobody wants); the
/// challenge ends the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_cancelled_before_its_challenge_is_not_re_sent() {
    let rig = DigestRig::start("wonderland").await;
    rig.call("early-cancel", 1, "").await;
    let (first, from) = next_request(&rig.core, Method::Invite).await;
    let cancel = common::raw::as_cancel(&invite(
        rig.edge.addr,
        rig.proxy,
        "z9hG4bKearly-cancel",
        "early-cancel",
    ));
    rig.edge.send(&cancel, rig.proxy).await;
    let cancelled = loop {
        let response = final_response(&rig.edge).await;
        if cseq(&response).ends_with("CANCEL") {
            break response;
        }
    };
    assert_eq!(status(&cancelled), 200);
    rig.challenge(&first, from, 407, &proxy_challenge("MD5", "n1", ""))
        .await;
    let response = final_response(&rig.edge).await;
    assert_eq!(
        (status(&response), cseq(&response)),
        (407, "1 INVITE".into())
    );
    let (ack, _) = next_request(&rig.core, Method::Ack).await;
    assert_eq!(cseq(&ack), "1 ACK");
    let stats = rig.sidecar.app.stats.snapshot();
    assert_eq!((stats.rejections_absorbed, stats.resends), (0, 0));
    rig.sidecar.stop().await;
}

/// With `digest_realm`, a challenge from another realm (a proxy or UA beyond the core)
/// is never answered: the password is not offered to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_configured_realm_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let core = RawPeer::bind().await;
    let config = Sidecar::digest_config(
        core.addr,
        dir.path(),
        "wonderland",
        "digest_realm = \"core.test\"\n",
    );
    let sidecar = Sidecar::start_ready(&config).await;
    let edge = RawPeer::bind().await;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    edge.send(
        &invite(edge.addr, proxy, "z9hG4bKrealm", "realm@test"),
        proxy,
    )
    .await;
    let (first, from) = next_request(&core, Method::Invite).await;
    let foreign =
        "Proxy-Authenticate: Digest realm=\"far-end.test\", nonce=\"f\", qop=\"auth\"\r\n";
    core.send(
        &answer(&first, 407, "Proxy Authentication Required", "t").replace(
            "Content-Length: 0\r\n",
            &format!("{foreign}Content-Length: 0\r\n"),
        ),
        from,
    )
    .await;
    let response = final_response(&edge).await;
    assert_eq!(status(&response), 407);
    let stats = sidecar.app.stats.snapshot();
    assert_eq!((stats.resends, stats.digest_unanswerable), (0, 1));
    sidecar.stop().await;
}
