//! The simulators wired up for tests: a token endpoint with one client, and a sidecar
//! whose trunk gets its bearer token there.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use byoc_sidecar::sim::core::SimCore;
use byoc_sidecar::sim::idp::{Idp, IdpSettings, SimClient, TokenKind, Validation};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Sidecar;

/// A simulated token endpoint knowing one client; stops when dropped.
pub struct SimIdp {
    pub idp: Idp,
    pub client: SimClient,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
}

impl SimIdp {
    pub async fn start(
        id: &str,
        secret: &str,
        organization: &str,
        ttl: Duration,
        kind: TokenKind,
    ) -> SimIdp {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let client = SimClient {
            id: id.into(),
            secret: secret.into(),
            organization: organization.into(),
        };
        let idp = Idp::start(
            IdpSettings::new(vec![client.clone()], ttl, kind),
            "127.0.0.1:0".parse().unwrap(),
            cancel.clone(),
            &tracker,
        )
        .await
        .unwrap();
        SimIdp {
            idp,
            client,
            cancel,
            tracker,
        }
    }

    /// The `[trunk.credentials]` table for this client, its secret written to a file in
    /// `dir`, with `extra` key lines appended.
    pub fn credentials_toml(&self, dir: &Path, extra: &str) -> String {
        let secret = dir.join("client-secret");
        std::fs::write(&secret, &self.client.secret).unwrap();
        format!(
            "\n[trunk.credentials]\nkind = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\n\
             client_secret_file = \"{}\"\norganization = \"{}\"\n{extra}",
            self.idp.url(),
            self.client.id,
            secret.display(),
            self.client.organization
        )
    }

    /// A simulated core on a loopback port checking this endpoint's tokens under
    /// `validation`; it stops with the endpoint.
    pub async fn core(&self, validation: Validation) -> SimCore {
        SimCore::start(
            self.idp.clone(),
            validation,
            "127.0.0.1:0".parse().unwrap(),
            self.cancel.clone(),
            &self.tracker,
        )
        .await
        .unwrap()
    }

    /// A sidecar whose one trunk sends its requests to `core` with a bearer token from
    /// this endpoint; returns once the first token is there.
    pub async fn bearer_sidecar(&self, dir: &Path, core: SocketAddr, extra: &str) -> Sidecar {
        let text = format!(
            "{}auth = \"bearer\"\n{}",
            Sidecar::config("udp:127.0.0.1:9", &format!("udp:{core}"), ""),
            self.credentials_toml(dir, extra)
        );
        Sidecar::start_ready(&text).await
    }
}

impl Drop for SimIdp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
