//! The backend side of the HTTPS proxy: connections to a target's HTTPS servers — TLS
//! (re-encrypted, as Extended Protection requires) or plain `http://` for labs — speaking
//! HTTP/1.1 only. Bodies stream both ways: nothing is buffered.
//!
//! A backend connection belongs to one client connection ([`ClientConns`]) and is never
//! shared with another client: IIS authenticates NTLM and Negotiate per TCP connection, so
//! a connection one client logged in on would serve the next client as that user (the
//! HAProxy issue where one user saw another user's mail). It is reused for the same
//! client's next requests, and closed with it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;

use crate::config::TargetConfig;
use crate::net::resolve::{ConnectError, Resolver};
use crate::net::tls;
use crate::upstream::{self, Prober, Registry};

/// Bodies in both directions: the client's or the backend's, streamed, or one of coexist's
/// own small answers.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Backend connections one client connection keeps open at most (one per server it has
/// reached; a client rarely reaches more than one).
const MAX_PER_CLIENT: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{server}: {what}")]
    Connect { server: String, what: String },
    #[error("{server}: connect timed out")]
    Timeout { server: String },
    #[error("{server}: {source}")]
    Http {
        server: String,
        source: hyper::Error,
    },
}

/// One HTTPS server of a target.
pub struct Server {
    pub upstream: Arc<upstream::Server>,
    /// `host:port` to connect to.
    addr: String,
    /// `http://` in the config: a plain-HTTP lab backend.
    plain: bool,
}

/// The backend connections of one client connection, by server: reused for that client's
/// next requests only, closed when the client connection ends (dropping the last sender
/// ends its connection task).
#[derive(Default)]
pub struct ClientConns {
    conns: Mutex<Vec<(Arc<Server>, SendRequest<Body>)>>,
    /// Set by the first request that carries `Authorization: NTLM|Negotiate`: the target
    /// (registry index) and server this client connection is bound to from then on — the
    /// login lives on that backend connection.
    pinned: Mutex<Option<(usize, Arc<Server>)>>,
}

impl ClientConns {
    pub fn pinned(&self) -> Option<(usize, Arc<Server>)> {
        lock(&self.pinned).clone()
    }

    pub fn pin(&self, target: usize, server: &Arc<Server>) {
        *lock(&self.pinned) = Some((target, Arc::clone(server)));
    }

    /// This client's connection to `server`, if it has one ready for a request.
    fn take(&self, server: &Arc<Server>) -> Option<SendRequest<Body>> {
        let mut conns = lock(&self.conns);
        conns.retain(|(_, s)| !s.is_closed());
        let i = conns
            .iter()
            .position(|(s, c)| Arc::ptr_eq(s, server) && c.is_ready())?;
        Some(conns.swap_remove(i).1)
    }

    fn keep(&self, server: &Arc<Server>, sender: SendRequest<Body>) {
        let mut conns = lock(&self.conns);
        if conns.len() >= MAX_PER_CLIENT {
            conns.remove(0);
        }
        conns.push((Arc::clone(server), sender));
    }
}

/// One target's HTTPS servers.
pub struct Target {
    pub name: Arc<str>,
    pub servers: Vec<Arc<Server>>,
    tls: Arc<ClientConfig>,
}

/// Every target's HTTPS servers, in the upstream registry's order.
pub struct Backends {
    pub targets: Vec<Target>,
    pub connect_timeout: Duration,
    resolver: Resolver,
}

impl Backends {
    /// `targets` must be the config the registry was built from.
    pub fn new(targets: &[TargetConfig], registry: &Registry) -> Result<Self, tls::TlsError> {
        debug_assert_eq!(targets.len(), registry.targets().len());
        let mut out = Vec::new();
        for (t, up) in targets.iter().zip(registry.targets()) {
            let mut client = (*tls::client_config(t.tls_verify, t.tls_ca.as_deref())?).clone();
            // HTTP/1.1 towards Exchange as towards clients.
            client.alpn_protocols = vec![b"http/1.1".to_vec()];
            out.push(Target {
                name: Arc::clone(&up.name),
                servers: up
                    .https
                    .iter()
                    .map(|s| {
                        let (addr, plain) = match s.addr.strip_prefix("http://") {
                            Some(rest) => (rest.to_string(), true),
                            None => (s.addr.clone(), false),
                        };
                        Arc::new(Server {
                            upstream: Arc::clone(s),
                            addr,
                            plain,
                        })
                    })
                    .collect(),
                tls: Arc::new(client),
            });
        }
        Ok(Self {
            targets: out,
            connect_timeout: Duration::from_secs(10),
            resolver: Resolver::default(),
        })
    }

