//! Configuration: the TOML schema (serde, `deny_unknown_fields`), its defaults, and
//! [`Config::validate`], which turns the raw file into typed [`Settings`] or reports every
//! problem at once, each naming its key and, for trunk keys, the trunk.
//!
//! The raw structs keep addresses and durations as strings so that one bad value does not
//! hide the others: serde stops at the first error, `validate` does not.

mod credentials;
mod parse;
mod registration;

pub use credentials::{CredentialSettings, CredentialsConfig, SourceSettings};
pub use parse::{parse_duration, Endpoint, Listen, Selection, Transport};
pub use registration::{RegistrationConfig, RegistrationSettings};

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::sip::transaction::TimerConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: {count} problem(s):\n{list}", count = problems.len(), list = Problem::list(problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

/// One thing wrong with a configuration, with the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    fn list(problems: &[Problem]) -> String {
        problems
            .iter()
            .map(|problem| format!("  - {problem}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub edge: SideConfig,
    pub core_side: SideConfig,
    #[serde(default)]
    pub sip: SipConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The admin HTTP listener (metrics, health, readiness, status); off when absent.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// How host names of trunks are resolved (RFC 3263).
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub trunk: Vec<TrunkConfig>,
}

/// `[dns]`: the resolver for the trunks' host names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers as `IP` or `IP:PORT`; empty: the system's (`/etc/resolv.conf`).
    pub servers: Vec<String>,
    /// How long one query may take.
    pub timeout: String,
    /// Answers are looked up again when their TTL runs out, but no sooner than this…
    pub min_refresh: String,
    /// …and no later than this.
    pub max_refresh: String,
    /// After a failed lookup (the last good answer stays in use), the next try.
    pub retry: String,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: "2s".into(),
            min_refresh: "5s".into(),
            max_refresh: "1h".into(),
            retry: "5s".into(),
        }
    }
}

/// `[edge.tls]`, `[core_side.tls]`: the certificate a side's `tls:` listeners present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub certificate_file: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

/// `[trunk.tls]`: how TLS connections to the trunk's peers are verified and whom the
/// sidecar presents itself as.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkTlsConfig {
    /// PEM bundle of the CAs trusted for the peer's certificate; default: the system's.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// PEM client certificate chain for mutual TLS, with `key_file`.
    #[serde(default)]
    pub certificate_file: Option<String>,
    #[serde(default)]
    pub key_file: Option<String>,
    /// The name sent in SNI and checked in the peer's certificate; default: the host of
    /// `core` (and of `edge`).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// `[admin]`: where the admin HTTP listener binds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `IP:PORT`; default `127.0.0.1:9090`.
    #[serde(default)]
    pub listen: Option<String>,
}

/// Where the admin listener binds when `[admin]` names no address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// One side of the proxy: where its peers reach us, and who may.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SideConfig {
    /// `udp:IP:PORT`, `tcp:IP:PORT` or `tls:IP:PORT` (a `tls:` listener needs `tls`).
    pub listen: Vec<String>,
    /// The address written in Via and Record-Route; required when a listener binds the
    /// unspecified address.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Networks allowed to send to this side, besides the trunks' own addresses.
    #[serde(default)]
    pub allow: Vec<String>,
    /// The certificate of this side's `tls:` listeners.
    #[serde(default)]
    pub tls: Option<ServerTlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    pub t1: String,
    pub t2: String,
    pub t4: String,
    /// Timer C: how long an INVITE may ring without a final response before the proxy
    /// cancels it (RFC 3261 §16.8 asks for more than 3 minutes).
    pub timer_c: String,
    /// Largest message accepted on any transport, in bytes.
    pub max_message_size: usize,
    /// Server plus client transactions held at once; beyond it requests get 503.
    pub max_transactions: usize,
    /// Capacity of the queue from the transports to the engine.
    pub queue_capacity: usize,
    pub tcp_max_connections: usize,
    /// Receive and send buffer of each UDP socket, in bytes: a burst waits in the kernel
    /// instead of being dropped.
    pub udp_buffer: usize,
    /// Threads waiting on each UDP socket; the kernel wakes one idle reader per
    /// datagram, and each call's messages keep their order. 0 reads the UDP sockets on
    /// the proxy's driver task instead.
    pub udp_threads: usize,
    pub tcp_idle_timeout: String,
    pub tcp_connect_timeout: String,
    /// How long one write to a TCP connection may take before the connection is closed
    /// (a peer that stops reading must not hold its connection and slot for ever).
    pub tcp_write_timeout: String,
    /// On SIGTERM: how long calls and transactions in progress may go on (new dialogs
    /// get 503 meanwhile) before the proxy stops.
    pub drain_timeout: String,
    /// A request to one of several core hosts that hears nothing back (not even 100
    /// Trying) within this is tried on the next host (RFC 3263 §4.3).
    pub failover_timeout: String,
    /// A core host that failed is tried last for this long.
    pub failed_host_hold: String,
}

