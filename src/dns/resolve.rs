//! Asking DNS (through `hickory-resolver`) what a trunk's peer name resolves to, and
//! keeping the answer fresh: each name has a task that looks it up again when the
//! shortest TTL of its answer runs out (within `[dns] min_refresh`..`max_refresh`), and
//! after a failure keeps the last good answer and tries again after `[dns] retry`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    naptr_services, srv_fallback_order, srv_name, Candidate, Destinations, Naptr, Resolved,
};
use crate::config::{DnsSettings, Endpoint, Selection, Transport};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(String),
    #[error("{name}: {reason}")]
    Lookup { name: String, reason: String },
    #[error("{0} resolves to no address")]
    Empty(String),
}

/// An answer and how long it may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub resolved: Resolved,
    pub ttl: Duration,
}

/// The resolver every trunk shares.
pub struct Resolver {
    inner: TokioResolver,
    settings: DnsSettings,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("servers", &self.settings.servers)
            .finish_non_exhaustive()
    }
}

/// What one SRV or address lookup gave, with its shortest TTL.
struct Records<T> {
    records: Vec<T>,
    ttl: u32,
}

impl Resolver {
    /// A resolver asking `settings.servers`, or the system's name servers when none are
    /// configured. Answers are not cached here: each peer's refresh task decides when to
    /// ask again, by TTL.
    pub fn new(settings: &DnsSettings) -> Result<Self, ResolveError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if settings.servers.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|error| ResolveError::Setup(error.to_string()))?
        } else {
            let servers = settings
                .servers
                .iter()
                .map(|server| {
                    let mut config = NameServerConfig::udp_and_tcp(server.ip());
                    for connection in &mut config.connections {
                        connection.port = server.port();
                    }
                    config
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let options: &mut ResolverOpts = builder.options_mut();
        options.timeout = settings.timeout;
        options.attempts = 2;
        options.cache_size = 0;
        let inner = builder
            .build()
            .map_err(|error| ResolveError::Setup(error.to_string()))?;
        Ok(Self {
            inner,
            settings: settings.clone(),
        })
    }

    /// RFC 3263 §4 for `endpoint`, among the transports in `supported`: an IP address
    /// as it is; a port given: the name's A/AAAA records; otherwise NAPTR (for `sip:`
    /// and `sips:`), then SRV, then A/AAAA on the transport's default port.
    pub async fn resolve(
        &self,
        endpoint: &Endpoint,
        supported: &[Transport],
    ) -> Result<Answer, ResolveError> {
        let host = endpoint.host_name();
        if let Some(ip) = endpoint.ip() {
            let port = endpoint
                .port
                .unwrap_or_else(|| endpoint.transport().default_port());
            return Ok(Answer {
                resolved: Resolved::new(vec![Candidate::plain(
                    endpoint.transport(),
                    SocketAddr::new(ip, port),
                    0,
                )]),
                ttl: self.settings.max_refresh,
            });
        }
        if let Some(port) = endpoint.port {
            let addresses = self.addresses(&host).await?;
            let candidates = plain(endpoint.transport(), &addresses.records, port);
            return self.answer(&host, candidates, addresses.ttl);
        }
        let mut ttl = u32::MAX;
        let services: Vec<(Transport, String)> = match endpoint.selection {
            Selection::Fixed(transport) => vec![(transport, srv_name(transport, &host))],
            Selection::Naptr { secure } => {
                let naptr = self.naptr(&host).await?;
                ttl = ttl.min(naptr.ttl);
                let services = naptr_services(&naptr.records, secure, supported);
                if services.is_empty() {
                    srv_fallback_order(secure, supported)
                        .into_iter()
                        .map(|transport| (transport, srv_name(transport, &host)))
                        .collect()
                } else {
                    services
                }
            }
        };
        let mut candidates = Vec::new();
        let mut srv_found = false;
        let mut next_target = 0u32;
        for (position, (transport, name)) in services.iter().enumerate() {
            // A lookup that fails (not one that finds nothing) fails the whole answer:
            // half an answer must not replace the last good one.
            let srv = self.srv(name).await?;
            ttl = ttl.min(srv.ttl);
            srv_found |= !srv.records.is_empty();
            for (priority, weight, port, target) in srv.records {
                // A target of "." says the service is not offered here (RFC 2782).
                if target.is_empty() {
                    continue;
                }
                let addresses = match self.addresses(&target).await {
                    Ok(addresses) => addresses,
                    Err(ResolveError::Empty(_)) => {
                        tracing::debug!(%name, %target, "SRV target has no address; skipped");
                        continue;
                    }
                    Err(error) => return Err(error),
                };
                ttl = ttl.min(addresses.ttl);
                let rank = (u32::try_from(position).unwrap_or(u32::from(u16::MAX)) << 16)
                    | u32::from(priority);
                next_target += 1;
                candidates.extend(addresses.records.iter().map(|ip| Candidate {
                    transport: *transport,
                    addr: SocketAddr::new(*ip, port),
                    rank,
                    weight,
                    target: next_target,
                }));
            }
        }
        if srv_found && candidates.is_empty() {
            // SRV records exist but name no usable target: the domain's own address is
            // no fallback then (RFC 3263 §4.2 allows it only without SRV records).
            return Err(ResolveError::Empty(host));
        }
        if candidates.is_empty() {
            // No SRV records: the name itself, on the default port (RFC 3263 §4.2), over
            // UDP for sip: and TLS for sips: (§4.1), or what the side listens on.
            let preferred = endpoint.transport();
            let transport = match endpoint.selection {
                Selection::Fixed(transport) => transport,
                Selection::Naptr { .. } if supported.contains(&preferred) => preferred,
                Selection::Naptr { .. } => services
                    .first()
                    .map_or(preferred, |(transport, _)| *transport),
            };
            let addresses = self.addresses(&host).await?;
            ttl = ttl.min(addresses.ttl);
            candidates = plain(transport, &addresses.records, transport.default_port());
        }
        self.answer(&host, candidates, ttl)
    }

    fn answer(
        &self,
        host: &str,
        candidates: Vec<Candidate>,
        ttl: u32,
    ) -> Result<Answer, ResolveError> {
        if candidates.is_empty() {
            return Err(ResolveError::Empty(host.to_string()));
        }
        let ttl = Duration::from_secs(u64::from(ttl))
            .clamp(self.settings.min_refresh, self.settings.max_refresh);
        Ok(Answer {
            resolved: Resolved::new(candidates),
            ttl,
        })
    }

    /// A and AAAA records of `name` (IPv4 first); an error when it has neither, or
    /// when either lookup fails (half an answer must not replace the last good one).
    async fn addresses(&self, name: &str) -> Result<Records<IpAddr>, ResolveError> {
        let mut records = Vec::new();
        let mut ttl = u32::MAX;
        for kind in [RecordType::A, RecordType::AAAA] {
            let found = self
                .records(name, kind, |data| match data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                })
                .await?;
            if !found.records.is_empty() {
                ttl = ttl.min(found.ttl);
            }
            for ip in found.records {
                if !records.contains(&ip) {
                    records.push(ip);
                }
            }
        }
        if records.is_empty() {
            return Err(ResolveError::Empty(name.to_string()));
        }
        Ok(Records { records, ttl })
    }

    /// SRV records of `name` as (priority, weight, port, target); none is not an error.
    async fn srv(&self, name: &str) -> Result<Records<(u16, u16, u16, String)>, ResolveError> {
        self.records(name, RecordType::SRV, |data| match data {
            RData::SRV(srv) => {
                let target = srv.target.to_ascii();
                let target = target.trim_end_matches('.').to_string();
                Some((srv.priority, srv.weight, srv.port, target))
            }
            _ => None,
        })
        .await
    }

    /// NAPTR records of `name`; none is not an error.
    async fn naptr(&self, name: &str) -> Result<Records<Naptr>, ResolveError> {
        self.records(name, RecordType::NAPTR, |data| match data {
            RData::NAPTR(naptr) => Some(Naptr {
                order: naptr.order,
                preference: naptr.preference,
                flags: String::from_utf8_lossy(&naptr.flags).into_owned(),
                service: String::from_utf8_lossy(&naptr.services).into_owned(),
                replacement: naptr.replacement.to_ascii(),
            }),
            _ => None,
        })
        .await
    }

    /// The records of `kind` at `name` that `read` understands, with their shortest TTL;
    /// none (NXDOMAIN, no data) is not an error, a failed lookup is.
    async fn records<T>(
        &self,
        name: &str,
        kind: RecordType,
        read: impl Fn(&RData) -> Option<T>,
    ) -> Result<Records<T>, ResolveError> {
        let mut records = Vec::new();
        let mut ttl = u32::MAX;
        match self.inner.lookup(absolute(name).as_str(), kind).await {
            Ok(lookup) => {
                for record in lookup.answers() {
                    if let Some(value) = read(&record.data) {
                        ttl = ttl.min(record.ttl);
                        records.push(value);
                    }
                }
            }
            Err(error) if error.is_no_records_found() || error.is_nx_domain() => {}
            Err(error) => {
                return Err(ResolveError::Lookup {
                    name: name.to_string(),
                    reason: error.to_string(),
                })
            }
        }
        Ok(Records { records, ttl })
    }
}

