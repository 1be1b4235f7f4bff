//! The `coexist` binary as an operator runs it: exit codes, output, `--json`.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn coexist(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coexist"))
        .env_remove("COEXIST_CONFIG")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run coexist")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_passes_on_the_samples() {
    let o = coexist(&["check"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("routes config/routes.toml: ok, version 1-"),
        "{out}"
    );
    assert!(out.contains("paris"), "{out}");
    assert!(out.contains("mailboxes: 8 "), "{out}");

    let o = coexist(&["check", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["mailboxes"], 8);
    assert_eq!(v["targets"], serde_json::json!(["old", "new"]));
}

#[test]
fn check_prints_every_error_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string("config/coexist.toml").unwrap();
    std::fs::write(dir.path().join("coexist.toml"), cfg).unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        "[domains.\"example.com\"]\nunknown = \"old\"\n\n[sites.paris]\nowner = \"nowhere\"\n\n\
         [[mailbox]]\naddress = \"alice@example.com\"\nsite = \"paris\"\n\n\
         [[mailbox]]\naddress = \"bob@example.com\"\naliases = [\"ALICE@example.com\"]\nsite = \"lyon\"\n",
    )
    .unwrap();
    let cfg_path = dir.path().join("coexist.toml");
    let o = coexist(&["check", "-c", cfg_path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    let routes = dir.path().join("routes.toml");
    let r = routes.display();
    assert!(
        err.contains(&format!("{r}:5: unknown target \"nowhere\"")),
        "{err}"
    );
    // paris exists (its owner is what is wrong): its mailbox is not "unknown site", and
    // the alias bob claims from it is found in the same run.
    assert!(!err.contains("unknown site \"paris\""), "{err}");
    assert!(
        err.contains(&format!(
            "{r}:12: alias \"alice@example.com\" is already claimed by mailbox alice@example.com"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{r}:14: unknown site \"lyon\"")),
        "{err}"
    );
    assert!(err.trim_end().ends_with("3 errors"), "{err}");

    let o = coexist(&["check", "-c", cfg_path.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"].as_array().unwrap().len(), 3);
    assert_eq!(v["errors"][0]["line"], 5);

    let o = coexist(&["check", "-c", "/nonexistent/coexist.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("/nonexistent/coexist.toml: cannot read"));
}

#[test]
fn lookup_answers_for_every_kind_of_key() {
    let o = coexist(&[
        "lookup",
        "alice@example.com",
        "Alice.Smith@EXAMPLE.com",
        "alice+news@example.com",
        "7c9f8b2e-3c1a-4d5e-9f00-1a2b3c4d5e6f@example.com",
        "EXAMPLE\\Bob",
        "carol@corp.example.com",
        "nobody@example.com",
        "nobody@example.org",
        "someone@gmail.com",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 9, "{out}");
    assert!(lines[0].starts_with("alice@example.com: mailbox alice@example.com (via address), site paris, owner new (site owner)"), "{out}");
    assert!(
        lines[1].contains("mailbox alice@example.com (via alias)"),
        "{out}"
    );
    assert!(
        lines[2].contains("mailbox alice@example.com (via subaddress)"),
        "{out}"
    );
    assert!(
        lines[3].contains("mailbox alice@example.com (via guid)"),
        "{out}"
    );
    assert!(
        lines[4].contains(
            "mailbox bob@example.com (via login), site berlin, owner new (mailbox owner)"
        ),
        "{out}"
    );
    assert!(
        lines[5].contains("mailbox carol@example.com (via login), site berlin, owner old"),
        "{out}"
    );
    assert!(lines[6].contains("domain default -> old"), "{out}");
    assert!(lines[7].contains("rejected (550 5.1.1)"), "{out}");
    assert!(lines[8].contains("not ours"), "{out}");

    let o = coexist(&["lookup", "--json", "ALICE@example.com"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["owner"], "new");
    assert_eq!(v[0]["site"], "paris");
    assert!(v[0]["version"].as_str().unwrap().starts_with("1-"));
}

#[test]
fn routes_diff_shows_a_site_move() {
    let dir = tempfile::tempdir().unwrap();
    let new_routes = std::fs::read_to_string("config/routes.toml")
        .unwrap()
        .replace(
            "[sites.berlin]\nowner = \"old\"",
            "[sites.berlin]\nowner = \"new\"",
        );
    std::fs::write(dir.path().join("routes.toml"), new_routes).unwrap();
    std::fs::copy("config/mailboxes.csv", dir.path().join("mailboxes.csv")).unwrap();
    let new = dir.path().join("routes.toml");
    let o = coexist(&[
        "routes",
        "diff",
        "config/routes.toml",
        new.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    // carol and dave move; bob is a pilot already on new, grace pins herself to old.
    assert!(
        out.contains("berlin               owner old -> new, old -> new: 2"),
        "{out}"
    );
    assert!(out.contains("new                  +2 -0"), "{out}");
    assert!(out.contains("old                  +0 -2"), "{out}");
    assert!(
        out.contains("mailboxes: 2 moved, 0 added, 0 removed"),
        "{out}"
    );
    assert!(out.contains("carol@example.com"), "{out}");

    let o = coexist(&[
        "routes",
        "diff",
        "--json",
        "-c",
        "config/coexist.toml",
        "config/routes.toml",
        new.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["moved_total"], 2);
    assert_eq!(v["sites"][0]["site"], "berlin");

    let o = coexist(&["routes", "diff", "config/routes.toml", "config/routes.toml"]);
    assert!(stdout(&o).contains("no routing changes"));
    assert!(Path::new("config/routes.toml").exists());
}

/// A loopback port that was free a moment ago: for the demo's servers, which need fixed
/// addresses (the demo's own 2525/2601/2602/8025 may be in use by a running demo).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

#[test]
fn demo_routes_its_tour_and_prints_commands_that_run_as_printed() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("config/routes.toml", dir.path().join("routes.toml")).unwrap();
    std::fs::copy("config/mailboxes.csv", dir.path().join("mailboxes.csv")).unwrap();
    let (old, new, admin) = (free_port(), free_port(), free_port());
    let cfg = dir.path().join("demo.toml");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[smtp]\n[[smtp.listener]]\n\
             listen = \"127.0.0.1:0\"\nmode = \"relay\"\n\
             [targets.old]\nsmtp = [\"127.0.0.1:{old}\"]\n\
             [targets.new]\nsmtp = [\"127.0.0.1:{new}\"]\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_coexist"))
        .args(["demo", "-c", cfg.to_str().unwrap()])
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start demo");
    let demo_out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(demo_out).lines().map_while(Result::ok) {
            let done = line.starts_with("Deliveries are printed below");
            lines.push(line);
            if done {
                break;
            }
        }
        let _ = tx.send(lines);
    });
    let lines = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap_or_default();
    let out = lines.join("\n");
    for (side, rcpt) in [
        ("NEW", "alice@example.com"),
        ("OLD", "c.jones@example.com"),
        ("NEW", "alice.smith@example.com"),
        ("OLD", "dave@example.com"),
    ] {
        assert!(
            out.contains(&format!(
                "[{side} server] delivered from <tour@internet.example> to <{rcpt}>"
            )),
            "expected the {side} demo server to take {rcpt}:\n{out}"
        );
    }
    assert!(
        out.contains("→ 250 2.0.0 Message accepted for delivery"),
        "expected the split message to be accepted:\n{out}"
    );

    // Every suggested coexist command, run by a shell exactly as printed, from elsewhere.
    let exe = env!("CARGO_BIN_EXE_coexist");
    let commands: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with('/') && l.contains(" -c "))
        .collect();
    let results: Vec<(String, Output)> = commands
        .iter()
        .map(|c| {
            let o = Command::new("sh")
                .args(["-c", c])
                .current_dir("/")
                .env("PATH", "/usr/bin:/bin")
                .output()
                .expect("run sh");
            ((*c).to_string(), o)
        })
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        commands.len(),
        3,
        "expected lookup, cutover and rollback commands:\n{out}"
    );
    for (c, o) in &results {
        assert!(
            c.starts_with(exe),
            "a suggested command must start with the binary's path {exe}: {c}"
        );
        assert!(
            o.status.success(),
            "`{c}` as printed failed: {}{}",
            stdout(o),
            stderr(o)
        );
    }
    assert!(
        stdout(&results[0].1).contains("mailbox alice@example.com (via alias)"),
        "{}",
        stdout(&results[0].1)
    );
    assert!(
        stdout(&results[1].1).contains("cutover site berlin -> new: applied"),
        "{}",
        stdout(&results[1].1)
    );
    assert!(
        stdout(&results[2].1).contains(": applied"),
        "{}",
        stdout(&results[2].1)
    );
}

#[test]
fn no_test_binds_the_demos_fixed_ports() {
    // `cargo test` must pass while `coexist demo` runs on its sample config's ports.
    let sample = std::fs::read_to_string("config/coexist.toml").unwrap();
    for port in ["2525", "2601", "2602", "8025"] {
        assert!(
            sample.contains(&format!("127.0.0.1:{port}")),
            "the sample config no longer uses {port}: update this list"
        );
        for entry in std::fs::read_dir("tests").unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                // `coexist demo` without `-c` binds the sample ports.
                assert!(
                    !text.contains(".arg(\"demo\")") && !text.contains("[\"demo\"]"),
                    "{} runs the demo on its fixed ports: give it `-c` with free ones",
                    path.display()
                );
                assert!(
                    !text.contains(&format!("127.0.0.1:{port}\"")),
                    "{} binds the demo's port {port}",
                    path.display()
                );
            }
        }
    }
}

/// Runs `args` with stdout a pipe whose reader has already gone.
fn into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_coexist"))
        .env_remove("COEXIST_CONFIG")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run coexist")
}

