//! Where a request goes: trunk selection for initial requests, loose routing (RFC 3261
//! §16.4, §16.6 step 6), and the next hop of a SIP URI. Pure: the trunks' peers are
//! resolved elsewhere ([`crate::dns`]) and read here as they are now; randomness and
//! the hosts to avoid are arguments.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::Transport;
use crate::dns::{Candidate, Destinations};
use crate::sip::via::strip_brackets;
use crate::sip::view::UriView;
use crate::transport::{canonical, AllowList, Side};

/// A trunk with its peers.
#[derive(Debug, Clone)]
pub struct RoutedTrunk {
    /// Position in the configuration; written into our Record-Route so in-dialog requests
    /// find their trunk again.
    pub index: usize,
    pub name: Arc<str>,
    pub auth: crate::config::AuthMode,
    /// With `digest`, the only realm answered.
    pub digest_realm: Option<String>,
    /// The trunk's Digest state, shared with its registration.
    pub digest: crate::credentials::refusal::TrunkDigest,
    pub credentials: Option<crate::credentials::CredentialManager>,
    pub sources: Vec<IpNet>,
    pub domain: Option<String>,
    pub port: Option<u16>,
    pub edge: Arc<Destinations>,
    pub core: Arc<Destinations>,
    /// Networks the core sends from besides what `core` resolves to.
    pub core_sources: Vec<IpNet>,
}

/// A transport and address to send to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub transport: Transport,
    pub addr: SocketAddr,
}

impl From<Candidate> for Hop {
    fn from(candidate: Candidate) -> Self {
        Self {
            transport: candidate.transport,
            addr: candidate.addr,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("no trunk matches this request")]
    NoTrunk,
    #[error("next hop {host:?} is not an IP address or a configured host name")]
    Unresolvable { host: String },
    #[error("{peer} has not resolved to any address yet")]
    NotResolved { peer: String },
    #[error("next hop {addr} is outside the {side} side's allow list")]
    NotAllowed { addr: SocketAddr, side: Side },
    #[error("next hop {addr} is this proxy")]
    Loop { addr: SocketAddr },
    #[error("unsupported URI scheme {scheme:?}")]
    Scheme { scheme: String },
    #[error("unsupported transport {transport:?}")]
    Transport { transport: String },
}

impl RouteError {
    /// The response code that reports this error to the request's sender.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NoTrunk | RouteError::NotAllowed { .. } => 403,
            RouteError::Unresolvable { .. } => 502,
            RouteError::NotResolved { .. } => 503,
            RouteError::Loop { .. } => 482,
            RouteError::Scheme { .. } => 416,
            RouteError::Transport { .. } => 502,
        }
    }
}

/// A host and port this proxy answers on, as it would appear in a URI.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OwnAddress {
    host: String,
    port: u16,
}

#[derive(Debug)]
pub struct Router {
    trunks: Vec<RoutedTrunk>,
    own: Vec<OwnAddress>,
    own_sockets: Vec<SocketAddr>,
    /// The configured host names of the trunks' peers, for URIs that name them.
    names: HashMap<String, Arc<Destinations>>,
    edge_allow: Arc<AllowList>,
    core_allow: Arc<AllowList>,
}

impl Router {
    /// `own` lists (advertised host, port) of every listener.
    pub fn new(
        trunks: Vec<RoutedTrunk>,
        own: Vec<(String, SocketAddr)>,
        edge_allow: Arc<AllowList>,
        core_allow: Arc<AllowList>,
    ) -> Self {
        let own_sockets = own.iter().map(|(_, socket)| *socket).collect();
        let own = own
            .into_iter()
            .flat_map(|(host, socket)| {
                [
                    OwnAddress {
                        host: strip_brackets(&host).to_ascii_lowercase(),
                        port: socket.port(),
                    },
                    OwnAddress {
                        host: socket.ip().to_string(),
                        port: socket.port(),
                    },
                ]
            })
            .collect();
        let names = trunks
            .iter()
            .flat_map(|trunk| [&trunk.edge, &trunk.core])
            .filter(|destinations| !destinations.is_static())
            .map(|destinations| (destinations.endpoint.host_name(), destinations.clone()))
            .collect();
        Self {
            trunks,
            own,
            own_sockets,
            names,
            edge_allow,
            core_allow,
        }
    }

