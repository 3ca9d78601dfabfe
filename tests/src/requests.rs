//! Requests the end-to-end tests send through a client (chat, uploads,
//! forms, the app's own key) and how they read the answers; relays started
//! from a config file; and a poll that waits for a condition.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

use passage_relay::policy::ClientRules;

use crate::Transport;
use crate::mock_upstream::MockUpstream;
use crate::relays::{LocalClient, RelayLaunch, RelayProcess, TestPki, free_udp_port};
use crate::stack::body_json;

/// A client's rules: the defaults with `edit` applied.
pub fn rules(edit: impl FnOnce(&mut ClientRules)) -> ClientRules {
    let mut rules = ClientRules::default();
    edit(&mut rules);
    rules
}

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);

/// A chat completion request for `model`.
pub fn chat(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// A streamed chat completion request for `model`, with or without the usage chunk.
pub fn chat_stream(model: &str, include_usage: bool) -> serde_json::Value {
    serde_json::json!({
        "messages": [{"role": "user", "content": "hi"}],
        "model": model,
        "stream": true,
        "stream_options": {"include_usage": include_usage},
    })
}

/// A multipart upload whose form names `model`, then a file.
pub async fn upload(client: &LocalClient, model: &str) -> Response<Incoming> {
    let body = format!(
        "--XYZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n\
         --XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
         Content-Type: audio/wav\r\n\r\nRIFF....WAVE\r\n--XYZ--\r\n"
    );
    let request = Request::post(client.url("/v1/files"))
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    client.http.request(request).await.expect("answer")
}

/// Status and JSON body of a response.
pub async fn answer(response: Result<Response<Incoming>, String>) -> (u16, serde_json::Value) {
    let response = response.expect("an answer");
    let status = response.status().as_u16();
    let body = match status {
        200 if response
            .headers()
            .get("content-type")
            .is_some_and(|v| v != "application/json") =>
        {
            serde_json::Value::Null
        }
        _ => body_json(response).await,
    };
    (status, body)
}

/// Writes `text` as `relay.toml` in `dir`.
pub fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).expect("write the config");
    path
}

/// Polls `probe` every 20 ms until it yields a value; panics with `what`
/// after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real relay started with `--config FILE` (holding `text`) plus `args`.
pub async fn relay_with_config(
    upstream: &MockUpstream,
    pki: &TestPki,
    text: &str,
    args: &[&str],
) -> (RelayProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, text);
    let mut launch = RelayLaunch {
        args: vec!["--config".into(), config.display().to_string()],
        ..RelayLaunch::default()
    };
    launch.args.extend(args.iter().map(|a| (*a).to_owned()));
    let relay = RelayProcess::launch(pki, free_udp_port(), &upstream.url(), launch).await;
    (relay, dir)
}

/// A client of `pki`'s named `name` for `relay`, once its tunnel is up.
pub async fn client_for(
    pki: &TestPki,
    name: &str,
    relay: std::net::SocketAddr,
    transport: Transport,
) -> LocalClient {
    let client = LocalClient::start_over(pki.issue(name, &[relay]), transport, |_| {}).await;
    client.wait_for_relay(relay, WAIT).await;
    client
}

/// `GET path` with the app's own API key.
pub async fn with_key(
    client: &LocalClient,
    path: &str,
    key: &str,
) -> Result<Response<Incoming>, String> {
    let request = Request::get(client.url(path))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    client
        .http
        .request(request)
        .await
        .map_err(|e| e.to_string())
}

/// Sends a prepared request to the client; status and JSON body.
pub async fn send(client: &LocalClient, request: Request<Full<Bytes>>) -> (u16, serde_json::Value) {
    answer(
        client
            .http
            .request(request)
            .await
            .map_err(|e| e.to_string()),
    )
    .await
}

/// A multipart upload whose form is `parts` (name header parameter, value).
pub async fn form(
    client: &LocalClient,
    content_type: &str,
    parts: &[(&str, String)],
) -> (u16, serde_json::Value) {
    let mut body = String::new();
    for (name, value) in parts {
        body.push_str(&format!(
            "--XYZ\r\nContent-Disposition: form-data; {name}\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str("--XYZ--\r\n");
    let request = Request::post(client.url("/v1/files"))
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    send(client, request).await
}
