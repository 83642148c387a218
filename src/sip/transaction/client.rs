//! Client transactions: RFC 3261 §17.1.1 (INVITE, with RFC 6026 Accepted) and §17.1.2
//! (non-INVITE).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{due, earliest, TimerConfig};
use crate::sip::view::HeaderName;
use crate::sip::wire::{self as message, Headers, Method, Request, Response};
use bytes::Bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// INVITE sent, nothing heard yet.
    Calling,
    /// Non-INVITE sent, nothing heard yet.
    Trying,
    Proceeding,
    Completed,
    /// INVITE answered 2xx (RFC 6026): further 2xx are passed up until Timer M.
    Accepted,
    Terminated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Send these bytes to the transaction's destination: the request, a retransmission of
    /// it, or the ACK for a non-2xx final response.
    Transmit(Bytes),
    /// A response for the transaction user (the proxy core).
    Response(Box<Response>),
    /// Timer B or F fired before a final response (or 64·T1 passed after a CANCEL).
    Timeout,
    /// Timer C fired: an INVITE had a provisional response but no final one for too
    /// long; the proxy core should CANCEL it (RFC 3261 §16.8).
    TimerC,
    /// Nothing at all was heard by the silence deadline: the proxy core may try another
    /// host. The transaction goes on (a late answer still matches it) until Timer B/F.
    Silent,
    /// The transaction is over and can be removed.
    Terminated,
}

#[derive(Debug)]
pub struct ClientTransaction {
    invite: bool,
    state: ClientState,
    reliable: bool,
    timers: TimerConfig,
    request: Request,
    wire: Bytes,
    ack: Option<Bytes>,
    retransmit_at: Option<Instant>,
    retransmit_interval: Duration,
    timeout_at: Option<Instant>,
    linger_until: Option<Instant>,
    timer_c_at: Option<Instant>,
    /// Give up early if nothing at all is heard by then (failover, RFC 3263 §4.3).
    silence_until: Option<Instant>,
    saw_provisional: bool,
    events: VecDeque<ClientEvent>,
}

impl ClientTransaction {
    /// Starts the transaction: the request is queued for transmission at once.
    pub fn new(now: Instant, request: Request, reliable: bool, timers: TimerConfig) -> Self {
        let invite = request.method == Method::Invite;
        let wire = request.encode();
        let request = message::skeleton(&request);
        let mut transaction = Self {
            invite,
            state: if invite {
                ClientState::Calling
            } else {
                ClientState::Trying
            },
            reliable,
            timers,
            request,
            wire: wire.clone(),
            ack: None,
            retransmit_at: (!reliable).then(|| now + timers.t1),
            retransmit_interval: timers.t1,
            timeout_at: Some(now + timers.transaction_timeout()),
            linger_until: None,
            timer_c_at: None,
            silence_until: None,
            saw_provisional: false,
            events: VecDeque::new(),
        };
        transaction.events.push_back(ClientEvent::Transmit(wire));
        transaction
    }

    pub fn state(&self) -> ClientState {
        self.state
    }

    /// The request's method, URI and dialog headers (see [`message::skeleton`]).
    pub fn request(&self) -> &Request {
        &self.request
    }

    pub fn is_invite(&self) -> bool {
        self.invite
    }

    /// Whether a provisional response has arrived (a CANCEL may be sent, §9.1).
    pub fn saw_provisional(&self) -> bool {
        self.saw_provisional
    }

    /// Whether a final response has arrived.
    pub fn is_final(&self) -> bool {
        matches!(
            self.state,
            ClientState::Completed | ClientState::Accepted | ClientState::Terminated
        )
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        earliest(&[
            self.retransmit_at,
            self.timeout_at,
            self.linger_until,
            self.timer_c_at,
            self.silence_until,
        ])
    }

    /// Reports [`ClientEvent::Silent`] at `at` unless some response (even 100 Trying)
    /// arrives first: the caller may then try another host while the budget lasts.
    pub fn set_silence_deadline(&mut self, at: Instant) {
        if matches!(self.state, ClientState::Calling | ClientState::Trying) {
            self.silence_until = Some(at);
        }
    }

