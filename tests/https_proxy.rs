//! The HTTPS proxy end to end: a hyper client over real TLS (ALPN http/1.1) through coexist
//! to two recording HTTP backends, one per migration side. Each request must reach the side
//! that owns the mailbox it names, with its method, path, headers and body intact.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use coexist::app::Running;
use coexist::config::Config;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use support::TestCert;

/// What a backend received.
#[derive(Debug, Clone)]
struct Seen {
    /// Which backend connection carried it (counted from 0 per backend).
    conn: usize,
    method: String,
    uri: String,
    headers: hyper::HeaderMap,
    body: Bytes,
}

/// A plain-HTTP backend that records each request and answers `<name> <path>`.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    async fn start(name: &'static str) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            for conn in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let log = Arc::clone(&log);
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await?.to_bytes();
                                log.lock().unwrap().push(Seen {
                                    conn,
                                    method: parts.method.to_string(),
                                    uri: parts.uri.to_string(),
                                    headers: parts.headers,
                                    body,
                                });
                                let text = format!("{name} {}", parts.uri.path());
                                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(text))))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder { addr, seen }
    }

    /// The requests that came through the proxy (coexist's health probes left out).
    fn seen(&self) -> Vec<Seen> {
        let all = self.seen.lock().unwrap().clone();
        all.into_iter()
            .filter(|s| {
                s.headers
                    .get("user-agent")
                    .is_none_or(|u| u != "coexist-health")
            })
            .collect()
    }

    fn probes(&self) -> usize {
        let all = self.seen.lock().unwrap().len();
        all - self.seen().len()
    }
}

struct Setup {
    old: Recorder,
    new: Recorder,
    running: Running,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let old = Recorder::start("old").await;
    let new = Recorder::start("new").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), support::ROUTES).unwrap();
    let (cert, key) = TestCert::new().write(dir.path());
    let cfg = format!(
        "[smtp]\n[[smtp.listener]]\nlisten = \"127.0.0.1:0\"\nmode = \"relay\"\n\
         [https]\nlisten = \"127.0.0.1:0\"\ndefault_target = \"old\"\n\
         [[https.cert]]\ncert = \"{}\"\nkey = \"{}\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [targets.old]\nsmtp = [\"127.0.0.1:9\"]\nhttps = [\"http://{}\"]\n\
         [targets.new]\nsmtp = [\"127.0.0.1:9\"]\nhttps = [\"http://{}\"]\n",
        cert.display(),
        key.display(),
        old.addr,
        new.addr
    );
    std::fs::write(dir.path().join("coexist.toml"), cfg).unwrap();
    let running = Running::start(Config::load(&dir.path().join("coexist.toml")).unwrap())
        .await
        .unwrap();
    Setup {
        old,
        new,
        running,
        _dir: dir,
    }
}

