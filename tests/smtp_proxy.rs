//! The SMTP proxy end to end: real sockets, a real SMTP client (lettre) or exact raw
//! commands, recording backends for the old and new sides.

mod support;

use std::collections::HashMap;
use std::fmt::Write as _;

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use support::{Backend, Behaviour, Client, Proxy, TestCert, base64};

fn message(to: &[&str], subject: &str) -> Message {
    let mut b = Message::builder()
        .from("sender@internet.example".parse::<Mailbox>().unwrap())
        .subject(subject);
    for t in to {
        b = b.to(t.parse::<Mailbox>().unwrap());
    }
    b.body(format!("Hello from {subject}\r\n")).unwrap()
}

fn relay_client(p: &Proxy) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(p.relay().port())
        .build()
}

async fn setup() -> (Backend, Backend, Proxy) {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    (old, new, p)
}

#[tokio::test]
async fn each_recipient_goes_to_its_owner() {
    let (old, new, p) = setup().await;
    let smtp = relay_client(&p);
    smtp.send(message(&["alice@example.com"], "to alice"))
        .await
        .unwrap();
    smtp.send(message(&["bob@example.com"], "to bob"))
        .await
        .unwrap();
    // Alias, case and subaddress all find alice (site paris → new).
    smtp.send(message(&["Alice.Smith+news@EXAMPLE.com"], "alias"))
        .await
        .unwrap();
    // Unknown in a routed domain → the domain's default (old).
    smtp.send(message(&["nobody@example.com"], "default"))
        .await
        .unwrap();
    let n = new.wait_for(2).await;
    let o = old.wait_for(2).await;
    assert_eq!(n.len(), 2);
    assert_eq!(o.len(), 2);
    assert_eq!(n[0].rcpts, ["alice@example.com"]);
    assert!(n[0].body_text().contains("Subject: to alice"));
    assert_eq!(n[1].rcpts, ["Alice.Smith+news@EXAMPLE.com"]);
    assert_eq!(o[0].rcpts, ["bob@example.com"]);
    assert_eq!(o[1].rcpts, ["nobody@example.com"]);
    // Our own Received header comes first.
    assert!(
        n[0].body_text().starts_with("Received: from "),
        "{}",
        n[0].body_text()
    );
    assert!(
        n[0].body_text().contains("by mx.test (coexist, table 1-"),
        "{}",
        n[0].body_text()
    );
}

#[tokio::test]
async fn mixed_recipients_are_delivered_once_to_each_side() {
    let (old, new, p) = setup().await;
    relay_client(&p)
        .send(message(
            &["alice@example.com", "bob@example.com", "nobody@example.com"],
            "mixed",
        ))
        .await
        .unwrap();
    let n = new.wait_for(1).await;
    let o = old.wait_for(1).await;
    assert_eq!(n.len(), 1);
    assert_eq!(o.len(), 1);
    assert_eq!(n[0].rcpts, ["alice@example.com"]);
    assert_eq!(o[0].rcpts, ["bob@example.com", "nobody@example.com"]);
    assert_eq!(n[0].data, o[0].data, "identical content on both sides");
    assert_eq!(n[0].from, "<sender@internet.example>");
}

#[tokio::test]
async fn relay_is_denied_and_unknown_rules_hold() {
    let (old, new, p) = setup().await;
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<a@internet.example>", "250").await;
    let r = c.expect("RCPT TO:<victim@gmail.com>", "550").await;
    assert!(r.contains("5.7.1"), "{r}");
    let r = c.expect("RCPT TO:<nobody@example.org>", "550").await;
    assert!(r.contains("5.1.1"), "{r}");
    c.expect("RCPT TO:<carol@example.org>", "250").await;
    c.expect("DATA", "354").await;
    let r = c.cmd("Subject: x\r\n\r\nhi\r\n.").await;
    assert!(r.starts_with("250"), "{r}");
    c.expect("QUIT", "221").await;
    assert_eq!(old.wait_for(1).await[0].rcpts, ["carol@example.org"]);
    assert!(new.messages().is_empty());
}

#[tokio::test]
async fn a_backend_refusal_reaches_the_client() {
    let old = Backend::start(Behaviour {
        rcpt_replies: HashMap::from([(
            "bob@example.com".to_string(),
            "552 5.2.2 Mailbox full".to_string(),
        )]),
        ..Behaviour::default()
    })
    .await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<a@internet.example>", "250").await;
    let r = c.expect("RCPT TO:<bob@example.com>", "552").await;
    assert_eq!(r, "552 5.2.2 Mailbox full");
    c.expect("RCPT TO:<alice@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.expect("Subject: x\r\n\r\nhi\r\n.", "250").await;
    assert_eq!(new.wait_for(1).await.len(), 1);
    assert!(old.messages().is_empty());
}

#[tokio::test]
async fn an_unreachable_target_gives_451_for_its_recipients_only() {
    let new = Backend::start(Behaviour::default()).await;
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = Proxy::start(dead, new.addr, "", "").await;
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<a@internet.example>", "250").await;
    let r = c.expect("RCPT TO:<bob@example.com>", "451").await;
    assert!(r.contains("4.4.1"), "{r}");
    c.expect("RCPT TO:<alice@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.expect("Subject: x\r\n\r\nhi\r\n.", "250").await;
    assert_eq!(new.wait_for(1).await[0].rcpts, ["alice@example.com"]);
}

#[tokio::test]
async fn defer_mode_sends_the_second_target_back_with_452() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "mixed_recipients = \"defer\"", "").await;
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<a@internet.example>", "250").await;
    c.expect("RCPT TO:<alice@example.com>", "250").await;
    let r = c.expect("RCPT TO:<bob@example.com>", "452").await;
    assert!(r.contains("4.5.3"), "{r}");
    c.expect("DATA", "354").await;
    c.expect("Subject: x\r\n\r\nhi\r\n.", "250").await;
    assert_eq!(new.wait_for(1).await.len(), 1);
    assert!(old.messages().is_empty());
}

