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
/// not INVITE. Any token is a method; one this element does not know is an `Extension`,
/// forwarded like any other (§16). `E` holds an extension's name: borrowed from the
/// message in the view ([`Method`]), inline in the proxy's model
/// ([`crate::sip::wire::Method`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MethodOf<E> {
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
    Extension(E),
}

/// A method as the view reads it, an extension's name borrowed from the message.
pub type Method<'a> = MethodOf<&'a str>;

impl<E> MethodOf<E> {
    /// The method this element knows by `spelling`, if any.
    fn known(spelling: &str) -> Option<Self> {
        Some(match spelling {
            "INVITE" => Self::Invite,
            "ACK" => Self::Ack,
            "BYE" => Self::Bye,
            "CANCEL" => Self::Cancel,
            "REGISTER" => Self::Register,
            "OPTIONS" => Self::Options,
            "PRACK" => Self::Prack,
            "UPDATE" => Self::Update,
            "INFO" => Self::Info,
            "MESSAGE" => Self::Message,
            "REFER" => Self::Refer,
            "SUBSCRIBE" => Self::Subscribe,
            "NOTIFY" => Self::Notify,
            "PUBLISH" => Self::Publish,
            _ => return None,
        })
    }

    /// The spelling of a known method; `None` for an extension.
    fn known_spelling(&self) -> Option<&'static str> {
        Some(match self {
            Self::Invite => "INVITE",
            Self::Ack => "ACK",
            Self::Bye => "BYE",
            Self::Cancel => "CANCEL",
            Self::Register => "REGISTER",
            Self::Options => "OPTIONS",
            Self::Prack => "PRACK",
            Self::Update => "UPDATE",
            Self::Info => "INFO",
            Self::Message => "MESSAGE",
            Self::Refer => "REFER",
            Self::Subscribe => "SUBSCRIBE",
            Self::Notify => "NOTIFY",
            Self::Publish => "PUBLISH",
            Self::Extension(_) => return None,
        })
    }

    /// The same method with its extension's name held by `hold`; `None` when `hold`
    /// refuses the name.
    pub fn map_extension<F>(self, hold: impl FnOnce(E) -> Option<F>) -> Option<MethodOf<F>> {
        match self {
            Self::Extension(name) => hold(name).map(MethodOf::Extension),
            known => known.known_spelling().and_then(MethodOf::known),
        }
    }
}

impl<E: AsRef<str>> MethodOf<E> {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Extension(name) => name.as_ref(),
            known => known.known_spelling().unwrap_or_default(),
        }
    }
}

impl<'a> Method<'a> {
    /// The method named by `token`, or `None` when `token` is not an RFC 3261 token.
    pub fn parse(token: &'a str) -> Option<Self> {
        super::text::is_token(token.as_bytes()).then(|| Self::from_token(token))
    }

    /// The method named by a token the parser has already checked.
    pub(super) fn from_token(token: &'a str) -> Self {
        Self::known(token).unwrap_or(Self::Extension(token))
    }
}

impl<E: AsRef<str>> fmt::Display for MethodOf<E> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}
