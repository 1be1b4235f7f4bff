//! Operations end to end: the admin API, cutover and rollback while mail flows, a rejected
//! table that changes nothing, history across a restart.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use coexist::app::Running;
use coexist::config::Config;
use serde_json::json;
use support::{Backend, Behaviour, Client, Proxy, admin_call};

async fn setup() -> (Backend, Backend, Proxy) {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    (old, new, p)
}

/// Sends one message to `rcpt` and returns the final reply.
async fn send(p: &Proxy, rcpt: &str, id: &str) -> String {
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO ops.test", "250").await;
    c.expect("MAIL FROM:<ops@internet.example>", "250").await;
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    if !r.starts_with("250") {
        return r;
    }
    c.expect("DATA", "354").await;
    let r = c
        .cmd(&format!(
            "Message-ID: <{id}>\r\nSubject: ops\r\n\r\nbody\r\n."
        ))
        .await;
    c.cmd("QUIT").await;
    r
}

#[tokio::test]
async fn admin_api_status_lookup_and_errors() {
    let (_old, _new, p) = setup().await;
    let (code, v) = p.admin("GET", "/healthz", None).await;
    assert_eq!(code, 200, "{v}");
    let (code, _) = p.admin("GET", "/readyz", None).await;
    assert_eq!(code, 200);
    let (code, v) = p.admin("GET", "/status", None).await;
    assert_eq!(code, 200);
    assert!(v["version"].as_str().unwrap().starts_with("1-"), "{v}");
    assert_eq!(v["mailboxes"], 3);
    assert_eq!(v["sites"][0]["name"], "paris");
    assert_eq!(v["targets"][0]["smtp"][0]["up"], true);
    let (code, v) = p
        .admin("GET", "/lookup?address=Alice.Smith%40example.com", None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(v["mailbox"], "alice@example.com");
    assert_eq!(v["owner"], "new");
    let (code, v) = p
        .admin(
            "POST",
            "/routes/cutover",
            Some(json!({"site": "nowhere", "to": "new"})),
        )
        .await;
    assert_eq!(code, 404, "{v}");
    let (code, v) = p
        .admin(
            "POST",
            "/routes/cutover",
            Some(json!({"site": "paris", "to": "moon"})),
        )
        .await;
    assert_eq!(code, 404, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("unknown target"),
        "{v}"
    );
    let (code, _) = p
        .admin("POST", "/routes/cutover", Some(json!({"colour": "red"})))
        .await;
    assert_eq!(code, 400);
    let (code, _) = p.admin("GET", "/routes/cutover", None).await;
    assert_eq!(code, 405);
    let (code, _) = p.admin("GET", "/nope", None).await;
    assert_eq!(code, 404);
    let (code, v) = p.admin("GET", "/", None).await;
    assert_eq!(code, 200);
    assert!(v.as_str().unwrap().contains("id=\"version\">1-"), "{v}");
    let (code, v) = p.admin("GET", "/metrics", None).await;
    assert_eq!(code, 200);
    assert!(
        v.as_str()
            .unwrap()
            .contains("coexist_route_table_mailboxes 3"),
        "{v}"
    );
}

#[tokio::test]
async fn the_admin_token_is_required_when_configured() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), support::ROUTES).unwrap();
    std::fs::write(dir.path().join("admin.token"), "s3cret-token\n").unwrap();
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\
         [smtp]\n[[smtp.listener]]\nlisten = \"127.0.0.1:0\"\nmode = \"relay\"\n\
         [targets.old]\nsmtp = [\"{}\"]\n[targets.new]\nsmtp = [\"{}\"]\n",
        old.addr, new.addr
    );
    std::fs::write(dir.path().join("coexist.toml"), cfg).unwrap();
    let config = Config::load(&dir.path().join("coexist.toml")).unwrap();
    let running = Running::start(config).await.unwrap();
    let a = running.admin_addr;
    assert_eq!(admin_call(a, None, "GET", "/status", None).await.0, 401);
    assert_eq!(
        admin_call(a, Some("wrong".into()), "GET", "/status", None)
            .await
            .0,
        401
    );
    assert_eq!(
        admin_call(a, Some("s3cret-token".into()), "GET", "/status", None)
            .await
            .0,
        200
    );
    // Liveness and readiness stay open for probes.
    assert_eq!(admin_call(a, None, "GET", "/healthz", None).await.0, 200);
    let (code, _) = admin_call(a, None, "POST", "/routes/rollback", Some(json!({}))).await;
    assert_eq!(code, 401);
}

