//! The player's live transactions: requests it sends and the answers they get, requests
//! that reach it and the answers it gives, retransmissions over UDP, and the live dialog
//! those messages create (RFC 3261 §12, §13, §17).

use std::time::Instant;

use super::{
    build, Origin, Output, Phase, Player, Received, Retransmit, Sent, CLEANUP,
    MAX_LIVE_TRANSACTIONS,
};
use crate::replay::build::LiveDialog;
use crate::replay::script::label;
use crate::replay::text::SipText;

/// A request's branch, or for a peer that sends none (RFC 2543) its CSeq number.
fn branch_of(message: &SipText) -> String {
    message
        .branch()
        .unwrap_or_else(|| format!("cseq-{}", message.cseq().map_or(0, |(number, _)| number)))
}

impl Player {
    pub(super) fn send_request(
        &mut self,
        now: Instant,
        request: SipText,
        transaction: Option<usize>,
        note: Option<&str>,
    ) {
        let method = request.method().unwrap_or_default().to_ascii_uppercase();
        let branch = branch_of(&request);
        if let Some((number, _)) = request.cseq() {
            self.highest_cseq = self.highest_cseq.max(number);
        }
        let bytes = request.encode();
        let entry = self.ladder.push(
            true,
            label(&request),
            format!("request {branch} {method}"),
            note,
        );
        self.outputs.push_back(Output {
            bytes: bytes.clone(),
            to: None,
        });
        let deadline = now + self.pacing.timeout;
        // Timer A doubles without a cap; Timer E stops doubling at T2 (§17.1.1.2, §17.1.2.2).
        let cap = (method != "INVITE").then_some(self.pacing.t2);
        let retransmit = if self.reliable || method == "ACK" {
            Retransmit::default()
        } else {
            Retransmit::start(now, self.pacing.t1, cap, deadline)
        };
        if let Some(transaction) = transaction {
            self.sent_for.insert(transaction, self.sent.len());
        }
        self.sent.push(Sent {
            transaction,
            method,
            branch,
            request,
            bytes,
            responded: false,
            provisionals: 0,
            final_status: None,
            ack: None,
            cancelled: false,
            cleaning_up: false,
            retransmit,
            deadline,
            entry,
        });
    }

    pub(super) fn send_response(
        &mut self,
        now: Instant,
        index: usize,
        response: SipText,
        note: Option<&str>,
    ) {
        let code = response.status().unwrap_or(0);
        let bytes = response.encode();
        let (t1, t2, timeout, reliable) = (
            self.pacing.t1,
            self.pacing.t2,
            self.pacing.timeout,
            self.reliable,
        );
        let received = &mut self.received[index];
        self.ladder.push(
            true,
            label(&response),
            format!("response {} {} {code}", received.branch, received.method),
            note,
        );
        received.last_response = Some(bytes.clone());
        received.final_sent |= code >= 200;
        // A final answer to an INVITE is repeated until its ACK comes, at T1 doubling up
        // to T2: a 2xx by us on every transport (§13.3.1.4, reliability is end to end),
        // a non-2xx over UDP only (Timer G, §17.2.1).
        let repeats = received.method == "INVITE"
            && match code {
                200..=299 => true,
                300.. => !reliable,
                _ => false,
            };
        if repeats {
            received.retransmit = Retransmit::start(now, t1, Some(t2), now + timeout);
        }
        let origin = received.origin;
        let method = received.method.clone();
        let creates_dialog = method == "INVITE" && received.request.to_tag().is_none();
        self.outputs.push_back(Output {
            bytes,
            to: Some(origin),
        });
        if creates_dialog {
            match code {
                200..=299 => {
                    if let Some(dialog) = &mut self.dialog {
                        dialog.confirmed = true;
                    }
                }
                300.. if !self.dialog.as_ref().is_some_and(|dialog| dialog.confirmed) => {
                    self.dialog = None;
                }
                _ => {}
            }
        }
        if method == "BYE" && code >= 200 {
            if let Some(dialog) = &mut self.dialog {
                dialog.ended = true;
            }
        }
    }

    /// Repeats what is due over UDP: our requests without a final answer, and our final
    /// answers to INVITEs without an ACK.
    pub(super) fn retransmit(&mut self, now: Instant) {
        for sent in &mut self.sent {
            if sent.final_status.is_none() && sent.retransmit.due(now) {
                self.ladder.repeat(sent.entry);
                self.outputs.push_back(Output {
                    bytes: sent.bytes.clone(),
                    to: None,
                });
            }
        }
        for received in &mut self.received {
            if received.retransmit.due(now) {
                if let Some(bytes) = received.last_response.clone() {
                    self.outputs.push_back(Output {
                        bytes,
                        to: Some(received.origin),
                    });
                }
            }
        }
    }

