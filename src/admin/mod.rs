//! The admin HTTP listener (`[admin] listen`, default `127.0.0.1:9090`; off when the
//! table is absent), for the operator and the orchestrator:
//!
//! - `GET /metrics`: Prometheus text format ([`metrics`]);
//! - `GET /healthz`: 200 while the process lives and the engine turns (its heartbeat
//!   is at most [`HEALTHY_HEARTBEAT`] old), else 503 saying why;
//! - `GET /readyz`: 200 when the listeners are bound, every trunk with credentials holds
//!   a valid one and every trunk with registration is registered, else 503 listing each
//!   reason, one per line;
//! - `GET /status`: JSON per trunk ([`status`]).
//!
//! Plain HTTP/1.1 on one task per connection; answers never carry a secret.

mod metrics;
mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::credentials::CredentialManager;
use crate::registration::RegistrationStatus;
use crate::stats::{ProxyMetrics, Stats};

/// The engine beats once a second; `/healthz` fails when the last beat is older.
pub const HEALTHY_HEARTBEAT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the admin listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the admin endpoints read: the proxy's counters and measurements, and each
/// trunk's credential manager and registration.
#[derive(Debug)]
pub struct Observed {
    pub stats: Arc<Stats>,
    pub metrics: Arc<ProxyMetrics>,
    /// Set when graceful shutdown began: not ready any more.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    pub trunks: Vec<ObservedTrunk>,
}

#[derive(Debug)]
pub struct ObservedTrunk {
    pub name: String,
    /// The organization its credentials are for (empty when none is configured).
    pub organization: String,
    pub credentials: Option<CredentialManager>,
    pub registration: Option<watch::Receiver<RegistrationStatus>>,
    /// The trunk's core as resolved now.
    pub core: Option<Arc<crate::dns::Destinations>>,
}

impl Observed {
    /// The whole `/metrics` page.
    pub fn metrics_text(self: &Arc<Self>) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Scrape(self.clone())));
        let mut text = String::new();
        // Writing into a String cannot fail; an encoder error leaves what was written.
        if let Err(error) =
            prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        {
            tracing::warn!(error = %error, "metrics encoding stopped early");
        }
        text
    }

    /// Why the process is not healthy, if it is not.
    pub fn unhealthy(&self) -> Option<String> {
        let silent = self.metrics.since_heartbeat(tokio::time::Instant::now());
        (silent > HEALTHY_HEARTBEAT).then(|| {
            format!(
                "the engine has not turned for {:.1} s",
                silent.as_secs_f64()
            )
        })
    }
}

/// [`Observed`] as the collector of one scrape.
#[derive(Debug)]
struct Scrape(Arc<Observed>);

impl prometheus_client::collector::Collector for Scrape {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::fmt::Result {
        self.0.encode_metrics(&mut encoder)
    }
}

/// Starts the listener on `addr` and serves until `cancel`; returns the bound address.
pub async fn start(
    addr: SocketAddr,
    observed: Arc<Observed>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AdminError::Bind { addr, source })?;
    let connections = tracker.clone();
    tracker.spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %error, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (observed, cancel) = (observed.clone(), cancel.clone());
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let observed = observed.clone();
                    async move { Ok::<_, Infallible>(answer(&observed, &request)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    // A client that goes away is its own business.
                    _ = connection => {}
                }
            });
        }
    });
    tracing::info!(listen = %bound, "admin listener started");
    Ok(bound)
}

/// The answer to one admin request.
fn answer<B>(observed: &Arc<Observed>, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" => typed(
            plain(StatusCode::OK, observed.metrics_text()),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/healthz" => match observed.unhealthy() {
            None => plain(StatusCode::OK, "ok\n".into()),
            Some(reason) => plain(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        "/readyz" => {
            let reasons = observed.not_ready();
            if reasons.is_empty() {
                plain(StatusCode::OK, "ready\n".into())
            } else {
                plain(StatusCode::SERVICE_UNAVAILABLE, reasons.join("\n") + "\n")
            }
        }
        "/status" => typed(
            plain(StatusCode::OK, observed.status_json()),
            "application/json",
        ),
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz, /status\n".into(),
        ),
    }
}

/// `response` with its `Content-Type` set.
fn typed(mut response: Response<Full<Bytes>>, content_type: &'static str) -> Response<Full<Bytes>> {
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
