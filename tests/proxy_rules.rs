//! Per-message rules of the running proxy, checked with hand-driven peers: Max-Forwards,
//! compact headers, Via received/rport, CANCEL without a transaction, unmatchable ACKs,
//! the allow list, overload, and the TCP transport (framing, keep-alive, size limit, idle
//! close, write timeout, reuse), and the order of a call's messages through the UDP
//! reading threads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::sip::message;
use byoc_sidecar::transport::Side;
use common::raw::{header_values, invite, status, RawPeer, Rig};
use common::*;
use rsip::message::HasHeaders;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn max_forwards_zero_is_answered_483_and_not_forwarded() {
    let Rig {
        core,
        sidecar,
        edge,
        proxy,
    } = Rig::start("").await;
    let request = invite(edge.addr, proxy, "z9hG4bKmf0", "mf0@test")
        .replace("Max-Forwards: 70", "Max-Forwards: 0");
    edge.send(&request, proxy).await;
    let mut codes = Vec::new();
    while codes.last() != Some(&483) {
        codes.push(status(&edge.receive(WAIT, "483").await.0));
    }
    assert_eq!(codes, vec![100, 483]);
    let forwarded = tokio::time::timeout(
        Duration::from_millis(300),
        core.socket.recv_from(&mut [0u8; 10]),
    )
    .await;
    assert!(
        forwarded.is_err(),
        "a request with Max-Forwards 0 must not be forwarded"
    );
    assert_eq!(sidecar.app.stats.snapshot().locally_rejected, 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn compact_request_is_proxied_with_received_rport_and_decremented_max_forwards() {
    let Rig {
        core,
        sidecar,
        edge,
        proxy,
    } = Rig::start("").await;
    // Compact forms, and a sent-by that is not the real source (as behind NAT).
    let compact = format!(
        "OPTIONS sip:service@{proxy} SIP/2.0\r\n\
         v: SIP/2.0/UDP 192.0.2.99:5099;rport;branch=z9hG4bKcompact\r\n\
         f: <sip:edge@192.0.2.99>;tag=1\r\nt: <sip:service@{proxy}>\r\ni: compact@test\r\n\
         CSeq: 7 OPTIONS\r\nMax-Forwards: 10\r\nl: 0\r\n\r\n"
    );
    edge.send(&compact, proxy).await;
    let (request, from) = core.receive(WAIT, "OPTIONS at the core").await;
    let vias = header_values(&request, "Via");
    assert_eq!(vias.len(), 2, "{vias:?}");
    let ours = message::top_via(request.headers()).unwrap();
    assert!(ours.branch().unwrap().starts_with("z9hG4bK"));
    assert!(ours.param("rport").is_some());
    let theirs = byoc_sidecar::sip::Via::parse(&vias[1]).unwrap();
    assert_eq!(
        theirs.param("received"),
        Some(Some("127.0.0.1")),
        "{theirs}"
    );
    let rport = edge.addr.port().to_string();
    assert_eq!(
        theirs.param("rport"),
        Some(Some(rport.as_str())),
        "{theirs}"
    );
    assert_eq!(header_values(&request, "Max-Forwards"), vec!["9"]);
    assert_eq!(header_values(&request, "Call-ID"), vec!["compact@test"]);
    assert!(
        header_values(&request, "Record-Route").is_empty(),
        "OPTIONS creates no dialog"
    );
    // The answer goes back to the real source port, not to the sent-by 192.0.2.99:5099.
    let answer = common::raw::answer(&request, 200, "OK", "core");
    core.send(&answer, from).await;
    let (response, _) = edge.receive(WAIT, "200 for OPTIONS").await;
    assert_eq!(status(&response), 200);
    assert_eq!(
        header_values(&response, "Via").len(),
        1,
        "the proxy's Via is removed"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn branches_are_unique_per_forwarded_request() {
    let Rig {
        core,
        sidecar,
        edge,
        proxy,
    } = Rig::start("").await;
    let mut branches = std::collections::HashSet::new();
    for index in 0..50 {
        edge.send(
            &invite(
                edge.addr,
                proxy,
                &format!("z9hG4bKu{index}"),
                &format!("u{index}@test"),
            ),
            proxy,
        )
        .await;
        let (request, _) = core.receive(WAIT, "INVITE").await;
        branches.insert(
            message::top_via(request.headers())
                .unwrap()
                .branch()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(branches.len(), 50);
    sidecar.stop().await;
}

#[tokio::test]
async fn cancel_without_matching_invite_gets_481() {
    let sidecar = Sidecar::start("udp:127.0.0.1:9", "udp:127.0.0.1:9", "").await;
    let edge = RawPeer::bind().await;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    let cancel =
        common::raw::as_cancel(&invite(edge.addr, proxy, "z9hG4bKnothing", "nothing@test"));
    edge.send(&cancel, proxy).await;
    assert_eq!(status(&edge.receive(WAIT, "481").await.0), 481);
    sidecar.stop().await;
}

#[tokio::test]
async fn sources_outside_the_allow_list_are_dropped_and_counted() {
    let core = RawPeer::bind().await;
    let text = Sidecar::config("udp:127.0.0.2:9", &format!("udp:{}", core.addr), "").replacen(
        "allow = [\"127.0.0.0/8\"]",
        "allow = [\"127.0.0.5/32\"]",
        1,
    );
    let sidecar = Sidecar::start_with(&text).await;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    // 127.0.0.1 is neither in edge.allow nor the trunk's edge address.
    let stranger = RawPeer::bind().await;
    stranger
        .send(
            &invite(stranger.addr, proxy, "z9hG4bKstranger", "s@test"),
            proxy,
        )
        .await;
    let silence = tokio::time::timeout(
        Duration::from_millis(300),
        stranger.socket.recv_from(&mut [0u8; 10]),
    )
    .await;
    assert!(silence.is_err(), "no answer to a stranger");
    // The trunk's own edge address is allowed without being listed.
    let trunk_edge = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let trunk_addr = trunk_edge.local_addr().unwrap();
    let request = invite(trunk_addr, proxy, "z9hG4bKfriend", "f@test");
    trunk_edge.send_to(request.as_bytes(), proxy).await.unwrap();
    core.receive(WAIT, "INVITE from the trunk's edge").await;
    assert_eq!(sidecar.app.stats.snapshot().not_allowed_dropped, 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn full_transaction_table_answers_503() {
    let Rig {
        core,
        sidecar,
        edge,
        proxy,
    } = Rig::start("max_transactions = 2").await;
    edge.send(
        &invite(edge.addr, proxy, "z9hG4bKfirst", "first@test"),
        proxy,
    )
    .await;
    assert_eq!(status(&edge.receive(WAIT, "100").await.0), 100);
    core.receive(WAIT, "first INVITE").await;
    edge.send(
        &invite(edge.addr, proxy, "z9hG4bKsecond", "second@test"),
        proxy,
    )
    .await;
    let (response, _) = edge.receive(WAIT, "503").await;
    assert_eq!(status(&response), 503);
    assert_eq!(header_values(&response, "Call-ID"), vec!["second@test"]);
    assert_eq!(sidecar.app.stats.snapshot().overload_rejected, 1);
    sidecar.stop().await;
}

/// Byte-at-a-time and several-per-write delivery over TCP, and a CRLF keep-alive ping.
#[tokio::test]
async fn tcp_stream_is_framed_across_partial_and_merged_writes() {
    let core = RawPeer::bind().await;
    let sidecar = Sidecar::start("udp:127.0.0.1:9", &format!("udp:{}", core.addr), "").await;
    let proxy = sidecar.addr(Side::Edge, Transport::Tcp);
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let local = stream.local_addr().unwrap();
    let options = |n: u32| {
        format!(
            "OPTIONS sip:service@{proxy} SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bKtcp{n}\r\n\
             From: <sip:edge@{local}>;tag=1\r\nTo: <sip:service@{proxy}>\r\nCall-ID: tcp{n}@test\r\n\
             CSeq: {n} OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 4\r\n\r\nbody"
        )
    };
    let first = options(1);
    for chunk in first.as_bytes().chunks(7) {
        stream.write_all(chunk).await.unwrap();
        stream.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let merged = format!("{}\r\n{}", options(2), options(3));
    stream.write_all(merged.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (request, _) = core.receive(WAIT, "OPTIONS over TCP").await;
        seen.push(header_values(&request, "Call-ID")[0].clone());
        assert_eq!(request.body(), b"body");
    }
    seen.sort();
    assert_eq!(seen, vec!["tcp1@test", "tcp2@test", "tcp3@test"]);

    stream.write_all(b"\r\n\r\n").await.unwrap();
    let mut pong = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut pong))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&pong, b"\r\n");
    sidecar.stop().await;
}

#[tokio::test]
async fn tcp_message_over_the_size_limit_closes_the_connection() {
    let sidecar = Sidecar::start(
        "udp:127.0.0.1:9",
        "udp:127.0.0.1:9",
        "max_message_size = 2048",
    )
    .await;
    let mut stream = TcpStream::connect(sidecar.addr(Side::Edge, Transport::Tcp))
        .await
        .unwrap();
    let huge = format!(
        "OPTIONS sip:a SIP/2.0\r\nContent-Length: 100000\r\n\r\n{}",
        "x".repeat(4096)
    );
    let _ = stream.write_all(huge.as_bytes()).await;
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(WAIT, stream.read(&mut buffer))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "connection should be closed, got {read:?}"
    );
    assert_eq!(sidecar.app.stats.snapshot().tcp_framing_errors, 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn udp_reading_threads_let_their_sockets_go_at_shutdown() {
    let sidecar = Sidecar::start("udp:127.0.0.1:9", "udp:127.0.0.1:9", "udp_threads = 3").await;
    let edge = sidecar.addr(Side::Edge, Transport::Udp);
    sidecar.stop().await;
    // Each reading thread sees the stop within its read wait and drops its socket.
    let mut bound = None;
    for _ in 0..100 {
        match std::net::UdpSocket::bind(edge) {
            Ok(socket) => {
                bound = Some(socket);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(bound.is_some(), "{edge} still held after shutdown");
}

#[tokio::test(start_paused = true)]
async fn idle_tcp_connection_is_closed_after_the_idle_timeout() {
    let sidecar = Sidecar::start(
        "udp:127.0.0.1:9",
        "udp:127.0.0.1:9",
        &format!("{VIRTUAL_TIME}\ntcp_idle_timeout = \"30s\""),
    )
    .await;
    let mut stream = TcpStream::connect(sidecar.addr(Side::Edge, Transport::Tcp))
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let read = stream.read(&mut [0u8; 16]).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    sidecar.stop().await;
}

/// Requests to a TCP core share one connection the sidecar opened; the answers come back
/// on it.
#[tokio::test]
async fn connection_to_the_core_is_reused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let core_addr = listener.local_addr().unwrap();
    let sidecar = Sidecar::start("udp:127.0.0.1:9", &format!("tcp:{core_addr}"), "").await;
    let edge = RawPeer::bind().await;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    for index in 0..3 {
        edge.send(
            &invite(
                edge.addr,
                proxy,
                &format!("z9hG4bKreuse{index}"),
                &format!("reuse{index}@test"),
            ),
            proxy,
        )
        .await;
    }
    let (mut connection, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut framer = byoc_sidecar::sip::framing::StreamFramer::new(65_536);
    let mut requests = Vec::new();
    while requests.len() < 3 {
        let mut buffer = [0u8; 4096];
        let length = tokio::time::timeout(WAIT, connection.read(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        assert!(length > 0, "connection closed early");
        framer.push(&buffer[..length]);
        while let Some(byoc_sidecar::sip::framing::Frame::Message(bytes)) =
            framer.next_frame().unwrap()
        {
            requests.push(message::parse(&bytes, false).unwrap());
        }
    }
    let second = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(second.is_err(), "a second connection was opened");
    // Answer the first INVITE on the same connection; it reaches the Edge.
    let busy = common::raw::answer(&requests[0], 486, "Busy Here", "core");
    connection.write_all(busy.as_bytes()).await.unwrap();
    loop {
        let (response, _) = edge.receive(WAIT, "486 at the Edge").await;
        if status(&response) == 486 {
            break;
        }
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn request_that_already_passed_through_the_proxy_is_a_loop() {
    let Rig {
        core: _core,
        sidecar,
        edge,
        proxy,
    } = Rig::start("").await;
    let core_side = sidecar.addr(Side::Core, Transport::Udp);
    let looped = invite(edge.addr, proxy, "z9hG4bKloop", "loop@test").replace(
        "Max-Forwards: 70",
        &format!(
            "Via: SIP/2.0/UDP {core_side};branch=z9hG4bKbsc0123456789abcdef\r\nMax-Forwards: 70"
        ),
    );
    edge.send(&looped, proxy).await;
    assert_eq!(status(&edge.receive(WAIT, "482").await.0), 482);
    sidecar.stop().await;
}

/// A request with a To tag that is not in a dialog this proxy record-routed goes to its
/// trunk's core, whatever its Request-URI says: an Edge cannot steer requests to another
/// allowed host (such as another trunk's core) by writing it into the Request-URI.
#[tokio::test]
async fn in_dialog_request_without_our_route_goes_to_the_trunk() {
    let core = RawPeer::bind().await;
    let elsewhere = RawPeer::bind().await;
    let sidecar = Sidecar::start("udp:127.0.0.1:9", &format!("udp:{}", core.addr), "").await;
    let edge = RawPeer::bind().await;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    let bye = format!(
        "BYE sip:x@{} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKsteer\r\n\
         From: <sip:edge@a>;tag=1\r\nTo: <sip:x@b>;tag=2\r\nCall-ID: steer@test\r\n\
         CSeq: 2 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        elsewhere.addr, edge.addr
    );
    edge.send(&bye, proxy).await;
    core.receive(WAIT, "BYE at the trunk's core").await;
    let leaked = tokio::time::timeout(
        Duration::from_millis(300),
        elsewhere.socket.recv_from(&mut [0u8; 10]),
    )
    .await;
    assert!(
        leaked.is_err(),
        "the BYE reached the host named in its Request-URI"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn ack_outside_any_record_routed_dialog_is_dropped() {
    let Rig {
        core,
        sidecar,
        edge,
        proxy,
    } = Rig::start("").await;
    let ack = common::raw::as_ack(&invite(edge.addr, proxy, "z9hG4bKlateack", "late@test"))
        .replace("To: <sip:service@", "To: <sip:x@")
        .replace(
            &format!("To: <sip:x@{proxy}>"),
            &format!("To: <sip:x@{proxy}>;tag=9"),
        );
    edge.send(&ack, proxy).await;
    assert!(
        common::raw::stays_quiet(&core, 300).await,
        "a stray ACK was forwarded"
    );
    assert_eq!(sidecar.app.stats.snapshot().stray_acks, 1);
    sidecar.stop().await;
}

/// RFC 3261 §18.2.2: over TCP, when the connection a request came on is gone, the
/// response goes to a new connection at `received` and the Via's sent-by port (not the
/// vanished connection's ephemeral port).
#[tokio::test]
async fn tcp_response_after_the_edges_connection_closed_goes_to_the_sent_by_port() {
    let core = RawPeer::bind().await;
    let sidecar = Sidecar::start("udp:127.0.0.1:9", &format!("udp:{}", core.addr), "").await;
    let proxy = sidecar.addr(Side::Edge, Transport::Tcp);
    // Where the Edge listens for new connections, distinct from its outgoing one.
    let edge_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sent_by = edge_listener.local_addr().unwrap();
    let mut outgoing = TcpStream::connect(proxy).await.unwrap();
    let request = invite(sent_by, proxy, "z9hG4bKtcpgone", "tcpgone@test")
        .replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    outgoing.write_all(request.as_bytes()).await.unwrap();
    let (forwarded, from) = core.receive(WAIT, "INVITE at the core").await;
    drop(outgoing);
    tokio::time::sleep(Duration::from_millis(200)).await;
    core.send(
        &common::raw::answer(&forwarded, 486, "Busy Here", "core"),
        from,
    )
    .await;
    let (mut back, _) = tokio::time::timeout(WAIT, edge_listener.accept())
        .await
        .expect("a new connection")
        .unwrap();
    let mut framer = byoc_sidecar::sip::framing::StreamFramer::new(65_536);
    loop {
        let mut buffer = [0u8; 4096];
        let length = tokio::time::timeout(WAIT, back.read(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        assert!(length > 0, "closed before the 486 arrived");
        framer.push(&buffer[..length]);
        if let Some(byoc_sidecar::sip::framing::Frame::Message(bytes)) =
            framer.next_frame().unwrap()
        {
            let response = message::parse(&bytes, false).unwrap();
            assert_eq!(status(&response), 486);
            break;
        }
    }
    sidecar.stop().await;
}

/// A 2xx matching no transaction is forwarded by its Via only within the allow list: a
/// Via the core wrote cannot make the sidecar send anywhere else.
/// A 2xx that matches no transaction any more (after Timer M) is forwarded by its next
/// Via only when the Via it pops is really ours (a branch this proxy made, at our
/// address), and only to an address the Edge side allows.
#[tokio::test]
async fn stateless_response_forwarding_needs_our_via_and_stays_within_the_allow_list() {
    let core = RawPeer::bind().await;
    // T1 of 10 ms: Timer M (64·T1) ends the INVITE's Accepted state after 640 ms.
    let text = Sidecar::config(
        "udp:127.0.0.2:9",
        &format!("udp:{}", core.addr),
        "t1 = \"10ms\"\nt2 = \"40ms\"",
    )
    .replacen("allow = [\"127.0.0.0/8\"]", "allow = [\"127.0.0.5/32\"]", 1);
    let sidecar = Sidecar::start_with(&text).await;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    let core_side = sidecar.addr(Side::Core, Transport::Udp);
    let edge = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let edge_addr = edge.local_addr().unwrap();
    let outsider = RawPeer::bind().await; // 127.0.0.1: not allowed on the edge side
    edge.send_to(
        invite(edge_addr, proxy, "z9hG4bKlate", "late@test").as_bytes(),
        proxy,
    )
    .await
    .unwrap();
    let (request, from) = common::raw::next_request(&core, rsip::Method::Invite).await;
    let ok = common::raw::answer(&request, 200, "OK", "core");
    core.send(&ok, from).await;
    let mut buffer = [0u8; 4096];
    let mut relayed = Vec::new();
    while !relayed.contains(&200) {
        let (length, _) = tokio::time::timeout(WAIT, edge.recv_from(&mut buffer))
            .await
            .expect("the 200 at the Edge")
            .unwrap();
        relayed.push(status(&message::parse(&buffer[..length], true).unwrap()));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await; // past Timer M
    let strays = sidecar.app.stats.snapshot().stray_responses;

    // The same 2xx again: our Via, a branch we made, the Edge allowed: forwarded.
    core.send(&ok, core_side).await;
    let late = tokio::time::timeout(WAIT, edge.recv_from(&mut buffer)).await;
    assert!(late.is_ok(), "the allowed Edge did not get the late 2xx");

    // Our branch, but the next Via names an address outside the allow list: dropped.
    let theirs = header_values(&request, "Via")[1].clone();
    let to_outsider = ok.replace(
        &theirs,
        &format!("SIP/2.0/UDP {};branch=z9hG4bKedge", outsider.addr),
    );
    assert_ne!(to_outsider, ok);
    core.send(&to_outsider, core_side).await;
    // A branch with our prefix that we never made: dropped.
    let ours = common::raw::top_branch(&request);
    let forged = ok.replace(&ours, "z9hG4bKbsc0000000000000000000000aa");
    core.send(&forged, core_side).await;
    // Our branch under another host's sent-by: dropped.
    let elsewhere = ok.replacen(&core_side.to_string(), "127.0.0.9:5060", 1);
    assert_ne!(elsewhere, ok);
    core.send(&elsewhere, core_side).await;
    let leaked = tokio::time::timeout(
        Duration::from_millis(300),
        outsider.socket.recv_from(&mut [0u8; 10]),
    )
    .await;
    assert!(
        leaked.is_err(),
        "a response was sent outside the allow list"
    );
    let at_edge =
        tokio::time::timeout(Duration::from_millis(300), edge.recv_from(&mut buffer)).await;
    assert!(at_edge.is_err(), "a forged 2xx reached the Edge");
    assert_eq!(sidecar.app.stats.snapshot().stray_responses, strays + 3);
    sidecar.stop().await;
}

/// An ACK whose transaction key cannot be built (an RFC 2543 Via branch, without the
/// z9hG4bK magic cookie) is dropped and counted as malformed, never answered: an ACK
/// gets no response (RFC 3261 §17.1.1.3), nor is it forwarded. Defect found in issue 12
/// (it was answered 400).
#[tokio::test]
async fn an_ack_without_the_magic_cookie_is_dropped_not_answered() {
    let Rig {
        core,
        sidecar,
        edge,
        proxy,
    } = Rig::start("").await;
    let before = sidecar.app.stats.snapshot();
    let ack = common::raw::as_ack(&invite(edge.addr, proxy, "1234", "rfc2543@test"));
    edge.send(&ack, proxy).await;
    assert!(
        common::raw::stays_quiet(&edge, 300).await,
        "the ACK was answered"
    );
    assert!(
        common::raw::stays_quiet(&core, 100).await,
        "the ACK was forwarded"
    );
    let after = sidecar.app.stats.snapshot();
    assert_eq!(
        after.malformed_dropped,
        before.malformed_dropped + 1,
        "{after:?}"
    );
    assert_eq!(after.locally_rejected, before.locally_rejected, "{after:?}");
    sidecar.stop().await;
}

/// A core that accepts the sidecar's TCP connection and then stops reading cannot hold
/// the connection (and its slot and queue) for ever: once the socket buffers are full, a
/// write that does not finish within `tcp_write_timeout` closes the connection and is
/// counted in `tcp_write_timeouts`. Defect found in issue 12 (the write waited without
/// limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_loses_its_connection_after_the_write_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let core_addr = listener.local_addr().unwrap();
    // Accepts every connection and holds it open without reading, so the kernel neither
    // drains nor resets it while the test runs.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
        held
    });
    let sidecar = Sidecar::start(
        "udp:127.0.0.1:9",
        &format!("tcp:{core_addr}"),
        "tcp_write_timeout = \"200ms\"",
    )
    .await;
    let edge = RawPeer::bind().await;
    let edge_addr = edge.addr;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    // 50 kB bodies: under max_message_size (65535) and the UDP datagram limit, so a few
    // hundred of them overflow the loopback socket buffers toward the core.
    let body = "x".repeat(50_000);
    for index in 0..1000 {
        if sidecar.app.stats.snapshot().tcp_write_timeouts > 0 {
            break;
        }
        let request = format!(
            "OPTIONS sip:service@{proxy} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {edge_addr};branch=z9hG4bKstall{index}\r\n\
             From: <sip:edge@{edge_addr}>;tag=1\r\nTo: <sip:service@{proxy}>\r\n\
             Call-ID: stall{index}@test\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        edge.send(&request, proxy).await;
        // Paced: the sidecar's UDP receive buffer holds only a few datagrams this size.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // What the Edge receives meanwhile (503, 408, nothing) does not matter here.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sidecar.app.stats.snapshot().tcp_write_timeouts == 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = sidecar.app.stats.snapshot();
    assert!(
        stats.tcp_write_timeouts >= 1,
        "no write to the stalled core timed out: {stats:?}"
    );
    sidecar.stop().await;
    holder.abort();
}

/// How many calls the order tests below put through at once: enough that back-to-back
/// datagrams of one call meet two reading threads many times over.
const BURST_CALLS: usize = 200;

/// How many calls of a burst may be unfinished at once: the test's peers share one
/// task with their readers, while the proxy's reading threads answer at once, so a
/// burst sent without a window would overflow a peer's socket buffer (212 KiB by
/// default). Within the window a call's datagrams go back to back.
const WINDOW: usize = 16;

/// Waits until `call` is within [`WINDOW`] of the calls `done`.
async fn pace(call: usize, done: &std::cell::Cell<usize>) {
    while call >= done.get() + WINDOW {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What each call of a burst received at `peer`, by Call-ID, until every call has one
/// message for which `last` holds, counting them in `finished`.
async fn per_call(
    peer: &RawPeer,
    mut keep: impl FnMut(&rsip::SipMessage) -> Option<String>,
    last: impl Fn(&str) -> bool,
    finished: &std::cell::Cell<usize>,
) -> std::collections::HashMap<String, Vec<String>> {
    let mut seen: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut done = 0;
    let mut buffer = vec![0u8; 65_536];
    while done < BURST_CALLS {
        let received = tokio::time::timeout(WAIT, peer.socket.recv_from(&mut buffer)).await;
        let Ok(Ok((length, _))) = received else {
            panic!("{done} of {BURST_CALLS} calls complete after {WAIT:?}; seen: {seen:?}");
        };
        let message = message::parse(&buffer[..length], true).unwrap();
        if let Some(what) = keep(&message) {
            let call = header_values(&message, "Call-ID")[0].clone();
            if last(&what) {
                done += 1;
                finished.set(done);
            }
            seen.entry(call).or_default().push(what);
        }
    }
    seen
}

/// The INVITE of call `call` of a burst from the Edge; `tag` keeps two tests' calls apart.
fn burst_invite(edge: &RawPeer, proxy: std::net::SocketAddr, tag: &str, call: usize) -> String {
    let (branch, call_id) = (format!("z9hG4bK{tag}{call}"), format!("{tag}{call}"));
    invite(edge.addr, proxy, &branch, &call_id)
}

/// Every call of a burst saw exactly `expected`, in that order.
fn every_call_saw(seen: std::collections::HashMap<String, Vec<String>>, expected: &[&str]) {
    assert_eq!(seen.len(), BURST_CALLS);
    for (call, what) in seen {
        assert_eq!(what, expected, "{call}");
    }
}

#[tokio::test]
async fn a_calls_back_to_back_answers_reach_the_edge_in_the_order_the_core_sent_them() {
    // The UDP sockets are read by several threads (the default): two of a call's
    // answers queued together must still be handled and sent in the order they came.
    let rig = Rig::start("").await;
    // The Edge reads while the calls go on, at most [`WINDOW`] calls behind.
    let finished = std::cell::Cell::new(0);
    let at_edge = per_call(
        &rig.edge,
        |message| (status(message) != 100).then(|| status(message).to_string()),
        |code| code == "200",
        &finished,
    );
    let calls = async {
        for call in 0..BURST_CALLS {
            let request = burst_invite(&rig.edge, rig.proxy, "o", call);
            rig.edge.send(&request, rig.proxy).await;
            pace(call, &finished).await;
        }
    };
    let answers = async {
        // Each call's INVITE answered once, whatever the proxy retransmitted meanwhile.
        let mut answered = std::collections::HashSet::new();
        while answered.len() < BURST_CALLS {
            let (request, from) = common::raw::next_request(&rig.core, rsip::Method::Invite).await;
            if !answered.insert(header_values(&request, "Call-ID")[0].clone()) {
                continue;
            }
            for (code, reason) in [(180, "Ringing"), (183, "Session Progress"), (200, "OK")] {
                let answer = common::raw::answer(&request, code, reason, "core-tag");
                rig.core.send(&answer, from).await;
            }
        }
    };
    let (seen, (), ()) = tokio::join!(at_edge, calls, answers);
    every_call_saw(seen, &["180", "183", "200"]);
    rig.sidecar.stop().await;
}

#[tokio::test]
async fn a_cancel_right_behind_its_invite_finds_the_invite() {
    // Were the CANCEL handled before its INVITE, it would find no transaction (481)
    // and the INVITE would ring on.
    let rig = Rig::start("").await;
    let finished = std::cell::Cell::new(0);
    let at_edge = per_call(
        &rig.edge,
        |message| {
            let cseq = header_values(message, "CSeq")[0].clone();
            cseq.ends_with("CANCEL")
                .then(|| status(message).to_string())
        },
        |_| true,
        &finished,
    );
    let calls = async {
        for call in 0..BURST_CALLS {
            let request = burst_invite(&rig.edge, rig.proxy, "c", call);
            rig.edge.send(&request, rig.proxy).await;
            rig.edge
                .send(&common::raw::as_cancel(&request), rig.proxy)
                .await;
            pace(call, &finished).await;
        }
    };
    let (seen, ()) = tokio::join!(at_edge, calls);
    every_call_saw(seen, &["200"]);
    rig.sidecar.stop().await;
}
