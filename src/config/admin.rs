//! `[admin]`: where the admin API listens and who may use it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::Checker;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    listen: Spanned<String>,
    #[serde(default)]
    token_file: Option<Spanned<String>>,
    #[serde(default)]
    public_status: bool,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    /// The status page, `/status` and `/metrics` answer without the token (changes,
    /// lookups, history and the queue still need it).
    pub public_status: bool,
}

pub(super) fn validate(raw: Option<&RawAdmin>, c: &mut Checker) -> AdminConfig {
    let Some(a) = raw else {
        return AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8025)),
            token_file: None,
            public_status: false,
        };
    };
    let listen = c.socket(&a.listen);
    let token_file = a.token_file.as_ref().map(|t| c.path(t.get_ref()));
    if !listen.ip().is_loopback() && token_file.is_none() {
        c.err_at(
            &a.listen,
            "admin.listen is not a loopback address: admin.token_file is required",
        );
    }
    AdminConfig {
        listen,
        token_file,
        public_status: a.public_status,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, errors, load};

    #[test]
    fn loopback_by_default_and_a_token_off_loopback() {
        let (_d, c) = load(MINIMAL);
        let admin = c.expect("loads").admin;
        assert_eq!(admin.listen, "127.0.0.1:8025".parse().unwrap());
        assert!(admin.token_file.is_none() && !admin.public_status);
        assert_eq!(
            errors(&format!("[admin]\nlisten = \"0.0.0.0:8025\"\n{MINIMAL}")),
            [(
                2,
                "admin.listen is not a loopback address: admin.token_file is required".to_string()
            )]
        );
    }

    #[test]
    fn an_unknown_key_names_its_line() {
        let errs = errors(&format!(
            "[admin]\nlisten = \"127.0.0.1:1\"\ntoken = \"t\"\n{MINIMAL}"
        ));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, 3);
        assert!(errs[0].1.starts_with("unknown field `token`"), "{errs:?}");
    }
}
