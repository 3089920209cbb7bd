//! The agent's Prometheus metrics (`GET /metrics` on `metrics_addr`): start stages as
//! histograms, restarts, updates and their outcomes.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// bind_to_ready, prefetch, pull, sandbox, create, start, ready, update, ...
    pub stage: String,
    pub runtime_class: String,
    pub start_order: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub stage_seconds: Family<StageLabels, Histogram>,
    pub pods_started: Counter,
    pub pod_start_failures: Counter,
    pub container_restarts: Counter,
    pub updates: Family<ResultLabels, Counter>,
    pub pods: Gauge,
    /// Java cache: starts by what they got (mapped, rejected, corrupted, observed, skipped).
    pub java_starts: Family<ResultLabels, Counter>,
    /// Java cache: training runs by result (published, unusable, failed).
    pub java_trainings: Family<ResultLabels, Counter>,
    pub java_cache_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kite_agent");
        let stage_seconds = Family::<StageLabels, Histogram>::new_with_constructor(|| {
            // 10 ms … ~160 s.
            Histogram::new(exponential_buckets(0.01, 2.0, 15))
        });
        registry.register(
            "pod_stage_seconds",
            "Time of each stage of pod starts and updates (bind_to_ready: the whole start)",
            stage_seconds.clone(),
        );
        let pods_started = Counter::default();
        registry.register(
            "pods_started",
            "Pods that became ready",
            pods_started.clone(),
        );
        let pod_start_failures = Counter::default();
        registry.register(
            "pod_start_failures",
            "Pod starts that failed (pull, sandbox, create)",
            pod_start_failures.clone(),
        );
        let container_restarts = Counter::default();
        registry.register(
            "container_restarts",
            "Containers restarted by their pod's restart policy or a failed liveness probe",
            container_restarts.clone(),
        );
        let updates = Family::<ResultLabels, Counter>::default();
        registry.register(
            "container_updates",
            "In-place container updates, by result (updated, rolled_back, failed)",
            updates.clone(),
        );
        let pods = Gauge::default();
        registry.register("pods", "Pods the agent holds", pods.clone());
        let java_starts = Family::<ResultLabels, Counter>::default();
        registry.register(
            "java_cache_starts",
            "Java container starts with the cache, by result (mapped, rejected, corrupted, observed, skipped)",
            java_starts.clone(),
        );
        let java_trainings = Family::<ResultLabels, Counter>::default();
        registry.register(
            "java_cache_trainings",
            "Java cache training runs, by result (published, unusable, failed)",
            java_trainings.clone(),
        );
        let java_cache_bytes = Gauge::default();
        registry.register(
            "java_cache_bytes",
            "Bytes of class archives the node holds",
            java_cache_bytes.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            java_starts,
            java_trainings,
            java_cache_bytes,
            stage_seconds,
            pods_started,
            pod_start_failures,
            container_restarts,
            updates,
            pods,
        }
    }

    pub fn observe_stage(&self, stage: &str, runtime_class: &str, start_order: &str, secs: f64) {
        self.stage_seconds
            .get_or_create(&StageLabels {
                stage: stage.into(),
                runtime_class: runtime_class.into(),
                start_order: start_order.into(),
            })
            .observe(secs);
    }

    pub fn set_java_cache_bytes(&self, bytes: u64) {
        self.java_cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let registry = self.registry.lock().expect("metrics registry lock");
        kite_config::daemon::encode_metrics(&registry)
    }
}

/// Serves `GET /metrics` on `addr` until `stop` completes.
pub async fn serve(
    addr: &str,
    metrics: std::sync::Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    kite_config::daemon::serve_metrics(addr, move || metrics.render(), stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_histograms_by_runtime_and_order() {
        let m = Metrics::new();
        m.observe_stage("sandbox", "kite", "parallel", 2.1);
        m.pods_started.inc();
        let text = m.render();
        assert!(
            text.contains("kite_agent_pod_stage_seconds_count{stage=\"sandbox\",runtime_class=\"kite\",start_order=\"parallel\"} 1"),
            "{text}"
        );
        assert!(text.contains("kite_agent_pods_started_total 1"), "{text}");
    }
}
