//! One client SMTP session: the command state machine.
//!
//! Routing happens per recipient: MAIL takes one routing-table snapshot for the whole
//! transaction; each RCPT is looked up in it and offered live to the owner target's server
//! (its backend transaction is opened lazily with the first recipient for that target), and
//! the server's reply goes back to the client. DATA/BDAT content is scanned (see `data`)
//! and streamed to every involved target at once, never buffered whole.
//!
//! The session is generic over the stream so that tests can drive it over any duplex pipe.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, AUTH_XOAUTH2, MailFrom, RcptTo, Request};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use super::backend::{BackendConn, BackendError, Backends, Target};
use super::command::{Caps, mail_line, rcpt_line};
use super::data::{DataScanner, Limits, Mode, Violation};
use super::io::{Conn, IoError, Line, LineIo};
use super::reply::{Reply, codes};
use crate::config::{ListenerMode, MixedRecipients, SmtpLimits};
use crate::date::rfc5322_date;
use crate::net::{Accepted, Handler, Shutdown, Stream};
use crate::route::{Route, Router, RoutingTable};
use crate::upstream::Protocol;

/// RFC 5321 §4.5.3.1.4 says 512; 1000 leaves room for extension parameters.
const MAX_COMMAND_LINE: usize = 1000;
/// RFC 4954 §4: AUTH lines may be up to 12288 octets (OAuth tokens are long).
const MAX_AUTH_LINE: usize = 12288;
/// Errors in a row before the session is closed (slow brute force, garbage).
const MAX_ERRORS: u32 = 20;
/// Loop guard (SPEC §4).
const MAX_RECEIVED: usize = 50;
/// The largest content buffer a session keeps between messages.
const MAX_SCRATCH: usize = 64 * 1024;

/// Runs the futures concurrently (one per part of a message) and gives their outputs in
/// order. Most messages have one part: that one is simply awaited, without `join_all`'s
/// allocations and bookkeeping. (A macro, not a generic function: a generic one over these
/// closures trips the compiler's `Send` inference for the session future.)
macro_rules! join_each {
    ($futures:expr $(,)?) => {{
        let mut it = $futures.into_iter();
        match (it.next(), it.next()) {
            (None, _) => Vec::new(),
            (Some(first), None) => vec![first.await],
            (Some(first), Some(second)) => {
                futures_util::future::join_all([first, second].into_iter().chain(it)).await
            }
        }
    }};
}

/// What every session of one listener shares.
pub struct SessionCtx {
    pub hostname: String,
    pub mode: ListenerMode,
    pub mixed: MixedRecipients,
    pub add_received: bool,
    pub limits: SmtpLimits,
    pub router: Arc<Router>,
    pub backends: Arc<Backends>,
    pub tls: Option<TlsAcceptor>,
    pub traffic: Arc<crate::traffic::Traffic>,
    /// Where the parts of split deliveries that a target did not take yet go.
    pub spool: Option<Arc<super::spool::Spool>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client: {0}")]
    Client(#[from] IoError),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
}

impl Handler for SessionCtx {
    async fn serve(self: Arc<Self>, conn: Accepted, shutdown: Shutdown) {
        let io = match conn.stream {
            Stream::Plain(s) => Conn::Plain(s),
            Stream::Tls(s) => Conn::ServerTls(s),
        };
        let peer = conn.peer;
        if let Err(e) = Session::new(self, io, peer, conn.local, shutdown)
            .run()
            .await
        {
            tracing::debug!(peer = %peer, error = %e, "session ended");
        }
    }
}

/// One part of a transaction: the recipients for one target and the backend transaction
/// that carries them.
struct Part {
    target: Arc<Target>,
    conn: Option<BackendConn>,
    /// Set when the backend transaction failed; recipients for this target get this reply.
    failed: Option<Reply>,
    accepted: Vec<RcptTo<String>>,
    /// Who each accepted recipient is (see `Session::rcpt`), to keep a repeat out of a
    /// second part for the same target.
    who: Vec<String>,
    /// The authenticated submission connection (not pooled; goes back to the session).
    pinned: bool,
    /// The backend gave its final reply to the message: ready for a new MAIL as it is.
    done: bool,
    /// DATA was sent and no final reply read yet: the backend is reading message text, so
    /// the only safe way out is to drop the connection (an RSET would become message text).
    in_data: bool,
    /// DATA went out pipelined behind MAIL and RCPT and its reply is in (see
    /// [`Session::early_data`]): the client's DATA sends nothing more here, and the part
    /// takes no more recipients (after a 354 the backend reads message text).
    early: bool,
}

impl Part {
    fn live(&self) -> bool {
        self.failed.is_none() && self.conn.is_some() && !self.accepted.is_empty()
    }

    /// Takes in the replies that opened the backend transaction; returns the reply the
    /// client gets for its RCPT.
    fn opened(&mut self, o: Opened) -> Reply {
        if !o.mail.is_positive() {
            self.failed = Some(o.mail.clone());
            return o.mail;
        }
        if let Some(d) = o.data {
            self.early = true;
            if d.code == 354 {
                self.in_data = true;
            } else if o.rcpt.is_positive() {
                // The recipient is taken but the message is not: like a refused DATA later.
                self.failed = Some(d);
            }
        }
        o.rcpt
    }

    fn fail(&mut self, reply: Reply) {
        if let Some(c) = self.conn.as_mut() {
            c.abort();
        }
        self.failed = Some(reply);
    }
}

struct Txn {
    table: Arc<RoutingTable>,
    from: MailFrom<String>,
    parts: Vec<Part>,
    rcpts: u32,
    /// BDAT in progress: the scanner and whether the backends got their DATA.
    bdat: Option<DataScanner>,
    /// A BDAT failed: the rest of the transaction's chunks are read and discarded.
    bdat_failed: Option<Reply>,
    /// A copy of the content, when the message goes to more than one target: what the
    /// spool keeps if only some of them take it.
    spool: Option<super::spool::SpoolWriter>,
    /// Some target was offered more than one recipient in this transaction.
    multi_rcpt: bool,
}

/// The authenticated login of a submission session and its backend connection.
struct Auth {
    login: String,
    target: Arc<Target>,
    conn: Option<BackendConn>,
}

pub struct Session<S> {
    ctx: Arc<SessionCtx>,
    io: LineIo<S>,
    peer: SocketAddr,
    /// The address the client connected to.
    local: SocketAddr,
    /// Idle connections to `proxy_protocol` targets, opened for this client (their PROXY
    /// header names it): reused by this session only, closed when it ends.
    own: Vec<(BackendConn, std::time::Instant)>,
    helo: Option<String>,
    esmtp: bool,
    txn: Option<Txn>,
    auth: Option<Auth>,
    errors: u32,
    shutdown: Shutdown,
    /// Set when the session must end after the reply being sent (a 421).
    closing: bool,
    /// Early DATA (see [`Session::early_data`]): guessed right so far — the last
    /// transaction gave each target one recipient, and no guess of this session was wrong.
    early_data_streak: bool,
    early_data_missed: bool,
    /// See [`Session::take_scratch`].
    scratch: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub fn new(
        ctx: Arc<SessionCtx>,
        conn: Conn<S>,
        peer: SocketAddr,
        local: SocketAddr,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            ctx,
            io: LineIo::new(conn),
            peer,
            local,
            own: Vec::new(),
            helo: None,
            esmtp: false,
            txn: None,
            auth: None,
            errors: 0,
            shutdown,
            closing: false,
            early_data_streak: false,
            early_data_missed: false,
            scratch: Vec::new(),
        }
    }

