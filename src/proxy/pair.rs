//! A test harness in the shape of quinn-proto's `Pair`: the proxy's pure core between a
//! scripted Edge and a scripted core, with no socket and a virtual clock. A story is a
//! plain `#[test]`: the Edge sends, the core receives and answers, time jumps, and what
//! each end got is read back as parsed messages. The harness plays the driver's part
//! too: it collects what the core wants sent, and it answers credential waits by
//! publishing credentials itself.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sip::wire::{Message, Method, Request, Response};

use super::engine::{Action, CredentialWait, Engine, SideAddresses, Transmit};
use super::routing::{RoutedTrunk, Router};
use crate::config::{AuthMode, Limits, Transport};
use crate::credentials::{Credential, CredentialManager, CredentialValue, ManagerOptions, Secret};
use crate::dns::Destinations;
use crate::sip::transaction::TimerConfig;
use crate::sip::wire;
use crate::stats::Stats;
use crate::transport::{AllowList, Inbound, Side};

/// The Edge appliance.
pub const EDGE: &str = "127.0.0.1:5070";
/// The core.
pub const CORE: &str = "127.0.0.1:5090";
/// The sidecar's socket facing the Edge.
pub const EDGE_SIDE: &str = "127.0.0.1:5060";
/// The sidecar's socket facing the core.
pub const CORE_SIDE: &str = "127.0.0.1:5062";

fn addr(text: &str) -> SocketAddr {
    text.parse()
        .expect("invariant: the harness's addresses parse")
}

/// The sidecar's core between one Edge and one core, one trunk `acme`.
pub struct Pair {
    pub engine: Engine,
    pub now: Instant,
    /// The counters the core bumps.
    pub stats: Arc<Stats>,
    /// The trunk's credential manager (none with `auth = "none"`).
    pub manager: Option<CredentialManager>,
    /// What reached the core, oldest first.
    pub at_core: VecDeque<Message>,
    /// What reached the Edge, oldest first.
    pub at_edge: VecDeque<Message>,
    /// Credential waits the core asked for and nobody answered yet.
    pub waits: VecDeque<(u64, CredentialWait)>,
    /// Answers to requests the sidecar originated.
    pub answers: VecDeque<(u64, Option<Box<Response>>)>,
    next_generation: u64,
}

impl Pair {
    /// A trunk with `auth`: with `bearer`, token `token-1` valid for an hour; with
    /// `digest`, user `trunk-user` and password `secret-1`.
    pub fn new(auth: AuthMode) -> Self {
        // The virtual clock starts at a real instant and only moves by `advance`.
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        let manager = (auth != AuthMode::None).then(|| {
            CredentialManager::detached(ManagerOptions {
                trunk: "acme".into(),
                organization: None,
                scopes: Vec::new(),
                organization_claim: None,
                policy: Default::default(),
                skew_threshold: Duration::from_secs(30),
            })
        });
        let endpoint = |text: &str| {
            Arc::new(Destinations::new(
                format!("udp:{text}")
                    .parse()
                    .expect("invariant: the harness's endpoints parse"),
            ))
        };
        let trunk = RoutedTrunk {
            index: 0,
            name: "acme".into(),
            auth,
            digest_realm: None,
            digest: crate::credentials::refusal::TrunkDigest::new(None),
            credentials: manager.clone(),
            sources: vec!["127.0.0.1/32"
                .parse()
                .expect("invariant: the harness's networks parse")],
            domain: None,
            port: None,
            edge: endpoint(EDGE),
            core: endpoint(CORE),
            core_sources: Vec::new(),
        };
        let allow = Arc::new(AllowList::new(vec!["127.0.0.0/8"
            .parse()
            .expect("invariant: the harness's networks parse")]));
        let own = vec![
            ("127.0.0.1".to_string(), addr(EDGE_SIDE)),
            ("127.0.0.1".to_string(), addr(CORE_SIDE)),
        ];
        let router = Router::new(vec![trunk], own, allow.clone(), allow);
        let side = |side: Side, local: &str| SideAddresses {
            side,
            advertise: "127.0.0.1".into(),
            udp_locals: vec![addr(local)],
            tcp_port: None,
            tls_port: None,
            tls_trunks: vec![false],
            connections: Default::default(),
        };
        let limits = Limits {
            max_message_size: 65_535,
            max_transactions: 10_000,
            queue_capacity: 1024,
            tcp_max_connections: 16,
            udp_buffer: 1 << 20,
            udp_threads: 0,
            tcp_idle_timeout: Duration::from_secs(300),
            tcp_connect_timeout: Duration::from_secs(5),
            tcp_write_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            failover_timeout: Duration::from_secs(3),
            failed_host_hold: Duration::from_secs(30),
        };
        let stats = Arc::new(Stats::default());
        let engine = Engine::new(
            TimerConfig::default(),
            limits,
            router,
            side(Side::Edge, EDGE_SIDE),
            side(Side::Core, CORE_SIDE),
            stats.clone(),
            now,
            7,
        );
        let mut pair = Self {
            engine,
            now,
            stats,
            manager,
            at_core: VecDeque::new(),
            at_edge: VecDeque::new(),
            waits: VecDeque::new(),
            answers: VecDeque::new(),
            next_generation: 1,
        };
        match auth {
            AuthMode::Bearer => pair.publish_token(Duration::from_secs(3600)),
            AuthMode::Digest => pair.publish(
                CredentialValue::UserPassword {
                    username: "trunk-user".into(),
                    password: Secret::new("secret-1"),
                },
                None,
            ),
            AuthMode::None => {}
        }
        pair
    }

