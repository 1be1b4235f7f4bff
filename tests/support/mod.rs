//! Test support: a recording SMTP backend on a real socket, a raw line client, and a proxy
//! started from a config file on port 0.
#![allow(dead_code)] // each test file uses a part

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coexist::app::Running;
use coexist::config::{Config, ListenerMode};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A self-signed certificate for `localhost`, as PEM files and as a rustls acceptor.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCert {
    pub fn new() -> Self {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("rcgen");
        Self {
            cert_pem: c.cert.pem(),
            key_pem: c.key_pair.serialize_pem(),
        }
    }

    pub fn write(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, &self.cert_pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        (c, k)
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = self.write(dir.path());
        TlsAcceptor::from(coexist::net::tls::server_config(&c, &k).unwrap())
    }
}

/// One message as a backend received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub from: String,
    pub rcpts: Vec<String>,
    /// Exactly the bytes between DATA's 354 and the final `.`, dot-stuffing included.
    pub data: Vec<u8>,
    pub tls: bool,
    pub auth: Option<String>,
}

impl Received {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// What the recording backend does; every knob defaults to a well-behaved server.
#[derive(Clone, Default)]
pub struct Behaviour {
    /// RCPT replies by address (default 250).
    pub rcpt_replies: HashMap<String, String>,
    /// Final reply to DATA (default 250 with a queue id).
    pub data_reply: Option<String>,
    pub starttls: Option<TlsAcceptor>,
    /// Plaintext the server (maliciously) sends right after its 220 to STARTTLS.
    pub inject_after_starttls: Option<String>,
    pub smtputf8: bool,
    /// user → password for AUTH PLAIN/LOGIN.
    pub users: HashMap<String, String>,
    /// Close the connection after receiving this many bytes of DATA.
    pub close_mid_data: Option<usize>,
    /// Offer XCLIENT (Postfix) and answer it with a new greeting.
    pub xclient: bool,
    /// Answer this many end-of-DATA with `451 4.3.0` before accepting again.
    pub tempfail_data: Arc<std::sync::atomic::AtomicU32>,
    /// Answer this many DATA commands with `451 4.3.0` instead of 354.
    pub tempfail_data_cmd: Arc<std::sync::atomic::AtomicU32>,
    /// Close the connection right after the final reply to DATA (a server that resets).
    pub close_after_data: bool,
    /// Never answer the end of DATA (a server that stalls).
    pub stall_at_end: bool,
    /// Expect a PROXY protocol v2 header before the greeting (Postfix
    /// `smtpd_upstream_proxy_protocol = haproxy`); a connection without one is closed.
    pub proxy_protocol: bool,
}

#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub connections: Arc<Mutex<u32>>,
    /// Connections that have ended (closed by either side).
    pub closed: Arc<Mutex<u32>>,
    pub commands: Arc<Mutex<Vec<String>>>,
    /// Commands that arrived with more of the client's bytes right behind them (sent in
    /// the same write: pipelined).
    pub pipelined: Arc<Mutex<Vec<String>>>,
    /// Each connection's PROXY v2 header, decoded: `PROXY src -> dst` or `LOCAL`.
    pub proxy_headers: Arc<Mutex<Vec<String>>>,
}

impl Backend {
    pub async fn start(behaviour: Behaviour) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = Backend {
            addr: listener.local_addr().unwrap(),
            received: Arc::default(),
            connections: Arc::default(),
            closed: Arc::default(),
            commands: Arc::default(),
            pipelined: Arc::default(),
            proxy_headers: Arc::default(),
        };
        let b2 = b.clone();
        let beh = Arc::new(behaviour);
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                // Replies are written one by one: without NODELAY the second reply to a
                // pipelined MAIL+RCPT waits for the peer's delayed ACK (40 ms).
                let _ = s.set_nodelay(true);
                *b2.connections.lock().unwrap() += 1;
                let (b3, beh) = (b2.clone(), Arc::clone(&beh));
                tokio::spawn(async move {
                    let closed = Arc::clone(&b3.closed);
                    let _ = serve_backend(s, b3, beh).await;
                    *closed.lock().unwrap() += 1;
                });
            }
        });
        b
    }

    pub fn messages(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits (bounded) until `n` messages arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        for _ in 0..200 {
            if self.received.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.messages()
    }
}

