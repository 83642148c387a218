use super::*;

fn settings() -> RegistrationSettings {
    RegistrationSettings {
        aor: "sip:trunk@core.test".into(),
        registrar: "sip:core.test".into(),
        expires: Duration::from_secs(300),
        margin: Duration::from_secs(10),
        reregister_on_refresh: true,
        contact_user: "trunk".into(),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
    }
}

fn secs(value: u64) -> Duration {
    Duration::from_secs(value)
}

fn rejected(status: u16) -> Failure {
    Failure::Rejected {
        status,
        reason: "Service Unavailable".into(),
    }
}

#[test]
fn registers_at_once_and_refreshes_from_the_granted_expiry() {
    let start = Instant::now();
    let mut registration = Registration::new(settings(), start, 1);
    let (send, notice) = registration.poll(start);
    assert_eq!(
        send,
        Some(Send {
            cseq: 1,
            expires: secs(300)
        })
    );
    assert_eq!(
        notice.state_changed,
        Some((State::Unregistered, State::Registering))
    );
    assert_eq!(registration.poll(start).0, None, "never two in flight");
    // The registrar grants 60 s, not 300: refresh at min(60 - 10, 0.8 * 60) = 48 s after
    // the REGISTER was sent, even though the answer came 2 s later.
    registration.succeeded(start + secs(2), Some(secs(60)));
    assert_eq!(registration.state(), State::Registered);
    assert_eq!(registration.valid_until(), Some(start + secs(60)));
    assert_eq!(registration.next_at(), Some(start + secs(48)));
    assert_eq!(registration.poll(start + secs(47)).0, None);
    let (send, notice) = registration.poll(start + secs(48));
    assert_eq!(
        send,
        Some(Send {
            cseq: 2,
            expires: secs(300)
        })
    );
    assert_eq!(
        notice.state_changed,
        Some((State::Registered, State::Refreshing))
    );
    // A registrar may shorten, not lengthen (§10.3): 3600 granted for 300 asked counts
    // as 300, refreshed at min(290, 240). An absurd value cannot overflow anything.
    registration.succeeded(start + secs(48), Some(secs(3600)));
    assert_eq!(registration.valid_until(), Some(start + secs(48 + 300)));
    assert_eq!(registration.next_at(), Some(start + secs(48 + 240)));
    registration.poll(start + secs(48 + 240));
    registration.succeeded(start + secs(48 + 240), Some(Duration::MAX));
    assert_eq!(registration.next_at(), Some(start + secs(48 + 240 + 240)));
    // Without a granted value the requested one stands.
    registration.poll(start + secs(528));
    registration.succeeded(start + secs(528), None);
    assert_eq!(registration.next_at(), Some(start + secs(528 + 240)));
}

#[test]
fn a_resend_for_credentials_takes_the_next_cseq_and_the_same_expiry() {
    let start = Instant::now();
    let mut registration = Registration::new(settings(), start, 7);
    assert_eq!(registration.poll(start).0.map(|send| send.cseq), Some(7));
    assert_eq!(
        registration.resend(start),
        Some(Send {
            cseq: 8,
            expires: secs(300)
        })
    );
    registration.succeeded(start, Some(secs(300)));
    assert_eq!(registration.resend(start), None, "nothing in flight");
    assert_eq!(registration.cseq(), 8);
}

#[test]
fn interval_too_brief_raises_the_request_to_min_expires() {
    let start = Instant::now();
    let mut registration = Registration::new(settings(), start, 1);
    registration.poll(start);
    registration.interval_too_brief(start, Some(secs(600)));
    assert_eq!(registration.requested(), secs(600));
    let (send, _) = registration.poll(start);
    assert_eq!(
        send,
        Some(Send {
            cseq: 2,
            expires: secs(600)
        })
    );
    // A 423 that asks for nothing larger is a failure: back off, do not loop.
    registration.interval_too_brief(start, Some(secs(600)));
    assert_eq!(registration.state(), State::BackingOff);
    assert!(registration.next_at().unwrap() >= start + Duration::from_millis(500));
}