    /// Publishes token `token-N` (N its generation) valid for `lifetime` from now.
    pub fn publish_token(&mut self, lifetime: Duration) {
        let generation = self.next_generation;
        self.publish(
            CredentialValue::Token(Secret::new(format!("token-{generation}"))),
            Some(self.now + lifetime),
        );
    }

    fn publish(&mut self, value: CredentialValue, expires: Option<Instant>) {
        let generation = self.next_generation;
        self.next_generation += 1;
        if let Some(manager) = &self.manager {
            manager.publish(Credential {
                fingerprint: format!("fp{generation}"),
                value,
                generation,
                obtained: self.now,
                expires,
            });
        }
    }

    /// The credential the trunk holds now.
    pub fn current(&self) -> Option<Arc<Credential>> {
        self.manager.as_ref()?.current_at(self.now)
    }

    /// The Edge sends `text` (a SIP message; line ends may be bare `\n`).
    pub fn edge_sends(&mut self, text: &str) {
        self.receive(Side::Edge, EDGE, EDGE_SIDE, text);
    }

    /// The core sends `text`.
    pub fn core_sends(&mut self, text: &str) {
        self.receive(Side::Core, CORE, CORE_SIDE, text);
    }

    /// The core sends `message` (one it built from what it received).
    pub fn core_sends_message(&mut self, message: Message) {
        let bytes = message.encode();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        self.core_sends(&text);
    }

    fn receive(&mut self, side: Side, peer: &str, local: &str, text: &str) {
        let wire = text.replace("\r\n", "\n").replace('\n', "\r\n");
        let message = wire::parse(bytes::Bytes::from(wire.clone()), true)
            .unwrap_or_else(|error| panic!("a story's message does not parse: {error}\n{wire}"));
        self.engine.handle_message(
            self.now,
            Inbound {
                side,
                transport: Transport::Udp,
                local: addr(local),
                peer: addr(peer),
                message,
            },
        );
        self.collect();
    }

    /// Moves the clock on by `step`, firing every timer due on the way, in order.
    pub fn advance(&mut self, step: Duration) {
        let end = self.now + step;
        while let Some(at) = self.engine.poll_timeout().filter(|at| *at <= end) {
            self.now = at.max(self.now);
            self.engine.handle_timeout(self.now);
            self.collect();
        }
        self.now = end;
    }

    /// Answers the oldest credential wait with the trunk's current credential.
    pub fn answer_wait(&mut self) -> CredentialWait {
        let credential = self.current();
        self.end_wait(credential)
    }

    /// Ends the oldest credential wait with `credential` (`None`: none came in time).
    pub fn end_wait(&mut self, credential: Option<Arc<Credential>>) -> CredentialWait {
        let (server, wait) = self
            .waits
            .pop_front()
            .expect("the core asked for no credential wait");
        self.engine
            .handle_credential(self.now, server, wait, credential);
        self.collect();
        wait
    }

    /// The sidecar sends a request of its own (a REGISTER) to the trunk's core.
    pub fn originate(&mut self, request: Request) -> Option<u64> {
        let id = self.engine.originate(self.now, 0, request);
        self.collect();
        id
    }

