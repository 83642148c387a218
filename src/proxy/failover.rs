//! Failover across a trunk's core hosts (RFC 3263 §4.3). A request that starts a
//! transaction with one of its trunk's core hosts (an initial request from the Edge, a
//! REGISTER of the sidecar's own) and whose trunk has another usable host keeps a
//! [`Failover`]. When that host fails before answering for itself (nothing at all heard
//! within `failover_timeout`, a connection or TLS handshake that fails, a 503 without
//! `Retry-After`), the request goes to the next host in RFC 3263 order as a new client
//! transaction (new branch, same credential, same CSeq), within the first transaction's
//! 64·T1 budget; with no other host it simply waits on for Timer B/F. The failed host is
//! tried last for `failed_host_hold`.
//!
//! The transaction left behind is not dropped: it stops retransmitting but still
//! matches a late answer from the slow host. A provisional one gets a CANCEL; a 2xx gets
//! an ACK and a BYE, so that host's half-made call ends and the Edge never sees two
//! answers. A request that heard from its host (anything above 100 other than that 503)
//! stays with it, and so does its dialog: in-dialog requests follow the route set.

use bytes::Bytes;
use std::collections::{HashSet, VecDeque};

use crate::sip::wire::{Method, Request, Response};

use super::engine::{Destination, Engine, Entry, Failover};
use super::routing::Hop;
use crate::sip::wire;
use crate::stats::Stats;
use crate::transport::Side;

/// Branches abandoned recently, bounded: a 2xx for one after its transaction ended is
/// dropped rather than forwarded as a stray.
#[derive(Debug, Default)]
pub struct Abandoned {
    order: VecDeque<String>,
    set: HashSet<String>,
}

/// How many abandoned branches are remembered.
const ABANDONED_KEPT: usize = 4096;

impl Abandoned {
    fn remember(&mut self, branch: &str) {
        if self.set.insert(branch.to_string()) {
            self.order.push_back(branch.to_string());
        }
        while self.order.len() > ABANDONED_KEPT {
            if let Some(oldest) = self.order.pop_front() {
                self.set.remove(&oldest);
            }
        }
    }

    pub fn contains(&self, branch: &str) -> bool {
        !self.set.is_empty() && self.set.contains(branch)
    }
}

impl Engine {
    /// Lets client transaction `client`, which carries `request` to a core host of
    /// `trunk`, move to another host if this one fails. Only when another host is there.
    pub(super) fn arm_failover(&mut self, client: u64, trunk: usize, request: Request) {
        let started = self.now;
        let Some(Entry::Client(entry)) = self.entries.get(&client) else {
            return;
        };
        let tried = vec![entry.destination.addr];
        if !self.another_host(trunk, &tried) {
            return;
        }
        let budget_end = started + self.timers.transaction_timeout();
        let silence = (started + self.limits.failover_timeout).min(budget_end);
        let Some(Entry::Client(entry)) = self.entries.get_mut(&client) else {
            return;
        };
        entry.failover = Some(Box::new(Failover {
            trunk,
            tried,
            request,
            budget_end,
        }));
        entry.transaction.set_silence_deadline(silence);
        self.schedule(client);
    }

    /// Whether `trunk` has a core host not in `tried` that this side can reach.
    fn another_host(&self, trunk: usize, tried: &[std::net::SocketAddr]) -> bool {
        let Some(routed) = self.router.trunk(trunk) else {
            return false;
        };
        routed
            .core
            .current()
            .candidates
            .iter()
            .any(|candidate| !tried.contains(&candidate.addr) && self.usable(Hop::from(*candidate)))
    }

    /// Whether a core host can be sent to from here: a listener for its transport (for
    /// the Via), a UDP socket of its address family, and not this proxy itself.
    fn usable(&self, hop: Hop) -> bool {
        self.core.port(hop.transport).is_some()
            && (hop.transport != crate::config::Transport::Udp || self.core.sends_to(hop.addr))
            && self.router.checked(hop, Side::Core).is_ok()
    }

