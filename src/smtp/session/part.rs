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
    /// `None` when no connection could be had (the part has failed then), or when a refused
    /// MAIL already gave it back.
    pub(super) conn: Option<BackendConn>,
    /// Where the backend transaction is, and so what may be done with the connection.
    pub(super) progress: Progress,
    pub(super) accepted: Vec<RcptTo<String>>,
    /// Who each accepted recipient is (see `Session::rcpt`), to keep a repeat out of a
    /// second part for the same target.
    pub(super) who: Vec<String>,
    /// The authenticated submission connection (not pooled; goes back to the session).
    pub(super) pinned: bool,
}

/// The life of a part's backend transaction. The connection is kept beside it (in `Part`):
/// these are the fanout's decisions alone, so they are tested without sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Progress {
    pub(super) state: PartState,
    /// DATA went out pipelined behind MAIL and RCPT and its reply is in (see
    /// `Session::early_data`): the client's DATA sends nothing more here, and the part
    /// takes no more recipients (after a 354 the backend reads message text). Decided when
    /// the part opens and kept for its whole life, whatever state the DATA reply led to.
    pub(super) early: bool,
}

/// Where a part's backend transaction is. Its moves (methods of `Progress`):
///
/// | from | event | to |
/// |---|---|---|
/// | `Open` | opened: MAIL refused | `Failed(mail reply)` |
/// | `Open` | opened: early DATA answered 354 | `InData`, early |
/// | `Open` | opened: early DATA refused, the RCPT taken | `Failed(DATA reply)`, early |
/// | `Open` | opened: early DATA refused, the RCPT too | `Open`, early (no recipients) |
/// | `Open` | the client's DATA written | `InData` |
/// | `InData` | DATA answered 354 | `InData` |
/// | `InData` | DATA refused | `Failed(reply)` |
/// | `InData` | final reply positive | `Done(reply)` |
/// | `InData` | final reply negative | `Refused(reply)` |
/// | any | no connection, MAIL not expressible | `Failed(reply)` |
/// | any | I/O error | `Failed(451)`, connection cut |
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PartState {
    /// The backend transaction is open (or being opened) and in command state: RCPT and
    /// DATA may follow; ending it takes an RSET.
    Open,
    /// DATA was sent and no final reply read yet: the backend is reading message text, so
    /// the only safe way out is to drop the connection (an RSET would become message text).
    InData,
    /// The backend took the message with this final reply: ready for a new MAIL as it is.
    Done(Reply),
    /// The backend refused the message with this final reply, which its recipients get;
    /// it closed the transaction itself: ready for a new MAIL as it is.
    Refused(Reply),
    /// The backend transaction failed before a final reply (MAIL or DATA refused, no
    /// connection, I/O error); recipients for this target get this reply. A connection
    /// that is not broken is in command state.
    Failed(Reply),
}

/// What a transition asks of the part's connection.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Link {
    Keep,
    /// An I/O error left it in an unknown state: never reuse it, and let the server see
    /// the transaction cut off.
    Cut,
}

/// What ending the transaction does with a part's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Release {
    /// Ready for MAIL as it is.
    Reuse,
    /// Ready for MAIL once an RSET is answered 250; dropped otherwise.
    Rset,
    /// Dropped.
    Close,
}

/// A part's outcome for a message: `Ok` with the final reply that took it, `Err` with the
/// reply its recipients get.
pub(super) type Outcome<'a> = Result<&'a Reply, &'a Reply>;

/// What the client is told about its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    Reply(Reply),
    /// Some targets hold the message and others do not: the rest must go to the spool, or
    /// the client must be told to retry.
    Split,
}

/// One client transaction, MAIL to the end of its message.
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

impl Part {
    pub(super) fn new(target: Arc<Target>) -> Self {
        Self {
            target,
            conn: None,
            progress: Progress::new(),
            accepted: Vec::new(),
            who: Vec::new(),
            pinned: false,
        }
    }

    /// Carries the message on: not failed, connected, with recipients.
    pub(super) fn live(&self) -> bool {
        self.progress.failure().is_none() && self.conn.is_some() && !self.accepted.is_empty()
    }

