//! The driver of the proxy's pure core ([`Engine`]): the task that owns the sockets,
//! the connection table and the clock. It takes TCP and TLS messages and connection news
//! from the transport tasks, sleeps until the core's next deadline, and does what the
//! core asks: sends its bytes, waits on credential managers, hands the answers to the
//! sidecar's own requests to their senders.
//!
//! The UDP sockets, the busiest path, are read without a hand-over between tasks:
//! - by default each socket has threads of its own ([`sip.udp_threads`]) waiting on
//!   it, as a multi-process proxy has several receivers per socket. The kernel wakes one
//!   idle reader per datagram; the reader takes the engine only if it is free, gives it
//!   every datagram queued on every such socket in the order they came, and sends what
//!   it answers over UDP after letting the lock go (a call's datagrams in the engine's
//!   order, whichever reader or this task sends them), handing anything else (TCP, TLS, credential
//!   waits) to this task. A reader that the scheduler holds back after waking a peer
//!   with a send holds nothing the next datagram needs: another reader takes it;
//! - with `udp_threads = 0` this task reads them itself when tokio says they are
//!   readable (the virtual-time tests run this way).
//!
//! [`sip.udp_threads`]: crate::config::Limits::udp_threads

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Instant as StdInstant;

use bytes::Bytes;
use rsip::Response;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, Notify};
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
    pub udp: Vec<udp::Listener>,
    pub udp_locals: Vec<SocketAddr>,
    /// Threads that read each [`udp::Listener::Threaded`] socket.
    pub udp_threads: usize,
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

    /// The UDP sockets of this side, for sending.
    fn udp_out(&self) -> UdpOut {
        UdpOut {
            side: self.side,
            sockets: self.udp.clone(),
            locals: self.udp_locals.clone(),
        }
    }
}

/// One side's UDP sockets, for sending from the driver or a reading thread.
#[derive(Clone)]
struct UdpOut {
    side: Side,
    sockets: Vec<udp::Listener>,
    locals: Vec<SocketAddr>,
}

impl UdpOut {
    /// The socket to send to `to` from: `local` when given, else the first of `to`'s
    /// address family, else the first.
    fn socket(&self, local: Option<SocketAddr>, to: SocketAddr) -> Option<&udp::Listener> {
        let by_local =
            local.and_then(|local| self.locals.iter().position(|candidate| *candidate == local));
        let by_family = || {
            self.locals
                .iter()
                .position(|candidate| candidate.is_ipv4() == to.is_ipv4())
        };
        by_local
            .or_else(by_family)
            .or((!self.sockets.is_empty()).then_some(0))
            .and_then(|index| self.sockets.get(index))
    }

    /// Sends one datagram; a missing socket or a send error is counted and dropped.
    fn send(&self, destination: &Destination, bytes: &[u8], stats: &Stats) {
        let Some(socket) = self.socket(destination.local, destination.addr) else {
            Stats::bump(&stats.send_failed);
            tracing::warn!(side = %self.side, "no udp socket on this side to send from");
            return;
        };
        if let Err(error) = udp::send_to(socket, bytes, destination.addr) {
            Stats::bump(&stats.send_failed);
            tracing::debug!(to = %destination.addr, error = %error, "udp send failed");
        }
    }
}

/// What the engine asked for, in the order it asked.
enum Output {
    Transmit(Transmit),
    Action(Action),
}

/// The next thing the engine asks for, if any.
fn next_output(engine: &mut Engine) -> Option<Output> {
    match engine.poll_transmit() {
        Some(transmit) => Some(Output::Transmit(transmit)),
        None => engine.poll_action().map(Output::Action),
    }
}

/// What the driver task and the UDP reading threads share.
struct Shared {
    engine: Mutex<Engine>,
    /// Told when a reading thread moved the engine's next deadline earlier, so that the
    /// driver does not sleep past it.
    deadline_moved: Notify,
    /// The calls (by a hash of their Call-ID) whose datagrams a reading thread is
    /// sending now, with what later inputs of the same call asked to send after them.
    /// Taken while the engine's lock is held, so a call's datagrams leave in the order
    /// the engine made them, whichever thread sends them.
    sending: Mutex<HashMap<u64, Vec<Transmit>>>,
}

