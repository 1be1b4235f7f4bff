//! Soak: SMTP load (single- and mixed-recipient messages) through a running `coexist serve`
//! while a site is cut over (and back) every minute and one backend is restarted every five.
//! Two clients open a connection per message; two send four messages per connection, which
//! makes coexist send DATA early and, when a later message has two recipients for one target,
//! split it. Reports messages sent, delivered, refused, lost (must be 0), duplicated (must be
//! 0; counted per message and recipient), and the proxy's RSS at start and end.
//!
//! `cargo bench --bench soak` runs 30 minutes; `COEXIST_SOAK_SECS=120` for a short one (the
//! cutover and restart intervals scale to 1/30 and 1/6 of the run).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// (Message-ID, recipient) → how many times a backend accepted it.
type Seen = Arc<Mutex<HashMap<(String, String), u32>>>;
/// The messages answered 250: Message-ID and recipients.
type Acked = Arc<Mutex<Vec<(String, Vec<String>)>>>;

/// A minimal SMTP sink on a fixed port that can be stopped and started again.
struct Sink {
    addr: SocketAddr,
    seen: Seen,
    stop: Arc<AtomicBool>,
}

fn sink_session(s: TcpStream, seen: &Seen, stop: &AtomicBool) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    w.write_all(b"220 sink\r\n")?;
    let mut line = String::new();
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if stop.load(Ordering::Relaxed) {
                    return Ok(()); // a "restart": drop every connection
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        let up = line.to_ascii_uppercase();
        if up.starts_with("MAIL") {
            rcpts.clear();
            w.write_all(b"250 ok\r\n")?;
        } else if let Some(to) = up.strip_prefix("RCPT TO:<") {
            rcpts.push(to.split('>').next().unwrap_or("").to_ascii_lowercase());
            w.write_all(b"250 ok\r\n")?;
        } else if up.starts_with("EHLO") {
            w.write_all(b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")?;
        } else if up.starts_with("DATA") {
            w.write_all(b"354 go\r\n")?;
            let mut id = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" {
                    break;
                }
                if let Some(v) = line.strip_prefix("Message-ID: ") {
                    id = v.trim().to_string();
                }
            }
            let mut seen = seen.lock().unwrap();
            for r in rcpts.drain(..) {
                *seen.entry((id.clone(), r)).or_default() += 1;
            }
            drop(seen);
            w.write_all(b"250 ok\r\n")?;
        } else if up.starts_with("QUIT") {
            w.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"250 ok\r\n")?;
        }
    }
}

