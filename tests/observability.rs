//! What an operator watches: one log line per recipient, `/metrics` as Prometheus expects
//! it, the status page, `/status` and `coexist status` during a cutover.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Value, json};
use support::{Backend, Behaviour, Client, Proxy};

/// Every log line of this test binary, as JSON (the proxy runs in-process). Tests tell
/// their own lines apart by a sender address of their own.
fn log_lines() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new("coexist=info"))
            .with_writer(move || Sink(Arc::clone(&sink)))
            .init();
        buf
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured `recipient` lines whose sender is `sender`.
fn recipient_lines(sender: &str) -> Vec<Value> {
    let text = String::from_utf8(log_lines().lock().unwrap().clone()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v| v["fields"]["message"] == "recipient" && v["fields"]["sender"] == sender)
        .collect()
}

#[tokio::test]
async fn every_recipient_gets_one_log_line_whatever_its_outcome() {
    log_lines();
    let old = Backend::start(Behaviour {
        rcpt_replies: [(
            "bob@example.com".to_string(),
            "550 5.1.1 <bob@example.com>: mailbox unavailable".to_string(),
        )]
        .into(),
        ..Behaviour::default()
    })
    .await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    let version = p.running.router.snapshot().version().to_string();
    let sender = "log-test@internet.example";
    let mut c = Client::connect(p.relay()).await;
    let client = c.io.get_ref().local_addr().unwrap().to_string();
    c.expect("EHLO log.test", "250").await;
    c.expect(&format!("MAIL FROM:<{sender}>"), "250").await;
    c.expect("RCPT TO:<alice@example.com>", "250").await;
    c.expect("RCPT TO:<someone@gmail.example>", "550 5.7.1")
        .await;
    c.expect("RCPT TO:<nobody@example.org>", "550 5.1.1").await;
    c.expect("RCPT TO:<bob@example.com>", "550 5.1.1").await;
    c.expect("RSET", "250").await;
    c.expect("QUIT", "221").await;

    // Each line is written before its reply is sent: all four are there now.
    let lines = recipient_lines(sender);
    let by_rcpt: BTreeMap<&str, &Value> = lines
        .iter()
        .map(|l| (l["fields"]["recipient"].as_str().unwrap(), l))
        .collect();
    assert_eq!(lines.len(), 4, "one line per recipient: {lines:#?}");
    assert_eq!(by_rcpt.len(), 4, "{lines:#?}");
    let expect = [
        (
            "alice@example.com",
            "INFO",
            "accepted",
            "250 2.1.5",
            "new",
            "paris",
        ),
        (
            "someone@gmail.example",
            "INFO",
            "relay_denied",
            "550 5.7.1",
            "-",
            "-",
        ),
        (
            "nobody@example.org",
            "INFO",
            "unknown",
            "550 5.1.1",
            "-",
            "-",
        ),
        (
            "bob@example.com",
            "INFO",
            "rejected",
            "550 5.1.1",
            "old",
            "berlin",
        ),
    ];
    for (rcpt, level, result, code, target, site) in expect {
        let l = by_rcpt[rcpt];
        let f = &l["fields"];
        assert_eq!(l["level"], level, "{l}");
        assert_eq!(f["client"], client.as_str(), "{l}");
        assert_eq!(f["sender"], sender, "{l}");
        assert_eq!(f["result"], result, "{l}");
        assert_eq!(f["code"], code, "{l}");
        assert_eq!(f["target"], target, "{l}");
        assert_eq!(f["site"], site, "{l}");
        assert_eq!(f["version"], version.as_str(), "{l}");
        assert!(f["reply"].as_str().unwrap().starts_with(code), "{l}");
    }
}

