//! The test DNS server (`common::dns`) checked with the resolver the product uses,
//! hickory-resolver: A/AAAA, SRV with the targets' addresses, NAPTR, NODATA and NXDOMAIN,
//! SERVFAIL while failing, replacement seen once the TTL runs out, the per-name query
//! counter, TCP, and the fall-back from a truncated UDP answer to TCP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::dns::TestDns;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};

/// How the resolver under test reaches the server and what it caches.
#[derive(Clone, Copy)]
enum Transports {
    UdpAndTcp,
    TcpOnly,
}

#[derive(Clone, Copy)]
enum Cache {
    /// hickory's default: answers kept for their TTL.
    ByTtl,
    /// Every lookup asks the server.
    Off,
}

/// A resolver that asks only `server`, never reads /etc/hosts, and fails fast.
fn resolver(server: SocketAddr, transports: Transports, cache: Cache) -> TokioResolver {
    let mut connections = match transports {
        Transports::UdpAndTcp => vec![ConnectionConfig::udp(), ConnectionConfig::tcp()],
        Transports::TcpOnly => vec![ConnectionConfig::tcp()],
    };
    for connection in &mut connections {
        connection.port = server.port();
    }
    let name_server = NameServerConfig::new(server.ip(), true, connections);
    let config = ResolverConfig::from_name_servers(vec![name_server]);

    let mut builder = Resolver::builder_with_config(config, TokioRuntimeProvider::default());
    let options: &mut ResolverOpts = builder.options_mut();
    options.use_hosts_file = ResolveHosts::Never;
    options.timeout = Duration::from_secs(2);
    if let Cache::Off = cache {
        options.cache_size = 0;
    }
    builder.build().expect("build a resolver")
}

fn addresses(lookup: &hickory_resolver::lookup_ip::LookupIp) -> BTreeSet<IpAddr> {
    lookup.iter().collect()
}

/// The SRV answers as `(priority, weight, port, target)`.
fn srv_answers(lookup: &hickory_resolver::lookup::Lookup) -> Vec<(u16, u16, u16, String)> {
    let mut records: Vec<_> = lookup
        .answers()
        .iter()
        .map(|record| match &record.data {
            RData::SRV(srv) => (srv.priority, srv.weight, srv.port, srv.target.to_ascii()),
            other => panic!("not an SRV record: {other:?}"),
        })
        .collect();
    records.sort();
    records
}

const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const V4_OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

#[tokio::test]
async fn a_and_aaaa_lookups_return_the_addresses_set() {
    let dns = TestDns::start().await;
    dns.set_addresses("sip.core.test", &[V4, V6], 60);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::Off);

    let both = resolver.lookup_ip("sip.core.test.").await.unwrap();
    assert_eq!(addresses(&both), BTreeSet::from([V4, V6]));

    let a = resolver.ipv4_lookup("sip.core.test.").await.unwrap();
    assert_eq!(a.answers().len(), 1);
    assert_eq!(a.answers()[0].ttl, 60);
    assert_eq!(a.answers()[0].data, RData::from(V4));
}

#[tokio::test]
async fn names_are_case_insensitive_with_or_without_the_trailing_dot() {
    let dns = TestDns::start().await;
    dns.set_addresses("Sip.Core.Test.", &[V4], 60);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::Off);

    let lookup = resolver.ipv4_lookup("SIP.core.TEST.").await.unwrap();
    assert_eq!(lookup.answers()[0].data, RData::from(V4));
    assert_eq!(dns.queries("sip.core.test"), 1);
    assert_eq!(dns.queries("SIP.CORE.TEST."), 1);
}

#[tokio::test]
async fn srv_lookup_returns_the_records_and_the_targets_addresses() {
    let dns = TestDns::start().await;
    dns.set_srv(
        "_sip._udp.core.test",
        &[(10, 60, 5060, "a.core.test"), (20, 0, 5070, "b.core.test.")],
        60,
    );
    dns.set_addresses("a.core.test", &[V4, V6], 60);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::Off);

    let lookup = resolver.srv_lookup("_sip._udp.core.test.").await.unwrap();
    assert_eq!(
        srv_answers(&lookup),
        [
            (10, 60, 5060, "a.core.test.".to_string()),
            (20, 0, 5070, "b.core.test.".to_string()),
        ]
    );
    let additional: HashSet<(String, RData)> = lookup
        .additionals()
        .iter()
        .map(|record| (record.name.to_ascii(), record.data.clone()))
        .collect();
    assert_eq!(
        additional,
        HashSet::from([
            ("a.core.test.".to_string(), RData::from(V4)),
            ("a.core.test.".to_string(), RData::from(V6)),
        ])
    );
}

