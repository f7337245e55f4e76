//! Prometheus metrics (OpenMetrics text on `--metrics-address`, with `/healthz` beside it):
//! CSI calls by method and gRPC code with latency, Entra and Key Vault calls with outcome and
//! latency, the token cache, key events (generate, wrap, unwrap, evict, wipe, denial, lock,
//! unlock, reauthorize), and, computed at scrape time, volumes by state and by KEK version,
//! and pool space.
//!
//! One registry per process, reached through `metrics()`, so every layer can count without
//! threading a handle through the calls.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CallLabels {
    pub(crate) method: String,
    pub(crate) code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodLabels {
    pub(crate) method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub(crate) operation: String,
    pub(crate) outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OperationLabels {
    pub(crate) operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EventLabels {
    pub(crate) event: String,
    pub(crate) result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheLabels {
    pub(crate) result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabels {
    pub(crate) state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KekLabels {
    /// `vault-host/name`: the KEK (a key, or a keyvault-secret secret).
    pub(crate) kek: String,
    pub(crate) version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PoolLabels {
    pub(crate) pool: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) csi_calls: Family<CallLabels, Counter>,
    pub(crate) csi_latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
    pub(crate) azure_calls: Family<OutcomeLabels, Counter>,
    pub(crate) azure_latency: Family<OperationLabels, Histogram, fn() -> Histogram>,
    pub(crate) token_cache: Family<CacheLabels, Counter>,
    pub(crate) key_events: Family<EventLabels, Counter>,
    pub(crate) volumes: Family<StateLabels, Gauge>,
    pub(crate) volumes_by_kek: Family<KekLabels, Gauge>,
    pub(crate) volumes_abnormal: Gauge,
    pub(crate) pool_capacity: Family<PoolLabels, Gauge>,
    pub(crate) pool_free: Family<PoolLabels, Gauge>,
}

pub(crate) fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::with_prefix("sealvol");
        let m = Metrics {
            csi_calls: Family::default(),
            csi_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            azure_calls: Family::default(),
            azure_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            token_cache: Family::default(),
            key_events: Family::default(),
            volumes: Family::default(),
            volumes_by_kek: Family::default(),
            volumes_abnormal: Gauge::default(),
            pool_capacity: Family::default(),
            pool_free: Family::default(),
            registry: Registry::default(),
        };
        registry.register("csi_operations", "CSI calls by method and gRPC code", m.csi_calls.clone());
        registry.register("csi_operation_duration_seconds", "CSI call latency by method", m.csi_latency.clone());
        registry.register("azure_requests", "Entra ID and Key Vault calls by operation and outcome", m.azure_calls.clone());
        registry.register("azure_request_duration_seconds", "Entra ID and Key Vault call latency by operation", m.azure_latency.clone());
        registry.register("token_cache_lookups", "Access-token cache lookups by result", m.token_cache.clone());
        registry.register("key_events", "Key events (generate, wrap, unwrap, evict, wipe, denial, lock, unlock, reauthorize) by result", m.key_events.clone());
        registry.register("volumes", "Volumes on this node by state (created, staged, published)", m.volumes.clone());
        registry.register("volumes_by_kek_version", "Volumes on this node whose DEK is wrapped by each KEK version: an old version may be disabled once it counts none, on every node", m.volumes_by_kek.clone());
        registry.register("volumes_abnormal", "Mounted volumes whose filesystem recorded errors, or whose backing file was truncated or removed (NodeGetVolumeStats says why)", m.volumes_abnormal.clone());
        registry.register("pool_capacity_bytes", "Size of each pool", m.pool_capacity.clone());
        registry.register("pool_free_bytes", "Space each pool can still promise", m.pool_free.clone());
        Metrics { registry, ..m }
    })
}

impl Metrics {
    pub(crate) fn csi_call(&self, method: &str, code: &str, latency: Duration) {
        self.csi_calls
            .get_or_create(&CallLabels {
                method: method.into(),
                code: code.into(),
            })
            .inc();
        self.csi_latency
            .get_or_create(&MethodLabels {
                method: method.into(),
            })
            .observe(latency.as_secs_f64());
    }

    /// One Entra ID or Key Vault call (`operation` like "entra.token", "keyvault.unwrap").
    pub(crate) fn azure_call(&self, operation: &str, outcome: &str, latency: Duration) {
        self.azure_calls
            .get_or_create(&OutcomeLabels {
                operation: operation.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.azure_latency
            .get_or_create(&OperationLabels {
                operation: operation.into(),
            })
            .observe(latency.as_secs_f64());
    }

    pub(crate) fn cache_lookup(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.token_cache
            .get_or_create(&CacheLabels {
                result: result.into(),
            })
            .inc();
    }

    pub(crate) fn key_event(&self, event: &str, result: &str) {
        self.key_events
            .get_or_create(&EventLabels {
                event: event.into(),
                result: result.into(),
            })
            .inc();
    }

    pub(crate) fn set_volumes(&self, state: &str, n: i64) {
        self.volumes
            .get_or_create(&StateLabels {
                state: state.into(),
            })
            .set(n);
    }

    /// Replaces the per-KEK-version counts with `counts` ((kek, version) -> volumes).
    pub(crate) fn set_volumes_by_kek(
        &self,
        counts: &std::collections::BTreeMap<(String, String), i64>,
    ) {
        self.volumes_by_kek.clear();
        for ((kek, version), n) in counts {
            self.volumes_by_kek
                .get_or_create(&KekLabels {
                    kek: kek.clone(),
                    version: version.clone(),
                })
                .set(*n);
        }
    }

    pub(crate) fn set_pool(&self, pool: &str, capacity: u64, free: u64) {
        let labels = PoolLabels { pool: pool.into() };
        self.pool_capacity
            .get_or_create(&labels)
            .set(capacity as i64);
        self.pool_free.get_or_create(&labels).set(free as i64);
    }

    /// The OpenMetrics text of everything.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
