//! SIP messages as captured text: a start line, the headers in their order and spelling,
//! and the body, owned so that replay can rewrite them freely. Parsed by the proxy's
//! view ([`MessageView`]) with its capture rule (a body shorter than its Content-Length is
//! kept, as a capture may have cut it): a replay must reproduce what a field device
//! sent, and reads it the way the proxy will. Only what replay rewrites is interpreted (Call-ID, CSeq, Via, From/To tags,
//! Contact, routes, Content-Length); compact forms (RFC 3261 §7.3.3) count as their full
//! names and folded lines (§7.3.1) are joined.

use bytes::Bytes;

pub use crate::sip::framing::find_header_end as header_end;
use crate::sip::header::{full_name, header_params, name_addr_uri, param, split_list};
use crate::sip::view::{MessageView, ViewError};
use crate::sip::wire;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request { method: String, uri: String },
    Response { code: u16, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipText {
    pub start: StartLine,
    /// Name as written, value with folding undone.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("no blank line ends the headers")]
    NoHeaderEnd,
    #[error("the first line is not a SIP request or status line")]
    NotSip,
    #[error("the headers are not text")]
    NotText,
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    /// Anything else the view refuses (a header line without a colon, say).
    #[error(transparent)]
    Malformed(ViewError),
}

impl From<ViewError> for TextError {
    fn from(error: ViewError) -> Self {
        match error {
            ViewError::UnterminatedHeaders => TextError::NoHeaderEnd,
            ViewError::NoStartLine
            | ViewError::BadStartLine
            | ViewError::BadMethod
            | ViewError::UnsupportedVersion
            | ViewError::BadStatusCode => TextError::NotSip,
            ViewError::NotUtf8 { .. } => TextError::NotText,
            other => TextError::Malformed(other),
        }
    }
}

/// A header value with its folding undone: each continuation line joined to the one
/// before it by a single space (RFC 3261 §7.3.1).
fn unfolded(value: &str) -> String {
    if !value.contains(['\r', '\n']) {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len());
    for piece in value
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|piece| !piece.is_empty())
    {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(piece);
    }
    out
}

/// Header lines a message may have; more is taken for garbage, not SIP.
pub const MAX_HEADERS: usize = 1024;

/// Whether `line` is a SIP/2.0 status line or request line.
pub fn is_start_line(line: &[u8]) -> bool {
    if line.starts_with(b"SIP/2.0 ") {
        return line.len() >= 11 && line[8..11].iter().all(u8::is_ascii_digit);
    }
    let Some(space) = line.iter().position(|&byte| byte == b' ') else {
        return false;
    };
    let method = &line[..space];
    !method.is_empty()
        && method
            .iter()
            .all(|byte| byte.is_ascii_alphabetic() || *byte == b'-' || *byte == b'_')
        && line.ends_with(b" SIP/2.0")
        && line.len() > space + 9
}

impl SipText {
    /// Parses one whole message with the proxy's view ([`MessageView::parse_captured`]):
    /// without a Content-Length the body is everything after the headers; a body shorter
    /// than Content-Length is kept as it is.
    pub fn parse(bytes: &[u8]) -> Result<SipText, TextError> {
        let view =
            MessageView::parse_captured(Bytes::copy_from_slice(bytes)).map_err(TextError::from)?;
        if view.headers().nth(MAX_HEADERS).is_some() {
            return Err(TextError::TooManyHeaders);
        }
        let start = match (view.method(), view.request_uri(), view.status()) {
            (Some(method), Some(uri), _) => StartLine::Request {
                method: method.as_str().to_string(),
                uri: uri.to_string(),
            },
            (_, _, Some(code)) => StartLine::Response {
                code,
                reason: view.reason().unwrap_or_default().to_string(),
            },
            _ => return Err(TextError::NotSip),
        };
        let headers = view
            .headers()
            .map(|field| (field.spelling.to_string(), unfolded(field.value)))
            .collect();
        Ok(SipText {
            start,
            headers,
            body: view.body().to_vec(),
        })
    }

    /// The text of a message the transport parsed.
    pub fn from_wire(message: &wire::Message) -> SipText {
        let (start, headers, body) = match message {
            wire::Message::Request(request) => (
                StartLine::Request {
                    method: request.method.as_str().to_string(),
                    uri: request.uri.as_str().to_string(),
                },
                &request.headers,
                &request.body,
            ),
            wire::Message::Response(response) => (
                StartLine::Response {
                    code: response.code,
                    reason: response.reason.as_str().to_string(),
                },
                &response.headers,
                &response.body,
            ),
        };
        SipText {
            start,
            headers: headers
                .iter()
                .map(|header| (header.spelling().to_string(), unfolded(header.value())))
                .collect(),
            body: body.to_vec(),
        }
    }

