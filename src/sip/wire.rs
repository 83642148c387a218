//! The message the proxy forwards: parsed once by [`MessageView`], kept as slices of the
//! received buffer, edited header by header, written out again by copying those slices.
//!
//! A [`Request`] or [`Response`] holds its start line, one [`Header`] per header line and
//! its body, each a [`Bytes`] slice of the buffer the message arrived in. Nothing is
//! copied or re-parsed per header on the way in. An edit replaces, inserts or removes
//! whole lines; a header the proxy never touches goes out as it came in (its spelling,
//! compact form, spacing and folding included), in its place among the others. Unknown
//! methods and headers pass like known ones (RFC 3261 §16: a proxy forwards what it does
//! not understand), and the lenient reading of the view (unbracketed IPv6 in sent-by and
//! URIs, bare LF line ends) carries over. Only Content-Length is written anew when it
//! does not match the body, so a datagram without one can go on over TCP (§18.3, §20.14).
//!
//! The free functions read and edit the headers the proxy needs: Via (§8.1.1.7, §16.6),
//! Call-ID, CSeq, From/To tags, Max-Forwards (§16.3, §16.6), Route and Record-Route
//! (§16.4, §16.6), and build the responses this element makes (§8.2.6). `rsip` stays
//! where typed values serve: a Route or Request-URI handed to the router, and the
//! messages the registration builds.

use std::fmt;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use super::header::{header_params, param, split_list};
use super::message::MessageError;
use super::via::Via;
use super::view::{self, HeaderName, Lookup, MessageView, MethodOf, UriView, ViewError};

pub use super::message::tag_of;

/// The longest extension method this element carries (`Method::Extension` is `Copy`).
pub const MAX_METHOD_LENGTH: usize = 30;

/// A request method (§7.1): the ones this element knows, or any other token, whose name
/// is kept inline so that a method is `Copy`.
pub type Method = MethodOf<Token>;

/// An extension method's name, kept inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    length: u8,
    bytes: [u8; MAX_METHOD_LENGTH],
}

impl Token {
    fn new(text: &str) -> Option<Self> {
        let mut bytes = [0; MAX_METHOD_LENGTH];
        bytes
            .get_mut(..text.len())?
            .copy_from_slice(text.as_bytes());
        Some(Self {
            length: u8::try_from(text.len()).ok()?,
            bytes,
        })
    }
}

impl AsRef<str> for Token {
    fn as_ref(&self) -> &str {
        self.bytes
            .get(..usize::from(self.length))
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
            .unwrap_or_default()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_ref())
    }
}

impl MethodOf<Token> {
    /// The method a view read, or `None` for an extension longer than
    /// [`MAX_METHOD_LENGTH`].
    pub fn from_view(method: view::Method<'_>) -> Option<Self> {
        method.map_extension(Token::new)
    }

    /// The method named by `token`, if it is one (an RFC 3261 token, short enough).
    pub fn parse(token: &str) -> Option<Self> {
        view::Method::parse(token).and_then(Self::from_view)
    }
}

/// UTF-8 text in a shared buffer (checked when made).
#[derive(Clone, PartialEq, Eq)]
pub struct Text(Bytes);

impl Text {
    pub fn new(text: &str) -> Self {
        Self(Bytes::copy_from_slice(text.as_bytes()))
    }