    /// The client's DATA goes here: live, and no DATA went out early.
    pub(super) fn gets_data_command(&self) -> bool {
        self.live() && !self.progress.early
    }

    /// Runs one transition, cutting the connection off when it says so.
    pub(super) fn step(&mut self, transition: impl FnOnce(&mut Progress) -> Link) {
        if transition(&mut self.progress) == Link::Cut {
            self.cut();
        }
    }

    /// Cuts the connection off, whatever the state: it is closed without QUIT when the
    /// transaction ends (see `BackendConn::abort`), so the server sees the transaction cut
    /// off and must not deliver it.
    pub(super) fn cut(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            c.abort();
        }
    }
}

impl Txn {
    /// The targets that took the message, for the log of a split delivery.
    pub(super) fn taken_by(&self) -> Vec<&str> {
        self.parts
            .iter()
            .filter(|p| matches!(p.progress.state, PartState::Done(_)))
            .map(|p| p.target.name.as_str())
            .collect()
    }
}

impl Progress {
    /// A part being opened: `Open` until the replies that open it are in.
    pub(super) fn new() -> Self {
        Self {
            state: PartState::Open,
            early: false,
        }
    }

    /// Takes in the replies that opened the backend transaction; returns the reply the
    /// client gets for its RCPT.
    pub(super) fn opened(&mut self, o: Opened) -> Reply {
        if !o.mail.is_positive() {
            self.state = PartState::Failed(o.mail.clone());
            return o.mail;
        }
        if let Some(d) = o.data {
            self.early = true;
            if d.code == 354 {
                self.state = PartState::InData;
            } else if o.rcpt.is_positive() {
                // The recipient is taken but the message is not: like a refused DATA later.
                self.state = PartState::Failed(d);
            }
        }
        o.rcpt
    }

    /// The transaction cannot go on; recipients for this target get `reply`. What becomes
    /// of the connection is the caller's: this is also how a part fails before it has one.
    pub(super) fn fail(&mut self, reply: Reply) {
        self.state = PartState::Failed(reply);
    }

    /// The connection failed mid-transaction.
    pub(super) fn lost(&mut self) -> Link {
        self.fail(codes::target_unavailable());
        Link::Cut
    }

    /// The client's DATA was written to the backend, or writing it failed.
    pub(super) fn data_sent(&mut self, written: bool) -> Link {
        if !written {
            return self.lost();
        }
        self.state = PartState::InData;
        Link::Keep
    }

    /// The backend's reply to the client's DATA.
    pub(super) fn data_reply<E>(&mut self, r: Result<Reply, E>) -> Link {
        match r {
            Ok(r) if r.code == 354 => Link::Keep,
            Ok(r) => {
                // Refused DATA: the server is back in command state.
                self.fail(r);
                Link::Keep
            }
            Err(_) => self.lost(),
        }
    }

    /// The backend's final reply to the message, after its end of data.
    pub(super) fn final_reply<E>(&mut self, r: Result<Reply, E>) -> Link {
        match r {
            Ok(r) if r.is_positive() => {
                self.state = PartState::Done(r);
                Link::Keep
            }
            Ok(r) => {
                self.state = PartState::Refused(r);
                Link::Keep
            }
            Err(_) => self.lost(),
        }
    }

    /// The reply this part's recipients get when the part failed.
    pub(super) fn failure(&self) -> Option<&Reply> {
        match &self.state {
            PartState::Refused(r) | PartState::Failed(r) => Some(r),
            PartState::Open | PartState::InData | PartState::Done(_) => None,
        }
    }

