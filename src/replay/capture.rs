//! Capture files in, link-layer frames out. Reads pcap (both byte orders, micro- and
//! nanosecond timestamps, the "modified" Kuznetzov variant) and pcapng (several sections,
//! each with its own byte order, several interfaces, each with its own link type,
//! timestamp resolution and offset). The block parsing is `pcap-parser`'s; this module
//! picks the right parser per section, decodes timestamps and numbers the frames as
//! tshark does (from 1, every packet block counts).
//!
//! A file is read whole (at most [`MAX_CAPTURE_BYTES`]). A file that ends inside a block
//! yields every frame before it and then one [`CaptureError::Truncated`]; a file that is
//! neither format is refused before any frame.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pcap_parser::nom;
use pcap_parser::pcapng::{self, Block};
use pcap_parser::PcapError;

/// The largest capture read into memory.
pub const MAX_CAPTURE_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than the {limit}-byte limit")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("not a pcap or pcapng file: it starts with {magic}")]
    NotACapture { magic: String },
    #[error("the file ends inside frame {frame} (byte {offset}): the capture is truncated")]
    Truncated { frame: u64, offset: usize },
    #[error("malformed {what} at byte {offset}; the rest of the file is skipped")]
    Malformed { what: &'static str, offset: usize },
}

/// One captured packet as the capture stored it: link-layer header first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// 1-based, as tshark numbers frames.
    pub number: u64,
    /// Since the Unix epoch, as the capture says (not necessarily sensible).
    pub time: Duration,
    /// The LINKTYPE_ value of the interface that captured it.
    pub link_type: i32,
    pub data: &'a [u8],
    /// The length on the wire; more than `data.len()` when the snap length cut it.
    pub original_len: u32,
}

/// A capture file held in memory.
pub struct Capture {
    bytes: Vec<u8>,
}

impl Capture {
    pub fn open(path: &Path) -> Result<Capture, CaptureError> {
        use std::io::Read as _;
        let read_error = |source| CaptureError::Read {
            path: path.to_path_buf(),
            source,
        };
        // Read through a limit rather than trusting the size: a pipe says 0.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_CAPTURE_BYTES + 1).read_to_end(&mut bytes))
            .map_err(read_error)?;
        if bytes.len() as u64 > MAX_CAPTURE_BYTES {
            return Err(CaptureError::TooLarge {
                path: path.to_path_buf(),
                limit: MAX_CAPTURE_BYTES,
            });
        }
        Capture::from_bytes(bytes)
    }

    /// Checks the magic number; frames are parsed as they are iterated.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Capture, CaptureError> {
        let capture = Capture { bytes };
        match capture.format() {
            Some(_) => Ok(capture),
            None => Err(CaptureError::NotACapture {
                magic: describe_magic(&capture.bytes),
            }),
        }
    }

    fn format(&self) -> Option<Format> {
        let magic: [u8; 4] = self.bytes.get(..4)?.try_into().ok()?;
        match magic {
            [0x0a, 0x0d, 0x0d, 0x0a] => Some(Format::PcapNg),
            [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] | [0x34, 0xcd, 0xb2, 0xa1] => {
                Some(Format::Pcap)
            }
            // pcap-parser reads the "modified" variant in little-endian order only.
            [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => Some(Format::Pcap),
            _ => None,
        }
    }

    /// Every frame in file order; after an error, nothing more.
    pub fn frames(&self) -> Frames<'_> {
        let state = match self.format() {
            Some(Format::Pcap) => pcap_state(&self.bytes),
            Some(Format::PcapNg) => State::PcapNg {
                rest: &self.bytes,
                big_endian: false,
                interfaces: Vec::new(),
            },
            None => State::Done,
        };
        Frames {
            bytes: &self.bytes,
            state,
            number: 0,
            last_time: Duration::ZERO,
        }
    }
}

/// The first bytes of a file in hex, for an error message.
fn describe_magic(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "nothing (the file is empty)".to_string();
    }
    bytes
        .iter()
        .take(4)
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, Copy)]
enum Format {
    Pcap,
    PcapNg,
}

/// What a pcapng interface description says about its packets.
#[derive(Debug, Clone, Copy)]
struct Interface {
    link_type: i32,
    units_per_second: u64,
    offset_seconds: i64,
}

enum State<'a> {
    Pcap {
        rest: &'a [u8],
        big_endian: bool,
        modified: bool,
        nanoseconds: bool,
        link_type: i32,
    },
    PcapNg {
        rest: &'a [u8],
        big_endian: bool,
        interfaces: Vec<Interface>,
    },
    /// The file header itself is damaged: one error, then nothing.
    Failed(Option<CaptureError>),
    Done,
}

fn pcap_state(bytes: &[u8]) -> State<'_> {
    match pcap_parser::parse_pcap_header(bytes) {
        Ok((rest, header)) => State::Pcap {
            rest,
            big_endian: header.is_bigendian(),
            modified: header.is_modified_format(),
            nanoseconds: header.is_nanosecond_precision(),
            link_type: header.network.0,
        },
        Err(error) => State::Failed(Some(block_error(&error, 0, 0, "file header"))),
    }
}

pub struct Frames<'a> {
    bytes: &'a [u8],
    state: State<'a>,
    number: u64,
    /// A simple packet block has no timestamp: it gets its predecessor's.
    last_time: Duration,
}

