//! One Via header value (RFC 3261 §20.42, §18.2), with `received` and `rport`
//! (RFC 3581).
//!
//! `rsip` keeps Via values as strings and its typed parse drops unknown flags such as a
//! bare `rport`, so the proxy parses and writes Via values itself: the exact parameters
//! matter for matching transactions and for routing responses back.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The magic cookie that marks an RFC 3261 branch (§8.1.1.7).
pub const BRANCH_COOKIE: &str = "z9hG4bK";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ViaError {
    #[error("Via has no SIP/2.0/<transport> protocol: {0:?}")]
    Protocol(String),
    #[error("Via has no sent-by host: {0:?}")]
    SentBy(String),
    #[error("Via sent-by port is not a number: {0:?}")]
    Port(String),
}

/// A parsed Via value: `SIP/2.0/UDP host:port;branch=z9hG4bK..;rport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// Upper-case transport token (`UDP`, `TCP`, `TLS`, ...).
    pub transport: String,
    /// Sent-by host as written, IPv6 references with their brackets.
    pub host: String,
    pub port: Option<u16>,
    /// Parameters in order; names as written, `None` for a flag.
    pub params: Vec<(String, Option<String>)>,
}

impl Via {
    pub fn new(transport: &str, host: &str, port: u16, branch: &str) -> Self {
        Self {
            transport: transport.to_ascii_uppercase(),
            host: host.to_string(),
            port: Some(port),
            params: vec![("branch".to_string(), Some(branch.to_string()))],
        }
    }

    pub fn parse(value: &str) -> Result<Self, ViaError> {
        let value = value.trim();
        let protocol_error = || ViaError::Protocol(value.to_string());
        // sent-protocol: "SIP" SLASH "2.0" SLASH transport, LWS allowed around the slashes.
        let mut rest = value;
        let mut fields = Vec::with_capacity(3);
        for _ in 0..2 {
            let slash = rest.find('/').ok_or_else(protocol_error)?;
            fields.push(rest[..slash].trim());
            rest = rest[slash + 1..].trim_start();
        }
        let transport_end = rest
            .find(|c: char| c.is_whitespace())
            .ok_or_else(|| ViaError::SentBy(value.to_string()))?;
        let transport = &rest[..transport_end];
        if !fields[0].eq_ignore_ascii_case("SIP") || fields[1] != "2.0" || transport.is_empty() {
            return Err(protocol_error());
        }
        let rest = rest[transport_end..].trim_start();
        let (sent_by, params) = match rest.find(';') {
            Some(semicolon) => (rest[..semicolon].trim(), &rest[semicolon..]),
            None => (rest.trim(), ""),
        };
        let (host, port) = split_host_port(sent_by).map_err(|error| match error {
            HostPortError::Empty => ViaError::SentBy(value.to_string()),
            HostPortError::Port => ViaError::Port(value.to_string()),
        })?;
        let params = params
            .split(';')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| match part.split_once('=') {
                Some((name, value)) => (name.trim().to_string(), Some(value.trim().to_string())),
                None => (part.to_string(), None),
            })
            .collect();
        Ok(Self {
            transport: transport.to_ascii_uppercase(),
            host: host.to_string(),
            port,
            params,
        })
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_deref())
    }

    pub fn set_param(&mut self, name: &str, value: Option<String>) {
        match self
            .params
            .iter_mut()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
        {
            Some(slot) => slot.1 = value,
            None => self.params.push((name.to_string(), value)),
        }
    }

    pub fn branch(&self) -> Option<&str> {
        self.param("branch").flatten()
    }

    /// Sent-by as `host:port` with the transport's default port filled in, the form used
    /// in transaction keys (RFC 3261 §17.2.3).
    pub fn sent_by(&self) -> String {
        format!(
            "{}:{}",
            self.host,
            self.port.unwrap_or_else(|| default_port(&self.transport))
        )
    }

    /// RFC 3261 §18.2.1 and RFC 3581 §4: a server receiving a request notes where it came
    /// from. `received` is set when the sent-by host differs from the source address, and
    /// always when the client asked for `rport`; an empty `rport` gets the source port.
    /// Returns whether the value changed (so an unchanged Via need not be rewritten).
    pub fn note_source(&mut self, source: SocketAddr) -> bool {
        let before = self.params.len();
        // Whatever the sender wrote into `received` is not to be trusted.
        self.params
            .retain(|(name, _)| !name.eq_ignore_ascii_case("received"));
        let mut changed = self.params.len() != before;
        let wants_rport = self.param("rport").is_some();
        let host_is_source = strip_brackets(&self.host)
            .parse::<IpAddr>()
            .map(|ip| ip == source.ip())
            .unwrap_or(false);
        if wants_rport || !host_is_source {
            self.set_param("received", Some(source.ip().to_string()));
            changed = true;
        }
        if wants_rport {
            self.set_param("rport", Some(source.port().to_string()));
            changed = true;
        }
        changed
    }

    /// Where to open a new connection for a response over a reliable transport when the
    /// request's connection is gone (§18.2.2): `received` (else the host) and the sent-by
    /// port.
    pub fn reconnect_address(&self) -> Option<SocketAddr> {
        let host = self
            .param("received")
            .flatten()
            .unwrap_or(strip_brackets(&self.host));
        let ip: IpAddr = strip_brackets(host).parse().ok()?;
        Some(SocketAddr::new(
            ip,
            self.port.unwrap_or_else(|| default_port(&self.transport)),
        ))
    }

    /// Where a response to this Via goes over an unreliable transport (RFC 3261 §18.2.2,
    /// RFC 3581 §4): `received` (else the sent-by host) and `rport` (else the sent-by port).
    /// `None` when the host is a name that would need DNS.
    pub fn response_address(&self) -> Option<SocketAddr> {
        let host = match self.param("received").flatten() {
            Some(received) => received,
            None => strip_brackets(&self.host),
        };
        let ip: IpAddr = strip_brackets(host).parse().ok()?;
        let port = self
            .param("rport")
            .flatten()
            .and_then(|port| port.parse().ok())
            .or(self.port)
            .unwrap_or_else(|| default_port(&self.transport));
        Some(SocketAddr::new(ip, port))
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Pieces written as they are: no format string to interpret per parameter.
        f.write_str("SIP/2.0/")?;
        f.write_str(&self.transport)?;
        f.write_str(" ")?;
        f.write_str(&self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        for (name, value) in &self.params {
            f.write_str(";")?;
            f.write_str(name)?;
            if let Some(value) = value {
                f.write_str("=")?;
                f.write_str(value)?;
            }
        }
        Ok(())
    }
}

