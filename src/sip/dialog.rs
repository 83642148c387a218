//! Dialog CSeq offsets (DESIGN.md item 6), pure.
//!
//! When the proxy re-sends a request toward the core with fresh credentials, the new
//! request carries CSeq + 1, so from then on the core counts the dialog's CSeq higher than
//! the Edge does. This table remembers, per dialog, by how much: later Edge -> core
//! requests of the dialog (ACK for 2xx, BYE, re-INVITE, UPDATE, INFO, PRACK) are shifted
//! up by it, and what goes back to the Edge carries the Edge's own numbers. Requests from
//! the core to the Edge use the core's own CSeq space and are untouched.
//!
//! The table is bounded; a dialog is forgotten when it has been idle for `idle`, or
//! `linger` after it ended (long enough for retransmissions of the ending request).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A dialog as the Edge side knows it: the Call-ID and the Edge's own tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DialogKey {
    pub call_id: String,
    pub edge_tag: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DialogState {
    /// The Edge CSeqs of the re-sent requests, ascending. A request the Edge numbered `n`
    /// is shifted by the number of steps at or below `n`: an ACK or a PRACK's RAck quotes
    /// an INVITE sent before later re-sends raised the offset, and must be shifted as
    /// that INVITE was.
    steps: Vec<u32>,
    /// Steps older than the last [`MAX_STEPS`], folded into a plain offset. A long-lived
    /// registration re-sent on every stale nonce keeps counting; only a request quoting
    /// a number from before the folded steps (none in practice) would be shifted wrong.
    folded: u32,
    forget_at: Instant,
    ended: bool,
}

/// Re-sends remembered one by one per dialog; older ones are folded.
const MAX_STEPS: usize = 32;

impl DialogState {
    fn offset_for(&self, cseq: u32) -> u32 {
        let count = self.steps.iter().filter(|step| **step <= cseq).count();
        u32::try_from(count)
            .unwrap_or(u32::MAX)
            .saturating_add(self.folded)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DialogError {
    #[error("dialog table is full ({capacity} dialogs)")]
    Full { capacity: usize },
    #[error("CSeq {cseq} shifted by {offset} leaves the 31-bit range of RFC 3261 §8.1.1.5")]
    OutOfRange { cseq: u32, offset: u32 },
}

/// The largest CSeq RFC 3261 §8.1.1.5 allows (it must stay below 2^31).
pub const MAX_CSEQ: u32 = (1 << 31) - 1;

#[derive(Debug)]
pub struct DialogTable {
    dialogs: HashMap<DialogKey, DialogState>,
    capacity: usize,
    idle: Duration,
    linger: Duration,
}

impl DialogTable {
    pub fn new(capacity: usize, idle: Duration, linger: Duration) -> Self {
        Self {
            dialogs: HashMap::new(),
            capacity,
            idle,
            linger,
        }
    }

    pub fn len(&self) -> usize {
        self.dialogs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dialogs.is_empty()
    }

    /// The request the Edge numbered `edge_cseq` was re-sent, raising the core's CSeq by
    /// one from it on; returns the offset that now applies to it.
    pub fn add_offset(
        &mut self,
        now: Instant,
        key: &DialogKey,
        edge_cseq: u32,
    ) -> Result<u32, DialogError> {
        if !self.dialogs.contains_key(key) && self.dialogs.len() >= self.capacity {
            self.expire(now);
            if self.dialogs.len() >= self.capacity {
                return Err(DialogError::Full {
                    capacity: self.capacity,
                });
            }
        }
        let idle = self.idle;
        let state = self.dialogs.entry(key.clone()).or_insert(DialogState {
            steps: Vec::new(),
            folded: 0,
            forget_at: now + idle,
            ended: false,
        });
        if state.steps.len() >= MAX_STEPS {
            state.steps.remove(0);
            state.folded = state.folded.saturating_add(1);
        }
        let at = state.steps.partition_point(|step| *step <= edge_cseq);
        state.steps.insert(at, edge_cseq);
        if !state.ended {
            state.forget_at = now + idle;
        }
        Ok(state.offset_for(edge_cseq))
    }

    /// The offset for the Edge's CSeq `cseq` in a dialog (0 when it has none); a known
    /// dialog counts as active.
    pub fn offset(&mut self, now: Instant, key: &DialogKey, cseq: u32) -> u32 {
        let idle = self.idle;
        match self.dialogs.get_mut(key) {
            Some(state) => {
                if !state.ended {
                    state.forget_at = now + idle;
                }
                state.offset_for(cseq)
            }
            None => 0,
        }
    }

    /// The CSeq toward the core for an Edge request of this dialog numbered `cseq`.
    pub fn shift_up(
        &mut self,
        now: Instant,
        key: &DialogKey,
        cseq: u32,
    ) -> Result<u32, DialogError> {
        let offset = self.offset(now, key, cseq);
        cseq.checked_add(offset)
            .filter(|shifted| *shifted <= MAX_CSEQ)
            .ok_or(DialogError::OutOfRange { cseq, offset })
    }

    /// The dialog ended (its BYE was answered): forget it `linger` from now.
    pub fn end(&mut self, now: Instant, key: &DialogKey) {
        if let Some(state) = self.dialogs.get_mut(key) {
            state.ended = true;
            state.forget_at = now + self.linger;
        }
    }

    /// Forgets idle and ended dialogs whose time is up; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.dialogs.len();
        self.dialogs.retain(|_, state| state.forget_at > now);
        before - self.dialogs.len()
    }

    /// When the next dialog is due to be forgotten.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.dialogs.values().map(|state| state.forget_at).min()
    }
}

