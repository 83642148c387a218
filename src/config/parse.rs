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
    Tls,
}

impl Transport {
    /// TCP and TLS: no retransmissions, connections to keep.
    pub fn is_reliable(self) -> bool {
        self != Transport::Udp
    }

    /// The token used in Via headers.
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }

    /// The transport a Via header's protocol token names (`SIP/2.0/TLS`); UDP for
    /// anything unknown, as RFC 3261 §18 implies for a response address.
    pub fn from_via_token(token: &str) -> Transport {
        if token.eq_ignore_ascii_case("TCP") {
            Transport::Tcp
        } else if token.eq_ignore_ascii_case("TLS") {
            Transport::Tls
        } else {
            Transport::Udp
        }
    }

    /// The port a host without one is reached on (RFC 3261 §19.1.2).
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Tls => 5061,
            Transport::Udp | Transport::Tcp => 5060,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("{0:?} has no transport prefix; write udp:HOST:PORT, tcp:HOST:PORT or tls:HOST:PORT")]
    NoTransport(String),
    #[error("{0:?}: unknown transport; use udp:, tcp: or tls: (or sip:/sips: for a peer)")]
    UnknownTransport(String),
    #[error("{0:?} needs an IP address and a port, like udp:127.0.0.1:5060")]
    BadListen(String),
    #[error("{0:?} needs a host, like udp:sip.example.com:5060, tls:sip.example.com (DNS SRV) or sips:example.com (DNS NAPTR)")]
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
        "tls" => Transport::Tls,
        _ if rest.parse::<u16>().is_ok() || scheme.parse::<std::net::IpAddr>().is_ok() => {
            return Err(AddressError::NoTransport(text.to_string()))
        }
        _ => return Err(AddressError::UnknownTransport(text.to_string())),
    };
    Ok((transport, rest))
}

/// A socket to listen on: `udp:127.0.0.1:5060`, `tcp:[::1]:5060`, `tls:0.0.0.0:5061`.
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

/// How the transport toward a peer is chosen (RFC 3263 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// `udp:`, `tcp:` or `tls:` in the configuration: that transport, found by SRV when
    /// no port is given.
    Fixed(Transport),
    /// `sip:` or `sips:` without a port: the peer's NAPTR records choose among the
    /// transports the sidecar listens on (only TLS for `sips:`); without NAPTR records,
    /// SRV for each of them, then UDP (TLS for `sips:`) on the default port.
    Naptr { secure: bool },
}

/// A peer to send to: `udp:10.1.2.3:5060`, `tcp:sip.core.example:5060`, `tls:core.example`
/// (SRV `_sips._tcp`), `sips:example.com` (NAPTR, then SRV, then A/AAAA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub selection: Selection,
    /// An IP address (IPv6 with brackets) or a DNS name.
    pub host: String,
    /// Given: the host's A/AAAA records (or the IP) on this port, no SRV or NAPTR.
    pub port: Option<u16>,
}

impl Endpoint {
    /// The transport used when DNS offers no choice: the fixed one, else UDP for
    /// `sip:` and TLS for `sips:` (RFC 3263 §4.1).
    pub fn transport(&self) -> Transport {
        match self.selection {
            Selection::Fixed(transport) => transport,
            Selection::Naptr { secure: true } => Transport::Tls,
            Selection::Naptr { secure: false } => Transport::Udp,
        }
    }

    /// Whether requests to this peer may go over TLS from a side listening on
    /// `listeners`: a `tls:`/`sips:` peer, or a `sip:` one whose NAPTR records may pick
    /// TLS when the side has a TLS listener.
    pub fn may_use_tls(&self, listeners: &[Listen]) -> bool {
        match self.selection {
            Selection::Fixed(transport) => transport == Transport::Tls,
            Selection::Naptr { secure: true } => true,
            Selection::Naptr { secure: false } => listeners
                .iter()
                .any(|listen| listen.transport == Transport::Tls),
        }
    }

    /// The host without IPv6 brackets, lower-cased.
    pub fn host_name(&self) -> String {
        crate::sip::via::strip_brackets(&self.host).to_ascii_lowercase()
    }

    /// The host when it is an IP address.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        crate::sip::via::strip_brackets(&self.host).parse().ok()
    }
}

