//! The product's stories, told through [`super::pair::Pair`]: the proxy's core between a
//! scripted Edge and a scripted core in virtual time, no socket. Each is a plain
//! `#[test]` that runs in milliseconds; the socket and real-peer tests in `tests/` tell
//! the same stories over loopback.

use std::time::Duration;

use super::engine::CredentialWait;
use super::pair::{answer, header, in_dialog, invite, route_set, Pair, CORE};
use crate::config::AuthMode;
use crate::sip::wire::{self, Message, Method};

fn cseq(headers: &wire::Headers) -> u32 {
    wire::cseq(headers).expect("a CSeq").0
}

fn authorization(request: &wire::Request) -> Option<&str> {
    header(&request.headers, "Authorization")
}

fn core_contact() -> String {
    format!("sip:core@{CORE}")
}

/// A bearer trunk whose Edge sent the INVITE of `call`, and that INVITE as it reached
/// the core.
fn invite_at_core(call: &str) -> (Pair, wire::Request) {
    let mut pair = Pair::new(AuthMode::Bearer);
    pair.edge_sends(&invite(call));
    let at_core = pair.core_receives();
    (pair, at_core)
}

/// The core answers `request` with `code`, its side of the dialog tagged `to_tag`.
fn core_answers(pair: &mut Pair, request: &wire::Request, code: u16, to_tag: &str) {
    pair.core_sends_message(answer(request, code, to_tag, &core_contact()).into());
}

#[test]
fn bearer_invite_carries_the_trunk_token_to_the_core_and_none_to_the_edge() {
    let mut pair = Pair::new(AuthMode::Bearer);
    // Whatever the Edge put in Authorization is not vouched for: replaced.
    let from_edge = invite("call-1").replace(
        "Content-Length: 0",
        "Authorization: Bearer edge-own\nContent-Length: 0",
    );
    pair.edge_sends(&from_edge);
    let at_core = pair.core_receives();
    assert_eq!(authorization(&at_core), Some("Bearer token-1"));
    assert_eq!(
        wire::header_values(&at_core.headers, "Authorization").count(),
        1
    );
    assert_eq!(wire::max_forwards(&at_core.headers).ok(), Some(Some(69)));
    core_answers(&mut pair, &at_core, 200, "core-1");
    let at_edge = pair.edge_receives();
    assert_eq!(at_edge.code, 200);
    assert_eq!(cseq(&at_edge.headers), 1);
    assert!(header(&at_edge.headers, "Authorization").is_none());
    // Our Via is gone; the Edge's own is on top again.
    let via = wire::top_via(&at_edge.headers).expect("a Via");
    assert_eq!(via.host, "127.0.0.1");
    assert_eq!(via.port, Some(5070));
}

#[test]
fn stale_token_403_is_resent_once_with_a_fresh_token_and_the_dialog_keeps_its_cseq_offset() {
    let (mut pair, first) = invite_at_core("call-2");
    assert_eq!(authorization(&first), Some("Bearer token-1"));
    // The core rotated its keys: token-1 is refused.
    core_answers(&mut pair, &first, 403, "core-x");
    assert!(
        pair.edge_heard_only_trying(),
        "the Edge must not see the 403"
    );
    // The sidecar asks for a replacement of generation 1, within resend_wait of the
    // INVITE's arrival, and gives up 2 s after that at the latest.
    let arrived = pair.now;
    pair.publish_token(Duration::from_secs(3600));
    let wait = pair.answer_wait();
    let resend_wait = pair.manager.as_ref().expect("a manager").resend_wait();
    let CredentialWait::Replacement {
        rejected,
        until,
        give_up,
        ..
    } = wait
    else {
        panic!("a replacement wait, got {wait:?}");
    };
    assert_eq!(rejected, 1);
    assert_eq!(until, arrived + resend_wait);
    assert_eq!(give_up, until + Duration::from_secs(2));
    let second = pair.core_receives();
    assert_eq!(authorization(&second), Some("Bearer token-2"));
    assert_eq!(cseq(&second.headers), 2, "the re-send counts one higher");
    assert_eq!(wire::call_id(&second.headers).ok(), Some("call-2"));
    core_answers(&mut pair, &second, 200, "core-2");
    let ok = pair.edge_receives();
    assert_eq!(ok.code, 200);
    assert_eq!(cseq(&ok.headers), 1, "the Edge sees its own number");
    // The rest of the dialog is translated both ways.
    let routes = route_set(&ok);
    assert_eq!(routes.len(), 2, "{routes:?}");
    pair.edge_sends(&in_dialog("call-2", "ACK", 1, &routes, "core-2"));
    let ack = pair.core_receives_ack();
    assert_eq!(ack.method, Method::Ack);
    assert_eq!(cseq(&ack.headers), 2);
    pair.edge_sends(&in_dialog("call-2", "BYE", 2, &routes, "core-2"));
    let bye = pair.core_receives();
    assert_eq!(cseq(&bye.headers), 3);
    assert_eq!(authorization(&bye), Some("Bearer token-2"));
    core_answers(&mut pair, &bye, 200, "core-2");
    let bye_ok = pair.edge_receives();
    assert_eq!(cseq(&bye_ok.headers), 2);
    assert_eq!(pair.stats.snapshot().rejections_absorbed, 1);
}

