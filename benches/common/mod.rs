//! Synthetic migration data for the benches: N mailboxes with two aliases each (the
//! workload the routing-table issue names) or, `full`, also a GUID and a login each;
//! spread over 4 domains and 200 sites, 1% pilot users with their own owner.

#![allow(dead_code)] // each bench uses a part of this module
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

pub const DOMAINS: [&str; 4] = [
    "example.com",
    "corp.example.net",
    "mail.example.org",
    "example.de",
];
pub const SITES: usize = 200;

/// A small deterministic PRNG (xorshift64*), so runs are comparable.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub fn primary(i: usize) -> String {
    format!("user.{i:07}@{}", DOMAINS[i % DOMAINS.len()])
}

pub fn aliases(i: usize) -> [String; 2] {
    let d = DOMAINS[i % DOMAINS.len()];
    [format!("u{i:07}.alias@{d}"), format!("first{i}.last@{d}")]
}

/// Writes `routes.toml` + `mailboxes.csv` for `n` mailboxes; `flip` moves every site to the
/// other owner (a second, different table of the same size).
pub fn generate(dir: &Path, n: usize, flip: bool, full: bool) -> PathBuf {
    let mut routes = String::new();
    for d in DOMAINS {
        writeln!(routes, "[domains.\"{d}\"]\nunknown = \"old\"").unwrap();
    }
    let owner = |s: usize| {
        if s.is_multiple_of(2) ^ flip {
            "old"
        } else {
            "new"
        }
    };
    for s in 0..SITES {
        writeln!(routes, "[sites.site{s:03}]\nowner = \"{}\"", owner(s)).unwrap();
    }
    routes.push_str("[import]\ncsv = [\"mailboxes.csv\"]\n");
    let routes_path = dir.join("routes.toml");
    std::fs::write(&routes_path, routes).unwrap();

    let f = std::fs::File::create(dir.join("mailboxes.csv")).unwrap();
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    writeln!(w, "address,aliases,site,owner,guid,logins").unwrap();
    let mut rng = Rng::new(42);
    for i in 0..n {
        let [a1, a2] = aliases(i);
        let pilot = if rng.below(100) == 0 { "new" } else { "" };
        let guid = u128::from(rng.next()) << 64 | u128::from(rng.next()) | 1;
        write!(w, "{},{a1};{a2},site{:03},{pilot},", primary(i), i % SITES).unwrap();
        if full {
            writeln!(w, "{},CORP\\user{i:07}", uuid::Uuid::from_u128(guid)).unwrap();
        } else {
            writeln!(w, ",").unwrap();
        }
    }
    w.flush().unwrap();
    routes_path
}

/// Lookup keys: hits (primary and aliases, in mixed case) and misses in routed domains.
pub fn keys(n: usize, count: usize, hits: bool) -> Vec<String> {
    let mut rng = Rng::new(7);
    (0..count)
        .map(|_| {
            let i = rng.below(n);
            if !hits {
                return format!("nobody.{i}@{}", DOMAINS[i % DOMAINS.len()]);
            }
            match rng.below(3) {
                0 => primary(i),
                1 => aliases(i)[0].to_uppercase(),
                _ => aliases(i)[1].clone(),
            }
        })
        .collect()
}

pub fn targets() -> coexist::route::KnownTargets {
    coexist::route::KnownTargets::Exactly(vec!["old".into(), "new".into()])
}

/// Resident set size of this process, from /proc (Linux).
pub fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Resident set size of another process, from /proc (Linux).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}
