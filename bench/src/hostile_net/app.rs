//! The app's side of the test bed: a running passage-client and the
//! requests the scenarios send through it, time and check.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};

use super::procs::{Health, Outcome, Transport};
use crate::http::{HttpClient, empty};
use crate::stack::Proc;

/// A running passage-client (killed when dropped) and the app's view of it.
pub struct Client {
    pub(super) _proc: Proc,
    pub(super) base: String,
    pub(super) metrics_url: String,
    pub(super) http: HttpClient,
    /// When the process was started.
    pub started: Instant,
    /// The build has one transport: a missing transport field means QUIC.
    pub(super) implied_quic: bool,
}

/// The marker of the mock upstream's chat completion.
const CHAT_ANSWER: &str = "Hello from the mock upstream";
/// Chunks of the mock's streamed chat completion (`SSE_CHUNKS` in tests/src/mock_upstream/mod.rs).
const CHAT_CHUNKS: u64 = 10;

impl Client {
    /// `GET /healthz`.
    pub async fn health(&self) -> anyhow::Result<Health> {
        let request = Request::get(format!("{}/healthz", self.base)).body(empty())?;
        let response =
            tokio::time::timeout(Duration::from_secs(2), self.http.request(request)).await??;
        let status = response.status();
        let body = tokio::time::timeout(Duration::from_secs(2), response.into_body().collect())
            .await??
            .to_bytes();
        let json: serde_json::Value =
            serde_json::from_slice(&body).context("/healthz is not JSON")?;
        let transport = json["transport"]
            .as_str()
            .or_else(|| json["relays"][0]["transport"].as_str())
            .map(str::to_owned);
        Ok(Health {
            up: status == 200 && json["status"] == "ok",
            transport,
        })
    }

    /// The Prometheus text of the client's metrics.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let request = Request::get(&self.metrics_url).body(empty())?;
        let response =
            tokio::time::timeout(Duration::from_secs(2), self.http.request(request)).await??;
        let body = tokio::time::timeout(Duration::from_secs(2), response.into_body().collect())
            .await??
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// The transport new requests take now: `/healthz`'s, else the metrics',
    /// else QUIC when the build has no other. `None` while the tunnel is down.
    pub async fn transport(&self) -> Option<String> {
        let health = self.health().await.ok()?;
        if !health.up {
            return None;
        }
        if let Some(transport) = health.transport {
            return Some(transport);
        }
        if let Ok(text) = self.metrics().await
            && let Some(transport) = metric_transport(&text)
        {
            return Some(transport);
        }
        self.implied_quic.then(|| "quic".to_owned())
    }

    /// Sum of every series of counter `name` in the metrics (0 when absent).
    pub async fn counter(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .map_or(0.0, |text| metric_sum(&text, name))
    }