#[tokio::test]
async fn naptr_lookup_returns_the_records() {
    let dns = TestDns::start().await;
    dns.set_naptr(
        "core.test",
        &[
            (10, 50, "s", "SIP+D2T", "_sip._tcp.core.test"),
            (20, 50, "s", "SIP+D2U", "_sip._udp.core.test"),
        ],
        60,
    );
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::Off);

    let lookup = resolver
        .lookup("core.test.", RecordType::NAPTR)
        .await
        .unwrap();
    let mut records: Vec<_> = lookup
        .answers()
        .iter()
        .map(|record| match &record.data {
            RData::NAPTR(naptr) => (
                naptr.order,
                naptr.preference,
                String::from_utf8(naptr.flags.to_vec()).unwrap(),
                String::from_utf8(naptr.services.to_vec()).unwrap(),
                naptr.regexp.is_empty(),
                naptr.replacement.to_ascii(),
            ),
            other => panic!("not a NAPTR record: {other:?}"),
        })
        .collect();
    records.sort();
    assert_eq!(
        records,
        [
            (
                10,
                50,
                "s".to_string(),
                "SIP+D2T".to_string(),
                true,
                "_sip._tcp.core.test.".to_string()
            ),
            (
                20,
                50,
                "s".to_string(),
                "SIP+D2U".to_string(),
                true,
                "_sip._udp.core.test.".to_string()
            ),
        ]
    );
}

#[tokio::test]
async fn unknown_name_is_nxdomain() {
    let dns = TestDns::start().await;
    dns.set_addresses("sip.core.test", &[V4], 60);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::Off);

    let error = resolver
        .ipv4_lookup("nowhere.core.test.")
        .await
        .unwrap_err();
    assert!(error.is_nx_domain(), "{error:?}");
    let error = resolver
        .srv_lookup("_sip._udp.nowhere.test.")
        .await
        .unwrap_err();
    assert!(error.is_nx_domain(), "{error:?}");
}

#[tokio::test]
async fn name_with_records_of_another_type_is_nodata() {
    let dns = TestDns::start().await;
    dns.set_srv("_sip._udp.core.test", &[(10, 0, 5060, "a.core.test")], 60);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::Off);

    for (name, record_type) in [
        ("_sip._udp.core.test.", RecordType::A),
        ("_sip._udp.core.test.", RecordType::NAPTR),
        // An empty non-terminal exists too (RFC 8020).
        ("_udp.core.test.", RecordType::SRV),
        ("core.test.", RecordType::NAPTR),
    ] {
        let error = resolver.lookup(name, record_type).await.unwrap_err();
        match &error {
            NetError::Dns(DnsError::NoRecordsFound(no_records)) => {
                assert_eq!(
                    no_records.response_code,
                    ResponseCode::NoError,
                    "{name} {record_type}"
                );
            }
            other => panic!("{name} {record_type}: expected NODATA, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn failing_server_answers_servfail_until_it_recovers() {
    let dns = TestDns::start().await;
    dns.set_addresses("sip.core.test", &[V4], 60);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::Off);

    dns.set_failing(true);
    let error = resolver.ipv4_lookup("sip.core.test.").await.unwrap_err();
    assert!(
        matches!(
            error,
            NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))
        ),
        "{error:?}"
    );
    assert!(dns.queries("sip.core.test") >= 1);

    dns.set_failing(false);
    let lookup = resolver.ipv4_lookup("sip.core.test.").await.unwrap();
    assert_eq!(lookup.answers()[0].data, RData::from(V4));
}

#[tokio::test]
async fn cached_answer_is_reused_within_its_ttl() {
    let dns = TestDns::start().await;
    dns.set_addresses("sip.core.test", &[V4], 300);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::ByTtl);

    resolver.ipv4_lookup("sip.core.test.").await.unwrap();
    dns.set_addresses("sip.core.test", &[V4_OTHER], 300);
    let lookup = resolver.ipv4_lookup("sip.core.test.").await.unwrap();

    assert_eq!(lookup.answers()[0].data, RData::from(V4));
    assert_eq!(dns.queries("sip.core.test"), 1);
}

