//! Names the proxy looks for: header names with their compact forms (RFC 3261 §7.3.3,
//! §20) and request methods (RFC 3261 §7.1, RFC 3262, 3311, 3428, 3515, 3903, 6086,
//! 6665).

use std::fmt;

/// The compact forms RFC 3261 §7.3.3 and the extensions that register one define, with
/// their full names.
pub const COMPACT_FORMS: &[(char, &str)] = &[
    ('a', "Accept-Contact"),
    ('b', "Referred-By"),
    ('c', "Content-Type"),
    ('d', "Request-Disposition"),
    ('e', "Content-Encoding"),
    ('f', "From"),
    ('i', "Call-ID"),
    ('j', "Reject-Contact"),
    ('k', "Supported"),
    ('l', "Content-Length"),
    ('m', "Contact"),
    ('n', "Identity-Info"),
    ('o', "Event"),
    ('r', "Refer-To"),
    ('s', "Subject"),
    ('t', "To"),
    ('u', "Allow-Events"),
    ('v', "Via"),
    ('x', "Session-Expires"),
    ('y', "Identity"),
];

/// The headers the proxy reads or edits; every other name is `Other` and compares by
/// its bytes, case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Via,
    Route,
    RecordRoute,
    CallId,
    CSeq,
    From,
    To,
    Contact,
    MaxForwards,
    ContentLength,
    ContentType,
    Authorization,
    ProxyAuthorization,
    WwwAuthenticate,
    ProxyAuthenticate,
    AuthenticationInfo,
    ProxyAuthenticationInfo,
    RetryAfter,
    Require,
    ProxyRequire,
    Supported,
    Other,
}

/// Each known name with the spelling this element writes.
const KNOWN_HEADERS: &[(HeaderName, &str)] = &[
    (HeaderName::Via, "Via"),
    (HeaderName::Route, "Route"),
    (HeaderName::RecordRoute, "Record-Route"),
    (HeaderName::CallId, "Call-ID"),
    (HeaderName::CSeq, "CSeq"),
    (HeaderName::From, "From"),
    (HeaderName::To, "To"),
    (HeaderName::Contact, "Contact"),
    (HeaderName::MaxForwards, "Max-Forwards"),
    (HeaderName::ContentLength, "Content-Length"),
    (HeaderName::ContentType, "Content-Type"),
    (HeaderName::Authorization, "Authorization"),
    (HeaderName::ProxyAuthorization, "Proxy-Authorization"),
    (HeaderName::WwwAuthenticate, "WWW-Authenticate"),
    (HeaderName::ProxyAuthenticate, "Proxy-Authenticate"),
    (HeaderName::AuthenticationInfo, "Authentication-Info"),
    (
        HeaderName::ProxyAuthenticationInfo,
        "Proxy-Authentication-Info",
    ),
    (HeaderName::RetryAfter, "Retry-After"),
    (HeaderName::Require, "Require"),
    (HeaderName::ProxyRequire, "Proxy-Require"),
    (HeaderName::Supported, "Supported"),
];

impl HeaderName {
    /// The spelling this element writes; `None` for `Other`.
    pub fn canonical(self) -> Option<&'static str> {
        KNOWN_HEADERS
            .iter()
            .find(|(name, _)| *name == self)
            .map(|(_, spelling)| *spelling)
    }

    /// Whether the header's grammar is a comma-separated list whose elements
    /// [`MessageView::header_values`](super::MessageView::header_values) and
    /// [`Edit::remove_first_value`](super::Edit::remove_first_value) treat one at a time
    /// (§7.3.1). The credential and challenge headers are never combined that way,
    /// and the rest of the known headers hold one value. Names outside this enum count as
    /// lists, since callers ask for their values one by one; read a single-valued one
    /// (Date, User-Agent) with [`MessageView::header`](super::MessageView::header).
    pub fn is_list(self) -> bool {
        matches!(
            self,
            Self::Via
                | Self::Route
                | Self::RecordRoute
                | Self::Contact
                | Self::Require
                | Self::ProxyRequire
                | Self::Supported
                | Self::Other
        )
    }

    /// The kind of a header called `name` as written, and the full name when `name` is a
    /// compact form of a header outside this enum (`r` gives `Other`, `Refer-To`).
    pub(super) fn classify(name: &[u8]) -> (Self, Option<&'static str>) {
        let expanded = match name {
            [single] => COMPACT_FORMS
                .iter()
                .find(|(short, _)| *short == char::from(single.to_ascii_lowercase()))
                .map(|(_, full)| *full),
            _ => None,
        };
        let full = expanded.map_or(name, str::as_bytes);
        match KNOWN_HEADERS
            .iter()
            .find(|(_, spelling)| spelling.as_bytes().eq_ignore_ascii_case(full))
        {
            Some((known, _)) => (*known, None),
            None => (Self::Other, expanded),
        }
    }
}