    fn collect(&mut self) {
        loop {
            if let Some(Transmit {
                destination, bytes, ..
            }) = self.engine.poll_transmit()
            {
                let message = wire::parse(bytes.clone(), true).unwrap_or_else(|error| {
                    panic!(
                        "the sidecar sent what does not parse: {error}\n{}",
                        String::from_utf8_lossy(&bytes)
                    )
                });
                let (queue, expected) = match destination.side {
                    Side::Core => (&mut self.at_core, CORE),
                    Side::Edge => (&mut self.at_edge, EDGE),
                };
                assert_eq!(destination.addr, addr(expected), "sent to an unknown peer");
                assert_eq!(destination.transport, Transport::Udp);
                queue.push_back(message);
            } else if let Some(action) = self.engine.poll_action() {
                match action {
                    Action::AwaitCredential { server, wait, .. } => {
                        self.waits.push_back((server, wait))
                    }
                    Action::Answered { request, response } => {
                        self.answers.push_back((request, response))
                    }
                }
            } else {
                // The metrics' pending count, kept as transactions change, is checked
                // against a walk of the table after every input.
                self.engine.publish(self.now);
                return;
            }
        }
    }

    /// The next request other than an ACK that reached the core; the ACKs before it
    /// (those the sidecar's client transactions send for a refusal) are passed over.
    pub fn core_receives(&mut self) -> Request {
        loop {
            match self.at_core.pop_front() {
                Some(Message::Request(request)) if request.method == Method::Ack => {}
                Some(Message::Request(request)) => return request,
                other => panic!("the core expected a request, got {other:?}"),
            }
        }
    }

    /// The next ACK that reached the core.
    pub fn core_receives_ack(&mut self) -> Request {
        match self.at_core.pop_front() {
            Some(Message::Request(request)) if request.method == Method::Ack => request,
            other => panic!("the core expected an ACK, got {other:?}"),
        }
    }

    /// The next response that reached the Edge (100 Trying skipped).
    pub fn edge_receives(&mut self) -> Response {
        loop {
            match self.at_edge.pop_front() {
                Some(Message::Response(response)) if response.code == 100 => {}
                Some(Message::Response(response)) => return response,
                other => panic!("the Edge expected a response, got {other:?}"),
            }
        }
    }

    /// Whether the Edge got nothing but 100 Trying since it last looked.
    pub fn edge_heard_only_trying(&self) -> bool {
        self.at_edge
            .iter()
            .all(|message| matches!(message, Message::Response(response) if response.code == 100))
    }

    /// Whether the core got nothing but ACKs since it last looked.
    pub fn core_heard_only_acks(&self) -> bool {
        self.at_core.iter().all(
            |message| matches!(message, Message::Request(request) if request.method == Method::Ack),
        )
    }
}

/// A response of `code` to `request` as a core or an Edge would send it: Via, From, To
/// (with tag `to_tag`), Call-ID and CSeq copied; for a 2xx or 1xx that makes a dialog,
/// the Record-Route copied and a Contact added.
pub fn answer(request: &Request, code: u16, to_tag: &str, contact: &str) -> Response {
    let mut response = wire::local_response(request, code, to_tag);
    if (101..300).contains(&code) {
        for value in wire::record_routes(&request.headers) {
            response.headers.push("Record-Route", &value);
        }
        response.headers.push("Contact", &format!("<{contact}>"));
    }
    response
}

/// The value of the first `name` header of a message's headers.
pub fn header<'a>(headers: &'a wire::Headers, name: &'a str) -> Option<&'a str> {
    wire::header_values(headers, name).next()
}

/// An INVITE from the Edge, call `call`, CSeq 1.
pub fn invite(call: &str) -> String {
    format!(
        "INVITE sip:+15550100@{EDGE_SIDE} SIP/2.0
Via: SIP/2.0/UDP {EDGE};branch=z9hG4bK-{call}-1;rport
Max-Forwards: 70
From: <sip:edge@127.0.0.1>;tag=edge-{call}
To: <sip:+15550100@127.0.0.1>
Call-ID: {call}
CSeq: 1 INVITE
Contact: <sip:edge@{EDGE}>
Content-Length: 0

"
    )
}

/// The route set a UAC takes from a 2xx (its Record-Route, reversed: RFC 3261 §12.1.2).
pub fn route_set(response: &Response) -> Vec<String> {
    let mut routes = wire::record_routes(&response.headers);
    routes.reverse();
    routes
}

/// An in-dialog request from the Edge: `method` with CSeq `seq` toward the core's
/// Contact, through `routes`; an ACK carries `ACK` in its CSeq whatever `seq` says.
pub fn in_dialog(call: &str, method: &str, seq: u32, routes: &[String], to_tag: &str) -> String {
    let route = routes.join(", ");
    format!(
        "{method} sip:core@{CORE} SIP/2.0
Via: SIP/2.0/UDP {EDGE};branch=z9hG4bK-{call}-{method}-{seq};rport
Max-Forwards: 70
Route: {route}
From: <sip:edge@127.0.0.1>;tag=edge-{call}
To: <sip:+15550100@127.0.0.1>;tag={to_tag}
Call-ID: {call}
CSeq: {seq} {method}
Content-Length: 0

"
    )
}
