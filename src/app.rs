//! Wires config, routing table, backends and listeners into a running proxy, and owns
//! reload and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::admin::{self, AdminCtx};
use crate::config::{Config, ListenerMode};
use crate::control::{Control, ControlError};
use crate::net::listener::{self, ConnLimits, ListenOptions};
use crate::net::{shutdown, tls};
use crate::route::{Diagnostics, Router};
use crate::smtp::backend::{BackendSettings, Backends};
use crate::smtp::session::SessionCtx;
use crate::upstream::{Protocol, Registry, Thresholds, probe};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("routing table rejected:\n{0}")]
    Routes(Diagnostics),
    #[error(transparent)]
    Control(ControlError),
    #[error(transparent)]
    Spool(crate::smtp::spool::SpoolError),
    #[error("admin token file {path}: {source}")]
    Token {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A start-up task died (a panic): nothing serves.
    #[error("start-up failed: {0}")]
    Startup(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How long `serve` lets open sessions finish after SIGTERM (the systemd unit's
/// `TimeoutStopSec` must be longer).
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// HTTPS connections open at once: Outlook keeps several per user, and a whole office may
/// come from one NAT address, so there is no lower cap per client address.
pub const HTTPS_MAX_CONNECTIONS: u32 = 20_000;

/// How long the start waits for the first round of health probes.
pub const STARTUP_PROBE_WAIT: Duration = Duration::from_secs(3);

/// A proxy whose listeners are bound and serving.
pub struct Running {
    pub router: Arc<Router>,
    pub spool: Arc<crate::smtp::spool::Spool>,
    pub control: Arc<Control>,
    pub backends: Arc<Backends>,
    pub registry: Arc<Registry>,
    /// The SMTP listeners' addresses, in config order (port 0 resolved).
    pub smtp_addrs: Vec<(ListenerMode, SocketAddr)>,
    pub admin_addr: SocketAddr,
    /// The HTTPS listener's address, when `[https] listen` is set (port 0 resolved).
    pub https_addr: Option<SocketAddr>,
    limits: Arc<ConnLimits>,
    https_limits: Arc<ConnLimits>,
    shutdown: shutdown::Trigger,
}

/// Binds `addr` without listening yet, with the address actually bound (port 0 resolved).
/// A bound socket holds the port (so a busy one fails the start at once), while a client
/// that connects before the proxy can serve is refused, and fails over to another MX,
/// instead of waiting unanswered in the accept queue while the backends are probed.
fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpSocket, SocketAddr), AppError> {
    let err = |source| AppError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    // As std's TcpListener::bind: a restart need not wait for old connections' TIME_WAIT.
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    let local = socket.local_addr().map_err(err)?;
    Ok((socket, local))
}

/// Starts accepting on a socket [`bind`] bound.
fn listen(socket: tokio::net::TcpSocket, addr: SocketAddr) -> Result<TcpListener, AppError> {
    socket
        .listen(1024)
        .map_err(|source| AppError::Bind { addr, source })
}

impl Running {
    /// Binds every listener, loads the table and starts serving.
    pub async fn start(config: Config) -> Result<Running, AppError> {
        let token = match &config.admin.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|source| AppError::Token {
                        path: p.clone(),
                        source,
                    })?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        // The recorder must exist before the first metric is emitted.
        admin::prometheus();
        let smtp = &config.smtp;
        let mut settings = BackendSettings {
            hostname: smtp.hostname.clone(),
            idle_timeout: smtp.limits.backend_idle,
            ..BackendSettings::default()
        };
        if let Some(t) = smtp.limits.backend_timeout {
            settings.command_timeout = t;
            settings.data_timeout = t;
            settings.final_timeout = t;
        }
        let thresholds = Thresholds {
            fall: smtp.limits.health_fall,
            rise: smtp.limits.health_rise,
        };
        let registry = Arc::new(Registry::new(&config.targets, thresholds));
        let backends = Arc::new(Backends::new(
            &config.targets,
            settings,
            Arc::clone(&registry),
        )?);
        let tls = match &smtp.tls {
            Some(f) => Some(TlsAcceptor::from(tls::server_config(&f.cert, &f.key)?)),
            None => None,
        };
        // Every port first: a proxy that cannot listen must leave no trace (no state or
        // spool directory, no "start" in the history) and say so before anything else.
        let mut bound = Vec::new();
        for l in &smtp.listeners {
            bound.push(bind(l.listen)?);
        }
        let https_bound = match config.https.as_ref().and_then(|h| h.listen) {
            Some(addr) => Some(bind(addr)?),
            None => None,
        };
        let (admin_socket, admin_addr) = bind(config.admin.listen)?;
        let to_control = |e| match e {
            ControlError::Rejected(d) => AppError::Routes(d),
            other => AppError::Control(other),
        };
        // Seeding, compiling and fsyncing the first table are blocking work: off the
        // runtime's worker threads, like every later change.
        let routes = config.routes.clone();
        let known = config.known_targets();
        let control = tokio::task::spawn_blocking(move || {
            if let Some(seed) = &routes.seed {
                for f in crate::control::seed_routes(&routes.path, seed, &known)? {
                    tracing::info!(file = %f.display(), seed = %seed.display(), "routing table created from its seed");
                }
            }
            Control::start(&routes.path, known, routes.history, &routes.state_dir)
        })
        .await
        .map_err(|e| AppError::Startup(e.to_string()))?
        .map_err(to_control)?;
        let control = Arc::new(control);
        let router = Arc::clone(control.router());
        // Learn what every backend supports before the first EHLO is answered — from the
        // servers that answer within a few seconds: a black-holed one is judged when its
        // own probe times out, while the proxy already serves.
        let smtp_servers: Vec<_> = registry.servers(Protocol::Smtp).cloned().collect();
        let probe_timeout = backends.probe_timeout();
        // HTTPS backends exist, and are probed, when the HTTPS listener does.
        let https_backends = match config.https.as_ref().and_then(|h| h.listen) {
            Some(_) => Some(Arc::new(crate::https::forward::Backends::new(
                &config.targets,
                &registry,
            )?)),
            None => None,
        };
        let https_servers: Vec<_> = registry.servers(Protocol::Https).cloned().collect();
        let (smtp_done, https_done) = tokio::join!(
            probe::first_round(
                Arc::clone(&backends),
                smtp_servers,
                probe_timeout,
                STARTUP_PROBE_WAIT,
            ),
            async {
                match &https_backends {
                    Some(b) => {
                        probe::first_round(
                            Arc::clone(b),
                            https_servers.clone(),
                            probe_timeout,
                            STARTUP_PROBE_WAIT,
                        )
                        .await
                    }
                    None => true,
                }
            }
        );
        if !(smtp_done && https_done) {
            tracing::warn!(
                wait_secs = STARTUP_PROBE_WAIT.as_secs(),
                "some backend servers have not answered their first health probe; serving without waiting for them"
            );
        }
        let (shutdown, shutdown_rx) = shutdown::channel();
        let limits = ConnLimits::new(
            smtp.limits.max_connections,
            smtp.limits.max_connections_per_ip,
        );
        let traffic = Arc::new(crate::traffic::Traffic::default());
        // Every installed table, whoever installed it, registers its recipients' meters as
        // soon as it is published, so the hot path finds them without a lock (a recipient
        // that comes first adds its own meter, once).
        let mut installed = router.subscribe();
        traffic.register_table(Protocol::Smtp, &installed.borrow_and_update());
        let (meters, mut stop_meters) = (Arc::clone(&traffic), shutdown_rx.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = installed.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let table = Arc::clone(&installed.borrow_and_update());
                        meters.register_table(Protocol::Smtp, &table);
                    }
                    () = stop_meters.signalled() => return,
                }
            }
        });
        // Opened before the listeners: what a crash left acknowledged is delivered first.
        let spool =
            crate::smtp::spool::Spool::open(config.spool.clone()).map_err(AppError::Spool)?;
        tokio::spawn(Arc::clone(&spool).run(
            Arc::clone(&router),
            Arc::clone(&backends),
            shutdown_rx.clone(),
        ));
        let mut smtp_addrs = Vec::new();
        for (l, (socket, addr)) in smtp.listeners.iter().zip(bound) {
            let tcp = listen(socket, addr)?;
            let ctx = Arc::new(SessionCtx {
                hostname: smtp.hostname.clone(),
                mode: l.mode,
                mixed: smtp.mixed_recipients,
                add_received: smtp.add_received,
                limits: smtp.limits.clone(),
                router: Arc::clone(&router),
                backends: Arc::clone(&backends),
                tls: tls.clone(),
                traffic: Arc::clone(&traffic),
                spool: Some(Arc::clone(&spool)),
            });
            let options = ListenOptions {
                implicit_tls: tls.clone().filter(|_| l.mode == ListenerMode::Submissions),
                refusal: crate::smtp::reply::TOO_MANY_CONNECTIONS,
            };
            tokio::spawn(listener::serve(
                tcp,
                ctx,
                options,
                Arc::clone(&limits),
                shutdown_rx.clone(),
            ));
            smtp_addrs.push((l.mode, addr));
        }
        let https_limits = ConnLimits::new(HTTPS_MAX_CONNECTIONS, HTTPS_MAX_CONNECTIONS);
        let mut https_addr = None;
        if let (Some(h), Some((socket, addr)), Some(backends)) =
            (&config.https, https_bound, https_backends.clone())
        {
            let certs: Vec<_> = h
                .certs
                .iter()
                .map(|c| (c.cert.as_path(), c.key.as_path()))
                .collect();
            let acceptor = TlsAcceptor::from(tls::https_server_config(&certs)?);
            let default_target = h
                .default_target
                .as_deref()
                .and_then(|name| registry.targets().iter().position(|t| &*t.name == name));
            let ctx = Arc::new(crate::https::server::HttpsCtx {
                router: Arc::clone(&router),
                backends,
                default_target,
                limits: crate::https::server::Limits::default(),
                rules: crate::https::harden::Rules::default(),
                learned: std::sync::Mutex::default(),
            });
            let options = ListenOptions {
                implicit_tls: Some(acceptor),
                // Over the cap a TLS client can read no plaintext answer: closed at once.
                refusal: b"",
            };
            tokio::spawn(listener::serve(
                listen(socket, addr)?,
                ctx,
                options,
                Arc::clone(&https_limits),
                shutdown_rx.clone(),
            ));
            https_addr = Some(addr);
        }
        // Histogram samples pile up in the recorder until they are folded into their
        // bucket counts: without this, memory grows with every message between scrapes
        // (the 30-minute soak showed it).
        let mut stop_upkeep = shutdown_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => admin::prometheus().run_upkeep(),
                    () = stop_upkeep.signalled() => return,
                }
            }
        });
        // Health probes: up/down and capabilities, off the data path.
        let probe = Arc::clone(&backends);
        let interval = smtp.limits.health_interval;
        let mut stop = shutdown_rx.clone();
        let probe_https = https_backends.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(interval) => {
                        let https = async {
                            if let Some(b) = &probe_https {
                                probe::probe_all(&**b, &https_servers, probe_timeout).await;
                            }
                        };
                        tokio::join!(probe.probe_all(), https);
                    }
                    () = stop.signalled() => return,
                }
            }
        });
        let admin_ctx = Arc::new(AdminCtx {
            control: Arc::clone(&control),
            spool: Arc::clone(&spool),
            traffic,
            upstream: Arc::clone(&registry),
            token,
            public_status: config.admin.public_status,
            ready: std::sync::atomic::AtomicBool::new(false),
            started: std::time::SystemTime::now(),
            progress: std::sync::Mutex::default(),
        });
        tokio::spawn(admin::serve(
            listen(admin_socket, admin_addr)?,
            Arc::clone(&admin_ctx),
            shutdown_rx.clone(),
        ));
        // Every listener is bound and the table is loaded: ready.
        admin_ctx
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(Running {
            router,
            spool,
            control,
            backends,
            registry,
            smtp_addrs,
            admin_addr,
            https_addr,
            limits,
            https_limits,
            shutdown,
        })
    }

    /// Re-reads the routing table source; a rejected table leaves the active one serving.
    pub fn reload(&self) -> Result<crate::control::ChangeReport, ControlError> {
        self.control.reload(false, "SIGHUP")
    }

    /// Stops accepting, tells idle sessions to close, and waits for the others up to
    /// `deadline`. Returns how many connections were still open.
    pub async fn shutdown(self, deadline: Duration) -> usize {
        self.shutdown.signal();
        let (smtp, https) = tokio::join!(
            self.limits.drain(deadline),
            self.https_limits.drain(deadline)
        );
        smtp + https
    }
}
