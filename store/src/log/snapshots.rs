//! Snapshots: a service's state of a channel as of a seq, so a consumer rebuilds state from the
//! latest snapshot plus the events after it instead of replaying from seq 1. One file per channel
//! holds the latest snapshot: `[seq u64][crc32c u32][len u32][data]`, replaced atomically.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{LogError, segments};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub seq: u64,
    /// JSON text, as the service gave it.
    pub data: Bytes,
}

pub fn dir_of(log_dir: &Path) -> PathBuf {
    log_dir.join("snapshots")
}

fn path_of(dir: &Path, channel: &str) -> PathBuf {
    // Channel names are tokens of [A-Za-z0-9_-] joined by dots: always a plain file name.
    dir.join(format!("{channel}.snap"))
}

/// The latest snapshot of `channel`, if any; a damaged file counts as none (and is reported).
pub fn read(dir: &Path, channel: &str) -> Result<Option<Snapshot>, LogError> {
    let path = path_of(dir, channel);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(LogError::io(&path, err)),
    };
    let corrupt = |cause: &str| LogError::Corrupt {
        path: path.clone(),
        offset: 0,
        cause: cause.to_owned(),
    };
    if bytes.len() < 16 {
        return Err(corrupt("snapshot header cut short"));
    }
    let seq = u64::from_le_bytes(bytes[0..8].try_into().map_err(|_| corrupt("header"))?);
    let crc = u32::from_le_bytes(bytes[8..12].try_into().map_err(|_| corrupt("header"))?);
    let len = u32::from_le_bytes(bytes[12..16].try_into().map_err(|_| corrupt("header"))?) as usize;
    let data = bytes
        .get(16..16 + len)
        .ok_or_else(|| corrupt("snapshot data cut short"))?;
    if crc32c::crc32c(data) != crc {
        return Err(corrupt("snapshot checksum mismatch"));
    }
    Ok(Some(Snapshot {
        seq,
        data: Bytes::copy_from_slice(data),
    }))
}

/// Replaces the snapshot of `channel`; durable when this returns.
pub fn write(dir: &Path, channel: &str, snapshot: &Snapshot) -> Result<(), LogError> {
    std::fs::create_dir_all(dir).map_err(|err| LogError::io(dir, err))?;
    let mut bytes = Vec::with_capacity(16 + snapshot.data.len());
    bytes.extend_from_slice(&snapshot.seq.to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(&snapshot.data).to_le_bytes());
    bytes.extend_from_slice(&(snapshot.data.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&snapshot.data);
    segments::replace_durably(dir, &format!("{channel}.snap"), &bytes)
}