/// A header name to look for: one of [`HeaderName`], or any other name. Built from a
/// `HeaderName` or from a `&str`, which resolves compact forms and known names, so
/// `"v"`, `"via"` and `HeaderName::Via` find the same lines. `Known(HeaderName::Other)`
/// finds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    Known(HeaderName),
    /// A full name outside [`HeaderName`], compared case-insensitively.
    Named(&'a str),
}

impl Lookup<'_> {
    /// The name to write on a new header line of this name.
    pub fn spelling(&self) -> &str {
        match self {
            Self::Known(name) => name.canonical().unwrap_or_default(),
            Self::Named(name) => name,
        }
    }
}

impl From<HeaderName> for Lookup<'_> {
    fn from(name: HeaderName) -> Self {
        Self::Known(name)
    }
}

impl<'a> From<&'a str> for Lookup<'a> {
    fn from(name: &'a str) -> Self {
        match HeaderName::classify(name.as_bytes()) {
            (HeaderName::Other, Some(full)) => Self::Named(full),
            (HeaderName::Other, None) => Self::Named(name),
            (known, _) => Self::Known(known),
        }
    }
}

/// A request method (§7.1). Methods are case-sensitive: `invite` is an extension method,
/// not INVITE. Any token is a method; one this element does not know is an `Extension`
/// borrowing its text from the message, and is forwarded like any other (§16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method<'a> {
    Invite,
    Ack,
    Bye,
    Cancel,
    Register,
    Options,
    /// RFC 3262.
    Prack,
    /// RFC 3311.
    Update,
    /// RFC 6086.
    Info,
    /// RFC 3428.
    Message,
    /// RFC 3515.
    Refer,
    /// RFC 6665.
    Subscribe,
    /// RFC 6665.
    Notify,
    /// RFC 3903.
    Publish,
    Extension(&'a str),
}

const KNOWN_METHODS: &[(Method<'static>, &str)] = &[
    (Method::Invite, "INVITE"),
    (Method::Ack, "ACK"),
    (Method::Bye, "BYE"),
    (Method::Cancel, "CANCEL"),
    (Method::Register, "REGISTER"),
    (Method::Options, "OPTIONS"),
    (Method::Prack, "PRACK"),
    (Method::Update, "UPDATE"),
    (Method::Info, "INFO"),
    (Method::Message, "MESSAGE"),
    (Method::Refer, "REFER"),
    (Method::Subscribe, "SUBSCRIBE"),
    (Method::Notify, "NOTIFY"),
    (Method::Publish, "PUBLISH"),
];

impl<'a> Method<'a> {
    /// The method named by `token`, or `None` when `token` is not an RFC 3261 token.
    pub fn parse(token: &'a str) -> Option<Self> {
        super::text::is_token(token.as_bytes()).then(|| Self::from_token(token))
    }

    /// The method named by a token the parser has already checked.
    pub(super) fn from_token(token: &'a str) -> Self {
        KNOWN_METHODS
            .iter()
            .find(|(_, spelling)| *spelling == token)
            .map_or(Self::Extension(token), |(method, _)| *method)
    }

    pub fn as_str(&self) -> &'a str {
        match self {
            Self::Extension(token) => token,
            known => KNOWN_METHODS
                .iter()
                .find(|(method, _)| method == known)
                .map_or("", |(_, spelling)| *spelling),
        }
    }
}

impl fmt::Display for Method<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}
