//! Reading: start lines, headers, bodies, accessors and errors.

use super::*;

#[test]
fn request_line_and_headers_are_read_without_copying() {
    let view = parse(INVITE);
    assert!(view.is_request());
    assert_eq!(view.method(), Some(Method::Invite));
    assert_eq!(view.request_uri(), Some("sip:bob@biloxi.example.com"));
    assert_eq!(view.status(), None);
    assert_eq!(view.reason(), None);
    assert_eq!(
        view.call_id().unwrap(),
        "a84b4c76e66710@pc33.atlanta.example.com"
    );
    assert_eq!(view.cseq().unwrap(), (314159, Method::Invite));
    assert_eq!(view.from_tag().unwrap(), Some("1928301774"));
    assert_eq!(view.to_tag().unwrap(), None);
    assert_eq!(view.max_forwards().unwrap(), Some(70));
    assert_eq!(view.header("x-custom-thing"), Some("keep  me"));
    assert_eq!(view.content_length(), Some(4));
    // The body shares the received buffer.
    let body = view.body();
    assert_eq!(&body[..], b"v=0\n");
    assert_eq!(
        body.as_ptr(),
        view.bytes()[view.bytes().len() - 4..].as_ptr()
    );
    let range = view.header_range();
    assert!(view.bytes()[range.clone()].starts_with(b"Via: "));
    assert!(view.bytes()[range].ends_with(b"Content-Length: 4\r\n"));
}

#[test]
fn status_line_keeps_the_reason_phrase_as_received() {
    let view = parse("SIP/2.0 403 Token expired, try again\r\nCall-ID: x\r\n\r\n");
    assert_eq!(view.status(), Some(403));
    assert_eq!(view.reason(), Some("Token expired, try again"));
    assert_eq!(view.method(), None);
    let empty = parse("SIP/2.0 180\r\nCall-ID: x\r\n\r\n");
    assert_eq!(empty.status(), Some(180));
    assert_eq!(empty.reason(), Some(""));
    let trailing = parse("SIP/2.0 486 \r\nCall-ID: x\r\n\r\n");
    assert_eq!(trailing.reason(), Some(""));
}

#[test]
fn compact_headers_fold_to_full_names() {
    let view = parse(COMPACT_INVITE);
    assert_eq!(view.call_id().unwrap(), "compact-call@10.0.0.1");
    assert_eq!(view.from_tag().unwrap(), Some("99"));
    assert_eq!(
        view.header(HeaderName::Contact),
        Some("<sip:alice@10.0.0.1:5062>")
    );
    assert_eq!(
        view.header(HeaderName::ContentType),
        Some("application/sdp")
    );
    assert_eq!(view.content_length(), Some(4));
    assert_eq!(
        view.header("Refer-To"),
        Some("<sip:carol@chicago.example.com>")
    );
    assert_eq!(view.header("r"), Some("<sip:carol@chicago.example.com>"));
    assert_eq!(
        view.header_values(HeaderName::Supported)
            .collect::<Vec<_>>(),
        ["100rel", "timer"]
    );
    assert_eq!(view.top_via().unwrap().branch, Some("z9hG4bKc1"));
    let spellings: Vec<_> = view.headers().map(|field| field.spelling).collect();
    assert_eq!(spellings[..3], ["v", "i", "f"]);
    assert_eq!(view.headers().next().unwrap().name, HeaderName::Via);
    for (short, full) in COMPACT_FORMS {
        assert_eq!(
            Lookup::from(short.to_string().as_str()),
            Lookup::from(*full)
        );
    }
}

#[test]
fn header_names_compare_case_insensitively() {
    let view = parse(concat!(
        "OPTIONS sip:a@b SIP/2.0\r\n",
        "CALL-id: upper\r\n",
        "x-Trace :  1\r\n",
        "max-forwards: 3\r\n",
        "\r\n"
    ));
    assert_eq!(view.call_id().unwrap(), "upper");
    assert_eq!(view.header("X-TRACE"), Some("1"));
    assert_eq!(view.header("call-ID"), Some("upper"));
    assert_eq!(view.max_forwards().unwrap(), Some(3));
    assert_eq!(view.header("X-Trace-Other"), None);
    assert_eq!(view.header(HeaderName::Other), None);
}