impl Default for SipConfig {
    fn default() -> Self {
        Self {
            t1: "500ms".into(),
            t2: "4s".into(),
            t4: "5s".into(),
            timer_c: "180s".into(),
            max_message_size: 65_535,
            max_transactions: 100_000,
            queue_capacity: 8192,
            tcp_max_connections: 1024,
            udp_buffer: 8 << 20,
            udp_threads: 2,
            tcp_idle_timeout: "300s".into(),
            tcp_connect_timeout: "5s".into(),
            tcp_write_timeout: "10s".into(),
            drain_timeout: "30s".into(),
            failover_timeout: "3s".into(),
            failed_host_hold: "30s".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A `tracing` filter such as `info` or `byoc_sidecar=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkConfig {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    /// Where requests from the core for this trunk go: `udp:|tcp:|tls:HOST[:PORT]` or
    /// `sip:|sips:HOST` (RFC 3263: NAPTR, SRV, A/AAAA).
    pub edge: String,
    /// Where this trunk's requests from the Edge go: `udp:|tcp:|tls:HOST[:PORT]` or
    /// `sip:|sips:HOST` (RFC 3263: NAPTR, SRV, A/AAAA).
    pub core: String,
    /// Networks the core sends from besides the addresses `core` resolves to.
    #[serde(default)]
    pub core_sources: Vec<String>,
    /// TLS toward this trunk's peers.
    #[serde(default)]
    pub tls: Option<TrunkTlsConfig>,
    /// How the trunk authenticates toward the core: `none` (the default: requests pass
    /// as the Edge sent them), `bearer` (RFC 8898, from the trunk's token) or `digest`
    /// (RFC 7616/8760, answering the core's challenges with the trunk's username and
    /// password).
    #[serde(default)]
    pub auth: Option<String>,
    /// With `digest`: the only realm whose challenges are answered. Without it any realm
    /// is, including one of a proxy beyond the core that challenges.
    #[serde(default)]
    pub digest_realm: Option<String>,
    /// The credentials this trunk presents to the core.
    #[serde(default)]
    pub credentials: Option<CredentialsConfig>,
    /// Keep the trunk registered with the core.
    #[serde(default)]
    pub registration: Option<RegistrationConfig>,
}

/// How a trunk authenticates toward the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Requests pass with whatever the Edge put in them.
    None,
    /// `Authorization: Bearer <token>` on every request toward the core (RFC 8898); an
    /// `Authorization` or `Proxy-Authorization` from the Edge is replaced.
    Bearer,
    /// Digest (RFC 3261 §22, RFC 7616, RFC 8760): the core's 401/407 challenges are
    /// answered with the trunk's username and password, and the nonce is reused with an
    /// incrementing count for later requests; the Edge's own credentials are replaced.
    Digest,
}

/// Which Edge traffic a trunk serves. All given criteria must hold; a trunk with none
/// matches everything, so it belongs last.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    #[serde(default)]
    pub source: Vec<String>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub edge: Side,
    pub core_side: Side,
    pub timers: TimerConfig,
    pub limits: Limits,
    pub log: LogConfig,
    /// The admin listener's address, if it is on.
    pub admin: Option<std::net::SocketAddr>,
    pub dns: DnsSettings,
    pub trunks: Vec<Trunk>,
}

#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Empty: the system's name servers.
    pub servers: Vec<std::net::SocketAddr>,
    pub timeout: Duration,
    pub min_refresh: Duration,
    pub max_refresh: Duration,
    pub retry: Duration,
}

/// Certificate and key files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// How a trunk's TLS connections are made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// Trusted CAs; `None`: the system's.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and key, for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Overrides the name checked in the peer's certificate.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Side {
    pub listen: Vec<Listen>,
    pub advertise: Option<String>,
    pub allow: Vec<IpNet>,
    pub tls: Option<ServerTls>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message_size: usize,
    pub max_transactions: usize,
    pub queue_capacity: usize,
    pub tcp_max_connections: usize,
    pub udp_buffer: usize,
    /// Threads that read each UDP socket; 0: the driver task reads them.
    pub udp_threads: usize,
    pub tcp_idle_timeout: Duration,
    pub tcp_connect_timeout: Duration,
    pub tcp_write_timeout: Duration,
    pub drain_timeout: Duration,
    pub failover_timeout: Duration,
    pub failed_host_hold: Duration,
}

#[derive(Debug, Clone)]
pub struct Trunk {
    pub name: String,
    pub sources: Vec<IpNet>,
    pub domain: Option<String>,
    pub port: Option<u16>,
    pub edge: Endpoint,
    pub core: Endpoint,
    /// Networks the core sends from besides what `core` resolves to.
    pub core_sources: Vec<IpNet>,
    pub tls: ClientTls,
    pub auth: AuthMode,
    /// With `digest`, the only realm answered.
    pub digest_realm: Option<String>,
    pub credentials: Option<CredentialSettings>,
    pub registration: Option<RegistrationSettings>,
}

impl Config {
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|error| ConfigError::Syntax {
            path: path.to_string(),
            message: error.to_string(),
        })
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_toml(&text, &shown)?
            .validate()
            .map_err(|problems| ConfigError::Invalid {
                path: shown,
                problems,
            })
    }

    /// Checks everything and returns the typed settings, or all problems found.
    pub fn validate(&self) -> Result<Settings, Vec<Problem>> {
        let mut problems = Problems::default();
        let edge = validate_side("edge", &self.edge, &mut problems);
        let core_side = validate_side("core_side", &self.core_side, &mut problems);
        for listen in &edge.listen {
            // Port 0 asks the system for a free port, so it never collides.
            let collides = listen.addr.port() != 0
                && core_side
                    .listen
                    .iter()
                    .any(|other| other.addr == listen.addr && other.transport == listen.transport);
            if collides {
                problems.add(
                    "core_side.listen",
                    format!(
                        "{listen} is also an edge listener; the two sides need distinct addresses"
                    ),
                );
            }
        }
        let timers = self.validate_timers(&mut problems);
        let limits = self.validate_limits(&mut problems);
        if !matches!(self.log.format.as_str(), "text" | "json") {
            problems.add(
                "log.format",
                format!("{:?} is neither \"text\" nor \"json\"", self.log.format),
            );
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.add(
                "log.level",
                format!("{:?} is not a log filter: {error}", self.log.level),
            );
        }
        let trunks = self.validate_trunks(&edge, &core_side, &mut problems);
        let dns = self.validate_dns(&mut problems);
        let admin = self.admin.as_ref().and_then(|admin| {
            let text = admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
            text.parse::<std::net::SocketAddr>()
                .map_err(|_| problems.add("admin.listen", format!("{text:?} is not IP:PORT")))
                .ok()
        });
        if problems.0.is_empty() {
            Ok(Settings {
                edge,
                core_side,
                timers,
                limits,
                log: self.log.clone(),
                admin,
                dns,
                trunks,
            })
        } else {
            Err(problems.0)
        }
    }

    fn validate_timers(&self, problems: &mut Problems) -> TimerConfig {
        let defaults = TimerConfig::default();
        let t1 = problems
            .duration("sip.t1", &self.sip.t1)
            .unwrap_or(defaults.t1);
        let t2 = problems
            .duration("sip.t2", &self.sip.t2)
            .unwrap_or(defaults.t2);
        let t4 = problems
            .duration("sip.t4", &self.sip.t4)
            .unwrap_or(defaults.t4);
        let timer_c = problems
            .duration("sip.timer_c", &self.sip.timer_c)
            .unwrap_or(defaults.timer_c);
        // Bounds keep every derived timer (64·T1, doubling intervals) far from overflow
        // and the proxy within reach of the RFC's intent.
        for (key, value, low, high) in [
            (
                "sip.t1",
                t1,
                Duration::from_millis(1),
                Duration::from_secs(10),
            ),
            (
                "sip.t2",
                t2,
                Duration::from_millis(1),
                Duration::from_secs(60),
            ),
            (
                "sip.t4",
                t4,
                Duration::from_millis(1),
                Duration::from_secs(60),
            ),
            (
                "sip.timer_c",
                timer_c,
                Duration::from_secs(1),
                Duration::from_secs(3600),
            ),
        ] {
            problems.within(key, value, low, high);
        }
        if t2 < t1 {
            problems.add("sip.t2", format!("{t2:?} is less than sip.t1 ({t1:?})"));
        }
        TimerConfig {
            t1,
            t2,
            t4,
            timer_c,
        }
    }

    fn validate_dns(&self, problems: &mut Problems) -> DnsSettings {
        let dns = &self.dns;
        let servers = dns
            .servers
            .iter()
            .filter_map(|text| {
                let text = text.trim();
                text.parse::<std::net::SocketAddr>()
                    .ok()
                    .or_else(|| {
                        text.parse::<IpAddr>()
                            .ok()
                            .map(|ip| std::net::SocketAddr::new(ip, 53))
                    })
                    .or_else(|| {
                        problems.add("dns.servers", format!("{text:?} is not IP or IP:PORT"));
                        None
                    })
            })
            .collect();
        let secs = Duration::from_secs;
        let [timeout, min_refresh, max_refresh, retry] = [
            (
                "dns.timeout",
                &dns.timeout,
                secs(2),
                Duration::from_millis(100),
                secs(30),
            ),
            (
                "dns.min_refresh",
                &dns.min_refresh,
                secs(5),
                Duration::from_millis(100),
                secs(3600),
            ),
            (
                "dns.max_refresh",
                &dns.max_refresh,
                secs(3600),
                secs(1),
                secs(24 * 3600),
            ),
            (
                "dns.retry",
                &dns.retry,
                secs(5),
                Duration::from_millis(100),
                secs(3600),
            ),
        ]
        .map(|(key, text, default, low, high)| {
            let value = problems.duration(key, text).unwrap_or(default);
            problems.within(key, value, low, high);
            value
        });
        if max_refresh < min_refresh {
            problems.add(
                "dns.max_refresh",
                format!("{max_refresh:?} is less than dns.min_refresh ({min_refresh:?})"),
            );
        }
        DnsSettings {
            servers,
            timeout,
            min_refresh,
            max_refresh,
            retry,
        }
    }

    fn validate_limits(&self, problems: &mut Problems) -> Limits {
        let sip = &self.sip;
        // Upper bounds keep tables, queues and deadlines far from what would exhaust
        // memory or overflow a clock; nothing real comes near them.
        for (key, value, low, high) in [
            ("sip.max_message_size", sip.max_message_size, 1024, 1 << 20),
            ("sip.max_transactions", sip.max_transactions, 1, 10_000_000),
            ("sip.queue_capacity", sip.queue_capacity, 1, 1 << 20),
            (
                "sip.tcp_max_connections",
                sip.tcp_max_connections,
                1,
                1 << 20,
            ),
            ("sip.udp_buffer", sip.udp_buffer, 4096, 1 << 30),
            ("sip.udp_threads", sip.udp_threads, 0, 16),
        ] {
            if !(low..=high).contains(&value) {
                problems.add(key, format!("{value} is outside {low}..={high}"));
            }
        }
        // Every bounded duration of [sip]: key, text, default, and range.
        let secs = Duration::from_secs;
        let [tcp_idle_timeout, tcp_connect_timeout, tcp_write_timeout, drain_timeout, failover_timeout, failed_host_hold] =
            [
                (
                    "sip.tcp_idle_timeout",
                    &sip.tcp_idle_timeout,
                    secs(300),
                    secs(1),
                    secs(24 * 3600),
                ),
                (
                    "sip.tcp_connect_timeout",
                    &sip.tcp_connect_timeout,
                    secs(5),
                    Duration::from_millis(100),
                    secs(60),
                ),
                (
                    "sip.tcp_write_timeout",
                    &sip.tcp_write_timeout,
                    secs(10),
                    Duration::from_millis(100),
                    secs(60),
                ),
                (
                    "sip.drain_timeout",
                    &sip.drain_timeout,
                    secs(30),
                    Duration::ZERO,
                    secs(3600),
                ),
                (
                    "sip.failover_timeout",
                    &sip.failover_timeout,
                    secs(3),
                    Duration::from_millis(100),
                    secs(60),
                ),
                (
                    "sip.failed_host_hold",
                    &sip.failed_host_hold,
                    secs(30),
                    Duration::ZERO,
                    secs(3600),
                ),
            ]
            .map(|(key, text, default, low, high)| {
                let value = problems.duration(key, text).unwrap_or(default);
                problems.within(key, value, low, high);
                value
            });
        Limits {
            drain_timeout,
            failover_timeout,
            failed_host_hold,
            max_message_size: sip.max_message_size,
            max_transactions: sip.max_transactions,
            queue_capacity: sip.queue_capacity,
            tcp_max_connections: sip.tcp_max_connections,
            udp_buffer: sip.udp_buffer,
            udp_threads: sip.udp_threads,
            tcp_idle_timeout,
            tcp_connect_timeout,
            tcp_write_timeout,
        }
    }

    fn validate_trunks(
        &self,
        edge: &Side,
        core_side: &Side,
        problems: &mut Problems,
    ) -> Vec<Trunk> {
        if self.trunk.is_empty() {
            problems.add("trunk", "no [[trunk]] is configured".into());
        }
        let mut names = HashSet::new();
        let mut trunks = Vec::new();
        for (index, raw) in self.trunk.iter().enumerate() {
            let label = if raw.name.trim().is_empty() {
                problems.add(&format!("trunk[{index}].name"), "must not be empty".into());
                format!("trunk[{index}]")
            } else {
                format!("trunk \"{}\"", raw.name)
            };
            if !names.insert(raw.name.as_str()) {
                problems.add(&format!("{label}.name"), "is used by another trunk".into());
            }
            let sources: Vec<IpNet> = raw
                .matcher
                .source
                .iter()
                .filter_map(|text| problems.network(&format!("{label}.match.source"), text))
                .collect();
            let edge_endpoint = problems.endpoint(&format!("{label}.edge"), &raw.edge);
            let core_endpoint = problems.endpoint(&format!("{label}.core"), &raw.core);
            for (key, endpoint, side, side_name) in [
                ("edge", &edge_endpoint, edge, "edge"),
                ("core", &core_endpoint, core_side, "core_side"),
            ] {
                // NAPTR picks among the transports listened on; sips: needs TLS.
                let needed = match endpoint.as_ref().map(|endpoint| endpoint.selection) {
                    Some(Selection::Fixed(transport)) => Some(transport),
                    Some(Selection::Naptr { secure: true }) => Some(Transport::Tls),
                    _ => None,
                };
                if let Some(transport) = needed {
                    if !side
                        .listen
                        .iter()
                        .any(|listen| listen.transport == transport)
                    {
                        problems.add(
                            &format!("{label}.{key}"),
                            format!(
                                "uses {transport} but {side_name}.listen has no {transport} listener"
                            ),
                        );
                    }
                }
            }
            let core_sources: Vec<IpNet> = raw
                .core_sources
                .iter()
                .filter_map(|text| problems.network(&format!("{label}.core_sources"), text))
                .collect();
            let tls = validate_client_tls(&label, raw.tls.as_ref(), problems);
            let uses_tls = [&edge_endpoint, &core_endpoint].iter().any(|endpoint| {
                endpoint.as_ref().is_some_and(|endpoint| {
                    endpoint.transport() == Transport::Tls
                        || endpoint.selection == (Selection::Naptr { secure: false })
                })
            });
            if raw.tls.is_some() && !uses_tls {
                problems.add(
                    &format!("{label}.tls"),
                    "is set but neither edge nor core is reached over TLS (tls:, sips:, or sip: with NAPTR)".into(),
                );
            }
            let credentials = raw
                .credentials
                .as_ref()
                .and_then(|credentials| credentials.validate(&label, problems));
            let auth = match raw.auth.as_deref().unwrap_or("none") {
                "none" => AuthMode::None,
                "bearer" => AuthMode::Bearer,
                "digest" => AuthMode::Digest,
                other => {
                    problems.add(
                        &format!("{label}.auth"),
                        format!("{other:?} is not one of \"none\", \"bearer\", \"digest\""),
                    );
                    AuthMode::None
                }
            };
            if auth == AuthMode::Bearer {
                match &raw.credentials {
                    None => problems.add(&format!("{label}.auth"), "\"bearer\" needs a [trunk.credentials] table".into()),
                    Some(_) if credentials.as_ref().is_some_and(|settings| !settings.source.yields_token()) => problems.add(
                        &format!("{label}.auth"),
                        "\"bearer\" needs credentials that are a token (oauth2, file with format = \"token\", or static token_file/token_env)".into(),
                    ),
                    Some(_) => {}
                }
            }
            if auth == AuthMode::Digest {
                match &raw.credentials {
                    None => problems.add(&format!("{label}.auth"), "\"digest\" needs a [trunk.credentials] table".into()),
                    Some(_) if credentials.as_ref().is_some_and(|settings| settings.source.yields_token()) => problems.add(
                        &format!("{label}.auth"),
                        "\"digest\" needs a username and password (file with format = \"username_password\", ephemeral, or static username with password_file/password_env)".into(),
                    ),
                    Some(_) => {}
                }
            }
            match &raw.digest_realm {
                Some(_) if auth != AuthMode::Digest => problems.add(
                    &format!("{label}.digest_realm"),
                    "only applies with auth = \"digest\"".into(),
                ),
                Some(realm) if realm.trim().is_empty() => problems.add(
                    &format!("{label}.digest_realm"),
                    "is empty; leave it out to answer any realm".into(),
                ),
                _ => {}
            }
            let registration = raw
                .registration
                .as_ref()
                .and_then(|registration| registration.validate(&label, problems));
            if let (Some(edge), Some(core)) = (edge_endpoint, core_endpoint) {
                trunks.push(Trunk {
                    core_sources,
                    tls,
                    auth,
                    digest_realm: raw.digest_realm.clone(),
                    registration,
                    credentials,
                    name: raw.name.clone(),
                    sources,
                    domain: raw.matcher.domain.clone(),
                    port: raw.matcher.port,
                    edge,
                    core,
                });
            }
        }
        if let Some(catch_all) = self.trunk.iter().position(|raw| {
            raw.matcher.source.is_empty()
                && raw.matcher.domain.is_none()
                && raw.matcher.port.is_none()
        }) {
            if catch_all + 1 < self.trunk.len() {
                problems.add(
                    &format!("trunk \"{}\".match", self.trunk[catch_all].name),
                    "matches all traffic but is not the last trunk; the trunks after it would never match".into(),
                );
            }
        }
        trunks
    }
}

fn validate_side(name: &str, raw: &SideConfig, problems: &mut Problems) -> Side {
    if raw.listen.is_empty() {
        problems.add(
            &format!("{name}.listen"),
            "needs at least one udp:, tcp: or tls: address".into(),
        );
    }
    let listen: Vec<Listen> = raw
        .listen
        .iter()
        .filter_map(|text| match text.parse::<Listen>() {
            Ok(listen) => Some(listen),
            Err(error) => {
                problems.add(&format!("{name}.listen"), error.to_string());
                None
            }
        })
        .collect();
    let advertise = raw.advertise.as_ref().map(|text| text.trim().to_string());
    if let Some(advertise) = &advertise {
        if advertise.is_empty()
            || advertise.contains(|c: char| c.is_whitespace() || c == ';' || c == '>')
        {
            problems.add(
                &format!("{name}.advertise"),
                format!("{advertise:?} is not a host"),
            );
        }
    }
    if advertise.is_none()
        && listen
            .iter()
            .any(|listen| listen.addr.ip().is_unspecified())
    {
        problems.add(
            &format!("{name}.advertise"),
            "is required when a listener binds an unspecified address (0.0.0.0 or ::)".into(),
        );
    }
    let allow = raw
        .allow
        .iter()
        .filter_map(|text| problems.network(&format!("{name}.allow"), text))
        .collect();
    let has_tls_listener = listen
        .iter()
        .any(|listen| listen.transport == Transport::Tls);
    let tls = match (&raw.tls, has_tls_listener) {
        (Some(tls), _) => {
            let certificate = problems.file(
                &format!("{name}.tls.certificate_file"),
                &tls.certificate_file,
            );
            let key = problems.file(&format!("{name}.tls.key_file"), &tls.key_file);
            if !has_tls_listener {
                problems.add(
                    &format!("{name}.tls"),
                    format!("is set but {name}.listen has no tls: listener"),
                );
            }
            certificate
                .zip(key)
                .map(|(certificate, key)| ServerTls { certificate, key })
        }
        (None, true) => {
            problems.add(
                &format!("{name}.tls"),
                format!("a tls: listener needs [{name}.tls] with certificate_file and key_file"),
            );
            None
        }
        (None, false) => None,
    };
    Side {
        listen,
        advertise,
        allow,
        tls,
    }
}

fn validate_client_tls(
    label: &str,
    raw: Option<&TrunkTlsConfig>,
    problems: &mut Problems,
) -> ClientTls {
    let Some(raw) = raw else {
        return ClientTls::default();
    };
    let ca = raw
        .ca_file
        .as_deref()
        .and_then(|path| problems.file(&format!("{label}.tls.ca_file"), path));
    let identity = match (&raw.certificate_file, &raw.key_file) {
        (Some(certificate), Some(key)) => problems
            .file(&format!("{label}.tls.certificate_file"), certificate)
            .zip(problems.file(&format!("{label}.tls.key_file"), key)),
        (None, None) => None,
        (Some(_), None) => {
            problems.add(
                &format!("{label}.tls.key_file"),
                "is needed with certificate_file".into(),
            );
            None
        }
        (None, Some(_)) => {
            problems.add(
                &format!("{label}.tls.certificate_file"),
                "is needed with key_file".into(),
            );
            None
        }
    };
    let server_name = raw.server_name.as_ref().map(|name| name.trim().to_string());
    if let Some(name) = &server_name {
        if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
            problems.add(
                &format!("{label}.tls.server_name"),
                format!("{name:?} is not a DNS name or IP address"),
            );
        }
    }
    ClientTls {
        ca,
        identity,
        server_name,
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: &str, message: String) {
        self.0.push(Problem {
            key: key.to_string(),
            message,
        });
    }

    /// Reports `value` when it lies outside `low..=high`.
    fn within(&mut self, key: &str, value: Duration, low: Duration, high: Duration) {
        if value < low || value > high {
            self.add(key, format!("{value:?} is outside {low:?}..={high:?}"));
        }
    }

    fn duration(&mut self, key: &str, text: &str) -> Option<Duration> {
        parse_duration(text)
            .map_err(|message| self.add(key, message))
            .ok()
    }

    /// A file that must exist and be readable (its content is checked where it is used).
    fn file(&mut self, key: &str, text: &str) -> Option<PathBuf> {
        let path = PathBuf::from(text.trim());
        match std::fs::File::open(&path) {
            Ok(_) => Some(path),
            Err(error) => {
                self.add(key, format!("cannot read {}: {error}", path.display()));
                None
            }
        }
    }

    fn endpoint(&mut self, key: &str, text: &str) -> Option<Endpoint> {
        text.parse::<Endpoint>()
            .map_err(|error| self.add(key, error.to_string()))
            .ok()
    }

    /// A CIDR network, or a bare address taken as a single host.
    fn network(&mut self, key: &str, text: &str) -> Option<IpNet> {
        let text = text.trim();
        if let Ok(net) = text.parse::<IpNet>() {
            return Some(net);
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Some(IpNet::from(ip));
        }
        self.add(key, format!("{text:?} is not an address or CIDR network"));
        None
    }
}

#[cfg(test)]
mod tests;
