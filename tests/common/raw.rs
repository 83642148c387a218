//! A hand-driven SIP peer on a UDP socket, for tests that need to misbehave on purpose
//! (ignore a response, never answer) in ways sipp cannot be told to.

use std::net::SocketAddr;
use std::time::Duration;

use byoc_sidecar::sip::message;
use rsip::SipMessage;
use tokio::net::UdpSocket;

pub struct RawPeer {
    pub socket: UdpSocket,
    pub addr: SocketAddr,
}

impl RawPeer {
    pub async fn bind() -> RawPeer {
        Self::bind_on("127.0.0.1").await
    }

    /// A peer on another loopback address (127.0.0.0/8), so tests can tell hosts apart.
    pub async fn bind_on(ip: &str) -> RawPeer {
        let socket = UdpSocket::bind((ip, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        RawPeer { socket, addr }
    }

    /// Everything that arrives within `quiet` of the previous message, as text.
    pub async fn drain(&self, quiet: Duration) -> Vec<String> {
        let mut buffer = vec![0u8; 65_536];
        let mut texts = Vec::new();
        while let Ok(Ok((length, _))) =
            tokio::time::timeout(quiet, self.socket.recv_from(&mut buffer)).await
        {
            texts.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
        }
        texts
    }

    pub async fn send(&self, text: &str, to: SocketAddr) {
        self.socket.send_to(text.as_bytes(), to).await.unwrap();
    }

    /// The next message, or a panic naming what was awaited after `limit`.
    pub async fn receive(&self, limit: Duration, what: &str) -> (SipMessage, SocketAddr) {
        let mut buffer = vec![0u8; 65_536];
        let (length, from) = tokio::time::timeout(limit, self.socket.recv_from(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("no {what} within {limit:?}"))
            .unwrap();
        (message::parse(&buffer[..length], true).unwrap(), from)
    }
}

/// An INVITE from `from` with the given branch and Call-ID, addressed to `to`.
pub fn invite(from: SocketAddr, to: SocketAddr, branch: &str, call_id: &str) -> String {
    let body = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\n";
    format!(
        "INVITE sip:service@{to} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch={branch}\r\n\
         From: <sip:edge@{from}>;tag=edge-tag\r\n\
         To: <sip:service@{to}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:edge@{from}>\r\n\
         Max-Forwards: 70\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

pub fn status(message: &SipMessage) -> u16 {
    match message {
        SipMessage::Response(response) => response.status_code.code(),
        SipMessage::Request(request) => panic!("expected a response, got {}", request.method),
    }
}

pub fn header_values(message: &SipMessage, name: &str) -> Vec<String> {
    let text = String::from_utf8(message::encode(message).to_vec()).unwrap();
    text.lines()
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim().eq_ignore_ascii_case(name))
        .map(|(_, value)| value.trim().to_string())
        .collect()
}

/// A response to `request` with `code`, echoing its Via stack and dialog headers.
pub fn answer(request: &SipMessage, code: u16, reason: &str, to_tag: &str) -> String {
    let mut text = format!("SIP/2.0 {code} {reason}\r\n");
    for via in header_values(request, "Via") {
        text.push_str(&format!("Via: {via}\r\n"));
    }
    for name in ["From", "Call-ID", "CSeq"] {
        text.push_str(&format!("{name}: {}\r\n", header_values(request, name)[0]));
    }
    text.push_str(&format!(
        "To: {};tag={to_tag}\r\nContent-Length: 0\r\n\r\n",
        header_values(request, "To")[0]
    ));
    text
}

/// The Record-Route entries of a message, one per value (a header may hold several).
pub fn record_routes(message: &SipMessage) -> Vec<String> {
    header_values(message, "Record-Route")
        .iter()
        .flat_map(|value| byoc_sidecar::sip::header::split_list(value))
        .map(str::to_string)
        .collect()
}

/// `answer` turned into a dialog-creating one, as a UAS sends it: the request's
/// Record-Route echoed, its own Contact, and any `extra` header lines (each ending CRLF).
pub fn with_dialog(
    answer: &str,
    record_route: &[String],
    contact: SocketAddr,
    extra: &str,
) -> String {
    answer.replace(
        "Content-Length: 0\r\n",
        &format!(
            "{extra}Record-Route: {}\r\nContact: <sip:core@{contact}>\r\nContent-Length: 0\r\n",
            record_route.join(", ")
        ),
    )
}

/// The Edge's side of a dialog, learnt from a response with Record-Route and Contact
/// (RFC 3261 §12.1.2): requests go to the Contact through the recorded route, reversed.
/// The Edge's own identity is the one [`invite`] uses (`tag=edge-tag`).
pub struct EdgeDialog {
    pub target: String,
    pub routes: Vec<String>,
    to: String,
    call_id: String,
    edge: SocketAddr,
}

impl EdgeDialog {
    pub fn from_response(response: &SipMessage, edge: SocketAddr) -> EdgeDialog {
        let mut routes = record_routes(response);
        routes.reverse();
        let contact = &header_values(response, "Contact")[0];
        EdgeDialog {
            target: byoc_sidecar::sip::header::name_addr_uri(contact).to_string(),
            routes,
            to: header_values(response, "To")[0].clone(),
            call_id: header_values(response, "Call-ID")[0].clone(),
            edge,
        }
    }

    /// An in-dialog request numbered `cseq`, with `extra` header lines (each ending CRLF).
    pub fn request(&self, method: &str, cseq: u32, branch: &str, extra: &str) -> String {
        let edge = self.edge;
        format!(
            "{method} {} SIP/2.0\r\nVia: SIP/2.0/UDP {edge};branch={branch}\r\n\
             From: <sip:edge@{edge}>;tag=edge-tag\r\nTo: {}\r\nCall-ID: {}\r\n\
             CSeq: {cseq} {method}\r\nRoute: {}\r\n{extra}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
            self.target,
            self.to,
            self.call_id,
            self.routes.join(", ")
        )
    }
}

/// The usual cast of a proxy test: a hand-driven core behind a sidecar (one trunk, `sip`
/// lines added to its `[sip]` table), and a hand-driven Edge in front of it.
pub struct Rig {
    pub core: RawPeer,
    pub sidecar: super::Sidecar,
    pub edge: RawPeer,
    /// The sidecar's UDP address on the Edge side.
    pub proxy: SocketAddr,
}

impl Rig {
    pub async fn start(sip: &str) -> Rig {
        let core = RawPeer::bind().await;
        let sidecar =
            super::Sidecar::start("udp:127.0.0.1:9", &format!("udp:{}", core.addr), sip).await;
        let edge = RawPeer::bind().await;
        let proxy = sidecar.addr(
            byoc_sidecar::transport::Side::Edge,
            byoc_sidecar::config::Transport::Udp,
        );
        Rig {
            core,
            sidecar,
            edge,
            proxy,
        }
    }
}

/// How long the helpers below wait for a message.
const WAIT: Duration = Duration::from_secs(5);

/// The CSeq of a message, as text (`"1 INVITE"`).
pub fn cseq(message: &SipMessage) -> String {
    header_values(message, "CSeq")[0].clone()
}

/// The next request of `method` at `peer`, skipping others (ACKs for absorbed answers).
pub async fn next_request(peer: &RawPeer, method: rsip::Method) -> (SipMessage, SocketAddr) {
    loop {
        let (message, from) = peer.receive(WAIT, "a request").await;
        if matches!(&message, SipMessage::Request(request) if request.method == method) {
            return (message, from);
        }
    }
}

/// The next final response at `peer` (the Edge, usually), skipping provisional ones.
pub async fn final_response(peer: &RawPeer) -> SipMessage {
    loop {
        let (message, _) = peer.receive(WAIT, "a final response").await;
        if status(&message) >= 200 {
            return message;
        }
    }
}

/// The next final response at `peer` for `call_id`, skipping provisional ones and
/// retransmissions of other calls' answers.
pub async fn final_for(peer: &RawPeer, call_id: &str) -> SipMessage {
    loop {
        let (message, _) = peer.receive(WAIT, "a final response").await;
        if status(&message) >= 200 && header_values(&message, "Call-ID")[0] == call_id {
            return message;
        }
    }
}

/// Whether nothing arrives at `peer` within `millis` milliseconds.
pub async fn stays_quiet(peer: &RawPeer, millis: u64) -> bool {
    tokio::time::timeout(
        Duration::from_millis(millis),
        peer.socket.recv_from(&mut [0u8; 10]),
    )
    .await
    .is_err()
}

/// The text of an [`invite`] turned into an ACK of the same transaction.
pub fn as_ack(invite: &str) -> String {
    invite
        .replacen("INVITE sip", "ACK sip", 1)
        .replace("1 INVITE", "1 ACK")
}

/// The text of an [`invite`] turned into the CANCEL of the same transaction.
pub fn as_cancel(invite: &str) -> String {
    invite
        .replacen("INVITE sip", "CANCEL sip", 1)
        .replace("1 INVITE", "1 CANCEL")
}

/// The branch of a message's top Via.
pub fn top_branch(message: &SipMessage) -> String {
    message::top_via(rsip::message::HasHeaders::headers(message))
        .unwrap()
        .branch()
        .unwrap()
        .to_string()
}
