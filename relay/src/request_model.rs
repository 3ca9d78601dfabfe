//! Finds the model a request asks for in its body: the top-level `model`
//! field of a whole JSON body, or the `model` field of a multipart form
//! (audio uploads), which [`MultipartScanner`] follows through the whole
//! upload with bounded memory.

use serde::Deserialize;

/// The one field of a JSON body the relay looks at.
#[derive(Deserialize)]
struct ModelField {
    model: Option<String>,
}

/// What kind of body a request carries, from its content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json` (or `+json`): the model is a top-level field.
    Json,
    /// `multipart/form-data` with this boundary: the model is a form field.
    Multipart(String),
    /// A multipart type whose boundary is missing or given twice.
    BadMultipart,
    /// Anything else: no model can be found.
    Other,
}

impl BodyKind {
    /// Classifies a `content-type` value.
    pub fn of(content_type: Option<&str>) -> BodyKind {
        let Some(value) = content_type else {
            return BodyKind::Other;
        };
        let mut params = value.split(';');
        let mime = params.next().unwrap_or("").trim();
        let starts = |prefix: &str| {
            mime.get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
        };
        let ends = |suffix: &str| {
            mime.len() >= suffix.len()
                && mime
                    .get(mime.len() - suffix.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
        };
        if mime.eq_ignore_ascii_case("application/json")
            || (starts("application/") && ends("+json"))
        {
            return BodyKind::Json;
        }
        if starts("multipart/") {
            let boundaries: Vec<String> = params
                .filter_map(|param| {
                    let (name, value) = param.split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("boundary")
                        .then(|| value.trim().trim_matches('"').to_owned())
                })
                .collect();
            return match boundaries.as_slice() {
                [one]
                    if !one.is_empty()
                        && one.len() <= 70
                        && mime.eq_ignore_ascii_case("multipart/form-data") =>
                {
                    BodyKind::Multipart(one.clone())
                }
                _ => BodyKind::BadMultipart,
            };
        }
        BodyKind::Other
    }
}

/// The model named by a whole JSON body (None: not JSON, or no string `model`).
/// Duplicate keys resolve as the upstream's parser does: the last one wins.
pub fn json_model(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<ModelField>(body).ok()?.model
}

/// Longest part header block accepted in a model-checked multipart body.
const MAX_PART_HEADERS: usize = 16 * 1024;
/// Longest model value kept; a longer one names no model.
const MAX_MODEL_VALUE: usize = 256;

/// Why a multipart body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    /// More than one part is named `model`.
    #[error("the form has more than one `model` field")]
    SecondModel,
    /// A part's headers run past `MAX_PART_HEADERS`.
    #[error("a form part's headers are longer than {MAX_PART_HEADERS} bytes")]
    LongHeaders,
}

/// Where one scanning step left the buffer.
enum ScanStep {
    /// The state moved on: scan again.
    Go,
    /// More bytes are needed: keep the buffer from here on.
    Wait {
        /// The first byte to keep.
        keep_from: usize,
    },
}

#[derive(Debug)]
enum ScanState {
    /// Looking for the next delimiter; `Some` while inside a `model` part.
    Body { value: Option<Vec<u8>> },
    /// Reading a part's header block; the first `searched` bytes of the
    /// carried block hold no complete `\r\n\r\n`.
    Headers { searched: usize },
    /// After the closing delimiter.
    Done,
}

/// Follows a `multipart/form-data` body chunk by chunk, with bounded
/// memory, and notes every part named `model` (quoted, unquoted or
/// `name*=` names, any case): the first one's value is the request's
/// model, and a second one anywhere in the body is an error, since which
/// of two the upstream takes is its business.
#[derive(Debug)]
pub struct MultipartScanner {
    /// Finds `\r\n--BOUNDARY`, what precedes every part.
    delimiter: memchr::memmem::Finder<'static>,
    state: ScanState,
    /// Unscanned bytes kept from the last chunk; the next chunk is
    /// appended to it.
    carry: Vec<u8>,
    models: usize,
    model: Option<String>,
}

impl MultipartScanner {
    /// A scanner for a body with this boundary.
    pub fn new(boundary: &str) -> Self {
        MultipartScanner {
            delimiter: memchr::memmem::Finder::new(format!("\r\n--{boundary}").as_bytes())
                .into_owned(),
            state: ScanState::Body { value: None },
            // The first delimiter may open the body without a line break.
            carry: b"\r\n".to_vec(),
            models: 0,
            model: None,
        }
    }

