//! Active health checks: every server probed at once, each probe bounded by a timeout, so
//! one black-holed server costs its own probe's timeout and delays nobody else's — and
//! the proxy's readiness waits for the first round only up to a short deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::Server;

/// A protocol's check of one of its servers (SMTP: greeting, EHLO, QUIT; HTTPS: a
/// health-check URL).
pub trait Prober: Send + Sync + 'static {
    /// `Err` says why the server is not healthy.
    fn probe(&self, server: &Server) -> impl Future<Output = Result<(), String>> + Send;
}

/// Probes every server in `servers` concurrently, each bounded by `timeout`, and records
/// each outcome in the server's health.
pub async fn probe_all<P: Prober>(prober: &P, servers: &[Arc<Server>], timeout: Duration) {
    let probes = servers.iter().map(|s| async move {
        let outcome = match tokio::time::timeout(timeout, prober.probe(s)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer to the health probe within {}s",
                timeout.as_secs()
            )),
        };
        s.observe(match &outcome {
            Ok(()) => Ok(()),
            Err(why) => Err(why.as_str()),
        });
    });
    futures_util::future::join_all(probes).await;
}

/// The first round at start: probes run in a task of their own, and the caller waits for
/// them at most `wait` — a server that does not answer is still probed (and marked down
/// when its probe times out), but the proxy starts serving without it. True when every
/// probe finished in time.
pub async fn first_round<P: Prober>(
    prober: Arc<P>,
    servers: Vec<Arc<Server>>,
    timeout: Duration,
    wait: Duration,
) -> bool {
    let round = tokio::spawn(async move { probe_all(&*prober, &servers, timeout).await });
    matches!(tokio::time::timeout(wait, round).await, Ok(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SmtpTlsMode, TargetConfig};
    use crate::upstream::{Protocol, Registry, Thresholds};
    use tokio::time::Instant;

    /// Answers after a delay named in the server's address: `ok-1` (1 s, healthy),
    /// `bad-1` (1 s, refused), `hole` (never).
    struct Fake;

    impl Prober for Fake {
        async fn probe(&self, server: &Server) -> Result<(), String> {
            let name = server.addr.split(':').next().unwrap_or_default();
            let (kind, secs) = name.split_once('-').unwrap_or((name, "0"));
            if kind == "hole" {
                std::future::pending::<()>().await;
            }
            let secs: u64 = secs.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_secs(secs)).await;
            if kind == "ok" {
                Ok(())
            } else {
                Err("refused".into())
            }
        }
    }

    fn registry(servers: &[&str]) -> Registry {
        let t = TargetConfig {
            name: "old".into(),
            smtp_tls: SmtpTlsMode::None,
            xclient: false,
            proxy_protocol: false,
            smtp: servers.iter().map(|s| (*s).to_string()).collect(),
            https: vec![],
            tls_verify: true,
            tls_ca: None,
        };
        Registry::new(&[t], Thresholds { fall: 1, rise: 1 })
    }

    #[tokio::test(start_paused = true)]
    async fn probes_run_concurrently() {
        let r = registry(&["ok-1:25", "ok-1:26", "bad-1:27"]);
        let servers: Vec<_> = r.servers(Protocol::Smtp).cloned().collect();
        let start = Instant::now();
        probe_all(&Fake, &servers, Duration::from_secs(10)).await;
        // Three one-second probes, one after another, would take three seconds.
        assert_eq!(start.elapsed().as_secs(), 1);
        let up: Vec<bool> = servers.iter().map(|s| s.is_up()).collect();
        assert_eq!(up, [true, true, false]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_black_holed_server_does_not_delay_readiness() {
        let r = registry(&["hole:25", "ok-1:26", "bad-1:27"]);
        let servers: Vec<_> = r.servers(Protocol::Smtp).cloned().collect();
        let start = Instant::now();
        let done = first_round(
            Arc::new(Fake),
            servers.clone(),
            Duration::from_secs(10),
            Duration::from_secs(3),
        )
        .await;
        assert!(!done, "the black hole's probe is still running");
        assert_eq!(
            start.elapsed().as_secs(),
            3,
            "ready at the deadline, not at the probe timeout"
        );
        // The servers that answered are known already.
        assert!(servers[1].is_up());
        assert!(!servers[2].is_up());
        assert!(servers[0].is_up(), "not judged before its probe ends");
        // The black hole's probe goes on in the background and times out.
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(!servers[0].is_up());
        let why = servers[0].health.view().last_error.unwrap_or_default();
        assert!(why.contains("within 10s"), "{why}");
    }
}
