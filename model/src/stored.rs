//! A stored event on the wire: the event's JSON object with `seq` as its first member.
//!
//! The store keeps an event's body (its JSON without `seq`) as opaque bytes; `seq` is spliced in front
//! when the event leaves the store, so that no service parses an event again after ingest.

use bytes::{BufMut, Bytes, BytesMut};

/// One event as it leaves the store: its channel, its `seq` and its finished JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub channel: String,
    pub seq: u64,
    /// The event's JSON object, `{"seq":N,...}`.
    pub json: Bytes,
    /// Unix ms at which the store committed it, on the live path (0 when read back from the log).
    pub committed_ms: u64,
}

/// `{"seq":N,` followed by the body without its opening brace.
pub fn with_seq(body: &[u8], seq: u64) -> Bytes {
    let rest = body.strip_prefix(b"{").unwrap_or(body);
    let mut out = BytesMut::with_capacity(body.len() + 28);
    out.put_slice(b"{\"seq\":");
    out.put_slice(seq.to_string().as_bytes());
    if rest != b"}" {
        out.put_u8(b',');
    }
    out.put_slice(rest);
    out.freeze()
}

/// The `seq` of an event rendered by [`with_seq`], read without parsing the rest.
pub fn seq_of(json: &[u8]) -> Option<u64> {
    let rest = json.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// The WebSocket frame that carries one event to a client: built once, shared by every connection.
pub fn event_frame(json: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 24);
    out.put_slice(b"{\"op\":\"event\",\"event\":");
    out.put_slice(json);
    out.put_u8(b'}');
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_is_spliced_in_front_and_read_back() {
        let json = with_seq(br#"{"id":"a","type":"t"}"#, 42);
        assert_eq!(&json[..], br#"{"seq":42,"id":"a","type":"t"}"#);
        assert_eq!(seq_of(&json), Some(42));
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["seq"], 42);
        assert_eq!(seq_of(b"{\"id\":1}"), None);
        assert_eq!(&with_seq(b"{}", 1)[..], b"{\"seq\":1}");
    }

    #[test]
    fn event_frame_is_valid_json() {
        let frame = event_frame(br#"{"seq":1,"id":"a"}"#);
        let value: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(value["op"], "event");
        assert_eq!(value["event"]["seq"], 1);
    }
}
