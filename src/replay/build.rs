//! Live messages made from captured ones. A replayed message keeps what the capture had
//! (start line, headers in order, body) except what identifies the run and the live
//! peers: Call-ID (prefixed with the run id, so every run is new to the target), Via
//! (ours, with a fresh branch), Contact (our address), the To tag and route set of the
//! live dialog, and the dialog headers a response copies from the request it answers
//! (RFC 3261 §8.2.6.2). ACK and CANCEL are built the way §17.1.1.3, §13.2.2.4 and §9.1
//! say a UAC builds them.

use std::net::SocketAddr;

use super::text::{with_tag, SipText, StartLine};
use crate::config::Transport;
use crate::sip::header::name_addr_uri;

/// The Reason (RFC 3326) on the CANCELs and BYEs a replay sends to leave no call behind,
/// so the other side of a replay knows them for what they are.
pub const CLEANUP_REASON: &str = "SIP;cause=200;text=\"replay cleanup\"";

/// Whether `request` is a replay's own cleanup.
pub fn is_cleanup(request: &SipText) -> bool {
    request.header("Reason") == Some(CLEANUP_REASON)
}

/// What makes live messages of one run and one endpoint.
#[derive(Debug, Clone)]
pub struct Rewrite {
    /// The run id: a prefix of every live Call-ID and branch.
    pub run: String,
    /// Our address, for Via and Contact.
    pub local: SocketAddr,
    pub transport: Transport,
    /// Which dialogue of the run: branches are unique across the run, not only within
    /// one dialogue (a proxy matches transactions by branch alone, RFC 3261 §17.2.3).
    pub dialogue: usize,
}

/// The dialog as it exists live: whom in-dialog requests go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDialog {
    pub remote_tag: String,
    /// The remote target: the peer's Contact URI.
    pub target: String,
    /// Route values for requests we send, in order.
    pub route_set: Vec<String>,
    pub confirmed: bool,
    pub ended: bool,
}

impl Rewrite {
    pub fn call_id(&self, captured: &str) -> String {
        format!("{}-{captured}", self.run)
    }

