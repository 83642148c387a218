//! One side of a replay on the network: a UDP socket and a TCP listener on one address,
//! the TCP connections, and the players of that side. The Edge endpoint starts each
//! dialogue's player at its captured time (scaled and capped like every gap) and sends
//! everything to the target, as a device with an outbound proxy does; the core endpoint
//! creates a player for each dialogue whose first request reaches it and answers back
//! the way requests came.
//!
//! The sockets are the proxy's own transport ([`crate::transport`]): the UDP socket is
//! read with [`udp::receive_one`] by the endpoint's task itself, as the proxy's driver
//! reads its sockets; TCP connections, accepted or opened toward the target, are served
//! by [`TcpContext`] (framing, keep-alive pongs, write batching, limits), which parses
//! every message with the proxy's view and hands it over as a [`TransportEvent`]. What
//! the proxy's parser refuses is counted and dropped here as it is there.
//!
//! One task owns the players. It sleeps until the earliest player timer, kept in an
//! ordered set so a wake-up costs O(log players). A full queue stalls the connection
//! that fills it, as it does in the proxy.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::build::{plain_response, Rewrite};
use super::driver::{ReplayError, ReplayOptions};
use super::player::{Origin, Output, Player};
use super::script::{Dialogue, Side};
use super::text::SipText;
use crate::config::Transport;
use crate::stats::Stats;
use crate::transport::tcp::{self, TcpContext};
use crate::transport::udp::{self, Received};
use crate::transport::{AllowList, ReceiveContext, TransportEvent};

/// Largest message accepted live.
const MAX_LIVE_MESSAGE: usize = 1 << 20;
/// Messages waiting for an endpoint.
const QUEUE: usize = 4096;
/// Connections open at once; more are refused.
const MAX_CONNECTIONS: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A write to a connection that takes longer closes it: its peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A replayed call may be silent for as long as it was in the capture.
const IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// After a failed connect to the target, no new attempt for this long.
const CONNECT_HOLDOFF: Duration = Duration::from_secs(1);
/// UDP socket buffers asked for: a replay at full speed sends in bursts.
const UDP_BUFFER: usize = 1 << 20;
/// Datagrams read in one turn before timers and the queue get their turn.
const UDP_BATCH: usize = 64;

/// A UDP socket and a TCP listener on the same address.
pub struct Sockets {
    udp: Arc<UdpSocket>,
    /// Taken by the accept task.
    tcp: Option<TcpListener>,
    local: SocketAddr,
}

impl Sockets {
    pub async fn bind(address: SocketAddr) -> Result<Sockets, ReplayError> {
        let bind_error = |source| ReplayError::Bind { address, source };
        let udp_error = |error: udp::UdpError| match error {
            udp::UdpError::Bind { source, .. } => bind_error(source),
        };
        // With port 0, find a port free for both.
        for _ in 0..32 {
            let udp = udp::bind(address, UDP_BUFFER).await.map_err(udp_error)?;
            let local = udp.local_addr().map_err(bind_error)?;
            match tcp::bind(local).await {
                Ok(tcp) => {
                    return Ok(Sockets {
                        udp,
                        tcp: Some(tcp),
                        local,
                    })
                }
                Err(tcp::TcpError::Bind { source, .. }) if address.port() != 0 => {
                    return Err(bind_error(source))
                }
                Err(_) => continue,
            }
        }
        Err(bind_error(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no port free for both UDP and TCP",
        )))
    }
}

/// What an endpoint drops, for the log at its end.
#[derive(Debug, Default)]
struct Dropped {
    /// Messages for no dialogue of this run (answered 481 when they are requests).
    unmatched: u64,
    /// Messages that could not be sent (no connection, a full write queue, a UDP error).
    unsent: u64,
}

/// The TCP connections an endpoint knows: by id, and by peer for the messages that
/// arrive on them (the transport names a message's peer, not its connection).
#[derive(Default)]
struct Connections {
    by_id: HashMap<u64, mpsc::Sender<Bytes>>,
    by_peer: HashMap<SocketAddr, u64>,
}

impl Connections {
    fn insert(&mut self, id: u64, peer: SocketAddr, sender: mpsc::Sender<Bytes>) {
        self.by_id.insert(id, sender);
        self.by_peer.insert(peer, id);
    }