/// Reads and decodes a PROXY protocol v2 header (HAProxy's proxy-protocol.txt §2.2).
async fn read_proxy_v2(s: &mut TcpStream) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut head = [0u8; 16];
    s.read_exact(&mut head).await?;
    if &head[..12] != b"\r\n\r\n\0\r\nQUIT\n" {
        return Err(bad("no PROXY v2 signature"));
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    let addr = |ip: std::net::IpAddr, port: &[u8]| {
        SocketAddr::new(ip, u16::from_be_bytes([port[0], port[1]])).to_string()
    };
    match (head[12], head[13]) {
        (0x20, _) => Ok("LOCAL".into()),
        (0x21, 0x11) if len >= 12 => {
            let ip =
                |o: usize| std::net::IpAddr::from([body[o], body[o + 1], body[o + 2], body[o + 3]]);
            Ok(format!(
                "PROXY {} -> {}",
                addr(ip(0), &body[8..10]),
                addr(ip(4), &body[10..12])
            ))
        }
        (0x21, 0x21) if len >= 36 => {
            let ip = |o: usize| {
                let b: [u8; 16] = body[o..o + 16].try_into().unwrap();
                std::net::IpAddr::from(b)
            };
            Ok(format!(
                "PROXY {} -> {}",
                addr(ip(0), &body[32..34]),
                addr(ip(16), &body[34..36])
            ))
        }
        _ => Err(bad("unexpected PROXY v2 command or family")),
    }
}

async fn serve_backend(mut s: TcpStream, b: Backend, beh: Arc<Behaviour>) -> std::io::Result<()> {
    if beh.proxy_protocol {
        let h = read_proxy_v2(&mut s).await?;
        b.proxy_headers.lock().unwrap().push(h);
    }
    let mut io = BufReader::new(s);
    io.get_mut()
        .write_all(b"220 backend ESMTP test\r\n")
        .await?;
    let mut state = BackendState::default();
    if let Some(tls) = backend_loop(&mut io, &b, &beh, &mut state, false).await? {
        let stream = io.into_inner();
        let tls_stream = tls.accept(stream).await?;
        let mut io = BufReader::new(tls_stream);
        backend_loop(&mut io, &b, &beh, &mut state, true).await?;
    }
    Ok(())
}

#[derive(Default)]
struct BackendState {
    from: Option<String>,
    rcpts: Vec<String>,
    auth: Option<String>,
}

