//! Backend side: connections to the targets' SMTP servers, a pool of idle ones for reuse,
//! failover between a target's servers, and health probes that also learn what each
//! server supports (its EHLO keywords).
//!
//! Connection setup (TCP, greeting, EHLO, STARTTLS, EHLO) costs several round trips; doing
//! it per client message is what makes simple proxies slow, so a connection that finished
//! a transaction cleanly goes back to its server's idle list and the next transaction for
//! that target starts with MAIL FROM.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use super::command::{Caps, xtext};
use super::io::{Conn, IoError, Line, LineIo};
use super::reply::Reply;
use crate::config::{SmtpTlsMode, TargetConfig};
use crate::net::proxy_protocol::proxy_v2_header;
use crate::net::resolve::{ConnectError, Resolver};
use crate::net::tls;
use crate::route::{RoutingTable, TargetId};
use crate::upstream::{self, Prober, Protocol, Rank, Registry, probe};

/// Longest reply line and most lines accepted from a backend.
const MAX_REPLY_LINE: usize = 4096;
const MAX_REPLY_LINES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{server}: {what}")]
    Io { server: String, what: String },
    #[error("{server}: timed out")]
    Timeout { server: String },
    #[error("{server}: protocol error: {what}")]
    Protocol { server: String, what: String },
    #[error("{server}: refused: {reply}")]
    Refused { server: String, reply: Reply },
    #[error("target {0} has no SMTP servers")]
    NoServers(String),
}

/// Timeouts and limits of the client role (RFC 5321 §4.5.3.2 gives the command ones).
#[derive(Debug, Clone)]
pub struct BackendSettings {
    pub hostname: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub final_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_server: usize,
}

impl Default for BackendSettings {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            final_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(30),
            max_idle_per_server: 32,
        }
    }
}

/// One SMTP server of a target: its health (shared with the admin API through the
/// upstream registry), what it supports, and its idle connections.
pub struct Server {
    pub addr: String,
    pub upstream: Arc<upstream::Server>,
    caps: Mutex<Option<Caps>>,
    idle: Mutex<Vec<(BackendConn, Instant)>>,
}

impl Server {
    pub fn is_up(&self) -> bool {
        self.upstream.is_up()
    }

    pub fn caps(&self) -> Option<Caps> {
        lock(&self.caps).clone()
    }

