//! `[routes]`: where the routing table comes from, how many versions are kept, and where
//! applied versions are stored.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::Checker;
use crate::route::DEFAULT_HISTORY;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoutes {
    /// A string, not a serde enum: an unsupported source gets our own message, which names
    /// what is supported.
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

/// Where the routing table is read from (SPEC §3 `routes.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteSource {
    /// `path`, a TOML file (with the CSV files it imports); the default.
    File,
}

#[derive(Debug, Clone)]
pub struct RoutesConfig {
    pub source: RouteSource,
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

pub(super) fn validate(raw: &RawRoutes, c: &mut Checker) -> RoutesConfig {
    let source = match &raw.source {
        None => RouteSource::File,
        Some(s) => match s.get_ref().as_str() {
            "file" => RouteSource::File,
            other => {
                c.err_at(
                    s,
                    format!("routes.source {other:?} is not supported (supported: \"file\")"),
                );
                RouteSource::File
            }
        },
    };
    let history = match &raw.history {
        None => DEFAULT_HISTORY,
        Some(h) => {
            if *h.get_ref() < 1 || *h.get_ref() > 10_000 {
                c.err_at(h, "routes.history must be between 1 and 10000");
            }
            usize::try_from(*h.get_ref()).unwrap_or(1)
        }
    };
    RoutesConfig {
        source,
        path: c.path(
            raw.path
                .as_ref()
                .map_or("routes.toml", |p| p.get_ref().as_str()),
        ),
        seed: raw.seed.as_ref().map(|s| c.path(s.get_ref())),
        history,
        state_dir: c.path(raw.state_dir.as_deref().unwrap_or("state")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, errors, load};
    use super::*;

    #[test]
    fn file_is_the_default_and_the_only_source() {
        let (_d, c) = load(MINIMAL);
        assert_eq!(c.expect("loads").routes.source, RouteSource::File);
        let (_d, c) = load(&format!("[routes]\nsource = \"file\"\n{MINIMAL}"));
        assert_eq!(c.expect("loads").routes.source, RouteSource::File);
        assert_eq!(
            errors(&format!("[routes]\nsource = \"etcd\"\n{MINIMAL}")),
            [(
                2,
                "routes.source \"etcd\" is not supported (supported: \"file\")".to_string()
            )]
        );
    }

    #[test]
    fn history_out_of_range_and_unknown_keys_name_their_line() {
        assert_eq!(
            errors(&format!("[routes]\nhistory = 0\n{MINIMAL}")),
            [(2, "routes.history must be between 1 and 10000".to_string())]
        );
        let errs = errors(&format!(
            "[routes]\npath = \"r.toml\"\ncolour = 1\n{MINIMAL}"
        ));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, 3);
        assert!(errs[0].1.starts_with("unknown field `colour`"), "{errs:?}");
    }
}
