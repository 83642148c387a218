//! Micro-benchmarks of the work done per SIP message on the proxy's path.
//!
//! - `invite_forward`: an INVITE as an Edge sends it, parsed, edited for forwarding (RFC
//!   3261 §16.6: Max-Forwards less one, two Record-Route entries, our Via on top, plus
//!   `Authorization: Bearer <token>`, RFC 8898) and written out again.
//! - `response_200_forward`: a 200 OK with three Vias, parsed, our Via popped (§16.7
//!   step 3) and written out again.
//! - `invite_parse`, `response_200_parse`: the parse alone.
//!
//! Each of these runs three times: `rsip` is the path the proxy took before issue 15
//! ([`message::parse`], the `message::*` editors, [`message::encode`]); `wire` is the
//! path it takes now ([`wire::parse`] over the view, lines kept as slices of the
//! received buffer, the `wire::*` editors, [`wire::Request::encode`]); `view` is the bare
//! [`MessageView`] with its splicing [`Edit`](byoc_sidecar::sip::view::Edit), the floor.
//! Before measuring, the outputs are checked to carry the same headers and body, so all
//! do the same work.
//!
//! - `credential/current_static_token`: [`CredentialManager::current`], read per request.
//! - `digest_authorize/{md5,sha256}`: one answer to a kept `qop="auth"` challenge.
//!
//! The message benchmarks report throughput in bytes of the received message.

use std::error::Error;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use byoc_sidecar::credentials::schedule::RefreshPolicy;
use byoc_sidecar::credentials::{
    CredentialManager, CredentialValue, ManagerOptions, Secret, StaticSource,
};
use byoc_sidecar::sip::digest::{ChallengeKind, DigestClient};
use byoc_sidecar::sip::message::{self, MessageError};
use byoc_sidecar::sip::via::Via;
use byoc_sidecar::sip::view::{HeaderName, MessageView, ViewError};
use byoc_sidecar::sip::wire;
use bytes::Bytes;
use criterion::{Criterion, Throughput};
use rsip::message::HasHeaders;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type BenchResult<T = ()> = Result<T, Box<dyn Error>>;

/// What the proxy adds to a request it forwards toward the core.
struct ForwardEdits {
    via: Via,
    /// The Record-Route URI of the side the request came in on (the Edge's).
    inner_record_route: String,
    /// The Record-Route URI of the side it leaves on (the core's); it ends up on top.
    outer_record_route: String,
    token: Secret,
}

impl ForwardEdits {
    fn new() -> Self {
        let mut via = Via::new("UDP", "192.0.2.10", 5070, "z9hG4bK-byoc-7f3a9c21e4b05d68");
        via.set_param("rport", None);
        Self {
            via,
            inner_record_route: "sip:10.20.30.1:5060;lr;trunk=0".to_string(),
            outer_record_route: "sip:192.0.2.10:5070;lr;trunk=0".to_string(),
            token: Secret::new(
                "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2lkcC5leGFtcGxlIiwic3ViIjoiZWRnZS1hIiwib3JnIjoib3JnLWEiLCJleHAiOjE4OTM0NTYwMDB9.c2lnbmF0dXJlLW9mLWEtcmVhbGlzdGljLWxlbmd0aC1mb3ItYmVuY2htYXJraW5n",
            ),
        }
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token.expose())
    }
}

/// An SDP offer of about 250 bytes: one audio stream, G.711 and telephone-event.
fn sdp(origin: &str, media_address: &str, port: u16) -> String {
    [
        "v=0".to_string(),
        format!("o=edge 1717171717 1717171717 IN IP4 {origin}"),
        "s=-".to_string(),
        format!("c=IN IP4 {media_address}"),
        "t=0 0".to_string(),
        format!("m=audio {port} RTP/AVP 0 8 101"),
        "a=rtpmap:0 PCMU/8000".to_string(),
        "a=rtpmap:8 PCMA/8000".to_string(),
        "a=rtpmap:101 telephone-event/8000".to_string(),
        "a=fmtp:101 0-16".to_string(),
        "a=ptime:20".to_string(),
        "a=maxptime:150".to_string(),
        "a=sendrecv".to_string(),
        String::new(),
    ]
    .join("\r\n")
}

/// Joins header lines and a body into a message with a matching Content-Length.
fn assemble(start_line: &str, headers: &[&str], body: &str) -> Bytes {
    let mut text = String::with_capacity(1024 + body.len());
    text.push_str(start_line);
    text.push_str("\r\n");
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    text.push_str(body);
    Bytes::from(text)
}

