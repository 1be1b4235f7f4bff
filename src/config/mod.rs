//! `coexist.toml`: raw serde structs (unknown fields are errors) → a validated [`Config`].
//!
//! One file per section, each with its raw layer (serde, `deny_unknown_fields`, `Spanned`
//! for line numbers) apart from the validation that turns it into typed values:
//! `routes.rs`, `admin.rs`, `targets.rs`, `smtp.rs`, `https.rs`, `spool.rs`. This file reads
//! and parses the file, hands each section its raw part and collects the problems.
//!
//! Every problem is reported as `file:line: message`, all at once, like the routing table.
//! Relative paths are resolved against the directory of the config file, so the proxy can
//! be started from anywhere.

mod admin;
mod https;
mod routes;
mod smtp;
mod spool;
mod targets;

use indexmap::IndexMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::diagnostics::{Diagnostics, LineIndex, one_line};
use crate::route::KnownTargets;

pub use admin::AdminConfig;
pub use https::HttpsConfig;
pub use routes::{RouteSource, RoutesConfig};
pub use smtp::{ListenerConfig, ListenerMode, MixedRecipients, SmtpConfig, SmtpLimits};
pub use spool::SpoolSettings;
pub use targets::{SmtpTlsMode, TargetConfig};

/// Where the config lives when `-c` is not given.
pub const DEFAULT_CONFIG: &str = "config/coexist.toml";

/// The whole file as serde sees it. The field order is the order toml's "unknown field"
/// message lists the sections in.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    routes: routes::RawRoutes,
    #[serde(default)]
    admin: Option<admin::RawAdmin>,
    #[serde(default)]
    smtp: Option<Spanned<smtp::RawSmtp>>,
    #[serde(default)]
    https: Option<https::RawHttps>,
    #[serde(default)]
    spool: spool::RawSpool,
    #[serde(default)]
    targets: IndexMap<String, Spanned<targets::RawTarget>>,
}

/// A certificate and its key, as `[smtp.tls]` and each `[[https.cert]]` name them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub routes: RoutesConfig,
    pub admin: AdminConfig,
    pub smtp: SmtpConfig,
    /// `[https]`, checked but not served yet: no HTTPS listener is built from it.
    pub https: Option<HttpsConfig>,
    pub spool: SpoolSettings,
    pub targets: Vec<TargetConfig>,
}

/// A certificate chain and its private key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What every section needs while it validates: where its problems go, which line a value
/// came from, and the directory relative paths start from.
struct Checker {
    file: Arc<Path>,
    lines: LineIndex,
    base: PathBuf,
    diags: Diagnostics,
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

impl Config {
    /// Target names in config order, for validating the routing table.
    pub fn known_targets(&self) -> KnownTargets {
        KnownTargets::Exactly(self.targets.iter().map(|t| t.name.clone()).collect())
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Diagnostics> {
        let file: Arc<Path> = Arc::from(path);
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                let mut d = Diagnostics::default();
                d.push(&file, 0, format!("cannot read: {e}"));
                return Err(d);
            }
        };
        let mut c = Checker {
            file,
            lines: LineIndex::new(&text),
            base: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            diags: Diagnostics::default(),
        };
        // A file serde cannot read into the raw structs (bad syntax, an unknown key, a
        // wrong type) stops here with that one problem: there is nothing to validate yet.
        let raw: RawConfig = match toml::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                let line = e.span().map_or(0, |s| c.lines.line(s.start));
                c.err(line, one_line(e.message()));
                return Err(c.diags);
            }
        };

        // Sections in this order, so problems are listed as they always were (the config's
        // problems are not sorted by line).
        let routes = routes::validate(&raw.routes, &mut c);
        let admin = admin::validate(raw.admin.as_ref(), &mut c);
        let targets = targets::validate(&raw.targets, &mut c);
        let smtp = smtp::validate(raw.smtp.as_ref(), &mut c);
        let https = raw
            .https
            .as_ref()
            .map(|h| https::validate(h, &targets, &mut c));
        let spool = spool::validate(&raw.spool, &smtp.hostname, &targets, &mut c);

        if !c.diags.is_empty() {
            return Err(c.diags);
        }
        Ok(Config {
            path: path.to_path_buf(),
            routes,
            admin,
            smtp,
            https,
            spool,
            targets,
        })
    }
}

impl Checker {
    fn err(&mut self, line: u32, message: impl Into<String>) {
        self.diags.push(&self.file, line, message);
    }

    /// A problem with a value, reported at the line the value is on.
    fn err_at<T>(&mut self, value: &Spanned<T>, message: impl Into<String>) {
        let line = self.line(value);
        self.err(line, message);
    }

    fn line<T>(&self, value: &Spanned<T>) -> u32 {
        self.lines.line(value.span().start)
    }

