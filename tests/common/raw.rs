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
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        RawPeer { socket, addr }
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
