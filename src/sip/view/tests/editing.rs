//! Editing by splices, serialisation, and robustness against any input.

use super::captures::*;
use super::*;

fn text(bytes: &Bytes) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

#[test]
fn unedited_message_serialises_byte_for_byte() {
    for message in [
        INVITE,
        COMPACT_INVITE,
        "SIP/2.0 180  \r\nCall-ID: x\r\n\r\n",
    ] {
        let view = parse(message);
        let out = view.edit().serialize();
        assert_eq!(&out[..], message.as_bytes());
        // No splices: the received buffer itself, not a copy.
        assert_eq!(out.as_ptr(), view.bytes().as_ptr());
    }
}

#[test]
fn pushing_a_via_and_record_route_puts_them_on_top() {
    let view = parse(INVITE);
    let mut edit = view.edit();
    edit.push_header(
        HeaderName::Via,
        "SIP/2.0/UDP proxy.example;branch=z9hG4bKp1",
    )
    .unwrap();
    edit.push_header(HeaderName::RecordRoute, "<sip:proxy.example;lr>")
        .unwrap();
    let out = edit.serialize();
    assert!(text(&out).starts_with(concat!(
        "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n",
        "Via: SIP/2.0/UDP proxy.example;branch=z9hG4bKp1\r\n",
        "Record-Route: <sip:proxy.example;lr>\r\n",
        "Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport\r\n",
    )));
    let again = reparse(&edit);
    assert_eq!(again.top_via().unwrap().branch, Some("z9hG4bKp1"));
    assert_eq!(again.header_values(HeaderName::Via).count(), 2);
    assert_eq!(
        again.header(HeaderName::RecordRoute),
        Some("<sip:proxy.example;lr>")
    );
}

#[test]
fn a_new_via_goes_above_a_compact_one() {
    let view = parse(COMPACT_INVITE);
    let mut edit = view.edit();
    edit.push_header("v", "SIP/2.0/TLS p.example;branch=z9hG4bKnew")
        .unwrap();
    let again = reparse(&edit);
    assert_eq!(
        again.header_values(HeaderName::Via).collect::<Vec<_>>(),
        [
            "SIP/2.0/TLS p.example;branch=z9hG4bKnew",
            "SIP/2.0/TCP 10.0.0.1:5062;branch=z9hG4bKc1",
            "SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKc0"
        ]
    );
    assert!(
        text(&edit.serialize()).contains("\r\nVia: SIP/2.0/TLS p.example;branch=z9hG4bKnew\r\nv: ")
    );
}

#[test]
fn popping_the_top_via_of_a_multi_value_line_keeps_the_rest() {
    let view = parse(COMPACT_INVITE);
    let mut edit = view.edit();
    let popped = edit.remove_first_value(HeaderName::Via).unwrap();
    assert_eq!(popped, "SIP/2.0/TCP 10.0.0.1:5062;branch=z9hG4bKc1");
    let out = edit.serialize();
    assert!(text(&out).contains("\r\nv: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKc0\r\n"));
    let again = reparse(&edit);
    assert_eq!(again.top_via().unwrap().branch, Some("z9hG4bKc0"));
    assert_eq!(again.header_values(HeaderName::Via).count(), 1);

    let proxied = parse(PROXIED_INVITE);
    let mut edit = proxied.edit();
    edit.remove_first_value(HeaderName::Via).unwrap();
    let again = reparse(&edit);
    assert_eq!(
        again.top_via().unwrap().branch,
        Some("z9hG4bK-397430-71846-0")
    );
}

#[test]
fn popping_a_single_value_line_removes_the_line() {
    let view = parse(INVITE);
    let mut edit = view.edit();
    edit.remove_first_value(HeaderName::Via).unwrap();
    let out = edit.serialize();
    assert!(
        text(&out).starts_with("INVITE sip:bob@biloxi.example.com SIP/2.0\r\nMax-Forwards: 70\r\n")
    );
    let again = MessageView::parse(out, true).unwrap();
    assert!(again.top_via().is_err());
    assert_eq!(
        view.edit().remove_first_value("Route").unwrap_err(),
        ViewError::MissingHeader {
            header: "Route".into()
        }
    );
}

#[test]
fn popping_a_folded_via_removes_the_line_break_with_it() {
    let view = parse(concat!(
        "BYE sip:a@b SIP/2.0\r\n",
        "Via: SIP/2.0/UDP one;branch=z9hG4bK1 ,\r\n",
        "\tSIP/2.0/UDP two;branch=z9hG4bK2\r\n",
        "Call-ID: x\r\n",
        "\r\n"
    ));
    let mut edit = view.edit();
    edit.remove_first_value(HeaderName::Via).unwrap();
    assert!(text(&edit.serialize()).contains("\r\nVia: SIP/2.0/UDP two;branch=z9hG4bK2\r\nCall-ID"));
}

