//! Listeners own the connection limits, for every protocol alike: a cap on all
//! connections and one per client IP, accept errors backed off, implicit TLS accepted
//! here (with a deadline), one task per connection, and a drain on shutdown that waits for
//! every connection to finish (each holds a permit of the total cap).
//!
//! A protocol plugs in as a [`Handler`]: it gets an accepted connection and the shutdown
//! signal, and never sees the limits (Stalwart's `SessionManager`, pingora's `ServerApp`).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::shutdown::Shutdown;

/// How long a client may take over its TLS handshake before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A client connection as a protocol receives it.
pub enum Stream {
    Plain(TcpStream),
    /// Implicit TLS, handshake done (boxed: the TLS state is large, and most connections
    /// of a mail proxy are plain until STARTTLS).
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted connection.
pub struct Accepted {
    pub stream: Stream,
    pub peer: SocketAddr,
    /// The address the client connected to (PROXY headers towards backends name it).
    pub local: SocketAddr,
}

/// A protocol's side of a listener: serves one connection until it ends.
pub trait Handler: Send + Sync + 'static {
    fn serve(
        self: Arc<Self>,
        conn: Accepted,
        shutdown: Shutdown,
    ) -> impl Future<Output = ()> + Send;
}

/// Connection caps shared by every listener of one proxy.
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

    /// Counts a connection from `ip` against its cap; `None` when it is at the cap.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpGuard> {
        let mut m = self.per_ip();
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(IpGuard {
            limits: Arc::clone(self),
            ip,
        })
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

/// What a listener does besides handing connections to its protocol.
pub struct ListenOptions {
    /// TLS from the first byte (SMTPS on 465, HTTPS).
    pub implicit_tls: Option<TlsAcceptor>,
    /// Written to a client refused over the caps, then the connection is closed (an SMTP
    /// 421): the protocol's own words for "busy, try later"; empty when the protocol has
    /// none before its TLS handshake (HTTPS).
    pub refusal: &'static [u8],
}

/// Accepts connections until shutdown, each served by `handler` in a task of its own.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    options: ListenOptions,
    limits: Arc<ConnLimits>,
    mut shutdown: Shutdown,
) {
    let options = Arc::new(options);
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.signalled() => return,
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
            tokio::spawn(refuse(stream, options.refusal));
            continue;
        };
        let Some(ip_guard) = limits.admit(peer.ip()) else {
            drop(permit);
            tokio::spawn(refuse(stream, options.refusal));
            continue;
        };
        let handler = Arc::clone(&handler);
        let options = Arc::clone(&options);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ip_guard = ip_guard;
            if let Some(conn) = accept(stream, peer, options.implicit_tls.as_ref()).await {
                handler.serve(conn, shutdown).await;
            }
        });
    }
}

/// The client's connection ready for its protocol: addresses known, implicit TLS done.
async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<&TlsAcceptor>,
) -> Option<Accepted> {
    let local = stream.local_addr().ok()?;
    let stream = match tls {
        None => Stream::Plain(stream),
        // Boxed: the handshake's state is large and would otherwise be reserved in every
        // connection's task, TLS or not.
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, Box::pin(acceptor.accept(stream)))
                .await
            {
                Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    return None;
                }
                Err(_) => return None,
            }
        }
    };
    Some(Accepted {
        stream,
        peer,
        local,
    })
}

async fn refuse(mut stream: TcpStream, refusal: &'static [u8]) {
    if !refusal.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(refusal)).await;
    }
    let _ = stream.shutdown().await;
}
