//! Changes to a [`MessageView`] as splices, and serialisation that copies every untouched
//! range once.
//!
//! Every operation addresses the message as received, not the result of earlier
//! operations, so calls may come in any order and give the same output. A splice replaces
//! a range of the received bytes with new text; an insertion is a splice of an empty range.
//! Two splices whose ranges overlap, or an insertion strictly inside a replaced range, are
//! an error ([`ViewError::OverlappingEdits`]) at the call that adds the second. Insertions
//! at the same place keep the order of the calls, and come before a replacement that
//! starts there.
//!
//! The operations a proxy needs (RFC 3261 §16.6, §16.7, §18.2.1; RFC 3581 §4): a header on
//! top (Via, Record-Route) or at the end, removing the first value of a header (popping
//! our Via or the top Route: only that element and its comma when the line holds several),
//! replacing a value (CSeq, Max-Forwards, Authorization), the Request-URI, removing every
//! line of a name (Proxy-Authorization), a parameter of the top Via (`received`, `rport`),
//! and a Content-Length for a message that has none (§18.3, §20.14: a message received
//! over UDP without one may leave over TCP).

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use super::text::{find_param, is_token, is_token_byte};
use super::{HeaderName, Lookup, MessageView, Span, ViaView, ViewError};

/// Splices collected against one [`MessageView`].
#[derive(Debug, Clone)]
pub struct Edit<'v> {
    view: &'v MessageView,
    splices: Vec<Splice>,
    /// The new text of every splice, back to back.
    text: Vec<u8>,
    /// Whether [`Edit::ensure_content_length`] was asked for.
    ensure_content_length: bool,
    /// Whether an operation wrote a Content-Length line itself.
    content_length_written: bool,
}

#[derive(Debug, Clone)]
struct Splice {
    /// The replaced range of the received bytes; empty for an insertion.
    replaced: Range<usize>,
    /// The new text in [`Edit::text`].
    text: Range<usize>,
}

impl<'v> Edit<'v> {
    pub fn new(view: &'v MessageView) -> Self {
        Self {
            view,
            splices: Vec::new(),
            text: Vec::new(),
            ensure_content_length: false,
            content_length_written: false,
        }
    }

    /// Whether the output equals the message as received.
    pub fn is_empty(&self) -> bool {
        self.splices.is_empty() && self.content_length_line().is_none()
    }

