//! Any bytes as a capture file: reading, extraction, dialogues and the listing must
//! never panic. Seed it with pcap-fixtures/ and ../shared/captures/.
#![no_main]

use byoc_sidecar::replay::capture::Capture;
use byoc_sidecar::replay::extract::{extract, Filter};
use byoc_sidecar::replay::report::Listing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(capture) = Capture::from_bytes(data.to_vec()) else {
        return;
    };
    let extraction = extract(&capture, &Filter::default());
    let listing = Listing::new(&extraction, &Filter::default());
    let _ = listing.to_text();
});
