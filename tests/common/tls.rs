//! TLS material the tests make for themselves: a small public key infrastructure written
//! as PEM files to a temporary directory (see [`Pki::generate`]), and [`s_client`], which
//! probes a TLS listener with `openssl s_client` under a time limit.
//!
//! Every key is ECDSA P-256 (rcgen's default), which OpenSSL (Kamailio's tls module) and
//! rustls both accept; private keys are unencrypted PKCS#8, as Kamailio requires.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The common name (and only DNS name) of [`Pki::client_cert`].
pub const CLIENT_NAME: &str = "sidecar.test";

/// Certificates and keys as PEM files in `dir`, removed with it.
///
/// Leaf certificates carry both the serverAuth and the clientAuth purpose, so either can
/// sit at either end of a connection (Kamailio, for one, presents its server certificate
/// when it connects out).
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// A CA; a server certificate for `names` (DNS names and IP addresses, e.g.
    /// `["core.test", "127.0.0.1"]`, the first also its common name) signed by it; a client
    /// certificate for [`CLIENT_NAME`] signed by it; a server certificate for `names` that
    /// expired in 2001, signed by it too; and a second, unrelated CA with its own server
    /// certificate for `names`.
    pub fn generate(names: &[&str]) -> Pki {
        let dir = tempfile::tempdir().expect("temporary directory for the pki");
        let pki = Pki { dir };
        let ca = pki.issue_ca("byoc test CA", &pki.ca());
        pki.issue_leaf(&ca, names, &pki.server_cert(), &pki.server_key(), |_| {});
        pki.issue_leaf(
            &ca,
            &[CLIENT_NAME],
            &pki.client_cert(),
            &pki.client_key(),
            |_| {},
        );
        pki.issue_leaf(
            &ca,
            names,
            &pki.expired_cert(),
            &pki.expired_key(),
            |params| {
                params.not_before = date_time_ymd(2000, 1, 1);
                params.not_after = date_time_ymd(2001, 1, 1);
            },
        );
        let other = pki.issue_ca("byoc wrong CA", &pki.other_ca());
        pki.issue_leaf(
            &other,
            names,
            &pki.other_server_cert(),
            &pki.other_server_key(),
            |_| {},
        );
        pki
    }

    /// The CA certificate that signed every certificate below except the `other_` ones.
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.path("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.path("server.key")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.path("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.path("client.key")
    }

    /// A server certificate for the same names, signed by the CA, valid only in 2000.
    pub fn expired_cert(&self) -> PathBuf {
        self.path("expired.pem")
    }

    pub fn expired_key(&self) -> PathBuf {
        self.path("expired.key")
    }

    /// The unrelated ("wrong") CA.
    pub fn other_ca(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    /// A server certificate for the same names, signed by the wrong CA.
    pub fn other_server_cert(&self) -> PathBuf {
        self.path("other-server.pem")
    }

    pub fn other_server_key(&self) -> PathBuf {
        self.path("other-server.key")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A self-signed CA named `name`, its certificate written to `cert_path`.
    fn issue_ca(&self, name: &str, cert_path: &Path) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, name.to_string());
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("generate a CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("self-sign the CA");
        std::fs::write(cert_path, ca.pem()).expect("write the CA certificate");
        ca
    }

    /// A leaf certificate for `names` signed by `issuer`, after `adjust` has had its say
    /// on the parameters; certificate and key written to the two paths.
    fn issue_leaf(
        &self,
        issuer: &Issuer<'_, KeyPair>,
        names: &[&str],
        cert_path: &Path,
        key_path: &Path,
        adjust: impl FnOnce(&mut CertificateParams),
    ) {
        let mut params = CertificateParams::new(
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .expect("valid subject alternative names");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("unnamed").to_string(),
        );
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        adjust(&mut params);
        let key = KeyPair::generate().expect("generate a leaf key");
        let cert = params.signed_by(&key, issuer).expect("sign a leaf");
        std::fs::write(cert_path, cert.pem()).expect("write a leaf certificate");
        std::fs::write(key_path, key.serialize_pem()).expect("write a leaf key");
    }
}

/// What an `openssl s_client` run printed and how it ended.
#[derive(Debug)]
pub struct SClientOutcome {
    /// `None` when it was stopped (it saw `until` or ran out of time).
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Whether the limit ran out before it ended or printed `until`.
    pub timed_out: bool,
}

impl SClientOutcome {
    /// Both streams, for assertions that do not care which one said it.
    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `openssl s_client -connect addr` with `args`, writes `input` to its standard
/// input and then closes it, and collects what it prints. It is stopped when its standard
/// output contains `until` (when given) or when `limit` runs out, whichever comes first;
/// so `-quiet`/`-ign_eof` runs against a server that never hangs up still end.
pub async fn s_client(
    addr: SocketAddr,
    args: &[&str],
    input: &[u8],
    until: Option<&str>,
    limit: Duration,
) -> SClientOutcome {
    let mut child = tokio::process::Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start openssl s_client (is openssl installed? scripts/test.sh installs it)");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        // It may have exited (a refused handshake) before reading: a broken pipe is fine.
        let _ = stdin.write_all(&input).await;
        drop(stdin);
    });
    let errors = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text).await;
        text
    });
    let mut printed = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stdout.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => printed.extend_from_slice(&chunk[..n]),
            }
            if let Some(needle) = until {
                if String::from_utf8_lossy(&printed).contains(needle) {
                    return true;
                }
            }
        }
    };
    let (exit_code, timed_out) = match tokio::time::timeout(limit, read).await {
        Ok(true) => {
            child.kill().await.expect("stop openssl s_client");
            (None, false)
        }
        Ok(false) => match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => (status.expect("wait for openssl s_client").code(), false),
            Err(_) => {
                child.kill().await.expect("stop openssl s_client");
                (None, true)
            }
        },
        Err(_) => {
            child.kill().await.expect("stop openssl s_client");
            (None, true)
        }
    };
    // The writer finishes once the pipe is closed, which the exit or the kill did.
    let _ = writer.await;
    let errors = errors.await.unwrap_or_default();
    SClientOutcome {
        exit_code,
        stdout: String::from_utf8_lossy(&printed).into_owned(),
        stderr: String::from_utf8_lossy(&errors).into_owned(),
        timed_out,
    }
}