#[test]
fn failures_back_off_exponentially_with_jitter_and_never_stop() {
    let start = Instant::now();
    let mut registration = Registration::new(settings(), start, 1);
    let mut now = start;
    let mut delays = Vec::new();
    for attempt in 0..100u32 {
        let (send, _) = registration.poll(now);
        assert!(send.is_some(), "attempt {attempt} is sent");
        let jitter = f64::from(attempt % 10) / 10.0;
        registration.failed(now, rejected(503), None, jitter);
        let next = registration.next_at().expect("never disabled");
        delays.push(next - now);
        now = next;
    }
    // Ceilings 1, 2, 4, 8, 16, 32, 60, 60 ...: each delay within [ceiling/2, ceiling].
    for (index, delay) in delays.iter().enumerate() {
        let ceiling = secs(1u64 << index.min(6)).min(secs(60));
        assert!(
            *delay >= ceiling / 2 && *delay <= ceiling,
            "failure {}: {delay:?} outside {:?}..={ceiling:?}",
            index + 1,
            ceiling / 2
        );
    }
    assert_eq!(registration.consecutive_failures(), 100);
    assert_eq!(registration.state(), State::BackingOff);
    // A success resets the count.
    registration.poll(now);
    registration.succeeded(now, Some(secs(300)));
    assert_eq!(registration.consecutive_failures(), 0);
}

#[test]
fn while_the_binding_is_valid_retries_come_before_it_lapses() {
    let start = Instant::now();
    let mut registration = Registration::new(settings(), start, 1);
    registration.poll(start);
    registration.succeeded(start, Some(secs(60)));
    let refresh = registration.next_at().unwrap();
    registration.poll(refresh);
    // Failures would back off up to 60 s; the binding ends 12 s after the refresh, so
    // each retry comes at most halfway there, but never sooner than backoff_initial
    // (1 s) after the last: no burst at the very end.
    let end = start + secs(60);
    let mut attempts = 0;
    let mut now = refresh;
    while now < end {
        registration.poll(now);
        registration.failed(now, Failure::NoAnswer, None, 0.99);
        let next = registration.next_at().unwrap();
        assert!(
            next <= now + ((end - now) / 2).max(secs(1)),
            "{:?}",
            next - now
        );
        assert!(next - now >= Duration::from_millis(500), "{:?}", next - now);
        attempts += 1;
        now = next;
    }
    assert!(attempts <= 8, "{attempts} attempts in the last 12 s");
}

#[test]
fn retry_after_is_honoured_up_to_backoff_max() {
    let start = Instant::now();
    let mut registration = Registration::new(settings(), start, 1);
    registration.poll(start);
    registration.failed(start, rejected(503), Some(secs(30)), 0.0);
    assert_eq!(registration.next_at(), Some(start + secs(30)));
    registration.poll(start + secs(30));
    registration.failed(start + secs(30), rejected(503), Some(secs(3600)), 0.0);
    assert_eq!(registration.next_at(), Some(start + secs(30 + 60)));
}

#[test]
fn interval_too_brief_is_bounded_and_never_applies_to_an_unregister() {
    let start = Instant::now();
    let mut registration = Registration::new(settings(), start, 1);
    for min in [400, 500, 600] {
        registration.poll(start);
        registration.interval_too_brief(start, Some(secs(min)));
        assert_eq!(registration.requested(), secs(min));
    }
    // A fourth raise in a row, or one beyond a day, is a failure with a backoff.
    registration.poll(start);
    registration.interval_too_brief(start, Some(secs(700)));
    assert_eq!(registration.state(), State::BackingOff);
    let now = registration.next_at().unwrap();
    registration.poll(now);
    registration.interval_too_brief(now, Some(secs(100_000)));
    assert_eq!(registration.requested(), secs(600));
    assert_eq!(registration.state(), State::BackingOff);
    // An unregister answered 423 ends the registration.
    let now = registration.next_at().unwrap();
    registration.poll(now);
    registration.succeeded(now, Some(secs(600)));
    registration.shut_down(now);
    registration.poll(now);
    registration.interval_too_brief(now, Some(secs(900)));
    assert_eq!(registration.state(), State::Stopped);
}