#[tokio::test]
async fn bdat_is_translated_to_data() {
    let (old, _new, p) = setup().await;
    let mut c = Client::connect(p.relay()).await;
    let ehlo = c.expect("EHLO client.test", "250").await;
    assert!(ehlo.contains("CHUNKING"), "{ehlo}");
    c.expect("MAIL FROM:<a@internet.example>", "250").await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    let part1 = b"Subject: chunks\r\n\r\n.leading dot\r\n";
    c.send(format!("BDAT {}\r\n", part1.len()).as_bytes()).await;
    c.send(part1).await;
    let r = c.reply().await;
    assert!(r.starts_with("250"), "{r}");
    let part2 = b"last line";
    c.send(format!("BDAT {} LAST\r\n", part2.len()).as_bytes())
        .await;
    c.send(part2).await;
    let r = c.reply().await;
    assert!(r.starts_with("250"), "{r}");
    let m = old.wait_for(1).await;
    let text = m[0].body_text();
    // Dot-stuffed for DATA, CRLF added at the end.
    assert!(
        text.ends_with("Subject: chunks\r\n\r\n..leading dot\r\nlast line\r\n"),
        "{text:?}"
    );
}

#[tokio::test]
async fn smuggling_attempts_never_reach_a_backend() {
    let (old, new, p) = setup().await;
    for fake_end in ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r", "\r\n.\r"] {
        let mut c = Client::start_data(p.relay(), "a@internet.example", &["bob@example.com"]).await;
        let payload = format!(
            "Subject: innocent\r\n\r\nhello{fake_end}MAIL FROM:<ceo@example.com>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\nSubject: spoofed\r\n\r\nsend money\r\n.\r\n"
        );
        c.send(payload.as_bytes()).await;
        let r = c.reply().await;
        assert!(r.starts_with("554 5.6.0"), "{fake_end:?}: {r}");
        // The session stays usable and in sync.
        c.expect("RSET", "250").await;
        c.expect("QUIT", "221").await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(old.messages().is_empty(), "{:?}", old.messages());
    assert!(new.messages().is_empty(), "{:?}", new.messages());
}

#[tokio::test]
async fn bare_lf_in_bdat_is_refused_too() {
    let (old, _new, p) = setup().await;
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<a@internet.example>", "250").await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    let body = b"Subject: x\n\n.\nMAIL FROM:<x@y>\n";
    c.send(format!("BDAT {} LAST\r\n", body.len()).as_bytes())
        .await;
    c.send(body).await;
    let r = c.reply().await;
    assert!(r.starts_with("554 5.6.0"), "{r}");
    c.expect("NOOP", "250").await;
    assert!(old.messages().is_empty());
}

#[tokio::test]
async fn loop_guard_and_limits() {
    let (old, _new, p) = setup().await;
    let mut c = Client::start_data(p.relay(), "a@internet.example", &["bob@example.com"]).await;
    let mut msg = String::new();
    for i in 0..51 {
        let _ = write!(msg, "Received: from hop{i} by hop{}\r\n", i + 1);
    }
    msg.push_str("Subject: loop\r\n\r\nbody\r\n.");
    let r = c.cmd(&msg).await;
    assert!(r.starts_with("554 5.4.6"), "{r}");
    // Command line too long, bare LF in a command.
    let r = c.cmd(&format!("NOOP {}", "x".repeat(2000))).await;
    assert!(r.starts_with("500 5.5.2"), "{r}");
    c.send(b"NOOP\n").await;
    let r = c.reply().await;
    assert!(r.starts_with("500 5.5.2"), "{r}");
    // MAIL with a SIZE over the limit.
    let r = c.cmd("MAIL FROM:<a@b.example> SIZE=999999999999").await;
    assert!(r.starts_with("552"), "{r}");
    assert!(old.messages().is_empty());
}

#[tokio::test]
async fn starttls_discards_pipelined_plaintext() {
    let (old, _new, p) = setup().await;
    let s = tokio::net::TcpStream::connect(p.relay()).await.unwrap();
    let mut c = support::Client {
        io: tokio::io::BufReader::new(s),
    };
    c.reply().await;
    let ehlo = c.expect("EHLO client.test", "250").await;
    assert!(ehlo.contains("STARTTLS"));
    // The injected MAIL/RCPT must not be executed inside the TLS session.
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<bob@example.com>\r\n")
        .await;
    let r = c.reply().await;
    assert!(r.starts_with("220"), "{r}");
    let stream = c.io.into_inner();
    let connector = tokio_rustls::TlsConnector::from(insecure_client());
    let tls = connector
        .connect("localhost".try_into().unwrap(), stream)
        .await
        .unwrap();
    let mut c = support::Client {
        io: tokio::io::BufReader::new(tls),
    };
    // Had the injected MAIL run, this would be "503 nested MAIL".
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<a@internet.example>", "250").await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.expect("Subject: tls\r\n\r\nhi\r\n.", "250").await;
    let m = old.wait_for(1).await;
    assert_eq!(m.len(), 1);
    assert!(m[0].body_text().contains("with ESMTPS"));
}

