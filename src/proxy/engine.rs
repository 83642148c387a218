//! The engine task: owns the transaction tables, the connection table (TCP and TLS) and
//! the timer heap, and is the only place that mutates them. It receives parsed messages
//! from the transports, drives the pure transactions of [`crate::sip::transaction`] with
//! the time of tokio's clock (so tests can pause it), and sends what they emit.
//!
//! Request handling (RFC 3261 §16) is in [`super::request`]; this file holds the loop,
//! the bookkeeping, response relaying and sending.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use bytes::Bytes;
use rsip::{Request, Response, SipMessage};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::routing::Router;
use crate::config::{Limits, Transport};
use crate::sip::message;
use crate::sip::transaction::{
    ClientEvent, ClientKey, ClientTransaction, ServerEvent, ServerKey, ServerTransaction,
    TimerConfig,
};
use crate::stats::Stats;
use crate::transport::tcp::TcpContext;
use crate::transport::tls::TlsClient;
use crate::transport::{ConnectionId, Inbound, Side, TransportEvent};

/// The prefix of every branch this proxy creates: the RFC 3261 cookie and a marker that
/// lets responses to our own requests be recognised.
pub const OWN_BRANCH_PREFIX: &str = "z9hG4bKbsc";

/// The span every event of one transaction is logged in (STYLE rule 6). Disabled spans
/// cost nothing; at debug level each line names the call, branch, method and trunk.
pub fn transaction_span(
    request: &Request,
    branch: &str,
    parent: Option<&tracing::Span>,
) -> tracing::Span {
    let call_id = message::call_id(&request.headers).unwrap_or("");
    let span = match parent {
        Some(parent) => {
            tracing::debug_span!(parent: parent, "client", branch = %branch, method = %request.method)
        }
        None => tracing::debug_span!(
            "transaction",
            call_id = %call_id,
            branch = %branch,
            method = %request.method,
            trunk = tracing::field::Empty
        ),
    };
    span
}

/// The Record-Route URI parameter that carries the trunk of a dialog.
pub const TRUNK_PARAM: &str = "bsct";

/// Makes and recognises this proxy's branches: the prefix, a random nonce and a keyed
/// tag over the nonce and the request's Call-ID (SipHash with a key drawn at start), so a
/// response whose top Via claims to be ours can be checked without a transaction: a
/// stray 2xx is forwarded only with a branch this proxy made for that very call.
pub struct Branches {
    key: std::collections::hash_map::RandomState,
}

impl Branches {
    pub fn new() -> Self {
        Self {
            key: std::collections::hash_map::RandomState::new(),
        }
    }

    /// A new branch for a request of call `call_id`.
    pub fn next(&self, call_id: &str) -> String {
        let nonce = rand::random::<u64>();
        format!(
            "{OWN_BRANCH_PREFIX}{nonce:016x}{:08x}",
            self.tag(nonce, call_id)
        )
    }

    /// Whether `branch` was made by [`Branches::next`] of this instance for `call_id`.
    pub fn is_own(&self, branch: &str, call_id: &str) -> bool {
        let Some(rest) = branch.strip_prefix(OWN_BRANCH_PREFIX) else {
            return false;
        };
        if rest.len() != 24 || !rest.is_ascii() {
            return false;
        }
        let (nonce, tag) = rest.split_at(16);
        match (u64::from_str_radix(nonce, 16), u32::from_str_radix(tag, 16)) {
            (Ok(nonce), Ok(tag)) => self.tag(nonce, call_id) == tag,
            _ => false,
        }
    }

    fn tag(&self, nonce: u64, call_id: &str) -> u32 {
        use std::hash::BuildHasher;
        // The high half of a keyed 64-bit hash.
        (self.key.hash_one((nonce, call_id)) >> 32) as u32
    }
}

impl Default for Branches {
    fn default() -> Self {
        Self::new()
    }
}

/// Where to send: a side, a transport and an address, for UDP the local socket to send
/// from (the one the request arrived on, for responses), and for TLS the trunk whose
/// peer it is (whose name and CAs a new connection checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    pub side: Side,
    pub transport: Transport,
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    pub trunk: Option<usize>,
}

/// How one trunk's TLS connections to one peer are made, swapped on SIGHUP (new
/// connections use the new settings, open ones keep theirs).
pub type TlsClientSlot = Arc<arc_swap::ArcSwap<TlsClient>>;

/// A connection's transport, peer, and for a TLS connection the sidecar opened, the
/// trunk whose identity it carries.
pub type ConnectionKey = (Transport, SocketAddr, Option<usize>);

/// The sockets of one side and what it advertises.
pub struct SideIo {
    pub side: Side,
    /// Host written into Via and Record-Route.
    pub advertise: String,
    pub udp: Vec<Arc<UdpSocket>>,
    pub udp_locals: Vec<SocketAddr>,
    pub tcp_port: Option<u16>,
    pub tls_port: Option<u16>,
    pub tcp: TcpContext,
    /// How TLS connections to each trunk's peer on this side are made, by trunk index.
    pub tls_clients: Vec<Option<TlsClientSlot>>,
    pub connections: HashMap<ConnectionKey, (ConnectionId, mpsc::Sender<Bytes>)>,
}