    /// Sends `req` to `server` of `target` on the client's own connection to it, or a new
    /// one, and gives the response with its body still streaming from the backend.
    pub async fn send(
        &self,
        client: &ClientConns,
        target: &Target,
        server: &Arc<Server>,
        req: Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, ForwardError> {
        let mut sender = match client.take(server) {
            Some(s) => s,
            None => {
                // A failed connect counts against the server; a successful one does not count
                // for it: a server in Exchange's maintenance mode still takes connections
                // while its health page says 503, and only the probe may bring it back.
                let c = self.connect(target, server).await;
                if let Err(e) = &c {
                    server.upstream.observe(Err(&e.to_string()));
                }
                c?
            }
        };
        let res = sender
            .send_request(req)
            .await
            .map_err(|source| ForwardError::Http {
                server: server.upstream.addr.clone(),
                source,
            });
        // Kept for this client at once: taken again only once the response body has been
        // read to its end and the connection is ready.
        if res.is_ok() && !sender.is_closed() {
            client.keep(server, sender);
        }
        res
    }

    /// A new HTTP/1.1 connection to `server`, its connection task running.
    pub async fn connect(
        &self,
        target: &Target,
        server: &Arc<Server>,
    ) -> Result<SendRequest<Body>, ForwardError> {
        let name = || server.upstream.addr.clone();
        let err = |what: String| ForwardError::Connect {
            server: name(),
            what,
        };
        let tcp = self
            .resolver
            .connect(&server.addr, self.connect_timeout)
            .await
            .map_err(|e| match e {
                ConnectError::Timeout => ForwardError::Timeout { server: name() },
                ConnectError::Failed(what) => err(what),
            })?;
        if server.plain {
            handshake(TokioIo::new(tcp), server).await
        } else {
            let sni = tls::server_name(&server.addr).map_err(|e| err(e.to_string()))?;
            let handshake_tls =
                tokio_rustls::TlsConnector::from(Arc::clone(&target.tls)).connect(sni, tcp);
            // A backend that takes TCP and stalls in TLS is as dead as one that refuses.
            let tls = match tokio::time::timeout(self.connect_timeout, handshake_tls).await {
                Ok(r) => r.map_err(|e| err(format!("TLS: {e}"))),
                Err(_) => Err(ForwardError::Timeout { server: name() }),
            };
            match tls {
                Ok(tls) => handshake(TokioIo::new(tls), server).await,
                Err(e) => Err(e),
            }
        }
    }
}

/// Where the probe asks: Exchange 2013 and later answer `200` there for a healthy OWA;
/// 2010, which has no such page, answers `404` — an answer all the same.
const PROBE_PATH: &str = "/owa/HealthCheck.htm";

impl Prober for Backends {
    /// Healthy when the server answers HTTP with a status below 500.
    async fn probe(&self, server: &upstream::Server) -> Result<(), String> {
        let target = self
            .targets
            .get(server.target_index)
            .ok_or("no such target")?;
        let s = target.servers.get(server.index).ok_or("no such server")?;
        let mut sender = self.connect(target, s).await.map_err(|e| e.to_string())?;
        let host = s.addr.clone();
        let req = Request::get(PROBE_PATH)
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "coexist-health")
            .body(empty())
            .map_err(|e| e.to_string())?;
        let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = res.status();
        // Read the (small) answer so the connection ends cleanly.
        let _ = http_body_util::BodyExt::collect(res.into_body()).await;
        if status.is_server_error() {
            return Err(format!("{PROBE_PATH} answered {status}"));
        }
        Ok(())
    }
}

/// An empty request or response body.
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

async fn handshake<I>(io: I, server: &Server) -> Result<SendRequest<Body>, ForwardError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|source| ForwardError::Http {
            server: server.upstream.addr.clone(),
            source,
        })?;
    let addr = server.upstream.addr.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(server = %addr, error = %e, "backend connection ended");
        }
    });
    Ok(sender)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
