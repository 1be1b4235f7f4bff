//! Do lookups slow down while the table is being swapped?
//!
//! Two reader threads look up random addresses in a 1M-mailbox table for a fixed time,
//! first alone, then while a third thread swaps between two 1M tables every 100 ms (using
//! the router's own rollback-to-version path, so no build competes for the CPU). The
//! phases alternate several times and the ratio of lookup throughput is reported.
//!
//! `cargo bench --bench swap_contention`

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coexist::route::{Router, load_routes};

const READERS: usize = 2;
const PHASE: Duration = Duration::from_secs(3);
const ROUNDS: usize = 3;

fn run_phase(router: &Arc<Router>, keys: &Arc<Vec<String>>, swap: bool) -> (u64, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (router, keys, stop) = (Arc::clone(router), Arc::clone(keys), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut i = r * 7919;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..256 {
                        let t = router.current();
                        std::hint::black_box(t.lookup(&keys[i % keys.len()]).target());
                        i += 1;
                    }
                    n += 256;
                }
                n
            })
        })
        .collect();
    let start = Instant::now();
    let mut swaps = 0;
    let mut flip = false;
    while start.elapsed() < PHASE {
        std::thread::sleep(Duration::from_millis(100));
        if swap {
            router.rollback(Some(if flip { "2" } else { "1" })).unwrap();
            flip = !flip;
            swaps += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let total = readers.into_iter().map(|h| h.join().unwrap()).sum();
    (total, swaps)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / `cargo test --benches` probing
    }
    let n: usize = std::env::var("COEXIST_BENCH_MAILBOXES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = load_routes(
        &common::generate(dir_a.path(), n, false, false),
        &common::targets(),
    )
    .unwrap();
    let b = load_routes(
        &common::generate(dir_b.path(), n, true, false),
        &common::targets(),
    )
    .unwrap();
    let router = Arc::new(Router::new(a, 10));
    router.swap(b);
    let keys = Arc::new(common::keys(n, 200_000, true));

    let (mut quiet, mut busy, mut swaps) = (0u64, 0u64, 0usize);
    for round in 0..ROUNDS {
        let (q, _) = run_phase(&router, &keys, false);
        let (b, s) = run_phase(&router, &keys, true);
        println!(
            "round {round}: {:.2} M lookups/s quiet, {:.2} M lookups/s while swapping ({s} swaps)",
            q as f64 / PHASE.as_secs_f64() / 1e6,
            b as f64 / PHASE.as_secs_f64() / 1e6
        );
        quiet += q;
        busy += b;
        swaps += s;
    }
    println!(
        "swap_contention at {n} mailboxes, {READERS} reader threads: throughput while swapping \
         every 100 ms = {:.3} of quiet ({swaps} swaps)",
        busy as f64 / quiet as f64
    );
}
