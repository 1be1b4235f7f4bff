//! How long a site cutover takes on a 1M-mailbox table, from the command to the moment
//! every new transaction routes by the new version (a reader thread polls the router the
//! way a session does at MAIL FROM), and the same for a rollback.
//!
//! `cargo bench --bench cutover` (`COEXIST_BENCH_MAILBOXES` for another size).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coexist::control::{Change, Control};
use coexist::route::Route;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("COEXIST_BENCH_MAILBOXES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let routes = common::generate(dir.path(), n, false, false);
    let t = Instant::now();
    let control = Arc::new(
        Control::start(&routes, common::targets(), 10, &dir.path().join("state")).unwrap(),
    );
    println!(
        "start (load, compile, record the sources) of {n} mailboxes: {:?}",
        t.elapsed()
    );
    // site000 starts on "old"; its first mailbox is user.0000000@example.com.
    let probe = common::primary(0);
    for round in 0..3 {
        for (to, rollback) in [("new", false), ("old", true)] {
            let seen = Arc::new(AtomicBool::new(false));
            let watcher = {
                let (router, seen, probe) = (
                    Arc::clone(control.router()),
                    Arc::clone(&seen),
                    probe.clone(),
                );
                std::thread::spawn(move || {
                    loop {
                        let t = router.current();
                        if let Route::Mailbox(m) = t.lookup(&probe)
                            && t.target_name(m.owner()) == to
                        {
                            seen.store(true, Ordering::Release);
                            return Instant::now();
                        }
                        drop(t);
                        std::thread::sleep(Duration::from_micros(50));
                    }
                })
            };
            let t0 = Instant::now();
            let report = if rollback {
                control.rollback(None, false, "bench").unwrap()
            } else {
                let change = Change::Site {
                    site: "site000".into(),
                    to: to.into(),
                };
                control.cutover(&change, false, false, "bench").unwrap()
            };
            let done = t0.elapsed();
            let routed = watcher.join().unwrap() - t0;
            println!(
                "round {round}: {} ({} mailboxes moved): new transactions route by {} after {:?}; command returned after {:?}",
                report.what, report.diff.moved_total, report.to, routed, done
            );
        }
    }
}