    /// The captured Call-ID behind a live one of this run.
    pub fn captured_call_id<'a>(&self, live: &'a str) -> Option<&'a str> {
        live.strip_prefix(self.run.as_str())?.strip_prefix('-')
    }

    pub fn branch(&self, counter: u64) -> String {
        format!("z9hG4bK-{}-{}-{counter}", self.run, self.dialogue)
    }

    pub fn via(&self, branch: &str) -> String {
        format!(
            "SIP/2.0/{} {};branch={branch};rport",
            self.transport.via_token(),
            self.local
        )
    }

    /// Every Contact of `message` pointed at us, user part and parameters kept.
    pub fn rewrite_contacts(&self, message: &mut SipText) {
        let contacts: Vec<String> = message
            .list("Contact")
            .into_iter()
            .map(|contact| self.contact(&contact))
            .collect();
        if !contacts.is_empty() {
            message.set_list("Contact", &contacts);
        }
    }

    fn contact(&self, value: &str) -> String {
        let uri = name_addr_uri(value);
        if value.trim() == "*" || uri.is_empty() {
            return value.to_string();
        }
        // Inside the brackets, not in a display name that repeats the URI.
        let from = value.find('<').map_or(0, |bracket| bracket + 1);
        let Some(start) = value[from..].find(uri).map(|start| start + from) else {
            return value.to_string();
        };
        let (scheme, rest) = uri.split_once(':').unwrap_or(("sip", uri));
        // The user part may hold `;` itself (`+1555;npdi@host`): parameters follow the host.
        let (user, host_part) = match rest.rsplit_once('@') {
            Some((user, host)) => (format!("{user}@"), host),
            None => (String::new(), rest),
        };
        let params: String = host_part
            .split(';')
            .skip(1)
            .filter(|param| !param.trim().to_ascii_lowercase().starts_with("transport="))
            .map(|param| format!(";{param}"))
            .collect();
        let transport = match self.transport {
            Transport::Tcp => ";transport=tcp",
            Transport::Tls => ";transport=tls",
            Transport::Udp => "",
        };
        let bracketed = value.contains('<');
        let new_uri = format!("{scheme}:{user}{}{transport}{params}", self.local);
        let new_uri = if bracketed {
            new_uri
        } else {
            format!("<{new_uri}>")
        };
        format!(
            "{}{new_uri}{}",
            &value[..start],
            &value[start + uri.len()..]
        )
    }

    /// A request of ours from a captured one: new Call-ID, our Via with `branch`, our
    /// Contact. Outside a dialog its preloaded routes and Record-Route go (they name the
    /// captured network); inside one (`dialog` given) the live remote target, route set
    /// and remote tag replace the captured ones.
    pub fn request(
        &self,
        captured: &SipText,
        branch: &str,
        dialog: Option<&LiveDialog>,
    ) -> SipText {
        let mut message = captured.clone();
        if let Some(call_id) = captured.call_id() {
            message.set("Call-ID", self.call_id(call_id));
        }
        message.set_list("Via", &[self.via(branch)]);
        self.rewrite_contacts(&mut message);
        message.remove("Record-Route");
        match dialog {
            Some(dialog) => {
                if let StartLine::Request { uri, .. } = &mut message.start {
                    *uri = dialog.target.clone();
                }
                message.set_list("Route", &dialog.route_set);
                if let Some(to) = captured.header("To") {
                    message.set("To", with_tag(to, Some(&dialog.remote_tag)));
                }
            }
            None => message.remove("Route"),
        }
        message
    }

    /// A response of ours to `live` (a request that reached us) from a captured one:
    /// status line, headers and body as captured; Via, From, To, Call-ID and CSeq as the
    /// live request had them, our tag added to To; for a dialog-creating answer the live
    /// Record-Route copied (§12.1.1).
    pub fn response(&self, captured: &SipText, live: &SipText) -> SipText {
        let mut message = captured.clone();
        copy_dialog_headers(&mut message, live);
        let to = live.header("To").unwrap_or_default();
        let to = match (live.to_tag(), captured.to_tag()) {
            (None, Some(tag)) => with_tag(to, Some(tag)),
            _ => to.to_string(),
        };
        message.set("To", to);
        let creates_dialog = matches!(live.method(), Some("INVITE" | "SUBSCRIBE"))
            && live.to_tag().is_none()
            && captured
                .status()
                .is_some_and(|code| (101..300).contains(&code));
        if creates_dialog {
            message.set_list("Record-Route", &live.list("Record-Route"));
        } else {
            message.remove("Record-Route");
        }
        message.remove("Route");
        self.rewrite_contacts(&mut message);
        message
    }
}

/// Via, From, To, Call-ID and CSeq of a response, from the request it answers
/// (§8.2.6.2).
fn copy_dialog_headers(response: &mut SipText, request: &SipText) {
    for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
        let values: Vec<String> = request.values(name).map(str::to_string).collect();
        response.set_list(name, &values);
    }
}

/// A response made up here, for a request the capture has no answer to.
pub fn plain_response(live: &SipText, code: u16, reason: &str, tag: &str) -> SipText {
    let mut message = SipText {
        start: StartLine::Response {
            code,
            reason: reason.to_string(),
        },
        headers: Vec::new(),
        body: Vec::new(),
    };
    copy_dialog_headers(&mut message, live);
    if live.to_tag().is_none() {
        if let Some(to) = live.header("To") {
            message.set("To", with_tag(to, Some(tag)));
        }
    }
    message
}

