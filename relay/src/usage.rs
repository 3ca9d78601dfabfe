//! Token usage as the upstream reports it: the `usage` object of a JSON
//! response, or of the last SSE event that carries one (the chunk sent
//! with `stream_options.include_usage`, or `response.completed` of the
//! Responses API). The tap only watches the bytes already being forwarded:
//! it keeps shared handles to a JSON body's chunks (up to a bound) and the
//! current SSE line, never a whole stream.

use bytes::Bytes;
use serde::Deserialize;

/// Largest JSON response body searched for usage; bigger ones count none.
const JSON_LIMIT: usize = 4 * 1024 * 1024;
/// Longest SSE line kept while it arrives.
const LINE_LIMIT: usize = 1024 * 1024;

/// Tokens of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
}

impl Usage {
    /// Prompt and completion together.
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// The usage object in either API's naming.
#[derive(Deserialize)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

/// A body or event that may carry usage, at the top or inside `response`.
#[derive(Deserialize)]
struct UsageCarrier {
    usage: Option<UsageFields>,
    response: Option<Box<UsageCarrier>>,
}

impl UsageCarrier {
    fn usage(self) -> Option<Usage> {
        let fields = match (self.usage, self.response) {
            (Some(fields), _) => fields,
            (None, Some(inner)) => return inner.usage(),
            (None, None) => return None,
        };
        let prompt = fields.prompt_tokens.or(fields.input_tokens).unwrap_or(0);
        let completion = fields
            .completion_tokens
            .or(fields.output_tokens)
            .or_else(|| {
                fields
                    .total_tokens
                    .map(|total| total.saturating_sub(prompt))
            })
            .unwrap_or(0);
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
        })
    }
}

/// The usage a WebSocket session event reports: the text message of a
/// `response.done` (Realtime) or `response.completed` (Responses) event.
/// Other messages cost a substring search, not a parse.
pub fn session_event_usage(message: &[u8]) -> Option<Usage> {
    let finder = |needle: &[u8]| memchr::memmem::find(message, needle).is_some();
    if !finder(b"response.done") && !finder(b"response.completed") {
        return None;
    }
    #[derive(Deserialize)]
    struct SessionEvent {
        #[serde(rename = "type")]
        kind: Option<String>,
        #[serde(flatten)]
        carrier: UsageCarrier,
    }
    let event: SessionEvent = serde_json::from_slice(message).ok()?;
    match event.kind.as_deref() {
        Some("response.done" | "response.completed") => event.carrier.usage(),
        _ => None,
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
    }
}

fn parse(json: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<UsageCarrier>(json).ok()?.usage()
}

/// Watches a response body for its usage.
#[derive(Debug)]
pub enum UsageTap {
    /// A JSON body: its chunks, until it ends or grows past the bound.
    Json {
        /// The chunks so far (shared handles).
        chunks: Vec<Bytes>,
        /// Their total length.
        len: usize,
    },
    /// An event stream: the line being assembled, the last usage seen,
    /// and how many `data:` lines passed.
    Sse {
        /// The line being assembled.
        line: Vec<u8>,
        /// The last usage seen.
        usage: Option<Usage>,
        /// `data:` lines seen (about one per generated token).
        events: u64,
    },
    /// A body that carries no usage passage can read.
    Ignored,
}

impl UsageTap {
    /// A tap for a successful response with this content type; others are ignored.
    pub fn for_response(status: http::StatusCode, content_type: Option<&str>) -> UsageTap {
        if !status.is_success() {
            return UsageTap::Ignored;
        }
        let mime = content_type
            .and_then(|v| v.split(';').next())
            .map_or("", str::trim);
        if mime.eq_ignore_ascii_case("application/json") {
            UsageTap::Json {
                chunks: Vec::new(),
                len: 0,
            }
        } else if mime.eq_ignore_ascii_case("text/event-stream") {
            UsageTap::Sse {
                line: Vec::new(),
                usage: None,
                events: 0,
            }
        } else {
            UsageTap::Ignored
        }
    }

