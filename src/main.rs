//! The `byoc-sidecar` command: `run` the proxy, `check` a configuration, `demo` the
//! whole story on loopback, `sim` the simulators, `replay` a capture.
//!
//! Exit codes: 0 success, 64 invalid configuration or usage, 65 an unusable capture,
//! 70 an internal error (a panic in any task ends the process), 1 any other failure
//! (for `replay`: a dialogue diverged or timed out).

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
/// Exit code for a capture that cannot be read or holds no dialogue (EX_DATAERR).
const EXIT_BAD_CAPTURE: u8 = 65;
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
    /// Validate a configuration file and list every problem in it; with --online also
    /// diagnose each trunk's token endpoint, token and core.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Request a token per trunk and send its core an OPTIONS with it, and say in plain
        /// words what is wrong and how to fix it. Exit 0 only when every trunk is healthy.
        #[arg(long)]
        online: bool,
        /// With --online: the report as JSON.
        #[arg(long, requires = "online")]
        json: bool,
    },
    /// The simulators as standalone processes, until SIGINT or SIGTERM.
    Sim {
        #[command(subcommand)]
        simulator: Box<Simulator>,
    },
    /// Replay the SIP dialogues of a pcap/pcapng capture against a target (the Edge side,
    /// and with --core the core side too) and compare the live ladders with the capture.
    /// Exits 0 when every dialogue matched, 1 when one diverged or timed out.
    Replay(Box<ReplayArgs>),
    /// The whole story on loopback, no configuration: simulated token endpoint and
    /// core, a sidecar with a registered trunk, and a simulated Edge placing calls while
    /// the token rotates. Exits 0 only when no call failed.
    Demo {
        /// How long calls are placed, in seconds.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
        seconds: u64,
        /// Calls per second.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=2000))]
        rate: u64,
    },
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The capture: pcap or pcapng.
    capture: PathBuf,
    /// Where the Edge side is played to: IP:PORT of a sidecar's Edge side or any SIP
    /// server.
    #[arg(long, required_unless_present = "list")]
    to: Option<std::net::SocketAddr>,
    /// Only list the dialogues the capture holds (and what the reader skipped).
    #[arg(long)]
    list: bool,
    /// Also play the core side from the capture, listening on IP:PORT (UDP and TCP).
    #[arg(long, value_parser = parse_specific_address)]
    core: Option<std::net::SocketAddr>,
    /// udp or tcp for every dialogue (default: as captured).
    #[arg(long, value_parser = parse_transport)]
    transport: Option<byoc_sidecar::config::Transport>,
    /// Play N times faster than captured (0.5 = slower).
    #[arg(long, default_value_t = 1.0, value_parser = parse_speed)]
    speed: f64,
    /// No pause between messages longer than this (after --speed); at most 1h.
    #[arg(long, default_value = "5s", value_parser = parse_wait)]
    max_gap: Duration,
    /// How long a message of the other side is waited for; at most 1h.
    #[arg(long, default_value = "32s", value_parser = parse_wait)]
    timeout: Duration,
    /// Our address in Via and Contact (default: the one that routes to --to).
    #[arg(long, value_parser = parse_specific_ip)]
    local: Option<std::net::IpAddr>,
    /// Only this Call-ID (repeatable).
    #[arg(long = "call-id")]
    call_ids: Vec<String>,
    /// Only messages at least this far into the capture (e.g. 90s).
    #[arg(long, value_parser = byoc_sidecar::config::parse_duration)]
    from: Option<Duration>,
    /// Only messages less than this far into the capture.
    #[arg(long, value_parser = byoc_sidecar::config::parse_duration)]
    until: Option<Duration>,
    /// Only packets to or from this port (repeatable).
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// The report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_transport(text: &str) -> Result<byoc_sidecar::config::Transport, String> {
    match text {
        "udp" => Ok(byoc_sidecar::config::Transport::Udp),
        "tcp" => Ok(byoc_sidecar::config::Transport::Tcp),
        other => Err(format!("{other:?} is not udp or tcp")),
    }
}

fn parse_speed(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(speed) if (0.001..=1e6).contains(&speed) => Ok(speed),
        _ => Err(format!("{text:?} is not a speed from 0.001 to 1000000")),
    }
}