    /// The core host of `trunk` a new try goes to after `tried`: RFC 3263 order, hosts
    /// that failed recently last, only hosts this side can reach.
    pub(super) fn choose_core_hop(
        &self,
        trunk: usize,
        tried: &[std::net::SocketAddr],
        at: std::time::Instant,
    ) -> Result<Hop, super::routing::RouteError> {
        let routed = self
            .router
            .trunk(trunk)
            .ok_or(super::routing::RouteError::NoTrunk)?;
        let mut skipped = tried.to_vec();
        loop {
            let health = &self.health;
            let hop = self.router.core_hop(
                routed,
                &skipped,
                |addr| health.is_avoided(addr, at),
                self.random.u32(),
            )?;
            if self.usable(hop) {
                return Ok(hop);
            }
            skipped.push(hop.addr);
        }
    }

    /// Client transaction `client`'s host failed (`why`): when the request may still
    /// move, marks the host, sends the request to the next one and returns true. False
    /// leaves the failure to the caller (wait for Timer B/F, 503, or the response).
    pub(super) fn fail_over(&mut self, client: u64, why: &str) -> bool {
        let at = self.now;
        let Some(Entry::Client(entry)) = self.entries.get_mut(&client) else {
            return false;
        };
        let Some(mut failover) = entry.failover.take() else {
            return false;
        };
        let failed = entry.destination.addr;
        let cancelled = entry.cancel_sent
            || entry.cancel_pending
            || entry
                .server
                .is_some_and(|server| match self.entries.get(&server) {
                    Some(Entry::Server(server)) => {
                        server.cancel_requested || server.transaction.is_final()
                    }
                    _ => true,
                });
        if cancelled {
            // Nobody waits for an answer any more: nothing to move, no host to blame.
            return false;
        }
        if self.health.failed(failed, at, self.limits.failed_host_hold) {
            Stats::bump(&self.stats.core_host_failures);
        }
        if at >= failover.budget_end {
            tracing::info!(host = %failed, reason = why, "core host failed; no time left to try another");
            return false;
        }
        let Ok(hop) = self.choose_core_hop(failover.trunk, &failover.tried, at) else {
            tracing::info!(host = %failed, reason = why, "core host failed; every host of the trunk was tried");
            return false;
        };
        let Some((request, branch)) = self.retarget(&failover.request, hop, failover.trunk) else {
            return false;
        };
        tracing::info!(host = %failed, reason = why, next = %hop.addr, "core host failed; trying the next one");
        Stats::bump(&self.stats.failovers);
        let Some(Entry::Client(old)) = self.entries.get_mut(&client) else {
            return false;
        };
        // The server, the sender of an originated request and the re-send state move to
        // the new try; the old one only waits for a late answer.
        let server = old.server.take();
        let local = old.local.take();
        let carried = old.carried;
        let mut resend = old.resend.take();
        if !old.transaction.is_final() {
            old.abandoned = true;
            old.cancel_pending = old.transaction.is_invite();
            old.transaction.stop_retransmitting();
            let abandoned_branch = old.key.branch.clone();
            self.abandoned.remember(&abandoned_branch);
        }
        if let Some(info) = resend.as_mut() {
            info.request = request.clone();
        }
        failover.tried.push(hop.addr);
        failover.request = request.clone();
        let destination = Destination {
            side: Side::Core,
            transport: hop.transport,
            addr: hop.addr,
            local: None,
            trunk: Some(failover.trunk),
        };
        let budget_end = failover.budget_end;
        let more = self.another_host(failover.trunk, &failover.tried);
        let next = self.start_client(request, &branch, destination, server, resend);
        if let Some(Entry::Client(entry)) = self.entries.get_mut(&next) {
            entry.local = local;
            entry.carried = carried.or(entry.carried);
            entry.transaction.limit_deadline(budget_end);
            if more {
                let silence = (at + self.limits.failover_timeout).min(budget_end);
                entry.transaction.set_silence_deadline(silence);
                entry.failover = Some(failover);
            }
        }
        self.schedule(next);
        true
    }

    /// `request` (as forwarded, our Via on top) for another host: a new branch, and the
    /// Via's and our Record-Route's transport and port for the host's transport.
    fn retarget(&mut self, request: &Request, hop: Hop, trunk: usize) -> Option<(Request, String)> {
        let mut request = request.clone();
        let old = wire::pop_via(&mut request.headers).ok()?;
        if crate::config::Transport::from_via_token(&old.transport) != hop.transport {
            // Our Record-Route toward the core is the top one; it names the transport
            // the core reaches us on.
            if let Some(uri) = self.core.record_route_uri(hop.transport, Some(trunk)) {
                wire::replace_top_record_route(&mut request.headers, &uri);
            }
        }
        let branch = self.push_own_via(&mut request, Side::Core, hop.transport)?;
        Some((request, branch))
    }