    /// Polls `/healthz` until it says ok; the time it took.
    pub async fn wait_up(&self, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if let Ok(health) = self.health().await
                && health.up
            {
                return Ok(start.elapsed());
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "the client's /healthz did not say ok within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until the tunnel is up on `transport` (any, for `Auto`).
    pub async fn wait_on(&self, transport: Transport, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let now = self.transport().await;
            match (&now, transport) {
                (Some(_), Transport::Auto) => return Ok(()),
                (Some(t), wanted) if t == wanted.name() => return Ok(()),
                _ => {}
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "the tunnel was not up on {} within {limit:?} (transport now: {})",
                transport.name(),
                now.as_deref().unwrap_or("none")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A plain chat completion, checked; gives up after `limit`.
    pub async fn chat(&self, limit: Duration) -> Outcome {
        let body = r#"{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}"#;
        self.post_chat(body, limit, |status, bytes| {
            if status == 200 && String::from_utf8_lossy(bytes).contains(CHAT_ANSWER) {
                Ok(())
            } else {
                Err(String::new())
            }
        })
        .await
    }

    /// A streamed chat completion; ok when every chunk arrived in order and
    /// the stream ended with `[DONE]`.
    pub async fn stream_chat(&self, limit: Duration) -> Outcome {
        let body =
            r#"{"model":"mock-model","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        self.post_chat(body, limit, |status, bytes| {
            if status != 200 {
                return Err(String::new());
            }
            check_chat_stream(bytes)
        })
        .await
    }

    /// Sends `body` to `/v1/chat/completions` and judges the whole answer
    /// with `check` (an `Err` carries what was wrong, or nothing for the status).
    async fn post_chat(
        &self,
        body: &'static str,
        limit: Duration,
        check: impl Fn(u16, &[u8]) -> Result<(), String>,
    ) -> Outcome {
        let sent = Instant::now();
        let request = match Request::post(format!("{}/v1/chat/completions", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())).boxed())
        {
            Ok(request) => request,
            Err(e) => return Outcome::failed(sent, None, format!("bad request: {e}")),
        };
        let exchange = async {
            let response = match self.http.request(request).await {
                Ok(response) => response,
                Err(e) => {
                    let mut outcome =
                        Outcome::failed(sent, None, format!("no answer: {}", error_chain(&e)));
                    outcome.not_listening = e.is_connect();
                    return outcome;
                }
            };
            let status = response.status().as_u16();
            match response.into_body().collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    match check(status, &bytes) {
                        Ok(()) => Outcome {
                            ok: true,
                            status: Some(status),
                            detail: status.to_string(),
                            sent,
                            ended: Instant::now(),
                            not_listening: false,
                        },
                        Err(problem) if problem.is_empty() => {
                            Outcome::failed(sent, Some(status), describe_error(status, &bytes))
                        }
                        Err(problem) => Outcome::failed(sent, Some(status), problem),
                    }
                }
                Err(e) => Outcome::failed(
                    sent,
                    Some(status),
                    format!("{status}, body cut: {}", error_chain(&e)),
                ),
            }
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::failed(sent, None, format!("no answer within {limit:?}")),
        }
    }

    /// Sends chat completions until one gets an answer (retrying only while
    /// the client is not listening yet): the app's first request.
    pub async fn first_chat(&self, limit: Duration) -> Outcome {
        let start = Instant::now();
        loop {
            let left = limit.saturating_sub(start.elapsed());
            let outcome = self.chat(left).await;
            if !outcome.not_listening || start.elapsed() >= limit {
                return outcome;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Downloads `bytes` pattern bytes from the mock's `/download`, checking
    /// every byte against the pattern.
    pub async fn download(&self, bytes: u64, limit: Duration) -> Outcome {
        let sent = Instant::now();
        let exchange = async {
            let request = Request::get(format!("{}/download?bytes={bytes}", self.base))
                .body(empty())
                .context("building the request")?;
            let response = self.http.request(request).await.context("no answer")?;
            let status = response.status().as_u16();
            anyhow::ensure!(status == 200, "status {status}");
            let mut body = response.into_body();
            let mut offset = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.with_context(|| format!("body cut at {offset} bytes"))?;
                if let Ok(data) = frame.into_data() {
                    for (i, byte) in data.iter().enumerate() {
                        let at = offset + i as u64;
                        anyhow::ensure!(*byte == pattern_byte(at), "byte {at} differs");
                    }
                    offset += data.len() as u64;
                }
            }
            anyhow::ensure!(offset == bytes, "got {offset} of {bytes} bytes");
            Ok(())
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(Ok(())) => Outcome {
                ok: true,
                status: Some(200),
                detail: format!("{} KiB intact", bytes >> 10),
                sent,
                ended: Instant::now(),
                not_listening: false,
            },
            Ok(Err(e)) => Outcome::failed(sent, None, format!("download: {e:#}")),
            Err(_) => Outcome::failed(sent, None, format!("download not done within {limit:?}")),
        }
    }

    /// Reads `/v1/stamped` (`chunks` events `interval_ms` apart); ok when
    /// every event arrived, in order. `first` is told when the first arrives.
    pub async fn stamped(
        &self,
        chunks: u64,
        interval_ms: u64,
        limit: Duration,
        first: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Outcome {
        let url = format!(
            "{}/v1/stamped?chunks={chunks}&interval_ms={interval_ms}",
            self.base
        );
        self.read_events(&url, Some(chunks), limit, first).await
    }

    /// Reads `/v1/endless` (an event every 100 ms, forever) until it breaks
    /// or `limit` passes; never ok. `first` is told when the first event arrives.
    pub async fn endless(
        &self,
        limit: Duration,
        first: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Outcome {
        let url = format!("{}/v1/endless?interval_ms=100", self.base);
        self.read_events(&url, None, limit, first).await
    }

    async fn read_events(
        &self,
        url: &str,
        expected: Option<u64>,
        limit: Duration,
        mut first: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Outcome {
        let sent = Instant::now();
        let mut events = 0u64;
        let exchange = async {
            let request = Request::get(url)
                .body(empty())
                .context("building the request")?;
            let response = self.http.request(request).await.context("no answer")?;
            let status = response.status().as_u16();
            anyhow::ensure!(status == 200, "status {status}");
            let mut body = response.into_body();
            let mut text = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))?;
                if let Ok(data) = frame.into_data() {
                    text.extend_from_slice(&data);
                    // Count whole events; keep a partial one for later.
                    while let Some(end) = find(&text, b"\n\n") {
                        let event: Vec<u8> = text.drain(..end + 2).collect();
                        if expected.is_some() {
                            let want = format!("\"seq\":{events},");
                            anyhow::ensure!(
                                String::from_utf8_lossy(&event).contains(&want),
                                "event {events} out of order"
                            );
                        }
                        events += 1;
                        if let Some(first) = first.take() {
                            let _ = first.send(());
                        }
                    }
                }
            }
            Ok(())
        };
        let result = tokio::time::timeout(limit, exchange).await;
        let of = expected.map_or(String::new(), |n| format!("/{n}"));
        match result {
            Ok(Ok(())) if expected == Some(events) => Outcome {
                ok: true,
                status: Some(200),
                detail: format!("intact ({events}{of} events)"),
                sent,
                ended: Instant::now(),
                not_listening: false,
            },
            Ok(Ok(())) => Outcome::failed(
                sent,
                Some(200),
                format!("ended cleanly after {events}{of} events"),
            ),
            Ok(Err(e)) => Outcome::failed(sent, None, format!("cut after {events}{of}: {e:#}")),
            Err(_) => Outcome::failed(
                sent,
                None,
                format!("still open after {limit:?} ({events}{of} events)"),
            ),
        }
    }
}

/// Checks the mock's streamed chat completion: chunks 0..10 in order, then `[DONE]`.
fn check_chat_stream(bytes: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(bytes);
    let mut next = 0u64;
    let mut done = false;
    for event in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = event
            .strip_prefix("data: ")
            .ok_or_else(|| format!("not an SSE data event: {event:.40}"))?;
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: serde_json::Value =
            serde_json::from_str(data).map_err(|e| format!("chunk {next} is not JSON: {e}"))?;
        if chunk["sequence"].as_u64() != Some(next) {
            return Err(format!("chunk {next} missing or out of order"));
        }
        next += 1;
    }
    if next != CHAT_CHUNKS || !done {
        return Err(format!(
            "stream incomplete: {next}/{CHAT_CHUNKS} chunks, done={done}"
        ));
    }
    Ok(())
}