#[tokio::test]
async fn cutover_and_rollback_move_mail_and_keep_the_source_tidy() {
    let (old, new, p) = setup().await;
    let original = std::fs::read_to_string(p.routes_path()).unwrap();
    // Dry run: nothing changes.
    let (code, v) = p
        .admin(
            "POST",
            "/routes/cutover?dry_run=1",
            Some(json!({"site": "berlin", "to": "new"})),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["applied"], false);
    assert_eq!(v["diff"]["moved_total"], 2, "{v}");
    assert_eq!(std::fs::read_to_string(p.routes_path()).unwrap(), original);

    let v = cut_berlin_over(&p).await;
    assert_eq!(v["applied"], true);
    assert!(v["to"].as_str().unwrap().starts_with("2-"));
    let edited = std::fs::read_to_string(p.routes_path()).unwrap();
    // Only the owner value changed; everything else, comments included, is as written.
    assert_eq!(
        edited,
        original.replace(
            "[sites.berlin]\nowner = \"old\"",
            "[sites.berlin]\nowner = \"new\""
        )
    );
    assert!(
        send(&p, "bob@example.com", "m1@test")
            .await
            .starts_with("250")
    );
    assert_eq!(new.wait_for(1).await[0].rcpts, ["bob@example.com"]);

    // Pin alice to old.
    let (code, v) = p
        .admin(
            "POST",
            "/routes/cutover",
            Some(json!({"mailbox": "Alice.Smith@example.com", "to": "old"})),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert!(
        std::fs::read_to_string(p.routes_path())
            .unwrap()
            .contains("[owners]\n\"alice@example.com\" = \"old\"")
    );
    assert!(
        send(&p, "alice@example.com", "m2@test")
            .await
            .starts_with("250")
    );
    assert_eq!(old.wait_for(1).await[0].rcpts, ["alice@example.com"]);

    // Roll back both changes: mail and the file are as before.
    let (code, v) = p.admin("POST", "/routes/rollback", Some(json!({}))).await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = p.admin("POST", "/routes/rollback", Some(json!({}))).await;
    assert_eq!(code, 200, "{v}");
    assert!(v["to"].as_str().unwrap().starts_with("1-"), "{v}");
    assert_eq!(std::fs::read_to_string(p.routes_path()).unwrap(), original);
    assert!(
        send(&p, "bob@example.com", "m3@test")
            .await
            .starts_with("250")
    );
    assert_eq!(old.wait_for(2).await[1].rcpts, ["bob@example.com"]);
    let (code, v) = p.admin("POST", "/routes/rollback", Some(json!({}))).await;
    assert_eq!(code, 404, "nothing earlier: {v}");
    // Forward again by version.
    let (_, h) = p.admin("GET", "/routes/history", None).await;
    assert!(h["versions"].as_array().unwrap().len() >= 4, "{h}");
    let (code, v) = p
        .admin("POST", "/routes/rollback", Some(json!({"version": "2"})))
        .await;
    assert_eq!(code, 200, "{v}");
    assert!(
        std::fs::read_to_string(p.routes_path())
            .unwrap()
            .contains("[sites.berlin]\nowner = \"new\"")
    );
}

#[tokio::test]
async fn a_broken_table_is_rejected_and_the_active_one_keeps_serving() {
    let (old, _new, p) = setup().await;
    let good = std::fs::read_to_string(p.routes_path()).unwrap();
    std::fs::write(
        p.routes_path(),
        good.replace("site = \"berlin\"", "site = \"atlantis\""),
    )
    .unwrap();
    let (code, v) = p.admin("POST", "/routes/reload", None).await;
    assert_eq!(code, 422, "{v}");
    let errors = v["errors"].as_array().unwrap();
    let e = errors
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .contains("unknown site \"atlantis\"")
        })
        .unwrap_or_else(|| panic!("{v}"));
    assert!(e["line"].as_u64().unwrap() > 0);
    let (_, s) = p.admin("GET", "/status", None).await;
    assert!(s["version"].as_str().unwrap().starts_with("1-"));
    assert!(
        send(&p, "bob@example.com", "r1@test")
            .await
            .starts_with("250")
    );
    assert_eq!(old.wait_for(1).await.len(), 1);
    // SIGHUP's path does the same.
    assert!(p.running.reload().is_err());
    std::fs::write(p.routes_path(), good).unwrap();
    let (code, v) = p.admin("POST", "/routes/reload", None).await;
    assert_eq!(code, 200, "{v}");
}

