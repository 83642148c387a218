//! Failover across a trunk's core hosts, message by message, with hand-driven cores
//! behind one SRV name (core a first by priority, core b next) and a DNS server the test
//! runs: a late answer from a host the request moved away from is cancelled or hung up
//! and never reaches the Edge; a 503 without Retry-After moves the request, one with it
//! is passed on; a CANCEL before any answer ends the call with 487 and blames no host;
//! a dialog keeps its host (and that host's requests are still let in) after DNS drops
//! it. The core side allows no network of its own: only what the core's name resolves
//! to may talk to it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::transport::Side;
use common::dns::TestDns;
use common::raw::{self, RawPeer};
use common::*;
use rsip::{Method, SipMessage};

/// Two raw cores behind `_sip._udp.core.test` (a at priority 10, b at 20), an Edge, a
/// DNS server and a sidecar between them.
struct Rig {
    a: RawPeer,
    b: RawPeer,
    edge: RawPeer,
    dns: TestDns,
    sidecar: Sidecar,
}

impl Rig {
    /// `failover_timeout` is 1 s unless `extra_sip` sets it.
    async fn start(extra_sip: &str, ttl: u32) -> Rig {
        let extra_sip = if extra_sip.contains("failover_timeout") {
            extra_sip.to_string()
        } else {
            format!("failover_timeout = \"1s\"\n{extra_sip}")
        };
        let a = RawPeer::bind_on("127.0.0.2").await;
        let b = RawPeer::bind_on("127.0.0.3").await;
        let edge = RawPeer::bind().await;
        let dns = TestDns::start().await;
        dns.set_srv(
            "_sip._udp.core.test",
            &[
                (10, 0, a.addr.port(), "a.core.test"),
                (20, 0, b.addr.port(), "b.core.test"),
            ],
            ttl,
        );
        dns.set_addresses("a.core.test", &[a.addr.ip()], 60);
        dns.set_addresses("b.core.test", &[b.addr.ip()], 60);
        let text = format!(
            r#"{sides}
[sip]
{extra_sip}

[dns]
servers = ["{dns}"]
min_refresh = "500ms"

[[trunk]]
name = "test"
edge = "udp:{edge}"
core = "udp:core.test"
"#,
            sides = [
                side("edge", &["udp:127.0.0.1:0"], true, None),
                side("core_side", &["udp:127.0.0.1:0"], false, None),
            ]
            .concat(),
            dns = dns.addr(),
            edge = edge.addr,
        );
        let sidecar = Sidecar::start_with(&text).await;
        Rig {
            a,
            b,
            edge,
            dns,
            sidecar,
        }
    }

    fn target(&self) -> SocketAddr {
        self.sidecar.addr(Side::Edge, Transport::Udp)
    }

    async fn call(&self, call_id: &str) {
        let target = self.target();
        let branch = format!("z9hG4bK{call_id}");
        self.edge
            .send(
                &raw::invite(self.edge.addr, target, &branch, call_id),
                target,
            )
            .await;
    }
}

/// A dialog-creating 2xx from a raw core for `invite`: its Record-Route echoed, its own
/// Contact.
fn accepted(invite: &SipMessage, core: SocketAddr, tag: &str) -> String {
    raw::with_dialog(
        &raw::answer(invite, 200, "OK", tag),
        &raw::record_routes(invite),
        core,
        "",
    )
}

