//! A simulated core on loopback UDP: a SIP UAS that demands a Bearer token (RFC 8898) on
//! every request but ACK and CANCEL, checks it against the simulated token endpoint, and
//! answers calls itself. No token: 401 with a Bearer challenge; a token it does not accept
//! (unknown, expired, revoked): 403. Accepted INVITEs get 180 and a 200 that echoes the
//! Record-Route and carries the core's Contact; BYE, OPTIONS and the rest get 200.
//!
//! Nearly stateless: it remembers only the last CSeq per Call-ID and answers a request
//! numbered lower (or equal, but for a retransmission) with 500, as RFC 3261 §12.2.2
//! asks of a UAS; that is what makes a proxy's broken CSeq translation visible. Loopback
//! UDP does not lose messages, so answers are not retransmitted.
//!
//! With a far end ([`SimCore::start_relay`]) it is a stateless proxy instead of a UAS
//! for the requests it accepts: it record-routes initial INVITEs, sends new requests to
//! the far end (a sipp UAS, say) and in-dialog ones along their Route or Request-URI,
//! and relays responses back by Via. Tokens are checked on every request but ACK and
//! CANCEL, as before.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rsip::message::HasHeaders;
use rsip::{Header, Method, SipMessage};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::idp::{Idp, TokenCheck, Validation};
use crate::sip::message;

/// What the core has seen.
#[derive(Debug, Default)]
pub struct CoreStats {
    pub requests: AtomicU64,
    pub accepted: AtomicU64,
    pub challenged_401: AtomicU64,
    pub rejected_403: AtomicU64,
    pub invites_answered: AtomicU64,
    pub byes_answered: AtomicU64,
    pub registers_answered: AtomicU64,
    /// Requests refused with 500 for a CSeq out of order in their dialog.
    pub out_of_order_500: AtomicU64,
}

/// The To tag of the responses this core sends itself.
const LOCAL_TAG: &str = "sim-core";

/// Calls remembered for CSeq ordering; older ones are forgotten wholesale beyond this.
const MAX_CALLS: usize = 100_000;

#[derive(Clone)]
pub struct SimCore {
    pub addr: SocketAddr,
    pub stats: Arc<CoreStats>,
    /// Last CSeq number and method seen per Call-ID.
    cseqs: Arc<Mutex<HashMap<String, (u32, Method)>>>,
    /// Where accepted new requests go, when relaying.
    far_end: Option<SocketAddr>,
}

