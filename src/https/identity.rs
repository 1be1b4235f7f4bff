//! Which mailbox an HTTPS request belongs to (SPEC §5.3). Pure: the listener hands in what
//! it has parsed ([`RequestView`]), this module names the candidates and resolves them
//! against one routing-table snapshot; nothing here does I/O or keeps state.
//!
//! The order is the contract: explicit hints in the request ([`hints`]) → coexist's
//! routing cookie → the login ([`login`]) → learned keys → the domain default
//! ([`defaults`]). [`candidates`] lays them out in that order and [`first_match`] takes the
//! first that names a mailbox the table knows. A hint that names no mailbox — exchangelib's
//! `X-AnchorMailbox: DUMMY@<domain>` probe — falls through to the next source; its domain
//! still counts in the last step.
//!
//! Where each protocol names its mailbox, and what real clients send, is mapped in
//! `EXCHANGE_HTTPS.md`; what is recognised here is listed in SPEC §5.3.

mod eas;
mod ntlm;
mod scan;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, HeaderValue};
use uuid::Uuid;

use crate::route::{MailboxRef, Route, RoutingTable, TargetId};
use scan::BASE64;

pub use scan::SCAN_LIMIT as BODY_PEEK_LIMIT;

/// What the proxy knows of a request before it forwards it.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// The path as sent, still percent-encoded.
    pub path: &'a str,
    /// The query without its `?`.
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The body's first bytes, only when [`wants_body`] says the mailbox may be named
    /// there: all of it when it is shorter than [`BODY_PEEK_LIMIT`], else its first
    /// [`BODY_PEEK_LIMIT`] bytes (a body that long is treated as possibly cut).
    pub body: Option<&'a [u8]>,
}

/// The Exchange protocol a request speaks, from its virtual directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangeProtocol {
    /// `/autodiscover/autodiscover.xml` (POX) and `/autodiscover/autodiscover.svc` (SOAP),
    /// and anything else under `/autodiscover/`.
    Autodiscover,
    /// `/autodiscover/autodiscover.json…`
    AutodiscoverV2,
    Owa,
    Ecp,
    Ews,
    ActiveSync,
    Mapi,
    /// `/rpc/rpcproxy.dll` (Outlook Anywhere), and `/rpcwithcert/`, the vdir Exchange
    /// 2013+ front ends proxy to.
    Rpc,
    Oab,
    PowerShell,
    Other,
}

impl ExchangeProtocol {
    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Autodiscover => "autodiscover",
            Self::AutodiscoverV2 => "autodiscover_v2",
            Self::Owa => "owa",
            Self::Ecp => "ecp",
            Self::Ews => "ews",
            Self::ActiveSync => "activesync",
            Self::Mapi => "mapi",
            Self::Rpc => "rpc",
            Self::Oab => "oab",
            Self::PowerShell => "powershell",
            Self::Other => "other",
        }
    }
}

/// What a candidate names a mailbox by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// An SMTP address (primary or alias).
    Smtp(String),
    /// An ExchangeGuid, and the domain written after it (`<guid>@domain`), if any.
    Guid { guid: Uuid, domain: Option<String> },
    /// A Windows SID (`X-AnchorMailbox: S-1-5-21-…@domain`). Not resolved yet: the table
    /// has no SID column.
    Sid { sid: String, domain: Option<String> },
    /// A logon name: `DOMAIN\user` or a UPN (which may also be an address).
    Login(String),
    /// An Autodiscover `<LegacyDN>` (`/o=…/ou=…/cn=Recipients/cn=jdoe`), kept whole. Not
    /// resolved yet: it needs the mailboxes' legacyExchangeDN (and their `X500:`
    /// addresses) in the table.
    LegacyDn(String),
    /// An Exchange 2010 server named by RPC over HTTP (`rpcproxy.dll?ex1.contoso.com:6001`),
    /// lower-cased. Not resolved yet: it needs a server → target mapping in the config.
    Server(String),
    /// A routed domain, for the default step only (see [`defaults`]).
    Domain(String),
}

