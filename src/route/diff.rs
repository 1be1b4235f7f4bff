//! What changes between two routing tables: who moves where.
//!
//! Mailboxes are matched by primary address; a mailbox whose primary address changed shows
//! as one removed and one added. Site owner changes are listed even when no mailbox of the
//! site moves (every mailbox there might be a pilot with its own owner).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

use super::table::{RoutingTable, Version};

/// One mailbox that changes owner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Moved {
    pub address: String,
    pub site: String,
    pub from: String,
    pub to: String,
}

/// Per site: its owner in each table and how many of its mailboxes move from → to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SiteChange {
    pub site: String,
    pub owner_from: Option<String>,
    pub owner_to: Option<String>,
    /// `(from, to) → count`
    pub moves: Vec<MoveCount>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MoveCount {
    pub from: String,
    pub to: String,
    pub mailboxes: u64,
}

/// Per target: mailboxes gained and lost by owner changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetChange {
    pub target: String,
    pub gained: u64,
    pub lost: u64,
}

/// A domain whose `unknown` rule changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DomainChange {
    pub domain: String,
    pub unknown_from: Option<String>,
    pub unknown_to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableDiff {
    pub from: Version,
    pub to: Version,
    pub sites: Vec<SiteChange>,
    pub targets: Vec<TargetChange>,
    pub domains: Vec<DomainChange>,
    pub moved_total: u64,
    /// The first `limit` moved mailboxes (all of them when unbounded), in table order.
    pub moved: Vec<Moved>,
    pub added: u64,
    pub removed: u64,
}

impl TableDiff {
    /// The diff of a version with itself: nothing moves.
    pub fn none(v: Version) -> Self {
        TableDiff {
            from: v,
            to: v,
            sites: Vec::new(),
            targets: Vec::new(),
            domains: Vec::new(),
            moved_total: 0,
            moved: Vec::new(),
            added: 0,
            removed: 0,
        }
    }

    /// Compares `a` (before) with `b` (after), keeping at most `limit` moved mailboxes in
    /// the list (`None`: all).
    pub fn between(a: &RoutingTable, b: &RoutingTable, limit: Option<usize>) -> Self {
        let mut site_moves: BTreeMap<&str, BTreeMap<(&str, &str), u64>> = BTreeMap::new();
        let mut gained: BTreeMap<&str, u64> = BTreeMap::new();
        let mut lost: BTreeMap<&str, u64> = BTreeMap::new();
        let mut moved = Vec::new();
        let mut moved_total = 0u64;
        let mut removed = 0u64;
        for ma in a.mailboxes() {
            let Some(mb) = b.mailbox_by_key(ma.address()) else {
                removed += 1;
                continue;
            };
            if mb.address() != ma.address() {
                // The old primary is now an alias of another mailbox: a different mailbox.
                removed += 1;
                continue;
            }
            let (from, to) = (ma.owner_name(), mb.owner_name());
            if from == to {
                continue;
            }
            moved_total += 1;
            *site_moves
                .entry(mb.site())
                .or_default()
                .entry((from, to))
                .or_default() += 1;
            *gained.entry(to).or_default() += 1;
            *lost.entry(from).or_default() += 1;
            if limit.is_none_or(|l| moved.len() < l) {
                moved.push(Moved {
                    address: mb.address().to_string(),
                    site: mb.site().to_string(),
                    from: from.to_string(),
                    to: to.to_string(),
                });
            }
        }
        let added = b
            .mailboxes()
            .filter(|mb| {
                a.mailbox_by_key(mb.address())
                    .is_none_or(|ma| ma.address() != mb.address())
            })
            .count() as u64;

        let mut site_names: Vec<&str> = a.sites().map(|s| s.name).collect();
        site_names.extend(b.sites().map(|s| s.name));
        site_names.sort_unstable();
        site_names.dedup();
        let sites = site_names
            .into_iter()
            .filter_map(|name| {
                let (of, ot) = (a.site_owner(name), b.site_owner(name));
                let moves = site_moves.remove(name).unwrap_or_default();
                (of != ot || !moves.is_empty()).then(|| SiteChange {
                    site: name.to_string(),
                    owner_from: of.map(str::to_string),
                    owner_to: ot.map(str::to_string),
                    moves: moves
                        .into_iter()
                        .map(|((from, to), n)| MoveCount {
                            from: from.to_string(),
                            to: to.to_string(),
                            mailboxes: n,
                        })
                        .collect(),
                })
            })
            .collect();

        let mut target_names: Vec<&str> = gained.keys().chain(lost.keys()).copied().collect();
        target_names.sort_unstable();
        target_names.dedup();
        let targets = target_names
            .into_iter()
            .map(|t| TargetChange {
                target: t.to_string(),
                gained: gained.get(t).copied().unwrap_or(0),
                lost: lost.get(t).copied().unwrap_or(0),
            })
            .collect();

        let a_domains: BTreeMap<&str, &str> = a.domains().map(|d| (d.name, d.unknown)).collect();
        let b_domains: BTreeMap<&str, &str> = b.domains().map(|d| (d.name, d.unknown)).collect();
        let mut domain_names: Vec<&str> =
            a_domains.keys().chain(b_domains.keys()).copied().collect();
        domain_names.sort_unstable();
        domain_names.dedup();
        let domains = domain_names
            .into_iter()
            .filter_map(|d| {
                let (f, t) = (a_domains.get(d).copied(), b_domains.get(d).copied());
                (f != t).then(|| DomainChange {
                    domain: d.to_string(),
                    unknown_from: f.map(str::to_string),
                    unknown_to: t.map(str::to_string),
                })
            })
            .collect();

        TableDiff {
            from: a.version(),
            to: b.version(),
            sites,
            targets,
            domains,
            moved_total,
            moved,
            added,
            removed,
        }
    }

