//! Recent traffic per protocol, target and site, for the status page (accepted recipients
//! per minute over the last half hour, kept in memory; Prometheus has the long-term
//! counters), and the per-recipient counter handles of `/metrics`.
//!
//! The hot path takes no lock: each (protocol, target, site) has a [`Meter`] — atomic
//! per-minute slots and its counter handles, registered once — found in a map that is
//! read through `arc-swap` and only copied when a new key appears. Every installed table
//! registers its targets and sites ahead of traffic ([`Traffic::register_table`]), so a
//! recipient normally finds its meter ready.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::route::RoutingTable;
use crate::upstream::Protocol;

/// Minutes shown.
pub const MINUTES: usize = 30;

/// Per target, recipients per minute, oldest first.
pub type PerTarget = BTreeMap<String, Vec<u64>>;
/// Per (target, site), recipients over the window.
pub type PerSite = BTreeMap<(String, String), u64>;

/// The `result` words of `coexist_smtp_recipients_total`, in the order of a meter's
/// counter handles.
pub const RCPT_RESULTS: [&str; 6] = [
    "accepted",
    "tempfail",
    "rejected",
    "deferred",
    "unknown",
    "relay_denied",
];

/// A slot packs the minute it counts (high bits) and the count (low bits), so that
/// moving to a new minute and counting are one atomic step.
const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const MINUTE_MASK: u64 = (1 << (64 - COUNT_BITS)) - 1;

/// One (protocol, target, site): its minute slots and its counter handles.
pub struct Meter {
    protocol: Protocol,
    /// Set by the first accepted recipient: a pre-registered meter that never counted
    /// stays off the status page, one that counted stays on it (with 0 once its traffic
    /// leaves the window), as before meters were registered ahead.
    recorded: AtomicBool,
    target: Box<str>,
    site: Box<str>,
    /// Indexed by minute modulo MINUTES.
    slots: [AtomicU64; MINUTES],
    /// Registered on first use: a series appears in `/metrics` once it happened.
    counters: [OnceLock<metrics::Counter>; RCPT_RESULTS.len()],
}

impl Meter {
    fn new(protocol: Protocol, target: &str, site: &str) -> Self {
        Self {
            protocol,
            recorded: AtomicBool::new(false),
            target: target.into(),
            site: site.into(),
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            counters: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// Counts one recipient in `coexist_smtp_recipients_total` with `result`, one of
    /// [`RCPT_RESULTS`]. SMTP meters only: HTTPS requests get a family of their own.
    pub fn count(&self, result: &'static str) {
        debug_assert_eq!(self.protocol, Protocol::Smtp, "recipients are SMTP's");
        let Some(i) = RCPT_RESULTS.iter().position(|r| *r == result) else {
            debug_assert!(false, "unknown result word {result}");
            return;
        };
        self.counters[i]
            .get_or_init(|| {
                metrics::counter!(
                    crate::metric_names::SMTP_RECIPIENTS,
                    "target" => self.target.to_string(),
                    "site" => self.site.to_string(),
                    "result" => result
                )
            })
            .increment(1);
    }

    /// Counts one accepted recipient (or request) in the current minute.
    fn record(&self, minute: u64) {
        if !self.recorded.load(Ordering::Relaxed) {
            self.recorded.store(true, Ordering::Relaxed);
        }
        let minute = minute & MINUTE_MASK;
        let slot = &self.slots[(minute % MINUTES as u64) as usize];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let next = if cur >> COUNT_BITS == minute {
                cur + 1
            } else {
                (minute << COUNT_BITS) | 1
            };
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// The count of `minute`, 0 when its slot holds another minute.
    fn count_of(&self, minute: u64) -> u64 {
        let v = self.slots[(minute % MINUTES as u64) as usize].load(Ordering::Relaxed);
        if v >> COUNT_BITS == minute & MINUTE_MASK {
            v & COUNT_MASK
        } else {
            0
        }
    }
}

type Hasher = foldhash::fast::RandomState;
/// target → site → meter, per protocol. Nested so that a lookup by `&str` allocates nothing.
type Sites = HashMap<Box<str>, Arc<Meter>, Hasher>;
type Meters = [HashMap<Box<str>, Sites, Hasher>; 2];

fn slot_of(p: Protocol) -> usize {
    match p {
        Protocol::Smtp => 0,
        Protocol::Https => 1,
    }
}

/// Tables with more (target, site) pairs than this register their meters on first use
/// instead of all at once.
const MAX_PREREGISTERED: usize = 10_000;

pub struct Traffic {
    started: Instant,
    meters: ArcSwap<Meters>,
    /// Serialises the copy-and-swap of `meters` when a key is new (never on the hot path
    /// once the key exists).
    grow: Mutex<()>,
}

impl Default for Traffic {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            meters: ArcSwap::from_pointee(Meters::default()),
            grow: Mutex::new(()),
        }
    }
}

impl Traffic {
    fn minute(&self) -> u64 {
        self.started.elapsed().as_secs() / 60
    }

