//! The user an NTLM AUTHENTICATE message names (MS-NLMP 2.2.1.3), bare or inside a SPNEGO
//! token (`Authorization: Negotiate`). Routing only: nothing here verifies the response.

use memchr::memmem;

const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";
const AUTHENTICATE: u32 = 3;
/// NTLMSSP_NEGOTIATE_UNICODE: the strings are UTF-16LE, else OEM.
const UNICODE: u32 = 0x0000_0001;
/// Signature, type, five 8-byte fields and the flags: every client since Windows NT 4
/// sends at least this much (Version and MIC follow in newer ones).
const FIXED_HEADER: usize = 64;

/// `DOMAIN\user`, or the user alone when the domain is empty or the user is a UPN, from
/// the first NTLM message in `token` (a raw NTLMSSP message or a SPNEGO token that wraps
/// one). `None` for NEGOTIATE and CHALLENGE messages, Kerberos, anonymous logons and
/// anything malformed.
pub fn user_in_token(token: &[u8]) -> Option<String> {
    // In SPNEGO the NTLM message is the content of an OCTET STRING; its offsets are
    // relative to its own start, and bytes after it (a mechListMIC) do not disturb them.
    let at = memmem::find(token, SIGNATURE)?;
    authenticate_user(&token[at..])
}

/// The user of an AUTHENTICATE message that starts at `msg[0]`.
pub fn authenticate_user(msg: &[u8]) -> Option<String> {
    if msg.len() < FIXED_HEADER || !msg.starts_with(SIGNATURE) || u32_at(msg, 8)? != AUTHENTICATE {
        return None;
    }
    let unicode = u32_at(msg, 60)? & UNICODE != 0;
    let domain = text(field(msg, 28)?, unicode)?;
    let user = text(field(msg, 36)?, unicode)?;
    if user.is_empty() {
        return None;
    }
    if domain.is_empty() || user.contains('@') {
        Some(user)
    } else {
        Some(format!("{domain}\\{user}"))
    }
}

/// A payload field: `Len` (u16), `MaxLen` (u16, ignored), `BufferOffset` (u32), little
/// endian, bounds-checked against the message.
fn field(msg: &[u8], at: usize) -> Option<&[u8]> {
    let len = usize::from(u16::from_le_bytes(msg.get(at..at + 2)?.try_into().ok()?));
    let offset = usize::try_from(u32_at(msg, at + 4)?).ok()?;
    msg.get(offset..offset.checked_add(len)?)
}

fn u32_at(msg: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(msg.get(at..at + 4)?.try_into().ok()?))
}

