//! One re-send with fresh credentials (DESIGN.md item 6), for `bearer` and `digest`
//! trunks.
//!
//! The core answers a request 401, 407 or 403. The answer is kept from the Edge and the
//! request goes out again once as a new client transaction (new branch, CSeq + 1) with
//! credentials newer than the rejected ones:
//!
//! - a Digest challenge the request had not answered, or whose nonce was stale or unknown,
//!   is answered at once with the credential at hand (the nonce is what is new);
//! - anything else (403, a Bearer 401, a Digest answer refused with its own nonce) means
//!   the credential itself may be stale: the trunk's credential manager is asked for a
//!   replacement ([`crate::credentials::CredentialManager::replacement`]), which reads
//!   the refusal by the one rule of [`crate::credentials::verdict`]: a rotation waits
//!   (at most `resend_wait`) for the next refresh the rate limit allows, a permanent
//!   refusal or one of the request itself is passed on at once. Only if a newer
//!   credential comes is the request re-sent.
//!
//! Every answer above 100 other than 401/403/407 to a request that carried a credential
//! tells the manager that the core accepted that generation.
//!
//! The dialog remembers the offset so later requests from the Edge are numbered as the
//! core now expects, and responses toward the Edge carry the Edge's own CSeq
//! ([`Engine::deliver`]). A second rejection is final, except that a re-sent Digest
//! request may answer one more challenge that calls its nonce stale. A rejection is also
//! final when no newer credential exists. A CANCEL that arrives while the re-send waits
//! ends the INVITE with 487 at once; it is never sent again. Every wait of one request
//! (for a valid credential in a dialog, then for a replacement) stays within the trunk's
//! `resend_wait` from when the request arrived.

use std::sync::Arc;

use crate::sip::wire::{Method, Request, Response};

use super::engine::{Action, CredentialWait, Destination, Engine, Entry};
use super::request::strip_credentials;
use crate::config::AuthMode;
use crate::credentials::refusal::{qualifies, read_refusal, Refusal};
use crate::credentials::{verdict, Credential};
use crate::sip::dialog::{DialogKey, MAX_CSEQ};
use crate::sip::digest::{sent_answers, ChallengeKind};
use crate::sip::view::HeaderName;
use crate::sip::wire::{self, header_values};
use crate::stats::Stats;

/// What a client transaction keeps to be able to re-send its request. Its `Debug` shows
/// no part of the request, which carries the token.
pub struct ResendInfo {
    /// The request as it was forwarded (our Via on top, the old token).
    pub request: Request,
    /// The credential generation it carried.
    pub generation: u64,
    /// The trunk (its index) whose credentials to refresh.
    pub trunk: usize,
    /// This request is itself a re-send: only a Digest challenge calling its nonce
    /// stale may start another.
    pub is_resend: bool,
    /// When it was sent (engine clock).
    pub sent_at: std::time::Instant,
}

/// A rejected request waiting for its forced refresh.
pub struct PendingResend {
    info: ResendInfo,
    destination: Destination,
    /// The rejection as the Edge would see it, should no newer credential come.
    rejected: Response,
    /// Whether the re-send needs a credential generation newer than the rejected one
    /// (not when a Digest challenge is answered with the same password).
    require_newer: bool,
    /// When the rejection arrived (engine clock), for the longest wait.
    absorbed_at: std::time::Instant,
}

impl std::fmt::Debug for ResendInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResendInfo")
            .field("method", &self.request.method)
            .field("generation", &self.generation)
            .field("trunk", &self.trunk)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for PendingResend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingResend")
            .field("info", &self.info)
            .field("rejected", &self.rejected.code)
            .finish_non_exhaustive()
    }
}

/// How much longer than its deadline a pending re-send waits for the manager's answer:
/// the manager answers by the deadline, this only guarantees that an answer reaches the
/// engine.
const RESEND_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The dialog key of a request or response from the Edge's side: Call-ID and From tag.
fn dialog_key(headers: &wire::Headers, tag_of_to: bool) -> Option<DialogKey> {
    let call_id = wire::call_id(headers).ok()?;
    let value = if tag_of_to {
        wire::to_value(headers).ok()?
    } else {
        wire::from_value(headers).ok()?
    };
    Some(DialogKey {
        call_id: call_id.to_string(),
        edge_tag: wire::tag_of(value)?.to_string(),
    })
}

/// The numbering space of a request from the Edge: its dialog, or for REGISTER the
/// Call-ID alone, in which a registrar expects CSeq to rise (RFC 3261 §10.3 step 7)
/// whatever From tag each refresh carries.
fn request_dialog_key(request: &Request) -> Option<DialogKey> {
    if request.method == Method::Register {
        return Some(DialogKey {
            call_id: wire::call_id(&request.headers).ok()?.to_string(),
            edge_tag: String::new(),
        });
    }
    dialog_key(&request.headers, false)
}

