//! The `byoc-sidecar` command: `run` the proxy, `check` a configuration.
//!
//! Exit codes: 0 success, 64 invalid configuration or usage, 1 any other failure.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use byoc_sidecar::config::{Config, ConfigError, LogConfig};
use byoc_sidecar::proxy::App;

/// Exit code for a configuration that does not validate (EX_USAGE of sysexits.h).
const EXIT_BAD_CONFIG: u8 = 64;
/// How long shutdown waits for tasks to finish.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "byoc-sidecar",
    version,
    about = "SIP proxy beside a telephony Edge that owns the trunk's credentials"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGINT or SIGTERM.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and list every problem in it.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(settings) => {
            println!(
                "{}: valid ({} trunk{}: {})",
                path.display(),
                settings.trunks.len(),
                if settings.trunks.len() == 1 { "" } else { "s" },
                settings
                    .trunks
                    .iter()
                    .map(|trunk| trunk.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(error) => config_failure(&error),
    }
}

fn config_failure(error: &ConfigError) -> ExitCode {
    eprintln!("{error}");
    match error {
        ConfigError::Read { .. } => ExitCode::FAILURE,
        ConfigError::Syntax { .. } | ConfigError::Invalid { .. } => ExitCode::from(EXIT_BAD_CONFIG),
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let settings = match Config::load(path) {
        Ok(settings) => settings,
        Err(error) => return config_failure(&error),
    };
    init_logging(&settings.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "byoc-sidecar failed");
            eprintln!("byoc-sidecar: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: byoc_sidecar::config::Settings) -> anyhow::Result<()> {
    let root = CancellationToken::new();
    let app = App::start(settings, &root)
        .await
        .context("starting the proxy")?;
    wait_for_signal().await?;
    tracing::info!("shutting down");
    if !app.shutdown(SHUTDOWN_DEADLINE).await {
        tracing::warn!(deadline = ?SHUTDOWN_DEADLINE, "some tasks were still running at the shutdown deadline");
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT"),
        _ = terminate.recv() => Ok(()),
    }
}

fn init_logging(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
