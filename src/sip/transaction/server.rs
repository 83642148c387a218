//! Server transactions: RFC 3261 §17.2.1 (INVITE, with RFC 6026 Accepted) and §17.2.2
//! (non-INVITE). Responses come in already encoded: the transaction only needs their
//! bytes, for retransmission, and their status code.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{due, earliest, TimerConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Non-INVITE received, nothing sent yet.
    Trying,
    Proceeding,
    Completed,
    /// INVITE: ACK for a non-2xx received; absorbing ACK retransmissions until Timer I.
    Confirmed,
    /// INVITE answered 2xx (RFC 6026): INVITE retransmissions absorbed, 2xx
    /// retransmissions from the core passed on, until Timer L.
    Accepted,
    Terminated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// Send these bytes to the peer the request came from.
    Transmit(Bytes),
    /// Timer H fired: the non-2xx final response was never acknowledged.
    Timeout,
    Terminated,
}

#[derive(Debug)]
pub struct ServerTransaction {
    invite: bool,
    state: ServerState,
    reliable: bool,
    timers: TimerConfig,
    last_response: Option<Bytes>,
    retransmit_at: Option<Instant>,
    retransmit_interval: Duration,
    timeout_at: Option<Instant>,
    linger_until: Option<Instant>,
    events: VecDeque<ServerEvent>,
}

impl ServerTransaction {
    pub fn new(invite: bool, reliable: bool, timers: TimerConfig) -> Self {
        Self {
            invite,
            state: if invite {
                ServerState::Proceeding
            } else {
                ServerState::Trying
            },
            reliable,
            timers,
            last_response: None,
            retransmit_at: None,
            retransmit_interval: timers.t1,
            timeout_at: None,
            linger_until: None,
            events: VecDeque::new(),
        }
    }

    pub fn state(&self) -> ServerState {
        self.state
    }