#[test]
fn unknown_method_is_an_extension_and_round_trips() {
    let text = "FROBNICATE sip:a@b SIP/2.0\r\nCSeq: 2 FROBNICATE\r\nCall-ID: x\r\n\r\n";
    let view = parse(text);
    assert_eq!(view.method(), Some(Method::Extension("FROBNICATE")));
    assert_eq!(view.cseq().unwrap(), (2, Method::Extension("FROBNICATE")));
    assert_eq!(view.method().unwrap().to_string(), "FROBNICATE");
    assert_eq!(&view.edit().serialize()[..], text.as_bytes());
}

#[test]
fn methods_are_case_sensitive_tokens() {
    assert_eq!(Method::parse("invite"), Some(Method::Extension("invite")));
    assert_eq!(Method::parse("PRACK"), Some(Method::Prack));
    assert_eq!(Method::parse("NOT A TOKEN"), None);
    assert_eq!(Method::parse(""), None);
    assert_eq!(Method::Publish.as_str(), "PUBLISH");
    assert_eq!(
        parse_error(b"IN(VITE sip:a@b SIP/2.0\r\n\r\n", true),
        ViewError::BadMethod
    );
}

#[test]
fn bare_lf_line_ends_are_accepted() {
    let text = "BYE sip:a@b SIP/2.0\nCall-ID: lf\nCSeq: 3 BYE\n\n";
    let view = parse(text);
    assert_eq!(view.call_id().unwrap(), "lf");
    assert_eq!(view.cseq().unwrap(), (3, Method::Bye));
    assert!(view.body().is_empty());
}

#[test]
fn folded_header_continues_the_previous_value() {
    let text = concat!(
        "INVITE sip:a@b SIP/2.0\r\n",
        "Via: SIP/2.0/UDP first.example;branch=z9hG4bK1,\r\n",
        "  SIP/2.0/UDP second.example;branch=z9hG4bK2\r\n",
        "Subject:\r\n",
        "\tlate start\r\n",
        "Call-ID: x\r\n",
        "\r\n"
    );
    let view = parse(text);
    let vias: Vec<_> = view.header_values(HeaderName::Via).collect();
    assert_eq!(vias.len(), 2);
    assert_eq!(vias[1], "SIP/2.0/UDP second.example;branch=z9hG4bK2");
    assert_eq!(view.header("Subject"), Some("late start"));
    assert_eq!(view.headers().count(), 3);
    assert_eq!(
        parse_error(b"BYE sip:a@b SIP/2.0\r\n continued\r\n\r\n", true),
        ViewError::FoldWithoutHeader { line: 2 }
    );
}

#[test]
fn header_values_split_lists_outside_quotes_and_brackets() {
    let view = parse(concat!(
        "REGISTER sip:r SIP/2.0\r\n",
        "Contact: \"Doe, John\" <sip:j@x;a=1,2>, <sip:k@y>\r\n",
        "Contact: \"a\\\",\" <sip:a@b>\r\n",
        "Route: <sip:p1;lr>,<sip:p2;lr>\r\n",
        "Route: <sip:p3;lr>\r\n",
        "\r\n"
    ));
    assert_eq!(
        view.header_values(HeaderName::Contact).collect::<Vec<_>>(),
        [
            "\"Doe, John\" <sip:j@x;a=1,2>",
            "<sip:k@y>",
            "\"a\\\",\" <sip:a@b>"
        ]
    );
    assert_eq!(
        view.header_values("route").collect::<Vec<_>>(),
        ["<sip:p1;lr>", "<sip:p2;lr>", "<sip:p3;lr>"]
    );
    assert_eq!(
        name_addr_parts("\"Bob\" <sip:bob@h;lr>;tag=9"),
        ("sip:bob@h;lr", ";tag=9")
    );
    assert_eq!(
        name_addr_parts("sip:alice@h;tag=1"),
        ("sip:alice@h", ";tag=1")
    );
}