    /// An answer on a transaction whose request moved to another host: a provisional
    /// one gets the CANCEL (once), a 2xx to an INVITE an ACK and a BYE; none goes on.
    pub(super) fn late_answer(&mut self, client: u64, response: &Response) {
        let code = response.code;
        let Some(Entry::Client(entry)) = self.entries.get_mut(&client) else {
            return;
        };
        tracing::info!(host = %entry.destination.addr, code, "late answer from a host the request moved away from");
        if code < 200 {
            if entry.cancel_pending {
                entry.cancel_pending = false;
                self.send_cancel(client);
            }
            return;
        }
        if (200..300).contains(&code) && entry.transaction.is_invite() {
            self.hang_up(client, response);
        }
    }

    /// Ends the call a 2xx from an abandoned host set up: ACK it and send a BYE (RFC
    /// 3261 §13.2.2.4, §15), both with the trunk's credential, to that host.
    fn hang_up(&mut self, client: u64, response: &Response) {
        let Some(Entry::Client(entry)) = self.entries.get(&client) else {
            return;
        };
        let destination = entry.destination;
        let original = entry.transaction.request().clone();
        let Some(contact) = wire::header_values(&response.headers, "Contact")
            .next()
            .map(|value| crate::sip::header::name_addr_uri(value).to_string())
        else {
            return;
        };
        let (Ok(from), Ok(to), Ok(call_id), Ok((seq, _))) = (
            wire::from_value(&original.headers),
            wire::to_value(&response.headers),
            wire::call_id(&original.headers),
            wire::cseq(&original.headers),
        ) else {
            return;
        };
        // The route toward that host: the Record-Route entries above our own, nearest
        // to us first.
        let mut route = Vec::new();
        for value in wire::record_routes(&response.headers) {
            match wire::route_uri(&value) {
                Ok(uri) if self.router.is_own(&uri) => break,
                Ok(_) => route.push(value),
                Err(_) => return,
            }
        }
        route.reverse();
        let route = if route.is_empty() {
            String::new()
        } else {
            format!("Route: {}\r\n", route.join(", "))
        };
        let (from, to, call_id) = (from.to_string(), to.to_string(), call_id.to_string());
        Stats::bump(&self.stats.late_calls_ended);
        for (method, number) in [("ACK", seq), ("BYE", seq.saturating_add(1))] {
            let text = format!(
                "{method} {contact} SIP/2.0\r\nMax-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\n\
                 Call-ID: {call_id}\r\nCSeq: {number} {method}\r\n{route}Content-Length: 0\r\n\r\n"
            );
            let Ok(wire::Message::Request(mut request)) = wire::parse(Bytes::from(text), true)
            else {
                return;
            };
            let Some(branch) = self.push_own_via(&mut request, Side::Core, destination.transport)
            else {
                return;
            };
            self.attach_current(&mut request, destination.trunk);
            if request.method == Method::Bye {
                self.start_client(request, &branch, destination, None, None);
            } else {
                self.send(destination, request.encode());
            }
        }
    }

    /// The trunk's current credential on a request of the sidecar's own to its core.
    fn attach_current(&mut self, request: &mut Request, trunk: Option<usize>) {
        let Some(trunk) = trunk else { return };
        let credential = self
            .router
            .trunk(trunk)
            .and_then(|routed| routed.credentials.as_ref())
            .and_then(|manager| manager.current_at(self.now));
        if let Some(credential) = credential {
            self.put_credential(request, trunk, &credential, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoned_branches_are_remembered_up_to_a_bound() {
        let mut abandoned = Abandoned::default();
        assert!(!abandoned.contains("z9hG4bKbsc1"));
        for index in 0..(ABANDONED_KEPT + 10) {
            abandoned.remember(&format!("z9hG4bKbsc{index}"));
        }
        assert!(!abandoned.contains("z9hG4bKbsc0"));
        assert!(abandoned.contains(&format!("z9hG4bKbsc{}", ABANDONED_KEPT + 9)));
        assert_eq!(abandoned.order.len(), ABANDONED_KEPT);
        assert_eq!(abandoned.set.len(), ABANDONED_KEPT);
    }
}