/// `503 tunnel_unavailable` from an OpenAI-shaped error body, else the status.
fn describe_error(status: u16, bytes: &[u8]) -> String {
    let code = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
    match code {
        Some(code) => format!("{status} {code}"),
        None => status.to_string(),
    }
}

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Byte `i` of every mock `/download` (`pattern_bytes` in tests/src/mock_upstream.rs).
fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// The transport whose `passage_client_tunnel_transport` series is 1.
fn metric_transport(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("passage_client_tunnel_transport{")?;
        let (labels, value) = rest.split_once('}')?;
        if value.trim().parse::<f64>().ok()? != 1.0 {
            return None;
        }
        let at = labels.find("transport=\"")? + "transport=\"".len();
        let end = labels[at..].find('"')?;
        Some(labels[at..at + end].to_owned())
    })
}

/// Sum of every series of `name` in Prometheus `text`.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = if let Some(labelled) = rest.strip_prefix('{') {
                labelled.split_once('}')?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read() {
        let text = "# HELP x\n\
            passage_client_tunnel_transport{relay=\"198.18.0.2:4433\",transport=\"quic\"} 0\n\
            passage_client_tunnel_transport{relay=\"198.18.0.2:4433\",transport=\"tcp\"} 1\n\
            passage_client_quic_probes_total{relay=\"a\",result=\"ok\"} 2\n\
            passage_client_quic_probes_total{relay=\"a\",result=\"failed\"} 3\n\
            passage_client_quic_probes_total_created 9\n";
        assert_eq!(metric_transport(text).as_deref(), Some("tcp"));
        assert_eq!(metric_sum(text, "passage_client_quic_probes_total"), 5.0);
        assert_eq!(metric_sum(text, "passage_client_absent"), 0.0);
    }

    #[test]
    fn chat_streams_are_checked() {
        let mut body = String::new();
        for i in 0..CHAT_CHUNKS {
            body.push_str(&format!("data: {{\"sequence\":{i}}}\n\n"));
        }
        assert!(check_chat_stream(body.as_bytes()).is_err(), "no [DONE]");
        body.push_str("data: [DONE]\n\n");
        assert_eq!(check_chat_stream(body.as_bytes()), Ok(()));
        let cut = body.replace("data: {\"sequence\":4}\n\n", "");
        assert!(check_chat_stream(cut.as_bytes()).is_err());
    }

    #[test]
    fn pattern_matches_the_mock() {
        // Values of tests/src/mock_upstream.rs's pattern_bytes, computed apart.
        let bytes: Vec<u8> = [0, 1, 2, 3, 1_000_003]
            .into_iter()
            .map(pattern_byte)
            .collect();
        assert_eq!(bytes, [0, 187, 119, 51, 27]);
    }
}
