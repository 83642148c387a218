//! The one pass of [`MessageView::parse`]: start line (RFC 3261 §7.1, §7.2), header lines
//! with folding (§7.3.1), and the body length rules of §18.3.

use std::ops::Range;

use bytes::Bytes;

use super::text::{is_token, trimmed_range};
use super::{missing, Entry, HeaderName, MessageView, Span, StartLine, ViewError};

impl MessageView {
    /// Parses one whole message by the rules in the module documentation.
    /// `datagram` selects the §18.3 body rule of an unreliable transport.
    pub fn parse(bytes: Bytes, datagram: bool) -> Result<Self, ViewError> {
        let rule = if datagram {
            BodyRule::Datagram
        } else {
            BodyRule::Stream
        };
        Self::parse_by(bytes, rule)
    }

    /// Parses a message as a capture holds it: by the datagram rule, except that a body
    /// shorter than its Content-Length is kept as it is (the capture cut it; a snap
    /// length, a lost fragment). [`content_length`](Self::content_length) still gives
    /// what was declared.
    pub fn parse_captured(bytes: Bytes) -> Result<Self, ViewError> {
        Self::parse_by(bytes, BodyRule::Captured)
    }

    fn parse_by(bytes: Bytes, rule: BodyRule) -> Result<Self, ViewError> {
        check_size(bytes.len())?;
        let leading = bytes
            .iter()
            .take_while(|byte| matches!(byte, b'\r' | b'\n'))
            .count();
        let bytes = bytes.slice(leading..);
        let (start, headers_start) = parse_start_line(&bytes)?;
        let mut view = Self {
            bytes,
            start,
            headers: Vec::with_capacity(16),
            headers_start: headers_start as u32,
            headers_end: 0,
            body_start: 0,
            content_length: None,
        };
        view.parse_headers()?;
        view.frame_body(rule)?;
        Ok(view)
    }

    fn parse_headers(&mut self) -> Result<(), ViewError> {
        let bytes = &self.bytes;
        let mut position = self.headers_start as usize;
        let mut line_number = 2;
        // The colon of the header being read, so a continuation can re-trim its value.
        let mut value_from = 0;
        loop {
            let newline = memchr(bytes, b'\n', position).ok_or(ViewError::UnterminatedHeaders)?;
            let content_end = if newline > position && bytes.get(newline - 1) == Some(&b'\r') {
                newline - 1
            } else {
                newline
            };
            let content = bytes.get(position..content_end).unwrap_or_default();
            if content.is_empty() {
                self.headers_end = position as u32;
                self.body_start = (newline + 1) as u32;
                return Ok(());
            }
            if std::str::from_utf8(content).is_err() {
                return Err(ViewError::NotUtf8 { line: line_number });
            }
            if matches!(content.first(), Some(b' ' | b'\t')) {
                let entry = self
                    .headers
                    .last_mut()
                    .ok_or(ViewError::FoldWithoutHeader { line: line_number })?;
                entry.value = Span::new(trimmed_range(bytes, value_from..content_end));
                entry.line.end = (newline + 1) as u32;
            } else {
                let colon = memchr(content, b':', 0)
                    .ok_or(ViewError::HeaderWithoutColon { line: line_number })?;
                let name = trimmed_range(bytes, position..position + colon);
                let name_bytes = bytes.get(name.clone()).unwrap_or_default();
                if !is_token(name_bytes) {
                    return Err(ViewError::BadHeaderName { line: line_number });
                }
                let (name_kind, expanded) = HeaderName::classify(name_bytes);
                value_from = position + colon + 1;
                self.headers.push(Entry {
                    name: name_kind,
                    expanded,
                    name_span: Span::new(name),
                    value: Span::new(trimmed_range(bytes, value_from..content_end)),
                    line: Span::new(position..newline + 1),
                });
            }
            position = newline + 1;
            line_number += 1;
        }
    }

