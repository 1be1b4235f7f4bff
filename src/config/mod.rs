//! `coexist.toml`: raw serde structs (unknown fields are errors) → a validated [`Config`].
//!
//! Every problem is reported as `file:line: message`, all at once, like the routing table.
//! Relative paths are resolved against the directory of the config file, so the proxy can
//! be started from anywhere.

use indexmap::IndexMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::diagnostics::{Diagnostics, LineIndex, one_line};
use crate::route::{DEFAULT_HISTORY, KnownTargets};

/// Where the config lives when `-c` is not given.
pub const DEFAULT_CONFIG: &str = "config/coexist.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    routes: RawRoutes,
    #[serde(default)]
    admin: Option<RawAdmin>,
    #[serde(default)]
    smtp: Option<Spanned<RawSmtp>>,
    #[serde(default)]
    https: Option<toml::Value>,
    #[serde(default)]
    spool: RawSpool,
    #[serde(default)]
    targets: IndexMap<String, Spanned<RawTarget>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    #[serde(default)]
    dir: Option<String>,
    #[serde(default)]
    max_age_hours: Option<u64>,
    #[serde(default)]
    retry_initial_secs: Option<u64>,
    #[serde(default)]
    retry_max_secs: Option<u64>,
    #[serde(default)]
    dsn_target: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoutes {
    #[serde(default)]
    source: Option<Spanned<String>>,
    #[serde(default)]
    path: Option<Spanned<String>>,
    #[serde(default)]
    seed: Option<Spanned<String>>,
    #[serde(default)]
    history: Option<Spanned<i64>>,
    #[serde(default)]
    state_dir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
    #[serde(default)]
    token_file: Option<Spanned<String>>,
    #[serde(default)]
    public_status: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    mixed_recipients: Option<Spanned<String>>,
    #[serde(default)]
    add_received: Option<bool>,
    #[serde(default)]
    greeting_delay_ms: Option<u64>,
    #[serde(default)]
    max_message_size: Option<Spanned<u64>>,
    #[serde(default)]
    max_recipients: Option<Spanned<u32>>,
    #[serde(default)]
    max_line_length: Option<Spanned<u32>>,
    #[serde(default)]
    max_connections: Option<Spanned<u32>>,
    #[serde(default)]
    max_connections_per_ip: Option<Spanned<u32>>,
    #[serde(default)]
    command_timeout_secs: Option<Spanned<u64>>,
    #[serde(default)]
    data_timeout_secs: Option<Spanned<u64>>,
    #[serde(default)]
    health_interval_secs: Option<Spanned<u64>>,
    #[serde(default)]
    backend_idle_secs: Option<u64>,
    #[serde(default)]
    backend_timeout_secs: Option<u64>,
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    listen: Spanned<String>,
    mode: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    /// Spanned as a whole: an empty list is reported at its own line.
    #[serde(default)]
    smtp: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    https: Vec<Spanned<String>>,
    #[serde(default)]
    smtp_tls: Option<Spanned<String>>,
    #[serde(default)]
    xclient: Option<bool>,
    #[serde(default)]
    proxy_protocol: Option<Spanned<bool>>,
    #[serde(default)]
    tls_verify: Option<bool>,
    #[serde(default)]
    tls_ca: Option<Spanned<String>>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub routes: RoutesConfig,
    pub admin: AdminConfig,
    pub smtp: SmtpConfig,
    pub spool: SpoolSettings,
    pub targets: Vec<TargetConfig>,
}

#[derive(Debug, Clone)]
pub struct RoutesConfig {
    /// The routes file, resolved against the config file's directory.
    pub path: PathBuf,
    /// A routes file (with the CSV files it imports) copied to `path` when `path` does not
    /// exist yet: a read-only config directory ships the first table, and cutover and
    /// rollback write the copy in a writable one.
    pub seed: Option<PathBuf>,
    pub history: usize,
    /// Where applied versions' source files are kept (default `state/` beside the config).
    pub state_dir: PathBuf,
}

/// Where a client on this host reaches a listener bound to `addr`: a wildcard address
/// (`0.0.0.0`, `::`) is reached on loopback.
pub fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