impl<'a> Frames<'a> {
    fn next_pcap(&mut self) -> Option<Result<Frame<'a>, CaptureError>> {
        let State::Pcap {
            rest,
            big_endian,
            modified,
            nanoseconds,
            link_type,
        } = &mut self.state
        else {
            return None;
        };
        if rest.is_empty() {
            self.state = State::Done;
            return None;
        }
        let parsed = if *modified {
            pcap_parser::parse_pcap_frame_modified(rest)
        } else if *big_endian {
            pcap_parser::parse_pcap_frame_be(rest)
        } else {
            pcap_parser::parse_pcap_frame(rest)
        };
        let (link_type, nanoseconds) = (*link_type, *nanoseconds);
        let offset = self.bytes.len() - rest.len();
        self.number += 1;
        match parsed {
            Ok((remaining, block)) => {
                if let State::Pcap { rest, .. } = &mut self.state {
                    *rest = remaining;
                }
                let fraction = if nanoseconds {
                    u64::from(block.ts_usec)
                } else {
                    u64::from(block.ts_usec).saturating_mul(1000)
                };
                let time = Duration::from_secs(u64::from(block.ts_sec))
                    .saturating_add(Duration::from_nanos(fraction));
                Some(Ok(Frame {
                    number: self.number,
                    time,
                    link_type,
                    data: block.data,
                    original_len: block.origlen,
                }))
            }
            Err(error) => {
                self.state = State::Done;
                Some(Err(block_error(
                    &error,
                    self.number,
                    offset,
                    "packet record",
                )))
            }
        }
    }

    fn next_pcapng(&mut self) -> Option<Result<Frame<'a>, CaptureError>> {
        loop {
            let State::PcapNg {
                rest,
                big_endian,
                interfaces,
            } = &mut self.state
            else {
                return None;
            };
            if rest.is_empty() {
                self.state = State::Done;
                return None;
            }
            let offset = self.bytes.len() - rest.len();
            let parsed = if *big_endian {
                pcapng::parse_block_be(rest)
            } else {
                pcapng::parse_block_le(rest)
            };
            let block = match parsed {
                Ok((remaining, block)) => {
                    *rest = remaining;
                    block
                }
                Err(error) => {
                    self.state = State::Done;
                    return Some(Err(block_error(&error, self.number + 1, offset, "block")));
                }
            };
            let (interface_id, raw_time, data, original_len) = match block {
                Block::SectionHeader(section) => {
                    *big_endian = section.big_endian();
                    interfaces.clear();
                    continue;
                }
                Block::InterfaceDescription(description) => {
                    interfaces.push(Interface {
                        link_type: description.linktype.0,
                        units_per_second: description.ts_resolution().unwrap_or(1_000_000),
                        offset_seconds: description.ts_offset(),
                    });
                    continue;
                }
                Block::EnhancedPacket(packet) => (
                    packet.if_id,
                    Some((u64::from(packet.ts_high) << 32) | u64::from(packet.ts_low)),
                    packet.data,
                    packet.origlen,
                ),
                Block::SimplePacket(packet) => (0, None, packet.data, packet.origlen),
                _ => continue,
            };
            self.number += 1;
            let interface = usize::try_from(interface_id)
                .ok()
                .and_then(|index| interfaces.get(index))
                .copied();
            let time = match (raw_time, interface) {
                (Some(raw), Some(interface)) => pcapng_time(raw, interface),
                _ => self.last_time,
            };
            self.last_time = time;
            // A simple packet block's data can carry padding: never more than was on the
            // wire.
            let data = data.get(..original_len as usize).unwrap_or(data);
            return Some(Ok(Frame {
                number: self.number,
                time,
                // A packet of an interface the section never described has no known link
                // type: -1, which nobody decodes, so it is counted as unsupported.
                link_type: interface.map_or(-1, |interface| interface.link_type),
                data,
                original_len,
            }));
        }
    }
}

fn pcapng_time(raw: u64, interface: Interface) -> Duration {
    let units = u128::from(interface.units_per_second.max(1));
    let raw = u128::from(raw);
    let seconds = u64::try_from(raw / units).unwrap_or(u64::MAX);
    let nanos = u64::try_from((raw % units) * 1_000_000_000 / units).unwrap_or(0);
    let base = Duration::from_secs(seconds).saturating_add(Duration::from_nanos(nanos));
    let offset = Duration::from_secs(interface.offset_seconds.unsigned_abs());
    if interface.offset_seconds >= 0 {
        base.saturating_add(offset)
    } else {
        base.saturating_sub(offset)
    }
}

fn block_error(
    error: &nom::Err<PcapError<&[u8]>>,
    frame: u64,
    offset: usize,
    what: &'static str,
) -> CaptureError {
    match error {
        nom::Err::Incomplete(_) => CaptureError::Truncated { frame, offset },
        nom::Err::Error(PcapError::Incomplete(_) | PcapError::UnexpectedEof)
        | nom::Err::Failure(PcapError::Incomplete(_) | PcapError::UnexpectedEof) => {
            CaptureError::Truncated { frame, offset }
        }
        _ => CaptureError::Malformed { what, offset },
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, CaptureError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.state {
            State::Pcap { .. } => self.next_pcap(),
            State::PcapNg { .. } => self.next_pcapng(),
            State::Failed(ref mut error) => error.take().map(Err),
            State::Done => None,
        }
    }
}
