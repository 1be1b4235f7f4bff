//! `coexist demo`: the proxy with built-in OLD and NEW demo mail servers on loopback and the
//! sample tables, plus a short scripted tour, so a new user sees per-recipient routing work
//! before writing any config.
//!
//! The demo servers are small SMTP sinks: they accept everything for any recipient, print one
//! line per delivered message, and keep nothing.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::app::{AppError, Running};
use crate::config::{Config, ListenerMode};
use crate::route::Diagnostics;
use crate::smtp::data::{DataScanner, Limits, Mode};
use crate::smtp::io::{Conn, Line, LineIo};

/// `println!` that keeps going when stdout is closed (`coexist demo | head`): a demo
/// server printing a delivery must not panic in the middle of an SMTP session.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The sample files, built into the binary so `coexist demo` works from anywhere.
const SAMPLE_CONFIG: &str = include_str!("../config/coexist.toml");
const SAMPLE_ROUTES: &str = include_str!("../config/routes.toml");
const SAMPLE_CSV: &str = include_str!("../config/mailboxes.csv");

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("writing the sample config to {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("sample config:\n{0}")]
    Config(Diagnostics),
    #[error(
        "demo server for target {target} cannot listen on {addr}: {source} (is a demo already running?)"
    )]
    Bind {
        target: String,
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    App(#[from] AppError),
}

/// The sample config with the proxy's SMTP listeners and admin API on `ip` (the demo mail
/// servers stay on loopback). Off loopback the admin API takes a token for every change,
/// written to `admin.token` beside the config, while the status page, `/status` and
/// `/metrics` stay open (`public_status`) so a browser on another host can watch.
fn listen_on(ip: IpAddr, with_token: bool) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut = SAMPLE_CONFIG.parse().map_err(|e| format!("{e}"))?;
    let rehost = |v: &mut toml_edit::Item| {
        let port = v
            .as_str()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| a.port());
        if let Some(port) = port {
            *v = toml_edit::value(SocketAddr::new(ip, port).to_string());
        }
    };
    if let Some(listeners) = doc["smtp"]["listener"].as_array_of_tables_mut() {
        for l in listeners.iter_mut() {
            rehost(&mut l["listen"]);
        }
    }
    rehost(&mut doc["admin"]["listen"]);
    if with_token {
        doc["admin"]["token_file"] = toml_edit::value("admin.token");
        doc["admin"]["public_status"] = toml_edit::value(true);
    }
    Ok(doc.to_string())
}

/// 128 random bits as hex, for the demo's admin token.
fn random_token() -> std::io::Result<String> {
    use std::io::Read as _;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(format!("{:032x}", u128::from_be_bytes(b)))
}

/// Writes the embedded samples to a fresh directory (removed when the demo ends) and
/// loads them; `listen` puts the proxy's listeners on that address.
fn sample_config(dir: &Path, listen: Option<IpAddr>) -> Result<Config, DemoError> {
    let dir = dir.to_path_buf();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| DemoError::Write(p, e))
    };
    // Private to this user and new (never one somebody else prepared): it holds the token.
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| DemoError::Write(dir.clone(), e))?;
    }
    let config = match listen {
        None => SAMPLE_CONFIG.to_string(),
        Some(ip) => {
            let with_token = !ip.is_loopback();
            if with_token {
                let path = dir.join("admin.token");
                random_token()
                    .and_then(|t| {
                        use std::io::Write as _;
                        use std::os::unix::fs::OpenOptionsExt as _;
                        std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o600)
                            .open(&path)?
                            .write_all(format!("{t}\n").as_bytes())
                    })
                    .map_err(|e| DemoError::Write(path, e))?;
            }
            listen_on(ip, with_token)
                .map_err(|e| DemoError::Write(dir.join("coexist.toml"), std::io::Error::other(e)))?
        }
    };
    write("coexist.toml", &config)?;
    write("routes.toml", SAMPLE_ROUTES)?;
    write("mailboxes.csv", SAMPLE_CSV)?;
    Config::load(&dir.join("coexist.toml")).map_err(DemoError::Config)
}

