//! An ActiveSync request's query (MS-ASHTTP 2.2.1.1.1): the plain form
//! `?Cmd=Ping&User=…&DeviceId=…&DeviceType=…` or the base64-encoded byte sequence of
//! section 2.2.1.1.1.1.

use base64::Engine;

use super::scan::{BASE64, percent_decode, query_param};

/// Command code of `Ping` in the base64 form (MS-ASHTTP 2.2.1.1.1.1.2).
const PING: u8 = 18;
/// Command parameter tag of `User` (MS-ASHTTP 2.2.1.1.1.1.3: 0 AttachmentName,
/// 1 CollectionId, 3 ItemId, 4 LongId, 6 Occurrence, 7 Options, 8 User).
const TAG_USER: u8 = 8;
/// The base64 form exists from protocol version 12.1 (encoded as 121).
const FIRST_BASE64_VERSION: u8 = 121;
/// Longest base64 query looked at: the byte sequence holds at most a few short strings.
const MAX_BASE64_QUERY: usize = 2048;

/// What routing needs from an ActiveSync query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EasQuery {
    pub ping: bool,
    pub user: Option<String>,
    pub device_id: Option<String>,
}

/// Reads either form; `None` when the query is neither (or malformed).
pub fn parse(query: &str) -> Option<EasQuery> {
    let plain = ["Cmd", "User", "DeviceId", "DeviceType"]
        .iter()
        .any(|p| query_param(query, p).is_some());
    if plain {
        return Some(EasQuery {
            ping: query_param(query, "Cmd").is_some_and(|c| c.eq_ignore_ascii_case("Ping")),
            user: query_param(query, "User"),
            device_id: query_param(query, "DeviceId").filter(|d| d.len() <= 128),
        });
    }
    if query.len() > MAX_BASE64_QUERY {
        return None;
    }
    let text = percent_decode(query, false)?;
    parse_bytes(&BASE64.decode(text.trim_end_matches('=')).ok()?)
}

/// The base64 form's byte sequence: protocol version (1), command code (1), locale (2,
/// little endian), device ID length (1) and bytes, policy key length (1, 0 or 4) and key,
/// device type length (1) and bytes, then command parameters as tag (1), length (1),
/// value. Every length must fit exactly; a byte left over or missing is malformed.
pub fn parse_bytes(b: &[u8]) -> Option<EasQuery> {
    let mut r = Reader(b);
    let version = r.u8()?;
    if version < FIRST_BASE64_VERSION {
        return None;
    }
    let command = r.u8()?;
    r.take(2)?; // locale
    let device_id = r.counted()?;
    match r.u8()? {
        0 => {}
        4 => {
            r.take(4)?;
        }
        _ => return None,
    }
    r.counted()?; // device type
    let mut user = None;
    while !r.0.is_empty() {
        let tag = r.u8()?;
        let value = r.counted()?;
        if tag == TAG_USER {
            user = std::str::from_utf8(value)
                .ok()
                .map(str::trim)
                .filter(|u| !u.is_empty() && !u.chars().any(char::is_control))
                .map(str::to_string);
        }
    }
    Some(EasQuery {
        ping: command == PING,
        user,
        device_id: device_id_text(device_id),
    })
}

