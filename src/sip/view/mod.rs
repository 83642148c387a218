//! A zero-copy view of one SIP message over [`Bytes`], and an [`Edit`] that changes it by
//! splicing (STYLE rule 12: parse once, edit by splicing, forward the rest byte for byte).
//!
//! [`MessageView::parse`] makes one pass over the bytes and records ranges: the start line
//! (RFC 3261 §7.1 request line, §7.2 status line), then per header line its name, its
//! trimmed value and the whole line with its line end. Nothing is copied or allocated per
//! header. The rules it follows:
//!
//! - Empty lines before the start line are skipped (§7.5); the view starts at the start
//!   line. Lines end in CRLF or, leniently, a bare LF.
//! - A line starting with SP or HTAB continues the previous header's value (§7.3.1). The
//!   folded value is returned as received, line break included; every reader here treats
//!   CR, LF, SP and HTAB alike as white space.
//! - A header line without a colon, or with a name that is not a `token` (§25.1), is an
//!   error naming its line number, not skipped: a proxy that cannot tell where a header
//!   ends must not forward it.
//! - The start line and the header lines must be UTF-8 (§7.3.1 `TEXT-UTF8`); the body is
//!   opaque bytes.
//! - Header names compare case-insensitively, and compact forms (§7.3.3 and the
//!   extensions that register one) fold to their full names: `v` is `Via`.
//! - Body (§18.3, §20.14): for a datagram, a body longer than Content-Length is cut to it
//!   and no Content-Length means the rest of the datagram. On a stream the framer has cut
//!   the message at Content-Length already, so a stream message must have one and extra
//!   bytes are an error. On both, fewer bytes than declared are an error.
//! - Methods are case-sensitive tokens (§7.1); any token is a valid method, known or not
//!   (§16: a proxy forwards methods it does not know).
//!
//! Addresses (Via sent-by in [`ViaView`], URI hosts in [`UriView`], and the lenient
//! reading of unbracketed IPv6 in [`split_host_port`]) are in `address.rs`; the editor and
//! its splice rules are in [`Edit`].

use std::ops::Range;

use bytes::Bytes;

mod address;
mod edit;
mod names;
mod parse;
#[cfg(test)]
mod tests;
mod text;

pub use address::{split_host_port, AddressProblem, HostPort, UriView, ViaProblem, ViaView};
pub use edit::Edit;
pub use names::{HeaderName, Lookup, Method, MethodOf, COMPACT_FORMS};
pub use text::{name_addr_parts, next_separator};

use text::{find_param, is_token, ListElements};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("message of {length} bytes is too large for 32-bit offsets")]
    TooLarge { length: usize },
    #[error("no start line")]
    NoStartLine,
    #[error("start line is neither a request line nor a status line")]
    BadStartLine,
    #[error("method is not a token")]
    BadMethod,
    #[error("SIP version is not SIP/2.0")]
    UnsupportedVersion,
    #[error("status code is not three digits from 100 to 699")]
    BadStatusCode,
    #[error("line {line} is not UTF-8")]
    NotUtf8 { line: usize },
    #[error("header line {line} has no colon")]
    HeaderWithoutColon { line: usize },
    #[error("header line {line} has a name that is not a token")]
    BadHeaderName { line: usize },
    #[error("line {line} continues a header, but no header precedes it")]
    FoldWithoutHeader { line: usize },
    #[error("the headers are not ended by an empty line")]
    UnterminatedHeaders,
    #[error("missing {header} header")]
    MissingHeader { header: String },
    #[error("Content-Length on line {line} is not a number")]
    BadContentLength { line: usize },
    #[error("Content-Length headers disagree (line {line})")]
    ConflictingContentLength { line: usize },
    #[error("Content-Length {declared} exceeds the {available} body bytes received")]
    BodyTooShort { declared: usize, available: usize },
    #[error("{available} body bytes on a stream where Content-Length is {declared}")]
    BodyTooLong { declared: usize, available: usize },
    #[error("CSeq on line {line} is not `<number> <method>`")]
    BadCSeq { line: usize },
    #[error("Max-Forwards on line {line} is not a number")]
    BadMaxForwards { line: usize },
    #[error("Via on line {line}: {problem}")]
    BadVia { line: usize, problem: ViaProblem },
    #[error("address: {problem}")]
    BadAddress { problem: AddressProblem },
    #[error("not a sip: or sips: URI")]
    NotSipUri,
    #[error("a request edit on a response")]
    NotARequest,
    #[error("Request-URI is empty or holds white space")]
    BadRequestUri,
    #[error("a new header's name is not a token")]
    BadNewHeaderName,
    #[error("header value holds a line break")]
    LineBreakInValue,
    #[error("parameter name is not a token or its value holds a delimiter")]
    BadParameter,
    #[error("edits overlap at byte {offset}")]
    OverlappingEdits { offset: usize },
}

/// A byte range of the message. Offsets are u32: [`MessageView::parse`] refuses longer
/// messages, so every cast from `usize` here is lossless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn new(range: Range<usize>) -> Self {
        Self {
            start: range.start as u32,
            end: range.end as u32,
        }
    }

    fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
}