    /// A path from the config, relative to the config file's directory.
    fn path(&self, p: &str) -> PathBuf {
        self.base.join(p)
    }

    /// An `IP:port` to listen on; a bad one is reported and stands in as `127.0.0.1:0`.
    fn socket(&mut self, s: &Spanned<String>) -> SocketAddr {
        s.get_ref().parse().unwrap_or_else(|e| {
            self.err_at(
                s,
                format!("{:?} is not an IP:port address: {e}", s.get_ref()),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }
}

impl RawTls {
    fn resolve(&self, c: &Checker) -> TlsFiles {
        TlsFiles {
            cert: c.path(self.cert.get_ref()),
            key: c.path(self.key.get_ref()),
        }
    }
}

/// Whether `name` is one of the configured targets.
fn is_target(targets: &[TargetConfig], name: &str) -> bool {
    targets.iter().any(|t| t.name == name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    /// Writes `text` as `coexist.toml` in a fresh directory and loads it.
    pub(crate) fn load(text: &str) -> (tempfile::TempDir, Result<Config, Diagnostics>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("coexist.toml");
        std::fs::write(&path, text).expect("write config");
        let loaded = Config::load(&path);
        (dir, loaded)
    }

    /// The problems of a config that must be rejected, as `(line, message)`.
    pub(crate) fn errors(text: &str) -> Vec<(u32, String)> {
        match load(text).1 {
            Ok(c) => panic!("expected errors, got {c:#?}"),
            Err(d) => d.errors.into_iter().map(|e| (e.line, e.message)).collect(),
        }
    }

    /// The smallest config that loads: one listener, two targets.
    pub(crate) const MINIMAL: &str = "[smtp]\n[[smtp.listener]]\nlisten = \"127.0.0.1:2525\"\n\
         mode = \"relay\"\n[targets.old]\nsmtp = [\"127.0.0.1:9\"]\n\
         [targets.new]\nsmtp = [\"127.0.0.1:9\"]\n";

    const FULL: &str = r#"[routes]
source = "file"
path = "tables/routes.toml"
seed = "seed/routes.toml"
history = 7
state_dir = "/var/lib/coexist/state"

[admin]
listen = "0.0.0.0:8025"
token_file = "admin.token"
public_status = true

[smtp]
hostname = "mx.example.com"
mixed_recipients = "defer"
add_received = false
greeting_delay_ms = 250
max_message_size = 1000
max_recipients = 10
max_line_length = 998
max_connections = 20
max_connections_per_ip = 2
command_timeout_secs = 301
data_timeout_secs = 181
health_interval_secs = 31
backend_idle_secs = 5
backend_timeout_secs = 60
[[smtp.listener]]
listen = "0.0.0.0:25"
mode = "relay"
[[smtp.listener]]
listen = "[::]:465"
mode = "submissions"
[smtp.tls]
cert = "certs/mx.pem"
key = "/etc/keys/mx.key"

[https]
listen = "0.0.0.0:443"
default_target = "old"
[[https.cert]]
cert = "certs/mail.pem"
key = "certs/mail.key"
[[https.cert]]
cert = "/etc/certs/autodiscover.pem"
key = "/etc/certs/autodiscover.key"

[spool]
dir = "queue"
max_age_hours = 48
retry_initial_secs = 30
retry_max_secs = 600
dsn_target = "new"

[targets.old]
smtp = ["exch2013-a.corp:25", "exch2013-b.corp:25"]
https = ["exch2013-a.corp:443"]
tls_ca = "certs/corp-ca.pem"
smtp_tls = "required"
xclient = true

[targets.new]
smtp = ["exch2019.corp:25"]
https = ["http://exch2019.corp:8080"]
tls_verify = false
smtp_tls = "implicit"
proxy_protocol = true
"#;

    #[test]
    fn a_full_config_reads_back_every_value() {
        let (dir, loaded) = load(FULL);
        let c = loaded.unwrap_or_else(|d| panic!("{d}"));
        let at = |p: &str| dir.path().join(p);
        assert_eq!(c.path, at("coexist.toml"));

        assert_eq!(c.routes.source, RouteSource::File);
        assert_eq!(c.routes.path, at("tables/routes.toml"));
        assert_eq!(c.routes.seed, Some(at("seed/routes.toml")));
        assert_eq!(c.routes.history, 7);
        assert_eq!(c.routes.state_dir, PathBuf::from("/var/lib/coexist/state"));

        assert_eq!(c.admin.listen, "0.0.0.0:8025".parse().unwrap());
        assert_eq!(c.admin.token_file, Some(at("admin.token")));
        assert!(c.admin.public_status);

        let s = &c.smtp;
        assert_eq!(s.hostname, "mx.example.com");
        assert_eq!(s.mixed_recipients, MixedRecipients::Defer);
        assert!(!s.add_received);
        let modes: Vec<_> = s.listeners.iter().map(|l| (l.listen, l.mode)).collect();
        assert_eq!(
            modes,
            [
                ("0.0.0.0:25".parse().unwrap(), ListenerMode::Relay),
                ("[::]:465".parse().unwrap(), ListenerMode::Submissions),
            ]
        );
        assert_eq!(
            s.tls,
            Some(TlsFiles {
                cert: at("certs/mx.pem"),
                key: PathBuf::from("/etc/keys/mx.key"),
            })
        );
        let l = &s.limits;
        assert_eq!(l.greeting_delay, Duration::from_millis(250));
        assert_eq!(l.max_message_size, 1000);
        assert_eq!(l.max_recipients, 10);
        assert_eq!(l.max_line_length, 998);
        assert_eq!(l.max_connections, 20);
        assert_eq!(l.max_connections_per_ip, 2);
        assert_eq!(l.command_timeout, Duration::from_secs(301));
        assert_eq!(l.data_timeout, Duration::from_secs(181));
        assert_eq!(l.health_interval, Duration::from_secs(31));
        assert_eq!(l.backend_idle, Duration::from_secs(5));
        assert_eq!(l.backend_timeout, Some(Duration::from_secs(60)));

        assert_eq!(
            c.https,
            Some(HttpsConfig {
                listen: Some("0.0.0.0:443".parse().unwrap()),
                default_target: Some("old".into()),
                certs: vec![
                    TlsFiles {
                        cert: at("certs/mail.pem"),
                        key: at("certs/mail.key"),
                    },
                    TlsFiles {
                        cert: PathBuf::from("/etc/certs/autodiscover.pem"),
                        key: PathBuf::from("/etc/certs/autodiscover.key"),
                    },
                ],
            })
        );

        assert_eq!(c.spool.dir, at("queue"));
        assert_eq!(c.spool.hostname, "mx.example.com");
        assert_eq!(c.spool.dsn_target.as_deref(), Some("new"));
        assert_eq!(c.spool.max_age, Duration::from_secs(48 * 3600));
        assert_eq!(c.spool.retry_initial, Duration::from_secs(30));
        assert_eq!(c.spool.retry_max, Duration::from_secs(600));

        let [old, new] = &c.targets[..] else {
            panic!("two targets expected: {:?}", c.targets);
        };
        assert_eq!(old.name, "old");
        assert_eq!(old.smtp, ["exch2013-a.corp:25", "exch2013-b.corp:25"]);
        assert_eq!(old.https, ["exch2013-a.corp:443"]);
        assert_eq!(old.smtp_tls, SmtpTlsMode::Required);
        assert!(old.xclient && !old.proxy_protocol && old.tls_verify);
        assert_eq!(old.tls_ca, Some(at("certs/corp-ca.pem")));
        assert_eq!(new.name, "new");
        assert_eq!(new.smtp, ["exch2019.corp:25"]);
        assert_eq!(new.https, ["http://exch2019.corp:8080"]);
        assert_eq!(new.smtp_tls, SmtpTlsMode::Implicit);
        assert!(!new.xclient && new.proxy_protocol && !new.tls_verify);
        assert_eq!(new.tls_ca, None);
        let KnownTargets::Exactly(known) = c.known_targets() else {
            panic!("a config names its targets exactly");
        };
        assert_eq!(known, ["old", "new"]);
    }

    #[test]
    fn the_sample_configs_load() {
        for sample in [
            include_str!("../../config/coexist.toml"),
            include_str!("../../config/installed/coexist.toml"),
        ] {
            let (_dir, loaded) = load(sample);
            let c = loaded.unwrap_or_else(|d| panic!("{d}"));
            assert!(c.https.is_none());
        }
    }

    #[test]
    fn every_problem_is_reported_in_one_run_section_by_section() {
        let errs = errors(
            "[routes]\nsource = \"etcd\"\n[admin]\nlisten = \"0.0.0.0:1\"\n[smtp]\n\
             [https]\ndefault_target = \"q\"\n[spool]\ndsn_target = \"q\"\n\
             [targets.reject]\nsmtp = [\"a:1\"]\n",
        );
        let lines: Vec<u32> = errs.iter().map(|e| e.0).collect();
        // Not sorted by line: routes, admin, targets, smtp, https, spool.
        assert_eq!(lines, [2, 4, 10, 5, 7, 0], "{errs:#?}");
    }

    #[test]
    fn an_unknown_section_is_named_with_its_line() {
        let errs = errors(&format!("{MINIMAL}[htps]\nlisten = \"0.0.0.0:443\"\n"));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, 9);
        assert!(errs[0].1.starts_with("unknown field `htps`"), "{errs:?}");
    }
}
