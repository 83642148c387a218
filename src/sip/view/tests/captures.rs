//! Messages from the IPv6 captures, byte for byte (header and body text).

/// invite-call-ipv6-udp-001.sip
pub(super) const IPV6_UDP_INVITE: &str = concat!(
    "INVITE sip:4321@fec0:0:0:0:216:d3ff:fe0d:22c:5060 SIP/2.0\r\n",
    "Call-ID: c3eF6f58-363323Cd-8058EB88-10300252@fe80:0:0:0:21a:a0ff:fe07:32e0\r\n",
    "Contact: <sip:9876@fe80:0:0:0:21a:a0ff:fe07:32e0:5060>\r\n",
    "CSeq: 1 INVITE\r\n",
    "From: <sip:9876@fe80:0:0:0:21a:a0ff:fe07:32e0>;tag=a3bhg\r\n",
    "To: <sip:4321@fec0:0:0:0:216:d3ff:fe0d:22c>\r\n",
    "Via: SIP/2.0/UDP fe80:0:0:0:21a:a0ff:fe07:32e0:5060;branch=z9hG4bKkdjuw8376\r\n",
    "Max-Forwards: 70\r\n",
    "Allow: INVITE, ACK, BYE, CANCEL, REFER, OPTIONS, REGISTER, SUBSCRIBE\r\n",
    "Content-Type: application/sdp\r\n",
    "Content-Length: 181\r\n",
    "\r\n",
    "v=0\r\n",
    "o=Valid8.com-UserAgent 8521 32 IN IP6 fe80:0:0:0:21a:a0ff:fe07:32e0\r\n",
    "s=SIP-Call\r\n",
    "c=IN IP6 fe80:0:0:0:21a:a0ff:fe07:32e0\r\n",
    "t=0 0\r\n",
    "m=audio 5008 RTP/AVP 0\r\n",
    "a=rtpmap:0 pcmu/8000/1\r\n",
);

/// invite-call-ipv6-udp-002.sip
pub(super) const IPV6_UDP_TRYING: &str = concat!(
    "SIP/2.0 100 Trying\r\n",
    "Call-ID: c3eF6f58-363323Cd-8058EB88-10300252@fe80:0:0:0:21a:a0ff:fe07:32e0\r\n",
    "Contact: <sip:4321@fec0:0:0:0:216:d3ff:fe0d:22c:5060>\r\n",
    "CSeq: 1 INVITE\r\n",
    "From: <sip:9876@fe80:0:0:0:21a:a0ff:fe07:32e0>;tag=a3bhg\r\n",
    "To: <sip:4321@fec0:0:0:0:216:d3ff:fe0d:22c>;tag=a3bhg\r\n",
    "Via: SIP/2.0/UDP fe80:0:0:0:21a:a0ff:fe07:32e0:5060;branch=z9hG4bKkdjuw8376\r\n",
    "Allow: INVITE, ACK, BYE, CANCEL, REFER, OPTIONS, REGISTER, SUBSCRIBE\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

/// prack-update-ipv6-frag-sll-005.sip
pub(super) const PROXIED_INVITE: &str = concat!(
    "INVITE sip:08019200028@[fd17:625c:f037:2:a00:27ff:feb9:4222]:25060 SIP/2.0\r\n",
    "Via: SIP/2.0/UDP [fd17:625c:f037:2:a00:27ff:feb9:3519]:5062;branch=z9hG4bK-333138-f3b6705d5de367dfb415ff898550f9c2,SIP/2.0/UDP [fd17:625c:f037:2:a00:27ff:feb9:1521]:15060;branch=z9hG4bK-397430-71846-0;received=fd17:625c:f037:2:a00:27ff:feb9:1521\r\n",
    "From: \"sipp\" <sip:sipp@[fd17:625c:f037:2:a00:27ff:feb9:1521]:15060>;tag=397430SIPpTag0071846\r\n",
    "To: \"mcr\" <sip:mcr@[fd17:625c:f037:2:a00:27ff:feb9:3519]:5062>\r\n",
    "Call-ID: 71846-1647924829-397430@fd17:625c:f037:2:a00:27ff:feb9:1521\r\n",
    "CSeq: 1 INVITE\r\n",
    "Contact: <sip:sipp@[fd17:625c:f037:2:a00:27ff:feb9:1521]:15060>\r\n",
    "Max-Forwards: 69\r\n",
    "Subject: Performance Test\r\n",
    "Supported: 100rel,precondition\r\n",
    "Route: <sip:08019200028@[fd17:625c:f037:2:a00:27ff:feb9:4222]:25060;lr>,<sip:08019200028@[fd17:625c:f037:2:a00:27ff:feb9:4222]:25060;lr>\r\n",
    "Record-Route: <sip:origzFtdcRtHHqyuowAT@[fd17:625c:f037:2:a00:27ff:feb9:3519]:5062;lr>,<sip:08019200028@[fd17:625c:f037:2:a00:27ff:feb9:4222]:25060;lr>\r\n",
    "P-Served-User: \"uas\" <sip:08019200026@example.org>;sescase=orig\r\n",
    "P-Asserted-Identity: \"uas\" <sip:08019200026@example.org>\r\n",
    "Allow: INVITE,PRACK,CANCEL,BYE,UPDATE\r\n",
    "X-Orig-Call-Record: TRUE\r\n",
    "Content-Type: application/sdp\r\n",
    "Content-Length: 629\r\n",
    "\r\n",
    "v=0\r\n",
    "o=user1 53655765 2353687637 IN IP6 fd17:625c:f037:2:a00:27ff:feb9:1521\r\n",
    "s=-\r\n",
    "c=IN IP6 fd17:625c:f037:2:a00:27ff:feb9:4334\r\n",
    "t=0 0\r\n",
    "m=audio 30002 RTP/AVP 100 101 120 121\r\n",
    "a=rtpmap:100 AMR-WB/16000\r\n",
    "a=fmtp:100 mode-set=\"0,1,2\";octet-align=0\r\n",
    "a=rtpmap:101 AMR-WB/16000\r\n",
    "a=fmtp:101 mode-set=\"0,1,2\";octet-align=1\r\n",
    "a=rtpmap:110 AMR/8000\r\n",
    "a=fmtp:110 mode-set=\"0,1,2\";octet-align=0\r\n",
    "a=rtpmap:111 AMR/8000\r\n",
    "a=fmtp:111 mode-set=\"0,1,2\";octet-align=1\r\n",
    "a=rtpmap:120 telephone-event/8000\r\n",
    "a=rtpmap:121 telephone-event/16000\r\n",
    "a=des:qos mandatory local none\r\n",
    "a=des:qos mandatory remote none\r\n",
    "a=curr:qos local none\r\n",
    "a=curr:qos remote none\r\n",
);

/// prack-update-ipv6-frag-sll-010.sip
pub(super) const PROXIED_PRACK_OK_WITHOUT_LENGTH: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "Via: SIP/2.0/UDP [fd17:625c:f037:2:a00:27ff:feb9:3519]:5062;branch=z9hG4bK-333138-5952bebef7026469e082e7a4c1d98825,SIP/2.0/UDP [fd17:625c:f037:2:a00:27ff:feb9:1521]:15060;branch=z9hG4bK-397430-71846-3;received=fd17:625c:f037:2:a00:27ff:feb9:1521\r\n",
    "From: \"sipp\" <sip:sipp@[fd17:625c:f037:2:a00:27ff:feb9:1521]:15060>;tag=397430SIPpTag0071846\r\n",
    "To: \"mcr\" <sip:mcr@[fd17:625c:f037:2:a00:27ff:feb9:3519]:5062>;tag=1632476SIPpTag0171847\r\n",
    "Call-ID: 71846-1647924829-397430@fd17:625c:f037:2:a00:27ff:feb9:1521\r\n",
    "CSeq: 2 PRACK\r\n",
    "\r\n",
);

