//! Keeping a trunk registered, against a hand-driven registrar in tokio's paused clock:
//! the refresh follows the granted expiry, a registrar that fails is retried with a
//! visible backoff and never given up on, a rotating token is re-registered at once, and
//! shutdown unregisters.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use byoc_sidecar::registration::State;
use common::raw::{answer, cseq, header_values, RawPeer};
use common::{in_virtual_time, Sidecar};
use rsip::{Method, SipMessage};
use tokio::time::Instant;

const REGISTRATION: &str = "\n[trunk.registration]\naor = \"sip:trunk-a@core.test\"\nexpires = \"300s\"\nmargin = \"10s\"\n";

/// The next REGISTER at the registrar (virtual time: waits as long as it takes).
async fn next_register(registrar: &RawPeer) -> (SipMessage, SocketAddr) {
    loop {
        let (message, from) = registrar
            .receive(Duration::from_secs(3600), "a REGISTER")
            .await;
        if matches!(&message, SipMessage::Request(request) if request.method == Method::Register) {
            return (message, from);
        }
    }
}

/// A 200 for `register` granting `expires` seconds to its Contact.
fn granted(register: &SipMessage, expires: u64) -> String {
    let contact = &header_values(register, "Contact")[0];
    answer(register, 200, "OK", "registrar").replace(
        "Content-Length: 0\r\n",
        &format!("Contact: {contact};expires={expires}\r\nContent-Length: 0\r\n"),
    )
}

