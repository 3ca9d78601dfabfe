//! The relay's Prometheus metrics (served with `--metrics ADDR`): requests
//! and latency by client and status, time to first byte, active streams
//! and connections, bytes, handshake failures by reason, refusals by rule,
//! and usage (requests, errors, tokens, bytes) by client and model.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use passage_shared::metrics_http::{latency_histogram, registered};

use crate::usage::Usage;

/// Most distinct model labels kept; further models count as `other`, so
/// the metrics cannot grow without bound.
const MAX_MODELS: usize = 256;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientStatus {
    client: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabel {
    client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientDirection {
    client: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientCode {
    client: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientModel {
    client: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientModelKind {
    client: String,
    model: String,
    kind: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// What one finished request adds to the metrics.
#[derive(Debug)]
pub struct RequestFigures<'a> {
    /// The client's name.
    pub client: &'a str,
    /// The model asked for, if known.
    pub model: Option<&'a str>,
    /// The status the app got (0: none, the client went away first).
    pub status: u16,
    /// Whether the request failed (a passage error, an upstream 4xx/5xx, cut short).
    pub failed: bool,
    /// Seconds to the response head, if one was sent.
    pub ttfb_s: Option<f64>,
    /// Seconds from the request head to the end.
    pub duration_s: f64,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// Tokens the upstream reported.
    pub usage: Option<Usage>,
}

/// The relay's metrics and their registry.
#[derive(Debug)]
pub struct RelayMetrics {
    registry: Registry,
    requests: Family<ClientStatus, Counter>,
    duration: Histograms<ClientStatus>,
    ttfb: Histograms<ClientLabel>,
    /// Request streams being served.
    pub active_streams: Gauge,
    /// Client connections open.
    pub connections: Gauge,
    bytes: Family<ClientDirection, Counter>,
    handshake_failures: Family<ReasonLabel, Counter>,
    refusals: Family<ClientCode, Counter>,
    usage: UsageByModel,
    state_up: Gauge,
    certificate_expiry: Gauge,
    state_failures: Counter,
    ledger_dropped: Counter,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayMetrics {
    /// Makes the metrics, registered under the `passage_relay` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("passage_relay");
        let r = &mut registry;
        RelayMetrics {
            requests: registered(
                r,
                "requests",
                "Requests served, by client and status",
                Family::default(),
            ),
            duration: registered(
                r,
                "request_duration_seconds",
                "Time from the request head to the end of the response",
                Histograms::new_with_constructor(latency_histogram),
            ),
            ttfb: registered(
                r,
                "time_to_first_byte_seconds",
                "Time from the request head to the response head",
                Histograms::new_with_constructor(latency_histogram),
            ),
            active_streams: registered(
                r,
                "active_streams",
                "Request streams being served",
                Gauge::default(),
            ),
            connections: registered(
                r,
                "connections",
                "Client connections open",
                Gauge::default(),
            ),
            bytes: registered(
                r,
                "body_bytes",
                "Body bytes, by client and direction (in: request, out: response)",
                Family::default(),
            ),
            handshake_failures: registered(
                r,
                "handshake_failures",
                "Connection attempts refused or failed, by reason",
                Family::default(),
            ),
            refusals: registered(
                r,
                "refusals",
                "Requests refused by policy or rate limit, by client and error code",
                Family::default(),
            ),
            usage: UsageByModel::registered(r),
            state_up: registered(
                r,
                "state_up",
                "1 while the state store works as configured, 0 while it is unreachable (limits then fall back to this relay's own, or refuse)",
                Gauge::default(),
            ),
            state_failures: registered(
                r,
                "state_failures",
                "Times the state store failed or did not answer within 250 ms",
                Counter::default(),
            ),
            certificate_expiry: registered(
                r,
                "certificate_expiry_seconds",
                "Seconds until the relay's certificate expires (negative once it has)",
                Gauge::default(),
            ),
            ledger_dropped: registered(
                r,
                "ledger_dropped",
                "Usage ledger entries lost (the writer was behind, or the store was unreachable)",
                Counter::default(),
            ),
            registry,
        }
    }

    /// The metrics as OpenMetrics text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// A renderer for [`passage_shared::metrics_http::serve`] that first
    /// reads the state store's figures and the certificate's expiry.
    pub fn renderer(
        self: &Arc<Self>,
        state: Arc<dyn crate::state::StateStore>,
        expiry: passage_shared::cert_expiry::CertificateExpiry,
    ) -> passage_shared::metrics_http::Render {
        let metrics = self.clone();
        Arc::new(move || {
            metrics.observe_state(&*state);
            metrics.certificate_expiry.set(expiry.seconds_left());
            metrics.render()
        })
    }

    /// Brings the state gauges and counters up to the store's figures.
    fn observe_state(&self, state: &dyn crate::state::StateStore) {
        let up = matches!(state.health(), crate::state::StoreHealth::Ok);
        self.state_up.set(i64::from(up));
        let counts = state.counts();
        for (counter, now) in [
            (&self.state_failures, counts.failures),
            (&self.ledger_dropped, counts.ledger_dropped),
        ] {
            let seen = counter.get();
            if now > seen {
                counter.inc_by(now - seen);
            }
        }
    }

    /// Counts a refused or failed connection attempt.
    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a request refused by a rule or limit.
    pub fn refused(&self, client: &str, code: &'static str) {
        self.refusals
            .get_or_create(&ClientCode {
                client: client.to_owned(),
                code,
            })
            .inc();
    }

    /// Adds a finished request.
    pub fn record(&self, figures: &RequestFigures<'_>) {
        let client = figures.client.to_owned();
        let by_status = ClientStatus {
            client: client.clone(),
            status: figures.status,
        };
        self.requests.get_or_create(&by_status).inc();
        self.duration
            .get_or_create(&by_status)
            .observe(figures.duration_s);
        if let Some(ttfb) = figures.ttfb_s {
            self.ttfb
                .get_or_create(&ClientLabel {
                    client: client.clone(),
                })
                .observe(ttfb);
        }
        for (direction, count) in [("in", figures.bytes_in), ("out", figures.bytes_out)] {
            self.bytes
                .get_or_create(&ClientDirection {
                    client: client.clone(),
                    direction,
                })
                .inc_by(count);
        }
        self.usage.record(figures);
    }
}

/// Requests, errors, tokens and bytes by client and model, with model
/// labels capped at [`MAX_MODELS`].
#[derive(Debug)]
struct UsageByModel {
    requests: Family<ClientModel, Counter>,
    errors: Family<ClientModel, Counter>,
    tokens: Family<ClientModelKind, Counter>,
    bytes: Family<ClientModelKind, Counter>,
    models: Mutex<HashSet<String>>,
}

impl UsageByModel {
    /// Makes the usage metrics, registered in `registry`.
    fn registered(registry: &mut Registry) -> Self {
        UsageByModel {
            requests: registered(
                registry,
                "usage_requests",
                "Requests by client and model",
                Family::default(),
            ),
            errors: registered(
                registry,
                "usage_errors",
                "Requests that failed (passage or upstream 4xx/5xx, or cut short), by client and model",
                Family::default(),
            ),
            tokens: registered(
                registry,
                "usage_tokens",
                "Tokens the upstream reported, by client, model and kind (prompt, completion)",
                Family::default(),
            ),
            bytes: registered(
                registry,
                "usage_bytes",
                "Body bytes by client, model and kind (in, out)",
                Family::default(),
            ),
            models: Mutex::new(HashSet::new()),
        }
    }

    /// The label for `model`: itself once the upstream has answered a
    /// request for it with success (so made-up names never become
    /// labels) and while fewer than [`MAX_MODELS`] are known; else `other`.
    fn model_label(&self, model: Option<&str>, succeeded: bool) -> String {
        let Some(model) = model else {
            return "unknown".to_owned();
        };
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        if models.contains(model) || (succeeded && models.len() < MAX_MODELS) {
            models.insert(model.to_owned());
            model.to_owned()
        } else {
            "other".to_owned()
        }
    }

    /// Adds a finished request.
    fn record(&self, figures: &RequestFigures<'_>) {
        let client = figures.client;
        let model = self.model_label(figures.model, (200..300).contains(&figures.status));
        let by_model = ClientModel {
            client: client.to_owned(),
            model: model.clone(),
        };
        self.requests.get_or_create(&by_model).inc();
        if figures.failed {
            self.errors.get_or_create(&by_model).inc();
        }
        let usage = figures.usage.unwrap_or_default();
        for (kind, count) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            self.tokens
                .get_or_create(&ClientModelKind {
                    client: client.to_owned(),
                    model: model.clone(),
                    kind,
                })
                .inc_by(count);
        }
        for (kind, count) in [("in", figures.bytes_in), ("out", figures.bytes_out)] {
            self.bytes
                .get_or_create(&ClientModelKind {
                    client: client.to_owned(),
                    model: model.clone(),
                    kind,
                })
                .inc_by(count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(model: &str, status: u16) -> RequestFigures<'_> {
        RequestFigures {
            client: "app",
            model: Some(model),
            status,
            failed: status >= 400,
            ttfb_s: None,
            duration_s: 0.1,
            bytes_in: 0,
            bytes_out: 0,
            usage: None,
        }
    }

    #[test]
    fn only_models_the_upstream_served_become_labels() {
        let metrics = RelayMetrics::new();
        metrics.record(&figures("made-up-model", 404));
        metrics.record(&figures("gpt-4o-mini", 200));
        metrics.record(&figures("gpt-4o-mini", 429));
        let text = metrics.render();
        assert!(!text.contains("made-up-model"), "{text}");
        assert!(
            text.contains(r#"passage_relay_usage_errors_total{client="app",model="other"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"passage_relay_usage_errors_total{client="app",model="gpt-4o-mini"} 1"#
            ),
            "{text}"
        );
    }
}
