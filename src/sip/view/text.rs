//! The lexical pieces of RFC 3261 §25.1 that the view and the editor share: tokens,
//! linear white space, comma-separated lists (§7.3.1) and `;name=value` parameters
//! (§19.1.1, §20). Everything works on byte offsets so the editor can splice at them.

use std::ops::Range;

/// RFC 3261 §25.1 `token` characters.
pub(super) fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(
            byte,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

/// A non-empty RFC 3261 `token`.
pub(super) fn is_token(text: &[u8]) -> bool {
    !text.is_empty() && text.iter().all(|byte| is_token_byte(*byte))
}

/// SP and HTAB, plus the CR and LF that a folded value keeps inside it (§7.3.1).
pub(super) fn is_white(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\n')
}

/// `text` without leading and trailing white space (ASCII only: a non-breaking space
/// is content).
pub(super) fn trim_white(text: &str) -> &str {
    text.trim_matches(|character: char| character.is_ascii() && is_white(character as u8))
}

/// The range of `bytes[range]` left after trimming white space at both ends.
pub(super) fn trimmed_range(bytes: &[u8], range: Range<usize>) -> Range<usize> {
    let mut start = range.start;
    let mut end = range.end.min(bytes.len());
    while start < end && bytes.get(start).is_some_and(|byte| is_white(*byte)) {
        start += 1;
    }
    while end > start && bytes.get(end - 1).is_some_and(|byte| is_white(*byte)) {
        end -= 1;
    }
    start..end
}

/// The elements of a comma-separated header value (RFC 3261 §7.3.1), as trimmed,
/// non-empty ranges of `value`. A comma inside a quoted string (with `\` escapes) or
/// inside `<...>` does not separate elements.
#[derive(Debug, Clone)]
pub(super) struct ListElements<'a> {
    value: &'a [u8],
    position: usize,
}

impl<'a> ListElements<'a> {
    pub(super) fn new(value: &'a str) -> Self {
        Self {
            value: value.as_bytes(),
            position: 0,
        }
    }
}

impl Iterator for ListElements<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        while self.position < self.value.len() {
            let start = self.position;
            let end = next_comma(self.value, start).unwrap_or(self.value.len());
            // Step over the comma (or to the end).
            self.position = end + 1;
            let element = trimmed_range(self.value, start..end);
            if !element.is_empty() {
                return Some(element);
            }
        }
        None
    }
}

/// The index of the next `separator` at or after `from` that is not inside a quoted
/// string (with `\` escapes) nor, when `angles` is set, inside `<...>`.
pub fn next_separator(bytes: &[u8], from: usize, separator: u8, angles: bool) -> Option<usize> {
    let mut in_quotes = false;
    let mut in_angle = false;
    let mut escaped = false;
    for (index, &byte) in bytes.iter().enumerate().skip(from) {
        if escaped {
            escaped = false;
            continue;
        }
        match byte {
            b'\\' if in_quotes => escaped = true,
            b'"' if !in_angle => in_quotes = !in_quotes,
            b'<' if angles && !in_quotes => in_angle = true,
            b'>' if angles && !in_quotes => in_angle = false,
            _ if byte == separator && !in_quotes && !in_angle => return Some(index),
            _ => {}
        }
    }
    None
}

/// The index of the next separating comma at or after `from`.
fn next_comma(value: &[u8], from: usize) -> Option<usize> {
    next_separator(value, from, b',', true)
}

/// One `;name[=value]` parameter: names and values trimmed, `span` running from the
/// `;` to the end of the value (or name), both relative to the text that was scanned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Param<'a> {
    pub(super) name: &'a str,
    pub(super) value: Option<&'a str>,
    pub(super) span: Range<usize>,
}

/// The parameters in `text`, which holds `;`-separated parameters (anything before the
/// first `;` is skipped). A `;` inside a quoted value does not separate.
pub(super) fn params(text: &str) -> impl Iterator<Item = Param<'_>> {
    let bytes = text.as_bytes();
    let mut position = next_semicolon(bytes, 0);
    std::iter::from_fn(move || loop {
        let semicolon = position?;
        let end = next_semicolon(bytes, semicolon + 1);
        position = end;
        let segment = trimmed_range(bytes, semicolon + 1..end.unwrap_or(bytes.len()));
        let Some(raw) = text.get(segment.clone()) else {
            continue;
        };
        if raw.is_empty() {
            continue;
        }
        let (name, value) = match raw.split_once('=') {
            Some((name, value)) => (trim_white(name), Some(trim_white(value))),
            None => (raw, None),
        };
        return Some(Param {
            name,
            value,
            span: semicolon..segment.end,
        });
    })
}

/// The first parameter called `name` (case-insensitively) in `text`.
pub(super) fn find_param<'a>(text: &'a str, name: &str) -> Option<Param<'a>> {
    params(text).find(|param| param.name.eq_ignore_ascii_case(name))
}

fn next_semicolon(bytes: &[u8], from: usize) -> Option<usize> {
    next_separator(bytes, from, b';', false)
}

/// Splits a name-addr or addr-spec header value (From, To, Contact, Route, Record-Route;
/// RFC 3261 §20.10, §20.20) into the URI and the header parameters after it. In
/// `"Bob" <sip:bob@h;lr>;tag=9` the URI is `sip:bob@h;lr` and the parameters `;tag=9`.
/// Without angle brackets every `;` parameter belongs to the header (§20.10), so the URI
/// ends at the first `;`.
pub fn name_addr_parts(value: &str) -> (&str, &str) {
    let value = trim_white(value);
    if let Some(index) = next_separator(value.as_bytes(), 0, b'<', false) {
        let rest = value.get(index + 1..).unwrap_or_default();
        return match rest.find('>') {
            Some(close) => (
                trim_white(rest.get(..close).unwrap_or_default()),
                rest.get(close + 1..).unwrap_or_default(),
            ),
            None => (trim_white(rest), ""),
        };
    }
    match value.find(';') {
        Some(semicolon) => (
            trim_white(value.get(..semicolon).unwrap_or_default()),
            value.get(semicolon..).unwrap_or_default(),
        ),
        None => (value, ""),
    }
}
