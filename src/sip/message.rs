//! Parsing, encoding and header access for SIP messages over `rsip` 0.4: the messages
//! the sidecar builds itself (its REGISTERs) and the simulators' peers. The proxy's own
//! path is [`super::wire`].
//!
//! [`parse`] runs `rsip`'s parser, then expands compact headers (see
//! [`super::header`]) and applies RFC 3261 §18.3 body-length rules. [`encode`] writes the
//! message with a `Content-Length` that matches the body, so a message received over UDP
//! without one can be sent over TCP. The accessor functions read and edit the headers the
//! proxy needs: Via (§8.1.1.7, §16.6), Call-ID, CSeq, From/To tags, Max-Forwards (§16.3,
//! §16.6), Route and Record-Route (§16.4, §16.6).

use bytes::{BufMut, Bytes, BytesMut};
use rsip::headers::{ToTypedHeader, UntypedHeader};
use rsip::message::HasHeaders;
use rsip::{Header, Headers, Method, SipMessage};
use std::io::Write as _;

use super::header::{expand_compact, header_params, name_addr_uri, param, split_list};
use super::via::{Via, ViaError};

pub type Message = SipMessage;

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("not a SIP message: {reason}")]
    Parse { reason: String },
    #[error("missing {header} header")]
    Missing { header: &'static str },
    #[error("invalid {header} header: {reason}")]
    Invalid {
        header: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Via(#[from] ViaError),
    #[error("Content-Length {declared} exceeds the {available} body bytes received")]
    BodyTooShort { declared: usize, available: usize },
}

/// Parses one complete message. For a datagram (`datagram = true`) a body longer than
/// `Content-Length` is truncated to it and a shorter one is an error (RFC 3261 §18.3).
pub fn parse(bytes: &[u8], datagram: bool) -> Result<SipMessage, MessageError> {
    let mut message = SipMessage::try_from(bytes).map_err(|error| MessageError::Parse {
        reason: truncate_reason(error.to_string()),
    })?;
    if let SipMessage::Response(response) = &mut message {
        // rsip replaces a known code's reason phrase with its own spelling ("BusyHere");
        // keep the phrase as received so it is forwarded unchanged.
        let code = response.status_code.code();
        response.status_code = rsip::StatusCode::Other(code, received_reason(bytes));
    }
    let headers = std::mem::take(message.headers_mut());
    *message.headers_mut() = Vec::from(headers)
        .into_iter()
        .map(expand_compact)
        .collect::<Vec<_>>()
        .into();
    if let Some(declared) = content_length(message.headers())? {
        let available = message.body().len();
        if declared > available {
            return Err(MessageError::BodyTooShort {
                declared,
                available,
            });
        }
        if datagram && declared < available {
            message.body_mut().truncate(declared);
        }
    }
    Ok(message)
}

/// The reason phrase of a status line (`SIP/2.0 486 Busy Here`).
fn received_reason(bytes: &[u8]) -> String {
    let line_end = bytes
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .unwrap_or(bytes.len());
    let line = String::from_utf8_lossy(&bytes[..line_end]);
    line.splitn(3, ' ').nth(2).unwrap_or("").trim().to_string()
}

/// A status code with the reason phrase of RFC 3261 §21 (or a generic one), for
/// responses this element generates.
pub fn status(code: u16) -> rsip::StatusCode {
    rsip::StatusCode::Other(code, reason_phrase(code).to_string())
}

/// The reason phrase of RFC 3261 §21 for `code`, or a generic one for its class.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        416 => "Unsupported URI Scheme",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        486 => "Busy Here",
        487 => "Request Terminated",
        500 => "Server Internal Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        _ => match code / 100 {
            1 => "Session Progress",
            2 => "OK",
            3 => "Redirection",
            4 => "Client Error",
            5 => "Server Error",
            _ => "Global Failure",
        },
    }
}

fn truncate_reason(mut reason: String) -> String {
    const LIMIT: usize = 160;
    if reason.len() > LIMIT {
        let mut cut = LIMIT;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str("...");
    }
    reason
}