#[tokio::test]
async fn history_and_rollback_survive_a_restart() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    let cfg = p.dir.path().join("coexist.toml");
    let (code, _) = p
        .admin(
            "POST",
            "/routes/cutover",
            Some(json!({"site": "berlin", "to": "new"})),
        )
        .await;
    assert_eq!(code, 200);
    let Proxy { running, dir, .. } = p;
    running.shutdown(Duration::from_secs(2)).await;
    // Same config and state directory: the version number continues.
    let running = Running::start(Config::load(&cfg).unwrap()).await.unwrap();
    assert!(
        running
            .router
            .snapshot()
            .version()
            .to_string()
            .starts_with("2-")
    );
    let (code, v) = admin_call(
        running.admin_addr,
        None,
        "POST",
        "/routes/rollback",
        Some(json!({})),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert!(
        std::fs::read_to_string(dir.path().join("routes.toml"))
            .unwrap()
            .contains("[sites.berlin]\nowner = \"old\"")
    );
    assert_eq!(v["diff"]["moved_total"], 2, "bob and carol go back: {v}");
}

/// The zero-downtime promise: clients send without pause while a site is cut over and
/// rolled back 100 times. Every send succeeds, every message arrives exactly once, and
/// each went to the owner under the table version its transaction took (read back from
/// the proxy's Received header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_sessions_while_cutting_over_and_back_100_times() {
    let (old, new, p) = setup().await;
    let p = Arc::new(p);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (p, stop, sent) = (Arc::clone(&p), Arc::clone(&stop), Arc::clone(&sent));
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                // bob is in berlin, the site that moves; carol@example.org too.
                let rcpt = if i % 2 == 0 {
                    "bob@example.com"
                } else {
                    "carol@example.org"
                };
                let r = send(&p, rcpt, &format!("c{c}-{i}@test")).await;
                if !r.starts_with("250") {
                    failures.push(r);
                }
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            failures
        }));
    }
    let mut owner_by_hash: HashMap<String, &str> = HashMap::new();
    for round in 0..100 {
        if round == 50 {
            // Mid-load, an operator saves a broken table and reloads: rejected with its
            // errors, traffic unaffected, and the fixed file works again.
            let good = std::fs::read_to_string(p.routes_path()).unwrap();
            std::fs::write(
                p.routes_path(),
                good.replace("unknown = \"old\"", "unknown = \"olde\""),
            )
            .unwrap();
            let (code, v) = p.admin("POST", "/routes/reload", None).await;
            assert_eq!(code, 422, "{v}");
            assert!(
                v["errors"][0]["message"]
                    .as_str()
                    .unwrap()
                    .contains("unknown target \"olde\""),
                "{v}"
            );
            std::fs::write(p.routes_path(), good).unwrap();
        }
        let (code, v) = p
            .admin(
                "POST",
                "/routes/cutover",
                Some(json!({"site": "berlin", "to": "new"})),
            )
            .await;
        assert_eq!(code, 200, "{v}");
        owner_by_hash.insert(
            v["to"].as_str().unwrap().split('-').nth(1).unwrap().into(),
            "new",
        );
        owner_by_hash.insert(
            v["from"]
                .as_str()
                .unwrap()
                .split('-')
                .nth(1)
                .unwrap()
                .into(),
            "old",
        );
        let (code, v) = p.admin("POST", "/routes/rollback", Some(json!({}))).await;
        assert_eq!(code, 200, "{v}");
    }
    // Let the clients overlap the last changes, then stop them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let failures = c.await.unwrap();
        assert!(failures.is_empty(), "failed sends: {failures:?}");
    }
    let total = sent.load(Ordering::Relaxed) as usize;
    assert!(
        total > 50,
        "only {total} messages were sent during the changes"
    );
    eprintln!("zero-downtime: {total} messages sent during 100 cutovers and 100 rollbacks");
    let o = old.wait_for(1).await;
    let n = new.wait_for(1).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut by_side = [(&o, "old"), (&n, "new")];
    for (msgs, side) in &mut by_side {
        for m in msgs.as_slice() {
            let text = m.body_text();
            let id = text
                .lines()
                .find_map(|l| l.strip_prefix("Message-ID: "))
                .unwrap()
                .to_string();
            *seen.entry(id).or_default() += 1;
            let hash = text
                .split("(coexist, table ")
                .nth(1)
                .and_then(|r| r.split(')').next())
                .and_then(|v| v.split('-').nth(1))
                .unwrap();
            let expect = owner_by_hash.get(hash).copied().unwrap_or("old");
            assert_eq!(
                *side, expect,
                "{:?} under table {hash} went to {side}",
                m.rcpts
            );
        }
    }
    // Wait for stragglers, then: exactly once each.
    for _ in 0..100 {
        if o.len() + n.len() >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivered = old.messages().len() + new.messages().len();
    assert_eq!(delivered, total, "sent {total}, delivered {delivered}");
    assert!(
        seen.values().all(|&c| c == 1),
        "duplicates: {:?}",
        seen.iter().filter(|(_, c)| **c > 1).collect::<Vec<_>>()
    );
    assert!(!n.is_empty() && !o.is_empty(), "both owners were exercised");
    let (_, s) = p.admin("GET", "/status", None).await;
    assert_eq!(
        s["version"].as_str().unwrap(),
        p.running.router.snapshot().version().to_string()
    );
    // After the last rollback the site is back on its original owner: the first version.
    assert!(s["version"].as_str().unwrap().starts_with("1-"), "{s}");
}

