//! `byoc-sidecar demo`: the whole story on loopback, with no configuration and no
//! external program. A simulated token endpoint issues short-lived tokens; a simulated
//! core accepts only the newest one (revoke on reissue: the moment a token is reissued,
//! every older one gets 403) and registers the trunk; a sidecar holds the trunk's
//! credentials and registration; a simulated Edge places calls through it. The token
//! rotates twice over: the sidecar renews its own before expiry, and another instance of
//! the same OAuth client takes a token every `rival_interval`, revoking the sidecar's
//! without warning, which is what drops calls in the field. The sidecar absorbs each 403,
//! fetches a newer token and re-sends. The demo prints live progress, then a table, and
//! succeeds only when no call failed.

use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Transport};
use crate::proxy::App;
use crate::sim::core::SimCore;
use crate::sim::edge::{place_calls, EdgeSettings, EdgeStats};
use crate::sim::idp::{Idp, IdpSettings, SimClient, TokenKind, Validation};
use crate::transport::Side;

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoSettings {
    /// How long calls are placed.
    pub duration: Duration,
    /// Calls per second.
    pub rate: u64,
    /// How long each call lasts once answered.
    pub hold: Duration,
    /// Lifetime of each token (the sidecar renews at 50–60 % of it).
    pub token_lifetime: Duration,
    /// How often another instance of the same client takes a token (revoking ours).
    pub rival_interval: Duration,
}

impl Default for DemoSettings {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(20),
            rate: 20,
            hold: Duration::from_secs(1),
            token_lifetime: Duration::from_secs(4),
            rival_interval: Duration::from_millis(2500),
        }
    }
}

/// The outcome, as the table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoReport {
    pub placed: u64,
    pub completed: u64,
    pub failed: u64,
    pub failures: Vec<u16>,
    pub tokens_issued: u64,
    pub absorbed_403: u64,
    pub resends: u64,
    pub registers: u64,
    pub setup_p50: Option<Duration>,
    pub setup_p99: Option<Duration>,
}

impl DemoReport {
    pub fn passed(&self) -> bool {
        self.failed == 0 && self.placed > 0 && self.completed == self.placed
    }

