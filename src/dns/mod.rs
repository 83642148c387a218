//! Finding a trunk's peers (RFC 3263): the pure part. What DNS answered becomes a list of
//! [`Candidate`]s, each a transport and socket address ranked by NAPTR order and SRV
//! priority and weighted by SRV weight; [`Resolved::pick`] chooses the next one to try
//! for a request (RFC 2782's weighted choice within the best rank, hosts that failed
//! recently last); [`HostHealth`] remembers those failures. Nothing here reads a clock
//! or draws a random number: time and randomness are arguments.
//!
//! [`resolve`] asks DNS (NAPTR, then SRV, then A/AAAA) and keeps each peer's answer
//! fresh in the background; [`Destinations`] is what it publishes and the proxy reads.

pub mod resolve;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use std::sync::Arc;

use crate::config::{Endpoint, Transport};
use crate::transport::canonical;

/// One address a peer is reached on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub transport: Transport,
    pub addr: SocketAddr,
    /// Lower is tried first: the NAPTR record's position in the high half, the SRV
    /// priority in the low half.
    pub rank: u32,
    /// SRV weight among candidates of the same rank: of the SRV record, which all
    /// addresses of its target share (the weight counts once per target).
    pub weight: u16,
    /// Which SRV record (or address, for plain A/AAAA answers) it comes from: addresses
    /// of one target are tried in order, after the target is chosen.
    pub target: u32,
}

impl Candidate {
    /// A candidate from an IP address or an A/AAAA record: rank 0, weight 0, its own
    /// target `target` (addresses of a name are chosen among evenly).
    pub fn plain(transport: Transport, addr: SocketAddr, target: u32) -> Self {
        Self {
            transport,
            addr,
            rank: 0,
            weight: 0,
            target,
        }
    }
}

/// What a peer's name resolved to last. Empty until the first answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub candidates: Vec<Candidate>,
    /// Addresses earlier answers had and this one has not, until when they still count
    /// as the peer's: dialogs keep their host when DNS moves on (its in-dialog requests
    /// still carry the trunk's credential, its requests are still let in). New requests
    /// never go to them.
    pub retired: Vec<(SocketAddr, Instant)>,
}

/// How long an address that left a peer's DNS answer still counts as the peer's: as long
/// as the sidecar keeps a call (12 h).
pub const RETIRED_KEEP: Duration = Duration::from_secs(12 * 3600);

impl Resolved {
    pub fn new(candidates: Vec<Candidate>) -> Self {
        Self {
            candidates,
            retired: Vec::new(),
        }
    }

    /// `next` as the new answer at `now`: what this one had and `next` has not is
    /// retired for `keep`; retired addresses whose time is up, or that are back, go.
    pub fn succeeded_by(&self, mut next: Resolved, now: Instant, keep: Duration) -> Resolved {
        let gone = self
            .candidates
            .iter()
            .filter(|candidate| !next.contains_current(candidate.addr))
            .map(|candidate| (candidate.addr, now + keep));
        let still = self
            .retired
            .iter()
            .copied()
            .filter(|(addr, until)| now < *until && !next.contains_current(*addr));
        let mut retired: Vec<(SocketAddr, Instant)> = Vec::new();
        for (addr, until) in still.chain(gone) {
            match retired.iter_mut().find(|(known, _)| *known == addr) {
                Some(entry) => entry.1 = entry.1.max(until),
                None => retired.push((addr, until)),
            }
        }
        next.retired = retired;
        next
    }

    /// The ports this peer is known on at `ip` (retired ones too), sorted.
    pub fn ports_at(&self, ip: IpAddr) -> Vec<u16> {
        let ip = canonical(ip);
        let mut ports: Vec<u16> = self
            .candidates
            .iter()
            .map(|candidate| candidate.addr)
            .chain(self.retired.iter().map(|(old, _)| *old))
            .filter(|addr| canonical(addr.ip()) == ip)
            .map(|addr| addr.port())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    fn contains_current(&self, addr: SocketAddr) -> bool {
        self.candidates
            .iter()
            .any(|candidate| same(candidate.addr, addr))
    }

    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    /// Whether `addr` (address and port) is one of the candidates, or retired.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.contains_current(addr) || self.retired.iter().any(|(old, _)| same(*old, addr))
    }