/// Serves commands; returns the acceptor when the client asked for STARTTLS.
async fn backend_loop<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    b: &Backend,
    beh: &Behaviour,
    st: &mut BackendState,
    tls: bool,
) -> std::io::Result<Option<TlsAcceptor>> {
    let mut line = String::new();
    loop {
        line.clear();
        if io.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let cmd = line.trim_end().to_string();
        b.commands.lock().unwrap().push(cmd.clone());
        if !io.buffer().is_empty() {
            b.pipelined.lock().unwrap().push(cmd.clone());
        }
        let upper = cmd.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            let mut r = String::from(
                "250-backend\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 10485760\r\n250-DSN\r\n",
            );
            if beh.smtputf8 {
                r.push_str("250-SMTPUTF8\r\n");
            }
            if beh.starttls.is_some() && !tls {
                r.push_str("250-STARTTLS\r\n");
            }
            if !beh.users.is_empty() && tls {
                r.push_str("250-AUTH PLAIN LOGIN\r\n");
            }
            if beh.xclient {
                r.push_str("250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n");
            }
            r.push_str("250 ENHANCEDSTATUSCODES\r\n");
            r
        } else if upper.starts_with("HELO") {
            "250 backend\r\n".into()
        } else if upper == "STARTTLS" {
            if let (Some(acc), false) = (&beh.starttls, tls) {
                let mut r = String::from("220 2.0.0 go ahead\r\n");
                if let Some(inj) = &beh.inject_after_starttls {
                    r.push_str(inj);
                }
                io.get_mut().write_all(r.as_bytes()).await?;
                return Ok(Some(acc.clone()));
            }
            "454 4.7.0 no TLS\r\n".into()
        } else if upper.starts_with("AUTH PLAIN ") {
            let raw = base64_decode(&cmd[11..]);
            let parts: Vec<&[u8]> = raw.split(|&c| c == 0).collect();
            let (u, p) = (
                String::from_utf8_lossy(parts.get(1).copied().unwrap_or_default()).into_owned(),
                String::from_utf8_lossy(parts.get(2).copied().unwrap_or_default()).into_owned(),
            );
            if beh.users.get(&u) == Some(&p) {
                st.auth = Some(u);
                "235 2.7.0 Authentication successful\r\n".into()
            } else {
                "535 5.7.8 Authentication credentials invalid\r\n".into()
            }
        } else if upper.starts_with("XCLIENT ") && beh.xclient {
            "220 backend ESMTP after XCLIENT\r\n".into()
        } else if upper == "AUTH LOGIN" {
            let u = ask(io, b"334 VXNlcm5hbWU6\r\n").await?;
            let p = ask(io, b"334 UGFzc3dvcmQ6\r\n").await?;
            if beh.users.get(&u) == Some(&p) {
                st.auth = Some(u);
                "235 2.7.0 Authentication successful\r\n".into()
            } else {
                "535 5.7.8 Authentication credentials invalid\r\n".into()
            }
        } else if upper.starts_with("MAIL FROM:") {
            st.from = Some(cmd[10..].to_string());
            st.rcpts.clear();
            "250 2.1.0 Ok\r\n".into()
        } else if upper.starts_with("RCPT TO:") {
            let addr = cmd[8..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .trim_matches(['<', '>'])
                .to_string();
            match beh.rcpt_replies.get(&addr) {
                Some(r) => format!("{r}\r\n"),
                None => {
                    st.rcpts.push(addr);
                    "250 2.1.5 Ok\r\n".into()
                }
            }
        } else if upper == "DATA" && st.from.is_none() {
            "503 5.5.1 Error: need MAIL command\r\n".into()
        } else if upper == "DATA" && st.rcpts.is_empty() {
            // As real servers do (RFC 5321 §3.3): no message without a recipient.
            "554 5.5.1 Error: no valid recipients\r\n".into()
        } else if upper == "DATA"
            && beh
                .tempfail_data_cmd
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok()
        {
            "451 4.3.0 Busy, try DATA later\r\n".into()
        } else if upper == "DATA" {
            io.get_mut().write_all(b"354 go\r\n").await?;
            let mut data = Vec::new();
            let mut l = Vec::new();
            loop {
                l.clear();
                if io.read_until(b'\n', &mut l).await? == 0 {
                    return Ok(None);
                }
                if l == b".\r\n" {
                    break;
                }
                data.extend_from_slice(&l);
                if beh.close_mid_data.is_some_and(|n| data.len() >= n) {
                    return Ok(None);
                }
            }
            if beh.stall_at_end {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            let tempfail = beh
                .tempfail_data
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok();
            let r = if tempfail {
                "451 4.3.0 Try again later".to_string()
            } else {
                beh.data_reply
                    .clone()
                    .unwrap_or_else(|| "250 2.0.0 Ok: queued as TEST123".into())
            };
            if r.starts_with('2') {
                b.received.lock().unwrap().push(Received {
                    from: st.from.clone().unwrap_or_default(),
                    rcpts: std::mem::take(&mut st.rcpts),
                    data,
                    tls,
                    auth: st.auth.clone(),
                });
            }
            // The transaction is over either way (RFC 5321 §4.1.1.4).
            st.from = None;
            st.rcpts.clear();
            if beh.close_after_data {
                io.get_mut()
                    .write_all(format!("{r}\r\n").as_bytes())
                    .await?;
                return Ok(None);
            }
            format!("{r}\r\n")
        } else if upper == "RSET" {
            st.from = None;
            st.rcpts.clear();
            "250 2.0.0 Ok\r\n".into()
        } else if upper == "NOOP" {
            "250 2.0.0 Ok\r\n".into()
        } else if upper == "QUIT" {
            io.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(None);
        } else {
            "502 5.5.2 Error: command not recognized\r\n".into()
        };
        io.get_mut().write_all(reply.as_bytes()).await?;
    }
}

/// One AUTH LOGIN step: a prompt, then the client's base64 answer, decoded.
async fn ask<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    prompt: &[u8],
) -> std::io::Result<String> {
    io.get_mut().write_all(prompt).await?;
    let mut l = String::new();
    io.read_line(&mut l).await?;
    Ok(String::from_utf8_lossy(&base64_decode(&l)).into_owned())
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .unwrap_or_default()
}