/// Candidates for the addresses of one name on `port`, each its own target (an even
/// choice among them).
fn plain(transport: Transport, addresses: &[IpAddr], port: u16) -> Vec<Candidate> {
    addresses
        .iter()
        .zip(0u32..)
        .map(|(ip, target)| Candidate::plain(transport, SocketAddr::new(*ip, port), target))
        .collect()
}

/// A configured name taken as absolute: no search domains are tried.
fn absolute(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// Resolves `destinations` once, within `limit`; the answer's lifetime when there is
/// one. A failure is logged and leaves whatever it had.
pub async fn resolve_once(
    resolver: &Resolver,
    destinations: &Destinations,
    supported: &[Transport],
    limit: Duration,
) -> Option<Duration> {
    if destinations.is_static() {
        return None;
    }
    let endpoint = &destinations.endpoint;
    match tokio::time::timeout(limit, resolver.resolve(endpoint, supported)).await {
        Ok(Ok(answer)) => {
            if destinations.current().candidates != answer.resolved.candidates {
                tracing::info!(
                    peer = %endpoint,
                    targets = %targets_text(&answer.resolved),
                    ttl = ?answer.ttl,
                    "resolved"
                );
            }
            let now = tokio::time::Instant::now().into_std();
            destinations.update(answer.resolved, now, super::RETIRED_KEEP);
            Some(answer.ttl)
        }
        Ok(Err(error)) => {
            log_failure(destinations, &error.to_string());
            None
        }
        Err(_) => {
            log_failure(destinations, "no answer in time");
            None
        }
    }
}

fn log_failure(destinations: &Destinations, reason: &str) {
    let endpoint = &destinations.endpoint;
    if destinations.current().is_empty() {
        tracing::warn!(peer = %endpoint, reason, "cannot resolve; requests to it fail until it does");
    } else {
        tracing::warn!(peer = %endpoint, reason, "cannot resolve; keeping the last answer");
    }
}

/// `transport:address` of every candidate, for the log.
pub fn targets_text(resolved: &Resolved) -> String {
    resolved
        .candidates
        .iter()
        .map(|candidate| format!("{}:{}", candidate.transport, candidate.addr))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Keeps `destinations` resolved until cancelled: looks it up again after `first`, then
/// whenever the answer's TTL runs out, or `retry` after a failure.
pub fn spawn_refresh(
    resolver: Arc<Resolver>,
    destinations: Arc<Destinations>,
    supported: Vec<Transport>,
    first: Duration,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    if destinations.is_static() {
        return;
    }
    tracker.spawn(async move {
        let settings = resolver.settings.clone();
        let limit = settings.timeout * 4;
        let mut wait = first;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = resolve_once(&resolver, &destinations, &supported, limit)
                .await
                .unwrap_or(settings.retry);
        }
    });
}

impl Resolver {
    /// The settings it was made with.
    pub fn settings(&self) -> &DnsSettings {
        &self.settings
    }
}