    fn tls(&self) -> bool {
        self.io.conn.is_tls()
    }

    fn reply(&mut self, r: &Reply) {
        if r.code >= 400 {
            self.errors += 1;
        }
        self.io.queue_reply(r);
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        Ok(self.io.flush(self.ctx.limits.command_timeout).await?)
    }

    /// Runs the session to its end. I/O errors on the client side end it quietly.
    pub async fn run(mut self) -> Result<(), SessionError> {
        metrics::counter!(crate::metric_names::SMTP_SESSIONS).increment(1);
        let delay = self.ctx.limits.greeting_delay;
        if !delay.is_zero() {
            // Talk before the greeting is what spam engines do; a real MTA waits.
            // The outer timeout decides; the read's own limit only has to be longer.
            let read = self.io.fill(delay + Duration::from_secs(1));
            if let Ok(r) = tokio::time::timeout(delay, read).await {
                r?;
                self.reply(&codes::talk_before_greeting());
                self.flush().await?;
                return Ok(());
            }
        }
        let greeting = Reply::new(220, format!("{} ESMTP coexist", self.ctx.hostname));
        self.reply(&greeting);
        let result = self.command_loop().await;
        self.end_txn().await;
        for (mut c, _) in std::mem::take(&mut self.own) {
            c.quit().await;
        }
        if let Some(mut a) = self.auth.take()
            && let Some(c) = a.conn.as_mut()
        {
            c.quit().await;
        }
        result
    }