    pub fn trunk(&self, index: usize) -> Option<&RoutedTrunk> {
        self.trunks.get(index)
    }

    pub fn trunks(&self) -> &[RoutedTrunk] {
        &self.trunks
    }

    pub fn allow(&self, side: Side) -> &AllowList {
        match side {
            Side::Edge => &self.edge_allow,
            Side::Core => &self.core_allow,
        }
    }

    /// The first trunk whose criteria all hold for a request from the Edge.
    pub fn edge_trunk(
        &self,
        source: IpAddr,
        local_port: u16,
        request_host: &str,
    ) -> Option<&RoutedTrunk> {
        let source = canonical(source);
        self.trunks.iter().find(|trunk| {
            (trunk.sources.is_empty() || trunk.sources.iter().any(|net| net.contains(&source)))
                && trunk
                    .domain
                    .as_deref()
                    .is_none_or(|domain| domain.eq_ignore_ascii_case(strip_brackets(request_host)))
                && trunk.port.is_none_or(|port| port == local_port)
        })
    }

    /// Whether an Edge at `source` may use `trunk` (its match sources, or its own edge
    /// address; a trunk without sources serves every Edge).
    pub fn edge_may_use(&self, trunk: &RoutedTrunk, source: IpAddr) -> bool {
        let source = canonical(source);
        trunk.sources.is_empty()
            || trunk.sources.iter().any(|net| net.contains(&source))
            || trunk.edge.contains_ip(source)
    }

    /// The trunk a request from the core belongs to: the one whose core address sent it
    /// (address and port first, then address alone), else the only trunk there is.
    pub fn core_trunk(&self, source: SocketAddr, transport: Transport) -> Option<&RoutedTrunk> {
        let exact = self.trunks.iter().find(|trunk| trunk.core.contains(source));
        exact
            .or_else(|| {
                self.trunks
                    .iter()
                    .find(|trunk| self.is_core_sender(trunk, source, transport))
            })
            .or_else(|| (self.trunks.len() == 1).then(|| &self.trunks[0]))
    }

    /// Whether `hop` is one of `trunk`'s core hosts as resolved now: only there may its
    /// credentials go (DESIGN.md item 2). The transport does not matter, the address does.
    pub fn is_core_of(&self, trunk: &RoutedTrunk, hop: Hop) -> bool {
        trunk.core.contains(hop.addr)
    }

    /// Whether a message from `source` over `transport` comes from `trunk`'s core: an
    /// address its core resolves to, or one of its `core_sources`. A core sends from
    /// another port than it listens on over TCP always, and may over UDP, so the port is
    /// checked only where it tells trunks apart: over UDP when another trunk's core
    /// shares the address on another port (over TCP such trunks cannot be told apart by
    /// the sender).
    pub fn is_core_sender(
        &self,
        trunk: &RoutedTrunk,
        source: SocketAddr,
        transport: Transport,
    ) -> bool {
        let ip = canonical(source.ip());
        let ports = trunk.core.current().ports_at(ip);
        if ports.is_empty() {
            return trunk.core_sources.iter().any(|net| net.contains(&ip));
        }
        // Another trunk's core on this address with other ports: only the port tells.
        let shared = self.trunks.iter().any(|other| {
            let theirs = other.core.current().ports_at(ip);
            other.index != trunk.index && !theirs.is_empty() && theirs != ports
        });
        !shared || transport.is_reliable() || ports.contains(&source.port())
    }

    /// The core host a request of `trunk` goes to next, having tried `tried`: RFC 3263
    /// order, hosts `avoided` names last, `random` for the weighted choice.
    pub fn core_hop(
        &self,
        trunk: &RoutedTrunk,
        tried: &[SocketAddr],
        avoided: impl Fn(SocketAddr) -> bool,
        random: u32,
    ) -> Result<Hop, RouteError> {
        trunk
            .core
            .current()
            .pick(tried, avoided, random)
            .map(Hop::from)
            .ok_or_else(|| RouteError::NotResolved {
                peer: trunk.core.endpoint.to_string(),
            })
    }

