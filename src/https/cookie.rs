//! coexist's own signed routing cookie (SPEC §5.2).
//!
//! After an OWA logon (and on any response that names the mailbox) the client gets a cookie
//! that says which mailbox it is, so later requests that carry only Exchange's own cookies
//! still route to the mailbox's owner. The cookie names the *mailbox*, never a target: the
//! owner is looked up in the active table on every request, so a cutover or rollback takes
//! effect without re-issuing anything.
//!
//! ```text
//! coexist_route=v1.<mailbox, base64url>.<issued, unix seconds>.<HMAC-SHA256, base64url>
//! ```
//!
//! The MAC covers `v1|<mailbox as base64url>|<issued>`, keyed by bytes every instance shares
//! (so any instance accepts what another issued). The backend must never see the cookie:
//! [`strip_in`] removes it from a request's `Cookie` headers before forwarding.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hyper::header::COOKIE;
use hyper::http::{HeaderMap, HeaderValue};
use ring::hmac;

/// The cookie's name.
pub const NAME: &str = "coexist_route";

/// The shortest key accepted: as long as the HMAC-SHA256 output.
pub const MIN_KEY_BYTES: usize = 32;

/// How far an issue time may lie in the future: instances' clocks differ a little.
pub const MAX_SKEW: Duration = Duration::from_secs(300);

/// A reasonable lifetime: OWA's own session on a private computer lasts 8 hours.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(8 * 3600);

/// The format version, first in the value and in the signed text.
const VERSION: &str = "v1";

/// Longer values are not ours and are not decoded (a mailbox address is at most 320
/// octets, about 430 in base64).
const MAX_VALUE_LEN: usize = 1024;

/// The attributes of every cookie issued: sent only over TLS, invisible to scripts, not sent
/// on cross-site subrequests but kept on top-level navigation (links into OWA from mail).
const ATTRIBUTES: &str = "Path=/; Secure; HttpOnly; SameSite=Lax";

/// The HMAC key that signs and checks routing cookies.
pub struct CookieKey(hmac::Key);

/// Why a key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("routing cookie key has {0} bytes, at least {MIN_KEY_BYTES} are needed")]
    TooShort(usize),
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: a routing cookie key file holds hex digits (e.g. `openssl rand -hex 32`)",
        path.display()
    )]
    NotHex { path: PathBuf },
    #[error(
        "{}: routing cookie key has {len} bytes, at least {MIN_KEY_BYTES} are needed",
        path.display()
    )]
    FileTooShort { path: PathBuf, len: usize },
}

