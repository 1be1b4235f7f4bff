//! Routing table at scale: compile 1M mailboxes from CSV, look up hits and misses, and
//! report memory per mailbox.
//!
//! `cargo bench --bench routing_table` (set `COEXIST_BENCH_MAILBOXES` for another size).

mod common;

use std::hint::black_box;
use std::time::Duration;

use coexist::route::{Route, load_routes};
use criterion::{Criterion, criterion_group};

fn size() -> usize {
    std::env::var("COEXIST_BENCH_MAILBOXES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

fn memory_report(full: bool) {
    let n = size();
    let dir = tempfile::tempdir().unwrap();
    let routes = common::generate(dir.path(), n, false, full);
    let before = common::rss_bytes();
    let table = load_routes(&routes, &common::targets()).unwrap();
    let after = common::rss_bytes();
    let m = table.memory_usage();
    println!(
        "memory at {n} mailboxes ({}): structure {:.1} B/mailbox, key strings {:.1} B/mailbox, \
         RSS growth {:.1} B/mailbox (includes allocator slack from the build)",
        if full {
            "2 aliases, 1 GUID, 1 login each"
        } else {
            "2 aliases each"
        },
        m.structure as f64 / n as f64,
        m.strings as f64 / n as f64,
        after.saturating_sub(before) as f64 / n as f64,
    );
}

fn bench(c: &mut Criterion) {
    let n = size();
    let dir = tempfile::tempdir().unwrap();
    let full_dir = tempfile::tempdir().unwrap();
    let routes = common::generate(dir.path(), n, false, false);
    let full_routes = common::generate(full_dir.path(), n, false, true);

    let mut g = c.benchmark_group("compile");
    g.sample_size(10).measurement_time(Duration::from_secs(15));
    g.bench_function(format!("csv_{n}_2_aliases"), |b| {
        b.iter(|| load_routes(&routes, &common::targets()).unwrap());
    });
    g.bench_function(format!("csv_{n}_2_aliases_guid_login"), |b| {
        b.iter(|| load_routes(&full_routes, &common::targets()).unwrap());
    });
    g.finish();
    let routes = full_routes;

    let table = load_routes(&routes, &common::targets()).unwrap();
    // 200k distinct keys spread over the whole table: most lookups miss the CPU caches,
    // like real traffic does.
    for (name, hits) in [("hit", true), ("miss", false)] {
        let keys = common::keys(n, 200_000, hits);
        let mut g = c.benchmark_group("lookup");
        g.bench_function(format!("{name}_random_{n}"), |b| {
            let mut i = 0;
            b.iter(|| {
                let k = &keys[i];
                i = (i + 1) % keys.len();
                let r = table.lookup(black_box(k));
                assert_eq!(matches!(r, Route::Mailbox(_)), hits);
                black_box(r.target())
            });
        });
        let hot = &keys[0];
        g.bench_function(format!("{name}_same_key_{n}"), |b| {
            b.iter(|| black_box(table.lookup(black_box(hot)).target()));
        });
        g.finish();
    }
    let mut g = c.benchmark_group("lookup");
    let guid = table.mailboxes().nth(n / 2).unwrap().guid().unwrap();
    g.bench_function("guid", |b| {
        b.iter(|| black_box(table.lookup_guid(black_box(guid))));
    });
    g.bench_function("login", |b| {
        b.iter(|| black_box(table.lookup_login(black_box("corp\\USER0500000"))).is_some());
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    memory_report(false);
    memory_report(true);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
