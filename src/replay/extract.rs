//! SIP out of a capture: every UDP datagram that holds a SIP message, and every message
//! framed out of a reassembled TCP stream by Content-Length (RFC 3261 §18.3), in capture
//! order; then the messages grouped into dialogues by Call-ID.
//!
//! A TCP stream that starts inside a message, has a hole, or carries bytes that are not
//! SIP is resynchronised at the next line that is a SIP start line; the bytes skipped are
//! counted. Nothing here fails: what cannot be used is counted in [`ReaderStats`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::capture::{Capture, CaptureError};
use super::packet::Decoder;
use super::tcp::{Chunk, Reassembler};
use super::text::{header_end, is_start_line, SipText};
use super::ReaderStats;
use crate::config::Transport;
use crate::sip::framing::content_length;

/// The largest message framed out of a TCP stream (headers and body).
pub const MAX_STREAM_MESSAGE: usize = 1 << 20;

/// One SIP message as captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedMessage {
    /// The frame that carried it, or the one that completed it on TCP.
    pub frame: u64,
    /// Since the first frame of the capture.
    pub time: Duration,
    pub transport: Transport,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub text: SipText,
}

/// Which packets and dialogues to keep.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these Call-IDs (all when empty).
    pub call_ids: Vec<String>,
    /// Only messages at or after this offset from the first frame.
    pub from: Option<Duration>,
    /// Only messages before this offset.
    pub until: Option<Duration>,
    /// Only packets with one of these ports as source or destination (all when empty).
    pub ports: Vec<u16>,
}

/// What a capture holds.
#[derive(Debug, Clone)]
pub struct Extraction {
    pub messages: Vec<CapturedMessage>,
    pub stats: ReaderStats,
}

/// Where and when a message was seen, for [`CapturedMessage`].
struct Seen {
    frame: u64,
    time: Duration,
    transport: Transport,
    source: SocketAddr,
    destination: SocketAddr,
}

impl Seen {
    /// The message, if `bytes` are SIP; counted either way.
    fn message(&self, bytes: &[u8], stats: &mut ReaderStats) -> Option<CapturedMessage> {
        match SipText::parse(bytes) {
            Ok(text) => {
                stats.sip_messages += 1;
                Some(CapturedMessage {
                    frame: self.frame,
                    time: self.time,
                    transport: self.transport,
                    source: self.source,
                    destination: self.destination,
                    text,
                })
            }
            Err(error) => {
                let first_line = bytes
                    .split(|&byte| byte == b'\n')
                    .next()
                    .unwrap_or_default();
                if is_start_line(first_line.strip_suffix(b"\r").unwrap_or(first_line)) {
                    stats.sip_refused += 1;
                    tracing::debug!(frame = self.frame, error = %error, "replay: a SIP message the parser refuses");
                } else {
                    stats.non_sip_payloads += 1;
                }
                None
            }
        }
    }
}

