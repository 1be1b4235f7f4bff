//! `[targets.NAME]`: the sides of the migration and how coexist talks to their servers.

use indexmap::IndexMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::Checker;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
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

/// Every target, in config order. A target with problems is still returned (and reported),
/// so later sections can tell a misspelt reference from a broken target.
pub(super) fn validate(
    raw: &IndexMap<String, Spanned<RawTarget>>,
    c: &mut Checker,
) -> Vec<TargetConfig> {
    if raw.is_empty() {
        c.err(
            0,
            "no [targets.NAME] table: name at least the old and new sides",
        );
    }
    raw.iter().map(|(name, t)| target(name, t, c)).collect()
}

fn target(name: &str, spanned: &Spanned<RawTarget>, c: &mut Checker) -> TargetConfig {
    let line = c.line(spanned);
    if name == "reject"
        || name.is_empty()
        || !name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
    {
        c.err(
            line,
            format!("invalid target name {name:?} (letters, digits, - _ .; not \"reject\")"),
        );
    }
    let t = spanned.get_ref();
    let smtp = t.smtp.as_ref().map_or(&[][..], |s| s.get_ref().as_slice());
    if let Some(list) = &t.smtp
        && list.get_ref().is_empty()
    {
        // Every recipient it owns would get 451 for as long as it serves.
        c.err_at(
            list,
            format!("targets.{name}.smtp is empty: name at least one host:port"),
        );
    }
    for s in smtp {
        if let Err(m) = check_server(s.get_ref(), false) {
            c.err_at(s, format!("targets.{name}.smtp: {m}"));
        }
    }
    for s in &t.https {
        if let Err(m) = check_server(s.get_ref(), true) {
            c.err_at(s, format!("targets.{name}.https: {m}"));
        }
    }
    if t.smtp.is_none() && t.https.is_empty() {
        c.err(
            line,
            format!("target {name:?} has no smtp or https servers"),
        );
    }
    let smtp_tls = match &t.smtp_tls {
        None => SmtpTlsMode::Opportunistic,
        Some(m) => match m.get_ref().as_str() {
            "opportunistic" => SmtpTlsMode::Opportunistic,
            "required" => SmtpTlsMode::Required,
            "implicit" => SmtpTlsMode::Implicit,
            "none" => SmtpTlsMode::None,
            other => {
                c.err_at(
                    m,
                    format!(
                        "targets.{name}.smtp_tls {other:?}: expected \"opportunistic\", \"required\", \"implicit\" or \"none\""
                    ),
                );
                SmtpTlsMode::Opportunistic
            }
        },
    };
    let proxy_protocol = t.proxy_protocol.as_ref().is_some_and(|p| *p.get_ref());
    if let Some(p) = &t.proxy_protocol
        && proxy_protocol
        && t.xclient == Some(true)
    {
        c.err_at(
            p,
            format!(
                "targets.{name}: xclient and proxy_protocol both tell the server who the client is; choose one"
            ),
        );
    }
    TargetConfig {
        name: name.to_string(),
        smtp_tls,
        xclient: t.xclient.unwrap_or(false),
        proxy_protocol,
        smtp: smtp.iter().map(|s| s.get_ref().clone()).collect(),
        https: t.https.iter().map(|s| s.get_ref().clone()).collect(),
        tls_verify: t.tls_verify.unwrap_or(true),
        tls_ca: t.tls_ca.as_ref().map(|ca| c.path(ca.get_ref())),
    }
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
    use super::super::tests::{MINIMAL, errors};
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

    #[test]
    fn problems_in_a_target_name_their_lines() {
        let errs = errors(&format!(
            "{MINIMAL}[targets.x]\nsmtp = []\nsmtp_tls = \"maybe\"\nxclient = true\nproxy_protocol = true\n"
        ));
        assert_eq!(
            errs,
            [
                (
                    10,
                    "targets.x.smtp is empty: name at least one host:port".to_string()
                ),
                (
                    11,
                    "targets.x.smtp_tls \"maybe\": expected \"opportunistic\", \"required\", \"implicit\" or \"none\"".to_string()
                ),
                (
                    13,
                    "targets.x: xclient and proxy_protocol both tell the server who the client is; choose one".to_string()
                ),
            ]
        );
    }

    #[test]
    fn an_unknown_key_names_its_line() {
        let errs = errors(&format!(
            "{MINIMAL}[targets.x]\nsmtp = [\"a:1\"]\ntls = true\n"
        ));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, 11);
        assert!(errs[0].1.starts_with("unknown field `tls`"), "{errs:?}");
    }
}
