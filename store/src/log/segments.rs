//! Segment files: the log is a directory of `<number>.seg` files, each append-only, the newest one
//! open for writing. Recovery scans them in order and cuts a torn tail off the newest.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::LogError;
use super::record::{self, Record};

pub fn path_of(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{segment:010}.seg"))
}

/// The segment numbers present in `dir`, ascending.
pub fn list(dir: &Path) -> Result<Vec<u32>, LogError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|err| LogError::io(dir, err))? {
        let entry = entry.map_err(|err| LogError::io(dir, err))?;
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        segments.push(number);
    }
    segments.sort_unstable();
    Ok(segments)
}

pub fn open_read(dir: &Path, segment: u32) -> Result<File, LogError> {
    let path = path_of(dir, segment);
    File::open(&path).map_err(|err| LogError::io(&path, err))
}

/// Opens (creating it if new) a segment for the writer, which writes at offsets it keeps itself
/// (not in append mode: the segment may end in zeros written ahead, see `writer`).
pub fn open_write(dir: &Path, segment: u32) -> Result<File, LogError> {
    let path = path_of(dir, segment);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|err| LogError::io(&path, err))?;
    // A new file's directory entry must be durable too, or a crash could lose the whole segment.
    sync_dir(dir)?;
    Ok(file)
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old file or the new one, never a
/// mix: a temporary file written and fsync'd, renamed over the old one, the directory fsync'd.
pub fn replace_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), LogError> {
    use std::io::Write;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |err| LogError::io(&tmp, err);
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(|err| LogError::io(&path, err))?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|err| LogError::io(dir, err))
}

/// Reads every valid record of one segment from byte `start`, calling `visit` with each record and
/// its offset.
/// Returns the length of the valid prefix. When `is_last`, a torn tail (what a crash leaves of a
/// write that was never synced, so never acknowledged) is cut off the file; elsewhere an invalid
/// record is an error, since a sealed segment was fully durable before the next one began.
///
/// A record that decodes and passes its checksum is never cut: an error from `visit`, or a valid
/// record anywhere after the invalid bytes (damage in the middle of the log, not a torn tail),
/// refuses to start instead.
pub fn scan(
    dir: &Path,
    segment: u32,
    start: u64,
    is_last: bool,
    mut visit: impl FnMut(&Record<'_>, u64, u32) -> Result<(), LogError>,
) -> Result<u64, LogError> {
    let path = path_of(dir, segment);
    let mut data = Vec::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|err| LogError::io(&path, err))?;
    let mut offset = start as usize;
    if offset > data.len() {
        return Err(LogError::Corrupt {
            path,
            offset: start,
            cause: format!(
                "the segment is shorter ({} bytes) than the index says",
                data.len()
            ),
        });
    }
    let mut failure = None;
    while offset < data.len() {
        match record::decode(&data[offset..]) {
            Ok((record, len)) => {
                visit(&record, offset as u64, len as u32).map_err(|err| LogError::Corrupt {
                    path: path.clone(),
                    offset: offset as u64,
                    cause: err.to_string(),
                })?;
                offset += len;
            }
            Err(err) => {
                failure = Some(err.to_string());
                break;
            }
        }
    }
    if let Some(cause) = failure {
        // Zeros from the last record to the end are the space the writer fills ahead (a crash or
        // a kill left them): no torn write, nothing to warn about, cut all the same.
        if is_last && data[offset..].iter().all(|&b| b == 0) {
            debug!(segment = %path.display(), offset, zeros = data.len() - offset, "cutting the zeros written ahead off the log");
            truncate(&path, offset as u64)?;
            return Ok(offset as u64);
        }
        if !is_last {
            return Err(LogError::Corrupt {
                path,
                offset: offset as u64,
                cause,
            });
        }
        if let Some(valid) = next_valid_record(&data, offset + 1) {
            return Err(LogError::Corrupt {
                path,
                offset: offset as u64,
                cause: format!(
                    "{cause}, yet a valid record follows at byte {valid}: the log is damaged in the middle, not torn at its end; refusing to cut acknowledged records"
                ),
            });
        }
        warn!(
            segment = %path.display(),
            offset,
            cut_bytes = data.len() - offset,
            cause,
            "cutting a torn tail off the log"
        );
        truncate(&path, offset as u64)?;
    }
    Ok(offset as u64)
}

/// Cuts a segment to `len` bytes, durably (the size is metadata: `sync_all`).
pub fn truncate(path: &Path, len: u64) -> Result<(), LogError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|err| LogError::io(path, err))?;
    file.set_len(len).map_err(|err| LogError::io(path, err))?;
    file.sync_all().map_err(|err| LogError::io(path, err))
}

/// The offset of the first whole, checksummed record at or after `from`, trying every byte.
fn next_valid_record(data: &[u8], from: usize) -> Option<usize> {
    (from..data.len()).find(|&at| record::decode(&data[at..]).is_ok())
}

/// Whether the first `end` bytes of a segment are whole, valid records: how a checkpoint's claim
/// about the newest segment is checked before it is trusted.
pub fn verify_prefix(dir: &Path, segment: u32, end: u64) -> Result<bool, LogError> {
    let path = path_of(dir, segment);
    let mut data = Vec::new();
    File::open(&path)
        .and_then(|f| f.take(end).read_to_end(&mut data))
        .map_err(|err| LogError::io(&path, err))?;
    let mut offset = 0;
    while offset < data.len() {
        match record::decode(&data[offset..]) {
            Ok((_, len)) => offset += len,
            Err(_) => return Ok(false),
        }
    }
    Ok(offset as u64 == end)
}
