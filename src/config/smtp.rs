//! `[smtp]`: the SMTP listeners, their TLS, and the limits every session holds to
//! (SPEC §4.1).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Checker, RawTls, TlsFiles};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSmtp {
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
    health_fall: Option<Spanned<u64>>,
    #[serde(default)]
    health_rise: Option<Spanned<u64>>,
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
    /// Failures in a row (probes and connections) that take a server down.
    pub health_fall: u32,
    /// Successes in a row that bring it back up.
    pub health_rise: u32,
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
            health_fall: 2,
            health_rise: 2,
            backend_idle: Duration::from_secs(30),
            backend_timeout: None,
        }
    }
}

pub(super) fn validate(raw: Option<&Spanned<RawSmtp>>, c: &mut Checker) -> SmtpConfig {
    let Some(spanned) = raw else {
        c.err(
            0,
            "no [[smtp.listener]] table: the proxy would listen on nothing",
        );
        return SmtpConfig {
            hostname: "localhost".into(),
            mixed_recipients: MixedRecipients::Fanout,
            listeners: Vec::new(),
            tls: None,
            add_received: true,
            limits: SmtpLimits::default(),
        };
    };
    let s = spanned.get_ref();
    if s.listener.is_empty() {
        c.err_at(
            spanned,
            "[smtp] has no [[smtp.listener]]: the proxy would listen on nothing",
        );
    }
    let mixed_recipients = match &s.mixed_recipients {
        None => MixedRecipients::Fanout,
        Some(m) => match m.get_ref().as_str() {
            "fanout" => MixedRecipients::Fanout,
            "defer" => MixedRecipients::Defer,
            other => {
                c.err_at(
                    m,
                    format!("smtp.mixed_recipients {other:?}: expected \"fanout\" or \"defer\""),
                );
                MixedRecipients::Fanout
            }
        },
    };
    let tls = s.tls.as_ref().map(|t| t.resolve(c));
    let listeners = s
        .listener
        .iter()
        .map(|l| listener(l, tls.is_some(), c))
        .collect();
    SmtpConfig {
        hostname: s.hostname.clone().unwrap_or_else(|| "localhost".into()),
        mixed_recipients,
        listeners,
        tls,
        add_received: s.add_received.unwrap_or(true),
        limits: limits(s, c),
    }
}

fn listener(spanned: &Spanned<RawListener>, has_tls: bool, c: &mut Checker) -> ListenerConfig {
    let l = spanned.get_ref();
    let listen = c.socket(&l.listen);
    let mode = match l.mode.get_ref().as_str() {
        "relay" => ListenerMode::Relay,
        "submission" => ListenerMode::Submission,
        "submissions" => ListenerMode::Submissions,
        other => {
            c.err_at(
                &l.mode,
                format!(
                    "listener mode {other:?}: expected \"relay\", \"submission\" or \"submissions\""
                ),
            );
            ListenerMode::Relay
        }
    };
    if mode != ListenerMode::Relay && !has_tls {
        c.err_at(
            spanned,
            format!(
                "a {} listener needs [smtp.tls] (no AUTH before TLS)",
                l.mode.get_ref()
            ),
        );
    }
    ListenerConfig { listen, mode }
}

fn limits(s: &RawSmtp, c: &mut Checker) -> SmtpLimits {
    let mut limits = SmtpLimits::default();
    if let Some(v) = positive(s.max_message_size.as_ref(), "max_message_size", c) {
        limits.max_message_size = v;
    }
    for (v, name, dst) in [
        (
            &s.command_timeout_secs,
            "command_timeout_secs",
            &mut limits.command_timeout,
        ),
        (
            &s.data_timeout_secs,
            "data_timeout_secs",
            &mut limits.data_timeout,
        ),
        (
            &s.health_interval_secs,
            "health_interval_secs",
            &mut limits.health_interval,
        ),
    ] {
        if let Some(secs) = positive(v.as_ref(), name, c) {
            *dst = Duration::from_secs(secs);
        }
    }
    for (v, name, dst) in [
        (&s.health_fall, "health_fall", &mut limits.health_fall),
        (&s.health_rise, "health_rise", &mut limits.health_rise),
    ] {
        if let Some(n) = positive(v.as_ref(), name, c) {
            *dst = u32::try_from(n).unwrap_or(u32::MAX);
        }
    }
    // Zero would refuse everything: these are quietly at least 1.
    for (v, dst) in [
        (&s.max_recipients, &mut limits.max_recipients),
        (&s.max_line_length, &mut limits.max_line_length),
        (&s.max_connections, &mut limits.max_connections),
        (
            &s.max_connections_per_ip,
            &mut limits.max_connections_per_ip,
        ),
    ] {
        if let Some(v) = v {
            *dst = (*v.get_ref()).max(1);
        }
    }
    if let Some(ms) = s.greeting_delay_ms {
        limits.greeting_delay = Duration::from_millis(ms.min(60_000));
    }
    if let Some(secs) = s.backend_timeout_secs {
        limits.backend_timeout = Some(Duration::from_secs(secs.max(1)));
    }
    if let Some(secs) = s.backend_idle_secs {
        limits.backend_idle = Duration::from_secs(secs);
    }
    limits
}

/// A limit that must not be zero. Zero is reported and still returned, as it always was:
/// a config with errors is never used.
fn positive(v: Option<&Spanned<u64>>, name: &str, c: &mut Checker) -> Option<u64> {
    let v = v?;
    if *v.get_ref() == 0 {
        c.err_at(v, format!("smtp.{name} must be > 0"));
    }
    Some(*v.get_ref())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, errors, load};

    #[test]
    fn health_thresholds() {
        let (_dir, c) =
            load(&MINIMAL.replace("[smtp]\n", "[smtp]\nhealth_fall = 3\nhealth_rise = 5\n"));
        let limits = c.expect("valid").smtp.limits;
        assert_eq!((limits.health_fall, limits.health_rise), (3, 5));
        let (_dir, c) = load(MINIMAL);
        let limits = c.expect("valid").smtp.limits;
        assert_eq!((limits.health_fall, limits.health_rise), (2, 2));
        let errs = errors(&MINIMAL.replace("[smtp]\n", "[smtp]\nhealth_rise = 0\n"));
        assert_eq!(errs, [(2, "smtp.health_rise must be > 0".to_string())]);
    }

    #[test]
    fn listener_problems_name_their_lines_in_order() {
        let errs = errors(
            "[smtp]\nmixed_recipients = \"all\"\nmax_message_size = 0\n\
             [[smtp.listener]]\nlisten = \"nowhere\"\nmode = \"submission\"\n\
             [targets.old]\nsmtp = [\"127.0.0.1:9\"]\n",
        );
        assert_eq!(
            errs,
            [
                (
                    2,
                    "smtp.mixed_recipients \"all\": expected \"fanout\" or \"defer\"".to_string()
                ),
                (
                    5,
                    "\"nowhere\" is not an IP:port address: invalid socket address syntax"
                        .to_string()
                ),
                (
                    4,
                    "a submission listener needs [smtp.tls] (no AUTH before TLS)".to_string()
                ),
                (3, "smtp.max_message_size must be > 0".to_string()),
            ]
        );
    }

    #[test]
    fn an_unknown_key_names_its_line() {
        let errs = errors(&MINIMAL.replace("[smtp]\n", "[smtp]\nmax_size = 1\n"));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, 2);
        assert!(
            errs[0].1.starts_with("unknown field `max_size`"),
            "{errs:?}"
        );
    }
}