#[test]
fn a_repeated_failure_is_reported_once() {
    let start = Instant::now();
    let mut registration = Registration::new(settings(), start, 1);
    registration.poll(start);
    let first = registration.failed(start, rejected(503), None, 0.0);
    assert_eq!(
        first.new_failure.as_deref(),
        Some("503 Service Unavailable")
    );
    assert_eq!(
        first.state_changed,
        Some((State::Registering, State::BackingOff))
    );
    let now = registration.next_at().unwrap();
    registration.poll(now);
    let second = registration.failed(now, rejected(503), None, 0.0);
    assert_eq!(second.new_failure, None);
    let now = registration.next_at().unwrap();
    registration.poll(now);
    let third = registration.failed(now, Failure::NoAnswer, None, 0.0);
    assert!(third.new_failure.unwrap().contains("no answer"));
}

#[test]
fn a_credential_change_reregisters_at_once_or_right_after_the_register_in_flight() {
    let start = Instant::now();
    let mut registration = Registration::new(settings(), start, 1);
    registration.poll(start);
    registration.succeeded(start, Some(secs(300)));
    registration.credentials_changed(start + secs(5));
    assert_eq!(registration.next_at(), Some(start + secs(5)));
    let (send, _) = registration.poll(start + secs(5));
    assert_eq!(send.map(|send| send.cseq), Some(2));
    // A swap while that REGISTER is out: one more right after it.
    registration.credentials_changed(start + secs(6));
    assert_eq!(registration.poll(start + secs(6)).0, None);
    registration.succeeded(start + secs(7), Some(secs(300)));
    assert_eq!(registration.next_at(), Some(start + secs(7)));
    assert_eq!(
        registration.poll(start + secs(7)).0.map(|send| send.cseq),
        Some(3)
    );
    // Switched off, a change waits for the refresh.
    let mut quiet = Registration::new(
        RegistrationSettings {
            reregister_on_refresh: false,
            ..settings()
        },
        start,
        1,
    );
    quiet.poll(start);
    quiet.succeeded(start, Some(secs(300)));
    quiet.credentials_changed(start + secs(5));
    assert_eq!(quiet.next_at(), Some(start + secs(240)));
}

#[test]
fn shutdown_unregisters_an_existing_binding_only() {
    let start = Instant::now();
    let mut registration = Registration::new(settings(), start, 1);
    registration.poll(start);
    registration.succeeded(start, Some(secs(300)));
    let (will_send, _) = registration.shut_down(start + secs(10));
    assert!(will_send);
    let (send, notice) = registration.poll(start + secs(10));
    assert_eq!(
        send,
        Some(Send {
            cseq: 2,
            expires: Duration::ZERO
        })
    );
    assert_eq!(
        notice.state_changed,
        Some((State::Registered, State::Unregistering))
    );
    registration.succeeded(start + secs(10), Some(Duration::ZERO));
    assert_eq!(registration.state(), State::Stopped);
    assert_eq!(registration.next_at(), None);
    registration.credentials_changed(start + secs(11));
    assert_eq!(registration.next_at(), None, "stopped stays stopped");

    // Never registered: nothing to unregister.
    let mut fresh = Registration::new(settings(), start, 1);
    assert!(!fresh.shut_down(start).0);
    assert_eq!(fresh.state(), State::Stopped);
    assert_eq!(fresh.poll(start).0, None);

    // A REGISTER out at shutdown that succeeds leaves a binding: it is unregistered.
    let mut busy = Registration::new(settings(), start, 1);
    busy.poll(start);
    assert!(busy.shut_down(start).0);
    busy.succeeded(start + secs(1), Some(secs(300)));
    assert_eq!(
        busy.poll(start + secs(1)).0,
        Some(Send {
            cseq: 2,
            expires: Duration::ZERO
        })
    );
    // If the unregister gets no answer, the binding lapses by itself.
    busy.failed(start + secs(2), Failure::NoAnswer, None, 0.0);
    assert_eq!(busy.state(), State::Stopped);

    // A REGISTER out at shutdown that fails with no binding before: done.
    let mut failing = Registration::new(settings(), start, 1);
    failing.poll(start);
    failing.shut_down(start);
    failing.failed(start, rejected(503), None, 0.0);
    assert_eq!(failing.state(), State::Stopped);
}
