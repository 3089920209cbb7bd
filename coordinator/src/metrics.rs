//! The coordinator's Prometheus metrics (`GET /metrics` on `metrics_addr`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    /// Nodes by state (Ready, NotReady, Unknown).
    pub nodes: Family<Vec<(String, String)>, Gauge>,
    pub pods: Gauge,
    pub apps: Gauge,
    /// Replicas placed, and those that found no node.
    pub placements: Family<Vec<(String, String)>, Counter>,
    /// Bind → the node's first report of the pod.
    assignment_seconds: Histogram,
    /// One reconcile pass of every app.
    reconcile_seconds: Histogram,
    pub rollouts: Family<Vec<(String, String)>, Counter>,
    pub joins: Family<Vec<(String, String)>, Counter>,
    /// 1 while this coordinator leads.
    pub leader: Gauge,
    /// Terms this coordinator began (elections won) and ended, by reason.
    pub terms: Family<Vec<(String, String)>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kite_coordinator");
        let nodes = Family::default();
        registry.register("nodes", "Nodes by state", nodes.clone());
        let pods = Gauge::default();
        registry.register("pods", "Pods assigned to nodes", pods.clone());
        let apps = Gauge::default();
        registry.register("apps", "Apps", apps.clone());
        let placements = Family::default();
        registry.register(
            "placements",
            "Replicas placed (result=placed) or left unschedulable",
            placements.clone(),
        );
        let buckets = [
            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let assignment_seconds = Histogram::new(buckets);
        registry.register(
            "assignment_seconds",
            "From a pod's bind to its node's first report of it",
            assignment_seconds.clone(),
        );
        let reconcile_seconds = Histogram::new(buckets);
        registry.register(
            "reconcile_seconds",
            "One reconcile pass over every app",
            reconcile_seconds.clone(),
        );
        let rollouts = Family::default();
        registry.register(
            "rollouts",
            "Rollouts ended, by result (complete, rolled_back)",
            rollouts.clone(),
        );
        let joins = Family::default();
        registry.register("joins", "Node joins, by result", joins.clone());
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this coordinator leads (always, with the embedded store)",
            leader.clone(),
        );
        let terms = Family::default();
        registry.register(
            "terms",
            "Leadership terms begun (event=won) and ended (event=lost, resigned)",
            terms.clone(),
        );
        Metrics {
            registry,
            nodes,
            pods,
            apps,
            placements,
            assignment_seconds,
            reconcile_seconds,
            rollouts,
            joins,
            leader,
            terms,
        }
    }

    pub fn observe_assignment(&self, secs: f64) {
        self.assignment_seconds.observe(secs);
    }

    pub fn observe_reconcile(&self, secs: f64) {
        self.reconcile_seconds.observe(secs);
    }

    pub fn count(family: &Family<Vec<(String, String)>, Counter>, key: &str, value: &str) {
        family
            .get_or_create(&vec![(key.to_string(), value.to_string())])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("metrics encode to a String");
        out
    }
}
