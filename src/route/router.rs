//! The router: one `ArcSwap` holding the active table, plus a bounded history.
//!
//! The data plane only calls [`Router::snapshot`] (or [`Router::current`] for one lookup);
//! a transaction keeps its snapshot for its whole life, so all its recipients see one
//! version. The control plane builds a new table off the hot path and installs it with one
//! `store`: there is exactly one `ArcSwap`, never two that must agree.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::{ArcSwap, Guard};
use tokio::sync::watch;

use super::table::{RoutingTable, Version};

/// History kept when the config says nothing (SPEC §3 `routes.history`).
pub const DEFAULT_HISTORY: usize = 50;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RollbackError {
    #[error("no earlier version to roll back to")]
    NoEarlier,
    #[error("version {0:?} is not in the history")]
    UnknownVersion(String),
    #[error("version {0} is already active")]
    AlreadyActive(Version),
}

/// The outcome of installing a table.
#[derive(Debug, Clone)]
pub struct Swapped {
    pub previous: Arc<RoutingTable>,
    pub active: Arc<RoutingTable>,
}

struct State {
    /// Every kept version, oldest first, including the active one. Holding the previous
    /// active table here also means a reader never drops the last reference to a swapped
    /// out table, so freeing a million-entry table never lands on a data-plane task.
    history: VecDeque<Arc<RoutingTable>>,
    /// The versions that were active before the current one, most recent last: what a
    /// rollback without a version returns to, step by step.
    previous: Vec<Arc<RoutingTable>>,
    next_seq: u64,
    capacity: usize,
}

pub struct Router {
    active: ArcSwap<RoutingTable>,
    /// Serialises writers; readers never take it.
    state: Mutex<State>,
    /// Every installed table, in install order, whoever installed it (reload, cutover,
    /// rollback, a later shared source): what reacts to a swap — metrics, the HTTPS drain
    /// of long-lived requests — subscribes here instead of being called by each writer.
    installed: watch::Sender<Arc<RoutingTable>>,
}

impl Router {
    /// A router serving `table` as version 1, keeping at most `history` versions (≥ 1).
    pub fn new(table: RoutingTable, history: usize) -> Self {
        Self::with_seq(table, history, 1)
    }

    /// A router serving `table` as version `seq` (continuing a history kept on disk).
    pub fn with_seq(table: RoutingTable, history: usize, seq: u64) -> Self {
        Self::resume(table, history, seq, seq + 1)
    }

