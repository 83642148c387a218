//! `byoc-sidecar replay`: SIP dialogues out of a packet capture, played against a live
//! target, and a report of how the live run compares with the capture.
//!
//! The layers, bottom up, all pure but the driver:
//! - [`capture`]: pcap and pcapng files into link-layer frames;
//! - [`packet`]: frames into UDP datagrams and TCP segments (link types, IP fragments);
//! - [`tcp`]: TCP stream reassembly;
//! - [`extract`]: SIP messages out of datagrams and streams, with every skip counted in
//!   [`ReaderStats`];
//! - [`text`]: a lossless, lenient SIP message model for what the capture holds;
//! - [`script`]: messages grouped into dialogues, each message a step with its
//!   transaction and role;
//! - [`build`] and [`player`]: a side of a dialogue acted out live (RFC 3261 UAC and UAS
//!   behaviour, with timers taken as arguments);
//! - [`report`]: ladders side by side, verdicts, text and JSON;
//! - [`endpoint`]: one side on the network (sockets, connections, the clock);
//! - [`driver`]: the run as a whole, from options to report.

pub mod build;
pub mod capture;
pub mod driver;
pub mod endpoint;
pub mod extract;
pub mod packet;
pub mod player;
pub mod report;
pub mod script;
pub mod tcp;
pub mod text;

pub use driver::{replay, ReplayError, ReplayOptions};
pub use extract::{read, CapturedMessage, Extraction, Filter};

/// What reading a capture found and skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReaderStats {
    /// Frames (packets) in the file.
    pub frames: u64,
    /// Frames of a link type this reader does not decode.
    pub unsupported_link: u64,
    /// Frames cut short by the capture's snap length.
    pub snap_truncated: u64,
    /// Frames that do not decode as their link type says.
    pub malformed_frames: u64,
    /// Frames without IP (ARP, LLDP, ...).
    pub not_ip: u64,
    /// IP packets that are neither UDP nor TCP.
    pub not_udp_tcp: u64,
    pub udp_datagrams: u64,
    pub tcp_segments: u64,
    pub ip_fragments: u64,
    /// Datagrams put back together from fragments.
    pub ip_reassembled: u64,
    /// Fragment sets that never completed.
    pub ip_fragments_lost: u64,
    /// TCP payload bytes seen before (retransmissions, overlaps).
    pub tcp_retransmitted_bytes: u64,
    /// TCP bytes that are not part of a whole SIP message (garbage, holes, a stream
    /// joined mid-message, a message cut off at the end).
    pub tcp_bytes_skipped: u64,
    /// UDP datagrams that are only CRLF keep-alives.
    pub keep_alives: u64,
    pub sip_messages: u64,
    /// UDP payloads and framed TCP messages that are not SIP.
    pub non_sip_payloads: u64,
    /// Messages that start like SIP but that the proxy's parser refuses (a header line
    /// without a colon, white space in the Request-URI, ...): the sidecar would drop
    /// them too, so they are not replayed.
    pub sip_refused: u64,
    /// SIP messages without a Call-ID (in no dialogue).
    pub sip_without_call_id: u64,
    /// Packets and messages left out by the filters.
    pub filtered_out: u64,
    /// The file ended early or is damaged after some point: what came before was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_error: Option<String>,
}

#[cfg(test)]
mod synthetic;
#[cfg(test)]
mod tests;
