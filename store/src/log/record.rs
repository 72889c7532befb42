//! The on-disk record: `[len u32 LE][crc32c u32 LE][payload]`, payload = `seq u64 | time_ms u64 |
//! channel (u16 len) | id (u16 len) | flags u8 | key (u16 len, if flagged) | source (u16 len, if
//! flagged) | body (u32 len)`. Records written before store format 2 carry no source: it is read
//! from their body when needed.
//! The checksum covers the payload, so a torn or flipped record is detected before it is served.

pub const HEADER_LEN: usize = 8;
/// A record larger than this is taken for garbage during recovery.
pub const MAX_PAYLOAD_LEN: usize = 32 * 1024 * 1024;

const FLAG_KEY: u8 = 1;
const FLAG_DELETED: u8 = 2;
const FLAG_SOURCE: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub seq: u64,
    /// Commit time, Unix milliseconds: what retention by age and the dedupe window go by.
    pub time_ms: u64,
    pub channel: &'a str,
    pub id: &'a str,
    pub key: Option<&'a str>,
    pub deleted: bool,
    /// The publisher (from store format 2 on).
    pub source: Option<&'a str>,
    pub body: &'a [u8],
}

impl Record<'_> {
    /// The publisher: recorded, or for a record written before sources were, the body's `source`
    /// (the bus always sets it); "" when neither says.
    pub fn source_or_from_body(&self) -> std::borrow::Cow<'_, str> {
        if let Some(source) = self.source {
            return source.into();
        }
        #[derive(serde::Deserialize)]
        struct Source {
            source: Option<String>,
        }
        serde_json::from_slice::<Source>(self.body)
            .ok()
            .and_then(|s| s.source)
            .unwrap_or_default()
            .into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is cut short")]
    Short,
    #[error("record length {0} is out of bounds")]
    BadLength(usize),
    #[error("checksum mismatch")]
    Checksum,
    #[error("record payload is malformed")]
    Malformed,
}