impl Engine {
    /// A 401, 407 or 403 for a request that may be re-sent: absorb it and re-send, at
    /// once or after a forced refresh. Returns false when the response should be relayed
    /// as usual.
    pub(super) fn absorb_rejection(
        &mut self,
        client: u64,
        server: u64,
        response: &Response,
    ) -> bool {
        let code = response.code;
        if !matches!(code, 401 | 403 | 407) {
            return false;
        }
        let Some(Entry::Client(entry)) = self.entries.get(&client) else {
            return false;
        };
        if entry.cancel_sent {
            return false;
        }
        let kind = ChallengeKind::of_status(code);
        let (trunk, is_resend, method, sent) = match &entry.resend {
            // The answers the rejected request carried, for telling stale from refused.
            Some(info) => (
                info.trunk,
                info.is_resend,
                info.request.method.to_string(),
                kind.map(|kind| {
                    sent_answers(header_values(
                        &info.request.headers,
                        kind.credentials_header(),
                    ))
                })
                .unwrap_or_default(),
            ),
            None => return false,
        };
        let Some(trunk) = self.router.trunk(trunk) else {
            return false;
        };
        let auth = trunk.auth;
        let realm = trunk.digest_realm.clone();
        let digest = trunk.digest.clone();
        let Some(manager) = trunk.credentials.clone() else {
            return false;
        };
        let Some(Entry::Server(server_entry)) = self.entries.get(&server) else {
            return false;
        };
        // An INVITE the Edge already cancelled is not sent again: its rejection ends it.
        if server_entry.transaction.is_final() || server_entry.cancel_requested {
            return false;
        }
        // How to re-send: at once (a challenge to answer) or after a forced refresh.
        let challenges: Vec<&str> = kind
            .map(|kind| header_values(&response.headers, kind.challenge_header()).collect())
            .unwrap_or_default();
        let refusal = read_refusal(
            auth,
            code,
            &method,
            &challenges,
            &sent,
            is_resend,
            &mut digest.lock(),
        );
        let require_newer = match refusal {
            Refusal::AnswerChallenge => {
                Stats::bump(&self.stats.digest_challenges_answered);
                false
            }
            Refusal::NeedNewer => {
                if auth == AuthMode::Digest {
                    tracing::info!(
                        trunk = manager.trunk(),
                        status = code,
                        "core refused the digest credential; asking for a newer one"
                    );
                }
                true
            }
            Refusal::Unanswerable { offered } => {
                Stats::bump(&self.stats.digest_unanswerable);
                tracing::warn!(
                    trunk = manager.trunk(),
                    status = code,
                    offered = %offered,
                    configured_realm = realm.as_deref().unwrap_or("(any)"),
                    "core's challenge cannot be answered (supported: Digest with MD5, SHA-256, SHA-512-256, each also -sess; qop auth or none; the configured realm)"
                );
                return false;
            }
            Refusal::Stands => return false,
        };
        let mut rejected = response.clone();
        if wire::remove_top_via(&mut rejected.headers).is_err() {
            return false;
        }
        let Some(Entry::Client(entry)) = self.entries.get_mut(&client) else {
            return false;
        };
        let destination = entry.destination;
        let Some(info) = entry.resend.take() else {
            return false;
        };
        let (rejected_generation, sent_at) = (info.generation, info.sent_at);
        let Some(Entry::Server(server_entry)) = self.entries.get_mut(&server) else {
            return false;
        };
        // Every wait of one request together stays within resend_wait.
        let until = server_entry.arrived + manager.resend_wait();
        server_entry.pending_resend = Some(Box::new(PendingResend {
            info: *info,
            destination,
            rejected,
            require_newer,
            absorbed_at: self.now,
        }));
        Stats::bump(&self.stats.rejections_absorbed);
        if !require_newer {
            tracing::debug!(
                trunk = manager.trunk(),
                status = code,
                "answering the core's digest challenge"
            );
            self.finish_resend(server, manager.current_at(self.now));
            return true;
        }
        tracing::info!(
            trunk = manager.trunk(),
            generation = rejected_generation,
            status = code,
            "core rejected the credential; refreshing to re-send once"
        );
        self.act(Action::AwaitCredential {
            server,
            manager,
            wait: CredentialWait::Replacement {
                rejected: rejected_generation,
                sent_at,
                until,
                give_up: until + RESEND_MARGIN,
            },
        });
        true
    }

