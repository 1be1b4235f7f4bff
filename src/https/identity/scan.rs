//! Small, bounded scanners for the text a request carries: percent-encoding, query and form
//! fields, address shapes, and one XML element's text. Each returns `None` on anything
//! malformed instead of guessing.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use memchr::{memchr, memmem};
use uuid::Uuid;

/// At most this many bytes of a body are scanned for an XML element or a form field.
pub const SCAN_LIMIT: usize = 16 * 1024;

/// Base64, standard alphabet, padding optional: clients drop it or percent-encode it
/// (ActiveSync queries), and some omit it in `Authorization`.
pub const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Longest value taken from a query parameter, form field or XML element.
const MAX_VALUE: usize = 1024;

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`, as HTML forms encode
/// it). A stray `%` or a result that is not UTF-8 is malformed.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    if !s.contains(['%', '+']) {
        return Some(s.to_string());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = hex(*b.get(i + 1)?)?;
                let lo = hex(*b.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The `name=value` pairs of a query or form, names decoded, values still raw.
pub fn pairs(text: &str) -> impl Iterator<Item = (Option<String>, &str)> {
    text.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (percent_decode(k, false), v)
    })
}

/// The first value of query parameter `name` (case-insensitive), percent-decoded. `+`
/// stays a plus: in a URL it is more often part of an address (`a+tag@`) than a space.
/// An empty or over-long value counts as absent.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    let raw = pairs(query)
        .find(|(k, _)| k.as_deref().is_some_and(|k| k.eq_ignore_ascii_case(name)))?
        .1;
    value(&percent_decode(raw, false)?)
}

/// The first value of field `name` in an `application/x-www-form-urlencoded` body; `+`
/// is a space there. A body of [`SCAN_LIMIT`] bytes or more may have been cut, so its last
/// field (not followed by `&`) is not trusted. Raw non-ASCII bytes are malformed: a form
/// encodes them.
pub fn form_field(body: &[u8], name: &str) -> Option<String> {
    let cut = body.len() >= SCAN_LIMIT;
    let mut body = &body[..body.len().min(SCAN_LIMIT)];
    if cut {
        body = &body[..memchr::memrchr(b'&', body)?];
    }
    if !body.is_ascii() {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    let raw = pairs(text)
        .find(|(k, _)| k.as_deref().is_some_and(|k| k.eq_ignore_ascii_case(name)))?
        .1;
    value(&percent_decode(raw, true)?)
}

fn value(v: &str) -> Option<String> {
    let v = v.trim();
    (!v.is_empty() && v.len() <= MAX_VALUE && !v.chars().any(char::is_control))
        .then(|| v.to_string())
}

/// An SMTP address as a mailbox hint may name it: one `@`, a dot-atom-like local part of at
/// most 64 octets, a host-name domain (IDN allowed). Refused although RFC 5321 allows some
/// of them: quoted local parts, domain literals, and `/ ? # \` — the characters the
/// explicit-logon tricks are made of (`autodiscover.json?@evil/mapi/…`), never seen in a
/// real mailbox's address.
pub fn is_address(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| {
            !c.is_control()
                && !c.is_whitespace()
                && !matches!(
                    c,
                    '@' | '/'
                        | '?'
                        | '#'
                        | '\\'
                        | '"'
                        | '('
                        | ')'
                        | '<'
                        | '>'
                        | '['
                        | ']'
                        | ':'
                        | ';'
                        | ','
                )
        })
        && is_domain(domain)
}

/// A host name: dot-separated labels of letters, digits and `-` (or non-ASCII, for IDN),
/// at most 253 octets, no empty label.
pub fn is_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        })
        && !s.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// An ExchangeGuid as Exchange writes it in an anchor or URL: 32 hex digits, or the
