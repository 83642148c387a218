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

    /// Starts `tests/kamailio/<config>` with subscriber `alice`/`password` in a db_text
    /// table and the placeholders filled: `@PORT@`, `@MODULES@`, `@DB@`, `@DIR@`, and
    /// `values`.
    async fn start(config: &str, password: &str, values: &[(&str, String)]) -> Kamailio {
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
        let mut kamailio = Kamailio { child, dir, port };
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kamailio.log")).unwrap_or_default()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
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
