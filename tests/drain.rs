//! Graceful shutdown (issue 13, item 2, SIGTERM half): once draining starts, a new call
//! gets 503 with `Retry-After`, `/readyz` says draining, and the calls in progress go on
//! to their BYE; the drain ends when none is left.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::transport::Side;
use common::raw::{final_for, header_values, invite, status, RawPeer};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_new_calls_and_waits_for_the_calls_in_progress() {
    const CALLS: u64 = 10;
    let uas_port = free_port();
    let text = Sidecar::config("udp:127.0.0.1:9", &format!("udp:127.0.0.1:{uas_port}"), "")
        + "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let sidecar = Sidecar::start_with(&text).await;
    let uas = Sipp::start("uas", &uas_args("uas.xml", uas_port, Transport::Udp, CALLS));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    // Ten calls in the first second, each held 3 s.
    let uac = Sipp::start(
        "uac",
        &uac_args("uac.xml", target, Transport::Udp, CALLS, 10, 3000),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    assert!(
        sidecar.app.observed.metrics.calls.load(relaxed) > 0,
        "calls are in progress when the drain starts"
    );
    let drain = {
        let app = &sidecar.app;
        async move { app.drain(Duration::from_secs(30)).await }
    };
    let late = async {
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let admin = sidecar.app.admin.unwrap();
        let ready = admin_request(admin, "GET", "/readyz").await;
        let edge = RawPeer::bind().await;
        edge.send(
            &invite(edge.addr, target, "z9hG4bKlate", "late@drain"),
            target,
        )
        .await;
        let refused = final_for(&edge, "late@drain").await;
        (ready, refused)
    };
    let (drained, (ready, refused)) = tokio::join!(drain, late);
    assert!(drained, "the drain ended before its deadline");
    assert!(ready.0 == 503 && ready.1.contains("draining"), "{ready:?}");
    assert_eq!(status(&refused), 503);
    assert_eq!(header_values(&refused, "Retry-After"), vec!["30"]);
    // The drain ended only once every call in progress had hung up.
    assert_eq!(sidecar.app.observed.metrics.calls.load(relaxed), 0);
    let uac = uac.finish(Duration::from_secs(30)).await;
    let uas = uas.finish(Duration::from_secs(30)).await;
    assert_all_calls_succeeded(&uac, CALLS, "uac");
    assert_all_calls_succeeded(&uas, CALLS, "uas");
    assert_eq!(sidecar.app.stats.snapshot().drain_rejected, 1);
    sidecar.stop().await;
}
