//! `replay` end to end: every shared capture read with the message and dialogue counts
//! its README records (from tshark); every fixture in `pcap-fixtures/` replayed through a
//! running sidecar, against its own captured core, against sipp, against Kamailio, and
//! the operators' 403-after-rotation capture against the simulated core, where the
//! sidecar absorbs the 403 and the replayed Edge sees 200.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::replay::player::Pacing;
use byoc_sidecar::replay::report::{Report, Verdict};
use byoc_sidecar::replay::{self, Filter, ReplayOptions};
use byoc_sidecar::sim::core::SimCore;
use byoc_sidecar::sim::idp::{TokenKind, Validation};
use byoc_sidecar::transport::Side;
use common::sim::SimIdp;
use common::*;
use tokio_util::sync::CancellationToken;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("pcap-fixtures")
        .join(name)
}

fn fixtures() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(fixture(""))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "pcap" || extension == "pcapng")
        })
        .collect();
    found.sort();
    assert_eq!(found.len(), 6, "the six recorded fixtures: {found:?}");
    found
}

/// `../shared/captures`, which CI has beside the project; missing is a loud failure.
fn shared_captures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/captures");
    assert!(
        dir.join("README.md").is_file(),
        "{} is missing: the shared capture corpus must sit beside the project",
        dir.display()
    );
    dir
}

fn options(capture: PathBuf, target: SocketAddr, core: Option<SocketAddr>) -> ReplayOptions {
    ReplayOptions {
        capture,
        target,
        transport: None,
        local_ip: None,
        core,
        pacing: Pacing {
            speed: 5.0,
            max_gap: Duration::from_millis(200),
            timeout: Duration::from_secs(5),
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
        },
        filter: Filter::default(),
    }
}

async fn run(options: &ReplayOptions) -> Report {
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        replay::replay(options, &CancellationToken::new()),
    )
    .await
    .expect("a replay ends within a minute")
    .unwrap();
    println!("{}", report.to_text());
    report
}

/// The edge-side ladder of the only dialogue, as `-> INVITE` / `<- 200 INVITE` lines.
fn replayed_edge(report: &Report) -> Vec<String> {
    report.dialogues[0]
        .edge_side
        .replayed
        .entries
        .iter()
        .map(|entry| format!("{} {}", if entry.sent { "->" } else { "<-" }, entry.label))
        .collect()
}

