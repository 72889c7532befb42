//! The WebSocket protocol's frames (docs/protocol.md §6): parsing what clients send, field by field so that an
//! error names what is wrong, and building what the gateway answers.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::{Value, json};

/// A refused frame: the error frame's `code` and `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
    pub channel: Option<String>,
    /// For `truncated`: the first seq still retained.
    pub first_seq: Option<u64>,
}

impl FrameError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            channel: None,
            first_seq: None,
        }
    }

    pub fn with_channel(mut self, channel: &str) -> Self {
        self.channel = Some(channel.to_owned());
        self
    }

    pub fn with_first_seq(mut self, first: u64) -> Self {
        self.first_seq = Some(first);
        self
    }
}

/// A durable subscription's settings, as the frame gives them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    pub visibility_ms: Option<u64>,
    pub max_deliveries: Option<u32>,
    pub prefetch: Option<u32>,
}

#[derive(Debug)]
pub enum Request {
    /// Without a token, the connect hook decides who the connection is (when one is configured).
    Hello {
        token: Option<String>,
    },
    Subscribe {
        channel: String,
        after: Option<u64>,
        compact: bool,
        group: Option<String>,
        /// A durable group: its position is kept by the store (see [`crate::durable`]).
        durable: Option<Durable>,
    },
    /// A member of a durable group is done with events of one channel (`seq`, or `seqs`).
    Done {
        group: Option<String>,
        channel: String,
        seqs: Vec<u64>,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        event: Box<RawValue>,
    },
    Ping,
    Refresh {
        token: String,
    },
}

/// A client frame: what it asks, and the `ref` to echo.
#[derive(Debug)]
pub struct Frame {
    pub request: Request,
    pub reference: Option<Box<RawValue>>,
}

struct Fields(BTreeMap<String, Box<RawValue>>);

impl Fields {
    fn string(&mut self, name: &str) -> Result<Option<String>, FrameError> {
        self.0
            .remove(name)
            .map(|raw| {
                serde_json::from_str::<String>(raw.get())
                    .map_err(|_| invalid(format!("{name} must be a string")))
            })
            .transpose()
    }

    fn required(&mut self, name: &str) -> Result<String, FrameError> {
        self.string(name)?
            .ok_or_else(|| invalid(format!("{name} is required")))
    }

    fn seq(&mut self, name: &str) -> Result<Option<u64>, FrameError> {
        self.0
            .remove(name)
            .map(|raw| {
                serde_json::from_str::<u64>(raw.get())
                    .map_err(|_| invalid(format!("{name} must be a seq (a whole number)")))
            })
            .transpose()
    }

    fn seqs(&mut self, name: &str) -> Result<Option<Vec<u64>>, FrameError> {
        self.0
            .remove(name)
            .map(|raw| {
                serde_json::from_str::<Vec<u64>>(raw.get())
                    .map_err(|_| invalid(format!("{name} must be a list of seqs")))
            })
            .transpose()
    }

    fn small(&mut self, name: &str) -> Result<Option<u32>, FrameError> {
        self.0
            .remove(name)
            .map(|raw| {
                serde_json::from_str::<u32>(raw.get())
                    .map_err(|_| invalid(format!("{name} must be a whole number")))
            })
            .transpose()
    }

    fn flag(&mut self, name: &str) -> Result<bool, FrameError> {
        Ok(self
            .0
            .remove(name)
            .map(|raw| {
                serde_json::from_str::<bool>(raw.get())
                    .map_err(|_| invalid(format!("{name} must be true or false")))
            })
            .transpose()?
            .unwrap_or(false))
    }

    fn finish(self, op: &str) -> Result<(), FrameError> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(unknown) => Err(invalid(format!(
                "unknown field {unknown:?} in a {op} frame"
            ))),
        }
    }
}

fn invalid(message: String) -> FrameError {
    FrameError::new("invalid_frame", message)
}

