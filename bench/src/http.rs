//! The benchmark's own HTTP side: a pooled client, bodies that stream
//! without holding their bytes, and readers that only count.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Request body type of the benchmark client.
pub type Body = BoxBody<Bytes, Infallible>;
/// The benchmark's pooled HTTP/1.1 client.
pub type HttpClient = Client<HttpConnector, Body>;

/// A pooled HTTP/1.1 client with TCP_NODELAY, like an SDK's.
pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().boxed()
}

/// `total` bytes streamed in 64 KiB chunks of one shared buffer.
pub fn repeat_body(total: u64) -> Body {
    let chunk = Bytes::from(vec![0x5au8; 64 * 1024]);
    let stream = futures_util::stream::unfold(total, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(chunk.len() as u64) as usize;
            Some((
                Ok::<_, Infallible>(Frame::data(chunk.slice(..n))),
                left - n as u64,
            ))
        }
    });
    StreamBody::new(stream).boxed()
}

/// `GET url`.
pub async fn get(client: &HttpClient, url: &str) -> anyhow::Result<Response<Incoming>> {
    let request = Request::get(url).body(empty())?;
    Ok(client.request(request).await?)
}

/// Reads a body to its end, returning how many bytes it had.
pub async fn drain(mut body: Incoming) -> anyhow::Result<u64> {
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            len += data.len() as u64;
        }
    }
    Ok(len)
}
