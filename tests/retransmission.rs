//! The retransmission paths of the proxy, with hand-driven peers: a lost 200 OK recovered
//! end to end against a real sipp UAS, and the timer schedules as they appear on the wire,
//! checked exactly in tokio's paused (virtual) time.

mod common;

use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::sip::message;
use byoc_sidecar::transport::Side;
use common::raw::{answer, header_values, invite, status, RawPeer, Rig};
use common::*;
use rsip::message::HasHeaders;
use rsip::SipMessage;

/// The Edge ignores the first 200 OK as if it were lost; the far end (sipp) retransmits
/// it, the sidecar forwards the retransmission, and the call completes with ACK and BYE
/// along the Record-Route path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_completes_when_the_first_200_ok_is_lost() {
    let uas_port = free_port();
    let sidecar = Sidecar::start("udp:127.0.0.1:9", &format!("udp:127.0.0.1:{uas_port}"), "").await;
    let uas = Sipp::start("uas", &uas_args("uas.xml", uas_port, Transport::Udp, 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let edge = RawPeer::bind().await;
    let proxy = sidecar.addr(Side::Edge, Transport::Udp);
    edge.send(
        &invite(edge.addr, proxy, "z9hG4bKlost200", "lost-200@test"),
        proxy,
    )
    .await;

    let mut codes = Vec::new();
    let ok = loop {
        let (response, _) = edge
            .receive(Duration::from_secs(10), "response to the INVITE")
            .await;
        codes.push(status(&response));
        if codes.iter().filter(|code| **code == 200).count() == 2 {
            break response;
        }
    };
    assert_eq!(
        codes.first(),
        Some(&100),
        "100 Trying comes first: {codes:?}"
    );
    assert!(codes.contains(&180), "{codes:?}");

    // ACK and BYE go to the Contact through the recorded route, reversed (RFC 3261 §12.1.2).
    let dialog = common::raw::EdgeDialog::from_response(&ok, edge.addr);
    assert_eq!(
        dialog.routes.len(),
        2,
        "the sidecar record-routes once per side: {:?}",
        dialog.routes
    );
    edge.send(&dialog.request("ACK", 1, "z9hG4bKack1", ""), proxy)
        .await;
    edge.send(&dialog.request("BYE", 2, "z9hG4bKbye1", ""), proxy)
        .await;
    let bye_answer = loop {
        let (response, _) = edge
            .receive(Duration::from_secs(10), "200 for the BYE")
            .await;
        if header_values(&response, "CSeq")[0].ends_with("BYE") {
            break response;
        }
    };
    assert_eq!(status(&bye_answer), 200);
    assert_all_calls_succeeded(&uas.finish(Duration::from_secs(30)).await, 1, "uas");
    sidecar.stop().await;
}

/// RFC 3261 Timer A and B as seen by a core that never answers: the INVITE arrives at 0,
/// then after 1, 2, 4, 8, 16 x T1; at 64 x T1 the Edge gets 408 Request Timeout.
#[tokio::test(start_paused = true)]
async fn silent_core_sees_timer_a_retransmissions_and_edge_gets_408_at_timer_b() {
    let Rig {
        core,
        sidecar,
        edge,
        proxy,
    } = Rig::start(VIRTUAL_TIME).await;
    edge.send(
        &invite(edge.addr, proxy, "z9hG4bKsilent", "silent@test"),
        proxy,
    )
    .await;
    assert_eq!(
        status(&edge.receive(Duration::from_secs(1), "100 Trying").await.0),
        100
    );

    let (first, _) = core
        .receive(Duration::from_secs(1), "INVITE at the core")
        .await;
    let start = tokio::time::Instant::now();
    let branch = message::top_via(first.headers())
        .unwrap()
        .branch()
        .unwrap()
        .to_string();
    let mut offsets = Vec::new();
    while offsets.len() < 6 {
        let (again, _) = core
            .receive(Duration::from_secs(40), "INVITE retransmission")
            .await;
        assert_eq!(
            message::top_via(again.headers()).unwrap().branch(),
            Some(branch.as_str())
        );
        offsets.push(start.elapsed());
    }
    let expected: Vec<Duration> = [500, 1500, 3500, 7500, 15500, 31500]
        .iter()
        .map(|ms| Duration::from_millis(*ms))
        .collect();
    assert_eq!(offsets, expected);

    let (timeout, _) = edge
        .receive(Duration::from_secs(40), "408 Request Timeout")
        .await;
    assert_eq!(status(&timeout), 408);
    assert_eq!(start.elapsed(), Duration::from_secs(32));
    assert_eq!(sidecar.app.stats.snapshot().client_timeouts, 1);
    sidecar.stop().await;
}

/// RFC 3261 Timer G and H toward an Edge that never ACKs a 486: the sidecar retransmits the
/// 486 after T1, 2T1, 4T1, then every T2, and gives up at 64 x T1.
#[tokio::test(start_paused = true)]
async fn unacknowledged_final_response_is_retransmitted_on_timer_g_until_timer_h() {
    let Rig {
        core,
        sidecar,
        edge,
        proxy,
    } = Rig::start(VIRTUAL_TIME).await;
    edge.send(&invite(edge.addr, proxy, "z9hG4bKbusy", "busy@test"), proxy)
        .await;
    let (request, from) = core
        .receive(Duration::from_secs(1), "INVITE at the core")
        .await;
    core.send(&answer(&request, 486, "Busy Here", "core-tag"), from)
        .await;
    // The core's ACK for the 486 comes from the sidecar's client transaction (hop by hop).
    let (ack, _) = core
        .receive(Duration::from_secs(1), "ACK for the 486")
        .await;
    assert!(matches!(&ack, SipMessage::Request(request) if request.method == rsip::Method::Ack));

    let mut busy = Vec::new();
    let mut start = None;
    loop {
        let (response, _) = edge
            .receive(Duration::from_secs(40), "486 or its retransmission")
            .await;
        match status(&response) {
            100 => continue,
            486 => {}
            other => panic!("unexpected {other}"),
        }
        let first = *start.get_or_insert_with(tokio::time::Instant::now);
        busy.push(first.elapsed());
        // Timer H ends it at 32 s; the last retransmission is at 31.5 s.
        if busy.len() == 11 {
            break;
        }
    }
    let expected: Vec<Duration> = [
        0, 500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500,
    ]
    .iter()
    .map(|ms| Duration::from_millis(*ms))
    .collect();
    assert_eq!(busy, expected);
    // Nothing after Timer H.
    let silence = tokio::time::timeout(
        Duration::from_secs(60),
        edge.socket.recv_from(&mut [0u8; 100]),
    )
    .await;
    assert!(silence.is_err(), "retransmissions continued past Timer H");
    sidecar.stop().await;
}

/// RFC 3261 §16.8 Timer C: an INVITE that rings without a final answer is cancelled by
/// the proxy when Timer C fires; a core that then stays silent gets the INVITE given up
/// 64·T1 later, and the Edge hears 487.
#[tokio::test(start_paused = true)]
async fn ringing_without_answer_is_cancelled_by_timer_c() {
    let Rig {
        core,
        sidecar,
        edge,
        proxy,
    } = Rig::start(&format!("{VIRTUAL_TIME}\ntimer_c = \"10s\"")).await;
    edge.send(&invite(edge.addr, proxy, "z9hG4bKring", "ring@test"), proxy)
        .await;
    let (request, from) = core
        .receive(Duration::from_secs(1), "INVITE at the core")
        .await;
    core.send(&answer(&request, 180, "Ringing", "core-tag"), from)
        .await;
    let rang = tokio::time::Instant::now();

    let (cancel, _) = core
        .receive(Duration::from_secs(60), "CANCEL from Timer C")
        .await;
    assert_eq!(rang.elapsed(), Duration::from_secs(10));
    let SipMessage::Request(cancel_request) = &cancel else {
        panic!("expected a CANCEL")
    };
    assert_eq!(cancel_request.method, rsip::Method::Cancel);
    assert_eq!(
        message::top_via(cancel.headers()).unwrap().branch(),
        message::top_via(request.headers()).unwrap().branch(),
        "a CANCEL shares its INVITE's branch"
    );
    core.send(&answer(&cancel, 200, "OK", "core-tag"), from)
        .await;

    let mut codes = Vec::new();
    while codes.last() != Some(&487) {
        codes.push(status(
            &edge.receive(Duration::from_secs(60), "487").await.0,
        ));
    }
    assert_eq!(codes, vec![100, 180, 487]);
    assert_eq!(rang.elapsed(), Duration::from_secs(10 + 32));
    sidecar.stop().await;
}