#[tokio::test]
async fn backend_starttls_response_injection_is_discarded() {
    let cert = TestCert::new();
    let old = Backend::start(Behaviour {
        starttls: Some(cert.acceptor()),
        inject_after_starttls: Some("250 2.1.0 injected\r\n".into()),
        ..Behaviour::default()
    })
    .await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    relay_client(&p)
        .send(message(&["bob@example.com"], "over tls"))
        .await
        .unwrap();
    let m = old.wait_for(1).await;
    assert_eq!(m.len(), 1);
    assert!(m[0].tls, "the proxy used STARTTLS towards the backend");
    // Had the injected reply been read as the answer to EHLO or MAIL, the replies would
    // have been off by one and the transaction would have failed.
    assert_eq!(m[0].rcpts, ["bob@example.com"]);
}

#[tokio::test]
async fn connections_to_backends_are_reused() {
    let (old, _new, p) = setup().await;
    let smtp = relay_client(&p);
    for i in 0..5 {
        smtp.send(message(&["bob@example.com"], &format!("m{i}")))
            .await
            .unwrap();
    }
    assert_eq!(old.wait_for(5).await.len(), 5);
    // One connection from the start-up probe, one for all five messages.
    let conns = *old.connections.lock().unwrap();
    assert!(conns <= 2, "{conns} backend connections for 5 messages");
}

#[tokio::test]
async fn submission_routes_the_session_by_login() {
    let cert = TestCert::new();
    let users = HashMap::from([
        ("alice@corp.example.com".to_string(), "pw-a".to_string()),
        ("EXAMPLE\\bob".to_string(), "pw-b".to_string()),
    ]);
    let old = Backend::start(Behaviour {
        starttls: Some(cert.acceptor()),
        users: users.clone(),
        ..Behaviour::default()
    })
    .await;
    let new = Backend::start(Behaviour {
        starttls: Some(cert.acceptor()),
        users,
        ..Behaviour::default()
    })
    .await;
    let p = Proxy::start(old.addr, new.addr, "", "smtp_tls = \"required\"").await;
    let port = p.addr(coexist::config::ListenerMode::Submission).port();

    // No AUTH before TLS: the plain EHLO does not offer it and MAIL is refused.
    let mut c = Client::connect(p.addr(coexist::config::ListenerMode::Submission)).await;
    let ehlo = c.expect("EHLO client.test", "250").await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    c.expect(
        &format!("AUTH PLAIN {}", base64(b"\0alice@corp.example.com\0pw-a")),
        "530",
    )
    .await;
    c.expect("MAIL FROM:<alice@example.com>", "530").await;

    let tls = TlsParameters::builder("localhost".into())
        .dangerous_accept_invalid_certs(true)
        .build_rustls()
        .unwrap();
    let client = |user: &str, pw: &str| {
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(port)
            .tls(Tls::Required(tls.clone()))
            .credentials(Credentials::new(user.into(), pw.into()))
            .build()
    };
    // alice (site paris → new) sends to an outside address: her own server relays it.
    client("alice@corp.example.com", "pw-a")
        .send(message(&["friend@elsewhere.example"], "from alice"))
        .await
        .unwrap();
    client("EXAMPLE\\bob", "pw-b")
        .send(message(&["alice@example.com"], "from bob"))
        .await
        .unwrap();
    let wrong = client("EXAMPLE\\bob", "nope")
        .send(message(&["alice@example.com"], "bad password"))
        .await;
    assert!(wrong.is_err());
    let n = new.wait_for(1).await;
    let o = old.wait_for(1).await;
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].auth.as_deref(), Some("alice@corp.example.com"));
    assert_eq!(n[0].rcpts, ["friend@elsewhere.example"]);
    assert!(n[0].tls);
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].auth.as_deref(), Some("EXAMPLE\\bob"));
}

fn insecure_client() -> std::sync::Arc<rustls::ClientConfig> {
    coexist::net::tls::client_config(false, None).unwrap()
}

#[tokio::test]
async fn smtputf8_is_offered_only_when_every_target_has_it() {
    // Both sides speak SMTPUTF8: it is offered and a UTF-8 address routes to its owner.
    let utf8 = Behaviour {
        smtputf8: true,
        ..Behaviour::default()
    };
    let old = Backend::start(utf8.clone()).await;
    let new = Backend::start(utf8).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    let mut c = Client::connect(p.relay()).await;
    let ehlo = c.expect("EHLO client.test", "250").await;
    assert!(ehlo.contains("SMTPUTF8"), "{ehlo}");
    c.expect("MAIL FROM:<jürgen@internet.example> SMTPUTF8", "250")
        .await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.expect("Subject: grüße\r\n\r\nhallo\r\n.", "250").await;
    let m = old.wait_for(1).await;
    assert_eq!(m[0].from, "<jürgen@internet.example> SMTPUTF8");
    assert!(
        old.commands
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.contains("SMTPUTF8"))
    );

    // One side without it: not offered.
    let plain = Backend::start(Behaviour::default()).await;
    let utf8 = Backend::start(Behaviour {
        smtputf8: true,
        ..Behaviour::default()
    })
    .await;
    let p = Proxy::start(plain.addr, utf8.addr, "", "").await;
    let mut c = Client::connect(p.relay()).await;
    let ehlo = c.expect("EHLO client.test", "250").await;
    assert!(!ehlo.contains("SMTPUTF8"), "{ehlo}");
    assert!(ehlo.contains("8BITMIME"), "{ehlo}");
}