    /// Whether `ip` is the address of one of the candidates, or of a retired one.
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.candidates
            .iter()
            .map(|candidate| candidate.addr)
            .chain(self.retired.iter().map(|(old, _)| *old))
            .any(|addr| canonical(addr.ip()) == ip)
    }

    /// The next candidate for a request that has tried `tried` already: among those
    /// not tried, the ones `avoided` does not name if there are any (a host that failed
    /// recently is still better than none), then the best rank, then a weighted choice
    /// by `random` (RFC 2782; a weight-0 candidate is chosen only when the draw is
    /// zero, unless all weights are 0).
    pub fn pick(
        &self,
        tried: &[SocketAddr],
        avoided: impl Fn(SocketAddr) -> bool,
        random: u32,
    ) -> Option<Candidate> {
        let untried: Vec<&Candidate> = self
            .candidates
            .iter()
            .filter(|candidate| !tried.contains(&candidate.addr))
            .collect();
        let healthy: Vec<&Candidate> = untried
            .iter()
            .copied()
            .filter(|candidate| !avoided(candidate.addr))
            .collect();
        let pool = if healthy.is_empty() { untried } else { healthy };
        let best = pool.iter().map(|candidate| candidate.rank).min()?;
        let group: Vec<&Candidate> = pool
            .into_iter()
            .filter(|candidate| candidate.rank == best)
            .collect();
        // One entry per target, its weight counted once.
        let mut targets: Vec<(u32, u16)> = Vec::new();
        for candidate in &group {
            if !targets
                .iter()
                .any(|(target, _)| *target == candidate.target)
            {
                targets.push((candidate.target, candidate.weight));
            }
        }
        let chosen = weighted_choice(&targets, random)?;
        group
            .into_iter()
            .find(|candidate| candidate.target == chosen)
            .copied()
    }
}

/// RFC 2782's weighted choice among (target, weight): zero weights first, then a
/// running sum, the first whose sum reaches the draw. RFC 2782 draws from 0 to the sum
/// inclusive so that a zero weight can be chosen; without zero weights the draw starts at
/// 1, or the first target would get one share too many (4 of 5 instead of 3 of 4 for
/// weights 3 and 1). All weights 0: an even choice.
fn weighted_choice(targets: &[(u32, u16)], random: u32) -> Option<u32> {
    let total: u64 = targets.iter().map(|(_, weight)| u64::from(*weight)).sum();
    if total == 0 {
        let index = usize::try_from(random).unwrap_or(0) % targets.len().max(1);
        return targets.get(index).map(|(target, _)| *target);
    }
    let mut ordered = targets.to_vec();
    ordered.sort_by_key(|(_, weight)| *weight != 0);
    let has_zero = ordered.first().is_some_and(|(_, weight)| *weight == 0);
    let draw = if has_zero {
        u64::from(random) % (total + 1)
    } else {
        1 + u64::from(random) % total
    };
    let mut sum = 0;
    for (target, weight) in &ordered {
        sum += u64::from(*weight);
        if sum >= draw {
            return Some(*target);
        }
    }
    ordered.last().map(|(target, _)| *target)
}

/// The same socket address, IPv4-mapped IPv6 taken as IPv4.
fn same(left: SocketAddr, right: SocketAddr) -> bool {
    canonical(left.ip()) == canonical(right.ip()) && left.port() == right.port()
}

/// A trunk peer as configured and as resolved now: shared by the routing, the allow
/// lists and the task that refreshes it.
#[derive(Debug)]
pub struct Destinations {
    pub endpoint: Endpoint,
    current: ArcSwap<Resolved>,
}

impl Destinations {
    /// An endpoint not resolved yet (an IP address is resolved at once).
    pub fn new(endpoint: Endpoint) -> Self {
        let initial = match (endpoint.ip(), endpoint.port) {
            (Some(ip), Some(port)) => Resolved::new(vec![Candidate::plain(
                endpoint.transport(),
                SocketAddr::new(ip, port),
                0,
            )]),
            _ => Resolved::default(),
        };
        Self {
            endpoint,
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// Whether the endpoint is an IP address (nothing to look up).
    pub fn is_static(&self) -> bool {
        self.endpoint.ip().is_some()
    }

    pub fn current(&self) -> Arc<Resolved> {
        self.current.load_full()
    }

    /// Whether `ip` is one of the addresses now (cheap: no reference count taken).
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        self.current.load().contains_ip(ip)
    }

    /// Whether `addr` is one of the socket addresses now.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.current.load().contains(addr)
    }

