//! The proxy as a whole: [`App::start`] resolves the trunks' peers (and keeps them
//! resolved), binds every listener, and spawns the receive tasks and the engine under
//! one cancellation token and task tracker; [`App::shutdown`] cancels them and waits,
//! within a deadline.

mod calls;
mod driver;
mod engine;
mod failover;
#[cfg(test)]
mod pair;
mod request;
mod resend;
pub mod routing;
#[cfg(test)]
mod stories;

pub use driver::{Driver, SideSockets, TlsClientSlot};
pub use engine::{
    Action, CredentialWait, Destination, Engine, SideAddresses, Transmit, OWN_BRANCH_PREFIX,
    TRUNK_PARAM,
};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Listen, Settings, Side as SideSettings, Transport};
use crate::credentials::refusal::TrunkDigest;
use crate::dns::resolve::{self as dns_resolve, Resolver};
use crate::dns::Destinations;
use crate::registration::{RegistrationStatus, TrunkRegistration};
use crate::stats::Stats;
use crate::transport::tcp::{self, TcpContext};
use crate::transport::tls::{TlsClient, TlsError, TlsServer};
use crate::transport::{udp, AllowList, ReceiveContext, Side};
use routing::{RoutedTrunk, Router};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Udp(#[from] udp::UdpError),
    #[error(transparent)]
    Tcp(#[from] tcp::TcpError),
    #[error(transparent)]
    Dns(#[from] crate::dns::resolve::ResolveError),
    #[error("{side} tls listener: {source}")]
    ListenerTls {
        side: Side,
        #[source]
        source: TlsError,
    },
    #[error("trunk {trunk:?}: tls: {source}")]
    TrunkTls {
        trunk: String,
        #[source]
        source: TlsError,
    },
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error("trunk {trunk:?}: {source}")]
    Credentials {
        trunk: String,
        #[source]
        source: crate::credentials::oauth2::ClientError,
    },
}

/// A running proxy.
pub struct App {
    pub stats: Arc<Stats>,
    /// One credential manager per trunk that has credentials, by trunk name.
    pub credentials: HashMap<String, crate::credentials::CredentialManager>,
    /// The bound listeners (ports filled in where the configuration said 0).
    pub edge_listeners: Vec<Listen>,
    pub core_listeners: Vec<Listen>,
    /// The registration of each trunk that has one, by trunk name.
    pub registrations: HashMap<String, tokio::sync::watch::Receiver<RegistrationStatus>>,
    /// What the admin endpoints read (also when the admin listener is off).
    pub observed: Arc<crate::admin::Observed>,
    /// The admin listener's bound address, when it is on.
    pub admin: Option<SocketAddr>,
    /// Set by [`App::drain`]: the engine refuses new dialogs.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// The certificate of each side's TLS listeners, for SIGHUP.
    tls_servers: Vec<(Side, Arc<TlsServer>)>,
    /// How each trunk's TLS connections are made, for SIGHUP.
    tls_clients: Vec<TlsClientOf>,
    /// Every trunk's peers as resolved now: (trunk, side, peer).
    pub peers: Vec<(String, Side, Arc<Destinations>)>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// Registrations stop first (they unregister through the running engine).
    registration_stop: CancellationToken,
    registration_tracker: TaskTracker,
}

impl App {
    pub async fn start(settings: Settings, parent: &CancellationToken) -> Result<App, StartError> {
        let cancel = parent.child_token();
        let tracker = TaskTracker::new();
        let stats = Arc::new(Stats::default());
        let mut credentials = HashMap::new();
        for trunk in &settings.trunks {
            if let Some(credential_settings) = &trunk.credentials {
                let manager = crate::credentials::start_manager(
                    &trunk.name,
                    credential_settings,
                    cancel.clone(),
                    &tracker,
                )
                .map_err(|source| StartError::Credentials {
                    trunk: trunk.name.clone(),
                    source,
                })?;
                credentials.insert(trunk.name.clone(), manager);
            }
        }
        let resolver = Arc::new(Resolver::new(&settings.dns)?);
        let transports = |side: &SideSettings| -> Vec<Transport> {
            side.listen.iter().map(|listen| listen.transport).collect()
        };
        let (edge_transports, core_transports) =
            (transports(&settings.edge), transports(&settings.core_side));
        let mut trunks = Vec::new();
        let mut edge_tls = Vec::new();
        let mut core_tls = Vec::new();
        for (index, trunk) in settings.trunks.iter().enumerate() {
            let edge = Arc::new(Destinations::new(trunk.edge.clone()));
            let core = Arc::new(Destinations::new(trunk.core.clone()));
            let tls_for = |endpoint: &crate::config::Endpoint, side: &SideSettings| {
                endpoint
                    .may_use_tls(&side.listen)
                    .then(|| {
                        TlsClient::new(&trunk.tls, &endpoint.host)
                            .map(|client| Arc::new(arc_swap::ArcSwap::from_pointee(client)))
                    })
                    .transpose()
                    .map_err(|source| StartError::TrunkTls {
                        trunk: trunk.name.clone(),
                        source,
                    })
            };
            edge_tls.push(tls_for(&trunk.edge, &settings.edge)?);
            core_tls.push(tls_for(&trunk.core, &settings.core_side)?);
            trunks.push(RoutedTrunk {
                index,
                name: trunk.name.as_str().into(),
                auth: trunk.auth,
                digest_realm: trunk.digest_realm.clone(),
                digest: TrunkDigest::new(trunk.digest_realm.clone()),
                credentials: credentials.get(&trunk.name).cloned(),
                sources: trunk.sources.clone(),
                domain: trunk.domain.clone(),
                port: trunk.port,
                edge,
                core,
                core_sources: trunk.core_sources.clone(),
            });
        }
        let peers: Vec<(String, Side, Arc<Destinations>)> = trunks
            .iter()
            .flat_map(|trunk| {
                [
                    (trunk.name.to_string(), Side::Edge, trunk.edge.clone()),
                    (trunk.name.to_string(), Side::Core, trunk.core.clone()),
                ]
            })
            .collect();
        resolve_peers(
            &resolver,
            &peers,
            (&edge_transports, &core_transports),
            &cancel,
            &tracker,
        )
        .await;
        let mut edge_allow = settings.edge.allow.clone();
        let mut core_allow = settings.core_side.allow.clone();
        for trunk in &trunks {
            edge_allow.extend(trunk.sources.iter().copied());
            core_allow.extend(trunk.core_sources.iter().copied());
        }
        let peers_of = |side: Side| -> Vec<Arc<Destinations>> {
            peers
                .iter()
                .filter(|(_, peer_side, _)| *peer_side == side)
                .map(|(_, _, destinations)| destinations.clone())
                .collect()
        };
        let edge_allow = Arc::new(AllowList::new(edge_allow).with_peers(peers_of(Side::Edge)));
        let core_allow = Arc::new(AllowList::new(core_allow).with_peers(peers_of(Side::Core)));

        let (engine_sender, engine_receiver) = mpsc::channel(settings.limits.queue_capacity);
        let (outgoing_sender, outgoing_receiver) = mpsc::channel(settings.limits.queue_capacity);
        let shared = Shared {
            engine: engine_sender.clone(),
            stats: stats.clone(),
            settings: &settings,
            tracker: &tracker,
            cancel: &cancel,
        };
        let (mut edge_io, mut edge_sockets, edge_listeners, edge_server) = shared
            .bind_side(Side::Edge, &settings.edge, edge_allow.clone())
            .await?;
        let (mut core_io, mut core_sockets, core_listeners, core_server) = shared
            .bind_side(Side::Core, &settings.core_side, core_allow.clone())
            .await?;
        let configured = &settings.trunks;
        let tls_clients: Vec<TlsClientOf> = [(Side::Edge, &edge_tls), (Side::Core, &core_tls)]
            .into_iter()
            .flat_map(|(side, slots)| {
                slots.iter().enumerate().filter_map(move |(trunk, slot)| {
                    Some(TlsClientOf {
                        trunk: configured.get(trunk)?.name.clone(),
                        side,
                        slot: slot.clone()?,
                    })
                })
            })
            .collect();
        edge_io.tls_trunks = edge_tls.iter().map(Option::is_some).collect();
        core_io.tls_trunks = core_tls.iter().map(Option::is_some).collect();
        edge_sockets.tls_clients = edge_tls;
        core_sockets.tls_clients = core_tls;
        let tls_servers: Vec<(Side, Arc<TlsServer>)> =
            [(Side::Edge, edge_server), (Side::Core, core_server)]
                .into_iter()
                .filter_map(|(side, server)| Some((side, server?)))
                .collect();
        for (_, server) in &tls_servers {
            server
                .clone()
                .watch(TLS_FILES_CHECK, cancel.clone(), &tracker);
        }
        let own = [(&edge_io, &edge_listeners), (&core_io, &core_listeners)]
            .into_iter()
            .flat_map(|(io, listeners)| {
                listeners
                    .iter()
                    .map(|listen| (io.advertise.clone(), listen.addr))
            })
            .collect();
        let registration_stop = parent.child_token();
        let registration_tracker = TaskTracker::new();
        let mut registrations = HashMap::new();
        for (index, trunk) in settings.trunks.iter().enumerate() {
            let Some(registration) = &trunk.registration else {
                continue;
            };
            let Some(routed) = trunks.iter().find(|routed| routed.index == index) else {
                continue;
            };
            // The transport the core reaches us on: the trunk's (for sip:/sips: the one
            // RFC 3263 falls back to), else any core-side listener, TLS first.
            let Some((core_transport, port)) = [
                routed.core.endpoint.transport(),
                Transport::Tls,
                Transport::Tcp,
                Transport::Udp,
            ]
            .into_iter()
            .find_map(|transport| Some((transport, core_io.port(transport)?))) else {
                continue;
            };
            let transport = match core_transport {
                Transport::Udp => "",
                Transport::Tcp => ";transport=tcp",
                Transport::Tls => ";transport=tls",
            };
            let contact = format!(
                "sip:{}@{}:{port}{transport};{}={index}",
                registration.contact_user,
                core_io.advertise,
                engine::TRUNK_PARAM
            );
            let status = crate::registration::driver::spawn(
                TrunkRegistration {
                    trunk: trunk.name.clone(),
                    index,
                    auth: trunk.auth,
                    digest: routed.digest.clone(),
                    credentials: routed.credentials.clone(),
                    settings: registration.clone(),
                    contact,
                },
                outgoing_sender.clone(),
                stats.clone(),
                registration_stop.clone(),
                &registration_tracker,
            );
            registrations.insert(trunk.name.clone(), status);
        }
        let router = Router::new(trunks, own, edge_allow, core_allow);
        let metrics = Arc::new(crate::stats::ProxyMetrics::new());
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let engine = Engine::new(
            settings.timers,
            settings.limits,
            router,
            edge_io,
            core_io,
            stats.clone(),
            tokio::time::Instant::now().into_std(),
            rand::random(),
        )
        .with_metrics(metrics.clone())
        .with_drain(draining.clone());
        drop(engine_sender);
        drop(outgoing_sender);
        let driver = Driver::new(engine, edge_sockets, core_sockets, stats.clone());
        tracker.spawn(driver.run(engine_receiver, outgoing_receiver, cancel.clone()));
        let observed = Arc::new(crate::admin::Observed {
            stats: stats.clone(),
            metrics,
            draining: draining.clone(),
            trunks: settings
                .trunks
                .iter()
                .map(|trunk| crate::admin::ObservedTrunk {
                    name: trunk.name.clone(),
                    organization: trunk
                        .credentials
                        .as_ref()
                        .and_then(|credentials| credentials.organization.clone())
                        .unwrap_or_default(),
                    credentials: credentials.get(&trunk.name).cloned(),
                    registration: registrations.get(&trunk.name).cloned(),
                    core: peers
                        .iter()
                        .find(|(name, side, _)| *name == trunk.name && *side == Side::Core)
                        .map(|(_, _, destinations)| destinations.clone()),
                })
                .collect(),
        });
        let admin = match settings.admin {
            Some(addr) => {
                Some(crate::admin::start(addr, observed.clone(), cancel.clone(), &tracker).await?)
            }
            None => None,
        };
        tracing::info!(
            edge = %listeners_text(&edge_listeners),
            core = %listeners_text(&core_listeners),
            trunks = settings.trunks.len(),
            "proxy started"
        );
        Ok(App {
            stats,
            credentials,
            edge_listeners,
            core_listeners,
            registrations,
            observed,
            admin,
            draining,
            tls_servers,
            tls_clients,
            peers,
            cancel,
            tracker,
            registration_stop,
            registration_tracker,
        })
    }

    /// The bound address of the first listener of `side` with `transport`.
    pub fn listener(&self, side: Side, transport: Transport) -> Option<SocketAddr> {
        let listeners = match side {
            Side::Edge => &self.edge_listeners,
            Side::Core => &self.core_listeners,
        };
        listeners
            .iter()
            .find(|listen| listen.transport == transport)
            .map(|listen| listen.addr)
    }

    /// Takes what can change while running from `settings` (a re-read configuration,
    /// SIGHUP): the secret material of each trunk's credentials (an OAuth2 client secret
    /// rotated in its file), each trunk's TLS settings (CA bundle, client certificate and
    /// key, for new connections), and the certificate and key of the TLS listeners.
    /// Trunks are matched by name. Returns the
    /// trunks whose secret changed. Everything else (listeners, trunks, timers, limits)
    /// takes effect at the next start.
    pub fn reload(&self, settings: &Settings) -> Vec<String> {
        for client in &self.tls_clients {
            let Some(trunk) = settings
                .trunks
                .iter()
                .find(|trunk| trunk.name == client.trunk)
            else {
                continue;
            };
            let endpoint = match client.side {
                Side::Edge => &trunk.edge,
                Side::Core => &trunk.core,
            };
            match TlsClient::new(&trunk.tls, &endpoint.host) {
                Ok(fresh) => {
                    client.slot.store(Arc::new(fresh));
                    tracing::info!(trunk = %trunk.name, side = %client.side, "TLS settings re-read; new connections use them");
                }
                Err(error) => {
                    tracing::warn!(trunk = %trunk.name, side = %client.side, error = %error, "cannot re-read the trunk's TLS settings; keeping the old ones")
                }
            }
        }
        for (side, server) in &self.tls_servers {
            let files = match side {
                Side::Edge => settings.edge.tls.as_ref(),
                Side::Core => settings.core_side.tls.as_ref(),
            };
            match server.reload(files) {
                Ok(()) => tracing::info!(%side, "TLS listener certificate re-read"),
                Err(error) => {
                    tracing::warn!(%side, error = %error, "cannot re-read the TLS listener certificate; keeping the old one")
                }
            }
        }
        settings
            .trunks
            .iter()
            .filter(|trunk| {
                let manager = self.credentials.get(&trunk.name);
                match (manager, &trunk.credentials) {
                    (Some(manager), Some(credentials)) => manager.reload(credentials),
                    _ => false,
                }
            })
            .map(|trunk| trunk.name.clone())
            .collect()
    }

    /// Graceful shutdown's first half: new dialogs get 503 with `Retry-After` from now
    /// on, and this waits until no transaction waits for its final response and no call
    /// is in progress, at most `deadline`. Returns false when something was still in
    /// progress at the deadline. [`App::shutdown`] does the rest.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let until = tokio::time::Instant::now() + deadline;
        // The engine publishes its counts once a second: wait for one beat after the
        // switch before trusting them.
        tokio::time::sleep(Duration::from_millis(1100).min(deadline)).await;
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        loop {
            let metrics = &self.observed.metrics;
            let (pending, calls) = (
                metrics.pending_transactions.load(relaxed),
                metrics.calls.load(relaxed),
            );
            if pending == 0 && calls == 0 {
                tracing::info!("drained: no call or transaction in progress");
                return true;
            }
            if tokio::time::Instant::now() >= until {
                tracing::warn!(
                    pending,
                    calls,
                    "drain deadline reached with work in progress"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every task and waits for them, at most `deadline`. Returns false when some
    /// task was still running at the deadline.
    pub async fn shutdown(self, deadline: Duration) -> bool {
        // Registrations first, while the engine still runs: they unregister. They get
        // half the deadline at most.
        let started = tokio::time::Instant::now();
        self.registration_stop.cancel();
        self.registration_tracker.close();
        let unregistered = tokio::time::timeout(deadline / 2, self.registration_tracker.wait())
            .await
            .is_ok();
        if !unregistered {
            tracing::warn!("registrations did not finish unregistering in time");
        }
        let deadline = deadline.saturating_sub(started.elapsed());
        self.cancel.cancel();
        self.tracker.close();
        let stopped = tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok();
        // A registration still unregistering at the deadline counts as a late task; the
        // cancelled engine ends it soon after.
        stopped && unregistered
    }
}

fn listeners_text(listeners: &[Listen]) -> String {
    listeners
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the listeners of both sides share.
struct Shared<'a> {
    engine: mpsc::Sender<crate::transport::TransportEvent>,
    stats: Arc<Stats>,
    settings: &'a Settings,
    tracker: &'a TaskTracker,
    cancel: &'a CancellationToken,
}

impl Shared<'_> {
    async fn bind_side(
        &self,
        side: Side,
        side_settings: &SideSettings,
        allow: Arc<AllowList>,
    ) -> Result<
        (
            SideAddresses,
            SideSockets,
            Vec<Listen>,
            Option<Arc<TlsServer>>,
        ),
        StartError,
    > {
        let limits = &self.settings.limits;
        let receive = ReceiveContext {
            side,
            allow,
            engine: self.engine.clone(),
            stats: self.stats.clone(),
            max_message_size: limits.max_message_size,
        };
        let tcp_context = TcpContext {
            receive: receive.clone(),
            idle_timeout: limits.tcp_idle_timeout,
            connect_timeout: limits.tcp_connect_timeout,
            write_timeout: limits.tcp_write_timeout,
            max_connections: limits.tcp_max_connections,
            open_connections: Arc::new(AtomicUsize::new(0)),
            next_id: Arc::new(AtomicU64::new(1)),
            tracker: self.tracker.clone(),
            cancel: self.cancel.clone(),
            tls_failures: Arc::default(),
        };
        let (tracker, cancel, settings) = (self.tracker, self.cancel, side_settings);
        let mut listeners = Vec::new();
        let mut udp_sockets = Vec::new();
        let mut udp_locals = Vec::new();
        let mut tcp_port = None;
        let mut tls_port = None;
        let tls_server = settings
            .tls
            .as_ref()
            .map(|files| TlsServer::load(files).map(Arc::new))
            .transpose()
            .map_err(|source| StartError::ListenerTls { side, source })?;
        for listen in &settings.listen {
            match listen.transport {
                Transport::Udp => {
                    let bind_error = |source| udp::UdpError::Bind {
                        addr: listen.addr,
                        source,
                    };
                    let socket = if limits.udp_threads > 0 {
                        // Read by the driver's threads, which also read the socket's
                        // ICMP errors.
                        let socket = udp::bind_threaded(listen.addr, limits.udp_buffer)?;
                        if side == Side::Core {
                            udp::report_unreachable(&socket);
                        }
                        udp::Listener::Threaded(socket)
                    } else {
                        let socket = udp::bind(listen.addr, limits.udp_buffer).await?;
                        if side == Side::Core && udp::report_unreachable(&socket) {
                            tracker.spawn(udp::watch_unreachable(
                                socket.clone(),
                                receive.clone(),
                                cancel.clone(),
                            ));
                        }
                        udp::Listener::Polled(socket)
                    };
                    let local = socket2::SockRef::from(&socket)
                        .local_addr()
                        .map_err(bind_error)?
                        .as_socket()
                        .ok_or_else(|| bind_error(std::io::Error::other("not an IP socket")))?;
                    udp_sockets.push(socket);
                    udp_locals.push(local);
                    listeners.push(Listen {
                        transport: Transport::Udp,
                        addr: local,
                    });
                }
                Transport::Tcp | Transport::Tls => {
                    let listener = tcp::bind(listen.addr).await?;
                    let local = listener
                        .local_addr()
                        .map_err(|source| tcp::TcpError::Bind {
                            addr: listen.addr,
                            source,
                        })?;
                    let tls = match listen.transport {
                        Transport::Tls => {
                            let Some(server) = tls_server.clone() else {
                                // validate() requires the certificate with the listener.
                                return Err(StartError::ListenerTls {
                                    side,
                                    source: TlsError::Invalid(
                                        "a tls: listener needs a certificate".into(),
                                    ),
                                });
                            };
                            tls_port.get_or_insert(local.port());
                            Some(server)
                        }
                        _ => {
                            tcp_port.get_or_insert(local.port());
                            None
                        }
                    };
                    tracker.spawn(tcp::accept_loop(listener, tcp_context.clone(), tls));
                    listeners.push(Listen {
                        transport: listen.transport,
                        addr: local,
                    });
                }
            }
        }
        let advertise = match &settings.advertise {
            Some(host) => host.clone(),
            None => listeners
                .first()
                .map(|listen| uri_host(listen.addr.ip()))
                .unwrap_or_default(),
        };
        let addresses = SideAddresses {
            side,
            advertise,
            udp_locals: udp_locals.clone(),
            tcp_port,
            tls_port,
            tls_trunks: Vec::new(),
            connections: HashMap::new(),
        };
        let sockets = SideSockets {
            side,
            udp: udp_sockets,
            udp_locals,
            udp_threads: limits.udp_threads,
            receive,
            tcp: tcp_context,
            tls_clients: Vec::new(),
            connections: HashMap::new(),
        };
        Ok((addresses, sockets, listeners, tls_server))
    }
}

/// An IP address as a URI host (IPv6 in brackets).
fn uri_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// A trunk's TLS client settings toward its peer on one side.
struct TlsClientOf {
    trunk: String,
    side: Side,
    slot: TlsClientSlot,
}

/// How often the TLS listeners' certificate files are looked at for changes.
const TLS_FILES_CHECK: Duration = Duration::from_secs(2);

/// Resolves every peer that is a name, all at once and within a bound, then keeps each
/// resolved in the background. A peer that does not resolve now does not stop the
/// start: its requests get 503 until it does, and its task keeps trying.
async fn resolve_peers(
    resolver: &Arc<Resolver>,
    peers: &[(String, Side, Arc<Destinations>)],
    (edge, core): (&[Transport], &[Transport]),
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) {
    let settings = resolver.settings().clone();
    let limit = settings.timeout * 4;
    let mut lookups = tokio::task::JoinSet::new();
    for (trunk, side, destinations) in peers {
        if destinations.is_static() {
            continue;
        }
        let supported = match side {
            Side::Edge => edge.to_vec(),
            Side::Core => core.to_vec(),
        };
        let (resolver, destinations, trunk) =
            (resolver.clone(), destinations.clone(), trunk.clone());
        lookups.spawn(async move {
            let ttl = dns_resolve::resolve_once(&resolver, &destinations, &supported, limit).await;
            if ttl.is_none() {
                tracing::warn!(%trunk, peer = %destinations.endpoint, "starting without an address for this peer; retrying in the background");
            }
            (destinations, supported, ttl)
        });
    }
    while let Some(done) = lookups.join_next().await {
        let Ok((destinations, supported, ttl)) = done else {
            continue;
        };
        dns_resolve::spawn_refresh(
            resolver.clone(),
            destinations,
            supported,
            ttl.unwrap_or(settings.retry),
            cancel.clone(),
            tracker,
        );
    }
}
