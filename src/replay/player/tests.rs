//! The player in virtual time: captured dialogues written out by hand, live answers fed
//! in, every output checked.

#![allow(clippy::disallowed_methods)] // a real Instant only anchors the virtual clock

use super::*;
use crate::config::Transport;
use crate::replay::extract::CapturedMessage;
use crate::replay::report::differences;
use crate::replay::script::{dialogues, label};
use crate::replay::text::StartLine;

const EDGE: &str = "10.0.0.1:5060";
const CORE: &str = "10.0.0.2:5060";

fn pacing() -> Pacing {
    Pacing {
        speed: 1.0,
        max_gap: Duration::from_secs(5),
        timeout: Duration::from_secs(10),
        t1: Duration::from_millis(500),
        t2: Duration::from_secs(4),
    }
}

fn rewrite(transport: Transport) -> Rewrite {
    Rewrite {
        run: "run1".into(),
        local: "127.0.0.1:40000".parse().unwrap(),
        transport,
        dialogue: 0,
    }
}

/// A captured message: `edge` says who sent it, `at_ms` when.
fn captured(edge: bool, at_ms: u64, text: &str) -> CapturedMessage {
    let (source, destination) = if edge { (EDGE, CORE) } else { (CORE, EDGE) };
    CapturedMessage {
        frame: 0,
        time: Duration::from_millis(at_ms),
        transport: Transport::Udp,
        source: source.parse().unwrap(),
        destination: destination.parse().unwrap(),
        text: SipText::parse(text.as_bytes()).unwrap(),
    }
}

fn request(method: &str, cseq: u32, branch: &str, to_tag: &str, extra: &str) -> String {
    format!(
        "{method} sip:bob@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch={branch}\r\n\
         From: <sip:alice@a>;tag=alice\r\nTo: <sip:bob@b>{to_tag}\r\nCall-ID: call-1\r\n\
         CSeq: {cseq} {method}\r\nContact: <sip:alice@10.0.0.1>\r\n{extra}\r\n"
    )
}

fn response(code: u16, method: &str, cseq: u32, branch: &str) -> String {
    format!(
        "SIP/2.0 {code} Whatever\r\nVia: SIP/2.0/UDP 10.0.0.1;branch={branch}\r\n\
         From: <sip:alice@a>;tag=alice\r\nTo: <sip:bob@b>;tag=bob\r\nCall-ID: call-1\r\n\
         CSeq: {cseq} {method}\r\nContact: <sip:bob@10.0.0.2>\r\n\r\n"
    )
}

fn dialogue(messages: Vec<CapturedMessage>) -> Arc<Dialogue> {
    let (mut found, _) = dialogues(messages, &[]);
    assert_eq!(found.len(), 1);
    Arc::new(found.remove(0))
}

/// The player's outputs parsed.
fn drain(player: &mut Player) -> Vec<SipText> {
    std::iter::from_fn(|| player.poll_output())
        .map(|output| SipText::parse(&output.bytes).unwrap())
        .collect()
}

fn labels(messages: &[SipText]) -> Vec<String> {
    messages.iter().map(label).collect()
}

/// A live answer to `live` (a request the player sent) with `code`, from the target.
fn answer(live: &SipText, code: u16, extra: &str) -> SipText {
    let mut text = format!("SIP/2.0 {code} Live\r\n");
    for name in ["Via", "From", "Call-ID", "CSeq"] {
        text.push_str(&format!("{name}: {}\r\n", live.header(name).unwrap()));
    }
    let to = live.header("To").unwrap();
    if code > 100 && live.to_tag().is_none() {
        text.push_str(&format!("To: {to};tag=live-bob\r\n"));
    } else {
        text.push_str(&format!("To: {to}\r\n"));
    }
    text.push_str(extra);
    text.push_str("\r\n");
    SipText::parse(text.as_bytes()).unwrap()
}

/// Drives `player` by its own timer up to `until`; returns the times it had output.
fn run_until(player: &mut Player, until: Instant) -> Vec<Instant> {
    let mut times = Vec::new();
    let mut seen = player.outputs.len();
    while let Some(at) = player.poll_timeout().filter(|at| *at <= until) {
        player.handle_timeout(at);
        if player.outputs.len() > seen {
            times.push(at);
            seen = player.outputs.len();
        }
    }
    times
}