    /// The meter of (protocol, target, site); `-` is the site of recipients without one.
    pub fn meter(&self, protocol: Protocol, target: &str, site: &str) -> Arc<Meter> {
        if let Some(m) = self.meters.load()[slot_of(protocol)]
            .get(target)
            .and_then(|s| s.get(site))
        {
            return Arc::clone(m);
        }
        self.insert(protocol, &[(target, site)]);
        let all = self.meters.load();
        // Just inserted; meters are never removed.
        all[slot_of(protocol)]
            .get(target)
            .and_then(|s| s.get(site))
            .map_or_else(|| Arc::new(Meter::new(protocol, target, site)), Arc::clone)
    }

    /// Adds meters for the keys that have none, in one copy of the map.
    fn insert(&self, protocol: Protocol, keys: &[(&str, &str)]) {
        let _one_writer = self
            .grow
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.meters.load_full();
        let p = slot_of(protocol);
        let missing: Vec<_> = keys
            .iter()
            .filter(|(t, s)| current[p].get(*t).is_none_or(|m| !m.contains_key(*s)))
            .collect();
        if missing.is_empty() {
            return;
        }
        let mut next: Meters = (*current).clone();
        for (t, s) in missing {
            next[p]
                .entry((*t).into())
                .or_default()
                .entry((*s).into())
                .or_insert_with(|| Arc::new(Meter::new(protocol, t, s)));
        }
        self.meters.store(Arc::new(next));
    }

    /// Registers a meter for every target and site of `table` (and each target's `-`),
    /// before the table serves: its recipients then count without taking any lock.
    pub fn register_table(&self, protocol: Protocol, table: &RoutingTable) {
        let targets: Vec<&str> = table.target_names().collect();
        let sites: Vec<&str> = table
            .sites()
            .map(|s| s.name)
            .chain(std::iter::once("-"))
            .collect();
        if targets.len() * sites.len() > MAX_PREREGISTERED {
            tracing::info!(
                pairs = targets.len() * sites.len(),
                max = MAX_PREREGISTERED,
                "too many target and site pairs to register ahead; meters are added on first use"
            );
            return;
        }
        let keys: Vec<(&str, &str)> = targets
            .iter()
            .flat_map(|t| sites.iter().map(move |s| (*t, *s)))
            .collect();
        self.insert(protocol, &keys);
    }

    /// Counts one accepted recipient (or request) for `target` in `site`.
    pub fn record(&self, meter: &Meter) {
        meter.record(self.minute());
    }

    /// For `protocol`, per target: counts for the last MINUTES minutes, oldest first; and
    /// per (target, site) the total over that window — every pair that ever had traffic,
    /// with 0 once it left the window; pairs that never had any are left out.
    pub fn snapshot(&self, protocol: Protocol) -> (PerTarget, PerSite) {
        self.snapshot_at(protocol, self.minute())
    }