#[test]
fn credential_headers_are_not_split_at_commas() {
    let view = parse(concat!(
        "INVITE sip:a@b SIP/2.0\r\n",
        "Proxy-Authorization: Digest username=\"a\", realm=\"r\", nonce=\"n\"\r\n",
        "Proxy-Authorization: Bearer token\r\n",
        "\r\n"
    ));
    assert_eq!(
        view.header_values(HeaderName::ProxyAuthorization)
            .collect::<Vec<_>>(),
        [
            "Digest username=\"a\", realm=\"r\", nonce=\"n\"",
            "Bearer token"
        ]
    );
}

#[test]
fn datagram_body_longer_than_content_length_is_cut_to_it() {
    let mut text = INVITE.as_bytes().to_vec();
    text.extend_from_slice(b"trailing junk");
    let view = MessageView::parse(Bytes::from(text), true).unwrap();
    assert_eq!(&view.body()[..], b"v=0\n");
    assert_eq!(&view.edit().serialize()[..], INVITE.as_bytes());
}

#[test]
fn body_shorter_than_content_length_is_an_error_naming_both() {
    let text = INVITE.replace("Content-Length: 4", "Content-Length: 10");
    for datagram in [true, false] {
        assert_eq!(
            parse_error(text.as_bytes(), datagram),
            ViewError::BodyTooShort {
                declared: 10,
                available: 4
            }
        );
    }
}

#[test]
fn stream_message_must_be_framed_at_content_length() {
    let mut text = INVITE.as_bytes().to_vec();
    text.push(b'x');
    assert_eq!(
        parse_error(&text, false),
        ViewError::BodyTooLong {
            declared: 4,
            available: 5
        }
    );
    let without = "SIP/2.0 200 OK\r\nCall-ID: x\r\n\r\n";
    assert_eq!(
        parse_error(without.as_bytes(), false),
        ViewError::MissingHeader {
            header: "Content-Length".into()
        }
    );
    assert!(MessageView::parse(Bytes::from_static(INVITE.as_bytes()), false).is_ok());
}

#[test]
fn datagram_without_content_length_takes_the_rest() {
    let view = parse("MESSAGE sip:a@b SIP/2.0\r\nCall-ID: x\r\n\r\nhello");
    assert_eq!(view.content_length(), None);
    assert_eq!(&view.body()[..], b"hello");
}

#[test]
fn content_length_must_be_a_number_and_agree_with_itself() {
    let text = INVITE.replace("Content-Length: 4", "Content-Length: four");
    assert_eq!(
        parse_error(text.as_bytes(), true),
        ViewError::BadContentLength { line: 11 }
    );
    let text = INVITE.replace("Content-Length: 4\r\n", "Content-Length: 4\r\nl: 3\r\n");
    assert_eq!(
        parse_error(text.as_bytes(), true),
        ViewError::ConflictingContentLength { line: 12 }
    );
}

#[test]
fn header_line_without_colon_is_an_error_naming_the_line() {
    let text = INVITE.replace("Max-Forwards: 70", "Max-Forwards 70");
    assert_eq!(
        parse_error(text.as_bytes(), true),
        ViewError::HeaderWithoutColon { line: 3 }
    );
    let text = INVITE.replace("Max-Forwards: 70", "Max Forwards: 70");
    assert_eq!(
        parse_error(text.as_bytes(), true),
        ViewError::BadHeaderName { line: 3 }
    );
}

#[test]
fn start_line_errors_are_named() {
    assert_eq!(parse_error(b"", true), ViewError::NoStartLine);
    assert_eq!(parse_error(b"\r\n\r\n", true), ViewError::NoStartLine);
    assert_eq!(
        parse_error(b"INVITE\r\n\r\n", true),
        ViewError::BadStartLine
    );
    assert_eq!(
        parse_error(b"INVITE sip:a@b SIP/2.0 extra\r\n\r\n", true),
        ViewError::BadStartLine
    );
    assert_eq!(
        parse_error(b"SIP/2.0 abc Nope\r\n\r\n", true),
        ViewError::BadStatusCode
    );
    assert_eq!(
        parse_error(b"SIP/2.0 099 Low\r\n\r\n", true),
        ViewError::BadStatusCode
    );
    assert_eq!(
        parse_error(b"SIP/2.0 2000 Long\r\n\r\n", true),
        ViewError::BadStatusCode
    );
    assert_eq!(
        parse_error(b"GET / HTTP/1.1\r\n\r\n", true),
        ViewError::UnsupportedVersion
    );
    assert_eq!(
        parse_error(b"SIP/3.0 200 OK\r\n\r\n", true),
        ViewError::UnsupportedVersion
    );
    assert_eq!(
        parse_error(b"OPTIONS sip:a@b SIP/2.0\r\nCall-ID: x\r\n", true),
        ViewError::UnterminatedHeaders
    );
}

