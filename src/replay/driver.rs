//! The replay driver: reads the capture, starts each dialogue's Edge player at its
//! captured time (scaled and capped like every gap) against the target, and with `core`
//! plays the core side too, on a local UDP and TCP listener, creating a core player for
//! each dialogue whose first request reaches it. Each endpoint is one task owning its
//! players; sockets feed it through a bounded queue and it sleeps until the earliest
//! player timer. The result is a [`Report`].
//!
//! The Edge side sends everything to the target, as a device with an outbound proxy
//! does; requests from the target reach it on its UDP socket or its TCP listener (same
//! port), the address its Via and Contact carry.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::build::{plain_response, Rewrite};
use super::capture::CaptureError;
use super::extract::{read, Filter};
use super::player::{Origin, Output, Pacing, Player};
use super::report::{differences, DialogueReport, Ladder, Report, SideReport, Verdict};
use super::script::{dialogues, Dialogue, Side};
use super::text::SipText;
use crate::config::Transport;
use crate::sip::framing::{Frame, StreamFramer};

/// Largest message accepted live.
const MAX_LIVE_MESSAGE: usize = 1 << 20;
/// Messages waiting for an endpoint; beyond it, UDP datagrams are dropped.
const QUEUE: usize = 4096;
/// How long the core side may go on after the Edge side finished.
const CORE_GRACE: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub capture: PathBuf,
    pub target: SocketAddr,
    /// Every dialogue over this transport; `None`: as captured.
    pub transport: Option<Transport>,
    /// Our address in Via and Contact; `None`: the one the route to the target uses.
    pub local_ip: Option<IpAddr>,
    /// Play the core side from the capture, listening here (UDP and TCP).
    pub core: Option<SocketAddr>,
    pub pacing: Pacing,
    pub filter: Filter,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("{path} holds no SIP dialogue{filtered}")]
    NoDialogues {
        path: PathBuf,
        filtered: &'static str,
    },
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no local address routes to {target}: {source}")]
    NoRoute {
        target: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs a replay to its end (or until `cancel`) and reports.
pub async fn replay(
    options: &ReplayOptions,
    cancel: &CancellationToken,
) -> Result<Report, ReplayError> {
    let extraction = read(&options.capture, &options.filter)?;
    let (found, without_call_id) = dialogues(&extraction.messages, &options.filter.call_ids);
    let mut reader = extraction.stats;
    reader.sip_without_call_id = without_call_id as u64;
    if found.is_empty() {
        let filtered = if options.filter.call_ids.is_empty()
            && options.filter.ports.is_empty()
            && options.filter.from.is_none()
            && options.filter.until.is_none()
        {
            ""
        } else {
            " that passes the filters"
        };
        return Err(ReplayError::NoDialogues {
            path: options.capture.clone(),
            filtered,
        });
    }
    let dialogues: Vec<Arc<Dialogue>> = found.into_iter().map(Arc::new).collect();
    let run = format!("{:08x}", rand::random::<u32>());
    let local_ip = match options.local_ip {
        Some(ip) => ip,
        None => route_to(options.target)?,
    };
    let core_cancel = cancel.child_token();
    let core_task = match options.core {
        Some(listen) => {
            let sockets = Sockets::bind(listen).await?;
            let endpoint = Endpoint::new(Side::Core, sockets, &dialogues, &run, options);
            let token = core_cancel.clone();
            Some(tokio::spawn(async move { endpoint.run(token).await }))
        }
        None => None,
    };
    let edge_sockets = Sockets::bind(SocketAddr::new(local_ip, 0)).await?;
    let edge = Endpoint::new(Side::Edge, edge_sockets, &dialogues, &run, options);
    let mut edge_players = edge.run(cancel.clone()).await;
    let mut core_players = HashMap::new();
    if let Some(task) = core_task {
        // The core side may still be answering the last messages.
        tokio::select! {
            _ = tokio::time::sleep(CORE_GRACE) => {}
            _ = cancel.cancelled() => {}
        }
        core_cancel.cancel();
        if let Ok(players) = task.await {
            core_players = players;
        }
    }
    let mut reports = Vec::new();
    for (index, dialogue) in dialogues.iter().enumerate() {
        let mut edge_side = side_report(dialogue, Side::Edge, edge_players.remove(&index));
        let core_side = options
            .core
            .map(|_| side_report(dialogue, Side::Core, core_players.remove(&index)));
        // Nothing of it reached the core we play: whatever the Edge saw, the dialogue
        // did not happen as captured (a hop in between dropped it).
        if core_side.as_ref().map(|core| core.verdict) == Some(Verdict::NotPlayed)
            && edge_side.verdict == Verdict::Matched
        {
            edge_side.verdict = Verdict::TimedOut;
            edge_side
                .notes
                .push("the core side never received this dialogue".into());
        }
        reports.push(DialogueReport {
            call_id: dialogue.call_id.clone(),
            transport: options.transport.unwrap_or(dialogue.transport).to_string(),
            edge: dialogue.edge.to_string(),
            core: dialogue.core.to_string(),
            other_legs: dialogue.other_legs,
            edge_side,
            core_side,
        });
    }
    Ok(Report::new(
        options.capture.display().to_string(),
        options.target.to_string(),
        reader,
        reports,
    ))
}

fn side_report(dialogue: &Dialogue, role: Side, player: Option<Player>) -> SideReport {
    let captured = Ladder::captured(dialogue, role);
    if let Some(reason) = dialogue.unplayable() {
        return SideReport {
            verdict: Verdict::Skipped,
            captured,
            replayed: Ladder::default(),
            differences: Vec::new(),
            notes: vec![reason],
        };
    }
    let Some(player) = player else {
        return SideReport {
            verdict: Verdict::NotPlayed,
            replayed: Ladder::default(),
            differences: differences(&captured, &Ladder::default()),
            captured,
            notes: vec!["this side never played: nothing of the dialogue reached it".into()],
        };
    };
    let replayed = player.ladder().clone();
    let differences = differences(&captured, &replayed);
    let mut notes = player.notes().to_vec();
    let verdict = match player.outcome() {
        Some(super::player::Outcome::TimedOut { step, waiting_for }) => {
            notes.push(format!(
                "timed out waiting for step {} ({waiting_for})",
                step + 1
            ));
            Verdict::TimedOut
        }
        None => {
            notes.push("interrupted before the dialogue ended".into());
            Verdict::TimedOut
        }
        Some(super::player::Outcome::Completed) if differences.is_empty() => Verdict::Matched,
        Some(super::player::Outcome::Completed) => Verdict::Diverged,
    };
    SideReport {
        verdict,
        captured,
        replayed,
        differences,
        notes,
    }
}

/// The local address the kernel would use toward `target`.
fn route_to(target: SocketAddr) -> Result<IpAddr, ReplayError> {
    let unspecified: SocketAddr = match target {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let probe = std::net::UdpSocket::bind(unspecified)
        .and_then(|socket| socket.connect(target).map(|()| socket))
        .and_then(|socket| socket.local_addr())
        .map_err(|source| ReplayError::NoRoute { target, source })?;
    Ok(probe.ip())
}

/// A UDP socket and a TCP listener on the same address.
struct Sockets {
    udp: Arc<UdpSocket>,
    /// Taken by the accept task.
    tcp: Option<TcpListener>,
    local: SocketAddr,
}

impl Sockets {
    async fn bind(address: SocketAddr) -> Result<Sockets, ReplayError> {
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

/// A message that reached an endpoint.
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
}

struct Endpoint {
    role: Side,
    sockets: Sockets,
    dialogues: Vec<Arc<Dialogue>>,
    by_call_id: HashMap<String, usize>,
    rewrite: Rewrite,
    options: ReplayOptions,
    players: HashMap<usize, Player>,
    /// When each Edge player starts, from the start of the run.
    starts: Vec<Duration>,
    connections: HashMap<u64, mpsc::Sender<Bytes>>,
    /// Our connection to the target, per transport use.
    target_connection: Option<u64>,
    next_connection: u64,
    tracker: TaskTracker,
    unmatched: u64,
    /// Dialogues that cannot be started live (see [`Dialogue::unplayable`]).
    skipped: std::collections::HashSet<usize>,
}

impl Endpoint {
    fn new(
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
        let mut starts = Vec::new();
        let mut offset = Duration::ZERO;
        let mut previous: Option<Duration> = None;
        for dialogue in dialogues {
            let first = dialogue
                .steps
                .first()
                .map_or(Duration::ZERO, |step| step.time);
            if let Some(previous) = previous {
                offset += options.pacing.scale(first.saturating_sub(previous));
            }
            previous = Some(first);
            starts.push(offset);
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
            starts,
            connections: HashMap::new(),
            target_connection: None,
            next_connection: 0,
            tracker: TaskTracker::new(),
            unmatched: 0,
            skipped: dialogues
                .iter()
                .enumerate()
                .filter(|(_, dialogue)| dialogue.unplayable().is_some())
                .map(|(index, _)| index)
                .collect(),
        }
    }

    fn transport_of(&self, index: usize) -> Transport {
        self.options
            .transport
            .unwrap_or(self.dialogues[index].transport)
    }

    /// Plays until every player is done (Edge) or `cancel` fires; returns the players.
    async fn run(mut self, cancel: CancellationToken) -> HashMap<usize, Player> {
        let (sender, mut inbound) = mpsc::channel::<Inbound>(QUEUE);
        let stop = cancel.child_token();
        self.spawn_receivers(&sender, &stop);
        let began = Instant::now();
        loop {
            let now = Instant::now();
            if self.role == Side::Edge {
                self.start_due(began, now.into_std());
                if self.players.len() + self.skipped.len() == self.dialogues.len()
                    && self.players.values().all(Player::is_done)
                {
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
                _ = sleep_until(wake) => {
                    let now = Instant::now().into_std();
                    let indices: Vec<usize> = self.players.keys().copied().collect();
                    for index in indices {
                        if let Some(player) = self.players.get_mut(&index) {
                            if player.poll_timeout().is_some_and(|at| at <= now) {
                                player.handle_timeout(now);
                            }
                        }
                        self.flush(index, &sender, &stop).await;
                    }
                }
            }
        }
        stop.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tracker.wait()).await;
        if self.unmatched > 0 {
            tracing::info!(
                role = ?self.role,
                unmatched = self.unmatched,
                "replay: messages for no dialogue of this run were answered 481 or dropped"
            );
        }
        self.players
    }

    fn next_wake(&self, began: Instant) -> Option<Instant> {
        let players = self
            .players
            .values()
            .filter_map(Player::poll_timeout)
            .map(Instant::from_std);
        let start = (self.role == Side::Edge)
            .then(|| {
                (0..self.dialogues.len())
                    .find(|index| {
                        !self.players.contains_key(index) && !self.skipped.contains(index)
                    })
                    .map(|index| began + self.starts[index])
            })
            .flatten();
        players.chain(start).min()
    }

    fn start_due(&mut self, began: Instant, now: std::time::Instant) {
        for index in 0..self.dialogues.len() {
            if self.players.contains_key(&index)
                || self.skipped.contains(&index)
                || began + self.starts[index] > Instant::from_std(now)
            {
                continue;
            }
            let player = self.player(index, now);
            self.players.insert(index, player);
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
        let first_id = 1 << 32;
        self.tracker.spawn(async move {
            let mut id = first_id;
            loop {
                let (stream, peer) = tokio::select! {
                    _ = accept_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                id += 1;
                spawn_connection(&tracker, id, stream, peer, &accept_sender, &accept_stop).await;
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
            Inbound::Message { bytes, origin } => (bytes, origin),
        };
        let Ok(message) = SipText::parse(&bytes) else {
            self.unmatched += 1;
            return;
        };
        let index = message
            .call_id()
            .and_then(|live| self.rewrite.captured_call_id(live))
            .and_then(|captured| self.by_call_id.get(captured))
            .copied();
        let Some(index) = index else {
            self.unmatched += 1;
            if message.is_request() && message.method() != Some("ACK") {
                let answer =
                    plain_response(&message, 481, "Call/Transaction Does Not Exist", "replay");
                self.send(Some(origin), Transport::Udp, answer.encode(), sender, stop)
                    .await;
            }
            return;
        };
        let now = Instant::now().into_std();
        if !self.players.contains_key(&index) {
            if self.role == Side::Edge || !message.is_request() || self.skipped.contains(&index) {
                self.unmatched += 1;
                return;
            }
            let player = self.player(index, now);
            self.players.insert(index, player);
        }
        if let Some(player) = self.players.get_mut(&index) {
            player.handle_message(now, message, origin);
        }
        self.flush(index, sender, stop).await;
    }

    /// Sends what player `index` has queued.
    async fn flush(
        &mut self,
        index: usize,
        sender: &mpsc::Sender<Inbound>,
        stop: &CancellationToken,
    ) {
        let transport = self.transport_of(index);
        loop {
            let Some(player) = self.players.get_mut(&index) else {
                return;
            };
            let Some(Output { bytes, to }) = player.poll_output() else {
                return;
            };
            let to = to.or_else(|| match self.role {
                Side::Edge => None,
                Side::Core => player.peer(),
            });
            self.send(to, transport, bytes, sender, stop).await;
        }
    }

    /// Sends to `to` (back where it came from), or to the target over `transport`.
    async fn send(
        &mut self,
        to: Option<Origin>,
        transport: Transport,
        bytes: Vec<u8>,
        sender: &mpsc::Sender<Inbound>,
        stop: &CancellationToken,
    ) {
        let bytes = Bytes::from(bytes);
        let (address, connection) = match to {
            Some(origin) => (origin.address, origin.connection),
            None if transport == Transport::Tcp => {
                let id = self.target_connection(sender, stop).await;
                (self.options.target, id)
            }
            None => (self.options.target, None),
        };
        match connection {
            Some(id) => {
                if let Some(writer) = self.connections.get(&id) {
                    // A full or closed connection loses the message; the player's
                    // timeout reports what never came back.
                    let _ = writer.try_send(bytes);
                }
            }
            None => {
                if let Err(error) = self.sockets.udp.send_to(&bytes, address).await {
                    tracing::debug!(error = %error, %address, "replay: UDP send failed");
                }
            }
        }
    }

    /// Our TCP connection to the target, opened when first needed.
    async fn target_connection(
        &mut self,
        sender: &mpsc::Sender<Inbound>,
        stop: &CancellationToken,
    ) -> Option<u64> {
        if let Some(id) = self.target_connection {
            if self.connections.contains_key(&id) {
                return Some(id);
            }
        }
        let target = self.options.target;
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::warn!(error = %error, %target, "replay: cannot connect to the target");
                return None;
            }
            Err(_) => {
                tracing::warn!(%target, "replay: connecting to the target timed out");
                return None;
            }
        };
        self.next_connection += 1;
        let id = self.next_connection;
        let writer = spawn_connection(&self.tracker, id, stream, target, sender, stop).await;
        self.connections.insert(id, writer);
        self.target_connection = Some(id);
        Some(id)
    }
}

/// A reader task framing messages into the endpoint's queue and a writer task; returns
/// the writer's queue.
async fn spawn_connection(
    tracker: &TaskTracker,
    id: u64,
    stream: TcpStream,
    peer: SocketAddr,
    sender: &mpsc::Sender<Inbound>,
    stop: &CancellationToken,
) -> mpsc::Sender<Bytes> {
    let (mut reader, mut writer) = stream.into_split();
    let (write_sender, mut write_queue) = mpsc::channel::<Bytes>(256);
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
    // Announce the connection before any of its messages.
    if sender
        .send(Inbound::Connected {
            id,
            writer: write_sender.clone(),
        })
        .await
        .is_err()
    {
        return write_sender;
    }
    let (reader_sender, reader_stop) = (sender.clone(), stop.clone());
    tracker.spawn(async move {
        let mut framer = StreamFramer::new(MAX_LIVE_MESSAGE);
        let origin = Origin {
            address: peer,
            connection: Some(id),
        };
        'connection: loop {
            let read = tokio::select! {
                _ = reader_stop.cancelled() => break,
                read = reader.read_buf(framer.buffer_mut()) => read,
            };
            if !matches!(read, Ok(length) if length > 0) {
                break;
            }
            loop {
                match framer.next_frame() {
                    Ok(Some(Frame::Message(bytes))) => {
                        let message = Inbound::Message { bytes, origin };
                        if reader_sender.send(message).await.is_err() {
                            break 'connection;
                        }
                    }
                    Ok(Some(Frame::Ping)) => continue,
                    Ok(None) => break,
                    // A stream that cannot be framed is over.
                    Err(_) => break 'connection,
                }
            }
        }
        // The endpoint may have stopped already; then nobody needs to know.
        let _ = reader_sender.send(Inbound::Closed { id }).await;
    });
    write_sender
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