    fn frame_body(&mut self, rule: BodyRule) -> Result<(), ViewError> {
        let datagram = rule != BodyRule::Stream;
        let mut declared = None;
        for entry in self.entries(HeaderName::ContentLength.into()) {
            let line = self.line_number(entry);
            let value = self.text(entry.value);
            if value.is_empty() || !value.bytes().all(|byte| byte.is_ascii_digit()) {
                return Err(ViewError::BadContentLength { line });
            }
            let length = value
                .parse::<usize>()
                .map_err(|_| ViewError::BadContentLength { line })?;
            if declared.is_some_and(|first| first != length) {
                return Err(ViewError::ConflictingContentLength { line });
            }
            declared = Some(length);
        }
        let body_start = self.body_start as usize;
        let available = self.bytes.len() - body_start;
        let body_length = match declared {
            Some(declared) if declared > available && rule == BodyRule::Captured => available,
            Some(declared) if declared > available => {
                return Err(ViewError::BodyTooShort {
                    declared,
                    available,
                })
            }
            Some(declared) if declared < available && !datagram => {
                return Err(ViewError::BodyTooLong {
                    declared,
                    available,
                })
            }
            Some(declared) => declared,
            None if datagram => available,
            None => return Err(missing(HeaderName::ContentLength.into())),
        };
        self.content_length = declared;
        self.bytes.truncate(body_start + body_length);
        Ok(())
    }
}

/// Which §18.3 body rule a parse follows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyRule {
    Stream,
    Datagram,
    /// A datagram's rule, keeping a body the capture cut short.
    Captured,
}

pub(super) fn check_size(length: usize) -> Result<(), ViewError> {
    if u32::try_from(length).is_err() {
        return Err(ViewError::TooLarge { length });
    }
    Ok(())
}

fn memchr(bytes: &[u8], needle: u8, from: usize) -> Option<usize> {
    bytes
        .get(from..)?
        .iter()
        .position(|byte| *byte == needle)
        .map(|index| index + from)
}

/// Reads the start line; returns it and where the first header line starts.
fn parse_start_line(bytes: &[u8]) -> Result<(StartLine, usize), ViewError> {
    if bytes.is_empty() {
        return Err(ViewError::NoStartLine);
    }
    let newline = memchr(bytes, b'\n', 0).ok_or(ViewError::UnterminatedHeaders)?;
    let line_end = if newline > 0 && bytes.get(newline - 1) == Some(&b'\r') {
        newline - 1
    } else {
        newline
    };
    let line = bytes.get(..line_end).unwrap_or_default();
    let text = std::str::from_utf8(line).map_err(|_| ViewError::NotUtf8 { line: 1 })?;
    let words = words(text);
    let is_status_line = text
        .as_bytes()
        .get(..4)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"SIP/"));
    let start = if is_status_line {
        let [version, code, _] = words;
        check_version(text, version.ok_or(ViewError::BadStartLine)?)?;
        let code = code.ok_or(ViewError::BadStatusCode)?;
        let code_text = text.get(code.clone()).unwrap_or_default();
        let number = code_text.parse::<u16>().ok();
        let code_value = number
            .filter(|value| code_text.len() == 3 && (100..=699).contains(value))
            .ok_or(ViewError::BadStatusCode)?;
        // The reason phrase is everything after the white space that follows the code.
        let reason_start = code.end
            + text
                .get(code.end..)
                .unwrap_or_default()
                .bytes()
                .take_while(|byte| matches!(byte, b' ' | b'\t'))
                .count();
        StartLine::Response {
            code: code_value,
            reason: Span::new(reason_start..line_end),
        }
    } else {
        let [method, uri, version] = words;
        let (method, uri, version) = match (method, uri, version) {
            (Some(method), Some(uri), Some(version)) => (method, uri, version),
            _ => return Err(ViewError::BadStartLine),
        };
        if !is_token(text.get(method.clone()).unwrap_or_default().as_bytes()) {
            return Err(ViewError::BadMethod);
        }
        if version.end != text.trim_end_matches([' ', '\t']).len() {
            return Err(ViewError::BadStartLine);
        }
        check_version(text, version)?;
        StartLine::Request {
            method: Span::new(method),
            uri: Span::new(uri),
        }
    };
    Ok((start, newline + 1))
}

/// The ranges of the first three SP/HTAB-separated words of a start line.
fn words(text: &str) -> [Option<Range<usize>>; 3] {
    let bytes = text.as_bytes();
    let mut found = [None, None, None];
    let mut position = 0;
    for slot in &mut found {
        while bytes
            .get(position)
            .is_some_and(|byte| matches!(byte, b' ' | b'\t'))
        {
            position += 1;
        }
        let start = position;
        while bytes
            .get(position)
            .is_some_and(|byte| !matches!(byte, b' ' | b'\t'))
        {
            position += 1;
        }
        if position > start {
            *slot = Some(start..position);
        }
    }
    found
}

fn check_version(text: &str, version: Range<usize>) -> Result<(), ViewError> {
    match text.get(version) {
        Some(version) if version.eq_ignore_ascii_case("SIP/2.0") => Ok(()),
        _ => Err(ViewError::UnsupportedVersion),
    }
}
