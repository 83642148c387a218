//! The TLS test harness checked on its own, without the sidecar: the generated
//! certificates verify as intended (`openssl verify`), and Kamailio as a TLS core
//! (`tests/kamailio/tls-core.cfg`) completes, refuses and fails handshakes with
//! `openssl s_client` the way the sidecar's TLS tests rely on, registers a binding sent
//! to it over TLS, relays an INVITE that came over TLS to the far end, and one that came
//! over UDP to the registered Contact over a TLS connection of its own (`openssl s_server`
//! standing in for the sidecar's TLS listener).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::kamailio::{Kamailio, ServerCert, TlsCore};
use common::tls::{s_client, Pki, SClientOutcome};
use common::*;

/// Long enough for a loaded two-core machine; every run ends well before it.
const LIMIT: Duration = Duration::from_secs(10);

fn pki() -> Pki {
    Pki::generate(&["core.test", "127.0.0.1"])
}

async fn core(pki: &Pki, server_cert: ServerCert, require_client_cert: bool) -> Kamailio {
    Kamailio::tls_core(&TlsCore {
        pki,
        server_cert,
        require_client_cert,
        far_end: SocketAddr::from(([127, 0, 0, 1], free_port())),
    })
    .await
}

fn path(path: &Path) -> String {
    path.display().to_string()
}

/// `s_client` arguments: trust `ca`, fail on a verification error, send SNI `core.test`.
fn verifying(ca: &Path) -> Vec<String> {
    vec![
        "-CAfile".into(),
        path(ca),
        "-verify_return_error".into(),
        "-servername".into(),
        "core.test".into(),
    ]
}

fn with_client_cert(mut args: Vec<String>, pki: &Pki) -> Vec<String> {
    args.extend([
        "-cert".into(),
        path(&pki.client_cert()),
        "-key".into(),
        path(&pki.client_key()),
    ]);
    args
}

/// A handshake with standard input closed: `s_client` reports and leaves.
async fn handshake(kamailio: &Kamailio, args: &[String]) -> SClientOutcome {
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.push("-brief");
    s_client(kamailio.tls_addr(), &args, b"", None, LIMIT).await
}

/// A handshake after which `s_client` keeps reading until Kamailio hangs up or `limit`
/// runs out: under TLS 1.3 the server judges the client's certificate only after the
/// client has finished its side of the handshake, so a refusal arrives as an alert on the
/// first read.
async fn handshake_then_read(
    kamailio: &Kamailio,
    args: &[String],
    limit: Duration,
) -> SClientOutcome {
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["-brief", "-ign_eof"]);
    s_client(kamailio.tls_addr(), &args, b"", None, limit).await
}

/// A handshake that failed (exit status 1) saying each of `said` and none of `unsaid`.
fn refused(outcome: &SClientOutcome, said: &[&str], unsaid: &[&str]) {
    let output = outcome.output();
    assert_eq!(outcome.exit_code, Some(1), "{output}");
    for text in said {
        assert!(output.contains(text), "{text:?} missing from {output}");
    }
    for text in unsaid {
        assert!(!output.contains(text), "{text:?} in {output}");
    }
}

/// Kamailio's log says `text`.
fn logged(kamailio: &Kamailio, text: &str) {
    let log = kamailio.log();
    assert!(log.contains(text), "{text:?} missing from {log}");
}

