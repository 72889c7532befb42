//! Parsing and validation of published events (docs/protocol.md §1).
//!
//! An event arrives as a JSON object from an untrusted publisher. Each known attribute is checked on
//! its own so that an error names the field; `data` is kept as raw JSON text and never re-encoded.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::names::{self, validate_channel, validate_identity};

/// Default limit on one serialized event.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;
const MAX_ID_LEN: usize = 128;
const MAX_TYPE_LEN: usize = 128;
const MAX_KEY_LEN: usize = 256;
const MAX_ATTRIBUTE_LEN: usize = 1024;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted event, serialized, in bytes.
    pub max_event_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("an event must be a JSON object")]
    NotAnObject,
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("the event is {size} bytes serialized, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
}

impl EventError {
    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        EventError::Invalid {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// The field this error is about, if it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            EventError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// An event accepted by the bus: validated, completed (`id`, `source`, `time`), serialized once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    pub channel: String,
    pub key: Option<String>,
    pub deleted: bool,
    /// The authenticated publisher: with `channel` and `id`, the event's identity for idempotency.
    pub source: String,
    /// The event's JSON object without `seq`; the store splices `seq` in (see [`crate::with_seq`]).
    pub body: Vec<u8>,
}

/// What the store answered for one appended event: its seq, or the first answer's for a retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub channel: String,
    pub id: String,
    pub seq: u64,
    pub duplicate: bool,
}

/// Parses one event from JSON text, on behalf of the authenticated `source`.
pub fn parse_event(json: &[u8], source: &str, limits: &Limits) -> Result<Accepted, EventError> {
    let fields: BTreeMap<String, Box<RawValue>> = match serde_json::from_slice(json) {
        Ok(fields) => fields,
        Err(err) if err.is_data() => return Err(EventError::NotAnObject),
        Err(err) => return Err(EventError::Malformed(err.to_string())),
    };
    accept(fields, source, limits)
}

/// Parses one event or a JSON array of events. A batch is all or nothing: the first invalid event
/// refuses it, and the error carries its index.
pub fn parse_events(
    json: &[u8],
    source: &str,
    limits: &Limits,
) -> Result<Vec<Accepted>, (Option<usize>, EventError)> {
    let first = json.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let items: Vec<Box<RawValue>> = serde_json::from_slice(json)
            .map_err(|err| (None, EventError::Malformed(err.to_string())))?;
        if items.is_empty() {
            return Err((
                None,
                EventError::invalid("events", "a batch must hold at least one event"),
            ));
        }
        items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                parse_event(item.get().as_bytes(), source, limits).map_err(|err| (Some(index), err))
            })
            .collect()
    } else {
        parse_event(json, source, limits)
            .map(|event| vec![event])
            .map_err(|err| (None, err))
    }
}

#[derive(Serialize)]
struct Body<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    channel: &'a str,
    source: &'a str,
    time: &'a str,
    specversion: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    datacontenttype: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dataschema: Option<&'a str>,
    #[serde(flatten)]
    extensions: &'a BTreeMap<String, serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
}

