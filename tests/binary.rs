//! The `byoc-sidecar` binary as an operator runs it: `check` exit codes and messages,
//! and `run` stopping cleanly on SIGTERM and SIGINT.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BINARY: &str = env!("CARGO_BIN_EXE_byoc-sidecar");

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `byoc-sidecar run --config CONFIG` at info level, its log on a pipe.
fn spawn_run(config: &std::path::Path) -> std::process::Child {
    Command::new(BINARY)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn loopback_config() -> String {
    common::Sidecar::config("udp:127.0.0.1:9", "udp:127.0.0.1:9", "")
}

#[test]
fn check_exits_0_on_the_example_and_64_listing_every_problem() {
    let example = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sidecar.toml"))
        .output()
        .unwrap();
    assert_eq!(
        example.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&example.stderr)
    );
    assert!(String::from_utf8_lossy(&example.stdout).contains("valid"));

    let dir = tempfile::tempdir().unwrap();
    let broken = loopback_config()
        .replace("[sip]\n", "[sip]\nt1 = \"soon\"\nmax_message_size = 1\n")
        .replace("core = \"udp:127.0.0.1:9\"", "core = \"sctp:127.0.0.1:9\"");
    let output = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(write_config(&dir, &broken))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in ["sip.t1", "sip.max_message_size", "trunk \"test\".core"] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
    assert!(stderr.contains("3 problem(s)"), "{stderr}");

    let syntax = Command::new(BINARY)
        .args(["check", "--config"])
        .arg(write_config(&dir, "[edge\n"))
        .output()
        .unwrap();
    assert_eq!(syntax.status.code(), Some(64));
    let missing = Command::new(BINARY)
        .args(["check", "--config", "/nonexistent/sidecar.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/sidecar.toml"));
}

