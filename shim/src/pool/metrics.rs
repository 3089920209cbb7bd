//! kite-pool's Prometheus metrics (`GET /metrics` on `[shim.pool] metrics_addr`).

use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

pub struct PoolMetrics {
    registry: Mutex<Registry>,
    /// Ready VMs, and the target, by size class (`1x256`: vCPUs x MiB).
    pub ready: Family<Labels, Gauge>,
    pub target: Family<Labels, Gauge>,
    pub booting: Gauge,
    /// VMs pods took (hits), and starts that found none fitting (misses, by reason).
    pub claims: Counter,
    pub misses: Family<Labels, Counter>,
    /// Boots into the pool by result, and how long the good ones took.
    pub boots: Family<Labels, Counter>,
    pub boot_seconds: Histogram,
    /// Warm-ups of booted VMs by result (warmed, failed, unsupported, off).
    pub warm_ups: Family<Labels, Counter>,
    /// VMs the holder took out of the pool, by reason (dead, age, config, drain).
    pub retired: Family<Labels, Counter>,
    /// How long the last claimed VMs had waited.
    pub idle_seconds: Histogram,
}

impl Default for PoolMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A size class's label value.
pub fn class_label(vcpus: u32, memory_mib: u64) -> Labels {
    vec![("class".into(), format!("{vcpus}x{memory_mib}"))]
}

pub fn reason_label(reason: &str) -> Labels {
    vec![("reason".into(), reason.into())]
}

impl PoolMetrics {
    pub fn new() -> PoolMetrics {
        let mut registry = Registry::with_prefix("kite_pool");
        let ready = Family::default();
        registry.register(
            "ready",
            "Pooled VMs ready for a pod, by class",
            ready.clone(),
        );
        let target = Family::default();
        registry.register(
            "target",
            "Pooled VMs to keep ready, by class",
            target.clone(),
        );
        let booting = Gauge::default();
        registry.register("booting", "VMs booting into the pool", booting.clone());
        let claims = Counter::default();
        registry.register("claims", "Pooled VMs pods took (hits)", claims.clone());
        let misses = Family::default();
        registry.register(
            "misses",
            "Pod starts that found no fitting pooled VM, by reason",
            misses.clone(),
        );
        let boots = Family::default();
        registry.register("boots", "Boots into the pool, by result", boots.clone());
        let boot_seconds = Histogram::new([0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]);
        registry.register(
            "boot_seconds",
            "A pooled VM's boot, from its directory to its agent's answer",
            boot_seconds.clone(),
        );
        let warm_ups = Family::default();
        registry.register(
            "warm_ups",
            "Warm-ups of VMs booted into the pool, by result (warmed, failed, unsupported, off)",
            warm_ups.clone(),
        );
        let retired = Family::default();
        registry.register(
            "retired",
            "VMs taken out of the pool without a pod, by reason",
            retired.clone(),
        );
        let idle_seconds = Histogram::new([1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0]);
        registry.register(
            "idle_seconds",
            "How long a VM waited in the pool before a pod took it",
            idle_seconds.clone(),
        );
        PoolMetrics {
            registry: Mutex::new(registry),
            ready,
            target,
            booting,
            claims,
            misses,
            boots,
            boot_seconds,
            warm_ups,
            retired,
            idle_seconds,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let registry = self.registry.lock().expect("metrics registry lock");
        kite_config::daemon::encode_metrics(&registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_with_their_labels() {
        let m = PoolMetrics::new();
        m.ready.get_or_create(&class_label(1, 256)).set(2);
        m.claims.inc();
        m.misses.get_or_create(&reason_label("empty")).inc();
        let text = m.render();
        assert!(
            text.contains("kite_pool_ready{class=\"1x256\"} 2"),
            "{text}"
        );
        assert!(text.contains("kite_pool_claims_total 1"), "{text}");
        assert!(
            text.contains("kite_pool_misses_total{reason=\"empty\"} 1"),
            "{text}"
        );
    }
}
