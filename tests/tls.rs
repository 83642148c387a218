//! TLS toward a real core: Kamailio (Debian `kamailio-tls-modules`) with certificates the
//! test generates. Calls and registration go through the sidecar over TLS in both
//! directions, with mutual TLS; a core whose certificate is issued by an unknown CA, one
//! whose certificate names another host, and one that requires a client certificate the
//! sidecar does not have are each refused, counted under their reason, and the Edge gets
//! 503 at once instead of a timeout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::registration::State;
use byoc_sidecar::stats::StatsSnapshot;
use byoc_sidecar::transport::Side;
use common::kamailio::{Kamailio, ServerCert, TlsCore};
use common::raw::{self, RawPeer};
use common::tls::Pki;
use common::*;

/// The sidecar's configuration toward a TLS core at `core`: a TLS listener on the core
/// side with the Pki's server certificate, `tls_lines` in `[trunk.tls]`, `trunk_extra`
/// lines in the trunk.
fn config(
    pki: &Pki,
    edge_port: u16,
    core: SocketAddr,
    tls_lines: &str,
    trunk_extra: &str,
) -> String {
    format!(
        r#"{edge}{core_side}
[sip]
t1 = "100ms"

[[trunk]]
name = "test"
edge = "udp:127.0.0.1:{edge_port}"
core = "tls:{core}"
{trunk_extra}

[trunk.tls]
{tls_lines}
"#,
        edge = side("edge", &["udp:127.0.0.1:0"], true, None),
        core_side = side(
            "core_side",
            &["udp:127.0.0.1:0", "tls:127.0.0.1:0"],
            true,
            Some((&pki.server_cert(), &pki.server_key())),
        ),
    )
}

/// An Edge side on UDP and a core side with only a `tls:` listener presenting `cert`.
fn tls_core_side(cert: &std::path::Path, key: &std::path::Path) -> String {
    format!(
        "{}{}",
        side("edge", &["udp:127.0.0.1:0"], true, None),
        side("core_side", &["tls:127.0.0.1:0"], true, Some((cert, key)))
    )
}