    /// The message as bytes, with Content-Length set to the body's length.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::new();
        match &self.start {
            StartLine::Request { method, uri } => {
                out.push_str(&format!("{method} {uri} SIP/2.0\r\n"));
            }
            StartLine::Response { code, reason } => {
                out.push_str(&format!("SIP/2.0 {code} {reason}\r\n"));
            }
        }
        for (name, value) in &self.headers {
            if is_named(name, "Content-Length") {
                continue;
            }
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\n\r\n", self.body.len()));
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            StartLine::Request { .. } => None,
        }
    }

    /// The request's method, or for a response the method its CSeq names.
    pub fn method(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => self.cseq().map(|(_, method)| method),
        }
    }

    /// The first value of header `name` (full name; its compact form matches too).
    pub fn header<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.values(name).next()
    }

    /// Every value of header `name`, in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(written, _)| is_named(written, name))
            .map(|(_, value)| value.as_str())
    }

    /// Every element of the comma-separated list header `name` (Via, Route, ...).
    pub fn list(&self, name: &str) -> Vec<String> {
        self.values(name)
            .flat_map(split_list)
            .map(str::to_string)
            .collect()
    }

    /// Replaces the first header `name` (in any spelling) with `value`, dropping any
    /// others, or appends it.
    pub fn set(&mut self, name: &str, value: String) {
        match self
            .headers
            .iter()
            .position(|(written, _)| is_named(written, name))
        {
            Some(position) => {
                self.headers[position] = (name.to_string(), value);
                let mut index = 0;
                self.headers.retain(|(written, _)| {
                    index += 1;
                    index - 1 == position || !is_named(written, name)
                });
            }
            None => self.headers.push((name.to_string(), value)),
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|(written, _)| !is_named(written, name));
    }

    /// Replaces every header `name` with one header per element of `values`, where the
    /// first of them stood (or at the end).
    pub fn set_list(&mut self, name: &str, values: &[String]) {
        let position = self
            .headers
            .iter()
            .position(|(written, _)| is_named(written, name))
            .unwrap_or(self.headers.len());
        self.remove(name);
        let position = position.min(self.headers.len());
        for (offset, value) in values.iter().enumerate() {
            self.headers
                .insert(position + offset, (name.to_string(), value.clone()));
        }
    }

    pub fn call_id(&self) -> Option<&str> {
        self.header("Call-ID").map(str::trim)
    }

    pub fn cseq(&self) -> Option<(u32, &str)> {
        let value = self.header("CSeq")?;
        let mut parts = value.split_whitespace();
        let number = parts.next()?.parse().ok()?;
        Some((number, parts.next()?))
    }

    pub fn from_tag(&self) -> Option<&str> {
        tag(self.header("From")?)
    }

    pub fn to_tag(&self) -> Option<&str> {
        tag(self.header("To")?)
    }

    /// The branch of the topmost Via.
    pub fn branch(&self) -> Option<String> {
        let top = self.list("Via").into_iter().next()?;
        let params = top.split_once(';').map(|(_, params)| params)?;
        param(params, "branch").flatten().map(str::to_string)
    }

    /// The URI of the first Contact.
    pub fn contact_uri(&self) -> Option<String> {
        self.list("Contact")
            .first()
            .map(|contact| name_addr_uri(contact).to_string())
    }
}

/// Whether a header written as `written` is header `name` (case-insensitive, compact
/// forms included).
pub fn is_named(written: &str, name: &str) -> bool {
    written.eq_ignore_ascii_case(name)
        || full_name(written).is_some_and(|full| full.eq_ignore_ascii_case(name))
}

/// The `tag` parameter of a From or To value.
pub fn tag(value: &str) -> Option<&str> {
    param(header_params(value), "tag").flatten()
}