    /// Replaces what the name resolves to (nothing is retired: for a first answer and
    /// for tests).
    pub fn set(&self, resolved: Resolved) {
        self.current.store(Arc::new(resolved));
    }

    /// A new answer at `now`: addresses it drops stay the peer's for `keep`.
    pub fn update(&self, resolved: Resolved, now: Instant, keep: Duration) {
        let next = self.current.load().succeeded_by(resolved, now, keep);
        self.current.store(Arc::new(next));
    }

    /// The first candidate in preference order, without randomness (for where a single
    /// address is needed, such as a host name in a URI).
    pub fn first(&self) -> Option<Candidate> {
        self.current
            .load()
            .candidates
            .iter()
            .min_by_key(|candidate| (candidate.rank, std::cmp::Reverse(candidate.weight)))
            .copied()
    }
}

/// The SRV owner name for a transport in a domain (RFC 3263 §4.1).
pub fn srv_name(transport: Transport, domain: &str) -> String {
    let domain = domain.trim_end_matches('.');
    match transport {
        Transport::Udp => format!("_sip._udp.{domain}"),
        Transport::Tcp => format!("_sip._tcp.{domain}"),
        Transport::Tls => format!("_sips._tcp.{domain}"),
    }
}

/// One NAPTR record, as far as RFC 3263 reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naptr {
    pub order: u16,
    pub preference: u16,
    pub flags: String,
    pub service: String,
    pub replacement: String,
}

/// RFC 3263 §4.1: the NAPTR records that lead to an SRV lookup (flag `s`) for a
/// transport in `supported` (only `SIPS+D2T` when `secure`), best first, as (transport,
/// SRV name).
pub fn naptr_services(
    records: &[Naptr],
    secure: bool,
    supported: &[Transport],
) -> Vec<(Transport, String)> {
    let mut usable: Vec<&Naptr> = records
        .iter()
        .filter(|record| record.flags.eq_ignore_ascii_case("s"))
        .collect();
    usable.sort_by_key(|record| (record.order, record.preference));
    usable
        .into_iter()
        .filter_map(|record| {
            let transport = match record.service.to_ascii_uppercase().as_str() {
                "SIP+D2U" if !secure => Transport::Udp,
                "SIP+D2T" if !secure => Transport::Tcp,
                "SIPS+D2T" => Transport::Tls,
                _ => return None,
            };
            supported.contains(&transport).then(|| {
                (
                    transport,
                    record.replacement.trim_end_matches('.').to_string(),
                )
            })
        })
        .collect()
}

/// The transports to look for by SRV when a name has no NAPTR records, in the order
/// RFC 3263 §4.1 leaves to the client: TLS, then TCP, then UDP (only TLS for `sips:`).
pub fn srv_fallback_order(secure: bool, supported: &[Transport]) -> Vec<Transport> {
    [Transport::Tls, Transport::Tcp, Transport::Udp]
        .into_iter()
        .filter(|transport| supported.contains(transport))
        .filter(|transport| !secure || *transport == Transport::Tls)
        .collect()
}

/// Core hosts that failed recently, tried last until their hold ends (RFC 3263 §4.3
/// leaves this to the client).
#[derive(Debug, Default)]
pub struct HostHealth {
    failed_until: HashMap<SocketAddr, Instant>,
}

impl HostHealth {
    /// `addr` failed at `now`: avoid it for `hold`. True when it was not avoided
    /// already (a new failure, worth counting once).
    pub fn failed(&mut self, addr: SocketAddr, now: Instant, hold: Duration) -> bool {
        let new = !self.is_avoided(addr, now);
        self.failed_until.insert(addr, now + hold);
        new
    }

    /// `addr` answered: it is good again.
    pub fn answered(&mut self, addr: SocketAddr) {
        if !self.failed_until.is_empty() {
            self.failed_until.remove(&addr);
        }
    }

    pub fn is_avoided(&self, addr: SocketAddr, now: Instant) -> bool {
        self.failed_until
            .get(&addr)
            .is_some_and(|until| now < *until)
    }

    /// Forgets holds that ended.
    pub fn expire(&mut self, now: Instant) {
        self.failed_until.retain(|_, until| now < *until);
    }

