//! Hand-off to the spool: a copy of a split delivery's content, and the parts a target did
//! not take yet, committed durably so the client can be told 250.

use std::fmt::Write as _;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::Session;
use crate::smtp::reply::{Reply, codes};
use crate::smtp::spool::SpooledRcpt;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Starts the spool copy of the content when more than one target takes part.
    pub(super) fn start_spool_copy(&mut self) {
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

    pub(super) fn spool_copy(&mut self, bytes: &[u8]) {
        if let Some(w) = self.txn.as_mut().and_then(|t| t.spool.as_mut()) {
            w.write(bytes);
        }
    }

    /// Some targets took the message and the others failed temporarily: the rest goes to
    /// the spool, durably, and the client may be told 250. `None` when that is not possible.
    pub(super) async fn spool_rest(&mut self) -> Option<Reply> {
        let txn = self.txn.as_mut()?;
        let spool = Arc::clone(self.ctx.spool.as_ref()?);
        let writer = txn.spool.take()?;
        let mut later = Vec::new();
        let mut refused = Vec::new();
        let mut why = Vec::new();
        for p in txn.parts.iter().filter(|p| !p.accepted.is_empty()) {
            let Some(r) = p.progress.failure() else {
                continue;
            };
            why.push(format!("{}: {r}", p.target.name));
            for rc in &p.accepted {
                let s = SpooledRcpt::from(rc);
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
                    accepted = ?txn.taken_by(),
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
}
