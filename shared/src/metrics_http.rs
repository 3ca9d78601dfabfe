//! `--metrics ADDR`: a small HTTP endpoint that serves Prometheus text
//! (OpenMetrics) at `GET /metrics`, for both programs, and the relay's
//! health as JSON at `GET /healthz`. A request that
//! arrives over loopback must carry a `Host` naming this machine, so a web
//! page cannot read the metrics through a DNS name rebound to 127.0.0.1;
//! scrapers from elsewhere use whatever name they like.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::loopback_host::is_loopback_host;

/// Most metrics connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// Renders the current metrics as OpenMetrics text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A latency histogram as both programs keep them: buckets (seconds) from
/// 1 ms doubling to about 9 min.
pub fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 20,
    ))
}

/// Registers `metric` in `registry` under `name` with `help`, and hands it
/// back, so a metrics struct is built one field at a time.
pub fn registered<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// The `--metrics` address, bound at start (so a bad address fails then)
/// and served once the program runs.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
}

/// The metrics address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}")]
pub struct MetricsBindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why binding failed.
    #[source]
    pub source: std::io::Error,
}

impl MetricsListener {
    /// Binds `addr`, if metrics are asked for; must run inside a tokio
    /// runtime.
    pub fn bind(addr: Option<SocketAddr>) -> Result<Option<Self>, MetricsBindError> {
        let Some(addr) = addr else { return Ok(None) };
        let bound = std::net::TcpListener::bind(addr)
            .and_then(|listener| {
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)
            })
            .map_err(|source| MetricsBindError { addr, source })?;
        Ok(Some(MetricsListener { listener: bound }))
    }

    /// The address bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves `render`'s output at `/metrics` (and `health`'s JSON, if
    /// given, at `/healthz`) in a task of its own until `shutdown`.
    pub fn spawn(
        self,
        render: Render,
        health: Option<Render>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(serve(self.listener, render, health, shutdown))
    }
}

/// Serves `render`'s output at `/metrics` (and `health`'s JSON, if given,
/// at `/healthz`) on `listener` until `shutdown`.
async fn serve(
    listener: TcpListener,
    render: Render,
    health: Option<Render>,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics at http://{addr}/metrics");
    }
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Scrapers are few; more connections than this are not.
            continue;
        };
        let render = render.clone();
        let health = health.clone();
        // Over loopback whatever address the listener has (a wildcard one
        // takes loopback connections too).
        let loopback = stream
            .local_addr()
            .is_ok_and(|addr| addr.ip().to_canonical().is_loopback());
        let service =
            hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let render = render.clone();
                let health = health.clone();
                let foreign_host = loopback
                    && request
                        .headers()
                        .get(header::HOST)
                        .is_some_and(|host| !is_loopback_host(host.as_bytes()));
                async move {
                    Ok::<_, Infallible>(if foreign_host {
                        plain(
                            StatusCode::FORBIDDEN,
                            "text/plain",
                            Bytes::from_static(b"the Host header must name this machine\n"),
                        )
                    } else {
                        answer(
                            request.method(),
                            request.uri().path(),
                            &render,
                            health.as_ref(),
                        )
                    })
                }
            });
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "metrics connection failed");
            }
        });
    }
}

fn answer(
    method: &Method,
    path: &str,
    render: &Render,
    health: Option<&Render>,
) -> Response<Full<Bytes>> {
    let health = health.filter(|_| path == "/healthz");
    let (status, content_type, body) = if path != "/metrics" && health.is_none() {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found; try /metrics\n"),
        )
    } else if method != Method::GET && method != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"GET only\n"),
        )
    } else if let Some(health) = health {
        (StatusCode::OK, "application/json", Bytes::from(health()))
    } else {
        (StatusCode::OK, CONTENT_TYPE, Bytes::from(render()))
    };
    plain(status, content_type, body)
}

fn plain(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