    fn remove(&mut self, id: u64, peer: SocketAddr) {
        self.by_id.remove(&id);
        if self.by_peer.get(&peer) == Some(&id) {
            self.by_peer.remove(&peer);
        }
    }
}

pub struct Endpoint {
    role: Side,
    sockets: Sockets,
    dialogues: Vec<Arc<Dialogue>>,
    by_call_id: HashMap<String, usize>,
    rewrite: Rewrite,
    options: ReplayOptions,
    players: HashMap<usize, Player>,
    /// Players' next wake-ups, ordered; and each player's entry in it.
    timers: BTreeSet<(std::time::Instant, usize)>,
    timer_of: HashMap<usize, std::time::Instant>,
    done: HashSet<usize>,
    /// The Edge's dialogues in starting order, with their start after the run began,
    /// and how many of them have started.
    starts: Vec<(usize, Duration)>,
    started: usize,
    connections: Connections,
    /// Our connection to the target, once opened (it queues what is sent before the
    /// connect completes).
    target_connection: Option<u64>,
    connect_after: Option<Instant>,
    tracker: TaskTracker,
    /// What the shared transport counts (refused messages, connections, send failures).
    stats: Arc<Stats>,
    dropped: Dropped,
}

impl Endpoint {
    pub fn new(
        role: Side,
        sockets: Sockets,
        dialogues: &[Arc<Dialogue>],
        run: &str,
        options: &ReplayOptions,
    ) -> Endpoint {
        let rewrite = Rewrite {
            run: run.to_string(),
            local: sockets.local,
            transport: Transport::Udp,
            dialogue: 0,
        };
        // Each start after the previous one by the captured gap, scaled and capped;
        // dialogues the capture begins inside of never start.
        let mut starts = Vec::new();
        let mut offset = Duration::ZERO;
        let mut previous: Option<Duration> = None;
        for (index, dialogue) in dialogues.iter().enumerate() {
            let Some(first) = dialogue.steps.first().map(|step| step.time) else {
                continue;
            };
            if let Some(previous) = previous {
                offset =
                    offset.saturating_add(options.pacing.scale(first.saturating_sub(previous)));
            }
            previous = Some(first);
            if dialogue.playable() {
                starts.push((index, offset));
            }
        }
        Endpoint {
            role,
            sockets,
            by_call_id: dialogues
                .iter()
                .enumerate()
                .map(|(index, dialogue)| (dialogue.call_id.clone(), index))
                .collect(),
            dialogues: dialogues.to_vec(),
            rewrite,
            options: options.clone(),
            players: HashMap::new(),
            timers: BTreeSet::new(),
            timer_of: HashMap::new(),
            done: HashSet::new(),
            starts,
            started: 0,
            connections: Connections::default(),
            target_connection: None,
            connect_after: None,
            tracker: TaskTracker::new(),
            stats: Arc::new(Stats::default()),
            dropped: Dropped::default(),
        }
    }

    fn transport_of(&self, index: usize) -> Transport {
        self.options
            .transport
            .unwrap_or(self.dialogues[index].transport)
    }