    async fn command_loop(&mut self) -> Result<(), SessionError> {
        loop {
            // Pipelining (RFC 2920): replies may wait while more commands are buffered.
            if !self.io.buffered().contains(&b'\n') {
                self.flush().await?;
            }
            if self.errors >= MAX_ERRORS {
                self.reply(&Reply::new(
                    421,
                    "4.7.0 Too many errors, closing connection",
                ));
                self.flush().await?;
                return Ok(());
            }
            let line = {
                let timeout = self.ctx.limits.command_timeout;
                let mut shutdown = self.shutdown.clone();
                tokio::select! {
                    r = self.io.read_line(MAX_AUTH_LINE, timeout) => r,
                    () = shutdown.signalled(), if self.txn.is_none() => {
                        let host = self.ctx.hostname.clone();
                        self.reply(&codes::shutting_down(&host));
                        self.flush().await?;
                        return Ok(());
                    }
                }
            };
            let line = match line {
                Ok(Line::Ok(l)) => l,
                Ok(Line::TooLong) => {
                    self.reply(&codes::line_too_long());
                    continue;
                }
                Ok(Line::BadNewline) => {
                    self.reply(&codes::bare_newline_command());
                    continue;
                }
                Err(IoError::Timeout) => {
                    self.reply(&codes::timeout());
                    let _ = self.flush().await;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            let is_auth = line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"AUTH ");
            if line.len() > MAX_COMMAND_LINE && !is_auth {
                self.reply(&codes::line_too_long());
                continue;
            }
            if !self.handle(&line).await? || self.closing {
                self.flush().await?;
                self.io.shutdown().await;
                return Ok(());
            }
        }
    }

    /// Handles one command line; `false` ends the session. The commands that wait on
    /// backends or TLS run boxed: their state lives on the heap only while they run, so an
    /// idle session (a flood, a slowloris) stays small.
    async fn handle(&mut self, line: &[u8]) -> Result<bool, SessionError> {
        let req = match Request::parse(&mut line.iter()) {
            Ok(r) => r,
            Err(e) => {
                self.reply(&parse_error(&e));
                return Ok(true);
            }
        };
        match req {
            Request::Ehlo { host } => self.ehlo(host, true),
            Request::Helo { host } => self.ehlo(host, false),
            Request::Lhlo { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::Expn { .. } => self.reply(&codes::not_implemented()),
            Request::StartTls => return Box::pin(self.starttls()).await,
            Request::Auth {
                mechanism,
                initial_response,
            } => Box::pin(self.auth(mechanism, initial_response)).await?,
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { to } => Box::pin(self.rcpt(to)).await,
            Request::Data => Box::pin(self.data()).await?,
            Request::Bdat {
                chunk_size,
                is_last,
            } => Box::pin(self.bdat(chunk_size, is_last)).await?,
            Request::Rset => {
                self.end_txn().await;
                self.reply(&codes::reset());
            }
            Request::Noop { .. } => self.reply(&codes::noop()),
            Request::Vrfy { .. } => self.reply(&codes::vrfy()),
            Request::Help { .. } => self.reply(&Reply::new(214, "2.0.0 See RFC 5321")),
            Request::Quit => {
                let host = self.ctx.hostname.clone();
                self.reply(&codes::bye(&host));
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The EHLO keywords: only what coexist honours towards every target this listener may
    /// route to (their EHLO answers are learned by connections and health probes).
    fn ehlo(&mut self, host: String, esmtp: bool) {
        if host.is_empty() || host.chars().any(char::is_control) {
            self.reply(&codes::syntax("EHLO needs a domain or address literal"));
            return;
        }
        self.helo = Some(host);
        self.esmtp = esmtp;
        // EHLO resets the transaction (RFC 5321 §4.1.4).
        if let Some(txn) = self.txn.take() {
            Self::drop_txn(txn);
        }
        let greet = format!("{} Hello {}", self.ctx.hostname, self.peer.ip());
        if !esmtp {
            self.reply(&Reply::new(250, greet));
            return;
        }
        let mut lines = vec![greet];
        let targets: Vec<_> = self.ctx.backends.targets.iter().map(|t| t.caps()).collect();
        let all = |f: fn(&Caps) -> bool| targets.iter().all(|c| c.as_ref().is_some_and(f));
        let mut size = self.ctx.limits.max_message_size;
        for c in targets.iter().flatten() {
            if let Some(s) = c.size.filter(|s| *s > 0) {
                size = size.min(s);
            }
        }
        lines.push(format!("SIZE {size}"));
        lines.push("PIPELINING".into());
        // BDAT is translated to DATA towards backends, so CHUNKING is always honoured.
        lines.push("CHUNKING".into());
        if all(|c| c.eightbitmime) {
            lines.push("8BITMIME".into());
        }
        if all(|c| c.smtputf8) {
            lines.push("SMTPUTF8".into());
        }
        if all(|c| c.dsn) {
            lines.push("DSN".into());
        }
        lines.push("ENHANCEDSTATUSCODES".into());
        if self.ctx.tls.is_some() && !self.tls() {
            lines.push("STARTTLS".into());
        }
        if self.ctx.mode != ListenerMode::Relay && self.tls() && self.auth.is_none() {
            lines.push("AUTH PLAIN LOGIN XOAUTH2".into());
        }
        self.reply(&Reply { code: 250, lines });
    }

    async fn starttls(&mut self) -> Result<bool, SessionError> {
        let Some(acceptor) = self.ctx.tls.clone() else {
            self.reply(&codes::tls_unavailable());
            return Ok(true);
        };
        if self.tls() {
            self.reply(&codes::bad_sequence("TLS already active"));
            return Ok(true);
        }
        // Plaintext pipelined after STARTTLS would be taken as if it came over TLS
        // (CVE-2011-0411): throw it away before answering.
        let injected = self.io.discard_buffered();
        if injected > 0 {
            tracing::warn!(peer = %self.peer, bytes = injected, "discarded plaintext pipelined after STARTTLS");
        }
        self.reply(&codes::ready_tls());
        self.flush().await?;
        let Conn::Plain(plain) = std::mem::replace(&mut self.io.conn, Conn::Upgrading) else {
            return Ok(false);
        };
        let tls = tokio::time::timeout(Duration::from_secs(30), acceptor.accept(plain))
            .await
            .map_err(|_| SessionError::Client(IoError::Timeout))?
            .map_err(SessionError::Tls)?;
        self.io.conn = Conn::ServerTls(Box::new(tls));
        // RFC 3207 §4.2: forget everything learned before TLS.
        self.helo = None;
        self.esmtp = false;
        if let Some(txn) = self.txn.take() {
            Self::drop_txn(txn);
        }
        Ok(true)
    }

    fn mail(&mut self, from: MailFrom<String>) {
        if self.helo.is_none() {
            self.reply(&codes::bad_sequence("send EHLO or HELO first"));
            return;
        }
        if self.txn.is_some() {
            self.reply(&codes::bad_sequence("nested MAIL command"));
            return;
        }
        if self.ctx.mode != ListenerMode::Relay {
            if !self.tls() {
                self.reply(&codes::tls_required());
                return;
            }
            if self.auth.is_none() {
                self.reply(&codes::auth_required());
                return;
            }
        }
        if from.address.chars().any(char::is_control) {
            self.reply(&codes::syntax("bad sender address"));
            return;
        }
        if from.size as u64 > self.ctx.limits.max_message_size {
            self.reply(&codes::message_too_big());
            return;
        }
        self.txn = Some(Txn {
            table: self.ctx.router.snapshot(),
            from,
            parts: Vec::new(),
            rcpts: 0,
            bdat: None,
            bdat_failed: None,
            spool: None,
            multi_rcpt: false,
        });
        self.reply(&codes::sender_ok());
    }

    async fn rcpt(&mut self, to: RcptTo<String>) {
        let Some(txn) = self.txn.as_mut() else {
            self.reply(&codes::bad_sequence("need MAIL before RCPT"));
            return;
        };
        if txn.bdat.is_some() {
            let reply = codes::bad_sequence("RCPT after BDAT");
            log_rcpt(self.peer, txn, &to.address, "rejected", "-", "-", &reply);
            self.reply(&reply);
            return;
        }
        if to.address.is_empty() || to.address.chars().any(char::is_control) {
            let reply = Reply::new(501, "5.1.3 Bad recipient address syntax");
            // Escaped: the address holds control characters, and the line must stay one line.
            log_rcpt(
                self.peer,
                txn,
                to.address.escape_debug(),
                "rejected",
                "-",
                "-",
                &reply,
            );
            self.reply(&reply);
            return;
        }
        if txn.rcpts >= self.ctx.limits.max_recipients {
            let reply = codes::too_many_recipients();
            log_rcpt(self.peer, txn, &to.address, "deferred", "-", "-", &reply);
            self.reply(&reply);
            return;
        }
        txn.rcpts += 1;
        // Submission: the authenticated user's own server relays for them.
        // Who the recipient is, for telling a repeated recipient from a new one: the
        // mailbox when the table knows it (aliases, case and subaddress included), else the
        // address as given, with its domain in lower case.
        let as_given = || match to.address.rsplit_once('@') {
            Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
            None => to.address.clone(),
        };
        let (target, site, who) = if let Some(auth) = &self.auth {
            (Arc::clone(&auth.target), String::from("-"), as_given())
        } else {
            let table = Arc::clone(&txn.table);
            let route = table.lookup(&to.address);
            let (target_id, site, who) = match route {
                Route::Mailbox(m) => (
                    m.owner(),
                    m.site().to_string(),
                    format!("mailbox {}", m.address()),
                ),
                Route::DomainDefault { target, .. } => (target, String::from("-"), as_given()),
                Route::Reject { .. } => {
                    count_rcpt("-", "-", "unknown");
                    let reply = codes::no_such_user();
                    log_rcpt(self.peer, txn, &to.address, "unknown", "-", "-", &reply);
                    self.reply(&reply);
                    return;
                }
                Route::NotOurs => {
                    count_rcpt("-", "-", "relay_denied");
                    let reply = codes::relay_denied();
                    log_rcpt(
                        self.peer,
                        txn,
                        &to.address,
                        "relay_denied",
                        "-",
                        "-",
                        &reply,
                    );
                    self.reply(&reply);
                    return;
                }
            };
            let name = table.target_name(target_id);
            let Some(t) = self.ctx.backends.target(name) else {
                // Cannot happen with a validated table; if it does, the recipient's one
                // line says why.
                let reply = codes::target_unavailable();
                tracing::error!(
                    client = %self.peer, sender = %txn.from.address, recipient = %to.address,
                    result = "tempfail", code = %reply.short(), target = name, site = %site,
                    version = %txn.table.version(),
                    "recipient: routing table names a target with no backend"
                );
                self.reply(&reply);
                return;
            };
            (Arc::clone(t), site, who)
        };
        let txn = self.txn.as_mut().expect("checked above");
        if self.ctx.mixed == MixedRecipients::Defer
            && txn
                .parts
                .first()
                .is_some_and(|p| !Arc::ptr_eq(&p.target, &target))
        {
            count_rcpt(&target.name, &site, "deferred");
            let reply = codes::deferred_other_target();
            log_rcpt(
                self.peer,
                txn,
                &to.address,
                "deferred",
                &target.name,
                &site,
                &reply,
            );
            self.reply(&reply);
            return;
        }
        let seen_target = txn.parts.iter().any(|p| Arc::ptr_eq(&p.target, &target));
        // A part whose backend already answered an early DATA takes no more recipients.
        let existing = txn
            .parts
            .iter()
            .position(|p| Arc::ptr_eq(&p.target, &target) && !p.early);
        if seen_target {
            txn.multi_rcpt = true;
            if existing.is_none()
                && txn
                    .parts
                    .iter()
                    .any(|p| Arc::ptr_eq(&p.target, &target) && p.who.contains(&who))
            {
                // The same recipient again, already in an early-DATA part: one backend
                // transaction would have taken it once, so does this one; a second part
                // would deliver it twice.
                count_rcpt(&target.name, &site, "accepted");
                let reply = codes::duplicate_recipient();
                log_rcpt(
                    self.peer,
                    txn,
                    &to.address,
                    "accepted",
                    &target.name,
                    &site,
                    &reply,
                );
                self.reply(&reply);
                return;
            }
            if existing.is_none() {
                // The early DATA guess was wrong: this recipient opens a second backend
                // transaction for the same target (same message, other recipients).
                self.early_data_missed = true;
                metrics::counter!(crate::metric_names::SMTP_EARLY_DATA, "outcome" => "split")
                    .increment(1);
            }
        }
        let (idx, reply) = if let Some(idx) = existing {
            let txn = self.txn.as_mut().expect("checked above");
            let part = &mut txn.parts[idx];
            let reply = if let Some(r) = &part.failed {
                r.clone()
            } else if let Some(conn) = part.conn.as_mut() {
                let line = rcpt_line(&to, conn.caps.dsn);
                match conn.command(&line).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, target = %target.name, "backend failed at RCPT");
                        part.fail(codes::target_unavailable());
                        codes::target_unavailable()
                    }
                }
            } else {
                codes::target_unavailable()
            };
            (idx, reply)
        } else {
            let early = self.early_data();
            let (part, reply) = self.open_part(Arc::clone(&target), &to, early).await;
            let txn = self.txn.as_mut().expect("checked above");
            txn.parts.push(part);
            (txn.parts.len() - 1, reply)
        };
        let txn = self.txn.as_mut().expect("checked above");
        let part = &mut txn.parts[idx];
        if reply.is_positive() {
            part.accepted.push(to.clone());
            part.who.push(who);
        }
        let result = if reply.is_positive() {
            "accepted"
        } else if reply.is_transient() {
            "tempfail"
        } else {
            "rejected"
        };
        count_rcpt(&target.name, &site, result);
        if reply.is_positive() {
            let traffic = &self.ctx.traffic;
            traffic.record(&traffic.meter(Protocol::Smtp, &target.name, &site));
        }
        log_rcpt(
            self.peer,
            txn,
            &to.address,
            result,
            &target.name,
            &site,
            &reply,
        );
        self.reply(&reply);
    }

    /// Whether a new backend transaction gets DATA right behind its MAIL and RCPT (RFC 2920
    /// lets DATA end a pipelined group). That saves the DATA round trip to the backend per
    /// message — with a client that waits for each reply, a third of the backend's segments
    /// — but a backend that answered 354 reads message text and takes no more recipients:
    /// another recipient for it then opens a second backend transaction (same message,
    /// other recipients: nothing lost or doubled, one more connection), and a transaction
    /// that ends without a message costs the connection. So it is done when the client's
    /// next command is already here and is DATA or BDAT (a pipelining client), or, when
    /// nothing is here yet, if this session's previous message gave each target one
    /// recipient and no guess of this session was wrong — never on a guess for an
    /// authenticated session, whose one backend connection cannot be replaced.
    fn early_data(&self) -> bool {
        if self.early_data_missed {
            return false;
        }
        let ahead = self.io.buffered();
        if let Some(end) = ahead.iter().position(|&b| b == b'\n') {
            let line = &ahead[..end];
            return line.eq_ignore_ascii_case(b"DATA\r")
                || (line.len() > 5 && line[..5].eq_ignore_ascii_case(b"BDAT "));
        }
        ahead.is_empty() && self.auth.is_none() && self.early_data_streak
    }

    /// Opens the backend transaction for `target` with its first recipient: a connection
    /// (pooled, or the pinned submission one), MAIL FROM and RCPT TO — in one round trip
    /// when the server supports PIPELINING, with DATA behind them when `early`. Returns
    /// the part and the reply to that RCPT.
    async fn open_part(
        &mut self,
        target: Arc<Target>,
        to: &RcptTo<String>,
        early: bool,
    ) -> (Part, Reply) {
        let mut part = Part {
            target: Arc::clone(&target),
            conn: None,
            failed: None,
            accepted: Vec::new(),
            who: Vec::new(),
            pinned: false,
            done: false,
            in_data: false,
            early: false,
        };
        let from = &self.txn.as_ref().expect("in a transaction").from;
        if let Some(auth) = self.auth.as_mut() {
            part.pinned = true;
            let Some(mut conn) = auth.conn.take() else {
                // The authenticated connection is gone (an aborted message closed it): the
                // client must log in again, on a new connection.
                let r = Reply::new(
                    421,
                    "4.4.2 Connection to your mailbox server was lost, please reconnect",
                );
                self.closing = true;
                part.failed = Some(r.clone());
                return (part, r);
            };
            let reply = match mail_line(from, &conn.caps) {
                Err(r) => {
                    part.failed = Some(r.clone());
                    r
                }
                Ok(line) => match open_txn(&mut conn, &line, to, early).await {
                    Ok(o) => part.opened(o),
                    Err(_) => {
                        part.failed = Some(codes::target_unavailable());
                        codes::target_unavailable()
                    }
                },
            };
            part.conn = Some(conn);
            return (part, reply);
        }
        // A pooled connection may have been closed by the server while idle: one retry on
        // a fresh connection.
        for attempt in 0..2 {
            let acquired = if !target.proxy_protocol {
                if attempt == 0 {
                    self.ctx.backends.acquire(&target).await
                } else {
                    self.ctx.backends.connect_new(&target).await
                }
            } else if let Some(c) = self.take_own(&target).filter(|_| attempt == 0) {
                Ok(c)
            } else {
                let client = Some((self.peer, self.local));
                self.ctx.backends.connect_for(&target, client).await
            };
            let mut conn = match acquired {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(target = %target.name, error = %e, "target unreachable");
                    part.failed = Some(codes::target_unavailable());
                    return (part, codes::target_unavailable());
                }
            };
            if target.xclient && !conn.caps.xclient.is_empty() {
                let attrs = self.xclient_attrs();
                match conn.xclient(&attrs, &self.ctx.hostname).await {
                    Ok(r) if r.code == 220 => {}
                    Ok(r) if conn.reused && attempt == 0 => {
                        // This connection still carries the previous client's identity.
                        tracing::warn!(target = %target.name, reply = %r, "XCLIENT refused on a reused connection; using a fresh one");
                        conn.abort();
                        continue;
                    }
                    Ok(r) => tracing::warn!(target = %target.name, reply = %r, "XCLIENT refused"),
                    Err(e) if conn.reused && attempt == 0 => {
                        tracing::debug!(error = %e, "pooled backend connection was stale");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(target = %target.name, error = %e, "backend failed at XCLIENT");
                        part.failed = Some(codes::target_unavailable());
                        return (part, codes::target_unavailable());
                    }
                }
            }
            let from = &self.txn.as_ref().expect("in a transaction").from;
            let line = match mail_line(from, &conn.caps) {
                Ok(l) => l,
                Err(r) => {
                    self.give_back(conn);
                    part.failed = Some(r.clone());
                    return (part, r);
                }
            };
            match open_txn(&mut conn, &line, to, early).await {
                Ok(o) if !o.mail.is_positive() => {
                    // The server refused the sender; the connection itself is fine.
                    let r = part.opened(o);
                    if !conn.broken && conn.rset().await {
                        self.give_back(conn);
                    }
                    return (part, r);
                }
                Ok(o) => {
                    let r = part.opened(o);
                    part.conn = Some(conn);
                    return (part, r);
                }
                Err(e) if conn.reused && attempt == 0 => {
                    tracing::debug!(error = %e, "pooled backend connection was stale");
                }
                Err(e) => {
                    tracing::warn!(target = %target.name, error = %e, "backend failed at MAIL");
                    part.failed = Some(codes::target_unavailable());
                    return (part, codes::target_unavailable());
                }
            }
        }
        part.failed = Some(codes::target_unavailable());
        (part, codes::target_unavailable())
    }

    /// Sends DATA to every part with recipients and waits for their 354s; `Err` carries
    /// the reply for the client when no part is ready to take the message.
    async fn start_backend_data(&mut self) -> Result<(), Reply> {
        self.send_data_commands().await?;
        if self.await_data_replies().await {
            return Ok(());
        }
        let txn = self.txn.as_ref().expect("checked by send_data_commands");
        Err(combine_failures(
            txn.parts.iter().filter_map(|p| p.failed.as_ref()),
        ))
    }

    /// Starts the spool copy of the content when more than one target takes part.
    fn start_spool_copy(&mut self) {
        let Some(spool) = self.ctx.spool.clone() else {
            return;
        };
        let Some(txn) = self.txn.as_mut() else { return };
        // Every target that accepted recipients counts, live or not: one that failed DATA
        // already has a part that must be spooled if the others take the message.
        if txn.parts.iter().filter(|p| !p.accepted.is_empty()).count() > 1 {
            txn.spool = spool.writer();
        }
    }

    /// The buffer message content is scanned into, kept across the session's messages: a
    /// fresh one per message cost a large malloc and free each time (and the heap trims).
    fn take_scratch(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.scratch);
        v.clear();
        // One allocation of the size a read can bring, not a chain of doublings.
        v.reserve(crate::smtp::io::BULK_SPARE + 1024);
        v
    }