    /// Ends the transaction (as Timer B or F would) no later than `at`: a request
    /// retried on another host keeps the first try's budget.
    pub fn limit_deadline(&mut self, at: Instant) {
        if let Some(timeout) = self.timeout_at.as_mut() {
            *timeout = (*timeout).min(at);
        }
    }

    /// Stops retransmitting (the request moved to another host) while still matching
    /// whatever answer comes late, until Timer B/F.
    pub fn stop_retransmitting(&mut self) {
        self.retransmit_at = None;
        self.silence_until = None;
    }

    pub fn handle_response(&mut self, now: Instant, response: Response) {
        self.silence_until = None;
        let code = response.code;
        self.forget_wire_once_answered(code);
        let provisional = (100..200).contains(&code);
        let success = (200..300).contains(&code);
        match self.state {
            ClientState::Calling | ClientState::Trying | ClientState::Proceeding if provisional => {
                self.saw_provisional = true;
                if self.invite {
                    // §17.1.1.2: no more retransmissions, and Timer B no longer applies;
                    // §16.7 step 2: a provisional other than 100 restarts Timer C.
                    self.retransmit_at = None;
                    self.timeout_at = None;
                    if code > 100 || self.timer_c_at.is_none() {
                        self.timer_c_at = Some(now + self.timers.timer_c);
                    }
                } else if self.state == ClientState::Trying && !self.reliable {
                    // §17.1.2.2: in Proceeding, Timer E fires every T2.
                    self.retransmit_interval = self.timers.t2;
                }
                self.state = ClientState::Proceeding;
                self.events
                    .push_back(ClientEvent::Response(Box::new(response)));
            }
            ClientState::Calling | ClientState::Proceeding if self.invite && success => {
                self.state = ClientState::Accepted;
                self.clear_running_timers();
                self.linger_until = Some(now + self.timers.transaction_timeout());
                self.events
                    .push_back(ClientEvent::Response(Box::new(response)));
            }
            ClientState::Calling | ClientState::Proceeding if self.invite => {
                let ack = self.build_ack(&response);
                self.ack = Some(ack.clone());
                self.events.push_back(ClientEvent::Transmit(ack));
                self.events
                    .push_back(ClientEvent::Response(Box::new(response)));
                self.complete(now, self.timers.timer_d(self.reliable));
            }
            ClientState::Trying | ClientState::Proceeding if !self.invite => {
                self.events
                    .push_back(ClientEvent::Response(Box::new(response)));
                self.complete(now, self.timers.t4_or_zero(self.reliable));
            }
            ClientState::Accepted if success => {
                self.events
                    .push_back(ClientEvent::Response(Box::new(response)));
            }
            ClientState::Completed if self.invite && code >= 300 => {
                // A retransmitted final response: send the ACK again, tell nobody.
                if let Some(ack) = &self.ack {
                    self.events.push_back(ClientEvent::Transmit(ack.clone()));
                }
            }
            // Anything else is absorbed (§17.1.2.2: Completed buffers retransmissions).
            _ => {}
        }
    }