/// 5061 for TLS, 5060 otherwise (RFC 3261 §19.1.2).
pub fn default_port(transport: &str) -> u16 {
    if transport.eq_ignore_ascii_case("TLS") {
        5061
    } else {
        5060
    }
}

pub fn strip_brackets(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host)
}

#[derive(Debug, PartialEq, Eq)]
pub enum HostPortError {
    Empty,
    Port,
}

/// Splits `host[:port]`, where an IPv6 host is bracketed (`[::1]:5060`).
pub fn split_host_port(value: &str) -> Result<(&str, Option<u16>), HostPortError> {
    let value = value.trim();
    let (host, port) = if value.starts_with('[') {
        match value.find(']') {
            Some(close) => {
                let tail = &value[close + 1..];
                let port = tail.strip_prefix(':');
                if !tail.is_empty() && port.is_none() {
                    return Err(HostPortError::Port);
                }
                (&value[..=close], port)
            }
            None => return Err(HostPortError::Empty),
        }
    } else {
        match value.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(HostPortError::Empty);
    }
    let port = match port {
        Some(port) => Some(
            port.trim()
                .parse::<u16>()
                .map_err(|_| HostPortError::Port)?,
        ),
        None => None,
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_sent_by_and_params() {
        let via = Via::parse("SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bK776;rport").unwrap();
        assert_eq!(via.transport, "UDP");
        assert_eq!(via.host, "10.0.0.1");
        assert_eq!(via.port, Some(5062));
        assert_eq!(via.branch(), Some("z9hG4bK776"));
        assert_eq!(via.param("rport"), Some(None));
        assert_eq!(
            via.to_string(),
            "SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bK776;rport"
        );
    }

    #[test]
    fn tolerates_lws_and_lowercase_and_ipv6() {
        let via = Via::parse("SIP / 2.0 / tcp  [2001:db8::9]:5070 ; branch = z9hG4bKx").unwrap();
        assert_eq!(via.transport, "TCP");
        assert_eq!(via.host, "[2001:db8::9]");
        assert_eq!(via.port, Some(5070));
        assert_eq!(via.branch(), Some("z9hG4bKx"));
        let no_port = Via::parse("SIP/2.0/TLS host.example;branch=z9hG4bKy").unwrap();
        assert_eq!(no_port.sent_by(), "host.example:5061");
    }

    #[test]
    fn rejects_malformed_values() {
        assert!(matches!(
            Via::parse("HTTP/1.1/UDP a"),
            Err(ViaError::Protocol(_))
        ));
        assert!(matches!(
            Via::parse("SIP/2.0/UDP"),
            Err(ViaError::SentBy(_))
        ));
        assert!(matches!(
            Via::parse("SIP/2.0/UDP a:x;branch=1"),
            Err(ViaError::Port(_))
        ));
        assert!(matches!(
            Via::parse("SIP/2.0/UDP [::1;branch=1"),
            Err(ViaError::SentBy(_))
        ));
        assert!(matches!(Via::parse(""), Err(ViaError::Protocol(_))));
    }

    #[test]
    fn rport_request_gets_received_and_port_filled_in() {
        // RFC 3581 §4: both received and rport are set when rport was asked for,
        // even when the host matches.
        let mut via = Via::parse("SIP/2.0/UDP 10.0.0.1:5060;rport;branch=z9hG4bK1").unwrap();
        via.note_source(addr("10.0.0.1:40000"));
        assert_eq!(via.param("received"), Some(Some("10.0.0.1")));
        assert_eq!(via.param("rport"), Some(Some("40000")));
        assert_eq!(via.response_address(), Some(addr("10.0.0.1:40000")));
    }

    #[test]
    fn received_only_when_host_differs_without_rport() {
        let mut same = Via::parse("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1").unwrap();
        same.note_source(addr("10.0.0.1:40000"));
        assert_eq!(same.param("received"), None);
        assert_eq!(same.response_address(), Some(addr("10.0.0.1:5060")));

        let mut natted = Via::parse("SIP/2.0/UDP pbx.example:5070;branch=z9hG4bK1").unwrap();
        natted.note_source(addr("192.0.2.7:40000"));
        assert_eq!(natted.param("received"), Some(Some("192.0.2.7")));
        // Without rport the response goes to the sent-by port (RFC 3261 §18.2.2).
        assert_eq!(natted.response_address(), Some(addr("192.0.2.7:5070")));
    }

    #[test]
    fn received_written_by_the_sender_is_replaced_or_dropped() {
        // Host equal to the source: a forged received must not redirect responses.
        let mut forged =
            Via::parse("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;received=192.0.2.66").unwrap();
        forged.note_source(addr("10.0.0.1:5060"));
        assert_eq!(forged.param("received"), None);
        assert_eq!(forged.response_address(), Some(addr("10.0.0.1:5060")));
        let mut other =
            Via::parse("SIP/2.0/TCP pbx:5070;branch=z9hG4bK1;received=192.0.2.66").unwrap();
        other.note_source(addr("10.0.0.2:40000"));
        assert_eq!(other.param("received"), Some(Some("10.0.0.2")));
        assert_eq!(other.reconnect_address(), Some(addr("10.0.0.2:5070")));
    }

    #[test]
    fn ipv6_source_is_recorded_unbracketed() {
        let mut via = Via::parse("SIP/2.0/UDP [::1]:5060;rport;branch=z9hG4bK1").unwrap();
        via.note_source(addr("[::1]:6000"));
        assert_eq!(via.response_address(), Some(addr("[::1]:6000")));
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("a.example:5"), Ok(("a.example", Some(5))));
        assert_eq!(split_host_port("a.example"), Ok(("a.example", None)));
        assert_eq!(split_host_port("[::1]"), Ok(("[::1]", None)));
        assert_eq!(split_host_port("[::1]x"), Err(HostPortError::Port));
        assert_eq!(split_host_port(":5"), Err(HostPortError::Empty));
    }
}