    /// True when no mailbox, site or domain changes its route.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
            && self.domains.is_empty()
            && self.moved_total == 0
            && self.added == 0
            && self.removed == 0
    }
}

fn opt(s: Option<&String>) -> &str {
    s.map_or("(none)", String::as_str)
}

impl fmt::Display for TableDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "diff {} -> {}", self.from, self.to)?;
        if self.is_empty() {
            return writeln!(f, "no routing changes");
        }
        if !self.sites.is_empty() {
            writeln!(f, "sites:")?;
            for s in &self.sites {
                let mut moves = String::new();
                for m in &s.moves {
                    let _ = write!(moves, ", {} -> {}: {}", m.from, m.to, m.mailboxes);
                }
                let owner = if s.owner_from == s.owner_to {
                    format!("owner {} (unchanged)", opt(s.owner_from.as_ref()))
                } else {
                    format!(
                        "owner {} -> {}",
                        opt(s.owner_from.as_ref()),
                        opt(s.owner_to.as_ref())
                    )
                };
                writeln!(f, "  {:<20} {owner}{moves}", s.site)?;
            }
        }
        if !self.targets.is_empty() {
            writeln!(f, "targets:")?;
            for t in &self.targets {
                writeln!(f, "  {:<20} +{} -{}", t.target, t.gained, t.lost)?;
            }
        }
        if !self.domains.is_empty() {
            writeln!(f, "domains (unknown addresses):")?;
            for d in &self.domains {
                writeln!(
                    f,
                    "  {:<20} {} -> {}",
                    d.domain,
                    opt(d.unknown_from.as_ref()),
                    opt(d.unknown_to.as_ref())
                )?;
            }
        }
        writeln!(
            f,
            "mailboxes: {} moved, {} added, {} removed",
            self.moved_total, self.added, self.removed
        )?;
        for m in &self.moved {
            writeln!(
                f,
                "  {:<40} {:<16} {} -> {}",
                m.address, m.site, m.from, m.to
            )?;
        }
        let hidden = self.moved_total.saturating_sub(self.moved.len() as u64);
        if hidden > 0 {
            writeln!(f, "  … {hidden} more (--all lists every one)")?;
        }
        Ok(())
    }
}
