//! The admin listener (issue 13, item 1): `/metrics` parsed as Prometheus text while
//! tokens rotate under calls, `/readyz` following the token through an outage, `/healthz`,
//! `/status`, and what is not served.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::sim::idp::{Fault, TokenKind, Validation};
use byoc_sidecar::transport::Side;
use common::sim::SimIdp;
use common::*;

const ADMIN: &str = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";

/// `/metrics`, parsed.
async fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = admin_request(admin, "GET", "/metrics").await;
    assert_eq!(status, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|line| Ok(line.to_string()))).unwrap()
}

/// The value of the series `name` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(value))
        })
        .unwrap_or_else(|| panic!("no series {name} {labels:?}"));
    match &sample.value {
        prometheus_parse::Value::Counter(value)
        | prometheus_parse::Value::Gauge(value)
        | prometheus_parse::Value::Untyped(value) => *value,
        other => panic!("{name} is not a single value: {other:?}"),
    }
}

/// Scraped once a second while sipp places calls and another holder of the OAuth client
/// reissues (revoking the sidecar's token) every 1.5 s, with 4 s tokens: the generation
/// rises, the seconds to expiry start again from the top after each renewal, the absorbed
/// 403s are counted, the call-setup histogram counts every call, and no label carries
/// the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_token_rotating_and_the_refusals_absorbed() {
    let sim = SimIdp::start(
        "edge-m",
        "metrics-secret",
        "org-m",
        Duration::from_secs(4),
        TokenKind::Jwt,
    )
    .await;
    let core = sim.core(Validation::RevokeOnReissue).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}auth = \"bearer\"\n{}{ADMIN}",
        Sidecar::config("udp:127.0.0.1:9", &format!("udp:{}", core.addr), ""),
        sim.credentials_toml(
            dir.path(),
            "refresh_buffer = \"1s\"\nforce_refresh_interval = \"1s\"\nresend_wait = \"3s\"\n"
        )
    );
    let sidecar = Sidecar::start_ready(&text).await;
    let admin = sidecar.app.admin.expect("the admin listener is on");
    let rival = {
        let (idp, cancel) = (sim.idp.clone(), sim.cancel.clone());
        tokio::spawn(async move {
            let every = Duration::from_millis(1500);
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = ticks.tick() => { idp.issue_for("edge-m"); }
                }
            }
        })
    };
    const CALLS: u64 = 80;
    let target = sidecar.addr(Side::Edge, Transport::Udp);
    let uac = Sipp::start(
        "uac",
        &uac_args("uac.xml", target, Transport::Udp, CALLS, 10, 200),
    );
    let trunk = [("trunk", "test"), ("organization", "org-m")];
    let mut samples = Vec::new();
    for _ in 0..9 {
        let page = scrape(admin).await;
        samples.push((
            value(&page, "byoc_credential_generation", &trunk),
            value(&page, "byoc_credential_expiry_seconds", &trunk),
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let outcome = uac.finish(Duration::from_secs(60)).await;
    rival.abort();
    assert_all_calls_succeeded(&outcome, CALLS, "uac");
    let generations: Vec<f64> = samples.iter().map(|(generation, _)| *generation).collect();
    assert!(
        generations.windows(2).all(|pair| pair[1] >= pair[0])
            && generations.last() > generations.first(),
        "the generation rises: {generations:?}"
    );
    let expiries: Vec<f64> = samples.iter().map(|(_, expiry)| *expiry).collect();
    assert!(
        expiries.windows(2).any(|pair| pair[1] > pair[0]),
        "the seconds to expiry start again after a renewal: {expiries:?}"
    );
    assert!(
        expiries.iter().all(|left| (0.0..=4.0).contains(left)),
        "{expiries:?}"
    );

    let page = scrape(admin).await;
    let stats = sidecar.app.stats.snapshot();
    assert!(stats.rejections_absorbed > 0, "{stats:?}");
    assert_eq!(
        value(&page, "byoc_rejections_absorbed_total", &[]),
        stats.rejections_absorbed as f64
    );
    assert!(
        value(
            &page,
            "byoc_credential_refusals_total",
            &[("trunk", "test"), ("reading", "rotation")]
        ) > 0.0
    );
    assert_eq!(value(&page, "byoc_credential_valid", &trunk), 1.0);
    let setup = page
        .samples
        .iter()
        .find(|sample| sample.metric == "byoc_call_setup_seconds")
        .expect("the call-setup histogram");
    let prometheus_parse::Value::Histogram(buckets) = &setup.value else {
        panic!("not a histogram: {:?}", setup.value)
    };
    let infinite = buckets
        .iter()
        .find(|bucket| bucket.less_than.is_infinite())
        .expect("a +Inf bucket");
    assert!(infinite.count >= CALLS as f64, "{buckets:?}");
    let (_, body) = admin_request(admin, "GET", "/metrics").await;
    let tokens: Vec<_> = sim
        .idp
        .issued()
        .into_iter()
        .map(|issued| issued.token)
        .collect();
    assert!(tokens.iter().all(|token| !body.contains(token.as_str())));
    sim.cancel.cancel();
    sidecar.stop().await;
}

/// `/readyz` follows the token: 503 before the first one (the endpoint refuses at start),
/// 200 once held, 503 again after the endpoint has been down past expiry, 200 after it
/// recovers. Each 503 says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_token_through_an_outage() {
    let sim = SimIdp::start(
        "edge-r",
        "ready-secret",
        "org-r",
        Duration::from_secs(3),
        TokenKind::Opaque,
    )
    .await;
    sim.idp.set_fault(Some(Fault::Status {
        code: 503,
        retry_after: None,
    }));
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}auth = \"bearer\"\n{}{ADMIN}",
        Sidecar::config("udp:127.0.0.1:9", "udp:127.0.0.1:9", ""),
        sim.credentials_toml(
            dir.path(),
            "refresh_buffer = \"1s\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"300ms\"\n"
        )
    );
    let sidecar = Sidecar::start_with(&text).await;
    let admin = sidecar.app.admin.unwrap();
    let ready = |expected: u16| async move {
        for _ in 0..100 {
            let (status, body) = admin_request(admin, "GET", "/readyz").await;
            if status == expected {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("/readyz never answered {expected}");
    };
    let before = ready(503).await;
    assert!(
        before.contains("trunk test: no valid credential"),
        "{before}"
    );
    assert_eq!(admin_request(admin, "GET", "/healthz").await.0, 200);

    sim.idp.set_fault(None);
    assert_eq!(ready(200).await, "ready\n");

    sim.idp.set_fault(Some(Fault::Status {
        code: 503,
        retry_after: None,
    }));
    let down = ready(503).await;
    assert!(down.contains("last refresh failed"), "{down}");
    let (_, status) = admin_request(admin, "GET", "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["ready"], false);
    let trunk = &status["trunks"][0];
    assert_eq!(trunk["trunk"], "test");
    assert_eq!(trunk["organization"], "org-r");
    assert_eq!(trunk["credential"]["valid"], false);
    assert_eq!(trunk["credential"]["last_refresh"]["result"], "failure");
    assert_eq!(
        trunk["credential"]["last_refresh"]["error_class"],
        "transient"
    );

    sim.idp.set_fault(None);
    ready(200).await;
    let (_, status) = admin_request(admin, "GET", "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let credential = &status["trunks"][0]["credential"];
    assert_eq!(credential["valid"], true);
    assert!(credential["generation"].as_u64().unwrap() >= 2);
    assert_eq!(credential["fingerprint"].as_str().unwrap().len(), 8);
    let secret = sim.client.secret.clone();
    let tokens: Vec<_> = sim
        .idp
        .issued()
        .into_iter()
        .map(|issued| issued.token)
        .collect();
    let text = status.to_string();
    assert!(!text.contains(&secret) && tokens.iter().all(|token| !text.contains(token.as_str())));
    sim.cancel.cancel();
    sidecar.stop().await;
}

/// What is not served, and the admin listener off when the table is absent.
#[tokio::test]
async fn only_get_on_the_four_paths_is_served_and_no_table_means_no_listener() {
    let text = Sidecar::config("udp:127.0.0.1:9", "udp:127.0.0.1:9", "") + ADMIN;
    let sidecar = Sidecar::start_with(&text).await;
    let admin = sidecar.app.admin.unwrap();
    assert_eq!(admin_request(admin, "GET", "/nothing").await.0, 404);
    assert_eq!(admin_request(admin, "POST", "/metrics").await.0, 405);
    assert_eq!(
        admin_request(admin, "GET", "/healthz").await,
        (200, "ok\n".into())
    );
    // No credentials, no registration: ready at once.
    assert_eq!(
        admin_request(admin, "GET", "/readyz").await,
        (200, "ready\n".into())
    );
    sidecar.stop().await;
    let plain = Sidecar::start("udp:127.0.0.1:9", "udp:127.0.0.1:9", "").await;
    assert!(plain.app.admin.is_none());
    plain.stop().await;
}