/// A request of the INVITE's own transaction, `method` (ACK for a non-2xx, §17.1.1.3, or
/// CANCEL, §9.1): the INVITE's Request-URI, top Via, routes, Max-Forwards, From, Call-ID
/// and CSeq number, and `to` as To.
fn in_invite_transaction(invite: &SipText, method: &str, to: Option<&str>) -> SipText {
    let mut message = SipText {
        start: StartLine::Request {
            method: method.into(),
            uri: request_uri(invite),
        },
        headers: Vec::new(),
        body: Vec::new(),
    };
    let top_via: Vec<String> = invite.list("Via").into_iter().take(1).collect();
    message.set_list("Via", &top_via);
    message.set_list("Route", &invite.list("Route"));
    for name in ["Max-Forwards", "From"] {
        copy(&mut message, invite, name);
    }
    if let Some(to) = to {
        message.set("To", to.to_string());
    }
    copy(&mut message, invite, "Call-ID");
    let number = invite.cseq().map_or(1, |(number, _)| number);
    message.set("CSeq", format!("{number} {method}"));
    message
}

/// The ACK for a final response to `invite` (as we sent it). For a non-2xx it is part of
/// the INVITE transaction (§17.1.1.3). For a 2xx it is a new transaction (`branch`) to
/// the remote target along the route set, of the live dialog or else of the 2xx itself,
/// carrying the INVITE's credentials and `body` (a late offer's answer, §13.2.2.4).
pub fn ack(
    invite: &SipText,
    response: &SipText,
    dialog: Option<&LiveDialog>,
    branch: &str,
    rewrite: &Rewrite,
    body: &[u8],
) -> SipText {
    let success = response
        .status()
        .is_some_and(|code| (200..300).contains(&code));
    let to = response.header("To").or_else(|| invite.header("To"));
    let mut message = in_invite_transaction(invite, "ACK", to);
    if !success {
        return message;
    }
    let (target, routes) = match dialog {
        Some(dialog) => (Some(dialog.target.clone()), dialog.route_set.clone()),
        None => {
            let mut routes = response.list("Record-Route");
            routes.reverse();
            (response.contact_uri(), routes)
        }
    };
    if let (Some(target), StartLine::Request { uri, .. }) = (target, &mut message.start) {
        *uri = target;
    }
    message.set("Via", rewrite.via(branch));
    message.set_list("Route", &routes);
    for name in ["Authorization", "Proxy-Authorization"] {
        let values: Vec<String> = invite.values(name).map(str::to_string).collect();
        message.set_list(name, &values);
    }
    if !body.is_empty() {
        message.body = body.to_vec();
        copy(&mut message, invite, "Content-Type");
    }
    message
}

/// The CANCEL for `invite` as we sent it (§9.1).
pub fn cancel(invite: &SipText) -> SipText {
    in_invite_transaction(invite, "CANCEL", invite.header("To"))
}

/// A BYE in the live dialog that `invite` (as we sent it) created, numbered `cseq`.
pub fn bye(invite: &SipText, dialog: &LiveDialog, cseq: u32, via: String) -> SipText {
    let mut message = SipText {
        start: StartLine::Request {
            method: "BYE".into(),
            uri: dialog.target.clone(),
        },
        headers: Vec::new(),
        body: Vec::new(),
    };
    message.set("Via", via);
    message.set_list("Route", &dialog.route_set);
    message.set("Max-Forwards", "70".into());
    copy(&mut message, invite, "From");
    if let Some(to) = invite.header("To") {
        message.set("To", with_tag(to, Some(&dialog.remote_tag)));
    }
    copy(&mut message, invite, "Call-ID");
    message.set("CSeq", format!("{cseq} BYE"));
    message
}

fn request_uri(request: &SipText) -> String {
    match &request.start {
        StartLine::Request { uri, .. } => uri.clone(),
        StartLine::Response { .. } => String::new(),
    }
}