impl RoutesConfig {
    /// The file a read-only command (`check`, `lookup`) reads: the routes file, or its seed
    /// while the routes file has not been created from it yet.
    pub fn source_path(&self) -> &Path {
        // Only a file that is certainly absent means "not seeded yet": one that cannot be
        // looked at (permissions) is read, and its error reported, as it is.
        match &self.seed {
            Some(seed) if matches!(self.path.try_exists(), Ok(false)) => seed,
            _ => &self.path,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    /// The status page, `/status` and `/metrics` answer without the token (changes,
    /// lookups, history and the queue still need it).
    pub public_status: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixedRecipients {
    Fanout,
    Defer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerMode {
    /// Port 25: mail from the internet for routed domains only.
    Relay,
    /// Port 587: STARTTLS, then AUTH.
    Submission,
    /// Port 465: implicit TLS, then AUTH.
    Submissions,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    pub mode: ListenerMode,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    pub hostname: String,
    pub mixed_recipients: MixedRecipients,
    pub listeners: Vec<ListenerConfig>,
    pub tls: Option<TlsFiles>,
    /// Prepend a `Received:` header of our own to every message.
    pub add_received: bool,
    pub limits: SmtpLimits,
}

/// Limits that hold on every SMTP listener (SPEC §4).
#[derive(Debug, Clone)]
pub struct SmtpLimits {
    pub greeting_delay: Duration,
    pub max_message_size: u64,
    pub max_recipients: u32,
    /// Longest text line in DATA/BDAT content, CRLF excluded.
    pub max_line_length: u32,
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    /// Waiting for the next command (RFC 5321 §4.5.3.2.7: at least 5 minutes).
    pub command_timeout: Duration,
    /// Waiting for the next DATA block from the client (§4.5.3.2.5: 3 minutes).
    pub data_timeout: Duration,
    pub health_interval: Duration,
    pub backend_idle: Duration,
    /// Waiting on a backend: each reply, each write, and the final reply after DATA
    /// (default: RFC 5321 §4.5.3.2's 5 minutes, 3 minutes per data block, 10 minutes).
    pub backend_timeout: Option<Duration>,
}

impl Default for SmtpLimits {
    fn default() -> Self {
        Self {
            greeting_delay: Duration::ZERO,
            max_message_size: 50 * 1024 * 1024,
            max_recipients: 1000,
            max_line_length: 2048,
            max_connections: 1000,
            max_connections_per_ip: 50,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            health_interval: Duration::from_secs(30),
            backend_idle: Duration::from_secs(30),
            backend_timeout: None,
        }
    }
}

/// How coexist talks TLS to a target's SMTP servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTlsMode {
    /// STARTTLS when the server offers it (the default).
    Opportunistic,
    /// STARTTLS or fail: needed for AUTH replay on submission.
    Required,
    /// TLS from the first byte (port 465).
    Implicit,
    /// Plaintext (labs, or a backend on the same host).
    None,
}

#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub name: String,
    pub smtp_tls: SmtpTlsMode,
    /// Tell servers that trust us who the real client is (Postfix XCLIENT), when they
    /// offer it.
    pub xclient: bool,
    /// Open each backend connection with a PROXY protocol v2 header naming the client
    /// (HAProxy's format; Postfix `smtpd_upstream_proxy_protocol = haproxy`).
    pub proxy_protocol: bool,
    /// `host:port` of each SMTP server, in order of preference.
    pub smtp: Vec<String>,
    /// `host:port` (HTTPS) or `http://host:port` (plain-HTTP lab backend).
    pub https: Vec<String>,
    pub tls_verify: bool,
    pub tls_ca: Option<PathBuf>,
}

/// How the spool retries.
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    /// Names us in DSNs (`Reporting-MTA`, `MAILER-DAEMON@`).
    pub hostname: String,
    /// Where DSNs for senders outside every routed domain go (a target whose servers relay
    /// to the internet); without it such DSNs are logged and dropped.
    pub dsn_target: Option<String>,
    pub max_age: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Config {
    /// Target names in config order, for validating the routing table.
    pub fn known_targets(&self) -> KnownTargets {
        KnownTargets::Exactly(self.targets.iter().map(|t| t.name.clone()).collect())
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Diagnostics> {
        let file: Arc<Path> = Arc::from(path);
        let mut d = Diagnostics::default();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                d.push(&file, 0, format!("cannot read: {e}"));
                return Err(d);
            }
        };
        let lines = LineIndex::new(&text);
        let raw: RawConfig = match toml::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                let line = e.span().map_or(0, |s| lines.line(s.start));
                d.push(&file, line, one_line(e.message()));
                return Err(d);
            }
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &str| base.join(p);
        let mut err = |line: u32, msg: String| d.push(&file, line, msg);
        let line_of = |start: usize| lines.line(start);

        // [routes]
        if let Some(src) = &raw.routes.source
            && src.get_ref() != "file"
        {
            err(
                line_of(src.span().start),
                format!(
                    "routes.source {:?} is not supported (supported: \"file\")",
                    src.get_ref()
                ),
            );
        }
        let routes_path = raw
            .routes
            .path
            .as_ref()
            .map_or_else(|| rel("routes.toml"), |p| rel(p.get_ref()));
        let history = match &raw.routes.history {
            None => DEFAULT_HISTORY,
            Some(h) => {
                if *h.get_ref() < 1 || *h.get_ref() > 10_000 {
                    err(
                        line_of(h.span().start),
                        "routes.history must be between 1 and 10000".into(),
                    );
                }
                usize::try_from(*h.get_ref()).unwrap_or(1)
            }
        };

        // [admin]
        let admin = match &raw.admin {
            None => AdminConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 8025)),
                token_file: None,
                public_status: false,
            },
            Some(a) => {
                let listen = parse_socket(&a.listen, &mut err, &line_of);
                let token_file = a.token_file.as_ref().map(|t| rel(t.get_ref()));
                if !listen.ip().is_loopback() && token_file.is_none() {
                    err(
                        line_of(a.listen.span().start),
                        "admin.listen is not a loopback address: admin.token_file is required"
                            .into(),
                    );
                }
                AdminConfig {
                    listen,
                    token_file,
                    public_status: a.public_status,
                }
            }
        };

        // [targets]
        let mut targets = Vec::new();
        if raw.targets.is_empty() {
            err(
                0,
                "no [targets.NAME] table: name at least the old and new sides".into(),
            );
        }
        for (name, t) in &raw.targets {
            let line = line_of(t.span().start);
            if name == "reject"
                || name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                err(
                    line,
                    format!(
                        "invalid target name {name:?} (letters, digits, - _ .; not \"reject\")"
                    ),
                );
            }
            let t = t.get_ref();
            let smtp = t.smtp.as_ref().map_or(&[][..], |s| s.get_ref().as_slice());
            if let Some(list) = &t.smtp
                && list.get_ref().is_empty()
            {
                // Every recipient it owns would get 451 for as long as it serves.
                err(
                    line_of(list.span().start),
                    format!("targets.{name}.smtp is empty: name at least one host:port"),
                );
            }
            for s in smtp {
                if let Err(m) = check_server(s.get_ref(), false) {
                    err(line_of(s.span().start), format!("targets.{name}.smtp: {m}"));
                }
            }
            for s in &t.https {
                if let Err(m) = check_server(s.get_ref(), true) {
                    err(
                        line_of(s.span().start),
                        format!("targets.{name}.https: {m}"),
                    );
                }
            }
            if t.smtp.is_none() && t.https.is_empty() {
                err(
                    line,
                    format!("target {name:?} has no smtp or https servers"),
                );
            }
            let smtp_tls = match t
                .smtp_tls
                .as_ref()
                .map(|m| (m.get_ref().as_str(), m.span()))
            {
                None | Some(("opportunistic", _)) => SmtpTlsMode::Opportunistic,
                Some(("required", _)) => SmtpTlsMode::Required,
                Some(("implicit", _)) => SmtpTlsMode::Implicit,
                Some(("none", _)) => SmtpTlsMode::None,
                Some((other, span)) => {
                    err(
                        line_of(span.start),
                        format!(
                            "targets.{name}.smtp_tls {other:?}: expected \"opportunistic\", \"required\", \"implicit\" or \"none\""
                        ),
                    );
                    SmtpTlsMode::Opportunistic
                }
            };
            let proxy_protocol = t.proxy_protocol.as_ref().is_some_and(|p| *p.get_ref());
            if proxy_protocol && t.xclient == Some(true) {
                let span = t.proxy_protocol.as_ref().map_or(0..0, Spanned::span);
                err(
                    line_of(span.start),
                    format!(
                        "targets.{name}: xclient and proxy_protocol both tell the server who the client is; choose one"
                    ),
                );
            }
            targets.push(TargetConfig {
                name: name.clone(),
                smtp_tls,
                xclient: t.xclient.unwrap_or(false),
                proxy_protocol,
                smtp: smtp.iter().map(|s| s.get_ref().clone()).collect(),
                https: t.https.iter().map(|s| s.get_ref().clone()).collect(),
                tls_verify: t.tls_verify.unwrap_or(true),
                tls_ca: t.tls_ca.as_ref().map(|c| rel(c.get_ref())),
            });
        }

        // [smtp]
        let smtp = match &raw.smtp {
            None => {
                err(
                    0,
                    "no [[smtp.listener]] table: the proxy would listen on nothing".into(),
                );
                SmtpConfig {
                    hostname: "localhost".into(),
                    mixed_recipients: MixedRecipients::Fanout,
                    listeners: Vec::new(),
                    tls: None,
                    add_received: true,
                    limits: SmtpLimits::default(),
                }
            }
            Some(s) => {
                if s.get_ref().listener.is_empty() {
                    err(
                        line_of(s.span().start),
                        "[smtp] has no [[smtp.listener]]: the proxy would listen on nothing".into(),
                    );
                }
                let s = s.get_ref();
                let mixed = match s
                    .mixed_recipients
                    .as_ref()
                    .map(|m| (m.get_ref().as_str(), m.span()))
                {
                    None | Some(("fanout", _)) => MixedRecipients::Fanout,
                    Some(("defer", _)) => MixedRecipients::Defer,
                    Some((other, span)) => {
                        err(
                            line_of(span.start),
                            format!(
                                "smtp.mixed_recipients {other:?}: expected \"fanout\" or \"defer\""
                            ),
                        );
                        MixedRecipients::Fanout
                    }
                };
                let tls = s.tls.as_ref().map(|t| TlsFiles {
                    cert: rel(t.cert.get_ref()),
                    key: rel(t.key.get_ref()),
                });
                let mut listeners = Vec::new();
                for l in &s.listener {
                    let line = line_of(l.span().start);
                    let l = l.get_ref();
                    let listen = parse_socket(&l.listen, &mut err, &line_of);
                    let mode = match l.mode.get_ref().as_str() {
                        "relay" => ListenerMode::Relay,
                        "submission" => ListenerMode::Submission,
                        "submissions" => ListenerMode::Submissions,
                        other => {
                            err(
                                line_of(l.mode.span().start),
                                format!(
                                    "listener mode {other:?}: expected \"relay\", \"submission\" or \"submissions\""
                                ),
                            );
                            ListenerMode::Relay
                        }
                    };
                    if mode != ListenerMode::Relay && tls.is_none() {
                        err(
                            line,
                            format!(
                                "a {} listener needs [smtp.tls] (no AUTH before TLS)",
                                l.mode.get_ref()
                            ),
                        );
                    }
                    listeners.push(ListenerConfig { listen, mode });
                }
                let mut limits = SmtpLimits::default();
                let mut positive = |v: &Option<Spanned<u64>>, name: &str, dst: &mut u64| {
                    if let Some(v) = v {
                        if *v.get_ref() == 0 {
                            err(line_of(v.span().start), format!("smtp.{name} must be > 0"));
                        }
                        *dst = *v.get_ref();
                    }
                };
                positive(
                    &s.max_message_size,
                    "max_message_size",
                    &mut limits.max_message_size,
                );
                let mut secs = |v: &Option<Spanned<u64>>, name: &str, dst: &mut Duration| {
                    let mut n = dst.as_secs();
                    positive(v, name, &mut n);
                    *dst = Duration::from_secs(n);
                };
                secs(
                    &s.command_timeout_secs,
                    "command_timeout_secs",
                    &mut limits.command_timeout,
                );
                secs(
                    &s.data_timeout_secs,
                    "data_timeout_secs",
                    &mut limits.data_timeout,
                );
                secs(
                    &s.health_interval_secs,
                    "health_interval_secs",
                    &mut limits.health_interval,
                );
                let small = |v: &Option<Spanned<u32>>, dst: &mut u32| {
                    if let Some(v) = v {
                        *dst = (*v.get_ref()).max(1);
                    }
                };
                small(&s.max_recipients, &mut limits.max_recipients);
                small(&s.max_line_length, &mut limits.max_line_length);
                small(&s.max_connections, &mut limits.max_connections);
                small(
                    &s.max_connections_per_ip,
                    &mut limits.max_connections_per_ip,
                );
                if let Some(ms) = s.greeting_delay_ms {
                    limits.greeting_delay = Duration::from_millis(ms.min(60_000));
                }
                if let Some(secs) = s.backend_timeout_secs {
                    limits.backend_timeout = Some(Duration::from_secs(secs.max(1)));
                }
                if let Some(secs) = s.backend_idle_secs {
                    limits.backend_idle = Duration::from_secs(secs);
                }
                SmtpConfig {
                    hostname: s.hostname.clone().unwrap_or_else(|| "localhost".into()),
                    mixed_recipients: mixed,
                    listeners,
                    tls,
                    add_received: s.add_received.unwrap_or(true),
                    limits,
                }
            }
        };
        if let Some(h) = &raw.https
            && let Some(dt) = h.get("default_target").and_then(toml::Value::as_str)
            && !raw.targets.contains_key(dt)
        {
            err(
                0,
                format!("https.default_target {dt:?} is not a configured target"),
            );
        }

        if let Some(t) = &raw.spool.dsn_target
            && !raw.targets.contains_key(t)
        {
            d.push(
                &file,
                0,
                format!("spool.dsn_target {t:?} is not a configured target"),
            );
        }
        if !d.is_empty() {
            return Err(d);
        }
        let spool_hostname = smtp.hostname.clone();
        Ok(Config {
            path: path.to_path_buf(),
            routes: RoutesConfig {
                path: routes_path,
                seed: raw.routes.seed.as_ref().map(|s| rel(s.get_ref())),
                history,
                state_dir: rel(raw.routes.state_dir.as_deref().unwrap_or("state")),
            },
            admin,
            smtp,
            spool: SpoolSettings {
                dir: rel(raw.spool.dir.as_deref().unwrap_or("spool")),
                hostname: spool_hostname,
                dsn_target: raw.spool.dsn_target.clone(),
                max_age: Duration::from_secs(raw.spool.max_age_hours.unwrap_or(120).max(1) * 3600),
                retry_initial: Duration::from_secs(
                    raw.spool.retry_initial_secs.unwrap_or(60).max(1),
                ),
                retry_max: Duration::from_secs(raw.spool.retry_max_secs.unwrap_or(3600).max(1)),
            },
            targets,
        })
    }
}

fn parse_socket(
    s: &Spanned<String>,
    err: &mut impl FnMut(u32, String),
    line_of: &impl Fn(usize) -> u32,
) -> SocketAddr {
    s.get_ref().parse().unwrap_or_else(|e| {
        err(
            line_of(s.span().start),
            format!("{:?} is not an IP:port address: {e}", s.get_ref()),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// Checks a backend server: `host:port`, `[v6]:port`, or `http://host:port` for HTTPS lab
/// backends.
fn check_server(s: &str, http: bool) -> Result<(), String> {
    let rest = if http {
        s.strip_prefix("http://").unwrap_or(s)
    } else {
        s
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("{s:?}: expected host:port"));
    };
    if host.is_empty() || host.contains('/') || host.chars().any(char::is_whitespace) {
        return Err(format!("{s:?}: bad host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{s:?}: bad port {port:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_strings() {
        assert!(check_server("exch.corp:25", false).is_ok());
        assert!(check_server("[::1]:25", false).is_ok());
        assert!(check_server("http://127.0.0.1:8080", true).is_ok());
        assert!(check_server("exch.corp", false).is_err());
        assert!(check_server("exch.corp:0", false).is_err());
        assert!(check_server("exch.corp:x", false).is_err());
    }
}
