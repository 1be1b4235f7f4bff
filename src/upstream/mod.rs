//! The targets' servers, for every protocol: one registry indexed by the routing table's
//! target id, each server with a health state that has hysteresis ([`health`]), and
//! concurrent probes behind one small trait ([`probe`]). A protocol keeps its own
//! connection state (SMTP's capabilities and idle pool) beside these servers; the admin
//! API reads health from here, whichever protocol observed it.

pub mod health;
pub mod probe;

use std::sync::Arc;

use crate::config::TargetConfig;
use crate::route::{RoutingTable, TargetId};

pub use health::{Health, HealthView, Rank, Thresholds};
pub use probe::Prober;

/// Which of a target's server lists a server is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Smtp,
    Https,
}

/// One server of one target.
pub struct Server {
    /// `host:port` as configured (the name in logs, metrics and the status page).
    pub addr: String,
    pub target: Arc<str>,
    pub protocol: Protocol,
    /// Position of the target in the registry (= its id in every table built from the
    /// same config) and of the server in its protocol's list: a protocol's own per-server
    /// state is found by these, without a name lookup.
    pub target_index: usize,
    pub index: usize,
    pub health: Health,
}

impl Server {
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// Records one observation and reports a flip in the log and `coexist_backend_up`.
    pub fn observe(&self, outcome: Result<(), &str>) {
        let (up, flipped) = self.health.observe(outcome);
        match (flipped, up) {
            (true, true) => {
                tracing::info!(server = %self.addr, target = %self.target, "backend server up");
            }
            (true, false) => {
                tracing::warn!(server = %self.addr, target = %self.target, reason = outcome.err().unwrap_or(""), "backend server down");
            }
            (false, _) => {}
        }
        metrics::gauge!(
            crate::metric_names::BACKEND_UP,
            "target" => self.target.to_string(),
            "server" => self.addr.clone()
        )
        .set(f64::from(u8::from(up)));
    }
}

/// One target (migration side) and its servers per protocol.
pub struct Target {
    pub name: Arc<str>,
    pub smtp: Vec<Arc<Server>>,
    pub https: Vec<Arc<Server>>,
}

impl Target {
    pub fn servers(&self, protocol: Protocol) -> &[Arc<Server>] {
        match protocol {
            Protocol::Smtp => &self.smtp,
            Protocol::Https => &self.https,
        }
    }
}

/// Every target of the config, in config order: the order the routing table numbers
/// targets in (`KnownTargets::Exactly(config names)`), so a table's `TargetId` indexes it.
pub struct Registry {
    targets: Vec<Arc<Target>>,
}

impl Registry {
    pub fn new(targets: &[TargetConfig], thresholds: Thresholds) -> Self {
        let targets = targets
            .iter()
            .enumerate()
            .map(|(ti, t)| {
                let name: Arc<str> = Arc::from(t.name.as_str());
                let servers = |protocol: Protocol, addrs: &[String]| {
                    addrs
                        .iter()
                        .enumerate()
                        .map(|(i, addr)| {
                            Arc::new(Server {
                                addr: addr.clone(),
                                target: Arc::clone(&name),
                                protocol,
                                target_index: ti,
                                index: i,
                                health: Health::new(thresholds),
                            })
                        })
                        .collect()
                };
                Arc::new(Target {
                    smtp: servers(Protocol::Smtp, &t.smtp),
                    https: servers(Protocol::Https, &t.https),
                    name,
                })
            })
            .collect();
        Self { targets }
    }

    pub fn targets(&self) -> &[Arc<Target>] {
        &self.targets
    }

    /// The registry position of the target `table` names `id`. A table compiled against
    /// another config (it cannot be installed, but a check costs one short compare) is
    /// looked up by name instead.
    pub fn index_of(&self, table: &RoutingTable, id: TargetId) -> Option<usize> {
        let name = table.target_name(id);
        let i = usize::from(id.0);
        match self.targets.get(i) {
            Some(t) if &*t.name == name => Some(i),
            _ => self.targets.iter().position(|t| &*t.name == name),
        }
    }

    /// Every server of `protocol`, target by target.
    pub fn servers(&self, protocol: Protocol) -> impl Iterator<Item = &Arc<Server>> {
        self.targets.iter().flat_map(move |t| t.servers(protocol))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{KnownTargets, load_routes_text};

    fn target(name: &str, smtp: &[&str]) -> TargetConfig {
        TargetConfig {
            name: name.into(),
            smtp_tls: crate::config::SmtpTlsMode::None,
            xclient: false,
            proxy_protocol: false,
            smtp: smtp.iter().map(|s| (*s).to_string()).collect(),
            https: vec!["http://127.0.0.1:8080".into()],
            tls_verify: true,
            tls_ca: None,
        }
    }

    #[test]
    fn table_ids_index_the_registry() {
        let r = Registry::new(
            &[target("old", &["a:25", "b:25"]), target("new", &["c:25"])],
            Thresholds::default(),
        );
        let known = KnownTargets::Exactly(vec!["old".into(), "new".into()]);
        let t = load_routes_text(
            std::path::Path::new("r.toml"),
            "[domains.\"example.com\"]\nunknown = \"new\"\n",
            &known,
        )
        .unwrap();
        let id = t.lookup("x@example.com").target().unwrap();
        let i = r.index_of(&t, id).unwrap();
        assert_eq!(&*r.targets()[i].name, "new");
        assert_eq!(r.targets()[i].smtp[0].addr, "c:25");
        assert_eq!(
            (
                r.targets()[0].smtp[1].target_index,
                r.targets()[0].smtp[1].index
            ),
            (0, 1)
        );
        // A table whose targets are numbered otherwise is still resolved by name.
        let other = load_routes_text(
            std::path::Path::new("r.toml"),
            "[domains.\"example.com\"]\nunknown = \"new\"\n",
            &KnownTargets::Exactly(vec!["new".into(), "old".into()]),
        )
        .unwrap();
        let id = other.lookup("x@example.com").target().unwrap();
        assert_eq!(r.index_of(&other, id), Some(1));
        assert_eq!(r.servers(Protocol::Smtp).count(), 3);
        assert_eq!(r.servers(Protocol::Https).count(), 2);
    }
}