#[tokio::test]
async fn connection_caps_and_greeting_delay_hold() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(
        old.addr,
        new.addr,
        "max_connections_per_ip = 2\ngreeting_delay_ms = 300",
        "",
    )
    .await;
    // Talking before the greeting is refused.
    let mut eager = tokio::net::TcpStream::connect(p.relay()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut eager, b"EHLO spammer\r\n")
        .await
        .unwrap();
    let mut c = support::Client {
        io: tokio::io::BufReader::new(eager),
    };
    let r = c.reply().await;
    assert!(r.starts_with("554 5.5.0"), "{r}");
    // Two connections from one IP are served, the third is turned away.
    let a = Client::connect(p.relay()).await;
    let b = Client::connect(p.relay()).await;
    let s = tokio::net::TcpStream::connect(p.relay()).await.unwrap();
    let mut third = support::Client {
        io: tokio::io::BufReader::new(s),
    };
    let r = third.reply().await;
    assert!(r.starts_with("421 4.7.0"), "{r}");
    drop((a, b));
}

#[tokio::test]
async fn idle_clients_time_out() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "command_timeout_secs = 1", "").await;
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO client.test", "250").await;
    // Say nothing: the proxy closes with 421 after the command timeout.
    let r = c.reply().await;
    assert!(r.starts_with("421 4.4.2"), "{r}");
}

#[tokio::test]
async fn xclient_tells_trusting_backends_who_the_client_is() {
    let old = Backend::start(Behaviour {
        xclient: true,
        ..Behaviour::default()
    })
    .await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "xclient = true").await;
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO odd+helo=name", "250").await;
    c.expect("MAIL FROM:<a@internet.example>", "250").await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.expect("Subject: x\r\n\r\nhi\r\n.", "250").await;
    assert_eq!(old.wait_for(1).await.len(), 1);
    let cmds = old.commands.lock().unwrap().clone();
    let x = cmds
        .iter()
        .position(|c| c.starts_with("XCLIENT "))
        .unwrap_or_else(|| panic!("no XCLIENT in {cmds:?}"));
    // Only offered attributes, values xtext-encoded; then EHLO again, then the transaction.
    assert!(
        cmds[x].starts_with("XCLIENT ADDR=127.0.0.1 PORT=")
            && cmds[x].ends_with(" NAME=[UNAVAILABLE] HELO=odd+2Bhelo+3Dname PROTO=ESMTP"),
        "{}",
        cmds[x]
    );
    assert!(cmds[x + 1].starts_with("EHLO "), "{cmds:?}");
    assert!(cmds[x + 2].starts_with("MAIL FROM:"), "{cmds:?}");
    // A target without `xclient = true` never sends it, even when offered.
    let plain = Backend::start(Behaviour {
        xclient: true,
        ..Behaviour::default()
    })
    .await;
    let p = Proxy::start(plain.addr, new.addr, "", "").await;
    relay_client(&p)
        .send(message(&["bob@example.com"], "no xclient"))
        .await
        .unwrap();
    plain.wait_for(1).await;
    assert!(
        !plain
            .commands
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.starts_with("XCLIENT"))
    );
}

#[tokio::test]
async fn auth_login_prompts_and_cancel() {
    let cert = TestCert::new();
    let users = HashMap::from([("EXAMPLE\\bob".to_string(), "pw-b".to_string())]);
    let backend = |users| Behaviour {
        starttls: Some(cert.acceptor()),
        users,
        ..Behaviour::default()
    };
    let old = Backend::start(backend(users.clone())).await;
    let new = Backend::start(backend(users)).await;
    let p = Proxy::start(old.addr, new.addr, "", "smtp_tls = \"required\"").await;
    let tls_session = || async {
        let mut c = Client::connect(p.addr(coexist::config::ListenerMode::Submission)).await;
        c.expect("EHLO client.test", "250").await;
        c.expect("STARTTLS", "220").await;
        let tls = tokio_rustls::TlsConnector::from(insecure_client())
            .connect("localhost".try_into().unwrap(), c.io.into_inner())
            .await
            .unwrap();
        let mut c = support::Client {
            io: tokio::io::BufReader::new(tls),
        };
        let ehlo = c.expect("EHLO client.test", "250").await;
        assert!(ehlo.contains("AUTH PLAIN LOGIN XOAUTH2"), "{ehlo}");
        c
    };
    let mut c = tls_session().await;
    assert_eq!(c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(c.cmd(&base64(b"EXAMPLE\\bob")).await, "334 UGFzc3dvcmQ6");
    c.expect(&base64(b"pw-b"), "235").await;
    c.expect("MAIL FROM:<bob@example.com>", "250").await;
    c.expect("RCPT TO:<anyone@elsewhere.example>", "250").await;
    c.expect("DATA", "354").await;
    c.expect("Subject: via login\r\n\r\nhi\r\n.", "250").await;
    let m = old.wait_for(1).await;
    assert_eq!(m[0].auth.as_deref(), Some("EXAMPLE\\bob"));

    let mut c = tls_session().await;
    assert_eq!(c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    c.expect("*", "501").await;
    c.expect("MAIL FROM:<bob@example.com>", "530").await;
}

#[tokio::test]
async fn a_dead_server_fails_over_to_the_next() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let old_b = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start_servers(&[dead, old_b.addr], &[new.addr], "", "").await;
    let smtp = relay_client(&p);
    for i in 0..3 {
        smtp.send(message(&["bob@example.com"], &format!("m{i}")))
            .await
            .unwrap();
    }
    assert_eq!(old_b.wait_for(3).await.len(), 3);
    let target = p.running.backends.target("old").unwrap();
    assert!(!target.servers[0].is_up(), "the dead server is marked down");
    assert!(target.servers[1].is_up());
}

/// A server that accepts connections and never says a word (a hung MTA, a black hole
/// behind a load balancer) neither holds back the start — readiness waits for the first
/// health probes only a few seconds — nor the mail: until its own probe ends it is tried
/// after the servers known to answer.
#[tokio::test]
async fn a_silent_server_holds_back_neither_the_start_nor_the_mail() {
    // Bound and listening, never accepted: the kernel completes the handshake and nobody
    // ever sends a greeting.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let old_b = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start_servers(
        &[silent.local_addr().unwrap(), old_b.addr],
        &[new.addr],
        "",
        "",
    )
    .await;
    let smtp = relay_client(&p);
    // A guard, not a measurement: tried first, the silent server would hold this message
    // for the backend command timeout (minutes).
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        smtp.send(message(&["bob@example.com"], "past the silent one")),
    )
    .await
    .expect("the message waited on the silent server")
    .unwrap();
    assert_eq!(old_b.wait_for(1).await.len(), 1);
}