impl Key {
    /// The mail domain the key carries, if any: an address's or UPN's domain part, or the
    /// domain after a GUID or SID. `DOMAIN\user` names a Windows domain, not a mail one.
    pub fn domain(&self) -> Option<&str> {
        match self {
            Key::Smtp(a) => a.rsplit_once('@').map(|(_, d)| d),
            Key::Login(l) if !l.contains('\\') => l.rsplit_once('@').map(|(_, d)| d),
            Key::Guid { domain, .. } | Key::Sid { domain, .. } => domain.as_deref(),
            Key::Domain(d) => Some(d),
            Key::Login(_) | Key::LegacyDn(_) | Key::Server(_) => None,
        }
    }

    /// A log or metric label for the kind of key.
    pub fn kind(&self) -> &'static str {
        match self {
            Key::Smtp(_) => "smtp",
            Key::Guid { .. } => "guid",
            Key::Sid { .. } => "sid",
            Key::Login(_) => "login",
            Key::LegacyDn(_) => "legacy_dn",
            Key::Server(_) => "server",
            Key::Domain(_) => "domain",
        }
    }
}

/// Where a candidate came from, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Hint,
    Cookie,
    Login,
    Learned,
    Default,
}

impl Source {
    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            Source::Hint => "hint",
            Source::Cookie => "cookie",
            Source::Login => "login",
            Source::Learned => "learned",
            Source::Default => "default",
        }
    }
}

/// One way the request may name its mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub source: Source,
    pub key: Key,
    /// Where exactly it was found, for logs and the route explanation: `X-AnchorMailbox`,
    /// `MAPI MailboxId`, `NTLM`, … A small fixed set, never request text.
    pub what: &'static str,
}

impl Candidate {
    pub fn new(source: Source, key: Key, what: &'static str) -> Self {
        Self { source, key, what }
    }
}

/// What a candidate resolved to.
#[derive(Debug, Clone, Copy)]
pub enum Resolved<'t> {
    /// A mailbox the table knows: its owner gets the request.
    Mailbox(MailboxRef<'t>),
    /// No mailbox, but a routed domain's `unknown` target (the default step).
    Target(TargetId),
}

impl Resolved<'_> {
    pub fn target(&self) -> TargetId {
        match self {
            Resolved::Mailbox(m) => m.owner(),
            Resolved::Target(t) => *t,
        }
    }
}

/// The protocol of a path, by its first segment (ASCII case-insensitive, as IIS matches
/// virtual directories).
pub fn classify(path: &str) -> ExchangeProtocol {
    let mut segments = path.trim_start_matches('/').split('/');
    let vdir = segments.next().unwrap_or("");
    let is = |name: &str| vdir.eq_ignore_ascii_case(name);
    if is("owa") {
        ExchangeProtocol::Owa
    } else if is("ecp") {
        ExchangeProtocol::Ecp
    } else if is("ews") {
        ExchangeProtocol::Ews
    } else if is("Microsoft-Server-ActiveSync") {
        ExchangeProtocol::ActiveSync
    } else if is("mapi") {
        ExchangeProtocol::Mapi
    } else if is("rpc") || is("rpcwithcert") {
        ExchangeProtocol::Rpc
    } else if is("oab") {
        ExchangeProtocol::Oab
    } else if is("powershell") {
        ExchangeProtocol::PowerShell
    } else if is("autodiscover") {
        match segments.next() {
            Some(f) if f.eq_ignore_ascii_case("autodiscover.json") => {
                ExchangeProtocol::AutodiscoverV2
            }
            _ => ExchangeProtocol::Autodiscover,
        }
    } else {
        ExchangeProtocol::Other
    }
}

