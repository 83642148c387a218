//! The capture reader on synthetic captures: formats, byte orders, timestamp precisions,
//! link types, fragments, TCP streams, and damaged input.

use std::net::SocketAddr;
use std::time::Duration;

use super::capture::{Capture, CaptureError};
use super::extract::{extract, Filter};
use super::synthetic::*;
use crate::config::Transport;

fn addresses() -> (SocketAddr, SocketAddr) {
    (
        "10.0.0.1:5060".parse().unwrap(),
        "10.0.0.2:5060".parse().unwrap(),
    )
}

fn read(bytes: Vec<u8>) -> super::Extraction {
    extract(&Capture::from_bytes(bytes).unwrap(), &Filter::default())
}

fn call_ids(extraction: &super::Extraction) -> Vec<&str> {
    extraction
        .messages
        .iter()
        .filter_map(|message| message.text.call_id())
        .collect()
}

#[test]
fn pcap_reads_alike_in_both_byte_orders_and_timestamp_precisions() {
    let (a, b) = addresses();
    let records = [
        Record::new(
            1_700_000_000_000_001_000,
            ethernet_udp(a, b, &options("one"), None),
        ),
        Record::new(
            1_700_000_000_250_002_000,
            ethernet_udp(b, a, &options("two"), None),
        ),
    ];
    for big_endian in [false, true] {
        for nanosecond in [false, true] {
            let extraction = read(pcap(big_endian, nanosecond, ETHERNET, 65_535, &records));
            assert_eq!(call_ids(&extraction), vec!["one", "two"]);
            let offset = extraction.messages[1].time;
            assert_eq!(
                offset,
                Duration::from_nanos(250_001_000),
                "{big_endian} {nanosecond}"
            );
            assert_eq!(extraction.messages[0].source, a);
            assert_eq!(extraction.messages[0].transport, Transport::Udp);
        }
    }
}

#[test]
fn pcapng_interfaces_keep_their_own_link_type_and_resolution() {
    let (a, b) = addresses();
    let interfaces = [
        Interface {
            link: 1,
            tsresol: 6,
        },
        Interface {
            link: 101,
            tsresol: 9,
        },
    ];
    let raw = {
        let mut packet = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .udp(5060, 5060)
            .write(&mut packet, &options("raw"))
            .unwrap();
        packet
    };
    let packets = vec![
        (0, 1_000_000, ethernet_udp(a, b, &options("ethernet"), None)),
        // 1.5 s in nanoseconds on the second interface.
        (1, 1_500_000_000, raw),
    ];
    let extraction = read(pcapng(&interfaces, &packets));
    assert_eq!(call_ids(&extraction), vec!["ethernet", "raw"]);
    assert_eq!(extraction.messages[1].time, Duration::from_millis(500));
}

#[test]
fn vlan_tags_bsd_loopback_and_raw_ip_are_decoded() {
    let (a, b) = addresses();
    let tagged = read(pcap(
        false,
        false,
        ETHERNET,
        65_535,
        &[Record::new(
            0,
            ethernet_udp(a, b, &options("vlan"), Some(42)),
        )],
    ));
    assert_eq!(call_ids(&tagged), vec!["vlan"]);
    let tcp = raw_tcp(a, b, 1, false, &options("loop"));
    let looped = read(pcap(
        false,
        false,
        NULL,
        65_535,
        &[Record::new(0, null_loopback(&tcp))],
    ));
    assert_eq!(call_ids(&looped), vec!["loop"]);
    assert_eq!(looped.messages[0].transport, Transport::Tcp);
}

#[test]
fn ipv4_fragments_are_reassembled_in_any_order() {
    let (a, b) = addresses();
    let mut big = options("fragmented");
    big.extend(vec![b'x'; 3000]);
    let mut fragments = raw_udp_fragments(a, b, &big, 1480);
    assert_eq!(fragments.len(), 3);
    fragments.reverse();
    let records: Vec<Record> = fragments
        .into_iter()
        .map(|fragment| Record::new(0, fragment))
        .collect();
    let extraction = read(pcap(false, false, RAW, 65_535, &records));
    assert_eq!(call_ids(&extraction), vec!["fragmented"]);
    assert_eq!(extraction.stats.ip_fragments, 3);
    assert_eq!(extraction.stats.ip_reassembled, 1);
    // The body was cut at Content-Length 0, as the message says.
    assert!(extraction.messages[0].text.body.is_empty());
}

#[test]
fn a_lost_fragment_is_counted_not_fatal() {
    let (a, b) = addresses();
    let mut big = options("lost");
    big.extend(vec![b'x'; 3000]);
    let fragments = raw_udp_fragments(a, b, &big, 1480);
    let records = [
        Record::new(0, fragments[0].clone()),
        Record::new(0, fragments[2].clone()),
    ];
    let extraction = read(pcap(false, false, RAW, 65_535, &records));
    assert!(extraction.messages.is_empty());
    assert_eq!(extraction.stats.ip_fragments_lost, 1);
}