/// `value` (a From or To) with its tag set to `new` (or removed for `None`).
pub fn with_tag(value: &str, new: Option<&str>) -> String {
    let params = header_params(value);
    let base = &value[..value.len() - params.len()];
    let mut kept: Vec<&str> = params
        .split(';')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .filter(|part| {
            !part
                .split('=')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("tag")
        })
        .collect();
    let tag_param = new.map(|tag| format!("tag={tag}"));
    if let Some(tag_param) = &tag_param {
        kept.push(tag_param);
    }
    let mut out = base.trim_end().to_string();
    for part in kept {
        out.push(';');
        out.push_str(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] = b"INVITE sip:bob@example.com SIP/2.0\r\n\
v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc, SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKold\r\n\
f: <sip:alice@example.com>;tag=a1\r\n\
t: <sip:bob@example.com>\r\n\
i: call-1@10.0.0.1\r\n\
CSeq: 7 INVITE\r\n\
Subject: folded\r\n  over two lines\r\n\
X-Odd: kept: as is\r\n\
l: 4\r\n\
\r\n\
v=0\r\nextra";

    #[test]
    fn compact_folded_and_unknown_headers_are_read_and_kept() {
        let message = SipText::parse(INVITE).unwrap();
        assert_eq!(message.method(), Some("INVITE"));
        assert_eq!(message.call_id(), Some("call-1@10.0.0.1"));
        assert_eq!(message.cseq(), Some((7, "INVITE")));
        assert_eq!(message.branch().as_deref(), Some("z9hG4bKabc"));
        assert_eq!(message.from_tag(), Some("a1"));
        assert_eq!(message.to_tag(), None);
        assert_eq!(message.header("Subject"), Some("folded over two lines"));
        assert_eq!(message.header("X-Odd"), Some("kept: as is"));
        assert_eq!(message.body, b"v=0\r");
        assert_eq!(message.list("Via").len(), 2);
    }

    #[test]
    fn encoding_recomputes_content_length_and_keeps_the_order() {
        let mut message = SipText::parse(INVITE).unwrap();
        message.body = b"hello".to_vec();
        message.set("Call-ID", "new-id".into());
        let text = String::from_utf8(message.encode()).unwrap();
        assert!(text.starts_with("INVITE sip:bob@example.com SIP/2.0\r\nv: "));
        assert!(text.contains("Call-ID: new-id\r\nCSeq: 7 INVITE"));
        assert!(text.ends_with("Content-Length: 5\r\n\r\nhello"));
        assert_eq!(SipText::parse(text.as_bytes()).unwrap().body, b"hello");
    }

    #[test]
    fn start_lines_are_recognised() {
        assert!(is_start_line(b"SIP/2.0 200 OK"));
        assert!(is_start_line(b"OPTIONS sip:x SIP/2.0"));
        assert!(!is_start_line(b"HTTP/1.1 200 OK"));
        assert!(!is_start_line(b"GET / HTTP/1.1"));
        assert!(!is_start_line(b"SIP/2.0 2"));
        assert!(SipText::parse(b"\x80\x00garbage").is_err());
    }

    #[test]
    fn what_the_fuzzer_found_round_trips_or_is_refused() {
        // An empty value continued on the next line.
        let input = b"OPTIONS sip:x SIP/2.0\r\nv: \r\n b\r\n\r\n";
        let message = SipText::parse(input).unwrap();
        assert_eq!(message.header("Via"), Some("b"));
        assert_eq!(SipText::parse(&message.encode()).unwrap(), {
            let mut expected = message.clone();
            expected.set("Content-Length", "0".into());
            expected
        });
        // A Request-URI with white space in it: the proxy's view refuses it, so does replay.
        assert!(matches!(
            SipText::parse(b"INVITEI  NVITE sip:bob@10.0.0.2 SIP/2.0\r\nl: 0\r\n\r\n"),
            Err(TextError::NotSip | TextError::Malformed(_))
        ));
        // A status code is three digits from 100 to 699.
        assert_eq!(
            SipText::parse(b"SIP/2.0 020 x\r\n\r\n"),
            Err(TextError::NotSip)
        );
        assert_eq!(
            SipText::parse(b"SIP/2.0 700 x\r\n\r\n"),
            Err(TextError::NotSip)
        );
    }

    #[test]
    fn a_body_the_capture_cut_short_is_kept() {
        let cut = b"MESSAGE sip:x SIP/2.0\r\nContent-Length: 10\r\n\r\nhello";
        assert_eq!(SipText::parse(cut).unwrap().body, b"hello");
    }

    #[test]
    fn a_message_the_transport_parsed_reads_as_its_text() {
        let wire = wire::parse(Bytes::from_static(INVITE), true).unwrap();
        let text = SipText::from_wire(&wire);
        assert_eq!(text, SipText::parse(INVITE).unwrap());
        assert_eq!(text.header("Subject"), Some("folded over two lines"));
    }

    #[test]
    fn tags_are_replaced_and_removed() {
        assert_eq!(
            with_tag("\"Bob\" <sip:bob@x>;tag=old;foo=1", Some("new")),
            "\"Bob\" <sip:bob@x>;foo=1;tag=new"
        );
        assert_eq!(with_tag("<sip:bob@x>", Some("t")), "<sip:bob@x>;tag=t");
        assert_eq!(with_tag("<sip:bob@x>;tag=t", None), "<sip:bob@x>");
    }
}