/// Writes the message with its body bytes as they are and a `Content-Length` equal to
/// the body length (any existing Content-Length header is replaced in place).
pub fn encode(message: &SipMessage) -> Bytes {
    let body = message.body();
    let mut out = BytesMut::with_capacity(512 + body.len()).writer();
    // Writes into a BytesMut cannot fail.
    let _ = match message {
        SipMessage::Request(request) => {
            write!(
                out,
                "{} {} {}\r\n",
                request.method, request.uri, request.version
            )
        }
        SipMessage::Response(response) => {
            write!(out, "{} {}\r\n", response.version, response.status_code)
        }
    };
    let mut wrote_length = false;
    for header in message.headers().iter() {
        let _ = match header {
            Header::ContentLength(_) if wrote_length => continue,
            Header::ContentLength(_) => {
                wrote_length = true;
                write!(out, "Content-Length: {}\r\n", body.len())
            }
            other => write!(out, "{other}\r\n"),
        };
    }
    if !wrote_length {
        let _ = write!(out, "Content-Length: {}\r\n", body.len());
    }
    let mut out = out.into_inner();
    out.put_slice(b"\r\n");
    out.put_slice(body);
    out.freeze()
}

/// The message as text for a log line, with the values of credential headers
/// (Authorization, Proxy-Authorization) replaced and the body reduced to its length.
pub fn redacted(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut out = String::with_capacity(head.len() + 32);
    for line in head.split("\r\n") {
        match line.split_once(':') {
            Some((name, _)) if is_credential_header(name.trim()) => {
                out.push_str(name);
                out.push_str(": <redacted>\r\n");
            }
            _ => {
                out.push_str(line);
                out.push_str("\r\n");
            }
        }
    }
    if !body.is_empty() {
        out.push_str(&format!("\r\n[{} body bytes]", body.len()));
    }
    out
}

fn is_credential_header(name: &str) -> bool {
    name.eq_ignore_ascii_case("Authorization") || name.eq_ignore_ascii_case("Proxy-Authorization")
}

fn content_length(headers: &Headers) -> Result<Option<usize>, MessageError> {
    headers
        .iter()
        .find_map(|header| match header {
            Header::ContentLength(length) => Some(length.value().trim().parse::<usize>()),
            _ => None,
        })
        .transpose()
        .map_err(|error| MessageError::Invalid {
            header: "Content-Length",
            reason: error.to_string(),
        })
}

/// The first Via value: the top of the Via stack.
pub fn top_via(headers: &Headers) -> Result<Via, MessageError> {
    super::wire::first_via(headers.iter().find_map(|header| match header {
        Header::Via(via) => Some(via.value()),
        _ => None,
    }))
}

/// Replaces the top Via value with `via`, keeping any further values of the same header.
pub fn replace_top_via(headers: &mut Headers, via: &Via) -> Result<(), MessageError> {
    let slot = headers
        .iter_mut()
        .find_map(|header| match header {
            Header::Via(value) => Some(value),
            _ => None,
        })
        .ok_or(MessageError::Missing { header: "Via" })?;
    let rest: Vec<String> = split_list(slot.value())
        .into_iter()
        .skip(1)
        .map(str::to_string)
        .collect();
    let mut value = via.to_string();
    for other in rest {
        value.push_str(", ");
        value.push_str(&other);
    }
    *slot = value.into();
    Ok(())
}

/// Removes the top Via value and returns it; a header holding several values keeps the
/// others.
pub fn pop_via(headers: &mut Headers) -> Result<Via, MessageError> {
    let top = top_via(headers)?;
    let mut all: Vec<Header> = Vec::from(std::mem::take(headers));
    let index = all
        .iter()
        .position(|header| matches!(header, Header::Via(_)))
        .ok_or(MessageError::Missing { header: "Via" })?;
    let remaining = match &all[index] {
        Header::Via(value) => split_list(value.value())
            .into_iter()
            .skip(1)
            .collect::<Vec<_>>()
            .join(", "),
        _ => String::new(),
    };
    if remaining.is_empty() {
        all.remove(index);
    } else {
        all[index] = Header::Via(remaining.into());
    }
    *headers = all.into();
    Ok(top)
}

/// Puts `via` on top of the Via stack (before the first Via header).
pub fn push_via(headers: &mut Headers, via: &Via) {
    insert_before_first(headers, Header::Via(via.to_string().into()), |header| {
        matches!(header, Header::Via(_))
    });
}

fn insert_before_first(headers: &mut Headers, new: Header, is_anchor: impl Fn(&Header) -> bool) {
    let mut all: Vec<Header> = Vec::from(std::mem::take(headers));
    let index = all.iter().position(is_anchor).unwrap_or(0);
    all.insert(index, new);
    *headers = all.into();
}