    /// A router serving `table` as version `seq`, numbering the next installed table
    /// `next_seq` (a kept history may hold numbers above the active one after rollbacks).
    pub fn resume(mut table: RoutingTable, history: usize, seq: u64, next_seq: u64) -> Self {
        table.set_seq(seq);
        let table = Arc::new(table);
        Self {
            active: ArcSwap::new(Arc::clone(&table)),
            installed: watch::Sender::new(Arc::clone(&table)),
            state: Mutex::new(State {
                history: VecDeque::from([table]),
                previous: Vec::new(),
                next_seq: next_seq.max(seq + 1),
                capacity: history.max(1),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the history consistent (every mutation is
        // one push or pop), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The active table, for a whole transaction or request.
    pub fn snapshot(&self) -> Arc<RoutingTable> {
        self.active.load_full()
    }

    /// The active table for a short lookup, without touching the reference count.
    pub fn current(&self) -> Guard<Arc<RoutingTable>> {
        self.active.load()
    }

    /// Installs a new table as the next version and returns the previous and new ones.
    pub fn swap(&self, mut table: RoutingTable) -> Swapped {
        let mut st = self.state();
        table.set_seq(st.next_seq);
        st.next_seq += 1;
        let table = Arc::new(table);
        st.history.push_back(Arc::clone(&table));
        let previous = self.active.swap(Arc::clone(&table));
        // Published under the writers' lock, so subscribers see installs in their order.
        self.installed.send_replace(Arc::clone(&table));
        st.previous.push(Arc::clone(&previous));
        Self::trim(&mut st, &table);
        Swapped {
            previous,
            active: table,
        }
    }

    /// Drops the oldest versions beyond the capacity, never the active one.
    fn trim(st: &mut State, active: &Arc<RoutingTable>) {
        if st.previous.len() > st.capacity {
            let excess = st.previous.len() - st.capacity;
            st.previous.drain(..excess);
        }
        while st.history.len() > st.capacity {
            let Some(pos) = st.history.iter().position(|t| !Arc::ptr_eq(t, active)) else {
                break;
            };
            st.history.remove(pos);
        }
    }

    /// The sequence number the next [`Router::swap`] gives: the control plane records a
    /// version durably under this number before it installs it.
    pub fn next_seq(&self) -> u64 {
        self.state().next_seq
    }

    /// The table [`Router::rollback`] with the same `to` would make active, without
    /// changing anything: the control plane restores and records its files first.
    pub fn rollback_target(&self, to: Option<&str>) -> Result<Arc<RoutingTable>, RollbackError> {
        Self::target(&self.state(), &self.active.load_full(), to)
    }

    /// One rule for which version a rollback goes to, for the peek and the rollback alike.
    fn target(
        st: &State,
        active: &Arc<RoutingTable>,
        to: Option<&str>,
    ) -> Result<Arc<RoutingTable>, RollbackError> {
        match to {
            Some(spec) => {
                let t = st
                    .history
                    .iter()
                    .rev()
                    .find(|t| t.version().matches(spec))
                    .cloned()
                    .ok_or_else(|| RollbackError::UnknownVersion(spec.to_string()))?;
                if Arc::ptr_eq(&t, active) {
                    return Err(RollbackError::AlreadyActive(active.version()));
                }
                Ok(t)
            }
            None => st.previous.last().cloned().ok_or(RollbackError::NoEarlier),
        }
    }

    /// Makes an earlier version active again: without `to`, the one that was active before
    /// the current one (repeated rollbacks walk further back through what was active); with
    /// `to`, any kept version, newer ones included.
    pub fn rollback(&self, to: Option<&str>) -> Result<Swapped, RollbackError> {
        let mut st = self.state();
        let active = self.active.load_full();
        let target = Self::target(&st, &active, to)?;
        match to {
            Some(_) => st.previous.push(Arc::clone(&active)),
            None => {
                st.previous.pop();
            }
        }
        let previous = self.active.swap(Arc::clone(&target));
        self.installed.send_replace(Arc::clone(&target));
        // A version that is active again must be kept even if it had aged out.
        if !st.history.iter().any(|t| Arc::ptr_eq(t, &target)) {
            st.history.push_back(Arc::clone(&target));
        }
        Self::trim(&mut st, &target);
        drop(st);
        Ok(Swapped {
            previous,
            active: target,
        })
    }

    /// A receiver of every table installed from now on (its current value is the active
    /// table). A slow subscriber sees the latest install, not each one: a swap listener
    /// compares with the table it last acted on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.installed.subscribe()
    }

    /// Kept versions, newest first.
    pub fn history(&self) -> Vec<Arc<RoutingTable>> {
        self.state().history.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Field, KnownTargets, LocalPolicy, MailboxSpec, TableBuilder};

    fn table(owner: &str) -> RoutingTable {
        let mut b = TableBuilder::new(&KnownTargets::Exactly(vec!["old".into(), "new".into()]));
        let f = b.add_file(std::path::Path::new("t.toml"));
        let fld = |text| Field { text, line: 1 };
        b.add_domain(f, fld("example.com"), fld("old"), LocalPolicy::default());
        b.add_site(f, fld("paris"), fld(owner));
        b.add_mailbox(
            f,
            &MailboxSpec {
                address: fld("a@example.com"),
                aliases: vec![],
                site: fld("paris"),
                owner: None,
                guid: None,
                logins: vec![],
            },
        );
        b.finish().unwrap()
    }

    fn owner(r: &Router) -> String {
        let t = r.snapshot();
        match t.lookup("a@example.com") {
            crate::route::Route::Mailbox(m) => m.owner_name().to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_install_is_published() {
        let r = Router::new(table("old"), 10);
        let mut rx = r.subscribe();
        assert_eq!(rx.borrow_and_update().version().seq, 1);
        assert!(!rx.has_changed().unwrap());
        r.swap(table("new"));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().version().seq, 2);
        r.rollback(None).unwrap();
        let t = Arc::clone(&rx.borrow_and_update());
        assert_eq!(t.version().seq, 1);
        assert!(Arc::ptr_eq(&t, &r.snapshot()));
        // A slow subscriber sees the latest install.
        r.swap(table("new"));
        r.swap(table("old"));
        assert_eq!(rx.borrow_and_update().version().seq, 4);
        // A rejected rollback publishes nothing.
        assert!(r.rollback(Some("4")).is_err());
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn swap_and_rollback_walk_the_history() {
        let r = Router::new(table("old"), 10);
        assert_eq!(r.snapshot().version().seq, 1);
        let s = r.swap(table("new"));
        assert_eq!(s.previous.version().seq, 1);
        assert_eq!(s.active.version().seq, 2);
        assert_eq!(owner(&r), "new");
        // Same content → same hash, different sequence number.
        r.swap(table("new"));
        assert_eq!(r.snapshot().version().seq, 3);
        assert_eq!(r.history()[0].version().hash, r.history()[1].version().hash);

        let rb = r.rollback(None).unwrap();
        assert_eq!(rb.active.version().seq, 2);
        let rb = r.rollback(None).unwrap();
        assert_eq!(rb.active.version().seq, 1);
        assert_eq!(owner(&r), "old");
        assert_eq!(r.rollback(None).unwrap_err(), RollbackError::NoEarlier);
        // Forward again by naming the version.
        let v3 = r.history()[0].version().to_string();
        r.rollback(Some(&v3)).unwrap();
        assert_eq!(r.snapshot().version().seq, 3);
        assert!(matches!(
            r.rollback(Some("99")),
            Err(RollbackError::UnknownVersion(_))
        ));
    }

    #[test]
    fn rollback_target_names_what_rollback_installs_and_changes_nothing() {
        let r = Router::new(table("old"), 10);
        assert_eq!(r.next_seq(), 2);
        r.swap(table("new"));
        r.swap(table("new"));
        assert_eq!(r.next_seq(), 4);
        for to in [None, Some("1"), Some("2")] {
            let peek = r.rollback_target(to).unwrap();
            assert_eq!(r.snapshot().version().seq, 3, "a peek swaps nothing");
            let done = r.rollback(to).unwrap();
            assert!(Arc::ptr_eq(&peek, &done.active), "{to:?}");
            r.rollback(Some("3")).unwrap();
        }
        assert_eq!(
            r.rollback_target(Some("3")).unwrap_err(),
            RollbackError::AlreadyActive(r.snapshot().version())
        );
    }

    #[test]
    fn rollback_undoes_the_last_change_each_time() {
        let r = Router::new(table("old"), 10);
        for _ in 0..3 {
            r.swap(table("new"));
            assert_eq!(owner(&r), "new");
            let rb = r.rollback(None).unwrap();
            assert_eq!(
                rb.active.version().seq,
                1,
                "back to the version before the cutover"
            );
            assert_eq!(owner(&r), "old");
        }
        assert_eq!(r.rollback(None).unwrap_err(), RollbackError::NoEarlier);
    }

    #[test]
    fn history_is_bounded_and_keeps_the_active() {
        let r = Router::new(table("old"), 3);
        for _ in 0..10 {
            r.swap(table("new"));
        }
        let h = r.history();
        assert_eq!(h.len(), 3);
        assert_eq!(h[0].version().seq, 11);
        assert_eq!(h[2].version().seq, 9);
        // Roll back to the oldest kept, then swap: the active (old) one must survive trimming.
        r.rollback(Some("9")).unwrap();
        r.swap(table("old"));
        assert_eq!(r.history().len(), 3);
    }

    #[test]
    fn snapshot_survives_swap() {
        let r = Router::new(table("old"), 2);
        let snap = r.snapshot();
        for _ in 0..5 {
            r.swap(table("new"));
        }
        // The transaction's snapshot still routes by its own version.
        assert!(
            matches!(snap.lookup("a@example.com"), crate::route::Route::Mailbox(m) if m.owner_name() == "old")
        );
    }
}
