//! The calls in progress through the proxy, known by Call-ID: one starts when a 2xx to
//! an initial INVITE is relayed, and ends with the final answer to its BYE (or after
//! `max_age` without one, so a lost BYE cannot hold an entry for ever). Graceful shutdown
//! waits for them, and the metrics count them. Pure: time comes in as an argument.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Calls {
    started: HashMap<String, Instant>,
    capacity: usize,
    max_age: Duration,
}

impl Calls {
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        Self {
            started: HashMap::new(),
            capacity,
            max_age,
        }
    }

    /// Call `call_id` was answered 2xx at `now`. Beyond the capacity it is not tracked
    /// (shutdown then waits for it only by its transactions).
    pub fn answered(&mut self, now: Instant, call_id: &str) {
        if self.started.len() < self.capacity || self.started.contains_key(call_id) {
            self.started.entry(call_id.to_string()).or_insert(now);
        }
    }

    /// Call `call_id` ended (its BYE was answered).
    pub fn ended(&mut self, call_id: &str) {
        self.started.remove(call_id);
    }

    /// Forgets calls older than `max_age`.
    pub fn expire(&mut self, now: Instant) {
        let max_age = self.max_age;
        self.started
            .retain(|_, started| now.saturating_duration_since(*started) < max_age);
    }

    pub fn len(&self) -> usize {
        self.started.len()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start their virtual clock at a real Instant
mod tests {
    use super::*;

    #[test]
    fn a_call_lasts_from_its_answer_to_its_bye_or_its_maximum_age() {
        let start = Instant::now();
        let mut calls = Calls::new(2, Duration::from_secs(60));
        calls.answered(start, "a");
        calls.answered(start, "a"); // a 2xx retransmission
        calls.answered(start + Duration::from_secs(30), "b");
        calls.answered(start, "c"); // beyond the capacity
        assert_eq!(calls.len(), 2);
        calls.ended("a");
        assert_eq!(calls.len(), 1);
        calls.expire(start + Duration::from_secs(89));
        assert_eq!(calls.len(), 1);
        calls.expire(start + Duration::from_secs(90));
        assert_eq!(calls.len(), 0);
    }
}
