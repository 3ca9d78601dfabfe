//! Finds the model a request asks for in (a bounded prefix of) its body:
//! the top-level `model` field of a JSON body, or the `model` field of a
//! multipart form (audio uploads), without reading past the prefix.

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
        let mime = params.next().unwrap_or("").trim().to_ascii_lowercase();
        if mime == "application/json"
            || (mime.starts_with("application/") && mime.ends_with("+json"))
        {
            return BodyKind::Json;
        }
        if mime == "multipart/form-data" {
            let boundary = params.find_map(|param| {
                let (name, value) = param.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("boundary")
                    .then(|| value.trim().trim_matches('"').to_owned())
            });
            if let Some(boundary) = boundary.filter(|b| !b.is_empty()) {
                return BodyKind::Multipart(boundary);
            }
        }
        BodyKind::Other
    }
}

/// The model named by a whole JSON body (None: not JSON, or no string `model`).
/// Duplicate keys resolve as the upstream's parser does: the last one wins.
pub fn json_model(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<ModelField>(body).ok()?.model
}

/// The value of the `model` field of a multipart form, if that part ends
/// within `prefix`; None also when the prefix holds two of them (which one
/// the upstream takes is its business, so neither is trusted).
pub fn multipart_model(prefix: &[u8], boundary: &str) -> Option<String> {
    let delimiter = format!("--{boundary}");
    let text = std::str::from_utf8(prefix).unwrap_or_else(|e| {
        // Uploaded files are binary; the fields before them are text.
        std::str::from_utf8(&prefix[..e.valid_up_to()]).unwrap_or_default()
    });
    let mut parts = text.split(delimiter.as_str()).skip(1);
    // The last piece may be a part cut off by the prefix: only whole parts count.
    let mut current = parts.next();
    let mut found = None;
    for next in parts {
        let part = current?;
        let Some((headers, value)) = part.trim_start_matches("\r\n").split_once("\r\n\r\n") else {
            break;
        };
        let named_model = headers.lines().any(|line| {
            let line = line.to_ascii_lowercase();
            line.starts_with("content-disposition:")
                && line.split(';').any(|p| p.trim() == "name=\"model\"")
        });
        if named_model {
            if found.is_some() {
                return None;
            }
            found = Some(value.strip_suffix("\r\n").unwrap_or(value).to_owned());
        }
        current = Some(next);
    }
    found
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
        assert_eq!(BodyKind::of(Some("multipart/form-data")), BodyKind::Other);
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

    #[test]
    fn the_multipart_model_is_found_before_the_file() {
        let body = "--XY\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XY\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF";
        assert_eq!(
            multipart_model(body.as_bytes(), "XY").as_deref(),
            Some("whisper-1")
        );
        let cut = "--XY\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhis";
        assert_eq!(multipart_model(cut.as_bytes(), "XY"), None);
        let other = "--XY\r\nContent-Disposition: form-data; name=\"modelx\"\r\n\r\nv\r\n--XY--";
        assert_eq!(multipart_model(other.as_bytes(), "XY"), None);
        let twice = "--XY\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n--XY\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nb\r\n--XY--";
        assert_eq!(multipart_model(twice.as_bytes(), "XY"), None);
    }
}
