//! One side of one captured dialogue, acted out live. Pure: time comes in as an argument,
//! messages come in through [`Player::handle_message`] and go out through
//! [`Player::poll_output`]; [`Player::poll_timeout`] says when to call
//! [`Player::handle_timeout`].
//!
//! The player walks the dialogue's steps in capture order. A step of its own side is sent
//! when its captured gap after the previous step (divided by the speed, capped) has
//! passed, built from the live state: a request in a dialog goes to the live remote
//! target with the live route set and tag, a response answers the live request that
//! matched the captured one. A step of the other side is waited for: a request until
//! the live request of that method and ordinal has come, a response until the live
//! transaction it belongs to has reached it (any final response satisfies a captured
//! final; a captured 100 is hop-by-hop and never waited for). A wait longer than the
//! timeout ends the walk as timed out.
//!
//! Like any UA it ACKs every final response to its INVITEs at once (captured ACKs are
//! not sent again), retransmits requests over UDP (Timers A and E, RFC 3261 §17.1),
//! answers retransmitted requests with its last response, and answers requests the
//! capture has no answer for with the capture's last final for that method (or 200,
//! or 500 for an INVITE). It skips, with a note, what cannot happen live: a CANCEL for
//! an INVITE already answered, an in-dialog request without a live dialog, and a request
//! that retries with credentials after a challenge that did not come live. When its walk
//! ends the Edge player CANCELs what is still pending and BYEs a dialog still up, so a
//! replay leaves no call behind.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::build::{self, LiveDialog, Rewrite};
use super::report::Ladder;
use super::script::{label, Dialogue, Side, Step};
use super::text::SipText;

/// The ladder note on what a replay sends, and gets, to leave no call behind; not
/// compared with the capture.
pub const CLEANUP: &str = "cleanup";

/// Pacing and patience.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Captured gaps are divided by this.
    pub speed: f64,
    /// No gap is longer than this after scaling.
    pub max_gap: Duration,
    /// How long a captured message of the other side is waited for.
    pub timeout: Duration,
    /// RFC 3261 T1 and T2, for retransmissions over UDP.
    pub t1: Duration,
    pub t2: Duration,
}

impl Pacing {
    /// A captured gap as played: divided by the speed, capped.
    pub fn scale(&self, gap: Duration) -> Duration {
        let speed = if self.speed.is_finite() && self.speed > 0.0 {
            self.speed
        } else {
            1.0
        };
        gap.div_f64(speed).min(self.max_gap)
    }
}

/// Where a live message came from, so an answer goes back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub address: SocketAddr,
    /// The stream connection it came on, if any.
    pub connection: Option<u64>,
}

/// Bytes to send: to `to`, or when `None` to the player's peer (the target for the
/// Edge, the origin of the dialogue's first request for the core).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub bytes: Vec<u8>,
    pub to: Option<Origin>,
}

/// How the walk ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Step `step` (0-based) never came.
    TimedOut {
        step: usize,
        waiting_for: String,
    },
}

/// A request we sent: a live client transaction.
#[derive(Debug)]
struct Sent {
    transaction: Option<usize>,
    method: String,
    branch: String,
    request: SipText,
    bytes: Vec<u8>,
    /// Any response came, a 100 included.
    responded: bool,
    /// We CANCELled it to clean up: what it gets from then on is cleanup too.
    cleaning_up: bool,
    provisionals: usize,
    final_status: Option<u16>,
    ack: Option<Vec<u8>>,
    retransmit_at: Option<Instant>,
    interval: Duration,
    give_up_at: Instant,
    entry: usize,
}

/// A request that reached us: a live server transaction.
#[derive(Debug)]
struct Received {
    method: String,
    branch: String,
    request: SipText,
    origin: Origin,
    last_response: Option<Vec<u8>>,
    final_sent: bool,
    /// The other side's replay cleaning up (see [`build::CLEANUP_REASON`]).
    cleanup: bool,
    entry: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Walking,
    CleaningUp { until: Instant },
    Done,
}