fn openssl_verify(ca: &Path, cert: &Path) -> (bool, String) {
    let output = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg(cert)
        .output()
        .expect("run openssl verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn generated_certificates_verify_against_their_own_ca_only() {
    let pki = pki();
    for cert in [pki.server_cert(), pki.client_cert()] {
        let (ok, text) = openssl_verify(&pki.ca(), &cert);
        assert!(ok, "{} against the CA: {text}", cert.display());
    }
    let (ok, text) = openssl_verify(&pki.other_ca(), &pki.other_server_cert());
    assert!(ok, "the wrong CA's server certificate against it: {text}");

    let (ok, text) = openssl_verify(&pki.ca(), &pki.expired_cert());
    assert!(!ok && text.contains("certificate has expired"), "{text}");
    let (ok, text) = openssl_verify(&pki.other_ca(), &pki.server_cert());
    assert!(
        !ok && text.contains("unable to get local issuer certificate"),
        "{text}"
    );
    let (ok, text) = openssl_verify(&pki.ca(), &pki.other_server_cert());
    assert!(
        !ok && text.contains("unable to get local issuer certificate"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_with_the_ca_and_a_client_certificate_succeeds_under_mutual_tls() {
    let pki = pki();
    let kamailio = core(&pki, ServerCert::Valid, true).await;
    let outcome = handshake(&kamailio, &with_client_cert(verifying(&pki.ca()), &pki)).await;
    let output = outcome.output();
    assert_eq!(outcome.exit_code, Some(0), "{output}");
    assert!(output.contains("Verification: OK"), "{output}");
    assert!(
        output.contains("Peer certificate: CN = core.test"),
        "{output}"
    );
    assert!(output.contains("Protocol version: TLSv1.3"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_over_tls_1_2_is_offered_too() {
    let pki = pki();
    let kamailio = core(&pki, ServerCert::Valid, false).await;
    let mut args = verifying(&pki.ca());
    args.push("-tls1_2".into());
    let outcome = handshake(&kamailio, &args).await;
    let output = outcome.output();
    assert_eq!(outcome.exit_code, Some(0), "{output}");
    assert!(output.contains("Protocol version: TLSv1.2"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_is_refused() {
    let pki = pki();
    let kamailio = core(&pki, ServerCert::Valid, false).await;
    let mut args = verifying(&pki.ca());
    // OpenSSL 3 allows TLS 1.1 only at security level 0.
    args.extend([
        "-tls1_1".into(),
        "-cipher".into(),
        "DEFAULT:@SECLEVEL=0".into(),
    ]);
    let outcome = handshake(&kamailio, &args).await;
    refused(
        &outcome,
        &["alert protocol version"],
        &["CONNECTION ESTABLISHED"],
    );
    logged(&kamailio, "unsupported protocol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_mutual_tls_no_client_certificate_is_needed() {
    let pki = pki();
    let kamailio = core(&pki, ServerCert::Valid, false).await;
    let outcome =
        handshake_then_read(&kamailio, &verifying(&pki.ca()), Duration::from_secs(2)).await;
    // Nobody hangs up: the connection is kept until the time limit.
    assert!(outcome.timed_out, "{}", outcome.output());
    assert!(outcome.output().contains("Verification: OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_a_client_without_certificate_under_tls_1_3_after_the_handshake() {
    let pki = pki();
    let kamailio = core(&pki, ServerCert::Valid, true).await;
    let outcome = handshake_then_read(&kamailio, &verifying(&pki.ca()), LIMIT).await;
    // The client saw its side of the handshake complete, then the alert.
    refused(
        &outcome,
        &[
            "CONNECTION ESTABLISHED",
            "alert certificate required",
            "SSL alert number 116",
        ],
        &[],
    );
    logged(&kamailio, "peer did not return a certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_a_client_without_certificate_under_tls_1_2_in_the_handshake() {
    let pki = pki();
    let kamailio = core(&pki, ServerCert::Valid, true).await;
    let mut args = verifying(&pki.ca());
    args.push("-tls1_2".into());
    let outcome = handshake(&kamailio, &args).await;
    refused(
        &outcome,
        &["alert handshake failure", "SSL alert number 40"],
        &["CONNECTION ESTABLISHED"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_the_wrong_ca_fails_verification() {
    let pki = pki();
    let kamailio = core(&pki, ServerCert::Valid, false).await;
    let outcome = handshake(&kamailio, &verifying(&pki.other_ca())).await;
    refused(&outcome, &["certificate verify failed"], &[]);
    logged(&kamailio, "alert unknown ca");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_with_a_certificate_from_the_wrong_ca_fails_verification() {
    let pki = pki();
    let kamailio = core(&pki, ServerCert::WrongCa, false).await;
    let outcome = handshake(&kamailio, &verifying(&pki.ca())).await;
    refused(&outcome, &["certificate verify failed"], &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_with_an_expired_certificate_fails_verification() {
    let pki = pki();
    let kamailio = core(&pki, ServerCert::Expired, false).await;
    let outcome = handshake(&kamailio, &verifying(&pki.ca())).await;
    refused(&outcome, &["certificate has expired"], &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_over_mutual_tls_is_answered_200_and_the_binding_is_kept() {
    let pki = pki();
    let kamailio = core(&pki, ServerCert::Valid, true).await;
    let contact = "sip:trunk@127.0.0.1:5099;transport=tls;bsct=0";
    let register = format!(
        "REGISTER sip:core.test SIP/2.0\r\n\
         Via: SIP/2.0/TLS 127.0.0.1:5099;branch=z9hG4bK-tls-harness-1\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:trunk@core.test>;tag=harness\r\n\
         To: <sip:trunk@core.test>\r\n\
         Call-ID: tls-harness-register\r\n\
         CSeq: 1 REGISTER\r\n\
         Contact: <{contact}>\r\n\
         Expires: 600\r\n\
         Content-Length: 0\r\n\r\n"
    );
    let outcome = send_over_mutual_tls(&kamailio, &pki, &register).await;
    assert!(
        outcome.stdout.starts_with("SIP/2.0 200"),
        "{outcome:?}\nkamailio log:\n{}",
        kamailio.log()
    );
    assert!(outcome.stdout.contains("Call-ID: tls-harness-register"));
    let dump = kamailio.kamcmd("ul.dump");
    assert!(dump.contains("AoR: trunk"), "{dump}");
    assert!(dump.contains(&format!("Address: {contact}")), "{dump}");
    assert!(
        dump.contains(&format!("Socket: tls:{}", kamailio.tls_addr())),
        "{dump}"
    );
}

/// A SIP request with the given first line, `Via` sent-by (`SIP/2.0/TLS host:port`),
/// `Call-ID` (also the branch), `CSeq`, `extra` header lines, and no body.
/// Sends `message` over mutual TLS and returns once the first answer is complete.
async fn send_over_mutual_tls(kamailio: &Kamailio, pki: &Pki, message: &str) -> SClientOutcome {
    let mut args = with_client_cert(verifying(&pki.ca()), pki);
    // -quiet: only what the server sends on standard output; it also implies -ign_eof
    // (so the answer is waited for) and -nocommands (a line starting with R would
    // otherwise ask for a renegotiation).
    args.push("-quiet".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    s_client(
        kamailio.tls_addr(),
        &args,
        message.as_bytes(),
        Some("\r\n\r\n"),
        LIMIT,
    )
    .await
}

fn request(first_line: &str, via: &str, call_id: &str, cseq: &str, extra: &str) -> String {
    format!(
        "{first_line}\r\n\
         Via: {via};branch=z9hG4bK-{call_id}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:uac@core.test>;tag=harness\r\n\
         To: <sip:trunk@core.test>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq}\r\n\
         {extra}\
         Content-Length: 0\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_over_tls_goes_to_the_far_end_over_udp_record_routed() {
    let pki = pki();
    let far_end = tokio::net::UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let kamailio = Kamailio::tls_core(&TlsCore {
        pki: &pki,
        server_cert: ServerCert::Valid,
        require_client_cert: true,
        far_end: far_end.local_addr().unwrap(),
    })
    .await;
    let invite = request(
        "INVITE sip:far@core.test SIP/2.0",
        "SIP/2.0/TLS 127.0.0.1:5099",
        "tls-harness-invite-out",
        "1 INVITE",
        "Contact: <sip:trunk@127.0.0.1:5099;transport=tls>\r\n",
    );
    let mut args = with_client_cert(verifying(&pki.ca()), &pki);
    args.push("-quiet".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = s_client(
        kamailio.tls_addr(),
        &args,
        invite.as_bytes(),
        Some("SIP/2.0 100"),
        LIMIT,
    );
    let mut buffer = vec![0u8; 65536];
    let received = async {
        let (len, _) = far_end.recv_from(&mut buffer).await.unwrap();
        String::from_utf8_lossy(&buffer[..len]).into_owned()
    };
    let (outcome, relayed) = tokio::join!(client, tokio::time::timeout(LIMIT, received));
    let relayed = relayed.unwrap_or_else(|_| {
        panic!(
            "nothing reached the far end; {outcome:?}\nkamailio log:\n{}",
            kamailio.log()
        )
    });
    assert!(
        relayed.starts_with("INVITE sip:far@core.test SIP/2.0\r\n"),
        "{relayed}"
    );
    let record_route = format!("Record-Route: <sip:{};transport=tls;", kamailio.tls_addr());
    assert!(relayed.contains(&record_route), "{relayed}");
    assert!(relayed.contains("Call-ID: tls-harness-invite-out"));
}

/// `openssl s_server` standing in for the sidecar's TLS listener: prints what it receives
/// and answers nothing. Stopped when dropped.
struct TlsListener {
    child: tokio::process::Child,
    port: u16,
    // Held open: at the end of its input s_server closes the connection.
    _input: tokio::process::ChildStdin,
}

impl TlsListener {
    async fn start(pki: &Pki) -> TlsListener {
        let port = free_port();
        let mut child = tokio::process::Command::new("openssl")
            .arg("s_server")
            .arg("-accept")
            .arg(format!("{LOOPBACK}:{port}"))
            .arg("-cert")
            .arg(pki.client_cert())
            .arg("-key")
            .arg(pki.client_key())
            .arg("-quiet")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start openssl s_server");
        let input = child.stdin.take().unwrap();
        for _ in 0..100 {
            if std::net::TcpListener::bind((LOOPBACK, port)).is_err() {
                return TlsListener {
                    child,
                    port,
                    _input: input,
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("openssl s_server did not listen on {port}");
    }

    /// What it has received, once that contains `needle` (at most `LIMIT`).
    async fn received_until(&mut self, needle: &str) -> String {
        use tokio::io::AsyncReadExt as _;
        let stdout = self.child.stdout.as_mut().unwrap();
        let mut text = Vec::new();
        let read = async {
            let mut chunk = [0u8; 4096];
            while !String::from_utf8_lossy(&text).contains(needle) {
                let n = stdout.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                text.extend_from_slice(&chunk[..n]);
            }
        };
        // Out of time: the caller's assertion on what arrived reports it.
        let _ = tokio::time::timeout(LIMIT, read).await;
        String::from_utf8_lossy(&text).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_over_udp_goes_to_the_registered_contact_over_a_new_tls_connection() {
    let pki = pki();
    let kamailio = core(&pki, ServerCert::Valid, true).await;
    let mut listener = TlsListener::start(&pki).await;
    let contact = format!("sip:trunk@127.0.0.1:{};transport=tls;bsct=0", listener.port);
    let register = request(
        "REGISTER sip:core.test SIP/2.0",
        &format!("SIP/2.0/TLS 127.0.0.1:{}", listener.port),
        "tls-harness-register-contact",
        "1 REGISTER",
        &format!("Contact: <{contact}>\r\nExpires: 600\r\n"),
    );
    let outcome = send_over_mutual_tls(&kamailio, &pki, &register).await;
    assert!(outcome.stdout.starts_with("SIP/2.0 200"), "{outcome:?}");

    let uac = tokio::net::UdpSocket::bind((LOOPBACK, 0)).await.unwrap();
    let invite = request(
        "INVITE sip:trunk@core.test SIP/2.0",
        &format!("SIP/2.0/UDP {}", uac.local_addr().unwrap()),
        "tls-harness-invite-in",
        "1 INVITE",
        &format!("Contact: <sip:uac@{}>\r\n", uac.local_addr().unwrap()),
    );
    uac.send_to(invite.as_bytes(), kamailio.addr())
        .await
        .unwrap();
    let received = listener.received_until("\r\n\r\n").await;
    assert!(
        received.starts_with(&format!("INVITE {contact} SIP/2.0\r\n")),
        "{received:?}\nkamailio log:\n{}",
        kamailio.log()
    );
    assert!(received.contains("Call-ID: tls-harness-invite-in"));
    // Leaving UDP for TLS, Kamailio records both its sides (double Record-Route).
    let record_route = format!("Record-Route: <sip:{};transport=tls;", kamailio.tls_addr());
    assert!(received.contains(&record_route), "{received}");
    assert!(
        received.contains(&format!("Record-Route: <sip:{};", kamailio.addr())),
        "{received}"
    );
}