impl CookieKey {
    /// A key from at least [`MIN_KEY_BYTES`] secret bytes.
    pub fn new(bytes: &[u8]) -> Result<CookieKey, KeyError> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(CookieKey(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    /// A key from a file of hex digits (at least 64: 32 bytes), surrounding whitespace
    /// ignored: `openssl rand -hex 32 > route.key`.
    ///
    /// Hex only, not raw bytes: a text file survives editors, configuration management and
    /// secret stores unchanged, while a raw key whose last byte happens to be a newline
    /// would be ambiguous once anything trims it.
    pub fn from_file(path: &Path) -> Result<CookieKey, KeyError> {
        let text = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let bytes = decode_hex(text.trim_ascii()).ok_or_else(|| KeyError::NotHex {
            path: path.to_path_buf(),
        })?;
        CookieKey::new(&bytes).map_err(|_| KeyError::FileTooShort {
            path: path.to_path_buf(),
            len: bytes.len(),
        })
    }
}

impl std::fmt::Debug for CookieKey {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieKey(..)")
    }
}

/// The `Set-Cookie` header value that names `mailbox`, issued at `now`, for `max_age`.
pub fn issue(key: &CookieKey, mailbox: &str, now: SystemTime, max_age: Duration) -> String {
    let mailbox = B64.encode(mailbox);
    let issued = unix_secs(now).to_string();
    let tag = hmac::sign(&key.0, &signed_text(&mailbox, &issued));
    format!(
        "{NAME}={VERSION}.{mailbox}.{issued}.{}; {ATTRIBUTES}; Max-Age={}",
        B64.encode(tag.as_ref()),
        max_age.as_secs()
    )
}

/// The `Set-Cookie` header value that removes the cookie (a mailbox that moved, a logoff).
pub fn expire() -> String {
    format!("{NAME}=; {ATTRIBUTES}; Max-Age=0")
}

/// The mailbox named by a valid routing cookie in one `Cookie` header value: signed by
/// `key`, issued at most `max_age` before `now` and at most [`MAX_SKEW`] after it. Other
/// cookies are ignored; when several `coexist_route` cookies are present, the first valid
/// one counts.
pub fn verify(
    key: &CookieKey,
    cookie_header: &str,
    now: SystemTime,
    max_age: Duration,
) -> Option<String> {
    verify_value(key, cookie_header.as_bytes(), unix_secs(now), max_age)
}

/// [`verify`] over every `Cookie` header of a request (HTTP/1.1 clients should send one,
/// some send several).
pub fn verify_in(
    key: &CookieKey,
    headers: &HeaderMap,
    now: SystemTime,
    max_age: Duration,
) -> Option<String> {
    let now = unix_secs(now);
    headers
        .get_all(COOKIE)
        .iter()
        .find_map(|v| verify_value(key, v.as_bytes(), now, max_age))
}

/// One `Cookie` header value without the routing cookie (valid or not), the other cookies
/// kept in order and joined by `; `; `None` when nothing is left (drop the header).
pub fn strip(cookie_header: &str) -> Option<String> {
    strip_value(cookie_header.as_bytes()).map(|kept| String::from_utf8_lossy(&kept).into_owned())
}

/// [`strip`] over every `Cookie` header of a request: what the backend gets.
pub fn strip_in(headers: &mut HeaderMap) {
    if !headers.contains_key(COOKIE) {
        return;
    }
    // A value that cannot be rebuilt (it always can: its bytes are a subset of a valid
    // one's) is dropped rather than forwarded with the routing cookie in it.
    let kept: Vec<HeaderValue> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| strip_value(v.as_bytes()))
        .filter_map(|v| HeaderValue::from_bytes(&v).ok())
        .collect();
    headers.remove(COOKIE);
    for v in kept {
        headers.append(COOKIE, v);
    }
}

fn verify_value(key: &CookieKey, header: &[u8], now: u64, max_age: Duration) -> Option<String> {
    pairs(header)
        .filter(|(name, _)| *name == NAME.as_bytes())
        .find_map(|(_, value)| check(key, value, now, max_age))
}

/// One cookie value: shape, MAC, age, then the mailbox.
fn check(key: &CookieKey, value: &[u8], now: u64, max_age: Duration) -> Option<String> {
    if value.len() > MAX_VALUE_LEN {
        return None;
    }
    let value = std::str::from_utf8(value).ok()?;
    let mut parts = value.split('.');
    let (version, mailbox, issued, tag) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || version != VERSION {
        return None;
    }
    // Digits only: `u64::from_str` would also take a sign.
    if issued.is_empty() || issued.len() > 20 || !issued.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let tag = B64.decode(tag).ok()?;
    // Constant-time comparison inside ring.
    hmac::verify(&key.0, &signed_text(mailbox, issued), &tag).ok()?;
    let issued: u64 = issued.parse().ok()?;
    if issued > now.saturating_add(MAX_SKEW.as_secs())
        || now.saturating_sub(issued) > max_age.as_secs()
    {
        return None;
    }
    String::from_utf8(B64.decode(mailbox).ok()?).ok()
}