/// An initial INVITE as an Edge sends it to the proxy: 16 headers and an SDP offer.
fn edge_invite() -> Bytes {
    assemble(
        "INVITE sip:+14155550123@core.example.com;transport=udp SIP/2.0",
        &[
            "Via: SIP/2.0/UDP 10.20.30.40:5060;branch=z9hG4bK-524287-1---a1b2c3d4e5f60718;rport",
            "Max-Forwards: 70",
            "From: \"Alice Example\" <sip:+14155550100@edge.example.com>;tag=4a9c2f1e",
            "To: <sip:+14155550123@core.example.com>",
            "Call-ID: 8f14e45fceea167a5a36dedd4bea2543@10.20.30.40",
            "CSeq: 1 INVITE",
            "Contact: <sip:+14155550100@10.20.30.40:5060;transport=udp>",
            "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, NOTIFY, PRACK",
            "Supported: replaces, timer, 100rel",
            "Session-Expires: 1800;refresher=uac",
            "Min-SE: 90",
            "User-Agent: Edge/4.2.1",
            "P-Asserted-Identity: <sip:+14155550100@edge.example.com>",
            "Content-Type: application/sdp",
        ],
        &sdp("10.20.30.40", "10.20.30.41", 40000),
    )
}

/// The core's 200 OK to a forwarded INVITE: our Via on top of the Edge's and the core's
/// own, our two Record-Route entries, an SDP answer.
fn core_ok() -> Bytes {
    assemble(
        "SIP/2.0 200 OK",
        &[
            "Via: SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bK-byoc-7f3a9c21e4b05d68;rport=5070;received=192.0.2.10",
            "Via: SIP/2.0/UDP 10.20.30.40:5060;branch=z9hG4bK-524287-1---a1b2c3d4e5f60718;rport=5060",
            "Via: SIP/2.0/UDP 10.20.30.2:5060;branch=z9hG4bK-edge-lb-0c9d8e7f",
            "Record-Route: <sip:192.0.2.10:5070;lr;trunk=0>",
            "Record-Route: <sip:10.20.30.1:5060;lr;trunk=0>",
            "From: \"Alice Example\" <sip:+14155550100@edge.example.com>;tag=4a9c2f1e",
            "To: <sip:+14155550123@core.example.com>;tag=as7d91c2b0",
            "Call-ID: 8f14e45fceea167a5a36dedd4bea2543@10.20.30.40",
            "CSeq: 1 INVITE",
            "Contact: <sip:+14155550123@198.51.100.7:5060;transport=udp>",
            "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, PRACK",
            "Supported: replaces, timer",
            "Content-Type: application/sdp",
        ],
        &sdp("198.51.100.7", "198.51.100.8", 20000),
    )
}

/// Max-Forwards of the forwarded request (§16.6 step 3); a missing one becomes 70.
fn next_max_forwards(received: Option<u32>) -> u32 {
    received.map_or(70, |value| value.saturating_sub(1))
}

/// The old path for an INVITE: rsip parse, the proxy's edits, encode.
fn forward_invite_rsip(bytes: &[u8], edits: &ForwardEdits) -> Result<Bytes, MessageError> {
    let mut request = message::parse(bytes, true)?;
    let headers = request.headers_mut();
    let max_forwards = next_max_forwards(message::max_forwards(headers)?);
    message::set_max_forwards(headers, max_forwards);
    message::push_record_route(headers, &edits.inner_record_route);
    message::push_record_route(headers, &edits.outer_record_route);
    message::push_via(headers, &edits.via);
    headers.push(rsip::Header::Authorization(edits.bearer().into()));
    Ok(message::encode(&request))
}

/// The same INVITE on the view. Insertions at one place come out in the order of the
/// calls, so the Record-Route that goes on top is pushed first, and both are pushed before
/// the Via: with no Record-Route received they go above the first header line, where the
/// Via goes too.
fn forward_invite_view(bytes: &Bytes, edits: &ForwardEdits) -> Result<Bytes, ViewError> {
    let view = MessageView::parse(bytes.clone(), true)?;
    let max_forwards = next_max_forwards(view.max_forwards()?);
    let mut edit = view.edit();
    edit.set_header(HeaderName::MaxForwards, &max_forwards.to_string())?;
    edit.push_header(
        HeaderName::RecordRoute,
        &format!("<{}>", edits.outer_record_route),
    )?;
    edit.push_header(
        HeaderName::RecordRoute,
        &format!("<{}>", edits.inner_record_route),
    )?;
    edit.push_header(HeaderName::Via, &edits.via.to_string())?;
    edit.append_header(HeaderName::Authorization, &edits.bearer())?;
    Ok(edit.serialize())
}