/// 8-4-4-4-12 form, either optionally in `{}` or `()`. The nil GUID names nothing.
pub fn parse_guid(s: &str) -> Option<Uuid> {
    let inner = s
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .or_else(|| s.strip_prefix('(').and_then(|r| r.strip_suffix(')')))
        .unwrap_or(s);
    if !(inner.len() == 32 || inner.len() == 36) {
        return None;
    }
    let g = Uuid::try_parse(inner).ok()?;
    (!g.is_nil()).then_some(g)
}

/// A Windows security identifier, `S-1-<authority>-<sub>…` (decimal), normalised to a
/// capital `S`.
pub fn parse_sid(s: &str) -> Option<String> {
    let rest = s.strip_prefix("S-1-").or_else(|| s.strip_prefix("s-1-"))?;
    let parts: Vec<&str> = rest.split('-').collect();
    let ok = (2..=16).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 10 && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then(|| format!("S-1-{rest}"))
}

/// The text of the first element whose local name (any namespace prefix) is `local`
/// (ASCII case-insensitive) and whose trimmed, entity-decoded text satisfies `accept`.
///
/// Not an XML parser: a bounded scan (the first [`SCAN_LIMIT`] bytes) that skips comments,
/// CDATA sections outside the element, processing instructions, declarations and end tags,
/// honours quoted attribute values, and trusts a text only when its element's end tag
/// follows it inside the scanned bytes, so a value cut by the limit is never taken. A
/// body in UTF-16 finds nothing.
pub fn xml_text(body: &[u8], local: &str, accept: impl Fn(&str) -> bool) -> Option<String> {
    let b = &body[..body.len().min(SCAN_LIMIT)];
    let mut i = 0;
    while let Some(off) = memchr(b'<', &b[i..]) {
        let start = i + off + 1;
        let rest = &b[start..];
        if rest.starts_with(b"!--") {
            i = start + 3 + memmem::find(&rest[3..], b"-->")? + 3;
            continue;
        }
        if rest.starts_with(b"![CDATA[") {
            i = start + memmem::find(rest, b"]]>")? + 3;
            continue;
        }
        if rest.starts_with(b"?") || rest.starts_with(b"!") || rest.starts_with(b"/") {
            i = start + memchr(b'>', rest)? + 1;
            continue;
        }
        let name_len = rest
            .iter()
            .position(|c| c.is_ascii_whitespace() || *c == b'/' || *c == b'>')?;
        let name = &rest[..name_len];
        let (tag_len, self_closing) = tag_end(&rest[name_len..])?;
        i = start + name_len + tag_len;
        let local_name = name.rsplit(|c| *c == b':').next().unwrap_or(name);
        if self_closing || !local_name.eq_ignore_ascii_case(local.as_bytes()) {
            continue;
        }
        let text_end = i + memchr(b'<', &b[i..])?;
        let raw = &b[i..text_end];
        let after = &b[text_end..];
        let text = if raw.iter().all(u8::is_ascii_whitespace) && after.starts_with(b"<![CDATA[") {
            let body = &after[9..];
            let end = memmem::find(body, b"]]>")?;
            if !body[end + 3..].starts_with(b"</") {
                continue;
            }
            std::str::from_utf8(&body[..end]).ok()?.to_string()
        } else if after.starts_with(b"</") {
            decode_entities(raw)?
        } else {
            // Mixed content: a child element, not this element's value.
            continue;
        };
        let text = text.trim();
        if !text.is_empty() && text.len() <= MAX_VALUE && accept(text) {
            return Some(text.to_string());
        }
    }
    None
}

/// Where a start tag ends: the length up to and including `>`, and whether it was `/>`.
/// Quoted attribute values may hold `>`.
fn tag_end(attrs: &[u8]) -> Option<(usize, bool)> {
    let mut quote = None;
    for (i, &c) in attrs.iter().enumerate() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, b'"' | b'\'') => quote = Some(c),
            (None, b'>') => return Some((i + 1, i > 0 && attrs[i - 1] == b'/')),
            _ => {}
        }
    }
    None
}