/// True when the mailbox may be named in the body, so the listener should peek at its
/// first [`BODY_PEEK_LIMIT`] bytes before choosing a backend: Autodiscover POST (POX
/// `autodiscover.xml`, SOAP `autodiscover.svc`) and the OWA logon form (`/owa/auth.owa`,
/// Exchange 2010's `/owa/auth/owaauth.dll`).
pub fn wants_body(method: &str, protocol: ExchangeProtocol, path: &str) -> bool {
    method == "POST"
        && match protocol {
            ExchangeProtocol::Autodiscover => autodiscover_body(path).is_some(),
            ExchangeProtocol::Owa => is_owa_logon(path),
            _ => false,
        }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AutodiscoverBody {
    /// `<EMailAddress>` / `<LegacyDN>` in the Outlook (POX) request schema.
    Pox,
    /// `<a:Mailbox>` in a SOAP `GetUserSettings` request.
    Soap,
}

fn autodiscover_body(path: &str) -> Option<AutodiscoverBody> {
    let file = path.trim_start_matches('/').split('/').nth(1)?;
    if file.eq_ignore_ascii_case("autodiscover.xml") {
        Some(AutodiscoverBody::Pox)
    } else if file
        .get(..16)
        .is_some_and(|f| f.eq_ignore_ascii_case("autodiscover.svc"))
    {
        Some(AutodiscoverBody::Soap)
    } else {
        None
    }
}

fn is_owa_logon(path: &str) -> bool {
    path.eq_ignore_ascii_case("/owa/auth.owa") || path.eq_ignore_ascii_case("/owa/auth/owaauth.dll")
}

/// The explicit hints a request carries, in the order they are tried:
///
/// 1. the URL, which names the mailbox the request works on: MAPI `MailboxId=` then
///    `smtpAddress=`; the RPC over HTTP target; the Autodiscover v2 path or `Email=`;
///    an OWA/ECP explicit-logon path `/owa/<smtp>/`;
/// 2. `X-OWA-ExplicitLogonUser` (OWA, ECP);
/// 3. `X-AnchorMailbox` (any protocol);
/// 4. the body, when [`wants_body`]: Autodiscover `<EMailAddress>`, `<LegacyDN>`, SOAP
///    `<Mailbox>`; the OWA logon form's `username`;
/// 5. ActiveSync `User=` (plain or base64 query).
///
/// A key found twice is listed once, where it came first.
pub fn hints(req: &RequestView<'_>) -> Vec<Candidate> {
    let protocol = classify(req.path);
    let query = req.query.unwrap_or("");
    let mut out = Hints(Vec::new());

    match protocol {
        ExchangeProtocol::Mapi => {
            // Exchange takes MailboxId only as `<guid>@<domain>`, then smtpAddress.
            if let Some(id) = scan::query_param(query, "MailboxId")
                && let Some((local, domain)) = id.rsplit_once('@')
                && let Some(guid) = scan::parse_guid(local)
                && scan::is_domain(domain)
            {
                out.push(
                    Key::Guid {
                        guid,
                        domain: Some(domain.to_string()),
                    },
                    "MAPI MailboxId",
                );
            }
            if let Some(a) = scan::query_param(query, "smtpAddress").filter(|a| scan::is_address(a))
            {
                out.push(Key::Smtp(a), "MAPI smtpAddress");
            }
        }
        ExchangeProtocol::Rpc => {
            if let Some(key) = rpc_target(query) {
                out.push(key, "RPC target");
            }
        }
        ExchangeProtocol::AutodiscoverV2 => autodiscover_v2(req.path, query, &mut out),
        ExchangeProtocol::Owa | ExchangeProtocol::Ecp => {
            if let Some(seg) = req.path.trim_start_matches('/').split('/').nth(1)
                && let Some(a) = scan::percent_decode(seg, false)
                && scan::is_address(&a)
            {
                out.push(Key::Smtp(a), "explicit logon path");
            }
            if let Some(a) =
                header_text(req.headers, "x-owa-explicitlogonuser").filter(|a| scan::is_address(a))
            {
                out.push(Key::Smtp(a.to_string()), "X-OWA-ExplicitLogonUser");
            }
        }
        _ => {}
    }

    if let Some(key) = header_text(req.headers, "x-anchormailbox").and_then(anchor_key) {
        out.push(key, "X-AnchorMailbox");
    }

    if let Some(body) = req
        .body
        .filter(|_| wants_body(req.method, protocol, req.path))
    {
        match (protocol, autodiscover_body(req.path)) {
            (ExchangeProtocol::Autodiscover, Some(AutodiscoverBody::Pox)) => {
                if let Some(a) = scan::xml_text(body, "EMailAddress", scan::is_address) {
                    out.push(Key::Smtp(a), "Autodiscover EMailAddress");
                }
                if let Some(dn) = scan::xml_text(body, "LegacyDN", is_legacy_dn) {
                    out.push(Key::LegacyDn(dn), "Autodiscover LegacyDN");
                }
            }
            (ExchangeProtocol::Autodiscover, Some(AutodiscoverBody::Soap)) => {
                if let Some(a) = scan::xml_text(body, "Mailbox", scan::is_address) {
                    out.push(Key::Smtp(a), "Autodiscover SOAP Mailbox");
                }
            }
            (ExchangeProtocol::Owa, _) => {
                if let Some(user) = scan::form_field(body, "username").filter(|u| is_login(u)) {
                    out.push(Key::Login(user), "OWA logon username");
                }
            }
            _ => {}
        }
    }

    if protocol == ExchangeProtocol::ActiveSync
        && let Some(user) = eas::parse(query)
            .and_then(|q| q.user)
            .filter(|u| is_login(u))
    {
        out.push(Key::Login(user), "ActiveSync User");
    }
    out.0
}

/// Hints, listed once per key.
struct Hints(Vec<Candidate>);

impl Hints {
    fn push(&mut self, key: Key, what: &'static str) {
        if !self.0.iter().any(|c| c.key == key) {
            self.0.push(Candidate::new(Source::Hint, key, what));
        }
    }
}

/// `X-AnchorMailbox`, read as Exchange's front end reads it: `S-1-5-…@domain` is a SID,
/// `<guid>` or `<guid>@domain` an ExchangeGuid, else an SMTP address. Office 365's forms
/// (`Oid:…@tenant`, `PUID:…@tenant`, `CID:…`) are none of these and give no hint.
fn anchor_key(v: &str) -> Option<Key> {
    let v = v.trim();
    match v.rsplit_once('@') {
        Some((local, domain)) if scan::is_domain(domain) => {
            if let Some(sid) = scan::parse_sid(local) {
                Some(Key::Sid {
                    sid,
                    domain: Some(domain.to_string()),
                })
            } else if let Some(guid) = scan::parse_guid(local) {
                Some(Key::Guid {
                    guid,
                    domain: Some(domain.to_string()),
                })
            } else {
                scan::is_address(v).then(|| Key::Smtp(v.to_string()))
            }
        }
        Some(_) => None,
        None => scan::parse_guid(v).map(|guid| Key::Guid { guid, domain: None }),
    }
}

/// `rpcproxy.dll?<target>:<port>`: `<guid>@<domain>` (Exchange 2013+, the mailbox's
/// ExchangeGuid) or a server's host name (Exchange 2010). Anything after `&` is ignored.
fn rpc_target(query: &str) -> Option<Key> {
    let raw = query.split('&').next()?;
    let target = scan::percent_decode(raw, false)?;
    let host = match target.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => target.as_str(),
    };
    if let Some((local, domain)) = host.rsplit_once('@') {
        let guid = scan::parse_guid(local)?;
        return scan::is_domain(domain).then(|| Key::Guid {
            guid,
            domain: Some(domain.to_string()),
        });
    }
    (host.is_ascii() && scan::is_domain(host)).then(|| Key::Server(host.to_ascii_lowercase()))
}