/// An Edge player started at `start`, and what it sent first.
fn start_edge(start: Instant, call: Arc<Dialogue>, transport: Transport) -> (Player, Vec<SipText>) {
    let mut player = Player::new(start, Side::Edge, call, rewrite(transport), pacing());
    player.handle_timeout(start);
    let first = drain(&mut player);
    (player, first)
}

fn origin() -> Origin {
    Origin {
        address: "127.0.0.1:5060".parse().unwrap(),
        connection: None,
    }
}

fn simple_call() -> Arc<Dialogue> {
    dialogue(vec![
        captured(true, 0, &request("INVITE", 1, "z9hG4bK1", "", "")),
        captured(false, 10, &response(100, "INVITE", 1, "z9hG4bK1")),
        captured(false, 20, &response(180, "INVITE", 1, "z9hG4bK1")),
        captured(false, 1000, &response(200, "INVITE", 1, "z9hG4bK1")),
        captured(true, 1010, &request("ACK", 1, "z9hG4bK2", ";tag=bob", "")),
        captured(true, 3010, &request("BYE", 2, "z9hG4bK3", ";tag=bob", "")),
        captured(false, 3020, &response(200, "BYE", 2, "z9hG4bK3")),
    ])
}

const LIVE_CONTACT: &str =
    "Contact: <sip:bob@127.0.0.1:7000>\r\nRecord-Route: <sip:127.0.0.1:5060;lr;bsct=0>\r\n";

#[test]
fn a_call_is_played_with_the_captured_pacing_and_matches() {
    let start = Instant::now();
    let (mut player, invite) = start_edge(start, simple_call(), Transport::Udp);
    assert_eq!(labels(&invite), vec!["INVITE"]);
    assert_eq!(invite[0].call_id(), Some("run1-call-1"));
    let later = start + Duration::from_millis(300);
    player.handle_message(later, answer(&invite[0], 100, ""), origin());
    player.handle_message(later, answer(&invite[0], 180, LIVE_CONTACT), origin());
    assert!(drain(&mut player).is_empty());
    let answered = start + Duration::from_millis(900);
    player.handle_message(answered, answer(&invite[0], 200, LIVE_CONTACT), origin());
    let ack = drain(&mut player);
    assert_eq!(labels(&ack), vec!["ACK"]);
    // The 2xx ACK goes to the live Contact along the live route, with the live tag.
    assert_eq!(
        ack[0].start,
        StartLine::Request {
            method: "ACK".into(),
            uri: "sip:bob@127.0.0.1:7000".into()
        }
    );
    assert_eq!(
        ack[0].list("Route"),
        vec!["<sip:127.0.0.1:5060;lr;bsct=0>".to_string()]
    );
    assert!(ack[0].header("To").unwrap().ends_with("tag=live-bob"));
    assert_ne!(ack[0].branch(), invite[0].branch());
    // The BYE comes 2.01 s after the 200 (1000 ms -> 3010 ms in the capture), counted
    // from when the live 200 came; the ACK between them took no time.
    assert_eq!(
        player.poll_timeout(),
        Some(answered + Duration::from_millis(2010))
    );
    player.handle_timeout(answered + Duration::from_millis(2009));
    assert!(drain(&mut player).is_empty());
    player.handle_timeout(answered + Duration::from_millis(2010));
    let bye = drain(&mut player);
    assert_eq!(labels(&bye), vec!["BYE"]);
    assert!(bye[0].header("To").unwrap().ends_with("tag=live-bob"));
    player.handle_message(
        answered + Duration::from_secs(3),
        answer(&bye[0], 200, ""),
        origin(),
    );
    assert_eq!(player.outcome(), Some(&Outcome::Completed));
    assert!(player.is_done());
    let captured = Ladder::captured(&simple_call(), Side::Edge);
    assert_eq!(
        differences(&captured, player.ladder()),
        Vec::<String>::new()
    );
}