#[tokio::test]
async fn a_client_that_vanishes_mid_data_delivers_nothing() {
    let (old, _new, p) = setup().await;
    let closed_before = *old.closed.lock().unwrap();
    let mut c = Client::start_data(p.relay(), "a@internet.example", &["bob@example.com"]).await;
    c.send(b"Subject: half\r\n\r\nhalf a message").await;
    drop(c);
    // The backend connection is cut at once (not sent an RSET that it would take as text).
    let mut closed = false;
    for _ in 0..200 {
        if *old.closed.lock().unwrap() > closed_before {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(closed, "the backend connection in DATA was not closed");
    assert!(!old.commands.lock().unwrap().iter().any(|c| c == "RSET"));
    // And the next message goes through on a fresh connection.
    relay_client(&p)
        .send(message(&["bob@example.com"], "after"))
        .await
        .unwrap();
    let m = old.wait_for(1).await;
    assert_eq!(m.len(), 1);
    assert!(m[0].body_text().contains("Subject: after"));
}

#[tokio::test]
async fn dsn_parameters_pass_through_xtext_encoded_and_limits_hold() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "max_recipients = 2", "").await;
    let mut c = Client::connect(p.relay()).await;
    let ehlo = c.expect("EHLO client.test", "250").await;
    assert!(ehlo.contains("DSN"), "{ehlo}");
    c.expect(
        "MAIL FROM:<a@internet.example> RET=HDRS ENVID=id+2Bone",
        "250",
    )
    .await;
    c.expect(
        "RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2BX@example.com",
        "250",
    )
    .await;
    c.expect("RCPT TO:<nobody@example.com>", "250").await;
    // The third recipient is over the limit.
    let r = c.expect("RCPT TO:<carol@example.org>", "452").await;
    assert!(r.contains("4.5.3"), "{r}");
    c.expect("DATA", "354").await;
    c.expect("Subject: dsn\r\n\r\nhi\r\n.", "250").await;
    assert_eq!(
        old.wait_for(1).await[0].rcpts,
        ["bob@example.com", "nobody@example.com"]
    );
    let cmds = old.commands.lock().unwrap().clone();
    assert!(
        cmds.iter()
            .any(|c| c == "MAIL FROM:<a@internet.example> RET=HDRS ENVID=id+2Bone"),
        "{cmds:?}"
    );
    assert!(
        cmds.iter().any(|c| c
            == "RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2BX@example.com"),
        "{cmds:?}"
    );
}

#[tokio::test]
async fn a_split_delivery_is_spooled_and_delivered_once_later() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour {
        tempfail_data: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1)),
        ..Behaviour::default()
    })
    .await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    let mut c = Client::start_data(
        p.relay(),
        "a@internet.example",
        &["alice@example.com", "bob@example.com"],
    )
    .await;
    // NEW tempfails this message; OLD takes it. The client gets 250: the rest is on disk.
    let r = c
        .cmd("Message-ID: <split@test>\r\nSubject: split\r\n\r\n.dot line\r\nhi\r\n.")
        .await;
    assert!(
        r.starts_with("250 2.0.0 Message accepted for delivery (1 recipient(s) queued as "),
        "{r}"
    );
    assert_eq!(old.wait_for(1).await.len(), 1);
    let queued = p.running.spool.list();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].rcpts[0].address, "alice@example.com");
    // The retry worker delivers it to alice's owner once NEW takes mail again.
    let n = new.wait_for(1).await;
    assert_eq!(n.len(), 1, "spooled part delivered");
    assert_eq!(n[0].rcpts, ["alice@example.com"]);
    assert_eq!(n[0].from, "<a@internet.example>");
    assert_eq!(
        n[0].data,
        old.messages()[0].data,
        "same content on both sides"
    );
    for _ in 0..100 {
        if p.running.spool.list().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(p.running.spool.list().is_empty());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(new.messages().len(), 1, "delivered exactly once");
    assert_eq!(old.messages().len(), 1);
}