#[test]
fn a_second_refusal_after_the_resend_goes_to_the_edge() {
    let (mut pair, first) = invite_at_core("call-3");
    core_answers(&mut pair, &first, 403, "core-x");
    pair.publish_token(Duration::from_secs(3600));
    pair.answer_wait();
    let second = pair.core_receives();
    core_answers(&mut pair, &second, 403, "core-y");
    let refused = pair.edge_receives();
    assert_eq!(refused.code, 403);
    assert_eq!(cseq(&refused.headers), 1);
    assert!(pair.waits.is_empty(), "only one re-send per request");
    assert!(pair.core_heard_only_acks(), "{:?}", pair.at_core);
}

#[test]
fn a_refusal_with_no_replacement_in_time_goes_to_the_edge() {
    let (mut pair, first) = invite_at_core("call-4");
    core_answers(&mut pair, &first, 403, "core-x");
    // The refresh brings nothing: the wait ends without a credential.
    pair.end_wait(None);
    let refused = pair.edge_receives();
    assert_eq!(refused.code, 403);
    assert!(pair.core_heard_only_acks(), "{:?}", pair.at_core);
}

#[test]
fn cancel_while_a_resend_waits_for_its_token_ends_the_call_with_487() {
    let (mut pair, first) = invite_at_core("call-5");
    core_answers(&mut pair, &first, 403, "core-x");
    assert_eq!(pair.waits.len(), 1);
    // The caller hangs up while the token is being refreshed.
    pair.edge_sends(
        &invite("call-5")
            .replacen("INVITE sip:", "CANCEL sip:", 1)
            .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL"),
    );
    let mut codes = Vec::new();
    while let Some(Message::Response(response)) = pair.at_edge.pop_front() {
        codes.push((response.code, wire::cseq(&response.headers).ok()));
    }
    assert!(
        codes.contains(&(200, Some((1, Method::Cancel)))),
        "{codes:?}"
    );
    assert!(
        codes.contains(&(487, Some((1, Method::Invite)))),
        "{codes:?}"
    );
    // The fresh token arrives after all: nothing goes to the core.
    pair.publish_token(Duration::from_secs(3600));
    pair.answer_wait();
    assert!(pair.core_heard_only_acks(), "{:?}", pair.at_core);
}

