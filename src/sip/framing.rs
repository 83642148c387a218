//! Message framing on stream transports (RFC 3261 §18.3): a message ends `Content-Length`
//! bytes after the blank line that closes its headers. Bytes arrive in arbitrary pieces, so
//! the framer buffers until a whole message is there, and hands out every whole message a
//! single read delivered.
//!
//! Keep-alives (RFC 5626 §3.5.1): a double CRLF between messages is a ping that the
//! receiver answers with a single CRLF, the pong. Lone CRLFs are consumed.

use bytes::{Buf, Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Message(Bytes),
    /// A CRLFCRLF keep-alive ping: answer with [`PONG`].
    Ping,
}

pub const PONG: &[u8] = b"\r\n";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("message exceeds the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("message on a stream transport has no Content-Length")]
    MissingContentLength,
    #[error("Content-Length is not a number: {value:?}")]
    BadContentLength { value: String },
}

/// Buffers stream bytes and cuts them into messages.
#[derive(Debug)]
pub struct StreamFramer {
    buffer: BytesMut,
    max_message: usize,
    /// How much of the buffer is known to hold no CRLFCRLF, so a message arriving in
    /// small pieces is scanned once, not once per piece.
    scanned: usize,
}

impl StreamFramer {
    pub fn new(max_message: usize) -> Self {
        Self {
            buffer: BytesMut::with_capacity(4096),
            max_message,
            scanned: 0,
        }
    }

    /// The buffer to read into.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buffer
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
    }

    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed. After an error the
    /// stream cannot be resynchronised and the connection should be closed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            if self.buffer.starts_with(b"\r\n\r\n") {
                self.scanned = 0;
                self.buffer.advance(4);
                return Ok(Some(Frame::Ping));
            }
            if self.buffer.starts_with(b"\r\n") {
                match self.buffer.get(2) {
                    // Possibly the first half of a ping: wait for the rest.
                    None | Some(b'\r') if self.buffer.len() < 4 => return Ok(None),
                    _ => {
                        self.scanned = 0;
                        self.buffer.advance(2);
                        continue;
                    }
                }
            }
            break;
        }
        // Resume three bytes back: the terminator may straddle the previous end.
        let from = self.scanned.saturating_sub(3);
        let Some(header_end) = find_header_end(&self.buffer[from..]).map(|end| end + from) else {
            self.scanned = self.buffer.len();
            if self.buffer.len() > self.max_message {
                return Err(FrameError::TooLarge {
                    limit: self.max_message,
                });
            }
            return Ok(None);
        };
        let body_length = content_length(&self.buffer[..header_end])?;
        let total = header_end
            .checked_add(body_length)
            .filter(|total| *total <= self.max_message)
            .ok_or(FrameError::TooLarge {
                limit: self.max_message,
            })?;
        if self.buffer.len() < total {
            self.buffer.reserve(total - self.buffer.len());
            return Ok(None);
        }
        self.scanned = 0;
        Ok(Some(Frame::Message(self.buffer.split_to(total).freeze())))
    }
}

/// Index just past the CRLFCRLF that ends the header section.
pub fn find_header_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|index| index + 4)
}

/// The Content-Length (or compact `l`) value in a header section.
pub fn content_length(head: &[u8]) -> Result<usize, FrameError> {
    for line in head.split(|byte| *byte == b'\n') {
        let Some(colon) = line.iter().position(|byte| *byte == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
            let value = line[colon + 1..].trim_ascii();
            let text = std::str::from_utf8(value).unwrap_or("");
            return text.parse().map_err(|_| FrameError::BadContentLength {
                value: String::from_utf8_lossy(value).into_owned(),
            });
        }
    }
    Err(FrameError::MissingContentLength)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &[u8] = b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 5\r\n\r\nhello";

    fn message(frame: Option<Frame>) -> Bytes {
        match frame {
            Some(Frame::Message(bytes)) => bytes,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[test]
    fn byte_by_byte_arrival_yields_one_message() {
        let mut framer = StreamFramer::new(1024);
        for (index, byte) in MESSAGE.iter().enumerate() {
            framer.push(&[*byte]);
            let frame = framer.next_frame().unwrap();
            if index + 1 < MESSAGE.len() {
                assert_eq!(frame, None, "frame too early at byte {index}");
            } else {
                assert_eq!(message(frame), MESSAGE);
            }
        }
        assert_eq!(framer.buffered(), 0);
    }

    #[test]
    fn several_messages_in_one_read() {
        let mut framer = StreamFramer::new(1024);
        let mut data = MESSAGE.to_vec();
        data.extend_from_slice(b"SIP/2.0 200 OK\r\nl: 0\r\n\r\n");
        data.extend_from_slice(&MESSAGE[..10]);
        framer.push(&data);
        assert_eq!(message(framer.next_frame().unwrap()), MESSAGE);
        assert_eq!(
            message(framer.next_frame().unwrap()),
            &b"SIP/2.0 200 OK\r\nl: 0\r\n\r\n"[..]
        );
        assert_eq!(framer.next_frame().unwrap(), None);
        framer.push(&MESSAGE[10..]);
        assert_eq!(message(framer.next_frame().unwrap()), MESSAGE);
    }

    #[test]
    fn keepalive_ping_and_stray_crlf() {
        let mut framer = StreamFramer::new(1024);
        framer.push(b"\r\n");
        assert_eq!(framer.next_frame().unwrap(), None);
        framer.push(b"\r\n");
        assert_eq!(framer.next_frame().unwrap(), Some(Frame::Ping));
        framer.push(b"\r\n");
        framer.push(MESSAGE);
        assert_eq!(message(framer.next_frame().unwrap()), MESSAGE);
    }

    #[test]
    fn missing_or_bad_content_length_is_an_error() {
        let mut framer = StreamFramer::new(1024);
        framer.push(b"OPTIONS sip:a SIP/2.0\r\nVia: x\r\n\r\n");
        assert_eq!(framer.next_frame(), Err(FrameError::MissingContentLength));
        let mut framer = StreamFramer::new(1024);
        framer.push(b"OPTIONS sip:a SIP/2.0\r\nContent-Length: -1\r\n\r\n");
        assert!(matches!(
            framer.next_frame(),
            Err(FrameError::BadContentLength { .. })
        ));
    }

    #[test]
    fn size_limit_applies_to_headers_and_declared_body() {
        let mut framer = StreamFramer::new(64);
        framer.push(&[b'a'; 65]);
        assert_eq!(framer.next_frame(), Err(FrameError::TooLarge { limit: 64 }));
        let mut framer = StreamFramer::new(64);
        framer.push(b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 999999999999\r\n\r\n");
        assert_eq!(framer.next_frame(), Err(FrameError::TooLarge { limit: 64 }));
    }
}