#[tokio::test]
async fn the_spool_survives_a_restart() {
    use coexist::app::Running;
    let old = Backend::start(Behaviour::default()).await;
    // NEW refuses the original DATA and the first retries.
    let new = Backend::start(Behaviour {
        tempfail_data: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1)),
        ..Behaviour::default()
    })
    .await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    let cfg = p.dir.path().join("coexist.toml");
    let mut c = Client::start_data(
        p.relay(),
        "a@internet.example",
        &["alice@example.com", "bob@example.com"],
    )
    .await;
    c.expect("Subject: restart\r\n\r\nhi\r\n.", "250").await;
    // Stop at once, before the first retry is due.
    let Proxy { running, dir, .. } = p;
    assert_eq!(running.spool.list().len(), 1);
    running.shutdown(std::time::Duration::from_secs(2)).await;
    assert!(new.messages().is_empty());
    let running = Running::start(coexist::config::Config::load(&cfg).unwrap())
        .await
        .unwrap();
    let n = new.wait_for(1).await;
    assert_eq!(n.len(), 1, "delivered from the spool after the restart");
    assert_eq!(n[0].rcpts, ["alice@example.com"]);
    drop((running, dir));
}

#[tokio::test]
async fn hostile_clients_get_a_clear_answer_or_a_close() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "command_timeout_secs = 1", "").await;
    // Slowloris: a byte at a time, never finishing the line, is cut off by the command
    // timeout even though each byte arrives well within it.
    let c = Client::connect(p.relay()).await;
    let (rd, mut wr) = c.io.into_inner().into_split();
    // A byte every 300 ms for 3 s: never silent for a whole second, never a whole line.
    let trickle = tokio::spawn(async move {
        for b in b"EHLO slow.client" {
            if tokio::io::AsyncWriteExt::write_all(&mut wr, std::slice::from_ref(b))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    });
    let mut rd = tokio::io::BufReader::new(rd);
    let mut line = String::new();
    let got = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::io::AsyncBufReadExt::read_line(&mut rd, &mut line),
    )
    .await;
    assert!(
        got.is_ok(),
        "the trickling client was not cut off within 2 s"
    );
    assert!(line.starts_with("421 4.4.2"), "{line}");
    trickle.abort();
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO client.test", "250").await;
    // XCLIENT is for proxies talking to us, never for clients.
    c.expect("XCLIENT ADDR=10.0.0.1", "500").await;
    // A 1 MB command line: refused, memory bounded, session still in sync.
    c.send(&vec![b'A'; 1 << 20]).await;
    c.send(b"\r\n").await;
    assert!(c.reply().await.starts_with("500 5.5.2"));
    // CR or NUL inside an address or parameter.
    c.send(b"MAIL FROM:<a@b.example\r> SIZE=1\r\n").await;
    assert!(c.reply().await.starts_with("500 5.5.2"));
    c.send(b"MAIL FROM:<a\0@b.example>\r\n").await;
    assert!(c.reply().await.starts_with("500 5.5.2"));
    c.expect("MAIL FROM:<a@internet.example>", "250").await;
    c.send(b"RCPT TO:<bob@example.com\x01>\r\n").await;
    assert!(c.reply().await.starts_with("501"));
    c.expect("NOOP", "250").await;
}

#[tokio::test]
async fn a_spooled_recipient_refused_for_good_gets_the_sender_a_dsn() {
    let old = Backend::start(Behaviour::default()).await;
    // NEW: the first end of DATA is a temporary failure, the retry a permanent one.
    let new = Backend::start(Behaviour {
        tempfail_data: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1)),
        data_reply: Some("554 5.7.1 Rejected by policy".into()),
        ..Behaviour::default()
    })
    .await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO client.test", "250").await;
    // The sender is one of ours (bob, on OLD), so its DSN has somewhere to go.
    c.expect("MAIL FROM:<bob@example.com>", "250").await;
    c.expect("RCPT TO:<alice@example.com>", "250").await;
    c.expect("RCPT TO:<carol@example.org>", "250").await;
    c.expect("DATA", "354").await;
    c.expect(
        "Subject: will bounce\r\nMessage-ID: <b@test>\r\n\r\n.hi\r\n.",
        "250",
    )
    .await;
    let o = old.wait_for(2).await;
    assert_eq!(o.len(), 2, "carol's copy and then the DSN");
    assert_eq!(o[0].rcpts, ["carol@example.org"]);
    let dsn = &o[1];
    assert_eq!(dsn.from, "<>", "a DSN has the null sender");
    assert_eq!(dsn.rcpts, ["bob@example.com"]);
    let t = dsn.body_text();
    for want in [
        "Content-Type: multipart/report; report-type=\"delivery-status\"",
        "Final-Recipient: rfc822; alice@example.com",
        "Action: failed",
        "Status: 5.7.1",
        "Diagnostic-Code: smtp; 554 5.7.1 Rejected by policy",
        "Content-Type: text/rfc822-headers",
        "Subject: will bounce",
        "Auto-Submitted: auto-replied",
    ] {
        assert!(t.contains(want), "missing {want:?} in\n{t}");
    }
    assert!(new.messages().is_empty());
    for _ in 0..100 {
        if p.running.spool.list().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        p.running.spool.list().is_empty(),
        "message and DSN both left the spool"
    );
}

