//! The proxy's pure core: the transaction tables, dialogs' CSeq offsets, routing per
//! trunk, credential attachment, the one re-send and failover, and the random numbers
//! they need. It owns no socket, spawns nothing and never reads a clock: every input
//! comes with the time (`handle_message(now, ..)`, `handle_timeout(now)`, ...), and what
//! it wants done comes out of `poll_transmit()` (bytes for a destination),
//! `poll_action()` (wait for a credential, hand a response to the sidecar's own
//! requester) and `poll_timeout()`, in the shape of quinn-proto's `Endpoint`.
//! [`super::driver`] moves the bytes, sleeps and runs the waits; tests drive it directly
//! in virtual time.
//!
//! Request handling (RFC 3261 §16) is in [`super::request`]; this file holds the
//! inputs and outputs, the bookkeeping and response relaying.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use crate::sip::wire::{Message, Method, Request, Response};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;

use super::routing::Router;
use crate::config::{Limits, Transport};
use crate::credentials::{Credential, CredentialManager};
use crate::sip::transaction::{
    ClientEvent, ClientKey, ClientTransaction, ServerEvent, ServerKey, ServerTransaction,
    TimerConfig,
};
use crate::sip::wire;
use crate::stats::Stats;
use crate::transport::{ConnectionId, Inbound, Side};

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
    let call_id = wire::call_id(&request.headers).unwrap_or("");
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

pub use crate::sip::TRUNK_PARAM;

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

    /// A new branch for a request of call `call_id`, its nonce drawn from `random`.
    pub fn next(&self, random: &Random, call_id: &str) -> String {
        let nonce = random.u64();
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

/// The core's random numbers (tags, branch nonces, cnonces, weighted picks): a
/// ChaCha generator seeded by whoever makes the core, so a test can fix the seed.
pub struct Random(RefCell<StdRng>);

impl Random {
    pub fn new(seed: u64) -> Self {
        Self(RefCell::new(StdRng::seed_from_u64(seed)))
    }

    pub fn u64(&self) -> u64 {
        self.0.borrow_mut().gen()
    }

    pub fn u32(&self) -> u32 {
        self.0.borrow_mut().gen()
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

/// Bytes the core wants sent: [`Engine::poll_transmit`].
#[derive(Debug, Clone)]
pub struct Transmit {
    pub destination: Destination,
    pub bytes: Bytes,
    /// For a response over TCP or TLS: where to connect when no connection to
    /// `destination` is open any more (RFC 3261 §18.2.2: `received` with the sent-by
    /// port). The driver knows which connections live; the core does not wait to hear.
    pub fallback: Option<SocketAddr>,
}

/// What a parked request waits for from its trunk's credential manager.
#[derive(Debug, Clone, Copy)]
pub enum CredentialWait {
    /// Any valid credential, until `until`.
    Valid { until: StdInstant },
    /// A credential other than generation `rejected` (which was sent at `sent_at` and
    /// refused), until `until`; whoever runs the wait gives up at `give_up` at the
    /// latest (a refresh that hangs).
    Replacement {
        rejected: u64,
        sent_at: StdInstant,
        until: StdInstant,
        give_up: StdInstant,
    },
}

/// Work the core asks its driver to do: [`Engine::poll_action`].
pub enum Action {
    /// Wait on `manager` as `wait` says, then feed the outcome to
    /// [`Engine::handle_credential`] for server transaction `server`.
    AwaitCredential {
        server: u64,
        manager: CredentialManager,
        wait: CredentialWait,
    },
    /// The final response (our Via removed) to request `request` the sidecar originated
    /// ([`Engine::originate`]), or `None` when it got none (timeout, transport error).
    Answered {
        request: u64,
        response: Option<Box<Response>>,
    },
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::AwaitCredential { server, wait, .. } => f
                .debug_struct("AwaitCredential")
                .field("server", server)
                .field("wait", wait)
                .finish_non_exhaustive(),
            Action::Answered { request, response } => f
                .debug_struct("Answered")
                .field("request", request)
                .field("status", &response.as_ref().map(|response| response.code))
                .finish(),
        }
    }
}

/// A connection's transport, peer, and for a TLS connection the sidecar opened, the
/// trunk whose identity it carries.
pub type ConnectionKey = (Transport, SocketAddr, Option<usize>);

/// What the core knows of one side's listeners: the addresses and ports it advertises
/// in Via and Record-Route, which trunks can open TLS connections there, and which
/// connections are open (the driver reports them).
#[derive(Debug, Clone)]
pub struct SideAddresses {
    pub side: Side,
    /// Host written into Via and Record-Route.
    pub advertise: String,
    pub udp_locals: Vec<SocketAddr>,
    pub tcp_port: Option<u16>,
    pub tls_port: Option<u16>,
    /// Whether each trunk (by index) has TLS settings toward its peer on this side.
    pub tls_trunks: Vec<bool>,
    pub connections: HashMap<ConnectionKey, ConnectionId>,
}

impl SideAddresses {
    /// The port we listen on for `transport` on this side.
    pub fn port(&self, transport: Transport) -> Option<u16> {
        match transport {
            Transport::Udp => self.udp_locals.first().map(SocketAddr::port),
            Transport::Tcp => self.tcp_port,
            Transport::Tls => self.tls_port,
        }
    }

    /// Whether trunk `trunk` can open TLS connections on this side.
    pub fn has_tls(&self, trunk: usize) -> bool {
        self.tls_trunks.get(trunk).copied().unwrap_or(false)
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
        self.connections.contains_key(&(transport, addr, None))
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
    /// For a request the sidecar originated: its number, under which its final
    /// response goes out as [`Action::Answered`].
    pub local: Option<u64>,
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
                request.method,
                wire::in_dialog(&request.headers),
            ),
            resent: false,
        }
    }
}