/// prack-update-ipv6-frag-sll-026.sip
pub(super) const INVITE_OK_WITH_TWO_TO_TAGS: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "Via: SIP/2.0/UDP [fd17:625c:f037:2:a00:27ff:feb9:3519]:5062;branch=z9hG4bK-333138-f3b6705d5de367dfb415ff898550f9c2,SIP/2.0/UDP [fd17:625c:f037:2:a00:27ff:feb9:1521]:15060;branch=z9hG4bK-397430-71846-0;received=fd17:625c:f037:2:a00:27ff:feb9:1521\r\n",
    "From: \"sipp\" <sip:sipp@[fd17:625c:f037:2:a00:27ff:feb9:1521]:15060>;tag=397430SIPpTag0071846\r\n",
    "To: \"mcr\" <sip:mcr@[fd17:625c:f037:2:a00:27ff:feb9:3519]:5062>;tag=1632476SIPpTag0271847;tag=1632476SIPpTag0171847\r\n",
    "Call-ID: 71846-1647924829-397430@fd17:625c:f037:2:a00:27ff:feb9:1521\r\n",
    "CSeq: 1 INVITE\r\n",
    "Allow: INVITE,PRACK,CANCEL,BYE,UPDATE\r\n",
    "Record-Route: <sip:origzFtdcRtHHqyuowAT@[fd17:625c:f037:2:a00:27ff:feb9:3519]:5062;lr>,<sip:08019200028@[fd17:625c:f037:2:a00:27ff:feb9:4222]:25060;lr>\r\n",
    "Contact: <sip:[fd17:625c:f037:2:a00:27ff:feb9:4222]:25060;transport=UDP>\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

/// prack-update-ipv6-frag-sll-008.sip
pub(super) const CLIENT_PRACK: &str = concat!(
    "PRACK sip:[fd17:625c:f037:2:a00:27ff:feb9:4222]:25060;transport=UDP SIP/2.0\r\n",
    "Via: SIP/2.0/UDP [fd17:625c:f037:2:a00:27ff:feb9:1521]:15060;branch=z9hG4bK-397430-71846-3\r\n",
    "From: \"sipp\" <sip:sipp@[fd17:625c:f037:2:a00:27ff:feb9:1521]:15060>;tag=397430SIPpTag0071846\r\n",
    "To: \"mcr\" <sip:mcr@[fd17:625c:f037:2:a00:27ff:feb9:3519]:5062>;tag=1632476SIPpTag0171847\r\n",
    "Call-ID: 71846-1647924829-397430@fd17:625c:f037:2:a00:27ff:feb9:1521\r\n",
    "CSeq: 2 PRACK\r\n",
    "Max-Forwards: 70\r\n",
    "Route:  <sip:origzFtdcRtHHqyuowAT@[fd17:625c:f037:2:a00:27ff:feb9:3519]:5062;lr>,<sip:08019200028@[fd17:625c:f037:2:a00:27ff:feb9:4222]:25060;lr>\r\n",
    "Subject: Performance Test\r\n",
    "RAck: 1 2 INVITE\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);