/// Trusting the Pki's CA, checking the name `core.test`, presenting the client
/// certificate.
fn mutual(pki: &Pki) -> String {
    format!(
        "ca_file = \"{}\"\nserver_name = \"core.test\"\ncertificate_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.ca().display(),
        pki.client_cert().display(),
        pki.client_key().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_registration_cross_tls_in_both_directions() {
    const CALLS: u64 = 10;
    let pki = Pki::generate(&["core.test", "127.0.0.1"]);
    // Edge -> sidecar -> TLS -> Kamailio -> this far end.
    let far_end_port = free_port();
    let far_end = Sipp::start(
        "far end uas",
        &uas_args("uas.xml", far_end_port, Transport::Udp, CALLS),
    );
    let kamailio = Kamailio::tls_core(&TlsCore {
        pki: &pki,
        server_cert: ServerCert::Valid,
        require_client_cert: true,
        far_end: format!("127.0.0.1:{far_end_port}").parse().unwrap(),
    })
    .await;
    let edge_port = free_port();
    let text = config(
        &pki,
        edge_port,
        kamailio.tls_addr(),
        &mutual(&pki),
        "\n[trunk.registration]\naor = \"sip:trunk@core.test\"\nexpires = \"60s\"\n",
    );
    let sidecar = Sidecar::start_with(&text).await;
    let mut status = sidecar.app.registrations["test"].clone();
    // The watch's guard is dropped at once: held, it would block the driver's updates.
    let registered = tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|status| status.state == State::Registered),
    )
    .await
    .is_ok_and(|seen| seen.is_ok());
    if !registered {
        panic!(
            "not registered over TLS in 10 s; kamailio log:\n{}",
            kamailio.log()
        );
    }
    // The binding names the sidecar's TLS listener.
    let tls_listener = sidecar.addr(Side::Core, Transport::Tls);
    let dump = kamailio.kamcmd("ul.dump");
    assert!(
        dump.contains(&format!("sip:trunk@{tls_listener};transport=tls")),
        "no TLS binding for {tls_listener} in:\n{dump}"
    );

    let uac = Sipp::start(
        "edge uac",
        &uac_args(
            "uac.xml",
            sidecar.addr(Side::Edge, Transport::Udp),
            Transport::Udp,
            CALLS,
            10,
            200,
        ),
    );
    let uac = uac.finish(Duration::from_secs(60)).await;
    let far_end = far_end.finish(Duration::from_secs(30)).await;
    if uac.successful != CALLS {
        eprintln!("kamailio log:\n{}", kamailio.log());
    }
    assert_all_calls_succeeded(&uac, CALLS, "the Edge calling over TLS");
    assert_all_calls_succeeded(&far_end, CALLS, "the far end behind the TLS core");

    // The core calls the trunk: sipp -> Kamailio -> (lookup, TLS to the sidecar's
    // listener) -> sidecar -> the Edge; the ACK and BYE follow the TLS Record-Route.
    let edge = Sipp::start(
        "edge uas",
        &uas_args("uas.xml", edge_port, Transport::Udp, CALLS),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut args = uac_args("uac.xml", kamailio.addr(), Transport::Udp, CALLS, 10, 200);
    args.extend(["-s".to_string(), "trunk".to_string()]);
    let caller = Sipp::start("core uac", &args)
        .finish(Duration::from_secs(60))
        .await;
    let edge = edge.finish(Duration::from_secs(30)).await;
    if caller.successful != CALLS {
        eprintln!("kamailio log:\n{}", kamailio.log());
    }
    assert_all_calls_succeeded(&caller, CALLS, "the core side calling over TLS");
    assert_all_calls_succeeded(&edge, CALLS, "the Edge answering");
    let stats = sidecar.app.stats.snapshot();
    assert_eq!(tls_failures(&stats), 0, "{stats:?}");
    // Shutdown unregisters over the same TLS connection.
    sidecar.stop().await;
    let dump = kamailio.kamcmd("ul.dump");
    assert!(
        !dump.contains(&format!("sip:trunk@{tls_listener}")),
        "still bound after shutdown:\n{dump}"
    );
}

fn tls_failures(stats: &StatsSnapshot) -> u64 {
    stats.tls_unknown_ca
        + stats.tls_name_mismatch
        + stats.tls_expired_certificate
        + stats.tls_client_certificate_refused
        + stats.tls_other_failures
}

/// One INVITE from a raw Edge through a sidecar configured with `tls_lines` toward a
/// Kamailio presenting `server_cert`; the status the Edge gets, and the sidecar's counters.
async fn refused(
    server_cert: ServerCert,
    require_client_cert: bool,
    tls_lines: &str,
) -> (u16, StatsSnapshot) {
    let pki = Pki::generate(&["core.test", "127.0.0.1"]);
    let kamailio = Kamailio::tls_core(&TlsCore {
        pki: &pki,
        server_cert,
        require_client_cert,
        far_end: "127.0.0.1:9".parse().unwrap(),
    })
    .await;
    let edge = RawPeer::bind().await;
    let text = config(
        &pki,
        edge.addr.port(),
        kamailio.tls_addr(),
        &tls_lines
            .replace("@CA@", &pki.ca().display().to_string())
            .replace("@OTHER_CA@", &pki.other_ca().display().to_string())
            .replace("@CERT@", &pki.client_cert().display().to_string())
            .replace("@KEY@", &pki.client_key().display().to_string()),
        "",
    );
    let sidecar = Sidecar::start_with(&text).await;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    edge.send(
        &raw::invite(edge.addr, target, "z9hG4bKtls1", "tls-refused"),
        target,
    )
    .await;
    // 100 Trying at once, then the final answer: well before Timer B (6.4 s here).
    let answer = tokio::time::timeout(Duration::from_secs(5), raw::final_response(&edge))
        .await
        .expect("a final answer before the transaction times out");
    let stats = sidecar.app.stats.snapshot();
    sidecar.stop().await;
    (raw::status(&answer), stats)
}

/// A sidecar set up with `tls_lines` toward a Kamailio presenting `server_cert` is
/// refused: the Edge gets 503 at once, and the failure is counted under its reason
/// (`counter`) and no other.
async fn expect_refusal(
    server_cert: ServerCert,
    require_client_cert: bool,
    tls_lines: &str,
    counter: fn(&StatsSnapshot) -> u64,
) {
    let (status, stats) = refused(server_cert, require_client_cert, tls_lines).await;
    assert_eq!(status, 503);
    assert!(counter(&stats) >= 1, "{stats:?}");
    assert_eq!(tls_failures(&stats), counter(&stats), "{stats:?}");
}

const TRUSTING_CORE_TEST: &str = "ca_file = \"@CA@\"\nserver_name = \"core.test\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_certificate_from_an_unknown_ca_is_refused() {
    expect_refusal(ServerCert::WrongCa, false, TRUSTING_CORE_TEST, |stats| {
        stats.tls_unknown_ca
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_certificate_for_another_name_is_refused() {
    let elsewhere = TRUSTING_CORE_TEST.replace("core.test", "elsewhere.test");
    expect_refusal(ServerCert::Valid, false, &elsewhere, |stats| {
        stats.tls_name_mismatch
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_core_certificate_is_refused() {
    expect_refusal(ServerCert::Expired, false, TRUSTING_CORE_TEST, |stats| {
        stats.tls_expired_certificate
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_that_requires_a_client_certificate_refuses_a_sidecar_without_one() {
    expect_refusal(ServerCert::Valid, true, TRUSTING_CORE_TEST, |stats| {
        stats.tls_client_certificate_refused
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_core_with_the_right_ca_name_and_certificate_answers() {
    // The control for the refusals above: only the one setting differs.
    let pki = Pki::generate(&["core.test", "127.0.0.1"]);
    let far_end = RawPeer::bind().await;
    let kamailio = Kamailio::tls_core(&TlsCore {
        pki: &pki,
        server_cert: ServerCert::Valid,
        require_client_cert: true,
        far_end: far_end.addr,
    })
    .await;
    let edge = RawPeer::bind().await;
    let sidecar = Sidecar::start_with(&config(
        &pki,
        edge.addr.port(),
        kamailio.tls_addr(),
        &mutual(&pki),
        "",
    ))
    .await;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    edge.send(
        &raw::invite(edge.addr, target, "z9hG4bKtls2", "tls-accepted"),
        target,
    )
    .await;
    let (invite, from) = raw::next_request(&far_end, rsip::Method::Invite).await;
    far_end
        .send(&raw::answer(&invite, 486, "Busy Here", "far"), from)
        .await;
    let answer = raw::final_response(&edge).await;
    assert_eq!(raw::status(&answer), 486, "{}", kamailio.log());
    assert_eq!(tls_failures(&sidecar.app.stats.snapshot()), 0);
    sidecar.stop().await;
}

/// `s_client` arguments: trust `ca`, fail on a verification error, SNI `core.test`.
fn verifying(ca: &std::path::Path) -> Vec<String> {
    vec![
        "-CAfile".into(),
        ca.display().to_string(),
        "-verify_return_error".into(),
        "-servername".into(),
        "core.test".into(),
    ]
}

/// Whether a handshake with the sidecar's listener at `addr` verifies against `ca`.
async fn verifies(addr: SocketAddr, ca: &std::path::Path) -> bool {
    let mut args = verifying(ca);
    args.push("-brief".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome = common::tls::s_client(addr, &args, b"", None, Duration::from_secs(5)).await;
    outcome.exit_code == Some(0) && outcome.output().contains("Verification: OK")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_may_reach_the_sidecar_over_tls() {
    let pki = Pki::generate(&["core.test", "127.0.0.1"]);
    let core = RawPeer::bind().await;
    let text = format!(
        "{}{}\n[[trunk]]\nname = \"test\"\nedge = \"udp:127.0.0.1:9\"\ncore = \"udp:{}\"\n",
        side(
            "edge",
            &["udp:127.0.0.1:0", "tls:127.0.0.1:0"],
            true,
            Some((&pki.server_cert(), &pki.server_key())),
        ),
        side("core_side", &["udp:127.0.0.1:0"], true, None),
        core.addr,
    );
    let sidecar = Sidecar::start_with(&text).await;
    let edge_tls = sidecar.addr(Side::Edge, Transport::Tls);
    let invite = raw::invite(
        "127.0.0.1:5099".parse().unwrap(),
        edge_tls,
        "z9hG4bKedgetls",
        "edge-tls",
    )
    .replace("SIP/2.0/UDP", "SIP/2.0/TLS");
    let mut args = verifying(&pki.ca());
    args.push("-quiet".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = common::tls::s_client(
        edge_tls,
        &args,
        invite.as_bytes(),
        Some("SIP/2.0 486"),
        Duration::from_secs(10),
    );
    let answering = async {
        let (invite, from) = raw::next_request(&core, rsip::Method::Invite).await;
        // The core sees the Record-Route of the Edge's side say TLS.
        let routes = raw::record_routes(&invite);
        core.send(&raw::answer(&invite, 486, "Busy Here", "core"), from)
            .await;
        routes
    };
    let (outcome, routes) = tokio::join!(client, answering);
    assert!(
        outcome.stdout.contains("SIP/2.0 486"),
        "the answer did not come back over TLS: {outcome:?}"
    );
    assert!(
        routes
            .iter()
            .any(|route| route.contains(&format!("{edge_tls};transport=tls"))),
        "{routes:?}"
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_certificate_is_reloaded_on_sighup_and_when_its_files_change() {
    let pki = Pki::generate(&["core.test", "127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(pki.server_cert(), &cert).unwrap();
    std::fs::copy(pki.server_key(), &key).unwrap();
    let text = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "{}\n[[trunk]]\nname = \"test\"\nedge = \"udp:127.0.0.1:9\"\ncore = \"tls:127.0.0.1:9\"\n",
            tls_core_side(cert, key)
        )
    };
    let sidecar = Sidecar::start_with(&text(&cert, &key)).await;
    let listener = sidecar.addr(Side::Core, Transport::Tls);
    assert!(verifies(listener, &pki.ca()).await);
    assert!(!verifies(listener, &pki.other_ca()).await);

    // SIGHUP: a re-read configuration naming other files.
    let settings = byoc_sidecar::config::Config::from_toml(
        &text(&pki.other_server_cert(), &pki.other_server_key()),
        "reloaded",
    )
    .unwrap()
    .validate()
    .unwrap();
    sidecar.app.reload(&settings);
    assert!(verifies(listener, &pki.other_ca()).await);
    assert!(!verifies(listener, &pki.ca()).await);

    // A broken file is refused and the certificate in use stays.
    std::fs::write(dir.path().join("broken.pem"), "not a certificate\n").unwrap();
    let broken = byoc_sidecar::config::Config::from_toml(
        &text(&dir.path().join("broken.pem"), &key),
        "broken",
    )
    .unwrap()
    .validate()
    .unwrap();
    sidecar.app.reload(&broken);
    assert!(verifies(listener, &pki.other_ca()).await);

    // The files in use change in place: picked up within the check interval (2 s).
    sidecar.app.reload(
        &byoc_sidecar::config::Config::from_toml(&text(&cert, &key), "back")
            .unwrap()
            .validate()
            .unwrap(),
    );
    assert!(verifies(listener, &pki.ca()).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::copy(pki.other_server_cert(), &cert).unwrap();
    std::fs::copy(pki.other_server_key(), &key).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    loop {
        if verifies(listener, &pki.other_ca()).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the changed files were not picked up"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    sidecar.stop().await;
}

/// (Call-ID, the client certificate it came under), per INVITE.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A TLS core in this process that asks for client certificates (from either of `cas`),
/// answers every INVITE 486 on the connection it came on, and records which client
/// certificate each call's INVITE arrived under.
struct CertRecordingCore {
    addr: SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl CertRecordingCore {
    /// With `tls12_only`, the core speaks TLS 1.2 and nothing newer.
    async fn start(pki: &Pki, cas: &[std::path::PathBuf], tls12_only: bool) -> CertRecordingCore {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for ca in cas {
            roots
                .add(CertificateDer::from_pem_file(ca).unwrap())
                .unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.server_cert())
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(pki.server_key()).unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            rustls::DEFAULT_VERSIONS
        };
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Seen = std::sync::Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, record) = (acceptor.clone(), record.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(mut stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let certificate = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| leaf.to_vec())
                        .unwrap_or_default();
                    let mut framer = byoc_sidecar::sip::framing::StreamFramer::new(65_535);
                    loop {
                        match stream.read_buf(framer.buffer_mut()).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        while let Ok(Some(frame)) = framer.next_frame() {
                            let byoc_sidecar::sip::framing::Frame::Message(bytes) = frame else {
                                continue;
                            };
                            let message = byoc_sidecar::sip::message::parse(&bytes, false).unwrap();
                            let rsip::SipMessage::Request(request) = &message else {
                                continue;
                            };
                            if request.method != rsip::Method::Invite {
                                continue;
                            }
                            let call_id = raw::header_values(&message, "Call-ID")[0].clone();
                            record.lock().unwrap().push((call_id, certificate.clone()));
                            let answer = raw::answer(&message, 486, "Busy Here", "core");
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        CertRecordingCore { addr, seen, task }
    }
}

impl Drop for CertRecordingCore {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trunks_sharing_a_tls_core_each_present_their_own_client_certificate() {
    use rustls::pki_types::pem::PemObject;
    let (pki_a, pki_b) = (
        Pki::generate(&["core.test", "127.0.0.1"]),
        Pki::generate(&["core.test", "127.0.0.1"]),
    );
    let core = CertRecordingCore::start(&pki_a, &[pki_a.ca(), pki_b.ca()], false).await;
    let (edge_a, edge_b) = (
        RawPeer::bind_on("127.0.0.4").await,
        RawPeer::bind_on("127.0.0.5").await,
    );
    let trunk = |name: &str, edge: &RawPeer, client: &Pki| {
        format!(
            "[[trunk]]\nname = \"{name}\"\nmatch = {{ source = [\"{ip}\"] }}\nedge = \"udp:{edge}\"\n\
             core = \"tls:{core}\"\n[trunk.tls]\nca_file = \"{ca}\"\nserver_name = \"core.test\"\n\
             certificate_file = \"{cert}\"\nkey_file = \"{key}\"\n",
            ip = edge.addr.ip(),
            edge = edge.addr,
            core = core.addr,
            ca = pki_a.ca().display(),
            cert = client.client_cert().display(),
            key = client.client_key().display(),
        )
    };
    let text = format!(
        "{}\n{}\n{}",
        tls_core_side(&pki_a.server_cert(), &pki_a.server_key()),
        trunk("org-a", &edge_a, &pki_a),
        trunk("org-b", &edge_b, &pki_b),
    );
    let sidecar = Sidecar::start_with(&text).await;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    for (edge, call) in [
        (&edge_a, "from-a-1"),
        (&edge_b, "from-b-1"),
        (&edge_a, "from-a-2"),
        (&edge_b, "from-b-2"),
    ] {
        edge.send(
            &raw::invite(edge.addr, target, &format!("z9hG4bK{call}"), call),
            target,
        )
        .await;
        assert_eq!(raw::status(&raw::final_for(edge, call).await), 486);
    }
    let certificate = |pki: &Pki| {
        rustls::pki_types::CertificateDer::from_pem_file(pki.client_cert())
            .unwrap()
            .to_vec()
    };
    let seen = core.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    for (call, presented) in seen {
        let expected = if call.starts_with("from-a") {
            certificate(&pki_a)
        } else {
            certificate(&pki_b)
        };
        assert!(
            presented == expected,
            "{call} arrived under the other trunk's certificate"
        );
    }
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_that_speaks_only_tls_1_2_is_reached() {
    let pki = Pki::generate(&["core.test", "127.0.0.1"]);
    let core = CertRecordingCore::start(&pki, &[pki.ca()], true).await;
    let edge = RawPeer::bind().await;
    let sidecar = Sidecar::start_with(&config(
        &pki,
        edge.addr.port(),
        core.addr,
        &mutual(&pki),
        "",
    ))
    .await;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    edge.send(
        &raw::invite(edge.addr, target, "z9hG4bKtls12", "tls12"),
        target,
    )
    .await;
    assert_eq!(raw::status(&raw::final_for(&edge, "tls12").await), 486);
    assert_eq!(core.seen.lock().unwrap().len(), 1);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunks_tls_settings_are_re_read_on_sighup_for_new_connections() {
    let pki = Pki::generate(&["core.test", "127.0.0.1"]);
    let core = CertRecordingCore::start(&pki, &[pki.ca()], false).await;
    let edge = RawPeer::bind().await;
    let with_ca = |ca: &std::path::Path| {
        let lines = mutual(&pki).replace(
            &format!("ca_file = \"{}\"", pki.ca().display()),
            &format!("ca_file = \"{}\"", ca.display()),
        );
        config(&pki, edge.addr.port(), core.addr, &lines, "")
    };
    // Trusting the wrong CA: refused.
    let sidecar = Sidecar::start_with(&with_ca(&pki.other_ca())).await;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    edge.send(
        &raw::invite(edge.addr, target, "z9hG4bKrel1", "reload-1"),
        target,
    )
    .await;
    assert_eq!(raw::status(&raw::final_for(&edge, "reload-1").await), 503);
    assert!(sidecar.app.stats.snapshot().tls_unknown_ca >= 1);
    // SIGHUP with the right CA: the next connection verifies.
    let settings = byoc_sidecar::config::Config::from_toml(&with_ca(&pki.ca()), "reloaded")
        .unwrap()
        .validate()
        .unwrap();
    sidecar.app.reload(&settings);
    edge.send(
        &raw::invite(edge.addr, target, "z9hG4bKrel2", "reload-2"),
        target,
    )
    .await;
    assert_eq!(raw::status(&raw::final_for(&edge, "reload-2").await), 486);
    sidecar.stop().await;
}