    /// What the message became here, once the part has an answer for it.
    pub(super) fn outcome(&self) -> Option<Outcome<'_>> {
        match &self.state {
            PartState::Done(r) => Some(Ok(r)),
            PartState::Refused(r) | PartState::Failed(r) => Some(Err(r)),
            PartState::Open | PartState::InData => None,
        }
    }

    /// Whether another recipient for this target joins this part.
    pub(super) fn takes_rcpts(&self) -> bool {
        !self.early
    }

    /// The connection of a part whose early DATA got a 354 and no message: it goes (an
    /// RSET would be message text), and the guess was wrong.
    pub(super) fn early_data_wasted(&self) -> bool {
        self.early && self.state == PartState::InData
    }

    /// An early DATA that carried its message to a final reply, taken or not.
    pub(super) fn early_data_used(&self) -> bool {
        self.early && matches!(self.state, PartState::Done(_) | PartState::Refused(_))
    }

    /// What ending the transaction does with the connection; `broken`: it is known to be
    /// in an unknown state.
    pub(super) fn release(&self, broken: bool) -> Release {
        if broken {
            return Release::Close;
        }
        match self.state {
            PartState::InData => Release::Close,
            PartState::Done(_) | PartState::Refused(_) => Release::Reuse,
            PartState::Open | PartState::Failed(_) => Release::Rset,
        }
    }
}

/// The reply for a message from the outcomes of its parts with recipients.
pub(super) fn verdict<'a, I>(outcomes: I) -> Verdict
where
    I: Iterator<Item = Outcome<'a>> + Clone,
{
    let mut taken = outcomes.clone().filter_map(Result::ok);
    let failed = outcomes.filter_map(Result::err);
    match (taken.next(), taken.next(), failed.clone().next()) {
        // One target: its own reply (queue id and all) is the most transparent.
        (Some(only), None, None) => Verdict::Reply(only.clone()),
        (_, _, None) => Verdict::Reply(codes::ok("Message accepted for delivery")),
        (None, _, Some(_)) => Verdict::Reply(combine_failures(failed)),
        (Some(_), _, Some(_)) => Verdict::Split,
    }
}