#[test]
fn replacing_values_rewrites_only_the_value() {
    let view = parse(INVITE);
    let mut edit = view.edit();
    let (number, _) = view.cseq().unwrap();
    let forwards = view.max_forwards().unwrap().unwrap();
    edit.set_header(HeaderName::CSeq, &format!("{} INVITE", number + 1))
        .unwrap();
    edit.set_header(HeaderName::MaxForwards, &(forwards - 1).to_string())
        .unwrap();
    edit.set_header(HeaderName::Authorization, "Bearer abc")
        .unwrap();
    let out = edit.serialize();
    assert!(text(&out).contains("\r\nMax-Forwards: 69\r\n"));
    assert!(text(&out).ends_with("Content-Length: 4\r\nAuthorization: Bearer abc\r\n\r\nv=0\n"));
    let again = reparse(&edit);
    assert_eq!(again.cseq().unwrap(), (314160, Method::Invite));
    assert_eq!(again.max_forwards().unwrap(), Some(69));
    assert_eq!(again.header("authorization"), Some("Bearer abc"));

    // Replaced where it stands when present.
    let with = parse(&INVITE.replace(
        "Max-Forwards: 70\r\n",
        "Max-Forwards: 70\r\nAuthorization: Bearer old\r\n",
    ));
    let mut edit = with.edit();
    edit.set_header(HeaderName::Authorization, "Bearer new")
        .unwrap();
    assert!(
        text(&edit.serialize()).contains("Max-Forwards: 70\r\nAuthorization: Bearer new\r\nTo:")
    );
}

#[test]
fn replacing_the_request_uri() {
    let view = parse(INVITE);
    let mut edit = view.edit();
    edit.set_request_uri("sip:bob@192.0.2.4:5080;transport=tcp")
        .unwrap();
    let again = reparse(&edit);
    assert_eq!(
        again.request_uri(),
        Some("sip:bob@192.0.2.4:5080;transport=tcp")
    );
    assert_eq!(again.method(), Some(Method::Invite));
    assert_eq!(
        edit.set_request_uri("sip:x y"),
        Err(ViewError::BadRequestUri)
    );
    let response = parse(IPV6_UDP_TRYING);
    assert_eq!(
        response.edit().set_request_uri("sip:a@b"),
        Err(ViewError::NotARequest)
    );
}

#[test]
fn removing_every_instance_of_a_header() {
    let view = parse(concat!(
        "INVITE sip:a@b SIP/2.0\r\n",
        "Proxy-Authorization: Digest username=\"a\", realm=\"one\"\r\n",
        "Call-ID: x\r\n",
        "proxy-authorization: Digest username=\"a\", realm=\"two\"\r\n",
        "\r\n"
    ));
    let mut edit = view.edit();
    assert_eq!(edit.remove_all(HeaderName::ProxyAuthorization).unwrap(), 2);
    assert_eq!(edit.remove_all("X-None").unwrap(), 0);
    assert_eq!(
        &edit.serialize()[..],
        b"INVITE sip:a@b SIP/2.0\r\nCall-ID: x\r\n\r\n"
    );
}

#[test]
fn setting_received_and_rport_on_the_top_via() {
    let view = parse(INVITE);
    let mut edit = view.edit();
    edit.set_top_via_param("received", Some("192.0.2.7"))
        .unwrap();
    edit.set_top_via_param("rport", Some("40000")).unwrap();
    let out = edit.serialize();
    assert!(text(&out).contains(
        "Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport=40000;received=192.0.2.7\r\n"
    ));
    let again = reparse(&edit);
    let via = again.top_via().unwrap();
    assert_eq!(via.received, Some("192.0.2.7"));
    assert_eq!(via.rport, Some(Some("40000")));

    // Only the top value of a multi-value line changes; a sender's received is replaced.
    let proxied = parse(PROXIED_INVITE);
    let mut edit = proxied.edit();
    edit.set_top_via_param("received", Some("fd17:625c:f037:2:a00:27ff:feb9:3519"))
        .unwrap();
    let again = reparse(&edit);
    let vias: Vec<_> = again.header_values(HeaderName::Via).collect();
    assert!(vias[0].ends_with(";received=fd17:625c:f037:2:a00:27ff:feb9:3519"));
    assert_eq!(
        vias[1],
        proxied.header_values(HeaderName::Via).nth(1).unwrap()
    );

    let forged = parse(&INVITE.replace(";rport\r\n", ";received=10.9.9.9;rport\r\n"));
    let mut edit = forged.edit();
    edit.set_top_via_param("received", Some("192.0.2.8"))
        .unwrap();
    assert!(edit.remove_top_via_param("rport").unwrap());
    assert!(!edit.remove_top_via_param("maddr").unwrap());
    assert!(text(&edit.serialize()).contains(";branch=z9hG4bK776asdhds;received=192.0.2.8\r\n"));
    assert_eq!(
        edit.set_top_via_param("bad name", None),
        Err(ViewError::BadParameter)
    );
    assert_eq!(
        edit.set_top_via_param("x", Some("a;b")),
        Err(ViewError::BadParameter)
    );
}