pub struct Player {
    role: Side,
    dialogue: Arc<Dialogue>,
    rewrite: Rewrite,
    pacing: Pacing,
    reliable: bool,
    cursor: usize,
    /// When the current step became current.
    since: Instant,
    phase: Phase,
    outcome: Option<Outcome>,
    peer: Option<Origin>,
    sent: Vec<Sent>,
    received: Vec<Received>,
    /// Captured transaction -> index into `sent` or `received`.
    sent_for: HashMap<usize, usize>,
    received_for: HashMap<usize, usize>,
    /// Live requests per method that reached us, for ordinal matching.
    received_counts: HashMap<String, usize>,
    dialog: Option<LiveDialog>,
    last_rseq: Option<u32>,
    highest_cseq: u32,
    branches: u64,
    ladder: Ladder,
    notes: Vec<String>,
    outputs: VecDeque<Output>,
}

impl Player {
    /// A player for `role` starting its walk at `now`.
    pub fn new(
        now: Instant,
        role: Side,
        dialogue: Arc<Dialogue>,
        rewrite: Rewrite,
        pacing: Pacing,
    ) -> Player {
        let reliable = rewrite.transport.is_reliable();
        Player {
            role,
            dialogue,
            rewrite,
            pacing,
            reliable,
            cursor: 0,
            since: now,
            phase: Phase::Walking,
            outcome: None,
            peer: None,
            sent: Vec::new(),
            received: Vec::new(),
            sent_for: HashMap::new(),
            received_for: HashMap::new(),
            received_counts: HashMap::new(),
            dialog: None,
            last_rseq: None,
            highest_cseq: 0,
            branches: 0,
            ladder: Ladder::default(),
            notes: Vec::new(),
            outputs: VecDeque::new(),
        }
    }

    pub fn dialogue(&self) -> &Arc<Dialogue> {
        &self.dialogue
    }

    /// Where requests of ours go when not to the target: the origin of the first live
    /// request that reached us.
    pub fn peer(&self) -> Option<Origin> {
        self.peer
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The outcome once the walk is over (cleanup may still run).
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn ladder(&self) -> &Ladder {
        &self.ladder
    }

    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Player::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retransmit = self
            .sent
            .iter()
            .filter(|sent| sent.final_status.is_none())
            .filter_map(|sent| sent.retransmit_at.map(|at| at.min(sent.give_up_at)));
        let step = match self.phase {
            Phase::Walking => self.step_wake(),
            Phase::CleaningUp { until } => Some(until),
            Phase::Done => None,
        };
        retransmit.chain(step).min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.retransmit(now);
        self.advance(now);
    }

    /// A live message for this dialogue.
    pub fn handle_message(&mut self, now: Instant, message: SipText, origin: Origin) {
        if message.is_request() {
            self.on_request(now, message, origin);
        } else {
            self.on_response(message);
        }
        self.advance(now);
    }

    fn steps(&self) -> &[Step] {
        &self.dialogue.steps
    }

    /// When the current step is due (own side) or times out (other side).
    fn step_wake(&self) -> Option<Instant> {
        let step = self.steps().get(self.cursor)?;
        if step.retransmission || self.is_own_ack(step) {
            Some(self.since)
        } else if step.side == self.role {
            Some(self.since + self.gap_before(self.cursor))
        } else {
            Some(self.since + self.pacing.timeout)
        }
    }

    /// Our ACKs are sent when the final response comes, not at their captured time.
    fn is_own_ack(&self, step: &Step) -> bool {
        step.side == self.role && step.text.is_request() && step.text.method() == Some("ACK")
    }

    fn gap_before(&self, index: usize) -> Duration {
        let steps = self.steps();
        match index
            .checked_sub(1)
            .and_then(|previous| steps.get(previous))
        {
            Some(previous) => self
                .pacing
                .scale(steps[index].time.saturating_sub(previous.time)),
            None => Duration::ZERO,
        }
    }

    fn advance(&mut self, now: Instant) {
        while self.phase == Phase::Walking {
            if self.cursor >= self.steps().len() {
                self.finish_walk(now, Outcome::Completed);
                break;
            }
            let step = self.steps()[self.cursor].clone();
            let done = if step.retransmission || self.is_own_ack(&step) {
                true
            } else if step.side == self.role {
                if now < self.since + self.gap_before(self.cursor) {
                    false
                } else {
                    self.play(now, &step);
                    true
                }
            } else if self.satisfied(&step) {
                true
            } else if now >= self.since + self.pacing.timeout {
                let outcome = Outcome::TimedOut {
                    step: self.cursor,
                    waiting_for: step.label(),
                };
                self.finish_walk(now, outcome);
                break;
            } else {
                false
            };
            if !done {
                break;
            }
            self.cursor += 1;
            self.since = now;
        }
        if let Phase::CleaningUp { until } = self.phase {
            let pending = self
                .sent
                .iter()
                .any(|sent| sent.transaction.is_none() && sent.final_status.is_none());
            if !pending || now >= until {
                self.phase = Phase::Done;
            }
        }
    }

