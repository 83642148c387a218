//! One side of a replay on the network: a UDP socket and a TCP listener on one address,
//! the TCP connections, and the players of that side. The Edge endpoint starts each
//! dialogue's player at its captured time (scaled and capped like every gap) and sends
//! everything to the target, as a device with an outbound proxy does; the core endpoint
//! creates a player for each dialogue whose first request reaches it and answers back
//! the way requests came.
//!
//! One task owns the players. Socket tasks feed it through a bounded queue; it sleeps
//! until the earliest player timer, kept in an ordered set so a wake-up costs
//! O(log players). Accepted connections are limited; a full queue drops UDP datagrams,
//! as a full socket buffer would.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
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
use crate::sip::framing::{Frame, StreamFramer, PONG};

/// Largest message accepted live.
const MAX_LIVE_MESSAGE: usize = 1 << 20;
/// Messages waiting for an endpoint.
const QUEUE: usize = 4096;
/// Connections accepted at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
/// Messages waiting to be written to one connection; beyond it they are dropped.
const WRITE_QUEUE: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed connect to the target, no new attempt for this long.
const CONNECT_HOLDOFF: Duration = Duration::from_secs(1);
/// A pause after a failed accept (out of descriptors, say), so it cannot spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
        // With port 0, find a port free for both.
        for _ in 0..32 {
            let udp = UdpSocket::bind(address).await.map_err(bind_error)?;
            let local = udp.local_addr().map_err(bind_error)?;
            match TcpListener::bind(local).await {
                Ok(tcp) => {
                    return Ok(Sockets {
                        udp: Arc::new(udp),
                        tcp: Some(tcp),
                        local,
                    })
                }
                Err(error) if address.port() != 0 => return Err(bind_error(error)),
                Err(_) => continue,
            }
        }
        Err(bind_error(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no port free for both UDP and TCP",
        )))
    }
}

/// What reaches the endpoint task.
enum Inbound {
    Message {
        bytes: Bytes,
        origin: Origin,
    },
    Connected {
        id: u64,
        writer: mpsc::Sender<Bytes>,
    },
    Closed {
        id: u64,
    },
    /// Our background connect to the target ended.
    TargetConnected {
        outcome: Result<TcpStream, String>,
    },
}