    /// The credential for server transaction `server`'s re-send is known (or known not
    /// to exist): re-send with it, or pass the rejection on.
    pub(super) fn finish_resend(&mut self, server: u64, credential: Option<Arc<Credential>>) {
        let Some(Entry::Server(entry)) = self.entries.get_mut(&server) else {
            return;
        };
        let Some(pending) = entry.pending_resend.take() else {
            return;
        };
        if entry.transaction.is_final() {
            return;
        }
        let span = entry.span.clone();
        let _entered = span.enter();
        let cancel_requested = entry.cancel_requested;
        // The number the Edge gave the request: offset steps are kept in the Edge's count.
        let edge_cseq = wire::cseq(&entry.request.headers).ok().map(|(seq, _)| seq);
        let PendingResend {
            info,
            destination,
            rejected,
            require_newer,
            absorbed_at,
        } = *pending;
        let waited = self.now.saturating_duration_since(absorbed_at);
        Stats::raise(
            &self.stats.longest_resend_wait_micros,
            u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
        );
        let activation_delay = self
            .router
            .trunk(info.trunk)
            .and_then(|trunk| trunk.credentials.as_ref())
            .map_or(std::time::Duration::ZERO, |manager| {
                manager.activation_delay()
            });
        let credential = credential.filter(|credential| {
            qualifies(
                credential,
                info.generation,
                info.sent_at,
                require_newer,
                activation_delay,
            )
        });
        let trunk = info.trunk;
        let resent = credential.and_then(|credential| {
            let request = self.rebuild(info.request.clone(), trunk, &credential)?;
            Some((credential.generation, request))
        });
        let Some((generation, (request, branch))) = resent else {
            Stats::bump(&self.stats.resends_impossible);
            tracing::info!(
                generation = info.generation,
                status = rejected.code,
                "no newer credential; passing the rejection to the Edge"
            );
            self.deliver(server, rejected);
            return;
        };
        // The dialog must remember the new numbering before the request goes out; a
        // re-send whose dialog would lose track of it would break the call later.
        if in_or_creating_dialog(&request) {
            let recorded = request_dialog_key(&request)
                .zip(edge_cseq)
                .map(|(key, edge_cseq)| self.dialogs.add_offset(self.now, &key, edge_cseq));
            match recorded {
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    Stats::bump(&self.stats.dialog_translation_failures);
                    tracing::warn!(error = %error, "cannot record the dialog's CSeq offset; passing the rejection on");
                    self.deliver(server, rejected);
                    return;
                }
                None => {
                    Stats::bump(&self.stats.resends_impossible);
                    self.deliver(server, rejected);
                    return;
                }
            }
        }
        Stats::bump(&self.stats.resends);
        tracing::info!(generation, branch = %branch, "re-sending with fresh credentials");
        // A first Digest re-send may still meet a stale nonce once more; any other
        // re-send is final.
        let digest = self.router.trunk(trunk).map(|trunk| trunk.auth) == Some(AuthMode::Digest);
        let again = (digest && !info.is_resend).then(|| {
            Box::new(ResendInfo {
                request: request.clone(),
                generation,
                trunk,
                is_resend: true,
                sent_at: self.now,
            })
        });
        // A re-send keeps no re-send state of its own (bearer), but the core's acceptance
        // of it must still reach the manager.
        let carried = super::engine::Carried {
            resent: true,
            ..super::engine::Carried::new(trunk, generation, self.now, &request)
        };
        let client = self.start_client(request, &branch, destination, Some(server), again);
        if let Some(Entry::Client(entry)) = self.entries.get_mut(&client) {
            entry.carried = Some(carried);
        }
        if cancel_requested {
            if let Some(Entry::Client(entry)) = self.entries.get_mut(&client) {
                entry.cancel_pending = true;
            }
        }
    }

    /// The re-sent request: a new branch in our Via, CSeq + 1, the trunk's credentials
    /// from `credential`. `None` when the request lacks what that needs (it was forwarded,
    /// so this does not happen) or the credential is not of the trunk's kind.
    fn rebuild(
        &mut self,
        mut request: Request,
        trunk: usize,
        credential: &Credential,
    ) -> Option<(Request, String)> {
        let mut via = wire::pop_via(&mut request.headers).ok()?;
        let branch = self
            .branches
            .next(&self.random, wire::call_id(&request.headers).unwrap_or(""));
        via.set_param("branch", Some(branch.clone()));
        wire::push_via(&mut request.headers, &via);
        let (seq, method) = wire::cseq(&request.headers).ok()?;
        let next = seq.checked_add(1).filter(|next| *next <= MAX_CSEQ)?;
        wire::set_cseq(&mut request.headers, next, method);
        strip_credentials(&mut request);
        if !self.put_credential(&mut request, trunk, credential, true) {
            return None;
        }
        Some((request, branch))
    }

    /// An answer that shows the core took the credential a request carried (see
    /// `credentials::verdict`): the trunk's manager learns it.
    pub(super) fn note_acceptance(&self, client: u64, code: u16) {
        if !verdict::shows_acceptance(code) {
            return;
        }
        let Some(Entry::Client(entry)) = self.entries.get(&client) else {
            return;
        };
        let Some(carried) = entry.carried.filter(|carried| carried.checked) else {
            return;
        };
        if let Some(manager) = self
            .router
            .trunk(carried.trunk)
            .and_then(|trunk| trunk.credentials.as_ref())
        {
            manager.note_accepted(carried.generation, carried.sent_at);
        }
    }

    /// A success from the core for a request carrying the trunk's credentials may hand
    /// out the next nonce to use (`nextnonce` in `Authentication-Info`, RFC 7616 §3.5):
    /// a `digest` trunk takes it. The header is about the sidecar's credentials, not the
    /// Edge's, so it is removed before the response goes on.
    pub(super) fn take_authentication_info(&mut self, client: u64, response: &mut Response) {
        let Some(Entry::Client(entry)) = self.entries.get(&client) else {
            return;
        };
        let Some(trunk) = entry.carried.map(|carried| carried.trunk) else {
            return;
        };
        if let Some(routed) = self.router.trunk(trunk) {
            let mut digest = routed.digest.lock();
            for kind in ChallengeKind::BOTH {
                for info in header_values(&response.headers, kind.info_header()) {
                    if digest.next_nonce(kind, info) {
                        tracing::debug!(trunk, "core handed out the next nonce");
                    }
                }
            }
        }
        response.headers.retain(|header| {
            !matches!(
                header.kind(),
                HeaderName::AuthenticationInfo | HeaderName::ProxyAuthenticationInfo
            )
        });
    }

    /// Ends the CSeq offset of the dialog a BYE's 2xx closes, whichever end sent the BYE.
    pub(super) fn end_dialog(&mut self, response: &Response) {
        let now = self.now;
        for tag_of_to in [false, true] {
            if let Some(key) = dialog_key(&response.headers, tag_of_to) {
                self.dialogs.end(now, &key);
            }
        }
    }

    /// Numbers a request from the Edge as the core expects it in this dialog.
    pub(super) fn translate_cseq(&mut self, request: &mut Request) {
        // The common case, no dialog was ever re-sent: nothing to parse or look up.
        if self.dialogs.is_empty() {
            return;
        }
        let Some(key) = request_dialog_key(request) else {
            return;
        };
        let Ok((seq, method)) = wire::cseq(&request.headers) else {
            return;
        };
        match self.dialogs.shift_up(self.now, &key, seq) {
            Ok(shifted) if shifted != seq => {
                wire::set_cseq(&mut request.headers, shifted, method);
            }
            Ok(_) => {}
            Err(error) => {
                Stats::bump(&self.stats.dialog_translation_failures);
                tracing::warn!(error = %error, "cannot translate the CSeq of an in-dialog request");
            }
        }
        if method == Method::Prack {
            self.translate_rack(request, &key);
        }
    }
}