    /// Ends the walk; the Edge then cancels what is pending and ends a live dialog.
    fn finish_walk(&mut self, now: Instant, outcome: Outcome) {
        self.outcome = Some(outcome);
        self.phase = Phase::CleaningUp {
            until: now + self.pacing.timeout,
        };
        if self.role != Side::Edge {
            self.phase = Phase::Done;
            return;
        }
        // A CANCEL only for an INVITE that was answered provisionally (§9.1).
        let pending: Vec<usize> = (0..self.sent.len())
            .filter(|&index| {
                let sent = &self.sent[index];
                sent.method == "INVITE" && sent.responded && sent.final_status.is_none()
            })
            .collect();
        for index in pending {
            self.sent[index].cleaning_up = true;
            let mut cancel = build::cancel(&self.sent[index].request);
            cancel.set("Reason", build::CLEANUP_REASON.into());
            self.send_request(now, cancel, None, Some(CLEANUP));
        }
        let invite = self
            .sent
            .iter()
            .rev()
            .find(|sent| sent.method == "INVITE" && sent.final_status.is_some_and(|c| c < 300))
            .map(|sent| sent.request.clone());
        let dialog = self
            .dialog
            .clone()
            .filter(|dialog| dialog.confirmed && !dialog.ended);
        if let (Some(invite), Some(dialog)) = (invite, dialog) {
            let branch = self.next_branch();
            let via = self.rewrite.via(&branch);
            let mut bye = build::bye(&invite, &dialog, self.highest_cseq + 1, via);
            bye.set("Reason", build::CLEANUP_REASON.into());
            self.send_request(now, bye, None, Some(CLEANUP));
        }
    }

    fn next_branch(&mut self) -> String {
        self.branches += 1;
        let role = match self.role {
            Side::Edge => "e",
            Side::Core => "c",
        };
        self.rewrite.branch(self.branches) + role
    }

    /// Whether a step of the other side has happened live (or cannot happen).
    fn satisfied(&mut self, step: &Step) -> bool {
        let Some(transaction) = step.transaction else {
            return true;
        };
        if step.text.is_request() {
            if self.received_for.contains_key(&transaction) {
                return true;
            }
            let in_dialog = step.text.to_tag().is_some();
            let dialog_up = self.dialog.as_ref().is_some_and(|dialog| !dialog.ended);
            if in_dialog && !dialog_up {
                self.note(format!("{} not expected live: no dialog", step.label()));
                return true;
            }
            return false;
        }
        let code = step.text.status().unwrap_or(0);
        let Some(&index) = self.sent_for.get(&transaction) else {
            return true;
        };
        let sent = &self.sent[index];
        code == 100
            || sent.final_status.is_some()
            || (code < 200 && sent.provisionals >= step.provisional)
    }