impl Shared {
    /// The engine, whoever else panicked holding it: its state stays usable (every
    /// input leaves it consistent before anything can panic).
    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sending(&self) -> MutexGuard<'_, HashMap<u64, Vec<Transmit>>> {
        self.sending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `datagrams` of the call `key`, which the caller claimed, then what others
    /// queued for the call meanwhile, until none is left; then the call is free again.
    fn send_claimed(
        &self,
        key: u64,
        mut datagrams: Vec<Transmit>,
        mut send: impl FnMut(&Transmit),
    ) {
        loop {
            for transmit in datagrams.drain(..) {
                send(&transmit);
            }
            let mut sending = self.sending();
            match sending.get_mut(&key) {
                Some(queued) if !queued.is_empty() => std::mem::swap(queued, &mut datagrams),
                _ => {
                    sending.remove(&key);
                    return;
                }
            }
        }
    }
}

/// Which call an input belongs to, for the order of its datagrams: a hash of its
/// Call-ID (two calls that collide are merely kept in order with each other).
fn call_key(inbound: &crate::transport::Inbound) -> u64 {
    let headers = match &inbound.message {
        crate::sip::wire::Message::Request(request) => &request.headers,
        crate::sip::wire::Message::Response(response) => &response.headers,
    };
    key_of(crate::sip::wire::call_id(headers).unwrap_or(""))
}

/// The call a datagram the engine made belongs to, as [`call_key`] tells it.
fn transmit_key(transmit: &Transmit) -> u64 {
    let view = crate::sip::view::MessageView::parse(transmit.bytes.clone(), true);
    match view {
        Ok(view) => key_of(view.call_id().unwrap_or("")),
        Err(_) => key_of(""),
    }
}

fn key_of(call_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    call_id.hash(&mut hasher);
    hasher.finish()
}

/// The engine and its I/O.
pub struct Driver {
    shared: Arc<Shared>,
    /// Each side's UDP sockets, for sending: edge, then core.
    udp_out: [UdpOut; 2],
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
    /// Whether reading threads send UDP too: then this task's UDP datagrams take their
    /// turn in each call's order ([`Shared::sending`]).
    readers: bool,
}

/// A UDP socket that threads of its own read ([`udp::Listener::Threaded`]).
struct Threaded {
    socket: Arc<std::net::UdpSocket>,
    local: SocketAddr,
    context: ReceiveContext,
}

/// How long a reader that found the engine busy waits before it looks again. The
/// holder takes every datagram queued before it lets the engine go, so this is only
/// for a datagram that came as the holder was letting go; the holder never wakes a
/// reader (a wake-up on its own vCPU would hold back its sends).
const HOLDER_WAIT: std::time::Duration = std::time::Duration::from_micros(100);

/// One thread waiting on one UDP socket ([`udp::Listener::Threaded`]). It reads
/// nothing until it holds the engine; then it takes every datagram queued on every
/// such socket, in order, so the engine sees each socket's datagrams in the order they
/// came whichever reader woke.
struct Reader {
    /// Every socket read this way; `own` is the one this thread waits on.
    sockets: Arc<Vec<Threaded>>,
    own: usize,
    shared: Arc<Shared>,
    /// Both sides' UDP sockets, edge then core: what the engine answers over UDP is
    /// sent from this thread.
    out: [UdpOut; 2],
    /// Where everything else the engine asks for goes: the driver task.
    handed: mpsc::UnboundedSender<Output>,
}

