//! CloudEvents HTTP binary mode: attributes in `ce-*` headers, the body is `data`. It is turned into
//! the structured form so that one validation path serves both.

use axum::http::HeaderMap;
use base64::Engine;
use serde_json::{Map, Value};

/// Whether the request is a binary-mode CloudEvent.
pub fn is_binary(headers: &HeaderMap) -> bool {
    headers.contains_key("ce-specversion")
}

/// The structured JSON of a binary-mode event, or the header that is not valid text.
pub fn to_structured(
    headers: &HeaderMap,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Vec<u8>, String> {
    let mut event = Map::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let text = value
            .to_str()
            .map_err(|_| format!("header {name} is not valid text"))?;
        let value = match attribute {
            "deleted" => Value::Bool(text.eq_ignore_ascii_case("true")),
            _ => Value::String(text.to_owned()),
        };
        event.insert(attribute.to_owned(), value);
    }
    if !body.is_empty() {
        let media = content_type.map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        match media.as_deref() {
            Some(m) if m == "application/json" || m.ends_with("+json") => {
                let data: Value = serde_json::from_slice(body)
                    .map_err(|err| format!("body is not valid JSON: {err}"))?;
                event.insert("data".into(), data);
            }
            Some(m) if m.starts_with("text/") => match std::str::from_utf8(body) {
                Ok(text) => {
                    event.insert("data".into(), Value::String(text.to_owned()));
                }
                Err(_) => return Err("a text body must be UTF-8".into()),
            },
            // No media type: JSON when the body is JSON (the CloudEvents SDKs send JSON data so),
            // bytes otherwise.
            None if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() => {
                let data: Value = serde_json::from_slice(body)
                    .map_err(|err| format!("body is not valid JSON: {err}"))?;
                event.insert("data".into(), data);
            }
            _ => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(body);
                event.insert("data_base64".into(), Value::String(encoded));
            }
        }
    }
    if let Some(content_type) = content_type {
        event.insert(
            "datacontenttype".into(),
            Value::String(content_type.to_owned()),
        );
    }
    serde_json::to_vec(&Value::Object(event)).map_err(|err| err.to_string())
}