/// Autodiscover v2: `/autodiscover/autodiscover.json/v1.0/<smtp>?Protocol=…`, or the
/// preview form `/autodiscover/autodiscover.json?Email=<smtp>&Protocol=…`.
///
/// A query with a parameter name holding `@` or `/` is the ProxyShell explicit-logon shape
/// (`autodiscover.json?@evil.corp/PowerShell/…&Email=autodiscover/autodiscover.json%3F@…`):
/// no hint is taken from such a URL. Refusing the request is the hardening layer's job.
fn autodiscover_v2(path: &str, query: &str, out: &mut Hints) {
    let trick = scan::pairs(query).any(|(k, _)| k.is_none_or(|k| k.contains(['@', '/'])));
    if trick {
        return;
    }
    let rest: Vec<&str> = path
        .trim_start_matches('/')
        .split('/')
        .skip(2)
        .filter(|s| !s.is_empty())
        .collect();
    match rest.as_slice() {
        [version, addr] if version.starts_with(['v', 'V']) => {
            if let Some(a) = scan::percent_decode(addr, false).filter(|a| scan::is_address(a)) {
                out.push(Key::Smtp(a), "Autodiscover v2 path");
            }
        }
        [] => {
            if let Some(a) = scan::query_param(query, "Email").filter(|a| scan::is_address(a)) {
                out.push(Key::Smtp(a), "Autodiscover v2 Email");
            }
        }
        _ => {}
    }
}