fn parse_wait(text: &str) -> Result<Duration, String> {
    let wait = byoc_sidecar::config::parse_duration(text)?;
    if wait > Duration::from_secs(3600) {
        return Err(format!("{text:?} is longer than 1h"));
    }
    Ok(wait)
}

fn parse_specific_ip(text: &str) -> Result<std::net::IpAddr, String> {
    let ip: std::net::IpAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address"))?;
    if ip.is_unspecified() {
        return Err(format!(
            "{text} is not a specific address: it goes into Via and Contact"
        ));
    }
    Ok(ip)
}

fn parse_specific_address(text: &str) -> Result<std::net::SocketAddr, String> {
    let address: std::net::SocketAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not IP:PORT"))?;
    parse_specific_ip(&address.ip().to_string())?;
    Ok(address)
}

#[derive(clap::Args)]
struct IdpArgs {
    /// Where the token endpoint listens (HTTP).
    #[arg(long, default_value = "127.0.0.1:8080")]
    idp_listen: std::net::SocketAddr,
    /// Token lifetime.
    #[arg(long, default_value = "10s", value_parser = byoc_sidecar::config::parse_duration)]
    ttl: Duration,
    /// `jwt` or `opaque`.
    #[arg(long, default_value = "jwt", value_parser = byoc_sidecar::sim::serve::parse_kind)]
    kind: byoc_sidecar::sim::idp::TokenKind,
    /// The client the endpoint knows: id:secret:organization.
    #[arg(long, default_value = "edge-a:sim-secret:org-a", value_parser = byoc_sidecar::sim::serve::parse_client)]
    client: byoc_sidecar::sim::idp::SimClient,
    /// Another instance of the client takes a token this often (e.g. 2s).
    #[arg(long, value_parser = byoc_sidecar::config::parse_duration)]
    reissue_every: Option<Duration>,
    /// Every token issued so far is revoked this often (a signing-key rotation, e.g. 4s).
    #[arg(long, value_parser = byoc_sidecar::config::parse_duration)]
    revoke_every: Option<Duration>,
    /// A fault for the next token request after every --idp-fault-every: status=503,
    /// status=429,retry-after=2, delay=3s, empty, garbage or drop.
    #[arg(long, value_parser = byoc_sidecar::sim::serve::parse_fault, requires = "idp_fault_every")]
    idp_fault: Option<byoc_sidecar::sim::idp::Fault>,
    #[arg(long, value_parser = byoc_sidecar::config::parse_duration, requires = "idp_fault")]
    idp_fault_every: Option<Duration>,
}

