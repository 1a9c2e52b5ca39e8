//! Prometheus plumbing shared by the API and the worker. Each process owns
//! its [`Registry`] (no global one), made here so that every series carries
//! the build `version` as a label: a Grafana panel can put a task type's
//! run time under this release next to the last one. Process metrics
//! (resident memory, CPU, open files) and `warren_build_info` come along.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use std::collections::HashMap;

pub use prometheus::{Error as MetricsError, Histogram, IntCounter};

/// Rows per batched statement (group commit): 1 when idle, up to a few
/// hundred under load.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 512.0];

/// Seconds, from a quarter millisecond: one write on the request path,
/// where a millisecond more or less is what matters.
pub const WRITE_SECONDS_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Seconds, from a millisecond to ten minutes: task run times, HTTP
/// requests, database writes and confirms all fit.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 600.0,
];

/// A registry whose every series is labelled `version`, with process
/// metrics and `warren_build_info{component}` registered.
pub fn registry(component: &str) -> Result<Registry, MetricsError> {
    let labels = HashMap::from([("version".to_owned(), crate::VERSION.to_owned())]);
    let registry = Registry::new_custom(None, Some(labels))?;
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let info = IntGauge::with_opts(
        Opts::new(
            "warren_build_info",
            "Always 1; labelled with the build's version.",
        )
        .const_label("component", component),
    )?;
    info.set(1);
    register(&registry, info)?;
    Ok(registry)
}

pub fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    c: C,
) -> Result<C, MetricsError> {
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

pub fn counters(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
}

pub fn seconds(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<HistogramVec, MetricsError> {
    let opts = HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec());
    register(registry, HistogramVec::new(opts, labels)?)
}

pub fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
    register(registry, IntGauge::new(name, help)?)
}

/// This process's PostgreSQL pool, read at every scrape:
/// `warren_db_pool_connections{state="busy"|"idle"}` and
/// `warren_db_pool_max_connections`. A pool that stays fully busy is why
/// tasks wait although slots are free; see also `warren_postgres_connections`.
pub fn register_pool(
    registry: &Registry,
    db: &crate::db::Connection,
    max: u32,
) -> Result<(), MetricsError> {
    let collector = PoolCollector {
        pool: db.get_postgres_connection_pool().clone(),
        connections: IntGaugeVec::new(
            Opts::new(
                "warren_db_pool_connections",
                "Connections of this process's PostgreSQL pool, busy or idle.",
            ),
            &["state"],
        )?,
        max: IntGauge::new(
            "warren_db_pool_max_connections",
            "The pool's ceiling (database.max_connections).",
        )?,
    };
    collector.max.set(i64::from(max));
    registry.register(Box::new(collector))
}

struct PoolCollector {
    pool: sea_orm::sqlx::PgPool,
    connections: IntGaugeVec,
    max: IntGauge,
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.connections.desc();
        descs.extend(self.max.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let size = i64::from(self.pool.size());
        let idle = i64::try_from(self.pool.num_idle()).unwrap_or(size);
        self.connections.with_label_values(&["idle"]).set(idle);
        self.connections
            .with_label_values(&["busy"])
            .set((size - idle).max(0));
        let mut families = self.connections.collect();
        families.extend(self.max.collect());
        families
    }
}

/// The exposition text (format 0.0.4) of everything registered.
pub fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    // Encoding into a Vec fails only for metrics that violate the text
    // format, which registration already rejects.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_carries_the_version() {
        let r = registry("test").unwrap();
        let c = counters(&r, "warren_test_total", "A test.", &["kind"]).unwrap();
        c.with_label_values(&["a"]).inc();
        let text = encode(&r);
        let version = format!("version=\"{}\"", crate::VERSION);
        let series: Vec<&str> = text.lines().filter(|l| l.starts_with("warren_")).collect();
        assert_eq!(series.len(), 2, "{text}");
        assert!(series.iter().all(|l| l.contains(&version)), "{text}");
        assert!(
            text.contains("warren_build_info{component=\"test\""),
            "{text}"
        );
    }
}