/// One reply for several failed parts: a temporary failure wins (the client retries).
pub(super) fn combine_failures<'a>(mut failed: impl Iterator<Item = &'a Reply>) -> Reply {
    let all: Vec<&Reply> = failed.by_ref().collect();
    all.iter()
        .find(|r| r.is_transient())
        .or_else(|| all.first())
        .map_or_else(codes::target_unavailable, |r| (*r).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16) -> Reply {
        Reply::new(code, format!("{code} text"))
    }

    fn opened(mail: u16, rcpt: u16, data: Option<u16>) -> (Progress, Reply) {
        let mut p = Progress::new();
        let reply = p.opened(Opened {
            mail: r(mail),
            rcpt: r(rcpt),
            data: data.map(r),
        });
        (p, reply)
    }

    /// A part whose client DATA went out and was answered 354.
    fn in_data() -> Progress {
        let (mut p, _) = opened(250, 250, None);
        assert_eq!(p.data_sent(true), Link::Keep);
        assert_eq!(p.data_reply::<()>(Ok(r(354))), Link::Keep);
        p
    }

    #[test]
    fn opened_takes_recipients_and_gets_the_clients_data() {
        let (p, reply) = opened(250, 251, None);
        assert_eq!(reply.code, 251);
        assert_eq!(p.state, PartState::Open);
        assert!(!p.early);
        assert!(p.takes_rcpts());
        assert_eq!(p.failure(), None);
        assert_eq!(p.outcome(), None);
        assert_eq!(p.release(false), Release::Rset);
    }

    #[test]
    fn refused_mail_fails_the_part_with_its_reply() {
        let (p, reply) = opened(550, 503, None);
        // The client sees the reply to MAIL, never the backend's to a RCPT without sender.
        assert_eq!(reply, r(550));
        assert_eq!(p.state, PartState::Failed(r(550)));
        assert_eq!(p.failure(), Some(&r(550)));
        assert!(p.takes_rcpts());
        assert_eq!(p.release(false), Release::Rset);
        // An early DATA behind a refused MAIL changes nothing here (`open_txn` cut off a
        // server that answered it 354).
        let (p, reply) = opened(451, 451, Some(354));
        assert_eq!(reply, r(451));
        assert_eq!(p.state, PartState::Failed(r(451)));
        assert!(!p.early);
        assert_eq!(p.release(true), Release::Close);
    }

    #[test]
    fn early_data_354_reads_message_text_and_takes_no_more_recipients() {
        let (p, reply) = opened(250, 250, Some(354));
        assert_eq!(reply.code, 250);
        assert_eq!(p.state, PartState::InData);
        assert!(p.early);
        assert!(!p.takes_rcpts());
        assert_eq!(p.failure(), None);
        // No message came: an RSET would be message text.
        assert!(p.early_data_wasted());
        assert!(!p.early_data_used());
        assert_eq!(p.release(false), Release::Close);
    }

    #[test]
    fn early_data_refused_with_the_recipient_taken_fails_the_part() {
        let (p, reply) = opened(250, 250, Some(554));
        // The client's RCPT is taken; its message will not be.
        assert_eq!(reply.code, 250);
        assert_eq!(p.state, PartState::Failed(r(554)));
        assert!(p.early);
        assert!(!p.takes_rcpts());
        assert_eq!(p.failure(), Some(&r(554)));
        assert!(!p.early_data_wasted());
        assert_eq!(p.release(false), Release::Rset);
    }

    #[test]
    fn early_data_refused_with_the_recipient_refused_leaves_an_empty_part() {
        let (p, reply) = opened(250, 550, Some(554));
        assert_eq!(reply.code, 550);
        // No failure to report: the part has no recipients, and gets none later.
        assert_eq!(p.state, PartState::Open);
        assert!(p.early);
        assert!(!p.takes_rcpts());
        assert_eq!(p.failure(), None);
        assert_eq!(p.release(false), Release::Rset);
    }

    #[test]
    fn client_data_written_then_answered_354() {
        let (mut p, _) = opened(250, 250, None);
        assert_eq!(p.data_sent(true), Link::Keep);
        assert_eq!(p.state, PartState::InData);
        assert_eq!(p.release(false), Release::Close);
        assert_eq!(p.data_reply::<()>(Ok(r(354))), Link::Keep);
        assert_eq!(p.state, PartState::InData);
        assert!(!p.early_data_wasted());
    }

    #[test]
    fn data_not_written_cuts_the_part_off() {
        let (mut p, _) = opened(250, 250, None);
        assert_eq!(p.data_sent(false), Link::Cut);
        assert_eq!(p.state, PartState::Failed(codes::target_unavailable()));
    }

    #[test]
    fn data_refused_fails_the_part_in_command_state() {
        let (mut p, _) = opened(250, 250, None);
        assert_eq!(p.data_sent(true), Link::Keep);
        assert_eq!(p.data_reply::<()>(Ok(r(451))), Link::Keep);
        assert_eq!(p.state, PartState::Failed(r(451)));
        assert_eq!(p.outcome(), Some(Err(&r(451))));
        assert_eq!(p.release(false), Release::Rset);
    }

    #[test]
    fn no_reply_to_data_cuts_the_part_off() {
        let (mut p, _) = opened(250, 250, None);
        assert_eq!(p.data_sent(true), Link::Keep);
        assert_eq!(p.data_reply(Err(())), Link::Cut);
        assert_eq!(p.state, PartState::Failed(codes::target_unavailable()));
        assert_eq!(p.release(true), Release::Close);
    }

    #[test]
    fn final_250_is_done_and_the_connection_reusable_without_rset() {
        let mut p = in_data();
        assert_eq!(p.final_reply::<()>(Ok(r(250))), Link::Keep);
        assert_eq!(p.state, PartState::Done(r(250)));
        assert_eq!(p.failure(), None);
        assert_eq!(p.outcome(), Some(Ok(&r(250))));
        assert!(!p.early_data_used());
        assert_eq!(p.release(false), Release::Reuse);
        assert_eq!(p.release(true), Release::Close);
    }

    #[test]
    fn final_5xx_is_refused_and_the_connection_reusable_without_rset() {
        let mut p = in_data();
        assert_eq!(p.final_reply::<()>(Ok(r(554))), Link::Keep);
        assert_eq!(p.state, PartState::Refused(r(554)));
        assert_eq!(p.failure(), Some(&r(554)));
        assert_eq!(p.outcome(), Some(Err(&r(554))));
        assert_eq!(p.release(false), Release::Reuse);
    }

    #[test]
    fn no_final_reply_cuts_the_part_off() {
        let mut p = in_data();
        assert_eq!(p.final_reply(Err(())), Link::Cut);
        assert_eq!(p.state, PartState::Failed(codes::target_unavailable()));
        assert_eq!(p.outcome(), Some(Err(&codes::target_unavailable())));
        assert_eq!(p.release(true), Release::Close);
    }

    #[test]
    fn early_data_counts_as_used_once_a_final_reply_is_in() {
        for code in [250, 550] {
            let (mut p, _) = opened(250, 250, Some(354));
            assert_eq!(p.final_reply::<()>(Ok(r(code))), Link::Keep);
            assert!(p.early_data_used());
            assert!(!p.early_data_wasted());
            assert!(!p.takes_rcpts());
            assert_eq!(p.release(false), Release::Reuse);
        }
        let (mut p, _) = opened(250, 250, Some(354));
        assert_eq!(p.lost(), Link::Cut);
        assert!(!p.early_data_used());
        assert!(!p.takes_rcpts());
    }

    #[test]
    fn lost_connection_fails_any_state() {
        for mut p in [opened(250, 250, None).0, in_data()] {
            assert_eq!(p.lost(), Link::Cut);
            assert_eq!(p.failure(), Some(&codes::target_unavailable()));
        }
    }

    #[test]
    fn what_ending_the_transaction_does_in_each_state() {
        let states = [
            (PartState::Open, Release::Rset),
            (PartState::InData, Release::Close),
            (PartState::Done(r(250)), Release::Reuse),
            (PartState::Refused(r(550)), Release::Reuse),
            (PartState::Failed(r(451)), Release::Rset),
        ];
        for (state, release) in states {
            for early in [false, true] {
                let p = Progress {
                    state: state.clone(),
                    early,
                };
                assert_eq!(p.release(false), release, "{p:?}");
                assert_eq!(p.release(true), Release::Close, "{p:?}");
                assert_eq!(
                    p.early_data_wasted(),
                    early && state == PartState::InData,
                    "{p:?}"
                );
            }
        }
    }

    #[test]
    fn one_target_answers_with_its_own_reply() {
        let queued = Reply::new(250, "2.0.0 Ok: queued as 4XyZ");
        assert_eq!(
            verdict([Ok(&queued)].into_iter()),
            Verdict::Reply(queued.clone())
        );
    }

    #[test]
    fn several_targets_that_all_take_it_answer_250() {
        let (a, b) = (r(250), Reply::new(250, "queued as 1"));
        assert_eq!(
            verdict([Ok(&a), Ok(&b)].into_iter()),
            Verdict::Reply(codes::ok("Message accepted for delivery"))
        );
        // No part with an answer (cannot happen after DATA): the same generic 250.
        assert_eq!(
            verdict(std::iter::empty()),
            Verdict::Reply(codes::ok("Message accepted for delivery"))
        );
    }

    #[test]
    fn when_every_target_fails_a_temporary_failure_wins() {
        let (perm, temp) = (r(550), r(451));
        assert_eq!(verdict([Err(&perm)].into_iter()), Verdict::Reply(r(550)));
        assert_eq!(
            verdict([Err(&perm), Err(&temp)].into_iter()),
            Verdict::Reply(r(451))
        );
    }

    #[test]
    fn some_taking_it_and_some_not_is_a_split() {
        let (ok, temp, perm) = (r(250), r(451), r(550));
        assert_eq!(verdict([Ok(&ok), Err(&temp)].into_iter()), Verdict::Split);
        assert_eq!(verdict([Err(&perm), Ok(&ok)].into_iter()), Verdict::Split);
    }

    #[test]
    fn combined_failures() {
        let (a, b, c) = (r(550), r(554), r(421));
        assert_eq!(
            combine_failures(std::iter::empty()),
            codes::target_unavailable()
        );
        // All permanent: the first one.
        assert_eq!(combine_failures([&a, &b].into_iter()), a);
        // A temporary one wins, wherever it is.
        assert_eq!(combine_failures([&a, &b, &c].into_iter()), c);
    }
}