/// Moves site berlin to new through the admin API; the change must apply.
async fn cut_berlin_over(p: &Proxy) -> serde_json::Value {
    let (code, v) = p
        .admin(
            "POST",
            "/routes/cutover",
            Some(json!({"site": "berlin", "to": "new"})),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    v
}

/// Versions in the kept history, oldest first.
async fn history_versions(p: &Proxy) -> Vec<String> {
    let (_, h) = p.admin("GET", "/routes/history", None).await;
    let mut v: Vec<String> = h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_str().unwrap().to_string())
        .collect();
    v.reverse();
    v
}

#[tokio::test]
async fn a_hand_edit_that_was_not_reloaded_is_never_lost_nor_applied_under_another_name() {
    let (_old, _new, p) = setup().await;
    cut_berlin_over(&p).await;
    let after_cutover = std::fs::read_to_string(p.routes_path()).unwrap();
    // The operator edits by hand (a comment, and paris moves back to old) and does not
    // reload.
    let edited = after_cutover.replace(
        "[sites.paris]\nowner = \"new\"",
        "# paris waits for the new firewall\n[sites.paris]\nowner = \"old\"",
    );
    assert_ne!(edited, after_cutover);
    std::fs::write(p.routes_path(), &edited).unwrap();

    // Rollback refuses: it names the file and says what the pending edit would move.
    let (code, v) = p.admin("POST", "/routes/rollback", Some(json!({}))).await;
    assert_eq!(code, 409, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("rollback refused"), "{msg}");
    assert!(msg.contains("routes.toml"), "{msg}");
    assert!(msg.contains("would move 1 mailbox"), "{msg}");
    assert!(msg.contains("alice@example.com"), "{msg}");
    assert!(
        msg.contains("coexist reload") && msg.contains("--force"),
        "{msg}"
    );
    assert_eq!(v["pending"]["diff"]["moved_total"], 1, "{v}");
    assert_eq!(std::fs::read_to_string(p.routes_path()).unwrap(), edited);
    // A cutover refuses too: the paris move would otherwise ride along as "berlin".
    let (code, v) = p
        .admin(
            "POST",
            "/routes/cutover",
            Some(json!({"site": "berlin", "to": "old"})),
        )
        .await;
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("cutover site berlin -> old refused")
    );
    let (_, s) = p.admin("GET", "/status", None).await;
    assert!(s["version"].as_str().unwrap().starts_with("2-"), "{s}");
    assert_eq!(std::fs::read_to_string(p.routes_path()).unwrap(), edited);

    // Forced: the edit is kept in the state directory first, its path reported.
    let (code, v) = p
        .admin("POST", "/routes/rollback?force=1", Some(json!({})))
        .await;
    assert_eq!(code, 200, "{v}");
    assert!(v["to"].as_str().unwrap().starts_with("1-"), "{v}");
    let kept = v["kept"].as_array().unwrap();
    assert_eq!(kept.len(), 1, "{v}");
    assert!(kept[0]["file"].as_str().unwrap().ends_with("routes.toml"));
    let kept_at = kept[0]["kept_at"].as_str().unwrap();
    assert!(kept_at.contains("set-aside"), "{kept_at}");
    assert_eq!(std::fs::read_to_string(kept_at).unwrap(), edited);
    // The rollback restored exactly the first version's file, without the edit.
    assert_eq!(
        std::fs::read_to_string(p.routes_path()).unwrap(),
        support::ROUTES
    );
    // The pending move never became live under the rollback's name.
    let (_, l) = p
        .admin("GET", "/lookup?address=alice%40example.com", None)
        .await;
    assert_eq!(l["owner"], "new", "{l}");
}

