//! Ladders (the messages of one side of a dialogue, in order, retransmissions folded into
//! a count), their comparison, and the replay report as text and JSON.
//!
//! Two ladders match when they hold the same messages in the same order, counts aside,
//! 100 Trying aside (a 100 is hop-by-hop, RFC 3261 §16.7 step 5: whether one shows up
//! says which boxes stood in between, not how the dialogue went), and the replay's own
//! cleanup aside (the CANCEL or BYE that ends a call the capture left up).

use std::fmt::Write as _;

use serde::Serialize;

use super::script::{Dialogue, Side};
use super::ReaderStats;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Sent by the side this ladder belongs to (else received).
    pub sent: bool,
    /// `INVITE`, or `200 INVITE` for a response.
    pub label: String,
    /// Transmissions, retransmissions included.
    pub count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Entry {
    fn arrow(&self) -> &'static str {
        if self.sent {
            "->"
        } else {
            "<-"
        }
    }

    fn text(&self) -> String {
        let mut text = format!("{} {}", self.arrow(), self.label);
        if self.count > 1 {
            let _ = write!(text, " x{}", self.count);
        }
        if let Some(note) = &self.note {
            let _ = write!(text, " ({note})");
        }
        text
    }

    /// Whether the entry counts in a comparison: not a 100, not a replay's cleanup.
    fn significant(&self) -> bool {
        !self.label.starts_with("100 ") && self.note.as_deref() != Some(super::player::CLEANUP)
    }
}

/// Entries one ladder keeps; what comes after is counted in [`Ladder::left_out`].
pub const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Ladder {
    pub entries: Vec<Entry>,
    /// Messages past [`MAX_ENTRIES`], not shown.
    #[serde(skip_serializing_if = "is_zero")]
    pub left_out: u64,
    #[serde(skip)]
    keys: Vec<String>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl Ladder {
    /// Adds an entry; `key` identifies it for later repeats. `None` when the ladder is
    /// full.
    pub fn push(
        &mut self,
        sent: bool,
        label: String,
        key: String,
        note: Option<&str>,
    ) -> Option<usize> {
        if self.entries.len() >= MAX_ENTRIES {
            self.left_out += 1;
            return None;
        }
        self.entries.push(Entry {
            sent,
            label,
            count: 1,
            note: note.map(str::to_string),
        });
        self.keys.push(key);
        Some(self.entries.len() - 1)
    }

    pub fn repeat(&mut self, index: Option<usize>) {
        match index.and_then(|index| self.entries.get_mut(index)) {
            Some(entry) => entry.count += 1,
            None => self.left_out += 1,
        }
    }

    /// Counts a repeat of the entry with `key`, or adds one.
    pub fn push_or_repeat(
        &mut self,
        sent: bool,
        label: String,
        key: String,
        note: Option<&str>,
    ) -> Option<usize> {
        match self.keys.iter().position(|known| *known == key) {
            Some(index) => {
                self.repeat(Some(index));
                Some(index)
            }
            None => self.push(sent, label, key, note),
        }
    }

    /// The captured ladder of `role` in `dialogue`.
    pub fn captured(dialogue: &Dialogue, role: Side) -> Ladder {
        let mut ladder = Ladder::default();
        for step in &dialogue.steps {
            let identity = match step.text.status() {
                Some(code) => format!("{code} {}", step.text.to_tag().unwrap_or_default()),
                None => String::new(),
            };
            let key = format!(
                "{:?} {:?} {} {identity}",
                step.side,
                step.transaction,
                step.label()
            );
            if step.retransmission {
                ladder.push_or_repeat(step.side == role, step.label(), key, None);
            } else {
                ladder.push(step.side == role, step.label(), key, None);
            }
        }
        ladder
    }

    pub fn messages(&self) -> u64 {
        self.entries
            .iter()
            .map(|entry| u64::from(entry.count))
            .sum()
    }
}

/// One row of two ladders side by side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row<'a> {
    pub captured: Option<&'a Entry>,
    pub replayed: Option<&'a Entry>,
}

