//! Trunk isolation (issue 12): a trunk's credential reaches only that trunk's core, on
//! every path a request can take. Two trunks of two organizations side by side, each with
//! its own Edge and core on its own loopback address; org-a's Edge and org-b's core try
//! every way found to steer org-a's requests, or org-a's dialogs, toward org-b's core.
//! Everything org-b's core receives is kept and searched for org-a's token or Digest
//! username, for `bearer` and for `digest` trunks.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use byoc_sidecar::config::Transport;
use byoc_sidecar::transport::Side;
use common::raw::{answer, final_for, header_values, invite, record_routes, status, RawPeer};
use common::Sidecar;
use rsip::SipMessage;

const WAIT: Duration = Duration::from_secs(5);
const TOKEN_A: &str = "org-a-token-7f3c2e";
const TOKEN_B: &str = "org-b-token-91d2aa";
const USER_A: &str = "alice-of-org-a";
const USER_B: &str = "bob-of-org-b";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Auth {
    Bearer,
    Digest,
}

/// Two trunks, their Edges and cores, and everything org-b's core received so far.
struct TwoTrunks {
    _dir: tempfile::TempDir,
    sidecar: Sidecar,
    edge_a: RawPeer,
    edge_b: RawPeer,
    core_a: RawPeer,
    core_b: RawPeer,
    /// The sidecar's Edge-side and core-side UDP addresses.
    proxy: SocketAddr,
    core_side: SocketAddr,
    at_core_b: Vec<String>,
}

impl TwoTrunks {
    /// Two trunks whose cores listen on `core_ips` (the same address twice: two cores on
    /// one host, told apart by port).
    async fn start(auth: Auth, core_ips: (&str, &str)) -> TwoTrunks {
        let dir = tempfile::tempdir().unwrap();
        let (edge_a, edge_b) = (
            RawPeer::bind_on("127.0.0.21").await,
            RawPeer::bind_on("127.0.0.22").await,
        );
        let (core_a, core_b) = (
            RawPeer::bind_on(core_ips.0).await,
            RawPeer::bind_on(core_ips.1).await,
        );
        let trunk = |name: &str, edge: &RawPeer, core: &RawPeer, secret: &str, user: &str| {
            let credentials = match auth {
                Auth::Bearer => {
                    let path = dir.path().join(format!("{name}-token"));
                    std::fs::write(&path, secret).unwrap();
                    format!("kind = \"file\"\npath = \"{}\"\n", path.display())
                }
                Auth::Digest => {
                    let path = dir.path().join(format!("{name}-password"));
                    std::fs::write(&path, secret).unwrap();
                    format!(
                        "kind = \"static\"\nusername = \"{user}\"\npassword_file = \"{}\"\n",
                        path.display()
                    )
                }
            };
            let mode = match auth {
                Auth::Bearer => "bearer",
                Auth::Digest => "digest",
            };
            format!(
                "\n[[trunk]]\nname = \"{name}\"\nmatch = {{ source = [\"{}/32\"] }}\n\
                 edge = \"udp:{}\"\ncore = \"udp:{}\"\nauth = \"{mode}\"\n\n[trunk.credentials]\n{credentials}",
                edge.addr.ip(),
                edge.addr,
                core.addr
            )
        };
        let text = format!(
            "[edge]\nlisten = [\"udp:127.0.0.1:0\"]\nallow = [\"127.0.0.0/8\"]\n\n\
             [core_side]\nlisten = [\"udp:127.0.0.1:0\"]\nallow = [\"127.0.0.0/8\"]\n{}{}",
            trunk("org-a", &edge_a, &core_a, TOKEN_A, USER_A),
            trunk("org-b", &edge_b, &core_b, TOKEN_B, USER_B)
        );
        let sidecar = Sidecar::start_with(&text).await;
        for name in ["org-a", "org-b"] {
            let manager = sidecar.app.credentials[name].clone();
            let mut attempts = manager.attempts();
            tokio::time::timeout(WAIT, attempts.wait_for(|_| manager.current().is_some()))
                .await
                .expect("each trunk's credential")
                .unwrap();
        }
        let proxy = sidecar.addr(Side::Edge, Transport::Udp);
        let core_side = sidecar.addr(Side::Core, Transport::Udp);
        TwoTrunks {
            _dir: dir,
            sidecar,
            edge_a,
            edge_b,
            core_a,
            core_b,
            proxy,
            core_side,
            at_core_b: Vec::new(),
        }
    }