    /// Puts a header line on top of the lines of its name (before the first one), or at
    /// the top of the headers when there is none: a new Via (§16.6 step 8) or
    /// Record-Route (§16.6 step 4).
    pub fn push_header<'n>(
        &mut self,
        name: impl Into<Lookup<'n>>,
        value: &str,
    ) -> Result<(), ViewError> {
        let name = name.into();
        let at = match self.view.first(name) {
            Some(entry) => entry.line.start as usize,
            None => self.view.headers_start as usize,
        };
        self.insert_line(at, name, value)
    }

    /// Puts a header line above every other header line.
    pub fn insert_header_at_top<'n>(
        &mut self,
        name: impl Into<Lookup<'n>>,
        value: &str,
    ) -> Result<(), ViewError> {
        let at = self.view.headers_start as usize;
        self.insert_line(at, name.into(), value)
    }

    /// Puts a header line after every other header line.
    pub fn append_header<'n>(
        &mut self,
        name: impl Into<Lookup<'n>>,
        value: &str,
    ) -> Result<(), ViewError> {
        let at = self.view.headers_end as usize;
        self.insert_line(at, name.into(), value)
    }

    /// Removes the first value of the first header line called `name` and returns it:
    /// popping our Via (§16.7 step 3) or the top Route (§16.4, §16.12). When that line
    /// holds several values of a list header ([`HeaderName::is_list`]), only the first
    /// value and its comma go; otherwise the whole line does, continuation lines included.
    pub fn remove_first_value<'n>(
        &mut self,
        name: impl Into<Lookup<'n>>,
    ) -> Result<&'v str, ViewError> {
        let view = self.view;
        let name = name.into();
        let entry = view.required(name)?;
        let mut elements = view.elements(entry);
        let first = elements.next();
        let second = elements.next();
        match (first, second) {
            (Some((first, value)), Some((second, _))) => {
                self.splice(first.start as usize..second.start as usize, b"")?;
                Ok(value)
            }
            (first, _) => {
                self.splice(entry.line.range(), b"")?;
                Ok(first.map_or("", |(_, value)| value))
            }
        }
    }

    /// Removes every header line called `name` (Proxy-Authorization the proxy consumed,
    /// §22.3) and returns how many there were.
    pub fn remove_all<'n>(&mut self, name: impl Into<Lookup<'n>>) -> Result<usize, ViewError> {
        let view = self.view;
        let name = name.into();
        let mut removed = 0;
        for entry in view.entries(name) {
            self.splice(entry.line.range(), b"")?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Replaces the whole value of the first header line called `name` (CSeq,
    /// Max-Forwards, Authorization), or appends a line when there is none. Later lines of
    /// the same name stay.
    pub fn set_header<'n>(
        &mut self,
        name: impl Into<Lookup<'n>>,
        value: &str,
    ) -> Result<(), ViewError> {
        let name = name.into();
        match self.view.first(name) {
            Some(entry) => {
                check_value(value)?;
                self.splice(entry.value.range(), value.as_bytes())
            }
            None => self.append_header(name, value),
        }
    }

    /// Replaces the Request-URI (§16.5, §16.6 step 2).
    pub fn set_request_uri(&mut self, uri: &str) -> Result<(), ViewError> {
        let super::StartLine::Request { uri: span, .. } = self.view.start else {
            return Err(ViewError::NotARequest);
        };
        let blank = uri.is_empty()
            || uri
                .bytes()
                .any(|byte| matches!(byte, b' ' | b'\t' | b'\r' | b'\n'));
        if blank {
            return Err(ViewError::BadRequestUri);
        }
        self.splice(span.range(), uri.as_bytes())
    }

    /// Sets parameter `name` of the top Via value to `value` (`None` for a flag):
    /// `received` (§18.2.1) or `rport=<port>` (RFC 3581 §4). An existing parameter of that
    /// name is replaced where it stands, otherwise the parameter is added at the end of
    /// the top value.
    pub fn set_top_via_param(&mut self, name: &str, value: Option<&str>) -> Result<(), ViewError> {
        check_param(name, value)?;
        let (params, params_start, element_end) = self.top_via_params()?;
        let mut text = Vec::with_capacity(name.len() + 2 + value.map_or(0, str::len));
        text.push(b';');
        text.extend_from_slice(name.as_bytes());
        if let Some(value) = value {
            text.push(b'=');
            text.extend_from_slice(value.as_bytes());
        }
        match find_param(params, name) {
            Some(param) => self.splice(
                params_start + param.span.start..params_start + param.span.end,
                &text,
            ),
            None => self.splice(element_end..element_end, &text),
        }
    }

    /// Removes parameter `name` from the top Via value; whether it was there.
    pub fn remove_top_via_param(&mut self, name: &str) -> Result<bool, ViewError> {
        let (params, params_start, _) = self.top_via_params()?;
        match find_param(params, name) {
            Some(param) => {
                let span = params_start + param.span.start..params_start + param.span.end;
                self.splice(span, b"")?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Asks for a Content-Length line when the output would otherwise have none (RFC 3261
    /// §18.3, §20.14: mandatory on streams, so a message received over UDP without one
    /// may leave over TCP). The line, `Content-Length: <body length>`, goes after every
    /// other header line; it is decided when serialising, so this may be called before or
    /// after removing or writing Content-Length lines. A Content-Length the message has
    /// already equals the body length, because [`MessageView::parse`] refuses or cuts a
    /// body that disagrees, so it is left as written.
    pub fn ensure_content_length(&mut self) {
        self.ensure_content_length = true;
    }

    /// The edited message. Without changes this is the received buffer itself.
    pub fn serialize(&self) -> Bytes {
        if self.is_empty() {
            return self.view.bytes().clone();
        }
        let mut out = BytesMut::new();
        self.serialize_into(&mut out);
        out.freeze()
    }

    /// Appends the edited message to `out`.
    pub fn serialize_into(&self, out: &mut BytesMut) {
        let source = self.view.bytes();
        let content_length_line = self.content_length_line();
        let mut pieces: Vec<(Range<usize>, &[u8])> = self
            .splices
            .iter()
            .map(|splice| {
                let text = self.text.get(splice.text.clone()).unwrap_or_default();
                (splice.replaced.clone(), text)
            })
            .collect();
        if let Some(line) = &content_length_line {
            let end = self.view.headers_end as usize;
            pieces.push((end..end, line.as_slice()));
        }
        // Stable: insertions at one place keep the order of the calls, and sort before a
        // replacement starting there (an empty range ends first).
        pieces.sort_by_key(|(replaced, _)| (replaced.start, replaced.end));
        let added: usize = pieces.iter().map(|(_, text)| text.len()).sum();
        let removed: usize = pieces.iter().map(|(replaced, _)| replaced.len()).sum();
        out.reserve((source.len() + added).saturating_sub(removed));
        let mut copied = 0;
        for (replaced, text) in pieces {
            // Splices never overlap (checked when added), so `copied <= replaced.start`;
            // the Content-Length line is an insertion where no splice replaces anything.
            out.put_slice(source.get(copied..replaced.start).unwrap_or_default());
            out.put_slice(text);
            copied = copied.max(replaced.end);
        }
        out.put_slice(source.get(copied..).unwrap_or_default());
    }

    /// The Content-Length line to add, when one was asked for and the output has none:
    /// every received Content-Length line removed (or none received) and none written.
    fn content_length_line(&self) -> Option<Vec<u8>> {
        if !self.ensure_content_length || self.content_length_written {
            return None;
        }
        let view = self.view;
        let survives = view
            .entries(HeaderName::ContentLength.into())
            .any(|entry| !self.removes(entry.line.range()));
        if survives {
            return None;
        }
        Some(format!("Content-Length: {}\r\n", view.body().len()).into_bytes())
    }

    /// Whether a splice removes all of `range`.
    fn removes(&self, range: Range<usize>) -> bool {
        self.splices
            .iter()
            .any(|splice| splice.replaced.start <= range.start && range.end <= splice.replaced.end)
    }

    fn insert_line(&mut self, at: usize, name: Lookup<'_>, value: &str) -> Result<(), ViewError> {
        let spelling = name.spelling();
        if !is_token(spelling.as_bytes()) {
            return Err(ViewError::BadNewHeaderName);
        }
        check_value(value)?;
        let mut line = Vec::with_capacity(spelling.len() + value.len() + 4);
        line.extend_from_slice(spelling.as_bytes());
        line.extend_from_slice(b": ");
        line.extend_from_slice(value.as_bytes());
        line.extend_from_slice(b"\r\n");
        self.splice(at..at, &line)?;
        if name == Lookup::Known(HeaderName::ContentLength) {
            self.content_length_written = true;
        }
        Ok(())
    }

    /// The top Via's parameter text, where it starts and where the top value ends, all
    /// as offsets in the message.
    fn top_via_params(&self) -> Result<(&'v str, usize, usize), ViewError> {
        let view = self.view;
        let (entry, element) = view.top_via_element()?;
        let via = ViaView::parse(element).map_err(|problem| ViewError::BadVia {
            line: view.line_number(entry),
            problem,
        })?;
        let (params, offset) = via.params_text();
        let element_span = view
            .elements(entry)
            .next()
            .map_or(Span::default(), |(span, _)| span);
        Ok((
            params,
            element_span.start as usize + offset,
            element_span.end as usize,
        ))
    }

    /// Records one splice after checking it against every earlier one.
    fn splice(&mut self, replaced: Range<usize>, text: &[u8]) -> Result<(), ViewError> {
        for earlier in &self.splices {
            if let Some(offset) = overlap(&earlier.replaced, &replaced) {
                return Err(ViewError::OverlappingEdits { offset });
            }
        }
        let start = self.text.len();
        self.text.extend_from_slice(text);
        self.splices.push(Splice {
            replaced,
            text: start..self.text.len(),
        });
        Ok(())
    }
}

/// Where two splices conflict, if they do: two non-empty ranges that share a byte, or an
/// insertion strictly inside a replaced range. Touching ranges do not conflict.
fn overlap(first: &Range<usize>, second: &Range<usize>) -> Option<usize> {
    let inside = |point: usize, range: &Range<usize>| range.start < point && point < range.end;
    let conflict = match (first.is_empty(), second.is_empty()) {
        (true, true) => false,
        (true, false) => inside(first.start, second),
        (false, true) => inside(second.start, first),
        (false, false) => first.start < second.end && second.start < first.end,
    };
    conflict.then(|| first.start.max(second.start))
}

/// A header value may not hold a line break: it would end the line and let the rest
/// become a header of its own.
fn check_value(value: &str) -> Result<(), ViewError> {
    if value.bytes().any(|byte| matches!(byte, b'\r' | b'\n')) {
        return Err(ViewError::LineBreakInValue);
    }
    Ok(())
}

/// A parameter name is a token; a value is a token, an IPv4 or an IPv6 address
/// (`received` holds one unbracketed, §18.2.1).
fn check_param(name: &str, value: Option<&str>) -> Result<(), ViewError> {
    let value_ok = value.is_none_or(|value| {
        !value.is_empty()
            && value
                .bytes()
                .all(|byte| is_token_byte(byte) || matches!(byte, b':' | b'[' | b']'))
    });
    if is_token(name.as_bytes()) && value_ok {
        Ok(())
    } else {
        Err(ViewError::BadParameter)
    }
}
