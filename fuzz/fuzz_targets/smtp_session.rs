//! The inbound SMTP command path: a whole client conversation from the fuzzer, driven
//! through a real session over an in-memory pipe (backends point at a closed port, so
//! recipients get 451 and nothing leaves the process). Never a panic, never a hang, and
//! every reply line is well formed.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use coexist::config::{ListenerMode, MixedRecipients, SmtpLimits, SmtpTlsMode, TargetConfig};
use coexist::route::{KnownTargets, Router, load_routes_text};
use coexist::smtp::backend::{BackendSettings, Backends};
use coexist::smtp::io::Conn;
use coexist::smtp::session::{Session, SessionCtx};
use coexist::upstream::{Registry, Thresholds};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTES: &str = r#"
[domains."example.com"]
unknown = "old"
[domains."example.org"]
unknown = "reject"
[sites.paris]
owner = "new"
[[mailbox]]
address = "alice@example.com"
site = "paris"
logins = ["EXAMPLE\\alice"]
"#;

struct World {
    rt: tokio::runtime::Runtime,
    ctx: Arc<SessionCtx>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let targets: Vec<TargetConfig> = ["old", "new"]
            .iter()
            .map(|n| TargetConfig {
                name: (*n).into(),
                smtp_tls: SmtpTlsMode::None,
                xclient: false,
                proxy_protocol: false,
                // The discard port: nothing listens, connects fail at once.
                smtp: vec!["127.0.0.1:9".into()],
                https: vec![],
                tls_verify: false,
                tls_ca: None,
            })
            .collect();
        let table = load_routes_text(
            std::path::Path::new("fuzz.toml"),
            ROUTES,
            &KnownTargets::Exactly(vec!["old".into(), "new".into()]),
        )
        .expect("valid sample");
        let registry = Arc::new(Registry::new(&targets, Thresholds::default()));
        let backends =
            Backends::new(&targets, BackendSettings::default(), registry).expect("backends");
        let limits = SmtpLimits {
            command_timeout: Duration::from_millis(200),
            data_timeout: Duration::from_millis(200),
            max_recipients: 20,
            max_message_size: 1 << 16,
            ..SmtpLimits::default()
        };
        let ctx = Arc::new(SessionCtx {
            hostname: "mx.fuzz".into(),
            mode: ListenerMode::Relay,
            mixed: MixedRecipients::Fanout,
            add_received: true,
            limits,
            router: Arc::new(Router::new(table, 2)),
            backends: Arc::new(backends),
            tls: None,
            traffic: Arc::default(),
            spool: None,
        });
        World { rt, ctx }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (_stop, shutdown) = coexist::net::shutdown::channel();
        let session = Session::new(
            Arc::clone(&w.ctx),
            Conn::Plain(server),
            "127.0.0.1:40000".parse().expect("addr"),
            "127.0.0.1:25".parse().expect("addr"),
            shutdown,
        );
        let run = tokio::spawn(session.run());
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "session hung");
        let _ = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("session ended");
        for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            assert!(line.ends_with(b"\r"), "reply line without CRLF");
            assert!(
                line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit),
                "bad reply line"
            );
            assert!(line[3] == b' ' || line[3] == b'-', "bad reply separator");
        }
    });
});
