//! The figures operators watch, as Prometheus metrics on every service's `GET /metrics`.
//!
//! One set per process: a service only moves its own figures, and the all-in-one process shows
//! every service's on one page. Encoded with `prometheus-client` (the Prometheus project's Rust
//! client: OpenMetrics text, typed metrics, no unsafe global macros).

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    /// Events made durable for ingest (HTTP and WebSocket publishes).
    pub events_in: Counter,
    /// Duplicate publishes answered from the idempotency window.
    pub duplicates: Counter,
    /// `POST /v1/events` time to answer, seconds.
    pub publish_seconds: Histogram,
    /// From the store's commit of an event to its hand-off to a gateway's connections, seconds.
    pub delivery_lag_seconds: Histogram,
    /// Event frames written to WebSocket connections.
    pub events_out: Counter,
    pub connections: Gauge,
    pub subscriptions: Gauge,
    /// Backbone subscriptions this gateway holds (channels, patterns, groups in use).
    pub backbone_topics: Gauge,
    pub slow_consumer_closes: Counter,
    /// Gaps in a channel's seq repaired from the store (lost backbone messages).
    pub gap_refills: Counter,
    /// Events the tail check found in the store that the backbone never brought.
    pub tail_refills: Counter,
    pub backbone_reconnects: Counter,
    /// Appended events, and per group commit: its size and its fdatasync time.
    pub store_appended: Counter,
    pub store_batch_events: Histogram,
    pub store_fsync_seconds: Histogram,
    /// Appends a store client sent in one call together with others (separate ingest, whose
    /// concurrent small appends are combined): beside `events_in`, how much combining happens.
    pub store_combined_appends: Counter,
    /// Bytes of log segments on disk (updated at each retention pass).
    pub store_log_bytes: Gauge,
    /// Backbone messages dropped: not an eventbus event (malformed), or announcing a seq the store
    /// does not have (beyond its head).
    pub backbone_malformed: Counter,
    pub backbone_beyond_head: Counter,
    /// Connections closed at once because the listener was at its connection cap.
    pub connections_refused: Counter,
    /// Committed events not handed to the backbone because its queue was full.
    pub store_backbone_dropped: Counter,
    /// Events waiting to be delivered to webhooks, all webhooks together.
    pub webhook_backlog: Gauge,
    /// Webhook POSTs that failed (each retry counts).
    pub webhook_failures: Counter,
    /// Questions to the application's hooks (labels `hook`: connect, subscribe, publish;
    /// `outcome`: allowed, refused, unavailable).
    pub app_hook_requests: Family<Vec<(String, String)>, Counter>,
    /// Per durable group (label `group`): events not done yet.
    pub group_backlog: Family<Vec<(String, String)>, Gauge>,
    /// Per durable group: events held by members now.
    pub group_in_flight: Family<Vec<(String, String)>, Gauge>,
    /// Per durable group: events sent to its dead-letter channel, in all.
    pub group_dead: Family<Vec<(String, String)>, Gauge>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("eventbus");
        let seconds = || Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let m = Metrics {
            events_in: Counter::default(),
            duplicates: Counter::default(),
            publish_seconds: seconds(),
            delivery_lag_seconds: seconds(),
            events_out: Counter::default(),
            connections: Gauge::default(),
            subscriptions: Gauge::default(),
            backbone_topics: Gauge::default(),
            slow_consumer_closes: Counter::default(),
            gap_refills: Counter::default(),
            tail_refills: Counter::default(),
            backbone_reconnects: Counter::default(),
            store_appended: Counter::default(),
            store_batch_events: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            store_fsync_seconds: seconds(),
            store_combined_appends: Counter::default(),
            store_log_bytes: Gauge::default(),
            store_backbone_dropped: Counter::default(),
            connections_refused: Counter::default(),
            backbone_malformed: Counter::default(),
            backbone_beyond_head: Counter::default(),
            webhook_backlog: Gauge::default(),
            webhook_failures: Counter::default(),
            app_hook_requests: Family::default(),
            group_backlog: Family::default(),
            group_in_flight: Family::default(),
            group_dead: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "events_in",
            "Events made durable through ingest",
            m.events_in.clone(),
        );
        r.register(
            "duplicate_publishes",
            "Publishes answered as duplicates of an earlier id",
            m.duplicates.clone(),
        );
        r.register(
            "publish_seconds",
            "Time to answer POST /v1/events (fsync included)",
            m.publish_seconds.clone(),
        );
        r.register(
            "delivery_lag_seconds",
            "From the store's commit of an event to its hand-off to a gateway's connections (clocks of two hosts: NTP skew included)",
            m.delivery_lag_seconds.clone(),
        );
        r.register(
            "events_out",
            "Event frames written to WebSocket connections",
            m.events_out.clone(),
        );
        r.register(
            "gateway_connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        r.register(
            "gateway_subscriptions",
            "Subscriptions of open connections",
            m.subscriptions.clone(),
        );
        r.register(
            "gateway_backbone_topics",
            "Backbone subscriptions held by this gateway",
            m.backbone_topics.clone(),
        );
        r.register(
            "slow_consumer_closes",
            "Connections closed with 4008 because their queue filled",
            m.slow_consumer_closes.clone(),
        );
        r.register(
            "gap_refills",
            "Gaps in a channel's seq filled from the store",
            m.gap_refills.clone(),
        );
        r.register(
            "tail_refills",
            "Events the backbone never brought, found by the tail check",
            m.tail_refills.clone(),
        );
        r.register(
            "backbone_reconnects",
            "Reconnections to NATS",
            m.backbone_reconnects.clone(),
        );
        r.register(
            "store_appended_events",
            "Events appended to the log",
            m.store_appended.clone(),
        );
        r.register(
            "store_batch_events",
            "Events per group commit",
            m.store_batch_events.clone(),
        );
        r.register(
            "store_combined_appends",
            "Appends sent to the store in one call together with others",
            m.store_combined_appends.clone(),
        );
        r.register(
            "store_fsync_seconds",
            "fdatasync time per group commit",
            m.store_fsync_seconds.clone(),
        );
        r.register(
            "store_log_bytes",
            "Bytes of log segments on disk (updated at each retention pass)",
            m.store_log_bytes.clone(),
        );
        r.register(
            "backbone_malformed",
            "Backbone messages dropped because they are not eventbus events",
            m.backbone_malformed.clone(),
        );
        r.register(
            "backbone_beyond_head",
            "Backbone messages dropped because they announce a seq the store does not have",
            m.backbone_beyond_head.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed at once because a listener was at its connection cap (EVENTBUS_MAX_CONNECTIONS)",
            m.connections_refused.clone(),
        );
        r.register(
            "store_backbone_dropped_events",
            "Committed events not handed to the backbone because its queue was full (gateways refill them from the log)",
            m.store_backbone_dropped.clone(),
        );
        r.register(
            "webhook_backlog",
            "Events waiting to be delivered to webhooks",
            m.webhook_backlog.clone(),
        );
        r.register(
            "webhook_failures",
            "Webhook deliveries that failed (each attempt)",
            m.webhook_failures.clone(),
        );
        r.register(
            "app_hook_requests",
            "Questions to the application's hooks, by hook and outcome",
            m.app_hook_requests.clone(),
        );
        r.register(
            "group_backlog",
            "Events of a durable group not done yet",
            m.group_backlog.clone(),
        );
        r.register(
            "group_in_flight",
            "Events of a durable group held by its members",
            m.group_in_flight.clone(),
        );
        r.register(
            "group_dead_letters",
            "Events of a durable group sent to its dead-letter channel",
            m.group_dead.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text of every figure.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_is_exposed_with_its_type() {
        let m = metrics();
        m.events_in.inc();
        m.store_fsync_seconds.observe(0.0003);
        m.connections.inc();
        let text = m.encode();
        for needle in [
            "# TYPE eventbus_events_in counter",
            "eventbus_events_in_total ",
            "# TYPE eventbus_store_fsync_seconds histogram",
            "eventbus_store_fsync_seconds_bucket{le=\"0.0004\"}",
            "# TYPE eventbus_gateway_connections gauge",
            "eventbus_slow_consumer_closes_total 0",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