#[tokio::test]
async fn a_forced_cutover_is_made_to_the_active_files_and_keeps_the_edit() {
    let (_old, _new, p) = setup().await;
    let edited = support::ROUTES.replace(
        "[sites.paris]\nowner = \"new\"",
        "[sites.paris]\nowner = \"old\"",
    );
    std::fs::write(p.routes_path(), &edited).unwrap();
    let (code, v) = p
        .admin(
            "POST",
            "/routes/cutover?force=1",
            Some(json!({"site": "berlin", "to": "new"})),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["diff"]["moved_total"], 2,
        "only berlin's two mailboxes: {v}"
    );
    let kept_at = v["kept"][0]["kept_at"].as_str().unwrap();
    assert_eq!(std::fs::read_to_string(kept_at).unwrap(), edited);
    assert_eq!(
        std::fs::read_to_string(p.routes_path()).unwrap(),
        support::ROUTES.replace(
            "[sites.berlin]\nowner = \"old\"",
            "[sites.berlin]\nowner = \"new\""
        )
    );
}

#[tokio::test]
async fn a_cutover_that_changes_nothing_creates_no_version() {
    let (_old, _new, p) = setup().await;
    cut_berlin_over(&p).await;
    let before = history_versions(&p).await;
    let file = std::fs::read_to_string(p.routes_path()).unwrap();
    // paris is already on new; so is berlin now; alice already routes to new.
    for body in [
        json!({"site": "paris", "to": "new"}),
        json!({"site": "berlin", "to": "new"}),
    ] {
        let (code, v) = p.admin("POST", "/routes/cutover", Some(body)).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["changed"], false, "{v}");
        assert_eq!(v["applied"], false, "{v}");
        assert_eq!(v["from"], v["to"], "{v}");
    }
    assert_eq!(history_versions(&p).await, before);
    assert_eq!(std::fs::read_to_string(p.routes_path()).unwrap(), file);
    // A reload of unchanged files is nothing to change too.
    let (code, v) = p.admin("POST", "/routes/reload", None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["changed"], false, "{v}");
    assert_eq!(history_versions(&p).await, before);
    // So the next rollback undoes the real change.
    let (code, v) = p.admin("POST", "/routes/rollback", Some(json!({}))).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["diff"]["moved_total"], 2, "{v}");
    assert!(v["to"].as_str().unwrap().starts_with("1-"), "{v}");
}

