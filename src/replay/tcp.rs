//! TCP stream reassembly for captured traffic, one direction of one connection at a
//! time: segments are put back in sequence order, retransmitted and overlapping bytes
//! are delivered once, and a hole that never fills (a packet the capture missed) is
//! skipped at the end or when too much waits behind it, with the skip reported so the
//! SIP framer resynchronises. A stream first seen without its SYN starts at its first
//! segment, also reported as a skip: the capture may begin inside a message.
//!
//! Sequence numbers wrap (RFC 9293 §3.4); distances are taken modulo 2^32.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use super::packet::TcpHeader;

/// Bytes held out of order per direction before the hole in front of them is skipped.
pub const MAX_PENDING_BYTES: usize = 1 << 20;
/// Segments held out of order per direction before the hole in front of them is skipped.
pub const MAX_PENDING_SEGMENTS: usize = 4096;
/// Directions tracked at once; beyond it the least recently used half is forgotten.
pub const MAX_STREAMS: usize = 65_536;

type Key = (SocketAddr, SocketAddr);

/// Bytes now in order for one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub data: Vec<u8>,
    /// Bytes before this chunk were lost (or the stream was joined mid-way): whatever the
    /// framer holds is incomplete and it must look for the next message start.
    pub after_gap: bool,
}

/// What one segment did to its stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub chunks: Vec<Chunk>,
    /// Payload bytes this segment carried that had been delivered already.
    pub retransmitted: usize,
    /// A SYN began a new connection on a 4-tuple already in use: the old one is over.
    pub restarted: bool,
}

#[derive(Debug)]
struct Stream {
    /// The sequence number of the next byte to deliver.
    next: u32,
    /// The stream offset of that byte: bytes delivered or skipped so far.
    offset: u64,
    /// Out-of-order segments by stream offset.
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
    /// The next delivery follows lost bytes.
    gap: bool,
    last_use: u64,
}

impl Stream {
    fn new(next: u32, gap: bool, last_use: u64) -> Stream {
        Stream {
            next,
            offset: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            gap,
            last_use,
        }
    }
}

/// Every direction of every connection in a capture.
#[derive(Debug, Default)]
pub struct Reassembler {
    streams: HashMap<Key, Stream>,
    /// Directions ended by RST or forgotten for room since [`Reassembler::take_forgotten`].
    forgotten: Vec<Key>,
    clock: u64,
}

/// `a - b` as a signed distance on the 2^32 circle.
fn distance(a: u32, b: u32) -> i64 {
    i64::from(a.wrapping_sub(b) as i32)
}

