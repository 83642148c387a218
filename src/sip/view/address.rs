//! Where a message says it came from or goes to: Via sent-by (RFC 3261 §18.2.1, §20.42,
//! with `received` and RFC 3581 `rport`) and the host part of SIP URIs (§19.1.1), with
//! IPv6 references `[2001:db8::1]:5060` (§25.1, RFC 5118 §4.1, §4.5).
//!
//! Real traffic also writes IPv6 addresses without brackets, in Via sent-by and in URIs
//! (`SIP/2.0/UDP fe80:0:0:0:21a:a0ff:fe07:32e0:5060`), which RFC 5118 §4.2 calls invalid.
//! They are read leniently by one rule, [`split_host_port`]: text with two or more colons
//! and no brackets is an IPv6 address as a whole if it parses as one; otherwise, if the
//! text before its last `:` parses as an IPv6 address and what follows is a port, that is
//! host and port; anything else is an error. So `fe80:0:0:0:21a:a0ff:fe07:32e0:5060`
//! (nine groups) is host `fe80:0:0:0:21a:a0ff:fe07:32e0`, port 5060, while
//! `2001:db8::1:5060` is the address `2001:db8::1:5060` with no port: a compressed
//! address leaves the port ambiguous, and a sender that wants a port must bracket.

use std::fmt;
use std::net::Ipv6Addr;

use super::text::{find_param, is_token, params, trim_white};
use super::ViewError;

/// What is wrong with a `host[:port]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressProblem {
    /// No host at all.
    Empty,
    /// `[` without its `]`, or something other than `:port` after the `]`.
    Bracket,
    /// A port that is not a number from 0 to 65535.
    Port,
    /// A host with characters no host has, or colons without being an IPv6 address.
    Host,
}

impl fmt::Display for AddressProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::Empty => "no host",
            Self::Bracket => "unbalanced IPv6 reference brackets",
            Self::Port => "port is not a number up to 65535",
            Self::Host => "host is neither a name, an IPv4 nor an IPv6 address",
        })
    }
}

/// What is wrong with a Via value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViaProblem {
    /// Not `SIP/2.0/<transport>`.
    Protocol,
    /// The sent-by after the protocol.
    SentBy(AddressProblem),
}

impl fmt::Display for ViaProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Protocol => formatter.write_str("no SIP/2.0/<transport> protocol"),
            Self::SentBy(problem) => write!(formatter, "sent-by: {problem}"),
        }
    }
}

/// A host and optional port, borrowed from the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPort<'a> {
    /// As written: a bracketed IPv6 reference keeps its brackets, an unbracketed IPv6
    /// address has none.
    pub host: &'a str,
    pub port: Option<u16>,
}

impl<'a> HostPort<'a> {
    /// The host without IPv6 reference brackets, ready for `IpAddr::from_str`.
    pub fn host_unbracketed(&self) -> &'a str {
        self.host
            .strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'))
            .unwrap_or(self.host)
    }

    pub fn is_ipv6(&self) -> bool {
        self.host_unbracketed().contains(':')
    }
}

/// Splits `host[:port]` by the rule in the module documentation.
pub fn split_host_port(text: &str) -> Result<HostPort<'_>, ViewError> {
    host_port(text).map_err(|problem| ViewError::BadAddress { problem })
}

pub(super) fn host_port(text: &str) -> Result<HostPort<'_>, AddressProblem> {
    let text = trim_white(text);
    if text.is_empty() {
        return Err(AddressProblem::Empty);
    }
    if text.starts_with('[') {
        let close = text.find(']').ok_or(AddressProblem::Bracket)?;
        let host = text.get(..=close).unwrap_or_default();
        let inner = host.get(1..close).unwrap_or_default();
        if inner.parse::<Ipv6Addr>().is_err() {
            return Err(AddressProblem::Host);
        }
        let tail = trim_white(text.get(close + 1..).unwrap_or_default());
        let port = match tail.strip_prefix(':') {
            Some(port) => Some(parse_port(port)?),
            None if tail.is_empty() => None,
            None => return Err(AddressProblem::Bracket),
        };
        return Ok(HostPort { host, port });
    }
    match text.bytes().filter(|byte| *byte == b':').count() {
        0 => Ok(HostPort {
            host: checked_name(text)?,
            port: None,
        }),
        1 => {
            let (host, port) = text.split_once(':').unwrap_or((text, ""));
            Ok(HostPort {
                host: checked_name(trim_white(host))?,
                port: Some(parse_port(port)?),
            })
        }
        _ => unbracketed_ipv6(text),
    }
}

/// The lenient reading of an IPv6 address written without brackets.
fn unbracketed_ipv6(text: &str) -> Result<HostPort<'_>, AddressProblem> {
    if text.parse::<Ipv6Addr>().is_ok() {
        return Ok(HostPort {
            host: text,
            port: None,
        });
    }
    let (host, port) = text.rsplit_once(':').ok_or(AddressProblem::Host)?;
    if host.parse::<Ipv6Addr>().is_err() {
        return Err(AddressProblem::Host);
    }
    Ok(HostPort {
        host,
        port: Some(parse_port(port)?),
    })
}

/// A host name or IPv4 address: no characters that delimit other parts of a message.
fn checked_name(host: &str) -> Result<&str, AddressProblem> {
    if host.is_empty() {
        return Err(AddressProblem::Empty);
    }
    let valid = host
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_'));
    if valid {
        Ok(host)
    } else {
        Err(AddressProblem::Host)
    }
}

