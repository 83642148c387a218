//! Registration against a real registrar: Kamailio (Debian package) with `registrar` and
//! `usrloc`, demanding Digest. The binding appears in its location table (`kamcmd
//! ul.dump`), is refreshed before it lapses, and is gone after the sidecar shuts down;
//! an INVITE from the core side to the registered Contact reaches a sipp UAS playing the
//! Edge and completes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::registration::State;
use byoc_sidecar::transport::Side;
use common::kamailio::Kamailio;
use common::*;

/// A numeric field (`CSeq`, `Expires`: seconds left) of the binding of `contact` in an
/// `ul.dump`, if the binding is there and the field is a number.
fn binding_field(dump: &str, contact: &str, field: &str) -> Option<u64> {
    let at = dump.find(&format!("Address: {contact}"))?;
    let line = dump[at..]
        .lines()
        .find(|line| line.trim_start().starts_with(&format!("{field}:")))?;
    line.split_once(':')?.1.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kamailio_holds_the_binding_while_running_and_calls_reach_the_edge() {
    const CALLS: u64 = 5;
    let kamailio = Kamailio::registrar("wonderland").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("password"), "wonderland").unwrap();
    let edge_port = free_port();
    let config = format!(
        "{}auth = \"digest\"\n\n[trunk.credentials]\nkind = \"static\"\nusername = \"alice\"\npassword_file = \"{}\"\n\n\
         [trunk.registration]\naor = \"sip:alice@core.test\"\nexpires = \"10s\"\nmargin = \"5s\"\n",
        Sidecar::config(
            &format!("udp:127.0.0.1:{edge_port}"),
            &format!("udp:{}", kamailio.addr()),
            ""
        ),
        dir.path().join("password").display()
    );
    let sidecar = Sidecar::start_ready(&config).await;
    let core_side = sidecar.addr(Side::Core, Transport::Udp);
    let contact = format!("sip:alice@{core_side}");
    let mut status = sidecar.app.registrations["test"].clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|status| status.state == State::Registered),
    )
    .await
    .expect("registered within 10 s")
    .unwrap();
    let dump = kamailio.kamcmd("ul.dump");
    let first = binding_field(&dump, &contact, "CSeq")
        .unwrap_or_else(|| panic!("no binding for {contact} in:\n{dump}"));

    // Refreshed before it lapses: 10 s granted, refreshed after 5 s; watched for 12 s,
    // the binding is there every time and its CSeq rises.
    let mut refreshed = false;
    for _ in 0..24 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let dump = kamailio.kamcmd("ul.dump");
        let left = binding_field(&dump, &contact, "Expires");
        assert!(
            left.is_some_and(|left| left > 0),
            "the binding lapsed:\n{dump}"
        );
        refreshed |= binding_field(&dump, &contact, "CSeq").is_some_and(|cseq| cseq > first);
    }
    assert!(refreshed, "no refresh seen in 12 s");

    // The core calls the trunk: sipp -> Kamailio (lookup) -> sidecar -> sipp as the Edge.
    let edge = Sipp::start(
        "edge uas",
        &uas_args("uas.xml", edge_port, Transport::Udp, CALLS),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut args = uac_args("uac.xml", kamailio.addr(), Transport::Udp, CALLS, 5, 200);
    args.extend(["-s".to_string(), "alice".to_string()]);
    let far_end = Sipp::start("core uac", &args);
    let far_end = far_end.finish(Duration::from_secs(60)).await;
    let edge = edge.finish(Duration::from_secs(30)).await;
    if far_end.successful != CALLS {
        eprintln!("kamailio log:\n{}", kamailio.log());
    }
    assert_all_calls_succeeded(&far_end, CALLS, "sipp calling through Kamailio");
    assert_all_calls_succeeded(&edge, CALLS, "sipp as the Edge");

    // Shutdown unregisters: the binding is gone at once, not when it would lapse.
    sidecar.stop().await;
    let dump = kamailio.kamcmd("ul.dump");
    assert!(
        !dump.contains(&format!("Address: {contact}")),
        "still bound after shutdown:\n{dump}"
    );
}