/// Reads every SIP message of `capture` that passes `filter`. A truncated or malformed
/// file keeps what came before the damage and says so in `stats.file_error`.
pub fn extract(capture: &Capture, filter: &Filter) -> Extraction {
    let mut stats = ReaderStats::default();
    let mut decoder = Decoder::new();
    let mut streams = Reassembler::new();
    let mut framers: HashMap<(SocketAddr, SocketAddr), Framer> = HashMap::new();
    let mut messages = Vec::new();
    let mut first_time: Option<Duration> = None;
    let mut last: (u64, Duration) = (0, Duration::ZERO);
    for frame in capture.frames() {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                stats.file_error = Some(error.to_string());
                break;
            }
        };
        stats.frames += 1;
        let start = *first_time.get_or_insert(frame.time);
        let offset = frame.time.saturating_sub(start);
        last = (frame.number, offset);
        let Some(segment) = decoder.decode(&frame, &mut stats) else {
            continue;
        };
        let ports = [segment.source.port(), segment.destination.port()];
        if !filter.ports.is_empty() && !ports.iter().any(|port| filter.ports.contains(port)) {
            stats.filtered_out += 1;
            continue;
        }
        let key = (segment.source, segment.destination);
        let seen = Seen {
            frame: segment.frame,
            time: offset,
            transport: if segment.tcp.is_some() {
                Transport::Tcp
            } else {
                Transport::Udp
            },
            source: segment.source,
            destination: segment.destination,
        };
        let Some(header) = segment.tcp else {
            if segment
                .payload
                .iter()
                .all(|byte| matches!(byte, b'\r' | b'\n'))
            {
                stats.keep_alives += 1;
            } else {
                messages.extend(seen.message(&segment.payload, &mut stats));
            }
            continue;
        };
        let delivery = streams.push(key.0, key.1, header, &segment.payload);
        stats.tcp_retransmitted_bytes += delivery.retransmitted as u64;
        if delivery.restarted {
            drop_framer(&mut framers, &key, &mut stats);
        }
        for gone in streams.take_forgotten() {
            drop_framer(&mut framers, &gone, &mut stats);
        }
        for chunk in delivery.chunks {
            let framer = framers.entry(key).or_default();
            for bytes in framer.push(&chunk, &mut stats) {
                messages.extend(seen.message(&bytes, &mut stats));
            }
        }
    }
    // What waited behind holes at the end of the capture.
    for (key, chunk) in streams.finish() {
        let seen = Seen {
            frame: last.0,
            time: last.1,
            transport: Transport::Tcp,
            source: key.0,
            destination: key.1,
        };
        let framer = framers.entry(key).or_default();
        for bytes in framer.push(&chunk, &mut stats) {
            messages.extend(seen.message(&bytes, &mut stats));
        }
    }
    for framer in framers.values() {
        stats.tcp_bytes_skipped += framer.held() as u64;
    }
    decoder.finish(&mut stats);
    let before = messages.len();
    messages.retain(|message| {
        filter.from.is_none_or(|from| message.time >= from)
            && filter.until.is_none_or(|until| message.time < until)
    });
    stats.filtered_out += (before - messages.len()) as u64;
    Extraction { messages, stats }
}

/// Forgets the framer of a stream that ended; what it held is counted as skipped.
fn drop_framer(
    framers: &mut HashMap<(SocketAddr, SocketAddr), Framer>,
    key: &(SocketAddr, SocketAddr),
    stats: &mut ReaderStats,
) {
    if let Some(framer) = framers.remove(key) {
        stats.tcp_bytes_skipped += framer.held() as u64;
    }
}

/// Reads a capture file and extracts its SIP.
pub fn read(path: &std::path::Path, filter: &Filter) -> Result<Extraction, CaptureError> {
    Ok(extract(&Capture::open(path)?, filter))
}

/// Cuts one direction of a TCP stream into SIP messages.
#[derive(Debug, Default)]
struct Framer {
    buffer: Vec<u8>,
    /// Where the bytes not yet consumed begin.
    start: usize,
    /// How far past `start` the blank line ending the headers was looked for, so a
    /// message arriving in many pieces is scanned once.
    scanned: usize,
}

impl Framer {
    /// Bytes held, not yet part of a message.
    fn held(&self) -> usize {
        self.buffer.len() - self.start
    }

    fn push(&mut self, chunk: &Chunk, stats: &mut ReaderStats) -> Vec<Vec<u8>> {
        if chunk.after_gap && self.held() > 0 {
            let held = self.held();
            self.skip(held, stats);
        }
        self.buffer.extend_from_slice(&chunk.data);
        let mut out = Vec::new();
        loop {
            let pending = &self.buffer[self.start..];
            let blank = pending
                .iter()
                .take_while(|byte| matches!(byte, b'\r' | b'\n'))
                .count();
            if blank > 0 {
                self.consume(blank);
                continue;
            }
            let Some(line_end) = find(pending, b"\r\n") else {
                if pending.len() > MAX_STREAM_MESSAGE {
                    self.skip(pending.len(), stats);
                }
                break;
            };
            if !is_start_line(&pending[..line_end]) {
                let skip = next_start_line(pending).unwrap_or_else(|| {
                    // Keep a partial last line: it may become a start line.
                    pending
                        .iter()
                        .rposition(|&byte| byte == b'\n')
                        .map_or(0, |newline| newline + 1)
                });
                if skip == 0 {
                    break;
                }
                self.skip(skip, stats);
                continue;
            }
            let from = self.scanned.saturating_sub(3);
            let Some(end) = header_end(&pending[from..]).map(|end| end + from) else {
                self.scanned = pending.len();
                if pending.len() > MAX_STREAM_MESSAGE {
                    self.skip(line_end + 2, stats);
                    continue;
                }
                break;
            };
            // Without a readable Content-Length the body is taken as empty.
            let length = content_length(&pending[..end]).unwrap_or(0);
            if end.saturating_add(length) > MAX_STREAM_MESSAGE {
                self.skip(line_end + 2, stats);
                continue;
            }
            if pending.len() < end + length {
                break;
            }
            out.push(pending[..end + length].to_vec());
            self.consume(end + length);
        }
        out
    }

