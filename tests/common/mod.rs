//! Shared helpers for the integration tests: free loopback ports, sipp processes that are
//! stopped by PID when dropped, and an in-process sidecar on port-0 listeners.

#![allow(dead_code)]
// each test binary uses a different subset
// Test support: a failed set-up step should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod dns;
pub mod kamailio;
pub mod raw;
pub mod sim;
pub mod tls;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use byoc_sidecar::config::{Config, Transport};
use byoc_sidecar::proxy::App;
use byoc_sidecar::transport::Side;
use tokio_util::sync::CancellationToken;

pub const LOOPBACK: &str = "127.0.0.1";

/// The sipp binary, or a loud failure: these tests need a real peer.
pub fn sipp_path() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = Path::new(dir).join("sipp");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "sipp is not installed: run scripts/test.sh, which installs the Debian package sip-tester"
    );
}

/// A loopback port free for both UDP and TCP right now.
pub fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind((LOOPBACK, 0)).expect("bind an ephemeral udp port");
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind((LOOPBACK, port)).is_ok() {
            return port;
        }
    }
}

pub fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios")
        .join(name)
}

/// A running sipp, killed on drop.
pub struct Sipp {
    child: tokio::process::Child,
    pub dir: tempfile::TempDir,
    name: String,
}

/// How a sipp run ended.
#[derive(Debug)]
pub struct SippOutcome {
    pub exit_code: Option<i32>,
    pub successful: u64,
    pub failed: u64,
    pub unexpected: u64,
    pub errors: String,
}

impl Sipp {
    /// Starts sipp with `args` in a fresh directory, with statistics in `stats.csv`,
    /// errors traced, no stdin, and a global timeout so it always ends.
    pub fn start(name: &str, args: &[String]) -> Sipp {
        let dir = tempfile::tempdir().expect("temporary directory for sipp");
        let mut command = tokio::process::Command::new(sipp_path());
        command
            .current_dir(dir.path())
            .args(args)
            .args([
                "-nostdin",
                "-trace_err",
                "-trace_stat",
                "-stf",
                "stats.csv",
                "-fd",
                "1",
            ])
            .args(["-timeout", "120s", "-timeout_error"])
            .args([
                "-cp",
                &free_port().to_string(),
                "-mp",
                &free_port().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command.spawn().expect("start sipp");
        Sipp {
            child,
            dir,
            name: name.to_string(),
        }
    }

    /// Waits for sipp to exit (at most `limit`) and reads its statistics.
    pub async fn finish(mut self, limit: Duration) -> SippOutcome {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait for sipp"),
            Err(_) => {
                let _ = self.child.kill().await;
                panic!("{} did not finish within {limit:?}", self.name);
            }
        };
        self.outcome(status.code())
    }

    /// Kills a sipp that runs without a call limit (a UAS for an unknown share of the
    /// calls) and reads the statistics it wrote (once a second: wait that long after the
    /// last call before stopping it).
    pub async fn stop(mut self) -> SippOutcome {
        let _ = self.child.kill().await;
        self.outcome(None)
    }

    /// The statistics sipp wrote last (it writes them once a second).
    pub fn stats(&self) -> HashMap<String, u64> {
        read_stats(&self.dir.path().join("stats.csv"))
    }

    fn outcome(&self, exit_code: Option<i32>) -> SippOutcome {
        let stats = self.stats();
        let errors = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().ends_with("_errors.log"))
            .map(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
            .lines()
            .filter(|line| !line.contains("Failed to delete FD from epoll"))
            .collect::<Vec<_>>()
            .join("\n");
        SippOutcome {
            exit_code,
            successful: stats.get("SuccessfulCall(C)").copied().unwrap_or(0),
            failed: stats.get("FailedCall(C)").copied().unwrap_or(0),
            unexpected: stats
                .get("FailedUnexpectedMessage(C)")
                .copied()
                .unwrap_or(0),
            errors,
        }
    }
}

/// The cumulative counters of the last line of a sipp `-trace_stat` file.
fn read_stats(path: &Path) -> HashMap<String, u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.lines().filter(|line| !line.trim().is_empty());
    let Some(header) = lines.next() else {
        return HashMap::new();
    };
    let Some(last) = lines.next_back() else {
        return HashMap::new();
    };
    header
        .split(';')
        .zip(last.split(';'))
        .filter_map(|(name, value)| Some((name.to_string(), value.trim().parse().ok()?)))
        .collect()
}

/// Asserts a sipp run placed or answered exactly `calls` calls with no failure.
pub fn assert_all_calls_succeeded(outcome: &SippOutcome, calls: u64, who: &str) {
    assert_eq!(
        (
            outcome.exit_code,
            outcome.successful,
            outcome.failed,
            outcome.unexpected
        ),
        (Some(0), calls, 0, 0),
        "{who}: exit code, successful, failed, unexpected; errors:\n{}",
        outcome.errors
    );
}

/// sipp arguments shared by both ends: scenario, local address, call count, transport.
fn sipp_args(scenario_name: &str, port: u16, transport: Transport, calls: u64) -> Vec<String> {
    let mut args = vec![
        "-sf".to_string(),
        scenario(scenario_name).display().to_string(),
        "-i".into(),
        LOOPBACK.into(),
        "-p".into(),
        port.to_string(),
        "-m".into(),
        calls.to_string(),
    ];
    if transport == Transport::Tcp {
        args.extend(["-t".into(), "t1".into()]);
    }
    args
}