fn is_legacy_dn(s: &str) -> bool {
    s.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("/o="))
}

/// A logon name worth looking up: `DOMAIN\user` or a UPN/address, no blanks or controls.
fn is_login(s: &str) -> bool {
    !s.is_empty() && s.len() <= 512 && !s.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// A header's value as text: UTF-8 (not only visible ASCII, so SMTPUTF8 addresses pass),
/// trimmed; `None` when absent, empty or not UTF-8.
fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let v = std::str::from_utf8(headers.get(name)?.as_bytes())
        .ok()?
        .trim();
    (!v.is_empty()).then_some(v)
}

/// JWT segments: the URL-safe alphabet, padding optional.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
/// Longest `Authorization` credentials decoded (Kerberos tickets with a large PAC reach
/// tens of kilobytes; NTLM and Basic are far smaller).
const MAX_CREDENTIALS: usize = 64 * 1024;

/// The login the `Authorization` header names: the Basic user; the user of an NTLM
/// AUTHENTICATE (type 3) message, bare (`NTLM`) or inside a SPNEGO token (`Negotiate`);
/// a bearer JWT's `smtp`, `upn`, `unique_name` or `preferred_username` claim (the first
/// present; unverified — routing only, the backend checks the token). NTLM NEGOTIATE and
/// CHALLENGE legs, Kerberos and anything malformed give `None`.
pub fn login(headers: &HeaderMap) -> Option<Candidate> {
    let (scheme, credentials) = split_authorization(headers.get(AUTHORIZATION)?)?;
    let login =
        |l: String, what| is_login(&l).then(|| Candidate::new(Source::Login, Key::Login(l), what));
    if scheme.eq_ignore_ascii_case("Basic") {
        let raw = BASE64.decode(credentials).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (user, _password) = text.split_once(':')?;
        login(user.trim().to_string(), "Basic")
    } else if scheme.eq_ignore_ascii_case("NTLM") {
        login(
            ntlm::user_in_token(&BASE64.decode(credentials).ok()?)?,
            "NTLM",
        )
    } else if scheme.eq_ignore_ascii_case("Negotiate") {
        login(
            ntlm::user_in_token(&BASE64.decode(credentials).ok()?)?,
            "Negotiate NTLM",
        )
    } else if scheme.eq_ignore_ascii_case("Bearer") {
        bearer(credentials)
    } else {
        None
    }
}

fn split_authorization(value: &HeaderValue) -> Option<(&str, &str)> {
    let v = value.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    let credentials = rest.trim();
    (!credentials.is_empty() && credentials.len() <= MAX_CREDENTIALS)
        .then_some((scheme, credentials))
}