    /// The value of the first `model` part, once that part is complete.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Scans the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), MultipartError> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let mut pos = 0;
        loop {
            let step = match self.state {
                ScanState::Done => return Ok(()),
                ScanState::Body { .. } => self.scan_body(&buf, &mut pos),
                ScanState::Headers { searched } => self.scan_headers(&buf, &mut pos, searched)?,
            };
            if let ScanStep::Wait { keep_from } = step {
                // Keep the buffer (and its capacity): no copy per chunk.
                buf.drain(..keep_from);
                self.carry = buf;
                return Ok(());
            }
        }
    }

    /// Reads a part's body from `pos` up to its delimiter, keeping the
    /// value if the part is the model.
    fn scan_body(&mut self, buf: &[u8], pos: &mut usize) -> ScanStep {
        let ScanState::Body { value } = &mut self.state else {
            return ScanStep::Go;
        };
        let needle = self.delimiter.needle().len();
        match self.delimiter.find(&buf[*pos..]) {
            Some(at) => {
                if let Some(mut bytes) = value.take() {
                    keep(&mut bytes, &buf[*pos..*pos + at]);
                    self.complete_model(bytes);
                }
                *pos += at + needle;
                self.state = ScanState::Headers { searched: 0 };
                ScanStep::Go
            }
            None => {
                // Keep what could be the start of a delimiter.
                let safe = buf.len().saturating_sub(needle - 1).max(*pos);
                if let Some(bytes) = value {
                    keep(bytes, &buf[*pos..safe]);
                }
                ScanStep::Wait { keep_from: safe }
            }
        }
    }

    /// Reads a part's header block from `pos` (the first `searched` bytes
    /// were looked through before), or the form's end.
    fn scan_headers(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
        searched: usize,
    ) -> Result<ScanStep, MultipartError> {
        let rest = &buf[*pos..];
        if rest.len() < 2 {
            return Ok(ScanStep::Wait { keep_from: *pos });
        }
        if rest.starts_with(b"--") {
            self.state = ScanState::Done;
            return Ok(ScanStep::Go);
        }
        // Resume where the last search stopped, less the three bytes a
        // terminator could have been cut after.
        let from = searched.saturating_sub(3);
        match find(&rest[from..], b"\r\n\r\n").map(|at| from + at) {
            // The limit is on the block's own length, so it bites the same
            // however the body is chunked.
            Some(end) if end > MAX_PART_HEADERS => Err(MultipartError::LongHeaders),
            Some(end) => {
                let named_model = names_model(&rest[..end]);
                *pos += end + 4;
                if named_model {
                    self.models += 1;
                    if self.models > 1 {
                        return Err(MultipartError::SecondModel);
                    }
                }
                self.state = ScanState::Body {
                    value: named_model.then(Vec::new),
                };
                Ok(ScanStep::Go)
            }
            // A terminator found later would start at `rest.len() - 3` or
            // after: already too far.
            None if rest.len() > MAX_PART_HEADERS + 3 => Err(MultipartError::LongHeaders),
            None => {
                self.state = ScanState::Headers {
                    searched: rest.len(),
                };
                Ok(ScanStep::Wait { keep_from: *pos })
            }
        }
    }

    fn complete_model(&mut self, bytes: Vec<u8>) {
        if bytes.len() <= MAX_MODEL_VALUE {
            self.model = String::from_utf8(bytes).ok();
        }
    }
}

/// Appends `more` to a model value, up to one byte past the longest kept
/// (so an over-long value is known to be one).
fn keep(value: &mut Vec<u8>, more: &[u8]) {
    let room = (MAX_MODEL_VALUE + 1).saturating_sub(value.len());
    value.extend_from_slice(&more[..more.len().min(room)]);
}

/// Whether a part's header block names the part `model`.
fn names_model(headers: &[u8]) -> bool {
    let text = String::from_utf8_lossy(headers);
    text.split("\r\n").any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        name.trim().eq_ignore_ascii_case("content-disposition")
            && value.split(';').skip(1).any(|param| {
                let Some((key, value)) = param.split_once('=') else {
                    return false;
                };
                let key = key.trim().to_ascii_lowercase();
                let value = value.trim().trim_matches('"');
                match key.as_str() {
                    "name" => value.eq_ignore_ascii_case("model"),
                    // RFC 5987: charset'language'value
                    "name*" => value
                        .rsplit('\'')
                        .next()
                        .is_some_and(|v| v.eq_ignore_ascii_case("model")),
                    _ => false,
                }
            })
    })
}