/// One keep-alive HTTPS connection to the proxy, as a client that checks nothing of the
/// certificate (it is self-signed) but offers only http/1.1.
async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let mut tls = (*coexist::net::tls::client_config(false, None).unwrap()).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn send(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (u16, String) {
    c.ready().await.unwrap();
    let res = c.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn each_request_reaches_the_side_that_owns_its_mailbox() {
    let s = setup().await;
    let addr = s.running.https_addr.expect("https listener");
    let mut c = connect(addr).await;

    // EWS for alice (site paris, owned by new), with an Authorization that must pass
    // untouched and a hop-by-hop header that must not. (NTLM pins a connection: see the
    // NTLM tests.)
    let soap = "<soap:Envelope><soap:Body><m:GetFolder/></soap:Body></soap:Envelope>";
    let req = Request::post("/EWS/Exchange.asmx")
        .header("host", "mail.example.com")
        .header("x-anchormailbox", "alice@example.com")
        .header("authorization", "Bearer opaque-token")
        .header("content-type", "text/xml; charset=utf-8")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        .header("via", "1.1 someone")
        .body(Full::new(Bytes::from(soap)))
        .unwrap();
    assert_eq!(
        send(&mut c, req).await,
        (200, "new /EWS/Exchange.asmx".into())
    );

    // ActiveSync Ping for bob (site berlin, owned by old), on the same client connection.
    let req = Request::post(
        "/Microsoft-Server-ActiveSync?Cmd=Ping&User=bob&DeviceId=v140Device&DeviceType=SmartPhone",
    )
    .header("host", "mail.example.com")
    .header("x-anchormailbox", "bob@example.com")
    .header("ms-asprotocolversion", "16.1")
    .body(Full::new(Bytes::from_static(b"\x03\x01j\x00")))
    .unwrap();
    assert_eq!(
        send(&mut c, req).await,
        (200, "old /Microsoft-Server-ActiveSync".into())
    );

    // Nothing names a mailbox: the default target.
    let req = Request::get("/owa/")
        .header("host", "mail.example.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&mut c, req).await, (200, "old /owa/".into()));

    let new = s.new.seen();
    assert_eq!(new.len(), 1, "{new:?}");
    let ews = &new[0];
    assert_eq!(ews.method, "POST");
    assert_eq!(ews.uri, "/EWS/Exchange.asmx");
    assert_eq!(ews.body, soap.as_bytes());
    assert_eq!(ews.headers["authorization"], "Bearer opaque-token");
    assert_eq!(ews.headers["x-anchormailbox"], "alice@example.com");
    assert_eq!(ews.headers["host"], "mail.example.com");
    assert_eq!(ews.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(ews.headers["x-forwarded-proto"], "https");
    assert!(ews.headers.get("x-hop").is_none(), "{:?}", ews.headers);
    assert!(ews.headers.get("via").is_none(), "{:?}", ews.headers);

    let old = s.old.seen();
    assert_eq!(old.len(), 2, "{old:?}");
    assert_eq!(
        old[0].uri,
        "/Microsoft-Server-ActiveSync?Cmd=Ping&User=bob&DeviceId=v140Device&DeviceType=SmartPhone"
    );
    assert_eq!(&old[0].body[..], b"\x03\x01j\x00");
    assert_eq!(old[1].uri, "/owa/");
    // Both sides were probed at start, on the health-check page.
    assert!(s.old.probes() >= 1 && s.new.probes() >= 1);
    let probe = s.old.seen.lock().unwrap()[0].clone();
    assert_eq!(probe.uri, "/owa/HealthCheck.htm");
}

#[tokio::test]
async fn a_cutover_moves_the_next_request() {
    let s = setup().await;
    let addr = s.running.https_addr.expect("https listener");
    let mut c = connect(addr).await;
    let ews = || {
        Request::post("/EWS/Exchange.asmx")
            .header("host", "mail.example.com")
            .header("x-anchormailbox", "bob@example.com")
            .body(Full::new(Bytes::from_static(b"<x/>")))
            .unwrap()
    };
    assert_eq!(send(&mut c, ews()).await.1, "old /EWS/Exchange.asmx");
    let change = coexist::control::Change::Site {
        site: "berlin".into(),
        to: "new".into(),
    };
    s.running
        .control
        .cutover(&change, false, false, "test")
        .unwrap();
    // Same client connection, next request: the new owner.
    assert_eq!(send(&mut c, ews()).await.1, "new /EWS/Exchange.asmx");
}

#[tokio::test]
async fn a_target_whose_servers_are_all_down_answers_503() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), support::ROUTES).unwrap();
    let (cert, key) = TestCert::new().write(dir.path());
    // Nothing listens on the discard port: the connection is refused.
    let cfg = format!(
        "[smtp]\n[[smtp.listener]]\nlisten = \"127.0.0.1:0\"\nmode = \"relay\"\n\
         [https]\nlisten = \"127.0.0.1:0\"\n\
         [[https.cert]]\ncert = \"{}\"\nkey = \"{}\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [targets.old]\nsmtp = [\"127.0.0.1:9\"]\nhttps = [\"http://127.0.0.1:9\"]\n\
         [targets.new]\nsmtp = [\"127.0.0.1:9\"]\nhttps = [\"http://127.0.0.1:9\"]\n",
        cert.display(),
        key.display()
    );
    std::fs::write(dir.path().join("coexist.toml"), cfg).unwrap();
    let running = Running::start(Config::load(&dir.path().join("coexist.toml")).unwrap())
        .await
        .unwrap();
    let mut c = connect(running.https_addr.unwrap()).await;
    let req = || {
        Request::get("/EWS/Exchange.asmx")
            .header("host", "mail.example.com")
            .header("x-anchormailbox", "bob@example.com")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // Refused connections count against the server until it is down (two in a row: the
    // start-up probe and this request).
    let (status, _) = send(&mut c, req()).await;
    assert_eq!(status, 502);
    let res = {
        c.ready().await.unwrap();
        c.send_request(req()).await.unwrap()
    };
    assert_eq!(res.status().as_u16(), 503);
    assert_eq!(res.headers()["retry-after"], "30");
}

#[tokio::test]
async fn attack_shapes_are_refused_before_any_backend_sees_them() {
    let s = setup().await;
    let mut c = connect(s.running.https_addr.unwrap()).await;
    let get = |path: &str| {
        Request::get(path)
            .header("host", "mail.example.com")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // ProxyShell's first request (CVE-2021-34473), and remote PowerShell (no side pinned).
    let proxyshell = "/autodiscover/autodiscover.json?@evil.example/mapi/nspi/?&Email=autodiscover/autodiscover.json%3F@evil.example";
    let (status, _) = send(&mut c, get(proxyshell)).await;
    assert!((400..500).contains(&status), "{status}");
    let mut c = connect(s.running.https_addr.unwrap()).await;
    let (status, _) = send(&mut c, get("/PowerShell/")).await;
    assert!((400..500).contains(&status), "{status}");
    // ProxyLogon's backend-steering cookie.
    let mut c = connect(s.running.https_addr.unwrap()).await;
    let req = Request::get("/ecp/y.js")
        .header("host", "mail.example.com")
        .header("cookie", "X-BEResource=localhost/owa/auth/logon.aspx?~3")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _) = send(&mut c, req).await;
    assert!((400..500).contains(&status), "{status}");
    assert!(s.old.seen().is_empty() && s.new.seen().is_empty());

    // A legitimate Autodiscover v2 request passes; a client's own X-Forwarded-For is not
    // believed.
    let mut c = connect(s.running.https_addr.unwrap()).await;
    let req = Request::get("/autodiscover/autodiscover.json/v1.0/bob@example.com?Protocol=EWS")
        .header("host", "mail.example.com")
        .header("x-forwarded-for", "10.9.9.9")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _) = send(&mut c, req).await;
    assert_eq!(status, 200);
    let old = s.old.seen();
    assert_eq!(old.len(), 1);
    assert_eq!(old[0].headers["x-forwarded-for"], "127.0.0.1");
}

/// The identity sources of SPEC §5.3 through the listener: a hint in the URL, the login
/// when the hint is a placeholder, and the metrics that say which source decided.
#[tokio::test]
async fn the_mailbox_is_found_where_each_client_names_it() {
    let s = setup().await;
    let addr = s.running.https_addr.unwrap();
    let mut c = connect(addr).await;
    let get = |path: &str| Request::get(path).header("host", "mail.example.com");
    // Autodiscover v2 names the mailbox in its path: alice is on new.
    let req = get("/autodiscover/autodiscover.json/v1.0/alice@example.com?Protocol=EWS")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        send(&mut c, req).await.1,
        "new /autodiscover/autodiscover.json/v1.0/alice@example.com"
    );
    // exchangelib's placeholder anchor names no mailbox; the Basic login (a logon name of
    // alice's) decides.
    let basic = base64::engine::general_purpose::STANDARD.encode("EXAMPLE\\alice:secret");
    let req = get("/EWS/Exchange.asmx")
        .header("x-anchormailbox", "DUMMY@example.com")
        .header("authorization", format!("Basic {basic}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&mut c, req).await.1, "new /EWS/Exchange.asmx");
    // ActiveSync names its user in the query.
    let req = get(
        "/Microsoft-Server-ActiveSync?Cmd=Sync&User=EXAMPLE%5Cbob&DeviceId=d1&DeviceType=iPhone",
    )
    .body(Full::new(Bytes::new()))
    .unwrap();
    assert_eq!(
        send(&mut c, req).await.1,
        "old /Microsoft-Server-ActiveSync"
    );

    // /metrics counts each request by target, protocol, identity source and status.
    let metrics = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut t = tokio::net::TcpStream::connect(s.running.admin_addr)
            .await
            .unwrap();
        t.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        t.read_to_string(&mut out).await.unwrap();
        out
    };
    for (protocol, source) in [
        ("autodiscover_v2", "hint"),
        ("ews", "login"),
        ("activesync", "hint"),
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("coexist_http_requests_total{")
                    && l.contains(&format!("protocol=\"{protocol}\""))
                    && l.contains(&format!("source=\"{source}\""))
                    && l.contains("status=\"200\"")),
            "{protocol}/{source} not counted:\n{metrics}"
        );
    }
}