/// Appends the encoded record to `out`; returns its length on disk.
pub fn encode(record: &Record<'_>, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    out.extend_from_slice(&record.seq.to_le_bytes());
    out.extend_from_slice(&record.time_ms.to_le_bytes());
    put_short(out, record.channel.as_bytes());
    put_short(out, record.id.as_bytes());
    let mut flags = 0;
    if record.key.is_some() {
        flags |= FLAG_KEY;
    }
    if record.deleted {
        flags |= FLAG_DELETED;
    }
    if record.source.is_some() {
        flags |= FLAG_SOURCE;
    }
    out.push(flags);
    if let Some(key) = record.key {
        put_short(out, key.as_bytes());
    }
    if let Some(source) = record.source {
        put_short(out, source.as_bytes());
    }
    out.extend_from_slice(&(record.body.len() as u32).to_le_bytes());
    out.extend_from_slice(record.body);
    let payload_len = out.len() - start - HEADER_LEN;
    let crc = crc32c::crc32c(&out[start + HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// Whether a record of these fields can be encoded and read back: what every append is checked
/// against before it is written, so that nothing acknowledged is unreadable.
pub fn check(
    channel: &str,
    id: &str,
    key: Option<&str>,
    source: Option<&str>,
    body: &[u8],
) -> Result<(), String> {
    for (name, value) in [
        ("channel", Some(channel)),
        ("id", Some(id)),
        ("key", key),
        ("source", source),
    ] {
        if let Some(value) = value
            && value.len() > u16::MAX as usize
        {
            return Err(format!(
                "{name} is {} bytes; a record holds at most {}",
                value.len(),
                u16::MAX
            ));
        }
    }
    let fixed = 8 + 8 + 2 + 2 + 1 + 4 + key.map_or(0, |_| 2) + source.map_or(0, |_| 2);
    let payload = fixed
        + channel.len()
        + id.len()
        + key.map_or(0, str::len)
        + source.map_or(0, str::len)
        + body.len();
    if payload > MAX_PAYLOAD_LEN {
        return Err(format!(
            "the event is {} bytes; a record holds at most {}",
            body.len(),
            MAX_PAYLOAD_LEN - (payload - body.len())
        ));
    }
    Ok(())
}

fn put_short(out: &mut Vec<u8>, bytes: &[u8]) {
    // Every append passed `check`, so the length fits.
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Decodes the record at the start of `buf`; returns it and its length on disk.
pub fn decode(buf: &[u8]) -> Result<(Record<'_>, usize), DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Short);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > MAX_PAYLOAD_LEN {
        return Err(DecodeError::BadLength(len));
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let payload = buf
        .get(HEADER_LEN..HEADER_LEN + len)
        .ok_or(DecodeError::Short)?;
    if crc32c::crc32c(payload) != crc {
        return Err(DecodeError::Checksum);
    }
    let mut cursor = Cursor {
        buf: payload,
        pos: 0,
    };
    let seq = cursor.u64()?;
    let time_ms = cursor.u64()?;
    let channel = cursor.short_str()?;
    let id = cursor.short_str()?;
    let flags = cursor.take(1)?[0];
    if flags & !(FLAG_KEY | FLAG_DELETED | FLAG_SOURCE) != 0 {
        return Err(DecodeError::Malformed);
    }
    let key = if flags & FLAG_KEY != 0 {
        Some(cursor.short_str()?)
    } else {
        None
    };
    let source = if flags & FLAG_SOURCE != 0 {
        Some(cursor.short_str()?)
    } else {
        None
    };
    let body_len = u32::from_le_bytes(
        cursor
            .take(4)?
            .try_into()
            .map_err(|_| DecodeError::Malformed)?,
    ) as usize;
    let body = cursor.take(body_len)?;
    if cursor.pos != payload.len() {
        return Err(DecodeError::Malformed);
    }
    Ok((
        Record {
            seq,
            time_ms,
            channel,
            id,
            key,
            deleted: flags & FLAG_DELETED != 0,
            source,
            body,
        },
        HEADER_LEN + len,
    ))
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let out = self
            .buf
            .get(self.pos..self.pos + n)
            .ok_or(DecodeError::Malformed)?;
        self.pos += n;
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let bytes = self
            .take(8)?
            .try_into()
            .map_err(|_| DecodeError::Malformed)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn short_str(&mut self) -> Result<&'a str, DecodeError> {
        let len = u16::from_le_bytes(
            self.take(2)?
                .try_into()
                .map_err(|_| DecodeError::Malformed)?,
        ) as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record<'static> {
        Record {
            seq: 7,
            time_ms: 1_700_000_000_000,
            channel: "orders",
            id: "e1",
            key: Some("k"),
            deleted: true,
            source: Some("svc"),
            body: br#"{"id":"e1"}"#,
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        let len = encode(&sample(), &mut buf);
        assert_eq!(len, buf.len());
        let (decoded, used) = decode(&buf).unwrap();
        assert_eq!(decoded, sample());
        assert_eq!(used, len);
    }

    #[test]
    fn check_admits_exactly_what_decodes() {
        let body = vec![b'x'; 100];
        assert!(check("c", "i", Some("k"), Some("s"), &body).is_ok());
        let long = "k".repeat(u16::MAX as usize + 1);
        let refused = |key: Option<&str>, id: &str, source: Option<&str>| {
            check("c", id, key, source, &body).unwrap_err()
        };
        assert!(refused(Some(&long), "i", None).contains("key"));
        assert!(refused(None, &long, None).contains("id"));
        assert!(refused(None, "i", Some(&long)).contains("source"));
        let fixed = 8 + 8 + 2 + 1 + 2 + 1 + 1 + 4;
        let largest = vec![0u8; MAX_PAYLOAD_LEN - fixed];
        assert!(check("c", "i", None, None, &largest).is_ok());
        let mut buf = Vec::new();
        let record = Record {
            body: &largest,
            key: None,
            source: None,
            ..sample()
        };
        let record = Record {
            channel: "c",
            id: "i",
            ..record
        };
        encode(&record, &mut buf);
        assert!(
            decode(&buf).is_ok(),
            "the largest record checked in reads back"
        );
        let over = vec![0u8; MAX_PAYLOAD_LEN - fixed + 1];
        assert!(check("c", "i", None, None, &over).is_err());
    }

    #[test]
    fn records_without_a_source_read_it_from_their_body() {
        let legacy = Record {
            source: None,
            body: br#"{"id":"e1","source":"billing"}"#,
            ..sample()
        };
        let mut buf = Vec::new();
        encode(&legacy, &mut buf);
        let (decoded, _) = decode(&buf).unwrap();
        assert_eq!(decoded.source, None);
        assert_eq!(decoded.source_or_from_body(), "billing");
        assert_eq!(sample().source_or_from_body(), "svc");
    }

    #[test]
    fn every_flipped_byte_and_every_cut_is_detected() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at {i} went unnoticed");
            assert!(decode(&buf[..i]).is_err(), "cut at {i} went unnoticed");
        }
    }
}