    /// A slice of a buffer the view checked to be UTF-8 at this range.
    fn slice(bytes: &Bytes, range: Range<usize>) -> Self {
        Self(bytes.slice(range))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Request-URI as written.
#[derive(Clone, PartialEq, Eq)]
pub struct Uri(Text);

impl Uri {
    pub fn new(text: &str) -> Self {
        Self(Text::new(text))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The host (an IPv6 address without brackets), when this is a SIP or SIPS URI.
    pub fn host(&self) -> Option<&str> {
        UriView::parse(self.as_str())
            .ok()
            .map(|uri| uri.host_port.host_unbracketed())
    }

    /// URI parameter `name`: `Some(None)` for a flag.
    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        UriView::parse(self.as_str()).ok()?.param(name)
    }

    /// The URI read by the view, for the router: borrowed, nothing copied.
    pub fn view(&self) -> Result<UriView<'_>, ViewError> {
        UriView::parse(self.as_str())
    }

    /// The URI parsed by `rsip`.
    pub fn typed(&self) -> Result<rsip::Uri, MessageError> {
        rsip::Uri::try_from(self.as_str()).map_err(|error| MessageError::Invalid {
            header: "Request-URI",
            reason: error.to_string(),
        })
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// One header line: its kind, and the line from the name to the end of the value (no
/// line end), as received or as written here.
#[derive(Clone)]
pub struct Header {
    name: HeaderName,
    /// For a name outside [`HeaderName`]: the full name when the line used a compact form.
    expanded: Option<&'static str>,
    line: Bytes,
    name_end: u32,
    value_start: u32,
}

impl Header {
    /// A new line `name: value`.
    pub fn new(name: &str, value: &str) -> Self {
        let mut line = BytesMut::with_capacity(name.len() + 2 + value.len());
        line.put_slice(name.as_bytes());
        line.put_slice(b": ");
        line.put_slice(value.as_bytes());
        let (kind, expanded) = classify(name);
        Self {
            name: kind,
            expanded,
            line: line.freeze(),
            name_end: name.len() as u32,
            value_start: (name.len() + 2) as u32,
        }
    }

    pub fn kind(&self) -> HeaderName {
        self.name
    }

    /// The name as written.
    pub fn spelling(&self) -> &str {
        self.text(0..self.name_end as usize)
    }

    pub fn value(&self) -> &str {
        self.text(self.value_start as usize..self.line.len())
    }

    /// Whether this line is a header called `name` (any case, compact forms folded).
    pub fn is<'n>(&self, name: impl Into<Lookup<'n>>) -> bool {
        match name.into() {
            Lookup::Known(known) => known != HeaderName::Other && self.name == known,
            Lookup::Named(full) => {
                self.name == HeaderName::Other
                    && self
                        .expanded
                        .unwrap_or_else(|| self.spelling())
                        .eq_ignore_ascii_case(full)
            }
        }
    }

    fn text(&self, range: Range<usize>) -> &str {
        self.line
            .get(range)
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
            .unwrap_or_default()
    }
}

/// Names only: values may carry credentials.
impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.spelling())
    }
}

fn classify(name: &str) -> (HeaderName, Option<&'static str>) {
    match Lookup::from(name) {
        Lookup::Known(known) => (known, None),
        Lookup::Named(full) => (
            HeaderName::Other,
            super::header::full_name(name).filter(|expanded| expanded.eq_ignore_ascii_case(full)),
        ),
    }
}

/// The header lines of a message, in order.
#[derive(Clone, Default, Debug)]
pub struct Headers(Vec<Header>);

impl Headers {
    pub fn iter(&self) -> impl Iterator<Item = &Header> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends `name: value` after the last line.
    pub fn push(&mut self, name: &str, value: &str) {
        self.0.push(Header::new(name, value));
    }

    pub fn push_header(&mut self, header: Header) {
        self.0.push(header);
    }

    pub fn retain(&mut self, keep: impl FnMut(&Header) -> bool) {
        self.0.retain(keep);
    }

    /// Offers the value of every line called `name` to `change`; a line whose new value
    /// it returns is rewritten (keeping the name as written).
    pub fn rewrite<'n>(
        &mut self,
        name: impl Into<Lookup<'n>>,
        mut change: impl FnMut(&str) -> Option<String>,
    ) {
        let name = name.into();
        for slot in self.0.iter_mut().filter(|header| header.is(name)) {
            if let Some(value) = change(slot.value()) {
                let spelling = slot.spelling().to_string();
                *slot = Header::new(&spelling, &value);
            }
        }
    }

    /// The first line called `name`.
    pub fn first<'n>(&self, name: impl Into<Lookup<'n>>) -> Option<&Header> {
        let name = name.into();
        self.0.iter().find(|header| header.is(name))
    }

    fn position<'n>(&self, name: impl Into<Lookup<'n>>) -> Option<usize> {
        let name = name.into();
        self.0.iter().position(|header| header.is(name))
    }

    /// Puts `name: value` before the first line called `name`, or appends it.
    fn insert_on_top(&mut self, name: HeaderName, value: &str) {
        let spelling = name.canonical().unwrap_or_default();
        let header = Header::new(spelling, value);
        match self.position(name) {
            Some(index) => self.0.insert(index, header),
            None => self.0.push(header),
        }
    }

    /// Replaces every line called `name` by one line with `value` where the first was
    /// (appended when there was none); no line when `value` is `None`.
    fn replace_all(&mut self, name: HeaderName, value: Option<&str>) {
        let first = self.position(name);
        self.0.retain(|header| !header.is(name));
        if let Some(value) = value {
            let header = Header::new(name.canonical().unwrap_or_default(), value);
            let index = first.unwrap_or(self.0.len()).min(self.0.len());
            self.0.insert(index, header);
        }
    }

    /// Replaces the value of the first line called `name` in place, or appends one.
    fn set(&mut self, name: HeaderName, value: &str) {
        let header = Header::new(name.canonical().unwrap_or_default(), value);
        match self.position(name) {
            Some(index) => {
                if let Some(slot) = self.0.get_mut(index) {
                    *slot = header;
                }
            }
            None => self.0.push(header),
        }
    }
}