/// Where `needle` first starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_are_classified() {
        assert_eq!(
            BodyKind::of(Some("application/json; charset=utf-8")),
            BodyKind::Json
        );
        assert_eq!(
            BodyKind::of(Some("multipart/form-data; boundary=\"abc\"")),
            BodyKind::Multipart("abc".into())
        );
        assert_eq!(BodyKind::of(Some("text/plain")), BodyKind::Other);
        assert_eq!(BodyKind::of(None), BodyKind::Other);
    }

    #[test]
    fn the_json_model_is_the_top_level_one() {
        assert_eq!(
            json_model(br#"{"messages":[{"model":"inner"}],"model":"gpt-4o"}"#).as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(
            json_model(br#"{"model":"a","model":"b"}"#).as_deref(),
            None,
            "serde refuses duplicate fields: no model, so a restricted client is refused"
        );
        assert_eq!(
            json_model(br#"{"model":"gpt-\u0034o"}"#).as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(json_model(br#"{"model":7}"#), None);
        assert_eq!(json_model(b"{\"model\":\"gpt"), None);
    }

    fn scan(
        body: &str,
        boundary: &str,
        split: usize,
    ) -> (Result<(), MultipartError>, Option<String>) {
        let mut scanner = MultipartScanner::new(boundary);
        let (a, b) = body.as_bytes().split_at(split.min(body.len()));
        let result = scanner.feed(a).and_then(|()| scanner.feed(b));
        (result, scanner.model().map(str::to_owned))
    }

    #[test]
    fn the_multipart_model_is_found_wherever_the_chunks_split() {
        let body = "--XY\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XY\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--XY--\r\n";
        for split in 0..body.len() {
            assert_eq!(
                scan(body, "XY", split),
                (Ok(()), Some("whisper-1".into())),
                "split {split}"
            );
        }
        let cut = "--XY\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhis";
        assert_eq!(
            scan(cut, "XY", 10).1,
            None,
            "an unfinished part names nothing yet"
        );
    }

    #[test]
    fn a_second_model_part_anywhere_is_refused() {
        for second in [
            "name=\"model\"",
            "name=model",
            "NAME=\"Model\"",
            "name*=utf-8''model",
        ] {
            let body = format!(
                "--XY\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n--XY\r\nContent-Disposition: form-data; name=\"pad\"\r\n\r\n{}\r\n--XY\r\nContent-Disposition: form-data; {second}\r\n\r\nb\r\n--XY--",
                "p".repeat(5000)
            );
            for split in [7, 100, 3000, body.len() - 20] {
                assert_eq!(
                    scan(&body, "XY", split).0,
                    Err(MultipartError::SecondModel),
                    "{second} split {split}"
                );
            }
        }
        let other = "--XY\r\nContent-Disposition: form-data; name=\"modelx\"\r\n\r\nv\r\n--XY--";
        assert_eq!(scan(other, "XY", 5), (Ok(()), None));
        let long_headers = format!("--XY\r\nX: {}", "h".repeat(20_000));
        assert_eq!(
            scan(&long_headers, "XY", 9).0,
            Err(MultipartError::LongHeaders)
        );
        let long_value = format!(
            "--XY\r\nContent-Disposition: form-data; name=model\r\n\r\n{}\r\n--XY--",
            "m".repeat(300)
        );
        assert_eq!(
            scan(&long_value, "XY", 50),
            (Ok(()), None),
            "too long to be a model"
        );
    }

    #[test]
    fn the_part_header_limit_does_not_depend_on_chunking() {
        // `len` counts from after the boundary to the blank line,
        // the boundary line's own line break included.
        let block = |len: usize| {
            let head = "\r\nContent-Disposition: form-data; name=\"model\"\r\nX-Pad: ";
            format!(
                "--XY{head}{}\r\n\r\nm\r\n--XY--",
                "p".repeat(len - head.len())
            )
        };
        for (len, expected) in [
            (MAX_PART_HEADERS, (Ok(()), Some("m".to_owned()))),
            (
                MAX_PART_HEADERS + 1,
                (Err(MultipartError::LongHeaders), None),
            ),
        ] {
            let body = block(len);
            for split in [0, 6, 100, len, len + 6, len + 8, len + 10, body.len()] {
                assert_eq!(
                    scan(&body, "XY", split),
                    expected,
                    "len {len} split {split}"
                );
            }
            let mut scanner = MultipartScanner::new("XY");
            let bytewise = body.as_bytes().chunks(1).try_for_each(|b| scanner.feed(b));
            assert_eq!(
                (bytewise, scanner.model().map(str::to_owned)),
                expected,
                "len {len} byte by byte"
            );
        }
    }

    #[test]
    fn duplicate_or_missing_boundaries_are_bad() {
        assert_eq!(
            BodyKind::of(Some("multipart/form-data; boundary=A; boundary=B")),
            BodyKind::BadMultipart
        );
        assert_eq!(
            BodyKind::of(Some("multipart/form-data")),
            BodyKind::BadMultipart
        );
        assert_eq!(
            BodyKind::of(Some("multipart/mixed; boundary=A")),
            BodyKind::BadMultipart
        );
    }
}