#[tokio::test]
async fn a_split_delivery_refused_for_good_on_one_side_is_answered_250_with_a_dsn() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour {
        data_reply: Some("554 5.7.1 Rejected by policy".into()),
        ..Behaviour::default()
    })
    .await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    let mut c = Client::start_data(
        p.relay(),
        "bob@example.com",
        &["alice@example.com", "carol@example.org"],
    )
    .await;
    // No 451 (which would make the client send carol a second copy): 250, and a DSN.
    let r = c.cmd("Subject: half refused\r\n\r\nhi\r\n.").await;
    assert!(
        r.starts_with("250") && r.contains("1 refused, reported by DSN"),
        "{r}"
    );
    let o = old.wait_for(2).await;
    assert_eq!(o.len(), 2, "carol's copy and the DSN");
    assert_eq!(o[0].rcpts, ["carol@example.org"]);
    assert_eq!(o[1].from, "<>");
    assert!(
        o[1].body_text()
            .contains("Final-Recipient: rfc822; alice@example.com")
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(old.messages().len(), 2, "no duplicate");
}

#[tokio::test]
async fn a_target_that_refuses_the_data_command_is_spooled_too() {
    let old = Backend::start(Behaviour::default()).await;
    let new = Backend::start(Behaviour {
        tempfail_data_cmd: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1)),
        ..Behaviour::default()
    })
    .await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    let mut c = Client::start_data(
        p.relay(),
        "a@internet.example",
        &["alice@example.com", "bob@example.com"],
    )
    .await;
    // NEW refused DATA itself, so only OLD streamed the message: NEW's part is still spooled.
    let r = c.cmd("Message-ID: <d@test>\r\n\r\nhi\r\n.").await;
    assert!(r.starts_with("250") && r.contains("queued"), "{r}");
    assert_eq!(old.wait_for(1).await.len(), 1);
    let n = new.wait_for(1).await;
    assert_eq!(n.len(), 1, "delivered from the spool");
    assert_eq!(n[0].rcpts, ["alice@example.com"]);
}

/// A client that pipelines (RFC 2920) its group MAIL, RCPT, DATA: the backend gets DATA in
/// the same write as MAIL and RCPT, so the message costs it no extra round trip; the
/// message arrives once and intact.
#[tokio::test]
async fn a_pipelined_data_goes_to_the_backend_with_mail_and_rcpt() {
    let (old, _new, p) = setup().await;
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO client.test", "250").await;
    c.send(b"MAIL FROM:<s@internet.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("354"));
    c.expect("Subject: one\r\n\r\nbody\r\n.", "250").await;
    let got = old.wait_for(1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, ["bob@example.com"]);
    assert!(got[0].body_text().ends_with("Subject: one\r\n\r\nbody\r\n"));
    let pipelined = old.pipelined.lock().unwrap().clone();
    assert!(
        pipelined.iter().any(|c| c == "RCPT TO:<bob@example.com>"),
        "DATA did not follow RCPT in the same write: {pipelined:?}"
    );
    // A pipelined group with two recipients for one target is never split: DATA is sent
    // only behind the last of them.
    c.send(
        b"MAIL FROM:<s@internet.example>\r\nRCPT TO:<bob@example.com>\r\nRCPT TO:<dave@example.com>\r\nDATA\r\n",
    )
    .await;
    for code in ["250", "250", "250", "354"] {
        let r = c.reply().await;
        assert!(r.starts_with(code), "{r}");
    }
    c.expect("Subject: two\r\n\r\nbody\r\n.", "250").await;
    let got = old.wait_for(2).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].rcpts, ["bob@example.com", "dave@example.com"]);
}

/// A session that has sent one one-recipient message (to bob, on OLD) and waits for
/// each reply: from here on coexist guesses that the next message has one recipient too.
async fn one_message_session(p: &Proxy, old: &Backend) -> Client<tokio::net::TcpStream> {
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<s@internet.example>", "250").await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.expect("Subject: first\r\n\r\nbody\r\n.", "250").await;
    old.wait_for(1).await;
    c
}

