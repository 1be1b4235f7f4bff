//! Backend names to addresses: hickory's resolver (the system's resolv.conf), then the
//! system's own lookup for what hickory does not know (`/etc/hosts`, mDNS, NSS modules).
//! Every protocol's backend connections resolve here.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioAsyncResolver;
use tokio::net::TcpStream;

/// Why no connection to a backend could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The name did not resolve, or every address refused or failed.
    #[error("{0}")]
    Failed(String),
    /// The last address tried did not answer in time.
    #[error("timed out")]
    Timeout,
}

pub struct Resolver {
    /// `None` when the system config cannot be read: the system lookup still works.
    hickory: Option<TokioAsyncResolver>,
}

impl Default for Resolver {
    fn default() -> Self {
        Self {
            hickory: TokioAsyncResolver::tokio_from_system_conf().ok(),
        }
    }
}

impl Resolver {
    /// The addresses of `host:port` (or of a literal `IP:port` / `[v6]:port`, at once).
    pub async fn resolve(&self, addr: &str) -> Result<Vec<SocketAddr>, String> {
        if let Ok(sa) = addr.parse::<SocketAddr>() {
            return Ok(vec![sa]);
        }
        let (host, port) = addr.rsplit_once(':').ok_or("expected host:port")?;
        let port: u16 = port.parse().map_err(|_| "bad port")?;
        if let Some(r) = &self.hickory
            && let Ok(ips) = r.lookup_ip(host).await
        {
            let v: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(ip, port)).collect();
            if !v.is_empty() {
                return Ok(v);
            }
        }
        tokio::net::lookup_host(addr)
            .await
            .map(Iterator::collect)
            .map_err(|e| e.to_string())
    }

    /// A TCP connection to the first address of `addr` that takes it, each address given
    /// `timeout`; Nagle off (commands and replies are small and latency-bound).
    pub async fn connect(&self, addr: &str, timeout: Duration) -> Result<TcpStream, ConnectError> {
        let addrs = self.resolve(addr).await.map_err(ConnectError::Failed)?;
        let mut last = ConnectError::Failed("no address".into());
        for a in addrs {
            match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => last = ConnectError::Failed(format!("connect {a}: {e}")),
                Err(_) => last = ConnectError::Timeout,
            }
        }
        Err(last)
    }
}