    /// A CANCEL for this INVITE went out: if no final response arrives within 64·T1 the
    /// transaction is given up (§9.1) and reported as timed out.
    pub fn note_cancel_sent(&mut self, now: Instant) {
        if self.invite && !self.is_final() {
            self.timer_c_at = None;
            self.timeout_at = Some(now + self.timers.transaction_timeout());
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if due(self.linger_until, now) {
            self.linger_until = None;
            self.terminate();
            return;
        }
        if due(self.timer_c_at, now) {
            // Timer C (§16.8): ask the proxy core to cancel; the answer to the CANCEL,
            // or 64·T1 of silence, ends the transaction.
            self.timer_c_at = None;
            self.events.push_back(ClientEvent::TimerC);
            return;
        }
        if due(self.silence_until, now) {
            self.silence_until = None;
            self.events.push_back(ClientEvent::Silent);
            return;
        }
        if due(self.timeout_at, now) {
            // Timer B or F, or 64·T1 after a CANCEL.
            self.clear_running_timers();
            self.events.push_back(ClientEvent::Timeout);
            self.terminate();
            return;
        }
        if due(self.retransmit_at, now) {
            // Timer A or E.
            self.events
                .push_back(ClientEvent::Transmit(self.wire.clone()));
            let next = match self.state {
                ClientState::Calling => self.retransmit_interval * 2,
                ClientState::Trying => (self.retransmit_interval * 2).min(self.timers.t2),
                _ => self.timers.t2,
            };
            self.retransmit_interval = next;
            self.retransmit_at = Some(now + next);
        }
    }

    /// Ends the transaction at once, for instance after a transport error.
    pub fn abort(&mut self) {
        self.clear_running_timers();
        self.linger_until = None;
        self.terminate();
    }

    /// The CANCEL for this INVITE (RFC 3261 §9.1): same Request-URI, Call-ID, From, To,
    /// CSeq number and Route set, and only the top Via, so it shares the INVITE's branch.
    pub fn build_cancel(&self) -> Request {
        self.derived_request(Method::Cancel, None)
    }

    fn build_ack(&self, response: &Response) -> Bytes {
        let to = message::to_value(&response.headers).ok();
        self.derived_request(Method::Ack, to).encode()
    }

    /// A request that shares this transaction's branch (§17.1.1.3 ACK, §9.1 CANCEL).
    fn derived_request(&self, method: Method, to_override: Option<&str>) -> Request {
        let mut headers = Headers::default();
        let mut via_done = false;
        for header in self.request.headers.iter() {
            match header.kind() {
                HeaderName::Via if !via_done => {
                    via_done = true;
                    let top = crate::sip::header::split_list(header.value())
                        .into_iter()
                        .next()
                        .unwrap_or_default();
                    headers.push("Via", top);
                }
                // Authorization too: a core that wants credentials on every request
                // (RFC 8898 bearer) gets them on the CANCEL and the hop-by-hop ACK.
                HeaderName::From
                | HeaderName::CallId
                | HeaderName::Route
                | HeaderName::Authorization => headers.push_header(header.clone()),
                HeaderName::To => match to_override {
                    Some(to) => headers.push("To", to),
                    None => headers.push_header(header.clone()),
                },
                _ => {}
            }
        }
        let seq = message::cseq(&self.request.headers)
            .map(|(seq, _)| seq)
            .unwrap_or(1);
        message::set_cseq(&mut headers, seq, method);
        message::set_max_forwards(&mut headers, 70);
        headers.push("Content-Length", "0");
        Request {
            method,
            uri: self.request.uri.clone(),
            headers,
            body: Bytes::new(),
        }
    }

    /// An INVITE is never retransmitted once anything answers it (§17.1.1.2), a
    /// non-INVITE once a final response does (§17.1.2.2): from then on its bytes are
    /// dead weight for the transaction's remaining linger (up to 64·T1).
    fn forget_wire_once_answered(&mut self, code: u16) {
        if (self.invite || code >= 200) && !self.wire.is_empty() {
            self.wire = Bytes::new();
        }
    }

    fn complete(&mut self, now: Instant, linger: Duration) {
        self.clear_running_timers();
        if linger.is_zero() {
            self.terminate();
        } else {
            self.state = ClientState::Completed;
            self.linger_until = Some(now + linger);
        }
    }

    fn clear_running_timers(&mut self) {
        self.retransmit_at = None;
        self.timeout_at = None;
        self.timer_c_at = None;
        self.silence_until = None;
    }

    fn terminate(&mut self) {
        if self.state != ClientState::Terminated {
            self.state = ClientState::Terminated;
            self.events.push_back(ClientEvent::Terminated);
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start their virtual clock at a real Instant
mod tests {
    use super::*;
    use crate::sip::wire::{parse, Message};

    const INVITE: &str = "INVITE sip:bob@192.0.2.2 SIP/2.0\r\n\
        Via: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKclient1;rport\r\n\
        Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKedge\r\n\
        Max-Forwards: 69\r\n\
        Route: <sip:192.0.2.2;lr>\r\n\
        From: <sip:alice@a.example>;tag=f1\r\n\
        To: <sip:bob@b.example>\r\n\
        Call-ID: call-1\r\n\
        CSeq: 7 INVITE\r\n\
        Content-Length: 0\r\n\r\n";

    fn request(text: &str) -> Request {
        match parse(bytes::Bytes::copy_from_slice(text.as_bytes()), true).unwrap() {
            Message::Request(request) => request,
            _ => unreachable!(),
        }
    }

    fn options() -> Request {
        request(
            &INVITE
                .replace("INVITE sip", "OPTIONS sip")
                .replace("7 INVITE", "7 OPTIONS"),
        )
    }

    fn response(code: u16, method: &str) -> Response {
        let text = format!(
            "SIP/2.0 {code} X\r\nVia: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKclient1\r\n\
             From: <sip:alice@a.example>;tag=f1\r\nTo: <sip:bob@b.example>;tag=t9\r\n\
             Call-ID: call-1\r\nCSeq: 7 {method}\r\nContent-Length: 0\r\n\r\n"
        );
        match parse(bytes::Bytes::copy_from_slice(text.as_bytes()), true).unwrap() {
            Message::Response(response) => response,
            _ => unreachable!(),
        }
    }

    fn drain(transaction: &mut ClientTransaction) -> Vec<ClientEvent> {
        std::iter::from_fn(|| transaction.poll_event()).collect()
    }

    /// Runs the clock from `start` to `end` in the steps the transaction asks for and
    /// records when it transmitted, as offsets from `start`.
    fn transmissions_until(
        transaction: &mut ClientTransaction,
        start: Instant,
        end: Duration,
    ) -> (Vec<Duration>, Vec<ClientEvent>) {
        let mut sent = Vec::new();
        let mut other = Vec::new();
        while let Some(at) = transaction.poll_timeout() {
            if at > start + end {
                break;
            }
            transaction.handle_timeout(at);
            for event in drain(transaction) {
                match event {
                    ClientEvent::Transmit(_) => sent.push(at - start),
                    event => other.push(event),
                }
            }
        }
        (sent, other)
    }

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|v| Duration::from_millis(*v)).collect()
    }

    #[test]
    fn timer_a_doubles_from_t1_and_timer_b_fires_at_64_t1() {
        let start = Instant::now();
        let mut invite =
            ClientTransaction::new(start, request(INVITE), false, TimerConfig::default());
        assert!(matches!(drain(&mut invite)[..], [ClientEvent::Transmit(_)]));
        let (sent, other) = transmissions_until(&mut invite, start, Duration::from_secs(40));
        // Retransmissions at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s (intervals 0.5, 1, 2, 4, 8, 16).
        assert_eq!(sent, ms(&[500, 1500, 3500, 7500, 15500, 31500]));
        assert_eq!(other, vec![ClientEvent::Timeout, ClientEvent::Terminated]);
        assert_eq!(invite.state(), ClientState::Terminated);
        assert_eq!(invite.poll_timeout(), None);
    }

    #[test]
    fn silence_is_reported_without_ending_the_transaction_and_a_late_answer_still_matches() {
        let start = Instant::now();
        let mut invite =
            ClientTransaction::new(start, request(INVITE), false, TimerConfig::default());
        drain(&mut invite);
        invite.set_silence_deadline(start + Duration::from_secs(3));
        let (sent, other) = transmissions_until(&mut invite, start, Duration::from_secs(3));
        assert_eq!(sent, ms(&[500, 1500]));
        assert_eq!(other, vec![ClientEvent::Silent]);
        assert_eq!(invite.state(), ClientState::Calling);
        // Moved elsewhere: quiet from now on, but a late 180 and 200 still arrive here.
        invite.stop_retransmitting();
        let (sent, _) = transmissions_until(&mut invite, start, Duration::from_secs(10));
        assert!(sent.is_empty(), "{sent:?}");
        invite.handle_response(start + Duration::from_secs(10), response(180, "INVITE"));
        invite.handle_response(start + Duration::from_secs(11), response(200, "INVITE"));
        let codes: Vec<u16> = drain(&mut invite)
            .into_iter()
            .filter_map(|event| match event {
                ClientEvent::Response(response) => Some(response.code),
                _ => None,
            })
            .collect();
        assert_eq!(codes, vec![180, 200]);
    }

    #[test]
    fn any_answer_cancels_the_silence_deadline_and_the_budget_caps_timer_b() {
        let start = Instant::now();
        let mut heard = ClientTransaction::new(start, options(), false, TimerConfig::default());
        drain(&mut heard);
        heard.set_silence_deadline(start + Duration::from_secs(2));
        heard.limit_deadline(start + Duration::from_secs(20));
        heard.handle_response(start + Duration::from_secs(1), response(100, "OPTIONS"));
        drain(&mut heard);
        let (_, other) = transmissions_until(&mut heard, start, Duration::from_secs(40));
        // No Silent after the 100; Timer F at the budget (20 s), not at 32 s.
        assert_eq!(other, vec![ClientEvent::Timeout, ClientEvent::Terminated]);
        let mut timed = ClientTransaction::new(start, options(), false, TimerConfig::default());
        drain(&mut timed);
        timed.limit_deadline(start + Duration::from_secs(20));
        let mut fired = None;
        while let Some(at) = timed.poll_timeout() {
            timed.handle_timeout(at);
            if drain(&mut timed).contains(&ClientEvent::Timeout) {
                fired = Some(at - start);
            }
        }
        assert_eq!(fired, Some(Duration::from_secs(20)));
    }

    #[test]
    fn timer_b_fires_exactly_at_64_t1() {
        let start = Instant::now();
        let timers = TimerConfig {
            t1: Duration::from_millis(100),
            ..TimerConfig::default()
        };
        let mut invite = ClientTransaction::new(start, request(INVITE), false, timers);
        drain(&mut invite);
        let mut timeout_at = None;
        while let Some(at) = invite.poll_timeout() {
            invite.handle_timeout(at);
            if drain(&mut invite).contains(&ClientEvent::Timeout) {
                timeout_at = Some(at - start);
            }
        }
        assert_eq!(timeout_at, Some(Duration::from_millis(6400)));
    }

    #[test]
    fn reliable_invite_never_retransmits() {
        let start = Instant::now();
        let mut invite =
            ClientTransaction::new(start, request(INVITE), true, TimerConfig::default());
        drain(&mut invite);
        let (sent, other) = transmissions_until(&mut invite, start, Duration::from_secs(40));
        assert!(sent.is_empty());
        assert_eq!(other, vec![ClientEvent::Timeout, ClientEvent::Terminated]);
    }

    #[test]
    fn timer_e_doubles_to_t2_and_timer_f_fires_at_64_t1() {
        let start = Instant::now();
        let mut options = ClientTransaction::new(start, options(), false, TimerConfig::default());
        drain(&mut options);
        let (sent, other) = transmissions_until(&mut options, start, Duration::from_secs(40));
        // Intervals 0.5, 1, 2, 4, 4, 4 ... s until Timer F at 32 s.
        assert_eq!(
            sent,
            ms(&[500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500])
        );
        assert_eq!(other, vec![ClientEvent::Timeout, ClientEvent::Terminated]);
    }

    #[test]
    fn timer_e_is_t2_after_a_provisional() {
        let start = Instant::now();
        let mut options = ClientTransaction::new(start, options(), false, TimerConfig::default());
        drain(&mut options);
        options.handle_timeout(start + Duration::from_millis(500));
        drain(&mut options);
        options.handle_response(start + Duration::from_millis(600), response(100, "OPTIONS"));
        assert_eq!(options.state(), ClientState::Proceeding);
        // The pending E (at 1.5 s) stays; after it, every T2.
        let (sent, _) = transmissions_until(&mut options, start, Duration::from_millis(14000));
        assert_eq!(sent, ms(&[1500, 5500, 9500, 13500]));
    }

    #[test]
    fn non_invite_final_response_then_timer_k() {
        let start = Instant::now();
        let mut options = ClientTransaction::new(start, options(), false, TimerConfig::default());
        drain(&mut options);
        options.handle_response(start, response(200, "OPTIONS"));
        assert!(matches!(
            drain(&mut options)[..],
            [ClientEvent::Response(_)]
        ));
        assert_eq!(options.state(), ClientState::Completed);
        // Retransmitted final responses are absorbed.
        options.handle_response(start, response(200, "OPTIONS"));
        assert!(drain(&mut options).is_empty());
        assert_eq!(options.poll_timeout(), Some(start + Duration::from_secs(5)));
        options.handle_timeout(start + Duration::from_secs(5));
        assert_eq!(drain(&mut options), vec![ClientEvent::Terminated]);
    }

    #[test]
    fn non_invite_over_reliable_transport_terminates_on_final() {
        let start = Instant::now();
        let mut options = ClientTransaction::new(start, options(), true, TimerConfig::default());
        drain(&mut options);
        options.handle_response(start, response(404, "OPTIONS"));
        let events = drain(&mut options);
        assert!(matches!(
            events[..],
            [ClientEvent::Response(_), ClientEvent::Terminated]
        ));
    }

    #[test]
    fn invite_non_2xx_is_acked_hop_by_hop_and_timer_d_is_32s() {
        let start = Instant::now();
        let mut invite =
            ClientTransaction::new(start, request(INVITE), false, TimerConfig::default());
        drain(&mut invite);
        invite.handle_response(start, response(180, "INVITE"));
        assert!(invite.saw_provisional());
        invite.handle_response(start, response(486, "INVITE"));
        let events = drain(&mut invite);
        let [ClientEvent::Response(_), ClientEvent::Transmit(ack), ClientEvent::Response(busy)] =
            &events[..]
        else {
            panic!("unexpected events {events:?}");
        };
        assert_eq!(busy.code, 486);
        let ack = String::from_utf8(ack.to_vec()).unwrap();
        assert!(
            ack.starts_with("ACK sip:bob@192.0.2.2 SIP/2.0\r\n"),
            "{ack}"
        );
        assert!(ack.contains("branch=z9hG4bKclient1"));
        assert!(!ack.contains("z9hG4bKedge"), "only the top Via: {ack}");
        assert!(ack.contains("CSeq: 7 ACK"));
        assert!(ack.contains("tag=t9"), "To from the response: {ack}");
        assert!(ack.contains("Route: <sip:192.0.2.2;lr>"));
        // A retransmitted 486 is answered with the same ACK and not passed up.
        invite.handle_response(start, response(486, "INVITE"));
        assert!(matches!(drain(&mut invite)[..], [ClientEvent::Transmit(_)]));
        assert_eq!(invite.poll_timeout(), Some(start + Duration::from_secs(32)));
    }

    #[test]
    fn invite_2xx_enters_accepted_and_passes_retransmissions_until_timer_m() {
        let start = Instant::now();
        let mut invite =
            ClientTransaction::new(start, request(INVITE), false, TimerConfig::default());
        drain(&mut invite);
        invite.handle_response(start, response(200, "INVITE"));
        assert_eq!(invite.state(), ClientState::Accepted);
        assert!(matches!(drain(&mut invite)[..], [ClientEvent::Response(_)]));
        invite.handle_response(start + Duration::from_secs(1), response(200, "INVITE"));
        assert!(matches!(drain(&mut invite)[..], [ClientEvent::Response(_)]));
        // No ACK from the transaction for a 2xx, and no retransmission of the INVITE.
        assert_eq!(invite.poll_timeout(), Some(start + Duration::from_secs(32)));
        invite.handle_timeout(start + Duration::from_secs(32));
        assert_eq!(drain(&mut invite), vec![ClientEvent::Terminated]);
    }

    #[test]
    fn provisional_stops_timer_a_and_b_for_invite() {
        let start = Instant::now();
        let mut invite =
            ClientTransaction::new(start, request(INVITE), false, TimerConfig::default());
        drain(&mut invite);
        invite.handle_response(start + Duration::from_millis(100), response(100, "INVITE"));
        // Only Timer C is left.
        assert_eq!(
            invite.poll_timeout(),
            Some(start + Duration::from_millis(100) + Duration::from_secs(180))
        );
    }

    #[test]
    fn timer_c_restarts_on_provisionals_then_asks_for_a_cancel() {
        let start = Instant::now();
        let mut invite =
            ClientTransaction::new(start, request(INVITE), false, TimerConfig::default());
        drain(&mut invite);
        invite.handle_response(start, response(180, "INVITE"));
        invite.handle_response(start + Duration::from_secs(100), response(183, "INVITE"));
        drain(&mut invite);
        let fires = start + Duration::from_secs(280);
        assert_eq!(invite.poll_timeout(), Some(fires));
        invite.handle_timeout(fires);
        assert_eq!(drain(&mut invite), vec![ClientEvent::TimerC]);
        // After the CANCEL, 64·T1 without a final response ends it.
        invite.note_cancel_sent(fires);
        assert_eq!(invite.poll_timeout(), Some(fires + Duration::from_secs(32)));
        invite.handle_timeout(fires + Duration::from_secs(32));
        assert_eq!(
            drain(&mut invite),
            vec![ClientEvent::Timeout, ClientEvent::Terminated]
        );
    }

    #[test]
    fn non_invite_in_proceeding_completes_with_timer_k_and_sends_no_ack() {
        // REGISTER -> 100 -> 401 must not be ACKed, and must linger T4, not Timer D.
        let register = request(
            &INVITE
                .replace("INVITE sip", "REGISTER sip")
                .replace("7 INVITE", "7 REGISTER"),
        );
        let start = Instant::now();
        let mut transaction =
            ClientTransaction::new(start, register, false, TimerConfig::default());
        drain(&mut transaction);
        transaction.handle_response(start, response(100, "REGISTER"));
        transaction.handle_response(start, response(401, "REGISTER"));
        let events = drain(&mut transaction);
        assert!(
            matches!(
                events[..],
                [ClientEvent::Response(_), ClientEvent::Response(_)]
            ),
            "{events:?}"
        );
        assert_eq!(transaction.state(), ClientState::Completed);
        assert_eq!(
            transaction.poll_timeout(),
            Some(start + Duration::from_secs(5))
        );

        let mut ok = ClientTransaction::new(start, options(), false, TimerConfig::default());
        drain(&mut ok);
        ok.handle_response(start, response(100, "OPTIONS"));
        ok.handle_response(start, response(200, "OPTIONS"));
        assert_eq!(
            ok.state(),
            ClientState::Completed,
            "no Accepted state for non-INVITE"
        );
    }

    #[test]
    fn cancel_shares_branch_and_cseq_number() {
        let invite = ClientTransaction::new(
            Instant::now(),
            request(INVITE),
            false,
            TimerConfig::default(),
        );
        let cancel = invite.build_cancel().encode();
        let text = String::from_utf8(cancel.to_vec()).unwrap();
        assert!(text.starts_with("CANCEL sip:bob@192.0.2.2 SIP/2.0\r\n"));
        assert!(text.contains("branch=z9hG4bKclient1"));
        assert!(!text.contains("z9hG4bKedge"));
        assert!(text.contains("CSeq: 7 CANCEL"));
        assert!(text.contains("To: <sip:bob@b.example>\r\n"));
    }
}
