//! Prometheus metrics: the upstream driver's names where they mean the same, plus ours.
//! Served with `/healthz` and `/readyz` by [`serve`].

mod server;

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use server::serve;

const OS_TYPE: &str = "linux";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
    pub os_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub provider: String,
    pub os_type: String,
    pub error_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    node_publish: Family<ProviderLabels, Counter>,
    node_publish_error: Family<ErrorLabels, Counter>,
    node_unpublish: Family<ProviderLabels, Counter>,
    node_unpublish_error: Family<ErrorLabels, Counter>,
    rotation: Family<ProviderLabels, Counter>,
    rotation_error: Family<ErrorLabels, Counter>,
    rotation_duration: HistogramFamily<ProviderLabels>,
    publish_duration: HistogramFamily<ProviderLabels>,
    provider_duration: HistogramFamily<ProviderLabels>,
    volumes: Gauge,
    secret_memory: Family<KindLabels, Gauge>,
    binding_denials: Counter,
}

fn provider(p: &str) -> ProviderLabels {
    ProviderLabels {
        provider: p.to_string(),
        os_type: OS_TYPE.into(),
    }
}

fn error(p: &str, error_type: &str) -> ErrorLabels {
    ErrorLabels {
        provider: p.to_string(),
        os_type: OS_TYPE.into(),
        error_type: error_type.to_string(),
    }
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            node_publish: Family::default(),
            node_publish_error: Family::default(),
            node_unpublish: Family::default(),
            node_unpublish_error: Family::default(),
            rotation: Family::default(),
            rotation_error: Family::default(),
            rotation_duration: Family::new_with_constructor(latency_histogram),
            publish_duration: Family::new_with_constructor(latency_histogram),
            provider_duration: Family::new_with_constructor(latency_histogram),
            volumes: Gauge::default(),
            secret_memory: Family::default(),
            binding_denials: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "total_node_publish",
            "Successful NodePublishVolume calls",
            m.node_publish.clone(),
        );
        registry.register(
            "total_node_publish_error",
            "Failed NodePublishVolume calls",
            m.node_publish_error.clone(),
        );
        registry.register(
            "total_node_unpublish",
            "Successful NodeUnpublishVolume calls",
            m.node_unpublish.clone(),
        );
        registry.register(
            "total_node_unpublish_error",
            "Failed NodeUnpublishVolume calls",
            m.node_unpublish_error.clone(),
        );
        registry.register(
            "total_rotation_reconcile",
            "Volume refreshes that reached the provider",
            m.rotation.clone(),
        );
        registry.register(
            "total_rotation_reconcile_error",
            "Volume refreshes that failed",
            m.rotation_error.clone(),
        );
        registry.register(
            "rotation_reconcile_duration_sec",
            "Duration of a volume refresh, in seconds",
            m.rotation_duration.clone(),
        );
        registry.register(
            "node_publish_duration_seconds",
            "Duration of NodePublishVolume, in seconds",
            m.publish_duration.clone(),
        );
        registry.register(
            "provider_mount_duration_seconds",
            "Duration of a provider Mount call, in seconds",
            m.provider_duration.clone(),
        );
        registry.register(
            "volumes_published",
            "Volumes currently published",
            m.volumes.clone(),
        );
        registry.register(
            "secret_memory_bytes",
            "Bytes of secret memory held, by kind (memfd_secret or mlock)",
            m.secret_memory.clone(),
        );
        registry.register(
            "reader_binding_denials",
            "Opens refused because the reader is not in the volume's pod",
            m.binding_denials.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn published(&self, p: &str, took: Duration) {
        self.node_publish.get_or_create(&provider(p)).inc();
        self.publish_duration
            .get_or_create(&provider(p))
            .observe(took.as_secs_f64());
    }

    pub fn publish_failed(&self, p: &str, error_type: &str) {
        self.node_publish_error
            .get_or_create(&error(p, error_type))
            .inc();
    }

    pub fn unpublished(&self, p: &str) {
        self.node_unpublish.get_or_create(&provider(p)).inc();
    }

    pub fn unpublish_failed(&self, p: &str, error_type: &str) {
        self.node_unpublish_error
            .get_or_create(&error(p, error_type))
            .inc();
    }

    pub fn refreshed(&self, p: &str, took: Duration) {
        self.rotation.get_or_create(&provider(p)).inc();
        self.rotation_duration
            .get_or_create(&provider(p))
            .observe(took.as_secs_f64());
    }

    pub fn refresh_failed(&self, p: &str, error_type: &str) {
        self.rotation_error
            .get_or_create(&error(p, error_type))
            .inc();
    }

    pub fn provider_call(&self, p: &str, took: Duration) {
        self.provider_duration
            .get_or_create(&provider(p))
            .observe(took.as_secs_f64());
    }

    pub fn set_volumes(&self, n: usize) {
        self.volumes.set(n as i64);
    }

    pub fn binding_denied(&self) {
        self.binding_denials.inc();
    }

    /// The text exposition of every metric, with secret-memory gauges read fresh.
    pub fn encode(&self) -> String {
        for kind in [
            crate::secret_mem::MemoryKind::SecretMem,
            crate::secret_mem::MemoryKind::Locked,
        ] {
            let bytes = crate::secret_mem::Region::live_bytes(kind);
            self.secret_memory
                .get_or_create(&KindLabels {
                    kind: kind.as_str().into(),
                })
                .set(bytes as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_names_and_labels() {
        let m = Metrics::new();
        m.published("vault", Duration::from_millis(3));
        m.publish_failed("", "NotFound");
        m.refreshed("vault", Duration::from_millis(1));
        let text = m.encode();
        assert!(
            text.contains("total_node_publish_total{provider=\"vault\",os_type=\"linux\"} 1"),
            "{text}"
        );
        assert!(text.contains("total_node_publish_error_total{provider=\"\",os_type=\"linux\",error_type=\"NotFound\"} 1"));
        assert!(
            text.contains("total_rotation_reconcile_total{provider=\"vault\",os_type=\"linux\"} 1")
        );
        assert!(text.contains(
            "rotation_reconcile_duration_sec_count{provider=\"vault\",os_type=\"linux\"} 1"
        ));
        assert!(text.contains("secret_memory_bytes{kind=\"memfd_secret\"}"));
    }
}
