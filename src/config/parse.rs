//! Value syntaxes of the configuration: transport-prefixed addresses and durations with
//! units.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::sip::via::split_host_port;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn is_reliable(self) -> bool {
        self == Transport::Tcp
    }

    /// The token used in Via headers and `transport=` URI parameters.
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("{0:?} has no transport prefix; write udp:HOST:PORT or tcp:HOST:PORT")]
    NoTransport(String),
    #[error("{0:?}: transport tls is not supported yet; use udp: or tcp:")]
    TlsUnsupported(String),
    #[error("{0:?}: unknown transport; use udp: or tcp:")]
    UnknownTransport(String),
    #[error("{0:?} needs an IP address and a port, like udp:127.0.0.1:5060")]
    BadListen(String),
    #[error("{0:?} needs a host and a port, like udp:sip.example.com:5060")]
    BadEndpoint(String),
}

fn split_transport(text: &str) -> Result<(Transport, &str), AddressError> {
    let text = text.trim();
    let (scheme, rest) = text
        .split_once(':')
        .ok_or_else(|| AddressError::NoTransport(text.to_string()))?;
    let transport = match scheme.to_ascii_lowercase().as_str() {
        "udp" => Transport::Udp,
        "tcp" => Transport::Tcp,
        "tls" => return Err(AddressError::TlsUnsupported(text.to_string())),
        _ if rest.parse::<u16>().is_ok() || scheme.parse::<std::net::IpAddr>().is_ok() => {
            return Err(AddressError::NoTransport(text.to_string()))
        }
        _ => return Err(AddressError::UnknownTransport(text.to_string())),
    };
    Ok((transport, rest))
}

/// A socket to listen on: `udp:127.0.0.1:5060`, `tcp:[::1]:5060`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    pub transport: Transport,
    pub addr: SocketAddr,
}

impl FromStr for Listen {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (transport, rest) = split_transport(text)?;
        let addr = rest
            .parse::<SocketAddr>()
            .map_err(|_| AddressError::BadListen(text.trim().to_string()))?;
        Ok(Self { transport, addr })
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.transport, self.addr)
    }
}

/// A peer to send to: `udp:10.1.2.3:5060`, `tcp:sip.core.example:5060`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub transport: Transport,
    /// An IP address (IPv6 with brackets) or a DNS name.
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// `host:port` for `tokio::net::lookup_host`.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl FromStr for Endpoint {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (transport, rest) = split_transport(text)?;
        let bad = || AddressError::BadEndpoint(text.trim().to_string());
        let (host, port) = split_host_port(rest).map_err(|_| bad())?;
        let port = port.ok_or_else(bad)?;
        if host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
            return Err(bad());
        }
        Ok(Self {
            transport,
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.transport, self.host, self.port)
    }
}

/// A duration with its unit: `250ms`, `15s`, `5m`, `1h`, or a sum such as `1m30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let original = text;
    let text = text.trim();
    let invalid = || {
        format!("{original:?} is not a duration; write it with a unit, like \"500ms\", \"15s\" or \"5m\"")
    };
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(invalid)?;
        if digits == 0 {
            return Err(invalid());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            _ => return Err(invalid()),
        };
        total = total.saturating_add(unit);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration(" 1m30s "), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "15", "s", "1.5s", "10 s", "-1s", "3d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn listen_addresses() {
        let listen: Listen = "udp:127.0.0.1:5060".parse().unwrap();
        assert_eq!(listen.transport, Transport::Udp);
        assert_eq!(listen.addr.port(), 5060);
        assert!("tcp:[::1]:5070".parse::<Listen>().is_ok());
        assert_eq!(
            "127.0.0.1:5060".parse::<Listen>(),
            Err(AddressError::NoTransport("127.0.0.1:5060".into()))
        );
        assert!(matches!(
            "udp:localhost:5060".parse::<Listen>(),
            Err(AddressError::BadListen(_))
        ));
        assert!(matches!(
            "tls:127.0.0.1:5061".parse::<Listen>(),
            Err(AddressError::TlsUnsupported(_))
        ));
        assert!(matches!(
            "sctp:127.0.0.1:5061".parse::<Listen>(),
            Err(AddressError::UnknownTransport(_))
        ));
    }

    #[test]
    fn endpoints_take_names_and_need_ports() {
        let endpoint: Endpoint = "tcp:sip.core.example:5060".parse().unwrap();
        assert_eq!(endpoint.host, "sip.core.example");
        assert_eq!(endpoint.host_port(), "sip.core.example:5060");
        let v6: Endpoint = "udp:[2001:db8::1]:5060".parse().unwrap();
        assert_eq!(v6.host, "[2001:db8::1]");
        assert!(matches!(
            "udp:sip.core.example".parse::<Endpoint>(),
            Err(AddressError::BadEndpoint(_))
        ));
        assert!(matches!(
            "udp:a b:5060".parse::<Endpoint>(),
            Err(AddressError::BadEndpoint(_))
        ));
    }
}