    /// Plays until every player is done (Edge) or `cancel` fires; returns the players.
    pub async fn run(mut self, cancel: CancellationToken) -> HashMap<usize, Player> {
        let (events_sender, mut events) = mpsc::channel::<TransportEvent>(QUEUE);
        let stop = cancel.child_token();
        let tcp = self.start_transport(events_sender, &stop);
        let udp = self.sockets.udp.clone();
        let mut buffer = vec![0u8; MAX_LIVE_MESSAGE + 1];
        let began = Instant::now();
        loop {
            if self.role == Side::Edge {
                self.start_due(began, &tcp).await;
                if self.started == self.starts.len() && self.done.len() == self.players.len() {
                    break;
                }
            }
            let wake = self.next_wake(began);
            tokio::select! {
                _ = cancel.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => self.on_event(event, &tcp).await,
                    None => break,
                },
                readable = udp.readable() => {
                    if readable.is_ok() {
                        self.read_datagrams(&udp, &tcp, &mut buffer).await;
                    }
                }
                _ = sleep_until(wake) => self.on_timers(&tcp).await,
            }
        }
        stop.cancel();
        // Nobody reads the queue any more: connection tasks waiting on it must see it closed.
        events.close();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(1), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(role = ?self.role, "replay: socket tasks still running at the end");
        }
        let stats = self.stats.snapshot();
        if self.dropped.unmatched > 0 || self.dropped.unsent > 0 || stats.malformed_dropped > 0 {
            tracing::info!(
                role = ?self.role,
                unmatched = self.dropped.unmatched,
                unsent = self.dropped.unsent + stats.send_failed,
                refused = stats.malformed_dropped,
                "replay: messages dropped"
            );
        }
        self.players
    }

    /// The shared transport for this endpoint: the TCP listener's accept loop, and the
    /// context that serves and opens connections. Everything it receives comes to
    /// `events`.
    fn start_transport(
        &mut self,
        events: mpsc::Sender<TransportEvent>,
        stop: &CancellationToken,
    ) -> TcpContext {
        let anyone = ["0.0.0.0/0", "::/0"]
            .iter()
            .filter_map(|net| net.parse().ok())
            .collect();
        let context = TcpContext {
            receive: ReceiveContext {
                side: self.role.transport_side(),
                allow: Arc::new(AllowList::new(anyone)),
                engine: events,
                stats: self.stats.clone(),
                max_message_size: MAX_LIVE_MESSAGE,
            },
            idle_timeout: IDLE_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            open_connections: Arc::new(AtomicUsize::new(0)),
            next_id: Arc::new(AtomicU64::new(1)),
            tracker: self.tracker.clone(),
            cancel: stop.clone(),
            tls_failures: Arc::default(),
        };
        if let Some(listener) = self.sockets.tcp.take() {
            self.tracker
                .spawn(tcp::accept_loop(listener, context.clone(), None));
        }
        context
    }

    fn next_wake(&self, began: Instant) -> Option<Instant> {
        let player = self.timers.first().map(|(at, _)| Instant::from_std(*at));
        let start = (self.role == Side::Edge)
            .then(|| self.starts.get(self.started))
            .flatten()
            .map(|(_, offset)| began + *offset);
        player.into_iter().chain(start).min()
    }

    async fn start_due(&mut self, began: Instant, tcp: &TcpContext) {
        let now = Instant::now();
        while let Some(&(index, offset)) = self.starts.get(self.started) {
            if began + offset > now {
                break;
            }
            self.started += 1;
            let mut player = self.player(index, now.into_std());
            player.handle_timeout(now.into_std());
            self.players.insert(index, player);
            self.settle(index, tcp).await;
        }
    }

    fn player(&self, index: usize, now: std::time::Instant) -> Player {
        let mut rewrite = self.rewrite.clone();
        rewrite.transport = self.transport_of(index);
        rewrite.dialogue = index;
        Player::new(
            now,
            self.role,
            self.dialogues[index].clone(),
            rewrite,
            self.options.pacing,
        )
    }

    /// Runs every player whose timer is due.
    async fn on_timers(&mut self, tcp: &TcpContext) {
        let now = Instant::now().into_std();
        while let Some(&(at, index)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, index));
            self.timer_of.remove(&index);
            if let Some(player) = self.players.get_mut(&index) {
                player.handle_timeout(now);
            }
            self.settle(index, tcp).await;
        }
    }

    /// After player `index` handled something: send what it queued, file its next timer,
    /// note whether it is done.
    async fn settle(&mut self, index: usize, tcp: &TcpContext) {
        let transport = self.transport_of(index);
        loop {
            let Some(player) = self.players.get_mut(&index) else {
                return;
            };
            let Some(Output { bytes, to }) = player.poll_output() else {
                break;
            };
            let to = to.or_else(|| match self.role {
                Side::Edge => None,
                Side::Core => player.peer(),
            });
            self.send(to, transport, bytes, tcp).await;
        }
        let Some(player) = self.players.get(&index) else {
            return;
        };
        if let Some(old) = self.timer_of.remove(&index) {
            self.timers.remove(&(old, index));
        }
        if let Some(at) = player.poll_timeout() {
            self.timers.insert((at, index));
            self.timer_of.insert(index, at);
        }
        // A done player can come back to life (a call answered after its cleanup).
        if player.is_done() {
            self.done.insert(index);
        } else {
            self.done.remove(&index);
        }
    }

    /// Reads what waits on the UDP socket, up to [`UDP_BATCH`] datagrams.
    async fn read_datagrams(&mut self, udp: &UdpSocket, tcp: &TcpContext, buffer: &mut [u8]) {
        let local = self.sockets.local;
        for _ in 0..UDP_BATCH {
            match udp::receive_one(udp, local, &tcp.receive, buffer) {
                Received::Message(inbound) => {
                    let origin = Origin {
                        address: inbound.peer,
                        connection: None,
                    };
                    self.on_message(SipText::from_wire(&inbound.message), origin, tcp)
                        .await;
                }
                Received::Dropped => continue,
                Received::Empty => break,
            }
        }
    }

    async fn on_event(&mut self, event: TransportEvent, tcp: &TcpContext) {
        match event {
            TransportEvent::Message(inbound) => {
                let origin = Origin {
                    address: inbound.peer,
                    connection: self.connections.by_peer.get(&inbound.peer).copied(),
                };
                self.on_message(SipText::from_wire(&inbound.message), origin, tcp)
                    .await;
            }
            TransportEvent::ConnectionOpened {
                id, peer, sender, ..
            } => self.connections.insert(id, peer, sender),
            TransportEvent::ConnectionClosed {
                id,
                peer,
                connect_failed,
                ..
            } => {
                self.connections.remove(id, peer);
                if self.target_connection == Some(id) {
                    self.target_connection = None;
                    if connect_failed {
                        let target = self.options.target;
                        tracing::warn!(%target, "replay: cannot connect to the target");
                        self.connect_after = Some(Instant::now() + CONNECT_HOLDOFF);
                    }
                }
            }
            // Only the proxy's core-side sockets watch for ICMP errors.
            TransportEvent::Unreachable { .. } => {}
        }
    }

    async fn on_message(&mut self, message: SipText, origin: Origin, tcp: &TcpContext) {
        let index = message
            .call_id()
            .and_then(|live| self.rewrite.captured_call_id(live))
            .and_then(|captured| self.by_call_id.get(captured))
            .copied()
            .filter(|&index| self.dialogues[index].playable());
        let Some(index) = index else {
            self.dropped.unmatched += 1;
            if message.is_request() && message.method() != Some("ACK") {
                let answer =
                    plain_response(&message, 481, "Call/Transaction Does Not Exist", "replay");
                self.send(Some(origin), Transport::Udp, answer.encode(), tcp)
                    .await;
            }
            return;
        };
        let now = Instant::now().into_std();
        if !self.players.contains_key(&index) {
            if self.role == Side::Edge || !message.is_request() {
                self.dropped.unmatched += 1;
                return;
            }
            let player = self.player(index, now);
            self.players.insert(index, player);
        }
        if let Some(player) = self.players.get_mut(&index) {
            player.handle_message(now, message, origin);
        }
        self.settle(index, tcp).await;
    }

    /// Sends to `to` (back the way it came), or to the target over `transport`; over TCP
    /// on our connection to the target, opened on first use.
    async fn send(
        &mut self,
        to: Option<Origin>,
        transport: Transport,
        bytes: Vec<u8>,
        tcp: &TcpContext,
    ) {
        let bytes = Bytes::from(bytes);
        let (address, connection) = match to {
            Some(origin) => (origin.address, origin.connection),
            None if transport == Transport::Tcp => match self.target_connection(tcp) {
                Some(id) => (self.options.target, Some(id)),
                None => {
                    self.dropped.unsent += 1;
                    return;
                }
            },
            None => (self.options.target, None),
        };
        match connection {
            Some(id) => {
                let queued = self
                    .connections
                    .by_id
                    .get(&id)
                    .is_some_and(|writer| writer.try_send(bytes).is_ok());
                if !queued {
                    self.dropped.unsent += 1;
                }
            }
            None => {
                if let Err(error) = self.sockets.udp.send_to(&bytes, address).await {
                    self.dropped.unsent += 1;
                    tracing::debug!(error = %error, %address, "replay: UDP send failed");
                }
            }
        }
    }

    /// Our connection to the target, opened in the background when there is none (what
    /// is queued on it is written once connected). After a failed connect, none for
    /// [`CONNECT_HOLDOFF`].
    fn target_connection(&mut self, tcp: &TcpContext) -> Option<u64> {
        if let Some(id) = self.target_connection {
            return Some(id);
        }
        if self
            .connect_after
            .is_some_and(|after| Instant::now() < after)
        {
            return None;
        }
        let target = self.options.target;
        let (id, sender) = tcp.connect(target, None);
        self.connections.insert(id, target, sender);
        self.target_connection = Some(id);
        Some(id)
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
