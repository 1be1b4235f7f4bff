//! Address, domain and login normalisation.
//!
//! Every key that goes into the routing table and every key looked up in it passes through
//! these functions, so the two sides agree by construction. The rules follow Exchange:
//! domains compare case-insensitively and IDN forms (U-label and A-label) are equal; local
//! parts compare case-insensitively unless a domain opts out; `user+tag@` routes as `user@`
//! when the domain has a subaddress separator.
//!
//! The lookup side avoids heap allocation for the common case (an ASCII address) by building
//! the key in a fixed stack buffer; non-ASCII input takes a slower, allocating path.

use std::borrow::Cow;

use thiserror::Error;

/// RFC 5321 §4.5.3.1: local part ≤ 64 octets, domain ≤ 255, path ≤ 256.
pub const MAX_LOCAL_LEN: usize = 64;
pub const MAX_DOMAIN_LEN: usize = 255;
/// The longest normalised key (`local@domain`) the table stores.
pub const MAX_KEY_LEN: usize = MAX_LOCAL_LEN + 1 + MAX_DOMAIN_LEN;

/// Why a string is not an address, a domain or a login the table can hold.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    #[error("missing '@'")]
    MissingAt,
    #[error("empty local part")]
    EmptyLocal,
    #[error("local part longer than {MAX_LOCAL_LEN} octets")]
    LocalTooLong,
    #[error("local part contains a forbidden character {0:?}")]
    BadLocalChar(char),
    #[error("empty domain")]
    EmptyDomain,
    #[error("domain longer than {MAX_DOMAIN_LEN} octets")]
    DomainTooLong,
    #[error("invalid domain: {0}")]
    BadDomain(String),
    #[error("empty login")]
    EmptyLogin,
    #[error("login contains a control character or space")]
    BadLogin,
}

/// How a domain compares local parts. Part of the domain's entry in `routes.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPolicy {
    /// Exchange compares local parts case-insensitively; some other systems do not.
    pub case_sensitive: bool,
    /// Characters that start a subaddress (`+` by default; empty disables stripping).
    pub subaddress_separators: Box<str>,
}

impl Default for LocalPolicy {
    fn default() -> Self {
        Self {
            case_sensitive: false,
            subaddress_separators: "+".into(),
        }
    }
}

impl LocalPolicy {
    /// The local part without its subaddress, or `None` when it has none.
    pub fn strip_subaddress<'a>(&self, local: &'a str) -> Option<&'a str> {
        if self.subaddress_separators.is_empty() || local.starts_with('"') {
            return None;
        }
        let seps = self.subaddress_separators.as_bytes();
        let cut = if seps.is_ascii() {
            local.bytes().position(|b| seps.contains(&b))?
        } else {
            local.find(|c: char| self.subaddress_separators.contains(c))?
        };
        // `+tag@` alone is not a subaddress of an empty local part.
        (cut > 0).then(|| &local[..cut])
    }
}

/// Splits `local@domain` at the last `@` (a quoted local part may contain `@`).
pub fn split_address(address: &str) -> Result<(&str, &str), AddressError> {
    address.rsplit_once('@').ok_or(AddressError::MissingAt)
}

/// The canonical form of a domain: lower-case A-labels (punycode), no trailing dot.
///
/// `Cow::Borrowed` when the input already is canonical, which is the common case on the
/// lookup path.
pub fn canonical_domain(domain: &str) -> Result<Cow<'_, str>, AddressError> {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_empty() {
        return Err(AddressError::EmptyDomain);
    }
    if domain.len() > MAX_DOMAIN_LEN {
        return Err(AddressError::DomainTooLong);
    }
    let bytes = domain.as_bytes();
    let plain_ascii = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.');
    if plain_ascii && !contains_ace_prefix(bytes) {
        check_labels(domain)?;
        if bytes.iter().any(u8::is_ascii_uppercase) {
            return Ok(Cow::Owned(domain.to_ascii_lowercase()));
        }
        return Ok(Cow::Borrowed(domain));
    }
    // U-labels, or A-labels that must be validated: UTS 46 processing maps both to the
    // same lower-case punycode form, so `bücher.example` and `xn--bcher-kva.example` match.
    let ascii =
        idna::domain_to_ascii_strict(domain).map_err(|e| AddressError::BadDomain(e.to_string()))?;
    // STD3 rules already refuse spaces and punctuation; this keeps the invariant local.
    if !ascii
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(AddressError::BadDomain(format!("{domain:?}")));
    }
    check_labels(&ascii)?;
    Ok(Cow::Owned(ascii))
}

fn contains_ace_prefix(bytes: &[u8]) -> bool {
    bytes.windows(4).any(|w| w.eq_ignore_ascii_case(b"xn--"))
}

