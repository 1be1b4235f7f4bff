//! The PROXY protocol v2 header (HAProxy's proxy-protocol.txt): how a backend that trusts
//! coexist learns the real client's address. Written before anything else on a backend
//! connection, TLS included; any protocol's backend connections may start with it.

use std::net::SocketAddr;

/// The PROXY protocol v2 header (HAProxy's proxy-protocol.txt §2.2): PROXY with the
/// client's TCP source and destination, or LOCAL (a connection of coexist's own).
pub fn proxy_v2_header(client: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut h = SIGNATURE.to_vec();
    let Some((src, dst)) = client else {
        h.extend_from_slice(&[0x20, 0x00, 0, 0]);
        return h;
    };
    // An IPv4 client on a dual-stack listener shows as ::ffff:a.b.c.d: say IPv4, which
    // every backend reads.
    let plain = |a: SocketAddr| match a {
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map_or(a, |ip| SocketAddr::new(ip.into(), v6.port())),
        v4 @ SocketAddr::V4(_) => v4,
    };
    let (src, dst) = (plain(src), plain(dst));
    h.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.extend_from_slice(&[0x11, 0, 12]);
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
        }
        _ => {
            // Either side IPv6: both as IPv6 (an IPv4 one mapped, ::ffff:a.b.c.d).
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(a) => a.ip().to_ipv6_mapped(),
                SocketAddr::V6(a) => *a.ip(),
            };
            h.extend_from_slice(&[0x21, 0, 36]);
            h.extend_from_slice(&v6(src).octets());
            h.extend_from_slice(&v6(dst).octets());
        }
    }
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_v2_headers() {
        let sig = b"\r\n\r\n\0\r\nQUIT\n";
        let local = proxy_v2_header(None);
        assert_eq!(&local[..12], sig);
        assert_eq!(&local[12..], &[0x20, 0x00, 0, 0]);
        let v4 = proxy_v2_header(Some((
            "192.0.2.7:40001".parse().unwrap(),
            "198.51.100.1:25".parse().unwrap(),
        )));
        assert_eq!(
            &v4[12..],
            &[
                0x21, 0x11, 0, 12, 192, 0, 2, 7, 198, 51, 100, 1, 0x9c, 0x41, 0, 25
            ]
        );
        // One side IPv6: both sent as IPv6, the IPv4 one mapped.
        let mixed = proxy_v2_header(Some((
            "192.0.2.7:40001".parse().unwrap(),
            "[2001:db8::1]:25".parse().unwrap(),
        )));
        assert_eq!(&mixed[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            &mixed[16..32],
            &"::ffff:192.0.2.7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(mixed.len(), 16 + 36);
        // IPv4 clients of a dual-stack listener go out as IPv4.
        let mapped = proxy_v2_header(Some((
            "[::ffff:192.0.2.7]:40001".parse().unwrap(),
            "[::ffff:198.51.100.1]:25".parse().unwrap(),
        )));
        assert_eq!(mapped, v4);
    }
}
