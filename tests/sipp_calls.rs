//! Calls through the sidecar between real sipp processes on loopback, in both directions
//! and over UDP and TCP.

mod common;

use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::transport::Side;
use common::*;

const CALLS: u64 = 200;
const RATE: u64 = 100;
const HOLD_MS: u64 = 200;
const LIMIT: Duration = Duration::from_secs(90);

/// A sipp UAS scenario and the UAC scenario that calls it.
struct SippPair {
    uas: &'static str,
    uac: &'static str,
    calls: u64,
    rate: u64,
    hold_ms: u64,
}

impl SippPair {
    /// Starts the UAS on `uas_port`, places the calls from the UAC into `sidecar`'s
    /// `uac_side`, and asserts that both ends finished every call.
    async fn run(&self, sidecar: &Sidecar, uac_side: Side, uas_port: u16, transport: Transport) {
        let uas = Sipp::start("uas", &uas_args(self.uas, uas_port, transport, self.calls));
        // Give the UAS a moment to bind before traffic arrives.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let target = sidecar.addr(uac_side, transport);
        let uac = Sipp::start(
            "uac",
            &uac_args(
                self.uac,
                target,
                transport,
                self.calls,
                self.rate,
                self.hold_ms,
            ),
        );
        let uac = uac.finish(LIMIT).await;
        let uas = uas.finish(Duration::from_secs(30)).await;
        assert_all_calls_succeeded(&uac, self.calls, "uac");
        assert_all_calls_succeeded(&uas, self.calls, "uas");
    }
}

/// sipp UAC -> sidecar -> sipp UAS, where `direction` says which side the UAC is on.
async fn calls_complete(uac_side: Side, transport: Transport) {
    let uas_port = free_port();
    let uas_target = format!("{transport}:127.0.0.1:{uas_port}");
    // The far end stands where the other side's trunk address points.
    let (edge, core) = match uac_side {
        Side::Edge => ("udp:127.0.0.1:9".to_string(), uas_target),
        Side::Core => (uas_target, "udp:127.0.0.1:9".to_string()),
    };
    let sidecar = Sidecar::start(&edge, &core, "").await;
    let pair = SippPair {
        uas: "uas.xml",
        uac: "uac.xml",
        calls: CALLS,
        rate: RATE,
        hold_ms: HOLD_MS,
    };
    pair.run(&sidecar, uac_side, uas_port, transport).await;
    let stats = sidecar.app.stats.snapshot();
    // INVITE and BYE statefully, each ACK for a 2xx statelessly.
    assert_eq!(stats.server_transactions, 2 * CALLS, "{stats:?}");
    assert_eq!(stats.stateless_forwards, CALLS, "{stats:?}");
    assert_eq!(
        stats.malformed_dropped + stats.send_failed + stats.locally_rejected,
        0,
        "{stats:?}"
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_calls_from_edge_to_core_complete() {
    calls_complete(Side::Edge, Transport::Udp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_calls_from_edge_to_core_complete() {
    calls_complete(Side::Edge, Transport::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_calls_from_core_to_edge_complete() {
    calls_complete(Side::Core, Transport::Udp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_calls_from_core_to_edge_complete() {
    calls_complete(Side::Core, Transport::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_after_ringing_gets_487_end_to_end() {
    const CANCELLED: u64 = 20;
    let uas_port = free_port();
    let sidecar = Sidecar::start("udp:127.0.0.1:9", &format!("udp:127.0.0.1:{uas_port}"), "").await;
    // The UAC sees 200 for its CANCEL and 487 for its INVITE; the UAS sees the CANCEL
    // and the ACK for its 487.
    let pair = SippPair {
        uas: "uas_cancel.xml",
        uac: "uac_cancel.xml",
        calls: CANCELLED,
        rate: 20,
        hold_ms: 0,
    };
    pair.run(&sidecar, Side::Edge, uas_port, Transport::Udp)
        .await;
    assert_eq!(sidecar.app.stats.snapshot().cancels_forwarded, CANCELLED);
    sidecar.stop().await;
}

/// RFC 3261 §16: methods the proxy does not know pass like the ones it does, outside a
/// dialog (with an unknown header and a body, checked at the far end) and inside one
/// (along the route set), over UDP and TCP.
async fn extension_methods_pass(transport: Transport) {
    const CALLS: u64 = 20;
    let uas_port = free_port();
    let sidecar = Sidecar::start(
        "udp:127.0.0.1:9",
        &format!("{transport}:127.0.0.1:{uas_port}"),
        "",
    )
    .await;
    let pair = SippPair {
        uas: "uas_extension.xml",
        uac: "uac_extension.xml",
        calls: CALLS,
        rate: 20,
        hold_ms: 0,
    };
    pair.run(&sidecar, Side::Edge, uas_port, transport).await;
    let stats = sidecar.app.stats.snapshot();
    // FROBNICATE, INVITE, NUDGE and BYE statefully; the ACK statelessly.
    assert_eq!(stats.server_transactions, 4 * CALLS, "{stats:?}");
    assert_eq!(
        stats.malformed_dropped + stats.send_failed + stats.locally_rejected,
        0,
        "{stats:?}"
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_extension_methods_pass_end_to_end() {
    extension_methods_pass(Transport::Udp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_extension_methods_pass_end_to_end() {
    extension_methods_pass(Transport::Tcp).await;
}