pub(super) enum Entry {
    Server(ServerEntry),
    Client(ClientEntry),
}

impl Entry {
    fn is_final(&self) -> bool {
        match self {
            Entry::Server(server) => server.transaction.is_final(),
            Entry::Client(client) => client.transaction.is_final(),
        }
    }
}

/// The transactions by id, and how many of them await a final response.
///
/// Each entry is boxed: an entry is several hundred bytes and lives up to 64·T1, so the
/// table holds pointers (growing it moves a few bytes per transaction, not the
/// transactions) and the entries sit packed wherever the allocator put them.
///
/// The pending count is kept as transactions change ([`Entries::recount`] after every
/// pump, and on insert and removal), not by walking the table: a walk over tens of
/// thousands of lingering transactions every second stalled the messages behind it.
#[derive(Default)]
pub(super) struct Entries {
    slots: HashMap<u64, Slot>,
    pending: usize,
}

struct Slot {
    entry: Box<Entry>,
    /// Counted in `Entries::pending`.
    pending: bool,
}

impl Entries {
    pub(super) fn get(&self, id: &u64) -> Option<&Entry> {
        self.slots.get(id).map(|slot| &*slot.entry)
    }

    pub(super) fn get_mut(&mut self, id: &u64) -> Option<&mut Entry> {
        self.slots.get_mut(id).map(|slot| &mut *slot.entry)
    }

    pub(super) fn insert(&mut self, id: u64, entry: Entry) {
        let pending = !entry.is_final();
        self.pending += usize::from(pending);
        let slot = Slot {
            entry: Box::new(entry),
            pending,
        };
        if let Some(old) = self.slots.insert(id, slot) {
            self.pending -= usize::from(old.pending);
        }
    }

    pub(super) fn remove(&mut self, id: &u64) -> Option<Entry> {
        let slot = self.slots.remove(id)?;
        self.pending -= usize::from(slot.pending);
        Some(*slot.entry)
    }

    /// Notes whether transaction `id` still awaits a final response.
    pub(super) fn recount(&mut self, id: u64) {
        if let Some(slot) = self.slots.get_mut(&id) {
            let pending = !slot.entry.is_final();
            if pending != slot.pending {
                slot.pending = pending;
                if pending {
                    self.pending += 1;
                } else {
                    self.pending -= 1;
                }
            }
        }
    }

    /// Transactions without a final response.
    pub(super) fn pending(&self) -> usize {
        self.pending
    }