#[test]
fn digest_challenge_is_answered_once_with_the_trunk_password() {
    let mut pair = Pair::new(AuthMode::Digest);
    pair.edge_sends(&invite("call-6"));
    let first = pair.core_receives();
    assert!(
        authorization(&first).is_none(),
        "no challenge yet, no answer"
    );
    let mut challenge = answer(&first, 401, "core-x", &core_contact());
    challenge.headers.push(
        "WWW-Authenticate",
        r#"Digest realm="core.example", nonce="n-1", qop="auth", algorithm=SHA-256"#,
    );
    pair.core_sends_message(challenge.into());
    assert!(
        pair.edge_heard_only_trying(),
        "the Edge must not see the challenge"
    );
    let second = pair.core_receives();
    let answered = authorization(&second).expect("an Authorization");
    assert!(answered.starts_with("Digest "), "{answered}");
    assert!(answered.contains(r#"username="trunk-user""#), "{answered}");
    assert!(answered.contains(r#"nonce="n-1""#), "{answered}");
    assert!(answered.contains("nc=00000001"), "{answered}");
    assert!(!answered.contains("secret-1"), "the password never travels");
    assert_eq!(cseq(&second.headers), 2);
    core_answers(&mut pair, &second, 200, "core-6");
    let ok = pair.edge_receives();
    assert_eq!((ok.code, cseq(&ok.headers)), (200, 1));
    assert_eq!(pair.stats.snapshot().digest_challenges_answered, 1);
    // The next call's INVITE answers the kept challenge at once, counting on; a method
    // the core never challenged (the BYE) goes without.
    pair.edge_sends(&in_dialog("call-6", "BYE", 2, &route_set(&ok), "core-6"));
    let bye = pair.core_receives();
    assert!(authorization(&bye).is_none());
    assert_eq!(cseq(&bye.headers), 3);
    pair.edge_sends(&invite("call-6b"));
    let next = pair.core_receives();
    let answered = authorization(&next).expect("an Authorization on the next INVITE");
    assert!(answered.contains("nc=00000002"), "{answered}");
    assert_eq!(cseq(&next.headers), 1, "no re-send, no offset");
}

#[test]
fn reliable_provisional_and_prack_follow_the_resend_offset() {
    let mut pair = Pair::new(AuthMode::Bearer);
    pair.edge_sends(
        &invite("call-7").replace("Content-Length: 0", "Supported: 100rel\nContent-Length: 0"),
    );
    let first = pair.core_receives();
    core_answers(&mut pair, &first, 403, "core-x");
    pair.publish_token(Duration::from_secs(3600));
    pair.answer_wait();
    let second = pair.core_receives();
    let mut ringing = answer(&second, 183, "core-7", &core_contact());
    ringing.headers.push("Require", "100rel");
    ringing.headers.push("RSeq", "1");
    pair.core_sends_message(ringing.into());
    let progress = pair.edge_receives();
    assert_eq!(progress.code, 183);
    assert_eq!(cseq(&progress.headers), 1);
    // The Edge acknowledges the reliable provisional: RAck names the INVITE by the
    // Edge's number, the core expects its own.
    let prack = in_dialog("call-7", "PRACK", 2, &route_set(&progress), "core-7")
        .replace("Content-Length: 0", "RAck: 1 1 INVITE\nContent-Length: 0");
    pair.edge_sends(&prack);
    let at_core = pair.core_receives();
    assert_eq!(at_core.method, Method::Prack);
    assert_eq!(cseq(&at_core.headers), 3);
    assert_eq!(header(&at_core.headers, "RAck"), Some("1 2 INVITE"));
    core_answers(&mut pair, &at_core, 200, "core-7");
    let prack_ok = pair.edge_receives();
    assert_eq!(cseq(&prack_ok.headers), 2);
}

#[test]
fn an_in_dialog_request_waits_for_a_valid_token_after_the_old_one_expired() {
    let mut pair = Pair::new(AuthMode::Bearer);
    // A short-lived token for this story: valid for 10 s.
    pair.publish_token(Duration::from_secs(10));
    pair.edge_sends(&invite("call-8"));
    let invite = pair.core_receives();
    assert_eq!(authorization(&invite), Some("Bearer token-2"));
    core_answers(&mut pair, &invite, 200, "core-8");
    let ok = pair.edge_receives();
    let routes = route_set(&ok);
    pair.edge_sends(&in_dialog("call-8", "ACK", 1, &routes, "core-8"));
    pair.core_receives_ack();
    // The refresher fell behind: the token expired before the caller hung up.
    pair.advance(Duration::from_secs(11));
    assert!(pair.current().is_none());
    pair.edge_sends(&in_dialog("call-8", "BYE", 2, &routes, "core-8"));
    assert!(pair.at_core.is_empty(), "not sent with an expired token");
    let bye_arrived = pair.now;
    let resend_wait = pair.manager.as_ref().expect("a manager").resend_wait();
    assert!(
        matches!(
            pair.waits.front(),
            Some((_, CredentialWait::Valid { until })) if *until == bye_arrived + resend_wait
        ),
        "{:?}",
        pair.waits
    );
    pair.publish_token(Duration::from_secs(3600));
    pair.answer_wait();
    let bye = pair.core_receives();
    assert_eq!(authorization(&bye), Some("Bearer token-3"));
    assert_eq!(cseq(&bye.headers), 2);
}

#[test]
fn an_initial_request_without_a_valid_token_is_refused_with_503() {
    let mut pair = Pair::new(AuthMode::Bearer);
    pair.advance(Duration::from_secs(3601));
    pair.edge_sends(&invite("call-9"));
    let refused = pair.edge_receives();
    assert_eq!(refused.code, 503);
    assert!(pair.at_core.is_empty());
}

#[test]
fn an_unanswered_invite_times_out_with_408_after_64_t1() {
    let mut pair = Pair::new(AuthMode::None);
    pair.edge_sends(&invite("call-10"));
    pair.core_receives();
    pair.advance(Duration::from_secs(31));
    // Timer A retransmissions, 0.5 s doubling: 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s.
    let retransmissions = pair.at_core.len();
    assert_eq!(retransmissions, 5, "{:?}", pair.at_core);
    assert!(pair
        .at_edge
        .iter()
        .all(|message| matches!(message, Message::Response(response) if response.code == 100)));
    pair.advance(Duration::from_secs(2));
    let timeout = pair.edge_receives();
    assert_eq!(timeout.code, 408);
}

#[test]
fn registration_the_sidecar_originates_gets_its_answer() {
    let mut pair = Pair::new(AuthMode::None);
    let id = pair.originate(register()).expect("sent");
    let at_core = pair.core_receives();
    assert_eq!(at_core.method, Method::Register);
    core_answers(&mut pair, &at_core, 200, "reg");
    let (answered, response) = pair.answers.pop_front().expect("an answer");
    assert_eq!(answered, id);
    let response = response.expect("a response");
    assert_eq!(response.code, 200);
    assert!(
        wire::top_via(&response.headers).is_err(),
        "our Via is removed before the answer is handed over"
    );
}

#[test]
fn a_digest_answer_refused_with_the_same_nonce_goes_to_the_edge_without_a_third_send() {
    let mut pair = Pair::new(AuthMode::Digest);
    pair.edge_sends(&invite("call-11"));
    let first = pair.core_receives();
    let challenge_header =
        r#"Digest realm="core.example", nonce="n-1", qop="auth", algorithm=SHA-256"#;
    let mut challenge = answer(&first, 401, "core-x", &core_contact());
    challenge.headers.push("WWW-Authenticate", challenge_header);
    pair.core_sends_message(challenge.into());
    let second = pair.core_receives();
    assert!(authorization(&second).is_some());
    // The core refuses the very answer: same nonce, not stale. Only a newer password
    // could help; none comes, so the 401 goes to the Edge.
    let mut again = answer(&second, 401, "core-y", &core_contact());
    again.headers.push("WWW-Authenticate", challenge_header);
    pair.core_sends_message(again.into());
    assert!(
        matches!(
            pair.waits.front(),
            Some((_, CredentialWait::Replacement { .. }))
        ),
        "{:?}",
        pair.waits
    );
    pair.end_wait(None);
    let refused = pair.edge_receives();
    assert_eq!(refused.code, 401);
    assert_eq!(cseq(&refused.headers), 1);
    assert!(
        pair.core_heard_only_acks(),
        "no third INVITE: {:?}",
        pair.at_core
    );
}

fn register() -> wire::Request {
    let text = format!(
        "REGISTER sip:{CORE} SIP/2.0\r\nMax-Forwards: 70\r\nFrom: <sip:acme@127.0.0.1>;tag=r1\r\n\
         To: <sip:acme@127.0.0.1>\r\nCall-ID: reg-1\r\nCSeq: 1 REGISTER\r\n\
         Contact: <sip:acme@127.0.0.1:5062>\r\nExpires: 300\r\nContent-Length: 0\r\n\r\n"
    );
    match wire::parse(bytes::Bytes::from(text), true) {
        Ok(Message::Request(request)) => request,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_refusal_of_the_sidecars_own_register_goes_back_to_the_registration() {
    let mut pair = Pair::new(AuthMode::Bearer);
    let id = pair.originate(register()).expect("sent");
    let at_core = pair.core_receives();
    core_answers(&mut pair, &at_core, 401, "reg");
    // Not absorbed by the proxy's re-send: the registration decides about its own.
    assert!(pair.waits.is_empty());
    let (answered, response) = pair.answers.pop_front().expect("an answer");
    assert_eq!(answered, id);
    assert_eq!(response.expect("a response").code, 401);
}

#[test]
fn an_unanswered_register_ends_with_no_answer_after_timer_f() {
    let mut pair = Pair::new(AuthMode::None);
    let id = pair.originate(register()).expect("sent");
    pair.core_receives();
    pair.advance(Duration::from_secs(31));
    assert!(pair.answers.is_empty(), "{:?}", pair.answers);
    pair.advance(Duration::from_secs(2));
    let (answered, response) = pair.answers.pop_front().expect("an end");
    assert_eq!(answered, id);
    assert!(response.is_none());
}

#[test]
fn a_provisional_response_arriving_after_the_2xx_is_not_forwarded() {
    // UDP may reorder what the core sent: its 180 overtaken by its 200. Once a final
    // response went back, only 2xx retransmissions follow it (RFC 3261 §16.7 step 5).
    let (mut pair, at_core) = invite_at_core("call-late-180");
    core_answers(&mut pair, &at_core, 200, "core-l");
    assert_eq!(pair.edge_receives().code, 200);
    core_answers(&mut pair, &at_core, 180, "core-l");
    assert!(
        pair.edge_heard_only_trying(),
        "a 180 after the 200 reached the Edge"
    );
}