    fn consume(&mut self, count: usize) {
        self.start = (self.start + count).min(self.buffer.len());
        self.scanned = 0;
        // Compact once the consumed part is the larger half, so the cost stays linear.
        if self.start * 2 >= self.buffer.len() {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
    }

    fn skip(&mut self, count: usize, stats: &mut ReaderStats) {
        let count = count.min(self.held());
        stats.tcp_bytes_skipped += count as u64;
        self.consume(count);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The offset of the first line after the first one that is a SIP start line.
fn next_start_line(buffer: &[u8]) -> Option<usize> {
    let mut position = 0;
    while let Some(newline) = find(&buffer[position..], b"\n") {
        let start = position + newline + 1;
        let line_end = find(&buffer[start..], b"\r\n")?;
        if is_start_line(&buffer[start..start + line_end]) {
            return Some(start);
        }
        position = start;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &[u8], after_gap: bool) -> Chunk {
        Chunk {
            data: data.to_vec(),
            after_gap,
        }
    }

    const OPTIONS: &[u8] = b"OPTIONS sip:x SIP/2.0\r\nCall-ID: 1\r\nContent-Length: 3\r\n\r\nabc";

    #[test]
    fn messages_split_and_merged_across_chunks_are_framed_by_content_length() {
        let mut framer = Framer::default();
        let mut stats = ReaderStats::default();
        let mut both = OPTIONS.to_vec();
        both.extend_from_slice(b"\r\n");
        both.extend_from_slice(OPTIONS);
        let (first, second) = both.split_at(40);
        assert!(framer.push(&chunk(first, false), &mut stats).is_empty());
        let messages = framer.push(&chunk(second, false), &mut stats);
        assert_eq!(messages, vec![OPTIONS.to_vec(), OPTIONS.to_vec()]);
        assert_eq!(stats.tcp_bytes_skipped, 0);
    }

    #[test]
    fn garbage_and_a_gap_are_skipped_up_to_the_next_start_line() {
        let mut framer = Framer::default();
        let mut stats = ReaderStats::default();
        let junk = b"\x16\x03\x01 binary junk\r\nmore junk\r\n";
        let mut data = junk.to_vec();
        data.extend_from_slice(OPTIONS);
        assert_eq!(
            framer.push(&chunk(&data, false), &mut stats),
            vec![OPTIONS.to_vec()]
        );
        assert_eq!(stats.tcp_bytes_skipped, junk.len() as u64);
        // Half a message, then a hole: the half is dropped, the next message is found.
        assert!(framer
            .push(&chunk(&OPTIONS[..20], false), &mut stats)
            .is_empty());
        let mut after = b"ody\r\n".to_vec();
        after.extend_from_slice(OPTIONS);
        assert_eq!(
            framer.push(&chunk(&after, true), &mut stats),
            vec![OPTIONS.to_vec()]
        );
        assert_eq!(stats.tcp_bytes_skipped, junk.len() as u64 + 20 + 5);
    }

    #[test]
    fn an_absurd_content_length_does_not_stall_the_stream() {
        let mut framer = Framer::default();
        let mut stats = ReaderStats::default();
        let mut data = b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 99999999999\r\n\r\n".to_vec();
        data.extend_from_slice(OPTIONS);
        assert_eq!(
            framer.push(&chunk(&data, false), &mut stats),
            vec![OPTIONS.to_vec()]
        );
    }
}
