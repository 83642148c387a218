//! A simulated Edge on loopback UDP: places calls through the sidecar at a fixed rate and
//! records how each ended. A call is INVITE, 200, ACK, a hold, BYE, 200; the ACK and BYE
//! follow the route set of the 200 (RFC 3261 §12.1.2), so they reach the core only if
//! the proxy record-routes and translates CSeq right. Setup time is INVITE to 200.
//!
//! Loopback UDP does not lose messages: requests are not retransmitted, and a call with no
//! final answer within `answer_limit` counts as failed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rsip::{Method, SipMessage};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::sip::header::{name_addr_uri, split_list};
use crate::sip::message;

/// How the calls went, so far.
#[derive(Debug, Default)]
pub struct EdgeStats {
    pub placed: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// Setup times of answered calls, in microseconds.
    setups: Mutex<Vec<u64>>,
    /// The final status of each failed call (0: no answer), for the report.
    failures: Mutex<Vec<u16>>,
}

impl EdgeStats {
    /// The `quantile` (0..=1) of the setup times, if any call was answered.
    pub fn setup_quantile(&self, quantile: f64) -> Option<Duration> {
        let mut setups = self
            .setups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if setups.is_empty() {
            return None;
        }
        setups.sort_unstable();
        let rank = ((setups.len() - 1) as f64 * quantile.clamp(0.0, 1.0)).round() as usize;
        setups
            .get(rank)
            .map(|micros| Duration::from_micros(*micros))
    }

    /// Final statuses of failed calls (0 for no answer).
    pub fn failures(&self) -> Vec<u16> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// What the simulated Edge does.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    /// The sidecar's Edge-side UDP address.
    pub proxy: SocketAddr,
    pub calls: u64,
    pub rate: u64,
    pub hold: Duration,
    pub answer_limit: Duration,
}

/// Calls waiting for a final response, by Call-ID and CSeq method.
type Waiters = Arc<Mutex<HashMap<(String, String), oneshot::Sender<rsip::Response>>>>;

/// Places the calls and waits for all of them to end (or `cancel`).
pub async fn place_calls(
    settings: EdgeSettings,
    stats: Arc<EdgeStats>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let local = socket.local_addr()?;
    let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
    let receiver = tokio::spawn(receive(socket.clone(), waiters.clone(), cancel.clone()));
    let interval = Duration::from_secs_f64(1.0 / settings.rate.max(1) as f64);
    let mut ticks = tokio::time::interval(interval);
    let mut calls = tokio::task::JoinSet::new();
    for number in 0..settings.calls {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ticks.tick() => {}
        }
        stats.placed.fetch_add(1, Ordering::Relaxed);
        let call = Call {
            socket: socket.clone(),
            local,
            settings: settings.clone(),
            waiters: waiters.clone(),
            call_id: format!("demo-{number}-{:08x}@{local}", rand::random::<u32>()),
        };
        let stats = stats.clone();
        calls.spawn(async move {
            let started = tokio::time::Instant::now();
            match call.run(started).await {
                Ok(setup) => {
                    stats.completed.fetch_add(1, Ordering::Relaxed);
                    lock(&stats.setups).push(u64::try_from(setup.as_micros()).unwrap_or(u64::MAX));
                }
                Err(status) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    lock(&stats.failures).push(status);
                }
            }
        });
    }
    while calls.join_next().await.is_some() {}
    receiver.abort();
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Hands every final response to the call waiting for it (by Call-ID and CSeq method).
async fn receive(socket: Arc<UdpSocket>, waiters: Waiters, cancel: CancellationToken) {
    let mut buffer = vec![0u8; 65_536];
    loop {
        let (length, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(_) => continue,
            },
        };
        let Ok(SipMessage::Response(response)) = message::parse(&buffer[..length], true) else {
            // Requests toward the Edge (none in the demo) are not answered.
            continue;
        };
        if response.status_code.code() < 200 {
            continue;
        }
        let key = match (
            message::call_id(&response.headers),
            message::cseq(&response.headers),
        ) {
            (Ok(call_id), Ok((_, method))) => (call_id.to_string(), method.to_string()),
            _ => continue,
        };
        if let Some(waiter) = lock(&waiters).remove(&key) {
            let _ = waiter.send(response);
        }
    }
}