/// What the MAC covers. The mailbox is in its base64url form, which has no `|`, so the
/// text splits one way only.
fn signed_text(mailbox_b64: &str, issued: &str) -> Vec<u8> {
    [VERSION, "|", mailbox_b64, "|", issued]
        .concat()
        .into_bytes()
}

fn strip_value(header: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(header.len());
    for pair in header.split(|b| *b == b';') {
        let pair = trim_ows(pair);
        // Any spelling of our name goes: the backend never needs it.
        if pair.is_empty() || name_of(pair).eq_ignore_ascii_case(NAME.as_bytes()) {
            continue;
        }
        if !out.is_empty() {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(pair);
    }
    (!out.is_empty()).then_some(out)
}

/// `name=value` pairs of a `Cookie` header (RFC 6265 §4.2.1, read leniently: empty pairs
/// skipped, whitespace around names and values ignored, a pair without `=` has an empty
/// value).
fn pairs(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    header.split(|b| *b == b';').filter_map(|pair| {
        let pair = trim_ows(pair);
        if pair.is_empty() {
            return None;
        }
        Some(match pair.iter().position(|b| *b == b'=') {
            Some(eq) => (trim_ows(&pair[..eq]), trim_ows(&pair[eq + 1..])),
            None => (pair, &[][..]),
        })
    })
}

fn name_of(pair: &[u8]) -> &[u8] {
    let end = pair.iter().position(|b| *b == b'=').unwrap_or(pair.len());
    trim_ows(&pair[..end])
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = s.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(start), Some(end)) => &s[start..=end],
        _ => &[],
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn decode_hex(s: &[u8]) -> Option<Vec<u8>> {
    fn nibble(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;
    const HOUR: Duration = Duration::from_secs(3600);

    fn key() -> CookieKey {
        CookieKey::new(&[7u8; 32]).unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// The `name=value` part of a Set-Cookie header value, as a browser sends it back.
    fn sent_back(set_cookie: &str) -> String {
        set_cookie.split(';').next().unwrap().to_string()
    }

    fn value_of(set_cookie: &str) -> String {
        sent_back(set_cookie)[NAME.len() + 1..].to_string()
    }

    #[test]
    fn an_issued_cookie_names_its_mailbox_back() {
        let set = issue(&key(), "jdoe@contoso.com", at(T0), HOUR);
        assert!(set.starts_with("coexist_route=v1.amRvZUBjb250b3NvLmNvbQ.1800000000."));
        assert!(set.ends_with("; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=3600"));
        let back = sent_back(&set);
        assert_eq!(
            verify(&key(), &back, at(T0 + 10), HOUR).as_deref(),
            Some("jdoe@contoso.com")
        );
        // Unicode and characters that matter to the format survive.
        for mailbox in ["ålice@bücher.example", "a|b.c;d=e@x", ""] {
            let back = sent_back(&issue(&key(), mailbox, at(T0), HOUR));
            assert_eq!(
                verify(&key(), &back, at(T0), HOUR).as_deref(),
                Some(mailbox)
            );
        }
    }

    #[test]
    fn another_key_does_not_verify() {
        let back = sent_back(&issue(&key(), "jdoe@contoso.com", at(T0), HOUR));
        let other = CookieKey::new(&[8u8; 32]).unwrap();
        assert_eq!(verify(&other, &back, at(T0), HOUR), None);
    }

    #[test]
    fn a_tampered_mailbox_issue_time_or_mac_does_not_verify() {
        let value = value_of(&issue(&key(), "jdoe@contoso.com", at(T0), HOUR));
        let parts: Vec<&str> = value.split('.').collect();
        let evil = B64.encode("boss@contoso.com");
        let forged = [
            format!("v1.{evil}.{}.{}", parts[2], parts[3]),
            format!("v1.{}.{}.{}", parts[1], T0 + 100, parts[3]),
            format!("v1.{}.{}.{}", parts[1], parts[2], B64.encode([0u8; 32])),
            format!("v1.{}.{}.{}x", parts[1], parts[2], parts[3]),
            format!("v1.{}.{}.{}", parts[1], parts[2], &parts[3][..10]),
            format!("v2.{}.{}.{}", parts[1], parts[2], parts[3]),
            format!("v1.{}.+{}.{}", parts[1], parts[2], parts[3]),
        ];
        for f in forged {
            assert_eq!(
                verify(&key(), &format!("{NAME}={f}"), at(T0), HOUR),
                None,
                "{f}"
            );
        }
        // Each byte flipped in turn.
        for i in 0..value.len() {
            let mut bytes = value.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let f = String::from_utf8(bytes).unwrap();
            assert_eq!(
                verify(&key(), &format!("{NAME}={f}"), at(T0), HOUR),
                None,
                "{f}"
            );
        }
    }

    #[test]
    fn an_expired_cookie_does_not_verify() {
        let back = sent_back(&issue(&key(), "jdoe@contoso.com", at(T0), HOUR));
        assert!(verify(&key(), &back, at(T0 + 3600), HOUR).is_some());
        assert_eq!(verify(&key(), &back, at(T0 + 3601), HOUR), None);
    }

    #[test]
    fn a_cookie_from_the_future_counts_within_the_clock_skew_only() {
        let back = sent_back(&issue(&key(), "jdoe@contoso.com", at(T0), HOUR));
        assert!(verify(&key(), &back, at(T0 - 300), HOUR).is_some());
        assert_eq!(verify(&key(), &back, at(T0 - 301), HOUR), None);
        // A clock before 1970 reads as 0; nothing overflows.
        assert_eq!(verify(&key(), &back, UNIX_EPOCH, HOUR), None);
        let far = issue(&key(), "x@y", at(1 << 40), Duration::MAX);
        assert!(verify(&key(), &sent_back(&far), at(1 << 40), Duration::MAX).is_some());
        assert!(verify(&key(), &sent_back(&far), at(u64::MAX >> 2), Duration::MAX).is_some());
    }

    #[test]
    fn ours_is_found_among_other_cookies_and_several_headers() {
        let ours = sent_back(&issue(&key(), "jdoe@contoso.com", at(T0), HOUR));
        let header = format!("X-BackEndCookie=abc; {ours} ;ClientId=XYZ;");
        assert_eq!(
            verify(&key(), &header, at(T0), HOUR).as_deref(),
            Some("jdoe@contoso.com")
        );
        // A stale or forged one before the valid one does not hide it.
        let header = format!("{NAME}=v1.AAAA.1.AAAA; {ours}");
        assert!(verify(&key(), &header, at(T0), HOUR).is_some());
        // Only the exact name is ours.
        let renamed = ours.replace(NAME, "COEXIST_ROUTE");
        assert_eq!(verify(&key(), &renamed, at(T0), HOUR), None);

        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("a=1; b=2"));
        assert_eq!(verify_in(&key(), &headers, at(T0), HOUR), None);
        headers.append(COOKIE, HeaderValue::from_str(&ours).unwrap());
        assert_eq!(
            verify_in(&key(), &headers, at(T0), HOUR).as_deref(),
            Some("jdoe@contoso.com")
        );
    }

    #[test]
    fn stripping_keeps_the_other_cookies_in_order() {
        let ours = sent_back(&issue(&key(), "jdoe@contoso.com", at(T0), HOUR));
        assert_eq!(
            strip(&format!("a=1; {ours}; b=2;c=3")).as_deref(),
            Some("a=1; b=2; c=3")
        );
        assert_eq!(strip("a=1;  ; b").as_deref(), Some("a=1; b"));
        // Any spelling and any value of our name goes; nothing else is left: no header.
        assert_eq!(strip(&ours), None);
        assert_eq!(strip(&format!(" {ours} ; Coexist_Route=x;{NAME}")), None);
        assert_eq!(strip(""), None);
        assert_eq!(strip(" ; ;"), None);
        // A cookie whose name only starts like ours stays.
        assert_eq!(
            strip("coexist_route_x=1; xcoexist_route=2").as_deref(),
            Some("coexist_route_x=1; xcoexist_route=2")
        );
    }

    #[test]
    fn stripping_every_cookie_header_of_a_request() {
        let ours = sent_back(&issue(&key(), "jdoe@contoso.com", at(T0), HOUR));
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_str(&ours).unwrap());
        headers.append(
            COOKIE,
            HeaderValue::from_str(&format!("a=1; {ours}")).unwrap(),
        );
        // Not valid UTF-8 / not visible ASCII: still handled as bytes.
        headers.append(
            COOKIE,
            HeaderValue::from_bytes(b"n=\xe9; coexist_route=1").unwrap(),
        );
        headers.insert("x-other", HeaderValue::from_static(NAME));
        strip_in(&mut headers);
        let left: Vec<&[u8]> = headers
            .get_all(COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        assert_eq!(left, [&b"a=1"[..], b"n=\xe9"]);
        assert_eq!(headers["x-other"], NAME);

        let mut only_ours = HeaderMap::new();
        only_ours.insert(COOKIE, HeaderValue::from_str(&ours).unwrap());
        strip_in(&mut only_ours);
        assert!(only_ours.is_empty());
    }

    #[test]
    fn malformed_input_never_panics_nor_verifies() {
        let long = "A".repeat(5000);
        let inputs = [
            "",
            ";",
            "=",
            "coexist_route",
            "coexist_route=",
            "coexist_route=v1",
            "coexist_route=v1...",
            "coexist_route=v1.....",
            "coexist_route=v1.!!.1.!!",
            "coexist_route=v1.AAAA.99999999999999999999999.AAAA",
            "coexist_route=v1.AAAA.-1.AAAA",
            "coexist_route=v1.AAAA..AAAA",
            "coexist_route=v1.AAA.1.AAAA",
            "coexist_route = v1.é.1.ü ;;",
            &format!("coexist_route=v1.{long}.1.{long}"),
        ];
        for input in inputs {
            assert_eq!(verify(&key(), input, at(T0), HOUR), None, "{input}");
            let _ = strip(input);
        }
        for bytes in [&b"coexist_route=\xff\xfe"[..], b"\x80=\x80"] {
            assert_eq!(verify_value(&key(), bytes, T0, HOUR), None);
            let _ = strip_value(bytes);
        }
    }

    #[test]
    fn expire_clears_the_cookie() {
        assert_eq!(
            expire(),
            "coexist_route=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
        );
    }

    #[test]
    fn keys_are_long_enough_and_read_from_hex_files() {
        assert!(matches!(
            CookieKey::new(&[1; 31]),
            Err(KeyError::TooShort(31))
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("route.key");

        std::fs::write(&path, format!("  {}\n", "0a".repeat(32))).unwrap();
        let from_file = CookieKey::from_file(&path).unwrap();
        let direct = CookieKey::new(&[0x0a; 32]).unwrap();
        let back = sent_back(&issue(&direct, "jdoe@contoso.com", at(T0), HOUR));
        assert!(verify(&from_file, &back, at(T0), HOUR).is_some());
        assert_eq!(format!("{from_file:?}"), "CookieKey(..)");

        std::fs::write(&path, "0A".repeat(31)).unwrap();
        let e = CookieKey::from_file(&path).unwrap_err();
        assert!(e.to_string().contains("31 bytes"), "{e}");
        for bad in ["xyz".repeat(30), "0".repeat(65), "é".repeat(40)] {
            std::fs::write(&path, bad).unwrap();
            let e = CookieKey::from_file(&path).unwrap_err();
            assert!(matches!(e, KeyError::NotHex { .. }), "{e}");
        }
        let e = CookieKey::from_file(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, KeyError::Read { .. }), "{e}");
    }
}
