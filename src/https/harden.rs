//! Request shapes refused before routing (SPEC §5.2): the ProxyLogon / ProxyShell /
//! ProxyNotShell server-side request forgeries, remote PowerShell unless the config pins it
//! to one side, ambiguous body framing, control characters in header values, and oversized
//! header blocks.
//!
//! [`check`] looks at the request head only and says either [`Admit::Route`] (route by
//! mailbox as usual), [`Admit::PowerShell`] (send to the pinned target) or a [`Refusal`]
//! with the status to answer (`Connection: close` with it: a refused head says nothing
//! reliable about where the next request starts).
//!
//! What hyper 1.x (httparse) already answers with `400` before a handler sees the request,
//! checked by `hyper_refuses_or_normalises_these_before_us` below: obs-fold, CR, LF, NUL
//! and the other control characters but HTAB in header values; a `Content-Length` that is
//! not plain digits; two `Content-Length` values that differ; a `Transfer-Encoding` whose
//! last coding is not `chunked`. It also hides one case from us: with both
//! `Transfer-Encoding` and `Content-Length`, it drops `Content-Length` from the header map
//! and closes the connection after the response. The framing and control-character rules
//! here are kept all the same, so that they hold whatever parser builds the head; what hyper
//! lets through and this module refuses is `Transfer-Encoding` with more than `chunked`
//! (`gzip, chunked`, or `chunked` twice), which the backend would otherwise have to decode
//! the same way as coexist.

use hyper::Uri;
use hyper::header::{CONTENT_LENGTH, COOKIE, TRANSFER_ENCODING};
use hyper::http::HeaderMap;
use memchr::memmem;

/// A request refused before routing: the HTTP status to answer and why (a fixed phrase for
/// the log and a metric label, never text from the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub why: &'static str,
}

pub const TOO_MANY_HEADERS: Refusal = Refusal {
    status: 431,
    why: "too many header fields",
};
pub const HEADERS_TOO_LARGE: Refusal = Refusal {
    status: 431,
    why: "header block too large",
};
pub const LENGTH_AND_CHUNKED: Refusal = Refusal {
    status: 400,
    why: "both Content-Length and Transfer-Encoding",
};
pub const BAD_CONTENT_LENGTH: Refusal = Refusal {
    status: 400,
    why: "Content-Length is not a plain decimal",
};
pub const CONFLICTING_CONTENT_LENGTH: Refusal = Refusal {
    status: 400,
    why: "Content-Length values differ",
};
pub const BAD_TRANSFER_ENCODING: Refusal = Refusal {
    status: 400,
    why: "Transfer-Encoding other than chunked",
};
pub const CONTROL_CHARACTER: Refusal = Refusal {
    status: 400,
    why: "control character in a header value",
};
pub const BACKEND_COOKIE: Refusal = Refusal {
    status: 403,
    why: "Exchange backend-steering cookie (ProxyLogon)",
};
pub const AUTODISCOVER_SSRF: Refusal = Refusal {
    status: 403,
    why: "Autodiscover explicit-logon path (ProxyShell)",
};
pub const POWERSHELL: Refusal = Refusal {
    status: 403,
    why: "remote PowerShell is not routed",
};

/// What to do with `/PowerShell` (Exchange remote PowerShell names no mailbox: it is an
/// admin's session with one side's servers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PowerShellPolicy {
    /// Answer `403` (the default: an admin connects to a side's servers directly).
    #[default]
    Refuse,
    /// Send every remote PowerShell request to this target.
    Target(String),
}

/// The rules [`check`] applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub powershell: PowerShellPolicy,
    /// Header lines, each repetition counted (hyper's own default cap is 100).
    pub max_headers: usize,
    /// Header block bytes, counted as `name: value\r\n` per line. IIS allows 16 KiB by
    /// default, and Microsoft has Exchange sites raise it for large Kerberos tickets
    /// (`Authorization: Negotiate` of users in many groups), hence 64 KiB.
    pub max_header_bytes: usize,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            powershell: PowerShellPolicy::Refuse,
            max_headers: 100,
            max_header_bytes: 64 * 1024,
        }
    }
}

