//! From link-layer frames to UDP datagrams and TCP segments. Link types: Ethernet (with
//! 802.1Q/QinQ tags), Linux cooked capture v1 (SLL) and v2 (SLL2), raw IP (101, 12, 14,
//! 228, 229), BSD loopback (NULL, host byte order, and LOOP, network byte order). IPv4
//! and IPv6 fragments are reassembled (etherparse's pool, bounded here). Everything that
//! is not UDP or TCP over IP is skipped and counted, never an error.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use etherparse::defrag::IpDefragPool;
use etherparse::{EtherType, IpNumber, NetSlice, SlicedPacket, TcpSlice, TransportSlice, UdpSlice};

use super::capture::Frame;
use super::ReaderStats;

/// Fragment sets waiting for their missing pieces; older ones are dropped beyond this.
const MAX_PENDING_FRAGMENT_SETS: usize = 1024;
/// A fragment set not completed within this much capture time is dropped.
const FRAGMENT_LIFETIME: Duration = Duration::from_secs(30);

/// A transport-layer payload with its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The frame that carried it (for a reassembled datagram: the last fragment).
    pub frame: u64,
    pub time: Duration,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub payload: Vec<u8>,
    /// `None` for UDP.
    pub tcp: Option<TcpHeader>,
}

/// The TCP header fields stream reassembly needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpHeader {
    pub sequence: u32,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
}

pub struct Decoder {
    fragments: IpDefragPool<Duration, ()>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            fragments: IpDefragPool::new(),
        }
    }

    /// The UDP or TCP payload a frame carries, if any; what is skipped is counted.
    pub fn decode(&mut self, frame: &Frame<'_>, stats: &mut ReaderStats) -> Option<Segment> {
        let truncated = (frame.original_len as usize) > frame.data.len();
        let sliced = match slice_link(frame) {
            Some(Ok(sliced)) => sliced,
            Some(Err(())) => {
                if truncated {
                    stats.snap_truncated += 1;
                } else {
                    stats.malformed_frames += 1;
                }
                return None;
            }
            None => {
                stats.unsupported_link += 1;
                return None;
            }
        };
        let (source, destination) = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => (
                IpAddr::V4(ip.header().source_addr()),
                IpAddr::V4(ip.header().destination_addr()),
            ),
            Some(NetSlice::Ipv6(ip)) => (
                IpAddr::V6(ip.header().source_addr()),
                IpAddr::V6(ip.header().destination_addr()),
            ),
            Some(NetSlice::Arp(_)) | None => {
                stats.not_ip += 1;
                return None;
            }
        };
        let fragmented = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => ip.is_payload_fragmented(),
            Some(NetSlice::Ipv6(ip)) => ip.is_payload_fragmented(),
            _ => false,
        };
        let segment = |source_port, destination_port, payload: &[u8], tcp| Segment {
            frame: frame.number,
            time: frame.time,
            source: SocketAddr::new(source, source_port),
            destination: SocketAddr::new(destination, destination_port),
            payload: payload.to_vec(),
            tcp,
        };
        if fragmented {
            stats.ip_fragments += 1;
            let whole = self.defragment(&sliced, frame.time, stats)?;
            return match whole.ip_number {
                IpNumber::UDP => match UdpSlice::from_slice(&whole.payload) {
                    Ok(udp) => Some(segment(
                        udp.source_port(),
                        udp.destination_port(),
                        udp.payload(),
                        None,
                    )),
                    Err(_) => {
                        stats.malformed_frames += 1;
                        None
                    }
                },
                IpNumber::TCP => match TcpSlice::from_slice(&whole.payload) {
                    Ok(tcp) => Some(segment(
                        tcp.source_port(),
                        tcp.destination_port(),
                        tcp.payload(),
                        Some(tcp_header(&tcp)),
                    )),
                    Err(_) => {
                        stats.malformed_frames += 1;
                        None
                    }
                },
                _ => {
                    stats.not_udp_tcp += 1;
                    None
                }
            };
        }
        match &sliced.transport {
            Some(TransportSlice::Udp(udp)) => {
                stats.udp_datagrams += 1;
                Some(segment(
                    udp.source_port(),
                    udp.destination_port(),
                    udp.payload(),
                    None,
                ))
            }
            Some(TransportSlice::Tcp(tcp)) => {
                stats.tcp_segments += 1;
                Some(segment(
                    tcp.source_port(),
                    tcp.destination_port(),
                    tcp.payload(),
                    Some(tcp_header(tcp)),
                ))
            }
            _ => {
                stats.not_udp_tcp += 1;
                None
            }
        }
    }

    /// Adds a fragment; the whole IP payload once the last piece is in.
    fn defragment(
        &mut self,
        sliced: &SlicedPacket<'_>,
        time: Duration,
        stats: &mut ReaderStats,
    ) -> Option<etherparse::defrag::IpDefragPayloadVec> {
        // Stale sets go first; when too many wait, all of them, so the pool stays bounded.
        let lifetime = if self.pending() >= MAX_PENDING_FRAGMENT_SETS {
            Duration::ZERO
        } else {
            FRAGMENT_LIFETIME
        };
        self.expire_fragments(time, lifetime, stats);
        match self.fragments.process_sliced_packet(sliced, time, ()) {
            Ok(Some(whole)) => {
                stats.ip_reassembled += 1;
                Some(whole)
            }
            Ok(None) => None,
            Err(_) => {
                stats.malformed_frames += 1;
                None
            }
        }
    }

    /// How many fragment sets wait for pieces.
    fn pending(&mut self) -> usize {
        let count = Cell::new(0usize);
        self.fragments.retain(|_| {
            count.set(count.get() + 1);
            true
        });
        count.get()
    }

    /// Drops fragment sets older than `lifetime` at `now`, counting them as lost.
    fn expire_fragments(&mut self, now: Duration, lifetime: Duration, stats: &mut ReaderStats) {
        // The pool may call the predicate more than once per set: count by difference.
        let before = self.pending();
        self.fragments
            .retain(|started| now.saturating_sub(*started) < lifetime);
        stats.ip_fragments_lost += (before - self.pending()) as u64;
    }

    /// Counts the fragment sets still incomplete at the end of the capture.
    pub fn finish(&mut self, stats: &mut ReaderStats) {
        self.expire_fragments(Duration::MAX, Duration::ZERO, stats);
    }
}

