//! The admin API (HTTP/1.1, hyper): health, status, lookups, reload, cutover, rollback,
//! Prometheus metrics and a status page.
//!
//! Everything but `/healthz` and `/readyz` needs `Authorization: Bearer <token>` when a token
//! is configured (the config refuses a non-loopback address without one). Errors are JSON:
//! `{"error": "...", "errors": [{file, line, message}]}`. Table changes run on a blocking
//! thread: building a million-mailbox table takes a second and must not stall the runtime.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub mod chart;

use crate::control::{Change, Control, ControlError};
use crate::net::Shutdown;
use crate::route::explain;
use crate::upstream::{Protocol, Registry};

/// Largest request body accepted (cutover and rollback bodies are tiny).
const MAX_BODY: usize = 64 * 1024;

/// The process-wide Prometheus recorder (metrics has one global recorder).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Histograms with fixed buckets (SPEC §7), not the exporter's default summaries:
        // buckets aggregate across instances and keep memory fixed, since the upkeep task
        // folds each sample into its bucket counts.
        let recorder = PrometheusBuilder::new()
            .set_buckets(crate::metric_names::LATENCY_BUCKETS)
            .expect("LATENCY_BUCKETS is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (tests, embedding); then /metrics
        // shows what this one sees, which is nothing, rather than failing.
        let _ = metrics::set_global_recorder(recorder);
        crate::metric_names::describe();
        handle
    })
}

pub struct AdminCtx {
    pub control: Arc<Control>,
    pub spool: Arc<crate::smtp::spool::Spool>,
    pub traffic: Arc<crate::traffic::Traffic>,
    pub upstream: Arc<Registry>,
    pub token: Option<String>,
    /// The read-only pages answer without the token (`[admin] public_status`).
    pub public_status: bool,
    pub ready: AtomicBool,
    pub started: SystemTime,
    /// Migration progress of the active table, computed once per version (a walk over
    /// every mailbox: a second for a million, too much for each page refresh).
    pub progress: std::sync::Mutex<Option<Arc<Progress>>>,
}

/// Mailboxes pinned away from their site's owner listed on the page and in `/status` (the
/// rest are counted): a long list helps nobody watching a cutover.
pub const PINNED_LISTED: usize = 100;

/// Per site, how many mailboxes each target owns, and the mailboxes whose owner is not
/// their site's (pinned with `[owners]` or their own `owner`).
pub struct Progress {
    version: crate::route::Version,
    /// site → target → mailboxes, every target of the table present (zeros included).
    pub sites: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// (address, site, owner), at most [`PINNED_LISTED`], in table order.
    pub pinned: Vec<(String, String, String)>,
    pub pinned_total: usize,
}

impl Progress {
    fn of(t: &crate::route::RoutingTable) -> Progress {
        let zero: std::collections::BTreeMap<String, u64> =
            t.target_names().map(|n| (n.to_string(), 0)).collect();
        let mut sites: std::collections::BTreeMap<_, _> = t
            .sites()
            .map(|s| (s.name.to_string(), zero.clone()))
            .collect();
        let mut pinned = Vec::new();
        let mut pinned_total = 0;
        for m in t.mailboxes() {
            let owner = m.owner_name();
            if let Some(c) = sites.get_mut(m.site()).and_then(|by| by.get_mut(owner)) {
                *c += 1;
            }
            if t.site_owner(m.site()).is_some_and(|o| o != owner) {
                pinned_total += 1;
                if pinned.len() < PINNED_LISTED {
                    pinned.push((
                        m.address().to_string(),
                        m.site().to_string(),
                        owner.to_string(),
                    ));
                }
            }
        }
        Progress {
            version: t.version(),
            sites,
            pinned,
            pinned_total,
        }
    }
}

