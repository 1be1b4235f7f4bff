//! Listeners own the connection limits: a cap on all connections and one per client IP,
//! accept errors backed off, one task per connection, and a drain on shutdown that waits
//! for every connection to finish (each holds a permit of the total cap).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::smtp::io::Conn;
use crate::smtp::reply::codes;
use crate::smtp::session::{Session, SessionCtx};

/// Connection caps shared by every SMTP listener of one proxy.
pub struct ConnLimits {
    total: Arc<Semaphore>,
    max_total: u32,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    max_per_ip: u32,
}

impl ConnLimits {
    pub fn new(max_total: u32, max_per_ip: u32) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(max_total as usize)),
            max_total,
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip,
        })
    }

    fn per_ip(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connections open right now.
    pub fn open(&self) -> usize {
        self.max_total as usize - self.total.available_permits()
    }

    /// Waits until every connection has ended, or the deadline passes; returns how many
    /// were still open.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let all = tokio::time::timeout(deadline, self.total.acquire_many(self.max_total)).await;
        match all {
            Ok(Ok(permits)) => {
                drop(permits);
                0
            }
            _ => self.open(),
        }
    }
}

/// Releases the per-IP count when the connection ends, however it ends.
struct IpGuard {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut m = self.limits.per_ip();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Accepts SMTP connections until shutdown.
pub async fn run_smtp(
    listener: TcpListener,
    ctx: Arc<SessionCtx>,
    implicit_tls: bool,
    limits: Arc<ConnLimits>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stopped(&mut shutdown) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(10);
                a
            }
            Err(e) => {
                // EMFILE and friends: wait instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = Arc::clone(&limits.total).try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let ip_guard = {
            let mut m = limits.per_ip();
            let n = m.entry(peer.ip()).or_insert(0);
            if *n >= limits.max_per_ip {
                drop(m);
                tokio::spawn(refuse(stream));
                continue;
            }
            *n += 1;
            IpGuard {
                limits: Arc::clone(&limits),
                ip: peer.ip(),
            }
        };
        let ctx = Arc::clone(&ctx);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ip_guard = ip_guard;
            handle(ctx, stream, peer, implicit_tls, shutdown).await;
        });
    }
}

async fn handle(
    ctx: Arc<SessionCtx>,
    stream: TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
    shutdown: watch::Receiver<bool>,
) {
    // Where the client connected (PROXY headers towards backends name it).
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let conn = if implicit_tls {
        let Some(acceptor) = ctx.tls.clone() else {
            return;
        };
        // Boxed: the handshake's state is large and would otherwise be reserved in every
        // connection's task, TLS or not.
        match tokio::time::timeout(Duration::from_secs(30), Box::pin(acceptor.accept(stream))).await
        {
            Ok(Ok(tls)) => Conn::ServerTls(Box::new(tls)),
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        }
    } else {
        Conn::Plain(stream)
    };
    if let Err(e) = Session::new(ctx, conn, peer, local, shutdown).run().await {
        tracing::debug!(peer = %peer, error = %e, "session ended");
    }
}

async fn refuse(mut stream: TcpStream) {
    let mut out = Vec::new();
    codes::too_many_connections().write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&out)).await;
    let _ = stream.shutdown().await;
}

/// Resolves once shutdown has been signalled (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it here, not in a caller's select.
    let _ = rx.wait_for(|s| *s).await;
}