/// A backend connection belongs to one client connection: a client's requests reuse it, and
/// another client never gets it — IIS authenticates NTLM per TCP connection, so a shared one
/// would serve the second client as the first user.
#[tokio::test]
async fn a_clients_backend_connection_is_never_anothers() {
    let s = setup().await;
    let addr = s.running.https_addr.unwrap();
    let ews = |auth: Option<&str>| {
        let mut r = Request::post("/EWS/Exchange.asmx")
            .header("host", "mail.example.com")
            .header("x-anchormailbox", "alice@example.com");
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.body(Full::new(Bytes::from_static(b"<x/>"))).unwrap()
    };
    let mut a = connect(addr).await;
    assert_eq!(
        send(&mut a, ews(Some("NTLM TlRMTVNTUAADAAAA"))).await.0,
        200
    );
    // After the handshake, requests on that connection carry no Authorization at all.
    assert_eq!(send(&mut a, ews(None)).await.0, 200);
    let mut b = connect(addr).await;
    assert_eq!(send(&mut b, ews(None)).await.0, 200);
    assert_eq!(send(&mut a, ews(None)).await.0, 200);
    let seen = s.new.seen();
    let conns: Vec<usize> = seen.iter().map(|x| x.conn).collect();
    assert_eq!(conns.len(), 4);
    assert_eq!(conns[0], conns[1], "one client, one backend connection");
    assert_eq!(conns[0], conns[3]);
    assert_ne!(
        conns[2], conns[0],
        "another client, another backend connection"
    );
}