impl AdminCtx {
    /// The active table's progress, from the cache when the version has not changed.
    pub fn progress(&self, t: &crate::route::RoutingTable) -> Arc<Progress> {
        let mut cache = self
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match cache.as_ref() {
            Some(p) if p.version == t.version() => Arc::clone(p),
            _ => {
                let p = Arc::new(Progress::of(t));
                *cache = Some(Arc::clone(&p));
                p
            }
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(format!("{v:#}\n"))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn text_resp(status: StatusCode, ctype: &'static str, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn error(status: StatusCode, msg: &str) -> Resp {
    json_resp(status, &json!({ "error": msg }))
}

fn control_error(e: &ControlError) -> Resp {
    match e {
        ControlError::Rejected(d) => json_resp(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({
                "error": "routing table rejected; the active version keeps serving",
                "errors": d.errors,
                "more_errors": d.more,
            }),
        ),
        ControlError::Pending(p) => json_resp(
            StatusCode::CONFLICT,
            &json!({
                "error": e.to_string(),
                "pending": **p,
            }),
        ),
        ControlError::NotFound(_) | ControlError::Rollback(_) => {
            error(StatusCode::NOT_FOUND, &e.to_string())
        }
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Serves the admin API until shutdown.
pub async fn serve(listener: TcpListener, ctx: Arc<AdminCtx>, mut shutdown: Shutdown) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.signalled() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = Arc::clone(&ctx);
                async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// What a request may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// The token (or no token configured): everything.
    Full,
    /// No token, but `public_status`: the status page, `/status` and `/metrics`, without
    /// who changed what and without mailbox addresses.
    Public,
    Denied,
}

fn access(ctx: &AdminCtx, req: &Request<Incoming>) -> Access {
    let Some(token) = &ctx.token else {
        return Access::Full;
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Length first, then every byte: the comparison does not stop at the first difference.
    let good = given.is_some_and(|given| {
        given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if good {
        Access::Full
    } else if ctx.public_status
        && req.method() == Method::GET
        && matches!(req.uri().path(), "/" | "/status" | "/metrics")
    {
        Access::Public
    } else {
        Access::Denied
    }
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// Decodes a query-string value (`%XX`, `+`); invalid escapes stay as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn flag(req: &Request<Incoming>, name: &str) -> bool {
    query_param(req, name).is_some_and(|v| v == "1" || v == "true")
}

fn dry_run(req: &Request<Incoming>) -> bool {
    flag(req, "dry_run")
}

fn actor(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-coexist-actor")
        .and_then(|v| v.to_str().ok())
        .map_or_else(
            || "api".to_string(),
            |v| v.chars().filter(|c| !c.is_control()).take(100).collect(),
        )
}

async fn body_json(req: Request<Incoming>) -> Result<Value, Resp> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or unreadable",
            )
        })?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("request body is not JSON: {e}"),
        )
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Resp> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
}

async fn handle(ctx: &Arc<AdminCtx>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => {
            return text_resp(StatusCode::OK, "text/plain", "ok\n".into());
        }
        (&Method::GET, "/readyz") => {
            return if ctx.ready.load(Ordering::Relaxed) {
                text_resp(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text_resp(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "starting\n".into(),
                )
            };
        }
        _ => {}
    }
    let access = access(ctx, &req);
    let full = access == Access::Full;
    if access == Access::Denied {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        r.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let result = match (&method, path.as_str()) {
        // A million-mailbox table takes a while to summarise after a swap: off the runtime.
        (&Method::GET, "/status") => {
            let ctx = Arc::clone(ctx);
            blocking(move || json_resp(StatusCode::OK, &status_json(&ctx, full))).await
        }
        (&Method::GET, "/lookup") => match query_param(&req, "address") {
            Some(a) => {
                let table = ctx.control.router().snapshot();
                Ok(json_resp(StatusCode::OK, &explain(&table, &a)))
            }
            None => Ok(error(StatusCode::BAD_REQUEST, "missing ?address=")),
        },
        (&Method::GET, "/routes/history") => Ok(json_resp(StatusCode::OK, &history_json(ctx))),
        (&Method::POST, "/routes/reload") => {
            let (c, dry, by) = (Arc::clone(&ctx.control), dry_run(&req), actor(&req));
            blocking(move || c.reload(dry, &by)).await.map(report)
        }
        (&Method::POST, "/routes/cutover") => {
            let (c, dry, by) = (Arc::clone(&ctx.control), dry_run(&req), actor(&req));
            let force = flag(&req, "force");
            match body_json(req).await {
                Err(r) => Ok(r),
                Ok(v) => match serde_json::from_value::<Change>(v) {
                    Err(_) => Ok(error(
                        StatusCode::BAD_REQUEST,
                        "body must be {\"site\": S, \"to\": T} or {\"mailbox\": A, \"to\": T}",
                    )),
                    Ok(change) => blocking(move || c.cutover(&change, dry, force, &by))
                        .await
                        .map(report),
                },
            }
        }
        (&Method::POST, "/routes/rollback") => {
            let (c, by, force) = (Arc::clone(&ctx.control), actor(&req), flag(&req, "force"));
            match body_json(req).await {
                Err(r) => Ok(r),
                Ok(v) => {
                    let to = v.get("version").and_then(Value::as_str).map(str::to_string);
                    blocking(move || c.rollback(to.as_deref(), force, &by))
                        .await
                        .map(report)
                }
            }
        }
        (&Method::GET, "/queue") => Ok(json_resp(
            StatusCode::OK,
            &json!({ "messages": ctx.spool.list() }),
        )),
        (&Method::GET, p) if p.starts_with("/queue/") => match ctx.spool.get(&p["/queue/".len()..])
        {
            Ok(e) => Ok(json_resp(StatusCode::OK, &json!(e))),
            Err(e) => Ok(error(StatusCode::NOT_FOUND, &e.to_string())),
        },
        (&Method::POST, "/queue/retry" | "/queue/delete") => {
            let delete = path == "/queue/delete";
            let spool = Arc::clone(&ctx.spool);
            match body_json(req).await {
                Err(r) => Ok(r),
                Ok(v) => {
                    let id = v.get("id").and_then(Value::as_str).map(str::to_string);
                    let r = blocking(move || match (delete, id) {
                        (true, Some(id)) => spool.delete(&id).map(|()| json!({"deleted": id})),
                        (true, None) => Err(crate::smtp::spool::SpoolError::NotFound(
                            "(no id given)".into(),
                        )),
                        (false, id) => spool
                            .retry_now(id.as_deref())
                            .map(|n| json!({"due_now": n})),
                    })
                    .await;
                    r.map(|x| match x {
                        Ok(v) => json_resp(StatusCode::OK, &v),
                        Err(e) => error(StatusCode::NOT_FOUND, &e.to_string()),
                    })
                }
            }
        }
        (&Method::GET, "/metrics") => Ok(text_resp(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            render_metrics(&ctx.control),
        )),
        (&Method::GET, "/") => {
            let ctx = Arc::clone(ctx);
            blocking(move || {
                text_resp(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    status_page(&ctx, full),
                )
            })
            .await
        }
        (_, "/status" | "/lookup" | "/routes/history" | "/metrics" | "/") => {
            Ok(error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"))
        }
        (_, "/routes/reload" | "/routes/cutover" | "/routes/rollback") => {
            Ok(error(StatusCode::METHOD_NOT_ALLOWED, "use POST"))
        }
        _ => Ok(error(StatusCode::NOT_FOUND, "no such endpoint")),
    };
    result.unwrap_or_else(|r| r)
}

fn report(r: Result<crate::control::ChangeReport, ControlError>) -> Resp {
    match r {
        Ok(rep) => json_resp(StatusCode::OK, &json!(rep)),
        Err(e) => control_error(&e),
    }
}

/// The Prometheus text: the recorder's metrics, with the table gauges refreshed, and the
/// version info gauge written here from the active table. The recorder keeps every label set
/// it was ever given, so a version gauge kept there would list every version since start;
/// rendered here it is exactly one series, the active version.
fn render_metrics(control: &Control) -> String {
    let t = control.router().snapshot();
    metrics::gauge!(crate::metric_names::ROUTE_TABLE_MAILBOXES).set(t.mailbox_count() as f64);
    let mut out = prometheus().render();
    let name = crate::metric_names::ROUTE_TABLE_VERSION_INFO;
    // Versions are `SEQ-HASH` (digits, a dash, hex): nothing to escape in the label.
    let _ = write!(
        out,
        "# HELP {name} {}\n# TYPE {name} gauge\n{name}{{version=\"{}\"}} 1\n",
        crate::metric_names::ROUTE_TABLE_VERSION_INFO_HELP,
        t.version()
    );
    out
}

/// Recipients each target received for `site` in the traffic window, every target listed.
fn site_recipients<'t>(
    per_site: &crate::traffic::PerSite,
    targets: impl Iterator<Item = &'t str>,
    site: &str,
) -> Vec<(&'t str, u64)> {
    targets
        .map(|tg| {
            let n = per_site
                .get(&(tg.to_string(), site.to_string()))
                .copied()
                .unwrap_or(0);
            (tg, n)
        })
        .collect()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `/status`; without `full` access the pinned mailboxes are counted, not named.
pub fn status_json(ctx: &AdminCtx, full: bool) -> Value {
    let t = ctx.control.router().snapshot();
    let progress = ctx.progress(&t);
    let (per_target, per_site) = ctx.traffic.snapshot(Protocol::Smtp);
    let sites: Vec<Value> = t
        .sites()
        .map(|s| {
            let recipients: std::collections::BTreeMap<&str, u64> =
                site_recipients(&per_site, t.target_names(), s.name)
                    .into_iter()
                    .collect();
            json!({
                "name": s.name,
                "owner": s.owner,
                "mailboxes": s.mailboxes,
                "mailboxes_by_target": progress.sites.get(s.name),
                "recipients_30m": recipients,
            })
        })
        .collect();
    let traffic: serde_json::Map<String, Value> = per_target
        .iter()
        .map(|(tg, series)| {
            (
                tg.clone(),
                json!({ "recipients": series.iter().sum::<u64>(), "per_minute": series }),
            )
        })
        .collect();
    let pinned: Vec<Value> = progress
        .pinned
        .iter()
        .filter(|_| full)
        .map(|(a, site, owner)| json!({"address": a, "site": site, "owner": owner}))
        .collect();
    // Health as the upstream registry holds it (probes and the data path alike). The last
    // error names internal addresses and backend replies: for the token holder only.
    let targets: Vec<Value> = ctx
        .upstream
        .targets()
        .iter()
        .map(|tg| {
            let smtp: Vec<Value> = tg
                .smtp
                .iter()
                .map(|s| {
                    let h = s.health.view();
                    let mut v = json!({ "server": s.addr, "up": h.up, "failures": h.failures });
                    if full {
                        v["last_error"] = json!(h.last_error);
                    }
                    v
                })
                .collect();
            json!({ "name": &*tg.name, "smtp": smtp })
        })
        .collect();
    json!({
        "version": t.version(),
        "loaded_at": unix(t.loaded_at()),
        "started_at": unix(ctx.started),
        "source": t.source(),
        "mailboxes": t.mailbox_count(),
        "domains": t.domains().collect::<Vec<_>>(),
        "sites": sites,
        "pinned": pinned,
        "pinned_total": progress.pinned_total,
        "traffic": { "window_minutes": crate::traffic::MINUTES, "targets": traffic },
        "targets": targets,
    })
}

fn history_json(ctx: &AdminCtx) -> Value {
    let active = ctx.control.router().snapshot().version().to_string();
    let in_memory: Vec<String> = ctx
        .control
        .router()
        .history()
        .iter()
        .map(|t| t.version().to_string())
        .collect();
    let entries: Vec<Value> = ctx
        .control
        .history(200)
        .into_iter()
        .map(|e| {
            let mut v = json!(e);
            v["active"] = json!(e.version == active);
            v["in_memory"] = json!(in_memory.contains(&e.version));
            v
        })
        .collect();
    json!({ "active": active, "versions": entries })
}

/// Seconds between the page's own reloads (a meta refresh: the page has no script).
const PAGE_REFRESH_SECS: u32 = 5;

/// One site's split between the targets as a cell: counts with shares, and a stacked bar.
fn split_cell(h: &mut String, kind: &str, parts: &[(&str, u64)]) {
    let total: u64 = parts.iter().map(|(_, n)| n).sum();
    h.push_str("<td>");
    for (i, (target, n)) in parts.iter().enumerate() {
        let pct = (n * 100).checked_div(total).unwrap_or(0);
        let _ = write!(
            h,
            "<span class=\"part\" data-{kind}=\"{t}\"><i style=\"background:{c}\"></i>{t} {n} ({pct}%)</span>",
            t = chart::esc(target),
            c = chart::color(i),
        );
    }
    h.push_str("<div class=\"bar\">");
    for (i, (target, n)) in parts.iter().enumerate() {
        if *n > 0 {
            let _ = write!(
                h,
                "<span title=\"{t}\" style=\"width:{w:.1}%;background:{c}\"></span>",
                t = chart::esc(target),
                w = *n as f64 * 100.0 / total as f64,
                c = chart::color(i),
            );
        }
    }
    h.push_str("</div></td>");
}

/// The human status page: rendered on the server, no script; it reloads itself every few
/// seconds so that an operator can leave it open during a cutover. Without `full` access
/// the pinned mailboxes are counted, not named, and the history (who changed what) is left
/// out.
fn status_page(ctx: &AdminCtx, full: bool) -> String {
    let t = ctx.control.router().snapshot();
    let progress = ctx.progress(&t);
    let (_, per_site) = ctx.traffic.snapshot(Protocol::Smtp);
    let targets: Vec<&str> = t.target_names().collect();
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{PAGE_REFRESH_SECS}\"><title>coexist {v}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left;vertical-align:top}}\
         .up{{color:#080}}.down{{color:#b00}}\
         .part{{margin-right:1em;white-space:nowrap}}\
         .part i{{display:inline-block;width:.8em;height:.8em;margin-right:.3em}}\
         .bar{{display:flex;width:16em;height:.6em;margin-top:4px;background:#eee}}\
         </style></head><body>\
         <h1>coexist</h1><p>Active routing table <b id=\"version\">{v}</b> — {n} mailboxes, from {src}. \
         This page reloads every {PAGE_REFRESH_SECS} s.</p>",
        v = t.version(),
        n = t.mailbox_count(),
        src = chart::esc(t.source()),
    );
    h.push_str(
        "<h2>Sites</h2><table id=\"sites\"><tr><th>site</th><th>owner</th><th>mailboxes</th>\
         <th>mailboxes per target</th><th>recipients per target (30 min)</th></tr>",
    );
    for s in t.sites() {
        let _ = write!(
            h,
            "<tr id=\"site-{id}\"><td>{id}</td><td>{}</td><td>{}</td>",
            chart::esc(s.owner),
            s.mailboxes,
            id = chart::esc(s.name),
        );
        let by = progress.sites.get(s.name);
        let mailboxes: Vec<(&str, u64)> = targets
            .iter()
            .map(|tg| (*tg, by.and_then(|b| b.get(*tg)).copied().unwrap_or(0)))
            .collect();
        split_cell(&mut h, "mailboxes", &mailboxes);
        let recipients = site_recipients(&per_site, targets.iter().copied(), s.name);
        split_cell(&mut h, "recipients", &recipients);
        h.push_str("</tr>");
    }
    let _ = write!(
        h,
        "</table><h2>Pinned mailboxes</h2><p>Mailboxes whose owner is not their site's \
         (pilot users, <code>coexist cutover --mailbox</code>): <b id=\"pinned-total\">{}</b>.</p>",
        progress.pinned_total
    );
    if full && !progress.pinned.is_empty() {
        h.push_str("<table id=\"pinned\"><tr><th>mailbox</th><th>site</th><th>site owner</th><th>owner</th></tr>");
        for (address, site, owner) in &progress.pinned {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                chart::esc(address),
                chart::esc(site),
                chart::esc(t.site_owner(site).unwrap_or("?")),
                chart::esc(owner)
            );
        }
        h.push_str("</table>");
        if progress.pinned_total > progress.pinned.len() {
            let _ = write!(
                h,
                "<p>… and {} more.</p>",
                progress.pinned_total - progress.pinned.len()
            );
        }
    }
    h.push_str(
        "<h2>Traffic</h2><p>Recipients accepted per minute, per target, last 30 minutes.</p>",
    );
    h.push_str(&chart::svg(
        ctx.traffic.snapshot(Protocol::Smtp).0,
        &targets,
    ));
    h.push_str("<table><tr><th>target</th><th>site</th><th>recipients (30 min)</th></tr>");
    for ((target, site), n) in &per_site {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{n}</td></tr>",
            chart::esc(target),
            chart::esc(site)
        );
    }
    h.push_str("</table><h2>Targets</h2><table><tr><th>target</th><th>SMTP server</th><th>health</th></tr>");
    for tg in ctx.upstream.targets() {
        for s in &tg.smtp {
            let (class, word) = if s.is_up() {
                ("up", "up")
            } else {
                ("down", "down")
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"{class}\">{word}</td></tr>",
                chart::esc(&tg.name),
                chart::esc(&s.addr)
            );
        }
    }
    if !full {
        h.push_str("</table><p>The history and the pinned mailboxes' addresses need the admin token.</p></body></html>\n");
        return h;
    }
    h.push_str("</table><h2>History</h2><table><tr><th>version</th><th>when (UTC)</th><th>by</th><th>what</th><th>moved</th></tr>");
    for e in ctx.control.history(20) {
        let when = crate::date::rfc5322_date(UNIX_EPOCH + Duration::from_secs(e.at));
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            chart::esc(&e.version),
            chart::esc(&when),
            chart::esc(&e.by),
            chart::esc(&e.what),
            e.moved
        );
    }
    h.push_str("</table><p>Changes go through <code>coexist cutover</code>, <code>coexist rollback</code> or the admin API.</p></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("alice%40example.com"), "alice@example.com");
        assert_eq!(percent_decode("EXAMPLE%5Cbob"), "EXAMPLE\\bob");
        assert_eq!(percent_decode("a+b%zz%4"), "a b%zz%4");
    }
}