    /// The Edge a request from the core for `trunk` goes to.
    pub fn edge_hop(&self, trunk: &RoutedTrunk, random: u32) -> Result<Hop, RouteError> {
        trunk
            .edge
            .current()
            .pick(&[], |_| false, random)
            .map(Hop::from)
            .ok_or_else(|| RouteError::NotResolved {
                peer: trunk.edge.endpoint.to_string(),
            })
    }

    /// How many core hosts `trunk` has now.
    pub fn core_hosts(&self, trunk: &RoutedTrunk) -> usize {
        trunk.core.current().candidates.len()
    }

    /// Whether a URI names this proxy (so a Route entry with it is ours to remove).
    pub fn is_own(&self, uri: &UriView) -> bool {
        let host = uri.host_port.host_unbracketed();
        let port = uri
            .host_port
            .port
            .unwrap_or(if is_secure(uri) { 5061 } else { 5060 });
        self.own
            .iter()
            .any(|own| own.port == port && own.host.eq_ignore_ascii_case(host))
    }

    /// Whether `host` and `port` (as in a Via sent-by) name this proxy.
    pub fn is_own_host(&self, host: &str, port: Option<u16>) -> bool {
        let host = strip_brackets(host).to_ascii_lowercase();
        let port = port.unwrap_or(5060);
        self.own
            .iter()
            .any(|own| own.port == port && own.host == host)
    }

    /// The next hop for a URI (RFC 3263 without DNS of its own: the host must be an IP
    /// address or a host name from the configuration, taken as it resolves now),
    /// checked against the allow list of `side`. `sips:` and `transport=tls` mean TLS.
    pub fn hop_for_uri(&self, uri: &UriView, side: Side) -> Result<Hop, RouteError> {
        let secure = is_secure(uri);
        let named_transport = uri.param("transport").flatten();
        let transport = match named_transport {
            _ if secure => Transport::Tls,
            None => Transport::Udp,
            Some(name) if name.eq_ignore_ascii_case("udp") => Transport::Udp,
            Some(name) if name.eq_ignore_ascii_case("tcp") => Transport::Tcp,
            Some(name) if name.eq_ignore_ascii_case("tls") => Transport::Tls,
            Some(other) => {
                return Err(RouteError::Transport {
                    transport: other.to_string(),
                })
            }
        };
        let host = uri.host_port.host_unbracketed();
        let explicit_port = uri.host_port.port;
        let addr = match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, explicit_port.unwrap_or(transport.default_port())),
            Err(_) => {
                // A configured name: as it resolves now; without a port in the URI, the
                // port (and, unless the URI names one, the transport) DNS gave.
                let host = host.to_ascii_lowercase();
                let first = self
                    .names
                    .get(&host)
                    .ok_or_else(|| RouteError::Unresolvable { host: host.clone() })?
                    .first()
                    .ok_or_else(|| RouteError::NotResolved { peer: host.clone() })?;
                if explicit_port.is_none() && named_transport.is_none() && !secure {
                    return self.checked(Hop::from(first), side);
                }
                SocketAddr::new(first.addr.ip(), explicit_port.unwrap_or(first.addr.port()))
            }
        };
        self.checked(Hop { transport, addr }, side)
    }

    /// Refuses a hop that is this proxy or outside the allow list of `side`.
    pub fn checked(&self, hop: Hop, side: Side) -> Result<Hop, RouteError> {
        if self.own_sockets.contains(&hop.addr) {
            return Err(RouteError::Loop { addr: hop.addr });
        }
        if !self.allow(side).allows(hop.addr.ip()) {
            return Err(RouteError::NotAllowed {
                addr: hop.addr,
                side,
            });
        }
        Ok(hop)
    }
}