/// The routing claims of a JWT's payload, read without verifying the signature.
fn bearer(token: &str) -> Option<Candidate> {
    let mut parts = token.split('.');
    let (_header, payload) = (parts.next()?, parts.next()?);
    parts.next()?; // a signature part must be there
    let json = BASE64URL.decode(payload).ok()?;
    let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&json).ok()?;
    let claim = |name: &str| {
        claims
            .get(name)?
            .as_str()
            .map(str::trim)
            .filter(|s| is_login(s))
    };
    if let Some(a) = claim("smtp").filter(|a| scan::is_address(a)) {
        return Some(Candidate::new(
            Source::Login,
            Key::Smtp(a.to_string()),
            "Bearer smtp",
        ));
    }
    [
        ("upn", "Bearer upn"),
        ("unique_name", "Bearer unique_name"),
        ("preferred_username", "Bearer preferred_username"),
    ]
    .into_iter()
    .find_map(|(name, what)| {
        claim(name).map(|l| Candidate::new(Source::Login, Key::Login(l.to_string()), what))
    })
}

/// The ActiveSync DeviceId (plain `DeviceId=` or the base64 query's device ID), the key a
/// learned device → mailbox mapping is kept under.
pub fn activesync_device(req: &RequestView<'_>) -> Option<String> {
    if classify(req.path) != ExchangeProtocol::ActiveSync {
        return None;
    }
    eas::parse(req.query?)?.device_id
}

/// True for requests the backend holds open, which need long idle timeouts and are drained
/// when their mailbox moves. Detected from the request line and headers:
///
/// - RPC over HTTP channels: methods `RPC_IN_DATA` and `RPC_OUT_DATA`;
/// - ActiveSync `Ping`: `Cmd=Ping`, or command code 18 in the base64 query;
/// - MAPI over HTTP `X-RequestType: NotificationWait`;
/// - EWS streaming notifications when the client sends
///   `SOAPAction: …/GetStreamingEvents` (many do not: see [`ews_streaming_body`]);
/// - OWA notification long polls: `/owa/ev.owa?ns=PendingRequest…` (2010) and
///   `/owa/ev.owa2?ns=PendingRequest…` (2013+).
///
/// Not detected: ActiveSync `Sync` with a `Wait`/`HeartbeatInterval` (only in the WBXML
/// body) and EWS `GetStreamingEvents` without the SOAPAction header.
pub fn is_long_lived(
    protocol: ExchangeProtocol,
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> bool {
    if method == "RPC_IN_DATA" || method == "RPC_OUT_DATA" {
        return true;
    }
    match protocol {
        ExchangeProtocol::ActiveSync => query.and_then(eas::parse).is_some_and(|q| q.ping),
        ExchangeProtocol::Mapi => header_text(headers, "x-requesttype")
            .is_some_and(|t| t.eq_ignore_ascii_case("NotificationWait")),
        ExchangeProtocol::Ews => header_text(headers, "soapaction").is_some_and(|a| {
            a.trim_matches('"')
                .rsplit('/')
                .next()
                .is_some_and(|op| op.eq_ignore_ascii_case("GetStreamingEvents"))
        }),
        ExchangeProtocol::Owa => {
            let file = path.rsplit('/').next().unwrap_or("");
            (file.eq_ignore_ascii_case("ev.owa") || file.eq_ignore_ascii_case("ev.owa2"))
                && query
                    .and_then(|q| scan::query_param(q, "ns"))
                    .is_some_and(|ns| ns.eq_ignore_ascii_case("PendingRequest"))
        }
        _ => false,
    }
}

/// True when an EWS request body (its first [`BODY_PEEK_LIMIT`] bytes) holds a
/// `GetStreamingEvents` element: for a listener that peeks at EWS bodies to find the
/// streaming requests [`is_long_lived`] cannot see from headers.
pub fn ews_streaming_body(body: &[u8]) -> bool {
    const NAME: &[u8] = b"GetStreamingEvents";
    let b = &body[..body.len().min(BODY_PEEK_LIMIT)];
    // The element holds child elements, so look for its start tag, `<GetStreamingEvents`
    // or `<m:GetStreamingEvents`, not for a text.
    memchr::memmem::find_iter(b, NAME).any(|at| {
        let Some(lt) = b[..at].iter().rposition(|c| *c == b'<') else {
            return false;
        };
        let prefix = &b[lt + 1..at];
        let prefix_ok = prefix.is_empty()
            || prefix.split_last().is_some_and(|(colon, name)| {
                *colon == b':'
                    && !name.is_empty()
                    && name
                        .iter()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
            });
        let ends = matches!(
            b.get(at + NAME.len()),
            Some(b'>' | b'/' | b' ' | b'\t' | b'\r' | b'\n')
        );
        prefix_ok && ends
    })
}

/// The default step: for each candidate that carries a mail domain (an address, a UPN, a
/// `<guid>@domain`), a [`Key::Domain`] candidate with [`Source::Default`], in the same
/// order, each domain once. It resolves to the domain's `unknown` target when no mailbox
/// matched, so `DUMMY@contoso.com` still reaches contoso.com's default side.
pub fn defaults(candidates: &[Candidate]) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    for c in candidates.iter().filter(|c| c.source != Source::Default) {
        let Some(d) = c.key.domain() else { continue };
        if !out
            .iter()
            .any(|o| o.key.domain().is_some_and(|od| od.eq_ignore_ascii_case(d)))
        {
            out.push(Candidate::new(
                Source::Default,
                Key::Domain(d.to_string()),
                c.what,
            ));
        }
    }
    out
}

