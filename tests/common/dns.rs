//! An in-process authoritative DNS server for the integration tests: the A, AAAA, SRV and
//! NAPTR records a test sets, replaced or removed while the server runs, served over UDP and
//! TCP on one loopback port (RFC 1035 §4.2.1 and §4.2.2: TCP messages carry a two-byte
//! length prefix).
//!
//! Answers are authoritative (AA), echo the id and question, and say recursion is available.
//! Negative answers follow RFC 2308: a name that has records of other types, or names below
//! it (an empty non-terminal, RFC 8020), gets NOERROR with no answer (NODATA); any other name
//! gets NXDOMAIN. Both carry an SOA of TTL 0 in the authority section, so resolvers do not
//! cache them. SRV answers carry the targets' known addresses in the additional section.
//! A UDP answer larger than the client accepts (512 bytes, or its EDNS payload size, RFC 6891
//! §6.2.3) is cut to the question with TC set, and the client retries over TCP.
//!
//! `set_failing(true)` turns every answer into SERVFAIL; `queries(name)` counts what arrived
//! for a name, whether it was answered or failed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{NAPTR, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

/// The largest UDP answer a client that sent no EDNS record accepts (RFC 1035 §4.2.1).
const CLASSIC_UDP_LIMIT: usize = 512;

/// The UDP payload size this server advertises in the EDNS record of its answers.
const EDNS_PAYLOAD: u16 = 1232;

/// A DNS server on 127.0.0.1, serving until dropped.
pub struct TestDns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    /// The UDP and TCP loops. Dropping the set aborts them, and with the TCP loop its own set
    /// of connection tasks.
    _tasks: JoinSet<()>,
}

impl TestDns {
    /// Binds UDP and TCP on 127.0.0.1 with the same free port and serves until dropped.
    pub async fn start() -> TestDns {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .expect("bind a loopback udp port for the test dns server");
            let port = udp.local_addr().unwrap().port();
            // The UDP port may be taken for TCP by someone else: then try another one.
            if let Ok(tcp) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let mut tasks = JoinSet::new();
        tasks.spawn(serve_udp(udp, zone.clone()));
        tasks.spawn(serve_tcp(tcp, zone.clone()));
        TestDns {
            addr,
            zone,
            _tasks: tasks,
        }
    }

    /// The address both transports listen on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the A and AAAA records of `name`; `addresses` may mix IPv4 and IPv6, and an
    /// empty list removes both.
    pub fn set_addresses(&self, name: &str, addresses: &[IpAddr], ttl: u32) {
        let data = addresses.iter().map(|address| RData::from(*address));
        self.zone()
            .replace(name, &[RecordType::A, RecordType::AAAA], ttl, data);
    }

    /// Replaces the SRV records of `name` (e.g. `_sip._udp.core.test`), each given as
    /// `(priority, weight, port, target)`.
    pub fn set_srv(&self, name: &str, records: &[(u16, u16, u16, &str)], ttl: u32) {
        let data = records.iter().map(|&(priority, weight, port, target)| {
            RData::SRV(SRV::new(priority, weight, port, domain_name(target)))
        });
        self.zone().replace(name, &[RecordType::SRV], ttl, data);
    }

    /// Replaces the NAPTR records of `name`, each given as
    /// `(order, preference, flags, service, replacement)`, e.g.
    /// `(10, 50, "s", "SIP+D2U", "_sip._udp.core.test")`. The regexp field is empty, as
    /// RFC 3403 §4.1 requires when a replacement is given.
    pub fn set_naptr(&self, name: &str, records: &[(u16, u16, &str, &str, &str)], ttl: u32) {
        let data = records
            .iter()
            .map(|&(order, preference, flags, service, replacement)| {
                RData::NAPTR(NAPTR::new(
                    order,
                    preference,
                    flags.as_bytes().into(),
                    service.as_bytes().into(),
                    Box::default(),
                    domain_name(replacement),
                ))
            });
        self.zone().replace(name, &[RecordType::NAPTR], ttl, data);
    }

    /// Removes every record of `name`.
    pub fn remove(&self, name: &str) {
        self.zone().names.remove(&key(name));
    }

