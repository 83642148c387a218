//! The driver of the proxy's pure core ([`Engine`]): the one task that owns the
//! sockets, the connection table and the clock. It reads the UDP sockets itself (no
//! hand-over between tasks on the busiest path), takes TCP and TLS messages and
//! connection news from the transport tasks, sleeps until the core's next deadline, and
//! does what the core asks: sends its bytes, waits on credential managers, hands the
//! answers to the sidecar's own requests to their senders.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant as StdInstant;

use bytes::Bytes;
use rsip::Response;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::engine::{Action, ConnectionKey, CredentialWait, Destination, Engine, Transmit};
use crate::config::Transport;
use crate::credentials::Credential;
use crate::registration::Outgoing;
use crate::stats::{ProxyMetrics, Stats};
use crate::transport::tcp::TcpContext;
use crate::transport::tls::TlsClient;
use crate::transport::{udp, ConnectionId, ReceiveContext, Side, TransportEvent};

/// How one trunk's TLS connections to one peer are made, swapped on SIGHUP (new
/// connections use the new settings, open ones keep theirs).
pub type TlsClientSlot = Arc<arc_swap::ArcSwap<TlsClient>>;

/// How many datagrams one socket gives before the others get a turn.
const UDP_BATCH: usize = 64;

/// How many queued events (TCP and TLS messages, connection news) one turn takes.
const EVENT_BATCH: usize = 64;

/// The sockets of one side.
pub struct SideSockets {
    pub side: Side,
    pub udp: Vec<Arc<UdpSocket>>,
    pub udp_locals: Vec<SocketAddr>,
    /// The allow list, limits and counters for what the UDP sockets receive.
    pub receive: ReceiveContext,
    pub tcp: TcpContext,
    /// How TLS connections to each trunk's peer on this side are made, by trunk index.
    pub tls_clients: Vec<Option<TlsClientSlot>>,
    pub connections: HashMap<ConnectionKey, (ConnectionId, mpsc::Sender<Bytes>)>,
}

impl SideSockets {
    /// How trunk `trunk`'s TLS connections on this side are made now, if it has TLS.
    fn tls_client(&self, trunk: usize) -> Option<Arc<TlsClient>> {
        self.tls_clients
            .get(trunk)
            .and_then(Option::as_ref)
            .map(|slot| slot.load_full())
    }

    /// The socket to send to `to` from: `local` when given, else the first of `to`'s
    /// address family, else the first.
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

/// The engine and its I/O.
pub struct Driver {
    engine: Engine,
    edge: SideSockets,
    core: SideSockets,
    stats: Arc<Stats>,
    metrics: Arc<ProxyMetrics>,
    /// Who waits for the answer to each request the sidecar originated.
    replies: HashMap<u64, oneshot::Sender<Response>>,
    /// Credential waits in progress: each ends with its server transaction, what it
    /// waited for and the outcome.
    waits: JoinSet<(u64, CredentialWait, Option<Arc<Credential>>)>,
    /// Whose each wait is, so that a wait that fails still ends its request.
    wait_owners: HashMap<tokio::task::Id, (u64, CredentialWait)>,
}

/// The engine's clock: tokio's, so `tokio::time::pause` drives it in tests.
fn now() -> StdInstant {
    tokio::time::Instant::now().into_std()
}

impl Driver {
    pub fn new(engine: Engine, edge: SideSockets, core: SideSockets, stats: Arc<Stats>) -> Self {
        let metrics = engine.metrics.clone();
        Self {
            engine,
            edge,
            core,
            stats,
            metrics,
            replies: HashMap::new(),
            waits: JoinSet::new(),
            wait_owners: HashMap::new(),
        }
    }