fn seq(message: &SipMessage) -> u32 {
    cseq(message)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn expires(message: &SipMessage) -> String {
    header_values(message, "Expires")[0].clone()
}

#[tokio::test(start_paused = true)]
async fn refreshes_follow_the_granted_expiry_and_shutdown_unregisters() {
    let registrar = RawPeer::bind().await;
    let config = format!(
        "{}{REGISTRATION}",
        Sidecar::config("udp:127.0.0.1:9", &format!("udp:{}", registrar.addr), "")
    );
    let sidecar = Sidecar::start_with(&in_virtual_time(&config)).await;
    let core_side = sidecar.addr(
        byoc_sidecar::transport::Side::Core,
        byoc_sidecar::config::Transport::Udp,
    );

    let (first, from) = next_register(&registrar).await;
    let sent = Instant::now();
    assert_eq!(expires(&first), "300", "the configured expiry is asked for");
    let contact = header_values(&first, "Contact")[0].clone();
    assert_eq!(
        contact,
        format!("<sip:trunk-a@{core_side};bsct=0>"),
        "the Contact is the sidecar's core side, naming the trunk"
    );
    assert_eq!(header_values(&first, "To"), vec!["<sip:trunk-a@core.test>"]);
    assert!(
        header_values(&first, "Authorization").is_empty(),
        "auth none"
    );
    // The registrar grants 60 s: the refresh comes at min(60 - 10, 0.8 * 60) = 48 s.
    registrar.send(&granted(&first, 60), from).await;
    let (second, from) = next_register(&registrar).await;
    assert_eq!(sent.elapsed(), Duration::from_secs(48));
    assert_eq!(
        header_values(&second, "Call-ID"),
        header_values(&first, "Call-ID"),
        "one Call-ID per binding"
    );
    assert_eq!(seq(&second), seq(&first) + 1);
    // A grant in the Expires header only (no expires parameter on our Contact).
    let ok = answer(&second, 200, "OK", "registrar").replace(
        "Content-Length: 0\r\n",
        "Expires: 20\r\nContent-Length: 0\r\n",
    );
    registrar.send(&ok, from).await;
    let refreshed = Instant::now();
    let (third, from) = next_register(&registrar).await;
    assert_eq!(
        refreshed.elapsed(),
        Duration::from_secs(10),
        "min(20 - 10, 16)"
    );
    registrar.send(&granted(&third, 300), from).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let status = sidecar.app.registrations["test"].borrow().clone();
    assert_eq!(status.state, State::Registered);
    assert_eq!(status.sent, 3);

    // Shutdown unregisters: Expires 0 for our Contact, the next CSeq.
    let unregister = async {
        let (last, from) = next_register(&registrar).await;
        registrar.send(&granted(&last, 0), from).await;
        last
    };
    let ((), last) = tokio::join!(sidecar.stop(), unregister);
    assert_eq!(expires(&last), "0");
    assert_eq!(header_values(&last, "Contact")[0], contact);
    assert_eq!(seq(&last), seq(&third) + 1);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_registrar_is_retried_with_backoff_and_never_given_up() {
    let registrar = RawPeer::bind().await;
    let config = format!(
        "{}{REGISTRATION}backoff_initial = \"1s\"\nbackoff_max = \"16s\"\n",
        Sidecar::config("udp:127.0.0.1:9", &format!("udp:{}", registrar.addr), "")
    );
    let sidecar = Sidecar::start_with(&in_virtual_time(&config)).await;
    let mut attempts = Vec::new();
    // Eight attempts answered 503 (the registrar is down behind a proxy).
    for _ in 0..8 {
        let (register, from) = next_register(&registrar).await;
        attempts.push(Instant::now());
        registrar
            .send(&answer(&register, 503, "Service Unavailable", "r"), from)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let gaps: Vec<Duration> = attempts.windows(2).map(|pair| pair[1] - pair[0]).collect();
    // Ceilings 1, 2, 4, 8, 16, 16, 16 s; each delay in the upper half of its ceiling.
    for (index, gap) in gaps.iter().enumerate() {
        let ceiling = Duration::from_secs(1 << index.min(4));
        assert!(
            *gap >= ceiling / 2 && *gap <= ceiling,
            "gap {index}: {gap:?} for ceiling {ceiling:?} (all: {gaps:?})"
        );
    }
    let status = sidecar.app.registrations["test"].borrow().clone();
    assert_eq!(status.state, State::BackingOff);
    assert_eq!(status.consecutive_failures, 8);
    assert_eq!(
        status
            .last_failure
            .as_deref()
            .map(|text| text.starts_with("503")),
        Some(true)
    );
    // The registrar is back: registered at the next attempt, within one backoff step.
    let returned = Instant::now();
    let (register, from) = next_register(&registrar).await;
    assert!(returned.elapsed() <= Duration::from_secs(16));
    registrar.send(&granted(&register, 300), from).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let status = sidecar.app.registrations["test"].borrow().clone();
    assert_eq!(
        (status.state, status.consecutive_failures),
        (State::Registered, 0)
    );
    let stats = sidecar.app.stats.snapshot();
    assert_eq!((stats.registers_sent, stats.register_failures), (9, 8));
    let unregister = async {
        let (last, from) = next_register(&registrar).await;
        registrar.send(&granted(&last, 0), from).await;
    };
    tokio::join!(sidecar.stop(), unregister);
}

#[tokio::test(start_paused = true)]
async fn a_registrar_demanding_a_longer_expiry_gets_min_expires() {
    let registrar = RawPeer::bind().await;
    let config = format!(
        "{}{REGISTRATION}",
        Sidecar::config("udp:127.0.0.1:9", &format!("udp:{}", registrar.addr), "")
    );
    let sidecar = Sidecar::start_with(&in_virtual_time(&config)).await;
    let (first, from) = next_register(&registrar).await;
    let brief = answer(&first, 423, "Interval Too Brief", "r").replace(
        "Content-Length: 0\r\n",
        "Min-Expires: 900\r\nContent-Length: 0\r\n",
    );
    registrar.send(&brief, from).await;
    let (second, from) = next_register(&registrar).await;
    assert_eq!(expires(&second), "900");
    assert_eq!(seq(&second), seq(&first) + 1);
    registrar.send(&granted(&second, 900), from).await;
    let unregister = async {
        let (last, from) = next_register(&registrar).await;
        registrar.send(&granted(&last, 0), from).await;
    };
    tokio::join!(sidecar.stop(), unregister);
}

/// A bearer token rotating about every 2 s for 30 s: a REGISTER carrying each new token
/// reaches the registrar within 1 s of its issue, and no REGISTER ever carries an
/// expired token.
#[tokio::test(start_paused = true)]
async fn every_new_token_is_registered_at_once_and_no_register_carries_an_expired_one() {
    use byoc_sidecar::sim::idp::{TokenCheck, TokenKind, Validation};
    let sim = common::sim::SimIdp::start(
        "edge-r",
        "registration-client-secret",
        "org-r",
        Duration::from_secs(4),
        TokenKind::Opaque,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let registrar = RawPeer::bind().await;
    let config = format!(
        "{}auth = \"bearer\"\n{}{REGISTRATION}",
        Sidecar::config("udp:127.0.0.1:9", &format!("udp:{}", registrar.addr), ""),
        sim.credentials_toml(dir.path(), "")
    );
    let sidecar = Sidecar::start_ready(&in_virtual_time(&config)).await;
    let end = Instant::now() + Duration::from_secs(30);
    let mut registers: Vec<(Instant, String)> = Vec::new();
    while let Ok((register, from)) = tokio::time::timeout_at(end, next_register(&registrar)).await {
        let authorization = header_values(&register, "Authorization")[0].clone();
        let token = authorization.strip_prefix("Bearer ").unwrap().to_string();
        assert_eq!(
            sim.idp.check(&token, Validation::AnyUnexpired),
            TokenCheck::Valid,
            "a REGISTER carried a token that is not valid now"
        );
        registers.push((Instant::now(), token));
        registrar.send(&granted(&register, 300), from).await;
    }
    let issued = sim.idp.issued();
    assert!(
        issued.len() >= 12,
        "the token rotated about every 2 s: {}",
        issued.len()
    );
    for token in issued
        .iter()
        .filter(|token| token.issued_at < end - Duration::from_secs(1))
    {
        let carried = registers
            .iter()
            .find(|(_, carried)| *carried == token.token)
            .map(|(at, _)| *at);
        let delay = carried.map(|at| at - token.issued_at);
        assert!(
            delay.is_some_and(|delay| delay <= Duration::from_secs(1)),
            "token issued at {:?} registered after {delay:?}",
            token.issued_at
        );
    }
    let unregister = async {
        let (last, from) = next_register(&registrar).await;
        registrar.send(&granted(&last, 0), from).await;
    };
    tokio::join!(sidecar.stop(), unregister);
}

/// A registrar that does not answer at all: each REGISTER times out (Timer F, 64·T1 =
/// 32 s, with its retransmissions), then the backoff runs; when it answers again the
/// trunk is registered at the next attempt.
#[tokio::test(start_paused = true)]
async fn a_silent_registrar_costs_a_transaction_timeout_then_a_backoff_step_each_time() {
    let registrar = RawPeer::bind().await;
    let config = format!(
        "{}{REGISTRATION}backoff_initial = \"2s\"\n",
        Sidecar::config("udp:127.0.0.1:9", &format!("udp:{}", registrar.addr), "")
    );
    let sidecar = Sidecar::start_with(&in_virtual_time(&config)).await;
    let mut starts: Vec<(Instant, u32)> = Vec::new();
    // Three attempts ignored: note when each new CSeq first appears.
    while starts.len() < 4 {
        let (register, _) = next_register(&registrar).await;
        if starts
            .last()
            .is_none_or(|(_, last)| *last != seq(&register))
        {
            starts.push((Instant::now(), seq(&register)));
        }
    }
    for (index, pair) in starts.windows(2).enumerate() {
        let gap = pair[1].0 - pair[0].0;
        let ceiling = Duration::from_secs(2 << index);
        let timeout = Duration::from_secs(32);
        assert!(
            gap >= timeout + ceiling / 2 && gap <= timeout + ceiling,
            "attempt {index}: {gap:?}"
        );
    }
    assert_eq!(
        sidecar.app.registrations["test"]
            .borrow()
            .last_failure
            .as_deref(),
        Some("no answer (timeout or transport failure)")
    );
    // It answers now (this is the fourth attempt, or a retransmission of it).
    let (register, from) = next_register(&registrar).await;
    registrar.send(&granted(&register, 300), from).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        sidecar.app.registrations["test"].borrow().state,
        State::Registered
    );
    let unregister = async {
        loop {
            let (last, from) = next_register(&registrar).await;
            if expires(&last) == "0" {
                registrar.send(&granted(&last, 0), from).await;
                return;
            }
        }
    };
    tokio::join!(sidecar.stop(), unregister);
}

/// A 403 to a REGISTER with a bearer token: a newer token is fetched and the REGISTER
/// re-sent once with it (CSeq + 1); a second 403 is a failure that backs off.
#[tokio::test(start_paused = true)]
async fn a_rejected_token_is_replaced_and_the_register_re_sent_once() {
    use byoc_sidecar::sim::idp::TokenKind;
    let sim = common::sim::SimIdp::start(
        "edge-403",
        "registration-403-secret",
        "org-r",
        Duration::from_secs(600),
        TokenKind::Opaque,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let registrar = RawPeer::bind().await;
    let config = format!(
        "{}auth = \"bearer\"\n{}force_refresh_interval = \"1s\"\n{REGISTRATION}",
        Sidecar::config("udp:127.0.0.1:9", &format!("udp:{}", registrar.addr), ""),
        sim.credentials_toml(dir.path(), "")
    );
    let sidecar = Sidecar::start_ready(&in_virtual_time(&config)).await;
    let (first, from) = next_register(&registrar).await;
    let old = header_values(&first, "Authorization")[0].clone();
    registrar
        .send(&answer(&first, 403, "Forbidden", "r"), from)
        .await;
    let (second, from) = next_register(&registrar).await;
    assert_eq!(seq(&second), seq(&first) + 1);
    let new = header_values(&second, "Authorization")[0].clone();
    assert_ne!(new, old, "re-sent with a newer token");
    registrar
        .send(&answer(&second, 403, "Forbidden", "r"), from)
        .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let status = sidecar.app.registrations["test"].borrow().clone();
    assert_eq!(status.state, State::BackingOff);
    assert_eq!(status.last_failure.as_deref(), Some("403 Forbidden"));
    assert_eq!(sim.idp.tokens_issued(), 2);
    sidecar.stop().await;
}

/// Answers every REGISTER at `registrar` with 200 (Expires 0 ones too) until `stop`.
async fn answer_registers(registrar: &RawPeer, until: Instant) {
    while let Ok((register, from)) = tokio::time::timeout_at(until, next_register(registrar)).await
    {
        let grant = if expires(&register) == "0" { 0 } else { 300 };
        registrar.send(&granted(&register, grant), from).await;
    }
}

/// Two trunks behind one core, each registered: a request from the core to a trunk's
/// Contact goes to that trunk's Edge, and a Contact naming a trunk the sender is not the
/// core of is refused.
#[tokio::test(start_paused = true)]
async fn requests_to_each_registered_contact_reach_their_own_trunks_edge() {
    let registrar = RawPeer::bind().await;
    let (edge_a, edge_b) = (RawPeer::bind().await, RawPeer::bind().await);
    let trunk = |name: &str, edge: SocketAddr, user: &str| {
        // The first trunk takes only Edge traffic for its domain; the core side does not
        // look at match criteria.
        let matcher = if name == "test" {
            "match = { domain = \"a.example\" }\n"
        } else {
            ""
        };
        format!(
            "\n[[trunk]]\nname = \"{name}\"\n{matcher}edge = \"udp:{edge}\"\ncore = \"udp:{}\"\n\n\
             [trunk.registration]\naor = \"sip:{user}@core.test\"\n",
            registrar.addr
        )
    };
    let base = Sidecar::config("udp:127.0.0.1:9", &format!("udp:{}", registrar.addr), "");
    let base = &base[..base.find("[[trunk]]").unwrap()];
    let config = format!(
        "{base}{}{}",
        trunk("test", edge_a.addr, "trunk-a"),
        trunk("other", edge_b.addr, "trunk-b")
    );
    let sidecar = Sidecar::start_with(&in_virtual_time(&config)).await;
    let mut contacts = std::collections::HashMap::new();
    for _ in 0..2 {
        let (register, from) = next_register(&registrar).await;
        let contact = header_values(&register, "Contact")[0].clone();
        let user = contact
            .split('@')
            .next()
            .unwrap()
            .trim_start_matches("<sip:")
            .to_string();
        contacts.insert(user, contact);
        registrar.send(&granted(&register, 300), from).await;
    }
    let core_side = sidecar.addr(
        byoc_sidecar::transport::Side::Core,
        byoc_sidecar::config::Transport::Udp,
    );
    for (user, edge) in [("trunk-b", &edge_b), ("trunk-a", &edge_a)] {
        let target = byoc_sidecar::sip::header::name_addr_uri(&contacts[user]).to_string();
        let invite =
            common::raw::invite(registrar.addr, core_side, &format!("z9hG4bK{user}"), user)
                .replacen(
                    &format!("INVITE sip:service@{core_side}"),
                    &format!("INVITE {target}"),
                    1,
                );
        registrar.send(&invite, core_side).await;
        let (arrived, _) = edge
            .receive(Duration::from_secs(5), "the INVITE at the Edge")
            .await;
        assert_eq!(
            header_values(&arrived, "Call-ID"),
            vec![user.to_string()],
            "{user}'s INVITE reached its own Edge"
        );
    }
    // A Contact naming a trunk index that is not served by this core.
    let forged = common::raw::invite(registrar.addr, core_side, "z9hG4bKforged", "forged")
        .replacen(
            &format!("INVITE sip:service@{core_side}"),
            &format!("INVITE sip:trunk-a@{core_side};bsct=7"),
            1,
        );
    registrar.send(&forged, core_side).await;
    let refused = loop {
        let (message, _) = registrar.receive(Duration::from_secs(5), "the 404").await;
        if matches!(&message, SipMessage::Response(_))
            && cseq(&message) == "1 INVITE"
            && common::raw::status(&message) >= 400
        {
            break message;
        }
    };
    assert_eq!(common::raw::status(&refused), 404);
    let until = Instant::now() + Duration::from_secs(10);
    tokio::join!(sidecar.stop(), answer_registers(&registrar, until));
}

/// The unregister meets a stale nonce (the kept one expired long ago): the challenge is
/// answered and the binding removed, even during shutdown.
#[tokio::test(start_paused = true)]
async fn a_challenged_unregister_is_answered() {
    let registrar = RawPeer::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{REGISTRATION}",
        Sidecar::digest_config(registrar.addr, dir.path(), "wonderland", "")
    );
    let sidecar = Sidecar::start_ready(&in_virtual_time(&config)).await;
    let www = |nonce: &str, extra: &str| {
        format!("WWW-Authenticate: Digest realm=\"core.test\", nonce=\"{nonce}\", qop=\"auth\"{extra}\r\nContent-Length: 0\r\n")
    };
    let (first, from) = next_register(&registrar).await;
    registrar
        .send(
            &answer(&first, 401, "Unauthorized", "r")
                .replace("Content-Length: 0\r\n", &www("n1", "")),
            from,
        )
        .await;
    let (second, from) = next_register(&registrar).await;
    assert!(header_values(&second, "Authorization")[0].contains("nonce=\"n1\""));
    registrar.send(&granted(&second, 300), from).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let unregister = async {
        let (stale, from) = next_register(&registrar).await;
        assert_eq!(expires(&stale), "0");
        registrar
            .send(
                &answer(&stale, 401, "Unauthorized", "r")
                    .replace("Content-Length: 0\r\n", &www("n2", ", stale=true")),
                from,
            )
            .await;
        let (answered, from) = next_register(&registrar).await;
        registrar.send(&granted(&answered, 0), from).await;
        answered
    };
    let ((), answered) = tokio::join!(sidecar.stop(), unregister);
    assert_eq!(expires(&answered), "0");
    assert!(header_values(&answered, "Authorization")[0].contains("nonce=\"n2\""));
    assert_eq!(seq(&answered), seq(&second) + 2);
}