pub fn base64(s: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The standard test routing table: example.com routed, paris on new, berlin on old,
/// example.org rejects unknown addresses.
pub const ROUTES: &str = r#"
[domains."example.com"]
unknown = "old"
[domains."example.org"]
unknown = "reject"

[sites.paris]
owner = "new"
[sites.berlin]
owner = "old"

[[mailbox]]
address = "alice@example.com"
aliases = ["alice.smith@example.com"]
site = "paris"
logins = ["EXAMPLE\\alice", "alice@corp.example.com"]

[[mailbox]]
address = "bob@example.com"
site = "berlin"
logins = ["EXAMPLE\\bob"]

[[mailbox]]
address = "carol@example.org"
site = "berlin"
"#;

/// A running proxy with its config directory.
pub struct Proxy {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub cert: TestCert,
}

impl Proxy {
    /// Starts the proxy with listeners on port 0: relay (+STARTTLS) and submission.
    pub async fn start(
        old: SocketAddr,
        new: SocketAddr,
        extra_smtp: &str,
        target_extra: &str,
    ) -> Proxy {
        Self::start_servers(&[old], &[new], extra_smtp, target_extra).await
    }

    /// The same with several servers per target, in order.
    pub async fn start_servers(
        old: &[SocketAddr],
        new: &[SocketAddr],
        extra_smtp: &str,
        target_extra: &str,
    ) -> Proxy {
        let list = |a: &[SocketAddr]| {
            a.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (old, new) = (list(old), list(new));
        let dir = tempfile::tempdir().unwrap();
        let cert = TestCert::new();
        cert.write(dir.path());
        std::fs::write(dir.path().join("routes.toml"), ROUTES).unwrap();
        let cfg = format!(
            r#"
[routes]
path = "routes.toml"
[admin]
listen = "127.0.0.1:0"
[smtp]
hostname = "mx.test"
{extra_smtp}
[[smtp.listener]]
listen = "127.0.0.1:0"
mode = "relay"
[[smtp.listener]]
listen = "127.0.0.1:0"
mode = "submission"
[smtp.tls]
cert = "cert.pem"
key = "key.pem"
[targets.old]
smtp = [{old}]
tls_verify = false
{target_extra}
[targets.new]
smtp = [{new}]
tls_verify = false
{target_extra}
[spool]
retry_initial_secs = 1
"#
        );
        let path = dir.path().join("coexist.toml");
        std::fs::write(&path, cfg).unwrap();
        let config = Config::load(&path).unwrap_or_else(|d| panic!("{d}"));
        let running = Running::start(config).await.unwrap();
        Proxy { running, dir, cert }
    }

    pub fn addr(&self, mode: ListenerMode) -> SocketAddr {
        self.running
            .smtp_addrs
            .iter()
            .find(|(m, _)| *m == mode)
            .map(|(_, a)| *a)
            .unwrap()
    }

    pub fn relay(&self) -> SocketAddr {
        self.addr(ListenerMode::Relay)
    }

    pub fn routes_path(&self) -> PathBuf {
        self.dir.path().join("routes.toml")
    }

    /// Calls the admin API; returns the status and the JSON body.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        admin_call(self.running.admin_addr, None, method, path, body).await
    }
}

/// One admin API call with an optional bearer token.
pub async fn admin_call(
    addr: SocketAddr,
    token: Option<String>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let url = format!("http://{addr}{path}");
    let method = method.to_string();
    tokio::task::spawn_blocking(move || {
        let mut req = ureq::request(&method, &url);
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let r = match resp {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("admin API unreachable: {e}"),
        };
        let status = r.status();
        let text = r.into_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    })
    .await
    .unwrap()
}

/// A plain line client for exact protocol tests.
pub struct Client<S> {
    pub io: BufReader<S>,
}

impl Client<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        let _ = s.set_nodelay(true);
        let mut c = Client {
            io: BufReader::new(s),
        };
        let greeting = c.reply().await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        c
    }
}

impl Client<TcpStream> {
    /// Connects and runs EHLO, MAIL and every RCPT (each must get 250), then DATA (354):
    /// ready for the message text.
    pub async fn start_data(addr: SocketAddr, from: &str, rcpts: &[&str]) -> Self {
        let mut c = Client::connect(addr).await;
        c.expect("EHLO client.test", "250").await;
        c.expect(&format!("MAIL FROM:<{from}>"), "250").await;
        for r in rcpts {
            c.expect(&format!("RCPT TO:<{r}>"), "250").await;
        }
        c.expect("DATA", "354").await;
        c
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Reads one (possibly multi-line) reply, returned as its lines joined with `\n`.
    pub async fn reply(&mut self) -> String {
        let mut all = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read_line(&mut line))
                .await
                .expect("reply timed out")
                .unwrap();
            if n == 0 {
                all.push("<closed>".to_string());
                break;
            }
            let l = line.trim_end().to_string();
            let last = l.as_bytes().get(3) != Some(&b'-');
            all.push(l);
            if last {
                break;
            }
        }
        all.join("\n")
    }

    pub async fn send(&mut self, raw: &[u8]) {
        self.io.get_mut().write_all(raw).await.unwrap();
    }

    /// Sends a command line and returns the reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Sends a command and asserts the reply code.
    pub async fn expect(&mut self, line: &str, code: &str) -> String {
        let r = self.cmd(line).await;
        assert!(r.starts_with(code), "{line:?} → {r:?}, expected {code}");
        r
    }
}