/// Runs the demo until Ctrl-C / SIGTERM. `config` overrides the embedded samples; `listen`
/// puts the samples' proxy listeners and admin API on that address (e.g. `0.0.0.0` in a
/// container).
pub async fn run(config: Option<&Path>, listen: Option<IpAddr>) -> Result<(), DemoError> {
    // A name nobody can guess ahead of time; created by `sample_config` only.
    let suffix = random_token().map_or_else(|_| String::from("0"), |t| t[..8].to_string());
    let samples =
        std::env::temp_dir().join(format!("coexist-demo-{}-{suffix}", std::process::id()));
    let result = demo(config, listen, &samples).await;
    if config.is_none() && !matches!(result, Err(DemoError::Write(ref p, _)) if *p == samples) {
        let _ = std::fs::remove_dir_all(&samples);
    }
    result
}

async fn demo(
    config: Option<&Path>,
    listen: Option<IpAddr>,
    samples: &Path,
) -> Result<(), DemoError> {
    let config = match config {
        Some(p) => Config::load(p).map_err(DemoError::Config)?,
        None => sample_config(samples, listen)?,
    };
    let routes_path = config.routes.path.clone();
    let token_file = config.admin.token_file.clone();
    // Absolute, so that the printed commands work from any directory.
    let config_path = std::fs::canonicalize(&config.path).unwrap_or_else(|_| config.path.clone());
    for t in &config.targets {
        for addr in &t.smtp {
            let listener =
                TcpListener::bind(addr.as_str())
                    .await
                    .map_err(|source| DemoError::Bind {
                        target: t.name.clone(),
                        addr: addr.clone(),
                        source,
                    })?;
            tokio::spawn(demo_server(listener, t.name.to_uppercase()));
        }
    }
    let running = Running::start(config).await?;
    let table = running.router.snapshot();
    let relay = running
        .smtp_addrs
        .iter()
        .find(|(m, _)| *m == ListenerMode::Relay)
        .map(|(_, a)| crate::config::connectable(*a));
    say!("coexist demo — the proxy and two demo mail servers are running.");
    say!(
        "  routing table  {} (version {}, {} mailboxes)",
        routes_path.display(),
        table.version(),
        table.mailbox_count()
    );
    for t in &running.backends.targets {
        for s in &t.servers {
            say!("  target {:<7} {} (demo mail server)", t.name, s.addr);
        }
    }
    for (mode, addr) in &running.smtp_addrs {
        let mode = format!("{mode:?}").to_lowercase();
        say!("  SMTP {mode} listener on {addr}");
    }
    say!(
        "  status page    http://{}/ (admin API, /metrics)",
        crate::config::connectable(running.admin_addr)
    );
    if let Some(t) = &token_file {
        say!(
            "  admin token    {} (changes need it; the status page, /status and /metrics do not)",
            t.display()
        );
    }
    drop(table);
    if let Some(relay) = relay {
        say!("\nA short tour — three messages sent through the proxy:");
        tour(relay).await;
        say!("\nTry it yourself (swaks is in Debian's swaks package):");
        let r = format!("--server {relay} --from you@internet.example");
        say!("  swaks {r} --to alice@example.com                  # site paris → NEW");
        say!("  swaks {r} --to carol@example.com                  # site berlin → OLD");
        say!("  swaks {r} --to bob@example.com                    # pilot user → NEW");
        say!("  swaks {r} --to alice@example.com,dave@example.com # one copy to each side");
        say!("  swaks {r} --to someone@gmail.com                  # 550 5.7.1 relaying denied");
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("coexist"));
        for c in suggested_commands(&exe, &config_path) {
            say!("  {c}");
        }
    }
    say!("\nDeliveries are printed below. Ctrl-C stops the demo.");
    wait_for_stop().await;
    running.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// The `coexist` commands the demo suggests, runnable as printed: the binary by the path