impl Sink {
    fn start(addr: SocketAddr, seen: Seen) -> Sink {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind(addr).expect("bind sink");
        listener.set_nonblocking(true).unwrap();
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let (seen, stop) = (Arc::clone(&seen2), Arc::clone(&stop2));
                        std::thread::spawn(move || {
                            let _ = sink_session(s, &seen, &stop);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Sink { addr, seen, stop }
    }

    fn restart(self) -> Sink {
        self.stop.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(700));
        Sink::start(self.addr, self.seen)
    }
}

fn free() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One message; true when the proxy answered 250 to it.
/// Sends `msgs` (recipients, Message-ID) over one connection, each waiting for every reply;
/// returns how many were answered 250 at the end of data, in order (it stops at the first
/// that was not).
fn send(relay: SocketAddr, msgs: &[(&[&str], String)]) -> std::io::Result<usize> {
    let s = TcpStream::connect(relay)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = s;
    let reply = |r: &mut BufReader<TcpStream>| -> std::io::Result<String> {
        let mut l = String::new();
        loop {
            l.clear();
            r.read_line(&mut l)?;
            if l.as_bytes().get(3) != Some(&b'-') {
                return Ok(l);
            }
        }
    };
    reply(&mut r)?;
    w.write_all(b"EHLO soak.client\r\n")?;
    reply(&mut r)?;
    let mut done = 0;
    for (rcpts, id) in msgs {
        let mut cmds = vec!["MAIL FROM:<soak@internet.example>".to_string()];
        cmds.extend(rcpts.iter().map(|a| format!("RCPT TO:<{a}>")));
        cmds.push("DATA".into());
        for c in cmds {
            w.write_all(format!("{c}\r\n").as_bytes())?;
            let l = reply(&mut r)?;
            if !(l.starts_with('2') || l.starts_with('3')) {
                return Ok(done);
            }
        }
        w.write_all(
            format!(
                "Message-ID: {id}\r\nSubject: soak\r\n\r\n{}\r\n.\r\n",
                "x".repeat(2000)
            )
            .as_bytes(),
        )?;
        if !reply(&mut r)?.starts_with("250") {
            return Ok(done);
        }
        done += 1;
    }
    let _ = w.write_all(b"QUIT\r\n");
    Ok(done)
}

fn admin(addr: SocketAddr, path: &str, body: &str) -> u16 {
    match ureq::post(&format!("http://{addr}{path}")).send_string(body) {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, _)) => c,
        Err(_) => 0,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: u64 = std::env::var("COEXIST_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1800);
    let dir = tempfile::tempdir().unwrap();
    let (old_addr, new_addr, relay, admin_addr) = (free(), free(), free(), free());
    let (seen_old, seen_new): (Seen, Seen) = (Arc::default(), Arc::default());
    let mut old = Sink::start(old_addr, Arc::clone(&seen_old));
    let mut new = Sink::start(new_addr, Arc::clone(&seen_new));
    std::fs::write(
        dir.path().join("routes.toml"),
        "[domains.\"example.com\"]\nunknown = \"old\"\n[sites.paris]\nowner = \"new\"\n[sites.berlin]\nowner = \"old\"\n\
         [[mailbox]]\naddress = \"alice@example.com\"\nsite = \"paris\"\n\
         [[mailbox]]\naddress = \"bob@example.com\"\nsite = \"berlin\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("coexist.toml"),
        format!(
            "[admin]\nlisten = \"{admin_addr}\"\n[smtp]\nhealth_interval_secs = 5\n[[smtp.listener]]\nlisten = \"{relay}\"\nmode = \"relay\"\n\
             [targets.old]\nsmtp = [\"{old_addr}\"]\n[targets.new]\nsmtp = [\"{new_addr}\"]\n[spool]\nretry_initial_secs = 5\nretry_max_secs = 20\n"
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_coexist"))
        .args(["serve", "-c"])
        .arg(dir.path().join("coexist.toml"))
        .env("COEXIST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..300 {
        if TcpStream::connect(relay).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss_start = common::rss_kib(child.id());
    let (sent, accepted, refused) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let acked_ids: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (sent, accepted, refused, acked, stop) = (
                Arc::clone(&sent),
                Arc::clone(&accepted),
                Arc::clone(&refused),
                Arc::clone(&acked_ids),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Clients 0 and 1: a connection per message. 2 and 3: four messages per
                    // connection — one recipient, one, then two for one side or two sides
                    // (bob and dave share OLD until berlin is cut over to NEW).
                    let batch: &[&[&str]] = if c < 2 {
                        match i % 3 {
                            0 => &[&["alice@example.com"]],
                            1 => &[&["bob@example.com"]],
                            _ => &[&["alice@example.com", "bob@example.com"]],
                        }
                    } else {
                        &[
                            &["alice@example.com"],
                            &["bob@example.com"],
                            &["bob@example.com", "dave@example.com"],
                            &["alice@example.com", "bob@example.com"],
                        ]
                    };
                    let msgs: Vec<(&[&str], String)> = batch
                        .iter()
                        .enumerate()
                        .map(|(k, r)| (*r, format!("<c{c}-{i}-{k}@soak>")))
                        .collect();
                    sent.fetch_add(msgs.len() as u64, Ordering::Relaxed);
                    let ok = send(relay, &msgs).unwrap_or(0);
                    accepted.fetch_add(ok as u64, Ordering::Relaxed);
                    refused.fetch_add((msgs.len() - ok) as u64, Ordering::Relaxed);
                    let mut acked = acked.lock().unwrap();
                    for (r, id) in &msgs[..ok] {
                        acked.push((id.clone(), r.iter().map(|a| (*a).to_string()).collect()));
                    }
                    drop(acked);
                    i += 1;
                }
            })
        })
        .collect();
    let cutover_every = Duration::from_secs((secs / 30).max(2));
    let restart_every = Duration::from_secs((secs / 6).max(5));
    let (mut next_cut, mut next_restart, mut flip, mut restarts, mut cutovers) =
        (cutover_every, restart_every, false, 0, 0);
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(200));
        if started.elapsed() >= next_cut {
            let to = if flip { "old" } else { "new" };
            let code = admin(
                admin_addr,
                "/routes/cutover",
                &format!("{{\"site\": \"berlin\", \"to\": \"{to}\"}}"),
            );
            assert_eq!(code, 200, "cutover failed");
            flip = !flip;
            cutovers += 1;
            next_cut += cutover_every;
        }
        if started.elapsed() >= next_restart {
            if restarts % 2 == 0 {
                old = old.restart();
            } else {
                new = new.restart();
            }
            restarts += 1;
            next_restart += restart_every;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    // Let the spool drain (retries every few seconds).
    let _ = admin(admin_addr, "/queue/retry", "{}");
    let acked = acked_ids.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let count = |id: &str, rcpt: &str| {
        let key = (id.to_string(), rcpt.to_string());
        seen_old.lock().unwrap().get(&key).copied().unwrap_or(0)
            + seen_new.lock().unwrap().get(&key).copied().unwrap_or(0)
    };
    let missing = || {
        acked
            .iter()
            .any(|(id, rcpts)| rcpts.iter().any(|r| count(id, r) == 0))
    };
    while Instant::now() < deadline && missing() {
        std::thread::sleep(Duration::from_millis(500));
    }
    let rss_end = common::rss_kib(child.id());
    let metrics = ureq::get(&format!("http://{admin_addr}/metrics"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    let early: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("coexist_smtp_early_data_total{"))
        .map(|l| {
            l.trim_start_matches("coexist_smtp_early_data_total")
                .to_string()
        })
        .collect();
    let mut lost = 0;
    let mut delivered_copies = 0;
    let mut dup = 0;
    for (id, rcpts) in &acked {
        for r in rcpts {
            match count(id, r) {
                0 => lost += 1,
                1 => {}
                _ => dup += 1,
            }
            delivered_copies += u64::from(count(id, r));
        }
    }
    println!(
        "soak {secs} s: messages sent {}, accepted (250) {}, refused {}; recipient copies delivered {delivered_copies}, lost {lost}, duplicated {dup}; {cutovers} cutovers, {restarts} backend restarts; early DATA {}; proxy RSS {rss_start} KiB -> {rss_end} KiB",
        sent.load(Ordering::Relaxed),
        accepted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        early.join(" "),
    );
    let _ = child.kill();
    let _ = child.wait();
    drop((old, new));
    assert_eq!(lost, 0, "acknowledged messages lost");
    assert_eq!(dup, 0, "duplicates");
}