/// The proxy's path for an INVITE: the wire model, its edits, encode.
fn forward_invite_wire(bytes: &Bytes, edits: &ForwardEdits) -> Result<Bytes, MessageError> {
    let wire::Message::Request(mut request) = wire::parse(bytes.clone(), true)? else {
        return Err(MessageError::Missing {
            header: "request line",
        });
    };
    let headers = &mut request.headers;
    let max_forwards = next_max_forwards(wire::max_forwards(headers)?);
    wire::set_max_forwards(headers, max_forwards);
    wire::push_record_route(headers, &edits.inner_record_route);
    wire::push_record_route(headers, &edits.outer_record_route);
    wire::push_via(headers, &edits.via);
    headers.push("Authorization", &edits.bearer());
    Ok(request.encode())
}

/// The proxy's path for a response: the wire model, pop our Via, encode.
fn forward_response_wire(bytes: &Bytes) -> Result<Bytes, MessageError> {
    let wire::Message::Response(mut response) = wire::parse(bytes.clone(), true)? else {
        return Err(MessageError::Missing {
            header: "status line",
        });
    };
    wire::remove_top_via(&mut response.headers)?;
    Ok(response.encode())
}

/// The old path for a response: rsip parse, pop our Via, encode.
fn forward_response_rsip(bytes: &[u8]) -> Result<Bytes, MessageError> {
    let mut response = message::parse(bytes, true)?;
    message::pop_via(response.headers_mut())?;
    Ok(message::encode(&response))
}

/// The same response on the view.
fn forward_response_view(bytes: &Bytes) -> Result<Bytes, ViewError> {
    let view = MessageView::parse(bytes.clone(), true)?;
    let mut edit = view.edit();
    edit.remove_first_value(HeaderName::Via)?;
    Ok(edit.serialize())
}

/// The values of every header name a message carries, names in lower case and sorted,
/// values in order (list headers split into elements), and the body: equal for two
/// messages that differ only in where lines of different names stand.
type Contents = (Vec<(String, Vec<String>)>, Bytes);

