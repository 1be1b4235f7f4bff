//! The routes file and CSV import parsers: any input gives a table or `file:line` errors,
//! never a panic; a compiled table answers lookups of its own addresses.
#![no_main]

use std::sync::OnceLock;

use coexist::route::{KnownTargets, Route, load_routes_text};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static std::path::Path {
    static D: OnceLock<std::path::PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("coexist-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // "TOML\0CSV": the second part becomes the imported CSV file.
    let (toml, csv) = s.split_once('\0').unwrap_or((s, ""));
    let routes = dir().join("routes.toml");
    if std::fs::write(dir().join("m.csv"), csv).is_err() {
        return;
    }
    let targets = KnownTargets::Exactly(vec!["old".into(), "new".into()]);
    match load_routes_text(&routes, toml, &targets) {
        Ok(t) => {
            for m in t.mailboxes().take(50) {
                let addr = m.address().to_string();
                assert!(
                    matches!(t.lookup(&addr), Route::Mailbox(_)),
                    "{addr} not found"
                );
            }
        }
        Err(e) => {
            for d in &e.diagnostics().errors {
                assert!(!d.message.is_empty());
                assert!(!d.message.contains('\n'), "one line per error");
            }
        }
    }
});