fn check_labels(domain: &str) -> Result<(), AddressError> {
    for label in domain.split('.') {
        if label.is_empty() {
            return Err(AddressError::BadDomain(format!(
                "empty label in {domain:?}"
            )));
        }
        if label.len() > 63 {
            return Err(AddressError::BadDomain(format!(
                "label longer than 63 octets in {domain:?}"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(AddressError::BadDomain(format!(
                "label starts or ends with '-' in {domain:?}"
            )));
        }
    }
    Ok(())
}

/// Validates a local part as a table source may write it (dot-atom, UTF-8 for SMTPUTF8, or
/// a quoted string).
pub fn check_local(local: &str) -> Result<(), AddressError> {
    if local.is_empty() {
        return Err(AddressError::EmptyLocal);
    }
    if local.len() > MAX_LOCAL_LEN {
        return Err(AddressError::LocalTooLong);
    }
    let quoted = local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
    if !quoted && local.is_ascii() {
        // The common case, checked per byte: atext and dots (RFC 5322 §3.2.3).
        return match local
            .bytes()
            .find(|b| !(b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(b)))
        {
            Some(b) => Err(AddressError::BadLocalChar(char::from(b))),
            None => Ok(()),
        };
    }
    for c in local.chars() {
        let forbidden = c.is_control()
            || c == '\u{7f}'
            || (!quoted && (c.is_whitespace() || "<>()[]\\,;:@\"".contains(c)));
        if forbidden {
            return Err(AddressError::BadLocalChar(c));
        }
    }
    Ok(())
}

/// The canonical local part under `policy`.
pub fn canonical_local<'a>(local: &'a str, policy: &LocalPolicy) -> Cow<'a, str> {
    if policy.case_sensitive || local.starts_with('"') {
        return Cow::Borrowed(local);
    }
    lowercase(local)
}

/// Lower-cases ASCII without allocating when nothing changes; full Unicode lower-casing for
/// SMTPUTF8 local parts and logins.
pub fn lowercase(s: &str) -> Cow<'_, str> {
    if s.is_ascii() {
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(s.to_ascii_lowercase())
        } else {
            Cow::Borrowed(s)
        }
    } else {
        let lower = s.to_lowercase();
        if lower == s {
            Cow::Borrowed(s)
        } else {
            Cow::Owned(lower)
        }
    }
}

/// The canonical key of a login: `DOMAIN\user` or a UPN `user@domain`, compared
/// case-insensitively like Windows does; a UPN's domain is IDN-normalised.
pub fn canonical_login(login: &str) -> Result<String, AddressError> {
    let login = login.trim();
    if login.is_empty() {
        return Err(AddressError::EmptyLogin);
    }
    if login.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(AddressError::BadLogin);
    }
    if !login.contains('\\')
        && let Some((user, domain)) = login.rsplit_once('@')
    {
        if user.is_empty() {
            return Err(AddressError::EmptyLogin);
        }
        let domain = canonical_domain(domain)?;
        return Ok(format!("{}@{}", lowercase(user), domain));
    }
    Ok(lowercase(login).into_owned())
}

/// A normalised key built on the stack when it fits, so that lookups of ASCII addresses do
/// not touch the allocator.
pub struct KeyBuf {
    buf: [u8; MAX_KEY_LEN],
    len: usize,
    heap: Option<String>,
}

impl Default for KeyBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyBuf {
    pub fn new() -> Self {
        Self {
            buf: [0; MAX_KEY_LEN],
            len: 0,
            heap: None,
        }
    }

    /// Builds `local@domain`, lower-casing the local part unless `keep_case`.
    /// `domain` must already be canonical. Returns `None` when the key is too long to be
    /// in any table. Bytes, not `str`: the table hashes and compares bytes, and this way
    /// the hot path never re-validates UTF-8.
    pub fn build(&mut self, local: &str, domain: &str, keep_case: bool) -> Option<&[u8]> {
        let total = local.len() + 1 + domain.len();
        if total > MAX_KEY_LEN {
            return None;
        }
        if keep_case || local.is_ascii() || local.starts_with('"') {
            let lower = !keep_case && !local.starts_with('"');
            let dst = &mut self.buf[..local.len()];
            dst.copy_from_slice(local.as_bytes());
            if lower {
                dst.make_ascii_lowercase();
            }
            self.buf[local.len()] = b'@';
            self.buf[local.len() + 1..total].copy_from_slice(domain.as_bytes());
            self.len = total;
            self.heap = None;
            return Some(&self.buf[..total]);
        }
        let mut s = local.to_lowercase();
        s.push('@');
        s.push_str(domain);
        Some(self.heap.insert(s).as_bytes())
    }