    fn snapshot_at(&self, protocol: Protocol, now: u64) -> (PerTarget, PerSite) {
        let mut per_target = PerTarget::new();
        let mut per_site = PerSite::new();
        let all = self.meters.load();
        for m in all[slot_of(protocol)].values().flat_map(HashMap::values) {
            let mut series = vec![0; MINUTES];
            let mut total = 0;
            for (i, v) in series.iter_mut().enumerate() {
                // Position i shows the minute `MINUTES - 1 - i` minutes ago.
                let Some(minute) = now.checked_sub((MINUTES - 1 - i) as u64) else {
                    continue; // before the proxy started
                };
                *v = m.count_of(minute);
                total += *v;
            }
            if !m.recorded.load(Ordering::Relaxed) {
                continue;
            }
            let t = per_target
                .entry(m.target.to_string())
                .or_insert_with(|| vec![0; MINUTES]);
            for (a, b) in t.iter_mut().zip(&series) {
                *a += b;
            }
            per_site.insert((m.target.to_string(), m.site.to_string()), total);
        }
        (per_target, per_site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_the_current_minute() {
        let t = Traffic::default();
        let paris = t.meter(Protocol::Smtp, "new", "paris");
        t.record(&paris);
        t.record(&t.meter(Protocol::Smtp, "new", "paris"));
        t.record(&t.meter(Protocol::Smtp, "old", "berlin"));
        let (per_target, per_site) = t.snapshot(Protocol::Smtp);
        assert_eq!(per_target["new"].last(), Some(&2));
        assert_eq!(per_target["old"].iter().sum::<u64>(), 1);
        assert_eq!(per_site[&("new".to_string(), "paris".to_string())], 2);
        // Per protocol.
        assert!(t.snapshot(Protocol::Https).0.is_empty());
        t.record(&t.meter(Protocol::Https, "new", "paris"));
        assert_eq!(t.snapshot(Protocol::Https).0["new"].last(), Some(&1));
        assert_eq!(t.snapshot(Protocol::Smtp).0["new"].last(), Some(&2));
    }

    #[test]
    fn registered_meters_show_once_they_counted() {
        let t = Traffic::default();
        let idle = t.meter(Protocol::Smtp, "old", "berlin");
        assert!(
            t.snapshot_at(Protocol::Smtp, 60).1.is_empty(),
            "never counted: not listed"
        );
        // Counted in minute 0, seen at minute 60 (outside the window): listed with 0, as
        // before.
        idle.record(0);
        let (per_target, per_site) = t.snapshot_at(Protocol::Smtp, 60);
        assert_eq!(per_site[&("old".to_string(), "berlin".to_string())], 0);
        assert_eq!(per_target["old"].iter().sum::<u64>(), 0);
    }

    #[test]
    fn a_slot_restarts_when_its_minute_comes_round_again() {
        let m = Meter::new(Protocol::Smtp, "old", "-");
        m.record(3);
        m.record(3);
        assert_eq!(m.count_of(3), 2);
        // Minute 33 shares minute 3's slot: it starts from 1, and minute 3 reads 0.
        m.record(33);
        assert_eq!(m.count_of(33), 1);
        assert_eq!(m.count_of(3), 0);
    }

    #[test]
    fn concurrent_counts_are_all_kept() {
        let m = Arc::new(Meter::new(Protocol::Smtp, "old", "-"));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        m.record(7);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.count_of(7), 40_000);
    }

    #[test]
    fn a_table_registers_its_meters_ahead() {
        let known = crate::route::KnownTargets::Exactly(vec!["old".into(), "new".into()]);
        let table = crate::route::load_routes_text(
            std::path::Path::new("r.toml"),
            "[domains.\"example.com\"]\nunknown = \"old\"\n[sites.paris]\nowner = \"new\"\n\
             [[mailbox]]\naddress = \"a@example.com\"\nsite = \"paris\"\n",
            &known,
        )
        .unwrap();
        let t = Traffic::default();
        t.register_table(Protocol::Smtp, &table);
        let before = t.meters.load_full();
        let m = t.meter(Protocol::Smtp, "new", "paris");
        let _ = t.meter(Protocol::Smtp, "old", "-");
        assert!(
            Arc::ptr_eq(&before, &t.meters.load_full()),
            "a registered key must not copy the map"
        );
        assert!(Arc::ptr_eq(&m, &t.meter(Protocol::Smtp, "new", "paris")));
    }
}