#[test]
fn a_captured_403_answered_200_live_is_acked_and_the_call_hung_up() {
    let start = Instant::now();
    let call = dialogue(vec![
        captured(true, 0, &request("INVITE", 1, "z9hG4bK1", "", "")),
        captured(false, 10, &response(403, "INVITE", 1, "z9hG4bK1")),
        captured(true, 11, &request("ACK", 1, "z9hG4bK1", ";tag=bob", "")),
    ]);
    let (mut player, invite) = start_edge(start, call.clone(), Transport::Udp);
    player.handle_message(start, answer(&invite[0], 200, LIVE_CONTACT), origin());
    let out = drain(&mut player);
    assert_eq!(labels(&out), vec!["ACK", "BYE"]);
    assert_eq!(out[1].cseq(), Some((2, "BYE")));
    assert_eq!(player.outcome(), Some(&Outcome::Completed));
    assert!(!player.is_done(), "the cleanup BYE is still unanswered");
    player.handle_message(start, answer(&out[1], 200, ""), origin());
    assert!(player.is_done());
    assert_eq!(
        differences(&Ladder::captured(&call, Side::Edge), player.ladder()),
        vec![
            "captured, not replayed: <- 403 INVITE",
            "replayed, not captured: <- 200 INVITE",
        ]
    );
    // The cleanup shows in the ladder, marked, and is not compared.
    let cleanup: Vec<(String, Option<String>)> = player.ladder().entries[3..]
        .iter()
        .map(|entry| (entry.label.clone(), entry.note.clone()))
        .collect();
    assert_eq!(
        cleanup,
        vec![
            ("BYE".to_string(), Some(CLEANUP.to_string())),
            ("200 BYE".to_string(), Some(CLEANUP.to_string())),
        ]
    );
    assert_eq!(out[1].header("Reason"), Some(build::CLEANUP_REASON));
}

#[test]
fn a_retry_with_credentials_is_skipped_when_no_challenge_came_live() {
    let start = Instant::now();
    let call = dialogue(vec![
        captured(true, 0, &request("INVITE", 1, "z9hG4bK1", "", "")),
        captured(false, 10, &response(407, "INVITE", 1, "z9hG4bK1")),
        captured(true, 11, &request("ACK", 1, "z9hG4bK1", ";tag=bob", "")),
        captured(
            true,
            20,
            &request(
                "INVITE",
                2,
                "z9hG4bK2",
                "",
                "Proxy-Authorization: Digest x\r\n",
            ),
        ),
        captured(false, 30, &response(200, "INVITE", 2, "z9hG4bK2")),
        captured(true, 31, &request("ACK", 2, "z9hG4bK3", ";tag=bob", "")),
    ]);
    let (mut player, invite) = start_edge(start, call, Transport::Udp);
    player.handle_message(start, answer(&invite[0], 200, LIVE_CONTACT), origin());
    player.handle_timeout(start + Duration::from_secs(1));
    let out = drain(&mut player);
    // The ACK for the live 200, the cleanup BYE; no second INVITE.
    assert_eq!(labels(&out), vec!["ACK", "BYE"]);
    assert!(player
        .notes()
        .iter()
        .any(|note| note.contains("answers a challenge that did not come live")));
}

#[test]
fn udp_requests_are_retransmitted_until_answered_and_silence_times_out() {
    let start = Instant::now();
    let (mut player, invite) = start_edge(start, simple_call(), Transport::Udp);
    assert_eq!(invite.len(), 1);
    // Timer A: 500 ms, then 1 s, 2 s, 4 s after that.
    let mut sends = Vec::new();
    let mut now = start;
    while let Some(at) = player.poll_timeout() {
        if at > start + Duration::from_secs(10) {
            break;
        }
        now = at;
        player.handle_timeout(now);
        if !drain(&mut player).is_empty() {
            sends.push(now - start);
        }
        if player.outcome().is_some() {
            break;
        }
    }
    assert_eq!(
        sends,
        [500, 1500, 3500, 7500].map(Duration::from_millis).to_vec()
    );
    assert_eq!(now - start, Duration::from_secs(10));
    assert_eq!(
        player.outcome(),
        Some(&Outcome::TimedOut {
            step: 2,
            waiting_for: "180 INVITE".into()
        })
    );
    assert_eq!(player.ladder().entries[0].count, 5);
}