    /// Answers SERVFAIL to every query (`true`), or serves the records again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.zone().failing = failing;
    }

    /// How many queries of any type arrived for `name`, over either transport.
    pub fn queries(&self, name: &str) -> u64 {
        self.zone().queries.get(&key(name)).copied().unwrap_or(0)
    }

    fn zone(&self) -> std::sync::MutexGuard<'_, Zone> {
        self.zone.lock().unwrap()
    }
}

/// What the server knows and what it has seen. Held only for the time of one change or one
/// answer, never across an await.
#[derive(Default)]
struct Zone {
    /// Record sets by name (see [`key`]), then by type.
    names: HashMap<String, HashMap<RecordType, RecordSet>>,
    /// Queries received, by name (see [`key`]).
    queries: HashMap<String, u64>,
    failing: bool,
}

struct RecordSet {
    ttl: u32,
    data: Vec<RData>,
}

impl Zone {
    /// Drops the sets of `types` at `name`, then adds `data` grouped by its type.
    fn replace(
        &mut self,
        name: &str,
        types: &[RecordType],
        ttl: u32,
        data: impl IntoIterator<Item = RData>,
    ) {
        let name = key(name);
        let sets = self.names.entry(name.clone()).or_default();
        sets.retain(|record_type, _| !types.contains(record_type));
        for rdata in data {
            sets.entry(rdata.record_type())
                .or_insert_with(|| RecordSet {
                    ttl,
                    data: Vec::new(),
                })
                .data
                .push(rdata);
        }
        if sets.is_empty() {
            self.names.remove(&name);
        }
    }

    fn records(&self, name: &str, record_type: RecordType) -> Option<&RecordSet> {
        self.names.get(name)?.get(&record_type)
    }

    /// Whether `name` has records, or names below it have (RFC 8020: an empty non-terminal
    /// exists and answers NODATA, not NXDOMAIN).
    fn exists(&self, name: &str) -> bool {
        let suffix = format!(".{name}");
        name.is_empty()
            || self
                .names
                .keys()
                .any(|owner| owner == name || owner.ends_with(&suffix))
    }

    /// The answer to one received message, or `None` for a message that asks nothing (a
    /// response, or too short to carry an id).
    fn handle(&mut self, request: &[u8]) -> Option<Reply> {
        let request = match Message::from_vec(request) {
            Ok(request) => request,
            Err(_) => {
                let id = u16::from_be_bytes([*request.first()?, *request.get(1)?]);
                let message = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                return Some(Reply::new(message, None));
            }
        };
        if request.metadata.message_type != MessageType::Query {
            return None;
        }

        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata = Metadata::response_from_request(&request.metadata);
        response.metadata.authoritative = true;
        response.metadata.recursion_available = true;
        response.queries = request.queries.clone();
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            response.edns = Some(edns);
        }
        let reply = |mut response: Message, code: ResponseCode| {
            response.metadata.response_code = code;
            Some(Reply::new(response, request.edns.as_ref()))
        };

        if request.metadata.op_code != OpCode::Query {
            return reply(response, ResponseCode::NotImp);
        }
        let [query] = request.queries.as_slice() else {
            return reply(response, ResponseCode::FormErr);
        };
        let name = key(&query.name().to_ascii());
        *self.queries.entry(name.clone()).or_default() += 1;
        if self.failing {
            return reply(response, ResponseCode::ServFail);
        }

        let Some(set) = self.records(&name, query.query_type()) else {
            let code = if self.exists(&name) {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            };
            response.authorities.push(start_of_authority(&name));
            return reply(response, code);
        };
        // Owners are spelled as the question was, so a client that randomises the case of
        // its questions (draft-vixie-dnsext-dns0x20) finds its spelling back.
        for rdata in &set.data {
            response.answers.push(Record::from_rdata(
                query.name().clone(),
                set.ttl,
                rdata.clone(),
            ));
        }
        for rdata in &set.data {
            if let RData::SRV(srv) = rdata {
                response.additionals.extend(self.addresses_of(&srv.target));
            }
        }
        reply(response, ResponseCode::NoError)
    }

    /// The A and AAAA records of `name`, for an additional section.
    fn addresses_of(&self, name: &Name) -> Vec<Record> {
        let owner = key(&name.to_ascii());
        [RecordType::A, RecordType::AAAA]
            .into_iter()
            .filter_map(|record_type| self.records(&owner, record_type))
            .flat_map(|set| {
                set.data
                    .iter()
                    .map(|rdata| Record::from_rdata(name.clone(), set.ttl, rdata.clone()))
            })
            .collect()
    }
}

