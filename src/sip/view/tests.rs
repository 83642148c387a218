//! Behaviour of the view and the editor, on hand-written messages and on messages taken
//! from the IPv6 captures of the shared capture corpus (`invite-call-ipv6-udp.pcap`,
//! `prack-update-ipv6-frag-sll.pcap`), copied here as text.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;

use super::*;

mod captures;
mod editing;
mod ipv6;
mod parsing;

fn parse(text: &str) -> MessageView {
    MessageView::parse(Bytes::copy_from_slice(text.as_bytes()), true).unwrap()
}

fn parse_error(text: &[u8], datagram: bool) -> ViewError {
    MessageView::parse(Bytes::copy_from_slice(text), datagram).unwrap_err()
}

/// Serialises `edit` and parses the result again: the property every edit test checks.
fn reparse(edit: &Edit<'_>) -> MessageView {
    let out = edit.serialize();
    MessageView::parse(out, false).unwrap()
}

const INVITE: &str = concat!(
    "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n",
    "Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport\r\n",
    "Max-Forwards: 70\r\n",
    "To: Bob <sip:bob@biloxi.example.com>\r\n",
    "From: \"Alice, A.\" <sip:alice@atlanta.example.com>;tag=1928301774\r\n",
    "Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n",
    "CSeq: 314159 INVITE\r\n",
    "Contact: <sip:alice@pc33.atlanta.example.com>\r\n",
    "X-Custom-Thing:  keep  me \r\n",
    "Content-Type: application/sdp\r\n",
    "Content-Length: 4\r\n",
    "\r\n",
    "v=0\n",
);

const COMPACT_INVITE: &str = concat!(
    "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n",
    "v: SIP/2.0/TCP 10.0.0.1:5062;branch=z9hG4bKc1, SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKc0\r\n",
    "i: compact-call@10.0.0.1\r\n",
    "f: <sip:alice@atlanta.example.com>;tag=99\r\n",
    "t: <sip:bob@biloxi.example.com>\r\n",
    "m: <sip:alice@10.0.0.1:5062>\r\n",
    "CSeq: 7 INVITE\r\n",
    "k: 100rel, timer\r\n",
    "r: <sip:carol@chicago.example.com>\r\n",
    "c: application/sdp\r\n",
    "l: 4\r\n",
    "\r\n",
    "v=0\n",
);