/// A request that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit<'r> {
    /// Route by mailbox as usual.
    Route,
    /// Remote PowerShell, pinned by the config to this target.
    PowerShell(&'r str),
}

/// The verdict on one request head, checks in this order: size, framing, header bytes,
/// backend-steering cookies, the Autodiscover forgery, remote PowerShell.
pub fn check<'r>(rules: &'r Rules, uri: &Uri, headers: &HeaderMap) -> Result<Admit<'r>, Refusal> {
    size(rules, headers)?;
    framing(headers)?;
    if !headers.values().all(|v| clean_value(v.as_bytes())) {
        return Err(CONTROL_CHARACTER);
    }
    if steers_backend(headers) {
        return Err(BACKEND_COOKIE);
    }
    let target = normalise(uri);
    if autodiscover_ssrf(&target) {
        return Err(AUTODISCOVER_SSRF);
    }
    if is_powershell(&target) {
        return match &rules.powershell {
            PowerShellPolicy::Refuse => Err(POWERSHELL),
            PowerShellPolicy::Target(t) => Ok(Admit::PowerShell(t)),
        };
    }
    Ok(Admit::Route)
}

fn size(rules: &Rules, headers: &HeaderMap) -> Result<(), Refusal> {
    if headers.len() > rules.max_headers {
        return Err(TOO_MANY_HEADERS);
    }
    let bytes: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if bytes > rules.max_header_bytes {
        return Err(HEADERS_TOO_LARGE);
    }
    Ok(())
}

/// One reading of where the body ends (RFC 9112 §6.3), or a refusal: a backend or another
/// proxy that read it differently would take part of the body for the next request.
fn framing(headers: &HeaderMap) -> Result<(), Refusal> {
    let has_te = headers.contains_key(TRANSFER_ENCODING);
    if has_te && headers.contains_key(CONTENT_LENGTH) {
        return Err(LENGTH_AND_CHUNKED);
    }
    let mut length = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        let v = v.as_bytes();
        // Digits only: no sign, no spaces, no list (`5, 5`); at most 19 fit a u64.
        if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
            return Err(BAD_CONTENT_LENGTH);
        }
        match length {
            Some(l) if l != v => return Err(CONFLICTING_CONTENT_LENGTH),
            _ => length = Some(v),
        }
    }
    if has_te {
        // Every coding of every line: exactly one, and it is `chunked`.
        let mut codings = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii);
        let only_chunked = codings
            .next()
            .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
            && codings.next().is_none();
        if !only_chunked {
            return Err(BAD_TRANSFER_ENCODING);
        }
    }
    Ok(())
}

/// No control characters but HTAB, no DEL (RFC 9110 §5.5): an obs-fold or a bare CR/LF
/// that reached a value would split it into two fields for a backend. `HeaderValue` refuses
/// these bytes already when built by its checked constructors; this holds the rule for
/// heads built any other way.
fn clean_value(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// A cookie with which a client names the Exchange back end server itself: the ProxyLogon
/// SSRF (CVE-2021-26855). `X-BEResource` is refused with any value;
/// `X-AnonResource-Backend` when its value has a path and a `~` version (the pattern
/// Microsoft's own mitigation blocks: Exchange sets that cookie with a plain server name).
/// Names compare case-insensitively, as ASP.NET reads them.
fn steers_backend(headers: &HeaderMap) -> bool {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .any(|pair| {
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(eq) => (pair[..eq].trim_ascii(), &pair[eq + 1..]),
                None => (pair.trim_ascii(), &[][..]),
            };
            name.eq_ignore_ascii_case(b"X-BEResource")
                || (name.eq_ignore_ascii_case(b"X-AnonResource-Backend")
                    && value.contains(&b'/')
                    && value.contains(&b'~'))
        })
}

