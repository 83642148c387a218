//! Requests through the proxy (RFC 3261 §16): validation (§16.3), retransmission and ACK
//! matching, CANCEL (§16.10), Max-Forwards, loose routing (§16.4), Record-Route and Via
//! (§16.6), and local rejections.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::sip::wire::{Method, Request};

use super::engine::{Action, CredentialWait, Destination, Engine, Entry, TRUNK_PARAM};
use super::routing::{Hop, RouteError, RoutedTrunk};
use crate::config::{AuthMode, Transport};
use crate::credentials::{Credential, CredentialValue};
use crate::sip::digest::DigestClient;
use crate::sip::transaction::{ServerKey, ServerTransaction};
use crate::sip::view::{HeaderName, UriView, ViewError};
use crate::sip::wire;
use crate::stats::Stats;
use crate::transport::Side;

/// `Retry-After` (seconds) on the 503 a new dialog gets while the sidecar drains.
const DRAIN_RETRY_AFTER: &str = "30";

/// Where a message came from.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub side: Side,
    pub transport: Transport,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// A request ready to go to the next hop.
pub(super) struct Forward {
    request: Request,
    branch: String,
    destination: Destination,
    trunk: Option<Arc<str>>,
    trunk_index: Option<usize>,
    attach: Attach,
    /// The request goes to one of its trunk's core hosts and may move to another.
    failover: bool,
}

/// What a forwarded request carries of the sidecar's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attach {
    /// Nothing: toward the Edge, on a trunk without auth, toward a hop that is not the
    /// trunk's core, or an ACK or CANCEL that Digest does not cover.
    Nothing,
    /// The trunk's credential of this generation, which makes it eligible for a re-send.
    Generation(u64),
    /// An in-dialog request for a trunk that holds no valid credential right now: it
    /// waits (bounded) for one instead of being refused (DESIGN.md item 6).
    Awaiting,
}

/// Why a request is answered here instead of forwarded.
#[derive(Debug)]
struct Rejection {
    code: u16,
    reason: String,
}

impl Rejection {
    fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// A URI to route by (a Route entry's, or the Request-URI): a `sip:` or `sips:` URI
/// (416 for another scheme, RFC 3261 §16.3), else 400 naming `what`.
fn routable<'a>(uri: &'a str, what: &str) -> Result<UriView<'a>, Rejection> {
    UriView::parse(uri).map_err(|error| {
        // scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) (RFC 3986 §3.1)
        let scheme = uri.trim().split_once(':').map(|(scheme, _)| scheme);
        let is_scheme = scheme.is_some_and(|scheme| {
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        });
        match (error, scheme) {
            (ViewError::NotSipUri, Some(scheme)) if is_scheme => RouteError::Scheme {
                scheme: scheme.to_string(),
            }
            .into(),
            (other, _) => Rejection::new(400, format!("{what}: {other}")),
        }
    })
}

impl From<RouteError> for Rejection {
    fn from(error: RouteError) -> Self {
        Self::new(error.status(), error.to_string())
    }
}