impl SideIo {
    /// The port we listen on for `transport` on this side.
    pub fn port(&self, transport: Transport) -> Option<u16> {
        match transport {
            Transport::Udp => self.udp_locals.first().map(SocketAddr::port),
            Transport::Tcp => self.tcp_port,
            Transport::Tls => self.tls_port,
        }
    }

    /// How trunk `trunk`'s TLS connections on this side are made now, if it has TLS.
    pub fn tls_client(&self, trunk: usize) -> Option<Arc<TlsClient>> {
        self.tls_clients
            .get(trunk)
            .and_then(Option::as_ref)
            .map(|slot| slot.load_full())
    }

    /// Whether a UDP socket of this side can send to `addr` (one of its address family).
    pub fn sends_to(&self, addr: SocketAddr) -> bool {
        self.udp_locals
            .iter()
            .any(|local| local.is_ipv4() == addr.is_ipv4())
    }

    /// Whether a live connection from `addr` over `transport` exists (one the peer
    /// opened, or a TCP one).
    pub(super) fn connected(&self, transport: Transport, addr: SocketAddr) -> bool {
        self.connections
            .get(&(transport, addr, None))
            .is_some_and(|(_, sender)| !sender.is_closed())
    }

    /// `sip:host:port;lr` (with `transport=tcp` or `transport=tls`) for Record-Route, with the
    /// trunk's index in a [`TRUNK_PARAM`] parameter when the trunk is known, so that
    /// in-dialog requests, which come back with this URI in their Route, find it again.
    pub fn record_route_uri(&self, transport: Transport, trunk: Option<usize>) -> Option<String> {
        let port = self.port(transport)?;
        let mut uri = match transport {
            Transport::Udp => format!("sip:{}:{port};lr", self.advertise),
            Transport::Tcp => format!("sip:{}:{port};transport=tcp;lr", self.advertise),
            Transport::Tls => format!("sip:{}:{port};transport=tls;lr", self.advertise),
        };
        if let Some(trunk) = trunk {
            uri.push_str(&format!(";{TRUNK_PARAM}={trunk}"));
        }
        Some(uri)
    }

    fn udp_socket(&self, local: Option<SocketAddr>, to: SocketAddr) -> Option<&Arc<UdpSocket>> {
        let by_local = local.and_then(|local| {
            self.udp_locals
                .iter()
                .position(|candidate| *candidate == local)
        });
        let by_family = || {
            self.udp_locals
                .iter()
                .position(|candidate| candidate.is_ipv4() == to.is_ipv4())
        };
        by_local
            .or_else(by_family)
            .or((!self.udp.is_empty()).then_some(0))
            .and_then(|index| self.udp.get(index))
    }
}

pub(super) struct ServerEntry {
    pub key: ServerKey,
    pub transaction: ServerTransaction,
    pub reply_to: Destination,
    /// The request as received (with `received`/`rport` noted), for local responses.
    pub request: Request,
    pub to_tag: String,
    /// Over TCP, where to connect if the request's connection is gone (§18.2.2:
    /// `received` with the sent-by port).
    pub reconnect: Option<SocketAddr>,
    pub client: Option<u64>,
    /// A rejected request waiting for a fresh credential to be re-sent.
    pub pending_resend: Option<Box<super::resend::PendingResend>>,
    /// An in-dialog request waiting for its trunk to hold a valid credential.
    pub pending_forward: Option<Box<super::request::Forward>>,
    /// The Edge cancelled this INVITE (matters while a re-send is pending).
    pub cancel_requested: bool,
    /// When the request arrived: every wait for a credential counts from here.
    pub arrived: StdInstant,
    pub span: tracing::Span,
    scheduled: Option<StdInstant>,
}

pub(super) struct ClientEntry {
    pub key: ClientKey,
    pub transaction: ClientTransaction,
    pub destination: Destination,
    pub server: Option<u64>,
    /// A CANCEL arrived before any provisional response; send it on the first one.
    pub cancel_pending: bool,
    /// A CANCEL went out for this INVITE (from the Edge's CANCEL or Timer C).
    pub cancel_sent: bool,
    /// What is needed to re-send the request once with a fresh credential, while that is
    /// still possible (bearer trunks toward the core; a re-send has none).
    pub resend: Option<Box<super::resend::ResendInfo>>,
    /// The trunk credential the request carries, for telling the credential manager
    /// when the core accepted it (set for re-sends too, which keep no `resend`).
    pub carried: Option<Carried>,
    /// For a request the sidecar originated: where its final response goes.
    pub local: Option<tokio::sync::oneshot::Sender<Response>>,
    /// While the request may still move to another core host (RFC 3263 §4.3).
    pub failover: Option<Box<Failover>>,
    /// The request moved to another host: this transaction only waits for a late
    /// answer, to cancel or hang up what that host started (see `failover`).
    pub abandoned: bool,
    pub span: tracing::Span,
    scheduled: Option<StdInstant>,
}

/// What a request to one of its trunk's core hosts keeps to be tried on the next one.
pub(super) struct Failover {
    pub trunk: usize,
    /// Hosts tried so far, the current one last.
    pub tried: Vec<SocketAddr>,
    /// The request as forwarded (our Via on top); the next try gets a new branch.
    pub request: Request,
    /// The transaction's budget (64·T1 from the first try): no try starts after it,
    /// and none runs past it.
    pub budget_end: StdInstant,
}