    pub(super) fn contains_key(&self, id: &u64) -> bool {
        self.slots.contains_key(id)
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Entry> {
        self.slots.values().map(|slot| &*slot.entry)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &Entry)> {
        self.slots.iter().map(|(id, slot)| (id, &*slot.entry))
    }
}

pub struct Engine {
    pub(super) timers: TimerConfig,
    pub(super) limits: Limits,
    pub(super) router: Router,
    pub(super) edge: SideAddresses,
    pub(super) core: SideAddresses,
    pub(super) stats: Arc<Stats>,
    pub(super) entries: Entries,
    pub(super) server_index: HashMap<ServerKey, u64>,
    pub(super) client_index: HashMap<ClientKey, u64>,
    timer_heap: BinaryHeap<Reverse<(StdInstant, u64)>>,
    next_id: u64,
    /// The time of the input being handled.
    pub(super) now: StdInstant,
    /// Tags, branches, cnonces and weighted picks draw from here.
    pub(super) random: Random,
    transmits: VecDeque<Transmit>,
    actions: VecDeque<Action>,
    /// CSeq offsets of dialogs whose requests were re-sent (DESIGN.md item 6).
    pub(super) dialogs: crate::sip::dialog::DialogTable,
    last_dialog_sweep: StdInstant,
    last_expiry: StdInstant,
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
}

/// What client transaction `client`'s request carries, if it carries a credential.
fn entry_carried(entries: &Entries, client: u64) -> Option<Carried> {
    match entries.get(&client) {
        Some(Entry::Client(entry)) => entry.carried,
        _ => None,
    }
}

impl Engine {
    /// A core starting at `now`, its random numbers drawn from a generator seeded with
    /// `seed`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        timers: TimerConfig,
        limits: Limits,
        router: Router,
        edge: SideAddresses,
        core: SideAddresses,
        stats: Arc<Stats>,
        now: StdInstant,
        seed: u64,
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
            entries: Entries::default(),
            server_index: HashMap::new(),
            client_index: HashMap::new(),
            timer_heap: BinaryHeap::new(),
            next_id: 0,
            now,
            random: Random::new(seed),
            transmits: VecDeque::new(),
            actions: VecDeque::new(),
            dialogs,
            last_dialog_sweep: now,
            last_expiry: now,
            branches: Branches::new(),
            metrics: Arc::default(),
            calls: super::calls::Calls::new(
                limits.max_transactions,
                std::time::Duration::from_secs(12 * 3600),
            ),
            draining: Arc::default(),
            health: crate::dns::HostHealth::default(),
            abandoned: super::failover::Abandoned::default(),
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

    /// Publishes the sizes of the tables into the metrics, and once a minute forgets
    /// calls whose BYE never came (after 12 h) and host holds that ran out. The driver
    /// calls it about once a second.
    pub fn publish(&mut self, now: StdInstant) {
        self.now = now;
        if now.saturating_duration_since(self.last_expiry) >= std::time::Duration::from_secs(60) {
            self.last_expiry = now;
            self.calls.expire(now);
            self.health.expire(now);
        }
        let pending = self.entries.pending();
        debug_assert_eq!(
            pending,
            self.entries
                .values()
                .filter(|entry| !entry.is_final())
                .count(),
            "the pending transaction count drifted"
        );
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

    /// A message received at `now`.
    pub fn handle_message(&mut self, now: StdInstant, inbound: Inbound) {
        self.now = now;
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
            Message::Request(request) => self.handle_request(source, request),
            Message::Response(response) => self.handle_response(source, response),
        }
    }

    /// The wait `wait` that server transaction `server` asked for
    /// ([`Action::AwaitCredential`]) ended with `credential` (`None`: none came in time,
    /// or the wait failed).
    pub fn handle_credential(
        &mut self,
        now: StdInstant,
        server: u64,
        wait: CredentialWait,
        credential: Option<Arc<Credential>>,
    ) {
        self.now = now;
        match wait {
            CredentialWait::Replacement { .. } => self.finish_resend(server, credential),
            CredentialWait::Valid { .. } => self.finish_forward(server, credential),
        }
    }

    /// A request the sidecar itself sends toward trunk `trunk`'s core (a REGISTER): its
    /// Via is added here and it runs as a client transaction. Returns its number, under
    /// which its final response comes out as [`Action::Answered`]; `None` when it cannot
    /// be sent at all (no core host, no listener for the transport). Credentials are the
    /// sender's business.
    pub fn originate(&mut self, now: StdInstant, trunk: usize, request: Request) -> Option<u64> {
        self.now = now;
        self.originate_request(trunk, request)
    }

