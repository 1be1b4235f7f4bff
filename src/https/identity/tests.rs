//! Table-driven tests over real request shapes (EXCHANGE_HTTPS.md, the MS protocol
//! documents, captured client behaviour), malformed inputs, and a no-panic fuzz.

use base64::Engine;
use hyper::header::{HeaderName, HeaderValue};
use proptest::prelude::*;

use super::*;
use crate::route::{KnownTargets, load_routes_text};

const GUID: &str = "94d75396-7b0a-4ba6-9c4f-2c5e5d9e1a0b";
const SID: &str = "S-1-5-21-1004336348-1177238915-682003330-1001";

fn guid() -> Uuid {
    Uuid::parse_str(GUID).unwrap()
}

/// Runs `f` on a request built from a request target (`path?query`), headers (raw bytes,
/// so non-UTF-8 values can be sent) and a body.
fn with<R>(
    method: &str,
    target: &str,
    headers: &[(&str, &[u8])],
    body: Option<&[u8]>,
    f: impl FnOnce(&RequestView<'_>) -> R,
) -> R {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    f(&RequestView {
        method,
        path,
        query,
        headers: &map,
        body,
    })
}

/// Request headers of a test row: names and raw values.
type Headers<'a> = Vec<(&'a str, &'a [u8])>;
/// Name, method, request target, headers, body, the hints expected.
type HintRow<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Headers<'a>,
    Option<&'a [u8]>,
    Vec<(Key, &'a str)>,
);
/// Name, `Authorization` value, the login expected.
type LoginRow<'a> = (&'a str, Vec<u8>, Option<(Key, &'a str)>);
/// Method, request target, headers, long-lived or not.
type LongLivedRow<'a> = (&'a str, &'a str, Headers<'a>, bool);
/// Name, request target, headers, routing cookie, the route expected.
type RouteRow<'a> = (&'a str, &'a str, Headers<'a>, Option<Key>, &'a str);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn jwt(claims: &str) -> String {
    let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "Bearer {}.{}.c2ln",
        e(r#"{"alg":"RS256","typ":"JWT"}"#),
        e(claims)
    )
}

fn smtp(a: &str) -> Key {
    Key::Smtp(a.into())
}

fn login_key(l: &str) -> Key {
    Key::Login(l.into())
}

fn guid_at(domain: &str) -> Key {
    Key::Guid {
        guid: guid(),
        domain: Some(domain.into()),
    }
}

#[test]
fn classify_by_virtual_directory() {
    use ExchangeProtocol as P;
    let rows = [
        ("/autodiscover/autodiscover.xml", P::Autodiscover),
        ("/Autodiscover/Autodiscover.xml", P::Autodiscover),
        ("/autodiscover/autodiscover.svc", P::Autodiscover),
        ("/autodiscover/autodiscover.svc/WSSecurity", P::Autodiscover),
        ("/Autodiscover/HealthCheck.htm", P::Autodiscover),
        ("/autodiscover/autodiscover.json", P::AutodiscoverV2),
        (
            "/autodiscover/autodiscover.json/v1.0/jdoe@contoso.com",
            P::AutodiscoverV2,
        ),
        ("/owa/", P::Owa),
        ("/OWA/auth.owa", P::Owa),
        ("/ecp/default.aspx", P::Ecp),
        ("/EWS/Exchange.asmx", P::Ews),
        ("/ews/exchange.asmx", P::Ews),
        ("/Microsoft-Server-ActiveSync", P::ActiveSync),
        ("/microsoft-server-activesync/default.eas", P::ActiveSync),
        ("/mapi/emsmdb/", P::Mapi),
        ("/mapi/nspi/", P::Mapi),
        ("/rpc/rpcproxy.dll", P::Rpc),
        ("/RpcWithCert/rpcproxy.dll", P::Rpc),
        ("/OAB/2f1e4c8a-9b3d-4e6f-8a1b-0c2d3e4f5a6b/oab.xml", P::Oab),
        ("/PowerShell/", P::PowerShell),
        ("/", P::Other),
        ("", P::Other),
        ("/owafake/", P::Other),
        ("/favicon.ico", P::Other),
    ];
    for (path, want) in rows {
        assert_eq!(classify(path), want, "{path}");
    }
    assert_eq!(P::AutodiscoverV2.label(), "autodiscover_v2");
    assert_eq!(P::ActiveSync.label(), "activesync");
}

#[test]
fn body_is_wanted_only_where_it_names_the_mailbox() {
    let rows = [
        ("POST", "/autodiscover/autodiscover.xml", true),
        ("POST", "/Autodiscover/Autodiscover.svc", true),
        ("POST", "/autodiscover/autodiscover.svc/wssecurity", true),
        ("GET", "/autodiscover/autodiscover.xml", false),
        ("POST", "/autodiscover/autodiscover.json/v1.0/a@b.c", false),
        ("POST", "/owa/auth.owa", true),
        ("POST", "/owa/auth/owaauth.dll", true),
        ("POST", "/owa/service.svc", false),
        ("GET", "/owa/auth.owa", false),
        ("POST", "/EWS/Exchange.asmx", false),
        ("POST", "/mapi/emsmdb/", false),
    ];
    for (method, path, want) in rows {
        assert_eq!(
            wants_body(method, classify(path), path),
            want,
            "{method} {path}"
        );
    }
}

const POX: &[u8] = br#"<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>jdoe@contoso.com</EMailAddress>
    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request>
</Autodiscover>"#;

const POX_LEGACY_DN: &[u8] = br#"<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <LegacyDN>/o=Contoso/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)/cn=Recipients/cn=jdoe</LegacyDN>
    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request>