/// it runs from (after `cargo run` or `cargo build` it is not on PATH), with the demo's
/// config.
fn suggested_commands(exe: &Path, config: &Path) -> Vec<String> {
    let (exe, cfg) = (shell_word(exe), shell_word(config));
    vec![
        format!("{exe} lookup -c {cfg} Alice.Smith@example.com 'EXAMPLE\\dave'"),
        format!("{exe} cutover berlin --to new -c {cfg}   # carol moves to NEW; try again"),
        format!("{exe} rollback -c {cfg}"),
    ]
}

/// `path` as one word for a POSIX shell: as it is when it is plain, else single-quoted.
fn shell_word(path: &Path) -> String {
    let s = path.display().to_string();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@%,=".contains(&b));
    if plain {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

async fn wait_for_stop() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Sends the tour's messages and prints each reply.
async fn tour(relay: SocketAddr) {
    let sends: [(&str, &[&str]); 3] = [
        ("Hello Alice (site paris, on NEW)", &["alice@example.com"]),
        (
            "Hello Carol (site berlin, on OLD)",
            &["c.jones@example.com"],
        ),
        (
            "Hello both (one copy each side)",
            &["alice.smith@example.com", "dave@example.com"],
        ),
    ];
    for (subject, to) in sends {
        match send(relay, subject, to).await {
            Ok(reply) => say!("  sent {subject:?} to {} → {reply}", to.join(", ")),
            Err(e) => say!("  sending {subject:?} failed: {e}"),
        }
        // Let the demo servers print their delivery line before the next send.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn send(relay: SocketAddr, subject: &str, to: &[&str]) -> std::io::Result<String> {
    let stream = TcpStream::connect(relay).await?;
    let mut io = LineIo::new(Conn::Plain(stream));
    let t = Duration::from_secs(10);
    let mut last = String::new();
    read_reply(&mut io, t).await?;
    let mut commands = vec![
        "EHLO demo.client".to_string(),
        "MAIL FROM:<tour@internet.example>".into(),
    ];
    commands.extend(to.iter().map(|a| format!("RCPT TO:<{a}>")));
    commands.push("DATA".into());
    for c in commands {
        io.queue(format!("{c}\r\n").as_bytes());
        io.flush(t).await.map_err(std::io::Error::other)?;
        last = read_reply(&mut io, t).await?;
        if !(last.starts_with('2') || last.starts_with('3')) {
            return Ok(last);
        }
    }
    let msg = format!(
        "From: tour@internet.example\r\nTo: {}\r\nSubject: {subject}\r\n\r\nSent by coexist demo.\r\n.\r\nQUIT\r\n",
        to.join(", ")
    );
    io.queue(msg.as_bytes());
    io.flush(t).await.map_err(std::io::Error::other)?;
    let reply = read_reply(&mut io, t).await.unwrap_or(last);
    Ok(reply)
}

async fn read_reply(io: &mut LineIo<TcpStream>, t: Duration) -> std::io::Result<String> {
    loop {
        match io.read_line(4096, t).await.map_err(std::io::Error::other)? {
            Line::Ok(l) => {
                let s = String::from_utf8_lossy(&l).trim_end().to_string();
                if s.as_bytes().get(3) != Some(&b'-') {
                    return Ok(s);
                }
            }
            _ => return Err(std::io::Error::other("bad reply line")),
        }
    }
}

/// A demo mail server: accepts any message and prints who it was for.
async fn demo_server(listener: TcpListener, name: String) {
    let name = Arc::new(name);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        // One write per reply: NODELAY keeps pipelined replies from waiting on a delayed ACK.
        let _ = stream.set_nodelay(true);
        let name = Arc::clone(&name);
        tokio::spawn(async move {
            let _ = demo_session(stream, &name).await;
        });
    }
}

async fn demo_session(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let t = Duration::from_secs(300);
    let mut io = LineIo::new(Conn::Plain(stream));
    let err = std::io::Error::other;
    io.write_now(
        format!("220 demo-{} ESMTP\r\n", name.to_lowercase()).as_bytes(),
        t,
    )
    .await
    .map_err(err)?;
    let (mut from, mut rcpts) = (String::new(), Vec::<String>::new());
    loop {
        let line = match io.read_line(4096, t).await.map_err(err)? {
            Line::Ok(l) => String::from_utf8_lossy(&l).trim_end().to_string(),
            _ => {
                io.write_now(b"500 5.5.2 bad line\r\n", t)
                    .await
                    .map_err(err)?;
                continue;
            }
        };
        let upper = line.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            "250-demo\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-SIZE 52428800\r\n250 ENHANCEDSTATUSCODES\r\n".to_string()
        } else if upper.starts_with("HELO") || upper == "NOOP" {
            "250 2.0.0 OK\r\n".into()
        } else if upper.starts_with("MAIL FROM:") {
            from = line[10..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string();
            rcpts.clear();
            "250 2.1.0 OK\r\n".into()
        } else if upper.starts_with("RCPT TO:") {
            rcpts.push(
                line[8..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            );
            "250 2.1.5 OK\r\n".into()
        } else if upper == "DATA" {
            io.write_now(b"354 go ahead\r\n", t).await.map_err(err)?;
            let mut scanner = DataScanner::new(
                Mode::Dot,
                Limits {
                    max_size: 64 << 20,
                    max_line: 1 << 20,
                    max_received: usize::MAX,
                },
            );
            let mut body = Vec::new();
            loop {
                let end = scanner.feed(io.buffered(), &mut body);
                let n = end.unwrap_or(io.buffered().len());
                io.consume(n);
                if end.is_some() {
                    break;
                }
                io.fill(t).await.map_err(err)?;
            }
            let subject = String::from_utf8_lossy(&body)
                .lines()
                .take_while(|l| !l.is_empty())
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default();
            say!(
                "  [{name} server] delivered from {from} to {} — {subject:?} ({} bytes)",
                rcpts.join(" "),
                body.len()
            );
            "250 2.0.0 OK delivered\r\n".into()
        } else if upper == "RSET" {
            rcpts.clear();
            "250 2.0.0 OK\r\n".into()
        } else if upper == "QUIT" {
            io.write_now(b"221 2.0.0 bye\r\n", t).await.map_err(err)?;
            return Ok(());
        } else {
            "502 5.5.1 not implemented\r\n".into()
        };
        io.write_now(reply.as_bytes(), t).await.map_err(err)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggested_commands_name_the_binary_and_config_by_path() {
        let c = suggested_commands(
            Path::new("/work/x/target/release/coexist"),
            Path::new("/tmp/coexist-demo-1/coexist.toml"),
        );
        assert_eq!(
            c[0],
            "/work/x/target/release/coexist lookup -c /tmp/coexist-demo-1/coexist.toml \
             Alice.Smith@example.com 'EXAMPLE\\dave'",
            "the lookup command must start with the binary's own path"
        );
        assert!(
            c[1].starts_with("/work/x/target/release/coexist cutover berlin --to new -c /tmp/"),
            "{c:?}"
        );
        assert_eq!(
            c[2],
            "/work/x/target/release/coexist rollback -c /tmp/coexist-demo-1/coexist.toml"
        );
        let c = suggested_commands(
            Path::new("/opt/my tools/coexist"),
            Path::new("/it's/c.toml"),
        );
        assert!(
            c[2] == "'/opt/my tools/coexist' rollback -c '/it'\\''s/c.toml'",
            "paths with spaces or quotes must stay one shell word: {c:?}"
        );
    }
}