    pub(super) fn on_response(&mut self, now: Instant, response: SipText) {
        let code = response.status().unwrap_or(0);
        let branch = branch_of(&response);
        let method = response.method().unwrap_or_default().to_ascii_uppercase();
        let index = self
            .sent
            .iter()
            .position(|sent| sent.branch == branch && sent.method == method);
        // The answer to a cleanup request, or to an INVITE being ended, is cleanup too.
        let note = index
            .filter(|&index| {
                let sent = &self.sent[index];
                sent.transaction.is_none() || sent.cleaning_up
            })
            .map(|_| CLEANUP);
        let key = format!(
            "response {branch} {method} {code} {}",
            response.to_tag().unwrap_or_default()
        );
        self.ladder
            .push_or_repeat(false, label(&response), key, note);
        let Some(index) = index else {
            self.note(format!("stray {}", label(&response)));
            return;
        };
        if code >= 200 {
            if let Some(ack) = self.sent[index].ack.clone() {
                // A retransmitted final: the same ACK again, and nothing learnt from it.
                self.outputs.push_back(Output {
                    bytes: ack,
                    to: None,
                });
                return;
            }
        }
        if method == "INVITE" {
            if self.sent[index].request.to_tag().is_some() {
                self.refresh_target(&response, code);
            } else {
                self.learn_dialog(&response, code);
            }
        }
        if let Some(rseq) = response
            .header("RSeq")
            .and_then(|value| value.trim().parse().ok())
        {
            self.last_rseq = Some(rseq);
        }
        let t2 = self.pacing.t2;
        let sent = &mut self.sent[index];
        sent.responded = true;
        if code < 200 {
            if code > 100 && sent.final_status.is_none() {
                sent.provisionals += 1;
            }
            if sent.method == "INVITE" {
                // Timer A stops at the first provisional (§17.1.1.2).
                sent.retransmit.stop();
                self.cancel_for_cleanup(now, index);
            } else if sent.final_status.is_none() {
                // Timer E goes on at T2 (§17.1.2.2).
                sent.retransmit = Retransmit::start(now, t2, Some(t2), sent.deadline);
            }
            return;
        }
        let first_final = sent.final_status.is_none();
        sent.final_status.get_or_insert(code);
        sent.retransmit.stop();
        if sent.method == "BYE" && first_final {
            if let Some(dialog) = &mut self.dialog {
                dialog.ended = true;
            }
        }
        if sent.method != "INVITE" {
            return;
        }
        self.acknowledge(index, &response, note);
        // A call that comes up after the walk ended is hung up at once.
        if (200..300).contains(&code) && self.phase != Phase::Walking {
            self.hang_up(now);
        }
    }

    /// The ACK for a final response to our INVITE `index`.
    fn acknowledge(&mut self, index: usize, response: &SipText, note: Option<&str>) {
        let body = self.sent[index]
            .transaction
            .and_then(|transaction| self.captured_ack_body(transaction))
            .unwrap_or_default();
        let branch = self.next_branch();
        let ack = build::ack(
            &self.sent[index].request,
            response,
            self.dialog.as_ref(),
            &branch,
            &self.rewrite,
            &body,
        );
        let bytes = ack.encode();
        self.sent[index].ack = Some(bytes.clone());
        let ack_branch = branch_of(&ack);
        self.ladder.push(
            true,
            "ACK".into(),
            format!("request {ack_branch} ACK"),
            note,
        );
        self.outputs.push_back(Output { bytes, to: None });
    }

    /// The body of the captured ACK for a captured INVITE transaction (late offer).
    fn captured_ack_body(&self, invite: usize) -> Option<Vec<u8>> {
        let cseq = self.dialogue.transactions[invite].cseq;
        self.steps()
            .iter()
            .find(|step| {
                step.side == self.role
                    && step.text.method() == Some("ACK")
                    && step.text.cseq().map(|(number, _)| number) == Some(cseq)
                    && !step.text.body.is_empty()
            })
            .map(|step| step.text.body.clone())
    }

    /// The dialog a response to our INVITE creates or confirms (§12.1.2).
    fn learn_dialog(&mut self, response: &SipText, code: u16) {
        let confirmed = self.dialog.as_ref().is_some_and(|dialog| dialog.confirmed);
        match code {
            101..=299 => {
                let (Some(tag), Some(target)) = (response.to_tag(), response.contact_uri()) else {
                    return;
                };
                if confirmed && code < 200 {
                    return;
                }
                let mut route_set = response.list("Record-Route");
                route_set.reverse();
                self.dialog = Some(LiveDialog {
                    remote_tag: tag.to_string(),
                    target,
                    route_set,
                    confirmed: code >= 200,
                    ended: false,
                });
            }
            300.. if !confirmed => self.dialog = None,
            _ => {}
        }
    }

    /// A 2xx to a re-INVITE may move the remote target; the route set stays as the
    /// dialog was created (§12.2.1.2).
    fn refresh_target(&mut self, response: &SipText, code: u16) {
        if let (200..=299, Some(dialog), Some(target)) =
            (code, self.dialog.as_mut(), response.contact_uri())
        {
            dialog.target = target;
        }
    }