#[derive(Debug, Clone, Copy)]
enum StartLine {
    Request { method: Span, uri: Span },
    Response { code: u16, reason: Span },
}

/// One header line (with its folded continuation lines).
#[derive(Debug, Clone, Copy)]
struct Entry {
    name: HeaderName,
    /// The full name when the line used a compact form outside [`HeaderName`].
    expanded: Option<&'static str>,
    name_span: Span,
    value: Span,
    /// The whole line, continuation lines and line end included.
    line: Span,
}

/// One header line as the view sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderField<'a> {
    pub name: HeaderName,
    /// The name as written (`v`, `VIA`, `X-Custom`).
    pub spelling: &'a str,
    pub value: &'a str,
    /// The line in [`MessageView::bytes`], line end included.
    pub line: Range<usize>,
}

/// A parsed SIP message: the received bytes and the ranges of its parts.
#[derive(Debug, Clone)]
pub struct MessageView {
    /// From the start line to the end of the body.
    bytes: Bytes,
    start: StartLine,
    headers: Vec<Entry>,
    /// The first header line (the end of the start line).
    headers_start: u32,
    /// The empty line that ends the headers.
    headers_end: u32,
    body_start: u32,
    content_length: Option<usize>,
}

impl MessageView {
    /// The message: start line to end of body, without any datagram surplus.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The header lines, from the first header line to the end of the last (the empty line
    /// that follows is not included).
    pub fn header_range(&self) -> Range<usize> {
        self.headers_start as usize..self.headers_end as usize
    }

    /// The body, sharing the received buffer.
    pub fn body(&self) -> Bytes {
        self.bytes.slice(self.body_start as usize..)
    }

    /// The Content-Length the message declared, if any. When present it equals the body
    /// length: [`parse`](Self::parse) refuses or cuts a body that disagrees.
    pub fn content_length(&self) -> Option<usize> {
        self.content_length
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    /// The request method; `None` for a response.
    pub fn method(&self) -> Option<Method<'_>> {
        match self.start {
            StartLine::Request { method, .. } => Some(Method::from_token(self.text(method))),
            StartLine::Response { .. } => None,
        }
    }

    /// The Request-URI as written; `None` for a response.
    pub fn request_uri(&self) -> Option<&str> {
        match self.start {
            StartLine::Request { uri, .. } => Some(self.text(uri)),
            StartLine::Response { .. } => None,
        }
    }

    /// The status code; `None` for a request.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    /// The reason phrase as received, possibly empty; `None` for a request.
    pub fn reason(&self) -> Option<&str> {
        match self.start {
            StartLine::Response { reason, .. } => Some(self.text(reason)),
            StartLine::Request { .. } => None,
        }
    }