    /// Drops idle connections past their time (closed here, off the hot path).
    async fn expire_idle(&self, keep: Duration) {
        let expired: Vec<_> = {
            let mut idle = lock(&self.idle);
            let (old, fresh): (Vec<_>, Vec<_>) = idle
                .drain(..)
                .partition(|(_, since)| since.elapsed() >= keep);
            *idle = fresh;
            old
        };
        for (mut c, _) in expired {
            c.quit().await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One target (migration side) and its servers.
pub struct Target {
    pub name: String,
    pub servers: Vec<Arc<Server>>,
    tls_mode: SmtpTlsMode,
    tls: Arc<ClientConfig>,
    pub xclient: bool,
    /// Connections start with a PROXY v2 header: each one is bound to one client, so they
    /// are never shared through the pool (see `Session`).
    pub proxy_protocol: bool,
    /// This target's per-message metric handles, registered on first use (a series shows
    /// once it happened) and then reused without a registry lookup.
    messages: [OnceLock<metrics::Counter>; MESSAGE_RESULTS.len()],
    final_reply: OnceLock<metrics::Histogram>,
}

/// The `result` words of `coexist_smtp_messages_total` for a target.
pub const MESSAGE_RESULTS: [&str; 3] = ["accepted", "tempfail", "rejected"];

impl Target {
    /// Counts one message in `coexist_smtp_messages_total`; `result` is one of
    /// [`MESSAGE_RESULTS`].
    pub fn count_message(&self, result: &'static str) {
        let Some(i) = MESSAGE_RESULTS.iter().position(|r| *r == result) else {
            debug_assert!(false, "unknown result word {result}");
            return;
        };
        self.messages[i]
            .get_or_init(|| {
                metrics::counter!(
                    crate::metric_names::SMTP_MESSAGES,
                    "target" => self.name.clone(),
                    "result" => result
                )
            })
            .increment(1);
    }

    /// Records how long the target took to give its final reply to a message.
    pub fn record_final_reply(&self, seconds: f64) {
        self.final_reply
            .get_or_init(|| {
                metrics::histogram!(
                    crate::metric_names::SMTP_FINAL_REPLY_SECONDS,
                    "target" => self.name.clone()
                )
            })
            .record(seconds);
    }

    /// What every known server of this target supports; `None` until one has answered.
    pub fn caps(&self) -> Option<Caps> {
        self.servers.iter().find_map(|s| s.caps())
    }
}

/// All targets' SMTP servers, in the upstream registry's order (so a routing table's
/// target id finds its target by index).
pub struct Backends {
    pub targets: Vec<Arc<Target>>,
    pub settings: BackendSettings,
    pub registry: Arc<Registry>,
    resolver: Resolver,
}

impl Backends {
    /// `targets` must be the config the registry was built from.
    pub fn new(
        targets: &[TargetConfig],
        settings: BackendSettings,
        registry: Arc<Registry>,
    ) -> Result<Self, tls::TlsError> {
        // The registry was built from this same config: one target each, in order.
        debug_assert_eq!(targets.len(), registry.targets().len());
        let mut out = Vec::new();
        for (t, up) in targets.iter().zip(registry.targets()) {
            debug_assert_eq!(t.name.as_str(), &*up.name);
            out.push(Arc::new(Target {
                name: t.name.clone(),
                servers: up
                    .smtp
                    .iter()
                    .map(|up| {
                        Arc::new(Server {
                            addr: up.addr.clone(),
                            upstream: Arc::clone(up),
                            caps: Mutex::new(None),
                            idle: Mutex::new(Vec::new()),
                        })
                    })
                    .collect(),
                tls_mode: t.smtp_tls,
                tls: tls::client_config(t.tls_verify, t.tls_ca.as_deref())?,
                xclient: t.xclient,
                proxy_protocol: t.proxy_protocol,
                messages: std::array::from_fn(|_| OnceLock::new()),
                final_reply: OnceLock::new(),
            }));
        }
        let resolver = Resolver::default();
        Ok(Self {
            targets: out,
            settings,
            registry,
            resolver,
        })
    }

    /// The target of that name (the spool's entries and logins name targets).
    pub fn target(&self, name: &str) -> Option<&Arc<Target>> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The target a routing table names by id: an index, not a search.
    pub fn target_of(&self, table: &RoutingTable, id: TargetId) -> Option<&Arc<Target>> {
        self.targets.get(self.registry.index_of(table, id)?)
    }

    /// A connection ready for MAIL FROM: an idle one if any (`reused` set, so the caller
    /// retries once on a fresh one if the server had closed it), else a new one, trying the
    /// servers that are up first, in order, then the ones marked down.
    pub async fn acquire(&self, target: &Arc<Target>) -> Result<BackendConn, BackendError> {
        for s in target.servers.iter().filter(|s| s.is_up()) {
            let mut idle = lock(&s.idle);
            while let Some((conn, since)) = idle.pop() {
                if since.elapsed() < self.settings.idle_timeout {
                    return Ok(conn);
                }
            }
        }
        self.connect_new(target).await
    }

    pub async fn connect_new(&self, target: &Arc<Target>) -> Result<BackendConn, BackendError> {
        self.connect_for(target, None).await
    }

    /// A new connection; towards a `proxy_protocol` target its PROXY v2 header names
    /// `client` (source, destination), or says LOCAL (coexist's own: probes, the spool)
    /// when there is none.
    pub async fn connect_for(
        &self,
        target: &Arc<Target>,
        client: Option<(SocketAddr, SocketAddr)>,
    ) -> Result<BackendConn, BackendError> {
        // Servers known to answer first, then any nobody has heard from yet (a start-up
        // probe still running), then those marked down; config order within each.
        let mut order: Vec<(Rank, &Arc<Server>)> = target
            .servers
            .iter()
            .map(|s| (s.upstream.health.rank(), s))
            .collect();
        order.sort_by_key(|(rank, _)| *rank);
        let mut last = BackendError::NoServers(target.name.clone());
        for (_, s) in order {
            match self.connect(target, s, client).await {
                Ok(c) => {
                    s.upstream.observe(Ok(()));
                    return Ok(c);
                }
                Err(e) => {
                    s.upstream.observe(Err(&e.to_string()));
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Puts a connection that ended a transaction cleanly back for reuse.
    pub fn release(&self, mut conn: BackendConn) {
        if conn.broken || conn.proxied {
            // A proxied connection speaks for one client: never someone else's.
            return;
        }
        conn.reused = true;
        let server = Arc::clone(&conn.server);
        let mut idle = lock(&server.idle);
        if idle.len() < self.settings.max_idle_per_server {
            idle.push((conn, Instant::now()));
        }
    }

    async fn connect(
        &self,
        target: &Target,
        server: &Arc<Server>,
        client: Option<(SocketAddr, SocketAddr)>,
    ) -> Result<BackendConn, BackendError> {
        let st = &self.settings;
        let name = server.addr.clone();
        let io_err = |what: String| BackendError::Io {
            server: name.clone(),
            what,
        };
        let mut tcp = self
            .resolver
            .connect(&server.addr, st.connect_timeout)
            .await
            .map_err(|e| match e {
                ConnectError::Timeout => BackendError::Timeout {
                    server: name.clone(),
                },
                ConnectError::Failed(what) => io_err(what),
            })?;
        if target.proxy_protocol {
            // Before anything else, TLS included (HAProxy's order).
            let header = proxy_v2_header(client);
            tokio::time::timeout(st.command_timeout, tcp.write_all(&header))
                .await
                .map_err(|_| BackendError::Timeout {
                    server: name.clone(),
                })?
                .map_err(|e| io_err(format!("PROXY header: {e}")))?;
        }
        let conn = if target.tls_mode == SmtpTlsMode::Implicit {
            let sni = tls::server_name(&server.addr).map_err(|e| io_err(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&target.tls))
                .connect(sni, tcp)
                .await
                .map_err(|e| io_err(format!("TLS: {e}")))?;
            Conn::ClientTls(Box::new(tls))
        } else {
            Conn::Plain(tcp)
        };
        let mut c = BackendConn {
            io: LineIo::new(conn),
            caps: Caps::default(),
            server: Arc::clone(server),
            reused: false,
            broken: false,
            proxied: target.proxy_protocol && client.is_some(),
            timeout: st.command_timeout,
        };
        let greeting = c.read_reply().await?;
        if greeting.code != 220 {
            return Err(BackendError::Refused {
                server: name,
                reply: greeting,
            });
        }
        c.ehlo(&st.hostname).await?;
        let want_tls = match target.tls_mode {
            SmtpTlsMode::Required => true,
            SmtpTlsMode::Opportunistic => c.caps.starttls,
            SmtpTlsMode::None | SmtpTlsMode::Implicit => false,
        };
        if want_tls {
            if !c.caps.starttls {
                return Err(BackendError::Protocol {
                    server: name,
                    what: "STARTTLS required but not offered".into(),
                });
            }
            let r = c.command("STARTTLS\r\n").await?;
            if r.code != 220 {
                return Err(BackendError::Refused {
                    server: name,
                    reply: r,
                });
            }
            // Response injection: anything the server sent after its 220 in plaintext is
            // not to be read as if it came over TLS.
            if c.io.discard_buffered() > 0 {
                tracing::warn!(server = %server.addr, "discarded plaintext sent after STARTTLS");
            }
            let Conn::Plain(tcp) = std::mem::replace(&mut c.io.conn, Conn::Upgrading) else {
                return Err(io_err("STARTTLS on a TLS connection".into()));
            };
            let sni = tls::server_name(&server.addr).map_err(|e| io_err(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&target.tls))
                .connect(sni, tcp)
                .await
                .map_err(|e| io_err(format!("TLS: {e}")))?;
            c.io.conn = Conn::ClientTls(Box::new(tls));
            c.ehlo(&st.hostname).await?;
        }
        *lock(&server.caps) = Some(c.caps.clone());
        Ok(c)
    }

    /// Probes every server once, concurrently (EHLO, QUIT: up/down and capabilities),
    /// then closes idle connections past their time.
    pub async fn probe_all(&self) {
        let servers: Vec<_> = self.registry.servers(Protocol::Smtp).cloned().collect();
        probe::probe_all(self, &servers, self.probe_timeout()).await;
        self.expire_idle().await;
    }

    /// A probe's whole conversation: a server that accepts and then says nothing is judged
    /// after this, not after the command timeout.
    pub fn probe_timeout(&self) -> Duration {
        PROBE_TIMEOUT
    }

    pub async fn expire_idle(&self) {
        for t in &self.targets {
            for s in &t.servers {
                s.expire_idle(self.settings.idle_timeout).await;
            }
        }
    }
}

/// The longest a health probe may take, greeting to QUIT.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

impl Prober for Backends {
    async fn probe(&self, server: &upstream::Server) -> Result<(), String> {
        let target = self
            .targets
            .get(server.target_index)
            .ok_or("no such target")?;
        let s = target.servers.get(server.index).ok_or("no such server")?;
        let mut c = self
            .connect(target, s, None)
            .await
            .map_err(|e| e.to_string())?;
        c.quit().await;
        Ok(())
    }
}

/// One connection to one backend server.
pub struct BackendConn {
    io: LineIo<TcpStream>,
    pub caps: Caps,
    pub server: Arc<Server>,
    /// Came from the idle list: the server may have closed it meanwhile.
    pub reused: bool,
    /// Left in an unknown state (error, aborted DATA): never reuse.
    pub broken: bool,
    /// Opened with a PROXY header naming one client: reused only by that client's session.
    pub proxied: bool,
    timeout: Duration,
}

impl BackendConn {
    fn err(&self, e: IoError) -> BackendError {
        match e {
            IoError::Timeout => BackendError::Timeout {
                server: self.server.addr.clone(),
            },
            other => BackendError::Io {
                server: self.server.addr.clone(),
                what: other.to_string(),
            },
        }
    }

    pub fn is_tls(&self) -> bool {
        self.io.conn.is_tls()
    }

    pub async fn read_reply(&mut self) -> Result<Reply, BackendError> {
        let mut lines = Vec::new();
        loop {
            let line = match self.io.read_line(MAX_REPLY_LINE, self.timeout).await {
                Ok(Line::Ok(l)) => l,
                Ok(Line::TooLong | Line::BadNewline) => {
                    self.broken = true;
                    return Err(BackendError::Protocol {
                        server: self.server.addr.clone(),
                        what: "malformed reply line".into(),
                    });
                }
                Err(e) => {
                    self.broken = true;
                    return Err(self.err(e));
                }
            };
            let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let code = text
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (200..600).contains(c));
            let (Some(code), sep) = (code, text.as_bytes().get(3).copied()) else {
                self.broken = true;
                return Err(BackendError::Protocol {
                    server: self.server.addr.clone(),
                    what: format!("bad reply {text:?}"),
                });
            };
            lines.push(text.get(4..).unwrap_or("").to_string());
            if sep != Some(b'-') {
                return Ok(Reply { code, lines });
            }
            if lines.len() > MAX_REPLY_LINES {
                self.broken = true;
                return Err(BackendError::Protocol {
                    server: self.server.addr.clone(),
                    what: "reply too long".into(),
                });
            }
        }
    }

    /// Sends one command line without waiting for its reply.
    pub async fn send(&mut self, line: &str) -> Result<(), BackendError> {
        if let Err(e) = self.io.write_now(line.as_bytes(), self.timeout).await {
            self.broken = true;
            return Err(self.err(e));
        }
        Ok(())
    }

    /// Sends one command line (CRLF included) and reads its reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply, BackendError> {
        debug_assert!(line.ends_with("\r\n") && !line[..line.len() - 2].contains(['\r', '\n']));
        if let Err(e) = self.io.write_now(line.as_bytes(), self.timeout).await {
            self.broken = true;
            return Err(self.err(e));
        }
        self.read_reply().await
    }

    /// Sends several commands in one write and reads their replies in order (RFC 2920).
    pub async fn pipeline(&mut self, lines: &[&str]) -> Result<Vec<Reply>, BackendError> {
        for l in lines {
            self.io.queue(l.as_bytes());
        }
        if let Err(e) = self.io.flush(self.timeout).await {
            self.broken = true;
            return Err(self.err(e));
        }
        let mut out = Vec::with_capacity(lines.len());
        for _ in lines {
            out.push(self.read_reply().await?);
        }
        Ok(out)
    }

    async fn ehlo(&mut self, hostname: &str) -> Result<(), BackendError> {
        let r = self.command(&format!("EHLO {hostname}\r\n")).await?;
        if r.code == 250 {
            self.caps = Caps::parse(&r);
            return Ok(());
        }
        let r = self.command(&format!("HELO {hostname}\r\n")).await?;
        if r.code != 250 {
            return Err(BackendError::Refused {
                server: self.server.addr.clone(),
                reply: r,
            });
        }
        self.caps = Caps::default();
        Ok(())
    }

    /// Passes the real client's attributes with XCLIENT (only those the server offered),
    /// then EHLO again, as XCLIENT resets the session. The reply to XCLIENT is returned; a
    /// refusal leaves the connection usable as it was.
    pub async fn xclient(
        &mut self,
        attrs: &[(&str, String)],
        hostname: &str,
    ) -> Result<Reply, BackendError> {
        let mut line = String::from("XCLIENT");
        for (name, value) in attrs {
            if self.caps.xclient.iter().any(|a| a == name) {
                line.push(' ');
                line.push_str(name);
                line.push('=');
                line.push_str(&xtext(value));
            }
        }
        if line.len() == "XCLIENT".len() {
            return Ok(Reply::new(220, "nothing to send"));
        }
        line.push_str("\r\n");
        let r = self.command(&line).await?;
        if r.code == 220 {
            let caps_before = self.caps.clone();
            self.ehlo(hostname).await?;
            // The server's features do not change with the client it is told about, but
            // keep XCLIENT known even if the new EHLO hides it.
            if self.caps.xclient.is_empty() {
                self.caps.xclient = caps_before.xclient;
            }
        }
        Ok(r)
    }

    /// Writes message bytes (already dot-stuffed) after a 354.
    pub async fn write_data(
        &mut self,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<(), BackendError> {
        if let Err(e) = self.io.write_now(bytes, timeout).await {
            self.broken = true;
            return Err(self.err(e));
        }
        Ok(())
    }

    /// Waits for the final reply to a message whose end of data was sent (RFC 5321: up to
    /// 10 minutes).
    pub async fn read_final(&mut self, final_timeout: Duration) -> Result<Reply, BackendError> {
        let saved = self.timeout;
        self.timeout = final_timeout;
        let r = self.read_reply().await;
        self.timeout = saved;
        r
    }

    /// Returns the connection to the "ready for MAIL" state after an aborted transaction.
    pub async fn rset(&mut self) -> bool {
        matches!(self.command("RSET\r\n").await, Ok(r) if r.code == 250)
    }

    pub async fn quit(&mut self) {
        let _ = self.command("QUIT\r\n").await;
        self.broken = true;
        self.io.shutdown().await;
    }

    /// Drops the connection without QUIT: the server sees the transaction cut off and must
    /// not deliver it (how an aborted DATA is cancelled).
    pub fn abort(&mut self) {
        self.broken = true;
    }
}