#[derive(Clone)]
pub struct Request {
    pub method: Method,
    pub uri: Uri,
    pub headers: Headers,
    pub body: Bytes,
}

#[derive(Clone)]
pub struct Response {
    pub code: u16,
    pub reason: Text,
    pub headers: Headers,
    pub body: Bytes,
}

/// Two messages are equal when they go out as the same bytes.
impl PartialEq for Request {
    fn eq(&self, other: &Self) -> bool {
        self.encode() == other.encode()
    }
}

impl Eq for Request {}

impl PartialEq for Response {
    fn eq(&self, other: &Self) -> bool {
        self.encode() == other.encode()
    }
}

impl Eq for Response {}

/// The method, the Request-URI and the header names: values may carry credentials.
impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("headers", &self.headers)
            .field("body", &self.body.len())
            .finish()
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("code", &self.code)
            .field("reason", &self.reason.as_str())
            .field("headers", &self.headers)
            .field("body", &self.body.len())
            .finish()
    }
}

#[derive(Debug, Clone)]
pub enum Message {
    Request(Request),
    Response(Response),
}

impl From<Request> for Message {
    fn from(request: Request) -> Self {
        Self::Request(request)
    }
}

impl From<Response> for Message {
    fn from(response: Response) -> Self {
        Self::Response(response)
    }
}

impl Message {
    pub fn encode(&self) -> Bytes {
        match self {
            Self::Request(request) => request.encode(),
            Self::Response(response) => response.encode(),
        }
    }
}

/// The URI of a Route or Record-Route value (`<sip:p1.example;lr>`), read by the view.
pub fn route_uri(value: &str) -> Result<UriView<'_>, ViewError> {
    UriView::parse(super::header::name_addr_uri(value))
}

/// Parses one whole message (see [`MessageView::parse`] for the rules; `datagram` picks
/// the §18.3 body rule of an unreliable transport).
pub fn parse(bytes: Bytes, datagram: bool) -> Result<Message, MessageError> {
    let view = MessageView::parse(bytes, datagram).map_err(|error| MessageError::Parse {
        reason: error.to_string(),
    })?;
    from_view(&view)
}

/// The message a view holds, sharing its buffer.
pub fn from_view(view: &MessageView) -> Result<Message, MessageError> {
    let bytes = view.bytes();
    let mut headers = Vec::with_capacity(view.header_ranges().size_hint().0 + 4);
    for (name, expanded, name_range, value_range) in view.header_ranges() {
        let start = name_range.start;
        let end = value_range.end.max(name_range.end);
        headers.push(Header {
            name,
            expanded,
            line: bytes.slice(start..end),
            name_end: (name_range.end - start) as u32,
            value_start: (value_range.start.max(name_range.end) - start) as u32,
        });
    }
    let headers = Headers(headers);
    let body = view.body();
    let start = Text::slice(bytes, view.start_range());
    Ok(match (view.method(), view.status()) {
        (Some(method), _) => Message::Request(Request {
            method: Method::from_view(method).ok_or_else(|| MessageError::Parse {
                reason: format!("method longer than {MAX_METHOD_LENGTH} characters"),
            })?,
            uri: Uri(start),
            headers,
            body,
        }),
        (None, Some(code)) => Message::Response(Response {
            code,
            reason: start,
            headers,
            body,
        }),
        (None, None) => {
            return Err(MessageError::Parse {
                reason: "no start line".to_string(),
            })
        }
    })
}

impl Request {
    /// The request line, the header lines and the body.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_length());
        out.put_slice(self.method.as_str().as_bytes());
        out.put_u8(b' ');
        out.put_slice(self.uri.as_str().as_bytes());
        out.put_slice(b" SIP/2.0\r\n");
        write_rest(&mut out, &self.headers, &self.body);
        out.freeze()
    }

    fn encoded_length(&self) -> usize {
        32 + self.uri.as_str().len() + headers_length(&self.headers) + self.body.len()
    }
}

impl Response {
    /// The status line, the header lines and the body.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(
            32 + self.reason.as_str().len() + headers_length(&self.headers) + self.body.len(),
        );
        out.put_slice(b"SIP/2.0 ");
        out.put_slice(self.code.to_string().as_bytes());
        out.put_u8(b' ');
        out.put_slice(self.reason.as_str().as_bytes());
        out.put_slice(b"\r\n");
        write_rest(&mut out, &self.headers, &self.body);
        out.freeze()
    }
}

