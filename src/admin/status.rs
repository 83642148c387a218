//! `/readyz` and `/status`: readiness with its reasons, and the state of each trunk as
//! JSON, for the operator asking *why* (which credential, how fresh, how the last
//! refresh ended, how the core reads its refusals, whether the trunk is registered).

use serde_json::{json, Value};

use super::{Observed, ObservedTrunk};
use crate::registration::State;

impl Observed {
    /// Why the sidecar is not ready to carry calls; empty when it is. Listeners are bound
    /// before the admin listener starts, so what can be missing is per trunk.
    pub fn not_ready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            reasons.push("draining for shutdown: new calls are refused".to_string());
        }
        for trunk in &self.trunks {
            if let Some(core) = &trunk.core {
                if core.current().candidates.is_empty() {
                    reasons.push(format!(
                        "trunk {}: core {} has not resolved to any address",
                        trunk.name, core.endpoint
                    ));
                }
            }
            if let Some(manager) = &trunk.credentials {
                if manager.current().is_none() {
                    let last = manager
                        .last_refresh()
                        .and_then(|outcome| outcome.error)
                        .map_or_else(
                            || "no refresh has ended yet".to_string(),
                            |error| format!("last refresh failed: {error}"),
                        );
                    reasons.push(format!(
                        "trunk {}: no valid credential ({last})",
                        trunk.name
                    ));
                }
            }
            if let Some(registration) = &trunk.registration {
                let status = registration.borrow();
                if !matches!(status.state, State::Registered | State::Refreshing) {
                    let why = status
                        .last_failure
                        .as_deref()
                        .map_or_else(String::new, |failure| format!(", last failure: {failure}"));
                    reasons.push(format!(
                        "trunk {}: not registered (state {}{why})",
                        trunk.name,
                        status.state.as_str()
                    ));
                }
            }
        }
        reasons
    }

    /// The `/status` document: `{"ready": .., "trunks": [..]}`.
    pub fn status_json(&self) -> String {
        let trunks: Vec<Value> = self.trunks.iter().map(trunk_status).collect();
        let document = json!({
            "ready": self.not_ready().is_empty(),
            "healthy": self.unhealthy().is_none(),
            "trunks": trunks,
        });
        document.to_string() + "\n"
    }
}

fn seconds(duration: std::time::Duration) -> f64 {
    // Milliseconds are plenty for an operator.
    (duration.as_secs_f64() * 1000.0).round() / 1000.0
}

fn trunk_status(trunk: &ObservedTrunk) -> Value {
    let now = tokio::time::Instant::now();
    let credential = trunk.credentials.as_ref().map(|manager| {
        let gauges = manager.gauges();
        let stats = manager.stats();
        let current = manager.current();
        let last = manager.last_refresh().map(|outcome| {
            json!({
                "result": if outcome.succeeded { "success" } else { "failure" },
                "error_class": outcome.error_class,
                "error": outcome.error,
                "seconds_ago": seconds(now.saturating_duration_since(outcome.at)),
            })
        });
        json!({
            "valid": gauges.valid,
            "generation": gauges.generation,
            "fingerprint": current.as_ref().map(|credential| credential.fingerprint.clone()),
            "age_seconds": gauges.age.map(seconds),
            "expires_in_seconds": gauges.time_to_expiry.map(seconds),
            "last_refresh": last,
            "refreshes": {
                "success": stats.refreshed,
                "transient": stats.transient_failures,
                "configuration": stats.configuration_failures,
            },
            "forced_refreshes": {
                "done": stats.forced,
                "coalesced": stats.forced_coalesced,
                "rate_limited": stats.forced_rate_limited,
                "waited": stats.forced_waited,
            },
            "refusals_absorbed": {
                "rotation": stats.refusals_rotation,
                "request": stats.refusals_of_the_request,
                "permanent": stats.refusals_permanent,
            },
            "core_refusing": manager.core_refusing(),
        })
    });
    let registration = trunk.registration.as_ref().map(|registration| {
        let status = registration.borrow().clone();
        json!({
            "state": status.state.as_str(),
            "expires_in_seconds": status
                .valid_until
                .map(|until| seconds(until.saturating_duration_since(now))),
            "consecutive_failures": status.consecutive_failures,
            "last_failure": status.last_failure,
            "registers_sent": status.sent,
            "generation": status.generation,
        })
    });
    let core = trunk.core.as_ref().map(|core| {
        let resolved = core.current();
        json!({
            "peer": core.endpoint.to_string(),
            "hosts": resolved
                .candidates
                .iter()
                .map(|candidate| format!("{}:{}", candidate.transport, candidate.addr))
                .collect::<Vec<_>>(),
            "kept_for_dialogs": resolved.retired.len(),
        })
    });
    json!({
        "trunk": trunk.name,
        "organization": trunk.organization,
        "core": core,
        "credential": credential,
        "registration": registration,
    })
}