#[test]
fn every_shared_capture_reads_with_the_counts_its_readme_records() {
    let dir = shared_captures();
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    // | `file` | bytes | origin | format | transports | SIP msgs | distinct Call-IDs | ...
    let rows: Vec<(String, u64, usize)> = readme
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (
                cells[1].trim_matches('`').to_string(),
                cells[6].parse().unwrap(),
                cells[7].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows.len(), 8, "eight captures in the README table");
    for (file, messages, call_ids) in rows {
        let extraction = replay::read(&dir.join(&file), &Filter::default()).unwrap();
        let (dialogues, without) = replay::script::dialogues(&extraction.messages, &[]);
        assert_eq!(
            (extraction.stats.sip_messages, dialogues.len(), without),
            (messages, call_ids, 0),
            "{file}: SIP messages, dialogues, messages without Call-ID; {:?}",
            extraction.stats
        );
        assert_eq!(extraction.stats.file_error, None, "{file}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_replays_through_the_sidecar_against_its_captured_core() {
    let core_port = free_port();
    let core: SocketAddr = ([127, 0, 0, 1], core_port).into();
    let sidecar = Sidecar::start("udp:127.0.0.1:9", &format!("udp:{core}"), "").await;
    for capture in fixtures() {
        let extraction = replay::read(&capture, &Filter::default()).unwrap();
        let transport = extraction.messages[0].transport;
        let target = sidecar.addr(Side::Edge, transport);
        let report = run(&options(capture.clone(), target, Some(core))).await;
        let dialogue = &report.dialogues[0];
        let core_side = dialogue.core_side.as_ref().unwrap();
        assert_eq!(
            (
                report.dialogues.len(),
                dialogue.edge_side.verdict,
                core_side.verdict
            ),
            (1, Verdict::Matched, Verdict::Matched),
            "{}: edge differences {:?}, core differences {:?}",
            capture.display(),
            dialogue.edge_side.differences,
            core_side.differences
        );
        assert!(report.all_matched());
    }
    sidecar.stop().await;
}

/// Replays `capture` through a sidecar to sipp running `uas` as the far end.
async fn against_sipp(capture: &str, uas: &str) -> Report {
    let uas_port = free_port();
    let sipp = Sipp::start("uas", &uas_args(uas, uas_port, Transport::Udp, 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sidecar = Sidecar::start("udp:127.0.0.1:9", &format!("udp:127.0.0.1:{uas_port}"), "").await;
    let path = fixture(capture);
    let transport = replay::read(&path, &Filter::default()).unwrap().messages[0].transport;
    let report = run(&options(path, sidecar.addr(Side::Edge, transport), None)).await;
    let outcome = sipp.finish(Duration::from_secs(20)).await;
    assert_all_calls_succeeded(&outcome, 1, "sipp as the far end");
    sidecar.stop().await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_udp_and_tcp_replay_against_sipp_as_captured() {
    for capture in ["call-udp.pcapng", "call-tcp.pcap"] {
        let report = against_sipp(capture, "uas.xml").await;
        assert_eq!(
            report.dialogues[0].edge_side.verdict,
            Verdict::Matched,
            "{capture}"
        );
        assert_eq!(
            replayed_edge(&report),
            [
                "-> INVITE",
                "<- 100 INVITE",
                "<- 180 INVITE",
                "<- 200 INVITE",
                "-> ACK",
                "-> BYE",
                "<- 200 BYE"
            ]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_re_invite_replay_against_sipp_as_captured() {
    let cancelled = against_sipp("cancel.pcapng", "uas_cancel.xml").await;
    assert_eq!(cancelled.dialogues[0].edge_side.verdict, Verdict::Matched);
    assert!(replayed_edge(&cancelled).contains(&"<- 487 INVITE".to_string()));
    let reinvite = against_sipp("reinvite.pcap", "uas_reinvite.xml").await;
    assert_eq!(reinvite.dialogues[0].edge_side.verdict, Verdict::Matched);
    let invites = replayed_edge(&reinvite)
        .iter()
        .filter(|line| *line == "-> INVITE")
        .count();
    assert_eq!(invites, 2, "the initial INVITE and the re-INVITE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_403_after_rotation_is_absorbed_and_the_replayed_edge_sees_200() {
    let sim = SimIdp::start(
        "edge-a",
        "replay-secret",
        "org-a",
        Duration::from_secs(60),
        TokenKind::Opaque,
    )
    .await;
    let core = SimCore::start(
        sim.idp.clone(),
        Validation::RevokeOnReissue,
        "127.0.0.1:0".parse().unwrap(),
        sim.cancel.clone(),
        &sim.tracker,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sidecar = sim
        .bearer_sidecar(
            dir.path(),
            core.addr,
            "force_refresh_interval = \"100ms\"\n",
        )
        .await;
    // Another instance of the client takes a token: the sidecar's is revoked, unknown
    // to it, as in the capture.
    sim.idp.issue_for("edge-a").unwrap();
    let capture = fixture("invite-403-after-rotation.pcap");
    let report = run(&options(
        capture,
        sidecar.addr(Side::Edge, Transport::Udp),
        None,
    ))
    .await;
    let edge = &report.dialogues[0].edge_side;
    assert_eq!(edge.verdict, Verdict::Diverged);
    assert_eq!(
        edge.differences,
        [
            "captured, not replayed: <- 403 INVITE",
            "replayed, not captured: <- 180 INVITE",
            "replayed, not captured: <- 200 INVITE",
            "replayed, not captured: -> BYE (cleanup)",
            "replayed, not captured: <- 200 BYE",
        ]
    );
    assert!(!report.all_matched());
    let stats = sidecar.app.stats.snapshot();
    assert_eq!((stats.rejections_absorbed, stats.resends), (1, 1));
    assert_eq!(
        core.stats
            .rejected_403
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the core refused the revoked token once"
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_digest_registration_registers_with_kamailio_through_a_digest_trunk() {
    let kamailio = common::kamailio::Kamailio::registrar("replay-password").await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start_with(&Sidecar::digest_config(
        kamailio.addr(),
        dir.path(),
        "replay-password",
        "",
    ))
    .await;
    let capture = fixture("register-digest.pcapng");
    let report = run(&options(
        capture,
        sidecar.addr(Side::Edge, Transport::Udp),
        None,
    ))
    .await;
    let edge = &report.dialogues[0].edge_side;
    // The sidecar answered Kamailio's 401 itself: the Edge's own retry with the
    // captured (stale) credentials is not needed and not sent.
    assert_eq!(replayed_edge(&report), ["-> REGISTER", "<- 200 REGISTER"]);
    assert_eq!(edge.verdict, Verdict::Diverged);
    assert!(edge
        .notes
        .iter()
        .any(|note| note.contains("answers a challenge that did not come live")));
    assert!(kamailio.kamcmd("ul.dump").contains("alice"));
    assert_eq!(sidecar.app.stats.snapshot().rejections_absorbed, 1);
    sidecar.stop().await;
}