    fn put_scratch(&mut self, v: Vec<u8>) {
        // A buffer grown by a burst is not kept: sessions between messages stay small.
        if v.capacity() <= MAX_SCRATCH {
            self.scratch = v;
        }
    }

    fn spool_copy(&mut self, bytes: &[u8]) {
        if let Some(w) = self.txn.as_mut().and_then(|t| t.spool.as_mut()) {
            w.write(bytes);
        }
    }

    /// Writes DATA to every part with recipients, without waiting for the replies.
    async fn send_data_commands(&mut self) -> Result<(), Reply> {
        let Some(txn) = self.txn.as_mut() else {
            return Err(codes::bad_sequence("need MAIL and RCPT first"));
        };
        if !txn.parts.iter().any(|p| !p.accepted.is_empty()) {
            return Err(codes::no_valid_recipients());
        }
        let sent = join_each!(txn.parts.iter_mut().filter(|p| p.live() && !p.early).map(
            |p| async {
                let conn = p.conn.as_mut().expect("live part has a connection");
                let r = conn.send("DATA\r\n").await;
                (p, r)
            }
        ),);
        for (p, r) in sent {
            match r {
                Ok(()) => p.in_data = true,
                Err(_) => p.fail(codes::target_unavailable()),
            }
        }
        Ok(())
    }