/// UTF-16LE when `unicode`, else OEM, read as ASCII only (the OEM code page is the
/// client's, unknown here). Control characters are malformed.
fn text(bytes: &[u8], unicode: bool) -> Option<String> {
    let s = if unicode {
        if !bytes.len().is_multiple_of(2) {
            return None;
        }
        let units = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]));
        char::decode_utf16(units)
            .collect::<Result<String, _>>()
            .ok()?
    } else {
        if !bytes.is_ascii() {
            return None;
        }
        String::from_utf8(bytes.to_vec()).ok()?
    };
    (!s.chars().any(char::is_control)).then_some(s)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use base64::Engine;

    /// An AUTHENTICATE message with the given domain, user and workstation, laid out as
    /// Windows does: an 88-byte header (flags, Version, MIC), then domain, user,
    /// workstation, LM and NT responses in the payload.
    pub fn authenticate(domain: &str, user: &str, unicode: bool) -> Vec<u8> {
        let enc = |s: &str| -> Vec<u8> {
            if unicode {
                s.encode_utf16().flat_map(u16::to_le_bytes).collect()
            } else {
                s.as_bytes().to_vec()
            }
        };
        let (d, u, w) = (enc(domain), enc(user), enc("WS01"));
        let (lm, nt) = (vec![0u8; 24], vec![0x11u8; 48]);
        let mut payload = Vec::new();
        let mut fields = Vec::new();
        let mut put = |bytes: &[u8]| {
            let off = 88 + payload.len();
            fields.push((bytes.len() as u16, off as u32));
            payload.extend_from_slice(bytes);
        };
        put(&d);
        put(&u);
        put(&w);
        put(&lm);
        put(&nt);
        let (d, u, w, lm, nt) = (fields[0], fields[1], fields[2], fields[3], fields[4]);
        let mut m = SIGNATURE.to_vec();
        m.extend_from_slice(&3u32.to_le_bytes());
        for (len, off) in [lm, nt, d, u, w, (0, 88 + payload.len() as u32)] {
            m.extend_from_slice(&len.to_le_bytes());
            m.extend_from_slice(&len.to_le_bytes());
            m.extend_from_slice(&off.to_le_bytes());
        }
        let flags: u32 = (0xe288_8215 & !UNICODE) | u32::from(unicode);
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&[10, 0, 0x61, 0x4a, 0, 0, 0, 15]); // Version 10.0.19041, NTLM rev 15
        m.extend_from_slice(&[0u8; 16]); // MIC
        m.extend_from_slice(&payload);
        m
    }

    /// Real AUTHENTICATE messages from pyspnego's NTLM client (user `CONTOSO\jdoe`,
    /// workstation `VM`), as they appear after `NTLM ` and `Negotiate ` in the
    /// Authorization header: raw NTLMv2, and the same wrapped in a SPNEGO NegTokenResp
    /// with a mechListMIC after it.
    pub const REAL_NTLM_TYPE3: &str = "TlRMTVNTUAADAAAAGAAYAFgAAACgAKAAcAAAAA4ADgAQAQAACAAIAB4BAAAEAAQAJgEAABAAEAAqAQAANYKK4gAMBAAAAAAPqTirjrtgdc4OfHJ5SE8NDQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAKdzrkuBZ5OOQIz8VmlgfgsBAQAAAAAAAAIYURKKgt0BZrGnVZkX+jgAAAAAAQAEAFYATQACABYAVwBPAFIASwBTAFQAQQBUAEkATwBOAAMABAB2AG0ABwAIAAIYURKKgt0BCQAqAEgAVABUAFAALwBtAGEAaQBsAC4AYwBvAG4AdABvAHMAbwAuAGMAbwBtAAYABAACAAAAAAAAAAAAAABDAE8ATgBUAE8AUwBPAGoAZABvAGUAVgBNAFo7bu/mTZnywCpr+QoTPiQ=";
    pub const REAL_SPNEGO_TYPE3: &str = "oYIBXzCCAVugAwoBAaKCAT4EggE6TlRMTVNTUAADAAAAGAAYAFgAAACgAKAAcAAAAA4ADgAQAQAACAAIAB4BAAAEAAQAJgEAABAAEAAqAQAANYKK4gAMBAAAAAAPeyxKfhboceXnZ2Ro5VOs+wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAK3fk/aLBfu+lwD5FzilAPYBAQAAAAAAANaazxSKgt0BWLo+4sNe0DMAAAAAAQAEAFYATQACABYAVwBPAFIASwBTAFQAQQBUAEkATwBOAAMABAB2AG0ABwAIANaazxSKgt0BCQAqAEgAVABUAFAALwBtAGEAaQBsAC4AYwBvAG4AdABvAHMAbwAuAGMAbwBtAAYABAACAAAAAAAAAAAAAABDAE8ATgBUAE8AUwBPAGoAZABvAGUAVgBNAKPyniMKwMT34qIHZEZq0gijEgQQAQAAAMGVdTBIiYk5AAAAAA==";
    /// The NEGOTIATE (type 1) message of the same exchange, raw and in a NegTokenInit.
    pub const REAL_NTLM_TYPE1: &str = "TlRMTVNTUAABAAAAN4II4gAAAAAoAAAAAAAAACgAAAAADAQAAAAADw==";
    pub const REAL_SPNEGO_TYPE1: &str = "YEgGBisGAQUFAqA+MDygDjAMBgorBgEEAYI3AgIKoioEKE5UTE1TU1AAAQAAADeCCOIAAAAAKAAAAAAAAAAoAAAAAAwEAAAAAA8=";

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }

    #[test]
    fn real_messages() {
        assert_eq!(
            user_in_token(&b64(REAL_NTLM_TYPE3)).unwrap(),
            "CONTOSO\\jdoe"
        );
        assert_eq!(
            user_in_token(&b64(REAL_SPNEGO_TYPE3)).unwrap(),
            "CONTOSO\\jdoe"
        );
        assert_eq!(user_in_token(&b64(REAL_NTLM_TYPE1)), None);
        assert_eq!(user_in_token(&b64(REAL_SPNEGO_TYPE1)), None);
    }

    #[test]
    fn built_messages() {
        let rows: &[(&str, &str, bool, Option<&str>)] = &[
            ("CONTOSO", "jdoe", true, Some("CONTOSO\\jdoe")),
            ("CONTOSO", "jdoe", false, Some("CONTOSO\\jdoe")),
            ("", "jdoe@contoso.com", true, Some("jdoe@contoso.com")),
            // A UPN is the whole login, whatever the client put in the domain field.
            (
                "CONTOSO",
                "jdoe@contoso.com",
                true,
                Some("jdoe@contoso.com"),
            ),
            ("", "jdoe", true, Some("jdoe")),
            ("MÜNCHEN", "jürgen", true, Some("MÜNCHEN\\jürgen")),
            // Anonymous NTLM: no user.
            ("", "", true, None),
            // OEM strings are read as ASCII only.
            ("CONTOSO", "jürgen", false, None),
            ("CONTOSO", "j\u{1}doe", true, None),
        ];
        for (domain, user, unicode, want) in rows {
            let m = authenticate(domain, user, *unicode);
            assert_eq!(
                authenticate_user(&m).as_deref(),
                *want,
                "{domain} {user} {unicode}"
            );
        }
    }

    #[test]
    fn malformed_messages() {
        let good = authenticate("CONTOSO", "jdoe", true);
        assert!(authenticate_user(&good).is_some());
        let patched = |at: usize, bytes: &[u8]| {
            let mut m = good.clone();
            m[at..at + bytes.len()].copy_from_slice(bytes);
            m
        };
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("type 1", patched(8, &1u32.to_le_bytes())),
            ("type 2", patched(8, &2u32.to_le_bytes())),
            ("signature", patched(0, b"NTLMSSX\0")),
            (
                "user offset past the end",
                patched(40, &0xffff_fff0u32.to_le_bytes()),
            ),
            ("user offset u32::MAX", patched(40, &u32::MAX.to_le_bytes())),
            (
                "user length past the end",
                patched(36, &0xfff0u16.to_le_bytes()),
            ),
            (
                "domain offset past the end",
                patched(32, &(good.len() as u32).to_le_bytes()),
            ),
            ("odd UTF-16 length", patched(36, &7u16.to_le_bytes())),
            ("lone surrogate", {
                let mut m = authenticate("CONTOSO", "jd", true);
                let off = u32::from_le_bytes(m[40..44].try_into().unwrap()) as usize;
                m[off..off + 2].copy_from_slice(&0xd800u16.to_le_bytes());
                m
            }),
            ("header only", good[..63].to_vec()),
            ("empty", Vec::new()),
        ];
        for (what, m) in bad {
            assert_eq!(authenticate_user(&m), None, "{what}");
        }
        // Every truncation of a real message: no panic, and nothing once a field is cut.
        let real = b64(REAL_NTLM_TYPE3);
        for n in 0..real.len() {
            let got = authenticate_user(&real[..n]);
            if n < 0x126 {
                assert_eq!(got, None, "cut at {n}");
            }
        }
        assert_eq!(user_in_token(b"no signature here"), None);
        assert_eq!(user_in_token(b"xxNTLMSSP\0"), None);
    }
}