fn copy(target: &mut SipText, source: &SipText, name: &str) {
    if let Some(value) = source.header(name) {
        target.set(name, value.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(transport: Transport) -> Rewrite {
        Rewrite {
            run: "r1".into(),
            local: "127.0.0.1:40000".parse().unwrap(),
            transport,
            dialogue: 0,
        }
    }

    const INVITE: &str = "INVITE sip:bob@10.0.0.2 SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx\r\n\
Route: <sip:10.0.0.9;lr>\r\n\
From: <sip:alice@a>;tag=a1\r\nTo: <sip:bob@b>\r\nCall-ID: abc@10.0.0.1\r\nCSeq: 1 INVITE\r\n\
Contact: \"Alice\" <sip:alice@10.0.0.1:5060;transport=udp;ob>;expires=60\r\n\
Max-Forwards: 70\r\nContent-Length: 3\r\n\r\nsdp";

    #[test]
    fn an_initial_request_gets_our_identity_and_loses_captured_routes() {
        let captured = SipText::parse(INVITE.as_bytes()).unwrap();
        let live = rewrite(Transport::Tcp).request(&captured, "z9hG4bK-r1-1", None);
        assert_eq!(live.call_id(), Some("r1-abc@10.0.0.1"));
        assert_eq!(
            live.header("Via"),
            Some("SIP/2.0/TCP 127.0.0.1:40000;branch=z9hG4bK-r1-1;rport")
        );
        assert_eq!(
            live.header("Contact"),
            Some("\"Alice\" <sip:alice@127.0.0.1:40000;transport=tcp;ob>;expires=60")
        );
        assert_eq!(live.header("Route"), None);
        assert_eq!(live.body, b"sdp");
        assert_eq!(
            rewrite(Transport::Tcp).captured_call_id("r1-abc@10.0.0.1"),
            Some("abc@10.0.0.1")
        );
    }

    #[test]
    fn an_in_dialog_request_follows_the_live_dialog() {
        let bye =
            "BYE sip:bob@10.0.0.2:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKy\r\n\
From: <sip:alice@a>;tag=a1\r\nTo: <sip:bob@b>;tag=captured\r\nCall-ID: abc\r\nCSeq: 2 BYE\r\n\r\n";
        let dialog = LiveDialog {
            remote_tag: "live".into(),
            target: "sip:bob@127.0.0.1:7000".into(),
            route_set: vec!["<sip:127.0.0.1:5060;lr>".into()],
            confirmed: true,
            ended: false,
        };
        let live = rewrite(Transport::Udp).request(
            &SipText::parse(bye.as_bytes()).unwrap(),
            "z9hG4bK-r1-2",
            Some(&dialog),
        );
        assert_eq!(
            live.start,
            StartLine::Request {
                method: "BYE".into(),
                uri: "sip:bob@127.0.0.1:7000".into()
            }
        );
        assert_eq!(live.header("To"), Some("<sip:bob@b>;tag=live"));
        assert_eq!(
            live.list("Route"),
            vec!["<sip:127.0.0.1:5060;lr>".to_string()]
        );
    }

    #[test]
    fn a_response_copies_the_live_request_and_keeps_the_captured_tag_and_body() {
        let live_request = SipText::parse(INVITE.as_bytes()).unwrap();
        let captured = SipText::parse(
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP old;branch=z9hG4bKold\r\nFrom: <sip:alice@a>;tag=old\r\n\
To: <sip:bob@b>;tag=b7\r\nCall-ID: old\r\nCSeq: 9 INVITE\r\nRecord-Route: <sip:old;lr>\r\n\
Contact: <sip:bob@10.0.0.2>\r\nContent-Length: 4\r\n\r\nv=0\n",
        )
        .unwrap();
        let mut live_with_rr = live_request.clone();
        live_with_rr.set("Record-Route", "<sip:127.0.0.1:5070;lr>".into());
        let response = rewrite(Transport::Udp).response(&captured, &live_with_rr);
        assert_eq!(
            response.header("Via"),
            Some("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx")
        );
        assert_eq!(response.header("To"), Some("<sip:bob@b>;tag=b7"));
        assert_eq!(response.cseq(), Some((1, "INVITE")));
        assert_eq!(
            response.list("Record-Route"),
            vec!["<sip:127.0.0.1:5070;lr>".to_string()]
        );
        assert_eq!(
            response.header("Contact"),
            Some("<sip:bob@127.0.0.1:40000>")
        );
        assert_eq!(response.body, b"v=0\n");
    }

    #[test]
    fn ack_and_cancel_follow_rfc_3261() {
        let invite = SipText::parse(INVITE.as_bytes()).unwrap();
        let rejected = SipText::parse(
            b"SIP/2.0 403 Forbidden\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx\r\n\
From: <sip:alice@a>;tag=a1\r\nTo: <sip:bob@b>;tag=t9\r\nCall-ID: abc@10.0.0.1\r\nCSeq: 1 INVITE\r\n\r\n",
        )
        .unwrap();
        let rewrite = rewrite(Transport::Udp);
        let ack = ack(&invite, &rejected, None, "unused", &rewrite, b"");
        assert_eq!(
            ack.header("Via"),
            Some("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx")
        );
        assert_eq!(ack.header("To"), Some("<sip:bob@b>;tag=t9"));
        assert_eq!(ack.cseq(), Some((1, "ACK")));
        assert_eq!(ack.list("Route"), vec!["<sip:10.0.0.9;lr>".to_string()]);
        let cancel = cancel(&invite);
        assert_eq!(cancel.cseq(), Some((1, "CANCEL")));
        assert_eq!(cancel.header("To"), Some("<sip:bob@b>"));
        assert_eq!(cancel.branch().as_deref(), Some("z9hG4bKx"));
    }

    #[test]
    fn a_2xx_ack_is_a_new_transaction_with_the_invites_credentials() {
        let mut invite = SipText::parse(INVITE.as_bytes()).unwrap();
        invite.set("Proxy-Authorization", "Bearer t0k3n".into());
        let accepted = SipText::parse(
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx\r\n\
From: <sip:alice@a>;tag=a1\r\nTo: <sip:bob@b>;tag=t9\r\nCall-ID: abc@10.0.0.1\r\nCSeq: 1 INVITE\r\n\
Record-Route: <sip:p1;lr>, <sip:p2;lr>\r\nContact: <sip:bob@10.0.0.7:5062>\r\n\r\n",
        )
        .unwrap();
        let ack = ack(
            &invite,
            &accepted,
            None,
            "z9hG4bKnew",
            &rewrite(Transport::Udp),
            b"",
        );
        assert_eq!(ack.branch().as_deref(), Some("z9hG4bKnew"));
        assert_eq!(
            ack.start,
            StartLine::Request {
                method: "ACK".into(),
                uri: "sip:bob@10.0.0.7:5062".into()
            }
        );
        assert_eq!(
            ack.list("Route"),
            vec!["<sip:p2;lr>".to_string(), "<sip:p1;lr>".to_string()]
        );
        assert_eq!(ack.header("Proxy-Authorization"), Some("Bearer t0k3n"));
    }

    #[test]
    fn a_display_name_that_repeats_the_uri_is_left_alone() {
        let mut message = SipText::parse(
            b"REGISTER sip:x SIP/2.0\r\nContact: \"sip:100@10.1.1.1\" <sip:100@10.1.1.1>\r\n\r\n",
        )
        .unwrap();
        rewrite(Transport::Udp).rewrite_contacts(&mut message);
        assert_eq!(
            message.header("Contact"),
            Some("\"sip:100@10.1.1.1\" <sip:100@127.0.0.1:40000>")
        );
    }

    #[test]
    fn a_contact_user_with_parameters_keeps_them_in_the_user_part() {
        let mut message = SipText::parse(
            b"REGISTER sip:x SIP/2.0\r\nContact: <sip:+1555;npdi@10.0.0.1:5060;ob>\r\n\r\n",
        )
        .unwrap();
        rewrite(Transport::Udp).rewrite_contacts(&mut message);
        assert_eq!(
            message.header("Contact"),
            Some("<sip:+1555;npdi@127.0.0.1:40000;ob>")
        );
    }
}
