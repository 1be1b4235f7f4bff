//! The greeting's other half: EHLO/HELO (the keywords this listener can honour towards
//! every target) and STARTTLS.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, SessionError};
use crate::config::ListenerMode;
use crate::smtp::command::Caps;
use crate::smtp::io::{Conn, IoError};
use crate::smtp::reply::{Reply, codes};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The EHLO keywords: only what coexist honours towards every target this listener may
    /// route to (their EHLO answers are learned by connections and health probes).
    pub(super) fn ehlo(&mut self, host: String, esmtp: bool) {
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

    pub(super) async fn starttls(&mut self) -> Result<bool, SessionError> {
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
}
