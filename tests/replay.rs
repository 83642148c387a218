//! `replay` end to end: every third-party capture in `pcap-fixtures/`, and every capture
//! of the shared corpus where it sits beside the project, read with the message and
//! dialogue counts its README records (from tshark); every recorded fixture in
//! `pcap-fixtures/` replayed through a running sidecar, against its own captured core,
//! against sipp, against Kamailio, and the operators' 403-after-rotation capture against
//! the simulated core, where the sidecar absorbs the 403 and the replayed Edge sees 200.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::replay::player::Pacing;
use byoc_sidecar::replay::report::{Report, Verdict};
use byoc_sidecar::replay::{self, Filter, ReplayOptions};
use byoc_sidecar::sim::idp::{TokenKind, Validation};
use byoc_sidecar::transport::Side;
use common::sim::SimIdp;
use common::*;
use tokio_util::sync::CancellationToken;

/// `name` in `pcap-fixtures/`; an empty name gives the directory itself.
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("pcap-fixtures")
        .join(name)
}

/// The captures recorded for this project by `scripts/record-fixtures.sh`: every pcap and
/// pcapng file in `pcap-fixtures/` except the third-party copies that its README's capture
/// table lists.
fn fixtures() -> Vec<PathBuf> {
    let readme = std::fs::read_to_string(fixture("README.md")).unwrap();
    let third_party: Vec<String> = capture_table(&readme)
        .iter()
        .map(|row| cell(row, "file").to_string())
        .collect();
    let mut found: Vec<PathBuf> = std::fs::read_dir(fixture(""))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "pcap" || extension == "pcapng")
        })
        .filter(|path| {
            !path
                .file_name()
                .is_some_and(|name| third_party.iter().any(|listed| name == listed.as_str()))
        })
        .collect();
    found.sort();
    assert_eq!(found.len(), 6, "the six recorded fixtures: {found:?}");
    found
}

/// `../shared/captures`, the shared corpus that CI keeps beside the project, or `None`
/// where it is missing and `CI` is unset (a fresh clone): then a line on stderr says the
/// caller's test is skipped. Where it is missing and `CI` is set to anything non-empty,
/// the test fails, naming the missing path.
fn shared_captures() -> Option<PathBuf> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/captures");
    let readme = directory.join("README.md");
    if readme.is_file() {
        return Some(directory);
    }
    let under_ci = std::env::var_os("CI").is_some_and(|value| !value.is_empty());
    assert!(
        !under_ci,
        "{} is missing: under CI (CI is set) the shared capture corpus must sit beside the \
         project",
        readme.display()
    );
    // Straight to stderr, past the test harness's capture, so the skip shows in the run.
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {} is missing (no shared capture corpus beside the project, CI unset)",
        readme.display()
    );
    None
}

/// The columns that mark a capture table: the shared corpus's README has one, and
/// `pcap-fixtures/README.md` has one for its third-party captures.
const CAPTURE_TABLE_COLUMNS: [&str; 3] = ["file", "SIP msgs", "distinct Call-IDs"];

/// The rows of the one capture table in `readme` (the Markdown table whose header has
/// every column of `CAPTURE_TABLE_COLUMNS`), each mapping a column's header to its cell.
/// Only rows that start with a back-quoted file name count; other tables are ignored.
fn capture_table(readme: &str) -> Vec<HashMap<String, String>> {
    let mut headers: Option<Vec<String>> = None;
    let mut tables = 0;
    let mut rows = Vec::new();
    for line in readme.lines() {
        if !line.starts_with('|') {
            headers = None;
            continue;
        }
        let cells: Vec<String> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(|cell| cell.trim().to_string())
            .collect();
        if headers.is_none() {
            if CAPTURE_TABLE_COLUMNS
                .iter()
                .all(|column| cells.iter().any(|cell| cell == column))
            {
                headers = Some(cells);
                tables += 1;
            }
            continue;
        }
        if let Some(names) = &headers {
            if line.starts_with("| `") {
                assert_eq!(
                    cells.len(),
                    names.len(),
                    "a capture table row with as many cells as the header: {line}"
                );
                rows.push(names.iter().cloned().zip(cells).collect());
            }
        }
    }
    assert_eq!(tables, 1, "one capture table in the README");
    rows
}

/// The cell of `row` under `column`, without back-quotes around it.
fn cell<'row>(row: &'row HashMap<String, String>, column: &str) -> &'row str {
    row.get(column)
        .unwrap_or_else(|| panic!("no column {column:?} in the capture table: {row:?}"))
        .trim_matches('`')
}

/// The number in `row` under `column`; a cell that is not a number fails the test.
fn number<Number>(row: &HashMap<String, String>, column: &str) -> Number
where
    Number: std::str::FromStr,
    Number::Err: std::fmt::Display,
{
    let text = cell(row, column);
    text.parse().unwrap_or_else(|error| {
        panic!(
            "{}: {column} {text:?} is not a number: {error}",
            cell(row, "file")
        )
    })
}

