//! The messages of the IPv6 captures parse, read and round-trip.

use super::captures::*;
use super::*;

const ALL: [&str; 6] = [
    IPV6_UDP_INVITE,
    IPV6_UDP_TRYING,
    PROXIED_INVITE,
    PROXIED_PRACK_OK_WITHOUT_LENGTH,
    INVITE_OK_WITH_TWO_TO_TAGS,
    CLIENT_PRACK,
];

#[test]
fn capture_messages_serialise_byte_for_byte() {
    for text in ALL {
        let view = parse(text);
        let edit = view.edit();
        assert!(edit.is_empty());
        assert_eq!(&edit.serialize()[..], text.as_bytes());
    }
}

#[test]
fn unbracketed_ipv6_with_a_port_in_via_and_request_uri() {
    let view = parse(IPV6_UDP_INVITE);
    let via = view.top_via().unwrap();
    assert_eq!(via.transport, "UDP");
    assert_eq!(via.sent_by.host, "fe80:0:0:0:21a:a0ff:fe07:32e0");
    assert_eq!(via.sent_by.port, Some(5060));
    assert_eq!(via.branch, Some("z9hG4bKkdjuw8376"));
    let uri = UriView::parse(view.request_uri().unwrap()).unwrap();
    assert_eq!(uri.host_port.host, "fec0:0:0:0:216:d3ff:fe0d:22c");
    assert_eq!(uri.host_port.port, Some(5060));
    // The To URI has eight groups: all address, no port.
    let (to_uri, _) = name_addr_parts(view.header(HeaderName::To).unwrap());
    let to = UriView::parse(to_uri).unwrap();
    assert_eq!(
        to.host_port,
        HostPort {
            host: "fec0:0:0:0:216:d3ff:fe0d:22c",
            port: None
        }
    );
    assert_eq!(view.body().len(), 181);
    assert_eq!(view.cseq().unwrap(), (1, Method::Invite));
    assert_eq!(view.from_tag().unwrap(), Some("a3bhg"));
}

#[test]
fn proxied_invite_has_two_vias_on_one_line_and_an_unbracketed_received() {
    let view = parse(PROXIED_INVITE);
    let vias: Vec<_> = view.header_values(HeaderName::Via).collect();
    assert_eq!(vias.len(), 2);
    let top = view.top_via().unwrap();
    assert_eq!(top.sent_by.host, "[fd17:625c:f037:2:a00:27ff:feb9:3519]");
    assert_eq!(top.sent_by.port, Some(5062));
    let second = ViaView::parse(vias[1]).unwrap();
    assert_eq!(second.received, Some("fd17:625c:f037:2:a00:27ff:feb9:1521"));
    assert_eq!(second.sent_by.port, Some(15060));
    assert_eq!(view.header_values(HeaderName::Route).count(), 2);
    assert_eq!(view.header_values(HeaderName::RecordRoute).count(), 2);
    assert_eq!(view.max_forwards().unwrap(), Some(69));
    assert_eq!(view.content_length(), Some(629));
    assert_eq!(view.header("X-Orig-Call-Record"), Some("TRUE"));
}

#[test]
fn response_without_content_length_over_udp_gets_one_for_tcp() {
    let view = parse(PROXIED_PRACK_OK_WITHOUT_LENGTH);
    assert_eq!(view.content_length(), None);
    assert_eq!(view.cseq().unwrap(), (2, Method::Prack));
    let mut edit = view.edit();
    edit.ensure_content_length();
    edit.ensure_content_length();
    let out = edit.serialize();
    assert!(out.ends_with(b"CSeq: 2 PRACK\r\nContent-Length: 0\r\n\r\n"));
    let again = MessageView::parse(out, false).unwrap();
    assert_eq!(again.content_length(), Some(0));
    // A message that has one is left as written, spacing included.
    let prack = parse(CLIENT_PRACK);
    let mut edit = prack.edit();
    edit.ensure_content_length();
    assert_eq!(&edit.serialize()[..], CLIENT_PRACK.as_bytes());
}

#[test]
fn to_with_two_tag_params_gives_the_first() {
    let view = parse(INVITE_OK_WITH_TWO_TO_TAGS);
    assert_eq!(view.to_tag().unwrap(), Some("1632476SIPpTag0271847"));
    assert_eq!(view.status(), Some(200));
    assert_eq!(view.reason(), Some("OK"));
}

#[test]
fn popping_the_top_route_of_a_capture_keeps_the_spacing() {
    let view = parse(CLIENT_PRACK);
    let mut edit = view.edit();
    let popped = edit.remove_first_value(HeaderName::Route).unwrap();
    assert_eq!(
        popped,
        "<sip:origzFtdcRtHHqyuowAT@[fd17:625c:f037:2:a00:27ff:feb9:3519]:5062;lr>"
    );
    let out = edit.serialize();
    let text = std::str::from_utf8(&out).unwrap();
    assert!(text.contains(
        "\r\nRoute:  <sip:08019200028@[fd17:625c:f037:2:a00:27ff:feb9:4222]:25060;lr>\r\n"
    ));
    let again = reparse(&edit);
    assert_eq!(again.header_values(HeaderName::Route).count(), 1);
}

#[test]
fn proxy_edits_on_every_capture_message_reparse_to_the_edited_view() {
    for text in ALL {
        let view = parse(text);
        let mut edit = view.edit();
        let popped = edit.remove_first_value(HeaderName::Via).unwrap();
        edit.push_header(
            HeaderName::Via,
            "SIP/2.0/TCP [2001:db8::7]:5060;branch=z9hG4bKe",
        )
        .unwrap();
        edit.push_header(HeaderName::RecordRoute, "<sip:[2001:db8::7];lr>")
            .unwrap();
        if view.is_request() {
            edit.set_header(HeaderName::MaxForwards, "9").unwrap();
        }
        edit.ensure_content_length();
        let again = reparse(&edit);

        let top = again.top_via().unwrap();
        assert_eq!(
            top.sent_by,
            HostPort {
                host: "[2001:db8::7]",
                port: Some(5060)
            }
        );
        let old_vias: Vec<_> = view.header_values(HeaderName::Via).collect();
        let new_vias: Vec<_> = again.header_values(HeaderName::Via).collect();
        assert_eq!(old_vias[0], popped);
        assert_eq!(new_vias[1..], old_vias[1..]);
        assert_eq!(
            again.header(HeaderName::RecordRoute),
            Some("<sip:[2001:db8::7];lr>")
        );
        if view.is_request() {
            assert_eq!(again.max_forwards().unwrap(), Some(9));
        }
        assert_eq!(again.content_length(), Some(view.body().len()));
        assert_eq!(again.body(), view.body());
        assert_eq!(again.call_id().unwrap(), view.call_id().unwrap());
        assert_eq!(again.cseq().unwrap(), view.cseq().unwrap());
        assert_eq!(again.to_tag().unwrap(), view.to_tag().unwrap());
        assert_eq!(
            (again.status(), again.reason()),
            (view.status(), view.reason())
        );
        assert_eq!(again.request_uri(), view.request_uri());
        // Headers no edit touched keep their order, spelling and values.
        let untouched = |message: &MessageView| -> Vec<(String, String)> {
            message
                .headers()
                .filter(|field| {
                    !matches!(
                        field.name,
                        HeaderName::Via
                            | HeaderName::RecordRoute
                            | HeaderName::MaxForwards
                            | HeaderName::ContentLength
                    )
                })
                .map(|field| (field.spelling.to_string(), field.value.to_string()))
                .collect()
        };
        assert_eq!(untouched(&again), untouched(&view));
    }
}