#[test]
fn tcp_out_of_order_retransmitted_and_garbage_bytes_yield_each_message_once() {
    let (a, b) = addresses();
    let mut stream = b"\x00\x01garbage before\r\n".to_vec();
    stream.extend(options("first"));
    stream.extend(options("second"));
    let (one, rest) = stream.split_at(40);
    let (two, three) = rest.split_at(200);
    let base = 1000u32;
    let records = [
        Record::new(0, raw_tcp(a, b, base, true, b"")),
        Record::new(1, raw_tcp(a, b, base + 1, false, one)),
        // Third piece before the second.
        Record::new(2, raw_tcp(a, b, base + 1 + 240, false, three)),
        Record::new(3, raw_tcp(a, b, base + 1 + 40, false, two)),
        // The second piece again.
        Record::new(4, raw_tcp(a, b, base + 1 + 40, false, two)),
    ];
    let extraction = read(pcap(false, true, RAW, 65_535, &records));
    assert_eq!(call_ids(&extraction), vec!["first", "second"]);
    assert_eq!(extraction.stats.tcp_retransmitted_bytes, two.len() as u64);
    assert_eq!(extraction.stats.tcp_bytes_skipped, 18);
}

#[test]
fn snap_length_cuts_are_skipped_and_counted() {
    let (a, b) = addresses();
    let whole = ethernet_udp(a, b, &options("whole"), None);
    let cut = ethernet_udp(a, b, &options("cut"), None);
    let mut truncated = Record::new(1, cut[..60].to_vec());
    truncated.original_len = cut.len() as u32;
    let extraction = read(pcap(
        false,
        false,
        ETHERNET,
        60,
        &[Record::new(0, whole), truncated],
    ));
    assert_eq!(call_ids(&extraction), vec!["whole"]);
    assert_eq!(extraction.stats.snap_truncated, 1);
}

#[test]
fn a_truncated_file_keeps_the_frames_before_the_cut() {
    let (a, b) = addresses();
    let records = [
        Record::new(0, ethernet_udp(a, b, &options("kept"), None)),
        Record::new(1, ethernet_udp(a, b, &options("lost"), None)),
    ];
    let mut bytes = pcap(false, false, ETHERNET, 65_535, &records);
    bytes.truncate(bytes.len() - 30);
    let extraction = read(bytes);
    assert_eq!(call_ids(&extraction), vec!["kept"]);
    let error = extraction.stats.file_error.unwrap();
    assert!(
        error.contains("frame 2") && error.contains("truncated"),
        "{error}"
    );
}

#[test]
fn a_damaged_file_header_is_reported() {
    let bytes = pcap(false, false, ETHERNET, 65_535, &[]);
    let extraction = read(bytes[..10].to_vec());
    assert_eq!(extraction.stats.frames, 0);
    assert!(extraction.stats.file_error.unwrap().contains("truncated"));
}

#[test]
fn a_file_that_is_no_capture_is_refused_by_its_magic() {
    match Capture::from_bytes(b"SIP/2.0 200 OK\r\n".to_vec()) {
        Err(CaptureError::NotACapture { magic }) => assert_eq!(magic, "53 49 50 2f"),
        other => panic!("expected NotACapture, got {:?}", other.err()),
    }
    assert!(matches!(
        Capture::from_bytes(Vec::new()),
        Err(CaptureError::NotACapture { .. })
    ));
}

#[test]
fn damaged_captures_never_panic_the_reader() {
    let seeds: Vec<Vec<u8>> = vec![
        include_bytes!("../../pcap-fixtures/call-tcp.pcap").to_vec(),
        include_bytes!("../../pcap-fixtures/call-udp.pcapng").to_vec(),
        include_bytes!("../../pcap-fixtures/invite-403-after-rotation.pcap").to_vec(),
        include_bytes!("../../pcap-fixtures/register-digest.pcapng").to_vec(),
    ];
    // xorshift: the same mutations on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3000 {
        let mut bytes = seeds[round % seeds.len()].clone();
        let flips = 1 + next() % 16;
        for _ in 0..flips {
            let position = (next() % bytes.len() as u64) as usize;
            bytes[position] = next() as u8;
        }
        if round % 5 == 0 {
            bytes.truncate((next() % bytes.len() as u64) as usize);
        }
        if let Ok(capture) = Capture::from_bytes(bytes) {
            let extraction = extract(&capture, &Filter::default());
            let _ = super::script::dialogues(extraction.messages, &[]);
        }
    }
}

#[test]
fn filters_keep_ports_time_windows_and_call_ids() {
    let (a, b) = addresses();
    let other: (SocketAddr, SocketAddr) = (
        "10.0.0.1:5070".parse().unwrap(),
        "10.0.0.2:5070".parse().unwrap(),
    );
    let records = [
        Record::new(0, ethernet_udp(a, b, &options("a"), None)),
        Record::new(
            2_000_000_000,
            ethernet_udp(other.0, other.1, &options("b"), None),
        ),
        Record::new(4_000_000_000, ethernet_udp(a, b, &options("c"), None)),
    ];
    let capture = Capture::from_bytes(pcap(false, false, ETHERNET, 65_535, &records)).unwrap();
    let by_port = extract(
        &capture,
        &Filter {
            ports: vec![5070],
            ..Filter::default()
        },
    );
    assert_eq!(call_ids(&by_port), vec!["b"]);
    assert_eq!(by_port.stats.filtered_out, 2);
    let window = extract(
        &capture,
        &Filter {
            from: Some(Duration::from_secs(1)),
            until: Some(Duration::from_secs(4)),
            ..Filter::default()
        },
    );
    assert_eq!(call_ids(&window), vec!["b"]);
    let all = extract(&capture, &Filter::default());
    let (chosen, _) = super::script::dialogues(all.messages, &["c".to_string()]);
    assert_eq!(chosen.len(), 1);
    assert_eq!(chosen[0].call_id, "c");
}