fn parse_port(text: &str) -> Result<u16, AddressProblem> {
    let text = trim_white(text);
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(AddressProblem::Port);
    }
    text.parse().map_err(|_| AddressProblem::Port)
}

/// One Via value (RFC 3261 §20.42): `SIP/2.0/UDP host:port;branch=..;received=..;rport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViaView<'a> {
    /// The transport token as written (`UDP`, `tcp`, ...); compare case-insensitively.
    pub transport: &'a str,
    pub sent_by: HostPort<'a>,
    pub branch: Option<&'a str>,
    /// `received` (§18.2.1), as written by the previous hop.
    pub received: Option<&'a str>,
    /// `rport` (RFC 3581): `Some(None)` for the bare flag a client sends, `Some(Some(port))`
    /// once a server has filled it in.
    pub rport: Option<Option<&'a str>>,
    /// Everything from the first `;` on.
    params: &'a str,
    /// Where `params` starts in the value.
    params_offset: usize,
}

impl<'a> ViaView<'a> {
    /// Reads one Via value (one element of a Via header line). LWS is allowed around the
    /// slashes of the protocol, around the sent-by colon and around parameters (§25.1).
    pub fn parse(value: &'a str) -> Result<Self, ViaProblem> {
        let mut rest = value;
        let mut fields = [""; 2];
        for field in &mut fields {
            let (before, after) = rest.split_once('/').ok_or(ViaProblem::Protocol)?;
            *field = trim_white(before);
            rest = after.trim_start_matches([' ', '\t', '\r', '\n']);
        }
        let transport_end = rest
            .find([' ', '\t', '\r', '\n'])
            .ok_or(ViaProblem::SentBy(AddressProblem::Empty))?;
        let transport = rest.get(..transport_end).unwrap_or_default();
        if !fields[0].eq_ignore_ascii_case("SIP")
            || fields[1] != "2.0"
            || !is_token(transport.as_bytes())
        {
            return Err(ViaProblem::Protocol);
        }
        let after_transport = rest.get(transport_end..).unwrap_or_default();
        let sent_by_end = after_transport.find(';').unwrap_or(after_transport.len());
        let sent_by = host_port(after_transport.get(..sent_by_end).unwrap_or_default())
            .map_err(ViaProblem::SentBy)?;
        let params = after_transport.get(sent_by_end..).unwrap_or_default();
        let params_offset = value.len() - params.len();
        let flag = |name: &str| find_param(params, name).map(|param| param.value);
        Ok(Self {
            transport,
            sent_by,
            branch: flag("branch").flatten(),
            received: flag("received").flatten(),
            rport: flag("rport"),
            params,
            params_offset,
        })
    }

    /// Parameter `name` (case-insensitive): `Some(None)` for a flag, `None` when absent.
    pub fn param(&self, name: &str) -> Option<Option<&'a str>> {
        find_param(self.params, name).map(|param| param.value)
    }

    /// Every parameter in order, names as written.
    pub fn params(&self) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
        params(self.params).map(|param| (param.name, param.value))
    }

    /// The parameter text (from the first `;`) and where it starts in the value, for the
    /// editor.
    pub(super) fn params_text(&self) -> (&'a str, usize) {
        (self.params, self.params_offset)
    }
}

/// A SIP or SIPS URI (RFC 3261 §19.1.1): `sip:user@host:port;params?headers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UriView<'a> {
    /// `sip` or `sips` as written.
    pub scheme: &'a str,
    /// The userinfo before `@` (with any `:password`), if there is one.
    pub user: Option<&'a str>,
    pub host_port: HostPort<'a>,
    /// URI parameters from the first `;` up to `?`.
    pub params: &'a str,
    /// Header fields from `?` on (with the `?`).
    pub headers: &'a str,
}

impl<'a> UriView<'a> {
    /// Reads a SIP URI; the host may be an unbracketed IPv6 address, read by the rule in
    /// the module documentation (`sip:4321@fec0:0:0:0:216:d3ff:fe0d:22c:5060`).
    pub fn parse(uri: &'a str) -> Result<Self, ViewError> {
        let uri = trim_white(uri);
        let (scheme, rest) = uri.split_once(':').ok_or(ViewError::NotSipUri)?;
        if !scheme.eq_ignore_ascii_case("sip") && !scheme.eq_ignore_ascii_case("sips") {
            return Err(ViewError::NotSipUri);
        }
        // user and password cannot hold an unescaped '@', nor can parameters or
        // headers, so the first '@' ends the userinfo.
        let (user, host_part) = match rest.split_once('@') {
            Some((user, host_part)) => (Some(user), host_part),
            None => (None, rest),
        };
        let headers_start = host_part.find('?').unwrap_or(host_part.len());
        let (before_headers, headers) = host_part.split_at(headers_start);
        let params_start = before_headers.find(';').unwrap_or(before_headers.len());
        let (host_port_text, params) = before_headers.split_at(params_start);
        Ok(Self {
            scheme,
            user,
            host_port: split_host_port(host_port_text)?,
            params,
            headers,
        })
    }

    /// URI parameter `name` (case-insensitive): `Some(None)` for a flag such as `lr`.
    pub fn param(&self, name: &str) -> Option<Option<&'a str>> {
        find_param(self.params, name).map(|param| param.value)
    }
}