/// Everything `peer` receives within `quiet` of the previous message.
async fn messages(peer: &RawPeer, quiet: Duration) -> Vec<SipMessage> {
    peer.drain(quiet)
        .await
        .iter()
        .map(|text| byoc_sidecar::sip::message::parse(text.as_bytes(), true).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_from_the_abandoned_host_is_cancelled_and_hung_up_never_forwarded() {
    let rig = Rig::start("", 60).await;
    rig.call("late1").await;
    let (at_a, from_a) = raw::next_request(&rig.a, Method::Invite).await;
    // Core a says nothing for a second: the INVITE moves to core b.
    let (at_b, from_b) = raw::next_request(&rig.b, Method::Invite).await;
    assert_ne!(raw::top_branch(&at_a), raw::top_branch(&at_b));
    assert_eq!(raw::cseq(&at_a), raw::cseq(&at_b));
    rig.b
        .send(&accepted(&at_b, rig.b.addr, "core-b"), from_b)
        .await;
    let answer = raw::final_for(&rig.edge, "late1").await;
    assert_eq!(raw::status(&answer), 200);
    assert!(raw::header_values(&answer, "To")[0].contains("core-b"));

    // Core a wakes up: its 180 gets a CANCEL, its 200 an ACK and a BYE.
    rig.a
        .send(&raw::answer(&at_a, 180, "Ringing", "core-a"), from_a)
        .await;
    let (cancel, _) = raw::next_request(&rig.a, Method::Cancel).await;
    assert_eq!(raw::top_branch(&cancel), raw::top_branch(&at_a));
    rig.a
        .send(&accepted(&at_a, rig.a.addr, "core-a"), from_a)
        .await;
    let (ack, _) = raw::next_request(&rig.a, Method::Ack).await;
    assert!(raw::header_values(&ack, "To")[0].contains("core-a"));
    let (bye, bye_from) = raw::next_request(&rig.a, Method::Bye).await;
    assert!(raw::header_values(&bye, "To")[0].contains("core-a"));
    rig.a
        .send(&raw::answer(&bye, 200, "OK", "core-a"), bye_from)
        .await;
    // The Edge heard nothing of core a: no 180, no second 200.
    let seen = messages(&rig.edge, Duration::from_millis(700)).await;
    assert!(
        seen.iter().all(|message| !raw::header_values(message, "To")
            .iter()
            .any(|to| to.contains("core-a"))),
        "{seen:?}"
    );
    let stats = rig.sidecar.app.stats.snapshot();
    assert_eq!((stats.failovers, stats.late_calls_ended), (1, 1));
    rig.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_without_retry_after_moves_the_request_and_one_with_it_is_passed_on() {
    // No hold, so that the second call starts at core a again.
    let rig = Rig::start("failed_host_hold = \"0s\"", 60).await;
    rig.call("busy1").await;
    let (at_a, from_a) = raw::next_request(&rig.a, Method::Invite).await;
    let started = tokio::time::Instant::now();
    rig.a
        .send(
            &raw::answer(&at_a, 503, "Service Unavailable", "core-a"),
            from_a,
        )
        .await;
    let (at_b, from_b) = raw::next_request(&rig.b, Method::Invite).await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "moved only after {:?}: not by the 503",
        started.elapsed()
    );
    // Core a's 503 got its hop-by-hop ACK.
    raw::next_request(&rig.a, Method::Ack).await;
    rig.b
        .send(&raw::answer(&at_b, 486, "Busy Here", "core-b"), from_b)
        .await;
    assert_eq!(raw::status(&raw::final_for(&rig.edge, "busy1").await), 486);
    raw::next_request(&rig.b, Method::Ack).await;

    rig.call("busy2").await;
    let (at_a, from_a) = raw::next_request(&rig.a, Method::Invite).await;
    let refusal = raw::answer(&at_a, 503, "Service Unavailable", "core-a").replace(
        "Content-Length: 0\r\n",
        "Retry-After: 30\r\nContent-Length: 0\r\n",
    );
    rig.a.send(&refusal, from_a).await;
    assert_eq!(raw::status(&raw::final_for(&rig.edge, "busy2").await), 503);
    assert!(raw::stays_quiet(&rig.b, 300).await, "core b was tried");
    rig.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_any_answer_ends_the_call_with_487_and_blames_no_host() {
    // Timer B at 64·T1 = 3.2 s.
    let rig = Rig::start("t1 = \"50ms\"", 60).await;
    rig.call("cancel1").await;
    let (at_a, _) = raw::next_request(&rig.a, Method::Invite).await;
    let target = rig.target();
    let cancel = raw::as_cancel(&raw::invite(
        rig.edge.addr,
        target,
        "z9hG4bKcancel1",
        "cancel1",
    ));
    rig.edge.send(&cancel, target).await;
    // The CANCEL's own 200 at once, the INVITE's 487 when core a's transaction ends.
    let mut finals = Vec::new();
    while finals.len() < 2 {
        let answer = raw::final_for(&rig.edge, "cancel1").await;
        finals.push((raw::status(&answer), raw::cseq(&answer)));
    }
    finals.sort();
    assert_eq!(
        finals,
        vec![(200, "1 CANCEL".to_string()), (487, "1 INVITE".to_string())]
    );
    // Nothing was moved to core b, and core a is not held against.
    assert!(raw::stays_quiet(&rig.b, 200).await);
    let stats = rig.sidecar.app.stats.snapshot();
    assert_eq!(
        (stats.failovers, stats.core_host_failures),
        (0, 0),
        "{at_a:?}"
    );
    rig.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialog_keeps_its_host_after_dns_drops_it() {
    let rig = Rig::start("", 1).await;
    rig.call("keep1").await;
    let (invite, from_a) = raw::next_request(&rig.a, Method::Invite).await;
    rig.a
        .send(&accepted(&invite, rig.a.addr, "core-a"), from_a)
        .await;
    assert_eq!(raw::status(&raw::final_for(&rig.edge, "keep1").await), 200);

    // DNS now names core b only; once the sidecar has looked again, core a is no
    // longer where new calls go.
    rig.dns.set_srv(
        "_sip._udp.core.test",
        &[(10, 0, rig.b.addr.port(), "b.core.test")],
        1,
    );
    let core = rig
        .sidecar
        .app
        .peers
        .iter()
        .find(|(_, side, _)| *side == Side::Core)
        .map(|(_, _, destinations)| destinations.clone())
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while core
        .current()
        .candidates
        .iter()
        .any(|c| c.addr == rig.a.addr)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "DNS change not seen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Core a hangs up its call: its BYE is let in and reaches the Edge.
    let route = raw::record_routes(&invite).join(", ");
    let contact = raw::header_values(&invite, "Contact")[0].clone();
    let from = raw::header_values(&invite, "From")[0].clone();
    let to = raw::header_values(&invite, "To")[0].clone();
    let bye = format!(
        "BYE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {a};branch=z9hG4bKkeepbye\r\nRoute: {route}\r\n\
         From: {to};tag=core-a\r\nTo: {from}\r\nCall-ID: keep1\r\nCSeq: 1 BYE\r\n\
         Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        uri = byoc_sidecar::sip::header::name_addr_uri(&contact),
        a = rig.a.addr,
    );
    let core_side = rig.sidecar.addr(Side::Core, Transport::Udp);
    rig.a.send(&bye, core_side).await;
    let (at_edge, edge_from) = raw::next_request(&rig.edge, Method::Bye).await;
    rig.edge
        .send(&raw::answer(&at_edge, 200, "OK", "edge-tag"), edge_from)
        .await;
    let answer = raw::final_for(&rig.a, "keep1").await;
    assert_eq!(raw::status(&answer), 200);
    assert_eq!(rig.sidecar.app.stats.snapshot().not_allowed_dropped, 0);

    // A new call goes to core b.
    rig.call("keep2").await;
    raw::next_request(&rig.b, Method::Invite).await;
    rig.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_port_moves_the_request_at_once() {
    // Core a's port is closed: the INVITE comes back as ICMP port unreachable.
    let Rig {
        a,
        b,
        edge,
        dns: _dns,
        sidecar,
    } = Rig::start("failover_timeout = \"5s\"", 60).await;
    drop(a);
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    let started = tokio::time::Instant::now();
    edge.send(
        &raw::invite(edge.addr, target, "z9hG4bKicmp1", "icmp1"),
        target,
    )
    .await;
    let (invite, from) = raw::next_request(&b, Method::Invite).await;
    let moved = started.elapsed();
    assert!(
        moved < Duration::from_secs(2),
        "moved after {moved:?}: by the 5 s silence, not by the ICMP error"
    );
    b.send(&raw::answer(&invite, 486, "Busy Here", "core-b"), from)
        .await;
    assert_eq!(raw::status(&raw::final_for(&edge, "icmp1").await), 486);
    assert_eq!(sidecar.app.stats.snapshot().failovers, 1);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_core_unreachable_is_a_503_at_once_not_a_timeout() {
    let closed = RawPeer::bind_on("127.0.0.2").await.addr;
    let edge = RawPeer::bind().await;
    let sidecar = Sidecar::start(&format!("udp:{}", edge.addr), &format!("udp:{closed}"), "").await;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    edge.send(
        &raw::invite(edge.addr, target, "z9hG4bKicmp2", "icmp2"),
        target,
    )
    .await;
    // Timer B would answer 408 after 32 s; the transport error is a 503 now.
    assert_eq!(raw::status(&raw::final_for(&edge, "icmp2").await), 503);
    sidecar.stop().await;
}