    /// Every header line in order.
    pub fn headers(&self) -> impl Iterator<Item = HeaderField<'_>> {
        self.headers.iter().map(|entry| HeaderField {
            name: entry.name,
            spelling: self.text(entry.name_span),
            value: self.text(entry.value),
            line: entry.line.range(),
        })
    }

    /// The whole value of the first header line called `name`.
    pub fn header<'n>(&self, name: impl Into<Lookup<'n>>) -> Option<&str> {
        self.first(name.into()).map(|entry| self.text(entry.value))
    }

    /// Every value of every header line called `name`, in order. List headers
    /// ([`HeaderName::is_list`]) are split at the commas between elements (§7.3.1), never
    /// inside a quoted string or `<...>`; others give one value per line.
    pub fn header_values<'s>(
        &'s self,
        name: impl Into<Lookup<'s>>,
    ) -> impl Iterator<Item = &'s str> + 's {
        let name = name.into();
        self.entries(name)
            .flat_map(move |entry| self.elements(entry).map(|(_, value)| value))
    }

    /// Call-ID (§8.1.1.4).
    pub fn call_id(&self) -> Result<&str, ViewError> {
        self.header(HeaderName::CallId)
            .filter(|value| !value.is_empty())
            .ok_or_else(|| missing(HeaderName::CallId.into()))
    }

    /// CSeq number and method (§8.1.1.5, §20.16).
    pub fn cseq(&self) -> Result<(u32, Method<'_>), ViewError> {
        let entry = self.required(HeaderName::CSeq.into())?;
        let bad = || ViewError::BadCSeq {
            line: self.line_number(entry),
        };
        let value = self.text(entry.value);
        let (number, method) = value.split_once([' ', '\t', '\r', '\n']).ok_or_else(bad)?;
        let method = text::trim_white(method);
        if number.is_empty() || !number.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(bad());
        }
        if !is_token(method.as_bytes()) {
            return Err(bad());
        }
        let number = number.parse::<u32>().map_err(|_| bad())?;
        Ok((number, Method::from_token(method)))
    }

    /// The From tag; `Ok(None)` when From has none.
    pub fn from_tag(&self) -> Result<Option<&str>, ViewError> {
        self.tag(HeaderName::From)
    }

    /// The To tag (§12.2: a request with one is inside a dialog). A To carrying the tag
    /// parameter twice, as some equipment sends, gives the first.
    pub fn to_tag(&self) -> Result<Option<&str>, ViewError> {
        self.tag(HeaderName::To)
    }

    fn tag(&self, name: HeaderName) -> Result<Option<&str>, ViewError> {
        let entry = self.required(name.into())?;
        let (_, params) = name_addr_parts(self.text(entry.value));
        Ok(find_param(params, "tag").and_then(|param| param.value))
    }

    /// Max-Forwards (§8.1.1.6, §16.3), `None` when absent.
    pub fn max_forwards(&self) -> Result<Option<u32>, ViewError> {
        let Some(entry) = self.first(HeaderName::MaxForwards.into()) else {
            return Ok(None);
        };
        let value = self.text(entry.value);
        if value.is_empty() || !value.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(ViewError::BadMaxForwards {
                line: self.line_number(entry),
            });
        }
        value
            .parse()
            .map(Some)
            .map_err(|_| ViewError::BadMaxForwards {
                line: self.line_number(entry),
            })
    }

    /// The first Via value: the top of the Via stack (§16.7, §18.2.1).
    pub fn top_via(&self) -> Result<ViaView<'_>, ViewError> {
        let (entry, value) = self.top_via_element()?;
        ViaView::parse(value).map_err(|problem| ViewError::BadVia {
            line: self.line_number(entry),
            problem,
        })
    }

    /// Every header line's kind, its full name when a compact form of a header outside
    /// [`HeaderName`] was used, and the byte ranges of its name and value in
    /// [`bytes`](Self::bytes): for owners that keep slices of the buffer
    /// ([`crate::sip::wire`]).
    pub(crate) fn header_ranges(
        &self,
    ) -> impl Iterator<Item = (HeaderName, Option<&'static str>, Range<usize>, Range<usize>)> + '_
    {
        self.headers.iter().map(|entry| {
            (
                entry.name,
                entry.expanded,
                entry.name_span.range(),
                entry.value.range(),
            )
        })
    }

    /// The byte range of the Request-URI or the reason phrase.
    pub(crate) fn start_range(&self) -> Range<usize> {
        match self.start {
            StartLine::Request { uri, .. } => uri.range(),
            StartLine::Response { reason, .. } => reason.range(),
        }
    }

    /// An editor for this message.
    pub fn edit(&self) -> Edit<'_> {
        Edit::new(self)
    }

    // Crate-internal plumbing shared with the editor.

    /// The text of `span`. Spans start and end at ASCII delimiters inside lines that
    /// `parse` checked to be UTF-8, so the conversion cannot fail; the empty fallback only
    /// keeps this free of panics.
    fn text(&self, span: Span) -> &str {
        self.bytes
            .get(span.range())
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
            .unwrap_or_default()
    }

    fn entries<'s>(&'s self, name: Lookup<'s>) -> impl Iterator<Item = &'s Entry> + 's {
        self.headers
            .iter()
            .filter(move |entry| self.entry_is(entry, name))
    }

    /// Whether `entry` is a header called `name`: the one comparison of header names.
    fn entry_is(&self, entry: &Entry, name: Lookup<'_>) -> bool {
        match name {
            Lookup::Known(known) => known != HeaderName::Other && entry.name == known,
            Lookup::Named(full) => {
                entry.name == HeaderName::Other
                    && entry
                        .expanded
                        .unwrap_or_else(|| self.text(entry.name_span))
                        .eq_ignore_ascii_case(full)
            }
        }
    }

    fn first(&self, name: Lookup<'_>) -> Option<&Entry> {
        self.headers.iter().find(|entry| self.entry_is(entry, name))
    }

    fn required(&self, name: Lookup<'_>) -> Result<&Entry, ViewError> {
        self.first(name).ok_or_else(|| missing(name))
    }

    /// The values of one header line with their absolute spans: list elements for list
    /// headers, the whole value otherwise.
    fn elements<'s>(&'s self, entry: &Entry) -> impl Iterator<Item = (Span, &'s str)> + 's {
        let value = self.text(entry.value);
        let base = entry.value.start as usize;
        let split = entry.name.is_list();
        let whole = (!split && !value.is_empty()).then_some(0..value.len());
        let lists = split.then(|| ListElements::new(value));
        whole
            .into_iter()
            .chain(lists.into_iter().flatten())
            .map(move |range| {
                let text = value.get(range.clone()).unwrap_or_default();
                (Span::new(base + range.start..base + range.end), text)
            })
    }

    fn top_via_element(&self) -> Result<(&Entry, &str), ViewError> {
        let entry = self.required(HeaderName::Via.into())?;
        let (_, value) = self
            .elements(entry)
            .next()
            .ok_or_else(|| missing(HeaderName::Via.into()))?;
        Ok((entry, value))
    }

    /// The 1-based line number of a header line (the start line is line 1).
    fn line_number(&self, entry: &Entry) -> usize {
        let before = self
            .bytes
            .get(..entry.line.start as usize)
            .unwrap_or_default();
        1 + before.iter().filter(|byte| **byte == b'\n').count()
    }
}

fn missing(name: Lookup<'_>) -> ViewError {
    ViewError::MissingHeader {
        header: name.spelling().to_string(),
    }
}