impl Row<'_> {
    fn differs(&self) -> bool {
        match (self.captured, self.replayed) {
            (Some(_), Some(_)) => false,
            (Some(entry), None) | (None, Some(entry)) => entry.significant(),
            (None, None) => false,
        }
    }
}

/// Above this many cells (entries × entries) ladders are compared position by position
/// rather than aligned, so the table stays within a few megabytes.
const MAX_ALIGNMENT_CELLS: usize = 1 << 22;

/// The two ladders aligned on their longest common subsequence of (direction, label);
/// very long ones position by position.
pub fn align<'a>(captured: &'a Ladder, replayed: &'a Ladder) -> Vec<Row<'a>> {
    let (a, b) = (&captured.entries, &replayed.entries);
    let same = |x: &Entry, y: &Entry| x.sent == y.sent && x.label == y.label;
    if (a.len() + 1).saturating_mul(b.len() + 1) > MAX_ALIGNMENT_CELLS {
        return (0..a.len().max(b.len()))
            .flat_map(|index| match (a.get(index), b.get(index)) {
                (Some(x), Some(y)) if same(x, y) => vec![Row {
                    captured: Some(x),
                    replayed: Some(y),
                }],
                (x, y) => [
                    x.map(|x| Row {
                        captured: Some(x),
                        replayed: None,
                    }),
                    y.map(|y| Row {
                        captured: None,
                        replayed: Some(y),
                    }),
                ]
                .into_iter()
                .flatten()
                .collect(),
            })
            .collect();
    }
    // lengths[i][j]: LCS length of a[i..] and b[j..].
    let mut lengths = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lengths[i][j] = if same(&a[i], &b[j]) {
                lengths[i + 1][j + 1] + 1
            } else {
                lengths[i + 1][j].max(lengths[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut rows = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && same(&a[i], &b[j]) {
            rows.push(Row {
                captured: Some(&a[i]),
                replayed: Some(&b[j]),
            });
            i += 1;
            j += 1;
        } else if j >= b.len() || (i < a.len() && lengths[i + 1][j] >= lengths[i][j + 1]) {
            rows.push(Row {
                captured: Some(&a[i]),
                replayed: None,
            });
            i += 1;
        } else {
            rows.push(Row {
                captured: None,
                replayed: Some(&b[j]),
            });
            j += 1;
        }
    }
    rows
}

/// The differences that count, as sentences.
pub fn differences(captured: &Ladder, replayed: &Ladder) -> Vec<String> {
    align(captured, replayed)
        .into_iter()
        .filter(Row::differs)
        .map(|row| match (row.captured, row.replayed) {
            (Some(entry), None) => format!("captured, not replayed: {}", entry.text()),
            (None, Some(entry)) => format!("replayed, not captured: {}", entry.text()),
            _ => String::new(),
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Matched,
    Diverged,
    TimedOut,
    /// The side never saw this dialogue live.
    NotPlayed,
    /// The capture begins inside the dialogue: it cannot be started live.
    Skipped,
}

impl Verdict {
    fn text(self) -> &'static str {
        match self {
            Verdict::Matched => "MATCHED",
            Verdict::Diverged => "DIVERGED",
            Verdict::TimedOut => "TIMED OUT",
            Verdict::NotPlayed => "NOT PLAYED",
            Verdict::Skipped => "SKIPPED",
        }
    }
}

/// One side of one dialogue, captured and replayed.
#[derive(Debug, Clone, Serialize)]
pub struct SideReport {
    pub verdict: Verdict,
    pub captured: Ladder,
    pub replayed: Ladder,
    pub differences: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DialogueReport {
    pub call_id: String,
    pub transport: String,
    pub edge: String,
    pub core: String,
    /// Messages of this Call-ID on other legs (not played).
    pub other_legs: usize,
    pub edge_side: SideReport,
    /// With `--core`: the core side played from the capture.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core_side: Option<SideReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub dialogues: usize,
    pub messages_captured: u64,
    pub messages_replayed: u64,
    pub matched: usize,
    pub diverged: usize,
    pub timed_out: usize,
    /// Dialogues the capture begins inside of.
    pub skipped: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub capture: String,
    pub target: String,
    pub reader: ReaderStats,
    pub dialogues: Vec<DialogueReport>,
    pub summary: Summary,
}

impl Report {
    pub fn new(
        capture: String,
        target: String,
        reader: ReaderStats,
        dialogues: Vec<DialogueReport>,
    ) -> Report {
        let mut summary = Summary {
            dialogues: dialogues.len(),
            ..Summary::default()
        };
        for dialogue in &dialogues {
            summary.messages_captured += dialogue.edge_side.captured.messages();
            summary.messages_replayed += dialogue.edge_side.replayed.messages();
            match dialogue.edge_side.verdict {
                Verdict::Matched => summary.matched += 1,
                Verdict::Diverged => summary.diverged += 1,
                Verdict::TimedOut | Verdict::NotPlayed => summary.timed_out += 1,
                Verdict::Skipped => summary.skipped += 1,
            }
        }
        Report {
            capture,
            target,
            reader,
            dialogues,
            summary,
        }
    }

    pub fn to_json(&self) -> String {
        // Plain data: serialising it cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Whether every dialogue that could be played matched.
    pub fn all_matched(&self) -> bool {
        self.summary.matched + self.summary.skipped == self.summary.dialogues
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let total = self.dialogues.len();
        for (number, dialogue) in self.dialogues.iter().enumerate() {
            let _ = writeln!(
                out,
                "dialogue {}/{total}  Call-ID {}  {}  edge {} -> core {}  {}",
                number + 1,
                dialogue.call_id,
                dialogue.transport,
                dialogue.edge,
                dialogue.core,
                dialogue.edge_side.verdict.text()
            );
            write_side(&mut out, "edge", &dialogue.edge_side);
            if let Some(core) = &dialogue.core_side {
                let _ = writeln!(out, "  core side: {}", core.verdict.text());
                write_side(&mut out, "core", core);
            }
            if dialogue.other_legs > 0 {
                let _ = writeln!(
                    out,
                    "  ({} messages of this Call-ID on other legs were not played)",
                    dialogue.other_legs
                );
            }
            out.push('\n');
        }
        let summary = &self.summary;
        let _ = writeln!(
            out,
            "summary: {} dialogues, {} messages captured, {} replayed; {} matched, {} diverged, {} timed out, {} skipped",
            summary.dialogues,
            summary.messages_captured,
            summary.messages_replayed,
            summary.matched,
            summary.diverged,
            summary.timed_out,
            summary.skipped
        );
        out
    }
}

/// What a capture holds, without replaying it (`replay --list`).
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub reader: ReaderStats,
    pub dialogues: Vec<ListedDialogue>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListedDialogue {
    pub call_id: String,
    pub transport: String,
    pub edge: String,
    pub core: String,
    /// All messages with this Call-ID, on every leg.
    pub messages: usize,
    pub other_legs: usize,
    /// The leg as the Edge saw it.
    pub ladder: Ladder,
}

impl Listing {
    pub fn new(extraction: &super::Extraction, filter: &super::Filter) -> Listing {
        let (dialogues, without_call_id) =
            super::script::dialogues(extraction.messages.clone(), &filter.call_ids);
        let mut reader = extraction.stats.clone();
        reader.sip_without_call_id = without_call_id as u64;
        Listing {
            reader,
            dialogues: dialogues
                .iter()
                .map(|dialogue| ListedDialogue {
                    call_id: dialogue.call_id.clone(),
                    transport: dialogue.transport.to_string(),
                    edge: dialogue.edge.to_string(),
                    core: dialogue.core.to_string(),
                    messages: dialogue.steps.len() + dialogue.other_legs,
                    other_legs: dialogue.other_legs,
                    ladder: Ladder::captured(dialogue, Side::Edge),
                })
                .collect(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (number, dialogue) in self.dialogues.iter().enumerate() {
            let ladder: Vec<String> = dialogue.ladder.entries.iter().map(Entry::text).collect();
            let _ = writeln!(
                out,
                "{:>4}  {}  {}  {} -> {}  {} messages{}\n      {}",
                number + 1,
                dialogue.call_id,
                dialogue.transport,
                dialogue.edge,
                dialogue.core,
                dialogue.messages,
                if dialogue.other_legs > 0 {
                    format!(" ({} on other legs)", dialogue.other_legs)
                } else {
                    String::new()
                },
                ladder.join(", ")
            );
        }
        let reader = &self.reader;
        let _ = writeln!(
            out,
            "{} dialogues, {} SIP messages in {} frames ({} UDP datagrams, {} TCP segments, \
             {} IP fragments reassembled into {}); skipped: {} non-SIP payloads, {} keep-alives, \
             {} TCP bytes, {} retransmitted TCP bytes, {} unsupported link, {} not IP, \
             {} not UDP/TCP, {} cut by snap length, {} malformed, {} SIP refused by the parser, \
             {} without Call-ID, {} filtered out",
            self.dialogues.len(),
            reader.sip_messages,
            reader.frames,
            reader.udp_datagrams,
            reader.tcp_segments,
            reader.ip_fragments,
            reader.ip_reassembled,
            reader.non_sip_payloads,
            reader.keep_alives,
            reader.tcp_bytes_skipped,
            reader.tcp_retransmitted_bytes,
            reader.unsupported_link,
            reader.not_ip,
            reader.not_udp_tcp,
            reader.snap_truncated,
            reader.malformed_frames,
            reader.sip_refused,
            reader.sip_without_call_id,
            reader.filtered_out,
        );
        if let Some(error) = &reader.file_error {
            let _ = writeln!(out, "warning: {error}");
        }
        out
    }
}

fn write_side(out: &mut String, side: &str, report: &SideReport) {
    let rows = align(&report.captured, &report.replayed);
    let width = rows
        .iter()
        .filter_map(|row| row.captured.map(|entry| entry.text().len()))
        .max()
        .unwrap_or(0)
        .max(8);
    let _ = writeln!(out, "    {:<width$}    replayed ({side} side)", "captured");
    for row in &rows {
        let left = row.captured.map(Entry::text).unwrap_or_default();
        let right = row.replayed.map(Entry::text).unwrap_or_default();
        let mark = if row.differs() { "!=" } else { "  " };
        let _ = writeln!(out, "    {left:<width$} {mark} {right}");
    }
    for note in &report.notes {
        let _ = writeln!(out, "    note: {note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ladder(entries: &[(bool, &str)]) -> Ladder {
        let mut ladder = Ladder::default();
        for (index, (sent, label)) in entries.iter().enumerate() {
            ladder.push(*sent, label.to_string(), index.to_string(), None);
        }
        ladder
    }

    #[test]
    fn a_100_trying_alone_is_not_a_difference() {
        let captured = ladder(&[(true, "INVITE"), (false, "200 INVITE"), (true, "ACK")]);
        let replayed = ladder(&[
            (true, "INVITE"),
            (false, "100 INVITE"),
            (false, "200 INVITE"),
            (true, "ACK"),
        ]);
        assert!(differences(&captured, &replayed).is_empty());
        assert_eq!(align(&captured, &replayed).len(), 4);
    }

    #[test]
    fn a_different_final_response_is_shown_on_both_sides() {
        let captured = ladder(&[(true, "INVITE"), (false, "403 INVITE"), (true, "ACK")]);
        let replayed = ladder(&[
            (true, "INVITE"),
            (false, "200 INVITE"),
            (true, "ACK"),
            (true, "BYE"),
            (false, "200 BYE"),
        ]);
        assert_eq!(
            differences(&captured, &replayed),
            vec![
                "captured, not replayed: <- 403 INVITE",
                "replayed, not captured: <- 200 INVITE",
                "replayed, not captured: -> BYE",
                "replayed, not captured: <- 200 BYE",
            ]
        );
    }

    #[test]
    fn repeats_fold_into_counts() {
        let mut replayed = Ladder::default();
        let first = replayed.push_or_repeat(true, "INVITE".into(), "k".into(), None);
        let again = replayed.push_or_repeat(true, "INVITE".into(), "k".into(), None);
        assert_eq!((first, again), (Some(0), Some(0)));
        assert_eq!(replayed.entries[0].text(), "-> INVITE x2");
        assert_eq!(replayed.messages(), 2);
    }
}