    /// The key most recently built.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.heap {
            Some(s) => s.as_bytes(),
            None => &self.buf[..self.len],
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn domains_fold_case_and_idn() {
        assert_eq!(canonical_domain("Example.COM").unwrap(), "example.com");
        assert_eq!(canonical_domain("example.com.").unwrap(), "example.com");
        assert_eq!(
            canonical_domain("Bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(
            canonical_domain("XN--BCHER-KVA.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert!(canonical_domain("").is_err());
        assert!(canonical_domain("a..b").is_err());
        assert!(canonical_domain("-a.b").is_err());
        assert!(canonical_domain("a b.c").is_err());
    }

    #[test]
    fn locals_are_checked() {
        assert!(check_local("alice.smith").is_ok());
        assert!(check_local("δοκιμή").is_ok());
        assert!(check_local("\"john doe\"").is_ok());
        assert_eq!(check_local(""), Err(AddressError::EmptyLocal));
        assert_eq!(check_local("a b"), Err(AddressError::BadLocalChar(' ')));
        assert_eq!(check_local("a\r\nb"), Err(AddressError::BadLocalChar('\r')));
        assert_eq!(
            check_local(&"x".repeat(65)),
            Err(AddressError::LocalTooLong)
        );
    }

    #[test]
    fn subaddress_is_stripped_by_policy() {
        let p = LocalPolicy::default();
        assert_eq!(p.strip_subaddress("user+tag"), Some("user"));
        assert_eq!(p.strip_subaddress("user"), None);
        assert_eq!(p.strip_subaddress("+tag"), None);
        let dash = LocalPolicy {
            case_sensitive: false,
            subaddress_separators: "+-".into(),
        };
        assert_eq!(dash.strip_subaddress("user-tag"), Some("user"));
        let none = LocalPolicy {
            case_sensitive: false,
            subaddress_separators: "".into(),
        };
        assert_eq!(none.strip_subaddress("user+tag"), None);
    }

    #[test]
    fn logins_fold_case() {
        assert_eq!(canonical_login("EXAMPLE\\Alice").unwrap(), "example\\alice");
        assert_eq!(
            canonical_login("Alice@Corp.Example.com").unwrap(),
            "alice@corp.example.com"
        );
        assert!(canonical_login("  ").is_err());
        assert!(canonical_login("a b").is_err());
    }

    #[test]
    fn keybuf_builds_keys() {
        let mut k = KeyBuf::new();
        let expect: [(&str, bool, &str); 3] = [
            ("Alice", false, "alice@example.com"),
            ("Alice", true, "Alice@example.com"),
            ("ÄLICE", false, "älice@example.com"),
        ];
        for (local, keep, key) in expect {
            assert_eq!(k.build(local, "example.com", keep), Some(key.as_bytes()));
        }
        assert_eq!(k.as_bytes(), "älice@example.com".as_bytes());
        assert_eq!(k.build(&"a".repeat(400), "example.com", false), None);
    }

    proptest! {
        // Normalising twice changes nothing: the table and the lookup can both normalise.
        #[test]
        fn domain_canonicalisation_is_idempotent(d in "[a-zA-Z0-9]{1,10}(\\.[a-zA-Z0-9]{1,10}){0,3}") {
            let once = canonical_domain(&d).unwrap().into_owned();
            let twice = canonical_domain(&once).unwrap().into_owned();
            prop_assert_eq!(&once, &twice);
            prop_assert_eq!(once, d.to_ascii_lowercase());
        }

        #[test]
        fn unicode_domains_match_their_punycode(label in "[a-zà-ÿ]{1,12}") {
            let d = format!("{label}.example");
            let ace = canonical_domain(&d).unwrap().into_owned();
            prop_assert!(ace.is_ascii());
            prop_assert_eq!(canonical_domain(&ace).unwrap().into_owned(), ace.clone());
            prop_assert_eq!(canonical_domain(&d.to_uppercase()).unwrap().into_owned(), ace);
        }

        #[test]
        fn keybuf_matches_allocating_path(local in "[a-zA-Z0-9.ÀÉÖäöü_-]{1,20}") {
            let mut k = KeyBuf::new();
            let built = k.build(&local, "example.com", false).unwrap().to_owned();
            let expect = format!("{}@example.com", canonical_local(&local, &LocalPolicy::default()));
            prop_assert_eq!(built, expect.into_bytes());
        }

        #[test]
        fn logins_are_case_insensitive(user in "[a-zA-Z0-9._]{1,16}") {
            let a = canonical_login(&format!("CORP\\{user}")).unwrap();
            let b = canonical_login(&format!("corp\\{}", user.to_uppercase())).unwrap();
            prop_assert_eq!(a, b);
        }
    }
}
