//! `byoc-sidecar check --online` (issue 13, item 3) against the simulators, in every
//! failure mode they can produce: each names the failing check and its likely cause,
//! and the exit status says whether every trunk is healthy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use byoc_sidecar::sim::idp::{Fault, TokenKind, Validation};
use common::sim::SimIdp;
use common::Sidecar;
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_byoc-sidecar");

/// A token endpoint and a core checking its tokens under `validation`.
async fn simulators(ttl: Duration, validation: Validation) -> (SimIdp, std::net::SocketAddr) {
    let sim = SimIdp::start("edge-c", "check-secret", "org-c", ttl, TokenKind::Jwt).await;
    let core = sim.core(validation).await;
    (sim, core.addr)
}

/// A bearer trunk toward `core` with the endpoint's client; `edit` changes the text.
fn config(
    sim: &SimIdp,
    dir: &std::path::Path,
    core: &str,
    edit: impl Fn(String) -> String,
) -> String {
    edit(format!(
        "{}auth = \"bearer\"\n{}",
        Sidecar::config("udp:127.0.0.1:9", core, ""),
        sim.credentials_toml(dir, "")
    ))
}

/// Runs `check --online --json` on `text`: the exit code and the report.
async fn run_check(dir: &std::path::Path, text: &str) -> (Option<i32>, Value) {
    let path = dir.join("sidecar.toml");
    std::fs::write(&path, text).unwrap();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(BINARY)
            .args(["check", "--online", "--json", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!(
            "not JSON ({error}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code(), report)
}

/// The first failing finding of the only trunk.
fn problem(report: &Value) -> (String, String, String) {
    let finding = report[0]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|finding| finding["ok"] == false)
        .unwrap_or_else(|| panic!("no problem found: {report:#}"));
    let text = |key: &str| finding[key].as_str().unwrap_or_default().to_string();
    (text("check"), text("detail"), text("cause"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_trunk_passes_every_check_and_exits_0() {
    let (sim, core) = simulators(Duration::from_secs(600), Validation::AnyUnexpired).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&sim, dir.path(), &format!("udp:{core}"), |text| text);
    let (code, report) = run_check(dir.path(), &text).await;
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report[0]["healthy"], true);
    let checks: Vec<&str> = report[0]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|finding| finding["check"].as_str().unwrap())
        .collect();
    for expected in ["token endpoint", "token", "clock", "refresh", "core"] {
        assert!(checks.contains(&expected), "{checks:?}");
    }
    let text = report.to_string();
    assert!(
        text.contains("org-c"),
        "the token's organization is named: {text}"
    );
    assert!(!text.contains("check-secret"));
    for issued in sim.idp.issued() {
        assert!(!text.contains(&issued.token), "a token in the report");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_client_secret_is_named() {
    let (sim, core) = simulators(Duration::from_secs(600), Validation::AnyUnexpired).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&sim, dir.path(), &format!("udp:{core}"), |text| text);
    std::fs::write(dir.path().join("client-secret"), "not-the-secret").unwrap();
    let (code, report) = run_check(dir.path(), &text).await;
    assert_eq!(code, Some(1));
    let (check, detail, cause) = problem(&report);
    assert_eq!(check, "token endpoint");
    assert!(
        detail.contains("401") && detail.contains("invalid_client"),
        "{detail}"
    );
    assert!(cause.contains("client id and secret"), "{cause}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_asked_for_another_organization_is_named() {
    let (sim, core) = simulators(Duration::from_secs(600), Validation::AnyUnexpired).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&sim, dir.path(), &format!("udp:{core}"), |text| {
        text.replace("organization = \"org-c\"", "organization = \"org-child\"")
    });
    let (code, report) = run_check(dir.path(), &text).await;
    assert_eq!(code, Some(1));
    let (check, detail, cause) = problem(&report);
    assert_eq!(check, "token endpoint");
    assert!(detail.contains("invalid_scope"), "{detail}");
    assert!(cause.contains("organization"), "{cause}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_failing_token_endpoint_is_named() {
    let (sim, core) = simulators(Duration::from_secs(600), Validation::AnyUnexpired).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = common::free_port();
    let text = config(&sim, dir.path(), &format!("udp:{core}"), |text| {
        text.replace(
            &sim.idp.url(),
            &format!("http://127.0.0.1:{closed}/oauth/token"),
        )
    });
    let (code, report) = run_check(dir.path(), &text).await;
    assert_eq!(code, Some(1));
    let (check, _, cause) = problem(&report);
    assert_eq!(check, "token endpoint");
    assert!(cause.contains("cannot be reached"), "{cause}");

    // An endpoint that hangs past request_timeout, or drops the connection.
    for fault in [Fault::Delay(Duration::from_secs(3)), Fault::Drop] {
        sim.idp.set_fault(Some(fault.clone()));
        let text = config(&sim, dir.path(), &format!("udp:{core}"), |text| {
            text.replace(
                "organization = \"org-c\"",
                "organization = \"org-c\"\nrequest_timeout = \"1s\"",
            )
        });
        let (code, report) = run_check(dir.path(), &text).await;
        assert_eq!(code, Some(1), "{fault:?}");
        let (check, detail, cause) = problem(&report);
        assert_eq!(check, "token endpoint", "{fault:?}");
        assert!(
            cause.contains("cannot be reached or does not answer in time"),
            "{fault:?}: {detail} / {cause}"
        );
    }

    for fault in [
        Fault::Status {
            code: 503,
            retry_after: None,
        },
        Fault::Status {
            code: 429,
            retry_after: Some(2),
        },
        Fault::Garbage,
        Fault::EmptyBody,
    ] {
        sim.idp.set_fault(Some(fault.clone()));
        let text = config(&sim, dir.path(), &format!("udp:{core}"), |text| text);
        let (code, report) = run_check(dir.path(), &text).await;
        assert_eq!(code, Some(1), "{fault:?}");
        let (check, detail, cause) = problem(&report);
        assert_eq!(check, "token endpoint", "{fault:?}");
        assert!(
            cause.contains("failing, throttling"),
            "{fault:?}: {detail} / {cause}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_buffer_longer_than_the_lifetime_is_named() {
    // 10 s tokens, the default 15 s buffer.
    let (sim, core) = simulators(Duration::from_secs(10), Validation::AnyUnexpired).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&sim, dir.path(), &format!("udp:{core}"), |text| text);
    let (code, report) = run_check(dir.path(), &text).await;
    assert_eq!(code, Some(1));
    let (check, detail, _) = problem(&report);
    assert_eq!(check, "refresh");
    assert!(detail.contains("more than 90 %"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_that_refuses_the_token_or_does_not_answer_is_named() {
    let (sim, core) = simulators(Duration::from_secs(600), Validation::RejectAll).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&sim, dir.path(), &format!("udp:{core}"), |text| text);
    let (code, report) = run_check(dir.path(), &text).await;
    assert_eq!(code, Some(1));
    let (check, detail, cause) = problem(&report);
    assert_eq!(check, "core");
    assert!(detail.contains("403"), "{detail}");
    assert!(cause.contains("does not accept this credential"), "{cause}");

    // Nothing listens where the core should be.
    let silent = format!("udp:127.0.0.1:{}", common::free_port());
    let text = config(&sim, dir.path(), &silent, |text| text);
    let (code, report) = run_check(dir.path(), &text).await;
    assert_eq!(code, Some(1));
    let (check, _, cause) = problem(&report);
    assert_eq!(check, "core");
    assert!(!cause.is_empty());
}

#[test]
fn the_text_report_gives_cause_and_fix_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    let core = format!("udp:127.0.0.1:{}", common::free_port());
    std::fs::write(&path, Sidecar::config("udp:127.0.0.1:9", &core, "")).unwrap();
    let output = Command::new(BINARY)
        .args(["check", "--online", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("trunk test: PROBLEMS"), "{text}");
    assert!(
        text.contains("likely cause:") && text.contains("fix:"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_host_of_a_core_behind_srv_is_asked_and_named() {
    let (sim, core) = simulators(Duration::from_secs(600), Validation::AnyUnexpired).await;
    let closed = common::raw::RawPeer::bind_on("127.0.0.2").await.addr;
    let dns = common::dns::TestDns::start().await;
    dns.set_srv(
        "_sip._udp.core.test",
        &[
            (10, 0, core.port(), "a.core.test"),
            (20, 0, closed.port(), "b.core.test"),
        ],
        60,
    );
    dns.set_addresses("a.core.test", &[core.ip()], 60);
    dns.set_addresses("b.core.test", &[closed.ip()], 60);
    let dir = tempfile::tempdir().unwrap();
    let text = config(&sim, dir.path(), "udp:core.test", |text| {
        format!("{text}\n[dns]\nservers = [\"{}\"]\n", dns.addr())
    });
    let (code, report) = run_check(dir.path(), &text).await;
    // One host answers, the other is closed: a problem, naming the closed one.
    assert_eq!(code, Some(1), "{report:#}");
    let cores: Vec<(bool, String)> = report[0]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|finding| finding["check"] == "core")
        .map(|finding| {
            (
                finding["ok"].as_bool().unwrap(),
                finding["detail"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(cores.len(), 2, "{cores:?}");
    assert!(
        cores[0].0 && cores[0].1.starts_with(&format!("host udp:{core}")),
        "{cores:?}"
    );
    assert!(
        !cores[1].0 && cores[1].1.starts_with(&format!("host udp:{closed}")),
        "{cores:?}"
    );
}
