//! Test captures built in memory: pcap in either byte order and timestamp precision,
//! pcapng with several interfaces, and packets for the link types the reader knows.
//! Only for tests; the file formats are simple enough to write out field by field.

use std::net::SocketAddr;

use etherparse::PacketBuilder;

pub const ETHERNET: u32 = 1;
pub const RAW: u32 = 101;
pub const NULL: u32 = 0;

/// One packet record: time in nanoseconds since the epoch, captured bytes, length on
/// the wire.
pub struct Record {
    pub nanos: u64,
    pub data: Vec<u8>,
    pub original_len: u32,
}

impl Record {
    pub fn new(nanos: u64, data: Vec<u8>) -> Record {
        let original_len = data.len() as u32;
        Record {
            nanos,
            data,
            original_len,
        }
    }
}

/// A pcap file.
pub fn pcap(
    big_endian: bool,
    nanosecond: bool,
    link: u32,
    snaplen: u32,
    records: &[Record],
) -> Vec<u8> {
    let u32_bytes = |value: u32| {
        if big_endian {
            value.to_be_bytes()
        } else {
            value.to_le_bytes()
        }
    };
    let u16_bytes = |value: u16| {
        if big_endian {
            value.to_be_bytes()
        } else {
            value.to_le_bytes()
        }
    };
    let magic = if nanosecond { 0xa1b2_3c4d } else { 0xa1b2_c3d4 };
    let mut out = Vec::new();
    out.extend(u32_bytes(magic));
    out.extend(u16_bytes(2));
    out.extend(u16_bytes(4));
    out.extend(u32_bytes(0));
    out.extend(u32_bytes(0));
    out.extend(u32_bytes(snaplen));
    out.extend(u32_bytes(link));
    for record in records {
        let seconds = (record.nanos / 1_000_000_000) as u32;
        let fraction = (record.nanos % 1_000_000_000) as u32;
        let fraction = if nanosecond {
            fraction
        } else {
            fraction / 1000
        };
        out.extend(u32_bytes(seconds));
        out.extend(u32_bytes(fraction));
        out.extend(u32_bytes(record.data.len() as u32));
        out.extend(u32_bytes(record.original_len));
        out.extend(&record.data);
    }
    out
}

/// A pcapng interface: link type and `if_tsresol` (power of ten).
pub struct Interface {
    pub link: u16,
    pub tsresol: u8,
}

fn block(kind: u32, body: &[u8]) -> Vec<u8> {
    let padded = body.len().div_ceil(4) * 4;
    let length = (12 + padded) as u32;
    let mut out = Vec::new();
    out.extend(kind.to_le_bytes());
    out.extend(length.to_le_bytes());
    out.extend(body);
    out.resize(8 + padded, 0);
    out.extend(length.to_le_bytes());
    out
}

/// A little-endian pcapng file: one section, `interfaces`, then `(interface, record)`
/// packets, each time in units of its interface's resolution.
pub fn pcapng(interfaces: &[Interface], packets: &[(u32, u64, Vec<u8>)]) -> Vec<u8> {
    let mut section = Vec::new();
    section.extend(0x1a2b_3c4d_u32.to_le_bytes());
    section.extend(1u16.to_le_bytes());
    section.extend(0u16.to_le_bytes());
    section.extend((-1i64).to_le_bytes());
    let mut out = block(0x0a0d_0d0a, &section);
    for interface in interfaces {
        let mut body = Vec::new();
        body.extend(interface.link.to_le_bytes());
        body.extend(0u16.to_le_bytes());
        body.extend(65_535u32.to_le_bytes());
        // if_tsresol (code 9, length 1, padded), then opt_endofopt.
        body.extend(9u16.to_le_bytes());
        body.extend(1u16.to_le_bytes());
        body.extend([interface.tsresol, 0, 0, 0]);
        body.extend([0, 0, 0, 0]);
        out.extend(block(1, &body));
    }
    for (interface, units, data) in packets {
        let mut body = Vec::new();
        body.extend(interface.to_le_bytes());
        body.extend(((units >> 32) as u32).to_le_bytes());
        body.extend((*units as u32).to_le_bytes());
        body.extend((data.len() as u32).to_le_bytes());
        body.extend((data.len() as u32).to_le_bytes());
        body.extend(data);
        body.resize(body.len().div_ceil(4) * 4, 0);
        out.extend(block(6, &body));
    }
    out
}

fn v4(address: SocketAddr) -> [u8; 4] {
    match address.ip() {
        std::net::IpAddr::V4(ip) => ip.octets(),
        std::net::IpAddr::V6(_) => [0; 4],
    }
}

/// An Ethernet frame (optionally 802.1Q-tagged) with an IPv4 UDP datagram.
pub fn ethernet_udp(
    source: SocketAddr,
    destination: SocketAddr,
    payload: &[u8],
    vlan: Option<u16>,
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2; 6], [4; 6]);
    let mut out = Vec::new();
    match vlan {
        Some(id) => builder
            .single_vlan(etherparse::VlanId::try_new(id).unwrap())
            .ipv4(v4(source), v4(destination), 64)
            .udp(source.port(), destination.port())
            .write(&mut out, payload),
        None => builder
            .ipv4(v4(source), v4(destination), 64)
            .udp(source.port(), destination.port())
            .write(&mut out, payload),
    }
    .unwrap();
    out
}

/// A raw IPv4 packet with a TCP segment.
pub fn raw_tcp(
    source: SocketAddr,
    destination: SocketAddr,
    sequence: u32,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ipv4(v4(source), v4(destination), 64).tcp(
        source.port(),
        destination.port(),
        sequence,
        65_535,
    );
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut out = Vec::new();
    builder.write(&mut out, payload).unwrap();
    out
}

/// A UDP datagram split into raw IPv4 fragments of at most `piece` payload bytes (a
/// multiple of 8), in order.
pub fn raw_udp_fragments(
    source: SocketAddr,
    destination: SocketAddr,
    payload: &[u8],
    piece: usize,
) -> Vec<Vec<u8>> {
    let mut whole = Vec::new();
    PacketBuilder::ipv4(v4(source), v4(destination), 64)
        .udp(source.port(), destination.port())
        .write(&mut whole, payload)
        .unwrap();
    // The IP payload: the UDP header and data.
    let udp = &whole[20..];
    let mut fragments = Vec::new();
    let mut offset = 0;
    while offset < udp.len() {
        let end = (offset + piece).min(udp.len());
        let mut header = etherparse::Ipv4Header::new(
            (end - offset) as u16,
            64,
            etherparse::IpNumber::UDP,
            v4(source),
            v4(destination),
        )
        .unwrap();
        header.identification = 7;
        header.more_fragments = end < udp.len();
        header.fragment_offset = etherparse::IpFragOffset::try_new((offset / 8) as u16).unwrap();
        header.header_checksum = header.calc_header_checksum();
        let mut packet = Vec::new();
        header.write(&mut packet).unwrap();
        packet.extend(&udp[offset..end]);
        fragments.push(packet);
        offset = end;
    }
    fragments
}

/// A BSD loopback frame (AF_INET, host byte order little-endian) around a raw packet.
pub fn null_loopback(packet: &[u8]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    out.extend(packet);
    out
}

/// A short SIP request with Call-ID `call_id`.
pub fn options(call_id: &str) -> Vec<u8> {
    format!(
        "OPTIONS sip:core@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK{call_id}\r\n\
         From: <sip:edge@10.0.0.1>;tag=1\r\nTo: <sip:core@10.0.0.2>\r\nCall-ID: {call_id}\r\n\
         CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}
