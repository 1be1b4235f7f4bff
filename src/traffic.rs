//! Recent traffic per target and site, for the status page: accepted recipients per minute
//! over the last half hour, kept in memory (Prometheus has the long-term counters).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// Minutes shown.
pub const MINUTES: usize = 30;

/// Per target, recipients per minute, oldest first.
pub type PerTarget = BTreeMap<String, Vec<u64>>;
/// Per (target, site), recipients over the window.
pub type PerSite = BTreeMap<(String, String), u64>;

type Rings = BTreeMap<String, BTreeMap<String, [Slot; MINUTES]>>;

#[derive(Clone, Copy, Default)]
struct Slot {
    minute: u64,
    count: u64,
}

pub struct Traffic {
    started: Instant,
    /// target → site → a ring of per-minute counts, indexed by minute modulo MINUTES.
    /// Nested so that counting a recipient looks keys up by `&str`, allocating nothing.
    rings: Mutex<Rings>,
}

impl Default for Traffic {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            rings: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Traffic {
    fn minute(&self) -> u64 {
        self.started.elapsed().as_secs() / 60
    }

    fn rings(&self) -> std::sync::MutexGuard<'_, Rings> {
        self.rings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one recipient accepted for `target` in `site` (`-` when it has none).
    pub fn record(&self, target: &str, site: &str) {
        let now = self.minute();
        let mut rings = self.rings();
        let sites = match rings.get_mut(target) {
            Some(s) => s,
            None => rings.entry(target.to_string()).or_default(),
        };
        let ring = match sites.get_mut(site) {
            Some(r) => r,
            None => sites
                .entry(site.to_string())
                .or_insert([Slot::default(); MINUTES]),
        };
        let slot = &mut ring[(now % MINUTES as u64) as usize];
        if slot.minute != now {
            *slot = Slot {
                minute: now,
                count: 0,
            };
        }
        slot.count += 1;
    }

    /// Per target: counts for the last MINUTES minutes, oldest first; and per (target, site)
    /// the total over that window.
    pub fn snapshot(&self) -> (PerTarget, PerSite) {
        let now = self.minute();
        let mut per_target = PerTarget::new();
        let mut per_site = BTreeMap::new();
        let rings = self.rings();
        for (target, site, ring) in rings
            .iter()
            .flat_map(|(t, sites)| sites.iter().map(move |(s, r)| (t, s, r)))
        {
            let series = per_target
                .entry(target.clone())
                .or_insert_with(|| vec![0; MINUTES]);
            let mut total = 0;
            for (i, v) in series.iter_mut().enumerate() {
                // Position i shows the minute `MINUTES - 1 - i` minutes ago.
                let Some(minute) = now.checked_sub((MINUTES - 1 - i) as u64) else {
                    continue; // before the proxy started
                };
                let slot = ring[(minute % MINUTES as u64) as usize];
                if slot.minute == minute {
                    *v += slot.count;
                    total += slot.count;
                }
            }
            per_site.insert((target.clone(), site.clone()), total);
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
        t.record("new", "paris");
        t.record("new", "paris");
        t.record("old", "berlin");
        let (per_target, per_site) = t.snapshot();
        assert_eq!(per_target["new"].last(), Some(&2));
        assert_eq!(per_target["old"].iter().sum::<u64>(), 1);
        assert_eq!(per_site[&("new".to_string(), "paris".to_string())], 2);
    }
}