    /// Looks at the next chunk of the body.
    pub fn observe(&mut self, data: &Bytes) {
        match self {
            UsageTap::Json { chunks, len } => {
                *len += data.len();
                if *len > JSON_LIMIT {
                    *self = UsageTap::Ignored;
                } else {
                    chunks.push(data.clone());
                }
            }
            UsageTap::Sse {
                line,
                usage,
                events,
            } => {
                let mut rest = &data[..];
                while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                    let complete: &[u8] = if line.is_empty() {
                        &rest[..end]
                    } else {
                        line.extend_from_slice(&rest[..end]);
                        line
                    };
                    if complete.starts_with(b"data:") {
                        *events += 1;
                    }
                    if let Some(found) = sse_line_usage(complete) {
                        *usage = Some(found);
                    }
                    line.clear();
                    rest = &rest[end + 1..];
                }
                if line.len() + rest.len() <= LINE_LIMIT {
                    line.extend_from_slice(rest);
                } else {
                    line.clear();
                }
            }
            UsageTap::Ignored => {}
        }
    }

    /// The usage the body reported, once it has ended.
    pub fn finish(self) -> Option<Usage> {
        match self {
            UsageTap::Json { chunks, .. } => match chunks.as_slice() {
                [one] => parse(one),
                many => parse(&many.concat()),
            },
            UsageTap::Sse { line, usage, .. } => sse_line_usage(&line).or(usage),
            UsageTap::Ignored => None,
        }
    }
}

impl UsageTap {
    /// Tokens to charge a rate limit when the upstream reported none (a
    /// stream without its usage chunk, a response cut short, a body too big
    /// to search): about four bytes of request per prompt token, and one
    /// token per event of a stream or four bytes of any other response.
    pub fn estimate(&self, bytes_in: u64, bytes_out: u64) -> u64 {
        let completion = match self {
            UsageTap::Sse { events, .. } => *events,
            _ => bytes_out / 4,
        };
        (bytes_in / 4).saturating_add(completion)
    }
}

/// The usage in one SSE line, if it is a `data:` line that carries one.
fn sse_line_usage(line: &[u8]) -> Option<Usage> {
    let data = line.strip_prefix(b"data:")?;
    let needle = b"\"usage\"";
    if !data.windows(needle.len()).any(|w| w == needle) {
        return None;
    }
    parse(data.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn tap(content_type: &str, chunks: &[&str]) -> Option<Usage> {
        let mut tap = UsageTap::for_response(StatusCode::OK, Some(content_type));
        for chunk in chunks {
            tap.observe(&Bytes::copy_from_slice(chunk.as_bytes()));
        }
        tap.finish()
    }

    #[test]
    fn session_events_report_usage_only_when_a_response_is_done() {
        let done = br#"{"type":"response.done","response":{"usage":{"input_tokens":5,"output_tokens":3,"total_tokens":8}}}"#;
        let completed = br#"{"type":"response.completed","response":{"usage":{"input_tokens":2,"output_tokens":1}}}"#;
        let delta = br#"{"type":"response.output_text.delta","delta":"response.done"}"#;
        assert_eq!(
            session_event_usage(done),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3
            })
        );
        assert_eq!(session_event_usage(completed).map(|u| u.total()), Some(3));
        assert_eq!(session_event_usage(delta), None);
        assert_eq!(session_event_usage(b"not json response.done"), None);
    }

    #[test]
    fn json_usage_in_either_naming() {
        let chat = r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        let (a, b) = chat.split_at(20);
        assert_eq!(
            tap("application/json", &[a, b]),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 30
            })
        );
        let responses = r#"{"usage":{"input_tokens":5,"output_tokens":7}}"#;
        assert_eq!(
            tap("application/json; charset=utf-8", &[responses]),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7
            })
        );
        let embeddings = r#"{"data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(
            tap("application/json", &[embeddings]).map(|u| u.total()),
            Some(8)
        );
        assert_eq!(tap("application/json", &[r#"{"data":[]}"#]), None);
        assert_eq!(tap("text/plain", &[chat]), None);
    }

    #[test]
    fn sse_usage_from_the_usage_chunk_split_anywhere() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n\
                      data: [DONE]\n\n";
        for split in [1, 17, 60, 90, stream.len() - 3] {
            let (a, b) = stream.split_at(split);
            assert_eq!(
                tap("text/event-stream", &[a, b]),
                Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 4
                }),
                "split at {split}"
            );
        }
        let completed = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}";
        assert_eq!(
            tap("text/event-stream", &[completed]),
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 1
            })
        );
        assert_eq!(tap("text/event-stream", &["data: {\"x\":1}\n\n"]), None);
    }

    #[test]
    fn error_responses_are_not_tapped() {
        let tap = UsageTap::for_response(StatusCode::BAD_REQUEST, Some("application/json"));
        assert!(matches!(tap, UsageTap::Ignored));
    }
}
