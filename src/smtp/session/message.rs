//! The message: DATA and BDAT content scanned and streamed to every part at once, the
//! final replies collected into the one reply the client gets.

use std::fmt::Write as _;
use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncWrite};

use super::part::{Part, Progress, Txn, Verdict, combine_failures, verdict};
use super::{Session, SessionError};
use crate::date::rfc5322_date;
use crate::smtp::data::{DataScanner, Limits, Mode, Violation};
use crate::smtp::reply::{Reply, codes};

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

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Sends DATA to every part with recipients and waits for their 354s; `Err` carries
    /// the reply for the client when no part is ready to take the message.
    async fn start_backend_data(&mut self) -> Result<(), Reply> {
        self.send_data_commands().await?;
        if self.await_data_replies().await {
            return Ok(());
        }
        let txn = self.txn.as_ref().expect("checked by send_data_commands");
        Err(combine_failures(
            txn.parts.iter().filter_map(|p| p.progress.failure()),
        ))
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

    /// Writes DATA to every part with recipients, without waiting for the replies.
    async fn send_data_commands(&mut self) -> Result<(), Reply> {
        let Some(txn) = self.txn.as_mut() else {
            return Err(codes::bad_sequence("need MAIL and RCPT first"));
        };
        if !txn.parts.iter().any(|p| !p.accepted.is_empty()) {
            return Err(codes::no_valid_recipients());
        }
        let sent = join_each!(txn.parts.iter_mut().filter(|p| p.gets_data_command()).map(
            |p| async {
                let conn = p.conn.as_mut().expect("live part has a connection");
                let r = conn.send("DATA\r\n").await;
                (p, r)
            }
        ),);
        for (p, r) in sent {
            p.step(|s| s.data_sent(r.is_ok()));
        }
        Ok(())
    }

    /// Reads the replies to DATA; parts without a 354 fail. True when any part is ready.
    async fn await_data_replies(&mut self) -> bool {
        let Some(txn) = self.txn.as_mut() else {
            return false;
        };
        let replies = join_each!(txn.parts.iter_mut().filter(|p| p.gets_data_command()).map(
            |p| async {
                let conn = p.conn.as_mut().expect("live part has a connection");
                let r = conn.read_reply().await;
                (p, r)
            },
        ));
        for (p, r) in replies {
            p.step(|s| s.data_reply(r));
        }
        txn.parts.iter().any(Part::live)
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

    pub(super) async fn data(&mut self) -> Result<(), SessionError> {
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

    pub(super) async fn bdat(&mut self, size: usize, last: bool) -> Result<(), SessionError> {
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
                p.step(Progress::lost);
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
                    p.cut();
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
                    p.target.record_final_reply(started.elapsed().as_secs_f64());
                    (p, r)
                }),
        );
        for (p, r) in results {
            if let Err(e) = &r {
                tracing::warn!(target = %p.target.name, error = %e, "backend failed at end of DATA");
            }
            p.step(|s| s.final_reply(r));
        }
        let with_rcpts = txn.parts.iter().filter(|p| !p.accepted.is_empty());
        for p in with_rcpts.clone() {
            let result = match p.progress.failure() {
                None => "accepted",
                Some(r) if r.is_transient() => "tempfail",
                Some(_) => "rejected",
            };
            p.target.count_message(result);
        }
        let reply = match verdict(with_rcpts.filter_map(|p| p.progress.outcome())) {
            Verdict::Reply(r) => r,
            Verdict::Split => match self.spool_rest().await {
                Some(queued) => queued,
                None => {
                    // Some targets hold the message, others do not, and the spool could not
                    // take the rest: a temporary failure is the only safe answer; the client
                    // retries and the accepting side gets a duplicate, which is better than
                    // a loss.
                    metrics::counter!(crate::metric_names::SMTP_PARTIAL_DUPLICATE_RISK)
                        .increment(1);
                    let taken = self.txn.as_ref().map(Txn::taken_by).unwrap_or_default();
                    tracing::warn!(
                        accepted = ?taken,
                        "message accepted by some targets only; answering 451 (duplicate risk)"
                    );
                    codes::partial_duplicate_risk()
                }
            },
        };
        if let Some(txn) = self.txn.as_ref() {
            self.early_data_streak = !txn.multi_rcpt;
            let used = txn
                .parts
                .iter()
                .filter(|p| p.progress.early_data_used())
                .count();
            if used > 0 {
                metrics::counter!(crate::metric_names::SMTP_EARLY_DATA, "outcome" => "used")
                    .increment(used as u64);
            }
        }
        tracing::info!(peer = %self.peer, reply = %reply, "message");
        self.end_txn().await;
        reply
    }
}
