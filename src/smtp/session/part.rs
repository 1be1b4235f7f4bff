//! The fanout: one `Part` per target of a transaction, each carrying that target's
//! recipients and its backend transaction.

use std::sync::Arc;

use smtp_proto::{MailFrom, RcptTo};

use crate::route::RoutingTable;
use crate::smtp::backend::{BackendConn, Target};
use crate::smtp::data::DataScanner;
use crate::smtp::reply::{Reply, codes};
use crate::smtp::spool::SpoolWriter;

/// One part of a transaction: the recipients for one target and the backend transaction
/// that carries them.
pub(super) struct Part {
    pub(super) target: Arc<Target>,
    pub(super) conn: Option<BackendConn>,
    /// Set when the backend transaction failed; recipients for this target get this reply.
    pub(super) failed: Option<Reply>,
    pub(super) accepted: Vec<RcptTo<String>>,
    /// Who each accepted recipient is (see `Session::rcpt`), to keep a repeat out of a
    /// second part for the same target.
    pub(super) who: Vec<String>,
    /// The authenticated submission connection (not pooled; goes back to the session).
    pub(super) pinned: bool,
    /// The backend gave its final reply to the message: ready for a new MAIL as it is.
    pub(super) done: bool,
    /// DATA was sent and no final reply read yet: the backend is reading message text, so
    /// the only safe way out is to drop the connection (an RSET would become message text).
    pub(super) in_data: bool,
    /// DATA went out pipelined behind MAIL and RCPT and its reply is in (see
    /// `Session::early_data`): the client's DATA sends nothing more here, and the part
    /// takes no more recipients (after a 354 the backend reads message text).
    pub(super) early: bool,
}

impl Part {
    pub(super) fn live(&self) -> bool {
        self.failed.is_none() && self.conn.is_some() && !self.accepted.is_empty()
    }

    /// Takes in the replies that opened the backend transaction; returns the reply the
    /// client gets for its RCPT.
    pub(super) fn opened(&mut self, o: Opened) -> Reply {
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

    pub(super) fn fail(&mut self, reply: Reply) {
        if let Some(c) = self.conn.as_mut() {
            c.abort();
        }
        self.failed = Some(reply);
    }
}

pub(super) struct Txn {
    pub(super) table: Arc<RoutingTable>,
    pub(super) from: MailFrom<String>,
    pub(super) parts: Vec<Part>,
    pub(super) rcpts: u32,
    /// BDAT in progress: the scanner and whether the backends got their DATA.
    pub(super) bdat: Option<DataScanner>,
    /// A BDAT failed: the rest of the transaction's chunks are read and discarded.
    pub(super) bdat_failed: Option<Reply>,
    /// A copy of the content, when the message goes to more than one target: what the
    /// spool keeps if only some of them take it.
    pub(super) spool: Option<SpoolWriter>,
    /// Some target was offered more than one recipient in this transaction.
    pub(super) multi_rcpt: bool,
}

/// The replies that open a backend transaction.
pub(super) struct Opened {
    pub(super) mail: Reply,
    /// A 503 stand-in when MAIL failed: the client must not see the backend's reply to a
    /// RCPT without a sender.
    pub(super) rcpt: Reply,
    /// The reply to an early DATA, when one was sent.
    pub(super) data: Option<Reply>,
}

/// One reply for several failed parts: a temporary failure wins (the client retries).
pub(super) fn combine_failures<'a>(mut failed: impl Iterator<Item = &'a Reply>) -> Reply {
    let all: Vec<&Reply> = failed.by_ref().collect();
    all.iter()
        .find(|r| r.is_transient())
        .or_else(|| all.first())
        .map_or_else(codes::target_unavailable, |r| (*r).clone())
}
