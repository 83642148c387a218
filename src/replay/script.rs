//! Captured messages turned into dialogues a player can act out. A dialogue is every
//! message with one Call-ID; its *leg* is the pair of hosts of its first request: the
//! sender plays the Edge, the receiver the core. Between two different hosts any ports
//! count (over TCP the core's requests arrive on a connection to the Edge's listening
//! port, not on the one the Edge opened); on one host only the two exact addresses do.
//! Messages of the Call-ID between other addresses (the far side of a proxy) are
//! counted, not played. A dialogue whose capture begins after its first request (with a
//! response, an ACK, a CANCEL or an in-dialog request) cannot be started live: it is
//! marked not playable.
//!
//! Each message of the leg becomes a [`Step`]: who sent it, which transaction it belongs
//! to (RFC 3261 §17.1.3: branch and CSeq method, so an ACK or CANCEL is its own
//! transaction), whether it repeats one already seen (a retransmission), and for a
//! request its ordinal among its side's requests of that method, which is how a live
//! request is matched to a captured one when a proxy in between has renumbered CSeq.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use super::extract::CapturedMessage;
use super::text::SipText;
use crate::config::Transport;

/// Who sent a message on the leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Edge,
    Core,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Edge => Side::Core,
            Side::Core => Side::Edge,
        }
    }

    /// The same role in the transport's terms (it names the side in its logs).
    pub fn transport_side(self) -> crate::transport::Side {
        match self {
            Side::Edge => crate::transport::Side::Edge,
            Side::Core => crate::transport::Side::Core,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Dialogue {
    pub call_id: String,
    pub transport: Transport,
    pub edge: SocketAddr,
    pub core: SocketAddr,
    pub steps: Vec<Step>,
    pub transactions: Vec<Transaction>,
    /// Messages with this Call-ID between other addresses.
    pub other_legs: usize,
}

impl Dialogue {
    /// Whether the dialogue can be started live: its first message on the leg is a
    /// request from the Edge that begins a transaction outside a dialog.
    pub fn playable(&self) -> bool {
        self.steps.first().is_some_and(|first| {
            first.side == Side::Edge
                && first.text.is_request()
                && first.text.to_tag().is_none()
                && !matches!(first.text.method(), Some("ACK" | "CANCEL"))
        })
    }

    /// Why the dialogue cannot be started live, if it cannot.
    pub fn unplayable(&self) -> Option<String> {
        let first = self.steps.first()?;
        (!self.playable()).then(|| {
            format!(
                "the capture begins inside this dialogue (its first message is {}): nothing starts it live",
                first.label()
            )
        })
    }
}

#[derive(Debug, Clone)]
pub struct Step {
    pub side: Side,
    /// Since the first frame of the capture.
    pub time: Duration,
    pub frame: u64,
    pub text: SipText,
    /// Index into [`Dialogue::transactions`]; `None` for a response to nothing captured.
    pub transaction: Option<usize>,
    pub retransmission: bool,
    /// Requests: 1-based position among this side's first transmissions of the method.
    pub ordinal: usize,
    /// Responses: 1-based position among the transaction's first non-100 provisionals;
    /// 0 for final responses and 100.
    pub provisional: usize,
}

impl Step {
    /// `INVITE` for a request, `200 INVITE` for a response.
    pub fn label(&self) -> String {
        label(&self.text)
    }
}

/// `INVITE` for a request, `200 INVITE` for a response.
pub fn label(text: &SipText) -> String {
    let method = text.method().unwrap_or("?");
    match text.status() {
        Some(code) => format!("{code} {method}"),
        None => method.to_string(),
    }
}

#[derive(Debug, Clone)]
pub struct Transaction {
    /// Who sent the request.
    pub side: Side,
    pub method: String,
    pub cseq: u32,
    /// The step of the request's first transmission; `None` when only responses were
    /// captured.
    pub request: Option<usize>,
    /// The first final response captured, by status.
    pub final_status: Option<u16>,
}

/// Groups messages into dialogues, in the order of their first message; also says how
/// many messages had no Call-ID.
pub fn dialogues(messages: Vec<CapturedMessage>, call_ids: &[String]) -> (Vec<Dialogue>, usize) {
    let mut order: Vec<String> = Vec::new();
    let mut by_call: HashMap<String, Vec<CapturedMessage>> = HashMap::new();
    let mut without_call_id = 0;
    for message in messages {
        let Some(call_id) = message.text.call_id().map(str::to_string) else {
            without_call_id += 1;
            continue;
        };
        if !call_ids.is_empty() && !call_ids.contains(&call_id) {
            continue;
        }
        by_call
            .entry(call_id.clone())
            .or_insert_with(|| {
                order.push(call_id);
                Vec::new()
            })
            .push(message);
    }
    let dialogues = order
        .into_iter()
        .filter_map(|call_id| {
            let messages = by_call.remove(&call_id)?;
            build(&call_id, messages)
        })
        .collect();
    (dialogues, without_call_id)
}

fn build(call_id: &str, messages: Vec<CapturedMessage>) -> Option<Dialogue> {
    // The leg: the addresses of the first request (or, without one, the first message).
    let first = messages
        .iter()
        .find(|message| message.text.is_request())
        .or_else(|| messages.first())?;
    let (edge, core, transport) = (first.source, first.destination, first.transport);
    let mut dialogue = Dialogue {
        call_id: call_id.to_string(),
        transport,
        edge,
        core,
        steps: Vec::new(),
        transactions: Vec::new(),
        other_legs: 0,
    };
    let mut keys: HashMap<(Side, String, String), usize> = HashMap::new();
    let mut ordinals: HashMap<(Side, String), usize> = HashMap::new();
    // Responses seen per transaction, by status and To tag, and the count of distinct
    // provisionals above 100.
    let mut responses: HashSet<(usize, u16, Option<String>)> = HashSet::new();
    let mut provisionals: HashMap<usize, usize> = HashMap::new();
    let same_host = edge.ip() == core.ip();
    let matches = |from: SocketAddr, to: SocketAddr, a: SocketAddr, b: SocketAddr| {
        if same_host {
            (from, to) == (a, b)
        } else {
            (from.ip(), to.ip()) == (a.ip(), b.ip())
        }
    };
    for message in messages {
        let side = if matches(message.source, message.destination, edge, core) {
            Side::Edge
        } else if matches(message.source, message.destination, core, edge) {
            Side::Core
        } else {
            dialogue.other_legs += 1;
            continue;
        };
        let text = message.text;
        let method = text.method().unwrap_or_default().to_ascii_uppercase();
        let cseq = text.cseq().map_or(0, |(number, _)| number);
        // Without a branch (RFC 2543 peers) the CSeq number stands in for it.
        let branch = text.branch().unwrap_or_else(|| format!("cseq-{cseq}"));
        let requester = if text.is_request() {
            side
        } else {
            side.other()
        };
        let key = (requester, branch, method.clone());
        let index = dialogue.steps.len();
        let mut step = Step {
            side,
            time: message.time,
            frame: message.frame,
            text,
            transaction: None,
            retransmission: false,
            ordinal: 0,
            provisional: 0,
        };
        match keys.get(&key) {
            Some(&transaction) => {
                step.transaction = Some(transaction);
                if step.text.is_request() {
                    let known = &mut dialogue.transactions[transaction];
                    match known.request {
                        Some(_) => step.retransmission = true,
                        None => known.request = Some(index),
                    }
                }
            }
            None => {
                let transaction = dialogue.transactions.len();
                dialogue.transactions.push(Transaction {
                    side: requester,
                    method: method.clone(),
                    cseq,
                    request: step.text.is_request().then_some(index),
                    final_status: None,
                });
                keys.insert(key, transaction);
                step.transaction = Some(transaction);
            }
        }
        if step.text.is_request() && !step.retransmission {
            let count = ordinals.entry((side, method)).or_default();
            *count += 1;
            step.ordinal = *count;
        }
        if let (Some(code), Some(transaction)) = (step.text.status(), step.transaction) {
            let identity = (transaction, code, step.text.to_tag().map(str::to_string));
            if !responses.insert(identity) {
                step.retransmission = true;
            } else if code >= 200 {
                let known = &mut dialogue.transactions[transaction];
                known.final_status.get_or_insert(code);
            } else if code > 100 {
                let count = provisionals.entry(transaction).or_default();
                *count += 1;
                step.provisional = *count;
            }
        }
        dialogue.steps.push(step);
    }
    Some(dialogue)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(source: &str, destination: &str, text: &str) -> CapturedMessage {
        CapturedMessage {
            frame: 1,
            time: Duration::ZERO,
            transport: Transport::Udp,
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            text: SipText::parse(text.as_bytes()).unwrap(),
        }
    }

    fn request(method: &str, cseq: u32, branch: &str, to_tag: &str) -> String {
        format!(
            "{method} sip:b@x SIP/2.0\r\nVia: SIP/2.0/UDP a;branch={branch}\r\nFrom: <sip:a@x>;tag=a\r\n\
             To: <sip:b@x>{to_tag}\r\nCall-ID: c1\r\nCSeq: {cseq} {method}\r\n\r\n"
        )
    }

    fn response(code: u16, method: &str, cseq: u32, branch: &str) -> String {
        format!(
            "SIP/2.0 {code} X\r\nVia: SIP/2.0/UDP a;branch={branch}\r\nFrom: <sip:a@x>;tag=a\r\n\
             To: <sip:b@x>;tag=b\r\nCall-ID: c1\r\nCSeq: {cseq} {method}\r\n\r\n"
        )
    }

    #[test]
    fn steps_know_their_transaction_retransmissions_and_ordinals() {
        let (a, b, c) = ("10.0.0.1:5060", "10.0.0.2:5060", "10.0.0.3:5060");
        let messages = vec![
            message(a, b, &request("INVITE", 1, "z9hG4bK1", "")),
            message(a, b, &request("INVITE", 1, "z9hG4bK1", "")),
            message(b, c, &request("INVITE", 1, "z9hG4bKproxy", "")),
            message(b, a, &response(100, "INVITE", 1, "z9hG4bK1")),
            message(b, a, &response(180, "INVITE", 1, "z9hG4bK1")),
            message(b, a, &response(407, "INVITE", 1, "z9hG4bK1")),
            message(b, a, &response(407, "INVITE", 1, "z9hG4bK1")),
            message(a, b, &request("ACK", 1, "z9hG4bK1", ";tag=b")),
            message(a, b, &request("INVITE", 2, "z9hG4bK2", "")),
        ];
        let (dialogues, without) = dialogues(messages, &[]);
        assert_eq!((dialogues.len(), without), (1, 0));
        let dialogue = &dialogues[0];
        assert_eq!(dialogue.other_legs, 1);
        let summary: Vec<(Side, String, bool, usize, usize)> = dialogue
            .steps
            .iter()
            .map(|step| {
                (
                    step.side,
                    step.label(),
                    step.retransmission,
                    step.ordinal,
                    step.provisional,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (Side::Edge, "INVITE".into(), false, 1, 0),
                (Side::Edge, "INVITE".into(), true, 0, 0),
                (Side::Core, "100 INVITE".into(), false, 0, 0),
                (Side::Core, "180 INVITE".into(), false, 0, 1),
                (Side::Core, "407 INVITE".into(), false, 0, 0),
                (Side::Core, "407 INVITE".into(), true, 0, 0),
                (Side::Edge, "ACK".into(), false, 1, 0),
                (Side::Edge, "INVITE".into(), false, 2, 0),
            ]
        );
        // INVITE 1, ACK 1 and INVITE 2 are three transactions.
        assert_eq!(dialogue.transactions.len(), 3);
        assert_eq!(dialogue.transactions[0].final_status, Some(407));
    }
}