/// Starts `run`, waits for "proxy started", sends `signal`, and expects exit code 0.
fn stops_cleanly_on(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &loopback_config());
    let mut child = spawn_run(&config);
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|line| line.contains("proxy started"));
    assert!(started, "the proxy never said it started");
    let status = Command::new("kill")
        .args(["-s", signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    // Up to 10 s in 20 ms steps (a bound on the test, not a timing assertion).
    let mut exit = None;
    for _ in 0..500 {
        exit = child.try_wait().unwrap();
        if exit.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let exit = exit.unwrap_or_else(|| panic!("still running 10 s after {signal}"));
    assert_eq!(
        exit.code(),
        Some(0),
        "exit after {signal}; log:\n{}",
        rest.join("\n")
    );
    assert!(
        rest.iter().any(|line| line.contains("shutting down")),
        "{rest:?}"
    );
    assert!(
        !rest
            .iter()
            .any(|line| line.contains("still running at the shutdown deadline")),
        "{rest:?}"
    );
}

#[test]
fn run_stops_cleanly_on_sigterm() {
    stops_cleanly_on("TERM");
}

#[test]
fn run_stops_cleanly_on_sigint() {
    stops_cleanly_on("INT");
}

/// `demo` as an operator runs it (shortened): the whole story on loopback, exit 0, a
/// table with every call completed and the revoked tokens' 403s absorbed.
#[test]
fn demo_completes_every_call_while_tokens_are_revoked() {
    let output = Command::new(BINARY)
        .args(["demo", "--seconds", "6", "--rate", "20"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let row = |name: &str| -> u64 {
        stdout
            .lines()
            .find(|line| line.trim_start().starts_with(name))
            .and_then(|line| line.split_whitespace().last())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name} row in:\n{stdout}"))
    };
    assert_eq!(row("calls placed"), 120);
    assert_eq!(row("calls completed"), 120);
    assert_eq!(row("calls failed"), 0);
    assert!(row("403s absorbed") > 0, "{stdout}");
    assert!(row("tokens issued") >= 3, "{stdout}");
    assert!(stdout.contains("result: PASS"), "{stdout}");
    assert!(
        stderr.contains("calls placed"),
        "live progress goes to stderr"
    );
    // Captured output is not a terminal: plain lines, no carriage returns.
    assert!(!stderr.contains('\r'), "{stderr:?}");
    assert!(
        stderr
            .lines()
            .any(|line| line.starts_with("[") && line.contains("calls placed")),
        "{stderr}"
    );
}

/// The deployment examples (`deploy/sidecar.toml`, the ConfigMap in
/// `deploy/kubernetes.yaml`) pass `check`, with their secret directory pointed at a
/// temporary one holding the client secret.
#[test]
fn the_deployment_examples_pass_check() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("org-a-client-secret"), "example-secret").unwrap();
    let secrets = dir.path().display().to_string();
    let root = env!("CARGO_MANIFEST_DIR");
    let container = std::fs::read_to_string(format!("{root}/deploy/sidecar.toml")).unwrap();
    let manifest = std::fs::read_to_string(format!("{root}/deploy/kubernetes.yaml")).unwrap();
    // The ConfigMap's sidecar.toml: the block under `sidecar.toml: |`, four spaces in.
    let block = manifest
        .split_once("sidecar.toml: |\n")
        .unwrap()
        .1
        .split("\n---")
        .next()
        .unwrap();
    let pod = block
        .lines()
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n");
    for (name, text) in [
        ("deploy/sidecar.toml", container),
        ("kubernetes ConfigMap", pod),
    ] {
        let path = write_config(&dir, &text.replace("/run/secrets/byoc", &secrets));
        let output = Command::new(BINARY)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{name}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// SIGHUP (issue 13, item 2): a client secret rotated in its file is taken by the next
/// token request (the trunk becomes ready), and a broken configuration is refused with
/// an error while the running one keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_takes_a_rotated_secret_and_refuses_a_broken_configuration() {
    use byoc_sidecar::sim::idp::TokenKind;
    use std::sync::{Arc, Mutex};
    let sim = common::sim::SimIdp::start(
        "edge-h",
        "rotated-secret",
        "org-h",
        Duration::from_secs(600),
        TokenKind::Opaque,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "old-secret").unwrap();
    let admin = format!("127.0.0.1:{}", common::free_port());
    let text = format!(
        "{}auth = \"bearer\"\n\n[trunk.credentials]\nkind = \"oauth2\"\ntoken_url = \"{}\"\n\
         client_id = \"edge-h\"\nclient_secret_file = \"{}\"\norganization = \"org-h\"\n\
         slow_retry = \"1s\"\n\n[admin]\nlisten = \"{admin}\"\n",
        loopback_config(),
        sim.idp.url(),
        secret.display()
    );
    let config = write_config(&dir, &text);
    let mut child = spawn_run(&config);
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let (log, stderr) = (log.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        })
    };
    let logged = |needle: &'static str| {
        let log = log.clone();
        async move {
            for _ in 0..250 {
                if log.lock().unwrap().iter().any(|line| line.contains(needle)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            panic!("never logged {needle:?}: {:#?}", log.lock().unwrap());
        }
    };
    let admin: std::net::SocketAddr = admin.parse().unwrap();
    let ready = |expected: u16| async move {
        for _ in 0..100 {
            if common::admin_request(admin, "GET", "/readyz").await.0 == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("/readyz never answered {expected}");
    };
    let signal = |name: &str| {
        let status = Command::new("kill")
            .args(["-s", name, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    logged("proxy started").await;
    logged("credential request rejected").await; // the old secret: invalid_client
    ready(503).await;

    std::fs::write(&secret, "rotated-secret").unwrap();
    signal("HUP");
    logged("SIGHUP: configuration re-read").await;
    ready(200).await;

    std::fs::write(&config, "this is [not a configuration").unwrap();
    signal("HUP");
    logged("SIGHUP: the configuration is refused").await;
    assert_eq!(common::admin_request(admin, "GET", "/healthz").await.0, 200);
    ready(200).await;

    signal("TERM");
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert_eq!(status.code(), Some(0), "{:#?}", log.lock().unwrap());
    let text = log.lock().unwrap().join("\n");
    assert!(!text.contains("rotated-secret") && !text.contains("old-secret"));
    sim.cancel.cancel();
}