impl Engine {
    pub(super) fn handle_request(&mut self, source: Source, mut request: Request) {
        let mut via = match wire::top_via(&request.headers) {
            Ok(via) => via,
            Err(error) => {
                // Without a Via there is nowhere to send an error response.
                Stats::bump(&self.stats.malformed_dropped);
                tracing::debug!(peer = %source.peer, error = %error, "dropped request without usable Via");
                return;
            }
        };
        if via.note_source(source.peer)
            && wire::replace_top_via(&mut request.headers, &via).is_err()
        {
            Stats::bump(&self.stats.malformed_dropped);
            return;
        }
        let reply_to = Destination {
            side: source.side,
            transport: source.transport,
            addr: match source.transport {
                Transport::Tcp | Transport::Tls => source.peer,
                Transport::Udp => via.response_address().unwrap_or(source.peer),
            },
            local: Some(source.local),
            trunk: None,
        };
        let key = match ServerKey::for_request(&request) {
            Ok(key) => key,
            // An ACK is never answered (§17.1.1.3): one we cannot key is dropped.
            Err(error) if request.method == Method::Ack => {
                Stats::bump(&self.stats.malformed_dropped);
                tracing::debug!(peer = %source.peer, error = %error, "dropped ACK that cannot be matched");
                return;
            }
            Err(error) => {
                tracing::debug!(peer = %source.peer, error = %error, "rejecting request");
                self.reject_stateless(reply_to, &request, 400, &error.to_string());
                return;
            }
        };
        if request.method == Method::Ack {
            self.handle_ack(source, &key, request);
            return;
        }
        if let Some(&id) = self.server_index.get(&key) {
            Stats::bump(&self.stats.retransmissions_absorbed);
            if let Some(Entry::Server(server)) = self.entries.get_mut(&id) {
                server.transaction.handle_request_retransmission();
            }
            self.pump_server(id);
            return;
        }
        if let Err(error) = check_mandatory_headers(&request) {
            self.reject_stateless(reply_to, &request, 400, &error);
            return;
        }
        // A CANCEL is let through a full table: it ends an INVITE and so frees room.
        if request.method == Method::Cancel {
            self.handle_cancel(source, key, reply_to, request);
            return;
        }
        if creates_dialog(&request) && self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            // Shutting down: calls in progress go on, new ones go elsewhere.
            Stats::bump(&self.stats.drain_rejected);
            let tag = format!("{:08x}", self.random.u32());
            let mut response = wire::local_response(&request, 503, &tag);
            response.headers.push("Retry-After", DRAIN_RETRY_AFTER);
            self.send(reply_to, response.encode());
            return;
        }
        if self.entries.len() >= self.limits.max_transactions {
            Stats::bump(&self.stats.overload_rejected);
            self.reject_stateless(reply_to, &request, 503, "Service Unavailable");
            return;
        }
        if self.is_looping(&request) {
            self.reject_stateless(reply_to, &request, 482, "Loop Detected");
            return;
        }
        let invite = request.method == Method::Invite;
        let transaction =
            ServerTransaction::new(invite, source.transport.is_reliable(), self.timers);
        let server = self.insert_server(key, transaction, reply_to, wire::skeleton(&request));
        let span = match self.entries.get_mut(&server) {
            Some(Entry::Server(entry)) => {
                if source.transport.is_reliable() {
                    entry.reconnect = via.reconnect_address();
                }
                entry.span.clone()
            }
            _ => tracing::Span::none(),
        };
        let _entered = span.enter();
        let mut request = request;
        if source.side == Side::Edge {
            self.translate_cseq(&mut request);
        }
        match self.prepare_forward(source, request) {
            Ok(forward) => {
                if let Some(trunk) = forward.trunk.as_deref() {
                    span.record("trunk", trunk);
                }
                self.dispatch(server, forward);
                if invite {
                    // §16.7 step 5 / §17.2.1: stop the Edge's INVITE retransmissions at
                    // once. Queued after the INVITE, which so leaves first; a final
                    // answer already given (nowhere to send) refuses it.
                    self.respond_locally(server, 100);
                }
            }
            Err(rejection) => {
                Stats::bump(&self.stats.locally_rejected);
                tracing::info!(peer = %source.peer, code = rejection.code, reason = %rejection.reason, "rejected request");
                if invite {
                    self.respond_locally(server, 100);
                }
                self.respond_locally(server, rejection.code);
            }
        }
    }

    /// Starts the client transaction of a prepared request, or parks it until its trunk
    /// holds a valid credential.
    fn dispatch(&mut self, server: u64, forward: Forward) {
        let generation = match forward.attach {
            Attach::Awaiting => {
                self.await_credential(server, forward);
                return;
            }
            Attach::Generation(generation) => Some(generation),
            Attach::Nothing => None,
        };
        tracing::debug!(to = %forward.destination.addr, branch = %forward.branch, "forwarding request");
        let failover = forward
            .trunk_index
            .filter(|_| forward.failover)
            .filter(|trunk| {
                self.router
                    .trunk(*trunk)
                    .is_some_and(|routed| self.router.core_hosts(routed) > 1)
            })
            .map(|trunk| (trunk, forward.request.clone()));
        let resend = generation
            .zip(forward.trunk_index)
            .map(|(generation, trunk)| {
                Box::new(super::resend::ResendInfo {
                    request: forward.request.clone(),
                    generation,
                    trunk,
                    is_resend: false,
                    sent_at: self.now,
                })
            });
        let client = self.start_client(
            forward.request,
            &forward.branch,
            forward.destination,
            Some(server),
            resend,
        );
        if let Some((trunk, request)) = failover {
            self.arm_failover(client, trunk, request);
        }
    }

    /// Parks an in-dialog request until its trunk's credential is valid again, at most
    /// `resend_wait`; [`Engine::finish_forward`] takes it up.
    fn await_credential(&mut self, server: u64, forward: Forward) {
        let manager = forward
            .trunk_index
            .and_then(|index| self.router.trunk(index))
            .and_then(|trunk| trunk.credentials.clone());
        let Some(manager) = manager else {
            // Nothing to wait for: the core decides.
            self.finish_forward_with(server, forward, None);
            return;
        };
        tracing::info!(
            trunk = manager.trunk(),
            "no valid credential for an in-dialog request; waiting for one"
        );
        Stats::bump(&self.stats.credential_waits);
        let Some(Entry::Server(entry)) = self.entries.get_mut(&server) else {
            return;
        };
        entry.pending_forward = Some(Box::new(forward));
        let until = entry.arrived + manager.resend_wait();
        self.act(Action::AwaitCredential {
            server,
            manager,
            wait: CredentialWait::Valid { until },
        });
    }

    /// The wait of a parked in-dialog request ended: it goes with the credential, or
    /// without one (counted), and the core decides.
    pub(super) fn finish_forward(&mut self, server: u64, credential: Option<Arc<Credential>>) {
        let Some(Entry::Server(entry)) = self.entries.get_mut(&server) else {
            return;
        };
        let Some(forward) = entry.pending_forward.take() else {
            return;
        };
        if entry.transaction.is_final() {
            return;
        }
        let span = entry.span.clone();
        let _entered = span.enter();
        self.finish_forward_with(server, *forward, credential);
    }

    fn finish_forward_with(
        &mut self,
        server: u64,
        mut forward: Forward,
        credential: Option<Arc<Credential>>,
    ) {
        let attached = match (credential, forward.trunk_index) {
            (Some(credential), Some(trunk)) => {
                // In a dialog a Digest challenge is answered by the re-send.
                self.put_credential(&mut forward.request, trunk, &credential, false)
                    .then_some(credential.generation)
            }
            _ => None,
        };
        forward.attach = match attached {
            Some(generation) => Attach::Generation(generation),
            None => {
                Stats::bump(&self.stats.sent_without_credential);
                tracing::warn!(
                    "no valid credential in time; forwarding the in-dialog request without one"
                );
                Attach::Nothing
            }
        };
        self.dispatch(server, forward);
    }

    /// ACK: for a non-2xx final response it belongs to the INVITE server transaction and
    /// stops there (hop by hop); for a 2xx it is forwarded end to end, statelessly.
    fn handle_ack(&mut self, source: Source, key: &ServerKey, request: Request) {
        if let Some(&id) = self.server_index.get(key) {
            if let Some(Entry::Server(server)) = self.entries.get_mut(&id) {
                if server.transaction.handle_ack(self.now) {
                    self.pump_server(id);
                    return;
                }
            }
        }
        // An ACK for a 2xx travels the route set this proxy record-routed; one without our
        // Route is a hop-by-hop ACK whose transaction is gone (after Timer H or I).
        let ours = wire::routes(&request.headers)
            .first()
            .and_then(|route| wire::route_uri(route).ok())
            .is_some_and(|uri| self.router.is_own(&uri));
        if !ours {
            Stats::bump(&self.stats.stray_acks);
            tracing::debug!(peer = %source.peer, "dropped ACK outside any record-routed dialog");
            return;
        }
        let mut request = request;
        if source.side == Side::Edge {
            self.translate_cseq(&mut request);
        }
        match self.prepare_forward(source, request) {
            Ok(forward) => {
                Stats::bump(&self.stats.stateless_forwards);
                self.send(forward.destination, forward.request.encode());
            }
            Err(rejection) => {
                // An ACK is never answered; count and drop it.
                Stats::bump(&self.stats.locally_rejected);
                tracing::debug!(peer = %source.peer, reason = %rejection.reason, "dropped ACK that cannot be routed");
            }
        }
    }

    /// CANCEL (§16.10): answered 200 here; the INVITE's client transaction is cancelled
    /// downstream once it has seen a provisional response (§9.1).
    fn handle_cancel(
        &mut self,
        source: Source,
        key: ServerKey,
        reply_to: Destination,
        request: Request,
    ) {
        let Some(&invite) = self.server_index.get(&key.with_method(Method::Invite)) else {
            self.reject_stateless(reply_to, &request, 481, "Call/Transaction Does Not Exist");
            return;
        };
        let transaction =
            ServerTransaction::new(false, source.transport.is_reliable(), self.timers);
        let cancel = self.insert_server(key, transaction, reply_to, request);
        self.respond_locally(cancel, 200);
        let (client, waiting) = match self.entries.get_mut(&invite) {
            Some(Entry::Server(server)) if !server.transaction.is_final() => {
                server.cancel_requested = true;
                // An INVITE waiting for a credential (its re-send after a refusal, or a
                // parked re-INVITE) has nothing outstanding at the core: it ends here and
                // is never sent.
                let resend = server.pending_resend.take().is_some();
                let parked = server.pending_forward.take().is_some();
                (server.client, resend || parked)
            }
            _ => (None, false),
        };
        if waiting {
            self.respond_locally(invite, 487);
            return;
        }
        let Some(client) = client else { return };
        if let Some(Entry::Client(entry)) = self.entries.get_mut(&client) {
            if entry.transaction.saw_provisional() {
                self.send_cancel(client);
            } else {
                entry.cancel_pending = true;
            }
        }
    }

    /// Max-Forwards, routing, Record-Route and Via for a request going to the other side.
    fn prepare_forward(
        &mut self,
        source: Source,
        mut request: Request,
    ) -> Result<Forward, Rejection> {
        let max_forwards = wire::max_forwards(&request.headers)
            .map_err(|error| Rejection::new(400, error.to_string()))?;
        if max_forwards == Some(0) {
            return Err(Rejection::new(483, "Too Many Hops"));
        }
        wire::set_max_forwards(
            &mut request.headers,
            max_forwards.map_or(70, |value| value - 1),
        );
        let out_side = source.side.opposite();
        let initial_from_edge = source.side == Side::Edge && !wire::in_dialog(&request.headers);
        let (hop, trunk_index) = self.next_hop(source, &mut request, out_side)?;
        let attach = self.apply_credentials(&mut request, out_side, trunk_index, hop)?;
        let trunk_name = trunk_index
            .and_then(|index| self.router.trunk(index))
            .map(|trunk| trunk.name.clone());
        let inbound = self.side(source.side);
        let outbound = self.side(out_side);
        if creates_dialog(&request) {
            // Two entries, one per side (the core sees the top one, the Edge the other), so
            // in-dialog requests from either end come back through the right socket.
            if let (Some(inner), Some(outer)) = (
                inbound.record_route_uri(source.transport, trunk_index),
                outbound.record_route_uri(hop.transport, trunk_index),
            ) {
                wire::push_record_route(&mut request.headers, &inner);
                wire::push_record_route(&mut request.headers, &outer);
            }
        }
        if hop.transport == Transport::Tls
            && !trunk_index.is_some_and(|index| outbound.has_tls(index))
            && !outbound.connected(Transport::Tls, hop.addr)
        {
            return Err(Rejection::new(
                502,
                format!(
                    "no TLS settings for {} (the hop is not a trunk's peer over TLS)",
                    hop.addr
                ),
            ));
        }
        let branch = self
            .push_own_via(&mut request, out_side, hop.transport)
            .ok_or_else(|| {
                Rejection::new(
                    502,
                    format!("no {} listener on the {out_side} side", hop.transport),
                )
            })?;
        Ok(Forward {
            request,
            branch,
            destination: Destination {
                side: out_side,
                transport: hop.transport,
                addr: hop.addr,
                local: None,
                trunk: trunk_index,
            },
            trunk: trunk_name,
            trunk_index,
            attach,
            failover: initial_from_edge,
        })
    }

    /// Sends a request the sidecar itself originates (a REGISTER) to trunk `trunk`'s
    /// core as a client transaction; its final response goes to `reply`.
    pub(super) fn originate_request(&mut self, trunk: usize, mut request: Request) -> Option<u64> {
        let hop = match self.choose_core_hop(trunk, &[], self.now) {
            Ok(hop) => hop,
            Err(error) => {
                // The sender learns it from the missing answer and retries later.
                tracing::warn!(trunk, error = %error, "cannot send a request of our own");
                return None;
            }
        };
        let Some(branch) = self.push_own_via(&mut request, Side::Core, hop.transport) else {
            tracing::warn!(transport = %hop.transport, "no core-side listener for the trunk's transport; cannot send");
            return None;
        };
        let destination = Destination {
            side: Side::Core,
            transport: hop.transport,
            addr: hop.addr,
            local: None,
            trunk: Some(trunk),
        };
        let copy = self
            .router
            .trunk(trunk)
            .is_some_and(|routed| self.router.core_hosts(routed) > 1)
            .then(|| request.clone());
        let client = self.start_client(request, &branch, destination, None, None);
        if let Some(Entry::Client(entry)) = self.entries.get_mut(&client) {
            entry.local = Some(client);
        } else {
            // Ended at once (nothing to send it on): no answer will come.
            self.act(Action::Answered {
                request: client,
                response: None,
            });
        }
        if let Some(request) = copy {
            self.arm_failover(client, trunk, request);
        }
        Some(client)
    }

    /// Credentials go toward the core only, and only the trunk's own, and only to the
    /// trunk's configured core (DESIGN.md items 2 and 5). On a `bearer` or `digest` trunk
    /// whatever the Edge put in `Authorization` or `Proxy-Authorization` is removed; a
    /// `bearer` trunk adds its current token, a `digest` trunk its answers to the
    /// challenges the core last sent (none before the first). Toward the Edge, and toward
    /// any hop that is not the trunk's core (an in-dialog request whose remote target or
    /// route leads elsewhere), nothing is added and both headers are removed. Without a
    /// valid credential an initial request is refused with 503 rather than sent with an
    /// expired one; an in-dialog request waits for one instead ([`Attach::Awaiting`]).
    fn apply_credentials(
        &mut self,
        request: &mut Request,
        out_side: Side,
        trunk_index: Option<usize>,
        hop: Hop,
    ) -> Result<Attach, Rejection> {
        let trunk = trunk_index.and_then(|index| self.router.trunk(index));
        let Some(trunk) = trunk.filter(|_| out_side == Side::Core) else {
            // Toward the Edge never; toward the core without a trunk, nothing the Edge
            // sent is vouched for either.
            strip_credentials(request);
            return Ok(Attach::Nothing);
        };
        if trunk.auth == AuthMode::None {
            return Ok(Attach::Nothing);
        }
        strip_credentials(request);
        if !self.router.is_core_of(trunk, hop) {
            Stats::bump(&self.stats.credentials_withheld);
            tracing::info!(trunk = %trunk.name, to = %hop.addr, "next hop is not the trunk's core; forwarding without the trunk's credentials");
            return Ok(Attach::Nothing);
        }
        let ack = request.method == Method::Ack;
        // ACK and CANCEL cannot be challenged (§22.1): no Digest answer for them.
        if trunk.auth == AuthMode::Digest && (ack || request.method == Method::Cancel) {
            return Ok(Attach::Nothing);
        }
        let in_dialog = wire::in_dialog(&request.headers);
        let (index, name) = (trunk.index, trunk.name.clone());
        let Some(credential) = trunk
            .credentials
            .as_ref()
            .and_then(|manager| manager.current_at(self.now))
        else {
            // An ACK for a 2xx cannot wait or be refused: the call would break.
            if ack {
                Stats::bump(&self.stats.sent_without_credential);
                return Ok(Attach::Nothing);
            }
            if in_dialog {
                return Ok(Attach::Awaiting);
            }
            return Err(Rejection::new(
                503,
                format!("trunk {name} has no valid credential"),
            ));
        };
        // Answers go ahead of a challenge only on requests outside a dialog: a core that
        // does not consume them would pass them on to the far end. In a dialog a
        // challenge is answered by the re-send.
        if !self.put_credential(request, index, &credential, !in_dialog) {
            return Err(Rejection::new(
                503,
                format!("trunk {name} has no credential of the kind its auth needs"),
            ));
        }
        tracing::debug!(trunk = %name, generation = credential.generation, fingerprint = %credential.fingerprint, "credential attached");
        Ok(Attach::Generation(credential.generation))
    }

    /// Adds trunk `trunk`'s `credential` to a request going to its core: the Bearer
    /// token, or (with `answer_digest`) the answers to the challenges the core last
    /// sent. False when the credential is not of the kind the trunk's auth needs.
    pub(super) fn put_credential(
        &mut self,
        request: &mut Request,
        trunk: usize,
        credential: &Credential,
        answer_digest: bool,
    ) -> bool {
        let Some((auth, digest)) = self
            .router
            .trunk(trunk)
            .map(|trunk| (trunk.auth, trunk.digest.clone()))
        else {
            return false;
        };
        match (&credential.value, auth) {
            (CredentialValue::Token(token), AuthMode::Bearer) => {
                request
                    .headers
                    .push("Authorization", &format!("Bearer {}", token.expose()));
                true
            }
            (CredentialValue::UserPassword { username, password }, AuthMode::Digest) => {
                if answer_digest {
                    let random = &self.random;
                    let cnonce = || format!("{:016x}", random.u64());
                    push_digest_answers(request, &mut digest.lock(), username, password, cnonce);
                }
                true
            }
            _ => false,
        }
    }

    /// Route processing (§16.4) and target selection: a remaining Route wins; a request
    /// in a dialog this proxy record-routed goes to its Request-URI (the remote target);
    /// anything else goes to its trunk, as to an outbound proxy. An Edge therefore cannot
    /// reach another trunk's core by writing its address into a Request-URI.
    fn next_hop(
        &self,
        source: Source,
        request: &mut Request,
        out_side: Side,
    ) -> Result<(Hop, Option<usize>), Rejection> {
        let mut routes = wire::routes(&request.headers);
        let original_count = routes.len();
        // A strict-routing previous hop put our URI in the Request-URI: restore it.
        if !routes.is_empty() && self.is_own_uri(&request.uri) {
            if let Some(last) = routes.pop() {
                routable(crate::sip::header::name_addr_uri(&last), "Route")?;
                request.uri = wire::Uri::new(crate::sip::header::name_addr_uri(&last));
            }
        }
        let mut removed_own = false;
        let mut dialog_trunk = None;
        while let Some(first) = routes.first() {
            let uri = routable(crate::sip::header::name_addr_uri(first), "Route")?;
            if !self.router.is_own(&uri) {
                break;
            }
            dialog_trunk = dialog_trunk.or_else(|| self.trunk_of_route(first, source));
            routes.remove(0);
            removed_own = true;
        }
        if routes.len() != original_count {
            wire::set_routes(&mut request.headers, &routes);
        }
        let initial = !wire::in_dialog(&request.headers);
        if initial && source.side == Side::Edge {
            // Outbound-proxy semantics: an initial request from the Edge goes to its
            // trunk's core whatever its Request-URI and the Route entries after ours say;
            // those stay in the message for the core to act on. So an Edge can never
            // carry its trunk's credentials to another host.
            let trunk = match dialog_trunk {
                Some(index) => self.router.trunk(index),
                None => self.router.edge_trunk(
                    source.peer.ip(),
                    source.local.port(),
                    request.uri.host().unwrap_or_default(),
                ),
            }
            .ok_or(RouteError::NoTrunk)?;
            let hop = self.pick_peer(trunk, Side::Core)?;
            return Ok((self.router.checked(hop, out_side)?, Some(trunk.index)));
        }
        if let Some(first) = routes.first() {
            let uri = routable(crate::sip::header::name_addr_uri(first), "Route")?;
            return Ok((self.router.hop_for_uri(&uri, out_side)?, dialog_trunk));
        }
        if removed_own {
            // A Route to us without our trunk parameter (an Edge preloading us as its
            // outbound proxy): the trunk is the one the source belongs to.
            let trunk = match dialog_trunk {
                Some(trunk) => Some(trunk),
                None => self
                    .contact_trunk(request, source)?
                    .or_else(|| self.source_trunk(source, request)),
            };
            let uri = routable(request.uri.as_str(), "Request-URI")?;
            return Ok((self.router.hop_for_uri(&uri, out_side)?, trunk));
        }
        let trunk = match source.side {
            Side::Edge => self.router.edge_trunk(
                source.peer.ip(),
                source.local.port(),
                request.uri.host().unwrap_or_default(),
            ),
            Side::Core => match self.contact_trunk(request, source)? {
                Some(index) => self.router.trunk(index),
                None => self.router.core_trunk(source.peer, source.transport),
            },
        }
        .ok_or(RouteError::NoTrunk)?;
        let hop = self.pick_peer(trunk, out_side)?;
        Ok((self.router.checked(hop, out_side)?, Some(trunk.index)))
    }

    /// The trunk's peer on `side` a new transaction goes to: for the core, RFC 3263
    /// order with failed hosts last; for the Edge, its (first) address.
    fn pick_peer(&self, trunk: &RoutedTrunk, side: Side) -> Result<Hop, RouteError> {
        match side {
            Side::Core => self.choose_core_hop(trunk.index, &[], self.now),
            Side::Edge => self.router.edge_hop(trunk, self.random.u32()),
        }
    }

    /// The trunk index our Record-Route wrote into a Route value, if it names a trunk
    /// the sender may use: an Edge cannot borrow another trunk's credentials by writing
    /// that trunk's index into a Route, and a core can name only a trunk it serves (or
    /// that trunk's in-dialog requests would carry its credentials to the wrong core).
    fn trunk_of_route(&self, route: &str, source: Source) -> Option<usize> {
        let uri = crate::sip::header::name_addr_uri(route);
        let params = &uri[uri.find(';')?..];
        let index = crate::sip::header::param(params, TRUNK_PARAM)??
            .parse::<usize>()
            .ok()?;
        let trunk = self.router.trunk(index)?;
        let allowed = match source.side {
            Side::Edge => self.router.edge_may_use(trunk, source.peer.ip()),
            Side::Core => self
                .router
                .is_core_sender(trunk, source.peer, source.transport),
        };
        if !allowed {
            Stats::bump(&self.stats.foreign_trunk_parameters);
            tracing::info!(side = %source.side, peer = %source.peer, trunk = %trunk.name, "ignoring a Route's trunk parameter naming a trunk the sender does not belong to");
        }
        allowed.then_some(trunk.index)
    }

    /// A request from the core to a Contact the sidecar registered (its URI carries the
    /// trunk's index, see `registration`) belongs to that trunk. `Ok(None)` when the
    /// Request-URI names no trunk; an error when it names one whose core is not the
    /// sender (several trunks may share one core, but a core cannot reach another
    /// trunk's Edge by naming it).
    fn contact_trunk(&self, request: &Request, source: Source) -> Result<Option<usize>, Rejection> {
        if source.side != Side::Core || !self.is_own_uri(&request.uri) {
            return Ok(None);
        }
        let Some(index) = request
            .uri
            .param(TRUNK_PARAM)
            .flatten()
            .and_then(|value| value.parse::<usize>().ok())
        else {
            return Ok(None);
        };
        match self.router.trunk(index) {
            Some(trunk)
                if self
                    .router
                    .is_core_sender(trunk, source.peer, source.transport) =>
            {
                Ok(Some(trunk.index))
            }
            _ => Err(Rejection::new(
                404,
                "the Contact names a trunk this core does not serve",
            )),
        }
    }

    /// Whether a Request-URI names this proxy.
    fn is_own_uri(&self, uri: &wire::Uri) -> bool {
        uri.view().is_ok_and(|uri| self.router.is_own(&uri))
    }

    /// The trunk a request belongs to by where it came from.
    fn source_trunk(&self, source: Source, request: &Request) -> Option<usize> {
        match source.side {
            Side::Edge => self.router.edge_trunk(
                source.peer.ip(),
                source.local.port(),
                request.uri.host().unwrap_or_default(),
            ),
            Side::Core => self.router.core_trunk(source.peer, source.transport),
        }
        .map(|trunk| trunk.index)
    }

    /// §16.3 step 4: a request that already passed through this proxy (one of its Vias
    /// carries our branch prefix and one of our addresses) is looping.
    fn is_looping(&self, request: &Request) -> bool {
        request
            .headers
            .iter()
            .filter(|header| header.kind() == HeaderName::Via)
            .flat_map(|header| crate::sip::header::split_list(header.value()))
            .filter_map(|value| crate::sip::view::ViaView::parse(value).ok())
            .any(|via| {
                via.branch
                    .is_some_and(|branch| branch.starts_with(super::OWN_BRANCH_PREFIX))
                    && self.router.is_own_host(via.sent_by.host, via.sent_by.port)
            })
    }

    /// Answers without a transaction: malformed requests, unknown CANCELs, overload.
    fn reject_stateless(
        &mut self,
        reply_to: Destination,
        request: &Request,
        code: u16,
        reason: &str,
    ) {
        Stats::bump(&self.stats.locally_rejected);
        tracing::debug!(to = %reply_to.addr, code, reason, "rejecting request statelessly");
        let tag = format!("{:08x}", self.random.u32());
        let response = wire::local_response(request, code, &tag);
        self.send(reply_to, response.encode());
    }
}

