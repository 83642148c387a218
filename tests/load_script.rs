//! A short run of `scripts/load.sh` (the load script the README documents): sipp ->
//! sidecar -> `byoc-sidecar sim core` relaying to sipp, tokens rotating, under each
//! validation mode; every call must complete and the summary line must be printed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn load(validation: &str) {
    let output = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/load.sh"))
        .args([
            "--rate",
            "40",
            "--seconds",
            "8",
            "--ttl",
            "4s",
            "--hold-ms",
            "500",
        ])
        .args(["--validation", validation])
        .env("BYOC_BINARY", env!("CARGO_BIN_EXE_byoc-sidecar"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "load.sh {validation}: stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let line = stdout
        .lines()
        .find(|line| line.starts_with("load: "))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}"));
    for field in [
        "calls=320",
        "completed=320",
        "failed=0",
        "tokens=",
        "p99_setup=",
        "peak_rss=",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    println!("{line}");
}

#[test]
fn load_script_completes_every_call_under_each_validation_mode() {
    load("revoke-on-reissue");
    load("any-unexpired");
    load("propagation-lag=500ms");
}