/// Which trunk credential a client transaction's request carries, and since when.
#[derive(Debug, Clone, Copy)]
pub(super) struct Carried {
    pub trunk: usize,
    pub generation: u64,
    pub sent_at: StdInstant,
    /// Whether the core checks requests like this one, so that its answer tells whether
    /// it took the credential (`credentials::verdict::checked_by_core`).
    pub checked: bool,
    /// The request is a re-send after a refusal.
    pub resent: bool,
}

impl Carried {
    pub fn new(trunk: usize, generation: u64, sent_at: StdInstant, request: &Request) -> Self {
        Self {
            trunk,
            generation,
            sent_at,
            checked: crate::credentials::verdict::checked_by_core(
                &request.method,
                message::in_dialog(&request.headers),
            ),
            resent: false,
        }
    }
}

pub(super) enum Entry {
    Server(ServerEntry),
    Client(ClientEntry),
}

pub struct Engine {
    pub(super) timers: TimerConfig,
    pub(super) limits: Limits,
    pub(super) router: Router,
    pub(super) edge: SideIo,
    pub(super) core: SideIo,
    pub(super) stats: Arc<Stats>,
    pub(super) entries: HashMap<u64, Entry>,
    pub(super) server_index: HashMap<ServerKey, u64>,
    pub(super) client_index: HashMap<ClientKey, u64>,
    timer_heap: BinaryHeap<Reverse<(StdInstant, u64)>>,
    next_id: u64,
    /// CSeq offsets of dialogs whose requests were re-sent (DESIGN.md item 6).
    pub(super) dialogs: crate::sip::dialog::DialogTable,
    /// The Digest state (challenges the core sent) of each `digest` trunk, by index.
    pub(super) digest: HashMap<usize, crate::sip::digest::DigestClient>,
    last_dialog_sweep: StdInstant,
    /// A way back into this engine's own queue, for work finished elsewhere (a forced
    /// credential refresh). Weak, so the queue still closes when the transports stop.
    pub(super) internal: mpsc::WeakSender<TransportEvent>,
    pub(super) branches: Branches,
    pub(super) metrics: Arc<crate::stats::ProxyMetrics>,
    /// Calls in progress, for graceful shutdown and the metrics.
    pub(super) calls: super::calls::Calls,
    /// Set when shutdown begins: new dialogs are refused with 503 and `Retry-After`.
    pub(super) draining: Arc<std::sync::atomic::AtomicBool>,
    /// Core hosts that failed recently: tried last.
    pub(super) health: crate::dns::HostHealth,
    /// Branches of requests that moved to another host, for a 2xx that comes after
    /// their transaction ended: never forwarded.
    pub(super) abandoned: super::failover::Abandoned,
    beats: u64,
}

/// What client transaction `client`'s request carries, if it carries a credential.
fn entry_carried(entries: &HashMap<u64, Entry>, client: u64) -> Option<Carried> {
    match entries.get(&client) {
        Some(Entry::Client(entry)) => entry.carried,
        _ => None,
    }
}

/// The engine's clock: tokio's, so `tokio::time::pause` drives it in tests.
pub fn now() -> StdInstant {
    tokio::time::Instant::now().into_std()
}

impl Engine {
    pub fn new(
        timers: TimerConfig,
        limits: Limits,
        router: Router,
        edge: SideIo,
        core: SideIo,
        stats: Arc<Stats>,
        internal: mpsc::WeakSender<TransportEvent>,
    ) -> Self {
        let dialogs = crate::sip::dialog::DialogTable::new(
            limits.max_transactions,
            std::time::Duration::from_secs(12 * 3600),
            timers.transaction_timeout(),
        );
        Self {
            timers,
            limits,
            router,
            edge,
            core,
            stats,
            entries: HashMap::new(),
            server_index: HashMap::new(),
            client_index: HashMap::new(),
            timer_heap: BinaryHeap::new(),
            next_id: 0,
            dialogs,
            digest: HashMap::new(),
            last_dialog_sweep: now(),
            internal,
            branches: Branches::new(),
            metrics: Arc::default(),
            calls: super::calls::Calls::new(
                limits.max_transactions,
                std::time::Duration::from_secs(12 * 3600),
            ),
            draining: Arc::default(),
            health: crate::dns::HostHealth::default(),
            abandoned: super::failover::Abandoned::default(),
            beats: 0,
        }
    }

    /// The engine refusing new dialogs once `draining` is set.
    pub fn with_drain(mut self, draining: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.draining = draining;
        self
    }