#[test]
fn tcp_requests_are_not_retransmitted() {
    let start = Instant::now();
    let (mut player, _) = start_edge(start, simple_call(), Transport::Tcp);
    player.handle_timeout(start + Duration::from_secs(4));
    assert!(drain(&mut player).is_empty());
}

#[test]
fn a_cancel_goes_on_the_live_invite_and_its_487_is_acked_hop_by_hop() {
    let start = Instant::now();
    let call = dialogue(vec![
        captured(true, 0, &request("INVITE", 1, "z9hG4bK1", "", "")),
        captured(false, 10, &response(180, "INVITE", 1, "z9hG4bK1")),
        captured(true, 500, &request("CANCEL", 1, "z9hG4bK1", "", "")),
        captured(false, 510, &response(200, "CANCEL", 1, "z9hG4bK1")),
        captured(false, 520, &response(487, "INVITE", 1, "z9hG4bK1")),
        captured(true, 530, &request("ACK", 1, "z9hG4bK1", ";tag=bob", "")),
    ]);
    let (mut player, invite) = start_edge(start, call.clone(), Transport::Tcp);
    player.handle_message(start, answer(&invite[0], 180, LIVE_CONTACT), origin());
    player.handle_timeout(start + Duration::from_millis(490));
    let cancel = drain(&mut player);
    assert_eq!(labels(&cancel), vec!["CANCEL"]);
    assert_eq!(cancel[0].branch(), invite[0].branch());
    assert_eq!(cancel[0].cseq(), Some((1, "CANCEL")));
    player.handle_message(start, answer(&cancel[0], 200, ""), origin());
    player.handle_message(start, answer(&invite[0], 487, ""), origin());
    let ack = drain(&mut player);
    assert_eq!(labels(&ack), vec!["ACK"]);
    assert_eq!(ack[0].branch(), invite[0].branch());
    assert_eq!(player.outcome(), Some(&Outcome::Completed));
    assert!(differences(&Ladder::captured(&call, Side::Edge), player.ladder()).is_empty());
}

#[test]
fn the_core_side_answers_live_requests_by_ordinal_with_the_live_cseq() {
    let start = Instant::now();
    let mut core = Player::new(
        start,
        Side::Core,
        simple_call(),
        rewrite(Transport::Udp),
        pacing(),
    );
    core.handle_timeout(start);
    assert!(drain(&mut core).is_empty(), "the core waits for the INVITE");
    // The INVITE as a proxy forwards it: another Via on top, CSeq renumbered.
    let live_invite = SipText::parse(
        b"INVITE sip:bob@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKp1\r\n\
Via: SIP/2.0/UDP 127.0.0.1:40000;branch=z9hG4bKe1\r\nRecord-Route: <sip:127.0.0.1:5070;lr>\r\n\
From: <sip:alice@a>;tag=alice\r\nTo: <sip:bob@b>\r\nCall-ID: run1-call-1\r\nCSeq: 2 INVITE\r\n\
Contact: <sip:alice@127.0.0.1:40000>\r\n\r\n",
    )
    .unwrap();
    core.handle_message(start, live_invite, origin());
    // 100 is 10 ms after the INVITE, 180 10 ms later; the 200 980 ms after that.
    let sent_at = run_until(&mut core, start + Duration::from_millis(20));
    assert_eq!(
        sent_at,
        [10, 20]
            .map(|ms| start + Duration::from_millis(ms))
            .to_vec()
    );
    let early = drain(&mut core);
    assert_eq!(labels(&early), vec!["100 INVITE", "180 INVITE"]);
    assert_eq!(early[0].cseq(), Some((2, "INVITE")));
    assert_eq!(early[0].list("Via").len(), 2);
    run_until(&mut core, start + Duration::from_millis(1000));
    let ok = drain(&mut core);
    assert_eq!(labels(&ok), vec!["200 INVITE"]);
    assert_eq!(
        ok[0].list("Record-Route"),
        vec!["<sip:127.0.0.1:5070;lr>".to_string()]
    );
    assert!(ok[0].header("To").unwrap().ends_with("tag=bob"));
    // A second INVITE the capture never had: the capture's final answer again.
    let again = SipText::parse(
        b"INVITE sip:bob@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKp2\r\n\
From: <sip:alice@a>;tag=alice\r\nTo: <sip:bob@b>\r\nCall-ID: run1-call-1\r\nCSeq: 3 INVITE\r\n\r\n",
    )
    .unwrap();
    core.handle_message(start + Duration::from_millis(1001), again, origin());
    let auto = drain(&mut core);
    assert_eq!(labels(&auto), vec!["200 INVITE"]);
    assert_eq!(auto[0].cseq(), Some((3, "INVITE")));
}

