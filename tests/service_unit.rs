//! `config/coexist.service`: the systemd unit agrees with what `coexist serve` does (SIGHUP
//! reloads, SIGTERM drains) and may write where the config it names keeps its state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

const UNIT: &str = include_str!("../config/coexist.service");

/// `Key=value` lines of the `[Service]` section (a key may repeat).
fn service() -> HashMap<String, Vec<String>> {
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    let mut section = "";
    for line in UNIT.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not Key=value: {line}"));
        if section == "[Service]" {
            keys.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    keys
}

fn one<'a>(s: &'a HashMap<String, Vec<String>>, key: &str) -> &'a str {
    match s.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("expected one {key}= in [Service], found {other:?}"),
    }
}

#[test]
fn signals_and_stop_timeout_match_serve() {
    let s = service();
    assert_eq!(one(&s, "Type"), "simple", "serve does not notify systemd");
    assert_eq!(
        one(&s, "ExecReload"),
        "/bin/kill -HUP $MAINPID",
        "serve reloads the table on SIGHUP"
    );
    if let Some(k) = s.get("KillSignal") {
        assert_eq!(k, &["SIGTERM"], "serve drains on SIGTERM");
    }
    let stop = one(&s, "TimeoutStopSec");
    let stop: u64 = stop
        .strip_suffix('s')
        .unwrap_or(stop)
        .parse()
        .unwrap_or_else(|_| panic!("TimeoutStopSec {stop:?} is not in seconds"));
    let drain = coexist::app::DRAIN_DEADLINE.as_secs();
    assert!(
        stop > drain,
        "TimeoutStopSec={stop} would SIGKILL sessions still draining (drain {drain} s)"
    );
}

#[test]
fn hardening_and_a_dedicated_user() {
    let s = service();
    assert_eq!(one(&s, "User"), "coexist");
    assert_eq!(one(&s, "StateDirectory"), "coexist");
    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
    ] {
        assert_eq!(one(&s, key), value, "{key}");
    }
}

#[test]
fn the_config_it_names_may_write_its_state_spool_and_routes() {
    let s = service();
    let exec = one(&s, "ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert!(
        matches!(args.as_slice(), [_, "serve", "-c", _]),
        "ExecStart must be `coexist serve -c FILE`: {exec}"
    );
    let config = Path::new(args[3]);
    let writable: Vec<PathBuf> = one(&s, "ReadWritePaths")
        .split_whitespace()
        .map(PathBuf::from)
        .collect();
    let covered = |p: &Path| writable.iter().any(|w| p.starts_with(w));

    // The installed config as the unit's install comment lays it out: beside the seed table,
    // in a directory standing in for the unit's config directory.
    let dir = tempfile::tempdir().unwrap();
    for f in ["routes.toml", "mailboxes.csv"] {
        std::fs::copy(Path::new("config").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        "config/installed/coexist.toml",
        dir.path().join("coexist.toml"),
    )
    .unwrap();
    let cfg = coexist::config::Config::load(&dir.path().join("coexist.toml"))
        .unwrap_or_else(|d| panic!("the installed config is invalid:\n{d}"));
    // Paths relative to the temporary directory are relative to the unit's config directory.
    let at_unit = |p: &Path| match p.strip_prefix(dir.path()) {
        Ok(rel) => config.parent().unwrap().join(rel),
        Err(_) => p.to_path_buf(),
    };
    let state = at_unit(&cfg.routes.state_dir);
    let spool = at_unit(&cfg.spool.dir);
    let routes_dir = at_unit(cfg.routes.path.parent().unwrap());
    let seed = at_unit(
        cfg.routes
            .seed
            .as_deref()
            .expect("the installed config has a seed"),
    );
    assert!(
        !covered(&seed),
        "the seed {} is read-only configuration",
        seed.display()
    );
    for (what, p) in [
        ("state_dir", &state),
        ("spool dir", &spool),
        ("routes file's directory (cutover rewrites it)", &routes_dir),
    ] {
        assert!(
            covered(p),
            "{what} {} is not under ReadWritePaths {writable:?}",
            p.display()
        );
    }
    assert!(
        state.starts_with("/var/lib/coexist") && spool.starts_with("/var/lib/coexist"),
        "state and spool belong in StateDirectory=coexist: {} {}",
        state.display(),
        spool.display()
    );
}
