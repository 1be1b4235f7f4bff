//! The `coexist` binary as an operator runs it: exit codes, output, `--json`.

use std::path::Path;
use std::process::{Command, Output};

fn coexist(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coexist"))
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

#[test]
fn demo_routes_its_tour_to_both_sides() {
    use std::io::{BufRead, BufReader};
    // The demo binds the sample config's fixed loopback ports (2525, 2601, 2602).
    let mut child = Command::new(env!("CARGO_BIN_EXE_coexist"))
        .arg("demo")
        .current_dir(std::env::temp_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start demo");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
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
    let _ = child.kill();
    let _ = child.wait();
    let out = lines.join("\n");
    assert!(
        out.contains("[NEW server] delivered from <tour@internet.example> to <alice@example.com>"),
        "{out}"
    );
    assert!(
        out.contains(
            "[OLD server] delivered from <tour@internet.example> to <c.jones@example.com>"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "[NEW server] delivered from <tour@internet.example> to <alice.smith@example.com>"
        ),
        "{out}"
    );
    assert!(
        out.contains("[OLD server] delivered from <tour@internet.example> to <dave@example.com>"),
        "{out}"
    );
    assert!(
        out.contains("→ 250 2.0.0 Message accepted for delivery"),
        "{out}"
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