impl Reader {
    /// Reads until `cancel`: waits until its socket has something, takes the engine
    /// if it is free, gives it every queued datagram, and sends what the engine
    /// answers over UDP once the lock is let go.
    fn run(self, cancel: &CancellationToken) {
        let Some(own) = self.sockets.get(self.own) else {
            return;
        };
        // One byte more than the limit tells an oversized datagram from one that fits.
        let mut buffer = vec![0u8; own.context.max_message_size + 1];
        // What each input asked to send, by call.
        let mut outputs: Vec<(u64, Vec<Transmit>)> = Vec::new();
        let mut mine: Vec<(u64, Vec<Transmit>)> = Vec::new();
        // A peek that failed took the socket's error: its ICMP error queue is read
        // once this thread holds the engine.
        let mut errors_pending = false;
        while !cancel.is_cancelled() {
            // Woken (one waiting reader per datagram) when something is queued, or an
            // ICMP error is.
            match own.socket.peek_from(&mut [0u8; 1]) {
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(_) => errors_pending = true,
                Ok(_) => {}
            }
            let mut engine = match self.shared.engine.try_lock() {
                Ok(engine) => engine,
                Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    std::thread::sleep(HOLDER_WAIT);
                    continue;
                }
            };
            let before = engine.poll_timeout();
            if std::mem::take(&mut errors_pending) {
                while let Ok((addr, reason)) = udp::next_unreachable(&*own.socket) {
                    tracing::debug!(side = %own.context.side, to = %addr, reason, "udp destination unreachable");
                    engine.handle_unreachable(now(), own.context.side, addr);
                }
                self.collect(&mut engine, 0, &mut outputs);
            }
            for threaded in self.sockets.iter() {
                self.take_queued(threaded, &mut engine, &mut buffer, &mut outputs);
            }
            if moved_earlier(before, engine.poll_timeout()) {
                self.shared.deadline_moved.notify_one();
            }
            // A call another thread is still sending gets these after its own; the
            // others this thread sends, with what comes for them meanwhile.
            {
                let mut sending = self.shared.sending();
                for (key, mut datagrams) in outputs.drain(..) {
                    if datagrams.is_empty() {
                        continue;
                    }
                    if let Some(queued) = sending.get_mut(&key) {
                        queued.append(&mut datagrams);
                    } else if let Some((_, owned)) =
                        mine.iter_mut().find(|(owned, _)| *owned == key)
                    {
                        owned.append(&mut datagrams);
                    } else {
                        sending.insert(key, Vec::new());
                        mine.push((key, datagrams));
                    }
                }
            }
            drop(engine);
            for (key, datagrams) in mine.drain(..) {
                self.shared
                    .send_claimed(key, datagrams, |transmit| self.send(transmit));
            }
        }
    }

    /// Gives the engine every datagram (and ICMP error) queued on `threaded` now,
    /// noting what each asked to send over UDP by its call.
    fn take_queued(
        &self,
        threaded: &Threaded,
        engine: &mut Engine,
        buffer: &mut [u8],
        outputs: &mut Vec<(u64, Vec<Transmit>)>,
    ) {
        loop {
            let read = udp::receive_now(&*threaded.socket, buffer);
            let input = match read {
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                // An ICMP error a send of ours caused (port or host unreachable): the
                // socket's error queue says which destination.
                Err(_) => None,
                read => match udp::admit(read, threaded.local, &threaded.context, buffer) {
                    udp::Received::Message(inbound) => Some(inbound),
                    udp::Received::Dropped | udp::Received::Empty => continue,
                },
            };
            let key = input.as_ref().map_or(0, call_key);
            match input {
                Some(inbound) => {
                    Stats::bump(&threaded.context.stats.messages_received);
                    engine.handle_message(now(), inbound);
                }
                None => {
                    while let Ok((addr, reason)) = udp::next_unreachable(&*threaded.socket) {
                        tracing::debug!(side = %threaded.context.side, to = %addr, reason, "udp destination unreachable");
                        engine.handle_unreachable(now(), threaded.context.side, addr);
                    }
                }
            }
            self.collect(engine, key, outputs);
        }
    }

    /// Takes what the engine asks for: UDP datagrams noted under `key`, the rest handed
    /// to the driver task.
    fn collect(&self, engine: &mut Engine, key: u64, outputs: &mut Vec<(u64, Vec<Transmit>)>) {
        let mut datagrams = Vec::new();
        while let Some(output) = next_output(engine) {
            match output {
                Output::Transmit(transmit) if transmit.destination.transport == Transport::Udp => {
                    datagrams.push(transmit);
                }
                // The driver task may be gone at shutdown: then nothing is due.
                other => {
                    let _ = self.handed.send(other);
                }
            }
        }
        outputs.push((key, datagrams));
    }

    fn send(&self, transmit: &Transmit) {
        if let Some(threaded) = self.sockets.first() {
            send_udp(&self.out, transmit, &threaded.context.stats);
        }
    }
}

