//! The routing table through its public API: sources on disk → compiled table → lookups,
//! validation errors, versions, diff.

use std::path::{Path, PathBuf};

use coexist::route::{KnownTargets, Route, RoutingTable, TableDiff, load_routes};

fn targets() -> KnownTargets {
    KnownTargets::Exactly(vec!["old".into(), "new".into()])
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load(text: &str, csv: Option<&str>) -> Result<RoutingTable, String> {
    let dir = tempfile::tempdir().unwrap();
    if let Some(csv) = csv {
        write(dir.path(), "m.csv", csv);
    }
    let p = write(dir.path(), "routes.toml", text);
    load_routes(&p, &targets()).map_err(|e| {
        // Paths differ per run; tests compare the part after the directory.
        e.to_string()
            .replace(&format!("{}/", dir.path().display()), "")
    })
}

const BASE: &str = r#"
[domains."example.com"]
unknown = "old"
[domains."example.org"]
unknown = "reject"
[domains."strict.example"]
unknown = "old"
case_sensitive = true
subaddress_separator = "-"
[domains."bücher.example"]
unknown = "new"

[sites.paris]
owner = "new"
[sites.berlin]
owner = "old"

[[mailbox]]
address = "alice@example.com"
aliases = ["Alice.Smith@example.com"]
site = "paris"
guid = "7c9f8b2e-3c1a-4d5e-9f00-1a2b3c4d5e6f"
logins = ["EXAMPLE\\alice", "alice@corp.example.com"]

[[mailbox]]
address = "bob@example.com"
site = "berlin"
owner = "new"

[[mailbox]]
address = "Joe@strict.example"
site = "berlin"

[[mailbox]]
address = "a+b@example.com"
site = "berlin"

[[mailbox]]
address = "müller@bücher.example"
site = "berlin"
"#;

fn owner_of(t: &RoutingTable, addr: &str) -> String {
    match t.lookup(addr) {
        Route::Mailbox(m) => format!("{} {} {}", m.address(), m.site(), m.owner_name()),
        Route::DomainDefault { domain, target } => {
            format!("default {domain} {}", t.target_name(target))
        }
        Route::Reject { domain } => format!("reject {domain}"),
        Route::NotOurs => "not ours".into(),
    }
}

#[test]
fn lookups_by_every_key() {
    let t = load(BASE, None).unwrap();
    assert_eq!(
        owner_of(&t, "alice@example.com"),
        "alice@example.com paris new"
    );
    assert_eq!(
        owner_of(&t, "ALICE@Example.COM"),
        "alice@example.com paris new"
    );
    assert_eq!(
        owner_of(&t, "alice.smith@example.com"),
        "alice@example.com paris new"
    );
    assert_eq!(
        owner_of(&t, "alice+lists@example.com"),
        "alice@example.com paris new"
    );
    assert_eq!(
        owner_of(&t, "Alice.Smith+x@EXAMPLE.com."),
        "alice@example.com paris new"
    );
    // A pilot user's own owner beats the site's.
    assert_eq!(
        owner_of(&t, "bob@example.com"),
        "bob@example.com berlin new"
    );
    // An exact mailbox with a '+' wins over subaddress stripping.
    assert_eq!(
        owner_of(&t, "a+b@example.com"),
        "a+b@example.com berlin old"
    );
    assert_eq!(owner_of(&t, "a+c@example.com"), "default example.com old");
    // Unknown rules and foreign domains.
    assert_eq!(
        owner_of(&t, "nobody@example.com"),
        "default example.com old"
    );
    assert_eq!(owner_of(&t, "nobody@example.org"), "reject example.org");
    assert_eq!(owner_of(&t, "x@gmail.com"), "not ours");
    assert_eq!(owner_of(&t, "no-at-sign"), "not ours");
    assert_eq!(owner_of(&t, "x@sub.example.com"), "not ours");
    // Per-domain policy: case-sensitive local parts, '-' as separator.
    assert_eq!(
        owner_of(&t, "Joe@strict.example"),
        "Joe@strict.example berlin old"
    );
    assert_eq!(
        owner_of(&t, "Joe-tag@STRICT.example"),
        "Joe@strict.example berlin old"
    );
    assert_eq!(
        owner_of(&t, "joe@strict.example"),
        "default strict.example old"
    );
    assert_eq!(
        owner_of(&t, "Joe+tag@strict.example"),
        "default strict.example old"
    );
    // IDN domains and SMTPUTF8 local parts: U-label and A-label are one domain.
    assert_eq!(
        owner_of(&t, "MÜLLER@xn--bcher-kva.example"),
        "müller@xn--bcher-kva.example berlin old"
    );
    assert_eq!(
        owner_of(&t, "müller@BÜCHER.example"),
        "müller@xn--bcher-kva.example berlin old"
    );

    let g = uuid::Uuid::parse_str("7C9F8B2E-3C1A-4D5E-9F00-1A2B3C4D5E6F").unwrap();
    assert_eq!(t.lookup_guid(g).unwrap().address(), "alice@example.com");
    assert!(t.lookup_guid(uuid::Uuid::from_u128(5)).is_none());
    assert_eq!(
        t.lookup_login("example\\ALICE").unwrap().address(),
        "alice@example.com"
    );
    assert_eq!(
        t.lookup_login("Alice@Corp.Example.com").unwrap().address(),
        "alice@example.com"
    );
    assert!(t.lookup_login("EXAMPLE\\bob").is_none());
}

#[test]
fn a_domain_alone_routes_as_an_address_that_names_no_mailbox() {
    let t = load(BASE, None).unwrap();
    let route = |d: &str| match t.lookup_domain(d) {
        Route::DomainDefault { domain, target } => {
            format!("default {domain} {}", t.target_name(target))
        }
        Route::Reject { domain } => format!("reject {domain}"),
        Route::Mailbox(m) => format!("mailbox {}", m.address()),
        Route::NotOurs => "not ours".into(),
    };
    assert_eq!(route("Example.COM."), "default example.com old");
    assert_eq!(route("BÜCHER.example"), "default xn--bcher-kva.example new");
    assert_eq!(route("example.org"), "reject example.org");
    assert_eq!(route("sub.example.com"), "not ours");
    assert_eq!(route(""), "not ours");
}

#[test]
fn csv_imports_join_the_table() {
    let routes = format!("{BASE}\n[import]\ncsv = [\"m.csv\"]\n");
    let csv = "#TYPE Selected.Mailbox\n\
               PrimarySmtpAddress,EmailAddresses,Site,Owner,ExchangeGuid,UserPrincipalName\n\
               carol@example.com,SMTP:carol@example.com;smtp:c.jones@example.com;X500:/o=X/cn=c,berlin,,{2f1e4c8a-9b3d-4e6f-8a1b-0c2d3e4f5a6b},carol@corp.example.com\n\
               \"dave@example.com\",\"d1@example.com;d2@example.org\",paris,old,,\n";
    let t = load(&routes, Some(csv)).unwrap();
    assert_eq!(t.mailbox_count(), 7);
    assert_eq!(
        owner_of(&t, "c.jones@example.com"),
        "carol@example.com berlin old"
    );
    assert_eq!(owner_of(&t, "d2@example.org"), "dave@example.com paris old");
    let g = uuid::Uuid::parse_str("2f1e4c8a-9b3d-4e6f-8a1b-0c2d3e4f5a6b").unwrap();
    assert_eq!(t.lookup_guid(g).unwrap().address(), "carol@example.com");
    assert_eq!(
        t.lookup_login("carol@corp.example.com").unwrap().address(),
        "carol@example.com"
    );
}

#[test]
fn every_error_is_reported_with_its_line() {
    let routes = r#"[domains."example.com"]
unknown = "old"
[domains."bad..domain"]
unknown = "old"
[domains."example.net"]
unknown = "sideways"

[sites.paris]
owner = "new"
[sites.empty]
owner = "old"
[sites.rome]
owner = "moon"

[[mailbox]]
address = "alice@example.com"
site = "paris"
guid = "7c9f8b2e-3c1a-4d5e-9f00-1a2b3c4d5e6f"

[[mailbox]]
address = "ALICE@example.com"
site = "paris"

[[mailbox]]
address = "bob@example.com"
aliases = ["not an address", "bob@elsewhere.com"]
site = "lyon"
owner = "mars"
guid = "xyz"

[import]
csv = ["m.csv", "missing.csv"]
"#;
    let csv = "address,aliases,site,owner,guid,logins\n\
               carol@example.com,,paris,,7c9f8b2e-3c1a-4d5e-9f00-1a2b3c4d5e6f,\n\
               dave@example.com,,paris\n\
               erin@example.com,alice@example.com,paris,,,\n";
    let err = load(routes, Some(csv)).unwrap_err();
    let expected = [
        "routes.toml:3: domain \"bad..domain\": invalid domain: empty label in \"bad..domain\"",
        "routes.toml:6: unknown target \"sideways\" (known targets: old, new)",
        "routes.toml:10: site \"empty\" has no mailboxes",
        // rome's bad owner does not hide that it is empty too.
        "routes.toml:12: site \"rome\" has no mailboxes",
        "routes.toml:13: unknown target \"moon\" (known targets: old, new)",
        "routes.toml:21: address \"alice@example.com\" is already claimed by mailbox alice@example.com (routes.toml:16)",
        "routes.toml:26: alias \"not an address\": not an address (missing '@')",
        "routes.toml:26: alias \"bob@elsewhere.com\": domain \"elsewhere.com\" is not routed (add [domains.\"elsewhere.com\"])",
        "routes.toml:27: unknown site \"lyon\"",
        "routes.toml:28: unknown target \"mars\" (known targets: old, new)",
        "routes.toml:29: guid \"xyz\": not a GUID (expected 8-4-4-4-12 hex digits)",
        "routes.toml:32: cannot read missing.csv: No such file or directory (os error 2)",
        "m.csv:2: guid 7c9f8b2e-3c1a-4d5e-9f00-1a2b3c4d5e6f is already claimed by mailbox alice@example.com (routes.toml:16)",
        "m.csv:3: expected 6 columns, found 3",
        "m.csv:4: alias \"alice@example.com\" is already claimed by mailbox alice@example.com (routes.toml:16)",
    ];
    let got: Vec<&str> = err.lines().collect();
    assert_eq!(got, expected, "\n{err}");
}

#[test]
fn toml_and_csv_syntax_errors_have_lines() {
    let err = load("[domains.\"example.com\"]\nunknown = \n", None).unwrap_err();
    assert!(err.starts_with("routes.toml:2: "), "{err}");
    let err = load(
        "[domains.\"example.com\"]\nunknown = \"old\"\ncolour = 1\n",
        None,
    )
    .unwrap_err();
    assert!(
        err.starts_with("routes.toml:3: unknown field `colour`"),
        "{err}"
    );
    let routes = "[domains.\"example.com\"]\nunknown = \"old\"\n[sites.s]\nowner = \"old\"\n\
                  [[mailbox]]\naddress = \"a@example.com\"\nsite = \"s\"\n[import]\ncsv = [\"m.csv\"]\n";
    let err = load(routes, Some("address,site,colour\n")).unwrap_err();
    assert!(
        err.starts_with("m.csv:1: unknown column \"colour\""),
        "{err}"
    );
    let err = load(routes, Some("aliases\nx@example.com\n")).unwrap_err();
    assert!(
        err.contains("m.csv:1: the header names no address column"),
        "{err}"
    );
    assert!(
        err.contains("m.csv:1: the header names no site column"),
        "{err}"
    );
}

#[test]
fn a_blank_parser_message_still_says_something() {
    // Found by fuzzing: "\r" alone made toml report an empty message.
    let err = load("\r\0 \u{8}", None).unwrap_err();
    assert!(err.starts_with("routes.toml:"), "{err}");
    assert!(!err.trim_end().ends_with(':'), "{err}");
}

#[test]
fn version_hash_depends_on_content_not_order() {
    let a = load(BASE, None).unwrap();
    // Same mailboxes, reversed order, different formatting.
    let mut parts: Vec<&str> = BASE.split("[[mailbox]]").collect();
    let head = parts.remove(0);
    parts.reverse();
    let reordered = format!("{head}[[mailbox]]{}", parts.join("\n[[mailbox]]"));
    let b = load(&reordered, None).unwrap();
    assert_eq!(a.version(), b.version());
    // A site cutover changes it.
    let moved = BASE.replace(
        "[sites.berlin]\nowner = \"old\"",
        "[sites.berlin]\nowner = \"new\"",
    );
    let c = load(&moved, None).unwrap();
    assert_ne!(a.version().hash, c.version().hash);
    assert!(a.version().matches(&a.version().to_string()));
    assert!(a.version().matches("1"));
}

#[test]
fn diff_counts_a_site_move() {
    let a = load(BASE, None).unwrap();
    let moved = BASE.replace(
        "[sites.berlin]\nowner = \"old\"",
        "[sites.berlin]\nowner = \"new\"",
    );
    let b = load(&moved, None).unwrap();
    let d = TableDiff::between(&a, &b, Some(2));
    // bob is a pilot already on new: only the three others in berlin move.
    assert_eq!(d.moved_total, 3);
    assert_eq!(d.moved.len(), 2);
    assert_eq!(d.sites.len(), 1);
    assert_eq!(d.sites[0].site, "berlin");
    assert_eq!(d.sites[0].owner_from.as_deref(), Some("old"));
    assert_eq!(d.sites[0].owner_to.as_deref(), Some("new"));
    assert_eq!(d.sites[0].moves[0].mailboxes, 3);
    assert_eq!(d.targets.len(), 2);
    let text = d.to_string();
    assert!(
        text.contains("berlin               owner old -> new, old -> new: 3"),
        "{text}"
    );
    assert!(text.contains("… 1 more (--all lists every one)"), "{text}");
    let same = TableDiff::between(&a, &a, None);
    assert!(same.is_empty());
}