impl FromStr for Endpoint {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let bad = || AddressError::BadEndpoint(trimmed.to_string());
        let lower = trimmed.to_ascii_lowercase();
        let (selection, rest) = if let Some(rest) = lower
            .strip_prefix("sips:")
            .map(|_| &trimmed["sips:".len()..])
        {
            (Selection::Naptr { secure: true }, rest)
        } else if let Some(rest) = lower.strip_prefix("sip:").map(|_| &trimmed["sip:".len()..]) {
            (Selection::Naptr { secure: false }, rest)
        } else {
            let (transport, rest) = split_transport(trimmed)?;
            (Selection::Fixed(transport), rest)
        };
        let (host, port) = split_host_port(rest).map_err(|_| bad())?;
        if host.is_empty()
            || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@' || c == ';')
        {
            return Err(bad());
        }
        // A port names one transport already: `sip:host:port` is UDP, `sips:host:port` TLS.
        let selection = match (selection, port) {
            (Selection::Naptr { secure }, Some(_)) => Selection::Fixed(if secure {
                Transport::Tls
            } else {
                Transport::Udp
            }),
            (selection, _) => selection,
        };
        // An IP address needs no DNS: without a port it takes the transport's default.
        let is_ip = crate::sip::via::strip_brackets(host)
            .parse::<std::net::IpAddr>()
            .is_ok();
        let mut endpoint = Self {
            selection,
            host: host.to_string(),
            port,
        };
        if is_ip && endpoint.port.is_none() {
            endpoint.selection = Selection::Fixed(endpoint.transport());
            endpoint.port = Some(endpoint.transport().default_port());
        }
        Ok(endpoint)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.selection {
            Selection::Fixed(transport) => write!(f, "{transport}:{}", self.host)?,
            Selection::Naptr { secure: true } => write!(f, "sips:{}", self.host)?,
            Selection::Naptr { secure: false } => write!(f, "sip:{}", self.host)?,
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
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
            "tls:127.0.0.1:5061".parse::<Listen>().unwrap().transport,
            Transport::Tls
        );
        assert_eq!(
            "127.0.0.1:5060".parse::<Listen>(),
            Err(AddressError::NoTransport("127.0.0.1:5060".into()))
        );
        assert!(matches!(
            "udp:localhost:5060".parse::<Listen>(),
            Err(AddressError::BadListen(_))
        ));
        assert!(matches!(
            "sctp:127.0.0.1:5061".parse::<Listen>(),
            Err(AddressError::UnknownTransport(_))
        ));
    }

    #[test]
    fn endpoints_take_names_ports_and_dns_forms() {
        let endpoint: Endpoint = "tcp:sip.core.example:5060".parse().unwrap();
        assert_eq!(endpoint.host, "sip.core.example");
        assert_eq!(endpoint.port, Some(5060));
        assert_eq!(endpoint.selection, Selection::Fixed(Transport::Tcp));
        let v6: Endpoint = "udp:[2001:db8::1]:5060".parse().unwrap();
        assert_eq!(v6.host, "[2001:db8::1]");
        assert_eq!(v6.ip(), Some("2001:db8::1".parse().unwrap()));
        // No port: SRV for the transport given.
        let srv: Endpoint = "tls:Core.Example".parse().unwrap();
        assert_eq!(
            (srv.selection, srv.port),
            (Selection::Fixed(Transport::Tls), None)
        );
        assert_eq!(srv.host_name(), "core.example");
        // sip:/sips: without a port: NAPTR; with one, UDP or TLS on it.
        let naptr: Endpoint = "sips:example.com".parse().unwrap();
        assert_eq!(naptr.selection, Selection::Naptr { secure: true });
        assert_eq!(naptr.transport(), Transport::Tls);
        let fixed: Endpoint = "sip:example.com:5070".parse().unwrap();
        assert_eq!(fixed.selection, Selection::Fixed(Transport::Udp));
        // An IP address without a port takes the transport's default port.
        let ip: Endpoint = "tls:192.0.2.1".parse().unwrap();
        assert_eq!(ip.port, Some(5061));
        assert_eq!(ip.to_string(), "tls:192.0.2.1:5061");
        for bad in [
            "udp:a b:5060",
            "udp:",
            "sip:",
            "udp:host;x:5060",
            "udp:bob@host:5060",
        ] {
            assert!(
                matches!(bad.parse::<Endpoint>(), Err(AddressError::BadEndpoint(_))),
                "{bad:?} should be rejected"
            );
        }
    }
}