    /// Sends (or skips) a step of our own side.
    fn play(&mut self, now: Instant, step: &Step) {
        let Some(transaction) = step.transaction else {
            return;
        };
        if !step.text.is_request() {
            self.answer(now, step, transaction);
            return;
        }
        let method = step.text.method().unwrap_or_default().to_ascii_uppercase();
        if method == "CANCEL" {
            let invite = self.dialogue.transactions.iter().position(|candidate| {
                candidate.method == "INVITE"
                    && candidate.side == self.role
                    && candidate.request.is_some_and(|request| {
                        self.steps()[request].text.branch() == step.text.branch()
                    })
            });
            let live = invite.and_then(|invite| self.sent_for.get(&invite).copied());
            match live {
                Some(index) if self.sent[index].final_status.is_none() => {
                    let cancel = build::cancel(&self.sent[index].request);
                    self.send_request(now, cancel, Some(transaction), None);
                }
                _ => self.note("CANCEL not sent: its INVITE was answered or never sent".into()),
            }
            return;
        }
        if self.retries_an_absent_challenge(step) {
            self.note(format!(
                "{method} not sent: it answers a challenge that did not come live"
            ));
            return;
        }
        let in_dialog = step.text.to_tag().is_some();
        let dialog = self.dialog.clone().filter(|dialog| !dialog.ended);
        if in_dialog && dialog.is_none() {
            self.note(format!("{method} not sent: no dialog live"));
            return;
        }
        let branch = self.next_branch();
        let mut live = self.rewrite.request(
            &step.text,
            &branch,
            if in_dialog { dialog.as_ref() } else { None },
        );
        if method == "PRACK" {
            if let (Some(rseq), Some(rack)) = (self.last_rseq, step.text.header("RAck")) {
                let rest: Vec<&str> = rack.split_whitespace().skip(1).collect();
                live.set("RAck", format!("{rseq} {}", rest.join(" ")));
            }
        }
        self.send_request(now, live, Some(transaction), None);
    }

    /// Whether `step` carries credentials answering a 401/407 of the previous transaction
    /// of its method, when that transaction was not challenged live.
    fn retries_an_absent_challenge(&self, step: &Step) -> bool {
        let has_credentials = step.text.header("Authorization").is_some()
            || step.text.header("Proxy-Authorization").is_some();
        let Some(current) = step.transaction else {
            return false;
        };
        if !has_credentials {
            return false;
        }
        let method = &self.dialogue.transactions[current].method;
        let previous = (0..current).rev().find(|&index| {
            let candidate = &self.dialogue.transactions[index];
            candidate.side == self.role && &candidate.method == method
        });
        let Some(previous) = previous else {
            return false;
        };
        let captured_challenge = matches!(
            self.dialogue.transactions[previous].final_status,
            Some(401 | 407)
        );
        let live_status = self
            .sent_for
            .get(&previous)
            .and_then(|&index| self.sent[index].final_status);
        captured_challenge && live_status.is_some_and(|code| code != 401 && code != 407)
    }

    /// Sends our captured response to the live request that matched its transaction.
    fn answer(&mut self, now: Instant, step: &Step, transaction: usize) {
        let Some(&index) = self.received_for.get(&transaction) else {
            self.note(format!(
                "{} not sent: the request it answers did not come live",
                step.label()
            ));
            return;
        };
        let live = self
            .rewrite
            .response(&step.text, &self.received[index].request);
        self.send_response(now, index, live, None);
    }

    fn send_request(
        &mut self,
        now: Instant,
        request: SipText,
        transaction: Option<usize>,
        note: Option<&str>,
    ) {
        let method = request.method().unwrap_or_default().to_ascii_uppercase();
        let branch = request.branch().unwrap_or_default();
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
        let index = self.sent.len();
        self.sent.push(Sent {
            transaction,
            method,
            branch,
            request,
            bytes,
            responded: false,
            cleaning_up: false,
            provisionals: 0,
            final_status: None,
            ack: None,
            retransmit_at: (!self.reliable).then(|| now + self.pacing.t1),
            interval: self.pacing.t1,
            give_up_at: now + self.pacing.timeout,
            entry,
        });
        if let Some(transaction) = transaction {
            self.sent_for.insert(transaction, index);
        }
    }