/// Shifts the CSeq number inside a PRACK's `RAck: <RSeq> <CSeq> <method>` (RFC 3262
/// §7.2), which quotes the INVITE's CSeq and so needs the same translation as the CSeq
/// header. `None` when the value is malformed or would leave the 31-bit range.
pub fn shift_rack(value: &str, offset: u32) -> Option<String> {
    let mut parts = value.split_whitespace();
    let (rseq, cseq, method) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let shifted = cseq
        .parse::<u32>()
        .ok()?
        .checked_add(offset)
        .filter(|value| *value <= MAX_CSEQ)?;
    Some(format!("{rseq} {shifted} {method}"))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start their virtual clock at a real Instant
mod tests {
    use super::*;

    fn key(call_id: &str) -> DialogKey {
        DialogKey {
            call_id: call_id.into(),
            edge_tag: "edge-tag".into(),
        }
    }

    fn table() -> DialogTable {
        DialogTable::new(2, Duration::from_secs(3600), Duration::from_secs(32))
    }

    #[test]
    fn offsets_accumulate_and_shift_later_requests() {
        let now = Instant::now();
        let mut dialogs = table();
        assert_eq!(
            dialogs.shift_up(now, &key("a"), 2).unwrap(),
            2,
            "unknown dialog: unshifted"
        );
        // The INVITE the Edge numbered 1 was re-sent (as 2).
        assert_eq!(dialogs.add_offset(now, &key("a"), 1).unwrap(), 1);
        // Its ACK (1) and the BYE the Edge numbers 2 go to the core as 2 and 3.
        assert_eq!(dialogs.shift_up(now, &key("a"), 1).unwrap(), 2);
        assert_eq!(dialogs.shift_up(now, &key("a"), 2).unwrap(), 3);
        // A rejected re-INVITE (Edge 3) re-sent raises it further from 3 on.
        assert_eq!(dialogs.add_offset(now, &key("a"), 3).unwrap(), 2);
        assert_eq!(dialogs.shift_up(now, &key("a"), 3).unwrap(), 5);
        // Another dialog with the same Call-ID but another Edge tag is another dialog.
        let other = DialogKey {
            call_id: "a".into(),
            edge_tag: "other".into(),
        };
        assert_eq!(dialogs.shift_up(now, &other, 3).unwrap(), 3);
    }

    #[test]
    fn rack_quotes_the_invite_cseq_and_shifts_with_it() {
        assert_eq!(
            shift_rack("776656 1 INVITE", 1).as_deref(),
            Some("776656 2 INVITE")
        );
        assert_eq!(
            shift_rack(" 5  9  INVITE ", 2).as_deref(),
            Some("5 11 INVITE")
        );
        assert_eq!(shift_rack("1 x INVITE", 1), None);
        assert_eq!(shift_rack("1 2", 1), None);
        assert_eq!(shift_rack(&format!("1 {MAX_CSEQ} INVITE"), 1), None);
    }

    #[test]
    fn an_ack_keeps_the_offset_its_invite_was_sent_with() {
        // INVITE 1 went out unshifted; PRACK 2 was then re-sent: ACK 1 and RAck "1
        // INVITE" must stay 1, later requests move up.
        let now = Instant::now();
        let mut dialogs = table();
        dialogs.add_offset(now, &key("a"), 2).unwrap();
        assert_eq!(dialogs.shift_up(now, &key("a"), 1).unwrap(), 1);
        assert_eq!(dialogs.shift_up(now, &key("a"), 2).unwrap(), 3);
        assert_eq!(dialogs.shift_up(now, &key("a"), 4).unwrap(), 5);
    }

    #[test]
    fn a_registration_re_sent_on_every_refresh_keeps_counting_past_the_kept_steps() {
        // One Call-ID, refreshed 40 times, each refresh re-sent once (a stale nonce).
        let now = Instant::now();
        let mut dialogs = table();
        let mut sent = Vec::new();
        for edge_cseq in 1..=40u32 {
            let shifted = dialogs.shift_up(now, &key("reg"), edge_cseq).unwrap();
            sent.push(shifted);
            assert_eq!(
                dialogs.add_offset(now, &key("reg"), edge_cseq),
                Ok(edge_cseq)
            );
            sent.push(edge_cseq * 2);
        }
        assert!(
            sent.windows(2).all(|pair| pair[0] < pair[1]),
            "the registrar sees a rising CSeq: {sent:?}"
        );
        assert_eq!(dialogs.shift_up(now, &key("reg"), 41).unwrap(), 81);
    }

    #[test]
    fn cseq_stays_within_31_bits() {
        let now = Instant::now();
        let mut dialogs = table();
        dialogs.add_offset(now, &key("a"), 1).unwrap();
        assert_eq!(
            dialogs.shift_up(now, &key("a"), MAX_CSEQ),
            Err(DialogError::OutOfRange {
                cseq: MAX_CSEQ,
                offset: 1
            })
        );
    }

    #[test]
    fn table_is_bounded_and_expired_dialogs_make_room() {
        let now = Instant::now();
        let mut dialogs = table();
        dialogs.add_offset(now, &key("a"), 1).unwrap();
        dialogs.add_offset(now, &key("b"), 1).unwrap();
        assert_eq!(
            dialogs.add_offset(now, &key("c"), 1),
            Err(DialogError::Full { capacity: 2 })
        );
        // An existing dialog can still grow.
        assert_eq!(dialogs.add_offset(now, &key("a"), 1), Ok(2));
        dialogs.end(now, &key("b"));
        let later = now + Duration::from_secs(32);
        assert_eq!(
            dialogs.add_offset(later, &key("c"), 1),
            Ok(1),
            "b was forgotten after linger"
        );
        assert_eq!(dialogs.len(), 2);
    }

    #[test]
    fn ended_dialogs_linger_then_go_and_idle_ones_expire() {
        let now = Instant::now();
        let mut dialogs = table();
        dialogs.add_offset(now, &key("a"), 1).unwrap();
        dialogs.add_offset(now, &key("b"), 1).unwrap();
        dialogs.end(now, &key("a"));
        // A retransmitted BYE during the linger still gets the offset.
        assert_eq!(
            dialogs
                .shift_up(now + Duration::from_secs(10), &key("a"), 2)
                .unwrap(),
            3
        );
        assert_eq!(dialogs.poll_timeout(), Some(now + Duration::from_secs(32)));
        assert_eq!(dialogs.expire(now + Duration::from_secs(32)), 1);
        // b stays while used; once idle for an hour it goes.
        dialogs.offset(now + Duration::from_secs(1800), &key("b"), 1);
        assert_eq!(dialogs.expire(now + Duration::from_secs(3600)), 0);
        assert_eq!(dialogs.expire(now + Duration::from_secs(5400)), 1);
        assert!(dialogs.is_empty());
    }
}