    /// Hosts avoided at `now`.
    pub fn avoided(&self, now: Instant) -> usize {
        self.failed_until
            .values()
            .filter(|until| now < **until)
            .count()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start their virtual clock at a real Instant
mod tests {
    use super::*;

    /// A candidate that is its own target.
    fn candidate(addr: &str, rank: u32, weight: u16) -> Candidate {
        let addr: SocketAddr = addr.parse().unwrap();
        Candidate {
            transport: Transport::Udp,
            addr,
            rank,
            weight,
            // Its own target: any number that differs between addresses.
            target: {
                use std::hash::BuildHasher;
                let hasher = std::hash::BuildHasherDefault::<
                    std::collections::hash_map::DefaultHasher,
                >::default();
                (hasher.hash_one(addr) >> 32) as u32
            },
        }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn picks_follow_rank_then_weight() {
        let resolved = Resolved::new(vec![
            candidate("192.0.2.1:5060", 10, 60),
            candidate("192.0.2.2:5060", 10, 20),
            candidate("192.0.2.3:5060", 20, 100),
        ]);
        let none = |_: SocketAddr| false;
        // 80 draws over the rank-10 pair: 60 the first, 20 the second.
        let mut counts = HashMap::new();
        for draw in 0..80u32 {
            let picked = resolved.pick(&[], none, draw).unwrap();
            *counts.entry(picked.addr).or_insert(0) += 1;
        }
        assert_eq!(counts[&addr("192.0.2.1:5060")], 60);
        assert_eq!(counts[&addr("192.0.2.2:5060")], 20);
        // Once both are tried, the next rank.
        let tried = [addr("192.0.2.1:5060"), addr("192.0.2.2:5060")];
        assert_eq!(
            resolved.pick(&tried, none, 7).unwrap().addr,
            addr("192.0.2.3:5060")
        );
        let all = [tried[0], tried[1], addr("192.0.2.3:5060")];
        assert!(resolved.pick(&all, none, 7).is_none());
    }

    #[test]
    fn a_targets_weight_counts_once_whatever_its_addresses_and_they_go_in_order() {
        let of = |addr: &str, target: u32, weight: u16| Candidate {
            target,
            ..candidate(addr, 0, weight)
        };
        let resolved = Resolved::new(vec![
            of("192.0.2.1:5060", 1, 3),
            of("192.0.2.2:5060", 2, 1),
            of("[2001:db8::2]:5060", 2, 1),
        ]);
        let none = |_: SocketAddr| false;
        let mut counts = HashMap::new();
        for draw in 0..400u32 {
            let picked = resolved.pick(&[], none, draw).unwrap();
            *counts.entry(picked.addr).or_insert(0) += 1;
        }
        assert_eq!(counts[&addr("192.0.2.1:5060")], 300);
        assert_eq!(counts[&addr("192.0.2.2:5060")], 100);
        assert!(!counts.contains_key(&addr("[2001:db8::2]:5060")));
        // The target's next address once the first was tried.
        let tried = [addr("192.0.2.1:5060"), addr("192.0.2.2:5060")];
        assert_eq!(
            resolved.pick(&tried, none, 0).unwrap().addr,
            addr("[2001:db8::2]:5060")
        );
    }

    #[test]
    fn zero_weights_are_chosen_only_on_a_zero_draw_or_when_all_are_zero() {
        let resolved = Resolved::new(vec![
            candidate("192.0.2.1:5060", 0, 0),
            candidate("192.0.2.2:5060", 0, 10),
        ]);
        let none = |_: SocketAddr| false;
        assert_eq!(
            resolved.pick(&[], none, 0).unwrap().addr,
            addr("192.0.2.1:5060")
        );
        for draw in 1..=10 {
            assert_eq!(
                resolved.pick(&[], none, draw).unwrap().addr,
                addr("192.0.2.2:5060")
            );
        }
        let zeros = Resolved::new(vec![
            candidate("192.0.2.1:5060", 0, 0),
            candidate("192.0.2.2:5060", 0, 0),
        ]);
        assert_ne!(
            zeros.pick(&[], none, 0).unwrap().addr,
            zeros.pick(&[], none, 1).unwrap().addr
        );
    }

    #[test]
    fn failed_hosts_go_last_until_their_hold_ends() {
        let resolved = Resolved::new(vec![
            candidate("192.0.2.1:5060", 10, 0),
            candidate("192.0.2.2:5060", 20, 0),
        ]);
        let start = Instant::now();
        let mut health = HostHealth::default();
        health.failed(addr("192.0.2.1:5060"), start, Duration::from_secs(30));
        let at = |secs| start + Duration::from_secs(secs);
        let pick = |health: &HostHealth, now| {
            resolved
                .pick(&[], |candidate| health.is_avoided(candidate, now), 0)
                .unwrap()
                .addr
        };
        assert_eq!(pick(&health, at(1)), addr("192.0.2.2:5060"));
        assert_eq!(pick(&health, at(30)), addr("192.0.2.1:5060"));
        // Every host avoided: still the best of them, rather than nothing.
        health.failed(addr("192.0.2.2:5060"), start, Duration::from_secs(30));
        assert_eq!(pick(&health, at(2)), addr("192.0.2.1:5060"));
        assert_eq!(health.avoided(at(2)), 2);
        health.answered(addr("192.0.2.1:5060"));
        health.expire(at(31));
        assert_eq!(health.avoided(at(2)), 0);
    }

    #[test]
    fn naptr_records_choose_supported_transports_in_order() {
        let naptr = |order, preference, service: &str, replacement: &str| Naptr {
            order,
            preference,
            flags: "S".into(),
            service: service.into(),
            replacement: replacement.into(),
        };
        let records = [
            naptr(20, 10, "SIP+D2U", "_sip._udp.example.com."),
            naptr(10, 20, "SIP+D2T", "_sip._tcp.example.com."),
            naptr(10, 10, "SIPS+D2T", "_sips._tcp.example.com."),
            naptr(5, 10, "SIP+D2S", "_sip._sctp.example.com."),
            Naptr {
                flags: "u".into(),
                ..naptr(1, 1, "SIP+D2U", "x")
            },
        ];
        let all = [Transport::Udp, Transport::Tcp, Transport::Tls];
        assert_eq!(
            naptr_services(&records, false, &all),
            vec![
                (Transport::Tls, "_sips._tcp.example.com".to_string()),
                (Transport::Tcp, "_sip._tcp.example.com".to_string()),
                (Transport::Udp, "_sip._udp.example.com".to_string()),
            ]
        );
        assert_eq!(
            naptr_services(&records, true, &all),
            vec![(Transport::Tls, "_sips._tcp.example.com".to_string())]
        );
        assert_eq!(
            naptr_services(&records, false, &[Transport::Udp]),
            vec![(Transport::Udp, "_sip._udp.example.com".to_string())]
        );
        assert_eq!(
            srv_fallback_order(false, &[Transport::Udp, Transport::Tls]),
            vec![Transport::Tls, Transport::Udp]
        );
        assert_eq!(
            srv_name(Transport::Tls, "example.com."),
            "_sips._tcp.example.com"
        );
    }

    #[test]
    fn addresses_that_leave_the_answer_stay_the_peers_for_a_while_but_get_no_new_requests() {
        let start = Instant::now();
        let keep = Duration::from_secs(60);
        let at = |secs| start + Duration::from_secs(secs);
        let first = Resolved::new(vec![
            candidate("192.0.2.1:5060", 0, 1),
            candidate("192.0.2.2:5060", 0, 1),
        ]);
        let second = first.succeeded_by(
            Resolved::new(vec![candidate("192.0.2.2:5060", 0, 1)]),
            at(10),
            keep,
        );
        assert!(second.contains(addr("192.0.2.1:5060")));
        assert!(second.contains_ip("192.0.2.1".parse().unwrap()));
        for draw in 0..10 {
            assert_eq!(
                second.pick(&[], |_| false, draw).unwrap().addr,
                addr("192.0.2.2:5060")
            );
        }
        // Past the keep, at the next answer, it is gone; one that comes back is current.
        let third = second.succeeded_by(
            Resolved::new(vec![candidate("192.0.2.2:5060", 0, 1)]),
            at(71),
            keep,
        );
        assert!(!third.contains(addr("192.0.2.1:5060")));
        let back = second.succeeded_by(first.clone(), at(20), keep);
        assert!(back.retired.is_empty());
    }

    #[test]
    fn destinations_of_an_address_need_no_lookup() {
        let fixed = Destinations::new("tls:192.0.2.7".parse().unwrap());
        assert!(fixed.is_static());
        assert_eq!(fixed.first().unwrap().addr, addr("192.0.2.7:5061"));
        assert_eq!(fixed.first().unwrap().transport, Transport::Tls);
        let named = Destinations::new("udp:core.example:5060".parse().unwrap());
        assert!(!named.is_static() && named.current().is_empty());
        assert!(named.first().is_none());
    }
}