    /// Whether a final response has been sent.
    pub fn is_final(&self) -> bool {
        !matches!(self.state, ServerState::Trying | ServerState::Proceeding)
    }

    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        earliest(&[self.retransmit_at, self.timeout_at, self.linger_until])
    }

    /// A retransmission of the request arrived: resend the last response, if the state
    /// calls for it (§17.2.1, §17.2.2). In Accepted and Confirmed it is absorbed.
    pub fn handle_request_retransmission(&mut self) {
        if matches!(self.state, ServerState::Proceeding | ServerState::Completed) {
            if let Some(last) = &self.last_response {
                self.events.push_back(ServerEvent::Transmit(last.clone()));
            }
        }
    }

    /// An ACK matching this INVITE transaction. Returns true when it was absorbed (the ACK
    /// for a non-2xx final response); false when it is not for this transaction to keep.
    pub fn handle_ack(&mut self, now: Instant) -> bool {
        match self.state {
            ServerState::Completed if self.invite => {
                self.retransmit_at = None;
                self.timeout_at = None;
                let linger = self.timers.t4_or_zero(self.reliable);
                if linger.is_zero() {
                    self.terminate();
                } else {
                    self.state = ServerState::Confirmed;
                    self.linger_until = Some(now + linger);
                }
                true
            }
            ServerState::Confirmed => true,
            _ => false,
        }
    }

    /// The transaction user sends a response with status `code`, encoded as `wire`.
    /// Returns false when the state does not allow it (the response is not sent).
    pub fn send_response(&mut self, now: Instant, code: u16, wire: Bytes) -> bool {
        let provisional = code < 200;
        let success = (200..300).contains(&code);
        match self.state {
            ServerState::Trying | ServerState::Proceeding if provisional => {
                self.state = ServerState::Proceeding;
                self.transmit(wire);
            }
            ServerState::Proceeding if self.invite && success => {
                self.state = ServerState::Accepted;
                // Retransmitted INVITEs are absorbed from here on (RFC 6026 §7.1): the
                // last provisional response is never sent again.
                self.last_response = None;
                self.events.push_back(ServerEvent::Transmit(wire));
                self.linger_until = Some(now + self.timers.transaction_timeout());
            }
            ServerState::Proceeding if self.invite => {
                self.state = ServerState::Completed;
                self.transmit(wire);
                if !self.reliable {
                    self.retransmit_at = Some(now + self.timers.t1);
                }
                self.timeout_at = Some(now + self.timers.transaction_timeout());
            }
            ServerState::Trying | ServerState::Proceeding => {
                self.transmit(wire);
                if self.reliable {
                    self.terminate();
                } else {
                    self.state = ServerState::Completed;
                    self.linger_until = Some(now + self.timers.transaction_timeout());
                }
            }
            ServerState::Accepted if success => {
                // RFC 6026 §7.1: 2xx retransmissions from the TU go out.
                self.events.push_back(ServerEvent::Transmit(wire));
            }
            _ => return false,
        }
        true
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if due(self.linger_until, now) {
            // Timer I, J or L.
            self.linger_until = None;
            self.terminate();
            return;
        }
        if due(self.timeout_at, now) {
            // Timer H.
            self.retransmit_at = None;
            self.timeout_at = None;
            self.events.push_back(ServerEvent::Timeout);
            self.terminate();
            return;
        }
        if due(self.retransmit_at, now) {
            // Timer G.
            if let Some(last) = &self.last_response {
                self.events.push_back(ServerEvent::Transmit(last.clone()));
            }
            self.retransmit_interval = (self.retransmit_interval * 2).min(self.timers.t2);
            self.retransmit_at = Some(now + self.retransmit_interval);
        }
    }

    fn transmit(&mut self, wire: Bytes) {
        self.last_response = Some(wire.clone());
        self.events.push_back(ServerEvent::Transmit(wire));
    }

    fn terminate(&mut self) {
        if self.state != ServerState::Terminated {
            self.state = ServerState::Terminated;
            self.retransmit_at = None;
            self.timeout_at = None;
            self.linger_until = None;
            self.events.push_back(ServerEvent::Terminated);
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start their virtual clock at a real Instant
mod tests {
    use super::*;

    fn drain(transaction: &mut ServerTransaction) -> Vec<ServerEvent> {
        std::iter::from_fn(|| transaction.poll_event()).collect()
    }

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|v| Duration::from_millis(*v)).collect()
    }

    fn wire(text: &'static str) -> Bytes {
        Bytes::from_static(text.as_bytes())
    }

    #[test]
    fn timer_g_doubles_to_t2_and_timer_h_fires_at_64_t1() {
        let start = Instant::now();
        let mut invite = ServerTransaction::new(true, false, TimerConfig::default());
        assert!(invite.send_response(start, 100, wire("100")));
        assert!(invite.send_response(start, 486, wire("486")));
        assert_eq!(invite.state(), ServerState::Completed);
        drain(&mut invite);
        let mut sent = Vec::new();
        let mut timed_out = None;
        while let Some(at) = invite.poll_timeout() {
            invite.handle_timeout(at);
            for event in drain(&mut invite) {
                match event {
                    ServerEvent::Transmit(bytes) => {
                        assert_eq!(bytes, wire("486"));
                        sent.push(at - start)
                    }
                    ServerEvent::Timeout => timed_out = Some(at - start),
                    ServerEvent::Terminated => {}
                }
            }
        }
        assert_eq!(
            sent,
            ms(&[500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500])
        );
        assert_eq!(timed_out, Some(Duration::from_secs(32)));
        assert_eq!(invite.state(), ServerState::Terminated);
    }

    #[test]
    fn ack_stops_retransmissions_and_timer_i_is_t4() {
        let start = Instant::now();
        let mut invite = ServerTransaction::new(true, false, TimerConfig::default());
        invite.send_response(start, 487, wire("487"));
        drain(&mut invite);
        assert!(invite.handle_ack(start + Duration::from_millis(200)));
        assert_eq!(invite.state(), ServerState::Confirmed);
        assert_eq!(
            invite.poll_timeout(),
            Some(start + Duration::from_millis(5200))
        );
        // ACK retransmissions are absorbed too.
        assert!(invite.handle_ack(start + Duration::from_millis(300)));
        invite.handle_timeout(start + Duration::from_millis(5200));
        assert_eq!(drain(&mut invite), vec![ServerEvent::Terminated]);
    }

    #[test]
    fn reliable_invite_server_has_no_timer_g_and_zero_timer_i() {
        let start = Instant::now();
        let mut invite = ServerTransaction::new(true, true, TimerConfig::default());
        invite.send_response(start, 603, wire("603"));
        assert_eq!(invite.poll_timeout(), Some(start + Duration::from_secs(32)));
        drain(&mut invite);
        assert!(invite.handle_ack(start));
        assert_eq!(drain(&mut invite), vec![ServerEvent::Terminated]);
    }

    #[test]
    fn invite_retransmission_resends_last_provisional_then_final() {
        let start = Instant::now();
        let mut invite = ServerTransaction::new(true, false, TimerConfig::default());
        invite.handle_request_retransmission();
        assert!(
            drain(&mut invite).is_empty(),
            "nothing sent yet, nothing to resend"
        );
        invite.send_response(start, 180, wire("180"));
        drain(&mut invite);
        invite.handle_request_retransmission();
        assert_eq!(drain(&mut invite), vec![ServerEvent::Transmit(wire("180"))]);
        invite.send_response(start, 404, wire("404"));
        drain(&mut invite);
        invite.handle_request_retransmission();
        assert_eq!(drain(&mut invite), vec![ServerEvent::Transmit(wire("404"))]);
    }

    #[test]
    fn invite_2xx_accepted_absorbs_retransmissions_passes_2xx_until_timer_l() {
        let start = Instant::now();
        let mut invite = ServerTransaction::new(true, false, TimerConfig::default());
        invite.send_response(start, 200, wire("200"));
        assert_eq!(invite.state(), ServerState::Accepted);
        drain(&mut invite);
        invite.handle_request_retransmission();
        assert!(drain(&mut invite).is_empty());
        assert!(invite.send_response(start, 200, wire("200")));
        assert_eq!(drain(&mut invite), vec![ServerEvent::Transmit(wire("200"))]);
        assert!(
            !invite.send_response(start, 486, wire("486")),
            "no final after a 2xx"
        );
        assert!(
            !invite.handle_ack(start),
            "2xx ACKs are not the transaction's"
        );
        assert_eq!(invite.poll_timeout(), Some(start + Duration::from_secs(32)));
        invite.handle_timeout(start + Duration::from_secs(32));
        assert_eq!(drain(&mut invite), vec![ServerEvent::Terminated]);
    }

    #[test]
    fn non_invite_timer_j_is_64_t1_unreliable_and_zero_reliable() {
        let start = Instant::now();
        let mut udp = ServerTransaction::new(false, false, TimerConfig::default());
        assert_eq!(udp.state(), ServerState::Trying);
        udp.handle_request_retransmission();
        assert!(drain(&mut udp).is_empty(), "Trying absorbs retransmissions");
        udp.send_response(start, 200, wire("200"));
        drain(&mut udp);
        udp.handle_request_retransmission();
        assert_eq!(drain(&mut udp), vec![ServerEvent::Transmit(wire("200"))]);
        assert_eq!(udp.poll_timeout(), Some(start + Duration::from_secs(32)));

        let mut tcp = ServerTransaction::new(false, true, TimerConfig::default());
        tcp.send_response(start, 200, wire("200"));
        assert_eq!(
            drain(&mut tcp),
            vec![ServerEvent::Transmit(wire("200")), ServerEvent::Terminated]
        );
    }

    #[test]
    fn custom_t1_scales_every_timer() {
        let timers = TimerConfig {
            t1: Duration::from_millis(100),
            t2: Duration::from_millis(400),
            t4: Duration::from_millis(1000),
            timer_c: Duration::from_secs(180),
        };
        let start = Instant::now();
        let mut invite = ServerTransaction::new(true, false, timers);
        invite.send_response(start, 500, wire("500"));
        drain(&mut invite);
        let mut sent = Vec::new();
        while let Some(at) = invite.poll_timeout() {
            invite.handle_timeout(at);
            if drain(&mut invite)
                .iter()
                .any(|e| matches!(e, ServerEvent::Transmit(_)))
            {
                sent.push(at - start);
            }
        }
        assert_eq!(sent[..5], ms(&[100, 300, 700, 1100, 1500])[..]);
        assert_eq!(*sent.last().unwrap(), Duration::from_millis(6300));
    }
}