    fn send_response(&mut self, now: Instant, index: usize, response: SipText, note: Option<&str>) {
        let _ = now;
        let code = response.status().unwrap_or(0);
        let bytes = response.encode();
        let received = &mut self.received[index];
        self.ladder.push(
            true,
            label(&response),
            format!("response {} {} {code}", received.branch, received.method),
            note,
        );
        received.last_response = Some(bytes.clone());
        received.final_sent |= code >= 200;
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

    fn retransmit(&mut self, now: Instant) {
        for sent in &mut self.sent {
            if sent.final_status.is_some() {
                continue;
            }
            let Some(at) = sent.retransmit_at else {
                continue;
            };
            if now >= sent.give_up_at {
                sent.retransmit_at = None;
                continue;
            }
            if now < at {
                continue;
            }
            // INVITE: Timer A doubles without bound; others: Timer E, capped at T2.
            sent.interval = if sent.method == "INVITE" {
                sent.interval * 2
            } else {
                (sent.interval * 2).min(self.pacing.t2)
            };
            sent.retransmit_at = Some(now + sent.interval);
            self.ladder.repeat(sent.entry);
            self.outputs.push_back(Output {
                bytes: sent.bytes.clone(),
                to: None,
            });
        }
    }

    fn on_response(&mut self, response: SipText) {
        let code = response.status().unwrap_or(0);
        let branch = response.branch().unwrap_or_default();
        let method = response.method().unwrap_or_default().to_ascii_uppercase();
        let key = format!(
            "response {branch} {method} {code} {}",
            response.to_tag().unwrap_or_default()
        );
        let index = self
            .sent
            .iter()
            .position(|sent| sent.branch == branch && sent.method == method);
        // The answer to a cleanup request is part of the cleanup.
        let note = index
            .filter(|&index| {
                let sent = &self.sent[index];
                sent.transaction.is_none() || sent.cleaning_up
            })
            .map(|_| CLEANUP);
        self.ladder
            .push_or_repeat(false, label(&response), key, note);
        let Some(index) = index else {
            self.note(format!("stray {}", label(&response)));
            return;
        };
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
        let sent = &mut self.sent[index];
        sent.responded = true;
        if code < 200 {
            if code > 100 && sent.final_status.is_none() {
                sent.provisionals += 1;
            }
            if sent.method == "INVITE" {
                // Timer A stops at the first provisional (§17.1.1.2).
                sent.retransmit_at = None;
            }
            return;
        }
        if let Some(ack) = sent.ack.clone() {
            // A retransmitted final: the same ACK again.
            self.outputs.push_back(Output {
                bytes: ack,
                to: None,
            });
            return;
        }
        let first_final = sent.final_status.is_none();
        sent.final_status.get_or_insert(code);
        sent.retransmit_at = None;
        if sent.method == "BYE" && first_final {
            if let Some(dialog) = &mut self.dialog {
                dialog.ended = true;
            }
        }
        if sent.method != "INVITE" {
            return;
        }
        let body = sent
            .transaction
            .and_then(|transaction| self.captured_ack_body(transaction))
            .unwrap_or_default();
        let branch = self.next_branch();
        let sent = &self.sent[index];
        let ack = build::ack(
            &sent.request,
            &response,
            self.dialog.as_ref(),
            &branch,
            &self.rewrite,
            &body,
        );
        let bytes = ack.encode();
        self.sent[index].ack = Some(bytes.clone());
        let ack_branch = ack.branch().unwrap_or_default();
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

    fn on_request(&mut self, now: Instant, request: SipText, origin: Origin) {
        let method = request.method().unwrap_or_default().to_ascii_uppercase();
        let branch = request.branch().unwrap_or_default();
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
            request,
            origin,
            last_response: None,
            final_sent: false,
            cleanup,
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
                    .is_some_and(|m| m.eq_ignore_ascii_case(&method))
        });
        match captured.and_then(|step| step.transaction) {
            Some(transaction) => {
                self.received_for.insert(transaction, index);
            }
            None => self.auto_answer(now, index),
        }
    }

    /// Answers a live request the capture has no counterpart for.
    fn auto_answer(&mut self, now: Instant, index: usize) {
        let method = self.received[index].method.clone();
        if method == "ACK" {
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
            None if method == "INVITE" => {
                build::plain_response(live, 500, "Not In Capture", &self.rewrite.run)
            }
            None => build::plain_response(live, 200, "OK", &self.rewrite.run),
        };
        let note = if self.received[index].cleanup {
            CLEANUP
        } else {
            "auto"
        };
        self.send_response(now, index, response, Some(note));
        if method == "CANCEL" {
            let branch = self.received[index].branch.clone();
            let pending_invite = self.received.iter().position(|received| {
                received.method == "INVITE" && received.branch == branch && !received.final_sent
            });
            if let Some(invite) = pending_invite {
                let terminated = build::plain_response(
                    &self.received[invite].request,
                    487,
                    "Request Terminated",
                    &self.rewrite.run,
                );
                self.send_response(now, invite, terminated, Some(note));
            }
        }
    }

    fn note(&mut self, note: String) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }
}

#[cfg(test)]
mod tests;