impl Engine {
    /// A PRACK's RAck quotes the INVITE's CSeq: shift it as that INVITE was shifted.
    fn translate_rack(&mut self, request: &mut Request, key: &DialogKey) {
        let now = self.now;
        let (dialogs, stats) = (&mut self.dialogs, &self.stats);
        request.headers.rewrite("RAck", |value| {
            let quoted = value
                .split_whitespace()
                .nth(1)
                .and_then(|number| number.parse::<u32>().ok())
                .unwrap_or(0);
            let offset = dialogs.offset(now, key, quoted);
            if offset == 0 {
                return None;
            }
            let shifted = crate::sip::dialog::shift_rack(value, offset);
            if shifted.is_none() {
                Stats::bump(&stats.dialog_translation_failures);
            }
            shifted
        });
    }
}

/// Requests whose CSeq numbering the core keeps per dialog: those inside one (a To tag)
/// and those that create one. Others (OPTIONS, MESSAGE outside a dialog) need no offset.
fn in_or_creating_dialog(request: &Request) -> bool {
    let in_dialog = wire::in_dialog(&request.headers);
    in_dialog
        || matches!(
            request.method,
            Method::Invite | Method::Subscribe | Method::Refer | Method::Register
        )
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a fixed instant; nothing here runs on a clock
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_part_of_the_request() {
        let text = "INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
                    Authorization: Bearer debug-token-7e2a\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\n\
                    Call-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let wire::Message::Request(request) = wire::parse(bytes::Bytes::from(text), true).unwrap()
        else {
            unreachable!()
        };
        let info = ResendInfo {
            request,
            generation: 3,
            trunk: 0,
            is_resend: false,
            sent_at: std::time::Instant::now(),
        };
        let shown = format!("{info:?}");
        assert!(!shown.contains("debug-token-7e2a"), "{shown}");
        assert!(shown.contains("generation: 3"));
    }
}