    /// The driver opened, or accepted, connection `id` on `side`.
    pub fn handle_connection_opened(&mut self, side: Side, key: ConnectionKey, id: ConnectionId) {
        self.side_mut(side).connections.insert(key, id);
    }

    /// Connection `id` on `side` closed. `connect_failed`: it never got established, or
    /// its peer refused it before sending anything, so what was queued on it is lost.
    pub fn handle_connection_closed(
        &mut self,
        now: StdInstant,
        side: Side,
        key: ConnectionKey,
        id: ConnectionId,
        connect_failed: bool,
    ) {
        self.now = now;
        let table = &mut self.side_mut(side).connections;
        if table.get(&key) == Some(&id) {
            table.remove(&key);
        }
        if connect_failed {
            self.fail_transactions_to(side, key);
        }
    }

    /// The driver could not send to `destination` at all (a TLS hop with no connection
    /// and no trunk to open one for): a transport error for the transactions toward it,
    /// and any connection the core believed open there is gone.
    pub fn handle_send_failed(&mut self, now: StdInstant, destination: Destination) {
        self.now = now;
        let owner = match destination.transport {
            Transport::Tls => destination.trunk,
            _ => None,
        };
        let key = (destination.transport, destination.addr, owner);
        let connections = &mut self.side_mut(destination.side).connections;
        connections.remove(&key);
        connections.remove(&(destination.transport, destination.addr, None));
        self.fail_transactions_to(destination.side, key);
    }

    /// A UDP datagram sent to `addr` from `side` came back as an ICMP error.
    pub fn handle_unreachable(&mut self, now: StdInstant, side: Side, addr: SocketAddr) {
        self.now = now;
        self.fail_transactions_to(side, (Transport::Udp, addr, None));
    }

    /// The next bytes to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next piece of work for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Engine::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<StdInstant> {
        let sweep = (!self.dialogs.is_empty())
            .then(|| self.last_dialog_sweep + std::time::Duration::from_secs(1));
        let next = self.timer_heap.peek().map(|Reverse((at, _))| *at);
        match (next, sweep) {
            (Some(next), Some(sweep)) => Some(next.min(sweep)),
            (next, sweep) => next.or(sweep),
        }
    }

    /// Whether nothing waits to be sent or done.
    pub fn is_idle(&self) -> bool {
        self.transmits.is_empty() && self.actions.is_empty()
    }