</Autodiscover>"#;

/// A SOAP `GetUserSettings` request as the EWS Managed API and exchangelib send it.
const SOAP: &[u8] = br#"<?xml version="1.0" encoding="utf-8"?>
<soap:Envelope xmlns:a="http://schemas.microsoft.com/exchange/2010/Autodiscover"
    xmlns:wsa="http://www.w3.org/2005/08/addressing"
    xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">
  <soap:Header>
    <a:RequestedServerVersion>Exchange2013</a:RequestedServerVersion>
    <wsa:Action>http://schemas.microsoft.com/exchange/2010/Autodiscover/Autodiscover/GetUserSettings</wsa:Action>
    <wsa:To>https://mail.contoso.com/autodiscover/autodiscover.svc</wsa:To>
  </soap:Header>
  <soap:Body>
    <a:GetUserSettingsRequestMessage xmlns:a="http://schemas.microsoft.com/exchange/2010/Autodiscover">
      <a:Request>
        <a:Users>
          <a:User>
            <a:Mailbox>alfred@contoso.com</a:Mailbox>
          </a:User>
        </a:Users>
        <a:RequestedSettings>
          <a:Setting>InternalEwsUrl</a:Setting>
        </a:RequestedSettings>
      </a:Request>
    </a:GetUserSettingsRequestMessage>
  </soap:Body>
</soap:Envelope>"#;

const OWA_FORM: &[u8] = b"destination=https%3A%2F%2Fmail.contoso.com%2Fowa%2F&flags=4&forcedownlevel=0&username=contoso%5Cjdoe&password=Passw0rd%21&passwordText=&isUtf8=1";