/// sipp arguments for a UAS on `port` answering `calls` calls.
pub fn uas_args(scenario_name: &str, port: u16, transport: Transport, calls: u64) -> Vec<String> {
    sipp_args(scenario_name, port, transport, calls)
}

/// sipp arguments for a UAC placing `calls` calls at `rate` per second to `target`,
/// holding each for `hold_ms`.
pub fn uac_args(
    scenario_name: &str,
    target: SocketAddr,
    transport: Transport,
    calls: u64,
    rate: u64,
    hold_ms: u64,
) -> Vec<String> {
    let mut args = sipp_args(scenario_name, free_port(), transport, calls);
    args.extend([
        target.to_string(),
        "-r".into(),
        rate.to_string(),
        "-d".into(),
        hold_ms.to_string(),
    ]);
    args
}

/// A sidecar running in this process, listening on fresh loopback ports (UDP and TCP on
/// both sides), with one trunk.
pub struct Sidecar {
    pub app: App,
    root: CancellationToken,
}

/// One side's table of a test configuration (`name` is `edge` or `core_side`): its
/// listeners; with `open`, loopback may talk to it (otherwise only what the trunks' peers
/// resolve to); with `tls`, the certificate and key of its `tls:` listeners.
pub fn side(name: &str, listen: &[&str], open: bool, tls: Option<(&Path, &Path)>) -> String {
    let listen = listen
        .iter()
        .map(|address| format!("\"{address}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!("\n[{name}]\nlisten = [{listen}]\n");
    if open {
        text.push_str("allow = [\"127.0.0.0/8\"]\n");
    }
    if let Some((certificate, key)) = tls {
        text.push_str(&format!(
            "\n[{name}.tls]\ncertificate_file = \"{}\"\nkey_file = \"{}\"\n",
            certificate.display(),
            key.display()
        ));
    }
    text
}

/// `[sip]` lines for a test in virtual time (`start_paused`): the driver task reads the
/// UDP sockets, so that tokio sees that work and does not move its clock past it (the
/// default reading threads work outside tokio's view).
pub const VIRTUAL_TIME: &str = "udp_threads = 0";

/// `config` for a test in virtual time: [`VIRTUAL_TIME`] added to its `[sip]` table.
pub fn in_virtual_time(config: &str) -> String {
    assert!(
        config.contains("[sip]\n"),
        "a test configuration without [sip]"
    );
    config.replacen("[sip]\n", &format!("[sip]\n{VIRTUAL_TIME}\n"), 1)
}

impl Sidecar {
    pub async fn start(edge: &str, core: &str, extra_sip: &str) -> Sidecar {
        Self::start_with(&Self::config(edge, core, extra_sip)).await
    }

    /// The test configuration: port-0 listeners, loopback allowed, one trunk.
    pub fn config(edge: &str, core: &str, extra_sip: &str) -> String {
        let listen = ["udp:127.0.0.1:0", "tcp:127.0.0.1:0"];
        format!(
            r#"{}{}
[sip]
{extra_sip}

[[trunk]]
name = "test"
edge = "{edge}"
core = "{core}"
"#,
            side("edge", &listen, true, None),
            side("core_side", &listen, true, None),
        )
    }

    pub async fn start_with(text: &str) -> Sidecar {
        let settings = Config::from_toml(text, "test")
            .unwrap()
            .validate()
            .unwrap_or_else(|problems| panic!("test config invalid: {problems:?}"));
        let root = CancellationToken::new();
        let app = App::start(settings, &root).await.expect("start sidecar");
        Sidecar { app, root }
    }

    /// Starts from `text` and waits until the trunk `test` holds its first credential.
    pub async fn start_ready(text: &str) -> Sidecar {
        let sidecar = Self::start_with(text).await;
        let manager = sidecar.app.credentials.get("test").unwrap().clone();
        let mut attempts = manager.attempts();
        let ready = attempts.wait_for(|_| manager.current().is_some());
        tokio::time::timeout(Duration::from_secs(5), ready)
            .await
            .expect("the first credential within 5 s")
            .unwrap();
        sidecar
    }

    /// A `digest` trunk toward `core` as user `alice` with a static password written to
    /// `dir`; `trunk_extra` adds lines to the trunk table.
    pub fn digest_config(
        core: SocketAddr,
        dir: &Path,
        password: &str,
        trunk_extra: &str,
    ) -> String {
        let password_path = dir.join("password");
        std::fs::write(&password_path, password).unwrap();
        format!(
            "{}auth = \"digest\"\n{trunk_extra}\n[trunk.credentials]\nkind = \"static\"\nusername = \"alice\"\npassword_file = \"{}\"\n",
            Self::config("udp:127.0.0.1:9", &format!("udp:{core}"), ""),
            password_path.display()
        )
    }

    pub fn addr(&self, side: Side, transport: Transport) -> SocketAddr {
        self.app.listener(side, transport).expect("listener")
    }

    pub async fn stop(self) {
        assert!(
            self.app.shutdown(Duration::from_secs(5)).await,
            "sidecar tasks did not stop in time"
        );
        drop(self.root);
    }
}

/// One HTTP/1.1 request to the admin listener: the status code and the body.
pub async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text))
        .await
        .expect("an answer in time")
        .unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}
