//! `[https]`: the HTTPS listener's address, its certificates, and the target for requests
//! that name no mailbox (SPEC §3, §5).
//!
//! Parsed and validated only: the HTTPS proxy that will serve it is not built yet, and
//! nothing listens on `listen`.

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

use super::{Checker, RawTls, TargetConfig, TlsFiles, is_target};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttps {
    #[serde(default)]
    listen: Option<Spanned<String>>,
    #[serde(default)]
    default_target: Option<Spanned<String>>,
    /// `[[https.cert]]`: one table per certificate.
    #[serde(default)]
    cert: Vec<RawTls>,
}

/// The validated `[https]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsConfig {
    /// Where HTTPS clients will connect; `None` when `[https]` names no listener (its other
    /// keys are still checked).
    pub listen: Option<SocketAddr>,
    /// The target for requests that name no mailbox at all (no hint, cookie, login or
    /// learned key; SPEC §5); `None` leaves them to the routing table's domain default.
    pub default_target: Option<String>,
    /// `[[https.cert]]` in config order: the certificates presented to clients (by SNI,
    /// once the listener exists).
    pub certs: Vec<TlsFiles>,
}

pub(super) fn validate(raw: &RawHttps, targets: &[TargetConfig], c: &mut Checker) -> HttpsConfig {
    let listen = raw.listen.as_ref().map(|l| {
        let addr = c.socket(l);
        if raw.cert.is_empty() {
            c.err_at(
                l,
                "https.listen needs at least one [[https.cert]] (cert and key): the proxy \
                 terminates TLS and must present the certificate clients expect for the mail \
                 host names",
            );
        }
        addr
    });
    if let Some(dt) = &raw.default_target
        && !is_target(targets, dt.get_ref())
    {
        c.err_at(
            dt,
            format!(
                "https.default_target {:?} is not a configured target",
                dt.get_ref()
            ),
        );
    }
    HttpsConfig {
        listen,
        default_target: raw.default_target.as_ref().map(|d| d.get_ref().clone()),
        certs: raw.cert.iter().map(|t| t.resolve(c)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, errors, load};
    use super::*;

    /// MINIMAL has 8 lines: `[https]` is line 9.
    fn with_https(https: &str) -> String {
        format!("{MINIMAL}[https]\n{https}")
    }

    #[test]
    fn a_listener_with_a_certificate_loads() {
        let (dir, c) = load(&with_https(
            "listen = \"[::]:443\"\ndefault_target = \"new\"\n\
             [[https.cert]]\ncert = \"certs/mail.pem\"\nkey = \"certs/mail.key\"\n",
        ));
        let https = c.expect("loads").https.expect("[https] is there");
        assert_eq!(https.listen, Some("[::]:443".parse().unwrap()));
        assert_eq!(https.default_target.as_deref(), Some("new"));
        assert_eq!(
            https.certs,
            [TlsFiles {
                cert: dir.path().join("certs/mail.pem"),
                key: dir.path().join("certs/mail.key"),
            }]
        );
    }

    #[test]
    fn without_https_there_is_no_https_config() {
        let (_d, c) = load(MINIMAL);
        assert_eq!(c.expect("loads").https, None);
    }

    #[test]
    fn only_a_default_target_is_still_accepted() {
        // What `[https]` could hold before its keys were typed.
        let (_d, c) = load(&with_https("default_target = \"old\"\n"));
        let https = c.expect("loads").https.expect("[https] is there");
        assert_eq!(https.listen, None);
        assert!(https.certs.is_empty());
    }

    #[test]
    fn an_unknown_key_names_its_line() {
        let errs = errors(&with_https(
            "listen = \"0.0.0.0:443\"\nrouting_cookie_key = \"k\"\n",
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].0, 11);
        assert!(
            errs[0]
                .1
                .starts_with("unknown field `routing_cookie_key`, expected one of `listen`, `default_target`, `cert`"),
            "{errs:?}"
        );
        // In a certificate table too.
        let errs = errors(&with_https(
            "[[https.cert]]\ncert = \"c.pem\"\nkey = \"k.pem\"\nsni = \"mail.example.com\"\n",
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].0, 13);
        assert!(errs[0].1.starts_with("unknown field `sni`"), "{errs:?}");
    }

    #[test]
    fn a_listener_without_a_certificate_says_why() {
        let errs = errors(&with_https("listen = \"0.0.0.0:443\"\n"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].0, 10);
        assert!(
            errs[0]
                .1
                .starts_with("https.listen needs at least one [[https.cert]] (cert and key): "),
            "{errs:?}"
        );
        assert!(errs[0].1.contains("terminates TLS"), "{errs:?}");
    }

    #[test]
    fn a_bad_listen_address_names_its_line() {
        let errs = errors(&with_https(
            "listen = \"443\"\n[[https.cert]]\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        ));
        assert_eq!(
            errs,
            [(
                10,
                "\"443\" is not an IP:port address: invalid socket address syntax".to_string()
            )]
        );
    }

    #[test]
    fn an_unknown_default_target_names_its_line() {
        let errs = errors(&with_https("default_target = \"olde\"\n"));
        assert_eq!(
            errs,
            [(
                10,
                "https.default_target \"olde\" is not a configured target".to_string()
            )]
        );
    }

    #[test]
    fn every_https_problem_at_once() {
        let errs = errors(&with_https(
            "listen = \"nowhere\"\ndefault_target = \"gone\"\n",
        ));
        let lines: Vec<u32> = errs.iter().map(|e| e.0).collect();
        assert_eq!(lines, [10, 10, 11], "{errs:?}");
    }
}