#[derive(Subcommand)]
enum Simulator {
    /// An OAuth2 client-credentials token endpoint.
    Idp {
        #[command(flatten)]
        idp: IdpArgs,
    },
    /// A SIP core on UDP that demands Bearer tokens from its own token endpoint (401
    /// without one, 403 for one it does not accept) and answers calls or relays them.
    Core {
        /// Where the core listens (UDP).
        #[arg(long, default_value = "127.0.0.1:5090")]
        listen: std::net::SocketAddr,
        /// revoke-on-reissue, any-unexpired, reject-all or propagation-lag=<duration>.
        #[arg(long, default_value = "revoke-on-reissue", value_parser = byoc_sidecar::sim::serve::parse_validation)]
        validation: byoc_sidecar::sim::idp::Validation,
        /// Relay accepted calls to this address (a sipp UAS) instead of answering them.
        #[arg(long)]
        far_end: Option<std::net::SocketAddr>,
        #[command(flatten)]
        idp: IdpArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    byoc_sidecar::fatal::exit_on_panic();
    match cli.command {
        Command::Check {
            config,
            online,
            json,
        } => {
            if online {
                check_online(&config, json)
            } else {
                check(&config)
            }
        }
        Command::Run { config } => run(&config),
        Command::Demo { seconds, rate } => demo(seconds, rate),
        Command::Sim { simulator } => sim(*simulator),
        Command::Replay(args) => replay(&args),
    }
}

fn sim(simulator: Simulator) -> ExitCode {
    init_logging(&LogConfig {
        format: "text".into(),
        level: "warn".into(),
    });
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        use byoc_sidecar::sim::serve::{start_core, start_idp, IdpOptions};
        let mut signals = Signals::install()?;
        let cancel = CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let options = |args: &IdpArgs| IdpOptions {
            listen: args.idp_listen,
            ttl: args.ttl,
            kind: args.kind,
            client: args.client.clone(),
            reissue_every: args.reissue_every,
            revoke_every: args.revoke_every,
            fault: args.idp_fault.clone().zip(args.idp_fault_every),
        };
        match &simulator {
            Simulator::Idp { idp } => {
                start_idp(&options(idp), &cancel, &tracker)
                    .await
                    .context("starting the token endpoint")?;
            }
            Simulator::Core {
                listen,
                validation,
                far_end,
                idp,
            } => {
                let (issuer, core) = start_core(&options(idp), *listen, *validation, *far_end, &cancel, &tracker)
                    .await
                    .context("starting the core")?;
                signals.wait().await;
                let stats = &core.stats;
                use std::sync::atomic::Ordering::Relaxed;
                println!(
                    "sim core: {} tokens issued, {} requests, {} accepted, {} 401, {} 403, {} out of order",
                    issuer.tokens_issued(),
                    stats.requests.load(Relaxed),
                    stats.accepted.load(Relaxed),
                    stats.challenged_401.load(Relaxed),
                    stats.rejected_403.load(Relaxed),
                    stats.out_of_order_500.load(Relaxed),
                );
                cancel.cancel();
                return Ok(());
            }
        }
        signals.wait().await;
        cancel.cancel();
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("byoc-sidecar sim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo(seconds: u64, rate: u64) -> ExitCode {
    // Only warnings and errors of the sidecar itself; the demo prints its own story.
    init_logging(&LogConfig {
        format: "text".into(),
        level: "warn".into(),
    });
    let settings = byoc_sidecar::demo::DemoSettings {
        duration: Duration::from_secs(seconds),
        rate,
        ..Default::default()
    };
    println!(
        "byoc-sidecar demo: a simulated Edge places {rate} calls/s for {seconds} s through the \
         sidecar to a simulated core that accepts only the newest token. The sidecar renews \
         its token every ~{:.0} s, and another instance of the same OAuth client takes one \
         every {:.1} s, revoking the sidecar's without warning.",
        settings.token_lifetime.as_secs_f64() * 0.55,
        settings.rival_interval.as_secs_f64()
    );
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    // A terminal gets one line rewritten in place; a file or a pipe plain lines.
    let style = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        byoc_sidecar::demo::Progress::Live
    } else {
        byoc_sidecar::demo::Progress::Lines
    };
    match runtime.block_on(byoc_sidecar::demo::run(&settings, std::io::stderr(), style)) {
        Ok(report) => {
            print!("{}", report.table());
            if report.passed() {
                println!("result: PASS, no call failed");
                ExitCode::SUCCESS
            } else {
                println!("result: FAIL, {} call(s) failed", report.failed);
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("byoc-sidecar demo: {error}");
            ExitCode::FAILURE
        }
    }
}

fn replay(args: &ReplayArgs) -> ExitCode {
    use byoc_sidecar::replay::{self, report, ReplayError};
    init_logging(&LogConfig {
        format: "text".into(),
        level: "warn".into(),
    });
    let filter = replay::Filter {
        call_ids: args.call_ids.clone(),
        from: args.from,
        until: args.until,
        ports: args.ports.clone(),
    };
    let bad_capture = |error: &dyn std::fmt::Display| {
        eprintln!("byoc-sidecar replay: {}: {error}", args.capture.display());
        ExitCode::from(EXIT_BAD_CAPTURE)
    };
    let (Some(target), false) = (args.to, args.list) else {
        return match replay::read(&args.capture, &filter) {
            Ok(extraction) => {
                let listing = report::Listing::new(&extraction, &filter);
                if args.json {
                    println!("{}", listing.to_json());
                } else {
                    print!("{}", listing.to_text());
                }
                ExitCode::SUCCESS
            }
            Err(error) => bad_capture(&error),
        };
    };
    let options = replay::ReplayOptions {
        capture: args.capture.clone(),
        target,
        transport: args.transport,
        local_ip: args.local,
        core: args.core,
        pacing: replay::player::Pacing {
            speed: args.speed,
            max_gap: args.max_gap,
            timeout: args.timeout,
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
        },
        filter,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let outcome = runtime.block_on(async {
        let cancel = CancellationToken::new();
        let mut signals = Signals::install()?;
        let stop = cancel.clone();
        tokio::spawn(async move {
            signals.wait().await;
            stop.cancel();
        });
        anyhow::Ok(replay::replay(&options, &cancel).await)
    });
    match outcome {
        Ok(Ok(report)) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            if report.all_matched() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(Err(error @ (ReplayError::Capture(_) | ReplayError::NoDialogues { .. }))) => {
            bad_capture(&error)
        }
        Ok(Err(error)) => {
            eprintln!("byoc-sidecar replay: {error}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("byoc-sidecar replay: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(settings) => {
            let tls = byoc_sidecar::transport::tls::problems(&settings);
            if !tls.is_empty() {
                eprintln!("{}: {} problem(s):", path.display(), tls.len());
                for problem in tls {
                    eprintln!("  - {problem}");
                }
                return ExitCode::from(64);
            }
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

/// `check --online`: exit 0 when every trunk is healthy, 1 otherwise, 64 invalid config.
fn check_online(path: &std::path::Path, json: bool) -> ExitCode {
    let settings = match Config::load(path) {
        Ok(settings) => settings,
        Err(error) => return config_failure(&error),
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let reports = runtime.block_on(byoc_sidecar::online::check(&settings));
    if json {
        match serde_json::to_string_pretty(&reports) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("cannot write the report as JSON: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", byoc_sidecar::online::render(&reports));
    }
    if reports.iter().all(|report| report.healthy) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(serve(settings, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "byoc-sidecar failed");
            eprintln!("byoc-sidecar: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP: the configuration is read and validated again; a broken one is refused and
/// the running one stays; a valid one hands its re-read secrets to the running trunks.
fn reload(app: &App, path: &std::path::Path) {
    match Config::load(path) {
        Err(error) => tracing::error!(
            error = %error,
            "SIGHUP: the configuration is refused; the running one stays"
        ),
        Ok(settings) => {
            let changed = app.reload(&settings);
            tracing::info!(
                secrets_changed = %changed.join(" "),
                "SIGHUP: configuration re-read; secrets taken, other changes take effect at the next start"
            );
        }
    }
}

async fn serve(
    settings: byoc_sidecar::config::Settings,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    // Handlers first: a signal that arrives while the proxy starts (right after it says
    // so) must stop it cleanly, not kill it.
    let mut signals = Signals::install()?;
    let drain = settings.limits.drain_timeout;
    let root = CancellationToken::new();
    let app = App::start(settings, &root)
        .await
        .context("starting the proxy")?;
    let stop = loop {
        match signals.next().await {
            Stop::Reload => reload(&app, path),
            stop => break stop,
        }
    };
    if stop == Stop::Terminate && !drain.is_zero() {
        tracing::info!(deadline = ?drain, "SIGTERM: draining (new calls get 503, calls in progress go on)");
        tokio::select! {
            _ = app.drain(drain) => {}
            _ = signals.wait() => tracing::warn!("second stop signal: not waiting for calls in progress"),
        }
    }
    tracing::info!("shutting down");
    if !app.shutdown(SHUTDOWN_DEADLINE).await {
        tracing::warn!(deadline = ?SHUTDOWN_DEADLINE, "some tasks were still running at the shutdown deadline");
    }
    Ok(())
}

/// The multi-threaded runtime the commands run on; `None`, said on stderr, when it
/// cannot be built.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            None
        }
    }
}

/// Which signal came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGINT (an operator's Ctrl-C): stop now.
    Interrupt,
    /// SIGTERM (a supervisor): drain first.
    Terminate,
    /// SIGHUP: re-read the configuration.
    Reload,
}

/// SIGINT and SIGTERM, listened to from the moment they are installed.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hangup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// The next stop signal (SIGHUP is not one).
    async fn wait(&mut self) -> Stop {
        loop {
            match self.next().await {
                Stop::Reload => continue,
                stop => return stop,
            }
        }
    }

    /// The next signal, SIGHUP included.
    async fn next(&mut self) -> Stop {
        tokio::select! {
            _ = self.interrupt.recv() => Stop::Interrupt,
            _ = self.terminate.recv() => Stop::Terminate,
            _ = self.hangup.recv() => Stop::Reload,
        }
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