#[test]
fn empty_lines_before_the_start_line_are_skipped() {
    let view = parse(&format!("\r\n\r\n{INVITE}"));
    assert_eq!(view.method(), Some(Method::Invite));
    assert_eq!(&view.bytes()[..], INVITE.as_bytes());
}

#[test]
fn header_lines_must_be_utf8_but_the_body_need_not() {
    let mut text = b"MESSAGE sip:a@b SIP/2.0\r\nSubject: caf\xe9\r\n\r\n".to_vec();
    assert_eq!(parse_error(&text, true), ViewError::NotUtf8 { line: 2 });
    text = b"MESSAGE sip:a@b SIP/2.0\r\nCall-ID: x\r\nl: 3\r\n\r\n\xff\x00\x80".to_vec();
    let view = MessageView::parse(Bytes::from(text), true).unwrap();
    assert_eq!(&view.body()[..], [0xff, 0x00, 0x80]);
}

#[test]
fn accessors_name_missing_and_malformed_headers() {
    let view = parse("OPTIONS sip:a@b SIP/2.0\r\nCSeq: x OPTIONS\r\nMax-Forwards: -1\r\n\r\n");
    assert_eq!(
        view.call_id().unwrap_err(),
        ViewError::MissingHeader {
            header: "Call-ID".into()
        }
    );
    assert_eq!(view.cseq().unwrap_err(), ViewError::BadCSeq { line: 2 });
    assert_eq!(
        view.max_forwards().unwrap_err(),
        ViewError::BadMaxForwards { line: 3 }
    );
    assert!(matches!(
        view.from_tag(),
        Err(ViewError::MissingHeader { .. })
    ));
    assert!(matches!(
        view.top_via(),
        Err(ViewError::MissingHeader { .. })
    ));
    let overflow = parse("OPTIONS sip:a@b SIP/2.0\r\nCSeq: 4294967296 OPTIONS\r\n\r\n");
    assert_eq!(overflow.cseq().unwrap_err(), ViewError::BadCSeq { line: 2 });
    let bad_via = parse("OPTIONS sip:a@b SIP/2.0\r\nCSeq: 1 OPTIONS\r\nVia: HTTP/1.1 x\r\n\r\n");
    assert_eq!(
        bad_via.top_via().unwrap_err(),
        ViewError::BadVia {
            line: 3,
            problem: ViaProblem::Protocol
        }
    );
}

#[test]
fn offsets_beyond_u32_are_refused() {
    use super::super::parse::check_size;
    assert_eq!(check_size(u32::MAX as usize), Ok(()));
    if let Some(length) = (u32::MAX as usize).checked_add(1) {
        assert_eq!(check_size(length), Err(ViewError::TooLarge { length }));
    }
}

#[test]
fn top_via_reads_transport_sent_by_and_params() {
    let view = parse(INVITE);
    let via = view.top_via().unwrap();
    assert_eq!(via.transport, "UDP");
    assert_eq!(via.sent_by.host, "pc33.atlanta.example.com");
    assert_eq!(via.sent_by.port, None);
    assert_eq!(via.branch, Some("z9hG4bK776asdhds"));
    assert_eq!(via.rport, Some(None));
    assert_eq!(via.received, None);

    let spaced =
        "SIP / 2.0 / tcp  10.1.2.3 : 5070 ; branch = z9hG4bKx ;rport=4000;received=192.0.2.1";
    let via = ViaView::parse(spaced).unwrap();
    assert_eq!(via.transport, "tcp");
    assert_eq!(
        via.sent_by,
        HostPort {
            host: "10.1.2.3",
            port: Some(5070)
        }
    );
    assert_eq!(via.branch, Some("z9hG4bKx"));
    assert_eq!(via.rport, Some(Some("4000")));
    assert_eq!(via.received, Some("192.0.2.1"));
    assert_eq!(via.params().count(), 3);
    assert_eq!(
        ViaView::parse("SIP/2.0/UDP a:x;branch=1"),
        Err(ViaProblem::SentBy(AddressProblem::Port))
    );
    assert_eq!(
        ViaView::parse("SIP/2.0/UDP [::1;branch=1"),
        Err(ViaProblem::SentBy(AddressProblem::Bracket))
    );
    assert_eq!(
        ViaView::parse("SIP/2.0/UDP"),
        Err(ViaProblem::SentBy(AddressProblem::Empty))
    );
}

