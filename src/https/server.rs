//! The client side of the HTTPS proxy: one hyper HTTP/1.1 server per accepted TLS
//! connection (the net listener did the handshake), each request routed to the target that
//! owns its mailbox now and forwarded with its body streaming.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::HeaderMap;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::forward::{Backends, Body, ClientConns};
use super::harden::{self, Admit};
use super::headers::{self, Proto};
use super::identity::{self, Candidate, Key, RequestView, Resolved, Source};
use super::{affinity, cookie};
use crate::net::{Accepted, Handler, Shutdown, Stream};
use crate::route::{Router, RoutingTable};

/// Limits of the client side.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A client must send its whole request head within this (slowloris). hyper also runs
    /// it while a keep-alive connection waits for its next request, so it is IIS's own
    /// 120 s connection timeout: a shorter one would cost Outlook an NTLM handshake after
    /// every pause.
    pub header_read_timeout: Duration,
    /// The most bytes hyper buffers for one connection's request head.
    pub max_head_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(120),
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
    /// Client (address, User-Agent) → the mailbox its NTLM login named on a connection
    /// pinned to the other side (see `handle`).
    pub learned: Mutex<HashMap<(IpAddr, String), (String, Instant)>>,
}

/// How long a learned client → mailbox lasts: long enough for the client's reconnect.
const LEARNED_FOR: Duration = Duration::from_secs(300);
/// Learned clients kept at most (a flood of distinct User-Agents cannot grow it further).
const MAX_LEARNED: usize = 50_000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Who a client is across its connections, as well as a proxy can tell.
fn client_key(peer: SocketAddr, headers: &HeaderMap) -> (IpAddr, String) {
    let agent = headers
        .get(header::USER_AGENT)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .chars()
                .take(256)
                .collect()
        })
        .unwrap_or_default();
    (peer.ip(), agent)
}

/// The request logs in on its TCP connection (NTLM, or Negotiate: Kerberos or NTLM).
fn connection_auth(headers: &HeaderMap) -> bool {
    headers.get(header::AUTHORIZATION).is_some_and(|v| {
        let v = v.as_bytes();
        let scheme = |s: &[u8]| {
            v.len() > s.len() && v[..s.len()].eq_ignore_ascii_case(s) && v[s.len()] == b' '
        };
        scheme(b"NTLM") || scheme(b"Negotiate")
    })
}