/// A config for the `coexist` binary that names `p`'s admin API (the proxy's own config
/// says port 0).
fn cli_config(p: &Proxy) -> std::path::PathBuf {
    let own = std::fs::read_to_string(p.dir.path().join("coexist.toml")).unwrap();
    let cli = own.replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"{}\"", p.running.admin_addr),
        1,
    );
    assert_ne!(
        own, cli,
        "the proxy's config has no [admin] listen to point at"
    );
    let path = p.dir.path().join("cli.toml");
    std::fs::write(&path, cli).unwrap();
    path
}

/// Runs the binary without blocking the proxy's runtime; `unset` names variables removed
/// from its environment.
async fn coexist_cli(args: Vec<String>, unset: &[&'static str]) -> std::process::Output {
    let unset = unset.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_coexist"));
        c.args(&args);
        for v in unset {
            c.env_remove(v);
        }
        c.output().expect("run coexist")
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn history_names_the_operator_without_user_in_the_environment() {
    let (_old, _new, p) = setup().await;
    let cfg = cli_config(&p).display().to_string();
    let o = coexist_cli(
        ["cutover", "berlin", "--to", "new", "-c", &cfg]
            .map(String::from)
            .to_vec(),
        &["USER", "LOGNAME"],
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    let me = String::from_utf8_lossy(&id.stdout).trim().to_string();
    assert!(!me.is_empty(), "id -un named nobody");
    let (_, h) = p.admin("GET", "/routes/history", None).await;
    // Newest first.
    let last = h["versions"][0].clone();
    assert_eq!(
        last["what"].as_str().map(|w| w.contains("berlin")),
        Some(true),
        "{h}"
    );
    let by = last["by"].as_str().unwrap_or("");
    assert!(
        by.starts_with(&format!("{me}@")) && by.ends_with(" (cli)"),
        "expected the cutover by {me}@… (cli), history says {by:?}"
    );
}

#[tokio::test]
async fn a_rejected_reload_puts_the_http_status_on_the_headline() {
    let (_old, _new, p) = setup().await;
    let cfg = cli_config(&p).display().to_string();
    let good = std::fs::read_to_string(p.routes_path()).unwrap();
    std::fs::write(
        p.routes_path(),
        good.replace("site = \"berlin\"", "site = \"atlantis\""),
    )
    .unwrap();
    let o = coexist_cli(["reload", "-c", &cfg].map(String::from).to_vec(), &[]).await;
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines.first().is_some_and(
            |l| l.starts_with("coexist: routing table rejected") && l.ends_with(" (HTTP 422)")
        ),
        "expected the status at the end of the first line:\n{err}"
    );
    let last = lines.last().copied().unwrap_or("");
    assert!(
        last.contains("unknown site \"atlantis\"") && !last.contains("HTTP"),
        "the last `file:line: message` must stay as the table check says it:\n{err}"
    );
    assert_eq!(err.matches("HTTP").count(), 1, "{err}");
}

#[tokio::test]
async fn status_into_a_closed_pipe_ends_quietly() {
    let (_old, _new, p) = setup().await;
    let cfg = cli_config(&p).display().to_string();
    let o = tokio::task::spawn_blocking(move || {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        std::process::Command::new(env!("CARGO_BIN_EXE_coexist"))
            .args(["status", "-c", &cfg])
            .stdout(writer)
            .output()
            .expect("run coexist")
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "`coexist status | head -1` must end quietly: {err}"
    );
    assert_eq!(o.status.code(), Some(0), "{err}");
}

#[tokio::test]
async fn public_status_opens_the_read_only_pages_and_nothing_else() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), support::ROUTES).unwrap();
    std::fs::write(dir.path().join("admin.token"), "s3cret-token\n").unwrap();
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\npublic_status = true\n\
         [smtp]\n[[smtp.listener]]\nlisten = \"127.0.0.1:0\"\nmode = \"relay\"\n\
         [targets.old]\nsmtp = [\"{}\"]\n[targets.new]\nsmtp = [\"{}\"]\n",
        old.addr, new.addr
    );
    std::fs::write(dir.path().join("coexist.toml"), cfg).unwrap();
    let running = Running::start(Config::load(&dir.path().join("coexist.toml")).unwrap())
        .await
        .unwrap();
    let a = running.admin_addr;
    let token = Some("s3cret-token".to_string());
    let (code, v) = admin_call(
        a,
        token.clone(),
        "POST",
        "/routes/cutover",
        Some(json!({"mailbox": "bob@example.com", "to": "new"})),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    for path in ["/status", "/metrics", "/"] {
        let (code, _) = admin_call(a, None, "GET", path, None).await;
        assert_eq!(code, 200, "GET {path} without the token");
    }
    // Open pages count the pinned mailboxes but do not name them, nor who changed what.
    let (_, open) = admin_call(a, None, "GET", "/status", None).await;
    assert_eq!(open["pinned_total"], 1, "{open}");
    assert_eq!(open["pinned"], json!([]), "{open}");
    let (_, with_token) = admin_call(a, token.clone(), "GET", "/status", None).await;
    assert_eq!(with_token["pinned"][0]["address"], "bob@example.com");
    // A backend's last error can name internal addresses: for the token holder only.
    let server = |v: &serde_json::Value| v["targets"][0]["smtp"][0].clone();
    assert_eq!(server(&open)["up"], true, "{open}");
    assert!(server(&open).get("last_error").is_none(), "{open}");
    assert!(
        server(&with_token).get("last_error").is_some(),
        "{with_token}"
    );
    let page = |token: Option<String>| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
        let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    };
    let open_page = page(None).await;
    assert!(open_page.starts_with("HTTP/1.1 200"), "{open_page}");
    assert!(!open_page.contains("bob@example.com"), "{open_page}");
    assert!(
        !open_page.contains("(cli)") && !open_page.contains("<h2>History"),
        "{open_page}"
    );
    let full_page = page(token).await;
    assert!(full_page.contains("bob@example.com") && full_page.contains("<h2>History"));
    for path in [
        "/lookup?address=alice%40example.com",
        "/routes/history",
        "/queue",
    ] {
        let (code, _) = admin_call(a, None, "GET", path, None).await;
        assert_eq!(code, 401, "GET {path} needs the token");
    }
    for path in [
        "/routes/reload",
        "/routes/rollback",
        "/routes/cutover",
        "/status",
    ] {
        let (code, _) = admin_call(a, None, "POST", path, Some(json!({}))).await;
        assert_eq!(code, 401, "POST {path} needs the token");
    }
}