    /// The next message at org-b's core, kept for the final search.
    async fn at_core_b(&mut self, what: &str) -> (SipMessage, SocketAddr) {
        let (message, from) = self.core_b.receive(WAIT, what).await;
        self.at_core_b.push(text(&message));
        (message, from)
    }

    /// Nothing more reaches org-b's core within a moment (and what did is kept).
    async fn core_b_quiet(&mut self) -> Vec<String> {
        let more = self.core_b.drain(Duration::from_millis(300)).await;
        self.at_core_b.extend(more.iter().cloned());
        more
    }

    /// org-a's core challenges one INVITE and takes the answer, so that org-a's Digest
    /// state holds a nonce for INVITE and its later INVITEs carry answers unasked.
    async fn learn_digest_challenge(&mut self) {
        let call_id = "learn@test";
        let request = invite(self.edge_a.addr, self.proxy, "z9hG4bKlearn", call_id);
        self.edge_a.send(&request, self.proxy).await;
        let (first, from) = common::raw::next_request(&self.core_a, rsip::Method::Invite).await;
        let challenge = answer(&first, 401, "Unauthorized", "ca").replace(
            "Content-Length: 0\r\n",
            "WWW-Authenticate: Digest realm=\"org-a.test\", nonce=\"nonce-a\", algorithm=MD5, qop=\"auth\"\r\nContent-Length: 0\r\n",
        );
        self.core_a.send(&challenge, from).await;
        let (second, from) = common::raw::next_request(&self.core_a, rsip::Method::Invite).await;
        assert!(
            header_values(&second, "Authorization")[0].contains(USER_A),
            "org-a answers its own core's challenge"
        );
        self.end_call_at_core_a(&second, from, "z9hG4bKlearn", call_id)
            .await;
    }

    /// org-a's core turns the INVITE down; the Edge gets the 486 and acknowledges it.
    async fn end_call_at_core_a(
        &self,
        at_core: &SipMessage,
        from: SocketAddr,
        branch: &str,
        call_id: &str,
    ) {
        self.core_a
            .send(&answer(at_core, 486, "Busy Here", "ca"), from)
            .await;
        let response = final_for(&self.edge_a, call_id).await;
        assert_eq!(status(&response), 486);
        let ack = format!(
            "ACK sip:service@{} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch={branch}\r\n\
             From: <sip:edge@{}>;tag=edge-tag\r\nTo: {}\r\nCall-ID: {call_id}\r\n\
             CSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
            self.core_b.addr,
            self.edge_a.addr,
            self.edge_a.addr,
            header_values(&response, "To")[0]
        );
        self.edge_a.send(&ack, self.proxy).await;
    }

    /// org-a's credential as it appears in a request to org-a's core.
    fn org_a_credential(auth: Auth) -> &'static str {
        match auth {
            Auth::Bearer => TOKEN_A,
            Auth::Digest => USER_A,
        }
    }
}

fn text(message: &SipMessage) -> String {
    String::from_utf8_lossy(&byoc_sidecar::sip::message::encode(message)).into_owned()
}

/// An initial INVITE from org-a's Edge addressed to org-b's core, with `routes` (each a
/// Route value) placed before Max-Forwards.
fn steered_invite(rig: &TwoTrunks, branch: &str, call_id: &str, routes: &[String]) -> String {
    let route = format!("Route: {}\r\nMax-Forwards: 70\r\n", routes.join(", "));
    invite(rig.edge_a.addr, rig.core_b.addr, branch, call_id).replacen(
        "Max-Forwards: 70\r\n",
        &route,
        1,
    )
}

/// An in-dialog BYE from org-a's Edge whose remote target is org-b's core.
fn steered_bye(rig: &TwoTrunks, branch: &str, call_id: &str, route: &str) -> String {
    format!(
        "BYE sip:x@{} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch={branch}\r\nRoute: {route}\r\n\
         From: <sip:edge@a.test>;tag=ea\r\nTo: <sip:x@b.test>;tag=xb\r\nCall-ID: {call_id}\r\n\
         CSeq: 2 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        rig.core_b.addr, rig.edge_a.addr
    )
}

