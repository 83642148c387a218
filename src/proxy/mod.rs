//! The proxy as a whole: [`App::start`] resolves the trunks, binds every listener, and
//! spawns the receive tasks and the engine under one cancellation token and task tracker;
//! [`App::shutdown`] cancels them and waits, within a deadline.

mod calls;
mod engine;
mod request;
mod resend;
pub mod routing;

pub use engine::{Destination, Engine, OWN_BRANCH_PREFIX, TRUNK_PARAM};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Listen, Settings, Side as SideSettings, Transport};
use crate::registration::{RegistrationStatus, TrunkRegistration};
use crate::sip::via::strip_brackets;
use crate::stats::Stats;
use crate::transport::tcp::{self, TcpContext};
use crate::transport::{udp, AllowList, ReceiveContext, Side};
use engine::SideIo;
use routing::{resolve_endpoint, RoutedTrunk, Router};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Udp(#[from] udp::UdpError),
    #[error(transparent)]
    Tcp(#[from] tcp::TcpError),
    #[error("trunk {trunk:?}: cannot resolve {host:?}: {reason}")]
    Resolve {
        trunk: String,
        host: String,
        reason: String,
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
        let names = resolve_names(&settings).await?;
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
        let trunks: Vec<RoutedTrunk> = settings
            .trunks
            .iter()
            .enumerate()
            .filter_map(|(index, trunk)| {
                Some(RoutedTrunk {
                    index,
                    name: trunk.name.as_str().into(),
                    auth: trunk.auth,
                    digest_realm: trunk.digest_realm.clone(),
                    credentials: credentials.get(&trunk.name).cloned(),
                    sources: trunk.sources.clone(),
                    domain: trunk.domain.clone(),
                    port: trunk.port,
                    edge: resolve_endpoint(&trunk.edge, &names)?,
                    core: resolve_endpoint(&trunk.core, &names)?,
                })
            })
            .collect();
        let mut edge_allow = settings.edge.allow.clone();
        let mut core_allow = settings.core_side.allow.clone();
        for trunk in &trunks {
            edge_allow.push(IpNet::from(trunk.edge.addr.ip()));
            edge_allow.extend(trunk.sources.iter().copied());
            core_allow.push(IpNet::from(trunk.core.addr.ip()));
        }
        let edge_allow = Arc::new(AllowList::new(edge_allow));
        let core_allow = Arc::new(AllowList::new(core_allow));

        let (engine_sender, engine_receiver) = mpsc::channel(settings.limits.queue_capacity);
        let shared = Shared {
            engine: engine_sender.clone(),
            stats: stats.clone(),
            settings: &settings,
            tracker: &tracker,
            cancel: &cancel,
        };
        let (edge_io, edge_listeners) = shared
            .bind_side(Side::Edge, &settings.edge, edge_allow.clone())
            .await?;
        let (core_io, core_listeners) = shared
            .bind_side(Side::Core, &settings.core_side, core_allow.clone())
            .await?;
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
            let Some(port) = core_io.port(routed.core.transport) else {
                tracing::warn!(trunk = %trunk.name, transport = %routed.core.transport, "no core-side listener for the trunk's transport; not registering");
                continue;
            };
            let transport = match routed.core.transport {
                Transport::Udp => "",
                Transport::Tcp => ";transport=tcp",
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
                    digest_realm: trunk.digest_realm.clone(),
                    credentials: routed.credentials.clone(),
                    settings: registration.clone(),
                    contact,
                },
                engine_sender.clone(),
                stats.clone(),
                registration_stop.clone(),
                &registration_tracker,
            );
            registrations.insert(trunk.name.clone(), status);
        }
        let router = Router::new(trunks, own, names, edge_allow, core_allow);
        let metrics = Arc::new(crate::stats::ProxyMetrics::new());
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let engine = Engine::new(
            settings.timers,
            settings.limits,
            router,
            edge_io,
            core_io,
            stats.clone(),
            engine_sender.downgrade(),
        )
        .with_metrics(metrics.clone())
        .with_drain(draining.clone());
        drop(engine_sender);
        tracker.spawn(engine.run(engine_receiver, cancel.clone()));
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
    /// SIGHUP): today the secret material of each trunk's credentials (an OAuth2 client
    /// secret rotated in its file). Returns the trunks whose secret changed. Everything
    /// else (listeners, trunks, timers, limits) takes effect at the next start.
    pub fn reload(&self, settings: &Settings) -> Vec<String> {
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
    ) -> Result<(SideIo, Vec<Listen>), StartError> {
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
        };
        let (tracker, cancel, settings) = (self.tracker, self.cancel, side_settings);
        let mut listeners = Vec::new();
        let mut udp_sockets = Vec::new();
        let mut udp_locals = Vec::new();
        let mut tcp_port = None;
        for listen in &settings.listen {
            match listen.transport {
                Transport::Udp => {
                    let socket = udp::bind(listen.addr).await?;
                    let local = socket.local_addr().map_err(|source| udp::UdpError::Bind {
                        addr: listen.addr,
                        source,
                    })?;
                    tracker.spawn(udp::receive_loop(
                        socket.clone(),
                        receive.clone(),
                        cancel.clone(),
                    ));
                    udp_sockets.push(socket);
                    udp_locals.push(local);
                    listeners.push(Listen {
                        transport: Transport::Udp,
                        addr: local,
                    });
                }
                Transport::Tcp => {
                    let listener = tcp::bind(listen.addr).await?;
                    let local = listener
                        .local_addr()
                        .map_err(|source| tcp::TcpError::Bind {
                            addr: listen.addr,
                            source,
                        })?;
                    tcp_port.get_or_insert(local.port());
                    tracker.spawn(tcp::accept_loop(listener, tcp_context.clone()));
                    listeners.push(Listen {
                        transport: Transport::Tcp,
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
        let io = SideIo {
            side,
            advertise,
            udp: udp_sockets,
            udp_locals,
            tcp_port,
            tcp: tcp_context,
            connections: HashMap::new(),
        };
        Ok((io, listeners))
    }
}

/// An IP address as a URI host (IPv6 in brackets).
fn uri_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Resolves every trunk host name once, at start.
async fn resolve_names(settings: &Settings) -> Result<HashMap<String, IpAddr>, StartError> {
    let mut names = HashMap::new();
    for trunk in &settings.trunks {
        for endpoint in [&trunk.edge, &trunk.core] {
            let host = strip_brackets(&endpoint.host);
            if host.parse::<IpAddr>().is_ok() || names.contains_key(&host.to_ascii_lowercase()) {
                continue;
            }
            let resolve_error = |reason: String| StartError::Resolve {
                trunk: trunk.name.clone(),
                host: host.to_string(),
                reason,
            };
            let mut addresses = tokio::net::lookup_host(endpoint.host_port())
                .await
                .map_err(|error| resolve_error(error.to_string()))?;
            let address = addresses
                .next()
                .ok_or_else(|| resolve_error("no addresses".into()))?;
            names.insert(host.to_ascii_lowercase(), address.ip());
        }
    }
    Ok(names)
}