#[test]
fn a_captured_cancel_waits_for_a_provisional_response() {
    let start = Instant::now();
    // In the capture the CANCEL follows the INVITE after 50 ms, with nothing between.
    let call = dialogue(vec![
        captured(true, 0, &request("INVITE", 1, "z9hG4bK1", "", "")),
        captured(true, 50, &request("CANCEL", 1, "z9hG4bK1", "", "")),
        captured(false, 60, &response(200, "CANCEL", 1, "z9hG4bK1")),
        captured(false, 70, &response(487, "INVITE", 1, "z9hG4bK1")),
    ]);
    let (mut player, invite) = start_edge(start, call, Transport::Tcp);
    player.handle_timeout(start + Duration::from_millis(60));
    assert!(
        drain(&mut player).is_empty(),
        "no CANCEL before a provisional (§9.1)"
    );
    player.handle_message(
        start + Duration::from_millis(80),
        answer(&invite[0], 100, ""),
        origin(),
    );
    assert_eq!(labels(&drain(&mut player)), vec!["CANCEL"]);
}

#[test]
fn the_core_repeats_its_final_answer_over_udp_until_the_ack() {
    let start = Instant::now();
    let mut core = Player::new(
        start,
        Side::Core,
        simple_call(),
        rewrite(Transport::Udp),
        pacing(),
    );
    let invite = SipText::parse(
        b"INVITE sip:bob@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKp1\r\n\
From: <sip:alice@a>;tag=alice\r\nTo: <sip:bob@b>\r\nCall-ID: run1-call-1\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:alice@127.0.0.1:40000>\r\n\r\n",
    )
    .unwrap();
    core.handle_message(start, invite, origin());
    let answered_at = run_until(&mut core, start + Duration::from_millis(1000));
    let answers = drain(&mut core);
    assert_eq!(
        labels(&answers),
        vec!["100 INVITE", "180 INVITE", "200 INVITE"]
    );
    let ok_at = *answered_at.last().unwrap();
    // No ACK: the 200 again after T1, then 2·T1.
    let repeats = run_until(&mut core, ok_at + Duration::from_millis(1600));
    assert_eq!(
        repeats,
        vec![
            ok_at + Duration::from_millis(500),
            ok_at + Duration::from_millis(1500)
        ]
    );
    assert_eq!(labels(&drain(&mut core)), vec!["200 INVITE", "200 INVITE"]);
    let ack = SipText::parse(
        b"ACK sip:alice@127.0.0.1:40000 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKp2\r\n\
From: <sip:alice@a>;tag=alice\r\nTo: <sip:bob@b>;tag=bob\r\nCall-ID: run1-call-1\r\nCSeq: 1 ACK\r\n\r\n",
    )
    .unwrap();
    core.handle_message(ok_at + Duration::from_millis(1700), ack, origin());
    run_until(&mut core, ok_at + Duration::from_secs(6));
    assert!(drain(&mut core)
        .iter()
        .all(|message| message.status() != Some(200)));
}