/// An NTLM AUTHENTICATE message naming `DOMAIN\user` (MS-NLMP 2.2.1.3, Unicode), as a
/// client sends it; the responses inside are placeholders (the recording backends do not
/// check them).
fn ntlm_authenticate(domain: &str, user: &str) -> String {
    let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let (d, u, w, lm, nt) = (
        utf16(domain),
        utf16(user),
        utf16("WS01"),
        vec![0u8; 24],
        vec![0x11u8; 48],
    );
    let mut payload = Vec::new();
    let mut field = |bytes: &[u8]| {
        let at = 64 + payload.len();
        payload.extend_from_slice(bytes);
        (bytes.len() as u16, at as u32)
    };
    let (fd, fu, fw, flm, fnt) = (field(&d), field(&u), field(&w), field(&lm), field(&nt));
    let mut m = b"NTLMSSP\0".to_vec();
    m.extend_from_slice(&3u32.to_le_bytes());
    for (len, off) in [flm, fnt, fd, fu, fw, (0, 64 + payload.len() as u32)] {
        m.extend_from_slice(&len.to_le_bytes());
        m.extend_from_slice(&len.to_le_bytes());
        m.extend_from_slice(&off.to_le_bytes());
    }
    m.extend_from_slice(&0xa288_8205u32.to_le_bytes()); // flags, UNICODE among them
    m.extend_from_slice(&payload);
    format!(
        "NTLM {}",
        base64::engine::general_purpose::STANDARD.encode(m)
    )
}