#[tokio::test]
async fn replacement_is_seen_once_the_ttl_runs_out() {
    let dns = TestDns::start().await;
    dns.set_addresses("sip.core.test", &[V4], 1);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::ByTtl);

    let first = resolver.ipv4_lookup("sip.core.test.").await.unwrap();
    assert_eq!(first.answers()[0].data, RData::from(V4));
    dns.set_addresses("sip.core.test", &[V4_OTHER], 1);
    // hickory's cache runs on the std clock, so the TTL has to pass for real.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = resolver.ipv4_lookup("sip.core.test.").await.unwrap();

    assert_eq!(second.answers()[0].data, RData::from(V4_OTHER));
    assert_eq!(dns.queries("sip.core.test"), 2);
}

#[tokio::test]
async fn without_a_cache_every_lookup_reaches_the_server() {
    let dns = TestDns::start().await;
    dns.set_addresses("sip.core.test", &[V4], 300);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::Off);

    resolver.ipv4_lookup("sip.core.test.").await.unwrap();
    dns.set_addresses("sip.core.test", &[V4_OTHER], 300);
    let lookup = resolver.ipv4_lookup("sip.core.test.").await.unwrap();

    assert_eq!(lookup.answers()[0].data, RData::from(V4_OTHER));
    assert_eq!(dns.queries("sip.core.test"), 2);
}

#[tokio::test]
async fn queries_are_counted_per_name_for_every_type_and_outcome() {
    let dns = TestDns::start().await;
    dns.set_addresses("sip.core.test", &[V4], 60);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::Off);

    resolver.ipv4_lookup("sip.core.test.").await.unwrap();
    resolver.ipv6_lookup("sip.core.test.").await.unwrap_err();
    resolver.srv_lookup("sip.core.test.").await.unwrap_err();
    resolver
        .ipv4_lookup("nowhere.core.test.")
        .await
        .unwrap_err();

    assert_eq!(dns.queries("sip.core.test"), 3);
    assert_eq!(dns.queries("nowhere.core.test"), 1);
    assert_eq!(dns.queries("core.test"), 0);
}

#[tokio::test]
async fn removed_name_is_nxdomain() {
    let dns = TestDns::start().await;
    dns.set_addresses("sip.core.test", &[V4], 60);
    dns.set_srv("sip.core.test", &[(10, 0, 5060, "a.core.test")], 60);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::Off);
    resolver.ipv4_lookup("sip.core.test.").await.unwrap();

    dns.remove("sip.core.test.");
    let error = resolver.ipv4_lookup("sip.core.test.").await.unwrap_err();
    assert!(error.is_nx_domain(), "{error:?}");
}

#[tokio::test]
async fn tcp_only_resolver_gets_the_same_answers() {
    let dns = TestDns::start().await;
    dns.set_addresses("sip.core.test", &[V4], 60);
    dns.set_srv("_sip._tcp.core.test", &[(10, 0, 5060, "sip.core.test")], 60);
    let resolver = resolver(dns.addr(), Transports::TcpOnly, Cache::Off);

    let a = resolver.ipv4_lookup("sip.core.test.").await.unwrap();
    assert_eq!(a.answers()[0].data, RData::from(V4));
    // A second question on the same connection.
    let srv = resolver.srv_lookup("_sip._tcp.core.test.").await.unwrap();
    assert_eq!(
        srv_answers(&srv),
        [(10, 0, 5060, "sip.core.test.".to_string())]
    );
    let error = resolver
        .ipv4_lookup("nowhere.core.test.")
        .await
        .unwrap_err();
    assert!(error.is_nx_domain(), "{error:?}");
}

#[tokio::test]
async fn answer_too_large_for_udp_is_truncated_and_fetched_over_tcp() {
    let dns = TestDns::start().await;
    // 100 AAAA records take about 2800 bytes, over the 1232 hickory offers by EDNS.
    let many: Vec<IpAddr> = (1..=100u16)
        .map(|n| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n)))
        .collect();
    dns.set_addresses("big.core.test", &many, 60);
    let resolver = resolver(dns.addr(), Transports::UdpAndTcp, Cache::Off);

    let lookup = resolver.ipv6_lookup("big.core.test.").await.unwrap();

    let got: HashSet<RData> = lookup.answers().iter().map(|r| r.data.clone()).collect();
    let want: HashSet<RData> = many.iter().map(|ip| RData::from(*ip)).collect();
    assert_eq!(got, want);
    // Once over UDP (truncated), once over TCP.
    assert_eq!(dns.queries("big.core.test"), 2);
}