/// Sends one UDP datagram the engine made from its side's sockets (`out`: edge, core).
fn send_udp(out: &[UdpOut; 2], transmit: &Transmit, stats: &Stats) {
    trace_sending(&transmit.destination, &transmit.bytes);
    let out = match transmit.destination.side {
        Side::Edge => &out[0],
        Side::Core => &out[1],
    };
    out.send(&transmit.destination, &transmit.bytes, stats);
}

/// Whether the engine's next deadline is now earlier than `before` (or there was none):
/// then the driver, asleep until `before`, must be woken.
fn moved_earlier(before: Option<StdInstant>, after: Option<StdInstant>) -> bool {
    after.is_some_and(|after| before.is_none_or(|before| after < before))
}

/// Logs what is sent, credentials redacted, at TRACE.
fn trace_sending(destination: &Destination, bytes: &[u8]) {
    if tracing::enabled!(tracing::Level::TRACE) {
        tracing::trace!(
            side = %destination.side,
            peer = %destination.addr,
            transport = %destination.transport,
            message = %crate::sip::message::redacted(bytes),
            "sending"
        );
    }
}

/// The engine's clock: tokio's, so `tokio::time::pause` drives it in tests.
fn now() -> StdInstant {
    tokio::time::Instant::now().into_std()
}