    pub(super) fn on_request(&mut self, now: Instant, request: SipText, origin: Origin) {
        let method = request.method().unwrap_or_default().to_ascii_uppercase();
        let branch = branch_of(&request);
        let cseq = request.cseq().map_or(0, |(number, _)| number);
        if self.peer.is_none() {
            self.peer = Some(origin);
        }
        // A retransmission: our last answer again.
        if let Some(known) = self
            .received
            .iter()
            .position(|received| received.branch == branch && received.method == method)
        {
            let received = &self.received[known];
            self.ladder.repeat(received.entry);
            if let Some(bytes) = received.last_response.clone() {
                self.outputs.push_back(Output {
                    bytes,
                    to: Some(origin),
                });
            }
            return;
        }
        if self.received.len() >= MAX_LIVE_TRANSACTIONS {
            self.note(format!(
                "more than {MAX_LIVE_TRANSACTIONS} live requests: the rest were ignored"
            ));
            return;
        }
        if method == "ACK" {
            // The ACK ends the repeats of our final answer to its INVITE.
            for received in &mut self.received {
                if received.method == "INVITE" && received.cseq == cseq {
                    received.retransmit.stop();
                }
            }
        }
        let cleanup = build::is_cleanup(&request);
        let entry = self.ladder.push(
            false,
            method.clone(),
            format!("request {branch} {method}"),
            cleanup.then_some(CLEANUP),
        );
        if method == "INVITE" && request.to_tag().is_none() {
            // We are the UAS of the dialog this INVITE creates.
            if let (Some(tag), Some(target)) = (request.from_tag(), request.contact_uri()) {
                self.dialog = Some(LiveDialog {
                    remote_tag: tag.to_string(),
                    target,
                    route_set: request.list("Record-Route"),
                    confirmed: false,
                    ended: false,
                });
            }
        }
        let index = self.received.len();
        self.received.push(Received {
            method: method.clone(),
            branch,
            cseq,
            request,
            origin,
            last_response: None,
            final_sent: false,
            cleanup,
            retransmit: Retransmit::default(),
            entry,
        });
        let count = self.received_counts.entry(method.clone()).or_default();
        *count += 1;
        let ordinal = *count;
        let other = self.role.other();
        let captured = self.steps().iter().find(|step| {
            step.side == other
                && step.ordinal == ordinal
                && step
                    .text
                    .method()
                    .is_some_and(|captured| captured.eq_ignore_ascii_case(&method))
        });
        let Some(transaction) = captured.and_then(|step| step.transaction) else {
            self.auto_answer(now, index);
            return;
        };
        self.received_for.insert(transaction, index);
        // The walk answers it if a captured answer of ours is still ahead. An INVITE the
        // capture never answers rings on (the capture ended while it rang); anything
        // else is answered now.
        let answered_later = self.phase == Phase::Walking
            && self.steps()[self.cursor..].iter().any(|step| {
                step.side == self.role
                    && !step.text.is_request()
                    && step.transaction == Some(transaction)
            });
        if !answered_later && method != "INVITE" {
            self.auto_answer(now, index);
        }
    }

    /// Answers a live request the capture has no (more) answer for.
    pub(super) fn auto_answer(&mut self, now: Instant, index: usize) {
        let method = self.received[index].method.clone();
        if method == "ACK" {
            return;
        }
        let note = if self.received[index].cleanup {
            CLEANUP
        } else {
            "auto"
        };
        let run = self.rewrite.run.clone();
        if method == "CANCEL" {
            let branch = self.received[index].branch.clone();
            let invite = self
                .received
                .iter()
                .position(|received| received.method == "INVITE" && received.branch == branch);
            let live = &self.received[index].request;
            let Some(invite) = invite else {
                let unknown =
                    build::plain_response(live, 481, "Call/Transaction Does Not Exist", &run);
                self.send_response(now, index, unknown, Some(note));
                return;
            };
            let accepted = build::plain_response(live, 200, "OK", &run);
            self.send_response(now, index, accepted, Some(note));
            if !self.received[invite].final_sent {
                let terminated = build::plain_response(
                    &self.received[invite].request,
                    487,
                    "Request Terminated",
                    &run,
                );
                self.send_response(now, invite, terminated, Some(note));
            }
            return;
        }
        let other = self.role.other();
        // The capture's last final answer of ours to a request of this method.
        let captured_final = self
            .steps()
            .iter()
            .rev()
            .find(|step| {
                step.side == self.role
                    && step.text.status().is_some_and(|code| code >= 200)
                    && step.transaction.is_some_and(|transaction| {
                        let transaction = &self.dialogue.transactions[transaction];
                        transaction.side == other && transaction.method == method
                    })
            })
            .map(|step| step.text.clone());
        let live = &self.received[index].request;
        let response = match captured_final {
            Some(captured) => self.rewrite.response(&captured, live),
            None if method == "INVITE" => build::plain_response(live, 500, "Not In Capture", &run),
            None => build::plain_response(live, 200, "OK", &run),
        };
        self.send_response(now, index, response, Some(note));
    }
}