fn tcp_header(tcp: &TcpSlice<'_>) -> TcpHeader {
    TcpHeader {
        sequence: tcp.sequence_number(),
        syn: tcp.syn(),
        fin: tcp.fin(),
        rst: tcp.rst(),
    }
}

/// The frame sliced down to its IP layer: `None` for a link type this reader does not
/// know, `Some(Err)` for a frame too short or malformed for its link type.
fn slice_link<'a>(frame: &Frame<'a>) -> Option<Result<SlicedPacket<'a>, ()>> {
    let data = frame.data;
    let sliced = match frame.link_type {
        // LINKTYPE_ETHERNET
        1 => SlicedPacket::from_ethernet(data).map_err(drop),
        // LINKTYPE_LINUX_SLL: packet type (2), ARPHRD type (2), address length (2),
        // address (8), protocol type (2). Read here rather than by etherparse, which
        // refuses some ARPHRD types (the loopback device's 772 among them) that still
        // carry plain IP.
        113 => cooked(data, 14, 16),
        // LINKTYPE_LINUX_SLL2: protocol type (2), reserved (2), interface index (4),
        // ARPHRD type (2), packet type (1), address length (1), address (8).
        276 => cooked(data, 0, 20),
        // LINKTYPE_RAW, the historic DLT_RAW values, LINKTYPE_IPV4, LINKTYPE_IPV6
        101 | 12 | 14 | 228 | 229 => SlicedPacket::from_ip(data).map_err(drop),
        // LINKTYPE_NULL (family in the capturing host's byte order) and LINKTYPE_LOOP
        // (network byte order): a 4-byte address family, then the IP packet.
        0 | 108 => match (data.get(..4), data.get(4..)) {
            (Some(family), Some(payload)) if loopback_family_is_ip(family) => {
                SlicedPacket::from_ip(payload).map_err(drop)
            }
            (Some(_), Some(_)) => {
                return Some(Ok(SlicedPacket {
                    link: None,
                    link_exts: Default::default(),
                    net: None,
                    transport: None,
                }))
            }
            _ => Err(()),
        },
        _ => return None,
    };
    Some(sliced)
}

/// A Linux cooked header with the protocol type at `protocol` and the payload at
/// `payload`.
fn cooked(data: &[u8], protocol: usize, payload: usize) -> Result<SlicedPacket<'_>, ()> {
    match (data.get(protocol..protocol + 2), data.get(payload..)) {
        (Some(&[high, low]), Some(payload)) => {
            SlicedPacket::from_ether_type(EtherType(u16::from_be_bytes([high, low])), payload)
                .map_err(drop)
        }
        _ => Err(()),
    }
}

/// AF_INET is 2 everywhere; AF_INET6 is 10 (Linux), 24 (NetBSD, OpenBSD), 28 (FreeBSD)
/// or 30 (macOS). Either byte order.
fn loopback_family_is_ip(family: &[u8]) -> bool {
    let Ok(bytes) = <[u8; 4]>::try_from(family) else {
        return false;
    };
    [u32::from_le_bytes(bytes), u32::from_be_bytes(bytes)]
        .iter()
        .any(|value| matches!(value, 2 | 10 | 24 | 28 | 30))
}
