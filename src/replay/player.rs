//! One side of one captured dialogue, acted out live. Pure: time comes in as an argument,
//! messages come in through [`Player::handle_message`] and go out through
//! [`Player::poll_output`]; [`Player::poll_timeout`] says when to call
//! [`Player::handle_timeout`].
//!
//! The player walks the dialogue's steps in capture order. A step of its own side is sent
//! when its captured gap after the last step that took live time (divided by the speed,
//! capped) has passed, built from the live state: a request in a dialog goes to the live
//! remote target with the live route set and tag, a response answers the live request
//! that matched the captured one. A step of the other side is waited for: a request until
//! the live request of that method and ordinal has come, a response until the live
//! transaction it belongs to has reached it (any final response satisfies a captured
//! final; a captured 100 is hop-by-hop and never waited for). A wait longer than the
//! timeout ends the walk as timed out.
//!
//! Like any UA it ACKs every final response to its INVITEs at once (captured ACKs are not
//! sent again), retransmits over UDP (Timers A and E, and its final answers to INVITEs
//! until their ACK, RFC 3261 §17), answers retransmitted requests with its last answer,
//! and answers requests the capture has no answer for with the capture's last final for
//! that method (or 200, or 500 for an INVITE, or 481 for a CANCEL of nothing). It skips,
//! with a note, what cannot happen live: a CANCEL for an INVITE already answered (and
//! holds one until a provisional came, §9.1), an in-dialog request without a live dialog,
//! a second final answer, and a request that retries with credentials after a challenge
//! that did not come live. When its walk ends the Edge player CANCELs what is still
//! ringing and BYEs a dialog still up, so a replay leaves no call behind.
//!
//! The walk is here; the live transactions are in [`live`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::build::{self, LiveDialog, Rewrite};
use super::report::Ladder;
use super::script::{Dialogue, Side, Step};
use super::text::SipText;

mod live;

/// The ladder note on what a replay sends, and gets, to leave no call behind; not
/// compared with the capture.
pub const CLEANUP: &str = "cleanup";

/// Live transactions one player keeps, each way; a peer sending more is ignored.
pub const MAX_LIVE_TRANSACTIONS: usize = 1024;
/// Distinct notes one player keeps.
const MAX_NOTES: usize = 32;
/// The longest pause or patience a player accepts, whatever it is told.
const MAX_WAIT: Duration = Duration::from_secs(3600);

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
        Duration::try_from_secs_f64(gap.as_secs_f64() / speed)
            .unwrap_or(Duration::MAX)
            .min(self.max_gap)
    }

    /// Every duration within [`MAX_WAIT`], so no deadline can overflow.
    fn bounded(self) -> Pacing {
        Pacing {
            max_gap: self.max_gap.min(MAX_WAIT),
            timeout: self.timeout.min(MAX_WAIT),
            t1: self.t1.clamp(Duration::from_millis(1), MAX_WAIT),
            t2: self.t2.clamp(Duration::from_millis(1), MAX_WAIT),
            ..self
        }
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
    /// The captured transaction it plays; `None` for the replay's own cleanup.
    transaction: Option<usize>,
    method: String,
    branch: String,
    request: SipText,
    bytes: Vec<u8>,
    /// Any response came, a 100 included.
    responded: bool,
    provisionals: usize,
    final_status: Option<u16>,
    ack: Option<Vec<u8>>,
    /// A CANCEL for it went out.
    cancelled: bool,
    /// The walk is over and this INVITE is to be ended: what it gets is cleanup too.
    cleaning_up: bool,
    retransmit: Retransmit,
    /// No answer is expected after this (Timers B and F, as long as the timeout).
    deadline: Instant,
    entry: Option<usize>,
}

/// A request that reached us: a live server transaction.
#[derive(Debug)]
struct Received {
    method: String,
    branch: String,
    cseq: u32,
    request: SipText,
    origin: Origin,
    last_response: Option<Vec<u8>>,
    final_sent: bool,
    /// The other side's replay cleaning up (see [`build::CLEANUP_REASON`]).
    cleanup: bool,
    /// Our final answer to an INVITE, repeated over UDP until the ACK.
    retransmit: Retransmit,
    entry: Option<usize>,
}