impl Reassembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one segment of the direction `source -> destination`.
    pub fn push(
        &mut self,
        source: SocketAddr,
        destination: SocketAddr,
        header: TcpHeader,
        payload: &[u8],
    ) -> Delivery {
        self.clock += 1;
        let key = (source, destination);
        let mut delivery = Delivery::default();
        if header.rst {
            if self.streams.remove(&key).is_some() {
                self.forgotten.push(key);
            }
            return delivery;
        }
        if header.syn {
            let fresh = Stream::new(header.sequence.wrapping_add(1), false, self.clock);
            delivery.restarted = self.streams.insert(key, fresh).is_some();
            self.evict();
            if payload.is_empty() {
                return delivery;
            }
            return self.push_data(
                key,
                header.sequence.wrapping_add(1),
                payload,
                header.fin,
                delivery,
            );
        }
        if !self.streams.contains_key(&key) {
            if payload.is_empty() {
                return delivery;
            }
            self.streams
                .insert(key, Stream::new(header.sequence, true, self.clock));
            self.evict();
        }
        self.push_data(key, header.sequence, payload, header.fin, delivery)
    }

    fn push_data(
        &mut self,
        key: Key,
        sequence: u32,
        payload: &[u8],
        fin: bool,
        mut delivery: Delivery,
    ) -> Delivery {
        let clock = self.clock;
        let Some(stream) = self.streams.get_mut(&key) else {
            return delivery;
        };
        stream.last_use = clock;
        let ahead = distance(sequence, stream.next);
        if ahead > 0 {
            if !payload.is_empty() {
                let at = stream.offset + ahead.unsigned_abs();
                match stream.pending.get_mut(&at) {
                    Some(held) if held.len() >= payload.len() => {
                        delivery.retransmitted += payload.len();
                    }
                    Some(held) => {
                        delivery.retransmitted += held.len();
                        stream.pending_bytes += payload.len() - held.len();
                        *held = payload.to_vec();
                    }
                    None => {
                        stream.pending_bytes += payload.len();
                        stream.pending.insert(at, payload.to_vec());
                    }
                }
            }
            if stream.pending_bytes > MAX_PENDING_BYTES
                || stream.pending.len() > MAX_PENDING_SEGMENTS
            {
                stream.skip_hole(&mut delivery);
            }
            return delivery;
        }
        let already = usize::try_from(ahead.unsigned_abs()).unwrap_or(usize::MAX);
        if already >= payload.len() {
            delivery.retransmitted += payload.len();
        } else {
            delivery.retransmitted += already;
            stream.deliver(&payload[already..], &mut delivery);
            if fin {
                stream.next = stream.next.wrapping_add(1);
            }
        }
        stream.drain(&mut delivery);
        delivery
    }

    /// The end of the capture: what still waits behind holes is delivered after them.
    pub fn finish(&mut self) -> Vec<(Key, Chunk)> {
        let mut out = Vec::new();
        for (key, stream) in &mut self.streams {
            while !stream.pending.is_empty() {
                let mut delivery = Delivery::default();
                stream.skip_hole(&mut delivery);
                out.extend(delivery.chunks.into_iter().map(|chunk| (*key, chunk)));
            }
        }
        out
    }

    /// The directions that ended (RST) or were forgotten for room since the last call:
    /// whatever a framer holds for them will never complete.
    pub fn take_forgotten(&mut self) -> Vec<Key> {
        std::mem::take(&mut self.forgotten)
    }

    /// Beyond [`MAX_STREAMS`], forgets the least recently used half in one pass.
    fn evict(&mut self) {
        if self.streams.len() <= MAX_STREAMS {
            return;
        }
        let mut uses: Vec<u64> = self
            .streams
            .values()
            .map(|stream| stream.last_use)
            .collect();
        let middle = uses.len() / 2;
        let (_, median, _) = uses.select_nth_unstable(middle);
        let median = *median;
        let forgotten = &mut self.forgotten;
        self.streams.retain(|key, stream| {
            let keep = stream.last_use >= median;
            if !keep {
                forgotten.push(*key);
            }
            keep
        });
    }
}

impl Stream {
    fn deliver(&mut self, data: &[u8], delivery: &mut Delivery) {
        if data.is_empty() {
            return;
        }
        let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.next = self.next.wrapping_add(length);
        self.offset += u64::from(length);
        match delivery.chunks.last_mut() {
            Some(last) if !self.gap => last.data.extend_from_slice(data),
            _ => delivery.chunks.push(Chunk {
                data: data.to_vec(),
                after_gap: std::mem::take(&mut self.gap),
            }),
        }
    }

