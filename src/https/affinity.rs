//! Which of a target's HTTPS servers serves a mailbox: rendezvous (highest random weight)
//! hashing of the mailbox over the healthy servers (SPEC §5.2).
//!
//! Each server scores `xxh3(mailbox)` seeded with `xxh3(server name)`; the highest score
//! wins. So the two channels of an RPC over HTTP session (`RPC_IN_DATA`, `RPC_OUT_DATA`,
//! separate TCP connections, each with its own login) and the requests of an EWS streaming
//! subscription land on the same server without shared state; every coexist instance picks
//! the same server (the hash is fixed, never randomly seeded); and when a server leaves or
//! goes down only its own mailboxes move, each to its next-best server, while everyone
//! else stays put (a modulo over the list would reshuffle nearly all).

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// The server for `key` among the `healthy` ones of `servers`, by rendezvous hashing over
/// their `name`s; `None` when no server is healthy (the caller answers `503` with
/// `Retry-After`, rather than send a client to a server known to be down; a server not
/// probed yet should count as healthy, as it does for SMTP).
///
/// `key` should be the mailbox's stable identity (its primary address as the routing table
/// stores it), not the hint a request happened to carry, so that every alias and login of
/// one mailbox picks the same server. The order of `servers` does not matter; equal scores
/// (equal names) go to the greater name, then to the first listed.
pub fn pick<'a, S>(
    key: &str,
    servers: &'a [S],
    name: impl Fn(&S) -> &str,
    healthy: impl Fn(&S) -> bool,
) -> Option<&'a S> {
    let mut best: Option<(u64, &str, &S)> = None;
    for s in servers.iter().filter(|s| healthy(s)) {
        let n = name(s);
        let score = xxh3_64_with_seed(key.as_bytes(), xxh3_64(n.as_bytes()));
        if best.is_none_or(|(b, bn, _)| (score, n) > (b, bn)) {
            best = Some((score, n, s));
        }
    }
    best.map(|(_, _, s)| s)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Server {
        addr: &'static str,
        up: bool,
    }

    fn servers(addrs: &[&'static str]) -> Vec<Server> {
        addrs.iter().map(|addr| Server { addr, up: true }).collect()
    }

    fn of<'a>(key: &str, list: &'a [Server]) -> Option<&'a str> {
        pick(key, list, |s| s.addr, |s| s.up).map(|s| s.addr)
    }

    fn keys() -> impl Iterator<Item = String> {
        (0..10_000).map(|i| format!("user{i}@contoso.com"))
    }

    const THREE: [&str; 3] = [
        "ex2019-a.corp:443",
        "ex2019-b.corp:443",
        "ex2019-c.corp:443",
    ];

    #[test]
    fn the_same_key_picks_the_same_server_whatever_the_order() {
        let list = servers(&THREE);
        let reversed = servers(&[
            "ex2019-c.corp:443",
            "ex2019-b.corp:443",
            "ex2019-a.corp:443",
        ]);
        for k in keys().take(1000) {
            let a = of(&k, &list);
            assert!(a.is_some());
            assert_eq!(a, of(&k, &list));
            assert_eq!(a, of(&k, &reversed), "{k}");
        }
        // Fixed across builds and instances: no random seed anywhere.
        let picks: Vec<_> = ["jdoe@contoso.com", "carol@example.com", "frank@example.com"]
            .iter()
            .map(|k| of(k, &list).unwrap())
            .collect();
        assert_eq!(
            picks,
            pinned_picks(),
            "the hash changed: every instance must agree"
        );
    }

    /// Recorded once; a change here means coexist instances of two versions would send one
    /// mailbox to two servers during a rolling upgrade.
    fn pinned_picks() -> Vec<&'static str> {
        vec![
            "ex2019-a.corp:443",
            "ex2019-c.corp:443",
            "ex2019-b.corp:443",
        ]
    }

    #[test]
    fn keys_spread_roughly_evenly() {
        let list = servers(&THREE);
        let mut count: HashMap<&str, usize> = HashMap::new();
        for k in keys() {
            *count.entry(of(&k, &list).unwrap()).or_default() += 1;
        }
        for addr in THREE {
            // 3333 expected; a fair hash stays within a few percent.
            assert!((3000..3700).contains(&count[addr]), "{count:?}");
        }
    }

    #[test]
    fn a_server_leaving_moves_only_its_own_keys() {
        let all = servers(&THREE);
        let without_b = servers(&[THREE[0], THREE[2]]);
        let mut moved = 0;
        for k in keys() {
            let before = of(&k, &all).unwrap();
            let after = of(&k, &without_b).unwrap();
            if before == THREE[1] {
                moved += 1;
            } else {
                assert_eq!(before, after, "{k} moved though its server stayed");
            }
        }
        assert!(moved > 3000, "{moved}");

        // And a server joining takes keys only for itself.
        let four = servers(&[THREE[0], THREE[1], THREE[2], "ex2019-d.corp:443"]);
        for k in keys() {
            let after = of(&k, &four).unwrap();
            assert!(after == "ex2019-d.corp:443" || after == of(&k, &all).unwrap());
        }
    }

    #[test]
    fn unhealthy_servers_are_skipped_like_absent_ones() {
        let mut list = servers(&THREE);
        list[1].up = false;
        let without_b = servers(&[THREE[0], THREE[2]]);
        for k in keys().take(2000) {
            assert_eq!(of(&k, &list), of(&k, &without_b));
        }
        for s in &mut list {
            s.up = false;
        }
        assert_eq!(of("jdoe@contoso.com", &list), None);
    }

    #[test]
    fn no_servers_no_pick() {
        assert_eq!(of("jdoe@contoso.com", &[]), None);
        let one = servers(&["solo:443"]);
        assert_eq!(of("", &one), Some("solo:443"));
    }
}
