//! Counters shared by the transports and the engine. Every message that is dropped,
//! rejected or answered by the sidecar itself is counted here; the admin endpoint exports
//! them later, and tests read them.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters, updated with relaxed atomics.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A plain copy of [`Stats`] at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $(pub $name: u64,)*
        }

        impl Stats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// SIP messages parsed and handed to the engine.
    messages_received,
    /// Bytes that did not parse as SIP, or lacked a usable Via/CSeq.
    malformed_dropped,
    /// Messages from an address outside the side's allow list.
    not_allowed_dropped,
    /// New dialogs refused with 503 while draining for shutdown.
    drain_rejected,
    /// Datagrams the kernel dropped because a UDP socket's receive buffer was full (the
    /// sidecar did not read fast enough; Linux, from `/proc/net/udp*`).
    queue_full_dropped,
    /// Messages that could not be handed to a socket or connection.
    send_failed,
    /// Request retransmissions absorbed by a server transaction.
    retransmissions_absorbed,
    /// Server transactions created (requests proxied statefully).
    server_transactions,
    /// Client transactions created.
    client_transactions,
    /// Requests forwarded without a transaction (ACK for 2xx).
    stateless_forwards,
    /// Responses forwarded toward the peer that sent the request.
    responses_forwarded,
    /// Responses matching no transaction and not ours to forward.
    stray_responses,
    /// Responses a server transaction refused because a final one went out already.
    responses_absorbed,
    /// ACKs matching no transaction and not in a dialog this proxy record-routed.
    stray_acks,
    /// Requests answered 503 because the transaction table was full.
    overload_rejected,
    /// Requests answered with an error by the sidecar itself (400, 403, 481, 482, 483, 502).
    locally_rejected,
    /// Client transactions that ended with Timer B or F.
    client_timeouts,
    /// CANCELs forwarded to the core or Edge.
    cancels_forwarded,
    /// 401/403/407 answers from the core kept from the Edge while the request is re-sent.
    rejections_absorbed,
    /// Requests re-sent to the core with a newer credential.
    resends,
    /// Rejections passed on to the Edge because no newer credential could be had.
    resends_impossible,
    /// Re-sent requests the core refused again (passed on: one re-send per request).
    resends_refused_again,
    /// Digest challenges (401/407) from the core answered by a re-send.
    digest_challenges_answered,
    /// Challenges from the core no supported Digest variant could answer.
    digest_unanswerable,
    /// REGISTERs the sidecar sent for its trunks' registrations (re-sends included).
    registers_sent,
    /// Registration attempts that failed (each followed by a backoff).
    register_failures,
    /// In-dialog requests whose CSeq could not be translated (dialog table full).
    dialog_translation_failures,
    /// TCP connections accepted or opened.
    tcp_connections_opened,
    /// TCP connections refused because of tcp_max_connections.
    tcp_connections_refused,
    /// TCP streams closed because of a framing error (size, Content-Length).
    tcp_framing_errors,
    /// TCP connections closed because a write did not finish within tcp_write_timeout.
    tcp_write_timeouts,
    /// Requests of a trunk with credentials whose next hop is not the trunk's core:
    /// forwarded without the trunk's credentials.
    credentials_withheld,
    /// Route trunk parameters ignored because the sender does not belong to that trunk.
    foreign_trunk_parameters,
    /// In-dialog requests that waited for their trunk's credential to become valid.
    credential_waits,
    /// Requests toward the core sent without a credential because none was valid in time
    /// (in-dialog requests after `resend_wait`, ACKs at once).
    sent_without_credential,
    /// TLS handshakes that failed because the peer's certificate was not issued by a
    /// trusted CA.
    tls_unknown_ca,
    /// TLS handshakes that failed because the peer's certificate is for another name.
    tls_name_mismatch,
    /// TLS handshakes that failed because the peer's certificate expired (or is not
    /// valid yet).
    tls_expired_certificate,
    /// TLS connections the peer refused because the sidecar presented no client
    /// certificate, or one it does not accept.
    tls_client_certificate_refused,
    /// TLS handshakes that failed for any other reason (protocol, timeout, closed).
    tls_other_failures,
    /// Requests tried on another core host after one failed (RFC 3263 §4.3).
    failovers,
    /// Core hosts marked as failed (no answer, transport error, 503 without Retry-After).
    core_host_failures,
    /// Calls a core host answered late, after the request had moved to another host:
    /// acknowledged and hung up at once.
    late_calls_ended,
    /// The longest time, in microseconds, a refused request waited for its re-send or
    /// for its refusal to be passed on (a maximum, not a counter).
    longest_resend_wait_micros,
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Raises a maximum to `value` if it is higher.
    pub fn raise(maximum: &AtomicU64, value: u64) {
        maximum.fetch_max(value, Ordering::Relaxed);
    }
}

/// What the engine measures beyond counters, for the admin endpoint: call-setup latency
/// (an INVITE's arrival to its first final response), the engine's heartbeat (it beats
/// once a second while it turns) and the size of its tables.
#[derive(Debug)]
pub struct ProxyMetrics {
    pub call_setup_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Transactions held now (server and client).
    pub transactions: AtomicU64,
    /// Dialogs whose CSeq is translated after a re-send.
    pub dialogs_translated: AtomicU64,
    /// Transactions still waiting for their final response.
    pub pending_transactions: AtomicU64,
    /// Calls in progress (answered, not yet hung up).
    pub calls: AtomicU64,
    origin: tokio::time::Instant,
    heartbeat_millis: AtomicU64,
}

impl ProxyMetrics {
    pub fn new() -> Self {
        Self {
            // 0.5 ms to about 16 s, doubling.
            call_setup_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16),
            ),
            transactions: AtomicU64::new(0),
            dialogs_translated: AtomicU64::new(0),
            pending_transactions: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            origin: tokio::time::Instant::now(),
            heartbeat_millis: AtomicU64::new(0),
        }
    }

    /// The engine turned at `now`.
    pub fn beat(&self, now: tokio::time::Instant) {
        let millis = now.saturating_duration_since(self.origin).as_millis();
        self.heartbeat_millis
            .store(u64::try_from(millis).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How long ago the engine last turned.
    pub fn since_heartbeat(&self, now: tokio::time::Instant) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.heartbeat_millis.load(Ordering::Relaxed));
        now.saturating_duration_since(self.origin)
            .saturating_sub(last)
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}