    /// Delivers every held segment that now starts at or before the next offset.
    fn drain(&mut self, delivery: &mut Delivery) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > self.offset {
                break;
            }
            let (start, data) = entry.remove_entry();
            self.pending_bytes -= data.len();
            let already = usize::try_from(self.offset - start).unwrap_or(usize::MAX);
            if already >= data.len() {
                delivery.retransmitted += data.len();
            } else {
                delivery.retransmitted += already;
                self.deliver(&data[already..], delivery);
            }
        }
    }

    /// Gives up on the hole before the earliest held segment and delivers from there.
    fn skip_hole(&mut self, delivery: &mut Delivery) {
        if let Some(&start) = self.pending.keys().next() {
            let lost = start - self.offset;
            self.next = self
                .next
                .wrapping_add(u32::try_from(lost).unwrap_or(u32::MAX));
            self.offset = start;
            self.gap = true;
            self.drain(delivery);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses() -> (SocketAddr, SocketAddr) {
        (
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:5060".parse().unwrap(),
        )
    }

    fn header(sequence: u32, syn: bool) -> TcpHeader {
        TcpHeader {
            sequence,
            syn,
            fin: false,
            rst: false,
        }
    }

    fn bytes(delivery: &Delivery) -> Vec<u8> {
        delivery
            .chunks
            .iter()
            .flat_map(|chunk| chunk.data.clone())
            .collect()
    }

    #[test]
    fn out_of_order_segments_are_delivered_in_sequence_order() {
        let (a, b) = addresses();
        let mut streams = Reassembler::new();
        streams.push(a, b, header(999, true), b"");
        assert!(bytes(&streams.push(a, b, header(1005, false), b"world")).is_empty());
        let delivery = streams.push(a, b, header(1000, false), b"hello");
        assert_eq!(bytes(&delivery), b"helloworld");
        assert!(!delivery.chunks[0].after_gap);
    }

    #[test]
    fn retransmitted_and_overlapping_bytes_are_delivered_once() {
        let (a, b) = addresses();
        let mut streams = Reassembler::new();
        streams.push(a, b, header(0, true), b"");
        assert_eq!(
            bytes(&streams.push(a, b, header(1, false), b"abcd")),
            b"abcd"
        );
        let again = streams.push(a, b, header(1, false), b"abcd");
        assert_eq!((bytes(&again), again.retransmitted), (Vec::new(), 4));
        let overlap = streams.push(a, b, header(3, false), b"cdef");
        assert_eq!(
            (bytes(&overlap), overlap.retransmitted),
            (b"ef".to_vec(), 2)
        );
    }

    #[test]
    fn sequence_numbers_wrap_around() {
        let (a, b) = addresses();
        let mut streams = Reassembler::new();
        streams.push(a, b, header(u32::MAX - 2, true), b"");
        assert_eq!(
            bytes(&streams.push(a, b, header(u32::MAX - 1, false), b"ab")),
            b"ab"
        );
        assert_eq!(bytes(&streams.push(a, b, header(0, false), b"cd")), b"cd");
    }

    #[test]
    fn a_stream_joined_midway_and_a_hole_at_the_end_are_flagged_as_gaps() {
        let (a, b) = addresses();
        let mut streams = Reassembler::new();
        let first = streams.push(a, b, header(500, false), b"tail of something");
        assert!(first.chunks[0].after_gap);
        streams.push(a, b, header(600, false), b"after a hole");
        let rest = streams.finish();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].1.data, b"after a hole");
        assert!(rest[0].1.after_gap);
    }

    #[test]
    fn too_much_behind_a_hole_skips_it() {
        let (a, b) = addresses();
        let mut streams = Reassembler::new();
        streams.push(a, b, header(0, true), b"");
        let big = vec![b'x'; MAX_PENDING_BYTES + 1];
        let delivery = streams.push(a, b, header(100, false), &big);
        assert_eq!(delivery.chunks.len(), 1);
        assert!(delivery.chunks[0].after_gap);
        assert_eq!(delivery.chunks[0].data.len(), big.len());
    }

    #[test]
    fn a_new_syn_restarts_the_stream_and_rst_forgets_it() {
        let (a, b) = addresses();
        let mut streams = Reassembler::new();
        streams.push(a, b, header(0, true), b"");
        streams.push(a, b, header(1, false), b"one");
        assert!(streams.push(a, b, header(7000, true), b"").restarted);
        assert_eq!(
            bytes(&streams.push(a, b, header(7001, false), b"two")),
            b"two"
        );
        let reset = TcpHeader {
            rst: true,
            ..header(7004, false)
        };
        streams.push(a, b, reset, b"");
        assert!(streams.push(a, b, header(9000, false), b"x").chunks[0].after_gap);
    }
}