impl Driver {
    pub fn new(engine: Engine, edge: SideSockets, core: SideSockets, stats: Arc<Stats>) -> Self {
        let metrics = engine.metrics.clone();
        Self {
            shared: Arc::new(Shared {
                engine: Mutex::new(engine),
                deadline_moved: Notify::new(),
                sending: Mutex::new(HashMap::new()),
            }),
            udp_out: [edge.udp_out(), core.udp_out()],
            edge,
            core,
            stats,
            metrics,
            replies: HashMap::new(),
            waits: JoinSet::new(),
            wait_owners: HashMap::new(),
            readers: false,
        }
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.shared.engine()
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
        // The UDP sockets of both sides this task reads; the others have threads.
        let mut udp: Vec<(Side, usize, Arc<UdpSocket>)> = [&self.edge, &self.core]
            .into_iter()
            .flat_map(|io| {
                io.udp
                    .iter()
                    .enumerate()
                    .filter_map(|(index, socket)| match socket {
                        udp::Listener::Polled(socket) => Some((io.side, index, socket.clone())),
                        udp::Listener::Threaded(_) => None,
                    })
            })
            .collect();
        // What the reading threads hand over: anything but a UDP datagram.
        let (handed, mut handed_over) = mpsc::unbounded_channel();
        if let Err(error) = self.start_readers(&handed, &cancel) {
            tracing::error!(error = %error, "cannot start the udp reading threads; the proxy stops");
            cancel.cancel();
        }
        drop(handed);
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
            let deadline = self.engine().poll_timeout();
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
                Some(output) = handed_over.recv() => {
                    self.output(output);
                    for _ in 1..EVENT_BATCH {
                        let Ok(output) = handed_over.try_recv() else { break };
                        self.output(output);
                    }
                }
                // A reading thread moved the next deadline: the loop sleeps anew.
                () = self.shared.deadline_moved.notified() => {}
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
                        let id = self.engine().originate(now(), trunk, request);
                        if let Some(id) = id {
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
                            self.engine().handle_credential(now(), server, wait, credential);
                        }
                        Err(error) => {
                            // A wait that failed ends its request as one that found no
                            // credential: the refusal or the request goes on as is.
                            if let Some((server, wait)) = self.wait_owners.remove(&error.id()) {
                                tracing::warn!(error = %error, "a credential wait failed; going on without a credential");
                                self.engine().handle_credential(now(), server, wait, None);
                            }
                        }
                    }
                }
                _ = sleep => self.engine().handle_timeout(now()),
                _ = heartbeat.tick() => {
                    self.metrics.beat(tokio::time::Instant::now());
                    self.engine().publish(now());
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
        tracing::debug!(
            transactions = self.engine().transactions(),
            "engine stopped"
        );
    }

    /// Starts the threads that read each [`udp::Listener::Threaded`] socket; they stop
    /// within [`udp::READ_WAIT`] of `cancel`.
    fn start_readers(
        &mut self,
        handed: &mpsc::UnboundedSender<Output>,
        cancel: &CancellationToken,
    ) -> std::io::Result<()> {
        let runtime = tokio::runtime::Handle::current();
        let out = self.udp_out.clone();
        let mut sockets = Vec::new();
        let mut threads = Vec::new();
        for io in [&self.edge, &self.core] {
            for (socket, local) in io.udp.iter().zip(&io.udp_locals) {
                let udp::Listener::Threaded(socket) = socket else {
                    continue;
                };
                for number in 0..io.udp_threads {
                    threads.push((sockets.len(), format!("udp-{}-{number}", io.side)));
                }
                sockets.push(Threaded {
                    socket: socket.clone(),
                    local: *local,
                    context: io.receive.clone(),
                });
            }
        }
        let sockets = Arc::new(sockets);
        for (own, name) in threads {
            let reader = Reader {
                sockets: sockets.clone(),
                own,
                shared: self.shared.clone(),
                out: out.clone(),
                handed: handed.clone(),
            };
            let (runtime, cancel) = (runtime.clone(), cancel.clone());
            std::thread::Builder::new().name(name).spawn(move || {
                // tokio's clock, as the driver reads it.
                let _runtime = runtime.enter();
                reader.run(&cancel);
            })?;
            self.readers = true;
        }
        Ok(())
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
                    self.engine().handle_message(now(), inbound);
                    self.flush();
                }
                udp::Received::Dropped => {}
                udp::Received::Empty => return,
            }
        }
    }

    fn handle_event(&mut self, event: TransportEvent) {
        match event {
            TransportEvent::Message(inbound) => self.engine().handle_message(now(), inbound),
            TransportEvent::Unreachable { side, addr } => {
                self.engine().handle_unreachable(now(), side, addr);
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
                self.engine().handle_connection_opened(side, key, id);
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
                self.engine()
                    .handle_connection_closed(now(), side, key, id, connect_failed);
            }
        }
    }

    /// Does everything the engine asked for, until it asks for nothing more.
    fn flush(&mut self) {
        loop {
            // The lock is let go before the output is done: doing it may need the engine.
            let next = {
                let mut engine = self.engine();
                match next_output(&mut engine) {
                    Some(Output::Transmit(transmit))
                        if self.readers && transmit.destination.transport == Transport::Udp =>
                    {
                        // Claimed while the engine is held, as a reader claims, so that a
                        // call's datagrams leave in the engine's order.
                        let key = transmit_key(&transmit);
                        let mut sending = self.shared.sending();
                        match sending.get_mut(&key) {
                            Some(queued) => {
                                queued.push(transmit);
                                continue;
                            }
                            None => {
                                sending.insert(key, Vec::new());
                                Some(Err((key, transmit)))
                            }
                        }
                    }
                    other => other.map(Ok),
                }
            };
            match next {
                Some(Ok(output)) => self.output(output),
                Some(Err((key, transmit))) => {
                    let (out, stats) = (&self.udp_out, &self.stats);
                    self.shared.send_claimed(key, vec![transmit], |transmit| {
                        send_udp(out, transmit, stats);
                    });
                }
                None => return,
            }
        }
    }

    fn output(&mut self, output: Output) {
        match output {
            Output::Transmit(Transmit {
                destination,
                bytes,
                fallback,
            }) => self.send(destination, bytes, fallback),
            Output::Action(action) => self.act(action),
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
        trace_sending(&destination, &bytes);
        match destination.transport {
            Transport::Udp => {
                let out = match destination.side {
                    Side::Edge => &self.udp_out[0],
                    Side::Core => &self.udp_out[1],
                };
                out.send(&destination, &bytes, &self.stats);
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
                                    self.engine().handle_send_failed(now(), destination);
                                    return;
                                };
                                Some(client)
                            }
                            _ => None,
                        };
                        let (id, sender) = io.tcp.connect(addr, tls);
                        io.connections.insert(key, (id, sender.clone()));
                        self.engine().handle_connection_opened(side, key, id);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_is_woken_only_for_an_earlier_deadline() {
        let now = tokio::time::Instant::now().into_std();
        let later = now + std::time::Duration::from_millis(500);
        assert!(moved_earlier(None, Some(now)));
        assert!(moved_earlier(Some(later), Some(now)));
        assert!(!moved_earlier(Some(now), Some(now)));
        assert!(!moved_earlier(Some(now), Some(later)));
        assert!(!moved_earlier(Some(now), None));
        assert!(!moved_earlier(None, None));
    }
}