#[test]
fn hints_from_real_request_shapes() {
    let eas_b64 = eas::tests::encode(18, b"ApplDNPX1234", Some(1), &[(8, b"CONTOSO\\jdoe")]);
    let eas_b64_target = format!("/Microsoft-Server-ActiveSync?{eas_b64}");
    let anchor_guid = format!("{GUID}@contoso.com");
    let anchor_sid = format!("{SID}@contoso.com");
    let anchor_braced = format!("{{{}}}", GUID.to_uppercase());
    let mapi = format!("/mapi/emsmdb/?MailboxId={GUID}@contoso.com");
    let mapi_nspi = format!("/mapi/nspi/?MailboxId={GUID}%40contoso.com");
    let mapi_both =
        format!("/mapi/emsmdb/?MailboxId={GUID}@contoso.com&smtpAddress=alfred@contoso.com");
    let rpc = format!("/rpc/rpcproxy.dll?{GUID}@contoso.com:6001");
    let rpc_cert = format!("/rpcwithcert/rpcproxy.dll?{{{GUID}}}@contoso.com:6004");
    let rows: Vec<HintRow<'_>> = vec![
        (
            "EWS with the anchor every EWS client sends",
            "POST",
            "/EWS/Exchange.asmx",
            vec![("X-AnchorMailbox", b"alfred@contoso.com")],
            None,
            vec![(smtp("alfred@contoso.com"), "X-AnchorMailbox")],
        ),
        (
            "anchor as a SID at a domain",
            "POST",
            "/EWS/Exchange.asmx",
            vec![("X-AnchorMailbox", anchor_sid.as_bytes())],
            None,
            vec![(
                Key::Sid {
                    sid: SID.into(),
                    domain: Some("contoso.com".into()),
                },
                "X-AnchorMailbox",
            )],
        ),
        (
            "anchor as an ExchangeGuid at a domain",
            "POST",
            "/EWS/Exchange.asmx",
            vec![("X-AnchorMailbox", anchor_guid.as_bytes())],
            None,
            vec![(guid_at("contoso.com"), "X-AnchorMailbox")],
        ),
        (
            "anchor as a bare, braced ExchangeGuid",
            "POST",
            "/EWS/Exchange.asmx",
            vec![("X-AnchorMailbox", anchor_braced.as_bytes())],
            None,
            vec![(
                Key::Guid {
                    guid: guid(),
                    domain: None,
                },
                "X-AnchorMailbox",
            )],
        ),
        (
            "exchangelib's placeholder anchor is still a hint (resolution drops it)",
            "POST",
            "/autodiscover/autodiscover.svc",
            vec![("X-AnchorMailbox", b"DUMMY@contoso.com")],
            None,
            vec![(smtp("DUMMY@contoso.com"), "X-AnchorMailbox")],
        ),
        (
            "Office 365 anchor forms name nothing here",
            "GET",
            "/owa/service.svc",
            vec![("X-AnchorMailbox", b"Oid:0b3a@72f988bf-86f1-41af-91ab-2d7cd011db47")],
            None,
            vec![],
        ),
        (
            "a non-UTF-8 anchor",
            "POST",
            "/EWS/Exchange.asmx",
            vec![("X-AnchorMailbox", b"j\xe9doe@contoso.com")],
            None,
            vec![],
        ),
        (
            "MAPI emsmdb MailboxId",
            "POST",
            &mapi,
            vec![("X-RequestType", b"Connect")],
            None,
            vec![(guid_at("contoso.com"), "MAPI MailboxId")],
        ),
        (
            "MAPI nspi MailboxId, percent-encoded",
            "POST",
            &mapi_nspi,
            vec![],
            None,
            vec![(guid_at("contoso.com"), "MAPI MailboxId")],
        ),
        (
            "MAPI MailboxId before smtpAddress",
            "POST",
            &mapi_both,
            vec![],
            None,
            vec![
                (guid_at("contoso.com"), "MAPI MailboxId"),
                (smtp("alfred@contoso.com"), "MAPI smtpAddress"),
            ],
        ),
        (
            "MAPI smtpAddress",
            "POST",
            "/mapi/emsmdb/?smtpAddress=jdoe%40contoso.com",
            vec![],
            None,
            vec![(smtp("jdoe@contoso.com"), "MAPI smtpAddress")],
        ),
        (
            "MAPI MailboxId must be a GUID, as Exchange requires",
            "POST",
            "/mapi/emsmdb/?MailboxId=jdoe@contoso.com",
            vec![],
            None,
            vec![],
        ),
        (
            "RPC over HTTP, Exchange 2013+ target",
            "RPC_IN_DATA",
            &rpc,
            vec![("User-Agent", b"MSRPC")],
            None,
            vec![(guid_at("contoso.com"), "RPC target")],
        ),
        (
            "RPC over HTTP, Exchange 2010 server",
            "RPC_OUT_DATA",
            "/rpc/rpcproxy.dll?EX2010.contoso.com:6001",
            vec![],
            None,
            vec![(Key::Server("ex2010.contoso.com".into()), "RPC target")],
        ),
        (
            "RPC over HTTP, RpcWithCert and the directory port",
            "RPC_IN_DATA",
            &rpc_cert,
            vec![],
            None,
            vec![(guid_at("contoso.com"), "RPC target")],
        ),
        (
            "RPC over HTTP, an address is no target",
            "RPC_IN_DATA",
            "/rpc/rpcproxy.dll?jdoe@contoso.com:6001",
            vec![],
            None,
            vec![],
        ),
        (
            "Autodiscover POX: anchor and body name the same mailbox once",
            "POST",
            "/autodiscover/autodiscover.xml",
            vec![("X-AnchorMailbox", b"jdoe@contoso.com")],
            Some(POX),
            vec![(smtp("jdoe@contoso.com"), "X-AnchorMailbox")],
        ),
        (
            "Autodiscover POX EMailAddress",
            "POST",
            "/Autodiscover/Autodiscover.xml",
            vec![],
            Some(POX),
            vec![(smtp("jdoe@contoso.com"), "Autodiscover EMailAddress")],
        ),
        (
            "Autodiscover POX LegacyDN",
            "POST",
            "/autodiscover/autodiscover.xml",
            vec![],
            Some(POX_LEGACY_DN),
            vec![(
                Key::LegacyDn(
                    "/o=Contoso/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)/cn=Recipients/cn=jdoe"
                        .into(),
                ),
                "Autodiscover LegacyDN",
            )],
        ),
        (
            "Autodiscover SOAP GetUserSettings",
            "POST",
            "/autodiscover/autodiscover.svc",
            vec![],
            Some(SOAP),
            vec![(smtp("alfred@contoso.com"), "Autodiscover SOAP Mailbox")],
        ),
        (
            "a body is not read where it names no mailbox",
            "POST",
            "/EWS/Exchange.asmx",
            vec![],
            Some(POX),
            vec![],
        ),
        (
            "Autodiscover v2 path",
            "GET",
            "/autodiscover/autodiscover.json/v1.0/jdoe@contoso.com?Protocol=ActiveSync",
            vec![],
            None,
            vec![(smtp("jdoe@contoso.com"), "Autodiscover v2 path")],
        ),
        (
            "Autodiscover v2 preview Email=",
            "GET",
            "/autodiscover/autodiscover.json?Email=jdoe%40contoso.com&Protocol=EWS&RedirectCount=1",
            vec![],
            None,
            vec![(smtp("jdoe@contoso.com"), "Autodiscover v2 Email")],
        ),
        (
            "ProxyShell explicit-logon shape gives no hint",
            "GET",
            "/autodiscover/autodiscover.json?@evil.corp/PowerShell/?X-Rps-CAT=VgEAVAdXaW5kb3dz&Email=autodiscover/autodiscover.json%3F@evil.corp",
            vec![],
            None,
            vec![],
        ),
        (
            "ProxyShell shape towards MAPI gives no hint",
            "POST",
            "/autodiscover/autodiscover.json?@evil.corp/mapi/nspi/?&Email=autodiscover/autodiscover.json%3F@evil.corp",
            vec![],
            None,
            vec![],
        ),
        (
            "ProxyShell shape with a plausible Email still gives no hint",
            "GET",
            "/autodiscover/autodiscover.json?@evil.corp/ews/exchange.asmx?&Email=jdoe@contoso.com",
            vec![],
            None,
            vec![],
        ),
        (
            "OWA logon form (2013+)",
            "POST",
            "/owa/auth.owa",
            vec![("Content-Type", b"application/x-www-form-urlencoded")],
            Some(OWA_FORM),
            vec![(login_key("contoso\\jdoe"), "OWA logon username")],
        ),
        (
            "OWA logon form (2010), a UPN",
            "POST",
            "/owa/auth/owaauth.dll",
            vec![],
            Some(b"destination=https%3A%2F%2Fmail%2Fowa%2F&flags=0&username=jdoe%40corp.contoso.com&password=x"),
            vec![(login_key("jdoe@corp.contoso.com"), "OWA logon username")],
        ),
        (
            "OWA explicit logon path",
            "GET",
            "/owa/alfred@contoso.com/",
            vec![],
            None,
            vec![(smtp("alfred@contoso.com"), "explicit logon path")],
        ),
        (
            "OWA explicit logon path, encoded, deeper",
            "POST",
            "/owa/alfred%40contoso.com/service.svc?action=GetFolder",
            vec![],
            None,
            vec![(smtp("alfred@contoso.com"), "explicit logon path")],
        ),
        (
            "OWA explicit logon header",
            "POST",
            "/owa/service.svc?action=FindItem",
            vec![("X-OWA-ExplicitLogonUser", b"alfred@contoso.com")],
            None,
            vec![(smtp("alfred@contoso.com"), "X-OWA-ExplicitLogonUser")],
        ),
        (
            "ECP explicit logon path",
            "GET",
            "/ecp/alfred@contoso.com/",
            vec![],
            None,
            vec![(smtp("alfred@contoso.com"), "explicit logon path")],
        ),
        (
            "ActiveSync plain query (MS-ASHTTP example)",
            "POST",
            "/Microsoft-Server-ActiveSync?Cmd=Ping&User=rmjones&DeviceId=v140Device&DeviceType=SmartPhone",
            vec![("MS-ASProtocolVersion", b"14.0")],
            None,
            vec![(login_key("rmjones"), "ActiveSync User")],
        ),
        (
            "ActiveSync: the anchor before User=",
            "POST",
            "/Microsoft-Server-ActiveSync?Cmd=Sync&User=CONTOSO%5Cjdoe&DeviceId=ApplDNPX1234&DeviceType=iPhone",
            vec![("X-AnchorMailbox", b"jdoe@contoso.com")],
            None,
            vec![
                (smtp("jdoe@contoso.com"), "X-AnchorMailbox"),
                (login_key("CONTOSO\\jdoe"), "ActiveSync User"),
            ],
        ),
        (
            "ActiveSync base64 query with User",
            "POST",
            &eas_b64_target,
            vec![],
            None,
            vec![(login_key("CONTOSO\\jdoe"), "ActiveSync User")],
        ),
        (
            "ActiveSync base64 query without User (MS-ASHTTP example)",
            "POST",
            "/Microsoft-Server-ActiveSync?jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l",
            vec![],
            None,
            vec![],
        ),
        (
            "OAB names no mailbox",
            "GET",
            "/OAB/2f1e4c8a-9b3d-4e6f-8a1b-0c2d3e4f5a6b/oab.xml",
            vec![],
            None,
            vec![],
        ),
    ];
    for (name, method, target, headers, body, want) in rows {
        let got = with(method, target, &headers, body, hints);
        let got: Vec<(Key, &str)> = got
            .into_iter()
            .map(|c| {
                assert_eq!(c.source, Source::Hint, "{name}");
                (c.key, c.what)
            })
            .collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn login_from_authorization() {
    let ntlm3 = ntlm::tests::REAL_NTLM_TYPE3;
    let spnego3 = ntlm::tests::REAL_SPNEGO_TYPE3;
    let basic = |s: &str| format!("Basic {}", b64(s.as_bytes()));
    let built = b64(&ntlm::tests::authenticate(
        "",
        "jdoe@corp.contoso.com",
        true,
    ));
    // A Kerberos AP-REQ in a SPNEGO NegTokenInit: opaque, no NTLMSSP inside.
    let kerberos = format!(
        "Negotiate {}",
        b64(b"\x60\x82\x01\x00\x06\x06\x2b\x06\x01\x05\x05\x02\xa0\x81\xf5\x30\x81\xf2\xa0\x0d\x30\x0b\x06\x09\x2a\x86\x48\x86\xf7\x12\x01\x02\x02\xa2\x81\xe0\x04\x81\xdd\x60\x81\xda\x06\x09\x2a\x86\x48\x86\xf7\x12\x01\x02\x02\x01\x00\x6e\x81\xca")
    );
    let rows: Vec<LoginRow<'_>> = vec![
        ("Basic DOMAIN\\user", basic("CONTOSO\\jdoe:Passw0rd!").into(), Some((login_key("CONTOSO\\jdoe"), "Basic"))),
        ("Basic UPN", basic("jdoe@corp.contoso.com:pw:with:colons").into(), Some((login_key("jdoe@corp.contoso.com"), "Basic"))),
        ("scheme is case-insensitive", format!("basic {}", b64(b"jdoe:pw")).into(), Some((login_key("jdoe"), "Basic"))),
        ("Basic without padding", format!("Basic {}", b64(b"ab:c").trim_end_matches('=')).into(), Some((login_key("ab"), "Basic"))),
        ("Basic bad base64", b"Basic !!!notbase64".to_vec(), None),
        ("Basic without a colon", basic("jdoe").into(), None),
        ("Basic empty user", basic(":pw").into(), None),
        ("Basic non-UTF-8 user", format!("Basic {}", b64(b"j\xe9doe:pw")).into(), None),
        ("Basic without credentials", b"Basic".to_vec(), None),
        ("NTLM AUTHENTICATE", format!("NTLM {ntlm3}").into(), Some((login_key("CONTOSO\\jdoe"), "NTLM"))),
        ("NTLM AUTHENTICATE with a UPN", format!("NTLM {built}").into(), Some((login_key("jdoe@corp.contoso.com"), "NTLM"))),
        ("NTLM NEGOTIATE", format!("NTLM {}", ntlm::tests::REAL_NTLM_TYPE1).into(), None),
        ("Negotiate wrapping NTLM AUTHENTICATE", format!("Negotiate {spnego3}").into(), Some((login_key("CONTOSO\\jdoe"), "Negotiate NTLM"))),
        ("Negotiate with raw NTLM inside", format!("Negotiate {ntlm3}").into(), Some((login_key("CONTOSO\\jdoe"), "Negotiate NTLM"))),
        ("Negotiate wrapping NTLM NEGOTIATE", format!("Negotiate {}", ntlm::tests::REAL_SPNEGO_TYPE1).into(), None),
        ("Negotiate Kerberos", kerberos.into(), None),
        ("NTLM bad base64", b"NTLM TlRMTVNTUAADAAAA%%%".to_vec(), None),
        ("Bearer upn", jwt(r#"{"aud":"https://mail.contoso.com","upn":"jdoe@corp.contoso.com","unique_name":"x@y.z"}"#).into(), Some((login_key("jdoe@corp.contoso.com"), "Bearer upn"))),
        ("Bearer smtp first", jwt(r#"{"upn":"jdoe@corp.contoso.com","smtp":"jdoe@contoso.com"}"#).into(), Some((smtp("jdoe@contoso.com"), "Bearer smtp"))),
        ("Bearer unique_name", jwt(r#"{"unique_name":"jdoe@corp.contoso.com"}"#).into(), Some((login_key("jdoe@corp.contoso.com"), "Bearer unique_name"))),
        ("Bearer preferred_username", jwt(r#"{"preferred_username":"jdoe@corp.contoso.com"}"#).into(), Some((login_key("jdoe@corp.contoso.com"), "Bearer preferred_username"))),
        ("Bearer non-string upn falls to the next claim", jwt(r#"{"upn":42,"unique_name":"jdoe@corp.contoso.com"}"#).into(), Some((login_key("jdoe@corp.contoso.com"), "Bearer unique_name"))),
        ("Bearer smtp that is no address", jwt(r#"{"smtp":"not an address"}"#).into(), None),
        ("Bearer no routing claim", jwt(r#"{"oid":"0b3a"}"#).into(), None),
        ("Bearer payload not JSON", format!("Bearer aGVhZGVy.{}.c2ln", b64(b"not json")).into(), None),
        ("Bearer payload a JSON array", jwt(r#"["upn"]"#).into(), None),
        ("Bearer two parts", b"Bearer aGVhZGVy.eyJ1cG4iOiJhQGIuYyJ9".to_vec(), None),
        ("Bearer opaque token", b"Bearer EwBwA8l6BAAU".to_vec(), None),
        ("Digest", b"Digest username=\"jdoe\", realm=\"x\"".to_vec(), None),
        ("not UTF-8", b"Basic \xff\xfe".to_vec(), None),
    ];
    for (name, value, want) in rows {
        let got = with(
            "POST",
            "/EWS/Exchange.asmx",
            &[("Authorization", &value)],
            None,
            |r| login(r.headers),
        );
        let got = got.map(|c| {
            assert_eq!(c.source, Source::Login, "{name}");
            (c.key, c.what)
        });
        assert_eq!(got, want, "{name}");
    }
    assert_eq!(with("GET", "/owa/", &[], None, |r| login(r.headers)), None);
}

#[test]
fn activesync_device_ids() {
    let b64_target = format!(
        "/Microsoft-Server-ActiveSync?{}",
        eas::tests::encode(0, b"ApplDNPX1234", None, &[])
    );
    let rows = [
        (
            "/Microsoft-Server-ActiveSync?Cmd=Ping&User=rmjones&DeviceId=v140Device&DeviceType=SmartPhone",
            Some("v140Device"),
        ),
        (
            "/Microsoft-Server-ActiveSync?jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l",
            Some("v140Device"),
        ),
        (b64_target.as_str(), Some("ApplDNPX1234")),
        ("/Microsoft-Server-ActiveSync?Cmd=Sync&User=x", None),
        ("/Microsoft-Server-ActiveSync", None),
        ("/EWS/Exchange.asmx?DeviceId=v140Device", None),
    ];
    for (target, want) in rows {
        let got = with("POST", target, &[], None, activesync_device);
        assert_eq!(got.as_deref(), want, "{target}");
    }
}

#[test]
fn long_lived_requests() {
    let ping_b64 = format!(
        "/Microsoft-Server-ActiveSync?{}",
        eas::tests::encode(18, b"dev", None, &[])
    );
    let sync_b64 = format!(
        "/Microsoft-Server-ActiveSync?{}",
        eas::tests::encode(0, b"dev", None, &[])
    );
    let streaming: &[u8] =
        b"\"http://schemas.microsoft.com/exchange/services/2006/messages/GetStreamingEvents\"";
    let rows: Vec<LongLivedRow<'_>> = vec![
        (
            "RPC_IN_DATA",
            "/rpc/rpcproxy.dll?ex1.contoso.com:6001",
            vec![],
            true,
        ),
        (
            "RPC_OUT_DATA",
            "/rpc/rpcproxy.dll?ex1.contoso.com:6001",
            vec![],
            true,
        ),
        (
            "POST",
            "/rpc/rpcproxy.dll?ex1.contoso.com:6001",
            vec![],
            false,
        ),
        (
            "POST",
            "/Microsoft-Server-ActiveSync?Cmd=Ping&User=u&DeviceId=d&DeviceType=t",
            vec![],
            true,
        ),
        (
            "POST",
            "/Microsoft-Server-ActiveSync?Cmd=ping&User=u&DeviceId=d&DeviceType=t",
            vec![],
            true,
        ),
        (
            "POST",
            "/Microsoft-Server-ActiveSync?Cmd=Sync&User=u&DeviceId=d&DeviceType=t",
            vec![],
            false,
        ),
        ("POST", &ping_b64, vec![], true),
        ("POST", &sync_b64, vec![], false),
        ("OPTIONS", "/Microsoft-Server-ActiveSync", vec![], false),
        (
            "POST",
            "/mapi/emsmdb/?MailboxId=x",
            vec![("X-RequestType", b"NotificationWait")],
            true,
        ),
        (
            "POST",
            "/mapi/emsmdb/?MailboxId=x",
            vec![("X-RequestType", b"Execute")],
            false,
        ),
        ("POST", "/mapi/emsmdb/?MailboxId=x", vec![], false),
        (
            "POST",
            "/EWS/Exchange.asmx",
            vec![("SOAPAction", streaming)],
            true,
        ),
        (
            "POST",
            "/EWS/Exchange.asmx",
            vec![(
                "SOAPAction",
                b"http://schemas.microsoft.com/exchange/services/2006/messages/GetItem",
            )],
            false,
        ),
        ("POST", "/EWS/Exchange.asmx", vec![], false),
        (
            "POST",
            "/owa/ev.owa?oeh=1&ns=PendingRequest&ev=PendingNotificationRequest",
            vec![],
            true,
        ),
        (
            "POST",
            "/owa/ev.owa2?ns=PendingRequest&ev=PendingNotificationRequest&UA=0",
            vec![],
            true,
        ),
        (
            "POST",
            "/owa/alfred@contoso.com/ev.owa2?ns=PendingRequest&ev=PendingNotificationRequest",
            vec![],
            true,
        ),
        ("POST", "/owa/ev.owa?oeh=1&ns=Notify&ev=Poll", vec![], false),
        ("POST", "/owa/service.svc?action=GetFolder", vec![], false),
        ("GET", "/OAB/x/oab.xml", vec![], false),
    ];
    for (method, target, headers, want) in rows {
        let got = with(method, target, &headers, None, |r| {
            is_long_lived(classify(r.path), r.method, r.path, r.query, r.headers)
        });
        assert_eq!(got, want, "{method} {target}");
    }
}

#[test]
fn ews_streaming_in_the_body() {
    let request = br#"<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"
      xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">
      <soap:Body><m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>x</t:SubscriptionId>
      </m:SubscriptionIds><m:ConnectionTimeout>30</m:ConnectionTimeout></m:GetStreamingEvents>
      </soap:Body></soap:Envelope>"#;
    assert!(ews_streaming_body(request));
    assert!(ews_streaming_body(b"<GetStreamingEvents xmlns=\"x\">"));
    for not in [
        &b"<m:GetStreamingEventsResponse>"[..],
        b"</m:GetStreamingEvents>",
        b"<m:GetItem>GetStreamingEvents</m:GetItem>",
        b"<m:Subscribe><m:StreamingSubscriptionRequest>",
        b"GetStreamingEvents",
        b"",
    ] {
        assert!(!ews_streaming_body(not), "{}", String::from_utf8_lossy(not));
    }
}

/// A table with two routed domains and two mailboxes:
/// jdoe (site paris → new, with GUID and logins) and alfred (pinned to old).
fn table() -> RoutingTable {
    let routes = format!(
        r#"
[domains."contoso.com"]
unknown = "old"
[domains."fabrikam.com"]
unknown = "reject"
[sites.paris]
owner = "new"

[[mailbox]]
address = "jdoe@contoso.com"
aliases = ["john.doe@contoso.com"]
site = "paris"
guid = "{GUID}"
logins = ["CONTOSO\\jdoe", "jdoe@corp.contoso.com"]

[[mailbox]]
address = "alfred@contoso.com"
site = "paris"
owner = "old"
"#
    );
    let known = KnownTargets::Exactly(vec!["old".into(), "new".into()]);
    load_routes_text(std::path::Path::new("routes.toml"), &routes, &known).unwrap()
}

/// `mailbox@owner`, `default owner`, or `none`, with the source and what of the candidate.
fn route_of(t: &RoutingTable, candidates: &[Candidate]) -> String {
    match first_match(t, candidates) {
        Some((Resolved::Mailbox(m), c)) => format!(
            "{} {} via {} {}",
            m.address(),
            m.owner_name(),
            c.source.label(),
            c.what
        ),
        Some((Resolved::Target(target), c)) => format!(
            "default {} via {} {}",
            t.target_name(target),
            c.source.label(),
            c.what
        ),
        None => "none".into(),
    }
}

#[test]
fn resolution_order_and_fall_through() {
    let t = table();
    let basic = format!("Basic {}", b64(b"CONTOSO\\jdoe:pw"));
    let basic_upn = format!("Basic {}", b64(b"alfred@contoso.com:pw"));
    let unknown_guid = format!("/mapi/emsmdb/?MailboxId={}@contoso.com", Uuid::from_u128(7));
    let mapi = format!("/mapi/emsmdb/?MailboxId={GUID}@contoso.com");
    let sid_anchor = format!("{SID}@contoso.com");
    let rows: Vec<RouteRow<'_>> = vec![
        (
            "a hint names a mailbox",
            "/EWS/Exchange.asmx",
            vec![
                ("X-AnchorMailbox", b"John.Doe@Contoso.com"),
                ("Authorization", basic_upn.as_bytes()),
            ],
            None,
            "jdoe@contoso.com new via hint X-AnchorMailbox",
        ),
        (
            "a placeholder anchor falls through to the login",
            "/autodiscover/autodiscover.svc",
            vec![
                ("X-AnchorMailbox", b"DUMMY@contoso.com"),
                ("Authorization", basic.as_bytes()),
            ],
            None,
            "jdoe@contoso.com new via login Basic",
        ),
        (
            "a placeholder anchor alone reaches its domain's default",
            "/autodiscover/autodiscover.svc",
            vec![("X-AnchorMailbox", b"DUMMY@contoso.com")],
            None,
            "default old via default X-AnchorMailbox",
        ),
        (
            "a domain that rejects unknown names gives no default",
            "/EWS/Exchange.asmx",
            vec![("X-AnchorMailbox", b"nobody@fabrikam.com")],
            None,
            "none",
        ),
        (
            "a domain the table does not route gives no default",
            "/EWS/Exchange.asmx",
            vec![("X-AnchorMailbox", b"someone@elsewhere.example")],
            None,
            "none",
        ),
        (
            "MAPI by ExchangeGuid",
            &mapi,
            vec![],
            None,
            "jdoe@contoso.com new via hint MAPI MailboxId",
        ),
        (
            "an unknown ExchangeGuid reaches its domain's default",
            &unknown_guid,
            vec![],
            None,
            "default old via default MAPI MailboxId",
        ),
        (
            "a SID anchor is not resolved yet; the login is",
            "/EWS/Exchange.asmx",
            vec![
                ("X-AnchorMailbox", sid_anchor.as_bytes()),
                ("Authorization", basic.as_bytes()),
            ],
            None,
            "jdoe@contoso.com new via login Basic",
        ),
        (
            "a UPN login that is an address",
            "/EWS/Exchange.asmx",
            vec![("Authorization", basic_upn.as_bytes())],
            None,
            "alfred@contoso.com old via login Basic",
        ),
        (
            "the cookie before the login",
            "/owa/service.svc",
            vec![("Authorization", basic.as_bytes())],
            Some(smtp("alfred@contoso.com")),
            "alfred@contoso.com old via cookie coexist cookie",
        ),
        (
            "a hint before the cookie",
            "/owa/alfred@contoso.com/",
            vec![],
            Some(smtp("jdoe@contoso.com")),
            "alfred@contoso.com old via hint explicit logon path",
        ),
        (
            "an RPC server name is not resolved yet",
            "/rpc/rpcproxy.dll?ex2010.contoso.com:6001",
            vec![],
            None,
            "none",
        ),
        ("nothing at all", "/owa/", vec![], None, "none"),
    ];
    for (name, target, headers, cookie, want) in rows {
        let all = with("POST", target, &headers, None, |r| {
            let cookie = cookie.map(|k| Candidate::new(Source::Cookie, k, "coexist cookie"));
            candidates(r, cookie, None)
        });
        assert_eq!(route_of(&t, &all), want, "{name}");
    }
}

#[test]
fn learned_keys_come_after_the_login_and_before_the_default() {
    let t = table();
    let learned = Candidate::new(
        Source::Learned,
        smtp("alfred@contoso.com"),
        "ActiveSync DeviceId",
    );
    let target =
        "/Microsoft-Server-ActiveSync?Cmd=Ping&User=nobody&DeviceId=ApplX&DeviceType=iPhone";
    let basic = format!("Basic {}", b64(b"CONTOSO\\jdoe:pw"));
    let with_login = with(
        "POST",
        target,
        &[("Authorization", basic.as_bytes())],
        None,
        |r| candidates(r, None, Some(learned.clone())),
    );
    assert_eq!(
        route_of(&t, &with_login),
        "jdoe@contoso.com new via login Basic"
    );
    let without = with("POST", target, &[], None, |r| {
        candidates(r, None, Some(learned.clone()))
    });
    assert_eq!(
        route_of(&t, &without),
        "alfred@contoso.com old via learned ActiveSync DeviceId"
    );
    let sources: Vec<Source> = without.iter().map(|c| c.source).collect();
    assert_eq!(sources, [Source::Hint, Source::Learned, Source::Default]);
}

#[test]
fn resolve_each_kind_of_key() {
    let t = table();
    let r = |key: Key| {
        resolve(&t, &Candidate::new(Source::Hint, key, "test")).map(|r| match r {
            Resolved::Mailbox(m) => format!("{} {}", m.address(), t.target_name(r.target())),
            Resolved::Target(target) => format!("default {}", t.target_name(target)),
        })
    };
    let rows: Vec<(Key, Option<&str>)> = vec![
        (smtp("JDOE@contoso.com"), Some("jdoe@contoso.com new")),
        (smtp("jdoe+tag@contoso.com"), Some("jdoe@contoso.com new")),
        (smtp("nobody@contoso.com"), None),
        (smtp("nobody@fabrikam.com"), None),
        (smtp("jdoe@elsewhere.example"), None),
        (guid_at("contoso.com"), Some("jdoe@contoso.com new")),
        (
            Key::Guid {
                guid: guid(),
                domain: None,
            },
            Some("jdoe@contoso.com new"),
        ),
        (
            Key::Guid {
                guid: Uuid::from_u128(7),
                domain: None,
            },
            None,
        ),
        (login_key("contoso\\JDOE"), Some("jdoe@contoso.com new")),
        (
            login_key("jdoe@corp.contoso.com"),
            Some("jdoe@contoso.com new"),
        ),
        (
            login_key("alfred@contoso.com"),
            Some("alfred@contoso.com old"),
        ),
        (login_key("CONTOSO\\alfred"), None),
        (login_key("DUMMY@contoso.com"), None),
        (
            Key::Sid {
                sid: SID.into(),
                domain: Some("contoso.com".into()),
            },
            None,
        ),
        (
            Key::LegacyDn("/o=Contoso/ou=x/cn=Recipients/cn=jdoe".into()),
            None,
        ),
        (Key::Server("ex2010.contoso.com".into()), None),
        (Key::Domain("CONTOSO.com".into()), Some("default old")),
        (Key::Domain("fabrikam.com".into()), None),
        (Key::Domain("elsewhere.example".into()), None),
    ];
    for (key, want) in rows {
        assert_eq!(r(key.clone()).as_deref(), want, "{key:?}");
    }
}

#[test]
fn defaults_follow_the_candidates_domains_once() {
    let cands = vec![
        Candidate::new(Source::Hint, smtp("DUMMY@Contoso.com"), "X-AnchorMailbox"),
        Candidate::new(Source::Hint, guid_at("contoso.com"), "MAPI MailboxId"),
        Candidate::new(Source::Hint, Key::Server("ex1".into()), "RPC target"),
        Candidate::new(Source::Login, login_key("CONTOSO\\jdoe"), "NTLM"),
        Candidate::new(Source::Login, login_key("jdoe@corp.contoso.com"), "Basic"),
        Candidate::new(Source::Default, Key::Domain("ignored.example".into()), "x"),
    ];
    let got: Vec<(Source, Key, &str)> = defaults(&cands)
        .into_iter()
        .map(|c| (c.source, c.key, c.what))
        .collect();
    assert_eq!(
        got,
        [
            (
                Source::Default,
                Key::Domain("Contoso.com".into()),
                "X-AnchorMailbox"
            ),
            (
                Source::Default,
                Key::Domain("corp.contoso.com".into()),
                "Basic"
            ),
        ]
    );
    assert_eq!(Source::Default.label(), "default");
    assert_eq!(Key::LegacyDn(String::new()).kind(), "legacy_dn");
}

/// Every entry point on arbitrary bytes, and on real messages with bytes changed or cut:
/// `None` or an answer, never a panic.
mod fuzz {
    use super::*;

    fn requests(method: &str, target: &str, header: &[u8], body: &[u8]) {
        let headers: Vec<(&str, &[u8])> = [
            "X-AnchorMailbox",
            "Authorization",
            "X-OWA-ExplicitLogonUser",
            "X-RequestType",
            "SOAPAction",
        ]
        .into_iter()
        .map(|n| (n, header))
        .filter(|(_, v)| HeaderValue::from_bytes(v).is_ok())
        .collect();
        with(method, target, &headers, Some(body), |r| {
            let _ = hints(r);
            let _ = login(r.headers);
            let _ = activesync_device(r);
            let _ = is_long_lived(classify(r.path), r.method, r.path, r.query, r.headers);
            let _ = ews_streaming_body(body);
            let _ = candidates(r, None, None);
        });
    }

    const TARGETS: &[&str] = &[
        "/autodiscover/autodiscover.xml",
        "/autodiscover/autodiscover.svc",
        "/autodiscover/autodiscover.json",
        "/owa/auth.owa",
        "/mapi/emsmdb/",
        "/rpc/rpcproxy.dll",
        "/Microsoft-Server-ActiveSync",
        "/EWS/Exchange.asmx",
    ];

    proptest! {
        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = ntlm::user_in_token(&bytes);
            let _ = ntlm::authenticate_user(&bytes);
            let _ = eas::parse_bytes(&bytes);
            let _ = scan::xml_text(&bytes, "EMailAddress", |_| true);
            let _ = scan::form_field(&bytes, "username");
            let text = String::from_utf8_lossy(&bytes);
            let _ = eas::parse(&text);
            let _ = scan::query_param(&text, "MailboxId");
            let encoded = b64(&bytes);
            for scheme in ["Basic", "NTLM", "Negotiate", "Bearer"] {
                let value = format!("{scheme} {encoded}");
                with("POST", "/", &[("Authorization", value.as_bytes())], None, |r| login(r.headers));
            }
            for path in TARGETS {
                requests("POST", &format!("{path}?{text}"), &bytes, &bytes);
                requests("POST", &format!("{path}/{text}"), &bytes, &bytes);
                requests("RPC_IN_DATA", &format!("{path}?{encoded}"), &bytes, &bytes);
            }
        }

        #[test]
        fn real_ntlm_with_bytes_changed(
            which in 0usize..4,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let token = [
                ntlm::tests::REAL_NTLM_TYPE3,
                ntlm::tests::REAL_SPNEGO_TYPE3,
                ntlm::tests::REAL_NTLM_TYPE1,
                ntlm::tests::REAL_SPNEGO_TYPE1,
            ][which];
            let mut bytes = base64::engine::general_purpose::STANDARD.decode(token).unwrap();
            for (at, b) in edits {
                let n = bytes.len();
                bytes[at % n] = b;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            let _ = ntlm::user_in_token(&bytes);
            let value = format!("Negotiate {}", b64(&bytes));
            with("POST", "/", &[("Authorization", value.as_bytes())], None, |r| login(r.headers));
        }

        #[test]
        fn real_bodies_cut_anywhere(which in 0usize..4, cut in any::<usize>()) {
            let (target, body) = [
                ("/autodiscover/autodiscover.xml", POX),
                ("/autodiscover/autodiscover.xml", POX_LEGACY_DN),
                ("/autodiscover/autodiscover.svc", SOAP),
                ("/owa/auth.owa", OWA_FORM),
            ][which];
            let body = &body[..cut % (body.len() + 1)];
            let got = with("POST", target, &[], Some(body), hints);
            // An XML body cut anywhere gives the whole value or nothing, never a prefix of
            // it. (A form shorter than the peek limit is taken as whole: the listener
            // reads all of a body that fits.)
            for c in got {
                match c.key {
                    Key::Smtp(a) => prop_assert!(a == "jdoe@contoso.com" || a == "alfred@contoso.com", "{a}"),
                    Key::LegacyDn(dn) => prop_assert!(dn.ends_with("cn=jdoe"), "{dn}"),
                    Key::Login(_) => prop_assert_eq!(which, 3),
                    other => prop_assert!(false, "{other:?}"),
                }
            }
        }
    }
}