/// The values of every header named `name` (its full name, any case), whichever
/// variant `rsip` parsed it into (authentication, Contact, Expires, Min-Expires,
/// Retry-After and unknown headers). For the authentication headers, whose values are never
/// combined into one line (§7.3.1), each value is one challenge or one set of credentials.
pub fn header_values<'a>(headers: &'a Headers, name: &'a str) -> impl Iterator<Item = &'a str> {
    headers.iter().filter_map(move |header| {
        let (header_name, value) = match header {
            Header::Authorization(value) => ("Authorization", value.value()),
            Header::ProxyAuthorization(value) => ("Proxy-Authorization", value.value()),
            Header::WwwAuthenticate(value) => ("WWW-Authenticate", value.value()),
            Header::ProxyAuthenticate(value) => ("Proxy-Authenticate", value.value()),
            Header::AuthenticationInfo(value) => ("Authentication-Info", value.value()),
            Header::Contact(value) => ("Contact", value.value()),
            Header::Expires(value) => ("Expires", value.value()),
            Header::MinExpires(value) => ("Min-Expires", value.value()),
            Header::RetryAfter(value) => ("Retry-After", value.value()),
            Header::Other(other, value) => (other.as_str(), value.as_str()),
            _ => return None,
        };
        header_name.eq_ignore_ascii_case(name).then_some(value)
    })
}

pub fn call_id(headers: &Headers) -> Result<&str, MessageError> {
    headers
        .iter()
        .find_map(|header| match header {
            Header::CallId(call_id) => Some(call_id.value().trim()),
            _ => None,
        })
        .filter(|value| !value.is_empty())
        .ok_or(MessageError::Missing { header: "Call-ID" })
}

/// The CSeq number and method.
pub fn cseq(headers: &Headers) -> Result<(u32, Method), MessageError> {
    let header = headers
        .iter()
        .find_map(|header| match header {
            Header::CSeq(cseq) => Some(cseq),
            _ => None,
        })
        .ok_or(MessageError::Missing { header: "CSeq" })?;
    let typed = header.typed().map_err(|error| MessageError::Invalid {
        header: "CSeq",
        reason: error.to_string(),
    })?;
    Ok((typed.seq, typed.method))
}

pub fn set_cseq(headers: &mut Headers, seq: u32, method: Method) {
    let value = format!("{seq} {method}");
    headers.retain(|header| !matches!(header, Header::CSeq(_)));
    headers.push(Header::CSeq(value.into()));
}

fn name_addr_header<'a>(
    headers: &'a Headers,
    name: &'static str,
    pick: impl Fn(&'a Header) -> Option<&'a str>,
) -> Result<&'a str, MessageError> {
    headers
        .iter()
        .find_map(pick)
        .ok_or(MessageError::Missing { header: name })
}

pub fn from_value(headers: &Headers) -> Result<&str, MessageError> {
    name_addr_header(headers, "From", |header| match header {
        Header::From(from) => Some(from.value()),
        _ => None,
    })
}

pub fn to_value(headers: &Headers) -> Result<&str, MessageError> {
    name_addr_header(headers, "To", |header| match header {
        Header::To(to) => Some(to.value()),
        _ => None,
    })
}

pub fn tag_of(value: &str) -> Option<&str> {
    param(header_params(value), "tag").flatten()
}

/// Whether a request is inside a dialog: its To carries a tag (RFC 3261 §12.2). The one
/// test every caller uses.
pub fn in_dialog(headers: &Headers) -> bool {
    to_value(headers).ok().and_then(tag_of).is_some()
}

/// Max-Forwards, if present.
pub fn max_forwards(headers: &Headers) -> Result<Option<u32>, MessageError> {
    headers
        .iter()
        .find_map(|header| match header {
            Header::MaxForwards(value) => Some(value.value().trim().parse::<u32>()),
            _ => None,
        })
        .transpose()
        .map_err(|error| MessageError::Invalid {
            header: "Max-Forwards",
            reason: error.to_string(),
        })
}

/// Sets Max-Forwards, replacing any existing header in place.
pub fn set_max_forwards(headers: &mut Headers, value: u32) {
    let mut replaced = false;
    for header in headers.iter_mut() {
        if let Header::MaxForwards(slot) = header {
            *slot = value.to_string().into();
            replaced = true;
            break;
        }
    }
    if !replaced {
        headers.push(Header::MaxForwards(value.to_string().into()));
    }
}