fn accept(
    mut fields: BTreeMap<String, Box<RawValue>>,
    source: &str,
    limits: &Limits,
) -> Result<Accepted, EventError> {
    let id = match take_string(&mut fields, "id")? {
        Some(id) => {
            if id.is_empty()
                || id.len() > MAX_ID_LEN
                || !id.bytes().all(|b| (0x20..0x7f).contains(&b))
            {
                return Err(EventError::invalid(
                    "id",
                    "must be 1-128 printable ASCII characters",
                ));
            }
            id
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    let kind = take_string(&mut fields, "type")?
        .ok_or_else(|| EventError::invalid("type", "is required"))?;
    check_len("type", &kind, MAX_TYPE_LEN)?;

    let channel = take_string(&mut fields, "channel")?;
    let to = take_string(&mut fields, "to")?;
    let channel = match (channel, to) {
        (Some(_), Some(_)) => {
            return Err(EventError::invalid(
                "to",
                "give either channel or to, not both",
            ));
        }
        (None, None) => return Err(EventError::invalid("channel", "is required (or give to)")),
        (Some(channel), None) => {
            validate_channel(&channel)
                .map_err(|err| EventError::invalid("channel", err.to_string()))?;
            channel
        }
        (None, Some(to)) => {
            validate_identity(&to).map_err(|err| EventError::invalid("to", err.to_string()))?;
            names::inbox_of(&to)
        }
    };

    // The publisher's own claims about who it is and where the event sits are never trusted.
    fields.remove("source");
    fields.remove("seq");

    let time = match take_string(&mut fields, "time")? {
        Some(time) => {
            chrono::DateTime::parse_from_rfc3339(&time)
                .map_err(|_| EventError::invalid("time", "must be an RFC 3339 timestamp"))?;
            time
        }
        None => chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    };
    let specversion = take_string(&mut fields, "specversion")?;
    if specversion.as_deref().is_some_and(|v| v != "1.0") {
        return Err(EventError::invalid(
            "specversion",
            "only CloudEvents 1.0 is supported",
        ));
    }
    let key = take_string(&mut fields, "key")?;
    if let Some(key) = &key {
        check_len("key", key, MAX_KEY_LEN)?;
    }
    let deleted = match fields.remove("deleted") {
        None => false,
        Some(raw) => serde_json::from_str::<bool>(raw.get())
            .map_err(|_| EventError::invalid("deleted", "must be true or false"))?,
    };
    if deleted && key.is_none() {
        return Err(EventError::invalid(
            "deleted",
            "needs a key: it marks that key deleted",
        ));
    }
    let subject = take_attribute(&mut fields, "subject")?;
    let datacontenttype = take_attribute(&mut fields, "datacontenttype")?;
    let dataschema = take_attribute(&mut fields, "dataschema")?;
    let data_base64 = take_string(&mut fields, "data_base64")?;
    let data = fields.remove("data");
    if data.is_some() && data_base64.is_some() {
        return Err(EventError::invalid(
            "data_base64",
            "give either data or data_base64, not both",
        ));
    }

    // What is left must be a CloudEvents extension attribute: lowercase letters and digits, at most
    // 20, with a scalar value. Anything else is a typo that we would rather report than store.
    let mut extensions = BTreeMap::new();
    for (name, raw) in fields {
        let valid_name = !name.is_empty()
            && name.len() <= 20
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid_name {
            return Err(EventError::Invalid {
                reason:
                    "unknown attribute (extension attributes are 1-20 lowercase letters and digits)"
                        .into(),
                field: name,
            });
        }
        let value: serde_json::Value = serde_json::from_str(raw.get())
            .map_err(|err| EventError::Malformed(err.to_string()))?;
        if !(value.is_string() || value.is_number() || value.is_boolean()) {
            return Err(EventError::Invalid {
                reason: "an extension attribute must be a string, number or boolean".into(),
                field: name,
            });
        }
        extensions.insert(name, value);
    }

    let body = serde_json::to_vec(&Body {
        id: &id,
        kind: &kind,
        channel: &channel,
        source,
        time: &time,
        specversion: "1.0",
        key: key.as_deref(),
        deleted,
        subject: subject.as_deref(),
        datacontenttype: datacontenttype.as_deref(),
        dataschema: dataschema.as_deref(),
        extensions: &extensions,
        data_base64: data_base64.as_deref(),
        data: data.as_deref(),
    })
    .map_err(|err| EventError::Malformed(err.to_string()))?;
    // `seq` adds at most 28 bytes when the event is stored; count it so that what we accept is what
    // a reader receives.
    let size = body.len() + 28;
    if size > limits.max_event_bytes {
        return Err(EventError::TooLarge {
            size,
            limit: limits.max_event_bytes,
        });
    }
    Ok(Accepted {
        id,
        channel,
        key,
        deleted,
        source: source.to_owned(),
        body,
    })
}

fn take_string(
    fields: &mut BTreeMap<String, Box<RawValue>>,
    name: &str,
) -> Result<Option<String>, EventError> {
    match fields.remove(name) {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .map(Some)
            .map_err(|_| EventError::invalid(name, "must be a string")),
    }
}

fn take_attribute(
    fields: &mut BTreeMap<String, Box<RawValue>>,
    name: &str,
) -> Result<Option<String>, EventError> {
    let value = take_string(fields, name)?;
    if let Some(value) = &value {
        check_len(name, value, MAX_ATTRIBUTE_LEN)?;
    }
    Ok(value)
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), EventError> {
    let len = value.chars().count();
    if len == 0 || len > max {
        return Err(EventError::invalid(
            field,
            format!("must be 1-{max} characters"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parse(value: Value) -> Result<Accepted, EventError> {
        parse_event(value.to_string().as_bytes(), "svc", &Limits::default())
    }

    fn body(accepted: &Accepted) -> Value {
        serde_json::from_slice(&accepted.body).unwrap()
    }

    #[test]
    fn completes_and_overrides_bus_fields() {
        let event = parse(json!({"type":"order_placed","channel":"orders","source":"evil","seq":9,"data":{"n":1}})).unwrap();
        let value = body(&event);
        assert_eq!(value["source"], "svc");
        assert!(value.get("seq").is_none());
        assert_eq!(value["specversion"], "1.0");
        assert_eq!(value["data"], json!({"n":1}));
        assert!(uuid::Uuid::parse_str(&event.id).is_ok());
        assert!(chrono::DateTime::parse_from_rfc3339(value["time"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn keeps_given_attributes_and_extensions() {
        let event = parse(json!({"id":"e-1","type":"t","channel":"a.b","time":"2026-01-02T03:04:05Z","subject":"s",
            "datacontenttype":"application/json","dataschema":"https://x/y","traceparent":"00-ab","prio":3,"key":"k"}))
        .unwrap();
        let value = body(&event);
        assert_eq!(value["id"], "e-1");
        assert_eq!(value["time"], "2026-01-02T03:04:05Z");
        assert_eq!(value["traceparent"], "00-ab");
        assert_eq!(value["prio"], 3);
        assert_eq!(value["subject"], "s");
        assert_eq!(event.key.as_deref(), Some("k"));
    }

    #[test]
    fn to_is_the_inbox_channel() {
        let event = parse(json!({"type":"t","to":"alice"})).unwrap();
        assert_eq!(event.channel, "inbox.alice");
        assert_eq!(body(&event)["channel"], "inbox.alice");
        assert!(body(&event).get("to").is_none());
        assert_eq!(
            parse(json!({"type":"t","to":"a.b"})).unwrap_err().field(),
            Some("to")
        );
        assert_eq!(
            parse(json!({"type":"t","to":"a","channel":"b"}))
                .unwrap_err()
                .field(),
            Some("to")
        );
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        let cases = [
            (json!({"channel":"a"}), "type"),
            (json!({"type":"t"}), "channel"),
            (json!({"type":"","channel":"a"}), "type"),
            (json!({"type":"t","channel":"a..b"}), "channel"),
            (json!({"type":"t","channel":"a.*"}), "channel"),
            (json!({"type":"t","channel":"a","id":""}), "id"),
            (json!({"type":"t","channel":"a","id":"é"}), "id"),
            (json!({"type":"t","channel":"a","id":"x".repeat(129)}), "id"),
            (json!({"type":"t","channel":"a","id":5}), "id"),
            (json!({"type":"t","channel":"a","time":"yesterday"}), "time"),
            (json!({"type":"t","channel":"a","deleted":true}), "deleted"),
            (
                json!({"type":"t","channel":"a","specversion":"0.3"}),
                "specversion",
            ),
            (
                json!({"type":"t","channel":"a","Unknown_Field":1}),
                "Unknown_Field",
            ),
            (json!({"type":"t","channel":"a","ext":{"nested":1}}), "ext"),
        ];
        for (input, field) in cases {
            let err = parse(input.clone()).unwrap_err();
            assert_eq!(err.field(), Some(field), "{input}: {err}");
        }
    }

    #[test]
    fn malformed_and_non_objects() {
        assert!(matches!(
            parse_event(b"{", "s", &Limits::default()),
            Err(EventError::Malformed(_))
        ));
        assert_eq!(
            parse_event(b"[1]", "s", &Limits::default()),
            Err(EventError::NotAnObject)
        );
        assert_eq!(
            parse_event(b"\"x\"", "s", &Limits::default()),
            Err(EventError::NotAnObject)
        );
    }

    #[test]
    fn size_limit_counts_the_serialized_event() {
        let limits = Limits {
            max_event_bytes: 200,
        };
        let small = json!({"type":"t","channel":"a","data":"x"});
        assert!(parse_event(small.to_string().as_bytes(), "s", &limits).is_ok());
        let big = json!({"type":"t","channel":"a","data":"x".repeat(300)});
        assert!(matches!(
            parse_event(big.to_string().as_bytes(), "s", &limits),
            Err(EventError::TooLarge { .. })
        ));
    }

    #[test]
    fn batches_are_all_or_nothing_and_name_the_index() {
        let ok = json!([{"type":"t","channel":"a"},{"type":"t","channel":"b"}]);
        assert_eq!(
            parse_events(ok.to_string().as_bytes(), "s", &Limits::default())
                .unwrap()
                .len(),
            2
        );
        let bad = json!([{"type":"t","channel":"a"},{"channel":"b"}]);
        let (index, err) =
            parse_events(bad.to_string().as_bytes(), "s", &Limits::default()).unwrap_err();
        assert_eq!(index, Some(1));
        assert_eq!(err.field(), Some("type"));
        assert!(parse_events(b"[]", "s", &Limits::default()).is_err());
    }
}
