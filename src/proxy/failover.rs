//! Failover across a trunk's core hosts (RFC 3263 §4.3). A request that starts a
//! transaction with one of its trunk's core hosts (an initial request from the Edge, a
//! REGISTER of the sidecar's own) and may go elsewhere keeps a [`Failover`]: when that
//! host fails before answering for itself (no response at all within
//! `failover_timeout`, a connection or TLS handshake that fails, a 503 without
//! `Retry-After`), the request goes to the next host in RFC 3263 order as a new client
//! transaction (new branch, same credential, same CSeq), within the first transaction's
//! 64·T1 budget. The failed host is tried last for `failed_host_hold`. A request that
//! heard from its host (anything above 100 other than that 503) stays with it, and so
//! does its dialog: in-dialog requests follow the route set, never this.

use rsip::Request;

use super::engine::{now, Destination, Engine, Entry, Failover};
use super::routing::Hop;
use crate::sip::message;
use crate::sip::via::Via;
use crate::stats::Stats;
use crate::transport::Side;

impl Engine {
    /// Lets client transaction `client`, which carries `request` to a core host of
    /// `trunk`, move to another host if this one fails. Only worth it when the trunk has
    /// another host.
    pub(super) fn arm_failover(&mut self, client: u64, trunk: usize, request: Request) {
        let Some(routed) = self.router.trunk(trunk) else {
            return;
        };
        if self.router.core_hosts(routed) < 2 {
            return;
        }
        let started = now();
        let timeout = self.limits.failover_timeout;
        let Some(Entry::Client(entry)) = self.entries.get_mut(&client) else {
            return;
        };
        let budget_end = started + self.timers.transaction_timeout();
        entry.failover = Some(Box::new(Failover {
            trunk,
            tried: vec![entry.destination.addr],
            request,
            budget_end,
        }));
        entry
            .transaction
            .set_silence_deadline((started + timeout).min(budget_end));
        self.schedule(client);
    }

    /// Client transaction `client`'s host failed (`why`): marks the host, and when the
    /// request may still move, sends it to the next host and returns true. False leaves
    /// the failure to the caller (408, 503, or the response itself).
    pub(super) fn fail_over(&mut self, client: u64, why: &str) -> bool {
        let at = now();
        let hold = self.limits.failed_host_hold;
        let Some(Entry::Client(entry)) = self.entries.get_mut(&client) else {
            return false;
        };
        let Some(mut failover) = entry.failover.take() else {
            return false;
        };
        let failed = entry.destination.addr;
        self.health.failed(failed, at, hold);
        Stats::bump(&self.stats.core_host_failures);
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
        if cancelled || at >= failover.budget_end {
            tracing::info!(host = %failed, reason = why, "core host failed; no other host to try for this request");
            return false;
        }
        let Some(routed) = self.router.trunk(failover.trunk) else {
            return false;
        };
        let health = &self.health;
        let next = self.router.core_hop(
            routed,
            &failover.tried,
            |addr| health.is_avoided(addr, at),
            rand::random(),
        );
        let Ok(hop) = next.and_then(|hop| self.router.checked(hop, Side::Core)) else {
            tracing::info!(host = %failed, reason = why, "core host failed; every host of the trunk was tried");
            return false;
        };
        let Some((request, branch)) = self.retarget(&failover.request, hop) else {
            return false;
        };
        tracing::info!(host = %failed, reason = why, next = %hop.addr, "core host failed; trying the next one");
        Stats::bump(&self.stats.failovers);
        // The failed try ends quietly: its server and sender move to the new one.
        let Some(Entry::Client(old)) = self.entries.get_mut(&client) else {
            return false;
        };
        let server = old.server.take();
        let local = old.local.take();
        let carried = old.carried;
        let mut resend = old.resend.take();
        if let Some(info) = resend.as_mut() {
            info.request = request.clone();
        }
        // A host that answered 503 gets its ACK from the old transaction; a silent or
        // unreachable one is given up.
        if !old.transaction.is_final() {
            old.transaction.abort();
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
        let more = self
            .router
            .trunk(failover.trunk)
            .is_some_and(|routed| self.router.core_hosts(routed) > failover.tried.len());
        let next = self.start_client(request, &branch, destination, server, resend);
        if let Some(Entry::Client(entry)) = self.entries.get_mut(&next) {
            entry.local = local;
            entry.carried = carried.or(entry.carried);
            let silence = if more {
                (at + self.limits.failover_timeout).min(budget_end)
            } else {
                budget_end
            };
            entry.transaction.set_silence_deadline(silence);
            entry.transaction.limit_deadline(budget_end);
            entry.failover = Some(failover);
        }
        self.schedule(next);
        true
    }

    /// `request` (as forwarded, our Via on top) for another host: a new branch, and the
    /// Via's transport and port for the host's transport.
    fn retarget(&mut self, request: &Request, hop: Hop) -> Option<(Request, String)> {
        let port = self.core.port(hop.transport)?;
        let mut request = request.clone();
        message::pop_via(&mut request.headers).ok()?;
        let branch = self
            .branches
            .next(message::call_id(&request.headers).unwrap_or(""));
        let mut via = Via::new(
            hop.transport.via_token(),
            &self.core.advertise,
            port,
            &branch,
        );
        via.set_param("rport", None);
        message::push_via(&mut request.headers, &via);
        Some((request, branch))
    }
}