/// The request target as Exchange ends up reading it: path and query percent-decoded until
/// nothing changes (at most 3 rounds: `%2540` is `@` after two), `%uXXXX` decoded for ASCII
/// (IIS still accepts it), `\` read as `/` (as IIS does), ASCII lower-cased.
fn normalise(uri: &Uri) -> Vec<u8> {
    let mut t = uri.path().as_bytes().to_vec();
    if let Some(q) = uri.query() {
        t.push(b'?');
        t.extend_from_slice(q.as_bytes());
    }
    for _ in 0..3 {
        let decoded = percent_decode(&t);
        if decoded == t {
            break;
        }
        t = decoded;
    }
    for b in &mut t {
        *b = match b.to_ascii_lowercase() {
            b'\\' => b'/',
            c => c,
        };
    }
    t
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            // %XX
            if let (Some(h), Some(l)) = (
                s.get(i + 1).copied().and_then(hex),
                s.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            // %u00XX, ASCII only: anything above is no character that matters here.
            if matches!(s.get(i + 1), Some(b'u' | b'U'))
                && s.get(i + 2..i + 4) == Some(b"00")
                && let (Some(h), Some(l)) = (
                    s.get(i + 4).copied().and_then(hex),
                    s.get(i + 5).copied().and_then(hex),
                )
                && h < 8
            {
                out.push(h << 4 | l);
                i += 6;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Exchange virtual directories an explicit-logon SSRF reaches.
const VDIRS: [&[u8]; 8] = [
    b"/mapi",
    b"/powershell",
    b"/ews",
    b"/owa",
    b"/ecp",
    b"/rpc",
    b"/oab",
    b"/microsoft-server-activesync",
];

/// ProxyShell (CVE-2021-34473) and ProxyNotShell (CVE-2022-41040): Autodiscover's
/// explicit-logon handling strips `autodiscover/autodiscover.json?@host` from the URL and
/// forwards the rest, as the machine account, to the path the attacker wrote after the `@`.
/// Refused: after `autodiscover.json`, either a second `autodiscover.json` (the `Email=`
/// value that makes the URL strip itself: no genuine request names the endpoint twice), or
/// an `@` followed anywhere by an Exchange virtual directory path or by `powershell`
/// (Microsoft's own URL Rewrite mitigation matches `autodiscover.json.*@.*powershell`).
/// A genuine Autodiscover v2 request has the address in its path or its `Email=` and only a
/// domain and parameters after the `@`.
fn autodiscover_ssrf(target: &[u8]) -> bool {
    const ENDPOINT: &[u8] = b"autodiscover.json";
    let Some(i) = memmem::find(target, ENDPOINT) else {
        return false;
    };
    let rest = &target[i + ENDPOINT.len()..];
    if memmem::find(rest, ENDPOINT).is_some() {
        return true;
    }
    let Some(at) = rest.iter().position(|b| *b == b'@') else {
        return false;
    };
    let after = &rest[at + 1..];
    memmem::find(after, b"powershell").is_some()
        || VDIRS.iter().any(|v| memmem::find(after, v).is_some())
}

/// Exchange's remote PowerShell virtual directories: `/PowerShell` and
/// `/PowerShell-LiveID`, as the first path segment once empty, `.` and `..` segments are
/// resolved the way IIS does (`//PowerShell`, `/owa/../PowerShell`), any case.
fn is_powershell(target: &[u8]) -> bool {
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    let mut segments: Vec<&[u8]> = Vec::new();
    for s in path.split(|b| *b == b'/') {
        match s {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    segments
        .first()
        .is_some_and(|first| *first == b"powershell" || first.starts_with(b"powershell-"))
}

#[cfg(test)]
mod tests {
    use hyper::http::{HeaderName, HeaderValue};

    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn verdict(target: &str) -> Result<Admit<'static>, Refusal> {
        static RULES: std::sync::LazyLock<Rules> = std::sync::LazyLock::new(Rules::default);
        check(&RULES, &uri(target), &map(&[("Host", "mail.contoso.com")]))
    }

    /// Request targets as published in the ProxyShell / ProxyNotShell write-ups and
    /// advisories, and variants of their encoding.
    const ATTACKS: &[&str] = &[
        // ProxyShell: the OWA probe scanners send, then the MAPI and PowerShell steps.
        "/autodiscover/autodiscover.json?@foo.com/owa/?&Email=autodiscover/autodiscover.json%3F@foo.com",
        "/autodiscover/autodiscover.json?@foo.com/mapi/nspi/?&Email=autodiscover/autodiscover.json%3F@foo.com",
        "/autodiscover/autodiscover.json?@evil.com/mapi/nspi/?&Email=autodiscover/autodiscover.json%3F@evil.com",
        "/autodiscover/autodiscover.json?@foo.com/mapi/emsmdb?&Email=autodiscover/autodiscover.json%3F@foo.com",
        "/autodiscover/autodiscover.json?@foo.com/powershell/?X-Rps-CAT=VgEAVAdXaW5kb3dzQwBBCE\
         tlcmJlcm9zTBxhZG1pbmlzdHJhdG9yQGZvby5jb20%3D&Email=autodiscover/autodiscover.json%3F@foo.com",
        "/autodiscover/autodiscover.json?@foo.com/EWS/exchange.asmx?&Email=autodiscover/autodiscover.json%3F@foo.com",
        // ProxyNotShell.
        "/autodiscover/autodiscover.json?@evil.com/owa/&Email=autodiscover/autodiscover.json%3f@evil.com&Protocol=XYZ&FooProtocol=Powershell",
        "/autodiscover/autodiscover.json?a..foo.var/owa/&Email=autodiscover/autodiscover.json?a..foo.var&Protocol=XYZ&FooProtocol=%50owershell",
        // Without the self-referencing Email=, encoded, double-encoded, mixed case, `\`.
        "/autodiscover/autodiscover.json?@evil.com/mapi/nspi/",
        "/autodiscover/autodiscover.json?%40evil.com%2Fmapi%2Fnspi%2F",
        "/autodiscover/autodiscover.json?%2540evil.com%252Fpowershell%252F",
        "/autodiscover/autodiscover.json?%u0040evil.com/%u0070owershell/",
        "/AutoDiscover/AutoDiscover.JSON?@Evil.com/PowerShell/?&Email=x",
        "/autodiscover/autodiscover.json?@evil.com\\mapi\\nspi",
        "/autodiscover/autodiscover.json/@evil.com/mapi/nspi/",
        "/autodiscover/autodiscover.json?x=@evil.com&y=/Powershell",
    ];

    /// Genuine Autodiscover v2 and other Exchange requests that name an address.
    const GENUINE: &[&str] = &[
        "/autodiscover/autodiscover.json/v1.0/jdoe@contoso.com?Protocol=ActiveSync",
        "/autodiscover/autodiscover.json/v1.0/jdoe@contoso.com?Protocol=EWS",
        "/autodiscover/autodiscover.json/v1.0/jdoe@contoso.com?Protocol=AutodiscoverV1&RedirectCount=1",
        "/autodiscover/autodiscover.json/v1.0/jdoe%40contoso.com?Protocol=Rest",
        "/autodiscover/autodiscover.json/v1.0/powershell.admin@contoso.com?Protocol=EWS",
        "/autodiscover/autodiscover.json/v1.0/mapi@contoso.com?Protocol=MapiHttp",
        "/autodiscover/autodiscover.json?Email=jdoe@contoso.com&Protocol=ActiveSync&RedirectCount=1",
        "/autodiscover/autodiscover.xml",
        "/mapi/emsmdb/?MailboxId=7c9f8b2e-3c1a-4d5e-9f00-1a2b3c4d5e6f@contoso.com",
        "/rpc/rpcproxy.dll?7c9f8b2e-3c1a-4d5e-9f00-1a2b3c4d5e6f@contoso.com:6001",
        "/owa/jdoe@contoso.com/",
        "/Microsoft-Server-ActiveSync?Cmd=Ping&User=jdoe@contoso.com&DeviceId=v140Device&DeviceType=SmartPhone",
        "/EWS/Exchange.asmx",
        "https://mail.contoso.com/autodiscover/autodiscover.json/v1.0/jdoe@contoso.com?Protocol=EWS",
    ];

    #[test]
    fn proxyshell_and_proxynotshell_request_lines_are_refused() {
        for a in ATTACKS {
            assert_eq!(verdict(a), Err(AUTODISCOVER_SSRF), "{a}");
        }
    }

    #[test]
    fn genuine_requests_that_name_an_address_pass() {
        for g in GENUINE {
            assert_eq!(verdict(g), Ok(Admit::Route), "{g}");
        }
    }

    #[test]
    fn backend_steering_cookies_are_refused() {
        let rules = Rules::default();
        let owa = uri("/owa/auth/x.js");
        for cookie in [
            // ProxyLogon, as published.
            "X-AnonResource=true; X-AnonResource-Backend=localhost/ecp/default.flt?~3; \
             X-BEResource=localhost/owa/auth/logon.aspx?~3;",
            "X-BEResource=Administrator@EXCH01:444/ecp/proxyLogon.ecp#~1941962753",
            "a=1; x-beresource=anything",
            " X-BEResource ",
            "X-AnonResource-Backend=localhost/ecp/default.flt?~3",
        ] {
            let h = map(&[("Cookie", "a=1"), ("Cookie", cookie)]);
            assert_eq!(check(&rules, &owa, &h), Err(BACKEND_COOKIE), "{cookie}");
        }
        // Exchange's own affinity cookies pass, and a plain X-AnonResource-Backend.
        let h = map(&[(
            "Cookie",
            "X-BackEndCookie=S-1-5-21=u56Lnp2ejJqBz8eby8bNnJ7; X-AnonResource-Backend=ex01.corp; \
             X-OWA-CANARY=abc; ClientId=XYZ",
        )]);
        assert_eq!(check(&rules, &owa, &h), Ok(Admit::Route));
        // The name in a value or another header is no cookie.
        let h = map(&[("Cookie", "note=X-BEResource"), ("X-BEResource", "x")]);
        assert_eq!(check(&rules, &owa, &h), Ok(Admit::Route));
    }

    #[test]
    fn powershell_goes_where_the_config_pins_it_or_nowhere() {
        let rps = "/PowerShell/?serializationLevel=Full;ExchClientVer=15.2.1118.7;\
                   clientApplication=ManagementShell;TargetServer=;PSVersion=5.1.17763.1";
        let refuse = Rules::default();
        let pinned = Rules {
            powershell: PowerShellPolicy::Target("old".into()),
            ..Rules::default()
        };
        let h = map(&[("Authorization", "Negotiate YIIG")]);
        for p in [
            rps,
            "/powershell",
            "/PowerShell-LiveID?PSVersion=5.1",
            "/%50owershell/",
        ] {
            assert_eq!(check(&refuse, &uri(p), &h), Err(POWERSHELL), "{p}");
            assert_eq!(
                check(&pinned, &uri(p), &h),
                Ok(Admit::PowerShell("old")),
                "{p}"
            );
        }
        for p in [
            "/owa/powershell",
            "/powershellx",
            "/ecp/?x=/powershell",
            "/",
            "/..",
        ] {
            assert_eq!(check(&refuse, &uri(p), &h), Ok(Admit::Route), "{p}");
        }
        // The forgery is refused before any pinning applies.
        let ssrf = uri(ATTACKS[4]);
        assert_eq!(check(&pinned, &ssrf, &h), Err(AUTODISCOVER_SSRF));
    }

    /// Request headers and the verdict on them.
    type Case = (
        &'static [(&'static str, &'static str)],
        Result<Admit<'static>, Refusal>,
    );

    #[test]
    fn ambiguous_framing_is_refused() {
        let rules = Rules::default();
        let u = uri("/EWS/Exchange.asmx");
        let cases: &[Case] = &[
            (&[("Content-Length", "12")], Ok(Admit::Route)),
            (&[("Content-Length", "0")], Ok(Admit::Route)),
            (
                &[("Content-Length", "12"), ("Content-Length", "12")],
                Ok(Admit::Route),
            ),
            (&[("Transfer-Encoding", "chunked")], Ok(Admit::Route)),
            (&[("Transfer-Encoding", " Chunked ")], Ok(Admit::Route)),
            (
                &[("Content-Length", "12"), ("Transfer-Encoding", "chunked")],
                Err(LENGTH_AND_CHUNKED),
            ),
            (
                &[("Content-Length", "12"), ("Content-Length", "13")],
                Err(CONFLICTING_CONTENT_LENGTH),
            ),
            (&[("Content-Length", "12, 12")], Err(BAD_CONTENT_LENGTH)),
            (&[("Content-Length", "+12")], Err(BAD_CONTENT_LENGTH)),
            (&[("Content-Length", "-1")], Err(BAD_CONTENT_LENGTH)),
            (&[("Content-Length", "0x10")], Err(BAD_CONTENT_LENGTH)),
            (&[("Content-Length", "1 2")], Err(BAD_CONTENT_LENGTH)),
            (&[("Content-Length", "")], Err(BAD_CONTENT_LENGTH)),
            (
                &[("Content-Length", "99999999999999999999")],
                Err(BAD_CONTENT_LENGTH),
            ),
            (
                &[("Transfer-Encoding", "gzip, chunked")],
                Err(BAD_TRANSFER_ENCODING),
            ),
            (
                &[("Transfer-Encoding", "chunked, chunked")],
                Err(BAD_TRANSFER_ENCODING),
            ),
            (
                &[
                    ("Transfer-Encoding", "chunked"),
                    ("Transfer-Encoding", "chunked"),
                ],
                Err(BAD_TRANSFER_ENCODING),
            ),
            (
                &[("Transfer-Encoding", "identity")],
                Err(BAD_TRANSFER_ENCODING),
            ),
            (
                &[("Transfer-Encoding", "xchunked")],
                Err(BAD_TRANSFER_ENCODING),
            ),
            (&[("Transfer-Encoding", "")], Err(BAD_TRANSFER_ENCODING)),
            (
                &[("Transfer-Encoding", "chunked,")],
                Err(BAD_TRANSFER_ENCODING),
            ),
        ];
        for (headers, want) in cases {
            assert_eq!(check(&rules, &u, &map(headers)), *want, "{headers:?}");
        }
    }

    #[test]
    fn control_characters_cannot_reach_a_header_value() {
        for bad in [
            &b"a\r\n b"[..],
            b"a\rb",
            b"a\nb",
            b"a\0b",
            b"\x1b[0m",
            b"a\x7f",
        ] {
            assert!(!clean_value(bad), "{bad:?}");
            // The http types refuse them too: no header map built safely holds one.
            assert!(HeaderValue::from_bytes(bad).is_err(), "{bad:?}");
        }
        for good in [&b"a\tb"[..], b"", b"caf\xc3\xa9", b"NTLM TlRMTVNTUAAB=="] {
            assert!(clean_value(good), "{good:?}");
        }
    }

    #[test]
    fn oversized_header_blocks_are_refused() {
        let rules = Rules {
            max_headers: 3,
            max_header_bytes: 40,
            ..Rules::default()
        };
        let u = uri("/owa/");
        // 3 lines of "x-a: 1\r\n" = 8 bytes each.
        let three = map(&[("x-a", "1"), ("x-a", "1"), ("x-b", "1")]);
        assert_eq!(check(&rules, &u, &three), Ok(Admit::Route));
        let four = map(&[("x-a", "1"), ("x-a", "1"), ("x-b", "1"), ("x-c", "1")]);
        assert_eq!(check(&rules, &u, &four), Err(TOO_MANY_HEADERS));
        // "x-a: " + 33 + "\r\n" = 40 bytes: at the limit; one more is over.
        let at_limit = map(&[("x-a", &"v".repeat(33))]);
        assert_eq!(check(&rules, &u, &at_limit), Ok(Admit::Route));
        let over = map(&[("x-a", &"v".repeat(34))]);
        assert_eq!(check(&rules, &u, &over), Err(HEADERS_TOO_LARGE));
    }

    #[test]
    fn decoding_never_panics_on_broken_escapes() {
        for t in [
            "/%", "/%4", "/%zz", "/%u", "/%u00", "/%u004", "/%u0080x", "/%%41", "/a%",
        ] {
            let _ = verdict(t);
        }
        assert_eq!(
            percent_decode(b"%u0041%U0062%u00ff%u1234%41"),
            b"Ab%u00ff%u1234A"
        );
        assert_eq!(percent_decode(b"%25%34%31"), b"%41");
        assert_eq!(normalise(&uri("/a%2541?B\\c")), b"/aa?b/c");
    }

    /// What hyper's HTTP/1.1 server does with these heads before any handler runs, so the
    /// module documentation stays true: `Some(status)` it answers itself, `None` the
    /// handler gets the request, with the headers it reports.
    #[tokio::test]
    async fn hyper_refuses_or_normalises_these_before_us() {
        use http_body_util::Empty;
        use hyper::body::{Bytes, Incoming};
        use hyper::{Request, Response};
        use hyper_util::rt::TokioIo;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        async fn serve(head: &str) -> (String, Vec<String>) {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let seen: Vec<String> = req
                    .headers()
                    .iter()
                    .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v.as_bytes())))
                    .collect();
                let _ = seen_tx.send(seen);
                async { Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new())) }
            });
            let conn = tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(server), service),
            );
            // The write half stays open until the answer is in: hyper may take an early end
            // of input for a client that went away.
            let (mut rd, mut wr) = tokio::io::split(client);
            wr.write_all(head.as_bytes()).await.unwrap();
            let mut answer = String::new();
            let _ = rd.read_to_string(&mut answer).await;
            drop(wr);
            let _ = conn.await;
            let status = answer.get(9..12).unwrap_or_default().to_string();
            (status, seen_rx.try_recv().unwrap_or_default())
        }

        let start = "POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: x\r\nConnection: close\r\n";
        for (headers, refused) in [
            ("X-A: a\r\n b\r\n", true),
            ("X-A: a\rb\r\n", true),
            ("X-A: a\0b\r\n", true),
            ("X-A: a\x1bb\r\n", true),
            ("Content-Length: +1\r\n", true),
            ("Content-Length: 1, 1\r\n", true),
            ("Content-Length: 1\r\nContent-Length: 2\r\n", true),
            ("Transfer-Encoding: chunked, gzip\r\n", true),
            ("Transfer-Encoding: gzip, chunked\r\n", false),
            ("Content-Length: 1\r\nContent-Length: 1\r\n", false),
        ] {
            let (status, _) = serve(&format!("{start}{headers}\r\n0\r\n\r\n")).await;
            assert_eq!(status == "400", refused, "{headers:?}: {status}");
        }
        // Both framings: the handler sees Transfer-Encoding only.
        for headers in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ] {
            let (status, seen) = serve(&format!("{start}{headers}\r\n0\r\n\r\n")).await;
            assert_eq!(status, "200", "{headers:?}");
            assert!(
                seen.contains(&"transfer-encoding: chunked".to_string()),
                "{seen:?}"
            );
            assert!(
                !seen.iter().any(|h| h.starts_with("content-length")),
                "{seen:?}"
            );
        }
        // Equal lengths reach us as one; obs-text passes through.
        let (_, seen) = serve(&format!(
            "{start}Content-Length: 1\r\nContent-Length: 1\r\nX-A: caf\u{e9}\r\n\r\nx"
        ))
        .await;
        assert_eq!(
            seen.iter()
                .filter(|h| h.starts_with("content-length"))
                .count(),
            1
        );
        assert!(seen.contains(&"x-a: caf\u{e9}".to_string()), "{seen:?}");
    }
}
