//! The envelope: MAIL takes a routing-table snapshot; each RCPT is routed and offered to
//! its target's backend transaction (opened lazily, with DATA pipelined behind it when the
//! guess says so); ending a transaction gives the connections back.

use std::net::SocketAddr;
use std::sync::Arc;

use smtp_proto::{MailFrom, RcptTo};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Session;
use super::part::{Opened, Part, Progress, Release, Txn};
use crate::config::{ListenerMode, MixedRecipients};
use crate::route::Route;
use crate::smtp::backend::{BackendConn, BackendError, Target};
use crate::smtp::command::{mail_line, rcpt_line};
use crate::smtp::reply::{Reply, codes};
use crate::traffic::{Meter, Traffic};
use crate::upstream::Protocol;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) fn mail(&mut self, from: MailFrom<String>) {
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

    pub(super) async fn rcpt(&mut self, to: RcptTo<String>) {
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
                    count_rcpt(&self.ctx.traffic, "-", "-", "unknown");
                    let reply = codes::no_such_user();
                    log_rcpt(self.peer, txn, &to.address, "unknown", "-", "-", &reply);
                    self.reply(&reply);
                    return;
                }
                Route::NotOurs => {
                    count_rcpt(&self.ctx.traffic, "-", "-", "relay_denied");
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
            let Some(t) = self.ctx.backends.target_of(&table, target_id) else {
                let name = table.target_name(target_id);
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
            count_rcpt(&self.ctx.traffic, &target.name, &site, "deferred");
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
            .position(|p| Arc::ptr_eq(&p.target, &target) && p.progress.takes_rcpts());
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
                count_rcpt(&self.ctx.traffic, &target.name, &site, "accepted");
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
            let reply = if let Some(r) = part.progress.failure() {
                r.clone()
            } else if let Some(conn) = part.conn.as_mut() {
                let line = rcpt_line(&to, conn.caps.dsn);
                match conn.command(&line).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, target = %target.name, "backend failed at RCPT");
                        part.step(Progress::lost);
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
        let meter = count_rcpt(&self.ctx.traffic, &target.name, &site, result);
        if reply.is_positive() {
            self.ctx.traffic.record(&meter);
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
        let mut part = Part::new(Arc::clone(&target));
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
                part.progress.fail(r.clone());
                return (part, r);
            };
            let reply = match mail_line(from, &conn.caps) {
                Err(r) => {
                    part.progress.fail(r.clone());
                    r
                }
                Ok(line) => match open_txn(&mut conn, &line, to, early).await {
                    Ok(o) => part.progress.opened(o),
                    Err(_) => {
                        part.progress.fail(codes::target_unavailable());
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
                    part.progress.fail(codes::target_unavailable());
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
                        part.progress.fail(codes::target_unavailable());
                        return (part, codes::target_unavailable());
                    }
                }
            }
            let from = &self.txn.as_ref().expect("in a transaction").from;
            let line = match mail_line(from, &conn.caps) {
                Ok(l) => l,
                Err(r) => {
                    self.give_back(conn);
                    part.progress.fail(r.clone());
                    return (part, r);
                }
            };
            match open_txn(&mut conn, &line, to, early).await {
                Ok(o) if !o.mail.is_positive() => {
                    // The server refused the sender; the connection itself is fine.
                    let r = part.progress.opened(o);
                    if !conn.broken && conn.rset().await {
                        self.give_back(conn);
                    }
                    return (part, r);
                }
                Ok(o) => {
                    let r = part.progress.opened(o);
                    part.conn = Some(conn);
                    return (part, r);
                }
                Err(e) if conn.reused && attempt == 0 => {
                    tracing::debug!(error = %e, "pooled backend connection was stale");
                }
                Err(e) => {
                    tracing::warn!(target = %target.name, error = %e, "backend failed at MAIL");
                    part.progress.fail(codes::target_unavailable());
                    return (part, codes::target_unavailable());
                }
            }
        }
        part.progress.fail(codes::target_unavailable());
        (part, codes::target_unavailable())
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

    /// Ends the transaction: connections go back to the pool (or to the session, when
    /// pinned) after RSET unless the backend already closed the transaction with its final
    /// reply; broken ones are dropped.
    pub(super) async fn end_txn(&mut self) {
        let Some(txn) = self.txn.take() else { return };
        let mut pinned_back = None;
        for mut p in txn.parts {
            let Some(mut conn) = p.conn.take() else {
                continue;
            };
            if !conn.broken && p.progress.early_data_wasted() {
                // An early DATA with no message behind it: the connection goes (an RSET
                // would be message text), and this session stops guessing.
                self.early_data_missed = true;
                metrics::counter!(crate::metric_names::SMTP_EARLY_DATA, "outcome" => "dropped")
                    .increment(1);
            }
            let reusable = match p.progress.release(conn.broken) {
                Release::Reuse => true,
                Release::Rset => conn.rset().await,
                Release::Close => false,
            };
            if !reusable {
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
    pub(super) fn drop_txn(txn: Txn) {
        for mut p in txn.parts {
            p.cut();
        }
    }
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

/// Counts a recipient in `coexist_smtp_recipients_total` through its (target, site) meter,
/// which the caller may also use for the status page's traffic. The meter holds the counter
/// handles (registering a label set per recipient showed in profiles of the hot path) and is
/// found without a lock (see `traffic`).
fn count_rcpt(traffic: &Traffic, target: &str, site: &str, result: &'static str) -> Arc<Meter> {
    let meter = traffic.meter(Protocol::Smtp, target, site);
    meter.count(result);
    meter
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