/// Replaces the five predefined entities and character references; any other `&` is
/// malformed (this scan does not read DTDs).
fn decode_entities(raw: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(raw).ok()?;
    if !s.contains('&') {
        return Some(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let semi = after.find(';')?;
        let name = &after[..semi];
        let c = match name {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let n = if let Some(h) = name.strip_prefix("#x").or_else(|| name.strip_prefix("#X"))
                {
                    u32::from_str_radix(h, 16).ok()?
                } else {
                    name.strip_prefix('#')?.parse().ok()?
                };
                char::from_u32(n)?
            }
        };
        out.push(c);
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("contoso%5Cjdoe", false).unwrap(),
            "contoso\\jdoe"
        );
        assert_eq!(percent_decode("a+b%40c.com", false).unwrap(), "a+b@c.com");
        assert_eq!(percent_decode("a+b", true).unwrap(), "a b");
        assert_eq!(percent_decode("M%C3%BCller", false).unwrap(), "Müller");
        for bad in ["%", "%4", "%zz", "%FF", "a%C3"] {
            assert_eq!(percent_decode(bad, false), None, "{bad}");
        }
    }

    #[test]
    fn query_and_form_fields() {
        let q = "Cmd=Ping&user=CONTOSO%5Cjdoe&DeviceId=abc&Empty=&flag";
        assert_eq!(query_param(q, "User").unwrap(), "CONTOSO\\jdoe");
        assert_eq!(query_param(q, "deviceid").unwrap(), "abc");
        assert_eq!(query_param(q, "Empty"), None);
        assert_eq!(query_param(q, "flag"), None);
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(
            query_param("a=%ZZ&a=ok", "a"),
            None,
            "the first value decides"
        );
        let form =
            b"destination=https%3A%2F%2Fmail%2Fowa%2F&flags=4&username=contoso%5Cjdoe&password=p+w";
        assert_eq!(form_field(form, "username").unwrap(), "contoso\\jdoe");
        assert_eq!(form_field(form, "password").unwrap(), "p w");
        assert_eq!(form_field(b"username=a\x01b", "username"), None);
        assert_eq!(form_field(b"username=j\xffdoe", "username"), None);
        // A body as long as the limit may be cut: its last field is not taken.
        let mut long = b"username=contoso%5Cjdoe&x=".to_vec();
        long.resize(SCAN_LIMIT + 10, b'a');
        assert_eq!(form_field(&long, "username").unwrap(), "contoso\\jdoe");
        let field = b"&username=contoso%5Cjd";
        let mut cut = b"x=".to_vec();
        cut.resize(SCAN_LIMIT - field.len(), b'a');
        cut.extend_from_slice(field);
        cut.extend_from_slice(b"oe&password=x");
        assert_eq!(form_field(&cut, "username"), None, "cut inside the value");
    }

    #[test]
    fn address_shapes() {
        for ok in [
            "jdoe@contoso.com",
            "a+tag@x.example",
            "müller@bücher.example",
            "o'brien@x.y",
        ] {
            assert!(is_address(ok), "{ok}");
        }
        for bad in [
            "",
            "jdoe",
            "@contoso.com",
            "jdoe@",
            "a@b@c.com",
            "autodiscover/autodiscover.json?@evil.corp",
            "x@evil.corp/mapi/nspi",
            "\"quoted\"@x.com",
            "a@[10.0.0.1]",
            "a b@x.com",
            "a@-x.com",
            "a@x..com",
            ".a@x.com",
            "Oid:1234@tenant",
        ] {
            assert!(!is_address(bad), "{bad}");
        }
        assert!(!is_address(&format!("{}@x.com", "a".repeat(65))));
    }

    #[test]
    fn guids_and_sids() {
        let g = "94d75396-7b0a-4ba6-9c4f-2c5e5d9e1a0b";
        let want = Uuid::parse_str(g).unwrap();
        for form in [
            g.to_string(),
            g.to_uppercase(),
            g.replace('-', ""),
            format!("{{{g}}}"),
            format!("({g})"),
        ] {
            assert_eq!(parse_guid(&form), Some(want), "{form}");
        }
        for bad in [
            "00000000-0000-0000-0000-000000000000",
            "94d75396-7b0a-4ba6-9c4f",
            "urn:uuid:94d75396-7b0a-4ba6-9c4f-2c5e5d9e1a0b",
            "{94d75396-7b0a-4ba6-9c4f-2c5e5d9e1a0b)",
            "jdoe",
        ] {
            assert_eq!(parse_guid(bad), None, "{bad}");
        }
        assert_eq!(
            parse_sid("s-1-5-21-1004336348-1177238915-682003330-1001").unwrap(),
            "S-1-5-21-1004336348-1177238915-682003330-1001"
        );
        for bad in ["S-1-5", "S-1-5-", "S-1-5-x-1", "S-2-5-21", "SID:S-1-5-21-1"] {
            assert_eq!(parse_sid(bad), None, "{bad}");
        }
    }

    #[test]
    fn xml_element_text() {
        let any = |_: &str| true;
        let body = br#"<?xml version="1.0" encoding="utf-8"?>
<!-- <EMailAddress>comment@contoso.com</EMailAddress> -->
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress a=">" b='/>'>
       jdoe@contoso.com
    </EMailAddress>
  </Request>
</Autodiscover>"#;
        assert_eq!(
            xml_text(body, "EMailAddress", any).unwrap(),
            "jdoe@contoso.com"
        );
        assert_eq!(
            xml_text(body, "emailaddress", any).unwrap(),
            "jdoe@contoso.com"
        );
        let prefixed =
            b"<a:Users><a:User><a:Mailbox>x&amp;y@contoso.com</a:Mailbox></a:User></a:Users>";
        assert_eq!(
            xml_text(prefixed, "Mailbox", any).unwrap(),
            "x&y@contoso.com"
        );
        let cdata = b"<Mailbox><![CDATA[c@contoso.com]]></Mailbox>";
        assert_eq!(xml_text(cdata, "Mailbox", any).unwrap(), "c@contoso.com");
        let refs = b"<Mailbox>&#106;doe&#x40;contoso.com</Mailbox>";
        assert_eq!(xml_text(refs, "Mailbox", any).unwrap(), "jdoe@contoso.com");
        // A parent element with children is skipped for a later one with text.
        let nested = b"<t:Mailbox><t:EmailAddress>a@b.c</t:EmailAddress></t:Mailbox><Mailbox>z@b.c</Mailbox>";
        assert_eq!(xml_text(nested, "Mailbox", any).unwrap(), "z@b.c");
        // `accept` filters: the first acceptable one wins.
        let two = b"<Mailbox>not an address</Mailbox><Mailbox>b@c.d</Mailbox>";
        assert_eq!(xml_text(two, "Mailbox", is_address).unwrap(), "b@c.d");
        for bad in [
            &b"<EMailAddress>jdoe@contoso.com"[..],
            b"<EMailAddress/>jdoe@contoso.com</EMailAddress>",
            b"<EMailAddressX>jdoe@contoso.com</EMailAddressX>",
            b"<EMailAddress>a&unknown;b</EMailAddress>",
            b"<EMailAddress>a&amp</EMailAddress>",
            b"<!-- <EMailAddress>x@y.z</EMailAddress>",
            b"<EMailAddress attr=\"unterminated>x@y.z</EMailAddress>",
            b"<EMailAddress>\xff@y.z</EMailAddress>",
            b"<EMailAddress>   </EMailAddress>",
        ] {
            assert_eq!(
                xml_text(bad, "EMailAddress", any),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A value that the scan limit cuts is not taken.
        let mut long = b"<x>".to_vec();
        long.resize(SCAN_LIMIT - 20, b' ');
        long.extend_from_slice(b"<EMailAddress>jdoe@contoso.com</EMailAddress>");
        assert_eq!(xml_text(&long, "EMailAddress", any), None);
    }
}
