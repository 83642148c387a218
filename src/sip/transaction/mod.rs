//! RFC 3261 §17 transactions as pure state machines, with the RFC 6026 "Accepted" state
//! for INVITE (Timers L and M), so that 2xx retransmissions pass through a proxy and a
//! retransmitted INVITE after a 2xx is absorbed instead of forwarded again.
//!
//! Each transaction takes inputs as `handle_*(now, ..)`, reports its next deadline with
//! `poll_timeout()` and queues what it wants done as events pulled with `poll_event()`.
//! Timers, all derived from [`TimerConfig`]:
//!
//! | timer | transaction          | value                                    |
//! |-------|----------------------|------------------------------------------|
//! | A     | INVITE client        | T1, doubling (unreliable transport only) |
//! | B     | INVITE client        | 64·T1                                    |
//! | D     | INVITE client        | 32 s unreliable, 0 reliable              |
//! | E     | non-INVITE client    | T1 doubling up to T2; T2 in Proceeding   |
//! | F     | non-INVITE client    | 64·T1                                    |
//! | K     | non-INVITE client    | T4 unreliable, 0 reliable                |
//! | M     | INVITE client        | 64·T1 (RFC 6026)                          |
//! | C     | INVITE client (proxy)| `timer_c`, default 180 s (§16.8)          |
//! | G     | INVITE server        | T1 doubling up to T2 (unreliable only)    |
//! | H     | INVITE server        | 64·T1                                    |
//! | I     | INVITE server        | T4 unreliable, 0 reliable                |
//! | J     | non-INVITE server    | 64·T1 unreliable, 0 reliable             |
//! | L     | INVITE server        | 64·T1 (RFC 6026)                          |

mod client;
mod server;

pub use client::{ClientEvent, ClientState, ClientTransaction};
pub use server::{ServerEvent, ServerState, ServerTransaction};

use std::time::{Duration, Instant};

use super::message::MessageError;
use super::via::BRANCH_COOKIE;
use super::wire::{self as message, Method};

/// T1, T2 and T4 of RFC 3261 §17.1.1.1 and Table 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
    /// Timer C (§16.8): how long a proxied INVITE may ring without a final response.
    pub timer_c: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            timer_c: Duration::from_secs(180),
        }
    }
}

impl TimerConfig {
    /// 64·T1: Timers B, F, H, J (unreliable), L and M.
    pub fn transaction_timeout(&self) -> Duration {
        self.t1.saturating_mul(64)
    }

    /// Timer D: at least 32 s on an unreliable transport.
    pub fn timer_d(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            Duration::from_secs(32).max(self.transaction_timeout())
        }
    }

    /// Timers I and K: T4 on an unreliable transport.
    pub fn t4_or_zero(&self, reliable: bool) -> Duration {
        if reliable {
            Duration::ZERO
        } else {
            self.t4
        }
    }
}

/// A method as a key component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MethodKey(pub Method);

/// Server transaction key (RFC 3261 §17.2.3): top Via branch and sent-by, and the method,
/// where an ACK matches the INVITE it acknowledges.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerKey {
    pub branch: String,
    pub sent_by: String,
    pub method: MethodKey,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error(
        "top Via branch {branch:?} lacks the z9hG4bK cookie (RFC 2543 peers are not supported)"
    )]
    NotRfc3261 { branch: String },
}

impl ServerKey {
    pub fn for_request(request: &message::Request) -> Result<Self, KeyError> {
        let via = message::top_via_view(&request.headers)?;
        let branch = via.branch.unwrap_or_default();
        if !branch.starts_with(BRANCH_COOKIE) {
            return Err(KeyError::NotRfc3261 {
                branch: branch.to_string(),
            });
        }
        let method = match request.method {
            Method::Ack => Method::Invite,
            other => other,
        };
        Ok(Self {
            branch: branch.to_string(),
            sent_by: sent_by_key(&via),
            method: MethodKey(method),
        })
    }

    /// The key of the transaction with the same branch and sent-by but another method:
    /// how a CANCEL finds the INVITE it cancels (§9.2).
    pub fn with_method(&self, method: Method) -> Self {
        Self {
            branch: self.branch.clone(),
            sent_by: self.sent_by.clone(),
            method: MethodKey(method),
        }
    }
}

/// Client transaction key (RFC 3261 §17.1.3): the branch this element put in its Via, and
/// the CSeq method (a CANCEL shares its INVITE's branch).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub branch: String,
    pub method: MethodKey,
}

impl ClientKey {
    pub fn new(branch: &str, method: Method) -> Self {
        Self {
            branch: branch.to_string(),
            method: MethodKey(method),
        }
    }

    pub fn for_response(response: &message::Response) -> Result<Self, KeyError> {
        let via = message::top_via_view(&response.headers)?;
        let (_, method) = message::cseq(&response.headers)?;
        Ok(Self::new(via.branch.unwrap_or_default(), method))
    }
}

/// Sent-by as `host:port` with the transport's default port filled in, the form used in
/// server transaction keys (§17.2.3).
fn sent_by_key(via: &crate::sip::view::ViaView) -> String {
    let port = via
        .sent_by
        .port
        .unwrap_or_else(|| super::via::default_port(via.transport));
    let mut key = String::with_capacity(via.sent_by.host.len() + 6);
    key.push_str(via.sent_by.host);
    key.push(':');
    key.push_str(&port.to_string());
    key
}

/// The earliest of a set of optional deadlines.
fn earliest(deadlines: &[Option<Instant>]) -> Option<Instant> {
    deadlines.iter().flatten().min().copied()
}

/// True when `deadline` is set and not later than `now`.
fn due(deadline: Option<Instant>, now: Instant) -> bool {
    deadline.is_some_and(|at| at <= now)
}