    /// Reads the replies to DATA; parts without a 354 fail. True when any part is ready.
    async fn await_data_replies(&mut self) -> bool {
        let Some(txn) = self.txn.as_mut() else {
            return false;
        };
        let replies = join_each!(txn.parts.iter_mut().filter(|p| p.live() && !p.early).map(
            |p| async {
                let conn = p.conn.as_mut().expect("live part has a connection");
                let r = conn.read_reply().await;
                (p, r)
            },
        ));
        for (p, r) in replies {
            match r {
                Ok(r) if r.code == 354 => {}
                Ok(r) => {
                    // Refused DATA: the server is back in command state.
                    p.in_data = false;
                    p.failed = Some(r);
                }
                Err(_) => p.fail(codes::target_unavailable()),
            }
        }
        txn.parts.iter().any(Part::live)
    }

    /// The client as XCLIENT describes it (Postfix XCLIENT_README attribute names).
    fn xclient_attrs(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "ADDR",
                match self.peer.ip() {
                    std::net::IpAddr::V4(ip) => ip.to_string(),
                    std::net::IpAddr::V6(ip) => format!("IPV6:{ip}"),
                },
            ),
            ("PORT", self.peer.port().to_string()),
            ("NAME", "[UNAVAILABLE]".to_string()),
            (
                "HELO",
                self.helo.clone().unwrap_or_else(|| "[UNAVAILABLE]".into()),
            ),
            (
                "PROTO",
                if self.esmtp { "ESMTP" } else { "SMTP" }.to_string(),
            ),
        ]
    }

    fn received_header(&self) -> Vec<u8> {
        let mut h = String::new();
        let with = match (self.esmtp, self.tls(), self.auth.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, _) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, true, true) => "ESMTPSA",
        };
        let helo = self
            .helo
            .as_deref()
            .unwrap_or("unknown")
            .replace(|c: char| c.is_control() || c == '(' || c == ')', "");
        // The table version says, for anyone tracing a message, which routing decided it.
        let version = self
            .txn
            .as_ref()
            .map_or_else(String::new, |t| format!(", table {}", t.table.version()));
        let _ = write!(
            h,
            "Received: from {helo} ([{}])\r\n\tby {} (coexist{version}) with {with};\r\n\t{}\r\n",
            self.peer.ip(),
            self.ctx.hostname,
            rfc5322_date(SystemTime::now())
        );
        h.into_bytes()
    }

    fn data_limits(&self) -> Limits {
        Limits {
            max_size: usize::try_from(self.ctx.limits.max_message_size).unwrap_or(usize::MAX),
            max_line: self.ctx.limits.max_line_length as usize,
            max_received: MAX_RECEIVED,
        }
    }

    async fn data(&mut self) -> Result<(), SessionError> {
        if self
            .txn
            .as_ref()
            .is_some_and(|t| t.bdat.is_some() || t.bdat_failed.is_some())
        {
            self.reply(&codes::bdat_no_data());
            return Ok(());
        }
        if let Err(r) = self.send_data_commands().await {
            self.reply(&r);
            if self.txn.is_some() {
                self.end_txn().await;
            }
            return Ok(());
        }
        // The client's 354 does not wait for the backends' 354s: their round trips overlap.
        // A backend that then refuses DATA fails its part, and the final reply says so.
        self.reply(&codes::start_data());
        self.flush().await?;
        self.await_data_replies().await;
        self.start_spool_copy();
        let mut scanner = DataScanner::new(Mode::Dot, self.data_limits());
        let mut out = self.take_scratch();
        if self.ctx.add_received {
            out.extend_from_slice(&self.received_header());
        }
        // `out[..spooled]` is in the spool copy already.
        let mut spooled = 0;
        loop {
            let end = scanner.feed(self.io.buffered(), &mut out);
            let consumed = end.unwrap_or(self.io.buffered().len());
            self.io.consume(consumed);
            self.spool_copy(&out[spooled..]);
            spooled = out.len();
            if end.is_some() && scanner.violation().is_none() {
                // The end of data goes out with the last bytes: one write, one segment.
                out.extend_from_slice(b".\r\n");
            }
            // Our Received: header waits for the first content: one write, not two.
            if !out.is_empty() && (consumed > 0 || end.is_some()) {
                self.forward(&out).await;
                out.clear();
                spooled = 0;
            }
            if end.is_some() {
                break;
            }
            match self.io.fill_bulk(self.ctx.limits.data_timeout).await {
                Ok(_) => {}
                Err(e) => {
                    // The client vanished mid-DATA: nothing may be delivered.
                    self.end_txn().await;
                    return Err(e.into());
                }
            }
        }
        self.put_scratch(out);
        let reply = self.finish_message(scanner.violation()).await;
        self.reply(&reply);
        Ok(())
    }

    async fn bdat(&mut self, size: usize, last: bool) -> Result<(), SessionError> {
        // The chunk's bytes follow the command whatever we answer; read them first or the
        // session loses sync.
        let reply = self.bdat_chunk(size, last).await?;
        if let Some(r) = reply {
            self.reply(&r);
        }
        Ok(())
    }

    async fn bdat_chunk(&mut self, size: usize, last: bool) -> Result<Option<Reply>, SessionError> {
        let mut problem: Option<Reply> = match &self.txn {
            None => Some(codes::bad_sequence("need MAIL and RCPT first")),
            Some(t) => t.bdat_failed.clone(),
        };
        if problem.is_none() && self.txn.as_ref().is_some_and(|t| t.bdat.is_none()) {
            match self.start_backend_data().await {
                Ok(()) => {
                    self.start_spool_copy();
                    if self.ctx.add_received {
                        let header = self.received_header();
                        self.spool_copy(&header);
                        self.forward(&header).await;
                    }
                    let sc = DataScanner::new(Mode::Raw, self.data_limits());
                    if let Some(t) = self.txn.as_mut() {
                        t.bdat = Some(sc);
                    }
                }
                Err(r) => problem = Some(r),
            }
        }
        if let Some(r) = &problem
            && let Some(t) = self.txn.as_mut()
        {
            t.bdat_failed = Some(r.clone());
        }
        // Read exactly `size` bytes, streaming them through the scanner.
        let mut left = size;
        let mut out = self.take_scratch();
        while left > 0 {
            if self.io.buffered().is_empty()
                && let Err(e) = self.io.fill_bulk(self.ctx.limits.data_timeout).await
            {
                self.end_txn().await;
                return Err(e.into());
            }
            let n = left.min(self.io.buffered().len());
            if problem.is_none()
                && let Some(sc) = self.txn.as_mut().and_then(|t| t.bdat.as_mut())
            {
                sc.feed_raw(&self.io.buffered()[..n], &mut out);
            }
            self.io.consume(n);
            left -= n;
            if !out.is_empty() {
                self.spool_copy(&out);
                self.forward(&out).await;
                out.clear();
            }
        }
        if let Some(r) = problem {
            if last {
                self.end_txn().await;
            }
            return Ok(Some(r));
        }
        let Some(txn) = self.txn.as_mut() else {
            return Ok(None);
        };
        let Some(sc) = txn.bdat.as_mut() else {
            return Ok(None);
        };
        if !last {
            sc.flush(&mut out);
            if !out.is_empty() {
                self.spool_copy(&out);
                self.forward(&out).await;
            }
            self.put_scratch(out);
            return Ok(Some(codes::ok(&format!("{size} octets received"))));
        }
        sc.finish_raw(&mut out);
        let violation = sc.violation();
        self.spool_copy(&out);
        if violation.is_none() {
            out.extend_from_slice(b".\r\n");
        }
        if !out.is_empty() {
            self.forward(&out).await;
        }
        self.put_scratch(out);
        Ok(Some(self.finish_message(violation).await))
    }

    /// Writes message bytes to every live part at once; a part that fails is cut off.
    async fn forward(&mut self, bytes: &[u8]) {
        let Some(txn) = self.txn.as_mut() else { return };
        let timeout = self.ctx.backends.settings.data_timeout;
        let results = join_each!(
            txn.parts
                .iter_mut()
                .filter(|p| p.live())
                .map(|p| async move {
                    let conn = p.conn.as_mut().expect("live part has a connection");
                    let r = conn.write_data(bytes, timeout).await;
                    (p, r)
                }),
        );
        for (p, r) in results {
            if let Err(e) = r {
                tracing::warn!(target = %p.target.name, error = %e, "backend failed during DATA");
                p.fail(codes::target_unavailable());
            }
        }
    }

    /// Collects every live part's final reply (their end of data went out with the last
    /// content bytes) and decides the one reply the client gets; on a violation the
    /// backends are cut off instead, before any end of data reached them.
    async fn finish_message(&mut self, violation: Option<Violation>) -> Reply {
        if let Some(v) = violation {
            // Cut the backends off before their end-of-data: nothing is delivered.
            if let Some(txn) = self.txn.as_mut() {
                for p in &mut txn.parts {
                    if let Some(c) = p.conn.as_mut() {
                        c.abort();
                    }
                }
            }
            let r = match v {
                Violation::BareNewline => codes::bare_newline_data(),
                Violation::LineTooLong => codes::text_line_too_long(),
                Violation::TooBig => codes::message_too_big(),
                Violation::Loop => codes::loop_detected(),
            };
            tracing::warn!(peer = %self.peer, reply = %r, "message refused");
            metrics::counter!(crate::metric_names::SMTP_MESSAGES, "target" => "-", "result" => "refused").increment(1);
            self.end_txn().await;
            return r;
        }
        let Some(txn) = self.txn.as_mut() else {
            return codes::local_error();
        };
        let final_timeout = self.ctx.backends.settings.final_timeout;
        let results = join_each!(
            txn.parts
                .iter_mut()
                .filter(|p| p.live())
                .map(|p| async move {
                    let conn = p.conn.as_mut().expect("live part has a connection");
                    let started = std::time::Instant::now();
                    let r = conn.read_final(final_timeout).await;
                    // How long each target takes to take responsibility for a message.
                    metrics::histogram!(crate::metric_names::SMTP_FINAL_REPLY_SECONDS, "target" => p.target.name.clone())
                        .record(started.elapsed().as_secs_f64());
                    (p, r)
                }),
        )
        ;
        let mut accepted = Vec::new();
        for (p, r) in results {
            match r {
                Ok(r) if r.is_positive() => {
                    p.done = true;
                    p.in_data = false;
                    accepted.push((p.target.name.clone(), r));
                }
                Ok(r) => {
                    p.done = true;
                    p.in_data = false;
                    p.failed = Some(r);
                }
                Err(e) => {
                    tracing::warn!(target = %p.target.name, error = %e, "backend failed at end of DATA");
                    p.fail(codes::target_unavailable());
                }
            }
        }
        let with_rcpts: Vec<&Part> = txn
            .parts
            .iter()
            .filter(|p| !p.accepted.is_empty())
            .collect();
        let failed: Vec<&Reply> = with_rcpts
            .iter()
            .filter_map(|p| p.failed.as_ref())
            .collect();
        for p in &with_rcpts {
            let result = match &p.failed {
                None => "accepted",
                Some(r) if r.is_transient() => "tempfail",
                Some(_) => "rejected",
            };
            metrics::counter!(crate::metric_names::SMTP_MESSAGES, "target" => p.target.name.clone(), "result" => result)
                .increment(1);
        }
        let reply = if failed.is_empty() {
            if accepted.len() == 1 {
                // One target: its own reply (queue id and all) is the most transparent.
                accepted.pop().map_or_else(codes::local_error, |(_, r)| r)
            } else {
                codes::ok("Message accepted for delivery")
            }
        } else if accepted.is_empty() {
            combine_failures(failed.into_iter())
        } else if let Some(queued) = self.spool_rest(&accepted).await {
            queued
        } else {
            // Some targets hold the message, others do not, and the spool could not take
            // the rest: a temporary failure is the only safe answer; the client retries and
            // the accepting side gets a duplicate, which is better than a loss.
            metrics::counter!(crate::metric_names::SMTP_PARTIAL_DUPLICATE_RISK).increment(1);
            tracing::warn!(
                accepted = ?accepted.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
                "message accepted by some targets only; answering 451 (duplicate risk)"
            );
            codes::partial_duplicate_risk()
        };
        if let Some(txn) = self.txn.as_ref() {
            self.early_data_streak = !txn.multi_rcpt;
            let used = txn.parts.iter().filter(|p| p.early && p.done).count();
            if used > 0 {
                metrics::counter!(crate::metric_names::SMTP_EARLY_DATA, "outcome" => "used")
                    .increment(used as u64);
            }
        }
        tracing::info!(peer = %self.peer, reply = %reply, "message");
        self.end_txn().await;
        reply
    }

    /// Some targets took the message and the others failed temporarily: the rest goes to
    /// the spool, durably, and the client may be told 250. `None` when that is not possible.
    async fn spool_rest(&mut self, accepted: &[(String, Reply)]) -> Option<Reply> {
        let txn = self.txn.as_mut()?;
        let spool = Arc::clone(self.ctx.spool.as_ref()?);
        let writer = txn.spool.take()?;
        let mut later = Vec::new();
        let mut refused = Vec::new();
        let mut why = Vec::new();
        for p in txn.parts.iter().filter(|p| !p.accepted.is_empty()) {
            let Some(r) = &p.failed else { continue };
            why.push(format!("{}: {r}", p.target.name));
            for rc in &p.accepted {
                let s = super::spool::SpooledRcpt::from(rc);
                if r.is_permanent() {
                    refused.push((s, r.to_string()));
                } else {
                    later.push(s);
                }
            }
        }
        let (n, bounced) = (later.len(), refused.len());
        let from = txn.from.clone();
        // fsync and rename: blocking work, kept off the runtime's worker threads.
        let committed = tokio::task::spawn_blocking(move || {
            spool.commit_split(writer, &from, later, &refused, &why.join("; "))
        })
        .await;
        let Ok(committed) = committed else {
            return None;
        };
        match committed {
            Ok(id) => {
                tracing::info!(
                    id = ?id, queued = n, bounced,
                    accepted = ?accepted.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
                    "split delivery: the rest is spooled or reported to the sender"
                );
                metrics::counter!(crate::metric_names::SMTP_SPOOLED).increment(1);
                let mut text = String::from("Message accepted for delivery");
                if let Some(id) = id {
                    let _ = write!(text, " ({n} recipient(s) queued as {id})");
                }
                if bounced > 0 {
                    let _ = write!(text, " ({bounced} refused, reported by DSN)");
                }
                Some(codes::ok(&text))
            }
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed");
                None
            }
        }
    }

    /// Ends the transaction: connections go back to the pool (or to the session, when
    /// pinned) after RSET unless the backend already closed the transaction with its final
    /// reply; broken ones are dropped.
    async fn end_txn(&mut self) {
        let Some(txn) = self.txn.take() else { return };
        let mut pinned_back = None;
        for mut p in txn.parts {
            let Some(mut conn) = p.conn.take() else {
                continue;
            };
            if p.early && p.in_data && !conn.broken {
                // An early DATA with no message behind it: the connection goes (an RSET
                // would be message text), and this session stops guessing.
                self.early_data_missed = true;
                metrics::counter!(crate::metric_names::SMTP_EARLY_DATA, "outcome" => "dropped")
                    .increment(1);
            }
            if conn.broken || p.in_data || (!p.done && !conn.rset().await) {
                continue;
            }
            if p.pinned {
                pinned_back = Some(conn);
            } else {
                self.give_back(conn);
            }
        }
        if let (Some(a), Some(c)) = (self.auth.as_mut(), pinned_back) {
            a.conn = Some(c);
        }
    }

    /// This session's idle connection to `target`, if it has one that is neither older
    /// than the pool's idle limit nor to a server marked down since (those are closed).
    fn take_own(&mut self, target: &Target) -> Option<BackendConn> {
        let keep = self.ctx.backends.settings.idle_timeout;
        self.own
            .retain(|(c, since)| since.elapsed() < keep && c.server.is_up());
        let i = self
            .own
            .iter()
            .position(|(c, _)| target.servers.iter().any(|s| Arc::ptr_eq(s, &c.server)))?;
        Some(self.own.swap_remove(i).0)
    }

    /// A backend connection ready for MAIL again: to the shared pool, or kept for this
    /// session when its PROXY header names this client.
    fn give_back(&mut self, mut conn: BackendConn) {
        if conn.proxied {
            if !conn.broken {
                // Like a pooled one: the server may close it while idle (one retry).
                conn.reused = true;
                self.own.push((conn, std::time::Instant::now()));
            }
        } else {
            self.ctx.backends.release(conn);
        }
    }

    /// EHLO/STARTTLS drop a transaction without waiting for the backends: their
    /// connections are closed, which cancels the backend transactions.
    fn drop_txn(txn: Txn) {
        for mut p in txn.parts {
            if let Some(c) = p.conn.as_mut() {
                c.abort();
            }
        }
    }

    /// The client's response: the initial one if it gave it with AUTH, else what it answers
    /// to a `334 prompt`. `None` (already answered) when the client cancels with `*`.
    async fn auth_response(
        &mut self,
        initial: String,
        prompt: &str,
    ) -> Result<Option<String>, SessionError> {
        if !initial.is_empty() {
            return Ok(Some(initial));
        }
        self.reply(&Reply::new(334, prompt));
        let r = self.read_auth_line().await?;
        if r.is_none() {
            self.reply(&codes::auth_cancelled());
        }
        Ok(r)
    }

    async fn read_auth_line(&mut self) -> Result<Option<String>, SessionError> {
        self.flush().await?;
        match self
            .io
            .read_line(MAX_AUTH_LINE, self.ctx.limits.command_timeout)
            .await?
        {
            Line::Ok(l) => {
                let s = String::from_utf8_lossy(&l[..l.len() - 2])
                    .trim()
                    .to_string();
                Ok(if s == "*" { None } else { Some(s) })
            }
            _ => Ok(None),
        }
    }

    async fn auth(&mut self, mechanism: u64, initial: String) -> Result<(), SessionError> {
        if self.ctx.mode == ListenerMode::Relay {
            self.reply(&codes::not_implemented());
            return Ok(());
        }
        if !self.tls() {
            self.reply(&codes::tls_required());
            return Ok(());
        }
        if self.auth.is_some() {
            self.reply(&codes::already_authenticated());
            return Ok(());
        }
        if self.txn.is_some() || self.helo.is_none() {
            self.reply(&codes::bad_sequence("AUTH goes after EHLO and before MAIL"));
            return Ok(());
        }
        // Collect the client's credentials as the mechanism defines, to replay them.
        let (login, replay): (String, AuthReplay) = match mechanism {
            AUTH_PLAIN => {
                let Some(resp) = self.auth_response(initial, "").await? else {
                    return Ok(());
                };
                let Some(user) = decode_plain(&resp) else {
                    self.reply(&Reply::new(501, "5.5.2 Cannot decode response"));
                    return Ok(());
                };
                (user, AuthReplay::Plain(resp))
            }
            AUTH_LOGIN => {
                // "Username:" and "Password:", base64 as RFC 4954 shows them.
                let Some(user_b64) = self.auth_response(initial, "VXNlcm5hbWU6").await? else {
                    return Ok(());
                };
                let Some(pass_b64) = self.auth_response(String::new(), "UGFzc3dvcmQ6").await?
                else {
                    return Ok(());
                };
                let Some(user) = B64
                    .decode(user_b64.as_bytes())
                    .ok()
                    .and_then(|u| String::from_utf8(u).ok())
                else {
                    self.reply(&Reply::new(501, "5.5.2 Cannot decode response"));
                    return Ok(());
                };
                (user, AuthReplay::Login(user_b64, pass_b64))
            }
            AUTH_XOAUTH2 => {
                let Some(user) = decode_xoauth2(&initial) else {
                    self.reply(&Reply::new(501, "5.5.2 Cannot decode response"));
                    return Ok(());
                };
                (user, AuthReplay::XOauth2(initial))
            }
            _ => {
                self.reply(&codes::auth_mechanism());
                return Ok(());
            }
        };
        let table = self.ctx.router.snapshot();
        let target_name = table
            .lookup_login(&login)
            .map(|m| m.owner())
            .or_else(|| table.lookup(&login).target())
            .map(|t| table.target_name(t).to_string());
        let Some(target) = target_name.and_then(|n| self.ctx.backends.target(&n).cloned()) else {
            tracing::info!(peer = %self.peer, login = %login, "AUTH for a login no target owns");
            self.reply(&codes::auth_failed());
            return Ok(());
        };
        let client = Some((self.peer, self.local));
        let mut conn = match self.ctx.backends.connect_for(&target, client).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(target = %target.name, error = %e, "AUTH: target unreachable");
                self.reply(&codes::target_unavailable());
                return Ok(());
            }
        };
        if !conn.is_tls() {
            // Credentials never cross to a backend in plaintext.
            conn.quit().await;
            self.reply(&Reply::new(
                454,
                "4.7.0 TLS to the mailbox server not available",
            ));
            return Ok(());
        }
        let reply = match replay_auth(&mut conn, &replay).await {
            Ok(r) => r,
            Err(_) => codes::target_unavailable(),
        };
        tracing::info!(peer = %self.peer, login = %login, target = %target.name, reply = %reply, "AUTH");
        if reply.code == 235 {
            self.auth = Some(Auth {
                login,
                target,
                conn: Some(conn),
            });
        } else {
            conn.quit().await;
        }
        self.reply(&reply);
        Ok(())
    }

    /// The login of an authenticated submission session.
    pub fn login(&self) -> Option<&str> {
        self.auth.as_ref().map(|a| a.login.as_str())
    }
}