/// NTLM without any hint (SPEC §5.1): the first leg names no user and lands on the default
/// side, whose connection is then pinned; the AUTHENTICATE leg names a user of the other
/// side, so the client is told to log in again on a new connection (401, close), and that
/// connection's legs — and its requests after the handshake, which carry no Authorization —
/// reach the user's side.
#[tokio::test]
async fn an_ntlm_login_of_the_other_side_is_sent_to_log_in_there() {
    let s = setup().await;
    let addr = s.running.https_addr.unwrap();
    let ews = |auth: Option<String>| {
        let mut r = Request::post("/EWS/Exchange.asmx")
            .header("host", "mail.example.com")
            .header("user-agent", "ExchangeServicesClient/15");
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.body(Full::new(Bytes::from_static(b"<x/>"))).unwrap()
    };
    let negotiate = "NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAKAGFKAAAADw==".to_string();
    let mut a = connect(addr).await;
    assert_eq!(
        send(&mut a, ews(Some(negotiate.clone()))).await.1,
        "old /EWS/Exchange.asmx"
    );
    let res = {
        a.ready().await.unwrap();
        a.send_request(ews(Some(ntlm_authenticate("EXAMPLE", "alice"))))
            .await
            .unwrap()
    };
    assert_eq!(res.status().as_u16(), 401);
    assert_eq!(res.headers()["connection"], "close");
    assert!(
        res.headers()
            .get_all("www-authenticate")
            .iter()
            .any(|v| v == "NTLM")
    );

    let mut b = connect(addr).await;
    assert_eq!(
        send(&mut b, ews(Some(negotiate))).await.1,
        "new /EWS/Exchange.asmx"
    );
    assert_eq!(
        send(&mut b, ews(Some(ntlm_authenticate("EXAMPLE", "alice"))))
            .await
            .1,
        "new /EWS/Exchange.asmx"
    );
    assert_eq!(send(&mut b, ews(None)).await.1, "new /EWS/Exchange.asmx");
    let new = s.new.seen();
    assert_eq!(new.len(), 3);
    assert!(
        new.iter().all(|x| x.conn == new[0].conn),
        "one pinned backend connection"
    );
}

/// Autodiscover POST and the OWA logon name the mailbox in their body only: coexist reads
/// the body's beginning, routes by it, and the backend still gets the whole body.
#[tokio::test]
async fn a_mailbox_named_in_the_body_routes_and_the_body_arrives_whole() {
    let s = setup().await;
    let mut c = connect(s.running.https_addr.unwrap()).await;
    let mut xml = String::from(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n<Autodiscover xmlns=\"http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006\">\
         <Request><EMailAddress>alice@example.com</EMailAddress>\
         <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>",
    );
    // Longer than what is read before routing: the rest must follow unchanged.
    xml.push_str("<Pad>");
    xml.push_str(&"x".repeat(40_000));
    xml.push_str("</Pad>");
    xml.push_str("</Request></Autodiscover>");
    let req = Request::post("/autodiscover/autodiscover.xml")
        .header("host", "mail.example.com")
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(xml.clone())))
        .unwrap();
    assert_eq!(
        send(&mut c, req).await,
        (200, "new /autodiscover/autodiscover.xml".into())
    );
    let form = "destination=https%3A%2F%2Fmail.example.com%2Fowa%2F&flags=4&forcedownlevel=0&username=EXAMPLE%5Calice&password=secret&isUtf8=1";
    let req = Request::post("/owa/auth.owa")
        .header("host", "mail.example.com")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(form.as_bytes())))
        .unwrap();
    assert_eq!(send(&mut c, req).await, (200, "new /owa/auth.owa".into()));
    let new = s.new.seen();
    assert_eq!(new.len(), 2);
    assert_eq!(new[0].body, xml.as_bytes(), "the whole body, in order");
    assert_eq!(new[1].body, form.as_bytes());
    assert!(s.old.seen().is_empty());
}