    /// The engine publishing its heartbeat, table sizes and call-setup times into
    /// `metrics` (for the admin endpoint).
    pub fn with_metrics(mut self, metrics: Arc<crate::stats::ProxyMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Runs until cancelled or every transport is gone.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<TransportEvent>,
        cancel: CancellationToken,
    ) {
        // The heartbeat `/healthz` reads, and the table sizes the metrics show.
        let mut heartbeat = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            let next_timer = self.timer_heap.peek().map(|Reverse((at, _))| *at);
            let sleep = async {
                match next_timer {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => self.handle_event(event),
                    None => break,
                },
                _ = sleep => self.fire_timers(now()),
                _ = heartbeat.tick() => self.beat(),
            }
        }
        tracing::debug!(transactions = self.entries.len(), "engine stopped");
    }

    /// Publishes the heartbeat and the sizes of the tables.
    fn beat(&mut self) {
        self.beats += 1;
        // Calls whose BYE never came are forgotten after 12 h; looked at once a minute.
        if self.beats % 60 == 0 {
            self.calls.expire(now());
            self.health.expire(now());
        }
        let pending = self
            .entries
            .values()
            .filter(|entry| match entry {
                Entry::Server(server) => !server.transaction.is_final(),
                Entry::Client(client) => !client.transaction.is_final(),
            })
            .count();
        self.metrics.beat(tokio::time::Instant::now());
        let size = |count: usize| u64::try_from(count).unwrap_or(u64::MAX);
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        self.metrics
            .transactions
            .store(size(self.entries.len()), relaxed);
        self.metrics
            .dialogs_translated
            .store(size(self.dialogs.len()), relaxed);
        self.metrics
            .pending_transactions
            .store(size(pending), relaxed);
        self.metrics.calls.store(size(self.calls.len()), relaxed);
    }

    pub fn handle_event(&mut self, event: TransportEvent) {
        match event {
            TransportEvent::Message(inbound) => self.handle_message(inbound),
            TransportEvent::CredentialRefreshed { server, credential } => {
                self.finish_resend(server, credential)
            }
            TransportEvent::CredentialReady { server, credential } => {
                self.finish_forward(server, credential)
            }
            TransportEvent::Originate {
                trunk,
                request,
                reply,
            } => self.originate(trunk, *request, reply),
            TransportEvent::Unreachable { side, addr } => {
                self.fail_transactions_to(side, (Transport::Udp, addr, None));
            }
            TransportEvent::ConnectionOpened {
                side,
                transport,
                peer,
                owner,
                id,
                sender,
            } => {
                self.side_mut(side)
                    .connections
                    .insert((transport, peer, owner), (id, sender));
            }
            TransportEvent::ConnectionClosed {
                side,
                transport,
                peer,
                owner,
                id,
                connect_failed,
            } => {
                let table = &mut self.side_mut(side).connections;
                let key = (transport, peer, owner);
                if table.get(&key).is_some_and(|(current, _)| *current == id) {
                    table.remove(&key);
                }
                if connect_failed {
                    self.fail_transactions_to(side, key);
                }
            }
        }
    }

    fn handle_message(&mut self, inbound: Inbound) {
        let Inbound {
            side,
            transport,
            local,
            peer,
            message,
        } = inbound;
        let source = super::request::Source {
            side,
            transport,
            local,
            peer,
        };
        match message {
            SipMessage::Request(request) => self.handle_request(source, request),
            SipMessage::Response(response) => self.handle_response(source, response),
        }
    }

    pub(super) fn side(&self, side: Side) -> &SideIo {
        match side {
            Side::Edge => &self.edge,
            Side::Core => &self.core,
        }
    }

    fn side_mut(&mut self, side: Side) -> &mut SideIo {
        match side {
            Side::Edge => &mut self.edge,
            Side::Core => &mut self.core,
        }
    }

    /// Sends bytes. Never waits: a full queue or a socket error drops and counts.
    pub(super) fn send(&mut self, destination: Destination, bytes: Bytes) {
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(
                side = %destination.side,
                peer = %destination.addr,
                transport = %destination.transport,
                message = %message::redacted(&bytes),
                "sending"
            );
        }
        match destination.transport {
            Transport::Udp => {
                let Some(socket) = self
                    .side(destination.side)
                    .udp_socket(destination.local, destination.addr)
                else {
                    Stats::bump(&self.stats.send_failed);
                    tracing::warn!(side = %destination.side, "no udp socket on this side to send from");
                    return;
                };
                // tokio refuses with WouldBlock until its reactor has seen the socket
                // writable once, so the very first datagram of a fresh socket (a REGISTER
                // at start) would be lost; the kernel takes it all the same.
                let sent = match socket.try_send_to(&bytes, destination.addr) {
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        socket2::SockRef::from(socket.as_ref())
                            .send_to(&bytes, &destination.addr.into())
                    }
                    other => other,
                };
                if let Err(error) = sent {
                    Stats::bump(&self.stats.send_failed);
                    tracing::debug!(to = %destination.addr, error = %error, "udp send failed");
                }
            }
            Transport::Tcp | Transport::Tls => {
                let io = self.side_mut(destination.side);
                let owner = match destination.transport {
                    Transport::Tls => destination.trunk,
                    _ => None,
                };
                let key = (destination.transport, destination.addr, owner);
                // A connection of the trunk's own, else one the peer opened to us.
                let existing = io.connections.get(&key).or_else(|| {
                    io.connections
                        .get(&(destination.transport, destination.addr, None))
                });
                let sender = match existing {
                    Some((_, sender)) if !sender.is_closed() => sender.clone(),
                    _ => {
                        let tls = match destination.transport {
                            Transport::Tls => {
                                let client = destination
                                    .trunk
                                    .and_then(|trunk| Some((trunk, io.tls_client(trunk)?)));
                                let Some(client) = client else {
                                    Stats::bump(&self.stats.send_failed);
                                    tracing::warn!(side = %destination.side, to = %destination.addr, "no TLS connection and no trunk to open one for; not sent");
                                    return;
                                };
                                Some(client)
                            }
                            _ => None,
                        };
                        let (id, sender) = io.tcp.connect(destination.addr, tls);
                        io.connections.insert(key, (id, sender.clone()));
                        sender
                    }
                };
                if let Err(error) = sender.try_send(bytes) {
                    Stats::bump(&self.stats.send_failed);
                    tracing::debug!(to = %destination.addr, error = %error, "tcp queue refused message");
                }
            }
        }
    }

    /// Puts this proxy's Via (a new branch, `rport`) on top of a request leaving `side`
    /// over `transport`; its branch, or `None` when that side has no listener for it.
    pub(super) fn push_own_via(
        &mut self,
        request: &mut Request,
        side: Side,
        transport: Transport,
    ) -> Option<String> {
        let port = self.side(side).port(transport)?;
        let branch = self
            .branches
            .next(message::call_id(&request.headers).unwrap_or(""));
        let mut via = crate::sip::via::Via::new(
            transport.via_token(),
            &self.side(side).advertise,
            port,
            &branch,
        );
        via.set_param("rport", None);
        message::push_via(&mut request.headers, &via);
        Some(branch)
    }

    pub(super) fn allocate_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(super) fn insert_server(
        &mut self,
        key: ServerKey,
        transaction: ServerTransaction,
        reply_to: Destination,
        request: Request,
    ) -> u64 {
        let id = self.allocate_id();
        Stats::bump(&self.stats.server_transactions);
        let span = transaction_span(&request, &key.branch, None);
        self.server_index.insert(key.clone(), id);
        let to_tag = format!("{:08x}", rand::random::<u32>());
        self.entries.insert(
            id,
            Entry::Server(ServerEntry {
                key,
                transaction,
                reply_to,
                request,
                to_tag,
                reconnect: None,
                client: None,
                pending_resend: None,
                pending_forward: None,
                cancel_requested: false,
                arrived: now(),
                span,
                scheduled: None,
            }),
        );
        id
    }

    /// Starts a client transaction for `request` (whose top Via carries `branch`).
    pub(super) fn start_client(
        &mut self,
        request: Request,
        branch: &str,
        destination: Destination,
        server: Option<u64>,
        resend: Option<Box<super::resend::ResendInfo>>,
    ) -> u64 {
        let carried = resend
            .as_ref()
            .map(|info| Carried::new(info.trunk, info.generation, info.sent_at, &request));
        let id = self.allocate_id();
        Stats::bump(&self.stats.client_transactions);
        let key = ClientKey::new(branch, request.method);
        let parent = match server.and_then(|server| self.entries.get(&server)) {
            Some(Entry::Server(entry)) => Some(entry.span.clone()),
            _ => None,
        };
        let span = transaction_span(&request, branch, parent.as_ref());
        let transaction = ClientTransaction::new(
            now(),
            request,
            destination.transport.is_reliable(),
            self.timers,
        );
        self.client_index.insert(key.clone(), id);
        self.entries.insert(
            id,
            Entry::Client(ClientEntry {
                key,
                transaction,
                destination,
                server,
                cancel_pending: false,
                cancel_sent: false,
                resend,
                carried,
                local: None,
                failover: None,
                abandoned: false,
                span,
                scheduled: None,
            }),
        );
        if let Some(Entry::Server(server)) = server.and_then(|server| self.entries.get_mut(&server))
        {
            server.client = Some(id);
        }
        self.pump_client(id);
        id
    }

    /// Sends a response through server transaction `id`. False when the transaction is
    /// gone or its state refuses the response (a final one went out already).
    pub(super) fn respond(&mut self, id: u64, response: &Response) -> bool {
        let Some(Entry::Server(server)) = self.entries.get_mut(&id) else {
            return false;
        };
        let code = response.status_code.code();
        let first_final = code >= 200 && !server.transaction.is_final();
        let now = now();
        let accepted =
            server
                .transaction
                .send_response(now, code, message::encode(&response.clone().into()));
        if accepted && first_final && server.request.method == rsip::Method::Invite {
            let setup = now.saturating_duration_since(server.arrived);
            self.metrics.call_setup_seconds.observe(setup.as_secs_f64());
        }
        if accepted {
            self.pump_server(id);
        }
        accepted
    }

    /// Sends a response of the proxy's own making through server transaction `id`.
    pub(super) fn respond_locally(&mut self, id: u64, status: rsip::StatusCode) {
        let Some(Entry::Server(server)) = self.entries.get(&id) else {
            return;
        };
        let response = message::response_for(&server.request, status, &server.to_tag);
        self.respond(id, &response);
    }

    pub(super) fn pump_server(&mut self, id: u64) {
        let span = match self.entries.get(&id) {
            Some(Entry::Server(server)) => server.span.clone(),
            _ => return,
        };
        let _entered = span.enter();
        loop {
            let Some(Entry::Server(server)) = self.entries.get_mut(&id) else {
                return;
            };
            let Some(event) = server.transaction.poll_event() else {
                break;
            };
            match event {
                ServerEvent::Transmit(bytes) => {
                    let (mut destination, reconnect) = (server.reply_to, server.reconnect);
                    if destination.transport.is_reliable() {
                        let connected = self
                            .side(destination.side)
                            .connected(destination.transport, destination.addr);
                        if let (false, Some(reconnect)) = (connected, reconnect) {
                            destination.addr = reconnect;
                        }
                    }
                    self.send(destination, bytes);
                }
                ServerEvent::Timeout => {
                    tracing::debug!(branch = %server.key.branch, "final response never acknowledged (Timer H)");
                }
                ServerEvent::Terminated => {
                    self.remove(id);
                    return;
                }
            }
        }
        self.schedule(id);
    }

    pub(super) fn pump_client(&mut self, id: u64) {
        let span = match self.entries.get(&id) {
            Some(Entry::Client(client)) => client.span.clone(),
            _ => return,
        };
        let _entered = span.enter();
        loop {
            let Some(Entry::Client(client)) = self.entries.get_mut(&id) else {
                return;
            };
            let Some(event) = client.transaction.poll_event() else {
                break;
            };
            match event {
                ClientEvent::Transmit(bytes) => {
                    let destination = client.destination;
                    self.send(destination, bytes);
                }
                ClientEvent::Response(response) => self.relay_response(id, *response),
                ClientEvent::Silent => {
                    // Another host, if there is one; else wait on for Timer B/F.
                    self.fail_over(id, "no answer");
                }
                ClientEvent::Timeout => {
                    if !client.abandoned {
                        Stats::bump(&self.stats.client_timeouts);
                        tracing::info!(to = %client.destination.addr, method = %client.transaction.request().method, "no final response before the transaction timeout");
                    }
                    let (server, cancel_out) =
                        (client.server, client.cancel_sent || client.cancel_pending);
                    if let Some(server) = server {
                        // After a CANCEL the request was terminated on purpose (§16.10);
                        // otherwise nobody answered in time.
                        let cancelled = cancel_out
                            || matches!(self.entries.get(&server), Some(Entry::Server(entry)) if entry.cancel_requested);
                        self.respond_if_pending(server, if cancelled { 487 } else { 408 });
                    }
                }
                ClientEvent::TimerC => {
                    tracing::info!(to = %client.destination.addr, "no final response before Timer C; cancelling");
                    self.send_cancel(id);
                }
                ClientEvent::Terminated => {
                    self.remove(id);
                    return;
                }
            }
        }
        self.schedule(id);
    }

    /// Answers the server transaction with `code` unless a final response went out.
    fn respond_if_pending(&mut self, server: u64, code: u16) {
        if let Some(Entry::Server(entry)) = self.entries.get(&server) {
            if !entry.transaction.is_final() {
                self.respond_locally(server, message::status(code));
            }
        }
    }

    /// A response from the client transaction's peer, for the server side.
    fn relay_response(&mut self, client: u64, mut response: Response) {
        let code = response.status_code.code();
        // RFC 3263 §4.3: a 503 without Retry-After says this host cannot serve now.
        if code == 503
            && message::header_values(&response.headers, "Retry-After")
                .next()
                .is_none()
            && self.fail_over(client, "503 without Retry-After")
        {
            return;
        }
        let Some(Entry::Client(entry)) = self.entries.get_mut(&client) else {
            return;
        };
        if entry.abandoned {
            self.late_answer(client, &response);
            return;
        }
        if code > 100 {
            // The host answered for itself: this request stays there.
            entry.failover = None;
        }
        let server = entry.server;
        if code < 200 && entry.cancel_pending {
            entry.cancel_pending = false;
            self.send_cancel(client);
        } else if code >= 200 {
            entry.cancel_pending = false;
        }
        self.note_acceptance(client, code);
        if matches!(code, 401 | 403 | 407)
            && entry_carried(&self.entries, client).is_some_and(|carried| carried.resent)
        {
            Stats::bump(&self.stats.resends_refused_again);
        }
        // Past the first final answer only an absorbed rejection needs the copy.
        let keep_copy = matches!(code, 401 | 403 | 407);
        if (200..300).contains(&code) {
            self.take_authentication_info(client, &mut response);
        }
        if code >= 200 && !keep_copy {
            if let Some(Entry::Client(entry)) = self.entries.get_mut(&client) {
                entry.resend = None;
            }
        }
        // The final answer to a request the sidecar originated goes to its sender.
        if code >= 200 {
            if let Some(reply) = self.entries.get_mut(&client).and_then(|entry| match entry {
                Entry::Client(client) => client.local.take(),
                Entry::Server(_) => None,
            }) {
                if message::pop_via(&mut response.headers).is_ok() {
                    // The sender may have given up meanwhile.
                    let _ = reply.send(response);
                }
                return;
            }
        }
        // 100 Trying is hop by hop (§16.7 step 5); a CANCEL's answer is ours alone.
        let Some(server) = server else { return };
        if code == 100 {
            return;
        }
        if self.absorb_rejection(client, server, &response) {
            return;
        }
        if message::pop_via(&mut response.headers).is_err() {
            Stats::bump(&self.stats.malformed_dropped);
            return;
        }
        if self.entries.contains_key(&server) {
            self.deliver(server, response);
        } else {
            let side = self
                .entries
                .get(&client)
                .map_or(Side::Edge, |entry| match entry {
                    Entry::Client(client) => client.destination.side.opposite(),
                    Entry::Server(server) => server.reply_to.side,
                });
            self.forward_response_stateless(response, side);
        }
    }

    /// Sends a response (our Via already removed) back through server transaction
    /// `server`, with the CSeq the sender of the request used: after a re-send the core
    /// counts higher than the Edge (DESIGN.md item 6). A 2xx to a BYE ends the dialog's
    /// CSeq offset.
    pub(super) fn deliver(&mut self, server: u64, mut response: Response) {
        let original = match self.entries.get(&server) {
            Some(Entry::Server(entry)) => message::cseq(&entry.request.headers)
                .ok()
                .map(|cseq| (cseq, &entry.request.headers)),
            _ => None,
        };
        if let Some(((seq, method), request_headers)) = original {
            let code = response.status_code.code();
            // A dialog ends with its BYE's 2xx, or never starts when its INVITE fails;
            // only worth looking at while some dialog carries an offset.
            let answered_call = method == rsip::Method::Invite
                && (200..300).contains(&code)
                && !message::in_dialog(request_headers);
            let ended_call = method == rsip::Method::Bye && code >= 200;
            let call_id = (answered_call || ended_call)
                .then(|| message::call_id(request_headers).unwrap_or("").to_string());
            let ends_dialog = !self.dialogs.is_empty()
                && ((method == rsip::Method::Bye && (200..300).contains(&code))
                    || (method == rsip::Method::Invite
                        && code >= 300
                        && !message::in_dialog(request_headers)));
            if message::cseq(&response.headers).is_ok_and(|(current, _)| current != seq) {
                message::set_cseq(&mut response.headers, seq, method);
            }
            if ends_dialog {
                self.end_dialog(&response);
            }
            match call_id {
                Some(call_id) if answered_call => self.calls.answered(now(), &call_id),
                Some(call_id) => self.calls.ended(&call_id),
                None => {}
            }
        }
        if self.respond(server, &response) {
            Stats::bump(&self.stats.responses_forwarded);
        } else {
            Stats::bump(&self.stats.responses_absorbed);
        }
    }

    /// Forwards a response whose top Via (ours) is already removed, by the next Via alone
    /// (§16.7 when no transaction remains; §18.2.2 for the address), out of `side`.
    fn forward_response_stateless(&mut self, response: Response, side: Side) {
        let Ok(via) = message::top_via(&response.headers) else {
            Stats::bump(&self.stats.stray_responses);
            return;
        };
        let Some(addr) = via.response_address() else {
            Stats::bump(&self.stats.stray_responses);
            return;
        };
        // A Via is whatever the sender wrote: never a way to reach outside the allow list.
        if !self.router.allow(side).allows(addr.ip()) {
            Stats::bump(&self.stats.stray_responses);
            tracing::debug!(to = %addr, %side, "not forwarding a response outside the allow list");
            return;
        }
        let transport = Transport::from_via_token(&via.transport);
        Stats::bump(&self.stats.responses_forwarded);
        let destination = Destination {
            side,
            transport,
            addr,
            local: None,
            trunk: None,
        };
        self.send(destination, message::encode(&response.into()));
    }

    fn handle_response(&mut self, source: super::request::Source, response: Response) {
        let key = match ClientKey::for_response(&response) {
            Ok(key) => key,
            Err(error) => {
                Stats::bump(&self.stats.malformed_dropped);
                tracing::debug!(peer = %source.peer, error = %error, "dropped response without usable Via or CSeq");
                return;
            }
        };
        if let Some(&id) = self.client_index.get(&key) {
            if let Some(Entry::Client(client)) = self.entries.get_mut(&id) {
                self.health.answered(client.destination.addr);
                client.transaction.handle_response(now(), response);
                self.pump_client(id);
            }
            return;
        }
        // A late 2xx retransmission for an INVITE after the transaction ended (§16.7
        // step 1): forward it by Via, but only when the Via it pops is ours (our address
        // and a branch we made). Nothing else is forwarded without a transaction.
        let success = (200..300).contains(&response.status_code.code());
        let call_id = message::call_id(&response.headers).unwrap_or("");
        let ours = self.branches.is_own(&key.branch, call_id)
            && message::top_via(&response.headers)
                .is_ok_and(|via| self.router.is_own_host(&via.host, via.port));
        if !ours
            || !success
            || key.method.0 != rsip::Method::Invite
            || self.abandoned.contains(&key.branch)
        {
            Stats::bump(&self.stats.stray_responses);
            tracing::debug!(peer = %source.peer, "dropped response matching no transaction");
            return;
        }
        let mut response = response;
        if message::pop_via(&mut response.headers).is_ok() {
            self.forward_response_stateless(response, source.side.opposite());
        }
    }

    /// Sends the CANCEL for the INVITE of client transaction `client` (§16.10).
    pub(super) fn send_cancel(&mut self, client: u64) {
        let Some(Entry::Client(entry)) = self.entries.get(&client) else {
            return;
        };
        if entry.transaction.is_final() {
            return;
        }
        let cancel = entry.transaction.build_cancel();
        let destination = entry.destination;
        let branch = entry.key.branch.clone();
        if let Some(Entry::Client(entry)) = self.entries.get_mut(&client) {
            entry.cancel_sent = true;
            entry.transaction.note_cancel_sent(now());
        }
        self.schedule(client);
        Stats::bump(&self.stats.cancels_forwarded);
        self.start_client(cancel, &branch, destination, None, None);
    }

    /// Ends every client transaction toward `addr` over `transport` on `side` (its
    /// connection failed): each is tried on another core host if it can be (RFC 3263
    /// §4.3), else its request is answered 503 (RFC 3261 §8.1.3.1 transport error).
    fn fail_transactions_to(&mut self, side: Side, (transport, addr, owner): ConnectionKey) {
        let failed: Vec<(u64, Option<u64>)> = self
            .entries
            .iter()
            .filter_map(|(id, entry)| match entry {
                Entry::Client(client)
                    if client.destination.side == side
                        && client.destination.transport == transport
                        && client.destination.addr == addr
                        && (transport != Transport::Tls || client.destination.trunk == owner) =>
                {
                    Some((*id, client.server))
                }
                _ => None,
            })
            .collect();
        for (id, server) in failed {
            if !self.fail_over(id, "transport error") {
                if let Some(server) = server {
                    self.respond_if_pending(server, 503);
                }
            }
            if let Some(Entry::Client(client)) = self.entries.get_mut(&id) {
                client.transaction.abort();
            }
            self.pump_client(id);
        }
    }

    fn remove(&mut self, id: u64) {
        match self.entries.remove(&id) {
            Some(Entry::Server(server)) => {
                self.server_index.remove(&server.key);
                if let Some(Entry::Client(client)) = server
                    .client
                    .and_then(|client| self.entries.get_mut(&client))
                {
                    client.server = None;
                }
            }
            Some(Entry::Client(client)) => {
                self.client_index.remove(&client.key);
                if let Some(Entry::Server(server)) = client
                    .server
                    .and_then(|server| self.entries.get_mut(&server))
                {
                    if server.client == Some(id) {
                        server.client = None;
                    }
                }
            }
            None => {}
        }
    }

    /// Puts the entry's next deadline on the heap unless it is there already.
    pub(super) fn schedule(&mut self, id: u64) {
        let (deadline, scheduled) = match self.entries.get_mut(&id) {
            Some(Entry::Server(server)) => {
                (server.transaction.poll_timeout(), &mut server.scheduled)
            }
            Some(Entry::Client(client)) => {
                (client.transaction.poll_timeout(), &mut client.scheduled)
            }
            None => return,
        };
        if let Some(deadline) = deadline {
            if *scheduled != Some(deadline) {
                *scheduled = Some(deadline);
                self.timer_heap.push(Reverse((deadline, id)));
            }
        }
    }

    /// Runs every timer due at `now`. Heap entries whose transaction has gone or moved its
    /// deadline are skipped.
    pub fn fire_timers(&mut self, now: StdInstant) {
        if now.saturating_duration_since(self.last_dialog_sweep)
            >= std::time::Duration::from_secs(1)
        {
            self.last_dialog_sweep = now;
            self.dialogs.expire(now);
        }
        while let Some(Reverse((at, id))) = self.timer_heap.peek().copied() {
            if at > now {
                break;
            }
            self.timer_heap.pop();
            match self.entries.get_mut(&id) {
                Some(Entry::Server(server)) if server.scheduled == Some(at) => {
                    server.scheduled = None;
                    server.transaction.handle_timeout(now);
                    self.pump_server(id);
                }
                Some(Entry::Client(client)) if client.scheduled == Some(at) => {
                    client.scheduled = None;
                    client.transaction.handle_timeout(now);
                    self.pump_client(id);
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_branches_are_recognised_and_forged_ones_are_not() {
        let branches = Branches::new();
        let made = branches.next("call@test");
        assert!(made.starts_with(OWN_BRANCH_PREFIX));
        assert!(branches.is_own(&made, "call@test"));
        // Another call's response, or another instance (another key): not ours.
        assert!(!branches.is_own(&made, "other@test"));
        assert!(!Branches::new().is_own(&made, "call@test"));
        // The prefix alone, a changed nonce, a changed tag, junk: not ours.
        let flipped = |position: usize| {
            let mut bytes = made.clone().into_bytes();
            bytes[position] = if bytes[position] == b'0' { b'1' } else { b'0' };
            String::from_utf8(bytes).unwrap()
        };
        let ours = |branch: &str| branches.is_own(branch, "call@test");
        assert!(!ours(&flipped(OWN_BRANCH_PREFIX.len())));
        assert!(!ours(&flipped(made.len() - 1)));
        assert!(!ours(&format!("{OWN_BRANCH_PREFIX}00000000000000aa")));
        assert!(!ours(&format!(
            "{OWN_BRANCH_PREFIX}zzzzzzzzzzzzzzzzzzzzzzzz"
        )));
        assert!(!ours("z9hG4bKother"));
        assert!(!ours(&format!(
            "{OWN_BRANCH_PREFIX}é0000000000000000000000"
        )));
    }
}