enum AuthReplay {
    Plain(String),
    Login(String, String),
    XOauth2(String),
}

async fn replay_auth(conn: &mut BackendConn, how: &AuthReplay) -> Result<Reply, BackendError> {
    match how {
        AuthReplay::Plain(resp) => conn.command(&format!("AUTH PLAIN {resp}\r\n")).await,
        AuthReplay::Login(user, pass) => {
            let r = conn.command("AUTH LOGIN\r\n").await?;
            if r.code != 334 {
                return Ok(r);
            }
            let r = conn.command(&format!("{user}\r\n")).await?;
            if r.code != 334 {
                return Ok(r);
            }
            conn.command(&format!("{pass}\r\n")).await
        }
        AuthReplay::XOauth2(resp) => {
            let r = conn.command(&format!("AUTH XOAUTH2 {resp}\r\n")).await?;
            if r.code == 334 {
                // The server's error details; the client side of XOAUTH2 answers empty.
                return conn.command("\r\n").await;
            }
            Ok(r)
        }
    }
}

fn decode_plain(b64: &str) -> Option<String> {
    let raw = B64.decode(b64.trim().as_bytes()).ok()?;
    let mut parts = raw.split(|&b| b == 0);
    let _authzid = parts.next()?;
    let authcid = parts.next()?;
    parts.next()?;
    let user = String::from_utf8(authcid.to_vec()).ok()?;
    (!user.is_empty()).then_some(user)
}