fn headers_length(headers: &Headers) -> usize {
    headers
        .iter()
        .map(|header| header.line.len() + 2)
        .sum::<usize>()
        + 24
}

/// The header lines, a Content-Length equal to the body length (the first Content-Length
/// line kept when it says so, others dropped), the empty line and the body.
fn write_rest(out: &mut BytesMut, headers: &Headers, body: &Bytes) {
    let mut wrote_length = false;
    for header in headers.iter() {
        if header.kind() == HeaderName::ContentLength {
            if wrote_length {
                continue;
            }
            wrote_length = true;
            if header.value().trim().parse::<usize>().ok() != Some(body.len()) {
                write_length(out, body.len());
                continue;
            }
        }
        out.put_slice(&header.line);
        out.put_slice(b"\r\n");
    }
    if !wrote_length {
        write_length(out, body.len());
    }
    out.put_slice(b"\r\n");
    out.put_slice(body);
}

fn write_length(out: &mut BytesMut, length: usize) {
    out.put_slice(b"Content-Length: ");
    out.put_slice(length.to_string().as_bytes());
    out.put_slice(b"\r\n");
}

impl Request {
    /// The same request, from one `rsip` built (the sidecar's own REGISTERs).
    pub fn from_rsip(request: &rsip::Request) -> Result<Self, MessageError> {
        match parse(super::message::encode(&request.clone().into()), true)? {
            Message::Request(request) => Ok(request),
            Message::Response(_) => Err(MessageError::Parse {
                reason: "a request encoded as a response".to_string(),
            }),
        }
    }
}

impl Response {
    /// The same response as `rsip` reads it, for the registration.
    pub fn to_rsip(&self) -> Result<rsip::Response, MessageError> {
        match super::message::parse(&self.encode(), true)? {
            rsip::SipMessage::Response(response) => Ok(response),
            rsip::SipMessage::Request(_) => Err(MessageError::Parse {
                reason: "a response encoded as a request".to_string(),
            }),
        }
    }
}

/// The first Via value: the top of the Via stack.
pub fn top_via(headers: &Headers) -> Result<Via, MessageError> {
    first_via(headers.first(HeaderName::Via).map(Header::value))
}

/// The top Via value read in place, nothing copied: for the transaction keys and the
/// checks that only read it.
pub fn top_via_view(headers: &Headers) -> Result<view::ViaView<'_>, MessageError> {
    let (first, _) = headers
        .first(HeaderName::Via)
        .map(|line| split_first(line.value()))
        .filter(|(first, _)| !first.is_empty())
        .ok_or(MessageError::Missing { header: "Via" })?;
    view::ViaView::parse(first).map_err(|problem| MessageError::Invalid {
        header: "Via",
        reason: problem.to_string(),
    })
}

/// The first Via value of the first Via line's value `line`, parsed.
pub(super) fn first_via(line: Option<&str>) -> Result<Via, MessageError> {
    let (first, _) = line
        .map(split_first)
        .filter(|(first, _)| !first.is_empty())
        .ok_or(MessageError::Missing { header: "Via" })?;
    Ok(Via::parse(first)?)
}

/// The first element of a comma-separated list value and what follows its comma (both
/// trimmed; the rest is empty when there is no comma), without splitting the rest.
fn split_first(value: &str) -> (&str, &str) {
    match view::next_separator(value.as_bytes(), 0, b',', true) {
        Some(comma) => (
            value.get(..comma).unwrap_or_default().trim(),
            value.get(comma + 1..).unwrap_or_default().trim(),
        ),
        None => (value.trim(), ""),
    }
}

/// Replaces the top Via value with `via`, keeping any further values of the same line.
pub fn replace_top_via(headers: &mut Headers, via: &Via) -> Result<(), MessageError> {
    let index = headers
        .position(HeaderName::Via)
        .ok_or(MessageError::Missing { header: "Via" })?;
    let Some(slot) = headers.0.get_mut(index) else {
        return Err(MessageError::Missing { header: "Via" });
    };
    let mut value = via.to_string();
    let (_, rest) = split_first(slot.value());
    if !rest.is_empty() {
        value.push_str(", ");
        value.push_str(rest);
    }
    *slot = Header::new(slot.spelling(), &value);
    Ok(())
}

