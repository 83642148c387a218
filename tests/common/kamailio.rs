//! Kamailio (the Debian package) as a real core for the tests: started on a free loopback
//! port from a configuration in `tests/kamailio/`, stopped by PID (SIGTERM, which takes
//! its worker processes down with it) when dropped.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The kamailio binary, or a loud failure naming how to get it.
pub fn kamailio_path() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/local/sbin", "/sbin"] {
        let candidate = Path::new(dir).join("kamailio");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("kamailio is not installed: run scripts/test.sh, which installs the Debian package kamailio");
}

/// Where the Debian package keeps its modules (the directory names the architecture).
fn modules_dir() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("kamailio/modules"))
        .find(|dir| dir.join("tm.so").is_file());
    found.unwrap_or_else(|| panic!("no kamailio modules under /usr/lib/*/kamailio/modules"))
}

pub struct Kamailio {
    child: std::process::Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The TLS listener, for cores that have one.
    tls_port: Option<u16>,
}

/// How the Digest core is set up.
pub struct DigestCore<'a> {
    /// `MD5` or `SHA-256` (all Kamailio 5.6 offers).
    pub algorithm: &'a str,
    /// Seconds a nonce stays valid before Kamailio calls it stale.
    pub nonce_expire: u32,
    /// Where authenticated INVITEs go.
    pub far_end_port: u16,
    /// The password of subscriber `alice`.
    pub password: &'a str,
}

/// How the TLS core is set up.
pub struct TlsCore<'a> {
    /// Its server certificate and key, the CA it trusts for client certificates.
    pub pki: &'a super::tls::Pki,
    /// Which of the Pki's server certificates it presents.
    pub server_cert: ServerCert,
    /// Mutual TLS: refuse a TLS client that presents no certificate signed by the CA.
    pub require_client_cert: bool,
    /// Where initial INVITEs that arrive over TLS (from the sidecar) go, over UDP.
    pub far_end: std::net::SocketAddr,
}

/// The certificate the TLS core presents, from its [`TlsCore::pki`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerCert {
    /// Signed by the CA, valid now.
    Valid,
    /// Signed by the CA, expired in 2001.
    Expired,
    /// Valid now, signed by the unrelated ("wrong") CA.
    WrongCa,
}

impl Kamailio {
    /// Kamailio demanding Digest for REGISTER (401) and INVITE (407) from subscriber
    /// `alice` in a db_text table, relaying authenticated INVITEs to the far end.
    pub async fn digest_core(core: &DigestCore<'_>) -> Kamailio {
        Self::start(
            "digest-core.cfg",
            core.password,
            &[
                ("@ALGORITHM@", core.algorithm.to_string()),
                ("@NONCE_EXPIRE@", core.nonce_expire.to_string()),
                ("@FAR_END_PORT@", core.far_end_port.to_string()),
            ],
        )
        .await
    }

    /// Kamailio as a registrar (`registrar` + `usrloc` in memory) demanding Digest from
    /// subscriber `alice`, relaying INVITEs for registered users to their Contact; its
    /// location table is read with [`Kamailio::kamcmd`].
    pub async fn registrar(password: &str) -> Kamailio {
        Self::start("registrar.cfg", password, &[]).await
    }

    /// Kamailio as a TLS core (`tests/kamailio/tls-core.cfg`): TLS 1.2+ on
    /// [`Kamailio::tls_addr`] with a server certificate of `core.pki`, UDP on
    /// [`Kamailio::addr`] for peers on the core side. A registrar without authentication
    /// (bindings in memory, read with [`Kamailio::kamcmd`]); an initial INVITE that came
    /// over TLS goes to `core.far_end`, one that came over UDP to the registered Contact
    /// (over TLS when the Contact says `transport=tls`, without checking the certificate
    /// it is shown there).
    pub async fn tls_core(core: &TlsCore<'_>) -> Kamailio {
        let tls_port = super::free_port();
        let tls_cfg = tls_profiles(core.pki, core.server_cert, core.require_client_cert);
        let mut kamailio = Self::start_with_files(
            "tls-core.cfg",
            "",
            &[
                ("@TLS_PORT@", tls_port.to_string()),
                ("@FAR_END@", core.far_end.to_string()),
            ],
            &[("tls.cfg", tls_cfg)],
        )
        .await;
        kamailio.tls_port = Some(tls_port);
        kamailio.wait_tls_listening(tls_port).await;
        kamailio
    }

    /// Starts `tests/kamailio/<config>` with subscriber `alice`/`password` in a db_text
    /// table and the placeholders filled: `@PORT@`, `@MODULES@`, `@DB@`, `@DIR@`, and
    /// `values`.
    async fn start(config: &str, password: &str, values: &[(&str, String)]) -> Kamailio {
        Self::start_with_files(config, password, values, &[]).await
    }