fn decode_xoauth2(b64: &str) -> Option<String> {
    let raw = B64.decode(b64.trim().as_bytes()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.split('\x01')
        .find_map(|kv| kv.strip_prefix("user="))
        .filter(|u| !u.is_empty())
        .map(str::to_string)
}

/// The one log line every recipient of a transaction gets, whatever its outcome (SPEC §4.1):
/// `result` is the word of `coexist_smtp_recipients_total`, `code` what the client was
/// answered. A temporary failure is `warn` (something to look at: a target unreachable or
/// refusing for now); everything else, refusals included, is a normal outcome: `info`.
/// coexist's own 452s (defer, too many recipients) are flow control, not failures.
fn log_rcpt(
    client: SocketAddr,
    txn: &Txn,
    recipient: impl std::fmt::Display,
    result: &'static str,
    target: &str,
    site: &str,
    reply: &Reply,
) {
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                client = %client, sender = %txn.from.address, recipient = %recipient,
                result, code = %reply.short(), target, site,
                version = %txn.table.version(), reply = %reply, "recipient"
            )
        };
    }
    if reply.is_transient() && result != "deferred" {
        line!(warn);
    } else {
        line!(info);
    }
}

/// Counts a recipient in `coexist_smtp_recipients_total`. The counter handles are kept by
/// target and site: registering the label set for every recipient (three allocations and a
/// registry lookup) showed in profiles of the hot path.
fn count_rcpt(target: &str, site: &str, result: &'static str) {
    type Handles = Vec<(&'static str, metrics::Counter)>;
    static CACHE: std::sync::Mutex<BTreeMap<String, BTreeMap<String, Handles>>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let sites = match cache.get_mut(target) {
        Some(s) => s,
        None => cache.entry(target.to_string()).or_default(),
    };
    let handles = match sites.get_mut(site) {
        Some(h) => h,
        None => sites.entry(site.to_string()).or_default(),
    };
    if let Some((_, c)) = handles.iter().find(|(r, _)| *r == result) {
        c.increment(1);
        return;
    }
    let c = metrics::counter!(
        crate::metric_names::SMTP_RECIPIENTS,
        "target" => target.to_string(),
        "site" => site.to_string(),
        "result" => result
    );
    c.increment(1);
    handles.push((result, c));
}

/// The replies that open a backend transaction.
struct Opened {
    mail: Reply,
    /// A 503 stand-in when MAIL failed: the client must not see the backend's reply to a
    /// RCPT without a sender.
    rcpt: Reply,
    /// The reply to an early DATA, when one was sent.
    data: Option<Reply>,
}

/// MAIL FROM and the first RCPT TO — and DATA when `early` — pipelined (RFC 2920: DATA may
/// end a group) when the server allows it, else MAIL alone first and no early DATA.
async fn open_txn(
    conn: &mut BackendConn,
    mail: &str,
    to: &RcptTo<String>,
    early: bool,
) -> Result<Opened, BackendError> {
    let rcpt = rcpt_line(to, conn.caps.dsn);
    if conn.caps.pipelining {
        let all = [mail, rcpt.as_str(), "DATA\r\n"];
        let n = if early { 3 } else { 2 };
        let mut r = conn.pipeline(&all[..n]).await?.into_iter();
        let mail = r.next().unwrap_or_else(codes::local_error);
        let rcpt = r.next().unwrap_or_else(codes::local_error);
        let data = r.next();
        if data.as_ref().is_some_and(|d| d.code == 354)
            && !(mail.is_positive() && rcpt.is_positive())
        {
            // A server that takes DATA without a sender or recipient (RFC 5321 says it
            // must not) now reads message text: an RSET or the next client's commands
            // would become part of a message. Never reuse it.
            conn.abort();
        }
        let rcpt = if mail.is_positive() {
            rcpt
        } else {
            mail.clone()
        };
        return Ok(Opened { mail, rcpt, data });
    }
    let m = conn.command(mail).await?;
    if !m.is_positive() {
        return Ok(Opened {
            rcpt: m.clone(),
            mail: m,
            data: None,
        });
    }
    let r = conn.command(&rcpt).await?;
    Ok(Opened {
        mail: m,
        rcpt: r,
        data: None,
    })
}

/// One reply for several failed parts: a temporary failure wins (the client retries).
fn combine_failures<'a>(mut failed: impl Iterator<Item = &'a Reply>) -> Reply {
    let all: Vec<&Reply> = failed.by_ref().collect();
    all.iter()
        .find(|r| r.is_transient())
        .or_else(|| all.first())
        .map_or_else(codes::target_unavailable, |r| (*r).clone())
}

fn parse_error(e: &smtp_proto::Error) -> Reply {
    use smtp_proto::Error as E;
    match e {
        E::UnknownCommand => codes::unknown_command(),
        E::InvalidSenderAddress => Reply::new(501, "5.1.7 Bad sender address syntax"),
        E::InvalidRecipientAddress => Reply::new(501, "5.1.3 Bad recipient address syntax"),
        E::SyntaxError { syntax } => codes::syntax(syntax),
        E::InvalidParameter { param } => {
            Reply::new(501, format!("5.5.4 Invalid parameter {param}"))
        }
        E::UnsupportedParameter { param } => {
            Reply::new(555, format!("5.5.4 Unsupported parameter {param}"))
        }
        E::ResponseTooLong => codes::line_too_long(),
        _ => codes::syntax("command not understood"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_decoding() {
        assert_eq!(
            decode_plain(&B64.encode(b"\0alice\0secret")),
            Some("alice".into())
        );
        assert_eq!(decode_plain(&B64.encode(b"alice")), None);
        let x = B64.encode(b"user=bob@example.com\x01auth=Bearer tok\x01\x01");
        assert_eq!(decode_xoauth2(&x), Some("bob@example.com".into()));
    }
}