/// Log in again, on a new connection.
fn reauthenticate() -> Response<Body> {
    let mut r = answer(
        StatusCode::UNAUTHORIZED,
        "this connection is logged in on another mailbox server; log in again",
    );
    let h = r.headers_mut();
    h.append(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Negotiate"),
    );
    h.append(header::WWW_AUTHENTICATE, HeaderValue::from_static("NTLM"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Where a request goes and why.
struct Routed {
    target: usize,
    /// The mailbox (or the anchor as given) that decided: the key of server affinity.
    key: String,
    source: Source,
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
        let mut req = req.map(BodyExt::boxed);
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let protocol = identity::classify(&path).label();
        let routed = match harden::check(&self.rules, req.uri(), req.headers()) {
            Err(refusal) => {
                tracing::warn!(client = %peer, method = %method, path = %path, protocol, why = refusal.why, "HTTPS request refused");
                let status =
                    StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
                count("-", protocol, "refused", status.as_u16());
                let mut r = answer(status, refusal.why);
                // Nothing more is read from a client that sent such a request.
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
            // Pinned by the config: not a mailbox's request, so its source is `default`.
            Ok(Admit::PowerShell(name)) => self.index_of(name).map(|target| Routed {
                target,
                key: String::new(),
                source: Source::Default,
            }),
            Ok(Admit::Route) => {
                // Autodiscover POST and the OWA logon name the mailbox in their body only.
                let peeked =
                    if identity::wants_body(method.as_str(), identity::classify(&path), &path) {
                        match peek(&mut req).await {
                            Ok(bytes) => Some(bytes),
                            Err(status) => {
                                count("-", protocol, Source::Default.label(), status.as_u16());
                                return answer(status, "the request body could not be read");
                            }
                        }
                    } else {
                        None
                    };
                self.route(&table, &req, peer, peeked.as_deref())
            }
        };
        let Some(routed) = routed else {
            count("-", protocol, Source::Default.label(), 503);
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "no target for this request: it names no mailbox and [https] has no default_target",
            );
        };
        let pinned = conns.pinned();
        let mut routed = routed;
        if let Some((pinned_target, _)) = &pinned
            && routed.source == Source::Default
        {
            // Nothing in the request names a mailbox (after an NTLM handshake requests carry
            // no Authorization at all): it belongs to the login of its connection.
            routed.target = *pinned_target;
        }
        let target = &self.backends.targets[routed.target];
        if let Some((pinned_target, _)) = &pinned
            && *pinned_target != routed.target
        {
            // This connection's NTLM/Negotiate login lives on a backend connection of the
            // other side: it cannot serve this request. The client logs in again on a new
            // connection, which the login it just named routes right.
            if routed.source == Source::Login {
                self.learn(peer, req.headers(), &routed.key);
            }
            tracing::info!(client = %peer, path = %path, mailbox = %routed.key, target = %target.name, "HTTPS: pinned connection asked for the other side; 401 and close");
            count(&target.name, protocol, routed.source.label(), 401);
            return reauthenticate();
        }
        // A pinned connection keeps its server; otherwise the same server for the same
        // mailbox (RPC's IN and OUT channels, EWS streaming), and a server leaving moves
        // only its own mailboxes.
        let server = match &pinned {
            Some((_, server)) => Some(server),
            None => affinity::pick(
                &routed.key,
                &target.servers,
                |s| s.upstream.addr.as_str(),
                |s| s.upstream.is_up(),
            ),
        };
        if target.servers.is_empty() {
            // A side that only does SMTP: no retry will help.
            count(&target.name, protocol, routed.source.label(), 502);
            return answer(
                StatusCode::BAD_GATEWAY,
                "the mailbox's side has no HTTPS servers configured",
            );
        }
        let Some(server) = server else {
            tracing::warn!(client = %peer, target = %target.name, "HTTPS: every server of the target is down");
            count(&target.name, protocol, routed.source.label(), 503);
            let mut r = answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "the mailbox server is not reachable right now, try again later",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
            return r;
        };
        if pinned.is_none() && connection_auth(req.headers()) {
            conns.pin(routed.target, server);
        }
        // A long poll's response head comes at its end (an ActiveSync Ping, up to an hour):
        // the table it was routed by is not kept alive for that long.
        let version = table.version();
        drop(table);
        let req = prepare(req, peer);
        let result = self.backends.send(conns, target, server, req).await;
        let status = match &result {
            Ok(r) => r.status().as_u16(),
            Err(_) => 502,
        };
        let elapsed = started.elapsed();
        count(&target.name, protocol, routed.source.label(), status);
        metrics::histogram!(
            crate::metric_names::HTTP_REQUEST_SECONDS,
            "target" => target.name.to_string(),
            "protocol" => protocol
        )
        .record(elapsed.as_secs_f64());
        tracing::info!(
            client = %peer, method = %method, path = %path, protocol, source = routed.source.label(),
            mailbox = %routed.key, target = %target.name, server = %server.upstream.addr,
            status, ms = elapsed.as_millis() as u64, version = %version,
            "request"
        );
        match result {
            Ok(res) => {
                let (mut parts, body) = res.into_parts();
                // The backend said it closes: the client connection ends with this response
                // too (an NTLM login lives on that backend connection and is gone with it).
                let closing = parts
                    .headers
                    .get_all(header::CONNECTION)
                    .iter()
                    .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                headers::strip_hop_by_hop(&mut parts.headers);
                if closing {
                    parts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => {
                tracing::warn!(target = %target.name, error = %e, "HTTPS backend failed");
                answer(StatusCode::BAD_GATEWAY, "the mailbox server did not answer")
            }
        }
    }

    /// The target that owns the request's mailbox: the first identity candidate
    /// (SPEC §5.3: hints, then the login, then the domain defaults) that the active table
    /// resolves, else `default_target`.
    fn route(
        &self,
        table: &RoutingTable,
        req: &Request<Body>,
        peer: SocketAddr,
        body: Option<&[u8]>,
    ) -> Option<Routed> {
        let view = RequestView {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            body,
        };
        let candidates = identity::candidates(&view, None, self.learned(peer, req.headers()));
        if let Some((resolved, candidate)) = identity::first_match(table, &candidates) {
            let target = self.index_of(table.target_name(resolved.target()))?;
            let key = match resolved {
                Resolved::Mailbox(m) => m.address().to_string(),
                Resolved::Target(_) => key_text(&candidate.key),
            };
            return Some(Routed {
                target,
                key,
                source: candidate.source,
            });
        }
        self.default_target.map(|target| Routed {
            target,
            key: String::new(),
            source: Source::Default,
        })
    }

    /// The mailbox this client (address and User-Agent) named with its last NTLM login on
    /// a connection of the other side, for its next connections' first legs, which name
    /// no user (SPEC §5.1).
    fn learned(&self, peer: SocketAddr, headers: &HeaderMap) -> Option<Candidate> {
        let key = client_key(peer, headers);
        let mut map = lock(&self.learned);
        match map.get(&key) {
            Some((mailbox, at)) if at.elapsed() < LEARNED_FOR => Some(Candidate::new(
                Source::Learned,
                Key::Smtp(mailbox.clone()),
                "NTLM login on an earlier connection",
            )),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    fn learn(&self, peer: SocketAddr, headers: &HeaderMap, mailbox: &str) {
        let mut map = lock(&self.learned);
        if map.len() >= MAX_LEARNED {
            map.retain(|_, (_, at)| at.elapsed() < LEARNED_FOR);
            if map.len() >= MAX_LEARNED {
                return;
            }
        }
        map.insert(
            client_key(peer, headers),
            (mailbox.to_string(), Instant::now()),
        );
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
fn prepare(req: Request<Body>, peer: SocketAddr) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    headers::prepare_request(&mut parts.headers, peer.ip(), Proto::Https, false);
    // coexist's own routing cookie is never a backend's business.
    cookie::strip_in(&mut parts.headers);
    Request::from_parts(parts, body)
}

/// How long a client may take to send the part of its body that names the mailbox.
const PEEK_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the first [`identity::BODY_PEEK_LIMIT`] bytes of the request's body (or all of a
/// shorter one) and puts them back in front of the rest, which still streams: the backend
/// gets the whole body, unchanged. `Err` is the status for a client that sends too slowly
/// (408) or breaks off (400).
async fn peek(req: &mut Request<Body>) -> Result<Bytes, StatusCode> {
    let mut body = std::mem::replace(req.body_mut(), super::forward::empty());
    let deadline = tokio::time::Instant::now() + PEEK_TIMEOUT;
    let mut frames = Vec::new();
    let mut seen = Vec::new();
    while seen.len() < identity::BODY_PEEK_LIMIT {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(StatusCode::REQUEST_TIMEOUT),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(StatusCode::BAD_REQUEST),
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    seen.extend_from_slice(d);
                }
                frames.push(frame);
            }
        }
    }
    seen.truncate(identity::BODY_PEEK_LIMIT);
    let replay = futures_util::stream::iter(frames.into_iter().map(Ok));
    let rest = http_body_util::BodyStream::new(body);
    *req.body_mut() = StreamBody::new(futures_util::StreamExt::chain(replay, rest)).boxed();
    Ok(Bytes::from(seen))
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