/// Parses one text frame. On error, returns the `ref` too when it could be read, so that the error
/// answer can carry it.
pub fn parse(text: &str) -> Result<Frame, (FrameError, Option<Box<RawValue>>)> {
    let map: BTreeMap<String, Box<RawValue>> = serde_json::from_str(text).map_err(|err| {
        (
            FrameError::new("bad_frame", format!("a frame must be a JSON object: {err}")),
            None,
        )
    })?;
    let mut fields = Fields(map);
    let reference = fields.0.remove("ref");
    if let Some(raw) = &reference {
        let value: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
        if !(value.is_number() || value.is_string()) {
            return Err((invalid("ref must be a number or a string".into()), None));
        }
    }
    let result = (|| {
        let op = fields
            .required("op")
            .map_err(|_| FrameError::new("bad_frame", "a frame needs an op"))?;
        let request = match op.as_str() {
            "hello" => Request::Hello {
                token: fields.string("token")?,
            },
            "subscribe" => {
                let channel = fields.required("channel")?;
                let after = fields.seq("after")?;
                let compact = fields.flag("compact")?;
                let group = fields.string("group")?;
                let durable = if fields.flag("durable")? {
                    Some(Durable {
                        visibility_ms: fields.seq("visibility_ms")?,
                        max_deliveries: fields.small("max_deliveries")?,
                        prefetch: fields.small("prefetch")?,
                    })
                } else {
                    None
                };
                Request::Subscribe {
                    channel,
                    after,
                    compact,
                    group,
                    durable,
                }
            }
            "done" => {
                let group = fields.string("group")?;
                let channel = fields.required("channel")?;
                let seqs = match (fields.seq("seq")?, fields.seqs("seqs")?) {
                    (Some(seq), None) => vec![seq],
                    (None, Some(seqs)) if !seqs.is_empty() && seqs.len() <= 1000 => seqs,
                    _ => {
                        return Err(invalid(
                            "done needs seq, or seqs (1-1000 of them), not both".into(),
                        ));
                    }
                };
                Request::Done {
                    group,
                    channel,
                    seqs,
                }
            }
            "unsubscribe" => Request::Unsubscribe {
                channel: fields.required("channel")?,
            },
            "publish" => Request::Publish {
                event: fields
                    .0
                    .remove("event")
                    .ok_or_else(|| invalid("event is required".into()))?,
            },
            "ping" => Request::Ping,
            "refresh" => Request::Refresh {
                token: fields.required("token")?,
            },
            other => {
                return Err(FrameError::new(
                    "unknown_op",
                    format!("unknown op {other:?}"),
                ));
            }
        };
        fields.finish(&op)?;
        Ok(request)
    })();
    match result {
        Ok(request) => Ok(Frame { request, reference }),
        Err(err) => Err((err, reference)),
    }
}

/// Adds `ref` to an answer when the client gave one.
pub fn with_ref(mut answer: Value, reference: Option<&RawValue>) -> String {
    if let (Some(raw), Value::Object(map)) = (reference, &mut answer)
        && let Ok(value) = serde_json::from_str::<Value>(raw.get())
    {
        map.insert("ref".into(), value);
    }
    answer.to_string()
}

pub fn error(err: &FrameError, reference: Option<&RawValue>) -> String {
    let mut frame = json!({"op": "error", "code": err.code, "message": err.message});
    if let Some(channel) = &err.channel {
        frame["channel"] = json!(channel);
    }
    if let Some(first) = err.first_seq {
        frame["first_seq"] = json!(first);
    }
    with_ref(frame, reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_op() {
        let frame =
            parse(r#"{"op":"subscribe","channel":"orders","after":41,"compact":true,"ref":7}"#)
                .unwrap();
        assert!(
            matches!(frame.request, Request::Subscribe { ref channel, after: Some(41), compact: true, group: None, durable: None } if channel == "orders")
        );
        assert_eq!(frame.reference.unwrap().get(), "7");
        assert!(matches!(
            parse(r#"{"op":"ping"}"#).unwrap().request,
            Request::Ping
        ));
        assert!(matches!(
            parse(r#"{"op":"publish","event":{"type":"t"}}"#)
                .unwrap()
                .request,
            Request::Publish { .. }
        ));
    }

    #[test]
    fn refuses_with_a_code_and_keeps_the_ref() {
        let cases = [
            ("not json", "bad_frame"),
            ("[1]", "bad_frame"),
            (r#"{"channel":"x"}"#, "bad_frame"),
            (r#"{"op":"dance"}"#, "unknown_op"),
            (r#"{"op":"subscribe"}"#, "invalid_frame"),
            (
                r#"{"op":"subscribe","channel":"x","after":-1}"#,
                "invalid_frame",
            ),
            (
                r#"{"op":"subscribe","channel":"x","colour":"red"}"#,
                "invalid_frame",
            ),
            (r#"{"op":"ping","ref":{"a":1}}"#, "invalid_frame"),
        ];
        for (text, code) in cases {
            let (err, _) = parse(text).unwrap_err();
            assert_eq!(err.code, code, "{text}");
        }
        let (_, reference) = parse(r#"{"op":"dance","ref":"r1"}"#).unwrap_err();
        let answer: Value = serde_json::from_str(&error(
            &FrameError::new("unknown_op", "x"),
            reference.as_deref(),
        ))
        .unwrap();
        assert_eq!(answer["ref"], "r1");
    }
}
