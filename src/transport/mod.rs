//! Sockets: UDP listeners, TCP and TLS listeners and connections, and the handle the
//! engine uses to send. Every receiver checks the sender against the side's allow list
//! and parses the bytes into the proxy's message ([`crate::sip::wire`]): the proxy's
//! driver reads the UDP sockets itself ([`udp::receive_one`]), each TCP or TLS
//! connection task frames and parses its stream (so that parsing runs on every core)
//! and queues the message for the engine on a bounded channel. Sending never blocks the
//! engine: UDP sends with `MSG_DONTWAIT`, each TCP or TLS connection has a bounded queue of its
//! own.
//!
//! Connections are tracked by the engine (it receives `Opened`/`Closed` events) and keyed
//! by side, transport and peer address, and for TLS connections the sidecar opens by the
//! trunk whose certificate and checks they carry; so responses go back on the connection
//! their request came in on (RFC 3261 §18.2.2), connections to the core are reused, and
//! one trunk's TLS identity never carries another trunk's requests.

pub mod tcp;
pub mod tls;
pub mod udp;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use ipnet::IpNet;
use tokio::sync::mpsc;

pub use crate::config::Transport;

/// Which peer a socket faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The Edge appliance (PBX, SBC, Genesys Cloud Edge).
    Edge,
    /// The core: the cloud SIP service or carrier.
    Core,
}

impl Side {
    pub fn opposite(self) -> Side {
        match self {
            Side::Edge => Side::Core,
            Side::Core => Side::Edge,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Edge => "edge",
            Side::Core => "core",
        })
    }
}

/// Identifies one TCP or TLS connection across reconnects to the same peer.
pub type ConnectionId = u64;

/// A parsed message and where it came from.
#[derive(Debug)]
pub struct Inbound {
    pub side: Side,
    pub transport: Transport,
    /// The local socket address it arrived on.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub message: crate::sip::wire::Message,
}

/// What the transports tell the engine.
// Messages are nearly every event; boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum TransportEvent {
    Message(Inbound),
    ConnectionOpened {
        side: Side,
        transport: Transport,
        peer: SocketAddr,
        /// For a TLS connection the sidecar opened: the trunk whose identity it carries
        /// (connections are never shared between trunks' certificates). Else `None`.
        owner: Option<usize>,
        id: ConnectionId,
        sender: mpsc::Sender<Bytes>,
    },
    ConnectionClosed {
        side: Side,
        transport: Transport,
        peer: SocketAddr,
        owner: Option<usize>,
        id: ConnectionId,
        /// True when an outbound connection never got established, or its peer refused
        /// it (a TLS alert) before sending anything: what was queued on it is lost.
        connect_failed: bool,
    },
    /// A UDP datagram this side sent to `addr` came back as an ICMP error (port or host
    /// unreachable): a transport error for the transactions toward it.
    Unreachable {
        side: Side,
        addr: SocketAddr,
    },
}

/// Who may talk to one side: configured networks, and the addresses the trunks' peers
/// on that side resolve to now (they follow DNS).
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    networks: Vec<IpNet>,
    peers: Vec<Arc<crate::dns::Destinations>>,
}

impl AllowList {
    pub fn new(networks: Vec<IpNet>) -> Self {
        Self {
            networks,
            peers: Vec::new(),
        }
    }

    /// Also allows whatever `peers` resolve to, as they change.
    pub fn with_peers(mut self, peers: Vec<Arc<crate::dns::Destinations>>) -> Self {
        self.peers = peers;
        self
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.networks.iter().any(|net| net.contains(&ip))
            || self.peers.iter().any(|peer| peer.contains_ip(ip))
    }
}

/// An IPv4-mapped IPv6 address as plain IPv4, so allow lists written in IPv4 match on
/// dual-stack sockets.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// What a receive task needs to hand a message over.
#[derive(Clone)]
pub struct ReceiveContext {
    pub side: Side,
    pub allow: Arc<AllowList>,
    pub engine: mpsc::Sender<TransportEvent>,
    pub stats: Arc<crate::stats::Stats>,
    pub max_message_size: usize,
}

impl ReceiveContext {
    /// Parses one message; counts and drops what does not parse.
    fn parse(
        &self,
        bytes: Bytes,
        datagram: bool,
        peer: SocketAddr,
    ) -> Option<crate::sip::wire::Message> {
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(side = %self.side, %peer, message = %crate::sip::message::redacted(&bytes), "received");
        }
        match crate::sip::wire::parse(bytes, datagram) {
            Ok(message) => Some(message),
            Err(error) => {
                crate::stats::Stats::bump(&self.stats.malformed_dropped);
                tracing::debug!(side = %self.side, %peer, error = %error, "dropped malformed message");
                None
            }
        }
    }
}
