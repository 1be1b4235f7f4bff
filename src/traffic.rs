//! Recent traffic per target and site, for the status page: accepted recipients per minute
//! over the last half hour, kept in memory (Prometheus has the long-term counters).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

/// Minutes shown.
pub const MINUTES: usize = 30;

/// The colour of the `i`-th target on the status page (chart lines and bars alike).
pub fn color(i: usize) -> &'static str {
    const COLORS: [&str; 6] = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    COLORS[i % COLORS.len()]
}

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

    /// A small line chart of recipients per minute per target, as inline SVG. `targets`
    /// gives the order, and so the colours ([`color`]), that the rest of the page uses.
    pub fn svg(&self, targets: &[&str]) -> String {
        const W: f64 = 600.0;
        const H: f64 = 160.0;
        let (mut per_target, _) = self.snapshot();
        // Every target in the legend, in the page's order, with or without traffic.
        let mut ordered: Vec<(String, Vec<u64>)> = targets
            .iter()
            .map(|t| {
                let series = per_target.remove(*t).unwrap_or_else(|| vec![0; MINUTES]);
                ((*t).to_string(), series)
            })
            .collect();
        ordered.extend(per_target);
        let per_target = ordered;
        let max = per_target
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" role=\"img\" \
             aria-label=\"recipients per minute per target\">\
             <rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"#fafafa\" stroke=\"#ccc\"/>\
             <text x=\"4\" y=\"12\" font-size=\"11\">{max}/min</text>\
             <text x=\"4\" y=\"{}\" font-size=\"11\">-{MINUTES} min</text>\
             <text x=\"{}\" y=\"{}\" font-size=\"11\">now</text>",
            H + 30.0,
            H + 14.0,
            W - 28.0,
            H + 14.0
        );
        for (i, (target, series)) in per_target.iter().enumerate() {
            let color = color(i);
            let points: Vec<String> = series
                .iter()
                .enumerate()
                .map(|(x, v)| {
                    let px = x as f64 * W / (MINUTES - 1) as f64;
                    let py = H - (*v as f64) * (H - 16.0) / max as f64;
                    format!("{px:.1},{py:.1}")
                })
                .collect();
            let _ = write!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\
                 <text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"{color}\">{}</text>",
                points.join(" "),
                80 + i * 90,
                H + 28.0,
                crate::admin::esc(target)
            );
        }
        s.push_str("</svg>");
        s
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
        let svg = t.svg(&["old", "new"]);
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains(">new<"));
    }
}
