//! The retention manifest: what retention has let go, made durable *before* any segment is deleted,
//! so that a start after a crash knows it without a clean stop or a checkpoint.
//!
//! It holds, per channel, the first retained seq (a recovery scan that finds a channel jumping
//! over deleted segments checks the jump against it), and the idempotency entries of the events let
//! go that are still inside the window (their records are about to disappear with their segments,
//! and a retry of such an id must still be answered as a duplicate).
//!
//! Layout (little endian): magic `EBRETIRE`, format version u32, channel count u64, then per
//! channel `name (u32 len) first u64`, entry count u64, then per entry `time u64, key (u32 len),
//! seq u64`, then a CRC32C of everything before it. Written to a temporary file, fsync'd, renamed
//! over the old one, and the directory fsync'd.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::codec::{Input, Output};
use super::{LogError, segments};

const MAGIC: &[u8; 8] = b"EBRETIRE";
/// The format written; a reader refuses newer versions rather than misreading them. 2:
/// idempotency keys are `channel \n source \n id`; a version 1 manifest's firsts are read, its
/// keys (without a source) dropped.
pub const VERSION: u32 = 2;

const NAME: &str = "retired.manifest";

pub fn path_of(dir: &Path) -> PathBuf {
    dir.join(NAME)
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Retired {
    /// Per channel, the first seq retention kept when this was written.
    pub firsts: HashMap<String, u64>,
    /// Idempotency entries of events let go: (commit time, dedupe key, seq), oldest first.
    pub window: Vec<(u64, Arc<str>, u64)>,
}

pub fn encode(retired: &Retired) -> Vec<u8> {
    let mut out = Output::with_capacity(64 + retired.firsts.len() * 24 + retired.window.len() * 48);
    out.bytes(MAGIC);
    out.u32(VERSION);
    out.u64(retired.firsts.len() as u64);
    let mut firsts: Vec<_> = retired.firsts.iter().collect();
    firsts.sort_unstable();
    for (channel, first) in firsts {
        out.str(channel);
        out.u64(*first);
    }
    out.u64(retired.window.len() as u64);
    for (time, key, seq) in &retired.window {
        out.u64(*time);
        out.str(key);
        out.u64(*seq);
    }
    out.finish()
}

/// Decodes a manifest; `Err` says what is wrong with it.
pub fn decode(bytes: &[u8]) -> Result<Retired, String> {
    let mut input = Input::checked(bytes).ok_or("checksum mismatch")?;
    if input.take(8) != Some(MAGIC.as_slice()) {
        return Err("not a retention manifest".into());
    }
    let version = input.u32().ok_or("cut short")?;
    if !(1..=VERSION).contains(&version) {
        return Err(format!(
            "format version {version} is not one this build reads ({VERSION})"
        ));
    }
    let malformed = || "malformed".to_owned();
    let channels = input.count(12).ok_or_else(malformed)?;
    let mut firsts = HashMap::with_capacity(channels);
    for _ in 0..channels {
        let channel = input.str().ok_or_else(malformed)?.to_owned();
        firsts.insert(channel, input.u64().ok_or_else(malformed)?);
    }
    let entries = input.count(20).ok_or_else(malformed)?;
    let mut window = Vec::with_capacity(entries);
    for _ in 0..entries {
        let time = input.u64().ok_or_else(malformed)?;
        let key: Arc<str> = Arc::from(input.str().ok_or_else(malformed)?);
        window.push((time, key, input.u64().ok_or_else(malformed)?));
    }
    if !input.is_empty() {
        return Err("trailing bytes".into());
    }
    if version < 2 {
        window.clear();
    }
    Ok(Retired { firsts, window })
}

/// Writes the manifest durably.
pub fn write(dir: &Path, retired: &Retired) -> Result<(), LogError> {
    segments::replace_durably(dir, NAME, &encode(retired))
}

/// The manifest in `dir`: none when retention never deleted a segment there. One that cannot be
/// read is an error: starting without it could hand out ids as new that were already stored.
pub fn read(dir: &Path) -> Result<Option<Retired>, LogError> {
    let path = path_of(dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(LogError::io(&path, err)),
    };
    decode(&bytes).map(Some).map_err(|cause| LogError::Corrupt {
        path,
        offset: 0,
        cause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let retired = Retired {
            firsts: HashMap::from([("a".to_owned(), 7), ("b.c".to_owned(), 281)]),
            window: vec![
                (10, Arc::from("a\nid-1"), 3),
                (11, Arc::from("b.c\nx"), 200),
            ],
        };
        let bytes = encode(&retired);
        assert_eq!(decode(&bytes), Ok(retired));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(decode(&bad).is_err(), "a flip at byte {i} went unnoticed");
            assert!(
                decode(&bytes[..i]).is_err(),
                "a cut at byte {i} went unnoticed"
            );
        }
    }
}
