//! Route lookups and admin API inputs on hostile input: addresses, logins and GUID strings
//! of any shape, query values and request bodies never panic, and a lookup is stable (same
//! input, same answer).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use coexist::route::{KnownTargets, RoutingTable, explain, load_routes_text};
use libfuzzer_sys::fuzz_target;

const ROUTES: &str = r#"
[domains."example.com"]
unknown = "old"
[domains."bücher.example"]
unknown = "reject"
case_sensitive = true
subaddress_separator = "+-"
[sites.paris]
owner = "new"
[[mailbox]]
address = "alice@example.com"
aliases = ["a.b+c@example.com", "müller@bücher.example"]
site = "paris"
guid = "7c9f8b2e-3c1a-4d5e-9f00-1a2b3c4d5e6f"
logins = ["EXAMPLE\\alice", "alice@corp.example.com"]
"#;

fn table() -> &'static RoutingTable {
    static T: OnceLock<RoutingTable> = OnceLock::new();
    T.get_or_init(|| {
        load_routes_text(Path::new("fuzz.toml"), ROUTES, &KnownTargets::Any).expect("valid sample")
    })
}

fuzz_target!(|data: &[u8]| {
    // An admin request body (cutover / rollback).
    let _ = serde_json::from_slice::<coexist::control::Change>(data);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // A `/lookup?address=` value, decoded, then looked up like the API does.
    let decoded = coexist::admin::percent_decode(s);
    let _ = explain(table(), &decoded);
    let t = table();
    let a = explain(t, s);
    let b = explain(t, s);
    assert_eq!(a, b);
    let _ = t.lookup_login(s);
    let _ = t.lookup(s).target();
});