impl SimCore {
    pub async fn start(
        idp: Idp,
        validation: Validation,
        listen: SocketAddr,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> std::io::Result<SimCore> {
        Self::start_relay(idp, validation, listen, None, cancel, tracker).await
    }

    /// Like [`SimCore::start`], relaying accepted requests to `far_end` when given.
    pub async fn start_relay(
        idp: Idp,
        validation: Validation,
        listen: SocketAddr,
        far_end: Option<SocketAddr>,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> std::io::Result<SimCore> {
        let socket = UdpSocket::bind(listen).await?;
        let addr = socket.local_addr()?;
        let stats = Arc::new(CoreStats::default());
        let core = SimCore {
            addr,
            stats,
            cseqs: Arc::new(Mutex::new(HashMap::new())),
            far_end,
        };
        let running = core.clone();
        tracker.spawn(async move {
            let mut buffer = vec![0u8; 65_536];
            loop {
                let (length, from) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    received = socket.recv_from(&mut buffer) => match received {
                        Ok(received) => received,
                        Err(error) => {
                            tracing::debug!(error = %error, "simulated core receive error");
                            continue;
                        }
                    },
                };
                let outgoing = match message::parse(&buffer[..length], true) {
                    Ok(SipMessage::Request(request)) => {
                        running.handle(&idp, validation, request, from)
                    }
                    Ok(SipMessage::Response(response)) => running.relay_response(response),
                    Err(_) => Vec::new(),
                };
                for (bytes, to) in outgoing {
                    if let Err(error) = socket.send_to(&bytes, to).await {
                        tracing::debug!(error = %error, "simulated core send error");
                    }
                }
            }
        });
        Ok(core)
    }

    /// A request: answered here, or relayed when accepted and a far end is set.
    fn handle(
        &self,
        idp: &Idp,
        validation: Validation,
        request: rsip::Request,
        from: SocketAddr,
    ) -> Vec<(bytes::Bytes, SocketAddr)> {
        // Registrations and OPTIONS are this core's own business; calls are relayed.
        if self.far_end.is_some() && !matches!(request.method, Method::Register | Method::Options) {
            // The ACK for a rejection this core sent itself (its To tag is ours) ends
            // here; the far end never saw that INVITE.
            let own_tag = message::to_value(&request.headers)
                .ok()
                .and_then(message::tag_of)
                == Some(LOCAL_TAG);
            if request.method == Method::Ack && own_tag {
                return Vec::new();
            }
            let relay_unchecked = matches!(request.method, Method::Ack | Method::Cancel);
            if relay_unchecked || self.accepts(idp, validation, &request).is_none() {
                return self.relay_request(request).into_iter().collect();
            }
        }
        self.answer(idp, validation, &request)
            .into_iter()
            .map(|bytes| (bytes, from))
            .collect()
    }

    /// `None` when the request's token is acceptable and its CSeq in order; otherwise
    /// the status to answer with (401, 403, 500).
    fn accepts(&self, idp: &Idp, validation: Validation, request: &rsip::Request) -> Option<u16> {
        let token = bearer_token(request)?;
        if idp.check(&token, validation) != TokenCheck::Valid {
            return Some(403);
        }
        if !self.in_order(request) {
            return Some(500);
        }
        None
    }

    /// Forwards an accepted request statelessly: our Route removed, a Record-Route on an
    /// initial INVITE, our Via on top (its branch derived from the previous hop's, so a
    /// CANCEL or a non-2xx ACK lands on the INVITE's transaction at the far end).
    fn relay_request(&self, mut request: rsip::Request) -> Option<(bytes::Bytes, SocketAddr)> {
        let own = format!("sip:{}", self.addr);
        let mut routes = message::routes(&request.headers);
        // A request routed to us follows its route set (our Record-Route came back): in
        // a dialog. Anything else (a new request, a CANCEL, the ACK of a failed INVITE)
        // goes where new requests go.
        let routed_to_us = routes
            .first()
            .is_some_and(|route| crate::sip::header::name_addr_uri(route).starts_with(&own));
        if routed_to_us {
            routes.remove(0);
            message::set_routes(&mut request.headers, &routes);
        }
        let next = match routes.first() {
            Some(route) => uri_address(crate::sip::header::name_addr_uri(route))?,
            None if routed_to_us => uri_address(&request.uri.to_string())?,
            None => self.far_end?,
        };
        let in_dialog = message::to_value(&request.headers)
            .ok()
            .and_then(message::tag_of)
            .is_some();
        if request.method == Method::Invite && !in_dialog {
            message::push_record_route(&mut request.headers, &format!("{own};lr"));
        }
        let previous = message::top_via(&request.headers).ok()?;
        let branch = format!(
            "z9hG4bKsimcore{:016x}",
            fnv(previous.branch().unwrap_or_default().as_bytes())
        );
        let host = self.addr.ip().to_string();
        message::push_via(
            &mut request.headers,
            &crate::sip::Via::new("UDP", &host, self.addr.port(), &branch),
        );
        let hops = message::max_forwards(&request.headers)
            .ok()
            .flatten()
            .unwrap_or(70);
        message::set_max_forwards(&mut request.headers, hops.saturating_sub(1));
        Some((message::encode(&request.into()), next))
    }

    /// A response from the far end: our Via off, on to the next Via's address.
    fn relay_response(&self, mut response: rsip::Response) -> Vec<(bytes::Bytes, SocketAddr)> {
        let Ok(ours) = message::pop_via(&mut response.headers) else {
            return Vec::new();
        };
        if ours
            .branch()
            .is_none_or(|branch| !branch.starts_with("z9hG4bKsimcore"))
        {
            return Vec::new();
        }
        let Some(to) = message::top_via(&response.headers)
            .ok()
            .and_then(|via| via.response_address())
        else {
            return Vec::new();
        };
        let code = response.status_code.code();
        match message::cseq(&response.headers).map(|(_, method)| method) {
            Ok(Method::Invite) if (200..300).contains(&code) => {
                self.stats.invites_answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Method::Bye) if (200..300).contains(&code) => {
                self.stats.byes_answered.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        vec![(message::encode(&response.into()), to)]
    }

    fn answer(
        &self,
        idp: &Idp,
        validation: Validation,
        request: &rsip::Request,
    ) -> Vec<bytes::Bytes> {
        let stats = &self.stats;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let response = |code: u16, extra: &[Header]| {
            let mut response = message::response_for(request, message::status(code), LOCAL_TAG);
            for header in extra {
                response.headers_mut().push(header.clone());
            }
            message::encode(&response.into())
        };
        match request.method {
            Method::Ack => return Vec::new(),
            Method::Cancel => return vec![response(200, &[])],
            _ => {}
        }
        let Some(token) = bearer_token(request) else {
            stats.challenged_401.fetch_add(1, Ordering::Relaxed);
            let challenge = Header::WwwAuthenticate(
                "Bearer realm=\"sim-core\", error=\"invalid_request\"".into(),
            );
            return vec![response(401, &[challenge])];
        };
        if idp.check(&token, validation) != TokenCheck::Valid {
            stats.rejected_403.fetch_add(1, Ordering::Relaxed);
            let challenge = Header::WwwAuthenticate(
                "Bearer realm=\"sim-core\", error=\"invalid_token\"".into(),
            );
            return vec![response(403, &[challenge])];
        }
        if !self.in_order(request) {
            stats.out_of_order_500.fetch_add(1, Ordering::Relaxed);
            return vec![response(500, &[])];
        }
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        match request.method {
            Method::Invite => {
                stats.invites_answered.fetch_add(1, Ordering::Relaxed);
                let mut dialog: Vec<Header> = request
                    .headers
                    .iter()
                    .filter(|header| matches!(header, Header::RecordRoute(_)))
                    .cloned()
                    .collect();
                dialog.push(Header::Contact(format!("<sip:core@{}>", self.addr).into()));
                vec![response(180, &dialog), response(200, &dialog)]
            }
            Method::Bye => {
                stats.byes_answered.fetch_add(1, Ordering::Relaxed);
                vec![response(200, &[])]
            }
            Method::Register => {
                // A registrar granting what was asked: each Contact echoed with it.
                stats.registers_answered.fetch_add(1, Ordering::Relaxed);
                let expires = message::header_values(&request.headers, "Expires")
                    .next()
                    .and_then(|value| value.trim().parse::<u64>().ok())
                    .unwrap_or(3600);
                let contacts: Vec<Header> = message::header_values(&request.headers, "Contact")
                    .map(|contact| Header::Contact(format!("{contact};expires={expires}").into()))
                    .collect();
                vec![response(200, &contacts)]
            }
            _ => vec![response(200, &[])],
        }
    }

    /// RFC 3261 §12.2.2: a request lower in CSeq than the last one of its call is out of
    /// order; the same number is fine only for a retransmission of the same method.
    fn in_order(&self, request: &rsip::Request) -> bool {
        let (Ok(call_id), Ok((seq, method))) = (
            message::call_id(&request.headers),
            message::cseq(&request.headers),
        ) else {
            return false;
        };
        let mut cseqs = self
            .cseqs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((last, last_method)) = cseqs.get(call_id) {
            if seq < *last || (seq == *last && method != *last_method) {
                return false;
            }
        }
        if cseqs.len() >= MAX_CALLS {
            cseqs.clear();
        }
        cseqs.insert(call_id.to_string(), (seq, method));
        true
    }
}

/// The Bearer token of a request's `Authorization`, if any.
fn bearer_token(request: &rsip::Request) -> Option<String> {
    request.headers.iter().find_map(|header| match header {
        Header::Authorization(value) => rsip::headers::UntypedHeader::value(value)
            .strip_prefix("Bearer ")
            .map(str::trim)
            .map(str::to_string),
        _ => None,
    })
}

/// The address of a `sip:` URI whose host is an IP address.
fn uri_address(uri: &str) -> Option<SocketAddr> {
    let uri = rsip::Uri::try_from(uri).ok()?;
    let host = uri.host_with_port.host.to_string();
    let port = uri.host_with_port.port.map_or(5060, |port| *port.value());
    let ip: std::net::IpAddr = crate::sip::via::strip_brackets(&host).parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

/// FNV-1a, for branches derived from the previous hop's.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