/// The Route values in order, each a name-addr string.
pub fn routes(headers: &Headers) -> Vec<String> {
    headers
        .iter()
        .filter_map(|header| match header {
            Header::Route(route) => Some(route.value()),
            _ => None,
        })
        .flat_map(split_list)
        .map(str::to_string)
        .collect()
}

/// Replaces all Route headers with one header listing `values` (none when empty).
pub fn set_routes(headers: &mut Headers, values: &[String]) {
    let mut all: Vec<Header> = Vec::from(std::mem::take(headers));
    let first = all
        .iter()
        .position(|header| matches!(header, Header::Route(_)));
    all.retain(|header| !matches!(header, Header::Route(_)));
    if !values.is_empty() {
        let index = first.unwrap_or(all.len()).min(all.len());
        all.insert(index, Header::Route(values.join(", ").into()));
    }
    *headers = all.into();
}

/// Adds a Record-Route value on top (before the first existing Record-Route).
pub fn push_record_route(headers: &mut Headers, uri: &str) {
    let value = format!("<{uri}>");
    let anchor = headers
        .iter()
        .any(|header| matches!(header, Header::RecordRoute(_)));
    if anchor {
        insert_before_first(headers, Header::RecordRoute(value.into()), |header| {
            matches!(header, Header::RecordRoute(_))
        });
    } else {
        headers.push(Header::RecordRoute(value.into()));
    }
}

/// Every Record-Route value, top first, one per entry.
pub fn record_routes(headers: &Headers) -> Vec<String> {
    headers
        .iter()
        .filter_map(|header| match header {
            Header::RecordRoute(route) => Some(route.value()),
            _ => None,
        })
        .flat_map(split_list)
        .map(str::to_string)
        .collect()
}

/// Replaces the top Record-Route entry (the one this element pushed last) with `uri`.
pub fn replace_top_record_route(headers: &mut Headers, uri: &str) {
    let mut values = record_routes(headers);
    if values.is_empty() {
        return;
    }
    values[0] = format!("<{uri}>");
    let mut all: Vec<Header> = Vec::from(std::mem::take(headers));
    let first = all
        .iter()
        .position(|header| matches!(header, Header::RecordRoute(_)));
    all.retain(|header| !matches!(header, Header::RecordRoute(_)));
    let index = first.unwrap_or(all.len()).min(all.len());
    all.insert(index, Header::RecordRoute(values.join(", ").into()));
    *headers = all.into();
}

/// The URI of a Route value, parsed.
pub fn route_uri(value: &str) -> Result<rsip::Uri, MessageError> {
    rsip::Uri::try_from(name_addr_uri(value)).map_err(|error| MessageError::Invalid {
        header: "Route",
        reason: error.to_string(),
    })
}

/// A copy of `request` with only what later responses, ACKs and CANCELs are built from:
/// Request-URI, Via, From, To, Call-ID, CSeq, Route and Authorization, and no body. Transactions linger
/// for up to 64·T1 after they end, so keeping less matters under load.
pub fn skeleton(request: &rsip::Request) -> rsip::Request {
    let headers: Vec<Header> = request
        .headers
        .iter()
        .filter(|header| {
            matches!(
                header,
                Header::Via(_)
                    | Header::From(_)
                    | Header::To(_)
                    | Header::CallId(_)
                    | Header::CSeq(_)
                    | Header::Route(_)
                    | Header::Authorization(_)
            )
        })
        .cloned()
        .collect();
    rsip::Request {
        method: request.method,
        uri: request.uri.clone(),
        version: request.version.clone(),
        headers: headers.into(),
        body: Vec::new(),
    }
}

