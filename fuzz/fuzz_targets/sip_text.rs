//! Any bytes as a captured SIP message: parsing never panics, and what parses survives
//! encoding: the re-encoded message parses to the same start line, headers and body.
#![no_main]

use byoc_sidecar::replay::text::SipText;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(message) = SipText::parse(data) else {
        return;
    };
    let again = SipText::parse(&message.encode()).expect("an encoded message parses");
    assert_eq!(again.start, message.start);
    assert_eq!(again.body, message.body);
    let without_length = |text: &SipText| -> Vec<(String, String)> {
        text.headers
            .iter()
            .filter(|(name, _)| !byoc_sidecar::replay::text::is_named(name, "Content-Length"))
            .cloned()
            .collect()
    };
    assert_eq!(without_length(&again), without_length(&message));
});
