//! Memory per idle SMTP connection: resident memory of a running `coexist serve` before and
//! after N clients connect, read the greeting and say EHLO, then wait (the state a slowloris
//! or a connection flood leaves behind).
//!
//! `cargo bench --bench idle_connections` (`COEXIST_BENCH_CONNECTIONS`, default 5000).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("COEXIST_BENCH_CONNECTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.path().join("routes.toml"),
        "[domains.\"example.com\"]\nunknown = \"old\"\n[sites.s]\nowner = \"old\"\n\
         [[mailbox]]\naddress = \"a@example.com\"\nsite = \"s\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("coexist.toml"),
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[smtp]\nmax_connections = {}\nmax_connections_per_ip = {}\n\
             [[smtp.listener]]\nlisten = \"127.0.0.1:{port}\"\nmode = \"relay\"\n\
             [targets.old]\nsmtp = [\"127.0.0.1:9\"]\n",
            n + 10,
            n + 10
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_coexist"))
        .args(["serve", "-c"])
        .arg(dir.path().join("coexist.toml"))
        .env("COEXIST_LOG", "error")
        .env("COEXIST_WORKER_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut ready = false;
    for _ in 0..300 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ready, "coexist did not start");
    std::thread::sleep(Duration::from_millis(300));
    let before = common::rss_kib(pid);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let s = match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => s,
            Err(e) => {
                println!("connection {i} failed: {e}");
                break;
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        r.get_mut().write_all(b"EHLO idle.client\r\n").unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line.as_bytes().get(3) == Some(&b' ') {
                break;
            }
        }
        conns.push(r);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = common::rss_kib(pid);
    let open = conns.len();
    println!(
        "idle_connections: {open} idle SMTP sessions (after EHLO): RSS {before} KiB -> {after} KiB, {:.0} bytes per connection",
        (after.saturating_sub(before) * 1024) as f64 / open.max(1) as f64
    );
    drop(conns);
    let _ = child.kill();
    let _ = child.wait();
}