#[tokio::test]
async fn serve_creates_the_live_table_from_its_seed_once() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    std::fs::write(etc.join("routes.toml"), support::ROUTES).unwrap();
    let cfg = format!(
        "[routes]\npath = \"../var/routes/routes.toml\"\nseed = \"routes.toml\"\n\
         state_dir = \"../var/state\"\n[spool]\ndir = \"../var/spool\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [smtp]\n[[smtp.listener]]\nlisten = \"127.0.0.1:0\"\nmode = \"relay\"\n\
         [targets.old]\nsmtp = [\"{}\"]\n[targets.new]\nsmtp = [\"{}\"]\n",
        old.addr, new.addr
    );
    let cfg_path = etc.join("coexist.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let running = Running::start(Config::load(&cfg_path).unwrap())
        .await
        .unwrap();
    let live = dir.path().join("var/routes/routes.toml");
    assert_eq!(std::fs::read_to_string(&live).unwrap(), support::ROUTES);
    let (code, v) = admin_call(
        running.admin_addr,
        None,
        "POST",
        "/routes/cutover",
        Some(json!({"site": "berlin", "to": "new"})),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    running.shutdown(Duration::from_secs(2)).await;
    assert_eq!(
        std::fs::read_to_string(etc.join("routes.toml")).unwrap(),
        support::ROUTES,
        "the seed is never written"
    );
    // A restart serves the live table (with the cutover), not the seed.
    let running = Running::start(Config::load(&cfg_path).unwrap())
        .await
        .unwrap();
    let (_, l) = admin_call(
        running.admin_addr,
        None,
        "GET",
        "/lookup?address=bob%40example.com",
        None,
    )
    .await;
    assert_eq!(l["owner"], "new", "{l}");
}