/// A device ID as text: as sent when it is printable ASCII (what clients send today),
/// else upper-case hex (protocol 12.1 devices may send 16 binary bytes).
fn device_id_text(id: &[u8]) -> Option<String> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    if id.is_empty() {
        return None;
    }
    if id.iter().all(u8::is_ascii_graphic) {
        return String::from_utf8(id.to_vec()).ok();
    }
    let hex = id
        .iter()
        .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]])
        .map(char::from)
        .collect();
    Some(hex)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    /// A one-byte length, then that many bytes.
    fn counted(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Builds the base64 form: version, command, locale en-US, device ID, optional policy
    /// key, device type, then `(tag, value)` parameters.
    pub fn encode(
        command: u8,
        device: &[u8],
        policy: Option<u32>,
        params: &[(u8, &[u8])],
    ) -> String {
        let mut b = vec![161, command, 0x09, 0x04, device.len() as u8];
        b.extend_from_slice(device);
        match policy {
            Some(k) => {
                b.push(4);
                b.extend_from_slice(&k.to_le_bytes());
            }
            None => b.push(0),
        }
        b.push(10);
        b.extend_from_slice(b"SmartPhone");
        for (tag, v) in params {
            b.push(*tag);
            b.push(v.len() as u8);
            b.extend_from_slice(v);
        }
        BASE64.encode(b)
    }

    #[test]
    fn the_spec_example() {
        // MS-ASHTTP 2.2.1.1.1.1: the base64 form of
        // `Cmd=Sync&User=rmjones&DeviceId=v140Device&DeviceType=SmartPhone` (protocol
        // 14.0), whose User is left out of the byte sequence.
        let q = parse("jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l").unwrap();
        assert_eq!(
            q,
            EasQuery {
                ping: false,
                user: None,
                device_id: Some("v140Device".into())
            }
        );
    }

    #[test]
    fn both_forms() {
        let rows: Vec<(String, Option<EasQuery>)> = vec![
            (
                "Cmd=Ping&User=rmjones&DeviceId=v140Device&DeviceType=SmartPhone".into(),
                Some(EasQuery {
                    ping: true,
                    user: Some("rmjones".into()),
                    device_id: Some("v140Device".into()),
                }),
            ),
            (
                "User=CONTOSO%5Cjdoe&DeviceId=ApplDNPX1234&DeviceType=iPhone&Cmd=Sync".into(),
                Some(EasQuery {
                    ping: false,
                    user: Some("CONTOSO\\jdoe".into()),
                    device_id: Some("ApplDNPX1234".into()),
                }),
            ),
            (
                encode(
                    PING,
                    b"ApplDNPX1234",
                    Some(0x1234_5678),
                    &[(TAG_USER, b"jdoe@contoso.com")],
                ),
                Some(EasQuery {
                    ping: true,
                    user: Some("jdoe@contoso.com".into()),
                    device_id: Some("ApplDNPX1234".into()),
                }),
            ),
            (
                // Padding percent-encoded, other parameters around User, a binary device ID.
                encode(
                    1,
                    &[0xde, 0xad, 0xbe, 0xef],
                    None,
                    &[(7, &[1]), (TAG_USER, b"CONTOSO\\jdoe"), (1, b"5")],
                )
                .replace('=', "%3D")
                .replace('+', "%2B")
                .replace('/', "%2F"),
                Some(EasQuery {
                    ping: false,
                    user: Some("CONTOSO\\jdoe".into()),
                    device_id: Some("DEADBEEF".into()),
                }),
            ),
            // Not ActiveSync's: neither form.
            ("foo=bar".into(), None),
            (String::new(), None),
            ("!!!!".into(), None),
        ];
        for (query, want) in rows {
            assert_eq!(parse(&query), want, "{query}");
        }
    }

    #[test]
    fn strict_lengths() {
        let good = BASE64
            .decode(encode(PING, b"dev1", Some(7), &[(TAG_USER, b"jdoe")]))
            .unwrap();
        assert!(parse_bytes(&good).is_some());
        // Cut anywhere but between parameters, the sequence is malformed; cut between
        // them, it is a shorter valid one.
        let params_at = good.len() - 6;
        for n in 0..good.len() {
            let got = parse_bytes(&good[..n]);
            if n == params_at {
                assert_eq!(got.and_then(|q| q.user), None);
            } else {
                assert_eq!(got, None, "cut at {n}");
            }
        }
        let mut extra = good.clone();
        extra.push(TAG_USER);
        assert_eq!(parse_bytes(&extra), None, "a tag without a length");
        let mut policy3 = good.clone();
        policy3[9] = 3; // policy key length: only 0 or 4
        assert_eq!(parse_bytes(&policy3), None);
        let mut huge = good.clone();
        huge[4] = 255; // device ID length past the end
        assert_eq!(parse_bytes(&huge), None);
        let mut old = good;
        old[0] = 120;
        assert_eq!(
            parse_bytes(&old),
            None,
            "versions before 12.1 have no base64 form"
        );
    }
}
