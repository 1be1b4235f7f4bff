//! Faults: backends that fail mid-message, and coexist itself killed with SIGKILL. Per
//! message: delivered exactly once, or refused to the client — never acknowledged and lost.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use support::{Backend, Behaviour, Client, Proxy};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Serve {
    child: Child,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(cfg: &std::path::Path, relay: u16) -> Serve {
    let child = Command::new(env!("CARGO_BIN_EXE_coexist"))
        .args(["serve", "-c"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", relay)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Serve { child }
}

#[tokio::test]
async fn sigkill_after_250_loses_nothing_and_mid_data_delivers_nothing() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour {
        tempfail_data: Arc::new(AtomicU32::new(1)),
        ..Behaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), support::ROUTES).unwrap();
    let (relay, admin) = (free_port(), free_port());
    let cfg = dir.path().join("coexist.toml");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[smtp]\nhostname = \"mx.test\"\n\
             [[smtp.listener]]\nlisten = \"127.0.0.1:{relay}\"\nmode = \"relay\"\n\
             [targets.old]\nsmtp = [\"{}\"]\n[targets.new]\nsmtp = [\"{}\"]\n\
             [spool]\nretry_initial_secs = 30\n",
            old.addr, new.addr
        ),
    )
    .unwrap();
    let relay_addr: std::net::SocketAddr = format!("127.0.0.1:{relay}").parse().unwrap();

    let mut s = serve(&cfg, relay).await;
    // 1. A split message: OLD takes it, NEW tempfails, the rest is spooled, the client gets 250.
    let mut c = Client::start_data(
        relay_addr,
        "a@internet.example",
        &["alice@example.com", "bob@example.com"],
    )
    .await;
    c.expect("Message-ID: <acked@test>\r\n\r\nacknowledged\r\n.", "250")
        .await;
    // 2. Another message, cut off mid-DATA by the kill: the client never saw 250.
    let mut c2 = Client::start_data(relay_addr, "a@internet.example", &["bob@example.com"]).await;
    c2.send(b"Message-ID: <cut@test>\r\n\r\nhalf of it").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.child.kill().unwrap(); // SIGKILL: no cleanup of any kind
    s.child.wait().unwrap();
    drop(s);
    assert!(new.messages().is_empty());
    assert_eq!(
        old.messages().len(),
        1,
        "only the acknowledged message reached OLD"
    );

    // Restart; `queue retry` makes the spooled part due at once (it was not due for 30 s).
    let _s = serve(&cfg, relay).await;
    let (code, _) = support::admin_call(
        format!("127.0.0.1:{admin}").parse().unwrap(),
        None,
        "POST",
        "/queue/retry",
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(code, 200);
    let n = new.wait_for(1).await;
    assert_eq!(
        n.len(),
        1,
        "the acknowledged part was recovered from the spool"
    );
    assert!(n[0].body_text().contains("<acked@test>"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all: Vec<String> = old
        .messages()
        .iter()
        .chain(new.messages().iter())
        .map(support::Received::body_text)
        .collect();
    assert_eq!(all.len(), 2, "exactly once each side");
    assert!(
        !all.iter().any(|t| t.contains("<cut@test>")),
        "the unacknowledged message went nowhere"
    );
}

#[tokio::test]
async fn a_backend_that_closes_mid_data_gets_nothing_and_the_client_is_told() {
    let old = Backend::start(Behaviour {
        close_mid_data: Some(10),
        ..Behaviour::default()
    })
    .await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    // Single target: the client gets a temporary failure and will retry.
    let mut c = Client::start_data(p.relay(), "a@internet.example", &["bob@example.com"]).await;
    let r = c
        .cmd(&format!(
            "Subject: big\r\n\r\n{}\r\n.",
            "x".repeat(100) + &"\r\nxxxxxxxx".repeat(500)
        ))
        .await;
    assert!(r.starts_with("451"), "{r}");
    assert!(old.messages().is_empty());
    // Split: NEW takes it, OLD's part is spooled (OLD keeps failing, so it stays there).
    c.expect("MAIL FROM:<a@internet.example>", "250").await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    c.expect("RCPT TO:<alice@example.com>", "250").await;
    c.expect("DATA", "354").await;
    let r = c
        .cmd(&format!(
            "Subject: big\r\n\r\n{}\r\n.",
            "y".repeat(100) + &"\r\nyyyyyyyy".repeat(500)
        ))
        .await;
    assert!(r.starts_with("250") && r.contains("queued"), "{r}");
    assert_eq!(new.wait_for(1).await.len(), 1);
    let q = p.running.spool.list();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].rcpts[0].address, "bob@example.com");
}

#[tokio::test]
async fn a_backend_that_resets_after_250_costs_nothing() {
    let old = Backend::start(Behaviour {
        close_after_data: true,
        ..Behaviour::default()
    })
    .await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    // The pooled connection the first message used is dead when the second starts: the
    // proxy must notice and use a fresh one, without the client seeing anything.
    for i in 0..3 {
        let mut c = Client::start_data(p.relay(), "a@internet.example", &["bob@example.com"]).await;
        c.expect(&format!("Message-ID: <r{i}@test>\r\n\r\nhi\r\n."), "250")
            .await;
    }
    let m = old.wait_for(3).await;
    assert_eq!(m.len(), 3, "each message exactly once");
}

#[tokio::test]
async fn a_backend_that_stalls_past_the_timeout_is_a_temporary_failure() {
    let old = Backend::start(Behaviour {
        stall_at_end: true,
        ..Behaviour::default()
    })
    .await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "backend_timeout_secs = 1", "").await;
    let mut c = Client::start_data(p.relay(), "a@internet.example", &["bob@example.com"]).await;
    let started = std::time::Instant::now();
    let r = c.cmd("Subject: stall\r\n\r\nhi\r\n.").await;
    assert!(r.starts_with("451"), "{r}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The client stays in sync and can go on.
    c.expect("NOOP", "250").await;
}