/// Whether the proxy must stay in the path of the dialog this request may create.
fn creates_dialog(request: &Request) -> bool {
    let initial = !wire::in_dialog(&request.headers);
    initial
        && matches!(
            request.method,
            Method::Invite | Method::Subscribe | Method::Refer | Method::Notify
        )
}

/// RFC 3261 §8.2 and §16.3: the headers every request needs, and a CSeq method equal to
/// the request method.
fn check_mandatory_headers(request: &Request) -> Result<(), String> {
    wire::call_id(&request.headers).map_err(|error| error.to_string())?;
    wire::from_value(&request.headers).map_err(|error| error.to_string())?;
    wire::to_value(&request.headers).map_err(|error| error.to_string())?;
    let (_, method) = wire::cseq(&request.headers).map_err(|error| error.to_string())?;
    if method != request.method {
        return Err(format!(
            "CSeq method {method} differs from request method {}",
            request.method
        ));
    }
    Ok(())
}

/// Removes `Authorization` and `Proxy-Authorization`.
pub(super) fn strip_credentials(request: &mut Request) {
    request.headers.retain(|header| {
        !matches!(
            header.kind(),
            HeaderName::Authorization | HeaderName::ProxyAuthorization
        )
    });
}

/// Adds the answers of a trunk's Digest state for this request's method and URI.
pub(super) fn push_digest_answers(
    request: &mut Request,
    client: &mut DigestClient,
    username: &str,
    password: &crate::credentials::Secret,
    cnonce: impl FnMut() -> String,
) {
    let method = request.method.to_string();
    let uri = request.uri.to_string();
    for (kind, value) in client.authorize(&method, &uri, username, password, cnonce) {
        request.headers.push(kind.credentials_header(), &value);
    }
}

#[cfg(test)]
mod tests {
    use super::routable;

    #[test]
    fn a_uri_to_route_by_is_sip_or_sips_else_416_and_malformed_is_400() {
        let garbage = routable(" <no scheme> ", "Route").map(|_| ()).unwrap_err();
        assert_eq!(garbage.code, 400);
        let tel = routable("tel:+15551234567", "Request-URI").unwrap_err();
        assert_eq!(
            (tel.code, tel.reason.as_str()),
            (416, "unsupported URI scheme \"tel\"")
        );
        let bad = routable("sip:bob@host:99999", "Route").unwrap_err();
        assert_eq!(bad.code, 400);
        assert!(bad.reason.starts_with("Route: "), "{}", bad.reason);
        let good = routable("sips:[2001:db8::1]:5071;transport=tls;lr", "Route").unwrap();
        assert_eq!(good.host_port.host_unbracketed(), "2001:db8::1");
        assert_eq!(good.host_port.port, Some(5071));
    }
}
