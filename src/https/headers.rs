//! Header hygiene when forwarding HTTP/1.1 (RFC 9110 §7.6), requests and responses alike.
//!
//! What belongs to one connection stays on it ([`strip_hop_by_hop`]); the backend learns
//! who the client is from `X-Forwarded-For` and `X-Forwarded-Proto` ([`add_forwarded`]);
//! and no `Via` goes towards IIS ([`remove_via`]). [`prepare_request`] does all three in
//! the order that matters.
//!
//! `Authorization` is end-to-end and always stays: Exchange's logins (Basic, NTLM,
//! Negotiate, Bearer) are the client's own, passed through. Only `Proxy-Authorization`,
//! meant for a proxy, goes.

use std::net::IpAddr;

use hyper::header::{
    CONNECTION, CONTENT_LENGTH, FORWARDED, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE, VIA,
};
use hyper::http::{HeaderMap, HeaderName, HeaderValue};

/// The hop-by-hop fields of RFC 9110 §7.6.1 and the legacy ones still met in practice
/// (`Keep-Alive`, `Proxy-Connection`), plus the proxy authentication fields (§11.7), which
/// are addressed to a proxy and never to the origin. `Transfer-Encoding` goes too: the
/// forwarder frames the body again for the next hop.
const HOP_BY_HOP: [HeaderName; 10] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-authentication-info"),
];

/// Fields that `Connection:` may not remove: the request target and the body's length are
/// the proxy's to forward, not a client's option (a listed `Content-Length` would leave the
/// forwarder to guess the framing).
const NEVER_LISTED: [HeaderName; 2] = [HOST, CONTENT_LENGTH];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The scheme the client used to reach coexist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http,
    Https,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Http => "http",
            Proto::Https => "https",
        }
    }
}

/// Removes the hop-by-hop fields and every field named in a `Connection` header (RFC 9110
/// §7.6.1), except `Host` and `Content-Length`, which are the proxy's to forward. For
/// requests towards a backend and responses towards a client alike.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .filter(|name| !NEVER_LISTED.contains(name))
        .collect();
    for name in HOP_BY_HOP.iter().chain(&listed) {
        headers.remove(name);
    }
}

/// Tells the backend who the client is: `X-Forwarded-For` gets `client_ip`,
/// `X-Forwarded-Proto` the scheme.
///
/// With `trust_incoming` (coexist behind a proxy of the operator's own), the client's
/// `X-Forwarded-For` list is kept and `client_ip` appended to it (several header lines
/// become one list), and an incoming `X-Forwarded-Proto` is kept: it names the scheme the
/// first hop saw. Without it, everything a client claims about earlier hops
/// (`X-Forwarded-For`, `-Proto`, `-Host`, `Forwarded`) is dropped before ours are set, so
/// the backend's logs and policies never see a forged address.
///
/// coexist writes the `X-Forwarded-*` fields only: IIS logging and Exchange read those, not
/// RFC 7239 `Forwarded`. An IPv4-mapped IPv6 address is written as IPv4.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client_ip: IpAddr,
    proto: Proto,
    trust_incoming: bool,
) {
    let ip = client_ip.to_canonical().to_string();
    let mut list = Vec::new();
    if trust_incoming {
        for v in headers.get_all(&X_FORWARDED_FOR) {
            let v = v.as_bytes().trim_ascii();
            if !v.is_empty() {
                list.extend_from_slice(v);
                list.extend_from_slice(b", ");
            }
        }
    } else {
        for name in [&X_FORWARDED_PROTO, &X_FORWARDED_HOST, &FORWARDED] {
            headers.remove(name);
        }
    }
    list.extend_from_slice(ip.as_bytes());
    // The incoming values were valid header bytes, and so are ", " and an address.
    let list = HeaderValue::from_bytes(&list).unwrap_or_else(|_| {
        HeaderValue::from_str(&ip).expect("an IP address is a valid header value")
    });
    headers.insert(X_FORWARDED_FOR, list);
    if !(trust_incoming && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto.as_str()));
    }
}

/// Removes `Via` from a request before it goes to a backend.
///
/// coexist never adds `Via` (RFC 9110 §7.6.3 asks proxies to, and this is a deliberate
/// exception): IIS treats a request with `Via` as coming through a proxy and does not keep
/// the NTLM/Negotiate login on the connection, so it asks for a new handshake on every
/// request. For the same reason an incoming `Via` (a client behind a TLS-inspecting proxy)
/// is removed rather than passed on; nothing in Exchange reads it. Responses keep theirs:
/// clients do not care.
pub fn remove_via(headers: &mut HeaderMap) {
    headers.remove(VIA);
}