#[tokio::test]
async fn an_unreachable_target_and_a_deferred_recipient_are_logged_too() {
    log_lines();
    // new's server is a port nobody listens on.
    let old = Backend::start(Behaviour::default()).await;
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_addr = gone.local_addr().unwrap();
    drop(gone);
    let p = Proxy::start(old.addr, gone_addr, "mixed_recipients = \"defer\"", "").await;
    let sender = "log-test-2@internet.example";
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO log.test", "250").await;
    c.expect(&format!("MAIL FROM:<{sender}>"), "250").await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    c.expect("RCPT TO:<alice@example.com>", "452 4.5.3").await;
    c.expect("RSET", "250").await;
    c.expect(&format!("MAIL FROM:<{sender}>"), "250").await;
    c.expect("RCPT TO:<alice@example.com>", "451 4.4.1").await;
    c.expect("QUIT", "221").await;
    let lines = recipient_lines(sender);
    let got: Vec<(&str, &str, &str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["fields"]["recipient"].as_str().unwrap(),
                l["level"].as_str().unwrap(),
                l["fields"]["result"].as_str().unwrap(),
                l["fields"]["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("bob@example.com", "INFO", "accepted", "250 2.1.5"),
            ("alice@example.com", "INFO", "deferred", "452 4.5.3"),
            ("alice@example.com", "WARN", "tempfail", "451 4.4.1"),
        ],
        "{lines:#?}"
    );
}

/// Sends one message to each recipient and expects 250.
async fn send(p: &Proxy, sender: &str, rcpts: &[&str]) {
    for r in rcpts {
        let mut c = Client::start_data(p.relay(), sender, &[r]).await;
        c.expect("Subject: t\r\n\r\nbody\r\n.", "250").await;
        c.expect("QUIT", "221").await;
    }
}

async fn get_text(p: &Proxy, path: &str) -> String {
    let (code, v) = p.admin("GET", path, None).await;
    assert_eq!(code, 200, "{v}");
    v.as_str()
        .unwrap_or_else(|| panic!("{path} is not text: {v}"))
        .to_string()
}

#[tokio::test]
async fn metrics_have_help_type_histograms_and_one_active_version() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    send(
        &p,
        "metrics@internet.example",
        &["alice@example.com", "bob@example.com"],
    )
    .await;
    // Two swaps: a site cutover and a reload of the edited file.
    let (code, v) = p
        .admin(
            "POST",
            "/routes/cutover",
            Some(json!({"site": "berlin", "to": "new"})),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let routes = std::fs::read_to_string(p.routes_path()).unwrap();
    std::fs::write(
        p.routes_path(),
        routes.replace(
            "[sites.paris]\nowner = \"new\"",
            "[sites.paris]\nowner = \"old\"",
        ),
    )
    .unwrap();
    let (code, v) = p.admin("POST", "/routes/reload", None).await;
    assert_eq!(code, 200, "{v}");
    let active = v["to"].as_str().unwrap().to_string();
    assert!(active.starts_with("3-"), "{v}");

    let text = get_text(&p, "/metrics").await;
    let mut help = BTreeSet::new();
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for l in text.lines().filter(|l| !l.is_empty()) {
        if let Some(r) = l.strip_prefix("# HELP ") {
            let (name, h) = r.split_once(' ').unwrap();
            assert!(!h.trim().is_empty(), "{l}");
            assert!(help.insert(name.to_string()), "HELP twice: {l}");
        } else if let Some(r) = l.strip_prefix("# TYPE ") {
            let (name, t) = r.split_once(' ').unwrap();
            assert!(
                types.insert(name.to_string(), t.to_string()).is_none(),
                "TYPE twice: {l}"
            );
        } else {
            assert!(!l.starts_with('#'), "{l}");
            let name = l.split(['{', ' ']).next().unwrap();
            samples.push((name.to_string(), l.to_string()));
        }
    }
    for (name, line) in &samples {
        let family = [name.as_str()]
            .into_iter()
            .chain(
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|s| name.strip_suffix(s)),
            )
            .find(|f| types.contains_key(*f))
            .unwrap_or_else(|| panic!("no TYPE for {line}\n{text}"));
        assert!(help.contains(family), "no HELP for {family}\n{text}");
    }
    for must in [
        "coexist_smtp_sessions_total",
        "coexist_smtp_recipients_total",
        "coexist_smtp_messages_total",
        "coexist_route_swaps_total",
        "coexist_route_table_mailboxes",
        "coexist_backend_up",
    ] {
        assert!(types.contains_key(must), "{must} missing\n{text}");
    }
    let latency = "coexist_smtp_final_reply_seconds";
    assert_eq!(
        types.get(latency).map(String::as_str),
        Some("histogram"),
        "{text}"
    );
    assert!(
        samples
            .iter()
            .any(|(n, l)| n == &format!("{latency}_bucket") && l.contains("le=\"")),
        "{text}"
    );
    assert!(
        samples
            .iter()
            .any(|(n, _)| n == &format!("{latency}_count"))
    );
    let info = "coexist_route_table_version_info";
    assert_eq!(types.get(info).map(String::as_str), Some("gauge"));
    let versions: Vec<&String> = samples
        .iter()
        .filter(|(n, _)| n == info)
        .map(|(_, l)| l)
        .collect();
    assert_eq!(
        versions,
        [&format!("{info}{{version=\"{active}\"}} 1")],
        "only the active version\n{text}"
    );
}