/// Removes the top Via value and returns it; a line holding several values keeps the
/// others.
pub fn pop_via(headers: &mut Headers) -> Result<Via, MessageError> {
    let top = top_via(headers)?;
    let index = headers
        .position(HeaderName::Via)
        .ok_or(MessageError::Missing { header: "Via" })?;
    let remaining = headers
        .0
        .get(index)
        .map(|line| {
            split_list(line.value())
                .into_iter()
                .skip(1)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    if remaining.is_empty() {
        headers.0.remove(index);
    } else if let Some(slot) = headers.0.get_mut(index) {
        let spelling = slot.spelling().to_string();
        *slot = Header::new(&spelling, &remaining);
    }
    Ok(top)
}

/// Removes the top Via value without reading it: the line goes when it holds one
/// value, else the line keeps the values after the first. The relay of a response's
/// path, where the Via removed is ours and was matched already.
pub fn remove_top_via(headers: &mut Headers) -> Result<(), MessageError> {
    let index = headers
        .position(HeaderName::Via)
        .ok_or(MessageError::Missing { header: "Via" })?;
    let Some(line) = headers.0.get(index) else {
        return Err(MessageError::Missing { header: "Via" });
    };
    let value = line.value();
    match view::next_separator(value.as_bytes(), 0, b',', true) {
        None => {
            headers.0.remove(index);
        }
        Some(comma) => {
            let rest = value.get(comma + 1..).unwrap_or_default().trim_start();
            if rest.is_empty() {
                headers.0.remove(index);
            } else {
                let rewritten = Header::new(line.spelling(), rest);
                if let Some(slot) = headers.0.get_mut(index) {
                    *slot = rewritten;
                }
            }
        }
    }
    Ok(())
}

/// Puts `via` on top of the Via stack (a line before the first Via line).
pub fn push_via(headers: &mut Headers, via: &Via) {
    match headers.position(HeaderName::Via) {
        Some(index) => headers
            .0
            .insert(index, Header::new("Via", &via.to_string())),
        None => headers.0.insert(0, Header::new("Via", &via.to_string())),
    }
}

/// The value of every line called `name` (any case, compact forms folded), one per line:
/// for the authentication headers, whose values are never combined into one line
/// (§7.3.1), each is one challenge or one set of credentials.
pub fn header_values<'a>(headers: &'a Headers, name: &'a str) -> impl Iterator<Item = &'a str> {
    let name = Lookup::from(name);
    headers
        .iter()
        .filter(move |header| header.is(name))
        .map(Header::value)
}

pub fn call_id(headers: &Headers) -> Result<&str, MessageError> {
    headers
        .first(HeaderName::CallId)
        .map(|header| header.value().trim())
        .filter(|value| !value.is_empty())
        .ok_or(MessageError::Missing { header: "Call-ID" })
}

/// The CSeq number and method.
pub fn cseq(headers: &Headers) -> Result<(u32, Method), MessageError> {
    let value = headers
        .first(HeaderName::CSeq)
        .map(Header::value)
        .ok_or(MessageError::Missing { header: "CSeq" })?;
    let invalid = |reason: &str| MessageError::Invalid {
        header: "CSeq",
        reason: reason.to_string(),
    };
    let mut words = value.split_ascii_whitespace();
    let number = words
        .next()
        .filter(|number| number.bytes().all(|byte| byte.is_ascii_digit()))
        .and_then(|number| number.parse::<u32>().ok())
        .ok_or_else(|| invalid("the number is not a 32-bit unsigned integer"))?;
    let method = words
        .next()
        .and_then(Method::parse)
        .ok_or_else(|| invalid("the method is not a token"))?;
    if words.next().is_some() {
        return Err(invalid("more than a number and a method"));
    }
    Ok((number, method))
}

/// Sets CSeq in place.
pub fn set_cseq(headers: &mut Headers, seq: u32, method: Method) {
    headers.set(HeaderName::CSeq, &format!("{seq} {method}"));
}

pub fn from_value(headers: &Headers) -> Result<&str, MessageError> {
    headers
        .first(HeaderName::From)
        .map(Header::value)
        .ok_or(MessageError::Missing { header: "From" })
}

pub fn to_value(headers: &Headers) -> Result<&str, MessageError> {
    headers
        .first(HeaderName::To)
        .map(Header::value)
        .ok_or(MessageError::Missing { header: "To" })
}

/// Whether a request is inside a dialog: its To carries a tag (RFC 3261 §12.2).
pub fn in_dialog(headers: &Headers) -> bool {
    to_value(headers).ok().and_then(tag_of).is_some()
}

/// Max-Forwards, if present.
pub fn max_forwards(headers: &Headers) -> Result<Option<u32>, MessageError> {
    headers
        .first(HeaderName::MaxForwards)
        .map(|header| header.value().trim().parse::<u32>())
        .transpose()
        .map_err(|error| MessageError::Invalid {
            header: "Max-Forwards",
            reason: error.to_string(),
        })
}

/// Sets Max-Forwards in place (appended when absent).
pub fn set_max_forwards(headers: &mut Headers, value: u32) {
    headers.set(HeaderName::MaxForwards, &value.to_string());
}

fn list(headers: &Headers, name: HeaderName) -> Vec<String> {
    headers
        .iter()
        .filter(|header| header.is(name))
        .flat_map(|header| split_list(header.value()))
        .map(str::to_string)
        .collect()
}

/// The Route values in order, each a name-addr string.
pub fn routes(headers: &Headers) -> Vec<String> {
    list(headers, HeaderName::Route)
}

/// Replaces all Route lines with one listing `values` (none when empty).
pub fn set_routes(headers: &mut Headers, values: &[String]) {
    let joined = values.join(", ");
    headers.replace_all(HeaderName::Route, (!values.is_empty()).then_some(&joined));
}

/// Adds a Record-Route value on top (a line before the first Record-Route).
pub fn push_record_route(headers: &mut Headers, uri: &str) {
    headers.insert_on_top(HeaderName::RecordRoute, &format!("<{uri}>"));
}

/// Every Record-Route value, top first, one per entry.
pub fn record_routes(headers: &Headers) -> Vec<String> {
    list(headers, HeaderName::RecordRoute)
}

/// Replaces the top Record-Route entry (the one this element pushed last) with `uri`.
pub fn replace_top_record_route(headers: &mut Headers, uri: &str) {
    let mut values = record_routes(headers);
    let Some(top) = values.first_mut() else {
        return;
    };
    *top = format!("<{uri}>");
    headers.replace_all(HeaderName::RecordRoute, Some(&values.join(", ")));
}

/// A copy of `request` with only what later responses, ACKs and CANCELs are built from:
/// Request-URI, Via, From, To, Call-ID, CSeq, Route and Authorization, and no body.
/// Transactions linger for up to 64·T1 after they end, so keeping less matters under
/// load: the kept lines are copied into one small buffer of their own rather than keep
/// the whole received message alive.
pub fn skeleton(request: &Request) -> Request {
    let kept = |header: &&Header| {
        matches!(
            header.kind(),
            HeaderName::Via
                | HeaderName::From
                | HeaderName::To
                | HeaderName::CallId
                | HeaderName::CSeq
                | HeaderName::Route
                | HeaderName::Authorization
        )
    };
    let uri = request.uri.as_str().as_bytes();
    let (mut length, mut count) = (uri.len(), 0);
    for header in request.headers.iter().filter(kept) {
        length += header.line.len();
        count += 1;
    }
    let mut buffer = BytesMut::with_capacity(length);
    buffer.put_slice(uri);
    for header in request.headers.iter().filter(kept) {
        buffer.put_slice(&header.line);
    }
    let buffer = buffer.freeze();
    let mut headers = Vec::with_capacity(count);
    let mut offset = uri.len();
    for header in request.headers.iter().filter(kept) {
        let end = offset + header.line.len();
        headers.push(Header {
            name: header.name,
            expanded: header.expanded,
            line: buffer.slice(offset..end),
            name_end: header.name_end,
            value_start: header.value_start,
        });
        offset = end;
    }
    Request {
        method: request.method,
        uri: Uri(Text(buffer.slice(..uri.len()))),
        headers: Headers(headers),
        body: Bytes::new(),
    }
}

/// A response built by this element for `request` (RFC 3261 §8.2.6): Via, From, To,
/// Call-ID and CSeq copied, a To tag added when the request had none and the status is
/// not 100.
pub fn response_for(request: &Request, code: u16, reason: &str, to_tag: &str) -> Response {
    let mut headers = Headers::default();
    for header in request.headers.iter() {
        match header.kind() {
            HeaderName::Via | HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                headers.push_header(header.clone())
            }
            HeaderName::To => {
                let value = header.value();
                if code != 100 && tag_of(value).is_none() {
                    headers.push("To", &format!("{value};tag={to_tag}"));
                } else {
                    headers.push_header(header.clone());
                }
            }
            _ => {}
        }
    }
    headers.push("Content-Length", "0");
    Response {
        code,
        reason: Text::new(reason),
        headers,
        body: Bytes::new(),
    }
}

/// A response of this element's own making, with the standard reason phrase.
pub fn local_response(request: &Request, code: u16, to_tag: &str) -> Response {
    response_for(request, code, super::message::reason_phrase(code), to_tag)
}

/// Whether URI parameter `name` of a header value's name-addr is present.
pub fn uri_param<'a>(value: &'a str, name: &str) -> Option<Option<&'a str>> {
    let uri = super::header::name_addr_uri(value);
    let params = uri.find(';').map_or("", |start| &uri[start..]);
    param(params, name)
}