/// A retransmission schedule over UDP (RFC 3261 Timers A and E, Timer G, and the 2xx
/// of §13.3.1.4): the first repeat after T1, then doubling, capped at `cap` if given,
/// until stopped or `give_up_at`.
#[derive(Debug, Clone, Copy, Default)]
struct Retransmit {
    at: Option<Instant>,
    interval: Duration,
    give_up_at: Option<Instant>,
    cap: Option<Duration>,
}

impl Retransmit {
    fn start(now: Instant, t1: Duration, cap: Option<Duration>, give_up_at: Instant) -> Self {
        Retransmit {
            at: Some(now + t1),
            interval: t1,
            give_up_at: Some(give_up_at),
            cap,
        }
    }

    fn stop(&mut self) {
        self.at = None;
    }

    fn wake(&self) -> Option<Instant> {
        Some(self.at?.min(self.give_up_at?))
    }

    /// Whether to send again at `now`.
    fn due(&mut self, now: Instant) -> bool {
        let (Some(at), Some(give_up_at)) = (self.at, self.give_up_at) else {
            return false;
        };
        if now >= give_up_at {
            self.at = None;
            return false;
        }
        if now < at {
            return false;
        }
        let doubled = self.interval.saturating_mul(2);
        self.interval = self.cap.map_or(doubled, |cap| doubled.min(cap));
        self.at = Some(now + self.interval);
        true
    }
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
    /// When the last step that took live time was passed, and its captured time: the
    /// next step's pause is counted from there.
    since: Instant,
    anchor: Duration,
    /// An own step that cannot go yet (a CANCEL before any provisional) began waiting.
    held_since: Option<Instant>,
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
    /// The cleanup BYE went out.
    hung_up: bool,
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
        let anchor = dialogue
            .steps
            .first()
            .map_or(Duration::ZERO, |step| step.time);
        Player {
            role,
            dialogue,
            rewrite,
            pacing: pacing.bounded(),
            reliable,
            cursor: 0,
            since: now,
            anchor,
            held_since: None,
            phase: Phase::Walking,
            outcome: None,
            peer: None,
            sent: Vec::new(),
            received: Vec::new(),
            sent_for: HashMap::new(),
            received_for: HashMap::new(),
            received_counts: HashMap::new(),
            dialog: None,
            hung_up: false,
            last_rseq: None,
            highest_cseq: 0,
            branches: 0,
            ladder: Ladder::default(),
            notes: Vec::new(),
            outputs: VecDeque::new(),
        }
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
        let sent = self
            .sent
            .iter()
            .filter(|sent| sent.final_status.is_none())
            .filter_map(|sent| sent.retransmit.wake());
        let received = self
            .received
            .iter()
            .filter_map(|received| received.retransmit.wake());
        let step = match self.phase {
            Phase::Walking => self.step_wake(),
            Phase::CleaningUp { until } => Some(until),
            Phase::Done => None,
        };
        sent.chain(received).chain(step).min()
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
            self.on_response(now, message);
        }
        self.advance(now);
    }

    fn steps(&self) -> &[Step] {
        &self.dialogue.steps
    }

    /// Steps that take no live time: captured retransmissions (we retransmit on our own
    /// schedule) and our own ACKs (sent when the final response comes).
    fn is_instant(&self, step: &Step) -> bool {
        step.retransmission
            || (step.side == self.role
                && step.text.is_request()
                && step.text.method() == Some("ACK"))
    }

    /// When an own step is due: its captured distance from the anchor step, scaled.
    fn due(&self, step: &Step) -> Instant {
        self.since + self.pacing.scale(step.time.saturating_sub(self.anchor))
    }

    /// When the current step is due (own side) or times out (other side, or an own step
    /// held back).
    fn step_wake(&self) -> Option<Instant> {
        let step = self.steps().get(self.cursor)?;
        Some(if self.is_instant(step) {
            self.since
        } else if let Some(held) = self.held_since {
            held + self.pacing.timeout
        } else if step.side == self.role {
            self.due(step)
        } else {
            self.since + self.pacing.timeout
        })
    }

    fn advance(&mut self, now: Instant) {
        while self.phase == Phase::Walking {
            let Some(step) = self.steps().get(self.cursor).cloned() else {
                self.finish_walk(now, Outcome::Completed);
                break;
            };
            if self.is_instant(&step) {
                self.cursor += 1;
                continue;
            }
            let passed = if step.side == self.role {
                now >= self.due(&step) && self.play(now, &step)
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
            if !passed {
                break;
            }
            self.cursor += 1;
            self.since = now;
            self.anchor = step.time;
            self.held_since = None;
        }
        if let Phase::CleaningUp { until } = self.phase {
            if !self.cleanup_pending(now) || now >= until {
                self.phase = Phase::Done;
            }
        }
    }

    /// Ends the walk; the Edge then ends what the capture left running.
    fn finish_walk(&mut self, now: Instant, outcome: Outcome) {
        self.outcome = Some(outcome);
        if self.role != Side::Edge {
            // Requests of the Edge that the capture answers no more still get answered;
            // an INVITE still ringing rings on until the Edge cancels it.
            for index in 0..self.received.len() {
                let received = &self.received[index];
                if !received.final_sent && !matches!(received.method.as_str(), "ACK" | "INVITE") {
                    self.auto_answer(now, index);
                }
            }
            self.phase = Phase::Done;
            return;
        }
        self.phase = Phase::CleaningUp {
            until: now + self.pacing.timeout,
        };
        for index in 0..self.sent.len() {
            let sent = &mut self.sent[index];
            if sent.method == "INVITE" && sent.final_status.is_none() {
                sent.cleaning_up = true;
                self.cancel_for_cleanup(now, index);
            }
        }
        self.hang_up(now);
    }

    /// Whether cleanup still waits for an answer: to its own requests, or to INVITEs it
    /// is ending or that were cancelled.
    fn cleanup_pending(&self, now: Instant) -> bool {
        self.sent.iter().any(|sent| {
            (sent.transaction.is_none() || sent.cleaning_up || sent.cancelled)
                && sent.final_status.is_none()
                && now < sent.deadline
        })
    }

    /// A cleanup request went out at `now`: cleanup lasts until it can be answered, even
    /// when it had ended already (a call answered late).
    fn extend_cleanup(&mut self, now: Instant) {
        let until = now + self.pacing.timeout;
        self.phase = match self.phase {
            Phase::CleaningUp { until: earlier } => Phase::CleaningUp {
                until: earlier.max(until),
            },
            Phase::Done => Phase::CleaningUp { until },
            Phase::Walking => Phase::Walking,
        };
    }

    /// Marks INVITE `index` cancelled at `now`: its final answer (a 487, or a 200 that
    /// crossed the CANCEL) is awaited for another timeout, as Timer C would.
    fn note_cancelled(&mut self, now: Instant, index: usize) {
        let sent = &mut self.sent[index];
        sent.cancelled = true;
        sent.deadline = now + self.pacing.timeout;
    }

    /// Sends a cleanup CANCEL for INVITE `index` once it may (after a provisional).
    fn cancel_for_cleanup(&mut self, now: Instant, index: usize) {
        let sent = &self.sent[index];
        if !sent.cleaning_up || sent.cancelled || !sent.responded || sent.final_status.is_some() {
            return;
        }
        let mut cancel = build::cancel(&sent.request);
        cancel.set("Reason", build::CLEANUP_REASON.into());
        self.note_cancelled(now, index);
        self.send_request(now, cancel, None, Some(CLEANUP));
        self.extend_cleanup(now);
    }

    /// Sends a cleanup BYE when the walk is over and a dialog we created is still up.
    fn hang_up(&mut self, now: Instant) {
        if self.phase == Phase::Walking || self.hung_up || self.role != Side::Edge {
            return;
        }
        let Some(dialog) = self
            .dialog
            .clone()
            .filter(|dialog| dialog.confirmed && !dialog.ended)
        else {
            return;
        };
        let Some(invite) = self
            .sent
            .iter()
            .rev()
            .find(|sent| sent.method == "INVITE" && sent.final_status.is_some_and(|c| c < 300))
            .map(|sent| sent.request.clone())
        else {
            return;
        };
        // CSeq stays below 2^31 (RFC 3261 §8.1.1.5).
        let Some(cseq) = self
            .highest_cseq
            .checked_add(1)
            .filter(|cseq| *cseq < 1 << 31)
        else {
            self.note("no cleanup BYE: the dialog's CSeq is at its limit".into());
            return;
        };
        self.hung_up = true;
        let branch = self.next_branch();
        let via = self.rewrite.via(&branch);
        let mut bye = build::bye(&invite, &dialog, cseq, via);
        bye.set("Reason", build::CLEANUP_REASON.into());
        self.send_request(now, bye, None, Some(CLEANUP));
        self.extend_cleanup(now);
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

    /// Sends (or skips) a step of our own side; false when it must wait (a CANCEL before
    /// any provisional response, §9.1), at most the timeout.
    fn play(&mut self, now: Instant, step: &Step) -> bool {
        let Some(transaction) = step.transaction else {
            return true;
        };
        if !step.text.is_request() {
            self.answer(now, step, transaction);
            return true;
        }
        let method = step.text.method().unwrap_or_default().to_ascii_uppercase();
        if method == "CANCEL" {
            return self.play_cancel(now, step, transaction);
        }
        if self.retries_an_absent_challenge(step) {
            self.note(format!(
                "{method} not sent: it answers a challenge that did not come live"
            ));
            return true;
        }
        let in_dialog = step.text.to_tag().is_some();
        let dialog = self.dialog.clone().filter(|dialog| !dialog.ended);
        if in_dialog && dialog.is_none() {
            self.note(format!("{method} not sent: no dialog live"));
            return true;
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
        true
    }

    fn play_cancel(&mut self, now: Instant, step: &Step, transaction: usize) -> bool {
        let invite = self.dialogue.transactions.iter().position(|candidate| {
            candidate.method == "INVITE"
                && candidate.side == self.role
                && candidate.request.is_some_and(|request| {
                    self.steps()[request].text.branch() == step.text.branch()
                })
        });
        let Some(index) = invite.and_then(|invite| self.sent_for.get(&invite).copied()) else {
            self.note("CANCEL not sent: its INVITE was never sent".into());
            return true;
        };
        let sent = &self.sent[index];
        if sent.final_status.is_some() || sent.cancelled {
            self.note("CANCEL not sent: its INVITE was answered already".into());
            return true;
        }
        if !sent.responded {
            let held = *self.held_since.get_or_insert(now);
            if now < held + self.pacing.timeout {
                return false;
            }
            self.note("CANCEL not sent: no provisional response came for its INVITE".into());
            return true;
        }
        let cancel = build::cancel(&sent.request);
        self.note_cancelled(now, index);
        self.send_request(now, cancel, Some(transaction), None);
        true
    }

    /// Whether `step` carries credentials answering a 401/407 of the previous transaction
    /// of its method, when that transaction was not challenged live.
    fn retries_an_absent_challenge(&self, step: &Step) -> bool {
        let has_credentials = step.text.header("Authorization").is_some()
            || step.text.header("Proxy-Authorization").is_some();
        let Some(current) = step.transaction.filter(|_| has_credentials) else {
            return false;
        };
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
        if self.received[index].final_sent {
            self.note(format!(
                "{} not sent: the request was answered already",
                step.label()
            ));
            return;
        }
        let live = self
            .rewrite
            .response(&step.text, &self.received[index].request);
        self.send_response(now, index, live, None);
    }

    fn note(&mut self, note: String) {
        if self.notes.len() < MAX_NOTES && !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }
}

#[cfg(test)]
mod tests;
