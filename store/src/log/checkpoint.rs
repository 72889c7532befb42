//! The index checkpoint: the whole in-memory state of the log (index, segment facts, idempotency
//! window) as of a position in the log, so that a restart loads it and scans only the records
//! written after it, instead of the whole log. It is an optimisation only: a missing, damaged or
//! stale checkpoint is ignored and the index is rebuilt from the segments, which stay the truth.
//!
//! Layout (little endian): magic, covered position, channels, segments, window, then a CRC32C of
//! everything before it. Written to a temporary file, fsync'd, renamed over the old one.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use super::codec::{Input, Output};
use super::dedupe::Dedupe;
use super::index::{ChannelIndex, Index, Location, SegmentInfo};
use super::{LogError, segments};

/// The last two characters are the format version: a reader ignores a checkpoint of any other
/// version (and rebuilds from the segments) rather than misreading it. 02: idempotency keys are
/// `channel \n source \n id` (01 had no source).
const MAGIC: &[u8; 8] = b"EBCKPT02";

const NAME: &str = "index.ckpt";

pub fn path_of(dir: &Path) -> PathBuf {
    dir.join(NAME)
}

/// Where the checkpoint's knowledge ends: every record before this position is in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub segment: u32,
    pub offset: u64,
}

/// Writes the checkpoint durably.
pub fn write(
    dir: &Path,
    index: &Index,
    dedupe: &Dedupe,
    covered: Position,
) -> Result<(), LogError> {
    let mut out = Output::with_capacity(
        64 + index
            .channels
            .values()
            .map(|c| c.locations.len() * 16)
            .sum::<usize>(),
    );
    out.bytes(MAGIC);
    out.u32(covered.segment);
    out.u64(covered.offset);

    out.u64(index.channels.len() as u64);
    for (name, channel) in &index.channels {
        out.str(name);
        out.u64(channel.first);
        out.u64(channel.bytes);
        out.u64(channel.locations.len() as u64);
        for location in &channel.locations {
            out.u32(location.segment);
            out.u64(location.offset);
            out.u32(location.len);
        }
        out.u64(channel.keys.len() as u64);
        for (key, (seq, deleted)) in &channel.keys {
            out.str(key);
            out.u64(*seq);
            out.u8(u8::from(*deleted));
        }
        // Keyless seqs are mostly long runs: store them as ranges.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &seq in &channel.keyless {
            match runs.last_mut() {
                Some((_, end)) if *end + 1 == seq => *end = seq,
                _ => runs.push((seq, seq)),
            }
        }
        out.u64(runs.len() as u64);
        for (start, end) in runs {
            out.u64(start);
            out.u64(end);
        }
    }

    out.u64(index.segments.len() as u64);
    for (number, info) in &index.segments {
        out.u32(*number);
        out.u64(info.newest_ms);
        out.u64(info.last_seq.len() as u64);
        for (channel, seq) in &info.last_seq {
            out.str(channel);
            out.u64(*seq);
        }
    }

    let remembered = dedupe.entries();
    out.u64(remembered.len() as u64);
    for (time, key, seq) in remembered {
        out.u64(time);
        out.str(&key);
        out.u64(seq);
    }
    let bytes = out.finish();

    segments::replace_durably(dir, NAME, &bytes)
}

pub struct Loaded {
    pub index: Index,
    pub window: Vec<(u64, std::sync::Arc<str>, u64)>,
    pub covered: Position,
}

/// Reads the checkpoint; `None` when there is none or it is damaged (the caller then rebuilds
/// from the segments).
pub fn read(dir: &Path) -> Option<Loaded> {
    decode(&std::fs::read(path_of(dir)).ok()?)
}

/// Decodes a checkpoint's bytes; `None` when they are damaged in any way.
pub fn decode(bytes: &[u8]) -> Option<Loaded> {
    let mut input = Input::checked(bytes)?;
    if input.take(8)? != MAGIC {
        return None;
    }
    let covered = Position {
        segment: input.u32()?,
        offset: input.u64()?,
    };
    let mut index = Index::default();
    for _ in 0..input.count(32)? {
        let name = input.str()?.to_owned();
        let mut channel = ChannelIndex::starting_at(input.u64()?);
        channel.bytes = input.u64()?;
        let n = input.count(16)?;
        // The bulk of a checkpoint: decoded in one pass over fixed-size entries.
        let raw = input.take(n * 16)?;
        let mut locations = VecDeque::with_capacity(n);
        locations.extend(raw.chunks_exact(16).map(|c| Location {
            segment: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            offset: u64::from_le_bytes([c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11]]),
            len: u32::from_le_bytes([c[12], c[13], c[14], c[15]]),
        }));
        channel.locations = locations;
        let keys = input.count(13)?;
        let mut map = HashMap::with_capacity(keys);
        for _ in 0..keys {
            let key = input.str()?.to_owned();
            let seq = input.u64()?;
            map.insert(key, (seq, input.u8()? != 0));
        }
        channel.keys = map;
        channel.rebuild_live();
        for _ in 0..input.count(16)? {
            let (start, end) = (input.u64()?, input.u64()?);
            // Keyless seqs are retained seqs: never more of them than locations.
            let run = end.checked_sub(start)?.checked_add(1)?;
            if channel.keyless.len() as u64 + run > n as u64 {
                return None;
            }
            channel.keyless.extend(start..=end);
        }
        index.names.insert(name.clone());
        index.channels.insert(name, channel);
    }
    for _ in 0..input.count(20)? {
        let number = input.u32()?;
        let mut info = SegmentInfo {
            newest_ms: input.u64()?,
            last_seq: HashMap::new(),
        };
        for _ in 0..input.count(12)? {
            let channel = input.str()?.to_owned();
            info.last_seq.insert(channel, input.u64()?);
        }
        index.segments.insert(number, info);
    }
    let remembered = input.count(20)?;
    let mut window = Vec::with_capacity(remembered);
    for _ in 0..remembered {
        let time = input.u64()?;
        let key: std::sync::Arc<str> = std::sync::Arc::from(input.str()?);
        window.push((time, key, input.u64()?));
    }
    input.is_empty().then_some(Loaded {
        index,
        window,
        covered,
    })
}