/// A client that waits for each reply: after a one-recipient message, the next message's
/// DATA goes to the backend ahead of the client's (a guess). When a second recipient for
/// the same target proves the guess wrong, it gets its own backend transaction: every
/// recipient still gets the message exactly once, with the same content.
#[tokio::test]
async fn a_wrong_early_data_guess_splits_the_message_without_loss_or_duplicate() {
    let (old, _new, p) = setup().await;
    let mut c = one_message_session(&p, &old).await;

    c.expect("MAIL FROM:<s@internet.example>", "250").await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    // The guess: the backend has DATA before the client sent it.
    let cmds = old.commands.lock().unwrap().clone();
    assert_eq!(cmds.last().map(String::as_str), Some("DATA"), "{cmds:?}");
    // The same mailbox again (case and subaddress differ): taken once, not split off.
    c.expect("RCPT TO:<BOB+tag@example.com>", "250").await;
    c.expect("RCPT TO:<dave@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.expect("Subject: second\r\n\r\nsame text\r\n.", "250")
        .await;
    let got = old.wait_for(3).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let mut second: Vec<_> = got[1..].iter().map(|m| m.rcpts.clone()).collect();
    second.sort();
    assert_eq!(second, [["bob@example.com"], ["dave@example.com"]]);
    assert_eq!(got[1].data, got[2].data);
    assert!(
        got[1]
            .body_text()
            .ends_with("Subject: second\r\n\r\nsame text\r\n")
    );

    // The session stops guessing after a miss: a third message is one transaction again.
    c.expect("MAIL FROM:<s@internet.example>", "250").await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    c.expect("RCPT TO:<dave@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.expect("Subject: third\r\n\r\nx\r\n.", "250").await;
    let got = old.wait_for(4).await;
    assert_eq!(got.len(), 4);
    assert_eq!(got[3].rcpts, ["bob@example.com", "dave@example.com"]);
    let (_, metrics) = p.admin("GET", "/metrics", None).await;
    let text = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains("coexist_smtp_early_data_total{outcome=\"split\"}"),
        "{text}"
    );
}

/// A guessed early DATA followed by RSET (no message): nothing is delivered for it — the
/// backend connection in DATA is closed, never fed an RSET that would be message text —
/// and the next message goes through as usual.
#[tokio::test]
async fn an_early_data_without_a_message_delivers_nothing() {
    let (old, _new, p) = setup().await;
    let mut c = one_message_session(&p, &old).await;
    c.expect("MAIL FROM:<s@internet.example>", "250").await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    c.expect("RSET", "250").await;
    c.expect("MAIL FROM:<other@internet.example>", "250").await;
    c.expect("RCPT TO:<bob@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.expect("Subject: after\r\n\r\nbody\r\n.", "250").await;
    c.expect("QUIT", "221").await;
    let got = old.wait_for(2).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let got_later = old.messages();
    assert_eq!(got.len(), 2);
    assert_eq!(got_later.len(), 2, "{got_later:?}");
    assert_eq!(got[1].from, "<other@internet.example>");
    assert!(!got.iter().any(|m| m.body_text().contains("RSET")));
    // The connection that was in DATA was closed, not reused.
    assert!(*old.closed.lock().unwrap() >= 1);
}

/// Early DATA meets a refusal: a recipient the backend refuses (its code reaches the
/// client; no message without recipients), and a DATA the backend refuses (the client's
/// final reply says so and nothing is delivered).
#[tokio::test]
async fn early_data_refusals_reach_the_client() {
    let old = Backend::start(Behaviour {
        rcpt_replies: HashMap::from([(
            "gone@example.com".to_string(),
            "550 5.1.1 No such user".to_string(),
        )]),
        tempfail_data_cmd: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1)),
        ..Behaviour::default()
    })
    .await;
    let new = Backend::start(Behaviour::default()).await;
    let p = Proxy::start(old.addr, new.addr, "", "").await;
    let mut c = Client::connect(p.relay()).await;
    c.expect("EHLO client.test", "250").await;
    c.send(b"MAIL FROM:<s@internet.example>\r\nRCPT TO:<gone@example.com>\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250"));
    let r = c.reply().await;
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let r = c.reply().await;
    assert!(r.starts_with("554"), "{r}");
    // The backend's DATA tempfail (its one) comes with the early DATA of this message.
    c.send(b"MAIL FROM:<s@internet.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("250"));
    let r = c.reply().await;
    if r.starts_with("354") {
        let fin = c.cmd("Subject: x\r\n\r\nbody\r\n.").await;
        assert!(fin.starts_with("451"), "{fin}");
    } else {
        assert!(r.starts_with("451"), "{r}");
    }
    // And the next one is delivered.
    c.send(b"MAIL FROM:<s@internet.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("354"));
    c.expect("Subject: y\r\n\r\nbody\r\n.", "250").await;
    let got = old.wait_for(1).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].body_text().ends_with("Subject: y\r\n\r\nbody\r\n"));
}

/// `proxy_protocol = true`: every backend connection opens with a PROXY v2 header naming
/// the client (its address and port, and where it connected); such a connection serves that
/// client's session only (two messages, one connection), never another client's; health
/// probes say LOCAL. Setting it together with `xclient` is a config error with its line.
#[tokio::test]
async fn proxy_protocol_v2_names_each_client_to_its_backend() {
    let beh = Behaviour {
        proxy_protocol: true,
        ..Behaviour::default()
    };
    let old = Backend::start(beh.clone()).await;
    let new = Backend::start(beh).await;
    let p = Proxy::start(old.addr, new.addr, "", "proxy_protocol = true").await;
    let mut sessions = Vec::new();
    for round in 0..2 {
        let mut c = Client::connect(p.relay()).await;
        let me = c.io.get_ref().local_addr().unwrap();
        sessions.push(me);
        c.expect("EHLO client.test", "250").await;
        for i in 0..2 {
            c.expect("MAIL FROM:<s@internet.example>", "250").await;
            c.expect("RCPT TO:<bob@example.com>", "250").await;
            c.expect("DATA", "354").await;
            c.expect(&format!("Subject: {round}-{i}\r\n\r\nbody\r\n."), "250")
                .await;
        }
        c.expect("QUIT", "221").await;
    }
    let got = old.wait_for(4).await;
    assert_eq!(got.len(), 4);
    let headers = old.proxy_headers.lock().unwrap().clone();
    let proxied: Vec<&String> = headers.iter().filter(|h| h.starts_with("PROXY")).collect();
    let expected: Vec<String> = sessions
        .iter()
        .map(|me| format!("PROXY {me} -> {}", p.relay()))
        .collect();
    assert_eq!(proxied, expected.iter().collect::<Vec<_>>(), "{headers:?}");
    assert!(
        headers.iter().any(|h| h == "LOCAL"),
        "no LOCAL probe: {headers:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), support::ROUTES).unwrap();
    let cfg = dir.path().join("coexist.toml");
    std::fs::write(
        &cfg,
        "[routes]\npath = \"routes.toml\"\n[targets.old]\nsmtp = [\"127.0.0.1:25\"]\nxclient = true\nproxy_protocol = true\n\
         [targets.new]\nsmtp = [\"127.0.0.1:26\"]\n",
    )
    .unwrap();
    let err = coexist::config::Config::load(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("coexist.toml:6:") && err.contains("choose one"),
        "{err}"
    );
}
