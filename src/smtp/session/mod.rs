//! One client SMTP session: the command state machine.
//!
//! Routing happens per recipient: MAIL takes one routing-table snapshot for the whole
//! transaction; each RCPT is looked up in it and offered live to the owner target's server
//! (its backend transaction is opened lazily with the first recipient for that target), and
//! the server's reply goes back to the client. DATA/BDAT content is scanned (see `data`)
//! and streamed to every involved target at once, never buffered whole.
//!
//! The session is generic over the stream so that tests can drive it over any duplex pipe.
//!
//! This file holds the session itself: its command loop and the dispatch of each command.
//! The stages are one file each, over the same `Session`: `ehlo` (EHLO/HELO, STARTTLS),
//! `auth` (submission AUTH), `transaction` (MAIL, RCPT and the backend transactions they
//! open and end), `message` (DATA/BDAT and the final reply), `handoff` (the spool's share of
//! a split delivery). `part` is the fanout: one target's share of a transaction, whose life
//! is a state machine of its own.

mod auth;
mod ehlo;
mod handoff;
mod message;
mod part;
mod transaction;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use self::auth::Auth;
use self::part::Txn;
use super::backend::{BackendConn, Backends};
use super::io::{Conn, IoError, Line, LineIo};
use super::reply::{Reply, codes};
use crate::config::{ListenerMode, MixedRecipients, SmtpLimits};
use crate::net::{Accepted, Handler, Shutdown, Stream};
use crate::route::Router;

/// RFC 5321 §4.5.3.1.4 says 512; 1000 leaves room for extension parameters.
const MAX_COMMAND_LINE: usize = 1000;
/// RFC 4954 §4: AUTH lines may be up to 12288 octets (OAuth tokens are long).
const MAX_AUTH_LINE: usize = 12288;
/// Errors in a row before the session is closed (slow brute force, garbage).
const MAX_ERRORS: u32 = 20;

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