    /// As [`Kamailio::start`], with `files` (name, contents) written to its directory
    /// (`@DIR@`) first, as they are.
    async fn start_with_files(
        config: &str,
        password: &str,
        values: &[(&str, String)],
        files: &[(&str, String)],
    ) -> Kamailio {
        let dir = tempfile::tempdir().expect("temporary directory for kamailio");
        let db = dir.path().join("db");
        std::fs::create_dir(&db).unwrap();
        std::fs::write(
            db.join("version"),
            "id(int,auto) table_name(string) table_version(int) \n0:subscriber:7\n",
        )
        .unwrap();
        std::fs::write(
            db.join("subscriber"),
            format!(
                "id(int,auto) username(string) domain(string) password(string) ha1(string,null) ha1b(string,null) \n1:alice:core.test:{password}:::\n"
            ),
        )
        .unwrap();
        let port = super::free_port();
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/kamailio")
                .join(config),
        )
        .unwrap();
        let mut text = template
            .replace("@PORT@", &port.to_string())
            .replace("@MODULES@", &modules_dir().display().to_string())
            .replace("@DB@", &db.display().to_string())
            .replace("@DIR@", &dir.path().display().to_string());
        for (placeholder, value) in values {
            text = text.replace(placeholder, value);
        }
        assert!(!text.contains('@'), "a placeholder was left unfilled");
        let config_path = dir.path().join("kamailio.cfg");
        std::fs::write(&config_path, text).unwrap();
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let log = std::fs::File::create(dir.path().join("kamailio.log")).unwrap();
        // Its own process group, so that stopping it reaches every worker it forks.
        let child = std::process::Command::new(kamailio_path())
            .process_group(0)
            .arg("-f")
            .arg(&config_path)
            .args(["-DD", "-E", "-A", "WITH_AUTH"])
            .arg("-Y")
            .arg(dir.path())
            .arg("-w")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kamailio");
        let mut kamailio = Kamailio {
            child,
            dir,
            port,
            tls_port: None,
        };
        kamailio.wait_listening().await;
        kamailio
    }

    /// Runs `kamcmd` against this Kamailio's control socket; its standard output.
    pub fn kamcmd(&self, command: &str) -> String {
        let socket = format!("unix:{}/kamailio_ctl", self.dir.path().display());
        let output = std::process::Command::new("/usr/sbin/kamcmd")
            .args(["-s", &socket, command])
            .output()
            .expect("run kamcmd");
        assert!(
            output.status.success(),
            "kamcmd {command} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits until the port is taken (Kamailio bound it), or fails with its log.
    async fn wait_listening(&mut self) {
        for _ in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("kamailio exited at start ({status}); log:\n{}", self.log());
            }
            if std::net::UdpSocket::bind((super::LOOPBACK, self.port)).is_err() {
                // Bound; give the workers a moment to start reading.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "kamailio did not bind port {}; log:\n{}",
            self.port,
            self.log()
        );
    }

    /// Waits until the TLS port is taken too (Kamailio binds every listener before it
    /// forks its workers, so this is quick), or fails with its log.
    async fn wait_tls_listening(&mut self, tls_port: u16) {
        for _ in 0..100 {
            if std::net::TcpListener::bind((super::LOOPBACK, tls_port)).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "kamailio did not bind TLS port {tls_port}; log:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kamailio.log")).unwrap_or_default()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The TLS listener of a [`Kamailio::tls_core`].
    pub fn tls_addr(&self) -> std::net::SocketAddr {
        let port = self
            .tls_port
            .unwrap_or_else(|| panic!("this kamailio has no TLS listener"));
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }
}

impl Kamailio {
    /// Sends `signal` to Kamailio's process group (its PID is the group's id).
    fn signal_group(&self, signal: &str) -> bool {
        let group = format!("-{}", self.child.id());
        std::process::Command::new("kill")
            .args([signal, "--", &group])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

impl Drop for Kamailio {
    /// SIGTERM to the group (Kamailio then stops its workers), SIGKILL to the group
    /// after 5 s if anything is left.
    fn drop(&mut self) {
        if self.signal_group("-TERM") {
            for _ in 0..50 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    // The main process is gone; make sure no worker outlived it.
                    self.signal_group("-KILL");
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.signal_group("-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tls module's profiles (`tls.cfg`): as a server, `server_cert` of `pki` for every
/// connection, TLS 1.2 or newer, client certificates checked against the CA and demanded
/// when `require_client_cert`; as a client (connecting to a Contact), the same
/// certificate, and whatever the far side presents accepted.
fn tls_profiles(
    pki: &super::tls::Pki,
    server_cert: ServerCert,
    require_client_cert: bool,
) -> String {
    let (cert, key) = match server_cert {
        ServerCert::Valid => (pki.server_cert(), pki.server_key()),
        ServerCert::Expired => (pki.expired_cert(), pki.expired_key()),
        ServerCert::WrongCa => (pki.other_server_cert(), pki.other_server_key()),
    };
    let mutual = if require_client_cert { "yes" } else { "no" };
    format!(
        "[server:default]\n\
         method = TLSv1.2+\n\
         certificate = {cert}\n\
         private_key = {key}\n\
         ca_list = {ca}\n\
         verify_certificate = {mutual}\n\
         require_certificate = {mutual}\n\
         \n\
         [client:default]\n\
         method = TLSv1.2+\n\
         certificate = {cert}\n\
         private_key = {key}\n\
         ca_list = {ca}\n\
         verify_certificate = no\n\
         require_certificate = no\n",
        cert = cert.display(),
        key = key.display(),
        ca = pki.ca().display(),
    )
}
