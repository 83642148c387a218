//! Header-level helpers that `rsip` 0.4 lacks: compact header forms (RFC 3261 §7.3.3),
//! splitting comma-separated header values, and the URI inside a name-addr.
//!
//! `rsip` parses `v:` or `i:` into `Header::Other("v", ..)`, so its typed accessors such as
//! `via_header()` or `call_id_header()` fail on compact messages. [`expand_compact`] turns
//! such headers back into their typed variants right after parsing; everything downstream
//! then sees one form.

use rsip::Header;

/// The compact forms RFC 3261 §7.3.3 (and the extensions that register one) define,
/// with their full names: one table, the message view's.
pub use super::view::COMPACT_FORMS;

/// The full name for a compact header name, if `name` is one.
pub fn full_name(name: &str) -> Option<&'static str> {
    let mut chars = name.chars();
    let first = chars.next()?;
    if chars.next().is_some() {
        return None;
    }
    let lower = first.to_ascii_lowercase();
    COMPACT_FORMS
        .iter()
        .find(|(short, _)| *short == lower)
        .map(|(_, long)| *long)
}

/// Turns a header that `rsip` left as `Other` because it was written in compact form into
/// its typed variant. Headers that are not compact are returned unchanged.
pub fn expand_compact(header: Header) -> Header {
    let Header::Other(name, value) = header else {
        return header;
    };
    let Some(long) = full_name(&name) else {
        return Header::Other(name, value);
    };
    match long {
        "Via" => Header::Via(value.into()),
        "Call-ID" => Header::CallId(value.into()),
        "From" => Header::From(value.into()),
        "To" => Header::To(value.into()),
        "Contact" => Header::Contact(value.into()),
        "Content-Length" => Header::ContentLength(value.into()),
        "Content-Type" => Header::ContentType(value.into()),
        "Content-Encoding" => Header::ContentEncoding(value.into()),
        "Supported" => Header::Supported(value.into()),
        "Subject" => Header::Subject(value.into()),
        "Event" => Header::Event(value.into()),
        other => Header::Other(other.to_string(), value),
    }
}

/// Splits a header value at the commas that separate list elements (RFC 3261 §7.3.1),
/// ignoring commas inside quoted strings and inside `<...>`. Elements are trimmed and
/// empty ones dropped.
pub fn split_list(value: &str) -> Vec<&str> {
    let bytes = value.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    while let Some(comma) = super::view::next_separator(bytes, start, b',', true) {
        parts.push(value.get(start..comma).unwrap_or_default().trim());
        start = comma + 1;
    }
    parts.push(value.get(start..).unwrap_or_default().trim());
    parts.retain(|part| !part.is_empty());
    parts
}

/// The URI of a name-addr or addr-spec (`"Bob" <sip:bob@host;lr>;p=1` gives
/// `sip:bob@host;lr`). Without angle brackets, header parameters after `;` belong to the
/// header, so the URI ends at the first `;` after the host part.
pub fn name_addr_uri(value: &str) -> &str {
    let value = value.trim();
    if let Some(open) = value.find('<') {
        let rest = &value[open + 1..];
        return match rest.find('>') {
            Some(close) => rest[..close].trim(),
            None => rest.trim(),
        };
    }
    match value.find(';') {
        Some(semicolon) => value[..semicolon].trim(),
        None => value,
    }
}

/// The value of parameter `name` in a `;`-separated parameter list (`;tag=abc;lr`):
/// `Some(Some(value))`, `Some(None)` for a flag, `None` when absent. Names compare
/// case-insensitively.
pub fn param<'a>(params: &'a str, name: &str) -> Option<Option<&'a str>> {
    params
        .split(';')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .find_map(|part| {
            let (key, value) = match part.split_once('=') {
                Some((key, value)) => (key.trim(), Some(value.trim())),
                None => (part, None),
            };
            key.eq_ignore_ascii_case(name).then_some(value)
        })
}

/// The header parameters of a name-addr header such as From or To: what follows the
/// closing `>`, or, without brackets, what follows the first `;`.
pub fn header_params(value: &str) -> &str {
    if let Some(close) = value.rfind('>') {
        return &value[close + 1..];
    }
    match value.find(';') {
        Some(semicolon) => &value[semicolon..],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_names_map_to_full_names_case_insensitively() {
        assert_eq!(full_name("v"), Some("Via"));
        assert_eq!(full_name("I"), Some("Call-ID"));
        for (short, long) in [
            ("f", "From"),
            ("t", "To"),
            ("m", "Contact"),
            ("l", "Content-Length"),
            ("c", "Content-Type"),
            ("k", "Supported"),
            ("s", "Subject"),
            ("e", "Content-Encoding"),
        ] {
            assert_eq!(full_name(short), Some(long));
        }
        assert_eq!(full_name("via"), None);
        assert_eq!(full_name("z"), None);
        assert_eq!(full_name(""), None);
    }

    #[test]
    fn compact_header_becomes_typed_variant() {
        let expanded = expand_compact(Header::Other(
            "v".into(),
            "SIP/2.0/UDP a;branch=z9hG4bK1".into(),
        ));
        assert!(matches!(expanded, Header::Via(_)));
        let expanded = expand_compact(Header::Other("i".into(), "abc@host".into()));
        assert!(matches!(expanded, Header::CallId(_)));
        let untouched = expand_compact(Header::Other("X-Custom".into(), "1".into()));
        assert_eq!(untouched, Header::Other("X-Custom".into(), "1".into()));
        let renamed = expand_compact(Header::Other("r".into(), "<sip:x@y>".into()));
        assert_eq!(
            renamed,
            Header::Other("Refer-To".into(), "<sip:x@y>".into())
        );
    }

    #[test]
    fn list_split_respects_quotes_and_brackets() {
        assert_eq!(
            split_list("SIP/2.0/UDP a;branch=1, SIP/2.0/TCP b;branch=2"),
            vec!["SIP/2.0/UDP a;branch=1", "SIP/2.0/TCP b;branch=2"]
        );
        assert_eq!(
            split_list(r#""Doe, John" <sip:j@x;a=1,2>, <sip:k@y>"#),
            vec![r#""Doe, John" <sip:j@x;a=1,2>"#, "<sip:k@y>"]
        );
        assert_eq!(
            split_list(r#""a\"," <sip:a@b>"#),
            vec![r#""a\"," <sip:a@b>"#]
        );
        assert_eq!(split_list(" , "), Vec::<&str>::new());
    }

    #[test]
    fn name_addr_uri_and_params() {
        assert_eq!(
            name_addr_uri(r#""Bob" <sip:bob@h;lr>;tag=9"#),
            "sip:bob@h;lr"
        );
        assert_eq!(name_addr_uri("sip:alice@h;tag=1"), "sip:alice@h");
        assert_eq!(header_params(r#""Bob" <sip:bob@h;lr>;tag=9"#), ";tag=9");
        assert_eq!(header_params("sip:alice@h;tag=1"), ";tag=1");
        assert_eq!(param(";tag=9;lr", "TAG"), Some(Some("9")));
        assert_eq!(param(";tag=9;lr", "lr"), Some(None));
        assert_eq!(param(";tag=9", "lr"), None);
    }
}