/// Every candidate for a request, in the order they are tried: [`hints`], the routing
/// `cookie` (the caller verified it; source [`Source::Cookie`]), [`login`], `learned`
/// (the caller's learned key, e.g. by [`activesync_device`]; source [`Source::Learned`]),
/// then [`defaults`] over all of them.
pub fn candidates(
    req: &RequestView<'_>,
    cookie: Option<Candidate>,
    learned: Option<Candidate>,
) -> Vec<Candidate> {
    let mut all = hints(req);
    all.extend(cookie);
    all.extend(login(req.headers));
    all.extend(learned);
    let defaults = defaults(&all);
    all.extend(defaults);
    all
}

/// Resolves one candidate against a table snapshot.
///
/// - `Smtp` → [`RoutingTable::lookup`]: a mailbox, or nothing. An address whose domain is
///   routed but that names no mailbox is *not* a match — the domain default is the last
///   step ([`Key::Domain`]), so a placeholder hint falls through to the next source.
/// - `Guid` → [`RoutingTable::lookup_guid`].
/// - `Login` → [`RoutingTable::lookup_login`], then, for a UPN, the same text as an
///   address (UPN and primary address are often the same).
/// - `Domain` → the domain's `unknown` target ([`RoutingTable::lookup_domain`]); a domain
///   that rejects unknown recipients, or is not routed, gives nothing.
/// - `Sid`, `LegacyDn`, `Server` → nothing yet (no such column or mapping).
pub fn resolve<'t>(table: &'t RoutingTable, c: &Candidate) -> Option<Resolved<'t>> {
    let mailbox = |route: Route<'t>| match route {
        Route::Mailbox(m) => Some(Resolved::Mailbox(m)),
        Route::DomainDefault { .. } | Route::Reject { .. } | Route::NotOurs => None,
    };
    match &c.key {
        Key::Smtp(a) => mailbox(table.lookup(a)),
        Key::Guid { guid, .. } => table.lookup_guid(*guid).map(Resolved::Mailbox),
        Key::Login(l) => match table.lookup_login(l) {
            Some(m) => Some(Resolved::Mailbox(m)),
            None if l.contains('@') && !l.contains('\\') => mailbox(table.lookup(l)),
            None => None,
        },
        Key::Domain(d) => match table.lookup_domain(d) {
            Route::DomainDefault { target, .. } => Some(Resolved::Target(target)),
            Route::Mailbox(_) | Route::Reject { .. } | Route::NotOurs => None,
        },
        Key::Sid { .. } | Key::LegacyDn(_) | Key::Server(_) => None,
    }
}

/// The first candidate that resolves, and what it resolved to. `None` leaves the request
/// to `https.default_target`.
pub fn first_match<'t, 'c>(
    table: &'t RoutingTable,
    candidates: &'c [Candidate],
) -> Option<(Resolved<'t>, &'c Candidate)> {
    candidates
        .iter()
        .find_map(|c| resolve(table, c).map(|r| (r, c)))
}

#[cfg(test)]
mod tests;