    /// How many transactions exist now.
    pub fn transactions(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn side(&self, side: Side) -> &SideAddresses {
        match side {
            Side::Edge => &self.edge,
            Side::Core => &self.core,
        }
    }

    fn side_mut(&mut self, side: Side) -> &mut SideAddresses {
        match side {
            Side::Edge => &mut self.edge,
            Side::Core => &mut self.core,
        }
    }

    /// Queues bytes for `destination` ([`Engine::poll_transmit`]).
    pub(super) fn send(&mut self, destination: Destination, bytes: Bytes) {
        self.transmits.push_back(Transmit {
            destination,
            bytes,
            fallback: None,
        });
    }

    /// Queues work for the driver ([`Engine::poll_action`]).
    pub(super) fn act(&mut self, action: Action) {
        self.actions.push_back(action);
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
            .next(&self.random, wire::call_id(&request.headers).unwrap_or(""));
        let mut via = crate::sip::via::Via::new(
            transport.via_token(),
            &self.side(side).advertise,
            port,
            &branch,
        );
        via.set_param("rport", None);
        wire::push_via(&mut request.headers, &via);
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
        let to_tag = format!("{:08x}", self.random.u32());
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
                arrived: self.now,
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
            self.now,
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
        let code = response.code;
        let first_final = code >= 200 && !server.transaction.is_final();
        let now = self.now;
        let accepted = server
            .transaction
            .send_response(now, code, response.encode());
        if accepted && first_final && server.request.method == Method::Invite {
            let setup = now.saturating_duration_since(server.arrived);
            self.metrics.call_setup_seconds.observe(setup.as_secs_f64());
        }
        if accepted {
            self.pump_server(id);
        }
        accepted
    }

    /// Sends a response of the proxy's own making through server transaction `id`.
    pub(super) fn respond_locally(&mut self, id: u64, code: u16) {
        let Some(Entry::Server(server)) = self.entries.get(&id) else {
            return;
        };
        let response = wire::local_response(&server.request, code, &server.to_tag);
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
                    let (destination, reconnect) = (server.reply_to, server.reconnect);
                    let fallback = reconnect.filter(|_| destination.transport.is_reliable());
                    self.transmits.push_back(Transmit {
                        destination,
                        bytes,
                        fallback,
                    });
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
        self.entries.recount(id);
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
        self.entries.recount(id);
        self.schedule(id);
    }

    /// Answers the server transaction with `code` unless a final response went out.
    fn respond_if_pending(&mut self, server: u64, code: u16) {
        if let Some(Entry::Server(entry)) = self.entries.get(&server) {
            if !entry.transaction.is_final() {
                self.respond_locally(server, code);
            }
        }
    }

    /// A response from the client transaction's peer, for the server side.
    fn relay_response(&mut self, client: u64, mut response: Response) {
        let code = response.code;
        // RFC 3263 §4.3: a 503 without Retry-After says this host cannot serve now.
        if code == 503
            && wire::header_values(&response.headers, "Retry-After")
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
            if let Some(request) = self.entries.get_mut(&client).and_then(|entry| match entry {
                Entry::Client(client) => client.local.take(),
                Entry::Server(_) => None,
            }) {
                let response = wire::pop_via(&mut response.headers)
                    .is_ok()
                    .then(|| Box::new(response));
                self.act(Action::Answered { request, response });
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
        if wire::remove_top_via(&mut response.headers).is_err() {
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
            Some(Entry::Server(entry)) => wire::cseq(&entry.request.headers)
                .ok()
                .map(|cseq| (cseq, &entry.request.headers)),
            _ => None,
        };
        if let Some(((seq, method), request_headers)) = original {
            let code = response.code;
            // A dialog ends with its BYE's 2xx, or never starts when its INVITE fails;
            // only worth looking at while some dialog carries an offset.
            let answered_call = method == Method::Invite
                && (200..300).contains(&code)
                && !wire::in_dialog(request_headers);
            let ended_call = method == Method::Bye && code >= 200;
            let call_id = (answered_call || ended_call)
                .then(|| wire::call_id(request_headers).unwrap_or("").to_string());
            let ends_dialog = !self.dialogs.is_empty()
                && ((method == Method::Bye && (200..300).contains(&code))
                    || (method == Method::Invite
                        && code >= 300
                        && !wire::in_dialog(request_headers)));
            if wire::cseq(&response.headers).is_ok_and(|(current, _)| current != seq) {
                wire::set_cseq(&mut response.headers, seq, method);
            }
            if ends_dialog {
                self.end_dialog(&response);
            }
            match call_id {
                Some(call_id) if answered_call => self.calls.answered(self.now, &call_id),
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
        let Ok(via) = wire::top_via(&response.headers) else {
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
        self.send(destination, response.encode());
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
                client.transaction.handle_response(self.now, response);
                self.pump_client(id);
            }
            return;
        }
        // A late 2xx retransmission for an INVITE after the transaction ended (§16.7
        // step 1): forward it by Via, but only when the Via it pops is ours (our address
        // and a branch we made). Nothing else is forwarded without a transaction.
        let success = (200..300).contains(&response.code);
        let call_id = wire::call_id(&response.headers).unwrap_or("");
        let ours = self.branches.is_own(&key.branch, call_id)
            && wire::top_via(&response.headers)
                .is_ok_and(|via| self.router.is_own_host(&via.host, via.port));
        if !ours
            || !success
            || key.method.0 != Method::Invite
            || self.abandoned.contains(&key.branch)
        {
            Stats::bump(&self.stats.stray_responses);
            tracing::debug!(peer = %source.peer, "dropped response matching no transaction");
            return;
        }
        let mut response = response;
        if wire::remove_top_via(&mut response.headers).is_ok() {
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
            entry.transaction.note_cancel_sent(self.now);
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
                if let Some(request) = client.local {
                    // Ended without a final response: its sender learns that too.
                    self.act(Action::Answered {
                        request,
                        response: None,
                    });
                }
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
    pub fn handle_timeout(&mut self, now: StdInstant) {
        self.now = now;
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
        let made = branches.next(&Random::new(7), "call@test");
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
