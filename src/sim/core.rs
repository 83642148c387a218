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

/// Calls remembered for CSeq ordering; older ones are forgotten wholesale beyond this.
const MAX_CALLS: usize = 100_000;

#[derive(Clone)]
pub struct SimCore {
    pub addr: SocketAddr,
    pub stats: Arc<CoreStats>,
    /// Last CSeq number and method seen per Call-ID.
    cseqs: Arc<Mutex<HashMap<String, (u32, Method)>>>,
}

impl SimCore {
    pub async fn start(
        idp: Idp,
        validation: Validation,
        listen: SocketAddr,
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
                let Ok(SipMessage::Request(request)) = message::parse(&buffer[..length], true)
                else {
                    continue;
                };
                for answer in running.answer(&idp, validation, &request) {
                    if let Err(error) = socket.send_to(&answer, from).await {
                        tracing::debug!(error = %error, "simulated core send error");
                    }
                }
            }
        });
        Ok(core)
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
            let mut response = message::response_for(request, message::status(code), "sim-core");
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
        let token = request.headers.iter().find_map(|header| match header {
            Header::Authorization(value) => rsip::headers::UntypedHeader::value(value)
                .strip_prefix("Bearer ")
                .map(str::trim)
                .map(str::to_string),
            _ => None,
        });
        let Some(token) = token else {
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