    /// The table printed at the end.
    pub fn table(&self) -> String {
        let time = |value: Option<Duration>| {
            value.map_or("-".to_string(), |value| {
                format!("{:.1} ms", value.as_secs_f64() * 1000.0)
            })
        };
        let mut text = String::new();
        let mut row = |name: &str, value: String| {
            text.push_str(&format!("  {name:<24}{value:>12}\n"));
        };
        row("calls placed", self.placed.to_string());
        row("calls completed", self.completed.to_string());
        row("calls failed", self.failed.to_string());
        row("tokens issued", self.tokens_issued.to_string());
        row("403s absorbed", self.absorbed_403.to_string());
        row("re-sends", self.resends.to_string());
        row(
            "re-registrations",
            self.registers.saturating_sub(1).to_string(),
        );
        row("call setup p50", time(self.setup_p50));
        row("call setup p99", time(self.setup_p99));
        if !self.failures.is_empty() {
            let mut codes = self.failures.clone();
            codes.sort_unstable();
            codes.dedup();
            let codes: Vec<String> = codes
                .iter()
                .map(|code| match code {
                    0 => "no answer".to_string(),
                    code => code.to_string(),
                })
                .collect();
            text.push_str(&format!(
                "  failed calls ended with: {}\n",
                codes.join(", ")
            ));
        }
        text
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the simulated {what}: {reason}")]
    Simulator { what: &'static str, reason: String },
    #[error("cannot write the demo's client secret file: {0}")]
    SecretFile(std::io::Error),
    #[error("the demo configuration is invalid: {0}")]
    Config(String),
    #[error("cannot start the sidecar: {0}")]
    Start(String),
    #[error("the simulated Edge failed: {0}")]
    Edge(std::io::Error),
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// One terminal line rewritten in place twice a second.
    Live,
    /// A plain line every 5 s, for a file or a pipe.
    Lines,
}

/// Runs the demo; progress goes to `progress`, shown as `style` says.
pub async fn run(
    settings: &DemoSettings,
    mut progress: impl std::io::Write,
    style: Progress,
) -> Result<DemoReport, DemoError> {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let client = SimClient {
        id: "demo-edge".into(),
        secret: format!("demo-secret-{:016x}", rand::random::<u64>()),
        organization: "demo-org".into(),
    };
    let idp = Idp::start(
        IdpSettings::new(
            vec![client.clone()],
            settings.token_lifetime,
            TokenKind::Jwt,
        ),
        "127.0.0.1:0".parse().map_err(|_| DemoError::Simulator {
            what: "token endpoint",
            reason: "bad address".into(),
        })?,
        cancel.clone(),
        &tracker,
    )
    .await
    .map_err(|error| DemoError::Simulator {
        what: "token endpoint",
        reason: error.to_string(),
    })?;
    let core = SimCore::start(
        idp.clone(),
        Validation::RevokeOnReissue,
        "127.0.0.1:0".parse().map_err(|_| DemoError::Simulator {
            what: "core",
            reason: "bad address".into(),
        })?,
        cancel.clone(),
        &tracker,
    )
    .await
    .map_err(|error| DemoError::Simulator {
        what: "core",
        reason: error.to_string(),
    })?;
    // Secrets come from files only; this one lives as long as the demo.
    let secret = SecretFile::write(&client.secret).map_err(DemoError::SecretFile)?;
    let text = format!(
        r#"
[edge]
listen = ["udp:127.0.0.1:0"]
allow = ["127.0.0.0/8"]

[core_side]
listen = ["udp:127.0.0.1:0"]
allow = ["127.0.0.0/8"]

[[trunk]]
name = "demo-org"
edge = "udp:127.0.0.1:9"
core = "udp:{core}"
auth = "bearer"

[trunk.credentials]
kind = "oauth2"
token_url = "{token_url}"
client_id = "{client_id}"
client_secret_file = "{secret}"
organization = "{organization}"
force_refresh_interval = "1s"
refresh_buffer = "1s"

[trunk.registration]
aor = "sip:demo-org@sim-core.test"
expires = "60s"
"#,
        core = core.addr,
        token_url = idp.url(),
        client_id = client.id,
        secret = secret.path.display(),
        organization = client.organization,
    );
    let sidecar_settings = Config::from_toml(&text, "demo")
        .map_err(|error| DemoError::Config(error.to_string()))?
        .validate()
        .map_err(|problems| DemoError::Config(format!("{problems:?}")))?;
    let app = App::start(sidecar_settings, &cancel)
        .await
        .map_err(|error| DemoError::Start(error.to_string()))?;
    let proxy = app
        .listener(Side::Edge, Transport::Udp)
        .ok_or_else(|| DemoError::Start("no edge listener".into()))?;
    // Calls start once the trunk is registered (the first token fetched and used).
    if let Some(status) = app.registrations.get("demo-org") {
        let mut status = status.clone();
        let registered =
            status.wait_for(|status| status.state == crate::registration::State::Registered);
        let _ = tokio::time::timeout(Duration::from_secs(5), registered).await;
    }
    let calls = settings.rate * settings.duration.as_secs().max(1);
    let edge_stats = Arc::new(EdgeStats::default());
    let edge = tokio::spawn(place_calls(
        EdgeSettings {
            proxy,
            calls,
            rate: settings.rate,
            hold: settings.hold,
            answer_limit: Duration::from_secs(10),
        },
        edge_stats.clone(),
        cancel.clone(),
    ));
    // The other instance of the client: every token it takes revokes the sidecar's.
    let rival = {
        let idp = idp.clone();
        let client_id = client.id.clone();
        let interval = settings.rival_interval;
        tokio::spawn(async move {
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            loop {
                ticks.tick().await;
                let _ = idp.issue_for(&client_id);
            }
        })
    };
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut ticks = 0u64;
    tokio::pin!(edge);
    let edge_result = loop {
        tokio::select! {
            result = &mut edge => break result,
            _ = ticker.tick() => {
                ticks += 1;
                if style == Progress::Lines && ticks % 10 != 1 {
                    continue;
                }
                let stats = app.stats.snapshot();
                let (start, end) = match style {
                    Progress::Live => ("\r", ""),
                    Progress::Lines => ("", "\n"),
                };
                let _ = write!(
                    progress,
                    "{start}[{:>4.1} s] calls placed {:>5}  completed {:>5}  failed {:>3}  tokens {:>3}  403s absorbed {:>3}{end}",
                    started.elapsed().as_secs_f64(),
                    edge_stats.placed.load(Ordering::Relaxed),
                    edge_stats.completed.load(Ordering::Relaxed),
                    edge_stats.failed.load(Ordering::Relaxed),
                    idp.tokens_issued(),
                    stats.rejections_absorbed,
                );
                let _ = progress.flush();
            }
        }
    };
    rival.abort();
    if style == Progress::Live {
        let _ = writeln!(progress);
    }
    let stats = app.stats.snapshot();
    let report = DemoReport {
        placed: edge_stats.placed.load(Ordering::Relaxed),
        completed: edge_stats.completed.load(Ordering::Relaxed),
        failed: edge_stats.failed.load(Ordering::Relaxed),
        failures: edge_stats.failures(),
        tokens_issued: idp.tokens_issued(),
        absorbed_403: stats.rejections_absorbed,
        resends: stats.resends,
        registers: stats.registers_sent,
        setup_p50: edge_stats.setup_quantile(0.5),
        setup_p99: edge_stats.setup_quantile(0.99),
    };
    app.shutdown(Duration::from_secs(5)).await;
    cancel.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    match edge_result {
        Ok(Ok(())) => Ok(report),
        Ok(Err(error)) => Err(DemoError::Edge(error)),
        Err(join) => Err(DemoError::Edge(std::io::Error::other(join.to_string()))),
    }
}

/// A file holding the demo client's secret, readable by the owner only, removed on drop.
struct SecretFile {
    path: std::path::PathBuf,
}

impl SecretFile {
    fn write(secret: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = std::env::temp_dir().join(format!(
            "byoc-sidecar-demo-{}-{:08x}.secret",
            std::process::id(),
            rand::random::<u32>()
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(secret.as_bytes())?;
        Ok(Self { path })
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(failed: u64) -> DemoReport {
        DemoReport {
            placed: 10,
            completed: 10 - failed,
            failed,
            failures: if failed > 0 {
                vec![0, 403, 0]
            } else {
                Vec::new()
            },
            tokens_issued: 4,
            absorbed_403: 2,
            resends: 2,
            registers: 3,
            setup_p50: Some(Duration::from_micros(500)),
            setup_p99: None,
        }
    }

    #[test]
    fn the_table_names_every_figure_and_the_failures() {
        let passed = report(0);
        assert!(passed.passed());
        let table = passed.table();
        for row in [
            "calls placed",
            "calls completed",
            "calls failed",
            "tokens issued",
            "403s absorbed",
            "re-sends",
            "re-registrations",
            "call setup p50",
            "call setup p99",
        ] {
            assert!(table.contains(row), "{row} missing:\n{table}");
        }
        assert!(table.contains("0.5 ms"));
        assert!(!table.contains("failed calls ended with"));
        let failed = report(2);
        assert!(!failed.passed());
        assert!(failed
            .table()
            .contains("failed calls ended with: no answer, 403"));
    }
}
