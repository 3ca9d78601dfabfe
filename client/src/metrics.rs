//! The client's Prometheus metrics (served with `--metrics ADDR`): requests
//! and latency by status, time to the response head, bytes, open streams,
//! and per relay the tunnel's RTT, state, reconnects and transport (with
//! fallbacks to TCP and QUIC probes counted).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use passage_shared::cert_expiry::CertificateExpiry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use passage_shared::metrics_http::{latency_histogram, registered};
use passage_shared::transport::TransportKind;

use crate::tunnel::Tunnel;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelayLabel {
    relay: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    relay: String,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabel {
    relay: String,
    result: &'static str,
}

/// The client's metrics and their registry.
#[derive(Debug)]
pub struct ClientMetrics {
    certificate_expiry: Gauge,
    registry: Registry,
    requests: Family<StatusLabel, Counter>,
    duration: Family<StatusLabel, Histogram, fn() -> Histogram>,
    ttfb: Histogram,
    bytes: Family<DirectionLabel, Counter>,
    active_streams: Gauge,
    rtt: Family<RelayLabel, Gauge<f64, AtomicU64>>,
    up: Family<RelayLabel, Gauge>,
    reconnects: Family<RelayLabel, Counter>,
    transport: Family<TransportLabel, Gauge>,
    fallbacks: Family<RelayLabel, Counter>,
    probes: Family<ProbeLabel, Counter>,
    /// One render at a time: it brings the reconnect counters up to date.
    rendering: std::sync::Mutex<()>,
}

impl Default for ClientMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientMetrics {
    /// Makes the metrics, registered under the `passage_client` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("passage_client");
        let r = &mut registry;
        ClientMetrics {
            requests: registered(
                r,
                "requests",
                "Requests answered, by status",
                Family::default(),
            ),
            duration: registered(
                r,
                "request_duration_seconds",
                "Time from the request to the end of the response body, by status",
                Family::new_with_constructor(latency_histogram),
            ),
            ttfb: registered(
                r,
                "time_to_first_byte_seconds",
                "Time from the request to the response head",
                latency_histogram(),
            ),
            bytes: registered(
                r,
                "body_bytes",
                "Body bytes: up (request Content-Length), down (response body)",
                Family::default(),
            ),
            active_streams: registered(
                r,
                "active_streams",
                "Request streams open in the tunnel",
                Gauge::default(),
            ),
            rtt: registered(
                r,
                "tunnel_rtt_seconds",
                "The tunnel's round-trip time, by relay",
                Family::default(),
            ),
            up: registered(
                r,
                "tunnel_up",
                "1 while the link to the relay is usable",
                Family::default(),
            ),
            reconnects: registered(
                r,
                "tunnel_reconnects",
                "Connections to the relay established after the first",
                Family::default(),
            ),
            transport: registered(
                r,
                "tunnel_transport",
                "1 for the transport the link to the relay uses now (quic or tcp), 0 for the other",
                Family::default(),
            ),
            fallbacks: registered(
                r,
                "transport_fallbacks",
                "Times the link to the relay came up on TCP while QUIC was preferred",
                Family::default(),
            ),
            probes: registered(
                r,
                "quic_probes",
                "QUIC probes made while on TCP, by result (ok: the link moved to QUIC)",
                Family::default(),
            ),
            certificate_expiry: registered(
                r,
                "certificate_expiry_seconds",
                "Seconds until the client's certificate expires (negative once it has)",
                Gauge::default(),
            ),
            rendering: std::sync::Mutex::new(()),
            registry,
        }
    }

    /// The metrics as OpenMetrics text, with the tunnel's figures and the
    /// certificate's expiry as of now.
    pub fn render(&self, tunnel: &Tunnel, expiry: &CertificateExpiry) -> String {
        let _one_at_a_time = self
            .rendering
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.certificate_expiry.set(expiry.seconds_left());
        self.active_streams.set(tunnel.open_streams() as i64);
        for link in tunnel.links() {
            let label = RelayLabel {
                relay: link.address.clone(),
            };
            let usable = link.usable();
            self.up
                .get_or_create(&label)
                .set(i64::from(usable.is_some()));
            let in_use = usable.map(|(connection, _)| connection.kind());
            if let Some((connection, _)) = usable {
                self.rtt
                    .get_or_create(&label)
                    .set(connection.rtt().as_secs_f64());
            }
            for kind in [TransportKind::Quic, TransportKind::Tcp] {
                self.transport
                    .get_or_create(&TransportLabel {
                        relay: link.address.clone(),
                        transport: kind.name(),
                    })
                    .set(i64::from(in_use == Some(kind)));
            }
            catch_up(
                &self.reconnects.get_or_create(&label),
                link.established.saturating_sub(1),
            );
            catch_up(&self.fallbacks.get_or_create(&label), link.fallbacks);
            let probe = |result| ProbeLabel {
                relay: link.address.clone(),
                result,
            };
            catch_up(
                &self.probes.get_or_create(&probe("ok")),
                link.probes_succeeded,
            );
            catch_up(
                &self.probes.get_or_create(&probe("failed")),
                link.probes - link.probes_succeeded,
            );
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Counts a response head sent to the app; the returned guard records
    /// the duration when the response body ends or is dropped.
    pub fn answered(
        self: &Arc<Self>,
        status: u16,
        started: Instant,
        request_bytes: Option<u64>,
    ) -> RequestDone {
        self.requests.get_or_create(&StatusLabel { status }).inc();
        self.ttfb.observe(started.elapsed().as_secs_f64());
        if let Some(bytes) = request_bytes {
            self.bytes
                .get_or_create(&DirectionLabel { direction: "up" })
                .inc_by(bytes);
        }
        RequestDone {
            metrics: self.clone(),
            status,
            started,
            bytes: 0,
        }
    }
}

/// Brings a counter up to a total the tunnel keeps (counters only rise).
fn catch_up(counter: &Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// Records a request's duration and response bytes when dropped.
#[derive(Debug)]
pub struct RequestDone {
    metrics: Arc<ClientMetrics>,
    status: u16,
    started: Instant,
    bytes: u64,
}

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&StatusLabel {
                status: self.status,
            })
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics
            .bytes
            .get_or_create(&DirectionLabel { direction: "down" })
            .inc_by(self.bytes);
    }
}

/// A response body that tells the metrics when it is done.
#[derive(Debug)]
pub struct Observed<B> {
    inner: B,
    done: Option<RequestDone>,
}

impl<B> Observed<B> {
    /// Wraps `inner`; `done` (if metrics are on) records when the body ends.
    pub fn new(inner: B, done: Option<RequestDone>) -> Self {
        Observed { inner, done }
    }
}

impl<B> http_body::Body for Observed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let next = Pin::new(&mut self.inner).poll_frame(cx);
        match &next {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(done), Some(data)) = (self.done.as_mut(), frame.data_ref()) {
                    done.bytes += data.len() as u64;
                }
            }
            Poll::Ready(_) => {
                // The end (or an error): record now, not when hyper drops it.
                self.done = None;
            }
            Poll::Pending => {}
        }
        next
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
