//! `/metrics`: the counters and gauges the sidecar keeps, read at scrape time and
//! written in the Prometheus text format (0.0.4) through `prometheus-client`. Nothing is
//! counted twice: the proxy's [`crate::stats::Stats`], each credential manager's counters
//! and the registration watches stay the sources; this module only names them.
//!
//! Names are `byoc_` + snake_case with their unit (`_seconds`; counters get `_total` from
//! the encoder). Per-trunk series carry `trunk` and `organization` labels, never a
//! secret.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::{Observed, ObservedTrunk};
use crate::registration::State;

/// Labels of one series.
type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: its descriptor, then one series per row.
fn family<V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result
where
    V: Series,
{
    let mut descriptor = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        value.write(descriptor.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A value of one series: a counter (`u64`) or a gauge (`f64`).
trait Series {
    fn write(self, encoder: prometheus_client::encoding::MetricEncoder) -> fmt::Result;
}

impl Series for u64 {
    fn write(self, encoder: prometheus_client::encoding::MetricEncoder) -> fmt::Result {
        ConstCounter::new(self).encode(encoder)
    }
}

impl Series for f64 {
    fn write(self, encoder: prometheus_client::encoding::MetricEncoder) -> fmt::Result {
        ConstGauge::new(self).encode(encoder)
    }
}

fn trunk_labels(trunk: &ObservedTrunk) -> Labels {
    vec![
        ("trunk", trunk.name.clone()),
        ("organization", trunk.organization.clone()),
    ]
}

fn with(mut labels: Labels, key: &'static str, value: &str) -> Labels {
    labels.push((key, value.to_string()));
    labels
}

impl Observed {
    pub(super) fn encode_metrics(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        self.encode_proxy(encoder)?;
        self.encode_credentials(encoder)?;
        self.encode_registrations(encoder)?;
        self.encode_cores(encoder)
    }

    /// How many hosts each trunk's core resolves to now.
    fn encode_cores(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let hosts: Vec<(Labels, f64)> = self
            .trunks
            .iter()
            .filter_map(|trunk| {
                let core = trunk.core.as_ref()?;
                Some((trunk_labels(trunk), core.current().candidates.len() as f64))
            })
            .collect();
        family(
            encoder,
            "byoc_core_hosts",
            "Addresses the trunk's core resolves to now (0: not resolved; calls get 503)",
            MetricType::Gauge,
            hosts,
        )
    }

    fn encode_proxy(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let stats = self.stats.snapshot();
        let none = Labels::new;
        let counters: [(&str, &str, u64); 17] = [
            (
                "byoc_sip_messages_received",
                "SIP messages parsed and handed to the engine",
                stats.messages_received,
            ),
            (
                "byoc_sip_retransmissions_absorbed",
                "Request retransmissions absorbed by a server transaction",
                stats.retransmissions_absorbed,
            ),
            (
                "byoc_sip_server_transactions",
                "Server transactions created",
                stats.server_transactions,
            ),
            (
                "byoc_sip_client_transactions",
                "Client transactions created",
                stats.client_transactions,
            ),
            (
                "byoc_sip_locally_rejected",
                "Requests the sidecar answered with an error itself",
                stats.locally_rejected,
            ),
            (
                "byoc_sip_client_timeouts",
                "Client transactions that ended with Timer B or F",
                stats.client_timeouts,
            ),
            (
                "byoc_rejections_absorbed",
                "401/403/407 answers from the core kept from the Edge",
                stats.rejections_absorbed,
            ),
            (
                "byoc_resends",
                "Requests re-sent to the core with a newer credential",
                stats.resends,
            ),
            (
                "byoc_resends_impossible",
                "Rejections passed on because no newer credential could be had",
                stats.resends_impossible,
            ),
            (
                "byoc_resends_refused_again",
                "Re-sent requests the core refused again (passed on)",
                stats.resends_refused_again,
            ),
            (
                "byoc_credentials_withheld",
                "Requests forwarded without the trunk's credential: the next hop was not its core",
                stats.credentials_withheld,
            ),
            (
                "byoc_sent_without_credential",
                "Requests sent toward the core without a credential because none was valid in time",
                stats.sent_without_credential,
            ),
            (
                "byoc_digest_challenges_answered",
                "Digest challenges from the core answered by a re-send",
                stats.digest_challenges_answered,
            ),
            (
                "byoc_failovers",
                "Requests tried on another core host after one failed",
                stats.failovers,
            ),
            (
                "byoc_core_host_failures",
                "Core hosts marked as failed (no answer, transport error, 503 without Retry-After)",
                stats.core_host_failures,
            ),
            (
                "byoc_late_calls_ended",
                "Calls a core host answered after the request had moved to another host, hung up at once",
                stats.late_calls_ended,
            ),
            (
                "byoc_drain_rejected",
                "New dialogs refused with 503 while draining for shutdown",
                stats.drain_rejected,
            ),
        ];
        for (name, help, value) in counters {
            family(encoder, name, help, MetricType::Counter, [(none(), value)])?;
        }
        let dropped = [
            ("malformed", stats.malformed_dropped),
            ("not_allowed", stats.not_allowed_dropped),
            ("queue_full", stats.queue_full_dropped),
            ("send_failed", stats.send_failed),
            ("stray_response", stats.stray_responses),
            ("stray_ack", stats.stray_acks),
            ("overload", stats.overload_rejected),
            ("tcp_framing", stats.tcp_framing_errors),
            ("tcp_write_timeout", stats.tcp_write_timeouts),
            ("tcp_connection_refused", stats.tcp_connections_refused),
            ("digest_unanswerable", stats.digest_unanswerable),
        ];
        family(
            encoder,
            "byoc_sip_dropped",
            "Messages dropped, refused or not answerable, by reason",
            MetricType::Counter,
            dropped.map(|(reason, value)| (vec![("reason", reason.to_string())], value)),
        )?;
        let tls = [
            ("unknown_ca", stats.tls_unknown_ca),
            ("name_mismatch", stats.tls_name_mismatch),
            ("expired_certificate", stats.tls_expired_certificate),
            (
                "client_certificate_refused",
                stats.tls_client_certificate_refused,
            ),
            ("other", stats.tls_other_failures),
        ];
        family(
            encoder,
            "byoc_tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            MetricType::Counter,
            tls.map(|(reason, value)| (vec![("reason", reason.to_string())], value)),
        )?;
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let gauges = [
            (
                "byoc_sip_transactions",
                "Transactions held now (server and client)",
                self.metrics.transactions.load(relaxed),
            ),
            (
                "byoc_sip_dialogs_translated",
                "Dialogs whose CSeq is translated after a re-send",
                self.metrics.dialogs_translated.load(relaxed),
            ),
            (
                "byoc_sip_pending_transactions",
                "Transactions still waiting for their final response",
                self.metrics.pending_transactions.load(relaxed),
            ),
            (
                "byoc_sip_calls",
                "Calls in progress (answered and not yet hung up)",
                self.metrics.calls.load(relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            family(
                encoder,
                name,
                help,
                MetricType::Gauge,
                [(none(), value as f64)],
            )?;
        }
        let histogram = &self.metrics.call_setup_seconds;
        let descriptor = encoder.encode_descriptor(
            "byoc_call_setup_seconds",
            "Time from an INVITE's arrival to its first final response",
            None,
            histogram.metric_type(),
        )?;
        histogram.encode(descriptor)
    }

    fn encode_credentials(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let managed: Vec<_> = self
            .trunks
            .iter()
            .filter_map(|trunk| Some((trunk, trunk.credentials.as_ref()?)))
            .collect();
        let gauges =
            |pick: &dyn Fn(&crate::credentials::manager::CredentialGauges) -> Option<f64>| {
                managed
                    .iter()
                    .filter_map(|(trunk, manager)| {
                        Some((trunk_labels(trunk), pick(&manager.gauges())?))
                    })
                    .collect::<Vec<_>>()
            };
        family(
            encoder,
            "byoc_credential_generation",
            "Generation of the trunk's newest credential (0: none yet)",
            MetricType::Gauge,
            gauges(&|gauges| Some(gauges.generation as f64)),
        )?;
        family(
            encoder,
            "byoc_credential_age_seconds",
            "Time since the request that produced the newest credential was sent",
            MetricType::Gauge,
            gauges(&|gauges| gauges.age.map(|age| age.as_secs_f64())),
        )?;
        family(
            encoder,
            "byoc_credential_expiry_seconds",
            "Time until the newest credential expires (0 once expired)",
            MetricType::Gauge,
            gauges(&|gauges| gauges.time_to_expiry.map(|left| left.as_secs_f64())),
        )?;
        family(
            encoder,
            "byoc_credential_valid",
            "1 while the trunk holds a valid credential",
            MetricType::Gauge,
            gauges(&|gauges| Some(if gauges.valid { 1.0 } else { 0.0 })),
        )?;
        let rows = |pick: &dyn Fn(
            &crate::credentials::manager::CredentialStatsSnapshot,
        ) -> Vec<(&'static str, u64)>,
                    key: &'static str| {
            managed
                .iter()
                .flat_map(|(trunk, manager)| {
                    pick(&manager.stats())
                        .into_iter()
                        .map(move |(value_label, value)| {
                            (with(trunk_labels(trunk), key, value_label), value)
                        })
                })
                .collect::<Vec<_>>()
        };
        family(
            encoder,
            "byoc_credential_refreshes",
            "Credential refresh attempts by result (success, or the error class)",
            MetricType::Counter,
            rows(
                &|stats| {
                    vec![
                        ("success", stats.refreshed),
                        ("transient", stats.transient_failures),
                        ("configuration", stats.configuration_failures),
                    ]
                },
                "result",
            ),
        )?;
        family(
            encoder,
            "byoc_credential_forced_refreshes",
            "Forced refreshes after a refusal: done, coalesced into one under way, rate-limited, and those that waited for the rate limit",
            MetricType::Counter,
            rows(
                &|stats| {
                    vec![
                        ("done", stats.forced),
                        ("coalesced", stats.forced_coalesced),
                        ("rate_limited", stats.forced_rate_limited),
                        ("waited", stats.forced_waited),
                    ]
                },
                "outcome",
            ),
        )?;
        family(
            encoder,
            "byoc_credential_refusals",
            "The core's refusals of the trunk's credential, by how they were read",
            MetricType::Counter,
            rows(
                &|stats| {
                    vec![
                        ("rotation", stats.refusals_rotation),
                        ("request", stats.refusals_of_the_request),
                        ("permanent", stats.refusals_permanent),
                    ]
                },
                "reading",
            ),
        )
    }

    fn encode_registrations(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let now = tokio::time::Instant::now();
        let registered: Vec<_> = self
            .trunks
            .iter()
            .filter_map(|trunk| Some((trunk, trunk.registration.as_ref()?.borrow().clone())))
            .collect();
        family(
            encoder,
            "byoc_registration_state",
            "1 for the registration's current state, 0 for the others",
            MetricType::Gauge,
            registered.iter().flat_map(|(trunk, status)| {
                State::ALL.iter().map(move |state| {
                    let value = if *state == status.state { 1.0 } else { 0.0 };
                    (with(trunk_labels(trunk), "state", state.as_str()), value)
                })
            }),
        )?;
        family(
            encoder,
            "byoc_registration_expiry_seconds",
            "Time until the registered binding lapses (0 when not registered)",
            MetricType::Gauge,
            registered.iter().map(|(trunk, status)| {
                let left = status.valid_until.map_or(0.0, |until| {
                    until.saturating_duration_since(now).as_secs_f64()
                });
                (trunk_labels(trunk), left)
            }),
        )?;
        family(
            encoder,
            "byoc_registration_consecutive_failures",
            "Registration attempts that failed in a row",
            MetricType::Gauge,
            registered.iter().map(|(trunk, status)| {
                (trunk_labels(trunk), f64::from(status.consecutive_failures))
            }),
        )?;
        family(
            encoder,
            "byoc_registration_registers_sent",
            "REGISTERs sent, re-sends included",
            MetricType::Counter,
            registered
                .iter()
                .map(|(trunk, status)| (trunk_labels(trunk), status.sent)),
        )
    }
}