/// The headers of a response built by this element for `request` (RFC 3261 §8.2.6):
/// Via, From, To, Call-ID and CSeq copied, a To tag added when the request had none and
/// the status is not 100.
pub fn response_for(
    request: &rsip::Request,
    status: rsip::StatusCode,
    to_tag: &str,
) -> rsip::Response {
    let mut headers = Headers::default();
    for header in request.headers.iter() {
        match header {
            Header::Via(_) | Header::From(_) | Header::CallId(_) | Header::CSeq(_) => {
                headers.push(header.clone())
            }
            Header::To(to) => {
                let value = to.value();
                if status.code() != 100 && tag_of(value).is_none() {
                    headers.push(Header::To(format!("{value};tag={to_tag}").into()));
                } else {
                    headers.push(header.clone());
                }
            }
            _ => {}
        }
    }
    headers.push(Header::ContentLength("0".into()));
    rsip::Response {
        status_code: status,
        version: rsip::Version::V2,
        headers,
        body: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsip::message::HeadersExt;

    const COMPACT_INVITE: &str = "INVITE sip:bob@example.com SIP/2.0\r\n\
        v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc;rport\r\n\
        v: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKdef\r\n\
        f: <sip:alice@example.com>;tag=1928\r\n\
        t: <sip:bob@example.com>\r\n\
        i: a84b4c76e66710@pc33\r\n\
        CSeq: 314159 INVITE\r\n\
        m: <sip:alice@10.0.0.1>\r\n\
        c: application/sdp\r\n\
        k: 100rel\r\n\
        s: hello\r\n\
        e: identity\r\n\
        l: 4\r\n\
        \r\n\
        v=0\r\n";

    #[test]
    fn rsip_typed_accessors_fail_on_compact_headers() {
        // The defect this module works around: without expansion rsip cannot see them.
        let raw = rsip::SipMessage::try_from(COMPACT_INVITE.as_bytes()).unwrap();
        let rsip::SipMessage::Request(raw) = raw else {
            unreachable!()
        };
        assert!(raw.via_header().is_err());
        assert!(raw.call_id_header().is_err());
    }

    #[test]
    fn compact_headers_are_expanded_after_parse() {
        let message = parse(COMPACT_INVITE.as_bytes(), true).unwrap();
        let SipMessage::Request(request) = &message else {
            unreachable!()
        };
        assert!(request.via_header().is_ok());
        assert_eq!(call_id(&request.headers).unwrap(), "a84b4c76e66710@pc33");
        assert_eq!(
            top_via(&request.headers).unwrap().branch(),
            Some("z9hG4bKabc")
        );
        assert_eq!(tag_of(from_value(&request.headers).unwrap()), Some("1928"));
        assert!(request.contact_header().is_ok());
        let encoded = String::from_utf8(encode(&message).to_vec()).unwrap();
        for long in [
            "Via: ",
            "From: ",
            "To: ",
            "Call-ID: ",
            "Contact: ",
            "Content-Type: ",
        ] {
            assert!(encoded.contains(long), "{long} missing in {encoded}");
        }
        assert!(encoded.contains("Supported: 100rel"));
        assert!(encoded.contains("Subject: hello"));
        assert!(encoded.contains("Content-Encoding: identity"));
        // The body was cut to Content-Length (4 of the 5 bytes after the blank line).
        assert!(encoded.ends_with("Content-Length: 4\r\n\r\nv=0\r"));
    }

    #[test]
    fn datagram_body_shorter_than_content_length_is_an_error() {
        let text = COMPACT_INVITE.replace("l: 4", "l: 40");
        assert!(matches!(
            parse(text.as_bytes(), true),
            Err(MessageError::BodyTooShort {
                declared: 40,
                available: 5
            })
        ));
    }

    #[test]
    fn via_stack_push_and_pop_across_comma_separated_values() {
        let text = COMPACT_INVITE.replace(
            "v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc;rport\r\nv: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKdef\r\n",
            "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabc, SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKdef\r\n",
        );
        let mut message = parse(text.as_bytes(), true).unwrap();
        let headers = message.headers_mut();
        push_via(headers, &Via::new("TCP", "192.0.2.1", 5070, "z9hG4bKnew"));
        assert_eq!(top_via(headers).unwrap().branch(), Some("z9hG4bKnew"));
        assert_eq!(pop_via(headers).unwrap().branch(), Some("z9hG4bKnew"));
        assert_eq!(pop_via(headers).unwrap().branch(), Some("z9hG4bKabc"));
        assert_eq!(top_via(headers).unwrap().branch(), Some("z9hG4bKdef"));
        assert_eq!(pop_via(headers).unwrap().branch(), Some("z9hG4bKdef"));
        assert!(matches!(
            top_via(headers),
            Err(MessageError::Missing { header: "Via" })
        ));
    }

    #[test]
    fn cseq_max_forwards_and_routes() {
        let text = COMPACT_INVITE.replace(
            "CSeq: 314159 INVITE\r\n",
            "CSeq: 314159 INVITE\r\nMax-Forwards: 3\r\nRoute: <sip:p1.example;lr>, <sip:p2.example;lr>\r\nRoute: <sip:p3.example;lr>\r\n",
        );
        let mut message = parse(text.as_bytes(), true).unwrap();
        let headers = message.headers_mut();
        assert_eq!(cseq(headers).unwrap(), (314159, Method::Invite));
        set_cseq(headers, 314160, Method::Invite);
        assert_eq!(cseq(headers).unwrap(), (314160, Method::Invite));
        assert_eq!(max_forwards(headers).unwrap(), Some(3));
        set_max_forwards(headers, 2);
        assert_eq!(max_forwards(headers).unwrap(), Some(2));
        let all = routes(headers);
        assert_eq!(all.len(), 3);
        assert_eq!(route_uri(&all[0]).unwrap().host().to_string(), "p1.example");
        set_routes(headers, &all[1..]);
        assert_eq!(
            routes(headers),
            vec!["<sip:p2.example;lr>", "<sip:p3.example;lr>"]
        );
        set_routes(headers, &[]);
        assert!(routes(headers).is_empty());
        push_record_route(headers, "sip:192.0.2.1:5070;lr");
        push_record_route(headers, "sip:192.0.2.1:5060;lr");
        let encoded = String::from_utf8(encode(&message).to_vec()).unwrap();
        let first = encoded
            .find("Record-Route: <sip:192.0.2.1:5060;lr>")
            .unwrap();
        let second = encoded
            .find("Record-Route: <sip:192.0.2.1:5070;lr>")
            .unwrap();
        assert!(first < second);
    }

    #[test]
    fn response_for_copies_dialog_headers_and_adds_to_tag() {
        let SipMessage::Request(request) = parse(COMPACT_INVITE.as_bytes(), true).unwrap() else {
            unreachable!()
        };
        let response = response_for(&request, status(486), "xyz");
        assert_eq!(tag_of(to_value(&response.headers).unwrap()), Some("xyz"));
        assert_eq!(call_id(&response.headers).unwrap(), "a84b4c76e66710@pc33");
        let trying = response_for(&request, status(100), "xyz");
        assert_eq!(tag_of(to_value(&trying.headers).unwrap()), None);
        let text = String::from_utf8(encode(&SipMessage::Response(response)).to_vec()).unwrap();
        assert!(text.starts_with("SIP/2.0 486 Busy Here\r\n"), "{text}");
    }

    #[test]
    fn received_reason_phrase_is_kept() {
        let text = "SIP/2.0 403 Token expired, try again\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\n\
            From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\
            Content-Length: 0\r\n\r\n";
        let message = parse(text.as_bytes(), true).unwrap();
        let encoded = encode(&message);
        assert!(encoded.starts_with(b"SIP/2.0 403 Token expired, try again\r\n"));
    }

    #[test]
    fn redacted_masks_credentials_and_bodies() {
        let text = "INVITE sip:b@h SIP/2.0\r\nAuthorization: Bearer eyJsecret\r\n\
            proxy-authorization : Digest response=\"abc\"\r\nCall-ID: x\r\n\r\nv=0 secret-sdp";
        let shown = redacted(text.as_bytes());
        assert!(!shown.contains("eyJsecret"), "{shown}");
        assert!(!shown.contains("abc"), "{shown}");
        assert!(!shown.contains("secret-sdp"), "{shown}");
        assert!(shown.contains("Authorization: <redacted>"));
        assert!(shown.contains("Call-ID: x"));
        assert!(shown.contains("[14 body bytes]"));
    }

    #[test]
    fn garbage_is_a_parse_error_not_a_panic() {
        for input in [
            &b""[..],
            b"\x00\xff\xfe",
            b"INVITE\r\n\r\n",
            b"SIP/2.0 abc\r\n\r\n",
        ] {
            assert!(parse(input, true).is_err());
        }
    }

    #[test]
    fn binary_body_survives_encoding() {
        let mut text = COMPACT_INVITE.replace("l: 4", "l: 3").into_bytes();
        let body_start = text.len() - 5;
        text.truncate(body_start);
        text.extend_from_slice(&[0xff, 0x00, 0x80]);
        let message = parse(&text, true).unwrap();
        let encoded = encode(&message);
        assert!(encoded.ends_with(&[0xff, 0x00, 0x80]));
    }
}