/// Reads every capture that the capture table of `directory/README.md` lists, from
/// `directory`, and checks that the reader finds the SIP messages and the dialogues (one
/// per distinct Call-ID) the table records, every message with a Call-ID and the file
/// undamaged. Returns the table's rows, for checks of its other columns.
fn check_recorded_counts(directory: &Path) -> Vec<HashMap<String, String>> {
    let readme_path = directory.join("README.md");
    let readme = std::fs::read_to_string(&readme_path)
        .unwrap_or_else(|error| panic!("{}: {error}", readme_path.display()));
    let rows = capture_table(&readme);
    assert!(
        !rows.is_empty(),
        "{}: the capture table lists no file",
        readme_path.display()
    );
    for row in &rows {
        let file = cell(row, "file");
        let messages: u64 = number(row, "SIP msgs");
        let call_ids: usize = number(row, "distinct Call-IDs");
        let extraction = replay::read(&directory.join(file), &Filter::default())
            .unwrap_or_else(|error| panic!("{file}: {error}"));
        let (dialogues, without) = replay::script::dialogues(extraction.messages, &[]);
        assert_eq!(
            (extraction.stats.sip_messages, dialogues.len(), without),
            (messages, call_ids, 0),
            "{file}: SIP messages, dialogues, messages without Call-ID; {:?}",
            extraction.stats
        );
        assert_eq!(extraction.stats.file_error, None, "{file}");
    }
    rows
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

/// Replays `capture` through `sidecar`'s Edge side, over the transport it was captured
/// on, with the core side played on `core` if given.
async fn through(sidecar: &Sidecar, capture: &Path, core: Option<SocketAddr>) -> Report {
    let transport = replay::read(capture, &Filter::default()).unwrap().messages[0].transport;
    let target = sidecar.addr(Side::Edge, transport);
    run(&options(capture.to_path_buf(), target, core)).await
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
fn every_third_party_fixture_reads_with_the_counts_its_readme_records() {
    let directory = fixture("");
    for row in check_recorded_counts(&directory) {
        let licence = directory.join(cell(&row, "licence file"));
        assert!(
            licence.is_file(),
            "{}: its licence text {} is missing",
            cell(&row, "file"),
            licence.display()
        );
    }
}

#[test]
fn every_shared_capture_reads_with_the_counts_its_readme_records() {
    let Some(directory) = shared_captures() else {
        return;
    };
    let rows = check_recorded_counts(&directory);
    assert_eq!(rows.len(), 8, "eight captures in the shared README's table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_replays_through_the_sidecar_against_its_captured_core() {
    let core_port = free_port();
    let core: SocketAddr = ([127, 0, 0, 1], core_port).into();
    let sidecar = Sidecar::start("udp:127.0.0.1:9", &format!("udp:{core}"), "").await;
    for capture in fixtures() {
        let report = through(&sidecar, &capture, Some(core)).await;
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
    let report = through(&sidecar, &fixture(capture), None).await;
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
    let core = sim.core(Validation::RevokeOnReissue).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = sim.bearer_sidecar(dir.path(), core.addr, "").await;
    // Another instance of the client takes a token: the sidecar's is revoked, unknown
    // to it, as in the capture.
    sim.idp.issue_for("edge-a").unwrap();
    let report = through(&sidecar, &fixture("invite-403-after-rotation.pcap"), None).await;
    let edge = &report.dialogues[0].edge_side;
    assert_eq!(edge.verdict, Verdict::Diverged);
    assert_eq!(
        edge.differences,
        [
            "captured, not replayed: <- 403 INVITE",
            "replayed, not captured: <- 180 INVITE",
            "replayed, not captured: <- 200 INVITE",
        ]
    );
    // The call the capture never had is hung up, not left behind.
    assert!(replayed_edge(&report).ends_with(&["-> BYE".to_string(), "<- 200 BYE".to_string()]));
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
    // Ready: the trunk holds its password before the capture's REGISTER arrives (else a
    // fast replay can meet the 503 of a trunk without a credential yet).
    let sidecar = Sidecar::start_ready(&Sidecar::digest_config(
        kamailio.addr(),
        dir.path(),
        "replay-password",
        "",
    ))
    .await;
    let report = through(&sidecar, &fixture("register-digest.pcapng"), None).await;
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

const BINARY: &str = env!("CARGO_BIN_EXE_byoc-sidecar");

#[test]
fn the_command_lists_a_capture_and_refuses_what_is_no_capture_with_65() {
    let listed = std::process::Command::new(BINARY)
        .args(["replay", "--list", "--json"])
        .arg(fixture("reinvite.pcap"))
        .output()
        .unwrap();
    assert_eq!(listed.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(json["reader"]["sip_messages"], 20);
    assert_eq!(json["dialogues"].as_array().unwrap().len(), 1);
    assert_eq!(
        json["dialogues"][0]["ladder"]["entries"][0]["label"],
        "INVITE"
    );

    let dir = tempfile::tempdir().unwrap();
    let not_a_capture = dir.path().join("notes.txt");
    std::fs::write(&not_a_capture, "INVITE sip:x SIP/2.0\r\n").unwrap();
    let truncated = dir.path().join("truncated.pcap");
    let bytes = std::fs::read(fixture("call-tcp.pcap")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let empty = dir.path().join("empty.pcap");
    std::fs::write(&empty, &bytes[..24]).unwrap();
    for (path, expected_code, expected_text) in [
        (
            not_a_capture.clone(),
            65,
            "not a pcap or pcapng file: it starts with 49 4e 56 49",
        ),
        (dir.path().join("missing.pcap"), 65, "cannot read"),
        (empty, 65, "holds no SIP dialogue"),
    ] {
        let output = std::process::Command::new(BINARY)
            .args(["replay", "--to", "127.0.0.1:9"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(expected_code), "{stderr}");
        assert!(stderr.contains(expected_text), "{stderr}");
    }
    // A truncated capture lists what came before the cut, with a warning.
    let listed = std::process::Command::new(BINARY)
        .args(["replay", "--list"])
        .arg(&truncated)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(listed.status.code(), Some(0));
    assert!(
        stdout.contains("warning: the file ends inside frame"),
        "{stdout}"
    );
    for bad in [
        ["--speed", "0"],
        ["--speed", "0.0001"],
        ["--timeout", "2h"],
        ["--core", "0.0.0.0:5090"],
        ["--local", "::"],
    ] {
        let refused = std::process::Command::new(BINARY)
            .args(["replay", "--to", "127.0.0.1:9"])
            .args(bad)
            .arg(fixture("reinvite.pcap"))
            .output()
            .unwrap();
        assert_eq!(refused.status.code(), Some(2), "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_exits_0_when_every_dialogue_matched_and_1_when_one_did_not() {
    let core_port = free_port();
    let sidecar =
        Sidecar::start("udp:127.0.0.1:9", &format!("udp:127.0.0.1:{core_port}"), "").await;
    let target = sidecar.addr(Side::Edge, Transport::Udp).to_string();
    let replay = |capture: &str, core: Option<u16>| {
        let mut command = tokio::process::Command::new(BINARY);
        command
            .args([
                "replay",
                "--to",
                &target,
                "--speed",
                "5",
                "--max-gap",
                "200ms",
            ])
            .args(["--timeout", "3s", "--json"])
            .arg(fixture(capture));
        if let Some(port) = core {
            command.args(["--core", &format!("127.0.0.1:{port}")]);
        }
        command.output()
    };
    let matched = replay("call-udp.pcapng", Some(core_port)).await.unwrap();
    assert_eq!(
        matched.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&matched.stdout)
    );
    let json: serde_json::Value = serde_json::from_slice(&matched.stdout).unwrap();
    assert_eq!(json["summary"]["matched"], 1);
    assert_eq!(json["dialogues"][0]["core_side"]["verdict"], "matched");
    // Nobody plays the core: its port is closed, so the sidecar answers the INVITE 503
    // at once (ICMP port unreachable) where the capture has the call go through.
    let silent = replay("call-udp.pcapng", None).await.unwrap();
    assert_eq!(silent.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&silent.stdout).unwrap();
    assert_eq!(json["dialogues"][0]["edge_side"]["verdict"], "diverged");
    sidecar.stop().await;
}

/// The two IPv6 captures of the shared corpus (unbracketed IPv6 hosts in Via, Contact,
/// Request-URI, To and From; one with PRACK, UPDATE and fragmented INVITEs) replay
/// through the sidecar against their own captured core, every message matched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ipv6_shared_captures_replay_through_the_sidecar() {
    let Some(directory) = shared_captures() else {
        return;
    };
    let core_port = free_port();
    let core: SocketAddr = ([127, 0, 0, 1], core_port).into();
    let sidecar = Sidecar::start("udp:127.0.0.1:9", &format!("udp:{core}"), "").await;
    for name in [
        "invite-call-ipv6-udp.pcap",
        "prack-update-ipv6-frag-sll.pcap",
    ] {
        let capture = directory.join(name);
        let report = through(&sidecar, &capture, Some(core)).await;
        assert!(!report.dialogues.is_empty(), "{name}: no dialogue");
        for dialogue in &report.dialogues {
            let core_side = dialogue.core_side.as_ref().unwrap();
            assert_eq!(
                (dialogue.edge_side.verdict, core_side.verdict),
                (Verdict::Matched, Verdict::Matched),
                "{name}: edge differences {:?}, core differences {:?}",
                dialogue.edge_side.differences,
                core_side.differences
            );
        }
        assert!(report.all_matched(), "{name}");
    }
    let stats = sidecar.app.stats.snapshot();
    assert_eq!(stats.malformed_dropped, 0, "{stats:?}");
    sidecar.stop().await;
}