    /// Runs until cancelled. `events` brings what the TCP and TLS connections and the
    /// ICMP error readers report, `outgoing` the requests the sidecar itself sends
    /// (REGISTERs).
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<TransportEvent>,
        mut outgoing: mpsc::Receiver<Outgoing>,
        cancel: CancellationToken,
    ) {
        // Registrations stop before the engine does; their channel closing is no reason
        // to stop.
        let mut registering = true;
        // Every UDP socket of both sides, read here.
        let mut udp: Vec<(Side, usize, Arc<UdpSocket>)> = [&self.edge, &self.core]
            .into_iter()
            .flat_map(|io| {
                io.udp
                    .iter()
                    .enumerate()
                    .map(|(index, socket)| (io.side, index, socket.clone()))
            })
            .collect();
        let max_message_size = self.edge.receive.max_message_size;
        // One byte more than the limit tells an oversized datagram from one that fits.
        let mut buffer = vec![0u8; max_message_size + 1];
        // The heartbeat `/healthz` reads, and the table sizes the metrics show.
        let mut heartbeat = tokio::time::interval(std::time::Duration::from_secs(1));
        // Where the socket scan starts, so that a busy socket does not starve the next.
        let mut first = 0usize;
        // What the kernel dropped at our UDP sockets before we looked: not ours to count.
        let locals: Vec<SocketAddr> = [&self.edge, &self.core]
            .into_iter()
            .flat_map(|io| io.udp_locals.iter().copied())
            .collect();
        let drops_before = udp::kernel_drops(&locals).unwrap_or(0);
        loop {
            self.flush();
            let deadline = self.engine.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            let ready = poll_fn(|context| {
                for offset in 0..udp.len() {
                    let index = (first + offset) % udp.len();
                    if let Poll::Ready(result) = udp[index].2.poll_recv_ready(context) {
                        return Poll::Ready((index, result));
                    }
                }
                Poll::Pending
            });
            let has_waits = !self.waits.is_empty();
            tokio::select! {
                _ = cancel.cancelled() => break,
                (index, result) = ready => {
                    first = index + 1;
                    match result {
                        Ok(()) => {
                            let (side, socket_index, socket) = &udp[index];
                            self.receive_udp(*side, *socket_index, socket, &mut buffer);
                        }
                        Err(error) => {
                            // The reactor cannot watch this socket any more: reading it
                            // again would spin. It stays for sending.
                            let (side, _, socket) = udp.remove(index);
                            tracing::error!(%side, local = ?socket.local_addr().ok(), error = %error, "udp socket can no longer be read; receiving on it stops");
                        }
                    }
                }
                event = events.recv() => match event {
                    Some(event) => {
                        self.handle_event(event);
                        // What queued up meanwhile is taken in the same turn.
                        for _ in 1..EVENT_BATCH {
                            let Ok(event) = events.try_recv() else { break };
                            self.flush();
                            self.handle_event(event);
                        }
                    }
                    None => break,
                },
                request = outgoing.recv(), if registering => match request {
                    Some(Outgoing { trunk, request, reply }) => {
                        let request = match crate::sip::wire::Request::from_rsip(&request) {
                            Ok(request) => request,
                            Err(error) => {
                                tracing::warn!(trunk, error = %error, "cannot send a request of our own");
                                continue;
                            }
                        };
                        if let Some(id) = self.engine.originate(now(), trunk, request) {
                            self.replies.insert(id, reply);
                        }
                        // Else `reply` is dropped here: its sender learns there is no
                        // answer.
                    }
                    None => registering = false,
                },
                Some(done) = self.waits.join_next_with_id(), if has_waits => {
                    match done {
                        Ok((id, (server, wait, credential))) => {
                            self.wait_owners.remove(&id);
                            self.engine.handle_credential(now(), server, wait, credential);
                        }
                        Err(error) => {
                            // A wait that failed ends its request as one that found no
                            // credential: the refusal or the request goes on as is.
                            if let Some((server, wait)) = self.wait_owners.remove(&error.id()) {
                                tracing::warn!(error = %error, "a credential wait failed; going on without a credential");
                                self.engine.handle_credential(now(), server, wait, None);
                            }
                        }
                    }
                }
                _ = sleep => self.engine.handle_timeout(now()),
                _ = heartbeat.tick() => {
                    self.metrics.beat(tokio::time::Instant::now());
                    self.engine.publish(now());
                    if let Some(drops) = udp::kernel_drops(&locals) {
                        self.stats.queue_full_dropped.store(
                            drops.saturating_sub(drops_before),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                }
            }
        }
        self.waits.abort_all();
        tracing::debug!(transactions = self.engine.transactions(), "engine stopped");
    }

    /// Reads what is waiting on one UDP socket, at most [`UDP_BATCH`] datagrams, and
    /// hands each message to the engine, sending what it answers at once.
    fn receive_udp(&mut self, side: Side, index: usize, socket: &UdpSocket, buffer: &mut [u8]) {
        let (local, context) = {
            let io = self.side(side);
            let Some(local) = io.udp_locals.get(index).copied() else {
                return;
            };
            (local, io.receive.clone())
        };
        for _ in 0..UDP_BATCH {
            match udp::receive_one(socket, local, &context, buffer) {
                udp::Received::Message(inbound) => {
                    Stats::bump(&self.stats.messages_received);
                    self.engine.handle_message(now(), inbound);
                    self.flush();
                }
                udp::Received::Dropped => {}
                udp::Received::Empty => return,
            }
        }
    }

    fn handle_event(&mut self, event: TransportEvent) {
        match event {
            TransportEvent::Message(inbound) => self.engine.handle_message(now(), inbound),
            TransportEvent::Unreachable { side, addr } => {
                self.engine.handle_unreachable(now(), side, addr);
            }
            TransportEvent::ConnectionOpened {
                side,
                transport,
                peer,
                owner,
                id,
                sender,
            } => {
                let key = (transport, peer, owner);
                self.side_mut(side).connections.insert(key, (id, sender));
                self.engine.handle_connection_opened(side, key, id);
            }
            TransportEvent::ConnectionClosed {
                side,
                transport,
                peer,
                owner,
                id,
                connect_failed,
            } => {
                let key = (transport, peer, owner);
                let table = &mut self.side_mut(side).connections;
                if table.get(&key).is_some_and(|(current, _)| *current == id) {
                    table.remove(&key);
                }
                self.engine
                    .handle_connection_closed(now(), side, key, id, connect_failed);
            }
        }
    }

    /// Does everything the engine asked for, until it asks for nothing more.
    fn flush(&mut self) {
        loop {
            if let Some(Transmit {
                destination,
                bytes,
                fallback,
            }) = self.engine.poll_transmit()
            {
                self.send(destination, bytes, fallback);
            } else if let Some(action) = self.engine.poll_action() {
                self.act(action);
            } else {
                return;
            }
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::AwaitCredential {
                server,
                manager,
                wait,
            } => {
                let handle = self.waits.spawn(async move {
                    let credential = match wait {
                        CredentialWait::Valid { until } => {
                            manager
                                .wait_valid(tokio::time::Instant::from_std(until))
                                .await
                        }
                        CredentialWait::Replacement {
                            rejected,
                            sent_at,
                            until,
                            give_up,
                        } => {
                            let replacement = manager.replacement(
                                rejected,
                                sent_at,
                                tokio::time::Instant::from_std(until),
                            );
                            tokio::time::timeout_at(
                                tokio::time::Instant::from_std(give_up),
                                replacement,
                            )
                            .await
                            .unwrap_or(None)
                        }
                    };
                    (server, wait, credential)
                });
                self.wait_owners.insert(handle.id(), (server, wait));
            }
            Action::Answered { request, response } => {
                let response = response.and_then(|response| match response.to_rsip() {
                    Ok(response) => Some(response),
                    Err(error) => {
                        tracing::warn!(error = %error, "answer to a request of our own unreadable");
                        None
                    }
                });
                if let (Some(reply), Some(response)) = (self.replies.remove(&request), response) {
                    // The sender may have given up meanwhile.
                    let _ = reply.send(response);
                }
                // Without a response the sender is dropped: its receiver learns it.
            }
        }
    }

    fn side(&self, side: Side) -> &SideSockets {
        match side {
            Side::Edge => &self.edge,
            Side::Core => &self.core,
        }
    }

    fn side_mut(&mut self, side: Side) -> &mut SideSockets {
        match side {
            Side::Edge => &mut self.edge,
            Side::Core => &mut self.core,
        }
    }

    /// Sends bytes. Never waits: a full queue or a socket error drops and counts. Over
    /// TCP or TLS, with no open connection to `destination` but a `fallback`, a new
    /// connection goes to the fallback (RFC 3261 §18.2.2).
    fn send(&mut self, destination: Destination, bytes: Bytes, fallback: Option<SocketAddr>) {
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(
                side = %destination.side,
                peer = %destination.addr,
                transport = %destination.transport,
                message = %crate::sip::message::redacted(&bytes),
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
                let side = destination.side;
                let io = self.side_mut(side);
                let owner = match destination.transport {
                    Transport::Tls => destination.trunk,
                    _ => None,
                };
                // A live connection of the trunk's own, else one the peer opened to us.
                let live = |io: &SideSockets, addr: SocketAddr| {
                    io.connections
                        .get(&(destination.transport, addr, owner))
                        .or_else(|| io.connections.get(&(destination.transport, addr, None)))
                        .filter(|(_, sender)| !sender.is_closed())
                        .map(|(_, sender)| sender.clone())
                };
                let mut addr = destination.addr;
                let mut existing = live(io, addr);
                if let (None, Some(fallback)) = (&existing, fallback) {
                    addr = fallback;
                    existing = live(io, addr);
                }
                let key = (destination.transport, addr, owner);
                let sender = match existing {
                    Some(sender) => sender,
                    None => {
                        let tls = match destination.transport {
                            Transport::Tls => {
                                let client = destination
                                    .trunk
                                    .and_then(|trunk| Some((trunk, io.tls_client(trunk)?)));
                                let Some(client) = client else {
                                    Stats::bump(&self.stats.send_failed);
                                    tracing::warn!(side = %destination.side, to = %destination.addr, "no TLS connection and no trunk to open one for; not sent");
                                    self.engine.handle_send_failed(now(), destination);
                                    return;
                                };
                                Some(client)
                            }
                            _ => None,
                        };
                        let (id, sender) = io.tcp.connect(addr, tls);
                        io.connections.insert(key, (id, sender.clone()));
                        self.engine.handle_connection_opened(side, key, id);
                        sender
                    }
                };
                if let Err(error) = sender.try_send(bytes) {
                    Stats::bump(&self.stats.send_failed);
                    tracing::debug!(to = %addr, error = %error, "tcp queue refused message");
                }
            }
        }
    }
}