fn contents(bytes: &Bytes) -> BenchResult<Contents> {
    let view = MessageView::parse(bytes.clone(), true)?;
    let mut names: Vec<String> = view
        .headers()
        .map(|field| field.spelling.to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    let headers = names
        .into_iter()
        .map(|name| {
            let values = view
                .header_values(name.as_str())
                .map(str::to_string)
                .collect();
            (name, values)
        })
        .collect();
    Ok((headers, view.body()))
}

/// Checks that two paths produced the same message, up to the order of lines of
/// different names.
fn check_same(what: &str, rsip_out: &Bytes, view_out: &Bytes) -> BenchResult {
    if contents(rsip_out)? != contents(view_out)? {
        return Err(format!(
            "{what}: rsip and view outputs differ\n--- rsip\n{}\n--- view\n{}",
            String::from_utf8_lossy(rsip_out),
            String::from_utf8_lossy(view_out)
        )
        .into());
    }
    Ok(())
}

fn bench_messages(criterion: &mut Criterion) -> BenchResult {
    let edits = ForwardEdits::new();
    let invite = edge_invite();
    let ok = core_ok();
    check_same(
        "INVITE",
        &forward_invite_rsip(&invite, &edits)?,
        &forward_invite_view(&invite, &edits)?,
    )?;
    check_same(
        "200 OK",
        &forward_response_rsip(&ok)?,
        &forward_response_view(&ok)?,
    )?;
    check_same(
        "INVITE (wire)",
        &forward_invite_rsip(&invite, &edits)?,
        &forward_invite_wire(&invite, &edits)?,
    )?;
    check_same(
        "200 OK (wire)",
        &forward_response_rsip(&ok)?,
        &forward_response_wire(&ok)?,
    )?;

    let mut group = criterion.benchmark_group("invite_forward");
    group.throughput(Throughput::Bytes(invite.len() as u64));
    group.bench_function("rsip", |bencher| {
        bencher.iter(|| forward_invite_rsip(black_box(&invite), &edits))
    });
    group.bench_function("wire", |bencher| {
        bencher.iter(|| forward_invite_wire(black_box(&invite), &edits))
    });
    group.bench_function("view", |bencher| {
        bencher.iter(|| forward_invite_view(black_box(&invite), &edits))
    });
    group.finish();

    let mut group = criterion.benchmark_group("response_200_forward");
    group.throughput(Throughput::Bytes(ok.len() as u64));
    group.bench_function("rsip", |bencher| {
        bencher.iter(|| forward_response_rsip(black_box(&ok)))
    });
    group.bench_function("wire", |bencher| {
        bencher.iter(|| forward_response_wire(black_box(&ok)))
    });
    group.bench_function("view", |bencher| {
        bencher.iter(|| forward_response_view(black_box(&ok)))
    });
    group.finish();

    for (name, bytes) in [("invite_parse", &invite), ("response_200_parse", &ok)] {
        message::parse(bytes, true)?;
        MessageView::parse(bytes.clone(), true)?;
        let mut group = criterion.benchmark_group(name);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function("rsip", |bencher| {
            bencher.iter(|| message::parse(black_box(bytes), true))
        });
        group.bench_function("wire", |bencher| {
            bencher.iter(|| wire::parse(black_box(bytes).clone(), true))
        });
        group.bench_function("view", |bencher| {
            bencher.iter(|| MessageView::parse(black_box(bytes).clone(), true))
        });
        group.finish();
    }
    Ok(())
}

/// A manager of a `static` token, with its first credential fetched. The refresher runs
/// on `runtime`, idle once a static credential is in; the reads are measured outside it.
fn static_token_manager(
    runtime: &tokio::runtime::Runtime,
    cancel: &CancellationToken,
) -> BenchResult<CredentialManager> {
    let _context = runtime.enter();
    let manager = CredentialManager::start(
        Arc::new(StaticSource::new(CredentialValue::Token(Secret::new(
            "static-bench-token",
        )))),
        ManagerOptions {
            trunk: "bench".to_string(),
            organization: None,
            scopes: Vec::new(),
            organization_claim: None,
            policy: RefreshPolicy::default(),
            skew_threshold: Duration::from_secs(30),
        },
        cancel.clone(),
        &TaskTracker::new(),
    );
    let mut attempts = manager.attempts();
    runtime.block_on(tokio::time::timeout(
        Duration::from_secs(10),
        attempts.wait_for(|_| manager.current().is_some()),
    ))??;
    Ok(manager)
}

fn bench_credential(criterion: &mut Criterion) -> BenchResult {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cancel = CancellationToken::new();
    let manager = static_token_manager(&runtime, &cancel)?;
    let mut group = criterion.benchmark_group("credential");
    group.bench_function("current_static_token", |bencher| {
        bencher.iter(|| black_box(&manager).current())
    });
    group.finish();
    cancel.cancel();
    Ok(())
}

/// A Digest client holding one `WWW-Authenticate` challenge for INVITE with `algorithm`.
fn challenged_client(algorithm: &str) -> BenchResult<DigestClient> {
    let challenge = format!(
        "Digest realm=\"core.example.com\", nonce=\"5f2b9c1e8d7a4b3c6e0f1a2b3c4d5e6f\", \
         opaque=\"a1b2c3d4\", qop=\"auth\", algorithm={algorithm}"
    );
    let mut client = DigestClient::new(Some("core.example.com".to_string()));
    let verdict = client.learn(ChallengeKind::Www, "INVITE", [challenge.as_str()], &[]);
    if client
        .session(ChallengeKind::Www, "core.example.com")
        .is_none()
    {
        return Err(format!("the {algorithm} challenge was not kept: {verdict:?}").into());
    }
    Ok(client)
}

fn bench_digest(criterion: &mut Criterion) -> BenchResult {
    const URI: &str = "sip:+14155550123@core.example.com;transport=udp";
    const USERNAME: &str = "trunk-user";
    const CNONCE: &str = "0a4f113b9c2d7e5f";
    let password = Secret::new("correct horse battery staple");
    let mut group = criterion.benchmark_group("digest_authorize");
    for (name, algorithm) in [("md5", "MD5"), ("sha256", "SHA-256")] {
        let mut client = challenged_client(algorithm)?;
        let answers = client.authorize("INVITE", URI, USERNAME, &password, || CNONCE.to_string());
        let expected = format!("algorithm={algorithm}");
        if answers.len() != 1 || !answers.iter().all(|(_, value)| value.contains(&expected)) {
            return Err(format!("no single {algorithm} answer: {answers:?}").into());
        }
        group.bench_function(name, |bencher| {
            bencher.iter(|| {
                client.authorize(
                    black_box("INVITE"),
                    black_box(URI),
                    USERNAME,
                    &password,
                    || CNONCE.to_string(),
                )
            })
        });
    }
    group.finish();
    Ok(())
}

fn main() -> BenchResult {
    let mut criterion = Criterion::default().configure_from_args();
    bench_messages(&mut criterion)?;
    bench_credential(&mut criterion)?;
    bench_digest(&mut criterion)?;
    criterion.final_summary();
    Ok(())
}