#[tokio::test]
async fn status_page_json_and_cli_show_progress_pins_and_traffic() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    // Pilot user: bob (berlin, owned by old) moves to new ahead of his site.
    let (code, v) = p
        .admin(
            "POST",
            "/routes/cutover",
            Some(json!({"mailbox": "bob@example.com", "to": "new"})),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    // berlin: bob → new, carol@example.org → old, twice.
    send(
        &p,
        "status@internet.example",
        &["bob@example.com", "carol@example.org", "carol@example.org"],
    )
    .await;

    let (code, s) = p.admin("GET", "/status", None).await;
    assert_eq!(code, 200);
    let berlin = s["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "berlin")
        .unwrap();
    assert_eq!(berlin["owner"], "old", "{s}");
    assert_eq!(berlin["mailboxes"], 2);
    assert_eq!(
        berlin["mailboxes_by_target"],
        json!({"old": 1, "new": 1}),
        "{s}"
    );
    assert_eq!(berlin["recipients_30m"], json!({"old": 2, "new": 1}), "{s}");
    assert_eq!(
        s["pinned"],
        json!([{"address": "bob@example.com", "site": "berlin", "owner": "new"}]),
        "{s}"
    );
    assert_eq!(s["pinned_total"], 1);
    assert_eq!(s["traffic"]["window_minutes"], 30);
    assert_eq!(s["traffic"]["targets"]["old"]["recipients"], 2, "{s}");
    assert_eq!(s["traffic"]["targets"]["new"]["recipients"], 1, "{s}");

    let html = get_text(&p, "/").await;
    assert!(
        html.contains("<meta http-equiv=\"refresh\" content=\"5\">"),
        "{html}"
    );
    let row = html
        .split("<tr id=\"site-berlin\">")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_else(|| panic!("no berlin row: {html}"));
    for part in [
        "<td>berlin</td><td>old</td><td>2</td>",
        "data-mailboxes=\"old\">",
        "old 1 (50%)",
        "new 1 (50%)",
        "old 2 (66%)",
        "new 1 (33%)",
    ] {
        assert!(row.contains(part), "{part:?} not in {row}");
    }
    assert!(html.contains("<b id=\"pinned-total\">1</b>"), "{html}");
    assert!(
        html.contains("<tr><td>bob@example.com</td><td>berlin</td><td>old</td><td>new</td></tr>"),
        "{html}"
    );

    // The CLI, against this proxy's admin address.
    let cfg = std::fs::read_to_string(p.dir.path().join("coexist.toml"))
        .unwrap()
        .replacen(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"{}\"", p.running.admin_addr),
            1,
        );
    let cli_cfg = p.dir.path().join("cli.toml");
    std::fs::write(&cli_cfg, cfg).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_coexist"))
            .args(["status", "-c"])
            .arg(&cli_cfg)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "    mailboxes   new 1 (50%), old 1 (50%)",
        "    recipients  new 1 (33%), old 2 (66%)",
        "pinned away from their site's owner: 1",
        "bob@example.com",
        "traffic (accepted recipients per target, last 30 min):",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("old") && l.contains("2 recipients")),
        "{text}"
    );
}