struct Call {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    settings: EdgeSettings,
    waiters: Waiters,
    call_id: String,
}

impl Call {
    /// The call from INVITE to the BYE's 200; its setup time, or the status that ended
    /// it (0: no answer).
    async fn run(&self, started: tokio::time::Instant) -> Result<Duration, u16> {
        let proxy = self.settings.proxy;
        let local = self.local;
        let call_id = &self.call_id;
        let body = format!(
            "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
            ip = local.ip()
        );
        let invite = format!(
            "INVITE sip:service@{proxy} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch:016x};rport\r\n\
             From: <sip:edge@{local}>;tag=edge\r\n\
             To: <sip:service@{proxy}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:edge@{local}>\r\n\
             Max-Forwards: 70\r\n\
             Content-Type: application/sdp\r\n\
             Content-Length: {length}\r\n\r\n{body}",
            branch = rand::random::<u64>(),
            length = body.len(),
        );
        let answer = self.request(&invite, Method::Invite, proxy).await?;
        let setup = started.elapsed();
        // The dialog (§12.1.2): the remote target is the 200's Contact, the route set its
        // Record-Route reversed; the first route is where requests go (loose routing).
        let to = message::to_value(&answer.headers)
            .map(str::to_string)
            .map_err(|_| 0u16)?;
        let target = answer
            .headers
            .iter()
            .find_map(|header| match header {
                rsip::Header::Contact(contact) => {
                    Some(name_addr_uri(rsip::headers::UntypedHeader::value(contact)).to_string())
                }
                _ => None,
            })
            .ok_or(0u16)?;
        let mut routes: Vec<String> = answer
            .headers
            .iter()
            .filter_map(|header| match header {
                rsip::Header::RecordRoute(value) => {
                    Some(rsip::headers::UntypedHeader::value(value))
                }
                _ => None,
            })
            .flat_map(split_list)
            .map(str::to_string)
            .collect();
        routes.reverse();
        let in_dialog = |method: &str, cseq: u32| {
            let route = if routes.is_empty() {
                String::new()
            } else {
                format!("Route: {}\r\n", routes.join(", "))
            };
            format!(
                "{method} {target} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch:016x};rport\r\n\
                 From: <sip:edge@{local}>;tag=edge\r\n\
                 To: {to}\r\n\
                 Call-ID: {call_id}\r\n\
                 CSeq: {cseq} {method}\r\n\
                 {route}Max-Forwards: 70\r\n\
                 Content-Length: 0\r\n\r\n",
                branch = rand::random::<u64>(),
            )
        };
        let next_hop = routes
            .first()
            .and_then(|route| {
                let uri = name_addr_uri(route);
                rsip::Uri::try_from(uri).ok()
            })
            .and_then(|uri| {
                let host = uri.host_with_port.host.to_string();
                let port = uri.host_with_port.port.map_or(5060, |port| *port.value());
                format!("{host}:{port}").parse::<SocketAddr>().ok()
            })
            .unwrap_or(proxy);
        self.send(&in_dialog("ACK", 1), next_hop).await?;
        tokio::time::sleep(self.settings.hold).await;
        self.request(&in_dialog("BYE", 2), Method::Bye, next_hop)
            .await?;
        Ok(setup)
    }

    async fn send(&self, text: &str, to: SocketAddr) -> Result<(), u16> {
        self.socket
            .send_to(text.as_bytes(), to)
            .await
            .map(|_| ())
            .map_err(|_| 0)
    }

    /// Sends a request and waits for its final response; a non-2xx is the call's end.
    async fn request(
        &self,
        text: &str,
        method: Method,
        to: SocketAddr,
    ) -> Result<rsip::Response, u16> {
        let (sender, receiver) = oneshot::channel();
        let key = (self.call_id.clone(), method.to_string());
        lock(&self.waiters).insert(key.clone(), sender);
        self.send(text, to).await?;
        let answer = tokio::time::timeout(self.settings.answer_limit, receiver).await;
        let response = match answer {
            Ok(Ok(response)) => response,
            _ => {
                lock(&self.waiters).remove(&key);
                return Err(0);
            }
        };
        let code = response.status_code.code();
        if (200..300).contains(&code) {
            Ok(response)
        } else {
            Err(code)
        }
    }
}
