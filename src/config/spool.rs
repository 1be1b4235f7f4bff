//! `[spool]`: where split deliveries wait for the targets that did not take them yet, and
//! how they are retried (SPEC §4.2).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Checker, TargetConfig, is_target};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpool {
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

/// `hostname` is `[smtp]`'s: the spool's DSNs speak for the same host.
pub(super) fn validate(
    raw: &RawSpool,
    hostname: &str,
    targets: &[TargetConfig],
    c: &mut Checker,
) -> SpoolSettings {
    if let Some(t) = &raw.dsn_target
        && !is_target(targets, t)
    {
        c.err(
            0,
            format!("spool.dsn_target {t:?} is not a configured target"),
        );
    }
    SpoolSettings {
        dir: c.path(raw.dir.as_deref().unwrap_or("spool")),
        hostname: hostname.to_string(),
        dsn_target: raw.dsn_target.clone(),
        max_age: Duration::from_secs(raw.max_age_hours.unwrap_or(120).max(1) * 3600),
        retry_initial: Duration::from_secs(raw.retry_initial_secs.unwrap_or(60).max(1)),
        retry_max: Duration::from_secs(raw.retry_max_secs.unwrap_or(3600).max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MINIMAL, errors, load};
    use std::time::Duration;

    #[test]
    fn defaults_and_a_dsn_target_that_must_exist() {
        let (dir, c) = load(MINIMAL);
        let spool = c.expect("loads").spool;
        assert_eq!(spool.dir, dir.path().join("spool"));
        assert_eq!(spool.hostname, "localhost");
        assert_eq!(spool.max_age, Duration::from_secs(120 * 3600));
        assert_eq!(
            errors(&format!("[spool]\ndsn_target = \"internet\"\n{MINIMAL}")),
            [(
                0,
                "spool.dsn_target \"internet\" is not a configured target".to_string()
            )]
        );
    }

    #[test]
    fn an_unknown_key_names_its_line() {
        let errs = errors(&format!(
            "[spool]\ndir = \"q\"\nmax_age_days = 5\n{MINIMAL}"
        ));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, 3);
        assert!(
            errs[0].1.starts_with("unknown field `max_age_days`"),
            "{errs:?}"
        );
    }
}