/// Everything a request's headers need before they go to a backend, in the order that
/// matters: hop-by-hop fields first (a client's `Connection: X-Forwarded-For` must not
/// remove what coexist adds), then `Via`, then the forwarding fields.
pub fn prepare_request(
    headers: &mut HeaderMap,
    client_ip: IpAddr,
    proto: Proto,
    trust_incoming: bool,
) {
    strip_hop_by_hop(headers);
    remove_via(headers);
    add_forwarded(headers, client_ip, proto, trust_incoming);
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hyper::header::{AUTHORIZATION, COOKIE, WWW_AUTHENTICATE};

    use super::*;

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

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        n.sort_unstable();
        n
    }

    fn all<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    #[test]
    fn hop_by_hop_fields_go_and_end_to_end_ones_stay() {
        let mut h = map(&[
            ("Connection", "keep-alive"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "Expires"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic cHJveHk6cHc="),
            ("Proxy-Authenticate", "Basic realm=x"),
            ("Proxy-Authentication-Info", "nextnonce=1"),
            // NTLM legs: the client's login to Exchange, end to end.
            (
                "Authorization",
                "NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw==",
            ),
            ("WWW-Authenticate", "Negotiate"),
            ("Host", "mail.contoso.com"),
            ("Content-Length", "12"),
            ("Cookie", "a=1"),
            ("X-AnchorMailbox", "jdoe@contoso.com"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(
            names(&h),
            [
                "authorization",
                "content-length",
                "cookie",
                "host",
                "www-authenticate",
                "x-anchormailbox"
            ]
        );
        assert!(h[AUTHORIZATION].to_str().unwrap().starts_with("NTLM "));
        assert_eq!(h[WWW_AUTHENTICATE], "Negotiate");
    }

    #[test]
    fn fields_named_in_connection_go_too() {
        let mut h = map(&[
            ("Connection", "close, X-Custom ,x-other"),
            ("Connection", " Keep-Alive,,X-Third"),
            ("X-Custom", "1"),
            ("X-Other", "2"),
            ("x-third", "3"),
            ("X-Kept", "4"),
            ("Cookie", "a=1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["cookie", "x-kept"]);
    }

    #[test]
    fn connection_cannot_remove_host_or_content_length() {
        let mut h = map(&[
            ("Connection", "Host, Content-Length, Cookie, not a token, é"),
            ("Host", "mail.contoso.com"),
            ("Content-Length", "3"),
            ("Cookie", "a=1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-length", "host"]);
    }

    #[test]
    fn forwarded_for_is_replaced_unless_trusted() {
        let mut h = map(&[
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-Proto", "http"),
            ("X-Forwarded-Host", "evil.example"),
            ("Forwarded", "for=10.0.0.1"),
        ]);
        add_forwarded(&mut h, CLIENT, Proto::Https, false);
        assert_eq!(all(&h, "x-forwarded-for"), ["192.0.2.7"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["https"]);
        assert_eq!(names(&h), ["x-forwarded-for", "x-forwarded-proto"]);

        let mut empty = HeaderMap::new();
        add_forwarded(&mut empty, CLIENT, Proto::Http, false);
        assert_eq!(all(&empty, "x-forwarded-for"), ["192.0.2.7"]);
        assert_eq!(all(&empty, "x-forwarded-proto"), ["http"]);
    }

    #[test]
    fn a_trusted_list_is_extended_and_its_scheme_kept() {
        let mut h = map(&[
            ("X-Forwarded-For", "203.0.113.9, 10.0.0.1"),
            ("X-Forwarded-For", " 10.0.0.2 "),
            ("X-Forwarded-For", ""),
            ("X-Forwarded-Proto", "https"),
            ("Forwarded", "for=203.0.113.9"),
        ]);
        add_forwarded(&mut h, CLIENT, Proto::Http, true);
        assert_eq!(
            all(&h, "x-forwarded-for"),
            ["203.0.113.9, 10.0.0.1, 10.0.0.2, 192.0.2.7"]
        );
        assert_eq!(all(&h, "x-forwarded-proto"), ["https"]);
        assert_eq!(all(&h, "forwarded"), ["for=203.0.113.9"]);

        let mut none = HeaderMap::new();
        add_forwarded(&mut none, CLIENT, Proto::Https, true);
        assert_eq!(all(&none, "x-forwarded-for"), ["192.0.2.7"]);
        assert_eq!(all(&none, "x-forwarded-proto"), ["https"]);
    }

    #[test]
    fn addresses_are_written_plainly() {
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, IpAddr::V6(Ipv6Addr::LOCALHOST), Proto::Https, false);
        assert_eq!(all(&h, "x-forwarded-for"), ["::1"]);
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        add_forwarded(&mut h, mapped, Proto::Https, false);
        assert_eq!(all(&h, "x-forwarded-for"), ["192.0.2.7"]);
    }

    #[test]
    fn a_prepared_request_has_no_via_and_keeps_what_coexist_adds() {
        let mut h = map(&[
            ("Via", "1.1 inspecting-proxy"),
            ("Connection", "X-Forwarded-For, X-Forwarded-Proto"),
            ("Authorization", "Negotiate YIIG"),
            ("Cookie", "a=1"),
        ]);
        prepare_request(&mut h, CLIENT, Proto::Https, false);
        assert_eq!(
            names(&h),
            [
                "authorization",
                "cookie",
                "x-forwarded-for",
                "x-forwarded-proto"
            ]
        );
        assert_eq!(all(&h, "x-forwarded-for"), ["192.0.2.7"]);
        assert_eq!(h[COOKIE], "a=1");
    }
}