#[test]
fn a_closed_stdout_ends_quietly() {
    for args in [
        &["check"][..],
        &["check", "--json"],
        &["lookup", "alice@example.com", "x@gmail.com"],
        &[
            "routes",
            "diff",
            "--json",
            "config/routes.toml",
            "config/routes.toml",
        ],
        &["completions", "bash"],
        &["man"],
        &["--help"],
    ] {
        let o = into_closed_pipe(args);
        let err = stderr(&o);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "coexist {args:?} into a closed pipe must end quietly, said: {err}"
        );
        assert_eq!(
            o.status.code(),
            Some(0),
            "coexist {args:?} into a closed pipe: expected exit 0, stderr: {err}"
        );
    }
}

#[test]
fn help_describes_every_option() {
    for cmd in [
        "serve", "check", "lookup", "cutover", "rollback", "reload", "status", "queue", "routes",
    ] {
        let o = coexist(&["help", cmd]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        for line in out.lines().filter(|l| l.trim_start().starts_with('-')) {
            // `  -c, --config <FILE>  The config file …`: a name, then its description.
            let described = line
                .trim()
                .split_once("  ")
                .is_some_and(|(_, d)| !d.trim().is_empty());
            assert!(
                described,
                "`coexist help {cmd}`: option without help: {line}"
            );
        }
        if cmd != "routes" {
            assert!(
                out.contains("-c, --config <FILE>")
                    && out.contains("[default: config/coexist.toml]"),
                "`coexist help {cmd}` must show -c/--config with its default:\n{out}"
            );
        }
    }
    let out = stdout(&coexist(&["help", "routes", "diff"]));
    assert!(
        out.contains("<OLD>  The routing table as it is"),
        "positional arguments need help too:\n{out}"
    );
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let o = coexist(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let out = stdout(&o);
        for sub in ["serve", "cutover", "rollback", "lookup", "completions"] {
            assert!(
                out.contains(sub),
                "{shell} completion does not mention {sub}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("coexist.bash");
    std::fs::write(&script, coexist(&["completions", "bash"]).stdout).unwrap();
    let o = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("run bash -n");
    assert!(
        o.status.success(),
        "bash -n rejects the completion: {}",
        stderr(&o)
    );
    let o = coexist(&["completions", "tcsh"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_pages_in_roff() {
    let o = coexist(&["man"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let page = stdout(&o);
    assert!(
        page.lines().any(|l| l.starts_with(".TH coexist 1")),
        "expected a roff .TH title line:\n{page}"
    );
    assert!(page.contains("cutover"), "{page}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let o = coexist(&["man", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in [
        "coexist.1",
        "coexist-cutover.1",
        "coexist-queue-list.1",
        "coexist-routes-diff.1",
    ] {
        let text = std::fs::read_to_string(out.join(name))
            .unwrap_or_else(|e| panic!("expected {name} in {}: {e}", out.display()));
        assert!(text.contains(".TH "), "{name} is not roff");
    }
}

#[test]
fn lookup_of_something_that_is_no_address_says_so_and_fails() {
    let o = coexist(&["lookup", "alice@example.com", "bad address"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "an invalid query must fail the command"
    );
    let out = stdout(&o);
    assert!(
        out.contains("bad address: invalid address: missing '@'"),
        "expected the reason, got:\n{out}"
    );
    assert!(!out.contains("not ours"), "{out}");
    assert!(out.contains("alice@example.com: mailbox"), "{out}");

    // A well-formed GUID that no mailbox has is not an invalid address.
    let o = coexist(&["lookup", "00000000-1111-2222-3333-444444444444"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("no mailbox has this GUID"),
        "{}",
        stdout(&o)
    );

    let o = coexist(&["lookup", "--json", "a b@example.com"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["result"], "invalid", "{v}");
    assert!(
        v[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("forbidden character")),
        "{v}"
    );
}

/// A config dir with the sample routing table and `config` as coexist.toml.
fn config_dir(config: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("config/routes.toml", dir.path().join("routes.toml")).unwrap();
    std::fs::copy("config/mailboxes.csv", dir.path().join("mailboxes.csv")).unwrap();
    let path = dir.path().join("coexist.toml");
    std::fs::write(&path, config).unwrap();
    (dir, path)
}

#[test]
fn a_config_that_would_serve_nothing_is_rejected_with_its_line() {
    let (_d, cfg) = config_dir(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[smtp]\nhostname = \"mx.test\"\n\n\
         [targets.old]\nsmtp = [\"127.0.0.1:9\"]\n[targets.new]\nsmtp = []\n",
    );
    let o = coexist(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    let c = cfg.display();
    assert!(
        err.contains(&format!("{c}:4: [smtp] has no [[smtp.listener]]")),
        "expected the missing listener at [smtp]'s line:\n{err}"
    );
    assert!(
        err.contains(&format!("{c}:10: targets.new.smtp is empty")),
        "expected the empty server list at its line:\n{err}"
    );
    assert!(err.trim_end().ends_with("2 errors"), "{err}");

    let (_d, cfg) = config_dir(
        "[targets.old]\nsmtp = [\"127.0.0.1:9\"]\n[targets.new]\nsmtp = [\"127.0.0.1:9\"]\n",
    );
    let o = coexist(&["serve", "-c", cfg.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "serve must refuse to listen on nothing"
    );
    assert!(
        stderr(&o).contains("no [[smtp.listener]] table"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn serve_that_cannot_bind_leaves_no_trace_and_says_why_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let state = tempfile::tempdir().unwrap();
    let root = state.path().join("not-yet");
    let (_d, cfg) = config_dir(&format!(
        "[routes]\nstate_dir = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [smtp]\n[[smtp.listener]]\nlisten = \"127.0.0.1:{port}\"\nmode = \"relay\"\n\
         [targets.old]\nsmtp = [\"127.0.0.1:9\"]\n[targets.new]\nsmtp = [\"127.0.0.1:9\"]\n\
         [spool]\ndir = \"{}\"\n",
        root.join("state").display(),
        root.join("spool").display()
    ));
    let o = coexist(&["serve", "-c", cfg.to_str().unwrap()]);
    drop(taken);
    assert_eq!(o.status.code(), Some(1), "serve on a taken port must fail");
    let err = stderr(&o);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert_eq!(
        err.matches("Address already in use").count(),
        1,
        "the cause must be said once:\n{err}"
    );
    assert!(
        !root.exists(),
        "a serve that never listened created {}",
        root.display()
    );
}

/// Writes the sample config beside `routes` (and any extra files) and runs `check`.
fn check_routes(routes: &str, extra: &[(&str, &str)]) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string("config/coexist.toml").unwrap();
    std::fs::write(dir.path().join("coexist.toml"), cfg).unwrap();
    std::fs::write(dir.path().join("routes.toml"), routes).unwrap();
    for (name, text) in extra {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let cfg_path = dir.path().join("coexist.toml");
    let o = coexist(&["check", "-c", cfg_path.to_str().unwrap()]);
    let err = stderr(&o).replace(&format!("{}/", dir.path().display()), "");
    (o, err)
}

#[test]
fn check_reports_each_independent_problem_once() {
    let sample = std::fs::read_to_string("config/routes.toml").unwrap();
    let csv = std::fs::read_to_string("config/mailboxes.csv").unwrap();
    let with_csv = |routes: String| check_routes(&routes, &[("mailboxes.csv", &csv)]);

    // A misspelt site owner is one error, not one more per mailbox of the site.
    let (o, err) = with_csv(sample.replace(
        "[sites.berlin]\nowner = \"old\"",
        "[sites.berlin]\nowner = \"nwe\"",
    ));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("routes.toml:26: unknown target \"nwe\""),
        "expected the unknown owner at its line: {err}"
    );
    assert!(
        !err.contains("unknown site"),
        "no false unknown-site lines: {err}"
    );
    assert!(err.trim_end().ends_with("\n1 error"), "{err}");

    // A domain whose target was removed is one error; its addresses are not "not routed".
    let (_, err) = with_csv(sample.replace(
        "[domains.\"example.org\"]\nunknown = \"reject\"",
        "[domains.\"example.org\"]\nunknown = \"gone\"",
    ));
    assert!(err.contains("unknown target \"gone\""), "{err}");
    assert!(!err.contains("not routed"), "{err}");
    assert!(err.trim_end().ends_with("\n1 error"), "{err}");

    // An unknown site does not hide an alias claimed twice in the same file.
    let (_, err) = with_csv(sample.replace(
        "site = \"lab\"",
        "site = \"labx\"\naliases = [\"alice.smith@example.com\"]",
    ));
    assert!(err.contains("unknown site \"labx\""), "{err}");
    assert!(
        err.contains(
            "alias \"alice.smith@example.com\" is already claimed by mailbox alice@example.com"
        ),
        "{err}"
    );

    // CSV lines count the `#TYPE` line and blank lines before the header and rows.
    let (_, err) = check_routes(
        &sample,
        &[(
            "mailboxes.csv",
            "#TYPE Selected.Microsoft.Exchange.Data.Directory.Management.Mailbox\r\n\r\naddress,aliasez,site\r\n",
        )],
    );
    assert!(
        err.contains("mailboxes.csv:3: unknown column \"aliasez\""),
        "the header is on line 3: {err}"
    );
    let (_, err) = check_routes(
        &sample,
        &[(
            "mailboxes.csv",
            "#TYPE x\n\naddress,site\n\nzed@example.com,nosuch\n#note\nyan@example.com,nosuch2\n",
        )],
    );
    assert!(
        err.contains("mailboxes.csv:5: unknown site \"nosuch\""),
        "{err}"
    );
    assert!(
        err.contains("mailboxes.csv:7: unknown site \"nosuch2\""),
        "{err}"
    );
}