async fn every_path_keeps_org_as_credential_away_from_org_bs_core(
    auth: Auth,
    core_ips: (&str, &str),
) {
    let mut rig = TwoTrunks::start(auth, core_ips).await;
    if auth == Auth::Digest {
        rig.learn_digest_challenge().await;
    }
    let own = format!("<sip:{};lr>", rig.proxy);
    let credential = TwoTrunks::org_a_credential(auth);

    // 1. An initial INVITE to org-b's core with the sidecar preloaded as outbound proxy,
    // 2. and with org-b's core as a further Route: both go to org-a's core, carrying
    //    org-a's credential, with the Request-URI and the foreign Route left for it.
    let foreign = format!("<sip:{};lr>", rig.core_b.addr);
    for (index, routes) in [vec![own.clone()], vec![own.clone(), foreign.clone()]]
        .into_iter()
        .enumerate()
    {
        let request = steered_invite(
            &rig,
            &format!("z9hG4bKsteer{index}"),
            &format!("steer{index}@test"),
            &routes,
        );
        rig.edge_a.send(&request, rig.proxy).await;
        let (at_a, from) = common::raw::next_request(&rig.core_a, rsip::Method::Invite).await;
        let SipMessage::Request(forwarded) = &at_a else {
            panic!("expected the INVITE")
        };
        assert_eq!(
            forwarded.uri.to_string(),
            format!("sip:service@{}", rig.core_b.addr)
        );
        let routes_left = header_values(&at_a, "Route");
        if index == 0 {
            assert!(routes_left.is_empty(), "{routes_left:?}");
        } else {
            assert_eq!(routes_left, vec![foreign.clone()]);
        }
        let authorization = header_values(&at_a, "Authorization");
        assert!(
            authorization.iter().any(|value| value.contains(credential)),
            "org-a's own core gets org-a's credential: {authorization:?}"
        );
        let (branch, call_id) = (format!("z9hG4bKsteer{index}"), format!("steer{index}@test"));
        rig.end_call_at_core_a(&at_a, from, &branch, &call_id).await;
        assert!(
            rig.core_b_quiet().await.is_empty(),
            "org-b's core got a request steered at it"
        );
    }

    // 3. In-dialog requests whose remote target is org-b's core, with our Route naming
    //    org-a's trunk or no trunk: forwarded there without any credential, counted, and
    //    a challenge or refusal from it goes to the Edge, not answered with org-a's.
    let withheld = rig.sidecar.app.stats.snapshot().credentials_withheld;
    let routes = [
        format!("<sip:{};lr;bsct=0>", rig.proxy),
        format!("<sip:{};lr>", rig.proxy),
    ];
    for (index, route) in routes.iter().enumerate() {
        let bye = steered_bye(
            &rig,
            &format!("z9hG4bKbye{index}"),
            &format!("bye{index}@test"),
            route,
        );
        rig.edge_a.send(&bye, rig.proxy).await;
        let (at_b, from) = rig.at_core_b("the BYE at org-b's core").await;
        assert!(header_values(&at_b, "Authorization").is_empty());
        assert!(header_values(&at_b, "Proxy-Authorization").is_empty());
        let refusal = match auth {
            Auth::Bearer => answer(&at_b, 403, "Forbidden", "xb"),
            Auth::Digest => answer(&at_b, 401, "Unauthorized", "xb").replace(
                "Content-Length: 0\r\n",
                "WWW-Authenticate: Digest realm=\"org-b.test\", nonce=\"nonce-b\", algorithm=MD5\r\nContent-Length: 0\r\n",
            ),
        };
        rig.core_b.send(&refusal, from).await;
        let response = final_for(&rig.edge_a, &format!("bye{index}@test")).await;
        assert_eq!(
            status(&response),
            if auth == Auth::Bearer { 403 } else { 401 }
        );
        assert!(
            rig.core_b_quiet().await.is_empty(),
            "the BYE was re-sent to org-b's core"
        );
    }
    // An ACK for a 2xx is forwarded statelessly along the same path: without too.
    let ack = steered_bye(&rig, "z9hG4bKack3", "ack3@test", &routes[0])
        .replace("BYE sip:", "ACK sip:")
        .replace("CSeq: 2 BYE", "CSeq: 1 ACK");
    rig.edge_a.send(&ack, rig.proxy).await;
    let (at_b, _) = rig.at_core_b("the ACK at org-b's core").await;
    assert!(header_values(&at_b, "Authorization").is_empty());
    assert_eq!(
        rig.sidecar.app.stats.snapshot().credentials_withheld,
        withheld + 3
    );

    // 4. org-b's core sends a call to org-a's Edge naming org-a's trunk in its Route:
    //    the trunk parameter is not honoured (org-b's core does not serve org-a), so the
    //    dialog is not org-a's, and org-a's Edge's BYE carries no org-a credential to
    //    org-b's core.
    let foreign_before = rig.sidecar.app.stats.snapshot().foreign_trunk_parameters;
    let inbound = format!(
        "INVITE sip:a@{edge} SIP/2.0\r\nVia: SIP/2.0/UDP {core};branch=z9hG4bKin4\r\n\
         Route: <sip:{side};lr;bsct=0>\r\nFrom: <sip:core@b.test>;tag=cb\r\nTo: <sip:a@{edge}>\r\n\
         Call-ID: inbound4@test\r\nCSeq: 1 INVITE\r\nContact: <sip:core@{core}>\r\n\
         Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        edge = rig.edge_a.addr,
        core = rig.core_b.addr,
        side = rig.core_side,
    );
    rig.core_b.send(&inbound, rig.core_side).await;
    let (at_edge, from) = common::raw::next_request(&rig.edge_a, rsip::Method::Invite).await;
    let recorded = record_routes(&at_edge);
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert!(
        recorded.iter().all(|value| !value.contains("bsct=0")),
        "the dialog took org-a's trunk from org-b's core: {recorded:?}"
    );
    assert_eq!(
        rig.sidecar.app.stats.snapshot().foreign_trunk_parameters,
        foreign_before + 1
    );
    let ok = common::raw::with_dialog(
        &answer(&at_edge, 200, "OK", "ea"),
        &recorded,
        rig.edge_a.addr,
        "",
    );
    rig.edge_a.send(&ok, from).await;
    loop {
        let (message, _) = rig.at_core_b("the 200 at org-b's core").await;
        if matches!(&message, SipMessage::Response(response) if response.status_code.code() == 200)
        {
            break;
        }
    }
    // The Edge (UAS) uses the Record-Route in order, to the core's Contact.
    let bye = format!(
        "BYE sip:core@{core} SIP/2.0\r\nVia: SIP/2.0/UDP {edge};branch=z9hG4bKin4bye\r\n\
         Route: {routes}\r\nFrom: <sip:a@{edge}>;tag=ea\r\nTo: <sip:core@b.test>;tag=cb\r\n\
         Call-ID: inbound4@test\r\nCSeq: 1 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        core = rig.core_b.addr,
        edge = rig.edge_a.addr,
        routes = recorded.join(", "),
    );
    rig.edge_a.send(&bye, rig.proxy).await;
    let (at_b, from) = loop {
        let (message, from) = rig.at_core_b("the BYE at org-b's core").await;
        if matches!(&message, SipMessage::Request(request) if request.method == rsip::Method::Bye) {
            break (message, from);
        }
    };
    assert!(header_values(&at_b, "Authorization").is_empty());
    rig.core_b.send(&answer(&at_b, 200, "OK", "cb"), from).await;
    assert_eq!(status(&final_for(&rig.edge_a, "inbound4@test").await), 200);

    rig.core_b_quiet().await;
    for message in &rig.at_core_b {
        assert!(
            !message.contains(TOKEN_A) && !message.contains(USER_A),
            "org-a's credential reached org-b's core:\n{message}"
        );
    }
    assert!(!rig.at_core_b.is_empty());
    // org-b's Edge never took part: nothing of this reached it.
    assert!(rig
        .edge_b
        .drain(Duration::from_millis(100))
        .await
        .is_empty());
    rig.sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_of_one_trunk_never_reaches_another_trunks_core() {
    every_path_keeps_org_as_credential_away_from_org_bs_core(
        Auth::Bearer,
        ("127.0.0.11", "127.0.0.12"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_answers_of_one_trunk_never_reach_another_trunks_core() {
    every_path_keeps_org_as_credential_away_from_org_bs_core(
        Auth::Digest,
        ("127.0.0.11", "127.0.0.12"),
    )
    .await;
}

/// The issue's own set-up: both cores on one host, on two ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cores_on_one_host_are_kept_apart_by_port() {
    for auth in [Auth::Bearer, Auth::Digest] {
        every_path_keeps_org_as_credential_away_from_org_bs_core(
            auth,
            ("127.0.0.11", "127.0.0.11"),
        )
        .await;
    }
}