#[test]
fn edits_in_any_order_give_the_same_output() {
    let view = parse(PROXIED_INVITE);
    type Step = fn(&mut Edit<'_>);
    let steps: [Step; 5] = [
        |edit| {
            edit.set_request_uri("sip:08019200028@[2001:db8::4]:25060")
                .unwrap()
        },
        |edit| {
            edit.push_header(HeaderName::Via, "SIP/2.0/UDP [2001:db8::9];branch=z9hG4bKo")
                .unwrap()
        },
        |edit| {
            edit.remove_first_value(HeaderName::Route).unwrap();
        },
        |edit| edit.set_header(HeaderName::MaxForwards, "68").unwrap(),
        |edit| {
            edit.remove_all("P-Served-User").unwrap();
        },
    ];
    let mut outputs = Vec::new();
    for rotation in 0..steps.len() {
        for reverse in [false, true] {
            let mut order: Vec<Step> = steps.to_vec();
            order.rotate_left(rotation);
            if reverse {
                order.reverse();
            }
            let mut edit = view.edit();
            for step in order {
                step(&mut edit);
            }
            outputs.push(edit.serialize());
        }
    }
    assert!(outputs.windows(2).all(|pair| pair[0] == pair[1]));
    let again = MessageView::parse(outputs[0].clone(), false).unwrap();
    assert_eq!(again.max_forwards().unwrap(), Some(68));
    assert_eq!(again.header("P-Served-User"), None);
    assert_eq!(again.header_values(HeaderName::Via).count(), 3);
    assert_eq!(again.header_values(HeaderName::Route).count(), 1);
    assert_eq!(
        again.request_uri(),
        Some("sip:08019200028@[2001:db8::4]:25060")
    );
    assert_eq!(again.body(), view.body());
}

#[test]
fn overlapping_edits_are_an_error_not_a_panic() {
    let view = parse(COMPACT_INVITE);
    let mut edit = view.edit();
    edit.remove_first_value(HeaderName::Via).unwrap();
    assert!(matches!(
        edit.remove_first_value(HeaderName::Via),
        Err(ViewError::OverlappingEdits { .. })
    ));
    assert!(matches!(
        edit.set_top_via_param("received", Some("192.0.2.1")),
        Err(ViewError::OverlappingEdits { .. })
    ));
    edit.set_header(HeaderName::CSeq, "8 INVITE").unwrap();
    assert!(matches!(
        edit.set_header(HeaderName::CSeq, "9 INVITE"),
        Err(ViewError::OverlappingEdits { .. })
    ));
    // A failed call leaves the earlier splices as they were.
    let again = reparse(&edit);
    assert_eq!(again.cseq().unwrap(), (8, Method::Invite));
    assert_eq!(again.header_values(HeaderName::Via).count(), 1);
    // Touching splices are fine: a new Via where the old one is removed.
    let mut edit = view.edit();
    edit.remove_all(HeaderName::Via).unwrap();
    edit.push_header(HeaderName::Via, "SIP/2.0/UDP p;branch=z9hG4bKq")
        .unwrap();
    assert_eq!(reparse(&edit).top_via().unwrap().branch, Some("z9hG4bKq"));
}

#[test]
fn content_length_is_decided_when_serialising() {
    let view = parse(INVITE);
    // Asked for before the only Content-Length line is removed: still written.
    let mut edit = view.edit();
    edit.ensure_content_length();
    assert!(edit.is_empty());
    edit.remove_all("l").unwrap();
    let out = edit.serialize();
    assert!(text(&out).ends_with("Content-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=0\n"));
    assert_eq!(
        MessageView::parse(out, false).unwrap().content_length(),
        Some(4)
    );
    // A line the caller wrote is not doubled.
    let datagram = parse("MESSAGE sip:a@b SIP/2.0\r\nCall-ID: x\r\n\r\nhello");
    let mut edit = datagram.edit();
    edit.ensure_content_length();
    assert!(!edit.is_empty());
    edit.append_header("l", "5").unwrap();
    assert_eq!(
        &edit.serialize()[..],
        b"MESSAGE sip:a@b SIP/2.0\r\nCall-ID: x\r\nContent-Length: 5\r\n\r\nhello"
    );
}

#[test]
fn injected_line_breaks_are_refused() {
    let view = parse(INVITE);
    let mut edit = view.edit();
    assert_eq!(
        edit.append_header("X-Evil", "a\r\nVia: forged"),
        Err(ViewError::LineBreakInValue)
    );
    assert_eq!(
        edit.set_header("Subject", "x\ny"),
        Err(ViewError::LineBreakInValue)
    );
    assert_eq!(
        edit.append_header("Bad Name", "x"),
        Err(ViewError::BadNewHeaderName)
    );
    assert!(edit.is_empty());
}

#[test]
fn unknown_headers_and_spellings_pass_through_edits() {
    let view = parse(COMPACT_INVITE);
    let mut edit = view.edit();
    edit.set_header(HeaderName::CSeq, "8 INVITE").unwrap();
    edit.insert_header_at_top("X-First", "1").unwrap();
    let out = edit.serialize();
    let expected = COMPACT_INVITE
        .replace("CSeq: 7 INVITE", "CSeq: 8 INVITE")
        .replacen("\r\nv: ", "\r\nX-First: 1\r\nv: ", 1);
    assert_eq!(text(&out), expected);
    assert_eq!(out.len(), edit.serialize().len());
}

/// A xorshift generator: the same sequence on every run.
struct Sequence(u64);

impl Sequence {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Reads everything and tries every edit on a message that parsed; none may panic.
fn exercise(bytes: &[u8]) {
    for datagram in [true, false] {
        let Ok(view) = MessageView::parse(Bytes::copy_from_slice(bytes), datagram) else {
            continue;
        };
        let _ = (
            view.method(),
            view.request_uri(),
            view.status(),
            view.reason(),
        );
        let _ = (view.call_id(), view.cseq(), view.from_tag(), view.to_tag());
        let _ = (view.max_forwards(), view.top_via(), view.body());
        for field in view.headers() {
            let _ = field.value.len();
        }
        for value in view.header_values(HeaderName::Via) {
            let _ = ViaView::parse(value);
        }
        if let Some(uri) = view.request_uri() {
            let _ = UriView::parse(uri);
        }
        let mut edit = view.edit();
        // Results ignored: only the absence of panics is under test here.
        let _ = edit.remove_first_value(HeaderName::Via);
        let _ = edit.push_header(HeaderName::Via, "SIP/2.0/UDP p;branch=z9hG4bKf");
        let _ = edit.set_top_via_param("rport", Some("1"));
        let _ = edit.set_header(HeaderName::MaxForwards, "1");
        let _ = edit.remove_first_value(HeaderName::Route);
        let _ = edit.set_request_uri("sip:x");
        edit.ensure_content_length();
        let out = edit.serialize();
        let _ = MessageView::parse(out, false);
    }
}

#[test]
fn truncations_and_byte_flips_never_panic() {
    let original = PROXIED_INVITE.as_bytes();
    for length in 0..=original.len() {
        exercise(&original[..length]);
    }
    let replacements = [
        0x00, b':', b' ', b'\t', b'\r', b'\n', b',', b';', b'"', b'<', b'>', b'[', b']', 0xff, 0xc3,
    ];
    let mut mutated = original.to_vec();
    for position in 0..original.len() {
        for replacement in replacements {
            mutated[position] = replacement;
            exercise(&mutated);
        }
        mutated[position] = original[position];
    }
    let mut sequence = Sequence(0x9e37_79b9_7f4a_7c15);
    for _ in 0..2000 {
        let mut mutated = IPV6_UDP_INVITE.as_bytes().to_vec();
        for _ in 0..1 + sequence.next() % 6 {
            let position = (sequence.next() % mutated.len() as u64) as usize;
            mutated[position] = (sequence.next() & 0xff) as u8;
        }
        let cut = (sequence.next() % (mutated.len() as u64 + 1)) as usize;
        if sequence.next() % 4 == 0 {
            mutated.truncate(cut);
        }
        exercise(&mutated);
    }
}