/// A response and the largest UDP payload the client that asked accepts.
struct Reply {
    message: Message,
    udp_limit: usize,
}

impl Reply {
    fn new(message: Message, request_edns: Option<&Edns>) -> Reply {
        let udp_limit = request_edns.map_or(CLASSIC_UDP_LIMIT, |edns| {
            usize::from(edns.max_payload()).max(CLASSIC_UDP_LIMIT)
        });
        Reply { message, udp_limit }
    }

    /// The bytes for a UDP datagram: the whole message, or the header and question with TC
    /// set when the whole message does not fit (RFC 2181 §9: the client then asks over TCP).
    fn to_datagram(&self) -> Vec<u8> {
        let bytes = self.message.to_vec().expect("encode a dns answer");
        if bytes.len() <= self.udp_limit {
            return bytes;
        }
        self.message
            .truncate()
            .to_vec()
            .expect("encode a truncated dns answer")
    }

    /// The bytes for a TCP stream: the whole message behind its two-byte length.
    fn to_frame(&self) -> Vec<u8> {
        let bytes = self.message.to_vec().expect("encode a dns answer");
        let length = u16::try_from(bytes.len()).expect("a dns answer fits in 64 KiB");
        let mut frame = Vec::with_capacity(2 + bytes.len());
        frame.extend_from_slice(&length.to_be_bytes());
        frame.extend_from_slice(&bytes);
        frame
    }
}

async fn serve_udp(socket: UdpSocket, zone: Arc<Mutex<Zone>>) {
    let mut buffer = vec![0; usize::from(u16::MAX)];
    loop {
        // A failed receive (an ICMP error for an earlier answer, say) loses at most one
        // question, which the client asks again, as it would on a real network.
        let Ok((length, peer)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        let Some(reply) = zone.lock().unwrap().handle(&buffer[..length]) else {
            continue;
        };
        // A failed send is a lost answer: the client's retry covers it, as above.
        let _ = socket.send_to(&reply.to_datagram(), peer).await;
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Mutex<Zone>>) {
    let mut connections = JoinSet::new();
    loop {
        // Forget the connections that ended, so the set stays as small as the live ones.
        while connections.try_join_next().is_some() {}
        // A failed accept (no file descriptors left, say) leaves that client to retry.
        if let Ok((stream, _)) = listener.accept().await {
            connections.spawn(serve_connection(stream, zone.clone()));
        }
    }
}

/// Answers length-prefixed questions on one connection, in order, until the client closes it.
async fn serve_connection(mut stream: TcpStream, zone: Arc<Mutex<Zone>>) {
    loop {
        let mut length = [0; 2];
        if stream.read_exact(&mut length).await.is_err() {
            return; // closed by the client between messages: the normal end
        }
        let mut request = vec![0; usize::from(u16::from_be_bytes(length))];
        if stream.read_exact(&mut request).await.is_err() {
            return; // closed in the middle of a message: nothing to answer
        }
        let Some(reply) = zone.lock().unwrap().handle(&request) else {
            continue;
        };
        if stream.write_all(&reply.to_frame()).await.is_err() {
            return; // the client is gone
        }
    }
}

/// How the server files a name: lower case, without the trailing dot.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `name` as a fully qualified domain name, with or without its trailing dot.
fn domain_name(name: &str) -> Name {
    let mut parsed =
        Name::from_ascii(name).unwrap_or_else(|e| panic!("{name:?} is not a domain name: {e}"));
    parsed.set_fqdn(true);
    parsed
}

/// The SOA for a negative answer about `name` (see [`key`]), owned by its top-level domain,
/// with TTL and minimum 0 so that the negative answer is not cached (RFC 2308 §5).
fn start_of_authority(name: &str) -> Record {
    let apex = name.rsplit('.').next().unwrap_or_default();
    let soa = SOA::new(
        domain_name(&format!("ns.{apex}")),
        domain_name(&format!("hostmaster.{apex}")),
        1,
        3600,
        600,
        86400,
        0,
    );
    let owner = if apex.is_empty() {
        Name::root()
    } else {
        domain_name(apex)
    };
    Record::from_rdata(owner, 0, RData::SOA(soa))
}