#[test]
fn bracketed_ipv6_sent_by_and_uri_hosts() {
    let via = ViaView::parse("SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1").unwrap();
    assert_eq!(via.sent_by.host, "[2001:db8::1]");
    assert_eq!(via.sent_by.host_unbracketed(), "2001:db8::1");
    assert_eq!(via.sent_by.port, Some(5060));
    assert!(via.sent_by.is_ipv6());
    // RFC 5118 §4.3: inside brackets the last group is part of the address.
    let uri = UriView::parse("sip:[2001:db8::10:5070]").unwrap();
    assert_eq!(
        uri.host_port,
        HostPort {
            host: "[2001:db8::10:5070]",
            port: None
        }
    );
    assert_eq!(
        split_host_port("[2001:db8::1]x"),
        Err(ViewError::BadAddress {
            problem: AddressProblem::Bracket
        })
    );
}

#[test]
fn unbracketed_ipv6_sent_by_is_read_leniently() {
    // Nine groups: the last one can only be a port.
    let via =
        ViaView::parse("SIP/2.0/UDP fe80:0:0:0:21a:a0ff:fe07:32e0:5060;branch=z9hG4bK1").unwrap();
    assert_eq!(via.sent_by.host, "fe80:0:0:0:21a:a0ff:fe07:32e0");
    assert_eq!(via.sent_by.port, Some(5060));
    assert!(via.sent_by.is_ipv6());
    // A whole address without a port.
    let via = ViaView::parse("SIP/2.0/UDP 2001:db8::1;branch=z9hG4bK1").unwrap();
    assert_eq!(
        via.sent_by,
        HostPort {
            host: "2001:db8::1",
            port: None
        }
    );
    // Ambiguous: `2001:db8::1:5060` is itself an address, so it is read as one.
    let ambiguous = split_host_port("2001:db8::1:5060").unwrap();
    assert_eq!(
        ambiguous,
        HostPort {
            host: "2001:db8::1:5060",
            port: None
        }
    );
    // An IPv4-mapped address followed by a port.
    let mapped = split_host_port("::ffff:192.0.2.1:5062").unwrap();
    assert_eq!(
        mapped,
        HostPort {
            host: "::ffff:192.0.2.1",
            port: Some(5062)
        }
    );
    assert_eq!(
        split_host_port("a:b:c"),
        Err(ViewError::BadAddress {
            problem: AddressProblem::Host
        })
    );
    assert_eq!(
        split_host_port("fe80:0:0:0:21a:a0ff:fe07:32e0:99999"),
        Err(ViewError::BadAddress {
            problem: AddressProblem::Port
        })
    );
}

#[test]
fn uris_give_user_host_port_and_params() {
    let uri = UriView::parse("sip:4321@fec0:0:0:0:216:d3ff:fe0d:22c:5060").unwrap();
    assert_eq!(uri.user, Some("4321"));
    assert_eq!(
        uri.host_port,
        HostPort {
            host: "fec0:0:0:0:216:d3ff:fe0d:22c",
            port: Some(5060)
        }
    );
    let uri = UriView::parse("sips:+1;npdi@gw.example:5061;transport=tcp;lr?Subject=hi").unwrap();
    assert_eq!(uri.scheme, "sips");
    assert_eq!(uri.user, Some("+1;npdi"));
    assert_eq!(
        uri.host_port,
        HostPort {
            host: "gw.example",
            port: Some(5061)
        }
    );
    assert_eq!(uri.param("LR"), Some(None));
    assert_eq!(uri.param("transport"), Some(Some("tcp")));
    assert_eq!(uri.headers, "?Subject=hi");
    assert_eq!(UriView::parse("tel:+15551234"), Err(ViewError::NotSipUri));
}