/// The header parameters after a name-addr (`;tag=...`).
pub fn params_of(value: &str) -> &str {
    header_params(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Request {
        match parse(Bytes::copy_from_slice(text.as_bytes()), true).unwrap() {
            Message::Request(request) => request,
            Message::Response(_) => panic!("not a request"),
        }
    }

    const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0\r\n\
        v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc;rport\r\n\
        Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKdef, SIP/2.0/UDP 10.0.0.3;branch=z9hG4bKghi\r\n\
        f: <sip:alice@example.com>;tag=1928\r\n\
        t: <sip:bob@example.com>\r\n\
        i: a84b4c76e66710\r\n\
        CSeq: 314159 INVITE\r\n\
        X-Custom:   kept   as is\r\n\
        Max-Forwards: 70\r\n\
        l: 4\r\n\
        \r\n\
        v=0\n";

    #[test]
    fn an_unedited_message_goes_out_as_it_came_in() {
        let parsed = request(INVITE);
        assert_eq!(parsed.encode(), INVITE.as_bytes());
    }

    #[test]
    fn compact_names_are_read_by_their_full_names_and_kept_as_written() {
        let parsed = request(INVITE);
        assert_eq!(call_id(&parsed.headers).unwrap(), "a84b4c76e66710");
        assert_eq!(tag_of(from_value(&parsed.headers).unwrap()), Some("1928"));
        assert!(!in_dialog(&parsed.headers));
        assert_eq!(cseq(&parsed.headers).unwrap(), (314159, Method::Invite));
        assert_eq!(
            top_via(&parsed.headers).unwrap().branch(),
            Some("z9hG4bKabc")
        );
    }

    #[test]
    fn via_stack_push_pop_and_replace_across_lines_and_lists() {
        let mut parsed = request(INVITE);
        let own = Via::parse("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKown").unwrap();
        push_via(&mut parsed.headers, &own);
        assert_eq!(
            top_via(&parsed.headers).unwrap().branch(),
            Some("z9hG4bKown")
        );
        assert_eq!(
            pop_via(&mut parsed.headers).unwrap().branch(),
            Some("z9hG4bKown")
        );
        assert_eq!(
            pop_via(&mut parsed.headers).unwrap().branch(),
            Some("z9hG4bKabc")
        );
        assert_eq!(
            pop_via(&mut parsed.headers).unwrap().branch(),
            Some("z9hG4bKdef")
        );
        let text = String::from_utf8(parsed.encode().to_vec()).unwrap();
        assert!(
            text.contains("Via: SIP/2.0/UDP 10.0.0.3;branch=z9hG4bKghi\r\n"),
            "{text}"
        );
        assert_eq!(
            pop_via(&mut parsed.headers).unwrap().branch(),
            Some("z9hG4bKghi")
        );
        assert!(pop_via(&mut parsed.headers).is_err());
    }

    #[test]
    fn edits_keep_the_order_and_the_untouched_lines() {
        let mut parsed = request(INVITE);
        set_cseq(&mut parsed.headers, 314160, Method::Invite);
        set_max_forwards(&mut parsed.headers, 69);
        push_record_route(&mut parsed.headers, "sip:192.0.2.1;lr");
        push_record_route(&mut parsed.headers, "sip:192.0.2.2;lr");
        let text = String::from_utf8(parsed.encode().to_vec()).unwrap();
        // The received text with exactly these lines changed or added, in place.
        let expected = INVITE
            .replace("CSeq: 314159 INVITE", "CSeq: 314160 INVITE")
            .replace("Max-Forwards: 70", "Max-Forwards: 69")
            .replace(
                "l: 4\r\n\r\n",
                "l: 4\r\nRecord-Route: <sip:192.0.2.2;lr>\r\n\
                 Record-Route: <sip:192.0.2.1;lr>\r\n\r\n",
            );
        assert_eq!(text, expected);
        assert_eq!(
            record_routes(&parsed.headers),
            ["<sip:192.0.2.2;lr>", "<sip:192.0.2.1;lr>"]
        );
        replace_top_record_route(&mut parsed.headers, "sip:192.0.2.9;lr");
        assert_eq!(
            record_routes(&parsed.headers),
            ["<sip:192.0.2.9;lr>", "<sip:192.0.2.1;lr>"]
        );
    }

    #[test]
    fn routes_are_replaced_where_the_first_stood() {
        let mut parsed = request(
            "BYE sip:bob@10.0.0.9 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n\
             Route: <sip:a;lr>, <sip:b;lr>\r\nFrom: <sip:a@x>;tag=1\r\nRoute: <sip:c;lr>\r\n\
             To: <sip:b@y>;tag=2\r\nCall-ID: c\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(
            routes(&parsed.headers),
            ["<sip:a;lr>", "<sip:b;lr>", "<sip:c;lr>"]
        );
        assert!(in_dialog(&parsed.headers));
        set_routes(
            &mut parsed.headers,
            &["<sip:b;lr>".into(), "<sip:c;lr>".into()],
        );
        let text = String::from_utf8(parsed.encode().to_vec()).unwrap();
        assert!(
            text.contains("z9hG4bK1\r\nRoute: <sip:b;lr>, <sip:c;lr>\r\nFrom:"),
            "{text}"
        );
        set_routes(&mut parsed.headers, &[]);
        assert!(routes(&parsed.headers).is_empty());
    }

    #[test]
    fn extension_methods_and_unbracketed_ipv6_are_carried() {
        let parsed = request(
            "FROBNICATE sip:4321@fec0:0:0:0:216:d3ff:fe0d:22c:5060 SIP/2.0\r\n\
             Via: SIP/2.0/UDP fec0:0:0:0:216:d3ff:fe0d:22c:5060;branch=z9hG4bK1\r\n\
             From: <sip:a@x>;tag=1\r\nTo: <sip:b@y>\r\nCall-ID: c\r\nCSeq: 7 FROBNICATE\r\n\r\n",
        );
        assert_eq!(parsed.method.as_str(), "FROBNICATE");
        assert_eq!(cseq(&parsed.headers).unwrap().1, parsed.method);
        assert_eq!(parsed.uri.host(), Some("fec0:0:0:0:216:d3ff:fe0d:22c"));
        let text = String::from_utf8(parsed.encode().to_vec()).unwrap();
        assert!(
            text.ends_with("CSeq: 7 FROBNICATE\r\nContent-Length: 0\r\n\r\n"),
            "{text}"
        );
        let long = format!(
            "{} sip:a@b SIP/2.0\r\n\r\n",
            "X".repeat(MAX_METHOD_LENGTH + 1)
        );
        assert!(parse(Bytes::from(long), true).is_err());
    }

    #[test]
    fn a_wrong_content_length_is_rewritten_and_responses_keep_their_reason() {
        let text = "SIP/2.0 486 Busy Here Now\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
                    Content-Length: 9\r\n\r\nabc";
        assert!(
            parse(Bytes::from(text), true).is_err(),
            "declared more than sent"
        );
        let text = "SIP/2.0 486 Busy Here Now\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\nabc";
        let Message::Response(response) = parse(Bytes::from(text), true).unwrap() else {
            panic!("a response");
        };
        assert_eq!(
            (response.code, response.reason.as_str()),
            (486, "Busy Here Now")
        );
        assert_eq!(
            response.encode(),
            "SIP/2.0 486 Busy Here Now\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
             Content-Length: 3\r\n\r\nabc"
                .as_bytes()
        );
    }

    #[test]
    fn local_responses_copy_the_dialog_headers_and_add_a_to_tag() {
        let parsed = request(INVITE);
        let response = local_response(&parsed, 486, "abcd");
        let text = String::from_utf8(response.encode().to_vec()).unwrap();
        assert!(
            text.starts_with("SIP/2.0 486 Busy Here\r\nv: SIP/2.0/UDP 10.0.0.1"),
            "{text}"
        );
        assert!(
            text.contains("To: <sip:bob@example.com>;tag=abcd\r\n"),
            "{text}"
        );
        let trying = local_response(&parsed, 100, "abcd");
        assert!(!String::from_utf8(trying.encode().to_vec())
            .unwrap()
            .contains("tag=abcd"));
    }

    #[test]
    fn a_skeleton_keeps_the_dialog_lines_in_a_buffer_of_its_own() {
        let parsed = request(INVITE);
        let kept = skeleton(&parsed);
        assert_eq!(kept.uri.as_str(), "sip:bob@example.com");
        assert_eq!(call_id(&kept.headers).unwrap(), "a84b4c76e66710");
        assert_eq!(cseq(&kept.headers).unwrap(), (314159, Method::Invite));
        assert_eq!(top_via(&kept.headers).unwrap().branch(), Some("z9hG4bKabc"));
        assert!(max_forwards(&kept.headers).unwrap().is_none());
        assert!(kept.body.is_empty());
        let text = String::from_utf8(kept.encode().to_vec()).unwrap();
        assert!(!text.contains("X-Custom"), "{text}");
    }

    #[test]
    fn debug_output_names_headers_but_never_shows_values() {
        let mut parsed = request(INVITE);
        parsed.headers.push("Authorization", "Bearer secret-token");
        let debug = format!("{parsed:?}");
        assert!(debug.contains("Authorization"), "{debug}");
        assert!(!debug.contains("secret-token"), "{debug}");
    }
}