fn is_secure(uri: &UriView) -> bool {
    uri.scheme.eq_ignore_ascii_case("sips")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(text: &str) -> Hop {
        Hop {
            transport: Transport::Udp,
            addr: text.parse().unwrap(),
        }
    }

    /// Destinations of a fixed `udp:` address.
    fn dest(addr: &str) -> Arc<Destinations> {
        Arc::new(Destinations::new(format!("udp:{addr}").parse().unwrap()))
    }

    fn routed(index: usize, name: &str, core: Arc<Destinations>) -> RoutedTrunk {
        RoutedTrunk {
            index,
            name: name.into(),
            auth: crate::config::AuthMode::None,
            digest_realm: None,
            digest: crate::credentials::refusal::TrunkDigest::new(None),
            credentials: None,
            sources: vec![],
            domain: None,
            port: None,
            edge: dest("10.1.0.1:5060"),
            core,
            core_sources: vec![],
        }
    }

    fn router() -> Router {
        let trunk =
            |index: usize, name: &str, sources: &[&str], domain: Option<&str>, core: &str| {
                RoutedTrunk {
                    sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
                    domain: domain.map(str::to_string),
                    ..routed(index, name, dest(core))
                }
            };
        // A third trunk whose core is a name, resolved to two hosts.
        let named = Arc::new(Destinations::new("udp:core.example".parse().unwrap()));
        named.set(crate::dns::Resolved::new(vec![
            Candidate {
                transport: Transport::Udp,
                addr: "198.51.100.9:5060".parse().unwrap(),
                rank: 0,
                weight: 10,
                target: 1,
            },
            Candidate {
                transport: Transport::Udp,
                addr: "198.51.100.10:5070".parse().unwrap(),
                rank: 0,
                weight: 0,
                target: 2,
            },
        ]));
        let allow = |nets: &[&str]| {
            Arc::new(AllowList::new(
                nets.iter().map(|n| n.parse().unwrap()).collect(),
            ))
        };
        Router::new(
            vec![
                trunk(0, "a", &["10.1.0.0/16"], None, "198.51.100.1:5060"),
                trunk(1, "b", &[], Some("b.example"), "198.51.100.2:5060"),
                RoutedTrunk {
                    domain: Some("named.example".into()),
                    core_sources: vec!["203.0.113.0/24".parse().unwrap()],
                    ..routed(2, "c", named)
                },
            ],
            vec![
                ("proxy.example".into(), "192.0.2.1:5060".parse().unwrap()),
                ("192.0.2.1".into(), "192.0.2.1:5070".parse().unwrap()),
            ],
            allow(&["10.0.0.0/8"]),
            allow(&["198.51.100.0/24"]),
        )
    }

    fn uri(text: &str) -> UriView<'_> {
        UriView::parse(text).unwrap()
    }

    #[test]
    fn edge_trunk_by_source_then_domain() {
        let router = router();
        assert_eq!(
            router
                .edge_trunk("10.1.2.3".parse().unwrap(), 5060, "x")
                .unwrap()
                .name
                .as_ref(),
            "a"
        );
        assert_eq!(
            router
                .edge_trunk("10.2.2.3".parse().unwrap(), 5060, "B.example")
                .unwrap()
                .name
                .as_ref(),
            "b"
        );
        assert!(router
            .edge_trunk("10.2.2.3".parse().unwrap(), 5060, "c.example")
            .is_none());
        // IPv4-mapped sources match IPv4 networks.
        assert!(router
            .edge_trunk("::ffff:10.1.2.3".parse().unwrap(), 5060, "x")
            .is_some());
    }

    #[test]
    fn core_trunk_by_core_address() {
        let router = router();
        assert_eq!(
            router
                .core_trunk("198.51.100.2:5060".parse().unwrap(), Transport::Udp)
                .unwrap()
                .name
                .as_ref(),
            "b"
        );
        assert!(router
            .core_trunk("198.51.100.7:5060".parse().unwrap(), Transport::Udp)
            .is_none());
    }

    #[test]
    fn a_trunks_core_is_its_address_and_port_whatever_the_transport() {
        let router = router();
        let trunk = router.trunk(0).unwrap().clone();
        assert!(router.is_core_of(&trunk, hop("198.51.100.1:5060")));
        let tcp = Hop {
            transport: Transport::Tcp,
            ..hop("198.51.100.1:5060")
        };
        assert!(router.is_core_of(&trunk, tcp));
        assert!(router.is_core_of(
            &trunk,
            Hop {
                transport: Transport::Udp,
                addr: "[::ffff:198.51.100.1]:5060".parse().unwrap()
            }
        ));
        assert!(!router.is_core_of(&trunk, hop("198.51.100.1:5061")));
        assert!(!router.is_core_of(&trunk, hop("198.51.100.2:5060")));
        // Its own core address: any port, the address is not shared.
        let udp = Transport::Udp;
        assert!(router.is_core_sender(&trunk, "198.51.100.1:40000".parse().unwrap(), udp));
        assert!(!router.is_core_sender(&trunk, "198.51.100.2:5060".parse().unwrap(), udp));
    }

    #[test]
    fn a_named_core_is_every_host_it_resolves_to_and_its_sources() {
        let router = router();
        let trunk = router.trunk(2).unwrap().clone();
        let udp = Transport::Udp;
        assert!(router.is_core_of(&trunk, hop("198.51.100.9:5060")));
        assert!(router.is_core_of(&trunk, hop("198.51.100.10:5070")));
        assert!(!router.is_core_of(&trunk, hop("198.51.100.10:5060")));
        assert!(router.is_core_sender(&trunk, "198.51.100.10:41000".parse().unwrap(), udp));
        assert!(router.is_core_sender(&trunk, "203.0.113.77:5060".parse().unwrap(), udp));
        assert!(!router.is_core_sender(&trunk, "203.0.114.1:5060".parse().unwrap(), udp));
        assert_eq!(
            router
                .core_trunk("198.51.100.10:5070".parse().unwrap(), udp)
                .unwrap()
                .name
                .as_ref(),
            "c"
        );
        // The weighted choice, and the next host once the first was tried.
        let first = router.core_hop(&trunk, &[], |_| false, 5).unwrap();
        assert_eq!(first.addr, "198.51.100.9:5060".parse().unwrap());
        let next = router
            .core_hop(&trunk, &[first.addr], |_| false, 5)
            .unwrap();
        assert_eq!(next.addr, "198.51.100.10:5070".parse().unwrap());
        assert!(router
            .core_hop(&trunk, &[first.addr, next.addr], |_| false, 5)
            .is_err());
        // A trunk whose core has not resolved yet: 503, not a wrong host.
        let unresolved = routed(
            3,
            "d",
            Arc::new(Destinations::new("tls:nowhere.example".parse().unwrap())),
        );
        assert_eq!(
            router
                .core_hop(&unresolved, &[], |_| false, 0)
                .unwrap_err()
                .status(),
            503
        );
    }

    #[test]
    fn cores_sharing_an_address_are_told_apart_by_port_over_udp() {
        let trunk = |index: usize, core: &str| routed(index, &format!("t{index}"), dest(core));
        let allow = Arc::new(AllowList::new(vec![]));
        let router = Router::new(
            vec![trunk(0, "127.0.0.1:5190"), trunk(1, "127.0.0.1:5191")],
            vec![],
            allow.clone(),
            allow,
        );
        let (a, b) = (router.trunk(0).unwrap(), router.trunk(1).unwrap());
        let from_b: SocketAddr = "127.0.0.1:5191".parse().unwrap();
        assert!(!router.is_core_sender(a, from_b, Transport::Udp));
        assert!(router.is_core_sender(b, from_b, Transport::Udp));
        // Over TCP the source port says nothing.
        assert!(router.is_core_sender(a, "127.0.0.1:41000".parse().unwrap(), Transport::Tcp));
        assert_eq!(
            router
                .core_trunk(from_b, Transport::Udp)
                .unwrap()
                .name
                .as_ref(),
            "t1"
        );
    }

    #[test]
    fn cores_whose_port_sets_differ_on_one_address_are_both_told_apart_by_port() {
        let two = Arc::new(Destinations::new("udp:core.example".parse().unwrap()));
        two.set(crate::dns::Resolved::new(vec![
            Candidate::plain(Transport::Udp, "127.0.0.9:5060".parse().unwrap(), 0),
            Candidate::plain(Transport::Udp, "127.0.0.9:5070".parse().unwrap(), 1),
        ]));
        let allow = Arc::new(AllowList::new(vec![]));
        let router = Router::new(
            vec![
                routed(0, "one", dest("127.0.0.9:5060")),
                routed(1, "two", two),
            ],
            vec![],
            allow.clone(),
            allow,
        );
        let (one, two) = (router.trunk(0).unwrap(), router.trunk(1).unwrap());
        let udp = Transport::Udp;
        let elsewhere: SocketAddr = "127.0.0.9:5999".parse().unwrap();
        assert!(!router.is_core_sender(one, elsewhere, udp));
        assert!(!router.is_core_sender(two, elsewhere, udp));
        assert!(router.is_core_sender(two, "127.0.0.9:5070".parse().unwrap(), udp));
        assert!(router.is_core_sender(one, "127.0.0.9:5060".parse().unwrap(), udp));
    }

    #[test]
    fn own_uris_by_advertised_name_or_address_and_port() {
        let router = router();
        assert!(router.is_own(&uri("sip:proxy.example;lr")));
        assert!(router.is_own(&uri("sip:192.0.2.1:5070;lr;transport=tcp")));
        assert!(router.is_own(&uri("sip:192.0.2.1:5060;lr")));
        assert!(!router.is_own(&uri("sip:192.0.2.1:5080;lr")));
        assert!(!router.is_own(&uri("sip:other.example;lr")));
    }

    #[test]
    fn next_hop_from_uri_with_transport_and_checks() {
        let router = router();
        assert_eq!(
            router.hop_for_uri(&uri("sip:bob@198.51.100.5:5090;transport=tcp"), Side::Core),
            Ok(Hop {
                transport: Transport::Tcp,
                addr: "198.51.100.5:5090".parse().unwrap()
            })
        );
        assert_eq!(
            router
                .hop_for_uri(&uri("sip:core.example"), Side::Core)
                .unwrap()
                .addr,
            "198.51.100.9:5060".parse().unwrap()
        );
        assert!(matches!(
            router.hop_for_uri(&uri("sip:unknown.example"), Side::Core),
            Err(RouteError::Unresolvable { .. })
        ));
        let open_relay = router
            .hop_for_uri(&uri("sip:203.0.113.1"), Side::Core)
            .unwrap_err();
        assert_eq!(open_relay.status(), 403);
        let looped = router
            .hop_for_uri(&uri("sip:192.0.2.1:5070"), Side::Core)
            .unwrap_err();
        assert_eq!(looped.status(), 482);
        assert_eq!(
            router.hop_for_uri(&uri("sips:bob@198.51.100.5"), Side::Core),
            Ok(Hop {
                transport: Transport::Tls,
                addr: "198.51.100.5:5061".parse().unwrap()
            })
        );
        assert_eq!(
            router
                .hop_for_uri(&uri("sip:bob@198.51.100.5;transport=tls"), Side::Core)
                .unwrap()
                .transport,
            Transport::Tls
        );
        // Parameter names and the transport token compare case-insensitively.
        assert_eq!(
            router
                .hop_for_uri(&uri("sip:bob@198.51.100.5;TRANSPORT=Tcp"), Side::Core)
                .unwrap()
                .transport,
            Transport::Tcp
        );
        assert_eq!(
            router.hop_for_uri(&uri("sip:bob@198.51.100.5;transport=sctp"), Side::Core),
            Err(RouteError::Transport {
                transport: "sctp".into()
            })
        );
        // A configured name matches in any case.
        assert!(router
            .hop_for_uri(&uri("sip:CORE.example"), Side::Core)
            .is_ok());
    }
}