/// What an endpoint drops, for the log at its end.
#[derive(Debug, Default)]
struct Dropped {
    /// Messages for no dialogue of this run (answered 481 when they are requests).
    unmatched: u64,
    /// Messages that could not be sent (no connection, a full write queue, a UDP error).
    unsent: u64,
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
    connections: HashMap<u64, mpsc::Sender<Bytes>>,
    target_connection: Option<u64>,
    /// A connect to the target runs; these wait for it.
    connecting: bool,
    waiting: Vec<Bytes>,
    connect_after: Option<Instant>,
    next_connection: u64,
    tracker: TaskTracker,
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
            connections: HashMap::new(),
            target_connection: None,
            connecting: false,
            waiting: Vec::new(),
            connect_after: None,
            next_connection: 0,
            tracker: TaskTracker::new(),
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
        let (sender, mut inbound) = mpsc::channel::<Inbound>(QUEUE);
        let stop = cancel.child_token();
        self.spawn_receivers(&sender, &stop);
        let began = Instant::now();
        loop {
            if self.role == Side::Edge {
                self.start_due(began, &sender).await;
                if self.started == self.starts.len() && self.done.len() == self.players.len() {
                    break;
                }
            }
            let wake = self.next_wake(began);
            tokio::select! {
                _ = cancel.cancelled() => break,
                event = inbound.recv() => match event {
                    Some(event) => self.on_inbound(event, &sender, &stop).await,
                    None => break,
                },
                _ = sleep_until(wake) => self.on_timers(&sender).await,
            }
        }
        stop.cancel();
        // Nobody reads the queue any more: senders blocked on it must see it closed.
        inbound.close();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(1), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(role = ?self.role, "replay: socket tasks still running at the end");
        }
        if self.dropped.unmatched > 0 || self.dropped.unsent > 0 {
            tracing::info!(
                role = ?self.role,
                unmatched = self.dropped.unmatched,
                unsent = self.dropped.unsent,
                "replay: messages dropped"
            );
        }
        self.players
    }

    fn next_wake(&self, began: Instant) -> Option<Instant> {
        let player = self.timers.first().map(|(at, _)| Instant::from_std(*at));
        let start = (self.role == Side::Edge)
            .then(|| self.starts.get(self.started))
            .flatten()
            .map(|(_, offset)| began + *offset);
        player.into_iter().chain(start).min()
    }

    async fn start_due(&mut self, began: Instant, sender: &mpsc::Sender<Inbound>) {
        let now = Instant::now();
        while let Some(&(index, offset)) = self.starts.get(self.started) {
            if began + offset > now {
                break;
            }
            self.started += 1;
            let mut player = self.player(index, now.into_std());
            player.handle_timeout(now.into_std());
            self.players.insert(index, player);
            self.settle(index, sender).await;
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
    async fn on_timers(&mut self, sender: &mpsc::Sender<Inbound>) {
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
            self.settle(index, sender).await;
        }
    }

    /// After player `index` handled something: send what it queued, file its next timer,
    /// note whether it is done.
    async fn settle(&mut self, index: usize, sender: &mpsc::Sender<Inbound>) {
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
            self.send(to, transport, bytes, sender).await;
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

    fn spawn_receivers(&mut self, sender: &mpsc::Sender<Inbound>, stop: &CancellationToken) {
        let udp = self.sockets.udp.clone();
        let (udp_sender, udp_stop) = (sender.clone(), stop.clone());
        self.tracker.spawn(async move {
            let mut buffer = vec![0u8; 65_536];
            loop {
                let (length, from) = tokio::select! {
                    _ = udp_stop.cancelled() => return,
                    received = udp.recv_from(&mut buffer) => match received {
                        Ok(received) => received,
                        // ICMP errors from earlier sends surface here; keep listening.
                        Err(_) => continue,
                    },
                };
                let message = Inbound::Message {
                    bytes: Bytes::copy_from_slice(&buffer[..length]),
                    origin: Origin {
                        address: from,
                        connection: None,
                    },
                };
                // A full queue drops the datagram, as a full socket buffer would.
                let _ = udp_sender.try_send(message);
            }
        });
        let Some(listener) = self.sockets.tcp.take() else {
            return;
        };
        let (accept_sender, accept_stop) = (sender.clone(), stop.clone());
        let tracker = self.tracker.clone();
        let open = Arc::new(AtomicUsize::new(0));
        // Accepted connections are numbered apart from the ones we open.
        let first_id = 1 << 32;
        self.tracker.spawn(async move {
            let mut id = first_id;
            let mut warned = false;
            loop {
                let (stream, peer) = tokio::select! {
                    _ = accept_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            if !warned {
                                tracing::warn!(error = %error, "replay: accepting a connection failed");
                                warned = true;
                            }
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                            continue;
                        }
                    },
                };
                if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    // Over the limit: the stream is dropped, which closes it.
                    continue;
                }
                id += 1;
                let (reader, writer) = start_writer(&tracker, stream, &accept_stop);
                // The endpoint learns of the connection before any message on it.
                let connected = Inbound::Connected {
                    id,
                    writer: writer.clone(),
                };
                if accept_sender.send(connected).await.is_err() {
                    return;
                }
                let open = Some(open.clone());
                start_reader(&tracker, id, reader, peer, writer, &accept_sender, &accept_stop, open);
            }
        });
    }

    async fn on_inbound(
        &mut self,
        event: Inbound,
        sender: &mpsc::Sender<Inbound>,
        stop: &CancellationToken,
    ) {
        let (bytes, origin) = match event {
            Inbound::Connected { id, writer } => {
                self.connections.insert(id, writer);
                return;
            }
            Inbound::Closed { id } => {
                self.connections.remove(&id);
                if self.target_connection == Some(id) {
                    self.target_connection = None;
                }
                return;
            }
            Inbound::TargetConnected { outcome } => {
                self.on_target_connected(outcome, sender, stop);
                return;
            }
            Inbound::Message { bytes, origin } => (bytes, origin),
        };
        let Ok(message) = SipText::parse(&bytes) else {
            self.dropped.unmatched += 1;
            return;
        };
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
                self.send(Some(origin), Transport::Udp, answer.encode(), sender)
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
        self.settle(index, sender).await;
    }

    /// Sends to `to` (back the way it came), or to the target over `transport`.
    async fn send(
        &mut self,
        to: Option<Origin>,
        transport: Transport,
        bytes: Vec<u8>,
        sender: &mpsc::Sender<Inbound>,
    ) {
        let bytes = Bytes::from(bytes);
        let (address, connection) = match to {
            Some(origin) => (origin.address, origin.connection),
            None if transport == Transport::Tcp => match self.target_connection {
                Some(id) => (self.options.target, Some(id)),
                None => {
                    self.wait_for_target(bytes, sender);
                    return;
                }
            },
            None => (self.options.target, None),
        };
        match connection {
            Some(id) => {
                let queued = self
                    .connections
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

    /// Holds `bytes` for the target until our TCP connection to it is up, connecting in
    /// the background (the endpoint never waits on a connect). After a failure no new
    /// attempt for [`CONNECT_HOLDOFF`]; what comes meanwhile is dropped and counted.
    fn wait_for_target(&mut self, bytes: Bytes, sender: &mpsc::Sender<Inbound>) {
        if self.waiting.len() >= WRITE_QUEUE
            || self
                .connect_after
                .is_some_and(|after| Instant::now() < after)
        {
            self.dropped.unsent += 1;
            return;
        }
        self.waiting.push(bytes);
        if self.connecting {
            return;
        }
        self.connecting = true;
        let (target, sender) = (self.options.target, sender.clone());
        self.tracker.spawn(async move {
            let outcome =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                    Ok(Ok(stream)) => Ok(stream),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("timed out".to_string()),
                };
            // The endpoint may have stopped meanwhile; then the stream just closes.
            let _ = sender.send(Inbound::TargetConnected { outcome }).await;
        });
    }

    /// The background connect to the target ended: send what waited, or drop it.
    fn on_target_connected(
        &mut self,
        outcome: Result<TcpStream, String>,
        sender: &mpsc::Sender<Inbound>,
        stop: &CancellationToken,
    ) {
        self.connecting = false;
        let waiting = std::mem::take(&mut self.waiting);
        let stream = match outcome {
            Ok(stream) => stream,
            Err(error) => {
                let target = self.options.target;
                tracing::warn!(error, %target, "replay: cannot connect to the target");
                self.connect_after = Some(Instant::now() + CONNECT_HOLDOFF);
                self.dropped.unsent += waiting.len() as u64;
                return;
            }
        };
        self.next_connection += 1;
        let id = self.next_connection;
        let (reader, writer) = start_writer(&self.tracker, stream, stop);
        for bytes in waiting {
            if writer.try_send(bytes).is_err() {
                self.dropped.unsent += 1;
            }
        }
        self.connections.insert(id, writer.clone());
        let target = self.options.target;
        start_reader(
            &self.tracker,
            id,
            reader,
            target,
            writer,
            sender,
            stop,
            None,
        );
        self.target_connection = Some(id);
    }
}

/// Starts the writer task of a connection; returns its queue and the read half.
fn start_writer(
    tracker: &TaskTracker,
    stream: TcpStream,
    stop: &CancellationToken,
) -> (OwnedReadHalf, mpsc::Sender<Bytes>) {
    let (reader, mut writer) = stream.into_split();
    let (write_sender, mut write_queue) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let writer_stop = stop.clone();
    tracker.spawn(async move {
        loop {
            let bytes = tokio::select! {
                _ = writer_stop.cancelled() => return,
                bytes = write_queue.recv() => match bytes {
                    Some(bytes) => bytes,
                    None => return,
                },
            };
            if writer.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    (reader, write_sender)
}

/// Starts the reader task of connection `id`: frames messages into the endpoint's queue
/// and answers keep-alive pings through `writer`. `open` counts accepted connections.
#[allow(clippy::too_many_arguments)]
fn start_reader(
    tracker: &TaskTracker,
    id: u64,
    mut reader: OwnedReadHalf,
    peer: SocketAddr,
    writer: mpsc::Sender<Bytes>,
    sender: &mpsc::Sender<Inbound>,
    stop: &CancellationToken,
    open: Option<Arc<AtomicUsize>>,
) {
    if let Some(open) = &open {
        open.fetch_add(1, Ordering::Relaxed);
    }
    let (sender, stop) = (sender.clone(), stop.clone());
    tracker.spawn(async move {
        let mut framer = StreamFramer::new(MAX_LIVE_MESSAGE);
        let origin = Origin {
            address: peer,
            connection: Some(id),
        };
        'connection: loop {
            let read = tokio::select! {
                _ = stop.cancelled() => break,
                read = reader.read_buf(framer.buffer_mut()) => read,
            };
            if !matches!(read, Ok(length) if length > 0) {
                break;
            }
            loop {
                match framer.next_frame() {
                    Ok(Some(Frame::Message(bytes))) => {
                        let message = Inbound::Message { bytes, origin };
                        if sender.send(message).await.is_err() {
                            break 'connection;
                        }
                    }
                    Ok(Some(Frame::Ping)) => {
                        // A full queue skips the pong; the peer pings again.
                        let _ = writer.try_send(Bytes::from_static(PONG));
                    }
                    Ok(None) => break,
                    // A stream that cannot be framed is over.
                    Err(_) => break 'connection,
                }
            }
        }
        if let Some(open) = open {
            open.fetch_sub(1, Ordering::Relaxed);
        }
        // The endpoint may have stopped already; then nobody needs to know.
        let _ = sender.send(Inbound::Closed { id }).await;
    });
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
