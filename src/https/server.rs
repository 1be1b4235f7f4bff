//! The client side of the HTTPS proxy: one hyper HTTP/1.1 server per accepted TLS
//! connection (the net listener did the handshake), each request routed to the target that
//! owns its mailbox now and forwarded with its body streaming.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::affinity;
use super::forward::{Backends, Body, ClientConns};
use super::harden::{self, Admit};
use super::headers::{self, Proto};
use super::identity::{self, Key, RequestView, Resolved, Source};
use crate::net::{Accepted, Handler, Shutdown, Stream};
use crate::route::{Router, RoutingTable};

/// Limits of the client side.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A client must send its whole request head within this (slowloris).
    pub header_read_timeout: Duration,
    /// The most bytes hyper buffers for one connection's request head.
    pub max_head_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_head_bytes: 64 * 1024,
        }
    }
}

/// What every HTTPS connection shares.
pub struct HttpsCtx {
    pub router: Arc<Router>,
    pub backends: Arc<Backends>,
    /// Registry index of `[https] default_target`.
    pub default_target: Option<usize>,
    pub limits: Limits,
    /// Request shapes refused before routing, and where remote PowerShell goes.
    pub rules: harden::Rules,
}

/// Where a request goes and why.
struct Routed {
    target: usize,
    /// The mailbox (or the anchor as given) that decided: the key of server affinity.
    key: String,
    source: &'static str,
}

impl Handler for HttpsCtx {
    async fn serve(self: Arc<Self>, conn: Accepted, mut shutdown: Shutdown) {
        let peer = conn.peer;
        let io = match conn.stream {
            Stream::Tls(tls) => TokioIo::new(tls),
            // The HTTPS listener always has its TLS acceptor.
            Stream::Plain(_) => return,
        };
        let ctx = Arc::clone(&self);
        // This client connection's own backend connections (see `forward`).
        let conns = Arc::new(ClientConns::default());
        let svc = hyper::service::service_fn(move |req| {
            let ctx = Arc::clone(&ctx);
            let conns = Arc::clone(&conns);
            async move { Ok::<_, std::convert::Infallible>(ctx.handle(req, peer, &conns).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_buf_size(self.limits.max_head_bytes)
            .serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %peer, error = %e, "HTTPS connection ended");
                }
            }
            () = shutdown.signalled() => {
                // Finish the request in flight, then close.
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
}

impl HttpsCtx {
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        conns: &ClientConns,
    ) -> Response<Body> {
        let started = Instant::now();
        let table = self.router.snapshot();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let protocol = identity::classify(&path).label();
        let routed = match harden::check(&self.rules, req.uri(), req.headers()) {
            Err(refusal) => {
                tracing::warn!(client = %peer, method = %method, path = %path, protocol, why = refusal.why, "HTTPS request refused");
                let status =
                    StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
                count("-", protocol, "refused", status.as_u16());
                return answer(status, refusal.why);
            }
            // Pinned by the config: not a mailbox's request, so its source is `default`.
            Ok(Admit::PowerShell(name)) => self.index_of(name).map(|target| Routed {
                target,
                key: String::new(),
                source: Source::Default.label(),
            }),
            Ok(Admit::Route) => self.route(&table, &req),
        };
        let Some(routed) = routed else {
            count("-", protocol, Source::Default.label(), 503);
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "no target for this request: it names no mailbox and [https] has no default_target",
            );
        };
        let target = &self.backends.targets[routed.target];
        // The same server for the same mailbox (RPC's IN and OUT channels, EWS streaming),
        // and a server leaving moves only its own mailboxes.
        let server = affinity::pick(
            &routed.key,
            &target.servers,
            |s| s.upstream.addr.as_str(),
            |s| s.upstream.is_up(),
        );
        let Some(server) = server else {
            tracing::warn!(client = %peer, target = %target.name, "HTTPS: every server of the target is down");
            count(&target.name, protocol, routed.source, 503);
            let mut r = answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "the mailbox server is not reachable right now, try again later",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
            return r;
        };
        let req = prepare(req, peer);
        let result = self.backends.send(conns, target, server, req).await;
        let status = match &result {
            Ok(r) => r.status().as_u16(),
            Err(_) => 502,
        };
        let elapsed = started.elapsed();
        count(&target.name, protocol, routed.source, status);
        metrics::histogram!(
            crate::metric_names::HTTP_REQUEST_SECONDS,
            "target" => target.name.to_string(),
            "protocol" => protocol
        )
        .record(elapsed.as_secs_f64());
        tracing::info!(
            client = %peer, method = %method, path = %path, protocol, source = routed.source,
            mailbox = %routed.key, target = %target.name, server = %server.upstream.addr,
            status, ms = elapsed.as_millis() as u64, version = %table.version(),
            "request"
        );
        match result {
            Ok(res) => res.map(BodyExt::boxed),
            Err(e) => {
                tracing::warn!(target = %target.name, error = %e, "HTTPS backend failed");
                answer(StatusCode::BAD_GATEWAY, "the mailbox server did not answer")
            }
        }
    }

    /// The target that owns the request's mailbox: the first identity candidate
    /// (SPEC §5.3: hints, then the login, then the domain defaults) that the active table
    /// resolves, else `default_target`.
    fn route(&self, table: &RoutingTable, req: &Request<Incoming>) -> Option<Routed> {
        let view = RequestView {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            // Bodies (Autodiscover POST, OWA logon) are not read before routing yet.
            body: None,
        };
        let candidates = identity::candidates(&view, None, None);
        if let Some((resolved, candidate)) = identity::first_match(table, &candidates) {
            let target = self.index_of(table.target_name(resolved.target()))?;
            let key = match resolved {
                Resolved::Mailbox(m) => m.address().to_string(),
                Resolved::Target(_) => key_text(&candidate.key),
            };
            return Some(Routed {
                target,
                key,
                source: candidate.source.label(),
            });
        }
        self.default_target.map(|target| Routed {
            target,
            key: String::new(),
            source: Source::Default.label(),
        })
    }

    fn index_of(&self, target: &str) -> Option<usize> {
        self.backends
            .targets
            .iter()
            .position(|t| &*t.name == target)
    }
}

/// Counts one request in `coexist_http_requests_total`.
fn count(target: &str, protocol: &'static str, source: &'static str, status: u16) {
    metrics::counter!(
        crate::metric_names::HTTP_REQUESTS,
        "target" => target.to_string(),
        "protocol" => protocol,
        "source" => source,
        "status" => status.to_string()
    )
    .increment(1);
}

/// The text of an identity key, for server affinity and the log when no mailbox matched.
fn key_text(key: &Key) -> String {
    match key {
        Key::Smtp(s) | Key::Login(s) | Key::LegacyDn(s) | Key::Server(s) | Key::Domain(s) => {
            s.to_ascii_lowercase()
        }
        Key::Guid { guid, .. } => guid.to_string(),
        Key::Sid { sid, .. } => sid.clone(),
    }
}

/// The request as the backend gets it ([`headers::prepare_request`]): hop-by-hop headers
/// out, the client named in `X-Forwarded-For`/`-Proto` (what the client itself sent there
/// is not trusted), no `Via`, `Authorization` untouched.
fn prepare(req: Request<Incoming>, peer: SocketAddr) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    headers::prepare_request(&mut parts.headers, peer.ip(), Proto::Https, false);
    Request::from_parts(parts, body.boxed())
}

/// One of coexist's own answers.
fn answer(status: StatusCode, text: &'static str) -> Response<Body> {
    let body = Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