#[test]
fn a_call_still_ringing_when_the_walk_ends_is_cancelled_and_one_answered_late_hung_up() {
    let start = Instant::now();
    // The capture ends while the call rings.
    let call = dialogue(vec![
        captured(true, 0, &request("INVITE", 1, "z9hG4bK1", "", "")),
        captured(false, 10, &response(180, "INVITE", 1, "z9hG4bK1")),
    ]);
    let (mut player, invite) = start_edge(start, call, Transport::Tcp);
    player.handle_message(start, answer(&invite[0], 180, LIVE_CONTACT), origin());
    let cancel = drain(&mut player);
    assert_eq!(labels(&cancel), vec!["CANCEL"]);
    assert_eq!(cancel[0].header("Reason"), Some(build::CLEANUP_REASON));
    // The 200 crosses the CANCEL: ACK it, then hang up.
    player.handle_message(start, answer(&cancel[0], 200, ""), origin());
    player.handle_message(start, answer(&invite[0], 200, LIVE_CONTACT), origin());
    let after = drain(&mut player);
    assert_eq!(labels(&after), vec!["ACK", "BYE"]);
    assert!(!player.is_done());
    player.handle_message(start, answer(&after[1], 200, ""), origin());
    assert!(player.is_done());
    assert!(player
        .ladder()
        .entries
        .iter()
        .skip(2)
        .all(|entry| entry.note.as_deref() == Some(CLEANUP)));
}

#[test]
fn a_cancelled_invite_is_waited_for_past_its_own_deadline() {
    let start = Instant::now();
    let call = dialogue(vec![
        captured(true, 0, &request("INVITE", 1, "z9hG4bK1", "", "")),
        captured(false, 10, &response(180, "INVITE", 1, "z9hG4bK1")),
        captured(false, 1000, &response(200, "INVITE", 1, "z9hG4bK1")),
    ]);
    let (mut player, invite) = start_edge(start, call, Transport::Tcp);
    player.handle_message(start, answer(&invite[0], 180, LIVE_CONTACT), origin());
    // The 200 never comes: the walk times out 10 s after the 180, and the cleanup
    // CANCELs the INVITE, whose own 10 s are over by then.
    let timed_out = start + Duration::from_secs(10);
    player.handle_timeout(timed_out);
    let cancel = drain(&mut player);
    assert_eq!(labels(&cancel), vec!["CANCEL"]);
    player.handle_message(timed_out, answer(&cancel[0], 200, ""), origin());
    assert!(!player.is_done(), "the INVITE's 487 is still due");
    player.handle_message(
        timed_out + Duration::from_secs(1),
        answer(&invite[0], 487, ""),
        origin(),
    );
    assert_eq!(labels(&drain(&mut player)), vec!["ACK"]);
    assert!(player.is_done());
}

#[test]
fn the_core_answers_a_request_the_capture_stops_before_answering() {
    let start = Instant::now();
    // The capture ends with the Edge's BYE: no 200 for it.
    let call = dialogue(vec![
        captured(true, 0, &request("OPTIONS", 1, "z9hG4bK1", "", "")),
        captured(false, 10, &response(200, "OPTIONS", 1, "z9hG4bK1")),
        captured(true, 20, &request("OPTIONS", 2, "z9hG4bK2", "", "")),
    ]);
    let mut core = Player::new(start, Side::Core, call, rewrite(Transport::Tcp), pacing());
    let options = |cseq: u32, branch: &str| {
        SipText::parse(
            format!(
                "OPTIONS sip:bob@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5070;branch={branch}\r\n\
                 From: <sip:alice@a>;tag=alice\r\nTo: <sip:bob@b>\r\nCall-ID: run1-call-1\r\n\
                 CSeq: {cseq} OPTIONS\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap()
    };
    core.handle_message(start, options(1, "z9hG4bKa"), origin());
    run_until(&mut core, start + Duration::from_millis(10));
    assert_eq!(labels(&drain(&mut core)), vec!["200 OPTIONS"]);
    core.handle_message(
        start + Duration::from_millis(20),
        options(2, "z9hG4bKb"),
        origin(),
    );
    let answer = drain(&mut core);
    assert_eq!(labels(&answer), vec!["200 OPTIONS"]);
    assert_eq!(answer[0].cseq(), Some((2, "OPTIONS")));
    assert!(core.is_done());
}
